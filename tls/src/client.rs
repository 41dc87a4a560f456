//! The client side: tonic channels over rustls whose server verifier checks
//! the federation CA, the validity period, and that the certificate is a
//! controller's (`spiffe://<fed>/region/<name>`) — of the very region the
//! caller meant to reach when it says so ([`Expect::Region`]). Every refusal
//! is logged with its reason. A verified certificate is reported to an
//! optional callback (membership learns attested tags from it).

use std::sync::Arc;
use std::time::Duration;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{ClientConfig, verify_server_cert_signed_by_trust_anchor};
use rustls::crypto::CryptoProvider;
use rustls::server::ParsedCertificate;
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use tonic::transport::{Channel, Endpoint};

use crate::identity::{self, Identity, Role};
use crate::{TlsError, TlsFiles};

/// Called with the identity of every verified controller certificate.
pub type OnVerified = Arc<dyn Fn(&Identity) + Send + Sync>;

/// Which controller the client means to reach.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Expect {
    /// Exactly this region's controller.
    Region(String),
    /// Any controller of the federation.
    AnyController,
}

/// Client TLS material for federation `fed`.
#[derive(Clone)]
pub struct ClientTls {
    roots: Arc<RootCertStore>,
    own: Option<(Vec<CertificateDer<'static>>, Arc<PrivateKeyDer<'static>>)>,
    fed: String,
    provider: Arc<CryptoProvider>,
}

impl std::fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientTls")
            .field("fed", &self.fed)
            .field("client_cert", &self.own.is_some())
            .finish()
    }
}

impl ClientTls {
    /// The CA and, for certificate authentication, our certificate and key.
    pub fn load(
        ca: &std::path::Path,
        cert_key: Option<(&std::path::Path, &std::path::Path)>,
        fed: &str,
    ) -> Result<Self, TlsError> {
        let roots = crate::load_roots(ca)?;
        let own = match cert_key {
            Some((cert, key)) => Some((crate::load_certs(cert)?, Arc::new(crate::load_key(key)?))),
            None => None,
        };
        Ok(Self {
            roots,
            own,
            fed: fed.to_string(),
            provider: crate::provider(),
        })
    }

    /// From the three files of a controller (which is also a client of its peers).
    pub fn from_files(files: &TlsFiles, fed: &str) -> Result<Self, TlsError> {
        Self::load(&files.ca, Some((&files.cert, &files.key)), fed)
    }

    /// The federation's trust domain.
    pub fn federation(&self) -> &str {
        &self.fed
    }

    /// A rustls client configuration that accepts only `expect`.
    pub fn config(
        &self,
        expect: Expect,
        on_verified: Option<OnVerified>,
    ) -> Result<Arc<ClientConfig>, TlsError> {
        let verifier = Arc::new(ControllerVerifier {
            roots: self.roots.clone(),
            fed: self.fed.clone(),
            expect,
            provider: self.provider.clone(),
            on_verified,
        });
        let builder = ClientConfig::builder_with_provider(self.provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Config(e.to_string()))?
            .dangerous()
            .with_custom_certificate_verifier(verifier);
        let mut config = match &self.own {
            Some((certs, key)) => builder
                .with_client_auth_cert(certs.clone(), key.clone_key())
                .map_err(|e| TlsError::Config(e.to_string()))?,
            None => builder.with_no_client_auth(),
        };
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Arc::new(config))
    }

    /// A lazily connected channel to `endpoint` (`https://host:port`; an
    /// `http://` scheme is accepted and means the same here), configured by
    /// `configure` (timeouts, keep-alive), over TLS that accepts only `expect`.
    pub fn channel(
        &self,
        endpoint: &str,
        expect: Expect,
        on_verified: Option<OnVerified>,
        configure: impl FnOnce(Endpoint) -> Endpoint,
    ) -> Result<Channel, TlsError> {
        let config = self.config(expect, on_verified)?;
        let plain = plain_uri(endpoint);
        let ep = Endpoint::from_shared(plain.clone())
            .map_err(|e| TlsError::Config(format!("bad endpoint `{endpoint}`: {e}")))?;
        let ep = configure(ep);
        let connector = TlsConnector { config };
        Ok(ep.connect_with_connector_lazy(connector))
    }

    /// Connects now (bounded by `timeout`), for command-line clients.
    pub async fn connect(
        &self,
        endpoint: &str,
        expect: Expect,
        timeout: Duration,
    ) -> Result<Channel, TlsError> {
        let config = self.config(expect, None)?;
        let ep = Endpoint::from_shared(plain_uri(endpoint))
            .map_err(|e| TlsError::Config(format!("bad endpoint `{endpoint}`: {e}")))?
            .connect_timeout(timeout)
            .timeout(timeout)
            .tcp_nodelay(true);
        ep.connect_with_connector(TlsConnector { config })
            .await
            .map_err(|e| TlsError::Connect {
                endpoint: endpoint.to_string(),
                why: source_chain(&e),
            })
    }
}

/// An error and its sources, joined with `: `.
pub fn source_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    let mut n = 0;
    while let Some(s) = cur {
        out.push_str(": ");
        out.push_str(&s.to_string());
        cur = s.source();
        n += 1;
        if n > 8 {
            break;
        }
    }
    out
}

/// A controller address as every command line takes it (`--controller`,
/// `FEDERATION_ADDR`): `host:port`, optionally with an `http://` or
/// `https://` scheme. Whether TLS is spoken is decided by the credentials
/// (a CA, or `--insecure`), not by the scheme; `https://` together with
/// plaintext is refused by the caller ([`Address::scheme`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Address {
    scheme: Option<&'static str>,
    authority: String,
}

impl Address {
    /// Parses `host:port`, `http://host:port` or `https://host:port` (a
    /// trailing `/` is allowed; a path, a query or another scheme is not).
    pub fn parse(s: &str) -> Result<Self, String> {
        let s = s.trim();
        let (scheme, rest) = if let Some(rest) = s.strip_prefix("https://") {
            (Some("https"), rest)
        } else if let Some(rest) = s.strip_prefix("http://") {
            (Some("http"), rest)
        } else if let Some((scheme, _)) = s.split_once("://") {
            return Err(format!(
                "`{s}`: unknown scheme `{scheme}` (expected host:port, http://host:port or https://host:port)"
            ));
        } else {
            (None, s)
        };
        let authority = rest.strip_suffix('/').unwrap_or(rest);
        if authority.contains(['/', '?', '#', '@']) || authority.chars().any(char::is_whitespace) {
            return Err(format!(
                "`{s}`: expected host:port (no path, user or spaces)"
            ));
        }
        let Some((host, port)) = authority.rsplit_once(':') else {
            return Err(format!("`{s}`: missing port (expected host:port)"));
        };
        let bracketed = host.starts_with('[') && host.ends_with(']');
        if host.is_empty() || (host.contains(':') && !bracketed) {
            return Err(format!(
                "`{s}`: bad host (an IPv6 address goes in brackets: [::1]:7000)"
            ));
        }
        match port.parse::<u16>() {
            Ok(p) if p > 0 => {}
            _ => return Err(format!("`{s}`: bad port `{port}` (1 to 65535)")),
        }
        Ok(Self {
            scheme,
            authority: authority.to_string(),
        })
    }

    /// The scheme that was written, if any.
    pub fn scheme(&self) -> Option<&'static str> {
        self.scheme
    }

    /// `host:port`.
    pub fn authority(&self) -> &str {
        &self.authority
    }

    /// `http://host:port`, the form tonic's endpoints take (TLS, when used,
    /// is done by our connector).
    pub fn uri(&self) -> String {
        format!("http://{}", self.authority)
    }
}

impl std::fmt::Display for Address {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.authority)
    }
}

/// `https://h:p` → `http://h:p` (TLS is done by our connector), bare `h:p` →
/// `http://h:p`.
pub fn plain_uri(endpoint: &str) -> String {
    if let Some(rest) = endpoint.strip_prefix("https://") {
        format!("http://{rest}")
    } else if endpoint.contains("://") {
        endpoint.to_string()
    } else {
        format!("http://{endpoint}")
    }
}

struct ControllerVerifier {
    roots: Arc<RootCertStore>,
    fed: String,
    expect: Expect,
    provider: Arc<CryptoProvider>,
    on_verified: Option<OnVerified>,
}

impl std::fmt::Debug for ControllerVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControllerVerifier")
            .field("fed", &self.fed)
            .field("expect", &self.expect)
            .finish()
    }
}

/// Connects TCP (TCP_NODELAY) then TLS with our configuration.
#[derive(Clone)]
struct TlsConnector {
    config: Arc<ClientConfig>,
}

type TlsIo = hyper_util::rt::TokioIo<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>;

impl tower::Service<http::Uri> for TlsConnector {
    type Response = TlsIo;
    type Error = std::io::Error;
    type Future =
        std::pin::Pin<Box<dyn std::future::Future<Output = std::io::Result<TlsIo>> + Send>>;

    fn poll_ready(
        &mut self,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: http::Uri) -> Self::Future {
        let config = self.config.clone();
        Box::pin(async move {
            let host = uri
                .host()
                .unwrap_or("localhost")
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_string();
            let port = uri.port_u16().unwrap_or(443);
            let tcp = tokio::net::TcpStream::connect((host.as_str(), port)).await?;
            tcp.set_nodelay(true)?;
            // SNI wants a name; what we check is the identity URI.
            let name = match ServerName::try_from(host) {
                Ok(n) => n.to_owned(),
                Err(_) => ServerName::DnsName(
                    rustls_pki_types::DnsName::try_from("controller.invalid")
                        .map_err(|e| std::io::Error::other(e.to_string()))?
                        .to_owned(),
                ),
            };
            let tls = tokio_rustls::TlsConnector::from(config)
                .connect(name, tcp)
                .await?;
            Ok(hyper_util::rt::TokioIo::new(tls))
        })
    }
}

impl ControllerVerifier {
    fn refuse(&self, reason: &str) -> rustls::Error {
        let expected = match &self.expect {
            Expect::Region(r) => r.as_str(),
            Expect::AnyController => "any controller",
        };
        tracing::warn!(expected = %expected, reason = %reason, "controller certificate refused");
        rustls::Error::InvalidCertificate(rustls::CertificateError::ApplicationVerificationFailure)
    }
}

impl ServerCertVerifier for ControllerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let parsed = ParsedCertificate::try_from(end_entity).inspect_err(|e| {
            let _ = self.refuse(&e.to_string());
        })?;
        if let Err(e) = verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &self.roots,
            intermediates,
            now,
            self.provider.signature_verification_algorithms.all,
        ) {
            let _ = self.refuse(&e.to_string());
            return Err(e);
        }
        let id = identity::from_der(&self.fed, end_entity.as_ref())
            .map_err(|e| self.refuse(&e.to_string()))?;
        if id.role != Role::Peer {
            return Err(self.refuse(&format!("certificate of {id} is not a controller's")));
        }
        if let Expect::Region(want) = &self.expect {
            if id.region.as_deref() != Some(want.as_str()) {
                return Err(self.refuse(&format!(
                    "certificate names region `{}`",
                    id.region.as_deref().unwrap_or("")
                )));
            }
        }
        if let Some(cb) = &self.on_verified {
            cb(&id);
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[cfg(test)]
mod address_tests {
    use super::Address;

    #[test]
    fn one_syntax_with_or_without_a_scheme() {
        for (input, scheme) in [
            ("127.0.0.1:7000", None),
            ("http://127.0.0.1:7000", Some("http")),
            ("https://127.0.0.1:7000/", Some("https")),
            ("[::1]:7000", None),
            ("controller.example:443", None),
        ] {
            let a = Address::parse(input).unwrap_or_else(|e| panic!("{input}: {e}"));
            assert_eq!(a.scheme(), scheme, "{input}");
            assert!(a.uri().starts_with("http://"), "{input}");
        }
        assert_eq!(
            Address::parse("https://h:1").map(|a| a.uri()),
            Ok("http://h:1".to_string())
        );
        for bad in [
            "127.0.0.1",
            "grpc://h:1",
            "h:port",
            "h:0",
            "http://h:1/path",
            ":7000",
            "::1:7000",
            "",
        ] {
            assert!(Address::parse(bad).is_err(), "{bad} should be refused");
        }
    }
}
