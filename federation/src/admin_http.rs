//! The admin HTTP port: Prometheus metrics at `/metrics` and the live
//! federation view ([`crate::status_view`]): `/` the page (askama templates
//! in `federation/templates/`, HTML auto-escaped, no external assets), `/view`
//! the page's body, which the page's inline script fetches again every
//! heartbeat or two and swaps in (no reload), `/view.json` the same view as
//! JSON, `/login` an HTTP Basic challenge (the token as the password) for
//! browsers. Read-only: nothing served here changes the controller.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use askama::Template;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use tokio::net::TcpListener;

use crate::controller::Node;
use crate::status_view::{self, View, Viewer};

/// The page's only script: fetch `/view` every `data-refresh-ms` and swap
/// it in; say so when it fails. It never builds HTML from data: the server
/// renders (and escapes) every byte it inserts.
const SCRIPT: &str = "(function(){var view=document.getElementById('view'),badge=document.getElementById('refresh');\
var every=Number(document.body.dataset.refreshMs)||2000;\
function tick(){fetch('view',{cache:'no-store',credentials:'same-origin'})\
.then(function(r){if(!r.ok){throw new Error('HTTP '+r.status);}return r.text();})\
.then(function(t){view.innerHTML=t;badge.textContent='live, updated '+new Date().toLocaleTimeString();badge.className='ok';})\
.catch(function(e){badge.textContent='not updating: '+e.message;badge.className='dead';})\
.then(function(){setTimeout(tick,every);});}\
setTimeout(tick,every);})();";

/// The status page.
#[derive(Template)]
#[template(path = "status.html")]
struct Page<'a> {
    v: &'a View,
    refresh_ms: u64,
    script: &'a str,
}

/// The page's body, as `/view` serves it.
#[derive(Template)]
#[template(path = "status_body.html")]
struct Body<'a> {
    v: &'a View,
}

/// What the handlers share.
struct App {
    node: Arc<Node>,
    remote: status_view::remote::RemoteDecisions,
    audit: status_view::AuditCache,
    refresh: Duration,
    csp: String,
}

/// Serves the admin HTTP port on `listener` until `shutdown` resolves.
pub async fn serve(
    node: Arc<Node>,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let refresh = node
        .timers()
        .heartbeat_interval
        .clamp(Duration::from_millis(500), Duration::from_secs(5));
    let app = Arc::new(App {
        remote: status_view::remote::RemoteDecisions::new(refresh),
        audit: status_view::AuditCache::default(),
        refresh,
        csp: content_security_policy(),
        node,
    });
    let router = axum::Router::new()
        .route("/", get(page))
        .route("/view", get(body))
        .route("/view.json", get(json))
        .route("/login", get(login))
        .route("/metrics", get(metrics))
        .with_state(app);
    axum::serve(listener, router)
        .with_graceful_shutdown(shutdown)
        .await
}

/// Only the page's own script runs, styles are inline, fetches go to this
/// origin: an injected script would not run even if escaping failed.
fn content_security_policy() -> String {
    use base64::Engine as _;
    use sha2::Digest as _;
    let hash = base64::engine::general_purpose::STANDARD.encode(sha2::Sha256::digest(SCRIPT));
    format!(
        "default-src 'none'; script-src 'sha256-{hash}'; style-src 'unsafe-inline'; \
         connect-src 'self'; img-src 'self'; base-uri 'none'; form-action 'none'; \
         frame-ancestors 'none'"
    )
}

/// `/metrics`: OpenMetrics when the scraper asks for it (Prometheus does),
/// else the Prometheus text format (`promtool`, `curl`).
async fn metrics(State(app): State<Arc<App>>, headers: HeaderMap) -> impl IntoResponse {
    use crate::metrics::exposition;
    let node = &app.node;
    let accept = headers.get(header::ACCEPT).and_then(|v| v.to_str().ok());
    let status = node.status().report();
    let openmetrics = node.metrics().render(crate::metrics::Scrape {
        agents: node.cluster().agents().len(),
        status: &status,
        snapshots_taken: node.replication().receiver.newest_taken(),
        store: node.store(),
    });
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

/// The view for the viewer of `headers`, with peers' decisions refreshed.
async fn view(app: &App, headers: &HeaderMap) -> View {
    let viewer = Viewer::from_headers(app.node.auth(), headers);
    app.remote
        .refresh(
            app.node.cluster(),
            app.node.peers(),
            app.node.timers().forward_timeout,
        )
        .await;
    let audit = app.audit.findings(app.node.policy()).await;
    status_view::build(&app.node, &viewer, audit, &app.remote).await
}

fn html(app: &App, rendered: Result<String, askama::Error>) -> Response {
    match rendered {
        Ok(text) => {
            let mut resp = (
                [
                    (header::CONTENT_TYPE, "text/html; charset=utf-8"),
                    (header::CACHE_CONTROL, "no-store"),
                ],
                text,
            )
                .into_response();
            if let Ok(v) = HeaderValue::from_str(&app.csp) {
                resp.headers_mut()
                    .insert(header::CONTENT_SECURITY_POLICY, v);
            }
            resp
        }
        Err(e) => {
            tracing::error!(error = %e, "rendering the status page failed");
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("rendering the status page failed: {e}"),
            )
                .into_response()
        }
    }
}

async fn page(State(app): State<Arc<App>>, headers: HeaderMap) -> Response {
    let v = view(&app, &headers).await;
    let page = Page {
        v: &v,
        refresh_ms: app.refresh.as_millis() as u64,
        script: SCRIPT,
    };
    html(&app, page.render())
}

async fn body(State(app): State<Arc<App>>, headers: HeaderMap) -> Response {
    let v = view(&app, &headers).await;
    html(&app, Body { v: &v }.render())
}

async fn json(State(app): State<Arc<App>>, headers: HeaderMap) -> Response {
    let v = view(&app, &headers).await;
    match serde_json::to_string(&v) {
        Ok(text) => (
            [
                (header::CONTENT_TYPE, "application/json"),
                (header::CACHE_CONTROL, "no-store"),
            ],
            text,
        )
            .into_response(),
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("encoding the view: {e}"),
        )
            .into_response(),
    }
}

/// `/login`: asks a browser for credentials (HTTP Basic, the token as the
/// password) until it presents a known token, then sends it back to `/`.
async fn login(State(app): State<Arc<App>>, headers: HeaderMap) -> Response {
    let viewer = Viewer::from_headers(app.node.auth(), &headers);
    if viewer.role.is_some() {
        return (StatusCode::SEE_OTHER, [(header::LOCATION, "./")]).into_response();
    }
    (
        StatusCode::UNAUTHORIZED,
        [(
            header::WWW_AUTHENTICATE,
            "Basic realm=\"federation status\", charset=\"UTF-8\"",
        )],
        "a token of the controller's token file is needed (any user name, the token as the password)\n",
    )
        .into_response()
}
