//! Durable local state: automerge chunks per document, the allocations
//! retired from live documents and the compensation log, in one redb database with group commit, plus the allocation journal
//! ([`crate::journal`]) that new local allocations wait on.
//!
//! Why redb: a well-kept pure-Rust embedded store with checksummed,
//! crash-safe commits (a torn write is never read back) and one fsync per
//! commit. One writer thread drains every queued job into a single write
//! transaction, so concurrent requests share an fsync (group commit), and
//! publishes a watermark: every job with a sequence at or below it is on
//! disk. Callers acknowledge only once the watermark has reached their job.

use crate::group_commit::{Commit, CommitStats, GroupCommit, NotDurable, OnCommit, Sequenced};
pub use crate::journal::JournalEntry;
use crate::journal::{Journal, JournalError};
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

/// (epoch, shard, sequence) → automerge chunk or saved document.
const CHUNKS: TableDefinition<(u32, u8, u64), &[u8]> = TableDefinition::new("document_chunks");
const COMPENSATION_LOG: TableDefinition<(&str, u64), &[u8]> =
    TableDefinition::new("compensation_log");
/// (epoch, shard, sequence) → JSON array of the transaction ids of that
/// document that left the ledger with their key (`ledger::ChunkSink::retire`).
const RETIRED: TableDefinition<(u32, u8, u64), &[u8]> = TableDefinition::new("retired_allocations");

/// File name of the database inside the data dir.
pub const DB_FILE: &str = "ledger.redb";

/// Storage failures; each names the file or the step involved.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// The database could not be opened or created.
    #[error("cannot open {path}: {reason}")]
    Open {
        /// Database path.
        path: PathBuf,
        /// Cause.
        reason: String,
    },
    /// A read or write failed.
    #[error("storage {step} failed: {reason}")]
    Io {
        /// What was being done.
        step: &'static str,
        /// Cause.
        reason: String,
    },
    /// The writer thread has stopped (at shutdown): nothing more can be made durable.
    #[error("the storage writer has stopped; no further writes can be made durable")]
    WriterStopped,
    /// Writes are failing (a full disk, an I/O error); the writer retries
    /// them with backoff and resumes by itself once they succeed.
    #[error("storage cannot write now ({0}); retrying, nothing acknowledged is lost")]
    WriteFailing(String),
    /// The allocation journal failed.
    #[error(transparent)]
    Journal(#[from] JournalError),
}

/// Where a write becomes durable: a sequence of the store or of the journal.
/// An answer that shows a write waits for it with [`Storage::wait`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Durable {
    /// A store job (document chunk, compensation log entry).
    Store(u64),
    /// A journal entry (a new local allocation).
    Journal(u64),
}

fn io<E: std::fmt::Display>(step: &'static str) -> impl FnOnce(E) -> StorageError {
    move |e| StorageError::Io {
        step,
        reason: e.to_string(),
    }
}

/// A document as storage knows it: (epoch, shard).
pub type DocKey = (u32, u8);

/// A unit of work for the writer thread.
enum Job {
    /// Automerge change chunks of a document, appended.
    Chunk {
        doc: DocKey,
        seq: u64,
        bytes: Vec<u8>,
    },
    /// A full save of a document that replaces every earlier chunk of it.
    Snapshot {
        doc: DocKey,
        seq: u64,
        bytes: Vec<u8>,
    },
    /// Forget a document entirely (it passed the retention), with its
    /// retired allocations.
    Drop { doc: DocKey, seq: u64 },
    /// Allocations of a live document that left the ledger with their key.
    Retire {
        doc: DocKey,
        seq: u64,
        txns: Vec<String>,
    },
    /// Forget a transaction's compensation log (it passed the retention).
    DropLog { txn: String, seq: u64 },
    /// One compensation log entry.
    LogEntry {
        txn: String,
        seq: u64,
        bytes: Vec<u8>,
    },
    /// Journal entries whose records are in document chunks queued earlier:
    /// forgotten by the journal once this commit is durable.
    Folded { seq: u64, journal: Vec<u64> },
}

impl From<NotDurable> for StorageError {
    fn from(e: NotDurable) -> Self {
        match e {
            NotDurable::Stopped => StorageError::WriterStopped,
            NotDurable::Failing(reason) => StorageError::WriteFailing(reason.to_string()),
        }
    }
}

/// Handle to the durable store. Cheap to share; writes go through one
/// background thread, which alone holds the database after it is read at
/// open (so that after an I/O error it can close and reopen it).
pub struct Storage {
    journal: Arc<Journal>,
    writer: GroupCommit<Job>,
}

/// The compensation log entries of one transaction, in order.
pub type LogOfTransaction = (String, Vec<Vec<u8>>);

/// What was on disk at open.
#[derive(Debug, Default)]
pub struct Loaded {
    /// Per document, its chunks concatenated in order.
    pub documents: std::collections::BTreeMap<DocKey, Vec<u8>>,
    /// Allocations not yet folded into their documents, in sequence order.
    pub journal: Vec<JournalEntry>,
    /// Every compensation log entry, grouped by transaction, in order.
    pub compensation_log: Vec<LogOfTransaction>,
    /// Allocations of live documents that left the ledger with their key.
    pub retired: Vec<(DocKey, String)>,
}

impl Storage {
    /// Opens (or creates) the database in `dir` and reads back every shard.
    /// `on_commit` is called by the writer threads after each group commit.
    pub fn open(dir: &Path, on_commit: OnCommit) -> Result<(Arc<Self>, Loaded), StorageError> {
        let path = dir.join(DB_FILE);
        let db = Database::builder()
            .set_cache_size(64 * 1024 * 1024)
            .create(&path)
            .map_err(|e| StorageError::Open {
                path: path.clone(),
                reason: e.to_string(),
            })?;
        let (mut loaded, max_seq) = read_documents(&db)?;
        loaded.compensation_log = read_compensation_log(&db)?;
        let (journal, entries) = Journal::open(dir, on_commit.clone())?;
        loaded.journal = entries;
        let store = StoreWriter {
            path,
            db: Some(db),
            journal: journal.clone(),
            on_commit,
        };
        let writer = GroupCommit::start("oncemesh-storage", max_seq, store)
            .map_err(io("starting the writer thread"))?;
        Ok((Arc::new(Self { journal, writer }), loaded))
    }

    fn enqueue(&self, make: impl FnOnce(u64) -> Job) -> u64 {
        self.writer.enqueue(make)
    }

    /// Queues change chunks of a document; returns their durable sequence.
    pub fn append_chunk(&self, doc: DocKey, bytes: Vec<u8>) -> u64 {
        self.enqueue(|seq| Job::Chunk { doc, seq, bytes })
    }

    /// Queues a full save of a document that replaces all its earlier chunks.
    pub fn replace_with_snapshot(&self, doc: DocKey, bytes: Vec<u8>) -> u64 {
        self.enqueue(|seq| Job::Snapshot { doc, seq, bytes })
    }

    /// Queues the removal of a transaction's compensation log.
    pub fn drop_log(&self, txn: &str) -> u64 {
        self.enqueue(|seq| Job::DropLog {
            txn: txn.to_owned(),
            seq,
        })
    }

    /// Queues the removal of every chunk of a document, and of the notes
    /// of its retired allocations.
    pub fn drop_document(&self, doc: DocKey) -> u64 {
        self.enqueue(|seq| Job::Drop { doc, seq })
    }

    /// Queues a note that the allocations `txns` of `doc` left the ledger
    /// with their key; read back at open until the document is dropped.
    pub fn retire(&self, doc: DocKey, txns: Vec<String>) -> u64 {
        self.enqueue(|seq| Job::Retire { doc, seq, txns })
    }

    /// Queues a compensation log entry; returns its durable sequence.
    pub fn append_log_entry(&self, txn: &str, bytes: Vec<u8>) -> u64 {
        self.enqueue(|seq| Job::LogEntry {
            txn: txn.to_owned(),
            seq,
            bytes,
        })
    }

    /// Queues a new local allocation record for the journal; returns its
    /// journal sequence (wait for it with [`Durable::Journal`]).
    pub fn append_journal(&self, epoch: u32, bytes: Vec<u8>) -> u64 {
        self.journal.append(epoch, bytes)
    }

    /// Has the journal forget entries whose records are in document chunks
    /// queued before this call, once those chunks are durable.
    pub fn forget_journal(&self, journal: Vec<u64>) -> u64 {
        self.enqueue(|seq| Job::Folded { seq, journal })
    }

    /// Journal entries not yet known to be in durable document chunks.
    pub fn journal_backlog(&self) -> u64 {
        self.journal.live_entries()
    }

    /// Waits until `point` is on disk.
    pub async fn wait(&self, point: Durable) -> Result<(), StorageError> {
        match point {
            Durable::Store(seq) => self.wait_durable(seq).await,
            Durable::Journal(seq) => Ok(self.journal.wait_durable(seq).await?),
        }
    }

    /// Waits until everything up to `seq` is on disk.
    pub async fn wait_durable(&self, seq: u64) -> Result<(), StorageError> {
        Ok(self.writer.wait_durable(seq).await?)
    }

    /// Why writes are failing now (store or journal), if they are: nothing
    /// new can be acknowledged until they succeed again.
    pub fn failing(&self) -> Option<String> {
        self.writer
            .failing()
            .or_else(|| self.journal.failing())
            .map(|reason| reason.to_string())
    }

    /// Commits that failed since start (store and journal).
    pub fn write_failures(&self) -> u64 {
        self.writer.failures() + self.journal.failures()
    }

    /// Highest durable sequence so far.
    pub fn durable_seq(&self) -> u64 {
        self.writer.durable_seq()
    }

    /// Stops the writer after it has written everything queued so far,
    /// then the journal's.
    pub fn close(&self) {
        self.writer.close();
        self.journal.close();
    }
}

fn read_compensation_log(db: &Database) -> Result<Vec<LogOfTransaction>, StorageError> {
    let read = db
        .begin_read()
        .map_err(io("reading the compensation log"))?;
    let table = match read.open_table(COMPENSATION_LOG) {
        Ok(t) => t,
        Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
        Err(e) => return Err(io("opening the compensation log")(e)),
    };
    let mut out: Vec<LogOfTransaction> = Vec::new();
    for row in table.iter().map_err(io("reading the compensation log"))? {
        let (k, v) = row.map_err(io("reading the compensation log"))?;
        let (txn, _) = k.value();
        match out.last_mut() {
            Some((last, entries)) if last == txn => entries.push(v.value().to_vec()),
            _ => out.push((txn.to_owned(), vec![v.value().to_vec()])),
        }
    }
    Ok(out)
}

fn read_documents(db: &Database) -> Result<(Loaded, u64), StorageError> {
    let mut loaded = Loaded::default();
    let mut max_seq = 0;
    let read = db.begin_read().map_err(io("reading chunks"))?;
    match read.open_table(CHUNKS) {
        Ok(table) => {
            for row in table.iter().map_err(io("reading chunks"))? {
                let (k, v) = row.map_err(io("reading chunks"))?;
                let (epoch, shard, seq) = k.value();
                max_seq = max_seq.max(seq);
                loaded
                    .documents
                    .entry((epoch, shard))
                    .or_default()
                    .extend_from_slice(v.value());
            }
        }
        Err(redb::TableError::TableDoesNotExist(_)) => {}
        Err(e) => return Err(io("opening chunks")(e)),
    }
    if let Ok(log) = read.open_table(COMPENSATION_LOG) {
        for row in log.iter().map_err(io("reading the compensation log"))? {
            let (k, _) = row.map_err(io("reading the compensation log"))?;
            max_seq = max_seq.max(k.value().1);
        }
    }
    match read.open_table(RETIRED) {
        Ok(table) => {
            for row in table.iter().map_err(io("reading retired allocations"))? {
                let (k, v) = row.map_err(io("reading retired allocations"))?;
                let (epoch, shard, seq) = k.value();
                max_seq = max_seq.max(seq);
                match serde_json::from_slice::<Vec<String>>(v.value()) {
                    Ok(txns) => loaded
                        .retired
                        .extend(txns.into_iter().map(|txn| ((epoch, shard), txn))),
                    Err(e) => {
                        tracing::error!(epoch, shard, seq, error = %e, "skipping an unreadable note of retired allocations");
                    }
                }
            }
        }
        Err(redb::TableError::TableDoesNotExist(_)) => {}
        Err(e) => return Err(io("opening retired allocations")(e)),
    }
    Ok((loaded, max_seq))
}

/// The store's side of group commit: one redb write transaction per batch.
struct StoreWriter {
    path: PathBuf,
    /// `None` after a failed commit: redb refuses every operation after an
    /// I/O error until the database is closed and opened again.
    db: Option<Database>,
    journal: Arc<Journal>,
    on_commit: OnCommit,
}

impl Commit<Job> for StoreWriter {
    fn commit(&mut self, jobs: &[Job]) -> Result<(), String> {
        let started = Instant::now();
        let db = match self.db.take() {
            Some(db) => db,
            None => Database::builder()
                .set_cache_size(64 * 1024 * 1024)
                .create(&self.path)
                .map_err(|e| format!("reopening {}: {e}", self.path.display()))?,
        };
        // On failure the database is dropped, and opened again next time.
        commit(&db, jobs).map_err(|e| e.to_string())?;
        self.db = Some(db);
        for job in jobs {
            if let Job::Folded { journal: seqs, .. } = job {
                self.journal.forget(seqs);
            }
        }
        (self.on_commit)(CommitStats {
            journal: false,
            jobs: jobs.len(),
            duration: started.elapsed(),
        });
        Ok(())
    }
}

impl Sequenced for Job {
    fn seq(&self) -> u64 {
        match self {
            Job::Chunk { seq, .. }
            | Job::Snapshot { seq, .. }
            | Job::Drop { seq, .. }
            | Job::Retire { seq, .. }
            | Job::DropLog { seq, .. }
            | Job::LogEntry { seq, .. }
            | Job::Folded { seq, .. } => *seq,
        }
    }
}

fn commit(db: &Database, jobs: &[Job]) -> Result<(), StorageError> {
    let tx = db.begin_write().map_err(io("beginning a commit"))?;
    {
        let mut chunks = tx.open_table(CHUNKS).map_err(io("opening chunks"))?;
        let mut log = tx
            .open_table(COMPENSATION_LOG)
            .map_err(io("opening the compensation log"))?;
        let mut retired = tx
            .open_table(RETIRED)
            .map_err(io("opening retired allocations"))?;
        for job in jobs {
            match job {
                Job::Chunk {
                    doc: (epoch, shard),
                    seq,
                    bytes,
                } => {
                    chunks
                        .insert((*epoch, *shard, *seq), bytes.as_slice())
                        .map_err(io("writing a chunk"))?;
                }
                Job::Snapshot {
                    doc: (epoch, shard),
                    seq,
                    bytes,
                } => {
                    chunks
                        .retain_in((*epoch, *shard, 0)..(*epoch, *shard, *seq), |_, _| false)
                        .map_err(io("dropping compacted chunks"))?;
                    chunks
                        .insert((*epoch, *shard, *seq), bytes.as_slice())
                        .map_err(io("writing a snapshot"))?;
                }
                Job::Drop {
                    doc: (epoch, shard),
                    ..
                } => {
                    let all = (*epoch, *shard, 0)..=(*epoch, *shard, u64::MAX);
                    chunks
                        .retain_in(all.clone(), |_, _| false)
                        .map_err(io("dropping an expired document"))?;
                    retired
                        .retain_in(all, |_, _| false)
                        .map_err(io("dropping an expired document's retired allocations"))?;
                }
                Job::Retire {
                    doc: (epoch, shard),
                    seq,
                    txns,
                } => {
                    let list =
                        serde_json::to_vec(txns).map_err(io("encoding retired allocations"))?;
                    retired
                        .insert((*epoch, *shard, *seq), list.as_slice())
                        .map_err(io("writing retired allocations"))?;
                }
                Job::DropLog { txn, .. } => {
                    log.retain_in((txn.as_str(), 0)..=(txn.as_str(), u64::MAX), |_, _| false)
                        .map_err(io("dropping an expired compensation log"))?;
                }
                Job::LogEntry { txn, seq, bytes } => {
                    log.insert((txn.as_str(), *seq), bytes.as_slice())
                        .map_err(io("writing a log entry"))?;
                }
                // Forgotten by the journal once this commit is durable.
                Job::Folded { .. } => {}
            }
        }
    }
    tx.commit().map_err(io("committing"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reopen(dir: &Path) -> (Arc<Storage>, Loaded) {
        Storage::open(dir, Arc::new(|_| {})).expect("open storage")
    }

    #[test]
    fn retired_allocations_are_read_back_until_their_document_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let (storage, loaded) = reopen(dir.path());
        assert!(loaded.retired.is_empty());
        storage.append_chunk((11, 3), b"chunk".to_vec());
        storage.retire((11, 3), vec!["tx_a".into(), "tx_b".into()]);
        storage.retire((12, 3), vec!["tx_c".into()]);
        storage.close();

        let (storage, loaded) = reopen(dir.path());
        let retired: Vec<(DocKey, &str)> = loaded
            .retired
            .iter()
            .map(|(d, t)| (*d, t.as_str()))
            .collect();
        assert_eq!(
            retired,
            [((11, 3), "tx_a"), ((11, 3), "tx_b"), ((12, 3), "tx_c")]
        );
        // Sequences go on past the notes' (a reused one would overwrite a row).
        assert!(storage.retire((12, 3), vec!["tx_d".into()]) > 3);
        storage.drop_document((11, 3));
        storage.close();

        let (_storage, loaded) = reopen(dir.path());
        let retired: Vec<&str> = loaded.retired.iter().map(|(_, t)| t.as_str()).collect();
        assert_eq!(retired, ["tx_c", "tx_d"]);
        assert!(!loaded.documents.contains_key(&(11, 3)));
    }
}
