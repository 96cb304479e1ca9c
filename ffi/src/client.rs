//! The client side: dial a destination through HBONE and hand back one end of a socket pair whose
//! other end is spliced to the tunnel.

use std::error::Error as _;
use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::time::Duration;

use meshwire_hbone::client::{self, ConnectRequest};
use meshwire_hbone::copy::CopyConfig;
use meshwire_hbone::headers::{Authority, Baggage, Forwarded, Metadata, TraceParent};
use meshwire_hbone::{ConnectError, Settings};
use meshwire_identity::id::{SpiffeId, parse_spiffe_id};
use meshwire_identity::tls::{IdentityMismatch, find_cause};
use meshwire_rt::TokioTimer;
use tokio::net::TcpStream;

use crate::context::Shared;
use crate::error::{Failure, MeshwireStatus};

/// The longest a dial takes, from the TCP connect to the peer's answer to the CONNECT.
pub(crate) const DIAL_TIMEOUT: Duration = Duration::from_secs(30);

/// A validated dial request.
#[derive(Debug, Clone)]
pub(crate) struct Dial {
    pub(crate) peer: SocketAddr,
    pub(crate) request: ConnectRequest,
    pub(crate) expected: Vec<SpiffeId>,
}

impl Dial {
    /// Parses the arguments of `meshwire_dial`.
    pub(crate) fn parse(
        peer: &str,
        authority: &str,
        expected: &[&str],
        metadata: &[(&str, &str)],
    ) -> Result<Self, Failure> {
        let peer: SocketAddr = peer.parse().map_err(|_| {
            Failure::invalid(format!(
                "peer address {peer:?} is not an ip:port (such as 10.0.0.5:15008 or [fd00::5]:15008)"
            ))
        })?;
        let authority =
            Authority::parse(authority).map_err(|e| Failure::invalid(format!("authority {authority:?}: {e}")))?;
        if expected.is_empty() {
            return Err(Failure::invalid(
                "no expected peer identity: give at least one SPIFFE ID the peer may have",
            ));
        }
        let expected = expected
            .iter()
            .map(|id| parse_spiffe_id(id).map_err(|e| Failure::invalid(format!("expected peer identity: {e}"))))
            .collect::<Result<Vec<_>, _>>()?;
        let metadata = parse_metadata(metadata)?;
        Ok(Self {
            peer,
            request: ConnectRequest { authority, metadata },
            expected,
        })
    }
}

fn parse_metadata(headers: &[(&str, &str)]) -> Result<Metadata, Failure> {
    let mut metadata = Metadata::default();
    for &(name, value) in headers {
        let bad = |e: &dyn std::fmt::Display| Failure::invalid(format!("metadata header {name}: {e}"));
        match name.to_ascii_lowercase().as_str() {
            "forwarded" => metadata.forwarded = Some(Forwarded::parse(value).map_err(|e| bad(&e))?),
            "baggage" => metadata.baggage = Some(Baggage::parse(value).map_err(|e| bad(&e))?),
            "traceparent" => metadata.traceparent = Some(TraceParent::parse(value).map_err(|e| bad(&e))?),
            "x-forwarded-network" => metadata.x_forwarded_network = Some(value.trim().to_owned()),
            _ => {
                return Err(Failure::invalid(format!(
                    "unknown metadata header {name:?}: expected forwarded, baggage, traceparent or x-forwarded-network"
                )));
            }
        }
    }
    // Values that parse but cannot be sent (an invalid network name, an incomplete baggage).
    if let Some(e) = metadata.to_headers(&mut http::HeaderMap::new()).into_iter().next() {
        return Err(Failure::invalid(format!("metadata header {}: {e}", e.header())));
    }
    Ok(metadata)
}

/// The status and message of a failed tunnel.
fn connect_failure(e: &ConnectError) -> Failure {
    let status = match e {
        ConnectError::Tcp { .. } | ConnectError::HandshakeAbandoned => MeshwireStatus::MESHWIRE_ERR_CONNECT,
        ConnectError::Tls { source } => {
            if find_cause::<IdentityMismatch>(source.as_ref()).is_some() {
                MeshwireStatus::MESHWIRE_ERR_PEER_IDENTITY
            } else {
                MeshwireStatus::MESHWIRE_ERR_TLS
            }
        }
        ConnectError::HandshakeTimeout(_) => MeshwireStatus::MESHWIRE_ERR_TIMEOUT,
        ConnectError::Refused { .. } => MeshwireStatus::MESHWIRE_ERR_REFUSED,
        ConnectError::InvalidRequest(_) => MeshwireStatus::MESHWIRE_ERR_INVALID_ARGUMENT,
        _ => MeshwireStatus::MESHWIRE_ERR_PROTOCOL,
    };
    let mut message = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let text = c.to_string();
        if !message.contains(&text) {
            message.push_str(": ");
            message.push_str(&text);
        }
        cause = c.source();
    }
    Failure::new(status, message)
}

/// Opens the tunnel and bridges it to a new socket pair; returns the caller's end.
pub(crate) async fn dial(shared: Arc<Shared>, dial: Dial) -> Result<OwnedFd, Failure> {
    let peer = dial.peer;
    match tokio::time::timeout(DIAL_TIMEOUT, dial_inner(shared, dial)).await {
        Ok(result) => result,
        Err(_) => Err(Failure::new(
            MeshwireStatus::MESHWIRE_ERR_TIMEOUT,
            format!("dialing {peer} did not finish within {DIAL_TIMEOUT:?}"),
        )),
    }
}

async fn dial_inner(shared: Arc<Shared>, dial: Dial) -> Result<OwnedFd, Failure> {
    let certs = shared.certs.current();
    let tls = certs
        .client_config(dial.expected)
        .map_err(|e| Failure::new(MeshwireStatus::MESHWIRE_ERR_IDENTITY, e.to_string()))?;
    let tcp = TcpStream::connect(dial.peer).await.map_err(|e| {
        Failure::new(
            MeshwireStatus::MESHWIRE_ERR_CONNECT,
            format!("TCP connect to {}: {e}", dial.peer),
        )
    })?;
    // HTTP/2 control frames must not wait behind Nagle's algorithm.
    let _ = tcp.set_nodelay(true);
    let (connection, driver) = client::handshake(tcp, tls, &Settings::default(), TokioTimer)
        .await
        .map_err(|e| connect_failure(&e))?;
    let peer = dial.peer;
    tokio::spawn(async move {
        if let Err(e) = driver.await {
            tracing::debug!(%peer, error = %e, "HBONE connection ended");
        }
    });
    let mut tunnel = connection.open(&dial.request).await.map_err(|e| connect_failure(&e))?;
    // The connection closes once the tunnel ends: it carries this one tunnel only.
    drop(connection);

    let (ours, theirs) = std::os::unix::net::UnixStream::pair().map_err(|e| {
        Failure::new(
            MeshwireStatus::MESHWIRE_ERR_IO,
            format!("cannot create a socket pair: {e}"),
        )
    })?;
    ours.set_nonblocking(true)
        .map_err(|e| Failure::new(MeshwireStatus::MESHWIRE_ERR_IO, format!("socket pair: {e}")))?;
    let mut ours = tokio::net::UnixStream::from_std(ours)
        .map_err(|e| Failure::new(MeshwireStatus::MESHWIRE_ERR_IO, format!("socket pair: {e}")))?;
    let authority = dial.request.authority.clone();
    tokio::spawn(async move {
        let outcome = tunnel.splice(&mut ours, CopyConfig::default()).await;
        tracing::debug!(
            %peer, %authority, received = outcome.a_to_b, sent = outcome.b_to_a, error = ?outcome.error,
            "tunnel closed"
        );
    });
    Ok(OwnedFd::from(theirs))
}
