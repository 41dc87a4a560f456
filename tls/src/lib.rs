//! Mutual TLS for the federation (rustls with the ring provider).
//!
//! Owns: certificate identities ([`identity`]: `spiffe://<fed>/region/<name>`
//! and friends), loading PEM files, the server side ([`server`]: a rustls
//! acceptor whose client verifier checks the CA and expiry and logs every
//! refusal with its reason, and the connection type that carries the caller's
//! identity into tonic's request extensions), the client side ([`client`]:
//! channels whose server verifier checks the CA, expiry and that the
//! certificate names the region meant), and development certificates
//! ([`dev`], rcgen).
//!
//! Must not touch: roles' meaning (which RPC needs which role lives in the
//! controller's auth layer), routing, membership. Never logs key material.
#![forbid(unsafe_code)]

pub mod client;
pub mod dev;
pub mod identity;
pub mod server;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::RootCertStore;
use rustls::crypto::CryptoProvider;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

pub use client::{Address, ClientTls, Expect, OnVerified};
pub use identity::{Identity, IdentityError, Role};
pub use server::{ConnInfo, ServerTls, TlsConn};

/// Why TLS material could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A PEM file is missing, unreadable or holds nothing usable.
    #[error("{path}: {why}")]
    File {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        why: String,
    },
    /// rustls refused the material (key does not match, bad CA, …).
    #[error("tls configuration: {0}")]
    Config(String),
    /// The certificate does not carry a usable identity.
    #[error("{path}: {source}")]
    Identity {
        /// The certificate file.
        path: PathBuf,
        /// What is wrong with its names.
        source: IdentityError,
    },
    /// Connecting failed (handshake refused, unreachable, …).
    #[error("cannot reach {endpoint}: {why}")]
    Connect {
        /// Where.
        endpoint: String,
        /// Why, with the chain of causes.
        why: String,
    },
    /// Generating certificates failed.
    #[error("certificate generation: {0}")]
    Generate(String),
}

/// The three files of a TLS identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// The federation CA certificate (PEM).
    pub ca: PathBuf,
    /// Our certificate chain (PEM).
    pub cert: PathBuf,
    /// Our private key (PEM).
    pub key: PathBuf,
}

/// Adds `authorization: Bearer <token>` to every call when a token is set.
#[derive(Clone, Default)]
pub struct Bearer(Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>);

impl std::fmt::Debug for Bearer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() {
            "Bearer(set)"
        } else {
            "Bearer(none)"
        })
    }
}

impl Bearer {
    /// A bearer token (or none); fails on characters a header cannot carry.
    pub fn new(token: Option<&str>) -> Result<Self, TlsError> {
        match token {
            None => Ok(Self(None)),
            Some(t) => format!("Bearer {}", t.trim())
                .parse()
                .map(|v| Self(Some(v)))
                .map_err(|_| TlsError::Config("token has characters a header cannot carry".into())),
        }
    }
}

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
}

/// A channel that adds the bearer token to every call.
pub type AuthChannel =
    tonic::service::interceptor::InterceptedService<tonic::transport::Channel, Bearer>;

/// The crypto provider used everywhere (ring).
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Loads every certificate of a PEM file.
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let bad = |why: String| TlsError::File {
        path: path.to_path_buf(),
        why,
    };
    let iter = CertificateDer::pem_file_iter(path).map_err(|e| bad(e.to_string()))?;
    let certs = iter
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(e.to_string()))?;
    if certs.is_empty() {
        return Err(bad("no PEM certificate in file".into()));
    }
    Ok(certs)
}

/// Loads the first private key of a PEM file.
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    // The error names the file and the PEM problem, never the content.
    PrivateKeyDer::from_pem_file(path).map_err(|e| TlsError::File {
        path: path.to_path_buf(),
        why: format!("no usable private key: {e}"),
    })
}

/// A root store holding the CA certificates of `path`.
pub fn load_roots(path: &Path) -> Result<Arc<RootCertStore>, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in load_certs(path)? {
        roots.add(cert).map_err(|e| TlsError::File {
            path: path.to_path_buf(),
            why: format!("not a usable CA certificate: {e}"),
        })?;
    }
    Ok(Arc::new(roots))
}

/// `notAfter` of the first certificate in the PEM file `path`, in seconds
/// since the Unix epoch.
pub fn not_after_of_file(path: &Path) -> Result<i64, TlsError> {
    let certs = load_certs(path)?;
    let first = certs.first().ok_or_else(|| TlsError::File {
        path: path.to_path_buf(),
        why: "no certificate".into(),
    })?;
    identity::not_after_of(first.as_ref()).map_err(|source| TlsError::Identity {
        path: path.to_path_buf(),
        source,
    })
}

/// The identity named by the first certificate of `path`.
pub fn identity_of_file(fed: &str, path: &Path) -> Result<Identity, TlsError> {
    let certs = load_certs(path)?;
    let first = certs.first().ok_or_else(|| TlsError::File {
        path: path.to_path_buf(),
        why: "no certificate".into(),
    })?;
    identity::from_der(fed, first.as_ref()).map_err(|source| TlsError::Identity {
        path: path.to_path_buf(),
        source,
    })
}
