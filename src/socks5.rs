//! The SOCKS5 front-end (RFC 1928, RFC 1929): the codec (sans IO), the password file, and the
//! tokio shell: the accept loop ([`server`]), what its sessions share (`shared`), a session's
//! set-up (`session`), CONNECT (`connect`) and UDP ASSOCIATE (`udp`), which hands its
//! datagrams to the sidecar's pipeline.

pub mod codec;
mod connect;
pub mod passwords;
pub mod server;
mod session;
mod shared;
mod udp;
