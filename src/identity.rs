//! Who is on the other end of a local TCP connection, as the kernel reports it.
//!
//! A SOCKS5 client on this machine is identified by the owner of its socket, as the kernel
//! reports it, so a local client cannot claim to be someone else. The kernel is asked for that
//! one socket over `NETLINK_SOCK_DIAG` (a hash lookup, whatever the number of sockets); where
//! that is not available, its socket tables (`/proc/net/tcp`, …) are read and searched, which
//! costs time in proportion to every socket on the machine. The table parser is a pure
//! function; [`user_of_uid`] asks NSS (so LDAP and other directory users work) for the user's
//! name and groups.

use crate::policy::User;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// Why a client could not be identified.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The socket table could not be read.
    #[error("reading the kernel socket table: {0}")]
    Table(#[from] std::io::Error),
    /// No user has this uid.
    #[error("uid {0} has no user name")]
    UnknownUid(u32),
    /// The user database could not be asked.
    #[error("looking up uid {0}: {1}")]
    Lookup(u32, nix::Error),
}

/// Parses one `/proc/net/tcp{,6}` address field (`0100007F:1F90`): the IP as the kernel's
/// native-endian 32-bit words in hex, then the port in hex.
fn parse_hex_addr(field: &str) -> Option<SocketAddr> {
    let (ip, port) = field.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    // The kernel prints each 32-bit word of the address as it sits in memory, read as a
    // native-endian integer: turning it back into native-endian bytes restores network order.
    let word = |s: &str| u32::from_str_radix(s, 16).ok().map(u32::to_ne_bytes);
    let ip = match ip.len() {
        8 => IpAddr::V4(Ipv4Addr::from(word(ip)?)),
        32 => {
            let mut octets = [0u8; 16];
            for (i, chunk) in octets.chunks_exact_mut(4).enumerate() {
                let w = word(ip.get(i * 8..i * 8 + 8)?)?;
                chunk.copy_from_slice(&w);
            }
            IpAddr::V6(Ipv6Addr::from(octets))
        }
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

/// Finds the uid owning the socket whose local address is `local` and remote address `remote`
/// in the text of a `/proc/net/tcp{,6}` table. Addresses are compared in canonical form.
pub fn owner_in_table(table: &str, local: SocketAddr, remote: SocketAddr) -> Option<u32> {
    let canon = |a: SocketAddr| SocketAddr::new(a.ip().to_canonical(), a.port());
    let (local, remote) = (canon(local), canon(remote));
    table.lines().skip(1).find_map(|line| {
        let mut fields = line.split_whitespace();
        let l = parse_hex_addr(fields.nth(1)?)?;
        let r = parse_hex_addr(fields.next()?)?;
        let uid = fields.nth(4)?.parse().ok()?;
        (canon(l) == local && canon(r) == remote).then_some(uid)
    })
}

/// Finds the uid owning the UDP socket that sent from `source`, in the text of a
/// `/proc/net/udp{,6}` table: a socket bound to that address and port, or to the unspecified
/// address and that port.
pub fn udp_owner_in_table(table: &str, source: SocketAddr) -> Option<u32> {
    let source = SocketAddr::new(source.ip().to_canonical(), source.port());
    table.lines().skip(1).find_map(|line| {
        let mut fields = line.split_whitespace();
        let l = parse_hex_addr(fields.nth(1)?)?;
        let uid = fields.nth(5)?.parse().ok()?;
        let ip = l.ip().to_canonical();
        (l.port() == source.port() && (ip == source.ip() || ip.is_unspecified())).then_some(uid)
    })
}

/// The uid that owns the local UDP socket that sent from `source` to `destination`.
pub fn udp_source_uid(source: SocketAddr, destination: SocketAddr) -> Result<Option<u32>, Error> {
    // The kernel's UDP lookup finds the socket that would receive from `destination` at
    // `source`: the app's socket, bound or connected.
    if let Ok(found) = diag::uid(diag::UDP, destination, source) {
        return Ok(found);
    }
    for table in ["/proc/net/udp", "/proc/net/udp6"] {
        let text = match std::fs::read_to_string(table) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e.into()),
        };
        if let Some(uid) = udp_owner_in_table(&text, source) {
            return Ok(Some(uid));
        }
    }
    Ok(None)
}

/// The uid that owns the client end of a TCP connection that this process accepted: `server` is
/// our end (the listener's address), `client` the peer's. `None` if the client is not local.
pub fn client_uid(server: SocketAddr, client: SocketAddr) -> Result<Option<u32>, Error> {
    if let Ok(found) = diag::uid(diag::TCP, client, server) {
        return Ok(found);
    }
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let text = match std::fs::read_to_string(table) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e.into()),
        };
        if let Some(uid) = owner_in_table(&text, client, server) {
            return Ok(Some(uid));
        }
    }
    Ok(None)
}

/// One exact socket lookup over `NETLINK_SOCK_DIAG` (`inet_diag`).
mod diag {
    use nix::sys::socket::{
        AddressFamily, MsgFlags, SockFlag, SockProtocol, SockType, recv, send, setsockopt, socket,
        sockopt,
    };
    use std::net::{IpAddr, SocketAddr};
    use std::os::fd::AsRawFd;

    pub(super) const TCP: u8 = 6;
    pub(super) const UDP: u8 = 17;
    const SOCK_DIAG_BY_FAMILY: u16 = 20;
    const NLMSG_ERROR: u16 = 2;
    const NLM_F_REQUEST: u16 = 1;
    /// nlmsghdr (16) + inet_diag_req_v2 (56).
    const REQUEST_LEN: usize = 72;
    /// Offset of `idiag_uid` in a reply: nlmsghdr (16) + family/state/timer/retrans (4) +
    /// inet_diag_sockid (48) + expires/rqueue/wqueue (12).
    const UID_AT: usize = 80;

    /// The request for the socket with source `src` and destination `dst` in the kernel's
    /// lookup terms (`inet_diag_sockid`): ports and addresses in network order.
    pub(super) fn request(protocol: u8, src: SocketAddr, dst: SocketAddr) -> [u8; REQUEST_LEN] {
        let mut r = [0u8; REQUEST_LEN];
        r[0..4].copy_from_slice(&(REQUEST_LEN as u32).to_ne_bytes());
        r[4..6].copy_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
        r[6..8].copy_from_slice(&NLM_F_REQUEST.to_ne_bytes());
        r[16] = if src.is_ipv4() { 2 } else { 10 };
        r[17] = protocol;
        // idiag_states: every state.
        r[20..24].copy_from_slice(&u32::MAX.to_ne_bytes());
        r[24..26].copy_from_slice(&src.port().to_be_bytes());
        r[26..28].copy_from_slice(&dst.port().to_be_bytes());
        for (at, ip) in [(28, src.ip()), (44, dst.ip())] {
            match ip {
                IpAddr::V4(v4) => r[at..at + 4].copy_from_slice(&v4.octets()),
                IpAddr::V6(v6) => r[at..at + 16].copy_from_slice(&v6.octets()),
            }
        }
        // idiag_if 0 (any); idiag_cookie INET_DIAG_NOCOOKIE.
        r[64..72].fill(0xff);
        r
    }

    /// The uid in a reply; `Ok(None)` when the kernel found no such socket.
    pub(super) fn parse_reply(reply: &[u8]) -> std::io::Result<Option<u32>> {
        let field = |at: usize| -> Option<[u8; 4]> { reply.get(at..at + 4)?.try_into().ok() };
        let kind = reply
            .get(4..6)
            .and_then(|b| b.try_into().ok())
            .map(u16::from_ne_bytes);
        match kind {
            Some(SOCK_DIAG_BY_FAMILY) => Ok(field(UID_AT).map(u32::from_ne_bytes)),
            Some(NLMSG_ERROR) => {
                let errno = field(16).map(i32::from_ne_bytes).unwrap_or(0);
                if errno == -(nix::errno::Errno::ENOENT as i32) {
                    Ok(None)
                } else {
                    Err(std::io::Error::from_raw_os_error(-errno))
                }
            }
            _ => Err(std::io::Error::other("unexpected sock_diag reply")),
        }
    }

    /// Canonical addresses, for the family the kernel files the socket under; a v4-mapped pair
    /// is looked up as IPv4 (where the kernel keeps dual-stack sockets' IPv4 traffic).
    fn canonical(a: SocketAddr) -> SocketAddr {
        SocketAddr::new(a.ip().to_canonical(), a.port())
    }

    pub(super) fn uid(
        protocol: u8,
        src: SocketAddr,
        dst: SocketAddr,
    ) -> std::io::Result<Option<u32>> {
        let (src, dst) = (canonical(src), canonical(dst));
        if src.is_ipv4() != dst.is_ipv4() {
            return Ok(None);
        }
        let fd = socket(
            AddressFamily::Netlink,
            SockType::Datagram,
            SockFlag::SOCK_CLOEXEC,
            SockProtocol::NetlinkSockDiag,
        )?;
        setsockopt(
            &fd,
            sockopt::ReceiveTimeout,
            &nix::sys::time::TimeVal::new(1, 0),
        )?;
        send(
            fd.as_raw_fd(),
            &request(protocol, src, dst),
            MsgFlags::empty(),
        )?;
        let mut reply = [0u8; 512];
        let n = recv(fd.as_raw_fd(), &mut reply, MsgFlags::empty())?;
        parse_reply(reply.get(..n).unwrap_or_default())
    }
}

/// The user with this uid, with the names of all its groups.
pub fn user_of_uid(uid: u32) -> Result<User, Error> {
    let unix = nix::unistd::User::from_uid(uid.into())
        .map_err(|e| Error::Lookup(uid, e))?
        .ok_or(Error::UnknownUid(uid))?;
    Ok(User::new(unix.name.clone(), groups_of(&unix)))
}

/// The user called `name`, with its groups if it is a Unix user, else with none.
pub fn user_named(name: &str) -> User {
    match nix::unistd::User::from_name(name) {
        Ok(Some(unix)) => User::new(name, groups_of(&unix)),
        _ => User::new(name, []),
    }
}

fn groups_of(unix: &nix::unistd::User) -> Vec<String> {
    let Ok(cname) = std::ffi::CString::new(unix.name.as_bytes()) else {
        return Vec::new();
    };
    let gids = nix::unistd::getgrouplist(&cname, unix.gid).unwrap_or_else(|_| vec![unix.gid]);
    gids.into_iter()
        .filter_map(|gid| nix::unistd::Group::from_gid(gid).ok().flatten())
        .map(|g| g.name)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const TCP: &str = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:0438 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1 0 100 0 0 10 0
   1: 0100007F:D431 0100007F:0438 01 00000000:00000000 00:00000000 00000000  1001        0 2 1 0 20 4 30 10 -1
";
    const TCP6: &str = "  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000000000000000000001000000:C350 00000000000000000000000001000000:0438 01 00000000:00000000 00:00000000 00000000  1002        0 3 1 0 20 4 30 10 -1
   1: 0000000000000000FFFF00000100007F:C351 0000000000000000FFFF00000100007F:0438 01 00000000:00000000 00:00000000 00000000  1003        0 3 1 0 20 4 30 10 -1
";

    fn addr(s: &str) -> SocketAddr {
        s.parse().expect("addr")
    }

    #[test]
    fn finds_the_owner_of_the_client_socket() {
        assert_eq!(
            owner_in_table(TCP, addr("127.0.0.1:54321"), addr("127.0.0.1:1080")),
            Some(1001)
        );
        // The listener's own line does not match a client.
        assert_eq!(
            owner_in_table(TCP, addr("127.0.0.1:54322"), addr("127.0.0.1:1080")),
            None
        );
        assert_eq!(
            owner_in_table(TCP6, addr("[::1]:50000"), addr("[::1]:1080")),
            Some(1002)
        );
        // A v4 client on a dual-stack listener appears v4-mapped.
        assert_eq!(
            owner_in_table(TCP6, addr("127.0.0.1:50001"), addr("127.0.0.1:1080")),
            Some(1003)
        );
    }

    #[test]
    fn finds_the_owner_of_a_udp_sender() {
        const UDP: &str = "   sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode ref pointer drops
  1: 00000000:1F40 00000000:0000 07 00000000:00000000 00:00000000 00000000 65534        0 1 2 0 0
  2: 020200C0:1F41 00000000:0000 07 00000000:00000000 00:00000000 00000000  1001        0 1 2 0 0
";
        assert_eq!(udp_owner_in_table(UDP, addr("192.0.2.2:8000")), Some(65534));
        assert_eq!(udp_owner_in_table(UDP, addr("192.0.2.2:8001")), Some(1001));
        assert_eq!(udp_owner_in_table(UDP, addr("192.0.2.3:8001")), None);
        let socket = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
        let uid = udp_source_uid(socket.local_addr().expect("addr"), addr("127.0.0.9:9"))
            .expect("lookup");
        assert_eq!(uid, Some(nix::unistd::geteuid().as_raw()));
    }

    #[test]
    fn the_kernel_names_the_owner_of_one_socket() {
        let me = Some(nix::unistd::geteuid().as_raw());
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("listen");
        let server = listener.local_addr().expect("addr");
        let client = std::net::TcpStream::connect(server).expect("connect");
        let client_addr = client.local_addr().expect("addr");
        let _accepted = listener.accept().expect("accept");
        assert_eq!(diag::uid(diag::TCP, client_addr, server).expect("tcp"), me);
        // The accepted end matches too, the listener's address alone does not.
        assert_eq!(diag::uid(diag::TCP, server, client_addr).expect("tcp"), me);
        assert_eq!(
            diag::uid(diag::TCP, client_addr, addr("127.0.0.1:1")).expect("tcp"),
            None
        );
        let udp = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
        let at = udp.local_addr().expect("addr");
        assert_eq!(
            diag::uid(diag::UDP, addr("192.0.2.7:5"), at).expect("udp"),
            me
        );
        let v6 = std::net::UdpSocket::bind("[::1]:0").expect("bind v6");
        let at6 = v6.local_addr().expect("addr");
        assert_eq!(
            diag::uid(diag::UDP, addr("[2001:db8::7]:5"), at6).expect("udp6"),
            me
        );
        assert_eq!(
            diag::uid(diag::UDP, addr("192.0.2.7:5"), addr("127.0.0.1:1")).expect("udp"),
            None
        );
        // Garbage from the kernel is an error, not an answer.
        assert!(diag::parse_reply(&[]).is_err());
        assert_eq!(diag::request(diag::UDP, at, at).len(), 72);
    }

    #[test]
    fn garbage_tables_match_nothing() {
        for t in [
            "",
            "header\n",
            "h\n 0: zz:zz 00:00 01 0 0 0 abc\n",
            "h\n 0: 0100007F:D431\n",
        ] {
            assert_eq!(
                owner_in_table(t, addr("127.0.0.1:54321"), addr("127.0.0.1:1080")),
                None
            );
        }
    }

    #[test]
    fn identifies_a_real_local_connection() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let client =
            std::net::TcpStream::connect(listener.local_addr().expect("addr")).expect("connect");
        let (_server, peer) = listener.accept().expect("accept");
        let uid = client_uid(listener.local_addr().expect("addr"), peer).expect("table");
        assert_eq!(uid, Some(nix::unistd::geteuid().as_raw()));
        drop(client);
    }
}
