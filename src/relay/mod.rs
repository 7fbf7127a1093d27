//! `veil relay`: the MASQUE relay that sends relayed media on from its own address.
//!
//! The tasks of a running relay: per shard ([`shard`]) a thread with its own runtime and QUIC
//! endpoint; per sidecar connection ([`connection`]) one task that accepts its HTTP/3 requests
//! and one that reads its QUIC DATAGRAM frames and sends each on from its request's socket;
//! per UDP request ([`bind`]) one task that owns the request stream (capsules) and reads the
//! request's socket, sending what arrives back as datagrams; per TCP request ([`tcp`]) one
//! task pumping bytes. The sans-IO parts decide: [`permissions`] (which peers a bind may
//! reach and hear), [`egress`], [`quota`], the MASQUE contexts
//! ([`crate::masque::request::ProxyContexts`]).

mod bind;
mod budget;
pub mod config;
mod connection;
pub mod counters;
pub mod egress;
pub mod permissions;
mod quota;
mod request;
mod shard;
mod shared;
mod tcp;

pub use counters::{RelayCounters, RelayDrop};
pub use shard::{Error, Relay, RelayHandle};
