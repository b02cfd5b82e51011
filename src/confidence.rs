//! Confidence of provisional allocations.
//!
//! An allocation is provisional until every peer has it; meanwhile another region may
//! allocate the same idempotency key (a retry that lands there before our allocation
//! does). This module estimates the probability that this does *not* happen, from how
//! stale this node's view of each peer is and from the cross-region retries, conflicts
//! and outages the node has observed. The model, its prior and its limits are described
//! in `docs/CONFIDENCE.md`; everything here is pure (no clock, no I/O).

use serde::Serialize;
use std::time::Duration;

/// Number of retry-delay buckets: `[0, 10 ms)`, then edges growing by √2 up to ~23 h, then
/// one overflow bucket.
const BUCKETS: usize = 48;
/// Upper edge of the first bucket, in seconds.
const FIRST_EDGE_SECS: f64 = 0.01;

/// What the node knows about one peer when it makes an allocation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerView {
    /// `now - last time this node was in sync with the peer`; `Duration::ZERO` if in sync.
    pub staleness: Duration,
    /// Whether the peer is reachable now, so that a new allocation reaches it within the
    /// normal replication lag (otherwise it waits for the outage to end). A connected peer
    /// with a large staleness is one still catching up.
    pub connected: bool,
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
    /// After this many allocations the observed retry counts and delays are halved, so the
    /// estimates follow changes in traffic; 0 keeps them forever.
    pub history_allocations: u64,
}

impl Default for ConfidenceParams {
    fn default() -> Self {
        Self {
            sync_lag: Duration::from_millis(250),
            prior_retry_rate: 0.05,
            prior_retry_weight: 200.0,
            prior_delay_min: Duration::from_secs(1),
            prior_delay_max: Duration::from_secs(300),
            prior_delay_weight: 10.0,
            outage_scale: Duration::from_secs(10),
            outage_min: Duration::from_secs(1),
            prior_outage_shape: 1.5,
            prior_outage_weight: 3.0,
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
            history_allocations: self.history_allocations,
        }
    }
}

/// Snapshot of the model's estimates, for `/v1/health` and metrics.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ConfidenceSummary {
    /// Local allocations in the model's memory (halved every `history_allocations`).
    pub allocations: f64,
    /// Cross-region replays (near misses) in memory.
    pub cross_region_replays: f64,
    /// Conflicts in memory (each counts as half a cross-region attempt, see the docs).
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
}

/// Online estimator of cross-region retry behaviour and peer outages, fed by the node;
/// answers the confidence of a provisional allocation. Memory is fixed; updates are O(1)
/// (amortised), a query is O(peers × buckets).
#[derive(Debug, Clone)]
pub struct ConfidenceModel {
    params: ConfidenceParams,
    /// Prior pseudo-counts per delay bucket (sum = `prior_delay_weight`).
    prior_delays: [f64; BUCKETS],
    /// Observed delays of cross-region attempts per bucket.
    delays: [f64; BUCKETS],
    allocations: f64,
    replays: f64,
    conflicts: f64,
    /// Outages observed, and the sum of `ln((c + d) / (c + m))` over them.
    outages: f64,
    outage_log_sum: f64,
    since_halving: u64,
}

impl ConfidenceModel {
    /// A model that knows nothing yet but its prior.
    pub fn new(params: ConfidenceParams) -> Self {
        let params = params.sanitized();
        let lo = params.prior_delay_min.as_secs_f64();
        let hi = params.prior_delay_max.as_secs_f64();
        let mut prior_delays = [0.0; BUCKETS];
        if hi > lo {
            let span = (hi / lo).ln();
            for (i, mass) in prior_delays.iter_mut().enumerate() {
                let (b_lo, b_hi) = edges(i);
                let overlap = hi.min(b_hi).ln() - lo.max(b_lo).ln();
                *mass = params.prior_delay_weight * (overlap / span).max(0.0);
            }
        } else {
            prior_delays[bucket_of(lo)] = params.prior_delay_weight;
        }
        Self {
            params,
            prior_delays,
            delays: [0.0; BUCKETS],
            allocations: 0.0,
            replays: 0.0,
            conflicts: 0.0,
            outages: 0.0,
            outage_log_sum: 0.0,
            since_halving: 0,
        }
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
            self.delays.iter_mut().for_each(|d| *d /= 2.0);
        }
    }

    /// A request for a key already held by another region arrived here (a near miss);
    /// `delay` = time since that region allocated it. Report the first such request for a
    /// key only: repeats cannot conflict any more and would make the model conservative.
    pub fn observe_cross_region_replay(&mut self, delay: Duration) {
        self.replays += 1.0;
        self.delays[bucket_of(delay.as_secs_f64())] += 1.0;
    }

    /// A conflict was detected; `delay` = time between the two competing allocations
    /// (|hlc difference|). Call it only for conflicts involving an allocation of this node,
    /// once per competing allocation learnt of. Both nodes of a conflict report it, so it
    /// counts as half a cross-region attempt here.
    pub fn observe_conflict(&mut self, delay: Duration) {
        self.conflicts += 1.0;
        self.delays[bucket_of(delay.as_secs_f64())] += 0.5;
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
    }

    /// Probability (0..=1) that no other region allocates the same key concurrently,
    /// given each peer's current view. Empty peers slice (single node) → 1.0.
    pub fn confidence(&self, peers: &[PeerView]) -> f64 {
        if peers.is_empty() {
            return 1.0;
        }
        let delays = self.delay_distribution();
        let lag = self.params.sync_lag.as_secs_f64();
        let shape = self.outage_shape();
        let share = 1.0 / peers.len() as f64;
        let exposure: f64 = peers
            .iter()
            .map(|peer| {
                let age = peer.staleness.as_secs_f64();
                // Their allocations we cannot see yet, and ours they will not see in time.
                let backward = cdf(&delays, age + lag);
                let forward = if peer.connected {
                    cdf(&delays, lag)
                } else {
                    self.retry_before_heal(&delays, age, lag, shape)
                };
                share * (backward + forward)
            })
            .sum();
        let confidence = (-self.retry_rate() * exposure).exp();
        if confidence.is_finite() {
            confidence.clamp(0.0, 1.0)
        } else {
            0.0
        }
    }

    /// Snapshot of the estimates for `/v1/health` and metrics.
    pub fn summary(&self) -> ConfidenceSummary {
        let delays = self.delay_distribution();
        let shape = self.outage_shape();
        let c = self.params.outage_scale.as_secs_f64();
        let m = self.params.outage_min.as_secs_f64();
        ConfidenceSummary {
            allocations: self.allocations,
            cross_region_replays: self.replays,
            conflicts: self.conflicts,
            retry_rate: self.retry_rate(),
            retry_delay_p50_secs: quantile(&delays, 0.5),
            retry_delay_p90_secs: quantile(&delays, 0.9),
            retry_delay_p99_secs: quantile(&delays, 0.99),
            outages: self.outages,
            outage_shape: shape,
            outage_median_secs: finite_or(m + (c + m) * (2f64.powf(1.0 / shape) - 1.0), f64::MAX),
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

    /// Normalised retry-delay histogram: prior plus observations.
    fn delay_distribution(&self) -> [f64; BUCKETS] {
        let mut mass = [0.0; BUCKETS];
        for (i, m) in mass.iter_mut().enumerate() {
            *m = self.prior_delays[i] + self.delays[i];
        }
        let total: f64 = mass.iter().sum();
        if total > 0.0 && total.is_finite() {
            mass.iter_mut().for_each(|m| *m /= total);
        } else {
            mass = [0.0; BUCKETS];
        }
        mass
    }

    /// P(retry delay < remaining outage + lag) for a peer unreachable for `age` seconds:
    /// the remaining outage is Lomax with scale `c + age` and shape `shape`.
    fn retry_before_heal(&self, delays: &[f64; BUCKETS], age: f64, lag: f64, shape: f64) -> f64 {
        let scale = self.params.outage_scale.as_secs_f64() + age;
        // The overflow bucket (retries after ~a day) is never counted as inside the window.
        (0..BUCKETS - 1)
            .map(|i| {
                let (lo, hi) = edges(i);
                let delay = if i == 0 { hi / 2.0 } else { (lo * hi).sqrt() };
                let wait = (delay - lag).max(0.0);
                delays[i] * finite_or((scale / (scale + wait)).powf(shape), 0.0)
            })
            .sum::<f64>()
            .clamp(0.0, 1.0)
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

/// Lower and upper edge of bucket `i`, in seconds.
fn edges(i: usize) -> (f64, f64) {
    let edge = |k: usize| FIRST_EDGE_SECS * std::f64::consts::SQRT_2.powi(k as i32);
    match i {
        0 => (0.0, FIRST_EDGE_SECS),
        i if i >= BUCKETS - 1 => (edge(BUCKETS - 2), f64::INFINITY),
        i => (edge(i - 1), edge(i)),
    }
}

/// Bucket holding a delay of `secs` seconds.
fn bucket_of(secs: f64) -> usize {
    if secs.is_nan() || secs < FIRST_EDGE_SECS {
        return 0;
    }
    let steps = 2.0 * (secs / FIRST_EDGE_SECS).log2();
    let index = 1 + steps.floor().min(BUCKETS as f64) as usize;
    index.min(BUCKETS - 1)
}

/// CDF of a normalised histogram at `x` seconds, log-linear inside a bucket.
fn cdf(mass: &[f64; BUCKETS], x: f64) -> f64 {
    let mut acc = 0.0;
    for (i, m) in mass.iter().enumerate() {
        let (lo, hi) = edges(i);
        if x >= hi {
            acc += m;
            continue;
        }
        if x > lo {
            let within = if i == 0 {
                x / hi
            } else if hi.is_finite() {
                (x / lo).ln() / (hi / lo).ln()
            } else {
                0.0
            };
            acc += m * within;
        }
        break;
    }
    acc.clamp(0.0, 1.0)
}

/// Quantile `q` of a normalised histogram, in seconds (inverse of [`cdf`]).
fn quantile(mass: &[f64; BUCKETS], q: f64) -> f64 {
    let mut acc = 0.0;
    for (i, &m) in mass.iter().enumerate() {
        let (lo, hi) = edges(i);
        if m > 0.0 && acc + m >= q {
            let within = ((q - acc) / m).clamp(0.0, 1.0);
            return if i == 0 {
                hi * within
            } else if hi.is_finite() {
                lo * (hi / lo).powf(within)
            } else {
                lo
            };
        }
        acc += m;
    }
    0.0
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
                connected: true
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
        let fresh = ConfidenceModel::new(ConfidenceParams::default());
        assert_eq!(fresh.confidence(&in_sync(3)), 1.0);
        assert_eq!(fresh.confidence(&[]), 1.0);
        assert_eq!(with_history(10_000, 3_000).confidence(&in_sync(4)), 1.0);
        // Below the normal replication lag counts as in sync too.
        let lagging = vec![
            PeerView {
                staleness: secs(0.2),
                connected: true
            };
            2
        ];
        assert!(fresh.confidence(&lagging) >= 0.999);
    }

    #[test]
    fn fresh_node_with_unreachable_peer_is_unsure() {
        let fresh = ConfidenceModel::new(ConfidenceParams::default());
        let alone = [PeerView {
            staleness: secs(30.0),
            connected: false,
        }];
        let c = fresh.confidence(&alone);
        assert!(c < 0.97, "{c}");
        assert!(fresh.confidence(&one_stale(30.0)) < 0.99);
    }

    #[test]
    fn falls_as_staleness_grows() {
        let model = with_history(5_000, 500);
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
        }];
        let unreachable = [PeerView {
            staleness: secs(30.0),
            connected: false,
        }];
        assert!(model.confidence(&catching_up) > model.confidence(&unreachable));
    }

    #[test]
    fn falls_faster_with_more_cross_region_retries() {
        let calm = with_history(10_000, 100);
        let busy = with_history(10_000, 3_000);
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
        (0..50).for_each(|_| model.observe_conflict(secs(0.05)));
        let c = model.confidence(&in_sync(3));
        assert!(c < 1.0 && c > 0.9, "{c}");
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
            weights in proptest::collection::vec(number(), 5),
            (lag, scale, delay_min, delay_max) in (duration(), duration(), duration(), duration()),
            events in proptest::collection::vec((0u8..4, duration()), 0..200),
            peers in proptest::collection::vec((duration(), any::<bool>()), 0..6),
            history in 0u64..50,
        ) {
            let params = ConfidenceParams {
                sync_lag: lag,
                prior_retry_rate: weights[0],
                prior_retry_weight: weights[1],
                prior_delay_weight: weights[2],
                prior_outage_shape: weights[3],
                prior_outage_weight: weights[4],
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
                    2 => model.observe_conflict(d),
                    _ => model.observe_peer_resync(d),
                }
            }
            let views: Vec<PeerView> =
                peers.into_iter().map(|(staleness, connected)| PeerView { staleness, connected }).collect();
            let c = model.confidence(&views);
            prop_assert!((0.0..=1.0).contains(&c), "{}", c);
            let s = model.summary();
            prop_assert!(s.retry_rate.is_finite() && s.outage_shape.is_finite());
            prop_assert!(s.retry_delay_p99_secs.is_finite() && s.outage_median_secs.is_finite());
        }
    }
}
