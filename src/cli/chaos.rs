//! `oncemesh chaos`: many seeds of the chaos runner ([`crate::chaos`]) on
//! this binary, a summary row per seed, and a last line `N seeds, K
//! failures`. A failing seed prints its broken checks and the shortest
//! excerpt of its history that shows the first, and keeps its nodes' data
//! dirs and logs. It is a subcommand rather than an example so that the
//! binary it starts is always the one running it, never a stale build.
//! Ctrl-C, SIGTERM or SIGHUP stops the seed running, its nodes and its
//! small filesystems with it (SIGKILL cannot: then its mounts stay, under
//! the run's directory, until unmounted by hand).

use super::table::render;
use crate::chaos::{self, FullDisk, Options, Outcome};
use anyhow::Context;
use clap::Args;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

/// Options of a chaos run.
#[derive(Args, Debug)]
pub struct ChaosArgs {
    /// Seeds to run, from --first-seed on.
    #[arg(long, default_value_t = 10)]
    pub seeds: u64,
    /// The first seed.
    #[arg(long, default_value_t = 1)]
    pub first_seed: u64,
    /// Run exactly this seed.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Nodes per cluster.
    #[arg(long, default_value_t = 3)]
    pub nodes: usize,
    /// Seconds of traffic under faults per seed.
    #[arg(long, default_value_t = 30)]
    pub seconds: u64,
    /// How long the healed cluster may take to converge.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    pub converge_within: Duration,
    /// Keep each seed's data dirs and logs under this directory (default: a
    /// temporary one, removed for seeds that pass).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Give each node a small filesystem (a tmpfs) as its data dir and fill
    /// it in the schedule's full-disk episodes: `auto` where it can be
    /// mounted (as root; else those episodes are skipped, saying so),
    /// `required` (a seed that cannot mount one fails), or `off`.
    #[arg(long, value_enum, default_value_t = FullDisk::Auto)]
    pub full_disk: FullDisk,
}

/// Runs the seeds; the exit code is 1 if any failed.
pub async fn run(args: ChaosArgs) -> anyhow::Result<i32> {
    let exe = std::env::current_exe().context("locating the oncemesh binary")?;
    let seeds: Vec<u64> = match args.seed {
        Some(s) => vec![s],
        None => (args.first_seed..args.first_seed + args.seeds).collect(),
    };
    let options = Options {
        nodes: args.nodes.max(2),
        workload: Duration::from_secs(args.seconds),
        converge_within: args.converge_within,
        full_disk: args.full_disk,
    };
    let base = match &args.data_dir {
        Some(dir) => dir.clone(),
        None => std::env::temp_dir().join(format!("oncemesh-chaos-{}", std::process::id())),
    };
    let mut rows = Vec::new();
    let mut failures = 0;
    let mut skipped: BTreeMap<&str, (usize, String)> = BTreeMap::new();
    for &seed in &seeds {
        let root = base.join(format!("seed-{seed}"));
        std::fs::create_dir_all(&root).with_context(|| format!("creating {}", root.display()))?;
        let outcome = tokio::select! {
            outcome = chaos::run_seed(&exe, &root, &options, seed) => outcome,
            () = interrupted() => {
                println!("interrupted during seed {seed}; its logs are in {}", root.display());
                return Ok(130);
            }
        };
        let passed = matches!(&outcome, Ok(o) if o.report.passed());
        match &outcome {
            Ok(o) => {
                let row = row(seed, o);
                println!("{}", row.join("  "));
                for (kind, (n, why)) in &o.skipped {
                    println!("  {n} {kind} episodes of seed {seed} skipped: {why}");
                    skipped.entry(*kind).or_insert((0, why.clone())).0 += n;
                }
                rows.push(row);
                if !passed {
                    print_failure(o);
                }
            }
            Err(e) => println!("seed {seed}: the run could not be carried out: {e}"),
        }
        if passed && args.data_dir.is_none() {
            let _ = std::fs::remove_dir_all(&root);
        } else if !passed {
            failures += 1;
            println!(
                "  data dirs and logs of seed {seed} kept in {}",
                root.display()
            );
        }
    }
    if args.data_dir.is_none() {
        let _ = std::fs::remove_dir(&base);
    }
    println!("\n{}", render(&HEADER, &rows));
    for (kind, (n, why)) in &skipped {
        println!("{kind}: {n} episodes skipped, not injected: {why}");
    }
    println!("{} seeds, {failures} failures", seeds.len());
    Ok(if failures > 0 { 1 } else { 0 })
}

/// Returns on SIGINT (Ctrl-C), SIGTERM or SIGHUP (the terminal gone).
async fn interrupted() {
    use tokio::signal::unix::{signal, SignalKind};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::hangup()),
    ) {
        (Ok(mut term), Ok(mut hup)) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
                _ = hup.recv() => {}
            }
        }
        _ => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

const HEADER: [&str; 13] = [
    "SEED",
    "ALLOCATIONS",
    "REPLAYS",
    "CONFLICTS",
    "REQUESTS",
    "UNANSWERED",
    "5XX",
    "SETTLED CLAIMS",
    "FAULTS",
    "CALLS/REFUSED/EFFECTS",
    "CONVERGED",
    "ECE",
    "RESULT",
];

fn row(seed: u64, o: &Outcome) -> Vec<String> {
    let r = &o.report;
    let faults: Vec<String> = o.faults.iter().map(|(k, n)| format!("{k} {n}")).collect();
    vec![
        seed.to_string(),
        r.allocations.to_string(),
        r.replays.to_string(),
        r.conflicts.to_string(),
        o.counts.requests.to_string(),
        o.counts.failed.to_string(),
        o.counts.server_errors.to_string(),
        o.claims.to_string(),
        faults.join(", "),
        format!("{}/{}/{}", o.calls_accepted, o.calls_refused, o.effects),
        r.converged_after_ms
            .map_or("NO".into(), |ms| format!("{:.1} s", ms as f64 / 1e3)),
        format!(
            "{:.3} ({:.1} expected, {} found)",
            o.ece, o.expected_duplicates, o.conflicted_allocations
        ),
        if r.passed() { "ok" } else { "FAILED" }.into(),
    ]
}

fn print_failure(o: &Outcome) {
    println!("seed {}: FAILED", o.report.seed);
    for v in o.report.violations.iter().take(5) {
        println!("  {}: {}", v.check, v.detail);
    }
    if o.report.violations.len() > 5 {
        println!("  ... {} more", o.report.violations.len() - 5);
    }
    for line in &o.report.excerpt {
        println!("    {line}");
    }
}
