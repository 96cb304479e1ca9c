//! The envoy `Node` that identifies the node proxy to istiod, built from the proxy's environment.
//!
//! This crate never reads the environment: the caller passes the variables as (name, value) pairs
//! (`std::env::vars()` in a binary, a literal list in a test).
//!
//! ```
//! use meshwire_control::node::node_from_env;
//!
//! let node = node_from_env([
//!     ("POD_NAME", "ztunnel-x7k2p"),
//!     ("POD_NAMESPACE", "istio-system"),
//!     ("INSTANCE_IP", "10.0.0.7"),
//!     ("NODE_NAME", "worker-1"),
//!     ("ISTIO_META_CLUSTER_ID", "Kubernetes"),
//!     ("ISTIO_METAJSON_LABELS", r#"{"app":"ztunnel"}"#),
//! ])
//! .unwrap();
//! assert_eq!(node.id, "ztunnel~10.0.0.7~ztunnel-x7k2p.istio-system~istio-system.svc.cluster.local");
//! let meta = node.metadata.unwrap().fields;
//! assert!(meta.contains_key("CLUSTER_ID") && meta.contains_key("LABELS") && meta.contains_key("NODE_NAME"));
//! ```

use std::collections::BTreeMap;

use prost_types::value::Kind;
use prost_types::{ListValue, Struct, Value};

use crate::proto::envoy::config::core::v3::Node;

/// The prefix of string metadata variables.
pub const META_PREFIX: &str = "ISTIO_META_";
/// The prefix of JSON metadata variables.
pub const METAJSON_PREFIX: &str = "ISTIO_METAJSON_";

/// What is wrong with the environment a [`Node`] is built from.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum NodeError {
    /// A required variable is missing or empty.
    #[error("the environment variable {name} is missing or empty")]
    Missing {
        /// The variable.
        name: String,
    },
    /// An `ISTIO_METAJSON_<K>` variable does not hold JSON.
    #[error("the environment variable {name} is not valid JSON: {reason}")]
    Json {
        /// The variable.
        name: String,
        /// The parser's message.
        reason: String,
    },
}

/// Builds the `Node` istiod expects of a ztunnel from environment variables:
/// - `id = "ztunnel~<INSTANCE_IP>~<POD_NAME>.<POD_NAMESPACE>~<POD_NAMESPACE>.svc.cluster.local"`
///   (`INSTANCE_IP`, `POD_NAME` and `POD_NAMESPACE` are required);
/// - metadata strings `NAME`, `NAMESPACE`, `INSTANCE_IPS` (the variable `INSTANCE_IPS` when given,
///   else `INSTANCE_IP`), `NODE_NAME` (when given);
/// - every `ISTIO_META_<K>` as the string `K`, every `ISTIO_METAJSON_<K>` parsed as JSON (a bad
///   value is an error naming the variable). Explicit keys above win over metadata variables of the
///   same name.
pub fn node_from_env<I, K, V>(vars: I) -> Result<Node, NodeError>
where
    I: IntoIterator<Item = (K, V)>,
    K: AsRef<str>,
    V: AsRef<str>,
{
    let mut plain: BTreeMap<String, String> = BTreeMap::new();
    let mut metadata: BTreeMap<String, Value> = BTreeMap::new();
    for (name, value) in vars {
        let (name, value) = (name.as_ref(), value.as_ref());
        if let Some(key) = name.strip_prefix(METAJSON_PREFIX) {
            if key.is_empty() {
                continue;
            }
            let json: serde_json::Value = serde_json::from_str(value).map_err(|e| NodeError::Json {
                name: name.to_string(),
                reason: e.to_string(),
            })?;
            metadata.insert(key.to_string(), json_to_value(json));
        } else if let Some(key) = name.strip_prefix(META_PREFIX) {
            if key.is_empty() {
                continue;
            }
            metadata.insert(key.to_string(), string(value));
        } else {
            plain.insert(name.to_string(), value.to_string());
        }
    }
    let required = |name: &str| -> Result<String, NodeError> {
        match plain.get(name) {
            Some(v) if !v.is_empty() => Ok(v.clone()),
            _ => Err(NodeError::Missing { name: name.to_string() }),
        }
    };
    let ip = required("INSTANCE_IP")?;
    let pod = required("POD_NAME")?;
    let ns = required("POD_NAMESPACE")?;
    let ips = plain
        .get("INSTANCE_IPS")
        .filter(|v| !v.is_empty())
        .cloned()
        .unwrap_or(ip.clone());
    metadata.insert("NAME".to_string(), string(&pod));
    metadata.insert("NAMESPACE".to_string(), string(&ns));
    metadata.insert("INSTANCE_IPS".to_string(), string(&ips));
    if let Some(node_name) = plain.get("NODE_NAME").filter(|v| !v.is_empty()) {
        metadata.insert("NODE_NAME".to_string(), string(node_name));
    }
    Ok(Node {
        id: format!("ztunnel~{ip}~{pod}.{ns}~{ns}.svc.cluster.local"),
        metadata: Some(Struct {
            fields: metadata.into_iter().collect(),
        }),
        ..Default::default()
    })
}

fn string(s: &str) -> Value {
    Value {
        kind: Some(Kind::StringValue(s.to_string())),
    }
}

/// A JSON value as a protobuf `Value`.
pub fn json_to_value(json: serde_json::Value) -> Value {
    let kind = match json {
        serde_json::Value::Null => Kind::NullValue(0),
        serde_json::Value::Bool(b) => Kind::BoolValue(b),
        serde_json::Value::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or(0.0)),
        serde_json::Value::String(s) => Kind::StringValue(s),
        serde_json::Value::Array(items) => Kind::ListValue(ListValue {
            values: items.into_iter().map(json_to_value).collect(),
        }),
        serde_json::Value::Object(map) => Kind::StructValue(Struct {
            fields: map.into_iter().map(|(k, v)| (k, json_to_value(v))).collect(),
        }),
    };
    Value { kind: Some(kind) }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn env() -> Vec<(&'static str, &'static str)> {
        vec![
            ("POD_NAME", "ztunnel-1"),
            ("POD_NAMESPACE", "istio-system"),
            ("INSTANCE_IP", "10.1.2.3"),
            ("NODE_NAME", "node-a"),
            ("PATH", "/bin"),
        ]
    }

    fn get<'a>(node: &'a Node, key: &str) -> Option<&'a Kind> {
        node.metadata.as_ref()?.fields.get(key)?.kind.as_ref()
    }

    #[test]
    fn id_and_metadata() {
        let mut vars = env();
        vars.push(("ISTIO_META_CLUSTER_ID", "c1"));
        vars.push(("ISTIO_METAJSON_LABELS", r#"{"a":"b","n":[1,true,null]}"#));
        let node = node_from_env(vars).unwrap();
        assert_eq!(
            node.id,
            "ztunnel~10.1.2.3~ztunnel-1.istio-system~istio-system.svc.cluster.local"
        );
        let s = |k| match get(&node, k) {
            Some(Kind::StringValue(s)) => s.clone(),
            other => panic!("{k}: {other:?}"),
        };
        assert_eq!(s("NAME"), "ztunnel-1");
        assert_eq!(s("NAMESPACE"), "istio-system");
        assert_eq!(s("INSTANCE_IPS"), "10.1.2.3");
        assert_eq!(s("NODE_NAME"), "node-a");
        assert_eq!(s("CLUSTER_ID"), "c1");
        assert!(get(&node, "PATH").is_none());
        let Some(Kind::StructValue(labels)) = get(&node, "LABELS") else {
            panic!("LABELS is not a struct")
        };
        assert_eq!(labels.fields["a"].kind, Some(Kind::StringValue("b".into())));
        let Some(Kind::ListValue(list)) = &labels.fields["n"].kind else {
            panic!("n is not a list")
        };
        assert_eq!(list.values[0].kind, Some(Kind::NumberValue(1.0)));
        assert_eq!(list.values[1].kind, Some(Kind::BoolValue(true)));
        assert_eq!(list.values[2].kind, Some(Kind::NullValue(0)));
    }

    #[test]
    fn errors_name_the_variable() {
        let mut vars = env();
        vars.push(("ISTIO_METAJSON_BAD", "{not json"));
        let e = node_from_env(vars).unwrap_err();
        assert!(
            matches!(&e, NodeError::Json { name, .. } if name == "ISTIO_METAJSON_BAD"),
            "{e}"
        );
        assert!(e.to_string().contains("ISTIO_METAJSON_BAD"));
        let vars: Vec<_> = env().into_iter().filter(|(k, _)| *k != "POD_NAMESPACE").collect();
        assert_eq!(
            node_from_env(vars).unwrap_err(),
            NodeError::Missing {
                name: "POD_NAMESPACE".into()
            }
        );
    }
}
