//! Routing-decision benchmark: one decision (`Policy::match_rule` and the full
//! `decide`) with the compiled conditions, against the same rules evaluated
//! with the `cel` crate's interpreter (a `cel::Context` built per decision,
//! first match wins), on the user's example and on a generated 200-rule policy.
//!
//! Run: `cargo bench -p federation --bench policy`
//! It prints explicit ratio lines first (`compiled: N ns/decision,
//! interpreter: M ns/decision, ratio Rx`), then criterion's measurements.
//! `cargo bench -p federation --bench policy -- --ratios-only` prints only the
//! ratio lines.
//!
//! It also compares a decision over a set of 10 primaries (`least_loaded`,
//! every member advertising capacity) with a single-primary decision on the
//! same shape of policy (`set of 10 … single primary … ratio Rx`; the
//! target is within 2x), measured interleaved (median and minimum batch),
//! and ends with the line `set of 10 / single primary = R.RRx`.
//! `cargo bench -p federation --bench policy -- --set-only` prints only
//! those lines (for profiling: `perf record` that command's binary), and
//! `-- --profile set|single|ten` runs only one of the three decisions, in
//! a loop for a few seconds, so that a profile shows that one alone.

use std::hint::black_box;
use std::path::Path;
use std::time::{Duration, Instant};

use criterion::Criterion;
use federation::config;
use federation::policy::{
    AttrValue, Attributes, Load, Policy, StaticView, condition::to_cel, decide_with,
};

fn load(text: &str) -> Policy {
    let loaded =
        config::load_from_text(Path::new("bench.yaml"), text).expect("bench policy parses");
    Policy::from_loaded(&loaded).expect("bench policy is valid")
}

fn seed() -> Policy {
    load(
        &std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../policies/seed-federation.yaml"
        ))
        .expect("seed present"),
    )
}

/// 200 rules over three regions; rule i matches `customer_region` A{i} or
/// B{i} unless the data is secret.
fn generated(rules: usize) -> Policy {
    let mut s = String::from(
        "federation:\n  name: bench\n  regions:\n    - name: r1\n      endpoint: a\n      compliance: [GDPR]\n    - name: r2\n      endpoint: b\n      compliance: [GDPR]\n    - name: r3\n      endpoint: c\n  routing_rules:\n",
    );
    for i in 0..rules {
        let (p, b) = match i % 3 {
            0 => ("r1", "r2"),
            1 => ("r2", "r1"),
            _ => ("r3", "r1"),
        };
        s.push_str(&format!(
            "    - condition: \"customer_region in ['A{i}', 'B{i}'] && data_class != 'secret'\"\n      primary_region: {p}\n      backup_region: {b}\n"
        ));
    }
    load(&s)
}

fn attrs(pairs: &[(&str, &str)]) -> Attributes {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), AttrValue::Str(v.to_string())))
        .collect()
}

/// The baseline: a context per decision, each rule's `cel::Program` in order.
fn interpret_first_match(policy: &Policy, attrs: &Attributes) -> Option<usize> {
    let mut ctx = cel::Context::default();
    for (k, v) in attrs {
        ctx.add_variable_from_value(k.as_str(), to_cel(v));
    }
    for rule in &policy.rules {
        let Some(c) = &rule.condition else {
            return Some(rule.index);
        };
        if let Ok(cel::Value::Bool(true)) = c.program().execute(&ctx) {
            return Some(rule.index);
        }
    }
    None
}

/// Mean ns per call of `f`, over at least `budget` of wall time.
fn ns_per_call(budget: Duration, mut f: impl FnMut()) -> f64 {
    for _ in 0..100 {
        f();
    }
    let mut iterations = 0u64;
    let mut batch = 64u64;
    let start = Instant::now();
    loop {
        for _ in 0..batch {
            f();
        }
        iterations += batch;
        let elapsed = start.elapsed();
        if elapsed >= budget {
            return elapsed.as_nanos() as f64 / iterations as f64;
        }
        batch = batch.saturating_mul(2).min(1 << 20);
    }
}

/// Ten GDPR regions; rule 1 sends EU customers to a set of all ten
/// (`least_loaded`), rule 2 (the baseline) sends the others to one primary
/// with one backup.
fn sets(members: usize) -> (Policy, StaticView) {
    let mut s = String::from("federation:\n  name: bench\n  regions:\n");
    let mut view = StaticView::default();
    for i in 0..members {
        s.push_str(&format!(
            "    - name: r{i}\n      endpoint: e{i}\n      priority: {i}\n      compliance: [GDPR]\n"
        ));
        view.loads.insert(
            format!("r{i}"),
            Load {
                total_slots: 8,
                free_slots: (i % 8) as u32,
                queue_depth: (i % 3) as u32,
            },
        );
    }
    let set = (0..members)
        .map(|i| format!("r{i}"))
        .collect::<Vec<_>>()
        .join(", ");
    let backups = (1..members)
        .map(|i| format!("r{i}"))
        .collect::<Vec<_>>()
        .join(", ");
    s.push_str(&format!(
        "  routing_rules:\n    - condition: \"customer_region in ['DE', 'FR']\"\n      primary_regions: [{set}]\n      requires: [GDPR]\n    - condition: \"customer_region in ['UK', 'IE']\"\n      primary_region: r0\n      backup_region: r1\n      requires: [GDPR]\n    - condition: \"customer_region in ['ES', 'PT']\"\n      primary_region: r0\n      backup_regions: [{backups}]\n      requires: [GDPR]\n"
    ));
    (load(&s), view)
}

/// Per-call ns of each of `fs`, measured interleaved: round after round,
/// a batch of each in turn, so that load from other processes on a shared
/// machine falls on all of them alike. Each batch is sized to take about
/// the same time (~100 µs, well under a scheduler slice), so a batch of
/// one is no likelier to be preempted than a batch of another. Returns
/// (median, minimum) of the per-batch figures of each.
fn interleaved(budget: Duration, fs: &mut [&mut dyn FnMut()]) -> Vec<(f64, f64)> {
    const TARGET_NS: f64 = 100_000.0;
    let batches: Vec<u32> = fs
        .iter_mut()
        .map(|f| {
            let t = Instant::now();
            for _ in 0..2_000 {
                f();
            }
            let per_call = t.elapsed().as_nanos() as f64 / 2_000.0;
            (TARGET_NS / per_call.max(1.0)).clamp(10.0, 100_000.0) as u32
        })
        .collect();
    let mut samples: Vec<Vec<f64>> = vec![Vec::new(); fs.len()];
    let start = Instant::now();
    while start.elapsed() < budget || samples[0].len() < 5 {
        for ((f, out), &batch) in fs.iter_mut().zip(samples.iter_mut()).zip(&batches) {
            let t = Instant::now();
            for _ in 0..batch {
                f();
            }
            out.push(t.elapsed().as_nanos() as f64 / f64::from(batch));
        }
    }
    samples
        .into_iter()
        .map(|mut s| {
            s.sort_by(f64::total_cmp);
            (s[s.len() / 2], s[0])
        })
        .collect()
}

/// `--profile set|single|ten`: one of [`set_ratio`]'s decisions alone, in
/// a loop for `budget`, for `perf record`.
fn profile_one(which: &str, budget: Duration) {
    let (p, view) = sets(10);
    let bound = view.bind(&p);
    let region = match which {
        "set" => "FR",
        "single" => "IE",
        "ten" => "ES",
        other => panic!("--profile takes set, single or ten, not {other:?}"),
    };
    let a = attrs(&[("customer_region", region)]);
    let mut draw = 1u64;
    let per_call = ns_per_call(budget, || {
        draw = draw.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
        black_box(decide_with(&p, black_box(&a), &bound, draw));
    });
    println!("{which}: {per_call:.0} ns/decision");
}

fn set_ratio(budget: Duration) {
    let (p, view) = sets(10);
    let bound = view.bind(&p);
    let set_attrs = attrs(&[("customer_region", "FR")]);
    let single_attrs = attrs(&[("customer_region", "IE")]);
    assert_eq!(p.match_rule(&set_attrs).rule, Some(0));
    assert_eq!(p.match_rule(&single_attrs).rule, Some(1));
    let ten_attrs = attrs(&[("customer_region", "ES")]);
    assert_eq!(p.match_rule(&ten_attrs).rule, Some(2));
    let next = |draw: &mut u64| {
        *draw = draw.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
        *draw
    };
    let (mut d1, mut d2, mut d3) = (1u64, 2u64, 3u64);
    let figures = interleaved(
        budget,
        &mut [
            &mut || {
                black_box(decide_with(
                    &p,
                    black_box(&single_attrs),
                    &bound,
                    next(&mut d1),
                ));
            },
            &mut || {
                black_box(decide_with(
                    &p,
                    black_box(&ten_attrs),
                    &bound,
                    next(&mut d2),
                ));
            },
            &mut || {
                black_box(decide_with(
                    &p,
                    black_box(&set_attrs),
                    &bound,
                    next(&mut d3),
                ));
            },
        ],
    );
    let [(single, single_min), (ten, ten_min), (set, set_min)] = figures[..] else {
        unreachable!("three figures")
    };
    println!(
        "set of 10 primaries (least_loaded) vs single primary + backup (interleaved batches: median, min):"
    );
    println!(
        "  decide      set of 10: {set:.0} ns/decision, single primary: {single:.0} ns/decision, ratio {:.2}x (target <= 2x; of minimums {set_min:.0}/{single_min:.0} = {:.2}x)",
        set / single,
        set_min / single_min
    );
    println!(
        "  decide      set of 10: {set:.0} ns/decision, primary + 9 backups (10 verdicts, no balancing): {ten:.0} ns/decision, ratio {:.2}x (of minimums {:.2}x)",
        set / ten,
        set_min / ten_min
    );
    println!(
        "set of 10 / single primary = {:.2}x (median batches; target <= 2x: {})",
        set / single,
        if set / single <= 2.0 {
            "met"
        } else {
            "NOT met"
        }
    );
}

struct Case {
    name: &'static str,
    policy: Policy,
    attrs: Attributes,
}

fn cases() -> Vec<Case> {
    let big = generated(200);
    vec![
        Case {
            name: "seed (2 rules), DE -> rule 2",
            policy: seed(),
            attrs: attrs(&[("customer_region", "DE")]),
        },
        Case {
            name: "generated (200 rules), match at rule 100",
            policy: big.clone(),
            attrs: attrs(&[("customer_region", "B99"), ("data_class", "pii")]),
        },
        Case {
            name: "generated (200 rules), no match (all 200 evaluated)",
            policy: big,
            attrs: attrs(&[("customer_region", "JP"), ("data_class", "pii")]),
        },
    ]
}

fn ratios() {
    let budget = Duration::from_millis(600);
    println!("policy decision benchmark (mean over >= {budget:?} per figure)");
    for case in cases() {
        let (p, a) = (&case.policy, &case.attrs);
        assert_eq!(
            p.match_rule(a).rule,
            interpret_first_match(p, a),
            "compiled and interpreted agree"
        );
        let view = StaticView::default();
        let bound = view.bind(p);
        let compiled = ns_per_call(budget, || {
            black_box(p.match_rule(black_box(a)));
        });
        let decide = ns_per_call(budget, || {
            black_box(p.decide(black_box(a), &bound));
        });
        let interpreted = ns_per_call(budget, || {
            black_box(interpret_first_match(p, black_box(a)));
        });
        println!("{}:", case.name);
        println!(
            "  match_rule  compiled: {compiled:.0} ns/decision, interpreter: {interpreted:.0} ns/decision, ratio {:.1}x",
            interpreted / compiled
        );
        println!(
            "  decide      compiled: {decide:.0} ns/decision, interpreter match alone: {interpreted:.0} ns/decision, ratio {:.1}x",
            interpreted / decide
        );
    }
    set_ratio(budget);
}

fn criterion_benches(c: &mut Criterion) {
    for case in cases() {
        let (p, a) = (&case.policy, &case.attrs);
        let view = StaticView::default();
        let bound = view.bind(p);
        let mut g = c.benchmark_group(case.name);
        g.bench_function("match_rule (compiled)", |b| {
            b.iter(|| p.match_rule(black_box(a)))
        });
        g.bench_function("decide (compiled)", |b| {
            b.iter(|| p.decide(black_box(a), &bound))
        });
        g.bench_function("interpreter (context per decision)", |b| {
            b.iter(|| interpret_first_match(p, black_box(a)))
        });
        g.finish();
    }
    let (p, view) = sets(10);
    let bound = view.bind(&p);
    let mut g = c.benchmark_group("set of 10 primaries vs single primary");
    for (name, a) in [
        (
            "decide, set of 10 (least_loaded)",
            attrs(&[("customer_region", "FR")]),
        ),
        (
            "decide, single primary + backup",
            attrs(&[("customer_region", "IE")]),
        ),
    ] {
        let mut draw = 1u64;
        g.bench_function(name, |b| {
            b.iter(|| {
                draw = draw.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
                decide_with(&p, black_box(&a), &bound, draw)
            })
        });
    }
    g.finish();
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    // `cargo test --benches` passes no `--bench`: keep that run short.
    let benchmarking = args.iter().any(|a| a == "--bench");
    // `-- --profile set|single|ten`: one decision alone (for profiling).
    if let Some(at) = args.iter().position(|a| a == "--profile") {
        let which = args.get(at + 1).map_or("set", String::as_str);
        profile_one(which, Duration::from_secs(4));
        return;
    }
    // `-- --set-only`: only the set-of-10 ratio (for profiling).
    if benchmarking && args.iter().any(|a| a == "--set-only") {
        set_ratio(Duration::from_secs(3));
        return;
    }
    if args.iter().any(|a| a == "--ratios-only") || !benchmarking {
        if benchmarking {
            ratios();
        }
        return;
    }
    ratios();
    let mut c = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .configure_from_args();
    criterion_benches(&mut c);
    c.final_summary();
}
