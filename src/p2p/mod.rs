//! Peer-to-peer replication over libp2p (TCP + noise + yamux, identify,
//! ping) with no coordinator.
//!
//! One task owns the swarm ([`event_loop`]); the ledger work it triggers
//! (building and applying automerge sync messages) runs on blocking threads
//! and reports back through a channel, so the swarm is never stalled by a
//! large merge. Every byte of replication is the automerge sync protocol
//! carried by `/oncemesh/sync/4`, zstd-compressed (or the protocols of
//! earlier versions with nodes of those versions; [`codec`]). The protocols
//! a peer offers, which identify reports, tell the ledger whether the peer
//! reads compact batches:
//!
//! 1. A local or merged change marks its shard dirty for every peer; the
//!    loop sends the peer a request with a sync message for the dirty
//!    shards at once (push).
//! 2. Every `sync_interval` each peer gets a request with the heads digest
//!    of every shard (anti-entropy); equal digests mean equal documents, so
//!    in-sync peers exchange 300 bytes and no sync messages.
//! 3. The receiver applies the messages, waits until they are durable, and
//!    answers with its digests; equal digests record the pair in sync,
//!    which is what settlement is computed from.
//!
//! At most one request per peer is in flight, so one direction's messages
//! arrive in order, as the automerge protocol expects. A failed request
//! resets the peer's sync session; lost peers are redialled with capped
//! exponential backoff. Only allowlisted peer ids may connect.

pub mod codec;
mod event_loop;

use crate::config::NodeConfig;
use crate::estimator::Estimator;
use crate::health::Health;
use crate::ledger::{DocId, Ledger, OnMerge};
use crate::metrics::Metrics;
use crate::peers::lag::LagTracker;
use crate::peers::status::PeerTable;
use crate::storage::Storage;
use libp2p::identity::Keypair;
use libp2p::Multiaddr;
use std::collections::BTreeSet;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Why the peer network could not start.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct NetworkError(String);

/// Documents that changed since the peer network last looked, plus a wake-up.
#[derive(Default)]
pub struct ChangeFeed {
    dirty: Mutex<BTreeSet<DocId>>,
    notify: Notify,
}

impl ChangeFeed {
    /// Marks `doc` changed and wakes the network loop.
    pub fn mark(&self, doc: DocId) {
        self.dirty
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(doc);
        self.notify.notify_one();
    }

    /// Takes the set of changed documents.
    pub fn take(&self) -> BTreeSet<DocId> {
        std::mem::take(&mut *self.dirty.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// Resolves when something changed.
    pub async fn changed(&self) {
        self.notify.notified().await
    }
}

/// What the swarm's shell reaches: one handle per subsystem it feeds or
/// reads, not the whole node.
pub struct Handles {
    /// Sync messages are built from and applied to it.
    pub ledger: Arc<Ledger>,
    /// A request is answered once what it brought is durable.
    pub storage: Arc<Storage>,
    /// Connection state, clock offsets and message counts per peer.
    pub peers: Arc<PeerTable>,
    /// Which allocations each peer's digests show.
    pub lag: Arc<Mutex<LagTracker>>,
    /// Sync traffic and peer counters.
    pub metrics: Arc<Metrics>,
    /// Documents changed here, to push to peers.
    pub changes: Arc<ChangeFeed>,
    /// Peers coming and going change the situation confidence is given in.
    pub estimator: Arc<Estimator>,
    /// Each anti-entropy round samples the indicators.
    pub health: Arc<Health>,
    /// Acts on what a peer's changes brought in.
    pub on_merge: OnMerge,
    /// A peer clock further ahead than this is a skew violation.
    pub max_clock_offset: Duration,
}

impl Handles {
    /// The replication lag bookkeeping, locked.
    fn lag_tracker(&self) -> MutexGuard<'_, LagTracker> {
        self.lag.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Builds the swarm, listens on `config.listen` and dials `config.peers`,
/// and spawns the event loop. Returns the addresses the node listens on.
pub async fn spawn(
    handles: Handles,
    config: &NodeConfig,
    keypair: Keypair,
    tasks: &TaskTracker,
    shutdown: CancellationToken,
) -> Result<Vec<Multiaddr>, NetworkError> {
    let (event_loop, listen_addrs) =
        event_loop::EventLoop::start(Arc::new(handles), config, keypair, tasks.clone()).await?;
    tasks.spawn(event_loop.run(shutdown));
    Ok(listen_addrs)
}
