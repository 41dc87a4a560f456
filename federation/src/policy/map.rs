//! The residency map: for each rule, the regions its data reaches in normal
//! operation and at each failover step, the failover edges that drop a
//! compliance tag (warnings) or that a required tag refuses, and the inputs
//! no rule covers, built from a loaded policy and its audit
//! ([`super::analysis::check`]) and rendered as SVG, Graphviz DOT or a
//! self-contained HTML page (no external assets, print styles).
//!
//! Pure: [`build`] is a function of the policy and the report, the
//! renderers are functions of the [`Map`]; every text from the policy file
//! is escaped for the output it goes into, so the status page can embed
//! [`to_svg`] as is.

use std::collections::BTreeSet;
use std::fmt::Write as _;

use serde::Serialize;

use super::analysis::{Report, Severity};
use super::{Attributes, Policy, format_attributes};

/// A region as the map shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MapRegion {
    /// Its name.
    pub name: String,
    /// Its compliance tags.
    pub tags: Vec<String>,
    /// Its `priority`, when set.
    pub priority: Option<i64>,
    /// True when some rule names it (as a primary or a backup).
    pub reached: bool,
}

/// What an edge of the map means.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum EdgeKind {
    /// Normal operation: the rule's data goes to a primary.
    Normal,
    /// A failover step that keeps every tag the primary holds.
    Failover,
    /// A failover step to a region lacking a tag the primary holds: a
    /// warning (the data runs without that tag's guarantee).
    DropsTag,
    /// A failover step the rule's `requires` refuses: never taken, its
    /// tasks are rejected instead.
    Refused,
}

impl EdgeKind {
    /// `normal`, `failover`, `drops-tag`, `refused` (the CSS class too).
    pub fn as_str(self) -> &'static str {
        match self {
            EdgeKind::Normal => "normal",
            EdgeKind::Failover => "failover",
            EdgeKind::DropsTag => "drops-tag",
            EdgeKind::Refused => "refused",
        }
    }

    /// True for the edges drawn as warnings (a tag dropped or refused).
    pub fn is_warning(self) -> bool {
        matches!(self, EdgeKind::DropsTag | EdgeKind::Refused)
    }
}

/// One edge: from the previous step's regions (none: the rule's entry) to
/// a region.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Edge {
    /// The regions of the previous step (empty for step 0).
    pub from: Vec<String>,
    /// The region reached.
    pub to: String,
    /// 0 for normal operation, k for the k-th backup.
    pub step: usize,
    /// What it means.
    pub kind: EdgeKind,
    /// Tags the primary (every member of a set) holds that `to` lacks.
    pub dropped: Vec<String>,
    /// The tags of `dropped` the rule requires (why a `Refused` edge is).
    pub required: Vec<String>,
    /// Data-class requirements that need a tag of `dropped`: the step is
    /// refused for the inputs they apply to.
    pub refused_for: Vec<String>,
}

impl Edge {
    /// The edge's label: `normal`, `failover 1`, with what it drops.
    pub fn label(&self) -> String {
        let step = if self.step == 0 {
            "normal".to_string()
        } else {
            format!("failover {}", self.step)
        };
        match self.kind {
            EdgeKind::Normal | EdgeKind::Failover => step,
            EdgeKind::DropsTag if self.refused_for.is_empty() => {
                format!("{step}: drops {}", self.dropped.join(", "))
            }
            EdgeKind::DropsTag => format!(
                "{step}: drops {} (refused where {} applies)",
                self.dropped.join(", "),
                self.refused_for.join(", ")
            ),
            EdgeKind::Refused => format!("{step}: refused, requires {}", self.required.join(", ")),
        }
    }
}

/// One rule's flows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RuleFlows {
    /// Its position (0-based).
    pub index: usize,
    /// Its label (`rule 2: customer_region in [...]`).
    pub label: String,
    /// The tags it requires.
    pub requires: Vec<String>,
    /// Its primaries (a set has several), in file order.
    pub primaries: Vec<String>,
    /// Its backups, in failover order.
    pub backups: Vec<String>,
    /// Every edge, normal ones first, then each failover step.
    pub edges: Vec<Edge>,
}

/// An input no rule covers (or no region may take), from the audit.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Uncovered {
    /// The finding's kind (`unmatched-input`, `no-compliant-region`, …).
    pub kind: String,
    /// The rule, when the finding names one.
    pub rule: Option<String>,
    /// The finding's sentence.
    pub message: String,
    /// The example input, formatted (`customer_region='JP'`).
    pub example: Option<String>,
}

/// The residency map of a policy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Map {
    /// The federation's name.
    pub federation: String,
    /// The policy's hash.
    pub policy_hash: String,
    /// Regions by priority, then name.
    pub regions: Vec<MapRegion>,
    /// One entry per rule, in file order.
    pub rules: Vec<RuleFlows>,
    /// Inputs no rule covers or no region may take.
    pub uncovered: Vec<Uncovered>,
    /// Error, warning and info counts of the whole audit.
    pub summary: (usize, usize, usize),
}

impl Map {
    /// Every warning edge with its rule.
    pub fn warnings(&self) -> impl Iterator<Item = (&RuleFlows, &Edge)> {
        self.rules
            .iter()
            .flat_map(|r| r.edges.iter().map(move |e| (r, e)))
            .filter(|(_, e)| e.kind.is_warning())
    }
}

/// The audit kinds listed as uncovered inputs.
const UNCOVERED: [&str; 3] = [
    "unmatched-input",
    "unmatched-missing-attribute",
    "no-compliant-region",
];

/// Builds the map of `policy` from its audit `report`.
pub fn build(policy: &Policy, report: &Report) -> Map {
    let reached: BTreeSet<&str> = policy
        .rules
        .iter()
        .flat_map(|r| r.candidates())
        .map(String::as_str)
        .collect();
    let regions = policy
        .regions_by_priority()
        .into_iter()
        .map(|r| MapRegion {
            name: r.name.clone(),
            tags: r.tags.iter().cloned().collect(),
            priority: r.priority,
            reached: reached.contains(r.name.as_str()),
        })
        .collect();
    let rules = policy
        .rules
        .iter()
        .map(|rule| {
            let mut edges: Vec<Edge> = rule
                .primaries
                .iter()
                .map(|p| Edge {
                    from: Vec::new(),
                    to: p.clone(),
                    step: 0,
                    kind: EdgeKind::Normal,
                    dropped: Vec::new(),
                    required: Vec::new(),
                    refused_for: Vec::new(),
                })
                .collect();
            // Tags every primary holds: what a failover may drop.
            let mut held: Option<BTreeSet<String>> = None;
            for p in rule.primaries.iter().filter_map(|p| policy.region(p)) {
                held = Some(match held {
                    None => p.tags.clone(),
                    Some(h) => h.intersection(&p.tags).cloned().collect(),
                });
            }
            let held = held.unwrap_or_default();
            let mut from = rule.primaries.clone();
            for (k, b) in rule.backups.iter().enumerate() {
                let tags = policy.region(b).map(|r| &r.tags);
                let dropped: Vec<String> = held
                    .iter()
                    .filter(|t| tags.is_none_or(|tags| !tags.contains(*t)))
                    .cloned()
                    .collect();
                let required: Vec<String> = dropped
                    .iter()
                    .filter(|t| rule.requires.contains(*t))
                    .cloned()
                    .collect();
                let refused_for: Vec<String> = policy
                    .requirements
                    .iter()
                    .filter(|q| dropped.iter().any(|t| q.requires.contains(t)))
                    .map(|q| q.name.clone().unwrap_or_else(|| q.source.clone()))
                    .collect();
                let kind = if !required.is_empty() {
                    EdgeKind::Refused
                } else if !dropped.is_empty() {
                    EdgeKind::DropsTag
                } else {
                    EdgeKind::Failover
                };
                edges.push(Edge {
                    from: std::mem::replace(&mut from, vec![b.clone()]),
                    to: b.clone(),
                    step: k + 1,
                    kind,
                    dropped,
                    required,
                    refused_for,
                });
            }
            RuleFlows {
                index: rule.index,
                label: rule.label(),
                requires: rule.requires.iter().cloned().collect(),
                primaries: rule.primaries.clone(),
                backups: rule.backups.clone(),
                edges,
            }
        })
        .collect();
    let uncovered = report
        .findings
        .iter()
        .filter(|f| UNCOVERED.contains(&f.kind))
        .map(|f| Uncovered {
            kind: f.kind.to_string(),
            rule: f.rule.clone(),
            message: f.message.clone(),
            example: f.example.as_ref().map(example),
        })
        .collect();
    Map {
        federation: policy.federation.clone(),
        policy_hash: policy.hash.clone(),
        regions,
        rules,
        uncovered,
        summary: (
            report.count(Severity::Error),
            report.count(Severity::Warning),
            report.count(Severity::Info),
        ),
    }
}

fn example(attrs: &Attributes) -> String {
    if attrs.is_empty() {
        "no attributes".into()
    } else {
        format_attributes(attrs)
    }
}

// ---------------------------------------------------------------------------
// Escaping.

/// Escapes text for XML/HTML content and attribute values.
pub fn xml_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            // Control characters are not allowed in XML 1.0.
            c if (c as u32) < 0x20 && !matches!(c, '\n' | '\t') => out.push('\u{fffd}'),
            c => out.push(c),
        }
    }
    out
}

/// A DOT double-quoted string (`"…"`) holding `s`; `\n` in `s` becomes a
/// DOT line break.
pub fn dot_quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => {}
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

// ---------------------------------------------------------------------------
// DOT.

/// The map as a Graphviz digraph: one cluster per rule, one node per
/// region the rule reaches, edges labelled by step; warning edges are
/// orange (drops a tag) or red and dotted (refused), with `class` set.
pub fn to_dot(map: &Map) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "digraph residency {{");
    let _ = writeln!(
        s,
        "  graph [label={}, labelloc=t, rankdir=LR, fontname=\"sans-serif\"];",
        dot_quote(&format!(
            "Residency map: {} (policy {})",
            map.federation,
            short_hash(&map.policy_hash)
        ))
    );
    let _ = writeln!(
        s,
        "  node [shape=box, style=rounded, fontname=\"sans-serif\"];"
    );
    let _ = writeln!(s, "  edge [fontname=\"sans-serif\"];");
    let tags_of = |name: &str| {
        map.regions
            .iter()
            .find(|r| r.name == name)
            .map(|r| r.tags.join(", "))
            .unwrap_or_default()
    };
    for rule in &map.rules {
        let n = rule.index + 1;
        let id = |region: &str| dot_quote(&format!("rule{n}/{region}"));
        let _ = writeln!(
            s,
            "  subgraph {} {{",
            dot_quote(&format!("cluster_rule{n}"))
        );
        let _ = writeln!(s, "    label={};", dot_quote(&rule.label));
        let entry = dot_quote(&format!("rule{n}/entry"));
        let _ = writeln!(
            s,
            "    {entry} [shape=plaintext, label={}];",
            dot_quote("matching tasks")
        );
        for region in rule.primaries.iter().chain(&rule.backups) {
            let _ = writeln!(
                s,
                "    {} [label={}];",
                id(region),
                dot_quote(&format!("{region}\n{}", tags_of(region)))
            );
        }
        for e in &rule.edges {
            let attrs = match e.kind {
                EdgeKind::Normal => "style=solid, penwidth=1.5".to_string(),
                EdgeKind::Failover => "style=dashed".to_string(),
                EdgeKind::DropsTag => {
                    "style=dashed, color=\"#b35c00\", fontcolor=\"#b35c00\", penwidth=2.5".into()
                }
                EdgeKind::Refused => {
                    "style=dotted, color=\"#b00020\", fontcolor=\"#b00020\", penwidth=2.5".into()
                }
            };
            let froms: Vec<String> = if e.from.is_empty() {
                vec![entry.clone()]
            } else {
                e.from.iter().map(|f| id(f)).collect()
            };
            for from in froms {
                let _ = writeln!(
                    s,
                    "    {from} -> {} [label={}, class={}, {attrs}];",
                    id(&e.to),
                    dot_quote(&e.label()),
                    dot_quote(e.kind.as_str())
                );
            }
        }
        let _ = writeln!(s, "  }}");
    }
    for r in map.regions.iter().filter(|r| !r.reached) {
        let _ = writeln!(
            s,
            "  {} [style=\"rounded,dashed\", label={}];",
            dot_quote(&format!("region/{}", r.name)),
            dot_quote(&format!(
                "{}\n{}\nno rule routes here",
                r.name,
                tags_text(&r.tags)
            ))
        );
    }
    if !map.uncovered.is_empty() {
        let mut text = String::from("uncovered inputs (rejected, fail closed):");
        for u in &map.uncovered {
            text.push('\n');
            text.push_str(&uncovered_line(u));
        }
        let _ = writeln!(
            s,
            "  \"uncovered\" [shape=note, color=\"#b35c00\", label={}];",
            dot_quote(&text)
        );
    }
    let _ = writeln!(s, "}}");
    s
}

fn short_hash(h: &str) -> &str {
    h.get(..12).unwrap_or(h)
}

fn uncovered_line(u: &Uncovered) -> String {
    let what = match u.kind.as_str() {
        "unmatched-input" => "no rule matches",
        "unmatched-missing-attribute" => "no rule matches (attribute missing)",
        _ => "no compliant region",
    };
    let rule = u
        .rule
        .as_deref()
        .map(|r| format!(" [{r}]"))
        .unwrap_or_default();
    match &u.example {
        Some(e) => format!("{what}{rule}: e.g. {e}"),
        None => format!("{what}{rule}"),
    }
}

// ---------------------------------------------------------------------------
// SVG.

const NODE_W: usize = 190;
const NODE_H: usize = 44;
const COL_GAP: usize = 150;
const LEFT: usize = 150;
const LANE_HEAD: usize = 30;
const ROW: usize = 56;

/// The map as a standalone SVG document (also valid inline in HTML): a
/// legend, the regions with their tags, one lane per rule (entry, then a
/// column per step), warning edges in orange (drops a tag) or red dotted
/// (refused), each labelled, and the uncovered inputs.
pub fn to_svg(map: &Map) -> String {
    let steps = map
        .rules
        .iter()
        .map(|r| r.backups.len() + 1)
        .max()
        .unwrap_or(1);
    let width = (LEFT + steps * (NODE_W + COL_GAP) + 20).max(860);
    let mut body = String::new();
    let mut y = 20;
    let _ = writeln!(
        body,
        r#"<text class="title" x="10" y="{y}">Residency map: {}</text>"#,
        xml_escape(&map.federation)
    );
    y += 18;
    let (errors, warnings, info) = map.summary;
    let _ = writeln!(
        body,
        r#"<text class="meta" x="10" y="{y}">policy {} · audit: {errors} error(s), {warnings} warning(s), {info} info</text>"#,
        xml_escape(short_hash(&map.policy_hash))
    );
    // Legend.
    y += 22;
    let legend = [
        (EdgeKind::Normal, "normal operation"),
        (EdgeKind::Failover, "failover keeping every tag"),
        (EdgeKind::DropsTag, "⚠ failover dropping a tag"),
        (EdgeKind::Refused, "✕ failover refused (required tag)"),
    ];
    let mut x = 10;
    for (kind, text) in legend {
        let _ = writeln!(
            body,
            r#"<g class="legend {k}"><line class="edge-line {k}" x1="{x}" y1="{y}" x2="{x2}" y2="{y}"/><text x="{tx}" y="{ty}">{}</text></g>"#,
            xml_escape(text),
            k = kind.as_str(),
            x2 = x + 40,
            tx = x + 46,
            ty = y + 4
        );
        x += 210;
    }
    // Regions.
    y += 22;
    let _ = writeln!(
        body,
        r#"<text class="heading" x="10" y="{}">Regions (by priority) and their compliance tags</text>"#,
        y + 4
    );
    y += 12;
    let mut x = 10;
    for r in &map.regions {
        if x + NODE_W > width {
            x = 10;
            y += NODE_H + 22;
        }
        let class = if r.reached {
            "region"
        } else {
            "region unreached"
        };
        let prio = r
            .priority
            .map(|p| format!("priority {p}"))
            .unwrap_or_else(|| "no priority".into());
        let note = if r.reached {
            ""
        } else {
            " · no rule routes here"
        };
        let _ = writeln!(
            body,
            r#"<g class="{class}" data-region="{n}"><rect x="{x}" y="{y}" width="{NODE_W}" height="{h}" rx="6"/><text class="name" x="{tx}" y="{ny}">{n}</text><text class="tags" x="{tx}" y="{gy}">{t}</text><text class="tags" x="{tx}" y="{py}">{p}{note}</text></g>"#,
            n = xml_escape(&r.name),
            t = xml_escape(&tags_text(&r.tags)),
            p = xml_escape(&prio),
            h = NODE_H + 14,
            tx = x + 8,
            ny = y + 18,
            gy = y + 34,
            py = y + 49
        );
        x += NODE_W + 10;
    }
    y += NODE_H + 34;
    // One lane per rule.
    let tags_of = |name: &str| {
        map.regions
            .iter()
            .find(|r| r.name == name)
            .map(|r| tags_text(&r.tags))
            .unwrap_or_default()
    };
    let col_x = |step: usize| LEFT + step * (NODE_W + COL_GAP);
    for rule in &map.rules {
        let rows = rule.primaries.len().max(1);
        let lane_h = LANE_HEAD + rows * ROW + 10;
        let requires = if rule.requires.is_empty() {
            String::new()
        } else {
            format!(" · requires {}", rule.requires.join(", "))
        };
        let _ = writeln!(
            body,
            r#"<g class="lane" data-rule="{}"><rect class="lane-bg" x="4" y="{y}" width="{w}" height="{lane_h}"/><text class="heading" x="10" y="{hy}">{}{}</text>"#,
            rule.index + 1,
            xml_escape(&rule.label),
            xml_escape(&requires),
            w = width - 8,
            hy = y + 18
        );
        let top = y + LANE_HEAD;
        // Node centre y of row `i` of `rows`, and of a single node.
        let row_y = |i: usize| top + i * ROW + NODE_H / 2;
        let mid = top + (rows * ROW - (ROW - NODE_H)) / 2;
        let entry = (20usize, mid);
        let _ = writeln!(
            body,
            r#"<text class="entry" x="{}" y="{}">matching tasks</text>"#,
            entry.0,
            entry.1 + 4
        );
        // Where each region of the lane is drawn: (left x, centre y).
        let mut at: Vec<(&str, usize, usize)> = Vec::new();
        for (i, p) in rule.primaries.iter().enumerate() {
            at.push((p, col_x(0), row_y(i)));
        }
        for (k, b) in rule.backups.iter().enumerate() {
            at.push((b, col_x(k + 1), mid));
        }
        for e in &rule.edges {
            let Some(&(_, tx, ty)) = at.iter().find(|(n, _, _)| *n == e.to) else {
                continue;
            };
            let froms: Vec<(usize, usize)> = if e.from.is_empty() {
                vec![(entry.0 + 104, entry.1)]
            } else {
                e.from
                    .iter()
                    .filter_map(|f| at.iter().find(|(n, _, _)| n == f))
                    .map(|&(_, fx, fy)| (fx + NODE_W, fy))
                    .collect()
            };
            let label = e.label();
            let marker = match e.kind {
                EdgeKind::DropsTag => "⚠ ",
                EdgeKind::Refused => "✕ ",
                _ => "",
            };
            let _ = write!(
                body,
                r#"<g class="edge {k}" data-step="{s}" data-from="{f}" data-to="{t}"><title>{l}</title>"#,
                k = e.kind.as_str(),
                s = e.step,
                f = xml_escape(&e.from.join(",")),
                t = xml_escape(&e.to),
                l = xml_escape(&label)
            );
            for (i, &(fx, fy)) in froms.iter().enumerate() {
                let _ = write!(
                    body,
                    r#"<line class="edge-line {k}" x1="{fx}" y1="{fy}" x2="{x2}" y2="{ty}" marker-end="url(#arrow-{k})"/>"#,
                    k = e.kind.as_str(),
                    x2 = tx - 2
                );
                if i == 0 && e.step > 0 {
                    // Two lines in the gap: the step above the line, what
                    // it drops below.
                    let lx = fx + 8;
                    let (above, below) = edge_short(e);
                    let _ = write!(
                        body,
                        r#"<text class="edge-label {k}" x="{lx}" y="{ay}">{m}{a}</text><text class="edge-label {k}" x="{lx}" y="{by}">{b}</text>"#,
                        k = e.kind.as_str(),
                        m = marker,
                        a = xml_escape(&above),
                        b = xml_escape(&below),
                        ay = fy.min(ty).saturating_sub(7),
                        by = fy.max(ty) + 15
                    );
                }
            }
            let _ = writeln!(body, "</g>");
        }
        for &(name, x, cy) in &at {
            let _ = writeln!(
                body,
                r#"<g class="node" data-region="{n}"><rect x="{x}" y="{ry}" width="{NODE_W}" height="{NODE_H}" rx="6"/><text class="name" x="{tx}" y="{ny}">{n}</text><text class="tags" x="{tx}" y="{gy}">{t}</text></g>"#,
                n = xml_escape(name),
                t = xml_escape(&tags_of(name)),
                ry = cy - NODE_H / 2,
                tx = x + 8,
                ny = cy - 4,
                gy = cy + 12
            );
        }
        let _ = writeln!(body, "</g>");
        y += lane_h + 10;
    }
    // Uncovered inputs.
    let _ = writeln!(
        body,
        r#"<g class="uncovered"><text class="heading" x="10" y="{}">Uncovered inputs (rejected, fail closed): {}</text>"#,
        y + 14,
        if map.uncovered.is_empty() {
            "none".to_string()
        } else {
            map.uncovered.len().to_string()
        }
    );
    y += 20;
    for u in &map.uncovered {
        y += 18;
        let _ = writeln!(
            body,
            r#"<text class="uncovered-input" data-kind="{}" x="20" y="{y}">⚠ {}</text>"#,
            xml_escape(&u.kind),
            xml_escape(&uncovered_line(u))
        );
    }
    let _ = writeln!(body, "</g>");
    let height = y + 20;
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" class="residency-map" viewBox="0 0 {width} {height}" width="{width}" height="{height}" role="img" aria-label="{}">"#,
        xml_escape(&format!("Residency map of {}", map.federation))
    );
    let _ = writeln!(s, "<style>{SVG_STYLE}</style>");
    let _ = writeln!(s, "<defs>");
    for kind in [
        EdgeKind::Normal,
        EdgeKind::Failover,
        EdgeKind::DropsTag,
        EdgeKind::Refused,
    ] {
        let _ = writeln!(
            s,
            r#"<marker id="arrow-{k}" class="{k}" viewBox="0 0 10 10" refX="9" refY="5" markerUnits="userSpaceOnUse" markerWidth="10" markerHeight="10" orient="auto-start-reverse"><path d="M0,0 L10,5 L0,10 z"/></marker>"#,
            k = kind.as_str()
        );
    }
    let _ = writeln!(s, "</defs>");
    s.push_str(&body);
    s.push_str("</svg>\n");
    s
}

/// Colours and dash patterns: the dash and the label carry the meaning in
/// black and white too.
const SVG_STYLE: &str = "\
.residency-map text{font-family:sans-serif;font-size:12px;fill:#111}\
.residency-map .title{font-size:17px;font-weight:bold}\
.residency-map .meta{fill:#444}\
.residency-map .heading{font-weight:bold}\
.residency-map rect{fill:#fff;stroke:#333;stroke-width:1.2}\
.residency-map .lane-bg{fill:#f6f6f6;stroke:#ccc}\
.residency-map .unreached rect{stroke-dasharray:4 3;fill:#fafafa}\
.residency-map .name{font-weight:bold}\
.residency-map .tags{fill:#333;font-size:11px}\
.residency-map .edge-line{stroke:#222;stroke-width:1.6;fill:none}\
.residency-map .edge-line.failover{stroke-dasharray:7 4}\
.residency-map .edge-line.drops-tag{stroke:#b35c00;stroke-width:2.6;stroke-dasharray:7 4}\
.residency-map .edge-line.refused{stroke:#b00020;stroke-width:2.6;stroke-dasharray:2 3}\
.residency-map .edge-label.drops-tag{fill:#8a4600;font-weight:bold}\
.residency-map .edge-label.refused{fill:#b00020;font-weight:bold}\
.residency-map marker path{fill:#222}\
.residency-map marker.drops-tag path{fill:#b35c00}\
.residency-map marker.refused path{fill:#b00020}\
.residency-map .uncovered-input{fill:#8a4600}";

fn tags_text(tags: &[String]) -> String {
    if tags.is_empty() {
        "no tags".into()
    } else {
        tags.join(", ")
    }
}

/// The label drawn on the edge, as (above the line, below it); the full
/// one is its `<title>`.
fn edge_short(e: &Edge) -> (String, String) {
    let step = format!("failover {}", e.step);
    match e.kind {
        EdgeKind::DropsTag => (step, format!("drops {}", e.dropped.join(", "))),
        EdgeKind::Refused => (
            format!("{step}: refused"),
            format!("lacks {}", e.required.join(", ")),
        ),
        _ => (step, String::new()),
    }
}

// ---------------------------------------------------------------------------
// HTML.

/// A self-contained page (inline CSS and SVG, no script, no external
/// asset) for auditors: the map, a table of where each rule's data can go,
/// the warning edges, the uncovered inputs and every finding; print
/// styles keep it on landscape pages with its colours and patterns.
pub fn to_html(map: &Map, report: &Report) -> String {
    let mut s = String::new();
    let title = format!("Residency map: {}", map.federation);
    let _ = writeln!(
        s,
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n<title>{}</title>\n<style>{HTML_STYLE}</style>\n</head>\n<body>",
        xml_escape(&title)
    );
    let (errors, warnings, info) = map.summary;
    let _ = writeln!(
        s,
        "<h1>{}</h1>\n<p class=\"meta\">Policy hash <code>{}</code>. Audit: {errors} error(s), {warnings} warning(s), {info} info; {} inputs examined{}.</p>",
        xml_escape(&title),
        xml_escape(&map.policy_hash),
        report.inputs_examined,
        if report.exhaustive {
            " (exhaustive)"
        } else {
            " (partial: see the findings)"
        }
    );
    let _ = writeln!(s, "<section id=\"map\">\n{}</section>", to_svg(map));
    let _ = writeln!(
        s,
        "<section id=\"flows\">\n<h2>Where each rule's data can go</h2>\n<table>\n<thead><tr><th>Rule</th><th>Requires</th><th>Normal operation</th><th>Failover steps</th></tr></thead>\n<tbody>"
    );
    for rule in &map.rules {
        let normal = rule
            .edges
            .iter()
            .filter(|e| e.step == 0)
            .map(|e| xml_escape(&e.to))
            .collect::<Vec<_>>()
            .join(", ");
        let steps = rule
            .edges
            .iter()
            .filter(|e| e.step > 0)
            .map(|e| {
                format!(
                    "<li class=\"{}\">{}{} → {}</li>",
                    e.kind.as_str(),
                    match e.kind {
                        EdgeKind::DropsTag => "⚠ ",
                        EdgeKind::Refused => "✕ ",
                        _ => "",
                    },
                    xml_escape(&e.label()),
                    xml_escape(&e.to)
                )
            })
            .collect::<String>();
        let steps = if steps.is_empty() {
            "none: tasks are rejected when the primary is unavailable".to_string()
        } else {
            format!("<ol>{steps}</ol>")
        };
        let _ = writeln!(
            s,
            "<tr><td>{}</td><td>{}</td><td>{normal}</td><td>{steps}</td></tr>",
            xml_escape(&rule.label),
            xml_escape(&if rule.requires.is_empty() {
                "nothing".to_string()
            } else {
                rule.requires.join(", ")
            })
        );
    }
    let _ = writeln!(s, "</tbody>\n</table>\n</section>");
    let _ = writeln!(
        s,
        "<section id=\"warnings\">\n<h2>Failovers that drop a compliance tag</h2>"
    );
    let mut any = false;
    for (rule, e) in map.warnings() {
        if !any {
            let _ = writeln!(s, "<ul>");
            any = true;
        }
        let _ = writeln!(
            s,
            "<li class=\"warning {}\" data-rule=\"{}\" data-to=\"{}\">{} {}: {} → {}: {}</li>",
            e.kind.as_str(),
            rule.index + 1,
            xml_escape(&e.to),
            if e.kind == EdgeKind::Refused {
                "✕"
            } else {
                "⚠"
            },
            xml_escape(&rule.label),
            xml_escape(&e.from.join(", ")),
            xml_escape(&e.to),
            xml_escape(&e.label())
        );
    }
    if any {
        let _ = writeln!(s, "</ul>");
    } else {
        let _ = writeln!(s, "<p>None.</p>");
    }
    let _ = writeln!(s, "</section>");
    let _ = writeln!(
        s,
        "<section id=\"uncovered\">\n<h2>Uncovered inputs (rejected, fail closed)</h2>"
    );
    if map.uncovered.is_empty() {
        let _ = writeln!(
            s,
            "<p>None: every input matches a rule that has a compliant region.</p>"
        );
    } else {
        let _ = writeln!(s, "<ul>");
        for u in &map.uncovered {
            let _ = writeln!(
                s,
                "<li class=\"uncovered\" data-kind=\"{}\">{}{}</li>",
                xml_escape(&u.kind),
                xml_escape(&u.message),
                u.example
                    .as_ref()
                    .map(|e| format!(" <span class=\"example\">Example: {}</span>", xml_escape(e)))
                    .unwrap_or_default()
            );
        }
        let _ = writeln!(s, "</ul>");
    }
    let _ = writeln!(s, "</section>");
    let _ = writeln!(
        s,
        "<section id=\"findings\">\n<h2>Every finding of the audit</h2>\n<table>\n<thead><tr><th>Severity</th><th>Kind</th><th>Rule</th><th>Finding</th></tr></thead>\n<tbody>"
    );
    for f in &report.findings {
        let _ = writeln!(
            s,
            "<tr class=\"{sev}\"><td>{sev}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            xml_escape(f.kind),
            xml_escape(f.rule.as_deref().unwrap_or("")),
            xml_escape(&f.message),
            sev = f.severity.as_str()
        );
    }
    let _ = writeln!(s, "</tbody>\n</table>\n</section>\n</body>\n</html>");
    s
}

const HTML_STYLE: &str = "\
body{font-family:sans-serif;margin:1.5em;color:#111;max-width:1400px}\
h1{font-size:1.5em;margin:0 0 .2em}\
h2{font-size:1.15em;margin:1.2em 0 .4em}\
.meta{color:#444}\
#map svg{max-width:100%;height:auto;border:1px solid #ddd}\
table{border-collapse:collapse;width:100%}\
th,td{border:1px solid #bbb;padding:.3em .5em;text-align:left;vertical-align:top}\
th{background:#eee}\
ol,ul{margin:.2em 0;padding-left:1.4em}\
li.drops-tag{color:#8a4600;font-weight:bold}\
li.refused{color:#b00020;font-weight:bold}\
tr.error td:first-child{color:#b00020;font-weight:bold}\
tr.warning td:first-child{color:#8a4600;font-weight:bold}\
.example{color:#444}\
@page{size:A4 landscape;margin:12mm}\
@media print{\
body{margin:0;max-width:none;font-size:10pt}\
*{-webkit-print-color-adjust:exact;print-color-adjust:exact}\
#map svg{border:none;width:100%}\
section{break-inside:avoid-page}\
#findings{break-before:page}\
tr{break-inside:avoid}\
}";

#[cfg(test)]
mod tests;
