//! What `kestrelinfer` counts, per stream and per element: the `kestrel/stats` element messages
//! (property `stats-interval`) and the metrics it records through the `metrics` facade, which
//! reach whatever recorder the process installed (`kestrel pipeline` installs Prometheus's; with
//! none installed they cost nothing). Install the recorder before the element goes to READY: the
//! metric handles are taken then, so that counting a frame allocates nothing.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use metrics::{Counter, Histogram, Unit};

/// Frames that entered the element (counter; labels `element`, `stream`).
pub const FRAMES: &str = "kestrel_gst_frames_total";
/// Frames that went through the detector (counter; labels `element`, `stream`).
pub const INFERRED: &str = "kestrel_gst_inferred_frames_total";
/// Frames dropped: queued when a flush came, or refused downstream (counter; `element`, `stream`).
pub const DROPPED: &str = "kestrel_gst_dropped_frames_total";
/// Seconds from a frame's arrival to its push downstream (histogram; `element`, `stream`).
pub const LATENCY: &str = "kestrel_gst_latency_seconds";
/// Batches run (counter; label `element`).
pub const BATCHES: &str = "kestrel_gst_batches_total";
/// Inferred frames of a batch over `batch-size`, 0–1 (histogram; label `element`).
pub const BATCH_FILL: &str = "kestrel_gst_batch_fill_ratio";

/// Help texts for the recorder (Prometheus's `# HELP` lines).
pub fn describe() {
    metrics::describe_counter!(FRAMES, Unit::Count, "Frames that entered kestrelinfer");
    metrics::describe_counter!(
        INFERRED,
        Unit::Count,
        "Frames kestrelinfer ran through its detector"
    );
    metrics::describe_counter!(
        DROPPED,
        Unit::Count,
        "Frames kestrelinfer dropped (flushed while queued, or refused downstream)"
    );
    metrics::describe_histogram!(
        LATENCY,
        Unit::Seconds,
        "Time from a frame's arrival in kestrelinfer to its push downstream"
    );
    metrics::describe_counter!(BATCHES, Unit::Count, "Batches kestrelinfer ran");
    metrics::describe_histogram!(
        BATCH_FILL,
        "Inferred frames of a kestrelinfer batch over its batch-size"
    );
}

/// One stream's way out (its src pad) and its counters, shared by the queued frames of the stream
/// (an `Arc` clone per frame: no allocation).
pub struct StreamOut {
    /// The stream's number: 0 for the always pads `sink`/`src`, N for `sink_N`/`src_N`.
    pub index: u32,
    pub srcpad: gst::Pad,
    /// A flow error met while another thread (another stream's, or the batch-timeout thread)
    /// pushed this stream's buffers; the stream's next buffer returns it upstream.
    pub flow_error: Mutex<Option<gst::FlowError>>,
    frames: AtomicU64,
    inferred: AtomicU64,
    dropped: AtomicU64,
    /// Latency sum (nanoseconds), count and maximum since the last stats message.
    window_latency_ns: AtomicU64,
    window_pushed: AtomicU64,
    window_latency_max_ns: AtomicU64,
    metric_frames: Counter,
    metric_inferred: Counter,
    metric_dropped: Counter,
    metric_latency: Histogram,
}

/// A stream's figures for one stats message.
#[derive(Debug, Clone, Copy)]
pub struct StreamSnapshot {
    pub index: u32,
    /// Since the element went to READY.
    pub frames: u64,
    pub inferred: u64,
    pub dropped: u64,
    /// Over the frames pushed since the previous message, milliseconds (0 when none).
    pub latency_mean_ms: f64,
    pub latency_max_ms: f64,
}

impl StreamOut {
    pub fn new(index: u32, srcpad: gst::Pad, element: &str) -> Self {
        let labels = [
            ("element", element.to_string()),
            ("stream", index.to_string()),
        ];
        Self {
            index,
            srcpad,
            flow_error: Mutex::new(None),
            frames: AtomicU64::new(0),
            inferred: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            window_latency_ns: AtomicU64::new(0),
            window_pushed: AtomicU64::new(0),
            window_latency_max_ns: AtomicU64::new(0),
            metric_frames: metrics::counter!(FRAMES, &labels),
            metric_inferred: metrics::counter!(INFERRED, &labels),
            metric_dropped: metrics::counter!(DROPPED, &labels),
            metric_latency: metrics::histogram!(LATENCY, &labels),
        }
    }

    /// A frame arrived; `infer`: it will go through the detector (`interval`).
    pub fn arrived(&self, infer: bool) {
        self.frames.fetch_add(1, Ordering::Relaxed);
        self.metric_frames.increment(1);
        if infer {
            self.inferred.fetch_add(1, Ordering::Relaxed);
            self.metric_inferred.increment(1);
        }
    }

    /// A frame left `latency` after it arrived.
    pub fn pushed(&self, latency: Duration) {
        let ns = u64::try_from(latency.as_nanos()).unwrap_or(u64::MAX);
        self.window_latency_ns.fetch_add(ns, Ordering::Relaxed);
        self.window_pushed.fetch_add(1, Ordering::Relaxed);
        self.window_latency_max_ns.fetch_max(ns, Ordering::Relaxed);
        self.metric_latency.record(latency.as_secs_f64());
    }

    /// `n` frames were dropped.
    pub fn dropped(&self, n: u64) {
        if n > 0 {
            self.dropped.fetch_add(n, Ordering::Relaxed);
            self.metric_dropped.increment(n);
        }
    }

    /// Remember a flow error of a push made on another stream's behalf.
    pub fn set_flow_error(&self, e: gst::FlowError) {
        *self
            .flow_error
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(e);
    }

    /// The remembered flow error, once.
    pub fn take_flow_error(&self) -> Option<gst::FlowError> {
        self.flow_error
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take()
    }

    /// The figures for a stats message; starts a new latency window.
    pub fn snapshot(&self) -> StreamSnapshot {
        let sum = self.window_latency_ns.swap(0, Ordering::Relaxed);
        let n = self.window_pushed.swap(0, Ordering::Relaxed);
        let max = self.window_latency_max_ns.swap(0, Ordering::Relaxed);
        StreamSnapshot {
            index: self.index,
            frames: self.frames.load(Ordering::Relaxed),
            inferred: self.inferred.load(Ordering::Relaxed),
            dropped: self.dropped.load(Ordering::Relaxed),
            latency_mean_ms: if n == 0 {
                0.0
            } else {
                sum as f64 / n as f64 / 1e6
            },
            latency_max_ms: max as f64 / 1e6,
        }
    }
}

/// The element's batch figures.
pub struct BatchStats {
    /// Since READY.
    pub batches: u64,
    /// Sum of fills and batches since the last stats message.
    window_fill: f64,
    window_batches: u64,
    metric_batches: Counter,
    metric_fill: Histogram,
}

impl BatchStats {
    pub fn new(element: &str) -> Self {
        let labels = [("element", element.to_string())];
        Self {
            batches: 0,
            window_fill: 0.0,
            window_batches: 0,
            metric_batches: metrics::counter!(BATCHES, &labels),
            metric_fill: metrics::histogram!(BATCH_FILL, &labels),
        }
    }

    /// A batch of `inferred` frames ran, `batch_size` being the most it could hold.
    pub fn ran(&mut self, inferred: usize, batch_size: usize) {
        let fill = inferred as f64 / batch_size.max(1) as f64;
        self.batches += 1;
        self.window_batches += 1;
        self.window_fill += fill;
        self.metric_batches.increment(1);
        self.metric_fill.record(fill);
    }

    /// Mean fill since the previous call (0 when no batch ran); starts a new window.
    pub fn take_mean_fill(&mut self) -> f64 {
        let mean = if self.window_batches == 0 {
            0.0
        } else {
            self.window_fill / self.window_batches as f64
        };
        self.window_fill = 0.0;
        self.window_batches = 0;
        mean
    }
}

/// Structure name of the element messages `kestrelinfer` posts every `stats-interval`.
pub const MESSAGE: &str = "kestrel/stats";

/// The `kestrel/stats` structure of one stream: `stream` (uint), `frames`, `inferred`, `dropped`,
/// `batches` (guint64, since READY), `latency-mean-ms`, `latency-max-ms` (double, since the
/// previous message) and `batch-fill` (double, the element's mean since the previous message).
pub fn message_structure(s: &StreamSnapshot, batches: u64, batch_fill: f64) -> gst::Structure {
    gst::Structure::builder(MESSAGE)
        .field("stream", s.index)
        .field("frames", s.frames)
        .field("inferred", s.inferred)
        .field("dropped", s.dropped)
        .field("batches", batches)
        .field("latency-mean-ms", s.latency_mean_ms)
        .field("latency-max-ms", s.latency_max_ms)
        .field("batch-fill", batch_fill)
        .build()
}
