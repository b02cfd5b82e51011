//! The allocation journal: an append-only log of new local allocations,
//! made durable with one `fdatasync` per group of appends before any of them
//! is acknowledged.
//!
//! Why a file of its own: an acknowledgement waits for this fsync and for
//! nothing else, so its latency bounds throughput (clients wait one commit
//! each). A sequential append costs one small write and one `fdatasync`; a
//! commit of the copy-on-write B-tree store rewrites a dozen pages of its
//! tables and allocator. The allocations reach the automerge documents (and
//! the store) shortly after, in the background; once their chunks are
//! durable, the store tells the journal to forget them, and a segment file
//! whose entries are all forgotten is deleted.
//!
//! Format: files `journal/<first sequence, 20 digits>.wal`, each a run of
//! entries `[len u32 LE][seq u64 LE][epoch u32 LE][check 8 bytes][record]`,
//! where `check` is the first 8 bytes of blake3 over seq, epoch and record.
//! Reading a file stops at the first entry that is short or fails its check
//! (a torn tail after a crash). Every start opens a new segment, so nothing
//! is ever appended after a torn tail.

use crate::group_commit::{Commit, CommitStats, GroupCommit, NotDurable, OnCommit, Sequenced};
use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// Directory of the journal inside the data dir.
pub const JOURNAL_DIR: &str = "journal";
/// A segment is sealed (and a new one started) past this size.
const SEGMENT_BYTES: u64 = 16 * 1024 * 1024;
/// Largest record an entry may hold; anything larger is read as corruption.
const MAX_RECORD: usize = 1024 * 1024;
/// Size of an entry header: len, seq, epoch, check.
const HEADER: usize = 4 + 8 + 4 + 8;

/// Journal failures; each names the file or step involved.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    /// A file operation failed.
    #[error("allocation journal: {step} {path}: {source}")]
    Io {
        /// What was being done.
        step: &'static str,
        /// File or directory involved.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// The writer has stopped (at shutdown).
    #[error("the allocation journal writer has stopped; nothing more can be made durable")]
    WriterStopped,
    /// Appends are failing (a full disk, an I/O error); the writer retries
    /// them with backoff and resumes by itself once they succeed.
    #[error(
        "the allocation journal cannot write now ({0}); retrying, nothing acknowledged is lost"
    )]
    WriteFailing(String),
}

impl From<NotDurable> for JournalError {
    fn from(e: NotDurable) -> Self {
        match e {
            NotDurable::Stopped => JournalError::WriterStopped,
            NotDurable::Failing(reason) => JournalError::WriteFailing(reason.to_string()),
        }
    }
}

fn io<'a>(step: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> JournalError + 'a {
    move |source| JournalError::Io {
        step,
        path: path.to_owned(),
        source,
    }
}

/// One entry read back at open: a local allocation that was acknowledged and
/// not yet known to be in a durable document chunk.
#[derive(Clone, Debug)]
pub struct JournalEntry {
    /// Its journal sequence (the key to forget it by).
    pub seq: u64,
    /// Epoch of the document it belongs to.
    pub epoch: u32,
    /// The allocation record, JSON.
    pub bytes: Vec<u8>,
}

struct Append {
    seq: u64,
    epoch: u32,
    bytes: Vec<u8>,
}

/// Live (not yet forgotten) entries per segment, by first sequence.
#[derive(Default)]
struct Segments {
    files: BTreeMap<u64, Segment>,
    /// Every entry up to here is written and counted in its segment.
    written_through: u64,
    /// Forgotten before the writer had counted them: an allocation can be
    /// folded into its document (and that chunk made durable) before its
    /// own journal write finishes. Applied once the writer has counted them.
    early: Vec<u64>,
}

struct Segment {
    path: PathBuf,
    live: u64,
    /// No more appends go here: it may be deleted once `live` is 0.
    sealed: bool,
}

impl Segments {
    fn forget(&mut self, seq: u64) {
        if seq > self.written_through {
            self.early.push(seq);
            return;
        }
        let Some((&first, segment)) = self.files.range_mut(..=seq).next_back() else {
            return;
        };
        segment.live = segment.live.saturating_sub(1);
        if segment.live == 0 && segment.sealed {
            self.remove(first);
        }
    }

    fn seal(&mut self, first: u64) {
        if let Some(segment) = self.files.get_mut(&first) {
            segment.sealed = true;
            if segment.live == 0 {
                self.remove(first);
            }
        }
    }

    /// Counts a batch the writer has just made durable in segment `first`,
    /// then applies the forgets that arrived before it.
    fn written(&mut self, first: u64, entries: u64, through: u64) {
        if let Some(segment) = self.files.get_mut(&first) {
            segment.live += entries;
        }
        self.written_through = through;
        if self.early.iter().any(|&seq| seq <= through) {
            let early = std::mem::take(&mut self.early);
            for seq in early {
                self.forget(seq);
            }
        }
    }

    fn remove(&mut self, first: u64) {
        if let Some(segment) = self.files.remove(&first) {
            if let Err(e) = std::fs::remove_file(&segment.path) {
                tracing::warn!(path = %segment.path.display(), error = %e, "could not delete a forgotten journal segment");
            }
        }
    }
}

/// Handle to the journal; cheap to share.
pub struct Journal {
    writer: GroupCommit<Append>,
    segments: Arc<Mutex<Segments>>,
}

impl Journal {
    /// Opens the journal under `data_dir`, reads back every entry still in
    /// it (in sequence order) and starts the writer on a new segment.
    /// `on_commit` is called by the writer after each group of appends.
    pub fn open(
        data_dir: &Path,
        on_commit: OnCommit,
    ) -> Result<(Arc<Self>, Vec<JournalEntry>), JournalError> {
        let dir = data_dir.join(JOURNAL_DIR);
        std::fs::create_dir_all(&dir).map_err(io("creating", &dir))?;
        let mut segments = Segments::default();
        let mut entries = Vec::new();
        let mut files: Vec<(u64, PathBuf)> = Vec::new();
        for item in std::fs::read_dir(&dir).map_err(io("listing", &dir))? {
            let path = item.map_err(io("listing", &dir))?.path();
            let first = path
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_suffix(".wal"))
                .and_then(|n| n.parse::<u64>().ok());
            match first {
                Some(first) => files.push((first, path)),
                None => {
                    tracing::warn!(path = %path.display(), "ignoring a file that is not a journal segment")
                }
            }
        }
        files.sort();
        for (first, path) in files {
            let read = read_segment(&path)?;
            segments.files.insert(
                first,
                Segment {
                    path,
                    live: read.len() as u64,
                    sealed: false,
                },
            );
            entries.extend(read);
        }
        entries.sort_by_key(|e| e.seq);
        let last = entries.last().map_or(0, |e| e.seq);
        let first_segment = segments.files.keys().next_back().map_or(0, |f| *f);
        let next = last.max(first_segment) + 1;
        // Old segments take no more appends; empty ones go at once.
        let old: Vec<u64> = segments.files.keys().copied().collect();
        for first in old {
            segments.seal(first);
        }
        segments.written_through = next - 1;
        let segments = Arc::new(Mutex::new(segments));
        let appender = Appender {
            dir,
            open: None,
            buffer: Vec::new(),
            segments: segments.clone(),
            on_commit,
        };
        let writer = GroupCommit::start("oncemesh-journal", next - 1, appender)
            .map_err(io("starting the writer thread for", data_dir))?;
        Ok((Arc::new(Self { writer, segments }), entries))
    }

    /// Queues a record for the journal; returns the sequence that is
    /// durable once [`Journal::wait_durable`] for it returns.
    pub fn append(&self, epoch: u32, bytes: Vec<u8>) -> u64 {
        self.writer.enqueue(|seq| Append { seq, epoch, bytes })
    }

    /// Forgets entries whose records are in durable document chunks; a
    /// sealed segment with nothing left is deleted.
    pub fn forget(&self, seqs: &[u64]) {
        let mut segments = self.segments.lock().unwrap_or_else(|p| p.into_inner());
        for &seq in seqs {
            segments.forget(seq);
        }
    }

    /// Waits until every entry up to `seq` is on disk.
    pub async fn wait_durable(&self, seq: u64) -> Result<(), JournalError> {
        Ok(self.writer.wait_durable(seq).await?)
    }

    /// Why appends are failing now, if they are.
    pub fn failing(&self) -> Option<Arc<str>> {
        self.writer.failing()
    }

    /// Appends that failed since start.
    pub fn failures(&self) -> u64 {
        self.writer.failures()
    }

    /// Entries not yet forgotten, over every segment.
    pub fn live_entries(&self) -> u64 {
        let segments = self.segments.lock().unwrap_or_else(|p| p.into_inner());
        segments.files.values().map(|s| s.live).sum()
    }

    /// Stops the writer after it has written everything queued so far.
    pub fn close(&self) {
        self.writer.close();
    }
}

fn check(seq: u64, epoch: u32, record: &[u8]) -> [u8; 8] {
    let mut hasher = blake3::Hasher::new();
    hasher.update(&seq.to_le_bytes());
    hasher.update(&epoch.to_le_bytes());
    hasher.update(record);
    let mut out = [0u8; 8];
    out.copy_from_slice(&hasher.finalize().as_bytes()[..8]);
    out
}

fn encode(entry: &Append, out: &mut Vec<u8>) {
    out.extend_from_slice(&(entry.bytes.len() as u32).to_le_bytes());
    out.extend_from_slice(&entry.seq.to_le_bytes());
    out.extend_from_slice(&entry.epoch.to_le_bytes());
    out.extend_from_slice(&check(entry.seq, entry.epoch, &entry.bytes));
    out.extend_from_slice(&entry.bytes);
}

/// Every whole, checked entry of a segment. An entry that does not check
/// (a torn tail after a crash, or bytes damaged on disk) is skipped: the
/// reader looks for the next offset where a whole entry checks, so damage in
/// the middle of a segment costs only the entries it touched, never the
/// intact ones after it. Skipped bytes are counted and logged.
fn read_segment(path: &Path) -> Result<Vec<JournalEntry>, JournalError> {
    let mut data = Vec::new();
    File::open(path)
        .and_then(|mut f| f.read_to_end(&mut data))
        .map_err(io("reading", path))?;
    let read = decode_segment(&data);
    if read.skipped_bytes > 0 {
        tracing::warn!(
            path = %path.display(),
            kept = read.entries.len(),
            skipped_bytes = read.skipped_bytes,
            damaged_runs = read.damaged_runs,
            "journal segment holds bytes that are not whole entries (a torn tail after a crash, or damage on disk); skipped them"
        );
    }
    Ok(read.entries)
}

/// What [`decode_segment`] found in a segment's bytes.
#[derive(Debug, Default)]
pub struct DecodedSegment {
    /// Every whole entry that checks, in file order.
    pub entries: Vec<JournalEntry>,
    /// Bytes that belong to no whole entry.
    pub skipped_bytes: usize,
    /// Runs of such bytes.
    pub damaged_runs: usize,
}

/// Reads the entries of a segment's bytes. Public so that recovery from a
/// damaged data dir can be fuzzed on bytes alone; never panics.
pub fn decode_segment(data: &[u8]) -> DecodedSegment {
    let mut read = DecodedSegment::default();
    let mut at = 0;
    while at < data.len() {
        if let Some(entry) = entry_at(data, at) {
            at += HEADER + entry.bytes.len();
            read.entries.push(entry);
            continue;
        }
        // Not an entry here: find where the next one starts.
        let next = (at + 1..data.len())
            .find(|&from| entry_at(data, from).is_some())
            .unwrap_or(data.len());
        read.skipped_bytes += next - at;
        read.damaged_runs += 1;
        at = next;
    }
    read
}

/// The entry starting at `at`, if a whole one that checks starts there.
fn entry_at(data: &[u8], at: usize) -> Option<JournalEntry> {
    let header = data.get(at..at + HEADER)?;
    let len = u32::from_le_bytes(header[0..4].try_into().ok()?) as usize;
    if len > MAX_RECORD {
        return None;
    }
    let seq = u64::from_le_bytes(header[4..12].try_into().ok()?);
    let epoch = u32::from_le_bytes(header[12..16].try_into().ok()?);
    let record = data.get(at + HEADER..at + HEADER + len)?;
    (check(seq, epoch, record) == header[16..24]).then(|| JournalEntry {
        seq,
        epoch,
        bytes: record.to_vec(),
    })
}

/// The open segment the writer appends to.
struct OpenSegment {
    first: u64,
    file: File,
    /// Bytes of whole, synced entries; past it the file may hold the torn
    /// remains of a failed append until they are cut off.
    len: u64,
    /// A failed append may have left bytes past `len`.
    torn: bool,
}

fn start_segment(
    dir: &Path,
    first: u64,
    segments: &Mutex<Segments>,
) -> Result<OpenSegment, JournalError> {
    let path = dir.join(format!("{first:020}.wal"));
    let file = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .map_err(io("creating", &path))?;
    // The new name must be durable before any entry in it is acknowledged.
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io("syncing", dir))?;
    segments
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .files
        .insert(
            first,
            Segment {
                path,
                live: 0,
                sealed: false,
            },
        );
    Ok(OpenSegment {
        first,
        file,
        len: 0,
        torn: false,
    })
}

/// The journal's side of group commit: one write and one `fdatasync` per batch.
struct Appender {
    dir: PathBuf,
    open: Option<OpenSegment>,
    buffer: Vec<u8>,
    segments: Arc<Mutex<Segments>>,
    on_commit: OnCommit,
}

impl Sequenced for Append {
    fn seq(&self) -> u64 {
        self.seq
    }
}

impl Commit<Append> for Appender {
    fn commit(&mut self, batch: &[Append]) -> Result<(), String> {
        let started = Instant::now();
        let last = self.write_batch(batch).map_err(|e| e.to_string())?;
        (self.on_commit)(CommitStats {
            journal: true,
            jobs: batch.len(),
            duration: started.elapsed(),
        });
        debug_assert!(last >= batch[0].seq);
        Ok(())
    }

    fn finish(&mut self) {
        if let Some(segment) = self.open.take() {
            self.segments
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .seal(segment.first);
        }
    }
}

impl Appender {
    /// Appends a batch with one write and one fdatasync; returns its last sequence.
    fn write_batch(&mut self, batch: &[Append]) -> Result<u64, JournalError> {
        let Some(first_seq) = batch.first().map(|e| e.seq) else {
            return Ok(0);
        };
        // A failed append is cut off before anything else is written: a
        // reader stops at the first entry that does not check, so entries
        // appended after torn bytes would never be read back.
        if let Some(segment) = self.open.as_mut().filter(|s| s.torn) {
            let path = self.dir.join(format!("{:020}.wal", segment.first));
            segment
                .file
                .set_len(segment.len)
                .and_then(|()| segment.file.sync_all())
                .map_err(io("cutting a failed append off", &path))?;
            segment.torn = false;
        }
        if self.open.as_ref().is_none_or(|s| s.len >= SEGMENT_BYTES) {
            if let Some(full) = self.open.take() {
                self.segments
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .seal(full.first);
            }
            self.open = Some(start_segment(&self.dir, first_seq, &self.segments)?);
        }
        let Some(segment) = self.open.as_mut() else {
            return Err(JournalError::WriterStopped);
        };
        self.buffer.clear();
        for entry in batch {
            encode(entry, &mut self.buffer);
        }
        let path = self.dir.join(format!("{:020}.wal", segment.first));
        let written = segment
            .file
            .write_all(&self.buffer)
            .map_err(io("appending to", &path))
            .and_then(|()| segment.file.sync_data().map_err(io("syncing", &path)));
        if let Err(e) = written {
            segment.torn = true;
            return Err(e);
        }
        segment.len += self.buffer.len() as u64;
        let last = batch.iter().map(|e| e.seq).max().unwrap_or(first_seq);
        self.segments
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .written(segment.first, batch.len() as u64, last);
        Ok(last)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }

    fn segment_files(dir: &Path) -> Vec<PathBuf> {
        let mut files: Vec<PathBuf> = std::fs::read_dir(dir.join(JOURNAL_DIR))
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        files.sort();
        files
    }

    #[test]
    fn entries_come_back_until_forgotten_and_segments_go_when_empty() {
        let dir = tempfile::tempdir().unwrap();
        let (journal, entries) = Journal::open(dir.path(), Arc::new(|_| {})).unwrap();
        assert!(entries.is_empty());
        let seqs: Vec<u64> = (0..5)
            .map(|i| journal.append(7, format!("record-{i}").into_bytes()))
            .collect();
        rt().block_on(journal.wait_durable(seqs[4])).unwrap();
        journal.forget(&seqs[..2]);
        journal.close();

        let (journal, entries) = Journal::open(dir.path(), Arc::new(|_| {})).unwrap();
        // Forgotten entries may come back (their segment still had live
        // ones); nothing unforgotten is ever missing, in order, intact.
        let back: Vec<u64> = entries.iter().map(|e| e.seq).collect();
        assert_eq!(back, seqs);
        assert!(entries.iter().all(|e| e.epoch == 7));
        assert_eq!(entries[3].bytes, b"record-3");
        // New sequences continue past everything on disk.
        let next = journal.append(8, b"later".to_vec());
        assert!(next > seqs[4]);
        rt().block_on(journal.wait_durable(next)).unwrap();
        // The old segment is sealed: once all of it is forgotten, it goes.
        assert_eq!(segment_files(dir.path()).len(), 2);
        journal.forget(&seqs);
        assert_eq!(segment_files(dir.path()).len(), 1);
        journal.close();
    }

    #[test]
    fn forgetting_before_the_write_is_counted_never_lost() {
        let dir = tempfile::tempdir().unwrap();
        let (journal, _) = Journal::open(dir.path(), Arc::new(|_| {})).unwrap();
        // The folder may forget an entry whose own write has not finished.
        let a = journal.append(1, b"a".to_vec());
        journal.forget(&[a]);
        rt().block_on(journal.wait_durable(a)).unwrap();
        assert_eq!(journal.live_entries(), 0);
        let b = journal.append(1, b"b".to_vec());
        rt().block_on(journal.wait_durable(b)).unwrap();
        assert_eq!(journal.live_entries(), 1);
        journal.forget(&[b]);
        assert_eq!(journal.live_entries(), 0);
        journal.close();
        // Closed with nothing live: the sealed segment is gone.
        assert!(segment_files(dir.path()).is_empty());
    }

    #[test]
    fn a_torn_tail_is_ignored_and_appends_go_to_a_new_segment() {
        let dir = tempfile::tempdir().unwrap();
        let (journal, _) = Journal::open(dir.path(), Arc::new(|_| {})).unwrap();
        let a = journal.append(1, b"first".to_vec());
        let b = journal.append(1, b"second".to_vec());
        rt().block_on(journal.wait_durable(b)).unwrap();
        journal.close();
        // Tear the last entry: cut its final byte, as a crash mid-write would.
        let file = segment_files(dir.path()).remove(0);
        let len = std::fs::metadata(&file).unwrap().len();
        OpenOptions::new()
            .write(true)
            .open(&file)
            .unwrap()
            .set_len(len - 1)
            .unwrap();
        let (journal, entries) = Journal::open(dir.path(), Arc::new(|_| {})).unwrap();
        assert_eq!(entries.iter().map(|e| e.seq).collect::<Vec<_>>(), [a]);
        let c = journal.append(1, b"third".to_vec());
        rt().block_on(journal.wait_durable(c)).unwrap();
        journal.close();
        let (_, entries) = Journal::open(dir.path(), Arc::new(|_| {})).unwrap();
        assert_eq!(entries.iter().map(|e| e.seq).collect::<Vec<_>>(), [a, c]);
    }

    #[test]
    fn damage_in_the_middle_costs_only_the_entries_it_touched() {
        let dir = tempfile::tempdir().unwrap();
        let (journal, _) = Journal::open(dir.path(), Arc::new(|_| {})).unwrap();
        let seqs: Vec<u64> = (0..10)
            .map(|i| journal.append(1, format!("record number {i}").into_bytes()))
            .collect();
        rt().block_on(journal.wait_durable(seqs[9])).unwrap();
        journal.close();
        let file = segment_files(dir.path()).remove(0);
        let mut data = std::fs::read(&file).unwrap();
        let entry = HEADER + "record number 0".len();
        // A flipped bit in entry 3's record, and entry 6's length field.
        data[3 * entry + HEADER + 2] ^= 0x01;
        data[6 * entry] ^= 0x80;
        std::fs::write(&file, data).unwrap();
        let (_, entries) = Journal::open(dir.path(), Arc::new(|_| {})).unwrap();
        let back: Vec<u64> = entries.iter().map(|e| e.seq).collect();
        let intact: Vec<u64> = seqs
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != 3 && *i != 6)
            .map(|(_, s)| *s)
            .collect();
        assert_eq!(back, intact);
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]
        /// Arbitrary damage (bit flips, overwritten runs, truncation) never
        /// panics, and every entry whose bytes it did not touch comes back.
        #[test]
        fn damage_never_loses_an_untouched_entry(
            flips in proptest::collection::vec((0usize..4096, 0u8..8), 0..6),
            cut in proptest::option::of(0usize..4096),
        ) {
            let dir = tempfile::tempdir().unwrap();
            let (journal, _) = Journal::open(dir.path(), Arc::new(|_| {})).unwrap();
            let seqs: Vec<u64> = (0..40)
                .map(|i| journal.append(i % 3, vec![b'a' + (i % 26) as u8; 20 + (i as usize * 7) % 60]))
                .collect();
            rt().block_on(journal.wait_durable(seqs[39])).unwrap();
            journal.close();
            let file = segment_files(dir.path()).remove(0);
            let original = std::fs::read(&file).unwrap();
            // Where each entry lies.
            let mut spans = Vec::new();
            let mut at = 0;
            while let Some(e) = entry_at(&original, at) {
                spans.push((e.seq, at, at + HEADER + e.bytes.len()));
                at += HEADER + e.bytes.len();
            }
            let mut data = original.clone();
            let mut touched = Vec::new();
            for (offset, bit) in flips {
                let offset = offset % data.len();
                data[offset] ^= 1 << bit;
                touched.push(offset);
            }
            let len = cut.map_or(data.len(), |c| c % (data.len() + 1));
            data.truncate(len);
            std::fs::write(&file, &data).unwrap();
            let (_, entries) = Journal::open(dir.path(), Arc::new(|_| {})).unwrap();
            let back: std::collections::BTreeSet<u64> = entries.iter().map(|e| e.seq).collect();
            for (seq, from, to) in spans {
                let intact = to <= len && !touched.iter().any(|&t| (from..to).contains(&t));
                if intact {
                    proptest::prop_assert!(back.contains(&seq), "entry {} lost", seq);
                }
            }
        }
    }

    #[test]
    fn a_corrupted_entry_is_not_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let (journal, _) = Journal::open(dir.path(), Arc::new(|_| {})).unwrap();
        let a = journal.append(1, b"kept".to_vec());
        let b = journal.append(1, b"flipped".to_vec());
        rt().block_on(journal.wait_durable(b)).unwrap();
        journal.close();
        let file = segment_files(dir.path()).remove(0);
        let mut data = std::fs::read(&file).unwrap();
        let last = data.len() - 1;
        data[last] ^= 0x40;
        std::fs::write(&file, data).unwrap();
        let (_, entries) = Journal::open(dir.path(), Arc::new(|_| {})).unwrap();
        assert_eq!(entries.iter().map(|e| e.seq).collect::<Vec<_>>(), [a]);
    }
}
