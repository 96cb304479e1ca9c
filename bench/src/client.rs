//! The client side: opening a connection to the destination server, directly or through the SOCKS5
//! listener of proxy A, with a timeout on every step.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, bail};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// How long any one connect, handshake, read or write may take before the bench gives up.
pub(crate) const IO_TIMEOUT: Duration = Duration::from_secs(10);

/// How a client reaches the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Route {
    /// A plain TCP connection, no proxy.
    Direct,
    /// SOCKS5 CONNECT through proxy A at this address (then HBONE to proxy B).
    Socks5(SocketAddr),
    /// A plain TCP connection to the forwarder A at this address, which goes on to the server
    /// through the forwarder B.
    Forward(SocketAddr),
}

/// Runs `fut` with [`IO_TIMEOUT`]; `what` names the step in the error.
pub(crate) async fn timed<T, E>(what: &str, fut: impl Future<Output = Result<T, E>>) -> anyhow::Result<T>
where
    E: std::error::Error + Send + Sync + 'static,
{
    match tokio::time::timeout(IO_TIMEOUT, fut).await {
        Ok(result) => result.with_context(|| what.to_owned()),
        Err(_) => bail!("{what}: no progress in {IO_TIMEOUT:?}"),
    }
}

/// Opens a connection to `target` along `route`, `TCP_NODELAY` on. Through SOCKS5 it returns once the
/// proxy has answered the CONNECT (after the HBONE tunnel to the destination is up).
pub(crate) async fn open(route: Route, target: SocketAddr) -> anyhow::Result<TcpStream> {
    match route {
        Route::Direct => {
            let tcp = timed("connecting to the server", TcpStream::connect(target)).await?;
            tcp.set_nodelay(true)?;
            Ok(tcp)
        }
        Route::Forward(forwarder) => {
            let tcp = timed("connecting to the forwarder A", TcpStream::connect(forwarder)).await?;
            tcp.set_nodelay(true)?;
            Ok(tcp)
        }
        Route::Socks5(proxy) => {
            let mut tcp = timed(
                "connecting to the SOCKS5 listener of proxy A",
                TcpStream::connect(proxy),
            )
            .await?;
            tcp.set_nodelay(true)?;
            socks5_connect(&mut tcp, target).await?;
            Ok(tcp)
        }
    }
}

async fn socks5_connect(tcp: &mut TcpStream, target: SocketAddr) -> anyhow::Result<()> {
    timed("SOCKS5 greeting", tcp.write_all(&[5, 1, 0])).await?;
    let mut choice = [0u8; 2];
    timed("SOCKS5 method choice", tcp.read_exact(&mut choice)).await?;
    if choice != [5, 0] {
        bail!("SOCKS5: the proxy refused the no-authentication method (answered {choice:?})");
    }
    let SocketAddr::V4(v4) = target else {
        bail!("SOCKS5: IPv4 target expected, got {target}");
    };
    let mut request = vec![5, 1, 0, 1];
    request.extend_from_slice(&v4.ip().octets());
    request.extend_from_slice(&v4.port().to_be_bytes());
    timed("SOCKS5 CONNECT request", tcp.write_all(&request)).await?;
    let mut head = [0u8; 4];
    timed("SOCKS5 CONNECT reply", tcp.read_exact(&mut head)).await?;
    if head[0] != 5 || head[1] != 0 {
        bail!(
            "SOCKS5 CONNECT to {target} failed with reply code {} (see the proxy logs)",
            head[1]
        );
    }
    let rest = match head[3] {
        1 => 4 + 2,
        4 => 16 + 2,
        3 => {
            let mut len = [0u8; 1];
            timed("SOCKS5 reply address", tcp.read_exact(&mut len)).await?;
            usize::from(len[0]) + 2
        }
        other => bail!("SOCKS5: bad address type {other} in the reply"),
    };
    let mut bound = vec![0u8; rest];
    timed("SOCKS5 reply address", tcp.read_exact(&mut bound)).await?;
    Ok(())
}
