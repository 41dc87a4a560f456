//! gRPC server metrics, per service, method and status code, as a tower
//! layer around every service of the controller:
//! `federation_grpc_server_handled_total{service,method,code}` and
//! `federation_grpc_server_handling_seconds{service,method}` (from the
//! request to the end of the response body, so a stream counts whole).
//!
//! The code is the response's `grpc-status` (headers for trailers-only
//! answers, else trailers); a response body dropped before its trailers (the
//! client went away) counts as `Cancelled`. Cardinality is bounded: services
//! outside [`KNOWN_SERVICES`] and methods the server answered `Unimplemented`
//! are labelled `unknown`.
//!
//! It also counts the calls in flight that are the region's work
//! ([`is_work`]: submits, forwards, gets, cancels and agents' leasing; not
//! watches, gossip, snapshots, probes or the admin's calls), which a
//! drain reports ([`GrpcMetrics::work_in_flight`]).
//!
//! Owns the two families and that count; knows nothing else of what the
//! services do.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Instant;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};

/// Services whose names are used as labels as they are.
pub const KNOWN_SERVICES: [&str; 7] = [
    "federation.v1.FederationClient",
    "federation.v1.FederationPeer",
    "federation.v1.RegionAgentApi",
    "federation.v1.FederationAdmin",
    "grpc.health.v1.Health",
    "grpc.reflection.v1.ServerReflection",
    "grpc.reflection.v1alpha.ServerReflection",
];

/// Labels of a handled call.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HandledLabels {
    /// The gRPC service.
    pub service: String,
    /// The method.
    pub method: String,
    /// The status code's name (`OK`, `Unavailable`, …).
    pub code: String,
}

/// Labels of a method.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MethodLabels {
    /// The gRPC service.
    pub service: String,
    /// The method.
    pub method: String,
}

/// The two families, shared by every connection.
#[derive(Debug, Clone)]
pub struct GrpcMetrics {
    /// Calls handled, by code.
    pub handled: Family<HandledLabels, Counter>,
    /// Handling time.
    pub seconds: Family<MethodLabels, Histogram>,
    /// Calls of the region's work in flight ([`is_work`]).
    work: Arc<AtomicU64>,
}

impl GrpcMetrics {
    /// Calls of the region's work in flight now ([`is_work`]).
    pub fn work_in_flight(&self) -> u64 {
        self.work.load(Ordering::SeqCst)
    }
}

/// True for the calls a drained replica must see finish before it stops:
/// every client call but a watch, a peer's forward and relayed get or
/// cancel, and an agent's calls but its heartbeat (the agents are counted
/// by their heartbeats).
pub fn is_work(service: &str, method: &str) -> bool {
    match service {
        "federation.v1.FederationClient" => method != "WatchTask",
        "federation.v1.FederationPeer" => {
            matches!(method, "ForwardTask" | "RelayGetTask" | "RelayCancelTask")
        }
        "federation.v1.RegionAgentApi" => method != "Heartbeat",
        _ => false,
    }
}

/// Counts one call of work in flight until dropped.
struct InFlight(Arc<AtomicU64>);

impl InFlight {
    fn new(count: &Arc<AtomicU64>) -> Self {
        count.fetch_add(1, Ordering::SeqCst);
        Self(count.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Default for GrpcMetrics {
    fn default() -> Self {
        Self {
            work: Arc::new(AtomicU64::new(0)),
            handled: Family::default(),
            seconds: Family::new_with_constructor(|| {
                Histogram::new(exponential_buckets(0.0001, 2.0, 18))
            }),
        }
    }
}

fn split_path(path: &str) -> (String, String) {
    let mut parts = path.trim_start_matches('/').splitn(2, '/');
    let service = parts.next().unwrap_or("");
    let method = parts.next().unwrap_or("");
    if KNOWN_SERVICES.contains(&service) && !method.is_empty() && method.len() <= 64 {
        (service.to_string(), method.to_string())
    } else {
        ("unknown".into(), "unknown".into())
    }
}

fn code_name(value: Option<&http::HeaderValue>) -> Option<tonic::Code> {
    let v = value?.to_str().ok()?.parse::<i32>().ok()?;
    Some(tonic::Code::from_i32(v))
}

/// The code's name as the Prometheus gRPC conventions spell it (Go's
/// `codes.Code.String()`: `OK`, `Canceled`, `InvalidArgument`, …).
fn code_label(code: tonic::Code) -> String {
    match code {
        tonic::Code::Ok => "OK".into(),
        tonic::Code::Cancelled => "Canceled".into(),
        other => format!("{other:?}"),
    }
}

/// What one call records when it ends.
struct Pending {
    metrics: Arc<GrpcMetrics>,
    service: String,
    method: String,
    start: Instant,
    /// Held while the call is the region's work in flight.
    _work: Option<InFlight>,
}

impl Pending {
    fn finish(self, code: tonic::Code) {
        let method = if code == tonic::Code::Unimplemented {
            "unknown".to_string()
        } else {
            self.method
        };
        self.metrics
            .seconds
            .get_or_create(&MethodLabels {
                service: self.service.clone(),
                method: method.clone(),
            })
            .observe(self.start.elapsed().as_secs_f64());
        self.metrics
            .handled
            .get_or_create(&HandledLabels {
                service: self.service,
                method,
                code: code_label(code),
            })
            .inc();
    }
}

/// The layer.
#[derive(Debug, Clone)]
pub struct GrpcMetricsLayer(pub Arc<GrpcMetrics>);

impl<S> tower::Layer<S> for GrpcMetricsLayer {
    type Service = Metered<S>;
    fn layer(&self, inner: S) -> Self::Service {
        Metered {
            inner,
            metrics: self.0.clone(),
        }
    }
}

/// A service whose calls are counted and timed.
#[derive(Debug, Clone)]
pub struct Metered<S> {
    inner: S,
    metrics: Arc<GrpcMetrics>,
}

impl<S, B, RB> tower::Service<http::Request<B>> for Metered<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<RB>>,
    S::Future: Send + 'static,
    RB: http_body::Body,
{
    type Response = http::Response<MeteredBody<RB>>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let (service, method) = split_path(req.uri().path());
        let work = is_work(&service, &method).then(|| InFlight::new(&self.metrics.work));
        let pending = Pending {
            metrics: self.metrics.clone(),
            service,
            method,
            start: Instant::now(),
            _work: work,
        };
        let call = self.inner.call(req);
        Box::pin(async move {
            let resp = call.await?;
            let (parts, body) = resp.into_parts();
            let pending = match code_name(parts.headers.get("grpc-status")) {
                // Trailers-only: the call is over.
                Some(code) => {
                    pending.finish(code);
                    None
                }
                None => Some(pending),
            };
            Ok(http::Response::from_parts(
                parts,
                MeteredBody {
                    inner: body,
                    pending: Pending2(pending),
                },
            ))
        })
    }
}

/// Records `Cancelled` if dropped before the trailers arrived.
struct Pending2(Option<Pending>);

impl Drop for Pending2 {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            p.finish(tonic::Code::Cancelled);
        }
    }
}

pin_project_lite::pin_project! {
    /// A response body that records the call when its trailers pass.
    pub struct MeteredBody<B> {
        #[pin]
        inner: B,
        pending: Pending2,
    }
}

impl<B: http_body::Body> http_body::Body for MeteredBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        let polled = this.inner.poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(trailers) = frame.trailers_ref() {
                    if let Some(p) = this.pending.0.take() {
                        p.finish(
                            code_name(trailers.get("grpc-status")).unwrap_or(tonic::Code::Unknown),
                        );
                    }
                }
            }
            Poll::Ready(None) => {
                if let Some(p) = this.pending.0.take() {
                    // Ended without trailers: not a well-formed gRPC answer.
                    p.finish(tonic::Code::Unknown);
                }
            }
            Poll::Ready(Some(Err(_))) => {
                if let Some(p) = this.pending.0.take() {
                    p.finish(tonic::Code::Internal);
                }
            }
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn work_is_what_a_drained_replica_must_see_finish() {
        for (service, method) in [
            ("federation.v1.FederationClient", "SubmitTask"),
            ("federation.v1.FederationClient", "GetTask"),
            ("federation.v1.FederationPeer", "ForwardTask"),
            ("federation.v1.RegionAgentApi", "LeaseTasks"),
            ("federation.v1.RegionAgentApi", "CompleteTask"),
        ] {
            assert!(is_work(service, method), "{service}/{method}");
        }
        for (service, method) in [
            ("federation.v1.FederationClient", "WatchTask"),
            ("federation.v1.FederationPeer", "Advertise"),
            ("federation.v1.FederationPeer", "PushSnapshot"),
            ("federation.v1.RegionAgentApi", "Heartbeat"),
            ("federation.v1.FederationAdmin", "Drain"),
            ("grpc.health.v1.Health", "Check"),
            ("unknown", "unknown"),
        ] {
            assert!(!is_work(service, method), "{service}/{method}");
        }
    }

    #[test]
    fn labels_stay_bounded() {
        assert_eq!(
            split_path("/federation.v1.FederationClient/SubmitTask"),
            ("federation.v1.FederationClient".into(), "SubmitTask".into())
        );
        assert_eq!(
            split_path("/evil.Service/x"),
            ("unknown".into(), "unknown".into())
        );
        assert_eq!(
            split_path(&format!("/grpc.health.v1.Health/{}", "a".repeat(100))),
            ("unknown".into(), "unknown".into())
        );
    }
}
