//! The HTML form of a drill report ([`super::drill::Report`]): one
//! self-contained page (no external assets, readable in print) with the
//! verdict, the timeline, each probe's expected and observed placement, the
//! differences and the decision-log range.

use super::drill::{ProbeResult, Report};

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
