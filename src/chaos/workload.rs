//! The clients of a chaos run: customers pay in a home region and retry as
//! real ones do: at once in another region (a double submit through two
//! front ends), in another region after a while (a person trying again),
//! in another region when the first is slow or unreachable (a failover),
//! and in the same region (a replay). Every request and answer goes into
//! the [`History`] with its time.

use crate::check::{Answer, History, Violation};
use crate::client::Client;
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use serde_json::{json, Value};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use tokio::task::JoinSet;

/// How long a client waits for an answer before it gives up on a region.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
/// Customers paying at once.
const CUSTOMERS_AT_ONCE: u64 = 4;
/// How many of the latest keys retried in another region are kept for the
/// settlement sampler.
const RECENT_RETRIES: usize = 32;

/// The history of a run, shared by its clients, with the run's start.
pub struct Recorder {
    start: Instant,
    ops: AtomicU64,
    history: Mutex<History>,
    counts: Mutex<Counts>,
    /// The latest keys sent to a second region: the ones that can end in
    /// a conflict, so the ones worth asking nodes whether they are settled.
    retried: Mutex<VecDeque<String>>,
}

/// What the clients did.
#[derive(Debug, Clone, Default)]
pub struct Counts {
    /// Requests sent.
    pub requests: u64,
    /// Of them, not answered (an error or a timeout).
    pub failed: u64,
    /// Of those, answered with a 5xx (a full disk, say).
    pub server_errors: u64,
    /// Retries sent at once to another region.
    pub immediate_retries: u64,
    /// Retries sent to another region after a delay.
    pub delayed_retries: u64,
    /// Retries sent to another region because the first failed or was slow.
    pub failovers: u64,
    /// The same request sent again to the same region.
    pub same_region_replays: u64,
}

impl Recorder {
    /// A recorder of the run of `seed`, starting now.
    pub fn new(seed: u64) -> Self {
        Self {
            start: Instant::now(),
            ops: AtomicU64::new(0),
            history: Mutex::new(History::new(seed)),
            counts: Mutex::default(),
            retried: Mutex::default(),
        }
    }

    /// Milliseconds since the start.
    pub fn now(&self) -> u64 {
        self.start.elapsed().as_millis() as u64
    }

    /// The history, to add to.
    pub fn history(&self) -> MutexGuard<'_, History> {
        self.history.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn counts(&self) -> MutexGuard<'_, Counts> {
        self.counts.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Up to `n` of the latest keys retried in another region, newest first.
    pub fn recently_retried(&self, n: usize) -> Vec<String> {
        let retried = self.retried.lock().unwrap_or_else(|p| p.into_inner());
        retried.iter().rev().take(n).cloned().collect()
    }

    /// `key` is sent to a second region.
    fn retrying(&self, key: &str) {
        let mut retried = self.retried.lock().unwrap_or_else(|p| p.into_inner());
        if retried.len() == RECENT_RETRIES {
            retried.pop_front();
        }
        retried.push_back(key.to_owned());
    }

    /// A line about no key in particular (a fault).
    pub fn note(&self, what: String) {
        let at = self.now();
        self.history().note(at, what);
    }

    /// The history and the counts, once every client is done.
    pub fn finish(&self) -> (History, Counts) {
        (std::mem::take(&mut *self.history()), self.counts().clone())
    }
}

/// Whom the clients talk to and for how long.
pub struct Workload {
    /// A client of each node, by index.
    pub clients: Vec<Client>,
    /// Seed of the customers' choices.
    pub seed: u64,
    /// When customers stop paying (retries already planned still go out).
    pub until: Instant,
}

/// Runs the customers until `workload.until`, then waits for their retries.
pub async fn run(workload: Workload, recorder: Arc<Recorder>) {
    let clients = Arc::new(workload.clients);
    let mut customers = JoinSet::new();
    for c in 0..CUSTOMERS_AT_ONCE {
        let rng = StdRng::seed_from_u64(workload.seed.wrapping_mul(1_000).wrapping_add(c));
        customers.spawn(customer(
            c,
            rng,
            clients.clone(),
            recorder.clone(),
            workload.until,
        ));
    }
    while customers.join_next().await.is_some() {}
}

/// One customer after another, on one line of requests.
async fn customer(
    line: u64,
    mut rng: StdRng,
    clients: Arc<Vec<Client>>,
    recorder: Arc<Recorder>,
    until: Instant,
) {
    let nodes = clients.len();
    let mut later = JoinSet::new();
    let mut n = 0u64;
    while Instant::now() < until {
        n += 1;
        let key = format!("pay-{line}-{n}");
        let payload = json!({
            "customer": n,
            "amount": rng.random_range(500..200_000u64),
            "currency": "EUR",
        });
        let home = rng.random_range(0..nodes);
        let other = (home + rng.random_range(1..nodes.max(2))) % nodes;
        let answered = send(&clients, &recorder, home, &key, &payload).await;
        let choice = rng.random_range(0..100);
        if !answered {
            recorder.counts().failovers += 1;
            elsewhere(&clients, &recorder, other, &key, &payload).await;
        } else if choice < 8 {
            recorder.counts().immediate_retries += 1;
            elsewhere(&clients, &recorder, other, &key, &payload).await;
        } else if choice < 18 {
            recorder.counts().delayed_retries += 1;
            let wait = Duration::from_millis(rng.random_range(200..5_000));
            let (clients, recorder) = (clients.clone(), recorder.clone());
            later.spawn(async move {
                tokio::time::sleep(wait).await;
                elsewhere(&clients, &recorder, other, &key, &payload).await;
            });
        } else if choice < 23 {
            recorder.counts().same_region_replays += 1;
            send(&clients, &recorder, home, &key, &payload).await;
        }
        tokio::time::sleep(Duration::from_millis(rng.random_range(20..120))).await;
    }
    while later.join_next().await.is_some() {}
}

/// A retry of `key` in another region, `node`: kept among the recently
/// retried keys, then sent.
async fn elsewhere(
    clients: &[Client],
    recorder: &Recorder,
    node: usize,
    key: &str,
    payload: &Value,
) {
    recorder.retrying(key);
    send(clients, recorder, node, key, payload).await;
}

/// Sends one allocation to `node` and records it; whether it was answered.
async fn send(
    clients: &[Client],
    recorder: &Recorder,
    node: usize,
    key: &str,
    payload: &Value,
) -> bool {
    let op = recorder.ops.fetch_add(1, Ordering::Relaxed);
    recorder.counts().requests += 1;
    let at = recorder.now();
    recorder.history().attempted(at, node, key, true);
    let outcome = tokio::time::timeout(REQUEST_TIMEOUT, clients[node].allocate(key, payload)).await;
    let at = recorder.now();
    let mut history = recorder.history();
    match outcome {
        Ok(Ok(made)) => {
            history.answered(
                at,
                Answer {
                    op,
                    node,
                    key: key.to_owned(),
                    txn: made.allocation.txn_id,
                    replay: made.replay,
                    confidence: made.allocation.confidence,
                },
            );
            true
        }
        Ok(Err(e)) => {
            if e.is_key_reused() {
                history.violation(Violation::new(
                    "payload",
                    format!(
                        "node {node} called a retry of {key} with its own payload a reuse: {e}"
                    ),
                    Some(key.to_owned()),
                ));
            }
            history.failed(at, node, key, &e.to_string());
            drop(history);
            let mut counts = recorder.counts();
            counts.failed += 1;
            counts.server_errors += u64::from(e.status().is_some_and(|s| s >= 500));
            false
        }
        Err(_) => {
            history.failed(at, node, key, "no answer within 2 s");
            drop(history);
            recorder.counts().failed += 1;
            false
        }
    }
}
