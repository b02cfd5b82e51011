//! Footprint of a running node: memory and disk per token, load rate, and
//! how soon a restarted node answers again (prints its figures; not a test).
//!
//! ```text
//! cargo build --release --bin oncemesh --example loadgen --example footprint
//! nice -n 10 target/release/examples/footprint --tokens 1000000 --runs 3
//! nice -n 10 target/release/examples/footprint --tokens 10000000 --runs 1
//! ```
//!
//! One run, on a fresh data dir:
//!
//! 1. start the release `oncemesh run` (no peers) and read its idle RSS
//!    (`VmRSS` of /proc/PID/status) 2 s after it answers `GET /v1/health`;
//! 2. allocate one probe key and keep its transaction id;
//! 3. fill the node with `--tokens` unique keys in all (the probe and
//!    `examples/loadgen --count` at `--clients` concurrent clients, closed
//!    loop; its progress line every 10 s);
//! 4. `--settle` seconds later (default 10, when the node is quiet) read the
//!    RSS again and the bytes the data dir takes on disk (allocated blocks,
//!    as `du`); check `/v1/health` holds every key;
//! 5. SIGTERM the node, start it again on the same data dir, and time from
//!    that start until `/v1/health` answers and until a replay of the probe
//!    answers 200 with `replay: true` and the same transaction id; the data
//!    dir again then (a node stopped by SIGTERM first lets its storage
//!    writer catch up with the journal: the size once settled); then the
//!    same after SIGKILL.
//!
//! Prints one table: every run and the median of each figure, against the
//! targets of issue 20. The binaries are `--bin` and `--loadgen`, or the
//! ones beside this example.

mod support;

use clap::Parser;
use oncemesh::client::Client;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use support::{free_port, median, rss_bytes, sibling_binary, Node};
use tokio::process::Command;

#[derive(Parser, Debug)]
#[command(about = "RSS and disk per token, load rate and restart time of a running oncemesh node")]
struct Args {
    /// Unique tokens to load in each run.
    #[arg(long, default_value_t = 1_000_000)]
    tokens: u64,
    /// Independent runs (fresh node and data dir each); medians are printed.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Concurrent HTTP clients while loading.
    #[arg(long, default_value_t = 50)]
    clients: usize,
    /// Seconds between the end of the load and reading RSS and disk.
    #[arg(long, default_value_t = 10)]
    settle: u64,
    /// The oncemesh binary (default: beside this example's directory).
    #[arg(long)]
    bin: Option<PathBuf>,
    /// The load generator (default: examples/loadgen beside this example).
    #[arg(long)]
    loadgen: Option<PathBuf>,
}

/// The figures of one run.
struct Run {
    tokens: u64,
    rate: f64,
    p99_ms: f64,
    idle_rss: u64,
    rss_per_token: f64,
    disk_per_token: f64,
    /// After the SIGTERM and the restart.
    settled_disk_per_token: f64,
    term: Restart,
    kill: Restart,
}

/// How long a restarted node took, from its start.
struct Restart {
    /// Until the old process was gone after the signal.
    stop_s: f64,
    /// Until `/v1/health` answered.
    health_s: f64,
    /// Until the probe's replay answered with its transaction.
    replay_s: f64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    anyhow::ensure!(args.tokens >= 2, "--tokens must be at least 2");
    anyhow::ensure!(args.runs >= 1, "--runs must be at least 1");
    let bin = args
        .bin
        .clone()
        .map_or_else(|| sibling_binary("oncemesh"), Ok)?;
    let loadgen = args
        .loadgen
        .clone()
        .map_or_else(|| sibling_binary("loadgen"), Ok)?;
    println!(
        "footprint: one node, {} tokens at {} clients, {} runs, binary {}",
        args.tokens,
        args.clients,
        args.runs,
        bin.display()
    );
    let mut runs = Vec::new();
    for n in 1..=args.runs {
        let run = one_run(&args, &bin, &loadgen).await?;
        println!(
            "run {n}: {} tokens at {:.0}/s, {:.0} B RSS and {:.0} B disk per token, answering {:.2} s after SIGTERM + start, {:.2} s after SIGKILL + start",
            run.tokens, run.rate, run.rss_per_token, run.disk_per_token, run.term.replay_s, run.kill.replay_s
        );
        runs.push(run);
    }
    print_table(&runs);
    Ok(())
}

async fn one_run(args: &Args, bin: &Path, loadgen: &Path) -> anyhow::Result<Run> {
    let root = tempfile::Builder::new()
        .prefix("oncemesh-footprint-")
        .tempdir()?;
    let data = root.path().join("data");
    let log = root.path().join("node.log");
    let http = format!("127.0.0.1:{}", free_port()?);
    let url = format!("http://{http}");
    let client = Client::new(&url)?;
    let start = || {
        let mut command = Command::new(bin);
        command
            .args(["run", "--region", "fp", "--http", &http])
            .arg("--data-dir")
            .arg(&data);
        Node::start(command, &log)
    };

    let mut node = start().await?;
    until_answers(&client, None).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let idle_rss = rss_bytes(node.pid);
    let payload = serde_json::json!({"amount": 1250, "currency": "EUR"});
    let probe = client.allocate("footprint-probe", &payload).await?;
    anyhow::ensure!(!probe.replay, "the probe key was new");

    let out = Command::new(loadgen)
        .args(["--node", &url, "--clients", &args.clients.to_string()])
        .args(["--count", &(args.tokens - 1).to_string()])
        .args(["--seconds", "1e9", "--progress", "10", "--json"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::inherit())
        .spawn()?
        .wait_with_output()
        .await?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    anyhow::ensure!(out.status.success(), "loadgen failed: {stdout}");
    let summary: Value = serde_json::from_str(stdout.lines().last().unwrap_or_default())?;
    let errors = summary["errors"].as_u64().unwrap_or(u64::MAX);
    anyhow::ensure!(errors == 0, "loadgen: {errors} errors: {stdout}");

    tokio::time::sleep(Duration::from_secs(args.settle)).await;
    let rss = rss_bytes(node.pid);
    let disk = disk_bytes(&data)?;
    let keys = client.health().await?.extra["ledger"]["keys"]
        .as_u64()
        .unwrap_or(0);
    anyhow::ensure!(
        keys == args.tokens,
        "the node holds {keys} keys, {} were loaded",
        args.tokens
    );

    let mut restart = async |signal| -> anyhow::Result<Restart> {
        let signalled = Instant::now();
        node.stop(signal).await?;
        let stop_s = signalled.elapsed().as_secs_f64();
        let started = Instant::now();
        node = start().await?;
        let (health_s, replay_s) = until_answers(&client, Some((started, &probe))).await?;
        Ok(Restart {
            stop_s,
            health_s,
            replay_s,
        })
    };
    let term = restart(libc::SIGTERM).await?;
    let settled_disk = disk_bytes(&data)?;
    let kill = restart(libc::SIGKILL).await?;
    node.stop(libc::SIGTERM).await?;
    Ok(Run {
        tokens: keys,
        rate: summary["allocations_per_s"].as_f64().unwrap_or(f64::NAN),
        p99_ms: summary["p99_ms"].as_f64().unwrap_or(f64::NAN),
        idle_rss,
        rss_per_token: rss.saturating_sub(idle_rss) as f64 / keys as f64,
        disk_per_token: disk as f64 / keys as f64,
        settled_disk_per_token: settled_disk as f64 / keys as f64,
        term,
        kill,
    })
}

/// Polls every 10 ms until `/v1/health` answers and, with a probe, until
/// its replay answers 200 with `replay: true` and the same transaction;
/// returns both times since `started` (5 minutes at most).
async fn until_answers(
    client: &Client,
    probe: Option<(Instant, &oncemesh::client::Allocated)>,
) -> anyhow::Result<(f64, f64)> {
    let started = probe.map_or_else(Instant::now, |(at, _)| at);
    let deadline = started + Duration::from_secs(300);
    let poll = || async {
        anyhow::ensure!(Instant::now() < deadline, "no answer within 5 minutes");
        tokio::time::sleep(Duration::from_millis(10)).await;
        Ok(())
    };
    while client.health().await.is_err() {
        poll().await?;
    }
    let health_s = started.elapsed().as_secs_f64();
    let Some((_, probe)) = probe else {
        return Ok((health_s, health_s));
    };
    let payload = serde_json::json!({"amount": 1250, "currency": "EUR"});
    loop {
        match client.allocate(&probe.allocation.key, &payload).await {
            Ok(a) if a.replay && a.allocation.txn_id == probe.allocation.txn_id => {
                return Ok((health_s, started.elapsed().as_secs_f64()));
            }
            Ok(a) => anyhow::bail!(
                "the probe's replay answered replay={} txn_id={} (was {})",
                a.replay,
                a.allocation.txn_id,
                probe.allocation.txn_id
            ),
            Err(_) => poll().await?,
        }
    }
}

/// Bytes a directory tree takes on disk (allocated blocks, as `du`).
fn disk_bytes(dir: &Path) -> std::io::Result<u64> {
    use std::os::unix::fs::MetadataExt;
    let mut total = 0;
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let meta = entry.metadata()?;
        total += if meta.is_dir() {
            disk_bytes(&entry.path())?
        } else {
            meta.blocks() * 512
        };
    }
    Ok(total)
}

fn print_table(runs: &[Run]) {
    let mut header = format!("{:<44}", "");
    for n in 1..=runs.len() {
        header += &format!(" {:>9}", format!("run {n}"));
    }
    println!("\n{header} {:>9}  target", "median");
    let row = |name: &str, f: &dyn Fn(&Run) -> f64, digits: usize, target: &str| {
        let mut line = format!("{name:<44}");
        for r in runs {
            line += &format!(" {:>9.digits$}", f(r));
        }
        line += &format!(" {:>9.digits$}", median(runs.iter().map(f)));
        println!("{line}  {target}");
    };
    let tokens = median(runs.iter().map(|r| r.tokens as f64));
    row("tokens held", &|r| r.tokens as f64, 0, "");
    row("load rate, allocations/s", &|r| r.rate, 0, "");
    row("load p99, ms", &|r| r.p99_ms, 2, "");
    row("idle RSS, MiB", &|r| r.idle_rss as f64 / 1048576.0, 1, "");
    let rss = median(runs.iter().map(|r| r.rss_per_token));
    row(
        "RSS per token over the idle node, B",
        &|r| r.rss_per_token,
        0,
        &verdict(rss <= 256.0, "<= 256"),
    );
    row("disk per token, B", &|r| r.disk_per_token, 0, "");
    let disk = median(runs.iter().map(|r| r.settled_disk_per_token));
    row(
        "disk per token after SIGTERM and restart, B",
        &|r| r.settled_disk_per_token,
        0,
        &verdict(disk <= 256.0, "<= 256"),
    );
    for (name, pick) in [
        ("SIGTERM", (|r: &Run| &r.term) as fn(&Run) -> &Restart),
        ("SIGKILL", |r: &Run| &r.kill),
    ] {
        row(
            &format!("{name}: old process gone, s"),
            &|r| pick(r).stop_s,
            2,
            "",
        );
        row(
            &format!("{name}: start until /v1/health, s"),
            &|r| pick(r).health_s,
            2,
            "",
        );
        let replay = median(runs.iter().map(|r| pick(r).replay_s));
        let target = if tokens >= 9_000_000.0 {
            verdict(replay <= 10.0, "<= 10 s at 10M")
        } else {
            String::new()
        };
        row(
            &format!("{name}: start until the probe replays, s"),
            &|r| pick(r).replay_s,
            2,
            &target,
        );
    }
}

fn verdict(met: bool, target: &str) -> String {
    format!("{target}: {}", if met { "met" } else { "missed" })
}
