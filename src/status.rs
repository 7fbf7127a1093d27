//! What the sidecar is doing right now, for `veil status` (a root-only Unix socket) and for the
//! Prometheus endpoint (off by default, loopback only).
//!
//! Sessions register a [`LiveSession`] and record each newly decided flow; nothing here runs
//! per packet.

use crate::policy::{Decision, Verdict};
use crate::tunnel::TunnelFigures;
use std::collections::HashMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// One flow as status shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FlowView {
    /// Destination.
    pub target: SocketAddr,
    /// Verdict in force.
    pub verdict: Verdict,
    /// The rule that gave it.
    pub rule: Arc<str>,
}

/// One live session (SOCKS5 UDP association or intercepted app socket).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionView {
    /// The user.
    pub user: String,
    /// The client (app socket) address.
    pub client: SocketAddr,
    /// `socks5` or `transparent`.
    pub kind: &'static str,
    /// Its flows, in the order first seen.
    pub flows: Vec<FlowView>,
}

/// Every live session.
#[derive(Debug, Default)]
pub struct Registry {
    next: AtomicU64,
    sessions: Mutex<HashMap<u64, SessionView>>,
}

impl Registry {
    /// Registers a session; it disappears when the returned guard drops.
    pub fn open(
        self: &Arc<Self>,
        user: &str,
        client: SocketAddr,
        kind: &'static str,
    ) -> LiveSession {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut s) = self.sessions.lock() {
            s.insert(
                id,
                SessionView {
                    user: user.to_owned(),
                    client,
                    kind,
                    flows: Vec::new(),
                },
            );
        }
        LiveSession {
            registry: self.clone(),
            id,
        }
    }

    /// A snapshot of every session, sorted by user and client.
    pub fn snapshot(&self) -> Vec<SessionView> {
        let mut all: Vec<SessionView> = self
            .sessions
            .lock()
            .map(|s| s.values().cloned().collect())
            .unwrap_or_default();
        all.sort_by(|a, b| (&a.user, a.client).cmp(&(&b.user, b.client)));
        all
    }
}

/// A registered session; unregisters on drop.
#[derive(Debug)]
pub struct LiveSession {
    registry: Arc<Registry>,
    id: u64,
}

impl LiveSession {
    /// Records a flow's (new or changed) decision.
    pub fn flow(&self, target: SocketAddr, decision: &Decision) {
        if let Ok(mut s) = self.registry.sessions.lock()
            && let Some(view) = s.get_mut(&self.id)
        {
            let flow = FlowView {
                target,
                verdict: decision.verdict,
                rule: decision.rule.clone(),
            };
            match view.flows.iter_mut().find(|f| f.target == target) {
                Some(f) => *f = flow,
                None => view.flows.push(flow),
            }
        }
    }
}

impl Drop for LiveSession {
    fn drop(&mut self) {
        if let Ok(mut s) = self.registry.sessions.lock() {
            s.remove(&self.id);
        }
    }
}

/// The tunnel's line of the report: its state and figures, or that there is none.
pub fn tunnel_line(tunnel: Option<&crate::tunnel::Tunnel>) -> String {
    match tunnel {
        Some(t) => {
            let f = t.figures();
            let rtt = f
                .rtt
                .map(|r| format!("rtt {:.1} ms, ", r.as_secs_f64() * 1e3))
                .unwrap_or_default();
            format!(
                "{} ({rtt}{} of {} packets lost on this connection; {} connections, {} replaced after the relay fell silent)",
                t.state().as_str(),
                f.lost_packets,
                f.sent_packets,
                f.connects,
                f.replaced
            )
        }
        None => "none (no relay configured: relayed traffic is dropped)".to_owned(),
    }
}

/// The `veil status` report.
pub fn report(
    tunnel: &str,
    managed: &[String],
    kill_switch: Option<&str>,
    sessions: &[SessionView],
    counters: &[(String, u64)],
) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "tunnel: {tunnel}");
    let _ = writeln!(
        out,
        "managed users: {}",
        if managed.is_empty() {
            "none".to_owned()
        } else {
            managed.join(", ")
        }
    );
    if let Some(k) = kill_switch {
        let _ = writeln!(out, "kill switch: {k}");
    }
    let _ = writeln!(out, "sessions: {}", sessions.len());
    for s in sessions {
        let _ = writeln!(
            out,
            "  user={} client={} kind={} flows={}",
            s.user,
            s.client,
            s.kind,
            s.flows.len()
        );
        for f in &s.flows {
            let _ = writeln!(out, "    {} {} {}", f.target, f.verdict, f.rule);
        }
    }
    out.push_str("counters:\n");
    for (name, value) in counters {
        let _ = writeln!(out, "  {name} {value}");
    }
    out
}

/// The same figures in Prometheus text format (version 0.0.4).
pub fn prometheus(
    tunnel_up: bool,
    tunnel: &TunnelFigures,
    sessions: &[SessionView],
    counters: &[(String, u64)],
) -> String {
    let mut out = String::new();
    out.push_str("# HELP veil_tunnel_up 1 if the tunnel to the relay is connected.\n# TYPE veil_tunnel_up gauge\n");
    let _ = writeln!(out, "veil_tunnel_up {}", u8::from(tunnel_up));
    out.push_str("# HELP veil_tunnel_connections_total Tunnel connections established.\n# TYPE veil_tunnel_connections_total counter\n");
    let _ = writeln!(out, "veil_tunnel_connections_total {}", tunnel.connects);
    out.push_str("# HELP veil_tunnel_replaced_total Tunnel connections replaced after the relay fell silent.\n# TYPE veil_tunnel_replaced_total counter\n");
    let _ = writeln!(out, "veil_tunnel_replaced_total {}", tunnel.replaced);
    if let Some(rtt) = tunnel.rtt {
        out.push_str("# HELP veil_tunnel_rtt_seconds Smoothed round trip of the tunnel connection.\n# TYPE veil_tunnel_rtt_seconds gauge\n");
        let _ = writeln!(out, "veil_tunnel_rtt_seconds {:.6}", rtt.as_secs_f64());
    }
    out.push_str("# HELP veil_dropped_total Datagrams dropped, by reason.\n# TYPE veil_dropped_total counter\n");
    for (name, value) in counters {
        if let Some(reason) = name.strip_prefix("dropped_") {
            let _ = writeln!(out, "veil_dropped_total{{reason=\"{reason}\"}} {value}");
        }
    }
    out.push_str("# HELP veil_datagrams_total Datagrams forwarded, by path and direction.\n# TYPE veil_datagrams_total counter\n");
    for (name, path, dir) in [
        ("datagrams_out", "direct", "out"),
        ("datagrams_in", "direct", "in"),
        ("relayed_out", "relay", "out"),
        ("relayed_in", "relay", "in"),
    ] {
        let value = counters
            .iter()
            .find(|(n, _)| n == name)
            .map_or(0, |(_, v)| *v);
        let _ = writeln!(
            out,
            "veil_datagrams_total{{path=\"{path}\",direction=\"{dir}\"}} {value}"
        );
    }
    out.push_str("# HELP veil_sessions Live sessions, by user.\n# TYPE veil_sessions gauge\n");
    let mut per_user: Vec<(&str, usize)> = Vec::new();
    for s in sessions {
        match per_user.iter_mut().find(|(u, _)| *u == s.user) {
            Some((_, n)) => *n += 1,
            None => per_user.push((&s.user, 1)),
        }
    }
    for (user, n) in per_user {
        let _ = writeln!(
            out,
            "veil_sessions{{user=\"{}\"}} {n}",
            user.replace(['"', '\\', '\n'], "_")
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sessions_come_and_go_and_flows_update() {
        let registry = Arc::new(Registry::default());
        let client: SocketAddr = "192.0.2.2:5000".parse().expect("addr");
        let target: SocketAddr = "203.0.113.2:7000".parse().expect("addr");
        let live = registry.open("alice", client, "transparent");
        live.flow(
            target,
            &Decision {
                verdict: Verdict::Relay,
                rule: Arc::from("default.toml fallback"),
            },
        );
        live.flow(
            target,
            &Decision {
                verdict: Verdict::Block,
                rule: Arc::from("default.toml rule[1]"),
            },
        );
        let snap = registry.snapshot();
        assert_eq!(snap.len(), 1);
        assert_eq!(snap[0].flows.len(), 1);
        assert_eq!(snap[0].flows[0].verdict, Verdict::Block);
        let text = report(
            "connected",
            &["alice".into()],
            Some("intact"),
            &snap,
            &[("dropped_blocked".into(), 2)],
        );
        assert!(
            text.contains("    203.0.113.2:7000 block default.toml rule[1]\n"),
            "{text}"
        );
        assert!(text.contains("\nkill switch: intact\n"), "{text}");
        let tunnel = TunnelFigures {
            connects: 3,
            replaced: 1,
            rtt: Some(std::time::Duration::from_micros(1500)),
            ..TunnelFigures::default()
        };
        let metrics = prometheus(
            true,
            &tunnel,
            &snap,
            &[("dropped_blocked".into(), 2), ("relayed_out".into(), 5)],
        );
        assert!(
            metrics.contains("veil_dropped_total{reason=\"blocked\"} 2\n"),
            "{metrics}"
        );
        assert!(
            metrics.contains("veil_datagrams_total{path=\"relay\",direction=\"out\"} 5\n"),
            "{metrics}"
        );
        assert!(
            metrics.contains("veil_sessions{user=\"alice\"} 1\n"),
            "{metrics}"
        );
        for line in [
            "veil_tunnel_connections_total 3\n",
            "veil_tunnel_replaced_total 1\n",
            "veil_tunnel_rtt_seconds 0.001500\n",
        ] {
            assert!(metrics.contains(line), "{metrics}");
        }
        drop(live);
        assert!(registry.snapshot().is_empty());
    }
}
