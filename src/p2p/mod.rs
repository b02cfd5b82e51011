//! Peer-to-peer replication over libp2p (TCP + noise + yamux, identify,
//! ping) with no coordinator.
//!
//! One task owns the swarm ([`event_loop`]); the ledger work it triggers
//! (building and applying automerge sync messages) runs on blocking threads
//! and reports back through a channel, so the swarm is never stalled by a
//! large merge. Every byte of replication is the automerge sync protocol
//! carried by `/oncemesh/sync/2`, zstd-compressed (or `/oncemesh/sync/1`,
//! uncompressed, with nodes of earlier versions; [`codec`]):
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
pub mod lag;
pub mod status;

use crate::node::{Node, StartError};
use libp2p::identity::Keypair;
use libp2p::Multiaddr;
use std::sync::Arc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Builds the swarm, starts listening, and spawns the event loop. Returns
/// the addresses the node listens on.
pub async fn spawn(
    node: Arc<Node>,
    keypair: Keypair,
    tasks: &TaskTracker,
    shutdown: CancellationToken,
) -> Result<Vec<Multiaddr>, StartError> {
    let (event_loop, listen_addrs) =
        event_loop::EventLoop::start(node, keypair, tasks.clone()).await?;
    tasks.spawn(event_loop.run(shutdown));
    Ok(listen_addrs)
}
