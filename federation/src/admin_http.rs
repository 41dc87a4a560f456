//! The admin HTTP port: Prometheus metrics at `/metrics` and a status page at
//! `/` (plain HTML, no external assets: regions with state, tags, capacity
//! and advertisement age; the most recent decisions with their reasons).
//! Read-only: nothing served here changes the controller.

use std::fmt::Write as _;
use std::future::Future;
use std::sync::Arc;

use axum::extract::State;
use axum::http::header;
use axum::response::{Html, IntoResponse};
use axum::routing::get;
use tokio::net::TcpListener;

use crate::controller::Node;

/// How many recent decisions the status page shows.
const RECENT_DECISIONS: usize = 25;

/// Serves the admin HTTP port on `listener` until `shutdown` resolves.
pub async fn serve(
    node: Arc<Node>,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = axum::Router::new()
        .route("/", get(status_page))
        .route("/metrics", get(metrics))
        .with_state(node);
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}

/// `/metrics`: OpenMetrics when the scraper asks for it (Prometheus does),
/// else the Prometheus text format (`promtool`, `curl`).
async fn metrics(
    State(node): State<Arc<Node>>,
    headers: axum::http::HeaderMap,
) -> impl IntoResponse {
    use crate::metrics::exposition;
    let accept = headers.get(header::ACCEPT).and_then(|v| v.to_str().ok());
    let openmetrics = node.metrics.render(&node);
    if exposition::wants_openmetrics(accept) {
        (
            [(header::CONTENT_TYPE, exposition::OPENMETRICS)],
            openmetrics,
        )
    } else {
        (
            [(header::CONTENT_TYPE, exposition::PROMETHEUS_TEXT)],
            exposition::to_prometheus_text(&openmetrics),
        )
    }
}

/// Escapes text for HTML.
fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

async fn status_page(State(node): State<Arc<Node>>) -> Html<String> {
    let status = crate::service::status(&node);
    let log_path = node.log.path().to_path_buf();
    let recent = tokio::task::spawn_blocking(move || {
        crate::audit::show(&log_path, &crate::audit::Filter::default())
    })
    .await
    .ok()
    .and_then(Result::ok)
    .unwrap_or_default();

    let mut h = String::new();
    let _ = write!(
        h,
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>{fed} — {region}</title>\
         <style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse}}\
         td,th{{border:1px solid #ccc;padding:4px 8px;text-align:left}}\
         .alive,.self{{color:#070}}.suspect{{color:#a60}}.dead,.unknown{{color:#b00}}</style></head><body>\
         <h1>{fed}</h1><p>seen from <b id=\"self\">{region}</b>, epoch {epoch}, policy <code>{hash}</code></p>\
         <h2>Regions</h2><table id=\"regions\"><tr><th>region</th><th>state</th><th>tags</th>\
         <th>slots free/total</th><th>queue</th><th>advertisement age</th><th>policy</th></tr>",
        fed = esc(&status.federation),
        region = esc(&status.self_region),
        epoch = status.epoch,
        hash = esc(&status.policy_hash[..status.policy_hash.len().min(12)]),
    );
    for r in &status.regions {
        let c = r.capacity.unwrap_or_default();
        let age = if r.last_advertisement_age_ms < 0 {
            "never".to_string()
        } else {
            format!("{:.1} s", r.last_advertisement_age_ms as f64 / 1000.0)
        };
        let state = if r.draining {
            format!("{} (draining)", r.state)
        } else {
            r.state.clone()
        };
        let _ = write!(
            h,
            "<tr><td>{}</td><td class=\"{}\">{}</td><td>{}</td><td>{}/{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            esc(&r.region),
            esc(&r.state),
            esc(&state),
            esc(&r.compliance_tags.join(", ")),
            c.free_slots,
            c.total_slots,
            c.queue_depth,
            age,
            if r.policy_mismatch { "differs" } else { "same" }
        );
    }
    h.push_str("</table>");
    for r in status
        .regions
        .iter()
        .filter(|r| r.store_undecodable_records > 0)
    {
        let _ = write!(
            h,
            "<h2>Task store</h2><p id=\"store-undecodable\" class=\"dead\">{} task records do not decode (skipped by leasing, snapshots and status; see <code>federation store check</code>):</p><ul>",
            r.store_undecodable_records
        );
        for line in &r.store_undecodable {
            let _ = write!(h, "<li><code>{}</code></li>", esc(line));
        }
        h.push_str("</ul>");
    }
    h.push_str(
        "<h2>Recent decisions</h2><table id=\"decisions\"><tr><th>time</th><th>kind</th>\
         <th>task</th><th>outcome</th><th>region</th><th>reason</th></tr>",
    );
    for r in recent.iter().rev().take(RECENT_DECISIONS) {
        let _ = write!(
            h,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            esc(&r.time),
            esc(&r.entry.kind),
            esc(r.entry.task_id.as_deref().unwrap_or("")),
            esc(r.outcome().unwrap_or("")),
            esc(r.chosen_region().unwrap_or("")),
            esc(r.reason().or(r.entry.note.as_deref()).unwrap_or("")),
        );
    }
    h.push_str("</table></body></html>");
    Html(h)
}
