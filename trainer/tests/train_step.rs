//! A few optimiser steps of the real network on a tiny fixed batch lower YOLOv9's loss: the
//! model, the loss and their gradients fit together.
#![allow(clippy::unwrap_used)]

use kestrel_exporter::ModelConfig;
use kestrel_trainer::Gelan;
use kestrel_trainer::loss::{AssignerConfig, LossWeights, detection_loss};
use kestrel_trainer::model::anchor_points;
use tch::nn::OptimizerConfig;
use tch::{Device, Kind, Tensor, nn};

const STEPS: usize = 30;

#[test]
fn a_few_optimiser_steps_on_a_fixed_batch_lower_the_loss() {
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
