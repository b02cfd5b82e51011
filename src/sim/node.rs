//! One simulated node: the real ledger, sync engine and its work, the
//! compensation state machine and the confidence model, on a simulated disk
//! and a virtual clock. It does what `crate::node` and the swarm's event
//! loop do, with every effect on the outside handed back as [`Out`] for the
//! world to deliver.

use super::disk::SimDisk;
use crate::compensation::machine::{Compensation, LogEntry, Outcome, RetryPolicy};
use crate::confidence::{ConfidenceModel, ConfidenceParams, PeerView};
use crate::key::{fingerprint, IdempotencyKey};
use crate::ledger::coverage::Summary;
use crate::ledger::{AllocateRequest, Ledger, MergeOutcome, NodeIdentity, Windows, SHARD_COUNT};
use crate::record::{CompensationRecord, RECORD_VERSION};
use crate::storage::Durable;
use crate::sync::message::{SyncRequest, SyncResponse};
use crate::sync::{work, Action, Engine, Input, Topology};
use crate::time::{ManualClock, SharedClock};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

/// What a node hands the world.
#[derive(Debug)]
pub enum Out {
    /// Open a connection to peer `to`.
    Dial(usize),
    /// A request to peer `to`.
    Request {
        /// The peer.
        to: usize,
        /// Its number, for the answer.
        id: u64,
        /// The request.
        body: SyncRequest,
        /// Members' summaries riding on it (bounded overlay only).
        summaries: Vec<Arc<Summary>>,
    },
    /// The answer to request `id` of peer `to`.
    Response {
        /// The peer.
        to: usize,
        /// The request answered.
        id: u64,
        /// The answer.
        body: SyncResponse,
        /// Members' summaries riding on it (bounded overlay only).
        summaries: Vec<Arc<Summary>>,
    },
    /// A client's allocate request, answered (acknowledged: durable).
    Answered(Answer),
    /// A compensation call reaches the receiver (`key` is its idempotency key).
    Compensate {
        /// The loser's idempotency key.
        key: String,
        /// The loser transaction.
        txn: String,
    },
}

pub use crate::check::Answer;

/// A peer's request applied here, answered once its changes are durable:
/// (durable sequence, peer, request, its digests, documents applied).
type WaitingResponse = (
    u64,
    usize,
    u64,
    Vec<(crate::ledger::DocId, [u8; 32])>,
    BTreeSet<crate::ledger::DocId>,
);

/// A compensation this node runs.
struct Tracked {
    key: String,
    winner: String,
    machine: Compensation,
    /// When the attempt under way ends, and how.
    attempt: Option<(u64, Outcome)>,
}

/// One node.
pub struct SimNode {
    /// Its index.
    pub index: usize,
    /// Its peer id (text).
    pub id: String,
    peers: Vec<String>,
    /// Its neighbours among them.
    topology: Topology,
    /// The clock its logic reads.
    pub clock: ManualClock,
    /// Its disk, which outlives a crash.
    pub disk: SimDisk,
    /// `None` while crashed.
    pub ledger: Option<Ledger>,
    engine: Engine,
    /// Peers with a connection up.
    pub connected: BTreeSet<usize>,
    in_flight: BTreeMap<usize, u64>,
    built: BTreeMap<usize, SyncRequest>,
    next_request: u64,
    /// Answers waiting for the disk.
    waiting_acks: Vec<(u64, Answer)>,
    waiting_responses: Vec<WaitingResponse>,
    last_in_sync: BTreeMap<usize, u64>,
    started_ms: u64,
    model: ConfidenceModel,
    compensations: BTreeMap<String, Tracked>,
    policy: RetryPolicy,
    windows: Windows,
    incarnation: u64,
    /// Requests this node sent (for the message count).
    pub requests_sent: u64,
    /// New allocations' first arrival here: (txn, virtual ms).
    pub arrivals: Vec<(String, u64)>,
    /// For each of its allocations this node called settled, how long
    /// after it was made (by this node's clock), ms.
    pub settled_after_ms: Vec<u64>,
    /// Why the last start failed, if it did.
    pub boot_error: Option<String>,
}

fn peer_id(i: usize) -> String {
    format!("12D3KooWSimNode{i:04}")
}

impl SimNode {
    /// Node `index` of `n`, started at `now` with an empty disk, with at
    /// most `fanout` neighbours (`None`: every other node, a full mesh).
    pub fn new(index: usize, n: usize, fanout: Option<usize>, now: u64, windows: Windows) -> Self {
        let peers: Vec<String> = (0..n).filter(|&j| j != index).map(peer_id).collect();
        let clock = ManualClock::at(now);
        let topology = Topology::new(&peer_id(index), &peers, fanout.unwrap_or(usize::MAX - 1));
        let mut node = Self {
            index,
            id: peer_id(index),
            engine: Engine::new(Vec::new(), Duration::from_secs(1), now),
            peers,
            topology,
            clock,
            disk: SimDisk::default(),
            ledger: None,
            connected: BTreeSet::new(),
            in_flight: BTreeMap::new(),
            built: BTreeMap::new(),
            next_request: 0,
            waiting_acks: Vec::new(),
            waiting_responses: Vec::new(),
            last_in_sync: BTreeMap::new(),
            started_ms: now,
            model: ConfidenceModel::new(ConfidenceParams::default()),
            compensations: BTreeMap::new(),
            policy: RetryPolicy {
                max_attempts: 6,
                initial_backoff_ms: 200,
                max_backoff_ms: 2_000,
                ..RetryPolicy::default()
            },
            windows,
            incarnation: 0,
            requests_sent: 0,
            arrivals: Vec::new(),
            settled_after_ms: Vec::new(),
            boot_error: None,
        };
        node.boot(now);
        node
    }

    /// The peer index behind a peer id.
    fn index_of(&self, key: &str) -> Option<usize> {
        key.strip_prefix("12D3KooWSimNode")
            .and_then(|n| n.parse().ok())
    }

    /// Starts the process: the ledger from what the disk holds, a fresh
    /// engine, compensations from the durable log.
    fn boot(&mut self, now: u64) {
        self.incarnation += 1;
        let clock: SharedClock = Arc::new(self.clock.clone());
        let ledger = Ledger::open(
            NodeIdentity {
                region: format!("r{}", self.index),
                node: self.id.clone(),
            },
            self.peers.clone(),
            clock,
            500,
            self.windows,
            self.disk.stored(),
            Arc::new(self.disk.clone()),
        );
        let mut ledger = match ledger {
            Ok(ledger) => ledger,
            // The simulated disk holds only what the ledger wrote: a failure
            // to read it back is a bug, reported by the checker.
            Err(e) => {
                self.boot_error =
                    Some(format!("node {} cannot read its own disk: {e}", self.index));
                return;
            }
        };
        let mut suffix = [0u8; 8];
        suffix[..4].copy_from_slice(&(self.index as u32).to_be_bytes());
        suffix[4..].copy_from_slice(&(self.incarnation as u32).to_be_bytes());
        ledger.use_actor_suffix(suffix);
        // Every simulated node runs this version: compact batches throughout.
        for peer in &self.peers {
            ledger.set_peer_reads_compact_batches(peer, true);
        }
        self.ledger = Some(ledger);
        self.engine = Engine::with_topology(&self.topology, Duration::from_secs(1), now);
        self.started_ms = now;
        self.connected.clear();
        self.in_flight.clear();
        self.built.clear();
        self.last_in_sync.clear();
        self.compensations.clear();
        for (txn, entries) in self.disk.log() {
            let entries: Vec<LogEntry> = entries
                .iter()
                .filter_map(|b| serde_json::from_slice(b).ok())
                .collect();
            let Ok(mut machine) = Compensation::replay(&entries) else {
                continue;
            };
            if let Ok(entry) = machine.resume_after_crash(&self.policy, now, 0) {
                self.log(&txn, &entry);
            }
            let Some((key, winner)) = self.loser_of(&txn) else {
                continue;
            };
            self.compensations.insert(
                txn,
                Tracked {
                    key,
                    winner,
                    machine,
                    attempt: None,
                },
            );
        }
        self.schedule_losers(now);
    }

    /// The key and winner of `txn`, if it is a loser here.
    fn loser_of(&self, txn: &str) -> Option<(String, String)> {
        let ledger = self.ledger.as_ref()?;
        ledger.conflicts().into_iter().find_map(|c| {
            let winner = c.key.allocations.first()?.record.txn_id.to_string();
            c.key
                .allocations
                .iter()
                .skip(1)
                .any(|a| a.record.txn_id == *txn)
                .then(|| (c.key.key.clone(), winner))
        })
    }

    /// A crash: memory is gone, the disk keeps what was flushed.
    pub fn crash(&mut self) {
        self.ledger = None;
        self.disk.crash();
        self.waiting_acks.clear();
        self.waiting_responses.clear();
        self.connected.clear();
        self.in_flight.clear();
        self.built.clear();
        self.compensations.clear();
    }

    /// A restart after a crash.
    pub fn restart(&mut self, now: u64) {
        self.boot(now);
    }

    /// Whether the process runs.
    pub fn alive(&self) -> bool {
        self.ledger.is_some()
    }

    /// Hands `input` to the engine at `now` and carries out its actions.
    pub fn input(&mut self, input: Input, now: u64, out: &mut Vec<Out>) {
        if self.ledger.is_none() {
            return;
        }
        // The engine's timers run on monotonic time (here the virtual one),
        // never on the node's wall clock, which may jump.
        let windows = self.windows;
        let wall = self.clock_ms();
        let actions = self
            .engine
            .handle(input, now, &|epoch| windows.live(epoch, wall));
        for action in actions {
            self.act(action, now, out);
        }
    }

    fn clock_ms(&self) -> u64 {
        crate::time::Clock::now_ms(&self.clock)
    }

    fn act(&mut self, action: Action, now: u64, out: &mut Vec<Out>) {
        let Some(ledger) = self.ledger.as_ref() else {
            return;
        };
        match action {
            Action::Dial(key) => {
                if let Some(j) = self.index_of(&key) {
                    out.push(Out::Dial(j));
                }
            }
            Action::RedialScheduled(_) => {}
            Action::ResetSession(key) => ledger.reset_sync(&key),
            Action::Build(order) => {
                let Some(j) = self.index_of(&order.peer) else {
                    return;
                };
                let built = work::build(ledger, &order);
                let has_request = built.request.is_some() && self.connected.contains(&j);
                if let Some(request) = built.request {
                    self.built.insert(j, request);
                }
                let key = order.peer.clone();
                self.input(
                    Input::Built {
                        peer: key,
                        has_request,
                        deferred: built.deferred,
                    },
                    now,
                    out,
                );
                self.built.remove(&j);
            }
            Action::Send(key) => {
                let Some(j) = self.index_of(&key) else {
                    return;
                };
                let Some(body) = self.built.remove(&j) else {
                    return;
                };
                self.next_request += 1;
                let id = self.next_request;
                self.in_flight.insert(j, id);
                self.requests_sent += 1;
                let summaries = self.summaries_for(&key);
                out.push(Out::Request {
                    to: j,
                    id,
                    body,
                    summaries,
                });
            }
            Action::AntiEntropyRound => {
                if !self.topology.full_mesh {
                    ledger.summary();
                    let news = self
                        .topology
                        .neighbours
                        .iter()
                        .filter(|p| ledger.has_summaries_for(p))
                        .cloned()
                        .collect();
                    self.input(Input::NewsFor(news), now, out);
                }
                let Some(ledger) = self.ledger.as_ref() else {
                    return;
                };
                let ours = ledger.digests();
                self.input(Input::OurDigests(ours), now, out);
            }
            Action::Compare { peer, theirs } => {
                let (ours, in_sync) = work::compare(ledger, &peer, &theirs);
                self.input(
                    Input::Compared {
                        peer,
                        ours,
                        in_sync,
                    },
                    now,
                    out,
                );
            }
            Action::InSync(key) => {
                if let Some(j) = self.index_of(&key) {
                    let wall = self.clock_ms();
                    self.last_in_sync.insert(j, wall);
                }
            }
            Action::Resynced { outage, .. } => self.model.observe_peer_resync(outage),
        }
    }

    /// Takes in what the disk says changed, so the engine pushes it.
    pub fn pump(&mut self, now: u64, out: &mut Vec<Out>) {
        let changed = self.disk.take_changed();
        if !changed.is_empty() {
            self.input(Input::DocsChanged(changed), now, out);
        }
        self.learn();
    }

    /// Whether the disk has writes, or answers wait, for a flush.
    pub fn needs_flush(&self) -> bool {
        self.alive()
            && (self.disk.has_queued()
                || !self.waiting_acks.is_empty()
                || !self.waiting_responses.is_empty())
    }

    /// The disk flushes: waiting answers go out.
    pub fn flush(&mut self, now: u64, out: &mut Vec<Out>) {
        if self.ledger.is_none() {
            return;
        }
        let durable = self.disk.flush();
        let (ready, waiting): (Vec<_>, Vec<_>) = std::mem::take(&mut self.waiting_acks)
            .into_iter()
            .partition(|(seq, _)| *seq <= durable);
        self.waiting_acks = waiting;
        out.extend(ready.into_iter().map(|(_, answer)| Out::Answered(answer)));
        let (ready, waiting): (Vec<_>, Vec<_>) = std::mem::take(&mut self.waiting_responses)
            .into_iter()
            .partition(|(seq, ..)| *seq <= durable);
        self.waiting_responses = waiting;
        for (_, from, id, theirs, applied) in ready {
            let key = peer_id(from);
            let Some(ledger) = self.ledger.as_ref() else {
                return;
            };
            work::compare(ledger, &key, &theirs);
            let body = work::response(ledger, self.engine.connected_tags(), 0);
            let summaries = self.summaries_for(&key);
            out.push(Out::Response {
                to: from,
                id,
                body,
                summaries,
            });
            self.input(Input::Answered { peer: key, applied }, now, out);
        }
    }

    /// A client asks this node to allocate `key` for `payload`.
    pub fn allocate(&mut self, op: u64, key: &str, payload: &serde_json::Value) -> bool {
        let Some(ledger) = self.ledger.as_ref() else {
            return false;
        };
        let (Ok(parsed), Ok(fp)) = (IdempotencyKey::parse(key), fingerprint(payload)) else {
            return false;
        };
        let views = self.views();
        let estimate = self.model.estimate(&views);
        let shard = parsed.shard(SHARD_COUNT);
        let request = AllocateRequest {
            key: parsed,
            fingerprint: fp,
            confidence: estimate.confidence,
            stake: Some(crate::ledger::Stake {
                confidence: estimate.confidence,
                estimate: Some(estimate),
                episode: 0,
                price: crate::exposure::Price::UNKNOWN,
            }),
        };
        let Some(Ok(allocated)) = ledger.allocate_batch(shard, &[request]).pop() else {
            return false;
        };
        if !allocated.replay {
            self.model.observe_allocation();
        } else if allocated.first_near_miss {
            let wall = self.clock_ms();
            let delay = wall.saturating_sub(allocated.allocation.record.hlc.physical_ms);
            self.model
                .observe_cross_region_replay(Duration::from_millis(delay));
        }
        let seq = match allocated.allocation.durable {
            Durable::Journal(s) | Durable::Store(s) => s,
        };
        let record = &allocated.allocation.record;
        self.waiting_acks.push((
            seq,
            Answer {
                op,
                node: self.index,
                key: key.to_owned(),
                txn: record.txn_id.to_string(),
                replay: allocated.replay,
                confidence: record.confidence,
            },
        ));
        true
    }

    fn views(&self) -> Vec<PeerView> {
        let wall = self.clock_ms();
        (0..=self.peers.len())
            .filter(|&j| j != self.index)
            .map(|j| {
                // A member that is not a neighbour: when this node last held
                // everything a summary of it listed; reachable while that is
                // recent (its summaries come through the overlay).
                let far = (!self.topology.full_mesh
                    && !self.topology.neighbours.contains(&peer_id(j)))
                .then(|| {
                    self.ledger
                        .as_ref()
                        .and_then(|l| l.member_covered_at(&peer_id(j)))
                });
                let since = match far {
                    Some(covered) => covered,
                    None => self.last_in_sync.get(&j).copied(),
                }
                .unwrap_or(self.started_ms);
                let staleness = Duration::from_millis(wall.saturating_sub(since))
                    .saturating_sub(Duration::from_secs(1));
                PeerView {
                    staleness,
                    connected: if far.is_some() {
                        staleness < Duration::from_secs(2)
                    } else {
                        self.connected.contains(&j)
                    },
                    behind: Duration::ZERO,
                }
            })
            .collect()
    }

    /// Feeds the model what resolved.
    fn learn(&mut self) {
        let Some(ledger) = self.ledger.as_ref() else {
            return;
        };
        let wall = self.clock_ms();
        for r in ledger.take_resolutions() {
            if r.conflict_after_ms.is_none() {
                self.settled_after_ms
                    .push(wall.saturating_sub(r.allocated_ms));
            }
            if let Some(e) = r.stake.estimate {
                if let Some(ms) = r.conflict_after_ms {
                    self.model
                        .observe_conflict(Duration::from_millis(ms), e.situation);
                }
                self.model
                    .observe_resolved(&e, r.conflict_after_ms.is_some());
            }
        }
    }

    /// In a bounded overlay, this node's summary and those of other members
    /// that `peer` was not told of yet; nothing in a full mesh.
    fn summaries_for(&self, peer: &str) -> Vec<Arc<Summary>> {
        match self.ledger.as_ref() {
            Some(ledger) if !self.topology.full_mesh => {
                ledger.summary();
                ledger.summaries_for(peer)
            }
            _ => Vec::new(),
        }
    }

    /// A request from peer `from` arrives: applied now (with the summaries
    /// riding on it), answered once durable.
    pub fn on_request(
        &mut self,
        from: usize,
        id: u64,
        body: SyncRequest,
        summaries: &[Arc<Summary>],
        now: u64,
        out: &mut Vec<Out>,
    ) {
        if self.ledger.is_none() || !self.connected.contains(&from) {
            return;
        }
        let key = peer_id(from);
        self.input(
            Input::RequestArrived {
                peer: key.clone(),
                digests: body.docs.iter().map(|d| (d.doc, d.digest)).collect(),
                connected: body.connected.clone(),
            },
            now,
            out,
        );
        if let Some(ledger) = self.ledger.as_ref() {
            ledger.observe_remote_clock(body.hlc);
        }
        let Some(ledger) = self.ledger.as_ref() else {
            return;
        };
        let mut arrived = Vec::new();
        let mut conflicts = false;
        let applied = work::apply(
            ledger,
            &key,
            body,
            |o: &MergeOutcome| {
                arrived.extend(
                    o.new_allocations
                        .iter()
                        .map(|r| (r.txn_id.to_string(), now)),
                );
                conflicts |= !o.conflicts_changed.is_empty();
            },
            |_, _| {},
        );
        self.arrivals.extend(arrived);
        if !summaries.is_empty() {
            ledger.receive_summaries(&key, summaries);
        }
        if conflicts {
            self.schedule_losers(now);
        }
        self.waiting_responses.push((
            applied.durable_seq,
            from,
            id,
            applied.their_digests,
            applied.docs,
        ));
    }

    /// The answer to our request `id` from `from` arrives.
    pub fn on_response(
        &mut self,
        from: usize,
        id: u64,
        body: SyncResponse,
        summaries: &[Arc<Summary>],
        now: u64,
        out: &mut Vec<Out>,
    ) {
        let Some(ledger) = self.ledger.as_ref() else {
            return;
        };
        if !summaries.is_empty() {
            ledger.receive_summaries(&peer_id(from), summaries);
        }
        let current = self.in_flight.get(&from) == Some(&id);
        if current {
            self.in_flight.remove(&from);
        }
        if let Some(ledger) = self.ledger.as_ref() {
            ledger.observe_remote_clock(body.hlc);
        }
        self.input(
            Input::ResponseArrived {
                peer: peer_id(from),
                current,
                digests: body.digests,
                connected: body.connected,
            },
            now,
            out,
        );
    }

    /// Our request `id` to `to` timed out (or its connection closed).
    pub fn on_request_failed(&mut self, to: usize, id: u64, now: u64, out: &mut Vec<Out>) {
        let current = self.in_flight.get(&to) == Some(&id);
        if current {
            self.in_flight.remove(&to);
        }
        self.input(
            Input::RequestFailed {
                peer: peer_id(to),
                current,
            },
            now,
            out,
        );
    }

    /// A connection to `peer` is up.
    pub fn on_connected(&mut self, peer: usize, now: u64, out: &mut Vec<Out>) {
        if self.ledger.is_none() || !self.connected.insert(peer) {
            return;
        }
        self.input(Input::Connected(peer_id(peer)), now, out);
    }

    /// The connection to `peer` closed.
    pub fn on_disconnected(&mut self, peer: usize, now: u64, out: &mut Vec<Out>) {
        if !self.connected.remove(&peer) {
            return;
        }
        if let Some(id) = self.in_flight.remove(&peer) {
            self.on_request_failed(peer, id, now, out);
        }
        self.input(Input::Disconnected(peer_id(peer)), now, out);
    }

    /// A dial to `peer` failed.
    pub fn on_dial_failed(&mut self, peer: usize, now: u64, out: &mut Vec<Out>) {
        self.input(Input::DialFailed(peer_id(peer)), now, out);
    }

    /// Folds pending allocations into their documents.
    pub fn fold(&mut self) {
        if let Some(ledger) = self.ledger.as_ref() {
            ledger.fold_pending();
        }
    }

    /// New compensations for this node's losers.
    fn schedule_losers(&mut self, now: u64) {
        let Some(ledger) = self.ledger.as_ref() else {
            return;
        };
        let wall = self.clock_ms();
        let mut new = Vec::new();
        for c in ledger.conflicts() {
            let Some(winner) = c.key.allocations.first() else {
                continue;
            };
            for loser in c.key.allocations.iter().skip(1) {
                let txn = &loser.record.txn_id.to_string();
                if *loser.record.node == *self.id && !self.compensations.contains_key(txn) {
                    new.push((
                        c.key.key.clone(),
                        winner.record.txn_id.to_string(),
                        txn.clone(),
                    ));
                }
            }
        }
        for (key, winner, txn) in new {
            let (machine, entry) = Compensation::new(&txn, wall);
            self.log(&txn, &entry);
            self.compensations.insert(
                txn,
                Tracked {
                    key,
                    winner,
                    machine,
                    attempt: None,
                },
            );
        }
        let _ = now;
        self.publish();
    }

    fn log(&self, txn: &str, entry: &LogEntry) {
        if let Ok(bytes) = serde_json::to_vec(entry) {
            self.disk.append_log(txn, bytes);
        }
    }

    /// Writes every compensation's state into the replicated ledger.
    fn publish(&self) {
        let Some(ledger) = self.ledger.as_ref() else {
            return;
        };
        let records: Vec<CompensationRecord> = self
            .compensations
            .iter()
            .map(|(txn, t)| CompensationRecord {
                v: RECORD_VERSION,
                key: t.key.clone(),
                txn_id: txn.clone(),
                winner_txn_id: t.winner.clone(),
                owner: self.id.clone(),
                idempotency_key: t.machine.idempotency_key.clone(),
                state: t.machine.state,
                attempts: t.machine.attempts,
                last_error: t.machine.last_error.clone(),
                next_attempt_at_ms: t.machine.next_attempt_at_ms,
                detected_at_ms: t.machine.detected_at_ms,
                succeeded_at_ms: t.machine.succeeded_at_ms,
            })
            .collect();
        if !records.is_empty() {
            let _ = ledger.put_compensations(&records);
        }
    }

    /// Runs due compensation attempts; `webhook` decides each attempt's
    /// duration, outcome, and whether the call reached the receiver (a call
    /// whose answer was lost reached it, yet fails).
    pub fn compensate(
        &mut self,
        now: u64,
        mut webhook: impl FnMut() -> (u64, Outcome, bool),
        out: &mut Vec<Out>,
    ) {
        if self.ledger.is_none() {
            return;
        }
        let wall = self.clock_ms();
        let mut changed = false;
        let mut logs = Vec::new();
        for (txn, t) in &mut self.compensations {
            if let Some((ends, outcome)) = t.attempt.clone() {
                if ends <= now {
                    t.attempt = None;
                    if let Ok(entry) = t.machine.finish(outcome, &self.policy, wall, now) {
                        logs.push((txn.clone(), entry));
                        changed = true;
                    }
                }
                continue;
            }
            if t.machine.due(wall) {
                if let Ok(entry) = t.machine.start(wall) {
                    logs.push((txn.clone(), entry));
                    let (takes, outcome, reached) = webhook();
                    if reached {
                        out.push(Out::Compensate {
                            key: t.machine.idempotency_key.clone(),
                            txn: txn.clone(),
                        });
                    }
                    t.attempt = Some((now + takes, outcome));
                    changed = true;
                }
            }
        }
        for (txn, entry) in logs {
            self.log(&txn, &entry);
        }
        if changed {
            self.publish();
        }
    }

    /// What an operator does with `oncemesh retry-compensation`: sends every
    /// dead-lettered compensation of this node back for another round.
    /// Returns how many.
    pub fn operator_retry(&mut self) -> usize {
        if self.ledger.is_none() {
            return 0;
        }
        let wall = self.clock_ms();
        let mut logs = Vec::new();
        for (txn, t) in &mut self.compensations {
            if let Ok(entry) = t.machine.operator_retry(wall) {
                logs.push((txn.clone(), entry));
            }
        }
        for (txn, entry) in &logs {
            self.log(txn, entry);
        }
        if !logs.is_empty() {
            self.publish();
        }
        logs.len()
    }

    /// One line on where this node stands, for a report of a run that did
    /// not converge.
    pub fn describe(&self) -> String {
        let Some(ledger) = self.ledger.as_ref() else {
            return format!("node {}: down", self.index);
        };
        let digests: Vec<String> = ledger
            .digests()
            .iter()
            .map(|(d, g)| format!("{}:{:02x}", d, g[0]))
            .collect();
        let open: Vec<String> = ledger
            .conflicts()
            .iter()
            .filter(|c| !c.key.is_resolved())
            .map(|c| {
                let losers: Vec<String> = c
                    .key
                    .allocations
                    .iter()
                    .skip(1)
                    .map(|a| {
                        let state = c
                            .key
                            .compensations
                            .iter()
                            .find(|r| r.txn_id == a.record.txn_id)
                            .map_or("no record".to_owned(), |r| {
                                format!("{} x{}", r.state.as_str(), r.attempts)
                            });
                        format!("{} by {} ({state})", a.record.txn_id, a.record.node)
                    })
                    .collect();
                format!("{}: {}", c.key.key, losers.join(", "))
            })
            .collect();
        let mine: Vec<String> = self
            .compensations
            .iter()
            .filter(|(_, t)| !t.machine.state.is_terminal())
            .map(|(txn, t)| {
                format!(
                    "{txn} {} next {:?}",
                    t.machine.state.as_str(),
                    t.machine.next_attempt_at_ms
                )
            })
            .collect();
        format!(
            "node {}: open {open:?}, running here {mine:?}; connected {:?}, in flight {:?}, waiting acks {}, responses {}, pending {}, conflicts {} open {}, docs {}",
            self.index,
            self.connected,
            self.in_flight,
            self.waiting_acks.len(),
            self.waiting_responses.len(),
            ledger.pending_count(),
            ledger.conflicts().len(),
            ledger.conflicts().iter().filter(|c| !c.key.is_resolved()).count(),
            digests.join(" ")
        )
    }
}
