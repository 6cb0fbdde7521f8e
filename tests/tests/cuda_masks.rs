//! GPU instance masks (`cuda::masks`) against the CPU reference (`masks::MaskDecoder`): bitmaps
//! with IoU ≥ 0.99 per detection for frames of odd sizes and adversarial boxes, GPU run-length
//! encodings that decode to the GPU bitmaps exactly, and 100 masks at 1920x1080 against the
//! PyTorch peer (GPU machine); a clear error where there is no GPU.

use kestrel_exporter::weights::SplitMix64 as Rng;
use kestrel_runtime::BoxXyxy;
use kestrel_runtime::cuda::masks::{GpuMaskDecoder, MaskBatch, MaskCoefficients};
use kestrel_runtime::letterbox::LetterboxParams;
use kestrel_runtime::masks::{Bitmap, MASK_COEFFICIENTS, MaskDecoder, PrototypeShape, Rle};

const SHAPE: PrototypeShape = PrototypeShape {
    width: 160,
    height: 160,
};

/// Prototypes with structure at several scales (smooth waves plus noise), so masks have both
/// large regions and ragged edges.
fn prototypes(rng: &mut Rng, images: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(images * SHAPE.len());
    for _ in 0..images * MASK_COEFFICIENTS {
        let (fx, fy, phase) = (rng.uniform(0.2), rng.uniform(0.2), rng.uniform(3.0));
        for y in 0..SHAPE.height {
            for x in 0..SHAPE.width {
                let wave = (x as f32 * fx + y as f32 * fy + phase).sin();
                out.push(wave + rng.uniform(0.3));
            }
        }
    }
    out
}

fn random_box(rng: &mut Rng, w: f32, h: f32) -> BoxXyxy {
    let (x1, y1) = (rng.next_f32() * w, rng.next_f32() * h);
    let (bw, bh) = (rng.next_f32() * w * 0.6, rng.next_f32() * h * 0.6);
    BoxXyxy::new(x1, y1, x1 + bw, y1 + bh)
}

fn cpu_masks(
    protos: &[f32],
    letterboxes: &[LetterboxParams],
    images: &[usize],
    boxes: &[BoxXyxy],
    coefficients: &[f32],
) -> Vec<Bitmap> {
    let mut decoder = MaskDecoder::new();
    let mut all = Vec::new();
    for (d, (&image, b)) in images.iter().zip(boxes).enumerate() {
        let mut one = Vec::new();
        decoder
            .decode(
                &protos[image * SHAPE.len()..(image + 1) * SHAPE.len()],
                SHAPE,
                &letterboxes[image],
                std::slice::from_ref(b),
                &coefficients[d * MASK_COEFFICIENTS..(d + 1) * MASK_COEFFICIENTS],
                &mut one,
            )
            .expect("CPU masks");
        all.append(&mut one);
    }
    all
}

#[test]
fn without_a_gpu_the_error_says_so() {
    if kestrel_runtime::cuda::unavailable_reason().is_none() {
        return;
    }
    let err = GpuMaskDecoder::new(0)
        .err()
        .expect("no GPU here")
        .to_string();
    assert!(err.contains("cuda"), "{err}");
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn gpu_masks_equal_the_cpu_reference_and_rle_decodes_exactly() {
    let mut rng = Rng::new(9);
    // Frames of odd sizes, landscape and portrait, and one tiny.
    let sizes = [(1921u32, 1079u32), (641, 357), (333, 777), (7, 5)];
    let letterboxes: Vec<LetterboxParams> = sizes
        .iter()
        .map(|&(w, h)| LetterboxParams::new(w, h, 640, 640).expect("placement"))
        .collect();
    let protos = prototypes(&mut rng, sizes.len());
    let (mut images, mut boxes) = (Vec::new(), Vec::new());
    for (i, &(w, h)) in sizes.iter().enumerate() {
        let (w, h) = (w as f32, h as f32);
        for _ in 0..20 {
            images.push(i);
            boxes.push(random_box(&mut rng, w, h));
        }
        // Adversarial: the whole frame (touching every edge), beyond the frame, zero width,
        // inverted, NaN and infinite corners, one pixel.
        for b in [
            BoxXyxy::new(0.0, 0.0, w, h),
            BoxXyxy::new(-50.0, -50.0, w + 50.0, h + 50.0),
            BoxXyxy::new(3.0, 0.0, 3.0, h),
            BoxXyxy::new(10.0, 10.0, 2.0, 2.0),
            BoxXyxy::new(f32::NAN, 0.0, w, h),
            BoxXyxy::new(0.0, 0.0, f32::INFINITY, f32::INFINITY),
            BoxXyxy::new(1.0, 1.0, 2.0, 2.0),
            BoxXyxy::new(0.0, h - 1.0, w, h),
        ] {
            images.push(i);
            boxes.push(b);
        }
    }
    let coefficients: Vec<f32> = (0..boxes.len() * MASK_COEFFICIENTS)
        .map(|_| rng.uniform(1.0))
        .collect();
    let expected = cpu_masks(&protos, &letterboxes, &images, &boxes, &coefficients);

    let mut gpu = GpuMaskDecoder::new(0).expect("GPU mask decoder");
    let batch = MaskBatch {
        prototypes: gpu.upload_prototypes(&protos).expect("upload"),
        shape: SHAPE,
        letterboxes: &letterboxes,
        images: &images,
        boxes: &boxes,
        coefficients: MaskCoefficients::Host(&coefficients),
    };
    let (mut bitmaps, mut rles) = (Vec::new(), Vec::new());
    gpu.bitmaps(&batch, &mut bitmaps).expect("GPU bitmaps");
    gpu.rle(&batch, &mut rles).expect("GPU RLE");
    assert_eq!(bitmaps.len(), expected.len());
    let (mut worst, mut identical, mut set) = (1.0f64, 0usize, 0usize);
    for (d, ((g, c), rle)) in bitmaps.iter().zip(&expected).zip(&rles).enumerate() {
        let iou = g.iou(c).expect("same size");
        worst = worst.min(iou);
        identical += usize::from(g == c);
        set += c.area();
        assert!(iou >= 0.99, "detection {d} ({:?}): IoU {iou}", boxes[d]);
        assert_eq!(&rle.decode().expect("RLE decodes"), g, "detection {d}: RLE");
        assert_eq!(
            rle,
            &Rle::encode(g),
            "detection {d}: RLE differs from the CPU encoding"
        );
    }
    assert!(
        set > 1_000_000,
        "the masks are nearly empty ({set} pixels set)"
    );
    println!(
        "{} masks: worst IoU {worst}, {identical} bit-identical, {set} pixels set",
        bitmaps.len()
    );
    // Reuse with fewer detections, then none.
    let few = MaskBatch {
        images: &images[..3],
        boxes: &boxes[..3],
        coefficients: MaskCoefficients::Host(&coefficients[..3 * MASK_COEFFICIENTS]),
        ..batch
    };
    gpu.rle(&few, &mut rles).expect("GPU RLE of 3");
    assert_eq!(rles.len(), 3);
    assert_eq!(rles[2], Rle::encode(&expected[2]));
    let none = MaskBatch {
        images: &[],
        boxes: &[],
        coefficients: MaskCoefficients::Host(&[]),
        ..batch
    };
    gpu.bitmaps(&none, &mut bitmaps).expect("no detections");
    assert!(bitmaps.is_empty());
    // A detection of an image the batch does not have is an error, not a read out of bounds.
    let wrong = MaskBatch {
        images: &[7],
        boxes: &boxes[..1],
        coefficients: MaskCoefficients::Host(&coefficients[..MASK_COEFFICIENTS]),
        ..batch
    };
    let err = gpu.rle(&wrong, &mut rles).expect_err("image 7");
    assert!(err.to_string().contains("image 7"), "{err}");
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn gpu_masks_against_the_torch_peer_100_masks_1080p() {
    // 100 detections on one 1920x1080 frame letterboxed to 640: Kestrel's bitmaps on the device
    // and its RLE on the host against the peer's boolean masks on the device; prints the JSON
    // record for bench/results (peer: bench/peers/torch_mask_peer.py).
    let (w, h, count) = (1920u32, 1080u32, 100usize);
    let mut rng = Rng::new(100);
    let protos = prototypes(&mut rng, 1);
    let boxes: Vec<BoxXyxy> = (0..count)
        .map(|_| random_box(&mut rng, w as f32, h as f32))
        .collect();
    let coefficients: Vec<f32> = (0..count * MASK_COEFFICIENTS)
        .map(|_| rng.uniform(1.0))
        .collect();
    let images = vec![0usize; count];
    let letterboxes = [LetterboxParams::new(w, h, 640, 640).expect("placement")];
    let dir = kestrel_tests::scratch_dir("mask-peer");
    let write = |name: &str, v: &[f32]| {
        let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
        std::fs::write(dir.join(name), bytes).expect("write peer input");
    };
    write("protos.f32", &protos);
    write("coefficients.f32", &coefficients);
    let flat: Vec<f32> = boxes
        .iter()
        .flat_map(|b| [b.x1, b.y1, b.x2, b.y2])
        .collect();
    write("boxes.f32", &flat);

    let mut gpu = GpuMaskDecoder::new(0).expect("GPU mask decoder");
    let batch = MaskBatch {
        prototypes: gpu.upload_prototypes(&protos).expect("upload"),
        shape: SHAPE,
        letterboxes: &letterboxes,
        images: &images,
        boxes: &boxes,
        coefficients: MaskCoefficients::Host(&coefficients),
    };
    let (mut bitmaps, mut rles) = (Vec::new(), Vec::new());
    gpu.bitmaps(&batch, &mut bitmaps).expect("warm-up");
    gpu.rle(&batch, &mut rles).expect("warm-up");
    let bitmaps_ms = kestrel_tests::median_ms(20, || {
        gpu.bitmaps_device(&batch).expect("bitmaps");
    });
    let rle_ms = kestrel_tests::median_ms(20, || {
        gpu.rle(&batch, &mut rles).expect("RLE");
    });
    let runs: usize = rles.iter().map(|r| r.counts.len()).sum();

    let script = kestrel_tests::workspace_root().join("bench/peers/torch_mask_peer.py");
    let peer = std::process::Command::new(kestrel_tests::python())
        .arg(&script)
        .args([
            dir.to_str().expect("path"),
            &count.to_string(),
            &w.to_string(),
            &h.to_string(),
        ])
        .output()
        .expect("start the peer");
    assert!(
        peer.status.success(),
        "peer failed:\n{}",
        String::from_utf8_lossy(&peer.stderr)
    );
    let peer: serde_json::Value = serde_json::from_slice(&peer.stdout).expect("the peer's JSON");
    // The peer's masks (YOLOv9's sampling grid) against ours.
    let bits = std::fs::read(dir.join("peer_masks.bits")).expect("peer masks");
    let pixels = (w * h) as usize;
    let (mut worst, mut sum) = (1.0f64, 0.0f64);
    for (d, ours) in bitmaps.iter().enumerate() {
        let data = (0..pixels)
            .map(|i| {
                let k = d * pixels + i;
                (bits[k / 8] >> (7 - k % 8)) & 1
            })
            .collect();
        let theirs = Bitmap {
            width: w as usize,
            height: h as usize,
            data,
        };
        let iou = ours.iou(&theirs).expect("same size");
        worst = worst.min(iou);
        sum += iou;
    }
    let peer_ms = peer["ms_per_call"].as_f64().unwrap_or(f64::NAN);
    println!(
        "BENCH {}",
        serde_json::json!({
            "what": "100 instance masks of one 1920x1080 frame (prototypes 32x160x160 of a 640 input)",
            "kestrel_bitmaps_on_device_ms": bitmaps_ms,
            "kestrel_rle_to_host_ms": rle_ms,
            "rle_runs": runs,
            "peer": peer,
            "speedup_bitmaps": peer_ms / bitmaps_ms,
            "speedup_rle_to_host": peer_ms / rle_ms,
            "iou_with_peer_masks": {"min": worst, "mean": sum / count as f64},
        })
    );
    assert!(
        sum / count as f64 > 0.98,
        "our masks differ from YOLOv9's process_mask_native (mean IoU {})",
        sum / count as f64
    );
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn segmentation_engine_on_the_gpu_matches_the_cpu_backend() {
    // gelan-t-seg (random weights) through the cuda engine: output0 and the prototypes against
    // the CPU backend, then masks of the same detections with IoU >= 0.99.
    use kestrel_exporter::{ExportOptions, ModelConfig, WeightSource, export, onnx};
    use kestrel_runtime::engine::{Backend, BatchProfile, BuildOptions, Precision, build_engine};
    use kestrel_runtime::nms::NmsConfig;
    let dir = kestrel_tests::scratch_dir("seg-engine");
    let path = dir.join("gelan-t-seg.onnx");
    let cfg = ModelConfig::new("gelan-t-seg", 5, 320).expect("config");
    let model = export(
        &cfg,
        &mut WeightSource::Random { seed: 5 },
        &ExportOptions::dynamic(5),
    )
    .expect("export");
    onnx::write_model(&model, &path).expect("write");
    let build = |backend| {
        let options = BuildOptions {
            backend,
            precision: Precision::Fp32,
            profile: BatchProfile {
                min: 1,
                opt: 2,
                max: 2,
            },
            device: 0,
        };
        build_engine(&path, &options).expect("engine")
    };
    let (mut gpu, mut cpu) = (build(Backend::Cuda), build(Backend::Cpu));
    let shape = gpu.info().prototypes.expect("prototypes");
    assert_eq!((shape.width, shape.height), (80, 80));
    let mut rng = Rng::new(12);
    let input: Vec<f32> = (0..2 * gpu.info().input_len())
        .map(|_| rng.next_f32())
        .collect();
    let rel = |a: &[f32], b: &[f32]| {
        let num: f64 = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
        let den: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
        (num / den.max(1e-30)).sqrt()
    };
    let (g_out, g_protos) = gpu.run_with_prototypes(&input, 2).expect("GPU run");
    let (g_out, g_protos) = (g_out.to_vec(), g_protos.expect("GPU prototypes").to_vec());
    let (c_out, c_protos) = cpu.run_with_prototypes(&input, 2).expect("CPU run");
    let (e_out, e_protos) = (rel(&g_out, c_out), rel(&g_protos, c_protos.expect("CPU")));
    println!("gelan-t-seg FP32: output0 rel L2 {e_out:.2e}, prototypes {e_protos:.2e}");
    assert!(e_out < 1e-3 && e_protos < 1e-3, "{e_out} {e_protos}");
    // Masks of a synthetic scene through both detectors.
    let (img, _) = kestrel_runtime::synth::render_scene_with(
        kestrel_runtime::synth::image_seed(3, 0),
        400,
        300,
        3..=6,
    );
    let nms = NmsConfig {
        conf_threshold: 0.001,
        max_detections: 20,
        ..NmsConfig::display()
    };
    gpu_masks_match_the_cpu(gpu, cpu, &[img], &nms);
}

/// Masks of `images` through a GPU and a CPU engine of one model: with the GPU engine, masks
/// decoded on the GPU (after GPU NMS) equal the CPU decoder's on the same outputs (each IoU >=
/// 0.99), a batch of two gives each image the same answer, and the GPU engine's detections that
/// the CPU backend also finds (same class, box IoU >= 0.95; at least 90 % of them) have masks of
/// IoU >= 0.99 with the CPU backend's.
fn gpu_masks_match_the_cpu(
    gpu: Box<dyn kestrel_runtime::engine::Engine>,
    cpu: Box<dyn kestrel_runtime::engine::Engine>,
    images: &[image::RgbImage],
    nms: &kestrel_runtime::nms::NmsConfig,
) {
    use kestrel_runtime::Detector;
    let mut gpu_detector = Detector::new(gpu);
    let mut cpu_detector = Detector::new(cpu);
    let (mut matched, mut detections, mut worst) = (0usize, 0usize, 1.0f64);
    for img in images {
        let (mut gd, mut gm, mut cd, mut cm) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        gpu_detector.set_device_postprocessing(false);
        gpu_detector
            .detect_masks(&[img], nms, &mut gd, &mut gm)
            .expect("GPU engine, masks on the CPU");
        // NMS and masks on the GPU: the same detections, each mask IoU >= 0.99 with the CPU's.
        let (mut dd, mut dm) = (Vec::new(), Vec::new());
        gpu_detector.set_device_postprocessing(true);
        gpu_detector
            .detect_masks(&[img], nms, &mut dd, &mut dm)
            .expect("masks on the GPU");
        assert_eq!(dd[0], gd[0], "detections with GPU post-processing");
        assert_eq!(dm[0].len(), gd[0].len());
        for (k, (g, c)) in dm[0].iter().zip(&gm[0]).enumerate() {
            let iou = g.iou(c).expect("same size");
            worst = worst.min(iou);
            assert!(iou >= 0.99, "GPU-decoded mask {k}: IoU {iou}");
        }
        // Two images in one batch (another bucket: its own convolution algorithms) agree with
        // each other.
        let (mut d2, mut m2) = (Vec::new(), Vec::new());
        gpu_detector
            .detect_masks(&[img, img], nms, &mut d2, &mut m2)
            .expect("a batch of two");
        assert_eq!(d2[0], d2[1]);
        assert_eq!(m2[0], m2[1]);
        cpu_detector
            .detect_masks(&[img], nms, &mut cd, &mut cm)
            .expect("CPU masks");
        for (d, m) in gd[0].iter().zip(&gm[0]) {
            let Some(k) = cd[0]
                .iter()
                .position(|c| c.class_id == d.class_id && c.bbox.iou(&d.bbox) >= 0.95)
            else {
                continue;
            };
            let iou = m.iou(&cm[0][k]).expect("same size");
            assert!(iou >= 0.99, "mask IoU {iou} for {d:?}");
            matched += 1;
        }
        detections += gd[0].len();
    }
    println!(
        "{matched} of {detections} GPU detections matched the CPU backend's with masks IoU >= \
         0.99; GPU-decoded vs CPU-decoded masks: lowest IoU {worst:.4}"
    );
    assert!(
        matched * 10 >= detections * 9 && matched > 0,
        "{matched} of {detections}"
    );
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn the_segmentation_demo_model_gives_the_same_masks_on_the_gpu() {
    // The bundled, trained gelan-t-seg: real masks, not random ones.
    use kestrel_runtime::engine::{Backend, BatchProfile, BuildOptions, Precision, build_engine};
    use kestrel_runtime::nms::NmsConfig;
    let path = kestrel_tests::workspace_root().join("models/gelan-t-seg-shapes.onnx");
    let build = |backend| {
        let options = BuildOptions {
            backend,
            precision: Precision::Fp32,
            profile: BatchProfile {
                min: 1,
                opt: 2,
                max: 2,
            },
            device: 0,
        };
        build_engine(&path, &options).expect("engine")
    };
    let images: Vec<image::RgbImage> = (0..8)
        .map(|i| {
            kestrel_runtime::synth::render_scene(
                kestrel_runtime::synth::image_seed(424242, i),
                320,
                320,
            )
            .0
        })
        .collect();
    gpu_masks_match_the_cpu(
        build(Backend::Cuda),
        build(Backend::Cpu),
        &images,
        &NmsConfig::display(),
    );
}
