//! The SOCKS5 wire format (RFC 1928, RFC 1929), sans IO.
//!
//! Stream messages are decoded incrementally: each `decode_*` takes the bytes received so far and
//! returns `Ok(None)` when more are needed, or the message and how many bytes it used. Nothing here
//! indexes a slice directly: every read goes through [`Reader::take`], so a short or hostile input
//! is an error or a request for more bytes, never a panic.
//!
//! ```text
//! greeting        +-----+----------+----------+
//!                 | VER | NMETHODS | METHODS  |      VER = 5
//!                 +-----+----------+----------+
//!                 |  1  |    1     | 1 to 255 |
//!
//! password auth   +-----+------+----------+------+----------+   (RFC 1929, VER = 1)
//!                 | VER | ULEN |  UNAME   | PLEN |  PASSWD  |
//!                 |  1  |  1   | 1 to 255 |  1   | 1 to 255 |
//!
//! request         +-----+-----+-------+------+----------+----------+
//! and reply       | VER | CMD | RSV   | ATYP | DST.ADDR | DST.PORT |  (reply: REP for CMD,
//!                 |  1  |  1  | X'00' |  1   | Variable |    2     |   BND.* for DST.*)
//!
//! UDP datagram    +-----+------+------+----------+----------+----------+
//!                 | RSV | FRAG | ATYP | DST.ADDR | DST.PORT |   DATA   |
//!                 |  2  |  1   |  1   | Variable |    2     | Variable |
//!
//! ATYP: 1 = IPv4 (4 bytes), 3 = domain (1 length byte + name), 4 = IPv6 (16 bytes)
//! ```

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// The protocol version byte of SOCKS5.
pub const VERSION: u8 = 5;
/// The version byte of the RFC 1929 username/password sub-negotiation.
pub const AUTH_VERSION: u8 = 1;
/// The longest request: VER CMD RSV ATYP, a 255-byte domain with its length byte, and a port.
pub const MAX_REQUEST_LEN: usize = 4 + 1 + 255 + 2;

const ATYP_IPV4: u8 = 1;
const ATYP_DOMAIN: u8 = 3;
const ATYP_IPV6: u8 = 4;

/// An authentication method (RFC 1928 §3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    /// X'00' NO AUTHENTICATION REQUIRED.
    NoAuth,
    /// X'02' USERNAME/PASSWORD (RFC 1929).
    Password,
    /// X'FF' NO ACCEPTABLE METHODS.
    NoAcceptable,
}

impl Method {
    /// The byte that names the method on the wire.
    pub fn byte(self) -> u8 {
        match self {
            Self::NoAuth => 0x00,
            Self::Password => 0x02,
            Self::NoAcceptable => 0xff,
        }
    }
}

/// A request's command (RFC 1928 §4).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// X'01' CONNECT: a TCP connection to the target.
    Connect,
    /// X'02' BIND: a listening TCP socket. veil refuses it (reply X'07').
    Bind,
    /// X'03' UDP ASSOCIATE: a UDP relay for the client.
    UdpAssociate,
}

/// A destination as a client names it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Address {
    /// An IPv4 or IPv6 address and port.
    Ip(SocketAddr),
    /// A domain name (ASCII, 1 to 255 bytes) and port, for the server to resolve.
    Domain(String, u16),
}

impl Address {
    /// The port.
    pub fn port(&self) -> u16 {
        match self {
            Self::Ip(addr) => addr.port(),
            Self::Domain(_, port) => *port,
        }
    }
}

impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Ip(addr) => write!(f, "{addr}"),
            Self::Domain(name, port) => write!(f, "{name}:{port}"),
        }
    }
}

/// A client's request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// What the client asks for.
    pub command: Command,
    /// The target (CONNECT) or the client's declared UDP source (UDP ASSOCIATE).
    pub address: Address,
}

/// RFC 1929 credentials.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credentials {
    /// UNAME, 1 to 255 bytes.
    pub username: Vec<u8>,
    /// PASSWD, 1 to 255 bytes.
    pub password: Vec<u8>,
}

/// A reply code (RFC 1928 §6).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reply {
    /// X'00' succeeded.
    Succeeded,
    /// X'01' general SOCKS server failure.
    GeneralFailure,
    /// X'02' connection not allowed by ruleset.
    NotAllowed,
    /// X'03' Network unreachable.
    NetworkUnreachable,
    /// X'04' Host unreachable.
    HostUnreachable,
    /// X'05' Connection refused.
    ConnectionRefused,
    /// X'06' TTL expired.
    TtlExpired,
    /// X'07' Command not supported.
    CommandNotSupported,
    /// X'08' Address type not supported.
    AddressTypeNotSupported,
}

impl Reply {
    /// The REP byte.
    pub fn byte(self) -> u8 {
        match self {
            Self::Succeeded => 0x00,
            Self::GeneralFailure => 0x01,
            Self::NotAllowed => 0x02,
            Self::NetworkUnreachable => 0x03,
            Self::HostUnreachable => 0x04,
            Self::ConnectionRefused => 0x05,
            Self::TtlExpired => 0x06,
            Self::CommandNotSupported => 0x07,
            Self::AddressTypeNotSupported => 0x08,
        }
    }
}

/// Why bytes from a client are not valid SOCKS5.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// The first byte is not 5 (or 1 for the password sub-negotiation).
    #[error("protocol version {0} is not supported")]
    Version(u8),
    /// A greeting offering no methods.
    #[error("greeting offers no authentication method")]
    NoMethods,
    /// A command byte other than 1, 2 or 3.
    #[error("command {0:#04x} is not supported")]
    Command(u8),
    /// An ATYP byte other than 1, 3 or 4.
    #[error("address type {0:#04x} is not supported")]
    AddressType(u8),
    /// A reserved byte that is not zero.
    #[error("reserved field is {0:#04x}, must be 0")]
    Reserved(u8),
    /// A domain name that is empty or not printable ASCII.
    #[error("domain name is empty or not printable ASCII")]
    Domain,
    /// An empty RFC 1929 username or password.
    #[error("username or password is empty")]
    EmptyCredential,
    /// Bytes after a complete request, before its reply: the client did not wait.
    #[error("{0} unexpected bytes after the request")]
    Trailing(usize),
}

impl Error {
    /// The reply that refuses a request with this error.
    pub fn reply(&self) -> Reply {
        match self {
            Self::Command(_) => Reply::CommandNotSupported,
            Self::AddressType(_) => Reply::AddressTypeNotSupported,
            _ => Reply::GeneralFailure,
        }
    }
}

/// A cursor over untrusted bytes whose only read is a bounds-checked `take`.
struct Reader<'a> {
    rest: &'a [u8],
}

impl<'a> Reader<'a> {
    fn new(bytes: &'a [u8]) -> Self {
        Self { rest: bytes }
    }

    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let (taken, rest) = self.rest.split_at_checked(n)?;
        self.rest = rest;
        Some(taken)
    }

    fn u8(&mut self) -> Option<u8> {
        self.take(1).and_then(|b| b.first().copied())
    }

    fn u16(&mut self) -> Option<u16> {
        self.take(2)
            .and_then(|b| b.try_into().ok())
            .map(u16::from_be_bytes)
    }

    fn used(&self, of: &[u8]) -> usize {
        of.len() - self.rest.len()
    }
}

/// Result of an incremental decode: `None` means "need more bytes".
pub type Decoded<T> = Result<Option<(T, usize)>, Error>;

/// Decodes a greeting; returns the offered methods.
pub fn decode_greeting(buf: &[u8]) -> Decoded<Vec<u8>> {
    let mut r = Reader::new(buf);
    let Some(version) = r.u8() else {
        return Ok(None);
    };
    if version != VERSION {
        return Err(Error::Version(version));
    }
    let Some(n) = r.u8() else { return Ok(None) };
    if n == 0 {
        return Err(Error::NoMethods);
    }
    let Some(methods) = r.take(usize::from(n)) else {
        return Ok(None);
    };
    Ok(Some((methods.to_vec(), r.used(buf))))
}

/// Encodes the server's method choice.
pub fn encode_method(method: Method) -> [u8; 2] {
    [VERSION, method.byte()]
}

/// Decodes an RFC 1929 username/password request.
pub fn decode_credentials(buf: &[u8]) -> Decoded<Credentials> {
    let mut r = Reader::new(buf);
    let Some(version) = r.u8() else {
        return Ok(None);
    };
    if version != AUTH_VERSION {
        return Err(Error::Version(version));
    }
    let Some(ulen) = r.u8() else { return Ok(None) };
    let Some(username) = r.take(usize::from(ulen)) else {
        return Ok(None);
    };
    let Some(plen) = r.u8() else { return Ok(None) };
    let Some(password) = r.take(usize::from(plen)) else {
        return Ok(None);
    };
    if username.is_empty() || password.is_empty() {
        return Err(Error::EmptyCredential);
    }
    let credentials = Credentials {
        username: username.to_vec(),
        password: password.to_vec(),
    };
    Ok(Some((credentials, r.used(buf))))
}

/// Encodes the RFC 1929 status: 0 for success, anything else for failure.
pub fn encode_auth_status(ok: bool) -> [u8; 2] {
    [AUTH_VERSION, if ok { 0x00 } else { 0x01 }]
}

/// Reads ATYP, DST.ADDR and DST.PORT. `Ok(None)`: more bytes needed.
fn read_address(r: &mut Reader<'_>) -> Result<Option<Address>, Error> {
    let Some(atyp) = r.u8() else { return Ok(None) };
    let address = match atyp {
        ATYP_IPV4 => {
            let Some(ip) = r.take(4).and_then(|b| <[u8; 4]>::try_from(b).ok()) else {
                return Ok(None);
            };
            let Some(port) = r.u16() else { return Ok(None) };
            Address::Ip(SocketAddr::new(IpAddr::V4(Ipv4Addr::from(ip)), port))
        }
        ATYP_IPV6 => {
            let Some(ip) = r.take(16).and_then(|b| <[u8; 16]>::try_from(b).ok()) else {
                return Ok(None);
            };
            let Some(port) = r.u16() else { return Ok(None) };
            Address::Ip(SocketAddr::new(IpAddr::V6(Ipv6Addr::from(ip)), port))
        }
        ATYP_DOMAIN => {
            let Some(len) = r.u8() else { return Ok(None) };
            let Some(name) = r.take(usize::from(len)) else {
                return Ok(None);
            };
            let Some(port) = r.u16() else { return Ok(None) };
            if name.is_empty() || !name.iter().all(u8::is_ascii_graphic) {
                return Err(Error::Domain);
            }
            let name = String::from_utf8_lossy(name).into_owned();
            Address::Domain(name, port)
        }
        other => return Err(Error::AddressType(other)),
    };
    Ok(Some(address))
}

/// Decodes a request. The whole of `buf` must be the request: bytes after it are an error,
/// because a client must wait for the reply before sending anything else.
pub fn decode_request(buf: &[u8]) -> Decoded<Request> {
    let mut r = Reader::new(buf);
    let Some(version) = r.u8() else {
        return Ok(None);
    };
    if version != VERSION {
        return Err(Error::Version(version));
    }
    let Some(cmd) = r.u8() else { return Ok(None) };
    let Some(rsv) = r.u8() else { return Ok(None) };
    let Some(address) = read_address(&mut r)? else {
        return Ok(None);
    };
    // Judge the command only once the request is complete, so the reply is sent at a message
    // boundary; an unknown address type has been refused above already.
    let command = match cmd {
        0x01 => Command::Connect,
        0x02 => Command::Bind,
        0x03 => Command::UdpAssociate,
        other => return Err(Error::Command(other)),
    };
    if rsv != 0 {
        return Err(Error::Reserved(rsv));
    }
    if !r.rest.is_empty() {
        return Err(Error::Trailing(r.rest.len()));
    }
    Ok(Some((Request { command, address }, r.used(buf))))
}

fn write_address(out: &mut Vec<u8>, addr: SocketAddr) {
    match addr.ip().to_canonical() {
        IpAddr::V4(ip) => {
            out.push(ATYP_IPV4);
            out.extend_from_slice(&ip.octets());
        }
        IpAddr::V6(ip) => {
            out.push(ATYP_IPV6);
            out.extend_from_slice(&ip.octets());
        }
    }
    out.extend_from_slice(&addr.port().to_be_bytes());
}

/// Encodes a reply with the bound address.
pub fn encode_reply(reply: Reply, bound: SocketAddr) -> Vec<u8> {
    let mut out = Vec::with_capacity(22);
    out.extend_from_slice(&[VERSION, reply.byte(), 0]);
    write_address(&mut out, bound);
    out
}

/// A decoded UDP datagram from the client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Datagram<'a> {
    /// The fragment number; anything but 0 is dropped (veil does not reassemble).
    pub frag: u8,
    /// Where the payload goes.
    pub target: Address,
    /// The payload.
    pub payload: &'a [u8],
}

/// Why a UDP datagram is not valid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DatagramError {
    /// Shorter than its own header says.
    #[error("datagram is shorter than its header")]
    Truncated,
    /// The RSV field is not zero.
    #[error("reserved field is not zero")]
    Reserved,
    /// The address part is invalid.
    #[error("{0}")]
    Address(Error),
}

/// Decodes a UDP datagram from the client.
pub fn decode_datagram(buf: &[u8]) -> Result<Datagram<'_>, DatagramError> {
    let mut r = Reader::new(buf);
    let rsv = r.u16().ok_or(DatagramError::Truncated)?;
    if rsv != 0 {
        return Err(DatagramError::Reserved);
    }
    let frag = r.u8().ok_or(DatagramError::Truncated)?;
    let target = read_address(&mut r)
        .map_err(DatagramError::Address)?
        .ok_or(DatagramError::Truncated)?;
    Ok(Datagram {
        frag,
        target,
        payload: r.rest,
    })
}

/// Writes the header of a datagram from `source` to the client: RSV, FRAG = 0 and the address.
pub fn encode_datagram_header(out: &mut Vec<u8>, source: SocketAddr) {
    out.extend_from_slice(&[0, 0, 0]);
    write_address(out, source);
}

/// The length of the header [`encode_datagram_header`] writes for `source`.
pub fn datagram_header_len(source: SocketAddr) -> usize {
    match source.ip().to_canonical() {
        IpAddr::V4(_) => 3 + 1 + 4 + 2,
        IpAddr::V6(_) => 3 + 1 + 16 + 2,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sock(s: &str) -> SocketAddr {
        s.parse().expect("socket address")
    }

    #[test]
    fn greeting_needs_all_its_bytes() {
        assert_eq!(decode_greeting(&[]), Ok(None));
        assert_eq!(decode_greeting(&[5]), Ok(None));
        assert_eq!(decode_greeting(&[5, 2, 0]), Ok(None));
        assert_eq!(decode_greeting(&[5, 2, 0, 2, 9]), Ok(Some((vec![0, 2], 4))));
        assert_eq!(decode_greeting(&[4, 1, 0]), Err(Error::Version(4)));
        assert_eq!(decode_greeting(&[5, 0]), Err(Error::NoMethods));
    }

    #[test]
    fn credentials() {
        let buf = [1, 3, b'b', b'o', b'b', 2, b'p', b'w'];
        let (c, used) = decode_credentials(&buf).expect("valid").expect("complete");
        assert_eq!(
            (c.username.as_slice(), c.password.as_slice(), used),
            (&b"bob"[..], &b"pw"[..], 8)
        );
        assert_eq!(decode_credentials(&buf[..7]), Ok(None));
        assert_eq!(
            decode_credentials(&[1, 0, 1, b'x']),
            Err(Error::EmptyCredential)
        );
        assert_eq!(
            decode_credentials(&[5, 1, b'a', 1, b'b']),
            Err(Error::Version(5))
        );
    }

    #[test]
    fn requests_of_every_address_type() {
        let v4 = [5, 1, 0, 1, 127, 0, 0, 1, 0x1f, 0x90];
        assert_eq!(
            decode_request(&v4),
            Ok(Some((
                Request {
                    command: Command::Connect,
                    address: Address::Ip(sock("127.0.0.1:8080"))
                },
                10
            )))
        );
        let mut v6 = vec![5, 3, 0, 4];
        v6.extend_from_slice(&Ipv6Addr::LOCALHOST.octets());
        v6.extend_from_slice(&[0, 0]);
        assert_eq!(
            decode_request(&v6)
                .expect("valid")
                .expect("complete")
                .0
                .command,
            Command::UdpAssociate
        );
        let mut dom = vec![5, 1, 0, 3, 9];
        dom.extend_from_slice(b"localhost");
        dom.extend_from_slice(&[0, 80]);
        assert_eq!(
            decode_request(&dom)
                .expect("valid")
                .expect("complete")
                .0
                .address,
            Address::Domain("localhost".into(), 80)
        );
    }

    #[test]
    fn truncated_requests_ask_for_more_and_bad_ones_are_refused() {
        // A domain request cut before its port: more bytes are needed, nothing read past the end.
        let mut dom = vec![5, 1, 0, 3, 9];
        dom.extend_from_slice(b"localhost");
        for cut in 0..dom.len() + 2 {
            assert_eq!(
                decode_request(&dom[..cut.min(dom.len())]),
                Ok(None),
                "cut at {cut}"
            );
        }
        let cases: &[(&[u8], Error, u8)] = &[
            (&[5, 9, 0, 1, 1, 2, 3, 4, 0, 80], Error::Command(9), 0x07),
            (&[5, 1, 0, 7], Error::AddressType(7), 0x08),
            (&[5, 1, 1, 1, 1, 2, 3, 4, 0, 80], Error::Reserved(1), 0x01),
            (&[5, 1, 0, 3, 0, 0, 80], Error::Domain, 0x01),
            (&[5, 1, 0, 3, 2, b'a', b' ', 0, 80], Error::Domain, 0x01),
            (
                &[5, 1, 0, 1, 1, 2, 3, 4, 0, 80, 0xde, 0xad],
                Error::Trailing(2),
                0x01,
            ),
            (&[4, 1, 0, 1], Error::Version(4), 0x01),
        ];
        for (buf, error, code) in cases {
            let got = decode_request(buf).expect_err("refused");
            assert_eq!((&got, got.reply().byte()), (error, *code), "{buf:?}");
        }
    }

    #[test]
    fn replies_and_datagram_headers() {
        assert_eq!(
            encode_reply(Reply::NotAllowed, sock("0.0.0.0:0")),
            [5, 2, 0, 1, 0, 0, 0, 0, 0, 0]
        );
        // v4-mapped bound addresses are written as IPv4.
        assert_eq!(
            encode_reply(Reply::Succeeded, sock("[::ffff:127.0.0.1]:1080"))[3],
            1
        );
        let mut out = Vec::new();
        encode_datagram_header(&mut out, sock("[2001:db8::1]:5"));
        assert_eq!(out.len(), datagram_header_len(sock("[2001:db8::1]:5")));
        out.extend_from_slice(b"hi");
        let d = decode_datagram(&out).expect("valid");
        assert_eq!(
            (d.frag, d.target, d.payload),
            (0, Address::Ip(sock("[2001:db8::1]:5")), &b"hi"[..])
        );
        assert_eq!(
            decode_datagram(&[0, 0, 0, 1, 1]),
            Err(DatagramError::Truncated)
        );
        assert_eq!(
            decode_datagram(&[0, 1, 0, 1, 1, 2, 3, 4, 0, 1]),
            Err(DatagramError::Reserved)
        );
        assert_eq!(
            decode_datagram(&[0, 0, 1, 1, 1, 2, 3, 4, 0, 1]).map(|d| d.frag),
            Ok(1)
        );
    }

    fn address() -> impl Strategy<Value = SocketAddr> {
        prop_oneof![
            (any::<u32>(), any::<u16>())
                .prop_map(|(ip, port)| SocketAddr::new(IpAddr::V4(ip.into()), port)),
            (any::<u128>(), any::<u16>())
                .prop_filter("not v4-mapped", |(ip, _)| Ipv6Addr::from(*ip)
                    .to_ipv4_mapped()
                    .is_none())
                .prop_map(|(ip, port)| SocketAddr::new(IpAddr::V6(ip.into()), port)),
        ]
    }

    proptest! {
        #[test]
        fn datagram_round_trip(source in address(), payload in proptest::collection::vec(any::<u8>(), 0..64)) {
            let mut out = Vec::new();
            encode_datagram_header(&mut out, source);
            out.extend_from_slice(&payload);
            let d = decode_datagram(&out).expect("own encoding decodes");
            prop_assert_eq!(d.target, Address::Ip(source));
            prop_assert_eq!(d.payload, &payload[..]);
        }

        #[test]
        fn reply_round_trips_as_a_request_shape(bound in address()) {
            // A reply has the request's layout: decode it as one (CMD = REP = 1).
            let reply = encode_reply(Reply::GeneralFailure, bound);
            let (req, used) = decode_request(&reply).expect("valid").expect("complete");
            prop_assert_eq!(req.address, Address::Ip(bound));
            prop_assert_eq!(used, reply.len());
        }

        #[test]
        fn decoders_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = decode_greeting(&bytes);
            let _ = decode_credentials(&bytes);
            let _ = decode_request(&bytes);
            let _ = decode_datagram(&bytes);
        }

        #[test]
        fn complete_requests_use_exactly_their_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            if let Ok(Some((_, used))) = decode_request(&bytes) {
                prop_assert_eq!(used, bytes.len());
                prop_assert!(used <= MAX_REQUEST_LEN);
            }
        }
    }
}
