//! The residency policy: regions with their compliance tags, routing rules
//! with CEL conditions compiled once at load, data-class requirements, and
//! the pure routing decision ([`decide`]).
//!
//! This module validates what the rules mean (CEL, region references, tags)
//! and names file positions for every error. It must not do I/O beyond
//! reading the policy file through [`crate::config`], and it never looks at
//! live membership: callers pass a [`FederationView`].

pub mod analysis;
pub mod condition;
mod decision;
pub mod diff;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::Path;

use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::config::{self, FederationSpec, Position, SourceMap, SyncSpec};
pub use condition::Condition;
pub use decision::{
    BoundStaticView, Candidate, Decision, FederationView, Health, Outcome, Refusal, RegionView,
    Rejection, Role, StaticView, decide,
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
    /// Display priority.
    pub priority: Option<i64>,
    /// Compliance tags from the federation file.
    pub tags: BTreeSet<String>,
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
    /// Primary region.
    pub primary: String,
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

    /// Primary then backups.
    pub fn candidates(&self) -> impl Iterator<Item = &String> {
        std::iter::once(&self.primary).chain(self.backups.iter())
    }
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
    /// Hex SHA-256 of the canonical form of the federation section: equal
    /// policies have equal hashes whatever their formatting.
    pub hash: String,
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
                priority: r.priority,
                tags: r.compliance.iter().cloned().collect(),
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

            let primary = r.primary_region.clone();
            if known(&primary).is_none() {
                err(
                    &mut errors,
                    format!("{base}.primary_region"),
                    format!("unknown region `{primary}` (regions: {})", region_names()),
                );
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
                } else if b == primary {
                    err(
                        &mut errors,
                        path,
                        format!("backup `{b}` is the rule's primary region"),
                    );
                } else if backups.contains(&b) {
                    err(&mut errors, path, format!("backup `{b}` is listed twice"));
                } else {
                    backups.push(b);
                }
            }
            let requires: BTreeSet<String> = r.requires.iter().cloned().collect();
            if let Some(p) = known(&primary) {
                let missing: Vec<_> = requires.difference(&p.tags).cloned().collect();
                if !missing.is_empty() {
                    err(
                        &mut errors,
                        format!("{base}.requires"),
                        format!(
                            "the rule requires {} but its primary `{primary}` lacks {}",
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
                primary,
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

        if !errors.is_empty() {
            return Err(errors);
        }
        Ok(Policy {
            federation: spec.name.clone(),
            regions,
            rules,
            requirements,
            sync: spec.data_synchronization.clone(),
            hash: policy_hash(spec),
        })
    }

    /// A region by name.
    pub fn region(&self, name: &str) -> Option<&Region> {
        self.regions.iter().find(|r| r.name == name)
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

    /// The routing decision against `view`.
    pub fn decide(&self, attrs: &Attributes, view: &dyn FederationView) -> Decision {
        decide(self, attrs, view)
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
