//! SOCKS5 CONNECT, logins, identity and handshake errors through the real `veil` binary, with
//! curl as the client.

mod support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::Duration;
use support::{HttpServer, Sidecar, is_root, veil};

fn tcp_policy(allowed_port: u16) -> String {
    format!(
        "fallback = \"block\"\n[[rule]]\nname = \"web\"\nverdict = \"direct\"\nnetworks = [\"127.0.0.0/8\"]\nports = [{allowed_port}]\ntransport = [\"tcp\"]\n"
    )
}

fn curl(args: &[&str]) -> (i32, String, String) {
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "5"])
        .args(args)
        .output()
        .expect("run curl");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn curl_connect_allowed_and_blocked() {
    let web = HttpServer::spawn("veil-ok");
    let other = HttpServer::spawn("should-not-be-seen");
    let sidecar = Sidecar::builder()
        .policy("default.toml", &tcp_policy(web.addr.port()))
        .spawn();
    let proxy = sidecar.addr.to_string();
    let (code, body, err) = curl(&["--socks5", &proxy, &format!("http://{}/", web.addr)]);
    assert_eq!((code, body.as_str()), (0, "veil-ok"), "{err}");
    // The same with the name resolved by the proxy (ATYP domain).
    let (code, body, err) = curl(&[
        "--socks5-hostname",
        &proxy,
        &format!("http://localhost:{}/", web.addr.port()),
    ]);
    assert_eq!((code, body.as_str()), (0, "veil-ok"), "{err}");

    let (code, body, err) = curl(&["--socks5", &proxy, &format!("http://{}/", other.addr)]);
    assert_ne!(code, 0, "blocked CONNECT succeeded: {body}");
    assert!(body.is_empty());
    // curl shows the SOCKS5 reply code: 2, "connection not allowed by ruleset".
    assert!(err.contains("(2)") || err.contains("not allowed"), "{err}");
    assert!(
        sidecar
            .wait_log(
                &["verdict=block", &format!("target={}", other.addr)],
                Duration::from_secs(2)
            )
            .is_some()
    );
}

#[test]
fn curl_with_and_without_credentials() {
    let web = HttpServer::spawn("veil-ok");
    let hash_line = {
        let mut child = veil()
            .args(["passwd", "carol"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("veil passwd");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(b"correct horse\n")
            .expect("write");
        let out = child.wait_with_output().expect("wait");
        assert!(out.status.success());
        String::from_utf8(out.stdout).expect("utf8")
    };
    assert!(hash_line.starts_with("carol:$argon2id$"), "{hash_line}");
    let sidecar = Sidecar::builder()
        .policy("default.toml", &tcp_policy(web.addr.port()))
        .passwords(&hash_line)
        .spawn();
    let url = format!("http://{}/", web.addr);
    let proxy = sidecar.addr.to_string();

    let (code, body, err) = curl(&[
        "--socks5",
        &proxy,
        "--proxy-user",
        "carol:correct horse",
        &url,
    ]);
    assert_eq!((code, body.as_str()), (0, "veil-ok"), "{err}");
    // Wrong password: curl reports the refused login with exit 97 (CURLE_PROXY).
    let (code, _, err) = curl(&["--socks5", &proxy, "--proxy-user", "carol:wrong", &url]);
    assert_eq!(code, 97, "{err}");
    // No credentials at all: no acceptable method.
    let (code, _, err) = curl(&["--socks5", &proxy, &url]);
    assert_ne!(code, 0, "{err}");
    assert!(
        sidecar
            .wait_log(&["login failed for \"carol\""], Duration::from_secs(2))
            .is_some()
    );
}

/// The user is the kernel's owner of the client socket: a per-user file applies to a process
/// running as that user, whatever it claims.
#[test]
fn per_user_policy_follows_the_socket_owner() {
    assert!(
        is_root(),
        "this test switches users and must run as root (tests/run.sh runs it so in CI)"
    );
    let web = HttpServer::spawn("veil-ok");
    let nobody =
        "[[rule]]\nname = \"nobody-no-web\"\nverdict = \"block\"\nnetworks = [\"0.0.0.0/0\"]\n";
    let sidecar = Sidecar::builder()
        .policy("default.toml", &tcp_policy(web.addr.port()))
        .policy("users/nobody.toml", nobody)
        .spawn();
    let url = format!("http://{}/", web.addr);
    let proxy = sidecar.addr.to_string();
    let (code, body, err) = curl(&["--socks5", &proxy, &url]);
    assert_eq!((code, body.as_str()), (0, "veil-ok"), "root: {err}");

    let out = Command::new("setpriv")
        .args([
            "--reuid=nobody",
            "--regid=nogroup",
            "--clear-groups",
            "curl",
            "-sS",
            "--max-time",
            "5",
            "--socks5",
            &proxy,
            &url,
        ])
        .output()
        .expect("setpriv curl");
    assert!(
        !out.status.success(),
        "nobody got through: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    let line = sidecar
        .wait_log(
            &["user=nobody", "nobody-no-web", "verdict=block"],
            Duration::from_secs(2),
        )
        .expect("nobody's rule decided");
    assert!(line.contains("users/nobody.toml rule[1]"), "{line}");
}

fn handshake(proxy: std::net::SocketAddr, bytes: &[u8]) -> Vec<u8> {
    let mut s = TcpStream::connect(proxy).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(3)))
        .expect("timeout");
    s.write_all(bytes).expect("write");
    let _ = s.shutdown(std::net::Shutdown::Write);
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    out
}

#[test]
fn bad_requests_get_their_exact_reply() {
    let sidecar = Sidecar::builder()
        .policy("default.toml", &tcp_policy(1))
        .spawn();
    let p = sidecar.addr;
    // BIND is answered 0x07.
    assert_eq!(
        handshake(p, &[5, 1, 0, 5, 2, 0, 1, 127, 0, 0, 1, 0, 80]),
        [5, 0, 5, 7, 0, 1, 0, 0, 0, 0, 0, 0]
    );
    // Unknown command 0x09 -> 0x07; unknown address type 0x05 -> 0x08.
    assert_eq!(
        handshake(p, &[5, 1, 0, 5, 9, 0, 1, 127, 0, 0, 1, 0, 80]),
        [5, 0, 5, 7, 0, 1, 0, 0, 0, 0, 0, 0]
    );
    assert_eq!(
        handshake(p, &[5, 1, 0, 5, 1, 0, 5, 1]),
        [5, 0, 5, 8, 0, 1, 0, 0, 0, 0, 0, 0]
    );
    // Over-long: bytes after the request, before the reply -> general failure.
    assert_eq!(
        handshake(p, &[5, 1, 0, 5, 1, 0, 1, 127, 0, 0, 1, 0, 80, 0xde, 0xad]),
        [5, 0, 5, 1, 0, 1, 0, 0, 0, 0, 0, 0]
    );
    // Truncated: a domain request cut before its port, then EOF: the method choice and nothing else.
    assert_eq!(
        handshake(
            p,
            &[
                5, 1, 0, 5, 1, 0, 3, 9, b'l', b'o', b'c', b'a', b'l', b'h', b'o', b's', b't'
            ]
        ),
        [5, 0]
    );
    // Only username/password offered while none is configured: X'FF'.
    assert_eq!(handshake(p, &[5, 1, 2]), [5, 0xff]);
    // Not SOCKS5 at all: closed without a reply.
    assert_eq!(handshake(p, b"GET / HTTP/1.1\r\n\r\n"), Vec::<u8>::new());
    // A blocked CONNECT: 0x02.
    assert_eq!(
        handshake(p, &[5, 1, 0, 5, 1, 0, 1, 127, 0, 0, 1, 0, 80]),
        [5, 0, 5, 2, 0, 1, 0, 0, 0, 0, 0, 0]
    );
    // The server is still serving after all that.
    assert!(TcpStream::connect(p).is_ok());
}

#[test]
fn refuses_to_listen_beyond_loopback_without_passwords() {
    let dir = support::policy_dir(&[("default.toml", &tcp_policy(1))]);
    let out = veil()
        .args(["sidecar", "--listen", "0.0.0.0:0", "--policy-dir"])
        .arg(dir.path())
        .output()
        .expect("run veil");
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("refusing to listen on 0.0.0.0:0 without authentication"),
        "{err}"
    );
}
