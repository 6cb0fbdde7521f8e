//! The security review of `kestrel serve` (docs/RELIABILITY.md, "Security review"): every limit
//! answers with an HTTP error naming the limit and the config key that raises it; model names in
//! URLs and the repository's folders, configs and symlinks cannot reach outside the repository;
//! the control endpoints need the token, or come from this host when none is set; the token never
//! reaches the logs or a response. Over real HTTP on loopback, the bundled demo model on the CPU.
#![allow(clippy::unwrap_used)]

mod common;

use std::fs::File;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::{Server, http, json, model, response};
use kestrel_runtime::synth::{image_seed, render_scene};

const DETECT: &str = "/v1/models/gelan-t-shapes/detect";

/// The `{"error"}` of a response that must have `status`, checked to name every one of `needles`.
fn expect_error(r: &(u16, Vec<(String, String)>, Vec<u8>), status: u16, needles: &[&str]) {
    assert_eq!(r.0, status, "{}", String::from_utf8_lossy(&r.2));
    let e = json(&r.2);
    let message = e["error"].as_str().unwrap();
    for n in needles {
        assert!(message.contains(n), "{message:?} does not name {n:?}");
    }
}

fn png_of(seed: u64, w: u32, h: u32) -> Vec<u8> {
    let (img, _) = render_scene(image_seed(seed, 0), w, h);
    let mut bytes = Vec::new();
    image::DynamicImage::ImageRgb8(img)
        .write_to(
            &mut std::io::Cursor::new(&mut bytes),
            image::ImageFormat::Png,
        )
        .unwrap();
    bytes
}

fn temp_dir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("kestrel-security-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A body over `max_body_bytes` is a 413 naming the limit, whether its size is declared
/// (Content-Length) or only found while reading (chunked).
#[test]
fn bodies_over_max_body_bytes_are_refused() {
    let server = Server::model_server(&["--max-body-bytes", "4096"]);
    let a = &server.addr;
    let keys = ["max_body_bytes", "--max-body-bytes", "--config"];
    for path in [DETECT, "/v2/models/gelan-t-shapes/infer"] {
        let r = http(a, "POST", path, &[], &vec![b'x'; 5000]);
        expect_error(&r, 413, &keys);
    }
    // Chunked: no declared length; the service stops reading at the limit.
    let mut s = TcpStream::connect(a).unwrap();
    write!(
        s,
        "POST {DETECT} HTTP/1.1\r\nHost: {a}\r\nConnection: close\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    .unwrap();
    for _ in 0..3 {
        let _ = write!(s, "800\r\n{}\r\n", "y".repeat(0x800));
    }
    let _ = write!(s, "0\r\n\r\n");
    let r = response(s);
    assert_eq!(r.0, 413);
    // Under the limit, the same endpoint still answers.
    let r = http(a, "POST", DETECT, &[], b"not an image");
    expect_error(&r, 400, &["PNG"]);
}

/// An image over `max_image_pixels` (read from its header, before decoding) is a 413 naming it.
#[test]
fn images_over_max_image_pixels_are_refused() {
    let server = Server::model_server(&["--max-image-pixels", "10000"]);
    let r = http(&server.addr, "POST", DETECT, &[], &png_of(3, 200, 100));
    expect_error(&r, 413, &["200×100", "10000", "max_image_pixels"]);
    let r = http(&server.addr, "POST", DETECT, &[], &png_of(3, 100, 100));
    assert_eq!(r.0, 200, "{}", String::from_utf8_lossy(&r.2));
}

/// More images in one request than `max_batch_size`: a 400 naming it, before any tensor data
/// is read.
#[test]
fn batches_over_max_batch_size_are_refused() {
    let server = Server::model_server(&["--max-batch-size", "2"]);
    let body =
        r#"{"inputs":[{"name":"images","shape":[3,3,320,320],"datatype":"FP32","data":[]}]}"#;
    let r = http(
        &server.addr,
        "POST",
        "/v2/models/gelan-t-shapes/infer",
        &[],
        body.as_bytes(),
    );
    expect_error(
        &r,
        400,
        &["3 images", "max_batch_size 2", "--max-batch-size"],
    );
}

/// A body that arrives too slowly is cut off after `request_timeout_s` (408) and does not hold
/// its `max_concurrency` slot longer: meanwhile another request gets 503 naming that limit.
#[test]
fn slow_bodies_time_out_and_concurrency_is_bounded() {
    let server = Server::model_server(&["--max-concurrency", "1", "--request-timeout-s", "1"]);
    let a = server.addr.clone();
    let started = Instant::now();
    let mut slow = TcpStream::connect(&a).unwrap();
    write!(
        slow,
        "POST {DETECT} HTTP/1.1\r\nHost: {a}\r\nConnection: close\r\nContent-Length: 100000\r\n\r\nonly the start"
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let r = http(&a, "GET", "/v2/health/live", &[], b"");
    expect_error(&r, 503, &["max_concurrency 1", "--max-concurrency"]);
    assert!(r.1.iter().any(|(k, _)| k == "retry-after"), "{:?}", r.1);
    let r = response(slow);
    expect_error(&r, 408, &["request_timeout_s", "--request-timeout-s"]);
    let waited = started.elapsed();
    assert!(
        (Duration::from_millis(900)..Duration::from_secs(10)).contains(&waited),
        "{waited:?}"
    );
    // The slot is free again.
    assert_eq!(http(&a, "GET", "/v2/health/live", &[], b"").0, 200);
}

/// Connections are bounded in number (`max_connections`) and in how long they may take to send
/// their headers (`header_read_timeout_s`): a client that sends its headers a byte at a time
/// (slowloris) or sends nothing is cut off after the timeout, and a connection over the limit
/// waits for a free slot instead of starving the others.
#[test]
fn connections_and_header_reads_are_bounded() {
    let server = Server::model_server(&["--max-connections", "2", "--header-read-timeout-s", "1"]);
    let a = server.addr.clone();
    let started = Instant::now();
    // Slot 1: headers one byte every 100 ms, never finished in time.
    let slowloris = {
        let a = a.clone();
        std::thread::spawn(move || {
            let mut s = TcpStream::connect(&a).unwrap();
            let request = format!("GET /v2/health/live HTTP/1.1\r\nHost: {a}\r\nX-Pad: ");
            let mut sent = 0usize;
            for byte in request.bytes().chain(std::iter::repeat(b'x')) {
                if s.write_all(&[byte]).is_err() || started.elapsed() > Duration::from_secs(20) {
                    break;
                }
                sent += 1;
                std::thread::sleep(Duration::from_millis(100));
            }
            (started.elapsed(), sent)
        })
    };
    // Slot 2: connects and sends nothing.
    let mut idle = TcpStream::connect(&a).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    // A third connection waits until one of them is closed, then is served.
    let third = {
        let a = a.clone();
        std::thread::spawn(move || {
            let r = http(&a, "GET", "/v2/health/live", &[], b"");
            (r.0, started.elapsed())
        })
    };
    idle.set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut buf = [0u8; 256];
    let closed = matches!(idle.read(&mut buf), Ok(0) | Err(_));
    let idle_closed_after = started.elapsed();
    assert!(closed, "the idle connection was answered: {:?}", &buf[..16]);
    assert!(
        (Duration::from_millis(900)..Duration::from_secs(5)).contains(&idle_closed_after),
        "idle connection closed after {idle_closed_after:?}"
    );
    let (slow_cut_after, sent) = slowloris.join().unwrap();
    assert!(
        slow_cut_after < Duration::from_secs(6) && sent < 60,
        "the slow client was cut after {slow_cut_after:?} ({sent} bytes)"
    );
    let (status, served_after) = third.join().unwrap();
    assert_eq!(status, 200);
    assert!(
        served_after >= Duration::from_millis(900),
        "the third connection was served at {served_after:?}, before a slot was free"
    );
    // The service still answers, and reports its open connections.
    let r = http(&a, "GET", "/metrics", &[], b"");
    assert_eq!(r.0, 200);
    let text = String::from_utf8_lossy(&r.2);
    assert!(text.contains("kestrel_open_connections"), "{text}");
}

/// A request not answered within `request_timeout_s` is a 504 naming it; requests over a full
/// queue get 503 naming `max_queue_size`, with Retry-After.
#[test]
fn timeouts_and_full_queues_are_named() {
    let png = png_of(5, 320, 240);
    // The batcher waits 1.5 s for a second image; the service gives up after 0.5 s.
    let server = Server::model_server(&[
        "--max-queue-delay-us",
        "1500000",
        "--request-timeout-s",
        "0.5",
    ]);
    let r = http(&server.addr, "POST", DETECT, &[], &png);
    expect_error(
        &r,
        504,
        &["0.500 s", "request_timeout_s", "--request-timeout-s"],
    );
    drop(server);

    let server = Server::model_server(&["--max-batch-size", "1", "--max-queue-size", "1"]);
    let threads: Vec<_> = (0..8)
        .map(|_| {
            let (a, png) = (server.addr.clone(), png.clone());
            std::thread::spawn(move || http(&a, "POST", DETECT, &[], &png))
        })
        .collect();
    let results: Vec<_> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    let full = results
        .iter()
        .find(|r| r.0 == 503)
        .expect("a request over the full queue");
    expect_error(full, 503, &["max_queue_size", "--max-queue-size"]);
    assert!(full.1.iter().any(|(k, _)| k == "retry-after"));
    assert!(results.iter().any(|r| r.0 == 200));
}

/// Model names in URLs are plain names: `..`, slashes (encoded or not), absolute paths and
/// overlong names never reach the file system, on the inference and the control endpoints.
#[test]
fn model_names_in_urls_cannot_name_paths() {
    let repo = temp_dir("urls");
    std::fs::create_dir_all(repo.join("real/1")).unwrap();
    std::fs::copy(model(), repo.join("real/1/model.onnx")).unwrap();
    // Something a path could reach: a model folder beside the repository.
    let outside = repo.with_extension("outside");
    std::fs::create_dir_all(outside.join("1")).unwrap();
    std::fs::copy(model(), outside.join("1/model.onnx")).unwrap();
    let server = Server::start_on(
        "127.0.0.1:0",
        &["--repository", repo.to_str().unwrap()],
        Stdio::inherit(),
    );
    let a = &server.addr;
    let outside_name = outside.file_name().unwrap().to_str().unwrap().to_string();
    let long = "m".repeat(200);
    let names = [
        "..".to_string(),
        "%2e%2e".to_string(),
        "..%2F..%2Fetc".to_string(),
        format!("..%2F{outside_name}"),
        "%2Fetc%2Fpasswd".to_string(),
        "real%2F1".to_string(),
        ".hidden".to_string(),
        "a%00b".to_string(),
        "a%5Cb".to_string(),
        long,
    ];
    for name in &names {
        for (method, path) in [
            ("POST", format!("/v2/repository/models/{name}/load")),
            ("POST", format!("/v2/repository/models/{name}/unload")),
            ("GET", format!("/v2/models/{name}")),
            ("POST", format!("/v2/models/{name}/infer")),
            ("POST", format!("/v1/models/{name}/detect")),
        ] {
            let (s, _, b) = http(a, method, &path, &[], b"{}");
            assert!(
                matches!(s, 400 | 404),
                "{method} {path}: {s} {}",
                String::from_utf8_lossy(&b)
            );
        }
    }
    // Only the repository's own model is known, and it still serves.
    let (s, _, b) = http(a, "POST", "/v2/repository/index", &[], b"");
    assert_eq!(s, 200);
    let index = json(&b);
    let listed: Vec<&str> = index
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["name"].as_str().unwrap())
        .collect();
    assert_eq!(listed, ["real"], "{index}");
    let (s, _, _) = http(a, "GET", "/v2/models/real/ready", &[], b"");
    assert_eq!(s, 200);
    drop(server);
    std::fs::remove_dir_all(&repo).unwrap();
    std::fs::remove_dir_all(&outside).unwrap();
}

/// A repository entry that leads outside the repository (a symlinked model folder, model file or
/// labels file, a labels path with `..` or an absolute one) is refused with the reason, and the
/// repository's other models still load.
#[cfg(unix)]
#[test]
fn repository_entries_cannot_leave_the_repository() {
    use std::os::unix::fs::symlink;
    let repo = temp_dir("repo");
    let outside = temp_dir("repo-outside");
    std::fs::create_dir_all(outside.join("m/1")).unwrap();
    std::fs::copy(model(), outside.join("m/1/model.onnx")).unwrap();
    let labels = std::fs::read_to_string(model().with_extension("labels.txt")).unwrap();
    std::fs::write(outside.join("labels.txt"), &labels).unwrap();

    let folder = |name: &str| {
        let d = repo.join(name);
        std::fs::create_dir_all(d.join("1")).unwrap();
        d
    };
    // A good model, with a labels file and a symlinked version folder inside the repository.
    let good = folder("good");
    std::fs::copy(model(), good.join("1/model.onnx")).unwrap();
    std::fs::write(good.join("labels.txt"), &labels).unwrap();
    std::fs::write(good.join("config.json"), r#"{"labels": "labels.txt"}"#).unwrap();
    symlink(good.join("1"), good.join("2")).unwrap();
    // A model folder that is a symlink to a folder outside.
    symlink(outside.join("m"), repo.join("linked_folder")).unwrap();
    // A model file that is a symlink to a file outside.
    let f = folder("linked_file");
    symlink(outside.join("m/1/model.onnx"), f.join("1/model.onnx")).unwrap();
    // Labels: a symlink out, `..`, an absolute path.
    let l = folder("linked_labels");
    std::fs::copy(model(), l.join("1/model.onnx")).unwrap();
    symlink(outside.join("labels.txt"), l.join("labels.txt")).unwrap();
    std::fs::write(l.join("config.json"), r#"{"labels": "labels.txt"}"#).unwrap();
    let d = folder("dotdot_labels");
    std::fs::copy(model(), d.join("1/model.onnx")).unwrap();
    std::fs::write(
        d.join("config.json"),
        r#"{"labels": "../../repo-outside/labels.txt"}"#,
    )
    .unwrap();
    let abs = folder("absolute_labels");
    std::fs::copy(model(), abs.join("1/model.onnx")).unwrap();
    let config = serde_json::json!({ "labels": outside.join("labels.txt") }).to_string();
    std::fs::write(abs.join("config.json"), config).unwrap();

    let server = Server::start_on(
        "127.0.0.1:0",
        &["--repository", repo.to_str().unwrap()],
        Stdio::inherit(),
    );
    let a = &server.addr;
    let (s, _, b) = http(a, "POST", "/v2/repository/index", &[], b"");
    assert_eq!(s, 200);
    let index = json(&b);
    let state = |name: &str| {
        index
            .as_array()
            .unwrap()
            .iter()
            .filter(|m| m["name"] == name)
            .map(|m| {
                (
                    m["state"].as_str().unwrap().to_string(),
                    m["reason"].as_str().unwrap().to_string(),
                )
            })
            .collect::<Vec<_>>()
    };
    assert_eq!(
        state("good"),
        [
            ("READY".into(), String::new()),
            ("READY".into(), String::new())
        ],
        "{index}"
    );
    for (name, why) in [
        ("linked_folder", "outside the model repository"),
        ("linked_file", "outside the model repository"),
        ("linked_labels", "outside the model repository"),
        ("dotdot_labels", "'..' leaves the model's folder"),
        ("absolute_labels", "an absolute path"),
    ] {
        let got = state(name);
        assert_eq!(got.len(), 1, "{name}: {index}");
        assert_eq!(got[0].0, "UNAVAILABLE", "{name}: {index}");
        assert!(got[0].1.contains(why), "{name}: {:?}", got[0].1);
        // A load through the API gives the same reason.
        let r = http(
            a,
            "POST",
            &format!("/v2/repository/models/{name}/load"),
            &[],
            b"",
        );
        expect_error(&r, 400, &[why]);
    }
    drop(server);
    std::fs::remove_dir_all(&repo).unwrap();
    std::fs::remove_dir_all(&outside).unwrap();
}

/// An address of this machine that is not loopback, if it has one (no packet is sent: a UDP
/// socket's connect only picks the route).
fn non_loopback_ip() -> Option<std::net::IpAddr> {
    let s = UdpSocket::bind("0.0.0.0:0").ok()?;
    s.connect("192.0.2.1:9").ok()?;
    let ip = s.local_addr().ok()?.ip();
    (!ip.is_loopback() && !ip.is_unspecified()).then_some(ip)
}

/// Without a control token the repository endpoints answer this host only (403 from elsewhere,
/// naming the setting); with one, they need it (401 without), from anywhere. The inference
/// endpoints need neither.
#[test]
fn control_endpoints_need_a_token_or_this_host() {
    let m = model();
    let m = m.to_str().unwrap();
    let server = Server::start_on("0.0.0.0:0", &["--model", m], Stdio::inherit());
    let port: u16 = server.addr.rsplit(':').next().unwrap().parse().unwrap();
    let local = format!("127.0.0.1:{port}");
    let (s, _, _) = http(&local, "POST", "/v2/repository/index", &[], b"");
    assert_eq!(s, 200, "no token: this host may use the control endpoints");
    match non_loopback_ip() {
        Some(ip) => {
            let remote = SocketAddr::new(ip, port).to_string();
            for path in [
                "/v2/repository/index",
                "/v2/repository/models/gelan-t-shapes/unload",
                "/v2/repository/models/gelan-t-shapes/load",
            ] {
                let r = http(&remote, "POST", path, &[], b"");
                expect_error(&r, 403, &["this host only", "control_token_file"]);
            }
            // Inference is open, and the model is still loaded.
            assert_eq!(
                http(&remote, "GET", "/v2/models/gelan-t-shapes/ready", &[], b"").0,
                200
            );
        }
        None => eprintln!("no non-loopback address on this machine: the 403 case is not run"),
    }
    drop(server);

    let server = Server::model_server(&["--control-token", "tok-123"]);
    let a = &server.addr;
    for auth in [
        None,
        Some("Bearer wrong"),
        Some("Bearer tok-1234"),
        Some("tok-123"),
    ] {
        let headers: Vec<(&str, &str)> = auth.iter().map(|v| ("Authorization", *v)).collect();
        let r = http(a, "POST", "/v2/repository/index", &headers, b"");
        expect_error(&r, 401, &["Authorization: Bearer", "control_token_file"]);
        assert!(!String::from_utf8_lossy(&r.2).contains("tok-123"));
    }
    let r = http(
        a,
        "POST",
        "/v2/repository/index",
        &[("Authorization", "Bearer tok-123")],
        b"",
    );
    assert_eq!(r.0, 200);
}

/// The control token reaches neither the service's log lines (text or JSON, including failed
/// loads and refused requests) nor any response.
#[test]
fn the_control_token_stays_out_of_logs_and_responses() {
    let dir = temp_dir("token");
    let secret = "s3cret-token-5f1d9a";
    std::fs::write(dir.join("token"), format!("{secret}\n")).unwrap();
    std::fs::create_dir_all(dir.join("repo/broken/1")).unwrap();
    std::fs::write(dir.join("repo/broken/1/model.onnx"), b"not onnx").unwrap();
    let m = model();
    for format in ["text", "json"] {
        let log = dir.join(format!("stderr-{format}.log"));
        let mut server = Server::start_on(
            "127.0.0.1:0",
            &[
                "--model",
                m.to_str().unwrap(),
                "--repository",
                dir.join("repo").to_str().unwrap(),
                "--control-token-file",
                dir.join("token").to_str().unwrap(),
                "--log-format",
                format,
            ],
            Stdio::from(File::create(&log).unwrap()),
        );
        let a = server.addr.clone();
        let mut bodies = Vec::new();
        let bearer = format!("Bearer {secret}");
        let wrong = format!("Bearer {secret}x");
        for (path, auth) in [
            ("/v2/repository/index", Some(bearer.as_str())),
            ("/v2/repository/models/broken/load", Some(bearer.as_str())),
            (
                "/v2/repository/models/gelan-t-shapes/load",
                Some(wrong.as_str()),
            ),
            ("/v2/repository/index", None),
            ("/v2/models/broken/infer", Some(bearer.as_str())),
        ] {
            let headers: Vec<(&str, &str)> = auth.iter().map(|v| ("Authorization", *v)).collect();
            bodies.push(http(&a, "POST", path, &headers, b"{}").2);
        }
        let (_, _, metrics) = http(&a, "GET", "/metrics", &[], b"");
        bodies.push(metrics);
        server.terminate();
        let logged = std::fs::read_to_string(&log).unwrap();
        assert!(
            logged.contains("broken"),
            "the log has the failed load: {logged}"
        );
        assert!(
            !logged.contains(secret),
            "the token is in the log: {logged}"
        );
        for b in bodies {
            assert!(!String::from_utf8_lossy(&b).contains(secret));
        }
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
