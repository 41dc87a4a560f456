//! Which attribute values a decision record may keep in every region
//! (`federation.audit.record_values`): the policy's list when it gives one,
//! else the attributes the decision's conditions read — the conditions of
//! the rules evaluated up to the one that matched (all of them when none
//! did) and of the data-class requirements (evaluated when a rule matched).
//! Every other value is kept only where the task is held
//! ([`crate::audit::minimise`]).

use std::collections::BTreeSet;

use super::{DataClassRequirement, Rule};
use crate::config::AuditSpec;

/// The attributes whose values records keep everywhere.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RecordValues {
    /// The policy's explicit list, when given.
    listed: Option<BTreeSet<String>>,
    /// `reads_through[i]`: the attributes read by rules `0..=i`.
    reads_through: Vec<BTreeSet<String>>,
    /// The attributes the data-class requirements read.
    requirement_reads: BTreeSet<String>,
}

impl RecordValues {
    /// Builds the sets from the compiled rules; `err(path, message)` reports
    /// a bad `audit` section.
    pub(super) fn new(
        spec: Option<&AuditSpec>,
        rules: &[Rule],
        requirements: &[DataClassRequirement],
        err: &mut dyn FnMut(String, String),
    ) -> Self {
        let listed = spec.and_then(|a| a.record_values.as_ref()).map(|names| {
            let mut set = BTreeSet::new();
            for (i, name) in names.iter().enumerate() {
                let path = format!("federation.audit.record_values[{i}]");
                if name.trim().is_empty() {
                    err(path, "the attribute name is empty".into());
                } else if !set.insert(name.clone()) {
                    err(path, format!("attribute `{name}` is listed twice"));
                }
            }
            set
        });
        let mut reads_through = Vec::with_capacity(rules.len());
        let mut so_far = BTreeSet::new();
        for rule in rules {
            if let Some(c) = &rule.condition {
                so_far.extend(c.reads());
            }
            reads_through.push(so_far.clone());
        }
        let requirement_reads = requirements
            .iter()
            .flat_map(|q| q.condition.reads())
            .collect();
        Self {
            listed,
            reads_through,
            requirement_reads,
        }
    }

    /// True when the policy lists the attributes itself.
    pub fn is_listed(&self) -> bool {
        self.listed.is_some()
    }

    /// True when a record may keep `name`'s value everywhere, for a decision
    /// that matched rule `rule_index` (`None`: no rule matched).
    pub fn keeps(&self, name: &str, rule_index: Option<usize>) -> bool {
        if let Some(listed) = &self.listed {
            return listed.contains(name);
        }
        match rule_index {
            Some(i) => {
                self.reads_through.get(i).is_some_and(|r| r.contains(name))
                    || self.requirement_reads.contains(name)
            }
            None => self.reads_through.last().is_some_and(|r| r.contains(name)),
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::policy::Policy;

    fn policy(extra: &str) -> Result<Policy, String> {
        let text = format!(
            "federation:\n  name: t\n  regions:\n    - name: a\n      endpoint: x\n    - name: b\n      endpoint: y\n  routing_rules:\n    - condition: \"tier == 'gold'\"\n      primary_region: a\n    - condition: \"customer_region in ['DE']\"\n      primary_region: b\n  data_class_requirements:\n    - condition: \"data_class == 'pii'\"\n      requires: [GDPR]\n{extra}"
        );
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let path = dir.path().join("f.yaml");
        std::fs::write(&path, text).map_err(|e| e.to_string())?;
        Policy::load_file(&path).map_err(|e| e.to_string())
    }

    #[test]
    fn default_keeps_what_the_decision_read() {
        let p = policy("").expect("loads");
        let v = &p.record_values;
        assert!(!v.is_listed());
        // Rule 1 matched: only its condition and the requirements were read.
        assert!(v.keeps("tier", Some(0)) && v.keeps("data_class", Some(0)));
        assert!(!v.keeps("customer_region", Some(0)));
        // Rule 2 matched: rule 1 was read on the way.
        assert!(v.keeps("tier", Some(1)) && v.keeps("customer_region", Some(1)));
        assert!(!v.keeps("email", Some(1)));
        // No rule: every rule was read, the requirements were not.
        assert!(v.keeps("customer_region", None) && !v.keeps("data_class", None));
    }

    #[test]
    fn a_list_replaces_the_default_and_is_checked_with_positions() {
        let p = policy("  audit:\n    record_values: [customer_region]\n").expect("loads");
        assert!(p.record_values.keeps("customer_region", Some(0)));
        assert!(!p.record_values.keeps("tier", Some(0)));
        let err = policy("  audit:\n    record_values: [customer_region, customer_region]\n")
            .expect_err("twice");
        assert!(
            err.contains("record_values[1]") && err.contains("twice"),
            "{err}"
        );
        assert!(
            err.contains("f.yaml:17:38:"),
            "line and column of the duplicate: {err}"
        );
        let err = policy("  audit:\n    record_value: [x]\n").expect_err("unknown key");
        assert!(err.contains("record_value"), "{err}");
    }
}
