//! Configuration errors and the rendering of field paths.

use std::io;
use std::net::IpAddr;
use std::path::PathBuf;

use meshwire_identity::id::IdError;

pub use super::locate::Location;
use super::locate::{Seg, locate, locate_key};
use super::{NamespacedHostname, NetworkAddress};

/// ` (line L, column C)` when the location is known, else nothing.
fn at(location: &Option<Location>) -> String {
    location.map(|location| format!(" ({location})")).unwrap_or_default()
}

/// Why a local configuration was rejected.
///
/// Every variant but [`ConfigError::Read`] and [`ConfigError::Empty`] names the field (`workloads[2].workloadIps[0]`), and the
/// line and column when the document has them: `Display` reads
/// `workloads[2].workloadIps[0]: "10.0.0.x" is not an IP address (line 14, column 7)`.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read the local configuration {}: {message}", file.display())]
    Read {
        /// The file.
        file: PathBuf,
        /// The kind of IO error.
        kind: io::ErrorKind,
        /// The IO error's message.
        message: String,
    },
    /// The file is empty (or holds only whitespace): truncated, or still being written. The
    /// configuration in force stays.
    #[error(
        "the local configuration {} is empty; keeping the current configuration (write `{{}}` for one with nothing in it)",
        file.display()
    )]
    Empty {
        /// The file.
        file: PathBuf,
    },
    /// The document is not YAML, or a value does not fit its field: a wrong type, an unknown field in
    /// a policy, an IP address, port, protocol, `<network>/<ip>` or `<namespace>/<hostname>` that
    /// does not parse.
    #[error("{field}: {message}{}", at(location))]
    Invalid {
        /// The field, such as `workloads[2].workloadIps[0]`.
        field: String,
        /// What is wrong with it.
        message: String,
        /// Where it is.
        location: Option<Location>,
    },
    /// A field that has no default was left out.
    #[error("{field}: missing; {hint}{}", at(location))]
    Missing {
        /// The field, such as `workloads[0].name`.
        field: String,
        /// What to write instead.
        hint: &'static str,
        /// Where the item that lacks it is.
        location: Option<Location>,
    },
    /// A trust domain, namespace, service account or subject alternative name that cannot be part of
    /// a SPIFFE ID.
    #[error("{field}: {source}{}", at(location))]
    Identity {
        /// The field, such as `workloads[0].serviceAccount`.
        field: String,
        /// What the identity parser found wrong.
        source: IdError,
        /// Where it is.
        location: Option<Location>,
    },
    /// Two workloads (or one, twice) with the same IP in the same network.
    #[error(
        "{field}: address {ip} of network {network:?} is already taken by {other}{}",
        at(location)
    )]
    DuplicateWorkloadIp {
        /// The field of the second use, such as `workloads[3].workloadIps[0]`.
        field: String,
        /// The network.
        network: String,
        /// The address.
        ip: IpAddr,
        /// The field of the first use.
        other: String,
        /// Where the second use is.
        location: Option<Location>,
    },
    /// Two services with the same VIP.
    #[error("{field}: VIP {vip} is already taken by {other}{}", at(location))]
    DuplicateVip {
        /// The field of the second use, such as `services[1].vips[0]`.
        field: String,
        /// The VIP.
        vip: NetworkAddress,
        /// The field of the first use.
        other: String,
        /// Where the second use is.
        location: Option<Location>,
    },
    /// Two services with the same namespace and hostname.
    #[error("{field}: service {key} is already defined by {other}{}", at(location))]
    DuplicateService {
        /// The second definition, such as `services[1]`.
        field: String,
        /// The service key.
        key: NamespacedHostname,
        /// The first definition.
        other: String,
        /// Where the second definition is.
        location: Option<Location>,
    },
    /// Two workloads with the same `uid` (given, or derived from cluster, namespace and name).
    #[error("{field}: uid {uid:?} is already used by {other}{}", at(location))]
    DuplicateUid {
        /// The second workload's field, such as `workloads[1].uid`.
        field: String,
        /// The uid.
        uid: String,
        /// The first workload.
        other: String,
        /// Where the second workload's uid (or the workload) is.
        location: Option<Location>,
    },
}

impl ConfigError {
    /// The field the error is about, such as `workloads[2].workloadIps[0]`; `None` for
    /// [`ConfigError::Read`] and [`ConfigError::Empty`].
    pub fn field(&self) -> Option<&str> {
        match self {
            ConfigError::Read { .. } | ConfigError::Empty { .. } => None,
            ConfigError::Invalid { field, .. }
            | ConfigError::Missing { field, .. }
            | ConfigError::Identity { field, .. }
            | ConfigError::DuplicateWorkloadIp { field, .. }
            | ConfigError::DuplicateVip { field, .. }
            | ConfigError::DuplicateService { field, .. }
            | ConfigError::DuplicateUid { field, .. } => Some(field),
        }
    }

    /// Where in the document the error is, when known.
    pub fn location(&self) -> Option<Location> {
        match self {
            ConfigError::Read { .. } | ConfigError::Empty { .. } => None,
            ConfigError::Invalid { location, .. }
            | ConfigError::Missing { location, .. }
            | ConfigError::Identity { location, .. }
            | ConfigError::DuplicateWorkloadIp { location, .. }
            | ConfigError::DuplicateVip { location, .. }
            | ConfigError::DuplicateService { location, .. }
            | ConfigError::DuplicateUid { location, .. } => *location,
        }
    }

    fn location_mut(&mut self) -> Option<&mut Option<Location>> {
        match self {
            ConfigError::Read { .. } | ConfigError::Empty { .. } => None,
            ConfigError::Invalid { location, .. }
            | ConfigError::Missing { location, .. }
            | ConfigError::Identity { location, .. }
            | ConfigError::DuplicateWorkloadIp { location, .. }
            | ConfigError::DuplicateVip { location, .. }
            | ConfigError::DuplicateService { location, .. }
            | ConfigError::DuplicateUid { location, .. } => Some(location),
        }
    }
}

/// Something in an accepted configuration that meshwire ignores and the operator may want to know
/// about: a field that is neither meshwire's nor part of ztunnel's local configuration schema (a
/// field of a newer ztunnel, or a typo).
///
/// One warning stands for every entry of the same list(s) with the same unknown field (a generator
/// that writes a new field into each of 10,000 workloads gives one warning, not 10,000).
/// `Display` reads `workloads[0].futureField: unknown field, ignored (line 5, column 3)`, with `; did
/// you mean `serviceAccount`?` before the location when a known field of the same mapping is spelt
/// almost alike, and `; the same in 9999 other entries` after it. See
/// [`LocalConfig::parse_with_warnings`](super::LocalConfig::parse_with_warnings).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub struct ConfigWarning {
    /// The unknown field where it first appears, such as `workloads[0].futureField`.
    pub field: String,
    /// A known field of the same mapping spelt almost alike, if there is one.
    pub suggestion: Option<&'static str>,
    /// Where the field's key is; found for the first
    /// [`LOCATED_WARNINGS`](super::LOCATED_WARNINGS) warnings only (each costs a parse of the
    /// document).
    pub location: Option<Location>,
    /// How many other entries have the same unknown field (`workloads[1].futureField`, ...).
    pub others: usize,
}

impl ConfigWarning {
    /// The warning about the unknown field at `path` of `yaml` (found in `others` more entries), with
    /// its location if `locate`.
    pub(super) fn unknown_field(
        yaml: &str,
        path: &[Seg],
        suggestion: Option<&'static str>,
        others: usize,
        locate: bool,
    ) -> Self {
        Self {
            field: field_name(path),
            suggestion,
            location: if locate { locate_key(yaml, path) } else { None },
            others,
        }
    }
}

impl std::fmt::Display for ConfigWarning {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: unknown field, ignored", self.field)?;
        if let Some(known) = self.suggestion {
            write!(f, "; did you mean `{known}`?")?;
        }
        f.write_str(&at(&self.location))?;
        match self.others {
            0 => Ok(()),
            1 => f.write_str("; the same in 1 other entry"),
            others => write!(f, "; the same in {others} other entries"),
        }
    }
}

/// A field path from keys and indexes: `field_path!["workloads", 2, "workloadIps", 0]`.
macro_rules! field_path {
    ($($seg:expr),* $(,)?) => {
        vec![$($crate::xds::locate::Seg::from($seg)),*]
    };
}
pub(super) use field_path;

/// Renders a path as `workloads[2].services["default/example.com"]`: plain keys joined by dots,
/// indexes in brackets, keys with other characters quoted in brackets.
pub(super) fn field_name(path: &[Seg]) -> String {
    if path.is_empty() {
        return "(top level)".to_owned();
    }
    let mut out = String::new();
    for seg in path {
        match seg {
            Seg::Index(index) => out.push_str(&format!("[{index}]")),
            Seg::Key(key)
                if !key.is_empty() && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-') =>
            {
                if !out.is_empty() {
                    out.push('.');
                }
                out.push_str(key);
            }
            Seg::Key(key) => out.push_str(&format!("[{key:?}]")),
        }
    }
    out
}

/// A path as serde_yaml_ng renders it: `workloads[0].services.default/example.com`, `.` for the top.
fn yaml_path(path: &[Seg]) -> String {
    if path.is_empty() {
        return ".".to_owned();
    }
    let mut out = String::new();
    for seg in path {
        match seg {
            Seg::Index(index) => out.push_str(&format!("[{index}]")),
            Seg::Key(key) => {
                if !out.is_empty() {
                    out.push('.');
                }
                out.push_str(key);
            }
        }
    }
    out
}

/// A validation error whose location is still to be found in the document.
#[derive(Debug)]
pub(super) struct Pending {
    path: Vec<Seg>,
    error: Box<ConfigError>,
}

impl Pending {
    /// An error about the field at `path`; `make` receives the field's name.
    pub(super) fn new(path: Vec<Seg>, make: impl FnOnce(String) -> ConfigError) -> Self {
        let error = Box::new(make(field_name(&path)));
        Self { path, error }
    }

    /// The error with the location of its field, or of the nearest enclosing item that the document
    /// has (a defaulted field is not in the document).
    pub(super) fn locate(mut self, yaml: &str) -> ConfigError {
        let found = (0..=self.path.len())
            .rev()
            .find_map(|len| locate(yaml, &self.path[..len]));
        if let Some(slot) = self.error.location_mut() {
            *slot = found;
        }
        *self.error
    }
}

/// Turns a serde error into [`ConfigError::Invalid`], with the field path serde tracked and the
/// location the YAML parser recorded, and without the parser's own rendering of both.
pub(super) fn from_serde(err: &serde_path_to_error::Error<serde_yaml_ng::Error>) -> ConfigError {
    let mut path = Vec::new();
    for segment in err.path() {
        match segment {
            serde_path_to_error::Segment::Seq { index } => path.push(Seg::Index(*index)),
            serde_path_to_error::Segment::Map { key } => path.push(Seg::Key(key.clone())),
            serde_path_to_error::Segment::Enum { variant } => path.push(Seg::Key(variant.clone())),
            serde_path_to_error::Segment::Unknown => break,
        }
    }
    let inner = err.inner();
    let location = inner.location().map(|location| Location::from_yaml(&location));
    let mut message = inner.to_string();
    if let Some(location) = location {
        // serde_yaml_ng appends " at line L column C"; the location is reported separately.
        let suffix = format!(" at line {} column {}", location.line, location.column);
        if let Some(start) = message.find(&suffix) {
            message.replace_range(start..start + suffix.len(), "");
        }
    }
    // serde_yaml_ng prefixes its own rendering of the path (for an error about a key, the path of the
    // enclosing mapping); the path is reported separately.
    for len in (0..=path.len()).rev() {
        let prefix = format!("{}: ", yaml_path(&path[..len]));
        if let Some(rest) = message.strip_prefix(&prefix) {
            message = rest.to_owned();
            break;
        }
    }
    if matches!(path.first(), Some(Seg::Key(top)) if top == "policies") && message.starts_with("unknown field") {
        // Elsewhere an unknown field is a warning; in a policy it could be a condition that changes
        // who is allowed, so guessing is not safe.
        message.push_str(
            "; a policy with a field meshwire does not know is refused rather than half applied (unknown \
             fields are ignored with a warning outside `policies`)",
        );
    }
    ConfigError::Invalid {
        field: field_name(&path),
        message,
        location,
    }
}
