//! The two text formats of `/metrics`: OpenMetrics 1.0 (what
//! `prometheus-client` writes) for scrapers that ask for it, and the
//! Prometheus text format 0.0.4 derived from it for everything else
//! (`promtool check metrics`, older scrapers, `curl`).
//!
//! Owns the content negotiation and the conversion; knows no metric.

/// Content type of OpenMetrics text.
pub const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// Content type of the Prometheus text format.
pub const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// True when the `Accept` header asks for OpenMetrics (Prometheus sends
/// `application/openmetrics-text;version=1.0.0,…;q=…,text/plain;…` by
/// default); anything else gets the Prometheus text format.
pub fn wants_openmetrics(accept: Option<&str>) -> bool {
    accept.is_some_and(|a| {
        a.split(',').any(|part| {
            let mut params = part.split(';');
            let media = params.next().unwrap_or("").trim();
            let q_zero = params.any(|p| {
                p.trim()
                    .strip_prefix("q=")
                    .and_then(|q| q.trim().parse::<f64>().ok())
                    == Some(0.0)
            });
            media.eq_ignore_ascii_case("application/openmetrics-text") && !q_zero
        })
    })
}

/// Converts OpenMetrics text to the Prometheus text format: counter families
/// are named with their `_total` suffix in `# HELP`/`# TYPE`, `info`
/// families become gauges named `<name>_info`, `_created` samples, `# UNIT`
/// and `# EOF` lines are dropped. Sample lines are otherwise unchanged (the
/// two formats share them).
pub fn to_prometheus_text(openmetrics: &str) -> String {
    let mut out = String::with_capacity(openmetrics.len());
    // The `# HELP` line waits for its `# TYPE` line, which decides the name.
    let mut help: Option<(&str, &str)> = None;
    let mut created_of: Vec<String> = Vec::new();
    for line in openmetrics.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, text) = rest.split_once(' ').unwrap_or((rest, ""));
            help = Some((name, text));
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap_or((rest, "untyped"));
            let (exposed, kind) = match kind {
                "counter" => (format!("{name}_total"), "counter"),
                "info" => (format!("{name}_info"), "gauge"),
                "gaugehistogram" | "stateset" | "unknown" => (name.to_string(), "untyped"),
                other => (name.to_string(), other),
            };
            if matches!(kind, "counter" | "histogram" | "summary") {
                created_of.push(format!("{name}_created"));
            }
            if let Some((h, text)) = help.take() {
                if h == name {
                    out.push_str("# HELP ");
                    out.push_str(&exposed);
                    out.push(' ');
                    out.push_str(text);
                    out.push('\n');
                }
            }
            out.push_str("# TYPE ");
            out.push_str(&exposed);
            out.push(' ');
            out.push_str(kind);
            out.push('\n');
            continue;
        }
        if line.starts_with("# UNIT ") || line == "# EOF" || line.starts_with('#') {
            continue;
        }
        let sample_name = line.split(['{', ' ']).next().unwrap_or("");
        if created_of.iter().any(|c| c == sample_name) {
            continue;
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn negotiates_like_prometheus() {
        assert!(wants_openmetrics(Some(
            "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1"
        )));
        assert!(!wants_openmetrics(Some("text/plain;version=0.0.4")));
        assert!(!wants_openmetrics(Some("*/*")));
        assert!(!wants_openmetrics(None));
        assert!(!wants_openmetrics(Some("application/openmetrics-text;q=0")));
    }

    #[test]
    fn counters_get_their_total_name_and_openmetrics_only_lines_go() {
        let om = "# HELP x_decisions Routing decisions.\n# TYPE x_decisions counter\nx_decisions_total{rule=\"1\"} 3\nx_decisions_created{rule=\"1\"} 1.7e9\n# HELP x_build Build.\n# TYPE x_build info\nx_build_info{version=\"0.1.0\"} 1\n# HELP x_q Queue.\n# TYPE x_q gauge\n# UNIT x_q tasks\nx_q 4\n# EOF\n";
        let text = to_prometheus_text(om);
        assert_eq!(
            text,
            "# HELP x_decisions_total Routing decisions.\n# TYPE x_decisions_total counter\nx_decisions_total{rule=\"1\"} 3\n# HELP x_build_info Build.\n# TYPE x_build_info gauge\nx_build_info{version=\"0.1.0\"} 1\n# HELP x_q Queue.\n# TYPE x_q gauge\nx_q 4\n"
        );
    }
}
