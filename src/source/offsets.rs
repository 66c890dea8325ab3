//! Per-partition, in-order offset tracking: the at-least-once rule.
//!
//! Messages of one partition finish out of order (batches, several workers, retries), but
//! Kafka keeps one committed position per partition. A position may only move past a
//! message once that message's output (or dead letter) is acknowledged by the broker, and
//! past every earlier message too. This tracker holds the offsets in flight per partition
//! and answers, after each completion, how far the position may now move.
//!
//! Assignments are numbered by an epoch: after a partition is revoked and assigned again,
//! completions of work read under the old assignment are ignored (the new owner, maybe us,
//! re-reads from the committed position).

use std::collections::{HashMap, VecDeque};

/// Offsets in flight for one partition, in the order they were read (ascending).
#[derive(Debug, Default)]
struct PartitionState {
    epoch: u64,
    /// (offset, done) in ascending offset order.
    pending: VecDeque<(i64, bool)>,
    /// Next position to commit (last offset below which everything is done, + 1).
    committable: Option<i64>,
}

/// Tracks in-flight offsets of every assigned partition of one topic.
#[derive(Debug, Default)]
pub struct OffsetTracker {
    partitions: HashMap<i32, PartitionState>,
    next_epoch: u64,
    in_flight: usize,
}

/// Where a message came from, as the tracker needs it back on completion.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct MessagePosition {
    /// Partition of the input topic.
    pub partition: i32,
    /// Offset within the partition.
    pub offset: i64,
    /// Assignment epoch under which it was read.
    pub epoch: u64,
}

impl OffsetTracker {
    /// An empty tracker (no partitions assigned).
    pub fn new() -> Self {
        Self::default()
    }

    /// Starts tracking `partition` under a fresh epoch (on assignment). Work still in
    /// flight from an earlier assignment of it will be ignored when it completes.
    pub fn assign(&mut self, partition: i32) {
        self.next_epoch += 1;
        if let Some(old) = self.partitions.remove(&partition) {
            self.in_flight -= old.pending.len();
        }
        self.partitions.insert(
            partition,
            PartitionState {
                epoch: self.next_epoch,
                ..Default::default()
            },
        );
    }

    /// Stops tracking `partition` (on revocation); returns how many messages were still in flight.
    pub fn revoke(&mut self, partition: i32) -> usize {
        match self.partitions.remove(&partition) {
            Some(state) => {
                self.in_flight -= state.pending.len();
                state.pending.len()
            }
            None => 0,
        }
    }

    /// Records that `offset` of `partition` was read and is now in flight. Returns its position
    /// (with the epoch) or `None` if the partition is not assigned.
    pub fn track(&mut self, partition: i32, offset: i64) -> Option<MessagePosition> {
        let state = self.partitions.get_mut(&partition)?;
        if let Some(&(last, _)) = state.pending.back() {
            if offset <= last {
                // A re-read after a seek: the earlier entry stays authoritative.
                return Some(MessagePosition {
                    partition,
                    offset,
                    epoch: state.epoch,
                });
            }
        }
        state.pending.push_back((offset, false));
        self.in_flight += 1;
        Some(MessagePosition {
            partition,
            offset,
            epoch: state.epoch,
        })
    }

    /// Marks a message's output as acknowledged. Returns the new committable position of its
    /// partition (the offset to store: one past the last message below which all are done)
    /// when it moved, `None` otherwise (earlier messages still pending, stale epoch, unknown).
    pub fn complete(&mut self, pos: MessagePosition) -> Option<i64> {
        let state = self.partitions.get_mut(&pos.partition)?;
        if state.epoch != pos.epoch {
            return None;
        }
        let index = state.pending.binary_search_by_key(&pos.offset, |&(o, _)| o).ok()?;
        if state.pending[index].1 {
            return None;
        }
        state.pending[index].1 = true;
        let mut moved = None;
        while let Some(&(offset, true)) = state.pending.front() {
            state.pending.pop_front();
            self.in_flight -= 1;
            moved = Some(offset + 1);
        }
        if moved.is_some() {
            state.committable = moved;
        }
        moved
    }

    /// Messages read but not yet acknowledged, over all partitions.
    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// Messages in flight for one partition.
    pub fn in_flight_for(&self, partition: i32) -> usize {
        self.partitions.get(&partition).map_or(0, |s| s.pending.len())
    }

    /// The committable position of every partition that has one.
    pub fn committable(&self) -> Vec<(i32, i64)> {
        let mut out: Vec<(i32, i64)> = self
            .partitions
            .iter()
            .filter_map(|(&p, s)| s.committable.map(|o| (p, o)))
            .collect();
        out.sort_unstable();
        out
    }

    /// The partitions currently assigned.
    pub fn assigned(&self) -> Vec<i32> {
        let mut out: Vec<i32> = self.partitions.keys().copied().collect();
        out.sort_unstable();
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn position_moves_only_past_contiguous_completions() {
        let mut t = OffsetTracker::new();
        t.assign(0);
        let p: Vec<_> = [10, 11, 12, 15].iter().map(|&o| t.track(0, o).unwrap()).collect();
        assert_eq!(t.in_flight(), 4);
        assert_eq!(t.complete(p[1]), None, "11 done but 10 pending");
        assert_eq!(t.complete(p[2]), None);
        assert_eq!(t.complete(p[0]), Some(13), "10, 11, 12 done");
        assert_eq!(t.in_flight(), 1);
        assert_eq!(t.complete(p[3]), Some(16), "gaps in offsets (compaction) are fine");
        assert_eq!(t.committable(), vec![(0, 16)]);
        assert_eq!(t.in_flight(), 0);
    }

    #[test]
    fn duplicate_and_unknown_completions_are_ignored() {
        let mut t = OffsetTracker::new();
        t.assign(1);
        let a = t.track(1, 5).unwrap();
        assert_eq!(t.complete(a), Some(6));
        assert_eq!(t.complete(a), None);
        assert_eq!(t.track(7, 1), None, "partition 7 is not assigned");
    }

    #[test]
    fn stale_epoch_after_reassignment_is_ignored() {
        let mut t = OffsetTracker::new();
        t.assign(0);
        let old = t.track(0, 100).unwrap();
        assert_eq!(t.revoke(0), 1);
        assert_eq!(t.in_flight(), 0);
        t.assign(0);
        let new = t.track(0, 100).unwrap();
        assert_ne!(old.epoch, new.epoch);
        assert_eq!(t.complete(old), None);
        assert_eq!(t.complete(new), Some(101));
    }

    #[test]
    fn partitions_are_independent() {
        let mut t = OffsetTracker::new();
        t.assign(0);
        t.assign(1);
        let a = t.track(0, 0).unwrap();
        let b = t.track(1, 0).unwrap();
        let _c = t.track(0, 1).unwrap();
        assert_eq!(t.complete(b), Some(1));
        assert_eq!(t.complete(a), Some(1));
        assert_eq!(t.in_flight_for(0), 1);
        assert_eq!(t.committable(), vec![(0, 1), (1, 1)]);
    }
}
