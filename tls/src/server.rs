//! The server side: a rustls acceptor that asks every caller for a client
//! certificate (optional, since token holders have none), verifies it against
//! the federation CA (signature chain, validity period) and its identity URI,
//! and logs each refusal with the reason. Accepted connections carry the
//! caller's [`Identity`] as tonic connect info, so handlers and the auth layer
//! find it in the request extensions.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ServerConfig, WebPkiClientVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};
use rustls_pki_types::{CertificateDer, UnixTime};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;

use crate::identity::{self, Identity};
use crate::{TlsError, TlsFiles};

/// What the server knows about one accepted connection.
#[derive(Debug, Clone)]
pub struct ConnInfo {
    /// The caller's address.
    pub remote: Option<SocketAddr>,
    /// The identity of its verified client certificate, if it sent one.
    pub identity: Option<Identity>,
}

/// A server TLS configuration for federation `fed`.
#[derive(Clone)]
pub struct ServerTls {
    config: Arc<ServerConfig>,
    fed: String,
    /// Our own identity (from our certificate).
    pub identity: Identity,
}

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerTls")
            .field("fed", &self.fed)
            .field("identity", &self.identity)
            .finish()
    }
}

/// Wraps the webpki verifier: the same checks, plus the identity URI, and a
/// log line naming the reason of every refusal.
#[derive(Debug)]
struct LoggingClientVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    fed: String,
}

impl ClientCertVerifier for LoggingClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        // Token holders connect without a certificate; the auth layer then
        // requires a token.
        false
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let claimed = identity::uris_of(end_entity.as_ref())
            .map(|u| u.join(","))
            .unwrap_or_default();
        if let Err(e) = self
            .inner
            .verify_client_cert(end_entity, intermediates, now)
        {
            tracing::warn!(claimed = %claimed, reason = %e, "client certificate refused");
            return Err(e);
        }
        if let Err(e) = identity::from_der(&self.fed, end_entity.as_ref()) {
            tracing::warn!(claimed = %claimed, reason = %e, "client certificate refused");
            return Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::ApplicationVerificationFailure,
            ));
        }
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

impl ServerTls {
    /// Loads the CA, our certificate and key; `fed` is the federation's
    /// trust domain ([`identity::slug`]).
    pub fn load(files: &TlsFiles, fed: &str) -> Result<Self, TlsError> {
        let roots = crate::load_roots(&files.ca)?;
        let certs = crate::load_certs(&files.cert)?;
        let key = crate::load_key(&files.key)?;
        let own = crate::identity_of_file(fed, &files.cert)?;
        let provider = crate::provider();
        let inner = WebPkiClientVerifier::builder_with_provider(roots, provider.clone())
            .allow_unauthenticated()
            .build()
            .map_err(|e| TlsError::Config(e.to_string()))?;
        let verifier = Arc::new(LoggingClientVerifier {
            inner,
            fed: fed.to_string(),
        });
        let mut config = ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Config(e.to_string()))?
            .with_client_cert_verifier(verifier)
            .with_single_cert(certs, key)
            .map_err(|e| TlsError::Config(format!("{}: {e}", files.key.display())))?;
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Self {
            config: Arc::new(config),
            fed: fed.to_string(),
            identity: own,
        })
    }

    /// The federation's trust domain.
    pub fn federation(&self) -> &str {
        &self.fed
    }

    /// Accepts connections from `listener` (TCP_NODELAY on each), performs
    /// the handshakes concurrently (each bounded by `handshake_timeout`) and
    /// yields the established connections. Stops accepting when the stream
    /// is dropped.
    pub fn incoming(
        &self,
        listener: TcpListener,
        handshake_timeout: Duration,
    ) -> tokio_stream::wrappers::ReceiverStream<io::Result<TlsConn>> {
        let (tx, rx) = tokio::sync::mpsc::channel::<io::Result<TlsConn>>(64);
        let acceptor = TlsAcceptor::from(self.config.clone());
        let fed = self.fed.clone();
        tokio::spawn(async move {
            loop {
                let accepted = tokio::select! {
                    a = listener.accept() => a,
                    _ = tx.closed() => return,
                };
                let (tcp, remote) = match accepted {
                    Ok(x) => x,
                    Err(e) => {
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let _ = tcp.set_nodelay(true);
                let acceptor = acceptor.clone();
                let tx = tx.clone();
                let fed = fed.clone();
                tokio::spawn(async move {
                    match tokio::time::timeout(handshake_timeout, acceptor.accept(tcp)).await {
                        Ok(Ok(tls)) => {
                            let identity = tls
                                .get_ref()
                                .1
                                .peer_certificates()
                                .and_then(|c| c.first())
                                .and_then(|c| identity::from_der(&fed, c.as_ref()).ok());
                            let conn = TlsConn {
                                io: tls,
                                info: ConnInfo {
                                    remote: Some(remote),
                                    identity,
                                },
                            };
                            let _ = tx.send(Ok(conn)).await;
                        }
                        Ok(Err(e)) => {
                            tracing::warn!(%remote, reason = %e, "tls handshake refused")
                        }
                        Err(_) => tracing::warn!(%remote, "tls handshake timed out"),
                    }
                });
            }
        });
        tokio_stream::wrappers::ReceiverStream::new(rx)
    }
}

/// An established server-side TLS connection and who is on the other end.
#[derive(Debug)]
pub struct TlsConn {
    io: tokio_rustls::server::TlsStream<TcpStream>,
    info: ConnInfo,
}

impl tonic::transport::server::Connected for TlsConn {
    type ConnectInfo = ConnInfo;
    fn connect_info(&self) -> ConnInfo {
        self.info.clone()
    }
}

impl AsyncRead for TlsConn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}
