//! The ledger: every region's allocations of every key, kept side by side.
//!
//! The key space is split over [`SHARD_COUNT`] shards (blake3 of the key
//! picks one) and time into epochs ([`doc_id::Windows`]); each (epoch, shard)
//! is one automerge document. A shard's documents and the in-memory index of
//! its keys sit behind one mutex: one key always lives in one shard on every
//! node, so the conflict check for a key needs one lock and one look-up,
//! whichever epochs its allocations landed in. Remote changes update the
//! index from what changed (automerge's patch log), never from a rescan. Epochs
//! past the retention are dropped whole.
//!
//! A new local allocation enters the index and a per-shard pending list at
//! once, and its record goes to the journal; [`Ledger::fold_pending`] later
//! writes pending allocations into their documents, one automerge op per
//! document and round. The ledger does no I/O: records and new automerge
//! changes go to a [`ChunkSink`], which makes them durable and returns a
//! sequence number the caller waits on before acknowledging.

pub mod coverage;
pub mod doc_id;
pub mod document;
mod encoded_changes;
mod group;
mod key_index;
mod provisional;
pub mod relay;
mod retired;
mod summaries;
mod sync_receive;
mod unsettled;
mod view;

pub use doc_id::{DocId, Windows};
pub use provisional::{Resolution, Stake};
pub use relay::{NodeTag, Withhold};
pub use view::{Allocation, ConflictView, KeyState, KeyView};

use crate::hlc::{Hlc, Observation, Timestamp};
use crate::key::{Fingerprint, IdempotencyKey};
use crate::record::{AllocationRecord, BatchLayout, CompensationRecord, TxnId, RECORD_VERSION};
use crate::storage::Durable;
use crate::time::{Clock, SharedClock};
use automerge::{sync, ActorId};
use document::{DocumentError, Entry, ShardDocument};
use group::{EpochDoc, Group, Pending, NOT_ARRIVED};
use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

/// Number of shards the key space is split over. Part of the data model:
/// every node must use the same number.
pub const SHARD_COUNT: usize = 8;

/// Where new allocations and automerge changes go to become durable.
pub trait ChunkSink: Send + Sync {
    /// Queues a new local allocation (its record JSON, in document `epoch`)
    /// for the durable journal and returns its durable sequence. The
    /// allocation is acknowledged once that sequence is durable, before it
    /// is in any automerge document.
    fn journal(&self, epoch: u32, record: Vec<u8>) -> u64;
    /// Queues the removal of journal entries whose allocations are now in
    /// chunks handed to [`ChunkSink::persist`] before this call.
    fn forget_journal(&self, seqs: Vec<u64>);
    /// Queues `bytes` (automerge change chunks of `doc`) for durable storage
    /// and returns the sequence number that is durable once the storage
    /// watermark reaches it. Called with the shard lock held, so chunks of
    /// one document arrive in order.
    fn persist(&self, doc: DocId, bytes: Vec<u8>) -> u64;
    /// Queues a full save of `doc` that replaces every chunk persisted
    /// before it (compaction); returns its durable sequence.
    fn snapshot(&self, doc: DocId, bytes: Vec<u8>) -> u64;
    /// Forgets a document that has passed the retention, and the
    /// [`ChunkSink::retire`] notes of it.
    fn drop_document(&self, doc: DocId);
    /// Queues a note that the allocations `txns` of `doc` left the ledger
    /// with their key (its winner passed the retention) while `doc` lives
    /// on, so that a restart reading `doc` leaves them out too
    /// ([`Stored::retired`]). Kept until `doc` is dropped.
    fn retire(&self, doc: DocId, txns: Vec<String>);
}

/// Appended chunk bytes below which a document is never compacted.
pub const COMPACT_MIN_BYTES: usize = 4 * 1024 * 1024;

/// A sink that keeps nothing: for in-memory ledgers in tests and tools.
pub struct DiscardSink;

impl ChunkSink for DiscardSink {
    fn journal(&self, _epoch: u32, _record: Vec<u8>) -> u64 {
        0
    }
    fn forget_journal(&self, _seqs: Vec<u64>) {}
    fn persist(&self, _doc: DocId, _bytes: Vec<u8>) -> u64 {
        0
    }
    fn snapshot(&self, _doc: DocId, _bytes: Vec<u8>) -> u64 {
        0
    }
    fn drop_document(&self, _doc: DocId) {}
    fn retire(&self, _doc: DocId, _txns: Vec<String>) {}
}

/// Who this node is, as written into its records.
#[derive(Clone, Debug)]
pub struct NodeIdentity {
    /// Region name.
    pub region: String,
    /// libp2p peer id (text form).
    pub node: String,
}

/// A request to allocate one key, already validated.
#[derive(Clone, Debug)]
pub struct AllocateRequest {
    /// The key.
    pub key: IdempotencyKey,
    /// Fingerprint of the payload.
    pub fingerprint: Fingerprint,
    /// Confidence to record if a new allocation is made.
    pub confidence: f64,
    /// What a new allocation is given, to follow it as provisional until it
    /// resolves (exposure, learning, calibration); `None` not to follow it.
    pub stake: Option<Stake>,
}

/// What an allocate request resulted in.
#[derive(Clone, Debug)]
pub struct Allocated {
    /// The new or existing allocation.
    pub allocation: Allocation,
    /// True when an existing allocation was returned.
    pub replay: bool,
    /// True for the first replay on this node of an allocation another node
    /// made: a near miss, which the confidence model learns from. Repeats of
    /// it can no longer conflict, and counting them would lower confidence.
    pub first_near_miss: bool,
    /// The key as it stood when the request was decided, taken under the
    /// same lock, so the answer shows the key's state without looking it up
    /// again (which waited for the shard lock a second time).
    pub view: Option<KeyView>,
}

/// Why an allocate request was refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum AllocateError {
    /// Same key, different payload: the key is being misused.
    #[error(
        "idempotency key '{key}' was already used with a different payload (transaction {txn_id})"
    )]
    FingerprintMismatch {
        /// The key.
        key: String,
        /// The existing transaction.
        txn_id: String,
    },
    /// The automerge write failed; nothing was written.
    #[error("shard {shard}: could not write the allocation: {reason}")]
    Write {
        /// Shard involved.
        shard: usize,
        /// What failed.
        reason: String,
    },
}

/// What applying remote state changed, for the node to act on.
#[derive(Debug, Default)]
pub struct MergeOutcome {
    /// Allocations new to this node.
    pub new_allocations: Vec<Arc<AllocationRecord>>,
    /// Keys that became conflicted, or whose conflict gained an allocation.
    pub conflicts_changed: Vec<String>,
    /// Records that could not be read (counted, logged, skipped).
    pub malformed: Vec<String>,
    /// Durable sequence of the merged changes (0 when nothing new).
    pub durable_seq: u64,
}

/// Called with what a merge brought in (by the swarm's shell and by
/// `POST /v1/documents/{id}`): the node acts on it (metrics, the confidence
/// model, the compensation engine) without either caller knowing those.
pub type OnMerge = Arc<dyn Fn(&MergeOutcome) + Send + Sync>;

/// Why remote state was not applied.
#[derive(Debug, thiserror::Error)]
pub enum MergeError {
    /// The document's epoch is past the retention here: its records are
    /// expired, so they are not taken back in.
    #[error("{0} is past the retention window; its records are expired here")]
    Expired(DocId),
    /// The document's epoch starts more than a retention after this node's
    /// clock: no working clock writes there, and it would be kept until then.
    #[error(
        "{0} starts more than the retention ahead of this node's clock; check the sender's clock"
    )]
    TooFarAhead(DocId),
    /// The bytes could not be applied.
    #[error(transparent)]
    Document(#[from] DocumentError),
}

/// What a stored document looked like on disk.
pub struct StoredDocument {
    /// Concatenated chunks (a saved document and/or changes).
    pub bytes: Vec<u8>,
}

/// Everything a ledger is opened from.
#[derive(Default)]
pub struct Stored {
    /// Documents by id.
    pub documents: BTreeMap<DocId, StoredDocument>,
    /// Journal entries (allocations not yet in their documents), in order.
    pub journal: Vec<crate::storage::JournalEntry>,
    /// Allocations of live documents that left with their key
    /// ([`ChunkSink::retire`]): not taken back into the index.
    pub retired: Vec<(DocId, String)>,
}

/// The ledger of one node; see the module docs.
pub struct Ledger {
    me: NodeIdentity,
    peers: Vec<String>,
    groups: Vec<Mutex<Group>>,
    hlc: Mutex<Hlc<SharedClock>>,
    clock: SharedClock,
    windows: Windows,
    actor: ActorId,
    sink: Arc<dyn ChunkSink>,
    malformed_total: AtomicU64,
    expired_total: AtomicU64,
    recovered_from_journal: usize,
    names: Names,
    my_region: Arc<str>,
    my_node: Arc<str>,
    /// Own allocations resolved since the node last took them.
    resolutions: Mutex<Vec<Resolution>>,
    /// Whether `resolutions` may hold any, so that an empty take costs no lock.
    resolutions_waiting: std::sync::atomic::AtomicBool,
    /// The peers known to read compact batches, and whether that is all
    /// of them ([`Ledger::set_peer_reads_compact_batches`]).
    compact_readers: Mutex<HashSet<String>>,
    all_read_compact: std::sync::atomic::AtomicBool,
    /// Members' summaries, for settlement beyond the neighbours (`summaries.rs`).
    gossip: Mutex<coverage::Gossip>,
}

impl Ledger {
    /// Opens a ledger from stored documents and the journal of allocations
    /// not yet folded into them. `peers` are the allowlisted peer ids:
    /// settlement waits for all of them. Stored documents already past the
    /// retention are dropped.
    pub fn open(
        me: NodeIdentity,
        peers: Vec<String>,
        clock: SharedClock,
        max_clock_offset_ms: u64,
        windows: Windows,
        stored: Stored,
        sink: Arc<dyn ChunkSink>,
    ) -> Result<Self, DocumentError> {
        // A fresh actor per process (a crash can never reuse a sequence
        // number) that names this node to its peers.
        let actor = NodeTag::of(&me.node).new_actor();
        let no_peers = peers.is_empty();
        let mut hlc = Hlc::new(clock.clone(), max_clock_offset_ms);
        let now = clock.now_ms();
        let mut groups: Vec<Group> = (0..SHARD_COUNT).map(|s| Group::new(s as u8)).collect();
        for group in &mut groups {
            group.follow_settlement = !peers.is_empty();
        }
        let mut malformed = 0;
        let names = Names::default();
        for (doc, txn) in stored.retired {
            if let Some(group) = groups.get_mut(usize::from(doc.shard)) {
                group.retired.insert(TxnId::new(&txn), doc.epoch);
            }
        }
        for (id, stored) in stored.documents {
            if usize::from(id.shard) >= SHARD_COUNT {
                sink.drop_document(id);
                continue;
            }
            // A document already past the retention is read too, and
            // dropped below by the same rule as on a running node: a key
            // whose winner it holds goes with its losers in newer documents.
            let mut doc = match ShardDocument::load(id, &stored.bytes) {
                Ok(doc) => doc,
                Err(e) if windows.expired(id.epoch, now) => {
                    tracing::warn!(%id, error = %e, "dropping an unreadable document past the retention");
                    sink.drop_document(id);
                    continue;
                }
                Err(e) => return Err(e),
            };
            doc.set_actor(actor.clone());
            let entries = doc.entries();
            let group = &mut groups[usize::from(id.shard)];
            group
                .docs
                .insert(id.epoch, EpochDoc::new(doc, stored.bytes.len()));
            for entry in entries {
                match entry {
                    // A batch folded twice (see `ShardDocument::entries`) holds
                    // some transactions twice: each is one allocation.
                    Entry::Allocation(record) if group.known(&record) => {}
                    Entry::Allocation(record) => {
                        // Re-seed the clock so no stamp ever repeats after a restart.
                        hlc.observe_local(record.hlc);
                        let arrival = group.arrive(id.epoch, record.hlc.physical_ms);
                        let record = Arc::new(names.intern(record));
                        if let Some(stake) = recovered_stake(&record, &me) {
                            group.own.admit(&stake);
                            group.own.folded(id.epoch, arrival, record.clone(), stake);
                        }
                        group.insert(id.epoch, record, arrival, Durable::Store(0), now);
                    }
                    Entry::Compensation(record)
                        if group.retired.contains(&TxnId::new(&record.txn_id)) => {}
                    Entry::Compensation(record) => {
                        group.compensations.insert(record.txn_id.clone(), record);
                    }
                    Entry::Malformed { map, key, reason } => {
                        malformed += 1;
                        tracing::warn!(%id, map, key, reason, "skipping malformed record on load");
                    }
                }
            }
        }
        // Acknowledged allocations whose chunk never reached the disk: back
        // into the index and the queue to fold. Those already in a document
        // (the crash fell between chunk and forget) are only forgotten.
        let mut forget = Vec::new();
        let mut recovered = 0;
        for entry in stored.journal {
            let record = match serde_json::from_slice::<AllocationRecord>(&entry.bytes) {
                Ok(record) => Arc::new(names.intern(record)),
                Err(e) => {
                    malformed += 1;
                    tracing::error!(seq = entry.seq, error = %e, "skipping unreadable journal entry");
                    forget.push(entry.seq);
                    continue;
                }
            };
            let group = &mut groups[crate::key::shard_of(&record.key, SHARD_COUNT)];
            if windows.expired(entry.epoch, now) || group.known(&record) {
                forget.push(entry.seq);
                continue;
            }
            hlc.observe_local(record.hlc);
            let durable = Durable::Journal(entry.seq);
            group.insert(entry.epoch, record.clone(), NOT_ARRIVED, durable, now);
            let stake = recovered_stake(&record, &me);
            if let Some(stake) = &stake {
                group.own.admit(stake);
            }
            group.pending.push(Pending {
                epoch: entry.epoch,
                record,
                journal_seq: entry.seq,
                stake,
            });
            recovered += 1;
        }
        if !forget.is_empty() {
            sink.forget_journal(forget);
        }
        let mut resolved = Vec::new();
        for group in &mut groups {
            resolve_loaded_conflicts(group, &me.node, &mut resolved);
        }
        let mut expired = 0;
        for group in &mut groups {
            expired += group.expire(&windows, now, &*sink).1;
        }
        let my_region = names.shared(&me.region);
        let my_node = names.shared(&me.node);
        Ok(Self {
            me,
            my_region,
            my_node,
            peers,
            groups: groups.into_iter().map(Mutex::new).collect(),
            hlc: Mutex::new(hlc),
            clock,
            windows,
            actor,
            sink,
            malformed_total: AtomicU64::new(malformed),
            expired_total: AtomicU64::new(expired),
            recovered_from_journal: recovered,
            names,
            resolutions_waiting: std::sync::atomic::AtomicBool::new(!resolved.is_empty()),
            resolutions: Mutex::new(resolved),
            all_read_compact: std::sync::atomic::AtomicBool::new(no_peers),
            compact_readers: Mutex::new(HashSet::new()),
            gossip: Mutex::new(coverage::Gossip::default()),
        })
    }

    /// An empty in-memory ledger with the default retention, for tests and tools.
    pub fn in_memory(me: NodeIdentity, peers: Vec<String>) -> Self {
        // Nothing stored, so nothing can fail to load.
        match Self::open(
            me,
            peers,
            Arc::new(crate::time::SystemClock),
            500,
            Windows::default(),
            Stored::default(),
            Arc::new(DiscardSink),
        ) {
            Ok(ledger) => ledger,
            Err(e) => unreachable!("empty ledger failed to open: {e}"),
        }
    }

    /// Writes from now on with the actor `suffix` names (see
    /// [`NodeTag::actor_with`]) instead of a random one: for the simulator,
    /// which must give each process a fresh actor yet reproduce a run from
    /// its seed.
    pub fn use_actor_suffix(&mut self, suffix: [u8; 8]) {
        self.actor = NodeTag::of(&self.me.node).actor_with(suffix);
        for group in &mut self.groups {
            let group = group.get_mut().unwrap_or_else(|p| p.into_inner());
            for doc in group.docs.values_mut() {
                doc.doc.set_actor(self.actor.clone());
            }
        }
    }

    /// Acknowledged allocations that were found only in the journal when the
    /// ledger was opened, and are folded into their documents again.
    pub fn recovered_from_journal(&self) -> usize {
        self.recovered_from_journal
    }

    /// This node's identity.
    pub fn identity(&self) -> &NodeIdentity {
        &self.me
    }

    /// The allowlisted peers settlement waits for.
    pub fn peers(&self) -> &[String] {
        &self.peers
    }

    /// How this ledger cuts time.
    pub fn windows(&self) -> Windows {
        self.windows
    }

    fn group(&self, shard: usize) -> MutexGuard<'_, Group> {
        // A panic while holding the lock cannot leave a document half-written
        // (automerge transactions are atomic), so a poisoned lock is usable.
        self.groups[shard % SHARD_COUNT]
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn hlc(&self) -> MutexGuard<'_, Hlc<SharedClock>> {
        self.hlc.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Current wall-clock milliseconds as the HLC's physical clock reads them.
    pub fn wall_ms(&self) -> u64 {
        self.clock.now_ms()
    }

    /// The node's HLC reading, for health and skew reports.
    pub fn clock(&self) -> ClockStatus {
        let hlc = self.hlc();
        ClockStatus {
            last: hlc.last(),
            skew_violations: hlc.skew_violations(),
            max_observed_offset_ms: hlc.max_observed_offset_ms(),
            max_offset_ms: hlc.max_offset_ms(),
        }
    }

    /// A fresh HLC stamp for an outgoing message.
    pub fn stamp(&self) -> Timestamp {
        self.hlc().now()
    }

    /// Feeds a timestamp a peer sent directly (not inside a record).
    pub fn observe_remote_clock(&self, ts: Timestamp) -> Observation {
        self.hlc().update(ts)
    }

    /// Allocates (or replays) a batch of keys that all live in `shard`.
    ///
    /// The epoch a new allocation stamped `hlc` goes in: its physical time's,
    /// as docs/DATA_MODEL.md says, but never more than the allowed clock
    /// offset past this node's wall clock. A peer whose clock runs far ahead
    /// drags every clock it talks to (stamps are merged, not refused); were
    /// the epoch to follow, healthy nodes would write documents so far ahead
    /// that their peers refuse them, and stop seeing each other's allocations.
    fn epoch_for(&self, hlc: Timestamp) -> u32 {
        let limit = self.wall_ms().saturating_add(self.hlc().max_offset_ms());
        self.windows.epoch_of(hlc.physical_ms.min(limit))
    }

    /// A new allocation goes into the key index (so replays and conflicts
    /// see it at once) and into the durable journal; the caller answers once
    /// the journal entry is durable. No automerge work happens here: the
    /// allocations are written into their documents later, many per change,
    /// by [`Ledger::fold_pending`].
    pub fn allocate_batch(
        &self,
        shard: usize,
        requests: &[AllocateRequest],
    ) -> Vec<Result<Allocated, AllocateError>> {
        let mut guard = self.group(shard);
        self.allocate_locked(&mut guard, requests)
    }

    /// [`Ledger::allocate_batch`] if the shard's lock is free right now;
    /// `None` while it is held (folding, or applying a peer's changes), so
    /// an async caller never blocks its thread on it.
    pub fn try_allocate_batch(
        &self,
        shard: usize,
        requests: &[AllocateRequest],
    ) -> Option<Vec<Result<Allocated, AllocateError>>> {
        let mut guard = match self.groups[shard % SHARD_COUNT].try_lock() {
            Ok(guard) => guard,
            Err(std::sync::TryLockError::Poisoned(poisoned)) => poisoned.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => return None,
        };
        Some(self.allocate_locked(&mut guard, requests))
    }

    fn allocate_locked(
        &self,
        group: &mut Group,
        requests: &[AllocateRequest],
    ) -> Vec<Result<Allocated, AllocateError>> {
        let mut out = Vec::with_capacity(requests.len());
        for request in requests {
            let key = request.key.as_str();
            // A key repeated inside the batch sees the allocation made just before.
            if let Some(existing) = group.keys.get_mut(key) {
                let found = match_existing(key, existing, &request.fingerprint).map(|at| {
                    let found = &mut existing[at];
                    let first_replay = !std::mem::replace(&mut found.replayed_here, true);
                    let first_near_miss = first_replay && found.record.node != self.my_node;
                    (found.clone(), first_near_miss)
                });
                out.push(found.map(|(allocation, first_near_miss)| Allocated {
                    allocation,
                    replay: true,
                    first_near_miss,
                    view: group.view(key, &self.peers),
                }));
                continue;
            }
            let hlc = self.hlc().now();
            let epoch = self.epoch_for(hlc);
            let record = Arc::new(AllocationRecord {
                v: RECORD_VERSION,
                key: key.into(),
                txn_id: AllocationRecord::derive_txn_id(&self.me.node, hlc, key),
                region: self.my_region.clone(),
                node: self.my_node.clone(),
                hlc,
                fingerprint: request.fingerprint.to_record(),
                confidence: request.confidence.clamp(0.0, 1.0),
            });
            let text = document::record_json(&*record);
            let journal_seq = self.sink.journal(epoch, text.as_bytes().to_vec());
            let durable = Durable::Journal(journal_seq);
            group.insert(epoch, record.clone(), NOT_ARRIVED, durable, 0);
            if let Some(stake) = &request.stake {
                group.own.admit(stake);
            }
            group.pending.push(Pending {
                epoch,
                record: record.clone(),
                journal_seq,
                stake: request.stake,
            });
            out.push(Ok(Allocated {
                allocation: Allocation {
                    record,
                    epoch,
                    replayed_here: false,
                    arrival: NOT_ARRIVED,
                    durable,
                },
                replay: false,
                first_near_miss: false,
                view: group.view(key, &self.peers),
            }));
        }
        out
    }

    /// Writes every pending local allocation into its document: per shard
    /// and epoch one automerge change and one durable chunk, then forgets
    /// their journal entries (queued after the chunks, so an entry is never
    /// forgotten before its chunk is on disk). Returns how many allocations
    /// were folded.
    pub fn fold_pending(&self) -> usize {
        let mut folded = 0;
        for shard in 0..SHARD_COUNT {
            let mut guard = self.group(shard);
            folded += self.fold_group(shard, &mut guard).0;
        }
        folded
    }

    /// [`Ledger::fold_pending`] for one shard, under its lock; returns how
    /// many were folded and the durable sequence of the last chunk.
    fn fold_group(&self, shard: usize, group: &mut Group) -> (usize, u64) {
        let (mut folded, mut last_seq) = (0, 0);
        if group.pending.is_empty() {
            return (0, 0);
        }
        let pending = std::mem::take(&mut group.pending);
        let mut by_epoch: BTreeMap<u32, Vec<Pending>> = BTreeMap::new();
        let mut forget = Vec::with_capacity(pending.len());
        for entry in pending {
            // Gone from the index: past the retention meanwhile (its own
            // epoch, or its key's winner's).
            if group.contains(&entry.record) {
                by_epoch.entry(entry.epoch).or_default().push(entry);
            } else {
                if let Some(stake) = &entry.stake {
                    group.own.forget(stake);
                }
                forget.push(entry.journal_seq);
            }
        }
        let layout = self.batch_layout();
        for (epoch, entries) in by_epoch {
            let doc = group.doc_mut(epoch, &self.actor);
            let batch_id = document::batch_id(&entries[0].record);
            let records: Vec<&AllocationRecord> = entries.iter().map(|e| &*e.record).collect();
            let batch = AllocationRecord::write_batch(&records, layout);
            let written = doc.doc.put_batch_text(&batch_id, &batch);
            if let Err(e) = written {
                // Still durable in the journal: try again next round.
                tracing::error!(shard, epoch, error = %e, "could not fold allocations into their document; will retry");
                group.pending.extend(entries);
                continue;
            }
            last_seq = last_seq.max(doc.persist(&*self.sink));
            for entry in entries {
                let arrival = group.arrive_folded(epoch, &entry.record);
                if let Some(stake) = entry.stake {
                    group.own.folded(epoch, arrival, entry.record, stake);
                }
                forget.push(entry.journal_seq);
                folded += 1;
            }
        }
        if !forget.is_empty() {
            self.sink.forget_journal(forget);
        }
        (folded, last_seq)
    }

    /// Notes whether `peer` reads batches in the compact layout (it said
    /// so when it connected: the p2p layer learns it from the protocols
    /// the peer offers). This node writes its batches compact once every
    /// allowlisted peer does, and as objects, which every version reads,
    /// until then: during a rolling upgrade no peer is handed records it
    /// cannot read (it would miss their keys, and so their conflicts).
    pub fn set_peer_reads_compact_batches(&self, peer: &str, reads: bool) {
        let Ok(mut readers) = self.compact_readers.lock() else {
            return;
        };
        if reads {
            readers.insert(peer.to_owned());
        } else {
            readers.remove(peer);
        }
        let all = self.peers.iter().all(|p| readers.contains(p));
        self.all_read_compact.store(all, Ordering::Relaxed);
    }

    /// The layout this node writes its batches in now.
    pub fn batch_layout(&self) -> BatchLayout {
        if self.all_read_compact.load(Ordering::Relaxed) {
            BatchLayout::Compact
        } else {
            BatchLayout::Objects
        }
    }

    /// Local allocations not yet folded into their documents.
    pub fn pending_count(&self) -> usize {
        (0..SHARD_COUNT).map(|s| self.group(s).pending.len()).sum()
    }

    /// Runs one automerge sync message from `peer` into `doc`. The sync state
    /// of each (peer, document) lives beside the document, under the same
    /// lock, so the network task never holds document state of its own.
    pub fn receive_sync(
        &self,
        doc: DocId,
        peer: &str,
        message: sync::Message,
    ) -> Result<MergeOutcome, MergeError> {
        self.apply_remote(doc, |state| {
            let peer_doc = state.peers.entry(peer.to_owned()).or_default();
            state.doc.receive_sync(&mut peer_doc.sync, message)
        })
    }

    /// Merges automerge bytes (a saved document or changes) into `doc`.
    pub fn merge_bytes(&self, doc: DocId, bytes: &[u8]) -> Result<MergeOutcome, MergeError> {
        self.apply_remote(doc, |state| state.doc.merge_bytes(bytes))
    }

    fn apply_remote<F>(&self, id: DocId, apply: F) -> Result<MergeOutcome, MergeError>
    where
        F: FnOnce(&mut EpochDoc) -> Result<Vec<Entry>, DocumentError>,
    {
        let now = self.wall_ms();
        if self.windows.expired(id.epoch, now) {
            return Err(MergeError::Expired(id));
        }
        if self.windows.too_far_ahead(id.epoch, now) {
            return Err(MergeError::TooFarAhead(id));
        }
        let mut guard = self.group(usize::from(id.shard));
        let group = &mut *guard;
        let created = !group.docs.contains_key(&id.epoch);
        let state = group.doc_mut(id.epoch, &self.actor);
        let entries = match apply(state) {
            Ok(entries) => entries,
            Err(e) => {
                // Bytes that could not be applied leave no empty document behind.
                if created {
                    group.docs.remove(&id.epoch);
                }
                return Err(e.into());
            }
        };
        let mut outcome = MergeOutcome::default();
        if entries.is_empty() {
            return Ok(outcome);
        }
        let mut last_names = LastInterned::default();
        let mut resolved = Vec::new();
        let mut competes_with_pending = false;
        let seq = state.persist(&*self.sink);
        outcome.durable_seq = seq;
        for entry in entries {
            match entry {
                Entry::Allocation(record) => {
                    if group.known(&record) {
                        continue;
                    }
                    // Every remote stamp advances our clock (and counts skew).
                    self.hlc().update(record.hlc);
                    let arrival = group.arrive(id.epoch, record.hlc.physical_ms);
                    let durable = Durable::Store(seq);
                    let record = Arc::new(self.names.intern_after(record, &mut last_names));
                    if group.insert(id.epoch, record.clone(), arrival, durable, now) {
                        outcome.conflicts_changed.push(record.key.to_string());
                        competes_with_pending |=
                            self.resolve_own_competitors(group, &record, &mut resolved);
                    }
                    outcome.new_allocations.push(record);
                }
                Entry::Compensation(record) => {
                    if !group.retired.contains(&TxnId::new(&record.txn_id)) {
                        group.compensations.insert(record.txn_id.clone(), record);
                    }
                }
                Entry::Malformed { map, key, reason } => {
                    self.malformed_total.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(%id, map, key, reason, "dropping malformed remote record");
                    outcome.malformed.push(key);
                }
            }
        }
        // An allocation of ours that a peer's competes with, not yet in its
        // document: folded now, so that the digests this merge is answered
        // with cannot show the peer a copy without it (it would take them
        // for "nothing competes" and call its own allocation settled).
        if competes_with_pending {
            let (_, seq) = self.fold_group(usize::from(id.shard), group);
            outcome.durable_seq = outcome.durable_seq.max(seq);
        }
        self.hand_over(resolved);
        Ok(outcome)
    }

    /// [`resolve_own_competitors`] with this node's id.
    fn resolve_own_competitors(
        &self,
        group: &mut Group,
        arrived: &AllocationRecord,
        out: &mut Vec<Resolution>,
    ) -> bool {
        resolve_own_competitors(group, &self.my_node, arrived, out)
    }

    /// Queues resolutions for [`Ledger::take_resolutions`].
    fn hand_over(&self, resolved: Vec<Resolution>) {
        if resolved.is_empty() {
            return;
        }
        self.resolutions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend(resolved);
        self.resolutions_waiting.store(true, Ordering::Release);
    }

    /// This node's allocations that resolved (settled, or met a competitor)
    /// since the last call, for the confidence model and the calibration score.
    pub fn take_resolutions(&self) -> Vec<Resolution> {
        if !self.resolutions_waiting.swap(false, Ordering::AcqRel) {
            return Vec::new();
        }
        std::mem::take(&mut *self.resolutions.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// The exposure of this node's provisional allocations, summed over shards.
    pub fn exposure(&self) -> crate::exposure::ExposureSums {
        let mut sums = crate::exposure::ExposureSums::default();
        for shard in 0..SHARD_COUNT {
            sums.merge(self.group(shard).own.sums());
        }
        sums
    }

    /// Writes compensation records (only ever for this node's own losers),
    /// each into the document of its losing allocation, as one automerge
    /// change per document however many records go into it. A loser that
    /// left with its key (retired) still has its document for a while: its
    /// state goes there, for peers that still show the conflict. A loser in
    /// no live document here is past the retention with its key, and no
    /// report can show it: its record is not written. A document that fails
    /// does not keep the others from being written; the first failure is
    /// returned.
    pub fn put_compensations(&self, records: &[CompensationRecord]) -> Result<(), DocumentError> {
        let mut by_shard: BTreeMap<usize, Vec<&CompensationRecord>> = BTreeMap::new();
        for record in records {
            let shard = crate::key::shard_of(&record.key, SHARD_COUNT);
            by_shard.entry(shard).or_default().push(record);
        }
        let mut first_error = None;
        for (shard, records) in by_shard {
            let mut guard = self.group(shard);
            let group = &mut *guard;
            let mut by_epoch: BTreeMap<u32, Vec<&CompensationRecord>> = BTreeMap::new();
            for record in records {
                let epoch = group
                    .keys
                    .get(&record.key)
                    .and_then(|l| l.iter().find(|a| a.record.txn_id == record.txn_id))
                    .map(|a| a.epoch)
                    .or_else(|| group.retired.epoch_of(&TxnId::new(&record.txn_id)));
                if let Some(epoch) = epoch {
                    by_epoch.entry(epoch).or_default().push(record);
                }
            }
            for (epoch, records) in by_epoch {
                let doc = group.doc_mut(epoch, &self.actor);
                if let Err(e) = doc.doc.put_compensations(records.iter().copied()) {
                    first_error.get_or_insert(e);
                    continue;
                }
                doc.persist(&*self.sink);
                for record in records {
                    if !group.retired.contains(&TxnId::new(&record.txn_id)) {
                        group
                            .compensations
                            .insert(record.txn_id.clone(), record.clone());
                    }
                }
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    /// The next sync message of `doc` for `peer`, encoded, if it needs one.
    /// `unstick` clears the "message in flight" flag first: used when the
    /// peer's digest shows it still differs although nothing is under way
    /// (a message was lost with a connection). Changes by the authors in
    /// `withhold` are left to them (see [`relay`]).
    pub fn generate_sync(
        &self,
        doc: DocId,
        peer: &str,
        unstick: bool,
        withhold: &Withhold,
    ) -> Option<Vec<u8>> {
        let now_ms = self.wall_ms();
        let mut guard = self.group(usize::from(doc.shard));
        let state = guard.docs.get_mut(&doc.epoch)?;
        let peer_doc = state.peers.entry(peer.to_owned()).or_default();
        if unstick {
            peer_doc.sync.in_flight = false;
        }
        state
            .doc
            .generate_sync(&mut peer_doc.sync, withhold, &mut peer_doc.held, now_ms)
    }

    /// Starts a new sync session with `peer` (after a reconnect or a failed
    /// request): keeps what both sides are known to share, forgets what was
    /// in flight and which summaries the peer was told.
    pub fn reset_sync(&self, peer: &str) {
        self.gossip
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .forget(peer);
        for shard in 0..SHARD_COUNT {
            let mut guard = self.group(shard);
            for doc in guard.docs.values_mut() {
                if let Some(peer_doc) = doc.peers.get_mut(peer) {
                    let state = &mut peer_doc.sync;
                    *state = sync::State::decode(&state.encode()).unwrap_or_default();
                }
            }
        }
    }

    /// Compares `peer`'s digests with ours, shard by shard, and returns the
    /// documents whose copies are identical. Where every live document of a
    /// shard is identical on both sides, records that the peer holds
    /// everything that arrived here so far and that we hold all of the
    /// peer's copies as of this moment. All of a shard, not each document
    /// alone: a key's allocations may lie in two documents (a retry that
    /// straddles a window), so an allocation is settled only once no
    /// document of its shard can hold a competitor we have not seen.
    /// Compared under the shard lock, so no allocation can slip in between
    /// the comparison and the record.
    pub fn mark_in_sync(&self, peer: &str, theirs: &[(DocId, [u8; 32])]) -> BTreeSet<DocId> {
        let now = self.wall_ms();
        let mut by_shard: BTreeMap<u8, BTreeMap<u32, [u8; 32]>> = BTreeMap::new();
        for (doc, digest) in theirs {
            if usize::from(doc.shard) < SHARD_COUNT && !self.windows.expired(doc.epoch, now) {
                by_shard
                    .entry(doc.shard)
                    .or_default()
                    .insert(doc.epoch, *digest);
            }
        }
        let mut in_sync = BTreeSet::new();
        for (shard, theirs) in by_shard {
            let mut guard = self.group(usize::from(shard));
            let equal: Vec<u32> = guard
                .docs
                .iter()
                .filter(|(epoch, state)| theirs.get(epoch) == Some(&state.doc.digest()))
                .map(|(epoch, _)| *epoch)
                .collect();
            in_sync.extend(equal.iter().map(|&epoch| DocId { epoch, shard }));
            let whole = equal.len() == guard.docs.len() && equal.len() == theirs.len();
            if !whole {
                continue;
            }
            for &epoch in &equal {
                let Some(state) = guard.docs.get_mut(&epoch) else {
                    continue;
                };
                let arrivals = state.arrivals;
                state
                    .peers
                    .entry(peer.to_owned())
                    .or_default()
                    .synced_arrival = Some(arrivals);
            }
            let settled = self.settle(&mut guard, &equal);
            drop(guard);
            self.hand_over(settled);
        }
        in_sync
    }

    /// Every live document with its digest, in id order.
    pub fn digests(&self) -> Vec<(DocId, [u8; 32])> {
        let mut out = Vec::new();
        for shard in 0..SHARD_COUNT {
            let guard = self.group(shard);
            for (epoch, doc) in &guard.docs {
                out.push((
                    DocId {
                        epoch: *epoch,
                        shard: shard as u8,
                    },
                    doc.doc.digest(),
                ));
            }
        }
        out.sort_by_key(|(id, _)| *id);
        out
    }

    /// Heads of a document (`None` if this node has no such document).
    pub fn heads(&self, doc: DocId) -> Option<Vec<automerge::ChangeHash>> {
        let guard = self.group(usize::from(doc.shard));
        guard.docs.get(&doc.epoch).map(|d| d.doc.heads())
    }

    /// Store delta with `peer` summed over documents, from the sync states:
    /// (changes the peer lacks, heads of the peer we have never seen).
    /// While the peer is away (its session reset), what it lacks is counted
    /// from the heads it last shared with us, and a document it never
    /// synced counts whole, so the delta to a cut-off peer grows instead of
    /// reading 0.
    pub fn delta(&self, peer: &str) -> (usize, usize) {
        let (mut they_lack, mut we_lack) = (0, 0);
        for shard in 0..SHARD_COUNT {
            let guard = self.group(shard);
            for doc in guard.docs.values() {
                let peer_doc = doc.peers.get(peer);
                // Identical copies since the last record arrived here: the
                // heads it last sent may be older than what it holds.
                if peer_doc.is_some_and(|p| p.synced_arrival == Some(doc.arrivals)) {
                    continue;
                }
                match peer_doc.map(|p| p.sync.their_heads.as_ref().unwrap_or(&p.sync.shared_heads))
                {
                    Some(heads) => {
                        they_lack += doc.doc.changes_missing_from(heads);
                        we_lack += doc.doc.unknown_heads(heads);
                    }
                    // Never synced with the peer: it lacks every change but
                    // the genesis, which every node makes itself.
                    None => they_lack += doc.doc.changes_missing_from(&[]).saturating_sub(1),
                }
            }
        }
        (they_lack, we_lack)
    }

    /// A whole document as `Automerge::save` writes it (`None` if unknown here).
    pub fn save_document(&self, doc: DocId) -> Option<Vec<u8>> {
        let guard = self.group(usize::from(doc.shard));
        guard.docs.get(&doc.epoch).map(|d| d.doc.save())
    }

    /// Compacts every document whose chunks are due for it (see
    /// `EpochDoc::compact_if_due`); called about once a second.
    /// Returns how many documents were compacted.
    pub fn compact_due(&self) -> usize {
        let mut compacted = 0;
        for shard in 0..SHARD_COUNT {
            let mut group = self.group(shard);
            for doc in group.docs.values_mut() {
                if doc.compact_if_due(&*self.sink) > 0 {
                    compacted += 1;
                }
            }
        }
        compacted
    }

    /// Allocations dropped by retention expiry since start: changes after
    /// each expiry, so work that follows expiry can wait for it to move.
    pub fn expired_allocations(&self) -> u64 {
        self.expired_total.load(Ordering::Relaxed)
    }

    /// Drops every document past the retention, with its allocations,
    /// conflicts and compensations, here and on disk; a key whose winner
    /// goes takes its losers in newer documents with it (docs/DATA_MODEL.md,
    /// "Retention"). Returns the dropped documents.
    pub fn expire(&self) -> Vec<DocId> {
        let now = self.wall_ms();
        let mut dropped_docs = Vec::new();
        for shard in 0..SHARD_COUNT {
            let (docs, allocations) = self.group(shard).expire(&self.windows, now, &*self.sink);
            self.expired_total.fetch_add(allocations, Ordering::Relaxed);
            dropped_docs.extend(docs);
        }
        dropped_docs
    }

    /// Everything known about one key, or `None` when it is unknown here.
    pub fn key(&self, key: &str) -> Option<KeyView> {
        let shard = crate::key::shard_of(key, SHARD_COUNT);
        self.group(shard).view(key, &self.peers)
    }

    /// The conflict report: one view per conflicted key, in key order.
    pub fn conflicts(&self) -> Vec<ConflictView> {
        let mut out = Vec::new();
        for shard in 0..SHARD_COUNT {
            let guard = self.group(shard);
            for (key, detected_at_ms) in &guard.conflicts {
                if let Some(view) = guard.view(key, &self.peers) {
                    out.push(ConflictView {
                        detected_at_ms: *detected_at_ms,
                        key: view,
                    });
                }
            }
        }
        out.sort_by(|a, b| a.key.key.cmp(&b.key.key));
        out
    }

    /// Counts for health and metrics, a few operations per shard and
    /// document: keys, allocations, conflicts and documents are kept
    /// counted, and so are the arrivals not yet on every peer
    /// (`ledger/unsettled.rs`), so no call walks the keys.
    pub fn stats(&self) -> LedgerStats {
        let mut stats = LedgerStats {
            malformed_records: self.malformed_total.load(Ordering::Relaxed),
            expired_allocations: self.expired_total.load(Ordering::Relaxed),
            ..LedgerStats::default()
        };
        for shard in 0..SHARD_COUNT {
            let guard = self.group(shard);
            stats.documents += guard.docs.len() as u64;
            stats.keys += guard.keys.len() as u64;
            stats.conflicts += guard.conflicts.len() as u64;
            stats.allocations += guard.allocations;
            let (provisional, oldest) = guard.provisional();
            stats.provisional += provisional;
            if let Some(ms) = oldest {
                stats.oldest_provisional_ms =
                    Some(stats.oldest_provisional_ms.map_or(ms, |o: u64| o.min(ms)));
            }
        }
        stats
    }
}

/// The node's clock as the health report shows it.
#[derive(Clone, Debug, serde::Serialize)]
pub struct ClockStatus {
    /// Last HLC stamp issued or observed.
    pub last: Timestamp,
    /// Remote stamps that were further ahead than allowed.
    pub skew_violations: u64,
    /// Largest offset of a remote stamp ahead of local time, in ms.
    pub max_observed_offset_ms: i64,
    /// The configured bound.
    pub max_offset_ms: u64,
}

/// Ledger-wide counts.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct LedgerStats {
    /// Distinct keys.
    pub keys: u64,
    /// Allocations (more than keys when there are conflicts).
    pub allocations: u64,
    /// Keys with more than one allocation.
    pub conflicts: u64,
    /// Keys with one allocation not yet settled.
    pub provisional: u64,
    /// HLC physical ms of the oldest provisional allocation (the first
    /// unsettled one in each document's arrival order).
    pub oldest_provisional_ms: Option<u64>,
    /// Records refused as malformed since start.
    pub malformed_records: u64,
    /// Live documents (shards times live epochs).
    pub documents: u64,
    /// Allocations dropped since start because they passed the retention.
    pub expired_allocations: u64,
}

/// What an allocation of this node read back from disk is followed with: one
/// given confidence 1 cannot be a duplicate and adds nothing to the exposure.
fn recovered_stake(record: &AllocationRecord, me: &NodeIdentity) -> Option<Stake> {
    (*record.node == *me.node && record.confidence < 1.0)
        .then(|| Stake::recovered(record.confidence))
}

/// `arrived` competes with allocations of its key: those of `my_node`
/// among them are resolved, as conflicted. Returns whether one of ours is
/// still pending.
fn resolve_own_competitors(
    group: &mut Group,
    my_node: &str,
    arrived: &AllocationRecord,
    out: &mut Vec<Resolution>,
) -> bool {
    if *arrived.node == *my_node {
        return false;
    }
    let Some(list) = group.keys.get(&arrived.key) else {
        return false;
    };
    let ours: Vec<(u32, u64, Arc<AllocationRecord>)> = list
        .iter()
        .filter(|a| *a.record.node == *my_node)
        .map(|a| (a.epoch, a.arrival, a.record.clone()))
        .collect();
    let mut pending = false;
    for (epoch, arrival, record) in ours {
        let after_ms = record.hlc.physical_ms.abs_diff(arrived.hlc.physical_ms);
        if arrival != NOT_ARRIVED {
            group.own.conflicted(epoch, arrival, &record, after_ms, out);
            continue;
        }
        pending = true;
        let stake = group
            .pending
            .iter_mut()
            .find(|p| Arc::ptr_eq(&p.record, &record))
            .and_then(|p| p.stake.take());
        if let Some(stake) = stake {
            group.own.conflicted_pending(&record, stake, after_ms, out);
        }
    }
    pending
}

/// At start: this node's allocations whose key already holds a competitor
/// are resolved as conflicted, as the merge that brought the competitor
/// did before the restart, so that they leave the exposure and are not
/// later called settled.
fn resolve_loaded_conflicts(group: &mut Group, my_node: &str, out: &mut Vec<Resolution>) {
    let keys: Vec<String> = group.conflicts.keys().cloned().collect();
    for key in keys {
        let rival = group.keys.get(key.as_str()).and_then(|list| {
            list.iter()
                .find(|a| *a.record.node != *my_node)
                .map(|a| a.record.clone())
        });
        if let Some(rival) = rival {
            resolve_own_competitors(group, my_node, &rival, out);
        }
    }
}

/// Where in `existing` (a key's allocations) the one with `fingerprint` is,
/// in whichever scheme its record was written.
fn match_existing(
    key: &str,
    existing: &[Allocation],
    fingerprint: &Fingerprint,
) -> Result<usize, AllocateError> {
    // Allocations are kept in precedence order, so the first match is the
    // winner whenever the winner matches.
    match existing
        .iter()
        .position(|a| fingerprint.matches(&a.record.fingerprint))
    {
        Some(at) => Ok(at),
        None => Err(AllocateError::FingerprintMismatch {
            key: key.to_owned(),
            txn_id: existing
                .first()
                .map(|a| a.record.txn_id.to_string())
                .unwrap_or_default(),
        }),
    }
}

/// Most distinct region and node names a ledger shares.
const MAX_NAMES: usize = 4096;

/// Region and node names, shared: every record of a node repeats them, and a
/// ledger holds every live record in memory.
#[derive(Default)]
struct Names(Mutex<std::collections::HashSet<Arc<str>>>);

impl Names {
    /// The shared copy of `name`. Past [`MAX_NAMES`] distinct names (a
    /// peer writing made-up ones) a name is no longer kept, so the set
    /// stays bounded whatever peers send.
    fn shared(&self, name: &str) -> Arc<str> {
        let mut names = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(known) = names.get(name) {
            return known.clone();
        }
        let name: Arc<str> = name.into();
        if names.len() < MAX_NAMES {
            names.insert(name.clone());
        }
        name
    }

    /// `record` with its region and node names shared.
    fn intern(&self, record: AllocationRecord) -> AllocationRecord {
        self.intern_after(record, &mut LastInterned::default())
    }

    /// Like [`Names::intern`], but a name that is the very string of the
    /// previous record's (records of one batch share theirs) is shared
    /// without a look-up.
    fn intern_after(
        &self,
        mut record: AllocationRecord,
        last: &mut LastInterned,
    ) -> AllocationRecord {
        record.region = self.shared_after(&record.region, &mut last.region);
        record.node = self.shared_after(&record.node, &mut last.node);
        record
    }

    fn shared_after(&self, name: &Arc<str>, last: &mut Option<(Arc<str>, Arc<str>)>) -> Arc<str> {
        match last {
            Some((read, shared)) if Arc::ptr_eq(read, name) => shared.clone(),
            _ => {
                let shared = self.shared(name);
                *last = Some((name.clone(), shared.clone()));
                shared
            }
        }
    }
}

/// The names of the previous record: (as read, shared copy).
#[derive(Default)]
struct LastInterned {
    region: Option<(Arc<str>, Arc<str>)>,
    node: Option<(Arc<str>, Arc<str>)>,
}

#[cfg(test)]
mod tests {
    use super::document::{batch_id, record_json, ShardDocument};
    use super::*;
    use crate::hlc::Timestamp;
    use crate::key::IdempotencyKey;
    use crate::record::RECORD_VERSION;

    fn ledger_at(node: &str, peer: &str, clock: &crate::time::ManualClock) -> Ledger {
        Ledger::open(
            NodeIdentity {
                region: node.into(),
                node: node.into(),
            },
            vec![peer.into()],
            Arc::new(clock.clone()),
            500,
            Windows::for_retention(10_000),
            Stored::default(),
            Arc::new(DiscardSink),
        )
        .unwrap()
    }

    /// `a` and `b` each allocate the same key with a different payload.
    fn allocate_competing(a: &Ledger, b: &Ledger) {
        let key = IdempotencyKey::parse("same-key").unwrap();
        for (ledger, amount) in [(a, 1), (b, 2)] {
            let out = ledger.allocate_batch(
                key.shard(SHARD_COUNT),
                &[AllocateRequest {
                    key: key.clone(),
                    fingerprint: crate::key::fingerprint(&serde_json::json!({ "amount": amount }))
                        .unwrap(),
                    confidence: 0.9,
                    stake: None,
                }],
            );
            assert!(out[0].is_ok());
            ledger.fold_pending();
        }
    }

    /// Every document of `from` merged into `to`.
    fn send_all(from: &Ledger, to: &Ledger) {
        for (doc, _) in from.digests() {
            if let Some(bytes) = from.save_document(doc) {
                to.merge_bytes(doc, &bytes).unwrap();
            }
        }
    }

    /// The first character of every batch `ledger`'s documents hold.
    fn batch_openings(ledger: &Ledger) -> Vec<char> {
        use automerge::ReadDoc;
        let mut out = Vec::new();
        for (doc, _) in ledger.digests() {
            let saved = automerge::Automerge::load(&ledger.save_document(doc).unwrap()).unwrap();
            let Ok(Some((_, batches))) = saved.get(automerge::ROOT, "allocations") else {
                continue;
            };
            for item in saved.map_range(&batches, ..) {
                let text = item
                    .value
                    .into_value()
                    .as_str()
                    .unwrap_or_default()
                    .to_owned();
                out.extend(text.chars().next());
            }
        }
        out.sort_unstable();
        out
    }

    fn allocate_one(ledger: &Ledger, key: &str) {
        let key = IdempotencyKey::parse(key).unwrap();
        let out = ledger.allocate_batch(
            key.shard(SHARD_COUNT),
            &[AllocateRequest {
                key: key.clone(),
                fingerprint: crate::key::fingerprint(&serde_json::json!({})).unwrap(),
                confidence: 0.9,
                stake: None,
            }],
        );
        assert!(out[0].is_ok());
        ledger.fold_pending();
    }

    #[test]
    fn batches_are_written_as_objects_until_every_peer_reads_the_compact_layout() {
        let clock = crate::time::ManualClock::at(1_000_000);
        let (a, b) = (ledger_at("a", "b", &clock), ledger_at("b", "a", &clock));
        assert_eq!(a.batch_layout(), BatchLayout::Objects);
        allocate_one(&a, "before");
        assert_eq!(batch_openings(&a), ['[']);
        a.set_peer_reads_compact_batches("someone-else", true);
        assert_eq!(
            a.batch_layout(),
            BatchLayout::Objects,
            "not an allowlisted peer"
        );
        a.set_peer_reads_compact_batches("b", true);
        assert_eq!(a.batch_layout(), BatchLayout::Compact);
        allocate_one(&a, "after");
        assert_eq!(batch_openings(&a), ['[', '{']);
        send_all(&a, &b);
        for key in ["before", "after"] {
            let view = b.key(key).expect("b reads both layouts");
            assert_eq!(*view.allocations[0].record.node, *"a");
        }
        a.set_peer_reads_compact_batches("b", false);
        assert_eq!(a.batch_layout(), BatchLayout::Objects, "a peer went back");
        let single = Ledger::in_memory(a.identity().clone(), Vec::new());
        assert_eq!(
            single.batch_layout(),
            BatchLayout::Compact,
            "no peer to wait for"
        );
    }

    #[test]
    fn a_peer_far_ahead_does_not_push_new_allocations_into_documents_others_refuse() {
        let clock = crate::time::ManualClock::at(1_000_000);
        let (a, b) = (ledger_at("a", "b", &clock), ledger_at("b", "a", &clock));
        // A third node's stamp, 20 s ahead with a retention of 10 s, reaches
        // both (merged, and counted as skew).
        for ledger in [&a, &b] {
            let far = Timestamp::new(1_020_000, 0);
            assert!(ledger.observe_remote_clock(far).skew_violation);
        }
        allocate_competing(&a, &b);
        send_all(&a, &b);
        assert_eq!(b.conflicts().len(), 1, "b sees a's competing allocation");
    }

    #[test]
    fn a_conflict_already_on_disk_resolves_our_allocation_at_start() {
        let clock = crate::time::ManualClock::at(1_000_000);
        let (a, b) = (ledger_at("a", "b", &clock), ledger_at("b", "a", &clock));
        allocate_competing(&a, &b);
        send_all(&b, &a);
        assert_eq!(a.conflicts().len(), 1);
        // a restarts from its documents, which hold both allocations.
        let documents = a
            .digests()
            .into_iter()
            .filter_map(|(doc, _)| {
                Some((
                    doc,
                    StoredDocument {
                        bytes: a.save_document(doc)?,
                    },
                ))
            })
            .collect();
        let restarted = Ledger::open(
            a.identity().clone(),
            vec!["b".into()],
            Arc::new(clock.clone()),
            500,
            Windows::for_retention(10_000),
            Stored {
                documents,
                ..Stored::default()
            },
            Arc::new(DiscardSink),
        )
        .unwrap();
        let pricing = crate::exposure::Pricing::new("/amount", "/currency").unwrap();
        let exposure = pricing.report(&restarted.exposure());
        assert_eq!(
            exposure.expected_duplicates, 0.0,
            "its duplicate is a fact, not a risk: {exposure:?}"
        );
        let resolved = restarted.take_resolutions();
        assert_eq!(resolved.len(), 1, "{resolved:?}");
        assert!(resolved[0].conflict_after_ms.is_some(), "{resolved:?}");
        assert_eq!(restarted.stats().provisional, 0);
    }

    #[test]
    fn a_batch_folded_twice_before_a_crash_opens_as_one_allocation_per_transaction() {
        let now = crate::time::SystemClock.now_ms();
        let windows = Windows::default();
        // Three keys of one shard, as one batch holds.
        let keys: Vec<String> = (0..)
            .map(|i| format!("key-{i}"))
            .filter(|k| crate::key::shard_of(k, SHARD_COUNT) == 0)
            .take(3)
            .collect();
        let records: Vec<String> = keys
            .iter()
            .enumerate()
            .map(|(i, key)| {
                record_json(&AllocationRecord {
                    v: RECORD_VERSION,
                    key: key.as_str().into(),
                    txn_id: format!("tx_{i}").into(),
                    region: "sgp".into(),
                    node: "node-a".into(),
                    hlc: Timestamp::new(now, i as u32),
                    fingerprint: "f".into(),
                    confidence: 0.9,
                })
            })
            .collect();
        let first: AllocationRecord = serde_json::from_str(&records[0]).unwrap();
        let id = DocId {
            epoch: windows.epoch_of(now),
            shard: 0,
        };
        // The batch as sent before the crash, and as folded again after it.
        let mut doc = ShardDocument::genesis(id);
        doc.set_actor(ActorId::from(vec![1; 16]));
        doc.put_allocation_batch(&batch_id(&first), [records[0].as_str()].into_iter())
            .unwrap();
        let mut refolded = ShardDocument::genesis(id);
        refolded.set_actor(ActorId::from(vec![2; 16]));
        refolded
            .put_allocation_batch(&batch_id(&first), records.iter().map(String::as_str))
            .unwrap();
        doc.merge_bytes(&refolded.save()).unwrap();

        let stored = Stored {
            documents: [(id, StoredDocument { bytes: doc.save() })].into(),
            ..Stored::default()
        };
        let ledger = Ledger::open(
            NodeIdentity {
                region: "sgp".into(),
                node: "node-a".into(),
            },
            vec!["node-b".into()],
            Arc::new(crate::time::SystemClock),
            500,
            windows,
            stored,
            Arc::new(DiscardSink),
        )
        .unwrap();
        let stats = ledger.stats();
        assert_eq!((stats.keys, stats.allocations), (3, 3), "{stats:?}");
        assert_eq!(
            stats.conflicts, 0,
            "a transaction read twice is no conflict"
        );
        assert!(ledger.conflicts().is_empty());
    }
}
