//! The proxy configuration: ztunnel's defaults, every variable mapped to its field, flags over
//! variables, errors that name the flag or variable and the value, `--help`, and property tests that
//! arbitrary argument vectors never panic. The environment is always injected; the process
//! environment is never read or written.

#![allow(clippy::unwrap_used, missing_docs)]

use std::collections::{BTreeSet, HashMap};
use std::ffi::OsString;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use meshwire_dataplane::config::{
    AuthToken, CertificateSource, Config, ConnectionBalance, Error, InpodConfig, Listener, LocalConfigSource,
    LogFormat, Origin, PacketMark, ProxyMode, Roots, UNSUPPORTED_ZTUNNEL_ENV, WorkloadInfo, XdsPriority,
};
use meshwire_dataplane::state::{DEFAULT_PROXY_PORTS, LocalProxy};
use meshwire_hbone::Settings;
use meshwire_hbone::pool::PoolConfig;
use proptest::prelude::*;

/// Parses `args` (after the program name) with exactly the variables of `env`.
fn parse(args: &[&str], env: &[(&str, &str)]) -> Result<Config, Error> {
    let vars: Vec<(String, String)> = env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    let argv = std::iter::once("ztunnel").chain(args.iter().copied());
    let from_vars = Config::from_args_and_vars(argv.clone(), vars.clone());
    // The lookup-only reader agrees wherever no family of prefixed variables is involved.
    if !env
        .iter()
        .any(|(k, _)| k.starts_with("ISTIO_META") || k.contains("_HEADER_"))
    {
        let env: HashMap<String, String> = vars.into_iter().collect();
        assert_eq!(
            Config::from_args_and_env(argv, &|name| env.get(name).cloned()),
            from_vars
        );
    }
    from_vars
}

fn ok(args: &[&str], env: &[(&str, &str)]) -> Config {
    parse(args, env).unwrap_or_else(|err| panic!("{args:?} {env:?}: {err}"))
}

fn err(args: &[&str], env: &[(&str, &str)]) -> Error {
    match parse(args, env) {
        Ok(config) => panic!("{args:?} {env:?} was accepted: {config:?}"),
        Err(err) => err,
    }
}

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn help() -> String {
    let err = err(&["--help"], &[]);
    assert!(err.is_help(), "{err:?}");
    err.to_string()
}

#[test]
fn defaults_are_ztunnels() {
    let config = ok(&[], &[]);
    assert_eq!(config, Config::default());
    let l = &config.listeners;
    assert_eq!(l.inbound, addr("[::]:15008"));
    assert_eq!(l.inbound_plaintext, addr("[::]:15006"));
    assert_eq!(l.outbound, addr("[::]:15001"));
    // SOCKS5 is off unless asked for, as in ztunnel.
    assert_eq!(l.socks5, None);
    assert_eq!(l.dns, Some(addr("127.0.0.1:15053")));
    assert_eq!(l.readiness, addr("[::]:15021"));
    assert_eq!(l.admin, addr("127.0.0.1:15000"));
    assert_eq!(l.metrics, addr("[::]:15020"));
    for listener in Listener::ALL {
        let expected = (listener != Listener::Socks5).then(|| listener.default_port());
        assert_eq!(l.get(listener).map(|a| a.port()), expected, "{listener}");
    }
    let ports: BTreeSet<u16> = l.ports().into_iter().collect();
    let defaults: BTreeSet<u16> = DEFAULT_PROXY_PORTS.into_iter().filter(|p| *p != 15080).collect();
    assert_eq!(ports, defaults, "ztunnel's ports but SOCKS5's, off by default");

    assert_eq!(config.mode, ProxyMode::Shared { node: None });
    assert_eq!(config.local_config, None);
    assert_eq!(config.state_dir, PathBuf::from(".meshwire"));
    assert_eq!(
        config.certificates,
        CertificateSource::LocalCa {
            dir: PathBuf::from(".meshwire/ca")
        }
    );
    assert_eq!(config.trust_domain.to_string(), "cluster.local");
    assert_eq!(config.cluster_id, "Kubernetes");
    assert_eq!(config.cluster_domain, "cluster.local");
    assert_eq!(config.network, "");
    assert_eq!(config.instance_ip, None);
    assert_eq!(config.http2(), &Settings::default());
    assert_eq!(config.pool, PoolConfig::default());
    assert_eq!(config.pool.max_streams_per_connection, 100);
    assert_eq!(config.pool.idle_timeout, Duration::from_secs(300));
    assert_eq!(config.drain_deadline, Duration::from_secs(5));
    assert_eq!(config.worker_threads, 2);
    assert_eq!(config.cert_ttl, Duration::from_secs(24 * 3600));
    assert_eq!(config.log_format, LogFormat::Text);
    assert_eq!(config.log_level, "info");
    assert_eq!(config.packet_mark, PacketMark::Auto);
    assert_eq!(config.connection_balance, ConnectionBalance::RoundRobin);
    assert_eq!(config.xds_priority, XdsPriority::Idle);
    assert_eq!(config.xds_cpu_share.get(), 1.0);
    assert_eq!(config.packet_mark.value(), Some(0x539));
    assert!(config.ignored_env.is_empty());
    assert_eq!(config.validate(), Ok(()));

    let proxy = config.local_proxy();
    let mut expected = LocalProxy::default();
    expected.ports = config.listeners.ports();
    assert_eq!(proxy, expected);
}

#[test]
fn istio_command_line_is_accepted() {
    // Istio's ztunnel DaemonSet runs `ztunnel proxy ztunnel`.
    assert_eq!(ok(&["proxy", "ztunnel"], &[]), Config::default());
    assert_eq!(ok(&["proxy"], &[]), Config::default());
    let version = err(&["version"], &[]);
    assert!(
        version.is_help() && version.to_string().contains(env!("CARGO_PKG_VERSION")),
        "{version}"
    );
    let version = err(&["--version"], &[]);
    assert!(version.is_help(), "{version:?}");
    let unknown = err(&["frobnicate"], &[]);
    assert!(
        !unknown.is_help() && unknown.to_string().contains("frobnicate"),
        "{unknown}"
    );
}

type Check = fn(&Config) -> bool;

/// Each variable, a value, and what the configuration must then say. Every variable `--help` lists
/// appears here (checked by `every_variable_in_help_is_tested`).
fn env_cases() -> Vec<(Vec<(&'static str, &'static str)>, Check)> {
    vec![
        (vec![("LOCAL_XDS_PATH", "/etc/local.yaml")], |c| {
            c.local_config == Some(LocalConfigSource::File("/etc/local.yaml".into()))
        }),
        (vec![("LOCAL_XDS", "workloads: []")], |c| {
            c.local_config == Some(LocalConfigSource::Inline("workloads: []".into()))
        }),
        (
            vec![("PROXY_MODE", "dedicated"), ("PROXY_WORKLOAD_INFO", "ns1/pod-1/sa1")],
            |c| {
                c.mode
                    == ProxyMode::Dedicated {
                        workload: WorkloadInfo {
                            namespace: "ns1".into(),
                            name: "pod-1".into(),
                            service_account: "sa1".into(),
                        },
                    }
            },
        ),
        // A workload without PROXY_MODE means dedicated mode.
        (vec![("PROXY_WORKLOAD_INFO", "ns1/pod-1/sa1")], |c| {
            matches!(c.mode, ProxyMode::Dedicated { .. })
        }),
        (vec![("PROXY_MODE", "shared"), ("NODE_NAME", "node-1")], |c| {
            c.mode
                == ProxyMode::Shared {
                    node: Some("node-1".into()),
                }
                && c.local_proxy().node.as_deref() == Some("node-1")
        }),
        (vec![("INSTANCE_IP", "10.0.0.5")], |c| {
            c.instance_ip == Some("10.0.0.5".parse().unwrap())
                && c.local_proxy().addresses == vec!["10.0.0.5".parse::<IpAddr>().unwrap()]
        }),
        (vec![("CLUSTER_ID", "east")], |c| c.cluster_id == "east"),
        (vec![("CLUSTER_ID", "east"), ("ISTIO_META_CLUSTER_ID", "west")], |c| {
            c.cluster_id == "west"
        }),
        (vec![("CLUSTER_DOMAIN", "corp.example")], |c| {
            c.cluster_domain == "corp.example"
        }),
        (vec![("TRUST_DOMAIN", "example.org")], |c| {
            c.trust_domain.to_string() == "example.org"
        }),
        (vec![("NETWORK", "net-1")], |c| {
            c.network == "net-1" && c.local_proxy().network == "net-1"
        }),
        (vec![("MESHWIRE_STATE_DIR", "/var/lib/meshwire")], |c| {
            c.state_dir == Path::new("/var/lib/meshwire")
                && c.certificates
                    == CertificateSource::LocalCa {
                        dir: "/var/lib/meshwire/ca".into(),
                    }
        }),
        (vec![("STATE_DIRECTORY", "/var/lib/a:/var/lib/b")], |c| {
            c.state_dir == Path::new("/var/lib/a")
        }),
        (
            vec![("MESHWIRE_STATE_DIR", "/x"), ("STATE_DIRECTORY", "/var/lib/a")],
            |c| c.state_dir == Path::new("/x"),
        ),
        (
            vec![
                ("MESHWIRE_CERT_CHAIN", "chain.pem"),
                ("MESHWIRE_CERT_KEY", "key.pem"),
                ("MESHWIRE_TRUST_BUNDLE", "ca.pem"),
            ],
            |c| {
                c.certificates
                    == CertificateSource::Files {
                        chain: "chain.pem".into(),
                        key: "key.pem".into(),
                        bundle: "ca.pem".into(),
                    }
            },
        ),
        (vec![("FAKE_CA", "true")], |c| {
            matches!(c.certificates, CertificateSource::LocalCa { .. })
        }),
        (vec![("SECRET_TTL", "12h")], |c| {
            c.cert_ttl == Duration::from_secs(12 * 3600)
        }),
        (vec![("MESHWIRE_BIND_ADDRESS", "10.0.0.1")], |c| {
            c.listeners.inbound == addr("10.0.0.1:15008")
                && c.listeners.outbound == addr("10.0.0.1:15001")
                && c.listeners.inbound_plaintext == addr("10.0.0.1:15006")
                && c.listeners.readiness == addr("10.0.0.1:15021")
                && c.listeners.metrics == addr("10.0.0.1:15020")
                && c.listeners.admin == addr("127.0.0.1:15000")
        }),
        (vec![("IPV6_ENABLED", "false")], |c| {
            c.listeners.inbound == addr("0.0.0.0:15008") && c.listeners.metrics == addr("0.0.0.0:15020")
        }),
        (vec![("MESHWIRE_INBOUND_PORT", "16008")], |c| {
            c.listeners.inbound.port() == 16008 && c.local_proxy().hbone_port == 16008
        }),
        (vec![("MESHWIRE_INBOUND_PLAINTEXT_PORT", "16006")], |c| {
            c.listeners.inbound_plaintext.port() == 16006
        }),
        (vec![("MESHWIRE_OUTBOUND_PORT", "16001")], |c| {
            c.listeners.outbound.port() == 16001
        }),
        (vec![("UNSTABLE_ENABLE_SOCKS5", "false")], |c| {
            c.listeners.socks5.is_none() && !c.local_proxy().ports.contains(&15080)
        }),
        (vec![("UNSTABLE_ENABLE_SOCKS5", "true")], |c| {
            c.listeners.socks5 == Some(addr("127.0.0.1:15080")) && c.local_proxy().ports.contains(&15080)
        }),
        (
            vec![("UNSTABLE_ENABLE_SOCKS5", "true"), ("MESHWIRE_SOCKS5_PORT", "16080")],
            |c| c.listeners.socks5 == Some(addr("127.0.0.1:16080")),
        ),
        (
            vec![("UNSTABLE_ENABLE_SOCKS5", "true"), ("MESHWIRE_SOCKS5_ADDRESS", "::1")],
            |c| c.listeners.socks5 == Some(addr("[::1]:15080")),
        ),
        (vec![("ISTIO_META_DNS_CAPTURE", "false")], |c| c.listeners.dns.is_none()),
        (vec![("MESHWIRE_DNS_PORT", "16053")], |c| {
            c.listeners.dns == Some(addr("127.0.0.1:16053"))
        }),
        (vec![("MESHWIRE_DNS_ADDRESS", "10.0.0.1")], |c| {
            c.listeners.dns == Some(addr("10.0.0.1:15053"))
        }),
        (vec![("MESHWIRE_DNS_RESOLV_CONF", "/run/resolv.conf")], |c| {
            c.dns.resolv_conf == std::path::Path::new("/run/resolv.conf")
        }),
        (vec![("MESHWIRE_DNS_UPSTREAM_TIMEOUT", "750ms")], |c| {
            c.dns.upstream_timeout == Duration::from_millis(750)
        }),
        (vec![("MESHWIRE_DNS_FORWARD_LIMIT", "8")], |c| c.dns.forward_limit == 8),
        (vec![("MESHWIRE_DNS_TCP_CONNECTIONS", "3")], |c| {
            c.dns.tcp_connections == 3
        }),
        (vec![("PREFERED_SERVICE_NAMESPACE", "istio-system")], |c| {
            c.dns.preferred_namespace.as_deref() == Some("istio-system")
        }),
        (vec![("ISTIO_META_DNS_PROXY_ADDR", "localhost:15054")], |c| {
            c.listeners.dns == Some(addr("127.0.0.1:15054"))
        }),
        (vec![("ISTIO_META_DNS_PROXY_ADDR", "10.1.1.1:53")], |c| {
            c.listeners.dns == Some(addr("10.1.1.1:53"))
        }),
        // Our own variables win over DNS_PROXY_ADDR.
        (
            vec![
                ("ISTIO_META_DNS_PROXY_ADDR", "10.1.1.1:53"),
                ("MESHWIRE_DNS_PORT", "16053"),
            ],
            |c| c.listeners.dns == Some(addr("127.0.0.1:16053")),
        ),
        (vec![("MESHWIRE_READINESS_PORT", "16021")], |c| {
            c.listeners.readiness.port() == 16021
        }),
        (vec![("MESHWIRE_ADMIN_PORT", "16000")], |c| {
            c.listeners.admin == addr("127.0.0.1:16000")
        }),
        (vec![("MESHWIRE_ADMIN_ADDRESS", "0.0.0.0")], |c| {
            c.listeners.admin == addr("0.0.0.0:15000")
        }),
        (vec![("MESHWIRE_METRICS_PORT", "16020")], |c| {
            c.listeners.metrics.port() == 16020
        }),
        (vec![("HTTP2_STREAM_WINDOW_SIZE", "1048576")], |c| {
            c.http2().stream_window() == 1 << 20 && c.pool.settings.stream_window() == 1 << 20
        }),
        (vec![("HTTP2_CONNECTION_WINDOW_SIZE", "33554432")], |c| {
            c.http2().connection_window() == 32 << 20
        }),
        (vec![("HTTP2_FRAME_SIZE", "65536")], |c| {
            c.http2().max_frame_size() == 65536
        }),
        (vec![("MESHWIRE_HBONE_STREAM_SEND_BUFFER", "65536")], |c| {
            c.http2().send_buffer() == 65536 && c.pool.settings.send_buffer() == 65536
        }),
        (vec![("MESHWIRE_HBONE_CONNECTION_BUFFER", "8388608")], |c| {
            c.buffers.connection == 8 << 20
        }),
        (vec![("MESHWIRE_HBONE_BUFFER_BUDGET", "33554432")], |c| {
            c.buffers.process == 32 << 20
        }),
        (vec![("MESHWIRE_HBONE_RECEIVE_BUDGET", "16777216")], |c| {
            c.buffers.receive == 16 << 20
        }),
        (vec![("POOL_MAX_STREAMS_PER_CONNECTION", "50")], |c| {
            c.pool.max_streams_per_connection == 50
        }),
        (vec![("POOL_UNUSED_RELEASE_TIMEOUT", "30s")], |c| {
            c.pool.idle_timeout == Duration::from_secs(30)
        }),
        (vec![("MESHWIRE_POOL_SURPLUS_RELEASE_TIMEOUT", "2s")], |c| {
            c.pool.surplus_idle_timeout == Duration::from_secs(2) && c.pool.idle_timeout == Duration::from_secs(300)
        }),
        (vec![("ZTUNNEL_WORKER_THREADS", "4")], |c| c.worker_threads == 4),
        (
            vec![("ZTUNNEL_WORKER_THREADS", "50%"), ("ZTUNNEL_CPU_LIMIT", "8")],
            |c| c.worker_threads == 4,
        ),
        (
            vec![("ZTUNNEL_WORKER_THREADS", "30%"), ("ZTUNNEL_CPU_LIMIT", "16")],
            |c| c.worker_threads == 5,
        ),
        (
            vec![("ZTUNNEL_WORKER_THREADS", "10%"), ("ZTUNNEL_CPU_LIMIT", "4")],
            |c| c.worker_threads == 1,
        ),
        (vec![("ZTUNNEL_WORKER_THREADS", "100%")], |c| c.worker_threads >= 1),
        (vec![("CONNECTION_TERMINATION_DEADLINE", "30s")], |c| {
            c.drain_deadline == Duration::from_secs(30)
        }),
        (vec![("TERMINATION_GRACE_PERIOD_SECONDS", "30")], |c| {
            c.drain_deadline == Duration::from_secs(25)
        }),
        (vec![("TERMINATION_GRACE_PERIOD_SECONDS", "5")], |c| {
            c.drain_deadline == Duration::from_secs(4)
        }),
        (vec![("TERMINATION_GRACE_PERIOD_SECONDS", "0")], |c| {
            c.drain_deadline == Duration::from_secs(1)
        }),
        (
            vec![
                ("TERMINATION_GRACE_PERIOD_SECONDS", "30"),
                ("CONNECTION_TERMINATION_DEADLINE", "2s"),
            ],
            |c| c.drain_deadline == Duration::from_secs(2),
        ),
        (vec![("LOG_FORMAT", "json")], |c| c.log_format == LogFormat::Json),
        (vec![("LOG_FORMAT", "plain")], |c| c.log_format == LogFormat::Text),
        (vec![("RUST_LOG", "meshwire=debug,h2=warn")], |c| {
            c.log_level == "meshwire=debug,h2=warn"
        }),
        (
            vec![(
                "PROXY_CONFIG",
                r#"{"proxyAdminPort": 15999, "statsPort": 15888, "concurrency": 3, "discoveryAddress": "x",
                    "proxyMetadata": {"ISTIO_META_DNS_CAPTURE": "false"}}"#,
            )],
            |c| {
                c.listeners.admin.port() == 15999
                    && c.listeners.metrics.port() == 15888
                    && c.worker_threads == 3
                    && c.listeners.dns.is_none()
            },
        ),
        (
            vec![(
                "PROXY_CONFIG",
                "proxyAdminPort: 15999\nproxyMetadata:\n  DNS_PROXY_ADDR: localhost:15054\n",
            )],
            |c| c.listeners.admin.port() == 15999 && c.listeners.dns == Some(addr("127.0.0.1:15054")),
        ),
        // Direct variables win over PROXY_CONFIG.
        (
            vec![
                (
                    "PROXY_CONFIG",
                    r#"{"proxyAdminPort": 15999, "proxyMetadata": {"DNS_CAPTURE": "false"}}"#,
                ),
                ("MESHWIRE_ADMIN_PORT", "16000"),
                ("ISTIO_META_DNS_CAPTURE", "true"),
            ],
            |c| c.listeners.admin.port() == 16000 && c.listeners.dns.is_some(),
        ),
        (vec![("INPOD_ENABLED", "true")], |c| {
            c.inpod
                == Some(InpodConfig {
                    socket: "/var/run/ztunnel/ztunnel.sock".into(),
                    port_reuse: true,
                })
                && c.ignored_env.is_empty()
        }),
        (vec![("ENABLE_ORIG_SRC", "false")], |c| {
            c.original_source == Some(false) && c.ignored_env.is_empty()
        }),
        (vec![("ENABLE_ORIG_SRC", "true")], |c| c.original_source == Some(true)),
        (vec![("ENABLE_ORIG_SRC", "")], |c| c.original_source.is_none()),
        (
            vec![
                ("INPOD_ENABLED", "true"),
                ("INPOD_UDS", "/run/cni.sock"),
                ("INPOD_PORT_REUSE", "false"),
            ],
            |c| {
                c.inpod
                    == Some(InpodConfig {
                        socket: "/run/cni.sock".into(),
                        port_reuse: false,
                    })
            },
        ),
        // Without INPOD_ENABLED the socket is not used.
        (vec![("INPOD_UDS", "/x")], |c| {
            c.inpod.is_none() && c.ignored_env.is_empty()
        }),
        // istiod: xDS, then the CA at istiod's address unless told otherwise.
        (
            vec![
                ("XDS_ADDRESS", "https://istiod:15012"),
                ("XDS_ROOT_CA", "/etc/istio/root.pem"),
                ("AUTH_TOKEN", "/etc/istio/token"),
                ("POD_NAME", "ztunnel-1"),
                ("POD_NAMESPACE", "istio-system"),
                ("SERVICE_ACCOUNT", "ztunnel"),
            ],
            |c| {
                let xds = c.istio.xds.as_ref().unwrap();
                xds.address == "https://istiod:15012"
                    && xds.roots == Roots::File("/etc/istio/root.pem".into())
                    && c.istio.token == AuthToken::File("/etc/istio/token".into())
                    && c.istio.pod_name.as_deref() == Some("ztunnel-1")
                    && c.istio.pod_namespace.as_deref() == Some("istio-system")
                    && c.istio.service_account.as_deref() == Some("ztunnel")
                    && matches!(&c.certificates, CertificateSource::IstioCa(ca) if ca.address == xds.address)
            },
        ),
        (
            vec![
                ("XDS_ADDRESS", "istiod:15012"),
                ("CA_ADDRESS", "ca.example:15012"),
                ("CA_ROOT_CA", "SYSTEM"),
                ("ALT_XDS_HOSTNAME", "istiod.istio-system.svc"),
                ("ALT_CA_HOSTNAME", "ca.istio-system.svc"),
            ],
            |c| {
                c.istio.xds.as_ref().unwrap().server_name.as_deref() == Some("istiod.istio-system.svc")
                    && matches!(&c.certificates, CertificateSource::IstioCa(ca)
                        if ca.address == "ca.example:15012"
                            && ca.roots == Roots::System
                            && ca.server_name.as_deref() == Some("ca.istio-system.svc"))
            },
        ),
        (vec![("XDS_ADDRESS", "istiod:15012"), ("FAKE_CA", "true")], |c| {
            matches!(&c.certificates, CertificateSource::LocalCa { .. }) && c.istio.xds.is_some()
        }),
        (vec![("PACKET_MARK", "0x10")], |c| c.packet_mark == PacketMark::Set(16)),
        (vec![("PACKET_MARK", "1337")], |c| {
            c.packet_mark == PacketMark::Set(0x539)
        }),
        (vec![("PACKET_MARK", "none")], |c| {
            c.packet_mark == PacketMark::Off && c.packet_mark.value().is_none()
        }),
        (vec![("PACKET_MARK", "0")], |c| c.packet_mark == PacketMark::Off),
        (vec![("MESHWIRE_CONNECTION_BALANCE", "round-robin")], |c| {
            c.connection_balance == ConnectionBalance::RoundRobin
        }),
        (vec![("MESHWIRE_CONNECTION_BALANCE", "hash")], |c| {
            c.connection_balance == ConnectionBalance::Hash
        }),
        (vec![("MESHWIRE_XDS_PRIORITY", "normal")], |c| {
            c.xds_priority == XdsPriority::Normal
        }),
        (vec![("MESHWIRE_XDS_PRIORITY", "IDLE")], |c| {
            c.xds_priority == XdsPriority::Idle
        }),
        (vec![("MESHWIRE_XDS_CPU_SHARE", "0.25")], |c| {
            c.xds_cpu_share.get() == 0.25
        }),
        (vec![("MESHWIRE_XDS_CPU_SHARE", " 0.05 ")], |c| {
            c.xds_cpu_share.get() == 0.05
        }),
        (vec![("MESHWIRE_HANDOVER", "45s")], |c| {
            c.handover == Some(Duration::from_secs(45))
        }),
        (
            vec![
                ("MESHWIRE_POOL_RESPONSE_TIMEOUT", "4s"),
                ("MESHWIRE_POOL_PROBE_TIMEOUT", "1500ms"),
            ],
            |c| {
                c.pool.response_timeout == Duration::from_secs(4) && c.pool.probe_timeout == Duration::from_millis(1500)
            },
        ),
        // Empty counts as unset.
        (vec![("MESHWIRE_INBOUND_PORT", ""), ("PROXY_MODE", "")], |c| {
            c.listeners.inbound.port() == 15008 && matches!(c.mode, ProxyMode::Shared { .. })
        }),
    ]
}

#[test]
fn each_variable_maps_to_its_field() {
    for (env, check) in env_cases() {
        let config = ok(&[], &env);
        assert!(check(&config), "{env:?} gave {config:#?}");
        assert_eq!(config.validate(), Ok(()), "{env:?}");
    }
}

/// Every variable named in `--help`, and every unsupported one, is exercised by `env_cases`.
#[test]
fn every_variable_in_help_is_tested() {
    let help = help();
    let mut named = BTreeSet::new();
    for part in help.split("[env: ").skip(1) {
        let list = &part[..part.find(']').unwrap()];
        for name in list.split(", ") {
            named.insert(name.split_whitespace().next().unwrap().to_owned());
        }
    }
    for name in [
        "LOCAL_XDS",
        "ISTIO_META_DNS_PROXY_ADDR",
        "TERMINATION_GRACE_PERIOD_SECONDS",
        "ZTUNNEL_CPU_LIMIT",
    ] {
        assert!(help.contains(name), "{name} is not mentioned in --help");
        named.insert(name.to_owned());
    }
    let tested: BTreeSet<String> = env_cases()
        .into_iter()
        .flat_map(|(env, _)| env.into_iter().map(|(k, _)| k.to_owned()))
        .collect();
    let untested: Vec<_> = named.difference(&tested).collect();
    assert!(untested.is_empty(), "variables without a test: {untested:?}");
    assert!(named.len() >= 35, "{named:?}");
    for name in UNSUPPORTED_ZTUNNEL_ENV {
        let config = ok(&[], &[(name, "1")]);
        assert_eq!(config.ignored_env, vec![*name]);
    }
}

#[test]
fn inpod_mode_needs_shared_mode() {
    let e = err(
        &[],
        &[("INPOD_ENABLED", "true"), ("PROXY_WORKLOAD_INFO", "ns1/pod-1/sa1")],
    );
    let text = e.to_string();
    assert!(
        text.contains("INPOD_ENABLED") && text.contains("PROXY_WORKLOAD_INFO") && text.contains("shared mode"),
        "{text}"
    );
    let e = err(&["--inpod", "--mode", "dedicated", "--workload", "a/b/c"], &[]);
    assert!(e.to_string().contains("--inpod"), "{e}");
    let e = err(&[], &[("INPOD_ENABLED", "maybe")]);
    assert!(e.to_string().contains("INPOD_ENABLED"), "{e}");
    assert!(ok(&[], &[]).inpod.is_none(), "off by default");
}

#[test]
fn flags_override_variables() {
    type Case = (&'static [&'static str], &'static [(&'static str, &'static str)], Check);
    let cases: &[Case] = &[
        (
            &["--inbound-port", "16008"],
            &[("MESHWIRE_INBOUND_PORT", "17008")],
            |c| c.listeners.inbound.port() == 16008,
        ),
        (&["--admin-port=16000"], &[("MESHWIRE_ADMIN_PORT", "17000")], |c| {
            c.listeners.admin.port() == 16000
        }),
        (
            &["--metrics-port", "16020"],
            &[("PROXY_CONFIG", "statsPort: 17020")],
            |c| c.listeners.metrics.port() == 16020,
        ),
        (
            &["--dns-port", "16053"],
            &[("ISTIO_META_DNS_PROXY_ADDR", "10.0.0.1:53")],
            |c| c.listeners.dns == Some(addr("127.0.0.1:16053")),
        ),
        (&["--config", "a.yaml"], &[("LOCAL_XDS_PATH", "b.yaml")], |c| {
            c.local_config == Some(LocalConfigSource::File("a.yaml".into()))
        }),
        // The flag also wins over inline YAML, without a conflict.
        (
            &["--config", "a.yaml"],
            &[("LOCAL_XDS_PATH", "b.yaml"), ("LOCAL_XDS", "{}")],
            |c| c.local_config == Some(LocalConfigSource::File("a.yaml".into())),
        ),
        (&["--mode", "shared"], &[("PROXY_MODE", "dedicated")], |c| {
            matches!(c.mode, ProxyMode::Shared { .. })
        }),
        (
            &["--workload", "a/b/c"],
            &[("PROXY_MODE", "dedicated"), ("PROXY_WORKLOAD_INFO", "x/y/z")],
            |c| matches!(&c.mode, ProxyMode::Dedicated { workload } if workload.to_string() == "a/b/c"),
        ),
        (&["--node-name", "n1"], &[("NODE_NAME", "n2")], |c| {
            c.mode
                == ProxyMode::Shared {
                    node: Some("n1".into()),
                }
        }),
        (
            &["--cluster-id", "c1"],
            &[("ISTIO_META_CLUSTER_ID", "c2"), ("CLUSTER_ID", "c3")],
            |c| c.cluster_id == "c1",
        ),
        (
            &["--trust-domain", "a.example"],
            &[("TRUST_DOMAIN", "b.example")],
            |c| c.trust_domain.to_string() == "a.example",
        ),
        (&["--network", ""], &[("NETWORK", "net-2")], |c| c.network.is_empty()),
        (&["--state-dir", "/a"], &[("MESHWIRE_STATE_DIR", "/b")], |c| {
            c.state_dir == Path::new("/a")
        }),
        (
            &["--drain-deadline", "500ms"],
            &[("CONNECTION_TERMINATION_DEADLINE", "30s")],
            |c| c.drain_deadline == Duration::from_millis(500),
        ),
        (
            &["--drain-deadline", "1m"],
            &[("TERMINATION_GRACE_PERIOD_SECONDS", "30")],
            |c| c.drain_deadline == Duration::from_secs(60),
        ),
        (&["--worker-threads", "3"], &[("ZTUNNEL_WORKER_THREADS", "8")], |c| {
            c.worker_threads == 3
        }),
        (
            &["--http2-stream-window", "65536", "--http2-connection-window", "262144"],
            &[("HTTP2_STREAM_WINDOW_SIZE", "1"), ("HTTP2_CONNECTION_WINDOW_SIZE", "1")],
            |c| c.http2().stream_window() == 65536 && c.http2().connection_window() == 262_144,
        ),
        (
            &["--http2-frame-size", "16384"],
            &[("HTTP2_FRAME_SIZE", "65536")],
            |c| c.http2().max_frame_size() == 16384,
        ),
        (
            &[
                "--pool-max-streams-per-connection",
                "7",
                "--pool-unused-release-timeout",
                "1m30s",
            ],
            &[
                ("POOL_MAX_STREAMS_PER_CONNECTION", "9"),
                ("POOL_UNUSED_RELEASE_TIMEOUT", "1s"),
            ],
            |c| c.pool.max_streams_per_connection == 7 && c.pool.idle_timeout == Duration::from_secs(90),
        ),
        (&["--log-format", "json"], &[("LOG_FORMAT", "text")], |c| {
            c.log_format == LogFormat::Json
        }),
        (&["--log-level", "debug"], &[("RUST_LOG", "warn")], |c| {
            c.log_level == "debug"
        }),
        // A bare boolean flag means true.
        (&["--socks5"], &[("UNSTABLE_ENABLE_SOCKS5", "false")], |c| {
            c.listeners.socks5.is_some()
        }),
        (&["--dns-proxy=false"], &[("ISTIO_META_DNS_CAPTURE", "true")], |c| {
            c.listeners.dns.is_none()
        }),
        (&["--ipv6", "true"], &[("IPV6_ENABLED", "false")], |c| {
            c.listeners.inbound == addr("[::]:15008")
        }),
        (
            &["--bind-address", "127.0.0.2"],
            &[("MESHWIRE_BIND_ADDRESS", "127.0.0.3")],
            |c| c.listeners.inbound == addr("127.0.0.2:15008"),
        ),
        (&["--cert-ttl", "1h"], &[("SECRET_TTL", "2h")], |c| {
            c.cert_ttl == Duration::from_secs(3600)
        }),
        (&["--instance-ip", "::1"], &[("INSTANCE_IP", "10.0.0.1")], |c| {
            c.instance_ip == Some("::1".parse().unwrap())
        }),
        // Flags and variables mix: the chain from a flag, the rest from variables.
        (
            &["--cert-chain", "c.pem"],
            &[
                ("MESHWIRE_CERT_CHAIN", "x.pem"),
                ("MESHWIRE_CERT_KEY", "k.pem"),
                ("MESHWIRE_TRUST_BUNDLE", "b.pem"),
            ],
            |c| matches!(&c.certificates, CertificateSource::Files { chain, .. } if chain == &PathBuf::from("c.pem")),
        ),
    ];
    for (args, env, check) in cases {
        let config = ok(args, env);
        assert!(check(&config), "{args:?} {env:?} gave {config:#?}");
    }
}

#[test]
fn invalid_values_name_their_flag_or_variable_and_the_value() {
    type Case = (
        &'static [&'static str],
        &'static [(&'static str, &'static str)],
        &'static [&'static str],
    );
    let cases: &[Case] = &[
        (
            &["--inbound-port", "0"],
            &[],
            &["--inbound-port", "\"0\"", "between 1 and 65535"],
        ),
        (
            &[],
            &[("MESHWIRE_OUTBOUND_PORT", "70000")],
            &["MESHWIRE_OUTBOUND_PORT", "70000"],
        ),
        (&["--admin-port", "abc"], &[], &["--admin-port", "abc"]),
        (
            &[],
            &[("MESHWIRE_XDS_PRIORITY", "realtime")],
            &["MESHWIRE_XDS_PRIORITY", "realtime", "expected idle or normal"],
        ),
        (
            &[],
            &[("MESHWIRE_XDS_CPU_SHARE", "0")],
            &["MESHWIRE_XDS_CPU_SHARE", "0 is not between 0.05 and 1"],
        ),
        (
            &["--xds-cpu-share", "half"],
            &[],
            &["--xds-cpu-share", "half", "expected a share of one CPU"],
        ),
        (
            &[],
            &[("PROXY_CONFIG", "proxyAdminPort: abc")],
            &["PROXY_CONFIG field proxyAdminPort", "abc"],
        ),
        (
            &["--metrics-port", "15008"],
            &[],
            &["port 15008", "--inbound-port (default)", "--metrics-port"],
        ),
        (
            &[],
            &[("MESHWIRE_DNS_PORT", "15000")],
            &["port 15000", "MESHWIRE_DNS_PORT", "--admin-port"],
        ),
        (
            &["--admin-port", "16000"],
            &[("UNSTABLE_ENABLE_SOCKS5", "true"), ("MESHWIRE_SOCKS5_PORT", "16000")],
            &["port 16000", "--admin-port", "MESHWIRE_SOCKS5_PORT"],
        ),
        (
            &[],
            &[("ISTIO_META_DNS_PROXY_ADDR", "localhost:15001")],
            &["port 15001", "ISTIO_META_DNS_PROXY_ADDR"],
        ),
        (
            &[],
            &[("ISTIO_META_DNS_PROXY_ADDR", "nowhere")],
            &["ISTIO_META_DNS_PROXY_ADDR", "nowhere"],
        ),
        (
            &[],
            &[("ISTIO_META_DNS_PROXY_ADDR", "localhost:0")],
            &["ISTIO_META_DNS_PROXY_ADDR", "localhost:0"],
        ),
        (&["--drain-deadline", "5x"], &[], &["--drain-deadline", "5x", "unit"]),
        (&["--packet-mark=-1"], &[], &["--packet-mark", "\"-1\"", "0xffffffff"]),
        (
            &[],
            &[("PACKET_MARK", "0x1_0000_0000")],
            &["PACKET_MARK", "0x1_0000_0000"],
        ),
        (&[], &[("PACKET_MARK", "mark")], &["PACKET_MARK", "mark"]),
        (
            &["--connection-balance", "random"],
            &[],
            &["--connection-balance", "random", "round-robin"],
        ),
        (&["--drain-deadline=-1s"], &[], &["--drain-deadline", "-1s"]),
        (
            &[],
            &[("CONNECTION_TERMINATION_DEADLINE", "soon")],
            &["CONNECTION_TERMINATION_DEADLINE", "soon"],
        ),
        (
            &[],
            &[("TERMINATION_GRACE_PERIOD_SECONDS", "30s")],
            &["TERMINATION_GRACE_PERIOD_SECONDS", "30s"],
        ),
        (
            &[],
            &[("POOL_UNUSED_RELEASE_TIMEOUT", "forever")],
            &["POOL_UNUSED_RELEASE_TIMEOUT", "forever"],
        ),
        (&[], &[("SECRET_TTL", "0s")], &["SECRET_TTL", "0s", "at least 60s"]),
        (&["--cert-ttl", "30s"], &[], &["--cert-ttl", "30s", "at least 60s"]),
        (
            &[],
            &[("PROXY_MODE", "sidecar")],
            &["PROXY_MODE", "sidecar", "shared or dedicated"],
        ),
        (
            &[],
            &[("PROXY_MODE", "dedicated")],
            &["PROXY_MODE", "PROXY_WORKLOAD_INFO", "--workload"],
        ),
        (&["--mode", "dedicated"], &[], &["--mode", "PROXY_WORKLOAD_INFO"]),
        (
            &[],
            &[("PROXY_WORKLOAD_INFO", "ns/name")],
            &["PROXY_WORKLOAD_INFO", "ns/name", "namespace/name/service-account"],
        ),
        (&["--workload", "a/b/c/d"], &[], &["--workload", "a/b/c/d", "4 part"]),
        (
            &[],
            &[("PROXY_WORKLOAD_INFO", "ns//sa")],
            &["PROXY_WORKLOAD_INFO", "ns//sa", "name is empty"],
        ),
        (
            &[],
            &[("PROXY_WORKLOAD_INFO", "bad ns/pod/sa")],
            &["PROXY_WORKLOAD_INFO", "bad ns/pod/sa", "namespace"],
        ),
        (
            &["--mode", "shared", "--workload", "a/b/c"],
            &[],
            &["--workload", "--mode", "only served in dedicated mode"],
        ),
        (
            &[],
            &[("HTTP2_STREAM_WINDOW_SIZE", "8388608")],
            &[
                "HTTP2_STREAM_WINDOW_SIZE",
                "--http2-connection-window (default)",
                "8388608",
            ],
        ),
        (
            &[],
            &[("HTTP2_FRAME_SIZE", "1000")],
            &["HTTP2_FRAME_SIZE", "max_frame_size = 1000"],
        ),
        (
            &["--http2-stream-window", "0"],
            &[],
            &["--http2-stream-window", "stream_window = 0"],
        ),
        (
            &[],
            &[("HTTP2_CONNECTION_WINDOW_SIZE", "big")],
            &["HTTP2_CONNECTION_WINDOW_SIZE", "big"],
        ),
        (
            &[],
            &[("HTTP2_STREAM_WINDOW_SIZE", "4294967296")],
            &["HTTP2_STREAM_WINDOW_SIZE", "4294967296"],
        ),
        (
            &["--worker-threads", "0"],
            &[],
            &["--worker-threads", "\"0\"", "at least 1"],
        ),
        (
            &[],
            &[("ZTUNNEL_WORKER_THREADS", "0%")],
            &["ZTUNNEL_WORKER_THREADS", "0%"],
        ),
        (
            &[],
            &[("ZTUNNEL_WORKER_THREADS", "150%")],
            &["ZTUNNEL_WORKER_THREADS", "150%"],
        ),
        (
            &[],
            &[("ZTUNNEL_WORKER_THREADS", "NaN%")],
            &["ZTUNNEL_WORKER_THREADS", "NaN%"],
        ),
        (
            &[],
            &[("ZTUNNEL_WORKER_THREADS", "many")],
            &["ZTUNNEL_WORKER_THREADS", "many"],
        ),
        (
            &[],
            &[("ZTUNNEL_WORKER_THREADS", "50%"), ("ZTUNNEL_CPU_LIMIT", "lots")],
            &["ZTUNNEL_CPU_LIMIT", "lots"],
        ),
        (
            &[],
            &[("PROXY_CONFIG", "concurrency: 0")],
            &["PROXY_CONFIG field concurrency", "\"0\""],
        ),
        (
            &[],
            &[("POOL_MAX_STREAMS_PER_CONNECTION", "0")],
            &["POOL_MAX_STREAMS_PER_CONNECTION", "\"0\""],
        ),
        (&["--log-format", "xml"], &[], &["--log-format", "xml", "text or json"]),
        (&[], &[("LOG_FORMAT", "yaml")], &["LOG_FORMAT", "yaml"]),
        (&["--log-level", " "], &[], &["--log-level", "empty"]),
        (&["--cluster-id", ""], &[], &["--cluster-id", "empty"]),
        (
            &["--trust-domain", "Not A Domain"],
            &[],
            &["--trust-domain", "Not A Domain"],
        ),
        (&["--bind-address", "1.2.3"], &[], &["--bind-address", "1.2.3"]),
        (
            &[],
            &[("MESHWIRE_ADMIN_ADDRESS", "localhost")],
            &["MESHWIRE_ADMIN_ADDRESS", "localhost"],
        ),
        (&[], &[("INSTANCE_IP", "nope")], &["INSTANCE_IP", "nope"]),
        (&[], &[("IPV6_ENABLED", "maybe")], &["IPV6_ENABLED", "maybe"]),
        (
            &[],
            &[("UNSTABLE_ENABLE_SOCKS5", "2")],
            &["UNSTABLE_ENABLE_SOCKS5", "\"2\""],
        ),
        (&["--dns-proxy=perhaps"], &[], &["--dns-proxy", "perhaps"]),
        (
            &[],
            &[("LOCAL_XDS_PATH", "a.yaml"), ("LOCAL_XDS", "{}")],
            &["LOCAL_XDS_PATH", "LOCAL_XDS", "only one local configuration"],
        ),
        (&["--cert-chain", "a.pem"], &[], &["--cert-chain", "--cert-key"]),
        (
            &[],
            &[("MESHWIRE_CERT_KEY", "k.pem")],
            &["MESHWIRE_CERT_KEY", "--cert-chain"],
        ),
        (
            &["--cert-chain", "c", "--cert-key", "k", "--trust-bundle", "b"],
            &[("FAKE_CA", "true")],
            &["FAKE_CA", "--cert-chain"],
        ),
        (&[], &[("FAKE_CA", "banana")], &["FAKE_CA", "banana"]),
        (
            &[],
            &[("PROXY_CONFIG", "[1, 2]")],
            &["PROXY_CONFIG", "[1, 2]", "mapping"],
        ),
        (&[], &[("PROXY_CONFIG", "{")], &["PROXY_CONFIG", "{"]),
        (
            &[],
            &[("PROXY_CONFIG", "proxyMetadata: 7")],
            &["PROXY_CONFIG", "proxyMetadata"],
        ),
        // The command line itself: clap's messages name the flag.
        (&["--inbound-prot", "1"], &[], &["--inbound-prot"]),
        (&["--inbound-port"], &[], &["--inbound-port"]),
        (
            &["--inbound-port", "1", "--inbound-port", "2"],
            &[],
            &["--inbound-port"],
        ),
    ];
    for (args, env, expected) in cases {
        let err = err(args, env);
        let message = err.to_string();
        for part in *expected {
            assert!(
                message.contains(part),
                "{args:?} {env:?}: {message:?} does not name {part:?}"
            );
        }
        assert!(!err.is_help(), "{message}");
    }
}

#[test]
fn errors_carry_their_origin() {
    assert_eq!(
        err(&[], &[("MESHWIRE_INBOUND_PORT", "x")]),
        Error::Invalid {
            origin: Origin::Env("MESHWIRE_INBOUND_PORT"),
            value: "x".into(),
            reason: "expected a port number between 1 and 65535".into(),
        }
    );
    assert_eq!(
        err(&["--readiness-port", "15000"], &[]),
        Error::DuplicatePort {
            port: 15000,
            first: Origin::Flag("--readiness-port"),
            second: Origin::Default("--admin-port"),
        }
    );
    assert!(matches!(
        err(&[], &[("PROXY_MODE", "dedicated")]),
        Error::MissingWorkload {
            mode: Origin::Env("PROXY_MODE")
        }
    ));
    assert!(matches!(
        err(&[], &[("HTTP2_STREAM_WINDOW_SIZE", "8388608")]),
        Error::Http2 { origins, .. } if origins == vec![
            Origin::Default("--http2-connection-window"),
            Origin::Env("HTTP2_STREAM_WINDOW_SIZE"),
        ]
    ));
}

#[test]
fn a_disabled_listener_frees_its_port() {
    let config = ok(&["--socks5=false", "--admin-port", "15080"], &[]);
    assert_eq!(config.listeners.admin.port(), 15080);
    assert_eq!(config.listeners.get(Listener::Socks5), None);
    let config = ok(&["--dns-proxy", "false", "--metrics-port", "15053"], &[]);
    assert_eq!(config.listeners.metrics.port(), 15053);
}

#[test]
fn durations_in_every_form() {
    for (input, expected) in [
        ("5s", Duration::from_secs(5)),
        ("500ms", Duration::from_millis(500)),
        ("1m", Duration::from_secs(60)),
        ("1m30s", Duration::from_secs(90)),
        ("1.5s", Duration::from_millis(1500)),
        ("10", Duration::from_secs(10)),
        ("0s", Duration::ZERO),
        ("2h", Duration::from_secs(7200)),
        ("250us", Duration::from_micros(250)),
    ] {
        assert_eq!(
            ok(&["--drain-deadline", input], &[]).drain_deadline,
            expected,
            "{input}"
        );
    }
}

#[test]
fn help_renders_and_lists_every_port_flag() {
    let help = help();
    assert!(help.contains("Usage: ztunnel"), "{help}");
    for listener in Listener::ALL {
        let flag = listener.port_flag();
        assert!(help.contains(flag), "{flag} missing from --help:\n{help}");
        assert!(
            help.contains(&format!("[default: {}]", listener.default_port())),
            "{listener}'s default is missing from --help"
        );
    }
    for flag in [
        "--config",
        "--state-dir",
        "--mode",
        "--workload",
        "--drain-deadline",
        "--log-format",
        "--log-level",
        "--worker-threads",
        "--bind-address",
        "--admin-address",
        "--socks5-address",
        "--http2-stream-window",
        "--pool-max-streams-per-connection",
        "--cert-chain",
    ] {
        assert!(help.contains(flag), "{flag} missing from --help");
    }
    for var in [
        "LOCAL_XDS_PATH",
        "PROXY_MODE",
        "PROXY_WORKLOAD_INFO",
        "CLUSTER_ID",
        "NODE_NAME",
        "HTTP2_STREAM_WINDOW_SIZE",
        "POOL_MAX_STREAMS_PER_CONNECTION",
        "ZTUNNEL_WORKER_THREADS",
        "CONNECTION_TERMINATION_DEADLINE",
        "MESHWIRE_INBOUND_PORT",
    ] {
        assert!(help.contains(var), "{var} missing from --help");
    }
    let short = err(&["-h"], &[]);
    assert!(short.is_help() && short.to_string().contains("--inbound-port"));
    // The command definition is usable on its own (man pages, completions).
    let long = Config::command().render_long_help().to_string();
    assert!(long.contains("--metrics-port"));
}

#[test]
fn hand_built_configurations_are_validated() {
    let mut config = Config::default();
    config.listeners.admin = addr("127.0.0.1:15008");
    let err = config.validate().unwrap_err();
    assert!(err.to_string().contains("--inbound-port and --admin-port"), "{err}");

    let mut config = Config::default();
    config.listeners.metrics = addr("[::]:0");
    assert!(config.validate().unwrap_err().to_string().contains("--metrics-port"));

    // HTTP/2 settings are valid by construction; budgets are checked against them.
    let mut config = Config::default();
    config.buffers.connection = 1;
    let err = config.validate().unwrap_err();
    assert!(err.to_string().contains("--hbone-connection-buffer"), "{err}");

    let mut config = Config::default();
    config.worker_threads = 0;
    assert!(config.validate().unwrap_err().to_string().contains("--worker-threads"));
}

#[test]
fn files_are_checked_separately() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("local.yaml");
    std::fs::write(&file, "workloads: []\n").unwrap();
    let missing = dir.path().join("missing.yaml");
    let file_s = file.to_str().unwrap();
    let missing_s = missing.to_str().unwrap();
    let dir_s = dir.path().to_str().unwrap();

    // Parsing does not look at the filesystem.
    let config = ok(&["--config", missing_s], &[]);
    let err = config.check_files().unwrap_err();
    assert!(matches!(err, Error::File { flag: "--config", .. }), "{err:?}");
    assert!(err.to_string().contains(missing_s), "{err}");

    assert_eq!(ok(&["--config", file_s], &[]).check_files(), Ok(()));
    assert_eq!(ok(&[], &[("LOCAL_XDS", "{}")]).check_files(), Ok(()));
    assert_eq!(ok(&[], &[]).check_files(), Ok(()));

    let err = ok(&["--config", dir_s], &[]).check_files().unwrap_err();
    assert!(err.to_string().contains("not a regular file"), "{err}");

    let certs = [
        "--cert-chain",
        file_s,
        "--cert-key",
        file_s,
        "--trust-bundle",
        missing_s,
    ];
    let err = ok(&certs, &[]).check_files().unwrap_err();
    assert!(
        matches!(
            err,
            Error::File {
                flag: "--trust-bundle",
                ..
            }
        ),
        "{err:?}"
    );
}

#[test]
fn local_proxy_follows_the_configuration() {
    let config = ok(
        &["--node-name", "node-a", "--inbound-port", "16008", "--socks5=false"],
        &[("NETWORK", "n1"), ("INSTANCE_IP", "10.1.2.3")],
    );
    let proxy = config.local_proxy();
    assert_eq!(proxy.node.as_deref(), Some("node-a"));
    assert_eq!(proxy.network, "n1");
    assert_eq!(proxy.addresses, vec![IpAddr::V4(Ipv4Addr::new(10, 1, 2, 3))]);
    assert_eq!(proxy.hbone_port, 16008);
    assert!(proxy.ports.contains(&16008) && !proxy.ports.contains(&15008) && !proxy.ports.contains(&15080));

    let dedicated = ok(&["--workload", "ns/pod/sa", "--node-name", "node-a"], &[]);
    assert_eq!(dedicated.local_proxy().node, None);
    let ProxyMode::Dedicated { workload } = &dedicated.mode else {
        panic!("dedicated")
    };
    assert_eq!(
        workload.identity(&dedicated.trust_domain).unwrap().to_string(),
        "spiffe://cluster.local/ns/ns/sa/sa"
    );
}

/// Flags, values and variables the property tests draw from, so that they reach past clap's checks.
const FLAGS: &[&str] = &[
    "--config",
    "--mode",
    "--workload",
    "--inbound-port",
    "--admin-port",
    "--metrics-port",
    "--socks5",
    "--dns-proxy",
    "--drain-deadline",
    "--worker-threads",
    "--http2-stream-window",
    "--http2-connection-window",
    "--http2-frame-size",
    "--cert-chain",
    "--trust-domain",
    "--bind-address",
    "--log-format",
    "--help",
    "-h",
    "--version",
    "proxy",
    "version",
    "--",
    "-",
];
const VALUES: &[&str] = &[
    "0",
    "1",
    "15008",
    "65535",
    "65536",
    "dedicated",
    "shared",
    "a/b/c",
    "a/b",
    "5s",
    "1.5h",
    "9999999999999999999999d",
    "50%",
    "0%",
    "true",
    "false",
    "::",
    "json",
    "",
    "µs",
    ".",
];
const VARS: &[&str] = &[
    "PROXY_MODE",
    "PROXY_WORKLOAD_INFO",
    "MESHWIRE_INBOUND_PORT",
    "ZTUNNEL_WORKER_THREADS",
    "ZTUNNEL_CPU_LIMIT",
    "TERMINATION_GRACE_PERIOD_SECONDS",
    "CONNECTION_TERMINATION_DEADLINE",
    "HTTP2_STREAM_WINDOW_SIZE",
    "ISTIO_META_DNS_PROXY_ADDR",
    "PROXY_CONFIG",
    "LOCAL_XDS",
    "LOCAL_XDS_PATH",
    "STATE_DIRECTORY",
    "MESHWIRE_CERT_KEY",
];

fn arg() -> impl Strategy<Value = String> {
    prop_oneof![
        prop::sample::select(FLAGS).prop_map(str::to_owned),
        prop::sample::select(VALUES).prop_map(str::to_owned),
        (prop::sample::select(FLAGS), prop::sample::select(VALUES)).prop_map(|(f, v)| format!("{f}={v}")),
        "--[a-z0-9-]{0,24}",
        "[0-9.%a-zµ:/-]{0,12}",
        any::<String>(),
    ]
}

fn check(args: Vec<OsString>, env: HashMap<&'static str, String>) -> Result<(), TestCaseError> {
    let argv = std::iter::once(OsString::from("ztunnel")).chain(args);
    if let Ok(config) = Config::from_args_and_env(argv, &|name| env.get(name).cloned()) {
        // Whatever is accepted is valid.
        prop_assert_eq!(config.validate(), Ok(()));
        prop_assert!(config.worker_threads >= 1);
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn arbitrary_arguments_never_panic(
        args in prop::collection::vec(arg(), 0..10),
        env in prop::collection::hash_map(
            prop::sample::select(VARS),
            prop_oneof![prop::sample::select(VALUES).prop_map(str::to_owned), any::<String>()],
            0..4,
        ),
    ) {
        check(args.into_iter().map(OsString::from).collect(), env)?;
    }

    #[test]
    fn arguments_that_are_not_utf8_never_panic(
        args in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..16), 0..6),
    ) {
        use std::os::unix::ffi::OsStringExt;
        check(args.into_iter().map(OsString::from_vec).collect(), HashMap::new())?;
    }
}
