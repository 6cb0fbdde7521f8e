//! The accept loop: HTTP/1 connections with a bound on how many are open at once and on how long
//! a client may take to send a request's headers.
//!
//! `axum::serve` gives hyper no timer, so hyper's header-read timeout never fires there and a
//! client that sends its headers a byte at a time (slowloris) holds its connection, and the task
//! and buffers behind it, for as long as it likes; nor does it bound the connections. This loop is
//! axum's own `serve` with those two limits added (hyper's HTTP/1 builder with a tokio timer, and a
//! semaphore around accept), following axum's `serve-with-hyper` example.

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::extract::ConnectInfo;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tower::ServiceExt;

use super::log;
use super::metrics as m;

/// Bounds on the service's TCP connections.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionLimits {
    /// Connections open at once, at most; the next ones wait in the listen backlog until one
    /// closes (`max_connections`).
    pub max_connections: usize,
    /// Time a client has from the first byte of a request to the end of its headers, and an idle
    /// keep-alive connection before it is closed (`header_read_timeout_s`).
    pub header_read_timeout: Duration,
}

/// Serve `app` on `listener` until `shutdown` resolves, then stop accepting, let the requests in
/// flight finish and close idle connections.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: ConnectionLimits,
    shutdown: impl Future<Output = ()>,
) {
    let slots = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let open = ::metrics::gauge!(m::OPEN_CONNECTIONS);
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout);
    let graceful = GracefulShutdown::new();
    // At most one warning a minute while the limit is reached.
    let mut warned_full: Option<Instant> = None;
    tokio::pin!(shutdown);
    loop {
        // A slot first: at the limit, connections wait in the kernel's backlog instead of being
        // accepted and then starved.
        let slot = if let Ok(slot) = Arc::clone(&slots).try_acquire_owned() {
            slot
        } else {
            if warned_full.is_none_or(|at| at.elapsed() > Duration::from_secs(60)) {
                warned_full = Some(Instant::now());
                log(
                    "warning",
                    &format!(
                        "{} connections open (max_connections): new connections wait until \
                         one closes; raise --max-connections / max_connections in the --config \
                         file if clients are legitimate",
                        limits.max_connections
                    ),
                );
            }
            tokio::select! {
                slot = Arc::clone(&slots).acquire_owned() => match slot {
                    Ok(slot) => slot,
                    Err(_) => break, // never closed
                },
                () = &mut shutdown => break,
            }
        };
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of file descriptors and the like: wait, then accept again.
                    log("warning", &format!("accepting a connection: {e}"));
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        let app = app.clone();
        // The peer's address reaches the handlers: the control endpoints check it.
        let service = hyper::service::service_fn(move |mut request: hyper::Request<Incoming>| {
            request.extensions_mut().insert(ConnectInfo(peer));
            let request = request.map(Body::new);
            let app = app.clone();
            async move {
                let response = app.oneshot(request).await;
                // The router's error type is Infallible.
                Ok::<_, Infallible>(response.unwrap_or_else(|e| match e {}))
            }
        });
        let connection = builder.serve_connection(TokioIo::new(stream), service);
        let connection = graceful.watch(connection);
        let open = open.clone();
        open.increment(1.0);
        tokio::spawn(async move {
            // A client that goes away or breaks the protocol ends only its own connection.
            let _ = connection.await;
            open.decrement(1.0);
            drop(slot);
        });
    }
    drop(listener);
    graceful.shutdown().await;
}
