//! Model weights: safetensors files (names as in YOLOv9's fused state dict, see [`crate::export`])
//! or a seeded random initialisation.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use safetensors::{Dtype, SafeTensors};

use crate::error::{Error, Result};

/// A dense float32 tensor: shape and row-major values.
#[derive(Debug, Clone, PartialEq)]
pub struct Tensor {
    pub shape: Vec<usize>,
    pub values: Vec<f32>,
}

/// Where an exported model's weights come from.
#[derive(Debug)]
pub enum WeightSource {
    /// PyTorch's default convolution initialisation (uniform ±1/√fan_in) from a seeded generator,
    /// with YOLOv9's head bias initialisation. Untrained: useful for tests and benchmarks only.
    Random { seed: u64 },
    /// Tensors loaded from a safetensors file.
    File(WeightFile),
}

/// The tensors of a safetensors file, converted to float32.
#[derive(Debug)]
pub struct WeightFile {
    pub path: PathBuf,
    tensors: BTreeMap<String, Tensor>,
    used: BTreeSet<String>,
}

fn f16_to_f32(bits: u16) -> f32 {
    let sign = ((bits >> 15) as u32) << 31;
    let exp = ((bits >> 10) & 0x1f) as u32;
    let frac = (bits & 0x3ff) as u32;
    let out = match (exp, frac) {
        (0, 0) => sign,
        (0, f) => {
            // Subnormal: value = f * 2^-24.
            let v = f as f32 * (1.0 / 16_777_216.0);
            return if sign != 0 { -v } else { v };
        }
        (0x1f, f) => sign | 0x7f80_0000 | (f << 13),
        (e, f) => sign | ((e + 127 - 15) << 23) | (f << 13),
    };
    f32::from_bits(out)
}

impl WeightFile {
    /// Load every tensor of a safetensors file (F32, F16 and BF16 are accepted).
    pub fn load(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        let st = SafeTensors::deserialize(&bytes).map_err(|e| Error::Weights {
            path: path.to_path_buf(),
            message: format!("not a safetensors file ({e})"),
        })?;
        let mut tensors = BTreeMap::new();
        for (name, view) in st.tensors() {
            let data = view.data();
            let values: Vec<f32> = match view.dtype() {
                Dtype::F32 => data
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect(),
                Dtype::F16 => data
                    .chunks_exact(2)
                    .map(|c| f16_to_f32(u16::from_le_bytes([c[0], c[1]])))
                    .collect(),
                Dtype::BF16 => data
                    .chunks_exact(2)
                    .map(|c| f32::from_bits((u16::from_le_bytes([c[0], c[1]]) as u32) << 16))
                    .collect(),
                other => {
                    return Err(Error::Weights {
                        path: path.to_path_buf(),
                        message: format!(
                            "tensor '{name}' has dtype {other:?}; give F32, F16 or BF16 weights"
                        ),
                    });
                }
            };
            tensors.insert(
                name,
                Tensor {
                    shape: view.shape().to_vec(),
                    values,
                },
            );
        }
        Ok(Self {
            path: path.to_path_buf(),
            tensors,
            used: BTreeSet::new(),
        })
    }

    /// Take the tensor `name`, checking its shape.
    pub fn take(&mut self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        let t = self.tensors.get(name).ok_or_else(|| Error::Weights {
            path: self.path.clone(),
            message: format!(
                "tensor '{name}' {shape:?} is missing: the file was not written for this model, \
                 class count and activation (list the expected names with `kestrel export --list-weights`)"
            ),
        })?;
        if t.shape != shape {
            return Err(Error::Weights {
                path: self.path.clone(),
                message: format!(
                    "tensor '{name}' has shape {:?} but the model needs {shape:?}; check --model and --classes",
                    t.shape
                ),
            });
        }
        self.used.insert(name.to_string());
        Ok(t.values.clone())
    }

    /// Error if some tensors of the file were not used (a different or unfused model).
    pub fn check_all_used(&self) -> Result<()> {
        let unused: Vec<&String> = self
            .tensors
            .keys()
            .filter(|k| !self.used.contains(*k))
            .collect();
        if let Some(first) = unused.first() {
            return Err(Error::Weights {
                path: self.path.clone(),
                message: format!(
                    "{} tensors of the file are not part of the model (first: '{first}'); \
                     is it an unfused training checkpoint or another model size?",
                    unused.len()
                ),
            });
        }
        Ok(())
    }
}

/// Save named tensors as a safetensors file (float32), atomically.
pub fn save_safetensors(path: &Path, tensors: &BTreeMap<String, Tensor>) -> Result<()> {
    let bytes_store: Vec<(String, Vec<u8>, Vec<usize>)> = tensors
        .iter()
        .map(|(k, t)| {
            let mut b = Vec::with_capacity(t.values.len() * 4);
            for v in &t.values {
                b.extend_from_slice(&v.to_le_bytes());
            }
            (k.clone(), b, t.shape.clone())
        })
        .collect();
    let mut views = Vec::with_capacity(bytes_store.len());
    for (k, b, shape) in &bytes_store {
        let view =
            safetensors::tensor::TensorView::new(Dtype::F32, shape.clone(), b).map_err(|e| {
                Error::Weights {
                    path: path.to_path_buf(),
                    message: format!("tensor '{k}': {e}"),
                }
            })?;
        views.push((k.clone(), view));
    }
    let bytes = safetensors::serialize(views, None).map_err(|e| Error::Weights {
        path: path.to_path_buf(),
        message: format!("cannot serialise: {e}"),
    })?;
    crate::onnx::write_atomic(path, &bytes)
}

/// SplitMix64: a tiny, well-mixed generator; each tensor gets its own stream from (seed, name),
/// so a tensor's values do not depend on the order tensors are created in.
#[derive(Debug, Clone)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    /// Seeded from `seed` and a name (FNV-1a of the name).
    pub fn for_name(seed: u64, name: &str) -> Self {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in name.bytes() {
            h ^= b as u64;
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        Self(seed ^ h)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn next_f32(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }

    /// Uniform in [-bound, bound).
    pub fn uniform(&mut self, bound: f32) -> f32 {
        (self.next_f32() * 2.0 - 1.0) * bound
    }
}

impl WeightSource {
    /// The values of a convolution weight `[c_out, c_in/groups, k, k]` or bias `[c_out]`.
    /// `fan_in` is c_in/groups·k·k; `bias_init` overrides the random bias (YOLOv9's head biases).
    pub fn conv_param(
        &mut self,
        name: &str,
        shape: &[usize],
        fan_in: usize,
        bias_init: Option<f32>,
    ) -> Result<Vec<f32>> {
        match self {
            WeightSource::File(f) => f.take(name, shape),
            WeightSource::Random { seed } => {
                let n: usize = shape.iter().product();
                if let Some(b) = bias_init {
                    return Ok(vec![b; n]);
                }
                let mut rng = SplitMix64::for_name(*seed, name);
                let bound = 1.0 / (fan_in.max(1) as f32).sqrt();
                Ok((0..n).map(|_| rng.uniform(bound)).collect())
            }
        }
    }

    /// A fixed (non-learned) parameter: taken from the file when it has it, else `default`.
    pub fn fixed_param(
        &mut self,
        name: &str,
        shape: &[usize],
        default: Vec<f32>,
    ) -> Result<Vec<f32>> {
        match self {
            WeightSource::File(f) if f.tensors.contains_key(name) => f.take(name, shape),
            _ => Ok(default),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn f16_conversion() {
        assert_eq!(f16_to_f32(0x3c00), 1.0);
        assert_eq!(f16_to_f32(0xc000), -2.0);
        assert_eq!(f16_to_f32(0x7bff), 65504.0);
        assert_eq!(f16_to_f32(0x0001), 5.960_464_5e-8);
        assert!(f16_to_f32(0x7c00).is_infinite());
    }

    #[test]
    fn random_streams_are_per_name() {
        let mut a = SplitMix64::for_name(1, "x");
        let mut b = SplitMix64::for_name(1, "x");
        let mut c = SplitMix64::for_name(1, "y");
        let va = a.next_u64();
        assert_eq!(va, b.next_u64());
        assert_ne!(va, c.next_u64());
        for _ in 0..1000 {
            let v = a.uniform(0.5);
            assert!((-0.5..0.5).contains(&v));
        }
    }

    #[test]
    fn safetensors_round_trip() {
        let dir = std::env::temp_dir().join(format!("kestrel-st-{}", std::process::id()));
        let path = dir.join("w.safetensors");
        let mut m = BTreeMap::new();
        m.insert(
            "a.weight".to_string(),
            Tensor {
                shape: vec![2, 3],
                values: vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0],
            },
        );
        save_safetensors(&path, &m).unwrap();
        let mut f = WeightFile::load(&path).unwrap();
        assert!(f.take("a.weight", &[3, 2]).is_err());
        assert_eq!(f.take("a.weight", &[2, 3]).unwrap()[5], 6.0);
        f.check_all_used().unwrap();
        assert!(
            f.take("missing", &[1])
                .unwrap_err()
                .to_string()
                .contains("missing")
        );
        let _ = std::fs::remove_dir_all(dir);
    }
}
