//! [`FakeIstiod`]: a real gRPC server (HTTP/2 over TLS 1.3 on 127.0.0.1) serving istiod's delta
//! ADS and CA services, scripted by the test.
//!
//! - Its certificate names [`ISTIOD_NAME`] (and `localhost`, `127.0.0.1`), issued by a test root
//!   ([`FakeIstiod::root_pem`]). Clients connect to [`FakeIstiod::address`] and verify
//!   [`ISTIOD_NAME`].
//! - ADS: each `DeltaAggregatedResources` stream reaches the test as a [`StreamHandle`]
//!   ([`FakeIstiod::next_stream`]) with its request headers; the test reads the client's requests,
//!   pushes responses and ends the stream with any status.
//! - CA: by default signs the CSR (rcgen) with the chain `[leaf, root]`, after checking that the
//!   CSR holds exactly one `spiffe://` URI SAN (equal to `ImpersonatedIdentity` when that is
//!   given). [`CaMode`] scripts failures and wrong answers; [`FakeIstiod::ca_requests`] shows
//!   what was asked, with the headers.
//! - [`FakeIstiod::refuse_connections`] makes it close every new TCP connection at once;
//!   [`FakeIstiod::connection_times`] lists when each TCP connection arrived (tokio's clock, so
//!   virtual under a paused runtime).
//!
//! Spawns its tasks on the current tokio runtime (the caller's test runtime).

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use futures_util::Stream;
use hyper_util::rt::{TokioExecutor, TokioIo};
use meshwire_control::proto::envoy::service::discovery::v3::aggregated_discovery_service_server::{
    AggregatedDiscoveryService, AggregatedDiscoveryServiceServer,
};
use meshwire_control::proto::envoy::service::discovery::v3::{DeltaDiscoveryRequest, DeltaDiscoveryResponse, Resource};
use meshwire_control::proto::istio::v1::auth::istio_certificate_service_server::{
    IstioCertificateService, IstioCertificateServiceServer,
};
use meshwire_control::proto::istio::v1::auth::{IstioCertificateRequest, IstioCertificateResponse};
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DnType, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tonic::codegen::Service as _;
use tonic::{Code, Request, Response, Status, Streaming};

/// The server name in the fake's certificate (what clients verify).
pub const ISTIOD_NAME: &str = "istiod.istio-system.svc";

/// The environment of a proxy that the fake istiod at `address` configures and certifies, as
/// ztunnel's DaemonSet sets it: xDS and CA at `address`, verified as [`ISTIOD_NAME`] with the roots
/// in `root_file`, the token in `token_file`, and the pod's own names (`pod` in `istio-system`,
/// service account `ztunnel`, `instance_ip`).
pub fn proxy_env(
    address: SocketAddr,
    root_file: &std::path::Path,
    token_file: &std::path::Path,
    pod: &str,
    instance_ip: std::net::IpAddr,
) -> Vec<(String, String)> {
    let root = root_file.display().to_string();
    [
        ("XDS_ADDRESS", address.to_string()),
        ("CA_ADDRESS", address.to_string()),
        ("XDS_ROOT_CA", root.clone()),
        ("CA_ROOT_CA", root),
        ("ALT_XDS_HOSTNAME", ISTIOD_NAME.to_owned()),
        ("ALT_CA_HOSTNAME", ISTIOD_NAME.to_owned()),
        ("AUTH_TOKEN", token_file.display().to_string()),
        ("POD_NAME", pod.to_owned()),
        ("POD_NAMESPACE", "istio-system".to_owned()),
        ("INSTANCE_IP", instance_ip.to_string()),
        ("SERVICE_ACCOUNT", "ztunnel".to_owned()),
        ("ISTIO_META_CLUSTER_ID", "Kubernetes".to_owned()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect()
}

/// The metadata key of node-mode certificate requests.
const IMPERSONATED_IDENTITY: &str = "ImpersonatedIdentity";

/// How the fake CA answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CaMode {
    /// Sign the CSR: chain `[leaf, root]`.
    Sign,
    /// Fail every request with this gRPC status.
    Fail(Code, String),
    /// Sign, but with this URI SAN instead of the CSR's.
    WrongIdentity(String),
    /// Sign, but a fresh key instead of the CSR's.
    WrongKey,
    /// Sign, with the last element holding two roots: the signing root and [`FakeIstiod::other_root_pem`].
    RotateRoots,
}

/// One certificate request as the fake CA saw it.
#[derive(Debug, Clone)]
pub struct CaRequest {
    /// The request headers (`authorization`, `clusterid`, extra headers).
    pub headers: http::HeaderMap,
    /// The CSR, PEM.
    pub csr: String,
    /// `validity_duration`, seconds.
    pub validity_secs: i64,
    /// The `ImpersonatedIdentity` metadata value, if any.
    pub impersonated: Option<String>,
    /// The CSR's URI SAN, when it parsed.
    pub uri_san: Option<String>,
}

type Responses = mpsc::UnboundedSender<Result<DeltaDiscoveryResponse, Status>>;

/// One ADS stream, as the fake sees it: the request headers, the client's requests, and a way to
/// answer and to end the stream.
#[derive(Debug)]
pub struct StreamHandle {
    /// The request headers of the stream (`authorization`, `clusterid`, custom headers, ...).
    pub headers: http::HeaderMap,
    requests: mpsc::UnboundedReceiver<DeltaDiscoveryRequest>,
    responses: Option<Responses>,
}

impl StreamHandle {
    /// The header `name` as a string (`""` when absent or not text).
    pub fn header(&self, name: &str) -> String {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string()
    }

    /// The client's next request; `None` once the client's side of the stream ended.
    pub async fn recv(&mut self) -> Option<DeltaDiscoveryRequest> {
        self.requests.recv().await
    }

    /// The client's next request, panicking with `what` when the stream ended instead.
    pub async fn expect(&mut self, what: &str) -> DeltaDiscoveryRequest {
        match self.recv().await {
            Some(r) => r,
            None => panic!("the ADS stream ended while waiting for {what}"),
        }
    }

    /// Sends a response; `false` when the stream is gone.
    pub fn send(&self, response: DeltaDiscoveryResponse) -> bool {
        self.responses.as_ref().is_some_and(|tx| tx.send(Ok(response)).is_ok())
    }

    /// Ends the stream with `code` (OK: a clean end of stream; anything else: that status, with
    /// `message`).
    pub fn close(mut self, code: Code, message: &str) {
        if let Some(tx) = self.responses.take()
            && code != Code::Ok
        {
            let _ = tx.send(Err(Status::new(code, message)));
        }
    }
}

/// A response of `type_url` with `nonce`, adding `resources` (name, version, encoded message) and
/// removing `removed`.
pub fn response(
    type_url: &str,
    nonce: &str,
    resources: Vec<(String, String, prost_types::Any)>,
    removed: Vec<String>,
) -> DeltaDiscoveryResponse {
    DeltaDiscoveryResponse {
        type_url: type_url.to_string(),
        nonce: nonce.to_string(),
        resources: resources
            .into_iter()
            .map(|(name, version, any)| Resource {
                name,
                version,
                resource: Some(any),
                ..Default::default()
            })
            .collect(),
        removed_resources: removed,
        ..Default::default()
    }
}

struct Shared {
    refuse: AtomicBool,
    accepted: Mutex<Vec<tokio::time::Instant>>,
    accepted_count: tokio::sync::watch::Sender<usize>,
    streams: mpsc::UnboundedSender<StreamHandle>,
    ca_mode: Mutex<CaMode>,
    ca_requests: Mutex<Vec<CaRequest>>,
    issuer: Issuer<'static, KeyPair>,
    root_pem: String,
    other_root_pem: String,
}

/// A fake istiod on 127.0.0.1: see the [module](self) documentation. Stops when dropped.
pub struct FakeIstiod {
    shared: Arc<Shared>,
    address: SocketAddr,
    streams: tokio::sync::Mutex<mpsc::UnboundedReceiver<StreamHandle>>,
    accept: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for FakeIstiod {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FakeIstiod")
            .field("address", &self.address)
            .finish_non_exhaustive()
    }
}

impl Drop for FakeIstiod {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

/// A self-signed CA: its issuer and its certificate, PEM.
fn new_ca(name: &str) -> (Issuer<'static, KeyPair>, String) {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params
        .distinguished_name
        .push(DnType::OrganizationName, "cluster.local");
    params.distinguished_name.push(DnType::CommonName, name);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let cert = params.self_signed(&key).unwrap();
    (Issuer::new(params, key), cert.pem())
}

impl FakeIstiod {
    /// Starts a fake istiod on 127.0.0.1 (a free port) with a fresh test root, ADS streams
    /// waiting for the test, and a CA that signs ([`CaMode::Sign`]).
    pub async fn start() -> Self {
        let (issuer, root_pem) = new_ca("fake istiod root");
        let (_other, other_root_pem) = new_ca("another root");
        let server_key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(vec![
            ISTIOD_NAME.to_string(),
            "localhost".to_string(),
            "127.0.0.1".to_string(),
        ])
        .unwrap();
        params.distinguished_name.push(DnType::CommonName, ISTIOD_NAME);
        let server_cert = params.signed_by(&server_key, &issuer).unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut tls = rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(
                vec![CertificateDer::from(server_cert.der().to_vec())],
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(server_key.serialize_der())),
            )
            .unwrap();
        tls.alpn_protocols = vec![b"h2".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));

        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let (streams_tx, streams_rx) = mpsc::unbounded_channel();
        let shared = Arc::new(Shared {
            refuse: AtomicBool::new(false),
            accepted: Mutex::new(Vec::new()),
            accepted_count: tokio::sync::watch::Sender::new(0),
            streams: streams_tx,
            ca_mode: Mutex::new(CaMode::Sign),
            ca_requests: Mutex::new(Vec::new()),
            issuer,
            root_pem,
            other_root_pem,
        });
        let accept = tokio::spawn(accept_loop(listener, acceptor, shared.clone()));
        Self {
            shared,
            address,
            streams: tokio::sync::Mutex::new(streams_rx),
            accept,
        }
    }

    /// The socket address (127.0.0.1 and the port).
    pub fn address(&self) -> SocketAddr {
        self.address
    }

    /// The root that signed the server's certificate and the CA's certificates, PEM.
    pub fn root_pem(&self) -> String {
        self.shared.root_pem.clone()
    }

    /// A second root, unrelated to the server (for "wrong root" tests and [`CaMode::RotateRoots`]).
    pub fn other_root_pem(&self) -> String {
        self.shared.other_root_pem.clone()
    }

    /// The next ADS stream a client opened (waits for it).
    pub async fn next_stream(&self) -> StreamHandle {
        match self.streams.lock().await.recv().await {
            Some(s) => s,
            None => panic!("the fake istiod stopped"),
        }
    }

    /// From now on, close every new TCP connection at once (`true`) or serve it (`false`).
    pub fn refuse_connections(&self, refuse: bool) {
        self.shared.refuse.store(refuse, Ordering::SeqCst);
    }

    /// When each TCP connection arrived (tokio's clock), refused ones included.
    pub fn connection_times(&self) -> Vec<tokio::time::Instant> {
        self.shared.accepted.lock().unwrap().clone()
    }

    /// Waits until `n` TCP connections have arrived in all (refused ones included).
    pub async fn wait_for_connections(&self, n: usize) {
        let mut count = self.shared.accepted_count.subscribe();
        let _ = count.wait_for(|c| *c >= n).await;
    }

    /// How the CA answers from now on.
    pub fn set_ca(&self, mode: CaMode) {
        *self.shared.ca_mode.lock().unwrap() = mode;
    }

    /// The certificate requests received so far.
    pub fn ca_requests(&self) -> Vec<CaRequest> {
        self.shared.ca_requests.lock().unwrap().clone()
    }
}

async fn accept_loop(listener: TcpListener, acceptor: tokio_rustls::TlsAcceptor, shared: Arc<Shared>) {
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            continue;
        };
        let count = {
            let mut accepted = shared.accepted.lock().unwrap();
            accepted.push(tokio::time::Instant::now());
            accepted.len()
        };
        shared.accepted_count.send_replace(count);
        if shared.refuse.load(Ordering::SeqCst) {
            drop(tcp);
            continue;
        }
        let acceptor = acceptor.clone();
        let shared = shared.clone();
        tokio::spawn(async move {
            let Ok(tls) = acceptor.accept(tcp).await else {
                return;
            };
            let ads = AggregatedDiscoveryServiceServer::new(Ads(shared.clone()));
            let ca = IstioCertificateServiceServer::new(Ca(shared));
            let service = hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                let mut ads = ads.clone();
                let mut ca = ca.clone();
                async move {
                    let path = req.uri().path();
                    if path.starts_with("/envoy.service.discovery.v3.AggregatedDiscoveryService/") {
                        ads.call(req).await
                    } else if path.starts_with("/istio.v1.auth.IstioCertificateService/") {
                        ca.call(req).await
                    } else {
                        Ok(Status::unimplemented(format!("no service for {path}")).into_http())
                    }
                }
            });
            let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(tls), service)
                .await;
        });
    }
}

type ResponseStream = Pin<Box<dyn Stream<Item = Result<DeltaDiscoveryResponse, Status>> + Send>>;

struct Ads(Arc<Shared>);

#[tonic::async_trait]
impl AggregatedDiscoveryService for Ads {
    type DeltaAggregatedResourcesStream = ResponseStream;

    async fn delta_aggregated_resources(
        &self,
        request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaAggregatedResourcesStream>, Status> {
        let headers = request.metadata().clone().into_headers();
        let mut inbound = request.into_inner();
        let (requests_tx, requests) = mpsc::unbounded_channel();
        let (responses, mut responses_rx) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Ok(Some(message)) = inbound.message().await {
                if requests_tx.send(message).is_err() {
                    break;
                }
            }
        });
        let _ = self.0.streams.send(StreamHandle {
            headers,
            requests,
            responses: Some(responses),
        });
        let out = futures_util::stream::poll_fn(move |cx| responses_rx.poll_recv(cx));
        Ok(Response::new(Box::pin(out)))
    }
}

struct Ca(Arc<Shared>);

#[tonic::async_trait]
impl IstioCertificateService for Ca {
    async fn create_certificate(
        &self,
        request: Request<IstioCertificateRequest>,
    ) -> Result<Response<IstioCertificateResponse>, Status> {
        let headers = request.metadata().clone().into_headers();
        let req = request.into_inner();
        let impersonated = req
            .metadata
            .as_ref()
            .and_then(|m| m.fields.get(IMPERSONATED_IDENTITY))
            .and_then(|v| match &v.kind {
                Some(prost_types::value::Kind::StringValue(s)) => Some(s.clone()),
                _ => None,
            });
        let csr = CertificateSigningRequestParams::from_pem(&req.csr);
        let uri_san = csr.as_ref().ok().and_then(|c| {
            let uris: Vec<&str> = c
                .params
                .subject_alt_names
                .iter()
                .filter_map(|s| match s {
                    SanType::URI(u) => Some(u.as_str()),
                    _ => None,
                })
                .collect();
            (uris.len() == 1).then(|| uris[0].to_string())
        });
        self.0.ca_requests.lock().unwrap().push(CaRequest {
            headers,
            csr: req.csr.clone(),
            validity_secs: req.validity_duration,
            impersonated: impersonated.clone(),
            uri_san: uri_san.clone(),
        });
        let mode = self.0.ca_mode.lock().unwrap().clone();
        if let CaMode::Fail(code, message) = &mode {
            return Err(Status::new(*code, message.clone()));
        }
        let csr = csr.map_err(|e| Status::invalid_argument(format!("bad CSR: {e}")))?;
        let Some(san) = uri_san.filter(|s| s.starts_with("spiffe://")) else {
            return Err(Status::invalid_argument(
                "the CSR must hold exactly one spiffe:// URI SAN",
            ));
        };
        if let Some(id) = &impersonated
            && *id != san
        {
            return Err(Status::invalid_argument(format!(
                "the CSR's identity {san} is not the impersonated identity {id}"
            )));
        }
        let mut params = csr.params.clone();
        let validity = if req.validity_duration > 0 {
            Duration::from_secs(req.validity_duration.unsigned_abs())
        } else {
            Duration::from_secs(24 * 3600)
        };
        let now = SystemTime::now();
        params.not_before = time::OffsetDateTime::from(now - Duration::from_secs(60));
        params.not_after = time::OffsetDateTime::from(now + validity);
        params.is_ca = IsCa::NoCa;
        // As Istio's CA issues workload certificates.
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
        params.extended_key_usages = vec![
            rcgen::ExtendedKeyUsagePurpose::ServerAuth,
            rcgen::ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        if let CaMode::WrongIdentity(other) = &mode {
            let uri = other
                .clone()
                .try_into()
                .map_err(|e| Status::internal(format!("bad scripted identity {other}: {e}")))?;
            params.subject_alt_names = vec![SanType::URI(uri)];
        }
        let leaf = if mode == CaMode::WrongKey {
            let key = KeyPair::generate().map_err(|e| Status::internal(e.to_string()))?;
            params.signed_by(&key, &self.0.issuer)
        } else {
            params.signed_by(&csr.public_key, &self.0.issuer)
        }
        .map_err(|e| Status::internal(format!("signing: {e}")))?;
        let roots = if mode == CaMode::RotateRoots {
            format!("{}{}", self.0.root_pem, self.0.other_root_pem)
        } else {
            self.0.root_pem.clone()
        };
        Ok(Response::new(IstioCertificateResponse {
            cert_chain: vec![leaf.pem(), roots],
        }))
    }
}
