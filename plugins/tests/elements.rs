//! `kestrelinfer` and `kestreloverlay` in GStreamer's check harness and in `gst-launch-1.0`, with
//! the bundled demo model on the CPU backend.
#![allow(clippy::unwrap_used)]

use std::path::PathBuf;
use std::process::Command;
use std::sync::Once;

use gst::prelude::*;
use gst_check::Harness;
use gstkestrel::detection::{self, FrameDetection};
use kestrel_runtime::engine::{BatchProfile, BuildOptions, build_engine};
use kestrel_runtime::nms::NmsConfig;
use kestrel_runtime::synth::{image_seed, render_scene};
use kestrel_runtime::{Detection, Detector};

fn init() {
    static INIT: Once = Once::new();
    INIT.call_once(|| {
        gst::init().unwrap();
        gstkestrel::register_static().unwrap();
    });
}

fn model() -> PathBuf {
    kestrel_tests::workspace_root().join("models/gelan-t-shapes.onnx")
}

/// A synthetic scene of an odd size (rows of RGB are then padded in GStreamer buffers).
fn scene(seed: u64) -> image::RgbImage {
    let (img, _) = render_scene(image_seed(seed, 0), 333, 250);
    img
}

/// An RGB buffer of `img` laid out as GStreamer expects (rows padded to 4 bytes).
fn rgb_buffer(img: &image::RgbImage, pts: u64) -> gst::Buffer {
    let (w, h) = img.dimensions();
    let info = gst_video::VideoInfo::builder(gst_video::VideoFormat::Rgb, w, h)
        .build()
        .unwrap();
    let stride = info.stride()[0] as usize;
    let mut data = vec![0u8; info.size()];
    for y in 0..h as usize {
        let row = &img.as_raw()[y * w as usize * 3..(y + 1) * w as usize * 3];
        data[y * stride..y * stride + row.len()].copy_from_slice(row);
    }
    let mut buffer = gst::Buffer::from_mut_slice(data);
    buffer
        .get_mut()
        .unwrap()
        .set_pts(gst::ClockTime::from_mseconds(pts * 40));
    buffer
}

fn rgb_caps(img: &image::RgbImage) -> gst::Caps {
    gst_video::VideoCapsBuilder::new()
        .format(gst_video::VideoFormat::Rgb)
        .width(img.width() as i32)
        .height(img.height() as i32)
        .framerate(gst::Fraction::new(25, 1))
        .build()
}

/// What the runtime's CPU detector finds on `img` with the element's default settings.
fn reference(img: &image::RgbImage) -> Vec<Detection> {
    let options = BuildOptions {
        profile: BatchProfile {
            min: 1,
            opt: 1,
            max: 1,
        },
        ..Default::default()
    };
    let mut detector = Detector::new(build_engine(&model(), &options).unwrap());
    let mut out = Vec::new();
    detector
        .detect(&[img], &NmsConfig::display(), &mut out)
        .unwrap();
    out.remove(0)
}

fn iou(a: &kestrel_runtime::BoxXyxy, b: &kestrel_runtime::BoxXyxy) -> f32 {
    let iw = (a.x2.min(b.x2) - a.x1.max(b.x1)).max(0.0);
    let ih = (a.y2.min(b.y2) - a.y1.max(b.y1)).max(0.0);
    let inter = iw * ih;
    inter / (a.area() + b.area() - inter)
}

#[test]
fn rgb_frames_get_the_runtimes_detections_as_regions() {
    init();
    let img = scene(11);
    let want = reference(&img);
    assert!(
        !want.is_empty(),
        "the demo model finds something in the scene"
    );
    let mut h = Harness::new_parse(&format!("kestrelinfer model={}", model().display()));
    h.set_src_caps(rgb_caps(&img));
    h.push(rgb_buffer(&img, 0)).unwrap();
    let out = h.pull().unwrap();
    // The pixels pass through untouched.
    let map = out.map_readable().unwrap();
    assert_eq!(
        map.as_slice(),
        rgb_buffer(&img, 0).map_readable().unwrap().as_slice()
    );
    let got = detection::read(&out);
    assert_eq!(got.len(), want.len());
    let names = [
        "circle",
        "rectangle",
        "triangle",
        "hexagon",
        "star",
        "cross",
    ];
    for (n, (g, w)) in got.iter().zip(&want).enumerate() {
        assert_eq!(g.class_id as usize, w.class_id);
        assert_eq!(g.label, names[w.class_id]);
        assert_eq!(g.instance_id, n as u32);
        assert!((g.confidence - f64::from(w.score)).abs() < 1e-6);
        assert_eq!(
            (g.bbox.x1, g.bbox.y1, g.bbox.x2, g.bbox.y2),
            (w.bbox.x1, w.bbox.y1, w.bbox.x2, w.bbox.y2)
        );
        assert_eq!(g.rect, detection::rect_of(&w.bbox, 333, 250));
    }
    // Standard consumers see regions of interest typed by the label.
    let roi = out
        .iter_meta::<gst_video::VideoRegionOfInterestMeta>()
        .next()
        .unwrap();
    assert_eq!(roi.roi_type(), names[want[0].class_id]);
}

/// The strongest detections of two runs agree (same class, boxes overlapping by IoU > 0.8).
fn agree(a: &[FrameDetection], b: &[FrameDetection]) {
    let strong = |v: &[FrameDetection]| -> Vec<FrameDetection> {
        v.iter().filter(|d| d.confidence > 0.5).cloned().collect()
    };
    let (a, b) = (strong(a), strong(b));
    assert!(!a.is_empty());
    for d in &a {
        assert!(
            b.iter()
                .any(|e| e.class_id == d.class_id && iou(&e.bbox, &d.bbox) > 0.8),
            "{d:?} not found in {b:?}"
        );
    }
}

#[test]
fn every_format_negotiates_and_finds_the_same_objects() {
    init();
    let img = scene(12);
    let mut rgb = Harness::new_parse(&format!("kestrelinfer model={}", model().display()));
    rgb.set_src_caps(rgb_caps(&img));
    rgb.push(rgb_buffer(&img, 0)).unwrap();
    let base = detection::read(&rgb.pull().unwrap());
    for format in ["BGR", "RGBA", "BGRx", "NV12", "I420"] {
        let mut h = Harness::new_parse(&format!(
            "videoconvert ! video/x-raw,format={format} ! kestrelinfer model={}",
            model().display()
        ));
        h.set_src_caps(rgb_caps(&img));
        h.push(rgb_buffer(&img, 0)).unwrap();
        let out = h.pull().unwrap();
        let caps = h.sinkpad().unwrap().current_caps().unwrap();
        let info = gst_video::VideoInfo::from_caps(&caps).unwrap();
        assert_eq!(info.format().to_str(), format);
        assert_eq!((info.width(), info.height()), (333, 250));
        agree(&base, &detection::read(&out));
    }
}

#[test]
fn frames_are_batched_by_size_and_eos_drains_the_rest() {
    init();
    let img = scene(13);
    let mut h = Harness::new_parse(&format!(
        "kestrelinfer model={} batch-size=3",
        model().display()
    ));
    h.set_src_caps(rgb_caps(&img));
    h.play();
    for i in 0..2 {
        h.push(rgb_buffer(&img, i)).unwrap();
    }
    assert_eq!(h.buffers_in_queue(), 0, "two frames wait for the third");
    h.push(rgb_buffer(&img, 2)).unwrap();
    assert_eq!(h.buffers_in_queue(), 3);
    for i in 0..3 {
        let b = h.pull().unwrap();
        assert_eq!(
            b.pts(),
            Some(gst::ClockTime::from_mseconds(i * 40)),
            "order kept"
        );
        assert!(!detection::read(&b).is_empty());
    }
    h.push(rgb_buffer(&img, 3)).unwrap();
    assert_eq!(h.buffers_in_queue(), 0);
    assert!(h.push_event(gst::event::Eos::new()));
    assert_eq!(h.buffers_in_queue(), 1, "EOS runs the partial batch");
    let b = h.pull().unwrap();
    assert_eq!(b.pts(), Some(gst::ClockTime::from_mseconds(120)));
    assert!(!detection::read(&b).is_empty());
}

#[test]
fn a_partial_batch_runs_when_its_timeout_expires() {
    init();
    let img = scene(16);
    // Without a timeout a lone frame waits for the batch to fill.
    let mut waiting = Harness::new_parse(&format!(
        "kestrelinfer model={} batch-size=4",
        model().display()
    ));
    waiting.set_src_caps(rgb_caps(&img));
    waiting.play();
    waiting.push(rgb_buffer(&img, 0)).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(600));
    assert_eq!(waiting.buffers_in_queue(), 0);

    // With 150 ms, it runs on its own after that time; frames pushed later keep their order.
    let mut h = Harness::new_parse(&format!(
        "kestrelinfer model={} batch-size=4 batch-timeout=150000",
        model().display()
    ));
    h.set_src_caps(rgb_caps(&img));
    h.play();
    let pushed = std::time::Instant::now();
    h.push(rgb_buffer(&img, 0)).unwrap();
    h.push(rgb_buffer(&img, 1)).unwrap();
    let first = h.pull().unwrap();
    assert!(pushed.elapsed() >= std::time::Duration::from_millis(150));
    assert_eq!(first.pts(), Some(gst::ClockTime::from_mseconds(0)));
    assert!(!detection::read(&first).is_empty());
    let second = h.pull().unwrap();
    assert_eq!(second.pts(), Some(gst::ClockTime::from_mseconds(40)));
    h.push(rgb_buffer(&img, 2)).unwrap();
    let third = h.pull().unwrap();
    assert_eq!(third.pts(), Some(gst::ClockTime::from_mseconds(80)));
    assert!(!detection::read(&third).is_empty());
}

#[test]
fn interval_and_class_filter_apply() {
    init();
    let img = scene(14);
    let want = reference(&img);
    let first = want[0].class_id;
    let mut h = Harness::new_parse(&format!(
        "kestrelinfer model={} interval=2 classes={first}",
        model().display()
    ));
    h.set_src_caps(rgb_caps(&img));
    for i in 0..4 {
        h.push(rgb_buffer(&img, i)).unwrap();
    }
    let counts: Vec<usize> = (0..4)
        .map(|_| detection::read(&h.pull().unwrap()).len())
        .collect();
    let of_class = want.iter().filter(|d| d.class_id == first).count();
    assert_eq!(counts, vec![of_class, 0, of_class, 0]);
}

#[test]
fn a_missing_model_fails_the_state_change_with_the_reason() {
    init();
    let element = gst::ElementFactory::make("kestrelinfer")
        .property("model", "/nonexistent/model.onnx")
        .build()
        .unwrap();
    let pipeline = gst::Pipeline::new();
    pipeline.add(&element).unwrap();
    assert!(pipeline.set_state(gst::State::Ready).is_err());
    let bus = pipeline.bus().unwrap();
    let msg = bus
        .timed_pop_filtered(gst::ClockTime::from_seconds(5), &[gst::MessageType::Error])
        .unwrap();
    let gst::MessageView::Error(err) = msg.view() else {
        unreachable!()
    };
    let text = err.error().to_string();
    assert!(
        text.contains("/nonexistent/model.onnx") && text.contains("does not exist"),
        "{text}"
    );
    let _ = pipeline.set_state(gst::State::Null);

    // No model at all, and an out-of-range class filter, are refused the same way.
    for (props, expect) in [
        (vec![], "no model"),
        (
            vec![
                ("model", model().display().to_string()),
                ("classes", "0,99".into()),
            ],
            "not a class index",
        ),
        // A GPU for the cpu backend: the engine says it runs on the CPU.
        (
            vec![
                ("model", model().display().to_string()),
                ("gpu-id", "1".into()),
            ],
            "cpu backend runs on the CPU",
        ),
    ] {
        let mut b = gst::ElementFactory::make("kestrelinfer");
        for (k, v) in &props {
            b = b.property_from_str(k, v);
        }
        let element = b.build().unwrap();
        let pipeline = gst::Pipeline::new();
        pipeline.add(&element).unwrap();
        assert!(pipeline.set_state(gst::State::Ready).is_err());
        let msg = pipeline
            .bus()
            .unwrap()
            .timed_pop_filtered(gst::ClockTime::from_seconds(5), &[gst::MessageType::Error])
            .unwrap();
        let gst::MessageView::Error(err) = msg.view() else {
            unreachable!()
        };
        assert!(err.error().to_string().contains(expect), "{}", err.error());
        let _ = pipeline.set_state(gst::State::Null);
    }
}

#[test]
fn properties_round_trip() {
    init();
    let e = gst::ElementFactory::make("kestrelinfer")
        .property("model", "m.onnx")
        .property("batch-size", 8u32)
        .property("batch-timeout", 40_000u32)
        .property("conf-threshold", 0.5f32)
        .property("iou-threshold", 0.6f32)
        .property("max-detections", 50u32)
        .property("interval", 3u32)
        .property("labels", "l.txt")
        .property("unique-id", 7u32)
        .property("classes", "1,2")
        .property("stats-interval", 250u32)
        .property("gpu-id", 1u32)
        .property_from_str("backend", "cuda")
        .property_from_str("precision", "fp16")
        .build()
        .unwrap();
    assert_eq!(
        e.property::<Option<String>>("model").as_deref(),
        Some("m.onnx")
    );
    assert_eq!(e.property::<u32>("batch-size"), 8);
    assert_eq!(e.property::<u32>("batch-timeout"), 40_000);
    assert_eq!(e.property::<f32>("conf-threshold"), 0.5);
    assert_eq!(e.property::<f32>("iou-threshold"), 0.6);
    assert_eq!(e.property::<u32>("max-detections"), 50);
    assert_eq!(e.property::<u32>("interval"), 3);
    assert_eq!(
        e.property::<Option<String>>("labels").as_deref(),
        Some("l.txt")
    );
    assert_eq!(e.property::<u32>("unique-id"), 7);
    assert_eq!(
        e.property::<Option<String>>("classes").as_deref(),
        Some("1,2")
    );
    assert_eq!(e.property::<u32>("stats-interval"), 250);
    assert_eq!(e.property::<u32>("gpu-id"), 1);
    let backend = e.property_value("backend");
    let (_, v) = gst::glib::EnumValue::from_value(&backend).unwrap();
    assert_eq!(v.nick(), "cuda");
    let o = gst::ElementFactory::make("kestreloverlay")
        .property("line-width", 5u32)
        .property("font-scale", 2.0f64)
        .build()
        .unwrap();
    assert_eq!(o.property::<u32>("line-width"), 5);
    assert_eq!(o.property::<f64>("font-scale"), 2.0);
}

#[test]
fn the_overlay_draws_the_boxes_in_every_format() {
    init();
    let img = scene(15);
    let want = reference(&img);
    for format in ["RGB", "BGR", "RGBA", "BGRx", "NV12", "I420"] {
        let mut plain = Harness::new_parse(&format!(
            "videoconvert ! video/x-raw,format={format} ! kestrelinfer model={}",
            model().display()
        ));
        plain.set_src_caps(rgb_caps(&img));
        plain.push(rgb_buffer(&img, 0)).unwrap();
        let before = plain.pull().unwrap();
        let mut drawn = Harness::new_parse(&format!(
            "videoconvert ! video/x-raw,format={format} ! kestrelinfer model={} ! kestreloverlay line-width=3",
            model().display()
        ));
        drawn.set_src_caps(rgb_caps(&img));
        drawn.push(rgb_buffer(&img, 0)).unwrap();
        let after = drawn.pull().unwrap();
        let (a, b) = (
            before.map_readable().unwrap(),
            after.map_readable().unwrap(),
        );
        assert_eq!(a.len(), b.len());
        let changed = a.iter().zip(b.iter()).filter(|(x, y)| x != y).count();
        // At least the outlines of the boxes (3 pixels wide) changed.
        let d = &want[0];
        let perimeter = 2.0 * ((d.bbox.x2 - d.bbox.x1) + (d.bbox.y2 - d.bbox.y1));
        assert!(
            changed as f32 > perimeter,
            "{format}: {changed} bytes changed"
        );
        // The metadata stays for later elements.
        assert_eq!(detection::read(&after).len(), want.len());
    }
}

/// The folder holding libgstkestrel.so (the test binary lives in its deps/ folder).
fn plugin_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    exe.parent().unwrap().parent().unwrap().to_path_buf()
}

#[test]
fn gst_launch_runs_the_elements_on_odd_sized_i420_and_gst_inspect_lists_the_properties() {
    let dir = plugin_dir();
    assert!(
        dir.join("libgstkestrel.so").exists(),
        "libgstkestrel.so not next to the tests in {}: build it first with \
         `cargo build --workspace --all-targets` (scripts/test.sh does)",
        dir.display()
    );
    let out_dir = std::env::temp_dir().join(format!("kestrel-gst-launch-{}", std::process::id()));
    std::fs::create_dir_all(&out_dir).unwrap();
    let pipeline = format!(
        "videotestsrc num-buffers=30 ! video/x-raw,format=I420,width=1283,height=721 \
         ! kestrelinfer model={} ! kestreloverlay ! videoconvert ! pngenc \
         ! multifilesink location={}/%05d.png",
        model().display(),
        out_dir.display()
    );
    let out = Command::new("gst-launch-1.0")
        .args(pipeline.split_whitespace())
        .env("GST_PLUGIN_PATH", &dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "gst-launch-1.0 failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let pngs = std::fs::read_dir(&out_dir).unwrap().count();
    assert_eq!(pngs, 30);
    let first = image::open(out_dir.join("00000.png")).unwrap();
    assert_eq!((first.width(), first.height()), (1283, 721));
    let _ = std::fs::remove_dir_all(&out_dir);

    let inspect = Command::new("gst-inspect-1.0")
        .arg("kestrelinfer")
        .env("GST_PLUGIN_PATH", &dir)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&inspect.stdout);
    assert!(inspect.status.success(), "{text}");
    for prop in [
        "model",
        "backend",
        "precision",
        "gpu-id",
        "batch-size",
        "batch-timeout",
        "conf-threshold",
        "iou-threshold",
        "max-detections",
        "interval",
        "labels",
        "unique-id",
        "classes",
        "stats-interval",
    ] {
        assert!(
            text.contains(&format!("  {prop} ")),
            "gst-inspect lacks {prop}:\n{text}"
        );
    }
}

/// An RGB frame of `img` at size `w`×`h` (a crop of a larger scene), for a second stream.
fn scene_sized(seed: u64, w: u32, h: u32) -> image::RgbImage {
    let (img, _) = render_scene(image_seed(seed, 0), w, h);
    img
}

/// The Prometheus recorder of this test process (installed once; every test's elements record
/// into it, told apart by the `element` label).
fn prometheus() -> &'static metrics_exporter_prometheus::PrometheusHandle {
    static HANDLE: std::sync::OnceLock<metrics_exporter_prometheus::PrometheusHandle> =
        std::sync::OnceLock::new();
    HANDLE.get_or_init(|| {
        metrics_exporter_prometheus::PrometheusBuilder::new()
            .install_recorder()
            .unwrap()
    })
}

/// The value of the Prometheus sample `name{labels}` in `text` (labels in the exporter's order).
fn sample(text: &str, name: &str, labels: &str) -> Option<f64> {
    let prefix = format!("{name}{{{labels}}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .and_then(|v| v.trim().parse().ok())
}

#[test]
fn two_streams_share_the_batches_and_keep_their_order_and_their_own_detections() {
    init();
    let metrics = prometheus();
    let a = scene(21);
    let b = scene_sized(22, 301, 207);
    let (want_a, want_b) = (reference(&a), reference(&b));
    assert!(!want_a.is_empty() && !want_b.is_empty());
    let element = gst::ElementFactory::make("kestrelinfer")
        .name("two-streams")
        .property("model", model())
        .property("batch-size", 2u32)
        .property("stats-interval", 1u32)
        .build()
        .unwrap();
    let bus = gst::Bus::new();
    element.set_bus(Some(&bus));
    let mut h0 = Harness::with_element(&element, Some("sink"), Some("src"));
    let mut h1 = Harness::with_element(&element, Some("sink_1"), Some("src_1"));
    assert!(element.static_pad("src_1").is_some(), "sink_1 brings src_1");
    h0.set_src_caps(rgb_caps(&a));
    h1.set_src_caps(rgb_caps(&b));
    h0.play();
    h1.play();
    // Batches of two fill from both streams: a frame waits until the other stream's arrives.
    for i in 0..3 {
        h0.push(rgb_buffer(&a, i)).unwrap();
        assert_eq!(h0.buffers_in_queue(), 0, "frame {i} of stream 0 waits");
        h1.push(rgb_buffer(&b, i)).unwrap();
        assert_eq!((h0.buffers_in_queue(), h1.buffers_in_queue()), (1, 1));
        for (h, img, want) in [(&mut h0, &a, &want_a), (&mut h1, &b, &want_b)] {
            let out = h.pull().unwrap();
            assert_eq!(out.pts(), Some(gst::ClockTime::from_mseconds(i * 40)));
            assert_eq!(
                out.size(),
                rgb_buffer(img, 0).size(),
                "the stream's own frame"
            );
            let got = detection::read(&out);
            assert_eq!(got.len(), want.len());
            for (g, w) in got.iter().zip(want.iter()) {
                assert_eq!(g.class_id as usize, w.class_id);
                assert!(
                    (g.bbox.x1 - w.bbox.x1).abs() < 1e-3 && (g.bbox.y2 - w.bbox.y2).abs() < 1e-3
                );
            }
        }
    }
    // Two frames of stream 1 in a row fill a batch on their own, in order.
    h1.push(rgb_buffer(&b, 3)).unwrap();
    h1.push(rgb_buffer(&b, 4)).unwrap();
    assert_eq!(
        h1.pull().unwrap().pts(),
        Some(gst::ClockTime::from_mseconds(120))
    );
    assert_eq!(
        h1.pull().unwrap().pts(),
        Some(gst::ClockTime::from_mseconds(160))
    );
    // EOS on stream 0 drains its waiting frame out of its own pad only.
    h0.push(rgb_buffer(&a, 3)).unwrap();
    assert!(h0.push_event(gst::event::Eos::new()));
    assert_eq!(
        h0.pull().unwrap().pts(),
        Some(gst::ClockTime::from_mseconds(120))
    );
    assert_eq!(h1.buffers_in_queue(), 0);
    assert!(
        std::iter::from_fn(|| h0.try_pull_event()).any(|e| e.type_() == gst::EventType::Eos),
        "EOS went out of src"
    );
    assert!(
        !std::iter::from_fn(|| h1.try_pull_event()).any(|e| e.type_() == gst::EventType::Eos),
        "stream 1 is not at EOS"
    );

    // Stats messages, one per stream, and the metrics.
    let mut seen = std::collections::HashMap::new();
    while let Some(msg) = bus.pop_filtered(&[gst::MessageType::Element]) {
        let s = msg.structure().unwrap();
        if s.name() == gstkestrel::stats::STATS_MESSAGE {
            seen.insert(s.get::<u32>("stream").unwrap(), s.to_owned());
        }
    }
    let (s0, s1) = (&seen[&0], &seen[&1]);
    assert_eq!(s0.get::<u64>("frames").unwrap(), 4);
    assert_eq!(s1.get::<u64>("frames").unwrap(), 5);
    assert_eq!(s1.get::<u64>("dropped").unwrap(), 0);
    assert!(s0.get::<u64>("batches").unwrap() >= 5);
    assert!(s0.get::<f64>("latency-max-ms").unwrap() > 0.0);
    let fill = s0.get::<f64>("batch-fill").unwrap();
    assert!(fill > 0.0 && fill <= 1.0, "{fill}");
    let text = metrics.render();
    let labels = |stream: u32| format!("element=\"two-streams\",stream=\"{stream}\"");
    assert_eq!(
        sample(&text, gstkestrel::stats::FRAMES, &labels(0)),
        Some(4.0),
        "{text}"
    );
    assert_eq!(
        sample(&text, gstkestrel::stats::FRAMES, &labels(1)),
        Some(5.0)
    );
    assert_eq!(
        sample(&text, gstkestrel::stats::INFERRED, &labels(1)),
        Some(5.0)
    );
    assert_eq!(
        sample(&text, gstkestrel::stats::BATCHES, "element=\"two-streams\""),
        Some(5.0),
        "3 mixed batches, 1 of stream 1, the drained one"
    );
    assert!(
        text.contains(&format!(
            "{}{{element=\"two-streams\",stream=\"1\",quantile=",
            gstkestrel::stats::LATENCY
        )),
        "{text}"
    );

    // A released pad takes its src pad with it.
    let sink_1 = element.static_pad("sink_1").unwrap();
    drop(h1);
    element.release_request_pad(&sink_1);
    assert!(element.static_pad("src_1").is_none());
}

#[test]
fn a_flush_drops_the_queued_frames_and_counts_them() {
    init();
    let metrics = prometheus();
    let img = scene(23);
    let element = gst::ElementFactory::make("kestrelinfer")
        .name("flushed")
        .property("model", model())
        .property("batch-size", 4u32)
        .build()
        .unwrap();
    let mut h = Harness::with_element(&element, Some("sink"), Some("src"));
    h.set_src_caps(rgb_caps(&img));
    h.play();
    h.push(rgb_buffer(&img, 0)).unwrap();
    h.push(rgb_buffer(&img, 1)).unwrap();
    assert!(h.push_event(gst::event::FlushStart::new()));
    assert!(h.push_event(gst::event::FlushStop::new(true)));
    assert!(
        h.push_event(gst::event::Segment::new(&gst::FormattedSegment::<
            gst::ClockTime,
        >::new()))
    );
    assert!(h.push_event(gst::event::Eos::new()));
    assert_eq!(h.buffers_in_queue(), 0, "nothing queued survives the flush");
    let text = metrics.render();
    assert_eq!(
        sample(
            &text,
            gstkestrel::stats::DROPPED,
            "element=\"flushed\",stream=\"0\""
        ),
        Some(2.0),
        "{text}"
    );
}

#[test]
fn the_overlay_leaves_nothing_of_the_previous_frame() {
    init();
    let (a, b) = (scene(31), scene(32));
    let launch = format!("kestrelinfer model={} ! kestreloverlay", model().display());
    // a then b through one overlay, b alone through a fresh one: b comes out the same.
    let mut both = Harness::new_parse(&launch);
    both.set_src_caps(rgb_caps(&a));
    both.push(rgb_buffer(&a, 0)).unwrap();
    let _ = both.pull().unwrap();
    both.push(rgb_buffer(&b, 1)).unwrap();
    let after_a = both.pull().unwrap();
    let mut fresh = Harness::new_parse(&launch);
    fresh.set_src_caps(rgb_caps(&b));
    fresh.push(rgb_buffer(&b, 1)).unwrap();
    let alone = fresh.pull().unwrap();
    assert!(
        after_a.map_readable().unwrap().as_slice() == alone.map_readable().unwrap().as_slice(),
        "boxes of the first frame stayed on the second"
    );
}

/// A segmentation model: each region carries its instance mask (the runtime's masks for the
/// frame, as COCO RLE), and the overlay paints the masks.
#[test]
fn segmentation_masks_travel_on_the_regions_and_the_overlay_paints_them() {
    use kestrel_exporter::{ExportOptions, ModelConfig, WeightSource, export, onnx};
    use kestrel_runtime::masks::Rle;
    init();
    let dir = kestrel_tests::scratch_dir("element-seg");
    let path = dir.join("seg.onnx");
    let cfg = ModelConfig::new("gelan-t-seg", 3, 96).unwrap();
    let model = export(
        &cfg,
        &mut WeightSource::Random { seed: 2 },
        &ExportOptions::dynamic(3),
    )
    .unwrap();
    onnx::write_model(&model, &path).unwrap();
    let img = scene(5);
    let nms = NmsConfig {
        conf_threshold: 0.001,
        max_detections: 4,
        ..NmsConfig::display()
    };
    // The runtime's detections and masks for the frame.
    let options = BuildOptions {
        profile: BatchProfile {
            min: 1,
            opt: 1,
            max: 1,
        },
        ..Default::default()
    };
    let mut detector = Detector::new(build_engine(&path, &options).unwrap());
    let (mut want, mut masks) = (Vec::new(), Vec::new());
    detector
        .detect_masks(&[&img], &nms, &mut want, &mut masks)
        .unwrap();
    assert!(!want[0].is_empty());
    let mut h = Harness::new_parse(&format!(
        "kestrelinfer model={} conf-threshold=0.001 max-detections=4 ! kestreloverlay",
        path.display()
    ));
    h.set_src_caps(rgb_caps(&img));
    h.push(rgb_buffer(&img, 0)).unwrap();
    let out = h.pull().unwrap();
    let got = detection::read(&out);
    assert_eq!(got.len(), want[0].len());
    for (g, m) in got.iter().zip(&masks[0]) {
        let rle = g.mask.as_ref().expect("a mask on the region");
        assert_eq!(rle, &Rle::encode(m));
        assert_eq!((rle.width, rle.height), (333, 250));
    }
    // The overlay changed pixels inside the masks.
    let map = out.map_readable().unwrap();
    let before = rgb_buffer(&img, 0);
    let before = before.map_readable().unwrap();
    let stride = map.len() / 250;
    let m = &masks[0][0];
    let painted = (0..m.data.len())
        .filter(|&i| m.data[i] != 0)
        .filter(|&i| {
            let (x, y) = (i % 333, i / 333);
            map[y * stride + x * 3..y * stride + x * 3 + 3]
                != before[y * stride + x * 3..y * stride + x * 3 + 3]
        })
        .count();
    assert!(
        painted * 2 > m.area(),
        "{painted} of {} mask pixels painted",
        m.area()
    );
}
