//! Read-only views of the ledger handed to the API and the engines.

use crate::record::{AllocationRecord, CompensationRecord};
use crate::storage::Durable;
use serde::Serialize;
use std::sync::Arc;

/// One allocation as the ledger holds it.
#[derive(Clone, Debug)]
pub struct Allocation {
    /// The replicated record.
    pub record: Arc<AllocationRecord>,
    /// Epoch of the document it lives in.
    pub epoch: u32,
    /// Whether a request on this node has been answered with it: the first
    /// such request for another node's allocation is a near miss. (Sits in
    /// what was padding: it costs no memory.)
    pub replayed_here: bool,
    /// Order of arrival on this node within its document; settlement compares
    /// it with how far each peer is known to be in sync.
    pub arrival: u64,
    /// Where it becomes durable here; an answer that shows this allocation
    /// waits until storage has reached it.
    pub durable: Durable,
}

/// The lifecycle of a key, as `GET /v1/allocations/{key}` reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum KeyState {
    /// One allocation, not yet known to every peer.
    Provisional,
    /// One allocation, known to every peer with no competitor: final.
    Settled,
    /// More than one allocation; compensation not yet under way.
    Conflicted,
    /// Losers are being compensated.
    Compensating,
    /// Every loser is compensated.
    Compensated,
}

impl KeyState {
    /// Text form, as in the API.
    pub fn as_str(self) -> &'static str {
        match self {
            KeyState::Provisional => "provisional",
            KeyState::Settled => "settled",
            KeyState::Conflicted => "conflicted",
            KeyState::Compensating => "compensating",
            KeyState::Compensated => "compensated",
        }
    }
}

/// Everything known about one key.
#[derive(Clone, Debug)]
pub struct KeyView {
    /// The key.
    pub key: String,
    /// Its allocations, winner first (precedence order).
    pub allocations: Vec<Allocation>,
    /// Compensation records of the losers that have one.
    pub compensations: Vec<CompensationRecord>,
    /// Every allocation of the key is on every peer and this node has each
    /// peer's state as of then: the set of allocations can no longer grow.
    pub settled: bool,
    /// Peers not yet known to hold every allocation of the key; their
    /// staleness is what the current confidence depends on.
    pub unsynced_peers: Vec<String>,
}

impl KeyView {
    /// The winner: the allocation with the smallest (HLC, node id).
    pub fn winner(&self) -> Option<&Allocation> {
        self.allocations.first()
    }

    /// The key's state.
    pub fn state(&self) -> KeyState {
        if self.allocations.len() <= 1 {
            return if self.settled {
                KeyState::Settled
            } else {
                KeyState::Provisional
            };
        }
        let losers = self.allocations.len() - 1;
        let succeeded = self
            .compensations
            .iter()
            .filter(|c| c.state == "succeeded")
            .count();
        if succeeded == losers {
            KeyState::Compensated
        } else if self.compensations.is_empty()
            || self
                .compensations
                .iter()
                .any(|c| c.state == "dead-lettered")
        {
            KeyState::Conflicted
        } else {
            KeyState::Compensating
        }
    }
}

/// A conflicted key with the time this node first saw the conflict.
#[derive(Clone, Debug)]
pub struct ConflictView {
    /// Wall-clock ms at which this node detected the conflict.
    pub detected_at_ms: u64,
    /// The key and its allocations.
    pub key: KeyView,
}

#[cfg(test)]
mod tests {
    /// Every retained token holds one of these in the key index, so its
    /// size is part of the memory per token (docs/BENCHMARKS.md); the
    /// `replayed_here` flag took padding, not a word more.
    #[test]
    fn an_allocation_takes_five_words() {
        assert_eq!(std::mem::size_of::<super::Allocation>(), 40);
    }
}
