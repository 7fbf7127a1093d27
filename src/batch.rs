//! Bursts of datagrams sent in one trip through the kernel (UDP generic segmentation offload),
//! and received in one system call (`recvmmsg`).
//!
//! A video frame leaves an app as a burst of equal-sized packets to one peer, and reaches the
//! proxy together. Sent one `sendto` each, every packet pays the whole stack (route, netfilter,
//! the device, and on loopback the receiver's stack too); sent as one GSO buffer, the burst pays
//! it once and the kernel cuts it into the same datagrams at the end. [`SendBatch`] collects
//! datagrams while they share a destination and a size, and sends each run with one `sendmsg`
//! carrying `UDP_SEGMENT`. Where GSO is refused, the run goes out one `sendto` per datagram: for
//! that run if it was the run (a segment above the route's MTU), for good if it was the device
//! (no checksum offload).

use std::io;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::sync::Arc;

/// The kernel's limit on segments in one GSO send (`UDP_MAX_SEGMENTS`).
const MAX_SEGMENTS: usize = 64;
/// The largest GSO buffer: an IP datagram's length limit, less headers.
const MAX_BYTES: usize = 65_000;

/// Datagrams of one size to one destination, waiting to go out as one GSO send.
#[derive(Debug, Default)]
pub(crate) struct SendBatch {
    buf: Vec<u8>,
    /// `None`: the socket's connected peer.
    to: Option<SocketAddr>,
    size: usize,
    count: usize,
    /// Set after the kernel refused GSO once: every datagram is sent alone from then on.
    no_gso: bool,
}

/// How a flush went: datagrams handed to the kernel and datagrams dropped (a full buffer drops
/// them, as the network would).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Sent {
    pub(crate) ok: u64,
    pub(crate) failed: u64,
}

impl std::ops::AddAssign for Sent {
    fn add_assign(&mut self, other: Self) {
        self.ok += other.ok;
        self.failed += other.failed;
    }
}

impl SendBatch {
    /// Queues a datagram of `len` bytes that `write` appends, for `to` on `socket`. A datagram
    /// that cannot join the waiting run (another destination or size, or the run is full) first
    /// sends the run; what that send did is returned.
    pub(crate) fn push<S: AsRawFd>(
        &mut self,
        socket: &S,
        to: Option<SocketAddr>,
        len: usize,
        write: impl FnOnce(&mut Vec<u8>),
    ) -> Sent {
        let joins = self.count > 0
            && self.to == to
            && self.size == len
            && self.count < MAX_SEGMENTS
            && self.buf.len() + len <= MAX_BYTES;
        let sent = if joins || self.count == 0 {
            Sent::default()
        } else {
            self.flush(socket)
        };
        let before = self.buf.len();
        write(&mut self.buf);
        debug_assert_eq!(self.buf.len() - before, len);
        self.to = to;
        self.size = len;
        self.count += 1;
        sent
    }

    /// Sends the waiting run on `socket` (the one it was queued for).
    pub(crate) fn flush<S: AsRawFd>(&mut self, socket: &S) -> Sent {
        let sent = match self.count {
            0 => Sent::default(),
            1 => one(send_one(socket, &self.buf, self.to)),
            n if !self.no_gso => match send_gso(socket, &self.buf, self.to, self.size) {
                Ok(()) => Sent {
                    ok: n as u64,
                    failed: 0,
                },
                // Refused, the kernel dropped the whole buffer: send it again piecewise.
                Err(e) => match GsoRefusal::of(&e) {
                    // The route's device cannot checksum a GSO buffer: never again here.
                    Some(GsoRefusal::Device) => {
                        self.no_gso = true;
                        self.send_each(socket)
                    }
                    // This run only (a segment above the path MTU, say): the kernel fragments
                    // single datagrams as it always would.
                    Some(GsoRefusal::Run) => self.send_each(socket),
                    None => Sent {
                        ok: 0,
                        failed: n as u64,
                    },
                },
            },
            _ => self.send_each(socket),
        };
        self.buf.clear();
        self.count = 0;
        sent
    }

    fn send_each<S: AsRawFd>(&self, socket: &S) -> Sent {
        let mut sent = Sent::default();
        for datagram in self.buf.chunks(self.size.max(1)) {
            sent += one(send_one(socket, datagram, self.to));
        }
        sent
    }
}

thread_local! {
    /// One batch per runtime thread, shared by every association on it (see [`send_batched`]).
    static SCRATCH: std::cell::RefCell<SendBatch> = std::cell::RefCell::new(SendBatch::default());
}

/// Runs `fill` with this thread's batch for `socket`, then sends what it left waiting; returns
/// everything sent. The batch is empty again afterwards, so an idle association holds none.
pub(crate) fn send_batched<S: AsRawFd>(
    socket: &S,
    fill: impl FnOnce(&mut SendBatch) -> Sent,
) -> Sent {
    SCRATCH.with_borrow_mut(|batch| {
        let mut sent = fill(batch);
        sent += batch.flush(socket);
        sent
    })
}

/// This thread's batch, for datagrams that leave from several sockets in turn (see
/// [`send_bursts`]).
pub(crate) struct Bursts<'a, T> {
    batch: &'a mut SendBatch,
    socket: Option<Arc<T>>,
}

impl<T: AsRawFd> Bursts<'_, T> {
    /// Queues a datagram for `to` on `socket`: as [`SendBatch::push`], and a datagram for
    /// another socket first sends the run waiting on the last one.
    pub(crate) fn push(
        &mut self,
        socket: &Arc<T>,
        to: Option<SocketAddr>,
        len: usize,
        write: impl FnOnce(&mut Vec<u8>),
    ) -> Sent {
        let mut sent = Sent::default();
        if !self.socket.as_ref().is_some_and(|s| Arc::ptr_eq(s, socket)) {
            if let Some(last) = self.socket.take() {
                sent += self.batch.flush(&*last);
            }
            self.socket = Some(socket.clone());
        }
        sent += self.batch.push(&**socket, to, len, write);
        sent
    }
}

/// Runs `fill` with this thread's batch, then sends what it left waiting; returns everything
/// sent.
pub(crate) fn send_bursts<T: AsRawFd>(fill: impl FnOnce(&mut Bursts<'_, T>) -> Sent) -> Sent {
    SCRATCH.with_borrow_mut(|batch| {
        let mut bursts = Bursts {
            batch,
            socket: None,
        };
        let mut sent = fill(&mut bursts);
        if let Some(last) = bursts.socket.take() {
            sent += bursts.batch.flush(&*last);
        }
        sent
    })
}

/// Datagrams taken per `recvmmsg`.
pub(crate) const RECV_SLOTS: usize = 16;

type Headers = nix::sys::socket::MultiHeaders<nix::sys::socket::SockaddrStorage>;
type Received<'a> = nix::sys::socket::RecvMsg<'a, 'a, nix::sys::socket::SockaddrStorage>;

/// One runtime thread's receive space: `RECV_SLOTS` buffers of `HEADROOM` + 64 KiB (pages are
/// only touched as far as datagrams reach), and the system call's headers: without control
/// messages, and with room for an original destination; one of each per address family.
///
/// Per family because nix (0.29) does not reset each header's address and control lengths
/// before a call, and the kernel shrinks them to what it wrote: headers last used for IPv4 would
/// cut an IPv6 sender's address (and original destination) short.
struct RecvSpace {
    slots: Vec<Box<[u8]>>,
    /// IPv4, IPv6.
    headers: [Headers; 2],
    with_destination: [Headers; 2],
}

thread_local! {
    static RECV: std::cell::RefCell<RecvSpace> = std::cell::RefCell::new(RecvSpace {
        slots: (0..RECV_SLOTS)
            .map(|_| vec![0u8; crate::HEADROOM + 65_536].into_boxed_slice())
            .collect(),
        headers: [(); 2].map(|()| Headers::preallocate(RECV_SLOTS, None)),
        with_destination: [(); 2].map(|()| {
            Headers::preallocate(RECV_SLOTS, Some(nix::cmsg_space!(nix::libc::sockaddr_in6)))
        }),
    });
}

/// Receives the datagrams waiting on `socket` (up to 16) in one `recvmmsg`, and calls
/// `each(from, slot, len)` for each in order: the datagram is `slot[HEADROOM..HEADROOM + len]`,
/// with `HEADROOM` free bytes before it for a header. `v6`: the socket is IPv6 (see
/// `RecvSpace`). Returns how many there were; `WouldBlock` when none (which also tells tokio the
/// socket is drained).
pub(crate) fn recv_burst(
    socket: &tokio::net::UdpSocket,
    v6: bool,
    mut each: impl FnMut(SocketAddr, &mut [u8], usize),
) -> io::Result<usize> {
    RECV.with_borrow_mut(|space| {
        let RecvSpace { slots, headers, .. } = space;
        let headers = &mut headers[usize::from(v6)];
        let got = receive_once(socket, || {
            receive(slots, headers, socket.as_raw_fd(), |_| Some(()))
        })?;
        for (slot, got) in slots.iter_mut().zip(&got) {
            if let Some((from, (), len)) = got {
                each(*from, slot, *len);
            }
        }
        Ok(got.len())
    })
}

/// [`recv_burst`] for a socket with `IP_RECVORIGDSTADDR` / `IPV6_RECVORIGDSTADDR` (the
/// transparent listener): `each(from, original destination, slot, len)`. A datagram without
/// its original destination is skipped.
pub(crate) fn recv_burst_with_destination(
    socket: &tokio::net::UdpSocket,
    v6: bool,
    mut each: impl FnMut(SocketAddr, SocketAddr, &mut [u8], usize),
) -> io::Result<usize> {
    RECV.with_borrow_mut(|space| {
        let RecvSpace {
            slots,
            with_destination,
            ..
        } = space;
        let with_destination = &mut with_destination[usize::from(v6)];
        let got = receive_once(socket, || {
            receive(
                slots,
                with_destination,
                socket.as_raw_fd(),
                original_destination,
            )
        })?;
        for (slot, got) in slots.iter_mut().zip(&got) {
            if let Some((from, original, len)) = got {
                each(*from, *original, slot, *len);
            }
        }
        Ok(got.len())
    })
}

/// One `recvmmsg` (`receive`) under tokio's readiness. A short batch, fewer datagrams than
/// slots, shows that the queue was empty when the kernel returned, so readiness is cleared
/// there and then (as tokio does for a short read on a stream) and the caller's next try
/// returns `WouldBlock` without the system call that would only say `EAGAIN`. With one datagram
/// per wake-up, as each call's socket has, that halves the receive calls. No wake-up is lost: a
/// datagram arriving after the call raises a fresh edge that tokio's readiness tick keeps.
fn receive_once<R>(
    socket: &tokio::net::UdpSocket,
    receive: impl FnOnce() -> io::Result<Vec<R>>,
) -> io::Result<Vec<R>> {
    let mut short = None;
    let got = socket.try_io(tokio::io::Interest::READABLE, || {
        let got = receive()?;
        if got.len() < RECV_SLOTS {
            short = Some(got);
            return Err(io::ErrorKind::WouldBlock.into());
        }
        Ok(got)
    });
    match (got, short) {
        (_, Some(got)) => Ok(got),
        (got, None) => got,
    }
}

/// The original destination a transparent socket reports for a datagram.
fn original_destination(m: &Received<'_>) -> Option<SocketAddr> {
    use nix::sys::socket::ControlMessageOwned;
    use std::net::{Ipv4Addr, Ipv6Addr, SocketAddrV4, SocketAddrV6};
    m.cmsgs().ok()?.find_map(|c| match c {
        ControlMessageOwned::Ipv4OrigDstAddr(sin) => Some(SocketAddr::V4(SocketAddrV4::new(
            Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)),
            u16::from_be(sin.sin_port),
        ))),
        ControlMessageOwned::Ipv6OrigDstAddr(sin6) => Some(SocketAddr::V6(SocketAddrV6::new(
            Ipv6Addr::from(sin6.sin6_addr.s6_addr),
            u16::from_be(sin6.sin6_port),
            0,
            0,
        ))),
        _ => None,
    })
}

/// Each slot's sender, what `extra` makes of its message, and its length, in slot order
/// (`None`: no usable datagram in that slot).
fn receive<T>(
    slots: &mut [Box<[u8]>],
    headers: &mut Headers,
    fd: std::os::fd::RawFd,
    extra: impl Fn(&Received<'_>) -> Option<T>,
) -> io::Result<Vec<Option<(SocketAddr, T, usize)>>> {
    use nix::sys::socket::{MsgFlags, recvmmsg};
    let mut iovs: Vec<[io::IoSliceMut<'_>; 1]> = slots
        .iter_mut()
        .map(|s| {
            [io::IoSliceMut::new(
                s.get_mut(crate::HEADROOM..).unwrap_or_default(),
            )]
        })
        .collect();
    let results = recvmmsg(fd, headers, iovs.iter_mut(), MsgFlags::MSG_DONTWAIT, None)
        .map_err(io::Error::from)?;
    Ok(results
        .map(|m| {
            let a = m.address?;
            let from = a
                .as_sockaddr_in()
                .map(|v4| SocketAddr::from((v4.ip(), v4.port())))
                .or_else(|| {
                    a.as_sockaddr_in6()
                        .map(|v6| SocketAddr::from((v6.ip(), v6.port())))
                })?;
            // Never cut short with 64 KiB slots; a truncated datagram would be dropped here.
            if m.flags.contains(MsgFlags::MSG_TRUNC) {
                return None;
            }
            Some((from, extra(&m)?, m.bytes))
        })
        .collect())
}

/// Polls `future` once: its output if it is ready now. For draining what a queue already holds
/// without waiting (the waker is a no-op, so a pending future is simply dropped).
pub(crate) fn ready<F: std::future::Future>(future: F) -> Option<F::Output> {
    let mut future = std::pin::pin!(future);
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    match future.as_mut().poll(&mut cx) {
        std::task::Poll::Ready(out) => Some(out),
        std::task::Poll::Pending => None,
    }
}

/// Why `udp_sendmsg` refused a GSO send (dropping it whole).
enum GsoRefusal {
    /// `EIO`: the device on the route cannot checksum it.
    Device,
    /// `EINVAL`: this buffer (a segment larger than the route's MTU, too many segments).
    Run,
}

impl GsoRefusal {
    fn of(e: &io::Error) -> Option<Self> {
        use nix::errno::Errno;
        match e.raw_os_error() {
            Some(c) if c == Errno::EIO as i32 => Some(Self::Device),
            Some(c) if c == Errno::EINVAL as i32 => Some(Self::Run),
            _ => None,
        }
    }
}

fn one(r: io::Result<()>) -> Sent {
    match r {
        Ok(()) => Sent { ok: 1, failed: 0 },
        Err(_) => Sent { ok: 0, failed: 1 },
    }
}

fn send_one<S: AsRawFd>(socket: &S, datagram: &[u8], to: Option<SocketAddr>) -> io::Result<()> {
    use nix::sys::socket::{MsgFlags, SockaddrStorage, send, sendto};
    let fd = socket.as_raw_fd();
    match to {
        Some(to) => sendto(fd, datagram, &SockaddrStorage::from(to), MsgFlags::empty()),
        None => send(fd, datagram, MsgFlags::empty()),
    }
    .map(drop)
    .map_err(io::Error::from)
}

fn send_gso<S: AsRawFd>(
    socket: &S,
    buf: &[u8],
    to: Option<SocketAddr>,
    size: usize,
) -> io::Result<()> {
    use nix::sys::socket::{ControlMessage, MsgFlags, SockaddrStorage, sendmsg};
    let segment = u16::try_from(size).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    let iov = [io::IoSlice::new(buf)];
    let cmsg = [ControlMessage::UdpGsoSegments(&segment)];
    let to = to.map(SockaddrStorage::from);
    sendmsg(
        socket.as_raw_fd(),
        &iov,
        &cmsg,
        MsgFlags::empty(),
        to.as_ref(),
    )
    .map(drop)
    .map_err(io::Error::from)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::UdpSocket;
    use std::time::Duration;

    fn pair() -> (UdpSocket, UdpSocket) {
        let rx = UdpSocket::bind("127.0.0.1:0").expect("bind");
        rx.set_read_timeout(Some(Duration::from_secs(2)))
            .expect("timeout");
        // Room for 200 small datagrams at once (each costs a whole buffer in the kernel).
        let _ = socket2::SockRef::from(&rx).set_recv_buffer_size(1 << 20);
        let tx = UdpSocket::bind("127.0.0.1:0").expect("bind");
        (tx, rx)
    }

    fn received(rx: &UdpSocket, n: usize) -> Vec<Vec<u8>> {
        let mut buf = [0u8; 2048];
        (0..n)
            .map(|_| {
                let (len, _) = rx.recv_from(&mut buf).expect("a datagram");
                buf[..len].to_vec()
            })
            .collect()
    }

    #[test]
    fn a_run_of_equal_datagrams_arrives_as_the_same_datagrams_in_order() {
        let (tx, rx) = pair();
        let to = rx.local_addr().ok();
        let mut batch = SendBatch::default();
        for i in 0..10u8 {
            let sent = batch.push(&tx, to, 100, |b| b.extend_from_slice(&[i; 100]));
            assert_eq!(sent, Sent::default(), "nothing sent before the run ends");
        }
        assert_eq!(batch.flush(&tx), Sent { ok: 10, failed: 0 });
        assert!(!batch.no_gso, "loopback takes GSO sends");
        let got = received(&rx, 10);
        for (i, d) in got.iter().enumerate() {
            assert_eq!(d, &vec![i as u8; 100]);
        }
        assert_eq!(batch.count, 0);
    }

    #[test]
    fn a_new_size_or_destination_sends_the_run_before_it() {
        let (tx, rx) = pair();
        let rx2 = UdpSocket::bind("127.0.0.1:0").expect("bind");
        rx2.set_read_timeout(Some(Duration::from_secs(2)))
            .expect("timeout");
        let (to, to2) = (rx.local_addr().ok(), rx2.local_addr().ok());
        let mut batch = SendBatch::default();
        batch.push(&tx, to, 50, |b| b.extend_from_slice(&[1; 50]));
        batch.push(&tx, to, 50, |b| b.extend_from_slice(&[2; 50]));
        let sent = batch.push(&tx, to, 20, |b| b.extend_from_slice(&[3; 20]));
        assert_eq!(sent, Sent { ok: 2, failed: 0 });
        let sent = batch.push(&tx, to2, 20, |b| b.extend_from_slice(&[4; 20]));
        assert_eq!(sent, Sent { ok: 1, failed: 0 });
        assert_eq!(batch.flush(&tx), Sent { ok: 1, failed: 0 });
        assert_eq!(
            received(&rx, 3),
            vec![vec![1; 50], vec![2; 50], vec![3; 20]]
        );
        assert_eq!(received(&rx2, 1), vec![vec![4; 20]]);
    }

    #[test]
    fn a_full_run_is_sent_at_the_segment_limit() {
        let (tx, rx) = pair();
        let to = rx.local_addr().ok();
        let mut batch = SendBatch::default();
        let mut sent = Sent::default();
        for i in 0..(MAX_SEGMENTS + 3) {
            sent += batch.push(&tx, to, 8, |b| {
                b.extend_from_slice(&(i as u64).to_be_bytes())
            });
        }
        assert_eq!(sent.ok, MAX_SEGMENTS as u64);
        sent += batch.flush(&tx);
        assert_eq!(sent.ok, MAX_SEGMENTS as u64 + 3);
        let got = received(&rx, MAX_SEGMENTS + 3);
        for (i, d) in got.iter().enumerate() {
            assert_eq!(d.as_slice(), (i as u64).to_be_bytes());
        }
    }

    #[test]
    fn bursts_from_two_sockets_leave_each_from_its_own_socket() {
        let (a, rx) = pair();
        let (a, b) = (
            Arc::new(a),
            Arc::new(UdpSocket::bind("127.0.0.1:0").expect("bind")),
        );
        let to = rx.local_addr().ok();
        let sent = send_bursts(|bursts| {
            let mut sent = Sent::default();
            for (socket, byte) in [(&a, 1u8), (&a, 2), (&b, 3), (&b, 4), (&a, 5)] {
                sent += bursts.push(socket, to, 10, |buf| buf.extend_from_slice(&[byte; 10]));
            }
            sent
        });
        assert_eq!(sent, Sent { ok: 5, failed: 0 });
        let mut buf = [0u8; 64];
        let mut got = Vec::new();
        for _ in 0..5 {
            let (n, from) = rx.recv_from(&mut buf).expect("a datagram");
            got.push((from, buf[..n].to_vec()));
        }
        let (from_a, from_b) = (a.local_addr().ok(), b.local_addr().ok());
        assert_eq!(
            got,
            [
                (from_a, 1),
                (from_a, 2),
                (from_b, 3),
                (from_b, 4),
                (from_a, 5)
            ]
            .map(|(f, byte)| (f.expect("addr"), vec![byte; 10]))
        );
    }

    #[test]
    fn a_run_the_kernel_refuses_goes_out_piecewise_and_gso_stays_on() {
        // More segments than any kernel takes in one GSO send: udp_sendmsg says EINVAL.
        let (tx, rx) = pair();
        let mut batch = SendBatch {
            to: rx.local_addr().ok(),
            size: 8,
            ..SendBatch::default()
        };
        for i in 0..200u64 {
            batch.buf.extend_from_slice(&i.to_be_bytes());
        }
        batch.count = 200;
        assert_eq!(batch.flush(&tx), Sent { ok: 200, failed: 0 });
        assert!(!batch.no_gso, "one refused run does not turn GSO off");
        let got = received(&rx, 200);
        for (i, d) in got.iter().enumerate() {
            assert_eq!(d.as_slice(), (i as u64).to_be_bytes());
        }
    }

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime")
    }

    #[test]
    fn bursts_are_received_whole_in_order_with_their_senders_then_would_block() {
        runtime().block_on(async {
            let rx = tokio::net::UdpSocket::bind("127.0.0.1:0")
                .await
                .expect("bind");
            let _ = socket2::SockRef::from(&rx).set_recv_buffer_size(4 << 20);
            let to = rx.local_addr().expect("addr");
            let (a, b) = (
                UdpSocket::bind("127.0.0.1:0").expect("a"),
                UdpSocket::bind("127.0.0.1:0").expect("b"),
            );
            // 40 datagrams, more than one recvmmsg takes, of changing sizes, one near 64 KiB.
            let mut sent = Vec::new();
            for i in 0..40usize {
                let sender = if i % 3 == 0 { &b } else { &a };
                let len = if i == 7 { 60_000 } else { 1 + i * 37 };
                let d = vec![i as u8; len];
                sender.send_to(&d, to).expect("send");
                sent.push((sender.local_addr().expect("addr"), d));
            }
            rx.readable().await.expect("readable");
            let mut got = Vec::new();
            let mut calls = 0;
            loop {
                let r = recv_burst(&rx, false, |from, slot, n| {
                    got.push((from, slot[crate::HEADROOM..crate::HEADROOM + n].to_vec()));
                });
                match r {
                    Ok(n) => assert!((1..=RECV_SLOTS).contains(&n), "{n}"),
                    Err(e) => {
                        assert_eq!(e.kind(), io::ErrorKind::WouldBlock);
                        break;
                    }
                }
                calls += 1;
            }
            assert_eq!(got, sent);
            assert!(calls <= 4, "{calls} recvmmsg calls for 40 datagrams");
        });
    }

    #[test]
    fn a_short_burst_clears_readiness_and_the_next_datagram_still_wakes_the_reader() {
        runtime().block_on(async {
            let rx = tokio::net::UdpSocket::bind("127.0.0.1:0")
                .await
                .expect("rx");
            let to = rx.local_addr().expect("addr");
            let tx = UdpSocket::bind("127.0.0.1:0").expect("tx");
            let recv = |rx: &tokio::net::UdpSocket| recv_burst(rx, false, |_, _, _| {});
            tx.send_to(b"one", to).expect("send");
            rx.readable().await.expect("readable");
            assert_eq!(recv(&rx).expect("one datagram"), 1);
            // Sent before the runtime polls its driver again: the short burst has cleared
            // readiness, so the reader does not ask the kernel (an unchanged `recv_burst` would
            // have found this datagram with a second `recvmmsg`)...
            tx.send_to(b"two", to).expect("send");
            let e = recv(&rx).expect_err("readiness cleared");
            assert_eq!(e.kind(), io::ErrorKind::WouldBlock);
            // ... and the datagram's own edge wakes it.
            tokio::time::timeout(Duration::from_secs(2), rx.readable())
                .await
                .expect("the second datagram wakes the reader")
                .expect("readable");
            assert_eq!(recv(&rx).expect("two"), 1);

            // No datagram waits unnoticed while another thread sends at random moments (at
            // most 100 ahead of the reader, so none overflows the receive buffer).
            let taken = Arc::new(std::sync::atomic::AtomicUsize::new(0));
            let seen = taken.clone();
            let sender = std::thread::spawn(move || {
                for i in 0..3_000usize {
                    while i >= seen.load(std::sync::atomic::Ordering::Relaxed) + 100 {
                        std::thread::sleep(Duration::from_micros(20));
                    }
                    let _ = tx.send_to(&i.to_be_bytes(), to);
                    if i % 7 == 0 {
                        std::thread::sleep(Duration::from_micros((i % 50) as u64));
                    }
                }
            });
            let mut got = 0;
            while got < 3_000 {
                match tokio::time::timeout(Duration::from_secs(2), rx.readable()).await {
                    Ok(r) => r.expect("readable"),
                    Err(_) => panic!("stalled after {got} of 3000 datagrams"),
                }
                while let Ok(n) = recv(&rx) {
                    got += n;
                }
                taken.store(got, std::sync::atomic::Ordering::Relaxed);
            }
            sender.join().expect("sender");
            assert_eq!(got, 3_000);
        });
    }

    #[test]
    fn recvmmsg_reports_each_datagrams_original_destination() {
        use nix::sys::socket::{setsockopt, sockopt};
        runtime().block_on(async {
            // Families in turn on one thread: each keeps its own headers.
            for (any, v6) in [
                ("127.0.0.1:0", false),
                ("[::1]:0", true),
                ("127.0.0.1:0", false),
                ("[::1]:0", true),
            ] {
                let rx = tokio::net::UdpSocket::bind(any)
                    .await
                    .expect("loopback (the transparent-path tests need ::1 too)");
                if v6 {
                    setsockopt(&rx, sockopt::Ipv6OrigDstAddr, &true).expect("sockopt");
                } else {
                    setsockopt(&rx, sockopt::Ipv4OrigDstAddr, &true).expect("sockopt");
                }
                let to = rx.local_addr().expect("addr");
                let tx = UdpSocket::bind(any).expect("tx");
                for i in 0..20u8 {
                    tx.send_to(&[i; 100], to).expect("send");
                }
                rx.readable().await.expect("readable");
                let mut got = Vec::new();
                while let Ok(n) = recv_burst_with_destination(&rx, v6, |from, original, slot, n| {
                    got.push((
                        from,
                        original,
                        slot[crate::HEADROOM..crate::HEADROOM + n].to_vec(),
                    ));
                }) {
                    assert!((1..=RECV_SLOTS).contains(&n), "{n}");
                }
                let want: Vec<_> = (0..20u8)
                    .map(|i| (tx.local_addr().expect("addr"), to, vec![i; 100]))
                    .collect();
                assert_eq!(got, want);
                // The plain receive too keeps a whole sender address in either family.
                tx.send_to(&[7; 10], to).expect("send");
                rx.readable().await.expect("readable");
                let mut from = Vec::new();
                while recv_burst(&rx, v6, |f, _, _| from.push(f)).is_ok() {}
                assert_eq!(from, [tx.local_addr().expect("addr")]);
            }
        });
    }

    #[test]
    fn a_connected_socket_sends_a_run_to_its_peer() {
        let (tx, rx) = pair();
        tx.connect(rx.local_addr().expect("addr")).expect("connect");
        let mut batch = SendBatch::default();
        for i in 0..3u8 {
            batch.push(&tx, None, 30, |b| b.extend_from_slice(&[i; 30]));
        }
        assert_eq!(batch.flush(&tx), Sent { ok: 3, failed: 0 });
        assert_eq!(
            received(&rx, 3),
            vec![vec![0; 30], vec![1; 30], vec![2; 30]]
        );
    }
}
