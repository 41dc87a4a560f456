//! Identities carried in certificates as URI SANs, SPIFFE style:
//!
//! | Who | URI SAN |
//! |---|---|
//! | a region's controller (role `peer`) | `spiffe://<fed>/region/<region>` |
//! | a compliance tag the region may advertise | `spiffe://<fed>/region/<region>/tag/<TAG>` |
//! | a region agent | `spiffe://<fed>/agent/<region>/<name>` |
//! | a client | `spiffe://<fed>/client/<name>` |
//! | an operator | `spiffe://<fed>/operator/<name>` |
//! | an auditor | `spiffe://<fed>/auditor/<name>` |
//!
//! `<fed>` is [`slug`] of the federation's name (`Global Enterprise Federation`
//! → `global-enterprise-federation`). A certificate carries exactly one
//! identity URI (plus, for regions, tag URIs of the same region).
//!
//! Pure parsing: no I/O.

use std::collections::BTreeSet;
use std::fmt;

/// What a caller may do; see the auth layer of the controller.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Role {
    /// Another region's controller: the peer service only.
    Peer,
    /// A region agent: lease and complete in its own region.
    Agent,
    /// A client: submit, get, watch, cancel, explain.
    Client,
    /// An operator: admin (reload, drain, status).
    Operator,
    /// An auditor: read status and decisions.
    Auditor,
}

impl Role {
    /// The role's name as written in token files and messages.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Peer => "peer",
            Role::Agent => "agent",
            Role::Client => "client",
            Role::Operator => "operator",
            Role::Auditor => "auditor",
        }
    }

    /// Parses a role name.
    pub fn parse(s: &str) -> Option<Role> {
        Some(match s {
            "peer" => Role::Peer,
            "agent" => Role::Agent,
            "client" => Role::Client,
            "operator" => Role::Operator,
            "auditor" => Role::Auditor,
            _ => return None,
        })
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An authenticated caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// Its role.
    pub role: Role,
    /// Its name: the region for a peer, the agent/client/… name otherwise.
    pub name: String,
    /// The region of a peer or an agent.
    pub region: Option<String>,
    /// Compliance tags attested by the certificate (peers only).
    pub tags: BTreeSet<String>,
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (&self.role, &self.region) {
            (Role::Peer, _) => write!(f, "peer {}", self.name),
            (Role::Agent, Some(r)) => write!(f, "agent {r}/{}", self.name),
            (role, _) => write!(f, "{role} {}", self.name),
        }
    }
}

/// Why a certificate's names do not make an identity.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    /// No `spiffe://<fed>/…` URI SAN at all.
    #[error("certificate has no spiffe://{0}/… identity URI")]
    Missing(String),
    /// A URI of another federation (another trust domain).
    #[error("certificate identity `{uri}` is not of federation `{expected}`")]
    OtherFederation {
        /// The URI.
        uri: String,
        /// Our trust domain.
        expected: String,
    },
    /// A URI that is not one of the documented forms.
    #[error("certificate identity `{0}` is malformed")]
    Malformed(String),
    /// More than one identity, or a tag of another region.
    #[error("certificate names several identities: {0}")]
    Ambiguous(String),
    /// The certificate could not be parsed.
    #[error("certificate cannot be parsed: {0}")]
    Unparsable(String),
}

/// The trust-domain form of a federation name: lowercase ASCII letters and
/// digits, every other run of characters one `-`, no leading/trailing `-`.
pub fn slug(federation: &str) -> String {
    let mut out = String::new();
    for c in federation.chars() {
        if c.is_ascii_alphanumeric() {
            out.push(c.to_ascii_lowercase());
        } else if !out.ends_with('-') {
            out.push('-');
        }
    }
    let trimmed = out.trim_matches('-');
    if trimmed.is_empty() {
        "federation".to_string()
    } else {
        trimmed.to_string()
    }
}

/// `spiffe://<fed>/region/<region>`.
pub fn region_uri(fed: &str, region: &str) -> String {
    format!("spiffe://{fed}/region/{region}")
}

/// `spiffe://<fed>/region/<region>/tag/<tag>`.
pub fn tag_uri(fed: &str, region: &str, tag: &str) -> String {
    format!("spiffe://{fed}/region/{region}/tag/{tag}")
}

/// `spiffe://<fed>/agent/<region>/<name>`.
pub fn agent_uri(fed: &str, region: &str, name: &str) -> String {
    format!("spiffe://{fed}/agent/{region}/{name}")
}

/// `spiffe://<fed>/<role>/<name>` for client, operator and auditor.
pub fn role_uri(fed: &str, role: Role, name: &str) -> String {
    format!("spiffe://{fed}/{}/{name}", role.as_str())
}

fn segment_ok(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 128
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

/// Builds the identity from a certificate's URI SANs, for federation `fed`
/// (a [`slug`]; empty: whichever federation the first identity URI names,
/// for command-line clients that trust the CA alone). Other URIs (other
/// schemes) are ignored.
pub fn from_uris<S: AsRef<str>>(fed: &str, uris: &[S]) -> Result<Identity, IdentityError> {
    let prefix = "spiffe://";
    let first_domain = uris.iter().find_map(|u| {
        u.as_ref()
            .strip_prefix(prefix)
            .map(|r| r.split('/').next().unwrap_or("").to_string())
    });
    let fed = if fed.is_empty() {
        first_domain.as_deref().unwrap_or("")
    } else {
        fed
    };
    let mut identity: Option<Identity> = None;
    let mut tags: Vec<(String, String)> = Vec::new();
    for uri in uris {
        let uri = uri.as_ref();
        let Some(rest) = uri.strip_prefix(prefix) else {
            continue;
        };
        let (domain, path) = rest.split_once('/').unwrap_or((rest, ""));
        if domain != fed {
            return Err(IdentityError::OtherFederation {
                uri: uri.to_string(),
                expected: fed.to_string(),
            });
        }
        let parts: Vec<&str> = path.split('/').collect();
        if !parts.iter().all(|p| segment_ok(p)) {
            return Err(IdentityError::Malformed(uri.to_string()));
        }
        let found = match parts.as_slice() {
            ["region", region, "tag", tag] => {
                tags.push((region.to_string(), tag.to_string()));
                continue;
            }
            ["region", region] => Identity {
                role: Role::Peer,
                name: region.to_string(),
                region: Some(region.to_string()),
                tags: BTreeSet::new(),
            },
            ["agent", region, name] => Identity {
                role: Role::Agent,
                name: name.to_string(),
                region: Some(region.to_string()),
                tags: BTreeSet::new(),
            },
            [role @ ("client" | "operator" | "auditor"), name] => Identity {
                role: Role::parse(role).unwrap_or(Role::Client),
                name: name.to_string(),
                region: None,
                tags: BTreeSet::new(),
            },
            _ => return Err(IdentityError::Malformed(uri.to_string())),
        };
        if let Some(first) = &identity {
            return Err(IdentityError::Ambiguous(format!("{first} and {found}")));
        }
        identity = Some(found);
    }
    let mut identity = identity.ok_or_else(|| IdentityError::Missing(fed.to_string()))?;
    for (region, tag) in tags {
        if identity.role != Role::Peer || identity.region.as_deref() != Some(region.as_str()) {
            return Err(IdentityError::Ambiguous(format!(
                "tag {tag} of region {region} on the certificate of {identity}"
            )));
        }
        identity.tags.insert(tag);
    }
    Ok(identity)
}

/// The URI SANs of a DER certificate.
pub fn uris_of(der: &[u8]) -> Result<Vec<String>, IdentityError> {
    use x509_parser::prelude::*;
    let (_, cert) =
        X509Certificate::from_der(der).map_err(|e| IdentityError::Unparsable(e.to_string()))?;
    let mut uris = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            if let GeneralName::URI(u) = name {
                uris.push((*u).to_string());
            }
        }
    }
    Ok(uris)
}

/// When a DER certificate stops being valid (`notAfter`), in seconds since
/// the Unix epoch.
pub fn not_after_of(der: &[u8]) -> Result<i64, IdentityError> {
    use x509_parser::prelude::*;
    let (_, cert) =
        X509Certificate::from_der(der).map_err(|e| IdentityError::Unparsable(e.to_string()))?;
    Ok(cert.validity().not_after.timestamp())
}

/// The identity of a DER certificate for federation `fed`.
pub fn from_der(fed: &str, der: &[u8]) -> Result<Identity, IdentityError> {
    from_uris(fed, &uris_of(der)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slug_of_the_user_example() {
        assert_eq!(
            slug("Global Enterprise Federation"),
            "global-enterprise-federation"
        );
        assert_eq!(slug("  --  "), "federation");
    }

    #[test]
    fn region_with_tags() {
        let id = from_uris(
            "f",
            &[
                "spiffe://f/region/europe",
                "spiffe://f/region/europe/tag/GDPR",
                "https://ignored.example",
            ],
        )
        .expect("identity");
        assert_eq!(id.role, Role::Peer);
        assert_eq!(id.region.as_deref(), Some("europe"));
        assert!(id.tags.contains("GDPR"));
    }

    #[test]
    fn refusals() {
        assert!(matches!(
            from_uris::<&str>("f", &[]),
            Err(IdentityError::Missing(_))
        ));
        assert!(matches!(
            from_uris("f", &["spiffe://g/region/europe"]),
            Err(IdentityError::OtherFederation { .. })
        ));
        assert!(matches!(
            from_uris("f", &["spiffe://f/region/europe/x"]),
            Err(IdentityError::Malformed(_))
        ));
        assert!(matches!(
            from_uris("f", &["spiffe://f/client/a", "spiffe://f/operator/b"]),
            Err(IdentityError::Ambiguous(_))
        ));
        assert!(matches!(
            from_uris(
                "f",
                &[
                    "spiffe://f/region/asia",
                    "spiffe://f/region/europe/tag/GDPR"
                ]
            ),
            Err(IdentityError::Ambiguous(_))
        ));
    }
}
