//! The crypto provider of every meshwire TLS config and certificate check: rustls on ring, TLS 1.3
//! only.
//!
//! ```
//! let provider = meshwire_identity::crypto::provider();
//! assert_eq!(provider.cipher_suites.len(), 2);
//! assert!(provider.cipher_suites.iter().all(|suite| suite.version().version == rustls::ProtocolVersion::TLSv1_3));
//! ```

use std::sync::{Arc, OnceLock};

use rustls::crypto::CryptoProvider;

/// The crypto provider of every meshwire TLS config: ring, with TLS 1.3 AES-256-GCM and AES-128-GCM.
pub fn provider() -> Arc<CryptoProvider> {
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    PROVIDER
        .get_or_init(|| {
            use rustls::crypto::ring::{self, cipher_suite};
            Arc::new(CryptoProvider {
                cipher_suites: vec![
                    cipher_suite::TLS13_AES_256_GCM_SHA384,
                    cipher_suite::TLS13_AES_128_GCM_SHA256,
                ],
                ..ring::default_provider()
            })
        })
        .clone()
}
