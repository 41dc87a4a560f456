//! The federation's audit key: the HMAC-SHA256 key behind the keyed digests
//! that a record written outside a task's region keeps instead of attribute
//! values ([`super::minimise`]), so that an auditor holding the key can prove
//! that two records concern the same input, or that a record concerns a
//! given value, without the records holding it.
//!
//! Where the key comes from, in order:
//!
//! 1. the snapshot key ring's line marked `:audit`
//!    (`audit-2026:<base64 of 32 bytes>:audit`, see
//!    [`crate::replication::keyring`]): it never seals or opens a snapshot,
//!    and that one line is what an auditor is given (`--audit-key FILE`);
//! 2. else derived from the ring's current snapshot key:
//!    `HMAC-SHA256(snapshot key, "federation audit key v1")`, with the id
//!    `derived.<snapshot key id>` (an auditor then needs the ring,
//!    `--keys FILE`; rotating the snapshot key changes the audit key);
//! 3. without a key ring there is no key: records keep names only.
//!
//! The digests, as lower-case hex of HMAC-SHA256 under that key:
//!
//! * one attribute: `"attribute" 0x00 name 0x00 canonical-JSON(value)`;
//! * all attributes (the input): `"input" 0x00 canonical-JSON(attributes)`,
//!
//! where canonical JSON is the decision log's (keys sorted, no whitespace;
//! Python's `json.dumps(v, sort_keys=True, separators=(",", ":"),
//! ensure_ascii=False)` for values without floats).
//!
//! An auditor's check of a candidate value, independent of this code
//! (`federation audit digest` does the same and searches logs):
//!
//! ```python
//! import base64, hashlib, hmac, json, sys
//! line, name, value = sys.argv[1:4]            # "id:base64[:audit]", attribute, string value
//! key = base64.b64decode(line.split(":")[1])
//! canon = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
//! msg = b"attribute\0" + name.encode() + b"\0" + canon.encode()
//! print(hmac.new(key, msg, hashlib.sha256).hexdigest())
//! ```
//!
//! Key bytes never appear in a `Debug` output, a log line or an error.

use std::path::Path;

use base64::Engine as _;
use ring::hmac;

use crate::policy::{AttrValue, Attributes};
use crate::replication::keyring::KeyRing;

/// What the derivation of an audit key from a snapshot key signs.
const DERIVATION: &[u8] = b"federation audit key v1";

/// The audit key.
#[derive(Clone)]
pub struct AuditKey {
    id: String,
    key: hmac::Key,
}

impl std::fmt::Debug for AuditKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "AuditKey({}, <redacted>)", self.id)
    }
}

/// Why an audit key file could not be used (never holds key material).
#[derive(Debug, thiserror::Error)]
pub enum AuditKeyError {
    /// The file could not be read.
    #[error("{}: cannot read the audit key: {source}", path.display())]
    Read {
        /// The file.
        path: std::path::PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A line is malformed, or the file holds no usable key.
    #[error("{origin}: {why}")]
    Bad {
        /// `file:line`, or the file.
        origin: String,
        /// What is wrong.
        why: String,
    },
}

impl AuditKey {
    /// A key from its id and bytes.
    pub fn new(id: impl Into<String>, bytes: &[u8]) -> Self {
        Self {
            id: id.into(),
            key: hmac::Key::new(hmac::HMAC_SHA256, bytes),
        }
    }

    /// The ring's audit key: the line marked `:audit`, else derived from the
    /// current snapshot key; `None` for a ring without either.
    pub fn of_ring(ring: &KeyRing) -> Option<Self> {
        if let Some(k) = ring.audit() {
            return Some(Self::new(k.id(), k.bytes()));
        }
        let current = ring.current()?;
        let derive = hmac::Key::new(hmac::HMAC_SHA256, current.bytes());
        let tag = hmac::sign(&derive, DERIVATION);
        Some(Self::new(format!("derived.{}", current.id()), tag.as_ref()))
    }

    /// Reads the key an auditor holds: a file of key-ring lines
    /// (`id:base64[:marker]`), using its line marked `:audit`, else its only
    /// line. For a whole snapshot key ring use [`KeyRing::load_file`] and
    /// [`AuditKey::of_ring`].
    pub fn load_file(path: &Path) -> Result<Self, AuditKeyError> {
        let text = std::fs::read_to_string(path).map_err(|source| AuditKeyError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let file = path.display().to_string();
        let mut lines = Vec::new();
        for (n, raw) in text.lines().enumerate() {
            let entry = raw.trim();
            if entry.is_empty() || entry.starts_with('#') {
                continue;
            }
            let bad = |why: String| AuditKeyError::Bad {
                origin: format!("{file}:{}", n + 1),
                why,
            };
            let mut parts = entry.split(':').map(str::trim);
            let id = parts.next().unwrap_or_default();
            let b64 = parts
                .next()
                .ok_or_else(|| bad("expected `id:base64-key[:audit]`".into()))?;
            let marker = parts.next();
            if id.is_empty() || parts.next().is_some() {
                return Err(bad("expected `id:base64-key[:audit]`".into()));
            }
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(b64)
                .map_err(|_| bad(format!("key `{id}` is not valid base64")))?;
            if bytes.len() != 32 {
                return Err(bad(format!(
                    "key `{id}` must be 32 bytes, got {} bytes",
                    bytes.len()
                )));
            }
            lines.push((id.to_string(), bytes, marker == Some("audit")));
        }
        let marked: Vec<_> = lines.iter().filter(|l| l.2).collect();
        let chosen = match (marked.as_slice(), lines.as_slice()) {
            ([one], _) => *one,
            ([], [only]) => only,
            ([], _) => {
                return Err(AuditKeyError::Bad {
                    origin: file,
                    why: "no line marked `:audit` (and more than one key): pass the whole ring with --keys, or the audit line alone".into(),
                });
            }
            _ => {
                return Err(AuditKeyError::Bad {
                    origin: file,
                    why: "more than one key marked audit".into(),
                });
            }
        };
        Ok(Self::new(chosen.0.clone(), &chosen.1))
    }

    /// The key's id (recorded next to every digest).
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The digest of one attribute's value.
    pub fn attribute_digest(&self, name: &str, value: &AttrValue) -> String {
        let mut msg = Vec::with_capacity(name.len() + 32);
        msg.extend_from_slice(b"attribute\0");
        msg.extend_from_slice(name.as_bytes());
        msg.push(0);
        super::push_attr_value(value, &mut msg);
        hex::encode(hmac::sign(&self.key, &msg).as_ref())
    }

    /// The digest of a task's whole input (every attribute).
    pub fn input_digest(&self, attrs: &Attributes) -> String {
        let mut msg = Vec::with_capacity(128);
        msg.extend_from_slice(b"input\0");
        super::push_attributes(attrs, &mut msg);
        hex::encode(hmac::sign(&self.key, &msg).as_ref())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digests_are_keyed_and_distinguish_name_and_value() {
        let a = AuditKey::new("a", &[1u8; 32]);
        let b = AuditKey::new("b", &[2u8; 32]);
        let v = AttrValue::Str("jane@example.eu".into());
        let d = a.attribute_digest("email", &v);
        assert_eq!(d.len(), 64);
        assert_eq!(d, a.attribute_digest("email", &v), "deterministic");
        assert_ne!(d, b.attribute_digest("email", &v), "keyed");
        assert_ne!(d, a.attribute_digest("mail", &v), "bound to the name");
        assert_ne!(
            d,
            a.attribute_digest("email", &AttrValue::Str("jane@example.e".into()))
        );
        // The documented recipe: HMAC over the canonical JSON.
        let expected = hex::encode(
            hmac::sign(
                &hmac::Key::new(hmac::HMAC_SHA256, &[1u8; 32]),
                b"attribute\0email\0\"jane@example.eu\"",
            )
            .as_ref(),
        );
        assert_eq!(d, expected);
        let attrs: Attributes = [("email".to_string(), v)].into_iter().collect();
        let expected = hex::encode(
            hmac::sign(
                &hmac::Key::new(hmac::HMAC_SHA256, &[1u8; 32]),
                b"input\0{\"email\":\"jane@example.eu\"}",
            )
            .as_ref(),
        );
        assert_eq!(a.input_digest(&attrs), expected);
    }

    #[test]
    fn documented_python_recipe_computes_the_same_digest() {
        let script: String = include_str!("key.rs")
            .lines()
            .skip_while(|l| !l.contains("```python"))
            .skip(1)
            .take_while(|l| !l.contains("```"))
            .map(|l| {
                let l = l.strip_prefix("//!").unwrap_or(l);
                format!("{}\n", l.strip_prefix(' ').unwrap_or(l))
            })
            .collect();
        assert!(script.contains("hmac.new"), "recipe not found");
        let line = KeyRing::line("a1", &[4u8; 32]) + ":audit";
        let value = "jäne \"q\"@example.eu";
        let Ok(out) = std::process::Command::new("python3")
            .args(["-c", &script, &line, "email", value])
            .output()
        else {
            eprintln!("python3 not available; skipping");
            return;
        };
        assert!(out.status.success(), "{out:?}");
        let key = AuditKey::new("a1", &[4u8; 32]);
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            key.attribute_digest("email", &AttrValue::Str(value.into()))
        );
    }

    #[test]
    fn ring_key_marked_audit_wins_over_the_derived_one() {
        let plain = format!("{}\n", KeyRing::line("s1", &[7u8; 32]));
        let ring = KeyRing::parse("f", &plain).expect("ring");
        let derived = AuditKey::of_ring(&ring).expect("derived");
        assert_eq!(derived.id(), "derived.s1");
        let marked = format!("{plain}{}:audit\n", KeyRing::line("a1", &[9u8; 32]));
        let ring = KeyRing::parse("f", &marked).expect("ring");
        let audit = AuditKey::of_ring(&ring).expect("audit");
        assert_eq!(audit.id(), "a1");
        let v = AttrValue::Int(3);
        assert_ne!(
            audit.attribute_digest("n", &v),
            derived.attribute_digest("n", &v)
        );
        assert!(!format!("{audit:?}").contains("9, 9"));
    }

    #[test]
    fn auditor_file_errors_name_the_line_and_never_the_key() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("audit.key");
        let good = KeyRing::line("a1", &[9u8; 32]);
        std::fs::write(&path, format!("# audit\n{good}:audit\n")).expect("write");
        assert_eq!(AuditKey::load_file(&path).expect("loads").id(), "a1");
        std::fs::write(&path, format!("{good}\n")).expect("write");
        assert_eq!(AuditKey::load_file(&path).expect("only line").id(), "a1");
        let short = &good[..good.len() - 8];
        std::fs::write(&path, format!("# c\n{short}\n")).expect("write");
        let err = AuditKey::load_file(&path).expect_err("short").to_string();
        assert!(err.contains("audit.key:2:"), "{err}");
        assert!(!err.contains(&short[3..]), "{err}");
        let two = format!("{good}\n{}\n", KeyRing::line("a2", &[8u8; 32]));
        std::fs::write(&path, two).expect("write");
        assert!(AuditKey::load_file(&path).is_err());
    }
}
