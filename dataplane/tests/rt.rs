//! The runtime seam on real loopback sockets: the socket factory's options (reuse-port, source
//! binds, `TCP_NODELAY`, `SO_MARK`, `IP_TRANSPARENT`, device binding), `SO_ORIGINAL_DST`, and the
//! tokio timer, executor and HBONE connector.
#![allow(clippy::unwrap_used)]

use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use meshwire_dataplane::rt::socket::{
    DefaultSocketFactory, SocketError, SocketFactory, SocketOp, SocketOption, SocketOptions, SocketTarget,
    SourceTransparency, original_destination,
};
use meshwire_dataplane::rt::tokio::{
    ConnectorConfig, TokioConnector, TokioExecutor, TokioTimer, bind_listener, connect, into_listener,
};
use meshwire_hbone::ConnectError;
use meshwire_hbone::pool::PoolKey;
use meshwire_hbone::rt::{Executor, Timer};
use meshwire_testkit::pki::{CLIENT, SERVER, id};
use socket2::SockRef;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot};

const LOCALHOST: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);
/// Also loopback (127.0.0.0/8), but not the address the servers listen on.
const SECOND_LOOPBACK: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));
/// TEST-NET-2: not an address of this host.
const NOT_LOCAL: IpAddr = IpAddr::V4(Ipv4Addr::new(198, 51, 100, 7));
const TIMEOUT: Duration = Duration::from_secs(5);

fn any_port(ip: IpAddr) -> SocketAddr {
    SocketAddr::new(ip, 0)
}

fn local_addr(socket: &socket2::Socket) -> SocketAddr {
    socket.local_addr().unwrap().as_socket().unwrap()
}

/// The [`SocketError`] inside `e`, after checking that its message is the context's.
fn context(e: &io::Error) -> &SocketError {
    let ctx = SocketError::find(e).unwrap_or_else(|| panic!("no socket context in {e:?}"));
    assert_eq!(e.to_string(), ctx.to_string());
    ctx
}

/// A loopback listener whose accepted connections are reported with the peer's address.
async fn reporting_server() -> (SocketAddr, mpsc::UnboundedReceiver<(tokio::net::TcpStream, SocketAddr)>) {
    let listener = TcpListener::bind(any_port(LOCALHOST)).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok(accepted) = listener.accept().await {
            if tx.send(accepted).is_err() {
                return;
            }
        }
    });
    (addr, rx)
}

fn key(destination: SocketAddr, source_ip: Option<IpAddr>) -> PoolKey {
    PoolKey::new(id(CLIENT), vec![id(SERVER)], destination, source_ip)
}

#[tokio::test]
async fn reuse_port_listeners_share_a_port_and_both_accept() {
    let opts = SocketOptions {
        reuse_port: true,
        ..SocketOptions::default()
    };
    let first = bind_listener(&DefaultSocketFactory, any_port(LOCALHOST), &opts).unwrap();
    let addr = first.local_addr().unwrap();
    let second = bind_listener(&DefaultSocketFactory, addr, &opts).unwrap();
    assert_eq!(second.local_addr().unwrap(), addr);

    let (tx, mut rx) = mpsc::unbounded_channel();
    let mut accept_loops = Vec::new();
    for (index, listener) in [first, second].into_iter().enumerate() {
        let tx = tx.clone();
        accept_loops.push(tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                tx.send((index, stream)).unwrap();
            }
        }));
    }

    // The kernel picks a listener by a hash of the connection's addresses: with 64 connections
    // from distinct ports, one listener getting all of them has a chance of 2^-63. Another round
    // is tried rather than failing on that chance.
    let mut accepted = [0usize; 2];
    let mut held = Vec::new();
    for _round in 0..4 {
        for _ in 0..64 {
            held.push(tokio::net::TcpStream::connect(addr).await.unwrap());
            let (index, stream) = tokio::time::timeout(TIMEOUT, rx.recv()).await.unwrap().unwrap();
            accepted[index] += 1;
            held.push(stream);
        }
        if accepted.iter().all(|&n| n > 0) {
            break;
        }
    }
    assert!(
        accepted.iter().all(|&n| n > 0),
        "connections per listener: {accepted:?}"
    );

    // With one listener closed, the other takes every new connection.
    let first_loop = accept_loops.remove(0);
    first_loop.abort();
    assert!(
        first_loop.await.unwrap_err().is_cancelled(),
        "the first listener is closed"
    );
    for _ in 0..16 {
        let _client = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (index, _) = tokio::time::timeout(TIMEOUT, rx.recv()).await.unwrap().unwrap();
        assert_eq!(index, 1);
    }
}

#[tokio::test]
async fn a_used_port_without_reuse_port_is_refused_naming_the_address() {
    let reuse = SocketOptions {
        reuse_port: true,
        ..SocketOptions::default()
    };
    let first = DefaultSocketFactory.listener(any_port(LOCALHOST), &reuse).unwrap();
    let addr = local_addr(&first);

    for opts in [
        SocketOptions::default(),
        SocketOptions {
            reuse_address: false,
            ..SocketOptions::default()
        },
    ] {
        let e = DefaultSocketFactory.listener(addr, &opts).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::AddrInUse);
        let ctx = context(&e);
        assert_eq!(ctx.op, SocketOp::Bind);
        assert_eq!(ctx.target, SocketTarget::Listener(addr));
        assert_eq!(e.to_string(), format!("binding listener {addr}: {}", ctx.source));
        assert!(e.to_string().contains(&addr.to_string()), "{e}");
    }
}

#[tokio::test]
async fn a_stream_bound_to_a_source_address_connects_from_it_with_nodelay() {
    let (server, mut accepted) = reporting_server().await;

    let socket = DefaultSocketFactory
        .stream(server, Some(any_port(SECOND_LOOPBACK)), &SocketOptions::default())
        .unwrap();
    assert_eq!(local_addr(&socket).ip(), SECOND_LOOPBACK);
    let stream = connect(socket, server, TIMEOUT).await.unwrap();
    assert_eq!(stream.local_addr().unwrap().ip(), SECOND_LOOPBACK);
    assert_eq!(stream.peer_addr().unwrap(), server);
    assert!(stream.nodelay().unwrap(), "TCP_NODELAY is on by default");

    let (_, seen) = accepted.recv().await.unwrap();
    assert_eq!(seen, stream.local_addr().unwrap(), "the server sees the chosen source");

    // Off when asked.
    let opts = SocketOptions {
        nodelay: false,
        ..SocketOptions::default()
    };
    let stream = connect(
        DefaultSocketFactory.stream(server, None, &opts).unwrap(),
        server,
        TIMEOUT,
    )
    .await
    .unwrap();
    assert!(!stream.nodelay().unwrap());
}

#[tokio::test]
async fn a_source_of_another_family_is_refused() {
    let e = DefaultSocketFactory
        .stream(
            "[::1]:15008".parse().unwrap(),
            Some(any_port(LOCALHOST)),
            &SocketOptions::default(),
        )
        .unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
    assert_eq!(
        e.to_string(),
        "binding 127.0.0.1:0 for a connection to [::1]:15008: source and destination families differ"
    );
}

#[tokio::test]
async fn so_mark_is_set_on_listeners_and_streams() {
    let opts = SocketOptions {
        mark: Some(0x539),
        ..SocketOptions::default()
    };
    match DefaultSocketFactory.listener(any_port(LOCALHOST), &opts) {
        Ok(listener) => {
            assert_eq!(listener.mark().unwrap(), 0x539);
            let addr = local_addr(&listener);
            let _listener = into_listener(listener).unwrap();
            let socket = DefaultSocketFactory.stream(addr, None, &opts).unwrap();
            let stream = connect(socket, addr, TIMEOUT).await.unwrap();
            assert_eq!(SockRef::from(&stream).mark().unwrap(), 0x539);
        }
        // Without CAP_NET_ADMIN.
        Err(e) => {
            assert_eq!(e.kind(), io::ErrorKind::PermissionDenied, "{e}");
            assert_eq!(context(&e).op, SocketOp::Set(SocketOption::Mark));
            assert!(
                e.to_string().starts_with("setting SO_MARK on listener 127.0.0.1:0: "),
                "{e}"
            );
        }
    }
}

#[tokio::test]
async fn ip_transparent_binds_addresses_that_are_not_local() {
    let addr = SocketAddr::new(NOT_LOCAL, 15001);

    // Without IP_TRANSPARENT the kernel refuses an address of another host.
    let e = DefaultSocketFactory
        .listener(addr, &SocketOptions::default())
        .unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::AddrNotAvailable);
    assert!(
        e.to_string().starts_with("binding listener 198.51.100.7:15001: "),
        "{e}"
    );

    let transparent = SocketOptions {
        transparent: true,
        ..SocketOptions::default()
    };
    match DefaultSocketFactory.listener(addr, &transparent) {
        Ok(listener) => {
            assert!(listener.ip_transparent_v4().unwrap());
            assert_eq!(local_addr(&listener), addr);
        }
        // Without CAP_NET_ADMIN.
        Err(e) => {
            assert_eq!(context(&e).op, SocketOp::Set(SocketOption::Transparent));
            assert!(
                e.to_string()
                    .starts_with("setting IP_TRANSPARENT on listener 198.51.100.7:15001: ")
            );
        }
    }
}

#[tokio::test]
async fn a_source_ip_is_bound_transparently_only_when_not_local() {
    let peer: SocketAddr = "127.0.0.1:15008".parse().unwrap();
    let opts = SocketOptions::default();
    let f = DefaultSocketFactory;

    // A local source needs no IP_TRANSPARENT.
    let local = f
        .stream_from(peer, Some(SECOND_LOOPBACK), &opts, SourceTransparency::IfNotLocal)
        .unwrap();
    assert_eq!(local_addr(&local).ip(), SECOND_LOOPBACK);
    assert!(!local.ip_transparent_v4().unwrap());

    // A foreign one is retried with it.
    match f.stream_from(peer, Some(NOT_LOCAL), &opts, SourceTransparency::IfNotLocal) {
        Ok(foreign) => {
            assert_eq!(local_addr(&foreign).ip(), NOT_LOCAL);
            assert!(foreign.ip_transparent_v4().unwrap());
        }
        Err(e) => assert_eq!(context(&e).op, SocketOp::Set(SocketOption::Transparent), "{e}"),
    }

    // Never: the bind fails, naming the address.
    let e = f
        .stream_from(peer, Some(NOT_LOCAL), &opts, SourceTransparency::Never)
        .unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::AddrNotAvailable);
    assert!(
        e.to_string()
            .starts_with("binding 198.51.100.7:0 for a connection to 127.0.0.1:15008: "),
        "{e}"
    );

    // Always: set even for a local source.
    if let Ok(s) = f.stream_from(peer, Some(SECOND_LOOPBACK), &opts, SourceTransparency::Always) {
        assert!(s.ip_transparent_v4().unwrap());
    }
}

#[tokio::test]
async fn a_failing_option_is_named_with_the_socket() {
    let opts = SocketOptions {
        bind_device: Some("nosuchdev0".into()),
        ..SocketOptions::default()
    };
    let e = DefaultSocketFactory
        .stream("127.0.0.1:15008".parse().unwrap(), None, &opts)
        .unwrap_err();
    let ctx = context(&e);
    assert_eq!(ctx.op, SocketOp::Set(SocketOption::BindDevice));
    assert!(
        e.to_string()
            .starts_with("setting SO_BINDTODEVICE on connection to 127.0.0.1:15008: "),
        "{e}"
    );

    // The form of a permission failure, as an unprivileged proxy would report it.
    let e = SocketError::io(
        SocketOp::Set(SocketOption::Transparent),
        SocketTarget::Listener("10.0.0.5:15001".parse().unwrap()),
        io::Error::from_raw_os_error(1),
    );
    assert_eq!(e.kind(), io::ErrorKind::PermissionDenied);
    assert_eq!(
        e.to_string(),
        "setting IP_TRANSPARENT on listener 10.0.0.5:15001: Operation not permitted (os error 1)"
    );
}

#[tokio::test]
async fn other_options_are_applied() {
    let opts = SocketOptions {
        keepalive: Some(Duration::from_secs(42)),
        v6_only: Some(true),
        bind_device: Some("lo".into()),
        ..SocketOptions::default()
    };
    let s = DefaultSocketFactory
        .stream("[::1]:15008".parse().unwrap(), None, &opts)
        .unwrap();
    assert!(s.keepalive().unwrap());
    assert_eq!(s.tcp_keepalive_time().unwrap(), Duration::from_secs(42));
    assert_eq!(s.tcp_keepalive_interval().unwrap(), Duration::from_secs(42));
    assert!(s.only_v6().unwrap());
    assert_eq!(s.device().unwrap().as_deref(), Some(&b"lo"[..]));
    assert!(s.reuse_address().unwrap());
    assert!(!s.reuse_port().unwrap());
    assert!(s.nonblocking().unwrap());
}

/// Without an iptables REDIRECT there is no original destination to read. What the kernel
/// answers depends on connection tracking: when it tracked the connection, `SO_ORIGINAL_DST`
/// is the connection's own local address; otherwise it is an error (`ENOENT`, or `ENOPROTOOPT`
/// when connection tracking is not loaded), reported naming the option and the connection.
#[tokio::test]
async fn original_destination_of_a_connection_that_was_not_redirected() {
    let (server, mut accepted) = reporting_server().await;
    let client = tokio::net::TcpStream::connect(server).await.unwrap();
    let (stream, peer) = accepted.recv().await.unwrap();
    assert_eq!(peer, client.local_addr().unwrap());

    match original_destination(&stream) {
        Ok(addr) => {
            eprintln!("SO_ORIGINAL_DST of a plain connection: its local address {addr}");
            assert_eq!(addr, server);
        }
        Err(e) => {
            eprintln!("SO_ORIGINAL_DST of a plain connection: {e}");
            let ctx = context(&e);
            assert_eq!(ctx.op, SocketOp::OriginalDestination);
            assert_eq!(
                ctx.target,
                SocketTarget::Accepted {
                    local: Some(server),
                    peer: Some(peer)
                }
            );
            assert_eq!(
                e.to_string(),
                format!(
                    "reading SO_ORIGINAL_DST of connection from {peer} to {server}: {}",
                    ctx.source
                )
            );
        }
    }
}

#[tokio::test]
async fn tokio_timer_sleeps_until_the_deadline() {
    let timer = TokioTimer;
    let start = timer.now();
    let deadline = start + Duration::from_millis(20);
    timer.sleep_until(deadline).await;
    assert!(timer.now() >= deadline);
    assert!(tokio::time::Instant::now().into_std() >= deadline);
    // A deadline in the past is ready at once.
    tokio::time::timeout(TIMEOUT, timer.sleep_until(start)).await.unwrap();
    let wall = timer.system_now();
    assert!(wall.duration_since(std::time::UNIX_EPOCH).unwrap() > Duration::from_secs(1_600_000_000));
}

/// In virtual time: a sleep of an hour ends at once, at exactly its deadline, and the timer's
/// monotonic time is tokio's clock.
#[tokio::test(start_paused = true)]
async fn tokio_timer_follows_the_paused_clock() {
    let timer = TokioTimer;
    let real_start = std::time::Instant::now();
    let start = timer.now();
    let deadline = start + Duration::from_secs(3600);
    timer.sleep_until(deadline).await;
    assert_eq!(timer.now(), deadline, "the clock advanced exactly to the deadline");
    assert!(real_start.elapsed() < Duration::from_secs(60), "no real hour passed");

    // Sleeps race in deadline order.
    let (early, late) = (
        timer.now() + Duration::from_secs(1),
        timer.now() + Duration::from_secs(2),
    );
    tokio::select! {
        () = timer.sleep_until(late) => panic!("the later sleep ended first"),
        () = timer.sleep_until(early) => assert_eq!(timer.now(), early),
    }
    tokio::time::advance(Duration::from_secs(5)).await;
    assert_eq!(timer.now(), early + Duration::from_secs(5));
}

#[tokio::test]
async fn tokio_executor_runs_futures() {
    let (tx, rx) = oneshot::channel();
    TokioExecutor::new().execute(async move { tx.send(7).unwrap() });
    assert_eq!(tokio::time::timeout(TIMEOUT, rx).await.unwrap().unwrap(), 7);
}

#[test]
fn tokio_executor_with_a_handle_spawns_from_any_thread() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let executor = TokioExecutor::with_handle(runtime.handle().clone());
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        executor.execute(async move { tx.send(tokio::runtime::Handle::current().id()).unwrap() })
    })
    .join()
    .unwrap();
    assert_eq!(rx.recv_timeout(TIMEOUT).unwrap(), runtime.handle().id());
}

#[tokio::test]
async fn connect_times_out_naming_the_peer() {
    // A listener that never accepts, with the smallest backlog: once its queue is full the kernel
    // drops further SYNs and a connect gets no answer.
    let opts = SocketOptions {
        backlog: 0,
        ..SocketOptions::default()
    };
    let listener = DefaultSocketFactory.listener(any_port(LOCALHOST), &opts).unwrap();
    let addr = local_addr(&listener);
    let _listener = into_listener(listener).unwrap();
    let limit = Duration::from_millis(200);
    let mut held = Vec::new();
    let e = loop {
        assert!(held.len() < 16, "the accept queue never filled");
        let socket = DefaultSocketFactory
            .stream(addr, None, &SocketOptions::default())
            .unwrap();
        match connect(socket, addr, limit).await {
            Ok(stream) => held.push(stream),
            Err(e) => break e,
        }
    };
    assert_eq!(e.kind(), io::ErrorKind::TimedOut, "{e}");
    assert_eq!(context(&e).op, SocketOp::Connect);
    assert_eq!(e.to_string(), format!("connecting to {addr}: no answer within 200ms"));
}

#[tokio::test]
async fn tokio_connector_connects_from_the_source_ip_with_nodelay() {
    let (server, mut accepted) = reporting_server().await;
    let config = ConnectorConfig {
        socket: SocketOptions {
            nodelay: false,
            ..SocketOptions::default()
        },
        ..ConnectorConfig::default()
    };
    let connector = TokioConnector::new((), config);
    assert!(connector.config().socket.nodelay, "TCP_NODELAY is forced on");

    let stream = connector
        .connect_tcp(&key(server, Some(SECOND_LOOPBACK)))
        .await
        .unwrap();
    assert!(stream.nodelay().unwrap());
    assert_eq!(stream.peer_addr().unwrap(), server);
    let (_, seen) = accepted.recv().await.unwrap();
    assert_eq!(seen.ip(), SECOND_LOOPBACK);

    let stream = connector.connect_tcp(&key(server, None)).await.unwrap();
    assert!(stream.nodelay().unwrap());
    let (_, seen) = accepted.recv().await.unwrap();
    assert_eq!(seen.ip(), LOCALHOST);
}

#[tokio::test]
async fn tokio_connector_reports_tcp_errors_naming_the_destination() {
    // A port nothing listens on: bound but never listening.
    let placeholder = DefaultSocketFactory
        .stream(
            "127.0.0.1:1".parse().unwrap(),
            Some(any_port(LOCALHOST)),
            &SocketOptions::default(),
        )
        .unwrap();
    let closed = local_addr(&placeholder);
    let connector = TokioConnector::new((), ConnectorConfig::default());
    let e = connector.connect_tcp(&key(closed, None)).await.unwrap_err();
    let ConnectError::Tcp { peer, source } = &e else {
        panic!("not a TCP error: {e}");
    };
    assert_eq!(peer, &closed);
    assert_eq!(source.kind(), io::ErrorKind::ConnectionRefused);
    assert_eq!(context(source).op, SocketOp::Connect);
    assert_eq!(
        e.to_string(),
        format!(
            "TCP connect to {closed}: connecting to {closed}: {}",
            context(source).source
        )
    );
}

#[tokio::test]
async fn hbone_pool_tunnels_through_the_tokio_connector() {
    use meshwire_hbone::client::ConnectRequest;
    use meshwire_hbone::pool::{Pool, PoolConfig};
    use meshwire_identity::tls;
    use meshwire_testkit::net::EchoHandler;
    use meshwire_testkit::pki::Pki;
    use std::sync::Arc;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let (client_id, server_id) = (id(CLIENT), id(SERVER));
    let Pki { ca, server_tls, .. } = Pki::new();
    let client = ca.issue(&client_id).unwrap();

    let listener = bind_listener(&DefaultSocketFactory, any_port(LOCALHOST), &SocketOptions::default()).unwrap();
    let server_addr = listener.local_addr().unwrap();
    let (seen_tx, mut seen) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((tcp, peer)) = listener.accept().await {
            tcp.set_nodelay(true).unwrap();
            seen_tx.send(peer).unwrap();
            let tls = server_tls.clone();
            tokio::spawn(async move {
                let options = meshwire_hbone::server::ServeOptions::default();
                let _ = meshwire_hbone::server::serve(
                    tcp,
                    tls,
                    &options,
                    &EchoHandler::default(),
                    &TokioTimer,
                    std::future::pending(),
                )
                .await;
            });
        }
    });

    // The certificate manager's part: a config per key, presenting the source, expecting the key's identities.
    let (svid, bundles) = (client.svid.clone(), client.bundles.clone());
    let asked = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let asked_by_source = asked.clone();
    let tls_source = move |key: &PoolKey| {
        asked_by_source.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let config = tls::client_config(&svid, &bundles, key.expected().to_vec(), vec![b"h2".to_vec()])
            .map(Arc::new)
            .map_err(|e| ConnectError::Tls {
                source: Arc::new(io::Error::other(e)),
            });
        async move { config }
    };
    let connector = TokioConnector::new(tls_source, ConnectorConfig::default());
    let pool = Pool::new(connector, TokioExecutor::new(), TokioTimer, PoolConfig::default());

    let key = key(server_addr, Some(SECOND_LOOPBACK));
    let request = ConnectRequest::new("10.1.2.3:8080".parse().unwrap());
    // A tokio proxy spawns each connection's handling: the pool's future must be Send.
    let task = {
        let (pool, key, request) = (pool.clone(), key.clone(), request.clone());
        tokio::spawn(async move { pool.connect(&key, &request).await })
    };
    let mut tunnel = tokio::time::timeout(TIMEOUT, task).await.unwrap().unwrap().unwrap();
    assert_eq!(tunnel.peer_identity(), &server_id);
    let peer = seen.recv().await.unwrap();
    assert_eq!(
        peer.ip(),
        SECOND_LOOPBACK,
        "the connection comes from the key's source IP"
    );

    tunnel.write_all(b"through the tunnel").await.unwrap();
    let mut buf = [0u8; 18];
    tokio::time::timeout(TIMEOUT, tunnel.read_exact(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&buf, b"through the tunnel");

    // A second stream shares the connection: no new TCP connection, no second config.
    let _second = tokio::time::timeout(TIMEOUT, pool.connect(&key, &request))
        .await
        .unwrap()
        .unwrap();
    assert!(seen.try_recv().is_err());
    assert_eq!(asked.load(std::sync::atomic::Ordering::SeqCst), 1);

    // A key that expects another identity fails the TLS handshake.
    let wrong = PoolKey::new(
        client_id.clone(),
        vec![id("spiffe://cluster.local/ns/default/sa/other")],
        server_addr,
        None,
    );
    let e = tokio::time::timeout(TIMEOUT, pool.connect(&wrong, &request))
        .await
        .unwrap()
        .unwrap_err();
    assert!(matches!(e, ConnectError::Tls { .. }), "{e}");
}
