//! `veil relay`: the MASQUE relay that sends relayed media on from its own address.

mod budget;
pub mod config;
pub mod egress;
pub mod server;
