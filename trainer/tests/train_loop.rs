//! The data loader and the training loop: deterministic batches, flips that move the boxes with
//! the pixels, checkpoints that resume where they left off, clear errors for unusable data.
#![allow(clippy::unwrap_used)]

use kestrel_exporter::ModelConfig;
use kestrel_trainer::data::{Loader, Source};
use kestrel_trainer::train::{TrainConfig, Trainer};
use tch::Device;

fn synthetic(count: usize) -> Source {
    Source::Synthetic {
        seed: 7,
        count,
        size: 64,
    }
}

#[test]
fn batches_are_deterministic_and_flips_move_the_boxes() {
    let mut loader = Loader::new(synthetic(6), 64, 4, 1).unwrap();
    assert_eq!(loader.batches_per_epoch(), 2);
    let a = loader.batch(0, 0).unwrap();
    let b = loader.batch(0, 0).unwrap();
    assert_eq!(a.indices, b.indices);
    assert!(a.images.equal(&b.images) && a.boxes.equal(&b.boxes));
    assert_eq!(a.images.size(), vec![4, 3, 64, 64]);
    // Another epoch, another order (same images overall).
    let mut e0 = loader.order(0);
    let mut e1 = loader.order(1);
    assert_ne!(e0, e1);
    e0.sort_unstable();
    e1.sort_unstable();
    assert_eq!(e0, e1);

    // Flips alone (the other augmentations are not mirror-symmetric).
    loader.scale = 0.0;
    loader.translate = 0.0;
    loader.hsv = [0.0; 3];
    loader.mosaic = 0.0;
    loader.flip = 0.0;
    let plain = loader.batch(0, 0).unwrap();
    loader.flip = 1.0;
    let flipped = loader.batch(0, 0).unwrap();
    assert!(plain.images.flip([3]).equal(&flipped.images));
    let (p, f) = (
        Vec::<f32>::try_from(plain.boxes.flatten(0, -1)).unwrap(),
        Vec::<f32>::try_from(flipped.boxes.flatten(0, -1)).unwrap(),
    );
    let valid = Vec::<f32>::try_from(plain.valid.flatten(0, -1)).unwrap();
    assert!(valid.iter().any(|&v| v > 0.0), "the scenes have objects");
    for (k, v) in valid.iter().enumerate() {
        if *v > 0.0 {
            let (pb, fb) = (&p[k * 4..k * 4 + 4], &f[k * 4..k * 4 + 4]);
            assert!((fb[0] - (64.0 - pb[2])).abs() < 1e-4 && (fb[2] - (64.0 - pb[0])).abs() < 1e-4);
            assert_eq!((fb[1], fb[3]), (pb[1], pb[3]));
        }
    }
}

#[test]
fn augmentation_changes_the_pixels_and_keeps_boxes_in_the_image() {
    let loader = Loader::new(synthetic(8), 64, 8, 2).unwrap();
    let mut plain = loader.clone();
    plain.scale = 0.0;
    plain.translate = 0.0;
    plain.hsv = [0.0; 3];
    plain.mosaic = 0.0;
    let a = loader.batch(0, 0).unwrap();
    let b = plain.batch(0, 0).unwrap();
    assert!(!a.images.equal(&b.images));
    let boxes = Vec::<f32>::try_from(a.boxes.flatten(0, -1)).unwrap();
    let valid = Vec::<f32>::try_from(a.valid.flatten(0, -1)).unwrap();
    assert!(valid.iter().filter(|&&v| v > 0.0).count() > 4);
    for (k, v) in valid.iter().enumerate() {
        if *v > 0.0 {
            let bx = &boxes[k * 4..k * 4 + 4];
            assert!(
                bx[0] >= 0.0 && bx[1] >= 0.0 && bx[2] <= 64.0 && bx[3] <= 64.0,
                "{bx:?}"
            );
            assert!(bx[2] - bx[0] > 2.0 && bx[3] - bx[1] > 2.0, "{bx:?}");
        }
    }
    let px = Vec::<f32>::try_from(a.images.flatten(0, -1)).unwrap();
    assert!(px.iter().all(|v| (0.0..=1.0).contains(v)));
}

#[test]
fn mosaics_gather_the_objects_of_four_images() {
    let mut single = Loader::new(synthetic(16), 64, 16, 4).unwrap();
    single.scale = 0.0;
    single.translate = 0.0;
    single.hsv = [0.0; 3];
    single.mosaic = 0.0;
    let mut mosaic = single.clone();
    mosaic.mosaic = 1.0;
    let count = |l: &Loader| {
        let b = l.batch(0, 0).unwrap();
        Vec::<f32>::try_from(b.valid.flatten(0, -1))
            .unwrap()
            .iter()
            .filter(|&&v| v > 0.0)
            .count()
    };
    let (one, four) = (count(&single), count(&mosaic));
    println!("objects in a batch of 16: {one} single images, {four} mosaics");
    assert!(four > one, "{four} vs {one}");
    let a = mosaic.batch(1, 0).unwrap();
    let b = mosaic.batch(1, 0).unwrap();
    assert!(a.images.equal(&b.images) && a.boxes.equal(&b.boxes));
    let boxes = Vec::<f32>::try_from(a.boxes.flatten(0, -1)).unwrap();
    assert!(boxes.iter().all(|v| (0.0..=64.0).contains(v)));
}

#[test]
fn unusable_data_is_refused_with_the_reason() {
    let e = Loader::new(synthetic(0), 64, 4, 1).unwrap_err().to_string();
    assert!(e.contains("no images"), "{e}");
    let e = Loader::new(synthetic(4), 50, 4, 1).unwrap_err().to_string();
    assert!(e.contains("multiple of 32"), "{e}");
    let e = Loader::new(synthetic(4), 64, 0, 1).unwrap_err().to_string();
    assert!(e.contains("batch size 0"), "{e}");
    let e = kestrel_trainer::data::open_source(
        "synthetic:x",
        64,
        kestrel_runtime::dataset::Split::Train,
        None,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("synthetic[:SEED[:COUNT]]"), "{e}");
}

#[test]
fn a_checkpoint_resumes_with_the_same_next_step_loss() {
    tch::manual_seed(0);
    let cfg = ModelConfig::new("gelan-t", 6, 64).unwrap();
    let loader = Loader::new(synthetic(8), 64, 4, 3).unwrap();
    let config = TrainConfig {
        epochs: 3,
        ..Default::default()
    };
    let mut trainer = Trainer::new(&cfg, config.clone(), 4, Device::Cpu).unwrap();
    let mut reports = 0;
    let summary = trainer.train_epoch(&loader, |_| reports += 1).unwrap();
    assert_eq!(reports, 2);
    assert!(summary.boxes.is_finite() && summary.classes > 0.0 && summary.dfl.is_finite());
    assert_eq!(trainer.state.epoch, 1);

    let dir = std::env::temp_dir().join(format!("kestrel-trainer-ckpt-{}", std::process::id()));
    trainer.save(&dir, "last").unwrap();
    let next = loader.batch(1, 0).unwrap();
    let want = trainer.batch_loss(&next).unwrap();

    let mut resumed = Trainer::new(&cfg, config, 4, Device::Cpu).unwrap();
    resumed.resume(&dir, "last").unwrap();
    assert_eq!(resumed.state, trainer.state);
    let got = resumed.batch_loss(&next).unwrap();
    let (w, g) = (want.total.double_value(&[]), got.total.double_value(&[]));
    assert!((w - g).abs() < 1e-6 * w.abs().max(1.0), "{w} vs {g}");
    // Momentum and EMA come back too: another epoch from the checkpoint ends where the
    // uninterrupted run's does.
    trainer.train_epoch(&loader, |_| {}).unwrap();
    resumed.train_epoch(&loader, |_| {}).unwrap();
    let after = resumed.vs.variables();
    let mut worst = 0f64;
    for (name, t) in trainer.vs.variables() {
        let d = (&t - &after[&name]).abs().max().double_value(&[]);
        // Bit-identical here; without the momentum it is off by about 1e-5.
        assert!(d < 1e-7, "{name}: {d}");
        worst = worst.max(d);
    }

    println!("resumed vs uninterrupted, after one more epoch: max weight difference {worst:e}");

    // A checkpoint of another model is refused, naming the file.
    let other = ModelConfig::new("gelan-s", 6, 64).unwrap();
    let mut wrong = Trainer::new(&other, TrainConfig::default(), 4, Device::Cpu).unwrap();
    let e = wrong.resume(&dir, "last").unwrap_err().to_string();
    assert!(e.contains("last.safetensors"), "{e}");
    let _ = std::fs::remove_dir_all(dir);
}

/// Labels of a `[B, H, W]` mask batch, row-major per image.
fn mask_values(batch: &kestrel_trainer::data::Batch) -> (Vec<f32>, i64) {
    let m = batch.masks.as_ref().expect("masks");
    let side = m.size()[1];
    (Vec::<f32>::try_from(m.flatten(0, -1)).unwrap(), side)
}

/// Every labelled mask cell lies inside its object's box (one cell of slack), and every object
/// of a reasonable size has some.
fn masks_follow_the_boxes(batch: &kestrel_trainer::data::Batch, what: &str) {
    let (masks, side) = mask_values(batch);
    let side = side as usize;
    let boxes = Vec::<f32>::try_from(batch.boxes.flatten(0, -1)).unwrap();
    let valid = Vec::<f32>::try_from(batch.valid.flatten(0, -1)).unwrap();
    let n = batch.indices.len();
    let most = valid.len() / n;
    let mut labelled = 0;
    for i in 0..n {
        let plane = &masks[i * side * side..(i + 1) * side * side];
        let objects = (0..most).filter(|&k| valid[i * most + k] > 0.0).count();
        let mut cells = vec![0usize; objects];
        for (p, &v) in plane.iter().enumerate() {
            if v == 0.0 {
                continue;
            }
            let k = v as usize - 1;
            assert!(k < objects, "{what}: label {v} with {objects} objects");
            cells[k] += 1;
            let b = &boxes[(i * most + k) * 4..(i * most + k) * 4 + 4];
            let (x, y) = ((p % side) as f32 * 4.0 + 2.0, (p / side) as f32 * 4.0 + 2.0);
            assert!(
                x > b[0] - 4.0 && x < b[2] + 4.0 && y > b[1] - 4.0 && y < b[3] + 4.0,
                "{what}: a cell of object {k} at ({x}, {y}) is outside its box {b:?}"
            );
        }
        for (k, &c) in cells.iter().enumerate() {
            let b = &boxes[(i * most + k) * 4..(i * most + k) * 4 + 4];
            if (b[2] - b[0]).min(b[3] - b[1]) >= 16.0 {
                assert!(c > 0, "{what}: object {k} {b:?} has no mask cell");
            }
            labelled += usize::from(c > 0);
        }
    }
    assert!(labelled > 0, "{what}: no object has a mask");
}

#[test]
fn segmentation_batches_carry_masks_that_move_with_the_pixels() {
    use kestrel_runtime::segments::{Segmentation, paint_order_masks};
    use kestrel_runtime::synth::{image_seed, render_scene};
    let size = 128u32;
    let source = Source::Synthetic {
        seed: 7,
        count: 6,
        size,
    };
    let mut loader = Loader::new(source, size, 3, 1).unwrap();
    loader.masks = true;
    // Without augmentation the masks are the scenes' visible masks sampled at cell centres.
    let augmented = loader.clone();
    loader.scale = 0.0;
    loader.translate = 0.0;
    loader.hsv = [0.0; 3];
    loader.mosaic = 0.0;
    loader.flip = 0.0;
    let plain = loader.batch(0, 0).unwrap();
    let (masks, side) = mask_values(&plain);
    let side = side as usize;
    for (i, &index) in plain.indices.iter().enumerate() {
        let (_, objects) = render_scene(image_seed(7, index), size, size);
        let segments: Vec<Segmentation> = objects
            .iter()
            .map(|o| Segmentation::Polygons(vec![o.polygon.clone()]))
            .collect();
        let refs: Vec<&Segmentation> = segments.iter().collect();
        let visible = paint_order_masks(&refs, size as usize, size as usize).unwrap();
        let bitmaps: Vec<_> = visible.iter().map(|r| r.decode().unwrap()).collect();
        let mut differ = 0;
        for v in 0..side {
            for u in 0..side {
                let (x, y) = (u * 4 + 2, v * 4 + 2);
                let want = bitmaps
                    .iter()
                    .position(|b| b.data[y * size as usize + x] != 0)
                    .map_or(0.0, |k| (k + 1) as f32);
                differ += usize::from(masks[i * side * side + v * side + u] != want);
            }
        }
        assert_eq!(
            differ, 0,
            "image {i}: {differ} cells differ from the scene's masks"
        );
    }
    masks_follow_the_boxes(&plain, "plain");
    // A flip mirrors the masks.
    loader.flip = 1.0;
    let flipped = loader.batch(0, 0).unwrap();
    assert!(
        plain
            .masks
            .as_ref()
            .unwrap()
            .flip([2])
            .equal(flipped.masks.as_ref().unwrap()),
        "flipped masks"
    );

    // YOLOv9's augmentation (mosaic, zoom, shift, flips): masks stay with their boxes.
    for epoch in 0..3 {
        let batch = augmented.batch(epoch, 0).unwrap();
        assert_eq!(batch.masks.as_ref().unwrap().size(), vec![3, 32, 32]);
        masks_follow_the_boxes(&batch, &format!("augmented, epoch {epoch}"));
    }
    let again = augmented.batch(0, 0).unwrap();
    assert!(
        augmented
            .batch(0, 0)
            .unwrap()
            .masks
            .unwrap()
            .equal(again.masks.as_ref().unwrap()),
        "deterministic"
    );
}
