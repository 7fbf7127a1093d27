//! The SOCKS5 server (RFC 1928, RFC 1929): codec and association state machine (sans IO), and
//! the tokio shell that serves clients.

pub mod association;
pub mod codec;
pub mod passwords;
pub mod server;
