//! HBONE connections: the HTTP/2 settings, the budgets of bytes held for peers (see **Buffer budgets**
//! in the [module documentation](super)), and the connection pool.

use meshwire_hbone::Settings;
use meshwire_hbone::pool::PoolConfig;
use meshwire_hbone::settings::SettingsError;

use super::Config;
use super::error::{Error, Origin};
use super::options::Key::Env;
use super::options::{H_HBONE, Inputs, Opt};
use super::values::{at_least_one, parse_bytes, parse_duration, parse_u32, positive_duration};

/// The budgets of bytes the proxy holds from upstreams for HBONE peers that do not read (the
/// per-stream part is the HTTP/2 send buffer, [`meshwire_hbone::Settings::send_buffer`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BufferLimits {
    /// Bytes the streams of one connection hold together (`--hbone-connection-buffer`).
    pub connection: usize,
    /// Bytes every HBONE tunnel of the process, inbound and outbound, holds together
    /// (`--hbone-buffer-budget`).
    pub process: usize,
    /// Bytes of HTTP/2 connection windows (beyond HTTP/2's 64 KiB default each) every HBONE
    /// connection of the process, inbound and outbound, advertises together
    /// (`--hbone-receive-budget`).
    pub receive: usize,
}

pub(super) const HTTP2_STREAM_WINDOW: Opt = Opt {
    flag: "--http2-stream-window",
    value_name: "BYTES",
    keys: &[Env("HTTP2_STREAM_WINDOW_SIZE")],
    default: Some("4194304"),
    help: "Initial flow-control window of each HBONE stream",
    ..Opt::new(H_HBONE)
};
pub(super) const HTTP2_CONNECTION_WINDOW: Opt = Opt {
    flag: "--http2-connection-window",
    value_name: "BYTES",
    keys: &[Env("HTTP2_CONNECTION_WINDOW_SIZE")],
    default: Some("16777216"),
    help: "Flow-control window of each HBONE connection (at least 4 stream windows)",
    ..Opt::new(H_HBONE)
};
pub(super) const HTTP2_FRAME_SIZE: Opt = Opt {
    flag: "--http2-frame-size",
    value_name: "BYTES",
    keys: &[Env("HTTP2_FRAME_SIZE")],
    default: Some("1048576"),
    help: "Largest HTTP/2 frame accepted",
    ..Opt::new(H_HBONE)
};
pub(super) const HBONE_STREAM_SEND_BUFFER: Opt = Opt {
    flag: "--hbone-stream-send-buffer",
    value_name: "BYTES",
    keys: &[Env("MESHWIRE_HBONE_STREAM_SEND_BUFFER")],
    default: Some("409600"),
    help: "Bytes HTTP/2 queues for one HBONE stream whose peer does not read, whatever window the peer advertises",
    ..Opt::new(H_HBONE)
};
pub(super) const HBONE_CONNECTION_BUFFER: Opt = Opt {
    flag: "--hbone-connection-buffer",
    value_name: "BYTES",
    keys: &[Env("MESHWIRE_HBONE_CONNECTION_BUFFER")],
    default: Some("67108864"),
    help: "Bytes the streams of one inbound HBONE connection hold from their upstreams together",
    ..Opt::new(H_HBONE)
};
pub(super) const HBONE_BUFFER_BUDGET: Opt = Opt {
    flag: "--hbone-buffer-budget",
    value_name: "BYTES",
    keys: &[Env("MESHWIRE_HBONE_BUFFER_BUDGET")],
    default: Some("1073741824"),
    help: "Bytes every HBONE tunnel of the process (inbound and outbound) holds for peers together; \
           streams wait (and stop reading what they forward) when it is spent",
    ..Opt::new(H_HBONE)
};
pub(super) const HBONE_RECEIVE_BUDGET: Opt = Opt {
    flag: "--hbone-receive-budget",
    value_name: "BYTES",
    keys: &[Env("MESHWIRE_HBONE_RECEIVE_BUDGET")],
    default: Some("1073741824"),
    help: "Bytes of HTTP/2 connection windows every HBONE connection of the process advertises together \
           (beyond HTTP/2's 64 KiB default each); a connection set up when it is spent advertises less",
    ..Opt::new(H_HBONE)
};
pub(super) const POOL_MAX_STREAMS: Opt = Opt {
    flag: "--pool-max-streams-per-connection",
    value_name: "N",
    keys: &[Env("POOL_MAX_STREAMS_PER_CONNECTION")],
    default: Some("100"),
    help: "Streams on one pooled HBONE connection before another is opened",
    ..Opt::new(H_HBONE)
};
pub(super) const POOL_RESPONSE_TIMEOUT: Opt = Opt {
    flag: "--pool-response-timeout",
    value_name: "DURATION",
    keys: &[Env("MESHWIRE_POOL_RESPONSE_TIMEOUT")],
    default: Some("3s"),
    help: "How long a CONNECT waits for its answer on a pooled HBONE connection before the connection is \
           checked with a PING (new streams avoid it meanwhile)",
    ..Opt::new(H_HBONE)
};
pub(super) const POOL_PROBE_TIMEOUT: Opt = Opt {
    flag: "--pool-probe-timeout",
    value_name: "DURATION",
    keys: &[Env("MESHWIRE_POOL_PROBE_TIMEOUT")],
    default: Some("2s"),
    help: "How long that PING may go unanswered before the connection is retired and its waiting CONNECTs fail",
    ..Opt::new(H_HBONE)
};
pub(super) const POOL_UNUSED_RELEASE_TIMEOUT: Opt = Opt {
    flag: "--pool-unused-release-timeout",
    value_name: "DURATION",
    keys: &[Env("POOL_UNUSED_RELEASE_TIMEOUT")],
    default: Some("5m"),
    help: "How long a pooled connection without streams is kept",
    ..Opt::new(H_HBONE)
};
pub(super) const POOL_SURPLUS_RELEASE_TIMEOUT: Opt = Opt {
    flag: "--pool-surplus-release-timeout",
    value_name: "DURATION",
    keys: &[Env("MESHWIRE_POOL_SURPLUS_RELEASE_TIMEOUT")],
    default: Some("5s"),
    help: "How long a pooled connection without streams is kept while another connection to the same peer stays \
           (the connections a burst opened, and their memory, go soon after it)",
    ..Opt::new(H_HBONE)
};

/// What the HBONE options set, and where the values checked together came from.
pub(super) struct Hbone {
    pub(super) pool: PoolConfig,
    pub(super) buffers: BufferLimits,
    /// Where the stream send buffer, the connection buffer and the process budget came from.
    pub(super) buffer_origins: [Origin; 3],
}

impl Inputs<'_> {
    pub(super) fn hbone(&self) -> Result<Hbone, Error> {
        let stream_window = self.required(&HTTP2_STREAM_WINDOW, parse_u32)?;
        let connection_window = self.required(&HTTP2_CONNECTION_WINDOW, parse_u32)?;
        let frame_size = self.required(&HTTP2_FRAME_SIZE, parse_u32)?;
        let send_buffer = self.required(&HBONE_STREAM_SEND_BUFFER, parse_bytes)?;
        let settings = Settings::builder()
            .stream_window(stream_window.value)
            .connection_window(connection_window.value)
            .max_frame_size(frame_size.value)
            .send_buffer(send_buffer.value)
            .build()
            .map_err(|source| {
                let origins = match &source {
                    SettingsError::OutOfRange { field, .. } if *field == "stream_window" => vec![stream_window.origin],
                    SettingsError::OutOfRange { field, .. } if *field == "connection_window" => {
                        vec![connection_window.origin]
                    }
                    SettingsError::OutOfRange { field, .. } if *field == "max_frame_size" => vec![frame_size.origin],
                    SettingsError::ConnectionWindowTooSmall { .. } => {
                        vec![connection_window.origin, stream_window.origin]
                    }
                    SettingsError::OutOfRange { field, .. } if *field == "send_buffer" => vec![send_buffer.origin],
                    _ => vec![stream_window.origin, connection_window.origin, frame_size.origin],
                };
                Error::Http2 { origins, source }
            })?;
        let connection_buffer = self.required(&HBONE_CONNECTION_BUFFER, parse_bytes)?;
        let buffer_budget = self.required(&HBONE_BUFFER_BUDGET, parse_bytes)?;
        let receive_budget = self.required(&HBONE_RECEIVE_BUDGET, parse_bytes)?;
        let pool = PoolConfig {
            max_streams_per_connection: self.required(&POOL_MAX_STREAMS, at_least_one)?.value,
            idle_timeout: self.required(&POOL_UNUSED_RELEASE_TIMEOUT, parse_duration)?.value,
            surplus_idle_timeout: self.required(&POOL_SURPLUS_RELEASE_TIMEOUT, parse_duration)?.value,
            response_timeout: self.required(&POOL_RESPONSE_TIMEOUT, positive_duration)?.value,
            probe_timeout: self.required(&POOL_PROBE_TIMEOUT, positive_duration)?.value,
            settings,
        };
        let buffers = BufferLimits {
            connection: connection_buffer.value,
            process: buffer_budget.value,
            receive: receive_budget.value,
        };
        Ok(Hbone {
            pool,
            buffers,
            buffer_origins: [send_buffer.origin, connection_buffer.origin, buffer_budget.origin],
        })
    }
}

/// [`Hbone::buffer_origins`] of a configuration built by hand: the flags.
pub(super) fn flag_origins() -> [Origin; 3] {
    [
        &HBONE_STREAM_SEND_BUFFER,
        &HBONE_CONNECTION_BUFFER,
        &HBONE_BUFFER_BUDGET,
    ]
    .map(|opt| Origin::Flag(opt.flag))
}

/// Checks that each budget lets at least one stream through (the HTTP/2 settings are valid by
/// construction: [`Inputs::hbone`] reports invalid ones, naming the options); `buffers` are where
/// the values came from, as in [`Hbone`].
pub(super) fn check(config: &Config, buffers: [Origin; 3]) -> Result<(), Error> {
    // Each budget lets at least one stream through.
    let lease = meshwire_hbone::server::stream_lease(config.http2(), &meshwire_hbone::copy::CopyConfig::default());
    for (value, origin) in [
        (config.buffers.connection, buffers[1]),
        (config.buffers.process, buffers[2]),
    ] {
        if value < lease {
            return Err(Error::Invalid {
                origin,
                value: value.to_string(),
                reason: format!(
                    "smaller than what one stream holds ({lease} bytes: the stream send buffer plus the \
                     256 KiB copy buffer), so no stream could send"
                ),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn buffer_budgets_are_read_and_each_lets_one_stream_through() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |name: &str| pairs.iter().find(|(n, _)| *n == name).map(|(_, v)| (*v).to_owned())
        };
        let default = Config::default();
        assert_eq!(default.http2().send_buffer(), 400 * 1024);
        assert_eq!(
            default.buffers,
            BufferLimits {
                connection: 64 << 20,
                process: 1 << 30,
                receive: 1 << 30,
            }
        );
        let set = Config::from_args_and_env(
            ["ztunnel", "--hbone-buffer-budget", "33554432"],
            &env(&[
                ("MESHWIRE_HBONE_RECEIVE_BUDGET", "0"),
                ("MESHWIRE_HBONE_CONNECTION_BUFFER", "8388608"),
                ("MESHWIRE_HBONE_STREAM_SEND_BUFFER", "65536"),
            ]),
        )
        .unwrap();
        assert_eq!(set.http2().send_buffer(), 65536);
        assert_eq!(set.pool.settings.send_buffer(), 65536, "the client side too");
        assert_eq!(
            set.buffers,
            BufferLimits {
                connection: 8 << 20,
                process: 32 << 20,
                receive: 0,
            }
        );
        // A budget under one stream's lease (send buffer + 256 KiB copy buffer) names its origin.
        for (args, vars, named) in [
            (&["--hbone-buffer-budget", "1000"][..], &[][..], "--hbone-buffer-budget"),
            (
                &[][..],
                &[
                    ("MESHWIRE_HBONE_CONNECTION_BUFFER", "327679"),
                    ("MESHWIRE_HBONE_STREAM_SEND_BUFFER", "65536"),
                ][..],
                "environment variable MESHWIRE_HBONE_CONNECTION_BUFFER",
            ),
            (
                &[][..],
                &[("MESHWIRE_HBONE_STREAM_SEND_BUFFER", "100")][..],
                "environment variable MESHWIRE_HBONE_STREAM_SEND_BUFFER",
            ),
            (&["--hbone-buffer-budget=-1"][..], &[][..], "--hbone-buffer-budget"),
            (
                &["--hbone-receive-budget", "16MiB"][..],
                &[][..],
                "--hbone-receive-budget",
            ),
            (
                &[][..],
                &[("MESHWIRE_HBONE_RECEIVE_BUDGET", "-5")][..],
                "environment variable MESHWIRE_HBONE_RECEIVE_BUDGET",
            ),
        ] {
            let vars: Vec<(String, String)> = vars.iter().map(|(n, v)| ((*n).to_owned(), (*v).to_owned())).collect();
            let lookup = |name: &str| vars.iter().find(|(n, _)| n == name).map(|(_, v)| v.clone());
            let err = Config::from_args_and_env(std::iter::once("ztunnel").chain(args.iter().copied()), &lookup)
                .unwrap_err()
                .to_string();
            assert!(err.contains(named), "{args:?} {vars:?}: {err}");
        }
    }
}
