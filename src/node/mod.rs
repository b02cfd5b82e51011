//! A running node: wires the subsystems to each other, to disk and to the
//! network, and owns their shutdown. Nothing else lives here: each
//! subsystem gets the few handles it needs (the ledger, storage, metrics,
//! the peer table, the estimator, the compensation engine, health), and
//! no module but the command line imports this one.

mod heap;

use crate::allocator::Allocator;
use crate::compensation::Compensations;
use crate::config::NodeConfig;
use crate::estimator::Estimator;
use crate::exposure::Pricing;
use crate::health::Health;
use crate::identity;
use crate::ledger::{
    ChunkSink, DocId, Ledger, MergeOutcome, NodeIdentity, OnMerge, Stored, StoredDocument, Windows,
};
use crate::metrics::{Kind, Metrics};
use crate::p2p::ChangeFeed;
use crate::peers::lag::LagTracker;
use crate::peers::status::PeerTable;
use crate::storage::{Storage, StorageError};
use libp2p::{Multiaddr, PeerId};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
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
    Network(#[from] crate::p2p::NetworkError),
    /// A payload pointer for the value at risk is not a JSON pointer.
    #[error(transparent)]
    Pricing(#[from] crate::exposure::PointerError),
    /// The compensation webhook's TLS files could not be used.
    #[error(transparent)]
    Compensation(#[from] crate::compensation::action::SetupError),
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

    fn retire(&self, doc: DocId, txns: Vec<String>) {
        self.storage.retire((doc.epoch, doc.shard), txns);
    }
}

/// A started node: its addresses, and the handle to wait for its shutdown.
pub struct Started {
    /// This node's region, for the banner.
    region: String,
    /// This node's libp2p identity.
    pub peer_id: PeerId,
    /// Bound HTTP address.
    pub http_addr: SocketAddr,
    /// libp2p listen addresses.
    pub listen_addrs: Vec<Multiaddr>,
    /// Flushed last, once every task has stopped.
    storage: Arc<Storage>,
    tasks: TaskTracker,
}

impl Started {
    /// The one line `oncemesh run` prints, which scripts parse.
    pub fn banner(&self) -> String {
        let mut line = format!(
            "oncemesh node started region={} peer_id={} http={}",
            self.region, self.peer_id, self.http_addr
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
        self.storage.close();
    }
}

/// Opens the data dir, loads the ledger, builds every subsystem with the
/// handles it needs and starts their tasks. Tasks stop when `shutdown` is
/// cancelled; then call [`Started::wait`].
pub async fn start(config: NodeConfig, shutdown: CancellationToken) -> Result<Started, StartError> {
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
                .map(|((epoch, shard), bytes)| (DocId { epoch, shard }, StoredDocument { bytes }))
                .collect(),
            journal: loaded.journal,
            retired: loaded
                .retired
                .into_iter()
                .map(|((epoch, shard), txn)| (DocId { epoch, shard }, txn))
                .collect(),
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
    let lag = Arc::new(Mutex::new(LagTracker::new(peer_ids)));
    let estimator = Arc::new(Estimator::new(
        ledger.clone(),
        peers.clone(),
        started_ms,
        config.sync_interval,
        pricing,
        Some(&config.data_dir),
    ));
    let allocator = Arc::new(Allocator::start(
        ledger.clone(),
        storage.clone(),
        metrics.clone(),
        peers.clone(),
        lag.clone(),
        estimator.clone(),
        &tasks,
        shutdown.clone(),
    ));
    let compensations = Arc::new(Compensations::new(
        ledger.clone(),
        storage.clone(),
        metrics.clone(),
        peer_id.to_string(),
        &config,
    ));
    let health = Arc::new(Health::new(
        ledger.clone(),
        storage.clone(),
        metrics.clone(),
        peers.clone(),
        lag.clone(),
        estimator.clone(),
        compensations.clone(),
        &config,
        peer_id.to_string(),
        started_ms,
    ));
    let on_merge = merge_reactions(
        ledger.clone(),
        metrics.clone(),
        estimator.clone(),
        compensations.clone(),
    );
    let listen_addrs = crate::p2p::spawn(
        crate::p2p::Handles {
            ledger: ledger.clone(),
            storage: storage.clone(),
            peers: peers.clone(),
            lag,
            metrics: metrics.clone(),
            changes,
            estimator: estimator.clone(),
            health: health.clone(),
            on_merge: on_merge.clone(),
            max_clock_offset: config.max_clock_offset,
        },
        &config,
        keypair,
        &tasks,
        shutdown.clone(),
    )
    .await?;
    compensations.spawn(executor, compensation_log, &tasks, shutdown.clone());
    spawn_retention(ledger.clone(), &tasks, shutdown.clone());
    spawn_learning(estimator.clone(), &tasks, shutdown.clone());
    spawn_compaction(ledger.clone(), &tasks, shutdown.clone());
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
    let app = crate::http::router(Arc::new(crate::http::Api {
        allocator,
        ledger,
        storage: storage.clone(),
        peers,
        estimator,
        compensations,
        health,
        metrics,
        on_merge,
        api_token: config.api_token.clone(),
        started_ms,
    }));
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
        region: config.region,
        peer_id,
        http_addr,
        listen_addrs,
        storage,
        tasks,
    })
}

/// What the node does with what a merge brought in (a peer's changes or an
/// uploaded document): counts and logs new conflicts, lets the confidence
/// model learn from the resolutions of our allocations among them, hands
/// their keys to the compensation engine, and counts malformed records.
fn merge_reactions(
    ledger: Arc<Ledger>,
    metrics: Arc<Metrics>,
    estimator: Arc<Estimator>,
    compensations: Arc<Compensations>,
) -> OnMerge {
    Arc::new(move |outcome: &MergeOutcome| {
        if !outcome.conflicts_changed.is_empty() {
            metrics
                .conflicts_detected
                .inc_by(outcome.conflicts_changed.len() as u64);
            for key in &outcome.conflicts_changed {
                let Some(view) = ledger.key(key) else {
                    continue;
                };
                tracing::warn!(key, allocations = view.allocations.len(), winner = %view.allocations[0].record.txn_id, "conflict detected");
            }
            // Conflicts involving our allocations reach the confidence model
            // as those allocations' resolutions.
            estimator.learn();
            compensations.conflicts_changed(outcome.conflicts_changed.iter().cloned());
        }
        if !outcome.malformed.is_empty() {
            metrics
                .dropped_messages
                .get_or_create(&Kind::of("malformed-record"))
                .inc_by(outcome.malformed.len() as u64);
        }
    })
}

/// Drops expired documents a few times per window.
fn spawn_retention(ledger: Arc<Ledger>, tasks: &TaskTracker, shutdown: CancellationToken) {
    let period = Duration::from_millis(ledger.windows().window_ms / 4)
        .clamp(Duration::from_millis(100), Duration::from_secs(60));
    tasks.spawn(async move {
        let mut tick = tokio::time::interval(period);
        loop {
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                _ = tick.tick() => {}
            }
            let ledger = ledger.clone();
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
fn spawn_compaction(ledger: Arc<Ledger>, tasks: &TaskTracker, shutdown: CancellationToken) {
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
            let ledger = ledger.clone();
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

/// Ticks of [`spawn_learning`] between two saves of what the model learnt.
const SAVE_LEARNT_TICKS: u32 = 20;

/// Keeps the partition episodes and the confidence model up to date when
/// no allocation comes: notes the node's situation and learns from what
/// resolved, twice a second; saves what the model learnt every ten seconds
/// and at shutdown, so that a restart goes on from it.
fn spawn_learning(estimator: Arc<Estimator>, tasks: &TaskTracker, shutdown: CancellationToken) {
    tasks.spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        let mut ticks = 0u32;
        loop {
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                _ = tick.tick() => {}
            }
            estimator.observe_situation();
            ticks += 1;
            if ticks.is_multiple_of(SAVE_LEARNT_TICKS) {
                let estimator = estimator.clone();
                let _ = tokio::task::spawn_blocking(move || estimator.save_learnt()).await;
            }
        }
        estimator.observe_situation();
        let _ = tokio::task::spawn_blocking(move || estimator.save_learnt()).await;
    });
}

/// Seconds between two releases of freed heap memory ([`heap`]).
const HEAP_TRIM_TICKS: u32 = 10;
