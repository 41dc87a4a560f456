//! TLS to a region's database: what a `node.store.url`'s `sslmode=`,
//! `sslrootcert=`, `sslcert=` and `sslkey=` ask for (read as libpq reads
//! them) and the rustls connector that does it.
//!
//! The modes, as libpq: `disable` never encrypts; `prefer` (the default)
//! encrypts when the server offers TLS, without checking its certificate,
//! and falls back to a plain connection; `require` encrypts and refuses a
//! server without TLS, without checking the certificate (unless
//! `sslrootcert=` is given: then, as libpq, it checks the chain like
//! `verify-ca`); `verify-ca` checks that the certificate chains to a
//! trusted CA; `verify-full` also checks that it names the host of the
//! URL. The trusted CAs are the PEM file `sslrootcert=<path>`, or the
//! system's CA store (`sslrootcert=system`, or no `sslrootcert=`). `allow`
//! (plain first, then TLS) is refused: use `prefer` or `disable`.
//!
//! A client certificate (`sslcert=<PEM chain>` with `sslkey=<PEM key>`,
//! both or neither) is presented to a server that asks for one (pg_hba's
//! `cert` method, or `clientcert=verify-full`). Unlike libpq, nothing is
//! read from `~/.postgresql/` when they are not given, and an encrypted
//! key (`sslpassword=`) is refused: the key file is protected by its mode.
//!
//! What it must not know: pools, queries, the schema, the errors of the
//! database (`crate::pg`, which imports this module, not the reverse).

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{ClientConfig, WebPkiServerVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, RootCertStore, SignatureScheme};
use rustls_pki_types::pem::PemObject as _;

/// A TLS setting of the URL that cannot be honoured (`crate::pg` makes it
/// a configuration error of `node.store.url`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct TlsSettingError(pub String);

/// The connector every connection to the database uses (the mode decides
/// whether it is used and what it checks).
pub type Connector = tokio_postgres_rustls::MakeRustlsConnect;

/// `sslmode=`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SslMode {
    /// Never encrypt.
    Disable,
    /// Encrypt when the server offers TLS, unverified; else plain.
    Prefer,
    /// Encrypt, unverified; refuse a server without TLS.
    Require,
    /// Encrypt; the certificate chains to a trusted CA.
    VerifyCa,
    /// Encrypt; the certificate chains to a trusted CA and names the host.
    VerifyFull,
}

impl SslMode {
    fn parse(text: &str) -> Result<Self, TlsSettingError> {
        Ok(match text {
            "disable" => Self::Disable,
            "prefer" => Self::Prefer,
            "require" => Self::Require,
            "verify-ca" => Self::VerifyCa,
            "verify-full" => Self::VerifyFull,
            "allow" => {
                return Err(TlsSettingError(
                    "sslmode=allow (plain first, then TLS) is not supported: use sslmode=prefer or sslmode=disable"
                        .into(),
                ));
            }
            other => {
                return Err(TlsSettingError(format!(
                    "sslmode={other} is not a mode (disable, prefer, require, verify-ca, verify-full)"
                )));
            }
        })
    }

    /// Its name in a URL.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Disable => "disable",
            Self::Prefer => "prefer",
            Self::Require => "require",
            Self::VerifyCa => "verify-ca",
            Self::VerifyFull => "verify-full",
        }
    }
}

/// What a URL asks of TLS, and the connector that does it.
#[derive(Clone)]
pub struct DbTls {
    /// The mode, after libpq's rule (`require` with `sslrootcert=` checks
    /// the chain).
    pub mode: SslMode,
    /// The trusted CAs, for messages: `sslrootcert=<path>` or `the
    /// system's CA store`.
    pub roots: String,
    /// The client certificate presented, `sslcert=<path>` (messages).
    pub client_cert: Option<String>,
    /// The connector.
    pub connector: Connector,
}

impl std::fmt::Debug for DbTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DbTls")
            .field("mode", &self.mode)
            .field("roots", &self.roots)
            .field("client_cert", &self.client_cert)
            .finish()
    }
}

impl DbTls {
    /// The mode as tokio-postgres knows it (it checks nothing itself: the
    /// connector does).
    pub fn client_mode(&self) -> tokio_postgres::config::SslMode {
        match self.mode {
            SslMode::Disable => tokio_postgres::config::SslMode::Disable,
            SslMode::Prefer => tokio_postgres::config::SslMode::Prefer,
            _ => tokio_postgres::config::SslMode::Require,
        }
    }

    /// Explains a failure to connect when it was TLS's, else `None`.
    pub fn explain(&self, e: &tokio_postgres::Error, host: &str) -> Option<String> {
        let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
        while let Some(s) = source {
            let rustls_error = s.downcast_ref::<rustls::Error>().or_else(|| {
                s.downcast_ref::<std::io::Error>()
                    .and_then(|io| io.get_ref())
                    .and_then(|inner| inner.downcast_ref::<rustls::Error>())
            });
            if let Some(r) = rustls_error {
                return Some(self.explain_rustls(r, host));
            }
            source = s.source();
        }
        let mut text = e.to_string();
        let mut source = std::error::Error::source(e);
        while let Some(s) = source {
            text.push_str(": ");
            text.push_str(&s.to_string());
            source = s.source();
        }
        if text.contains("does not support TLS") {
            return Some(format!(
                "the server does not offer TLS, and sslmode={} requires it",
                self.mode.as_str()
            ));
        }
        text.contains("TLS").then_some(text)
    }

    fn explain_rustls(&self, e: &rustls::Error, host: &str) -> String {
        match e {
            rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer) => format!(
                "the server's certificate is not signed by a trusted CA ({}): {e}",
                self.roots
            ),
            rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            ) => format!("the server's certificate does not name the host `{host}`: {e}"),
            rustls::Error::InvalidCertificate(
                CertificateError::Expired | CertificateError::ExpiredContext { .. },
            ) => format!("the server's certificate has expired: {e}"),
            other => other.to_string(),
        }
    }
}

/// Splits `url` into the URL tokio-postgres is given (without `sslmode`
/// and `sslrootcert`, which it does not know as libpq does) and the TLS it
/// asks for. Both forms of libpq are read: `postgres://…?sslmode=…` and
/// `host=… sslmode=…`.
pub fn split_url(url: &str) -> Result<(String, DbTls), TlsSettingError> {
    let mut mode = None;
    let mut rootcert = None;
    let mut client = ClientFiles::default();
    let rest = if let Some((base, query)) = url
        .split_once('?')
        .filter(|_| url.starts_with("postgres://") || url.starts_with("postgresql://"))
    {
        let mut kept = Vec::new();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            match key {
                "sslmode" => mode = Some(percent_decode(value)?),
                "sslrootcert" => rootcert = Some(percent_decode(value)?),
                "sslcert" => client.cert = Some(percent_decode(value)?),
                "sslkey" => client.key = Some(percent_decode(value)?),
                "sslpassword" => client.password = true,
                _ => kept.push(pair),
            }
        }
        if kept.is_empty() {
            base.to_string()
        } else {
            format!("{base}?{}", kept.join("&"))
        }
    } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        url.to_string()
    } else {
        let mut kept = Vec::new();
        for word in url.split_whitespace() {
            match word.split_once('=') {
                Some(("sslmode", v)) => mode = Some(v.trim_matches('\'').to_string()),
                Some(("sslrootcert", v)) => rootcert = Some(v.trim_matches('\'').to_string()),
                Some(("sslcert", v)) => client.cert = Some(v.trim_matches('\'').to_string()),
                Some(("sslkey", v)) => client.key = Some(v.trim_matches('\'').to_string()),
                Some(("sslpassword", _)) => client.password = true,
                _ => kept.push(word),
            }
        }
        kept.join(" ")
    };
    let mut mode = match mode.as_deref() {
        None => SslMode::Prefer,
        Some(m) => SslMode::parse(m)?,
    };
    let file = rootcert.filter(|r| r != "system" && !r.is_empty());
    if mode == SslMode::Require && file.is_some() {
        mode = SslMode::VerifyCa;
    }
    let roots = match &file {
        Some(path) => format!("sslrootcert={path}"),
        None => "the system's CA store".to_string(),
    };
    let identity = client.load()?;
    let client_cert = client.cert.map(|c| format!("sslcert={c}"));
    let connector = connector(mode, file.as_deref(), identity)?;
    Ok((
        rest,
        DbTls {
            mode,
            roots,
            client_cert,
            connector,
        },
    ))
}

/// `sslcert=`, `sslkey=` and whether `sslpassword=` was given.
#[derive(Default)]
struct ClientFiles {
    cert: Option<String>,
    key: Option<String>,
    password: bool,
}

/// A client certificate's chain and key, read from their files.
type Identity = (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>);

impl ClientFiles {
    /// Reads the chain and key, or says which setting is wrong and why.
    fn load(&self) -> Result<Option<Identity>, TlsSettingError> {
        if self.password {
            return Err(TlsSettingError(
                "sslpassword= (an encrypted client key) is not supported: give sslkey= an \
                 unencrypted PEM key readable only by the controller"
                    .into(),
            ));
        }
        let (cert, key) = match (&self.cert, &self.key) {
            (None, None) => return Ok(None),
            (Some(c), Some(k)) => (c, k),
            (Some(c), None) => {
                return Err(TlsSettingError(format!(
                    "sslcert={c} is given without sslkey=: name the certificate's private key"
                )));
            }
            (None, Some(k)) => {
                return Err(TlsSettingError(format!(
                    "sslkey={k} is given without sslcert=: name the client certificate"
                )));
            }
        };
        let bad_cert = |detail: String| TlsSettingError(format!("sslcert={cert}: {detail}"));
        let chain = CertificateDer::pem_file_iter(cert)
            .map_err(|e| bad_cert(e.to_string()))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| bad_cert(e.to_string()))?;
        if chain.is_empty() {
            return Err(bad_cert("no PEM certificate in the file".into()));
        }
        let private = PrivateKeyDer::from_pem_file(key)
            .map_err(|e| TlsSettingError(format!("sslkey={key}: {e}")))?;
        Ok(Some((chain, private)))
    }
}

fn percent_decode(text: &str) -> Result<String, TlsSettingError> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = text
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| TlsSettingError(format!("`{text}`: a bad percent escape")))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| TlsSettingError(format!("`{text}` is not UTF-8")))
}

/// The rustls configuration of `mode`, trusting `rootcert` (a PEM file) or
/// the system's CA store.
fn connector(
    mode: SslMode,
    rootcert: Option<&str>,
    identity: Option<Identity>,
) -> Result<Connector, TlsSettingError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier: Arc<dyn ServerCertVerifier> = match mode {
        SslMode::Disable | SslMode::Prefer | SslMode::Require => {
            Arc::new(Unverified(Arc::clone(&provider)))
        }
        SslMode::VerifyCa | SslMode::VerifyFull => {
            let roots = Arc::new(root_store(rootcert)?);
            let webpki = WebPkiServerVerifier::builder_with_provider(roots, Arc::clone(&provider))
                .build()
                .map_err(|e| TlsSettingError(format!("the trusted CAs: {e}")))?;
            if mode == SslMode::VerifyFull {
                webpki
            } else {
                Arc::new(ChainOnly(webpki))
            }
        }
    };
    let builder = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsSettingError(format!("TLS: {e}")))?
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    let config = match identity {
        None => builder.with_no_client_auth(),
        Some((chain, key)) => builder.with_client_auth_cert(chain, key).map_err(|e| {
            TlsSettingError(format!(
                "sslcert=/sslkey=: the key does not fit the certificate ({e})"
            ))
        })?,
    };
    Ok(Connector::new(config))
}

fn root_store(rootcert: Option<&str>) -> Result<RootCertStore, TlsSettingError> {
    let mut store = RootCertStore::empty();
    match rootcert {
        Some(path) => {
            let bad = |detail: String| TlsSettingError(format!("sslrootcert={path}: {detail}"));
            let certs = CertificateDer::pem_file_iter(path)
                .map_err(|e| bad(e.to_string()))?
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| bad(e.to_string()))?;
            if certs.is_empty() {
                return Err(bad("no PEM certificate in the file".into()));
            }
            for c in certs {
                store
                    .add(c)
                    .map_err(|e| bad(format!("not a CA certificate: {e}")))?;
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            let (added, _) = store.add_parsable_certificates(found.certs);
            if added == 0 {
                return Err(TlsSettingError(format!(
                    "sslmode asks to verify the server, but the system's CA store holds no certificate{}; \
                     name the CA with sslrootcert=<path>",
                    found
                        .errors
                        .first()
                        .map(|e| format!(" ({e})"))
                        .unwrap_or_default()
                )));
            }
        }
    }
    Ok(store)
}

/// `prefer` and `require`: encrypted, the certificate not checked (as
/// libpq); the handshake's signatures are still verified, so the session
/// is with the holder of the certificate's key.
#[derive(Debug)]
struct Unverified(Arc<CryptoProvider>);

impl ServerCertVerifier for Unverified {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
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
            &self.0.signature_verification_algorithms,
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
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// `verify-ca`: the chain is checked, the name is not. webpki checks the
/// chain before the name, so a name error means the chain was good.
#[derive(Debug)]
struct ChainOnly(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
        {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_url_loses_what_tokio_postgres_does_not_know_and_keeps_the_rest() {
        let (rest, tls) =
            split_url("postgres://u:p@db:5432/f?application_name=x&sslmode=disable").expect("url");
        assert_eq!(rest, "postgres://u:p@db:5432/f?application_name=x");
        assert_eq!(tls.mode, SslMode::Disable);
        let (rest, tls) = split_url("postgres://u@db/f").expect("url");
        assert_eq!(rest, "postgres://u@db/f");
        assert_eq!(tls.mode, SslMode::Prefer, "libpq's default");
        let (rest, tls) = split_url("host=db user=u sslmode=require dbname=f").expect("kv");
        assert_eq!(rest, "host=db user=u dbname=f");
        assert_eq!(tls.mode, SslMode::Require);
    }

    #[test]
    fn a_client_certificate_needs_its_key_and_a_wrong_one_is_named() {
        let dir = tempfile::tempdir().expect("dir");
        let ca = federation_tls::dev::DevCa::new("test").expect("ca");
        let one = ca
            .issue(
                "federation",
                &[],
                false,
                federation_tls::dev::Validity::Normal,
            )
            .expect("one");
        let other = ca
            .issue(
                "federation",
                &[],
                false,
                federation_tls::dev::Validity::Normal,
            )
            .expect("other");
        let write = |name: &str, text: &str| {
            let path = dir.path().join(name);
            std::fs::write(&path, text).expect("write");
            path.display().to_string()
        };
        let (cert, key) = (write("c.pem", &one.cert_pem), write("c.key", &one.key_pem));
        let other_key = write("o.key", &other.key_pem);
        let url = |q: &str| format!("postgres://u@db/f?sslmode=require&{q}");
        let (rest, tls) = split_url(&url(&format!("sslcert={cert}&sslkey={key}"))).expect("pair");
        assert_eq!(rest, "postgres://u@db/f", "libpq's keys are not passed on");
        assert_eq!(tls.client_cert, Some(format!("sslcert={cert}")));
        let (_, tls) = split_url(&format!(
            "host=db user=u sslmode=require sslcert={cert} sslkey={key}"
        ))
        .expect("key=value form");
        assert!(tls.client_cert.is_some());
        let err = |q: String| split_url(&url(&q)).expect_err(&q).0;
        let e = err(format!("sslcert={cert}"));
        assert!(e.contains("without sslkey=") && e.contains("c.pem"), "{e}");
        let e = err(format!("sslkey={key}"));
        assert!(e.contains("without sslcert="), "{e}");
        let e = err(format!("sslcert={cert}&sslkey={other_key}"));
        assert!(e.contains("does not fit"), "{e}");
        let e = err(format!("sslcert={key}&sslkey={key}"));
        assert!(
            e.contains("sslcert=") && e.contains("no PEM certificate"),
            "{e}"
        );
        let e = err(format!("sslcert={cert}&sslkey={cert}"));
        assert!(e.contains("sslkey=") && e.contains("c.pem"), "{e}");
        let e = err(format!("sslcert={cert}&sslkey={key}&sslpassword=x"));
        assert!(
            e.contains("sslpassword= (an encrypted client key) is not supported"),
            "{e}"
        );
        let e = err(format!(
            "sslcert={}/missing.pem&sslkey={key}",
            dir.path().display()
        ));
        assert!(e.contains("missing.pem"), "{e}");
    }

    #[test]
    fn require_with_a_root_certificate_checks_the_chain_as_libpq() {
        let dir = tempfile::tempdir().expect("dir");
        let ca = federation_tls::dev::DevCa::new("test").expect("ca");
        let path = dir.path().join("root ca.pem");
        std::fs::write(&path, ca.ca_pem()).expect("write");
        let encoded = path.display().to_string().replace(' ', "%20");
        let (_, tls) = split_url(&format!(
            "postgres://u@db/f?sslmode=require&sslrootcert={encoded}"
        ))
        .expect("url");
        assert_eq!(tls.mode, SslMode::VerifyCa);
        assert!(tls.roots.contains("root ca.pem"), "{}", tls.roots);
    }

    #[test]
    fn bad_tls_settings_are_configuration_errors_naming_them() {
        for (url, says) in [
            ("postgres://u@db/f?sslmode=allow", "sslmode=allow"),
            ("postgres://u@db/f?sslmode=on", "sslmode=on is not a mode"),
            (
                "postgres://u@db/f?sslmode=verify-full&sslrootcert=/nonexistent/ca.pem",
                "sslrootcert=/nonexistent/ca.pem",
            ),
        ] {
            let err = split_url(url).expect_err(url);
            assert!(err.to_string().contains(says), "{url}: {err}");
        }
    }
}
