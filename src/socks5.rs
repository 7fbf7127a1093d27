//! The SOCKS5 front-end (RFC 1928, RFC 1929): the codec (sans IO), the password file, and the
//! tokio shell that serves clients and hands their UDP to the sidecar's pipeline.

pub mod codec;
pub mod passwords;
pub mod server;
