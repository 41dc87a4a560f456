//! Replacing the policy in force: from the federation file (SIGHUP, the
//! file poll, an empty `ReloadPolicy`) or from a client's text; validated,
//! approvals checked (the policy in force's quorum and the new one's),
//! audited, recorded in the decision log whether applied or refused. The old
//! policy stays on any error.

use std::path::PathBuf;
use std::sync::Arc;

use federation_api as api;

use crate::audit::DecisionLog;
use crate::cluster::Cluster;
use crate::policy::Policy;

/// Reloads the policy of one controller.
#[derive(Debug)]
pub struct Reloader {
    cluster: Arc<Cluster>,
    log: DecisionLog,
    config_path: PathBuf,
}

impl Reloader {
    /// Reloads into `cluster` (the policy in force and the peer table),
    /// recording in `log`; `config_path` is the federation file.
    pub fn new(cluster: Arc<Cluster>, log: DecisionLog, config_path: PathBuf) -> Self {
        Self {
            cluster,
            log,
            config_path,
        }
    }

    /// The federation file.
    pub fn config_path(&self) -> &std::path::Path {
        &self.config_path
    }

    /// Validates and applies a new policy; the old one stays on any error.
    pub async fn reload(
        &self,
        source: &str,
        format: &str,
        name: &str,
    ) -> api::ReloadPolicyResponse {
        self.reload_with(source, format, name, "").await
    }

    /// [`reload`] with the approvals of `source` (an approvals file's text;
    /// ignored when `source` is empty: the file's own are read beside it).
    pub async fn reload_with(
        &self,
        source: &str,
        format: &str,
        name: &str,
        approvals: &str,
    ) -> api::ReloadPolicyResponse {
        let response = self.try_reload(source, format, name, approvals).await;
        if !response.applied {
            let mut entry =
                crate::audit::Entry::new(crate::audit::kind::POLICY_RELOAD).note(format!(
                    "refused, policy {} stays in force: {}",
                    response.policy_hash, response.error
                ));
            entry.policy_hash = Some(response.policy_hash.clone());
            if let Err(e) = self.log.append(entry).await {
                tracing::error!(error = %e, "appending to the decision log failed");
            }
        }
        response
    }

    async fn try_reload(
        &self,
        source: &str,
        format: &str,
        name: &str,
        approvals: &str,
    ) -> api::ReloadPolicyResponse {
        let old = self.cluster.policy();
        let approvals = (!source.is_empty()).then_some(approvals);
        let refused = refused_response;
        let loaded = if source.is_empty() {
            crate::config::load(&crate::config::Sources {
                federation_file: self.config_path.clone(),
                node_file: None,
                env: None,
            })
        } else {
            let ext = match format {
                "" | "yaml" | "yml" => "yaml",
                "json" => "json",
                "toml" => "toml",
                other => {
                    return refused(
                        &old,
                        format!("unknown format `{other}` (yaml, json or toml)"),
                    );
                }
            };
            let name = reload_name(name, ext);
            crate::config::load_from_text(std::path::Path::new(&name), source)
        };
        let loaded = match loaded {
            Ok(l) => l,
            Err(e) => return refused(&old, e.to_string()),
        };
        let policy = match Policy::from_loaded(&loaded) {
            Ok(p) => p,
            Err(e) => return refused(&old, e.to_string()),
        };
        let verdict = match crate::approvals::check_loaded(Some(&old), &policy, &loaded, approvals)
        {
            Ok(v) => v,
            Err(e) => return refused(&old, e),
        };
        if policy.region(self.cluster.region()).is_none() {
            return refused(
                &old,
                format!(
                    "the new policy does not contain this region `{}`",
                    self.cluster.region()
                ),
            );
        }
        // Audit before applying: the findings are returned and logged. Only a
        // policy that fails validation is refused; audit *errors* (for example a
        // backup that can never be used because the rule requires a tag it
        // lacks) describe a stricter policy, not a broken one.
        let report = crate::policy::analysis::check(&policy);
        let findings: Vec<String> = report
            .findings
            .iter()
            .map(|f| match &f.rule {
                Some(rule) => format!(
                    "{}: [{}] {rule}: {}",
                    f.severity.as_str(),
                    f.kind,
                    f.message
                ),
                None => format!("{}: [{}] {}", f.severity.as_str(), f.kind, f.message),
            })
            .collect();
        let hash = policy.hash.clone();
        self.cluster.set_policy(policy);
        tracing::info!(old = %old.hash, new = %hash, findings = findings.len(), "policy reloaded");
        let mut entry = crate::audit::Entry::new(crate::audit::kind::POLICY_RELOAD).note(format!(
            "applied: policy {} replaced {}; audit: {}",
            hash,
            old.hash,
            if findings.is_empty() {
                "no findings".to_string()
            } else {
                findings.join(" | ")
            }
        ));
        entry.policy_hash = Some(hash.clone());
        if let Err(e) = self.log.append(entry).await {
            tracing::error!(error = %e, "appending to the decision log failed");
        }
        if let Some(v) = &verdict {
            tracing::info!(policy_hash = %hash, signed = %v.signed.join(","), missing = %v.missing.join(","), "policy approvals verified");
            if let Err(e) = self
                .log
                .append(crate::approvals::record(&hash, v, "by reload"))
                .await
            {
                tracing::error!(error = %e, "appending to the decision log failed");
            }
        }
        api::ReloadPolicyResponse {
            applied: true,
            policy_hash: hash,
            findings,
            error: String::new(),
        }
    }

    /// Re-reads the federation file (and its approvals file) every `every` and
    /// reloads the policy when their bytes changed (a mounted ConfigMap is replaced atomically, so a read
    /// sees the old or the new file whole). A refused policy is logged once per
    /// content; the old one keeps routing. Ends at shutdown.
    pub async fn poll_loop(
        self: Arc<Self>,
        every: std::time::Duration,
        mut stop: tokio::sync::watch::Receiver<bool>,
    ) {
        let path = self.config_path.clone();
        // The approvals file too: approvals added after the file changed (the
        // usual order) must trigger the reload the file change could not.
        let approvals = crate::approvals::approvals_path(&path);
        let mut seen_approvals = tokio::fs::read(&approvals).await.ok();
        let mut seen = tokio::fs::read(&path).await.ok();
        // The file may have changed between the start-up load and that read:
        // compare what it holds now with the policy in force, once.
        let on_disk = crate::config::load(&crate::config::Sources {
            federation_file: path.clone(),
            node_file: None,
            env: None,
        })
        .map_err(crate::policy::LoadError::from)
        .and_then(|l| Policy::from_loaded(&l));
        let mut changed = match on_disk {
            Ok(p) => p.hash != self.cluster.policy().hash,
            Err(_) => false,
        };
        let mut ticker = tokio::time::interval(every);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ticker.tick().await;
        loop {
            if std::mem::take(&mut changed) {
                self.reload_changed(&path).await;
            }
            tokio::select! {
                _ = ticker.tick() => {}
                _ = stop.wait_for(|s| *s) => return,
            }
            let now = match tokio::fs::read(&path).await {
                Ok(bytes) => bytes,
                Err(e) => {
                    tracing::debug!(path = %path.display(), error = %e, "policy poll: file unreadable; keeping the policy");
                    continue;
                }
            };
            let now_approvals = tokio::fs::read(&approvals).await.ok();
            if seen.as_deref() == Some(now.as_slice()) && seen_approvals == now_approvals {
                continue;
            }
            seen = Some(now);
            seen_approvals = now_approvals;
            changed = true;
        }
    }

    async fn reload_changed(&self, path: &std::path::Path) {
        let r = self.reload("", "", "").await;
        if r.applied {
            tracing::info!(path = %path.display(), policy_hash = %r.policy_hash, "federation file changed: policy reloaded");
        } else {
            tracing::warn!(path = %path.display(), error = %r.error, "federation file changed: reload refused; old policy kept");
        }
    }
}

/// The name reload errors are reported against: the client's file name
/// (printable, at most 256 bytes, its extension naming the format), else
/// `reload.<ext>`.
fn reload_name(name: &str, ext: &str) -> String {
    // The loader picks the syntax by extension: keep the name only when it
    // picks the format the client said.
    let by_extension = match std::path::Path::new(name)
        .extension()
        .and_then(|e| e.to_str())
    {
        Some("json") => "json",
        Some("toml") => "toml",
        _ => "yaml",
    };
    let ok = !name.is_empty()
        && name.len() <= 256
        && !name.chars().any(char::is_control)
        && by_extension == ext;
    if ok {
        name.to_string()
    } else {
        format!("reload.{ext}")
    }
}

fn refused_response(old: &Policy, error: String) -> api::ReloadPolicyResponse {
    tracing::warn!(%error, "policy reload refused; the old policy stays in force");
    api::ReloadPolicyResponse {
        applied: false,
        policy_hash: old.hash.clone(),
        findings: Vec::new(),
        error,
    }
}
