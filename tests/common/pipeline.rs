//! A serve pipeline running on its own thread and runtime for the integration tests, stopped
//! like `serve` is (the shutdown future resolves, then it drains).
#![allow(dead_code)]

use std::future::Future;
use std::time::Duration;

use futures::future::BoxFuture;

use attrstream::config::Config;
use attrstream::pipeline::{run_with_telemetry, Inference, RunReport};
use attrstream::telemetry::Telemetry;

/// A pipeline on its own thread with a two-thread tokio runtime; [`Running::stop`] shuts it
/// down and returns its report.
pub struct Running {
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    thread: std::thread::JoinHandle<anyhow::Result<RunReport>>,
}

impl Running {
    /// Starts `pipeline::run` (metrics kept in-process).
    pub fn start(config: Config, inference: Inference) -> Self {
        Self::start_with(config, inference, Telemetry::local().expect("local telemetry"))
    }

    /// Starts the pipeline reporting into `telemetry` (metrics, spans, health).
    pub fn start_with(config: Config, inference: Inference, telemetry: Telemetry) -> Self {
        Self::spawn(move |shutdown| run_with_telemetry(config, inference, telemetry, shutdown))
    }

    /// Runs the future `make` builds on a new thread with a two-thread runtime; the future it
    /// is given resolves when [`Running::stop`] is called (the pipeline's shutdown signal).
    pub fn spawn<F, Fut>(make: F) -> Self
    where
        F: FnOnce(BoxFuture<'static, ()>) -> Fut + Send + 'static,
        Fut: Future<Output = anyhow::Result<RunReport>>,
    {
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap();
            let shutdown = async move {
                let _ = rx.await;
            };
            rt.block_on(make(Box::pin(shutdown)))
        });
        Self {
            shutdown: Some(tx),
            thread,
        }
    }

    /// Requests shutdown, waits for the drain and returns the run's report (panics if the run
    /// failed).
    pub fn stop(mut self) -> RunReport {
        let _ = self.shutdown.take().unwrap().send(());
        self.thread.join().expect("pipeline thread").expect("pipeline run")
    }
}

/// The input topic the pipeline tests use.
pub const IN: &str = "images";
/// The output topic the pipeline tests use.
pub const OUT: &str = "attributes";
/// The dead-letter topic the pipeline tests use.
pub const DLQ: &str = "dead-letters";

/// The settings the pipeline tests share: the mock cluster at `brokers`, group `group`, the
/// [`IN`]/[`OUT`]/[`DLQ`] topics, fixed schema ids 1/2/3, quick commits, heartbeats and
/// batching. Not validated: each test adds its own settings, then calls `validate()`.
pub fn test_config(brokers: &str, group: &str) -> Config {
    let mut c = Config::default();
    c.kafka.bootstrap_servers = brokers.to_string();
    c.kafka.group_id = group.to_string();
    c.kafka.input_topic = IN.into();
    c.kafka.output_topic = OUT.into();
    c.kafka.dead_letter_topic = DLQ.into();
    c.kafka.commit_interval = Duration::from_millis(200);
    for (k, v) in [("session.timeout.ms", "6000"), ("heartbeat.interval.ms", "500")] {
        c.kafka.consumer_options.insert(k.into(), v.into());
    }
    c.schemas.input_schema_id = Some(1);
    c.schemas.output_schema_id = Some(2);
    c.schemas.dead_letter_schema_id = Some(3);
    c.batch.max_wait = Duration::from_millis(5);
    c.pipeline.shutdown_deadline = Duration::from_secs(20);
    c
}
