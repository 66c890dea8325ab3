//! Inference workers: one OS thread per configured device entry, each owning its own model
//! replica (a tch `Tensor` is `Send` but not `Sync`), fed batches over a channel.
//!
//! Dispatch goes to the least-loaded worker (fewest images queued or running). A worker
//! whose model fails or panics on a batch is rebuilt from its factory and the batch is
//! retried image by image, so one poison image fails alone and nothing is dropped: every
//! image of every batch comes back with detections or an error.
//!
//! A new model version is swapped in without downtime ([`WorkerPool::swap_model`]): every
//! worker's new replica is loaded and warmed beside the old one while the old one keeps
//! serving; then, under the dispatch gate, each worker is told to switch. Batches dispatched
//! before the switch finish on the old model, every later batch runs on the new one, and a
//! replica that fails to load aborts the swap with the old model still serving.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use image::RgbImage;
use tokio::sync::mpsc;

use crate::detection::{Detector, ImageDetections};
use crate::events::ModelRef;

/// Something that turns a batch of images into detections on one device.
///
/// The service uses [`DetectorBackend`]; tests and the pipeline benchmark plug in their own
/// (e.g. an identity step) to exercise everything around the model.
pub trait InferenceBackend: Send {
    /// Identity of the model, written into every output record.
    fn model(&self) -> ModelRef;
    /// Detections for each image, in order (the result must have `images.len()` entries).
    fn infer(&mut self, images: &[RgbImage]) -> Result<Vec<ImageDetections>>;
}

/// Builds (and rebuilds after a failure) the backend of worker `index`. Called on the
/// worker's own thread, so a CUDA model is created on the thread that uses it.
pub type BackendFactory = Arc<dyn Fn(usize) -> Result<Box<dyn InferenceBackend>> + Send + Sync>;

/// The production backend: a [`Detector`] replica.
pub struct DetectorBackend {
    detector: Detector,
    model: ModelRef,
}

impl DetectorBackend {
    /// Wraps a loaded detector; `model` is what output records will name.
    pub fn new(detector: Detector, model: ModelRef) -> Self {
        Self { detector, model }
    }
}

impl InferenceBackend for DetectorBackend {
    fn model(&self) -> ModelRef {
        self.model.clone()
    }

    fn infer(&mut self, images: &[RgbImage]) -> Result<Vec<ImageDetections>> {
        tch::no_grad(|| self.detector.detect(images))
    }
}

/// A batch on its way to a worker: the images plus an opaque payload per image that comes
/// back untouched (the pipeline's per-event bookkeeping).
pub struct WorkBatch<T> {
    /// The decoded images, in order.
    pub images: Vec<RgbImage>,
    /// One payload per image.
    pub items: Vec<T>,
    /// When the batch was closed (for queue-time accounting).
    pub closed_at: Instant,
}

/// A finished batch: images and payloads back, with one result per image.
pub struct WorkResult<T> {
    /// The images as sent (the pipeline reads colours from them).
    pub images: Vec<RgbImage>,
    /// The payloads as sent.
    pub items: Vec<T>,
    /// Detections or the error message, per image.
    pub results: Vec<std::result::Result<ImageDetections, String>>,
    /// The model that produced them.
    pub model: ModelRef,
    /// Time from the batch being closed to the worker starting on it.
    pub queued: Duration,
    /// When the worker started on it (the start of the inference span).
    pub started: Instant,
    /// Time the model took for this batch (all retries included).
    pub inference: Duration,
    /// Which worker ran it.
    pub worker: usize,
}

/// What a worker's queue carries: batches, and the switch to a new model.
enum WorkerMessage<T> {
    Batch(WorkBatch<T>),
    /// Replace the model with this already loaded and warmed replica; rebuilds after a later
    /// failure use the new factory.
    Swap(Box<dyn InferenceBackend>, BackendFactory),
}

struct WorkerHandle<T> {
    tx: mpsc::Sender<WorkerMessage<T>>,
    load: Arc<AtomicUsize>,
}

/// The set of workers and the least-loaded dispatcher in front of them.
pub struct WorkerPool<T> {
    workers: Vec<WorkerHandle<T>>,
    threads: Vec<std::thread::JoinHandle<()>>,
    /// Held while a batch is handed to a worker and while a swap is announced to all of them,
    /// so that every batch is either before the swap on every worker or after it.
    dispatch_gate: tokio::sync::Mutex<()>,
    /// Model swaps announced so far.
    swaps: AtomicUsize,
    /// The model every worker serves (the new one once a swap is announced).
    model: std::sync::Mutex<Option<ModelRef>>,
}

impl<T: Send + 'static> WorkerPool<T> {
    /// Starts `count` workers; each builds its backend with `factory(index)` and warms it up
    /// before this returns, so the first real batch does not pay for loading. Results go to
    /// `results`. `retries` is how often a failed batch is retried image by image.
    pub fn start(
        count: usize,
        factory: BackendFactory,
        retries: u32,
        results: mpsc::UnboundedSender<WorkResult<T>>,
    ) -> Result<Self> {
        let mut workers = Vec::new();
        let mut threads = Vec::new();
        let mut ready = Vec::new();
        for index in 0..count {
            // One batch queued while another runs: the next batch is ready when the device frees up.
            let (tx, rx) = mpsc::channel::<WorkerMessage<T>>(1);
            let load = Arc::new(AtomicUsize::new(0));
            let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<Option<ModelRef>>>();
            let worker = Worker {
                index,
                factory: factory.clone(),
                retries,
                load: load.clone(),
                results: results.clone(),
            };
            let thread = std::thread::Builder::new()
                .name(format!("inference-{index}"))
                .spawn(move || worker.run(rx, ready_tx))
                .context("cannot start an inference worker thread")?;
            workers.push(WorkerHandle { tx, load });
            threads.push(thread);
            ready.push(ready_rx);
        }
        let mut model = None;
        for (index, rx) in ready.into_iter().enumerate() {
            match rx.recv() {
                Ok(Ok(m)) => model = model.or(m),
                Ok(Err(e)) => return Err(e.context(format!("inference worker {index} failed to start"))),
                Err(_) => anyhow::bail!("inference worker {index} exited during start-up"),
            }
        }
        Ok(Self {
            workers,
            threads,
            dispatch_gate: tokio::sync::Mutex::new(()),
            swaps: AtomicUsize::new(0),
            model: std::sync::Mutex::new(model),
        })
    }

    /// Number of workers.
    pub fn len(&self) -> usize {
        self.workers.len()
    }

    /// True when there are no workers (never, once started).
    pub fn is_empty(&self) -> bool {
        self.workers.is_empty()
    }

    /// Images queued or running on each worker.
    pub fn loads(&self) -> Vec<usize> {
        self.workers.iter().map(|w| w.load.load(Ordering::Relaxed)).collect()
    }

    /// Sends a batch to the least-loaded worker, waiting while every worker's queue is full.
    /// Fails only if all workers have exited.
    pub async fn dispatch(&self, batch: WorkBatch<T>) -> Result<()> {
        let _gate = self.dispatch_gate.lock().await;
        let n = batch.images.len();
        let mut order: Vec<usize> = (0..self.workers.len()).collect();
        order.sort_by_key(|&i| self.workers[i].load.load(Ordering::Relaxed));
        // Prefer a worker that can take it right now, least-loaded first.
        for &i in &order {
            if let Ok(permit) = self.workers[i].tx.try_reserve() {
                self.workers[i].load.fetch_add(n, Ordering::Relaxed);
                permit.send(WorkerMessage::Batch(batch));
                return Ok(());
            }
        }
        // All busy: wait for whichever frees up first.
        let reservations = order.iter().map(|&i| {
            let w = &self.workers[i];
            Box::pin(async move { (i, w.tx.reserve().await) })
        });
        let ((i, permit), _, _) = futures::future::select_all(reservations).await;
        let permit = permit.map_err(|_| anyhow::anyhow!("inference worker {i} has stopped"))?;
        self.workers[i].load.fetch_add(n, Ordering::Relaxed);
        permit.send(WorkerMessage::Batch(batch));
        Ok(())
    }

    /// Switches every worker to the model that `factory` builds, without dropping or failing
    /// a batch; returns the new model's identity.
    ///
    /// The new replicas are built and warmed on loader threads (one per worker, in parallel)
    /// while the old ones keep serving, so device memory briefly holds both. Only when all
    /// of them are ready is the switch announced to every worker under the dispatch gate:
    /// batches dispatched earlier finish on the old model, later ones run on the new one.
    /// If any replica fails to load, nothing switches and the error is returned.
    pub async fn swap_model(&self, factory: BackendFactory) -> Result<ModelRef> {
        let count = self.workers.len();
        let loader_factory = factory.clone();
        let replicas = tokio::task::spawn_blocking(move || build_replicas(count, &loader_factory))
            .await
            .context("model loader task")??;
        let model = replicas.first().map(|b| b.model()).context("no workers to swap")?;
        let _gate = self.dispatch_gate.lock().await;
        for (i, (worker, replica)) in self.workers.iter().zip(replicas).enumerate() {
            worker
                .tx
                .send(WorkerMessage::Swap(replica, factory.clone()))
                .await
                .map_err(|_| anyhow::anyhow!("inference worker {i} has stopped"))?;
        }
        self.swaps.fetch_add(1, Ordering::Relaxed);
        *self.model.lock().unwrap_or_else(|e| e.into_inner()) = Some(model.clone());
        Ok(model)
    }

    /// The model the workers serve (after a swap: the new one), as its backend names it.
    pub fn model(&self) -> Option<ModelRef> {
        self.model.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// How many model swaps were announced since the pool started.
    pub fn swaps(&self) -> usize {
        self.swaps.load(Ordering::Relaxed)
    }

    /// Closes the queues and waits for the workers to finish what they hold.
    pub fn shutdown(self) {
        drop(self.workers);
        for t in self.threads {
            let _ = t.join();
        }
    }
}

struct Worker<T> {
    index: usize,
    factory: BackendFactory,
    retries: u32,
    load: Arc<AtomicUsize>,
    results: mpsc::UnboundedSender<WorkResult<T>>,
}

impl<T: Send + 'static> Worker<T> {
    fn run(
        mut self,
        mut rx: mpsc::Receiver<WorkerMessage<T>>,
        ready: std::sync::mpsc::Sender<Result<Option<ModelRef>>>,
    ) {
        let mut backend = match self.build() {
            Ok(b) => {
                let _ = ready.send(Ok(b.as_ref().map(|b| b.model())));
                b
            }
            Err(e) => {
                let _ = ready.send(Err(e));
                return;
            }
        };
        while let Some(message) = rx.blocking_recv() {
            let batch = match message {
                WorkerMessage::Batch(batch) => batch,
                WorkerMessage::Swap(replica, factory) => {
                    let old = backend.replace(replica).map(|b| b.model());
                    self.factory = factory;
                    tracing::info!(worker = self.index, old = ?old, new = ?backend.as_ref().map(|b| b.model()),
                        "switched to the new model");
                    continue;
                }
            };
            let started = Instant::now();
            let queued = started.saturating_duration_since(batch.closed_at);
            let n = batch.images.len();
            let results = self.run_batch(&mut backend, &batch.images);
            let result = WorkResult {
                images: batch.images,
                items: batch.items,
                results,
                model: backend.as_ref().map(|b| b.model()).unwrap_or_else(|| ModelRef {
                    name: "unavailable".into(),
                    version: String::new(),
                }),
                queued,
                started,
                inference: started.elapsed(),
                worker: self.index,
            };
            self.load.fetch_sub(n, Ordering::Relaxed);
            if self.results.send(result).is_err() {
                return;
            }
        }
    }

    /// Builds the backend and runs one tiny warm-up image through it.
    fn build(&self) -> Result<Option<Box<dyn InferenceBackend>>> {
        build_warm(&self.factory, self.index).map(Some)
    }

    /// Runs a batch; on failure rebuilds the backend and retries image by image.
    fn run_batch(
        &self,
        backend: &mut Option<Box<dyn InferenceBackend>>,
        images: &[RgbImage],
    ) -> Vec<std::result::Result<ImageDetections, String>> {
        let first_error = match guarded_infer(backend, images) {
            Ok(dets) => return dets.into_iter().map(Ok).collect(),
            Err(e) => e,
        };
        tracing::warn!(worker = self.index, error = %first_error, images = images.len(),
            "inference failed; restarting the worker and retrying image by image");
        let mut out: Vec<std::result::Result<ImageDetections, String>> =
            images.iter().map(|_| Err(first_error.clone())).collect();
        for attempt in 0..self.retries {
            self.rebuild(backend, attempt);
            for (i, image) in images.iter().enumerate() {
                if out[i].is_ok() {
                    continue;
                }
                out[i] = match guarded_infer(backend, std::slice::from_ref(image)) {
                    Ok(mut d) => Ok(d.remove(0)),
                    Err(e) => {
                        // A failure may have broken the replica: rebuild before the next image.
                        self.rebuild(backend, attempt);
                        Err(e)
                    }
                };
            }
            if out.iter().all(|r| r.is_ok()) {
                break;
            }
        }
        out
    }

    fn rebuild(&self, backend: &mut Option<Box<dyn InferenceBackend>>, attempt: u32) {
        *backend = None; // free the old replica's memory first
        for delay_ms in [0u64, 200, 1000, 5000] {
            std::thread::sleep(Duration::from_millis(delay_ms));
            match catch_unwind(AssertUnwindSafe(|| self.build())) {
                Ok(Ok(b)) => {
                    *backend = b;
                    return;
                }
                Ok(Err(e)) => tracing::error!(worker = self.index, attempt, error = %format!("{e:#}"),
                    "rebuilding the model failed"),
                Err(_) => tracing::error!(worker = self.index, attempt, "rebuilding the model panicked"),
            }
        }
    }
}

/// Builds worker `index`'s backend with `factory` and runs one tiny warm-up image through it,
/// so the first real batch does not pay for lazy initialisation.
fn build_warm(factory: &BackendFactory, index: usize) -> Result<Box<dyn InferenceBackend>> {
    let mut backend = factory(index)?;
    let warm = RgbImage::from_pixel(64, 64, image::Rgb([128, 128, 128]));
    backend
        .infer(std::slice::from_ref(&warm))
        .context("warm-up inference failed")?;
    Ok(backend)
}

/// Builds and warms one replica per worker in parallel (one loader thread each); fails if any
/// replica fails, naming it.
fn build_replicas(count: usize, factory: &BackendFactory) -> Result<Vec<Box<dyn InferenceBackend>>> {
    std::thread::scope(|scope| {
        let loaders: Vec<_> = (0..count)
            .map(|index| {
                std::thread::Builder::new()
                    .name(format!("model-loader-{index}"))
                    .spawn_scoped(scope, move || {
                        catch_unwind(AssertUnwindSafe(|| build_warm(factory, index)))
                            .unwrap_or_else(|p| Err(anyhow::anyhow!("loading panicked: {}", panic_message(&p))))
                    })
                    .context("cannot start a model loader thread")
            })
            .collect::<Result<_>>()?;
        loaders
            .into_iter()
            .enumerate()
            .map(|(index, loader)| {
                loader
                    .join()
                    .map_err(|_| anyhow::anyhow!("model loader {index} panicked"))?
                    .with_context(|| format!("loading the new model for worker {index}"))
            })
            .collect()
    })
}

/// Runs inference, turning errors, panics, a missing backend and a wrong result count into a message.
fn guarded_infer(
    backend: &mut Option<Box<dyn InferenceBackend>>,
    images: &[RgbImage],
) -> std::result::Result<Vec<ImageDetections>, String> {
    let Some(b) = backend.as_mut() else {
        return Err("the model could not be loaded on this worker".into());
    };
    match catch_unwind(AssertUnwindSafe(|| b.infer(images))) {
        Ok(Ok(d)) if d.len() == images.len() => Ok(d),
        Ok(Ok(d)) => Err(format!(
            "model returned {} results for {} images",
            d.len(),
            images.len()
        )),
        Ok(Err(e)) => Err(format!("{e:#}")),
        Err(panic) => Err(format!("model panicked: {}", panic_message(&panic))),
    }
}

fn panic_message(panic: &Box<dyn std::any::Any + Send>) -> String {
    panic
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "unknown panic".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Fails on images whose top-left pixel is red; counts builds.
    struct Picky {
        builds: Arc<AtomicUsize>,
    }

    impl InferenceBackend for Picky {
        fn model(&self) -> ModelRef {
            ModelRef {
                name: "picky".into(),
                version: self.builds.load(Ordering::SeqCst).to_string(),
            }
        }

        fn infer(&mut self, images: &[RgbImage]) -> Result<Vec<ImageDetections>> {
            images
                .iter()
                .map(|im| {
                    if im.get_pixel(0, 0).0 == [255, 0, 0] {
                        panic!("poison pixel");
                    }
                    Ok(ImageDetections {
                        width: im.width(),
                        height: im.height(),
                        detections: vec![],
                    })
                })
                .collect()
        }
    }

    fn picky_pool(
        workers: usize,
        builds: Arc<AtomicUsize>,
    ) -> (WorkerPool<usize>, mpsc::UnboundedReceiver<WorkResult<usize>>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let factory: BackendFactory = Arc::new(move |_| {
            builds.fetch_add(1, Ordering::SeqCst);
            Ok(Box::new(Picky { builds: builds.clone() }) as Box<dyn InferenceBackend>)
        });
        (WorkerPool::start(workers, factory, 1, tx).unwrap(), rx)
    }

    fn image(colour: [u8; 3]) -> RgbImage {
        RgbImage::from_pixel(8, 8, image::Rgb(colour))
    }

    #[tokio::test]
    async fn poison_image_fails_alone_and_worker_is_rebuilt() {
        let builds = Arc::new(AtomicUsize::new(0));
        let (pool, mut rx) = picky_pool(1, builds.clone());
        assert_eq!(builds.load(Ordering::SeqCst), 1);
        let batch = WorkBatch {
            images: vec![image([0, 0, 255]), image([255, 0, 0]), image([0, 255, 0])],
            items: vec![0, 1, 2],
            closed_at: Instant::now(),
        };
        pool.dispatch(batch).await.unwrap();
        let result = rx.recv().await.unwrap();
        assert_eq!(result.items, vec![0, 1, 2]);
        assert!(result.results[0].is_ok() && result.results[2].is_ok());
        let err = result.results[1].as_ref().unwrap_err();
        assert!(err.contains("poison pixel"), "{err}");
        assert!(builds.load(Ordering::SeqCst) >= 2, "worker rebuilt after the failure");
        // The worker still serves afterwards.
        pool.dispatch(WorkBatch {
            images: vec![image([1, 2, 3])],
            items: vec![3],
            closed_at: Instant::now(),
        })
        .await
        .unwrap();
        assert!(rx.recv().await.unwrap().results[0].is_ok());
        pool.shutdown();
    }

    #[tokio::test]
    async fn every_batch_comes_back_across_workers() {
        // A backend that takes a little time per batch: with an instant one, a worker may
        // finish each batch before the next dispatch and legitimately take them all.
        let (tx, mut rx) = mpsc::unbounded_channel();
        let pool = WorkerPool::start(3, versioned("v1"), 1, tx).unwrap();
        for i in 0..30usize {
            pool.dispatch(WorkBatch {
                images: vec![image([0, 0, 0]); 2],
                items: vec![2 * i, 2 * i + 1],
                closed_at: Instant::now(),
            })
            .await
            .unwrap();
        }
        let mut seen = Vec::new();
        let mut workers = std::collections::HashSet::new();
        while seen.len() < 60 {
            let r = rx.recv().await.unwrap();
            workers.insert(r.worker);
            seen.extend(r.items);
        }
        seen.sort_unstable();
        assert_eq!(seen, (0..60).collect::<Vec<_>>());
        assert!(workers.len() > 1, "work spread over workers: {workers:?}");
        pool.shutdown();
    }

    /// Answers after a short delay with no detections; names itself `version`.
    struct Versioned {
        version: String,
    }

    impl InferenceBackend for Versioned {
        fn model(&self) -> ModelRef {
            ModelRef {
                name: "versioned".into(),
                version: self.version.clone(),
            }
        }

        fn infer(&mut self, images: &[RgbImage]) -> Result<Vec<ImageDetections>> {
            std::thread::sleep(Duration::from_millis(2));
            Ok(images
                .iter()
                .map(|im| ImageDetections {
                    width: im.width(),
                    height: im.height(),
                    detections: vec![],
                })
                .collect())
        }
    }

    fn versioned(version: &'static str) -> BackendFactory {
        Arc::new(move |_| {
            Ok(Box::new(Versioned {
                version: version.into(),
            }) as Box<dyn InferenceBackend>)
        })
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn swap_under_load_loses_nothing_and_is_atomic() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let pool = Arc::new(WorkerPool::start(3, versioned("v1"), 1, tx).unwrap());
        let feeder_pool = pool.clone();
        let feeder = tokio::spawn(async move {
            for i in 0..400usize {
                feeder_pool
                    .dispatch(WorkBatch {
                        images: vec![image([0, 0, 0])],
                        items: vec![i],
                        closed_at: Instant::now(),
                    })
                    .await
                    .unwrap();
            }
        });
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(pool.model().map(|m| m.version), Some("v1".into()));
        let new = pool.swap_model(versioned("v2")).await.unwrap();
        assert_eq!(new.version, "v2");
        assert_eq!(
            pool.model().map(|m| m.version),
            Some("v2".into()),
            "the pool names the new model"
        );
        // Everything dispatched from now on must run on the new model.
        let marker = 1_000_000usize;
        pool.dispatch(WorkBatch {
            images: vec![image([0, 0, 0])],
            items: vec![marker],
            closed_at: Instant::now(),
        })
        .await
        .unwrap();
        feeder.await.unwrap();
        let mut seen = Vec::new();
        let mut last_version = std::collections::HashMap::new();
        let mut per_version = std::collections::HashMap::<String, usize>::new();
        while seen.len() < 401 {
            let r = rx.recv().await.unwrap();
            assert!(r.results.iter().all(|x| x.is_ok()), "no image failed during the swap");
            // Per worker, results come in order: once on v2, never back on v1.
            let previous = last_version.insert(r.worker, r.model.version.clone());
            assert!(
                !(previous.as_deref() == Some("v2") && r.model.version == "v1"),
                "worker {} went back to the old model",
                r.worker
            );
            if r.items.contains(&marker) {
                assert_eq!(r.model.version, "v2");
            }
            *per_version.entry(r.model.version.clone()).or_default() += r.items.len();
            seen.extend(r.items);
        }
        seen.sort_unstable();
        let mut expected: Vec<usize> = (0..400).collect();
        expected.push(marker);
        assert_eq!(seen, expected, "every batch came back exactly once");
        assert!(
            per_version.get("v1").copied().unwrap_or(0) > 0 && per_version.get("v2").copied().unwrap_or(0) > 1,
            "the swap happened mid-stream: {per_version:?}"
        );
        assert_eq!(pool.swaps(), 1);
        Arc::try_unwrap(pool).ok().unwrap().shutdown();
    }

    #[tokio::test]
    async fn failed_swap_keeps_the_old_model_serving() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let pool = WorkerPool::start(2, versioned("v1"), 1, tx).unwrap();
        let broken: BackendFactory = Arc::new(|index| {
            if index == 1 {
                anyhow::bail!("weights file is corrupt")
            }
            Ok(Box::new(Versioned { version: "v2".into() }) as Box<dyn InferenceBackend>)
        });
        let err = format!("{:#}", pool.swap_model(broken).await.unwrap_err());
        assert!(err.contains("worker 1") && err.contains("corrupt"), "{err}");
        assert_eq!(
            pool.model().map(|m| m.version),
            Some("v1".into()),
            "still the old model"
        );
        for i in 0..4 {
            pool.dispatch(WorkBatch {
                images: vec![image([0, 0, 0])],
                items: vec![i],
                closed_at: Instant::now(),
            })
            .await
            .unwrap();
        }
        for _ in 0..4 {
            assert_eq!(rx.recv().await.unwrap().model.version, "v1");
        }
        assert_eq!(pool.swaps(), 0);
        pool.shutdown();
    }
}
