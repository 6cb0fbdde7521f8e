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
    let config = TrainConfig {
        epochs: 3,
        ..Default::default()
    };
    let mut trainer = Trainer::new(&cfg, config, batch, Device::Cuda(0)).unwrap();
    assert!(trainer.vs.device().is_cuda());
    // The first epoch warms up cuDNN's algorithm choice; the second is timed.
    let first = trainer.train_epoch(&loader, |_| {}).unwrap();
    let second = trainer.train_epoch(&loader, |_| {}).unwrap();
    println!(
        "gelan-s {imgsz}px batch {batch} on cuda:0: epoch 1 {:.1} images/s, epoch 2 {:.1} images/s \
         (fp32, data loading on {} threads included); loss box {:.3} cls {:.3} dfl {:.3}",
        first.images_per_s,
        second.images_per_s,
        loader.workers,
        second.boxes,
        second.classes,
        second.dfl
    );
    for v in [second.boxes, second.classes, second.dfl] {
        assert!(v.is_finite());
    }
}
