//! An in-process Kafka-protocol broker (librdkafka's mock cluster) for `attrstream demo`,
//! the tests and the pipeline benchmark: real Kafka protocol, consumer groups and offsets,
//! nothing to install.
//!
//! Limits worth knowing (librdkafka 2.12): each partition keeps only about 5 MiB or 100,000
//! messages; the admin API is not supported (topics are created here instead); data lives as
//! long as this value.

use std::time::Duration;

use anyhow::{Context, Result};
use rdkafka::config::ClientConfig;
use rdkafka::producer::{BaseProducer, Producer};

/// A running mock cluster; dropping it stops the brokers.
pub struct EmbeddedBroker {
    /// The client that owns the mock cluster (librdkafka ties the cluster to a client handle).
    owner: BaseProducer,
    bootstrap_servers: String,
}

impl EmbeddedBroker {
    /// Starts `brokers` mock brokers with the group-join delay set to zero (otherwise every
    /// join waits 3 s) and creates `topics` as (name, partitions).
    pub fn start(brokers: usize, topics: &[(&str, i32)]) -> Result<Self> {
        let owner: BaseProducer = ClientConfig::new()
            .set("test.mock.num.brokers", brokers.max(1).to_string())
            .create()
            .context("cannot start the in-process Kafka broker")?;
        let bootstrap_servers = {
            let mock = owner
                .client()
                .mock_cluster()
                .context("librdkafka did not create a mock cluster")?;
            // SAFETY: the handle comes from a live client that we own for as long as `self`.
            unsafe {
                let cluster = rdkafka::bindings::rd_kafka_handle_mock_cluster(owner.client().native_ptr());
                rdkafka::bindings::rd_kafka_mock_group_initial_rebalance_delay_ms(cluster, 0);
            }
            for (name, partitions) in topics {
                mock.create_topic(name, *partitions, 1)
                    .with_context(|| format!("cannot create topic {name}"))?;
            }
            mock.bootstrap_servers()
        };
        Ok(Self {
            owner,
            bootstrap_servers,
        })
    }

    /// The `bootstrap.servers` value that reaches this cluster.
    pub fn bootstrap_servers(&self) -> &str {
        &self.bootstrap_servers
    }

    /// Creates another topic.
    pub fn create_topic(&self, name: &str, partitions: i32) -> Result<()> {
        let mock = self.owner.client().mock_cluster().context("mock cluster gone")?;
        mock.create_topic(name, partitions, 1)
            .with_context(|| format!("cannot create topic {name}"))
    }
}

impl Drop for EmbeddedBroker {
    fn drop(&mut self) {
        let _ = self.owner.flush(Duration::from_millis(100));
    }
}
