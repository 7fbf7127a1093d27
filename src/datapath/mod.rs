//! The sidecar's datapath, shared by every front-end (SOCKS5, transparent interception): the
//! sidecar-wide state, one app socket's flows (sans IO), its relay bind, and the pipeline that
//! takes each datagram from the app to the host or the relay and every reply back.
//!
//! Front-ends depend on this module, never on one another; [`crate::sidecar`] puts them
//! together.

pub mod association;
pub(crate) mod binding;
pub(crate) mod pipeline;
pub mod state;
