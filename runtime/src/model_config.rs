//! A served model's settings: the `config.json` of a model folder in `kestrel serve`'s model
//! repository (every field optional; the command line's defaults fill the rest).
//!
//! Parsing and checking are pure functions of the file's text ([`ModelConfig::from_json`]), so
//! that the service, its tests and the `repository_config` fuzz target share them. What touches
//! the file system (the labels file staying inside the model's folder once symlinks are
//! resolved) is the service's part.

use std::path::{Component, Path};

use serde::{Deserialize, Serialize};

use crate::engine::{Backend, Precision};

/// Most images per engine run a config may ask for.
pub const MAX_BATCH_SIZE: usize = 1024;
/// Most engine instances of one model.
pub const MAX_INSTANCES: usize = 16;
/// Most requests waiting per model a config may ask for.
pub const MAX_QUEUE_SIZE: usize = 1 << 20;
/// Longest queue delay a config may ask for, microseconds (10 s).
pub const MAX_QUEUE_DELAY_US: u64 = 10_000_000;
/// Most detections per image a config may ask for.
pub const MAX_DETECTIONS: usize = 100_000;

/// Why a model's `config.json` is refused (the message names the field and the fix).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ModelConfigError {
    /// Not JSON, an unknown field, a wrong type.
    #[error("{0}")]
    Syntax(String),
    /// A field out of range or inconsistent with another.
    #[error("{0}")]
    Invalid(String),
}

/// A model's settings (`config.json` in its folder; command-line defaults otherwise).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ModelConfig {
    /// cpu or cuda.
    pub backend: String,
    /// fp32, fp16, int8 or best.
    pub precision: String,
    /// Images per engine run, at most.
    pub max_batch_size: usize,
    /// Microseconds the first request of a batch waits for more (0: no waiting).
    pub max_queue_delay_us: u64,
    /// Requests waiting, at most (more: 503 with Retry-After).
    pub max_queue_size: usize,
    /// Batch sizes that run as soon as they are reached, without waiting out the delay.
    pub preferred_batch_sizes: Vec<usize>,
    /// Engines of the model run at once (each with its own batches), 1–16, on GPU 0.
    pub instance_count: usize,
    /// Where each engine instance runs, e.g. `[{"gpu": 0}, {"gpu": 1}]`: one instance per entry
    /// (a GPU may repeat). Replaces `instance_count` (which must then be 1 or the same count).
    pub instances: Vec<InstanceConfig>,
    /// Image endpoint defaults (a request's query parameters override them).
    pub conf_threshold: f32,
    pub iou_threshold: f32,
    pub max_detections: usize,
    /// Class names, one per line, a path relative to the model's folder that stays inside it
    /// (no `..`, not absolute); default: the model's own.
    pub labels: Option<String>,
}

impl Default for ModelConfig {
    fn default() -> Self {
        Self {
            backend: "cpu".into(),
            precision: "fp32".into(),
            max_batch_size: 8,
            max_queue_delay_us: 2000,
            max_queue_size: 64,
            preferred_batch_sizes: Vec::new(),
            instance_count: 1,
            instances: Vec::new(),
            conf_threshold: 0.25,
            iou_threshold: 0.45,
            max_detections: 300,
            labels: None,
        }
    }
}

/// One engine instance of a model.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InstanceConfig {
    /// The GPU it runs on (CUDA device number, 0 = the first; the cpu backend takes 0 only).
    pub gpu: usize,
}

fn invalid(message: String) -> ModelConfigError {
    ModelConfigError::Invalid(message)
}

impl ModelConfig {
    /// Parse and check a `config.json` text; fields it leaves out take the [`Default`] values.
    pub fn from_json(text: &str) -> Result<Self, ModelConfigError> {
        let config: Self =
            serde_json::from_str(text).map_err(|e| ModelConfigError::Syntax(e.to_string()))?;
        config.validate()?;
        Ok(config)
    }

    /// Check every field's range and their consistency (what [`ModelConfig::from_json`] runs).
    pub fn validate(&self) -> Result<(), ModelConfigError> {
        self.backend
            .parse::<Backend>()
            .map_err(|e| invalid(format!("backend: {e}")))?;
        self.precision
            .parse::<Precision>()
            .map_err(|e| invalid(format!("precision: {e}")))?;
        if !(1..=MAX_BATCH_SIZE).contains(&self.max_batch_size) {
            return Err(invalid(format!(
                "max_batch_size {}: give 1 to {MAX_BATCH_SIZE}",
                self.max_batch_size
            )));
        }
        if let Some(p) = self
            .preferred_batch_sizes
            .iter()
            .find(|&&p| p == 0 || p > self.max_batch_size)
        {
            return Err(invalid(format!(
                "preferred_batch_sizes holds {p}: give sizes from 1 to max_batch_size ({})",
                self.max_batch_size
            )));
        }
        if !(1..=MAX_QUEUE_SIZE).contains(&self.max_queue_size) {
            return Err(invalid(format!(
                "max_queue_size {}: give 1 to {MAX_QUEUE_SIZE}",
                self.max_queue_size
            )));
        }
        if self.max_queue_delay_us > MAX_QUEUE_DELAY_US {
            return Err(invalid(format!(
                "max_queue_delay_us {}: give 0 to {MAX_QUEUE_DELAY_US}",
                self.max_queue_delay_us
            )));
        }
        self.placements().map_err(invalid)?;
        for (name, v) in [
            ("conf_threshold", self.conf_threshold),
            ("iou_threshold", self.iou_threshold),
        ] {
            if !(0.0..=1.0).contains(&v) {
                return Err(invalid(format!("{name} {v}: give 0 to 1")));
            }
        }
        if !(1..=MAX_DETECTIONS).contains(&self.max_detections) {
            return Err(invalid(format!(
                "max_detections {}: give 1 to {MAX_DETECTIONS}",
                self.max_detections
            )));
        }
        if let Some(labels) = &self.labels {
            check_relative_path(labels)
                .map_err(|why| invalid(format!("labels {labels:?}: {why}")))?;
        }
        Ok(())
    }

    /// The GPU of each engine instance, in instance order; or why the config is wrong.
    pub fn placements(&self) -> Result<Vec<usize>, String> {
        if self.instances.is_empty() {
            if !(1..=MAX_INSTANCES).contains(&self.instance_count) {
                return Err(format!(
                    "instance_count {}: give 1 to {MAX_INSTANCES}",
                    self.instance_count
                ));
            }
            return Ok(vec![0; self.instance_count]);
        }
        if self.instances.len() > MAX_INSTANCES {
            return Err(format!(
                "instances lists {} engines: give 1 to {MAX_INSTANCES}",
                self.instances.len()
            ));
        }
        if self.instance_count != 1 && self.instance_count != self.instances.len() {
            return Err(format!(
                "instance_count {} and {} instances disagree: give either, e.g. only \
                 \"instances\": [{{\"gpu\": 0}}, {{\"gpu\": 1}}]",
                self.instance_count,
                self.instances.len()
            ));
        }
        Ok(self.instances.iter().map(|i| i.gpu).collect())
    }
}

/// A path a config may name inside its model's folder: relative, made of plain names only (no
/// `..`, `.`, root or drive prefix), not empty, no NUL. Symlinks are the caller's to resolve.
pub fn check_relative_path(path: &str) -> Result<(), &'static str> {
    if path.is_empty() {
        return Err("an empty path; name a file in the model's folder");
    }
    if path.contains('\0') {
        return Err("a NUL byte in the path");
    }
    if path.contains('\\') {
        return Err("a backslash in the path; use '/' between folders");
    }
    for c in Path::new(path).components() {
        match c {
            Component::Normal(_) => {}
            Component::CurDir => {}
            Component::ParentDir => {
                return Err("'..' leaves the model's folder; put the file inside it");
            }
            Component::RootDir | Component::Prefix(_) => {
                return Err("an absolute path; give a path relative to the model's folder");
            }
        }
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn config(json: &str) -> Result<ModelConfig, ModelConfigError> {
        ModelConfig::from_json(json)
    }

    #[test]
    fn instances_place_one_engine_per_entry() {
        let c = config(r#"{"instances": [{"gpu": 0}, {"gpu": 1}, {"gpu": 1}]}"#).unwrap();
        assert_eq!(c.placements().unwrap(), vec![0, 1, 1]);
        let c = config(r#"{"instance_count": 3}"#).unwrap();
        assert_eq!(c.placements().unwrap(), vec![0, 0, 0]);
        let c = config(r#"{"instance_count": 2, "instances": [{"gpu": 0}, {"gpu": 1}]}"#);
        assert_eq!(c.unwrap().placements().unwrap(), vec![0, 1]);
    }

    #[test]
    fn wrong_fields_are_named() {
        for (json, want) in [
            (
                r#"{"instance_count": 3, "instances": [{"gpu": 0}, {"gpu": 1}]}"#,
                "instance_count 3",
            ),
            (r#"{"instance_count": 0}"#, "instance_count 0"),
            (r#"{"instances": [{"gpu": -1}]}"#, "-1"),
            (r#"{"instances": [{"gpu": 0, "memory": 2}]}"#, "memory"),
            (r#"{"max_batch_size": 0}"#, "max_batch_size 0"),
            (
                r#"{"max_batch_size": 4, "preferred_batch_sizes": [8]}"#,
                "preferred_batch_sizes",
            ),
            (r#"{"backend": "tpu"}"#, "tpu"),
            (r#"{"precision": "fp8"}"#, "fp8"),
            (r#"{"conf_threshold": 1e40}"#, "conf_threshold"),
            (r#"{"iou_threshold": -0.5}"#, "iou_threshold"),
            (r#"{"max_detections": 0}"#, "max_detections"),
            (r#"{"max_queue_size": 0}"#, "max_queue_size"),
            (r#"{"max_batch": 4}"#, "max_batch"),
            ("", "EOF"),
        ] {
            let e = config(json).unwrap_err().to_string();
            assert!(e.contains(want), "{json}: {e}");
        }
        let many = vec![r#"{"gpu": 0}"#; 17].join(",");
        let e = config(&format!(r#"{{"instances": [{many}]}}"#)).unwrap_err();
        assert!(e.to_string().contains("17"), "{e}");
    }

    #[test]
    fn labels_stay_inside_the_model_folder() {
        for ok in ["labels.txt", "meta/labels.txt", "./labels.txt"] {
            let json = format!(r#"{{"labels": "{ok}"}}"#);
            assert!(config(&json).is_ok(), "{ok}");
        }
        for (bad, want) in [
            ("../labels.txt", ".."),
            ("meta/../../x", ".."),
            ("/etc/passwd", "absolute"),
            ("", "empty"),
            ("a\\\\..\\\\b", "backslash"),
            ("a\\u0000b", "NUL"),
        ] {
            let json = format!(r#"{{"labels": "{bad}"}}"#);
            let e = config(&json).unwrap_err().to_string();
            assert!(e.contains("labels") && e.contains(want), "{bad}: {e}");
        }
    }
}
