//! The record of a run and the checker that judges it, once the cluster has
//! healed and converged. The simulator ([`crate::sim`], virtual time) and
//! the chaos runner ([`crate::chaos`], real processes) both record a
//! [`History`] and hand the checker each node's end state as a plain
//! [`NodeState`], so both are judged by the same code:
//!
//! 1. no acknowledged allocation is lost: every node holds it;
//! 2. a replay answers with an allocation of its key;
//! 3. every key allocated by more than one transaction is in every node's
//!    conflict report with the same winner, and no other key is;
//! 4. each loser is compensated by its own node (its idempotency key
//!    reached the receiver, from that node only), and no winner ever is;
//! 5. every node's documents are identical (digests);
//! 6. no node called a key settled while a competing allocation of it had
//!    already been acknowledged anywhere;
//!
//! and reports the calibration of the confidence given, the messages per
//! allocation, and how long an allocation took to reach every node.

use crate::compensation::machine::Compensation;
use rand::rngs::StdRng;
use rand::RngExt;
use std::collections::{BTreeMap, BTreeSet};

/// A broken invariant, with the key it concerns.
#[derive(Debug, Clone, PartialEq)]
pub struct Violation {
    /// Which check.
    pub check: &'static str,
    /// What was found.
    pub detail: String,
    /// The key, when one is involved.
    pub key: Option<String>,
}

impl Violation {
    /// A violation of `check`.
    pub fn new(check: &'static str, detail: String, key: Option<String>) -> Self {
        Self { check, detail, key }
    }
}

/// A client's answer.
#[derive(Debug, Clone)]
pub struct Answer {
    /// The client operation it answers.
    pub op: u64,
    /// The node that answered.
    pub node: usize,
    /// The key.
    pub key: String,
    /// The transaction.
    pub txn: String,
    /// Whether it was a replay.
    pub replay: bool,
    /// The confidence given (new allocations).
    pub confidence: f64,
}

/// What the checker needs of one node at the end of a run, however it was
/// read (a simulated ledger, or a real node's API).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct NodeState {
    /// Each key the clients asked for that the node holds: its allocations
    /// as (transaction id, index of the node that made it), winner first
    /// (smallest HLC, then node id).
    pub keys: BTreeMap<String, Vec<(String, Option<usize>)>>,
    /// The node's conflict report: key → the winner it names.
    pub conflicts: BTreeMap<String, String>,
    /// Its documents and their heads digests.
    pub digests: BTreeMap<String, String>,
}

impl NodeState {
    fn holds(&self, key: &str, txn: &str) -> bool {
        self.keys
            .get(key)
            .is_some_and(|v| v.iter().any(|(t, _)| t == txn))
    }
}

/// Everything the clients and the receiver saw, in order.
#[derive(Debug, Default)]
pub struct History {
    seed: u64,
    lines: Vec<(u64, String, Option<String>)>,
    answers: Vec<(u64, Answer)>,
    calls: Vec<(usize, String, String)>,
    claims: Vec<(u64, usize, String, String)>,
    keys: Vec<String>,
    key_set: BTreeSet<String>,
    violations: Vec<Violation>,
}

impl History {
    /// An empty history of the run of `seed`.
    pub fn new(seed: u64) -> Self {
        Self {
            seed,
            ..Self::default()
        }
    }

    /// A line of the history about no key in particular.
    pub fn note(&mut self, at: u64, what: String) {
        self.lines.push((at, what, None));
    }

    /// A client tried `key` at `node`; `accepted` if the node was up to take it.
    pub fn attempted(&mut self, at: u64, node: usize, key: &str, accepted: bool) {
        if self.key_set.insert(key.to_owned()) {
            self.keys.push(key.to_owned());
        }
        let what = if accepted {
            "asked"
        } else {
            "asked (node down)"
        };
        self.lines.push((
            at,
            format!("client {what} node {node} for {key}"),
            Some(key.to_owned()),
        ));
    }

    /// A client got its answer (the allocation is durable there).
    pub fn answered(&mut self, at: u64, answer: Answer) {
        self.lines.push((
            at,
            format!(
                "node {} answered {} with {}{} (confidence {:.3})",
                answer.node,
                answer.key,
                answer.txn,
                if answer.replay { ", a replay" } else { "" },
                answer.confidence
            ),
            Some(answer.key.clone()),
        ));
        self.answers.push((at, answer));
    }

    /// A request of a client for `key` failed (an error, a timeout).
    pub fn failed(&mut self, at: u64, node: usize, key: &str, reason: &str) {
        self.lines.push((
            at,
            format!("node {node} failed {key}: {reason}"),
            Some(key.to_owned()),
        ));
    }

    /// A compensation call from `node` reached the receiver.
    pub fn compensated(&mut self, node: usize, key: String, txn: String) {
        self.calls.push((node, key, txn));
    }

    /// `node` called `key` settled with `txn` as its only allocation.
    pub fn settled_claim(&mut self, at: u64, node: usize, key: &str, txn: String) {
        self.claims.push((at, node, key.to_owned(), txn));
    }

    /// A violation found while running.
    pub fn violation(&mut self, v: Violation) {
        self.violations.push(v);
    }

    /// Every key clients have asked for, in the order first asked.
    pub fn keys(&self) -> impl Iterator<Item = &String> {
        self.keys.iter()
    }

    /// Up to `n` keys clients have asked for, at random.
    pub fn some_keys(&self, rng: &mut StdRng, n: usize) -> Vec<String> {
        if self.keys.is_empty() {
            return Vec::new();
        }
        (0..n.min(self.keys.len()))
            .map(|_| self.keys[rng.random_range(0..self.keys.len())].clone())
            .collect()
    }

    /// The lines about `key` (or every line when `None`), at most `max`.
    fn excerpt(&self, key: Option<&str>, start: u64, max: usize) -> Vec<String> {
        self.lines
            .iter()
            // About a key: its lines and the faults. About none: the faults.
            .filter(|(_, _, k)| k.is_none() || (key.is_some() && k.as_deref() == key))
            .take(max)
            .map(|(at, line, _)| {
                format!("{:>8.3} s  {line}", at.saturating_sub(start) as f64 / 1e3)
            })
            .collect()
    }
}

/// Facts of the run beside the history (the figures after `converged_after_ms`
/// are the simulator's; a real run leaves them at their defaults).
#[derive(Debug, Default)]
pub struct Run {
    /// The seed.
    pub seed: u64,
    /// Virtual time at the start.
    pub start: u64,
    /// From the heal to convergence, ms (`None`: never converged).
    pub converged_after_ms: Option<u64>,
    /// Events handled.
    pub events: u64,
    /// Sync requests sent until convergence.
    pub requests: u64,
    /// Sync requests per node and second once converged.
    pub idle_requests_per_node_s: f64,
    /// Per transaction, when it arrived on each other node.
    pub arrivals: BTreeMap<String, Vec<u64>>,
    /// From the start to convergence, ms (what `requests` were sent over).
    pub busy_ms: u64,
    /// For each allocation its node called settled, how long after it was
    /// made, ms.
    pub settled_after_ms: Vec<u64>,
}

/// What a run found.
#[derive(Debug, Clone)]
pub struct Report {
    /// The seed that reproduces it.
    pub seed: u64,
    /// Broken invariants (empty: the run passed).
    pub violations: Vec<Violation>,
    /// The shortest history excerpt that shows the first violation.
    pub excerpt: Vec<String>,
    /// New allocations acknowledged.
    pub allocations: usize,
    /// Replays answered.
    pub replays: usize,
    /// Keys in conflict at the end.
    pub conflicts: usize,
    /// Events handled.
    pub events: u64,
    /// From the heal to convergence, ms.
    pub converged_after_ms: Option<u64>,
    /// Sync requests per new allocation, until convergence.
    pub messages_per_allocation: f64,
    /// The same with the idle rate subtracted: what the allocations cost
    /// on top of the anti-entropy rounds a quiet cluster sends anyway.
    pub busy_messages_per_allocation: f64,
    /// Median and largest time from an allocation until its own node
    /// called it settled, ms.
    pub settled_p50_ms: Option<u64>,
    /// See `settled_p50_ms`.
    pub settled_max_ms: Option<u64>,
    /// Sync requests per node and second once converged.
    pub idle_requests_per_node_s: f64,
    /// Median and largest time from an allocation's answer until every
    /// other node held it, ms.
    pub visible_p50_ms: Option<u64>,
    /// See `visible_p50_ms`.
    pub visible_max_ms: Option<u64>,
    /// (confidence given, whether the key ended in conflict) per new allocation.
    pub outcomes: Vec<(f64, bool)>,
}

impl Report {
    /// Whether every check held.
    pub fn passed(&self) -> bool {
        self.violations.is_empty()
    }
}

/// Judges a run once it is over.
/// `nodes` holds each node's end state, `None` for a node not running.
pub fn judge(mut history: History, nodes: &[Option<NodeState>], run: Run) -> Report {
    let mut found = std::mem::take(&mut history.violations);
    if run.converged_after_ms.is_none() {
        found.push(Violation::new(
            "convergence",
            "the cluster did not converge after the heal".into(),
            None,
        ));
    }
    let ledgers: Vec<&NodeState> = nodes.iter().flatten().collect();
    let mut report = Report {
        seed: history.seed,
        violations: Vec::new(),
        excerpt: Vec::new(),
        allocations: 0,
        replays: 0,
        conflicts: 0,
        events: run.events,
        converged_after_ms: run.converged_after_ms,
        messages_per_allocation: 0.0,
        busy_messages_per_allocation: 0.0,
        settled_p50_ms: None,
        settled_max_ms: None,
        idle_requests_per_node_s: run.idle_requests_per_node_s,
        visible_p50_ms: None,
        visible_max_ms: None,
        outcomes: Vec::new(),
    };
    if ledgers.len() != nodes.len() {
        found.push(Violation::new(
            "restart",
            "a node is not running at the end".into(),
            None,
        ));
        report.violations = found;
        report.excerpt = history.excerpt(None, run.start, 40);
        return report;
    }
    // Every key's allocations, as node 0 holds them at the end.
    let final_txns: BTreeMap<String, Vec<String>> = ledgers[0]
        .keys
        .iter()
        .map(|(key, txns)| (key.clone(), txns.iter().map(|(t, _)| t.clone()).collect()))
        .collect();
    let mut first_answer: BTreeMap<String, u64> = BTreeMap::new();
    for (at, a) in &history.answers {
        if a.replay {
            report.replays += 1;
            let known = final_txns.get(&a.key).is_some_and(|t| t.contains(&a.txn));
            if !known {
                found.push(Violation::new(
                    "replay",
                    format!(
                        "node {} answered a replay of {} with {}, no allocation of it",
                        a.node, a.key, a.txn
                    ),
                    Some(a.key.clone()),
                ));
            }
            continue;
        }
        report.allocations += 1;
        first_answer.entry(a.txn.clone()).or_insert(*at);
        // 1. Nothing acknowledged is lost.
        for (i, ledger) in ledgers.iter().enumerate() {
            if !ledger.holds(&a.key, &a.txn) {
                found.push(Violation::new(
                    "lost",
                    format!(
                        "node {i} lacks {} of {}, acknowledged by node {}",
                        a.txn, a.key, a.node
                    ),
                    Some(a.key.clone()),
                ));
            }
        }
        let conflicted = final_txns.get(&a.key).is_some_and(|t| t.len() > 1);
        report.outcomes.push((a.confidence, conflicted));
    }
    // 3. Conflicts, the same everywhere, and no false ones.
    let reports: Vec<&BTreeMap<String, String>> = ledgers.iter().map(|l| &l.conflicts).collect();
    for (key, txns) in &final_txns {
        let expected = (txns.len() > 1).then(|| txns[0].clone());
        if expected.is_some() {
            report.conflicts += 1;
        }
        for (i, r) in reports.iter().enumerate() {
            if r.get(key) != expected.as_ref() {
                found.push(Violation::new(
                    "conflict report",
                    format!(
                        "node {i} reports {:?} as {key}'s winner; the key has {txns:?}",
                        r.get(key)
                    ),
                    Some(key.clone()),
                ));
            }
        }
    }
    // 4. Each loser compensated by its own node, winners never.
    let mut callers: BTreeMap<String, BTreeSet<usize>> = BTreeMap::new();
    for (node, key, _) in &history.calls {
        callers.entry(key.clone()).or_default().insert(*node);
    }
    for (key, allocations) in ledgers[0].keys.iter().filter(|(_, a)| a.len() > 1) {
        for (rank, (txn, owner)) in allocations.iter().enumerate() {
            let idem = Compensation::idempotency_key_for(txn);
            let called = callers.remove(&idem).unwrap_or_default();
            let bad = if rank == 0 {
                (!called.is_empty()).then(|| format!("the winner {txn} was compensated"))
            } else if called.is_empty() {
                Some(format!("the loser {txn} was never compensated"))
            } else if called.iter().any(|n| Some(*n) != *owner) {
                Some(format!(
                    "the loser {txn} was compensated by {called:?}, not its own node {owner:?}"
                ))
            } else {
                None
            };
            if let Some(detail) = bad {
                found.push(Violation::new("compensation", detail, Some(key.clone())));
            }
        }
    }
    for (idem, nodes) in callers {
        found.push(Violation::new(
            "compensation",
            format!("{idem} was called by {nodes:?} but belongs to no loser"),
            None,
        ));
    }
    // 5. Identical documents.
    for (i, l) in ledgers.iter().enumerate().skip(1) {
        if l.digests != ledgers[0].digests {
            found.push(Violation::new(
                "documents",
                format!("node {i}'s documents differ from node 0's"),
                None,
            ));
        }
    }
    // 6. Settled only when nothing competed.
    for (at, node, key, txn) in &history.claims {
        let rival = final_txns
            .get(key)
            .into_iter()
            .flatten()
            .filter(|t| *t != txn)
            .find_map(|t| {
                let answered = *first_answer.get(t)?;
                (answered <= *at).then_some((t, answered))
            });
        if let Some((rival, answered)) = rival {
            let s = |ms: u64| ms.saturating_sub(run.start) as f64 / 1e3;
            found.push(Violation::new(
                "settled",
                format!(
                    "node {node} called {key} settled with {txn} at {:.3} s; {rival} had been acknowledged at {:.3} s",
                    s(*at),
                    s(answered)
                ),
                Some(key.clone()),
            ));
        }
    }
    // Figures.
    let allocations = report.allocations.max(1) as f64;
    report.messages_per_allocation = run.requests as f64 / allocations;
    let idle = run.idle_requests_per_node_s * nodes.len() as f64 * run.busy_ms as f64 / 1000.0;
    report.busy_messages_per_allocation = if idle.is_finite() {
        (run.requests as f64 - idle).max(0.0) / allocations
    } else {
        f64::NAN
    };
    let mut settled = run.settled_after_ms.clone();
    settled.sort_unstable();
    report.settled_p50_ms = settled.get(settled.len() / 2).copied();
    report.settled_max_ms = settled.last().copied();
    let mut visible: Vec<u64> = first_answer
        .iter()
        .filter_map(|(txn, answered)| {
            let seen = run.arrivals.get(txn)?;
            (seen.len() + 1 >= nodes.len())
                .then(|| seen.iter().max().map_or(0, |m| m.saturating_sub(*answered)))
        })
        .collect();
    visible.sort_unstable();
    report.visible_p50_ms = visible.get(visible.len() / 2).copied();
    report.visible_max_ms = visible.last().copied();
    if let Some(first) = found.first() {
        report.excerpt = history.excerpt(first.key.as_deref(), run.start, 60);
    }
    report.violations = found;
    report
}

/// Expected calibration error over ten bins of (confidence, conflicted).
pub fn ece(outcomes: &[(f64, bool)]) -> f64 {
    let mut bins = [(0usize, 0.0f64, 0usize); 10];
    for &(c, conflicted) in outcomes {
        let b = &mut bins[((c * 10.0) as usize).min(9)];
        b.0 += 1;
        b.1 += c;
        b.2 += usize::from(!conflicted);
    }
    let n = outcomes.len().max(1) as f64;
    bins.iter()
        .filter(|b| b.0 > 0)
        .map(|b| (b.0 as f64 / n) * (b.1 / b.0 as f64 - b.2 as f64 / b.0 as f64).abs())
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two nodes that made `k1` once each (node 0's wins) and `k2` once.
    fn healthy() -> (History, Vec<Option<NodeState>>) {
        let mut history = History::new(1);
        for (at, node, key, txn) in [(1, 0, "k1", "t1"), (2, 1, "k1", "t2"), (3, 1, "k2", "t3")] {
            history.attempted(at, node, key, true);
            history.answered(
                at,
                Answer {
                    op: at,
                    node,
                    key: key.into(),
                    txn: txn.into(),
                    replay: false,
                    confidence: 0.9,
                },
            );
        }
        history.compensated(1, Compensation::idempotency_key_for("t2"), "t2".into());
        let state = NodeState {
            keys: BTreeMap::from([
                (
                    "k1".into(),
                    vec![("t1".into(), Some(0)), ("t2".into(), Some(1))],
                ),
                ("k2".into(), vec![("t3".into(), Some(1))]),
            ]),
            conflicts: BTreeMap::from([("k1".into(), "t1".into())]),
            digests: BTreeMap::from([("d".into(), "x".into())]),
        };
        (history, vec![Some(state.clone()), Some(state)])
    }

    fn checks(history: History, nodes: &[Option<NodeState>]) -> Vec<&'static str> {
        let run = Run {
            converged_after_ms: Some(1),
            ..Run::default()
        };
        judge(history, nodes, run)
            .violations
            .iter()
            .map(|v| v.check)
            .collect()
    }

    #[test]
    fn a_healthy_end_state_passes() {
        let (history, nodes) = healthy();
        assert_eq!(checks(history, &nodes), Vec::<&str>::new());
    }

    #[test]
    fn each_broken_invariant_is_found() {
        let (history, mut nodes) = healthy();
        if let Some(n) = nodes[1].as_mut() {
            n.keys.remove("k2");
        }
        assert_eq!(checks(history, &nodes), ["lost"]);

        let (history, mut nodes) = healthy();
        if let Some(n) = nodes[1].as_mut() {
            n.conflicts.insert("k1".into(), "t2".into());
        }
        assert_eq!(checks(history, &nodes), ["conflict report"]);

        let (mut history, nodes) = healthy();
        history.compensated(0, Compensation::idempotency_key_for("t1"), "t1".into());
        assert_eq!(checks(history, &nodes), ["compensation"]);

        let (mut history, nodes) = healthy();
        history.compensated(0, Compensation::idempotency_key_for("t2"), "t2".into());
        assert_eq!(checks(history, &nodes), ["compensation"]);

        let (history, mut nodes) = healthy();
        if let Some(n) = nodes[0].as_mut() {
            n.digests.insert("d".into(), "y".into());
        }
        assert_eq!(checks(history, &nodes), ["documents"]);

        let (mut history, nodes) = healthy();
        history.answered(
            9,
            Answer {
                op: 9,
                node: 0,
                key: "k2".into(),
                txn: "t9".into(),
                replay: true,
                confidence: 1.0,
            },
        );
        assert_eq!(checks(history, &nodes), ["replay"]);

        // k1's t2 was acknowledged at 2: calling k1 settled with t1 alone
        // is fine before, wrong after.
        let (mut history, nodes) = healthy();
        history.settled_claim(1, 0, "k1", "t1".into());
        history.settled_claim(5, 2, "k2", "t3".into());
        assert_eq!(checks(history, &nodes), Vec::<&str>::new());
        let (mut history, nodes) = healthy();
        history.settled_claim(2, 0, "k1", "t1".into());
        assert_eq!(checks(history, &nodes), ["settled"]);
    }
}
