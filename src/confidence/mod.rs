//! Confidence of provisional allocations.
//!
//! An allocation is provisional until every peer has it; meanwhile another region may
//! allocate the same idempotency key (a retry that lands there before our allocation
//! does). This module estimates the probability that this does *not* happen, from how
//! stale this node's view of each peer is, from the cross-region retries, conflicts
//! and outages the node has observed, and from the [`Situation`] the allocation is made
//! in: customers fail over to another region exactly when theirs is cut off, so how
//! often that happens is learnt per situation, from every allocation once it has
//! settled or turned out a duplicate. [`calibration`] keeps the score of how well the
//! numbers held. The model, its prior and its limits are described in
//! `docs/CONFIDENCE.md`; everything here is pure (no clock, no I/O).

pub mod calibration;
mod curves;
mod delays;
pub mod learnt;
mod situation;

pub use situation::Situation;

use curves::{Curves, Tabulated};
use delays::Delays;
use learnt::{Learnt, LearntError, LearntSituation};
use serde::Serialize;
use std::time::Duration;

/// What the node knows about one peer when it makes an allocation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerView {
    /// `now - last time this node was in sync with the peer`; `Duration::ZERO` if in sync.
    pub staleness: Duration,
    /// Whether the peer is reachable now, so that a new allocation reaches it within the
    /// normal replication lag (otherwise it waits for the outage to end). A connected peer
    /// with a large staleness is one still catching up.
    pub connected: bool,
    /// How much longer than the normal replication lag (`sync_lag`) a connected peer is
    /// taking to show this node's recent allocations; `ZERO` while it keeps up. A peer
    /// that is slowed or stalled sees a new allocation late, so a retry there is
    /// likelier to land first.
    pub behind: Duration,
}

/// Tunables of the model; `Default` gives the documented prior (docs/CONFIDENCE.md).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ConfidenceParams {
    /// Mean replication lag between connected peers: how long a new allocation stays
    /// invisible to a peer that is in sync. Set it to the measured lag.
    pub sync_lag: Duration,
    /// Prior mean of cross-region attempts per local allocation (the retry rate `r`).
    pub prior_retry_rate: f64,
    /// Weight of that prior, in allocations (Gamma prior: `rate·weight` pseudo-attempts
    /// over `weight` pseudo-allocations).
    pub prior_retry_weight: f64,
    /// Lower end of the prior retry delay, spread log-uniformly up to `prior_delay_max`.
    pub prior_delay_min: Duration,
    /// Upper end of the prior retry delay.
    pub prior_delay_max: Duration,
    /// Weight of the prior delay distribution, in observed delays.
    pub prior_delay_weight: f64,
    /// Scale `c` of the Lomax (Pareto II) model of peer outage durations.
    pub outage_scale: Duration,
    /// Outages shorter than this are replication lag, not partitions, and are ignored.
    pub outage_min: Duration,
    /// Prior shape `κ` of the outage durations (smaller: longer tails).
    pub prior_outage_shape: f64,
    /// Weight of that prior, in observed outages.
    pub prior_outage_weight: f64,
    /// Prior failover rate while some peers are unreachable: the chance that an
    /// allocation made then is the failover of a cut-off region's customer, whose first
    /// attempt we cannot see.
    pub prior_partial_failover: f64,
    /// Prior failover rate while every peer is unreachable: the chance that a customer
    /// of this node, whose answer is slow or lost, also tries another region.
    pub prior_isolated_failover: f64,
    /// Weight of those priors, in resolved allocations whose failover window was whole.
    pub prior_failover_weight: f64,
    /// Lower end of the prior delay of a failover (a customer's attempt in another region
    /// after theirs was slow or unreachable), spread log-uniformly up to
    /// `prior_failover_delay_max`. Failover follows a client's timeout, so it comes much
    /// sooner than a person's retry.
    pub prior_failover_delay_min: Duration,
    /// Upper end of the prior failover delay.
    pub prior_failover_delay_max: Duration,
    /// Weight of the prior failover delays, in observed conflicts of the situation.
    pub prior_failover_delay_weight: f64,
    /// After this many allocations the observed retry counts and delays are halved, so the
    /// estimates follow changes in traffic; 0 keeps them forever.
    pub history_allocations: u64,
}

impl Default for ConfidenceParams {
    fn default() -> Self {
        Self {
            sync_lag: Duration::from_millis(250),
            prior_retry_rate: 0.05,
            prior_retry_weight: 50.0,
            prior_delay_min: Duration::from_secs(1),
            prior_delay_max: Duration::from_secs(300),
            prior_delay_weight: 5.0,
            outage_scale: Duration::from_secs(10),
            outage_min: Duration::from_secs(1),
            prior_outage_shape: 1.5,
            prior_outage_weight: 3.0,
            prior_partial_failover: 0.05,
            prior_isolated_failover: 0.2,
            prior_failover_weight: 20.0,
            prior_failover_delay_min: Duration::from_millis(50),
            prior_failover_delay_max: Duration::from_secs(30),
            prior_failover_delay_weight: 5.0,
            history_allocations: 1_000_000,
        }
    }
}

impl ConfidenceParams {
    /// The same parameters with every number made usable (finite, in range), so that a
    /// bad configuration can never produce NaN.
    fn sanitized(self) -> Self {
        let d = Self::default();
        let weight = |x: f64, fallback: f64| {
            if x.is_finite() && x >= 0.0 {
                x
            } else {
                fallback
            }
        };
        let min_delay = self.prior_delay_min.max(Duration::from_millis(1));
        let min_failover_delay = self.prior_failover_delay_min.max(Duration::from_millis(1));
        Self {
            sync_lag: self.sync_lag,
            prior_retry_rate: weight(self.prior_retry_rate, d.prior_retry_rate),
            prior_retry_weight: weight(self.prior_retry_weight, d.prior_retry_weight),
            prior_delay_min: min_delay,
            prior_delay_max: self.prior_delay_max.max(min_delay),
            prior_delay_weight: weight(self.prior_delay_weight, d.prior_delay_weight),
            outage_scale: self.outage_scale.max(Duration::from_millis(1)),
            outage_min: self.outage_min,
            prior_outage_shape: weight(self.prior_outage_shape, d.prior_outage_shape)
                .clamp(1e-3, 1e3),
            prior_outage_weight: weight(self.prior_outage_weight, d.prior_outage_weight),
            prior_partial_failover: weight(self.prior_partial_failover, d.prior_partial_failover)
                .min(1.0),
            prior_isolated_failover: weight(
                self.prior_isolated_failover,
                d.prior_isolated_failover,
            )
            .min(1.0),
            prior_failover_weight: weight(self.prior_failover_weight, d.prior_failover_weight),
            prior_failover_delay_min: min_failover_delay,
            prior_failover_delay_max: self.prior_failover_delay_max.max(min_failover_delay),
            prior_failover_delay_weight: weight(
                self.prior_failover_delay_weight,
                d.prior_failover_delay_weight,
            ),
            history_allocations: self.history_allocations,
        }
    }

    fn prior_failover(&self, situation: Situation) -> f64 {
        match situation {
            Situation::InSync => 0.0,
            Situation::Partial => self.prior_partial_failover,
            Situation::Isolated => self.prior_isolated_failover,
        }
    }
}

/// The model's answer for one new allocation.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Estimate {
    /// Probability (0..=1) that no other region allocates the same key concurrently.
    pub confidence: f64,
    /// The situation the allocation is made in.
    pub situation: Situation,
    /// The confidence from independent cross-region retries alone, before failover.
    pub calm_confidence: f64,
    /// The chance that a failover in this situation would conflict (lands before the
    /// peers can see the other attempt). Handed back with the allocation's resolution
    /// ([`ConfidenceModel::observe_resolved`]), so the failover rate is learnt against
    /// what the model expected.
    pub failover_window: f64,
}

/// Snapshot of the model's estimates, for `/v1/health` and metrics.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ConfidenceSummary {
    /// Local allocations in the model's memory (halved every `history_allocations`).
    pub allocations: f64,
    /// Cross-region replays (near misses) in memory.
    pub cross_region_replays: f64,
    /// Conflicts of allocations made in sync, in memory (each counts as half a
    /// cross-region attempt, see the docs).
    pub conflicts: f64,
    /// Estimated cross-region attempts per allocation (`r`, prior included).
    pub retry_rate: f64,
    /// Median delay of a cross-region attempt after the first allocation, in seconds.
    pub retry_delay_p50_secs: f64,
    /// 90th percentile of that delay, in seconds.
    pub retry_delay_p90_secs: f64,
    /// 99th percentile of that delay, in seconds.
    pub retry_delay_p99_secs: f64,
    /// Peer outages observed (longer than `outage_min`).
    pub outages: f64,
    /// Estimated Lomax shape `κ` of outage durations (prior included).
    pub outage_shape: f64,
    /// Median outage duration under the estimated model, in seconds.
    pub outage_median_secs: f64,
    /// What has been learnt per situation.
    pub situations: Vec<SituationSummary>,
}

/// What the model has learnt about one situation.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SituationSummary {
    /// The situation.
    pub situation: Situation,
    /// The chance that an allocation made in it meets a failover attempt
    /// (prior included; 0 in sync).
    pub failover_rate: f64,
    /// This node's allocations made in it that have since settled or conflicted.
    pub resolved: f64,
    /// Of those, the ones that conflicted.
    pub conflicted: f64,
    /// Median delay of the conflicting attempts on them, in seconds (0 before any).
    pub retry_delay_p50_secs: f64,
}

/// What is learnt about one situation, and its tabulated risk terms.
#[derive(Debug, Clone)]
struct SituationStats {
    /// Delays of conflicting attempts on allocations made in it: the shape
    /// in time of its failover, beside the prior's.
    delays: Delays,
    /// Resolved allocations and those that conflicted.
    resolved: f64,
    conflicted: f64,
    /// Conflicts independent retries alone would have caused: Σ (1 − calm confidence).
    calm_conflicts: f64,
    /// Σ calm confidence × failover window: the conflicts a failover rate of 1 adds.
    failover_exposure: f64,
    /// The failover window by staleness, from the prior failover delays and
    /// `delays`, tabulated (unused in sync).
    window: Tabulated,
}

/// Online estimator of cross-region retry behaviour and peer outages, fed by the node;
/// answers the confidence of a provisional allocation. Memory is fixed; updates are
/// O(1), a query is O(peers) (and rebuilds a small table when the estimates have moved).
#[derive(Debug, Clone)]
pub struct ConfidenceModel {
    params: ConfidenceParams,
    /// Prior pseudo-counts per delay bucket (sum = `prior_delay_weight`).
    prior_delays: Delays,
    /// Observed delays of cross-region attempts: replays, and conflicts of
    /// allocations made in sync.
    delays: Delays,
    allocations: f64,
    replays: f64,
    conflicts: f64,
    /// Outages observed, and the sum of `ln((c + d) / (c + m))` over them.
    outages: f64,
    outage_log_sum: f64,
    since_halving: u64,
    situations: [SituationStats; 3],
    /// Prior pseudo-counts of failover delays (sum = `prior_failover_delay_weight`).
    prior_failover_delays: Delays,
    /// The risk terms of independent retries by staleness, tabulated.
    curves: Tabulated,
}

impl ConfidenceModel {
    /// A model that knows nothing yet but its prior.
    pub fn new(params: ConfidenceParams) -> Self {
        let params = params.sanitized();
        let prior_delays = Delays::log_uniform(
            params.prior_delay_min.as_secs_f64(),
            params.prior_delay_max.as_secs_f64(),
            params.prior_delay_weight,
        );
        let prior_failover_delays = Delays::log_uniform(
            params.prior_failover_delay_min.as_secs_f64(),
            params.prior_failover_delay_max.as_secs_f64(),
            params.prior_failover_delay_weight,
        );
        Self {
            params,
            prior_delays,
            delays: Delays::default(),
            allocations: 0.0,
            replays: 0.0,
            conflicts: 0.0,
            outages: 0.0,
            outage_log_sum: 0.0,
            since_halving: 0,
            situations: Situation::ALL.map(|_| SituationStats {
                delays: Delays::default(),
                resolved: 0.0,
                conflicted: 0.0,
                calm_conflicts: 0.0,
                failover_exposure: 0.0,
                window: Tabulated::unbuilt(),
            }),
            prior_failover_delays,
            curves: Tabulated::unbuilt(),
        }
    }

    /// What the model has learnt, to be saved and given to
    /// [`ConfidenceModel::resume`] after a restart.
    pub fn learnt(&self) -> Learnt {
        Learnt {
            v: learnt::LEARNT_VERSION,
            allocations: self.allocations,
            replays: self.replays,
            conflicts: self.conflicts,
            delays: self.delays.0.to_vec(),
            outages: self.outages,
            outage_log_sum: self.outage_log_sum,
            since_halving: self.since_halving,
            situations: self
                .situations
                .iter()
                .map(|s| LearntSituation {
                    delays: s.delays.0.to_vec(),
                    resolved: s.resolved,
                    conflicted: s.conflicted,
                    calm_conflicts: s.calm_conflicts,
                    failover_exposure: s.failover_exposure,
                })
                .collect(),
        }
    }

    /// A model with `params` that goes on from what `learnt` holds; refused
    /// as a whole if any of it is not what a model could have written.
    pub fn resume(params: ConfidenceParams, learnt: &Learnt) -> Result<Self, LearntError> {
        learnt.check_shape()?;
        let mut model = Self::new(params);
        model.allocations = learnt::count(learnt.allocations, "allocations")?;
        model.replays = learnt::count(learnt.replays, "replays")?;
        model.conflicts = learnt::count(learnt.conflicts, "conflicts")?;
        model.delays = learnt::histogram(&learnt.delays, "delays")?;
        model.outages = learnt::count(learnt.outages, "outages")?;
        model.outage_log_sum = learnt::count(learnt.outage_log_sum, "outage_log_sum")?;
        model.since_halving = learnt.since_halving;
        for (s, l) in model.situations.iter_mut().zip(&learnt.situations) {
            s.delays = learnt::histogram(&l.delays, "situation delays")?;
            s.resolved = learnt::count(l.resolved, "resolved")?;
            s.conflicted = learnt::count(l.conflicted, "conflicted")?;
            s.calm_conflicts = learnt::count(l.calm_conflicts, "calm_conflicts")?;
            s.failover_exposure = learnt::count(l.failover_exposure, "failover_exposure")?;
        }
        Ok(model)
    }

    /// A new local allocation was made (denominator of the retry rate).
    pub fn observe_allocation(&mut self) {
        self.allocations += 1.0;
        self.since_halving += 1;
        let window = self.params.history_allocations;
        if window > 0 && self.since_halving >= window {
            self.since_halving = 0;
            self.allocations /= 2.0;
            self.replays /= 2.0;
            self.conflicts /= 2.0;
            self.delays.halve();
            for s in &mut self.situations {
                s.delays.halve();
                s.resolved /= 2.0;
                s.conflicted /= 2.0;
                s.calm_conflicts /= 2.0;
                s.failover_exposure /= 2.0;
                s.window.moved(1.0);
            }
            self.curves.moved(1.0);
        }
    }

    /// A request for a key already held by another region arrived here (a near miss);
    /// `delay` = time since that region allocated it. Report the first such request for a
    /// key only: repeats cannot conflict any more and would make the model conservative.
    pub fn observe_cross_region_replay(&mut self, delay: Duration) {
        self.replays += 1.0;
        self.delays.add(delay.as_secs_f64(), 1.0);
        self.curves.moved(1.0);
    }

    /// A conflict was detected on an allocation of this node made in `situation`;
    /// `delay` = time between the two competing allocations (|hlc difference|). Call it
    /// once per such allocation. A conflict of an allocation made in sync is a
    /// cross-region attempt like a replay; both nodes of a conflict report it, so it
    /// counts as half a one here. A conflict of one made during a partition tells only
    /// about that situation (the shape in time of its failover): in-sync confidence is
    /// not lowered by partition-time failover.
    pub fn observe_conflict(&mut self, delay: Duration, situation: Situation) {
        let secs = delay.as_secs_f64();
        if situation == Situation::InSync {
            self.conflicts += 1.0;
            self.delays.add(secs, 0.5);
            self.curves.moved(0.5);
        } else {
            let s = &mut self.situations[situation.index()];
            s.delays.add(secs, 1.0);
            s.window.moved(1.0);
        }
    }

    /// An allocation of this node, given `estimate` when it was made, is resolved: it
    /// settled (`conflicted` false) or a competing allocation turned up. This is how the
    /// failover rate of its situation is learnt; call it once per allocation.
    pub fn observe_resolved(&mut self, estimate: &Estimate, conflicted: bool) {
        let (calm, window) = (estimate.calm_confidence, estimate.failover_window);
        if !(calm.is_finite() && window.is_finite()) {
            return;
        }
        let (calm, window) = (calm.clamp(0.0, 1.0), window.clamp(0.0, 1.0));
        let s = &mut self.situations[estimate.situation.index()];
        s.resolved += 1.0;
        s.conflicted += f64::from(u8::from(conflicted));
        s.calm_conflicts += 1.0 - calm;
        s.failover_exposure += calm * window;
    }

    /// A peer that had been out of sync is in sync again; `outage` = its staleness just
    /// before it caught up. Outages shorter than `outage_min` are ignored.
    pub fn observe_peer_resync(&mut self, outage: Duration) {
        if outage < self.params.outage_min {
            return;
        }
        let c = self.params.outage_scale.as_secs_f64();
        let m = self.params.outage_min.as_secs_f64();
        self.outages += 1.0;
        self.outage_log_sum += ((c + outage.as_secs_f64()) / (c + m)).ln();
        self.curves.moved(1.0);
        for s in &mut self.situations {
            s.window.moved(1.0);
        }
    }

    /// The confidence of a new allocation, with the situation it is made in.
    /// Empty peers slice (single node) → 1.0.
    pub fn estimate(&mut self, peers: &[PeerView]) -> Estimate {
        let situation = Situation::of(peers);
        if peers.is_empty() {
            return Estimate {
                confidence: 1.0,
                situation,
                calm_confidence: 1.0,
                failover_window: 0.0,
            };
        }
        let share = 1.0 / peers.len() as f64;
        self.refresh_curves(situation);
        let calm_terms = self.curves.curves();
        let failover_terms = self.situations[situation.index()].window.curves();
        let (mut exposure, mut window) = (0.0, 0.0);
        for p in peers {
            let age = p.staleness.as_secs_f64();
            let behind = p.behind.as_secs_f64();
            let (backward, forward) = calm_terms.peer_terms(age, behind, p.connected);
            exposure += share * (backward + forward);
            window += share
                * match situation {
                    // Our customer's failover reaches a peer that cannot see ours.
                    Situation::Isolated => failover_terms.forward(age, behind, p.connected),
                    // A cut-off peer's customer fails over here; we cannot see theirs.
                    Situation::Partial if !p.connected => failover_terms.backward(age),
                    _ => 0.0,
                };
        }
        let calm = probability((-self.retry_rate() * exposure).exp());
        let window = probability(window);
        Estimate {
            confidence: probability(calm * (1.0 - self.failover_rate(situation) * window)),
            situation,
            calm_confidence: calm,
            failover_window: window,
        }
    }

    /// [`ConfidenceModel::estimate`]'s confidence alone.
    pub fn confidence(&mut self, peers: &[PeerView]) -> f64 {
        self.estimate(peers).confidence
    }

    /// Snapshot of the estimates for `/v1/health` and metrics.
    pub fn summary(&self) -> ConfidenceSummary {
        let delays = self.distribution();
        let shape = self.outage_shape();
        let c = self.params.outage_scale.as_secs_f64();
        let m = self.params.outage_min.as_secs_f64();
        ConfidenceSummary {
            allocations: self.allocations,
            cross_region_replays: self.replays,
            conflicts: self.conflicts,
            retry_rate: self.retry_rate(),
            retry_delay_p50_secs: delays.quantile(0.5),
            retry_delay_p90_secs: delays.quantile(0.9),
            retry_delay_p99_secs: delays.quantile(0.99),
            outages: self.outages,
            outage_shape: shape,
            outage_median_secs: finite_or(m + (c + m) * (2f64.powf(1.0 / shape) - 1.0), f64::MAX),
            situations: Situation::ALL
                .iter()
                .map(|&situation| {
                    let s = &self.situations[situation.index()];
                    SituationSummary {
                        situation,
                        failover_rate: self.failover_rate(situation),
                        resolved: s.resolved,
                        conflicted: s.conflicted,
                        retry_delay_p50_secs: Delays::normalised(&[&s.delays]).quantile(0.5),
                    }
                })
                .collect(),
        }
    }

    /// Posterior mean of cross-region attempts per allocation (Gamma prior, Poisson counts).
    fn retry_rate(&self) -> f64 {
        let p = &self.params;
        let attempts =
            p.prior_retry_rate * p.prior_retry_weight + self.replays + 0.5 * self.conflicts;
        let allocations = p.prior_retry_weight + self.allocations;
        if allocations > 0.0 {
            finite_or(attempts / allocations, p.prior_retry_rate)
        } else {
            p.prior_retry_rate
        }
    }

    /// The chance that an allocation made in `situation` meets a failover attempt: 0
    /// in sync; otherwise the prior, moved by what resolved allocations showed. An
    /// allocation given calm confidence `b` and failover window `w` conflicts with
    /// probability `1 − b·(1 − q·w)`, which is linear in the rate `q`: so the conflicts
    /// beyond those independent retries explain (`K − Σ(1 − b)`), over the conflicts a
    /// rate of 1 would add (`Σ b·w`), estimate it without bias, and the prior counts as
    /// `prior_failover_weight` of the latter at its own rate.
    pub fn failover_rate(&self, situation: Situation) -> f64 {
        let prior = self.params.prior_failover(situation);
        if situation == Situation::InSync {
            return prior;
        }
        let s = &self.situations[situation.index()];
        let weight = self.params.prior_failover_weight;
        let rate =
            (weight * prior + s.conflicted - s.calm_conflicts) / (weight + s.failover_exposure);
        finite_or(rate, prior).clamp(0.0, 1.0)
    }

    /// Posterior mean of the Lomax shape (Gamma prior; `ln((c+d)/(c+m))` is exponential).
    fn outage_shape(&self) -> f64 {
        let p = &self.params;
        let n = p.prior_outage_weight + self.outages;
        let sum = p.prior_outage_weight / p.prior_outage_shape + self.outage_log_sum;
        if n > 0.0 && sum > 0.0 {
            finite_or(n / sum, p.prior_outage_shape).clamp(1e-3, 1e3)
        } else {
            p.prior_outage_shape
        }
    }

    /// Retry delays as the risk terms use them: the prior, replays, and
    /// conflicts of allocations made in sync.
    fn distribution(&self) -> delays::Distribution {
        Delays::normalised(&[&self.prior_delays, &self.delays])
    }

    /// Failover delays of `situation` as its window uses them: the prior and
    /// the delays of the conflicts its allocations met.
    fn failover_distribution(&self, situation: Situation) -> delays::Distribution {
        Delays::normalised(&[
            &self.prior_failover_delays,
            &self.situations[situation.index()].delays,
        ])
    }

    /// Rebuilds the tabulated terms of independent retries, and the failover
    /// window of `situation`, where the observations since their last build
    /// reach 1 % of everything they rest on.
    fn refresh_curves(&mut self, situation: Situation) {
        let outages = self.params.prior_outage_weight + self.outages;
        let basis = self.prior_delays.total() + self.delays.total() + outages;
        if self.curves.stale(basis) {
            let built = self.build_curves(&self.distribution());
            self.curves.rebuilt(built);
        }
        if situation == Situation::InSync {
            return;
        }
        let s = &self.situations[situation.index()];
        if s.window
            .stale(self.prior_failover_delays.total() + s.delays.total() + outages)
        {
            let built = self.build_curves(&self.failover_distribution(situation));
            self.situations[situation.index()].window.rebuilt(built);
        }
    }

    fn build_curves(&self, delays: &delays::Distribution) -> Curves {
        Curves::build(
            delays,
            self.params.sync_lag.as_secs_f64(),
            self.params.outage_scale.as_secs_f64(),
            self.outage_shape(),
        )
    }
}

/// `x` as a probability: clamped to [0, 1], and 0 if not a number.
fn probability(x: f64) -> f64 {
    if x.is_finite() {
        x.clamp(0.0, 1.0)
    } else {
        0.0
    }
}

/// `x` if finite, else `fallback`.
fn finite_or(x: f64, fallback: f64) -> f64 {
    if x.is_finite() {
        x
    } else {
        fallback
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn secs(s: f64) -> Duration {
        Duration::from_secs_f64(s)
    }

    fn in_sync(n: usize) -> Vec<PeerView> {
        vec![
            PeerView {
                staleness: Duration::ZERO,
                connected: true,
                behind: Duration::ZERO,
            };
            n
        ]
    }

    /// Three peers, the first one unreachable for `age` seconds.
    fn one_stale(age: f64) -> Vec<PeerView> {
        let mut peers = in_sync(3);
        peers[0] = PeerView {
            staleness: secs(age),
            connected: false,
            behind: Duration::ZERO,
        };
        peers
    }

    /// A model that saw `allocations` allocations and `replays` replays 2..60 s late.
    fn with_history(allocations: u32, replays: u32) -> ConfidenceModel {
        let mut model = ConfidenceModel::new(ConfidenceParams::default());
        (0..allocations).for_each(|_| model.observe_allocation());
        (0..replays).for_each(|i| model.observe_cross_region_replay(secs(2.0 + f64::from(i % 59))));
        model
    }

    #[test]
    fn in_sync_without_conflicts_is_one() {
        let mut fresh = ConfidenceModel::new(ConfidenceParams::default());
        assert_eq!(fresh.confidence(&in_sync(3)), 1.0);
        assert_eq!(fresh.confidence(&[]), 1.0);
        assert_eq!(with_history(10_000, 3_000).confidence(&in_sync(4)), 1.0);
        // Below the normal replication lag counts as in sync too.
        let lagging = vec![
            PeerView {
                staleness: secs(0.2),
                connected: true,
                behind: Duration::ZERO,
            };
            2
        ];
        assert!(fresh.confidence(&lagging) >= 0.999);
    }

    #[test]
    fn fresh_node_with_unreachable_peer_is_unsure() {
        let mut fresh = ConfidenceModel::new(ConfidenceParams::default());
        let alone = [PeerView {
            staleness: secs(30.0),
            connected: false,
            behind: Duration::ZERO,
        }];
        let c = fresh.confidence(&alone);
        assert!(c < 0.97, "{c}");
        assert!(fresh.confidence(&one_stale(30.0)) < 0.99);
    }

    #[test]
    fn falls_as_staleness_grows() {
        let mut model = with_history(5_000, 500);
        let ages = [
            0.0, 0.5, 1.0, 3.0, 10.0, 30.0, 120.0, 600.0, 3600.0, 86_400.0,
        ];
        let values: Vec<f64> = ages
            .iter()
            .map(|&a| model.confidence(&one_stale(a)))
            .collect();
        assert!(values.windows(2).all(|w| w[1] <= w[0]), "{values:?}");
        assert!(values[9] < values[3] - 0.01, "{values:?}");
        // A peer still connected but catching up is less of a risk than an unreachable one.
        let catching_up = [PeerView {
            staleness: secs(30.0),
            connected: true,
            behind: Duration::ZERO,
        }];
        let unreachable = [PeerView {
            staleness: secs(30.0),
            connected: false,
            behind: Duration::ZERO,
        }];
        assert!(model.confidence(&catching_up) > model.confidence(&unreachable));
    }

    #[test]
    fn falls_faster_with_more_cross_region_retries() {
        let mut calm = with_history(10_000, 100);
        let mut busy = with_history(10_000, 3_000);
        for age in [5.0, 30.0, 300.0] {
            let (c, b) = (
                calm.confidence(&one_stale(age)),
                busy.confidence(&one_stale(age)),
            );
            assert!(b < c, "age {age}: busy {b} calm {c}");
        }
        assert!(busy.summary().retry_rate > calm.summary().retry_rate);
    }

    #[test]
    fn conflicts_within_the_lag_lower_in_sync_confidence() {
        let mut model = with_history(1_000, 0);
        (0..50).for_each(|_| model.observe_conflict(secs(0.05), Situation::InSync));
        let c = model.confidence(&in_sync(3));
        assert!(c < 1.0 && c > 0.9, "{c}");
    }

    #[test]
    fn a_peer_slow_to_show_our_allocations_lowers_confidence() {
        let mut model = with_history(5_000, 500);
        let mut slow = in_sync(2);
        let keeping_up = model.confidence(&slow);
        slow[0].behind = secs(3.0);
        let behind = model.confidence(&slow);
        slow[0].behind = secs(30.0);
        let stalled = model.confidence(&slow);
        assert!(
            keeping_up > behind && behind > stalled,
            "{keeping_up} {behind} {stalled}"
        );
        // Behind counts only while connected: unreachable is judged by the outage.
        let mut cut = one_stale(10.0);
        let before = model.confidence(&cut);
        cut[0].behind = secs(30.0);
        assert_eq!(model.confidence(&cut), before);
    }

    #[test]
    fn what_was_learnt_survives_a_restart() {
        let mut model = with_history(3_000, 200);
        partition(&mut model, 100, 0.3);
        model.observe_peer_resync(secs(40.0));
        let saved = serde_json::to_string(&model.learnt()).unwrap();
        let learnt: Learnt = serde_json::from_str(&saved).unwrap();
        let mut resumed = ConfidenceModel::resume(ConfidenceParams::default(), &learnt).unwrap();
        assert_eq!(resumed.summary(), model.summary());
        // The same estimates; the tables differ only by what the original
        // had not rebuilt yet (under 1 % of what they rest on).
        for peers in [in_sync(2), one_stale(12.0), isolated(2, 5.0)] {
            let (r, m) = (resumed.confidence(&peers), model.confidence(&peers));
            assert!((r - m).abs() < 0.005, "{r} {m}");
        }
        // A fresh model would judge the next partition by the prior again.
        let mut fresh = ConfidenceModel::new(ConfidenceParams::default());
        assert!(fresh.confidence(&isolated(2, 5.0)) > resumed.confidence(&isolated(2, 5.0)) + 0.05);
    }

    #[test]
    fn a_damaged_learnt_state_is_refused() {
        let good = with_history(1_000, 50).learnt();
        let mut bad = vec![];
        let mut b = good.clone();
        b.v = 7;
        bad.push(b);
        let mut b = good.clone();
        b.replays = f64::NAN;
        bad.push(b);
        let mut b = good.clone();
        b.delays[3] = -1.0;
        bad.push(b);
        let mut b = good.clone();
        b.delays.pop();
        bad.push(b);
        let mut b = good.clone();
        b.situations.pop();
        bad.push(b);
        let mut b = good.clone();
        b.situations[2].failover_exposure = f64::INFINITY;
        bad.push(b);
        for b in bad {
            assert!(
                ConfidenceModel::resume(ConfidenceParams::default(), &b).is_err(),
                "{b:?}"
            );
        }
        assert!(ConfidenceModel::resume(ConfidenceParams::default(), &good).is_ok());
        assert!(serde_json::from_str::<Learnt>(r#"{"v":1,"extra":2}"#).is_err());
    }

    #[test]
    fn learns_outage_length() {
        let mut short = with_history(1_000, 100);
        let mut long = short.clone();
        (0..100).for_each(|_| short.observe_peer_resync(secs(3.0)));
        (0..100).for_each(|_| long.observe_peer_resync(secs(3_000.0)));
        assert!(short.summary().outage_median_secs < long.summary().outage_median_secs);
        assert!(short.confidence(&one_stale(2.0)) > long.confidence(&one_stale(2.0)));
    }

    #[test]
    fn history_is_halved() {
        let params = ConfidenceParams {
            history_allocations: 100,
            ..ConfidenceParams::default()
        };
        let mut model = ConfidenceModel::new(params);
        (0..99).for_each(|_| model.observe_allocation());
        model.observe_cross_region_replay(secs(5.0));
        model.observe_allocation();
        let s = model.summary();
        assert_eq!((s.allocations, s.cross_region_replays), (50.0, 0.5));
    }

    #[test]
    fn summary_is_sane_and_serialises() {
        let s = with_history(1_000, 200).summary();
        assert!(s.retry_delay_p50_secs <= s.retry_delay_p90_secs);
        assert!(s.retry_delay_p90_secs <= s.retry_delay_p99_secs);
        assert!(s.retry_rate > 0.0 && s.retry_rate < 1.0);
        assert!(serde_json::to_string(&s).is_ok());
    }

    /// Every peer unreachable for `age` seconds.
    fn isolated(peers: usize, age: f64) -> Vec<PeerView> {
        vec![
            PeerView {
                staleness: secs(age),
                connected: false,
                behind: Duration::ZERO,
            };
            peers
        ]
    }

    /// Plays one partition on `model`: `n` allocations while isolated for
    /// 1..15 s, of which a share `failover` later turn out duplicates (their
    /// customers retried in another region); returns the mean confidence
    /// the allocations were given.
    fn partition(model: &mut ConfidenceModel, n: usize, failover: f64) -> f64 {
        let mut given = Vec::new();
        for i in 0..n {
            let age = 1.0 + 14.0 * i as f64 / n as f64;
            let e = model.estimate(&isolated(2, age));
            assert_eq!(e.situation, Situation::Isolated);
            model.observe_allocation();
            given.push(e);
        }
        // The heal: each allocation settles or meets its competitor.
        for (i, e) in given.iter().enumerate() {
            let conflicted = (i as f64 + 0.5) / n as f64 <= failover;
            if conflicted {
                model.observe_conflict(secs(3.0), e.situation);
            }
            model.observe_resolved(e, conflicted);
        }
        given.iter().map(|e| e.confidence).sum::<f64>() / n as f64
    }

    #[test]
    fn a_second_partition_with_the_same_failover_is_judged_by_the_first() {
        let mut model = with_history(5_000, 250);
        let first = partition(&mut model, 200, 0.3);
        let second = partition(&mut model, 200, 0.3);
        let third = partition(&mut model, 200, 0.3);
        assert!(second < first - 0.05, "first {first}, second {second}");
        // Learnt: the share without conflict (0.7) is what it now says.
        assert!((second - 0.7).abs() < 0.06, "second {second}");
        assert!((third - 0.7).abs() < 0.04, "third {third}");
        let s = &model.summary().situations[Situation::Isolated.index()];
        assert_eq!((s.resolved, s.conflicted), (600.0, 180.0));
    }

    #[test]
    fn partitions_without_failover_raise_confidence_again() {
        let mut model = with_history(5_000, 250);
        let first = partition(&mut model, 200, 0.0);
        let second = partition(&mut model, 200, 0.0);
        assert!(second > first + 0.05, "first {first}, second {second}");
    }

    #[test]
    fn partition_time_conflicts_leave_in_sync_confidence_alone() {
        let mut model = with_history(5_000, 250);
        // Some retries faster than the lag, so that in-sync confidence is below 1.
        (0..20).for_each(|_| model.observe_conflict(secs(0.05), Situation::InSync));
        let partial = |age| {
            let mut peers = in_sync(2);
            peers[0] = PeerView {
                staleness: secs(age),
                connected: false,
                behind: Duration::ZERO,
            };
            peers
        };
        let before_in_sync = model.confidence(&in_sync(2));
        let before_partial = model.confidence(&partial(10.0));
        assert!(before_in_sync < 1.0);
        for _ in 0..300 {
            let e = model.estimate(&partial(10.0));
            model.observe_allocation();
            model.observe_conflict(secs(0.1), e.situation);
            model.observe_resolved(&e, true);
        }
        // observe_allocation alone moves r a little; nothing else touched it.
        let mut untouched = with_history(5_300, 250);
        (0..20).for_each(|_| untouched.observe_conflict(secs(0.05), Situation::InSync));
        assert_eq!(
            model.confidence(&in_sync(2)),
            untouched.confidence(&in_sync(2))
        );
        assert!(model.confidence(&in_sync(2)) >= before_in_sync - 1e-9);
        assert!(model.confidence(&partial(10.0)) < before_partial - 0.1);
        assert!(model.failover_rate(Situation::Partial) > 0.5);
        assert_eq!(model.failover_rate(Situation::InSync), 0.0);
    }

    #[test]
    fn the_prior_expects_failover_while_cut_off() {
        let mut fresh = ConfidenceModel::new(ConfidenceParams::default());
        let alone = fresh.confidence(&isolated(2, 10.0));
        let mut without_prior = ConfidenceModel::new(ConfidenceParams {
            prior_isolated_failover: 0.0,
            ..ConfidenceParams::default()
        });
        let calm = without_prior.confidence(&isolated(2, 10.0));
        assert!(alone < calm - 0.05, "isolated {alone}, as if calm {calm}");
        assert!((0.7..0.95).contains(&alone), "{alone}");
    }

    #[test]
    fn a_query_with_many_peers_matches_the_exact_terms() {
        // Tabulated terms against the formula of docs/CONFIDENCE.md, evaluated directly.
        let mut model = with_history(2_000, 300);
        let peers: Vec<PeerView> = (0..50)
            .map(|i| PeerView {
                staleness: secs(f64::from(i) * 7.3),
                connected: i % 3 != 0,
                behind: Duration::ZERO,
            })
            .collect();
        let e = model.estimate(&peers);
        let d = model.distribution();
        let f = model.failover_distribution(Situation::Partial);
        let lag = model.params.sync_lag.as_secs_f64();
        let shape = model.outage_shape();
        let (mut exposure, mut window) = (0.0, 0.0);
        for p in &peers {
            let age = p.staleness.as_secs_f64();
            let forward = if p.connected {
                d.cdf(lag)
            } else {
                d.before_heal(age, lag, 10.0, shape)
            };
            exposure += (d.cdf(age + lag) + forward) / 50.0;
            if !p.connected {
                window += f.cdf(age + lag) / 50.0;
            }
        }
        let calm = (-model.retry_rate() * exposure).exp();
        let expected = calm * (1.0 - model.failover_rate(Situation::Partial) * window);
        assert!(
            (e.confidence - expected).abs() < 0.005,
            "{} vs {expected}",
            e.confidence
        );
    }

    fn duration() -> impl Strategy<Value = Duration> {
        prop_oneof![
            Just(Duration::ZERO),
            Just(Duration::MAX),
            (0u64..1_000_000_000_000).prop_map(Duration::from_nanos),
            any::<u64>().prop_map(Duration::from_secs),
        ]
    }

    fn number() -> impl Strategy<Value = f64> {
        prop_oneof![proptest::num::f64::ANY, 0.0..10.0]
    }

    proptest! {
        #[test]
        fn always_a_probability(
            weights in proptest::collection::vec(number(), 8),
            (lag, scale, delay_min, delay_max) in (duration(), duration(), duration(), duration()),
            events in proptest::collection::vec((0u8..5, duration()), 0..200),
            peers in proptest::collection::vec((duration(), any::<bool>(), duration()), 0..6),
            history in 0u64..50,
        ) {
            let params = ConfidenceParams {
                sync_lag: lag,
                prior_retry_rate: weights[0],
                prior_retry_weight: weights[1],
                prior_delay_weight: weights[2],
                prior_outage_shape: weights[3],
                prior_outage_weight: weights[4],
                prior_partial_failover: weights[5],
                prior_isolated_failover: weights[6],
                prior_failover_weight: weights[7],
                outage_scale: scale,
                prior_delay_min: delay_min,
                prior_delay_max: delay_max,
                history_allocations: history,
                ..ConfidenceParams::default()
            };
            let mut model = ConfidenceModel::new(params);
            for (kind, d) in events {
                match kind {
                    0 => model.observe_allocation(),
                    1 => model.observe_cross_region_replay(d),
                    2 => model.observe_conflict(d, Situation::ALL[d.subsec_nanos() as usize % 3]),
                    3 => {
                        let e = model.estimate(&[PeerView { staleness: d, connected: d.as_secs() % 3 == 0, behind: d / 3 }]);
                        model.observe_resolved(&e, d.as_secs() % 2 == 0)
                    }
                    _ => model.observe_peer_resync(d),
                }
            }
            let views: Vec<PeerView> =
                peers.into_iter().map(|(staleness, connected, behind)| PeerView { staleness, connected, behind }).collect();
            let e = model.estimate(&views);
            prop_assert!((0.0..=1.0).contains(&e.confidence), "{:?}", e);
            prop_assert!((0.0..=1.0).contains(&e.calm_confidence), "{:?}", e);
            prop_assert!((0.0..=1.0).contains(&e.failover_window), "{:?}", e);
            let s = model.summary();
            prop_assert!(s.retry_rate.is_finite() && s.outage_shape.is_finite());
            prop_assert!(s.retry_delay_p99_secs.is_finite() && s.outage_median_secs.is_finite());
            prop_assert!(s.situations.iter().all(|s| (0.0..=1.0).contains(&s.failover_rate)));
        }
    }
}
