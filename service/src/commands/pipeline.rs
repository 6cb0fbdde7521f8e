//! `kestrel pipeline`: a GStreamer pipeline through `kestrelinfer` and `kestreloverlay` for
//! people who do not write `gst-launch-1.0` lines: numbered images, a video file or a test source
//! in; annotated PNG frames or an annotated video, and one JSON line of detections per frame out;
//! throughput printed, and the element's metrics in Prometheus's text format (`metrics.prom`).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result, bail};
use gst::prelude::*;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The model: an ONNX file or a Kestrel engine file.
    #[arg(long, short = 'm')]
    model: PathBuf,
    /// Numbered PNG frames, as a printf pattern starting at 0 (`clip/%06d.png`), or a video file
    /// any installed GStreamer demuxer and decoder reads (`decodebin`); without it a GStreamer
    /// test pattern (`--test-frames`) is the input.
    #[arg(long)]
    input: Option<String>,
    /// Frames of the test pattern when there is no --input.
    #[arg(long, default_value_t = 60)]
    test_frames: u32,
    /// Output folder: annotated frames (`%05d.png`, or the `--video` file), `detections.jsonl`
    /// and `metrics.prom`.
    #[arg(long, short = 'o')]
    output: PathBuf,
    /// Write the annotated frames as one video in the output folder instead of PNGs: a name
    /// ending in .avi or .mkv (Motion JPEG) or .webm (VP8), encoders of GStreamer's good plugins.
    #[arg(long)]
    video: Option<String>,
    /// Backend: cpu or cuda.
    #[arg(long, default_value = "cpu")]
    backend: String,
    /// Precision: fp32, fp16, int8 or best.
    #[arg(long, default_value = "fp32")]
    precision: String,
    /// Frames per inference batch.
    #[arg(long, default_value_t = 1)]
    batch_size: u32,
    /// Confidence threshold.
    #[arg(long = "conf", default_value_t = 0.25)]
    conf: f32,
    /// NMS IoU threshold.
    #[arg(long = "iou", default_value_t = 0.45)]
    iou: f32,
}

/// `printf`-style frame `index` of `pattern` (only the `%0Nd` / `%d` forms multifilesrc takes).
fn frame_path(pattern: &str, index: usize) -> Option<String> {
    let start = pattern.find('%')?;
    let rest = &pattern[start + 1..];
    let end = rest.find('d')?;
    let spec = &rest[..end];
    let width: usize = if spec.is_empty() {
        0
    } else {
        spec.trim_start_matches('0').parse().ok()?
    };
    Some(format!(
        "{}{index:0width$}{}",
        &pattern[..start],
        &rest[end + 1..]
    ))
}

pub fn run(a: Args) -> Result<()> {
    if !["cpu", "cuda", "tensorrt"].contains(&a.backend.as_str()) {
        bail!("--backend {}: give cpu or cuda", a.backend);
    }
    if !["fp32", "fp16", "int8", "best"].contains(&a.precision.as_str()) {
        bail!("--precision {}: give fp32, fp16, int8 or best", a.precision);
    }
    if !(1..=64).contains(&a.batch_size) {
        bail!("--batch-size {}: give 1 to 64", a.batch_size);
    }
    for (name, v) in [("--conf", a.conf), ("--iou", a.iou)] {
        if !(0.0..=1.0).contains(&v) {
            bail!("{name} {v}: give a value from 0 to 1");
        }
    }
    if !a.model.is_file() {
        bail!(
            "model {} does not exist: give an ONNX model or a Kestrel engine file",
            a.model.display()
        );
    }
    let numbered = a.input.as_deref().is_some_and(|i| i.contains('%'));
    match &a.input {
        Some(pattern) if numbered => {
            let first = frame_path(pattern, 0).with_context(|| {
                format!("--input {pattern}: expected a numbered pattern such as clip/%06d.png")
            })?;
            if !Path::new(&first).is_file() {
                bail!(
                    "--input {pattern}: the first frame {first} does not exist (numbering starts \
                     at 0)"
                );
            }
        }
        Some(file) if !Path::new(file).is_file() => {
            bail!("--input {file} does not exist: give a video file or numbered frames (%06d.png)")
        }
        _ => {}
    }
    let encoder = match a.video.as_deref() {
        None => "pngenc ! multifilesink name=sink",
        Some(v) if v.contains('/') => {
            bail!("--video {v}: give a file name; it is written in the output folder")
        }
        Some(v) if v.ends_with(".avi") => "jpegenc ! avimux ! filesink name=sink",
        Some(v) if v.ends_with(".mkv") => "jpegenc ! matroskamux ! filesink name=sink",
        Some(v) if v.ends_with(".webm") => "vp8enc deadline=1 ! webmmux ! filesink name=sink",
        Some(v) => bail!("--video {v}: give a name ending in .avi, .mkv or .webm"),
    };
    // kestrelinfer's metrics reach this recorder (installed before the element starts).
    let metrics = metrics_exporter_prometheus::PrometheusBuilder::new()
        .set_buckets_for_metric(
            metrics_exporter_prometheus::Matcher::Full(gstkestrel::stats::LATENCY.into()),
            &[0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0],
        )
        .and_then(|b| {
            b.set_buckets_for_metric(
                metrics_exporter_prometheus::Matcher::Full(gstkestrel::stats::BATCH_FILL.into()),
                &[0.125, 0.25, 0.5, 0.75, 1.0],
            )
        })
        .context("configuring the metrics")?
        .install_recorder()
        .context("installing the metrics recorder")?;
    gst::init().context("initialising GStreamer")?;
    gstkestrel::register_static().context("registering Kestrel's GStreamer elements")?;
    std::fs::create_dir_all(&a.output)
        .with_context(|| format!("creating {}", a.output.display()))?;

    let source = match &a.input {
        Some(_) if numbered => {
            "multifilesrc name=src index=0 caps=image/png,framerate=25/1 ! pngdec".to_string()
        }
        Some(_) => "filesrc name=src ! decodebin".to_string(),
        None => format!(
            "videotestsrc num-buffers={} ! video/x-raw,width=640,height=480",
            a.test_frames
        ),
    };
    let description = format!(
        "{source} ! videoconvert ! kestrelinfer name=infer ! kestreloverlay ! videoconvert \
         ! {encoder}"
    );
    let pipeline = gst::parse::launch(&description)
        .context(
            "building the pipeline (a missing element needs GStreamer's base or good plugins: \
             apt install gstreamer1.0-plugins-base gstreamer1.0-plugins-good)",
        )?
        .downcast::<gst::Pipeline>()
        .map_err(|_| anyhow::anyhow!("the pipeline description did not make a pipeline"))?;
    let by_name = |name: &str| {
        pipeline
            .by_name(name)
            .with_context(|| format!("the pipeline has no element {name}"))
    };
    if let Some(pattern) = &a.input {
        by_name("src")?.set_property("location", pattern);
    }
    let infer = by_name("infer")?;
    infer.set_property("model", a.model.to_string_lossy().as_ref());
    infer.set_property_from_str("backend", &a.backend);
    infer.set_property_from_str("precision", &a.precision);
    infer.set_property("batch-size", a.batch_size);
    infer.set_property("conf-threshold", a.conf);
    infer.set_property("iou-threshold", a.iou);
    let written = a.output.join(a.video.as_deref().unwrap_or("%05d.png"));
    by_name("sink")?.set_property("location", written.to_string_lossy().as_ref());

    // One JSON line per frame, written from a probe on kestrelinfer's output.
    let jsonl_path = a.output.join("detections.jsonl");
    let jsonl = std::io::BufWriter::new(
        std::fs::File::create(&jsonl_path)
            .with_context(|| format!("creating {}", jsonl_path.display()))?,
    );
    let counts = Arc::new(Mutex::new((0u64, 0u64, jsonl)));
    let probe_counts = Arc::clone(&counts);
    let src = infer
        .static_pad("src")
        .context("kestrelinfer has no src pad")?;
    src.add_probe(gst::PadProbeType::BUFFER, move |_, info| {
        if let Some(buffer) = info.buffer() {
            let dets = gstkestrel::detection::read(buffer);
            if let Ok(mut c) = probe_counts.lock() {
                let frame = c.0;
                let line = serde_json::json!({
                    "frame": frame,
                    "pts_ns": buffer.pts().map(|t| t.nseconds()),
                    "detections": dets.iter().map(|d| serde_json::json!({
                        "class_id": d.class_id,
                        "label": d.label,
                        "confidence": d.confidence,
                        "box_xyxy": [d.bbox.x1, d.bbox.y1, d.bbox.x2, d.bbox.y2],
                    })).collect::<Vec<_>>(),
                });
                c.0 += 1;
                c.1 += dets.len() as u64;
                let _ = writeln!(c.2, "{line}");
            }
        }
        gst::PadProbeReturn::Ok
    });

    let started = std::time::Instant::now();
    pipeline
        .set_state(gst::State::Playing)
        .map_err(|_| pipeline_error(&pipeline))?;
    let bus = pipeline.bus().context("the pipeline has no bus")?;
    let mut failure = None;
    for msg in bus.iter_timed(gst::ClockTime::NONE) {
        match msg.view() {
            gst::MessageView::Eos(..) => break,
            gst::MessageView::Error(err) => {
                failure = Some(format!(
                    "{} ({})",
                    err.error(),
                    err.debug().map(|d| d.to_string()).unwrap_or_default()
                ));
                break;
            }
            _ => {}
        }
    }
    let _ = pipeline.set_state(gst::State::Null);
    let elapsed = started.elapsed().as_secs_f64();
    if let Some(message) = failure {
        bail!("the pipeline stopped: {message}");
    }
    let mut c = counts
        .lock()
        .map_err(|_| anyhow::anyhow!("the detection writer panicked"))?;
    c.2.flush()
        .with_context(|| format!("writing {}", jsonl_path.display()))?;
    let metrics_path = a.output.join("metrics.prom");
    std::fs::write(&metrics_path, metrics.render())
        .with_context(|| format!("writing {}", metrics_path.display()))?;
    println!(
        "{} frames, {} detections in {elapsed:.2} s: {:.1} frames/s (decode, inference, overlay \
         and encoding); {}, detections.jsonl and metrics.prom in {}",
        c.0,
        c.1,
        c.0 as f64 / elapsed.max(1e-9),
        a.video.as_deref().unwrap_or("annotated frames"),
        a.output.display()
    );
    Ok(())
}

/// The first error message on the bus after a failed state change, or a generic one.
fn pipeline_error(pipeline: &gst::Pipeline) -> anyhow::Error {
    let detail = pipeline.bus().and_then(|bus| {
        bus.timed_pop_filtered(gst::ClockTime::from_seconds(1), &[gst::MessageType::Error])
    });
    match detail.as_ref().map(|m| m.view()) {
        Some(gst::MessageView::Error(err)) => {
            anyhow::anyhow!("the pipeline did not start: {}", err.error())
        }
        _ => anyhow::anyhow!("the pipeline did not start"),
    }
}

#[cfg(test)]
mod tests {
    use super::frame_path;

    #[test]
    fn frame_patterns_number_like_multifilesrc() {
        assert_eq!(
            frame_path("clip/%06d.png", 7).as_deref(),
            Some("clip/000007.png")
        );
        assert_eq!(frame_path("f%d.png", 12).as_deref(), Some("f12.png"));
        assert_eq!(frame_path("no-pattern.png", 0), None);
    }
}
