//! Signed policy bundles: approvers' Ed25519 signatures over one federation
//! file's exact bytes, kept beside it in `FILE.approvals`, and the quorum
//! check that `serve`, SIGHUP, the policy poll and `ReloadPolicy` apply.
//!
//! # Format
//!
//! An approval signs `DOMAIN || SHA-256(file bytes)` ([`message`]), where
//! `DOMAIN` is `federation-policy-approval/v1\n`: the signature is over the
//! exact bytes of the federation file (comments and formatting included),
//! and can never be mistaken for a signature of anything else. The bundle is
//! the file plus `FILE.approvals`, JSON:
//!
//! ```text
//! {"format":"federation-policy-approvals/v1","approvals":[
//!   {"approver":"alice","public_key":"ed25519:<base64 32 bytes>",
//!    "policy_sha256":"<hex>","signature":"<base64 64 bytes>","signed_at":"2026-…Z"}]}
//! ```
//!
//! `approver`, `policy_sha256` and `signed_at` are for people: who counts
//! is decided by the key alone, matched against `federation.policy.approvers`
//! (names come from there), and a signature counts only when it verifies
//! over the content at hand. Keys are PKCS#8 (`federation policy keygen`, or
//! `openssl genpkey -algorithm ed25519`); signing and verifying use `ring`.
//!
//! # Whose approvals count
//!
//! At start, the file's own approvers. On a reload, the approvers of the
//! policy *in force* as well (when it requires approvals): replacing the
//! approvers, lowering the quorum or turning `require_approvals` off takes
//! a quorum of the approvers being replaced. A node file or environment
//! variable that changes the `federation` section is refused, since it
//! would change the policy without changing the signed bytes.
//!
//! Pure apart from [`load_file`], [`load_signing_key`] and [`write_file`]:
//! no network, no clock except the `signed_at` text.

use std::path::{Path, PathBuf};

use base64::Engine as _;
use ring::signature::{self, Ed25519KeyPair, KeyPair as _};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// An approver's private key (ring's Ed25519 key pair).
pub use ring::signature::Ed25519KeyPair as SigningKey;

/// The domain-separation prefix of every signed message.
pub const DOMAIN: &[u8] = b"federation-policy-approval/v1\n";
/// The `format` of an approvals file.
pub const FORMAT: &str = "federation-policy-approvals/v1";
pub use crate::policy::approvers::KEY_PREFIX;
/// The largest approvals file read (it is small: one line per approver).
const MAX_FILE_BYTES: usize = 1 << 20;

/// Errors reading, writing or making approvals and keys.
#[derive(Debug, thiserror::Error)]
pub enum ApprovalError {
    /// A file could not be read or written.
    #[error("{}: {error}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        error: std::io::Error,
    },
    /// A file's content is not what it should be.
    #[error("{}: {message}", path.display())]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// Key generation or signing failed in the crypto library.
    #[error("{0}")]
    Crypto(String),
}

/// The approvals file of `policy`: the same path with `.approvals` appended.
pub fn approvals_path(policy: &Path) -> PathBuf {
    let mut name = policy.as_os_str().to_os_string();
    name.push(".approvals");
    PathBuf::from(name)
}

/// SHA-256 of the content, as lower-case hex.
pub fn content_sha256(content: &[u8]) -> String {
    hex::encode(Sha256::digest(content))
}

/// The bytes an approval signs: [`DOMAIN`] then SHA-256 of `content`.
pub fn message(content: &[u8]) -> Vec<u8> {
    let mut m = DOMAIN.to_vec();
    m.extend_from_slice(&Sha256::digest(content));
    m
}

pub use crate::policy::approvers::{Approvers, PublicKey};

/// One approval in an approvals file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Approval {
    /// The approver's name as the signer gave it (for people; the key decides).
    pub approver: String,
    /// `ed25519:<base64>`.
    pub public_key: String,
    /// Hex SHA-256 of the content the signer saw (for people).
    pub policy_sha256: String,
    /// Base64 Ed25519 signature over [`message`] of the content.
    pub signature: String,
    /// When it was signed, RFC 3339 UTC (for people).
    #[serde(default)]
    pub signed_at: String,
}

/// The `FILE.approvals` document.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApprovalsFile {
    /// Always [`FORMAT`].
    pub format: String,
    /// The approvals, in the order they were added.
    #[serde(default)]
    pub approvals: Vec<Approval>,
}

impl Default for ApprovalsFile {
    fn default() -> Self {
        Self {
            format: FORMAT.to_string(),
            approvals: Vec::new(),
        }
    }
}

impl ApprovalsFile {
    /// Parses an approvals document (`name` for messages).
    pub fn parse(name: &Path, text: &str) -> Result<Self, ApprovalError> {
        let invalid = |message: String| ApprovalError::Invalid {
            path: name.to_path_buf(),
            message,
        };
        if text.len() > MAX_FILE_BYTES {
            return Err(invalid(format!(
                "{} bytes, larger than the {MAX_FILE_BYTES} bytes an approvals file may have",
                text.len()
            )));
        }
        let file: Self = serde_json::from_str(text)
            .map_err(|e| invalid(format!("line {}, column {}: {e}", e.line(), e.column())))?;
        if file.format != FORMAT {
            return Err(invalid(format!(
                "format `{}` is not `{FORMAT}`",
                file.format
            )));
        }
        Ok(file)
    }

    /// Adds `approval`, replacing an earlier one by the same key.
    pub fn add(&mut self, approval: Approval) {
        self.approvals
            .retain(|a| a.public_key != approval.public_key);
        self.approvals.push(approval);
    }
}

/// Reads `path`'s approvals file; `None` when there is none.
pub fn load_file(policy: &Path) -> Result<Option<ApprovalsFile>, ApprovalError> {
    let path = approvals_path(policy);
    match std::fs::read_to_string(&path) {
        Ok(text) => ApprovalsFile::parse(&path, &text).map(Some),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(error) => Err(ApprovalError::Io { path, error }),
    }
}

/// Writes `file` as `policy`'s approvals file (durably: temp file, rename).
pub fn write_file(policy: &Path, file: &ApprovalsFile) -> Result<PathBuf, ApprovalError> {
    let path = approvals_path(policy);
    let mut text = serde_json::to_string_pretty(file)
        .map_err(|e| ApprovalError::Crypto(format!("serializing approvals: {e}")))?;
    text.push('\n');
    crate::atomic_file::write(&path, text.as_bytes()).map_err(|error| ApprovalError::Io {
        path: path.clone(),
        error,
    })?;
    Ok(path)
}

/// A new key pair: the private key as PKCS#8 PEM, and its public key.
pub fn generate() -> Result<(String, PublicKey), ApprovalError> {
    let rng = ring::rand::SystemRandom::new();
    let pkcs8 = Ed25519KeyPair::generate_pkcs8(&rng)
        .map_err(|_| ApprovalError::Crypto("generating an Ed25519 key failed".into()))?;
    let pair = Ed25519KeyPair::from_pkcs8(pkcs8.as_ref())
        .map_err(|e| ApprovalError::Crypto(format!("reading the new key: {e}")))?;
    let public = public_key_of(&pair);
    let b64 = base64::engine::general_purpose::STANDARD.encode(pkcs8.as_ref());
    let mut pem = String::from("-----BEGIN PRIVATE KEY-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        pem.push_str(&String::from_utf8_lossy(chunk));
        pem.push('\n');
    }
    pem.push_str("-----END PRIVATE KEY-----\n");
    Ok((pem, public))
}

/// The public key of a key pair.
pub fn public_key_of(pair: &Ed25519KeyPair) -> PublicKey {
    let mut key = [0u8; 32];
    key.copy_from_slice(pair.public_key().as_ref());
    PublicKey(key)
}

/// Reads a PKCS#8 Ed25519 private key (PEM, or DER).
pub fn load_signing_key(path: &Path) -> Result<Ed25519KeyPair, ApprovalError> {
    let bytes = std::fs::read(path).map_err(|error| ApprovalError::Io {
        path: path.to_path_buf(),
        error,
    })?;
    parse_signing_key(&bytes).map_err(|message| ApprovalError::Invalid {
        path: path.to_path_buf(),
        message,
    })
}

fn parse_signing_key(bytes: &[u8]) -> Result<Ed25519KeyPair, String> {
    let der = match std::str::from_utf8(bytes) {
        Ok(text) if text.contains("-----BEGIN") => {
            if !text.contains("-----BEGIN PRIVATE KEY-----") {
                return Err("expected a `BEGIN PRIVATE KEY` (PKCS#8) PEM block".into());
            }
            let body: String = text
                .lines()
                .skip_while(|l| !l.starts_with("-----BEGIN PRIVATE KEY-----"))
                .skip(1)
                .take_while(|l| !l.starts_with("-----END"))
                .map(str::trim)
                .collect();
            base64::engine::general_purpose::STANDARD
                .decode(body)
                .map_err(|e| format!("PEM body is not base64: {e}"))?
        }
        _ => bytes.to_vec(),
    };
    // `maybe_unchecked` also takes PKCS#8 v1 (what openssl writes).
    Ed25519KeyPair::from_pkcs8_maybe_unchecked(&der)
        .map_err(|e| format!("not a PKCS#8 Ed25519 private key: {e}"))
}

/// Signs `content` as `approver`.
pub fn sign(pair: &Ed25519KeyPair, approver: &str, content: &[u8]) -> Approval {
    let sig = pair.sign(&message(content));
    Approval {
        approver: approver.to_string(),
        public_key: public_key_of(pair).to_string(),
        policy_sha256: content_sha256(content),
        signature: base64::engine::general_purpose::STANDARD.encode(sig.as_ref()),
        signed_at: humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
    }
}

/// An approval that does not count, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Refused {
    /// `approval 2 (claims bob)` or `approval 2 (bob)`.
    pub approval: String,
    /// Why it does not count.
    pub why: String,
}

/// The approvals of one content against one set of approvers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Verdict {
    /// Hex SHA-256 of the content checked.
    pub content_sha256: String,
    /// Distinct approvers needed.
    pub quorum: usize,
    /// Every approver's name.
    pub approvers: Vec<String>,
    /// Approvers with a valid signature over exactly this content.
    pub signed: Vec<String>,
    /// Approvers without one.
    pub missing: Vec<String>,
    /// Approvals that do not count.
    pub refused: Vec<Refused>,
}

impl Verdict {
    /// True when at least `quorum` distinct approvers signed.
    pub fn met(&self) -> bool {
        self.signed.len() >= self.quorum
    }

    /// One line: `2 of quorum 2 (3 approvers): signed by alice, bob; missing carol; refused: …`.
    pub fn summary(&self) -> String {
        let list = |v: &[String]| {
            if v.is_empty() {
                "nobody".to_string()
            } else {
                v.join(", ")
            }
        };
        let mut s = format!(
            "{} valid of quorum {} ({} approvers, content sha256 {}): signed by {}; missing {}",
            self.signed.len(),
            self.quorum,
            self.approvers.len(),
            self.content_sha256,
            list(&self.signed),
            list(&self.missing),
        );
        if !self.refused.is_empty() {
            s.push_str("; not counted: ");
            s.push_str(
                &self
                    .refused
                    .iter()
                    .map(|r| format!("{}: {}", r.approval, r.why))
                    .collect::<Vec<_>>()
                    .join("; "),
            );
        }
        s
    }
}

/// The decision-log record of a policy put in force with `verdict`
/// (`how`: `at start`, `by reload`).
pub fn record(policy_hash: &str, verdict: &Verdict, how: &str) -> crate::audit::Entry {
    let mut entry = crate::audit::Entry::new(crate::audit::kind::POLICY_APPROVED).note(format!(
        "policy {policy_hash} in force {how}; approvals: {}",
        verdict.summary()
    ));
    entry.policy_hash = Some(policy_hash.to_string());
    entry
}

/// Checks `file`'s approvals of `content` against `approvers`.
pub fn verify(approvers: &Approvers, content: &[u8], file: Option<&ApprovalsFile>) -> Verdict {
    let digest = content_sha256(content);
    let msg = message(content);
    let mut signed: Vec<String> = Vec::new();
    let mut refused = Vec::new();
    for (i, a) in file
        .map(|f| f.approvals.as_slice())
        .unwrap_or(&[])
        .iter()
        .enumerate()
    {
        let n = i + 1;
        let mut refuse = |approval: String, why: String| refused.push(Refused { approval, why });
        let claims = format!("approval {n} (claims `{}`)", a.approver);
        let key = match PublicKey::parse(&a.public_key) {
            Ok(k) => k,
            Err(e) => {
                refuse(claims, format!("public key unreadable: {e}"));
                continue;
            }
        };
        let Some((name, _)) = approvers.keys.iter().find(|(_, k)| **k == key) else {
            refuse(
                claims,
                format!("unknown key {key}: not an approver of this policy"),
            );
            continue;
        };
        let who = format!("approval {n} ({name})");
        let sig = match base64::engine::general_purpose::STANDARD.decode(&a.signature) {
            Ok(s) => s,
            Err(e) => {
                refuse(who, format!("signature is not base64: {e}"));
                continue;
            }
        };
        let ok = signature::UnparsedPublicKey::new(&signature::ED25519, &key.0)
            .verify(&msg, &sig)
            .is_ok();
        if !ok {
            let why = if a.policy_sha256 != digest {
                format!(
                    "approves other content (sha256 {}), not this file (sha256 {digest})",
                    a.policy_sha256
                )
            } else {
                "bad signature: does not verify over this content".to_string()
            };
            refuse(who, why);
            continue;
        }
        if signed.contains(name) {
            refuse(who, format!("{name} already approved: counts once"));
            continue;
        }
        signed.push(name.clone());
    }
    signed.sort();
    let missing = approvers
        .keys
        .keys()
        .filter(|n| !signed.contains(n))
        .cloned()
        .collect();
    Verdict {
        content_sha256: digest,
        quorum: approvers.quorum,
        approvers: approvers.keys.keys().cloned().collect(),
        signed,
        missing,
        refused,
    }
}

/// Checks a policy about to be used: `content` (the federation file's
/// bytes) must carry a quorum of `new`'s approvers when `new` requires
/// approvals, and of `current`'s (the policy in force, on a reload) when
/// that one requires them. Returns the verdict over `new`'s approvers (for
/// the log; `None` when `new` names none), or the refusal, naming who
/// signed and who is missing.
pub fn check(
    current: Option<&Approvers>,
    new: &Approvers,
    content: &[u8],
    file: Option<&ApprovalsFile>,
) -> Result<Option<Verdict>, String> {
    let mut problems = Vec::new();
    if let Some(cur) = current.filter(|c| c.required && *c != new) {
        let v = verify(cur, content, file);
        if !v.met() {
            problems.push(format!(
                "the policy in force requires approvals and this change lacks them: {}",
                v.summary()
            ));
        }
    }
    let verdict = (!new.keys.is_empty()).then(|| verify(new, content, file));
    if new.required || current.is_some_and(|c| c.required && c == new) {
        if let Some(v) = verdict.as_ref().filter(|v| !v.met()) {
            problems.push(format!("not enough approvals: {}", v.summary()));
        }
    }
    if problems.is_empty() {
        Ok(verdict)
    } else {
        Err(format!("policy approvals: {}", problems.join("; ")))
    }
}

/// [`check`] for a loaded federation file: also refuses, when approvals
/// are required, a `federation` section that a node file or environment
/// variable changed (the signed bytes would not be what runs). `approvals`
/// is the approvals file's text (`None`: read it beside `loaded`'s file).
pub fn check_loaded(
    current: Option<&crate::policy::Policy>,
    new: &crate::policy::Policy,
    loaded: &crate::config::Loaded,
    approvals: Option<&str>,
) -> Result<Option<Verdict>, String> {
    let cur = current.map(|p| &p.approvers);
    let required = new.approvers.required || cur.is_some_and(|c| c.required);
    if !required && new.approvers.keys.is_empty() {
        return Ok(None);
    }
    let file_name = loaded.source_map.file().to_path_buf();
    let file = match approvals {
        Some(text) if text.trim().is_empty() => None,
        Some(text) => Some(ApprovalsFile::parse(&approvals_path(&file_name), text)),
        None => load_file(&file_name).transpose(),
    };
    let file = match file.transpose() {
        Ok(f) => f,
        Err(e) if required => return Err(format!("policy approvals: {e}")),
        Err(e) => {
            tracing::warn!(error = %e, "policy approvals unreadable; not required");
            None
        }
    };
    if required {
        let alone = crate::config::load_from_text(&file_name, &loaded.text)
            .map_err(crate::policy::LoadError::from)
            .and_then(|l| crate::policy::Policy::from_loaded(&l));
        if alone.as_ref().ok().map(|p| &p.hash) != Some(&new.hash) {
            return Err(format!(
                "policy approvals: the federation section in force would differ from the signed file {}: a node file or FEDERATION__FEDERATION__… variable changes it; with approvals required, change the policy only in the signed file",
                file_name.display()
            ));
        }
    }
    check(cur, &new.approvers, loaded.text.as_bytes(), file.as_ref())
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Signer {
        name: &'static str,
        pair: Ed25519KeyPair,
    }

    fn signer(name: &'static str) -> Signer {
        let (pem, _) = generate().expect("generate");
        let pair = parse_signing_key(pem.as_bytes()).expect("parse");
        Signer { name, pair }
    }

    fn approvers(signers: &[&Signer], quorum: usize) -> Approvers {
        Approvers {
            keys: signers
                .iter()
                .map(|s| (s.name.to_string(), public_key_of(&s.pair)))
                .collect(),
            quorum,
            required: true,
        }
    }

    fn bundle(approvals: Vec<Approval>) -> ApprovalsFile {
        ApprovalsFile {
            approvals,
            ..Default::default()
        }
    }

    const POLICY: &[u8] = b"federation:\n  name: x\n";

    #[test]
    fn a_quorum_of_distinct_approvers_is_accepted() {
        let (a, b, c) = (signer("alice"), signer("bob"), signer("carol"));
        let set = approvers(&[&a, &b, &c], 2);
        let file = bundle(vec![
            sign(&a.pair, "alice", POLICY),
            sign(&b.pair, "bob", POLICY),
        ]);
        let v = check(None, &set, POLICY, Some(&file))
            .expect("quorum met")
            .expect("verdict");
        assert_eq!(v.signed, ["alice", "bob"]);
        assert_eq!(v.missing, ["carol"]);
        assert!(v.refused.is_empty(), "{v:?}");
    }

    #[test]
    fn a_bad_signature_does_not_count() {
        let (a, b) = (signer("alice"), signer("bob"));
        let set = approvers(&[&a, &b], 2);
        let mut forged = sign(&b.pair, "bob", POLICY);
        let mut sig = base64::engine::general_purpose::STANDARD
            .decode(&forged.signature)
            .expect("b64");
        sig[7] ^= 1;
        forged.signature = base64::engine::general_purpose::STANDARD.encode(sig);
        let file = bundle(vec![sign(&a.pair, "alice", POLICY), forged]);
        let err = check(None, &set, POLICY, Some(&file)).expect_err("refused");
        assert!(err.contains("signed by alice; missing bob"), "{err}");
        assert!(err.contains("approval 2 (bob): bad signature"), "{err}");
    }

    #[test]
    fn one_approver_signing_twice_counts_once() {
        let (a, b) = (signer("alice"), signer("bob"));
        let set = approvers(&[&a, &b], 2);
        // `add` replaces; a hand-made file may still hold two.
        let file = bundle(vec![
            sign(&a.pair, "alice", POLICY),
            sign(&a.pair, "alice-again", POLICY),
        ]);
        let err = check(None, &set, POLICY, Some(&file)).expect_err("refused");
        assert!(err.contains("1 valid of quorum 2"), "{err}");
        assert!(err.contains("alice already approved: counts once"), "{err}");
        assert!(err.contains("missing bob"), "{err}");
        let mut added = bundle(Vec::new());
        added.add(sign(&a.pair, "alice", POLICY));
        added.add(sign(&a.pair, "alice", POLICY));
        assert_eq!(added.approvals.len(), 1);
    }

    #[test]
    fn an_approval_over_other_content_does_not_count() {
        let (a, b) = (signer("alice"), signer("bob"));
        let set = approvers(&[&a, &b], 2);
        let other = b"federation:\n  name: y\n";
        let file = bundle(vec![
            sign(&a.pair, "alice", POLICY),
            sign(&b.pair, "bob", other),
        ]);
        let err = check(None, &set, POLICY, Some(&file)).expect_err("refused");
        assert!(
            err.contains("approval 2 (bob): approves other content"),
            "{err}"
        );
        // The same signature with the digest field edited is still refused.
        let mut lying = sign(&b.pair, "bob", other);
        lying.policy_sha256 = content_sha256(POLICY);
        let file = bundle(vec![sign(&a.pair, "alice", POLICY), lying]);
        let err = check(None, &set, POLICY, Some(&file)).expect_err("refused");
        assert!(err.contains("approval 2 (bob): bad signature"), "{err}");
    }

    #[test]
    fn an_unknown_key_does_not_count() {
        let (a, b, mallory) = (signer("alice"), signer("bob"), signer("mallory"));
        let set = approvers(&[&a, &b], 2);
        let file = bundle(vec![
            sign(&a.pair, "alice", POLICY),
            sign(&mallory.pair, "bob", POLICY),
        ]);
        let err = check(None, &set, POLICY, Some(&file)).expect_err("refused");
        assert!(
            err.contains("approval 2 (claims `bob`): unknown key ed25519:"),
            "{err}"
        );
        assert!(err.contains("missing bob"), "{err}");
    }

    #[test]
    fn changing_the_approvers_needs_the_current_quorum() {
        let (a, b, m) = (signer("alice"), signer("bob"), signer("mallory"));
        let current = approvers(&[&a, &b], 2);
        // A new file naming only mallory, signed by mallory.
        let new = approvers(&[&m], 1);
        let file = bundle(vec![sign(&m.pair, "mallory", POLICY)]);
        let err = check(Some(&current), &new, POLICY, Some(&file)).expect_err("refused");
        assert!(
            err.contains("the policy in force requires approvals"),
            "{err}"
        );
        // Turning approvals off is a change like any other.
        let off = Approvers::default();
        let err = check(Some(&current), &off, POLICY, None).expect_err("refused");
        assert!(err.contains("missing alice, bob"), "{err}");
        // With the current quorum it goes through.
        let file = bundle(vec![
            sign(&a.pair, "alice", POLICY),
            sign(&b.pair, "bob", POLICY),
            sign(&m.pair, "mallory", POLICY),
        ]);
        check(Some(&current), &new, POLICY, Some(&file)).expect("approved");
    }

    #[test]
    fn keys_round_trip_and_bad_ones_are_named() {
        let (pem, public) = generate().expect("generate");
        let pair = parse_signing_key(pem.as_bytes()).expect("parse");
        assert_eq!(public_key_of(&pair), public);
        assert_eq!(PublicKey::parse(&public.to_string()), Ok(public));
        assert!(
            PublicKey::parse("ed25519:AAAA")
                .expect_err("short")
                .contains("3 bytes")
        );
        assert!(
            PublicKey::parse("rsa:AAAA")
                .expect_err("prefix")
                .contains("ed25519:")
        );
        assert!(parse_signing_key(b"-----BEGIN CERTIFICATE-----\nAA\n").is_err());
        let err = ApprovalsFile::parse(Path::new("x.approvals"), "{\"format\":\"v0\"}")
            .expect_err("format");
        assert!(
            err.to_string().contains("x.approvals: format `v0`"),
            "{err}"
        );
    }

    #[test]
    fn a_bad_approvers_section_names_its_position() {
        let seed = federation_sandbox::SEED_POLICY;
        let text = seed.replace(
            "  data_synchronization:",
            "  policy:\n    approvers:\n      alice: \"ed25519:AAAA\"\n    quorum: 3\n    require_approvals: true\n  data_synchronization:",
        );
        let loaded = crate::config::load_from_text(Path::new("f.yaml"), &text).expect("parses");
        let err = crate::policy::Policy::from_loaded(&loaded)
            .expect_err("invalid")
            .to_string();
        assert!(
            err.contains("f.yaml:26:")
                && err.contains("federation.policy.approvers.alice: 3 bytes"),
            "{err}"
        );
        assert!(err.contains("federation.policy.quorum: quorum 3 must be between 1 and the number of approvers (1)"), "{err}");
        // Unset, the policy hash is what it always was.
        let plain = crate::config::load_from_text(Path::new("f.yaml"), seed).expect("parses");
        let with_empty = seed.replace(
            "  data_synchronization:",
            "  policy: {}\n  data_synchronization:",
        );
        let empty =
            crate::config::load_from_text(Path::new("f.yaml"), &with_empty).expect("parses");
        let (a, b) = (
            crate::policy::Policy::from_loaded(&plain).expect("ok"),
            crate::policy::Policy::from_loaded(&empty).expect("ok"),
        );
        assert_eq!(a.approvers, Approvers::default());
        assert_ne!(a.hash, b.hash, "a policy section is part of the policy");
    }

    #[test]
    fn an_override_of_the_signed_federation_section_is_refused() {
        let (a, b) = (signer("alice"), signer("bob"));
        let seed = federation_sandbox::SEED_POLICY;
        let text = seed.replace(
            "  data_synchronization:",
            &format!(
                "  policy:\n    approvers:\n      alice: \"{}\"\n      bob: \"{}\"\n    require_approvals: true\n  data_synchronization:",
                public_key_of(&a.pair),
                public_key_of(&b.pair)
            ),
        );
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("f.yaml");
        std::fs::write(&path, &text).expect("write");
        let file = bundle(vec![
            sign(&a.pair, "alice", text.as_bytes()),
            sign(&b.pair, "bob", text.as_bytes()),
        ]);
        write_file(&path, &file).expect("approvals");
        let load = |env: &[(&str, &str)]| {
            let loaded = crate::config::load(&crate::config::Sources {
                federation_file: path.clone(),
                node_file: None,
                env: Some(
                    env.iter()
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .collect(),
                ),
            })
            .expect("loads");
            let policy = crate::policy::Policy::from_loaded(&loaded).expect("valid");
            check_loaded(None, &policy, &loaded, None)
        };
        let v = load(&[("FEDERATION__NODE__REGION", "europe")]).expect("node overrides are fine");
        assert_eq!(v.expect("verdict").signed, ["alice", "bob"]);
        let err = load(&[(
            "FEDERATION__FEDERATION__DATA_SYNCHRONIZATION__COMPRESSION_LEVEL",
            "9",
        )])
        .expect_err("a policy override");
        assert!(err.contains("would differ from the signed file"), "{err}");
    }
}
