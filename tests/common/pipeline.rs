//! A serve pipeline running on its own thread and runtime for the integration tests, stopped
//! like `serve` is (the shutdown future resolves, then it drains).
#![allow(dead_code)]

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
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(run_with_telemetry(config, inference, telemetry, async {
                let _ = rx.await;
            }))
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
