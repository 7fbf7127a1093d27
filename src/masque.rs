//! MASQUE: CONNECT-UDP (RFC 9298) with the bind extension
//! (draft-ietf-masque-connect-udp-listen-13), over HTTP/3 (RFC 9114) with HTTP Datagrams
//! (RFC 9297). The wire formats and per-request state machines are sans IO; the QUIC and HTTP/3
//! shells live in [`crate::relay`] and [`crate::tunnel`].

pub mod request;
pub mod wire;
