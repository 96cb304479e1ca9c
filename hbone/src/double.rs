//! Double HBONE (multi-network): an inner HBONE connection, with its own mTLS to the final
//! workload's identity, carried inside an outer tunnel to an east-west gateway.
//!
//! The gateway terminates only the outer CONNECT and splices the stream to the HBONE port of the
//! destination it chooses (for `<service hostname>:<port>`, as ztunnel sends it, any endpoint of
//! the service behind it); it never sees inside the inner TLS. Each outer stream carries one inner connection
//! with one inner stream; dropping the inner tunnel ends both.

use std::sync::Arc;

use rustls::ClientConfig;

use crate::client::{self, ConnectError, ConnectRequest, ConnectionDriver, Tunnel};
use crate::rt::{Executor, Timer};
use crate::settings::Settings;

/// Opens the inner tunnel through `outer`: mTLS with `inner_tls` (which expects the identities the
/// final destination may present: every endpoint the gateway may route to), HTTP/2, and a CONNECT
/// for `request` (typically with `x-forwarded-network` in its metadata). The inner connection's driver goes to `executor`.
///
/// # Example
///
/// ```
/// use meshwire_hbone::client::{self, ConnectRequest};
/// use meshwire_hbone::{Settings, double, headers::Authority};
/// use meshwire_rt::TokioExecutor;
/// use tokio::io::{AsyncReadExt, AsyncWriteExt};
/// # use std::sync::Arc;
/// # use meshwire_hbone::server::{self, Connected, Handler, InboundRequest, Refusal, ServeOptions};
/// # use meshwire_identity::{id::{SpiffeId, TrustDomain}, source::local_ca::LocalCa, tls};
/// # use meshwire_rt::TokioTimer;
/// # /// Refuses port 1 (401); else connects an upstream, here an in-process echo.
/// # struct Echo;
/// # impl Handler for Echo {
/// #     type Upstream = tokio::io::DuplexStream;
/// #     async fn connect(&self, request: &InboundRequest) -> Result<Connected<Self::Upstream>, Refusal> {
/// #         if request.authority.as_socket_addr().is_some_and(|a| a.port() == 1) {
/// #             return Err(Refusal::unauthorized(format!("{} may not reach port 1", request.peer)));
/// #         }
/// #         let (upstream, echo) = tokio::io::duplex(64 * 1024);
/// #         let (mut r, mut w) = tokio::io::split(echo);
/// #         tokio::spawn(async move { tokio::io::copy(&mut r, &mut w).await?; w.shutdown().await });
/// #         Ok(upstream.into())
/// #     }
/// # }
/// # /// An east-west gateway: splices each outer stream to the final workload's HBONE server.
/// # struct Gateway(Arc<rustls::ServerConfig>);
/// # impl Handler for Gateway {
/// #     type Upstream = tokio::io::DuplexStream;
/// #     async fn connect(&self, _: &InboundRequest) -> Result<Connected<Self::Upstream>, Refusal> {
/// #         let (upstream, workload) = tokio::io::duplex(1 << 20);
/// #         let tls = self.0.clone();
/// #         tokio::spawn(async move { server::serve(workload, tls, &ServeOptions::default(), &Echo, &TokioTimer, std::future::pending()).await });
/// #         Ok(upstream.into())
/// #     }
/// # }
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// # let ca = LocalCa::ephemeral(TrustDomain::new("cluster.local")?)?;
/// # let server_id = SpiffeId::new("spiffe://cluster.local/ns/default/sa/server")?;
/// # let server = ca.issue(&server_id)?;
/// # let client = ca.issue(&SpiffeId::new("spiffe://cluster.local/ns/default/sa/client")?)?;
/// # let domains = tls::TrustDomains::only(ca.trust_domain().clone());
/// # let server_tls = Arc::new(tls::server_config(&server.svid, &server.bundles, &domains, vec![b"h2".to_vec()])?);
/// # let client_tls = Arc::new(tls::client_config(&client.svid, &client.bundles, vec![server_id], vec![b"h2".to_vec()])?);
/// # let (gateway_tls, workload_tls) = (client_tls.clone(), client_tls);
/// # let (io, gateway_io) = tokio::io::duplex(1 << 20);
/// # let gateway = Gateway(server_tls.clone());
/// # tokio::spawn(async move { server::serve(gateway_io, server_tls, &ServeOptions::default(), &gateway, &TokioTimer, std::future::pending()).await });
/// // The outer tunnel: to the gateway, for the final workload's HBONE port.
/// let (to_gateway, driver) = client::handshake(io, gateway_tls, &Settings::default(), TokioTimer).await?;
/// tokio::spawn(driver);
/// let outer = to_gateway.open(&ConnectRequest::new(Authority::parse("10.1.0.2:15008")?)).await?;
/// // The inner tunnel: mTLS with the workload's identity (`workload_tls` expects it), then CONNECT.
/// let request = ConnectRequest::new(Authority::parse("10.1.0.2:8080")?);
/// let executor = TokioExecutor::new();
/// let mut tunnel = double::connect(outer, workload_tls, &request, &Settings::default(), TokioTimer, &executor).await?;
/// tunnel.write_all(b"hello").await?;
/// tunnel.shutdown().await?;
/// let mut echoed = Vec::new();
/// tunnel.read_to_end(&mut echoed).await?;
/// assert_eq!(echoed, b"hello");
/// # Ok(())
/// # }
/// ```
pub async fn connect<T, E>(
    outer: Tunnel,
    inner_tls: Arc<ClientConfig>,
    request: &ConnectRequest,
    settings: &Settings,
    timer: T,
    executor: &E,
) -> Result<Tunnel, ConnectError>
where
    T: Timer,
    E: Executor<InnerDriver<T>>,
{
    let (inner, driver) = client::handshake(outer, inner_tls, settings, timer).await?;
    executor.execute(InnerDriver(driver));
    // `inner` is dropped on return: with its one stream ended, the inner connection closes.
    inner.open(request).await
}

/// Drives the inner connection of a double-HBONE tunnel; ends when it closes.
pub struct InnerDriver<T: Timer>(ConnectionDriver<Tunnel, T>);

impl<T: Timer> std::future::Future for InnerDriver<T> {
    type Output = ();

    fn poll(mut self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<()> {
        std::pin::Pin::new(&mut self.0).poll(cx).map(|result| {
            if let Err(e) = result {
                tracing::debug!(error = %e, "inner HBONE connection ended");
            }
        })
    }
}
