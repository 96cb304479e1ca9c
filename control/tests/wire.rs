//! The generated messages against the wire contract (`shared/CONTROL-PLANE.md`): every message is
//! built here byte by byte from the field numbers of that note, with a tiny encoder that knows
//! nothing of the protos, then decoded with the generated types and compared field by field. Each
//! field gets a value that names it, so two swapped numbers fail. The expected values are written
//! as complete struct literals (no `..Default::default()`): a field added to a proto without a test
//! does not compile. A few messages go the other way: encoded by prost, compared with the bytes the
//! note prescribes (the ZDS acknowledgement is the two bytes `0a 00`). The generated clients are
//! checked for the gRPC paths of the note, the servers for their service names.
//!
//! One place where the note and Istio's API differ: the note gives `Clause.matches` the number 1,
//! Istio's `authorization.proto` (ztunnel and istiod alike) has 2 (1 was never used). The protos
//! follow Istio, since that is what istiod sends; `clause_matches_is_field_2` pins it.

#![allow(clippy::unwrap_used)]

use std::collections::HashMap;

use meshwire_control::proto::envoy::config::core::v3::Node;
use meshwire_control::proto::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, Resource, resource::CacheControl,
};
use meshwire_control::proto::google::rpc::Status;
use meshwire_control::proto::istio::security::{
    self, Action, Authorization, Clause, Match, Rule, Scope, ServiceAccountMatch, StringMatch, string_match::MatchType,
};
use meshwire_control::proto::istio::v1::auth::{IstioCertificateRequest, IstioCertificateResponse};
use meshwire_control::proto::istio::workload::zds::{
    Ack, AddWorkload, DelWorkload, KeepWorkload, SnapshotSent, Version, WorkloadInfo, WorkloadRequest,
    WorkloadResponse, ZdsHello, workload_request, workload_response,
};
use meshwire_control::proto::istio::workload::{
    self as wl, AppProtocol, ApplicationTunnel, Extension, GatewayAddress, IpFamilies, LoadBalancing, Locality,
    NamespacedHostname, NetworkAddress, NetworkMode, Port, PortList, Service, TunnelProtocol, Workload, WorkloadStatus,
    WorkloadType, address, application_tunnel, gateway_address, load_balancing,
};
use prost::Message;
use prost_types::{Any, Duration, Struct, Value, value::Kind};
use tonic::codegen::{Context, Poll, Service as TowerService, StdError, http, tokio_stream};

// ---- a protobuf encoder that knows only tags, varints and lengths ------------------------------

/// Wire type 0: varint (int32, int64, uint32, bool, enum).
const VARINT: u32 = 0;
/// Wire type 2: length-delimited (string, bytes, message, packed repeated, map entry).
const LEN: u32 = 2;

/// A message written field by field: `tag = (field << 3) | wire type`, then the value.
#[derive(Clone, Default)]
struct Wire(Vec<u8>);

fn put_varint(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push((value as u8 & 0x7f) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

impl Wire {
    fn new() -> Self {
        Self::default()
    }

    fn tag(&mut self, field: u32, wire_type: u32) {
        put_varint(&mut self.0, u64::from((field << 3) | wire_type));
    }

    /// A varint field.
    fn varint(mut self, field: u32, value: u64) -> Self {
        self.tag(field, VARINT);
        put_varint(&mut self.0, value);
        self
    }

    /// A length-delimited field.
    fn bytes(mut self, field: u32, value: &[u8]) -> Self {
        self.tag(field, LEN);
        put_varint(&mut self.0, value.len() as u64);
        self.0.extend_from_slice(value);
        self
    }

    fn string(self, field: u32, value: &str) -> Self {
        self.bytes(field, value.as_bytes())
    }

    /// An embedded message.
    fn message(self, field: u32, value: Wire) -> Self {
        self.bytes(field, &value.0)
    }

    /// A packed repeated varint field (what proto3 writes for repeated scalars and enums).
    fn packed(self, field: u32, values: &[u64]) -> Self {
        let mut body = Vec::new();
        for value in values {
            put_varint(&mut body, *value);
        }
        self.bytes(field, &body)
    }

    /// One entry of a `map<string, string>`: key = 1, value = 2.
    fn map_entry(self, field: u32, key: &str, value: &str) -> Self {
        self.message(field, Wire::new().string(1, key).string(2, value))
    }

    fn decode<M: Message + Default>(&self) -> M {
        M::decode(self.0.as_slice()).unwrap()
    }
}

/// `google.protobuf.Struct { map<string, Value> fields = 1 }` with string values
/// (`Value.string_value = 3`).
fn wire_struct(entries: &[(&str, &str)]) -> Wire {
    entries.iter().fold(Wire::new(), |w, (key, value)| {
        w.message(1, Wire::new().string(1, key).message(2, Wire::new().string(3, value)))
    })
}

fn prost_struct(entries: &[(&str, &str)]) -> Struct {
    Struct {
        fields: entries
            .iter()
            .map(|(k, v)| {
                (
                    k.to_string(),
                    Value {
                        kind: Some(Kind::StringValue(v.to_string())),
                    },
                )
            })
            .collect(),
    }
}

/// `google.protobuf.Any { type_url = 1, value = 2 }`.
fn wire_any(type_url: &str, value: &Wire) -> Wire {
    Wire::new().string(1, type_url).bytes(2, &value.0)
}

fn s(value: &str) -> String {
    value.to_string()
}

#[test]
fn the_encoder_writes_protobufs_examples() {
    // The examples of the protobuf encoding guide: field 1 = 150, field 2 = "testing".
    assert_eq!(Wire::new().varint(1, 150).0, [0x08, 0x96, 0x01]);
    assert_eq!(Wire::new().string(2, "testing").0, b"\x12\x07testing");
    // Field numbers from 16 take a two-byte tag: uid = 20 of Workload.
    assert_eq!(Wire::new().string(20, "").0, [0xa2, 0x01, 0x00]);
}

// ---- delta xDS ------------------------------------------------------------------------------------

fn wire_node() -> Wire {
    Wire::new()
        .string(
            1,
            "ztunnel~10.0.0.5~ztunnel-abcde.istio-system~istio-system.svc.cluster.local",
        )
        .string(2, "Kubernetes")
        .message(3, wire_struct(&[("NAMESPACE", "istio-system")]))
        .string(5, "meshwire-0.1.0")
}

fn expected_node() -> Node {
    Node {
        id: s("ztunnel~10.0.0.5~ztunnel-abcde.istio-system~istio-system.svc.cluster.local"),
        cluster: s("Kubernetes"),
        metadata: Some(prost_struct(&[("NAMESPACE", "istio-system")])),
        build_version: s("meshwire-0.1.0"),
    }
}

#[test]
fn node_fields() {
    assert_eq!(wire_node().decode::<Node>(), expected_node());
}

#[test]
fn delta_discovery_request_fields() {
    let any_detail = Wire::new()
        .string(1, "type.googleapis.com/example.Detail")
        .bytes(2, b"\x01");
    let bytes = Wire::new()
        .message(1, wire_node())
        .string(2, "type.googleapis.com/istio.workload.Address")
        .string(3, "subscribed-1")
        .string(3, "subscribed-2")
        .string(4, "unsubscribed")
        .map_entry(5, "Kubernetes//Pod/default/a", "v1")
        .map_entry(5, "default/svc.default.svc.cluster.local", "v2")
        .string(6, "nonce-7")
        .message(
            7,
            Wire::new()
                .varint(1, 3)
                .string(2, "a: bad address")
                .message(3, any_detail),
        );
    assert_eq!(
        bytes.decode::<DeltaDiscoveryRequest>(),
        DeltaDiscoveryRequest {
            node: Some(expected_node()),
            type_url: s("type.googleapis.com/istio.workload.Address"),
            resource_names_subscribe: vec![s("subscribed-1"), s("subscribed-2")],
            resource_names_unsubscribe: vec![s("unsubscribed")],
            initial_resource_versions: HashMap::from([
                (s("Kubernetes//Pod/default/a"), s("v1")),
                (s("default/svc.default.svc.cluster.local"), s("v2")),
            ]),
            response_nonce: s("nonce-7"),
            error_detail: Some(Status {
                code: 3,
                message: s("a: bad address"),
                details: vec![Any {
                    type_url: s("type.googleapis.com/example.Detail"),
                    value: vec![1]
                }],
            }),
        }
    );
}

#[test]
fn delta_discovery_response_and_resource_fields() {
    let workload = Wire::new().message(1, Wire::new().string(20, "Kubernetes//Pod/default/a"));
    let resource = Wire::new()
        .string(1, "version-1")
        .message(2, wire_any("type.googleapis.com/istio.workload.Address", &workload))
        .string(3, "Kubernetes//Pod/default/a")
        .string(4, "network-1/10.0.0.7")
        .string(4, "network-1/fd00::7")
        .message(6, Wire::new().varint(1, 30).varint(2, 500))
        .message(7, Wire::new().varint(1, 1));
    let bytes = Wire::new()
        .string(1, "system-version")
        .message(2, resource)
        .string(4, "type.googleapis.com/istio.workload.Address")
        .string(5, "nonce-8")
        .string(6, "default/removed.default.svc.cluster.local");
    let response: DeltaDiscoveryResponse = bytes.decode();
    assert_eq!(
        response,
        DeltaDiscoveryResponse {
            system_version_info: s("system-version"),
            resources: vec![Resource {
                version: s("version-1"),
                resource: Some(Any {
                    type_url: s("type.googleapis.com/istio.workload.Address"),
                    value: workload.0
                }),
                name: s("Kubernetes//Pod/default/a"),
                aliases: vec![s("network-1/10.0.0.7"), s("network-1/fd00::7")],
                ttl: Some(Duration {
                    seconds: 30,
                    nanos: 500
                }),
                cache_control: Some(CacheControl { do_not_cache: true }),
            }],
            type_url: s("type.googleapis.com/istio.workload.Address"),
            nonce: s("nonce-8"),
            removed_resources: vec![s("default/removed.default.svc.cluster.local")],
        }
    );
    // The Any holds an Address whose workload has the resource's name as uid.
    let any = response.resources[0].resource.as_ref().unwrap();
    let address = wl::Address::decode(any.value.as_slice()).unwrap();
    let Some(address::Type::Workload(w)) = address.r#type else {
        panic!("not a workload: {address:?}")
    };
    assert_eq!(w.uid, "Kubernetes//Pod/default/a");
}

#[test]
fn delta_ack_and_nack_encode_to_the_contract() {
    // ACK: {type_url, response_nonce}.
    let ack = DeltaDiscoveryRequest {
        type_url: s("type.googleapis.com/istio.security.Authorization"),
        response_nonce: s("n1"),
        ..Default::default()
    };
    let expected = Wire::new()
        .string(2, "type.googleapis.com/istio.security.Authorization")
        .string(6, "n1");
    assert_eq!(ack.encode_to_vec(), expected.0);
    // NACK: the same plus error_detail { message }.
    let nack = DeltaDiscoveryRequest {
        error_detail: Some(Status {
            message: s("ns/p: bad rule"),
            ..Default::default()
        }),
        ..ack
    };
    let expected = expected.message(7, Wire::new().string(2, "ns/p: bad rule"));
    assert_eq!(nack.encode_to_vec(), expected.0);
}

#[test]
fn delta_initial_request_encodes_to_the_contract() {
    // The first request of a type: the node, the type URL, an empty subscription (wildcard) and the
    // versions held.
    let request = DeltaDiscoveryRequest {
        node: Some(expected_node()),
        type_url: s("type.googleapis.com/istio.workload.Address"),
        initial_resource_versions: HashMap::from([(s("default/svc.default.svc.cluster.local"), s("v9"))]),
        ..Default::default()
    };
    let expected = Wire::new()
        .message(1, wire_node())
        .string(2, "type.googleapis.com/istio.workload.Address")
        .map_entry(5, "default/svc.default.svc.cluster.local", "v9");
    assert_eq!(request.encode_to_vec(), expected.0);
}

// ---- istio.workload -------------------------------------------------------------------------------

fn wire_network_address(network: &str, ip: &[u8], length: Option<u64>) -> Wire {
    let w = Wire::new().string(1, network).bytes(2, ip);
    match length {
        Some(length) => w.varint(3, length),
        None => w,
    }
}

#[test]
fn workload_fields() {
    let waypoint = Wire::new()
        .message(
            1,
            Wire::new()
                .string(1, "waypoint-ns")
                .string(2, "waypoint.waypoint-ns.svc.cluster.local"),
        )
        .varint(3, 15008);
    let east_west = Wire::new()
        .message(2, wire_network_address("network-2", &[192, 0, 2, 1], None))
        .varint(3, 15009);
    let ports = Wire::new()
        .message(1, Wire::new().varint(1, 80).varint(2, 8080).varint(3, 1))
        .message(1, Wire::new().varint(1, 443).varint(2, 8443));
    let workload = Wire::new()
        .string(20, "Kubernetes//Pod/default/a")
        .string(1, "a")
        .string(2, "default")
        .bytes(3, &[10, 0, 0, 7])
        .bytes(3, &[0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 7])
        .string(21, "a.example.com")
        .string(4, "network-1")
        .varint(5, 2) // LEGACY_ISTIO_MTLS
        .string(6, "example.org")
        .string(7, "sa-a")
        .message(8, waypoint)
        .message(19, east_west)
        .string(9, "node-1")
        .string(10, "canonical-a")
        .string(11, "v7")
        .varint(12, 2) // POD
        .string(13, "workload-a")
        .varint(14, 1)
        .message(23, Wire::new().varint(1, 1).varint(2, 15088))
        .message(
            22,
            Wire::new()
                .string(1, "default/svc.default.svc.cluster.local")
                .message(2, ports),
        )
        .string(16, "default/policy-1")
        .string(16, "default/policy-2")
        .varint(17, 1) // UNHEALTHY
        .string(18, "cluster-1")
        .message(
            24,
            Wire::new()
                .string(1, "region-1")
                .string(2, "zone-1")
                .string(3, "subzone-1"),
        )
        .varint(25, 1) // HOST_NETWORK
        .message(
            26,
            Wire::new()
                .string(1, "extension-w")
                .message(2, wire_any("type.example/W", &Wire::new())),
        )
        .message(27, Wire::new().varint(1, 3));
    let decoded: wl::Address = Wire::new().message(1, workload).decode();
    let expected = Workload {
        uid: s("Kubernetes//Pod/default/a"),
        name: s("a"),
        namespace: s("default"),
        addresses: vec![
            vec![10, 0, 0, 7],
            vec![0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 7],
        ],
        hostname: s("a.example.com"),
        network: s("network-1"),
        tunnel_protocol: TunnelProtocol::LegacyIstioMtls as i32,
        trust_domain: s("example.org"),
        service_account: s("sa-a"),
        waypoint: Some(GatewayAddress {
            hbone_mtls_port: 15008,
            destination: Some(gateway_address::Destination::Hostname(NamespacedHostname {
                namespace: s("waypoint-ns"),
                hostname: s("waypoint.waypoint-ns.svc.cluster.local"),
            })),
        }),
        network_gateway: Some(GatewayAddress {
            hbone_mtls_port: 15009,
            destination: Some(gateway_address::Destination::Address(NetworkAddress {
                network: s("network-2"),
                address: vec![192, 0, 2, 1],
                length: None,
            })),
        }),
        node: s("node-1"),
        canonical_name: s("canonical-a"),
        canonical_revision: s("v7"),
        workload_type: WorkloadType::Pod as i32,
        workload_name: s("workload-a"),
        native_tunnel: true,
        application_tunnel: Some(ApplicationTunnel {
            protocol: application_tunnel::Protocol::Proxy as i32,
            port: 15088,
        }),
        services: HashMap::from([(
            s("default/svc.default.svc.cluster.local"),
            PortList {
                ports: vec![
                    Port {
                        service_port: 80,
                        target_port: 8080,
                        app_protocol: AppProtocol::Http11 as i32,
                    },
                    Port {
                        service_port: 443,
                        target_port: 8443,
                        app_protocol: AppProtocol::Unknown as i32,
                    },
                ],
            },
        )]),
        authorization_policies: vec![s("default/policy-1"), s("default/policy-2")],
        status: WorkloadStatus::Unhealthy as i32,
        cluster_id: s("cluster-1"),
        locality: Some(Locality {
            region: s("region-1"),
            zone: s("zone-1"),
            subzone: s("subzone-1"),
        }),
        network_mode: NetworkMode::HostNetwork as i32,
        extensions: vec![Extension {
            name: s("extension-w"),
            config: Some(Any {
                type_url: s("type.example/W"),
                value: vec![],
            }),
        }],
        capacity: Some(3),
    };
    assert_eq!(
        decoded,
        wl::Address {
            r#type: Some(address::Type::Workload(expected))
        }
    );
}

#[test]
fn service_fields() {
    let service = Wire::new()
        .string(1, "svc")
        .string(2, "default")
        .string(3, "svc.default.svc.cluster.local")
        .message(4, wire_network_address("network-1", &[10, 96, 0, 1], None))
        .message(4, wire_network_address("", &[10, 96, 0, 0], Some(16)))
        .message(5, Wire::new().varint(1, 80).varint(2, 8080).varint(3, 3))
        .string(6, "spiffe://example.org/ns/default/sa/svc")
        .message(
            7,
            Wire::new()
                .message(2, wire_network_address("network-1", &[10, 0, 0, 9], None))
                .varint(3, 15008),
        )
        .message(8, Wire::new().packed(1, &[6, 1, 2]).varint(2, 2).varint(3, 1))
        .varint(9, 3) // DUAL
        .message(10, Wire::new().string(1, "extension-s"))
        .varint(11, 1)
        .varint(12, 1);
    let decoded: wl::Address = Wire::new().message(2, service).decode();
    let expected = Service {
        name: s("svc"),
        namespace: s("default"),
        hostname: s("svc.default.svc.cluster.local"),
        addresses: vec![
            NetworkAddress {
                network: s("network-1"),
                address: vec![10, 96, 0, 1],
                length: None,
            },
            NetworkAddress {
                network: s(""),
                address: vec![10, 96, 0, 0],
                length: Some(16),
            },
        ],
        ports: vec![Port {
            service_port: 80,
            target_port: 8080,
            app_protocol: AppProtocol::Grpc as i32,
        }],
        subject_alt_names: vec![s("spiffe://example.org/ns/default/sa/svc")],
        waypoint: Some(GatewayAddress {
            hbone_mtls_port: 15008,
            destination: Some(gateway_address::Destination::Address(NetworkAddress {
                network: s("network-1"),
                address: vec![10, 0, 0, 9],
                length: None,
            })),
        }),
        load_balancing: Some(LoadBalancing {
            routing_preference: vec![
                load_balancing::Scope::Network as i32,
                load_balancing::Scope::Region as i32,
                load_balancing::Scope::Zone as i32,
            ],
            mode: load_balancing::Mode::Failover as i32,
            health_policy: load_balancing::HealthPolicy::AllowAll as i32,
        }),
        ip_families: IpFamilies::Dual as i32,
        extensions: vec![Extension {
            name: s("extension-s"),
            config: None,
        }],
        canonical: true,
        ingress_use_waypoint: true,
    };
    assert_eq!(
        decoded,
        wl::Address {
            r#type: Some(address::Type::Service(expected))
        }
    );
}

#[test]
fn service_fields_13_and_14_are_skipped() {
    // weighted_waypoints (13) and visibility (14) are reserved here: a service carrying them still
    // decodes, with the other fields intact.
    let service = Wire::new()
        .string(1, "svc")
        .message(13, Wire::new().string(1, "x"))
        .varint(14, 1);
    let decoded: Service = service.decode();
    assert_eq!(
        decoded,
        Service {
            name: s("svc"),
            ..Default::default()
        }
    );
}

// ---- istio.security -------------------------------------------------------------------------------

fn wire_string_match(kind: u32, value: &str) -> Wire {
    Wire::new().string(kind, value)
}

#[test]
fn authorization_fields() {
    let full_match = Wire::new()
        .message(1, wire_string_match(1, "ns-exact"))
        .message(2, wire_string_match(2, "ns-prefix-"))
        .message(3, wire_string_match(3, "/sa/suffix"))
        .message(4, Wire::new().message(4, Wire::new())) // presence (Empty)
        .message(5, Wire::new().bytes(1, &[10, 1, 0, 0]).varint(2, 16))
        .message(6, Wire::new().bytes(1, &[10, 2, 0, 0]).varint(2, 24))
        .message(7, Wire::new().bytes(1, &[10, 3, 0, 0]).varint(2, 8))
        .message(8, Wire::new().bytes(1, &[10, 4, 0, 1]).varint(2, 32))
        .packed(9, &[80, 443])
        .packed(10, &[22])
        .message(11, Wire::new().string(1, "sa-ns").string(2, "sa-allowed"))
        .message(12, Wire::new().string(1, "sa-ns").string(2, "sa-denied"))
        .message(13, Wire::new().string(1, "extension-m"));
    let policy = Wire::new()
        .string(1, "policy-1")
        .string(2, "default")
        .varint(3, 2) // WORKLOAD_SELECTOR
        .varint(4, 1) // DENY
        .message(5, Wire::new().message(1, Wire::new().message(2, full_match)))
        .message(5, Wire::new())
        .varint(6, 1)
        .message(7, Wire::new().string(1, "extension-a"));
    let addr = |address: [u8; 4], length| security::Address {
        address: address.to_vec(),
        length,
    };
    let string_match = |kind| StringMatch { match_type: Some(kind) };
    let expected = Authorization {
        name: s("policy-1"),
        namespace: s("default"),
        scope: Scope::WorkloadSelector as i32,
        action: Action::Deny as i32,
        rules: vec![
            Rule {
                clauses: vec![Clause {
                    matches: vec![Match {
                        namespaces: vec![string_match(MatchType::Exact(s("ns-exact")))],
                        not_namespaces: vec![string_match(MatchType::Prefix(s("ns-prefix-")))],
                        principals: vec![string_match(MatchType::Suffix(s("/sa/suffix")))],
                        not_principals: vec![string_match(MatchType::Presence(()))],
                        source_ips: vec![addr([10, 1, 0, 0], 16)],
                        not_source_ips: vec![addr([10, 2, 0, 0], 24)],
                        destination_ips: vec![addr([10, 3, 0, 0], 8)],
                        not_destination_ips: vec![addr([10, 4, 0, 1], 32)],
                        destination_ports: vec![80, 443],
                        not_destination_ports: vec![22],
                        service_accounts: vec![ServiceAccountMatch {
                            namespace: s("sa-ns"),
                            service_account: s("sa-allowed"),
                        }],
                        not_service_accounts: vec![ServiceAccountMatch {
                            namespace: s("sa-ns"),
                            service_account: s("sa-denied"),
                        }],
                        extensions: vec![Extension {
                            name: s("extension-m"),
                            config: None,
                        }],
                    }],
                }],
            },
            Rule { clauses: vec![] },
        ],
        dry_run: true,
        extensions: vec![Extension {
            name: s("extension-a"),
            config: None,
        }],
    };
    assert_eq!(policy.decode::<Authorization>(), expected);
}

#[test]
fn clause_matches_is_field_2() {
    // Istio's number for Clause.matches (the note says 1; istiod sends 2).
    let with_2: Clause = Wire::new().message(2, Wire::new().packed(9, &[8080])).decode();
    assert_eq!(with_2.matches.len(), 1);
    assert_eq!(with_2.matches[0].destination_ports, [8080]);
    // A field 1 is skipped as unknown, not taken as a match.
    let with_1: Clause = Wire::new().message(1, Wire::new().packed(9, &[8080])).decode();
    assert!(with_1.matches.is_empty());
}

#[test]
fn repeated_ports_decode_unpacked_too() {
    // proto3 writers pack repeated scalars, but a decoder must take both forms.
    let unpacked: Match = Wire::new().varint(9, 80).varint(9, 443).varint(10, 22).decode();
    assert_eq!(unpacked.destination_ports, [80, 443]);
    assert_eq!(unpacked.not_destination_ports, [22]);
}

// ---- istio.v1.auth --------------------------------------------------------------------------------

const CSR: &str = "-----BEGIN CERTIFICATE REQUEST-----\nMIIB\n-----END CERTIFICATE REQUEST-----\n";

#[test]
fn certificate_request_fields() {
    let bytes = Wire::new().string(1, CSR).varint(3, 86_400).message(
        4,
        wire_struct(&[("ImpersonatedIdentity", "spiffe://cluster.local/ns/default/sa/a")]),
    );
    let expected = IstioCertificateRequest {
        csr: s(CSR),
        validity_duration: 86_400,
        metadata: Some(prost_struct(&[(
            "ImpersonatedIdentity",
            "spiffe://cluster.local/ns/default/sa/a",
        )])),
    };
    assert_eq!(bytes.decode::<IstioCertificateRequest>(), expected);
    // And the request meshwire sends encodes to exactly those bytes.
    assert_eq!(expected.encode_to_vec(), bytes.0);
}

#[test]
fn certificate_response_fields() {
    let bytes = Wire::new()
        .string(1, "leaf")
        .string(1, "intermediate")
        .string(1, "root-1\nroot-2");
    assert_eq!(
        bytes.decode::<IstioCertificateResponse>(),
        IstioCertificateResponse {
            cert_chain: vec![s("leaf"), s("intermediate"), s("root-1\nroot-2")]
        }
    );
}

// ---- istio.workload.zds ---------------------------------------------------------------------------

#[test]
fn zds_hello() {
    assert_eq!(
        Wire::new().varint(1, 1).decode::<ZdsHello>(),
        ZdsHello {
            version: Version::V1 as i32
        }
    );
    assert_eq!(
        ZdsHello {
            version: Version::V1 as i32
        }
        .encode_to_vec(),
        [0x08, 0x01]
    );
}

#[test]
fn zds_workload_request_payloads() {
    let add = Wire::new().message(
        1,
        Wire::new()
            .string(1, "0ae5c03d-5fb3-4eb9-9de8-2bd4b51606ba")
            .message(2, Wire::new().string(1, "pod-a").string(2, "ns-a").string(3, "sa-a")),
    );
    assert_eq!(
        add.decode::<WorkloadRequest>(),
        WorkloadRequest {
            payload: Some(workload_request::Payload::Add(AddWorkload {
                uid: s("0ae5c03d-5fb3-4eb9-9de8-2bd4b51606ba"),
                workload_info: Some(WorkloadInfo {
                    name: s("pod-a"),
                    namespace: s("ns-a"),
                    service_account: s("sa-a"),
                }),
            })),
        }
    );
    // DelWorkload's uid is field 2, KeepWorkload's is field 1.
    let del = Wire::new().message(2, Wire::new().string(2, "uid-del"));
    assert_eq!(
        del.decode::<WorkloadRequest>(),
        WorkloadRequest {
            payload: Some(workload_request::Payload::Del(DelWorkload { uid: s("uid-del") }))
        }
    );
    let snapshot = Wire::new().message(3, Wire::new());
    assert_eq!(snapshot.0, [0x1a, 0x00]);
    assert_eq!(
        snapshot.decode::<WorkloadRequest>(),
        WorkloadRequest {
            payload: Some(workload_request::Payload::SnapshotSent(SnapshotSent {}))
        }
    );
    let keep = Wire::new().message(5, Wire::new().string(1, "uid-keep"));
    assert_eq!(
        keep.decode::<WorkloadRequest>(),
        WorkloadRequest {
            payload: Some(workload_request::Payload::Keep(KeepWorkload { uid: s("uid-keep") }))
        }
    );
}

#[test]
fn zds_ack_is_0a_00() {
    let ack = WorkloadResponse {
        payload: Some(workload_response::Payload::Ack(Ack { error: String::new() })),
    };
    assert_eq!(ack.encode_to_vec(), [0x0a, 0x00]);
    assert_eq!(Wire::new().message(1, Wire::new()).decode::<WorkloadResponse>(), ack);
    // A NACK carries the error.
    let nack = WorkloadResponse {
        payload: Some(workload_response::Payload::Ack(Ack { error: s("no netns") })),
    };
    assert_eq!(
        nack.encode_to_vec(),
        Wire::new().message(1, Wire::new().string(1, "no netns")).0
    );
}

// ---- enum values ----------------------------------------------------------------------------------

/// Each enum value against the note: its name in the proto and its number.
macro_rules! assert_enum {
    ($ty:ty { $($variant:ident = $name:literal => $number:literal),+ $(,)? }) => {
        $(
            assert_eq!(<$ty>::$variant as i32, $number, "{}", $name);
            assert_eq!(<$ty>::from_str_name($name), Some(<$ty>::$variant));
            assert_eq!(<$ty>::try_from($number).ok(), Some(<$ty>::$variant));
        )+
    };
}

#[test]
fn enum_values() {
    assert_enum!(TunnelProtocol {
        None = "NONE" => 0,
        Hbone = "HBONE" => 1,
        LegacyIstioMtls = "LEGACY_ISTIO_MTLS" => 2,
    });
    assert_enum!(WorkloadType {
        Deployment = "DEPLOYMENT" => 0,
        Cronjob = "CRONJOB" => 1,
        Pod = "POD" => 2,
        Job = "JOB" => 3,
    });
    assert_enum!(WorkloadStatus { Healthy = "HEALTHY" => 0, Unhealthy = "UNHEALTHY" => 1 });
    assert_enum!(NetworkMode { Standard = "STANDARD" => 0, HostNetwork = "HOST_NETWORK" => 1 });
    assert_enum!(Scope {
        Global = "GLOBAL" => 0,
        Namespace = "NAMESPACE" => 1,
        WorkloadSelector = "WORKLOAD_SELECTOR" => 2,
    });
    assert_enum!(Action { Allow = "ALLOW" => 0, Deny = "DENY" => 1 });
    assert_enum!(Version { NotUsed = "NOT_USED" => 0, V1 = "V1" => 1 });
    // Values past the last one known stay readable as numbers (proto3 enums are open).
    let workload: Workload = Wire::new().varint(5, 9).decode();
    assert_eq!(workload.tunnel_protocol, 9);
    assert_eq!(workload.tunnel_protocol(), TunnelProtocol::None);
}

// ---- gRPC method paths ----------------------------------------------------------------------------

/// A gRPC transport that records the path of each call and fails it.
#[derive(Clone, Default)]
struct PathRecorder(std::sync::Arc<std::sync::Mutex<Vec<String>>>);

impl TowerService<http::Request<tonic::body::Body>> for PathRecorder {
    type Response = http::Response<tonic::body::Body>;
    type Error = StdError;
    type Future = std::future::Ready<Result<Self::Response, StdError>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), StdError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<tonic::body::Body>) -> Self::Future {
        self.0.lock().unwrap().push(request.uri().path().to_string());
        std::future::ready(Err("recorded".into()))
    }
}

/// Runs a future whose every step is ready (the recorder never waits).
fn run_ready<F: std::future::Future>(future: F) -> F::Output {
    let mut future = std::pin::pin!(future);
    let mut cx = Context::from_waker(std::task::Waker::noop());
    match future.as_mut().poll(&mut cx) {
        Poll::Ready(output) => output,
        Poll::Pending => panic!("the call waited on a transport that never waits"),
    }
}

#[test]
fn grpc_method_paths() {
    use meshwire_control::proto::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
    use meshwire_control::proto::istio::v1::auth::istio_certificate_service_client::IstioCertificateServiceClient;

    let recorder = PathRecorder::default();
    let mut ads = AggregatedDiscoveryServiceClient::new(recorder.clone());
    let requests = tokio_stream::iter(Vec::<DeltaDiscoveryRequest>::new());
    assert!(run_ready(ads.delta_aggregated_resources(requests)).is_err());
    let mut ca = IstioCertificateServiceClient::new(recorder.clone());
    assert!(run_ready(ca.create_certificate(IstioCertificateRequest::default())).is_err());
    assert_eq!(
        *recorder.0.lock().unwrap(),
        [
            "/envoy.service.discovery.v3.AggregatedDiscoveryService/DeltaAggregatedResources",
            "/istio.v1.auth.IstioCertificateService/CreateCertificate",
        ]
    );
    // The servers (for a fake istiod) answer under the same names.
    use meshwire_control::proto::envoy::service::discovery::v3::aggregated_discovery_service_server;
    use meshwire_control::proto::istio::v1::auth::istio_certificate_service_server;
    assert_eq!(
        aggregated_discovery_service_server::SERVICE_NAME,
        "envoy.service.discovery.v3.AggregatedDiscoveryService"
    );
    assert_eq!(
        istio_certificate_service_server::SERVICE_NAME,
        "istio.v1.auth.IstioCertificateService"
    );
}
