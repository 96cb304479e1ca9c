//! The scenario of the authorization tests: one workload, `prod/server` on 127.0.0.2, served by its
//! proxy in dedicated mode, under the authorization policies of its namespace; HBONE clients of any
//! identity the mesh's CA issues connect to the proxy's inbound listener directly.

use crate::binary::Binary;
use crate::mesh::{Mesh, Proxy};
use crate::net::lo;

/// The local configuration of the workload alone, without policies (which allows everyone).
pub const WORKLOAD: &str = r#"
workloads:
  - uid: cluster1//v1/Pod/prod/server
    name: server
    namespace: prod
    serviceAccount: server
    workloadIps: ["127.0.0.2"]
    protocol: HBONE
"#;

/// A policy scoped to `namespace` with one rule of one clause of one match (`fields`, a YAML flow
/// mapping body such as `principals: [!Exact cluster.local/ns/prod/sa/frontend]`): an item of a
/// `policies:` list.
pub fn namespace_policy(namespace: &str, name: &str, action: &str, dry_run: bool, fields: &str) -> String {
    format!(
        r#"
  - name: {name}
    namespace: {namespace}
    scope: Namespace
    action: {action}
    dryRun: {dry_run}
    rules:
      - - - {{ {fields} }}
"#
    )
}

/// A [`namespace_policy`] of `prod`.
pub fn policy(name: &str, action: &str, dry_run: bool, fields: &str) -> String {
    namespace_policy("prod", name, action, dry_run, fields)
}

/// An enforced ALLOW [`policy`].
pub fn allow(name: &str, fields: &str) -> String {
    policy(name, "Allow", false, fields)
}

/// An enforced DENY [`policy`].
pub fn deny(name: &str, fields: &str) -> String {
    policy(name, "Deny", false, fields)
}

/// The configuration of the workload under `policies` (made by [`policy`]).
pub fn config(policies: &[String]) -> String {
    if policies.is_empty() {
        WORKLOAD.to_owned()
    } else {
        format!("{WORKLOAD}policies:{}", policies.concat())
    }
}

/// The workload's proxy of `binary` in `mesh`, ready.
pub fn server_proxy(mesh: &Mesh, binary: &Binary) -> Proxy {
    mesh.proxy(binary, lo(2)).dedicated("prod/server/server").spawn()
}
