//! The ledger: every region's allocations of every key, kept side by side.
//!
//! The key space is split over [`SHARD_COUNT`] automerge documents (blake3 of
//! the key picks one), each behind its own mutex together with the in-memory
//! index of its keys. One key always lives in one shard on every node, so the
//! conflict check for a key needs one lock and one index look-up, and remote
//! changes update the index from what changed (a diff of heads), never from a
//! rescan. The ledger does no I/O: new automerge changes are handed to a
//! [`ChunkSink`], which makes them durable and returns a sequence number the
//! caller waits on before acknowledging.

pub mod document;
mod view;

pub use view::{Allocation, ConflictView, KeyState, KeyView};

use crate::hlc::{Hlc, Observation, OffsetClock, PhysicalClock, Timestamp};
use crate::key::{Fingerprint, IdempotencyKey};
use crate::record::{AllocationRecord, CompensationRecord, RECORD_VERSION};
use automerge::{sync, ActorId};
use document::{DocumentError, Entry, ShardDocument};
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

/// Number of automerge documents the key space is split over. Part of the
/// data model: every node must use the same number.
pub const SHARD_COUNT: usize = 8;

/// Where new automerge changes go to become durable.
pub trait ChunkSink: Send + Sync {
    /// Queues `bytes` (automerge change chunks of `shard`) for durable
    /// storage and returns the sequence number that is durable once the
    /// storage watermark reaches it. Called with the shard lock held, so
    /// chunks of one shard arrive in order.
    fn persist(&self, shard: usize, bytes: Vec<u8>) -> u64;
    /// Queues a full save of `shard` that replaces every chunk persisted
    /// before it (compaction); returns its durable sequence.
    fn snapshot(&self, shard: usize, bytes: Vec<u8>) -> u64;
}

/// Chunks a shard may accumulate on disk before it is compacted into one
/// saved document: bounds start-up time and disk use.
pub const CHUNKS_PER_SNAPSHOT: usize = 2048;

/// A sink that keeps nothing: for in-memory ledgers in tests and tools.
pub struct DiscardSink;

impl ChunkSink for DiscardSink {
    fn persist(&self, _shard: usize, _bytes: Vec<u8>) -> u64 {
        0
    }
    fn snapshot(&self, _shard: usize, _bytes: Vec<u8>) -> u64 {
        0
    }
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
}

/// What an allocate request resulted in.
#[derive(Clone, Debug)]
pub struct Allocated {
    /// The new or existing allocation.
    pub allocation: Allocation,
    /// True when an existing allocation was returned.
    pub replay: bool,
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
    pub new_allocations: Vec<AllocationRecord>,
    /// Keys that became conflicted, or whose conflict gained an allocation.
    pub conflicts_changed: Vec<String>,
    /// Compensation records that arrived or changed.
    pub compensations: Vec<CompensationRecord>,
    /// Records that could not be read (counted, logged, skipped).
    pub malformed: Vec<String>,
    /// What each remote HLC said about clock skew, with the record's node.
    pub clock_observations: Vec<(String, Observation)>,
    /// Durable sequence of the merged changes (0 when nothing new).
    pub durable_seq: u64,
}

struct Shard {
    doc: ShardDocument,
    keys: HashMap<String, Vec<Allocation>>,
    compensations: HashMap<String, CompensationRecord>,
    conflicts: BTreeMap<String, u64>,
    arrivals: u64,
    synced_arrival: HashMap<String, u64>,
    sync_states: HashMap<String, sync::State>,
    chunks_on_disk: usize,
}

/// The ledger of one node; see the module docs.
pub struct Ledger {
    me: NodeIdentity,
    peers: Vec<String>,
    shards: Vec<Mutex<Shard>>,
    hlc: Mutex<Hlc<OffsetClock>>,
    clock: OffsetClock,
    sink: Arc<dyn ChunkSink>,
    malformed_total: AtomicU64,
}

impl Ledger {
    /// Opens a ledger from stored shards: per shard, the concatenated chunk
    /// bytes (empty: genesis) and how many chunks they are (compaction
    /// resumes counting from there).
    /// `peers` are the allowlisted peer ids: settlement waits for all of them.
    pub fn open(
        me: NodeIdentity,
        peers: Vec<String>,
        clock: OffsetClock,
        max_clock_offset_ms: u64,
        stored: Vec<(Vec<u8>, usize)>,
        sink: Arc<dyn ChunkSink>,
    ) -> Result<Self, DocumentError> {
        let actor = ActorId::random();
        let mut hlc = Hlc::new(clock, max_clock_offset_ms);
        let now = hlc.now().physical_ms;
        let mut shards = Vec::with_capacity(SHARD_COUNT);
        let mut malformed = 0;
        for shard in 0..SHARD_COUNT {
            let (bytes, chunks) = stored
                .get(shard)
                .map(|(b, n)| (b.as_slice(), *n))
                .unwrap_or((&[], 0));
            let mut doc = if bytes.is_empty() {
                ShardDocument::genesis(shard)
            } else {
                ShardDocument::load(shard, bytes)?
            };
            doc.set_actor(actor.clone());
            let entries = doc.entries();
            let mut state = Shard::new(doc);
            state.chunks_on_disk = chunks;
            for entry in entries {
                match entry {
                    Entry::Allocation(record) => {
                        // Re-seed the clock so no stamp ever repeats after a restart.
                        hlc.observe_local(record.hlc);
                        state.insert(record, 0, now);
                    }
                    Entry::Compensation(record) => {
                        state.compensations.insert(record.txn_id.clone(), record);
                    }
                    Entry::Malformed { map, key, reason } => {
                        malformed += 1;
                        tracing::warn!(
                            shard,
                            map,
                            key,
                            reason,
                            "skipping malformed record on load"
                        );
                    }
                }
            }
            shards.push(Mutex::new(state));
        }
        Ok(Self {
            me,
            peers,
            shards,
            hlc: Mutex::new(hlc),
            clock,
            sink,
            malformed_total: AtomicU64::new(malformed),
        })
    }

    /// An empty in-memory ledger, for tests and tools.
    pub fn in_memory(me: NodeIdentity, peers: Vec<String>) -> Self {
        // Genesis documents cannot fail to build.
        match Self::open(
            me,
            peers,
            OffsetClock::default(),
            500,
            Vec::new(),
            Arc::new(DiscardSink),
        ) {
            Ok(ledger) => ledger,
            Err(e) => unreachable!("genesis ledger failed: {e}"),
        }
    }

    /// This node's identity.
    pub fn identity(&self) -> &NodeIdentity {
        &self.me
    }

    /// The allowlisted peers settlement waits for.
    pub fn peers(&self) -> &[String] {
        &self.peers
    }

    fn shard(&self, shard: usize) -> MutexGuard<'_, Shard> {
        // A panic while holding the lock cannot leave the shard half-written
        // (automerge transactions are atomic), so a poisoned lock is usable.
        self.shards[shard % SHARD_COUNT]
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn hlc(&self) -> MutexGuard<'_, Hlc<OffsetClock>> {
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

    /// Allocates (or replays) a batch of keys that all live in `shard`, with
    /// one automerge change and one durable chunk for the whole batch.
    pub fn allocate_batch(
        &self,
        shard: usize,
        requests: &[AllocateRequest],
    ) -> Vec<Result<Allocated, AllocateError>> {
        let mut guard = self.shard(shard);
        let state = &mut *guard;
        // Decide every request first: existing keys answer at once (a key
        // repeated inside the batch sees the allocation made just before).
        let mut decided: Vec<Option<Result<Allocated, AllocateError>>> = Vec::new();
        let mut fresh: Vec<AllocationRecord> = Vec::new();
        for request in requests {
            let key = request.key.as_str();
            if let Some(existing) = state.keys.get(key) {
                decided.push(Some(match_existing(key, existing, &request.fingerprint)));
                continue;
            }
            let hlc = self.hlc().now();
            let record = AllocationRecord {
                v: RECORD_VERSION,
                key: key.to_owned(),
                txn_id: AllocationRecord::derive_txn_id(&self.me.node, hlc, key),
                region: self.me.region.clone(),
                node: self.me.node.clone(),
                hlc,
                fingerprint: request.fingerprint.0.clone(),
                confidence: request.confidence.clamp(0.0, 1.0),
            };
            state.insert(record.clone(), u64::MAX, 0);
            fresh.push(record);
            decided.push(None);
        }
        if !fresh.is_empty() {
            if let Err(e) = state.doc.put_allocations(&fresh) {
                tracing::error!(shard, error = %e, "allocation batch failed; nothing written");
                for record in &fresh {
                    state.keys.remove(&record.key);
                }
                let reason = e.to_string();
                return decided
                    .into_iter()
                    .map(|d| {
                        d.unwrap_or_else(|| {
                            Err(AllocateError::Write {
                                shard,
                                reason: reason.clone(),
                            })
                        })
                    })
                    .collect();
            }
            let seq = state.persist(shard, &*self.sink);
            for record in &fresh {
                if let Some(slot) = state.find_mut(record) {
                    slot.durable_seq = seq;
                }
            }
        }
        let mut fresh = fresh.iter();
        decided
            .into_iter()
            .map(|d| match d {
                Some(result) => result,
                None => fresh
                    .next()
                    .and_then(|record| state.find_mut(record).map(|a| a.clone()))
                    .map(|allocation| Allocated {
                        allocation,
                        replay: false,
                    })
                    .ok_or(AllocateError::Write {
                        shard,
                        reason: "allocation vanished from the index".into(),
                    }),
            })
            .collect()
    }

    /// Runs one automerge sync message from `peer` into `shard`. The sync
    /// state of each (peer, shard) lives beside its document, under the same
    /// lock, so the network task never holds document state of its own.
    pub fn receive_sync(
        &self,
        shard: usize,
        peer: &str,
        message: sync::Message,
    ) -> Result<MergeOutcome, DocumentError> {
        self.apply_remote(shard, |state| {
            let mut sync_state = state.sync_states.remove(peer).unwrap_or_default();
            let result = state.doc.receive_sync(&mut sync_state, message);
            state.sync_states.insert(peer.to_owned(), sync_state);
            result
        })
    }

    /// Merges automerge bytes (a saved document or changes) into `shard`.
    pub fn merge_bytes(&self, shard: usize, bytes: &[u8]) -> Result<MergeOutcome, DocumentError> {
        self.apply_remote(shard, |state| state.doc.merge_bytes(bytes))
    }

    fn apply_remote<F>(&self, shard: usize, apply: F) -> Result<MergeOutcome, DocumentError>
    where
        F: FnOnce(&mut Shard) -> Result<Vec<Entry>, DocumentError>,
    {
        let mut guard = self.shard(shard);
        let state = &mut *guard;
        let entries = apply(state)?;
        let mut outcome = MergeOutcome::default();
        if entries.is_empty() {
            return Ok(outcome);
        }
        let seq = state.persist(shard, &*self.sink);
        outcome.durable_seq = seq;
        let now = self.wall_ms();
        for entry in entries {
            match entry {
                Entry::Allocation(record) => {
                    if state.contains(&record) {
                        continue;
                    }
                    let observation = self.hlc().update(record.hlc);
                    outcome
                        .clock_observations
                        .push((record.node.clone(), observation));
                    if state.insert(record.clone(), seq, now) {
                        outcome.conflicts_changed.push(record.key.clone());
                    }
                    outcome.new_allocations.push(record);
                }
                Entry::Compensation(record) => {
                    state
                        .compensations
                        .insert(record.txn_id.clone(), record.clone());
                    outcome.compensations.push(record);
                }
                Entry::Malformed { map, key, reason } => {
                    self.malformed_total.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(shard, map, key, reason, "dropping malformed remote record");
                    outcome.malformed.push(key);
                }
            }
        }
        Ok(outcome)
    }

    /// Writes a compensation record (only ever for this node's own losers)
    /// and returns its durable sequence.
    pub fn put_compensation(&self, record: &CompensationRecord) -> Result<u64, DocumentError> {
        let shard = crate::key::shard_of(&record.key, SHARD_COUNT);
        let mut guard = self.shard(shard);
        guard.doc.put_compensation(record)?;
        guard
            .compensations
            .insert(record.txn_id.clone(), record.clone());
        Ok(guard.persist(shard, &*self.sink))
    }

    /// The next sync message of `shard` for `peer`, encoded, if it needs one.
    /// `unstick` clears the "message in flight" flag first: used when the
    /// peer's digest shows it still differs although nothing is under way
    /// (a message was lost with a connection).
    pub fn generate_sync(&self, shard: usize, peer: &str, unstick: bool) -> Option<Vec<u8>> {
        let mut guard = self.shard(shard);
        let state = &mut *guard;
        let sync_state = state.sync_states.entry(peer.to_owned()).or_default();
        if unstick {
            sync_state.in_flight = false;
        }
        state.doc.generate_sync(sync_state).map(|m| m.encode())
    }

    /// Starts a new sync session with `peer` (after a reconnect or a failed
    /// request): keeps what both sides are known to share, forgets what was
    /// in flight.
    pub fn reset_sync(&self, peer: &str) {
        for shard in 0..SHARD_COUNT {
            let mut guard = self.shard(shard);
            if let Some(state) = guard.sync_states.get_mut(peer) {
                *state = sync::State::decode(&state.encode()).unwrap_or_default();
            }
        }
    }

    /// If `peer`'s digest of `shard` equals ours, records that the two are
    /// identical right now (everything that arrived here so far is on that
    /// peer, and we hold all of the peer's state as of this moment) and
    /// returns true. Compared under the shard lock, so no allocation can
    /// slip in between the comparison and the record.
    pub fn mark_in_sync_if(&self, shard: usize, peer: &str, their_digest: &[u8; 32]) -> bool {
        let mut guard = self.shard(shard);
        if guard.doc.digest() != *their_digest {
            return false;
        }
        let arrivals = guard.arrivals;
        guard.synced_arrival.insert(peer.to_owned(), arrivals);
        true
    }

    /// Digests of every shard.
    pub fn digests(&self) -> Vec<[u8; 32]> {
        (0..SHARD_COUNT).map(|s| self.digest(s)).collect()
    }

    /// Digest of a shard's heads.
    pub fn digest(&self, shard: usize) -> [u8; 32] {
        self.shard(shard).doc.digest()
    }

    /// Heads of a shard.
    pub fn heads(&self, shard: usize) -> Vec<automerge::ChangeHash> {
        self.shard(shard).doc.heads()
    }

    /// Store delta with `peer` on `shard`, from the sync state: (changes
    /// the peer lacks, heads of the peer we have never seen).
    pub fn delta(&self, shard: usize, peer: &str) -> (usize, usize) {
        let guard = self.shard(shard);
        let Some(their_heads) = guard
            .sync_states
            .get(peer)
            .and_then(|s| s.their_heads.clone())
        else {
            return (0, 0);
        };
        (
            guard.doc.changes_missing_from(&their_heads),
            guard.doc.unknown_heads(&their_heads),
        )
    }

    /// The whole shard document as `Automerge::save` writes it.
    pub fn save_shard(&self, shard: usize) -> Vec<u8> {
        self.shard(shard).doc.save()
    }

    /// Everything known about one key, or `None` when it is unknown here.
    pub fn key(&self, key: &str) -> Option<KeyView> {
        let shard = crate::key::shard_of(key, SHARD_COUNT);
        let guard = self.shard(shard);
        guard.view(key, &self.peers)
    }

    /// The conflict report: one view per conflicted key, in key order.
    pub fn conflicts(&self) -> Vec<ConflictView> {
        let mut out = Vec::new();
        for shard in 0..SHARD_COUNT {
            let guard = self.shard(shard);
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

    /// Counts for health and metrics.
    pub fn stats(&self) -> LedgerStats {
        let mut stats = LedgerStats {
            malformed_records: self.malformed_total.load(Ordering::Relaxed),
            ..LedgerStats::default()
        };
        for shard in 0..SHARD_COUNT {
            let guard = self.shard(shard);
            stats.keys += guard.keys.len() as u64;
            stats.conflicts += guard.conflicts.len() as u64;
            for allocations in guard.keys.values() {
                stats.allocations += allocations.len() as u64;
                if allocations.len() == 1 && !guard.settled(allocations[0].arrival, &self.peers) {
                    stats.provisional += 1;
                    let age_from = allocations[0].record.hlc.physical_ms;
                    stats.oldest_provisional_ms = Some(
                        stats
                            .oldest_provisional_ms
                            .map_or(age_from, |o: u64| o.min(age_from)),
                    );
                }
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
    /// HLC physical ms of the oldest provisional allocation.
    pub oldest_provisional_ms: Option<u64>,
    /// Records refused as malformed since start.
    pub malformed_records: u64,
}

fn match_existing(
    key: &str,
    existing: &[Allocation],
    fingerprint: &Fingerprint,
) -> Result<Allocated, AllocateError> {
    // Allocations are kept in precedence order, so the first match is the
    // winner whenever the winner matches.
    match existing
        .iter()
        .find(|a| a.record.fingerprint == fingerprint.0)
    {
        Some(found) => Ok(Allocated {
            allocation: found.clone(),
            replay: true,
        }),
        None => Err(AllocateError::FingerprintMismatch {
            key: key.to_owned(),
            txn_id: existing
                .first()
                .map(|a| a.record.txn_id.clone())
                .unwrap_or_default(),
        }),
    }
}

impl Shard {
    fn new(doc: ShardDocument) -> Self {
        Self {
            doc,
            keys: HashMap::new(),
            compensations: HashMap::new(),
            conflicts: BTreeMap::new(),
            arrivals: 0,
            synced_arrival: HashMap::new(),
            sync_states: HashMap::new(),
            chunks_on_disk: 0,
        }
    }

    /// Hands new changes to the sink, compacting the shard when it has
    /// accumulated enough chunks. Returns the sequence to wait for.
    fn persist(&mut self, shard: usize, sink: &dyn ChunkSink) -> u64 {
        let Some(bytes) = self.doc.take_unpersisted() else {
            return 0;
        };
        let seq = sink.persist(shard, bytes);
        self.chunks_on_disk += 1;
        if self.chunks_on_disk >= CHUNKS_PER_SNAPSHOT {
            self.chunks_on_disk = 1;
            return sink.snapshot(shard, self.doc.save()).max(seq);
        }
        seq
    }

    fn find_mut(&mut self, record: &AllocationRecord) -> Option<&mut Allocation> {
        self.keys
            .get_mut(&record.key)?
            .iter_mut()
            .find(|a| a.record.txn_id == record.txn_id)
    }

    fn contains(&self, record: &AllocationRecord) -> bool {
        self.keys
            .get(&record.key)
            .is_some_and(|v| v.iter().any(|a| a.record.txn_id == record.txn_id))
    }

    /// Inserts a record in precedence order; returns true when the key is
    /// (now) in conflict.
    fn insert(&mut self, record: AllocationRecord, durable_seq: u64, now_ms: u64) -> bool {
        self.arrivals += 1;
        let allocation = Allocation {
            arrival: self.arrivals,
            durable_seq,
            record: Arc::new(record),
        };
        let key = allocation.record.key.clone();
        let list = self.keys.entry(key.clone()).or_default();
        let at = list
            .iter()
            .position(|a| allocation.record.precedence(&a.record).is_lt())
            .unwrap_or(list.len());
        list.insert(at, allocation);
        if list.len() > 1 {
            self.conflicts.entry(key).or_insert(now_ms);
            true
        } else {
            false
        }
    }

    fn settled(&self, arrival: u64, peers: &[String]) -> bool {
        peers.iter().all(|p| {
            self.synced_arrival
                .get(p)
                .is_some_and(|&synced| synced >= arrival)
        })
    }

    fn view(&self, key: &str, peers: &[String]) -> Option<KeyView> {
        let allocations = self.keys.get(key)?;
        let compensations = allocations
            .iter()
            .skip(1)
            .filter_map(|a| self.compensations.get(&a.record.txn_id).cloned())
            .collect();
        let latest = allocations.iter().map(|a| a.arrival).max().unwrap_or(0);
        let unsynced_peers: Vec<String> = peers
            .iter()
            .filter(|p| self.synced_arrival.get(*p).is_none_or(|&s| s < latest))
            .cloned()
            .collect();
        Some(KeyView {
            key: key.to_owned(),
            allocations: allocations.clone(),
            compensations,
            settled: unsynced_peers.is_empty(),
            unsynced_peers,
        })
    }
}
