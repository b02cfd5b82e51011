//! A running node: wires the ledger to disk, the HTTP API, the peer network
//! and the compensation engine, and owns their shutdown.

pub mod allocator;
pub mod health;
mod heap;
pub mod identity;

use crate::confidence::calibration::{Calibration, CalibrationReport};
use crate::confidence::{ConfidenceModel, ConfidenceParams, Estimate, PeerView, Situation};
use crate::config::NodeConfig;
use crate::exposure::{Exposure, Pricing};
use crate::key::{fingerprint, IdempotencyKey, InputError};
use crate::ledger::{
    AllocateError, AllocateRequest, Allocated, ChunkSink, DocId, Ledger, MergeOutcome,
    NodeIdentity, Stake, Stored, StoredDocument, Windows, SHARD_COUNT,
};
use crate::metrics::{Kind, Metrics};
use crate::p2p::lag::LagTracker;
use crate::p2p::status::PeerTable;
use crate::storage::{Storage, StorageError};
use libp2p::{Multiaddr, PeerId};
use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Failures that stop a node from starting.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The identity key could not be loaded.
    #[error(transparent)]
    Identity(#[from] identity::IdentityError),
    /// The data dir could not be opened.
    #[error(transparent)]
    Storage(#[from] StorageError),
    /// Stored documents could not be read.
    #[error("stored ledger is unreadable: {0}")]
    Ledger(#[from] crate::ledger::document::DocumentError),
    /// The HTTP address could not be bound.
    #[error("cannot listen for HTTP on {addr}: {reason}")]
    Http {
        /// Address.
        addr: SocketAddr,
        /// Cause.
        reason: String,
    },
    /// The peer network could not start.
    #[error("peer network: {0}")]
    Network(String),
    /// A payload pointer for the value at risk is not a JSON pointer.
    #[error(transparent)]
    Pricing(#[from] crate::exposure::PointerError),
    /// The compensation webhook's TLS files could not be used.
    #[error(transparent)]
    Compensation(#[from] crate::compensation::action::SetupError),
}

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

/// Documents that changed since the peer network last looked, plus a wake-up.
#[derive(Default)]
pub struct ChangeFeed {
    dirty: Mutex<BTreeSet<DocId>>,
    notify: Notify,
}

impl ChangeFeed {
    /// Marks `doc` changed and wakes the network loop.
    pub fn mark(&self, doc: DocId) {
        self.dirty
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(doc);
        self.notify.notify_one();
    }

    /// Takes the set of changed documents.
    pub fn take(&self) -> BTreeSet<DocId> {
        std::mem::take(&mut *self.dirty.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// Resolves when something changed.
    pub async fn changed(&self) {
        self.notify.notified().await
    }
}

/// Makes ledger chunks durable through storage and tells the network.
struct StorageSink {
    storage: Arc<Storage>,
    feed: Arc<ChangeFeed>,
}

impl ChunkSink for StorageSink {
    fn journal(&self, epoch: u32, record: Vec<u8>) -> u64 {
        self.storage.append_journal(epoch, record)
    }

    fn forget_journal(&self, seqs: Vec<u64>) {
        self.storage.forget_journal(seqs);
    }

    fn persist(&self, doc: DocId, bytes: Vec<u8>) -> u64 {
        let seq = self.storage.append_chunk((doc.epoch, doc.shard), bytes);
        self.feed.mark(doc);
        seq
    }

    fn snapshot(&self, doc: DocId, bytes: Vec<u8>) -> u64 {
        self.storage
            .replace_with_snapshot((doc.epoch, doc.shard), bytes)
    }

    fn drop_document(&self, doc: DocId) {
        self.storage.drop_document((doc.epoch, doc.shard));
    }
}

/// The shared state of a running node, handed to the API and the engines.
pub struct Node {
    /// Validated configuration.
    pub config: NodeConfig,
    /// This node's libp2p identity.
    pub peer_id: PeerId,
    /// The ledger.
    pub ledger: Arc<Ledger>,
    /// Durable storage.
    pub storage: Arc<Storage>,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Allowlisted peers and what we know of them.
    pub peers: Arc<PeerTable>,
    /// Replication lag bookkeeping: allocations here against what each
    /// peer's digests show.
    pub lag: Arc<Mutex<LagTracker>>,
    /// The rolling baselines and fixed thresholds health is judged by.
    pub indicators: Mutex<health::Indicators>,
    /// Changed documents for the network to push.
    pub changes: Arc<ChangeFeed>,
    /// Confidence estimator fed by what this node observes.
    pub confidence: Mutex<ConfidenceModel>,
    /// The score of this node's confidence: reliability per situation and
    /// partition episodes.
    calibration: Mutex<Calibration>,
    /// Reads amounts and currencies from payloads, for the value at risk.
    pricing: Pricing,
    /// Wakes the compensation engine when a conflict appears or an operator retries.
    pub compensation_wakeup: Notify,
    /// This node's own compensations.
    pub compensations: crate::compensation::Registry,
    /// Keys whose conflict appeared or changed since the compensation engine
    /// last looked: it works from what changed, not from a rescan.
    conflict_inbox: Mutex<BTreeSet<String>>,
    allocators: Vec<allocator::Queue>,
    started_ms: u64,
}

/// A started node: its addresses, and the handle to wait for its shutdown.
pub struct Started {
    /// Shared state (for in-process tests and tools).
    pub node: Arc<Node>,
    /// Bound HTTP address.
    pub http_addr: SocketAddr,
    /// libp2p listen addresses.
    pub listen_addrs: Vec<Multiaddr>,
    tasks: TaskTracker,
}

impl Started {
    /// The one line `oncemesh run` prints, which scripts parse.
    pub fn banner(&self) -> String {
        let mut line = format!(
            "oncemesh node started region={} peer_id={} http={}",
            self.node.config.region, self.node.peer_id, self.http_addr
        );
        for addr in &self.listen_addrs {
            line.push_str(&format!(" listen={addr}"));
        }
        line
    }

    /// Waits until every task has stopped after shutdown, then flushes storage.
    pub async fn wait(self) {
        self.tasks.close();
        self.tasks.wait().await;
        self.node.storage.close();
    }
}

/// Drops expired documents a few times per window.
fn spawn_retention(node: Arc<Node>, tasks: &TaskTracker, shutdown: CancellationToken) {
    let period = Duration::from_millis(node.ledger.windows().window_ms / 4)
        .clamp(Duration::from_millis(100), Duration::from_secs(60));
    tasks.spawn(async move {
        let mut tick = tokio::time::interval(period);
        loop {
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                _ = tick.tick() => {}
            }
            let ledger = node.ledger.clone();
            if let Ok(dropped) = tokio::task::spawn_blocking(move || ledger.expire()).await {
                for doc in dropped {
                    tracing::info!(%doc, "dropped a document past the retention");
                }
            }
        }
    });
}

/// Compacts documents whose stored chunks are due for a full save, once a
/// second (the check is cheap; the save happens only when due), and hands
/// freed heap memory back to the kernel every [`HEAP_TRIM_TICKS`] seconds.
fn spawn_compaction(node: Arc<Node>, tasks: &TaskTracker, shutdown: CancellationToken) {
    tasks.spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        let mut ticks = 0u32;
        loop {
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                _ = tick.tick() => {}
            }
            ticks = ticks.wrapping_add(1);
            let trim = ticks.is_multiple_of(HEAP_TRIM_TICKS);
            let ledger = node.ledger.clone();
            let compacted = tokio::task::spawn_blocking(move || {
                let compacted = ledger.compact_due();
                if trim {
                    heap::release_free_memory();
                }
                compacted
            })
            .await;
            if let Ok(compacted @ 1..) = compacted {
                tracing::debug!(compacted, "compacted documents");
            }
        }
    });
}

/// Keeps the partition episodes and the confidence model up to date when
/// no allocation comes: notes the node's situation and learns from what
/// resolved, twice a second.
fn spawn_learning(node: Arc<Node>, tasks: &TaskTracker, shutdown: CancellationToken) {
    tasks.spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        loop {
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                _ = tick.tick() => {}
            }
            node.observe_situation();
        }
    });
}

/// Seconds between two releases of freed heap memory ([`heap`]).
const HEAP_TRIM_TICKS: u32 = 10;

impl Node {
    /// Opens the data dir, loads the ledger and starts every task. Tasks stop
    /// when `shutdown` is cancelled; then call [`Started::wait`].
    pub async fn start(
        config: NodeConfig,
        shutdown: CancellationToken,
    ) -> Result<Started, StartError> {
        let executor = crate::compensation::action::Executor::new(
            &config.compensation,
            &config.webhook,
            config.webhook_timeout,
        )?;
        let keypair = identity::load_or_create(&config.data_dir)?;
        let peer_id = keypair.public().to_peer_id();
        // The drill offset (0 unless rehearsing skew) applies to everything
        // the node's logic reads as time.
        let clock: crate::time::SharedClock = Arc::new(crate::time::OffsetClock {
            offset_ms: config.drill_clock_offset_ms,
        });
        let started_ms = crate::time::Clock::now_ms(&clock);
        let peers = Arc::new(PeerTable::new(
            config
                .peers
                .iter()
                .map(|p| (p.peer_id.to_string(), p.addr.to_string())),
        ));
        let metrics = Arc::new(Metrics::new(crate::metrics::PeerSeries {
            peers: peers.clone(),
            clock: clock.clone(),
            started_ms,
        }));
        let commit_metrics = metrics.clone();
        let (storage, mut loaded) = Storage::open(
            &config.data_dir,
            Arc::new(move |stats| {
                let (seconds, batch) = if stats.journal {
                    (
                        &commit_metrics.journal_commit_seconds,
                        &commit_metrics.journal_commit_batch,
                    )
                } else {
                    (&commit_metrics.commit_seconds, &commit_metrics.commit_batch)
                };
                seconds.observe(stats.duration.as_secs_f64());
                batch.observe(stats.jobs as f64);
            }),
        )?;
        let compensation_log = std::mem::take(&mut loaded.compensation_log);
        let changes = Arc::new(ChangeFeed::default());
        let sink = Arc::new(StorageSink {
            storage: storage.clone(),
            feed: changes.clone(),
        });
        let me = NodeIdentity {
            region: config.region.clone(),
            node: peer_id.to_string(),
        };
        let peer_ids: Vec<String> = config.peers.iter().map(|p| p.peer_id.to_string()).collect();
        let ledger = Arc::new(Ledger::open(
            me,
            peer_ids.clone(),
            clock,
            config.max_clock_offset.as_millis() as u64,
            Windows::for_retention(config.retention.as_millis() as u64),
            Stored {
                documents: loaded
                    .documents
                    .into_iter()
                    .map(|((epoch, shard), bytes)| {
                        (DocId { epoch, shard }, StoredDocument { bytes })
                    })
                    .collect(),
                journal: loaded.journal,
            },
            sink,
        )?);
        let recovered = ledger.recovered_from_journal();
        if recovered > 0 {
            tracing::info!(
                recovered,
                "recovered acknowledged allocations from the journal; folding them into their documents"
            );
        }
        metrics.journal_recovered.set(recovered as i64);
        let pricing = Pricing::new(&config.amount_pointer, &config.currency_pointer)?;
        let tasks = TaskTracker::new();
        let fold_wanted = Arc::new(Notify::new());
        let lag = Arc::new(Mutex::new(LagTracker::new(peer_ids.clone())));
        allocator::spawn_folder(
            ledger.clone(),
            metrics.clone(),
            peers.clone(),
            lag.clone(),
            fold_wanted.clone(),
            &tasks,
            shutdown.clone(),
        );
        let allocators = (0..SHARD_COUNT)
            .map(|shard| {
                allocator::spawn(
                    shard,
                    ledger.clone(),
                    fold_wanted.clone(),
                    &tasks,
                    shutdown.clone(),
                )
            })
            .collect();
        let node = Arc::new(Node {
            config: config.clone(),
            peer_id,
            ledger,
            storage,
            metrics,
            peers,
            lag,
            indicators: Mutex::new(health::Indicators::new(&config.health, &peer_ids)),
            changes,
            confidence: Mutex::new(ConfidenceModel::new(ConfidenceParams::default())),
            calibration: Mutex::new(Calibration::default()),
            pricing,
            compensation_wakeup: Notify::new(),
            compensations: Default::default(),
            conflict_inbox: Mutex::new(BTreeSet::new()),
            allocators,
            started_ms,
        });
        let listen_addrs =
            crate::p2p::spawn(node.clone(), keypair, &tasks, shutdown.clone()).await?;
        crate::compensation::spawn(
            node.clone(),
            executor,
            compensation_log,
            &tasks,
            shutdown.clone(),
        );
        spawn_retention(node.clone(), &tasks, shutdown.clone());
        spawn_learning(node.clone(), &tasks, shutdown.clone());
        spawn_compaction(node.clone(), &tasks, shutdown.clone());
        let listener = tokio::net::TcpListener::bind(config.http)
            .await
            .map_err(|e| StartError::Http {
                addr: config.http,
                reason: e.to_string(),
            })?;
        let http_addr = listener.local_addr().map_err(|e| StartError::Http {
            addr: config.http,
            reason: e.to_string(),
        })?;
        let app = crate::http::router(node.clone());
        let http_shutdown = shutdown.clone();
        tasks.spawn(async move {
            let served = axum::serve(listener, app)
                .with_graceful_shutdown(async move { http_shutdown.cancelled().await })
                .await;
            if let Err(e) = served {
                tracing::error!(error = %e, "HTTP server stopped");
            }
        });
        Ok(Started {
            node,
            http_addr,
            listen_addrs,
            tasks,
        })
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
        let estimate = self.estimate_now(self.ledger.peers());
        let episode = self
            .calibration()
            .observe_situation(estimate.situation, self.ledger.wall_ms());
        // With no peers nothing can compete: nothing to follow.
        let stake = (!self.ledger.peers().is_empty()).then(|| Stake {
            confidence: estimate.confidence,
            estimate: Some(estimate),
            episode,
            price: self.pricing.price(payload),
        });
        let request = AllocateRequest {
            key,
            fingerprint,
            confidence: estimate.confidence,
            stake,
        };
        let allocated = self.allocators[shard]
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
                self.confidence_model()
                    .observe_cross_region_replay(Duration::from_millis(delay));
            }
        } else {
            let doc = DocId {
                epoch: allocated.allocation.epoch,
                shard: shard as u8,
            };
            self.lag_tracker().allocated(doc, self.ledger.wall_ms());
            self.confidence_model().observe_allocation();
            self.calibration()
                .record_allocation(episode, record.confidence);
            self.metrics
                .confidence_at_allocation
                .observe(record.confidence);
        }
        Ok(allocated)
    }

    /// The confidence a new (or still provisional) allocation has: every
    /// allowlisted peer counts, those in `unsynced` with the staleness of our
    /// view of them, the others as in sync (they already hold the key).
    pub fn confidence_now(&self, unsynced: &[String]) -> f64 {
        if unsynced.is_empty() {
            return 1.0;
        }
        self.estimate_now(unsynced).confidence
    }

    /// [`Node::confidence_now`] with the situation and the terms behind it,
    /// after learning from what resolved meanwhile.
    fn estimate_now(&self, unsynced: &[String]) -> Estimate {
        self.learn();
        let views = self.peer_views(unsynced);
        self.confidence_model().estimate(&views)
    }

    /// One view per allowlisted peer, as the confidence model takes them.
    fn peer_views(&self, unsynced: &[String]) -> Vec<PeerView> {
        let now = self.ledger.wall_ms();
        self.peers
            .snapshot()
            .into_iter()
            .map(|p| {
                if !unsynced.contains(&p.peer_id) {
                    return PeerView {
                        staleness: Duration::ZERO,
                        connected: true,
                    };
                }
                // Never in sync since this process started: treat as a
                // partition as old as the process. The gap between two
                // anti-entropy rounds is normal, not staleness.
                let staleness = p
                    .staleness(now)
                    .unwrap_or_else(|| Duration::from_millis(now.saturating_sub(self.started_ms)));
                PeerView {
                    staleness: staleness.saturating_sub(self.config.sync_interval),
                    connected: p.connected,
                }
            })
            .collect()
    }

    /// Feeds the confidence model and the calibration score with this node's
    /// allocations that resolved since the last call.
    pub fn learn(&self) {
        let resolved = self.ledger.take_resolutions();
        if resolved.is_empty() {
            return;
        }
        {
            let mut model = self.confidence_model();
            for r in &resolved {
                let Some(estimate) = r.stake.estimate else {
                    continue;
                };
                if let Some(ms) = r.conflict_after_ms {
                    model.observe_conflict(Duration::from_millis(ms), estimate.situation);
                }
                model.observe_resolved(&estimate, r.conflict_after_ms.is_some());
            }
        }
        let mut calibration = self.calibration();
        for r in &resolved {
            calibration.record_resolved(
                r.stake.estimate.map(|e| e.situation),
                r.stake.episode,
                r.stake.confidence,
                r.conflict_after_ms.is_some(),
            );
        }
    }

    /// Tells the episode tracker where this node stands now, and learns:
    /// called as peers come and go, and twice a second.
    pub fn observe_situation(&self) {
        self.learn();
        let situation = Situation::of(&self.peer_views(self.ledger.peers()));
        self.calibration()
            .observe_situation(situation, self.ledger.wall_ms());
    }

    /// `GET /v1/calibration`: how well this node's confidence held.
    pub fn calibration_report(&self) -> CalibrationReport {
        self.observe_situation();
        self.calibration().report()
    }

    /// Expected duplicates and value at risk of this node's provisional allocations.
    pub fn exposure(&self) -> Exposure {
        self.pricing.report(&self.ledger.exposure())
    }

    fn calibration(&self) -> std::sync::MutexGuard<'_, Calibration> {
        self.calibration.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues a key for the compensation engine to look at again.
    pub fn note_changed_conflict(&self, key: &str) {
        self.conflict_inbox
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key.to_owned());
    }

    /// Takes the keys whose conflicts changed since the last call.
    pub fn take_changed_conflicts(&self) -> BTreeSet<String> {
        std::mem::take(
            &mut *self
                .conflict_inbox
                .lock()
                .unwrap_or_else(|p| p.into_inner()),
        )
    }

    /// The replication lag bookkeeping, locked.
    pub fn lag_tracker(&self) -> std::sync::MutexGuard<'_, LagTracker> {
        self.lag.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The health indicators, locked.
    pub fn indicators(&self) -> std::sync::MutexGuard<'_, health::Indicators> {
        self.indicators.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// When this process started, by the node's (possibly drilled) clock.
    pub fn started_ms(&self) -> u64 {
        self.started_ms
    }

    /// The confidence model, locked.
    pub fn confidence_model(&self) -> std::sync::MutexGuard<'_, ConfidenceModel> {
        self.confidence.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Acts on what a merge brought in: clock observations, conflicts (for the
    /// confidence model, metrics and the compensation engine).
    pub fn after_merge(&self, outcome: &MergeOutcome) {
        if !outcome.conflicts_changed.is_empty() {
            self.metrics
                .conflicts_detected
                .inc_by(outcome.conflicts_changed.len() as u64);
            for key in &outcome.conflicts_changed {
                let Some(view) = self.ledger.key(key) else {
                    continue;
                };
                tracing::warn!(key, allocations = view.allocations.len(), winner = %view.allocations[0].record.txn_id, "conflict detected");
            }
            // Conflicts involving our allocations reach the confidence model
            // as those allocations' resolutions.
            self.learn();
            self.conflict_inbox
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .extend(outcome.conflicts_changed.iter().cloned());
            self.compensation_wakeup.notify_one();
        }
        if !outcome.malformed.is_empty() {
            self.metrics
                .dropped_messages
                .get_or_create(&Kind::of("malformed-record"))
                .inc_by(outcome.malformed.len() as u64);
        }
    }
}
