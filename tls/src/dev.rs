//! Development certificates with rcgen: a federation CA and leaf
//! certificates for regions (with their attested tags), agents, clients,
//! operators and auditors. Used by `federation certs init`, the sandbox and
//! the tests (which also make expired certificates and foreign CAs here).
//!
//! Keys are written with mode 0600 and never logged.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose, SanType,
};
use time::{Duration, OffsetDateTime};

use crate::TlsError;
use crate::identity::{self, Role};

fn gen_err(e: impl std::fmt::Display) -> TlsError {
    TlsError::Generate(e.to_string())
}

/// A certificate and its key, PEM.
#[derive(Clone)]
pub struct Issued {
    /// The certificate.
    pub cert_pem: String,
    /// The private key.
    pub key_pem: String,
}

impl std::fmt::Debug for Issued {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Issued { .. }")
    }
}

/// Validity of a leaf certificate.
#[derive(Debug, Clone, Copy)]
pub enum Validity {
    /// From an hour ago for a year.
    Normal,
    /// Expired yesterday (for tests of refusal).
    Expired,
}

/// A development CA of one federation.
pub struct DevCa {
    issuer: CertifiedIssuer<'static, KeyPair>,
    fed: String,
}

impl std::fmt::Debug for DevCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DevCa").field("fed", &self.fed).finish()
    }
}

impl DevCa {
    /// A fresh CA for the federation named `federation` (its display name;
    /// the trust domain is its [`identity::slug`]).
    pub fn new(federation: &str) -> Result<Self, TlsError> {
        let fed = identity::slug(federation);
        let mut params = CertificateParams::new(Vec::<String>::new()).map_err(gen_err)?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, format!("{federation} development CA"));
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let now = OffsetDateTime::now_utc();
        params.not_before = now - Duration::days(30);
        params.not_after = now + Duration::days(3650);
        let key = KeyPair::generate().map_err(gen_err)?;
        let issuer = CertifiedIssuer::self_signed(params, key).map_err(gen_err)?;
        Ok(Self { issuer, fed })
    }

    /// The trust domain.
    pub fn federation(&self) -> &str {
        &self.fed
    }

    /// The CA certificate, PEM.
    pub fn ca_pem(&self) -> String {
        self.issuer.pem()
    }

    /// Issues a leaf certificate naming `uris` (and DNS `localhost`, IP
    /// 127.0.0.1 for tools that check host names).
    pub fn issue(
        &self,
        common_name: &str,
        uris: &[String],
        server: bool,
        validity: Validity,
    ) -> Result<Issued, TlsError> {
        let mut params = CertificateParams::new(vec!["localhost".to_string()]).map_err(gen_err)?;
        params
            .subject_alt_names
            .push(SanType::IpAddress(std::net::IpAddr::from([127, 0, 0, 1])));
        for uri in uris {
            params.subject_alt_names.push(SanType::URI(
                uri.as_str()
                    .try_into()
                    .map_err(|e| gen_err(format!("{uri}: {e}")))?,
            ));
        }
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, common_name);
        params.distinguished_name = dn;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        if server {
            params
                .extended_key_usages
                .push(ExtendedKeyUsagePurpose::ServerAuth);
        }
        let now = OffsetDateTime::now_utc();
        match validity {
            Validity::Normal => {
                params.not_before = now - Duration::hours(1);
                params.not_after = now + Duration::days(365);
            }
            Validity::Expired => {
                params.not_before = now - Duration::days(10);
                params.not_after = now - Duration::days(1);
            }
        }
        let key = KeyPair::generate().map_err(gen_err)?;
        let cert = params.signed_by(&key, &self.issuer).map_err(gen_err)?;
        Ok(Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    /// A region controller's certificate attesting `tags`.
    pub fn region(
        &self,
        region: &str,
        tags: &[String],
        validity: Validity,
    ) -> Result<Issued, TlsError> {
        let mut uris = vec![identity::region_uri(&self.fed, region)];
        uris.extend(tags.iter().map(|t| identity::tag_uri(&self.fed, region, t)));
        self.issue(&format!("region {region}"), &uris, true, validity)
    }

    /// An agent's certificate.
    pub fn agent(&self, region: &str, name: &str) -> Result<Issued, TlsError> {
        self.issue(
            &format!("agent {region}/{name}"),
            &[identity::agent_uri(&self.fed, region, name)],
            false,
            Validity::Normal,
        )
    }

    /// A client, operator or auditor certificate.
    pub fn role(&self, role: Role, name: &str) -> Result<Issued, TlsError> {
        self.issue(
            &format!("{role} {name}"),
            &[identity::role_uri(&self.fed, role, name)],
            false,
            Validity::Normal,
        )
    }
}

/// Writes `text` to `path`; keys get mode 0600.
pub fn write_file(path: &Path, text: &str, secret: bool) -> Result<(), TlsError> {
    let io = |e: std::io::Error| TlsError::File {
        path: path.to_path_buf(),
        why: e.to_string(),
    };
    use std::io::Write;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(if secret { 0o600 } else { 0o644 });
    }
    let mut f = opts.open(path).map_err(io)?;
    f.write_all(text.as_bytes()).map_err(io)?;
    f.sync_all().map_err(io)
}

/// Writes a cert/key pair as `<stem>.pem` and `<stem>.key` in `dir`.
pub fn write_pair(dir: &Path, stem: &str, issued: &Issued) -> Result<PathBuf, TlsError> {
    let cert = dir.join(format!("{stem}.pem"));
    write_file(&cert, &issued.cert_pem, false)?;
    write_file(&dir.join(format!("{stem}.key")), &issued.key_pem, true)?;
    Ok(cert)
}

/// What `certs init` creates, by file stem in the output folder:
/// `ca.pem` (and `ca.key`), `region-<r>`, `agent-<r>`, `client`, `operator`,
/// `auditor` (each `.pem` + `.key`).
#[derive(Debug, Clone)]
pub struct Layout {
    /// The folder.
    pub dir: PathBuf,
}

impl Layout {
    /// The CA certificate.
    pub fn ca(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }
    /// Certificate and key of a stem.
    pub fn pair(&self, stem: &str) -> (PathBuf, PathBuf) {
        (
            self.dir.join(format!("{stem}.pem")),
            self.dir.join(format!("{stem}.key")),
        )
    }
    /// A region controller's files.
    pub fn region(&self, region: &str) -> (PathBuf, PathBuf) {
        self.pair(&format!("region-{region}"))
    }
    /// A region agent's files.
    pub fn agent(&self, region: &str) -> (PathBuf, PathBuf) {
        self.pair(&format!("agent-{region}"))
    }
}

/// Creates a CA and every certificate of a development federation in `out`:
/// one per region (attesting its tags), one agent per region, and one client,
/// operator and auditor. Returns the layout.
pub fn init(
    out: &Path,
    federation: &str,
    regions: &[(String, Vec<String>)],
) -> Result<Layout, TlsError> {
    std::fs::create_dir_all(out).map_err(|e| TlsError::File {
        path: out.to_path_buf(),
        why: e.to_string(),
    })?;
    let ca = DevCa::new(federation)?;
    write_file(&out.join("ca.pem"), &ca.ca_pem(), false)?;
    write_file(&out.join("ca.key"), &ca.issuer.key().serialize_pem(), true)?;
    for (region, tags) in regions {
        write_pair(
            out,
            &format!("region-{region}"),
            &ca.region(region, tags, Validity::Normal)?,
        )?;
        write_pair(
            out,
            &format!("agent-{region}"),
            &ca.agent(region, &format!("{region}-agent"))?,
        )?;
    }
    for role in [Role::Client, Role::Operator, Role::Auditor] {
        write_pair(out, role.as_str(), &ca.role(role, role.as_str())?)?;
    }
    Ok(Layout {
        dir: out.to_path_buf(),
    })
}
