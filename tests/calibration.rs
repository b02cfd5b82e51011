//! Calibration of `oncemesh::confidence` on a seeded virtual-time simulation.
//!
//! Regions get customer requests; some requests are retried, some retries land in another
//! region; one region at a time is cut off for a while, and while it is, a share of its
//! customers (those whose answers are slow) fail over to another region. Each region runs
//! its own `ConfidenceModel`, fed exactly what a node would know and when: its allocations
//! at once, replays when they arrive, each allocation's resolution (settled, or a competing
//! allocation reached it) when it happens, outages when they end. Every allocation's
//! confidence is then compared with what happened to it.

use oncemesh::confidence::{ConfidenceModel, ConfidenceParams, Estimate, PeerView, Situation};
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use std::time::Duration;

const REGIONS: usize = 4;
const CUSTOMERS: usize = 20_000;
/// Each request allocates at least once, so this bounds the allocations from below.
const REQUESTS: usize = 100_000;
/// Requests per second, whole cluster.
const REQUEST_RATE: f64 = 2.0;
/// Chance that a request is retried at all, and that a retry is followed by another.
const P_RETRY: f64 = 0.5;
const P_RETRY_AGAIN: f64 = 0.35;
/// Chance that a retry goes to another region than the customer's home region.
const P_FAILOVER: f64 = 0.6;
/// Time from a slow answer in a cut-off region to the customer's attempt elsewhere:
/// log-normal with this median (seconds) and spread.
const FAILOVER_DELAY: (f64, f64) = (3.0, 0.7);
/// Mean time between partitions (from the end of one to the start of the next), seconds.
const PARTITION_GAP: f64 = 300.0;
/// Replication lag between connected regions, seconds; the models are told its mean,
/// as an operator sets `sync_lag` to the measured lag.
const LAG: (f64, f64) = (0.05, 0.25);
const BINS: usize = 10;

/// One region cut off from all the others during `[start, end)`.
struct Partition {
    start: f64,
    end: f64,
    region: usize,
}

/// What happens at one moment, at one region.
enum Kind {
    /// A local allocation; `id` names it for its resolution, `conflict` is the ground truth.
    Allocate {
        id: usize,
        conflict: bool,
    },
    Replay {
        delay: f64,
    },
    /// Allocation `id` of this region settled (`conflict: None`) or met its first
    /// competitor, allocated `delay` seconds apart.
    Resolve {
        id: usize,
        conflict: Option<f64>,
    },
    Resync {
        outage: f64,
    },
}

struct Event {
    time: f64,
    region: usize,
    kind: Kind,
}

struct Allocation {
    time: f64,
    region: usize,
    lag: f64,
}

/// A scored prediction.
struct Outcome {
    confidence: f64,
    conflict: bool,
    situation: Situation,
    /// For an allocation of the cut-off region during a partition: which of that
    /// region's partitions it was (1 = its first).
    cut_off_partition: Option<usize>,
}

/// What a run simulates.
#[derive(Clone, Copy)]
struct Scenario {
    seed: u64,
    /// Chance that a request made in a cut-off region is also tried in another region.
    failover: f64,
}

fn exponential(rng: &mut StdRng, mean: f64) -> f64 {
    -mean * (1.0 - rng.random::<f64>()).ln()
}

fn log_normal(rng: &mut StdRng, median: f64, sigma: f64) -> f64 {
    let (u, v): (f64, f64) = (1.0 - rng.random::<f64>(), rng.random());
    let normal = (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos();
    median * (sigma * normal).exp()
}

/// Time from one attempt to the next: rare double submits, client retries, humans.
fn retry_delay(rng: &mut StdRng) -> f64 {
    match rng.random::<f64>() {
        x if x < 0.02 => log_normal(rng, 0.15, 0.5),
        x if x < 0.6 => log_normal(rng, 2.0, 0.6),
        _ => log_normal(rng, 40.0, 1.0),
    }
}

/// Non-overlapping partitions: mostly short flaps, sometimes long outages.
fn partitions(rng: &mut StdRng, horizon: f64) -> Vec<Partition> {
    let mut out = Vec::new();
    let mut t = exponential(rng, PARTITION_GAP);
    while t < horizon {
        let mean = if rng.random_bool(0.7) { 15.0 } else { 180.0 };
        let end = t + exponential(rng, mean);
        out.push(Partition {
            start: t,
            end,
            region: rng.random_range(0..REGIONS),
        });
        t = end + exponential(rng, PARTITION_GAP);
    }
    out
}

fn partition_at(parts: &[Partition], t: f64) -> Option<&Partition> {
    let i = parts.partition_point(|p| p.start <= t);
    parts[..i].last().filter(|p| t < p.end)
}

/// When `to` learns of an allocation: once both ends are reachable, plus the lag.
fn visible_at(parts: &[Partition], a: &Allocation, to: usize) -> f64 {
    let up = match partition_at(parts, a.time) {
        Some(p) if p.region == a.region || p.region == to => p.end,
        _ => a.time,
    };
    up + a.lag
}

fn peer_views(parts: &[Partition], region: usize, t: f64) -> Vec<PeerView> {
    let cut = partition_at(parts, t);
    (0..REGIONS)
        .filter(|&peer| peer != region)
        .map(|peer| match cut {
            Some(p) if p.region == region || p.region == peer => PeerView {
                staleness: Duration::from_secs_f64(t - p.start),
                connected: false,
                behind: Duration::ZERO,
            },
            _ => PeerView {
                staleness: Duration::ZERO,
                connected: true,
                behind: Duration::ZERO,
            },
        })
        .collect()
}

/// Plays one request and its retries; pushes what each region sees.
fn play_request(
    rng: &mut StdRng,
    scenario: Scenario,
    parts: &[Partition],
    home: usize,
    start: f64,
    events: &mut Vec<Event>,
    next_id: &mut usize,
) {
    let mut attempts = vec![(start, home)];
    if partition_at(parts, start).is_some_and(|p| p.region == home)
        && rng.random_bool(scenario.failover)
    {
        let t = start + log_normal(rng, FAILOVER_DELAY.0, FAILOVER_DELAY.1);
        attempts.push((t, (home + rng.random_range(1..REGIONS)) % REGIONS));
    }
    if rng.random_bool(P_RETRY) {
        let mut t = start;
        loop {
            t += retry_delay(rng);
            let region = if rng.random_bool(P_FAILOVER) {
                (home + rng.random_range(1..REGIONS)) % REGIONS
            } else {
                home
            };
            attempts.push((t, region));
            if !rng.random_bool(P_RETRY_AGAIN) {
                break;
            }
        }
    }
    attempts.sort_by(|a, b| a.0.total_cmp(&b.0));
    let mut allocations: Vec<Allocation> = Vec::new();
    let mut replayed = [false; REGIONS];
    for (time, region) in attempts {
        if allocations.iter().any(|a| a.region == region) {
            continue; // a local replay: no risk, not cross-region
        }
        let seen = allocations
            .iter()
            .find(|a| visible_at(parts, a, region) <= time);
        match seen {
            // A node reports the first replay of a key only (see docs/CONFIDENCE.md).
            Some(a) if !replayed[region] => {
                replayed[region] = true;
                events.push(Event {
                    time,
                    region,
                    kind: Kind::Replay {
                        delay: time - a.time,
                    },
                });
            }
            Some(_) => {}
            None => allocations.push(Allocation {
                time,
                region,
                lag: rng.random_range(LAG.0..LAG.1),
            }),
        }
    }
    let conflict = allocations.len() > 1;
    for a in &allocations {
        let id = *next_id;
        *next_id += 1;
        events.push(Event {
            time: a.time,
            region: a.region,
            kind: Kind::Allocate { id, conflict },
        });
        // Resolved by the first competitor that reaches this region, or settled once
        // every peer has it and this region has heard back.
        let competitor = allocations
            .iter()
            .filter(|b| b.region != a.region)
            .map(|b| (visible_at(parts, b, a.region), (a.time - b.time).abs()))
            .min_by(|x, y| x.0.total_cmp(&y.0));
        let (time, conflict) = match competitor {
            Some((time, delay)) => (time, Some(delay)),
            None => {
                let settled = (0..REGIONS)
                    .filter(|&peer| peer != a.region)
                    .map(|peer| visible_at(parts, a, peer))
                    .fold(a.time, f64::max);
                (settled + a.lag, None)
            }
        };
        events.push(Event {
            time,
            region: a.region,
            kind: Kind::Resolve { id, conflict },
        });
    }
}

/// Builds the whole history, then replays it in time order through one model per region.
fn simulate(scenario: Scenario) -> Vec<Outcome> {
    let mut rng = StdRng::seed_from_u64(scenario.seed);
    let span = REQUESTS as f64 / REQUEST_RATE;
    let parts = partitions(&mut rng, span + 86_400.0);
    let homes: Vec<usize> = (0..CUSTOMERS)
        .map(|_| rng.random_range(0..REGIONS))
        .collect();
    let mut events = Vec::new();
    let mut next_id = 0;
    let mut t = 0.0;
    for _ in 0..REQUESTS {
        t += exponential(&mut rng, 1.0 / REQUEST_RATE);
        let home = homes[rng.random_range(0..CUSTOMERS)];
        play_request(
            &mut rng,
            scenario,
            &parts,
            home,
            t,
            &mut events,
            &mut next_id,
        );
    }
    for p in &parts {
        let outage = p.end - p.start;
        for region in 0..REGIONS {
            let peers = if region == p.region { REGIONS - 1 } else { 1 };
            for _ in 0..peers {
                events.push(Event {
                    time: p.end,
                    region,
                    kind: Kind::Resync { outage },
                });
            }
        }
    }
    events.sort_by(|a, b| a.time.total_cmp(&b.time));
    // Which of its own partitions each partition is for the region it cuts off.
    let mut seen = [0; REGIONS];
    let nth: Vec<usize> = parts
        .iter()
        .map(|p| {
            seen[p.region] += 1;
            seen[p.region]
        })
        .collect();

    let params = ConfidenceParams {
        sync_lag: Duration::from_secs_f64((LAG.0 + LAG.1) / 2.0),
        ..ConfidenceParams::default()
    };
    let mut models: Vec<ConfidenceModel> =
        (0..REGIONS).map(|_| ConfidenceModel::new(params)).collect();
    let mut given: Vec<Option<Estimate>> = vec![None; next_id];
    let mut outcomes = Vec::new();
    for e in events {
        let model = &mut models[e.region];
        match e.kind {
            Kind::Allocate { id, conflict } => {
                let views = peer_views(&parts, e.region, e.time);
                let estimate = model.estimate(&views);
                model.observe_allocation();
                given[id] = Some(estimate);
                let i = parts.partition_point(|p| p.start <= e.time);
                let cut_off_partition = i
                    .checked_sub(1)
                    .filter(|&i| parts[i].region == e.region && e.time < parts[i].end)
                    .map(|i| nth[i]);
                outcomes.push(Outcome {
                    confidence: estimate.confidence,
                    conflict,
                    situation: estimate.situation,
                    cut_off_partition,
                });
            }
            Kind::Replay { delay } => {
                model.observe_cross_region_replay(Duration::from_secs_f64(delay))
            }
            Kind::Resolve { id, conflict } => {
                if let Some(estimate) = given[id] {
                    if let Some(delay) = conflict {
                        model.observe_conflict(Duration::from_secs_f64(delay), estimate.situation);
                    }
                    model.observe_resolved(&estimate, conflict.is_some());
                }
            }
            Kind::Resync { outage } => model.observe_peer_resync(Duration::from_secs_f64(outage)),
        }
    }
    outcomes
}

fn mean(values: impl Iterator<Item = f64>) -> f64 {
    let (sum, n) = values.fold((0.0, 0usize), |(s, n), v| (s + v, n + 1));
    sum / n.max(1) as f64
}

/// Mean predicted confidence and observed fraction without conflict.
fn reliability<'a>(outcomes: impl Iterator<Item = &'a Outcome> + Clone) -> (f64, f64) {
    let predicted = mean(outcomes.clone().map(|o| o.confidence));
    let observed = mean(outcomes.map(|o| if o.conflict { 0.0 } else { 1.0 }));
    (predicted, observed)
}

/// Prints the reliability table of `outcomes` and returns their expected calibration error.
fn reliability_table(outcomes: &[Outcome]) -> f64 {
    let n = outcomes.len();
    let mut bins: Vec<Vec<&Outcome>> = (0..BINS).map(|_| Vec::new()).collect();
    for o in outcomes {
        bins[((o.confidence * BINS as f64) as usize).min(BINS - 1)].push(o);
    }
    println!(
        "{:>11} {:>8} {:>14} {:>16} {:>7}",
        "confidence", "count", "mean predicted", "no conflict seen", "gap"
    );
    let mut ece = 0.0;
    for (i, bin) in bins.iter().enumerate() {
        if bin.is_empty() {
            continue;
        }
        let (predicted, observed) = reliability(bin.iter().copied());
        let gap = (predicted - observed).abs();
        ece += gap * bin.len() as f64 / n as f64;
        let (lo, hi) = (i as f64 / BINS as f64, (i + 1) as f64 / BINS as f64);
        println!(
            "{lo:.1} - {hi:.1} {:>8} {predicted:>14.4} {observed:>16.4} {gap:>7.4}",
            bin.len()
        );
    }
    ece
}

/// Mean confidence against the share without conflict, per situation and for the
/// cut-off regions' first and later partitions; returns the later partitions' gap.
fn situation_table(outcomes: &[Outcome]) -> f64 {
    println!(
        "{:<32} {:>8} {:>10} {:>10} {:>8}",
        "allocations", "count", "predicted", "seen", "gap"
    );
    let row = |name: &str, keep: &dyn Fn(&Outcome) -> bool| {
        let chosen: Vec<&Outcome> = outcomes.iter().filter(|o| keep(o)).collect();
        let (predicted, seen) = reliability(chosen.iter().copied());
        println!(
            "{name:<32} {:>8} {predicted:>10.4} {seen:>10.4} {:>8.4}",
            chosen.len(),
            predicted - seen
        );
        predicted - seen
    };
    for situation in Situation::ALL {
        row(situation.as_str(), &|o| o.situation == situation);
    }
    row("cut off, its first partition", &|o| {
        o.cut_off_partition == Some(1)
    });
    row("cut off, its later partitions", &|o| {
        o.cut_off_partition.is_some_and(|n| n >= 2)
    })
}

/// Runs one scenario, prints its tables, and checks the calibration targets.
fn check(scenario: Scenario) {
    let outcomes = simulate(scenario);
    let n = outcomes.len();
    assert!(n >= 100_000, "only {n} allocations");
    println!(
        "== seed {}, failover of cut-off customers {:.2}",
        scenario.seed, scenario.failover
    );
    let ece = reliability_table(&outcomes);
    let later_gap = situation_table(&outcomes);
    let conflict_rate = mean(outcomes.iter().map(|o| f64::from(u8::from(o.conflict))));
    let brier = mean(
        outcomes
            .iter()
            .map(|o| (o.confidence - f64::from(u8::from(!o.conflict))).powi(2)),
    );
    let base = conflict_rate * (1.0 - conflict_rate);
    println!(
        "allocations {n}, conflicts {:.2}%, ECE {ece:.4}, Brier {brier:.4} (constant base rate: {base:.4})",
        100.0 * conflict_rate
    );
    assert!(ece <= 0.03, "expected calibration error {ece:.4} > 0.03");
    assert!(
        later_gap.abs() <= 0.05,
        "cut-off allocations from the second partition on: gap {later_gap:.4}"
    );
    assert!(
        brier < 0.8 * base,
        "no better than a constant: Brier {brier} vs {base}"
    );
}

#[test]
fn calibrated_with_independent_retries() {
    check(Scenario {
        seed: 7,
        failover: 0.0,
    });
}

#[test]
fn calibrated_when_a_twentieth_of_cut_off_customers_fail_over() {
    for seed in [1, 2] {
        check(Scenario {
            seed,
            failover: 0.05,
        });
    }
}

#[test]
fn calibrated_when_a_quarter_of_cut_off_customers_fail_over() {
    for seed in [3, 4] {
        check(Scenario {
            seed,
            failover: 0.25,
        });
    }
}

#[test]
fn calibrated_when_half_of_cut_off_customers_fail_over() {
    for seed in [5, 6] {
        check(Scenario {
            seed,
            failover: 0.5,
        });
    }
}
