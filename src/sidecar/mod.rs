//! The sidecar: its configuration, its sidecar-wide state, and the datagram pipeline that
//! every front-end (SOCKS5, transparent interception) feeds; [`Sidecar`] puts it together.

pub mod association;
pub(crate) mod binding;
pub mod config;
pub mod managed;
pub(crate) mod pipeline;
pub mod service;
pub mod state;

pub use config::SidecarConfig;
pub use service::{Reloader, Settings, Sidecar};
