//! SPIFFE workload identities for a service-mesh data plane.
//!
//! `meshwire-identity` holds everything a proxy needs to speak mutual TLS with SPIFFE identities:
//!
//! - [`id`]: SPIFFE IDs and trust domains (from the `spiffe` crate) and the Istio form
//!   `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`;
//! - [`svid`]: X.509-SVIDs parsed from PEM or DER and validated per the SPIFFE X.509-SVID specification;
//! - [`bundle`]: trust bundles per trust domain and bundle sets for federation;
//! - [`crypto`]: the crypto provider (ring, TLS 1.3 only) of every TLS config and certificate check;
//! - [`tls`]: rustls server and client configurations that verify SPIFFE peers;
//! - [`source`]: certificate sources behind one small trait: a built-in local CA, files on disk and
//!   the Istio CA (behind a transport trait, so no gRPC dependency here);
//! - `csr` (feature `istio-ca`): certificate signing requests for a SPIFFE ID;
//! - [`manager`]: a certificate manager for many identities at once, with de-duplicated fetches,
//!   priorities, a fetch budget, refresh at half-life and exponential back-off;
//! - [`time`]: the timer seam through which the manager sees time, so rotation runs in virtual time in tests.
//!
//! The crate never spawns a task, never reads the environment and depends on no async runtime: the
//! manager's driver is a future the caller runs on the executor of its choice.
//!
//! ```
//! use meshwire_identity::id::{IstioIdentity, TrustDomain};
//! use meshwire_identity::source::local_ca::LocalCa;
//!
//! let ca = LocalCa::ephemeral(TrustDomain::new("cluster.local")?)?;
//! let id = IstioIdentity::new(ca.trust_domain().clone(), "default", "client")?.to_spiffe_id();
//! let creds = ca.issue(&id)?;
//! creds.svid.verify(&creds.bundles, std::time::SystemTime::now())?;
//! assert_eq!(creds.svid.spiffe_id(), &id);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

pub mod bundle;
pub mod crypto;
#[cfg(feature = "istio-ca")]
pub mod csr;
pub mod id;
pub mod manager;
pub mod source;
pub mod svid;
pub mod time;
pub mod tls;

mod slot;
mod sync;
mod x509;
