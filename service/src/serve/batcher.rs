//! The dynamic batcher of one loaded model: requests from any connection queue on a bounded
//! channel; one thread per engine instance owns its engine and runs them as batches of up to
//! `max_batch_size` images, waiting at most `max_queue_delay` after the first request of a batch
//! for more. Each request gets its own rows of the output back, in the order of its images. With
//! several instances, one thread forms its batch while the others run theirs.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError, sync_channel};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kestrel_runtime::engine::Engine;
use tokio::sync::oneshot;

use super::metrics as m;

/// A request's rows of the model output, and how long it waited and ran.
#[derive(Debug)]
pub struct Reply {
    /// `output0` of the request's images, row-major (images × channels × anchors).
    pub output: Vec<f32>,
    /// Segmentation models: the request's images' prototypes (images × 32 × H/4 × W/4); empty
    /// for detectors.
    pub prototypes: Vec<f32>,
    /// Seconds from submission until its batch started.
    pub queued_s: f64,
    /// Seconds the batch's engine run took.
    pub inference_s: f64,
    /// Images in the batch the request ran in (its own and others').
    pub batch_images: usize,
}

/// Why a request was not queued.
#[derive(Debug, PartialEq, Eq)]
pub enum SubmitError {
    /// `max_queue_size` requests are waiting.
    QueueFull,
    /// The model is being unloaded.
    Stopped,
}

struct Job {
    input: Vec<f32>,
    images: usize,
    submitted: Instant,
    reply: oneshot::Sender<Result<Reply, String>>,
}

/// Settings of a batcher.
#[derive(Debug, Clone)]
pub struct BatcherConfig {
    /// Images per engine run, at most (the engine's profile maximum).
    pub max_batch_size: usize,
    /// How long the first request of a batch waits for more (0: run at once).
    pub max_queue_delay: Duration,
    /// Requests waiting, at most; more are refused (HTTP 503).
    pub max_queue_size: usize,
    /// Batch sizes (images) that run as soon as they are reached, without waiting out the
    /// delay for more (Triton's `preferred_batch_size`); `max_batch_size` always is one.
    pub preferred_batch_sizes: Vec<usize>,
}

/// One engine instance of a model and the GPU it runs on (0 for the cpu backend).
pub struct Instance {
    pub engine: Box<dyn Engine>,
    pub gpu: usize,
}

pub struct Batcher {
    /// The GPU of each instance, in instance order.
    gpus: Vec<usize>,
    sender: Mutex<Option<SyncSender<Job>>>,
    queued: Arc<AtomicUsize>,
    workers: Mutex<Vec<std::thread::JoinHandle<()>>>,
    per_image_in: usize,
    per_image_out: usize,
    config: BatcherConfig,
    /// `kestrel_queue_depth` of the model: raised here on submit, lowered by the workers.
    depth: metrics::Gauge,
}

impl Batcher {
    /// Start one batching thread per engine instance of `instances` (of one model, at least
    /// one), labelled `model` in the metrics. Every thread takes the next batch from the one
    /// queue as soon as its engine is free, so batches spread over the instances (and their
    /// GPUs) by how fast each finishes.
    pub fn start(instances: Vec<Instance>, config: BatcherConfig, model: String) -> Self {
        let (per_image_in, per_image_out) = instances.first().map_or((0, 0), |i| {
            (i.engine.info().input_len(), i.engine.info().output_len())
        });
        let gpus = instances.iter().map(|i| i.gpu).collect();
        let (sender, receiver) = sync_channel(config.max_queue_size.max(1));
        let receiver = Arc::new(Mutex::new(receiver));
        let queued = Arc::new(AtomicUsize::new(0));
        let workers = instances
            .into_iter()
            .enumerate()
            .filter_map(|(i, instance)| {
                let (receiver, queued) = (Arc::clone(&receiver), Arc::clone(&queued));
                let (config, model) = (config.clone(), model.clone());
                let batches = metrics::counter!(
                    m::INSTANCE_BATCHES,
                    "model" => model.clone(),
                    "instance" => i.to_string(),
                    "gpu" => instance.gpu.to_string()
                );
                std::thread::Builder::new()
                    .name(format!("batcher-{model}-{i}"))
                    .spawn(move || run(instance.engine, &receiver, config, queued, model, batches))
                    .ok()
            })
            .collect();
        Self {
            gpus,
            sender: Mutex::new(Some(sender)),
            queued,
            workers: Mutex::new(workers),
            per_image_in,
            per_image_out,
            config,
            depth: metrics::gauge!(m::QUEUE_DEPTH, "model" => model),
        }
    }

    /// The GPU of each engine instance, in instance order.
    pub fn gpus(&self) -> &[usize] {
        &self.gpus
    }

    /// Values of one image's input and output.
    pub fn per_image(&self) -> (usize, usize) {
        (self.per_image_in, self.per_image_out)
    }

    pub fn config(&self) -> &BatcherConfig {
        &self.config
    }

    /// Queue `images` images (`input`: that many rows of the engine input); the receiver gets
    /// their output rows.
    pub fn submit(
        &self,
        input: Vec<f32>,
        images: usize,
    ) -> Result<oneshot::Receiver<Result<Reply, String>>, SubmitError> {
        let (reply, receiver) = oneshot::channel();
        let job = Job {
            input,
            images,
            submitted: Instant::now(),
            reply,
        };
        let guard = self
            .sender
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let Some(sender) = guard.as_ref() else {
            return Err(SubmitError::Stopped);
        };
        // Counted before it is sent, so the worker never takes away more than was added.
        let depth = self.queued.fetch_add(1, Ordering::Relaxed) + 1;
        let sent = sender.try_send(job);
        if sent.is_err() {
            self.queued.fetch_sub(1, Ordering::Relaxed);
        } else {
            self.depth.set(depth as f64);
        }
        match sent {
            Ok(()) => Ok(receiver),
            Err(TrySendError::Full(_)) => Err(SubmitError::QueueFull),
            Err(TrySendError::Disconnected(_)) => Err(SubmitError::Stopped),
        }
    }

    /// Refuse new requests, finish the queued ones and stop the threads (waits for them).
    pub fn stop(&self) {
        self.sender
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        let workers = std::mem::take(
            &mut *self
                .workers
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        );
        for w in workers {
            let _ = w.join();
        }
    }
}

impl Drop for Batcher {
    fn drop(&mut self) {
        self.stop();
    }
}

fn run(
    mut engine: Box<dyn Engine>,
    receiver: &Mutex<Receiver<Job>>,
    config: BatcherConfig,
    queued: Arc<AtomicUsize>,
    model: String,
    batches: metrics::Counter,
) {
    let (per_in, per_out) = (engine.info().input_len(), engine.info().output_len());
    let per_protos = engine.info().prototypes.map_or(0, |p| p.len());
    let max = config.max_batch_size.max(1);
    let batch_size = metrics::histogram!(m::BATCH_SIZE, "model" => model.clone());
    let inference = metrics::histogram!(m::INFERENCE_SECONDS, "model" => model.clone());
    let depth = metrics::gauge!(m::QUEUE_DEPTH, "model" => model.clone());
    // Reused from batch to batch.
    let mut jobs: Vec<Job> = Vec::with_capacity(max);
    let mut input: Vec<f32> = Vec::with_capacity(max * per_in);
    let mut carried: Option<Job> = None;
    loop {
        // This instance forms its batch while holding the queue; the others run theirs meanwhile.
        let receiver = receiver
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        // A job that did not fit the previous batch starts this one.
        let first = match carried.take() {
            Some(j) => j,
            None => match receiver.recv() {
                Ok(j) => j,
                // Every sender is gone (unload) and the queue is empty.
                Err(_) => return,
            },
        };
        let deadline = first.submitted + config.max_queue_delay;
        let mut images = first.images;
        jobs.push(first);
        while images < max && !config.preferred_batch_sizes.contains(&images) {
            // Requests already waiting join at once; then wait for more until the deadline.
            let now = Instant::now();
            let next = match receiver.try_recv() {
                Ok(j) => Ok(j),
                Err(_) if now >= deadline => break,
                Err(_) => receiver.recv_timeout(deadline - now),
            };
            match next {
                Ok(j) if images + j.images > max => {
                    carried = Some(j);
                    break;
                }
                Ok(j) => {
                    images += j.images;
                    jobs.push(j);
                }
                Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => break,
            }
        }
        drop(receiver);
        let left = queued
            .fetch_sub(jobs.len(), Ordering::Relaxed)
            .saturating_sub(jobs.len());
        depth.set(left as f64);
        // A request whose client has gone (its timeout passed while it waited, or the
        // connection closed) is not run: under overload, computing answers nobody waits for
        // would delay the live requests behind them. The others of the batch run as formed.
        jobs.retain(|j| !j.reply.is_closed());
        if jobs.is_empty() {
            continue;
        }
        let images: usize = jobs.iter().map(|j| j.images).sum();
        input.clear();
        for j in &jobs {
            input.extend_from_slice(&j.input);
        }
        let started = Instant::now();
        let result = engine.run_with_prototypes(&input, images);
        let inference_s = started.elapsed().as_secs_f64();
        batch_size.record(images as f64);
        inference.record(inference_s);
        batches.increment(1);
        let mut row = 0;
        for j in jobs.drain(..) {
            let reply = match &result {
                Ok((out, protos)) => Ok(Reply {
                    output: out[row * per_out..(row + j.images) * per_out].to_vec(),
                    prototypes: protos
                        .map(|p| p[row * per_protos..(row + j.images) * per_protos].to_vec())
                        .unwrap_or_default(),
                    queued_s: (started - j.submitted).as_secs_f64(),
                    inference_s,
                    batch_images: images,
                }),
                Err(e) => Err(e.to_string()),
            };
            row += j.images;
            // The client may have gone (timeout): nothing to do then.
            let _ = j.reply.send(reply);
        }
    }
}
