//! One shard of the key space: its documents (one per live epoch) and the
//! index of its keys, all behind one lock.

use super::coverage::{DocClock, Waiting};
use super::doc_id::{DocId, Windows};
use super::document::ShardDocument;
use super::key_index::KeyIndex;
use super::provisional::{OwnProvisional, Stake};
use super::relay::HeldBack;
use super::retired::Retired;
use super::unsettled::Unsettled;
use super::view::{Allocation, KeyView};
use super::{ChunkSink, COMPACT_MIN_BYTES};
use crate::record::{AllocationRecord, CompensationRecord, TxnId};
use crate::storage::Durable;
use automerge::{sync, ActorId};
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

/// One document and what is tracked about it per peer.
pub(super) struct EpochDoc {
    pub doc: ShardDocument,
    /// Records that have arrived in this document, counted.
    pub arrivals: u64,
    /// What this document tracks about each peer, by peer id.
    pub peers: HashMap<String, PeerDoc>,
    /// Bytes appended since the last full save (or since load).
    pub bytes_since_snapshot: usize,
    /// Size of the last full save (or of what was loaded).
    pub snapshot_bytes: usize,
    /// `bytes_since_snapshot` at the previous compaction check.
    bytes_at_last_check: usize,
    /// Arrivals some peer may not hold yet.
    pub unsettled: Unsettled,
    /// Its version vector and checkpoints, for settlement by summaries.
    pub clock: DocClock,
}

/// What one document tracks about one peer, in one place so that the
/// pieces start, reset and end together.
#[derive(Default)]
pub(super) struct PeerDoc {
    /// The automerge sync state of this document with the peer.
    pub sync: sync::State,
    /// How long changes have been left to their authors for this peer.
    pub held: HeldBack,
    /// The arrival count as of the last moment both held identical copies
    /// of this document; `None` until that first happens.
    pub synced_arrival: Option<u64>,
}

impl EpochDoc {
    pub fn new(doc: ShardDocument, stored_bytes: usize) -> Self {
        Self {
            doc,
            arrivals: 0,
            peers: HashMap::new(),
            bytes_since_snapshot: 0,
            snapshot_bytes: stored_bytes,
            bytes_at_last_check: 0,
            unsettled: Unsettled::default(),
            clock: DocClock::default(),
        }
    }

    /// Hands new changes to the sink as one more chunk; returns the
    /// sequence to wait for. Compaction is left to
    /// [`EpochDoc::compact_if_due`], off the write path.
    pub fn persist(&mut self, sink: &dyn ChunkSink) -> u64 {
        let Some(bytes) = self.doc.take_unpersisted() else {
            return 0;
        };
        self.bytes_since_snapshot += bytes.len();
        sink.persist(self.doc.id(), bytes)
    }

    /// Saves the document whole in place of its chunks once they outweigh
    /// the last full save (and at least [`COMPACT_MIN_BYTES`]), so the work
    /// of compaction stays proportional to what was written and loading
    /// reads about twice the document. Called periodically, it waits for a
    /// quiet period (nothing written since the previous call) so that the
    /// full save, which holds the shard lock, does not land in the middle of
    /// a burst such as catching up after a partition; under unbroken writes
    /// it compacts at [`OVERDUE_FACTOR`] times that. Returns the sequence to
    /// wait for, or 0 when nothing was done.
    pub fn compact_if_due(&mut self, sink: &dyn ChunkSink) -> u64 {
        let threshold = self.snapshot_bytes.max(COMPACT_MIN_BYTES);
        let quiet = self.bytes_since_snapshot == self.bytes_at_last_check;
        self.bytes_at_last_check = self.bytes_since_snapshot;
        let due = self.bytes_since_snapshot >= threshold;
        let overdue = self.bytes_since_snapshot >= threshold.saturating_mul(OVERDUE_FACTOR);
        if !(due && quiet || overdue) {
            return 0;
        }
        let saved = self.doc.save_uncompressed();
        self.snapshot_bytes = saved.len();
        self.bytes_since_snapshot = 0;
        self.bytes_at_last_check = 0;
        sink.snapshot(self.doc.id(), saved)
    }
}

/// How many times the compaction threshold a document's chunks may reach
/// under unbroken writes before it is compacted anyway.
const OVERDUE_FACTOR: usize = 4;

/// Arrival of an allocation that is not in its document yet: later than
/// any peer can have seen, so it is never settled before it is folded in.
pub(super) const NOT_ARRIVED: u64 = u64::MAX;

/// A local allocation that is durable in the journal and in the index, but
/// not yet written into its automerge document.
pub(super) struct Pending {
    pub epoch: u32,
    pub record: Arc<AllocationRecord>,
    /// Journal sequence to forget once the document's chunk is durable.
    pub journal_seq: u64,
    /// What it was given, while it is followed as provisional (`None`: not followed).
    pub stake: Option<Stake>,
}

/// A shard: documents by epoch plus the key index.
pub(super) struct Group {
    pub shard: u8,
    pub docs: BTreeMap<u32, EpochDoc>,
    pub keys: KeyIndex,
    /// Allocations in `keys`, counted as they come and go.
    pub allocations: u64,
    pub compensations: HashMap<String, CompensationRecord>,
    pub conflicts: BTreeMap<String, u64>,
    /// Allocations that left with their key while their document lives on.
    pub retired: Retired,
    /// Local allocations waiting to be folded into documents, oldest first.
    pub pending: Vec<Pending>,
    /// This node's provisional allocations (folded ones; pending ones keep
    /// their stake in `pending`), and their exposure.
    pub own: OwnProvisional,
    /// Whether settlement is followed at all: with no peers every
    /// allocation is settled as it arrives.
    pub follow_settlement: bool,
    /// Members' summaries this shard does not hold everything of yet.
    pub waiting: Waiting,
}

impl Group {
    pub fn new(shard: u8) -> Self {
        Self {
            shard,
            docs: BTreeMap::new(),
            keys: KeyIndex::default(),
            allocations: 0,
            compensations: HashMap::new(),
            conflicts: BTreeMap::new(),
            retired: Retired::default(),
            pending: Vec::new(),
            own: OwnProvisional::default(),
            follow_settlement: true,
            waiting: Waiting::default(),
        }
    }

    /// The document of `epoch`, created from genesis if this node has none.
    pub fn doc_mut(&mut self, epoch: u32, actor: &ActorId) -> &mut EpochDoc {
        let shard = self.shard;
        if self
            .docs
            .last_key_value()
            .is_some_and(|(last, _)| *last < epoch)
        {
            for older in self.docs.values_mut() {
                older.doc.forget_encoded();
            }
        }
        self.docs.entry(epoch).or_insert_with(|| {
            let mut doc = ShardDocument::genesis(DocId { epoch, shard });
            doc.set_actor(actor.clone());
            EpochDoc::new(doc, 0)
        })
    }

    fn find_mut(&mut self, record: &AllocationRecord) -> Option<&mut Allocation> {
        self.keys
            .get_mut(&record.key)?
            .iter_mut()
            .find(|a| a.record.txn_id == record.txn_id)
    }

    /// A pending allocation of ours, now written into the document of
    /// `epoch`, arrives there; returns its arrival number. A competitor may
    /// have come while it was pending: its key is then counted conflicted,
    /// not provisional, from this arrival on.
    pub fn arrive_folded(&mut self, epoch: u32, record: &AllocationRecord) -> u64 {
        let arrival = self.arrive(epoch, record.hlc.physical_ms);
        if let Some(slot) = self.find_mut(record) {
            slot.arrival = arrival;
        }
        if self.keys.get(&record.key).is_some_and(|l| l.len() > 1) {
            self.note_conflicted(&record.key);
        }
        arrival
    }

    pub fn contains(&self, record: &AllocationRecord) -> bool {
        self.keys
            .get(&record.key)
            .is_some_and(|v| v.iter().any(|a| a.record.txn_id == record.txn_id))
    }

    /// Whether `record` is in the index or left it with its key: either
    /// way, reading it again (from a peer or from disk) adds nothing.
    pub fn known(&self, record: &AllocationRecord) -> bool {
        self.retired.contains(&record.txn_id) || self.contains(record)
    }

    /// Counts one more record, stamped `hlc_ms`, arrived in the document of
    /// `epoch` and returns its arrival number.
    pub fn arrive(&mut self, epoch: u32, hlc_ms: u64) -> u64 {
        let follow = self.follow_settlement;
        match self.docs.get_mut(&epoch) {
            Some(doc) => {
                doc.arrivals += 1;
                if follow {
                    doc.unsettled.arrived(doc.arrivals, hlc_ms);
                }
                doc.arrivals
            }
            None => 0,
        }
    }

    /// Every peer holds the document of `epoch` through `through`.
    pub fn settled(&mut self, epoch: u32, through: u64) {
        if let Some(doc) = self.docs.get_mut(&epoch) {
            doc.unsettled.settled_through(through);
        }
    }

    /// Tells each document which of its unsettled arrivals belong to `key`,
    /// which is in conflict.
    fn note_conflicted(&mut self, key: &str) {
        let Some(list) = self.keys.get(key) else {
            return;
        };
        for a in list.iter().filter(|a| a.arrival != NOT_ARRIVED) {
            if let Some(doc) = self.docs.get_mut(&a.epoch) {
                doc.unsettled.conflicted(a.arrival);
            }
        }
    }

    /// Provisional keys (one allocation, not on every peer yet) and the HLC
    /// ms of the oldest, counted from what is kept, with no scan of the keys.
    pub fn provisional(&self) -> (u64, Option<u64>) {
        if !self.follow_settlement {
            return (0, None);
        }
        let mut count = 0;
        let mut oldest: Option<u64> = None;
        let mut older = |ms: u64| oldest = Some(oldest.map_or(ms, |o| o.min(ms)));
        for doc in self.docs.values() {
            count += doc.unsettled.provisional();
            if let Some(ms) = doc.unsettled.oldest_provisional_ms() {
                older(ms);
            }
        }
        for p in &self.pending {
            // Itself the key's only allocation: one that left the index
            // (expired, not folded yet) is not, whatever came since.
            let sole = |l: &Vec<Allocation>| l.len() == 1 && Arc::ptr_eq(&l[0].record, &p.record);
            if self.keys.get(&p.record.key).is_some_and(sole) {
                count += 1;
                older(p.record.hlc.physical_ms);
            }
        }
        (count, oldest)
    }

    /// Inserts a record of document `epoch` in precedence order; returns
    /// true when the key is (now) in conflict. `arrival` comes from
    /// [`Group::arrive`], or is [`NOT_ARRIVED`] for a pending allocation.
    pub fn insert(
        &mut self,
        epoch: u32,
        record: Arc<AllocationRecord>,
        arrival: u64,
        durable: Durable,
        now_ms: u64,
    ) -> bool {
        let allocation = Allocation {
            epoch,
            replayed_here: false,
            arrival,
            durable,
            record,
        };
        let key = allocation.record.key.clone();
        let list = self.keys.list_for(&key);
        let at = list
            .iter()
            .position(|a| allocation.record.precedence(&a.record).is_lt())
            .unwrap_or(list.len());
        list.insert(at, allocation);
        self.allocations += 1;
        if list.len() > 1 {
            self.conflicts.entry(key.to_string()).or_insert(now_ms);
            self.note_conflicted(&key);
            true
        } else {
            false
        }
    }

    /// The arrival count up to which every peer holds the document of
    /// `epoch` (`None` while some peer never has): an allocation of that
    /// document that arrived no later is settled. Found once per document,
    /// so that a scan of every key costs a comparison per key, not a look-up
    /// per key and peer.
    pub fn settled_through(&self, epoch: u32, peers: &[String]) -> Option<u64> {
        peers
            .iter()
            .map(|p| self.synced_arrival(epoch, p))
            .try_fold(u64::MAX, |low, synced| synced.map(|s| low.min(s)))
    }

    /// The arrival count of the document of `epoch` as of the last moment
    /// `peer` held an identical copy; `None` until that first happens.
    fn synced_arrival(&self, epoch: u32, peer: &str) -> Option<u64> {
        self.docs.get(&epoch)?.peers.get(peer)?.synced_arrival
    }

    fn unsynced<'a>(
        &'a self,
        allocation: &'a Allocation,
        peers: &'a [String],
    ) -> impl Iterator<Item = &'a String> + 'a {
        peers.iter().filter(move |p| {
            self.synced_arrival(allocation.epoch, p)
                .is_none_or(|s| s < allocation.arrival)
        })
    }

    pub fn view(&self, key: &str, peers: &[String]) -> Option<KeyView> {
        let allocations = self.keys.get(key)?;
        let compensations = allocations
            .iter()
            .skip(1)
            .filter_map(|a| {
                self.compensations
                    .get(&a.record.txn_id.to_string())
                    .cloned()
            })
            .collect();
        let mut unsynced_peers: Vec<String> = allocations
            .iter()
            .flat_map(|a| self.unsynced(a, peers).cloned())
            .collect();
        unsynced_peers.sort();
        unsynced_peers.dedup();
        Some(KeyView {
            key: key.to_owned(),
            allocations: allocations.clone(),
            compensations,
            settled: unsynced_peers.is_empty(),
            unsynced_peers,
        })
    }

    /// Drops every document whose epoch is past retention, with the
    /// allocations, conflicts and compensations that lived in them, here and
    /// (through `sink`) on disk. A key goes as a whole once its winner's
    /// document expires: its losers in newer documents are retired (see
    /// [`Retired`]). Returns the dropped documents and how many allocations
    /// went with them.
    pub fn expire(
        &mut self,
        windows: &Windows,
        now_ms: u64,
        sink: &dyn ChunkSink,
    ) -> (Vec<DocId>, u64) {
        let shard = self.shard;
        // Retired records whose own documents expire now: their notes go
        // with the documents (also when no document of theirs was ever
        // made here, as for an allocation retired before it was folded).
        for epoch in self.retired.expire(windows, now_ms) {
            if !self.docs.contains_key(&epoch) {
                sink.drop_document(DocId { epoch, shard });
            }
        }
        let expired: Vec<u32> = self
            .docs
            .keys()
            .copied()
            .filter(|&e| windows.expired(e, now_ms))
            .collect();
        if expired.is_empty() {
            return (Vec::new(), 0);
        }
        for epoch in &expired {
            self.docs.remove(epoch);
            self.own.expire(*epoch);
        }
        let mut dropped = 0u64;
        let mut retiring: BTreeMap<u32, Vec<TxnId>> = BTreeMap::new();
        // Arrivals of keys that are no longer in conflict: provisional again.
        let mut unconflicted: Vec<(u32, u64)> = Vec::new();
        let compensations = &mut self.compensations;
        let conflicts = &mut self.conflicts;
        self.keys.retain(|key, allocations| {
            let was_conflicted = allocations.len() > 1;
            // The key leaves with its winner: its losers go too, but only
            // those stamped while the winner was live. One stamped after is
            // a new allocation by a node that had already forgotten the
            // winner, and stays, whenever this node's own expiry comes.
            let gone_winner = allocations
                .first()
                .map(|w| w.epoch)
                .filter(|&epoch| windows.expired(epoch, now_ms));
            allocations.retain(|a| {
                let gone = windows.expired(a.epoch, now_ms)
                    || gone_winner
                        .is_some_and(|epoch| !windows.expired(epoch, a.record.hlc.physical_ms));
                if gone {
                    dropped += 1;
                    compensations.remove(&a.record.txn_id.to_string());
                    if !windows.expired(a.epoch, now_ms) {
                        retiring
                            .entry(a.epoch)
                            .or_default()
                            .push(a.record.txn_id.clone());
                    }
                }
                !gone
            });
            if allocations.len() <= 1 {
                conflicts.remove(key);
                // A loser older than its winner (an epoch held back from a
                // clock far ahead) expired: the winner stands alone.
                if let (true, [single]) = (was_conflicted, allocations.as_slice()) {
                    unconflicted.push((single.epoch, single.arrival));
                }
            }
            !allocations.is_empty()
        });
        self.allocations -= dropped;
        for (epoch, arrival) in unconflicted {
            if let Some(doc) = self.docs.get_mut(&epoch) {
                doc.unsettled.unconflicted(arrival);
            }
        }
        // Queued before the drops below, so that a crash in between leaves
        // the expired documents on disk, and the start applies this again.
        for (epoch, txns) in retiring {
            for txn in &txns {
                self.retired.insert(txn.clone(), epoch);
            }
            sink.retire(
                DocId { epoch, shard },
                txns.iter().map(TxnId::to_text).collect(),
            );
        }
        let docs: Vec<DocId> = expired
            .into_iter()
            .map(|epoch| DocId { epoch, shard })
            .collect();
        for doc in &docs {
            sink.drop_document(*doc);
        }
        (docs, dropped)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// Counts full saves; everything else is discarded.
    #[derive(Default)]
    struct SnapshotCounter(AtomicUsize);

    impl ChunkSink for SnapshotCounter {
        fn journal(&self, _epoch: u32, _record: Vec<u8>) -> u64 {
            0
        }
        fn forget_journal(&self, _seqs: Vec<u64>) {}
        fn persist(&self, _doc: DocId, _bytes: Vec<u8>) -> u64 {
            0
        }
        fn snapshot(&self, _doc: DocId, _bytes: Vec<u8>) -> u64 {
            self.0.fetch_add(1, Ordering::Relaxed) as u64 + 1
        }
        fn drop_document(&self, _doc: DocId) {}
        fn retire(&self, _doc: DocId, _txns: Vec<String>) {}
    }

    fn epoch_doc() -> EpochDoc {
        EpochDoc::new(ShardDocument::genesis(DocId { epoch: 1, shard: 0 }), 0)
    }

    fn allocation(key: &str, node: &str) -> Arc<AllocationRecord> {
        Arc::new(AllocationRecord {
            v: crate::record::RECORD_VERSION,
            key: key.into(),
            txn_id: format!("tx_{key}_{node}").into(),
            region: "r".into(),
            node: node.into(),
            hlc: crate::hlc::Timestamp::new(1, 0),
            fingerprint: "f".into(),
            confidence: 1.0,
        })
    }

    #[test]
    fn the_allocation_count_follows_inserts_and_expiry() {
        let windows = Windows::for_retention(4_000);
        let mut group = Group::new(0);
        let (old, new) = (0, 5);
        for (epoch, key, node) in [(old, "a", "n1"), (new, "a", "n2"), (new, "b", "n1")] {
            group.doc_mut(epoch, &ActorId::random());
            group.insert(epoch, allocation(key, node), 0, Durable::Store(0), 0);
        }
        let counted = |g: &Group| g.keys.values().map(|l| l.len() as u64).sum::<u64>();
        assert_eq!((group.allocations, counted(&group)), (3, 3));
        // Epoch 0 ends at 1 s and is kept 4 s more. It holds the winner of
        // "a", so "a" goes whole.
        let (_, dropped) = group.expire(&windows, 5_000, &super::super::DiscardSink);
        assert_eq!(dropped, 2);
        assert_eq!((group.allocations, counted(&group)), (1, 1));
    }

    #[test]
    fn a_key_goes_with_its_winner_and_a_loser_older_than_its_winner_goes_alone() {
        let windows = Windows::for_retention(4_000);
        let peers = ["p".to_string()];
        let mut group = Group::new(0);
        let (old, new) = (0, 5);
        // "a": winner in the old epoch, loser in the new one (a retry across
        // a window edge). "c": loser in the old epoch although it was
        // stamped later (an epoch held back from a clock far ahead).
        for (epoch, key, node, ms) in [
            (old, "a", "n1", 1),
            (new, "a", "n2", 2),
            (new, "c", "n1", 1),
            (old, "c", "n2", 2),
        ] {
            group.doc_mut(epoch, &ActorId::random());
            let mut record = (*allocation(key, node)).clone();
            record.hlc = crate::hlc::Timestamp::new(ms, 0);
            let arrival = group.arrive(epoch, ms);
            group.insert(epoch, Arc::new(record), arrival, Durable::Store(0), 0);
        }
        assert_eq!((group.conflicts.len(), group.provisional().0), (2, 0));
        group.expire(&windows, 5_000, &super::super::DiscardSink);
        assert!(group.view("a", &peers).is_none(), "gone with its winner");
        assert!(group.retired.contains(&"tx_a_n2".into()));
        let c = group.view("c", &peers).expect("its winner lives");
        assert_eq!(c.allocations.len(), 1);
        assert_eq!(c.allocations[0].record.txn_id, "tx_c_n1");
        assert!(group.conflicts.is_empty());
        // "c" is provisional again (one allocation, not on the peer); the
        // retired loser of "a" counts as nothing.
        assert_eq!(group.provisional().0, 1);
    }

    #[test]
    fn settled_through_agrees_with_each_keys_view() {
        let peers = ["p1".to_string(), "p2".to_string()];
        let mut group = Group::new(0);
        group.doc_mut(1, &ActorId::random());
        for key in ["a", "b", "c", "d"] {
            let arrival = group.arrive(1, 0);
            group.insert(1, allocation(key, "n"), arrival, Durable::Store(0), 0);
        }
        let settled_by_view = |g: &Group| -> Vec<bool> {
            ["a", "b", "c", "d"]
                .iter()
                .map(|k| g.view(k, &peers).unwrap().settled)
                .collect()
        };
        let settled_by_threshold = |g: &Group| -> Vec<bool> {
            let through = g.settled_through(1, &peers);
            ["a", "b", "c", "d"]
                .iter()
                .map(|k| through.is_some_and(|t| t >= g.keys.get(k).unwrap()[0].arrival))
                .collect()
        };
        let sync = |g: &mut Group, peer: &str, arrival: u64| {
            let doc = g.docs.get_mut(&1).unwrap();
            doc.peers.entry(peer.into()).or_default().synced_arrival = Some(arrival);
        };

        assert_eq!(
            group.settled_through(1, &peers),
            None,
            "no peer in sync yet"
        );
        sync(&mut group, "p1", 3);
        assert_eq!(group.settled_through(1, &peers), None, "p2 never in sync");
        assert_eq!(settled_by_view(&group), [false; 4]);
        sync(&mut group, "p2", 2);
        assert_eq!(group.settled_through(1, &peers), Some(2));
        assert_eq!(settled_by_view(&group), [true, true, false, false]);
        assert_eq!(settled_by_threshold(&group), settled_by_view(&group));
        sync(&mut group, "p2", 4);
        assert_eq!(settled_by_view(&group), [true, true, true, false]);
        assert_eq!(settled_by_threshold(&group), settled_by_view(&group));
        assert_eq!(group.settled_through(1, &[]), Some(u64::MAX), "no peers");
        assert_eq!(group.settled_through(9, &peers), None, "no such document");
    }

    proptest::proptest! {
        /// The kept count of provisional keys equals a scan of every key's
        /// view, whatever the order of arrivals, conflicts, syncs and the
        /// expiry of a window (which takes keys whose winner it holds, and
        /// losers it holds of keys whose winner lives on).
        #[test]
        fn provisional_counts_match_a_scan_of_the_views(
            ops in proptest::collection::vec((0u8..6, 0usize..12, 0usize..2), 1..80),
        ) {
            let peers = ["p1".to_string(), "p2".to_string()];
            let mut group = Group::new(0);
            for epoch in [1, 2] {
                group.doc_mut(epoch, &ActorId::random());
            }
            let mut n = 0;
            let windows = Windows::for_retention(4_000);
            let mut expired = false;
            for (op, key, which) in ops {
                let epoch = if expired { 2 } else { 1 + which as u32 };
                match op {
                    // An allocation of key k by node "a" or "b".
                    0 | 1 => {
                        n += 1;
                        let mut record = (*allocation(&format!("k{key}"), ["a", "b"][op as usize])).clone();
                        record.hlc = crate::hlc::Timestamp::new(n, 0);
                        record.txn_id = format!("tx{n}").into();
                        let arrival = group.arrive(epoch, n);
                        group.insert(epoch, Arc::new(record), arrival, Durable::Store(0), 0);
                    }
                    // An allocation of ours, pending: in the index, not yet in a document.
                    3 => {
                        n += 1;
                        let mut record = (*allocation(&format!("k{key}"), "a")).clone();
                        record.hlc = crate::hlc::Timestamp::new(n, 0);
                        record.txn_id = format!("tx{n}").into();
                        let record = Arc::new(record);
                        group.insert(epoch, record.clone(), NOT_ARRIVED, Durable::Journal(n), 0);
                        group.pending.push(Pending { epoch, record, journal_seq: n, stake: None });
                    }
                    // Every pending allocation folded into its document
                    // (those that left the index are not, as in `fold_group`).
                    4 => {
                        for p in std::mem::take(&mut group.pending) {
                            if group.contains(&p.record) {
                                group.arrive_folded(p.epoch, &p.record);
                            }
                        }
                    }
                    // Epoch 1 ends at 2 s and passes the retention at 6 s.
                    5 if !expired => {
                        group.expire(&windows, 6_000, &super::super::DiscardSink);
                        expired = true;
                    }
                    5 => {}
                    // Peer `key % 2` is in sync with document `epoch` now.
                    _ => {
                        let arrivals = group.docs[&epoch].arrivals;
                        group
                            .docs
                            .get_mut(&epoch)
                            .unwrap()
                            .peers
                            .entry(peers[key % 2].clone())
                            .or_default()
                            .synced_arrival = Some(arrivals);
                        if let Some(through) = group.settled_through(epoch, &peers) {
                            group.settled(epoch, through);
                        }
                    }
                }
                let scanned = (0..12)
                    .filter_map(|k| group.view(&format!("k{k}"), &peers))
                    .filter(|v| v.allocations.len() == 1 && !v.settled)
                    .count() as u64;
                proptest::prop_assert_eq!(group.provisional().0, scanned);
            }
        }
    }

    #[test]
    fn compaction_waits_for_a_quiet_period_unless_overdue() {
        let sink = SnapshotCounter::default();
        let mut doc = epoch_doc();
        doc.bytes_since_snapshot = COMPACT_MIN_BYTES - 1;
        assert_eq!(doc.compact_if_due(&sink), 0, "not due");
        assert_eq!(doc.compact_if_due(&sink), 0, "quiet but still not due");

        doc.bytes_since_snapshot = COMPACT_MIN_BYTES;
        assert_eq!(
            doc.compact_if_due(&sink),
            0,
            "due, but written to since the last check"
        );
        assert!(doc.compact_if_due(&sink) > 0, "due and quiet");
        assert_eq!(sink.0.load(Ordering::Relaxed), 1);
        assert_eq!(doc.bytes_since_snapshot, 0);
        assert!(
            doc.snapshot_bytes > 0,
            "the threshold follows the saved size"
        );

        doc.bytes_since_snapshot = COMPACT_MIN_BYTES * OVERDUE_FACTOR;
        assert!(
            doc.compact_if_due(&sink) > 0,
            "overdue: compacted while busy"
        );
        assert_eq!(sink.0.load(Ordering::Relaxed), 2);
    }
}
