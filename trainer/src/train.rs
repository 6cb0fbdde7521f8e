//! YOLOv9's training recipe on a [`Gelan`]: SGD (Nesterov momentum 0.937) with linear warm-up of
//! the learning rate and momentum, a linear or cosine decay to `lrf · lr0`, weight decay on
//! convolution weights only (not BatchNorm weights, not biases), gradient accumulation to a
//! nominal batch of 64, an exponential moving average (EMA) of the weights, optional mixed
//! precision (FP16 autocast with a dynamic loss scale) on CUDA, and checkpoints with exact resume.
//! The optimiser, the clipping and the EMA work on flat buffers ([`crate::optim`]); batches are
//! built on a loader thread while the previous one trains.

use std::path::Path;

use tch::nn;
use tch::{Device, Kind, Tensor};

use crate::data::{Batch, Loader};
use crate::error::{Error, Result};
use crate::loss::{AssignerConfig, LossWeights, detection_loss, segmentation_loss};
use crate::model::{Gelan, anchor_points};
use crate::optim::{FlatSgd, FlatVars};
use kestrel_exporter::ModelConfig;

/// Hyperparameters (YOLOv9's `hyp.scratch-high.yaml` defaults).
#[derive(Debug, Clone, PartialEq)]
pub struct TrainConfig {
    pub epochs: usize,
    /// Initial learning rate.
    pub lr0: f64,
    /// Final learning rate as a fraction of `lr0`.
    pub lrf: f64,
    pub momentum: f64,
    pub weight_decay: f64,
    /// Warm-up length in epochs (at least 100 iterations).
    pub warmup_epochs: f64,
    pub warmup_momentum: f64,
    /// Cosine instead of linear learning-rate decay.
    pub cosine: bool,
    /// Keep an exponential moving average of the weights (evaluated and exported).
    pub ema: bool,
    /// Batch size the loss and weight decay are tuned for; smaller batches accumulate gradients.
    pub nominal_batch: usize,
    pub loss: LossWeights,
    pub assigner: AssignerConfig,
    /// Mixed precision on CUDA: the forward pass under FP16 autocast, the loss in FP32, gradients
    /// scaled to stay representable (ignored on the CPU). Off by default: on the H200 we measured
    /// no gain (training there is bound by per-operation overhead, not arithmetic), and libtorch
    /// prints deprecation warnings for each of tch's autocast calls.
    pub amp: bool,
    /// Gradients are clipped to this L2 norm (over all parameters) before each step.
    pub max_grad_norm: f64,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            epochs: 100,
            lr0: 0.01,
            lrf: 0.01,
            momentum: 0.937,
            weight_decay: 5e-4,
            warmup_epochs: 3.0,
            warmup_momentum: 0.8,
            cosine: false,
            ema: true,
            nominal_batch: 64,
            loss: LossWeights::default(),
            assigner: AssignerConfig::default(),
            amp: false,
            max_grad_norm: 10.0,
        }
    }
}

impl TrainConfig {
    /// Learning-rate factor at (fractional) epoch `e`.
    pub fn lr_factor(&self, e: f64) -> f64 {
        let t = (e / self.epochs.max(1) as f64).clamp(0.0, 1.0);
        if self.cosine {
            ((1.0 - (t * std::f64::consts::PI).cos()) / 2.0) * (self.lrf - 1.0) + 1.0
        } else {
            (1.0 - t) * (1.0 - self.lrf) + self.lrf
        }
    }
}

/// Where a run is: completed epochs and optimiser steps. Saved with every checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RunState {
    /// Epochs completed.
    pub epoch: usize,
    /// Batches seen (forward/backward passes).
    pub iteration: u64,
    /// EMA updates made.
    pub ema_updates: u64,
}

/// The dynamic loss scale of mixed precision (PyTorch's `GradScaler` rule): gradients are
/// computed for `scale × loss`; a step whose gradients overflow is skipped and halves the scale,
/// and 2000 good steps in a row double it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LossScale {
    pub scale: f64,
    /// Good steps since the last change.
    pub good_steps: u64,
    /// Steps skipped because a gradient overflowed (since the run started or resumed).
    pub skipped_steps: u64,
}

impl LossScale {
    const INITIAL: f64 = 65536.0;
    const GROWTH_INTERVAL: u64 = 2000;

    fn new() -> Self {
        Self {
            scale: Self::INITIAL,
            good_steps: 0,
            skipped_steps: 0,
        }
    }

    fn update(&mut self, finite: bool) {
        if finite {
            self.good_steps += 1;
            if self.good_steps >= Self::GROWTH_INTERVAL {
                self.scale *= 2.0;
                self.good_steps = 0;
            }
        } else {
            self.scale = (self.scale / 2.0).max(1.0);
            self.good_steps = 0;
            self.skipped_steps += 1;
        }
    }
}

/// Mean loss terms of an epoch (each already weighted) and its throughput.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EpochSummary {
    pub epoch: usize,
    pub boxes: f64,
    pub classes: f64,
    pub dfl: f64,
    /// The mask term (0 for a detector).
    pub masks: f64,
    /// Training images per second (data loading included).
    pub images_per_s: f64,
    /// Optimiser steps skipped because FP16 gradients overflowed (mixed precision only).
    pub skipped_steps: u64,
}

/// One batch's report, for progress bars.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepReport {
    pub epoch: usize,
    pub batch: usize,
    pub batches: usize,
    pub boxes: f64,
    pub classes: f64,
    pub dfl: f64,
    /// The mask term (0 for a detector).
    pub masks: f64,
    pub lr: f64,
}

/// A model under training with its optimiser and EMA.
pub struct Trainer {
    pub vs: nn::VarStore,
    pub model: Gelan,
    /// The model's variables as views of one buffer, and the optimiser over it.
    vars: FlatVars,
    sgd: FlatSgd,
    ema: Option<Ema>,
    pub config: TrainConfig,
    pub state: RunState,
    /// Extra fields written into every checkpoint's JSON (the CLI records its data and seed).
    pub run_info: serde_json::Map<String, serde_json::Value>,
    anchors: Tensor,
    strides: Tensor,
    accumulate: usize,
    loss_scale: LossScale,
}

/// BatchNorm parameters live in this optimiser group of the VarStore; the weight decay itself
/// follows [`decayed`].
pub const NO_DECAY_GROUP: usize = 1;

/// YOLOv9's parameter groups: convolution weights are decayed; BatchNorm weights and all biases
/// are not.
pub fn decayed(name: &str) -> bool {
    name.ends_with(".weight") && !name.ends_with("bn.weight")
}

/// The exponential moving average of a model: its own VarStore and network, flat like the
/// model's.
struct Ema {
    vs: nn::VarStore,
    model: Gelan,
    vars: FlatVars,
}

impl Trainer {
    /// A fresh model of `model_config` on `device`, trained with batches of `batch_size`.
    pub fn new(
        model_config: &ModelConfig,
        config: TrainConfig,
        batch_size: usize,
        device: Device,
    ) -> Result<Self> {
        if batch_size == 0 {
            return Err(Error::Data("batch size 0: give at least 1".into()));
        }
        if device.is_cuda() {
            // Let cuDNN time its algorithms for each layer's shapes (they never change here).
            tch::Cuda::cudnn_set_benchmark(true);
        }
        let vs = nn::VarStore::new(device);
        let model = Gelan::new(&vs.root(), model_config)?;
        let vars = FlatVars::bind(&vs);
        let ema = if config.ema {
            let mut evs = nn::VarStore::new(device);
            let em = Gelan::new(&evs.root(), model_config)?;
            evs.copy(&vs)?;
            evs.freeze();
            let evars = FlatVars::bind_like(&evs, &vars);
            Some(Ema {
                vs: evs,
                model: em,
                vars: evars,
            })
        } else {
            None
        };
        let accumulate = (config.nominal_batch as f64 / batch_size as f64)
            .round()
            .max(1.0) as usize;
        // YOLOv9 scales the decay with the effective batch.
        let decay =
            config.weight_decay * (batch_size * accumulate) as f64 / config.nominal_batch as f64;
        let mut sgd = FlatSgd::new(&vars, &vars.trainable_mask(decayed), decay, config.momentum);
        sgd.lr = config.lr0;
        let (anchors, strides) = anchor_points(model_config, device);
        Ok(Self {
            vs,
            model,
            vars,
            sgd,
            ema,
            config,
            state: RunState::default(),
            run_info: serde_json::Map::new(),
            anchors,
            strides,
            accumulate,
            loss_scale: LossScale::new(),
        })
    }

    /// The weights to evaluate and export: the EMA when kept, else the trained ones.
    pub fn eval_model(&self) -> &Gelan {
        self.ema.as_ref().map_or(&self.model, |e| &e.model)
    }

    /// True when the forward pass runs under FP16 autocast (AMP asked for, model on CUDA).
    pub fn mixed_precision(&self) -> bool {
        self.config.amp && self.vs.device().is_cuda()
    }

    /// The current loss scale (1 without mixed precision).
    pub fn loss_scale(&self) -> LossScale {
        self.loss_scale
    }

    /// The loss of one batch at the current weights (training-mode BatchNorm), without a step.
    /// With mixed precision only the network runs under FP16 autocast; the loss (assignment,
    /// IoUs, the DFL expectation) stays in FP32. (YOLOv9 runs its loss under autocast too; a run
    /// of ours with the whole step under autocast diverged, cause not isolated, so we do not.)
    pub fn batch_loss(&self, batch: &Batch) -> Result<crate::loss::LossTerms> {
        let out = tch::autocast(self.mixed_precision(), || {
            self.model.forward_outputs_t(&batch.images, true, true)
        })?;
        let raw = out.head.to_kind(Kind::Float);
        if let Some(prototypes) = &out.prototypes {
            let masks = batch.masks.as_ref().ok_or_else(|| {
                Error::Data(
                    "a segmentation model needs batches with masks (the loader's `masks` is off)"
                        .into(),
                )
            })?;
            let [h, w] = self.model.config().imgsz.map(|v| v as i64);
            return segmentation_loss(
                &raw,
                &prototypes.to_kind(Kind::Float),
                &self.anchors,
                &self.strides,
                &batch.classes,
                &batch.boxes,
                &batch.valid,
                masks,
                [w, h],
                &self.config.loss,
                &self.config.assigner,
            );
        }
        detection_loss(
            &raw,
            &self.anchors,
            &self.strides,
            &batch.classes,
            &batch.boxes,
            &batch.valid,
            &self.config.loss,
            &self.config.assigner,
        )
    }

    /// Train one epoch (`self.state.epoch`) over `loader`, calling `progress` after each batch.
    pub fn train_epoch(
        &mut self,
        loader: &Loader,
        mut progress: impl FnMut(&StepReport),
    ) -> Result<EpochSummary> {
        let epoch = self.state.epoch;
        let nb = loader.batches_per_epoch();
        let warmup = ((self.config.warmup_epochs * nb as f64).round() as u64).max(100);
        let started = std::time::Instant::now();
        let device = self.vs.device();
        let (mut sums, mut images) = ([0.0f64; 4], 0usize);
        let skipped_before = self.loss_scale.skipped_steps;
        self.vars.zero_gradients();
        // The loader thread builds the next batches on the CPU while this one trains.
        let mut b = 0;
        loader.for_each_batch((0..nb).map(|b| (epoch, b)), |batch| -> Result<()> {
            let batch = batch.to_device(device);
            self.train_batch(&batch, epoch, b, nb, warmup, &mut sums, &mut progress)?;
            images += batch.indices.len();
            b += 1;
            Ok(())
        })?;
        self.state.epoch += 1;
        let n = images.max(1) as f64;
        Ok(EpochSummary {
            epoch,
            boxes: sums[0] / n,
            classes: sums[1] / n,
            dfl: sums[2] / n,
            masks: sums[3] / n,
            images_per_s: images as f64 / started.elapsed().as_secs_f64().max(1e-9),
            skipped_steps: self.loss_scale.skipped_steps - skipped_before,
        })
    }

    /// Forward, backward and (every `accumulate` batches, and at the epoch's end) an optimiser
    /// step for batch `b` of `nb`; adds the weighted loss terms × images to `sums`.
    #[allow(clippy::too_many_arguments)]
    fn train_batch(
        &mut self,
        batch: &Batch,
        epoch: usize,
        b: usize,
        nb: usize,
        warmup: u64,
        sums: &mut [f64; 4],
        progress: &mut impl FnMut(&StepReport),
    ) -> Result<()> {
        {
            let it = self.state.iteration;
            let lr = self.config.lr0 * self.config.lr_factor(epoch as f64);
            let (lr, momentum) = if it < warmup {
                let f = it as f64 / warmup as f64;
                (
                    lr * f,
                    self.config.warmup_momentum
                        + (self.config.momentum - self.config.warmup_momentum) * f,
                )
            } else {
                (lr, self.config.momentum)
            };
            self.sgd.lr = lr;
            self.sgd.momentum = momentum;

            let loss = self.batch_loss(batch)?;
            let n = batch.indices.len();
            let scale = if self.mixed_precision() {
                self.loss_scale.scale
            } else {
                1.0
            };
            // YOLOv9 scales the loss by the batch size.
            (&loss.total * (n as f64 * scale)).backward();
            self.state.iteration += 1;
            if self.state.iteration.is_multiple_of(self.accumulate as u64) || b + 1 == nb {
                if let Some(grad) = self.unscale_and_clip(scale) {
                    self.sgd.step(&self.vars, &grad);
                    self.update_ema();
                }
                self.vars.zero_gradients();
            }
            let terms = [loss.boxes, loss.classes, loss.dfl, loss.masks];
            for (s, v) in sums.iter_mut().zip(terms) {
                *s += v * n as f64;
            }
            if terms.iter().any(|v| !v.is_finite()) {
                return Err(Error::Data(format!(
                    "the loss became {} at epoch {epoch}, batch {b}: lower the learning rate",
                    terms.iter().sum::<f64>()
                )));
            }
            progress(&StepReport {
                epoch,
                batch: b,
                batches: nb,
                boxes: loss.boxes,
                classes: loss.classes,
                dfl: loss.dfl,
                masks: loss.masks,
                lr,
            });
        }
        Ok(())
    }

    /// The flat gradient divided by the loss `scale` and clipped to a global L2 norm of
    /// `max_grad_norm`; `None`, and nothing to update, when a gradient is not finite (an FP16
    /// overflow under mixed precision: the step is skipped and the scale halved).
    fn unscale_and_clip(&mut self, scale: f64) -> Option<Tensor> {
        let grad = tch::no_grad(|| self.vars.gradients());
        let norm = tch::no_grad(|| grad.norm().double_value(&[])) / scale;
        let finite = norm.is_finite();
        if self.mixed_precision() {
            self.loss_scale.update(finite);
        }
        if !finite {
            return None;
        }
        let factor = (self.config.max_grad_norm / (norm + 1e-6)).min(1.0) / scale;
        Some(if factor != 1.0 { grad * factor } else { grad })
    }

    /// ema = d · ema + (1 − d) · model, d ramping to 0.9999 (YOLOv9's `ModelEMA`), over every
    /// variable including BatchNorm statistics: two operations on the flat buffers.
    fn update_ema(&mut self) {
        let Some(ema) = &mut self.ema else {
            return;
        };
        self.state.ema_updates += 1;
        let d = 0.9999 * (1.0 - (-(self.state.ema_updates as f64) / 2000.0).exp());
        tch::no_grad(|| {
            let mut e = ema.vars.flat.shallow_clone();
            let _ = e.g_mul_scalar_(d);
            let _ = e.g_add_(&(&self.vars.flat * (1.0 - d)));
        });
    }

    /// Write `{stem}.safetensors` (weights), `{stem}.ema.safetensors` (EMA weights, when kept),
    /// `{stem}.optim.safetensors` (SGD's momentum) and `{stem}.json` (run state and
    /// hyperparameters) in `dir`. Files are written to a
    /// temporary name and renamed, so an interrupted save leaves the previous checkpoint whole.
    pub fn save(&self, dir: &Path, stem: &str) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| Error::Data(format!("{}: {e}", dir.display())))?;
        let tmp = |p: &Path| p.with_extension("tmp.safetensors");
        let weights = dir.join(format!("{stem}.safetensors"));
        self.vs.save(tmp(&weights))?;
        rename(&tmp(&weights), &weights)?;
        if let Some(ema) = &self.ema {
            let path = dir.join(format!("{stem}.ema.safetensors"));
            ema.vs.save(tmp(&path))?;
            rename(&tmp(&path), &path)?;
        }
        let optim = dir.join(format!("{stem}.optim.safetensors"));
        Tensor::write_safetensors(&[("momentum", &self.sgd.momentum_buffer)], tmp(&optim))?;
        rename(&tmp(&optim), &optim)?;
        let model = self.model.config();
        let mut state = serde_json::json!({
            "model": model.spec.name,
            "classes": model.num_classes,
            "imgsz": model.imgsz[0],
            "epoch": self.state.epoch,
            "iteration": self.state.iteration,
            "ema_updates": self.state.ema_updates,
            "epochs": self.config.epochs,
            "lr0": self.config.lr0,
            "lrf": self.config.lrf,
            "cosine": self.config.cosine,
            "loss_scale": self.loss_scale.scale,
        });
        if let Some(obj) = state.as_object_mut() {
            for (k, v) in &self.run_info {
                obj.insert(k.clone(), v.clone());
            }
        }
        let json = dir.join(format!("{stem}.json"));
        let tmp_json = json.with_extension("json.tmp");
        std::fs::write(&tmp_json, format!("{state:#}\n"))
            .map_err(|e| Error::Data(format!("{}: {e}", tmp_json.display())))?;
        rename(&tmp_json, &json)
    }

    /// Load a checkpoint written by [`Self::save`] into this trainer (same model and settings):
    /// weights, EMA, momentum and run state, so the run continues as if never stopped.
    pub fn resume(&mut self, dir: &Path, stem: &str) -> Result<()> {
        let weights = dir.join(format!("{stem}.safetensors"));
        self.vs
            .load(&weights)
            .map_err(|e| checkpoint_error(&weights, e))?;
        // Loading replaces the variables' storage: make them views of one buffer again.
        self.vars = FlatVars::bind(&self.vs);
        if let Some(ema) = &mut self.ema {
            let path = dir.join(format!("{stem}.ema.safetensors"));
            ema.vs.load(&path).map_err(|e| checkpoint_error(&path, e))?;
            ema.vars = FlatVars::bind_like(&ema.vs, &self.vars);
        }
        let optim = dir.join(format!("{stem}.optim.safetensors"));
        let momentum = Tensor::read_safetensors(&optim)
            .map_err(|e| checkpoint_error(&optim, e))?
            .into_iter()
            .find(|(name, _)| name == "momentum")
            .map(|(_, t)| t)
            .ok_or_else(|| Error::Data(format!("{}: no \"momentum\" tensor", optim.display())))?;
        if momentum.size() != self.sgd.momentum_buffer.size() {
            return Err(Error::Data(format!(
                "{}: momentum for {:?} elements, this model trains {:?}",
                optim.display(),
                momentum.size(),
                self.sgd.momentum_buffer.size()
            )));
        }
        tch::no_grad(|| self.sgd.momentum_buffer.copy_(&momentum));
        let json = dir.join(format!("{stem}.json"));
        let text = std::fs::read_to_string(&json)
            .map_err(|e| Error::Data(format!("{}: {e}", json.display())))?;
        let v: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| Error::Data(format!("{}: not a run state ({e})", json.display())))?;
        let field = |key: &str| -> Result<u64> {
            v.get(key)
                .and_then(serde_json::Value::as_u64)
                .ok_or_else(|| {
                    Error::Data(format!(
                        "{}: no number \"{key}\" in the run state",
                        json.display()
                    ))
                })
        };
        self.state = RunState {
            epoch: field("epoch")? as usize,
            iteration: field("iteration")?,
            ema_updates: field("ema_updates")?,
        };
        if let Some(scale) = v.get("loss_scale").and_then(serde_json::Value::as_f64) {
            self.loss_scale.scale = scale;
        }
        Ok(())
    }
}

fn rename(from: &Path, to: &Path) -> Result<()> {
    std::fs::rename(from, to)
        .map_err(|e| Error::Data(format!("{} → {}: {e}", from.display(), to.display())))
}

fn checkpoint_error(path: &Path, e: tch::TchError) -> Error {
    Error::Data(format!(
        "{}: not a checkpoint of this model ({e}); check --model and the file",
        path.display()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_loss_scale_halves_on_overflow_and_doubles_after_2000_good_steps() {
        let mut s = LossScale::new();
        s.update(false);
        s.update(false);
        assert_eq!((s.scale, s.skipped_steps), (16384.0, 2));
        for _ in 0..1999 {
            s.update(true);
        }
        assert_eq!(s.scale, 16384.0);
        s.update(true);
        assert_eq!((s.scale, s.good_steps), (32768.0, 0));
        // An overflow resets the run of good steps; the scale never goes below 1.
        for _ in 0..40 {
            s.update(false);
        }
        assert_eq!((s.scale, s.good_steps), (1.0, 0));
    }
}
