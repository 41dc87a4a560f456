//! Who approves a policy, as the policy file names them (`federation.policy`):
//! the approvers' Ed25519 public keys and the quorum. Pure data; signing,
//! approval files and verification are `crate::approvals`.

use std::collections::BTreeMap;

use base64::Engine as _;

/// How a public key is written: `ed25519:<base64 of 32 bytes>`.
pub const KEY_PREFIX: &str = "ed25519:";

/// An Ed25519 public key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct PublicKey(pub [u8; 32]);

impl PublicKey {
    /// Parses `ed25519:<base64 of 32 bytes>`.
    pub fn parse(text: &str) -> Result<Self, String> {
        let b64 = text.trim().strip_prefix(KEY_PREFIX).ok_or_else(|| {
            format!(
                "expected `{KEY_PREFIX}<base64 of 32 bytes>` (federation policy keygen prints it)"
            )
        })?;
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(b64)
            .map_err(|e| format!("not base64: {e}"))?;
        let key: [u8; 32] = bytes
            .try_into()
            .map_err(|b: Vec<u8>| format!("{} bytes, an Ed25519 key has 32", b.len()))?;
        Ok(Self(key))
    }
}

impl std::fmt::Display for PublicKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{KEY_PREFIX}{}",
            base64::engine::general_purpose::STANDARD.encode(self.0)
        )
    }
}

/// Who approves a policy: from `federation.policy`, validated.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Approvers {
    /// Approver name → key, sorted by name.
    pub keys: BTreeMap<String, PublicKey>,
    /// Distinct approvers needed.
    pub quorum: usize,
    /// `serve` and reloads refuse a policy without the quorum.
    pub required: bool,
}
