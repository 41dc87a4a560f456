//! The residency policy: regions with their compliance tags, routing rules
//! with CEL conditions compiled once at load, data-class requirements, and
//! the pure routing decision ([`decide`]).
//!
//! This module validates what the rules mean (CEL, region references, tags)
//! and names file positions for every error. It must not do I/O beyond
//! reading the policy file through [`crate::config`], and it never looks at
//! live membership: callers pass a [`FederationView`].

pub mod analysis;
pub mod approvers;
mod balance;
pub mod condition;
mod decision;
pub mod diff;
pub mod map;
pub mod record_values;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::Path;

use serde::Serialize;
use sha2::{Digest, Sha256};

pub use crate::config::Balance;
use crate::config::{self, FederationSpec, Position, SourceMap, SyncSpec};
pub use balance::{BalanceExplanation, BalanceNote, Load, LoadSeen};
pub use condition::Condition;
pub use decision::{
    BoundStaticView, Candidate, Decision, FederationView, Health, Outcome, Refusal, RegionView,
    Rejection, Role, StaticView, decide, decide_with,
};

/// One attribute value of a task, as CEL sees it.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum AttrValue {
    /// A string.
    Str(String),
    /// A signed integer.
    Int(i64),
    /// A double.
    Double(f64),
    /// A boolean.
    Bool(bool),
    /// A list.
    List(Vec<AttrValue>),
}

impl fmt::Display for AttrValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AttrValue::Str(s) => write!(f, "'{s}'"),
            AttrValue::Int(i) => write!(f, "{i}"),
            AttrValue::Double(d) => write!(f, "{d:?}"),
            AttrValue::Bool(b) => write!(f, "{b}"),
            AttrValue::List(items) => {
                f.write_str("[")?;
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        f.write_str(", ")?;
                    }
                    write!(f, "{item}")?;
                }
                f.write_str("]")
            }
        }
    }
}

/// A task's attributes, by name.
pub type Attributes = BTreeMap<String, AttrValue>;

/// Formats attributes as `k='v', k2=3` for messages.
pub fn format_attributes(attrs: &Attributes) -> String {
    attrs
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// A region of the federation.
#[derive(Debug, Clone, Serialize)]
pub struct Region {
    /// Unique name.
    pub name: String,
    /// gRPC endpoint from the federation file.
    pub endpoint: String,
    /// Every endpoint of the region from the federation file (its
    /// replicas): `endpoint`, then `endpoints`, each once.
    pub endpoints: Vec<String>,
    /// Preference among equals, lower first (unset sorts last): the
    /// tie-breaker between members of a set of primaries, and the order of
    /// regions in `policy check` and on the status page.
    pub priority: Option<i64>,
    /// Compliance tags from the federation file.
    pub tags: BTreeSet<String>,
    /// The same tags, shared: what a [`RegionView`] of this region holds
    /// (cloning a view costs a reference count, not a set).
    #[serde(skip)]
    pub shared_tags: std::sync::Arc<BTreeSet<String>>,
}

/// A compiled routing rule.
#[derive(Debug, Clone)]
pub struct Rule {
    /// Position in file order (0-based).
    pub index: usize,
    /// The optional name from the file.
    pub name: Option<String>,
    /// The CEL source; `None` for the default rule.
    pub source: Option<String>,
    /// The compiled condition; `None` for the default rule (always matches).
    pub condition: Option<Condition>,
    /// The primary region, or the set of equally preferred primaries
    /// (`primary_regions`), in file order; never empty.
    pub primaries: Vec<String>,
    /// The primaries' names, shared (a decision's candidates hold them, and
    /// its balance note holds the table).
    pub shared_primaries: std::sync::Arc<[std::sync::Arc<str>]>,
    /// The primaries' `priority` (unset: `i64::MAX`), aligned with
    /// `primaries`.
    pub primary_priorities: Vec<i64>,
    /// Each primary's rank in the tie order (`priority`, lower first, then
    /// name), aligned with `primaries`: 0 for the first.
    pub primary_ranks: Vec<u32>,
    /// The primaries' `weights` (absent: 0), aligned with `primaries`.
    pub primary_weights: Vec<u32>,
    /// The backups' names, shared, aligned with `backups`.
    pub shared_backups: Vec<std::sync::Arc<str>>,
    /// Every candidate's position in [`Policy::regions`], primaries then
    /// backups (aligned with [`Rule::candidates`]): resolved once at load,
    /// so a decision looks its candidates up by index
    /// ([`FederationView::regions_at`]), not by name.
    pub candidate_ids: Vec<usize>,
    /// Whether each candidate's configured tags hold [`Rule::requires`],
    /// aligned with [`Rule::candidate_ids`]: a decision whose view of the
    /// region shares those tags (and no data class adds one) skips the
    /// set lookups.
    pub candidate_holds_requires: Vec<bool>,
    /// How a member of the set is chosen (meaningful for a set).
    pub balance: Balance,
    /// Static shares for [`Balance::Weighted`]; members without one take no
    /// share and come after the weighted ones, in priority order.
    pub weights: BTreeMap<String, u32>,
    /// The attribute whose value keeps tasks in one member of the set.
    pub affinity: Option<String>,
    /// The same name, shared (a decision's balance note holds it).
    pub shared_affinity: Option<std::sync::Arc<str>>,
    /// Ordered backups.
    pub backups: Vec<String>,
    /// Tags every chosen region must hold.
    pub requires: BTreeSet<String>,
    /// Send to a full region anyway.
    pub allow_overflow: bool,
    /// Where the rule starts in the file.
    pub position: Option<Position>,
}

impl Rule {
    /// `rule 2 (eu-customers): customer_region in [...]` — how reports name it.
    pub fn label(&self) -> String {
        let what = self.source.as_deref().unwrap_or("default");
        match &self.name {
            Some(name) => format!("rule {} ({name}): {what}", self.index + 1),
            None => format!("rule {}: {what}", self.index + 1),
        }
    }

    /// Primaries (the set, in file order) then backups.
    pub fn candidates(&self) -> impl Iterator<Item = &String> {
        self.primaries.iter().chain(self.backups.iter())
    }

    /// The name of candidate `i` (primaries then backups, as
    /// [`Rule::candidate_ids`]); empty past the end.
    pub fn candidate_name(&self, i: usize) -> &str {
        match self.primaries.get(i) {
            Some(p) => p,
            None => self
                .backups
                .get(i - self.primaries.len())
                .map_or("", String::as_str),
        }
    }

    /// True when the rule names a set of more than one primary.
    pub fn is_set(&self) -> bool {
        self.primaries.len() > 1
    }

    /// True when `region` is one of the rule's primaries.
    pub fn is_primary(&self, region: &str) -> bool {
        self.primaries.iter().any(|p| p == region)
    }

    /// `europe` or `{europe_west, europe_central}` — how reports name the
    /// rule's primaries.
    pub fn primaries_label(&self) -> String {
        if self.is_set() {
            format!("{{{}}}", self.primaries.join(", "))
        } else {
            self.primaries.join(", ")
        }
    }

    /// Regions besides `source` that may hold a task of this rule placed in
    /// `source`: the backups, and, for a set, the set's other members (any
    /// of them could have been chosen instead).
    pub fn peers_of<'a>(&'a self, source: &'a str) -> impl Iterator<Item = &'a String> + 'a {
        let set: &[String] = if self.is_set() { &self.primaries } else { &[] };
        set.iter()
            .chain(self.backups.iter())
            .filter(move |r| r.as_str() != source)
    }
}

/// Each name's rank in the order (priority, name), aligned with `names`.
fn tie_ranks(names: &[String], priority: impl Fn(&str) -> i64) -> Vec<u32> {
    let mut by_tie: Vec<usize> = (0..names.len()).collect();
    by_tie
        .sort_by(|&a, &b| (priority(&names[a]), &names[a]).cmp(&(priority(&names[b]), &names[b])));
    let mut ranks = vec![0; names.len()];
    for (rank, i) in by_tie.into_iter().enumerate() {
        ranks[i] = u32::try_from(rank).unwrap_or(u32::MAX);
    }
    ranks
}

/// A compiled data-class requirement.
#[derive(Debug, Clone)]
pub struct DataClassRequirement {
    /// Optional name.
    pub name: Option<String>,
    /// The CEL source.
    pub source: String,
    /// Compiled condition.
    pub condition: Condition,
    /// Tags required when the condition holds.
    pub requires: BTreeSet<String>,
}

/// The result of evaluating the rules in order.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RuleMatch {
    /// The first rule whose condition is true.
    pub rule: Option<usize>,
    /// Conditions that failed to evaluate before the match (they count as
    /// not matching), as `rule N: error`.
    pub errors: Vec<String>,
}

/// A loaded, validated policy.
#[derive(Debug, Clone)]
pub struct Policy {
    /// The federation's name.
    pub federation: String,
    /// Regions in file order.
    pub regions: Vec<Region>,
    /// Rules in file order.
    pub rules: Vec<Rule>,
    /// Extra requirements.
    pub requirements: Vec<DataClassRequirement>,
    /// Replication settings.
    pub sync: SyncSpec,
    /// Which attribute values records may keep outside the region holding
    /// a task (`federation.audit`).
    pub record_values: record_values::RecordValues,
    /// Hex SHA-256 of the canonical form of the federation section: equal
    /// policies have equal hashes whatever their formatting.
    pub hash: String,
    /// Who approves this policy (`federation.policy`); empty when unset.
    pub approvers: approvers::Approvers,
}

/// A policy error with its position.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PolicyError {
    /// `file:line:column`, or the file alone when unknown.
    pub location: String,
    /// The configuration path (`federation.routing_rules[1].primary_region`).
    pub path: String,
    /// What is wrong.
    pub message: String,
}

impl fmt::Display for PolicyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}: {}", self.location, self.path, self.message)
    }
}

/// Why a policy cannot be used: the configuration could not be read, or it
/// has one or more semantic errors (all are reported, not only the first).
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// Reading or parsing the file failed.
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    /// The file parsed but its rules are invalid.
    #[error("{}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n"))]
    Invalid(Vec<PolicyError>),
}

impl Policy {
    /// Reads, layers and validates a federation file (no environment).
    pub fn load_file(path: &Path) -> Result<Self, LoadError> {
        let loaded = config::load(&config::Sources {
            federation_file: path.to_path_buf(),
            node_file: None,
            env: Some(Default::default()),
        })?;
        Self::from_loaded(&loaded)
    }

    /// Validates a loaded configuration into a policy.
    pub fn from_loaded(loaded: &config::Loaded) -> Result<Self, LoadError> {
        Self::from_spec(&loaded.file.federation, &loaded.source_map).map_err(LoadError::Invalid)
    }

    /// Validates a federation spec, collecting every error with its position.
    pub fn from_spec(spec: &FederationSpec, map: &SourceMap) -> Result<Self, Vec<PolicyError>> {
        let mut errors = Vec::new();
        let err = |errors: &mut Vec<PolicyError>, path: String, message: String| {
            let location = map
                .locate(&path)
                .map(|p| p.to_string())
                .unwrap_or_else(|| map.file().display().to_string());
            errors.push(PolicyError {
                location,
                path,
                message,
            });
        };

        // Regions.
        let mut regions: Vec<Region> = Vec::new();
        for (i, r) in spec.regions.iter().enumerate() {
            let path = format!("federation.regions[{i}].name");
            if r.name.trim().is_empty() {
                err(&mut errors, path, "region name is empty".into());
                continue;
            }
            if let Some(first) = regions.iter().position(|x| x.name == r.name) {
                err(
                    &mut errors,
                    path,
                    format!(
                        "duplicate region name `{}` (first at regions[{first}])",
                        r.name
                    ),
                );
                continue;
            }
            regions.push(Region {
                name: r.name.clone(),
                endpoint: r.endpoint.clone(),
                endpoints: {
                    let mut all = crate::config::Endpoints::parse(&r.endpoint);
                    for e in &r.endpoints {
                        all.extend_from(e);
                    }
                    all.0
                },
                priority: r.priority,
                tags: r.compliance.iter().cloned().collect(),
                shared_tags: std::sync::Arc::new(r.compliance.iter().cloned().collect()),
            });
        }
        if spec.regions.is_empty() {
            err(
                &mut errors,
                "federation.regions".into(),
                "no regions defined".into(),
            );
        }
        let known = |name: &str| regions.iter().find(|r| r.name == name);
        let region_names = || {
            regions
                .iter()
                .map(|r| r.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        };

        // Rules.
        let mut rules = Vec::new();
        let count = spec.routing_rules.len();
        for (i, r) in spec.routing_rules.iter().enumerate() {
            let base = format!("federation.routing_rules[{i}]");
            let condition = match (&r.condition, r.default) {
                (Some(_), true) => {
                    err(
                        &mut errors,
                        format!("{base}.default"),
                        "a default rule has no condition; remove `condition` or `default`".into(),
                    );
                    None
                }
                (None, false) => {
                    err(
                        &mut errors,
                        base.clone(),
                        "missing `condition` (or mark the catch-all rule `default: true`)".into(),
                    );
                    None
                }
                (None, true) => {
                    if i + 1 != count {
                        err(
                            &mut errors,
                            format!("{base}.default"),
                            "the default rule must be the last rule (rules after it could never match)".into(),
                        );
                    }
                    None
                }
                (Some(src), false) => match Condition::compile(src) {
                    Ok(c) => Some(c),
                    Err(e) => {
                        let path = format!("{base}.condition");
                        let location = map
                            .locate_in_scalar(&path, e.offset)
                            .map(|p| p.to_string())
                            .unwrap_or_else(|| map.file().display().to_string());
                        errors.push(PolicyError {
                            location,
                            path,
                            message: format!("invalid CEL condition `{src}`: {}", e.message),
                        });
                        None
                    }
                },
            };

            let (primaries_field, listed_primaries): (&str, Vec<String>) =
                match (&r.primary_region, &r.primary_regions) {
                    (Some(_), Some(_)) => {
                        err(
                            &mut errors,
                            format!("{base}.primary_regions"),
                            "give either `primary_region` or `primary_regions`, not both".into(),
                        );
                        ("primary_regions", Vec::new())
                    }
                    (Some(p), None) => ("primary_region", vec![p.clone()]),
                    (None, Some(list)) => {
                        if list.is_empty() {
                            err(
                                &mut errors,
                                format!("{base}.primary_regions"),
                                "the set of primary regions is empty: name at least one region"
                                    .into(),
                            );
                        }
                        ("primary_regions", list.clone())
                    }
                    (None, None) => {
                        err(
                            &mut errors,
                            base.clone(),
                            "missing `primary_region` (or a set, `primary_regions`)".into(),
                        );
                        ("primary_region", Vec::new())
                    }
                };
            let mut primaries: Vec<String> = Vec::new();
            for (j, p) in listed_primaries.into_iter().enumerate() {
                let path = if primaries_field == "primary_region" {
                    format!("{base}.primary_region")
                } else {
                    format!("{base}.primary_regions[{j}]")
                };
                if known(&p).is_none() {
                    err(
                        &mut errors,
                        path,
                        format!("unknown region `{p}` (regions: {})", region_names()),
                    );
                } else if primaries.contains(&p) {
                    err(
                        &mut errors,
                        path,
                        format!("region `{p}` is listed twice in `primary_regions`"),
                    );
                } else {
                    primaries.push(p);
                }
            }
            let is_set = primaries_field == "primary_regions";
            if !is_set {
                for (field, given) in [
                    ("balance", r.balance.is_some()),
                    ("weights", r.weights.is_some()),
                    ("affinity", r.affinity.is_some()),
                ] {
                    if given {
                        err(
                            &mut errors,
                            format!("{base}.{field}"),
                            format!(
                                "`{field}` applies to a set of primaries: use `primary_regions: [..]`"
                            ),
                        );
                    }
                }
            }
            let balance = r.balance.unwrap_or_default();
            let weights = r.weights.clone().unwrap_or_default();
            match (balance, r.weights.as_ref()) {
                (Balance::Weighted, None) => err(
                    &mut errors,
                    format!("{base}.balance"),
                    "`balance: weighted` needs `weights` (for example `weights: {a: 3, b: 1}`)"
                        .into(),
                ),
                (Balance::Weighted, Some(w)) if w.values().all(|v| *v == 0) => err(
                    &mut errors,
                    format!("{base}.weights"),
                    "every weight is 0: at least one member needs a positive weight".into(),
                ),
                (Balance::LeastLoaded | Balance::Priority, Some(_)) if is_set => err(
                    &mut errors,
                    format!("{base}.weights"),
                    format!(
                        "`weights` are used only with `balance: weighted` (this rule balances `{}`)",
                        balance.as_str()
                    ),
                ),
                _ => {}
            }
            for name in weights.keys() {
                if is_set && !primaries.contains(name) {
                    err(
                        &mut errors,
                        format!("{base}.weights.{name}"),
                        format!(
                            "weight for `{name}`, which is not a member of `primary_regions` ({})",
                            primaries.join(", ")
                        ),
                    );
                }
            }
            if let Some(a) = &r.affinity {
                if a.trim().is_empty() {
                    err(
                        &mut errors,
                        format!("{base}.affinity"),
                        "the affinity attribute name is empty".into(),
                    );
                }
            }
            let mut backups = Vec::new();
            let (backup_field, listed): (&str, Vec<String>) =
                match (&r.backup_region, &r.backup_regions) {
                    (Some(_), Some(_)) => {
                        err(
                            &mut errors,
                            format!("{base}.backup_regions"),
                            "give either `backup_region` or `backup_regions`, not both".into(),
                        );
                        ("backup_regions", Vec::new())
                    }
                    (Some(b), None) => ("backup_region", vec![b.clone()]),
                    (None, Some(list)) => ("backup_regions", list.clone()),
                    (None, None) => ("backup_regions", Vec::new()),
                };
            for (j, b) in listed.into_iter().enumerate() {
                let path = if backup_field == "backup_region" {
                    format!("{base}.backup_region")
                } else {
                    format!("{base}.backup_regions[{j}]")
                };
                if known(&b).is_none() {
                    err(
                        &mut errors,
                        path,
                        format!("unknown region `{b}` (regions: {})", region_names()),
                    );
                } else if primaries.contains(&b) && !is_set {
                    err(
                        &mut errors,
                        path,
                        format!("backup `{b}` is the rule's primary region"),
                    );
                } else if primaries.contains(&b) {
                    err(
                        &mut errors,
                        path,
                        format!("backup `{b}` is a member of the rule's `primary_regions`"),
                    );
                } else if backups.contains(&b) {
                    err(&mut errors, path, format!("backup `{b}` is listed twice"));
                } else {
                    backups.push(b);
                }
            }
            let requires: BTreeSet<String> = r.requires.iter().cloned().collect();
            for p in &primaries {
                let Some(region) = known(p) else { continue };
                let missing: Vec<_> = requires.difference(&region.tags).cloned().collect();
                if !missing.is_empty() {
                    let what = if is_set {
                        format!("its primary set's member `{p}`")
                    } else {
                        format!("its primary `{p}`")
                    };
                    err(
                        &mut errors,
                        format!("{base}.requires"),
                        format!(
                            "the rule requires {} but {what} lacks {}",
                            requires.iter().cloned().collect::<Vec<_>>().join(", "),
                            missing.join(", ")
                        ),
                    );
                }
            }
            rules.push(Rule {
                index: i,
                name: r.name.clone(),
                source: r.condition.clone().filter(|_| !r.default),
                condition,
                shared_primaries: primaries.iter().map(|p| p.as_str().into()).collect(),
                primary_priorities: primaries
                    .iter()
                    .map(|p| known(p).and_then(|r| r.priority).unwrap_or(i64::MAX))
                    .collect(),
                primary_ranks: tie_ranks(&primaries, |p| {
                    known(p).and_then(|r| r.priority).unwrap_or(i64::MAX)
                }),
                primary_weights: primaries
                    .iter()
                    .map(|p| weights.get(p).copied().unwrap_or(0))
                    .collect(),
                shared_backups: backups.iter().map(|b| b.as_str().into()).collect(),
                candidate_ids: primaries
                    .iter()
                    .chain(backups.iter())
                    .filter_map(|c| regions.iter().position(|r| &r.name == c))
                    .collect(),
                candidate_holds_requires: primaries
                    .iter()
                    .chain(backups.iter())
                    .filter_map(|c| regions.iter().find(|r| &r.name == c))
                    .map(|r| requires.is_subset(&r.shared_tags))
                    .collect(),
                primaries,
                balance,
                weights,
                affinity: r.affinity.clone(),
                shared_affinity: r.affinity.as_deref().map(std::sync::Arc::from),
                backups,
                requires,
                allow_overflow: r.allow_overflow,
                position: map.locate(&base),
            });
        }

        let mut requirements = Vec::new();
        for (i, q) in spec.data_class_requirements.iter().enumerate() {
            let path = format!("federation.data_class_requirements[{i}].condition");
            match Condition::compile(&q.condition) {
                Ok(condition) => requirements.push(DataClassRequirement {
                    name: q.name.clone(),
                    source: q.condition.clone(),
                    condition,
                    requires: q.requires.iter().cloned().collect(),
                }),
                Err(e) => {
                    let location = map
                        .locate_in_scalar(&path, e.offset)
                        .map(|p| p.to_string())
                        .unwrap_or_else(|| map.file().display().to_string());
                    errors.push(PolicyError {
                        location,
                        path,
                        message: format!("invalid CEL condition `{}`: {}", q.condition, e.message),
                    });
                }
            }
        }

        let sync = &spec.data_synchronization;
        if !matches!(
            sync.encryption.as_str(),
            "AES-256" | "AES-256-GCM" | "aes-256-gcm"
        ) {
            err(
                &mut errors,
                "federation.data_synchronization.encryption".into(),
                format!(
                    "unsupported encryption `{}` (supported: AES-256, which means AES-256-GCM)",
                    sync.encryption
                ),
            );
        }
        if !(1..=22).contains(&sync.compression_level) {
            err(
                &mut errors,
                "federation.data_synchronization.compression_level".into(),
                format!("zstd level {} out of range 1..=22", sync.compression_level),
            );
        }

        let record_values = record_values::RecordValues::new(
            spec.audit.as_ref(),
            &rules,
            &requirements,
            &mut |path, message| err(&mut errors, path, message),
        );
        let approvers = approvers_of(spec, |path, message| err(&mut errors, path, message));

        if !errors.is_empty() {
            return Err(errors);
        }
        Ok(Policy {
            approvers,
            federation: spec.name.clone(),
            regions,
            rules,
            requirements,
            sync: spec.data_synchronization.clone(),
            record_values,
            hash: policy_hash(spec),
        })
    }

    /// A region by name.
    pub fn region(&self, name: &str) -> Option<&Region> {
        self.regions.iter().find(|r| r.name == name)
    }

    /// The regions in display order: by `priority` (lower first, unset
    /// last), then by name.
    pub fn regions_by_priority(&self) -> Vec<&Region> {
        let mut out: Vec<&Region> = self.regions.iter().collect();
        out.sort_by(|a, b| priority_key(a).cmp(&priority_key(b)));
        out
    }

    /// The sort key of region `name` by priority then name (unknown last).
    pub fn priority_of<'a>(&self, name: &'a str) -> (i64, &'a str) {
        (
            self.region(name)
                .and_then(|r| r.priority)
                .unwrap_or(i64::MAX),
            name,
        )
    }

    /// The first rule whose condition holds. A condition that cannot be
    /// evaluated (missing attribute, type error) does not match; the error is
    /// reported so that the decision log shows it.
    pub fn match_rule(&self, attrs: &Attributes) -> RuleMatch {
        let mut errors = Vec::new();
        for rule in &self.rules {
            match &rule.condition {
                None => {
                    return RuleMatch {
                        rule: Some(rule.index),
                        errors,
                    };
                }
                Some(c) => match c.evaluate(attrs) {
                    Ok(true) => {
                        return RuleMatch {
                            rule: Some(rule.index),
                            errors,
                        };
                    }
                    Ok(false) => {}
                    Err(e) => errors.push(format!("rule {}: {e}", rule.index + 1)),
                },
            }
        }
        RuleMatch { rule: None, errors }
    }

    /// Tags the data-class requirements add for these attributes.
    pub fn data_class_requirements(&self, attrs: &Attributes) -> BTreeSet<String> {
        self.requirements
            .iter()
            .filter(|q| matches!(q.condition.evaluate(attrs), Ok(true)))
            .flat_map(|q| q.requires.iter().cloned())
            .collect()
    }

    /// Every region of this policy as `view` shows it now: what a route
    /// record keeps of the federation its decision saw (`policy replay`
    /// re-decides with it).
    pub fn view_states(&self, view: &dyn FederationView) -> Vec<(String, RegionView)> {
        self.regions
            .iter()
            .filter_map(|r| view.region(&r.name).map(|v| (r.name.clone(), v)))
            .collect()
    }

    /// The routing decision against `view`.
    pub fn decide(&self, attrs: &Attributes, view: &dyn FederationView) -> Decision {
        decide(self, attrs, view)
    }

    /// The routing decision with the draw that balances a set of primaries.
    pub fn decide_with(
        &self,
        attrs: &Attributes,
        view: &dyn FederationView,
        draw: u64,
    ) -> Decision {
        decide_with(self, attrs, view, draw)
    }
}

fn priority_key(r: &Region) -> (i64, &str) {
    (r.priority.unwrap_or(i64::MAX), r.name.as_str())
}

/// Validates `federation.policy` (keys, quorum), reporting through `err`.
fn approvers_of(
    spec: &FederationSpec,
    mut err: impl FnMut(String, String),
) -> approvers::Approvers {
    let Some(p) = &spec.policy else {
        return Default::default();
    };
    let mut keys = BTreeMap::new();
    for (name, text) in &p.approvers {
        let path = format!("federation.policy.approvers.{name}");
        match approvers::PublicKey::parse(text) {
            Ok(key) => {
                if let Some((other, _)) = keys.iter().find(|(_, k)| **k == key) {
                    err(path, format!("the same key as approver `{other}`"));
                }
                keys.insert(name.clone(), key);
            }
            Err(e) => err(path, e),
        }
    }
    let quorum = p.quorum.unwrap_or(p.approvers.len());
    if p.require_approvals && p.approvers.is_empty() {
        err(
            "federation.policy.require_approvals".into(),
            "approvals are required but no approvers are named (federation.policy.approvers)"
                .into(),
        );
    } else if !p.approvers.is_empty() && (quorum == 0 || quorum > p.approvers.len()) {
        err(
            "federation.policy.quorum".into(),
            format!(
                "quorum {quorum} must be between 1 and the number of approvers ({})",
                p.approvers.len()
            ),
        );
    }
    approvers::Approvers {
        keys,
        quorum,
        required: p.require_approvals,
    }
}

fn policy_hash(spec: &FederationSpec) -> String {
    // serde_json of the typed spec is canonical: field order is fixed by the
    // struct and formatting or comments in the file do not matter.
    let canonical = serde_json::to_vec(spec).unwrap_or_default();
    hex::encode(Sha256::digest(&canonical))
}

#[cfg(test)]
mod tests;
