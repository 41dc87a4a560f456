//! Sets of primaries: load errors with positions, the balance modes,
//! affinity, and the draw's split under stale loads.

use std::collections::BTreeMap;
use std::path::Path;

use super::super::*;

const EU_SET: &str = include_str!("../../../../policies/eu-set.yaml");

fn load(text: &str) -> Result<Policy, LoadError> {
    let loaded = config::load_from_text(Path::new("set.yaml"), text)?;
    Policy::from_loaded(&loaded)
}

fn one_error(text: &str) -> PolicyError {
    match load(text) {
        Err(LoadError::Invalid(e)) => {
            assert_eq!(e.len(), 1, "{e:#?}");
            e.into_iter().next().expect("one")
        }
        other => panic!("expected one policy error, got {other:?}"),
    }
}

/// `set.yaml:line:column` of the first character of `needle` in `text`.
fn at(text: &str, needle: &str) -> String {
    let offset = text.find(needle).expect("needle present");
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let column = offset - before.rfind('\n').map_or(0, |i| i + 1) + 1;
    format!("set.yaml:{line}:{column}")
}

/// The EU set policy with its rule's set lines replaced by `lines`.
fn with_set(lines: &str) -> String {
    let from = "      primary_regions: [\"europe_west\", \"europe_central\"]\n      balance: least_loaded\n";
    assert!(EU_SET.contains(from));
    EU_SET.replacen(from, lines, 1)
}

#[test]
fn the_example_set_loads() {
    let p = load(EU_SET).expect("loads");
    let r = &p.rules[0];
    assert_eq!(r.primaries, ["europe_west", "europe_central"]);
    assert!(r.is_set());
    assert_eq!(r.balance, Balance::LeastLoaded);
    assert_eq!(r.affinity.as_deref(), Some("conversation_id"));
    assert_eq!(p.rules[1].primaries, ["north_america"]);
    assert!(!p.rules[1].is_set());
}

#[test]
fn an_empty_set_is_an_error_at_its_position() {
    let text = with_set("      primary_regions: []\n");
    let e = one_error(&text);
    assert_eq!(e.path, "federation.routing_rules[0].primary_regions");
    assert_eq!(e.location, at(&text, "[]"));
    assert!(e.message.contains("empty"), "{e}");
}

#[test]
fn a_region_twice_in_a_set_is_an_error_at_the_second() {
    let text = with_set("      primary_regions: [europe_west, europe_central, europe_west]\n");
    let e = one_error(&text);
    assert_eq!(e.path, "federation.routing_rules[0].primary_regions[2]");
    assert_eq!(e.location, at(&text, "europe_west]"));
    assert!(e.message.contains("listed twice"), "{e}");
}

#[test]
fn weights_naming_a_region_outside_the_set() {
    let text = with_set(
        "      primary_regions: [europe_west, europe_central]\n      balance: weighted\n      weights: {europe_west: 3, north_america: 1}\n",
    );
    let e = one_error(&text);
    assert_eq!(e.path, "federation.routing_rules[0].weights.north_america");
    assert_eq!(e.location, at(&text, "1}"));
    assert!(e.message.contains("not a member"), "{e}");
}

#[test]
fn weighted_without_weights() {
    let text =
        with_set("      primary_regions: [europe_west, europe_central]\n      balance: weighted\n");
    let e = one_error(&text);
    assert_eq!(e.path, "federation.routing_rules[0].balance");
    assert_eq!(e.location, at(&text, "weighted"));
    assert!(e.message.contains("needs `weights`"), "{e}");
}

#[test]
fn requires_not_held_by_a_member() {
    let text = with_set("      primary_regions: [europe_west, north_america]\n");
    let e = one_error(&text);
    assert_eq!(e.path, "federation.routing_rules[0].requires");
    assert_eq!(
        e.location,
        at(&text, "[\"GDPR\"]\n    - name: \"americas\"")
    );
    assert!(
        e.message.contains("`north_america` lacks GDPR"),
        "{}",
        e.message
    );
}

#[test]
fn other_set_mistakes_are_errors_too() {
    // Both forms at once.
    let text = EU_SET.replacen(
        "      balance: least_loaded\n",
        "      balance: least_loaded\n      primary_region: europe_west\n",
        1,
    );
    assert!(one_error(&text).message.contains("not both"));
    // A backup that is a member.
    let text = EU_SET.replacen(
        "      balance: least_loaded\n",
        "      balance: least_loaded\n      backup_region: europe_central\n",
        1,
    );
    assert!(
        one_error(&text)
            .message
            .contains("member of the rule's `primary_regions`")
    );
    // Weights without `weighted`.
    let text = EU_SET.replacen(
        "      balance: least_loaded\n",
        "      balance: least_loaded\n      weights: {europe_west: 1}\n",
        1,
    );
    assert!(
        one_error(&text)
            .message
            .contains("only with `balance: weighted`")
    );
    // A balance on a single primary.
    let text = EU_SET.replacen(
        "      primary_region: \"north_america\"\n",
        "      primary_region: \"north_america\"\n      affinity: conversation_id\n",
        1,
    );
    assert!(one_error(&text).message.contains("applies to a set"));
    // An unknown balance is the loader's error, with its position.
    let text = EU_SET.replacen("balance: least_loaded", "balance: fastest", 1);
    let err = load(&text).expect_err("unknown variant").to_string();
    assert!(
        err.contains("set.yaml:") && err.contains("fastest"),
        "{err}"
    );
}

fn attrs(pairs: &[(&str, &str)]) -> Attributes {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), AttrValue::Str(v.to_string())))
        .collect()
}

fn loads(pairs: &[(&str, u32, u32, u32)]) -> BTreeMap<String, Load> {
    pairs
        .iter()
        .map(|(r, free, total, queued)| {
            (
                r.to_string(),
                Load {
                    total_slots: *total,
                    free_slots: *free,
                    queue_depth: *queued,
                },
            )
        })
        .collect()
}

fn no_affinity() -> Policy {
    load(&EU_SET.replacen("      affinity: conversation_id\n", "", 1)).expect("loads")
}

/// How many of `n` evenly spread draws land in each region.
fn split(p: &Policy, view: &StaticView, a: &Attributes, n: u64) -> BTreeMap<String, u64> {
    let bound = view.bind(p);
    let mut out = BTreeMap::new();
    for i in 0..n {
        let draw = (u64::MAX / n).wrapping_mul(i);
        let d = decide_with(p, a, &bound, draw);
        *out.entry(d.outcome.region().unwrap_or("rejected").to_string())
            .or_insert(0) += 1;
    }
    out
}

#[test]
fn least_loaded_splits_by_free_capacity_and_never_leaves_the_set() {
    let p = no_affinity();
    let de = attrs(&[("customer_region", "DE")]);
    // west: 8 slots, 6 busy; central: 8 slots idle.
    let view = StaticView {
        loads: loads(&[("europe_west", 2, 8, 0), ("europe_central", 8, 8, 0)]),
        ..Default::default()
    };
    let s = split(&p, &view, &de, 1000);
    let (west, central) = (s["europe_west"], s["europe_central"]);
    assert_eq!(west + central, 1000, "{s:?}");
    // Weights 8/(1+0.75)=4.57 and 8: central gets 8/12.57 = 64%.
    assert!(central > west, "{s:?}");
    assert!((600..=680).contains(&central), "{s:?}");

    // The decision shows the loads seen and why the winner won.
    let d = decide_with(&p, &de, &view.bind(&p), 0);
    let b = d
        .balance
        .as_ref()
        .expect("a set decision has a balance note");
    assert_eq!(b.mode, "least_loaded");
    assert_eq!(b.loads.len(), 2);
    assert!(b.why.contains("draw"), "{}", b.why);
    assert!(d.reason.contains("of the set"), "{}", d.reason);
    assert_eq!(d.candidates.len(), 2);
    assert!(
        b.loads.iter().all(|l| l.advertised && l.share_ppm > 0),
        "{b:?}"
    );
}

#[test]
fn residency_first_a_full_or_dead_member_is_skipped_and_nothing_goes_elsewhere() {
    let p = no_affinity();
    let de = attrs(&[("customer_region", "DE")]);
    let view = StaticView {
        full: ["europe_central".to_string()].into(),
        loads: loads(&[("europe_west", 0, 8, 50), ("europe_central", 8, 8, 0)]),
        ..Default::default()
    };
    // Central idle but full (its queue limit): every task goes to west.
    let s = split(&p, &view, &de, 200);
    assert_eq!(s.get("europe_west"), Some(&200), "{s:?}");
    // Both unavailable: rejected, never north_america (not a candidate).
    let view = StaticView {
        full: ["europe_central".to_string()].into(),
        down: ["europe_west".to_string()].into(),
        ..Default::default()
    };
    let d = decide_with(&p, &de, &view.bind(&p), 7);
    assert_eq!(
        d.outcome,
        Outcome::Rejected {
            rejection: Rejection::Unavailable
        }
    );
}

#[test]
fn ties_and_missing_capacity_go_by_priority_then_name() {
    let p = no_affinity();
    let de = attrs(&[("customer_region", "DE")]);
    // No capacity advertised anywhere: by priority (west 1, central 2).
    let s = split(&p, &StaticView::default(), &de, 50);
    assert_eq!(s.get("europe_west"), Some(&50), "{s:?}");
    // Equal priorities: by name.
    let text = no_affinity_text().replacen("priority: 1", "priority: 2", 1);
    let p = load(&text).expect("loads");
    let s = split(&p, &StaticView::default(), &de, 50);
    assert_eq!(s.get("europe_central"), Some(&50), "{s:?}");
    // `balance: priority` ignores load.
    let text = no_affinity_text().replacen("balance: least_loaded", "balance: priority", 1);
    let p = load(&text).expect("loads");
    let view = StaticView {
        loads: loads(&[("europe_west", 0, 8, 9), ("europe_central", 8, 8, 0)]),
        ..Default::default()
    };
    let s = split(&p, &view, &de, 50);
    assert_eq!(s.get("europe_west"), Some(&50), "{s:?}");
}

fn no_affinity_text() -> String {
    EU_SET.replacen("      affinity: conversation_id\n", "", 1)
}

#[test]
fn weighted_follows_the_weights() {
    let text = no_affinity_text().replacen(
        "balance: least_loaded",
        "balance: weighted\n      weights: {europe_west: 3, europe_central: 1}",
        1,
    );
    let p = load(&text).expect("loads");
    let s = split(
        &p,
        &StaticView::default(),
        &attrs(&[("customer_region", "FR")]),
        400,
    );
    let west = s.get("europe_west").copied().unwrap_or(0);
    assert!((298..=302).contains(&west), "{s:?}");
    assert_eq!(s.values().sum::<u64>(), 400, "{s:?}");
}

#[test]
fn affinity_keeps_a_key_in_one_member_and_moves_only_the_dead_members_keys() {
    let p = load(EU_SET).expect("loads");
    let idle = StaticView {
        loads: loads(&[("europe_west", 8, 8, 0), ("europe_central", 8, 8, 0)]),
        ..Default::default()
    };
    let place = |view: &StaticView, conv: &str, draw: u64| {
        let a = attrs(&[("customer_region", "DE"), ("conversation_id", conv)]);
        decide_with(&p, &a, &view.bind(&p), draw)
            .outcome
            .region()
            .map(str::to_string)
    };
    let keys: Vec<String> = (0..200).map(|i| format!("conv-{i}")).collect();
    let before: Vec<Option<String>> = keys.iter().map(|k| place(&idle, k, 1)).collect();
    // Same key, any draw, any load: same member.
    let busy = StaticView {
        loads: loads(&[("europe_west", 0, 8, 40), ("europe_central", 8, 8, 0)]),
        ..Default::default()
    };
    for (k, b) in keys.iter().zip(&before) {
        assert_eq!(&place(&idle, k, u64::MAX), b, "{k}");
        assert_eq!(&place(&busy, k, 12345), b, "{k}");
    }
    let west = before
        .iter()
        .filter(|r| r.as_deref() == Some("europe_west"))
        .count();
    assert!(
        (60..=140).contains(&west),
        "rendezvous spreads keys: {west} of 200"
    );
    // West dies: only west's keys move (to central); central's stay.
    let west_down = StaticView {
        down: ["europe_west".to_string()].into(),
        ..Default::default()
    };
    for (k, b) in keys.iter().zip(&before) {
        let now = place(&west_down, k, 3);
        assert_eq!(now.as_deref(), Some("europe_central"), "{k}");
        if b.as_deref() == Some("europe_central") {
            assert_eq!(&now, b);
        }
    }
    // The decision keeps the key's digest, never its value.
    let a = attrs(&[
        ("customer_region", "DE"),
        ("conversation_id", "alice@example.com"),
    ]);
    let d = decide_with(&p, &a, &idle.bind(&p), 0);
    let b = d.balance.as_ref().expect("note");
    assert_eq!(b.mode, "affinity");
    assert_eq!(b.affinity_digest.as_ref().map(String::len), Some(32));
    let text = serde_json::to_string(&d).expect("json");
    assert!(!text.contains("alice"), "{text}");
    // Without the attribute, the balance decides.
    let d = decide_with(&p, &attrs(&[("customer_region", "DE")]), &idle.bind(&p), 0);
    assert_eq!(d.balance.expect("note").mode, "least_loaded");
}

/// The herding the draw avoids, measured. Each heartbeat 4 entry regions
/// send 5 tasks each (20 a beat, for 24 slots a beat in all: west 16,
/// central 8), all seeing the loads advertised at the last heartbeat.
/// Always sending to the least loaded member sends each beat's whole
/// burst to one region, which then queues; the draw splits each burst by
/// free capacity. The figure is the longest queue wait reached, in beats
/// (backlog / slots).
#[test]
fn the_draw_splits_bursts_under_stale_loads_where_the_minimum_herds() {
    let p = no_affinity();
    let de = attrs(&[("customer_region", "DE")]);
    let names = ["europe_west", "europe_central"];
    let slots = [16u32, 8u32];
    let simulate = |always_min: bool| {
        let mut backlog = [0u32; 2];
        let mut worst_wait = 0.0f64;
        let mut rng = 0x9e37_79b9_7f4a_7c15u64;
        for _beat in 0..200 {
            let seen = StaticView {
                loads: (0..2)
                    .map(|i| {
                        let busy = backlog[i].min(slots[i]);
                        (
                            names[i].to_string(),
                            Load {
                                total_slots: slots[i],
                                free_slots: slots[i] - busy,
                                queue_depth: backlog[i] - busy,
                            },
                        )
                    })
                    .collect(),
                ..Default::default()
            };
            let mut arrivals = [0u32; 2];
            for _task in 0..20 {
                rng = rng
                    .wrapping_mul(6_364_136_223_846_793_005)
                    .wrapping_add(1_442_695_040_888_963_407);
                let i = if always_min {
                    let u = |i: usize| seen.loads[names[i]].utilisation();
                    usize::from(u(1) < u(0))
                } else {
                    let d = decide_with(&p, &de, &seen.bind(&p), rng);
                    usize::from(d.outcome.region() == Some("europe_central"))
                };
                arrivals[i] += 1;
            }
            for i in 0..2 {
                backlog[i] = (backlog[i] + arrivals[i]).saturating_sub(slots[i]);
                worst_wait = worst_wait.max(f64::from(backlog[i]) / f64::from(slots[i]));
            }
        }
        worst_wait
    };
    let herd = simulate(true);
    let drawn = simulate(false);
    eprintln!(
        "longest queue wait under stale loads (beats): always the least loaded {herd:.2}, draw by free share {drawn:.2}"
    );
    assert!(
        herd >= 1.0,
        "the minimum herds each burst onto one region: {herd}"
    );
    assert!(drawn < herd, "the draw waits less: {drawn} vs {herd}");
}

#[test]
fn policy_diff_sees_a_change_of_membership_but_not_of_balance() {
    let old = load(EU_SET).expect("old");
    // Balance and affinity changes move no data anywhere new.
    let rebalanced = load(&EU_SET.replacen("balance: least_loaded", "balance: priority", 1))
        .expect("rebalanced");
    assert!(!diff::diff(&old, &rebalanced).changed());
    // A member leaving the set is a residency change.
    let shrunk = load(&with_set("      primary_regions: [europe_west]\n")).expect("shrunk");
    let report = diff::diff(&old, &shrunk);
    assert!(report.changed(), "{report:?}");
    let change = &report.changes[0];
    assert!(
        change
            .old
            .to_string()
            .contains("{europe_central, europe_west}"),
        "{}",
        change.old
    );
    assert!(
        change.new.to_string().starts_with("europe_west"),
        "{}",
        change.new
    );
}

#[test]
fn policy_check_warns_where_priorities_cannot_matter() {
    let text = no_affinity_text().replacen(
        "balance: least_loaded",
        "balance: weighted\n      weights: {europe_west: 3, europe_central: 1}",
        1,
    );
    let report = analysis::check(&load(&text).expect("loads"));
    assert!(
        report
            .findings
            .iter()
            .any(|f| f.kind == "set-priority-unused"),
        "{:#?}",
        report.findings
    );
    // A member without a weight: its priority matters, no warning.
    let text = no_affinity_text().replacen(
        "balance: least_loaded",
        "balance: weighted\n      weights: {europe_west: 3}",
        1,
    );
    let report = analysis::check(&load(&text).expect("loads"));
    assert!(
        !report
            .findings
            .iter()
            .any(|f| f.kind == "set-priority-unused")
    );
    // Equal priorities in a least_loaded set: ties by name, said.
    let text = no_affinity_text().replacen("priority: 1", "priority: 2", 1);
    let report = analysis::check(&load(&text).expect("loads"));
    assert!(report.findings.iter().any(|f| f.kind == "set-priority-tie"));
}

#[test]
fn with_three_members_a_dying_member_moves_only_its_own_keys() {
    let text = EU_SET
        .replacen(
            "    - name: \"north_america\"\n",
            "    - name: \"europe_north\"\n      endpoint: \"https://eu-north.example.com\"\n      priority: 3\n      compliance: [\"GDPR\"]\n    - name: \"north_america\"\n",
            1,
        )
        .replacen(
            "[\"europe_west\", \"europe_central\"]",
            "[\"europe_west\", \"europe_central\", \"europe_north\"]",
            1,
        );
    let p = load(&text).expect("loads");
    let place = |view: &StaticView, conv: &str| {
        let a = attrs(&[("customer_region", "UK"), ("conversation_id", conv)]);
        decide_with(&p, &a, &view.bind(&p), 99)
            .outcome
            .region()
            .map(str::to_string)
            .unwrap_or_default()
    };
    let all = StaticView::default();
    let keys: Vec<String> = (0..300).map(|i| format!("k{i}")).collect();
    let before: Vec<String> = keys.iter().map(|k| place(&all, k)).collect();
    for member in ["europe_west", "europe_central", "europe_north"] {
        let n = before.iter().filter(|r| *r == member).count();
        assert!((60..=140).contains(&n), "{member} holds {n} of 300");
    }
    let central_down = StaticView {
        down: ["europe_central".to_string()].into(),
        ..Default::default()
    };
    let mut moved = 0;
    for (k, b) in keys.iter().zip(&before) {
        let now = place(&central_down, k);
        if b == "europe_central" {
            assert_ne!(now, "europe_central");
            moved += 1;
        } else {
            assert_eq!(&now, b, "{k} moved though its member lives");
        }
    }
    assert!(moved > 0);
    // Back again: every key is home.
    let back: Vec<String> = keys.iter().map(|k| place(&all, k)).collect();
    assert_eq!(back, before);
}
