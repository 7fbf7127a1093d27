//! Traffic classes of a UDP flow, recognised from its first packet.
//!
//! Calling apps multiplex several protocols on one UDP socket; RFC 7983 (updated by RFC 9443 for
//! QUIC) splits them by the first byte of each packet:
//!
//! ```text
//!   first byte   protocol
//!   0   ..=   3  STUN  (confirmed here by the magic cookie 0x2112A442 at bytes 4..8)
//!   16  ..=  19  ZRTP        -> Other
//!   20  ..=  63  DTLS
//!   64  ..=  79  TURN channel -> Other
//!   128 ..= 191  RTP / RTCP
//!   192 ..= 255  QUIC long header (a flow's first QUIC packet always has one)
//! ```
//!
//! Pure function, no I/O: the policy uses the class of a flow's first packet as one of its match
//! conditions.

use serde::Deserialize;
use std::fmt;

/// What kind of traffic a UDP flow carries, judged from its first packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TrafficClass {
    /// STUN (RFC 8489): ICE connectivity checks and address discovery.
    Stun,
    /// DTLS (RFC 9147): the key exchange of DTLS-SRTP and WebRTC data channels.
    Dtls,
    /// RTP or RTCP (RFC 3550): the media itself.
    Rtp,
    /// QUIC (RFC 9000), recognised by its long header.
    Quic,
    /// Anything else, including empty packets.
    Other,
}

/// The STUN magic cookie (RFC 8489 §5), at bytes 4..8 of every STUN message.
const STUN_MAGIC_COOKIE: [u8; 4] = [0x21, 0x12, 0xA4, 0x42];

impl TrafficClass {
    /// Classifies a packet by its first bytes (RFC 7983 §7, RFC 9443 §3).
    pub fn of(packet: &[u8]) -> Self {
        let Some(&first) = packet.first() else {
            return Self::Other;
        };
        match first {
            0..=3 if packet.len() >= 20 && packet.get(4..8) == Some(&STUN_MAGIC_COOKIE) => {
                Self::Stun
            }
            20..=63 => Self::Dtls,
            128..=191 if packet.len() >= 12 => Self::Rtp,
            // A long header carries a 4-byte version; version 0 is version negotiation, which a
            // client never sends first.
            192..=255 if packet.len() >= 7 && packet.get(1..5) != Some(&[0, 0, 0, 0]) => Self::Quic,
            _ => Self::Other,
        }
    }

    /// The name used in policy files and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Stun => "stun",
            Self::Dtls => "dtls",
            Self::Rtp => "rtp",
            Self::Quic => "quic",
            Self::Other => "other",
        }
    }
}

impl fmt::Display for TrafficClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn stun_binding_request() -> Vec<u8> {
        let mut p = vec![0x00, 0x01, 0x00, 0x00];
        p.extend_from_slice(&STUN_MAGIC_COOKIE);
        p.extend_from_slice(&[7; 12]);
        p
    }

    #[test]
    fn classifies_each_protocol_by_its_first_bytes() {
        let mut rtp = vec![0x80, 0x6f];
        rtp.extend_from_slice(&[0; 10]);
        let mut dtls_client_hello = vec![22, 0xfe, 0xfd];
        dtls_client_hello.extend_from_slice(&[0; 10]);
        let quic_initial = [0xc3, 0, 0, 0, 1, 8, 1, 2, 3, 4];
        let cases: &[(&[u8], TrafficClass)] = &[
            (&stun_binding_request(), TrafficClass::Stun),
            (&dtls_client_hello, TrafficClass::Dtls),
            (&rtp, TrafficClass::Rtp),
            (&quic_initial, TrafficClass::Quic),
            (&[], TrafficClass::Other),
            (b"hello", TrafficClass::Other),
            // STUN range without the cookie is not STUN.
            (
                &[
                    0x00, 0x01, 0, 0, 1, 2, 3, 4, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
                ],
                TrafficClass::Other,
            ),
            // TURN ChannelData and ZRTP are not in any class of their own.
            (&[0x40, 0x00, 0x00, 0x04, 1, 2, 3, 4], TrafficClass::Other),
            (&[17, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0], TrafficClass::Other),
            // Version negotiation (version 0) is not a client's first packet.
            (&[0xc0, 0, 0, 0, 0, 8, 1, 2], TrafficClass::Other),
            // Too short to be RTP.
            (&[0x80, 0x00], TrafficClass::Other),
        ];
        for (packet, want) in cases {
            assert_eq!(TrafficClass::of(packet), *want, "packet {packet:?}");
        }
    }

    proptest! {
        #[test]
        fn never_panics(packet in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = TrafficClass::of(&packet);
        }
    }
}
