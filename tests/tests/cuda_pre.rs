//! GPU letterbox (`cuda::pre`) against the CPU reference (`Frame::to_rgb` then `Letterboxer`):
//! every input format, odd sizes and pitches, one launch per batch of different sizes (GPU
//! machine), and a clear error where there is no GPU.

use kestrel_exporter::weights::SplitMix64 as Rng;
use kestrel_runtime::cuda::pre::{
    DeviceFrame, DeviceFrameMemory, GpuLetterboxer, PinnedFrameMemory,
};
use kestrel_runtime::frame::{Frame, PixelFormat, YuvMatrix};
use kestrel_runtime::letterbox::{InputLayout, InputTensor, InputType, Letterboxer};

/// Owned planes of a random frame with `pad` bytes of pitch beyond each row.
struct Owned {
    format: PixelFormat,
    width: usize,
    height: usize,
    planes: [Vec<u8>; 3],
    strides: [usize; 3],
    yuv: YuvMatrix,
}

impl Owned {
    fn random(
        rng: &mut Rng,
        format: PixelFormat,
        width: usize,
        height: usize,
        pad: usize,
        yuv: YuvMatrix,
    ) -> Self {
        let mut planes: [Vec<u8>; 3] = Default::default();
        let mut strides = [0; 3];
        for i in 0..format.planes() {
            strides[i] = format.row_bytes(i, width) + pad;
            let len = format.rows(i, height) * strides[i];
            // Smooth-ish content (neighbours correlate) with random noise on top.
            planes[i] = (0..len)
                .map(|k| ((k % strides[i]) as u8).wrapping_mul(3) ^ ((rng.next_u64() as u8) & 0x3f))
                .collect();
        }
        Self {
            format,
            width,
            height,
            planes,
            strides,
            yuv,
        }
    }

    fn frame(&self) -> Frame<'_> {
        Frame {
            format: self.format,
            width: self.width,
            height: self.height,
            planes: [&self.planes[0], &self.planes[1], &self.planes[2]],
            strides: self.strides,
            yuv: self.yuv,
        }
    }
}

/// Copies of `owned`'s planes in pinned memory, and where each plane lies there.
fn pinned_copy(owned: &[Owned]) -> (PinnedFrameMemory, Vec<[std::ops::Range<usize>; 3]>) {
    let bytes: usize = owned
        .iter()
        .flat_map(|o| o.planes.iter().map(Vec::len))
        .sum();
    let mut pinned = PinnedFrameMemory::new(0, bytes).expect("pinned memory");
    let (mut at, mut ranges) = (0, Vec::new());
    for o in owned {
        let mut r = [0..0, 0..0, 0..0];
        for (i, p) in o.planes.iter().enumerate() {
            pinned.as_mut_slice()[at..at + p.len()].copy_from_slice(p);
            r[i] = at..at + p.len();
            at += p.len();
        }
        ranges.push(r);
    }
    (pinned, ranges)
}

impl Owned {
    /// This frame with its planes read from `memory` at `ranges` (see [`pinned_copy`]).
    fn frame_in<'a>(&self, memory: &'a [u8], ranges: &[std::ops::Range<usize>; 3]) -> Frame<'a> {
        Frame {
            format: self.format,
            width: self.width,
            height: self.height,
            planes: [
                &memory[ranges[0].clone()],
                &memory[ranges[1].clone()],
                &memory[ranges[2].clone()],
            ],
            strides: self.strides,
            yuv: self.yuv,
        }
    }
}

fn cpu_reference(frames: &[Frame], dst: u32) -> Vec<f32> {
    let plane = 3 * (dst * dst) as usize;
    let mut out = vec![0f32; frames.len() * plane];
    let mut rgb = image::RgbImage::new(1, 1);
    let mut letterboxer = Letterboxer::new();
    for (k, f) in frames.iter().enumerate() {
        f.to_rgb(&mut rgb).expect("to RGB");
        letterboxer
            .run(&rgb, dst, dst, &mut out[k * plane..(k + 1) * plane])
            .expect("letterbox");
    }
    out
}

const FORMATS: [PixelFormat; 6] = [
    PixelFormat::Rgb,
    PixelFormat::Bgr,
    PixelFormat::Rgba,
    PixelFormat::Bgrx,
    PixelFormat::Nv12,
    PixelFormat::I420,
];

#[test]
fn without_a_gpu_the_error_says_so() {
    if kestrel_runtime::cuda::unavailable_reason().is_none() {
        return;
    }
    let err = GpuLetterboxer::new(0)
        .err()
        .expect("no GPU here")
        .to_string();
    assert!(err.contains("cuda"), "{err}");
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn gpu_letterbox_equals_the_cpu_reference_for_every_format() {
    let mut rng = Rng::new(3);
    let mut gpu = GpuLetterboxer::new(0).expect("GPU letterbox");
    let (mut out, mut placements) = (Vec::new(), Vec::new());
    // Odd sizes and pitches, tall and wide, down- and up-scaled, full and studio range.
    let sizes = [
        (1921, 1079, 3),
        (640, 640, 0),
        (17, 999, 5),
        (333, 101, 1),
        (5, 3, 7),
    ];
    for format in FORMATS {
        for yuv in [
            YuvMatrix::BT601,
            YuvMatrix {
                full_range: true,
                ..YuvMatrix::BT709
            },
        ] {
            let owned: Vec<Owned> = sizes
                .iter()
                .map(|&(w, h, pad)| Owned::random(&mut rng, format, w, h, pad, yuv))
                .collect();
            let frames: Vec<Frame> = owned.iter().map(Owned::frame).collect();
            // One launch for the whole batch of different sizes.
            gpu.run(&frames, 640, 640, &mut out, &mut placements)
                .expect("GPU letterbox");
            let cpu = cpu_reference(&frames, 640);
            let worst = out
                .iter()
                .zip(&cpu)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            println!("{format:?} {yuv:?}: max |GPU - CPU| {:.3e} (of 1)", worst);
            assert!(worst <= 1.0 / 255.0, "{format:?}: {worst}");
            assert_eq!(worst, 0.0, "{format:?}: not bit-identical ({worst})");
            assert_eq!(placements.len(), frames.len());
        }
    }
    // Every input layout and element type, against the CPU's float32 encoded the same way.
    let owned: Vec<Owned> = sizes
        .iter()
        .map(|&(w, h, pad)| Owned::random(&mut rng, PixelFormat::I420, w, h, pad, YuvMatrix::BT601))
        .collect();
    let frames: Vec<Frame> = owned.iter().map(Owned::frame).collect();
    let cpu = cpu_reference(&frames, 640);
    let (mut bytes, mut expected) = (Vec::new(), Vec::new());
    for layout in [InputLayout::Nchw, InputLayout::Nhwc] {
        for dtype in [
            InputType::F32,
            InputType::F16,
            InputType::Int8 { scale: 1.0 / 127.0 },
            InputType::Int8 { scale: 0.0031 },
        ] {
            let tensor = InputTensor { layout, dtype };
            gpu.run_as(&frames, 640, 640, tensor, &mut bytes, &mut placements)
                .expect("GPU letterbox");
            tensor.encode(&cpu, 640, 640, &mut expected).expect("CPU");
            assert!(
                bytes == expected,
                "{tensor:?} differs from the CPU reference"
            );
        }
    }
    // Frames in pinned memory take the direct path (no staging); mixed with pageable ones.
    let owned: Vec<Owned> = sizes
        .iter()
        .map(|&(w, h, pad)| Owned::random(&mut rng, PixelFormat::Nv12, w, h, pad, YuvMatrix::BT709))
        .collect();
    let (pinned, ranges) = pinned_copy(&owned);
    let frames: Vec<Frame> = owned
        .iter()
        .zip(&ranges)
        .enumerate()
        .map(|(k, (o, r))| {
            if k % 2 == 0 {
                o.frame_in(pinned.as_slice(), r)
            } else {
                o.frame()
            }
        })
        .collect();
    gpu.run(&frames, 640, 640, &mut out, &mut placements)
        .expect("GPU letterbox of pinned frames");
    assert_eq!(out, cpu_reference(&frames, 640), "pinned frames differ");
    // Frames already in device memory, every format, odd sizes and pitches.
    let mut dev_out = Vec::new();
    let dev = gpu
        .device_output(sizes.len(), 640, 640)
        .expect("device output");
    for format in FORMATS {
        let owned: Vec<Owned> = sizes
            .iter()
            .map(|&(w, h, pad)| Owned::random(&mut rng, format, w, h, pad, YuvMatrix::BT709))
            .collect();
        let bytes: usize = owned
            .iter()
            .flat_map(|o| o.planes.iter().map(Vec::len))
            .sum();
        let mut memory = DeviceFrameMemory::new(0, bytes).expect("device memory");
        let mut at = 0;
        let device_frames: Vec<DeviceFrame> = owned
            .iter()
            .map(|o| {
                let mut planes = [0; 3];
                for (i, p) in o.planes.iter().enumerate().take(format.planes()) {
                    memory.write(at, p).expect("write");
                    planes[i] = memory.address(at);
                    at += p.len();
                }
                DeviceFrame {
                    format,
                    width: o.width,
                    height: o.height,
                    planes,
                    strides: o.strides,
                    yuv: o.yuv,
                }
            })
            .collect();
        let frames: Vec<Frame> = owned.iter().map(Owned::frame).collect();
        gpu.run(&frames, 640, 640, &mut dev_out, &mut placements)
            .expect("host frames");
        assert_eq!(
            dev_out,
            cpu_reference(&frames, 640),
            "{format:?} host frames"
        );
        // The device frames again (the host run overwrote the buffer), then their result.
        let mut via_device = Vec::new();
        gpu.run_device_frames(
            &device_frames,
            640,
            640,
            InputTensor::NCHW_F32,
            dev,
            &mut placements,
        )
        .expect("device frames");
        gpu.download_output(sizes.len(), 640, 640, &mut via_device)
            .expect("download");
        assert_eq!(via_device, dev_out, "{format:?} device frames");
        // A plane short of its allocation, and a host address, are named.
        let mut short = device_frames[0];
        short.planes[0] = memory.address(bytes - 10);
        let err = gpu
            .run_device_frames(
                &[short],
                64,
                64,
                InputTensor::NCHW_F32,
                dev,
                &mut placements,
            )
            .expect_err("short plane")
            .to_string();
        assert!(err.contains("plane 0") && err.contains("needs"), "{err}");
        let mut host = device_frames[0];
        host.planes[0] = owned[0].planes[0].as_ptr() as u64;
        let err = gpu
            .run_device_frames(&[host], 64, 64, InputTensor::NCHW_F32, dev, &mut placements)
            .expect_err("host address")
            .to_string();
        assert!(err.contains("not device memory"), "{err}");
    }
    // A malformed frame is named.
    let bad = Owned::random(&mut rng, PixelFormat::I420, 9, 9, 0, YuvMatrix::BT601);
    let mut f = bad.frame();
    f.planes[2] = &bad.planes[2][..3];
    let err = gpu
        .run(&[bad.frame(), f], 64, 64, &mut out, &mut placements)
        .expect_err("short plane")
        .to_string();
    assert!(err.contains("frame 1") && err.contains("plane 2"), "{err}");
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn gpu_letterbox_time_for_8_frames_of_1080p() {
    // Measured, not asserted: frames from host memory (upload included), input back to the host
    // excluded (run_device writes where the engine reads).
    let mut rng = Rng::new(9);
    let mut gpu = GpuLetterboxer::new(0).expect("GPU letterbox");
    let mut placements = Vec::new();
    let mut out = Vec::new();
    for format in [PixelFormat::Rgb, PixelFormat::Nv12] {
        let owned: Vec<Owned> = (0..8)
            .map(|_| Owned::random(&mut rng, format, 1920, 1080, 0, YuvMatrix::BT709))
            .collect();
        let frames: Vec<Frame> = owned.iter().map(Owned::frame).collect();
        gpu.run(&frames, 640, 640, &mut out, &mut placements)
            .expect("warm-up");
        let reps = 20;
        let t = std::time::Instant::now();
        for _ in 0..reps {
            gpu.run(&frames, 640, 640, &mut out, &mut placements)
                .expect("run");
        }
        let gpu_ms = t.elapsed().as_secs_f64() * 1e3 / reps as f64;
        let t = std::time::Instant::now();
        let _ = cpu_reference(&frames, 640);
        let cpu_ms = t.elapsed().as_secs_f64() * 1e3;
        println!(
            "{format:?} 8 x 1920x1080 -> 8 x 3 x 640 x 640: GPU {gpu_ms:.2} ms a batch (upload and \
             download included), CPU reference {cpu_ms:.1} ms"
        );
    }
}

/// `img` as a raw frame of `format` (rows padded by `pad` bytes; chroma from each 2x2 block's
/// top-left pixel).
fn from_rgb(img: &image::RgbImage, format: PixelFormat, pad: usize, yuv: YuvMatrix) -> Owned {
    let (w, h) = (img.width() as usize, img.height() as usize);
    let mut rng = Rng::new(1);
    let mut o = Owned::random(&mut rng, format, w, h, pad, yuv);
    for y in 0..h {
        for x in 0..w {
            let rgb = img.get_pixel(x as u32, y as u32).0;
            if let Some((at, size)) = format.packed_layout() {
                let p = &mut o.planes[0][y * o.strides[0] + x * size..];
                for c in 0..3 {
                    p[at[c]] = rgb[c];
                }
                continue;
            }
            let [l, u, v] = yuv.rgb_to_yuv(rgb);
            o.planes[0][y * o.strides[0] + x] = l;
            if x % 2 == 0 && y % 2 == 0 {
                if format == PixelFormat::Nv12 {
                    let c = (y / 2) * o.strides[1] + x;
                    o.planes[1][c] = u;
                    o.planes[1][c + 1] = v;
                } else {
                    o.planes[1][(y / 2) * o.strides[1] + x / 2] = u;
                    o.planes[2][(y / 2) * o.strides[2] + x / 2] = v;
                }
            }
        }
    }
    o
}

#[test]
fn pipelined_frames_on_the_cpu_path_come_back_in_order() {
    // Without a GPU engine, start_frames detects at once and finish_frames hands the batches
    // back in the order they were started, two at most in flight.
    use kestrel_runtime::Detector;
    use kestrel_runtime::engine::{Backend, BatchProfile, BuildOptions, Precision, build_engine};
    use kestrel_runtime::nms::NmsConfig;
    use kestrel_runtime::synth::{image_seed, render_scene_with};
    let model = kestrel_tests::workspace_root().join("models/gelan-t-shapes.onnx");
    let options = BuildOptions {
        backend: Backend::Cpu,
        precision: Precision::Fp32,
        profile: BatchProfile {
            min: 1,
            opt: 2,
            max: 2,
        },
        device: 0,
    };
    let mut detector = Detector::new(build_engine(&model, &options).expect("cpu engine"));
    let scenes: Vec<Owned> = (0..3)
        .map(|i| {
            let (img, _) = render_scene_with(image_seed(11, i), 320, 256, 2..=6);
            from_rgb(&img, PixelFormat::Nv12, 0, YuvMatrix::BT601)
        })
        .collect();
    let frames: Vec<Frame> = scenes.iter().map(Owned::frame).collect();
    let cfg = NmsConfig::display();
    let mut expected = Vec::new();
    for f in &frames {
        let mut out = Vec::new();
        detector
            .detect_frames(std::slice::from_ref(f), &cfg, &mut out)
            .expect("one at a time");
        expected.push(out);
    }
    assert!(
        expected.iter().any(|d| !d[0].is_empty()),
        "nothing detected"
    );
    let mut out = Vec::new();
    detector.start_frames(&frames[..1], &cfg).expect("start 0");
    detector.start_frames(&frames[1..2], &cfg).expect("start 1");
    let err = detector
        .start_frames(&frames[2..], &cfg)
        .expect_err("a third batch");
    assert!(err.to_string().contains("in flight"), "{err}");
    assert!(detector.finish_frames(&mut out).expect("finish 0"));
    assert_eq!(out, expected[0]);
    detector.start_frames(&frames[2..], &cfg).expect("start 2");
    assert!(detector.finish_frames(&mut out).expect("finish 1"));
    assert_eq!(out, expected[1]);
    assert!(detector.finish_frames(&mut out).expect("finish 2"));
    assert_eq!(out, expected[2]);
    assert!(!detector.finish_frames(&mut out).expect("none left"));
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn detector_on_raw_frames_runs_on_the_gpu_and_matches_its_cpu_path() {
    use kestrel_runtime::engine::{Backend, BatchProfile, BuildOptions, Precision, build_engine};
    use kestrel_runtime::nms::NmsConfig;
    use kestrel_runtime::synth::{image_seed, render_scene_with};
    use kestrel_runtime::{Detection, Detector};
    let model = kestrel_tests::workspace_root().join("models/gelan-t-shapes.onnx");
    let options = BuildOptions {
        backend: Backend::Cuda,
        precision: Precision::Fp32,
        profile: BatchProfile {
            min: 2,
            opt: 4,
            max: 4,
        },
        device: 0,
    };
    // One engine for both paths, so the engine's output is the same.
    let mut detector = Detector::new(build_engine(&model, &options).expect("cuda engine"));
    let (mut gpu, mut cpu) = (Vec::new(), Vec::new());
    let mut kept = 0;
    for format in FORMATS {
        // Three scenes of odd sizes (one short of the profile's opt; a single frame is padded).
        let scenes: Vec<Owned> = (0..3)
            .map(|i| {
                let (img, _) = render_scene_with(
                    image_seed(5, i),
                    320 + 37 * i as u32,
                    320 - 23 * i as u32,
                    1..=12,
                );
                from_rgb(&img, format, i, YuvMatrix::BT601)
            })
            .collect();
        let frames: Vec<Frame> = scenes.iter().map(Owned::frame).collect();
        for batch in [&frames[..], &frames[..1]] {
            for cfg in [NmsConfig::evaluation(), NmsConfig::display()] {
                detector.set_device_postprocessing(true);
                detector
                    .detect_frames(batch, &cfg, &mut gpu)
                    .expect("GPU path");
                detector.set_device_postprocessing(false);
                detector
                    .detect_frames(batch, &cfg, &mut cpu)
                    .expect("CPU path");
                assert_eq!(gpu, cpu, "{format:?}, {} frames", batch.len());
                kept += gpu.iter().map(Vec::len).sum::<usize>();
            }
        }
    }
    println!("identical detections on both paths: {kept}");
    assert!(kept > 100);

    // Pipelined (two batches in flight) gives each batch what one batch at a time gives.
    detector.set_device_postprocessing(true);
    let scenes: Vec<Vec<Owned>> = FORMATS
        .iter()
        .enumerate()
        .map(|(k, &format)| {
            (0..1 + k % 4)
                .map(|i| {
                    let (img, _) = render_scene_with(
                        image_seed(7, k * 4 + i),
                        300 + 41 * i as u32,
                        280 + 13 * k as u32,
                        1..=12,
                    );
                    from_rgb(&img, format, i, YuvMatrix::BT709)
                })
                .collect()
        })
        .collect();
    let batches: Vec<Vec<Frame>> = scenes
        .iter()
        .map(|b| b.iter().map(Owned::frame).collect())
        .collect();
    let cfgs = [NmsConfig::display(), NmsConfig::evaluation()];
    let one_at_a_time: Vec<Vec<Vec<Detection>>> = batches
        .iter()
        .enumerate()
        .map(|(i, b)| {
            let mut out = Vec::new();
            detector
                .detect_frames(b, &cfgs[i % 2], &mut out)
                .expect("one batch");
            out
        })
        .collect();
    let mut out = Vec::new();
    detector
        .start_frames(&batches[0], &cfgs[0])
        .expect("start the first batch");
    for i in 1..=batches.len() {
        if i < batches.len() {
            detector
                .start_frames(&batches[i], &cfgs[i % 2])
                .expect("start the next batch");
            if i == 1 {
                let err = detector
                    .start_frames(&batches[0], &cfgs[0])
                    .expect_err("a third batch in flight");
                assert!(err.to_string().contains("in flight"), "{err}");
                let err = detector
                    .detect_frames(&batches[0], &cfgs[0], &mut out)
                    .expect_err("one batch at a time while two are in flight");
                assert!(err.to_string().contains("finish_frames"), "{err}");
            }
        }
        assert!(detector.finish_frames(&mut out).expect("finish"));
        assert_eq!(out, one_at_a_time[i - 1], "batch {} pipelined", i - 1);
    }
    assert!(!detector.finish_frames(&mut out).expect("nothing in flight"));
}

/// Milliseconds per batch of `frames` through the detector's pipeline with two batches in
/// flight, over `batches` batches (after one warm-up round).
fn pipelined_ms_per_batch(
    detector: &mut kestrel_runtime::Detector,
    frames: &[Frame],
    cfg: &kestrel_runtime::nms::NmsConfig,
    batches: usize,
) -> f64 {
    let mut out = Vec::new();
    let mut round = |n: usize| {
        detector.start_frames(frames, cfg).expect("start");
        for _ in 1..n {
            detector.start_frames(frames, cfg).expect("start");
            assert!(detector.finish_frames(&mut out).expect("finish"));
        }
        assert!(detector.finish_frames(&mut out).expect("finish"));
    };
    round(4);
    let t = std::time::Instant::now();
    round(batches);
    t.elapsed().as_secs_f64() * 1e3 / batches as f64
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn frames_to_detections_on_the_gpu_against_engine_only_gelan_c_640_batch_8() {
    // Measured, not asserted. Engine only: Engine::run with the float input from the host and
    // the head back to the host, and GPU compute alone. Frames to detections: 8 NV12 1080p frames
    // from host memory, letterbox + engine + decode/NMS on the GPU, detections to the host.
    use kestrel_exporter::{ExportOptions, ModelConfig, WeightSource, export, onnx};
    use kestrel_runtime::Detector;
    use kestrel_runtime::engine::{Backend, BatchProfile, BuildOptions, Precision, build_engine};
    use kestrel_runtime::nms::NmsConfig;
    let dir = kestrel_tests::scratch_dir("frames-bench");
    let path = dir.join("gelan-c.onnx");
    let cfg = ModelConfig::new("gelan-c", 80, 640).expect("config");
    let model = export(
        &cfg,
        &mut WeightSource::Random { seed: 3 },
        &ExportOptions::dynamic(80),
    )
    .expect("export");
    onnx::write_model(&model, &path).expect("write");
    let options = BuildOptions {
        backend: Backend::Cuda,
        precision: Precision::Fp16,
        profile: BatchProfile {
            min: 1,
            opt: 8,
            max: 8,
        },
        device: 0,
    };
    let mut engine = build_engine(&path, &options).expect("engine");
    let per = engine.info().input_len();
    let input = vec![0.5f32; 8 * per];
    let compute = engine
        .time_compute(8, 50)
        .expect("compute")
        .map(|mut v| {
            v.sort_by(f64::total_cmp);
            v[v.len() / 2]
        })
        .unwrap_or(f64::NAN);
    engine.run(&input, 8).expect("warm-up");
    let run_ms = kestrel_tests::median_ms(30, || {
        engine.run(&input, 8).expect("run");
    });
    let mut detector = Detector::new(engine);
    detector.set_device_postprocessing(true);
    let mut rng = Rng::new(4);
    let owned: Vec<Owned> = (0..8)
        .map(|_| Owned::random(&mut rng, PixelFormat::Nv12, 1920, 1080, 0, YuvMatrix::BT709))
        .collect();
    let frames: Vec<Frame> = owned.iter().map(Owned::frame).collect();
    let mut out = Vec::new();
    let nms = NmsConfig::display();
    detector
        .detect_frames(&frames, &nms, &mut out)
        .expect("warm-up");
    let frames_ms = kestrel_tests::median_ms(30, || {
        detector
            .detect_frames(&frames, &nms, &mut out)
            .expect("frames");
    });
    let stages = detector.last_stage_times();
    // Pipelined: two batches in flight, so one batch's upload, letterbox and engine overlap the
    // previous one's post-processing.
    let pipelined_ms = pipelined_ms_per_batch(&mut detector, &frames, &nms, 60);
    // The same frames from pinned memory, as a decoder writing there would leave them.
    let (pinned, ranges) = pinned_copy(&owned);
    let pinned_frames: Vec<Frame> = owned
        .iter()
        .zip(&ranges)
        .map(|(o, r)| o.frame_in(pinned.as_slice(), r))
        .collect();
    let pinned_ms = kestrel_tests::median_ms(30, || {
        detector
            .detect_frames(&pinned_frames, &nms, &mut out)
            .expect("pinned frames");
    });
    let pinned_stages = detector.last_stage_times();
    let pinned_pipelined_ms = pipelined_ms_per_batch(&mut detector, &pinned_frames, &nms, 60);
    let ips = |ms: f64| 8.0 * 1e3 / ms;
    println!(
        "BENCH {}",
        serde_json::json!({
            "model": "gelan-c 640, random weights, FP16, batch 8",
            "nv12_1080p_pinned_frames_to_detections_images_per_s": ips(pinned_ms),
            "pipelined_nv12_1080p_frames_to_detections_images_per_s": ips(pipelined_ms),
            "pipelined_vs_compute_only": compute / pipelined_ms,
            "pipelined_pinned_frames_to_detections_images_per_s": ips(pinned_pipelined_ms),
            "pipelined_pinned_vs_compute_only": compute / pinned_pipelined_ms,
            "pinned_frames_vs_compute_only": compute / pinned_ms,
            "last_stage_times_ms": {"pageable": stages, "pinned": pinned_stages},
            "compute_only_images_per_s": ips(compute),
            "engine_run_images_per_s": ips(run_ms),
            "nv12_1080p_frames_to_detections_images_per_s": ips(frames_ms),
            "frames_to_detections_vs_engine_run": run_ms / frames_ms,
            "frames_to_detections_vs_compute_only": compute / frames_ms,
        })
    );
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn gpu_letterbox_against_the_torch_peer_8_frames_1080p() {
    // Both start from RGB frames in host memory and end with the NCHW batch on the host; prints
    // the JSON record for bench/results (peer: bench/peers/torch_letterbox_peer.py).
    let mut rng = Rng::new(8);
    let owned: Vec<Owned> = (0..8)
        .map(|_| Owned::random(&mut rng, PixelFormat::Rgb, 1920, 1080, 0, YuvMatrix::BT601))
        .collect();
    let frames: Vec<Frame> = owned.iter().map(Owned::frame).collect();
    let dir = kestrel_tests::scratch_dir("letterbox-peer");
    let path = dir.join("frames.u8");
    let bytes: Vec<u8> = owned
        .iter()
        .flat_map(|o| o.planes[0].iter().copied())
        .collect();
    std::fs::write(&path, bytes).expect("write frames");
    let mut gpu = GpuLetterboxer::new(0).expect("GPU letterbox");
    let (mut out, mut placements) = (Vec::new(), Vec::new());
    gpu.run(&frames, 640, 640, &mut out, &mut placements)
        .expect("warm-up");
    let to_host = kestrel_tests::median_ms(20, || {
        gpu.run(&frames, 640, 640, &mut out, &mut placements)
            .expect("run");
    });
    // Into a device buffer, as the engine's input is written.
    let input = gpu.device_output(8, 640, 640).expect("device buffer");
    let on_gpu = kestrel_tests::median_ms(20, || {
        gpu.run_device(&frames, 640, 640, input, &mut placements)
            .expect("run_device");
    });
    // From frames already in pinned memory (a decoder writing there): no staging copy.
    let (pinned, ranges) = pinned_copy(&owned);
    let pinned_frames: Vec<Frame> = owned
        .iter()
        .zip(&ranges)
        .map(|(o, r)| o.frame_in(pinned.as_slice(), r))
        .collect();
    let pinned_on_gpu = kestrel_tests::median_ms(20, || {
        gpu.run_device(&pinned_frames, 640, 640, input, &mut placements)
            .expect("run_device");
    });
    let script = kestrel_tests::workspace_root().join("bench/peers/torch_letterbox_peer.py");
    let peer = |extra: &[&str]| -> serde_json::Value {
        let run = std::process::Command::new(kestrel_tests::python())
            .arg(&script)
            .args([path.to_str().expect("path"), "8", "1920", "1080"])
            .args(extra)
            .output()
            .expect("start the peer");
        assert!(
            run.status.success(),
            "peer failed:\n{}",
            String::from_utf8_lossy(&run.stderr)
        );
        serde_json::from_slice(&run.stdout).expect("the peer's JSON")
    };
    let (peer_host, peer_gpu) = (peer(&[]), peer(&["--on-gpu"]));
    let peer_pinned = peer(&["--on-gpu", "--pinned"]);
    let ms = |v: &serde_json::Value| v["ms_per_batch"].as_f64().unwrap_or(f64::NAN);
    println!(
        "BENCH {}",
        serde_json::json!({
            "what": "letterbox 8 RGB 1920x1080 frames from host memory to 8 x 3 x 640 x 640 float32, on the GPU (the engine's input) and on the host",
            "kestrel_ms_per_batch_on_gpu": on_gpu,
            "kestrel_ms_per_batch_to_host": to_host,
            "kestrel_ms_per_batch_pinned_frames_on_gpu": pinned_on_gpu,
            "peer_pinned_frames_on_gpu": peer_pinned,
            "speedup_pinned_frames_on_gpu": ms(&peer_pinned) / pinned_on_gpu,
            "peer_on_gpu": peer_gpu,
            "peer_to_host": peer_host,
            "speedup_on_gpu": ms(&peer_gpu) / on_gpu,
            "speedup_to_host": ms(&peer_host) / to_host,
        })
    );
}
