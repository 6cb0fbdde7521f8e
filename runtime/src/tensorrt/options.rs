//! Pure parts of the TensorRT backend: builder options and their environment variables, how
//! Kestrel's precisions map onto a strongly typed TensorRT 11 network, the timing-cache file, and
//! the builder config handed to the shim. No TensorRT needed: everything here is unit-tested.

use std::path::{Path, PathBuf};

use kestrel_exporter::onnx::pb;

use crate::engine::{BatchProfile, Precision};

/// `nvinfer1::HardwareCompatibilityLevel`: which GPUs a plan runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HardwareCompatibility {
    /// The GPU model it was built on (TensorRT's default, fastest).
    None,
    /// Any Ampere or newer GPU (`kAMPERE_PLUS`).
    AmperePlus,
    /// Any GPU of the same compute capability (`kSAME_COMPUTE_CAPABILITY`).
    SameComputeCapability,
}

impl HardwareCompatibility {
    /// The enum value in TensorRT's headers.
    pub fn tensorrt_value(self) -> i32 {
        match self {
            HardwareCompatibility::None => 0,
            HardwareCompatibility::AmperePlus => 1,
            HardwareCompatibility::SameComputeCapability => 2,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            HardwareCompatibility::None => "none",
            HardwareCompatibility::AmperePlus => "ampere-plus",
            HardwareCompatibility::SameComputeCapability => "same-cc",
        }
    }

    fn parse(s: &str) -> Result<Self, String> {
        match s {
            "none" => Ok(Self::None),
            "ampere-plus" | "ampere+" => Ok(Self::AmperePlus),
            "same-cc" | "same-compute-capability" => Ok(Self::SameComputeCapability),
            _ => Err(format!(
                "{HARDWARE_COMPAT_ENV}={s}: give none, ampere-plus or same-cc"
            )),
        }
    }
}

pub const WORKSPACE_ENV: &str = "KESTREL_TRT_WORKSPACE_MIB";
pub const TIMING_CACHE_ENV: &str = "KESTREL_TRT_TIMING_CACHE";
pub const HARDWARE_COMPAT_ENV: &str = "KESTREL_TRT_HARDWARE_COMPAT";
pub const VERSION_COMPAT_ENV: &str = "KESTREL_TRT_VERSION_COMPAT";
pub const EXCLUDE_LEAN_RUNTIME_ENV: &str = "KESTREL_TRT_EXCLUDE_LEAN_RUNTIME";
pub const OPT_LEVEL_ENV: &str = "KESTREL_TRT_OPT_LEVEL";

/// Builder options of the TensorRT backend. They change the plan, so they are part of the engine
/// cache key (see [`TensorrtOptions::key`]); set them with the `KESTREL_TRT_*` variables.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorrtOptions {
    /// The builder's workspace memory pool limit in bytes; `None`: TensorRT's default.
    pub workspace_bytes: Option<u64>,
    pub hardware_compatibility: HardwareCompatibility,
    /// Version-compatible plans run on later TensorRT releases of the same major version.
    pub version_compatible: bool,
    /// With `version_compatible`: leave the lean runtime out of the plan (smaller plan; the
    /// machine that runs it needs libnvinfer_lean).
    pub exclude_lean_runtime: bool,
    /// Builder optimization level 0–5; `None`: TensorRT's default (3).
    pub optimization_level: Option<i32>,
    /// The timing-cache file, reused across builds; `None`: the default beside the engine cache.
    pub timing_cache: Option<PathBuf>,
}

impl Default for TensorrtOptions {
    fn default() -> Self {
        Self {
            workspace_bytes: None,
            hardware_compatibility: HardwareCompatibility::None,
            version_compatible: false,
            exclude_lean_runtime: false,
            optimization_level: None,
            timing_cache: None,
        }
    }
}

fn parse_bool(name: &str, v: &str) -> Result<bool, String> {
    match v {
        "1" | "true" | "on" | "yes" => Ok(true),
        "0" | "false" | "off" | "no" | "" => Ok(false),
        _ => Err(format!("{name}={v}: give 1 or 0")),
    }
}

impl TensorrtOptions {
    /// The options from `KESTREL_TRT_*` variables read through `var`; the error names the variable
    /// and its valid values.
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Result<Self, String> {
        let mut o = Self::default();
        if let Some(v) = var(WORKSPACE_ENV) {
            let mib: u64 = v
                .trim()
                .parse()
                .ok()
                .filter(|&m| m > 0)
                .ok_or_else(|| format!("{WORKSPACE_ENV}={v}: give a positive number of MiB"))?;
            o.workspace_bytes = Some(mib.saturating_mul(1 << 20));
        }
        if let Some(v) = var(HARDWARE_COMPAT_ENV) {
            o.hardware_compatibility = HardwareCompatibility::parse(v.trim())?;
        }
        if let Some(v) = var(VERSION_COMPAT_ENV) {
            o.version_compatible = parse_bool(VERSION_COMPAT_ENV, v.trim())?;
        }
        if let Some(v) = var(EXCLUDE_LEAN_RUNTIME_ENV) {
            o.exclude_lean_runtime = parse_bool(EXCLUDE_LEAN_RUNTIME_ENV, v.trim())?;
            if o.exclude_lean_runtime && !o.version_compatible {
                return Err(format!(
                    "{EXCLUDE_LEAN_RUNTIME_ENV}=1 only applies to version-compatible plans; set \
                     {VERSION_COMPAT_ENV}=1 too, or unset it"
                ));
            }
        }
        if let Some(v) = var(OPT_LEVEL_ENV) {
            let level: i32 = v
                .trim()
                .parse()
                .ok()
                .filter(|l| (0..=5).contains(l))
                .ok_or_else(|| format!("{OPT_LEVEL_ENV}={v}: give a level from 0 to 5"))?;
            o.optimization_level = Some(level);
        }
        if let Some(v) = var(TIMING_CACHE_ENV).filter(|v| !v.is_empty()) {
            o.timing_cache = Some(PathBuf::from(v));
        }
        Ok(o)
    }

    /// The options from the process environment.
    pub fn from_env() -> Result<Self, String> {
        Self::from_vars(|name| std::env::var(name).ok())
    }

    /// What of these options changes the plan, as one string for the engine header (and so the
    /// cache key). The timing cache is left out: it speeds builds up but does not decide validity.
    pub fn key(&self) -> String {
        format!(
            "workspace={} hardware={} version_compatible={} exclude_lean={} opt_level={}",
            self.workspace_bytes
                .map_or("default".to_string(), |b| b.to_string()),
            self.hardware_compatibility.name(),
            u8::from(self.version_compatible),
            u8::from(self.exclude_lean_runtime),
            self.optimization_level
                .map_or("default".to_string(), |l| l.to_string()),
        )
    }
}

/// The timing cache for builds with TensorRT `version` on `device`, in `dir`: one file per
/// TensorRT version and GPU model, so machines sharing a cache folder do not reset each other's.
pub fn timing_cache_path(dir: &Path, version: &str, device: &str) -> PathBuf {
    let clean: String = device
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .collect();
    let clean = clean.trim_matches('-');
    dir.join(format!("tensorrt-{version}-{clean}.timing-cache"))
}

/// What the model's types say about its precision (TensorRT 11 networks are strongly typed).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ModelTypes {
    /// QuantizeLinear / DequantizeLinear nodes (INT8 where they are).
    pub qdq_nodes: usize,
    /// FP16 initializers and casts to FP16.
    pub fp16_tensors: usize,
}

impl ModelTypes {
    pub fn of(model: &pb::ModelProto) -> Self {
        let graph = model.graph();
        let qdq_nodes = graph
            .node
            .iter()
            .filter(|n| matches!(n.op_type.as_str(), "QuantizeLinear" | "DequantizeLinear"))
            .count();
        let fp16_inits = graph
            .initializer
            .iter()
            .filter(|t| t.data_type == pb::data_type::FLOAT16)
            .count();
        let fp16_casts = graph
            .node
            .iter()
            .filter(|n| {
                n.op_type == "Cast"
                    && n.attribute
                        .iter()
                        .any(|a| a.name == "to" && a.i == i64::from(pb::data_type::FLOAT16))
            })
            .count();
        Self {
            qdq_nodes,
            fp16_tensors: fp16_inits + fp16_casts,
        }
    }
}

/// Whether a strongly typed network of a model with `types` gives `precision`: TensorRT 11 takes
/// the precision from the model's types, never from builder flags, so a request the types do not
/// express is refused with what to export instead.
pub fn check_precision(precision: Precision, types: ModelTypes) -> Result<(), String> {
    let int8 = types.qdq_nodes > 0;
    let fp16 = types.fp16_tensors > 0;
    match precision {
        Precision::Fp32 if int8 => Err(format!(
            "the model has {} Q/DQ nodes, so TensorRT's strongly typed network runs it in INT8; \
             build with --precision int8 (or best), or give the float model",
            types.qdq_nodes
        )),
        Precision::Fp32 if fp16 => Err(
            "the model is typed FP16, so TensorRT's strongly typed network runs it in FP16; \
             build with --precision fp16, or give the FP32 model"
                .into(),
        ),
        Precision::Fp16 if int8 => Err(format!(
            "the model has {} Q/DQ nodes, so TensorRT runs it in INT8, not FP16; build with \
             --precision int8 (or best), or give the float model exported as FP16",
            types.qdq_nodes
        )),
        Precision::Fp16 if !fp16 => Err(
            "TensorRT 11 networks are strongly typed and this model is FP32: FP16 comes from the \
             model's types, not from a builder flag; export the FP16-typed variant of the model, \
             or build with --precision fp32"
                .into(),
        ),
        Precision::Int8 | Precision::Best if !int8 && !fp16 => Err(format!(
            "TensorRT 11 networks are strongly typed: INT8 comes from Q/DQ nodes, and this model \
             has none; quantize it (`kestrel quantize`, or QAT in kestrel-train), or build with \
             --precision fp32{}",
            if precision == Precision::Best {
                " or give an FP16-typed model"
            } else {
                ""
            }
        )),
        Precision::Int8 if !int8 => Err(
            "TensorRT 11 networks are strongly typed: INT8 comes from Q/DQ nodes, and this FP16 \
             model has none; quantize it (`kestrel quantize`), or build with --precision fp16"
                .into(),
        ),
        _ => Ok(()),
    }
}

/// The builder settings handed to the shim (`KtBuildConfig`), without pointers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuilderSettings {
    /// Input `[min, opt, max]` shapes' batch, and the image's channels, height and width.
    pub batch: [i64; 3],
    pub chw: [i64; 3],
    pub workspace_bytes: u64,
    pub hardware_compatibility: i32,
    pub version_compatible: bool,
    pub exclude_lean_runtime: bool,
    pub optimization_level: i32,
}

/// The shim's builder settings for `profile`, an image of `input_hw`, and `options`.
pub fn builder_settings(
    profile: BatchProfile,
    input_hw: [usize; 2],
    options: &TensorrtOptions,
) -> BuilderSettings {
    BuilderSettings {
        batch: [profile.min, profile.opt, profile.max].map(|b| b as i64),
        chw: [3, input_hw[0] as i64, input_hw[1] as i64],
        workspace_bytes: options.workspace_bytes.unwrap_or(0),
        hardware_compatibility: options.hardware_compatibility.tensorrt_value(),
        version_compatible: options.version_compatible,
        exclude_lean_runtime: options.version_compatible && options.exclude_lean_runtime,
        optimization_level: options.optimization_level.unwrap_or(-1),
    }
}

/// Input shapes `[batch, 3, H, W]` set on the execution context, one per bucket.
pub fn bucket_shapes(buckets: &[usize], input_hw: [usize; 2]) -> Vec<[i64; 4]> {
    buckets
        .iter()
        .map(|&b| [b as i64, 3, input_hw[0] as i64, input_hw[1] as i64])
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn vars(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let m: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| m.get(k).cloned()
    }

    #[test]
    fn options_come_from_the_variables() {
        assert_eq!(
            TensorrtOptions::from_vars(vars(&[])).unwrap(),
            TensorrtOptions::default()
        );
        let o = TensorrtOptions::from_vars(vars(&[
            (WORKSPACE_ENV, "2048"),
            (HARDWARE_COMPAT_ENV, "ampere-plus"),
            (VERSION_COMPAT_ENV, "1"),
            (EXCLUDE_LEAN_RUNTIME_ENV, "1"),
            (OPT_LEVEL_ENV, "5"),
            (TIMING_CACHE_ENV, "/tmp/t.cache"),
        ]))
        .unwrap();
        assert_eq!(o.workspace_bytes, Some(2048 << 20));
        assert_eq!(o.hardware_compatibility, HardwareCompatibility::AmperePlus);
        assert!(o.version_compatible && o.exclude_lean_runtime);
        assert_eq!(o.optimization_level, Some(5));
        assert_eq!(o.timing_cache, Some(PathBuf::from("/tmp/t.cache")));
        assert_eq!(
            o.key(),
            "workspace=2147483648 hardware=ampere-plus version_compatible=1 exclude_lean=1 opt_level=5"
        );
        assert_eq!(
            TensorrtOptions::default().key(),
            "workspace=default hardware=none version_compatible=0 exclude_lean=0 opt_level=default"
        );
    }

    #[test]
    fn bad_variables_are_named_with_their_values() {
        for (pairs, want) in [
            (
                vec![(WORKSPACE_ENV, "0")],
                "KESTREL_TRT_WORKSPACE_MIB=0: give a positive",
            ),
            (
                vec![(WORKSPACE_ENV, "lots")],
                "KESTREL_TRT_WORKSPACE_MIB=lots",
            ),
            (
                vec![(HARDWARE_COMPAT_ENV, "volta")],
                "none, ampere-plus or same-cc",
            ),
            (
                vec![(VERSION_COMPAT_ENV, "maybe")],
                "KESTREL_TRT_VERSION_COMPAT=maybe: give 1 or 0",
            ),
            (vec![(OPT_LEVEL_ENV, "6")], "from 0 to 5"),
            (
                vec![(EXCLUDE_LEAN_RUNTIME_ENV, "1")],
                "set KESTREL_TRT_VERSION_COMPAT=1 too",
            ),
        ] {
            let e = TensorrtOptions::from_vars(vars(&pairs)).unwrap_err();
            assert!(e.contains(want), "{pairs:?}: {e}");
        }
    }

    #[test]
    fn options_map_to_the_builder_config() {
        let profile = BatchProfile {
            min: 1,
            opt: 8,
            max: 32,
        };
        let s = builder_settings(profile, [640, 480], &TensorrtOptions::default());
        assert_eq!(
            s,
            BuilderSettings {
                batch: [1, 8, 32],
                chw: [3, 640, 480],
                workspace_bytes: 0,
                hardware_compatibility: 0,
                version_compatible: false,
                exclude_lean_runtime: false,
                optimization_level: -1,
            }
        );
        let o = TensorrtOptions {
            workspace_bytes: Some(1 << 30),
            hardware_compatibility: HardwareCompatibility::SameComputeCapability,
            version_compatible: false,
            // Meaningless without version compatibility: never reaches the builder.
            exclude_lean_runtime: true,
            optimization_level: Some(0),
            timing_cache: None,
        };
        let s = builder_settings(BatchProfile::fixed(4), [320, 320], &o);
        assert_eq!(s.batch, [4, 4, 4]);
        assert_eq!((s.workspace_bytes, s.hardware_compatibility), (1 << 30, 2));
        assert!(!s.exclude_lean_runtime);
        assert_eq!(s.optimization_level, 0);
        assert_eq!(HardwareCompatibility::AmperePlus.tensorrt_value(), 1);
    }

    #[test]
    fn precision_follows_the_model_types() {
        let float = ModelTypes::default();
        let int8 = ModelTypes {
            qdq_nodes: 10,
            fp16_tensors: 0,
        };
        let half = ModelTypes {
            qdq_nodes: 0,
            fp16_tensors: 5,
        };
        assert!(check_precision(Precision::Fp32, float).is_ok());
        assert!(check_precision(Precision::Int8, int8).is_ok());
        assert!(check_precision(Precision::Best, int8).is_ok());
        assert!(check_precision(Precision::Fp16, half).is_ok());
        assert!(check_precision(Precision::Best, half).is_ok());
        for (p, t, want) in [
            (Precision::Fp32, int8, "--precision int8"),
            (Precision::Fp32, half, "--precision fp16"),
            (Precision::Fp16, float, "export the FP16-typed variant"),
            (Precision::Fp16, int8, "runs it in INT8, not FP16"),
            (Precision::Int8, float, "kestrel quantize"),
            (Precision::Int8, half, "this FP16 model has none"),
            (Precision::Best, float, "or give an FP16-typed model"),
        ] {
            let e = check_precision(p, t).unwrap_err();
            assert!(e.contains(want), "{p} {t:?}: {e}");
        }
    }

    #[test]
    fn model_types_count_qdq_and_fp16() {
        use kestrel_exporter::onnx::pb::{
            AttributeProto, GraphProto, ModelProto, NodeProto, TensorProto,
        };
        let node = |op: &str| NodeProto {
            op_type: op.into(),
            ..Default::default()
        };
        let mut cast = node("Cast");
        cast.attribute.push(AttributeProto {
            name: "to".into(),
            i: i64::from(pb::data_type::FLOAT16),
            ..Default::default()
        });
        let model = ModelProto {
            graph: Some(GraphProto {
                node: vec![
                    node("QuantizeLinear"),
                    node("DequantizeLinear"),
                    node("Conv"),
                    cast,
                ],
                initializer: vec![
                    TensorProto {
                        data_type: pb::data_type::FLOAT16,
                        ..Default::default()
                    },
                    TensorProto {
                        data_type: pb::data_type::FLOAT,
                        ..Default::default()
                    },
                ],
                ..Default::default()
            }),
            ..Default::default()
        };
        assert_eq!(
            ModelTypes::of(&model),
            ModelTypes {
                qdq_nodes: 2,
                fp16_tensors: 2
            }
        );
    }

    #[test]
    fn timing_caches_are_per_version_and_gpu() {
        assert_eq!(
            timing_cache_path(Path::new("/c"), "11.4.0", "NVIDIA H100 80GB HBM3"),
            PathBuf::from("/c/tensorrt-11.4.0-nvidia-h100-80gb-hbm3.timing-cache")
        );
    }

    #[test]
    fn buckets_give_input_shapes() {
        let b = crate::cuda::batch_buckets(1, 12);
        assert_eq!(b, vec![1, 2, 4, 8, 12]);
        assert_eq!(crate::cuda::bucket_for(&b, 5), Some(8));
        assert_eq!(crate::cuda::bucket_for(&b, 13), None);
        assert_eq!(
            bucket_shapes(&b[..2], [640, 320]),
            vec![[1, 3, 640, 320], [2, 3, 640, 320]]
        );
    }
}
