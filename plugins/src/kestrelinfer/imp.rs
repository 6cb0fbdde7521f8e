//! The `kestrelinfer` element: settings, the engine built at the NULL → READY change, the batch
//! queue, and event handling.

use std::path::PathBuf;
use std::sync::{Condvar, LazyLock, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use gst::glib;
use gst::prelude::*;
use gst::subclass::prelude::*;
use gst_video::{VideoFrameRef, VideoInfo};
use image::RgbImage;
use kestrel_runtime::engine::{Backend, BatchProfile, BuildOptions, Precision, open_engine};
use kestrel_runtime::nms::NmsConfig;
use kestrel_runtime::{Detection, Detector};

use crate::detection;
use crate::frame;

static CAT: LazyLock<gst::DebugCategory> = LazyLock::new(|| {
    gst::DebugCategory::new(
        "kestrelinfer",
        gst::DebugColorFlags::empty(),
        Some("Kestrel detector"),
    )
});

/// Engine backend, as the `backend` property offers it.
#[derive(Debug, Eq, PartialEq, Ord, PartialOrd, Hash, Clone, Copy, glib::Enum)]
#[repr(u32)]
#[enum_type(name = "GstKestrelBackend")]
pub enum BackendChoice {
    #[enum_value(name = "cpu: tract on the CPU (needs nothing installed)", nick = "cpu")]
    Cpu = 0,
    #[enum_value(
        name = "cuda: Kestrel's GPU engine (NVIDIA GPU, cuDNN 9)",
        nick = "cuda"
    )]
    Cuda = 1,
    #[enum_value(name = "tensorrt: not part of this build yet", nick = "tensorrt")]
    TensorRt = 2,
}

/// Engine precision, as the `precision` property offers it.
#[derive(Debug, Eq, PartialEq, Ord, PartialOrd, Hash, Clone, Copy, glib::Enum)]
#[repr(u32)]
#[enum_type(name = "GstKestrelPrecision")]
pub enum PrecisionChoice {
    #[enum_value(name = "fp32", nick = "fp32")]
    Fp32 = 0,
    #[enum_value(name = "fp16 (GPU backends)", nick = "fp16")]
    Fp16 = 1,
    #[enum_value(name = "int8 (Q/DQ models, GPU backends)", nick = "int8")]
    Int8 = 2,
    #[enum_value(name = "best: int8 where quantized, fp16 elsewhere", nick = "best")]
    Best = 3,
}

const DEFAULT_BATCH: u32 = 1;
const MAX_BATCH: u32 = 64;
const DEFAULT_CONF: f32 = 0.25;
const DEFAULT_IOU: f32 = 0.45;
const DEFAULT_MAX_DET: u32 = 300;

#[derive(Debug, Clone)]
struct Settings {
    model: Option<String>,
    backend: BackendChoice,
    precision: PrecisionChoice,
    batch_size: u32,
    batch_timeout_us: u32,
    conf_threshold: f32,
    iou_threshold: f32,
    max_detections: u32,
    interval: u32,
    labels: Option<String>,
    unique_id: u32,
    classes: Option<String>,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            model: None,
            backend: BackendChoice::Cpu,
            precision: PrecisionChoice::Fp32,
            batch_size: DEFAULT_BATCH,
            batch_timeout_us: 0,
            conf_threshold: DEFAULT_CONF,
            iou_threshold: DEFAULT_IOU,
            max_detections: DEFAULT_MAX_DET,
            interval: 1,
            labels: None,
            unique_id: 0,
            classes: None,
        }
    }
}

/// A queued frame: the buffer and whether it is to be inferred (`interval` skips some).
struct Pending {
    buffer: gst::Buffer,
    infer: bool,
}

/// What exists between READY and NULL.
struct State {
    detector: Detector,
    names: Vec<String>,
    nms: NmsConfig,
    batch_size: usize,
    /// A partial batch runs this long after its first frame arrived (`None`: only when full).
    batch_timeout: Option<Duration>,
    /// When the queued partial batch is due.
    deadline: Option<Instant>,
    interval: u64,
    unique_id: u32,
    info: Option<VideoInfo>,
    pending: Vec<Pending>,
    /// Frames seen since the start (for `interval`).
    frames: u64,
    /// Reused RGB copies of the frames of a batch, and the detections.
    images: Vec<RgbImage>,
    results: Vec<Vec<Detection>>,
}

pub struct KestrelInfer {
    sinkpad: gst::Pad,
    srcpad: gst::Pad,
    settings: Mutex<Settings>,
    state: Mutex<Option<State>>,
    /// Held from running a batch until its buffers are pushed, so the streaming thread and the
    /// batch-timeout thread keep the buffers in order.
    push_lock: Mutex<()>,
    /// Wakes the batch-timeout thread when a deadline is set or the element stops.
    wake: Condvar,
    timer: Mutex<Option<std::thread::JoinHandle<()>>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding the lock is already reported by GStreamer's panic catcher; keep going
    // with the data as it is.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl KestrelInfer {
    /// Build the engine and everything else `State` holds; the message names the problem and
    /// the fix.
    fn start(&self) -> Result<State, String> {
        let s = lock(&self.settings).clone();
        let model = s.model.ok_or_else(|| {
            "no model: set the `model` property to an ONNX model or a Kestrel engine file"
                .to_string()
        })?;
        let path = PathBuf::from(&model);
        if !path.is_file() {
            return Err(format!(
                "model {model} does not exist (the `model` property must name an ONNX model or a \
                 Kestrel engine file)"
            ));
        }
        let backend = match s.backend {
            BackendChoice::Cpu => Backend::Cpu,
            BackendChoice::Cuda => Backend::Cuda,
            BackendChoice::TensorRt => {
                return Err(
                    "backend=tensorrt is not part of this build yet; use backend=cpu or cuda"
                        .into(),
                );
            }
        };
        let precision = match s.precision {
            PrecisionChoice::Fp32 => Precision::Fp32,
            PrecisionChoice::Fp16 => Precision::Fp16,
            PrecisionChoice::Int8 => Precision::Int8,
            PrecisionChoice::Best => Precision::Best,
        };
        let batch = s.batch_size as usize;
        let options = BuildOptions {
            backend,
            precision,
            profile: BatchProfile {
                min: 1,
                opt: batch,
                max: batch,
            },
        };
        let (engine, _) =
            open_engine(&path, &options, None).map_err(|e| format!("model {model}: {e}"))?;
        let detector = Detector::new(engine);
        let info = detector.info();
        let names = match &s.labels {
            Some(file) => {
                let text = std::fs::read_to_string(file)
                    .map_err(|e| format!("labels file {file}: {e}"))?;
                let names = kestrel_runtime::labels::parse_class_names(&text);
                if names.len() != info.num_classes {
                    return Err(format!(
                        "labels file {file} has {} names, the model {} classes",
                        names.len(),
                        info.num_classes
                    ));
                }
                names
            }
            None => info.class_names.clone(),
        };
        let classes = match &s.classes {
            None => None,
            Some(list) if list.trim().is_empty() => None,
            Some(list) => Some(
                list.split(',')
                    .map(|c| {
                        c.trim()
                            .parse::<usize>()
                            .ok()
                            .filter(|&c| c < info.num_classes)
                            .ok_or_else(|| {
                                format!(
                                    "classes={list}: `{c}` is not a class index of this model \
                                     (0..{})",
                                    info.num_classes
                                )
                            })
                    })
                    .collect::<Result<Vec<usize>, String>>()?,
            ),
        };
        let nms = NmsConfig {
            conf_threshold: s.conf_threshold,
            iou_threshold: s.iou_threshold,
            max_detections: s.max_detections as usize,
            classes,
            ..NmsConfig::display()
        };
        nms.validate().map_err(|e| e.to_string())?;
        gst::info!(
            CAT,
            imp = self,
            "model {model}: {} classes, input {:?}, {backend} {precision}, batch {batch}",
            info.num_classes,
            info.input_hw
        );
        Ok(State {
            detector,
            names,
            nms,
            batch_size: batch,
            batch_timeout: (s.batch_timeout_us > 0)
                .then(|| Duration::from_micros(u64::from(s.batch_timeout_us))),
            deadline: None,
            interval: u64::from(s.interval.max(1)),
            unique_id: s.unique_id,
            info: None,
            pending: Vec::with_capacity(batch),
            frames: 0,
            images: Vec::new(),
            results: Vec::new(),
        })
    }

    /// Run the queued frames (a full batch or what is left), attach their detections and hand
    /// the buffers back in order.
    fn run_pending(&self, state: &mut State) -> Result<Vec<gst::Buffer>, gst::FlowError> {
        state.deadline = None;
        let mut pending = std::mem::take(&mut state.pending);
        let todo: Vec<usize> = (0..pending.len()).filter(|&i| pending[i].infer).collect();
        if !todo.is_empty() {
            let Some(info) = state.info.clone() else {
                gst::element_imp_error!(
                    self,
                    gst::CoreError::Negotiation,
                    ("a buffer arrived before the caps")
                );
                return Err(gst::FlowError::NotNegotiated);
            };
            if state.images.len() < todo.len() {
                state.images.resize_with(todo.len(), RgbImage::default);
            }
            for (k, &i) in todo.iter().enumerate() {
                let frame =
                    VideoFrameRef::from_buffer_ref_readable(pending[i].buffer.as_ref(), &info)
                        .map_err(|_| {
                            gst::element_imp_error!(
                                self,
                                gst::StreamError::Format,
                                (
                                    "a buffer is smaller than its caps say ({}x{} {})",
                                    info.width(),
                                    info.height(),
                                    info.format().to_str()
                                )
                            );
                            gst::FlowError::Error
                        })?;
                frame::to_rgb(&frame, &mut state.images[k])?;
            }
            let images: Vec<&RgbImage> = state.images[..todo.len()].iter().collect();
            state
                .detector
                .detect(&images, &state.nms, &mut state.results)
                .map_err(|e| {
                    gst::element_imp_error!(
                        self,
                        gst::LibraryError::Failed,
                        ("inference failed: {}", e)
                    );
                    gst::FlowError::Error
                })?;
            let size = (info.width(), info.height());
            for (k, &i) in todo.iter().enumerate() {
                let buffer = pending[i].buffer.make_mut();
                for (n, det) in state.results[k].iter().enumerate() {
                    let label = state
                        .names
                        .get(det.class_id)
                        .map_or("object", String::as_str);
                    detection::attach(buffer, det, label, n as u32, state.unique_id, size);
                }
            }
        }
        Ok(pending.drain(..).map(|p| p.buffer).collect())
    }

    fn push_all(&self, buffers: Vec<gst::Buffer>) -> Result<gst::FlowSuccess, gst::FlowError> {
        let mut last = Ok(gst::FlowSuccess::Ok);
        for b in buffers {
            last = self.srcpad.push(b);
            last?;
        }
        last
    }

    fn sink_chain(&self, buffer: gst::Buffer) -> Result<gst::FlowSuccess, gst::FlowError> {
        let _order = lock(&self.push_lock);
        let ready = {
            let mut guard = lock(&self.state);
            let Some(state) = guard.as_mut() else {
                return Err(gst::FlowError::Flushing);
            };
            let infer = state.frames % state.interval == 0;
            state.frames += 1;
            if !infer && state.pending.is_empty() {
                // Nothing queued ahead of a frame that is not inferred: it passes at once.
                drop(guard);
                return self.srcpad.push(buffer);
            }
            state.pending.push(Pending { buffer, infer });
            let queued = state.pending.iter().filter(|p| p.infer).count();
            if queued >= state.batch_size {
                self.run_pending(state)?
            } else {
                if state.deadline.is_none()
                    && let Some(t) = state.batch_timeout
                {
                    state.deadline = Some(Instant::now() + t);
                    self.wake.notify_all();
                }
                Vec::new()
            }
        };
        self.push_all(ready)
    }

    /// The batch-timeout thread: runs a partial batch once its deadline passes; ends when the
    /// element leaves READY (its state is dropped).
    fn timer_loop(element: glib::WeakRef<super::KestrelInfer>) {
        loop {
            let Some(obj) = element.upgrade() else { return };
            let imp = obj.imp();
            let guard = lock(&imp.state);
            let Some(state) = guard.as_ref() else { return };
            let now = Instant::now();
            match state.deadline {
                Some(due) if due <= now => {
                    drop(guard);
                    let _order = lock(&imp.push_lock);
                    let ready = {
                        let mut guard = lock(&imp.state);
                        match guard.as_mut() {
                            // Still due: the streaming thread did not fill the batch meanwhile.
                            Some(state) if state.deadline.is_some_and(|d| d <= Instant::now()) => {
                                imp.run_pending(state)
                            }
                            _ => Ok(Vec::new()),
                        }
                    };
                    if let Err(e) = ready.and_then(|r| imp.push_all(r)) {
                        gst::debug!(CAT, imp = imp, "timed-out batch: {e:?}");
                    }
                }
                due => {
                    // Sleep until the deadline, or a while when none is set (a new deadline or
                    // the element stopping wakes the thread earlier).
                    let wait = due.map_or(Duration::from_millis(200), |d| d - now);
                    let _ = imp.wake.wait_timeout(guard, wait);
                }
            }
        }
    }

    /// Run whatever is queued and push it (EOS, caps changes, other serialized events).
    fn drain(&self) -> Result<gst::FlowSuccess, gst::FlowError> {
        let _order = lock(&self.push_lock);
        let ready = {
            let mut guard = lock(&self.state);
            match guard.as_mut() {
                Some(state) if !state.pending.is_empty() => self.run_pending(state)?,
                _ => Vec::new(),
            }
        };
        self.push_all(ready)
    }

    fn sink_event(&self, pad: &gst::Pad, event: gst::Event) -> bool {
        use gst::EventView;
        match event.view() {
            EventView::FlushStop(_) => {
                if let Some(state) = lock(&self.state).as_mut() {
                    state.pending.clear();
                    state.deadline = None;
                }
            }
            EventView::Caps(c) => {
                // Frames queued under the old caps are run with them first.
                if self.drain().is_err() {
                    return false;
                }
                match VideoInfo::from_caps(c.caps()) {
                    Ok(info) => {
                        if let Some(state) = lock(&self.state).as_mut() {
                            state.info = Some(info);
                        }
                    }
                    Err(_) => {
                        gst::element_imp_error!(
                            self,
                            gst::CoreError::Negotiation,
                            ("caps {} are not raw video this element reads", c.caps())
                        );
                        return false;
                    }
                }
            }
            _ if event.is_serialized() && event.type_() != gst::EventType::FlushStop => {
                // EOS, segments, gaps, tags …: queued buffers go first, in order.
                if let Err(e) = self.drain() {
                    gst::debug!(CAT, imp = self, "drain before {:?}: {e:?}", event.type_());
                }
            }
            _ => {}
        }
        gst::Pad::event_default(pad, Some(&*self.obj()), event)
    }
}

#[glib::object_subclass]
impl ObjectSubclass for KestrelInfer {
    const NAME: &'static str = "GstKestrelInfer";
    type Type = super::KestrelInfer;
    type ParentType = gst::Element;

    fn with_class(klass: &Self::Class) -> Self {
        let sink = klass
            .pad_template("sink")
            .expect("the class has a sink template");
        let sinkpad = gst::Pad::builder_from_template(&sink)
            .chain_function(|_pad, parent, buffer| {
                KestrelInfer::catch_panic_pad_function(
                    parent,
                    || Err(gst::FlowError::Error),
                    |this| this.sink_chain(buffer),
                )
            })
            .event_function(|pad, parent, event| {
                KestrelInfer::catch_panic_pad_function(
                    parent,
                    || false,
                    |this| this.sink_event(pad, event),
                )
            })
            .flags(gst::PadFlags::PROXY_CAPS | gst::PadFlags::PROXY_ALLOCATION)
            .build();
        let src = klass
            .pad_template("src")
            .expect("the class has a src template");
        let srcpad = gst::Pad::builder_from_template(&src)
            .flags(gst::PadFlags::PROXY_CAPS | gst::PadFlags::PROXY_ALLOCATION)
            .build();
        Self {
            sinkpad,
            srcpad,
            settings: Mutex::new(Settings::default()),
            state: Mutex::new(None),
            push_lock: Mutex::new(()),
            wake: Condvar::new(),
            timer: Mutex::new(None),
        }
    }
}

impl ObjectImpl for KestrelInfer {
    fn properties() -> &'static [glib::ParamSpec] {
        static PROPERTIES: LazyLock<Vec<glib::ParamSpec>> = LazyLock::new(|| {
            vec![
                glib::ParamSpecString::builder("model")
                    .nick("Model")
                    .blurb("ONNX model or Kestrel engine file (read when the element goes to READY)")
                    .mutable_ready()
                    .build(),
                glib::ParamSpecEnum::builder_with_default("backend", BackendChoice::Cpu)
                    .nick("Backend")
                    .blurb("Engine backend")
                    .mutable_ready()
                    .build(),
                glib::ParamSpecEnum::builder_with_default("precision", PrecisionChoice::Fp32)
                    .nick("Precision")
                    .blurb("Engine precision")
                    .mutable_ready()
                    .build(),
                glib::ParamSpecUInt::builder("batch-size")
                    .nick("Batch size")
                    .blurb("Frames run as one batch (a partial batch runs at EOS and caps changes)")
                    .minimum(1)
                    .maximum(MAX_BATCH)
                    .default_value(DEFAULT_BATCH)
                    .mutable_ready()
                    .build(),
                glib::ParamSpecUInt::builder("batch-timeout")
                    .nick("Batch timeout")
                    .blurb("Microseconds a partial batch waits for more frames before it runs (0: until full)")
                    .minimum(0)
                    .maximum(10_000_000)
                    .default_value(0)
                    .mutable_ready()
                    .build(),
                glib::ParamSpecFloat::builder("conf-threshold")
                    .nick("Confidence threshold")
                    .blurb("Detections need a confidence above this")
                    .minimum(0.0)
                    .maximum(1.0)
                    .default_value(DEFAULT_CONF)
                    .mutable_ready()
                    .build(),
                glib::ParamSpecFloat::builder("iou-threshold")
                    .nick("IoU threshold")
                    .blurb("Non-maximum suppression: a box overlapping a better one of its class by more is dropped")
                    .minimum(0.0)
                    .maximum(1.0)
                    .default_value(DEFAULT_IOU)
                    .mutable_ready()
                    .build(),
                glib::ParamSpecUInt::builder("max-detections")
                    .nick("Maximum detections")
                    .blurb("Detections kept per frame")
                    .minimum(1)
                    .maximum(10_000)
                    .default_value(DEFAULT_MAX_DET)
                    .mutable_ready()
                    .build(),
                glib::ParamSpecUInt::builder("interval")
                    .nick("Interval")
                    .blurb("Infer every Nth frame; the others pass without detections")
                    .minimum(1)
                    .maximum(1_000)
                    .default_value(1)
                    .mutable_ready()
                    .build(),
                glib::ParamSpecString::builder("labels")
                    .nick("Labels")
                    .blurb("File with one class name per line (default: the model's names)")
                    .mutable_ready()
                    .build(),
                glib::ParamSpecUInt::builder("unique-id")
                    .nick("Unique id")
                    .blurb("Written into every detection, to tell several kestrelinfer apart")
                    .default_value(0)
                    .mutable_ready()
                    .build(),
                glib::ParamSpecString::builder("classes")
                    .nick("Classes")
                    .blurb("Comma-separated class indices to keep (default: all)")
                    .mutable_ready()
                    .build(),
            ]
        });
        PROPERTIES.as_ref()
    }

    fn set_property(&self, _id: usize, value: &glib::Value, pspec: &glib::ParamSpec) {
        let mut s = lock(&self.settings);
        // GObject checked each value's type and range against its ParamSpec.
        match pspec.name() {
            "model" => s.model = value.get().unwrap_or_default(),
            "backend" => s.backend = value.get().unwrap_or(BackendChoice::Cpu),
            "precision" => s.precision = value.get().unwrap_or(PrecisionChoice::Fp32),
            "batch-size" => s.batch_size = value.get().unwrap_or(DEFAULT_BATCH),
            "batch-timeout" => s.batch_timeout_us = value.get().unwrap_or(0),
            "conf-threshold" => s.conf_threshold = value.get().unwrap_or(DEFAULT_CONF),
            "iou-threshold" => s.iou_threshold = value.get().unwrap_or(DEFAULT_IOU),
            "max-detections" => s.max_detections = value.get().unwrap_or(DEFAULT_MAX_DET),
            "interval" => s.interval = value.get().unwrap_or(1),
            "labels" => s.labels = value.get().unwrap_or_default(),
            "unique-id" => s.unique_id = value.get().unwrap_or(0),
            "classes" => s.classes = value.get().unwrap_or_default(),
            other => gst::warning!(CAT, imp = self, "no property {other}"),
        }
    }

    fn property(&self, _id: usize, pspec: &glib::ParamSpec) -> glib::Value {
        let s = lock(&self.settings);
        match pspec.name() {
            "model" => s.model.to_value(),
            "backend" => s.backend.to_value(),
            "precision" => s.precision.to_value(),
            "batch-size" => s.batch_size.to_value(),
            "batch-timeout" => s.batch_timeout_us.to_value(),
            "conf-threshold" => s.conf_threshold.to_value(),
            "iou-threshold" => s.iou_threshold.to_value(),
            "max-detections" => s.max_detections.to_value(),
            "interval" => s.interval.to_value(),
            "labels" => s.labels.to_value(),
            "unique-id" => s.unique_id.to_value(),
            "classes" => s.classes.to_value(),
            _ => pspec.default_value().clone(),
        }
    }

    fn constructed(&self) {
        self.parent_constructed();
        let obj = self.obj();
        obj.add_pad(&self.sinkpad)
            .expect("a new element takes its sink pad");
        obj.add_pad(&self.srcpad)
            .expect("a new element takes its src pad");
    }
}

impl GstObjectImpl for KestrelInfer {}

impl ElementImpl for KestrelInfer {
    fn metadata() -> Option<&'static gst::subclass::ElementMetadata> {
        static META: LazyLock<gst::subclass::ElementMetadata> = LazyLock::new(|| {
            gst::subclass::ElementMetadata::new(
                "Kestrel detector",
                "Filter/Analyzer/Video",
                "Detects objects with a Kestrel engine (YOLOv9 / GELAN) and attaches one region \
                 of interest per detection",
                "Kestrel",
            )
        });
        Some(&*META)
    }

    fn pad_templates() -> &'static [gst::PadTemplate] {
        static TEMPLATES: LazyLock<Vec<gst::PadTemplate>> = LazyLock::new(|| {
            let caps = frame::caps();
            vec![
                gst::PadTemplate::new(
                    "src",
                    gst::PadDirection::Src,
                    gst::PadPresence::Always,
                    &caps,
                )
                .expect("valid src template"),
                gst::PadTemplate::new(
                    "sink",
                    gst::PadDirection::Sink,
                    gst::PadPresence::Always,
                    &caps,
                )
                .expect("valid sink template"),
            ]
        });
        TEMPLATES.as_ref()
    }

    fn change_state(
        &self,
        transition: gst::StateChange,
    ) -> Result<gst::StateChangeSuccess, gst::StateChangeError> {
        if transition == gst::StateChange::NullToReady {
            match self.start() {
                Ok(state) => {
                    *lock(&self.state) = Some(state);
                    let weak = self.obj().downgrade();
                    *lock(&self.timer) = Some(std::thread::spawn(move || Self::timer_loop(weak)));
                }
                Err(message) => {
                    gst::element_imp_error!(self, gst::LibraryError::Settings, ("{}", message));
                    return Err(gst::StateChangeError);
                }
            }
        }
        let result = self.parent_change_state(transition);
        match transition {
            gst::StateChange::PausedToReady => {
                if let Some(state) = lock(&self.state).as_mut() {
                    state.pending.clear();
                    state.deadline = None;
                    state.frames = 0;
                    state.info = None;
                }
            }
            gst::StateChange::ReadyToNull => {
                *lock(&self.state) = None;
                self.wake.notify_all();
                if let Some(timer) = lock(&self.timer).take() {
                    let _ = timer.join();
                }
            }
            _ => {}
        }
        result
    }
}
