//! The residency map of the seed and its variants: regions, the warning
//! edges, the uncovered inputs; DOT that parses; escaping.

use std::collections::BTreeMap;
use std::path::Path;

use super::super::analysis;
use super::super::*;
use super::*;

fn policy(name: &str) -> Policy {
    Policy::load_file(
        &Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../policies")
            .join(name),
    )
    .expect("policy loads")
}

fn map_of(p: &Policy) -> Map {
    build(p, &analysis::check(p))
}

fn edge<'a>(m: &'a Map, rule: usize, to: &str) -> &'a Edge {
    m.rules[rule]
        .edges
        .iter()
        .find(|e| e.to == to && e.step > 0)
        .unwrap_or_else(|| panic!("rule {rule} has a failover to {to}: {m:#?}"))
}

#[test]
fn the_seed_map_has_its_regions_and_both_tag_dropping_failovers() {
    let m = map_of(&policy("seed-federation.yaml"));
    let regions: Vec<(&str, bool)> = m
        .regions
        .iter()
        .map(|r| (r.name.as_str(), r.reached))
        .collect();
    // By priority; asia_pacific is configured but no rule routes there.
    assert_eq!(
        regions,
        [
            ("north_america", true),
            ("europe", true),
            ("asia_pacific", false)
        ]
    );
    assert_eq!(m.rules.len(), 2);
    // Normal operation.
    let normal: Vec<(&str, usize)> = m
        .rules
        .iter()
        .flat_map(|r| r.edges.iter().filter(|e| e.step == 0))
        .map(|e| (e.to.as_str(), e.kind as usize))
        .collect();
    assert_eq!(
        normal,
        [
            ("north_america", EdgeKind::Normal as usize),
            ("europe", EdgeKind::Normal as usize)
        ]
    );
    // Rule 1 fails over to europe, losing HIPAA; rule 2 to north_america,
    // losing GDPR (the finding the design asks the auditor to see).
    let us = edge(&m, 0, "europe");
    assert_eq!((us.kind, us.step), (EdgeKind::DropsTag, 1));
    assert_eq!(us.from, ["north_america"]);
    assert_eq!(us.dropped, ["HIPAA"]);
    let eu = edge(&m, 1, "north_america");
    assert_eq!((eu.kind, eu.step), (EdgeKind::DropsTag, 1));
    assert_eq!(eu.dropped, ["GDPR"]);
    assert!(eu.refused_for.is_empty());
    assert_eq!(eu.label(), "failover 1: drops GDPR");
    assert_eq!(m.warnings().count(), 2);
    // Inputs no rule matches: another customer region, and none at all.
    let kinds: Vec<&str> = m.uncovered.iter().map(|u| u.kind.as_str()).collect();
    assert_eq!(kinds, ["unmatched-input", "unmatched-missing-attribute"]);
    assert!(
        m.uncovered[0]
            .example
            .as_deref()
            .is_some_and(|e| e.starts_with("customer_region='")),
        "{:?}",
        m.uncovered[0]
    );
}

#[test]
fn a_required_tag_turns_the_warning_into_a_refused_step_and_a_data_class_names_itself() {
    let m = map_of(&policy("seed-requires-gdpr.yaml"));
    let eu = edge(&m, 1, "north_america");
    assert_eq!(eu.kind, EdgeKind::Refused);
    assert_eq!(eu.required, ["GDPR"]);
    assert_eq!(eu.label(), "failover 1: refused, requires GDPR");
    let m = map_of(&policy("seed-data-class-gdpr.yaml"));
    let eu = edge(&m, 1, "north_america");
    assert_eq!(eu.kind, EdgeKind::DropsTag);
    assert_eq!(eu.refused_for, ["eu-pii"]);
    // The US rule's failover drops HIPAA, which no data class requires.
    assert!(edge(&m, 0, "europe").refused_for.is_empty());
}

#[test]
fn a_set_fails_over_from_every_member_and_a_clean_policy_has_no_warning() {
    let m = map_of(&policy("eu-set.yaml"));
    let set = &m.rules[0];
    assert_eq!(set.primaries, ["europe_west", "europe_central"]);
    assert_eq!(
        set.edges
            .iter()
            .filter(|e| e.kind == EdgeKind::Normal)
            .count(),
        2
    );
    for r in &m.rules {
        for e in r.edges.iter().filter(|e| e.step > 0) {
            assert_eq!(
                e.from.len(),
                if e.step == 1 { r.primaries.len() } else { 1 }
            );
        }
    }
    let clean = map_of(&policy("clean.yaml"));
    assert_eq!(clean.warnings().count(), 0, "{clean:#?}");
}

#[test]
fn svg_and_html_hold_the_regions_and_warning_edges() {
    let p = policy("seed-federation.yaml");
    let report = analysis::check(&p);
    let m = build(&p, &report);
    let svg = to_svg(&m);
    assert!(svg.starts_with("<svg xmlns=\"http://www.w3.org/2000/svg\""));
    for r in ["north_america", "europe", "asia_pacific"] {
        assert!(svg.contains(&format!("data-region=\"{r}\"")), "{r}");
    }
    assert_eq!(svg.matches("<g class=\"edge drops-tag\"").count(), 2);
    assert!(svg.contains(">⚠ failover 1</text>") && svg.contains(">drops GDPR</text>"));
    assert!(svg.contains("no rule routes here"));
    assert!(
        !svg.contains("http://") || svg.matches("http://").count() == 1,
        "only the namespace"
    );
    let html = to_html(&m, &report);
    assert!(html.starts_with("<!DOCTYPE html>"));
    assert!(html.contains("@media print"));
    assert!(!html.contains("<script") && !html.contains("<link") && !html.contains("src="));
    assert_eq!(html.matches("<li class=\"warning drops-tag\"").count(), 2);
    assert_eq!(html.matches("<li class=\"uncovered\"").count(), 2);
}

#[test]
fn text_from_the_file_is_escaped_everywhere() {
    assert_eq!(
        xml_escape(r#"a<b>&"c"'d'"#),
        "a&lt;b&gt;&amp;&quot;c&quot;&#39;d&#39;"
    );
    assert_eq!(xml_escape("bell\u{7}"), "bell\u{fffd}");
    assert_eq!(dot_quote("a\"b\\c\nd"), r#""a\"b\\c\nd""#);
    let text = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies/seed-federation.yaml"),
    )
    .expect("seed")
    .replace("Global Enterprise Federation", "R&D <b>\\\"ops\\\"</b>");
    let loaded = crate::config::load_from_text(Path::new("x.yaml"), &text).expect("parses");
    let p = Policy::from_loaded(&loaded).expect("valid");
    assert_eq!(p.federation, "R&D <b>\"ops\"</b>");
    let m = map_of(&p);
    let svg = to_svg(&m);
    assert!(
        svg.contains("R&amp;D &lt;b&gt;&quot;ops&quot;&lt;/b&gt;"),
        "{svg}"
    );
    assert!(!svg.contains("<b>"));
    let html = to_html(&m, &analysis::check(&p));
    assert!(!html.contains("<b>"));
    let dot = to_dot(&m);
    assert!(dot.contains(r#"R&D <b>\"ops\"</b>"#), "{dot}");
    parse_dot(&dot).expect("still parses");
}

// ---------------------------------------------------------------------------
// A parser of the DOT language (the subset the renderer may emit: graph,
// node, edge and attribute statements, subgraphs, quoted and bare IDs),
// strict where Graphviz is strict: unbalanced braces, a bad escape, an
// attribute without a value or a dangling `->` are errors.

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Id(String),
    Punct(char),
    Arrow,
}

fn tokens(s: &str) -> Result<Vec<Tok>, String> {
    let mut out = Vec::new();
    let mut chars = s.chars().peekable();
    while let Some(&c) = chars.peek() {
        match c {
            c if c.is_whitespace() => {
                chars.next();
            }
            '{' | '}' | '[' | ']' | ';' | ',' | '=' => {
                chars.next();
                out.push(Tok::Punct(c));
            }
            '-' => {
                chars.next();
                if chars.next() != Some('>') {
                    return Err("`-` not followed by `>`".into());
                }
                out.push(Tok::Arrow);
            }
            '"' => {
                chars.next();
                let mut id = String::new();
                loop {
                    match chars.next() {
                        None => return Err("unterminated string".into()),
                        Some('"') => break,
                        Some('\\') => match chars.next() {
                            Some(e @ ('"' | '\\')) => id.push(e),
                            Some('n') => id.push('\n'),
                            other => return Err(format!("bad escape {other:?}")),
                        },
                        Some(c) => id.push(c),
                    }
                }
                out.push(Tok::Id(id));
            }
            c if c.is_alphanumeric() || c == '_' || c == '.' || c == '#' => {
                let mut id = String::new();
                while let Some(&c) = chars.peek() {
                    if c.is_alphanumeric() || c == '_' || c == '.' {
                        id.push(c);
                        chars.next();
                    } else {
                        break;
                    }
                }
                out.push(Tok::Id(id));
            }
            c => return Err(format!("unexpected `{c}`")),
        }
    }
    Ok(out)
}

/// Nodes declared (with their attributes) and edges (from, to, attributes).
#[derive(Debug, Default)]
struct Graph {
    nodes: BTreeMap<String, BTreeMap<String, String>>,
    edges: Vec<(String, String, BTreeMap<String, String>)>,
}

fn parse_dot(s: &str) -> Result<Graph, String> {
    let toks = tokens(s)?;
    let mut i = 0;
    let id = |i: &mut usize| -> Result<String, String> {
        match toks.get(*i) {
            Some(Tok::Id(s)) => {
                *i += 1;
                Ok(s.clone())
            }
            other => Err(format!("expected an ID at token {i}, got {other:?}")),
        }
    };
    let punct = |i: &mut usize, c: char| -> Result<(), String> {
        if toks.get(*i) == Some(&Tok::Punct(c)) {
            *i += 1;
            Ok(())
        } else {
            Err(format!(
                "expected `{c}` at token {i}, got {:?}",
                toks.get(*i)
            ))
        }
    };
    if id(&mut i)? != "digraph" {
        return Err("not a digraph".into());
    }
    id(&mut i)?;
    punct(&mut i, '{')?;
    let mut g = Graph::default();
    let mut depth = 1;
    while depth > 0 {
        match toks.get(i) {
            None => return Err("unbalanced braces".into()),
            Some(Tok::Punct('}')) => {
                i += 1;
                depth -= 1;
            }
            Some(Tok::Punct(';')) => i += 1,
            Some(Tok::Id(kw)) if kw == "subgraph" => {
                i += 1;
                id(&mut i)?;
                punct(&mut i, '{')?;
                depth += 1;
            }
            Some(Tok::Id(_)) => {
                let first = id(&mut i)?;
                let mut attrs = BTreeMap::new();
                let mut to = None;
                if toks.get(i) == Some(&Tok::Arrow) {
                    i += 1;
                    to = Some(id(&mut i)?);
                } else if toks.get(i) == Some(&Tok::Punct('=')) {
                    i += 1;
                    id(&mut i)?;
                    continue;
                }
                if toks.get(i) == Some(&Tok::Punct('[')) {
                    i += 1;
                    while toks.get(i) != Some(&Tok::Punct(']')) {
                        let k = id(&mut i)?;
                        punct(&mut i, '=')?;
                        let v = id(&mut i)?;
                        attrs.insert(k, v);
                        if toks.get(i) == Some(&Tok::Punct(',')) {
                            i += 1;
                        }
                    }
                    i += 1;
                }
                match (first.as_str(), to) {
                    ("graph" | "node" | "edge", None) => {}
                    (_, Some(to)) => g.edges.push((first, to, attrs)),
                    (_, None) => {
                        g.nodes.insert(first, attrs);
                    }
                }
            }
            other => return Err(format!("unexpected {other:?} at token {i}")),
        }
    }
    if i != toks.len() {
        return Err("text after the graph".into());
    }
    Ok(g)
}

#[test]
fn the_seed_dot_parses_and_draws_the_warning_edges() {
    let dot = to_dot(&map_of(&policy("seed-federation.yaml")));
    let g = parse_dot(&dot).unwrap_or_else(|e| panic!("{e}:\n{dot}"));
    for (from, to, _) in &g.edges {
        assert!(
            g.nodes.contains_key(from) && g.nodes.contains_key(to),
            "{from} -> {to}"
        );
    }
    let warnings: Vec<(&str, &str, &str)> = g
        .edges
        .iter()
        .filter(|(_, _, a)| a.get("class").map(String::as_str) == Some("drops-tag"))
        .map(|(f, t, a)| (f.as_str(), t.as_str(), a["label"].as_str()))
        .collect();
    assert_eq!(
        warnings,
        [
            (
                "rule1/north_america",
                "rule1/europe",
                "failover 1: drops HIPAA"
            ),
            (
                "rule2/europe",
                "rule2/north_america",
                "failover 1: drops GDPR"
            ),
        ]
    );
    assert!(g.nodes["uncovered"]["label"].contains("no rule matches"));
    assert_eq!(
        g.nodes["region/asia_pacific"]["label"],
        "asia_pacific\nPDPA\nno rule routes here"
    );
    assert!(g.nodes["rule2/europe"]["label"].starts_with("europe\nGDPR, SOX"));
    // The parser is strict: a broken graph is refused.
    assert!(parse_dot(&dot.replacen('}', "", 1)).is_err());
    assert!(
        parse_dot(
            &dot.replacen("\\\"", "\\q", 1)
                .replacen("label=\"", "label=\"\\q", 1)
        )
        .is_err()
    );
    // With Graphviz installed, Graphviz itself reads it.
    if let Ok(mut child) = std::process::Command::new("dot")
        .arg("-Tsvg")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
    {
        use std::io::Write as _;
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(dot.as_bytes())
            .expect("write");
        assert!(
            child.wait().expect("dot runs").success(),
            "graphviz refuses:\n{dot}"
        );
    }
}
