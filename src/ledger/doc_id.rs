//! Document ids and the time windows that bound how long a document lives.
//!
//! The ledger's documents are split by key (shard) and by time (epoch): an
//! allocation lives in document `tokens-<epoch>-<shard>`, where the epoch is
//! its HLC time divided by the window length. Old epochs are dropped whole
//! once everything in them is older than the retention, which is the only way
//! to give memory back: automerge keeps every document's history.

use std::fmt;
use std::str::FromStr;

/// One ledger document: a shard of the key space within one time window.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DocId {
    /// Window index: HLC physical ms / window ms.
    pub epoch: u32,
    /// Shard: from blake3 of the key.
    pub shard: u8,
}

impl fmt::Display for DocId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "tokens-{}-{}", self.epoch, self.shard)
    }
}

impl FromStr for DocId {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let bad = || format!("'{text}' is not a document id (tokens-<epoch>-<shard>)");
        let rest = text.strip_prefix("tokens-").ok_or_else(bad)?;
        let (epoch, shard) = rest.split_once('-').ok_or_else(bad)?;
        let id = DocId {
            epoch: epoch.parse().map_err(|_| bad())?,
            shard: shard.parse().map_err(|_| bad())?,
        };
        if usize::from(id.shard) >= super::SHARD_COUNT || id.to_string() != text {
            return Err(bad());
        }
        Ok(id)
    }
}

/// How the ledger cuts time: window length and retention.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Windows {
    /// Length of one epoch, ms. Every node of a cluster must use the same.
    pub window_ms: u64,
    /// How long tokens are kept, ms.
    pub retention_ms: u64,
}

impl Windows {
    /// Windows for a retention: a quarter of it per epoch (at least 1 s), so
    /// memory holds at most retention plus a quarter.
    pub fn for_retention(retention_ms: u64) -> Self {
        Self {
            window_ms: (retention_ms / 4).max(1000),
            retention_ms,
        }
    }

    /// The epoch an HLC physical time falls in.
    pub fn epoch_of(&self, physical_ms: u64) -> u32 {
        u32::try_from(physical_ms / self.window_ms).unwrap_or(u32::MAX)
    }

    /// Whether every record an epoch can hold is older than the retention.
    pub fn expired(&self, epoch: u32, now_ms: u64) -> bool {
        let end = (u64::from(epoch) + 1).saturating_mul(self.window_ms);
        end.saturating_add(self.retention_ms) <= now_ms
    }

    /// Whether an epoch starts more than a whole retention after `now_ms`.
    /// No node with a working clock writes there, and a document made there
    /// would be kept until then: refusing them bounds the documents a peer
    /// can make a node hold to about twice the live ones.
    pub fn too_far_ahead(&self, epoch: u32, now_ms: u64) -> bool {
        epoch > self.epoch_of(now_ms.saturating_add(self.retention_ms))
    }

    /// Whether a document of `epoch` may be held at `now_ms`: neither
    /// expired nor too far ahead.
    pub fn live(&self, epoch: u32, now_ms: u64) -> bool {
        !self.expired(epoch, now_ms) && !self.too_far_ahead(epoch, now_ms)
    }
}

impl Default for Windows {
    /// 24 h retention, 6 h windows.
    fn default() -> Self {
        Self::for_retention(24 * 3600 * 1000)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_round_trip_and_reject_junk() {
        let id = DocId {
            epoch: 7345,
            shard: 3,
        };
        assert_eq!(id.to_string().parse::<DocId>(), Ok(id));
        for junk in [
            "tokens-3",
            "tokens-1-8",
            "tokens-01-1",
            "tokens--1",
            "x-1-1",
            "tokens-1-1-1",
        ] {
            assert!(junk.parse::<DocId>().is_err(), "{junk}");
        }
    }

    #[test]
    fn an_epoch_expires_once_its_newest_record_is_past_retention() {
        let w = Windows::for_retention(4000);
        assert_eq!(w.window_ms, 1000);
        assert_eq!(w.epoch_of(2999), 2);
        assert!(!w.expired(2, 6999));
        assert!(w.expired(2, 7000));
    }

    #[test]
    fn an_epoch_more_than_a_retention_ahead_is_not_live() {
        let w = Windows::for_retention(4000);
        // At 10.5 s, epochs up to that of 14.5 s (14) may be held.
        assert!(w.live(14, 10_500));
        assert!(w.too_far_ahead(15, 10_500));
        assert!(!w.live(15, 10_500));
        assert!(!w.live(u32::MAX, 10_500));
        assert!(!w.live(5, 10_500), "expired");
        assert!(w.live(7, 10_500));
    }
}
