//! The protocols a meshwire node proxy speaks with an Istio control plane, as protobuf messages
//! and gRPC stubs.
//!
//! What is here now: meshwire's own `.proto` files (in `proto/` of this crate) with the packages,
//! message names, field numbers and enum values of Istio's and Envoy's public APIs, and the Rust
//! generated from them at build time (prost messages, tonic clients and servers), in [`proto`]:
//!
//! - delta xDS: [`proto::envoy::service::discovery::v3`] (the `AggregatedDiscoveryService` with its
//!   `DeltaAggregatedResources` stream and its messages), [`proto::envoy::config::core::v3::Node`]
//!   and [`proto::google::rpc::Status`];
//! - the resources istiod sends over it: [`proto::istio::workload`] (`Address`: workloads and
//!   services) and [`proto::istio::security`] (`Authorization`: L4 policies);
//! - the Istio CA: [`proto::istio::v1::auth`] (`IstioCertificateService.CreateCertificate`);
//! - the in-pod protocol with istio-cni: [`proto::istio::workload::zds`].
//!
//! The generated code is generic over the transport: the clients take any
//! `tonic::client::GrpcService`, the servers are `tower` services; no `connect` helpers, so no tonic
//! transport (and no second TLS stack) comes with it. The tests in `tests/wire.rs` decode bytes
//! built by hand from the field numbers of the control-plane contract, so a wrong number in a proto
//! fails there.
//!
//! Built on them, the clients of istiod:
//! - [`channel`]: the gRPC channel (HTTP/2 over TLS 1.3 on rustls/ring, bearer token, `clusterid`
//!   and extra headers on every request);
//! - [`node`]: the envoy `Node` istiod expects of a ztunnel, from environment variables;
//! - [`ads`]: the delta xDS client (wildcard subscriptions, ACK and partial NACK, reconnects with
//!   `initial_resource_versions`, jittered backoff, readiness and termination counters);
//! - [`ca`]: the Istio CA client (`CreateCertificate`).
//!
//! And the client of istio-cni:
//! - [`zds`]: the in-pod protocol (ZDS) over istio-cni's Unix `SOCK_SEQPACKET` socket: hello,
//!   datagrams with the pods' network namespaces (`SCM_RIGHTS`) checked by a pure parser, one Ack per
//!   message from the caller's handler, the snapshot's named pods, reconnects with jittered backoff.
//!
//! ```
//! use meshwire_control::proto::istio::workload::zds::{Ack, WorkloadResponse, workload_response::Payload};
//! use prost::Message;
//!
//! // The ZDS acknowledgement: an Ack with an empty error.
//! let ack = WorkloadResponse { payload: Some(Payload::Ack(Ack { error: String::new() })) };
//! assert_eq!(ack.encode_to_vec(), [0x0a, 0x00]);
//! ```

pub mod ads;
pub mod ca;
pub mod channel;
pub mod node;
pub mod zds;

/// The generated messages and gRPC stubs, one module per protobuf package.
pub mod proto {
    /// Envoy's APIs.
    pub mod envoy {
        /// Envoy's services.
        pub mod service {
            /// Envoy's discovery service.
            pub mod discovery {
                /// Package `envoy.service.discovery.v3`: the aggregated discovery service
                /// (delta xDS) with `DeltaDiscoveryRequest`, `DeltaDiscoveryResponse` and `Resource`;
                /// `aggregated_discovery_service_client` and `aggregated_discovery_service_server`.
                #[allow(missing_docs, unreachable_pub, clippy::all, clippy::unwrap_used)]
                pub mod v3 {
                    include!(concat!(env!("OUT_DIR"), "/envoy.service.discovery.v3.rs"));
                }
            }
        }

        /// Envoy's configuration types.
        pub mod config {
            /// Envoy's core configuration types.
            pub mod core {
                /// Package `envoy.config.core.v3`: the `Node` that identifies the proxy to istiod.
                #[allow(missing_docs, unreachable_pub, clippy::all, clippy::unwrap_used)]
                pub mod v3 {
                    include!(concat!(env!("OUT_DIR"), "/envoy.config.core.v3.rs"));
                }
            }
        }
    }

    /// Google's APIs.
    pub mod google {
        /// Package `google.rpc`: `Status`, the error detail of an xDS NACK.
        #[allow(missing_docs, unreachable_pub, clippy::all, clippy::unwrap_used)]
        pub mod rpc {
            include!(concat!(env!("OUT_DIR"), "/google.rpc.rs"));
        }
    }

    /// Istio's APIs.
    pub mod istio {
        /// Package `istio.workload`: `Address` (a `Workload` or a `Service`), the resources of type
        /// `type.googleapis.com/istio.workload.Address`.
        #[allow(missing_docs, unreachable_pub, clippy::all, clippy::unwrap_used)]
        pub mod workload {
            include!(concat!(env!("OUT_DIR"), "/istio.workload.rs"));

            /// Package `istio.workload.zds`: the in-pod protocol between istio-cni and the node
            /// proxy (`ZdsHello`, `WorkloadRequest`, `WorkloadResponse`).
            #[allow(missing_docs, unreachable_pub, clippy::all, clippy::unwrap_used)]
            pub mod zds {
                include!(concat!(env!("OUT_DIR"), "/istio.workload.zds.rs"));
            }
        }

        /// Package `istio.security`: `Authorization`, the L4 policies of type
        /// `type.googleapis.com/istio.security.Authorization`.
        #[allow(missing_docs, unreachable_pub, clippy::all, clippy::unwrap_used)]
        pub mod security {
            include!(concat!(env!("OUT_DIR"), "/istio.security.rs"));
        }

        /// Istio's v1 APIs.
        pub mod v1 {
            /// Package `istio.v1.auth`: the certificate service of Istio's CA
            /// (`istio_certificate_service_client` and `istio_certificate_service_server`).
            #[allow(missing_docs, unreachable_pub, clippy::all, clippy::unwrap_used)]
            pub mod auth {
                include!(concat!(env!("OUT_DIR"), "/istio.v1.auth.rs"));
            }
        }
    }
}
