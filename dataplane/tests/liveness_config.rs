//! The settings of the proxy's liveness: the hand-over (`--handover`, `MESHWIRE_HANDOVER`) and the
//! pooled CONNECT's response and probe timeouts, with their defaults and errors naming the flag or
//! variable.

#![allow(clippy::unwrap_used, missing_docs)]

use std::collections::HashMap;
use std::time::Duration;

use meshwire_dataplane::config::{Config, Error};

fn parse(args: &[&str], env: &[(&str, &str)]) -> Result<Config, Error> {
    let env: HashMap<String, String> = env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    let argv = std::iter::once("ztunnel").chain(args.iter().copied());
    Config::from_args_and_env(argv, &|name| env.get(name).cloned())
}

#[test]
fn no_handover_by_default_and_one_from_the_flag_or_the_variable() {
    assert_eq!(parse(&[], &[]).unwrap().handover, None);
    assert_eq!(
        parse(&["--handover", "30s"], &[]).unwrap().handover,
        Some(Duration::from_secs(30))
    );
    assert_eq!(
        parse(&[], &[("MESHWIRE_HANDOVER", "1m")]).unwrap().handover,
        Some(Duration::from_secs(60))
    );
    for bad in ["0", "soon", "1x"] {
        let err = parse(&["--handover", bad], &[]).unwrap_err().to_string();
        assert!(err.contains("--handover") && err.contains(bad), "{bad}: {err}");
    }
    let err = parse(&[], &[("MESHWIRE_HANDOVER", "0s")]).unwrap_err().to_string();
    assert!(err.contains("MESHWIRE_HANDOVER"), "{err}");
}

#[test]
fn pooled_connect_response_and_probe_timeouts() {
    let pool = parse(&[], &[]).unwrap().pool;
    assert_eq!(
        (pool.response_timeout, pool.probe_timeout),
        (Duration::from_secs(3), Duration::from_secs(2))
    );
    let pool = parse(
        &["--pool-response-timeout", "500ms"],
        &[("MESHWIRE_POOL_PROBE_TIMEOUT", "1s")],
    )
    .unwrap()
    .pool;
    assert_eq!(
        (pool.response_timeout, pool.probe_timeout),
        (Duration::from_millis(500), Duration::from_secs(1))
    );
    for (flag, bad) in [("--pool-response-timeout", "0"), ("--pool-probe-timeout", "never")] {
        let err = parse(&[flag, bad], &[]).unwrap_err().to_string();
        assert!(err.contains(flag) && err.contains(bad), "{flag} {bad}: {err}");
    }
}
