//! The model repository: a folder with one folder per model, each holding numbered version
//! folders with the model file and an optional `config.json`:
//!
//! ```text
//! models/
//!   shapes/
//!     config.json          # optional, every field optional (see ModelConfig)
//!     1/model.onnx         # or model.engine (a Kestrel engine file)
//!     2/model.onnx
//! ```
//!
//! Models load at start (each version with its own engine and batcher, warmed up before it
//! reports ready) and can be loaded and unloaded through the repository API without a restart.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use kestrel_runtime::engine::{
    Backend, BatchProfile, BuildOptions, EngineInfo, EngineSource, Precision, open_engine,
};
use kestrel_runtime::engine_file::{CacheOutcome, EngineCache};

use super::batcher::{Batcher, BatcherConfig, Instance};
use super::metrics as m;

pub use kestrel_runtime::model_config::{InstanceConfig, ModelConfig};

/// One version of a model, ready to serve.
pub struct LoadedModel {
    pub name: String,
    pub version: u64,
    pub info: EngineInfo,
    pub class_names: Vec<String>,
    pub config: ModelConfig,
    pub batcher: Batcher,
    pub metrics: ModelMetrics,
}

/// A model's per-request histograms, registered once at load (recording then needs no lookup).
pub struct ModelMetrics {
    pub queue_seconds: metrics::Histogram,
    pub preprocess_seconds: metrics::Histogram,
    pub postprocess_seconds: metrics::Histogram,
}

impl ModelMetrics {
    fn new(model: &str) -> Self {
        let h = |name: &'static str| metrics::histogram!(name, "model" => model.to_string());
        Self {
            queue_seconds: h(m::QUEUE_SECONDS),
            preprocess_seconds: h(m::PREPROCESS_SECONDS),
            postprocess_seconds: h(m::POSTPROCESS_SECONDS),
        }
    }
}

/// Where a model's versions come from.
#[derive(Debug, Clone)]
enum Origin {
    /// A folder of the repository.
    Folder(PathBuf),
    /// One file given on the command line (version 1).
    File(PathBuf),
}

struct Entry {
    origin: Origin,
    versions: BTreeMap<u64, Arc<LoadedModel>>,
    /// Why the last load failed, if it did.
    failure: Option<String>,
}

/// A model name a client may use: letters, digits, `-`, `_` and `.`, not starting with a dot
/// (so no path can be formed from it).
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

pub struct Repository {
    root: Option<PathBuf>,
    defaults: ModelConfig,
    entries: RwLock<BTreeMap<String, Entry>>,
}

/// A repository error, with the HTTP status it maps to.
#[derive(Debug)]
pub struct RepoError {
    pub status: u16,
    pub message: String,
}

fn repo_error(status: u16, message: impl Into<String>) -> RepoError {
    RepoError {
        status,
        message: message.into(),
    }
}

impl Repository {
    /// The models of `root` (every model folder) and `files` (each under its file stem).
    pub fn new(root: Option<PathBuf>, files: &[PathBuf], defaults: ModelConfig) -> Self {
        let mut entries = BTreeMap::new();
        for f in files {
            let name = f
                .file_stem()
                .map(|s| s.to_string_lossy().to_string())
                .unwrap_or_default();
            entries.insert(
                name,
                Entry {
                    origin: Origin::File(f.clone()),
                    versions: BTreeMap::new(),
                    failure: None,
                },
            );
        }
        if let Some(dir) = &root
            && let Ok(list) = std::fs::read_dir(dir)
        {
            for e in list.flatten() {
                let name = e.file_name().to_string_lossy().to_string();
                if e.path().is_dir() && valid_name(&name) {
                    entries.entry(name).or_insert(Entry {
                        origin: Origin::Folder(e.path()),
                        versions: BTreeMap::new(),
                        failure: None,
                    });
                }
            }
        }
        Self {
            root,
            defaults,
            entries: RwLock::new(entries),
        }
    }

    /// Whether `name` is a model of the repository (loaded or not).
    pub fn has(&self, name: &str) -> bool {
        self.read().contains_key(name)
    }

    /// Every model's name.
    pub fn names(&self) -> Vec<String> {
        self.read().keys().cloned().collect()
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<String, Entry>> {
        self.entries
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, BTreeMap<String, Entry>> {
        self.entries
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The loaded `version` of `name` (the newest when `None`).
    pub fn get(&self, name: &str, version: Option<u64>) -> Result<Arc<LoadedModel>, RepoError> {
        let entries = self.read();
        let Some(entry) = entries.get(name) else {
            return Err(repo_error(
                404,
                format!("no model {name} in the repository"),
            ));
        };
        let found = match version {
            Some(v) => entry.versions.get(&v),
            None => entry.versions.values().next_back(),
        };
        found
            .cloned()
            .ok_or_else(|| match (version, &entry.failure) {
                (_, Some(why)) => repo_error(503, format!("model {name} is not loaded: {why}")),
                (Some(v), None) => {
                    repo_error(404, format!("model {name} has no loaded version {v}"))
                }
                (None, None) => repo_error(503, format!("model {name} is not loaded")),
            })
    }

    /// Every model with its versions and state, for the repository index.
    pub fn index(&self) -> Vec<serde_json::Value> {
        let mut out = Vec::new();
        for (name, e) in self.read().iter() {
            if e.versions.is_empty() {
                out.push(serde_json::json!({
                    "name": name,
                    "state": "UNAVAILABLE",
                    "reason": e.failure.clone().unwrap_or_else(|| "unloaded".into()),
                }));
            }
            for v in e.versions.keys() {
                out.push(serde_json::json!({
                    "name": name, "version": v.to_string(), "state": "READY", "reason": "",
                }));
            }
        }
        out
    }

    /// The GPUs loaded models run on, in order (empty when every model runs on the CPU).
    pub fn gpus_in_use(&self) -> Vec<usize> {
        let mut gpus: Vec<usize> = self
            .read()
            .values()
            .flat_map(|e| e.versions.values())
            .filter(|m| m.info.backend != Backend::Cpu)
            .flat_map(|m| m.batcher.gpus().to_vec())
            .collect();
        gpus.sort_unstable();
        gpus.dedup();
        gpus
    }

    /// True when every model that should be served is loaded.
    pub fn all_ready(&self) -> bool {
        self.read()
            .values()
            .all(|e| !e.versions.is_empty() || e.failure.is_none())
    }

    /// Load (or reload) every version of `name`; blocking (engine builds, warm-up).
    pub fn load(&self, name: &str) -> Result<(), RepoError> {
        if !valid_name(name) {
            return Err(repo_error(400, format!("{name:?} is not a model name")));
        }
        let origin = match self.read().get(name) {
            Some(e) => e.origin.clone(),
            None => match &self.root {
                Some(root) if root.join(name).is_dir() => Origin::Folder(root.join(name)),
                _ => {
                    return Err(repo_error(
                        404,
                        format!("no model {name} in the repository"),
                    ));
                }
            },
        };
        let loaded = load_versions(name, &origin, &self.defaults, self.root.as_deref());
        let mut entries = self.write();
        let entry = entries.entry(name.to_string()).or_insert(Entry {
            origin,
            versions: BTreeMap::new(),
            failure: None,
        });
        match loaded {
            Ok(versions) => {
                // The old batchers finish their queued requests as their last Arc goes.
                entry.versions = versions;
                entry.failure = None;
                Ok(())
            }
            Err(message) => {
                entry.failure = Some(message.clone());
                Err(repo_error(400, message))
            }
        }
    }

    /// Stop serving `name`; requests already queued complete.
    pub fn unload(&self, name: &str) -> Result<(), RepoError> {
        let removed = {
            let mut entries = self.write();
            let Some(entry) = entries.get_mut(name) else {
                return Err(repo_error(
                    404,
                    format!("no model {name} in the repository"),
                ));
            };
            entry.failure = None;
            std::mem::take(&mut entry.versions)
        };
        // Outside the lock: new requests are refused while the batchers drain.
        for model in removed.values() {
            model.batcher.stop();
        }
        Ok(())
    }

    /// Stop every model (shutdown), letting queued requests complete.
    pub fn unload_all(&self) {
        for name in self.names() {
            let _ = self.unload(&name);
        }
    }
}

/// `path` with its symlinks resolved, refused when that lies outside the repository folder
/// `root`: a model folder, config, model file or labels file of the repository may be a symlink,
/// but only to something inside the repository.
fn within_repository(root: Option<&Path>, path: &Path) -> Result<PathBuf, String> {
    let real = path
        .canonicalize()
        .map_err(|e| format!("{}: {e}", path.display()))?;
    if let Some(root) = root {
        let top = root
            .canonicalize()
            .map_err(|e| format!("{}: {e}", root.display()))?;
        if !real.starts_with(&top) {
            return Err(format!(
                "{} leads outside the model repository {} (a symlink to {}): copy or move what \
                 it points to into the repository",
                path.display(),
                top.display(),
                real.display()
            ));
        }
    }
    Ok(real)
}

/// Load every version folder (or the one file) of a model.
fn load_versions(
    name: &str,
    origin: &Origin,
    defaults: &ModelConfig,
    root: Option<&Path>,
) -> Result<BTreeMap<u64, Arc<LoadedModel>>, String> {
    let (config, files, folder) = match origin {
        Origin::File(f) => (defaults.clone(), vec![(1u64, f.clone())], None),
        Origin::Folder(dir) => {
            within_repository(root, dir)?;
            let config_file = dir.join("config.json");
            if config_file.exists() {
                within_repository(root, &config_file)?;
            }
            let config = match std::fs::read_to_string(&config_file) {
                Ok(text) => ModelConfig::from_json(&text)
                    .map_err(|e| format!("{}/config.json: {e}", dir.display()))?,
                Err(_) => defaults.clone(),
            };
            let mut files = Vec::new();
            for e in std::fs::read_dir(dir)
                .map_err(|e| format!("{}: {e}", dir.display()))?
                .flatten()
            {
                let Ok(v) = e.file_name().to_string_lossy().parse::<u64>() else {
                    continue;
                };
                let file = ["model.onnx", "model.engine"]
                    .iter()
                    .map(|f| e.path().join(f))
                    .find(|p| p.is_file());
                match file {
                    Some(f) => {
                        within_repository(root, &f)?;
                        files.push((v, f));
                    }
                    None => {
                        return Err(format!(
                            "{}: no model.onnx or model.engine",
                            e.path().display()
                        ));
                    }
                }
            }
            if files.is_empty() {
                return Err(format!(
                    "{}: no version folder (1/model.onnx, …)",
                    dir.display()
                ));
            }
            if let Some(labels) = &config.labels {
                within_repository(root, &dir.join(labels))?;
            }
            (config, files, Some(dir.clone()))
        }
    };
    let mut out = BTreeMap::new();
    for (version, file) in files {
        let model = load_one(name, version, &file, &config, folder.as_deref())?;
        out.insert(version, Arc::new(model));
    }
    Ok(out)
}

fn load_one(
    name: &str,
    version: u64,
    file: &Path,
    config: &ModelConfig,
    folder: Option<&Path>,
) -> Result<LoadedModel, String> {
    // Checked where it was made (ModelConfig::from_json, or `kestrel serve` at start for the
    // command line's defaults); again here, so a config that skipped both cannot load.
    config.validate().map_err(|e| e.to_string())?;
    let backend: Backend = config.backend.parse().map_err(|e| format!("{e}"))?;
    let precision: Precision = config.precision.parse().map_err(|e| format!("{e}"))?;
    let placements = config.placements()?;
    let mut options = BuildOptions {
        backend,
        precision,
        profile: BatchProfile {
            min: 1,
            opt: config.max_batch_size,
            max: config.max_batch_size,
        },
        device: 0,
    };
    let cache = (backend != Backend::Cpu).then(EngineCache::default_location);
    let mut engines = Vec::with_capacity(placements.len());
    for (instance, &gpu) in placements.iter().enumerate() {
        options.device = gpu;
        let (mut engine, source) = open_engine(file, &options, cache.as_ref()).map_err(|e| {
            let at = if placements.len() > 1 {
                format!(" (instance {instance}, GPU {gpu})")
            } else {
                String::new()
            };
            format!("{}{at}: {e}", file.display())
        })?;
        let source = match source {
            EngineSource::Onnx => "onnx",
            EngineSource::EngineFile => "engine_file",
            EngineSource::RebuiltFromEngineFile { .. } => "rebuilt",
            EngineSource::Cache(CacheOutcome::Hit) => "cache_hit",
            EngineSource::Cache(CacheOutcome::Built { .. }) => "cache_built",
        };
        metrics::counter!(m::ENGINE_LOADS, "source" => source).increment(1);
        let info = engine.info();
        if info.profile.max < config.max_batch_size {
            return Err(format!(
                "{}: the engine takes batches of up to {}, the config asks for {}",
                file.display(),
                info.profile.max,
                config.max_batch_size
            ));
        }
        // Warm-up before the model reports ready: the first run pays for lazy initialisation.
        // It runs on a thread of its own, which ends with it: tract keeps each run's scratch in
        // the running thread's thread-local storage and frees it on the thread that drops the
        // engine (the batcher's). Run here, on a long-lived blocking-pool thread, every load
        // left about 165 kB behind for good (`kestrel soak serve`, docs/RELIABILITY.md).
        let zeros = vec![0f32; info.input_len()];
        let warm_up = std::thread::scope(|s| {
            s.spawn(|| engine.run(&zeros, 1).map(|_| ()).map_err(|e| e.to_string()))
                .join()
                .unwrap_or_else(|_| Err("the engine panicked".into()))
        });
        warm_up.map_err(|e| format!("{}: warm-up run failed: {e}", file.display()))?;
        engines.push(Instance { engine, gpu });
    }
    let Some(info) = engines.first().map(|i| i.engine.info().clone()) else {
        return Err("instance_count 0".into());
    };
    let class_names = match (&config.labels, folder) {
        (Some(labels), Some(dir)) => {
            let path = dir.join(labels);
            let text = std::fs::read_to_string(&path)
                .map_err(|e| format!("labels {}: {e}", path.display()))?;
            let names = kestrel_runtime::labels::parse_class_names(&text);
            if names.len() != info.num_classes {
                return Err(format!(
                    "labels {} has {} names, the model {} classes",
                    path.display(),
                    names.len(),
                    info.num_classes
                ));
            }
            names
        }
        _ => info.class_names.clone(),
    };
    let batcher = Batcher::start(
        engines,
        BatcherConfig {
            max_batch_size: config.max_batch_size,
            max_queue_delay: std::time::Duration::from_micros(config.max_queue_delay_us),
            max_queue_size: config.max_queue_size,
            preferred_batch_sizes: config.preferred_batch_sizes.clone(),
        },
        name.to_string(),
    );
    Ok(LoadedModel {
        name: name.to_string(),
        version,
        info,
        class_names,
        config: config.clone(),
        batcher,
        metrics: ModelMetrics::new(name),
    })
}
