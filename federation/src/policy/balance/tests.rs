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
        .expect("a set decision has a balance note")
        .explain();
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
    let b = d.balance.as_ref().expect("note").explain();
    assert_eq!(b.mode, "affinity");
    assert_eq!(b.affinity_digest.as_ref().map(String::len), Some(32));
    let text = serde_json::to_string(&d).expect("json");
    assert!(!text.contains("alice"), "{text}");
    // Without the attribute, the balance decides.
    let d = decide_with(&p, &attrs(&[("customer_region", "DE")]), &idle.bind(&p), 0);
    assert_eq!(d.balance.expect("note").mode(), "least_loaded");
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

/// The balancing as it was first written (a sorted copy of the members,
/// weights looked up by name, ties compared by (priority, name)), kept as
/// the reference the in-place version must match exactly.
fn reference_order(
    rule: &Rule,
    attrs: &Attributes,
    members: &[(usize, Option<Load>)],
    draw: u64,
) -> (Vec<usize>, BalanceExplanation) {
    struct Member {
        index: usize,
        load: Option<Load>,
    }
    let members: Vec<Member> = members
        .iter()
        .map(|&(index, load)| Member { index, load })
        .collect();
    let name = |i: usize| rule.primaries[i].as_str();
    // (priority, name): the tie order.
    let key = |i: usize| (rule.primary_priorities[i], name(i));
    let mut note = BalanceExplanation {
        mode: rule.balance.as_str(),
        affinity: None,
        affinity_digest: None,
        draw_ppm: None,
        loads: members
            .iter()
            .map(|m| LoadSeen {
                region: rule.shared_primaries[m.index].clone(),
                advertised: m.load.is_some(),
                total_slots: m.load.map_or(0, |l| l.total_slots),
                free_slots: m.load.map_or(0, |l| l.free_slots),
                queue_depth: m.load.map_or(0, |l| l.queue_depth),
                share_ppm: 0,
            })
            .collect(),
        why: String::new(),
    };
    if members.is_empty() {
        note.why = "no member of the set is available".into();
        return (Vec::new(), note);
    }

    if let Some(attr) = &rule.affinity {
        note.affinity = Some(attr.clone());
        if let Some(value) = attrs.get(attr) {
            let digest = super::affinity_digest(attr, value);
            let mut scored: Vec<(u64, usize)> = members
                .iter()
                .map(|m| (super::rendezvous(&digest, name(m.index)), m.index))
                .collect();
            // Highest score first; equal scores (never in practice) by name.
            scored.sort_unstable_by(|a, b| b.0.cmp(&a.0).then(name(a.1).cmp(name(b.1))));
            let out: Vec<usize> = scored.into_iter().map(|(_, i)| i).collect();
            let short = hex::encode(&digest[..16]);
            note.mode = "affinity";
            note.why = format!(
                "affinity on `{attr}` (digest {}): {} ranks first among the available members by rendezvous hashing",
                &short[..16],
                name(out[0])
            );
            note.affinity_digest = Some(short);
            return (out, note);
        }
        note.why = format!("affinity attribute `{attr}` absent; ");
    }

    if rule.balance == Balance::Priority {
        let mut out: Vec<usize> = members.iter().map(|m| m.index).collect();
        out.sort_unstable_by(|a, b| key(*a).cmp(&key(*b)));
        note.why.push_str("priority: ");
        note.why.push_str(name(out[0]));
        note.why
            .push_str(" has the lowest priority among the available members");
        return (out, note);
    }
    // (weight, member position in `members`, primaries index)
    let mut ranked: Vec<(f64, usize, usize)> = members
        .iter()
        .enumerate()
        .map(|(pos, m)| {
            let w = match rule.balance {
                Balance::Weighted => {
                    f64::from(rule.weights.get(name(m.index)).copied().unwrap_or(0))
                }
                _ => m.load.map_or(0.0, |l| l.weight()),
            };
            (w, pos, m.index)
        })
        .collect();
    let total: f64 = ranked.iter().map(|r| r.0).sum();
    if total <= 0.0 || !total.is_finite() {
        let mut out: Vec<usize> = ranked.into_iter().map(|r| r.2).collect();
        out.sort_unstable_by(|a, b| key(*a).cmp(&key(*b)));
        note.why.push_str(rule.balance.as_str());
        note.why.push_str(if rule.balance == Balance::Weighted {
            ": no available member has a weight, so by priority: "
        } else {
            ": no available member advertises free capacity, so by priority: "
        });
        note.why.push_str(name(out[0]));
        return (out, note);
    }
    for (w, pos, _) in &ranked {
        note.loads[*pos].share_ppm = ((w / total) * 1e6).round() as u32;
    }
    // Tie order: weight (descending), then priority, then name.
    ranked.sort_unstable_by(|a, b| b.0.total_cmp(&a.0).then(key(a.2).cmp(&key(b.2))));
    // A point in [0, total): the member whose interval holds it is chosen.
    let fraction = (draw >> 11) as f64 / (1u64 << 53) as f64;
    let draw_ppm = (fraction * 1e6) as u32;
    note.draw_ppm = Some(draw_ppm);
    let point = fraction * total;
    let mut acc = 0.0;
    let mut chosen = 0;
    for (i, (w, _, _)) in ranked.iter().enumerate() {
        if *w <= 0.0 {
            break;
        }
        chosen = i;
        acc += w;
        if point < acc {
            break;
        }
    }
    let share_permille = (ranked[chosen].0 / total * 1000.0).round() as u32;
    let mut out: Vec<usize> = ranked.into_iter().map(|r| r.2).collect();
    let winner = out.remove(chosen);
    out.insert(0, winner);
    note.why.push_str(&format!(
        "{}: draw {draw_ppm} ppm fell in {}'s share ({}.{}% of {} available members)",
        rule.balance.as_str(),
        name(winner),
        share_permille / 10,
        share_permille % 10,
        out.len()
    ));
    (out, note)
}

/// `decide_with` over random sets (dead, full, silent, slotless members,
/// equal loads and priorities, every balance mode, affinity present or
/// absent) orders the set and explains it exactly as the reference does.
#[test]
fn in_place_balancing_matches_the_reference() {
    let regions = ["m_d", "m_a", "m_f", "m_b", "m_e", "m_c"];
    // Priorities with a tie (1, 1) and two unset.
    let priorities = [Some(2), Some(1), None, Some(1), None, Some(5)];
    let mut text = String::from("federation:\n  name: ref\n  regions:\n");
    for (r, p) in regions.iter().zip(priorities) {
        text.push_str(&format!("    - name: {r}\n      endpoint: e-{r}\n"));
        if let Some(p) = p {
            text.push_str(&format!("      priority: {p}\n"));
        }
        text.push_str("      compliance: [GDPR]\n");
    }
    text.push_str("  routing_rules:\n");
    let set = regions.join(", ");
    for (i, extra) in [
        "balance: least_loaded",
        "balance: priority",
        "balance: weighted\n      weights: {m_d: 3, m_a: 1, m_f: 3, m_e: 0}",
        "balance: least_loaded\n      affinity: conversation_id",
        "balance: priority\n      affinity: conversation_id",
    ]
    .iter()
    .enumerate()
    {
        text.push_str(&format!(
            "    - condition: \"mode == {i}\"\n      primary_regions: [{set}]\n      {extra}\n      requires: [GDPR]\n"
        ));
    }
    let p = load(&text).expect("loads");
    let mut rng = 0x1234_5678_9abc_def0u64;
    let mut next = move || {
        rng = rng.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = rng;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    };
    let mut decided = 0;
    for round in 0..3000u64 {
        let mode = (round % 5) as i64;
        let mut view = StaticView::default();
        for r in regions {
            match next() % 10 {
                0 => {
                    view.down.insert(r.to_string());
                }
                1 => {
                    view.full.insert(r.to_string());
                }
                2 | 3 => {}
                4 => {
                    view.loads.insert(r.to_string(), Load::default());
                }
                // Few distinct values: equal loads are common.
                _ => {
                    let total = 1 + (next() % 3) as u32 * 4;
                    let l = Load {
                        total_slots: total,
                        free_slots: (next() % u64::from(total + 1)) as u32,
                        queue_depth: (next() % 3) as u32,
                    };
                    view.loads.insert(r.to_string(), l);
                }
            }
        }
        let mut a = Attributes::new();
        a.insert("mode".into(), AttrValue::Int(mode));
        if next() % 4 != 0 {
            a.insert(
                "conversation_id".into(),
                AttrValue::Str(format!("c{}", next() % 50)),
            );
        }
        let draw = next();
        let d = decide_with(&p, &a, &view.bind(&p), draw);
        let rule = &p.rules[mode as usize];
        let members: Vec<(usize, Option<Load>)> = rule
            .primaries
            .iter()
            .enumerate()
            .filter(|(_, r)| !view.down.contains(*r) && !view.full.contains(*r))
            .map(|(i, r)| (i, view.loads.get(r).copied()))
            .collect();
        let (order, note) = reference_order(rule, &a, &members, draw);
        let expected: Vec<&str> = order.iter().map(|&i| rule.primaries[i].as_str()).collect();
        let got: Vec<&str> = d
            .candidates
            .iter()
            .filter(|c| c.accepted())
            .map(|c| &*c.region)
            .collect();
        assert_eq!(got, expected, "round {round}: {view:?} {a:?}");
        let b = d.balance.as_ref().expect("a set decision has a note");
        assert!(b.why_capacity() >= b.why().len(), "round {round}: {b:?}");
        assert_eq!(b.explain(), note, "round {round}");
        if !expected.is_empty() {
            decided += 1;
        }
    }
    assert!(decided > 2500, "{decided}");
}

#[test]
fn shares_round_and_print_as_the_formatter_does() {
    for x in [
        0.0,
        0.49,
        0.5,
        0.5000001,
        1.4999999,
        2.5,
        999_999.5,
        1e6,
        123_456.789,
    ] {
        assert_eq!(super::round_share(x), x.round() as u32, "{x}");
    }
    let mut rng = 7u64;
    for _ in 0..10_000 {
        rng = rng.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
        let x = (rng >> 11) as f64 / (1u64 << 53) as f64 * 1e6;
        assert_eq!(super::round_share(x), x.round() as u32, "{x}");
        let mut s = String::new();
        super::push_decimal(&mut s, rng);
        assert_eq!(s, rng.to_string());
    }
    let mut s = String::new();
    super::push_decimal(&mut s, 0);
    assert_eq!(s, "0");
}
