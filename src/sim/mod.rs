//! A deterministic simulator of a whole cluster: N nodes running the real
//! ledger, sync engine and its work, compensation state machine and
//! confidence model ([`node`]), on a simulated network (latency and jitter
//! per link, loss, duplication, symmetric and one-way partitions), simulated
//! disks that lose what was not flushed when a node crashes, clocks that are
//! skewed and jump, and a compensation endpoint that fails and hangs. Time is
//! virtual: one event queue, one seeded random generator, so one seed
//! reproduces a run exactly, and a run of minutes of cluster time takes a
//! fraction of a second.
//!
//! A run plays client traffic with cross-region retries under faults, then
//! heals everything and lets the cluster converge; [`check`] then judges
//! the recorded history. `examples/simulate.rs` runs many seeds; the test
//! suite runs a thousand (tests/simulation.rs). docs/RELIABILITY.md says
//! what is simulated and what was found.

mod disk;
mod node;

use crate::check::{self, NodeState};
use crate::compensation::machine::Outcome;
use crate::ledger::coverage::Summary;
use crate::ledger::Windows;
use crate::sync::message::{SyncRequest, SyncResponse};
use node::{Out, SimNode};
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use std::cmp::Ordering;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap};
use std::sync::Arc;

pub use crate::check::{Report, Violation};

/// What a run simulates.
#[derive(Debug, Clone)]
pub struct SimConfig {
    /// Nodes (regions).
    pub nodes: usize,
    /// Most neighbours a node syncs with (`None`: every other node, the
    /// full mesh); clusters of at most this plus one are a full mesh anyway
    /// (`crate::sync::topology`).
    pub fanout: Option<usize>,
    /// One-way link latency, ms, and up to this much jitter on top.
    pub link_latency_ms: u64,
    /// See `link_latency_ms`.
    pub jitter_ms: u64,
    /// How long clients send traffic, ms of virtual time.
    pub workload_ms: u64,
    /// New payments per second, whole cluster.
    pub payments_per_s: f64,
    /// Chance that a payment is retried, in another region two times in three.
    pub retry: f64,
    /// Partitions, crashes, clock skew and jumps, a failing webhook.
    pub faults: bool,
    /// A partition into two groups cuts a third of the nodes (chosen at
    /// random) from the rest, instead of each node's side being a coin toss.
    pub split_third: bool,
    /// Chance that a message is lost, and that it is delivered twice (while
    /// faults run).
    pub loss: f64,
    /// See `loss`.
    pub duplicate: f64,
    /// Longest the cluster may take to converge after the heal, ms.
    pub converge_within_ms: u64,
    /// Token retention (documents are cut into windows of a quarter of it).
    /// Clocks are skewed by up to five minutes, and a node expires
    /// documents by its own clock: a retention close to the skew makes a
    /// fast node drop what its peers still sync (documented, not a bug).
    pub retention_ms: u64,
}

impl Default for SimConfig {
    fn default() -> Self {
        Self {
            nodes: 3,
            fanout: Some(6),
            link_latency_ms: 20,
            jitter_ms: 15,
            workload_ms: 8_000,
            payments_per_s: 15.0,
            retry: 0.3,
            faults: true,
            split_third: false,
            loss: 0.01,
            duplicate: 0.01,
            converge_within_ms: 120_000,
            retention_ms: 3_600_000,
        }
    }
}

/// A request or a response in flight.
#[derive(Debug)]
enum Msg {
    Request(u64, SyncRequest, Vec<Arc<Summary>>),
    Response(u64, SyncResponse, Vec<Arc<Summary>>),
}

/// Something that happens at a moment of virtual time.
#[derive(Debug)]
enum Ev {
    Tick(usize),
    Fold(usize),
    Flush(usize),
    Compensate(usize),
    Sample,
    Connect(usize, usize),
    DialFailed(usize, usize),
    Deliver {
        from: usize,
        to: usize,
        msg: Msg,
    },
    Timeout {
        from: usize,
        to: usize,
        id: u64,
    },
    Client(usize),
    Partition(Vec<(usize, usize)>),
    Heal,
    Crash(usize),
    Restart(usize),
    Skew(usize, i64),
    EndOfWorkload,
    /// The operator retries what was dead-lettered (every 2 s after the heal).
    Operator,
}

struct Scheduled {
    at: u64,
    seq: u64,
    ev: Ev,
}

impl PartialEq for Scheduled {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.seq) == (other.at, other.seq)
    }
}
impl Eq for Scheduled {}
impl PartialOrd for Scheduled {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Scheduled {
    fn cmp(&self, other: &Self) -> Ordering {
        // A max-heap: the earliest event first.
        (other.at, other.seq).cmp(&(self.at, self.seq))
    }
}

/// One client attempt: allocate `key` for payment `payment` at `node`.
#[derive(Debug, Clone)]
struct Attempt {
    at: u64,
    node: usize,
    key: String,
    payment: u64,
}

/// Virtual time starts near here (at the end of a document window).
const START_MS: u64 = 1_800_000_000_000;
/// A request not answered within this is failed, as libp2p's timeout does.
const REQUEST_TIMEOUT_MS: u64 = 30_000;

/// The world: nodes, links, the queue, the history.
struct World {
    config: SimConfig,
    rng: StdRng,
    now: u64,
    seq: u64,
    queue: BinaryHeap<Scheduled>,
    nodes: Vec<SimNode>,
    skew: Vec<i64>,
    /// Directed links that drop everything.
    down: BTreeSet<(usize, usize)>,
    lossy: bool,
    webhook_failing: bool,
    attempts: Vec<Attempt>,
    history: check::History,
    workload_over: bool,
    /// A flush is scheduled for the node's disk.
    flushing: Vec<bool>,
}

impl World {
    fn schedule(&mut self, after: u64, ev: Ev) {
        self.seq += 1;
        self.queue.push(Scheduled {
            at: self.now + after,
            seq: self.seq,
            ev,
        });
    }

    fn latency(&mut self) -> u64 {
        self.config.link_latency_ms + self.rng.random_range(0..=self.config.jitter_ms)
    }

    fn up(&self, a: usize, b: usize) -> bool {
        !self.down.contains(&(a, b)) && !self.down.contains(&(b, a))
    }

    /// Sets node `i`'s clock to virtual time plus its skew.
    fn clock(&mut self, i: usize) {
        let skewed = self.now.saturating_add_signed(self.skew[i]);
        self.nodes[i].clock.set(skewed);
    }

    /// Runs `f` on node `i` at the current time, then delivers what it hands out.
    fn at_node(&mut self, i: usize, f: impl FnOnce(&mut SimNode, u64, &mut Vec<Out>)) {
        self.clock(i);
        let mut out = Vec::new();
        let now = self.now;
        f(&mut self.nodes[i], now, &mut out);
        self.nodes[i].pump(now, &mut out);
        self.deliver(i, out);
        self.flush_soon(i);
    }

    /// Writes reach the platter a few ms after they are queued (group commit).
    fn flush_soon(&mut self, i: usize) {
        if !self.flushing[i] && self.nodes[i].needs_flush() {
            self.flushing[i] = true;
            let after = self.rng.random_range(1..=4);
            self.schedule(after, Ev::Flush(i));
        }
    }

    fn deliver(&mut self, from: usize, outs: Vec<Out>) {
        for out in outs {
            match out {
                Out::Dial(to) => {
                    let latency = self.latency();
                    if self.nodes[to].alive() && self.up(from, to) {
                        self.schedule(latency, Ev::Connect(from, to));
                    } else {
                        self.schedule(latency, Ev::DialFailed(from, to));
                    }
                }
                Out::Request {
                    to,
                    id,
                    body,
                    summaries,
                } => {
                    self.schedule(REQUEST_TIMEOUT_MS, Ev::Timeout { from, to, id });
                    self.send(from, to, Msg::Request(id, body, summaries));
                }
                Out::Response {
                    to,
                    id,
                    body,
                    summaries,
                } => self.send(from, to, Msg::Response(id, body, summaries)),
                Out::Answered(answer) => self.history.answered(self.now, answer),
                Out::Compensate { key, txn } => self.history.compensated(from, key, txn),
            }
        }
    }

    fn send(&mut self, from: usize, to: usize, msg: Msg) {
        if self.down.contains(&(from, to)) || (self.lossy && self.rng.random_bool(self.config.loss))
        {
            return;
        }
        let twice = self.lossy && self.rng.random_bool(self.config.duplicate);
        let latency = self.latency();
        if twice {
            let copy = match &msg {
                Msg::Request(id, body, s) => Msg::Request(*id, body.clone(), s.clone()),
                Msg::Response(id, body, s) => Msg::Response(*id, body.clone(), s.clone()),
            };
            let again = latency + self.latency();
            self.schedule(
                again,
                Ev::Deliver {
                    from,
                    to,
                    msg: copy,
                },
            );
        }
        self.schedule(latency, Ev::Deliver { from, to, msg });
    }

    /// Closes every connection whose link is cut both ways or whose node is down.
    fn drop_broken_connections(&mut self) {
        for a in 0..self.nodes.len() {
            let peers: Vec<usize> = self.nodes[a].connected.iter().copied().collect();
            for b in peers {
                let broken = !self.nodes[b].alive()
                    || (self.down.contains(&(a, b)) && self.down.contains(&(b, a)));
                if broken {
                    self.at_node(a, |n, now, out| n.on_disconnected(b, now, out));
                }
            }
        }
    }

    fn handle(&mut self, ev: Ev) {
        let n = self.nodes.len();
        match ev {
            Ev::Tick(i) => {
                self.at_node(i, |node, now, out| {
                    node.input(crate::sync::Input::Tick, now, out)
                });
                self.schedule(50, Ev::Tick(i));
            }
            Ev::Fold(i) => {
                self.at_node(i, |node, _, _| node.fold());
                self.schedule(25, Ev::Fold(i));
            }
            Ev::Flush(i) => {
                self.flushing[i] = false;
                self.at_node(i, |node, now, out| node.flush(now, out));
            }
            Ev::Compensate(i) => {
                let failing = self.webhook_failing;
                let mut draws: Vec<(u64, Outcome, bool)> =
                    (0..8).map(|_| webhook(&mut self.rng, failing)).collect();
                self.at_node(i, |node, now, out| {
                    node.compensate(
                        now,
                        || draws.pop().unwrap_or((10, Outcome::Success, true)),
                        out,
                    )
                });
                self.schedule(100, Ev::Compensate(i));
            }
            Ev::Sample => {
                self.sample_settled();
                self.schedule(500, Ev::Sample);
            }
            Ev::Connect(a, b) => {
                let fresh = !self.nodes[a].connected.contains(&b);
                if fresh && self.nodes[a].alive() && self.nodes[b].alive() && self.up(a, b) {
                    self.at_node(a, |node, now, out| node.on_connected(b, now, out));
                    self.at_node(b, |node, now, out| node.on_connected(a, now, out));
                } else if !fresh {
                } else {
                    self.at_node(a, |node, now, out| node.on_dial_failed(b, now, out));
                }
            }
            Ev::DialFailed(a, b) => {
                self.at_node(a, |node, now, out| node.on_dial_failed(b, now, out))
            }
            Ev::Deliver { from, to, msg } => {
                let linked = self.nodes[to].connected.contains(&from)
                    && self.nodes[from].connected.contains(&to);
                if !linked || self.down.contains(&(from, to)) {
                    return;
                }
                match msg {
                    Msg::Request(id, body, s) => self.at_node(to, |node, now, out| {
                        node.on_request(from, id, body, &s, now, out)
                    }),
                    Msg::Response(id, body, s) => self.at_node(to, |node, now, out| {
                        node.on_response(from, id, body, &s, now, out)
                    }),
                }
            }
            Ev::Timeout { from, to, id } => self.at_node(from, |node, now, out| {
                node.on_request_failed(to, id, now, out)
            }),
            Ev::Client(k) => {
                let attempt = self.attempts[k].clone();
                let payload = serde_json::json!({ "payment": attempt.payment });
                self.clock(attempt.node);
                let op = k as u64;
                let accepted = self.nodes[attempt.node].allocate(op, &attempt.key, &payload);
                self.history
                    .attempted(self.now, attempt.node, &attempt.key, accepted);
                let mut out = Vec::new();
                self.nodes[attempt.node].pump(self.now, &mut out);
                self.deliver(attempt.node, out);
                self.flush_soon(attempt.node);
            }
            Ev::Partition(cut) => {
                self.history.note(self.now, format!("partition {cut:?}"));
                self.down = cut.into_iter().collect();
                self.drop_broken_connections();
            }
            Ev::Heal => {
                self.history.note(self.now, "heal".into());
                self.down.clear();
            }
            Ev::Crash(i) => {
                if !self.nodes[i].alive() {
                    return;
                }
                self.history.note(self.now, format!("crash node {i}"));
                self.nodes[i].crash();
                for j in 0..n {
                    if j != i {
                        self.at_node(j, |node, now, out| node.on_disconnected(i, now, out));
                    }
                }
            }
            Ev::Restart(i) => {
                if self.nodes[i].alive() {
                    return;
                }
                self.history.note(self.now, format!("restart node {i}"));
                self.clock(i);
                let now = self.now;
                self.nodes[i].restart(now);
                if let Some(e) = self.nodes[i].boot_error.take() {
                    self.history.violation(Violation::new("restart", e, None));
                }
            }
            Ev::Skew(i, ms) => {
                self.history
                    .note(self.now, format!("node {i} clock {ms:+} ms"));
                self.skew[i] = ms;
            }
            Ev::EndOfWorkload => {
                self.workload_over = true;
                self.lossy = false;
                self.webhook_failing = false;
                self.down.clear();
                self.history
                    .note(self.now, "end of workload: heal everything".into());
                for i in 0..n {
                    self.handle(Ev::Restart(i));
                }
                self.schedule(2_000, Ev::Operator);
            }
            Ev::Operator => {
                for i in 0..n {
                    self.clock(i);
                    let retried = self.nodes[i].operator_retry();
                    if retried > 0 {
                        self.history.note(
                            self.now,
                            format!("operator retried {retried} dead-lettered on node {i}"),
                        );
                    }
                }
                self.schedule(2_000, Ev::Operator);
            }
        }
    }

    /// Records, for a few keys, which nodes call them settled now.
    fn sample_settled(&mut self) {
        let keys = self.history.some_keys(&mut self.rng, 20);
        for (i, node) in self.nodes.iter().enumerate() {
            let Some(ledger) = node.ledger.as_ref() else {
                continue;
            };
            for key in &keys {
                if let Some(view) = ledger.key(key) {
                    if view.settled && view.allocations.len() == 1 {
                        let txn = view.allocations[0].record.txn_id.to_string();
                        self.history.settled_claim(self.now, i, key, txn);
                    }
                }
            }
        }
    }

    /// Whether the cluster has converged: every node up, identical
    /// documents, nothing waiting, every loser compensated.
    fn converged(&self) -> bool {
        let Some(first) = self.nodes[0].ledger.as_ref() else {
            return false;
        };
        let digests = first.digests();
        self.nodes.iter().all(|node| {
            node.ledger.as_ref().is_some_and(|l| {
                l.pending_count() == 0
                    && l.digests() == digests
                    && l.conflicts().iter().all(|c| c.key.is_resolved())
            })
        })
    }
}

/// One compensation call: how long it takes, its outcome, and whether it
/// reached the receiver (a call whose answer is lost reached it, yet fails).
fn webhook(rng: &mut StdRng, failing: bool) -> (u64, Outcome, bool) {
    if !failing {
        return (rng.random_range(5..60), Outcome::Success, true);
    }
    match rng.random_range(0..10) {
        0..=5 => (rng.random_range(5..60), Outcome::Success, true),
        6 => (
            rng.random_range(5..60),
            Outcome::Retryable("HTTP 503".into()),
            false,
        ),
        7 => (5_000, Outcome::Retryable("timed out".into()), true),
        8 => (10_000, Outcome::Retryable("hung".into()), false),
        _ => (
            rng.random_range(5..60),
            Outcome::Retryable("connection reset".into()),
            rng.random_bool(0.5),
        ),
    }
}

/// Plans the client traffic: payments, each retried maybe, in the same or
/// another region, after a delay from double submits to people.
fn plan_traffic(config: &SimConfig, rng: &mut StdRng) -> Vec<Attempt> {
    let mut attempts = Vec::new();
    let mut t = 0.0;
    let mut payment = 0u64;
    let mean_gap = 1000.0 / config.payments_per_s;
    loop {
        t += -mean_gap * (1.0 - rng.random::<f64>()).ln();
        if t >= config.workload_ms as f64 {
            break;
        }
        payment += 1;
        let home = rng.random_range(0..config.nodes);
        let key = format!("pay-{payment}");
        attempts.push(Attempt {
            at: t as u64,
            node: home,
            key: key.clone(),
            payment,
        });
        let mut at = t;
        while rng.random_bool(config.retry) {
            at += match rng.random_range(0..10) {
                0 => rng.random_range(1.0..100.0),
                1..=6 => rng.random_range(200.0..3_000.0),
                _ => rng.random_range(3_000.0..20_000.0),
            };
            let node = if rng.random_range(0..3) < 2 && config.nodes > 1 {
                (home + rng.random_range(1..config.nodes)) % config.nodes
            } else {
                home
            };
            attempts.push(Attempt {
                at: at as u64,
                node,
                key: key.clone(),
                payment,
            });
            if attempts.len() % 3 == 0 {
                break;
            }
        }
    }
    attempts
}

/// Plans the faults of the workload phase.
fn plan_faults(config: &SimConfig, rng: &mut StdRng) -> Vec<(u64, Ev)> {
    let n = config.nodes;
    let mut faults = Vec::new();
    if !config.faults || n < 2 {
        return faults;
    }
    let mut t = rng.random_range(200..1_500);
    while t < config.workload_ms {
        let lasts = rng.random_range(300..3_000);
        match rng.random_range(0..6) {
            // One region cut off from all others.
            0 | 1 => {
                let i = rng.random_range(0..n);
                let cut = (0..n)
                    .filter(|&j| j != i)
                    .flat_map(|j| [(i, j), (j, i)])
                    .collect();
                faults.push((t, Ev::Partition(cut)));
                faults.push((t + lasts, Ev::Heal));
            }
            // Two groups.
            2 => {
                let side: Vec<bool> = if config.split_third {
                    let mut order: Vec<usize> = (0..n).collect();
                    for i in (1..n).rev() {
                        order.swap(i, rng.random_range(0..=i));
                    }
                    let mut side = vec![false; n];
                    for &i in order.iter().take(n.div_ceil(3)) {
                        side[i] = true;
                    }
                    side
                } else {
                    (0..n).map(|_| rng.random_bool(0.5)).collect()
                };
                let cut = (0..n)
                    .flat_map(|a| (0..n).map(move |b| (a, b)))
                    .filter(|&(a, b)| side[a] != side[b])
                    .collect();
                faults.push((t, Ev::Partition(cut)));
                faults.push((t + lasts, Ev::Heal));
            }
            // One way only.
            3 => {
                let a = rng.random_range(0..n);
                let b = (a + rng.random_range(1..n)) % n;
                faults.push((t, Ev::Partition(vec![(a, b)])));
                faults.push((t + lasts, Ev::Heal));
            }
            // A crash and a restart from what was on disk.
            4 => {
                let i = rng.random_range(0..n);
                faults.push((t, Ev::Crash(i)));
                faults.push((t + lasts.min(2_000), Ev::Restart(i)));
            }
            // A skewed clock, or one that jumps.
            _ => {
                let i = rng.random_range(0..n);
                let ms = if rng.random_bool(0.5) {
                    rng.random_range(-300_000..300_000)
                } else {
                    rng.random_range(-2_000..2_000)
                };
                faults.push((t, Ev::Skew(i, ms)));
            }
        }
        t += lasts + rng.random_range(200..2_000);
    }
    faults
}

/// Runs one schedule from `seed`; the report says what the checker found.
pub fn run(config: &SimConfig, seed: u64) -> Report {
    let mut rng = StdRng::seed_from_u64(seed);
    let windows = Windows::for_retention(config.retention_ms);
    // Start shortly before a window ends, so that runs cross into the next
    // window and retries straddle two documents.
    let boundary = (START_MS / windows.window_ms.max(1) + 1) * windows.window_ms.max(1);
    let start = boundary - rng.random_range(1..=config.workload_ms.max(1) * 2);
    let nodes = (0..config.nodes)
        .map(|i| SimNode::new(i, config.nodes, config.fanout, start, windows))
        .collect();
    let attempts = plan_traffic(config, &mut rng);
    let faults = plan_faults(config, &mut rng);
    let mut world = World {
        config: config.clone(),
        rng,
        now: start,
        seq: 0,
        queue: BinaryHeap::new(),
        nodes,
        skew: vec![0; config.nodes],
        down: BTreeSet::new(),
        lossy: config.faults,
        webhook_failing: config.faults,
        attempts,
        history: check::History::new(seed),
        workload_over: false,
        flushing: vec![false; config.nodes],
    };
    for i in 0..config.nodes {
        let offset = world.rng.random_range(0..50);
        world.schedule(offset, Ev::Tick(i));
        world.schedule(offset / 2, Ev::Fold(i));
        world.schedule(100 + offset, Ev::Compensate(i));
    }
    world.schedule(500, Ev::Sample);
    for k in 0..world.attempts.len() {
        let at = world.attempts[k].at;
        world.schedule(at, Ev::Client(k));
    }
    for (at, ev) in faults {
        world.schedule(at, ev);
    }
    let last_attempt = world.attempts.iter().map(|a| a.at).max().unwrap_or(0);
    let end = config.workload_ms.max(last_attempt) + 1;
    world.schedule(end, Ev::EndOfWorkload);
    let deadline = start + end + config.converge_within_ms;
    let mut converged_at = None;
    let mut next_check = start + end;
    let mut events = 0u64;
    while let Some(next) = world.queue.pop() {
        if next.at > deadline {
            break;
        }
        world.now = next.at;
        events += 1;
        world.handle(next.ev);
        if world.workload_over && world.now >= next_check {
            next_check = world.now + 250;
            if world.converged() {
                converged_at = Some(world.now);
                break;
            }
        }
    }
    // A quiet spell after convergence: the idle traffic per node.
    let sent_before: u64 = world.nodes.iter().map(|n| n.requests_sent).sum();
    let quiet_ms = 5_000;
    if converged_at.is_some() {
        let until = world.now + quiet_ms;
        while let Some(next) = world.queue.pop() {
            if next.at > until {
                break;
            }
            world.now = next.at;
            events += 1;
            if let Ev::Client(_) = next.ev {
                continue;
            }
            world.handle(next.ev);
        }
    }
    let idle = world.nodes.iter().map(|n| n.requests_sent).sum::<u64>() - sent_before;
    if converged_at.is_none() {
        for node in &world.nodes {
            let line = node.describe();
            world.history.note(world.now, line);
        }
    }
    // The first arrival of each allocation on each other node.
    let mut arrivals: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for n in &world.nodes {
        let mut first: BTreeMap<&str, u64> = BTreeMap::new();
        for (txn, at) in &n.arrivals {
            first.entry(txn.as_str()).or_insert(*at);
        }
        for (txn, at) in first {
            arrivals.entry(txn.to_owned()).or_default().push(at);
        }
    }
    let states: Vec<Option<NodeState>> = world
        .nodes
        .iter()
        .map(|n| end_state(n, &world.nodes, world.history.keys()))
        .collect();
    check::judge(
        world.history,
        &states,
        check::Run {
            seed,
            start,
            converged_after_ms: converged_at.map(|t| t.saturating_sub(start + end)),
            events,
            requests: sent_before,
            idle_requests_per_node_s: if converged_at.is_some() {
                idle as f64 / config.nodes as f64 / (quiet_ms as f64 / 1000.0)
            } else {
                f64::NAN
            },
            arrivals,
            busy_ms: converged_at.unwrap_or(world.now).saturating_sub(start),
            settled_after_ms: world
                .nodes
                .iter()
                .flat_map(|n| n.settled_after_ms.iter().copied())
                .collect(),
        },
    )
}

/// What the checker needs of `node` at the end (`None` if it is down):
/// each of `keys` it holds, its conflict report and its digests.
fn end_state<'a>(
    node: &SimNode,
    nodes: &[SimNode],
    keys: impl Iterator<Item = &'a String>,
) -> Option<NodeState> {
    let ledger = node.ledger.as_ref()?;
    let owner = |id: &str| nodes.iter().position(|n| *n.id == *id);
    Some(NodeState {
        keys: keys
            .filter_map(|key| {
                let view = ledger.key(key)?;
                let txns = view
                    .allocations
                    .iter()
                    .map(|a| (a.record.txn_id.to_string(), owner(&a.record.node)))
                    .collect();
                Some((key.clone(), txns))
            })
            .collect(),
        conflicts: ledger
            .conflicts()
            .into_iter()
            .filter_map(|c| Some((c.key.key.clone(), c.key.winner()?.record.txn_id.to_string())))
            .collect(),
        digests: ledger
            .digests()
            .into_iter()
            .map(|(doc, digest)| {
                (
                    doc.to_string(),
                    blake3::Hash::from(digest).to_hex().to_string(),
                )
            })
            .collect(),
    })
}
