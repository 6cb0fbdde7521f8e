//! The service's Prometheus metrics: names (the `kestrel_` prefix, base units), help texts, and
//! the recorder with histogram buckets.

use anyhow::{Context, Result};
use metrics::Unit;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// Requests by `model`, `version`, `endpoint` and `outcome` (ok, or the HTTP status).
pub const REQUESTS: &str = "kestrel_requests_total";
/// Seconds from a request's arrival to its response, by `model` and `endpoint`.
pub const REQUEST_SECONDS: &str = "kestrel_request_duration_seconds";
/// Seconds a request waited in its model's batcher queue.
pub const QUEUE_SECONDS: &str = "kestrel_queue_duration_seconds";
/// Seconds of image decoding and letterboxing (image endpoint).
pub const PREPROCESS_SECONDS: &str = "kestrel_preprocess_duration_seconds";
/// Seconds of one engine run (one batch).
pub const INFERENCE_SECONDS: &str = "kestrel_inference_duration_seconds";
/// Seconds of decoding and non-maximum suppression (image endpoint).
pub const POSTPROCESS_SECONDS: &str = "kestrel_postprocess_duration_seconds";
/// Images per engine run.
pub const BATCH_SIZE: &str = "kestrel_batch_size";
/// Requests waiting in a model's batcher.
pub const QUEUE_DEPTH: &str = "kestrel_queue_depth";
/// Requests being served.
pub const IN_FLIGHT: &str = "kestrel_in_flight_requests";
/// TCP connections open (at most `max_connections`).
pub const OPEN_CONNECTIONS: &str = "kestrel_open_connections";
/// Engines loaded, by `source` (onnx, engine_file, cache_hit, cache_built, rebuilt).
pub const ENGINE_LOADS: &str = "kestrel_engine_loads_total";
/// Memory in use (every process) of each GPU a loaded model runs on, by `gpu`, bytes.
pub const GPU_MEMORY_USED: &str = "kestrel_gpu_memory_used_bytes";
/// Memory in total of each GPU a loaded model runs on, by `gpu`, bytes.
pub const GPU_MEMORY_TOTAL: &str = "kestrel_gpu_memory_total_bytes";
/// Batches run by each engine instance, by `model`, `instance` and `gpu` (how the batcher
/// spread the work).
pub const INSTANCE_BATCHES: &str = "kestrel_instance_batches_total";

const SECONDS_BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];
const BATCH_BUCKETS: [f64; 8] = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0];

/// Install the process's Prometheus recorder and describe the metrics.
pub fn install() -> Result<PrometheusHandle> {
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &SECONDS_BUCKETS)
        .and_then(|b| b.set_buckets_for_metric(Matcher::Full(BATCH_SIZE.into()), &BATCH_BUCKETS))
        .context("configuring the metrics")?
        .install_recorder()
        .context("installing the metrics recorder")?;
    metrics::describe_counter!(
        REQUESTS,
        Unit::Count,
        "Requests by model, endpoint and outcome"
    );
    metrics::describe_histogram!(REQUEST_SECONDS, Unit::Seconds, "Request duration");
    metrics::describe_histogram!(QUEUE_SECONDS, Unit::Seconds, "Time in the batcher queue");
    metrics::describe_histogram!(
        PREPROCESS_SECONDS,
        Unit::Seconds,
        "Image decoding and letterboxing"
    );
    metrics::describe_histogram!(INFERENCE_SECONDS, Unit::Seconds, "One engine run (a batch)");
    metrics::describe_histogram!(
        POSTPROCESS_SECONDS,
        Unit::Seconds,
        "Box decoding and non-maximum suppression"
    );
    metrics::describe_histogram!(BATCH_SIZE, Unit::Count, "Images per engine run");
    metrics::describe_gauge!(QUEUE_DEPTH, Unit::Count, "Requests waiting in the batcher");
    metrics::describe_gauge!(IN_FLIGHT, Unit::Count, "Requests being served");
    metrics::describe_gauge!(
        OPEN_CONNECTIONS,
        Unit::Count,
        "TCP connections open (at most max_connections)"
    );
    metrics::describe_counter!(ENGINE_LOADS, Unit::Count, "Engines loaded, by source");
    metrics::describe_gauge!(
        GPU_MEMORY_USED,
        Unit::Bytes,
        "GPU memory in use (all processes)"
    );
    metrics::describe_gauge!(GPU_MEMORY_TOTAL, Unit::Bytes, "GPU memory in total");
    metrics::describe_counter!(
        INSTANCE_BATCHES,
        Unit::Count,
        "Batches run by each engine instance, by GPU"
    );
    Ok(handle)
}
