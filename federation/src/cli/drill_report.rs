//! A drill's report: its model (`Report`, `ProbeResult`, …, which
//! `super::drill` fills) and its HTML form, one
//! self-contained page (no external assets, readable in print) with the
//! verdict, the timeline, each probe's expected and observed placement, the
//! differences and the decision-log range.

use serde::Serialize;

/// Escapes text for HTML.
fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

fn probe_row(p: &ProbeResult) -> String {
    format!(
        "<tr class=\"{}\"><td>{}</td><td>{}</td><td><code>{}</code></td><td>{}<div class=\"why\">{}</div></td><td>{}<div class=\"why\">{}</div></td><td>{}</td><td>{}</td></tr>\n",
        if p.agree { "ok" } else { "bad" },
        esc(&p.phase),
        esc(&p.name),
        esc(&p.attributes),
        esc(&p.expected.label()),
        esc(&p.expected_reason),
        esc(&p.observed.label()),
        esc(&p.observed_reason),
        if p.agree { "agree" } else { "DIFFER" },
        p.log_seq.map_or_else(String::new, |s| s.to_string()),
    )
}

/// The report as one HTML page.
pub fn html(r: &Report) -> String {
    let mut s = String::new();
    s.push_str("<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\n");
    s.push_str(&format!(
        "<title>Failover drill of {} — {}</title>\n",
        esc(&r.region),
        esc(&r.federation)
    ));
    s.push_str(
        "<style>body{font-family:sans-serif;margin:2em;color:#111}table{border-collapse:collapse;width:100%;margin:1em 0}\
th,td{border:1px solid #999;padding:4px 6px;text-align:left;vertical-align:top;font-size:0.9em}\
tr.bad td{background:#fdd}tr.ok td:nth-child(7){color:#060}.why{color:#555;font-size:0.85em}\
.verdict{font-size:1.3em;font-weight:bold}.pass{color:#060}.fail{color:#a00}code{font-size:0.95em}</style>\n</head><body>\n",
    );
    s.push_str(&format!(
        "<h1>Failover drill: {} made unavailable ({})</h1>\n",
        esc(&r.region),
        esc(&r.disruption)
    ));
    s.push_str(&format!(
        "<p class=\"verdict {}\">{}</p>\n",
        if r.passed { "pass" } else { "fail" },
        if r.passed {
            "PASSED: every probe was placed as the policy expects, traffic returned and the decision log verifies."
        } else {
            "FAILED: see the differences below."
        }
    ));
    s.push_str("<table>\n");
    for (k, v) in [
        ("Federation", r.federation.as_str()),
        (
            "Entry region (probes submitted to)",
            r.entry_region.as_str(),
        ),
        ("Region drilled", r.region.as_str()),
        ("Disruption", r.disruption.as_str()),
        ("Policy hash", r.policy_hash.as_str()),
        ("Expected placements from", r.expected_from.as_str()),
        ("Started", r.started.as_str()),
        ("Finished", r.finished.as_str()),
        (
            "Traffic returned",
            if r.traffic_returned { "yes" } else { "NO" },
        ),
    ] {
        s.push_str(&format!(
            "<tr><th>{}</th><td>{}</td></tr>\n",
            esc(k),
            esc(v)
        ));
    }
    s.push_str("</table>\n<h2>Timeline</h2>\n<table><tr><th>time (UTC)</th><th>+ms</th><th>event</th></tr>\n");
    for e in &r.timeline {
        s.push_str(&format!(
            "<tr><td>{}</td><td>{}</td><td>{}</td></tr>\n",
            esc(&e.at),
            e.t_ms,
            esc(&e.what)
        ));
    }
    s.push_str("</table>\n<h2>Probes: expected and observed placements</h2>\n");
    s.push_str("<p>Probes are routed, forwarded, re-checked and recorded like tasks, and never stored or run.</p>\n");
    s.push_str("<table><tr><th>phase</th><th>rule / data class</th><th>attributes</th><th>expected (policy)</th><th>observed (federation)</th><th>verdict</th><th>log seq</th></tr>\n");
    for p in &r.probes {
        s.push_str(&probe_row(p));
    }
    s.push_str("</table>\n<h2>Differences</h2>\n");
    if r.differences.is_empty() {
        s.push_str("<p>None.</p>\n");
    } else {
        s.push_str("<ul>\n");
        for d in &r.differences {
            s.push_str(&format!("<li>{}</li>\n", esc(d)));
        }
        s.push_str("</ul>\n");
    }
    s.push_str(&format!(
        "<h2>Decision log</h2>\n<p>{}'s log, records {} to {} (this drill); hash chain of the whole log: <b>{}</b>{}; last hash <code>{}</code>. Check it independently with <code>federation audit verify DATA_DIR</code>.</p>\n",
        esc(&r.log.region),
        r.log.first_seq,
        r.log.last_seq,
        if r.log.chain_intact { "intact" } else { "BROKEN" },
        if r.log.chain_error.is_empty() {
            String::new()
        } else {
            format!(" ({})", esc(&r.log.chain_error))
        },
        esc(&r.log.last_hash)
    ));
    s.push_str("</body></html>\n");
    s
}

#[cfg(test)]
mod tests {
    #[test]
    fn text_is_escaped() {
        assert_eq!(
            super::esc("<a href='x'>&"),
            "&lt;a href=&#39;x&#39;&gt;&amp;"
        );
    }
}

/// A placement: the region, or none (rejected).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Placement {
    /// `routed`, `failover` or `rejected`.
    pub outcome: String,
    /// The region, when placed.
    pub region: Option<String>,
}

impl Placement {
    /// Where `decision` put the probe.
    pub fn of(decision: &crate::policy::Decision) -> Self {
        Self {
            outcome: decision.outcome.kind().to_string(),
            region: decision.outcome.region().map(str::to_string),
        }
    }

    /// `europe (routed)` or `rejected`.
    pub fn label(&self) -> String {
        match &self.region {
            Some(r) => format!("{r} ({})", self.outcome),
            None => self.outcome.clone(),
        }
    }
}

/// One probe's result.
#[derive(Debug, Clone, Serialize)]
pub struct ProbeResult {
    /// `before`, `during` or `after`.
    pub phase: String,
    /// Which rule and data class the probe stands for.
    pub name: String,
    /// Its attributes, `k='v'`.
    pub attributes: String,
    /// What the policy says (R unavailable during the drill).
    pub expected: Placement,
    /// Why, per the policy.
    pub expected_reason: String,
    /// Where the federation put it.
    pub observed: Placement,
    /// Why, per the federation's answer (its decision, or the refusal).
    pub observed_reason: String,
    /// True when the two agree (for a set of primaries: any member the
    /// expected decision accepted).
    pub agree: bool,
    /// The probe's id, when placed (never stored).
    pub task_id: String,
    /// Its record's seq in the entry controller's decision log.
    pub log_seq: Option<u64>,
}

/// One timeline entry.
#[derive(Debug, Clone, Serialize)]
pub struct Event {
    /// RFC 3339 UTC, milliseconds.
    pub at: String,
    /// Milliseconds since the drill began.
    pub t_ms: u64,
    /// What happened.
    pub what: String,
}

/// The entry controller's decision-log range covering the drill.
#[derive(Debug, Clone, Default, Serialize)]
pub struct LogRange {
    /// The region of the log.
    pub region: String,
    /// First seq written during the drill.
    pub first_seq: u64,
    /// Last seq written during the drill.
    pub last_seq: u64,
    /// True when the whole log's hash chain verifies.
    pub chain_intact: bool,
    /// The first broken record, when not.
    pub chain_error: String,
    /// The last record's hash.
    pub last_hash: String,
}

/// The drill's evidence.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// The federation's name.
    pub federation: String,
    /// The controller probes went to.
    pub entry_region: String,
    /// The region made unavailable.
    pub region: String,
    /// `drain` or `kill`.
    pub disruption: String,
    /// The policy hash in force at the entry.
    pub policy_hash: String,
    /// Where the expected placements come from.
    pub expected_from: String,
    /// Start, RFC 3339.
    pub started: String,
    /// End, RFC 3339.
    pub finished: String,
    /// What happened, in order.
    pub timeline: Vec<Event>,
    /// Every probe, by phase.
    pub probes: Vec<ProbeResult>,
    /// One line per disagreement or failed check.
    pub differences: Vec<String>,
    /// True when every probe the policy sends to R in normal operation went
    /// back to R after the drill.
    pub traffic_returned: bool,
    /// The decision-log range of the drill and its verification.
    pub log: LogRange,
    /// No difference, traffic returned, log intact.
    pub passed: bool,
}
