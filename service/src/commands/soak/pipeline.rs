//! `kestrel soak pipeline`: kestrelinfer fed a long synthetic RGB stream through a test harness
//! (GStreamer's `GstHarness`: our thread is the upstream element), with the frame size, and so the
//! caps, changed every few hundred frames and a flush (flush-start, flush-stop, new segment) every
//! few hundred frames; every output buffer is pulled. This process's resident memory is sampled.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use gst_check::Harness;
use serde::Serialize;

use super::{Common, Sampler, finish};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The model: an ONNX file or a Kestrel engine file.
    #[arg(long, short = 'm', default_value = "models/gelan-t-shapes.onnx")]
    model: std::path::PathBuf,
    #[command(flatten)]
    common: Common,
    /// Stop after this many frames (the run also stops at --seconds).
    #[arg(long, default_value_t = 100_000)]
    frames: u64,
    /// Backend: cpu or cuda.
    #[arg(long, default_value = "cpu")]
    backend: String,
    /// Frames per inference batch (kestrelinfer's batch-size).
    #[arg(long, default_value_t = 1)]
    batch_size: u32,
    /// Frames between caps changes (the frame size cycles through three sizes).
    #[arg(long, default_value_t = 500)]
    caps_every: u64,
    /// Frames between flushes.
    #[arg(long, default_value_t = 700)]
    flush_every: u64,
}

#[derive(Debug, Default, Serialize)]
struct Counts {
    frames_in: u64,
    frames_out: u64,
    /// Frames dropped by flushes (a flush discards a partly filled batch).
    frames_flushed: u64,
    detections: u64,
    caps_changes: u64,
    flushes: u64,
}

/// Frame sizes the stream cycles through (widths a multiple of 4: RGB rows need no padding).
const SIZES: [(u32, u32); 3] = [(320, 240), (640, 360), (240, 320)];

fn caps(w: u32, h: u32) -> gst::Caps {
    gst::Caps::builder("video/x-raw")
        .field("format", "RGB")
        .field("width", w as i32)
        .field("height", h as i32)
        .field("framerate", gst::Fraction::new(25, 1))
        .build()
}

pub fn run(a: Args) -> Result<()> {
    a.common.check()?;
    crate::util::check_model_file(&a.model)?;
    if a.frames == 0 || a.caps_every == 0 || a.flush_every == 0 || a.batch_size == 0 {
        bail!("--frames, --caps-every, --flush-every and --batch-size must be at least 1");
    }
    gst::init().context("initialising GStreamer")?;
    gstkestrel::register_static().context("registering Kestrel's GStreamer elements")?;
    // The scenes, one per size, rendered once.
    let frames: Vec<Vec<u8>> = SIZES
        .iter()
        .enumerate()
        .map(|(i, &(w, h))| {
            kestrel_runtime::synth::render_scene(kestrel_runtime::synth::image_seed(17, i), w, h)
                .0
                .into_raw()
        })
        .collect();
    let mut h = Harness::new_parse(&format!(
        "kestrelinfer model=\"{}\" backend={} batch-size={}",
        a.model.display(),
        a.backend,
        a.batch_size
    ));
    let sampler = Sampler::start(
        std::process::id(),
        Duration::from_millis(a.common.sample_ms),
        None,
    );
    let (start, limit) = (Instant::now(), Duration::from_secs(a.common.seconds));
    let mut c = Counts::default();
    let mut failures = Vec::new();
    let mut size = usize::MAX;
    let progress = crate::util::progress(a.frames, "frames");
    let frame_ns = 40_000_000u64;
    while c.frames_in < a.frames && start.elapsed() < limit {
        let n = c.frames_in;
        let want = ((n / a.caps_every) % SIZES.len() as u64) as usize;
        if want != size {
            size = want;
            h.set_src_caps(caps(SIZES[size].0, SIZES[size].1));
            c.caps_changes += 1;
        }
        if n > 0 && n % a.flush_every == 0 {
            h.push_event(gst::event::FlushStart::new());
            h.push_event(gst::event::FlushStop::new(true));
            let mut segment = gst::FormattedSegment::<gst::ClockTime>::new();
            segment.set_start(gst::ClockTime::from_nseconds(n * frame_ns));
            segment.set_time(gst::ClockTime::from_nseconds(n * frame_ns));
            h.push_event(gst::event::Segment::new(&segment));
            c.flushes += 1;
            drain(&mut h, &mut c);
        }
        let mut buffer = gst::Buffer::from_slice(frames[size].clone());
        if let Some(b) = buffer.get_mut() {
            b.set_pts(gst::ClockTime::from_nseconds(n * frame_ns));
            b.set_duration(gst::ClockTime::from_nseconds(frame_ns));
        }
        if let Err(e) = h.push(buffer) {
            failures.push(format!("frame {n}: kestrelinfer refused it: {e:?}"));
            break;
        }
        c.frames_in += 1;
        drain(&mut h, &mut c);
        if c.frames_in % 100 == 0 {
            progress.set_position(c.frames_in);
        }
    }
    // End of stream: the last partial batch comes out.
    if failures.is_empty() {
        h.push_event(gst::event::Eos::new());
        drain(&mut h, &mut c);
    }
    progress.finish_and_clear();
    let elapsed = start.elapsed();
    let samples = sampler.finish()?;
    // Every frame comes out once, except those a flush discarded with their partial batch.
    c.frames_flushed = c.frames_in.saturating_sub(c.frames_out);
    let most_flushed = c.flushes * u64::from(a.batch_size.saturating_sub(1));
    if failures.is_empty() && c.frames_flushed > most_flushed {
        failures.push(format!(
            "{} of {} frames did not come out; flushes can discard at most {most_flushed} \
             (batch size {} − 1 per flush)",
            c.frames_flushed, c.frames_in, a.batch_size
        ));
    }
    finish(
        "pipeline",
        &a.common,
        format!("{} backend", a.backend),
        elapsed,
        c,
        failures,
        samples,
    )
}

/// Pull every buffer the element has output so far.
fn drain(h: &mut Harness, c: &mut Counts) {
    while let Some(buffer) = h.try_pull() {
        c.frames_out += 1;
        c.detections += gstkestrel::detection::read(&buffer).len() as u64;
    }
}
