//! Load errors with their positions, and decisions on the user's example.

use std::path::Path;

use super::*;

fn seed() -> String {
    federation_sandbox::SEED_POLICY.to_string()
}

fn load(text: &str) -> Result<Policy, LoadError> {
    let loaded = config::load_from_text(Path::new("seed.yaml"), text)?;
    Policy::from_loaded(&loaded)
}

fn errors(text: &str) -> Vec<PolicyError> {
    match load(text) {
        Err(LoadError::Invalid(e)) => e,
        other => panic!("expected invalid policy, got {other:?}"),
    }
}

/// Replaces `from` (which must occur) by `to`.
fn edit(from: &str, to: &str) -> String {
    let s = seed();
    assert!(s.contains(from), "{from}");
    s.replacen(from, to, 1)
}

fn one(text: &str) -> PolicyError {
    let e = errors(text);
    assert_eq!(e.len(), 1, "{e:#?}");
    e.into_iter().next().expect("one")
}

#[test]
fn seed_loads() {
    let p = load(&seed()).expect("loads");
    assert_eq!(p.rules.len(), 2);
    assert!(
        p.rules
            .iter()
            .all(|r| r.condition.as_ref().is_some_and(|c| c.ir().is_some()))
    );
}

#[test]
fn a_regions_endpoints_are_endpoint_and_endpoints_each_once() {
    let text = edit(
        "      endpoint: \"https://openclaw-eu.company.com\"\n",
        "      endpoint: \"https://openclaw-eu.company.com\"\n      endpoints: [\"https://eu-2.company.com\", \"https://openclaw-eu.company.com\", \"https://eu-3.company.com\"]\n",
    );
    let p = load(&text).expect("loads");
    let eu = p.region("europe").expect("europe");
    assert_eq!(
        eu.endpoints,
        [
            "https://openclaw-eu.company.com",
            "https://eu-2.company.com",
            "https://eu-3.company.com"
        ]
    );
    // Without `endpoints`: the one endpoint.
    let p = load(&seed()).expect("loads");
    assert_eq!(
        p.region("asia_pacific").expect("ap").endpoints,
        ["https://openclaw-ap.company.com"]
    );
}

#[test]
fn unknown_primary_region() {
    let e = one(&edit(
        "primary_region: \"europe\"",
        "primary_region: \"eu\"",
    ));
    assert_eq!(e.location, "seed.yaml:22:23");
    assert_eq!(e.path, "federation.routing_rules[1].primary_region");
    assert!(e.message.contains("unknown region `eu`"), "{e}");
}

#[test]
fn unknown_backup_region() {
    let e = one(&edit(
        "backup_region: \"north_america\"",
        "backup_region: \"north_amerika\"",
    ));
    assert_eq!(e.location, "seed.yaml:23:22");
    assert!(e.message.contains("north_amerika"), "{e}");
}

#[test]
fn backup_equal_to_primary() {
    let e = one(&edit(
        "backup_region: \"europe\"",
        "backup_region: \"north_america\"",
    ));
    assert_eq!(e.location, "seed.yaml:20:22");
    assert!(e.message.contains("is the rule's primary"), "{e}");
}

#[test]
fn duplicate_region_name() {
    let e = one(&edit("name: \"asia_pacific\"", "name: \"europe\""));
    assert_eq!(e.location, "seed.yaml:13:13");
    assert!(e.message.contains("duplicate region name `europe`"), "{e}");
}

#[test]
fn requires_tag_missing_on_primary() {
    let e = one(&edit(
        "      backup_region: \"europe\"\n",
        "      backup_region: \"europe\"\n      requires: [\"GDPR\"]\n",
    ));
    assert_eq!(e.location, "seed.yaml:21:17");
    assert_eq!(e.path, "federation.routing_rules[0].requires");
    assert!(e.message.contains("lacks GDPR"), "{e}");
}

#[test]
fn default_rule_must_be_last() {
    let e = one(&edit(
        "    - condition: \"customer_region in",
        "    - default: true\n      primary_region: \"europe\"\n    - condition: \"customer_region in",
    ));
    assert_eq!(e.location, "seed.yaml:21:16");
    assert_eq!(e.path, "federation.routing_rules[1].default");
    assert!(e.message.contains("must be the last rule"), "{e}");
}

#[test]
fn default_rule_with_condition() {
    let e = one(&edit(
        "      backup_region: \"europe\"\n",
        "      backup_region: \"europe\"\n      default: true\n",
    ));
    assert_eq!(e.location, "seed.yaml:21:16");
    assert!(e.message.contains("default rule has no condition"), "{e}");
}

#[test]
fn cel_error_in_quoted_condition_points_inside_it() {
    // The quote adds one column: 'UK' is at offset 19, the scalar's quote at column 18.
    let e = one(&edit(
        "customer_region in ['UK', 'DE', 'FR']",
        "customer_region in 'UK'",
    ));
    assert_eq!(e.location, "seed.yaml:21:38");
    assert!(e.message.contains("not a list"), "{e}");
}

#[test]
fn cel_error_in_plain_condition_points_inside_it() {
    let e = one(&edit(
        "\"customer_region in ['UK', 'DE', 'FR']\"",
        "customer_region in 'UK'",
    ));
    assert_eq!(e.location, "seed.yaml:21:37");
}

#[test]
fn cel_syntax_error_has_position() {
    let e = one(&edit(
        "customer_region == 'US' || customer_region == 'CA'",
        "customer_region == = 'US'",
    ));
    assert_eq!(e.location, "seed.yaml:18:38");
    assert!(e.message.contains("invalid CEL condition"), "{e}");
}

#[test]
fn unknown_function_has_position() {
    let e = one(&edit(
        "customer_region in ['UK', 'DE', 'FR']",
        "lookup(customer_region)",
    ));
    assert_eq!(e.location, "seed.yaml:21:25");
    assert!(e.message.contains("unknown function `lookup`"), "{e}");
}

#[test]
fn every_error_is_reported() {
    let text = edit("primary_region: \"europe\"", "primary_region: \"eu\"").replacen(
        "backup_region: \"europe\"",
        "backup_region: \"north_america\"",
        1,
    );
    assert_eq!(errors(&text).len(), 2);
}

fn attrs(pairs: &[(&str, &str)]) -> Attributes {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), AttrValue::Str(v.to_string())))
        .collect()
}

#[test]
fn decisions_on_the_user_example() {
    let p = load(&seed()).expect("loads");
    let none = StaticView::default();
    let d = p.decide(&attrs(&[("customer_region", "DE")]), &none.bind(&p));
    assert_eq!(
        d.outcome,
        Outcome::Routed {
            region: "europe".into()
        }
    );
    assert!(d.warnings.is_empty());

    let down = StaticView {
        down: ["europe".to_string()].into(),
        ..Default::default()
    };
    let d = p.decide(&attrs(&[("customer_region", "DE")]), &down.bind(&p));
    assert_eq!(
        d.outcome,
        Outcome::Failover {
            region: "north_america".into()
        }
    );
    assert!(d.warnings.iter().any(|w| w.contains("GDPR")), "{d:?}");

    let d = p.decide(&attrs(&[("customer_region", "JP")]), &none.bind(&p));
    assert_eq!(
        d.outcome,
        Outcome::Rejected {
            rejection: Rejection::NoRule
        }
    );
    assert!(d.evaluation_errors.is_empty());

    let d = p.decide(&Attributes::new(), &none.bind(&p));
    assert_eq!(d.evaluation_errors.len(), 2, "{d:?}");
    assert!(matches!(d.outcome, Outcome::Rejected { .. }));
}

#[test]
fn required_tag_refuses_the_failover() {
    let p = load(&edit(
        "      backup_region: \"north_america\"\n",
        "      backup_region: \"north_america\"\n      requires: [\"GDPR\"]\n",
    ))
    .expect("loads");
    let down = StaticView {
        down: ["europe".to_string()].into(),
        ..Default::default()
    };
    let d = p.decide(&attrs(&[("customer_region", "FR")]), &down.bind(&p));
    assert!(matches!(d.outcome, Outcome::Rejected { .. }), "{d:?}");
    assert_eq!(d.candidates[1].refusal, Some(Refusal::MissingTags));
}

#[test]
fn first_match_wins_and_errors_do_not_match() {
    let p = load(&edit(
        "customer_region == 'US' || customer_region == 'CA'",
        "tier == 'gold'",
    ))
    .expect("loads");
    let m = p.match_rule(&attrs(&[("customer_region", "DE")]));
    assert_eq!(m.rule, Some(1));
    assert_eq!(m.errors.len(), 1);
    assert!(m.errors[0].starts_with("rule 1:"), "{m:?}");
}

#[test]
fn refuse_keeps_failover_warnings_consistent() {
    let p = load(&seed()).expect("loads");
    let none = StaticView::default();
    let de = attrs(&[("customer_region", "DE")]);
    let mut d = p.decide(&de, &none.bind(&p));
    d.refuse("europe", Refusal::ForwardFailed, "connection refused");
    assert_eq!(
        d.outcome,
        Outcome::Failover {
            region: "north_america".into()
        }
    );
    d.refresh_warnings(&p);
    assert!(d.warnings.iter().any(|w| w.contains("GDPR")), "{d:?}");
    // A further refusal rejects the task: the failover warning goes away.
    d.refuse(
        "north_america",
        Refusal::ForwardFailed,
        "connection refused",
    );
    assert!(matches!(d.outcome, Outcome::Rejected { .. }));
    assert!(d.warnings.is_empty(), "{d:?}");
}

/// The user's federation as routing sees it, with some regions in failback
/// hold-down.
struct HeldDown<'a> {
    view: BoundStaticView<'a>,
    held: &'a [&'a str],
}

impl FederationView for HeldDown<'_> {
    fn region(&self, name: &str) -> Option<RegionView> {
        let mut v = self.view.region(name)?;
        v.held_down = self.held.contains(&name);
        Some(v)
    }
}

#[test]
fn a_held_down_region_is_the_last_resort_after_every_other_candidate_failed() {
    // Observed: US tasks rejected UNAVAILABLE with "north_america (primary):
    // hold_down; europe (backup): forward_failed".
    let p = load(&seed()).expect("loads");
    let none = StaticView::default();
    let view = HeldDown {
        view: none.bind(&p),
        held: &["north_america"],
    };
    let us = attrs(&[("customer_region", "US")]);
    let mut d = p.decide(&us, &view);
    // While another candidate is available, hold-down defers the task.
    assert_eq!(
        d.outcome,
        Outcome::Failover {
            region: "europe".into()
        }
    );
    assert_eq!(d.candidates[0].refusal, Some(Refusal::HoldDown));
    // The backup's forward fails: the held-down primary is tried next,
    // before rejecting, and the decision says why.
    d.refuse(
        "europe",
        Refusal::ForwardFailed,
        "forward timed out after 2s",
    );
    assert_eq!(
        d.outcome,
        Outcome::Routed {
            region: "north_america".into()
        },
        "{d:?}"
    );
    let na = &d.candidates[0];
    assert!(na.accepted() && na.last_resort(), "{na:?}");
    assert!(
        na.detail.contains("hold-down") && na.detail.contains("last resort"),
        "{na:?}"
    );
    assert!(
        d.reason
            .contains("north_america as the last resort, in failback hold-down"),
        "{}",
        d.reason
    );
    assert!(
        d.reason.contains("europe (backup): forward_failed"),
        "{}",
        d.reason
    );
    // If the last resort fails too, the task is rejected UNAVAILABLE, and
    // the reason still says the primary was in hold-down and tried last.
    d.refuse(
        "north_america",
        Refusal::ForwardFailed,
        "connection refused",
    );
    assert_eq!(
        d.outcome,
        Outcome::Rejected {
            rejection: Rejection::Unavailable
        }
    );
    assert!(
        d.reason
            .contains("connection refused (tried as the last resort while in failback hold-down)"),
        "{}",
        d.reason
    );
}

#[test]
fn a_held_down_backup_is_the_last_resort_when_the_primary_is_dead() {
    let p = load(&seed()).expect("loads");
    let down = StaticView {
        down: ["europe".to_string()].into(),
        ..Default::default()
    };
    let view = HeldDown {
        view: down.bind(&p),
        held: &["north_america"],
    };
    let d = p.decide(&attrs(&[("customer_region", "DE")]), &view);
    assert_eq!(
        d.outcome,
        Outcome::Failover {
            region: "north_america".into()
        },
        "{d:?}"
    );
    assert!(d.candidates[1].last_resort(), "{d:?}");
    assert!(
        d.reason.contains(
            "failed over to backup north_america as the last resort, in failback hold-down"
        ),
        "{}",
        d.reason
    );
    // The failover still flags the tag it drops.
    assert!(d.warnings.iter().any(|w| w.contains("GDPR")), "{d:?}");
}
