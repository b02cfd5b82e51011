//! What this node knows about each allowlisted peer, shared between the
//! swarm's event loop (the only writer) and the API (readers).

use serde::Serialize;
use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

/// The view of one peer.
#[derive(Clone, Debug, Default, Serialize)]
pub struct PeerStatus {
    /// libp2p peer id.
    pub peer_id: String,
    /// Configured address.
    pub address: String,
    /// Whether a connection is open now.
    pub connected: bool,
    /// Wall-clock ms since which the peer is connected (or was last seen).
    pub connected_since_ms: Option<u64>,
    /// Wall-clock ms of the last moment every document was identical on both sides.
    pub last_in_sync_ms: Option<u64>,
    /// Changes the peer lacks (from the sync state: their heads vs ours).
    pub they_lack_changes: u64,
    /// Heads the peer has announced that we have not seen: at least this
    /// many changes are missing here.
    pub we_lack_heads: u64,
    /// Last measured offset of the peer's clock against ours, ms (positive: ahead).
    pub clock_offset_ms: Option<i64>,
    /// Messages from this peer that were dropped as malformed or oversized.
    pub dropped_messages: u64,
    /// Redial attempts since the connection was lost.
    pub redial_attempts: u32,
}

impl PeerStatus {
    /// Time since the peer was last fully in sync, or `None` if never.
    pub fn staleness(&self, now_ms: u64) -> Option<Duration> {
        self.last_in_sync_ms
            .map(|t| Duration::from_millis(now_ms.saturating_sub(t)))
    }
}

/// Every allowlisted peer's status.
#[derive(Default)]
pub struct PeerTable {
    peers: Mutex<BTreeMap<String, PeerStatus>>,
}

impl PeerTable {
    /// A table listing `peers` (id, address), none connected yet.
    pub fn new(peers: impl IntoIterator<Item = (String, String)>) -> Self {
        let peers = peers
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
        Self {
            peers: Mutex::new(peers),
        }
    }

    /// A copy of every peer's status, in peer id order.
    pub fn snapshot(&self) -> Vec<PeerStatus> {
        self.lock().values().cloned().collect()
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
