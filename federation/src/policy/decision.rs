//! The routing decision: which rule matched, each candidate region's verdict,
//! and the outcome. Pure: it reads a [`FederationView`] and never does I/O, so
//! the CLI's `policy explain`, the `ExplainRoute` RPC and the live router all
//! make the same decision from the same inputs.

use std::collections::BTreeSet;

use serde::Serialize;

use super::balance::{BalanceNote, Load};
use super::{Attributes, Policy, RuleMatch, balance};

/// Liveness of a region as the membership sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Health {
    /// Advertising on time (or this controller's own region).
    Alive,
    /// Late: still tried, but noted.
    Suspect,
    /// Missed advertisements past the failure threshold: skipped.
    Dead,
    /// Never heard from: skipped like a dead region.
    Unknown,
}

/// What routing needs to know of one region right now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegionView {
    /// Liveness.
    pub health: Health,
    /// Draining: takes no new tasks.
    pub draining: bool,
    /// Queue at its limit.
    pub full: bool,
    /// Came back recently and is still in its failback hold-down.
    pub held_down: bool,
    /// The tags the region may be trusted to hold (attested when TLS is on).
    pub tags: std::sync::Arc<BTreeSet<String>>,
    /// Its advertised capacity (at most about two heartbeats old for a
    /// peer); `None` when it advertised none.
    pub load: Option<Load>,
}

/// The federation as routing sees it.
pub trait FederationView {
    /// The region's current view; `None` for a region this controller does
    /// not know (it is refused, never guessed).
    fn region(&self, name: &str) -> Option<RegionView>;

    /// Calls `f` with the view of each region at `ids` (positions in
    /// `policy.regions`, as [`Rule::candidate_ids`](super::Rule::candidate_ids)
    /// holds them), in order: what [`decide`] reads, in one call, so a view
    /// can look its regions up by index, take a lock once and lend views
    /// it holds rather than build them. The default asks
    /// [`FederationView::region`] by name; an override must give the same
    /// answers.
    fn visit_regions(
        &self,
        policy: &Policy,
        ids: &[usize],
        f: &mut dyn FnMut(Option<&RegionView>),
    ) {
        for &id in ids {
            let v = policy.regions.get(id).and_then(|r| self.region(&r.name));
            f(v.as_ref());
        }
    }
}

/// A view where every configured region is alive with its configured tags:
/// the static audit's and `policy explain`'s starting point.
#[derive(Debug, Clone, Default)]
pub struct StaticView {
    /// Regions to treat as dead.
    pub down: BTreeSet<String>,
    /// Regions to treat as full.
    pub full: BTreeSet<String>,
    /// Regions to treat as draining.
    pub draining: BTreeSet<String>,
    /// Capacities to assume (regions not listed advertise none).
    pub loads: std::collections::BTreeMap<String, Load>,
}

/// [`StaticView`] bound to a policy's regions.
#[derive(Debug)]
pub struct BoundStaticView<'a> {
    policy: &'a Policy,
    /// The view of each region of `policy`, by position.
    views: Vec<RegionView>,
}

impl StaticView {
    /// Binds the what-if sets to a policy's configured regions and tags
    /// (each region's view built here once; decisions borrow them).
    pub fn bind<'a>(&'a self, policy: &'a Policy) -> BoundStaticView<'a> {
        let views = policy
            .regions
            .iter()
            .map(|r| {
                let name = r.name.as_str();
                RegionView {
                    health: if self.down.contains(name) {
                        Health::Dead
                    } else {
                        Health::Alive
                    },
                    draining: self.draining.contains(name),
                    full: self.full.contains(name),
                    held_down: false,
                    tags: r.shared_tags.clone(),
                    load: self.loads.get(name).copied(),
                }
            })
            .collect();
        BoundStaticView { policy, views }
    }
}

impl FederationView for BoundStaticView<'_> {
    fn region(&self, name: &str) -> Option<RegionView> {
        let id = self.policy.regions.iter().position(|r| r.name == name)?;
        self.views.get(id).cloned()
    }

    fn visit_regions(
        &self,
        policy: &Policy,
        ids: &[usize],
        f: &mut dyn FnMut(Option<&RegionView>),
    ) {
        let same = std::ptr::eq(policy, self.policy);
        for &id in ids {
            if same {
                f(self.views.get(id));
            } else {
                // Bound to another policy: its positions mean nothing here.
                let v = policy.regions.get(id).and_then(|r| self.region(&r.name));
                f(v.as_ref());
            }
        }
    }
}

/// A candidate's role in its rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// The rule's primary region.
    Primary,
    /// One of the rule's ordered backups.
    Backup,
}

/// Why a candidate was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Refusal {
    /// Missed advertisements past the threshold.
    Dead,
    /// Never heard from.
    Unknown,
    /// Draining for maintenance.
    Draining,
    /// Queue at its limit and the rule does not allow overflow.
    Full,
    /// Lacks a tag the rule or a data-class requirement requires.
    MissingTags,
    /// In failback hold-down after coming back.
    HoldDown,
    /// Not a region of this federation.
    UnknownRegion,
    /// The forward to it failed (set by the router, not by `decide`).
    ForwardFailed,
}

impl Refusal {
    /// The machine-readable name used in the API and the decision log.
    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::Dead => "dead",
            Refusal::Unknown => "unknown",
            Refusal::Draining => "draining",
            Refusal::Full => "full",
            Refusal::MissingTags => "missing_tags",
            Refusal::HoldDown => "hold_down",
            Refusal::UnknownRegion => "unknown_region",
            Refusal::ForwardFailed => "forward_failed",
        }
    }

    /// True when the refusal is about availability (down, full, draining),
    /// not about compliance: a rejection made only of these is `UNAVAILABLE`.
    pub fn is_availability(self) -> bool {
        !matches!(self, Refusal::MissingTags | Refusal::UnknownRegion)
    }
}

/// One candidate's verdict.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Candidate {
    /// The region (shared with the rule's candidate table: no allocation
    /// per candidate).
    pub region: std::sync::Arc<str>,
    /// Primary or backup.
    pub role: Role,
    /// `None` when acceptable, else why not.
    pub refusal: Option<Refusal>,
    /// Human-readable detail ("lacks GDPR", "suspect: phi 6.1").
    pub detail: String,
}

impl Candidate {
    /// True when the candidate may receive the task.
    pub fn accepted(&self) -> bool {
        self.refusal.is_none()
    }

    /// True when the candidate is accepted only as the last resort: it is in
    /// failback hold-down and no other candidate is available.
    pub fn last_resort(&self) -> bool {
        self.accepted() && self.detail == LAST_RESORT
    }
}

/// The detail of a candidate in hold-down accepted as the last resort.
const LAST_RESORT: &str =
    "in failback hold-down; tried as the last resort: no other candidate is available";

/// Why a task was rejected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Rejection {
    /// No rule matched the attributes (fail closed). `FAILED_PRECONDITION`.
    NoRule,
    /// Some candidate lacks a required tag and none is acceptable.
    /// `FAILED_PRECONDITION`.
    NoCompliantRegion,
    /// Every compliant candidate is down, full or draining. `UNAVAILABLE`.
    Unavailable,
}

/// The outcome of a decision.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum Outcome {
    /// Sent to the rule's primary.
    Routed {
        /// The region.
        region: String,
    },
    /// Sent to a backup because the primary (and earlier backups) were refused.
    Failover {
        /// The region.
        region: String,
    },
    /// Not sent anywhere.
    Rejected {
        /// Why.
        rejection: Rejection,
    },
}

impl Outcome {
    /// The chosen region, if any.
    pub fn region(&self) -> Option<&str> {
        match self {
            Outcome::Routed { region } | Outcome::Failover { region } => Some(region),
            Outcome::Rejected { .. } => None,
        }
    }

    /// "routed", "failover" or "rejected".
    pub fn kind(&self) -> &'static str {
        match self {
            Outcome::Routed { .. } => "routed",
            Outcome::Failover { .. } => "failover",
            Outcome::Rejected { .. } => "rejected",
        }
    }
}

/// A routing decision.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Decision {
    /// The outcome (first, so JSON readers see it at once).
    pub outcome: Outcome,
    /// Index (file order, 0-based) of the matched rule.
    pub rule_index: Option<usize>,
    /// The matched rule's label: its name, or `rule N: <condition>`.
    pub rule: Option<String>,
    /// Tags every chosen region must hold (rule plus data-class requirements).
    pub required_tags: BTreeSet<String>,
    /// Candidates in the order they are tried: the primary (for a set, the
    /// available members in balance order, then the refused ones), then the
    /// backups.
    pub candidates: Vec<Candidate>,
    /// One sentence naming the rule and each candidate's verdict.
    pub reason: String,
    /// Hash of the policy that decided.
    pub policy_hash: String,
    /// Audit notes (for example a failover that drops a tag the primary holds).
    pub warnings: Vec<String>,
    /// Rules whose condition could not be evaluated on these attributes
    /// (missing attribute, type error), with the error; they did not match.
    pub evaluation_errors: Vec<String>,
    /// How a member of the rule's set of primaries was chosen: the loads
    /// seen, the draw, the affinity key's digest (never its value). `None`
    /// for a rule with a single primary.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub balance: Option<BalanceNote>,
}

impl Decision {
    /// Recomputes the outcome and reason after the router changed a verdict
    /// (for example a failed forward).
    ///
    /// A failover warning that no longer matches the outcome is dropped; call
    /// [`Decision::refresh_warnings`] to add the one for a new failover.
    ///
    /// When every candidate is then refused, one refused only for failback
    /// hold-down is accepted as the last resort (see [`Decision::settle`]);
    /// if that one fails too, its detail still says it was.
    pub fn refuse(&mut self, region: &str, refusal: Refusal, detail: impl Into<String>) {
        if let Some(c) = self.candidates.iter_mut().find(|c| &*c.region == region) {
            let detail = detail.into();
            c.detail = if c.last_resort() {
                format!("{detail} (tried as the last resort while in failback hold-down)")
            } else {
                detail
            };
            c.refusal = Some(refusal);
        }
        self.settle();
        let current = match &self.outcome {
            Outcome::Failover { region } => Some(format!("failover to {region} ")),
            _ => None,
        };
        self.warnings.retain(|w| {
            !w.starts_with(FAILOVER_WARNING) || current.as_deref().is_some_and(|c| w.starts_with(c))
        });
    }

    /// Recomputes the audit warnings that depend on the outcome (a failover
    /// that drops a compliance tag held by the primary) against `policy`.
    pub fn refresh_warnings(&mut self, policy: &Policy) {
        self.warnings.retain(|w| !w.starts_with(FAILOVER_WARNING));
        let Outcome::Failover { region } = &self.outcome else {
            return;
        };
        // Tags every primary holds (for a set: its common tags).
        let mut primaries = self
            .candidates
            .iter()
            .filter(|c| c.role == Role::Primary)
            .filter_map(|c| policy.region(&c.region));
        let Some(first) = primaries.next() else {
            return;
        };
        let mut names = vec![first.name.as_str()];
        let mut held = first.tags.clone();
        for p in primaries {
            names.push(p.name.as_str());
            held.retain(|t| p.tags.contains(t));
        }
        if let Some(backup) = policy.region(region) {
            let dropped: Vec<_> = held.difference(&backup.tags).cloned().collect();
            if !dropped.is_empty() {
                let whose = if names.len() > 1 {
                    format!("every primary of the set {{{}}}", names.join(", "))
                } else {
                    format!("primary {}", names[0])
                };
                self.warnings.push(format!(
                    "{FAILOVER_WARNING}{region} drops compliance tag(s) held by {whose}: {}",
                    dropped.join(", ")
                ));
            }
        }
    }

    /// Sets outcome, reason and warnings from the candidates' verdicts.
    ///
    /// Hold-down only defers traffic: when no candidate is acceptable (as
    /// decided, or after the router refused the others because their
    /// forwards failed) but some are refused only for hold-down, the first
    /// of those is accepted as the last resort before the task is rejected,
    /// and the reason says so.
    pub(crate) fn settle(&mut self) {
        let Some(rule) = self.rule.clone() else {
            self.outcome = Outcome::Rejected {
                rejection: Rejection::NoRule,
            };
            return;
        };
        if !self.candidates.iter().any(Candidate::accepted) {
            if let Some(c) = self
                .candidates
                .iter_mut()
                .find(|c| c.refusal == Some(Refusal::HoldDown))
            {
                c.refusal = None;
                c.detail = LAST_RESORT.into();
            }
        }
        // Rendered only for the reasons that list them.
        let verdicts = |candidates: &[Candidate]| {
            candidates
                .iter()
                .map(|c| {
                    let role = match c.role {
                        Role::Primary => "primary",
                        Role::Backup => "backup",
                    };
                    match c.refusal {
                        None if c.last_resort() => {
                            format!("{} ({role}): ok — {}", c.region, c.detail)
                        }
                        None => format!("{} ({role}): ok", c.region),
                        Some(r) => format!("{} ({role}): {} — {}", c.region, r.as_str(), c.detail),
                    }
                })
                .collect::<Vec<_>>()
                .join("; ")
        };
        match self.candidates.iter().find(|c| c.accepted()) {
            Some(c) if c.role == Role::Primary && c.last_resort() => {
                self.outcome = Outcome::Routed {
                    region: c.region.to_string(),
                };
                self.reason = format!(
                    "{rule} matched; routed to primary {} as the last resort, in failback hold-down [{}]",
                    c.region,
                    verdicts(&self.candidates)
                );
            }
            Some(c) if c.role == Role::Primary && self.balance.is_some() => {
                self.outcome = Outcome::Routed {
                    region: c.region.to_string(),
                };
                let note = self.balance.as_ref();
                let first = self
                    .candidates
                    .first()
                    .is_some_and(|f| f.region == c.region);
                self.reason = if first {
                    // "{rule} matched; routed to primary {region} of the
                    // set ({why})", pieced together in one allocation, the
                    // note's sentence written straight into it.
                    const ROUTED: &str = " matched; routed to primary ";
                    const OF_SET: &str = " of the set (";
                    let mut reason = String::with_capacity(
                        rule.len()
                            + ROUTED.len()
                            + c.region.len()
                            + OF_SET.len()
                            + note.map_or(0, BalanceNote::why_capacity)
                            + 1,
                    );
                    reason.push_str(&rule);
                    reason.push_str(ROUTED);
                    reason.push_str(&c.region);
                    reason.push_str(OF_SET);
                    if let Some(b) = note {
                        b.write_why(&mut reason);
                    }
                    reason.push(')');
                    reason
                } else {
                    let why = note.map(BalanceNote::why).unwrap_or_default();
                    format!(
                        "{rule} matched; routed to primary {} of the set ({why}) [{}]",
                        c.region,
                        verdicts(&self.candidates)
                    )
                };
            }
            Some(c) if c.role == Role::Primary => {
                self.outcome = Outcome::Routed {
                    region: c.region.to_string(),
                };
                self.reason = format!("{rule} matched; routed to primary {}", c.region);
            }
            Some(c) => {
                self.outcome = Outcome::Failover {
                    region: c.region.to_string(),
                };
                let how = if c.last_resort() {
                    " as the last resort, in failback hold-down"
                } else {
                    ""
                };
                self.reason = format!(
                    "{rule} matched; failed over to backup {}{how} [{}]",
                    c.region,
                    verdicts(&self.candidates)
                );
            }
            None => {
                let all_availability = self
                    .candidates
                    .iter()
                    .all(|c| c.refusal.is_some_and(Refusal::is_availability));
                let any_compliant = self
                    .candidates
                    .iter()
                    .any(|c| c.refusal.is_some_and(Refusal::is_availability));
                let rejection = if all_availability || any_compliant {
                    Rejection::Unavailable
                } else {
                    Rejection::NoCompliantRegion
                };
                let what = match rejection {
                    Rejection::Unavailable => "every compliant region is unavailable",
                    _ => "no region of the rule is compliant",
                };
                self.outcome = Outcome::Rejected { rejection };
                self.reason = format!(
                    "{rule} matched; rejected: {what} [{}]",
                    verdicts(&self.candidates)
                );
            }
        }
    }
}

/// Makes the decision for `attrs` against `view`. Never routes outside the
/// matched rule's primaries and backups. A set of primaries is balanced
/// with a draw derived from the attributes (the same attributes, the same
/// draw): what `policy explain` and the audit use; the live router passes
/// a fresh random draw to [`decide_with`].
pub fn decide(policy: &Policy, attrs: &Attributes, view: &dyn FederationView) -> Decision {
    decide_with(policy, attrs, view, balance::attributes_draw(attrs))
}

/// [`decide`] with the draw that balances a set of primaries (any `u64`;
/// uniform draws give shares proportional to the members' weights).
pub fn decide_with(
    policy: &Policy,
    attrs: &Attributes,
    view: &dyn FederationView,
    draw: u64,
) -> Decision {
    let matched = policy.match_rule(attrs);
    let evaluation_errors = matched.errors.clone();
    let Some(index) = matched.rule else {
        let shown = crate::text::truncate(&super::format_attributes(attrs), 200);
        let reason = if evaluation_errors.is_empty() {
            format!("no routing rule matches these attributes ({shown}): rejected (fail closed)")
        } else {
            format!(
                "no routing rule matches these attributes ({shown}): rejected (fail closed); not evaluable: {}",
                evaluation_errors.join("; ")
            )
        };
        return Decision {
            outcome: Outcome::Rejected {
                rejection: Rejection::NoRule,
            },
            rule_index: None,
            rule: None,
            required_tags: BTreeSet::new(),
            candidates: Vec::new(),
            reason,
            policy_hash: policy.hash.clone(),
            warnings: Vec::new(),
            evaluation_errors,
            balance: None,
        };
    };
    let rule = &policy.rules[index];
    let mut required = rule.requires.clone();
    required.extend(policy.data_class_requirements(attrs));

    // Every candidate's verdict from one visit of the view, by the
    // positions resolved at load; names shared from the same table. A
    // set's available members wait (in `members`, on the stack for a set
    // of up to `balance::INLINE`) until balancing has ordered them; its
    // refused members and the backups go straight to `candidates`, in
    // file order, and the members are put in front of them afterwards.
    let primaries = rule.primaries.len();
    let set = rule.is_set();
    // `required` is the rule's tags plus any a data class adds: the same
    // set exactly when no tag was added, and then the tag check of a
    // region whose view shares its configured tags was done at load.
    let rule_tags_only = required.len() == rule.requires.len();
    let mut candidates = Vec::with_capacity(rule.candidate_ids.len());
    let mut inline: [balance::Member; balance::INLINE];
    let mut spilled = Vec::new();
    let members: &mut [balance::Member] = if !set {
        &mut []
    } else if primaries > balance::INLINE {
        spilled.resize(primaries, balance::Member::default());
        &mut spilled
    } else {
        inline = [balance::Member::default(); balance::INLINE];
        &mut inline
    };
    let mut available = 0;
    let mut visited = 0;
    view.visit_regions(policy, &rule.candidate_ids, &mut |v| {
        let i = visited;
        visited += 1;
        let (region, role) = match rule.shared_primaries.get(i) {
            Some(p) => (p, Role::Primary),
            None => match rule.shared_backups.get(i - primaries) {
                Some(b) => (b, Role::Backup),
                // A view calling back more often than asked: ignored.
                None => return,
            },
        };
        let tags_checked = rule_tags_only
            && v.is_some_and(|v| {
                rule.candidate_holds_requires.get(i).copied() == Some(true)
                    && rule.candidate_ids.get(i).is_some_and(|&id| {
                        policy
                            .regions
                            .get(id)
                            .is_some_and(|r| std::sync::Arc::ptr_eq(&r.shared_tags, &v.tags))
                    })
            });
        let (refusal, detail) =
            match verdict(region, v, &required, tags_checked, rule.allow_overflow) {
                Ok(detail) => {
                    if set && role == Role::Primary {
                        if let Some(m) = members.get_mut(available) {
                            *m = balance::Member {
                                index: i,
                                rank: rule.primary_ranks.get(i).copied().unwrap_or(u32::MAX),
                                load: v.and_then(|v| v.load),
                                weight: 0.0,
                                detail,
                            };
                            available += 1;
                        }
                        return;
                    }
                    (None, detail.to_string())
                }
                Err((refusal, detail)) => (Some(refusal), detail),
            };
        candidates.push(Candidate {
            region: region.clone(),
            role,
            refusal,
            detail,
        });
    });
    let mut note = None;
    if set {
        // The loads seen are in the balance note (and on the wire per
        // candidate), not repeated in each detail.
        let members = &mut members[..available];
        let balanced = balance::order(rule, attrs, members, draw);
        // The set's members first, in balance order, then the refused
        // ones (in file order) and the backups already there.
        candidates.extend(members.iter_mut().map(|m| Candidate {
            region: rule.shared_primaries[m.index].clone(),
            role: Role::Primary,
            refusal: None,
            detail: m.detail.to_string(),
        }));
        candidates.rotate_right(available);
        note = Some(balanced);
    }

    let mut decision = Decision {
        outcome: Outcome::Rejected {
            rejection: Rejection::NoRule,
        },
        rule_index: Some(index),
        rule: Some(rule.label()),
        required_tags: required,
        candidates,
        reason: String::new(),
        policy_hash: policy.hash.clone(),
        warnings: Vec::new(),
        evaluation_errors,
        balance: note,
    };
    decision.settle();
    decision.refresh_warnings(policy);
    decision
}

/// How failover warnings start (followed by the region).
const FAILOVER_WARNING: &str = "failover to ";

/// A candidate's verdict: accepted with its detail (a fixed text, usually
/// empty), or refused with why. `tags_checked`: the region's view holds
/// its configured tags and those hold `required` (known at load): no set
/// lookups.
fn verdict(
    region: &str,
    view: Option<&RegionView>,
    required: &BTreeSet<String>,
    tags_checked: bool,
    allow_overflow: bool,
) -> Result<&'static str, (Refusal, String)> {
    match view {
        Some(v) => verdict_of(v, required, tags_checked, allow_overflow),
        None => Err((
            Refusal::UnknownRegion,
            format!("{region} is not a known region"),
        )),
    }
}

fn verdict_of(
    v: &RegionView,
    required: &BTreeSet<String>,
    tags_checked: bool,
    allow_overflow: bool,
) -> Result<&'static str, (Refusal, String)> {
    // The usual case (every tag held) without building the missing list.
    if !tags_checked && !required.iter().all(|t| v.tags.contains(t)) {
        let missing: Vec<_> = required.difference(&v.tags).cloned().collect();
        return Err((
            Refusal::MissingTags,
            format!("lacks {}", missing.join(", ")),
        ));
    }
    match v.health {
        Health::Dead => return Err((Refusal::Dead, "missed advertisements: dead".into())),
        Health::Unknown => return Err((Refusal::Unknown, "never heard from".into())),
        Health::Alive | Health::Suspect => {}
    }
    if v.draining {
        return Err((Refusal::Draining, "draining".into()));
    }
    if v.full && !allow_overflow {
        return Err((Refusal::Full, "queue at its limit".into()));
    }
    if v.held_down {
        return Err((
            Refusal::HoldDown,
            "recently returned: failback hold-down".into(),
        ));
    }
    Ok(if v.health == Health::Suspect {
        "suspect (late advertisements), tried"
    } else {
        ""
    })
}

/// Helper for [`Policy::match_rule`] results.
impl RuleMatch {
    /// A match of rule `index`.
    pub fn of(index: usize) -> Self {
        Self {
            rule: Some(index),
            errors: Vec::new(),
        }
    }
}
