//! The floor references measured in the same run as the proxies: a plain userspace forwarder pair
//! (TCP in, TCP out, no TLS, no HTTP/2: what any proxy pair costs at least when it copies each byte
//! through user space) and the cost of ring's AES-GCM on this CPU (what encrypting each byte once on
//! one node and decrypting it once on the other costs at least). A TLS proxy pair that copies in user
//! space cannot cost less than their sum.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use ring::aead::{AES_256_GCM, Aad, LessSafeKey, Nonce, UnboundKey};
use serde::Serialize;
use tokio::net::{TcpListener, TcpStream};

/// The flag that makes the bench executable run only a forwarder (see [`forward`]).
pub(crate) const FORWARD_FLAG: &str = "--forward-internal";

/// The name of the forwarder pair in the tables.
pub(crate) const FORWARDER: &str = "forwarder";

/// Each direction's buffer in the forwarder: as large as the proxies' largest copy buffer, so that
/// the reference does not pay more system calls than they do.
const FORWARD_BUFFER: usize = 64 * 1024;

/// Runs a forwarder until killed: `--forward-internal <listen> <to> <workers>` accepts TCP on
/// `listen` and copies each connection both ways to a new connection to `to` (`TCP_NODELAY` on
/// both). Each of `workers` threads runs a single-threaded tokio runtime with a listener of its own
/// on the address (`SO_REUSEPORT`: the kernel spreads connections over them), so that both
/// directions of a connection stay on one thread, as cheap as a userspace forwarder gets.
pub(crate) fn forward(args: &[String]) -> anyhow::Result<()> {
    let [listen, to, workers] = args else {
        anyhow::bail!("usage: {FORWARD_FLAG} <listen address> <target address> <workers>");
    };
    let listen: SocketAddr = listen.parse().with_context(|| format!("listen address {listen:?}"))?;
    let to: SocketAddr = to.parse().with_context(|| format!("target address {to:?}"))?;
    let workers: usize = workers.parse().with_context(|| format!("workers {workers:?}"))?;
    let listeners = (0..workers.max(1))
        .map(|_| {
            let socket = std::net::TcpListener::from(reuseport_listener(listen)?);
            socket.set_nonblocking(true)?;
            Ok(socket)
        })
        .collect::<std::io::Result<Vec<_>>>()
        .with_context(|| format!("cannot listen on {listen}"))?;
    let threads: Vec<_> = listeners
        .into_iter()
        .map(|listener| std::thread::spawn(move || serve(listener, to)))
        .collect();
    for thread in threads {
        thread
            .join()
            .map_err(|_| anyhow::anyhow!("a forwarder thread panicked"))??;
    }
    Ok(())
}

/// A listening socket on `addr` with `SO_REUSEADDR` and `SO_REUSEPORT`.
fn reuseport_listener(addr: SocketAddr) -> std::io::Result<std::os::fd::OwnedFd> {
    use rustix::net::{AddressFamily, SocketFlags, SocketType, sockopt};
    let family = if addr.is_ipv4() {
        AddressFamily::INET
    } else {
        AddressFamily::INET6
    };
    let fd = rustix::net::socket_with(family, SocketType::STREAM, SocketFlags::CLOEXEC, None)?;
    sockopt::set_socket_reuseaddr(&fd, true)?;
    sockopt::set_socket_reuseport(&fd, true)?;
    rustix::net::bind(&fd, &addr)?;
    rustix::net::listen(&fd, 1024)?;
    Ok(fd)
}

/// One forwarder thread: its listener's connections, on a runtime of its own.
fn serve(listener: std::net::TcpListener, to: SocketAddr) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting a tokio runtime")?;
    runtime.block_on(async move {
        let listener = TcpListener::from_std(listener).context("registering the listener")?;
        loop {
            let Ok((inbound, _)) = listener.accept().await else {
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            };
            tokio::spawn(async move {
                let Ok(outbound) = TcpStream::connect(to).await else {
                    return;
                };
                let _ = inbound.set_nodelay(true);
                let _ = outbound.set_nodelay(true);
                let (mut inbound, mut outbound) = (inbound, outbound);
                let _ = tokio::io::copy_bidirectional_with_sizes(
                    &mut inbound,
                    &mut outbound,
                    FORWARD_BUFFER,
                    FORWARD_BUFFER,
                )
                .await;
            });
        }
    })
}

/// ring's AES-256-GCM (the cipher rustls negotiates first) on one core of this machine.
#[derive(Debug, Clone, Copy, Serialize)]
pub(crate) struct Aes {
    /// Encryption (seal) throughput of one thread, GB/s (10^9 bytes), in 16 KiB records as TLS sends.
    pub(crate) seal_gb_per_s: f64,
    /// Decryption (open) throughput of one thread, GB/s.
    pub(crate) open_gb_per_s: f64,
    /// CPU seconds to encrypt one GB once and decrypt it once: what AES adds to a pair at least.
    pub(crate) cpu_s_per_gb: f64,
}

/// A TLS record's payload.
const RECORD: usize = 16 * 1024;

/// Measures [`Aes`] for about `seconds` each way on this thread (thread CPU time, so a preempted
/// thread does not count the time it waited).
pub(crate) fn aes(seconds: f64) -> anyhow::Result<Aes> {
    let key = LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &[7u8; 32]).map_err(|_| anyhow::anyhow!("AES key"))?);
    let nonce = |i: u64| {
        let mut n = [0u8; 12];
        n[4..].copy_from_slice(&i.to_be_bytes());
        Nonce::assume_unique_for_key(n)
    };
    let mut record = vec![0x5au8; RECORD];
    let budget = Duration::from_secs_f64(seconds.max(0.05));
    // Seal: records encrypted in place (one key, a new nonce each).
    let start = cpu_now();
    let mut sealed = 0u64;
    let mut last_tag = None;
    while cpu_now() - start < budget {
        for _ in 0..64 {
            let tag = key
                .seal_in_place_separate_tag(nonce(sealed), Aad::empty(), &mut record)
                .map_err(|_| anyhow::anyhow!("AES-GCM seal failed"))?;
            sealed += 1;
            last_tag = Some(tag);
        }
    }
    let seal_time = (cpu_now() - start).as_secs_f64();
    // Open: one sealed record (with its tag) opened again and again, restored before each open.
    let mut sealed_record = vec![0x5au8; RECORD];
    let tag = key
        .seal_in_place_separate_tag(nonce(u64::MAX), Aad::empty(), &mut sealed_record)
        .map_err(|_| anyhow::anyhow!("AES-GCM seal failed"))?;
    sealed_record.extend_from_slice(tag.as_ref());
    let mut work = sealed_record.clone();
    let start = cpu_now();
    let mut opened = 0u64;
    while cpu_now() - start < budget {
        for _ in 0..64 {
            work.copy_from_slice(&sealed_record);
            key.open_in_place(nonce(u64::MAX), Aad::empty(), &mut work)
                .map_err(|_| anyhow::anyhow!("AES-GCM open failed: the benchmark's record is corrupt"))?;
            opened += 1;
        }
    }
    let open_time = (cpu_now() - start).as_secs_f64();
    std::hint::black_box((last_tag, &record));
    let seal_gb_per_s = (sealed * RECORD as u64) as f64 / 1e9 / seal_time;
    let open_gb_per_s = (opened * RECORD as u64) as f64 / 1e9 / open_time;
    Ok(Aes {
        seal_gb_per_s,
        open_gb_per_s,
        cpu_s_per_gb: 1.0 / seal_gb_per_s + 1.0 / open_gb_per_s,
    })
}

fn cpu_now() -> Duration {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::ThreadCPUTime);
    Duration::new(t.tv_sec.try_into().unwrap_or(0), t.tv_nsec.try_into().unwrap_or(0))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn aes_is_measured_and_its_cost_is_the_sum_of_both_ways() {
        let aes = aes(0.05).unwrap();
        assert!(aes.seal_gb_per_s > 0.01 && aes.open_gb_per_s > 0.01, "{aes:?}");
        let sum = 1.0 / aes.seal_gb_per_s + 1.0 / aes.open_gb_per_s;
        assert!((aes.cpu_s_per_gb - sum).abs() < 1e-9);
    }
}
