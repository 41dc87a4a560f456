//! Distributed tracing for the federation: the process's `tracing`
//! subscriber (logs on stderr, plus OpenTelemetry spans exported over OTLP/gRPC
//! when an endpoint is configured) and W3C `traceparent` propagation through
//! gRPC metadata and task records.
//!
//! Owns: which spans are exported (those of target [`TARGET`], the
//! `span!(target: federation_trace::TARGET, …)` spans the controller and
//! the agent create, and warnings and errors inside them as span events),
//! the exporter's lifetime ([`Exporter::shutdown`] flushes), and the
//! [`TraceParent`] text. **Off by default, no cost when off**: without an
//! endpoint no OpenTelemetry layer is installed and the log layer refuses the
//! spans of [`TARGET`], so their callsites are disabled (one cached interest
//! check each) and nothing is built or sent. A controller or agent that does
//! not export still passes a traceparent it received on unchanged
//! ([`outgoing`]), so a trace continues through it.
//!
//! Must not touch: what the spans mean (the controller and the agent name
//! them), the network beyond the exporter's own channel, the log format's
//! fields.
#![forbid(unsafe_code)]

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};

use opentelemetry::propagation::TextMapPropagator as _;
use opentelemetry::trace::{TraceContextExt as _, TracerProvider as _};
use opentelemetry_otlp::WithExportConfig as _;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;
use tracing_subscriber::Layer as _;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;

/// The target of every span meant for export. Spans of other targets are
/// logs' context only and never exported.
pub const TARGET: &str = "federation::trace";

/// The gRPC metadata key (and the HTTP header) of the W3C trace context.
pub const HEADER: &str = "traceparent";

/// The environment variable a task's command gets its trace context in
/// (the convention of OpenTelemetry's environment-variable carriers).
pub const ENV: &str = "TRACEPARENT";

/// Whether this process installed an exporting layer; when false, span
/// contexts are never read and traceparents pass through unchanged.
static EXPORTING: AtomicBool = AtomicBool::new(false);

/// How logs are written on stderr.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable text; `ansi` colours (for a terminal).
    Text {
        /// Colour escapes.
        ansi: bool,
    },
    /// One JSON object per line.
    Json,
}

/// Where and as what to export spans.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Otlp {
    /// The OTLP/gRPC collector, `http://host:port` (plaintext).
    pub endpoint: String,
    /// `service.name` of the resource (`federation`, `region-agent`).
    pub service: String,
    /// Further resource attributes, for example `federation.region`.
    pub attributes: Vec<(String, String)>,
}

/// Why tracing could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TraceError {
    /// The endpoint is not an `http://host:port` URL.
    #[error("otlp endpoint `{endpoint}`: {why}")]
    Endpoint {
        /// The endpoint as given.
        endpoint: String,
        /// What is wrong with it.
        why: String,
    },
    /// The exporter refused its configuration.
    #[error("otlp exporter for `{endpoint}`: {source}")]
    Exporter {
        /// The endpoint as given.
        endpoint: String,
        /// The exporter's error.
        source: opentelemetry_otlp::ExporterBuildError,
    },
}

/// Checks an OTLP endpoint's shape: `http://host:port`. HTTPS is refused:
/// the exporter is built without TLS (run a collector next to the process).
pub fn check_endpoint(endpoint: &str) -> Result<(), TraceError> {
    let bad = |why: &str| {
        Err(TraceError::Endpoint {
            endpoint: endpoint.to_string(),
            why: why.to_string(),
        })
    };
    let Ok(uri) = endpoint.parse::<tonic::transport::Uri>() else {
        return bad("not a URL (expected http://host:port)");
    };
    match uri.scheme_str() {
        Some("http") => {}
        Some("https") => {
            return bad(
                "https is not supported (the exporter has no TLS): use a local collector at http://host:port",
            );
        }
        _ => return bad("expected http://host:port"),
    }
    if uri.host().is_none_or(str::is_empty) || uri.port_u16().is_none() {
        return bad("expected http://host:port");
    }
    Ok(())
}

/// The exporter of an installed OpenTelemetry layer. Dropping it without
/// [`Exporter::shutdown`] loses the spans not yet sent.
#[derive(Debug)]
pub struct Exporter {
    provider: opentelemetry_sdk::trace::SdkTracerProvider,
}

impl Exporter {
    /// Sends the spans still buffered and stops the exporter. Blocking: call
    /// it outside the async runtime's workers, while the runtime still runs
    /// (the exporter's channel lives on it).
    pub fn shutdown(self) {
        if let Err(e) = self.provider.shutdown() {
            tracing::warn!(error = %e, "flushing the trace exporter failed");
        }
    }
}

/// Installs the process's subscriber: logs on stderr in `format`, filtered by
/// `RUST_LOG` (default `info`), and, when `otlp` is given, the exporting
/// OpenTelemetry layer. With an endpoint this must run inside a Tokio
/// runtime context (`Runtime::enter`): the exporter's channel is spawned on
/// it. A subscriber already installed (tests, an embedding binary) is kept
/// and nothing is exported.
pub fn init(format: LogFormat, otlp: Option<&Otlp>) -> Result<Option<Exporter>, TraceError> {
    type Boxed = Box<dyn tracing_subscriber::Layer<tracing_subscriber::Registry> + Send + Sync>;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // The exported spans are not log context: refused here, they cost
    // nothing when no exporter takes them either.
    // The filter keeps RUST_LOG's level hint, so disabled levels stay a
    // static check (a bare `filter_fn` has no hint, which would lift it).
    let hint = tracing_subscriber::Layer::<tracing_subscriber::Registry>::max_level_hint(&filter)
        .unwrap_or(tracing_subscriber::filter::LevelFilter::TRACE);
    let logs_filter = tracing_subscriber::filter::FilterExt::and(
        filter,
        tracing_subscriber::filter::filter_fn(|m| !(m.is_span() && m.target() == TARGET))
            .with_max_level_hint(hint),
    );
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let logs: Boxed = match format {
        LogFormat::Json => fmt.json().with_filter(logs_filter).boxed(),
        LogFormat::Text { ansi } => fmt.with_ansi(ansi).with_filter(logs_filter).boxed(),
    };
    let mut layers = vec![logs];
    let mut exporter = None;
    if let Some(otlp) = otlp {
        let (layer, provider) = otel_layer(otlp)?;
        layers.push(layer);
        exporter = Some(Exporter { provider });
    }
    if tracing_subscriber::registry()
        .with(layers)
        .try_init()
        .is_err()
    {
        // Someone else's subscriber: our layer is not in it.
        if let Some(e) = exporter.take() {
            let _ = e.provider.shutdown();
        }
        return Ok(None);
    }
    if exporter.is_some() {
        EXPORTING.store(true, Ordering::Release);
    }
    Ok(exporter)
}

fn otel_layer(
    otlp: &Otlp,
) -> Result<
    (
        Box<dyn tracing_subscriber::Layer<tracing_subscriber::Registry> + Send + Sync>,
        opentelemetry_sdk::trace::SdkTracerProvider,
    ),
    TraceError,
> {
    check_endpoint(&otlp.endpoint)?;
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(otlp.endpoint.clone())
        .build()
        .map_err(|source| TraceError::Exporter {
            endpoint: otlp.endpoint.clone(),
            source,
        })?;
    let resource = opentelemetry_sdk::Resource::builder()
        .with_service_name(otlp.service.clone())
        .with_attributes(
            otlp.attributes
                .iter()
                .map(|(k, v)| opentelemetry::KeyValue::new(k.clone(), v.clone())),
        )
        .build();
    let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource)
        .build();
    let tracer = provider.tracer(otlp.service.clone());
    // Our spans, and warnings and errors inside them (as span events).
    // Our spans are INFO: the hint keeps debug and trace callsites off.
    let only_ours = tracing_subscriber::filter::filter_fn(|m| {
        if m.is_span() {
            m.target() == TARGET && *m.level() <= tracing::Level::INFO
        } else {
            *m.level() <= tracing::Level::WARN
        }
    })
    .with_max_level_hint(tracing_subscriber::filter::LevelFilter::INFO);
    let layer = tracing_opentelemetry::layer()
        .with_tracer(tracer)
        .with_filter(only_ours)
        .boxed();
    Ok((layer, provider))
}

/// Whether this process exports spans.
pub fn exporting() -> bool {
    EXPORTING.load(Ordering::Acquire)
}

/// A valid W3C trace context (`00-<trace id>-<parent id>-<flags>`), as
/// carried in gRPC metadata, in `Task.traceparent` and in `TRACEPARENT`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceParent(String);

impl TraceParent {
    /// Parses `text`; `None` unless it is a valid traceparent (all-zero ids,
    /// version `ff` and malformed fields are refused, as the W3C spec says).
    pub fn parse(text: &str) -> Option<Self> {
        let text = text.trim();
        // The propagator is lenient about lengths; the spec is not: version,
        // 32 and 16 lowercase hex digits, flags (a future version may append
        // fields after a fourth `-`).
        let mut parts = text.split('-');
        let shape_ok = [2, 32, 16, 2].iter().all(|&len| {
            parts.next().is_some_and(|p| {
                p.len() == len && p.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
            })
        });
        if !shape_ok || text.len() > 128 {
            return None;
        }
        let carrier = HashMap::from([(HEADER.to_string(), text.to_string())]);
        let cx = TraceContextPropagator::new().extract(&carrier);
        cx.span()
            .span_context()
            .is_valid()
            .then(|| Self(text.to_string()))
    }

    /// The text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The trace id (32 hex digits).
    pub fn trace_id(&self) -> &str {
        self.0.split('-').nth(1).unwrap_or_default()
    }

    /// The parent (span) id (16 hex digits).
    pub fn span_id(&self) -> &str {
        self.0.split('-').nth(2).unwrap_or_default()
    }

    fn context(&self) -> opentelemetry::Context {
        let carrier = HashMap::from([(HEADER.to_string(), self.0.clone())]);
        TraceContextPropagator::new().extract(&carrier)
    }

    fn of_context(cx: &opentelemetry::Context) -> Option<Self> {
        if !cx.span().span_context().is_valid() {
            return None;
        }
        let mut carrier = HashMap::new();
        TraceContextPropagator::new().inject_context(cx, &mut carrier);
        carrier.remove(HEADER).map(Self)
    }
}

impl std::fmt::Display for TraceParent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// The traceparent of a gRPC request's metadata, when valid (an invalid one
/// is ignored: the trace starts here, as the W3C spec says).
pub fn from_metadata(metadata: &tonic::metadata::MetadataMap) -> Option<TraceParent> {
    metadata
        .get(HEADER)
        .and_then(|v| v.to_str().ok())
        .and_then(TraceParent::parse)
}

/// Puts `parent` in outgoing gRPC metadata.
pub fn to_metadata(metadata: &mut tonic::metadata::MetadataMap, parent: &TraceParent) {
    if let Ok(value) = parent.as_str().parse() {
        metadata.insert(HEADER, value);
    }
}

/// Makes `span` a child of `parent` (a remote span). Call before the span is
/// first entered. Nothing when not exporting or without a parent.
pub fn set_parent(span: &tracing::Span, parent: Option<&TraceParent>) {
    if !exporting() {
        return;
    }
    if let Some(p) = parent {
        let _ = span.set_parent(p.context());
    }
}

/// Marks `span` failed, with `why` as its OpenTelemetry status
/// description. The span must declare `otel.status_description =
/// tracing::field::Empty`. Nothing when not exporting.
pub fn fail(span: &tracing::Span, why: &dyn std::fmt::Display) {
    if exporting() {
        span.record("otel.status_description", tracing::field::display(why));
    }
}

/// The traceparent to send on from within `span`: the span's own context
/// when this process exports (so the receiver's spans are its children),
/// else `received` unchanged, so the trace passes through.
pub fn outgoing(span: &tracing::Span, received: Option<&TraceParent>) -> Option<TraceParent> {
    if exporting() {
        if let Some(tp) = TraceParent::of_context(&span.context()) {
            return Some(tp);
        }
    }
    received.cloned()
}

#[cfg(test)]
mod tests {
    use super::*;

    const VALID: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn traceparent_parses_and_names_its_ids() {
        let tp = TraceParent::parse(VALID).expect("valid");
        assert_eq!(tp.trace_id(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(tp.span_id(), "00f067aa0ba902b7");
        assert_eq!(tp.to_string(), VALID);
    }

    #[test]
    fn invalid_traceparents_are_refused() {
        for bad in [
            "",
            "garbage",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
        ] {
            assert!(TraceParent::parse(bad).is_none(), "{bad:?} accepted");
        }
    }

    #[test]
    fn metadata_round_trip() {
        let mut md = tonic::metadata::MetadataMap::new();
        assert!(from_metadata(&md).is_none());
        let tp = TraceParent::parse(VALID).expect("valid");
        to_metadata(&mut md, &tp);
        assert_eq!(from_metadata(&md), Some(tp));
        md.insert(HEADER, "nonsense".parse().expect("ascii"));
        assert!(from_metadata(&md).is_none());
    }

    #[test]
    fn without_an_exporter_a_received_traceparent_passes_through() {
        // No subscriber of ours is installed in this test process.
        let tp = TraceParent::parse(VALID).expect("valid");
        let span = tracing::info_span!(target: TARGET, "anything");
        assert_eq!(outgoing(&span, Some(&tp)), Some(tp));
        assert_eq!(outgoing(&span, None), None);
    }

    #[test]
    fn without_an_endpoint_our_spans_are_disabled_and_nothing_exports() {
        // The process's subscriber, as a controller without `node.tracing`.
        let exporter = init(LogFormat::Text { ansi: false }, None).expect("init");
        assert!(exporter.is_none());
        assert!(!exporting());
        // Off at the callsite: not built, not recorded, not sent.
        let span = tracing::info_span!(target: TARGET, "store.commit");
        // And the level hint is RUST_LOG's, as without tracing: levels it
        // disables stay a static check.
        assert_eq!(
            tracing::level_filters::LevelFilter::current(),
            tracing_subscriber::EnvFilter::try_from_default_env()
                .ok()
                .and_then(|f| {
                    tracing_subscriber::Layer::<tracing_subscriber::Registry>::max_level_hint(&f)
                })
                .unwrap_or(tracing::level_filters::LevelFilter::INFO)
        );
        assert!(span.is_disabled());
        assert!(TraceParent::of_context(&span.context()).is_none());
    }

    #[test]
    fn endpoints_must_be_plain_http_with_a_port() {
        assert!(check_endpoint("http://127.0.0.1:4317").is_ok());
        assert!(check_endpoint("http://collector:4317").is_ok());
        for bad in [
            "https://collector:4317",
            "collector:4317",
            "http://collector",
            "not a url",
        ] {
            let e = check_endpoint(bad).expect_err(bad);
            assert!(e.to_string().contains(bad), "{e}");
        }
    }
}
