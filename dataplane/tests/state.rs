//! The state snapshot: lookups and every branch of the outbound routing decision.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use meshwire_dataplane::state::{LocalProxy, OutboundRoute, Refusal, State};
use meshwire_dataplane::xds::{LocalConfig, NamespacedHostname, Workload};
use meshwire_tests::fixtures;
use proptest::prelude::*;

/// The state of the shared routing mesh.
fn state() -> State {
    fixtures::mesh_state()
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn key(s: &str) -> NamespacedHostname {
    s.parse().unwrap()
}

fn workload<'a>(state: &'a State, name: &str) -> &'a Workload {
    state.workloads().find(|w| w.name == name).expect(name)
}

fn spiffe(sa: &str) -> String {
    format!("spiffe://cluster.local/ns/default/sa/{sa}")
}

fn ids(route: &OutboundRoute) -> Vec<String> {
    match route {
        OutboundRoute::Hbone {
            expected_identities, ..
        }
        | OutboundRoute::Waypoint {
            expected_identities, ..
        } => expected_identities.iter().map(ToString::to_string).collect(),
        other => panic!("no identities in {other:?}"),
    }
}

#[test]
fn state_is_a_shareable_snapshot() {
    fn shareable<T: Send + Sync + 'static>(_: &T) {}
    let state = Arc::new(state());
    shareable(&state);
    assert_eq!(state.workloads().len(), 14);
    assert_eq!(state.services().len(), 7);
    assert_eq!(state.policies().len(), 1);
}

#[test]
fn lookups() {
    let state = state();
    assert_eq!(state.workload_by_ip("", ip("10.0.1.1")).unwrap().name, "server-a");
    assert_eq!(state.workload_by_ip("far", ip("10.0.1.4")).unwrap().name, "server-far");
    assert!(state.workload_by_ip("", ip("10.0.1.4")).is_none(), "other network");
    assert!(state.workload_by_ip("nowhere", ip("10.0.1.1")).is_none());
    // Host-networked workloads share the node's IP and are not found by it.
    assert_eq!(state.workload_by_ip("", ip("10.0.0.1")).unwrap().name, "client");
    assert_eq!(
        state.workload_by_uid("Kubernetes//v1/Pod/default/legacy").unwrap().name,
        "legacy"
    );

    let server = state.service_by_vip("", ip("10.0.10.1")).unwrap();
    assert_eq!(server.key(), key("default/server.example"));
    assert_eq!(
        state.service_by_vip("far", ip("10.0.10.1")).unwrap().hostname,
        "server.example"
    );
    assert!(state.service_by_vip("", ip("10.0.1.1")).is_none());
    assert_eq!(
        state
            .service_by_hostname(&key("default/legacy.example"))
            .unwrap()
            .vips
            .len(),
        1
    );
    assert!(state.service_by_hostname(&key("other/legacy.example")).is_none());

    let members: Vec<_> = state
        .workloads_of_service(&key("default/server.example"))
        .map(|w| w.name.as_str())
        .collect();
    assert_eq!(
        members,
        ["server-a", "server-b", "server-far", "server-sick"],
        "ordered by uid"
    );
    assert_eq!(state.workloads_of_service(&key("default/empty.example")).count(), 0);
    let services: Vec<_> = state
        .services_of_workload(workload(&state, "server-a"))
        .map(|s| s.hostname.as_str())
        .collect();
    assert_eq!(services, ["server.example"]);
}

#[test]
fn identities_are_spiffe_ids_of_the_workloads() {
    let state = state();
    let server = workload(&state, "server-a");
    assert_eq!(server.spiffe_id().to_string(), spiffe("server"));
    assert_eq!(server.identity().service_account(), "server");
    let node2: Vec<_> = state
        .local_identities(&LocalProxy::new().with_node("node2"))
        .iter()
        .map(ToString::to_string)
        .collect();
    assert_eq!(
        node2,
        [spiffe("server")],
        "one per identity, HBONE workloads of the node only"
    );
    assert!(state.local_identities(&LocalProxy::new()).len() > 3);
}

#[test]
fn inbound_workload_is_found_in_the_proxys_network_and_node() {
    let state = state();
    let node2 = LocalProxy::new().with_node("node2");
    assert_eq!(state.inbound_workload(&node2, ip("10.0.1.1")).unwrap().name, "server-a");
    assert!(
        state.inbound_workload(&node2, ip("10.0.0.1")).is_none(),
        "client is on node1"
    );
    assert_eq!(
        state.inbound_workload(&LocalProxy::new(), ip("10.0.0.1")).unwrap().name,
        "client"
    );
    assert!(
        state.inbound_workload(&LocalProxy::new(), ip("10.0.1.4")).is_none(),
        "other network"
    );
    assert_eq!(
        state
            .inbound_workload(&LocalProxy::new().with_network("far"), ip("10.0.1.4"))
            .unwrap()
            .name,
        "server-far"
    );
    assert!(state.inbound_workload(&LocalProxy::new(), ip("192.0.2.1")).is_none());
}

#[test]
fn hbone_workload_is_tunnelled_to_its_hbone_port() {
    let state = state();
    let client = workload(&state, "client");
    let route = state.route_outbound(&LocalProxy::new(), client, addr("10.0.1.1:7777"), 0);
    assert_eq!(
        route,
        OutboundRoute::Hbone {
            endpoint: addr("10.0.1.1:15008"),
            authority: addr("10.0.1.1:7777"),
            expected_identities: vec![workload(&state, "server-a").spiffe_id().clone()],
            service: None,
            workload: "Kubernetes//v1/Pod/default/server-a".into(),
        }
    );
    assert_eq!(ids(&route), [spiffe("server")]);
    assert_eq!(route.to_string(), "HBONE to 10.0.1.1:15008 for 10.0.1.1:7777");

    // The HBONE port is the caller's.
    let proxy = LocalProxy::new().with_hbone_port(25008);
    let OutboundRoute::Hbone { endpoint, .. } = state.route_outbound(&proxy, client, addr("10.0.1.1:7777"), 0) else {
        panic!("expected HBONE");
    };
    assert_eq!(endpoint, addr("10.0.1.1:25008"));
}

#[test]
fn tcp_workload_and_unknown_address_pass_through() {
    let state = state();
    let client = workload(&state, "client");
    assert_eq!(
        state.route_outbound(&LocalProxy::new(), client, addr("10.0.2.1:22"), 0),
        OutboundRoute::Passthrough {
            dst: addr("10.0.2.1:22"),
            service: None,
            workload: Some("Kubernetes//v1/Pod/default/legacy".into()),
        }
    );
    assert_eq!(
        state.route_outbound(&LocalProxy::new(), client, addr("192.0.2.1:443"), 0),
        OutboundRoute::Passthrough {
            dst: addr("192.0.2.1:443"),
            service: None,
            workload: None,
        }
    );
    // A workload of another network is unknown from this one.
    assert!(matches!(
        state.route_outbound(&LocalProxy::new(), client, addr("10.0.1.4:80"), 0),
        OutboundRoute::Passthrough { workload: None, .. }
    ));
}

#[test]
fn service_vip_goes_to_an_endpoint_with_its_port_mapping() {
    let state = state();
    let client = workload(&state, "client");
    let vip = addr("10.0.10.1:80");
    let mut chosen = BTreeMap::new();
    for pick in 0..8 {
        let route = state.route_outbound(&LocalProxy::new(), client, vip, pick);
        let OutboundRoute::Hbone {
            endpoint,
            authority,
            service,
            ..
        } = &route
        else {
            panic!("expected HBONE, got {route:?}");
        };
        assert_eq!(service.as_ref(), Some(&key("default/server.example")));
        assert_eq!(endpoint.port(), 15008);
        assert_eq!(endpoint.ip(), authority.ip());
        // The workload's own identity first, then the service's extra SAN.
        assert_eq!(ids(&route), [spiffe("server"), spiffe("extra")]);
        *chosen.entry(*authority).or_insert(0) += 1;
        // The same pick gives the same endpoint.
        assert_eq!(route, state.route_outbound(&LocalProxy::new(), client, vip, pick));
    }
    // server-a maps 80 to 9090 itself, server-b takes the service's 8080; capacity 3 to 1. The
    // unhealthy and the other-network members are never chosen.
    assert_eq!(
        chosen,
        BTreeMap::from([(addr("10.0.1.1:9090"), 6), (addr("10.0.1.2:8080"), 2)])
    );
}

#[test]
fn service_port_without_workload_mapping_uses_the_service_target() {
    let state = state();
    let client = workload(&state, "client");
    // 8443 is not in server-a's own map: the service's target applies to both.
    for pick in 0..4 {
        let OutboundRoute::Hbone { authority, .. } =
            state.route_outbound(&LocalProxy::new(), client, addr("10.0.10.1:8443"), pick)
        else {
            panic!("expected HBONE");
        };
        assert_eq!(authority.port(), 8443);
    }
}

#[test]
fn service_with_tcp_endpoint_passes_through_to_the_endpoint() {
    let state = state();
    let client = workload(&state, "client");
    assert_eq!(
        state.route_outbound(&LocalProxy::new(), client, addr("10.0.10.2:80"), 0),
        OutboundRoute::Passthrough {
            dst: addr("10.0.2.1:8081"),
            service: Some(key("default/legacy.example")),
            workload: Some("Kubernetes//v1/Pod/default/legacy".into()),
        }
    );
}

#[test]
fn service_without_endpoint_for_the_port_is_refused() {
    let state = state();
    let client = workload(&state, "client");
    let refused = |dst: &str| state.route_outbound(&LocalProxy::new(), client, addr(dst), 0);
    assert_eq!(
        refused("10.0.10.3:80"),
        OutboundRoute::Refused {
            dst: addr("10.0.10.3:80"),
            reason: Refusal::NoEndpoint {
                service: key("default/empty.example"),
                port: 80
            },
        }
    );
    // A named target port (0) that the workload does not resolve.
    assert!(matches!(
        refused("10.0.10.5:80"),
        OutboundRoute::Refused {
            reason: Refusal::NoEndpoint { .. },
            ..
        }
    ));
    // A port the service does not declare.
    let route = refused("10.0.10.1:81");
    assert_eq!(
        route,
        OutboundRoute::Refused {
            dst: addr("10.0.10.1:81"),
            reason: Refusal::UnknownPort {
                service: key("default/server.example"),
                port: 81
            },
        }
    );
    assert_eq!(
        route.to_string(),
        "refused 10.0.10.1:81: service default/server.example has no port 81"
    );
    // From the far network, only server-far is an endpoint.
    let far = state.workload_by_ip("far", ip("10.0.1.4")).unwrap();
    let OutboundRoute::Hbone { authority, .. } = state.route_outbound(&LocalProxy::new(), far, addr("10.0.10.1:80"), 0)
    else {
        panic!("expected HBONE");
    };
    assert_eq!(authority, addr("10.0.1.4:8080"));
}

#[test]
fn service_with_a_waypoint_goes_to_the_waypoint() {
    let state = state();
    let client = workload(&state, "client");
    let route = state.route_outbound(&LocalProxy::new(), client, addr("10.0.10.4:80"), 0);
    assert_eq!(
        route,
        OutboundRoute::Waypoint {
            endpoint: addr("10.0.3.1:15008"),
            authority: addr("10.0.10.4:80"),
            expected_identities: vec![workload(&state, "waypoint").spiffe_id().clone()],
            service: Some(key("default/waypointed.example")),
            waypoint: "Kubernetes//v1/Pod/default/waypoint".into(),
        }
    );
    assert_eq!(ids(&route), [spiffe("waypoint")]);
}

#[test]
fn workload_with_a_waypoint_goes_to_the_waypoint() {
    let state = state();
    let client = workload(&state, "client");
    // Waypoint addressed by its service VIP.
    let route = state.route_outbound(&LocalProxy::new(), client, addr("10.0.4.1:8080"), 0);
    let OutboundRoute::Waypoint {
        endpoint,
        authority,
        service,
        ..
    } = &route
    else {
        panic!("expected waypoint, got {route:?}");
    };
    assert_eq!(
        (*endpoint, *authority, service),
        (addr("10.0.3.1:15008"), addr("10.0.4.1:8080"), &None)
    );
    assert_eq!(ids(&route), [spiffe("waypoint")]);

    // Waypoint addressed as a workload, with its own HBONE port; the destination being TCP does not
    // matter.
    let route = state.route_outbound(&LocalProxy::new(), client, addr("10.0.4.4:80"), 0);
    let OutboundRoute::Waypoint { endpoint, .. } = &route else {
        panic!("expected waypoint, got {route:?}");
    };
    assert_eq!(*endpoint, addr("10.0.4.3:15009"));
    assert_eq!(ids(&route), [spiffe("waypoint-pod")]);
}

#[test]
fn a_waypoint_does_not_send_its_own_traffic_back_to_itself() {
    let state = state();
    let waypoint = workload(&state, "waypoint");
    assert!(matches!(
        state.route_outbound(&LocalProxy::new(), waypoint, addr("10.0.4.1:8080"), 0),
        OutboundRoute::Hbone { .. }
    ));
    assert!(matches!(
        state.route_outbound(&LocalProxy::new(), waypoint, addr("10.0.10.4:80"), 0),
        OutboundRoute::Refused {
            reason: Refusal::NoEndpoint { .. },
            ..
        }
    ));
    let pod = workload(&state, "waypoint-pod");
    assert!(matches!(
        state.route_outbound(&LocalProxy::new(), pod, addr("10.0.4.4:80"), 0),
        OutboundRoute::Passthrough { .. }
    ));
}

#[test]
fn an_unknown_waypoint_refuses() {
    let state = state();
    let client = workload(&state, "client");
    let route = state.route_outbound(&LocalProxy::new(), client, addr("10.0.4.2:80"), 0);
    assert!(
        matches!(
            &route,
            OutboundRoute::Refused {
                reason: Refusal::NoWaypoint { .. },
                ..
            }
        ),
        "{route:?}"
    );
}

#[test]
fn the_proxys_own_listeners_are_a_loop() {
    let state = state();
    let client = workload(&state, "client");
    let proxy = LocalProxy::new().with_addresses([ip("10.0.0.1"), ip("127.0.0.1")]);
    for port in [15001, 15006, 15008, 15080, 15053, 15021, 15000, 15020] {
        let dst = SocketAddr::new(ip("10.0.0.1"), port);
        assert_eq!(
            state.route_outbound(&proxy, client, dst, 0),
            OutboundRoute::Refused {
                dst,
                reason: Refusal::Loop
            }
        );
    }
    assert!(matches!(
        state.route_outbound(&proxy, client, addr("127.0.0.1:15001"), 0),
        OutboundRoute::Refused {
            reason: Refusal::Loop,
            ..
        }
    ));
    // Another port of the same address is the workload; a proxy port elsewhere is not a loop.
    assert!(matches!(
        state.route_outbound(&proxy, client, addr("10.0.0.1:8080"), 0),
        OutboundRoute::Hbone { .. }
    ));
    assert!(matches!(
        state.route_outbound(&proxy, client, addr("10.0.1.1:15001"), 0),
        OutboundRoute::Hbone { .. }
    ));
    // Ports are the caller's.
    let moved = proxy.clone().with_ports([25001]);
    assert!(matches!(
        state.route_outbound(&moved, client, addr("10.0.0.1:15001"), 0),
        OutboundRoute::Hbone { .. }
    ));
    assert!(matches!(
        state.route_outbound(&moved, client, addr("10.0.0.1:25001"), 0),
        OutboundRoute::Refused { .. }
    ));
}

#[test]
fn dual_stack_endpoints_answer_in_the_family_of_the_vip() {
    let state = state();
    let client = workload(&state, "client");
    let OutboundRoute::Hbone {
        endpoint, authority, ..
    } = state.route_outbound(&LocalProxy::new(), client, addr("[fd00::10:6]:80"), 0)
    else {
        panic!("expected HBONE");
    };
    assert_eq!(endpoint, addr("[fd00::5:1]:15008"));
    assert_eq!(authority, addr("[fd00::5:1]:8080"));
    let OutboundRoute::Hbone { authority, .. } =
        state.route_outbound(&LocalProxy::new(), client, addr("10.0.10.6:80"), 0)
    else {
        panic!("expected HBONE");
    };
    assert_eq!(authority, addr("10.0.5.1:8080"));
}

#[test]
fn loopback_example_routes_through_the_local_proxy() {
    let config = LocalConfig::parse(include_str!("../examples/localhost.yaml")).unwrap();
    let state = State::from(config);
    let proxy = LocalProxy::new().with_node("local").with_addresses([ip("127.0.0.1")]);
    let local = state.inbound_workload(&proxy, ip("127.0.0.1")).unwrap();
    let route = state.route_outbound(&proxy, local, addr("127.10.0.1:80"), 0);
    let OutboundRoute::Hbone {
        endpoint,
        authority,
        expected_identities,
        ..
    } = &route
    else {
        panic!("expected HBONE, got {route:?}");
    };
    assert_eq!(
        (*endpoint, *authority),
        (addr("127.0.0.1:15008"), addr("127.0.0.1:8080"))
    );
    assert_eq!(expected_identities[0].to_string(), spiffe("default"));
    assert!(matches!(
        state.route_outbound(&proxy, local, addr("127.0.0.2:80"), 0),
        OutboundRoute::Passthrough { .. }
    ));
}

proptest! {
    #[test]
    fn routing_is_total_and_chooses_only_eligible_endpoints(
        last in 0u8..12,
        port in prop::sample::select(vec![80u16, 81, 8443, 15001, 22]),
        pick in any::<u64>(),
        source in 0usize..14,
    ) {
        let state = state();
        let source = state.workloads().nth(source).expect("source");
        let dst = SocketAddr::new(IpAddr::from([10, 0, 10, last]), port);
        let proxy = LocalProxy::new().with_addresses([ip("10.0.10.1")]);
        let route = state.route_outbound(&proxy, source, dst, pick);
        prop_assert_eq!(&route, &state.route_outbound(&proxy, source, dst, pick));
        if let OutboundRoute::Hbone { authority, workload, service: Some(service), .. } = &route {
            let chosen = state.workload_by_uid(workload).unwrap();
            prop_assert!(chosen.services.contains_key(service));
            prop_assert_eq!(&chosen.network, &source.network);
            prop_assert!(chosen.workload_ips.contains(&authority.ip()));
            prop_assert!(chosen.name != "server-sick");
        }
    }
}

#[test]
fn capacity_weights_the_choice_and_zero_everywhere_is_uniform() {
    let yaml = |a: u32, b: u32| {
        format!(
            "workloads:\n- name: a\n  workloadIps: [10.0.1.1]\n  protocol: HBONE\n  capacity: {a}\n  services: {{\"default/s.example\": {{}}}}\n\
             - name: b\n  workloadIps: [10.0.1.2]\n  protocol: HBONE\n  capacity: {b}\n  services: {{\"default/s.example\": {{}}}}\n\
             - name: client\n  workloadIps: [10.0.0.1]\nservices:\n- hostname: s.example\n  vips: [/10.0.10.1]\n  ports: {{80: 8080}}\n"
        )
    };
    let chosen = |a: u32, b: u32| {
        let state = State::new(LocalConfig::parse(&yaml(a, b)).unwrap());
        let client = workload(&state, "client");
        (0..6)
            .map(
                |pick| match state.route_outbound(&LocalProxy::new(), client, addr("10.0.10.1:80"), pick) {
                    OutboundRoute::Hbone { authority, .. } => authority.ip().to_string(),
                    other => panic!("{other:?}"),
                },
            )
            .collect::<Vec<_>>()
    };
    assert_eq!(
        chosen(0, 1),
        ["10.0.1.2"; 6],
        "capacity 0 is never chosen while others are"
    );
    assert_eq!(
        chosen(0, 0),
        ["10.0.1.1", "10.0.1.2", "10.0.1.1", "10.0.1.2", "10.0.1.1", "10.0.1.2"]
    );
    assert_eq!(
        chosen(1, 2),
        ["10.0.1.1", "10.0.1.2", "10.0.1.2", "10.0.1.1", "10.0.1.2", "10.0.1.2"]
    );
}

#[test]
fn hand_built_configurations_index_the_first_of_duplicates() {
    let identity = |sa: &str| format!("spiffe://cluster.local/ns/default/sa/{sa}").parse().unwrap();
    let mut first = Workload::new("first", identity("one"));
    first.workload_ips.push(ip("10.0.0.1"));
    first.protocol = meshwire_dataplane::xds::Protocol::Hbone;
    let mut second = Workload::new("second", identity("two"));
    second.workload_ips.push(ip("10.0.0.1"));
    second.set_identity(identity("three"));
    assert_eq!(second.spiffe_id().to_string(), spiffe("three"));
    let mut config = LocalConfig::default();
    config.workloads = vec![first, second];
    let state = State::new(config);
    assert_eq!(state.workload_by_ip("", ip("10.0.0.1")).unwrap().uid, "first");
    assert_eq!(state.workload_by_uid("second").unwrap().service_account(), "three");
}

// Found by the `original_destination` fuzz target.

#[test]
fn an_ipv4_mapped_destination_routes_as_its_ipv4_address() {
    let state = state();
    let client = workload(&state, "client");
    let proxy = LocalProxy::new().with_addresses([ip("10.0.0.1")]);
    // An address the mesh does not know passes through, written as IPv4.
    assert_eq!(
        state.route_outbound(&proxy, client, addr("[::ffff:249.249.153.255]:39321"), 0),
        OutboundRoute::Passthrough {
            dst: addr("249.249.153.255:39321"),
            service: None,
            workload: None
        }
    );
    // A VIP, a workload IP and the proxy's own listener are recognised in the mapped form.
    for (mapped, plain) in [
        ("[::ffff:10.0.10.1]:80", "10.0.10.1:80"),
        ("[::ffff:10.0.1.1]:7777", "10.0.1.1:7777"),
        ("[::ffff:10.0.0.1]:15001", "10.0.0.1:15001"),
    ] {
        assert_eq!(
            state.route_outbound(&proxy, client, addr(mapped), 3),
            state.route_outbound(&proxy, client, addr(plain), 3),
            "{mapped}"
        );
    }
    assert!(matches!(
        state.route_outbound(&proxy, client, addr("[::ffff:10.0.0.1]:15001"), 0),
        OutboundRoute::Refused {
            reason: Refusal::Loop,
            ..
        }
    ));
}

#[test]
fn a_proxy_address_written_ipv4_mapped_is_its_own_ipv4_address() {
    let proxy = LocalProxy::new().with_addresses([ip("::ffff:127.0.0.1")]);
    assert!(proxy.is_own(addr("127.0.0.1:15001")));
    assert!(proxy.is_own(addr("[::ffff:127.0.0.1]:15001")));
    assert!(!proxy.is_own(addr("127.0.0.1:8080")));
    assert!(!proxy.is_own(addr("[::1]:15001")));
    let state = state();
    assert!(matches!(
        state.route_outbound(&proxy, workload(&state, "client"), addr("127.0.0.1:15006"), 0),
        OutboundRoute::Refused {
            reason: Refusal::Loop,
            ..
        }
    ));
}

#[test]
fn a_service_endpoint_or_waypoint_at_the_proxys_own_listener_is_a_loop() {
    // The loopback example, with a proxy that listens on the endpoint's target port itself.
    let example = State::from(LocalConfig::parse(include_str!("../examples/localhost.yaml")).unwrap());
    let local = workload(&example, "local");
    let proxy = LocalProxy::new()
        .with_addresses([ip("127.0.0.1")])
        .with_ports([15008, 8080]);
    let refused = |state: &State, proxy: &LocalProxy, source: &Workload, dst: &str| {
        assert_eq!(
            state.route_outbound(proxy, source, addr(dst), 0),
            OutboundRoute::Refused {
                dst: addr(dst),
                reason: Refusal::Loop
            },
            "{dst}"
        );
    };
    refused(&example, &proxy, local, "127.10.0.1:80");
    // HBONE to the proxy's own HBONE port is how local workloads are reached: not a loop.
    let default_ports = LocalProxy::new().with_addresses([ip("127.0.0.1")]);
    assert!(matches!(
        example.route_outbound(&default_ports, local, addr("127.10.0.1:80"), 0),
        OutboundRoute::Hbone { .. }
    ));

    let state = state();
    let client = workload(&state, "client");
    // A plain TCP endpoint of a service.
    let proxy = LocalProxy::new().with_addresses([ip("10.0.2.1")]).with_ports([8081]);
    refused(&state, &proxy, client, "10.0.10.2:80");
    // A waypoint reached at one of the proxy's listeners other than its HBONE port.
    let proxy = LocalProxy::new().with_addresses([ip("10.0.4.3")]).with_ports([15009]);
    refused(&state, &proxy, client, "10.0.4.4:80");
    // ... and at its HBONE port, which is not a loop.
    let proxy = proxy.with_hbone_port(15009);
    assert!(matches!(
        state.route_outbound(&proxy, client, addr("10.0.4.4:80"), 0),
        OutboundRoute::Waypoint { .. }
    ));
}
