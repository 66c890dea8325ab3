//! librdkafka's global errors, logged so that an outage reads as a few lines, not thousands.
//!
//! The rule: each kind of error (its text, e.g. "Global error: AllBrokersDown") is logged the
//! first time it happens, then at most once per [`REPEAT_EVERY`] with the number held back in
//! between. librdkafka reports a refused connection every few tens of milliseconds per client;
//! its default callback logged each one (about 20 lines a second while the brokers were down).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use rdkafka::client::ClientContext;
use rdkafka::consumer::ConsumerContext;
use rdkafka::error::KafkaError;

/// How often one kind of error is logged again while it keeps happening.
pub const REPEAT_EVERY: Duration = Duration::from_secs(30);

/// When one kind of error was last logged, and how many were held back since.
#[derive(Debug, Clone, Copy)]
struct Seen {
    logged_at: Instant,
    held_back: u64,
}

/// What to do with one occurrence of an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Log it, mentioning this many earlier occurrences that were not logged.
    Log {
        /// Occurrences held back since the last logged one.
        held_back: u64,
    },
    /// Count it and stay quiet.
    HoldBack,
}

/// Rate-limits librdkafka's global errors per kind (see the module documentation).
#[derive(Debug, Default)]
pub struct ErrorLog {
    seen: Mutex<HashMap<String, Seen>>,
}

impl ErrorLog {
    /// Decides about one occurrence of `kind` at `now`, and records it.
    pub fn decide(&self, kind: &str, now: Instant) -> Decision {
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        match seen.get_mut(kind) {
            Some(entry) if now.saturating_duration_since(entry.logged_at) < REPEAT_EVERY => {
                entry.held_back += 1;
                Decision::HoldBack
            }
            Some(entry) => {
                let held_back = entry.held_back;
                *entry = Seen {
                    logged_at: now,
                    held_back: 0,
                };
                Decision::Log { held_back }
            }
            None => {
                seen.insert(
                    kind.to_string(),
                    Seen {
                        logged_at: now,
                        held_back: 0,
                    },
                );
                Decision::Log { held_back: 0 }
            }
        }
    }

    /// Logs `error` if [`ErrorLog::decide`] says so.
    pub fn report(&self, error: &KafkaError, reason: &str) {
        let kind = error.to_string();
        if let Decision::Log { held_back } = self.decide(&kind, Instant::now()) {
            if held_back > 0 {
                tracing::error!(
                    target: "librdkafka",
                    "{kind}: {reason} ({held_back} more like it in the last {}s)",
                    REPEAT_EVERY.as_secs()
                );
            } else {
                tracing::error!(target: "librdkafka", "{kind}: {reason}");
            }
        }
    }
}

/// A client context whose only change from librdkafka's default is [`ErrorLog`]: for the
/// producers and the one-shot commands' consumers.
#[derive(Debug, Default)]
pub struct QuietContext {
    errors: ErrorLog,
}

impl ClientContext for QuietContext {
    fn error(&self, error: KafkaError, reason: &str) {
        self.errors.report(&error, reason);
    }
}

impl ConsumerContext for QuietContext {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_kind_is_logged_once_per_interval_with_the_count_held_back() {
        let log = ErrorLog::default();
        let start = Instant::now();
        let down = "Global error: AllBrokersDown";
        assert_eq!(log.decide(down, start), Decision::Log { held_back: 0 });
        for i in 1..=99 {
            assert_eq!(
                log.decide(down, start + Duration::from_millis(50 * i)),
                Decision::HoldBack
            );
        }
        // Another kind is not held back by the first.
        let refused = "Global error: BrokerTransportFailure";
        assert_eq!(
            log.decide(refused, start + Duration::from_secs(1)),
            Decision::Log { held_back: 0 }
        );
        assert_eq!(log.decide(down, start + REPEAT_EVERY), Decision::Log { held_back: 99 });
        assert_eq!(
            log.decide(down, start + REPEAT_EVERY + Duration::from_secs(1)),
            Decision::HoldBack
        );
        assert_eq!(
            log.decide(down, start + REPEAT_EVERY * 3),
            Decision::Log { held_back: 1 }
        );
    }
}
