//! `federation policy keygen|sign` and the approvals lines of `policy
//! check`: making approver keys and adding approvals to a policy bundle
//! (the federation file plus `FILE.approvals`). The format and the checks
//! are [`crate::approvals`]'.

use std::path::Path;

use anyhow::{Context as _, bail};

use crate::approvals::{self, Verdict};
use crate::policy::Policy;

/// `policy keygen NAME --out DIR`: writes `DIR/NAME.key` (PKCS#8 PEM,
/// owner-only) and `DIR/NAME.pub`; returns what to print.
pub fn keygen(name: &str, out: &Path) -> anyhow::Result<String> {
    if name.is_empty()
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    {
        bail!("approver name `{name}`: use letters, digits, `-`, `_` or `.`");
    }
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let key_path = out.join(format!("{name}.key"));
    let pub_path = out.join(format!("{name}.pub"));
    if key_path.exists() {
        bail!(
            "{} exists: not overwriting a private key",
            key_path.display()
        );
    }
    let (pem, public) = approvals::generate()?;
    federation_tls::dev::write_file(&key_path, &pem, true)
        .with_context(|| format!("writing {}", key_path.display()))?;
    federation_tls::dev::write_file(&pub_path, &format!("{public}\n"), false)
        .with_context(|| format!("writing {}", pub_path.display()))?;
    Ok(format!(
        "wrote {} (private, keep it) and {}\nadd to the federation file:\n  policy:\n    approvers:\n      {name}: \"{public}\"\n",
        key_path.display(),
        pub_path.display()
    ))
}

/// `policy sign FILE --key KEY [--name NAME]`: adds (or replaces) this
/// key's approval of FILE's exact bytes in `FILE.approvals`; returns what
/// to print. The file must be a usable policy.
pub fn sign(file: &Path, key: &Path, name: Option<&str>) -> anyhow::Result<String> {
    let policy = Policy::load_file(file)
        .map_err(|e| anyhow::anyhow!("{}: policy cannot be used:\n{e}", file.display()))?;
    let content = std::fs::read(file).with_context(|| format!("reading {}", file.display()))?;
    let pair = approvals::load_signing_key(key)?;
    let public = approvals::public_key_of(&pair);
    let listed = policy
        .approvers
        .keys
        .iter()
        .find(|(_, k)| **k == public)
        .map(|(n, _)| n.clone());
    let stem = key
        .file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or("approver")
        .to_string();
    let approver = name.map(str::to_string).or(listed.clone()).unwrap_or(stem);
    let mut bundle = approvals::load_file(file)?.unwrap_or_default();
    bundle.add(approvals::sign(&pair, &approver, &content));
    let written = approvals::write_file(file, &bundle)?;
    let mut out = format!(
        "{approver} approved {} (sha256 {}) in {}\n",
        file.display(),
        approvals::content_sha256(&content),
        written.display()
    );
    if listed.is_none() {
        out.push_str(&format!(
            "warning: key {public} is not an approver named in {} (federation.policy.approvers): it will not count\n",
            file.display()
        ));
    }
    if !policy.approvers.keys.is_empty() {
        let v = approvals::verify(&policy.approvers, &content, Some(&bundle));
        out.push_str(&format!("approvals now: {}\n", v.summary()));
    }
    Ok(out)
}

/// The approvals of `file` against `policy`'s approvers (`None` when it
/// names none).
pub fn verdict(file: &Path, policy: &Policy) -> anyhow::Result<Option<Verdict>> {
    if policy.approvers.keys.is_empty() {
        return Ok(None);
    }
    let content = std::fs::read(file).with_context(|| format!("reading {}", file.display()))?;
    let bundle = approvals::load_file(file)?;
    Ok(Some(approvals::verify(
        &policy.approvers,
        &content,
        bundle.as_ref(),
    )))
}

/// `policy check`'s text lines for `v`.
pub fn lines(file: &Path, policy: &Policy, v: &Verdict) -> Vec<String> {
    let mut out = vec![format!(
        "approvals ({}): {} of quorum {} valid{}; content sha256 {}",
        approvals::approvals_path(file).display(),
        v.signed.len(),
        v.quorum,
        if policy.approvers.required {
            if v.met() {
                ", required: met"
            } else {
                ", required: NOT MET (serve and reload refuse this file)"
            }
        } else {
            " (not required)"
        },
        v.content_sha256
    )];
    out.push(format!(
        "    signed by: {}",
        if v.signed.is_empty() {
            "nobody".to_string()
        } else {
            v.signed.join(", ")
        }
    ));
    out.push(format!(
        "    missing: {}",
        if v.missing.is_empty() {
            "nobody".to_string()
        } else {
            v.missing.join(", ")
        }
    ));
    for r in &v.refused {
        out.push(format!("    not counted: {}: {}", r.approval, r.why));
    }
    out
}
