//! What this node knows about each allowlisted peer, shared between the
//! swarm's event loop (the only writer of connection state), the sampling
//! round (lag and delta) and the API and metrics (readers).
//!
//! The table has one entry per allowlisted peer and never more, so every
//! per-peer metric has as many series as the allowlist has peers: peers
//! outside it are refused before anything is recorded about them.

use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use serde::Serialize;
use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Lag samples kept per peer for the p50 / p99 that `oncemesh peers` and
/// `oncemesh status` show: five minutes at the default sync interval.
const RECENT_SAMPLES: usize = 300;

/// Which way a message went.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// From us to the peer.
    Sent,
    /// From the peer to us.
    Received,
}

/// The view of one peer.
#[derive(Clone, Debug, Default, Serialize)]
pub struct PeerStatus {
    /// libp2p peer id.
    pub peer_id: String,
    /// Configured address.
    pub address: String,
    /// The region the peer last reported (`None` until it has spoken, or
    /// if it runs a version that does not report one). Shared, since the
    /// status is copied for every allocation's confidence.
    pub region: Option<Arc<str>>,
    /// Whether a connection is open now.
    pub connected: bool,
    /// Wall-clock ms since which the peer is connected (or was last seen).
    pub connected_since_ms: Option<u64>,
    /// Wall-clock ms of the last moment every document was identical on both sides.
    pub last_in_sync_ms: Option<u64>,
    /// Changes the peer lacks (from the sync state: their heads vs ours,
    /// or the heads last shared while the peer is away).
    pub they_lack_changes: u64,
    /// Heads the peer has announced that we have not seen: at least this
    /// many changes are missing here.
    pub we_lack_heads: u64,
    /// When (wall ms) the two above were last counted.
    pub delta_counted_ms: u64,
    /// Replication lag now, seconds: how long ago the oldest allocation
    /// made here that the peer's digests do not yet show was made (0 when
    /// the peer shows every one).
    pub lag_seconds: f64,
    /// Last measured offset of the peer's clock against ours, ms (positive: ahead).
    pub clock_offset_ms: Option<i64>,
    /// Times the peer's clock was measured further ahead than `max_clock_offset`.
    pub skew_violations: u64,
    /// Sync requests sent to the peer.
    pub messages_sent: u64,
    /// Sync requests received from the peer.
    pub messages_received: u64,
    /// Sync payload bytes sent to the peer.
    pub bytes_sent: u64,
    /// Sync payload bytes received from the peer.
    pub bytes_received: u64,
    /// Messages from this peer that were dropped as malformed or oversized.
    pub dropped_messages: u64,
    /// The same by kind (a fixed set of names in the code).
    pub dropped_by_kind: BTreeMap<&'static str, u64>,
    /// Redial attempts since the connection was lost.
    pub redial_attempts: u32,
    /// Redial attempts since start.
    pub redials_total: u64,
}

impl PeerStatus {
    /// Time since the peer was last fully in sync, or `None` if never.
    pub fn staleness(&self, now_ms: u64) -> Option<Duration> {
        self.last_in_sync_ms
            .map(|t| Duration::from_millis(now_ms.saturating_sub(t)))
    }

    /// Counts a message and its payload bytes.
    pub fn count_message(&mut self, direction: Direction, bytes: usize) {
        let (messages, total) = match direction {
            Direction::Sent => (&mut self.messages_sent, &mut self.bytes_sent),
            Direction::Received => (&mut self.messages_received, &mut self.bytes_received),
        };
        *messages += 1;
        *total += bytes as u64;
    }

    /// Counts a dropped message of `kind`.
    pub fn count_drop(&mut self, kind: &'static str) {
        self.dropped_messages += 1;
        *self.dropped_by_kind.entry(kind).or_default() += 1;
    }
}

/// The samples of one peer, taken every sync round. Kept apart from
/// [`PeerStatus`], which is copied on every allocation (for confidence):
/// these are only read by scrapes and reports.
#[derive(Debug)]
pub struct PeerSamples {
    /// Replication lag, seconds.
    pub lag_seconds: Histogram,
    /// Changes the peer lacks.
    pub delta_changes: Histogram,
    /// The last [`RECENT_SAMPLES`] lag samples, oldest first.
    recent_lag: Mutex<VecDeque<f64>>,
}

impl PeerSamples {
    fn new() -> Self {
        Self {
            // 5 ms to about 11 minutes.
            lag_seconds: Histogram::new(exponential_buckets(0.005, 2.0, 18)),
            // 0, then 1 to about half a million changes.
            delta_changes: Histogram::new(
                std::iter::once(0.0).chain(exponential_buckets(1.0, 2.0, 20)),
            ),
            recent_lag: Mutex::new(VecDeque::with_capacity(RECENT_SAMPLES)),
        }
    }

    /// Records one sync round: the lag in seconds and the changes the peer lacks.
    pub fn record_round(&self, lag_seconds: f64, delta: u64) {
        self.lag_seconds.observe(lag_seconds);
        self.delta_changes.observe(delta as f64);
        let mut recent = self.recent_lag.lock().unwrap_or_else(|p| p.into_inner());
        if recent.len() == RECENT_SAMPLES {
            recent.pop_front();
        }
        recent.push_back(lag_seconds);
    }

    /// The `q` quantile (0..=1) of the recent lag samples, seconds.
    pub fn recent_lag_quantile(&self, q: f64) -> Option<f64> {
        let mut sorted: Vec<f64> = self
            .recent_lag
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .copied()
            .collect();
        sorted.sort_by(f64::total_cmp);
        let last = sorted.len().checked_sub(1)?;
        Some(sorted[((last as f64) * q.clamp(0.0, 1.0)).round() as usize])
    }
}

/// Every allowlisted peer's status.
#[derive(Default)]
pub struct PeerTable {
    peers: Mutex<BTreeMap<String, PeerStatus>>,
    /// Fixed at start, so sampling needs no lock of the table.
    samples: BTreeMap<String, PeerSamples>,
}

impl PeerTable {
    /// A table listing `peers` (id, address), none connected yet.
    pub fn new(peers: impl IntoIterator<Item = (String, String)>) -> Self {
        let peers: BTreeMap<String, PeerStatus> = peers
            .into_iter()
            .map(|(id, address)| {
                (
                    id.clone(),
                    PeerStatus {
                        peer_id: id,
                        address,
                        ..PeerStatus::default()
                    },
                )
            })
            .collect();
        let samples = peers
            .keys()
            .map(|id| (id.clone(), PeerSamples::new()))
            .collect();
        Self {
            peers: Mutex::new(peers),
            samples,
        }
    }

    /// A copy of every peer's status, in peer id order.
    pub fn snapshot(&self) -> Vec<PeerStatus> {
        self.lock().values().cloned().collect()
    }

    /// Every peer's status with its samples, in peer id order.
    pub fn with_samples(&self) -> Vec<(PeerStatus, &PeerSamples)> {
        self.lock()
            .values()
            .filter_map(|s| Some((s.clone(), self.samples.get(&s.peer_id)?)))
            .collect()
    }

    /// The samples of `peer` (`None` for a peer outside the allowlist).
    pub fn samples(&self, peer: &str) -> Option<&PeerSamples> {
        self.samples.get(peer)
    }

    /// Whether any peer is connected now: someone can receive a change.
    pub fn any_connected(&self) -> bool {
        self.lock().values().any(|p| p.connected)
    }

    /// Changes one peer's status (no-op for an unknown peer).
    pub fn update(&self, peer: &str, change: impl FnOnce(&mut PeerStatus)) {
        if let Some(status) = self.lock().get_mut(peer) {
            change(status);
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, PeerStatus>> {
        self.peers.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_allowlisted_peers_are_recorded() {
        let table = PeerTable::new([("a".to_owned(), "/ip4/127.0.0.1/tcp/1".to_owned())]);
        table.update("a", |s| s.count_drop("malformed"));
        table.update("stranger", |s| s.count_drop("malformed"));
        let peers = table.snapshot();
        assert_eq!(peers.len(), 1);
        assert_eq!(peers[0].dropped_by_kind.get("malformed"), Some(&1));
        assert!(table.samples("stranger").is_none());
    }

    #[test]
    fn recent_lag_quantiles_cover_the_last_samples_only() {
        let s = PeerSamples::new();
        assert_eq!(s.recent_lag_quantile(0.5), None);
        for _ in 0..RECENT_SAMPLES {
            s.record_round(100.0, 0);
        }
        for i in 0..RECENT_SAMPLES {
            s.record_round(i as f64 / 100.0, 0);
        }
        assert_eq!(s.recent_lag_quantile(0.0), Some(0.0));
        assert_eq!(s.recent_lag_quantile(0.5), Some(1.5));
        assert_eq!(s.recent_lag_quantile(0.99), Some(2.96));
    }
}
