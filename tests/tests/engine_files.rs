//! Engine files and the engine cache (CPU backend, so they run everywhere): corruption, truncation
//! and a foreign device are detected and handled, and concurrent builders leave one valid file.

use std::path::Path;

use kestrel_exporter::weights::SplitMix64;
use kestrel_exporter::{ExportOptions, ModelConfig, WeightSource, export, onnx};
use kestrel_runtime::engine::{
    BatchProfile, BuildOptions, EngineSource, build_engine_file, open_engine,
};
use kestrel_runtime::engine_file::{CacheOutcome, EngineCache, EngineFile};
use kestrel_tests::scratch_dir;

fn small_model(path: &Path) {
    let cfg = ModelConfig::new("gelan-t", 3, 64).unwrap();
    let model = export(
        &cfg,
        &mut WeightSource::Random { seed: 2 },
        &ExportOptions::dynamic(3),
    )
    .unwrap();
    onnx::write_model(&model, path).unwrap();
}

fn options() -> BuildOptions {
    BuildOptions {
        profile: BatchProfile {
            min: 1,
            opt: 2,
            max: 2,
        },
        ..Default::default()
    }
}

#[test]
fn engine_file_round_trip_and_damage() {
    let dir = scratch_dir("engine-file");
    let model = dir.join("t.onnx");
    small_model(&model);
    let file = dir.join("t.engine");
    let header = build_engine_file(&model, &options(), &file).unwrap();
    assert_eq!(header.backend, "cpu");
    assert_eq!(header.profile, [1, 2, 2]);

    let (mut from_file, source) = open_engine(&file, &BuildOptions::default(), None).unwrap();
    assert_eq!(source, EngineSource::EngineFile);
    assert_eq!(
        from_file.info().profile,
        BatchProfile {
            min: 1,
            opt: 2,
            max: 2
        },
        "the header's profile wins"
    );
    let (mut from_onnx, _) = open_engine(&model, &options(), None).unwrap();
    let mut rng = SplitMix64::new(1);
    let input: Vec<f32> = (0..2 * from_onnx.info().input_len())
        .map(|_| rng.next_f32())
        .collect();
    assert_eq!(
        from_file.run(&input, 2).unwrap(),
        from_onnx.run(&input, 2).unwrap()
    );

    let bytes = std::fs::read(&file).unwrap();
    // A flipped byte in the middle of the embedded model.
    let mut flipped = bytes.clone();
    flipped[bytes.len() / 2] ^= 1;
    let bad = dir.join("flipped.engine");
    std::fs::write(&bad, &flipped).unwrap();
    let err = open_engine(&bad, &options(), None)
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("flipped.engine") && err.contains("corrupted"),
        "{err}"
    );
    // Truncated.
    let cut = dir.join("cut.engine");
    std::fs::write(&cut, &bytes[..bytes.len() - 100]).unwrap();
    let err = open_engine(&cut, &options(), None)
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("cut.engine") && err.contains("truncated"),
        "{err}"
    );
    // Recorded on another device: rebuilt from the embedded model, with the reason.
    let mut foreign = EngineFile::decode(&bytes, &file).unwrap();
    foreign.header.device = "NVIDIA H100 80GB HBM3".into();
    let other = dir.join("foreign.engine");
    foreign.write(&other).unwrap();
    let (_, source) = open_engine(&other, &options(), None).unwrap();
    match source {
        EngineSource::RebuiltFromEngineFile { reason } => {
            assert!(
                reason.contains("built for NVIDIA H100 80GB HBM3, this machine has cpu"),
                "{reason}"
            )
        }
        s => panic!("expected a rebuild, got {s:?}"),
    }
    // An engine file is not an ONNX to build from.
    let err = build_engine_file(&file, &options(), &dir.join("again.engine"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("already an engine file"), "{err}");
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn cache_hits_rebuilds_and_concurrent_builders() {
    let dir = scratch_dir("engine-cache");
    let model = dir.join("t.onnx");
    small_model(&model);
    let cache = EngineCache {
        dir: dir.join("cache"),
    };
    let outcome = |c: &EngineCache| match open_engine(&model, &options(), Some(c)).unwrap().1 {
        EngineSource::Cache(o) => o,
        s => panic!("expected the cache, got {s:?}"),
    };
    assert_eq!(
        outcome(&cache),
        CacheOutcome::Built {
            reason: "not in the cache".into()
        }
    );
    assert_eq!(outcome(&cache), CacheOutcome::Hit);
    let files: Vec<_> = std::fs::read_dir(&cache.dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(files.len(), 1);
    let cached = files[0].clone();

    // Corrupted in the cache: rebuilt, and the reason says why.
    let mut bytes = std::fs::read(&cached).unwrap();
    let n = bytes.len();
    // A byte in the middle of the embedded ONNX (the bulk of the file): the checksum catches it.
    bytes[n / 2] ^= 0xff;
    std::fs::write(&cached, &bytes).unwrap();
    match outcome(&cache) {
        CacheOutcome::Built { reason } => assert!(reason.contains("corrupted"), "{reason}"),
        o => panic!("{o:?}"),
    }
    assert_eq!(outcome(&cache), CacheOutcome::Hit);

    // Stale (another device recorded under this key): rebuilt.
    let mut file = EngineFile::read(&cached).unwrap();
    file.header.device = "NVIDIA H200".into();
    file.write(&cached).unwrap();
    match outcome(&cache) {
        CacheOutcome::Built { reason } => assert!(
            reason.contains("stale") && reason.contains("NVIDIA H200"),
            "{reason}"
        ),
        o => panic!("{o:?}"),
    }

    // Four builders of the same key at once: one valid file, no temporary files left.
    let fresh = EngineCache {
        dir: dir.join("fresh"),
    };
    std::thread::scope(|s| {
        for _ in 0..4 {
            let fresh = fresh.clone();
            let model = model.clone();
            s.spawn(move || {
                open_engine(&model, &options(), Some(&fresh))
                    .map(|_| ())
                    .unwrap()
            });
        }
    });
    let files: Vec<_> = std::fs::read_dir(&fresh.dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(files.len(), 1, "{files:?}");
    EngineFile::read(&files[0]).unwrap();
    let _ = std::fs::remove_dir_all(dir);
}
