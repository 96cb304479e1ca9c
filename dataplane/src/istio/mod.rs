//! Configuration from istiod: the delta xDS resources `istio.workload.Address` (workloads and
//! services) and `istio.security.Authorization` (policies), turned into the same [`LocalConfig`]
//! the local configuration file gives, so that everything downstream ([`State`], [`PolicySet`],
//! `/config_dump`) is one code path for both sources.
//!
//! - [`convert`]: pure functions from one proto resource to one model value
//!   ([`xds::Workload`](crate::xds::Workload), [`xds::Service`](crate::xds::Service),
//!   [`rbac::Authorization`](crate::rbac::Authorization)), with errors naming the resource and the
//!   field.
//! - [`store`]: [`XdsConfig`], the resources held by name, pushes applied with partial NACKs,
//!   fail-closed placeholders for rejected policies, shared addresses resolved as ztunnel does, and
//!   [`XdsConfig::to_local_config`].
//!
//! [`LocalConfig`]: crate::xds::LocalConfig
//! [`State`]: crate::state::State
//! [`PolicySet`]: crate::rbac::PolicySet

pub mod convert;
pub mod store;

pub use convert::{ConvertError, ResourceKind};
pub use store::{ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL, Rejected, XdsConfig, nack_message};
