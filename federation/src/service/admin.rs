//! `FederationAdmin`: federation status, policy reload, drain.

use std::sync::Arc;
use std::time::Instant;

use federation_api as api;
use tonic::{Request, Response, Status};

use crate::controller::Node;
use crate::error::Error;
use crate::policy::{Health, Policy};

/// The admin service.
#[derive(Debug)]
pub struct AdminService {
    node: Arc<Node>,
}

impl AdminService {
    /// A service over `node`.
    pub fn new(node: Arc<Node>) -> Self {
        Self { node }
    }
}

fn health_name(h: Health) -> &'static str {
    match h {
        Health::Alive => "alive",
        Health::Suspect => "suspect",
        Health::Dead => "dead",
        Health::Unknown => "unknown",
    }
}

/// The status as this controller sees it (also used by the status page),
/// one row per region in `priority` order.
pub fn status(node: &Node) -> api::FederationStatusResponse {
    let policy = node.policy();
    let now = Instant::now();
    let mut rows = Vec::new();
    let own = node.current_advertisement();
    let (undecodable, undecodable_ids) = node.store.undecodable();
    // Regions in priority order (lower first, unset last), then by name.
    for region in policy.regions_by_priority() {
        if region.name == node.region {
            rows.push(api::RegionStatus {
                region: region.name.clone(),
                state: "self".into(),
                compliance_tags: own.compliance_tags.clone(),
                capacity: own.capacity,
                epoch: own.epoch,
                sequence: own.sequence,
                policy_hash: own.policy_hash.clone(),
                policy_mismatch: false,
                last_advertisement_age_ms: 0,
                draining: own.draining,
                endpoint: own.endpoint.clone(),
                phi: 0.0,
                state_age_ms: -1,
                hold_down_remaining_ms: 0,
                log_head: node
                    .store
                    .log_head()
                    .ok()
                    .flatten()
                    .map(|(seq, hash)| api::LogHead { seq, hash }),
                log_head_problem: String::new(),
                snapshot_problem: String::new(),
                store_undecodable_records: undecodable as u64,
                store_undecodable: undecodable_ids
                    .iter()
                    .map(|(id, why)| format!("{id}: {why}"))
                    .collect(),
            });
            continue;
        }
        let row = node
            .membership
            .status(now)
            .into_iter()
            .find(|p| p.region == region.name);
        let Some(p) = row else { continue };
        let ad = p.ad.clone().unwrap_or_default();
        // Only tags the policy grants and the region claims are trusted.
        let tags: Vec<String> = ad
            .compliance_tags
            .iter()
            .filter(|t| region.tags.contains(*t))
            .cloned()
            .collect();
        rows.push(api::RegionStatus {
            region: region.name.clone(),
            state: health_name(p.health).into(),
            compliance_tags: tags,
            capacity: ad.capacity,
            epoch: ad.epoch,
            sequence: ad.sequence,
            policy_mismatch: p.ad.is_some() && ad.policy_hash != policy.hash,
            policy_hash: ad.policy_hash,
            last_advertisement_age_ms: p.age.map(|a| a.as_millis() as i64).unwrap_or(-1),
            draining: ad.draining,
            endpoint: node.endpoint_of(&region.name).unwrap_or_default(),
            phi: if p.phi.is_finite() { p.phi } else { -1.0 },
            state_age_ms: p.health_age.map_or(-1, |a| a.as_millis() as i64),
            hold_down_remaining_ms: p.hold_down_left.map_or(0, |a| a.as_millis() as i64),
            log_head: node.witnesses.of(&region.name).map(|w| api::LogHead {
                seq: w.seq,
                hash: w.hash,
            }),
            log_head_problem: node.witnesses.problem(&region.name).unwrap_or_default(),
            snapshot_problem: node
                .replication
                .receiver
                .problem(&region.name)
                .unwrap_or_default(),
            ..Default::default()
        });
    }
    api::FederationStatusResponse {
        self_region: node.region.clone(),
        federation: policy.federation.clone(),
        regions: rows,
        policy_hash: policy.hash.clone(),
        epoch: node.epoch,
    }
}

/// Validates and applies a new policy; the old one stays on any error.
pub async fn reload(
    node: &Node,
    source: &str,
    format: &str,
    name: &str,
) -> api::ReloadPolicyResponse {
    reload_with(node, source, format, name, "").await
}

/// [`reload`] with the approvals of `source` (an approvals file's text;
/// ignored when `source` is empty: the file's own are read beside it).
pub async fn reload_with(
    node: &Node,
    source: &str,
    format: &str,
    name: &str,
    approvals: &str,
) -> api::ReloadPolicyResponse {
    let response = try_reload(node, source, format, name, approvals).await;
    if !response.applied {
        let mut entry = crate::audit::Entry::new(crate::audit::kind::POLICY_RELOAD).note(format!(
            "refused, policy {} stays in force: {}",
            response.policy_hash, response.error
        ));
        entry.policy_hash = Some(response.policy_hash.clone());
        if let Err(e) = node.log.append(entry).await {
            tracing::error!(error = %e, "appending to the decision log failed");
        }
    }
    response
}

async fn try_reload(
    node: &Node,
    source: &str,
    format: &str,
    name: &str,
    approvals: &str,
) -> api::ReloadPolicyResponse {
    let old = node.policy();
    let approvals = (!source.is_empty()).then_some(approvals);
    let refused = refused_response;
    let loaded = if source.is_empty() {
        crate::config::load(&crate::config::Sources {
            federation_file: node.config_path.clone(),
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
    let verdict = match crate::approvals::check_loaded(Some(&old), &policy, &loaded, approvals) {
        Ok(v) => v,
        Err(e) => return refused(&old, e),
    };
    if policy.region(&node.region).is_none() {
        return refused(
            &old,
            format!(
                "the new policy does not contain this region `{}`",
                node.region
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
    node.set_policy(policy);
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
    if let Err(e) = node.log.append(entry).await {
        tracing::error!(error = %e, "appending to the decision log failed");
    }
    if let Some(v) = &verdict {
        tracing::info!(policy_hash = %hash, signed = %v.signed.join(","), missing = %v.missing.join(","), "policy approvals verified");
        if let Err(e) = node
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

#[tonic::async_trait]
impl api::federation_admin_server::FederationAdmin for AdminService {
    async fn federation_status(
        &self,
        _request: Request<api::FederationStatusRequest>,
    ) -> Result<Response<api::FederationStatusResponse>, Status> {
        Ok(Response::new(status(&self.node)))
    }

    async fn reload_policy(
        &self,
        request: Request<api::ReloadPolicyRequest>,
    ) -> Result<Response<api::ReloadPolicyResponse>, Status> {
        let req = request.into_inner();
        if req.policy_source.len() + req.approvals.len() > self.node.limits.max_message_bytes {
            return Err(Error::limit("policy_source", "larger than the message limit").into());
        }
        Ok(Response::new(
            reload_with(
                &self.node,
                &req.policy_source,
                &req.format,
                &req.source_name,
                &req.approvals,
            )
            .await,
        ))
    }

    async fn drain(
        &self,
        request: Request<api::DrainRequest>,
    ) -> Result<Response<api::DrainResponse>, Status> {
        let req = request.into_inner();
        self.node.set_draining(req.drain);
        tracing::info!(draining = req.drain, "drain state changed");
        let counts = self.node.store.counts();
        Ok(Response::new(api::DrainResponse {
            draining: req.drain,
            queued: counts.queued,
            leased: counts.leased,
            empty: req.drain && counts.leased == 0,
        }))
    }

    async fn list_decisions(
        &self,
        request: Request<api::ListDecisionsRequest>,
    ) -> Result<Response<api::ListDecisionsResponse>, Status> {
        let req = request.into_inner();
        let filter = decisions_filter(&req)?;
        let limit = match req.limit {
            0 => 100,
            n if n > MAX_DECISIONS => {
                return Err(Error::limit(
                    "limit",
                    format!("at most {MAX_DECISIONS} records per call"),
                )
                .into());
            }
            n => n as usize,
        };
        let log = self.node.log.clone();
        // Reading the log's end is I/O (the file or the database): off the
        // async workers. Only the lines read are hashed, not the whole log.
        let read = tokio::task::spawn_blocking(move || log.list(&filter, limit, LIST_TAIL_BYTES))
            .await
            .map_err(|e| Status::internal(format!("reading the decision log: {e}")))?;
        let listed =
            read.map_err(|e| Status::internal(format!("reading the decision log: {e}")))?;
        let records = listed
            .records
            .iter()
            .map(serde_json::to_string)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| Status::internal(format!("encoding a record: {e}")))?;
        Ok(Response::new(api::ListDecisionsResponse {
            matched: records.len() as u64,
            records,
            chain_intact: listed.broken.is_none(),
            chain_error: listed.broken.unwrap_or_default(),
            total_records: listed.head.0,
            last_hash: listed.head.1,
        }))
    }
}

/// Most bytes of the log `ListDecisions` reads back from its end.
const LIST_TAIL_BYTES: u64 = 64 * 1024 * 1024;

/// Most records one `ListDecisions` call returns.
const MAX_DECISIONS: u32 = 1000;

/// The audit filter of a `ListDecisions` request, validated.
pub(crate) fn decisions_filter(
    req: &api::ListDecisionsRequest,
) -> Result<crate::audit::Filter, Status> {
    let outcome = match req.outcome.as_str() {
        "" => None,
        o @ ("routed" | "failover" | "rejected") => Some(o.to_string()),
        other => {
            return Err(Error::invalid(
                "outcome",
                format!(
                    "`{}`: expected routed, failover or rejected",
                    crate::wire::truncate(other, 32)
                ),
            )
            .into());
        }
    };
    if !req.task_id.is_empty() {
        crate::wire::check_task_id(&req.task_id)?;
    }
    let nonempty = |s: &str| (!s.is_empty()).then(|| s.to_string());
    Ok(crate::audit::Filter {
        task_id: nonempty(&req.task_id),
        rule: (req.rule > 0).then_some(u64::from(req.rule)),
        region: nonempty(&req.region),
        outcome,
    })
}
