//! The fuzz targets' inputs in the normal suite: every committed seed (`fuzz/seeds/<target>/`) and
//! every input that once made a target fail (`fuzz/regressions/<target>/`, kept when the bug was
//! fixed) goes through the same checks as under libFuzzer (`fuzz/src/checks.rs`, compiled into
//! this test). A failure here is a fuzz finding come back. See docs/RELIABILITY.md.

#[allow(dead_code)]
#[path = "../../fuzz/src/checks.rs"]
mod checks;
#[path = "../../fuzz/src/seeds.rs"]
mod seeds;

use std::path::{Path, PathBuf};

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz")
}

/// Run every seed and regression input of `target` through `check`; the number of inputs.
fn replay(target: &str, check: fn(&[u8])) -> usize {
    let mut n = 0;
    for kind in ["seeds", "regressions"] {
        let dir = fuzz_dir().join(kind).join(target);
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        let mut files: Vec<PathBuf> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
        files.sort();
        for f in files {
            let bytes = std::fs::read(&f).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
            eprintln!("{}", f.display());
            check(&bytes);
            n += 1;
        }
    }
    n
}

#[test]
fn onnx_model_inputs() {
    assert!(replay("onnx_model", checks::onnx_model) >= 6);
}

#[test]
fn engine_file_inputs() {
    assert!(replay("engine_file", checks::engine_file) >= 4);
}

#[test]
fn image_decode_inputs() {
    assert!(replay("image_decode", checks::image_decode) >= 7);
}

#[test]
fn kserve_request_inputs() {
    assert!(replay("kserve_request", checks::kserve_request) >= 4);
}

#[test]
fn yolo_labels_inputs() {
    assert!(replay("yolo_labels", checks::yolo_labels) >= 5);
}

#[test]
fn coco_json_inputs() {
    assert!(replay("coco_json", checks::coco_json) >= 4);
}

#[test]
fn repository_config_inputs() {
    assert!(replay("repository_config", checks::repository_config) >= 6);
}

/// `bash scripts/fuzz-corpus.sh`: write the seed corpora to `$KESTREL_FUZZ_SEEDS_OUT`.
#[test]
#[ignore = "writes fuzz/seeds; run by scripts/fuzz-corpus.sh"]
fn write_fuzz_seeds() {
    let out = std::env::var_os("KESTREL_FUZZ_SEEDS_OUT").expect("KESTREL_FUZZ_SEEDS_OUT");
    let (files, bytes) = seeds::write_all(Path::new(&out)).expect("seeds");
    println!("{files} seeds, {bytes} bytes");
}
