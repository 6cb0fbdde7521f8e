//! Engine files: one container for every backend, and the content-addressed engine cache.
//!
//! Layout (little-endian): magic `KESTREL\x01` (8 bytes) · format version (u32) · header length
//! (u64) · header (JSON, [`EngineHeader`]) · payload length (u64) · payload (the source ONNX) ·
//! plan length (u64) · plan (a backend's serialized engine, e.g. a TensorRT plan; empty for
//! backends that rebuild from the ONNX; absent in version 1 files) · SHA-256 of everything before
//! it (32 bytes). Files are written to a unique temporary name in the
//! target folder and renamed, so readers never see a partial file and two processes writing the
//! same key leave one valid file.
//!
//! A backend's engine is rebuilt from the embedded ONNX with the choices the header records (or,
//! for TensorRT, deserialized from the plan);
//! the header pins everything those choices depend on (backend and library versions, GPU and compute
//! capability, precision, batch profile), and a mismatch is reported as the reason to rebuild.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::engine::BuildOptions;
use crate::error::{Error, Result};

/// First bytes of every engine file.
pub const MAGIC: &[u8; 8] = b"KESTREL\x01";
/// Container format this build writes (it also reads version 1, which has no plan section).
pub const FORMAT_VERSION: u32 = 2;

/// What an engine was built for and from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EngineHeader {
    pub format_version: u32,
    pub kestrel_version: String,
    /// `cpu`, `cuda` or `tensorrt`.
    pub backend: String,
    /// Library versions the engine depends on (tract; cuDNN, CUDA driver; TensorRT and its
    /// plan-changing builder options).
    pub backend_versions: BTreeMap<String, String>,
    /// The device: the GPU's name, or `cpu`.
    pub device: String,
    /// GPU compute capability (major, minor).
    pub compute_capability: Option<(i32, i32)>,
    pub precision: String,
    /// min, opt, max batch.
    pub profile: [usize; 3],
    /// SHA-256 of the source ONNX, hex.
    pub onnx_sha256: String,
    /// Per-layer choices of the builder (backend-specific, informational).
    pub layer_choices: serde_json::Value,
}

/// Where engines are built: what an engine header must match to be usable here.
#[derive(Debug, Clone, PartialEq)]
pub struct BuildEnvironment {
    pub backend_versions: BTreeMap<String, String>,
    pub device: String,
    pub compute_capability: Option<(i32, i32)>,
}

/// SHA-256 of `bytes`, hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

impl EngineHeader {
    /// The header of an engine built from `onnx` with `options` in `env`.
    pub fn new(onnx: &[u8], options: &BuildOptions, env: &BuildEnvironment) -> Self {
        Self {
            format_version: FORMAT_VERSION,
            kestrel_version: env!("CARGO_PKG_VERSION").into(),
            backend: options.backend.name().into(),
            backend_versions: env.backend_versions.clone(),
            device: env.device.clone(),
            compute_capability: env.compute_capability,
            precision: options.precision.name().into(),
            profile: [
                options.profile.min,
                options.profile.opt,
                options.profile.max,
            ],
            onnx_sha256: sha256_hex(onnx),
            layer_choices: serde_json::Value::Null,
        }
    }

    /// The cache key: a hash of everything the engine depends on (not of the layer choices).
    pub fn cache_key(&self) -> String {
        let key = serde_json::json!({
            "format": self.format_version,
            "kestrel": self.kestrel_version,
            "backend": self.backend,
            "versions": self.backend_versions,
            "device": self.device,
            "cc": self.compute_capability,
            "precision": self.precision,
            "profile": self.profile,
            "onnx": self.onnx_sha256,
        });
        sha256_hex(key.to_string().as_bytes())
    }

    /// Why this engine cannot be used in `env` (first difference), if it cannot.
    pub fn mismatch(&self, env: &BuildEnvironment) -> Option<String> {
        if self.kestrel_version != env!("CARGO_PKG_VERSION") {
            return Some(format!(
                "built by Kestrel {}, this is Kestrel {}",
                self.kestrel_version,
                env!("CARGO_PKG_VERSION")
            ));
        }
        if self.device != env.device || self.compute_capability != env.compute_capability {
            let cc =
                |c: Option<(i32, i32)>| c.map(|(a, b)| format!(" (sm_{a}{b})")).unwrap_or_default();
            return Some(format!(
                "built for {}{}, this machine has {}{}",
                self.device,
                cc(self.compute_capability),
                env.device,
                cc(env.compute_capability)
            ));
        }
        if self.backend_versions != env.backend_versions {
            let show = |m: &BTreeMap<String, String>| {
                m.iter()
                    .map(|(k, v)| format!("{k} {v}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            return Some(format!(
                "built with {}, this machine has {}",
                show(&self.backend_versions),
                show(&env.backend_versions)
            ));
        }
        None
    }
}

/// An engine file's contents.
#[derive(Debug, Clone, PartialEq)]
pub struct EngineFile {
    pub header: EngineHeader,
    /// The source ONNX model.
    pub onnx: Vec<u8>,
    /// The backend's serialized engine (a TensorRT plan), valid where the header's environment
    /// matches; empty for backends that rebuild from the ONNX.
    pub plan: Vec<u8>,
}

/// Whether `bytes` start like an engine file.
pub fn is_engine_file(bytes: &[u8]) -> bool {
    bytes.starts_with(MAGIC)
}

impl EngineFile {
    /// Serialise with the trailing checksum.
    pub fn encode(&self) -> Vec<u8> {
        let header = serde_json::to_vec(&self.header).unwrap_or_default();
        let mut out = Vec::with_capacity(
            8 + 4 + 8 + header.len() + 8 + self.onnx.len() + 8 + self.plan.len() + 32,
        );
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        out.extend_from_slice(&(header.len() as u64).to_le_bytes());
        out.extend_from_slice(&header);
        out.extend_from_slice(&(self.onnx.len() as u64).to_le_bytes());
        out.extend_from_slice(&self.onnx);
        out.extend_from_slice(&(self.plan.len() as u64).to_le_bytes());
        out.extend_from_slice(&self.plan);
        let sum = Sha256::digest(&out);
        out.extend_from_slice(&sum);
        out
    }

    /// Parse and verify. Every failure names the file and says what to do.
    pub fn decode(bytes: &[u8], path: &Path) -> Result<Self> {
        let bad = |reason: &str| Error::EngineFile {
            path: path.to_path_buf(),
            reason: reason.to_string(),
        };
        if !is_engine_file(bytes) {
            return Err(bad("not a Kestrel engine file (wrong magic bytes)"));
        }
        if bytes.len() < 8 + 4 + 8 + 8 + 32 {
            return Err(bad("truncated: rebuild it with `kestrel build`"));
        }
        let (body, sum) = bytes.split_at(bytes.len() - 32);
        let version = u32::from_le_bytes([body[8], body[9], body[10], body[11]]);
        if version != FORMAT_VERSION && version != 1 {
            return Err(bad(&format!(
                "format version {version}, this Kestrel reads versions 1 and {FORMAT_VERSION}: rebuild it with `kestrel build`"
            )));
        }
        let read_u64 = |at: usize| -> Option<usize> {
            body.get(at..at + 8).map(|b| {
                u64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]) as usize
            })
        };
        let header_len = read_u64(12).ok_or_else(|| bad("truncated header"))?;
        let header_end = 20usize
            .checked_add(header_len)
            // Checked: a header length near u64::MAX would overflow `e + 8`.
            .filter(|&e| e.checked_add(8).is_some_and(|end| end <= body.len()));
        let Some(header_end) = header_end else {
            return Err(bad("truncated: rebuild it with `kestrel build`"));
        };
        let payload_len = read_u64(header_end).ok_or_else(|| bad("truncated payload length"))?;
        let sections = || {
            bad(
                "truncated or padded: its length does not match its sections; rebuild it with `kestrel build`",
            )
        };
        let onnx_end = (header_end + 8)
            .checked_add(payload_len)
            .filter(|&e| e <= body.len())
            .ok_or_else(sections)?;
        let plan_start = if version == 1 { onnx_end } else { onnx_end + 8 };
        let plan_len = if version == 1 {
            0
        } else {
            read_u64(onnx_end).ok_or_else(sections)?
        };
        if plan_start.checked_add(plan_len) != Some(body.len()) {
            return Err(sections());
        }
        if Sha256::digest(body).as_slice() != sum {
            return Err(bad(
                "checksum mismatch: the file is corrupted; rebuild it with `kestrel build`",
            ));
        }
        let header: EngineHeader = serde_json::from_slice(&body[20..header_end])
            .map_err(|e| bad(&format!("unreadable header ({e})")))?;
        let onnx = body[header_end + 8..onnx_end].to_vec();
        let plan = body[plan_start..].to_vec();
        if sha256_hex(&onnx) != header.onnx_sha256 {
            return Err(bad(
                "the embedded model does not match its recorded SHA-256",
            ));
        }
        Ok(Self { header, onnx, plan })
    }

    /// Read and verify a file.
    pub fn read(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        Self::decode(&bytes, path)
    }

    /// Write atomically (unique temporary file + rename).
    pub fn write(&self, path: &Path) -> Result<()> {
        write_atomic(path, &self.encode())
    }
}

/// Write `bytes` to `path` atomically (the exporter's unique temporary file + rename).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    kestrel_exporter::onnx::write_atomic(path, bytes).map_err(|e| match e {
        // A failed write is named by the file asked for, not by the hidden temporary file it
        // happened in (already removed): that is the name the user knows. A folder that cannot
        // be created keeps its own name.
        kestrel_exporter::Error::Io { path: at, cause } if Some(at.as_path()) == path.parent() => {
            Error::io(at, cause)
        }
        kestrel_exporter::Error::Io { cause, .. } => Error::io(path, cause),
        other => Error::EngineFile {
            path: path.to_path_buf(),
            reason: other.to_string(),
        },
    })
}

/// What a cache lookup did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CacheOutcome {
    /// A valid engine file was found.
    Hit,
    /// The engine was built and stored; `reason` says why the cache had no usable file.
    Built { reason: String },
}

/// A folder of engine files named by their cache key.
#[derive(Debug, Clone)]
pub struct EngineCache {
    pub dir: PathBuf,
}

impl EngineCache {
    /// `$KESTREL_CACHE_DIR`, else `$XDG_CACHE_HOME/kestrel/engines`, else `~/.cache/kestrel/engines`.
    pub fn default_location() -> Self {
        let dir = std::env::var_os("KESTREL_CACHE_DIR")
            .map(PathBuf::from)
            .or_else(|| {
                std::env::var_os("XDG_CACHE_HOME").map(|d| PathBuf::from(d).join("kestrel/engines"))
            })
            .or_else(|| {
                std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/kestrel/engines"))
            })
            .unwrap_or_else(|| PathBuf::from(".kestrel-cache"));
        Self { dir }
    }

    pub fn path_for(&self, header: &EngineHeader) -> PathBuf {
        self.dir.join(format!("{}.engine", header.cache_key()))
    }

    /// The cached engine file for `wanted` (a header for the ONNX, options and environment), or
    /// why there is none usable (missing, corrupted, stale).
    pub fn lookup(
        &self,
        wanted: &EngineHeader,
        env: &BuildEnvironment,
    ) -> std::result::Result<EngineFile, String> {
        let path = self.path_for(wanted);
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err("not in the cache".into());
            }
            Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
        };
        let file = EngineFile::decode(&bytes, &path).map_err(|e| e.to_string())?;
        if let Some(why) = file.header.mismatch(env) {
            return Err(format!("{} is stale: {why}", path.display()));
        }
        if file.header.cache_key() != wanted.cache_key() {
            return Err(format!(
                "{} holds another engine (its key does not match its name)",
                path.display()
            ));
        }
        Ok(file)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::{Backend, BatchProfile, Precision};

    fn env() -> BuildEnvironment {
        BuildEnvironment {
            backend_versions: [("tract".to_string(), "0.23.9".to_string())].into(),
            device: "cpu".into(),
            compute_capability: None,
        }
    }

    fn file() -> EngineFile {
        let options = BuildOptions {
            backend: Backend::Cpu,
            precision: Precision::Fp32,
            profile: BatchProfile {
                min: 1,
                opt: 2,
                max: 4,
            },
            device: 0,
        };
        let onnx = b"pretend onnx bytes".to_vec();
        EngineFile {
            header: EngineHeader::new(&onnx, &options, &env()),
            onnx,
            plan: b"a backend's plan".to_vec(),
        }
    }

    #[test]
    fn round_trip() {
        let f = file();
        let bytes = f.encode();
        assert_eq!(
            EngineFile::decode(&bytes, Path::new("x.engine")).unwrap(),
            f
        );
    }

    #[test]
    fn empty_plans_round_trip_and_version_1_files_still_read() {
        let mut f = file();
        f.plan.clear();
        let bytes = f.encode();
        assert_eq!(
            EngineFile::decode(&bytes, Path::new("x.engine")).unwrap(),
            f
        );
        // Version 1: no plan section.
        let body_end = bytes.len() - 32 - 8;
        let mut v1 = bytes[..body_end].to_vec();
        v1[8..12].copy_from_slice(&1u32.to_le_bytes());
        let sum = Sha256::digest(&v1);
        v1.extend_from_slice(&sum);
        assert_eq!(EngineFile::decode(&v1, Path::new("x.engine")).unwrap(), f);
        // Version 3 is refused with the fix.
        let mut v3 = bytes.clone();
        v3[8..12].copy_from_slice(&3u32.to_le_bytes());
        let e = EngineFile::decode(&v3, Path::new("x.engine"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("format version 3") && e.contains("kestrel build"),
            "{e}"
        );
    }

    #[test]
    fn every_flipped_byte_is_detected() {
        let bytes = file().encode();
        for i in 0..bytes.len() {
            let mut b = bytes.clone();
            b[i] ^= 0x20;
            let e = EngineFile::decode(&b, Path::new("x.engine"))
                .unwrap_err()
                .to_string();
            assert!(e.starts_with("x.engine: "), "byte {i}: {e}");
        }
    }

    #[test]
    fn truncation_is_detected() {
        let bytes = file().encode();
        for len in [0, 5, 8, 20, bytes.len() / 2, bytes.len() - 1] {
            let e = EngineFile::decode(&bytes[..len], Path::new("x.engine"))
                .unwrap_err()
                .to_string();
            assert!(
                e.contains("truncated") || e.contains("magic") || e.contains("checksum"),
                "{len}: {e}"
            );
        }
    }

    /// Fuzzing (`fuzz/regressions/engine_file/header-length-overflow`): a header length of
    /// 2^64 - 22 overflowed the end-of-header arithmetic (a panic) instead of reading as truncated.
    #[test]
    fn huge_header_lengths_are_truncation() {
        let mut bytes = file().encode();
        bytes[12..20].copy_from_slice(&(u64::MAX - 21).to_le_bytes());
        let e = EngineFile::decode(&bytes, Path::new("x.engine"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("truncated"), "{e}");
    }

    #[test]
    fn keys_follow_what_the_engine_depends_on() {
        let a = file().header;
        let mut b = a.clone();
        b.layer_choices = serde_json::json!({"any": "thing"});
        assert_eq!(a.cache_key(), b.cache_key());
        b.device = "NVIDIA H100".into();
        assert_ne!(a.cache_key(), b.cache_key());
        assert!(
            b.mismatch(&env())
                .unwrap()
                .contains("built for NVIDIA H100, this machine has cpu")
        );
        let mut c = a.clone();
        c.profile = [1, 8, 8];
        assert_ne!(a.cache_key(), c.cache_key());
    }
}
