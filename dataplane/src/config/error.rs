//! Why a configuration cannot be used, and where the values the errors name came from.

use std::fmt;
use std::path::PathBuf;

use clap::error::ErrorKind;
use meshwire_hbone::settings::SettingsError;

/// Where a value came from, as errors name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Origin {
    /// A command-line flag (`--inbound-port`).
    Flag(&'static str),
    /// An environment variable (`HTTP2_FRAME_SIZE`).
    Env(&'static str),
    /// A field of the `PROXY_CONFIG` variable (`proxyAdminPort`).
    ProxyConfig(&'static str),
    /// The default of a flag.
    Default(&'static str),
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::Flag(flag) => f.write_str(flag),
            Origin::Env(name) => write!(f, "environment variable {name}"),
            Origin::ProxyConfig(field) => write!(f, "PROXY_CONFIG field {field}"),
            Origin::Default(flag) => write!(f, "{flag} (default)"),
        }
    }
}

/// Why the configuration cannot be used. Every message names the flag or variable and the value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The command line is malformed (unknown flag, missing value), or asks for `--help` or
    /// `--version`; `message` is clap's rendering, to print as is (see [`Error::is_help`]).
    #[error("{message}")]
    Cli {
        /// What clap found.
        kind: ErrorKind,
        /// The rendered message (or help, or version).
        message: String,
    },
    /// A value that does not parse or is out of range.
    #[error("invalid value {value:?} for {origin}: {reason}")]
    Invalid {
        /// Where it came from.
        origin: Origin,
        /// The value.
        value: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A variable of a family (`ISTIO_METAJSON_*`, `XDS_HEADER_*`) has a value that cannot be used.
    #[error("invalid value {value:?} for environment variable {name}: {reason}")]
    InvalidVariable {
        /// The variable.
        name: String,
        /// Its value.
        value: String,
        /// Why it cannot be used.
        reason: String,
    },
    /// Two listeners on one port.
    #[error("port {port} is used by both {first} and {second}: two listeners cannot share a port")]
    DuplicatePort {
        /// The port.
        port: u16,
        /// Where the first listener's port came from.
        first: Origin,
        /// Where the second listener's port came from.
        second: Origin,
    },
    /// HTTP/2 settings that HTTP/2 or each other reject.
    #[error("invalid HTTP/2 settings from {}: {source}", join(origins))]
    Http2 {
        /// Where the settings involved came from.
        origins: Vec<Origin>,
        /// What is wrong.
        source: SettingsError,
    },
    /// Dedicated mode without a workload.
    #[error(
        "dedicated mode (from {mode}) requires the workload: set --workload or PROXY_WORKLOAD_INFO to \
         namespace/name/service-account"
    )]
    MissingWorkload {
        /// Where dedicated mode came from.
        mode: Origin,
    },
    /// Two settings that exclude each other.
    #[error("{first} conflicts with {second}: {reason}")]
    Conflict {
        /// One setting.
        first: Origin,
        /// The other.
        second: Origin,
        /// Why they cannot go together.
        reason: &'static str,
    },
    /// One of a group of settings that go together without the others.
    #[error("{given} needs {missing} as well: {reason}")]
    Incomplete {
        /// The setting given.
        given: Origin,
        /// The flag of a setting missing.
        missing: &'static str,
        /// Which settings go together.
        reason: &'static str,
    },
    /// A file named by the configuration cannot be read
    /// ([`Config::check_files`](super::Config::check_files)).
    #[error("{flag} {}: {reason}", path.display())]
    File {
        /// The flag naming the file.
        flag: &'static str,
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
}

impl Error {
    /// Whether this is a request for `--help` or `--version` (or the `version` command), whose message
    /// goes to standard output with exit status 0.
    pub fn is_help(&self) -> bool {
        matches!(
            self,
            Error::Cli {
                kind: ErrorKind::DisplayHelp | ErrorKind::DisplayVersion,
                ..
            }
        )
    }
}

fn join(origins: &[Origin]) -> String {
    origins
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(" and ")
}
