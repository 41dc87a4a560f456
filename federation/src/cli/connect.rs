//! How client commands reach a controller: the address and credentials
//! (flags or `FEDERATION_ADDR`, `FEDERATION_CA`/`_CERT`/`_KEY`/`_TOKEN`), the
//! channel, and errors that say what happened — nothing listening, TLS on
//! one side only, a certificate of another CA — found by walking the error's
//! source chain (tonic → hyper → io → rustls), not by matching its text.

use std::error::Error as StdError;
use std::path::PathBuf;
use std::time::Duration;

use federation_tls::Address;

/// Connection options shared by client commands.
#[derive(Debug, Clone, clap::Args)]
#[command(next_help_heading = "Connection")]
pub struct Connect {
    /// The controller: host:port (an http:// or https:// scheme is allowed;
    /// TLS follows --ca / --insecure, not the scheme).
    #[arg(long, env = "FEDERATION_ADDR", value_name = "ADDR", value_parser = parse_address)]
    pub controller: Option<Address>,
    /// Give up on the call after this long.
    #[arg(long, default_value = "10s", value_parser = crate::config::parse_duration)]
    pub timeout: Duration,
    /// The federation CA (PEM): mutual TLS; the controller must present a
    /// region certificate of this CA.
    #[arg(long, env = "FEDERATION_CA", value_name = "PEM")]
    pub ca: Option<PathBuf>,
    /// Our certificate (client, operator or auditor identity).
    #[arg(long, env = "FEDERATION_CERT", requires = "key", value_name = "PEM")]
    pub cert: Option<PathBuf>,
    /// Its private key.
    #[arg(long, env = "FEDERATION_KEY", requires = "cert", value_name = "PEM")]
    pub key: Option<PathBuf>,
    /// A bearer token instead of a certificate.
    #[arg(long, env = "FEDERATION_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Plaintext without authentication (development only); the CA and
    /// certificate (say from FEDERATION_CA…) are then not used.
    #[arg(long)]
    pub insecure: bool,
}

/// `--controller` / `FEDERATION_ADDR`.
pub fn parse_address(s: &str) -> Result<Address, String> {
    Address::parse(s)
}

impl Connect {
    /// Whether calls go over TLS.
    fn tls(&self) -> bool {
        !self.insecure
    }

    /// The controller's address, from `--controller` or `FEDERATION_ADDR`.
    pub fn address(&self) -> anyhow::Result<&Address> {
        self.controller.as_ref().ok_or_else(|| {
            anyhow::anyhow!("which controller? pass --controller HOST:PORT or set FEDERATION_ADDR")
        })
    }

    fn shown(&self) -> String {
        self.controller
            .as_ref()
            .map_or_else(|| "the controller".to_string(), ToString::to_string)
    }
}

/// A channel to the controller: mutual TLS (or a token over TLS) unless
/// `--insecure`. Connecting is lazy: the first call connects, and a failure
/// to connect comes back as that call's status (see [`describe`]).
pub fn channel(c: &Connect) -> anyhow::Result<federation_tls::AuthChannel> {
    let configure = |ep: tonic::transport::Endpoint| {
        ep.connect_timeout(c.timeout)
            .timeout(c.timeout)
            .tcp_nodelay(true)
    };
    let addr = c.address()?;
    let (channel, bearer) = if c.insecure {
        if addr.scheme() == Some("https") {
            anyhow::bail!(
                "--controller {addr}: https:// asks for TLS, but --insecure is plaintext; \
                 drop one of them"
            );
        }
        let ep = tonic::transport::Endpoint::from_shared(addr.uri())
            .map_err(|e| anyhow::anyhow!("bad controller address `{addr}`: {e}"))?;
        (
            configure(ep).connect_lazy(),
            federation_tls::Bearer::new(c.token.as_deref())?,
        )
    } else {
        let Some(ca) = &c.ca else {
            anyhow::bail!(
                "tls is required: pass --ca with --cert/--key or --token (or set \
                 FEDERATION_CA, FEDERATION_CERT, FEDERATION_KEY or FEDERATION_TOKEN), \
                 or --insecure for plaintext"
            );
        };
        let tls = federation_tls::ClientTls::load(ca, c.cert.as_deref().zip(c.key.as_deref()), "")?;
        let channel = tls.channel(
            &addr.uri(),
            federation_tls::Expect::AnyController,
            None,
            configure,
        )?;
        (channel, federation_tls::Bearer::new(c.token.as_deref())?)
    };
    Ok(tonic::service::interceptor::InterceptedService::new(
        channel, bearer,
    ))
}

/// What went wrong on the way to the controller, when it is not the
/// controller's own answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// TCP connect refused: no process listens there.
    NothingListening,
    /// No answer in time.
    TimedOut,
    /// The name does not resolve.
    Unresolved,
    /// We spoke plaintext to a TLS server.
    ServerSpeaksTls,
    /// We spoke TLS to a plaintext server.
    ServerSpeaksPlaintext,
    /// The server's certificate is not signed by our CA (or is otherwise
    /// invalid: the reason from rustls).
    ServerCertificate(String),
    /// The server's certificate is valid but not a controller's.
    NotAController,
    /// The server refused our client certificate (the TLS alert it sent).
    ClientCertificateRefused(String),
    /// The server ended the TLS handshake with another alert (no common
    /// protocol version or cipher suite, …).
    HandshakeRefused(String),
    /// The connection dropped before an answer.
    ConnectionClosed,
}

/// Classifies `err` by walking its source chain.
pub fn classify(err: &(dyn StdError + 'static)) -> Option<Failure> {
    let mut cur = Some(err);
    let mut closed = false;
    let mut depth = 0;
    while let Some(e) = cur {
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            match io.kind() {
                std::io::ErrorKind::ConnectionRefused => return Some(Failure::NothingListening),
                std::io::ErrorKind::TimedOut => return Some(Failure::TimedOut),
                std::io::ErrorKind::ConnectionReset
                | std::io::ErrorKind::BrokenPipe
                | std::io::ErrorKind::UnexpectedEof => closed = true,
                _ => {}
            }
            if let Some(tls) = io
                .get_ref()
                .and_then(|inner| inner.downcast_ref::<rustls::Error>())
            {
                return Some(classify_rustls(tls));
            }
            let text = io.to_string();
            if text.contains("failed to lookup address")
                || text.contains("Name or service not known")
            {
                return Some(Failure::Unresolved);
            }
        }
        if let Some(tls) = e.downcast_ref::<rustls::Error>() {
            return Some(classify_rustls(tls));
        }
        if let Some(h2) = e.downcast_ref::<h2::Error>() {
            // A TLS server answers an HTTP/2 preface with a TLS alert record
            // or by closing; h2 sees bytes that are not a frame.
            if h2.is_io() {
                closed = true;
            } else if h2.reason() == Some(h2::Reason::PROTOCOL_ERROR)
                || h2.reason() == Some(h2::Reason::FRAME_SIZE_ERROR)
            {
                return Some(Failure::ServerSpeaksTls);
            }
        }
        let text = e.to_string();
        if text.contains("connection closed before message completed")
            || text.contains("connection error")
        {
            closed = true;
        }
        if text.contains("timed out") || text.contains("deadline has elapsed") {
            return Some(Failure::TimedOut);
        }
        cur = e.source();
        depth += 1;
        if depth > 16 {
            break;
        }
    }
    closed.then_some(Failure::ConnectionClosed)
}

fn classify_rustls(e: &rustls::Error) -> Failure {
    use rustls::{AlertDescription as A, CertificateError as C};
    match e {
        rustls::Error::InvalidCertificate(C::ApplicationVerificationFailure) => {
            Failure::NotAController
        }
        rustls::Error::InvalidCertificate(c) => Failure::ServerCertificate(match c {
            C::UnknownIssuer | C::BadSignature => "not signed by this CA".to_string(),
            C::Expired | C::ExpiredContext { .. } => "expired".to_string(),
            C::NotValidYet | C::NotValidYetContext { .. } => "not valid yet".to_string(),
            C::Revoked => "revoked".to_string(),
            other => format!("{other:?}"),
        }),
        rustls::Error::AlertReceived(alert) => match alert {
            A::UnknownCA
            | A::BadCertificate
            | A::CertificateUnknown
            | A::CertificateRequired
            | A::CertificateExpired
            | A::CertificateRevoked
            | A::UnsupportedCertificate
            | A::DecryptError
            | A::AccessDenied => Failure::ClientCertificateRefused(format!("{alert:?}")),
            other => Failure::HandshakeRefused(format!("{other:?}")),
        },
        rustls::Error::InvalidMessage(_) => Failure::ServerSpeaksPlaintext,
        other => Failure::ServerCertificate(other.to_string()),
    }
}

/// One sentence for `failure` on the way to `c.controller`: what happened
/// and what to check.
pub fn explain(failure: &Failure, c: &Connect) -> String {
    let addr = c.shown();
    let ca = c.ca.as_ref().map_or_else(
        || "the CA".to_string(),
        |p| format!("the CA {} (--ca / FEDERATION_CA)", p.display()),
    );
    let cert = c.cert.as_ref().map_or_else(
        || "no client certificate was sent (--cert/--key or FEDERATION_CERT/FEDERATION_KEY, or a --token)".to_string(),
        |p| format!("our certificate {} (--cert / FEDERATION_CERT)", p.display()),
    );
    match failure {
        Failure::NothingListening => format!(
            "nothing listening at {addr} (connection refused): is the controller running, and is \
             this its gRPC port (node.listen), not its admin or health port?"
        ),
        Failure::TimedOut => format!(
            "no answer from {addr} within {}: check the address, a firewall, or raise --timeout",
            super::output::human(c.timeout)
        ),
        Failure::Unresolved => format!("cannot resolve the host of {addr}"),
        Failure::ServerSpeaksTls => format!(
            "{addr} speaks TLS, but --insecure talks plaintext: drop --insecure and pass the \
             federation CA (--ca or FEDERATION_CA) with credentials"
        ),
        Failure::ServerSpeaksPlaintext => format!(
            "{addr} does not speak TLS (a controller started with --insecure?): pass --insecure, \
             or check the address"
        ),
        Failure::ServerCertificate(why) => format!(
            "TLS: the certificate of {addr} is {why}: it is not trusted by {ca}; check that the \
             CA and the controller belong to the same federation (`federation certs init` makes \
             a new CA each time)"
        ),
        Failure::NotAController => format!(
            "TLS: {addr} presented a certificate of {ca} that is not a controller's \
             (spiffe://<federation>/region/<name>): check the address"
        ),
        Failure::ClientCertificateRefused(alert) => format!(
            "TLS: {addr} refused our client certificate (alert {alert}): {cert} is not signed by \
             the CA the controller trusts, or is expired; check that it comes from the same \
             `certs init` as the controller's"
        ),
        Failure::HandshakeRefused(alert) => format!(
            "TLS: {addr} ended the handshake (alert {alert}): see the controller's log for why"
        ),
        Failure::ConnectionClosed => {
            if c.tls() {
                format!(
                    "{addr} closed the connection during the call: if it speaks plaintext \
                     (--insecure controller), pass --insecure; else see its log"
                )
            } else {
                format!(
                    "{addr} closed the connection: if it speaks TLS, drop --insecure and pass the \
                     CA (--ca or FEDERATION_CA); else see its log"
                )
            }
        }
    }
}

/// The line to print for a failed call: the classified transport failure,
/// or the controller's own status (`error (Code): message`). A TLS
/// connection that the server closed is probed once more with a handshake
/// of our own, because the server's alert (our certificate refused) reaches
/// hyper's connection task, not the call.
pub async fn describe(status: &tonic::Status, c: &Connect) -> String {
    let mut failure = StdError::source(status).and_then(classify);
    if failure.is_none()
        && c.insecure
        && matches!(status.code(), tonic::Code::Unknown | tonic::Code::Internal)
        && (status.message().contains("h2 protocol error")
            || status.message().contains("frame with invalid size"))
    {
        // Plaintext against TLS without a usable source (h2 reading a TLS
        // record).
        failure = Some(Failure::ServerSpeaksTls);
    }
    if c.tls() && failure == Some(Failure::ServerSpeaksTls) {
        // An HTTP/2 protocol error over TLS is the server's own answer.
        failure = None;
    }
    let closed = matches!(failure, Some(Failure::ConnectionClosed))
        || (failure.is_none()
            && status.code() == tonic::Code::Cancelled
            && StdError::source(status).is_some());
    if closed || (c.insecure && failure.is_none() && StdError::source(status).is_some()) {
        let probed = if c.tls() {
            probe_tls(c).await
        } else {
            probe_plaintext(c).await
        };
        if let Some(probed) = probed {
            failure = Some(probed);
        }
    }
    match failure {
        Some(f) => format!("error: {}", explain(&f, c)),
        None => format!("error ({:?}): {}", status.code(), status.message()),
    }
}

/// Sends the HTTP/2 preface in plaintext and reads the answer: a TLS server
/// answers bytes that are not a TLS record with a TLS alert record (content
/// type 21, version 3.x).
async fn probe_plaintext(c: &Connect) -> Option<Failure> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let addr = c.controller.as_ref()?;
    let probe = async {
        let mut tcp = tokio::net::TcpStream::connect(addr.authority()).await?;
        tcp.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await?;
        let mut buf = [0u8; 2];
        tcp.read_exact(&mut buf).await?;
        Ok::<_, std::io::Error>(buf)
    };
    match tokio::time::timeout(c.timeout, probe).await {
        Ok(Ok([21, 3])) => Some(Failure::ServerSpeaksTls),
        _ => None,
    }
}

/// Connects once with our TLS configuration, completes the handshake and
/// reads the server's first bytes: a TLS alert there names the refusal.
/// `None` when the probe sees nothing wrong (or cannot run).
async fn probe_tls(c: &Connect) -> Option<Failure> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let addr = c.controller.as_ref()?;
    let ca = c.ca.as_ref()?;
    let tls =
        federation_tls::ClientTls::load(ca, c.cert.as_deref().zip(c.key.as_deref()), "").ok()?;
    let config = tls
        .config(federation_tls::Expect::AnyController, None)
        .ok()?;
    let probe = async {
        let tcp = tokio::net::TcpStream::connect(addr.authority()).await?;
        let host = addr
            .authority()
            .rsplit_once(':')
            .map_or("", |(h, _)| h)
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        let name = rustls_pki_types::ServerName::try_from(host)
            .or_else(|_| rustls_pki_types::ServerName::try_from("controller.invalid".to_string()))
            .map_err(std::io::Error::other)?;
        let mut stream = tokio_rustls::TlsConnector::from(config)
            .connect(name, tcp)
            .await?;
        stream
            .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0")
            .await?;
        stream.flush().await?;
        let mut buf = [0u8; 64];
        stream.read(&mut buf).await
    };
    match tokio::time::timeout(c.timeout, probe).await {
        Ok(Err(e)) => classify(&e),
        _ => None,
    }
}

/// True when `status` was produced on the way to the controller (not an
/// answer from it): such failures exit 2.
pub fn is_transport(status: &tonic::Status) -> bool {
    StdError::source(status).and_then(classify).is_some()
        || (status.code() == tonic::Code::Unknown && status.message() == "transport error")
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    fn connect(addr: std::net::SocketAddr, ca: Option<PathBuf>, insecure: bool) -> Connect {
        Connect {
            controller: Some(Address::parse(&addr.to_string()).expect("address")),
            timeout: Duration::from_secs(10),
            ca,
            cert: None,
            key: None,
            token: None,
            insecure,
        }
    }

    async fn status_call(c: &Connect) -> tonic::Status {
        let mut admin = federation_api::federation_admin_client::FederationAdminClient::new(
            channel(c).expect("channel"),
        );
        admin
            .federation_status(federation_api::FederationStatusRequest {})
            .await
            .expect_err("no controller answers")
    }

    /// Real listeners: a rustls server with a development region
    /// certificate, a plaintext server that answers HTTP/1.1, and a closed
    /// port.
    #[tokio::test]
    async fn transport_failures_against_real_listeners() {
        let dir = tempfile::tempdir().expect("tempdir");
        let layout = federation_tls::dev::init(dir.path(), "fed", &[("europe".into(), vec![])])
            .expect("certs");
        let (cert, key) = layout.region("europe");
        let server = federation_tls::ServerTls::load(
            &federation_tls::TlsFiles {
                ca: layout.ca(),
                cert,
                key,
            },
            "fed",
        )
        .expect("server tls");
        let tls_listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let tls_addr = tls_listener.local_addr().expect("addr");
        let mut incoming = server.incoming(tls_listener, Duration::from_secs(5));
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Some(conn) = tokio_stream::StreamExt::next(&mut incoming).await {
                held.push(conn);
            }
        });
        let plain_listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let plain_addr = plain_listener.local_addr().expect("addr");
        tokio::spawn(async move {
            while let Ok((mut tcp, _)) = plain_listener.accept().await {
                let mut buf = [0u8; 512];
                let _ = tcp.read(&mut buf).await;
                let _ = tcp.write_all(b"HTTP/1.1 400 Bad Request\r\n\r\n").await;
            }
        });
        let closed = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
            l.local_addr().expect("addr")
        };

        let c = connect(tls_addr, None, true);
        assert_eq!(probe_plaintext(&c).await, Some(Failure::ServerSpeaksTls));
        let said = describe(&status_call(&c).await, &c).await;
        assert!(
            said.contains("speaks TLS") && said.contains("drop --insecure"),
            "{said}"
        );

        let c = connect(plain_addr, Some(layout.ca()), false);
        let said = describe(&status_call(&c).await, &c).await;
        assert!(said.contains("does not speak TLS"), "{said}");

        let c = connect(closed, Some(layout.ca()), false);
        let said = describe(&status_call(&c).await, &c).await;
        assert!(
            said.contains(&format!("nothing listening at {closed}")),
            "{said}"
        );
        assert_eq!(said.matches("refused").count(), 1, "{said}");
    }

    #[test]
    fn refused_connect_is_nothing_listening() {
        let e = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        assert_eq!(classify(&e), Some(Failure::NothingListening));
    }

    #[test]
    fn rustls_errors_inside_io_errors() {
        let unknown = std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer),
        );
        assert!(matches!(
            classify(&unknown),
            Some(Failure::ServerCertificate(w)) if w.contains("not signed")
        ));
        let alert = std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            rustls::Error::AlertReceived(rustls::AlertDescription::UnknownCA),
        );
        assert!(matches!(
            classify(&alert),
            Some(Failure::ClientCertificateRefused(_))
        ));
    }
}
