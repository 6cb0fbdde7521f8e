//! `kestrel serve --config FILE.toml`: the service's settings from a TOML file, merged with the
//! command line (a flag given on the command line wins over the file; the file wins over the
//! built-in default). Every key is the flag's long name with `_` for `-`; `models` is the list
//! form of `--model`. Relative paths in the file are relative to the file's folder. An unknown
//! key is an error naming it. `deploy/kestrel.toml` is the documented example.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use serde::Deserialize;

use super::repository::InstanceConfig;

/// How the service writes its own log lines on stderr.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// `loaded model shapes`: one line of text per event.
    #[default]
    Text,
    /// `{"ts":…,"level":"info","msg":"loaded model shapes"}`: one JSON object per line.
    Json,
}

/// The file's keys; all optional.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub repository: Option<PathBuf>,
    pub models: Option<Vec<PathBuf>>,
    pub listen: Option<String>,
    pub backend: Option<String>,
    pub precision: Option<String>,
    pub max_batch_size: Option<usize>,
    pub max_queue_delay_us: Option<u64>,
    pub max_queue_size: Option<usize>,
    pub preferred_batch_sizes: Option<Vec<usize>>,
    pub instance_count: Option<usize>,
    /// The list form of `--gpus`: `[{gpu = 0}, {gpu = 1}]`.
    pub instances: Option<Vec<InstanceConfig>>,
    pub max_body_bytes: Option<usize>,
    pub max_image_pixels: Option<u64>,
    pub request_timeout_s: Option<f64>,
    pub max_concurrency: Option<usize>,
    pub max_connections: Option<usize>,
    pub header_read_timeout_s: Option<f64>,
    pub control_token_file: Option<PathBuf>,
    pub log_format: Option<LogFormat>,
}

impl FileConfig {
    /// Read and parse a config file; relative paths become relative to its folder.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("--config {}: cannot read the file", path.display()))?;
        let mut c = Self::parse(&text).map_err(|e| {
            anyhow::anyhow!(
                "--config {}: {}; fix the file (its keys are the flags of `kestrel serve --help` \
                 with `_` for `-`, see deploy/kestrel.toml)",
                path.display(),
                e.trim_end()
            )
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        let rebase = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        if let Some(p) = c.repository.as_mut() {
            rebase(p);
        }
        if let Some(p) = c.control_token_file.as_mut() {
            rebase(p);
        }
        for p in c.models.iter_mut().flatten() {
            rebase(p);
        }
        Ok(c)
    }

    /// Parse TOML text (the error names an unknown key, a wrong type, and where).
    pub fn parse(text: &str) -> std::result::Result<Self, String> {
        toml::from_str(text).map_err(|e: toml::de::Error| {
            let at = e.span().map(|span| {
                let start = span.start.min(text.len());
                let line_start = text[..start].rfind('\n').map_or(0, |i| i + 1);
                let line_end = text[start..].find('\n').map_or(text.len(), |i| start + i);
                format!(
                    "line {} (`{}`): ",
                    text[..start].matches('\n').count() + 1,
                    text[line_start..line_end].trim()
                )
            });
            format!("{}{}", at.unwrap_or_default(), e.message())
        })
    }
}

/// The service's settings once the command line, the file and the defaults are merged.
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    pub repository: Option<PathBuf>,
    pub models: Vec<PathBuf>,
    pub listen: SocketAddr,
    pub backend: String,
    pub precision: String,
    pub max_batch_size: usize,
    pub max_queue_delay_us: u64,
    pub max_queue_size: usize,
    pub preferred_batch_sizes: Vec<usize>,
    pub instance_count: usize,
    /// Where each engine of a model runs (empty: `instance_count` engines on GPU 0).
    pub instances: Vec<InstanceConfig>,
    pub max_body_bytes: usize,
    pub max_image_pixels: u64,
    pub request_timeout_s: f64,
    pub max_concurrency: usize,
    pub max_connections: usize,
    pub header_read_timeout_s: f64,
    pub control_token: Option<String>,
    pub log_format: LogFormat,
}

/// Defaults of the settings no flag and no file key gave.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8000";

impl Settings {
    /// Merge: command line over file over defaults. `token_env` is `$KESTREL_CONTROL_TOKEN`.
    pub fn merge(a: &super::Args, f: FileConfig, token_env: Option<String>) -> Result<Self> {
        let listen = match (&a.listen, &f.listen) {
            (Some(l), _) => *l,
            (None, Some(s)) => s.parse().map_err(|e| {
                anyhow::anyhow!(
                    "--config: listen = {s:?} is not an address ({e}); write it as \
                     \"IP:PORT\", e.g. \"0.0.0.0:8000\""
                )
            })?,
            (None, None) => DEFAULT_LISTEN.parse().context("the default address")?,
        };
        let token_file = a.control_token_file.clone().or(f.control_token_file);
        let control_token = match (&a.control_token, token_file) {
            (Some(t), _) => Some(t.clone()),
            (None, Some(p)) => Some(read_token(&p)?),
            (None, None) => token_env,
        }
        .filter(|t| !t.is_empty());
        let s = Self {
            repository: a.repository.clone().or(f.repository),
            models: if a.model.is_empty() {
                f.models.unwrap_or_default()
            } else {
                a.model.clone()
            },
            listen,
            backend: a.backend.clone().or(f.backend).unwrap_or("cpu".into()),
            precision: a.precision.clone().or(f.precision).unwrap_or("fp32".into()),
            max_batch_size: a.max_batch_size.or(f.max_batch_size).unwrap_or(8),
            max_queue_delay_us: a
                .max_queue_delay_us
                .or(f.max_queue_delay_us)
                .unwrap_or(2000),
            max_queue_size: a.max_queue_size.or(f.max_queue_size).unwrap_or(64),
            preferred_batch_sizes: if a.preferred_batch_sizes.is_empty() {
                f.preferred_batch_sizes.unwrap_or_default()
            } else {
                a.preferred_batch_sizes.clone()
            },
            instance_count: a.instance_count.or(f.instance_count).unwrap_or(1),
            instances: if a.gpus.is_empty() {
                f.instances.unwrap_or_default()
            } else {
                a.gpus.iter().map(|&gpu| InstanceConfig { gpu }).collect()
            },
            max_body_bytes: a.max_body_bytes.or(f.max_body_bytes).unwrap_or(64 << 20),
            max_image_pixels: a
                .max_image_pixels
                .or(f.max_image_pixels)
                .unwrap_or(50_000_000),
            request_timeout_s: a.request_timeout_s.or(f.request_timeout_s).unwrap_or(30.0),
            max_concurrency: a.max_concurrency.or(f.max_concurrency).unwrap_or(256),
            max_connections: a.max_connections.or(f.max_connections).unwrap_or(1024),
            header_read_timeout_s: a
                .header_read_timeout_s
                .or(f.header_read_timeout_s)
                .unwrap_or(10.0),
            control_token,
            log_format: a.log_format.or(f.log_format).unwrap_or_default(),
        };
        s.check()?;
        Ok(s)
    }

    /// Limits that make no sense, named with the fix.
    fn check(&self) -> Result<()> {
        if self.max_batch_size == 0 {
            bail!("max_batch_size is 0: give 1 or more (--max-batch-size or the config file)");
        }
        if self.max_queue_size == 0 {
            bail!("max_queue_size is 0: give 1 or more (--max-queue-size or the config file)");
        }
        let placement = super::repository::ModelConfig {
            instance_count: self.instance_count,
            instances: self.instances.clone(),
            ..Default::default()
        };
        if let Err(e) = placement.placements() {
            bail!("{e} (--instance-count, --gpus or the config file's instances)");
        }
        if self.max_concurrency == 0 {
            bail!("max_concurrency is 0: give 1 or more (--max-concurrency or the config file)");
        }
        if self.max_connections == 0 {
            bail!("max_connections is 0: give 1 or more (--max-connections or the config file)");
        }
        if !(self.header_read_timeout_s.is_finite() && self.header_read_timeout_s > 0.0) {
            bail!(
                "header_read_timeout_s is {}: give a positive number of seconds \
                 (--header-read-timeout-s or the config file)",
                self.header_read_timeout_s
            );
        }
        if !(self.request_timeout_s.is_finite() && self.request_timeout_s > 0.0) {
            bail!(
                "request_timeout_s is {}: give a positive number of seconds \
                 (--request-timeout-s or the config file)",
                self.request_timeout_s
            );
        }
        Ok(())
    }
}

/// The control token from a file: its content without surrounding whitespace.
fn read_token(path: &Path) -> Result<String> {
    let t = std::fs::read_to_string(path).with_context(|| {
        format!(
            "control token file {}: cannot read it; create it (one line, the token) or remove \
             control_token_file / --control-token-file",
            path.display()
        )
    })?;
    let t = t.trim().to_string();
    if t.is_empty() {
        bail!(
            "control token file {} is empty: write the token into it (one line)",
            path.display()
        );
    }
    Ok(t)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn unknown_keys_are_named() {
        let e = FileConfig::parse("listen = \"0.0.0.0:8000\"\nmax_batch = 4\n").unwrap_err();
        assert!(e.contains("max_batch"), "{e}");
        assert!(e.contains("line 2"), "{e}");
    }

    #[test]
    fn wrong_types_and_log_formats_are_refused() {
        let e = FileConfig::parse("max_batch_size = \"eight\"").unwrap_err();
        assert!(e.contains("max_batch_size") || e.contains("integer"), "{e}");
        let e = FileConfig::parse("log_format = \"xml\"").unwrap_err();
        assert!(e.contains("xml"), "{e}");
        let c = FileConfig::parse("log_format = \"json\"").unwrap();
        assert_eq!(c.log_format, Some(LogFormat::Json));
    }

    #[test]
    fn instances_place_engines_on_gpus() {
        let c = FileConfig::parse("instances = [{gpu = 0}, {gpu = 1}]").unwrap();
        assert_eq!(
            c.instances,
            Some(vec![InstanceConfig { gpu: 0 }, InstanceConfig { gpu: 1 }])
        );
        let e = FileConfig::parse("instances = [{gpu = 0, memory = 3}]").unwrap_err();
        assert!(e.contains("memory"), "{e}");
        let e = FileConfig::parse("instances = [{device = 1}]").unwrap_err();
        assert!(e.contains("device") || e.contains("gpu"), "{e}");
    }

    #[test]
    fn relative_paths_are_relative_to_the_file() {
        let dir = std::env::temp_dir().join(format!("kestrel-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("k.toml");
        std::fs::write(
            &f,
            "repository = \"repo\"\nmodels = [\"/abs/m.onnx\", \"m2.onnx\"]\n",
        )
        .unwrap();
        let c = FileConfig::load(&f).unwrap();
        assert_eq!(c.repository, Some(dir.join("repo")));
        assert_eq!(
            c.models,
            Some(vec![PathBuf::from("/abs/m.onnx"), dir.join("m2.onnx")])
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
