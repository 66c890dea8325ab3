//! Following production.json: the current state first, then every change.

use std::pin::Pin;
use std::task::{Context as TaskContext, Poll};
use std::time::Duration;

use object_store::GetOptions;

use super::promotion::Snapshot;
use super::{ModelRegistry, Production, RegistryError, Result, MAX_WATCH_BACKOFF, PRODUCTION_FILE};

impl ModelRegistry {
    /// Follows production.json: the first value is the current state, then one value per
    /// change, polled every `interval` (a conditional GET on its etag). Read errors are
    /// logged and retried with exponential backoff (up to a minute, or `interval` if longer);
    /// the last good state stays in force meanwhile. Polling stops when the receiver is dropped.
    /// Fails only if the first read fails (so a wrong location is caught at start-up).
    pub async fn watch(&self, interval: Duration) -> Result<ProductionWatch> {
        if interval.is_zero() {
            return Err(RegistryError::Invalid("the watch interval must be above zero".into()));
        }
        let snapshot = self.snapshot().await?;
        let current = self.parse_production(&snapshot)?;
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        // Capacity 4 and an empty channel: this first send cannot fail or wait.
        let _ = tx.try_send(current.clone());
        let registry = self.clone();
        tokio::spawn(async move {
            registry.poll_production(tx, snapshot.e_tag, current, interval).await;
        });
        Ok(ProductionWatch { rx })
    }

    async fn poll_production(
        &self,
        tx: tokio::sync::mpsc::Sender<Option<Production>>,
        mut e_tag: Option<String>,
        mut last: Option<Production>,
        interval: Duration,
    ) {
        let key = self.key(PRODUCTION_FILE);
        let mut failures: u32 = 0;
        loop {
            let delay = if failures == 0 {
                interval
            } else {
                let cap = MAX_WATCH_BACKOFF.max(interval);
                interval.saturating_mul(1u32 << failures.min(16)).min(cap)
            };
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = tx.closed() => return,
            }
            let options = GetOptions {
                if_none_match: e_tag.clone(),
                ..GetOptions::default()
            };
            let read: Result<Option<(Option<String>, Option<Production>)>> = async {
                match self.store.get_opts(&key, options).await {
                    Err(object_store::Error::NotModified { .. }) => Ok(None),
                    Err(object_store::Error::NotFound { .. }) => Ok(Some((None, None))),
                    Err(e) => Err(self.store_error("read", &key, e)),
                    Ok(result) => {
                        let tag = result.meta.e_tag.clone();
                        let raw = result.bytes().await.map_err(|e| self.store_error("read", &key, e))?;
                        let snapshot = Snapshot {
                            raw: Some(raw),
                            ..Snapshot::default()
                        };
                        Ok(Some((tag, self.parse_production(&snapshot)?)))
                    }
                }
            }
            .await;
            match read {
                Ok(None) => failures = 0,
                Ok(Some((tag, production))) => {
                    failures = 0;
                    e_tag = tag;
                    if production != last {
                        last = production.clone();
                        if tx.send(production).await.is_err() {
                            return;
                        }
                    }
                }
                Err(e) => {
                    failures = failures.saturating_add(1);
                    tracing::warn!(registry = %self.location, failures, "watching production.json: {e}");
                }
            }
        }
    }
}

/// Changes of the production version, from [`ModelRegistry::watch`]. Also a
/// [`futures::Stream`]. `None` means "no production version".
#[derive(Debug)]
pub struct ProductionWatch {
    rx: tokio::sync::mpsc::Receiver<Option<Production>>,
}

impl ProductionWatch {
    /// The next state: the current one first, then each change. `None` only if the poller
    /// stopped (it does not on errors, so in practice: never).
    pub async fn next_change(&mut self) -> Option<Option<Production>> {
        self.rx.recv().await
    }
}

impl futures::Stream for ProductionWatch {
    type Item = Option<Production>;
    fn poll_next(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<Option<Self::Item>> {
        self.rx.poll_recv(cx)
    }
}
