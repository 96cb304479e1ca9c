//! The machinery of the option table: what an option is (its flag, the variables that can set it
//! instead, its default and its help) and the lookup of a value in the flags, the variables and
//! `PROXY_CONFIG`, in that order. The options themselves are defined next to what they set, in the
//! sibling modules; [`OPTS`](super::command::OPTS) lists them all.

use std::collections::HashMap;
use std::ffi::OsString;
use std::path::Path;

use clap::{Arg, ArgAction, ArgMatches};

use super::error::{Error, Origin};

/// A place a value can be read from besides its flag.
#[derive(Clone, Copy)]
pub(super) enum Key {
    /// An environment variable.
    Env(&'static str),
    /// A field of the `PROXY_CONFIG` variable.
    ProxyConfig(&'static str),
}

/// What a flag takes.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Kind {
    /// A value.
    Value,
    /// `true` or `false`; the flag alone means `true`.
    Bool,
}

/// One option: its flag, the variables that can set it instead, its default and its help.
pub(super) struct Opt {
    /// `--flag`; the clap id is the flag without its dashes.
    pub(super) flag: &'static str,
    pub(super) value_name: &'static str,
    pub(super) help: &'static str,
    pub(super) heading: &'static str,
    pub(super) keys: &'static [Key],
    pub(super) default: Option<&'static str>,
    /// What `--help` says of the default when it is not a plain value.
    pub(super) default_note: Option<&'static str>,
    pub(super) kind: Kind,
}

impl Opt {
    /// A value option under `heading` with no variables and no default.
    pub(super) const fn new(heading: &'static str) -> Opt {
        Opt {
            flag: "",
            value_name: "",
            help: "",
            heading,
            keys: &[],
            default: None,
            default_note: None,
            kind: Kind::Value,
        }
    }

    pub(super) fn id(&self) -> &'static str {
        self.flag.trim_start_matches('-')
    }

    pub(super) fn arg(&self) -> Arg {
        let mut help = self.help.to_owned();
        let envs: Vec<String> = self
            .keys
            .iter()
            .map(|k| match k {
                Key::Env(name) => (*name).to_owned(),
                Key::ProxyConfig(field) => format!("PROXY_CONFIG {field}"),
            })
            .collect();
        if !envs.is_empty() {
            help.push_str(&format!(" [env: {}]", envs.join(", ")));
        }
        if let Some(default) = self.default.or(self.default_note) {
            help.push_str(&format!(" [default: {default}]"));
        }
        let arg = Arg::new(self.id())
            .long(self.id())
            .value_name(self.value_name)
            .help(help)
            .help_heading(self.heading)
            .action(ArgAction::Set);
        match self.kind {
            Kind::Value => arg,
            Kind::Bool => arg.num_args(0..=1).default_missing_value("true"),
        }
    }
}

// The headings of `--help`.
pub(super) const H_MODE: &str = "Mode and identity";
pub(super) const H_LISTEN: &str = "Listeners";
pub(super) const H_HBONE: &str = "HTTP/2 and connection pool";
pub(super) const H_RUN: &str = "Runtime";

/// The name `--version` and `--help` show: `ztunnel-uring` when the program runs as the io_uring build
/// (its file name), `ztunnel` otherwise.
pub(super) fn program_name(argv0: Option<&OsString>) -> &'static str {
    match argv0.and_then(|a| Path::new(a).file_name()).and_then(|n| n.to_str()) {
        Some("ztunnel-uring") => "ztunnel-uring",
        _ => "ztunnel",
    }
}

/// A value and where it came from.
pub(super) struct Found<T> {
    pub(super) value: T,
    pub(super) origin: Origin,
}

/// The parsed command line, the variables, and the fields of `PROXY_CONFIG`.
pub(super) struct Inputs<'a> {
    matches: ArgMatches,
    env: &'a dyn Fn(&str) -> Option<String>,
    /// The names of every variable, where known (for the prefixed ones: `ISTIO_META_*`, ...).
    names: Vec<String>,
    proxy_config: HashMap<&'static str, String>,
}

impl<'a> Inputs<'a> {
    pub(super) fn new(
        matches: ArgMatches,
        env: &'a dyn Fn(&str) -> Option<String>,
        mut names: Vec<String>,
    ) -> Result<Self, Error> {
        names.sort();
        let mut inputs = Self {
            matches,
            env,
            names,
            proxy_config: HashMap::new(),
        };
        if let Some(raw) = inputs.env("PROXY_CONFIG") {
            inputs.proxy_config = parse_proxy_config(&raw)?;
        }
        Ok(inputs)
    }

    /// The names of every variable (sorted), where the caller gave them.
    pub(super) fn names(&self) -> &[String] {
        &self.names
    }

    /// A variable; empty counts as unset.
    pub(super) fn env(&self, name: &str) -> Option<String> {
        (self.env)(name).filter(|v| !v.is_empty())
    }

    /// The value given for `opt` by its flag or one of its variables, not counting its default.
    pub(super) fn given(&self, opt: &Opt) -> Option<(String, Origin)> {
        if let Ok(Some(value)) = self.matches.try_get_one::<String>(opt.id()) {
            return Some((value.clone(), Origin::Flag(opt.flag)));
        }
        opt.keys.iter().find_map(|key| match *key {
            Key::Env(name) => self.env(name).map(|v| (v, Origin::Env(name))),
            Key::ProxyConfig(field) => self.proxy_config(field),
        })
    }

    /// A field of `PROXY_CONFIG`.
    pub(super) fn proxy_config(&self, field: &'static str) -> Option<(String, Origin)> {
        self.proxy_config
            .get(field)
            .map(|v| (v.clone(), Origin::ProxyConfig(field)))
    }

    /// The value of `opt`, its default if none is given, parsed.
    pub(super) fn get<T>(
        &self,
        opt: &Opt,
        parse: impl FnOnce(&str) -> Result<T, String>,
    ) -> Result<Option<Found<T>>, Error> {
        let raw = self
            .given(opt)
            .or_else(|| opt.default.map(|d| (d.to_owned(), Origin::Default(opt.flag))));
        raw.map(|(raw, origin)| parse_found(raw, origin, parse)).transpose()
    }

    /// [`Inputs::get`] of an option that has a default.
    pub(super) fn required<T>(
        &self,
        opt: &Opt,
        parse: impl FnOnce(&str) -> Result<T, String>,
    ) -> Result<Found<T>, Error> {
        self.get(opt, parse)?.ok_or_else(|| Error::Invalid {
            origin: Origin::Default(opt.flag),
            value: String::new(),
            reason: "no value and no default".to_owned(),
        })
    }
}

pub(super) fn parse_found<T>(
    raw: String,
    origin: Origin,
    parse: impl FnOnce(&str) -> Result<T, String>,
) -> Result<Found<T>, Error> {
    match parse(&raw) {
        Ok(value) => Ok(Found { value, origin }),
        Err(reason) => Err(Error::Invalid {
            origin,
            value: raw,
            reason,
        }),
    }
}

/// Reads the fields of Istio's ProxyConfig (YAML or JSON) that ztunnel reads.
pub(super) fn parse_proxy_config(raw: &str) -> Result<HashMap<&'static str, String>, Error> {
    use serde_yaml_ng::Value as Yaml;
    let invalid = |reason: String| Error::Invalid {
        origin: Origin::Env("PROXY_CONFIG"),
        value: raw.to_owned(),
        reason,
    };
    let scalar = |value: &Yaml| match value {
        Yaml::String(s) => Some(s.clone()),
        Yaml::Number(n) => Some(n.to_string()),
        Yaml::Bool(b) => Some(b.to_string()),
        _ => None,
    };
    let mut fields = HashMap::new();
    let map = match serde_yaml_ng::from_str::<Yaml>(raw).map_err(|err| invalid(err.to_string()))? {
        Yaml::Null => return Ok(fields),
        Yaml::Mapping(map) => map,
        _ => return Err(invalid("expected a mapping of ProxyConfig fields".to_owned())),
    };
    for field in ["proxyAdminPort", "statsPort", "concurrency"] {
        if let Some(value) = map.get(field) {
            let value = scalar(value).ok_or_else(|| invalid(format!("{field} must be a number")))?;
            fields.insert(field, value);
        }
    }
    match map.get("proxyMetadata") {
        None | Some(Yaml::Null) => {}
        Some(Yaml::Mapping(meta)) => {
            for (key, field) in [
                ("DNS_CAPTURE", "proxyMetadata.DNS_CAPTURE"),
                ("DNS_PROXY_ADDR", "proxyMetadata.DNS_PROXY_ADDR"),
            ] {
                // ztunnel strips the ISTIO_META_ prefix from metadata keys.
                if let Some(value) = meta.get(key).or_else(|| meta.get(format!("ISTIO_META_{key}"))) {
                    let value =
                        scalar(value).ok_or_else(|| invalid(format!("proxyMetadata.{key} must be a string")))?;
                    fields.insert(field, value);
                }
            }
        }
        Some(_) => return Err(invalid("proxyMetadata must be a mapping".to_owned())),
    }
    Ok(fields)
}
