//! The allocation path: `Allocate(key, payload)` from the API's request to a
//! durable answer. The key and payload are checked, the allocation is
//! staked with its confidence ([`crate::estimator`]), decided in a batch on
//! its shard's queue ([`queue`]), and answered once durable.

pub mod queue;

use crate::estimator::Estimator;
use crate::key::{fingerprint, IdempotencyKey, InputError};
use crate::ledger::{AllocateError, AllocateRequest, Allocated, DocId, Ledger, SHARD_COUNT};
use crate::metrics::{Kind, Metrics};
use crate::peers::lag::LagTracker;
use crate::peers::status::PeerTable;
use crate::storage::{Storage, StorageError};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Why an allocate call failed, in API terms.
#[derive(Debug, thiserror::Error)]
pub enum AllocationFailure {
    /// The key or payload was invalid.
    #[error(transparent)]
    Input(#[from] InputError),
    /// Same key, different payload.
    #[error(transparent)]
    Refused(#[from] AllocateError),
    /// Could not be made durable: the node must not acknowledge.
    #[error("not durable: {0}")]
    Storage(#[from] StorageError),
    /// The node is shutting down.
    #[error("node is shutting down")]
    ShuttingDown,
}

/// The allocation path of one node, with the handles it needs.
pub struct Allocator {
    /// Where allocations are decided.
    ledger: Arc<Ledger>,
    /// Durability of what is acknowledged.
    storage: Arc<Storage>,
    /// Allocation counts and confidences.
    metrics: Arc<Metrics>,
    /// Stakes new allocations and learns from replays.
    estimator: Arc<Estimator>,
    /// Replication lag starts at an allocation.
    lag: Arc<Mutex<LagTracker>>,
    /// One queue per shard.
    queues: Vec<queue::Queue>,
}

impl Allocator {
    /// Starts a queue per shard and the folder; they stop on `shutdown`.
    #[allow(clippy::too_many_arguments)]
    pub fn start(
        ledger: Arc<Ledger>,
        storage: Arc<Storage>,
        metrics: Arc<Metrics>,
        peers: Arc<PeerTable>,
        lag: Arc<Mutex<LagTracker>>,
        estimator: Arc<Estimator>,
        tasks: &TaskTracker,
        shutdown: CancellationToken,
    ) -> Self {
        let fold_wanted = Arc::new(Notify::new());
        queue::spawn_folder(
            ledger.clone(),
            metrics.clone(),
            peers,
            lag.clone(),
            fold_wanted.clone(),
            tasks,
            shutdown.clone(),
        );
        let queues = (0..SHARD_COUNT)
            .map(|shard| {
                queue::spawn(
                    shard,
                    ledger.clone(),
                    fold_wanted.clone(),
                    tasks,
                    shutdown.clone(),
                )
            })
            .collect();
        Self {
            ledger,
            storage,
            metrics,
            estimator,
            lag,
            queues,
        }
    }

    /// Allocates `key` for `payload`: a new allocation, a replay, or a
    /// refusal. Answers only once the allocation is durable here. The key
    /// is raw bytes, as an HTTP header may carry any: an invalid key is
    /// refused (and counted) here, whatever form it came in.
    pub async fn allocate(
        &self,
        key: &[u8],
        payload: &serde_json::Value,
    ) -> Result<Allocated, AllocationFailure> {
        let outcome = self.try_allocate(key, payload).await;
        let kind = match &outcome {
            Ok(a) if a.replay => "replay",
            Ok(_) => "created",
            Err(AllocationFailure::Input(_)) => "invalid",
            Err(AllocationFailure::Refused(AllocateError::FingerprintMismatch { .. })) => {
                "mismatch"
            }
            Err(_) => "error",
        };
        self.metrics
            .allocations
            .get_or_create(&Kind::of(kind))
            .inc();
        outcome
    }

    async fn try_allocate(
        &self,
        key: &[u8],
        payload: &serde_json::Value,
    ) -> Result<Allocated, AllocationFailure> {
        let key = IdempotencyKey::parse_bytes(key)?;
        let fingerprint = fingerprint(payload)?;
        // While writes fail nothing new can be acknowledged: refuse before
        // the key enters the ledger (a replay of a durable allocation is
        // still answered, below).
        if let Some(reason) = self.storage.failing() {
            if self.ledger.key(key.as_str()).is_none() {
                return Err(AllocationFailure::Storage(StorageError::WriteFailing(
                    reason,
                )));
            }
        }
        let shard = key.shard(SHARD_COUNT);
        let assessment = self.estimator.assess(payload);
        let request = AllocateRequest {
            key,
            fingerprint,
            confidence: assessment.confidence,
            stake: assessment.stake,
        };
        let allocated = self.queues[shard]
            .submit(request)
            .await
            .ok_or(AllocationFailure::ShuttingDown)??;
        self.storage.wait(allocated.allocation.durable).await?;
        let record = &allocated.allocation.record;
        if allocated.replay {
            if *record.node != self.ledger.identity().node {
                self.metrics.cross_region_replays.inc();
            }
            if allocated.first_near_miss {
                let delay = self.ledger.wall_ms().saturating_sub(record.hlc.physical_ms);
                self.estimator
                    .observe_cross_region_replay(Duration::from_millis(delay));
            }
        } else {
            let doc = DocId {
                epoch: allocated.allocation.epoch,
                shard: shard as u8,
            };
            self.lag
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .allocated(doc, self.ledger.wall_ms());
            self.estimator
                .observe_allocation(assessment.episode, record.confidence);
            self.metrics
                .confidence_at_allocation
                .observe(record.confidence);
        }
        Ok(allocated)
    }
}
