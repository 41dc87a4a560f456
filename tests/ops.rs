//! Operations surface: Prometheus metrics and the status page on the admin
//! HTTP port. The page is rendered by headless Chromium (Debian's `chromium`
//! package, installed by `.ci/run`), driven over the DevTools protocol: the
//! test asserts on the live DOM, and watches it change without a reload when
//! a region dies.

mod support;

use std::process::Command;
use std::time::{Duration, Instant};

use federation_api as api;
use federation_sandbox::string_attrs;
use support::*;

/// Tokens of the sandbox's token file: an operator and a client.
const OPERATOR_TOKEN: &str = "status-page-operator-token-1";
const CLIENT_TOKEN: &str = "status-page-client-token-22";
/// An attribute value that would run if the page did not escape it.
const SCRIPT_VALUE: &str =
    "<script>document.title='pwned'</script><img src=x onerror=\"document.title='pwned'\">";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_and_status_page() {
    let mut sandbox = formed(seed_sandbox().agents(0, 1).tokens(&format!(
        "{OPERATOR_TOKEN} operator\n{CLIENT_TOKEN} client\n"
    )))
    .await;
    let mut client = sandbox.client("north_america").await.expect("client");
    // The US task stays in north_america (its record there keeps its
    // values); it carries a value that must be shown as text.
    for attrs in [
        vec![("customer_region", "DE")],
        vec![("customer_region", "US"), ("label", SCRIPT_VALUE)],
        vec![("customer_region", "JP")],
    ] {
        let _ = client
            .submit_task(api::SubmitTaskRequest {
                attributes: string_attrs(&attrs),
                ..Default::default()
            })
            .await;
    }
    let admin = sandbox
        .admin_http_addr("north_america")
        .expect("admin addr");

    // The page, open in a browser as an operator, before a region dies.
    let out_dir =
        std::env::temp_dir().join(format!("federation-status-page-{}", std::process::id()));
    std::fs::create_dir_all(&out_dir).expect("out dir");
    let mut browser = tokio::task::block_in_place(|| {
        Browser::start(&out_dir.join("cdp-profile"), &format!("http://{admin}/"))
    });
    let probe = r#"JSON.stringify({
        marker: window.__marker || null,
        asia: (document.querySelector('#map-asia_pacific') || {dataset: {}}).dataset.state || null,
        row: (document.querySelector('#region-asia_pacific') || {dataset: {}}).dataset.state || null,
        europe: (document.querySelector('#map-europe') || {dataset: {}}).dataset.state || null
    })"#;
    let before: serde_json::Value = browser.eval_json(probe);
    assert_eq!(before["asia"], "alive", "{before}");
    assert_eq!(before["europe"], "alive", "{before}");
    // A mark on the window: a reload would drop it.
    browser.eval("window.__marker = 'still the same page'; true");

    sandbox
        .kill_and_wait_dead("asia_pacific", "north_america", PATIENCE)
        .await
        .expect("dead");
    // The page notices by itself: poll its DOM (bounded), no reload.
    let until = Instant::now() + PATIENCE;
    let after = loop {
        let seen: serde_json::Value = browser.eval_json(probe);
        if seen["asia"] == "dead" && seen["row"] == "dead" {
            break seen;
        }
        assert!(
            Instant::now() < until,
            "the open page did not show asia_pacific dead within {PATIENCE:?}: {seen}"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(
        after["marker"], "still the same page",
        "the page reloaded: {after}"
    );
    assert_eq!(after["europe"], "alive", "{after}");

    let admin = sandbox
        .admin_http_addr("north_america")
        .expect("admin addr");
    let metrics = tokio::task::spawn_blocking(move || http_get(admin, "/metrics"))
        .await
        .expect("join");
    for needle in [
        "federation_decisions_total{rule=\"2\",outcome=\"routed\"} 1",
        "federation_decisions_total{rule=\"1\",outcome=\"routed\"} 1",
        "federation_decisions_total{rule=\"none\",outcome=\"rejected\"} 1",
        "federation_peer_state{region=\"asia_pacific\",state=\"dead\"} 1",
        "federation_peer_state{region=\"europe\",state=\"alive\"} 1",
        "federation_forward_seconds_count{region=\"europe\"} 1",
        "federation_queue_depth 1",
        "federation_advertisement_age_seconds{region=\"europe\"}",
    ] {
        assert!(
            metrics.contains(needle),
            "missing `{needle}` in:\n{metrics}"
        );
    }
    // Standard shapes: the plain scrape is the Prometheus text format and
    // passes promtool; OpenMetrics when asked for it.
    for needle in [
        "# TYPE federation_decisions_total counter",
        "federation_build_info{version=\"",
        "# TYPE process_cpu_seconds_total counter",
        "process_resident_memory_bytes ",
        "process_open_fds ",
        "federation_grpc_server_handled_total{service=\"federation.v1.FederationClient\",method=\"SubmitTask\",code=\"OK\"} 2",
        "federation_grpc_server_handled_total{service=\"federation.v1.FederationClient\",method=\"SubmitTask\",code=\"FailedPrecondition\"} 1",
        "federation_grpc_server_handling_seconds_count{service=\"federation.v1.FederationPeer\",method=\"Advertise\"}",
        "federation_store_commit_seconds_count ",
        "federation_decision_log_append_seconds_count ",
        "federation_registered_agents 0",
        "federation_certificate_expiry_timestamp_seconds ",
    ] {
        assert!(
            metrics.contains(needle),
            "missing `{needle}` in:\n{metrics}"
        );
    }
    assert!(!metrics.contains("# EOF"), "{metrics}");
    let promtool = std::path::Path::new("/usr/bin/promtool");
    assert!(
        promtool.exists(),
        "promtool is installed (`.ci/run` installs Debian's prometheus package)"
    );
    let checked = {
        use std::io::Write as _;
        let mut child = Command::new(promtool)
            .args(["check", "metrics"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("promtool runs");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(metrics.as_bytes())
            .expect("feed promtool");
        child.wait_with_output().expect("promtool ends")
    };
    assert!(
        checked.status.success() && checked.stdout.is_empty() && checked.stderr.is_empty(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&checked.stdout),
        String::from_utf8_lossy(&checked.stderr)
    );
    let (head, openmetrics) = tokio::task::spawn_blocking(move || {
        http_get_with(
            admin,
            "/metrics",
            &[(
                "Accept",
                "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5",
            )],
        )
    })
    .await
    .expect("join");
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: application/openmetrics-text"),
        "{head}"
    );
    assert!(
        openmetrics.contains("# TYPE federation_decisions counter")
            && openmetrics.trim_end().ends_with("# EOF"),
        "{openmetrics}"
    );

    // europe drains: the open page shows it, and the failover it causes is
    // highlighted with europe's refusal.
    sandbox
        .admin("europe")
        .await
        .expect("admin")
        .drain(api::DrainRequest { drain: true })
        .await
        .expect("drain");
    let until = Instant::now() + PATIENCE;
    while browser.eval_string(
        "(document.querySelector('#map-europe') || {getAttribute: () => ''}).getAttribute('class')",
    ) != "node alive draining"
    {
        assert!(
            Instant::now() < until,
            "the open page did not show europe draining"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let failover = client
        .submit_task(api::SubmitTaskRequest {
            attributes: string_attrs(&[("customer_region", "FR")]),
            ..Default::default()
        })
        .await
        .expect("a failover to north_america")
        .into_inner();
    assert_eq!(failover.region, "north_america");
    let until = Instant::now() + PATIENCE;
    let refused = loop {
        let text = browser.eval_string(
            "Array.from(document.querySelectorAll('#decisions tr.failover')).map(r => r.innerText).join('\\n')",
        );
        if text.contains(&failover.task_id) {
            break text;
        }
        assert!(
            Instant::now() < until,
            "the open page did not list the failover"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(
        refused.contains("europe: draining") && refused.contains("failover"),
        "{refused}"
    );

    // The rendered page: regions, the map, the audit's warnings, decisions
    // of every region with failovers and refusals, per-rule counters.
    let dom = browser.eval_string("document.documentElement.outerHTML");
    for needle in [
        "Global Enterprise Federation",
        "<b id=\"self\">north_america</b>",
        "<b id=\"viewer\">operator</b>",
        "<td class=\"alive\">alive (draining)</td>",
        "<td class=\"dead\">dead</td>",
        "GDPR, SOX",
        "id=\"map-europe\" class=\"node alive draining\"",
        "id=\"link-liveness-north_america-asia_pacific\" class=\"liveness dead\"",
        "id=\"link-failover-europe-north_america\" class=\"failover drops-tag\"",
        "failover-drops-tag",
        "failover from `europe` to `north_america` drops compliance tag(s) GDPR",
        "unreachable-region",
        "rule 2: customer_region in ['UK', 'DE', 'FR'] matched; routed to primary europe",
        "accepted forward from north_america",
        "no routing rule matches these attributes",
        "<tr class=\"rejected\"",
    ] {
        assert!(
            dom.contains(needle),
            "rendered page lacks `{needle}`:\n{dom}"
        );
    }
    // The policy's residency map (issue 15 point 5) is drawn on the page
    // too: the seed's two failovers that drop a tag are its warning edges.
    let residency = browser.eval_string(
        "(document.querySelector('#residency-map svg.residency-map') || {textContent: ''}).textContent",
    );
    for needle in [
        "north_america",
        "europe",
        "asia_pacific",
        "drops GDPR",
        "drops HIPAA",
    ] {
        assert!(
            residency.contains(needle),
            "the residency map lacks `{needle}`:\n{residency}"
        );
    }
    // Decisions across the federation: europe's own record of the task
    // north_america forwarded, fetched over the peer channel.
    let from_europe = browser.eval_string(
        "String(document.querySelectorAll('#decisions tr[data-logged-by=\"europe\"]').length)",
    );
    assert_ne!(from_europe, "0", "no decision of europe shown:\n{dom}");
    // Per-rule counters of this controller.
    let counters = browser.eval_string(
        "Array.from(document.querySelectorAll('#rules tr')).map(r => r.innerText).join('\\n')",
    );
    assert!(
        counters.contains("rule 1: customer_region == 'US' || customer_region == 'CA'\t1\t0\t0")
            && counters.contains("no rule matched\t0\t0\t1"),
        "{counters}"
    );

    // Escaped: the value is text on the page, and nothing of it ran.
    let escaped = browser.eval_json(&format!(
        "JSON.stringify({{title: document.title, scripts: document.scripts.length, \
         imgs: document.images.length, shown: Array.from(document.querySelectorAll('#decisions .value')).some(e => e.textContent === {value})}})",
        value = serde_json::Value::String(SCRIPT_VALUE.to_string())
    ));
    assert_eq!(
        escaped["scripts"], 1,
        "only the page's own script: {escaped}"
    );
    assert_eq!(escaped["imgs"], 0, "{escaped}");
    assert_eq!(
        escaped["shown"], true,
        "the value is shown as text: {escaped}"
    );
    assert!(
        !escaped["title"].as_str().unwrap_or("").contains("pwned"),
        "{escaped}"
    );
    let bearer = |t: &str| format!("Bearer {t}");
    let operator_auth = bearer(OPERATOR_TOKEN);
    let raw = tokio::task::spawn_blocking({
        let h = operator_auth.clone();
        move || http_get_with(admin, "/view", &[("Authorization", &h)]).1
    })
    .await
    .expect("join");
    assert!(
        raw.contains("&#60;script&#62;document.title=")
            && !raw.contains("<script>document.title")
            && !raw.contains("<img src=x"),
        "{raw}"
    );
    assert!(raw.contains("<span class=\"value\">US</span>"), "{raw}");

    // Roles: a client's token and no token see attribute names, no values.
    let client_auth = bearer(CLIENT_TOKEN);
    for (who, headers) in [
        ("client", vec![("Authorization", client_auth.as_str())]),
        ("anonymous", vec![]),
    ] {
        let headers: Vec<(String, String)> = headers
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let (page, json) = tokio::task::spawn_blocking(move || {
            let h: Vec<(&str, &str)> = headers
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect();
            (
                http_get_with(admin, "/", &h).1,
                http_get_with(admin, "/view.json", &h).1,
            )
        })
        .await
        .expect("join");
        assert!(
            page.contains("customer_region = <span class=\"hidden\">hidden</span>")
                && page.contains("label = <span class=\"hidden\">hidden</span>"),
            "{who}: {page}"
        );
        // Nor in a rejection's reason, which quotes the attributes.
        assert!(
            page.contains("these attributes (customer_region=…)"),
            "{who}: {page}"
        );
        for value in [
            "class=\"value\"",
            "document.title",
            ">US<",
            ">DE<",
            "these attributes (customer_region=&#39;JP&#39;)",
        ] {
            assert!(!page.contains(value), "{who} sees `{value}`: {page}");
        }
        let view: serde_json::Value = serde_json::from_str(&json).expect("view json");
        assert_eq!(view["values_visible"], false, "{who}");
        let values = view["decisions"]
            .as_array()
            .expect("decisions")
            .iter()
            .flat_map(|d| d["attributes"].as_array().cloned().unwrap_or_default())
            .filter(|a| !a["value"].is_null())
            .count();
        assert_eq!(values, 0, "{who} sees values: {json}");
        assert!(
            json.contains("\"name\":\"customer_region\""),
            "{who}: {json}"
        );
    }

    // What a peer gets for its page: north_america's records without values.
    let mut as_europe = api::federation_peer_client::FederationPeerClient::new(
        sandbox
            .peer_channel("north_america", "europe")
            .await
            .expect("peer channel"),
    );
    let sent = as_europe
        .recent_decisions(api::ListDecisionsRequest::default())
        .await
        .expect("recent decisions")
        .into_inner();
    let records: Vec<serde_json::Value> = sent
        .records
        .iter()
        .map(|r| serde_json::from_str(r).expect("a record"))
        .collect();
    let us = records
        .iter()
        .find(|r| r["attributes"].get("label").is_some())
        .unwrap_or_else(|| panic!("the US task's record: {records:?}"));
    assert_eq!(
        us["attributes"],
        serde_json::json!({"customer_region": null, "label": null})
    );
    let everything = sent.records.join("\n");
    assert!(
        !everything.contains("pwned") && !everything.contains("customer_region='JP'"),
        "{everything}"
    );
    assert!(
        everything.contains("these attributes (customer_region=…)"),
        "{everything}"
    );
    let mut as_operator = api::federation_peer_client::FederationPeerClient::new(
        sandbox.channel("north_america").await.expect("channel"),
    );
    let refused = as_operator
        .recent_decisions(api::ListDecisionsRequest::default())
        .await
        .expect_err("peers only");
    assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused:?}");

    // `/login` asks a browser for a token (HTTP Basic) until it has a known one.
    let basic = |token: &str| {
        use base64::Engine as _;
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(format!("me:{token}"))
        )
    };
    let (unknown, client_basic, operator_basic) = (
        basic("not-a-token-of-the-file"),
        basic(CLIENT_TOKEN),
        basic(OPERATOR_TOKEN),
    );
    let heads = tokio::task::spawn_blocking(move || {
        [
            status_head(admin, "/login", None),
            status_head(admin, "/login", Some(&unknown)),
            status_head(admin, "/login", Some(&client_basic)),
            status_head(admin, "/view", Some(&operator_basic)),
        ]
    })
    .await
    .expect("join");
    for head in &heads[..2] {
        assert!(
            head.starts_with("HTTP/1.1 401")
                && head
                    .to_ascii_lowercase()
                    .contains("www-authenticate: basic"),
            "{head}"
        );
    }
    assert!(heads[2].starts_with("HTTP/1.1 303"), "{}", heads[2]);
    assert!(heads[3].starts_with("HTTP/1.1 200"), "{}", heads[3]);
    let (_, as_operator) = tokio::task::spawn_blocking(move || {
        http_get_with(
            admin,
            "/view.json",
            &[("Authorization", &basic(OPERATOR_TOKEN))],
        )
    })
    .await
    .expect("join");
    assert!(
        as_operator.contains("\"values_visible\":true"),
        "HTTP Basic with the token as the password: {as_operator}"
    );

    // A screenshot, for a person to look at.
    let shot = out_dir.join("status-page.png");
    browser.screenshot(&shot);
    eprintln!("status page screenshot: {}", shot.display());
    drop(browser);
    let _ = std::fs::remove_dir_all(out_dir.join("cdp-profile"));
}

/// The status line and headers of a GET (any status), bounded by timeouts.
fn status_head(addr: std::net::SocketAddr, path: &str, authorization: Option<&str>) -> String {
    use std::io::{Read, Write};
    let mut s =
        std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let auth = authorization
        .map(|a| format!("Authorization: {a}\r\n"))
        .unwrap_or_default();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\n{auth}Connection: close\r\n\r\n"
    )
    .expect("request");
    let mut raw = String::new();
    s.read_to_string(&mut raw).expect("response");
    raw.split_once("\r\n\r\n")
        .map_or(raw.clone(), |(head, _)| head.to_string())
}

/// Headless Chromium driven over the DevTools protocol (a WebSocket on
/// loopback): one page, commands answered in order. Killed on drop. Every
/// read is bounded by a socket timeout.
struct Browser {
    child: std::process::Child,
    ws: tungstenite::WebSocket<std::net::TcpStream>,
    session: String,
    next_id: u64,
}

impl Browser {
    /// Starts Chromium with `profile`, opens `url` as an operator (the
    /// token in every request's `Authorization`), and waits for the load.
    fn start(profile: &std::path::Path, url: &str) -> Self {
        let chromium = ["/usr/bin/chromium", "/usr/bin/chromium-browser"]
            .into_iter()
            .find(|p| std::path::Path::new(p).exists())
            .expect("chromium is installed (`.ci/run` installs Debian's chromium package)");
        let _ = std::fs::remove_dir_all(profile);
        std::fs::create_dir_all(profile).expect("profile dir");
        let child = Command::new(chromium)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--remote-debugging-address=127.0.0.1",
                "--remote-debugging-port=0",
                "--window-size=1280,1400",
            ])
            .arg(format!("--user-data-dir={}", profile.display()))
            .arg("about:blank")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("chromium runs");
        let mut guard = KillOnDrop(Some(child));
        // Chromium writes its port and browser target path here.
        let active = profile.join("DevToolsActivePort");
        let until = Instant::now() + PATIENCE;
        let (port, path) = loop {
            if let Ok(text) = std::fs::read_to_string(&active) {
                let mut lines = text.lines();
                if let (Some(port), Some(path)) = (lines.next(), lines.next()) {
                    if let Ok(port) = port.trim().parse::<u16>() {
                        break (port, path.trim().to_string());
                    }
                }
            }
            assert!(
                Instant::now() < until,
                "chromium wrote no DevToolsActivePort"
            );
            std::thread::sleep(Duration::from_millis(100));
        };
        let stream = std::net::TcpStream::connect(("127.0.0.1", port)).expect("devtools port");
        stream
            .set_read_timeout(Some(PATIENCE))
            .expect("read timeout");
        stream
            .set_write_timeout(Some(PATIENCE))
            .expect("write timeout");
        let (ws, _) = tungstenite::client(format!("ws://127.0.0.1:{port}{path}"), stream)
            .expect("devtools websocket");
        let mut b = Self {
            child: guard.0.take().expect("child"),
            ws,
            session: String::new(),
            next_id: 0,
        };
        let target = b.call(
            "Target.createTarget",
            serde_json::json!({"url": "about:blank"}),
        );
        let target_id = target["targetId"].as_str().expect("targetId").to_string();
        let attached = b.call(
            "Target.attachToTarget",
            serde_json::json!({"targetId": target_id, "flatten": true}),
        );
        b.session = attached["sessionId"]
            .as_str()
            .expect("sessionId")
            .to_string();
        b.call("Network.enable", serde_json::json!({}));
        b.call(
            "Network.setExtraHTTPHeaders",
            serde_json::json!({"headers": {"Authorization": format!("Bearer {OPERATOR_TOKEN}")}}),
        );
        b.call("Page.navigate", serde_json::json!({"url": url}));
        let until = Instant::now() + PATIENCE;
        while b.eval_string("document.readyState + (document.getElementById('map') ? ':map' : '')")
            != "complete:map"
        {
            assert!(Instant::now() < until, "the status page did not load");
            std::thread::sleep(Duration::from_millis(100));
        }
        b
    }

    /// Sends one command (to the page once attached) and returns its result.
    fn call(&mut self, method: &str, params: serde_json::Value) -> serde_json::Value {
        self.next_id += 1;
        let id = self.next_id;
        let mut msg = serde_json::json!({"id": id, "method": method, "params": params});
        if !self.session.is_empty() {
            msg["sessionId"] = self.session.clone().into();
        }
        self.ws
            .send(tungstenite::Message::text(msg.to_string()))
            .expect("devtools send");
        let until = Instant::now() + PATIENCE;
        loop {
            assert!(Instant::now() < until, "no answer to {method}");
            let m = self.ws.read().expect("devtools read");
            let Ok(text) = m.to_text() else { continue };
            let Ok(v) = serde_json::from_str::<serde_json::Value>(text) else {
                continue;
            };
            if v["id"] == id {
                assert!(v.get("error").is_none(), "{method}: {v}");
                return v["result"].clone();
            }
        }
    }

    /// Evaluates `expr` in the page; its value.
    fn eval(&mut self, expr: &str) -> serde_json::Value {
        let r = self.call(
            "Runtime.evaluate",
            serde_json::json!({"expression": expr, "returnByValue": true}),
        );
        assert!(r.get("exceptionDetails").is_none(), "{expr}: {r}");
        r["result"]["value"].clone()
    }

    fn eval_string(&mut self, expr: &str) -> String {
        self.eval(expr).as_str().unwrap_or_default().to_string()
    }

    /// Evaluates an expression that returns `JSON.stringify(…)`.
    fn eval_json(&mut self, expr: &str) -> serde_json::Value {
        serde_json::from_str(&self.eval_string(expr)).expect("json from the page")
    }

    fn screenshot(&mut self, path: &std::path::Path) {
        use base64::Engine as _;
        let r = self.call(
            "Page.captureScreenshot",
            serde_json::json!({"format": "png", "captureBeyondViewport": true}),
        );
        if let Some(data) = r["data"].as_str() {
            if let Ok(bytes) = base64::engine::general_purpose::STANDARD.decode(data) {
                let _ = std::fs::write(path, bytes);
            }
        }
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Kills the browser if starting it fails half-way.
struct KillOnDrop(Option<std::process::Child>);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Some(c) = self.0.as_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
