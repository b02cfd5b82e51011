//! The compensation engine: each losing allocation is compensated by the
//! node that made it, and by no other, exactly once in effect.
//!
//! Every transition of the state machine ([`machine`]) is appended to the
//! durable compensation log and waited for before the engine acts on it, so
//! a crash at any point resumes from the log: an attempt that was running is
//! retried with the same idempotency key, which the receiver deduplicates.
//! After each transition the owner queues the state, and the engine writes
//! what is queued into the replicated ledger at each turn of its loop, so
//! every region's conflict report shows it.

pub mod action;
pub mod machine;

use crate::ledger::KeyView;
use crate::node::Node;
use crate::record::{AllocationRecord, CompensationRecord, RECORD_VERSION};
use action::{Executor, Subject};
use axum::http::StatusCode;
use futures::stream::{FuturesUnordered, StreamExt};
use machine::{Compensation, CompensationState, LogEntry, RetryPolicy};
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Most compensation attempts (of different losers) run at once; a
/// webhook endpoint sees at most this many concurrent requests from a node.
const ATTEMPTS_IN_FLIGHT: usize = 16;

/// This node's compensations, keyed by losing transaction id.
#[derive(Default)]
pub struct Registry {
    entries: Mutex<HashMap<String, Tracked>>,
}

#[derive(Clone)]
struct Tracked {
    machine: Compensation,
    key: String,
    winner_txn: String,
}

impl Registry {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Tracked>> {
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }
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

/// (in flight, dead-lettered) counts of this node's compensations.
pub fn own_counts(node: &Node) -> (usize, usize) {
    let entries = node.compensations.lock();
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
pub async fn operator_retry(node: &Node, txn: &str) -> Result<CompensationRecord, RetryError> {
    let now = node.ledger.wall_ms();
    let (entry, tracked) = {
        let mut entries = node.compensations.lock();
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
    append(node, txn, &entry)
        .await
        .map_err(RetryError::Storage)?;
    let record = publish(node, &tracked);
    tracing::info!(txn, "operator re-queued a dead-lettered compensation");
    node.compensation_wakeup.notify_one();
    Ok(record)
}

/// Appends a log entry and waits until it is durable.
async fn append(node: &Node, txn: &str, entry: &LogEntry) -> Result<(), String> {
    let bytes = serde_json::to_vec(entry).map_err(|e| e.to_string())?;
    let seq = node.storage.append_log_entry(txn, bytes);
    node.storage
        .wait_durable(seq)
        .await
        .map_err(|e| e.to_string())
}

/// The compensation's state as every region's conflict report shows it.
fn record_of(node: &Node, tracked: &Tracked) -> CompensationRecord {
    let c = &tracked.machine;
    CompensationRecord {
        v: RECORD_VERSION,
        key: tracked.key.clone(),
        txn_id: c.loser_txn.clone(),
        winner_txn_id: tracked.winner_txn.clone(),
        owner: node.peer_id.to_string(),
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
fn write(node: &Node, records: &[CompensationRecord]) {
    if let Err(e) = node.ledger.put_compensations(records) {
        tracing::error!(records = records.len(), error = %e, "could not publish compensation states");
    }
}

/// Writes one compensation's state into the replicated ledger at once.
fn publish(node: &Node, tracked: &Tracked) -> CompensationRecord {
    let record = record_of(node, tracked);
    write(node, std::slice::from_ref(&record));
    record
}

/// States waiting to be written into the ledger. The engine writes them
/// all at each turn of its loop: after a partition a node moves a hundred
/// compensations through three states within milliseconds, and a change
/// per transition meant as many automerge changes, each synced to every
/// peer on its own.
#[derive(Default)]
struct Outbox(Mutex<Vec<CompensationRecord>>);

impl Outbox {
    /// Queues the state and wakes the engine's loop to write it.
    fn push(&self, node: &Node, tracked: &Tracked) {
        let record = record_of(node, tracked);
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(record);
        node.compensation_wakeup.notify_one();
    }

    /// Writes what is queued, only the newest state of each compensation.
    fn flush(&self, node: &Node) {
        let queued = std::mem::take(&mut *self.0.lock().unwrap_or_else(|p| p.into_inner()));
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
        write(node, &newest);
    }
}

/// Starts the engine, running `executor`'s action for each loser; `log` is
/// the compensation log as read at open, which it replays first.
pub fn spawn(
    node: Arc<Node>,
    executor: Executor,
    log: Vec<crate::storage::LogOfTransaction>,
    tasks: &TaskTracker,
    shutdown: CancellationToken,
) {
    tasks.spawn(async move {
        let policy = RetryPolicy {
            max_attempts: node.config.compensation_max_attempts,
            initial_backoff_ms: millis(node.config.compensation_initial_backoff),
            max_backoff_ms: millis(node.config.compensation_max_backoff),
            ..RetryPolicy::default()
        };
        let outbox = Outbox::default();
        recover(&node, log, &policy, &outbox).await;
        // At start every conflict is looked at once; after that only the
        // keys merges report as changed (the node's conflict inbox).
        let mut changed: Vec<KeyView> =
            node.ledger.conflicts().into_iter().map(|c| c.key).collect();
        // Attempts run side by side, and the loop keeps taking new losers
        // while they do: one slow webhook call holds up nothing else.
        let mut running = FuturesUnordered::new();
        let mut in_flight: HashSet<String> = HashSet::new();
        // Compensations outlive their allocations only through retention
        // expiry: they are looked at once at start and after each expiry,
        // not at every turn of the loop.
        let mut expiry_handled: Option<u64> = None;
        loop {
            schedule_new_losers(&node, changed, &outbox).await;
            let expired = node.ledger.expired_allocations();
            if expiry_handled != Some(expired) && forget_expired(&node, &in_flight) {
                expiry_handled = Some(expired);
            }
            for txn in due_now(&node, &in_flight, ATTEMPTS_IN_FLIGHT - running.len()) {
                in_flight.insert(txn.clone());
                let (node, policy, executor, outbox) = (&*node, &policy, &executor, &outbox);
                running.push(async move {
                    attempt(node, policy, executor, outbox, &txn).await;
                    txn
                });
            }
            let wait = next_attempt_at(&node, &in_flight)
                .map(|at| Duration::from_millis(at.saturating_sub(node.ledger.wall_ms())))
                .unwrap_or(Duration::from_secs(5))
                .min(Duration::from_secs(5));
            outbox.flush(&node);
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                Some(txn) = running.next() => {
                    in_flight.remove(&txn);
                }
                _ = node.compensation_wakeup.notified() => {}
                _ = tokio::time::sleep(wait) => {}
            }
            changed = node
                .take_changed_conflicts()
                .iter()
                .filter_map(|key| node.ledger.key(key))
                .collect();
        }
        // Attempts under way finish (each is bounded by the webhook
        // timeout); none is cut between its call and its log entry.
        while running.next().await.is_some() {}
        outbox.flush(&node);
    });
}

/// Due compensations not already being attempted, at most `room` of them.
fn due_now(node: &Node, in_flight: &HashSet<String>, room: usize) -> Vec<String> {
    let now = node.ledger.wall_ms();
    node.compensations
        .lock()
        .iter()
        .filter(|(txn, t)| t.machine.due(now) && !in_flight.contains(*txn))
        .map(|(txn, _)| txn.clone())
        .take(room)
        .collect()
}

/// When the next compensation not under way is due.
fn next_attempt_at(node: &Node, in_flight: &HashSet<String>) -> Option<u64> {
    node.compensations
        .lock()
        .iter()
        .filter(|(txn, _)| !in_flight.contains(*txn))
        .filter_map(|(_, t)| t.machine.next_attempt_at_ms)
        .min()
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Replays the log; attempts cut short by a crash are resumed.
async fn recover(
    node: &Node,
    log: Vec<crate::storage::LogOfTransaction>,
    policy: &RetryPolicy,
    outbox: &Outbox,
) {
    let mut losers: std::collections::HashMap<String, (String, String)> =
        std::collections::HashMap::new();
    for conflict in node.ledger.conflicts() {
        let winner = conflict.key.allocations[0].record.txn_id.clone();
        for loser in conflict.key.allocations.iter().skip(1) {
            losers.insert(
                loser.record.txn_id.clone(),
                (conflict.key.key.clone(), winner.clone()),
            );
        }
    }
    for (txn, raw) in log {
        let entries: Result<Vec<LogEntry>, _> =
            raw.iter().map(|b| serde_json::from_slice(b)).collect();
        let replayed = entries
            .map_err(|e| e.to_string())
            .and_then(|e| Compensation::replay(&e).map_err(|e| e.to_string()));
        let mut machine = match replayed {
            Ok(m) => m,
            Err(e) => {
                tracing::error!(txn, error = %e, "compensation log unreadable; skipping");
                continue;
            }
        };
        if machine.state == CompensationState::Running {
            if let Ok(entry) =
                machine.resume_after_crash(policy, node.ledger.wall_ms(), rand::random())
            {
                if let Err(e) = append(node, &txn, &entry).await {
                    tracing::error!(txn, error = %e, "cannot log crash recovery");
                    continue;
                }
                tracing::warn!(txn, "compensation attempt was interrupted by a restart; it will be retried with the same idempotency key");
            }
        }
        let Some((key, winner_txn)) = losers.get(&txn).cloned() else {
            // Its allocation passed the retention while the node was down.
            tracing::warn!(txn, state = %machine.state, "forgetting the compensation of an expired allocation");
            node.storage.drop_log(&txn);
            continue;
        };
        let tracked = Tracked {
            machine,
            key,
            winner_txn,
        };
        outbox.push(node, &tracked);
        node.compensations.lock().insert(txn, tracked);
    }
}

/// Forgets compensations whose conflict passed the retention (the ledger
/// dropped it), here and in the durable log. One that never succeeded is
/// logged loudly: its loser expired uncompensated. Returns false when one
/// of them has an attempt under way: it is forgotten at a later call, once
/// the attempt is over.
fn forget_expired(node: &Node, in_flight: &HashSet<String>) -> bool {
    let tracked: Vec<(String, String)> = node
        .compensations
        .lock()
        .iter()
        .map(|(txn, t)| (txn.clone(), t.key.clone()))
        .collect();
    let (gone, under_way): (HashSet<String>, HashSet<String>) = tracked
        .into_iter()
        .filter(|(txn, key)| {
            node.ledger
                .key(key)
                .is_none_or(|v| v.allocations.iter().all(|a| &a.record.txn_id != txn))
        })
        .map(|(txn, _)| txn)
        .partition(|txn| !in_flight.contains(txn));
    if gone.is_empty() {
        return under_way.is_empty();
    }
    let mut entries = node.compensations.lock();
    entries.retain(|txn, tracked| {
        if !gone.contains(txn) {
            return true;
        }
        if tracked.machine.state == CompensationState::Succeeded {
            tracing::info!(txn, "forgetting a finished compensation past the retention");
        } else {
            tracing::error!(txn, state = %tracked.machine.state, "allocation expired before its compensation succeeded; check it by hand");
        }
        node.storage.drop_log(txn);
        false
    });
    under_way.is_empty()
}

/// Creates a compensation for every loser of `conflicts` this node made
/// that has none, and keeps the winner of those it has current. The new
/// ones are logged together, so after a partition a hundred losers share a
/// few commits instead of waiting for one each.
async fn schedule_new_losers(node: &Node, conflicts: Vec<KeyView>, outbox: &Outbox) {
    let me = node.peer_id.to_string();
    let mut new: Vec<(Tracked, LogEntry)> = Vec::new();
    // A key listed twice must not make two compensations of one loser;
    // after a long partition thousands are new at once, so no linear scan.
    let mut seen: HashSet<String> = HashSet::new();
    for conflict in conflicts {
        let Some(winner) = conflict.winner().map(|w| w.record.clone()) else {
            continue;
        };
        for loser in conflict.allocations.iter().skip(1) {
            let txn = &loser.record.txn_id;
            if *loser.record.node != *me || !seen.insert(txn.clone()) {
                continue;
            }
            // A later arrival can beat the winner seen so far; keep the
            // replicated record's winner the key's current one.
            let known = node.compensations.lock().get_mut(txn).map(|t| {
                let moved = t.winner_txn != winner.txn_id;
                t.winner_txn.clone_from(&winner.txn_id);
                moved.then(|| t.clone())
            });
            match known {
                Some(Some(updated)) => {
                    outbox.push(node, &updated);
                    continue;
                }
                Some(None) => continue,
                None => {}
            }
            let (machine, entry) = Compensation::new(txn, node.ledger.wall_ms());
            let tracked = Tracked {
                machine,
                key: loser.record.key.to_string(),
                winner_txn: winner.txn_id.clone(),
            };
            new.push((tracked, entry));
        }
    }
    let logged = futures::future::join_all(
        new.iter()
            .map(|(tracked, entry)| append(node, &tracked.machine.loser_txn, entry)),
    )
    .await;
    for ((tracked, _), outcome) in new.into_iter().zip(logged) {
        let txn = tracked.machine.loser_txn.clone();
        if let Err(e) = outcome {
            tracing::error!(txn, error = %e, "cannot log a new compensation; will retry");
            node.note_changed_conflict(&tracked.key);
            continue;
        }
        tracing::warn!(key = %tracked.key, loser = %txn, winner = %tracked.winner_txn, "our allocation lost a conflict; compensating it");
        node.metrics.compensations_started.inc();
        outbox.push(node, &tracked);
        node.compensations.lock().insert(txn, tracked);
    }
}

/// One attempt: log Started, act, log Finished, publish each state.
async fn attempt(
    node: &Node,
    policy: &RetryPolicy,
    executor: &Executor,
    outbox: &Outbox,
    txn: &str,
) {
    let Some(mut tracked) = node.compensations.lock().get(txn).cloned() else {
        return;
    };
    let Ok(started) = tracked.machine.start(node.ledger.wall_ms()) else {
        return;
    };
    if let Err(e) = append(node, txn, &started).await {
        tracing::error!(txn, error = %e, "cannot log attempt start; not acting");
        return;
    }
    node.compensations
        .lock()
        .insert(txn.to_owned(), tracked.clone());
    outbox.push(node, &tracked);
    let Some((loser, winner)) = records(node, &tracked) else {
        tracing::error!(txn, "losing allocation vanished from the ledger");
        return;
    };
    let outcome = executor
        .run(&Subject {
            loser: &loser,
            winner: &winner,
            idempotency_key: &tracked.machine.idempotency_key,
            attempt: tracked.machine.attempts,
        })
        .await;
    let now = node.ledger.wall_ms();
    let Ok(finished) = tracked.machine.finish(outcome, policy, now, rand::random()) else {
        return;
    };
    if let Err(e) = append(node, txn, &finished).await {
        // The effect may have happened; on restart the attempt resumes with
        // the same idempotency key, which the receiver deduplicates.
        tracing::error!(txn, error = %e, "cannot log attempt end");
        return;
    }
    let kind = match tracked.machine.state {
        CompensationState::Succeeded => {
            let secs = now.saturating_sub(tracked.machine.detected_at_ms) as f64 / 1000.0;
            node.metrics.compensation_seconds.observe(secs);
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
    node.metrics
        .compensations
        .get_or_create(&crate::metrics::Kind::of(kind))
        .inc();
    node.compensations
        .lock()
        .insert(txn.to_owned(), tracked.clone());
    outbox.push(node, &tracked);
}

fn records(node: &Node, tracked: &Tracked) -> Option<(AllocationRecord, AllocationRecord)> {
    let view = node.ledger.key(&tracked.key)?;
    let loser = view
        .allocations
        .iter()
        .find(|a| a.record.txn_id == tracked.machine.loser_txn)?;
    let winner = view.winner()?;
    Some(((*loser.record).clone(), (*winner.record).clone()))
}
