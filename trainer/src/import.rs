//! Weights trained with the original YOLOv9 Python code, into a Kestrel training model.
//!
//! The input is a YOLOv9 `state_dict` saved as safetensors (`scripts/py/yolov9_to_safetensors.py`
//! writes one from a `.pt` checkpoint). Kestrel's training-form variables carry YOLOv9's module
//! names (`model.{layer}.cv1.conv.weight`, `….bn.running_var`, RepConvN's `conv1`/`conv2`,
//! DDetect's `cv2`/`cv3`), so two layouts are recognised:
//!
//! - **GELAN** (`gelan-*.yaml` checkpoints): every name maps to itself.
//! - **YOLOv9 dual branch** (`yolov9-c.yaml` and kin, trained with programmable gradient
//!   information): YOLOv9's reparameterization keeps the main branch and drops the auxiliary one.
//!   GELAN layer `i` before the head is YOLOv9 layer `i + shift` (`shift` = 1 when the checkpoint
//!   starts with the parameter-free `Silence` layer 0), and the head's `cv2` / `cv3` are the
//!   `DualDDetect`'s main-branch `cv4` / `cv5` (its last layer). For yolov9-c → gelan-c that is
//!   layers 1..=22 → 0..=21 and `model.38.cv4/cv5` → `model.22.cv2/cv3`, as in YOLOv9's
//!   `tools/reparameterization.ipynb`.
//!
//! Every variable of the model must be found with the same shape, or the import fails naming it;
//! `num_batches_tracked` counters and the fixed DFL projection are not variables here. FP16
//! checkpoints are widened to FP32.

use std::collections::HashMap;
use std::path::Path;

use tch::{Kind, Tensor, nn};

use crate::error::{Error, Result};

/// How the checkpoint's names relate to the model's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// The same names (a GELAN checkpoint).
    Gelan,
    /// A YOLOv9 dual-branch checkpoint: layer `i` is checkpoint layer `i + shift`; the head is
    /// checkpoint layer `head`'s `cv4` (boxes) and `cv5` (classes).
    Dual { shift: usize, head: usize },
}

/// What an import did.
#[derive(Debug, Clone, PartialEq)]
pub struct ImportReport {
    pub layout: Layout,
    /// Variables of the model filled from the checkpoint.
    pub loaded: usize,
    /// Checkpoint tensors not used: the auxiliary branch of a dual checkpoint, counters, the DFL
    /// projection.
    pub unused: usize,
}

/// The tensors of a safetensors file, by name, widened to FP32 where they are floating point.
pub fn read_checkpoint(path: &Path) -> Result<HashMap<String, Tensor>> {
    let tensors = Tensor::read_safetensors(path).map_err(|e| {
        Error::Data(format!(
            "{}: not a safetensors state dict ({e}); convert a YOLOv9 .pt with \
             scripts/py/yolov9_to_safetensors.py",
            path.display()
        ))
    })?;
    Ok(tensors
        .into_iter()
        .map(|(name, t)| {
            let t = if t.is_floating_point() {
                t.to_kind(Kind::Float)
            } else {
                t
            };
            (name, t)
        })
        .collect())
}

/// Number of classes of a checkpoint: the output channels of its head's first class convolution
/// (`cv3.0.2`, or `cv5.0.2` of a dual head).
pub fn checkpoint_classes(tensors: &HashMap<String, Tensor>) -> Result<usize> {
    let mut found = tensors.iter().filter_map(|(name, t)| {
        let rest = name.strip_prefix("model.")?;
        let (_, rest) = rest.split_once('.')?;
        matches!(rest, "cv3.0.2.weight" | "cv5.0.2.weight").then(|| (rest, t.size()[0]))
    });
    let mut best: Option<(&str, i64)> = None;
    for (rest, nc) in found.by_ref() {
        // A dual head has both: the main branch (cv5) decides.
        if best.is_none() || rest.starts_with("cv5") {
            best = Some((rest, nc));
        }
    }
    best.map(|(_, nc)| nc as usize).ok_or_else(|| {
        Error::Data(
            "the checkpoint has no detection head (no model.N.cv3.0.2.weight or \
             model.N.cv5.0.2.weight): is it a YOLOv9 / GELAN detection state dict?"
                .into(),
        )
    })
}

/// Split `model.{layer}.{rest}`.
fn layer_of(name: &str) -> Option<(usize, &str)> {
    let rest = name.strip_prefix("model.")?;
    let (layer, rest) = rest.split_once('.')?;
    Some((layer.parse().ok()?, rest))
}

/// The checkpoint name holding the model's variable `name` under `layout`; `head` is the model's
/// detection layer.
pub fn source_name(name: &str, layout: Layout, head: usize) -> Option<String> {
    match layout {
        Layout::Gelan => Some(name.to_string()),
        Layout::Dual { shift, head: src } => {
            let (i, rest) = layer_of(name)?;
            if i < head {
                Some(format!("model.{}.{rest}", i + shift))
            } else if i == head {
                let rest = rest
                    .strip_prefix("cv2.")
                    .map(|r| format!("cv4.{r}"))
                    .or_else(|| rest.strip_prefix("cv3.").map(|r| format!("cv5.{r}")))?;
                Some(format!("model.{src}.{rest}"))
            } else {
                None
            }
        }
    }
}

/// The layout of a checkpoint: GELAN when it has the model's head names, dual when some layer
/// has `cv4` and `cv5` head convolutions.
fn detect_layout(tensors: &HashMap<String, Tensor>, head: usize) -> Result<Layout> {
    if tensors.contains_key(&format!("model.{head}.cv3.0.2.weight"))
        && !tensors.keys().any(|k| k.contains(".cv5.0.2."))
    {
        return Ok(Layout::Gelan);
    }
    let dual_head = tensors
        .keys()
        .filter(|k| k.ends_with(".cv5.0.2.weight"))
        .filter_map(|k| layer_of(k).map(|(i, _)| i))
        .max();
    match dual_head {
        Some(src) => {
            let shift = usize::from(!tensors.keys().any(|k| k.starts_with("model.0.")));
            Ok(Layout::Dual { shift, head: src })
        }
        None => Err(Error::Data(format!(
            "the checkpoint's head is not layer {head} of this model, and it has no dual-branch \
             head (cv4/cv5): check --model"
        ))),
    }
}

/// Fill every variable of `vs` (a model whose detection layer is `head`) from `tensors`.
pub fn import_weights(
    vs: &mut nn::VarStore,
    tensors: &HashMap<String, Tensor>,
    head: usize,
) -> Result<ImportReport> {
    let layout = detect_layout(tensors, head)?;
    let mut used = std::collections::HashSet::new();
    let mut problems = Vec::new();
    let variables = vs.variables();
    let mut names: Vec<&String> = variables.keys().collect();
    names.sort();
    tch::no_grad(|| {
        for name in names {
            let mut var = variables[name].shallow_clone();
            let Some(src) = source_name(name, layout, head) else {
                problems.push(format!("{name}: no place in a {layout:?} checkpoint"));
                continue;
            };
            match tensors.get(&src) {
                None => problems.push(format!("{name}: {src} is missing")),
                Some(t) if t.size() != var.size() => problems.push(format!(
                    "{name}: {src} is {:?}, the model needs {:?}",
                    t.size(),
                    var.size()
                )),
                Some(t) => {
                    var.copy_(t);
                    used.insert(src);
                }
            }
        }
    });
    if !problems.is_empty() {
        let shown: Vec<&str> = problems.iter().take(5).map(String::as_str).collect();
        return Err(Error::Data(format!(
            "the checkpoint does not fit this model ({} of {} variables): {}{}; check --model \
             (gelan-t/s/m/c/e)",
            problems.len(),
            variables.len(),
            shown.join("; "),
            if problems.len() > 5 { "; …" } else { "" }
        )));
    }
    Ok(ImportReport {
        layout,
        loaded: used.len(),
        unused: tensors.len() - used.len(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dual_names_follow_yolov9s_reparameterization() {
        let dual = Layout::Dual { shift: 1, head: 38 };
        assert_eq!(
            source_name("model.0.conv.weight", dual, 22).as_deref(),
            Some("model.1.conv.weight")
        );
        assert_eq!(
            source_name("model.21.cv4.bn.running_var", dual, 22).as_deref(),
            Some("model.22.cv4.bn.running_var")
        );
        assert_eq!(
            source_name("model.22.cv2.1.0.conv.weight", dual, 22).as_deref(),
            Some("model.38.cv4.1.0.conv.weight")
        );
        assert_eq!(
            source_name("model.22.cv3.2.2.bias", dual, 22).as_deref(),
            Some("model.38.cv5.2.2.bias")
        );
        assert_eq!(source_name("model.22.dfl.conv.weight", dual, 22), None);
        assert_eq!(
            source_name("model.5.cv1.conv.weight", Layout::Gelan, 22).as_deref(),
            Some("model.5.cv1.conv.weight")
        );
    }
}
