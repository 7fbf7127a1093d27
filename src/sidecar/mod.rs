//! The sidecar: its configuration, who it manages, and [`Sidecar`], which puts the datapath
//! ([`crate::datapath`]), the front-ends ([`crate::socks5`], [`crate::intercept`]), the tunnel
//! and the kill switch together.

pub mod config;
pub mod managed;
pub mod service;

pub use config::SidecarConfig;
pub use service::{Reloader, Settings, Sidecar};
