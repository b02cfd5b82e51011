//! Per-shard allocation queues: concurrent requests for one shard are
//! gathered into batches so each batch costs one automerge change and one
//! durable chunk, instead of one each per request (group commit reaches
//! down into the document).

use crate::ledger::{AllocateError, AllocateRequest, Allocated, Ledger};
use std::sync::Arc;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Most requests folded into one batch.
const MAX_BATCH: usize = 512;
/// Requests that may wait for one shard before callers are slowed down.
const QUEUE_DEPTH: usize = 8192;

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

/// Starts the batching task of `shard`.
pub fn spawn(
    shard: usize,
    ledger: Arc<Ledger>,
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
            let ledger = ledger.clone();
            // Automerge work is CPU-bound: keep it off the async workers.
            let outcomes =
                match tokio::task::spawn_blocking(move || ledger.allocate_batch(shard, &requests))
                    .await
                {
                    Ok(outcomes) => outcomes,
                    Err(e) => {
                        tracing::error!(shard, error = %e, "allocation batch task failed");
                        continue;
                    }
                };
            for (reply, outcome) in replies.into_iter().zip(outcomes) {
                let _ = reply.send(outcome);
            }
        }
    });
    Queue { tx }
}
