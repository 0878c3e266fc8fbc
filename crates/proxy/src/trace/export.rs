//! Span export: kept requests go into a bounded queue (a full queue drops them, counted;
//! the request path never waits), and one thread of its own batches them into OTLP/gRPC
//! `TraceService/Export` calls to the collector. The thread ends when the queue's last
//! sender (the tracer) is dropped, after sending what is queued.

use crate::telemetry::metrics::Metrics;
use crate::trace::spans::Finished;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_client::TraceServiceClient;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::{any_value::Value, AnyValue, InstrumentationScope, KeyValue};
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tonic::transport::{Channel, Endpoint};

/// Kept requests waiting for export; beyond this they are dropped.
const QUEUE: usize = 2048;
/// Requests per Export call.
const MAX_BATCH: usize = 256;
/// How long a kept request may wait for its batch to fill.
const BATCH_DELAY: Duration = Duration::from_millis(500);
const EXPORT_TIMEOUT: Duration = Duration::from_secs(10);

/// The request path's end of the queue.
pub struct Exporter {
    queue: mpsc::Sender<Finished>,
    metrics: Arc<Metrics>,
}

impl Exporter {
    /// Starts the export thread for `collector` (`host:port`); `service` names this proxy's
    /// spans (`service.name`).
    pub fn start(collector: &str, service: &str, metrics: Arc<Metrics>) -> Result<Exporter, String> {
        let endpoint = Endpoint::from_shared(format!("http://{collector}"))
            .map_err(|e| format!("tracing collector {collector:?}: {e}"))?
            .connect_timeout(Duration::from_secs(2))
            .timeout(EXPORT_TIMEOUT);
        let (queue, receiver) = mpsc::channel(QUEUE);
        let sender = Sender {
            receiver,
            resource: resource(service),
            metrics: metrics.clone(),
            collector: collector.to_string(),
            failing: false,
        };
        std::thread::Builder::new()
            .name("smesh-trace-export".into())
            .spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build();
                match runtime {
                    // Lazy: a collector that is down at start is tried again per batch.
                    Ok(runtime) => runtime.block_on(sender.run(endpoint)),
                    Err(e) => tracing::error!(error = %e, "trace export cannot start its runtime"),
                }
            })
            .map_err(|e| format!("cannot start the trace export thread: {e}"))?;
        Ok(Exporter { queue, metrics })
    }

    /// Queues a kept request, or counts its spans dropped when the queue is full.
    pub fn send(&self, finished: Finished) {
        let spans = finished.span_count() as u64;
        if self.queue.try_send(finished).is_err() {
            self.metrics
                .trace_spans_dropped
                .with_label_values(&["queue_full"])
                .inc_by(spans);
        }
    }
}

/// The export thread's end of the queue.
struct Sender {
    receiver: mpsc::Receiver<Finished>,
    resource: Resource,
    metrics: Arc<Metrics>,
    collector: String,
    /// Whether the last export failed (logged once per change, not per batch).
    failing: bool,
}

impl Sender {
    async fn run(mut self, endpoint: Endpoint) {
        let mut client = TraceServiceClient::new(endpoint.connect_lazy());
        let mut batch = Vec::with_capacity(MAX_BATCH);
        loop {
            let open = self.fill(&mut batch).await;
            if !batch.is_empty() {
                self.export(&mut client, &mut batch).await;
            }
            if !open {
                return;
            }
        }
    }

    /// Waits for a first request, then for more until the batch is full or has waited
    /// long enough. False once the queue is closed.
    async fn fill(&mut self, batch: &mut Vec<Finished>) -> bool {
        match self.receiver.recv().await {
            Some(first) => batch.push(first),
            None => return false,
        }
        let deadline = tokio::time::Instant::now() + BATCH_DELAY;
        while batch.len() < MAX_BATCH {
            match tokio::time::timeout_at(deadline, self.receiver.recv()).await {
                Ok(Some(next)) => batch.push(next),
                Ok(None) => return false,
                Err(_) => break,
            }
        }
        true
    }

    async fn export(&mut self, client: &mut TraceServiceClient<Channel>, batch: &mut Vec<Finished>) {
        let spans: Vec<_> = batch.drain(..).flat_map(|f| f.spans()).collect();
        let count = spans.len() as u64;
        let request = ExportTraceServiceRequest {
            resource_spans: vec![ResourceSpans {
                resource: Some(self.resource.clone()),
                scope_spans: vec![ScopeSpans {
                    scope: Some(InstrumentationScope {
                        name: "smesh-proxy".into(),
                        version: env!("CARGO_PKG_VERSION").into(),
                        ..Default::default()
                    }),
                    spans,
                    schema_url: String::new(),
                }],
                schema_url: String::new(),
            }],
        };
        match client.export(request).await {
            Ok(_) => {
                self.metrics.trace_spans_exported.inc_by(count);
                if std::mem::take(&mut self.failing) {
                    tracing::info!(collector = %self.collector, "trace export recovered");
                }
            }
            Err(status) => {
                self.metrics
                    .trace_spans_dropped
                    .with_label_values(&["export_failed"])
                    .inc_by(count);
                if !std::mem::replace(&mut self.failing, true) {
                    tracing::warn!(collector = %self.collector, error = %status, "trace export failed; dropping spans until it works");
                }
            }
        }
    }
}

fn resource(service: &str) -> Resource {
    let text = |key: &str, value: &str| KeyValue {
        key: key.into(),
        value: Some(AnyValue {
            value: Some(Value::StringValue(value.into())),
        }),
    };
    Resource {
        attributes: vec![text("service.name", service), text("telemetry.sdk.name", "smesh")],
        ..Default::default()
    }
}
