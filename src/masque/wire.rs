//! MASQUE wire formats, sans IO: QUIC variable-length integers, HTTP Datagram payloads
//! (RFC 9297), capsules (RFC 9297 §3) including the bind extension's compression capsules
//! (draft-ietf-masque-connect-udp-listen-13 §3), and bound UDP payloads (§4, §5).
//!
//! ```text
//! HTTP Datagram (QUIC DATAGRAM frame payload, RFC 9297 §2.1):
//!   +---------------------------+----------------+---------------------------+
//!   | Quarter Stream ID (i)     | Context ID (i) | Bound UDP payload (..)    |
//!   +---------------------------+----------------+---------------------------+
//!
//! Uncompressed bound UDP payload (listen-13 §4):
//!   +----------------+--------------------+--------------+-------------------+
//!   | IP Version (8) | IP Address (32/128)| UDP Port (16)| UDP Payload (..)  |
//!   +----------------+--------------------+--------------+-------------------+
//! Compressed bound UDP payload (listen-13 §5): the UDP payload alone.
//!
//! Capsule (on the request stream's DATA, RFC 9297 §3.2):
//!   +----------+------------+-----------------+
//!   | Type (i) | Length (i) | Value (Length)  |
//!   +----------+------------+-----------------+
//!   COMPRESSION_ASSIGN (0x11): Context ID (i), IP Version (8), [IP Address, UDP Port]
//!   COMPRESSION_ACK    (0x12): Context ID (i)
//!   COMPRESSION_CLOSE  (0x13): Context ID (i)
//! ```
//!
//! Every read is bounds-checked; malformed input is an error value, never a panic.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// The largest value a QUIC varint can hold (2^62 - 1).
pub const VARINT_MAX: u64 = (1 << 62) - 1;

/// Capsule type of DATAGRAM (RFC 9297 §3.5).
pub const CAPSULE_DATAGRAM: u64 = 0x00;
/// Capsule type of COMPRESSION_ASSIGN.
pub const CAPSULE_COMPRESSION_ASSIGN: u64 = 0x11;
/// Capsule type of COMPRESSION_ACK.
pub const CAPSULE_COMPRESSION_ACK: u64 = 0x12;
/// Capsule type of COMPRESSION_CLOSE.
pub const CAPSULE_COMPRESSION_CLOSE: u64 = 0x13;

/// The longest capsule veil accepts: a DATAGRAM capsule carrying the largest UDP payload
/// (65,527 bytes over IPv6) behind a context ID and an uncompressed address; longer ones abort
/// the stream.
pub const MAX_CAPSULE_LEN: u64 = 65_536 + 64;

/// Why bytes are not a valid MASQUE message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// The input ends inside a field.
    #[error("truncated")]
    Truncated,
    /// An IP Version other than the ones allowed here.
    #[error("IP version {0} is not allowed here")]
    IpVersion(u8),
    /// A context ID of zero where it is forbidden.
    #[error("context ID 0 is not allowed in a bind request")]
    ZeroContext,
    /// A capsule longer than veil accepts.
    #[error("capsule of {0} bytes is too long")]
    TooLong(u64),
    /// Bytes left over inside a capsule's value.
    #[error("{0} bytes left over in a capsule")]
    Trailing(usize),
}

/// Reads a QUIC varint (RFC 9000 §16) from the front of `buf`: the value and its length.
pub fn read_varint(buf: &[u8]) -> Result<(u64, usize), Error> {
    let first = *buf.first().ok_or(Error::Truncated)?;
    let len = 1usize << (first >> 6);
    let bytes = buf.get(..len).ok_or(Error::Truncated)?;
    let value = bytes
        .iter()
        .skip(1)
        .fold(u64::from(first & 0x3f), |v, b| (v << 8) | u64::from(*b));
    Ok((value, len))
}

/// Appends `value` as a QUIC varint in its shortest form. Values above [`VARINT_MAX`] are
/// clamped (callers never produce them).
pub fn write_varint(out: &mut Vec<u8>, value: u64) {
    let v = value.min(VARINT_MAX);
    if v < 1 << 6 {
        out.push(v as u8);
    } else if v < 1 << 14 {
        out.extend_from_slice(&((v as u16) | 0x4000).to_be_bytes());
    } else if v < 1 << 30 {
        out.extend_from_slice(&((v as u32) | 0x8000_0000).to_be_bytes());
    } else {
        out.extend_from_slice(&(v | 0xc000_0000_0000_0000).to_be_bytes());
    }
}

/// The length of `value` as a varint.
pub fn varint_len(value: u64) -> usize {
    match value {
        v if v < 1 << 6 => 1,
        v if v < 1 << 14 => 2,
        v if v < 1 << 30 => 4,
        _ => 8,
    }
}

/// An HTTP Datagram split into its parts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HttpDatagram<'a> {
    /// The request stream's ID divided by four.
    pub quarter_stream_id: u64,
    /// The context the payload belongs to.
    pub context_id: u64,
    /// What follows the context ID.
    pub payload: &'a [u8],
}

/// Splits a QUIC DATAGRAM frame's payload into quarter stream ID, context ID and the rest.
pub fn decode_http_datagram(buf: &[u8]) -> Result<HttpDatagram<'_>, Error> {
    let (quarter_stream_id, a) = read_varint(buf)?;
    let rest = buf.get(a..).ok_or(Error::Truncated)?;
    let (context_id, b) = read_varint(rest)?;
    let payload = rest.get(b..).ok_or(Error::Truncated)?;
    Ok(HttpDatagram {
        quarter_stream_id,
        context_id,
        payload,
    })
}

/// Splits an HTTP Datagram payload (a DATAGRAM capsule's value) into context ID and the rest.
pub fn split_context(value: &[u8]) -> Result<(u64, &[u8]), Error> {
    let (context_id, used) = read_varint(value)?;
    Ok((context_id, value.get(used..).ok_or(Error::Truncated)?))
}

/// Writes the HTTP Datagram prefix: quarter stream ID and context ID.
pub fn write_http_datagram_prefix(out: &mut Vec<u8>, quarter_stream_id: u64, context_id: u64) {
    write_varint(out, quarter_stream_id);
    write_varint(out, context_id);
}

/// Writes the address part of an uncompressed bound UDP payload, in the family `addr` has
/// (callers canonicalise IPv4-mapped addresses first where that matters).
pub fn write_uncompressed_address(out: &mut Vec<u8>, addr: SocketAddr) {
    match addr.ip() {
        IpAddr::V4(ip) => {
            out.push(4);
            out.extend_from_slice(&ip.octets());
        }
        IpAddr::V6(ip) => {
            out.push(6);
            out.extend_from_slice(&ip.octets());
        }
    }
    out.extend_from_slice(&addr.port().to_be_bytes());
}

/// The length of the address part for `addr`.
pub fn uncompressed_address_len(addr: SocketAddr) -> usize {
    match addr.ip() {
        IpAddr::V4(_) => 1 + 4 + 2,
        IpAddr::V6(_) => 1 + 16 + 2,
    }
}

/// Reads IP Version, IP Address and UDP Port; `allow_zero` accepts version 0 (no address).
fn read_address(buf: &[u8], allow_zero: bool) -> Result<(Option<SocketAddr>, usize), Error> {
    let version = *buf.first().ok_or(Error::Truncated)?;
    let ip_len = match version {
        0 if allow_zero => return Ok((None, 1)),
        4 => 4,
        6 => 16,
        other => return Err(Error::IpVersion(other)),
    };
    let ip = buf.get(1..1 + ip_len).ok_or(Error::Truncated)?;
    let port = buf
        .get(1 + ip_len..3 + ip_len)
        .and_then(|p| <[u8; 2]>::try_from(p).ok())
        .map(u16::from_be_bytes)
        .ok_or(Error::Truncated)?;
    let ip = match <[u8; 4]>::try_from(ip) {
        Ok(v4) => IpAddr::V4(Ipv4Addr::from(v4)),
        Err(_) => {
            let v6 = <[u8; 16]>::try_from(ip).map_err(|_| Error::Truncated)?;
            IpAddr::V6(Ipv6Addr::from(v6))
        }
    };
    Ok((Some(SocketAddr::new(ip, port)), 3 + ip_len))
}

/// Splits an uncompressed bound UDP payload into the peer's address and the UDP payload.
pub fn decode_uncompressed(buf: &[u8]) -> Result<(SocketAddr, &[u8]), Error> {
    let (addr, used) = read_address(buf, false)?;
    let addr = addr.ok_or(Error::IpVersion(0))?;
    Ok((addr, buf.get(used..).ok_or(Error::Truncated)?))
}

/// A capsule, as far as veil understands it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Capsule {
    /// COMPRESSION_ASSIGN: register `context_id` for `peer`, or as the uncompressed context
    /// when `peer` is `None` (IP Version 0).
    CompressionAssign {
        /// The context being registered (never 0).
        context_id: u64,
        /// The peer of a compressed context; `None` for the uncompressed context.
        peer: Option<SocketAddr>,
    },
    /// COMPRESSION_ACK: the registration of `context_id` is accepted.
    CompressionAck {
        /// The acknowledged context.
        context_id: u64,
    },
    /// COMPRESSION_CLOSE: `context_id` is rejected or closed.
    CompressionClose {
        /// The closed context.
        context_id: u64,
    },
    /// DATAGRAM (RFC 9297 §3.5): an HTTP Datagram's payload (context ID, then the bind
    /// extension's payload) sent on the request stream, for one too large for a QUIC DATAGRAM
    /// frame on the path.
    Datagram(Vec<u8>),
    /// Any other type, skipped as RFC 9297 §3.2 requires (its value is not kept).
    Unknown {
        /// The capsule type.
        capsule_type: u64,
    },
}

impl Capsule {
    /// Appends the encoded capsule to `out`. Unknown capsules encode with an empty value.
    pub fn encode(&self, out: &mut Vec<u8>) {
        let mut value = Vec::with_capacity(24);
        let capsule_type = match self {
            Self::CompressionAssign { context_id, peer } => {
                write_varint(&mut value, *context_id);
                match peer {
                    Some(addr) => write_uncompressed_address(&mut value, *addr),
                    None => value.push(0),
                }
                CAPSULE_COMPRESSION_ASSIGN
            }
            Self::CompressionAck { context_id } => {
                write_varint(&mut value, *context_id);
                CAPSULE_COMPRESSION_ACK
            }
            Self::CompressionClose { context_id } => {
                write_varint(&mut value, *context_id);
                CAPSULE_COMPRESSION_CLOSE
            }
            Self::Datagram(payload) => {
                write_varint(out, CAPSULE_DATAGRAM);
                write_varint(out, payload.len() as u64);
                out.extend_from_slice(payload);
                return;
            }
            Self::Unknown { capsule_type } => *capsule_type,
        };
        write_varint(out, capsule_type);
        write_varint(out, value.len() as u64);
        out.extend_from_slice(&value);
    }
}

fn context_only(value: &[u8]) -> Result<u64, Error> {
    let (id, used) = read_varint(value)?;
    if id == 0 {
        return Err(Error::ZeroContext);
    }
    match value.len() - used {
        0 => Ok(id),
        extra => Err(Error::Trailing(extra)),
    }
}

/// Decodes one capsule from the front of a stream buffer. `Ok(None)`: more bytes are needed.
/// On success returns the capsule and how many bytes it used.
pub fn decode_capsule(buf: &[u8]) -> Result<Option<(Capsule, usize)>, Error> {
    let (capsule_type, a) = match read_varint(buf) {
        Ok(v) => v,
        Err(Error::Truncated) => return Ok(None),
        Err(e) => return Err(e),
    };
    let rest = buf.get(a..).unwrap_or_default();
    let (len, b) = match read_varint(rest) {
        Ok(v) => v,
        Err(Error::Truncated) => return Ok(None),
        Err(e) => return Err(e),
    };
    if len > MAX_CAPSULE_LEN {
        return Err(Error::TooLong(len));
    }
    let len = usize::try_from(len).map_err(|_| Error::TooLong(len))?;
    let Some(value) = rest.get(b..b + len) else {
        return Ok(None);
    };
    let capsule = match capsule_type {
        CAPSULE_COMPRESSION_ASSIGN => {
            let (context_id, used) = read_varint(value)?;
            if context_id == 0 {
                return Err(Error::ZeroContext);
            }
            let (peer, addr_len) = read_address(value.get(used..).unwrap_or_default(), true)?;
            match value.len() - used - addr_len {
                0 => Capsule::CompressionAssign { context_id, peer },
                extra => return Err(Error::Trailing(extra)),
            }
        }
        CAPSULE_COMPRESSION_ACK => Capsule::CompressionAck {
            context_id: context_only(value)?,
        },
        CAPSULE_COMPRESSION_CLOSE => Capsule::CompressionClose {
            context_id: context_only(value)?,
        },
        CAPSULE_DATAGRAM => Capsule::Datagram(value.to_vec()),
        other => Capsule::Unknown {
            capsule_type: other,
        },
    };
    Ok(Some((capsule, a + b + len)))
}

/// Why a [`CapsuleReader`] stopped.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReadError<E> {
    /// The stream broke the capsule format.
    #[error("{0}")]
    Malformed(Error),
    /// The handler refused a capsule.
    #[error("{0}")]
    Handler(E),
}

/// The capsules of a request stream, sans IO, for both ends: bytes in as they arrive, each
/// whole capsule out in order; a capsule cut short waits for the rest. Once a large capsule
/// has passed, an idle reader gives its memory back (an idle bind holds no buffer).
#[derive(Debug, Default)]
pub struct CapsuleReader {
    buf: Vec<u8>,
}

impl CapsuleReader {
    /// Appends `data` and hands `each` every capsule now complete. Stops at a malformed
    /// capsule or at the first error of `each`; the stream is not to be read further then.
    pub fn read<E>(
        &mut self,
        data: impl bytes::Buf,
        mut each: impl FnMut(Capsule) -> Result<(), E>,
    ) -> Result<(), ReadError<E>> {
        bytes::BufMut::put(&mut self.buf, data);
        let mut used = 0;
        while let Some((capsule, n)) = decode_capsule(self.buf.get(used..).unwrap_or_default())
            .map_err(ReadError::Malformed)?
        {
            used += n;
            each(capsule).map_err(ReadError::Handler)?;
        }
        self.buf.drain(..used);
        if self.buf.is_empty() && self.buf.capacity() > 4096 {
            self.buf = Vec::new();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_datagram_capsule_carries_the_largest_udp_payload() {
        let mut value = Vec::new();
        write_varint(&mut value, 2);
        write_uncompressed_address(&mut value, "[2001:db8::1]:5060".parse().expect("addr"));
        value.extend(std::iter::repeat_n(7u8, 65_527));
        let mut out = Vec::new();
        Capsule::Datagram(value.clone()).encode(&mut out);
        let (c, used) = decode_capsule(&out).expect("valid").expect("whole");
        assert_eq!((c, used), (Capsule::Datagram(value.clone()), out.len()));
        let (context, rest) = split_context(&value).expect("context");
        assert_eq!((context, rest.len()), (2, 19 + 65_527));
        // Cut short, it waits for more.
        assert_eq!(decode_capsule(&out[..out.len() - 1]), Ok(None));
        for v in [0, 63, 64, 16_383, 16_384, 1 << 30, VARINT_MAX] {
            let mut b = Vec::new();
            write_varint(&mut b, v);
            assert_eq!(varint_len(v), b.len(), "{v}");
        }
    }

    #[test]
    fn varints_match_rfc9000_examples() {
        // RFC 9000 Appendix A.1.
        let cases: &[(&[u8], u64)] = &[
            (
                &[0xc2, 0x19, 0x7c, 0x5e, 0xff, 0x14, 0xe8, 0x8c],
                151_288_809_941_952_652,
            ),
            (&[0x9d, 0x7f, 0x3e, 0x7d], 494_878_333),
            (&[0x7b, 0xbd], 15_293),
            (&[0x25], 37),
            (&[0x40, 0x25], 37),
        ];
        for (bytes, value) in cases {
            assert_eq!(read_varint(bytes), Ok((*value, bytes.len())));
        }
        let mut out = Vec::new();
        write_varint(&mut out, 15_293);
        assert_eq!(out, [0x7b, 0xbd]);
        assert_eq!(read_varint(&[0x40]), Err(Error::Truncated));
        assert_eq!(read_varint(&[]), Err(Error::Truncated));
    }

    #[test]
    fn capsules_round_trip_and_partial_input_asks_for_more() {
        let capsules = [
            Capsule::CompressionAssign {
                context_id: 2,
                peer: None,
            },
            Capsule::CompressionAssign {
                context_id: 4,
                peer: Some("203.0.113.9:3478".parse().expect("addr")),
            },
            Capsule::CompressionAssign {
                context_id: 1_000_000,
                peer: Some("[2001:db8::1]:9".parse().expect("addr")),
            },
            Capsule::CompressionAck { context_id: 4 },
            Capsule::CompressionClose { context_id: 6 },
        ];
        let mut stream = Vec::new();
        for c in &capsules {
            c.encode(&mut stream);
        }
        let mut decoded = Vec::new();
        let mut at = 0;
        while at < stream.len() {
            let (c, used) = decode_capsule(&stream[at..])
                .expect("valid")
                .expect("complete");
            for cut in at..at + used {
                assert_eq!(
                    decode_capsule(&stream[at..cut]),
                    Ok(None),
                    "prefix of {c:?}"
                );
            }
            decoded.push(c);
            at += used;
        }
        assert_eq!(decoded, capsules);
    }

    #[test]
    fn unknown_capsules_are_skipped_and_bad_ones_refused() {
        // An unknown type 0x2a with 3 bytes of value, then an ACK.
        let mut buf = vec![0x2a, 3, 9, 9, 9];
        Capsule::CompressionAck { context_id: 2 }.encode(&mut buf);
        let (c, used) = decode_capsule(&buf).expect("valid").expect("complete");
        assert_eq!((c, used), (Capsule::Unknown { capsule_type: 0x2a }, 5));
        assert_eq!(
            decode_capsule(&buf[5..]).expect("valid").map(|(c, _)| c),
            Some(Capsule::CompressionAck { context_id: 2 })
        );

        assert_eq!(decode_capsule(&[0x11, 2, 0, 0]), Err(Error::ZeroContext));
        assert_eq!(decode_capsule(&[0x11, 2, 2, 5]), Err(Error::IpVersion(5)));
        assert_eq!(decode_capsule(&[0x11, 3, 2, 0, 7]), Err(Error::Trailing(1)));
        assert_eq!(decode_capsule(&[0x12, 2, 2, 7]), Err(Error::Trailing(1)));
        assert_eq!(decode_capsule(&[0x13, 1, 0]), Err(Error::ZeroContext));
        assert_eq!(
            decode_capsule(&[0x11, 0x80, 0x10, 0, 1]),
            Err(Error::TooLong(0x10_0001))
        );
        // An IPv4 assign whose value stops inside the address.
        assert_eq!(
            decode_capsule(&[0x11, 4, 2, 4, 1, 2]),
            Err(Error::Truncated)
        );
    }

    #[test]
    fn datagrams_and_uncompressed_payloads() {
        let mut out = Vec::new();
        write_http_datagram_prefix(&mut out, 1, 2);
        let peer: SocketAddr = "198.51.100.7:5004".parse().expect("addr");
        write_uncompressed_address(&mut out, peer);
        out.extend_from_slice(b"rtp");
        let d = decode_http_datagram(&out).expect("valid");
        assert_eq!((d.quarter_stream_id, d.context_id), (1, 2));
        let (addr, payload) = decode_uncompressed(d.payload).expect("valid");
        assert_eq!(addr, peer);
        assert_eq!(payload, b"rtp");
        assert_eq!(uncompressed_address_len(peer), 7);
        assert_eq!(decode_uncompressed(&[0, 1, 2]), Err(Error::IpVersion(0)));
        assert_eq!(decode_uncompressed(&[6, 1, 2]), Err(Error::Truncated));
    }

    fn addr() -> impl Strategy<Value = SocketAddr> {
        prop_oneof![
            (any::<u32>(), any::<u16>())
                .prop_map(|(ip, p)| SocketAddr::new(IpAddr::V4(ip.into()), p)),
            (any::<u128>(), any::<u16>())
                .prop_filter("not v4-mapped", |(ip, _)| Ipv6Addr::from(*ip)
                    .to_ipv4_mapped()
                    .is_none())
                .prop_map(|(ip, p)| SocketAddr::new(IpAddr::V6(ip.into()), p)),
        ]
    }

    proptest! {
        #[test]
        fn varint_round_trip(v in 0..=VARINT_MAX) {
            let mut out = Vec::new();
            write_varint(&mut out, v);
            prop_assert_eq!(out.len(), varint_len(v));
            prop_assert_eq!(read_varint(&out), Ok((v, out.len())));
        }

        #[test]
        fn assign_round_trip(id in 1..=VARINT_MAX, peer in proptest::option::of(addr())) {
            let c = Capsule::CompressionAssign { context_id: id, peer };
            let mut out = Vec::new();
            c.encode(&mut out);
            prop_assert_eq!(decode_capsule(&out), Ok(Some((c, out.len()))));
        }

        #[test]
        fn uncompressed_round_trip(peer in addr(), qsid in 0..=VARINT_MAX, ctx in 0..=VARINT_MAX, payload in proptest::collection::vec(any::<u8>(), 0..64)) {
            let mut out = Vec::new();
            write_http_datagram_prefix(&mut out, qsid, ctx);
            write_uncompressed_address(&mut out, peer);
            out.extend_from_slice(&payload);
            let d = decode_http_datagram(&out).expect("own encoding");
            prop_assert_eq!((d.quarter_stream_id, d.context_id), (qsid, ctx));
            prop_assert_eq!(decode_uncompressed(d.payload), Ok((peer, &payload[..])));
        }

        #[test]
        fn decoders_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = decode_capsule(&bytes);
            let _ = decode_http_datagram(&bytes);
            let _ = decode_uncompressed(&bytes);
            if let Ok(Some((_, used))) = decode_capsule(&bytes) {
                prop_assert!(used <= bytes.len());
            }
        }
    }

    #[test]
    fn a_capsule_reader_hands_out_whole_capsules_across_reads_and_stops_at_errors() {
        let mut stream = Vec::new();
        Capsule::CompressionAck { context_id: 2 }.encode(&mut stream);
        Capsule::Datagram(vec![9; 5_000]).encode(&mut stream);
        Capsule::CompressionClose { context_id: 2 }.encode(&mut stream);
        let mut reader = CapsuleReader::default();
        let mut seen = Vec::new();
        // One byte at a time: each capsule comes out once, whole, in order.
        for b in &stream {
            reader
                .read(&[*b][..], |c| {
                    seen.push(c);
                    Ok::<(), ()>(())
                })
                .expect("valid");
        }
        assert_eq!(
            seen,
            vec![
                Capsule::CompressionAck { context_id: 2 },
                Capsule::Datagram(vec![9; 5_000]),
                Capsule::CompressionClose { context_id: 2 },
            ]
        );
        assert!(
            reader.buf.capacity() < 4096,
            "the large capsule's memory is given back"
        );
        // All at once, with a handler that refuses the second: the third is not handed out.
        let mut count = 0;
        let refused = reader.read(&stream[..], |_| {
            count += 1;
            if count == 2 { Err("no") } else { Ok(()) }
        });
        assert_eq!((refused, count), (Err(ReadError::Handler("no")), 2));
        // A malformed capsule: a zero context in an ACK.
        let mut bad = CapsuleReader::default();
        let mut zero = Vec::new();
        write_varint(&mut zero, CAPSULE_COMPRESSION_ACK);
        write_varint(&mut zero, 1);
        zero.push(0);
        assert_eq!(
            bad.read(&zero[..], |_| Ok::<(), ()>(())),
            Err(ReadError::Malformed(Error::ZeroContext))
        );
    }
}
