//! The DNS proxy's part of the runtime seam on glommio ([`Datagram`] for [`Glommio`]): a pending
//! accept and a pending receive polled again and again by one task, as the DNS server's task polls
//! them whenever any of its forwarded queries makes progress, still complete and wake that task.
//!
//! glommio 0.9.0 kept a clone of the task's waker for every poll of a pending operation until the
//! operation completed; past 32,767 clones the task's 16-bit reference count overflowed, the clone
//! panicked, and a wake-up that hit it left the task unscheduled for good (`ztunnel-uring`'s DNS
//! server stopped answering after a few hundred thousand forwarded queries). The vendored glommio
//! keeps one waker per pending operation (`vendor/glommio/PATCHES.md`).
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::future::{Future, poll_fn};
use std::io::Write;
use std::net::{Ipv4Addr, SocketAddr};
use std::pin::pin;
use std::task::Poll;

use glommio::Placement;
use meshwire_dataplane::rt::datagram::Datagram;
use meshwire_dataplane::rt::socket::{self, DefaultSocketFactory, SocketFactory, SocketOptions};
use meshwire_dataplane_uring::rt::Glommio;
use meshwire_testkit::glommio::{LIMIT, run, within};

/// Polls of the pending operations: more than a 16-bit reference count holds.
const POLLS: u32 = 40_000;

#[test]
fn a_pending_accept_and_receive_polled_again_and_again_still_complete() {
    run("uring-repolled", Placement::Unbound, || async {
        let any = SocketAddr::from((Ipv4Addr::LOCALHOST, 0));
        let opts = SocketOptions::default();
        let listener = Glommio::listener(DefaultSocketFactory.listener(any, &opts).unwrap()).unwrap();
        let udp = DefaultSocketFactory.datagram(any, &opts).unwrap();
        let udp_addr = socket::local_addr(&udp).unwrap();
        let udp = Glommio::udp(udp).unwrap();
        let tcp_addr = listener.local_addr().unwrap();

        let mut accept = pin!(Glommio::accept(&listener));
        let mut recv = pin!(async {
            let mut buf = [0; 64];
            let (len, from) = Glommio::recv_from(&udp, &mut buf).await?;
            std::io::Result::Ok((buf[..len].to_vec(), from))
        });
        let mut polls = 0;
        poll_fn(|cx| {
            assert!(accept.as_mut().poll(cx).is_pending(), "nothing connected yet");
            assert!(recv.as_mut().poll(cx).is_pending(), "nothing sent yet");
            polls += 1;
            if polls == POLLS {
                return Poll::Ready(());
            }
            // Polled again at once, as a task woken by its other work is.
            cx.waker().wake_by_ref();
            Poll::Pending
        })
        .await;

        // A client connects and sends a datagram: both operations complete, waking the task.
        let mut client = std::net::TcpStream::connect(tcp_addr).unwrap();
        client.write_all(b"x").unwrap();
        let sender = std::net::UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        sender.send_to(b"datagram", udp_addr).unwrap();
        within(LIMIT, "the accept", accept).await.unwrap();
        let (datagram, from) = within(LIMIT, "the receive", recv).await.unwrap();
        assert_eq!(datagram, b"datagram");
        assert_eq!(from, sender.local_addr().unwrap());
    });
}
