//! Tests of the static audit: each finding on a policy that has the problem,
//! and its absence on one that does not.

use std::path::Path;

use super::*;
use crate::config;

fn policy_file(name: &str) -> Policy {
    let path = format!("{}/../policies/{name}", env!("CARGO_MANIFEST_DIR"));
    Policy::load_file(Path::new(&path)).expect("policy loads")
}

fn policy_text(text: &str) -> Policy {
    let loaded = config::load_from_text(Path::new("test.yaml"), text).expect("parses");
    Policy::from_loaded(&loaded).expect("valid")
}

fn kinds(r: &Report) -> Vec<(&'static str, Severity)> {
    r.findings.iter().map(|f| (f.kind, f.severity)).collect()
}

fn find<'a>(r: &'a Report, kind: &str) -> Vec<&'a Finding> {
    r.findings.iter().filter(|f| f.kind == kind).collect()
}

fn s(v: &str) -> AttrValue {
    AttrValue::Str(v.to_string())
}

#[test]
fn user_example_findings() {
    let r = check(&policy_file("seed-federation.yaml"));
    assert!(r.exhaustive);
    assert!(!r.has_errors(), "{:#?}", r.findings);
    let drops = find(&r, "failover-drops-tag");
    assert_eq!(drops.len(), 2, "{:#?}", r.findings);
    let gdpr = drops
        .iter()
        .find(|f| f.message.contains("GDPR"))
        .expect("GDPR drop reported");
    assert_eq!(gdpr.severity, Severity::Warning);
    assert!(gdpr.message.contains("north_america"));
    assert!(
        gdpr.rule
            .as_deref()
            .is_some_and(|l| l.starts_with("rule 2"))
    );
    assert_eq!(
        gdpr.example.as_ref().and_then(|e| e.get("customer_region")),
        Some(&s("DE"))
    );
    let unreachable = find(&r, "unreachable-region");
    assert_eq!(unreachable.len(), 1);
    assert!(unreachable[0].message.contains("asia_pacific"));
    let unmatched = find(&r, "unmatched-input");
    assert_eq!(unmatched.len(), 1);
    assert_eq!(
        unmatched[0]
            .example
            .as_ref()
            .and_then(|e| e.get("customer_region")),
        Some(&s("JP"))
    );
    assert_eq!(find(&r, "unmatched-missing-attribute").len(), 1);
    assert!(find(&r, "shadowed-rule").is_empty());
    assert!(find(&r, "overlapping-rules").is_empty());
    assert!(find(&r, "not-analysed").is_empty());
}

#[test]
fn rule_one_failover_drops_hipaa() {
    // north_america holds SOX and HIPAA; its backup europe holds GDPR and SOX.
    let r = check(&policy_file("seed-federation.yaml"));
    let hipaa: Vec<_> = find(&r, "failover-drops-tag")
        .into_iter()
        .filter(|f| f.message.contains("HIPAA"))
        .collect();
    assert_eq!(hipaa.len(), 1, "{:#?}", r.findings);
    assert!(
        hipaa[0]
            .rule
            .as_deref()
            .is_some_and(|l| l.starts_with("rule 1"))
    );
}

#[test]
fn requires_makes_the_dropping_failover_an_error() {
    let r = check(&policy_file("seed-requires-gdpr.yaml"));
    assert!(r.has_errors());
    let e = find(&r, "failover-lacks-required-tag");
    assert_eq!(e.len(), 1);
    assert_eq!(e[0].severity, Severity::Error);
    assert!(e[0].message.contains("GDPR"));
    // Only rule 1's HIPAA drop remains a warning.
    let drops = find(&r, "failover-drops-tag");
    assert_eq!(drops.len(), 1);
    assert!(drops[0].message.contains("HIPAA"));
}

#[test]
fn data_class_requirement_that_applies_makes_it_an_error() {
    let r = check(&policy_file("seed-data-class-gdpr.yaml"));
    let e = find(&r, "failover-lacks-required-tag");
    assert_eq!(e.len(), 1, "{:#?}", r.findings);
    let ex = e[0].example.as_ref().expect("example");
    assert_eq!(ex.get("data_class"), Some(&s("pii")));
}

#[test]
fn data_class_requirement_that_cannot_apply_stays_a_warning() {
    let text = std::fs::read_to_string(format!(
        "{}/../policies/seed-data-class-gdpr.yaml",
        env!("CARGO_MANIFEST_DIR")
    ))
    .expect("read")
    .replace(
        "customer_region in ['UK', 'DE', 'FR']",
        "customer_region == 'US'",
    );
    let r = check(&policy_text(&text));
    assert!(
        find(&r, "failover-lacks-required-tag").is_empty(),
        "{:#?}",
        r.findings
    );
    assert_eq!(find(&r, "failover-drops-tag").len(), 2);
}

#[test]
fn clean_policy_has_no_findings() {
    let r = check(&policy_file("clean.yaml"));
    assert!(r.findings.is_empty(), "{:#?}", r.findings);
    assert!(r.exhaustive);
}

#[test]
fn shadowed_and_overlapping_rules() {
    let r = check(&policy_file("shadowed.yaml"));
    let sh = find(&r, "shadowed-rule");
    assert_eq!(sh.len(), 1, "{:#?}", r.findings);
    assert!(sh[0].rule.as_deref().is_some_and(|l| l.contains("germany")));
    assert_eq!(
        sh[0]
            .example
            .as_ref()
            .and_then(|e| e.get("customer_region")),
        Some(&s("DE"))
    );
    let ov = find(&r, "overlapping-rules");
    assert_eq!(ov.len(), 1, "{:#?}", r.findings);
    assert!(
        ov[0]
            .rule
            .as_deref()
            .is_some_and(|l| l.starts_with("rule 3"))
    );
    assert_eq!(
        ov[0]
            .example
            .as_ref()
            .and_then(|e| e.get("customer_region")),
        Some(&s("FR"))
    );
    // A default rule is not an overlap, and with it nothing is unmatched.
    assert!(find(&r, "unmatched-input").is_empty());
}

const BASE: &str = "federation:\n  name: t\n  regions:\n    - name: a\n      endpoint: x\n      compliance: [GDPR]\n    - name: b\n      endpoint: y\n      compliance: [GDPR]\n  routing_rules:\n";

#[test]
fn never_matching_rule() {
    let r = check(&policy_text(&format!(
        "{BASE}    - condition: \"r == 'X' && r == 'Y'\"\n      primary_region: a\n      backup_region: b\n    - default: true\n      primary_region: b\n"
    )));
    let f = find(&r, "never-matches");
    assert_eq!(f.len(), 1, "{:#?}", r.findings);
    assert!(find(&r, "shadowed-rule").is_empty());
}

#[test]
fn shadowed_default_rule() {
    let r = check(&policy_text(&format!(
        "{BASE}    - condition: \"r == 'X' || r != 'X' || true\"\n      primary_region: a\n      backup_region: b\n    - default: true\n      primary_region: b\n"
    )));
    assert_eq!(find(&r, "shadowed-rule").len(), 1, "{:#?}", r.findings);
}

#[test]
fn conditions_outside_the_fragment_are_not_analysed() {
    let r = check(&policy_text(&format!(
        "{BASE}    - condition: \"r.startsWith('E')\"\n      primary_region: a\n      backup_region: b\n    - condition: \"r == 'US'\"\n      primary_region: b\n"
    )));
    let na = find(&r, "not-analysed");
    assert!(!na.is_empty(), "{:#?}", r.findings);
    assert!(na.iter().all(|f| f.severity == Severity::Info));
    assert!(!r.exhaustive);
    // Inputs reaching the unanalysed rule are not guessed about.
    assert!(find(&r, "unmatched-input").is_empty(), "{:#?}", r.findings);
    assert!(find(&r, "shadowed-rule").is_empty());
}

#[test]
fn too_many_inputs_is_reported_not_guessed() {
    let mut cond = Vec::new();
    for i in 0..12 {
        cond.push(format!("x{i} in ['a', 'b', 'c']"));
    }
    let r = check(&policy_text(&format!(
        "{BASE}    - condition: \"{}\"\n      primary_region: a\n      backup_region: b\n",
        cond.join(" && ")
    )));
    assert_eq!(r.inputs_examined, 0);
    assert!(
        find(&r, "not-analysed")
            .iter()
            .any(|f| f.message.contains("cap"))
    );
    assert!(find(&r, "unmatched-input").is_empty());
}

#[test]
fn no_compliant_region_is_an_error() {
    let text = "federation:\n  name: t\n  regions:\n    - name: a\n      endpoint: x\n      compliance: [SOX]\n    - name: b\n      endpoint: y\n  routing_rules:\n    - condition: \"r == 'DE'\"\n      primary_region: a\n      backup_region: b\n  data_class_requirements:\n    - condition: \"d == 'pii'\"\n      requires: [GDPR]\n";
    let r = check(&policy_text(text));
    let f = find(&r, "no-compliant-region");
    assert_eq!(f.len(), 1, "{:#?}", r.findings);
    assert!(r.has_errors());
    let _ = kinds(&r);
}

#[test]
fn fragment_membership() {
    let frag = |src: &str| {
        super::super::Condition::compile(src)
            .expect("compiles")
            .ir()
            .is_some_and(in_fragment)
    };
    assert!(frag("a == 'x' || !(b in ['y', 'z']) && a != 'q'"));
    assert!(!frag("a == b"));
    assert!(!frag("a == 1"));
    assert!(!frag("a in b"));
    assert!(!frag("a < 'x'"));
}

// ---------------------------------------------------------------------------
// Property tests: on the fragment, the audit's claims hold on random inputs.

mod props {
    use proptest::prelude::*;

    use super::*;

    fn atom() -> impl Strategy<Value = String> {
        let attr = prop_oneof![Just("a"), Just("b")];
        let lit = prop_oneof![Just("x"), Just("y"), Just("z")];
        prop_oneof![
            (attr.clone(), lit.clone()).prop_map(|(a, l)| format!("{a} == '{l}'")),
            (attr.clone(), lit.clone()).prop_map(|(a, l)| format!("{a} != '{l}'")),
            (attr, lit.clone(), lit).prop_map(|(a, l, m)| format!("{a} in ['{l}', '{m}']")),
        ]
    }

    fn cond() -> impl Strategy<Value = String> {
        atom().prop_recursive(3, 8, 2, |inner| {
            prop_oneof![
                (inner.clone(), inner.clone()).prop_map(|(l, r)| format!("({l} && {r})")),
                (inner.clone(), inner.clone()).prop_map(|(l, r)| format!("({l} || {r})")),
                inner.prop_map(|x| format!("!({x})")),
            ]
        })
    }

    fn policy_of(conds: &[(String, bool)]) -> Policy {
        let mut text = String::from(
            "federation:\n  name: t\n  regions:\n    - name: p\n      endpoint: x\n    - name: q\n      endpoint: y\n  routing_rules:\n",
        );
        for (c, to_p) in conds {
            let (pr, bk) = if *to_p { ("p", "q") } else { ("q", "p") };
            text.push_str(&format!(
                "    - condition: \"{c}\"\n      primary_region: {pr}\n      backup_region: {bk}\n"
            ));
        }
        policy_text(&text)
    }

    fn input() -> impl Strategy<Value = Attributes> {
        let v = prop::option::of(prop_oneof![
            Just("x"),
            Just("y"),
            Just("z"),
            Just("w"),
            Just("JP")
        ]);
        (v.clone(), v).prop_map(|(a, b)| {
            let mut m = Attributes::new();
            if let Some(a) = a {
                m.insert("a".into(), AttrValue::Str(a.into()));
            }
            if let Some(b) = b {
                m.insert("b".into(), AttrValue::Str(b.into()));
            }
            m
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(300))]

        #[test]
        fn audit_claims_hold(
            conds in prop::collection::vec((cond(), any::<bool>()), 1..5),
            inputs in prop::collection::vec(input(), 20),
        ) {
            let p = policy_of(&conds);
            let r = check(&p);
            prop_assert!(r.exhaustive);
            for f in &r.findings {
                match f.kind {
                    "unmatched-input" | "unmatched-missing-attribute" => {
                        let ex = f.example.as_ref().expect("example");
                        prop_assert_eq!(p.match_rule(ex).rule, None);
                    }
                    "shadowed-rule" | "never-matches" => {
                        let i = p.rules.iter().position(|x| Some(x.label()) == f.rule).expect("rule");
                        for a in &inputs {
                            prop_assert_ne!(p.match_rule(a).rule, Some(i), "{:?}", a);
                        }
                    }
                    "overlapping-rules" => {
                        let ex = f.example.as_ref().expect("example");
                        let j = p.rules.iter().position(|x| Some(x.label()) == f.rule).expect("rule");
                        let cond = p.rules[j].condition.as_ref().expect("condition");
                        prop_assert_eq!(cond.evaluate(ex), Ok(true));
                        prop_assert!(p.match_rule(ex).rule.is_some_and(|i| i < j));
                    }
                    _ => {}
                }
            }
            let unmatched = r.findings.iter().any(|f| f.kind.starts_with("unmatched"));
            if !unmatched {
                for a in &inputs {
                    prop_assert!(p.match_rule(a).rule.is_some(), "{:?} unmatched", a);
                }
            }
            // Every rule that some random input reaches first is not reported dead.
            for a in &inputs {
                if let Some(i) = p.match_rule(a).rule {
                    let label = p.rules[i].label();
                    prop_assert!(!r.findings.iter().any(|f| (f.kind == "shadowed-rule" || f.kind == "never-matches") && f.rule.as_deref() == Some(label.as_str())));
                }
            }
        }
    }
}
