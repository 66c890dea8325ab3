//! Dynamic batching in front of the inference workers.
//!
//! A batch closes when it reaches `max_batch_size` images, when the next image would push it
//! over `max_batch_pixels`, or when its first image has waited `max_wait`. It also closes
//! early when no more images are waiting and some worker is idle: an idle device never
//! waits for company, so light load pays no batching latency, while under heavy load
//! images pile up during each forward pass and batches fill by themselves.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use anyhow::Result;
use image::RgbImage;
use tokio::sync::mpsc;
use tokio::time::timeout_at;

use crate::config::BatchConfig;
use crate::workers::{WorkBatch, WorkerPool};

/// An image waiting for a batch, with the caller's payload.
pub struct Pending<T> {
    /// The decoded image.
    pub image: RgbImage,
    /// Carried through to the worker result untouched.
    pub item: T,
}

/// How batching went, for logs and the benchmark.
#[derive(Debug, Default, Clone, Copy)]
pub struct BatchStats {
    /// Batches dispatched.
    pub batches: u64,
    /// Images dispatched.
    pub images: u64,
    /// Batches closed because they were full (size or pixels).
    pub full: u64,
    /// Batches closed because the first image waited `max_wait`.
    pub timed_out: u64,
    /// Batches closed early because a worker was idle and nothing else was waiting.
    pub eager: u64,
}

impl BatchStats {
    /// Mean images per batch.
    pub fn mean_batch_size(&self) -> f64 {
        if self.batches == 0 {
            0.0
        } else {
            self.images as f64 / self.batches as f64
        }
    }
}

enum Closed {
    Full,
    TimedOut,
    Eager,
    EndOfInput,
}

/// Runs until `input` closes and every batch is dispatched.
///
/// `held` counts the images taken from `input` and not yet handed to a worker (the open
/// batch, an image carried over to the next one, a batch waiting for a free worker), so
/// that together with `input`'s length it tells how many images wait for a batch.
pub async fn run_batcher<T: Send + 'static>(
    mut input: mpsc::Receiver<Pending<T>>,
    pool: Arc<WorkerPool<T>>,
    cfg: BatchConfig,
    held: Arc<AtomicUsize>,
) -> Result<BatchStats> {
    let mut stats = BatchStats::default();
    let mut carry: Option<Pending<T>> = None;
    let received = |p: Pending<T>| {
        held.fetch_add(1, Ordering::Relaxed);
        p
    };
    loop {
        let first = match carry.take() {
            Some(p) => p,
            None => match input.recv().await {
                Some(p) => received(p),
                None => break,
            },
        };
        let deadline = tokio::time::Instant::from_std(Instant::now() + cfg.max_wait);
        let mut pixels = pixels_of(&first.image);
        let mut images = vec![first.image];
        let mut items = vec![first.item];
        let reason = loop {
            if images.len() >= cfg.max_batch_size || pixels >= cfg.max_batch_pixels {
                break Closed::Full;
            }
            let next = match input.try_recv() {
                Ok(p) => Some(received(p)),
                Err(mpsc::error::TryRecvError::Disconnected) => break Closed::EndOfInput,
                Err(mpsc::error::TryRecvError::Empty) => {
                    if pool.loads().contains(&0) {
                        break Closed::Eager;
                    }
                    match timeout_at(deadline, input.recv()).await {
                        Ok(Some(p)) => Some(received(p)),
                        Ok(None) => break Closed::EndOfInput,
                        Err(_) => break Closed::TimedOut,
                    }
                }
            };
            if let Some(p) = next {
                let more = pixels_of(&p.image);
                if pixels + more > cfg.max_batch_pixels {
                    carry = Some(p);
                    break Closed::Full;
                }
                pixels += more;
                images.push(p.image);
                items.push(p.item);
            }
        };
        match reason {
            Closed::Full => stats.full += 1,
            Closed::TimedOut => stats.timed_out += 1,
            Closed::Eager => stats.eager += 1,
            Closed::EndOfInput => {}
        }
        stats.batches += 1;
        let size = images.len();
        stats.images += size as u64;
        let dispatched = pool
            .dispatch(WorkBatch {
                images,
                items,
                closed_at: Instant::now(),
            })
            .await;
        held.fetch_sub(size, Ordering::Relaxed);
        dispatched?;
    }
    Ok(stats)
}

fn pixels_of(image: &RgbImage) -> u64 {
    image.width() as u64 * image.height() as u64
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use super::*;
    use crate::detection::ImageDetections;
    use crate::events::ModelRef;
    use crate::workers::{BackendFactory, InferenceBackend, WorkResult};

    /// Sleeps a fixed time per batch, like a device.
    struct Slow(Duration, Arc<AtomicUsize>);

    impl InferenceBackend for Slow {
        fn model(&self) -> ModelRef {
            ModelRef {
                name: "slow".into(),
                version: "1".into(),
            }
        }

        fn infer(&mut self, images: &[RgbImage]) -> Result<Vec<ImageDetections>> {
            self.1.fetch_max(images.len(), Ordering::SeqCst);
            std::thread::sleep(self.0);
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

    type Harness = (
        mpsc::Sender<Pending<usize>>,
        tokio::task::JoinHandle<Result<BatchStats>>,
        mpsc::UnboundedReceiver<WorkResult<usize>>,
        Arc<AtomicUsize>,
    );

    fn setup(per_batch: Duration, cfg: BatchConfig) -> Harness {
        let largest = Arc::new(AtomicUsize::new(0));
        let l = largest.clone();
        let factory: BackendFactory =
            Arc::new(move |_| Ok(Box::new(Slow(per_batch, l.clone())) as Box<dyn InferenceBackend>));
        let (res_tx, res_rx) = mpsc::unbounded_channel();
        let pool = Arc::new(WorkerPool::start(1, factory, 0, res_tx).unwrap());
        let (tx, rx) = mpsc::channel(1024);
        let task = tokio::spawn(run_batcher(rx, pool, cfg, Arc::new(AtomicUsize::new(0))));
        (tx, task, res_rx, largest)
    }

    fn img(side: u32) -> RgbImage {
        RgbImage::new(side, side)
    }

    #[tokio::test]
    async fn backlog_fills_batches_up_to_the_limits() {
        let cfg = BatchConfig {
            max_batch_size: 4,
            max_wait: Duration::from_millis(50),
            max_batch_pixels: 1_000_000,
        };
        let (tx, task, mut results, largest) = setup(Duration::from_millis(30), cfg);
        for i in 0..20 {
            tx.send(Pending { image: img(8), item: i }).await.unwrap();
        }
        drop(tx);
        let stats = task.await.unwrap().unwrap();
        let mut got = Vec::new();
        while let Some(r) = results.recv().await {
            got.extend(r.items);
            if got.len() == 20 {
                break;
            }
        }
        got.sort_unstable();
        assert_eq!(got, (0..20).collect::<Vec<_>>(), "every image comes back once");
        assert_eq!(largest.load(Ordering::SeqCst), 4, "never above max_batch_size");
        assert!(stats.full >= 3, "a backlog makes full batches: {stats:?}");
    }

    #[tokio::test]
    async fn pixel_budget_splits_batches() {
        let cfg = BatchConfig {
            max_batch_size: 8,
            max_wait: Duration::from_millis(20),
            max_batch_pixels: 250, // two 10x10 images fit, three do not
        };
        let (tx, task, _results, largest) = setup(Duration::from_millis(20), cfg);
        for i in 0..9 {
            tx.send(Pending {
                image: img(10),
                item: i,
            })
            .await
            .unwrap();
        }
        drop(tx);
        let stats = task.await.unwrap().unwrap();
        assert_eq!(stats.images, 9);
        assert!(largest.load(Ordering::SeqCst) <= 2);
    }

    #[tokio::test]
    async fn idle_worker_gets_a_lone_image_without_waiting() {
        let cfg = BatchConfig {
            max_batch_size: 8,
            max_wait: Duration::from_secs(10),
            max_batch_pixels: 1_000_000,
        };
        let (tx, _task, mut results, _) = setup(Duration::from_millis(1), cfg);
        let started = Instant::now();
        tx.send(Pending { image: img(8), item: 7 }).await.unwrap();
        let r = results.recv().await.unwrap();
        assert_eq!(r.items, vec![7]);
        assert!(started.elapsed() < Duration::from_secs(5), "did not wait for max_wait");
    }

    #[tokio::test]
    async fn held_counts_images_taken_from_the_queue_until_dispatched() {
        let cfg = BatchConfig {
            max_batch_size: 8,
            max_wait: Duration::from_secs(10),
            max_batch_pixels: 1_000_000,
        };
        let factory: BackendFactory = Arc::new(|_| {
            Ok(Box::new(Slow(Duration::from_millis(300), Arc::new(AtomicUsize::new(0)))) as Box<dyn InferenceBackend>)
        });
        let (res_tx, mut results) = mpsc::unbounded_channel();
        let pool = Arc::new(WorkerPool::start(1, factory, 0, res_tx).unwrap());
        let (tx, rx) = mpsc::channel(16);
        let held = Arc::new(AtomicUsize::new(0));
        let task = tokio::spawn(run_batcher(rx, pool.clone(), cfg, held.clone()));
        // The first image goes to the idle worker at once; the second waits in the open batch
        // while the worker is busy, out of the channel but not yet dispatched.
        tx.send(Pending { image: img(8), item: 0 }).await.unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while pool.loads() != [1] && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        tx.send(Pending { image: img(8), item: 1 }).await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(tx.max_capacity() - tx.capacity(), 0, "the channel is drained");
        assert_eq!(held.load(Ordering::SeqCst), 1, "the open batch holds the second image");
        drop(tx);
        let stats = task.await.unwrap().unwrap();
        assert_eq!(stats.images, 2);
        assert_eq!(held.load(Ordering::SeqCst), 0, "everything was dispatched");
        let mut got = Vec::new();
        while got.len() < 2 {
            got.extend(results.recv().await.unwrap().items);
        }
        got.sort_unstable();
        assert_eq!(got, vec![0, 1]);
    }
}
