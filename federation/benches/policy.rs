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

use std::hint::black_box;
use std::path::Path;
use std::time::{Duration, Instant};

use criterion::Criterion;
use federation::config;
use federation::policy::{AttrValue, Attributes, Policy, StaticView, condition::to_cel};

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
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    // `cargo test --benches` passes no `--bench`: keep that run short.
    let benchmarking = args.iter().any(|a| a == "--bench");
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
