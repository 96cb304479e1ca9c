//! Certificates from a real local CA and the TLS configs built on them.

use std::sync::Arc;

use meshwire_identity::id::{SpiffeId, TrustDomain};
use meshwire_identity::source::local_ca::LocalCa;
use meshwire_identity::tls::{self, TrustDomains};

/// The server workload's identity in the fixtures.
pub const SERVER: &str = "spiffe://cluster.local/ns/default/sa/server";
/// The client workload's identity in the fixtures.
pub const CLIENT: &str = "spiffe://cluster.local/ns/default/sa/client";

/// `s` as a SPIFFE ID; panics when it is not one.
pub fn id(s: &str) -> SpiffeId {
    SpiffeId::new(s).unwrap()
}

/// A fresh local CA for `cluster.local`, a server config presenting [`SERVER`] and a client config
/// presenting [`CLIENT`] that expects [`SERVER`], both offering `h2`.
pub struct Pki {
    /// The local CA every certificate here comes from.
    pub ca: LocalCa,
    /// A server config presenting [`SERVER`].
    pub server_tls: Arc<rustls::ServerConfig>,
    /// A client config presenting [`CLIENT`] that expects [`SERVER`].
    pub client_tls: Arc<rustls::ClientConfig>,
}

impl Default for Pki {
    fn default() -> Self {
        Self::new()
    }
}

impl Pki {
    /// A new CA and the two configs.
    pub fn new() -> Self {
        let ca = LocalCa::ephemeral(TrustDomain::new("cluster.local").unwrap()).unwrap();
        let server_tls = server_config(&ca, SERVER);
        let client_tls = client_config(&ca, CLIENT, SERVER);
        Self {
            ca,
            server_tls,
            client_tls,
        }
    }

    /// A server config presenting `identity`.
    pub fn server_as(&self, identity: &str) -> Arc<rustls::ServerConfig> {
        server_config(&self.ca, identity)
    }

    /// A client config expecting `expected` as the server.
    pub fn client_expecting(&self, expected: &str) -> Arc<rustls::ClientConfig> {
        client_config(&self.ca, CLIENT, expected)
    }
}

/// A server config presenting `identity`, issued by `ca`, trusting `ca`'s trust domain, offering
/// `h2`.
pub fn server_config(ca: &LocalCa, identity: &str) -> Arc<rustls::ServerConfig> {
    let svid = ca
        .issue(&id(identity))
        .unwrap_or_else(|e| panic!("issuing a certificate for {identity}: {e}"));
    let config = tls::server_config(
        &svid.svid,
        &svid.bundles,
        &TrustDomains::only(ca.trust_domain().clone()),
        vec![b"h2".to_vec()],
    )
    .unwrap_or_else(|e| panic!("a server config for {identity}: {e}"));
    Arc::new(config)
}

/// A client config presenting `identity`, issued by `ca`, expecting `expected` as the server,
/// offering `h2`.
pub fn client_config(ca: &LocalCa, identity: &str, expected: &str) -> Arc<rustls::ClientConfig> {
    let svid = ca
        .issue(&id(identity))
        .unwrap_or_else(|e| panic!("issuing a certificate for {identity}: {e}"));
    let config = tls::client_config(&svid.svid, &svid.bundles, vec![id(expected)], vec![b"h2".to_vec()])
        .unwrap_or_else(|e| panic!("a client config for {identity}: {e}"));
    Arc::new(config)
}
