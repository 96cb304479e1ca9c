//! Real rustls handshakes over loopback TCP between the configs of `meshwire_identity::tls`.
#![allow(clippy::unwrap_used, missing_docs)]
#![cfg(feature = "local-ca")]

use std::io;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use meshwire_identity::bundle::{BundleSet, TrustBundle};
use meshwire_identity::id::{SpiffeId, TrustDomain};
use meshwire_identity::source::Credentials;
use meshwire_identity::source::local_ca::LocalCa;
use meshwire_identity::svid::{SvidError, X509Svid};
use meshwire_identity::tls::{self, TlsError, TrustDomains};
use rustls::client::{ResolvesClientCert, Resumption};
use rustls::server::ServerSessionMemoryCache;
use rustls::sign::CertifiedKey;
use rustls::{
    AlertDescription, CertificateError, CipherSuite, ClientConfig, HandshakeKind, ProtocolVersion, ServerConfig,
    SignatureScheme,
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::timeout;
use tokio_rustls::{TlsAcceptor, TlsConnector};

/// Guard against hangs only; every test finishes in milliseconds.
const GUARD: Duration = Duration::from_secs(10);

const SERVER: &str = "spiffe://cluster.local/ns/a/sa/server";
const CLIENT: &str = "spiffe://cluster.local/ns/a/sa/client";

type ClientStream = tokio_rustls::client::TlsStream<TcpStream>;
type ServerStream = tokio_rustls::server::TlsStream<TcpStream>;
/// A failed handshake keeps its socket, so that the peer can still read the alert sent on it.
type Failed = (io::Error, TcpStream);
type Outcome = (Result<ClientStream, Failed>, Result<ServerStream, Failed>);

fn td(name: &str) -> TrustDomain {
    TrustDomain::new(name).unwrap()
}

fn id(s: &str) -> SpiffeId {
    SpiffeId::new(s).unwrap()
}

fn cluster_ca() -> LocalCa {
    LocalCa::ephemeral(td("cluster.local")).unwrap()
}

fn issue(ca: &LocalCa, spiffe_id: &str) -> Credentials {
    ca.issue(&id(spiffe_id)).unwrap()
}

fn h2() -> Vec<Vec<u8>> {
    vec![b"h2".to_vec()]
}

/// A server config for `creds`, accepting clients of `accepted`, offering `h2`.
fn server_cfg(creds: &Credentials, bundles: &BundleSet, accepted: &[&str]) -> Arc<ServerConfig> {
    let accepted: TrustDomains = accepted.iter().map(|t| td(t)).collect();
    Arc::new(tls::server_config(&creds.svid, bundles, &accepted, h2()).unwrap())
}

/// A client config for `creds`, expecting `expected`, offering `h2`.
fn client_cfg(creds: &Credentials, bundles: &BundleSet, expected: &str) -> Arc<ClientConfig> {
    Arc::new(tls::client_config(&creds.svid, bundles, vec![id(expected)], h2()).unwrap())
}

/// A server and a client of one CA in `cluster.local`, with configs that should agree.
struct Pair {
    ca: LocalCa,
    server: Credentials,
    client: Credentials,
}

impl Pair {
    fn new() -> Self {
        let ca = cluster_ca();
        let server = issue(&ca, SERVER);
        let client = issue(&ca, CLIENT);
        Self { ca, server, client }
    }

    fn server_cfg(&self) -> Arc<ServerConfig> {
        server_cfg(&self.server, &self.server.bundles, &["cluster.local"])
    }

    fn client_cfg(&self) -> Arc<ClientConfig> {
        client_cfg(&self.client, &self.client.bundles, SERVER)
    }
}

async fn listen() -> TcpListener {
    TcpListener::bind("127.0.0.1:0").await.unwrap()
}

/// Runs one client handshake and one server handshake on `listener` concurrently.
async fn handshake_on(
    listener: &TcpListener,
    client: Arc<ClientConfig>,
    server: Arc<ServerConfig>,
    name: ServerName<'static>,
) -> Outcome {
    let addr = listener.local_addr().unwrap();
    let accept = async {
        let (tcp, _) = listener.accept().await.unwrap();
        TlsAcceptor::from(server).accept(tcp).into_fallible().await
    };
    let connect = async {
        let tcp = TcpStream::connect(addr).await.unwrap();
        TlsConnector::from(client).connect(name, tcp).into_fallible().await
    };
    timeout(GUARD, async { tokio::join!(connect, accept) })
        .await
        .expect("handshake hung")
}

async fn handshake(client: Arc<ClientConfig>, server: Arc<ServerConfig>) -> Outcome {
    handshake_on(&listen().await, client, server, tls::server_name()).await
}

fn ok<T>(side: &str, r: Result<T, Failed>) -> T {
    r.unwrap_or_else(|(e, _)| panic!("{side} handshake failed: {e}"))
}

fn failed<T>(side: &str, r: Result<T, Failed>) -> Failed {
    match r {
        Ok(_) => panic!("{side} handshake succeeded, expected a failure"),
        Err(f) => f,
    }
}

/// The rustls error inside an `io::Error` from a TLS stream.
fn rustls_error(e: &io::Error) -> &rustls::Error {
    e.get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        .unwrap_or_else(|| panic!("not a rustls error: {e:?}"))
}

/// Sends bytes client -> server -> client and server -> client -> server.
async fn echo_both_ways(client: &mut ClientStream, server: &mut ServerStream) {
    timeout(GUARD, async {
        let mut buf = [0u8; 64];

        client.write_all(b"ping from client").await.unwrap();
        client.flush().await.unwrap();
        let n = b"ping from client".len();
        server.read_exact(&mut buf[..n]).await.unwrap();
        assert_eq!(&buf[..n], b"ping from client");
        server.write_all(&buf[..n]).await.unwrap();
        server.flush().await.unwrap();
        let mut back = [0u8; 64];
        client.read_exact(&mut back[..n]).await.unwrap();
        assert_eq!(&back[..n], b"ping from client");

        server.write_all(b"ping from server").await.unwrap();
        server.flush().await.unwrap();
        let n = b"ping from server".len();
        client.read_exact(&mut buf[..n]).await.unwrap();
        assert_eq!(&buf[..n], b"ping from server");
        client.write_all(&buf[..n]).await.unwrap();
        client.flush().await.unwrap();
        server.read_exact(&mut back[..n]).await.unwrap();
        assert_eq!(&back[..n], b"ping from server");
    })
    .await
    .expect("echo hung");
}

/// The error a client gets from a handshake the server refused. With TLS 1.3 client auth the client
/// considers the handshake done before the server has looked at its certificate, so the failure may
/// only show on the first read; the server's socket is still open, so the alert is there to read.
async fn client_failure(client: Result<ClientStream, Failed>) -> io::Error {
    match client {
        Err((e, _tcp)) => e,
        Ok(mut stream) => timeout(GUARD, async {
            // The write may already fail if the alert was processed; either way the read must.
            let _ = stream.write_all(b"hello?").await;
            let _ = stream.flush().await;
            let mut buf = [0u8; 16];
            match stream.read(&mut buf).await {
                Ok(n) => panic!("client read {n} bytes from a server that refused it"),
                Err(e) => e,
            }
        })
        .await
        .expect("client read hung"),
    }
}

fn leaf(certs: Option<&[CertificateDer<'static>]>) -> CertificateDer<'static> {
    certs.and_then(|c| c.first()).expect("no peer certificate").clone()
}

/// A CA made with rcgen (so the test holds its key), with its own subject name.
struct RcgenCa {
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
    root: CertificateDer<'static>,
}

impl RcgenCa {
    fn new(common_name: &str) -> Self {
        use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose};
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(DnType::CommonName, common_name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::DigitalSignature];
        let root = params.self_signed(&key).unwrap().der().clone();
        Self {
            issuer: rcgen::Issuer::new(params, key),
            root,
        }
    }

    fn bundles(&self, trust_domain: &str) -> BundleSet {
        BundleSet::from(TrustBundle::new(td(trust_domain), vec![self.root.clone()]).unwrap())
    }

    /// A leaf with the given SANs, for server and client auth; its chain and key.
    fn leaf(&self, sans: Vec<rcgen::SanType>) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
        use rcgen::{CertificateParams, ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose};
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.subject_alt_names = sans;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        (
            vec![cert.der().clone()],
            PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        )
    }

    /// An SVID for `spiffe_id`, with the bundle of this CA.
    fn issue(&self, spiffe_id: &str) -> Credentials {
        let (chain, key) = self.leaf(vec![rcgen::SanType::URI(spiffe_id.try_into().unwrap())]);
        let svid = X509Svid::from_der(chain, key).unwrap();
        Credentials {
            bundles: self.bundles(svid.spiffe_id().trust_domain().as_str()),
            svid,
        }
    }
}

// 1. ------------------------------------------------------------------------------------------

#[tokio::test]
async fn mtls_succeeds_with_identities_alpn_tls13_and_echo() {
    let p = Pair::new();
    let (client, server) = handshake(p.client_cfg(), p.server_cfg()).await;
    let mut client = ok("client", client);
    let mut server = ok("server", server);

    let c = client.get_ref().1;
    let s = server.get_ref().1;
    assert_eq!(tls::peer_identity(c).unwrap(), id(SERVER));
    assert_eq!(tls::peer_identity(s).unwrap(), id(CLIENT));
    assert_eq!(leaf(c.peer_certificates()), *p.server.svid.leaf());
    assert_eq!(leaf(s.peer_certificates()), *p.client.svid.leaf());
    assert_eq!(c.alpn_protocol(), Some(&b"h2"[..]));
    assert_eq!(s.alpn_protocol(), Some(&b"h2"[..]));
    for (side, version, suite) in [
        ("client", c.protocol_version(), c.negotiated_cipher_suite()),
        ("server", s.protocol_version(), s.negotiated_cipher_suite()),
    ] {
        assert_eq!(version, Some(ProtocolVersion::TLSv1_3), "{side}");
        let suite = suite.unwrap().suite();
        assert!(
            matches!(
                suite,
                CipherSuite::TLS13_AES_256_GCM_SHA384 | CipherSuite::TLS13_AES_128_GCM_SHA256
            ),
            "{side} negotiated {suite:?}"
        );
    }
    assert_eq!(
        c.negotiated_cipher_suite().unwrap().suite(),
        s.negotiated_cipher_suite().unwrap().suite()
    );

    echo_both_ways(&mut client, &mut server).await;
}

// 2. ------------------------------------------------------------------------------------------

#[tokio::test]
async fn client_sends_no_sni() {
    let p = Pair::new();
    let listener = listen().await;
    let dns = ServerName::try_from("server.example").unwrap();

    // With the name tls::server_name() hands out.
    let (_c, s) = handshake_on(&listener, p.client_cfg(), p.server_cfg(), tls::server_name()).await;
    assert_eq!(ok("server", s).get_ref().1.server_name(), None);

    // Even with a DNS name, which rustls would send if SNI were enabled...
    let (_c, s) = handshake_on(&listener, p.client_cfg(), p.server_cfg(), dns.clone()).await;
    assert_eq!(ok("server", s).get_ref().1.server_name(), None);

    // ...as it does with SNI switched back on (the check above can see SNI).
    let mut with_sni = (*p.client_cfg()).clone();
    with_sni.enable_sni = true;
    let (_c, s) = handshake_on(&listener, Arc::new(with_sni), p.server_cfg(), dns).await;
    assert_eq!(ok("server", s).get_ref().1.server_name(), Some("server.example"));
}

/// Two connections with the same client and server configs; the handshake kinds seen by both
/// sides of each. Data is echoed so that the client reads any session ticket the server sends.
async fn two_handshakes(client: Arc<ClientConfig>, server: Arc<ServerConfig>) -> Vec<(HandshakeKind, HandshakeKind)> {
    let listener = listen().await;
    let mut kinds = Vec::new();
    for _ in 0..2 {
        let (c, s) = handshake_on(&listener, client.clone(), server.clone(), tls::server_name()).await;
        let (mut c, mut s) = (ok("client", c), ok("server", s));
        echo_both_ways(&mut c, &mut s).await;
        // A resumed session still knows the peer.
        assert_eq!(tls::peer_identity(c.get_ref().1).unwrap(), id(SERVER));
        assert_eq!(tls::peer_identity(s.get_ref().1).unwrap(), id(CLIENT));
        kinds.push((
            c.get_ref().1.handshake_kind().unwrap(),
            s.get_ref().1.handshake_kind().unwrap(),
        ));
    }
    kinds
}

#[tokio::test]
async fn sessions_are_not_resumed() {
    let p = Pair::new();
    let full = vec![(HandshakeKind::Full, HandshakeKind::Full); 2];

    // A client and a server that both allow resumption do resume: the check can see it.
    let mut resuming_client = (*p.client_cfg()).clone();
    resuming_client.resumption = Resumption::in_memory_sessions(16);
    let resuming_client = Arc::new(resuming_client);
    let mut resuming_server = (*p.server_cfg()).clone();
    resuming_server.send_tls13_tickets = 2;
    resuming_server.session_storage = ServerSessionMemoryCache::new(16);
    let resuming_server = Arc::new(resuming_server);
    assert_eq!(
        two_handshakes(resuming_client.clone(), resuming_server.clone()).await,
        [
            (HandshakeKind::Full, HandshakeKind::Full),
            (HandshakeKind::Resumed, HandshakeKind::Resumed)
        ]
    );

    // Our configs, together and each against a peer that would resume.
    assert_eq!(two_handshakes(p.client_cfg(), p.server_cfg()).await, full);
    assert_eq!(
        two_handshakes(p.client_cfg(), resuming_server).await,
        full,
        "the client resumed"
    );
    assert_eq!(
        two_handshakes(resuming_client, p.server_cfg()).await,
        full,
        "the server resumed"
    );

    let server = p.server_cfg();
    assert_eq!(server.send_tls13_tickets, 0);
}

// 3. ------------------------------------------------------------------------------------------

#[tokio::test]
async fn wrong_server_identity_is_refused_with_identity_mismatch() {
    let p = Pair::new();
    let other = "spiffe://cluster.local/ns/a/sa/other";
    let client = client_cfg(&p.client, &p.client.bundles, other);
    let (c, s) = handshake(client, p.server_cfg()).await;

    let (err, _tcp) = failed("client", c);
    let mismatch = tls::find_cause::<tls::IdentityMismatch>(&err).expect("no IdentityMismatch in the error");
    assert_eq!(mismatch.expected, vec![id(other)]);
    assert_eq!(mismatch.actual, id(SERVER));

    let mut chain = Vec::new();
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(&err);
    while let Some(e) = cur {
        chain.push(e.to_string());
        cur = e.source();
    }
    let text = chain.join(": ");
    // The error as a user sees it names both identities as URIs.
    assert!(text.contains(other) && text.contains(SERVER), "{text}");
    assert!(text.contains("is not the expected"), "{text}");
    // The cause itself, as found by find_cause, names both in URI form.
    let shown = mismatch.to_string();
    assert!(shown.contains(other) && shown.contains(SERVER), "{shown}");

    // The server is told why.
    let (err, _tcp) = failed("server", s);
    assert_eq!(
        *rustls_error(&err),
        rustls::Error::AlertReceived(AlertDescription::CertificateUnknown)
    );
}

// 4. ------------------------------------------------------------------------------------------

/// The error for a chain that does not lead to a trusted root. A root of the same trust domain from
/// another `LocalCa` has the same subject name as the trusted one, so webpki finds it as the issuer
/// candidate and reports the failed signature (BadSignature); a root with another name is reported
/// as UnknownIssuer. Either way the peer gets the matching alert.
fn assert_untrusted_chain(err: &io::Error) -> AlertDescription {
    match rustls_error(err) {
        rustls::Error::InvalidCertificate(e @ (CertificateError::UnknownIssuer | CertificateError::BadSignature)) => {
            AlertDescription::from(e.clone())
        }
        other => panic!("expected an untrusted-chain error, got {other:?}"),
    }
}

#[tokio::test]
async fn server_certificate_from_untrusted_root_is_refused() {
    let p = Pair::new();
    let ca_b = cluster_ca(); // Same trust domain, another root.
    let client = client_cfg(&p.client, ca_b.bundle_set(), SERVER);
    let (c, s) = handshake(client, p.server_cfg()).await;

    let (err, _tcp) = failed("client", c);
    let alert = assert_untrusted_chain(&err);
    let (err, _tcp) = failed("server", s);
    assert_eq!(*rustls_error(&err), rustls::Error::AlertReceived(alert));
}

#[tokio::test]
async fn server_certificate_from_unrelated_root_is_unknown_issuer() {
    let p = Pair::new();
    // A cluster.local SVID, but from a root the client has never heard of (and named differently).
    let stranger = RcgenCa::new("stranger CA").issue(SERVER);
    let server = server_cfg(&stranger, &p.server.bundles, &["cluster.local"]);
    let (c, s) = handshake(p.client_cfg(), server).await;

    let (err, _tcp) = failed("client", c);
    assert_eq!(
        *rustls_error(&err),
        rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer)
    );
    let (err, _tcp) = failed("server", s);
    assert_eq!(
        *rustls_error(&err),
        rustls::Error::AlertReceived(AlertDescription::UnknownCA)
    );
}

#[tokio::test]
async fn client_certificate_from_untrusted_root_is_refused() {
    let p = Pair::new();
    for client_b in [issue(&cluster_ca(), CLIENT), RcgenCa::new("stranger CA").issue(CLIENT)] {
        // The client trusts the server's root; its own certificate comes from another CA.
        let client = client_cfg(&client_b, p.ca.bundle_set(), SERVER);
        let (c, s) = handshake(client, p.server_cfg()).await;

        let (err, _tcp) = failed("server", s);
        let alert = assert_untrusted_chain(&err);
        let err = client_failure(c).await;
        assert_eq!(*rustls_error(&err), rustls::Error::AlertReceived(alert));
    }
}

// 5. ------------------------------------------------------------------------------------------

/// A CA of `other.org`, a client of it, and bundles of both trust domains.
fn federation() -> (Pair, Credentials, BundleSet) {
    let p = Pair::new();
    let other_ca = LocalCa::ephemeral(td("other.org")).unwrap();
    let foreign = issue(&other_ca, "spiffe://other.org/ns/a/sa/c");
    let mut both = p.ca.bundle_set().clone();
    both.insert(other_ca.bundle().clone());
    (p, foreign, both)
}

#[tokio::test]
async fn client_of_foreign_trust_domain_is_refused() {
    let (p, foreign, both) = federation();
    // The chain itself verifies against the server's bundles.
    foreign.svid.verify(&both, SystemTime::now()).unwrap();

    let server = server_cfg(&p.server, &both, &["cluster.local"]);
    let client = client_cfg(&foreign, &both, SERVER);
    let (c, s) = handshake(client, server).await;

    let (err, _tcp) = failed("server", s);
    let foreign_td = tls::find_cause::<tls::ForeignTrustDomain>(&err).expect("no ForeignTrustDomain in the error");
    assert_eq!(foreign_td.peer, *foreign.svid.spiffe_id());
    assert_eq!(foreign_td.accepted, vec![td("cluster.local")]);
    let err = client_failure(c).await;
    assert_eq!(
        *rustls_error(&err),
        rustls::Error::AlertReceived(AlertDescription::CertificateUnknown)
    );
}

#[tokio::test]
async fn client_of_federated_trust_domain_is_accepted() {
    let (p, foreign, both) = federation();
    let server = server_cfg(&p.server, &both, &["cluster.local", "other.org"]);
    let client = client_cfg(&foreign, &both, SERVER);
    let (c, s) = handshake(client, server).await;
    let (mut c, mut s) = (ok("client", c), ok("server", s));

    assert_eq!(
        tls::peer_identity(s.get_ref().1).unwrap(),
        id("spiffe://other.org/ns/a/sa/c")
    );
    assert_eq!(tls::peer_identity(c.get_ref().1).unwrap(), id(SERVER));
    echo_both_ways(&mut c, &mut s).await;
}

// 6. ------------------------------------------------------------------------------------------

#[derive(Debug)]
struct NoClientCert;

impl ResolvesClientCert for NoClientCert {
    fn resolve(&self, _hints: &[&[u8]], _schemes: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        None
    }

    fn has_certs(&self) -> bool {
        false
    }
}

#[tokio::test]
async fn client_without_certificate_is_refused() {
    let p = Pair::new();
    // The SPIFFE server verifier of tls::client_config, but no certificate to present.
    let mut client = (*p.client_cfg()).clone();
    client.client_auth_cert_resolver = Arc::new(NoClientCert);
    let (c, s) = handshake(Arc::new(client), p.server_cfg()).await;

    let (err, _tcp) = failed("server", s);
    assert_eq!(*rustls_error(&err), rustls::Error::NoCertificatesPresented);
    let err = client_failure(c).await;
    assert_eq!(
        *rustls_error(&err),
        rustls::Error::AlertReceived(AlertDescription::CertificateRequired)
    );
}

// 7. ------------------------------------------------------------------------------------------

#[tokio::test]
async fn tls12_only_client_is_refused() {
    let p = Pair::new();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    assert!(
        provider
            .cipher_suites
            .iter()
            .any(|s| s.version() == &rustls::version::TLS12)
    );
    let mut roots = rustls::RootCertStore::empty();
    roots.add(p.ca.bundle().roots()[0].clone()).unwrap();
    let mut client = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS12])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    client.alpn_protocols = h2();
    let (c, s) = handshake(Arc::new(client), p.server_cfg()).await;

    let (err, _tcp) = failed("server", s);
    assert!(
        matches!(rustls_error(&err), rustls::Error::PeerIncompatible(_)),
        "{err:?}"
    );
    let (err, _tcp) = failed("client", c);
    assert_eq!(
        *rustls_error(&err),
        rustls::Error::AlertReceived(AlertDescription::ProtocolVersion)
    );
}

// 8. ------------------------------------------------------------------------------------------

#[tokio::test]
async fn client_without_common_alpn_is_refused() {
    let p = Pair::new();
    let client = tls::client_config(
        &p.client.svid,
        &p.client.bundles,
        vec![id(SERVER)],
        vec![b"http/1.1".to_vec()],
    );
    let (c, s) = handshake(Arc::new(client.unwrap()), p.server_cfg()).await;

    let (err, _tcp) = failed("server", s);
    assert_eq!(*rustls_error(&err), rustls::Error::NoApplicationProtocol);
    let (err, _tcp) = failed("client", c);
    assert_eq!(
        *rustls_error(&err),
        rustls::Error::AlertReceived(AlertDescription::NoApplicationProtocol)
    );
}

#[tokio::test]
async fn client_without_alpn_is_accepted() {
    let p = Pair::new();
    let client = tls::client_config(&p.client.svid, &p.client.bundles, vec![id(SERVER)], Vec::new());
    let (c, s) = handshake(Arc::new(client.unwrap()), p.server_cfg()).await;
    let (mut c, mut s) = (ok("client", c), ok("server", s));

    assert_eq!(c.get_ref().1.alpn_protocol(), None);
    assert_eq!(s.get_ref().1.alpn_protocol(), None);
    assert_eq!(tls::peer_identity(s.get_ref().1).unwrap(), id(CLIENT));
    echo_both_ways(&mut c, &mut s).await;
}

// 9. ------------------------------------------------------------------------------------------

#[tokio::test]
async fn rotation_keeps_old_connections_and_serves_new_certificate() {
    let p = Pair::new();
    let listener = listen().await;

    let (c1, s1) = handshake_on(&listener, p.client_cfg(), p.server_cfg(), tls::server_name()).await;
    let (mut c1, mut s1) = (ok("client 1", c1), ok("server 1", s1));
    echo_both_ways(&mut c1, &mut s1).await;

    // A new SVID for the same identity, and a new server config from it.
    let rotated = issue(&p.ca, SERVER);
    assert_ne!(rotated.svid.leaf(), p.server.svid.leaf());
    let server2 = server_cfg(&rotated, &rotated.bundles, &["cluster.local"]);
    let (c2, s2) = handshake_on(&listener, p.client_cfg(), server2, tls::server_name()).await;
    let (mut c2, mut s2) = (ok("client 2", c2), ok("server 2", s2));

    // The first connection still works.
    echo_both_ways(&mut c1, &mut s1).await;
    echo_both_ways(&mut c2, &mut s2).await;

    let leaf1 = leaf(c1.get_ref().1.peer_certificates());
    let leaf2 = leaf(c2.get_ref().1.peer_certificates());
    assert_ne!(leaf1, leaf2);
    assert_eq!(leaf1, *p.server.svid.leaf());
    assert_eq!(leaf2, *rotated.svid.leaf());
    assert_eq!(tls::peer_identity(c1.get_ref().1).unwrap(), id(SERVER));
    assert_eq!(tls::peer_identity(c2.get_ref().1).unwrap(), id(SERVER));
}

// 10. -----------------------------------------------------------------------------------------

#[test]
fn configs_refuse_empty_identity_and_trust_domain_sets() {
    let p = Pair::new();
    let client = tls::client_config(&p.client.svid, &p.client.bundles, Vec::new(), h2());
    assert!(matches!(client, Err(TlsError::NoExpectedIdentity)), "{client:?}");

    let none: TrustDomains = std::iter::empty().collect();
    assert!(!none.contains(&td("cluster.local")));
    let server = tls::server_config(&p.server.svid, &p.server.bundles, &none, h2());
    assert!(matches!(server, Err(TlsError::NoTrustDomain)), "{server:?}");
}

// Beyond the list: certificates that are not acceptable SVIDs. --------------------------------

#[tokio::test]
async fn server_certificate_without_spiffe_id_is_refused() {
    // A chain to a trusted root, but the leaf names a DNS name instead of a SPIFFE ID.
    let ca = RcgenCa::new("cluster.local CA");
    let (chain, key) = ca.leaf(vec![rcgen::SanType::DnsName("server.example".try_into().unwrap())]);
    let server = ServerConfig::builder_with_provider(tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .unwrap();
    let p = Pair::new();
    let client = client_cfg(&p.client, &ca.bundles("cluster.local"), SERVER);
    let (c, _s) = handshake(client, Arc::new(server)).await;

    let (err, _tcp) = failed("client", c);
    assert_eq!(
        tls::find_cause::<SvidError>(&err),
        Some(&SvidError::NoUriSan),
        "{err:?}"
    );
}

#[tokio::test]
async fn expired_server_certificate_is_refused() {
    let p = Pair::new();
    let hour = Duration::from_secs(3600);
    let expired = p.ca.issue_at(&id(SERVER), SystemTime::now() - 2 * hour, hour).unwrap();
    let server = server_cfg(&expired, &expired.bundles, &["cluster.local"]);
    let (c, s) = handshake(p.client_cfg(), server).await;

    let (err, _tcp) = failed("client", c);
    assert!(
        matches!(
            rustls_error(&err),
            rustls::Error::InvalidCertificate(CertificateError::Expired)
        ),
        "{err:?}"
    );
    let (err, _tcp) = failed("server", s);
    assert_eq!(
        *rustls_error(&err),
        rustls::Error::AlertReceived(AlertDescription::CertificateExpired)
    );
}
