//! Allocations that left with their key while their own document lives on.
//!
//! A key lives as long as its winner: once the winner's epoch is past the
//! retention, the key is treated as never seen, losers and all. A retry
//! straddling a window edge puts a loser in a newer document than its
//! winner, so the loser's record is still in a live document when its key
//! goes. Such a loser is *retired*: kept out of the key index by its
//! transaction id until its own document expires, so that neither a peer
//! sending that document again nor a restart loading it brings the key back
//! with the loser alone in it (a retry would then be answered with a
//! compensated transaction). The node keeps the same list on disk
//! ([`super::ChunkSink::retire`]), dropped with the document.

use super::doc_id::Windows;
use crate::record::TxnId;
use std::collections::HashMap;

/// Retired transactions of one shard, with the epoch of their document.
#[derive(Debug, Default)]
pub(super) struct Retired(HashMap<TxnId, u32>);

impl Retired {
    /// `txn`, of the document of `epoch`, left with its key.
    pub fn insert(&mut self, txn: TxnId, epoch: u32) {
        self.0.insert(txn, epoch);
    }

    /// Whether `txn` left with its key.
    pub fn contains(&self, txn: &TxnId) -> bool {
        self.0.contains_key(txn)
    }

    /// The epoch of the document a retired `txn` lives in.
    pub fn epoch_of(&self, txn: &TxnId) -> Option<u32> {
        self.0.get(txn).copied()
    }

    /// Forgets the transactions whose documents are past the retention and
    /// returns those epochs (their documents are gone, or have to go).
    pub fn expire(&mut self, windows: &Windows, now_ms: u64) -> Vec<u32> {
        let mut epochs = Vec::new();
        self.0.retain(|_, &mut epoch| {
            let gone = windows.expired(epoch, now_ms);
            if gone {
                epochs.push(epoch);
            }
            !gone
        });
        epochs.sort_unstable();
        epochs.dedup();
        epochs
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retired_transactions_are_kept_until_their_own_document_expires() {
        let windows = Windows::for_retention(4_000);
        let mut retired = Retired::default();
        retired.insert("tx_a".into(), 11);
        retired.insert("tx_b".into(), 12);
        assert_eq!(retired.epoch_of(&"tx_a".into()), Some(11));
        // Epoch 11 ends at 12 s and is kept 4 s more.
        assert!(retired.expire(&windows, 15_999).is_empty());
        assert_eq!(retired.expire(&windows, 16_000), [11]);
        assert!(!retired.contains(&"tx_a".into()));
        assert!(retired.contains(&"tx_b".into()));
    }
}
