//! The controller's modules form no import cycle: every arrow of the data
//! path points down (api → routing → policy, cluster, store, log, peers),
//! and the composition (`controller::Node`) is imported only from above.
//!
//! Read from the source as text: every `crate::…` and `super::…` path of a
//! file (grouped `use` lists expanded) is resolved to the file that defines
//! it (comment lines aside), descending through child modules and through a `mod.rs`'s
//! `pub use child::Name` re-exports. A child's use of what its own folder's
//! `mod.rs` defines is not counted (the folder is one concept, `mod.rs` its
//! front). `#[cfg(test)]` modules and test-only files are left out.
//!
//! `cargo test -p federation --test layering` checks this crate; set
//! `LAYERING_SRC` to another `federation/src` to check that tree instead.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// One source file: its module path and its text without test modules.
struct Module {
    path: Vec<String>,
    text: String,
}

fn source_root() -> PathBuf {
    match std::env::var_os("LAYERING_SRC") {
        Some(dir) => PathBuf::from(dir),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("src"),
    }
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .map(|e| e.expect("directory entry").path())
        .collect();
    entries.sort();
    for p in entries {
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|e| e == "rs") {
            out.push(p);
        }
    }
}

/// The module path of `file` under `root` (`a/mod.rs` and `a.rs` are `a`).
fn module_path(root: &Path, file: &Path) -> Vec<String> {
    let rel = file.strip_prefix(root).expect("under the root");
    let mut parts: Vec<String> = rel
        .iter()
        .map(|p| p.to_string_lossy().trim_end_matches(".rs").to_string())
        .collect();
    if parts
        .last()
        .is_some_and(|p| p == "mod" || p == "lib" || p == "main")
    {
        parts.pop();
    }
    parts
}

/// The text without comment lines (a doc link is no import).
fn without_comments(text: &str) -> String {
    text.lines()
        .filter(|l| !l.trim_start().starts_with("//"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The text without `#[cfg(test)]` items (a test module runs to its
/// closing brace; counted by braces, which is enough for this crate's
/// source, whose test modules hold no unbalanced braces in strings).
fn without_tests(text: &str) -> String {
    let mut out = String::new();
    let mut rest = text;
    while let Some(at) = rest.find("#[cfg(test)]") {
        out.push_str(&rest[..at]);
        let after = &rest[at..];
        // The item: up to its `;` (a `mod x;`) or its balanced braces.
        let mut depth = 0usize;
        let mut end = after.len();
        for (i, c) in after.char_indices() {
            match c {
                ';' if depth == 0 => {
                    end = i + 1;
                    break;
                }
                '{' => depth += 1,
                '}' => {
                    depth -= 1;
                    if depth == 0 {
                        end = i + 1;
                        break;
                    }
                }
                _ => {}
            }
        }
        rest = &after[end..];
    }
    out.push_str(rest);
    out
}

/// Files only tests compile (declared behind `#[cfg(test)]` by their parent).
fn test_only(modules: &BTreeMap<PathBuf, Module>) -> BTreeSet<Vec<String>> {
    let mut out = BTreeSet::new();
    for (file, m) in modules {
        let full = std::fs::read_to_string(file).expect("source readable");
        let mut lines = full.lines().peekable();
        while let Some(line) = lines.next() {
            if line.trim() == "#[cfg(test)]" {
                if let Some(next) = lines.peek() {
                    let t = next.trim().trim_start_matches("pub ");
                    if let Some(name) = t.strip_prefix("mod ").and_then(|n| n.strip_suffix(';')) {
                        let mut p = m.path.clone();
                        p.push(name.trim().to_string());
                        out.insert(p);
                    }
                }
            }
        }
    }
    out
}

fn is_ident(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

/// Every path after `prefix` (`crate::` or `super::`) in `text`, with
/// grouped lists (`a::{b, c::{d, E}}`) expanded.
fn paths_after(text: &str, prefix: &str) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    let mut from = 0;
    while let Some(i) = text[from..].find(prefix) {
        let start = from + i;
        from = start + prefix.len();
        if start > 0
            && text[..start]
                .chars()
                .next_back()
                .is_some_and(|c| is_ident(c) || c == ':')
        {
            continue;
        }
        // `pub(in crate::x)` names who may see an item, not an import.
        if text[..start].ends_with("(in ") {
            continue;
        }
        expand(&text[from..], Vec::new(), &mut out);
    }
    out
}

/// Reads one path (or grouped list) at the start of `s` into `out`.
fn expand(s: &str, base: Vec<String>, out: &mut Vec<Vec<String>>) {
    let mut path = base;
    let mut rest = s;
    loop {
        if let Some(inner) = rest.strip_prefix('{') {
            // A grouped list: each top-level item is a path of its own.
            let mut depth = 0usize;
            let mut item_start = 0;
            for (i, c) in inner.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => {
                        expand(inner[item_start..i].trim_start(), path.clone(), out);
                        return;
                    }
                    '}' => depth -= 1,
                    ',' if depth == 0 => {
                        expand(inner[item_start..i].trim_start(), path.clone(), out);
                        item_start = i + 1;
                    }
                    _ => {}
                }
            }
            return;
        }
        let len = rest.find(|c: char| !is_ident(c)).unwrap_or(rest.len());
        if len == 0 {
            break;
        }
        path.push(rest[..len].to_string());
        rest = &rest[len..];
        match rest.strip_prefix("::") {
            Some(r) => rest = r,
            None => break,
        }
    }
    if !path.is_empty() {
        out.push(path);
    }
}

/// The child modules a file declares (`mod x;`, `pub mod x;`).
fn children(text: &str) -> Vec<String> {
    text.lines()
        .filter_map(|l| {
            let t = l.trim();
            let t = t
                .strip_prefix("pub(crate) ")
                .or_else(|| t.strip_prefix("pub "))
                .unwrap_or(t);
            t.strip_prefix("mod ")?
                .strip_suffix(';')
                .map(|n| n.trim().to_string())
        })
        .collect()
}

/// Names a `mod.rs` re-exports from a child: (module, name) → child.
fn reexports(modules: &BTreeMap<PathBuf, Module>) -> BTreeMap<(Vec<String>, String), Vec<String>> {
    let mut out = BTreeMap::new();
    for m in modules.values() {
        // A statement may span lines (rustfmt breaks long lists).
        for (at, _) in m.text.match_indices("pub use ") {
            let starts_line = m.text[..at]
                .chars()
                .next_back()
                .is_none_or(|c| c == '\n' || c == ' ');
            if !starts_line {
                continue;
            }
            let rest = &m.text[at + "pub use ".len()..];
            let Some(end) = rest.find(';') else {
                continue;
            };
            let statement = rest[..end].replace('\n', " ");
            let mut paths = Vec::new();
            expand(&statement, Vec::new(), &mut paths);
            for p in paths {
                if p.len() < 2 || p[0] == "crate" || p[0] == "super" || p[0] == "self" {
                    continue;
                }
                let mut child = m.path.clone();
                child.push(p[0].clone());
                let name = p.last().expect("non-empty").clone();
                out.insert((m.path.clone(), name), child);
            }
        }
    }
    out
}

/// The module (file) a path from the crate root lands in.
fn resolve(
    path: &[String],
    files: &BTreeSet<Vec<String>>,
    reexported: &BTreeMap<(Vec<String>, String), Vec<String>>,
) -> Vec<String> {
    let mut at: Vec<String> = Vec::new();
    for seg in path {
        let mut next = at.clone();
        next.push(seg.clone());
        if files.contains(&next) {
            at = next;
        } else if let Some(child) = reexported.get(&(at.clone(), seg.clone())) {
            at = child.clone();
        } else {
            break;
        }
    }
    at
}

/// Strongly connected components of more than one file (Tarjan).
fn cycles(edges: &BTreeMap<Vec<String>, BTreeSet<Vec<String>>>) -> Vec<Vec<Vec<String>>> {
    struct State<'a> {
        edges: &'a BTreeMap<Vec<String>, BTreeSet<Vec<String>>>,
        index: BTreeMap<&'a Vec<String>, usize>,
        low: BTreeMap<&'a Vec<String>, usize>,
        stack: Vec<&'a Vec<String>>,
        on: BTreeSet<&'a Vec<String>>,
        next: usize,
        out: Vec<Vec<Vec<String>>>,
    }
    fn visit<'a>(s: &mut State<'a>, v: &'a Vec<String>) {
        s.index.insert(v, s.next);
        s.low.insert(v, s.next);
        s.next += 1;
        s.stack.push(v);
        s.on.insert(v);
        if let Some(targets) = s.edges.get(v) {
            for w in targets {
                let Some((w, _)) = s.edges.get_key_value(w) else {
                    continue;
                };
                if !s.index.contains_key(w) {
                    visit(s, w);
                    let low = s.low[w].min(s.low[v]);
                    s.low.insert(v, low);
                } else if s.on.contains(w) {
                    let low = s.index[w].min(s.low[v]);
                    s.low.insert(v, low);
                }
            }
        }
        if s.low[v] == s.index[v] {
            let mut component = Vec::new();
            while let Some(w) = s.stack.pop() {
                s.on.remove(w);
                component.push(w.clone());
                if w == v {
                    break;
                }
            }
            if component.len() > 1 {
                component.sort();
                s.out.push(component);
            }
        }
    }
    let mut s = State {
        edges,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on: BTreeSet::new(),
        next: 0,
        out: Vec::new(),
    };
    for v in edges.keys() {
        if !s.index.contains_key(v) {
            visit(&mut s, v);
        }
    }
    s.out
}

/// The import graph of the tree under `root`: file module → modules it uses.
fn graph(root: &Path) -> BTreeMap<Vec<String>, BTreeSet<Vec<String>>> {
    let mut files = Vec::new();
    rust_files(root, &mut files);
    let mut modules = BTreeMap::new();
    for f in files {
        let text = std::fs::read_to_string(&f).expect("source readable");
        modules.insert(
            f.clone(),
            Module {
                path: module_path(root, &f),
                text: without_tests(&without_comments(&text)),
            },
        );
    }
    let tests = test_only(&modules);
    modules.retain(|_, m| !tests.iter().any(|t| m.path.starts_with(t)) && !m.path.is_empty());
    let known: BTreeSet<Vec<String>> = modules.values().map(|m| m.path.clone()).collect();
    let reexported = reexports(&modules);
    let mut edges: BTreeMap<Vec<String>, BTreeSet<Vec<String>>> = BTreeMap::new();
    for (file, m) in &modules {
        let is_mod_rs = file.file_name().is_some_and(|n| n == "mod.rs");
        let parent: Vec<String> = m.path[..m.path.len() - 1].to_vec();
        let mut uses: Vec<Vec<String>> = paths_after(&m.text, "crate::");
        for p in paths_after(&m.text, "super::") {
            // `super` of `a/b.rs` is `a`; of `a/b/mod.rs` it is `a` too.
            let mut full = if is_mod_rs {
                m.path[..m.path.len().saturating_sub(1)].to_vec()
            } else {
                parent.clone()
            };
            full.extend(p);
            uses.push(full);
        }
        // A folder's front uses its children by their bare names.
        for child in children(&m.text) {
            let mut base = m.path.clone();
            base.push(child.clone());
            for p in paths_after(&m.text, &format!("{child}::")) {
                let mut full = base.clone();
                full.extend(p);
                uses.push(full);
            }
        }
        let targets = edges.entry(m.path.clone()).or_default();
        for u in uses {
            let to = resolve(&u, &known, &reexported);
            // The crate root, the file itself, and a child's use of its own
            // folder's front are no arrows.
            if to.is_empty() || to == m.path || (!is_mod_rs && to == parent) {
                continue;
            }
            targets.insert(to);
        }
    }
    edges
}

#[test]
fn the_controllers_modules_form_no_import_cycle() {
    let root = source_root();
    let edges = graph(&root);
    assert!(
        edges.len() > 20,
        "read only {} modules under {}",
        edges.len(),
        root.display()
    );
    let found = cycles(&edges);
    let shown: Vec<String> = found
        .iter()
        .map(|c| {
            let names: Vec<String> = c.iter().map(|m| m.join("::")).collect();
            // What ties them: each arrow between two of its members.
            let arrows: Vec<String> = c
                .iter()
                .flat_map(|from| {
                    edges
                        .get(from)
                        .into_iter()
                        .flatten()
                        .filter(|to| c.contains(to))
                        .map(move |to| format!("  {} -> {}", from.join("::"), to.join("::")))
                })
                .collect();
            format!(
                "{} modules: {}\n{}",
                names.len(),
                names.join(", "),
                arrows.join("\n")
            )
        })
        .collect();
    assert!(
        found.is_empty(),
        "import cycles under {}:\n{}",
        root.display(),
        shown.join("\n")
    );
}

#[test]
fn only_the_runtime_and_what_sits_above_it_import_the_node() {
    let edges = graph(&source_root());
    let node = vec!["controller".to_string()];
    let allowed = [
        "runtime",
        "admin_http",
        "status_view",
        "service",
        "cli::serve",
    ];
    let importers: Vec<String> = edges
        .iter()
        .filter(|(_, to)| to.contains(&node))
        .map(|(from, _)| from.join("::"))
        .filter(|from| {
            !allowed
                .iter()
                .any(|a| from == a || from.starts_with(&format!("{a}::")))
        })
        .collect();
    assert!(
        importers.is_empty(),
        "modules below the composition import controller: {importers:?}"
    );
}

#[test]
fn the_reader_sees_grouped_uses_and_reexports() {
    let mut out = Vec::new();
    expand("a::{b, c::{d, E}};", Vec::new(), &mut out);
    assert_eq!(
        out,
        vec![
            vec!["a".to_string(), "b".to_string()],
            vec!["a".to_string(), "c".to_string(), "d".to_string()],
            vec!["a".to_string(), "c".to_string(), "E".to_string()],
        ]
    );
    let files: BTreeSet<Vec<String>> = [vec!["r".to_string()], vec!["r".into(), "recv".into()]]
        .into_iter()
        .collect();
    let mut re = BTreeMap::new();
    re.insert(
        (vec!["r".to_string()], "Stats".to_string()),
        vec!["r".to_string(), "recv".to_string()],
    );
    assert_eq!(
        resolve(&["r".into(), "Stats".into()], &files, &re),
        vec!["r".to_string(), "recv".to_string()]
    );
    assert_eq!(
        resolve(&["r".into(), "Other".into()], &files, &re),
        vec!["r".to_string()]
    );
    let mut edges = BTreeMap::new();
    edges.insert(vec!["a".to_string()], [vec!["b".to_string()]].into());
    edges.insert(vec!["b".to_string()], [vec!["a".to_string()]].into());
    assert_eq!(cycles(&edges).len(), 1);
}
