//! CONNECT-UDP requests, sans IO: the URI path template (RFC 9298 §2), the bind extension's
//! header fields (draft-ietf-masque-connect-udp-listen-13 §6, §7) and the context tables each end
//! keeps for one bound request (§2–§5).

use super::wire::{self, Capsule};
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};

/// The default URI path template's prefix (RFC 9298 §3).
pub const PATH_PREFIX: &str = "/.well-known/masque/udp/";
/// The path of a bind request: target host and port are both `*`, percent-encoded.
pub const BIND_PATH: &str = "/.well-known/masque/udp/%2A/%2A/";
/// Header: the bind extension is wanted / granted (`?1`).
pub const HEADER_BIND: &str = "connect-udp-bind";
/// Header: the public address(es) of a bind.
pub const HEADER_PUBLIC_ADDRESS: &str = "proxy-public-address";
/// Header: the capsule protocol is in use (RFC 9297 §3.4).
pub const HEADER_CAPSULE_PROTOCOL: &str = "capsule-protocol";
/// Header: the user a sidecar's request is for (trusted because the sidecar's certificate is).
pub const HEADER_USER: &str = "veil-user";
/// Header (bind requests): the public port this app socket had before — after a relay restart
/// or a lost connection — so its peers find it where they last saw it. The relay grants it if
/// the port is free, and otherwise picks another; other proxies ignore the header.
pub const HEADER_PREFERRED_PORT: &str = "veil-preferred-port";
/// The context ID a client uses for its uncompressed context (the first even, non-zero one).
pub const UNCOMPRESSED_CONTEXT: u64 = 2;

/// What a CONNECT-UDP request asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UdpTarget {
    /// `*`/`*`: a bind with no fixed target.
    Bind,
    /// One target host (name or address literal) and port, as in unextended CONNECT-UDP.
    Host {
        /// The host, percent-decoded (IPv6 literals without brackets).
        host: String,
        /// The port.
        port: u16,
    },
}

/// Why a request path is not a CONNECT-UDP path.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    /// Not under `/.well-known/masque/udp/`, or not `{host}/{port}/`.
    #[error("path is not /.well-known/masque/udp/{{host}}/{{port}}/")]
    Shape,
    /// The port is not a number from 1 to 65535 (or `*` with a `*` host).
    #[error("target port is not valid")]
    Port,
    /// The host is empty or badly percent-encoded.
    #[error("target host is not valid")]
    Host,
}

fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while let Some(&b) = bytes.get(i) {
        if b == b'%' {
            let hex = bytes.get(i + 1..i + 3)?;
            let hex = std::str::from_utf8(hex).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// Parses the `:path` of a CONNECT-UDP request (the default template).
pub fn parse_path(path: &str) -> Result<UdpTarget, PathError> {
    let rest = path.strip_prefix(PATH_PREFIX).ok_or(PathError::Shape)?;
    let rest = rest.strip_suffix('/').ok_or(PathError::Shape)?;
    let (host, port) = rest.split_once('/').ok_or(PathError::Shape)?;
    if port.contains('/') {
        return Err(PathError::Shape);
    }
    let host = percent_decode(host).ok_or(PathError::Host)?;
    let port = percent_decode(port).ok_or(PathError::Port)?;
    if host == "*" && port == "*" {
        return Ok(UdpTarget::Bind);
    }
    let port = port
        .parse::<u16>()
        .ok()
        .filter(|p| *p != 0)
        .ok_or(PathError::Port)?;
    // A name or an address: never a control character or white space (a NUL or newline would
    // reach the resolver and the logs).
    if host.is_empty() || host == "*" || !host.chars().all(|c| c.is_ascii_graphic()) {
        return Err(PathError::Host);
    }
    Ok(UdpTarget::Host { host, port })
}

/// The path of an unextended request to `target` (IPv6 colons percent-encoded).
pub fn target_path(target: SocketAddr) -> String {
    let host = match target.ip() {
        IpAddr::V4(ip) => ip.to_string(),
        IpAddr::V6(ip) => ip.to_string().replace(':', "%3A"),
    };
    format!("{PATH_PREFIX}{host}/{}/", target.port())
}

/// True if a header value is the Structured Field Boolean true (`?1`, parameters ignored).
pub fn is_sf_true(value: &[u8]) -> bool {
    let item = value.split(|b| *b == b';').next().unwrap_or_default();
    item.trim_ascii() == b"?1"
}

/// Formats the `proxy-public-address` value: a List of Strings `"ip:port"`.
pub fn format_public_addresses(addrs: &[SocketAddr]) -> String {
    addrs
        .iter()
        .map(|a| format!("\"{a}\""))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Parses a `proxy-public-address` value; members that are not `"ip:port"` strings are skipped.
pub fn parse_public_addresses(value: &str) -> Vec<SocketAddr> {
    value
        .split(',')
        .filter_map(|member| {
            let item = member.split(';').next()?.trim();
            item.strip_prefix('"')?.strip_suffix('"')?.parse().ok()
        })
        .collect()
}

/// A violation of the bind extension's context rules: the request stream must be aborted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ContextError {
    /// A context ID of the wrong parity for its sender.
    #[error("context {0} has the wrong parity for its sender")]
    Parity(u64),
    /// A context ID registered twice.
    #[error("context {0} registered twice")]
    Repeated(u64),
    /// A second uncompressed context while one is open.
    #[error("a second uncompressed context")]
    SecondUncompressed,
    /// A tuple registered twice.
    #[error("{0} already has a context")]
    RepeatedTuple(SocketAddr),
    /// An ACK for a context this end did not register.
    #[error("ACK for unknown context {0}")]
    UnexpectedAck(u64),
    /// The proxy tried to register an uncompressed context (only clients may).
    #[error("the proxy may not open an uncompressed context")]
    ProxyUncompressed,
    /// More contexts closed on one request than the proxy remembers (it must remember them
    /// to refuse their reuse, and memory per request is bounded).
    #[error("more than {0} contexts closed on one request")]
    TooManyClosed(usize),
}

/// The proxy's view of one bound request's contexts.
#[derive(Debug, Default)]
pub struct ProxyContexts {
    uncompressed: Option<u64>,
    by_id: HashMap<u64, SocketAddr>,
    by_peer: HashMap<SocketAddr, u64>,
    closed: std::collections::HashSet<u64>,
    max: usize,
}

impl ProxyContexts {
    /// A table holding at most `max` compressed contexts.
    pub fn new(max: usize) -> Self {
        Self {
            max,
            ..Self::default()
        }
    }

    /// Remembers `context_id` as closed, up to a bound tied to the table's size.
    fn close(&mut self, context_id: u64) -> Result<(), ContextError> {
        let cap = (self.max * 16).max(1024);
        if self.closed.len() >= cap && !self.closed.contains(&context_id) {
            return Err(ContextError::TooManyClosed(cap));
        }
        self.closed.insert(context_id);
        Ok(())
    }

    /// Handles a capsule from the client. `permits` says whether a peer may be registered.
    /// Returns the capsule to answer with, if any.
    pub fn on_capsule(
        &mut self,
        capsule: &Capsule,
        permits: impl Fn(SocketAddr) -> bool,
    ) -> Result<Option<Capsule>, ContextError> {
        match *capsule {
            Capsule::CompressionAssign { context_id, peer } => {
                if context_id % 2 != 0 {
                    return Err(ContextError::Parity(context_id));
                }
                let known = self.uncompressed == Some(context_id)
                    || self.by_id.contains_key(&context_id)
                    || self.closed.contains(&context_id);
                if known {
                    return Err(ContextError::Repeated(context_id));
                }
                match peer {
                    None if self.uncompressed.is_some() => Err(ContextError::SecondUncompressed),
                    None => {
                        self.uncompressed = Some(context_id);
                        Ok(Some(Capsule::CompressionAck { context_id }))
                    }
                    Some(peer) => {
                        let peer = canonical(peer);
                        if self.by_peer.contains_key(&peer) {
                            return Err(ContextError::RepeatedTuple(peer));
                        }
                        if self.by_id.len() >= self.max || !permits(peer) {
                            self.close(context_id)?;
                            return Ok(Some(Capsule::CompressionClose { context_id }));
                        }
                        self.by_id.insert(context_id, peer);
                        self.by_peer.insert(peer, context_id);
                        Ok(Some(Capsule::CompressionAck { context_id }))
                    }
                }
            }
            Capsule::CompressionAck { context_id } => Err(ContextError::UnexpectedAck(context_id)),
            Capsule::CompressionClose { context_id } => {
                if self.uncompressed == Some(context_id) {
                    self.uncompressed = None;
                } else if let Some(peer) = self.by_id.remove(&context_id) {
                    self.by_peer.remove(&peer);
                }
                self.close(context_id)?;
                Ok(None)
            }
            // Datagrams are the shell's to deliver.
            Capsule::Datagram(_) | Capsule::Unknown { .. } => Ok(None),
        }
    }

    /// Where a client's datagram on `context_id` goes, and its UDP payload.
    pub fn from_client<'a>(
        &self,
        context_id: u64,
        payload: &'a [u8],
    ) -> Option<(SocketAddr, &'a [u8])> {
        peer_of(self.uncompressed, &self.by_id, context_id, payload)
    }

    /// How to send a packet from `peer` to the client: `(context, compressed)`, or `None` if
    /// no context can carry it (the packet is dropped).
    pub fn to_client(&self, peer: SocketAddr) -> Option<(u64, bool)> {
        match self.by_peer.get(&canonical(peer)) {
            Some(id) => Some((*id, true)),
            None => self.uncompressed.map(|id| (id, false)),
        }
    }
}

/// The client's view of one bound request's contexts.
#[derive(Debug)]
pub struct ClientContexts {
    uncompressed: Option<u64>,
    /// Registered (`true` once acknowledged) compressed contexts by peer.
    by_peer: HashMap<SocketAddr, (u64, bool)>,
    by_id: HashMap<u64, SocketAddr>,
    /// Packets sent uncompressed per peer, to find the frequent ones.
    counts: HashMap<SocketAddr, u32>,
    next_id: u64,
    max: usize,
    threshold: u32,
}

/// How to send one packet to a peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outbound {
    /// The context to send on.
    pub context_id: u64,
    /// True if the context is compressed (payload alone), false if uncompressed.
    pub compressed: bool,
    /// A capsule to send on the request stream first (a new registration).
    pub assign: Option<Capsule>,
}

impl ClientContexts {
    /// A table that compresses a peer after `threshold` packets, holding at most `max`
    /// compressed contexts. Returns the table and the capsule registering the uncompressed
    /// context, to send right after the request.
    pub fn new(max: usize, threshold: u32) -> (Self, Capsule) {
        let table = Self {
            uncompressed: Some(UNCOMPRESSED_CONTEXT),
            by_peer: HashMap::new(),
            by_id: HashMap::new(),
            counts: HashMap::new(),
            next_id: UNCOMPRESSED_CONTEXT + 2,
            max,
            threshold,
        };
        let assign = Capsule::CompressionAssign {
            context_id: UNCOMPRESSED_CONTEXT,
            peer: None,
        };
        (table, assign)
    }

    /// How to send a packet to `peer`.
    pub fn outbound(&mut self, peer: SocketAddr) -> Option<Outbound> {
        let peer = canonical(peer);
        if let Some(&(id, acked)) = self.by_peer.get(&peer)
            && acked
        {
            return Some(Outbound {
                context_id: id,
                compressed: true,
                assign: None,
            });
        }
        let uncompressed = self.uncompressed?;
        let mut assign = None;
        if !self.by_peer.contains_key(&peer) && self.by_peer.len() < self.max {
            let count = self.counts.entry(peer).or_insert(0);
            *count += 1;
            if *count >= self.threshold {
                self.counts.remove(&peer);
                let id = self.next_id;
                self.next_id += 2;
                self.by_peer.insert(peer, (id, false));
                self.by_id.insert(id, peer);
                assign = Some(Capsule::CompressionAssign {
                    context_id: id,
                    peer: Some(peer),
                });
            } else if self.counts.len() > self.max * 4 {
                // Bound the counters: forget peers seen once when many come and go (ICE probes).
                self.counts.retain(|_, c| *c > 1);
            }
        }
        Some(Outbound {
            context_id: uncompressed,
            compressed: false,
            assign,
        })
    }

    /// Handles a capsule from the proxy; returns the capsule to answer with, if any.
    pub fn on_capsule(&mut self, capsule: &Capsule) -> Result<Option<Capsule>, ContextError> {
        match *capsule {
            Capsule::CompressionAck { context_id } => {
                if self.uncompressed == Some(context_id) {
                    return Ok(None);
                }
                let peer = self
                    .by_id
                    .get(&context_id)
                    .ok_or(ContextError::UnexpectedAck(context_id))?;
                if let Some(entry) = self.by_peer.get_mut(peer) {
                    entry.1 = true;
                }
                Ok(None)
            }
            Capsule::CompressionClose { context_id } => {
                if self.uncompressed == Some(context_id) {
                    self.uncompressed = None;
                } else if let Some(peer) = self.by_id.remove(&context_id) {
                    self.by_peer.remove(&peer);
                }
                Ok(None)
            }
            Capsule::CompressionAssign { context_id, peer } => {
                if context_id % 2 == 0 {
                    return Err(ContextError::Parity(context_id));
                }
                if peer.is_none() {
                    return Err(ContextError::ProxyUncompressed);
                }
                // veil's client does not take proxy-initiated contexts: everything it wants
                // compressed, it registers itself.
                Ok(Some(Capsule::CompressionClose { context_id }))
            }
            // Datagrams are the shell's to deliver.
            Capsule::Datagram(_) | Capsule::Unknown { .. } => Ok(None),
        }
    }

    /// The peer and UDP payload of a datagram from the proxy on `context_id`.
    pub fn inbound<'a>(
        &self,
        context_id: u64,
        payload: &'a [u8],
    ) -> Option<(SocketAddr, &'a [u8])> {
        peer_of(self.uncompressed, &self.by_id, context_id, payload)
    }

    /// True while the uncompressed context is open (the proxy has not closed it).
    pub fn is_open(&self) -> bool {
        self.uncompressed.is_some()
    }
}

/// The peer and UDP payload of a datagram on `context_id`: from the payload itself on the
/// uncompressed context, from the registration on a compressed one.
fn peer_of<'a>(
    uncompressed: Option<u64>,
    by_id: &HashMap<u64, SocketAddr>,
    context_id: u64,
    payload: &'a [u8],
) -> Option<(SocketAddr, &'a [u8])> {
    if uncompressed == Some(context_id) {
        return wire::decode_uncompressed(payload)
            .ok()
            .map(|(a, p)| (canonical(a), p));
    }
    by_id.get(&context_id).map(|peer| (*peer, payload))
}

fn canonical(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_proxy_remembers_a_bounded_number_of_closed_contexts() {
        let mut proxy = ProxyContexts::new(4);
        let mut refused = None;
        for i in 0..5_000u64 {
            let close = Capsule::CompressionClose {
                context_id: 2 * i + 2,
            };
            if let Err(e) = proxy.on_capsule(&close, |_| true) {
                refused = Some((i, e));
                break;
            }
        }
        assert_eq!(refused, Some((1024, ContextError::TooManyClosed(1024))));
    }

    fn addr(s: &str) -> SocketAddr {
        s.parse().expect("addr")
    }

    #[test]
    fn paths() {
        let cases: &[(&str, Result<UdpTarget, PathError>)] = &[
            (BIND_PATH, Ok(UdpTarget::Bind)),
            ("/.well-known/masque/udp/*/*/", Ok(UdpTarget::Bind)),
            (
                "/.well-known/masque/udp/192.0.2.6/443/",
                Ok(UdpTarget::Host {
                    host: "192.0.2.6".into(),
                    port: 443,
                }),
            ),
            (
                "/.well-known/masque/udp/2001%3Adb8%3A%3A1/53/",
                Ok(UdpTarget::Host {
                    host: "2001:db8::1".into(),
                    port: 53,
                }),
            ),
            (
                "/.well-known/masque/udp/example.com/0/",
                Err(PathError::Port),
            ),
            (
                "/.well-known/masque/udp/example.com/x/",
                Err(PathError::Port),
            ),
            ("/.well-known/masque/udp/%2A/443/", Err(PathError::Host)),
            ("/.well-known/masque/udp/a/1/extra/", Err(PathError::Shape)),
            ("/.well-known/masque/udp/a/1", Err(PathError::Shape)),
            ("/other/a/1/", Err(PathError::Shape)),
            ("/.well-known/masque/udp/%zz/1/", Err(PathError::Host)),
            ("/.well-known/masque/udp/a%00b/1/", Err(PathError::Host)),
            ("/.well-known/masque/udp/a%0Ab/1/", Err(PathError::Host)),
            ("/.well-known/masque/udp/a%0Db/1/", Err(PathError::Host)),
            ("/.well-known/masque/udp/a%20b/1/", Err(PathError::Host)),
        ];
        for (path, want) in cases {
            assert_eq!(&parse_path(path), want, "{path}");
        }
        assert_eq!(
            parse_path(&target_path(addr("[2001:db8::1]:53"))),
            Ok(UdpTarget::Host {
                host: "2001:db8::1".into(),
                port: 53
            })
        );
    }

    #[test]
    fn header_values() {
        assert!(is_sf_true(b"?1"));
        assert!(is_sf_true(b" ?1;foo=bar"));
        assert!(!is_sf_true(b"?0"));
        assert!(!is_sf_true(b"?1, ?1"));
        let v = format_public_addresses(&[addr("192.0.2.1:4321"), addr("[2001:db8::1]:4321")]);
        assert_eq!(v, "\"192.0.2.1:4321\", \"[2001:db8::1]:4321\"");
        assert_eq!(
            parse_public_addresses(&v),
            vec![addr("192.0.2.1:4321"), addr("[2001:db8::1]:4321")]
        );
        assert_eq!(
            parse_public_addresses("token, \"nope\", \"1.2.3.4:5\";p=1"),
            vec![addr("1.2.3.4:5")]
        );
    }

    #[test]
    fn client_and_proxy_agree_on_contexts() {
        let (mut client, hello) = ClientContexts::new(2, 3);
        let mut proxy = ProxyContexts::new(2);
        let peer = addr("203.0.113.5:5004");
        let denied = addr("10.0.0.1:5004");
        let permits = |p: SocketAddr| p != denied;
        assert_eq!(
            proxy.on_capsule(&hello, permits),
            Ok(Some(Capsule::CompressionAck { context_id: 2 }))
        );
        // Two packets go uncompressed; the third registers a compressed context.
        for _ in 0..2 {
            assert_eq!(
                client
                    .outbound(peer)
                    .map(|o| (o.context_id, o.compressed, o.assign)),
                Some((2, false, None))
            );
        }
        let third = client.outbound(peer).expect("outbound");
        let assign = third.assign.expect("assign on the third packet");
        assert_eq!(
            assign,
            Capsule::CompressionAssign {
                context_id: 4,
                peer: Some(peer)
            }
        );
        // Until the ACK, still uncompressed.
        assert!(!client.outbound(peer).expect("outbound").compressed);
        let ack = proxy
            .on_capsule(&assign, permits)
            .expect("valid")
            .expect("answer");
        assert_eq!(client.on_capsule(&ack), Ok(None));
        let o = client.outbound(peer).expect("outbound");
        assert_eq!((o.context_id, o.compressed), (4, true));
        assert_eq!(proxy.from_client(4, b"x"), Some((peer, &b"x"[..])));
        assert_eq!(proxy.to_client(peer), Some((4, true)));
        assert_eq!(proxy.to_client(addr("198.51.100.1:1")), Some((2, false)));
        assert_eq!(client.inbound(4, b"y"), Some((peer, &b"y"[..])));

        // A forbidden peer's registration is refused with CLOSE, and its datagrams have no home.
        for _ in 0..2 {
            client.outbound(denied);
        }
        let assign = client
            .outbound(denied)
            .expect("outbound")
            .assign
            .expect("assign");
        let close = proxy
            .on_capsule(&assign, permits)
            .expect("valid")
            .expect("answer");
        assert_eq!(close, Capsule::CompressionClose { context_id: 6 });
        client.on_capsule(&close).expect("valid");
        assert_eq!(client.outbound(denied).map(|o| o.compressed), Some(false));
    }

    #[test]
    fn protocol_violations_are_errors() {
        let mut proxy = ProxyContexts::new(4);
        let ok = |_| true;
        assert_eq!(
            proxy.on_capsule(
                &Capsule::CompressionAssign {
                    context_id: 3,
                    peer: None
                },
                ok
            ),
            Err(ContextError::Parity(3))
        );
        proxy
            .on_capsule(
                &Capsule::CompressionAssign {
                    context_id: 2,
                    peer: None,
                },
                ok,
            )
            .expect("first uncompressed");
        assert_eq!(
            proxy.on_capsule(
                &Capsule::CompressionAssign {
                    context_id: 4,
                    peer: None
                },
                ok
            ),
            Err(ContextError::SecondUncompressed)
        );
        assert_eq!(
            proxy.on_capsule(
                &Capsule::CompressionAssign {
                    context_id: 2,
                    peer: None
                },
                ok
            ),
            Err(ContextError::Repeated(2))
        );
        let p = Some(addr("192.0.2.1:1"));
        proxy
            .on_capsule(
                &Capsule::CompressionAssign {
                    context_id: 6,
                    peer: p,
                },
                ok,
            )
            .expect("ok");
        assert_eq!(
            proxy.on_capsule(
                &Capsule::CompressionAssign {
                    context_id: 8,
                    peer: p
                },
                ok
            ),
            Err(ContextError::RepeatedTuple(addr("192.0.2.1:1")))
        );
        assert_eq!(
            proxy.on_capsule(&Capsule::CompressionAck { context_id: 6 }, ok),
            Err(ContextError::UnexpectedAck(6))
        );
        // Closing the uncompressed context makes the proxy a firewall for unregistered peers.
        proxy
            .on_capsule(&Capsule::CompressionClose { context_id: 2 }, ok)
            .expect("close");
        assert_eq!(proxy.to_client(addr("198.51.100.1:1")), None);
        assert_eq!(proxy.to_client(addr("192.0.2.1:1")), Some((6, true)));

        let (mut client, _) = ClientContexts::new(4, 1);
        assert_eq!(
            client.on_capsule(&Capsule::CompressionAssign {
                context_id: 5,
                peer: None
            }),
            Err(ContextError::ProxyUncompressed)
        );
        assert_eq!(
            client.on_capsule(&Capsule::CompressionAssign {
                context_id: 4,
                peer: p
            }),
            Err(ContextError::Parity(4))
        );
        assert_eq!(
            client.on_capsule(&Capsule::CompressionAssign {
                context_id: 5,
                peer: p
            }),
            Ok(Some(Capsule::CompressionClose { context_id: 5 }))
        );
        assert_eq!(
            client.on_capsule(&Capsule::CompressionAck { context_id: 8 }),
            Err(ContextError::UnexpectedAck(8))
        );
    }
}
