//! Helpers shared by the `kestrel serve` tests (serve.rs, faults.rs, security.rs): a server on
//! loopback, a raw HTTP/1.1 client, test images and the CPU reference engine.
#![allow(dead_code, clippy::unwrap_used)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use kestrel_runtime::engine::{BatchProfile, BuildOptions, build_engine};
use kestrel_runtime::letterbox::Letterboxer;
use kestrel_runtime::synth::{image_seed, render_scene};

pub fn model() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/gelan-t-shapes.onnx")
}

/// A running `kestrel serve`, stopped (SIGTERM) when dropped.
pub struct Server {
    pub child: Child,
    pub addr: String,
}

impl Server {
    pub fn start(args: &[&str]) -> Self {
        Self::start_with_stderr(args, Stdio::inherit())
    }

    /// [`Server::start`] with the server's stderr (its log lines) sent to `stderr`.
    pub fn start_with_stderr(args: &[&str], stderr: Stdio) -> Self {
        Self::start_on("127.0.0.1:0", args, stderr)
    }

    /// `kestrel serve --listen LISTEN ARGS`, its stderr to `stderr`.
    pub fn start_on(listen: &str, args: &[&str], stderr: Stdio) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_kestrel"))
            .args(["serve", "--listen", listen])
            .args(args)
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let addr = line
            .trim()
            .strip_prefix("listening on http://")
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
            .to_string();
        Self { child, addr }
    }

    pub fn model_server(extra: &[&str]) -> Self {
        let m = model();
        let mut args = vec!["--model", m.to_str().unwrap()];
        args.extend_from_slice(extra);
        Self::start(&args)
    }

    pub fn terminate(&mut self) -> std::process::ExitStatus {
        // The shell's own `kill` (procps may be missing on a minimal machine).
        let _ = Command::new("sh")
            .args(["-c", &format!("kill -TERM {}", self.child.id())])
            .status();
        self.child.wait().unwrap()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            self.terminate();
        }
    }
}

/// One HTTP/1.1 request: (status, headers lower-cased, body).
pub fn http(
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> (u16, Vec<(String, String)>, Vec<u8>) {
    let mut s = TcpStream::connect(addr).unwrap();
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).unwrap();
    // The server may answer (413) before reading a large body.
    let _ = s.write_all(body);
    response(s)
}

/// Read one HTTP/1.1 response to its end: (status, headers lower-cased, body, de-chunked).
pub fn response(mut s: TcpStream) -> (u16, Vec<(String, String)>, Vec<u8>) {
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw);
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("no HTTP response: {:?}", String::from_utf8_lossy(&raw)));
    let head = String::from_utf8_lossy(&raw[..split]).to_string();
    let mut lines = head.lines();
    let status: u16 = lines
        .next()
        .unwrap()
        .split_whitespace()
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let mut body = raw[split + 4..].to_vec();
    if headers
        .iter()
        .any(|(k, v)| k == "transfer-encoding" && v.contains("chunked"))
    {
        body = dechunk(&body);
    }
    (status, headers, body)
}

pub fn dechunk(mut b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let Some(eol) = b.windows(2).position(|w| w == b"\r\n") else {
            return out;
        };
        let n = usize::from_str_radix(String::from_utf8_lossy(&b[..eol]).trim(), 16).unwrap_or(0);
        if n == 0 {
            return out;
        }
        out.extend_from_slice(&b[eol + 2..eol + 2 + n]);
        b = &b[eol + 4 + n..];
    }
}

/// `n` image requests to `model` at once, each on its own thread: (status, has Retry-After).
pub fn detect_concurrently(
    addr: &str,
    model: &str,
    png: &[u8],
    n: usize,
) -> Vec<std::thread::JoinHandle<(u16, bool)>> {
    (0..n)
        .map(|_| {
            let (a, png, path) = (
                addr.to_string(),
                png.to_vec(),
                format!("/v1/models/{model}/detect"),
            );
            std::thread::spawn(move || {
                let (s, h, _) = http(&a, "POST", &path, &[], &png);
                (s, h.iter().any(|(k, _)| k == "retry-after"))
            })
        })
        .collect()
}

pub fn json(body: &[u8]) -> serde_json::Value {
    serde_json::from_slice(body)
        .unwrap_or_else(|e| panic!("{e}: {:?}", String::from_utf8_lossy(body)))
}

/// A POST of `body` to `path` that must fail with `status` and an `{"error"}` naming `needle`.
pub fn post_expecting_error(addr: &str, path: &str, body: &[u8], status: u16, needle: &str) {
    let (s, _, b) = http(addr, "POST", path, &[], body);
    assert_eq!(s, status, "{}", String::from_utf8_lossy(&b));
    let e = json(&b);
    assert!(e["error"].as_str().unwrap().contains(needle), "{e}");
}

pub fn get(addr: &str, path: &str) -> (u16, serde_json::Value) {
    let (status, _, body) = http(addr, "GET", path, &[], b"");
    (status, json(&body))
}

pub fn png_of(seed: u64, w: u32, h: u32) -> (image::RgbImage, Vec<u8>) {
    let (img, _) = render_scene(image_seed(seed, 0), w, h);
    let mut bytes = Vec::new();
    image::DynamicImage::ImageRgb8(img.clone())
        .write_to(
            &mut std::io::Cursor::new(&mut bytes),
            image::ImageFormat::Png,
        )
        .unwrap();
    (img, bytes)
}

pub fn letterboxed(img: &image::RgbImage) -> Vec<f32> {
    let mut input = vec![0f32; 3 * 320 * 320];
    Letterboxer::new().run(img, 320, 320, &mut input).unwrap();
    input
}

/// The bundled model on the CPU backend, batches of one: the reference the service must match.
pub fn cpu_engine() -> Box<dyn kestrel_runtime::engine::Engine> {
    let options = BuildOptions {
        profile: BatchProfile {
            min: 1,
            opt: 1,
            max: 1,
        },
        ..Default::default()
    };
    build_engine(&model(), &options).unwrap()
}

/// The CPU engine's output0 for one letterboxed image.
pub fn reference_output(input: &[f32]) -> Vec<f32> {
    cpu_engine().run(input, 1).unwrap().to_vec()
}

pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// `samples` of `name{labels}` in Prometheus text.
pub fn sample(text: &str, prefix: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(prefix))
        .and_then(|v| v.trim().parse().ok())
}
