//! Fault injection (issue 11): each fault the service and `kestrel build` must survive, injected
//! for real, with what must hold asserted: no panic, no request lost, no partial file visible, an
//! error that names the problem and the fix. docs/RELIABILITY.md ("Fault injection") lists them
//! with the commands that run them and the figures measured.
#![allow(clippy::unwrap_used)]

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use kestrel_runtime::engine::{
    BatchProfile, BuildOptions, EngineSource, build_engine_file, open_engine,
};
use kestrel_runtime::engine_file::{CacheOutcome, EngineCache, EngineFile};

/// The cpu backend, fp32, batches of 1 to `max`.
fn cpu_options(max: usize) -> BuildOptions {
    BuildOptions {
        profile: BatchProfile {
            min: 1,
            opt: max,
            max,
        },
        ..Default::default()
    }
}

/// Every entry of `dir` (hidden ones too), sorted; empty when `dir` does not exist.
fn files_in(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|list| {
            list.flatten()
                .map(|e| e.file_name().to_string_lossy().to_string())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

/// `POST /v2/repository/models/{model}/{verb}`: (status, body).
fn control(addr: &str, model: &str, verb: &str) -> (u16, serde_json::Value) {
    let (s, _, b) = http(
        addr,
        "POST",
        &format!("/v2/repository/models/{model}/{verb}"),
        &[],
        b"",
    );
    (s, json(&b))
}

/// The image endpoint: (status, body).
fn detect(addr: &str, path: &str, png: &[u8]) -> (u16, serde_json::Value) {
    let (s, _, b) = http(addr, "POST", path, &[], png);
    (s, json(&b))
}

/// The repository index entry of `model` (its first version's, or its UNAVAILABLE line).
fn index_entry(addr: &str, model: &str) -> Option<serde_json::Value> {
    let (s, _, b) = http(addr, "POST", "/v2/repository/index", &[], b"");
    assert_eq!(s, 200);
    json(&b)
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == model)
        .cloned()
}

/// The same detections up to float rounding (a batch of several images runs other kernels than
/// a batch of one): same count and classes, boxes within 0.05 px, scores within 1e-4.
fn assert_same_detections(got: &serde_json::Value, want: &serde_json::Value) {
    let (g, w) = (
        got["detections"].as_array().unwrap(),
        want["detections"].as_array().unwrap(),
    );
    assert!(!w.is_empty(), "the reference image has no detections");
    assert_eq!(g.len(), w.len(), "{got}\n{want}");
    for (a, b) in g.iter().zip(w) {
        assert_eq!(a["class_id"], b["class_id"], "{got}\n{want}");
        let close = |x: &serde_json::Value, y: &serde_json::Value, tol: f64| {
            (x.as_f64().unwrap() - y.as_f64().unwrap()).abs() <= tol
        };
        assert!(close(&a["confidence"], &b["confidence"], 1e-4), "{a} {b}");
        for k in 0..4 {
            assert!(close(&a["box_xyxy"][k], &b["box_xyxy"][k], 0.05), "{a} {b}");
        }
    }
}

/// Fault 1: the engine file a model was loaded from is corrupted (a byte flipped in place),
/// truncated, deleted, then its whole folder removed, while the service runs. The loaded
/// engine keeps answering, identically; every reload is refused with the reason and the fix
/// while the old version stays served and the service stays ready; the other model is
/// untouched; once the file is back, a reload succeeds without a restart.
#[test]
fn engine_file_corrupted_or_deleted_while_serving() {
    let dir = kestrel_tests::scratch_dir("faults-engine-file");
    let folder = dir.join("shapes-engine");
    let engine = folder.join("1/model.engine");
    std::fs::create_dir_all(engine.parent().unwrap()).unwrap();
    build_engine_file(&model(), &cpu_options(4), &engine).unwrap();
    let good = std::fs::read(&engine).unwrap();
    let config = r#"{"max_batch_size": 4, "max_queue_delay_us": 0}"#;
    std::fs::write(folder.join("config.json"), config).unwrap();
    std::fs::create_dir_all(dir.join("other/1")).unwrap();
    std::fs::copy(model(), dir.join("other/1/model.onnx")).unwrap();

    let server = Server::start(&["--repository", dir.to_str().unwrap()]);
    let a = server.addr.clone();
    let (_, png) = png_of(61, 320, 240);
    let (s, want) = detect(&a, "/v1/models/shapes-engine/detect", &png);
    assert_eq!(s, 200, "{want}");
    let (s, other_want) = detect(&a, "/v1/models/other/detect", &png);
    assert_eq!(s, 200, "{other_want}");
    let still_serving = |after: &str| {
        let (s, got) = detect(&a, "/v1/models/shapes-engine/detect", &png);
        assert_eq!(s, 200, "after {after}: {got}");
        assert_eq!(got["detections"], want["detections"], "after {after}");
        let (s, got) = detect(&a, "/v1/models/other/detect", &png);
        assert_eq!(s, 200, "after {after}: {got}");
        assert_eq!(got["detections"], other_want["detections"], "after {after}");
        assert_eq!(get(&a, "/v2/health/ready").0, 200, "after {after}");
        assert_eq!(
            index_entry(&a, "shapes-engine").unwrap()["state"],
            "READY",
            "after {after}"
        );
    };

    // Each fault, then a reload that must be refused with these words.
    let flip = |bytes: &mut Vec<u8>| {
        let mid = bytes.len() / 2;
        bytes[mid] ^= 0x5a;
    };
    let mut corrupted = good.clone();
    flip(&mut corrupted);
    type Fault<'a> = (&'a str, Box<dyn Fn() + 'a>, &'a [&'a str]);
    let faults: Vec<Fault> = vec![
        (
            "a flipped byte",
            // In place, as a disk or a careless copy would, not through an atomic rename.
            Box::new(|| std::fs::write(&engine, &corrupted).unwrap()),
            &[
                "model.engine",
                "checksum mismatch",
                "rebuild it with `kestrel build`",
            ],
        ),
        (
            "truncation to half",
            Box::new(|| std::fs::write(&engine, &good[..good.len() / 2]).unwrap()),
            &["model.engine", "truncated", "kestrel build"],
        ),
        (
            "deletion of the file",
            Box::new(|| std::fs::remove_file(&engine).unwrap()),
            &["1: no model.onnx or model.engine"],
        ),
        (
            "deletion of the model's folder",
            Box::new(|| std::fs::remove_dir_all(&folder).unwrap()),
            &["shapes-engine", "No such file or directory"],
        ),
    ];
    for (what, inject, needles) in &faults {
        inject();
        still_serving(what);
        let (s, e) = control(&a, "shapes-engine", "load");
        assert_eq!(s, 400, "reload after {what}: {e}");
        let message = e["error"].as_str().unwrap();
        for n in *needles {
            assert!(
                message.contains(n),
                "reload after {what}: {n:?} not in {message}"
            );
        }
        eprintln!("reload after {what}: {s} {message}");
        still_serving(what);
    }

    // The folder back: a reload succeeds, without a restart, and answers the same.
    std::fs::create_dir_all(engine.parent().unwrap()).unwrap();
    std::fs::write(&engine, &good).unwrap();
    std::fs::write(folder.join("config.json"), config).unwrap();
    let (s, e) = control(&a, "shapes-engine", "load");
    assert_eq!(s, 200, "{e}");
    still_serving("the file was restored");
    drop(server);
    let _ = std::fs::remove_dir_all(dir);
}

/// `kestrel …` with its file-size limit (RLIMIT_FSIZE) at `kib` KiB: every write past it fails
/// with EFBIG, as one on a full disk fails with ENOSPC. `kestrel` ignores SIGXFSZ itself (else
/// the kernel's signal would kill it mid-write).
fn kestrel_with_file_limit(kib: u64, args: &[&str]) -> Output {
    Command::new("bash")
        .arg("-c")
        .arg(format!("ulimit -f {kib} && exec \"$0\" \"$@\""))
        .arg(env!("CARGO_BIN_EXE_kestrel"))
        .args(args)
        .output()
        .unwrap()
}

/// Fault 2a: the disk fills (here: the file-size limit is hit) while `kestrel build` writes an
/// engine file of 7.6 MB, 1 MiB into it. The build fails with one line naming the file, the cause
/// and the fix; no partial file is visible, not even the hidden temporary one; an engine file
/// already at that path is left byte for byte as it was.
#[test]
fn disk_full_during_kestrel_build_leaves_no_partial_file() {
    let dir = kestrel_tests::scratch_dir("faults-build-full");
    let out_path = dir.join("t.engine");
    let m = model();
    let args = [
        "build",
        "--onnx",
        m.to_str().unwrap(),
        "--backend",
        "cpu",
        "--precision",
        "fp32",
        "--batch",
        "1:2:2",
        "-o",
        out_path.to_str().unwrap(),
    ];
    let check_refused = |out: &Output| {
        let stderr = String::from_utf8_lossy(&out.stderr);
        // Exit status 1 from main's error path, not death by SIGXFSZ (a core dump).
        assert_eq!(out.status.signal(), None, "killed: {stderr}");
        assert_eq!(out.status.code(), Some(1), "{stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
        for n in [
            "error: ",
            "t.engine: ",
            "file too large",
            "ulimit -f",
            "retry",
        ] {
            assert!(stderr.contains(n), "{n:?} not in {stderr}");
        }
        assert!(
            !stderr.contains(".tmp"),
            "names the temporary file: {stderr}"
        );
        eprintln!("{}", stderr.trim());
    };

    // No file there before: none after, and no temporary file left.
    let out = kestrel_with_file_limit(1024, &args);
    check_refused(&out);
    assert_eq!(files_in(&dir), Vec::<String>::new());

    // A good engine file there before: the failed rebuild leaves it as it was.
    let out = Command::new(env!("CARGO_BIN_EXE_kestrel"))
        .args(args)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let before = std::fs::read(&out_path).unwrap();
    eprintln!("engine file: {} bytes, limit 1048576", before.len());
    assert!(before.len() > 1 << 20);
    let out = kestrel_with_file_limit(1024, &args);
    check_refused(&out);
    assert_eq!(files_in(&dir), vec!["t.engine".to_string()]);
    assert!(std::fs::read(&out_path).unwrap() == before);
    EngineFile::read(&out_path).unwrap();
    let _ = std::fs::remove_dir_all(dir);
}

/// Set in the child that [`a_failed_engine_cache_write_still_serves_the_engine`] runs.
const CACHE_CHILD: &str = "KESTREL_FAULTS_CACHE_CHILD";

/// Fault 2b (and 1, cache form): the engine cache. A write that fails — the file-size limit hit
/// mid-file (EFBIG, as ENOSPC on a full disk; this test binary re-run under `ulimit -f 1024`), a
/// cache folder that cannot be created — still gives the engine built, says why it was not
/// stored, and leaves nothing in the cache. A cached file corrupted or deleted is rebuilt,
/// naming why, and replaced by a valid one.
#[test]
fn a_failed_engine_cache_write_still_serves_the_engine() {
    let options = cpu_options(1);
    let built_reason = |source: EngineSource| match source {
        EngineSource::Cache(CacheOutcome::Built { reason }) => reason,
        other => panic!("expected a build, got {other:?}"),
    };
    if let Some(dir) = std::env::var_os(CACHE_CHILD) {
        // The child, under the file-size limit: the engine comes back and runs.
        let cache = EngineCache {
            dir: PathBuf::from(dir),
        };
        let (mut engine, source) = open_engine(&model(), &options, Some(&cache)).unwrap();
        let reason = built_reason(source);
        for n in [
            "not in the cache",
            "not stored in the cache",
            "file too large",
        ] {
            assert!(reason.contains(n), "{n:?} not in {reason}");
        }
        eprintln!("child: {reason}");
        let zeros = vec![0f32; engine.info().input_len()];
        engine.run(&zeros, 1).unwrap();
        assert_eq!(files_in(&cache.dir), Vec::<String>::new());
        return;
    }
    let dir = kestrel_tests::scratch_dir("faults-cache");
    let cache = EngineCache {
        dir: dir.join("engines"),
    };
    // `trap '' XFSZ`: this test binary, unlike `kestrel`, does not ignore SIGXFSZ itself.
    let out = Command::new("bash")
        .arg("-c")
        .arg("ulimit -f 1024 && trap '' XFSZ && exec \"$0\" \"$@\"")
        .arg(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "a_failed_engine_cache_write_still_serves_the_engine",
            "--nocapture",
            "--test-threads",
            "1",
        ])
        .env(CACHE_CHILD, &cache.dir)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains("1 passed"), "{stdout}");
    eprintln!("{}", stderr.trim());
    assert_eq!(files_in(&cache.dir), Vec::<String>::new());

    // A file where the cache folder should be: the engine still comes, the reason names it.
    let blocked = dir.join("blocked");
    std::fs::write(&blocked, "not a folder").unwrap();
    let (_, source) = open_engine(
        &model(),
        &options,
        Some(&EngineCache {
            dir: blocked.join("engines"),
        }),
    )
    .unwrap();
    let reason = built_reason(source);
    assert!(
        reason.contains("not stored in the cache") && reason.contains("blocked"),
        "{reason}"
    );

    // Stored, then found.
    let (_, source) = open_engine(&model(), &options, Some(&cache)).unwrap();
    assert_eq!(built_reason(source), "not in the cache");
    let stored = files_in(&cache.dir);
    assert_eq!(stored.len(), 1, "{stored:?}");
    let path = cache.dir.join(&stored[0]);
    let (_, source) = open_engine(&model(), &options, Some(&cache)).unwrap();
    assert_eq!(source, EngineSource::Cache(CacheOutcome::Hit));

    // Corrupted in place: rebuilt, the reason named, the file replaced by a valid one.
    let mut bytes = std::fs::read(&path).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x5a;
    std::fs::write(&path, &bytes).unwrap();
    let (_, source) = open_engine(&model(), &options, Some(&cache)).unwrap();
    let reason = built_reason(source);
    assert!(reason.contains("checksum mismatch"), "{reason}");
    EngineFile::read(&path).unwrap();
    assert_eq!(files_in(&cache.dir), stored);
    // Deleted: rebuilt and stored again.
    std::fs::remove_file(&path).unwrap();
    let (_, source) = open_engine(&model(), &options, Some(&cache)).unwrap();
    assert_eq!(built_reason(source), "not in the cache");
    let (_, source) = open_engine(&model(), &options, Some(&cache)).unwrap();
    assert_eq!(source, EngineSource::Cache(CacheOutcome::Hit));
    let _ = std::fs::remove_dir_all(dir);
}

/// Fault 3: no GPU (this build machine has none; on a GPU machine the test has nothing to
/// inject and returns). `kestrel build --backend cuda` fails with one line naming the reason and
/// `--backend cpu`, writing nothing. `kestrel serve` with cuda models starts, logs why each is
/// not loaded, reports them UNAVAILABLE with the reason (not ready, 503 per request), and serves
/// the cpu models beside them. There is no automatic fallback to the CPU: the cpu backend is
/// chosen in the model's config.json or with --backend cpu.
#[test]
fn cuda_without_a_gpu_is_refused_with_the_reason() {
    let Some(reason) = kestrel_runtime::cuda::unavailable_reason() else {
        eprintln!("skipped: this machine has a usable GPU");
        return;
    };
    let dir = kestrel_tests::scratch_dir("faults-no-gpu");
    let m = model();
    let engine = dir.join("g.engine");
    let out = Command::new(env!("CARGO_BIN_EXE_kestrel"))
        .args(["build", "--onnx", m.to_str().unwrap(), "--backend", "cuda"])
        .arg("-o")
        .arg(&engine)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    for n in ["error: ", "cuda backend", &reason, "--backend cpu"] {
        assert!(stderr.contains(n), "{n:?} not in {stderr}");
    }
    eprintln!("build: {}", stderr.trim());
    assert_eq!(files_in(&dir), Vec::<String>::new());

    // One model on the cuda backend, one on the cpu backend.
    for (name, backend) in [("on-gpu", "cuda"), ("on-cpu", "cpu")] {
        std::fs::create_dir_all(dir.join(name).join("1")).unwrap();
        std::fs::copy(&m, dir.join(name).join("1/model.onnx")).unwrap();
        std::fs::write(
            dir.join(name).join("config.json"),
            format!(r#"{{"backend": "{backend}", "max_batch_size": 2}}"#),
        )
        .unwrap();
    }
    let log = dir.join("serve.log");
    let server = Server::start_with_stderr(
        &["--repository", dir.to_str().unwrap()],
        Stdio::from(std::fs::File::create(&log).unwrap()),
    );
    let a = server.addr.clone();
    let logged = std::fs::read_to_string(&log).unwrap();
    assert!(
        logged.contains("warning: model on-gpu not loaded:") && logged.contains(&reason),
        "{logged}"
    );
    eprintln!(
        "serve: {}",
        logged.lines().find(|l| l.contains("on-gpu")).unwrap()
    );
    let (_, png) = png_of(63, 320, 240);
    let (s, body) = detect(&a, "/v1/models/on-cpu/detect", &png);
    assert_eq!(s, 200, "{body}");
    let (s, body) = detect(&a, "/v1/models/on-gpu/detect", &png);
    assert_eq!(s, 503, "{body}");
    let e = body["error"].as_str().unwrap();
    assert!(e.contains("not loaded") && e.contains(&reason), "{e}");
    let entry = index_entry(&a, "on-gpu").unwrap();
    assert_eq!(entry["state"], "UNAVAILABLE");
    assert!(
        entry["reason"].as_str().unwrap().contains(&reason),
        "{entry}"
    );
    assert_eq!(get(&a, "/v2/models/on-gpu/ready").0, 503);
    assert_eq!(get(&a, "/v2/models/on-cpu/ready").0, 200);
    assert_eq!(get(&a, "/v2/health/ready").0, 503);
    assert_eq!(get(&a, "/v2/health/live").0, 200);

    // `--backend cuda` for a lone --model: the same, the service up and saying why.
    drop(server);
    let log = dir.join("serve-model.log");
    let server = Server::start_with_stderr(
        &["--model", m.to_str().unwrap(), "--backend", "cuda"],
        Stdio::from(std::fs::File::create(&log).unwrap()),
    );
    let logged = std::fs::read_to_string(&log).unwrap();
    assert!(
        logged.contains("warning: model gelan-t-shapes not loaded:") && logged.contains(&reason),
        "{logged}"
    );
    let (s, body) = detect(&server.addr, "/v1/models/gelan-t-shapes/detect", &png);
    assert_eq!(s, 503, "{body}");
    drop(server);
    let _ = std::fs::remove_dir_all(dir);
}

/// The `kestrel_batch_size_sum` of the served demo model: images run so far.
fn images_run(addr: &str) -> f64 {
    let (_, _, text) = http(addr, "GET", "/metrics", &[], b"");
    sample(
        &String::from_utf8(text).unwrap(),
        "kestrel_batch_size_sum{model=\"gelan-t-shapes\"} ",
    )
    .unwrap_or(0.0)
}

/// `n` image requests at once to `path`: the threads answer (status, body).
fn detect_all(
    addr: &str,
    path: &str,
    png: &[u8],
    n: usize,
) -> Vec<std::thread::JoinHandle<(u16, serde_json::Value)>> {
    (0..n)
        .map(|_| {
            let (a, p, png) = (addr.to_string(), path.to_string(), png.to_vec());
            std::thread::spawn(move || detect(&a, &p, &png))
        })
        .collect()
}

/// Fault 4: one request of a batch times out (its own `timeout_ms`), first while its batch is
/// being formed, then while the engine runs the batch. It gets 504 naming the timeout; the others
/// of the batch get their own, correct answers; the batcher goes on. A request whose client has
/// gone before its batch starts is not run.
#[test]
fn a_request_timing_out_mid_batch_leaves_the_others_answered() {
    // Batches wait 300 ms for more requests; 16 images at most, so 8 do not start one early.
    let server =
        Server::model_server(&["--max-batch-size", "16", "--max-queue-delay-us", "300000"]);
    let a = server.addr.clone();
    let (_, png) = png_of(62, 320, 240);
    let path = "/v1/models/gelan-t-shapes/detect";
    let (s, solo) = detect(&a, path, &png);
    assert_eq!(s, 200, "{solo}");

    // While the batch is formed: 3 requests, then one that gives up after 100 ms.
    let run_before = images_run(&a);
    let others = detect_all(&a, path, &png, 3);
    std::thread::sleep(Duration::from_millis(20));
    let t0 = Instant::now();
    let (s, e) = detect(&a, &format!("{path}?timeout_ms=100"), &png);
    let waited = t0.elapsed();
    assert_eq!(s, 504, "{e}");
    assert!(
        e["error"]
            .as_str()
            .unwrap()
            .contains("no result within 0.100 s"),
        "{e}"
    );
    for t in others {
        let (s, got) = t.join().unwrap();
        assert_eq!(s, 200, "{got}");
        assert_same_detections(&got, &solo);
        assert_eq!(got["batch_images"], 3, "{got}");
    }
    // The batch ran the 3 live requests only: the expired one was dropped, not computed.
    assert_eq!(images_run(&a) - run_before, 3.0);
    eprintln!("timed out while queued: 504 after {waited:?}; the other 3 answered, batch of 3");

    // While the engine runs: 7 requests and one that gives up 400 ms after it was queued, once
    // the batch (8 images) has started at 300 ms and before it ends.
    let others = detect_all(&a, path, &png, 7);
    std::thread::sleep(Duration::from_millis(20));
    let t0 = Instant::now();
    let (s, e) = detect(&a, &format!("{path}?timeout_ms=400"), &png);
    let waited = t0.elapsed();
    assert_eq!(s, 504, "{e}");
    let mut inference_ms = 0.0;
    for t in others {
        let (s, got) = t.join().unwrap();
        assert_eq!(s, 200, "{got}");
        assert_same_detections(&got, &solo);
        // The timed-out request's image was in the batch: it expired mid-run.
        assert_eq!(got["batch_images"], 8, "{got}");
        inference_ms = got["timing_ms"]["inference"].as_f64().unwrap();
        assert!(got["timing_ms"]["queue"].as_f64().unwrap() < 400.0, "{got}");
    }
    eprintln!(
        "timed out mid-run: 504 after {waited:?}; the batch of 8 ran {inference_ms:.0} ms, \
         the other 7 answered"
    );
    // The batcher goes on.
    let (s, got) = detect(&a, path, &png);
    assert_eq!(s, 200, "{got}");
    assert_same_detections(&got, &solo);
}

/// What a client saw of one request.
#[derive(Debug, Clone, PartialEq)]
enum Seen {
    /// A complete response with this status.
    Status(u16),
    /// The connection was refused: the server no longer listened.
    Refused,
    /// Connected, but closed with no byte of a response: never served (the kernel had queued
    /// the connection when the listener closed).
    ClosedUnanswered,
    /// Anything else (a partial response, another error): a request lost.
    Lost(String),
}

/// One image request on a fresh connection, reporting what the client saw.
fn try_detect(addr: &str, png: &[u8]) -> Seen {
    let mut s = match TcpStream::connect(addr) {
        Ok(s) => s,
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => return Seen::Refused,
        Err(e) => return Seen::Lost(format!("connect: {e}")),
    };
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let head = format!(
        "POST /v1/models/gelan-t-shapes/detect HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\
         Content-Length: {}\r\n\r\n",
        png.len()
    );
    if s.write_all(head.as_bytes()).is_err() || s.write_all(png).is_err() {
        return Seen::ClosedUnanswered;
    }
    let mut raw = Vec::new();
    match s.read_to_end(&mut raw) {
        Ok(_) if raw.is_empty() => return Seen::ClosedUnanswered,
        Err(e) if raw.is_empty() && e.kind() == std::io::ErrorKind::ConnectionReset => {
            return Seen::ClosedUnanswered;
        }
        Err(e) => return Seen::Lost(format!("read: {e}")),
        Ok(_) => {}
    }
    let text = String::from_utf8_lossy(&raw);
    let Some(status) = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse::<u16>().ok())
    else {
        return Seen::Lost(format!("not HTTP: {text:?}"));
    };
    // A complete 200 carries the detections.
    if status == 200 && !text.contains("\"detections\"") {
        return Seen::Lost(format!("partial body: {text:?}"));
    }
    Seen::Status(status)
}

/// Fault 5 (under load; `unload_and_sigterm_complete_the_requests_in_flight` in serve.rs sends
/// SIGTERM with three requests waiting in a batch): 6 clients send requests back to back; SIGTERM
/// after 1.5 s. Every request sent before the signal is answered 200, the server exits 0, and
/// what came after is refused (or closed unanswered) at the door: none gets an error or a cut
/// response.
#[test]
fn sigterm_under_load_drains_every_request_in_flight() {
    let mut server = Server::model_server(&["--max-queue-delay-us", "20000"]);
    let a = server.addr.clone();
    let (_, png) = png_of(64, 320, 240);
    // (sent, answered or failed, what the client saw)
    let seen: Arc<Mutex<Vec<(Instant, Instant, Seen)>>> = Arc::default();
    let clients: Vec<_> = (0..6)
        .map(|_| {
            let (a, png, seen) = (a.clone(), png.clone(), Arc::clone(&seen));
            std::thread::spawn(move || {
                loop {
                    let sent = Instant::now();
                    let s = try_detect(&a, &png);
                    let stop = s == Seen::Refused;
                    seen.lock().unwrap().push((sent, Instant::now(), s));
                    if stop {
                        return;
                    }
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(1500));
    let term = Instant::now();
    let status = server.terminate();
    let stopped = term.elapsed();
    for c in clients {
        c.join().unwrap();
    }
    assert!(status.success(), "{status:?}");
    let seen = seen.lock().unwrap();
    let before: Vec<&Seen> = seen
        .iter()
        .filter(|(t, _, _)| *t < term)
        .map(|(_, _, s)| s)
        .collect();
    let after: Vec<&Seen> = seen
        .iter()
        .filter(|(t, _, _)| *t >= term)
        .map(|(_, _, s)| s)
        .collect();
    let answered = before.iter().filter(|s| ***s == Seen::Status(200)).count();
    // Sent before the signal, answered after it: in flight when it came.
    let in_flight = seen
        .iter()
        .filter(|(sent, done, s)| *sent < term && *done > term && *s == Seen::Status(200))
        .count();
    // Requests that started before the signal: all answered, or (a connection still in the
    // kernel's queue when the listener closed, microseconds before the signal) never served.
    for s in &before {
        assert!(
            matches!(s, Seen::Status(200) | Seen::ClosedUnanswered),
            "a request sent before SIGTERM: {s:?}"
        );
    }
    for s in &after {
        assert!(
            matches!(
                s,
                Seen::Status(200) | Seen::Refused | Seen::ClosedUnanswered
            ),
            "a request sent after SIGTERM: {s:?}"
        );
    }
    let unanswered_before = before.len() - answered;
    assert!(unanswered_before <= 6, "{before:?}");
    let after_200 = after.iter().filter(|s| ***s == Seen::Status(200)).count();
    eprintln!(
        "SIGTERM under load: {} requests before it ({answered} answered 200, {in_flight} of \
         them in flight at the signal; {unanswered_before} closed unanswered), {} after \
         ({after_200} answered, the rest refused); exit 0 after {stopped:?}",
        before.len(),
        after.len()
    );
    assert!(answered >= 6, "too few requests before SIGTERM: {before:?}");
}

/// Fault 5, the other reading: SIGTERM while a model load (a reload through the repository API)
/// is in flight. The load completes and is answered, then the server exits 0.
#[test]
fn sigterm_during_a_model_load_completes_it() {
    let dir = kestrel_tests::scratch_dir("faults-term-load");
    std::fs::create_dir_all(dir.join("shapes/1")).unwrap();
    std::fs::copy(model(), dir.join("shapes/1/model.onnx")).unwrap();
    let mut server = Server::start(&["--repository", dir.to_str().unwrap()]);
    let a = server.addr.clone();
    let t0 = Instant::now();
    let load = std::thread::spawn(move || {
        let r = control(&a, "shapes", "load");
        (r, t0.elapsed())
    });
    std::thread::sleep(Duration::from_millis(100));
    let term = t0.elapsed();
    let status = server.terminate();
    let ((s, body), took) = load.join().unwrap();
    assert_eq!(s, 200, "{body}");
    assert!(
        took > term,
        "the load ended ({took:?}) before SIGTERM ({term:?})"
    );
    assert!(status.success(), "{status:?}");
    eprintln!("SIGTERM {term:?} into a load of {took:?}: load answered 200, exit 0");
    let _ = std::fs::remove_dir_all(dir);
}

/// Fault 6: a repository where most entries are broken, each differently. The good model loads
/// and serves; each broken one is UNAVAILABLE with a reason naming its file and problem (and
/// answers 503 with it); folders whose name cannot be a model name and stray files are not
/// models; fixing an entry and loading it works without a restart. (The placement mistakes are
/// `instances_are_counted_per_engine_and_bad_placements_are_named` in serve.rs; mistakes in the
/// service's own --config file end the start at once: `config_mistakes_are_named`.)
#[test]
fn malformed_repository_entries_leave_the_others_serving() {
    let dir = kestrel_tests::scratch_dir("faults-repository");
    let onnx = std::fs::read(model()).unwrap();
    let mut engine = {
        let p = dir.join("good.engine.tmp");
        build_engine_file(&model(), &cpu_options(8), &p).unwrap();
        let b = std::fs::read(&p).unwrap();
        std::fs::remove_file(p).unwrap();
        b
    };
    let mid = engine.len() / 2;
    engine[mid] ^= 0x5a;
    let put = |path: &str, bytes: &[u8]| {
        let p = dir.join(path);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, bytes).unwrap();
    };
    put("good/1/model.onnx", &onnx);
    put("good/config.json", br#"{"max_batch_size": 2}"#);
    // (entry, what must be in its reason)
    let broken: Vec<(&str, &[&str])> = vec![
        ("bad-json", &["bad-json/config.json", "EOF"]),
        (
            "unknown-key",
            &["unknown-key/config.json", "unknown field `max_batch`"],
        ),
        ("wrong-type", &["wrong-type/config.json", "invalid type"]),
        ("zero-batch", &["max_batch_size"]),
        ("bad-backend", &["tpu"]),
        ("no-versions", &["no-versions", "no version folder"]),
        (
            "empty-version",
            &["empty-version/1", "no model.onnx or model.engine"],
        ),
        ("not-onnx", &["not-onnx/1/model.onnx"]),
        ("empty-onnx", &["empty-onnx/1/model.onnx"]),
        ("truncated-onnx", &["truncated-onnx/1/model.onnx"]),
        (
            "corrupt-engine",
            &["corrupt-engine/1/model.engine", "checksum mismatch"],
        ),
        ("missing-labels", &["names.txt"]),
        ("one-bad-version", &["one-bad-version/2/model.onnx"]),
    ];
    put("bad-json/config.json", br#"{"max_batch_size": 2,"#);
    put("bad-json/1/model.onnx", &onnx);
    put("unknown-key/config.json", br#"{"max_batch": 2}"#);
    put("unknown-key/1/model.onnx", &onnx);
    put("wrong-type/config.json", br#"{"max_batch_size": "eight"}"#);
    put("wrong-type/1/model.onnx", &onnx);
    put("zero-batch/config.json", br#"{"max_batch_size": 0}"#);
    put("zero-batch/1/model.onnx", &onnx);
    put("bad-backend/config.json", br#"{"backend": "tpu"}"#);
    put("bad-backend/1/model.onnx", &onnx);
    std::fs::create_dir_all(dir.join("no-versions")).unwrap();
    std::fs::create_dir_all(dir.join("empty-version/1")).unwrap();
    put("not-onnx/1/model.onnx", b"this is not a model\n");
    put("empty-onnx/1/model.onnx", b"");
    put("truncated-onnx/1/model.onnx", &onnx[..onnx.len() / 3]);
    put("corrupt-engine/1/model.engine", &engine);
    put(
        "missing-labels/config.json",
        br#"{"labels": "names.txt", "max_batch_size": 2}"#,
    );
    put("missing-labels/1/model.onnx", &onnx);
    put("one-bad-version/config.json", br#"{"max_batch_size": 2}"#);
    put("one-bad-version/1/model.onnx", &onnx);
    put("one-bad-version/2/model.onnx", &onnx[..1000]);
    // Not models: a stray file, a folder named like no model can be, a hidden folder.
    put("README.txt", b"models live in folders\n");
    put("bad name/1/model.onnx", &onnx);
    put(".hidden/1/model.onnx", &onnx);

    let t0 = Instant::now();
    let server = Server::start(&["--repository", dir.to_str().unwrap()]);
    let started = t0.elapsed();
    let a = server.addr.clone();
    let (_, png) = png_of(65, 320, 240);
    let (s, body) = detect(&a, "/v1/models/good/detect", &png);
    assert_eq!(s, 200, "{body}");
    assert!(!body["detections"].as_array().unwrap().is_empty(), "{body}");
    let (s, _, index) = http(&a, "POST", "/v2/repository/index", &[], b"");
    assert_eq!(s, 200);
    let index = json(&index);
    let names: Vec<&str> = index
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["name"].as_str().unwrap())
        .collect();
    for not_a_model in ["README.txt", "bad name", ".hidden"] {
        assert!(!names.contains(&not_a_model), "{names:?}");
    }
    assert_eq!(names.len(), 1 + broken.len(), "{names:?}");
    for (name, needles) in &broken {
        let entry = index_entry(&a, name).unwrap();
        assert_eq!(entry["state"], "UNAVAILABLE", "{entry}");
        let reason = entry["reason"].as_str().unwrap();
        for n in *needles {
            assert!(reason.contains(n), "{name}: {n:?} not in {reason}");
        }
        assert!(!reason.contains("panicked"), "{reason}");
        let (s, body) = detect(&a, &format!("/v1/models/{name}/detect"), &png);
        assert_eq!(s, 503, "{name}: {body}");
        eprintln!("{name}: {reason}");
    }
    assert_eq!(get(&a, "/v2/models/good/ready").0, 200);
    // Not every model is loaded: not ready, though live.
    assert_eq!(get(&a, "/v2/health/ready").0, 503);
    assert_eq!(get(&a, "/v2/health/live").0, 200);

    // Fixed in place, loaded without a restart.
    put("unknown-key/config.json", br#"{"max_batch_size": 2}"#);
    let (s, body) = control(&a, "unknown-key", "load");
    assert_eq!(s, 200, "{body}");
    let (s, body) = detect(&a, "/v1/models/unknown-key/detect", &png);
    assert_eq!(s, 200, "{body}");
    eprintln!(
        "{} broken entries beside 1 good one: the good one served, start took {started:?}",
        broken.len()
    );
    drop(server);
    let _ = std::fs::remove_dir_all(dir);
}
