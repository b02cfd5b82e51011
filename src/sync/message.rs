//! What nodes tell each other, as the sync engine and its shells see it:
//! a request with the sender's clock, window, links, every live document's
//! digest and the sync messages due; a response with the same after
//! applying it. `crate::p2p::codec` puts these on the wire.

use crate::hlc::Timestamp;
use crate::ledger::{DocId, NodeTag};
use bytes::Bytes;

/// One document's part of a request.
#[derive(Clone, Debug, PartialEq)]
pub struct DocMessage {
    /// The document.
    pub doc: DocId,
    /// Sender's heads digest of the document.
    pub digest: [u8; 32],
    /// Encoded automerge sync message; empty for digest only. Received, it
    /// shares the frame's buffer (no copy of megabyte messages).
    pub message: Bytes,
}

/// Who sent a frame and what its own clock read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Origin {
    /// The sender's region (`--region`).
    pub region: String,
    /// The sender's wall clock (ms since the epoch) when it made the frame.
    pub wall_ms: u64,
    /// In a response: how long the responder held the request before
    /// answering, ms (so a slow apply does not read as clock offset). 0 in
    /// a request.
    pub held_ms: u32,
}

impl Origin {
    /// The responder's clock offset against ours (positive: it is ahead),
    /// from a round trip that left here at `sent_ms` and came back at
    /// `received_ms` (our wall clock), as NTP estimates it: the responder's
    /// clock midway through its hold against the middle of the round trip.
    /// Exact when both directions take equal time; off by at most half the
    /// network round trip otherwise.
    pub fn clock_offset_ms(&self, sent_ms: u64, received_ms: u64) -> i64 {
        let ours = (i128::from(sent_ms) + i128::from(received_ms)) / 2;
        let theirs = i128::from(self.wall_ms) - i128::from(self.held_ms) / 2;
        i64::try_from(theirs - ours).unwrap_or(if theirs > ours { i64::MAX } else { i64::MIN })
    }
}

/// A request: the sender's clock and window, and its documents.
#[derive(Clone, Debug, PartialEq)]
pub struct SyncRequest {
    /// Sender's HLC when it sent this.
    pub hlc: Timestamp,
    /// Sender's region and wall clock; `None` from a node of an earlier
    /// version (and sent as a version 3 frame when `None`).
    pub origin: Option<Origin>,
    /// Sender's document time window, ms (must equal ours).
    pub window_ms: u64,
    /// The peers the sender is connected to.
    pub connected: Vec<NodeTag>,
    /// Every live document's digest, with a sync message where one is due.
    pub docs: Vec<DocMessage>,
}

/// A response: the responder's clock and digests after applying the request.
#[derive(Clone, Debug, PartialEq)]
pub struct SyncResponse {
    /// Responder's HLC.
    pub hlc: Timestamp,
    /// Responder's region and wall clock; `None` from a node of an earlier
    /// version.
    pub origin: Option<Origin>,
    /// Responder's document time window, ms.
    pub window_ms: u64,
    /// The peers the responder is connected to.
    pub connected: Vec<NodeTag>,
    /// (document, digest) for every live document.
    pub digests: Vec<(DocId, [u8; 32])>,
}
