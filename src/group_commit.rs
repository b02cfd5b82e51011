//! The machinery both durable writers share: jobs numbered in the order they
//! are queued, one writer thread that drains whatever is queued into one
//! commit (group commit), and a watermark every caller can wait on: each job
//! with a sequence at or below it is on disk.
//!
//! The store (`storage.rs`) and the allocation journal (`journal.rs`) differ
//! only in what a commit writes; this is the rest.

use std::sync::{mpsc, Mutex};
use std::thread::JoinHandle;
use tokio::sync::watch;

/// The writer has stopped (after an I/O error or at shutdown).
#[derive(Debug, Clone, Copy)]
pub struct WriterStopped;

/// A sequence-numbered queue in front of one writer thread.
pub struct GroupCommit<J> {
    queue: Mutex<(u64, Option<mpsc::Sender<J>>)>,
    durable: watch::Receiver<u64>,
    writer: Mutex<Option<JoinHandle<()>>>,
}

impl<J: Send + 'static> GroupCommit<J> {
    /// Starts thread `name` running `write`, which receives the jobs and
    /// publishes the highest durable sequence after each commit (returning
    /// stops the writer: every waiter then sees [`WriterStopped`]). Sequences
    /// continue after `last`, the highest one already on disk.
    pub fn start(
        name: &str,
        last: u64,
        write: impl FnOnce(mpsc::Receiver<J>, watch::Sender<u64>) + Send + 'static,
    ) -> std::io::Result<Self> {
        let (tx, rx) = mpsc::channel();
        let (durable_tx, durable_rx) = watch::channel(last);
        let writer = std::thread::Builder::new()
            .name(name.into())
            .spawn(move || write(rx, durable_tx))?;
        Ok(Self {
            queue: Mutex::new((last + 1, Some(tx))),
            durable: durable_rx,
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

    /// Waits until every job up to `seq` is on disk.
    pub async fn wait_durable(&self, seq: u64) -> Result<(), WriterStopped> {
        let mut rx = self.durable.clone();
        rx.wait_for(|&d| d >= seq)
            .await
            .map(|_| ())
            .map_err(|_| WriterStopped)
    }

    /// Highest durable sequence so far.
    pub fn durable_seq(&self) -> u64 {
        *self.durable.borrow()
    }

    /// Whether the writer has stopped.
    pub fn is_stopped(&self) -> bool {
        self.durable.has_changed().is_err()
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
