//! The machinery both durable writers share: jobs numbered in the order they
//! are queued, one writer thread that drains whatever is queued into one
//! commit (group commit), and a watermark every caller can wait on: each job
//! with a sequence at or below it is on disk.
//!
//! A commit that fails (a full disk, an I/O error) is never acknowledged and
//! never dropped: the writer keeps the jobs, tells every waiter that writes
//! are failing (they answer with an error at once), and tries the same jobs
//! again with backoff, together with whatever was queued meanwhile, until a
//! commit succeeds. Then the watermark moves past all of them and the writer
//! is healthy again, with no restart. A job a caller was told had failed may
//! therefore become durable later; it was never acknowledged, so that is
//! safe (a retry of that allocation is answered as a replay).
//!
//! The store (`storage.rs`) and the allocation journal (`journal.rs`) differ
//! only in what a commit writes ([`Commit`]); this is the rest.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;
use tokio::sync::watch;

/// What a writer thread reports after each group commit.
#[derive(Clone, Copy, Debug, Default)]
pub struct CommitStats {
    /// True for the allocation journal, false for the document store.
    pub journal: bool,
    /// Jobs (journal: entries) in the commit.
    pub jobs: usize,
    /// Time of the commit (write + fsync).
    pub duration: Duration,
}

/// Called by the writer threads after each group commit.
pub type OnCommit = Arc<dyn Fn(CommitStats) + Send + Sync>;

/// Why a wait for durability ended without it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NotDurable {
    /// The writer has stopped (at shutdown).
    #[error("the writer has stopped")]
    Stopped,
    /// Commits are failing; the writer keeps retrying with backoff.
    #[error("writes are failing and being retried: {0}")]
    Failing(Arc<str>),
}

/// What one commit writes; implemented by each durable writer.
pub trait Commit<J>: Send + 'static {
    /// Makes every job of `jobs` durable, or fails (then the same jobs, and
    /// perhaps more, come again). Must leave nothing on disk that a later
    /// commit of the same jobs would read wrongly.
    fn commit(&mut self, jobs: &[J]) -> Result<(), String>;
    /// Called once after the last commit, at shutdown.
    fn finish(&mut self) {}
}

/// A job's sequence number.
pub trait Sequenced {
    /// The sequence it was queued with.
    fn seq(&self) -> u64;
}

/// Where the writer stands, as waiters see it.
#[derive(Debug, Clone, Default)]
struct Progress {
    durable: u64,
    failing: Option<Arc<str>>,
}

/// Most jobs taken into one commit.
const MAX_BATCH: usize = 8192;
/// First wait before a failed commit is tried again; it doubles up to [`MAX_RETRY_WAIT`].
const FIRST_RETRY_WAIT: Duration = Duration::from_millis(50);
/// Longest wait between two tries of a failing commit: how soon a freed disk is used again.
const MAX_RETRY_WAIT: Duration = Duration::from_secs(2);

/// A sequence-numbered queue in front of one writer thread.
pub struct GroupCommit<J> {
    queue: Mutex<(u64, Option<mpsc::Sender<J>>)>,
    progress: watch::Receiver<Progress>,
    failures: Arc<AtomicU64>,
    writer: Mutex<Option<JoinHandle<()>>>,
}

impl<J: Sequenced + Send + 'static> GroupCommit<J> {
    /// Starts thread `name` committing with `writer`. Sequences continue
    /// after `last`, the highest one already on disk.
    pub fn start(name: &str, last: u64, writer: impl Commit<J>) -> std::io::Result<Self> {
        let (tx, rx) = mpsc::channel();
        let (progress_tx, progress_rx) = watch::channel(Progress {
            durable: last,
            failing: None,
        });
        let failures = Arc::new(AtomicU64::new(0));
        let counted = failures.clone();
        let thread_name = name.to_owned();
        let writer = std::thread::Builder::new()
            .name(name.into())
            .spawn(move || write_loop(&thread_name, rx, progress_tx, counted, writer))?;
        Ok(Self {
            queue: Mutex::new((last + 1, Some(tx))),
            progress: progress_rx,
            failures,
            writer: Mutex::new(Some(writer)),
        })
    }

    /// Queues the job `make` builds for its sequence; returns the sequence.
    pub fn enqueue(&self, make: impl FnOnce(u64) -> J) -> u64 {
        let mut queue = self.queue.lock().unwrap_or_else(|p| p.into_inner());
        let seq = queue.0;
        queue.0 += 1;
        let sent = queue.1.as_ref().map(|tx| tx.send(make(seq)).is_ok());
        if sent != Some(true) {
            tracing::error!(seq, "writer is gone; this write will never be durable");
        }
        seq
    }

    /// Waits until every job up to `seq` is on disk; fails at once while
    /// commits are failing.
    pub async fn wait_durable(&self, seq: u64) -> Result<(), NotDurable> {
        let mut rx = self.progress.clone();
        let progress = rx
            .wait_for(|p| p.durable >= seq || p.failing.is_some())
            .await
            .map_err(|_| NotDurable::Stopped)?;
        match &progress.failing {
            _ if progress.durable >= seq => Ok(()),
            Some(reason) => Err(NotDurable::Failing(reason.clone())),
            None => Err(NotDurable::Stopped),
        }
    }

    /// Highest durable sequence so far.
    pub fn durable_seq(&self) -> u64 {
        self.progress.borrow().durable
    }

    /// Why commits are failing now, if they are.
    pub fn failing(&self) -> Option<Arc<str>> {
        self.progress.borrow().failing.clone()
    }

    /// Commits that failed since start.
    pub fn failures(&self) -> u64 {
        self.failures.load(Ordering::Relaxed)
    }

    /// Stops the writer after it has written everything queued so far.
    pub fn close(&self) {
        let sender = self
            .queue
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .1
            .take();
        drop(sender);
        if let Some(handle) = self.writer.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let _ = handle.join();
        }
    }
}

fn write_loop<J: Sequenced>(
    name: &str,
    rx: mpsc::Receiver<J>,
    progress: watch::Sender<Progress>,
    failures: Arc<AtomicU64>,
    mut writer: impl Commit<J>,
) {
    let mut batch: Vec<J> = Vec::new();
    let mut wait = FIRST_RETRY_WAIT;
    loop {
        if batch.is_empty() {
            match rx.recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        let room = MAX_BATCH.saturating_sub(batch.len());
        batch.extend(rx.try_iter().take(room));
        match writer.commit(&batch) {
            Ok(()) => {
                let last = batch.iter().map(Sequenced::seq).max().unwrap_or(0);
                let recovered = progress.borrow().failing.is_some();
                progress.send_modify(|p| {
                    p.durable = p.durable.max(last);
                    p.failing = None;
                });
                if recovered {
                    tracing::warn!(
                        writer = name,
                        "writes succeed again; the writer has resumed"
                    );
                }
                batch.clear();
                wait = FIRST_RETRY_WAIT;
            }
            Err(reason) => {
                // Never acknowledge what is not on disk, never drop it:
                // waiters answer with an error now, the jobs are tried again.
                let n = failures.fetch_add(1, Ordering::Relaxed) + 1;
                if n == 1 || progress.borrow().failing.is_none() || n.is_multiple_of(32) {
                    tracing::error!(writer = name, failures = n, error = %reason, jobs = batch.len(), "commit failed; refusing new writes and trying again with backoff");
                }
                progress.send_modify(|p| p.failing = Some(reason.into()));
                std::thread::sleep(wait);
                wait = (wait * 2).min(MAX_RETRY_WAIT);
            }
        }
    }
    writer.finish();
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Job(u64);
    impl Sequenced for Job {
        fn seq(&self) -> u64 {
            self.0
        }
    }

    /// Fails while `broken` is set; records what it committed.
    struct Flaky {
        broken: Arc<std::sync::atomic::AtomicBool>,
        written: Arc<Mutex<Vec<u64>>>,
    }

    impl Commit<Job> for Flaky {
        fn commit(&mut self, jobs: &[Job]) -> Result<(), String> {
            if self.broken.load(Ordering::SeqCst) {
                return Err("No space left on device".into());
            }
            let mut written = self.written.lock().unwrap();
            written.extend(jobs.iter().map(|j| j.0));
            Ok(())
        }
    }

    #[test]
    fn a_failing_writer_refuses_waiters_then_resumes_with_every_job() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let broken = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let written = Arc::new(Mutex::new(Vec::new()));
        let writer = GroupCommit::start(
            "test-writer",
            0,
            Flaky {
                broken: broken.clone(),
                written: written.clone(),
            },
        )
        .unwrap();
        let a = writer.enqueue(Job);
        rt.block_on(writer.wait_durable(a)).unwrap();
        broken.store(true, Ordering::SeqCst);
        let b = writer.enqueue(Job);
        let refused = rt.block_on(writer.wait_durable(b));
        assert!(
            matches!(&refused, Err(NotDurable::Failing(r)) if r.contains("No space")),
            "{refused:?}"
        );
        assert!(writer.failing().is_some());
        let c = writer.enqueue(Job);
        assert!(rt.block_on(writer.wait_durable(c)).is_err());
        // What was durable stays answerable while failing.
        rt.block_on(writer.wait_durable(a)).unwrap();
        broken.store(false, Ordering::SeqCst);
        let d = writer.enqueue(Job);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while writer.failing().is_some() && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        rt.block_on(writer.wait_durable(d)).unwrap();
        assert!(writer.failing().is_none());
        assert!(writer.failures() >= 1);
        assert_eq!(
            *written.lock().unwrap(),
            [a, b, c, d],
            "nothing dropped, in order"
        );
        writer.close();
        assert_eq!(
            rt.block_on(writer.wait_durable(d + 1)),
            Err(NotDurable::Stopped)
        );
    }
}
