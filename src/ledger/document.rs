//! One automerge document of the ledger (a shard of the key space within one
//! time window).
//!
//! The document is a root map with two maps, created by a deterministic
//! genesis change (fixed actor, time 0) so that every node starts from
//! byte-identical documents and their root containers never conflict:
//!
//! ```text
//! { "schema": "oncemesh/2", "shard": n, "epoch": e,
//!   "allocations":   { batch_id: "[<AllocationRecord JSON>, ...]" },
//!   "compensations": { loser_txn_id: "<CompensationRecord JSON>" } }
//! ```
//!
//! Allocations are written in batches, one op per batch: automerge's cost
//! (CPU to insert and apply, memory per op) is per op, so a node folding
//! hundreds of allocations a round pays it once. A batch's id
//! ([`batch_id`]) is its first record's stamp, inverted so that newer
//! batches sort first, and that record's txn_id, which only that record's
//! node ever writes. The order matters for speed: automerge 0.12 applies a
//! remote op into a map by walking (and copying the value of) every op whose
//! key sorts before it, so a fresh batch that sorts first costs the same
//! however large the document has grown.
//!
//! This type owns the automerge document and nothing else: it turns records
//! into ops, remote bytes into records, tracks what has not been handed to
//! durable storage yet, and keeps what it handed over encoded for the sync
//! messages that send it on ([`super::encoded_changes`]).

use super::doc_id::DocId;
use super::encoded_changes::{self, EncodedChanges};
use super::relay::{HeldBack, Withhold};
use crate::record::{AllocationRecord, CompensationRecord};
use automerge::transaction::{CommitOptions, Transactable};
use automerge::{patches::PatchAction, ObjId, PatchLog};
use automerge::{sync, ActorId, Automerge, ChangeHash, ObjType, ReadDoc, ScalarValue, Value, ROOT};

/// Actor of the genesis change; the same on every node, forever.
const GENESIS_ACTOR: &[u8; 16] = b"oncemesh-genesis";
/// Name of the map of allocation records.
pub const ALLOCATIONS: &str = "allocations";
/// Name of the map of compensation records.
pub const COMPENSATIONS: &str = "compensations";
/// Schema tag stored in the genesis change.
pub const SCHEMA: &str = "oncemesh/2";

/// Failures of the document layer; each names the document involved.
#[derive(Debug, thiserror::Error)]
pub enum DocumentError {
    /// Bytes that automerge cannot read (corrupt disk chunk or bad upload).
    #[error("{doc}: automerge could not read the bytes: {source}")]
    Decode {
        /// Document involved.
        doc: DocId,
        /// What automerge said.
        source: Box<automerge::AutomergeError>,
    },
    /// The document lacks the genesis containers (foreign document).
    #[error(
        "{doc}: bytes are not from an oncemesh document (no '{name}' map from its genesis change)"
    )]
    MissingContainer {
        /// Document involved.
        doc: DocId,
        /// Container missing.
        name: &'static str,
    },
    /// A peer's sync message that automerge could not be trusted with.
    #[error("{doc}: refused a sync message: {reason}")]
    Refused {
        /// Document involved.
        doc: DocId,
        /// What is wrong with it.
        reason: String,
    },
    /// automerge panicked on bytes from outside (a peer's message, a posted
    /// or stored document: a bug of automerge that malformed bytes reach);
    /// the node goes on, these bytes are refused.
    #[error("{doc}: automerge panicked while {during}")]
    Panicked {
        /// Document involved.
        doc: DocId,
        /// What it was doing.
        during: &'static str,
    },
    /// An automerge operation failed.
    #[error("{doc}: automerge operation failed: {source}")]
    Automerge {
        /// Document involved.
        doc: DocId,
        /// What automerge said.
        source: Box<automerge::AutomergeError>,
    },
}

/// A record found in the document, as read back from its JSON text.
#[derive(Debug, Clone)]
pub enum Entry {
    /// An allocation record.
    Allocation(AllocationRecord),
    /// A compensation record.
    Compensation(CompensationRecord),
    /// A value that is not a valid record (written by a foreign or buggy
    /// writer): counted and logged by the caller, never fatal.
    Malformed {
        /// Map the value sits in.
        map: &'static str,
        /// Its key.
        key: String,
        /// Why it was refused.
        reason: String,
    },
}

/// The automerge document of one shard in one epoch.
pub struct ShardDocument {
    id: DocId,
    doc: Automerge,
    allocations: ObjId,
    compensations: ObjId,
    persisted_heads: Vec<ChangeHash>,
    /// Change chunks received from peers, as they came, not yet handed to
    /// durable storage. They are already counted in `persisted_heads`.
    received_unpersisted: Vec<u8>,
    /// Changes as handed to storage, for sync messages to reuse.
    encoded: EncodedChanges,
}

impl ShardDocument {
    /// The genesis document of `id`: identical bytes on every node.
    pub fn genesis(id: DocId) -> Self {
        let mut doc = Automerge::new().with_actor(ActorId::from(&GENESIS_ACTOR[..]));
        // The genesis ops cannot fail on a fresh document; should they, the
        // document stays empty and `from_automerge` reports the missing map.
        let _ = doc.transact_with::<_, _, automerge::AutomergeError, _>(
            |_| CommitOptions::default().with_time(0),
            |tx| {
                tx.put(ROOT, "schema", SCHEMA)?;
                tx.put(ROOT, "shard", ScalarValue::Uint(u64::from(id.shard)))?;
                tx.put(ROOT, "epoch", ScalarValue::Uint(u64::from(id.epoch)))?;
                tx.put_object(ROOT, ALLOCATIONS, ObjType::Map)?;
                tx.put_object(ROOT, COMPENSATIONS, ObjType::Map)?;
                Ok(())
            },
        );
        let allocations = map_id(&doc, ALLOCATIONS).unwrap_or(ROOT);
        let compensations = map_id(&doc, COMPENSATIONS).unwrap_or(ROOT);
        Self {
            id,
            doc,
            allocations,
            compensations,
            persisted_heads: Vec::new(),
            received_unpersisted: Vec::new(),
            encoded: EncodedChanges::default(),
        }
    }

    /// Loads a shard from stored chunks (a saved document and/or changes).
    /// The result counts as already persisted.
    pub fn load(id: DocId, bytes: &[u8]) -> Result<Self, DocumentError> {
        let mut me = Self::genesis(id);
        catching_panics(id, "loading a document", || {
            me.doc
                .load_incremental(bytes)
                .map_err(|source| DocumentError::Decode {
                    doc: id,
                    source: Box::new(source),
                })
        })?;
        me.persisted_heads = me.doc.get_heads();
        Ok(me)
    }

    /// Sets the actor used for this process's changes. A fresh actor per
    /// process start means a crash can never reuse a sequence number.
    pub fn set_actor(&mut self, actor: ActorId) {
        self.doc.set_actor(actor);
    }

    /// Which document this is.
    pub fn id(&self) -> DocId {
        self.id
    }

    /// Writes a batch of allocation records, given as their JSON texts, as
    /// one op in one automerge change: `allocations[batch_id]` = the JSON
    /// array of the records. `batch_id` must be [`batch_id`] of the first
    /// record.
    pub fn put_allocation_batch<'a>(
        &mut self,
        batch_id: &str,
        records: impl Iterator<Item = &'a str>,
    ) -> Result<(), DocumentError> {
        let mut batch = String::from("[");
        for (i, text) in records.enumerate() {
            if i > 0 {
                batch.push(',');
            }
            batch.push_str(text);
        }
        batch.push(']');
        self.put_batch_text(batch_id, &batch)
    }

    /// Writes a batch already written as text
    /// ([`AllocationRecord::write_batch`]), in one automerge change.
    pub fn put_batch_text(&mut self, batch_id: &str, batch: &str) -> Result<(), DocumentError> {
        let obj = self.allocations.clone();
        self.put_json(&obj, [(batch_id, batch)].into_iter())
    }

    /// Writes (or overwrites: only the owner ever writes them) compensation
    /// records, all in one automerge change.
    pub fn put_compensations<'a>(
        &mut self,
        records: impl Iterator<Item = &'a CompensationRecord>,
    ) -> Result<(), DocumentError> {
        let obj = self.compensations.clone();
        let texts: Vec<(&str, String)> = records
            .map(|r| (r.txn_id.as_str(), record_json(r)))
            .collect();
        self.put_json(&obj, texts.iter().map(|(txn, text)| (*txn, text.as_str())))
    }

    fn put_json<'a>(
        &mut self,
        obj: &ObjId,
        items: impl Iterator<Item = (&'a str, &'a str)>,
    ) -> Result<(), DocumentError> {
        let doc = self.id;
        self.doc
            .transact::<_, _, automerge::AutomergeError>(|tx| {
                for (key, text) in items {
                    tx.put(obj, key, text)?;
                }
                Ok(())
            })
            .map(|_| ())
            .map_err(|failure| DocumentError::Automerge {
                doc,
                source: Box::new(failure.error),
            })
    }

    /// Every record in the document (used once, at start-up).
    pub fn entries(&self) -> Vec<Entry> {
        let mut out = Vec::new();
        for (map, obj) in [
            (ALLOCATIONS, &self.allocations),
            (COMPENSATIONS, &self.compensations),
        ] {
            for item in self.doc.map_range(obj, ..) {
                if item.conflict && map == ALLOCATIONS {
                    self.parse_every_value(obj, item.key.as_ref(), &mut out);
                } else {
                    let value = Value::from(item.value);
                    parse_entries(map, item.key.as_ref(), value_text(&value), &mut out);
                }
            }
        }
        out
    }

    /// Parses every value a key of the allocations map holds, not only the
    /// one automerge shows. One writer per batch key is the rule, but a node
    /// that crashed after sending a batch and before storing it folds the
    /// same batch again under a new actor: the two puts are then concurrent,
    /// and each may hold allocations the other lacks. Allocations are a set,
    /// so reading them all (the ledger drops a transaction it already has)
    /// loses none, whichever value automerge lets win. Compensation records
    /// keep automerge's winner, so that every node reads the same state.
    fn parse_every_value(&self, obj: &ObjId, key: &str, out: &mut Vec<Entry>) {
        if let Ok(values) = self.doc.get_all(obj, key) {
            for (value, _) in values {
                parse_entries(ALLOCATIONS, key, value_text(&value), out);
            }
        }
    }

    /// Applies remote changes through `apply` (sync message, bytes merge) and
    /// returns the records they added or changed, from the patches automerge
    /// logs while applying them: the cost follows what changed, not the
    /// document size (`Automerge::diff` of the heads walks the whole map,
    /// which made each apply slower as the document grew).
    pub fn apply_remote<F>(&mut self, apply: F) -> Result<Vec<Entry>, DocumentError>
    where
        F: FnOnce(&mut Automerge, &mut PatchLog) -> Result<(), automerge::AutomergeError>,
    {
        let doc = self.id;
        let before = self.doc.get_heads();
        let mut log = PatchLog::active();
        apply(&mut self.doc, &mut log).map_err(|source| DocumentError::Decode {
            doc,
            source: Box::new(source),
        })?;
        if self.doc.get_heads() == before {
            return Ok(Vec::new());
        }
        let mut out = Vec::new();
        for patch in self.doc.make_patches(&mut log) {
            let map = if patch.obj == self.allocations {
                ALLOCATIONS
            } else if patch.obj == self.compensations {
                COMPENSATIONS
            } else {
                continue;
            };
            match patch.action {
                PatchAction::PutMap { key, conflict, .. } if conflict && map == ALLOCATIONS => {
                    self.parse_every_value(&patch.obj, &key, &mut out);
                }
                PatchAction::PutMap { key, value, .. } => {
                    parse_entries(map, &key, value_text(&value.0), &mut out);
                }
                // A concurrent put that did not win: what it holds is new all the same.
                PatchAction::Conflict {
                    prop: automerge::Prop::Map(key),
                } if map == ALLOCATIONS => {
                    self.parse_every_value(&patch.obj, &key, &mut out);
                }
                _ => {}
            }
        }
        Ok(out)
    }

    /// Merges automerge bytes (a saved document or changes) into this shard.
    /// Bytes from a document without the oncemesh genesis are refused before
    /// anything is applied, so an unrelated document cannot pollute the ledger.
    pub fn merge_bytes(&mut self, bytes: &[u8]) -> Result<Vec<Entry>, DocumentError> {
        let doc = self.id;
        let incoming = catching_panics(doc, "reading a document to merge", || {
            Automerge::load(bytes).map_err(|source| DocumentError::Decode {
                doc,
                source: Box::new(source),
            })
        })?;
        let genesis = Self::genesis(doc);
        if !genesis
            .doc
            .get_heads()
            .iter()
            .all(|h| incoming.get_change_meta_by_hash(h).is_some())
        {
            return Err(DocumentError::MissingContainer {
                doc,
                name: ALLOCATIONS,
            });
        }
        let mut incoming = incoming;
        catching_panics(doc, "merging a document", || {
            self.apply_remote(|doc, log| doc.merge_and_log_patches(&mut incoming, log).map(|_| ()))
        })
    }

    /// Handles one automerge sync message from a peer.
    pub fn receive_sync(
        &mut self,
        state: &mut sync::State,
        message: sync::Message,
    ) -> Result<Vec<Entry>, DocumentError> {
        if let Some(reason) = super::sync_receive::unusable_bloom(&message) {
            return Err(DocumentError::Refused {
                doc: self.id,
                reason,
            });
        }
        // When every change of the message is new and applied, the message's
        // own bytes are what storage needs: keeping them saves re-encoding
        // and re-hashing the same changes for the chunk (`save_after`).
        let chunks = message.changes.len() as u64;
        let changes_before = self.doc.stats().num_changes;
        let as_received = (chunks > 0 && self.fully_persisted()).then(|| {
            let chunks: Vec<&[u8]> = message.changes.iter().collect();
            chunks.concat()
        });
        let doc = self.id;
        let applied = catching_panics(doc, "receiving a sync message", || {
            self.apply_remote(|doc, log| super::sync_receive::receive(doc, state, message, log))
        });
        if let Some(bytes) = as_received {
            let added = self.doc.stats().num_changes - changes_before;
            if applied.is_ok() && added == chunks && self.doc.get_missing_deps(&[]).is_empty() {
                self.received_unpersisted.extend(bytes);
                self.persisted_heads = self.doc.get_heads();
            }
        }
        // Answer with changes, never with the whole document: automerge
        // sends a full, DEFLATE-compressed save to a peer that advertises
        // v2 messages and lacks a third of the changes, which after a
        // partition is every document, every time, and compressing them was
        // most of the CPU of converging. Changes are few here (one per
        // folding round), so sending them as they are is cheaper.
        state.their_capabilities = None;
        applied
    }

    /// The next sync message for a peer, if it needs one, leaving out the
    /// changes `withhold` leaves to their authors (within the grace `held`
    /// keeps; see [`super::relay`]), encoded. With `withhold.heads`, a
    /// message that would only tell our heads is not made, and `state`
    /// stays as it was, so the next call makes it.
    pub fn generate_sync(
        &self,
        state: &mut sync::State,
        withhold: &Withhold,
        held: &mut HeldBack,
        now_ms: u64,
    ) -> Option<Vec<u8>> {
        use automerge::sync::SyncDoc;
        let mut held_back = held.within_grace(self.left_to_authors(state, withhold), now_ms);
        let before = withhold.heads.then(|| state.clone());
        // automerge sends no change already in `sent_hashes`: listing the
        // held-back ones there for this one call leaves them out of the
        // message without marking them sent.
        held_back.retain(|h| state.sent_hashes.insert(*h));
        // The same trick hands the changes we hold encoded to us: automerge
        // builds the rest, and marks ours sent as it would have.
        let ours = self.encoded_to_send(state);
        // automerge 0.12 can panic here on what a malformed peer message left
        // in the document (found by fuzzing): this document then sends
        // nothing to that peer, and the node and its other documents go on.
        let message = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            self.doc.generate_sync_message(state)
        }))
        .unwrap_or_else(|_| {
            tracing::error!(doc = %self.id, "automerge panicked generating a sync message; none sent");
            None
        });
        for hash in &held_back {
            state.sent_hashes.remove(hash);
        }
        let Some(message) = message else {
            for hash in &ours {
                state.sent_hashes.remove(hash);
            }
            return None;
        };
        if let Some(before) = before {
            if message.changes.is_empty() && ours.is_empty() && message.need.is_empty() {
                *state = before;
                return None;
            }
        }
        let ours = ours.iter().filter_map(|h| self.encoded.get(h));
        Some(encoded_changes::encode_with(message, ours))
    }

    /// Of the changes automerge would send the peer of `state` now, those
    /// held encoded, marked sent in `state` (so automerge leaves them out).
    /// Empty whenever automerge would not send changes the usual way: no
    /// request from the peer yet, a peer that takes no changes, or a peer
    /// whose last sync we do not know (automerge answers with a reset).
    fn encoded_to_send(&self, state: &mut sync::State) -> Vec<ChangeHash> {
        if self.encoded.is_empty() || state.is_peer_read_only() {
            return Vec::new();
        }
        let (Some(have), Some(need)) = (&state.their_have, &state.their_need) else {
            return Vec::new();
        };
        let unknown = |h: &ChangeHash| self.doc.get_change_meta_by_hash(h).is_none();
        if have
            .first()
            .is_some_and(|h| h.last_sync.iter().any(unknown))
        {
            return Vec::new();
        }
        let mut ours: Vec<ChangeHash> = encoded_changes::to_send(&self.doc, have, need)
            .into_iter()
            .filter(|h| self.encoded.get(h).is_some())
            .collect();
        ours.retain(|h| state.sent_hashes.insert(*h));
        ours
    }

    /// Changes the peer of `state` may lack, by authors `withhold` names.
    /// This walks the change graph from the peer's heads at every message
    /// while authors are left to (a few percent of a follower's CPU under
    /// load). Looking only near our heads first was tried and missed them
    /// after a partition, under the hundreds of compensation changes each
    /// node writes on top.
    fn left_to_authors(&self, state: &sync::State, withhold: &Withhold) -> Vec<ChangeHash> {
        if withhold.authors.is_empty() || state.their_have.is_none() {
            return Vec::new();
        }
        let Some(their_heads) = &state.their_heads else {
            return Vec::new();
        };
        self.doc
            .get_changes_meta(their_heads)
            .into_iter()
            .filter(|m| withhold.covers(&m.actor))
            .map(|m| m.hash)
            .collect()
    }

    /// Changes not yet handed to durable storage, as automerge change chunks;
    /// marks them handed over. `None` when there is nothing new.
    pub fn take_unpersisted(&mut self) -> Option<Vec<u8>> {
        let mut bytes = std::mem::take(&mut self.received_unpersisted);
        let heads = self.doc.get_heads();
        if heads != self.persisted_heads {
            for change in self.doc.get_changes(&self.persisted_heads) {
                bytes.extend_from_slice(change.raw_bytes());
                self.encoded
                    .insert(change.hash(), change.raw_bytes().to_vec());
            }
            self.persisted_heads = heads;
        }
        (!bytes.is_empty()).then_some(bytes)
    }

    /// Stops keeping encoded changes: a newer document takes this node's
    /// new allocations, so few changes here will still need sending.
    pub fn forget_encoded(&mut self) {
        self.encoded.clear();
    }

    /// Whether every applied change is persisted or held as received, and
    /// none waits for a missing dependency: then the changes a message adds
    /// are exactly its own chunks.
    fn fully_persisted(&self) -> bool {
        self.doc.get_heads() == self.persisted_heads && self.doc.get_missing_deps(&[]).is_empty()
    }

    /// The whole document as `Automerge::save` writes it.
    pub fn save(&self) -> Vec<u8> {
        self.doc.save()
    }

    /// The whole document for local compaction: like [`ShardDocument::save`]
    /// but without DEFLATE, which was most of the CPU of a full save (the
    /// disk pays a few times the bytes; the wire and exports stay compressed).
    pub fn save_uncompressed(&self) -> Vec<u8> {
        self.doc.save_nocompress()
    }

    /// (actor, sequence number) of every change that is not an ancestor of
    /// `heads` (heads of this document), the genesis left out: what a
    /// version vector as of `heads` lacks.
    pub fn changes_since(&self, heads: &[ChangeHash]) -> Vec<(ActorId, u64)> {
        let genesis = ActorId::from(&GENESIS_ACTOR[..]);
        self.doc
            .get_changes_meta(heads)
            .into_iter()
            .filter(|m| *m.actor != genesis)
            .map(|m| (m.actor.into_owned(), m.seq))
            .collect()
    }

    /// Current heads.
    pub fn heads(&self) -> Vec<ChangeHash> {
        self.doc.get_heads()
    }

    /// blake3 over the sorted heads: equal digests mean equal documents, so
    /// peers in sync can skip the sync protocol entirely.
    pub fn digest(&self) -> [u8; 32] {
        heads_digest(&self.doc.get_heads())
    }

    /// Number of changes a peer with `their_heads` lacks.
    pub fn changes_missing_from(&self, their_heads: &[ChangeHash]) -> usize {
        let known: Vec<ChangeHash> = their_heads
            .iter()
            .filter(|h| self.doc.get_change_meta_by_hash(h).is_some())
            .copied()
            .collect();
        self.doc.get_changes_meta(&known).len()
    }

    /// Number of `their_heads` this document has never seen (a lower bound
    /// on what we lack from that peer).
    pub fn unknown_heads(&self, their_heads: &[ChangeHash]) -> usize {
        their_heads
            .iter()
            .filter(|h| self.doc.get_change_meta_by_hash(h).is_none())
            .count()
    }
}

/// blake3 digest of a set of heads (sorted, so order does not matter).
pub fn heads_digest(heads: &[ChangeHash]) -> [u8; 32] {
    let mut sorted = heads.to_vec();
    sorted.sort();
    let mut hasher = blake3::Hasher::new();
    for head in &sorted {
        hasher.update(&head.0);
    }
    *hasher.finalize().as_bytes()
}

fn map_id(doc: &Automerge, name: &str) -> Option<ObjId> {
    match doc.get(ROOT, name) {
        Ok(Some((Value::Object(ObjType::Map), id))) => Some(id),
        _ => None,
    }
}

/// Runs `work`, an automerge call on bytes from outside, turning a panic
/// into `doc`'s error. automerge 0.12 (and hexane, its column codec) panics
/// on some damaged input instead of returning an error: fuzzing found it
/// receiving sync messages and loading `POST /v1/documents/{id}` bodies.
/// automerge applies a change whole or not at all, so the document is left
/// as it was or with whole changes applied.
fn catching_panics<T>(
    doc: DocId,
    during: &'static str,
    work: impl FnOnce() -> Result<T, DocumentError>,
) -> Result<T, DocumentError> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(work))
        .unwrap_or(Err(DocumentError::Panicked { doc, during }))
}

/// The map key of a batch whose first record is `first`: its stamp with
/// every bit inverted (so newer batches sort first), then its txn_id.
pub fn batch_id(first: &AllocationRecord) -> String {
    format!(
        "{:016x}{:08x}.{}",
        !first.hlc.physical_ms, !first.hlc.logical, first.txn_id
    )
}

/// Whether `key` names a batch whose first record is `first`: its
/// [`batch_id`], or its bare txn_id as documents of earlier versions have it.
fn is_batch_id_of(key: &str, first: &AllocationRecord) -> bool {
    key == first.txn_id || key == batch_id(first)
}

/// A record as the JSON text the documents (and the journal) hold.
pub fn record_json<T: serde::Serialize>(record: &T) -> String {
    serde_json::to_string(record).unwrap_or_default()
}

fn value_text<'a>(value: &'a Value<'_>) -> Option<&'a str> {
    match value {
        Value::Scalar(s) => match s.as_ref() {
            ScalarValue::Str(text) => Some(text.as_str()),
            _ => None,
        },
        Value::Object(_) => None,
    }
}

/// Reads the records of one map value: a batch (JSON array) of allocation
/// records, or one compensation record. A value that is not valid, whole,
/// is one malformed entry.
fn parse_entries(map: &'static str, key: &str, text: Option<&str>, out: &mut Vec<Entry>) {
    let malformed = |reason: String| Entry::Malformed {
        map,
        key: key.to_owned(),
        reason,
    };
    let Some(text) = text else {
        out.push(malformed("value is not a JSON text string".into()));
        return;
    };
    if map == ALLOCATIONS {
        match AllocationRecord::parse_batch(text) {
            Ok(batch) if batch.first().is_none_or(|r| !is_batch_id_of(key, r)) => out.push(
                malformed("a batch's id must be made from its first record".into()),
            ),
            Ok(batch) => out.extend(batch.into_iter().map(Entry::Allocation)),
            Err(e) => out.push(malformed(format!("invalid allocation batch JSON: {e}"))),
        }
        return;
    }
    out.push(match serde_json::from_str::<CompensationRecord>(text) {
        Ok(r) if r.txn_id != key => malformed(format!(
            "record txn_id {} differs from its map key",
            r.txn_id
        )),
        Ok(r) => Entry::Compensation(r),
        Err(e) => malformed(format!("invalid record JSON: {e}")),
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hlc::Timestamp;
    use crate::ledger::relay::NodeTag;
    use crate::record::RECORD_VERSION;

    fn record(txn: &str) -> String {
        record_json(&AllocationRecord {
            v: RECORD_VERSION,
            key: format!("key-{txn}").into(),
            txn_id: txn.into(),
            region: "r".into(),
            node: "n".into(),
            hlc: Timestamp::new(1, 0),
            fingerprint: "f".into(),
            confidence: 1.0,
        })
    }

    fn doc() -> ShardDocument {
        ShardDocument::genesis(DocId { epoch: 1, shard: 0 })
    }

    fn parsed(text: &str) -> AllocationRecord {
        serde_json::from_str(text).unwrap()
    }

    #[test]
    fn a_batch_reads_back_as_its_records_in_order() {
        let mut d = doc();
        let texts = [record("tx_a"), record("tx_b"), record("tx_c")];
        d.put_allocation_batch(
            &batch_id(&parsed(&texts[0])),
            texts.iter().map(String::as_str),
        )
        .unwrap();
        // Documents of earlier versions key a batch by its bare txn_id.
        let legacy = record("tx_d");
        d.put_allocation_batch("tx_d", [legacy.as_str()].into_iter())
            .unwrap();
        let txns: Vec<String> = d
            .entries()
            .into_iter()
            .map(|e| match e {
                Entry::Allocation(r) => r.txn_id.to_string(),
                other => panic!("unexpected {other:?}"),
            })
            .collect();
        assert_eq!(txns, ["tx_a", "tx_b", "tx_c", "tx_d"]);
    }

    #[test]
    fn newer_batches_sort_first_and_a_wrong_stamp_is_malformed() {
        let at = |physical_ms, logical| {
            let mut r = parsed(&record("tx_x"));
            r.hlc = Timestamp::new(physical_ms, logical);
            r
        };
        let ids = [at(1, 0), at(1, 1), at(2, 0), at(u64::MAX, u32::MAX)].map(|r| batch_id(&r));
        assert!(ids.windows(2).all(|w| w[0] > w[1]), "{ids:?}");

        let mut d = doc();
        let text = record("tx_y");
        let mut wrong = parsed(&text);
        wrong.hlc = Timestamp::new(2, 0);
        d.put_allocation_batch(&batch_id(&wrong), [text.as_str()].into_iter())
            .unwrap();
        assert!(
            matches!(d.entries().as_slice(), [Entry::Malformed { .. }]),
            "{:?}",
            d.entries()
        );
    }

    #[test]
    fn bad_batches_are_malformed_entries_not_errors() {
        let mut d = doc();
        // Id that is not the first record's txn_id.
        d.put_allocation_batch("tx_other", [record("tx_x").as_str()].into_iter())
            .unwrap();
        // Not JSON.
        d.put_allocation_batch("tx_y", ["{not json"].into_iter())
            .unwrap();
        // Empty batch.
        d.put_allocation_batch("tx_z", std::iter::empty()).unwrap();
        let entries = d.entries();
        assert_eq!(entries.len(), 3, "{entries:?}");
        assert!(
            entries.iter().all(|e| matches!(
                e,
                Entry::Malformed {
                    map: ALLOCATIONS,
                    ..
                }
            )),
            "{entries:?}"
        );
    }

    fn txns(entries: &[Entry]) -> std::collections::BTreeSet<String> {
        entries
            .iter()
            .map(|e| match e {
                Entry::Allocation(r) => r.txn_id.to_string(),
                other => panic!("unexpected {other:?}"),
            })
            .collect()
    }

    #[test]
    fn a_batch_folded_twice_by_two_actors_loses_none_of_its_allocations() {
        let (x, y, z) = (record("tx_x"), record("tx_y"), record("tx_z"));
        let batch = batch_id(&parsed(&x));
        let all: std::collections::BTreeSet<String> =
            ["tx_x", "tx_y", "tx_z"].map(String::from).into();
        // Both ways round: automerge lets the greater actor's put win.
        for (first, second) in [(1u8, 2u8), (2, 1)] {
            // Folded, sent, then lost to a crash before it was stored ...
            let mut sent = doc();
            sent.set_actor(ActorId::from(vec![first; 16]));
            sent.put_allocation_batch(&batch, [x.as_str()].into_iter())
                .unwrap();
            // ... and folded again after the restart with what was queued.
            let mut refolded = doc();
            refolded.set_actor(ActorId::from(vec![second; 16]));
            refolded
                .put_allocation_batch(&batch, [x.as_str(), y.as_str(), z.as_str()].into_iter())
                .unwrap();

            // A peer that holds the first fold receives the second, live.
            let mut peer = doc();
            assert_eq!(
                txns(&peer.merge_bytes(&sent.save()).unwrap()),
                ["tx_x".to_owned()].into()
            );
            let live = txns(&peer.merge_bytes(&refolded.save()).unwrap());
            assert!(
                live.is_superset(&["tx_y", "tx_z"].map(String::from).into()),
                "{live:?}"
            );
            // The node itself receives the first fold back from the peer.
            let back = refolded.merge_bytes(&sent.save()).unwrap();
            assert!(txns(&back).is_subset(&all), "{back:?}");

            // Read at start-up, both documents hold all three.
            for d in [&peer, &refolded] {
                let loaded = ShardDocument::load(d.id, &d.save()).unwrap();
                assert_eq!(txns(&loaded.entries()), all);
            }
        }
    }

    #[test]
    fn a_sync_message_with_a_bloom_filter_automerge_cannot_probe_is_refused() {
        let mut a = doc();
        a.set_actor(NodeTag::of("a").new_actor());
        a.put_allocation_batch("tx_a", [record("tx_a").as_str()].into_iter())
            .unwrap();
        let mut held = HeldBack::default();
        let template =
            generate(&a, &mut sync::State::new(), &Withhold::nothing(), &mut held).unwrap();
        let leb = |n: u64| {
            let mut v = Vec::new();
            leb128::write::unsigned(&mut v, n).unwrap();
            v
        };
        // (entries, bits per entry, probes, bytes of bits): entries and no
        // bits (automerge divides by zero), a billion probes per hash.
        for (entries, per_entry, probes, bits) in [(1, 0, 7, 0), (1, 10, 1_000_000_000, 2)] {
            let bloom = [leb(entries), leb(per_entry), leb(probes), vec![0xff; bits]].concat();
            let mut message = template.clone();
            message.have = vec![sync::Have {
                last_sync: Vec::new(),
                bloom: sync::BloomFilter::try_from(bloom.as_slice()).unwrap(),
            }];
            let mut peer = doc();
            let mut state = sync::State::new();
            let refused = peer.receive_sync(&mut state, message);
            assert!(
                matches!(refused, Err(DocumentError::Refused { .. })),
                "{refused:?}"
            );
            // Nothing of it was applied, and the next message is generated as usual.
            assert!(peer.entries().is_empty());
            let _ = generate(&peer, &mut state, &Withhold::nothing(), &mut held);
        }
        let mut fine = doc();
        assert!(fine.receive_sync(&mut sync::State::new(), template).is_ok());
    }

    /// Syncs `from` into `to` until `from` has nothing more to send.
    fn sync_into(from: &mut ShardDocument, to: &mut ShardDocument) {
        let (mut from_state, mut to_state) = (sync::State::new(), sync::State::new());
        let mut held = HeldBack::default();
        for _ in 0..10 {
            let there = generate(from, &mut from_state, &Withhold::nothing(), &mut held);
            if let Some(m) = there {
                to.receive_sync(&mut to_state, m).unwrap();
            }
            match generate(to, &mut to_state, &Withhold::nothing(), &mut held) {
                Some(back) => {
                    from.receive_sync(&mut from_state, back).unwrap();
                }
                None if from.heads() == to.heads() => return,
                None => {}
            }
        }
    }

    /// Runs B → C sync rounds with `withhold`; returns the changes B sent.
    fn relay_rounds(b: &mut ShardDocument, c: &mut ShardDocument, withhold: &Withhold) -> usize {
        let (mut bc, mut cb) = (sync::State::new(), sync::State::new());
        let mut held = HeldBack::default();
        let mut sent = 0;
        for _ in 0..6 {
            if let Some(m) = generate(b, &mut bc, withhold, &mut held) {
                sent += m.changes.len();
                c.receive_sync(&mut cb, m).unwrap();
            }
            if let Some(back) = generate(c, &mut cb, &Withhold::nothing(), &mut held) {
                b.receive_sync(&mut bc, back).unwrap();
            }
        }
        sent
    }

    #[test]
    fn a_change_left_to_its_author_is_not_relayed_even_when_asked_for() {
        let (ta, tb, tc) = (NodeTag::of("a"), NodeTag::of("b"), NodeTag::of("c"));
        let mut a = doc();
        a.set_actor(ta.new_actor());
        a.put_allocation_batch("tx_a", [record("tx_a").as_str()].into_iter())
            .unwrap();
        let mut b = doc();
        b.set_actor(tb.new_actor());
        b.put_allocation_batch("tx_b", [record("tx_b").as_str()].into_iter())
            .unwrap();
        sync_into(&mut a, &mut b);
        // A change of B's own on top of A's (as compensations are written
        // after a partition): A's change is no longer one of B's heads.
        b.put_allocation_batch("tx_b2", [record("tx_b2").as_str()].into_iter())
            .unwrap();
        let mut c = doc();
        c.set_actor(tc.new_actor());

        // B holds A's change back (C asks for it by hash: B's newest change
        // depends on it) and sends its own two.
        let left_to_a = Withhold {
            authors: vec![ta],
            heads: false,
        };
        assert_eq!(relay_rounds(&mut b, &mut c, &left_to_a), 2);
        let keys = |d: &ShardDocument| {
            let mut ids: Vec<String> = d
                .entries()
                .into_iter()
                .filter_map(|e| match e {
                    Entry::Allocation(r) => Some(r.txn_id.to_string()),
                    _ => None,
                })
                .collect();
            ids.sort();
            ids
        };
        assert_eq!(keys(&c), vec!["tx_b"]);

        // A delivers it itself (B's second change waited for it); then B
        // and C agree with nothing more sent.
        sync_into(&mut a, &mut c);
        assert_eq!(keys(&c), vec!["tx_a", "tx_b", "tx_b2"]);
        assert_eq!(relay_rounds(&mut b, &mut c, &left_to_a), 0);
        assert_eq!(b.heads(), c.heads());

        // Without the author connected, B relays it.
        let mut d = doc();
        d.set_actor(NodeTag::of("d").new_actor());
        assert_eq!(relay_rounds(&mut b, &mut d, &Withhold::nothing()), 3);
        assert_eq!(keys(&d), vec!["tx_a", "tx_b", "tx_b2"]);
    }

    /// The next sync message, decoded (tests look inside it).
    fn generate(
        d: &ShardDocument,
        state: &mut sync::State,
        withhold: &Withhold,
        held: &mut HeldBack,
    ) -> Option<sync::Message> {
        d.generate_sync(state, withhold, held, 0)
            .map(|bytes| sync::Message::decode(&bytes).unwrap())
    }

    /// The hashes of the changes a message carries.
    fn carried(message: &Option<sync::Message>) -> std::collections::BTreeSet<ChangeHash> {
        message
            .iter()
            .flat_map(|m| m.changes.iter())
            .map(|chunk| {
                automerge::Change::from_bytes(chunk.to_vec())
                    .unwrap()
                    .hash()
            })
            .collect()
    }

    #[test]
    fn changes_held_encoded_go_out_exactly_as_automerge_would_send_them() {
        let put = |d: &mut ShardDocument, txn: &str| {
            d.put_allocation_batch(txn, [record(txn).as_str()].into_iter())
                .unwrap();
        };
        let (mut b, mut c) = (doc(), doc());
        b.set_actor(NodeTag::of("b").new_actor());
        c.set_actor(NodeTag::of("c").new_actor());
        put(&mut b, "tx_start");
        sync_into(&mut b, &mut c);
        // A partition: both write; B hands most of its changes to storage
        // (which keeps their encodings), the last one not yet.
        for i in 0..30 {
            put(&mut b, &format!("tx_b{i}"));
            put(&mut c, &format!("tx_c{i}"));
            if i % 4 == 3 {
                assert!(b.take_unpersisted().is_some());
            }
        }
        assert!(b.take_unpersisted().is_some());
        put(&mut b, "tx_b_unstored");

        let (mut bc, mut cb) = (sync::State::new(), sync::State::new());
        let mut held = HeldBack::default();
        let mut from_encodings = 0;
        for round in 0..10 {
            // What automerge alone would send, from a copy of the state.
            use automerge::sync::SyncDoc;
            let mut alone = bc.clone();
            let plain = b.doc.generate_sync_message(&mut alone);
            from_encodings += b.encoded_to_send(&mut bc.clone()).len();
            let message = generate(&b, &mut bc, &Withhold::nothing(), &mut held);
            assert_eq!(carried(&message), carried(&plain), "round {round}");
            assert_eq!(bc.sent_hashes, alone.sent_hashes, "round {round}");
            assert_eq!(bc.in_flight, alone.in_flight, "round {round}");
            if let Some(m) = message {
                c.receive_sync(&mut cb, m).unwrap();
            }
            match generate(&c, &mut cb, &Withhold::nothing(), &mut held) {
                Some(back) => {
                    b.receive_sync(&mut bc, back).unwrap();
                }
                None if b.heads() == c.heads() => break,
                None => {}
            }
        }
        assert_eq!(b.heads(), c.heads(), "converged");
        assert_eq!(c.entries().len(), 62);
        assert_eq!(
            from_encodings, 30,
            "each of B's 30 stored changes went out from its encoding"
        );
    }

    #[test]
    fn heads_alone_wait_when_asked_but_changes_never_do() {
        let (ta, tb, tc) = (NodeTag::of("a"), NodeTag::of("b"), NodeTag::of("c"));
        let (mut a, mut b, mut c) = (doc(), doc(), doc());
        a.set_actor(ta.new_actor());
        b.set_actor(tb.new_actor());
        c.set_actor(tc.new_actor());
        let mut held = HeldBack::default();
        let (mut bc, mut cb) = (sync::State::new(), sync::State::new());
        let quiet = Withhold {
            authors: vec![ta],
            heads: true,
        };
        let mut exchange = |b: &mut ShardDocument, c: &mut ShardDocument, bc: &mut sync::State| {
            let m = generate(b, bc, &Withhold::nothing(), &mut held).unwrap();
            c.receive_sync(&mut cb, m).unwrap();
            if let Some(back) = generate(c, &mut cb, &Withhold::nothing(), &mut held) {
                b.receive_sync(bc, back).unwrap();
            }
        };
        exchange(&mut b, &mut c, &mut bc);

        // B applies a change of A's: its heads moved, but all it could tell
        // C is those heads (A's change is A's to send).
        a.put_allocation_batch("tx_a", [record("tx_a").as_str()].into_iter())
            .unwrap();
        sync_into(&mut a, &mut b);
        let before = bc.clone();
        assert!(generate(&b, &mut bc, &quiet, &mut held).is_none());
        assert_eq!(
            bc, before,
            "a held-back message leaves the sync state untouched"
        );
        // Asked again without `heads`, the same message goes, with no change in it.
        let told = generate(
            &b,
            &mut bc,
            &Withhold {
                heads: false,
                ..quiet.clone()
            },
            &mut held,
        );
        assert!(told.is_some_and(|m| m.changes.is_empty()));

        // A change of B's own goes at once, `heads` or not.
        b.put_allocation_batch("tx_b", [record("tx_b").as_str()].into_iter())
            .unwrap();
        let m = generate(&b, &mut bc, &quiet, &mut held).unwrap();
        assert_eq!(m.changes.len(), 1);
    }

    #[test]
    fn changes_received_by_sync_persist_as_they_came_and_load_back() {
        let mut a = doc();
        a.set_actor(ActorId::from(&[1u8; 16][..]));
        let mut b = doc();
        b.set_actor(ActorId::from(&[2u8; 16][..]));
        let mut stored = b.take_unpersisted().unwrap();
        for round in 0..3 {
            let texts = [
                record(&format!("tx_a{round}")),
                record(&format!("tx_b{round}")),
            ];
            a.put_allocation_batch(&format!("tx_a{round}"), texts.iter().map(String::as_str))
                .unwrap();
            sync_into(&mut a, &mut b);
            assert!(
                !b.received_unpersisted.is_empty(),
                "round {round}: the received chunks are kept for storage"
            );
            stored.extend(b.take_unpersisted().unwrap());
            assert!(b.received_unpersisted.is_empty());
            // A local change after received ones is saved the usual way.
            b.put_allocation_batch(
                &format!("tx_c{round}"),
                [record(&format!("tx_c{round}")).as_str()].into_iter(),
            )
            .unwrap();
            stored.extend(b.take_unpersisted().unwrap());
        }
        assert_eq!(b.take_unpersisted(), None, "nothing left to persist");
        let loaded = ShardDocument::load(b.id(), &stored).unwrap();
        assert_eq!(loaded.heads(), b.heads());
        assert_eq!(loaded.entries().len(), 9);
    }
}
