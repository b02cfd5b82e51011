//! The per-shard queues and the folder behind the allocation path.
//!
//! Per-shard queues gather concurrent requests into batches, each decided
//! under one shard lock: on the queue's own task when the lock is free, on
//! the blocking pool when a folding round or a peer's changes hold it.
//! A new allocation is acknowledged once its journal entry is durable; the
//! folder then writes pending allocations into their automerge documents in
//! the background, many per change, so automerge work leaves the request
//! path and its per-change cost is shared by every allocation of a round.

use crate::ledger::{AllocateError, AllocateRequest, Allocated, Ledger};
use crate::metrics::Metrics;
use crate::peers::lag::LagTracker;
use crate::peers::status::PeerTable;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, Notify};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Most requests folded into one batch.
const MAX_BATCH: usize = 512;
/// Requests that may wait for one shard before callers are slowed down.
const QUEUE_DEPTH: usize = 8192;
/// Least time between two folding rounds while a peer is connected: under
/// load, allocations gather for this long into one change per document; when
/// idle, the first new allocation is folded (and pushed to peers) at once.
/// Each round costs every document touched one change and one sync
/// exchange per peer, whatever it carries; 25 ms (against 10 ms) lifted a
/// replicating node's throughput by about a sixth, and stays far below a
/// client's cross-region retry delay.
const FOLD_INTERVAL: Duration = Duration::from_millis(25);
/// Time between folding rounds while no peer is connected. Nobody can
/// receive a change then, and every change costs each peer a fixed price
/// (hashing, decoding, applying, storing) when the partition heals, so
/// rounds gather 200 ms of allocations: eight times fewer changes to catch
/// up on. Longer rounds (1 s was tried) converged no faster and doubled a
/// lone node's p99, as each round holds a shard's lock longer. The journal
/// keeps allocations durable meanwhile.
const ALONE_FOLD_INTERVAL: Duration = Duration::from_millis(200);

type Reply = oneshot::Sender<Result<Allocated, AllocateError>>;

/// The sending side of one shard's queue.
#[derive(Clone)]
pub struct Queue {
    tx: mpsc::Sender<(AllocateRequest, Reply)>,
}

impl Queue {
    /// Queues a request and waits for its outcome; `None` when shutting down.
    pub async fn submit(
        &self,
        request: AllocateRequest,
    ) -> Option<Result<Allocated, AllocateError>> {
        let (reply, answer) = oneshot::channel();
        self.tx.send((request, reply)).await.ok()?;
        answer.await.ok()
    }
}

/// Starts the batching task of `shard`; `fold_wanted` is notified after
/// each batch that made new allocations.
pub fn spawn(
    shard: usize,
    ledger: Arc<Ledger>,
    fold_wanted: Arc<Notify>,
    tasks: &TaskTracker,
    shutdown: CancellationToken,
) -> Queue {
    let (tx, mut rx) = mpsc::channel::<(AllocateRequest, Reply)>(QUEUE_DEPTH);
    tasks.spawn(async move {
        let mut batch = Vec::with_capacity(MAX_BATCH);
        loop {
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                n = rx.recv_many(&mut batch, MAX_BATCH) => if n == 0 { break },
            }
            let (requests, replies): (Vec<_>, Vec<_>) = batch.drain(..).unzip();
            // Deciding a batch takes microseconds: it is done here unless
            // the shard is locked by a folding round or a peer's changes,
            // which can take milliseconds; then it waits on the blocking
            // pool, never on an async worker. (The hop to the pool was a
            // sixteenth of a loaded node's CPU when taken for every batch.)
            let outcomes = match ledger.try_allocate_batch(shard, &requests) {
                Some(outcomes) => outcomes,
                None => {
                    let ledger = ledger.clone();
                    match tokio::task::spawn_blocking(move || {
                        ledger.allocate_batch(shard, &requests)
                    })
                    .await
                    {
                        Ok(outcomes) => outcomes,
                        Err(e) => {
                            tracing::error!(shard, error = %e, "allocation batch task failed");
                            continue;
                        }
                    }
                }
            };
            if outcomes.iter().any(|o| o.as_ref().is_ok_and(|a| !a.replay)) {
                fold_wanted.notify_one();
            }
            for (reply, outcome) in replies.into_iter().zip(outcomes) {
                let _ = reply.send(outcome);
            }
        }
    });
    Queue { tx }
}

/// Starts the folder: whenever allocations are pending, writes them into
/// their documents ([`Ledger::fold_pending`]), at most once per
/// [`FOLD_INTERVAL`] while a peer is connected and once per
/// [`ALONE_FOLD_INTERVAL`] otherwise. At shutdown it folds what is left, so a
/// clean stop leaves an empty journal (a crash leaves it to the next start).
/// Each round tells `lag` which acknowledged allocations it surely wrote.
pub fn spawn_folder(
    ledger: Arc<Ledger>,
    metrics: Arc<Metrics>,
    peers: Arc<PeerTable>,
    lag: Arc<Mutex<LagTracker>>,
    fold_wanted: Arc<Notify>,
    tasks: &TaskTracker,
    shutdown: CancellationToken,
) {
    // Allocations recovered from the journal at start wait for no request.
    fold_wanted.notify_one();
    tasks.spawn(async move {
        loop {
            let stopping = tokio::select! {
                biased;
                _ = shutdown.cancelled() => true,
                _ = fold_wanted.notified() => false,
            };
            let folder = ledger.clone();
            let lag = lag.clone();
            let round = move || {
                let lock = || lag.lock().unwrap_or_else(|p| p.into_inner());
                let acknowledged = lock().take_unfolded();
                let folded = folder.fold_pending();
                lock().folded(acknowledged);
                folded
            };
            match tokio::task::spawn_blocking(round).await {
                Ok(0) => {}
                Ok(folded) => metrics.fold_batch.observe(folded as f64),
                Err(e) => tracing::error!(error = %e, "folding round failed"),
            }
            if stopping {
                break;
            }
            let round_started = tokio::time::Instant::now();
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep(FOLD_INTERVAL) => {}
                }
                // A peer that connects meanwhile gets the pending allocations
                // within one short interval.
                if peers.any_connected() || round_started.elapsed() >= ALONE_FOLD_INTERVAL {
                    break;
                }
            }
        }
    });
}
