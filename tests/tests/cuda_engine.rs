//! The `cuda` backend against the CPU backend (GPU machine), and its behaviour without a GPU.

use std::path::Path;

use kestrel_exporter::weights::SplitMix64;
use kestrel_exporter::{ExportOptions, ModelConfig, WeightSource, export, onnx};
use kestrel_runtime::engine::{Backend, BatchProfile, BuildOptions, Precision, build_engine};
use kestrel_tests::scratch_dir;

fn rel_l2(a: &[f32], b: &[f32]) -> f64 {
    let num: f64 = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
    let den: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
    (num / den.max(1e-30)).sqrt()
}

fn export_to(name: &str, path: &Path) {
    let cfg = ModelConfig::new(name, 80, 640).unwrap();
    let model = export(
        &cfg,
        &mut WeightSource::Random { seed: 3 },
        &ExportOptions::dynamic(80),
    )
    .unwrap();
    onnx::write_model(&model, path).unwrap();
}

fn options(backend: Backend, precision: Precision) -> BuildOptions {
    BuildOptions {
        backend,
        precision,
        profile: BatchProfile {
            min: 1,
            opt: 8,
            max: 8,
        },
    }
}

/// Split `output0` rows into boxes and scores so each is compared on its own scale.
fn parts(out: &[f32], batch: usize) -> (Vec<f32>, Vec<f32>) {
    let per = out.len() / batch;
    let anchors = per / 84;
    let (mut boxes, mut scores) = (Vec::new(), Vec::new());
    for img in out.chunks(per) {
        boxes.extend_from_slice(&img[..4 * anchors]);
        scores.extend_from_slice(&img[4 * anchors..]);
    }
    (boxes, scores)
}

fn compare(name: &str) {
    let dir = scratch_dir(&format!("cuda-{name}"));
    let path = dir.join(format!("{name}.onnx"));
    export_to(name, &path);
    let mut cpu = build_engine(&path, &options(Backend::Cpu, Precision::Fp32)).unwrap();
    let mut fp16 = build_engine(&path, &options(Backend::Cuda, Precision::Fp16)).unwrap();
    let mut fp32 = build_engine(&path, &options(Backend::Cuda, Precision::Fp32)).unwrap();
    let per = cpu.info().input_len();
    let mut rng = SplitMix64::new(11);
    let input: Vec<f32> = (0..8 * per).map(|_| rng.next_f32()).collect();
    let single16 = fp16.run(&input[..per], 1).unwrap().to_vec();
    for batch in [1usize, 3, 8] {
        let x = &input[..batch * per];
        let want = cpu.run(x, batch).unwrap().to_vec();
        let got16 = fp16.run(x, batch).unwrap().to_vec();
        let got32 = fp32.run(x, batch).unwrap().to_vec();
        let (wb, ws) = parts(&want, batch);
        let (b16, s16) = parts(&got16, batch);
        let (b32, s32) = parts(&got32, batch);
        let e16 = rel_l2(&got16, &want);
        let e32 = rel_l2(&got32, &want);
        println!(
            "{name} batch {batch}: fp16 rel L2 {e16:.2e} (boxes {:.2e}, scores {:.2e}); fp32 {e32:.2e} (boxes {:.2e}, scores {:.2e})",
            rel_l2(&b16, &wb),
            rel_l2(&s16, &ws),
            rel_l2(&b32, &wb),
            rel_l2(&s32, &ws)
        );
        assert!(
            e16 < 1e-2 && rel_l2(&s16, &ws) < 1e-2,
            "{name} fp16 batch {batch}"
        );
        assert!(
            e32 < 1e-4 && rel_l2(&s32, &ws) < 1e-3,
            "{name} fp32 batch {batch}"
        );
        // Image 0 of every batch equals the batch-1 result.
        let per_out = got16.len() / batch;
        let e = rel_l2(&got16[..per_out], &single16);
        assert!(
            e < 1e-3,
            "{name}: image 0 of batch {batch} differs from batch 1 by {e:.2e}"
        );
    }
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn gelan_t_cuda_matches_cpu() {
    compare("gelan-t");
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn gelan_s_cuda_matches_cpu() {
    compare("gelan-s");
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn gelan_c_cuda_matches_cpu() {
    compare("gelan-c");
}

/// Without a GPU, asking for the cuda backend is a clear error, not a panic.
#[test]
fn cuda_without_a_gpu_is_a_clear_error() {
    let Some(reason) = kestrel_runtime::cuda::unavailable_reason() else {
        eprintln!("a GPU is present: the error path is not reachable here");
        assert!(
            std::env::var_os("KESTREL_GPU_MACHINE").is_some() || std::env::var_os("CI").is_none()
        );
        return;
    };
    let dir = scratch_dir("cuda-absent");
    let path = dir.join("t.onnx");
    let cfg = ModelConfig::new("gelan-t", 2, 64).unwrap();
    let model = export(
        &cfg,
        &mut WeightSource::Random { seed: 0 },
        &ExportOptions::dynamic(2),
    )
    .unwrap();
    onnx::write_model(&model, &path).unwrap();
    let err = build_engine(&path, &options(Backend::Cuda, Precision::Fp16))
        .err()
        .expect("no GPU here")
        .to_string();
    assert!(err.contains(&reason), "{err}");
    assert!(err.starts_with("cuda backend: "), "{err}");
}
