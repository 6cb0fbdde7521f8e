//! A few optimiser steps of the real network on a tiny fixed batch lower YOLOv9's loss: the
//! model, the loss and their gradients fit together.
#![allow(clippy::unwrap_used)]

use kestrel_exporter::ModelConfig;
use kestrel_trainer::Gelan;
use kestrel_trainer::loss::{AssignerConfig, LossWeights, detection_loss, segmentation_loss};
use kestrel_trainer::model::anchor_points;
use tch::nn::OptimizerConfig;
use tch::{Device, Kind, Tensor, nn};

const STEPS: usize = 30;

/// libtorch's random generator is global: two tests seeding it and drawing their weights at
/// once (the test harness runs them on parallel threads) interleave their draws, so each run
/// starts from other weights. One test at a time keeps each run the same.
static TORCH_RNG: std::sync::Mutex<()> = std::sync::Mutex::new(());

#[test]
fn a_few_optimiser_steps_on_a_fixed_batch_lower_the_loss() {
    let _rng = TORCH_RNG
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    tch::manual_seed(0);
    let imgsz = 64usize;
    let cfg = ModelConfig::new("gelan-t", 2, imgsz).unwrap();
    let vs = nn::VarStore::new(Device::Cpu);
    let model = Gelan::new(&vs.root(), &cfg).unwrap();
    // Adam for a short, steady descent on one batch (the trainer's SGD schedule needs warm-up).
    let mut opt = nn::Adam::default().build(&vs, 3e-4).unwrap();

    // Two grey images, each with one bright square (class 0) or dark square (class 1).
    let images = Tensor::full(
        [2, 3, imgsz as i64, imgsz as i64],
        0.5,
        (Kind::Float, Device::Cpu),
    );
    let boxes = [[8.0f32, 12.0, 40.0, 44.0], [20.0, 16.0, 56.0, 48.0]];
    for (i, b) in boxes.iter().enumerate() {
        let value = if i == 0 { 1.0 } else { 0.0 };
        let _ = images
            .get(i as i64)
            .narrow(1, b[1] as i64, (b[3] - b[1]) as i64)
            .narrow(2, b[0] as i64, (b[2] - b[0]) as i64)
            .fill_(value);
    }
    let gt_classes = Tensor::from_slice(&[0i64, 1]).view([2, 1]);
    let gt_boxes = Tensor::from_slice(boxes.as_flattened()).view([2, 1, 4]);
    let valid = Tensor::ones([2, 1], (Kind::Float, Device::Cpu));
    let (anchors, strides) = anchor_points(&cfg, Device::Cpu);

    let mut losses = Vec::new();
    for _ in 0..STEPS {
        let raw = model.forward_raw_t(&images, true).unwrap();
        let loss = detection_loss(
            &raw,
            &anchors,
            &strides,
            &gt_classes,
            &gt_boxes,
            &valid,
            &LossWeights::default(),
            &AssignerConfig::default(),
        )
        .unwrap();
        // YOLOv9 scales the loss by the batch size.
        opt.backward_step(&(&loss.total * 2.0));
        losses.push(loss.total.double_value(&[]));
    }
    println!("loss per step: {losses:.3?}");
    let first = losses[0];
    let last: f64 = losses[losses.len() - 3..].iter().sum::<f64>() / 3.0;
    assert!(losses.iter().all(|l| l.is_finite()));
    assert!(last < 0.8 * first, "loss went from {first:.3} to {last:.3}");
}

#[test]
fn a_few_optimiser_steps_of_the_segmentation_loss_lower_it() {
    let _rng = TORCH_RNG
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    tch::manual_seed(0);
    let imgsz = 64usize;
    let cfg = ModelConfig::new("gelan-t-seg", 2, imgsz).unwrap();
    let vs = nn::VarStore::new(Device::Cpu);
    let model = Gelan::new(&vs.root(), &cfg).unwrap();
    let mut opt = nn::Adam::default().build(&vs, 3e-4).unwrap();

    // Two grey images: a bright disc (class 0) and a dark triangle (class 1), each with its
    // mask at a quarter of the input size.
    let s = imgsz as i64;
    let q = s / 4;
    let mut pixels = vec![0.5f32; 2 * 3 * (s * s) as usize];
    let mut masks = vec![0f32; 2 * (q * q) as usize];
    let inside = |i: usize, x: f32, y: f32| {
        if i == 0 {
            (x - 24.0).powi(2) + (y - 28.0).powi(2) < 14.0f32.powi(2)
        } else {
            // Right triangle with corners (20, 16), (56, 16), (20, 52).
            x >= 20.0 && y >= 16.0 && (x - 20.0) + (y - 16.0) < 36.0
        }
    };
    for i in 0..2 {
        let value = if i == 0 { 1.0 } else { 0.0 };
        for y in 0..s {
            for x in 0..s {
                if inside(i, x as f32 + 0.5, y as f32 + 0.5) {
                    for c in 0..3 {
                        pixels[i * 3 * (s * s) as usize
                            + c * (s * s) as usize
                            + (y * s + x) as usize] = value;
                    }
                }
            }
        }
        for y in 0..q {
            for x in 0..q {
                if inside(i, (x as f32 + 0.5) * 4.0, (y as f32 + 0.5) * 4.0) {
                    masks[i * (q * q) as usize + (y * q + x) as usize] = 1.0;
                }
            }
        }
    }
    let images = Tensor::from_slice(&pixels).view([2, 3, s, s]);
    let masks = Tensor::from_slice(&masks).view([2, q, q]);
    let boxes = [[10.0f32, 14.0, 38.0, 42.0], [20.0, 16.0, 56.0, 52.0]];
    let gt_classes = Tensor::from_slice(&[0i64, 1]).view([2, 1]);
    let gt_boxes = Tensor::from_slice(boxes.as_flattened()).view([2, 1, 4]);
    let valid = Tensor::ones([2, 1], (Kind::Float, Device::Cpu));
    let (anchors, strides) = anchor_points(&cfg, Device::Cpu);

    let mut losses = Vec::new();
    let mut mask_terms = Vec::new();
    for _ in 0..STEPS {
        let out = model.forward_outputs_t(&images, true, true).unwrap();
        let loss = segmentation_loss(
            &out.head,
            out.prototypes.as_ref().unwrap(),
            &anchors,
            &strides,
            &gt_classes,
            &gt_boxes,
            &valid,
            &masks,
            [s, s],
            &LossWeights::default(),
            &AssignerConfig::default(),
        )
        .unwrap();
        opt.backward_step(&(&loss.total * 2.0));
        losses.push(loss.total.double_value(&[]));
        mask_terms.push(loss.masks);
    }
    println!("loss per step: {losses:.3?}");
    println!("mask term per step: {mask_terms:.3?}");
    assert!(losses.iter().chain(&mask_terms).all(|l| l.is_finite()));
    let mean_last = |v: &[f64]| v[v.len() - 3..].iter().sum::<f64>() / 3.0;
    assert!(mask_terms[0] > 0.0, "the mask term counts");
    assert!(
        mean_last(&losses) < 0.8 * losses[0],
        "loss went from {:.3} to {:.3}",
        losses[0],
        mean_last(&losses)
    );
    assert!(
        mean_last(&mask_terms) < 0.8 * mask_terms[0],
        "mask term went from {:.3} to {:.3}",
        mask_terms[0],
        mean_last(&mask_terms)
    );
}
