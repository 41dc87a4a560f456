//! The geometry of the status page's map (an inline SVG): regions on a
//! circle, this controller's region on top; a liveness link from it to
//! every peer (styled by the state it sees), and the policy's failover
//! links (primary → backup, one per pair, naming the rules), marked when the
//! backup lacks a tag the rule requires (the router refuses that failover)
//! or a tag the primary holds (the audit warns). Numbers only: the template
//! draws, and escapes the names.

use std::collections::BTreeMap;

use serde::Serialize;

use super::RegionRow;
use crate::policy::Policy;

/// Width of the SVG's user space.
pub const WIDTH: i32 = 960;
/// Height of the SVG's user space.
pub const HEIGHT: i32 = 520;
/// Radius of the circle the regions sit on.
const RADIUS: f64 = 190.0;
/// How far a failover link bends away from the straight line.
const BEND: f64 = 46.0;

/// A link between two regions.
#[derive(Debug, Clone, Serialize)]
pub struct Link {
    /// From this region.
    pub from: String,
    /// To this region.
    pub to: String,
    /// `liveness` (this controller's view of the peer) or `failover` (a
    /// backup relation of the policy).
    pub kind: String,
    /// For liveness the peer's state; for failover `ok`, `drops-tag` or
    /// `refused`.
    pub class: String,
    /// What the link means, in words (the SVG title).
    pub title: String,
    /// The SVG path.
    pub path: String,
}

/// The map.
#[derive(Debug, Clone, Serialize)]
pub struct Map {
    /// SVG width.
    pub width: i32,
    /// SVG height.
    pub height: i32,
    /// Links, liveness first.
    pub links: Vec<Link>,
}

/// Places `regions` (sets their `x`, `y`) and computes the links.
pub fn layout(policy: &Policy, here: &str, regions: &mut [RegionRow]) -> Map {
    let n = regions.len().max(1) as f64;
    let (cx, cy) = (f64::from(WIDTH) / 2.0, f64::from(HEIGHT) / 2.0 - 30.0);
    // This region first (on top), the others clockwise in listing order.
    let start = regions.iter().position(|r| r.name == here).unwrap_or(0);
    let count = regions.len();
    let mut at: BTreeMap<String, (f64, f64)> = BTreeMap::new();
    for k in 0..count {
        let i = (start + k) % count;
        let angle = -std::f64::consts::FRAC_PI_2 + std::f64::consts::TAU * k as f64 / n;
        let (x, y) = (cx + RADIUS * angle.cos(), cy + RADIUS * angle.sin());
        regions[i].x = x.round() as i32;
        regions[i].y = y.round() as i32;
        at.insert(regions[i].name.clone(), (x, y));
    }
    let mut links = Vec::new();
    if let Some(&from) = at.get(here) {
        for r in regions.iter().filter(|r| r.name != here) {
            let Some(&to) = at.get(&r.name) else { continue };
            links.push(Link {
                from: here.to_string(),
                to: r.name.clone(),
                kind: "liveness".into(),
                class: r.state.clone(),
                title: format!("{here} sees {} as {}", r.name, r.state),
                path: format!("M{:.0} {:.0} L{:.0} {:.0}", from.0, from.1, to.0, to.1),
            });
        }
    }
    // Failover pairs of every rule, with the rules and the worst verdict.
    let mut pairs: BTreeMap<(String, String), Pair> = BTreeMap::new();
    for rule in &policy.rules {
        for p in &rule.primaries {
            for b in &rule.backups {
                let backup_tags = policy.region(b).map(|r| r.tags.clone()).unwrap_or_default();
                let primary_tags = policy.region(p).map(|r| r.tags.clone()).unwrap_or_default();
                let missing: Vec<String> =
                    rule.requires.difference(&backup_tags).cloned().collect();
                let dropped: Vec<String> = primary_tags.difference(&backup_tags).cloned().collect();
                let (class, why) = if !missing.is_empty() {
                    (
                        "refused",
                        format!(
                            "rule {} requires {}, which {b} lacks: the router refuses this failover",
                            rule.index + 1,
                            missing.join(", ")
                        ),
                    )
                } else if !dropped.is_empty() {
                    (
                        "drops-tag",
                        format!(
                            "rule {}: failing over drops {} ({p} holds it, {b} does not)",
                            rule.index + 1,
                            dropped.join(", ")
                        ),
                    )
                } else {
                    ("ok", format!("rule {}", rule.index + 1))
                };
                let e = pairs.entry((p.clone(), b.clone())).or_default();
                e.rules.push(format!("rule {}", rule.index + 1));
                if e.class.is_empty() || rank(class) > rank(e.class) {
                    e.class = class;
                }
                e.why.push(why);
            }
        }
    }
    for ((p, b), Pair { rules, class, why }) in pairs {
        let (Some(&from), Some(&to)) = (at.get(&p), at.get(&b)) else {
            continue;
        };
        links.push(Link {
            title: format!(
                "failover {p} → {b} ({}): {}",
                rules.join(", "),
                why.join("; ")
            ),
            from: p,
            to: b,
            kind: "failover".into(),
            class: class.to_string(),
            path: bent(from, to),
        });
    }
    Map {
        width: WIDTH,
        height: HEIGHT,
        links,
    }
}

/// One failover pair of the policy: the rules that name it, the worst
/// verdict (`ok`, `drops-tag`, `refused`), and why, per rule.
#[derive(Default)]
struct Pair {
    rules: Vec<String>,
    class: &'static str,
    why: Vec<String>,
}

fn rank(class: &str) -> u8 {
    match class {
        "refused" => 2,
        "drops-tag" => 1,
        _ => 0,
    }
}

/// A quadratic curve from `a` to `b` bent to its left, stopping short of the
/// region circles (radius 30) so that the arrow head shows.
fn bent(a: (f64, f64), b: (f64, f64)) -> String {
    let (dx, dy) = (b.0 - a.0, b.1 - a.1);
    let len = (dx * dx + dy * dy).sqrt().max(1.0);
    let (ux, uy) = (dx / len, dy / len);
    let short = 36.0;
    let a2 = (a.0 + ux * short, a.1 + uy * short);
    let b2 = (b.0 - ux * short, b.1 - uy * short);
    let mid = ((a.0 + b.0) / 2.0 - uy * BEND, (a.1 + b.1) / 2.0 + ux * BEND);
    format!(
        "M{:.0} {:.0} Q{:.0} {:.0} {:.0} {:.0}",
        a2.0, a2.1, mid.0, mid.1, b2.0, b2.1
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(text: &str) -> Policy {
        let loaded =
            crate::config::load_from_text(std::path::Path::new("seed.yaml"), text).expect("parses");
        Policy::from_loaded(&loaded).expect("loads")
    }

    fn row(name: &str, state: &str) -> RegionRow {
        RegionRow {
            name: name.into(),
            state: state.into(),
            draining: false,
            tags: String::new(),
            capacity: String::new(),
            capacity_stale: false,
            ad_age: String::new(),
            hold_down: String::new(),
            state_age: String::new(),
            policy_mismatch: false,
            problems: Vec::new(),
            x: 0,
            y: 0,
        }
    }

    #[test]
    fn links_show_liveness_and_what_a_failover_costs() {
        let seed = include_str!("../../../policies/seed-federation.yaml");
        let mut rows = vec![
            row("north_america", "self"),
            row("europe", "alive"),
            row("asia_pacific", "dead"),
        ];
        let map = layout(&policy(seed), "europe", &mut rows);
        // This region on top, the others around it.
        assert!(rows[1].y < rows[0].y && rows[1].y < rows[2].y, "{rows:?}");
        let link = |kind: &str, from: &str, to: &str| {
            map.links
                .iter()
                .find(|l| l.kind == kind && l.from == from && l.to == to)
                .map(|l| l.class.clone())
        };
        assert_eq!(
            link("liveness", "europe", "asia_pacific").as_deref(),
            Some("dead")
        );
        assert_eq!(link("liveness", "europe", "europe"), None);
        assert_eq!(
            link("failover", "europe", "north_america").as_deref(),
            Some("drops-tag")
        );
        let strict = policy(federation_sandbox::SEED_REQUIRES_GDPR);
        let map = layout(&strict, "europe", &mut rows);
        let refused = map
            .links
            .iter()
            .find(|l| l.kind == "failover" && l.from == "europe")
            .expect("failover link");
        assert_eq!(refused.class, "refused", "{refused:?}");
        assert!(refused.title.contains("requires GDPR"), "{refused:?}");
    }
}
