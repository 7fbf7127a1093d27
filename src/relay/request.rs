//! A request on the relay, read from its headers: who it is for (`veil-user`), what it asks
//! for (a bind, a fixed UDP target, a TCP target) and whether the egress policy allows it; or
//! its refusal, with a status and a `Proxy-Status` the client can act on. Also who the
//! client's certificate names, which decides whom it may speak for.

use super::counters::bump;
use super::egress::Refusal;
use super::shared::Shared;
use crate::masque::request::{self as mreq, HEADER_BIND, HEADER_USER, UdpTarget};
use bytes::Bytes;
use http::{Method, Response, StatusCode};
use std::net::{IpAddr, SocketAddr};
use tracing::info;

/// A request stream, within its budget until it is answered.
pub(super) type H3Stream =
    h3::server::RequestStream<super::budget::Budgeted<h3_quinn::BidiStream<Bytes>>, Bytes>;

/// A refusal: status, `Proxy-Status` error and details.
pub(super) struct Refuse(
    pub(super) StatusCode,
    pub(super) &'static str,
    pub(super) String,
);

pub(super) async fn refuse(
    shared: &Shared,
    stream: &mut H3Stream,
    Refuse(status, error, details): Refuse,
) {
    bump(&shared.counters.requests_refused);
    // Whatever the request held (a NUL or newline in its target), the refusal goes out: a
    // header value of visible ASCII only, and at most 200 characters of it.
    let details: String = details
        .chars()
        .map(|c| match c {
            '"' | '\\' => '\'',
            c if c.is_ascii_graphic() || c == ' ' => c,
            _ => '?',
        })
        .take(200)
        .collect();
    info!(status = %status, error, details, "request refused");
    let resp = Response::builder()
        .status(status)
        .header(
            "proxy-status",
            format!("veil; error={error}; details=\"{details}\""),
        )
        .body(());
    if let Ok(resp) = resp {
        let _ = stream.send_response(resp).await;
    }
    let _ = stream.finish().await;
}

pub(super) fn header<'a>(req: &'a http::Request<()>, name: &str) -> Option<&'a [u8]> {
    req.headers().get(name).map(|v| v.as_bytes())
}

async fn resolve(host: &str, port: u16) -> Result<SocketAddr, Refuse> {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if let Ok(ip) = host.parse::<IpAddr>() {
        return Ok(SocketAddr::new(ip, port));
    }
    tokio::net::lookup_host((host, port))
        .await
        .ok()
        .and_then(|mut addrs| addrs.next())
        .ok_or_else(|| {
            Refuse(
                StatusCode::BAD_GATEWAY,
                "dns_error",
                format!("cannot resolve {host}"),
            )
        })
}

fn prohibited(r: Refusal) -> Refuse {
    Refuse(StatusCode::FORBIDDEN, r.proxy_status(), r.to_string())
}

/// Checks a request and says what it is for: the user, and the UDP target or TCP target.
pub(super) async fn admit(
    shared: &Shared,
    req: &http::Request<()>,
) -> Result<(String, Admitted), Refuse> {
    let bad = |d: &str| Refuse(StatusCode::BAD_REQUEST, "http_request_error", d.to_owned());
    // A user name as Unix and directory services write them; anything else (spaces, quotes,
    // control characters that would forge fields in log lines) is refused.
    let user = header(req, HEADER_USER).ok_or_else(|| bad("missing veil-user header"))?;
    if user.is_empty()
        || user.len() > 255
        || !user
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || b"._-@+$".contains(b))
    {
        return Err(bad(
            "veil-user must be 1-255 characters of A-Z a-z 0-9 . _ - @ + $",
        ));
    }
    let user = String::from_utf8_lossy(user).into_owned();
    tracing::Span::current().record("user", user.as_str());
    if req.method() != Method::CONNECT {
        return Err(Refuse(
            StatusCode::METHOD_NOT_ALLOWED,
            "http_request_error",
            "only CONNECT".into(),
        ));
    }
    let protocol = req.extensions().get::<h3::ext::Protocol>();
    match protocol {
        None => {
            // Classic CONNECT: a TCP tunnel to the authority.
            let authority = req
                .uri()
                .authority()
                .ok_or_else(|| bad("CONNECT without authority"))?;
            let port = authority
                .port_u16()
                .ok_or_else(|| bad("CONNECT authority without port"))?;
            let target = resolve(authority.host(), port).await?;
            shared.egress.check(target).map_err(prohibited)?;
            Ok((user, Admitted::Tcp(target)))
        }
        Some(p) if *p == h3::ext::Protocol::CONNECT_UDP => {
            match mreq::parse_path(req.uri().path()).map_err(|e| bad(&e.to_string()))? {
                UdpTarget::Bind => {
                    if !header(req, HEADER_BIND).is_some_and(mreq::is_sf_true) {
                        return Err(bad("target * needs connect-udp-bind: ?1"));
                    }
                    Ok((user, Admitted::Bind))
                }
                UdpTarget::Host { host, port } => {
                    let target = resolve(&host, port).await?;
                    shared.egress.check(target).map_err(prohibited)?;
                    Ok((user, Admitted::Fixed(target)))
                }
            }
        }
        Some(_) => Err(Refuse(
            StatusCode::NOT_IMPLEMENTED,
            "http_request_error",
            "unsupported :protocol".into(),
        )),
    }
}

pub(super) enum Admitted {
    /// A bind: any peer.
    Bind,
    /// Unextended CONNECT-UDP to one target.
    Fixed(SocketAddr),
    /// Classic CONNECT to a TCP target.
    Tcp(SocketAddr),
}

/// Who the client's certificate names (the end-entity certificate of its chain).
pub(super) fn peer_subject(conn: &quinn::Connection) -> Option<crate::pki::Subject> {
    let chain = conn
        .peer_identity()?
        .downcast::<Vec<rustls_pki_types::CertificateDer<'static>>>()
        .ok()?;
    crate::pki::Subject::of_certificate(chain.first()?.as_ref())
}
