//! The shipped systemd units: `systemd-analyze verify` passes, the security exposure of each is
//! "OK" or better (printed for the README), and the daemons speak the notify protocol: READY
//! only once the tunnel is up.

mod support;

use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::Command;
use std::time::Duration;
use support::{Daemon, Pki, veil};

const UNITS: [&str; 3] = [
    "veil-sidecar.service",
    "veil-relay.service",
    "veil-firewall.service",
];

/// The units with ExecStart pointing at the binary under test (verify needs it to exist).
fn units() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    for unit in UNITS {
        let text = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("systemd")
                .join(unit),
        )
        .expect("unit");
        std::fs::write(
            dir.path().join(unit),
            text.replace("/usr/bin/veil", env!("CARGO_BIN_EXE_veil")),
        )
        .expect("write");
    }
    dir
}

#[test]
fn units_verify_and_are_hardened() {
    let dir = units();
    let paths: Vec<_> = UNITS.iter().map(|u| dir.path().join(u)).collect();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .args(&paths)
        .output()
        .expect("systemd-analyze (tests/run.sh installs systemd)");
    assert!(
        out.status.success(),
        "verify: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    for path in &paths {
        let out = Command::new("systemd-analyze")
            .args(["security", "--offline=true"])
            .arg(path)
            .output()
            .expect("security");
        let text = String::from_utf8_lossy(&out.stdout);
        let level = text
            .lines()
            .find(|l| l.contains("Overall exposure level"))
            .expect("exposure line")
            .to_owned();
        eprintln!("{level}");
        assert!(level.contains(" OK") || level.contains("SAFE"), "{level}");
    }
}

fn notify_socket() -> (tempfile::TempDir, UnixDatagram, std::path::PathBuf) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("notify");
    let socket = UnixDatagram::bind(&path).expect("bind");
    socket
        .set_read_timeout(Some(Duration::from_millis(200)))
        .expect("timeout");
    (dir, socket, path)
}

/// Every notification received within `wait`.
fn notifications(socket: &UnixDatagram, wait: Duration) -> Vec<String> {
    let deadline = std::time::Instant::now() + wait;
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    while std::time::Instant::now() < deadline {
        if let Ok(n) = socket.recv(&mut buf) {
            got.push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
    }
    got
}

#[test]
fn ready_only_once_the_tunnel_is_up() {
    let pki = Pki::generate("localhost");
    let policy = support::policy_dir(&[("default.toml", "fallback = \"relay\"\n")]);
    let (_d1, relay_notify, relay_path) = notify_socket();
    let mut cmd = veil();
    cmd.arg("relay")
        .arg("--config")
        .arg(pki.relay_config("relay.toml", "127.0.0.1:0", ""))
        .env("NOTIFY_SOCKET", &relay_path);
    let relay = Daemon::spawn(cmd);
    assert!(
        notifications(&relay_notify, Duration::from_secs(1))
            .iter()
            .any(|n| n.starts_with("READY=1"))
    );

    let sidecar_config = |relay: std::net::SocketAddr| {
        let path = pki
            .dir
            .path()
            .join(format!("sidecar-{}.toml", relay.port()));
        std::fs::write(
            &path,
            format!(
                "listen = \"127.0.0.1:0\"\npolicy_dir = \"{}\"\n[relay]\naddress = \"{relay}\"\nserver_name = \"localhost\"\nca = \"{}\"\ncertificate = \"{}\"\nprivate_key = \"{}\"\n",
                policy.path().display(),
                pki.path("ca.crt").display(),
                pki.path("sidecar.crt").display(),
                pki.path("sidecar.key").display()
            ),
        )
        .expect("write");
        path
    };
    // A relay that answers: READY after the tunnel connects.
    let (_d2, up_notify, up_path) = notify_socket();
    let mut cmd = veil();
    cmd.arg("sidecar")
        .arg("--config")
        .arg(sidecar_config(relay.addr))
        .env("NOTIFY_SOCKET", &up_path);
    let up = Daemon::spawn(cmd);
    let got = notifications(&up_notify, Duration::from_secs(2));
    assert!(got.iter().any(|n| n.starts_with("READY=1")), "{got:?}");
    assert!(up.log().iter().any(|l| l.contains("tunnel connected")));

    // No relay there: never READY, and systemd is told why.
    let dead = std::net::UdpSocket::bind("127.0.0.1:0")
        .and_then(|s| s.local_addr())
        .expect("free port");
    let (_d3, down_notify, down_path) = notify_socket();
    let mut cmd = veil();
    cmd.arg("sidecar")
        .arg("--config")
        .arg(sidecar_config(dead))
        .env("NOTIFY_SOCKET", &down_path);
    let _down = Daemon::spawn(cmd);
    let got = notifications(&down_notify, Duration::from_secs(2));
    assert!(!got.iter().any(|n| n.starts_with("READY=1")), "{got:?}");
    assert!(
        got.iter()
            .any(|n| n.contains("STATUS=waiting for the relay")),
        "{got:?}"
    );
}
