//! `kestrel serve`: the HTTP inference service. KServe v2 (Triton's HTTP protocol, with the binary
//! tensor data and model repository extensions), an image endpoint, a dynamic batcher per model,
//! Prometheus metrics, limits, and a graceful shutdown on SIGTERM / Ctrl-C.

mod batcher;
mod config;
mod connections;
mod kserve;
mod metrics;
mod repository;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use axum::Router;
use axum::body::Body;
use axum::extract::{ConnectInfo, DefaultBodyLimit, Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::sync::Semaphore;

use repository::{ModelConfig, Repository};

/// Flags without a value given fall back to the `--config` file, then to the default shown.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// A TOML file of these settings (keys: the flags' names with `_` for `-`, `models` for
    /// --model, `control_token_file`, `log_format`; see deploy/kestrel.toml). Flags given on the
    /// command line override the file.
    #[arg(long, value_name = "FILE.toml")]
    config: Option<PathBuf>,
    /// Model repository: one folder per model with numbered version folders (`1/model.onnx`)
    /// and an optional `config.json`.
    #[arg(long)]
    repository: Option<PathBuf>,
    /// A model file (ONNX or engine file) to serve under its file stem, as version 1
    /// (repeatable; with or without --repository).
    #[arg(long, short = 'm')]
    model: Vec<PathBuf>,
    /// Address to listen on (port 0: any free port; the address is printed) [default:
    /// 127.0.0.1:8000].
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Defaults for models without a config.json: backend (cpu, cuda) [default: cpu].
    #[arg(long)]
    backend: Option<String>,
    /// Precision: fp32, fp16, int8 or best [default: fp32].
    #[arg(long)]
    precision: Option<String>,
    /// Images per engine run, at most [default: 8].
    #[arg(long)]
    max_batch_size: Option<usize>,
    /// Microseconds the first request of a batch waits for more (0: batching off) [default:
    /// 2000].
    #[arg(long)]
    max_queue_delay_us: Option<u64>,
    /// Requests waiting per model, at most; more get 503 with Retry-After [default: 64].
    #[arg(long)]
    max_queue_size: Option<usize>,
    /// Batch sizes that run as soon as they are reached, without waiting out the delay
    /// (comma-separated; max-batch-size always is one).
    #[arg(long, value_delimiter = ',')]
    preferred_batch_sizes: Vec<usize>,
    /// Engines per model, each running its own batches (1–16) [default: 1].
    #[arg(long)]
    instance_count: Option<usize>,
    /// One engine per listed GPU, e.g. `0,1` (a GPU may repeat: `0,0,1`); replaces
    /// --instance-count. The config file's form is `instances = [{gpu = 0}, {gpu = 1}]`.
    #[arg(long, value_delimiter = ',')]
    gpus: Vec<usize>,
    /// Largest request body, bytes (more: 413) [default: 67108864].
    #[arg(long)]
    max_body_bytes: Option<usize>,
    /// Largest image, pixels (width × height, read from the header before decoding) [default:
    /// 50000000].
    #[arg(long)]
    max_image_pixels: Option<u64>,
    /// Seconds a request may take before it gets 504 [default: 30].
    #[arg(long)]
    request_timeout_s: Option<f64>,
    /// Requests served at once, at most (more: 503) [default: 256].
    #[arg(long)]
    max_concurrency: Option<usize>,
    /// TCP connections open at once, at most; more wait in the listen backlog until one closes
    /// [default: 1024].
    #[arg(long)]
    max_connections: Option<usize>,
    /// Seconds a client has to send a request's headers, and an idle keep-alive connection
    /// stays open; then the connection is closed [default: 10].
    #[arg(long)]
    header_read_timeout_s: Option<f64>,
    /// Bearer token the repository (control) endpoints require ($KESTREL_CONTROL_TOKEN). Without
    /// a token those endpoints answer requests from this host (loopback) only.
    #[arg(long)]
    control_token: Option<String>,
    /// A file holding that token (one line; read at start, so the token stays out of `ps`).
    #[arg(long, value_name = "FILE")]
    control_token_file: Option<PathBuf>,
    /// The service's own log lines on stderr: text, or one JSON object per line [default: text].
    #[arg(long, value_enum)]
    log_format: Option<config::LogFormat>,
}

/// What every handler shares.
pub struct AppState {
    repo: Repository,
    metrics: PrometheusHandle,
    max_image_pixels: u64,
    max_body_bytes: usize,
    request_timeout: Duration,
    control_token: Option<String>,
    max_concurrency: usize,
    concurrency: Semaphore,
}

/// An error response: `{"error": "..."}` with its status.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    message: String,
    retry_after: Option<u32>,
}

impl ApiError {
    fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
            retry_after: None,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut r = (
            self.status,
            axum::Json(serde_json::json!({ "error": self.message })),
        )
            .into_response();
        if let Some(s) = self.retry_after
            && let Ok(v) = axum::http::HeaderValue::from_str(&s.to_string())
        {
            r.headers_mut().insert(axum::http::header::RETRY_AFTER, v);
        }
        r
    }
}

impl From<repository::RepoError> for ApiError {
    fn from(e: repository::RepoError) -> Self {
        Self::new(
            StatusCode::from_u16(e.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            e.message,
        )
    }
}

/// glibc's allocator, tuned for a long-running server, where an environment variable does not
/// already set it:
/// - one arena (`MALLOC_ARENA_MAX`): glibc gives each thread that allocates its own arena (up to
///   8 per core), and memory freed in one is not reused by another;
/// - a fixed mmap threshold of 128 KiB (`MALLOC_MMAP_THRESHOLD_`): glibc raises the threshold
///   each time a large block is freed, so after a model reload the next model's buffers come
///   from the heap, which then fragments and never shrinks.
///
/// Measured with `kestrel soak serve` (a model unloaded and reloaded every 5 s, 2-core build
/// machine): glibc's defaults +74 MB in the 30 s after warm-up; one arena +40 MB over 30 minutes,
/// in steps; one arena and the fixed threshold +6.7 MB over 5 minutes at 20-30 MB lower
/// resident memory (docs/RELIABILITY.md has the 30-minute run).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
fn tune_malloc() {
    // SAFETY: mallopt only tunes the allocator; called before the server starts its threads.
    unsafe {
        if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
            libc::mallopt(libc::M_ARENA_MAX, 1);
        }
        if std::env::var_os("MALLOC_MMAP_THRESHOLD_").is_none() {
            libc::mallopt(libc::M_MMAP_THRESHOLD, 128 * 1024);
        }
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn tune_malloc() {}

pub fn run(args: Args) -> Result<()> {
    tune_malloc();
    let file = match &args.config {
        Some(p) => config::FileConfig::load(p)?,
        None => config::FileConfig::default(),
    };
    let token_env = std::env::var("KESTREL_CONTROL_TOKEN").ok();
    let a = config::Settings::merge(&args, file, token_env)?;
    let _ = LOG_FORMAT.set(a.log_format);
    if a.repository.is_none() && a.models.is_empty() {
        bail!(
            "nothing to serve: give --repository DIR and/or --model FILE (or `repository` / \
             `models` in the --config file)"
        );
    }
    if let Some(dir) = &a.repository
        && !dir.is_dir()
    {
        bail!("--repository {}: not a folder", dir.display());
    }
    for f in &a.models {
        crate::util::check_model_file(f)?;
        let stem = f.file_stem().map(|s| s.to_string_lossy().to_string());
        if !stem.as_deref().is_some_and(repository::valid_name) {
            bail!(
                "--model {}: the file name is the model's name in URLs and must be letters, \
                 digits, '-', '_' or '.'; rename the file",
                f.display()
            );
        }
    }
    let defaults = ModelConfig {
        backend: a.backend.clone(),
        precision: a.precision.clone(),
        max_batch_size: a.max_batch_size,
        max_queue_delay_us: a.max_queue_delay_us,
        max_queue_size: a.max_queue_size,
        preferred_batch_sizes: a.preferred_batch_sizes.clone(),
        instance_count: a.instance_count,
        instances: a.instances.clone(),
        ..ModelConfig::default()
    };
    // The rules a model's config.json follows hold for the command line's defaults too.
    defaults
        .validate()
        .map_err(|e| anyhow::anyhow!("{e} (the command line or the --config file)"))?;
    let metrics = metrics::install()?;
    let repo = Repository::new(a.repository.clone(), &a.models, defaults);
    for name in repo.names() {
        match repo.load(&name) {
            Ok(()) => log("info", &format!("loaded model {name}")),
            // The service still starts; the index says why, and a load can retry.
            Err(e) => log(
                "warning",
                &format!("model {name} not loaded: {}", e.message),
            ),
        }
    }
    let state = Arc::new(AppState {
        repo,
        metrics,
        max_image_pixels: a.max_image_pixels,
        max_body_bytes: a.max_body_bytes,
        max_concurrency: a.max_concurrency.max(1),
        request_timeout: Duration::from_secs_f64(a.request_timeout_s.max(0.001)),
        control_token: a.control_token.clone(),
        concurrency: Semaphore::new(a.max_concurrency.max(1)),
    });
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let limits = connections::ConnectionLimits {
        max_connections: a.max_connections,
        header_read_timeout: Duration::from_secs_f64(a.header_read_timeout_s),
    };
    runtime.block_on(serve(state, a.listen, a.max_body_bytes, limits))
}

static LOG_FORMAT: std::sync::OnceLock<config::LogFormat> = std::sync::OnceLock::new();

/// One of the service's own log lines on stderr, as text (`warning: …`) or as a JSON object
/// (`{"ts": seconds since the epoch, "level", "msg"}`), per `--log-format`.
fn log(level: &str, msg: &str) {
    match LOG_FORMAT.get().copied().unwrap_or_default() {
        config::LogFormat::Text if level == "info" => eprintln!("{msg}"),
        config::LogFormat::Text => eprintln!("{level}: {msg}"),
        config::LogFormat::Json => {
            let ts = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs_f64())
                .unwrap_or(0.0);
            eprintln!(
                "{}",
                serde_json::json!({ "ts": ts, "level": level, "msg": msg })
            );
        }
    }
}

async fn serve(
    state: Arc<AppState>,
    listen: SocketAddr,
    max_body: usize,
    limits: connections::ConnectionLimits,
) -> Result<()> {
    let app = router(Arc::clone(&state), max_body);
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("listening on {listen}"))?;
    let addr = listener.local_addr().context("reading the bound address")?;
    // Tests and scripts read this line to find the port.
    println!("listening on http://{addr}");
    let upkeep = {
        let state = Arc::clone(&state);
        tokio::spawn(async move {
            loop {
                // GPU memory while a GPU model is loaded (asking would open a CUDA context,
                // hundreds of MB, on a machine serving from the CPU).
                let s = Arc::clone(&state);
                let gpus = tokio::task::spawn_blocking(move || {
                    s.repo
                        .gpus_in_use()
                        .into_iter()
                        .filter_map(|g| {
                            kestrel_runtime::cuda::memory_info(g)
                                .ok()
                                .map(|m| (g.to_string(), m))
                        })
                        .collect::<Vec<_>>()
                })
                .await
                .unwrap_or_default();
                for (gpu, (used, total)) in gpus {
                    ::metrics::gauge!(metrics::GPU_MEMORY_USED, "gpu" => gpu.clone())
                        .set(used as f64);
                    ::metrics::gauge!(metrics::GPU_MEMORY_TOTAL, "gpu" => gpu).set(total as f64);
                }
                state.metrics.run_upkeep();
                tokio::time::sleep(Duration::from_secs(5)).await;
            }
        })
    };
    if state.control_token.is_none() && !listen.ip().is_loopback() {
        log(
            "warning",
            "no control token: the repository endpoints (load, unload, index) answer requests \
             from this host only; set control_token_file (or --control-token-file) to use them \
             from elsewhere",
        );
    }
    connections::serve(listener, app, limits, shutdown_signal()).await;
    upkeep.abort();
    // In-flight requests have completed; stop the batchers.
    let s = Arc::clone(&state);
    tokio::task::spawn_blocking(move || s.repo.unload_all())
        .await
        .context("stopping the models")?;
    log("info", "stopped");
    Ok(())
}

/// Resolves on SIGTERM or Ctrl-C: the server stops accepting and drains what is in flight.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
    log("info", "shutting down: draining requests in flight");
}

fn router(state: Arc<AppState>, max_body: usize) -> Router {
    let control = Router::new()
        .route("/v2/repository/index", post(kserve::repository_index))
        .route("/v2/repository/models/{model}/load", post(kserve::load))
        .route("/v2/repository/models/{model}/unload", post(kserve::unload))
        .route_layer(axum::middleware::from_fn_with_state(
            Arc::clone(&state),
            require_token,
        ));
    Router::new()
        .route("/v2/health/live", get(kserve::live))
        .route("/v2/health/ready", get(kserve::ready))
        .route("/v2", get(kserve::server_metadata))
        .route("/v2/models/{model}", get(kserve::model_metadata))
        .route(
            "/v2/models/{model}/versions/{version}",
            get(kserve::model_metadata_version),
        )
        .route("/v2/models/{model}/ready", get(kserve::model_ready))
        .route(
            "/v2/models/{model}/versions/{version}/ready",
            get(kserve::model_ready_version),
        )
        .route("/v2/models/{model}/config", get(kserve::model_config))
        .route("/v2/models/{model}/infer", post(kserve::infer))
        .route(
            "/v2/models/{model}/versions/{version}/infer",
            post(kserve::infer_version),
        )
        .route("/v1/models/{model}/detect", post(kserve::detect))
        .route("/metrics", get(prometheus))
        .merge(control)
        .layer(axum::middleware::from_fn_with_state(
            Arc::clone(&state),
            limit_concurrency,
        ))
        .layer(DefaultBodyLimit::max(max_body))
        .with_state(state)
}

async fn prometheus(State(state): State<Arc<AppState>>) -> impl IntoResponse {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        state.metrics.render(),
    )
}

/// At most `--max-concurrency` requests at once (more: 503 right away); the in-flight gauge. The
/// body is read here, within `--request-timeout-s` and `--max-body-bytes`, so that a slow or
/// oversized upload cannot hold a slot: 408 and 413 name the limit and how to raise it.
async fn limit_concurrency(
    State(state): State<Arc<AppState>>,
    request: Request,
    next: Next,
) -> Response {
    let Ok(_permit) = state.concurrency.try_acquire() else {
        let mut e = ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "too many requests at once (max_concurrency {}): retry shortly, or raise \
                 --max-concurrency / max_concurrency in the --config file",
                state.max_concurrency
            ),
        );
        e.retry_after = Some(1);
        return e.into_response();
    };
    let gauge = ::metrics::gauge!(metrics::IN_FLIGHT);
    gauge.increment(1.0);
    let response = match read_body(&state, request).await {
        Ok(request) => next.run(request).await,
        Err(e) => e.into_response(),
    };
    gauge.decrement(1.0);
    response
}

/// The request with its body read into memory: at most `max_body_bytes` (413), within
/// `request_timeout` (408).
async fn read_body(state: &AppState, request: Request) -> Result<Request, ApiError> {
    use futures_util::StreamExt;
    let max = state.max_body_bytes;
    let too_large = || {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "the request body exceeds max_body_bytes ({max} bytes): send a smaller body, or \
                 raise --max-body-bytes / max_body_bytes in the --config file"
            ),
        )
    };
    let declared = request
        .headers()
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > max as u64) {
        return Err(too_large());
    }
    let (parts, body) = request.into_parts();
    let timeout = state.request_timeout;
    let read = async {
        let mut stream = body.into_data_stream();
        let mut bytes = Vec::with_capacity(declared.map_or(0, |n| n as usize));
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| {
                ApiError::new(
                    StatusCode::BAD_REQUEST,
                    format!("reading the request body: {e}"),
                )
            })?;
            if bytes.len() + chunk.len() > max {
                return Err(too_large());
            }
            bytes.extend_from_slice(&chunk);
        }
        Ok(bytes)
    };
    let bytes = tokio::time::timeout(timeout, read).await.map_err(|_| {
        ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            format!(
                "the request body did not arrive within request_timeout_s ({:.3} s): send it \
                 faster, or raise --request-timeout-s / request_timeout_s in the --config file",
                timeout.as_secs_f64()
            ),
        )
    })??;
    Ok(Request::from_parts(parts, Body::from(bytes)))
}

/// Whether a request may use the repository (control) endpoints: with a token set, it must
/// carry `Authorization: Bearer <token>` (401 otherwise); without one, it must come from this
/// host (403 otherwise), so that a service listening on 0.0.0.0 is not open to load and unload.
fn control_access(
    token: Option<&str>,
    peer: Option<SocketAddr>,
    authorization: Option<&str>,
) -> Result<(), ApiError> {
    match token {
        Some(token) => {
            let given = authorization.and_then(|v| {
                v.strip_prefix("Bearer ")
                    .or_else(|| v.strip_prefix("bearer "))
            });
            if given.is_some_and(|g| same_secret(g.trim().as_bytes(), token.as_bytes())) {
                Ok(())
            } else {
                Err(ApiError::new(
                    StatusCode::UNAUTHORIZED,
                    "the repository endpoints need `Authorization: Bearer <token>`, the token of \
                     control_token_file / --control-token-file / --control-token / \
                     $KESTREL_CONTROL_TOKEN",
                ))
            }
        }
        None if peer.is_some_and(|p| p.ip().to_canonical().is_loopback()) => Ok(()),
        None => Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "the repository endpoints answer requests from this host only while no control token \
             is set: set control_token_file in the --config file (or --control-token-file, \
             $KESTREL_CONTROL_TOKEN) and send `Authorization: Bearer <token>`",
        )),
    }
}

/// Compare a given token with the secret in time that depends on their lengths only.
fn same_secret(given: &[u8], secret: &[u8]) -> bool {
    given.len() == secret.len()
        && given
            .iter()
            .zip(secret)
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
}

/// The repository endpoints: see [`control_access`].
async fn require_token(
    State(state): State<Arc<AppState>>,
    request: Request,
    next: Next,
) -> Response {
    let peer = request
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0);
    let authorization = request
        .headers()
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    match control_access(state.control_token.as_deref(), peer, authorization) {
        Ok(()) => next.run(request).await,
        Err(e) => e.into_response(),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn control_endpoints_need_the_token_or_this_host() {
        let local: SocketAddr = "127.0.0.1:5000".parse().unwrap();
        let mapped: SocketAddr = "[::ffff:127.0.0.1]:5000".parse().unwrap();
        let remote: SocketAddr = "192.0.2.7:5000".parse().unwrap();
        // No token: this host only.
        assert!(control_access(None, Some(local), None).is_ok());
        assert!(control_access(None, Some(mapped), None).is_ok());
        let e = control_access(None, Some(remote), None).unwrap_err();
        assert_eq!(e.status, StatusCode::FORBIDDEN);
        assert!(e.message.contains("control_token_file"), "{}", e.message);
        assert!(control_access(None, None, None).is_err());
        // A token: from anywhere, with the token; never without it, not even from this host.
        let t = Some("s3cret");
        assert!(control_access(t, Some(remote), Some("Bearer s3cret")).is_ok());
        for wrong in [
            None,
            Some("Bearer s3cre"),
            Some("Bearer s3cret2"),
            Some("s3cret"),
        ] {
            let e = control_access(t, Some(local), wrong).unwrap_err();
            assert_eq!(e.status, StatusCode::UNAUTHORIZED);
            assert!(!e.message.contains("s3cret"), "{}", e.message);
        }
    }
}
