//! Read-only views of the ledger handed to the API and the engines.

use crate::record::{AllocationRecord, CompensationRecord, CompensationState};
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

    /// Whether every loser of a conflicted key is compensated: what the
    /// conflict report's `resolved`, its filter and health's count of open
    /// conflicts all go by.
    pub fn is_resolved(&self) -> bool {
        self.state() == KeyState::Compensated
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
            .filter(|c| c.state == CompensationState::Succeeded)
            .count();
        if succeeded == losers {
            KeyState::Compensated
        } else if self.compensations.is_empty()
            || self
                .compensations
                .iter()
                .any(|c| c.state == CompensationState::DeadLettered)
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
    use super::*;
    use crate::hlc::Timestamp;
    use crate::record::RECORD_VERSION;

    fn allocation(txn: &str, ms: u64) -> Allocation {
        Allocation {
            record: Arc::new(AllocationRecord {
                v: RECORD_VERSION,
                key: "k".into(),
                txn_id: txn.into(),
                region: "r".into(),
                node: txn.into(),
                hlc: Timestamp::new(ms, 0),
                fingerprint: "f".into(),
                confidence: 0.5,
            }),
            epoch: 1,
            replayed_here: false,
            arrival: ms,
            durable: Durable::Store(0),
        }
    }

    fn compensation(txn: &str, state: CompensationState) -> CompensationRecord {
        CompensationRecord {
            v: RECORD_VERSION,
            key: "k".into(),
            txn_id: txn.to_owned(),
            winner_txn_id: "w".into(),
            owner: txn.to_owned(),
            idempotency_key: format!("oncemesh-comp-{txn}"),
            state,
            attempts: 1,
            last_error: None,
            next_attempt_at_ms: None,
            detected_at_ms: 1,
            succeeded_at_ms: None,
        }
    }

    /// Three allocations of one key, whose two losers' compensations are in `states`.
    fn key_state(states: &[CompensationState]) -> KeyState {
        KeyView {
            key: "k".into(),
            allocations: vec![allocation("w", 1), allocation("a", 2), allocation("b", 3)],
            compensations: ["a", "b"]
                .iter()
                .zip(states)
                .map(|(txn, state)| compensation(txn, *state))
                .collect(),
            settled: false,
            unsynced_peers: Vec::new(),
        }
        .state()
    }

    #[test]
    fn a_keys_state_follows_its_losers_compensations() {
        use CompensationState as S;
        assert_eq!(key_state(&[]), KeyState::Conflicted);
        assert_eq!(key_state(&[S::Succeeded]), KeyState::Compensating);
        assert_eq!(
            key_state(&[S::Succeeded, S::Succeeded]),
            KeyState::Compensated
        );
        assert_eq!(
            key_state(&[S::Succeeded, S::DeadLettered]),
            KeyState::Conflicted
        );
        assert_eq!(key_state(&[S::Running, S::Failed]), KeyState::Compensating);
        // A newer node's state: not done, not given up; the conflict stays open.
        assert_eq!(
            key_state(&[S::Succeeded, S::Unknown]),
            KeyState::Compensating
        );
    }

    /// Every retained token holds one of these in the key index, so its
    /// size is part of the memory per token (docs/BENCHMARKS.md); the
    /// `replayed_here` flag took padding, not a word more.
    #[test]
    fn an_allocation_takes_five_words() {
        assert_eq!(std::mem::size_of::<super::Allocation>(), 40);
    }
}
