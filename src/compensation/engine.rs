use super::action::{self, Executor};
use super::machine::{Compensation, CompensationState, LogEntry, RetryPolicy};
use super::subject::{self, Subject};
use crate::config::NodeConfig;
use crate::ledger::{KeyView, Ledger};
use crate::metrics::Metrics;
use crate::record::{CompensationRecord, RECORD_VERSION};
use crate::storage::{Storage, StorageError};
use axum::http::StatusCode;
use futures::stream::{FuturesUnordered, StreamExt};
use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Most compensation attempts (of different losers) run at once; a
/// webhook endpoint sees at most this many concurrent requests from a node.
const ATTEMPTS_IN_FLIGHT: usize = 16;
/// How often the engine looks whether storage writes again while it fails.
const STORAGE_POLL: Duration = Duration::from_millis(250);

#[derive(Clone)]
struct Tracked {
    machine: Compensation,
    /// The loser and its winner, as the action is given them.
    subject: Subject,
    /// Its key has left the ledger (the winner passed the retention): it
    /// runs on until it ends, and is forgotten then.
    outlived: bool,
}

impl Tracked {
    fn key(&self) -> &str {
        &self.subject.loser.key
    }
}

/// The compensation engine of one node: its state and the handles it needs.
/// The node's API and health reach it through this type only.
pub struct Compensations {
    /// Where conflicts are read and compensation states published.
    ledger: Arc<Ledger>,
    /// The durable compensation log.
    storage: Arc<Storage>,
    /// Compensation counts and durations.
    metrics: Arc<Metrics>,
    /// This node's peer id: the owner of every compensation it runs.
    owner: String,
    /// How failing attempts are retried.
    policy: RetryPolicy,
    /// This node's compensations, keyed by losing transaction id.
    registry: Mutex<HashMap<String, Tracked>>,
    /// States waiting to be written into the ledger. The engine writes them
    /// all at each turn of its loop: after a partition a node moves a
    /// hundred compensations through three states within milliseconds, and
    /// a change per transition meant as many automerge changes, each synced
    /// to every peer on its own.
    outbox: Mutex<Vec<CompensationRecord>>,
    /// Keys whose conflict appeared or changed since the engine last looked:
    /// it works from what changed, not from a rescan.
    inbox: Mutex<BTreeSet<String>>,
    /// Wakes the engine when a conflict appears, a state is queued or an
    /// operator retries.
    wakeup: Notify,
}

/// Why an operator retry was refused.
#[derive(Debug, thiserror::Error)]
pub enum RetryError {
    /// No compensation with that transaction id on this node.
    #[error("no compensation for transaction '{0}' is owned by this node")]
    NotFound(String),
    /// The compensation is not dead-lettered.
    #[error("compensation of '{txn}' is {state}; only dead-lettered compensations can be retried")]
    NotDeadLettered {
        /// Transaction.
        txn: String,
        /// Its state.
        state: CompensationState,
    },
    /// The log entry could not be made durable.
    #[error("could not log the retry: {0}")]
    Storage(String),
}

impl RetryError {
    /// HTTP status for the API.
    pub fn status(&self) -> StatusCode {
        match self {
            RetryError::NotFound(_) => StatusCode::NOT_FOUND,
            RetryError::NotDeadLettered { .. } => StatusCode::CONFLICT,
            RetryError::Storage(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

impl Compensations {
    /// An engine with nothing tracked yet, retrying as `config` says; it
    /// acts once [`Compensations::spawn`]ed.
    pub fn new(
        ledger: Arc<Ledger>,
        storage: Arc<Storage>,
        metrics: Arc<Metrics>,
        owner: String,
        config: &NodeConfig,
    ) -> Self {
        Self {
            ledger,
            storage,
            metrics,
            owner,
            policy: RetryPolicy {
                max_attempts: config.compensation_max_attempts,
                initial_backoff_ms: millis(config.compensation_initial_backoff),
                max_backoff_ms: millis(config.compensation_max_backoff),
                ..RetryPolicy::default()
            },
            registry: Mutex::new(HashMap::new()),
            outbox: Mutex::new(Vec::new()),
            inbox: Mutex::new(BTreeSet::new()),
            wakeup: Notify::new(),
        }
    }

    fn registry(&self) -> std::sync::MutexGuard<'_, HashMap<String, Tracked>> {
        self.registry.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues keys whose conflicts appeared or changed and wakes the engine.
    pub fn conflicts_changed(&self, keys: impl IntoIterator<Item = String>) {
        self.inbox
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend(keys);
        self.wakeup.notify_one();
    }

    /// Puts conflicts back in the inbox without waking the engine: it
    /// looks at them at a later turn.
    fn look_again_later(&self, conflicts: Vec<KeyView>) {
        self.inbox
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend(conflicts.into_iter().map(|c| c.key));
    }

    /// Takes the keys whose conflicts changed since the last call.
    fn take_changed_conflicts(&self) -> BTreeSet<String> {
        std::mem::take(&mut *self.inbox.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// (in flight, dead-lettered) counts of this node's compensations.
    pub fn own_counts(&self) -> (usize, usize) {
        let entries = self.registry();
        let dead = entries
            .values()
            .filter(|t| t.machine.state == CompensationState::DeadLettered)
            .count();
        let in_flight = entries
            .values()
            .filter(|t| !t.machine.state.is_terminal())
            .count();
        (in_flight, dead)
    }

    /// Operator retry of a dead-lettered compensation.
    pub async fn operator_retry(&self, txn: &str) -> Result<CompensationRecord, RetryError> {
        // Refused at once while nothing can be written, rather than held
        // until the disk has room.
        if let Some(reason) = self.storage.failing() {
            return Err(RetryError::Storage(reason));
        }
        let now = self.ledger.wall_ms();
        let (entry, tracked) = {
            let mut entries = self.registry();
            let tracked = entries
                .get_mut(txn)
                .ok_or_else(|| RetryError::NotFound(txn.to_owned()))?;
            let mut machine = tracked.machine.clone();
            let entry = machine
                .operator_retry(now)
                .map_err(|_| RetryError::NotDeadLettered {
                    txn: txn.to_owned(),
                    state: tracked.machine.state,
                })?;
            tracked.machine = machine;
            (entry, tracked.clone())
        };
        self.append(txn, &entry)
            .await
            .map_err(RetryError::Storage)?;
        let record = self.publish(&tracked);
        tracing::info!(txn, "operator re-queued a dead-lettered compensation");
        self.wakeup.notify_one();
        Ok(record)
    }

    /// Appends a log entry and waits until it is durable, through a spell
    /// of failing writes too: the writer never drops an entry it was given
    /// (it keeps it and writes it once writes succeed), so giving up on it
    /// and logging the transition again later would log it twice, and a
    /// log with a transition twice cannot be replayed at restart. Fails only
    /// when the writer has stopped.
    async fn append(&self, txn: &str, entry: &LogEntry) -> Result<(), String> {
        let bytes = serde_json::to_vec(entry).map_err(|e| e.to_string())?;
        self.append_all(txn, vec![bytes]).await
    }

    /// Appends the entry of a compensation's (new) subject and waits until
    /// it is durable, as [`Compensations::append`] does.
    async fn append_subject(&self, txn: &str, subject: &Subject) -> Result<(), String> {
        let bytes = subject.encode().map_err(|e| e.to_string())?;
        self.append_all(txn, vec![bytes]).await
    }

    /// Appends encoded log entries in order and waits until all are
    /// durable, through failing writes (see [`Compensations::append`]).
    async fn append_all(&self, txn: &str, entries: Vec<Vec<u8>>) -> Result<(), String> {
        let mut seq = 0;
        for bytes in entries {
            seq = self.storage.append_log_entry(txn, bytes);
        }
        loop {
            match self.storage.wait_durable(seq).await {
                Err(StorageError::WriteFailing(_)) => tokio::time::sleep(STORAGE_POLL).await,
                done => return done.map_err(|e| e.to_string()),
            }
        }
    }

    /// The compensation's state as every region's conflict report shows it.
    fn record_of(&self, tracked: &Tracked) -> CompensationRecord {
        let c = &tracked.machine;
        CompensationRecord {
            v: RECORD_VERSION,
            key: tracked.key().to_owned(),
            txn_id: c.loser_txn.clone(),
            winner_txn_id: tracked.subject.winner.txn_id.to_string(),
            owner: self.owner.clone(),
            idempotency_key: c.idempotency_key.clone(),
            state: c.state,
            attempts: c.attempts,
            last_error: c.last_error.clone(),
            next_attempt_at_ms: c.next_attempt_at_ms,
            detected_at_ms: c.detected_at_ms,
            succeeded_at_ms: c.succeeded_at_ms,
        }
    }

    /// Writes compensation states into the replicated ledger.
    fn write(&self, records: &[CompensationRecord]) {
        if let Err(e) = self.ledger.put_compensations(records) {
            tracing::error!(records = records.len(), error = %e, "could not publish compensation states");
        }
    }

    /// Writes one compensation's state into the replicated ledger at once.
    fn publish(&self, tracked: &Tracked) -> CompensationRecord {
        let record = self.record_of(tracked);
        self.write(std::slice::from_ref(&record));
        record
    }

    /// Queues the state in the outbox and wakes the engine's loop to write it.
    fn queue(&self, tracked: &Tracked) {
        let record = self.record_of(tracked);
        self.outbox
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(record);
        self.wakeup.notify_one();
    }

    /// Writes what the outbox holds, only the newest state of each
    /// compensation.
    fn flush(&self) {
        let queued = std::mem::take(&mut *self.outbox.lock().unwrap_or_else(|p| p.into_inner()));
        if queued.is_empty() {
            return;
        }
        let mut seen = HashSet::new();
        let mut newest: Vec<CompensationRecord> = queued
            .into_iter()
            .rev()
            .filter(|r| seen.insert(r.txn_id.clone()))
            .collect();
        newest.reverse();
        self.write(&newest);
    }

    /// Starts the engine, running `executor`'s action for each loser; `log`
    /// is the compensation log as read at open, which it replays first.
    pub fn spawn(
        self: &Arc<Self>,
        executor: Executor,
        log: Vec<crate::storage::LogOfTransaction>,
        tasks: &TaskTracker,
        shutdown: CancellationToken,
    ) {
        let engine = self.clone();
        tasks.spawn(async move { engine.run(executor, log, shutdown).await });
    }

    async fn run(
        &self,
        executor: Executor,
        log: Vec<crate::storage::LogOfTransaction>,
        shutdown: CancellationToken,
    ) {
        self.recover(log).await;
        // At start every conflict is looked at once; after that only the
        // keys merges report as changed (the engine's inbox).
        let mut changed: Vec<KeyView> =
            self.ledger.conflicts().into_iter().map(|c| c.key).collect();
        // Attempts run side by side, and the loop keeps taking new losers
        // while they do: one slow webhook call holds up nothing else.
        let mut running = FuturesUnordered::new();
        let mut in_flight: HashSet<String> = HashSet::new();
        // Keys leave the ledger only through retention expiry: which
        // compensations outlived theirs is looked at once at start and
        // after each expiry, not at every turn of the loop.
        let mut expiry_handled: Option<u64> = None;
        loop {
            // While storage cannot write nothing can be logged, so neither
            // new losers nor attempts are begun (each would wait for the
            // disk, and the loop with them); the writer's recovery is
            // polled instead.
            let writable = self.storage.failing().is_none();
            if writable {
                self.schedule_new_losers(changed).await;
            } else {
                self.look_again_later(changed);
            }
            let expired = self.ledger.expired_allocations();
            if expiry_handled != Some(expired) {
                self.forget_expired();
                expiry_handled = Some(expired);
            }
            let room = if writable {
                ATTEMPTS_IN_FLIGHT - running.len()
            } else {
                0
            };
            for txn in self.due_now(&in_flight, room) {
                in_flight.insert(txn.clone());
                let executor = &executor;
                running.push(async move {
                    self.attempt(executor, &txn).await;
                    txn
                });
            }
            let wait = self
                .next_attempt_at(&in_flight)
                .map(|at| Duration::from_millis(at.saturating_sub(self.ledger.wall_ms())))
                .unwrap_or(Duration::from_secs(5))
                .min(if writable {
                    Duration::from_secs(5)
                } else {
                    STORAGE_POLL
                });
            self.flush();
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                Some(txn) = running.next() => {
                    in_flight.remove(&txn);
                }
                _ = self.wakeup.notified() => {}
                _ = tokio::time::sleep(wait) => {}
            }
            changed = self
                .take_changed_conflicts()
                .iter()
                .filter_map(|key| self.ledger.key(key))
                .collect();
        }
        // Attempts under way finish (each is bounded by the webhook
        // timeout); none is cut between its call and its log entry.
        while running.next().await.is_some() {}
        self.flush();
    }

    /// Due compensations not already being attempted, at most `room` of them.
    fn due_now(&self, in_flight: &HashSet<String>, room: usize) -> Vec<String> {
        let now = self.ledger.wall_ms();
        self.registry()
            .iter()
            .filter(|(txn, t)| t.machine.due(now) && !in_flight.contains(*txn))
            .map(|(txn, _)| txn.clone())
            .take(room)
            .collect()
    }

    /// When the next compensation not under way is due.
    fn next_attempt_at(&self, in_flight: &HashSet<String>) -> Option<u64> {
        self.registry()
            .iter()
            .filter(|(txn, _)| !in_flight.contains(*txn))
            .filter_map(|(_, t)| t.machine.next_attempt_at_ms)
            .min()
    }

    /// Replays the log; attempts cut short by a crash are resumed. A
    /// compensation whose key left the ledger while the node was down runs
    /// on from its log, and one that had ended is forgotten.
    async fn recover(&self, log: Vec<crate::storage::LogOfTransaction>) {
        let mut losers: HashMap<String, Subject> = HashMap::new();
        for conflict in self.ledger.conflicts() {
            let winner = conflict.key.allocations[0].record.clone();
            for loser in conflict.key.allocations.iter().skip(1) {
                let subject = Subject {
                    loser: loser.record.clone(),
                    winner: winner.clone(),
                };
                losers.insert(loser.record.txn_id.to_string(), subject);
            }
        }
        for (txn, raw) in log {
            let replayed =
                subject::read(&raw)
                    .map_err(|e| e.to_string())
                    .and_then(|(entries, logged)| {
                        let machine = Compensation::replay(&entries).map_err(|e| e.to_string())?;
                        Ok((machine, logged))
                    });
            let (mut machine, logged) = match replayed {
                Ok(m) => m,
                Err(e) => {
                    tracing::error!(txn, error = %e, "compensation log unreadable; skipping");
                    continue;
                }
            };
            if machine.state == CompensationState::Running {
                if let Ok(entry) =
                    machine.resume_after_crash(&self.policy, self.ledger.wall_ms(), rand::random())
                {
                    if let Err(e) = self.append(&txn, &entry).await {
                        tracing::error!(txn, error = %e, "cannot log crash recovery");
                        continue;
                    }
                    tracing::warn!(txn, "compensation attempt was interrupted by a restart; it will be retried with the same idempotency key");
                }
            }
            let current = losers.remove(&txn);
            let outlived = current.is_none();
            let Some(subject) = current.or_else(|| logged.clone()) else {
                // Logged by an earlier version, which kept no subject, and
                // its allocation passed the retention while the node was down.
                tracing::warn!(txn, state = %machine.state, "forgetting the compensation of an expired allocation");
                self.storage.drop_log(&txn);
                continue;
            };
            if logged.as_ref() != Some(&subject) {
                // An earlier version's log, or a winner that moved: logged
                // now, so that the compensation can outlive its key.
                if let Err(e) = self.append_subject(&txn, &subject).await {
                    tracing::error!(txn, error = %e, "cannot log what a compensation is about");
                }
            }
            let tracked = Tracked {
                machine,
                subject,
                outlived,
            };
            if outlived {
                if tracked.machine.state.is_terminal() {
                    self.forget(&txn, &tracked);
                    continue;
                }
                tracing::warn!(txn, key = tracked.key(), state = %tracked.machine.state, "resuming a compensation whose key passed the retention; it runs on until it ends");
            }
            self.queue(&tracked);
            self.registry().insert(txn, tracked);
        }
    }

    /// Marks the compensations whose loser left the ledger (its key passed
    /// the retention) and forgets those of them that have ended, here and
    /// in the durable log. One still under way runs on to its end, which
    /// forgets it ([`Compensations::attempt`]).
    fn forget_expired(&self) {
        let tracked: Vec<(String, String)> = self
            .registry()
            .iter()
            .filter(|(_, t)| !t.outlived)
            .map(|(txn, t)| (txn.clone(), t.key().to_owned()))
            .collect();
        let gone: HashSet<String> = tracked
            .into_iter()
            .filter(|(txn, key)| {
                self.ledger
                    .key(key)
                    .is_none_or(|v| v.allocations.iter().all(|a| &a.record.txn_id != txn))
            })
            .map(|(txn, _)| txn)
            .collect();
        if gone.is_empty() {
            return;
        }
        self.registry().retain(|txn, tracked| {
            if !gone.contains(txn) {
                return true;
            }
            tracked.outlived = true;
            if tracked.machine.state.is_terminal() {
                self.forget(txn, tracked);
                return false;
            }
            tracing::warn!(txn, key = tracked.key(), state = %tracked.machine.state, "the key passed the retention before its compensation ended; it runs on until it does");
            true
        });
    }

    /// Drops the durable log of a compensation that ended after its key
    /// left the ledger; one that never succeeded is logged loudly. The
    /// caller takes it out of the registry.
    fn forget(&self, txn: &str, tracked: &Tracked) {
        if tracked.machine.state == CompensationState::Succeeded {
            tracing::info!(txn, "forgetting a finished compensation past the retention");
        } else {
            tracing::error!(txn, state = %tracked.machine.state, "allocation expired before its compensation succeeded; check it by hand");
        }
        self.storage.drop_log(txn);
    }

    /// This node's compensations whose key passed the retention while they
    /// still run: no conflict report shows them any more, so
    /// `GET /v1/compensations` lists them from here.
    pub fn outliving_their_keys(&self) -> Vec<CompensationRecord> {
        self.registry()
            .values()
            .filter(|t| t.outlived)
            .map(|t| self.record_of(t))
            .collect()
    }

    /// Creates a compensation for every loser of `conflicts` this node made
    /// that has none, and keeps the winner of those it has current. The new
    /// ones are logged together, so after a partition a hundred losers
    /// share a few commits instead of waiting for one each.
    async fn schedule_new_losers(&self, conflicts: Vec<KeyView>) {
        let me = self.owner.as_str();
        let mut new: Vec<(Tracked, LogEntry)> = Vec::new();
        let mut moved: Vec<Tracked> = Vec::new();
        // A key listed twice must not make two compensations of one loser;
        // after a long partition thousands are new at once, so no linear scan.
        let mut seen: HashSet<String> = HashSet::new();
        for conflict in conflicts {
            let Some(winner) = conflict.winner().map(|w| w.record.clone()) else {
                continue;
            };
            for loser in conflict.allocations.iter().skip(1) {
                let txn = &loser.record.txn_id.to_string();
                if *loser.record.node != *me || !seen.insert(txn.clone()) {
                    continue;
                }
                // A later arrival can beat the winner seen so far; keep the
                // replicated record's winner the key's current one.
                let known = self.registry().get_mut(txn).map(|t| {
                    let changed = t.subject.winner.txn_id != winner.txn_id;
                    t.subject.winner = winner.clone();
                    changed.then(|| t.clone())
                });
                match known {
                    Some(Some(updated)) => {
                        moved.push(updated);
                        continue;
                    }
                    Some(None) => continue,
                    None => {}
                }
                let (machine, entry) = Compensation::new(txn, self.ledger.wall_ms());
                let subject = Subject {
                    loser: loser.record.clone(),
                    winner: winner.clone(),
                };
                let tracked = Tracked {
                    machine,
                    subject,
                    outlived: false,
                };
                new.push((tracked, entry));
            }
        }
        let logged = futures::future::join_all(new.iter().map(|(tracked, entry)| async {
            let scheduled = serde_json::to_vec(entry).map_err(|e| e.to_string())?;
            let subject = tracked.subject.encode().map_err(|e| e.to_string())?;
            self.append_all(&tracked.machine.loser_txn, vec![scheduled, subject])
                .await
        }))
        .await;
        for ((tracked, _), outcome) in new.into_iter().zip(logged) {
            let txn = tracked.machine.loser_txn.clone();
            if let Err(e) = outcome {
                tracing::error!(txn, error = %e, "cannot log a new compensation; will retry");
                self.inbox
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(tracked.key().to_owned());
                continue;
            }
            tracing::warn!(key = tracked.key(), loser = %txn, winner = %tracked.subject.winner.txn_id, "our allocation lost a conflict; compensating it");
            self.metrics.compensations_started.inc();
            self.queue(&tracked);
            self.registry().insert(txn, tracked);
        }
        // The winner each moved to is logged, so that a compensation that
        // outlives its key still names the winner it lost to last.
        let logged = futures::future::join_all(
            moved
                .iter()
                .map(|t| self.append_subject(&t.machine.loser_txn, &t.subject)),
        )
        .await;
        for (tracked, outcome) in moved.iter().zip(logged) {
            if let Err(e) = outcome {
                let txn = &tracked.machine.loser_txn;
                tracing::error!(txn, error = %e, "cannot log the new winner of a compensation");
            }
            self.queue(tracked);
        }
    }

    /// Sets the machine of a tracked compensation, keeping what changed
    /// meanwhile (a winner that moved, a key that expired); returns the
    /// compensation as it now stands.
    fn update_machine(&self, txn: &str, machine: &Compensation) -> Option<Tracked> {
        let mut entries = self.registry();
        let tracked = entries.get_mut(txn)?;
        tracked.machine = machine.clone();
        Some(tracked.clone())
    }

    /// One attempt: log Started, act, log Finished, publish each state. A
    /// compensation whose key passed the retention is forgotten once it ends.
    async fn attempt(&self, executor: &Executor, txn: &str) {
        let Some(mut tracked) = self.registry().get(txn).cloned() else {
            return;
        };
        let Ok(started) = tracked.machine.start(self.ledger.wall_ms()) else {
            return;
        };
        if let Err(e) = self.append(txn, &started).await {
            tracing::error!(txn, error = %e, "cannot log attempt start; not acting");
            return;
        }
        if let Some(current) = self.update_machine(txn, &tracked.machine) {
            self.queue(&current);
        }
        let outcome = executor
            .run(&action::Subject {
                loser: &tracked.subject.loser,
                winner: &tracked.subject.winner,
                idempotency_key: &tracked.machine.idempotency_key,
                attempt: tracked.machine.attempts,
            })
            .await;
        let now = self.ledger.wall_ms();
        let Ok(finished) = tracked
            .machine
            .finish(outcome, &self.policy, now, rand::random())
        else {
            return;
        };
        if let Err(e) = self.append(txn, &finished).await {
            // The effect may have happened; on restart the attempt resumes
            // with the same idempotency key, which the receiver deduplicates.
            tracing::error!(txn, error = %e, "cannot log attempt end");
            return;
        }
        let kind = match tracked.machine.state {
            CompensationState::Succeeded => {
                let secs = now.saturating_sub(tracked.machine.detected_at_ms) as f64 / 1000.0;
                self.metrics.compensation_seconds.observe(secs);
                tracing::info!(txn, "compensation succeeded");
                "succeeded"
            }
            CompensationState::DeadLettered => {
                tracing::error!(txn, error = ?tracked.machine.last_error, "compensation dead-lettered");
                "dead-lettered"
            }
            _ => {
                tracing::warn!(txn, error = ?tracked.machine.last_error, next = ?tracked.machine.next_attempt_at_ms, "compensation attempt failed; will retry");
                "failed"
            }
        };
        self.metrics
            .compensations
            .get_or_create(&crate::metrics::Kind::of(kind))
            .inc();
        let Some(current) = self.update_machine(txn, &tracked.machine) else {
            return;
        };
        self.queue(&current);
        if current.outlived && current.machine.state.is_terminal() {
            self.forget(txn, &current);
            self.registry().remove(txn);
        }
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}
