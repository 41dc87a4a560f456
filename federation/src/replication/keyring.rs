//! The snapshot key ring: AES-256 keys by id, read from a file
//! (`node.keys.file`) or the `FEDERATION_KEYS` environment variable.
//!
//! Format: one key per line, `id:base64(32 bytes)`, optionally followed by
//! `:current`; blank lines and `#` comments are ignored (in the environment
//! variable, `;` also separates entries). The current key (used to encrypt)
//! is the one marked `:current`, else the last one listed (the newest):
//! rotation appends a new key, and the old ones keep decrypting what was
//! sealed with them. One line may be marked `:audit` instead: the
//! federation's audit key ([`crate::audit::key`]), which never seals or
//! opens a snapshot.
//!
//! Owns parsing and holding key bytes. Key bytes never appear in a `Debug`
//! output, a log line or an error message: errors name the file and line only.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use base64::Engine as _;
use zeroize::Zeroizing;

/// The environment variable holding a key ring (used when no file is set).
pub const KEYS_ENV: &str = "FEDERATION_KEYS";

/// Longest key id.
const MAX_ID_LEN: usize = 64;

/// One AES-256 key.
#[derive(Clone)]
pub struct Key {
    id: String,
    bytes: Arc<Zeroizing<[u8; 32]>>,
}

impl Key {
    /// A key from its id and 32 bytes.
    pub fn new(id: impl Into<String>, bytes: [u8; 32]) -> Self {
        Self {
            id: id.into(),
            bytes: Arc::new(Zeroizing::new(bytes)),
        }
    }

    /// The key's id (carried in snapshot headers).
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The key bytes (for the cipher only).
    pub(crate) fn bytes(&self) -> &[u8; 32] {
        &self.bytes
    }
}

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Key({}, <redacted>)", self.id)
    }
}

/// Keys by id, and which one encrypts.
#[derive(Clone, Default)]
pub struct KeyRing {
    keys: BTreeMap<String, Key>,
    current: Option<String>,
    origin: String,
    audit: Option<Key>,
}

impl std::fmt::Debug for KeyRing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyRing")
            .field("origin", &self.origin)
            .field("ids", &self.keys.keys().collect::<Vec<_>>())
            .field("current", &self.current)
            .field("audit", &self.audit.as_ref().map(Key::id))
            .finish()
    }
}

/// Why a key ring could not be loaded. Never contains key material.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// The file could not be read.
    #[error("{}: cannot read key ring: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A line is malformed.
    #[error("{origin}:{line}: {why}")]
    Line {
        /// The file name, or `FEDERATION_KEYS`.
        origin: String,
        /// 1-based line (entry) number.
        line: usize,
        /// What is wrong (never the key itself).
        why: String,
    },
    /// No key at all.
    #[error("{0}: no keys")]
    Empty(String),
}

impl KeyRing {
    /// A ring holding `keys`; the current one is `current`, else the last.
    pub fn from_keys(keys: Vec<Key>, current: Option<&str>) -> Self {
        let current = current
            .map(str::to_string)
            .or_else(|| keys.last().map(|k| k.id.clone()));
        Self {
            keys: keys.into_iter().map(|k| (k.id.clone(), k)).collect(),
            current,
            origin: "memory".into(),
            audit: None,
        }
    }

    /// Parses a ring from text; `origin` names it in errors.
    pub fn parse(origin: &str, text: &str) -> Result<Self, KeyError> {
        let line_err = |line: usize, why: String| KeyError::Line {
            origin: origin.to_string(),
            line,
            why,
        };
        let mut keys = BTreeMap::new();
        let mut current = None;
        let mut last = None;
        let mut audit: Option<Key> = None;
        let entries = text.split(['\n', ';']);
        for (n, raw) in entries.enumerate() {
            let line = n + 1;
            let entry = raw.trim();
            if entry.is_empty() || entry.starts_with('#') {
                continue;
            }
            let mut parts = entry.split(':');
            let id = parts.next().unwrap_or_default().trim();
            let Some(b64) = parts.next().map(str::trim) else {
                return Err(line_err(line, "expected `id:base64-key`".into()));
            };
            let marker = parts.next().map(str::trim);
            if parts.next().is_some() {
                return Err(line_err(line, "too many `:` fields".into()));
            }
            if id.is_empty()
                || id.len() > MAX_ID_LEN
                || !id
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
            {
                return Err(line_err(
                    line,
                    format!("key id must be 1 to {MAX_ID_LEN} characters of [A-Za-z0-9-_.]"),
                ));
            }
            let bytes = Zeroizing::new(
                base64::engine::general_purpose::STANDARD
                    .decode(b64)
                    .map_err(|_| line_err(line, format!("key `{id}` is not valid base64")))?,
            );
            let arr: [u8; 32] = bytes.as_slice().try_into().map_err(|_| {
                line_err(
                    line,
                    format!(
                        "key `{id}` must be 32 bytes (AES-256), got {} bytes",
                        bytes.len()
                    ),
                )
            })?;
            match marker {
                None => {}
                Some("current") => {
                    if current.is_some() {
                        return Err(line_err(line, "more than one key marked current".into()));
                    }
                    current = Some(id.to_string());
                }
                Some("audit") => {
                    if audit.is_some() {
                        return Err(line_err(line, "more than one key marked audit".into()));
                    }
                    if keys.contains_key(id) {
                        return Err(line_err(line, format!("key id `{id}` listed twice")));
                    }
                    audit = Some(Key::new(id, arr));
                    continue;
                }
                Some(other) => {
                    return Err(line_err(
                        line,
                        format!("unknown marker `{other}` (expected `current` or `audit`)"),
                    ));
                }
            }
            if audit.as_ref().is_some_and(|a| a.id() == id) {
                return Err(line_err(line, format!("key id `{id}` listed twice")));
            }
            if keys.insert(id.to_string(), Key::new(id, arr)).is_some() {
                return Err(line_err(line, format!("key id `{id}` listed twice")));
            }
            last = Some(id.to_string());
        }
        if keys.is_empty() {
            return Err(KeyError::Empty(origin.to_string()));
        }
        Ok(Self {
            keys,
            current: current.or(last),
            origin: origin.to_string(),
            audit,
        })
    }

    /// Reads a ring from a file (warning when others can read it).
    pub fn load_file(path: &Path) -> Result<Self, KeyError> {
        crate::private_files::warn_if_exposed(path, "snapshot key file");
        let text = std::fs::read_to_string(path).map_err(|source| KeyError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&path.display().to_string(), &text)
    }

    /// The ring from `file` if given, else from `FEDERATION_KEYS` if set,
    /// else `None`.
    pub fn load(file: Option<&Path>) -> Result<Option<Self>, KeyError> {
        if let Some(path) = file {
            return Self::load_file(path).map(Some);
        }
        match std::env::var(KEYS_ENV) {
            Ok(text) if !text.trim().is_empty() => Self::parse(KEYS_ENV, &text).map(Some),
            _ => Ok(None),
        }
    }

    /// The key that encrypts.
    pub fn current(&self) -> Option<&Key> {
        self.current.as_ref().and_then(|id| self.keys.get(id))
    }

    /// The key marked `:audit`, if any (never a snapshot key).
    pub fn audit(&self) -> Option<&Key> {
        self.audit.as_ref()
    }

    /// A key by id.
    pub fn get(&self, id: &str) -> Option<&Key> {
        self.keys.get(id)
    }

    /// Key ids, sorted.
    pub fn ids(&self) -> Vec<String> {
        self.keys.keys().cloned().collect()
    }

    /// One line of a key file for `key` (for generating rings, e.g. the sandbox).
    pub fn line(id: &str, bytes: &[u8; 32]) -> String {
        format!(
            "{id}:{}",
            base64::engine::general_purpose::STANDARD.encode(bytes)
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const K1: [u8; 32] = [7u8; 32];
    const K2: [u8; 32] = [9u8; 32];

    #[test]
    fn parses_ids_and_picks_current() {
        let text = format!(
            "# ring\n{}\n\n{}\n",
            KeyRing::line("k1", &K1),
            KeyRing::line("k2", &K2)
        );
        let ring = KeyRing::parse("ring.keys", &text).expect("parses");
        assert_eq!(ring.ids(), vec!["k1", "k2"]);
        assert_eq!(ring.current().expect("current").id(), "k2");
        let marked = format!(
            "{}:current;{}",
            KeyRing::line("k1", &K1),
            KeyRing::line("k2", &K2)
        );
        let ring = KeyRing::parse(KEYS_ENV, &marked).expect("parses");
        assert_eq!(ring.current().expect("current").id(), "k1");
    }

    #[test]
    fn errors_name_file_and_line_and_never_the_key() {
        let good = KeyRing::line("k1", &K1);
        let short = KeyRing::line("k2", &K2);
        let short = &short[..short.len() - 8];
        let text = format!("{good}\n# c\n{short}\n");
        let err = KeyRing::parse("/etc/federation/ring.keys", &text)
            .expect_err("short key")
            .to_string();
        assert!(err.starts_with("/etc/federation/ring.keys:3:"), "{err}");
        assert!(err.contains("k2"), "{err}");
        let b64 = good.split(':').nth(1).expect("b64");
        assert!(!err.contains(b64) && !err.contains(&short[3..]), "{err}");
        for bad in ["nocolon", "k:!!!!", "k:AAAA:later", ":AAAA"] {
            let err = KeyRing::parse("f", bad).expect_err(bad).to_string();
            assert!(err.starts_with("f:1:"), "{err}");
            assert!(!err.contains("AAAA") && !err.contains("!!!!"), "{err}");
        }
        let dup = format!("{good}\n{good}");
        assert!(
            KeyRing::parse("f", &dup)
                .expect_err("dup")
                .to_string()
                .contains("twice")
        );
        assert!(matches!(
            KeyRing::parse("f", "# none\n"),
            Err(KeyError::Empty(_))
        ));
        let missing = KeyRing::load_file(Path::new("/nonexistent/ring.keys"))
            .expect_err("missing")
            .to_string();
        assert!(missing.contains("/nonexistent/ring.keys"), "{missing}");
    }

    #[test]
    fn an_audit_key_is_held_apart_from_the_snapshot_keys() {
        let text = format!(
            "{}\n{}:audit\n",
            KeyRing::line("k1", &K1),
            KeyRing::line("a1", &K2)
        );
        let ring = KeyRing::parse("f", &text).expect("parses");
        assert_eq!(ring.ids(), vec!["k1"]);
        assert_eq!(ring.current().expect("current").id(), "k1");
        assert_eq!(ring.audit().expect("audit").id(), "a1");
        assert!(ring.get("a1").is_none(), "never opens a snapshot");
        let two = format!("{text}{}:audit\n", KeyRing::line("a2", &K2));
        let err = KeyRing::parse("f", &two).expect_err("two").to_string();
        assert!(err.starts_with("f:3:") && err.contains("audit"), "{err}");
    }

    #[test]
    fn debug_output_is_redacted() {
        let ring = KeyRing::parse("f", &KeyRing::line("k1", &K1)).expect("parses");
        let shown = format!("{ring:?} {:?}", ring.current());
        let b64 = KeyRing::line("k1", &K1);
        assert!(!shown.contains(&b64[3..]), "{shown}");
        assert!(!shown.contains("7, 7, 7"), "{shown}");
        assert!(shown.contains("k1"), "{shown}");
    }
}
