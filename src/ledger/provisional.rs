//! This node's own provisional allocations, followed until they resolve.
//!
//! While an allocation of this node is provisional it is a duplicate with
//! probability 1 − confidence: that is its share of the node's exposure, and
//! when it resolves (every peer has it with no competitor, or a competing
//! allocation arrives) the outcome is what the confidence model learns from
//! and what the calibration score counts. So each one keeps, beside the key
//! index and only until it resolves, what it was given when it was made (a
//! [`Stake`]); resolutions are handed to the node as [`Resolution`]s, and
//! the running [`ExposureSums`] stay exact without a scan of any key.
//!
//! Arrival numbers of one document only grow, so the allocations folded into
//! a document wait in arrival order, and those a peer sync settles leave from
//! the front.

use crate::confidence::Estimate;
use crate::exposure::{ExposureSums, Price};
use crate::record::AllocationRecord;
use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;

/// What an allocation of this node was given when it was made.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Stake {
    /// The confidence it was given (also in its record).
    pub confidence: f64,
    /// The model's estimate behind it; `None` for an allocation made before
    /// this process started, whose situation is not known.
    pub estimate: Option<Estimate>,
    /// The partition episode it was made in (0: none), for the calibration score.
    pub episode: u32,
    /// Its amount and currency.
    pub price: Price,
}

impl Stake {
    /// What an allocation read back from disk still has: its confidence.
    pub fn recovered(confidence: f64) -> Self {
        Self {
            confidence,
            estimate: None,
            episode: 0,
            price: Price::UNKNOWN,
        }
    }
}

/// How an allocation of this node resolved.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Resolution {
    /// What it was given when made.
    pub stake: Stake,
    /// `Some(ms between the two allocations)` when a competing allocation
    /// turned up; `None` when it settled.
    pub conflict_after_ms: Option<u64>,
    /// The allocation's HLC time, ms, so that a caller can tell how long it
    /// took to resolve (the simulator's settlement figures).
    pub allocated_ms: u64,
}

/// A folded allocation waiting to resolve.
struct Waiting {
    arrival: u64,
    record: Arc<AllocationRecord>,
    stake: Stake,
    resolved: bool,
}

/// This shard's own provisional allocations that are folded into their
/// documents (pending ones keep their stake on the pending list), and the
/// exposure of all of them.
#[derive(Default)]
pub(super) struct OwnProvisional {
    by_epoch: BTreeMap<u32, VecDeque<Waiting>>,
    sums: ExposureSums,
}

impl OwnProvisional {
    /// Counts a new allocation in the exposure.
    pub fn admit(&mut self, stake: &Stake) {
        self.sums.add(stake.confidence, stake.price);
    }

    /// An admitted allocation left without resolving (it expired before it
    /// did, or before it was folded).
    pub fn forget(&mut self, stake: &Stake) {
        self.sums.remove(stake.confidence, stake.price);
    }

    /// An admitted allocation arrived in the document of `epoch` as number `arrival`.
    pub fn folded(
        &mut self,
        epoch: u32,
        arrival: u64,
        record: Arc<AllocationRecord>,
        stake: Stake,
    ) {
        self.by_epoch.entry(epoch).or_default().push_back(Waiting {
            arrival,
            record,
            stake,
            resolved: false,
        });
    }

    /// Every peer holds the document of `epoch` through arrival `through`:
    /// the allocations that arrived no later are settled.
    pub fn settled_through(&mut self, epoch: u32, through: u64, out: &mut Vec<Resolution>) {
        let Some(waiting) = self.by_epoch.get_mut(&epoch) else {
            return;
        };
        while waiting.front().is_some_and(|w| w.arrival <= through) {
            let Some(w) = waiting.pop_front() else { break };
            if !w.resolved {
                self.sums.remove(w.stake.confidence, w.stake.price);
                out.push(Resolution {
                    stake: w.stake,
                    conflict_after_ms: None,
                    allocated_ms: w.record.hlc.physical_ms,
                });
            }
        }
        if waiting.is_empty() {
            self.by_epoch.remove(&epoch);
        }
    }

    /// A competing allocation of `record`'s key arrived, `after_ms` apart
    /// from it; `record` arrived in the document of `epoch` as `arrival`.
    pub fn conflicted(
        &mut self,
        epoch: u32,
        arrival: u64,
        record: &AllocationRecord,
        after_ms: u64,
        out: &mut Vec<Resolution>,
    ) {
        let Some(waiting) = self.by_epoch.get_mut(&epoch) else {
            return;
        };
        let Ok(at) = waiting.binary_search_by_key(&arrival, |w| w.arrival) else {
            return;
        };
        let w = &mut waiting[at];
        if w.resolved || w.record.txn_id != record.txn_id {
            return;
        }
        w.resolved = true;
        self.sums.remove(w.stake.confidence, w.stake.price);
        out.push(Resolution {
            stake: w.stake,
            conflict_after_ms: Some(after_ms),
            allocated_ms: w.record.hlc.physical_ms,
        });
    }

    /// Resolves an allocation that was still pending (not folded) when its
    /// competitor arrived.
    pub fn conflicted_pending(
        &mut self,
        record: &AllocationRecord,
        stake: Stake,
        after_ms: u64,
        out: &mut Vec<Resolution>,
    ) {
        self.sums.remove(stake.confidence, stake.price);
        out.push(Resolution {
            stake,
            conflict_after_ms: Some(after_ms),
            allocated_ms: record.hlc.physical_ms,
        });
    }

    /// The document of `epoch` passed the retention: what still waits in it
    /// leaves the exposure unresolved.
    pub fn expire(&mut self, epoch: u32) {
        for w in self.by_epoch.remove(&epoch).into_iter().flatten() {
            if !w.resolved {
                self.sums.remove(w.stake.confidence, w.stake.price);
            }
        }
    }

    /// The exposure of this shard's provisional allocations.
    pub fn sums(&self) -> &ExposureSums {
        &self.sums
    }

    /// Folded allocations still waiting, for tests and memory accounting.
    #[cfg(test)]
    pub fn waiting(&self) -> usize {
        self.by_epoch.values().map(VecDeque::len).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hlc::Timestamp;

    fn record(txn: &str) -> Arc<AllocationRecord> {
        Arc::new(AllocationRecord {
            v: 1,
            key: txn.into(),
            txn_id: txn.into(),
            region: "r".into(),
            node: "n".into(),
            hlc: Timestamp::new(1, 0),
            fingerprint: "f".into(),
            confidence: 0.8,
        })
    }

    fn stake(confidence: f64) -> Stake {
        Stake::recovered(confidence)
    }

    #[test]
    fn allocations_leave_once_settled_or_conflicted() {
        let mut own = OwnProvisional::default();
        let mut out = Vec::new();
        for (arrival, txn) in [(1, "a"), (3, "b"), (4, "c")] {
            own.admit(&stake(0.8));
            own.folded(7, arrival, record(txn), stake(0.8));
        }
        own.conflicted(7, 3, &record("b"), 250, &mut out);
        own.conflicted(7, 3, &record("b"), 250, &mut out);
        own.conflicted(7, 2, &record("x"), 250, &mut out);
        assert_eq!(out.len(), 1, "once, for the allocation that is there");
        assert_eq!(out[0].conflict_after_ms, Some(250));
        own.settled_through(7, 3, &mut out);
        assert_eq!(out.len(), 2, "a settles; b already resolved");
        assert_eq!(out[1].conflict_after_ms, None);
        assert_eq!(own.waiting(), 1);
        assert!((own.sums().clone() != ExposureSums::default()));
        own.settled_through(7, 10, &mut out);
        assert_eq!((out.len(), own.waiting()), (3, 0));
        assert_eq!(*own.sums(), ExposureSums::default());
    }

    #[test]
    fn expiry_and_forgetting_leave_no_exposure_behind() {
        let mut own = OwnProvisional::default();
        own.admit(&stake(0.5));
        own.folded(1, 1, record("a"), stake(0.5));
        own.admit(&stake(0.6));
        own.forget(&stake(0.6));
        own.expire(1);
        assert_eq!(*own.sums(), ExposureSums::default());
        assert_eq!(own.waiting(), 0);
    }
}
