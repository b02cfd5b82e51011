//! A simulated disk: writes queue up in order and become durable only when
//! the disk is flushed; a crash loses whatever was not. What survives is
//! exactly what a restarted node reads back (documents, journal and the
//! notes of retired allocations), and the compensation log.

use crate::ledger::{ChunkSink, DocId, Stored, StoredDocument};
use crate::storage::JournalEntry;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, MutexGuard};

/// One queued write.
#[derive(Debug, Clone)]
enum Job {
    Journal(JournalEntry),
    Forget(Vec<u64>),
    Chunk(DocId, Vec<u8>),
    Snapshot(DocId, Vec<u8>),
    Drop(DocId),
    Retire(DocId, Vec<String>),
    Log(String, Vec<u8>),
}

/// What is on the platter, and what waits to get there.
#[derive(Debug, Default)]
struct State {
    next_seq: u64,
    durable: u64,
    queue: Vec<(u64, Job)>,
    documents: BTreeMap<DocId, Vec<u8>>,
    journal: BTreeMap<u64, JournalEntry>,
    retired: BTreeMap<DocId, Vec<String>>,
    log: BTreeMap<String, Vec<Vec<u8>>>,
    /// Documents written since the node last asked (for its sync engine).
    changed: BTreeSet<DocId>,
}

impl State {
    fn push(&mut self, job: Job) -> u64 {
        self.next_seq += 1;
        let seq = self.next_seq;
        self.queue.push((seq, job));
        seq
    }
}

/// A node's disk; clones share it. The ledger writes through it as its
/// [`ChunkSink`].
#[derive(Debug, Clone, Default)]
pub struct SimDisk(Arc<Mutex<State>>);

impl SimDisk {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Everything queued so far becomes durable; returns the durable sequence.
    pub fn flush(&self) -> u64 {
        let mut s = self.lock();
        let queue = std::mem::take(&mut s.queue);
        for (seq, job) in queue {
            match job {
                Job::Journal(entry) => {
                    s.journal.insert(entry.seq, entry);
                }
                Job::Forget(seqs) => {
                    for seq in seqs {
                        s.journal.remove(&seq);
                    }
                }
                Job::Chunk(doc, bytes) => s.documents.entry(doc).or_default().extend(bytes),
                Job::Snapshot(doc, bytes) => {
                    s.documents.insert(doc, bytes);
                }
                Job::Drop(doc) => {
                    s.documents.remove(&doc);
                    s.retired.remove(&doc);
                }
                Job::Retire(doc, txns) => s.retired.entry(doc).or_default().extend(txns),
                Job::Log(txn, bytes) => s.log.entry(txn).or_default().push(bytes),
            }
            s.durable = seq;
        }
        s.durable
    }

    /// Whether writes wait for a flush.
    pub fn has_queued(&self) -> bool {
        !self.lock().queue.is_empty()
    }

    /// A crash: what was not flushed is gone.
    pub fn crash(&self) {
        let mut s = self.lock();
        s.queue.clear();
        s.next_seq = s.durable;
        s.changed.clear();
    }

    /// What a restarting node reads back.
    pub fn stored(&self) -> Stored {
        let s = self.lock();
        Stored {
            documents: s
                .documents
                .iter()
                .map(|(doc, bytes)| {
                    (
                        *doc,
                        StoredDocument {
                            bytes: bytes.clone(),
                        },
                    )
                })
                .collect(),
            journal: s.journal.values().cloned().collect(),
            retired: s
                .retired
                .iter()
                .flat_map(|(doc, txns)| txns.iter().map(|txn| (*doc, txn.clone())))
                .collect(),
        }
    }

    /// Queues a compensation log entry; returns its sequence.
    pub fn append_log(&self, txn: &str, bytes: Vec<u8>) -> u64 {
        self.lock().push(Job::Log(txn.to_owned(), bytes))
    }

    /// The durable compensation log, by transaction.
    pub fn log(&self) -> BTreeMap<String, Vec<Vec<u8>>> {
        self.lock().log.clone()
    }

    /// Documents written since the last call.
    pub fn take_changed(&self) -> BTreeSet<DocId> {
        std::mem::take(&mut self.lock().changed)
    }
}

impl ChunkSink for SimDisk {
    fn journal(&self, epoch: u32, record: Vec<u8>) -> u64 {
        let mut s = self.lock();
        let seq = s.next_seq + 1;
        s.push(Job::Journal(JournalEntry {
            seq,
            epoch,
            bytes: record,
        }))
    }

    fn forget_journal(&self, seqs: Vec<u64>) {
        self.lock().push(Job::Forget(seqs));
    }

    fn persist(&self, doc: DocId, bytes: Vec<u8>) -> u64 {
        let mut s = self.lock();
        s.changed.insert(doc);
        s.push(Job::Chunk(doc, bytes))
    }

    fn snapshot(&self, doc: DocId, bytes: Vec<u8>) -> u64 {
        self.lock().push(Job::Snapshot(doc, bytes))
    }

    fn drop_document(&self, doc: DocId) {
        self.lock().push(Job::Drop(doc));
    }

    fn retire(&self, doc: DocId, txns: Vec<String>) {
        self.lock().push(Job::Retire(doc, txns));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_flushed_writes_survive_a_crash() {
        let disk = SimDisk::default();
        let doc = DocId { epoch: 1, shard: 0 };
        let a = disk.journal(1, b"a".to_vec());
        disk.persist(doc, vec![1, 2]);
        assert_eq!(disk.flush(), a + 1);
        disk.journal(1, b"b".to_vec());
        disk.forget_journal(vec![a]);
        disk.persist(doc, vec![3]);
        disk.crash();
        let stored = disk.stored();
        assert_eq!(stored.journal.len(), 1, "the forget was not durable");
        assert_eq!(stored.documents[&doc].bytes, vec![1, 2]);
        // Sequences continue after the durable one.
        assert_eq!(disk.journal(1, b"c".to_vec()), a + 2);
    }
}
