//! Bounded waiting for the Kafka brokers, for the one-shot commands (`publish`, `tail`,
//! `publish-labels`, `train`, `eval --model`).
//!
//! The rule: a one-shot command asks the cluster for its metadata first and gives up after
//! `kafka.connect_timeout` with an error that names the brokers (a runtime failure, exit code
//! 3), instead of waiting on librdkafka's retries for minutes or failing on the first
//! transport error. `serve` does not use this: like every Kafka consumer it keeps retrying an
//! unreachable cluster, says so in its log, and is not ready (`/readyz`) meanwhile.

use anyhow::{anyhow, Result};
use rdkafka::client::{Client, ClientContext};

use crate::config::KafkaConfig;

/// Waits until the brokers answer a metadata request, at most `kafka.connect_timeout`.
pub fn wait_for_brokers<C: ClientContext>(client: &Client<C>, kafka: &KafkaConfig) -> Result<()> {
    let (bootstrap_servers, timeout) = (&kafka.bootstrap_servers, kafka.connect_timeout);
    client.fetch_metadata(None, timeout).map(drop).map_err(|e| {
        anyhow!(
            "cannot reach the Kafka brokers at {bootstrap_servers} within {timeout:?} ({e}); check \
             kafka.bootstrap_servers and the network, or raise kafka.connect_timeout"
        )
    })
}

/// [`wait_for_brokers`] from async code (the metadata request blocks a thread).
pub async fn wait_for_brokers_async<C: ClientContext + 'static>(client: &Client<C>, kafka: &KafkaConfig) -> Result<()> {
    tokio::task::block_in_place(|| wait_for_brokers(client, kafka))
}
