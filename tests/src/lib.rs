//! Helpers for Kestrel's workspace-level tests: where the workspace is, the reference Python
//! (onnx, onnxruntime, pycocotools in the project venv), and scratch directories.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The workspace root (the folder holding the top-level `Cargo.toml`): `$KESTREL_WORKSPACE`
/// where the test binaries run away from their build tree (the GPU machine), else the build tree.
pub fn workspace_root() -> PathBuf {
    if let Some(dir) = std::env::var_os("KESTREL_WORKSPACE") {
        return PathBuf::from(dir);
    }
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// The Python interpreter with the reference tools: `$KESTREL_PYTHON`, else the project's `.venv`.
/// Panics with the fix when it is missing: these tests must not pass silently without their oracle.
pub fn python() -> PathBuf {
    if let Some(p) = std::env::var_os("KESTREL_PYTHON") {
        return PathBuf::from(p);
    }
    let venv = workspace_root().join(".venv/bin/python");
    assert!(
        venv.exists(),
        "the reference Python is missing at {}: run `bash scripts/setup.sh` first",
        venv.display()
    );
    venv
}

/// Run `scripts/py/<script>` with the reference Python and `args`; returns stdout.
/// Panics with the script's stderr when it fails.
pub fn run_python(script: &str, args: &[&str]) -> String {
    let path = workspace_root().join("scripts/py").join(script);
    let out = Command::new(python())
        .arg(&path)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot start python for {script}: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "{script} failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    stdout
}

/// A fresh scratch directory under the target folder, named after the test.
pub fn scratch_dir(name: &str) -> PathBuf {
    let dir = workspace_root().join("target/test-scratch").join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create scratch dir");
    dir
}

/// Median wall-clock time of `reps` calls of `f`, in milliseconds (the GPU benchmark tests).
pub fn median_ms(reps: usize, mut f: impl FnMut()) -> f64 {
    let mut t: Vec<f64> = (0..reps.max(1))
        .map(|_| {
            let start = std::time::Instant::now();
            f();
            start.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    t.sort_by(f64::total_cmp);
    t[t.len() / 2]
}

/// SplitMix64, so the test data does not depend on any RNG crate's version.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    pub fn f32(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 24) as f32
    }
    pub fn range(&mut self, lo: f32, hi: f32) -> f32 {
        lo + (hi - lo) * self.f32()
    }
    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    pub fn chance(&mut self, p: f32) -> bool {
        self.f32() < p
    }
}

/// The tight box of a mask's set pixels (`x2`, `y2` one past the last pixel).
pub fn mask_box(m: &kestrel_runtime::Bitmap) -> kestrel_runtime::BoxXyxy {
    let (mut x1, mut y1, mut x2, mut y2) = (usize::MAX, usize::MAX, 0, 0);
    for (i, &v) in m.data.iter().enumerate() {
        if v != 0 {
            let (x, y) = (i % m.width, i / m.width);
            (x1, y1, x2, y2) = (x1.min(x), y1.min(y), x2.max(x + 1), y2.max(y + 1));
        }
    }
    kestrel_runtime::BoxXyxy::new(x1 as f32, y1 as f32, x2 as f32, y2 as f32)
}

/// Build options for small test models: batches 1 to 4 (optimised for 4) on GPU 0.
pub fn small_batches(
    backend: kestrel_runtime::engine::Backend,
    precision: kestrel_runtime::engine::Precision,
) -> kestrel_runtime::engine::BuildOptions {
    kestrel_runtime::engine::BuildOptions {
        backend,
        precision,
        profile: kestrel_runtime::engine::BatchProfile {
            min: 1,
            opt: 4,
            max: 4,
        },
        device: 0,
    }
}
