//! Runs the deterministic simulator (`oncemesh::sim`) over many seeds and
//! prints a line per failing seed with the shortest history excerpt that
//! shows it, then `N seeds, K failures`.
//!
//! ```text
//! cargo run --release --example simulate -- --seeds 1000 --nodes 3
//! cargo run --release --example simulate -- --seed 42            # one seed, again
//! cargo run --release --example simulate -- --seeds 5 --nodes 50 --link-latency 100ms --no-faults
//! cargo run --release --example simulate -- --seeds 3 --nodes 50 --link-latency 100ms --no-faults --full-mesh
//! ```

use clap::Parser;
use oncemesh::check;
use oncemesh::sim::{self, SimConfig};
use std::time::{Duration, Instant};

/// Deterministic simulation of an oncemesh cluster.
#[derive(Parser, Debug)]
struct Args {
    /// How many seeds to run, from `--first-seed` on.
    #[arg(long, default_value_t = 100)]
    seeds: u64,
    /// The first seed.
    #[arg(long, default_value_t = 1)]
    first_seed: u64,
    /// Run exactly this seed (and print its whole report).
    #[arg(long)]
    seed: Option<u64>,
    /// Nodes per cluster.
    #[arg(long, default_value_t = 3)]
    nodes: usize,
    /// Most neighbours each node syncs with (a cluster of at most this
    /// plus one is a full mesh).
    #[arg(long, default_value_t = 6)]
    fanout: usize,
    /// Every node syncs with every other, whatever the size (as before
    /// bounded fan-out).
    #[arg(long)]
    full_mesh: bool,
    /// One-way link latency.
    #[arg(long, default_value = "20ms", value_parser = humantime::parse_duration)]
    link_latency: Duration,
    /// Virtual time of client traffic.
    #[arg(long, default_value = "8s", value_parser = humantime::parse_duration)]
    workload: Duration,
    /// New payments per second, whole cluster.
    #[arg(long, default_value_t = 15.0)]
    payments_per_s: f64,
    /// No partitions, crashes, skew, loss or failing webhook: the figures
    /// of a calm cluster (messages per allocation, time to every node).
    #[arg(long)]
    no_faults: bool,
    /// Partitions into two groups cut a third of the nodes from the rest.
    #[arg(long)]
    split_third: bool,
}

fn main() {
    let args = Args::parse();
    let config = SimConfig {
        nodes: args.nodes.max(1),
        fanout: (!args.full_mesh).then_some(args.fanout),
        link_latency_ms: args.link_latency.as_millis() as u64,
        jitter_ms: (args.link_latency.as_millis() as u64 / 2).max(1),
        workload_ms: args.workload.as_millis() as u64,
        payments_per_s: args.payments_per_s,
        faults: !args.no_faults,
        split_third: args.split_third,
        ..SimConfig::default()
    };
    let seeds: Vec<u64> = match args.seed {
        Some(s) => vec![s],
        None => (args.first_seed..args.first_seed + args.seeds).collect(),
    };
    let started = Instant::now();
    let mut failures = 0;
    let mut outcomes = Vec::new();
    let (mut allocations, mut conflicts, mut events) = (0, 0, 0);
    let (mut per_allocation, mut idle, mut visible) = (Vec::new(), Vec::new(), Vec::new());
    let (mut busy_per_allocation, mut settled_p50) = (Vec::new(), Vec::new());
    let mut settled_max = 0u64;
    for (n, &seed) in seeds.iter().enumerate() {
        let report = sim::run(&config, seed);
        allocations += report.allocations;
        conflicts += report.conflicts;
        events += report.events;
        outcomes.extend(report.outcomes.iter().copied());
        per_allocation.push(report.messages_per_allocation);
        if report.idle_requests_per_node_s.is_finite() {
            idle.push(report.idle_requests_per_node_s);
        }
        visible.extend(report.visible_p50_ms);
        if report.busy_messages_per_allocation.is_finite() {
            busy_per_allocation.push(report.busy_messages_per_allocation);
        }
        settled_p50.extend(report.settled_p50_ms.map(|ms| ms as f64));
        settled_max = settled_max.max(report.settled_max_ms.unwrap_or(0));
        if !report.passed() {
            failures += 1;
            println!("seed {seed}: FAILED");
            for v in report.violations.iter().take(5) {
                println!("  {}: {}", v.check, v.detail);
            }
            for line in &report.excerpt {
                println!("    {line}");
            }
        } else if args.seed.is_some() {
            println!("{report:#?}");
        }
        if (n + 1) % 100 == 0 {
            eprintln!(
                "... {} seeds, {failures} failures, {:.1} s",
                n + 1,
                started.elapsed().as_secs_f64()
            );
        }
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
    };
    let mut visible: Vec<f64> = visible.into_iter().map(|v| v as f64).collect();
    println!(
        "{} nodes: {allocations} allocations, {conflicts} conflicts, {events} events, {:.1} s",
        config.nodes,
        started.elapsed().as_secs_f64()
    );
    println!(
        "median per seed: {:.1} sync requests per allocation ({:.1} with the idle rate subtracted), {:.2} idle requests per node and second, {:.0} ms until an allocation is on every node, {:.0} ms until settled on its node",
        median(&mut per_allocation),
        median(&mut busy_per_allocation),
        median(&mut idle),
        median(&mut visible),
        median(&mut settled_p50)
    );
    println!("slowest settlement over the seeds: {settled_max} ms");
    println!(
        "confidence calibration over the run: ECE {:.4} over {} allocations",
        check::ece(&outcomes),
        outcomes.len()
    );
    println!("{} seeds, {failures} failures", seeds.len());
    if failures > 0 {
        std::process::exit(1);
    }
}
