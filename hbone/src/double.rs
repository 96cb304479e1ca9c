//! Double HBONE (multi-network): an inner HBONE connection, with its own mTLS to the final
//! workload's identity, carried inside an outer tunnel to an east-west gateway.
//!
//! The gateway terminates only the outer CONNECT and splices the stream to the destination's
//! HBONE port; it never sees inside the inner TLS. Each outer stream carries one inner connection
//! with one inner stream; dropping the inner tunnel ends both.

use std::sync::Arc;

use rustls::ClientConfig;

use crate::client::{self, ConnectError, ConnectRequest, ConnectionDriver, Tunnel};
use crate::rt::{Executor, Timer};
use crate::settings::Settings;

/// Opens the inner tunnel through `outer`: mTLS with `inner_tls` (which expects the final
/// workload's identity), HTTP/2, and a CONNECT for `request` (typically with
/// `x-forwarded-network` in its metadata). The inner connection's driver goes to `executor`.
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
