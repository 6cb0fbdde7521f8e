//! The `kestrelinfer` element: settings, the engine built at the NULL → READY change, the batch
//! queue, and event handling.

use std::path::PathBuf;
use std::sync::{Arc, Condvar, LazyLock, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use gst::glib;
use gst::prelude::*;
use gst::subclass::prelude::*;
use gst_video::{VideoFrameExt, VideoFrameRef, VideoInfo};
use image::RgbImage;
use kestrel_runtime::engine::{Backend, BatchProfile, BuildOptions, Precision, open_engine};
use kestrel_runtime::masks::{Bitmap, Rle};
use kestrel_runtime::nms::NmsConfig;
use kestrel_runtime::{Detection, Detector};

use super::stats::{self, BatchStats, StreamOut};
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
/// Streams one element serves: `sink`/`src` (stream 0) and `sink_1` … `sink_255`.
const MAX_STREAMS: u32 = 256;

#[derive(Debug, Clone)]
struct Settings {
    model: Option<String>,
    backend: BackendChoice,
    precision: PrecisionChoice,
    /// The GPU of the cuda and tensorrt backends (CUDA device number).
    gpu_id: u32,
    batch_size: u32,
    batch_timeout_us: u32,
    conf_threshold: f32,
    iou_threshold: f32,
    max_detections: u32,
    interval: u32,
    labels: Option<String>,
    unique_id: u32,
    classes: Option<String>,
    stats_interval_ms: u32,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            model: None,
            backend: BackendChoice::Cpu,
            precision: PrecisionChoice::Fp32,
            gpu_id: 0,
            batch_size: DEFAULT_BATCH,
            batch_timeout_us: 0,
            conf_threshold: DEFAULT_CONF,
            iou_threshold: DEFAULT_IOU,
            max_detections: DEFAULT_MAX_DET,
            interval: 1,
            labels: None,
            unique_id: 0,
            classes: None,
            stats_interval_ms: 0,
        }
    }
}

/// A queued frame: the buffer, whether it is to be inferred (`interval` skips some), when it
/// arrived and the stream it leaves by.
struct Pending {
    buffer: gst::Buffer,
    infer: bool,
    arrived: Instant,
    stream: Arc<StreamOut>,
}

/// A stream's pads (stream 0: the always pads `sink` and `src`; N: the request pad `sink_N` and
/// the `src_N` made with it).
#[derive(Clone)]
struct StreamPads {
    index: u32,
    sink: gst::Pad,
    src: gst::Pad,
}

/// What a stream needs while the element runs.
struct StreamState {
    out: Arc<StreamOut>,
    info: Option<VideoInfo>,
    /// Frames seen since the start (for `interval`).
    frames: u64,
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
    /// Indexed by stream number (`None`: no such pad).
    streams: Vec<Option<StreamState>>,
    /// The frames of all streams, in arrival order.
    pending: Vec<Pending>,
    /// Reused per batch: which pending frames are inferred, their sizes (pixels), their
    /// detections.
    todo: Vec<usize>,
    sizes: Vec<(u32, u32)>,
    /// Segmentation models: RGB copies of the frames and each detection's mask.
    images: Vec<RgbImage>,
    masks: Vec<Vec<Bitmap>>,
    results: Vec<Vec<Detection>>,
    batch_stats: BatchStats,
    stats_interval: Option<Duration>,
    last_stats: Instant,
    element_name: String,
}

impl State {
    fn add_stream(&mut self, pads: &StreamPads) {
        let i = pads.index as usize;
        if self.streams.len() <= i {
            self.streams.resize_with(i + 1, || None);
        }
        self.streams[i] = Some(StreamState {
            out: Arc::new(StreamOut::new(
                pads.index,
                pads.src.clone(),
                &self.element_name,
            )),
            info: None,
            frames: 0,
        });
    }

    /// Drop the queued frames of `stream` (all streams: `None`), counting them as dropped.
    fn drop_pending(&mut self, stream: Option<u32>) {
        self.pending.retain(|p| {
            let hit = stream.is_none_or(|s| p.stream.index == s);
            if hit {
                p.stream.dropped(1);
            }
            !hit
        });
        if self.pending.is_empty() {
            self.deadline = None;
        }
    }
}

pub struct KestrelInfer {
    /// Stream 0's pads, always there.
    sinkpad: gst::Pad,
    srcpad: gst::Pad,
    /// Every stream's pads, stream 0 first.
    pads: Mutex<Vec<StreamPads>>,
    settings: Mutex<Settings>,
    state: Mutex<Option<State>>,
    /// The frames of a batch on their way out. Held from running a batch until its buffers are
    /// pushed, so the streaming threads and the batch-timeout thread keep the buffers in order.
    outbox: Mutex<Vec<Pending>>,
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
            device: s.gpu_id as usize,
        };
        let (engine, _) =
            open_engine(&path, &options, None).map_err(|e| format!("model {model}: {e}"))?;
        let mut detector = Detector::new(engine);
        // On a GPU engine, frames go to the GPU as they are: letterbox, inference and NMS there.
        detector.set_device_postprocessing(backend == Backend::Cuda);
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
        stats::describe();
        let element_name = self.obj().name().to_string();
        let mut state = State {
            detector,
            names,
            nms,
            batch_size: batch,
            batch_timeout: (s.batch_timeout_us > 0)
                .then(|| Duration::from_micros(u64::from(s.batch_timeout_us))),
            deadline: None,
            interval: u64::from(s.interval.max(1)),
            unique_id: s.unique_id,
            streams: Vec::new(),
            pending: Vec::with_capacity(batch),
            todo: Vec::with_capacity(batch),
            sizes: Vec::new(),
            images: Vec::new(),
            masks: Vec::new(),
            results: Vec::new(),
            batch_stats: BatchStats::new(&element_name),
            stats_interval: (s.stats_interval_ms > 0)
                .then(|| Duration::from_millis(u64::from(s.stats_interval_ms))),
            last_stats: Instant::now(),
            element_name,
        };
        for pads in lock(&self.pads).iter() {
            state.add_stream(pads);
        }
        Ok(state)
    }

    /// Run the queued frames (a full batch or what is left) and attach their detections; they
    /// move to `outbox` in arrival order. When the batch fails, its frames are dropped (and
    /// counted).
    fn run_pending(
        &self,
        state: &mut State,
        outbox: &mut Vec<Pending>,
    ) -> Result<(), gst::FlowError> {
        let result = self.run_batch(state, outbox);
        if result.is_err() {
            for p in outbox.drain(..) {
                p.stream.dropped(1);
            }
        }
        result
    }

    fn run_batch(
        &self,
        state: &mut State,
        outbox: &mut Vec<Pending>,
    ) -> Result<(), gst::FlowError> {
        state.deadline = None;
        // `append` keeps both vectors' capacity: no allocation after the first batches.
        let first = outbox.len();
        outbox.append(&mut state.pending);
        let State {
            detector,
            names,
            nms,
            batch_size,
            unique_id,
            streams,
            todo,
            sizes,
            images,
            masks,
            results,
            batch_stats,
            ..
        } = state;
        todo.clear();
        todo.extend((first..outbox.len()).filter(|&i| outbox[i].infer));
        if todo.is_empty() {
            return Ok(());
        }
        // The frames as they are: the detector letterboxes them on the GPU (cuda backend) or
        // converts them to RGB here (cpu backend).
        let mut mapped = Vec::with_capacity(todo.len());
        sizes.clear();
        for &i in todo.iter() {
            let p = &outbox[i];
            let info = streams
                .get(p.stream.index as usize)
                .and_then(Option::as_ref)
                .and_then(|s| s.info.as_ref());
            let Some(info) = info else {
                gst::element_imp_error!(
                    self,
                    gst::CoreError::Negotiation,
                    (
                        "a buffer of stream {} arrived before its caps",
                        p.stream.index
                    )
                );
                return Err(gst::FlowError::NotNegotiated);
            };
            let frame =
                VideoFrameRef::from_buffer_ref_readable(p.buffer.as_ref(), info).map_err(|_| {
                    gst::element_imp_error!(
                        self,
                        gst::StreamError::Format,
                        (
                            "a buffer of stream {} is smaller than its caps say ({}x{} {})",
                            p.stream.index,
                            info.width(),
                            info.height(),
                            info.format().to_str()
                        )
                    );
                    gst::FlowError::Error
                })?;
            sizes.push((frame.width(), frame.height()));
            mapped.push(frame);
        }
        let frames = mapped
            .iter()
            .map(frame::raw)
            .collect::<Result<Vec<_>, _>>()?;
        let inference_failed = |e: kestrel_runtime::Error| {
            gst::element_imp_error!(self, gst::LibraryError::Failed, ("inference failed: {}", e));
            gst::FlowError::Error
        };
        if detector.info().prototypes.is_some() {
            // Segmentation models: masks too, from RGB copies of the frames.
            if images.len() < frames.len() {
                images.resize_with(frames.len(), || RgbImage::new(1, 1));
            }
            for (f, img) in frames.iter().zip(images.iter_mut()) {
                f.to_rgb(img).map_err(inference_failed)?;
            }
            detector
                .detect_masks(&images[..frames.len()], nms, results, masks)
                .map_err(inference_failed)?;
        } else {
            masks.clear();
            detector
                .detect_frames(&frames, nms, results)
                .map_err(inference_failed)?;
        }
        drop(frames);
        drop(mapped);
        batch_stats.ran(todo.len(), *batch_size);
        for (k, &i) in todo.iter().enumerate() {
            let p = &mut outbox[i];
            let (w, h) = sizes[k];
            let buffer = p.buffer.make_mut();
            for (n, det) in results[k].iter().enumerate() {
                let label = names.get(det.class_id).map_or("object", String::as_str);
                let mask = masks.get(k).and_then(|m| m.get(n)).map(Rle::encode);
                detection::attach(
                    buffer,
                    det,
                    label,
                    n as u32,
                    *unique_id,
                    (w, h),
                    mask.as_ref(),
                );
            }
        }
        Ok(())
    }

    /// Push the frames of `outbox` out of their streams' src pads, in order. Returns the flow of
    /// `own` (the stream whose streaming thread calls); another stream's error is kept for its
    /// next buffer.
    fn push_all(
        &self,
        outbox: &mut Vec<Pending>,
        own: Option<u32>,
    ) -> Result<gst::FlowSuccess, gst::FlowError> {
        let mut result = Ok(gst::FlowSuccess::Ok);
        for p in outbox.drain(..) {
            let latency = p.arrived.elapsed();
            match p.stream.srcpad.push(p.buffer) {
                Ok(_) => p.stream.pushed(latency),
                Err(e) => {
                    p.stream.dropped(1);
                    if own == Some(p.stream.index) {
                        if result.is_ok() {
                            result = Err(e);
                        }
                    } else {
                        p.stream.set_flow_error(e);
                    }
                }
            }
        }
        self.post_stats();
        result
    }

    /// Post a `kestrel/stats` message per stream when `stats-interval` has passed.
    fn post_stats(&self) {
        let messages: Vec<gst::Structure> = {
            let mut guard = lock(&self.state);
            let Some(state) = guard.as_mut() else { return };
            let Some(every) = state.stats_interval else {
                return;
            };
            if state.last_stats.elapsed() < every {
                return;
            }
            state.last_stats = Instant::now();
            let fill = state.batch_stats.take_mean_fill();
            let batches = state.batch_stats.batches;
            state
                .streams
                .iter()
                .flatten()
                .map(|s| stats::message_structure(&s.out.snapshot(), batches, fill))
                .collect()
        };
        for s in messages {
            let _ = self
                .obj()
                .post_message(gst::message::Element::builder(s).src(&*self.obj()).build());
        }
    }

    fn sink_chain(
        &self,
        index: u32,
        buffer: gst::Buffer,
    ) -> Result<gst::FlowSuccess, gst::FlowError> {
        let mut outbox = lock(&self.outbox);
        {
            let mut guard = lock(&self.state);
            let Some(state) = guard.as_mut() else {
                return Err(gst::FlowError::Flushing);
            };
            let interval = state.interval;
            let Some(stream) = state
                .streams
                .get_mut(index as usize)
                .and_then(Option::as_mut)
            else {
                return Err(gst::FlowError::Flushing);
            };
            if let Some(e) = stream.out.take_flow_error() {
                return Err(e);
            }
            let infer = stream.frames % interval == 0;
            stream.frames += 1;
            stream.out.arrived(infer);
            let pending = Pending {
                buffer,
                infer,
                arrived: Instant::now(),
                stream: stream.out.clone(),
            };
            if !infer && state.pending.is_empty() {
                // Nothing queued ahead of a frame that is not inferred: it passes at once.
                outbox.push(pending);
            } else {
                state.pending.push(pending);
                let queued = state.pending.iter().filter(|p| p.infer).count();
                if queued >= state.batch_size {
                    self.run_pending(state, &mut outbox)?;
                } else if state.deadline.is_none()
                    && let Some(t) = state.batch_timeout
                {
                    state.deadline = Some(Instant::now() + t);
                    self.wake.notify_all();
                }
            }
        }
        self.push_all(&mut outbox, Some(index))
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
                    let mut outbox = lock(&imp.outbox);
                    let ran = {
                        let mut guard = lock(&imp.state);
                        match guard.as_mut() {
                            // Still due: the streaming threads did not fill the batch meanwhile.
                            Some(state) if state.deadline.is_some_and(|d| d <= Instant::now()) => {
                                imp.run_pending(state, &mut outbox)
                            }
                            _ => Ok(()),
                        }
                    };
                    if let Err(e) = ran.and_then(|()| imp.push_all(&mut outbox, None)) {
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

    /// Run whatever is queued and push it (EOS, caps changes, other serialized events, a
    /// released pad), on behalf of stream `own`.
    fn drain(&self, own: Option<u32>) -> Result<gst::FlowSuccess, gst::FlowError> {
        let mut outbox = lock(&self.outbox);
        let ran = {
            let mut guard = lock(&self.state);
            match guard.as_mut() {
                Some(state) if !state.pending.is_empty() => self.run_pending(state, &mut outbox),
                _ => Ok(()),
            }
        };
        ran?;
        self.push_all(&mut outbox, own)
    }

    fn sink_event(&self, index: u32, pad: &gst::Pad, event: gst::Event) -> bool {
        use gst::EventView;
        match event.view() {
            EventView::FlushStop(_) => {
                if let Some(state) = lock(&self.state).as_mut() {
                    state.drop_pending(Some(index));
                    if let Some(Some(s)) = state.streams.get(index as usize) {
                        s.out.take_flow_error();
                    }
                }
            }
            EventView::Caps(c) => {
                // Frames queued under the old caps are run with them first.
                if self.drain(Some(index)).is_err() {
                    return false;
                }
                match VideoInfo::from_caps(c.caps()) {
                    Ok(info) => {
                        if let Some(state) = lock(&self.state).as_mut()
                            && let Some(Some(s)) = state.streams.get_mut(index as usize)
                        {
                            s.info = Some(info);
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
                if let Err(e) = self.drain(Some(index)) {
                    gst::debug!(CAT, imp = self, "drain before {:?}: {e:?}", event.type_());
                }
            }
            _ => {}
        }
        // Forwarded to the stream's own src pad (the internal link).
        gst::Pad::event_default(pad, Some(&*self.obj()), event)
    }

    /// A pad's partner: `sink_N` ↔ `src_N` (`sink` ↔ `src`); events and queries go through it.
    fn internal_links(&self, pad: &gst::Pad) -> gst::Iterator<gst::Pad> {
        let partner = lock(&self.pads).iter().find_map(|p| {
            if &p.sink == pad {
                Some(p.src.clone())
            } else if &p.src == pad {
                Some(p.sink.clone())
            } else {
                None
            }
        });
        gst::Iterator::from_vec(partner.into_iter().collect())
    }

    /// The pad function giving a pad's partner (see [`Self::internal_links`]).
    fn partner_of(pad: &gst::Pad, parent: Option<&gst::Object>) -> gst::Iterator<gst::Pad> {
        Self::catch_panic_pad_function(
            parent,
            || gst::Iterator::from_vec(Vec::new()),
            |this| this.internal_links(pad),
        )
    }

    /// The pads of stream `index` from the templates `sink_templ` and `src_templ`, named
    /// `sink_name` and `src_name`.
    fn make_pads(
        index: u32,
        sink_templ: &gst::PadTemplate,
        src_templ: &gst::PadTemplate,
        names: Option<(&str, &str)>,
    ) -> StreamPads {
        let mut sink = gst::Pad::builder_from_template(sink_templ)
            .chain_function(move |_pad, parent, buffer| {
                KestrelInfer::catch_panic_pad_function(
                    parent,
                    || Err(gst::FlowError::Error),
                    |this| this.sink_chain(index, buffer),
                )
            })
            .event_function(move |pad, parent, event| {
                KestrelInfer::catch_panic_pad_function(
                    parent,
                    || false,
                    |this| this.sink_event(index, pad, event),
                )
            })
            .iterate_internal_links_function(Self::partner_of)
            .flags(gst::PadFlags::PROXY_CAPS | gst::PadFlags::PROXY_ALLOCATION);
        let mut src = gst::Pad::builder_from_template(src_templ)
            .iterate_internal_links_function(Self::partner_of)
            .flags(gst::PadFlags::PROXY_CAPS | gst::PadFlags::PROXY_ALLOCATION);
        if let Some((sink_name, src_name)) = names {
            sink = sink.name(sink_name);
            src = src.name(src_name);
        }
        StreamPads {
            index,
            sink: sink.build(),
            src: src.build(),
        }
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
        let src = klass
            .pad_template("src")
            .expect("the class has a src template");
        let pads = Self::make_pads(0, &sink, &src, None);
        Self {
            sinkpad: pads.sink.clone(),
            srcpad: pads.src.clone(),
            pads: Mutex::new(vec![pads]),
            settings: Mutex::new(Settings::default()),
            state: Mutex::new(None),
            outbox: Mutex::new(Vec::new()),
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
                glib::ParamSpecUInt::builder("gpu-id")
                    .nick("GPU")
                    .blurb("GPU the engine runs on (CUDA device number) with the cuda and tensorrt backends, as nvinfer's gpu-id")
                    .minimum(0)
                    .maximum(1023)
                    .default_value(0)
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
                glib::ParamSpecUInt::builder("stats-interval")
                    .nick("Stats interval")
                    .blurb("Milliseconds between kestrel/stats element messages, one per stream: frames, inferred, dropped, batches, latency-mean-ms, latency-max-ms, batch-fill (0: none)")
                    .minimum(0)
                    .maximum(3_600_000)
                    .default_value(0)
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
            "gpu-id" => s.gpu_id = value.get().unwrap_or(0),
            "batch-size" => s.batch_size = value.get().unwrap_or(DEFAULT_BATCH),
            "batch-timeout" => s.batch_timeout_us = value.get().unwrap_or(0),
            "conf-threshold" => s.conf_threshold = value.get().unwrap_or(DEFAULT_CONF),
            "iou-threshold" => s.iou_threshold = value.get().unwrap_or(DEFAULT_IOU),
            "max-detections" => s.max_detections = value.get().unwrap_or(DEFAULT_MAX_DET),
            "interval" => s.interval = value.get().unwrap_or(1),
            "labels" => s.labels = value.get().unwrap_or_default(),
            "unique-id" => s.unique_id = value.get().unwrap_or(0),
            "classes" => s.classes = value.get().unwrap_or_default(),
            "stats-interval" => s.stats_interval_ms = value.get().unwrap_or(0),
            other => gst::warning!(CAT, imp = self, "no property {other}"),
        }
    }

    fn property(&self, _id: usize, pspec: &glib::ParamSpec) -> glib::Value {
        let s = lock(&self.settings);
        match pspec.name() {
            "model" => s.model.to_value(),
            "backend" => s.backend.to_value(),
            "precision" => s.precision.to_value(),
            "gpu-id" => s.gpu_id.to_value(),
            "batch-size" => s.batch_size.to_value(),
            "batch-timeout" => s.batch_timeout_us.to_value(),
            "conf-threshold" => s.conf_threshold.to_value(),
            "iou-threshold" => s.iou_threshold.to_value(),
            "max-detections" => s.max_detections.to_value(),
            "interval" => s.interval.to_value(),
            "labels" => s.labels.to_value(),
            "unique-id" => s.unique_id.to_value(),
            "classes" => s.classes.to_value(),
            "stats-interval" => s.stats_interval_ms.to_value(),
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
            let template = |name, direction, presence| {
                gst::PadTemplate::new(name, direction, presence, &caps).expect("valid pad template")
            };
            vec![
                template("src", gst::PadDirection::Src, gst::PadPresence::Always),
                template("sink", gst::PadDirection::Sink, gst::PadPresence::Always),
                // More streams through the same engine: each requested sink_N brings its src_N.
                template(
                    "src_%u",
                    gst::PadDirection::Src,
                    gst::PadPresence::Sometimes,
                ),
                template(
                    "sink_%u",
                    gst::PadDirection::Sink,
                    gst::PadPresence::Request,
                ),
            ]
        });
        TEMPLATES.as_ref()
    }

    fn request_new_pad(
        &self,
        templ: &gst::PadTemplate,
        name: Option<&str>,
        _caps: Option<&gst::Caps>,
    ) -> Option<gst::Pad> {
        if templ.name_template() != "sink_%u" {
            return None;
        }
        let mut pads = lock(&self.pads);
        let index = match name.map(|n| n.strip_prefix("sink_").and_then(|i| i.parse::<u32>().ok()))
        {
            None => (1..MAX_STREAMS).find(|i| pads.iter().all(|p| p.index != *i)),
            Some(Some(i)) if (1..MAX_STREAMS).contains(&i) && pads.iter().all(|p| p.index != i) => {
                Some(i)
            }
            Some(_) => None,
        };
        let Some(index) = index else {
            gst::element_imp_warning!(
                self,
                gst::CoreError::Pad,
                (
                    "no pad {}: request sink_1 … sink_{} once each (sink/src are stream 0)",
                    name.unwrap_or("sink_%u"),
                    MAX_STREAMS - 1
                )
            );
            return None;
        };
        let src_templ = self.obj().element_class().pad_template("src_%u")?;
        let (sink_name, src_name) = (format!("sink_{index}"), format!("src_{index}"));
        let new = Self::make_pads(index, templ, &src_templ, Some((&sink_name, &src_name)));
        pads.push(new.clone());
        drop(pads);
        if let Some(state) = lock(&self.state).as_mut() {
            state.add_stream(&new);
        }
        let obj = self.obj();
        if obj.add_pad(&new.src).is_err() || obj.add_pad(&new.sink).is_err() {
            let _ = obj.remove_pad(&new.src);
            lock(&self.pads).retain(|p| p.index != index);
            return None;
        }
        Some(new.sink)
    }

    fn release_pad(&self, pad: &gst::Pad) {
        let Some(gone) = lock(&self.pads)
            .iter()
            .find(|p| &p.sink == pad && p.index != 0)
            .cloned()
        else {
            return;
        };
        // Its queued frames leave first.
        if let Err(e) = self.drain(None) {
            gst::debug!(
                CAT,
                imp = self,
                "drain before releasing {}: {e:?}",
                pad.name()
            );
        }
        if let Some(state) = lock(&self.state).as_mut() {
            state.drop_pending(Some(gone.index));
            if let Some(slot) = state.streams.get_mut(gone.index as usize) {
                *slot = None;
            }
        }
        lock(&self.pads).retain(|p| p.index != gone.index);
        let obj = self.obj();
        for p in [&gone.src, &gone.sink] {
            let _ = p.set_active(false);
            let _ = obj.remove_pad(p);
        }
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
                    state.drop_pending(None);
                    for s in state.streams.iter_mut().flatten() {
                        s.frames = 0;
                        s.info = None;
                        s.out.take_flow_error();
                    }
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
