//! `kestrel soak serve`: `kestrel serve` (this binary) on loopback with a two-model repository,
//! under a mix of valid and invalid requests from several clients, while one model is unloaded
//! and loaded again every few seconds. The server's resident memory is sampled; every answer is
//! checked against the statuses its request may get.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde::Serialize;

use super::{Common, Sampler, finish};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The model both repository entries serve (an ONNX file).
    #[arg(long, short = 'm', default_value = "models/gelan-t-shapes.onnx")]
    model: PathBuf,
    #[command(flatten)]
    common: Common,
    /// Stop after this many requests (the run also stops at --seconds).
    #[arg(long)]
    requests: Option<u64>,
    /// Clients sending requests at once.
    #[arg(long, default_value_t = 3)]
    clients: usize,
    /// Seconds between unloading and loading the second model again.
    #[arg(long, default_value_t = 5.0)]
    churn_s: f64,
}

/// Requests of one kind: how many, and the answers.
#[derive(Debug, Default, Clone, Serialize)]
struct Tally {
    sent: u64,
    /// Answered with a status this request may get (an error for the invalid ones).
    expected: u64,
    /// Statuses seen, by code.
    statuses: BTreeMap<u16, u64>,
}

#[derive(Debug, Default, Serialize)]
struct Counts {
    requests: u64,
    unexpected: u64,
    by_kind: BTreeMap<&'static str, Tally>,
}

/// One request of the mix.
struct Request {
    kind: &'static str,
    method: &'static str,
    path: String,
    headers: Vec<(&'static str, String)>,
    body: Vec<u8>,
    /// Statuses that are a correct answer.
    expect: &'static [u16],
}

/// The primary model is always loaded; the churned one is unloaded and loaded during the run.
const PRIMARY: &str = "primary";
const CHURNED: &str = "churned";

pub fn run(a: Args) -> Result<()> {
    a.common.check()?;
    crate::util::check_model_file(&a.model)?;
    if a.clients == 0 || a.churn_s.is_nan() || a.churn_s <= 0.0 {
        bail!("--clients must be at least 1 and --churn-s above 0");
    }
    let repository = a.common.out.join("repository");
    let _ = std::fs::remove_dir_all(&repository);
    for name in [PRIMARY, CHURNED] {
        let dir = repository.join(name).join("1");
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        std::fs::copy(&a.model, dir.join("model.onnx"))
            .with_context(|| format!("copying {} into the repository", a.model.display()))?;
    }
    let log_path = a.common.out.join("serve.log");
    let mut server = Server::start(&repository, &log_path)?;
    let addr = server.addr.clone();
    let (h, w) = input_hw(&addr)?;
    let mix = request_mix(h, w)?;

    let sampler = Sampler::start(
        server.child.id(),
        Duration::from_millis(a.common.sample_ms),
        None,
    );
    let start = Instant::now();
    let limit = Duration::from_secs(a.common.seconds);
    let stop = Arc::new(AtomicBool::new(false));
    let counts = Arc::new(Mutex::new(Counts::default()));
    let failures = Arc::new(Mutex::new(Vec::<String>::new()));
    let mix = Arc::new(mix);
    let progress = crate::util::progress(a.common.seconds, "seconds");
    std::thread::scope(|scope| {
        for client in 0..a.clients {
            let (stop, counts, failures, mix, addr) = (&stop, &counts, &failures, &mix, &addr);
            scope.spawn(move || {
                // Each client starts at another place in the mix.
                let mut k = client * 3;
                while !stop.load(Ordering::Relaxed) {
                    let r = &mix[k % mix.len()];
                    k += 1;
                    let answer = http(addr, r.method, &r.path, &r.headers, &r.body);
                    let mut c = counts.lock().unwrap_or_else(|p| p.into_inner());
                    c.requests += 1;
                    let tally = c.by_kind.entry(r.kind).or_default();
                    tally.sent += 1;
                    match answer {
                        Ok((status, _)) if r.expect.contains(&status) => {
                            tally.expected += 1;
                            *tally.statuses.entry(status).or_default() += 1;
                        }
                        Ok((status, body)) => {
                            *tally.statuses.entry(status).or_default() += 1;
                            c.unexpected += 1;
                            note(
                                failures,
                                format!(
                                    "{}: status {status} (expected {:?}): {}",
                                    r.kind,
                                    r.expect,
                                    String::from_utf8_lossy(&body[..body.len().min(300)])
                                ),
                            );
                        }
                        Err(e) => {
                            c.unexpected += 1;
                            note(failures, format!("{}: {e:#}", r.kind));
                        }
                    }
                    if a.requests.is_some_and(|n| c.requests >= n) {
                        stop.store(true, Ordering::Relaxed);
                    }
                }
            });
        }
        // Model churn: unload, wait, load, wait.
        let (stop_ref, failures_ref, counts_ref) = (&stop, &failures, &counts);
        let addr_ref = &addr;
        scope.spawn(move || {
            let half = Duration::from_secs_f64(a.churn_s / 2.0);
            let mut loaded = true;
            while !stop_ref.load(Ordering::Relaxed) {
                let until = Instant::now() + half;
                while !stop_ref.load(Ordering::Relaxed) && Instant::now() < until {
                    std::thread::sleep(Duration::from_millis(20));
                }
                if stop_ref.load(Ordering::Relaxed) {
                    break;
                }
                let action = if loaded { "unload" } else { "load" };
                let path = format!("/v2/repository/models/{CHURNED}/{action}");
                let kind = if loaded {
                    "control unload"
                } else {
                    "control load"
                };
                let answer = http(addr_ref, "POST", &path, &[], b"");
                let mut c = counts_ref.lock().unwrap_or_else(|p| p.into_inner());
                let tally = c.by_kind.entry(kind).or_default();
                tally.sent += 1;
                match answer {
                    Ok((200, _)) => {
                        tally.expected += 1;
                        *tally.statuses.entry(200).or_default() += 1;
                        loaded = !loaded;
                    }
                    Ok((status, body)) => {
                        *tally.statuses.entry(status).or_default() += 1;
                        c.unexpected += 1;
                        note(
                            failures_ref,
                            format!(
                                "{kind}: status {status}: {}",
                                String::from_utf8_lossy(&body[..body.len().min(300)])
                            ),
                        );
                    }
                    Err(e) => {
                        c.unexpected += 1;
                        note(failures_ref, format!("{kind}: {e:#}"));
                    }
                }
            }
        });
        while !stop.load(Ordering::Relaxed) && start.elapsed() < limit {
            if server.child.try_wait().ok().flatten().is_some() {
                note(
                    &failures,
                    format!(
                        "the server exited during the run (see {})",
                        log_path.display()
                    ),
                );
                break;
            }
            progress.set_position(start.elapsed().as_secs());
            std::thread::sleep(Duration::from_millis(200));
        }
        stop.store(true, Ordering::Relaxed);
    });
    progress.finish_and_clear();
    let elapsed = start.elapsed();
    let samples = sampler.finish()?;
    let exit = server.terminate();
    // The repository holds copies of the model: scratch, not part of the record.
    let _ = std::fs::remove_dir_all(&repository);
    let mut failures = std::mem::take(&mut *failures.lock().unwrap_or_else(|p| p.into_inner()));
    match exit {
        Ok(status) if status.success() => {}
        Ok(status) => failures.push(format!("the server ended with {status} after SIGTERM")),
        Err(e) => failures.push(format!("stopping the server: {e:#}")),
    }
    let counts = std::mem::take(&mut *counts.lock().unwrap_or_else(|p| p.into_inner()));
    if counts.unexpected > 0 {
        failures.insert(
            0,
            format!(
                "{} of {} answers were not what their request may get (first ones below)",
                counts.unexpected, counts.requests
            ),
        );
    }
    finish(
        "serve",
        &a.common,
        "cpu backend (kestrel serve defaults)".into(),
        elapsed,
        counts,
        failures,
        samples,
    )
}

/// Keep the first few failures (a broken server would otherwise fill the report).
fn note(failures: &Mutex<Vec<String>>, message: String) {
    let mut f = failures.lock().unwrap_or_else(|p| p.into_inner());
    if f.len() < 20 {
        f.push(message);
    }
}

/// `kestrel serve` as a child process on a loopback port.
struct Server {
    child: Child,
    addr: String,
}

impl Server {
    fn start(repository: &Path, log: &Path) -> Result<Self> {
        let exe = std::env::current_exe().context("locating the kestrel binary")?;
        let log_file = std::fs::File::create(log)
            .with_context(|| format!("creating the server log {}", log.display()))?;
        let mut child = Command::new(exe)
            .args(["serve", "--listen", "127.0.0.1:0", "--repository"])
            .arg(repository)
            .stdout(Stdio::piped())
            .stderr(log_file)
            .spawn()
            .context("starting kestrel serve")?;
        let stdout = child.stdout.take().context("the server's stdout")?;
        let mut lines = BufReader::new(stdout);
        let mut first = String::new();
        lines
            .read_line(&mut first)
            .context("reading the server's first line")?;
        let Some(addr) = first.trim().strip_prefix("listening on http://") else {
            let _ = child.kill();
            bail!(
                "kestrel serve did not start (first line {first:?}); see {}",
                log.display()
            );
        };
        let addr = addr.to_string();
        // Keep draining stdout so the server never blocks on a full pipe.
        std::thread::spawn(move || {
            let mut sink = Vec::new();
            let _ = lines.read_to_end(&mut sink);
        });
        Ok(Self { child, addr })
    }

    /// SIGTERM, then wait up to 30 s (in-flight requests drain first).
    fn terminate(&mut self) -> Result<std::process::ExitStatus> {
        // The shell's own `kill` (procps may be missing on a minimal machine).
        let sent = Command::new("sh")
            .args(["-c", &format!("kill -TERM {}", self.child.id())])
            .status()
            .context("running kill")?;
        if !sent.success() {
            bail!("kill -TERM {} failed", self.child.id());
        }
        let until = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            if Instant::now() > until {
                let _ = self.child.kill();
                bail!("the server did not exit within 30 s of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// One HTTP/1.1 request on a new connection: (status, body).
fn http(
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(&str, String)],
    body: &[u8],
) -> Result<(u16, Vec<u8>)> {
    let mut s = TcpStream::connect(addr).with_context(|| format!("connecting to {addr}"))?;
    s.set_read_timeout(Some(Duration::from_secs(120)))?;
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    s.write_all(head.as_bytes())?;
    s.write_all(body)?;
    let mut answer = Vec::new();
    s.read_to_end(&mut answer)
        .with_context(|| format!("{method} {path}: reading the answer"))?;
    let text_end = answer
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .with_context(|| format!("{method} {path}: no HTTP header in the answer"))?;
    let status: u16 = std::str::from_utf8(&answer[..text_end])
        .ok()
        .and_then(|h| h.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .with_context(|| format!("{method} {path}: no status in the answer"))?;
    Ok((status, answer[text_end + 4..].to_vec()))
}

/// The primary model's input height and width, from its KServe metadata.
fn input_hw(addr: &str) -> Result<(usize, usize)> {
    let (status, body) = http(addr, "GET", &format!("/v2/models/{PRIMARY}"), &[], b"")?;
    if status != 200 {
        bail!(
            "model metadata: status {status}: {}",
            String::from_utf8_lossy(&body)
        );
    }
    let v: serde_json::Value = serde_json::from_slice(&body).context("model metadata JSON")?;
    let dim = |k: usize| v["inputs"][0]["shape"][k].as_u64().map(|d| d as usize);
    match (dim(2), dim(3)) {
        (Some(h), Some(w)) => Ok((h, w)),
        _ => bail!("model metadata without an input height and width: {v}"),
    }
}

fn png(seed: u64, w: u32, h: u32) -> Result<Vec<u8>> {
    let img = kestrel_runtime::synth::render_scene(seed, w, h).0;
    let mut bytes = Vec::new();
    image::DynamicImage::ImageRgb8(img)
        .write_to(
            &mut std::io::Cursor::new(&mut bytes),
            image::ImageFormat::Png,
        )
        .context("encoding a scene as PNG")?;
    Ok(bytes)
}

/// The requests each client cycles through: valid detections and tensors, and invalid requests
/// that must get their error.
fn request_mix(h: usize, w: usize) -> Result<Vec<Request>> {
    let detect = |model: &str| format!("/v1/models/{model}/detect");
    let infer = format!("/v2/models/{PRIMARY}/infer");
    // A binary KServe request: the JSON header, then the tensor's little-endian floats.
    let tensor: Vec<f32> = (0..3 * h * w).map(|i| (i % 251) as f32 / 251.0).collect();
    let header = serde_json::json!({
        "inputs": [{"name": "images", "shape": [1, 3, h, w], "datatype": "FP32",
                    "parameters": {"binary_data_size": tensor.len() * 4}}],
        "outputs": [{"name": "output0", "parameters": {"binary_data": true}}],
    })
    .to_string();
    let mut binary = header.clone().into_bytes();
    binary.extend(tensor.iter().flat_map(|v| v.to_le_bytes()));
    let wrong_shape = serde_json::json!({
        "inputs": [{"name": "images", "shape": [1, 3, 10, 10], "datatype": "FP32",
                    "data": vec![0.5f32; 300]}],
    })
    .to_string();
    let (w32, h32) = (w as u32, h as u32);
    Ok(vec![
        Request {
            kind: "detect (PNG)",
            method: "POST",
            path: detect(PRIMARY),
            headers: vec![],
            body: png(1, w32 * 3 / 2, h32)?,
            expect: &[200],
        },
        Request {
            kind: "infer (binary tensor)",
            method: "POST",
            path: infer.clone(),
            headers: vec![
                ("Content-Type", "application/octet-stream".into()),
                ("Inference-Header-Content-Length", header.len().to_string()),
            ],
            body: binary,
            expect: &[200],
        },
        Request {
            kind: "invalid: not JSON",
            method: "POST",
            path: infer.clone(),
            headers: vec![("Content-Type", "application/json".into())],
            body: b"{\"inputs\": [".to_vec(),
            expect: &[400],
        },
        Request {
            kind: "detect (PNG, another size)",
            method: "POST",
            path: detect(PRIMARY),
            headers: vec![],
            body: png(2, w32 / 2, h32 * 2)?,
            expect: &[200],
        },
        Request {
            kind: "invalid: not an image",
            method: "POST",
            path: detect(PRIMARY),
            headers: vec![],
            body: b"\x89PNG\r\n\x1a\nthis is not a PNG".to_vec(),
            expect: &[400],
        },
        Request {
            kind: "invalid: wrong tensor shape",
            method: "POST",
            path: infer,
            headers: vec![("Content-Type", "application/json".into())],
            body: wrong_shape.into_bytes(),
            expect: &[400],
        },
        Request {
            kind: "invalid: no such model",
            method: "POST",
            path: detect("no-such-model"),
            headers: vec![],
            body: png(3, 64, 64)?,
            expect: &[404],
        },
        // Loaded or not, depending on the churn: 200, or the model's absence.
        Request {
            kind: "detect on the churned model",
            method: "POST",
            path: detect(CHURNED),
            headers: vec![],
            body: png(4, w32, h32)?,
            expect: &[200, 404, 503],
        },
    ])
}
