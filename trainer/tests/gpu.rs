//! On the GPU machine (built with `--features cuda`): training runs on CUDA, and how fast.
#![allow(clippy::unwrap_used)]

use kestrel_exporter::ModelConfig;
use kestrel_trainer::data::{Loader, Source};
use kestrel_trainer::train::{TrainConfig, Trainer};
use tch::Device;

#[test]
#[ignore = "needs a CUDA GPU"]
fn gelan_s_trains_on_cuda() {
    assert!(
        tch::Cuda::is_available(),
        "libtorch sees no CUDA device: build with --features cuda and run on the GPU machine"
    );
    tch::manual_seed(0);
    let (imgsz, batch) = (640u32, 16usize);
    let cfg = ModelConfig::new("gelan-s", 6, imgsz as usize).unwrap();
    let source = Source::Synthetic {
        seed: 1,
        count: 4 * batch,
        size: imgsz,
    };
    let loader = Loader::new(source, imgsz, batch, 1).unwrap();
    // FP32, then mixed precision; in each, the first epoch warms up cuDNN's algorithm choice (and
    // renders the scenes into the loader's cache) and the second is timed.
    for amp in [false, true] {
        let config = TrainConfig {
            epochs: 3,
            amp,
            ..Default::default()
        };
        let mut trainer = Trainer::new(&cfg, config, batch, Device::Cuda(0)).unwrap();
        assert!(trainer.vs.device().is_cuda());
        assert_eq!(trainer.mixed_precision(), amp);
        let first = trainer.train_epoch(&loader, |_| {}).unwrap();
        let second = trainer.train_epoch(&loader, |_| {}).unwrap();
        println!(
            "gelan-s {imgsz}px batch {batch} on cuda:0, {}: epoch 1 {:.1} images/s, epoch 2 {:.1} \
             images/s (data loading on {} threads included); loss box {:.3} cls {:.3} dfl {:.3}; \
             {} steps skipped for overflow",
            if amp { "mixed precision" } else { "fp32" },
            first.images_per_s,
            second.images_per_s,
            loader.workers,
            second.boxes,
            second.classes,
            second.dfl,
            first.skipped_steps + second.skipped_steps
        );
        for v in [second.boxes, second.classes, second.dfl] {
            assert!(v.is_finite());
        }
    }
}

/// The framework-only step that `bench/peers/torch_train_peer.py` times in PyTorch: forward
/// (training-mode BatchNorm), loss = mean(output²), backward, SGD step, FP32 and mixed precision,
/// gelan-s at 640, batch 16, input already on the GPU; with libtorch's SGD (tch's optimiser) and
/// with Kestrel's flat SGD (what the trainer uses).
#[test]
#[ignore = "needs a CUDA GPU"]
fn network_step_speed() {
    use kestrel_trainer::optim::{FlatSgd, FlatVars};
    use tch::nn::OptimizerConfig;
    assert!(tch::Cuda::is_available(), "libtorch sees no CUDA device");
    // As the PyTorch peer sets torch.backends.cudnn.benchmark (and the trainer does on CUDA).
    tch::Cuda::cudnn_set_benchmark(true);
    let batch = 16i64;
    let cfg = ModelConfig::new("gelan-s", 6, 640).unwrap();
    let x = tch::Tensor::rand([batch, 3, 640, 640], (tch::Kind::Float, Device::Cuda(0)));
    for flat in [false, true] {
        tch::manual_seed(0);
        let vs = tch::nn::VarStore::new(Device::Cuda(0));
        let model = kestrel_trainer::Gelan::new(&vs.root(), &cfg).unwrap();
        let mut opt = tch::nn::Sgd {
            momentum: 0.937,
            dampening: 0.0,
            wd: 5e-4,
            nesterov: true,
        }
        .build(&vs, 1e-3)
        .unwrap();
        let vars = flat.then(|| FlatVars::bind(&vs));
        let mut sgd = vars.as_ref().map(|v| {
            let mut s = FlatSgd::new(
                v,
                &v.trainable_mask(kestrel_trainer::train::decayed),
                5e-4,
                0.937,
            );
            s.lr = 1e-3;
            s
        });
        for amp in [false, true] {
            // A fixed loss scale is enough here: the step's cost is what is measured.
            let scale = if amp { 1024.0 } else { 1.0 };
            let mut step = || {
                let y = model.forward_t(&x, true).unwrap();
                let loss = y.to_kind(tch::Kind::Float).square().mean(None);
                (loss * scale).backward();
                match (&vars, &mut sgd) {
                    (Some(v), Some(s)) => {
                        let g = tch::no_grad(|| v.gradients());
                        s.step(v, &g);
                        v.zero_gradients();
                    }
                    _ => {
                        opt.step();
                        opt.zero_grad();
                    }
                }
            };
            tch::autocast(amp, || {
                for _ in 0..5 {
                    step();
                }
                tch::Cuda::synchronize(0);
                let iters = 30;
                let t0 = std::time::Instant::now();
                for _ in 0..iters {
                    step();
                }
                tch::Cuda::synchronize(0);
                let s = t0.elapsed().as_secs_f64() / iters as f64;
                println!(
                    "{{\"tool\": \"kestrel-trainer (tch)\", \"optimizer\": \"{}\", \"precision\": \"{}\", \
                     \"batch\": {batch}, \"ms_per_step\": {:.3}, \"images_per_s\": {:.1}}}",
                    if flat { "flat SGD" } else { "libtorch SGD" },
                    if amp { "mixed (fp16 autocast)" } else { "fp32" },
                    s * 1e3,
                    batch as f64 / s
                );
            });
        }
    }
}
