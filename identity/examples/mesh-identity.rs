//! Issues SVIDs from the built-in local CA through the certificate manager and proves them with a
//! mutual-TLS exchange over loopback.
//!
//! ```text
//! cargo run --release -p meshwire-identity --example mesh-identity -- [--state-dir DIR] [--trust-domain TD]
//! ```
//!
//! The CA root is created in the state directory on the first run (default `.meshwire/ca`) and
//! reused afterwards, as the proxy will do.
#![allow(missing_docs)]

use std::path::PathBuf;
use std::time::SystemTime;

use meshwire_identity::id::{DEFAULT_TRUST_DOMAIN, IstioIdentity, parse_trust_domain};
use meshwire_identity::manager::{CertManager, ManagerConfig, Priority};
use meshwire_identity::source::local_ca::LocalCa;
use meshwire_identity::tls;
use meshwire_rt::TokioTimer;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn usage(problem: &str) -> ! {
    eprintln!("error: {problem}\nusage: mesh-identity [--state-dir DIR] [--trust-domain TD]");
    std::process::exit(2)
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut state_dir = PathBuf::from(".meshwire/ca");
    let mut trust_domain = DEFAULT_TRUST_DOMAIN.to_owned();
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--state-dir" => state_dir = args.next().unwrap_or_else(|| usage("--state-dir needs a value")).into(),
            "--trust-domain" => trust_domain = args.next().unwrap_or_else(|| usage("--trust-domain needs a value")),
            "-h" | "--help" => usage("help requested"),
            other => usage(&format!("unknown argument {other:?}")),
        }
    }
    let td = parse_trust_domain(&trust_domain)?;
    let ca = LocalCa::load_or_create(&state_dir, td.clone())?;
    println!("local CA  trust domain {td}, root in {}", state_dir.display());

    let manager = CertManager::new(ca, TokioTimer, ManagerConfig::default());
    let driver = manager.clone();
    tokio::spawn(async move { driver.run().await });

    let server_id = IstioIdentity::new(td.clone(), "default", "echo-server")?.to_spiffe_id();
    let client_id = IstioIdentity::new(td.clone(), "default", "sleep")?.to_spiffe_id();
    let server = manager.get(&server_id, Priority::Connection).await?;
    let client = manager.get(&client_id, Priority::Connection).await?;
    for h in [&server, &client] {
        let c = h.current();
        println!(
            "issued    {}  valid {}s, refresh at half-life",
            c.svid().spiffe_id(),
            c.svid()
                .not_after()
                .duration_since(SystemTime::now())
                .unwrap_or_default()
                .as_secs()
        );
    }

    // An mTLS echo over loopback: each side checks the other's SPIFFE ID.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let acceptor = tokio_rustls::TlsAcceptor::from(server.current().server_config().clone());
    let serve = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await?;
        let mut tls = acceptor.accept(tcp).await?;
        let peer = tls::peer_identity(tls.get_ref().1)?;
        let mut buf = [0u8; 64];
        let n = tls.read(&mut buf).await?;
        tls.write_all(&buf[..n]).await?;
        tls.shutdown().await?;
        Ok::<_, Box<dyn std::error::Error + Send + Sync>>(peer)
    });
    let config = client.current().client_config(vec![server_id.clone()])?;
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let mut tls = tokio_rustls::TlsConnector::from(config)
        .connect(tls::server_name(), tcp)
        .await?;
    let (version, suite, alpn) = {
        let conn = tls.get_ref().1;
        let alpn = conn.alpn_protocol().map(|p| String::from_utf8_lossy(p).into_owned());
        (
            conn.protocol_version(),
            conn.negotiated_cipher_suite().map(|s| s.suite()),
            alpn,
        )
    };
    tls.write_all(b"hello over mTLS").await?;
    let mut echoed = Vec::new();
    tls.read_to_end(&mut echoed).await?;
    let seen_by_server = serve.await?.map_err(|e| e.to_string())?;
    println!("mTLS      {version:?} {suite:?}, ALPN {alpn:?}");
    println!("          server saw client {seen_by_server}");
    println!("          client saw server {}", tls::peer_identity(tls.get_ref().1)?);
    println!("          echoed {:?}", String::from_utf8_lossy(&echoed));

    // A client expecting another identity is refused, with both identities named.
    let wrong = IstioIdentity::new(td, "default", "someone-else")?.to_spiffe_id();
    let config = client.current().client_config(vec![wrong])?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let acceptor = tokio_rustls::TlsAcceptor::from(server.current().server_config().clone());
    tokio::spawn(async move {
        if let Ok((tcp, _)) = listener.accept().await {
            let _ = acceptor.accept(tcp).await;
        }
    });
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    match tokio_rustls::TlsConnector::from(config)
        .connect(tls::server_name(), tcp)
        .await
    {
        Ok(_) => return Err("a server with the wrong identity was accepted".into()),
        Err(e) => println!(
            "refused   {}",
            tls::find_cause::<tls::IdentityMismatch>(&e).map_or(e.to_string(), ToString::to_string)
        ),
    }
    manager.shutdown();
    Ok(())
}
