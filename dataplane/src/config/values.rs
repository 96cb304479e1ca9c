//! The small value parsers the options share: text, ports, addresses, booleans, byte counts, counts and
//! durations. Each returns what is wrong as a sentence, to which the caller adds the flag or variable
//! and the value.

use std::net::IpAddr;
use std::time::Duration;

pub(super) fn non_empty(s: &str) -> Result<String, String> {
    let s = s.trim();
    if s.is_empty() {
        Err("must not be empty".to_owned())
    } else {
        Ok(s.to_owned())
    }
}

pub(super) fn parse_port(s: &str) -> Result<u16, String> {
    match s.trim().parse::<u16>() {
        Ok(0) | Err(_) => Err("expected a port number between 1 and 65535".to_owned()),
        Ok(port) => Ok(port),
    }
}

pub(super) fn parse_ip(s: &str) -> Result<IpAddr, String> {
    let s = s.trim();
    let s = s.strip_prefix('[').and_then(|s| s.strip_suffix(']')).unwrap_or(s);
    s.parse().map_err(|_| "expected an IPv4 or IPv6 address".to_owned())
}

pub(super) fn parse_bool(s: &str) -> Result<bool, String> {
    match s.trim().to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" | "on" => Ok(true),
        "false" | "0" | "no" | "off" => Ok(false),
        _ => Err("expected true or false".to_owned()),
    }
}

pub(super) fn parse_u32(s: &str) -> Result<u32, String> {
    s.trim()
        .parse()
        .map_err(|_| format!("expected a number of bytes between 0 and {}", u32::MAX))
}

pub(super) fn parse_bytes(s: &str) -> Result<usize, String> {
    s.trim()
        .parse()
        .map_err(|_| format!("expected a number of bytes between 0 and {}", usize::MAX))
}

pub(super) fn at_least_one(s: &str) -> Result<usize, String> {
    match s.trim().parse::<usize>() {
        Ok(0) => Err("must be at least 1".to_owned()),
        Ok(n) => Ok(n),
        Err(_) => Err("expected a whole number".to_owned()),
    }
}

pub(super) fn positive_duration(s: &str) -> Result<Duration, String> {
    match parse_duration(s)? {
        Duration::ZERO => Err("must be more than zero".to_owned()),
        d => Ok(d),
    }
}

/// Parses a Go-style duration (`5s`, `500ms`, `1m30s`, `1.5h`; units `ns`, `us`/`µs`, `ms`, `s`, `m`,
/// `min`, `h`, `d`), or a whole number of seconds as ztunnel also accepts.
pub(super) fn parse_duration(s: &str) -> Result<Duration, String> {
    const TOO_LARGE: &str = "the duration is too large";
    let s = s.trim();
    if s.is_empty() {
        return Err("expected a duration such as 5s, 500ms or 1m".to_owned());
    }
    if s.bytes().all(|b| b.is_ascii_digit()) {
        return s.parse().map(Duration::from_secs).map_err(|_| TOO_LARGE.to_owned());
    }
    let mut nanos: u128 = 0;
    let mut rest = s;
    while !rest.is_empty() {
        let number_end = rest
            .find(|c: char| !c.is_ascii_digit() && c != '.')
            .unwrap_or(rest.len());
        let (number, after) = rest.split_at(number_end);
        let unit_end = after
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(after.len());
        let (unit, after) = after.split_at(unit_end);
        rest = after;
        let unit_nanos: u128 = match unit {
            "ns" => 1,
            "us" | "µs" | "μs" => 1_000,
            "ms" => 1_000_000,
            "s" => 1_000_000_000,
            "m" | "min" => 60_000_000_000,
            "h" => 3_600_000_000_000,
            "d" => 86_400_000_000_000,
            "" => return Err(format!("{number:?} has no unit (ns, us, ms, s, m, h, d)")),
            _ => return Err(format!("unknown unit {unit:?} (expected ns, us, ms, s, m, h or d)")),
        };
        let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
        if (whole.is_empty() && fraction.is_empty()) || fraction.contains('.') {
            return Err(format!("expected a number before {unit:?}"));
        }
        let whole: u128 = if whole.is_empty() {
            0
        } else {
            whole.parse().map_err(|_| TOO_LARGE.to_owned())?
        };
        // Nanosecond precision needs at most 18 decimal places even for days.
        let fraction = &fraction[..fraction.len().min(18)];
        let fraction_nanos = if fraction.is_empty() {
            0
        } else {
            let digits: u128 = fraction.parse().map_err(|_| TOO_LARGE.to_owned())?;
            let scale = 10u128.pow(u32::try_from(fraction.len()).unwrap_or(18));
            digits * unit_nanos / scale
        };
        nanos = whole
            .checked_mul(unit_nanos)
            .and_then(|n| n.checked_add(fraction_nanos))
            .and_then(|n| n.checked_add(nanos))
            .ok_or_else(|| TOO_LARGE.to_owned())?;
    }
    let nanos = u64::try_from(nanos).map_err(|_| TOO_LARGE.to_owned())?;
    Ok(Duration::from_nanos(nanos))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        let ok = |s: &str| parse_duration(s).unwrap();
        assert_eq!(ok("5s"), Duration::from_secs(5));
        assert_eq!(ok("500ms"), Duration::from_millis(500));
        assert_eq!(ok("1m"), Duration::from_secs(60));
        assert_eq!(ok("1m30s"), Duration::from_secs(90));
        assert_eq!(ok("1.5h"), Duration::from_secs(5400));
        assert_eq!(ok(".5s"), Duration::from_millis(500));
        assert_eq!(ok("10"), Duration::from_secs(10));
        assert_eq!(ok("0"), Duration::ZERO);
        assert_eq!(ok("2us"), Duration::from_micros(2));
        assert_eq!(ok("2µs"), Duration::from_micros(2));
        assert_eq!(ok("1d"), Duration::from_secs(86_400));
        for bad in [
            "",
            "s",
            "5x",
            "-5s",
            "1..5s",
            ".s",
            "5 s",
            "99999999999999999999999999999999999999999h",
        ] {
            assert!(parse_duration(bad).is_err(), "{bad:?} parsed");
        }
    }
}
