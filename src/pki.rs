//! Certificates for the tunnel: a private CA that signs the relay's certificate and the
//! sidecars' client certificates (mutual TLS), and the QUIC/TLS configurations built from them.
//!
//! `veil pki` writes a fresh set to a directory; `veil up` makes one in memory. Organisations
//! with their own PKI point the relay and sidecar configs at their files instead.

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls::RootCertStore;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

/// The ALPN protocol of HTTP/3.
pub const ALPN_H3: &[u8] = b"h3";

/// Why certificates or TLS settings cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file could not be read.
    #[error("{path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A PEM file holds nothing usable.
    #[error("{path}: {what}")]
    Pem {
        /// The file.
        path: String,
        /// What was expected.
        what: String,
    },
    /// Generating a certificate failed.
    #[error("generating certificates: {0}")]
    Generate(#[from] rcgen::Error),
    /// rustls refused the configuration.
    #[error("TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
    /// The client certificate verifier could not be built.
    #[error("client CA: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
    /// quinn refused the TLS configuration.
    #[error("QUIC TLS configuration: {0}")]
    Quic(String),
}

/// A certificate chain and its private key, PEM-encoded.
#[derive(Debug, Clone)]
pub struct Identity {
    /// The certificate (PEM).
    pub cert_pem: String,
    /// The private key (PKCS#8 PEM).
    pub key_pem: String,
}

/// A CA with a relay identity and client identities.
#[derive(Debug, Clone)]
pub struct Pki {
    /// The CA certificate (PEM): the relay's client CA and the sidecars' relay CA.
    pub ca_cert_pem: String,
    /// The CA's private key (PEM), to sign more clients later.
    pub ca_key_pem: String,
    /// The relay's certificate, valid for `relay_names`.
    pub relay: Identity,
    /// One client identity per requested name.
    pub clients: Vec<(String, Identity)>,
}

/// Generates a CA, a relay certificate for `relay_names` (DNS names or IP addresses) and one
/// client certificate per name in `clients` (its common name).
pub fn generate(relay_names: &[String], clients: &[String]) -> Result<Pki, Error> {
    let ca_key = KeyPair::generate()?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "veil private CA");
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_cert = ca_params.self_signed(&ca_key)?;
    let ca_key_pem = ca_key.serialize_pem();
    let issuer = Issuer::new(ca_params, ca_key);

    // Each leaf says what it is for (RFC 5280 extended key usage), so that the relay's
    // certificate cannot serve as a sidecar's client certificate, nor a sidecar's as a relay's:
    // rustls (webpki) checks the purpose on both ends.
    let leaf = |names: Vec<String>, cn: &str, purpose| -> Result<Identity, Error> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(names)?;
        params.distinguished_name.push(DnType::CommonName, cn);
        params.extended_key_usages = vec![purpose];
        let cert = params.signed_by(&key, &issuer)?;
        Ok(Identity {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    };
    let relay = leaf(
        relay_names.to_vec(),
        relay_names.first().map_or("veil relay", String::as_str),
        ExtendedKeyUsagePurpose::ServerAuth,
    )?;
    let clients = clients
        .iter()
        .map(|name| {
            let id = leaf(Vec::new(), name, ExtendedKeyUsagePurpose::ClientAuth)?;
            Ok((name.clone(), id))
        })
        .collect::<Result<Vec<_>, Error>>()?;
    Ok(Pki {
        ca_cert_pem: ca_cert.pem(),
        ca_key_pem,
        relay,
        clients,
    })
}

/// Reads a file as text, naming it in the error.
pub fn read(path: &Path) -> Result<String, Error> {
    std::fs::read_to_string(path).map_err(|source| Error::Read {
        path: path.display().to_string(),
        source,
    })
}

/// Parses every certificate in a PEM text; `origin` names it in errors.
pub fn certificates(pem: &str, origin: &str) -> Result<Vec<CertificateDer<'static>>, Error> {
    let certs: Vec<_> = CertificateDer::pem_slice_iter(pem.as_bytes())
        .filter_map(Result::ok)
        .collect();
    if certs.is_empty() {
        return Err(Error::Pem {
            path: origin.to_owned(),
            what: "no PEM certificate found".to_owned(),
        });
    }
    Ok(certs)
}

/// Parses the private key in a PEM text; `origin` names it in errors.
pub fn private_key(pem: &str, origin: &str) -> Result<PrivateKeyDer<'static>, Error> {
    PrivateKeyDer::from_pem_slice(pem.as_bytes()).map_err(|e| Error::Pem {
        path: origin.to_owned(),
        what: format!("no usable PEM private key ({e})"),
    })
}

/// Every certificate in a PEM file.
pub fn certificates_from_file(path: &Path) -> Result<Vec<CertificateDer<'static>>, Error> {
    certificates(&read(path)?, &path.display().to_string())
}

/// A certificate chain and its private key, from PEM files.
pub fn identity_from_files(
    certificate: &Path,
    private_key: &Path,
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), Error> {
    let certs = certificates_from_file(certificate)?;
    let key = self::private_key(&read(private_key)?, &private_key.display().to_string())?;
    Ok((certs, key))
}

/// [`client_config`] from PEM files: the relay's CA, the sidecar's certificate and key.
pub fn client_config_from_files(
    relay_ca: &Path,
    certificate: &Path,
    private_key: &Path,
) -> Result<quinn::ClientConfig, Error> {
    let ca = certificates_from_file(relay_ca)?;
    let (certs, key) = identity_from_files(certificate, private_key)?;
    client_config(&ca, certs, key)
}

fn roots(ca: &[CertificateDer<'static>]) -> Result<RootCertStore, Error> {
    let mut roots = RootCertStore::empty();
    for cert in ca {
        roots.add(cert.clone())?;
    }
    Ok(roots)
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The relay's QUIC endpoint settings, derived from its private key so that they survive
/// restarts: connection IDs validate under the same key and stateless-reset tokens stay the same,
/// so a restarted relay answers packets of connections it has forgotten with a valid stateless
/// reset (RFC 9000 §10.3) and sidecars reconnect at once instead of waiting for the idle timeout.
/// The endpoint of shard `shard` of `shards` issues connection IDs that the kernel steers to it
/// (see [`crate::reuseport`]).
pub fn relay_endpoint_config(
    private_key_der: &[u8],
    shard: u8,
    shards: u8,
) -> quinn::EndpointConfig {
    let derive = |label: &[u8]| {
        let mut material = label.to_vec();
        material.extend_from_slice(private_key_der);
        ring::digest::digest(&ring::digest::SHA256, &material)
    };
    let reset = derive(b"veil stateless reset key v1");
    let cid = derive(b"veil connection id key v1");
    let cid_key = cid
        .as_ref()
        .get(..8)
        .and_then(|b| <[u8; 8]>::try_from(b).ok())
        .map_or(0, u64::from_le_bytes);
    let mut config = quinn::EndpointConfig::new(Arc::new(ring::hmac::Key::new(
        ring::hmac::HMAC_SHA256,
        reset.as_ref(),
    )));
    config.cid_generator(move || {
        Box::new(crate::reuseport::ShardedConnectionIds::new(
            cid_key, shard, shards,
        ))
    });
    config
}

/// QUIC transport settings for the tunnel, the same at both ends.
///
/// Media needs 1200-byte datagrams through the tunnel, so the path MTU is chosen on purpose:
/// start at 1400 (fits any Ethernet or Wi-Fi path with room for tunnel headers), let path MTU
/// discovery go up to 1452, and never assume less than 1280 (the IPv6 minimum). A datagram too
/// large for the path at the moment goes as a DATAGRAM capsule on its request stream instead.
pub fn transport() -> quinn::TransportConfig {
    let mut t = quinn::TransportConfig::default();
    // Keep-alives (a few bytes a second) mean a working path delivers something every second,
    // which the sidecar's silence check relies on (`tunnel::Silence`). The relay drops a
    // connection, and its binds, after 30 s of silence; a relay that restarts is noticed at
    // once by stateless reset.
    t.keep_alive_interval(Some(Duration::from_secs(1)));
    if let Ok(idle) = quinn::IdleTimeout::try_from(Duration::from_secs(30)) {
        t.max_idle_timeout(Some(idle));
    }
    t.initial_mtu(1400);
    t.min_mtu(1280);
    let mut discovery = quinn::MtuDiscoveryConfig::default();
    discovery.upper_bound(1452);
    t.mtu_discovery_config(Some(discovery));
    // Every bind is a long-lived request stream: allow as many as the relay's bind quota, not
    // quinn's default of 100 (the 101st association would wait for a free stream).
    t.max_concurrent_bidi_streams(quinn::VarInt::from_u32(20_000));
    t.datagram_receive_buffer_size(Some(4 << 20));
    t.datagram_send_buffer_size(4 << 20);
    t
}

/// The relay's QUIC server configuration: its identity, and client certificates required and
/// verified against `client_ca`. 0-RTT is off.
pub fn server_config(
    cert_chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    client_ca: &[CertificateDer<'static>],
) -> Result<quinn::ServerConfig, Error> {
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots(client_ca)?),
        provider(),
    )
    .build()?;
    let mut tls = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(cert_chain, key)?;
    tls.alpn_protocols = vec![ALPN_H3.to_vec()];
    tls.max_early_data_size = 0;
    let quic = QuicServerConfig::try_from(tls).map_err(|e| Error::Quic(e.to_string()))?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(quic));
    config.transport_config(Arc::new(transport()));
    Ok(config)
}

/// The sidecar's QUIC client configuration: trusts `relay_ca`, presents its own certificate.
pub fn client_config(
    relay_ca: &[CertificateDer<'static>],
    cert_chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<quinn::ClientConfig, Error> {
    let mut tls = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots(relay_ca)?)
        .with_client_auth_cert(cert_chain, key)?;
    tls.alpn_protocols = vec![ALPN_H3.to_vec()];
    tls.enable_early_data = false;
    let quic = QuicClientConfig::try_from(tls).map_err(|e| Error::Quic(e.to_string()))?;
    let mut config = quinn::ClientConfig::new(Arc::new(quic));
    config.transport_config(Arc::new(transport()));
    Ok(config)
}

/// Who a certificate names: its subject as DER (compared whole) and its common name (for
/// configuration and logs), read from the certificate's DER without a full X.509 parser.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subject {
    /// The subject `Name`, DER-encoded.
    pub der: Vec<u8>,
    /// Its first common name (`2.5.4.3`), if it has one.
    pub common_name: Option<String>,
}

/// One DER element at the front of `input`: its tag, its contents, and what follows it.
fn der_element(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 {
            return None;
        }
        let (bytes, rest) = rest.split_at_checked(n)?;
        (
            bytes
                .iter()
                .fold(0usize, |acc, b| (acc << 8) | usize::from(*b)),
            rest,
        )
    };
    let (contents, rest) = rest.split_at_checked(len)?;
    Some((tag, contents, rest))
}

impl Subject {
    /// The subject of a DER certificate: Certificate → tbsCertificate → [version], serial,
    /// signature, issuer, validity, subject.
    pub fn of_certificate(der: &[u8]) -> Option<Self> {
        const SEQUENCE: u8 = 0x30;
        let (SEQUENCE, cert, _) = der_element(der)? else {
            return None;
        };
        let (SEQUENCE, tbs, _) = der_element(cert)? else {
            return None;
        };
        let mut rest = tbs;
        if rest.first() == Some(&0xa0) {
            rest = der_element(rest)?.2;
        }
        for _ in 0..4 {
            rest = der_element(rest)?.2;
        }
        let (SEQUENCE, name, after) = der_element(rest)? else {
            return None;
        };
        let whole = rest.get(..rest.len() - after.len())?;
        Some(Self {
            der: whole.to_vec(),
            common_name: Self::common_name(name),
        })
    }

    /// The first common name in a Name's contents (RDNs: SETs of type-and-value SEQUENCEs).
    fn common_name(mut rdns: &[u8]) -> Option<String> {
        const CN: &[u8] = &[0x55, 0x04, 0x03];
        while let Some((_, set, next)) = der_element(rdns) {
            let mut attrs = set;
            while let Some((_, attr, more)) = der_element(attrs) {
                if let Some((0x06, oid, value)) = der_element(attr)
                    && oid == CN
                    && let Some((_, text, _)) = der_element(value)
                {
                    return std::str::from_utf8(text).ok().map(str::to_owned);
                }
                attrs = more;
            }
            rdns = next;
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_subject_and_common_name_are_read_from_a_certificate() {
        let set = generate(
            &["relay.example".into()],
            &["laptop-17".into(), "laptop-18".into()],
        )
        .expect("pki");
        let subject = |pem: &str| {
            let der = certificates(pem, "test").expect("pem");
            Subject::of_certificate(der[0].as_ref()).expect("subject")
        };
        let a = subject(&set.clients[0].1.cert_pem);
        let b = subject(&set.clients[1].1.cert_pem);
        assert_eq!(a.common_name.as_deref(), Some("laptop-17"));
        assert_eq!(b.common_name.as_deref(), Some("laptop-18"));
        assert_ne!(a.der, b.der);
        assert_eq!(
            subject(&set.relay.cert_pem).common_name.as_deref(),
            Some("relay.example")
        );
        assert_eq!(
            subject(&set.ca_cert_pem).common_name.as_deref(),
            Some("veil private CA")
        );
        // Cut anywhere, it is refused, never a panic.
        let der = certificates(&set.clients[0].1.cert_pem, "test").expect("pem");
        let der = der[0].as_ref();
        for n in 0..der.len() {
            let _ = Subject::of_certificate(&der[..n]);
        }
        assert_eq!(
            Subject::of_certificate(&[0x30, 0x84, 0xff, 0xff, 0xff, 0xff]),
            None
        );
    }

    #[test]
    fn generated_set_builds_both_configs() {
        let pki = generate(
            &["relay.test".into(), "127.0.0.1".into()],
            &["laptop-1".into()],
        )
        .expect("pki");
        let ca = certificates(&pki.ca_cert_pem, "ca").expect("ca");
        let relay = certificates(&pki.relay.cert_pem, "relay").expect("relay cert");
        let key = private_key(&pki.relay.key_pem, "relay key").expect("relay key");
        server_config(relay, key, &ca).expect("server config");
        let (name, client) = &pki.clients[0];
        assert_eq!(name, "laptop-1");
        let certs = certificates(&client.cert_pem, "client").expect("client cert");
        let key = private_key(&client.key_pem, "client key").expect("client key");
        client_config(&ca, certs, key).expect("client config");
        assert!(matches!(
            certificates("nothing", "f"),
            Err(Error::Pem { .. })
        ));
        assert!(matches!(
            private_key("nothing", "f"),
            Err(Error::Pem { .. })
        ));
    }
}
