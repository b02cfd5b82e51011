//! The work behind the engine's actions, on the ledger: building a request,
//! applying one, comparing digests, answering. Blocking (automerge work
//! under shard locks): a shell runs it off its event loop. What a merge
//! reveals and what a peer sent that could not be used are handed to the
//! caller (`on_merge`, `on_drop`), which counts and acts on them.

use super::engine::BuildOrder;
use super::message::{DocMessage, Origin, SyncRequest, SyncResponse};
use crate::ledger::{DocId, Ledger, MergeError, MergeOutcome, NodeTag, SHARD_COUNT};
use bytes::Bytes;
use std::collections::BTreeSet;

/// A request built for [`BuildOrder`].
#[derive(Debug)]
pub struct Built {
    /// The request, when there is one to send (a sync message, or a round).
    pub request: Option<SyncRequest>,
    /// Documents whose heads-only message was held back.
    pub deferred: Vec<DocId>,
}

/// This node's region and wall clock, as its frames carry them.
pub fn origin(ledger: &Ledger, held_ms: u32) -> Origin {
    Origin {
        region: ledger.identity().region.clone(),
        wall_ms: ledger.wall_ms(),
        held_ms,
    }
}

/// Builds the request `order` asks for: every live document's digest, and
/// a sync message for each wanted document that needs one.
pub fn build(ledger: &Ledger, order: &BuildOrder) -> Built {
    let mut docs = Vec::new();
    let mut deferred = Vec::new();
    let mut any_message = false;
    for (doc, digest) in ledger.digests() {
        let wanted = order.all || order.docs.contains(&doc);
        let message = if wanted {
            // A peer whose digest differs while nothing is under way lost a
            // message with a connection: send again.
            let unstick =
                order.heartbeat && order.their_digests.get(&doc).is_some_and(|d| *d != digest);
            ledger
                .generate_sync(doc, &order.peer, unstick, &order.withhold)
                .map(Bytes::from)
                .unwrap_or_default()
        } else {
            Bytes::new()
        };
        if wanted && order.withhold.heads && message.is_empty() {
            deferred.push(doc);
        }
        any_message |= !message.is_empty();
        docs.push(DocMessage {
            doc,
            digest,
            message,
        });
    }
    let request = (any_message || order.heartbeat).then(|| SyncRequest {
        hlc: ledger.stamp(),
        origin: Some(origin(ledger, 0)),
        window_ms: ledger.windows().window_ms,
        connected: order.connected.clone(),
        docs,
    });
    Built { request, deferred }
}

/// What applying one request did.
#[derive(Debug, Default)]
pub struct Applied {
    /// Durable sequence to wait for before answering.
    pub durable_seq: u64,
    /// Documents whose message was applied.
    pub docs: BTreeSet<DocId>,
    /// The sender's digests, to compare once durable.
    pub their_digests: Vec<(DocId, [u8; 32])>,
}

/// Applies the sync messages of a request from `peer`. `on_merge` gets
/// what each merge revealed; `on_drop` each message that could not be used
/// (a kind for the counter, and why).
pub fn apply(
    ledger: &Ledger,
    peer: &str,
    request: SyncRequest,
    mut on_merge: impl FnMut(&MergeOutcome),
    mut on_drop: impl FnMut(&'static str, &str),
) -> Applied {
    let mut applied = Applied::default();
    for d in request.docs {
        if usize::from(d.doc.shard) >= SHARD_COUNT {
            on_drop(
                "bad-shard",
                &format!("{} names a shard that does not exist", d.doc),
            );
            continue;
        }
        applied.their_digests.push((d.doc, d.digest));
        if d.message.is_empty() {
            continue;
        }
        let message = match automerge::sync::Message::decode(&d.message) {
            Ok(m) => m,
            Err(e) => {
                on_drop("undecodable", &e.to_string());
                continue;
            }
        };
        match ledger.receive_sync(d.doc, peer, message) {
            Ok(outcome) => {
                applied.durable_seq = applied.durable_seq.max(outcome.durable_seq);
                applied.docs.insert(d.doc);
                on_merge(&outcome);
            }
            // A peer whose clock is behind may still offer a document we
            // already dropped: normal at window edges, not an attack.
            Err(MergeError::Expired(doc)) => {
                tracing::debug!(peer, %doc, "ignored a document past the retention");
            }
            Err(e @ MergeError::TooFarAhead(_)) => on_drop("too-far-ahead", &e.to_string()),
            Err(e) => on_drop("rejected", &e.to_string()),
        }
    }
    applied
}

/// Records which of `theirs` (the peer's digests) equal ours; returns those
/// documents and our live documents as of the start of the comparison.
pub fn compare(
    ledger: &Ledger,
    peer: &str,
    theirs: &[(DocId, [u8; 32])],
) -> (Vec<DocId>, BTreeSet<DocId>) {
    let ours = ledger.digests().into_iter().map(|(doc, _)| doc).collect();
    (ours, ledger.mark_in_sync(peer, theirs))
}

/// The answer to a request held `held_ms`: our clock, window, links and
/// digests after applying it.
pub fn response(ledger: &Ledger, connected: Vec<NodeTag>, held_ms: u64) -> SyncResponse {
    SyncResponse {
        hlc: ledger.stamp(),
        origin: Some(origin(ledger, u32::try_from(held_ms).unwrap_or(u32::MAX))),
        window_ms: ledger.windows().window_ms,
        connected,
        digests: ledger.digests(),
    }
}
