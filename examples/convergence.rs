//! Convergence after a healed partition, measured on three real `oncemesh`
//! processes on loopback (prints its figures; not a test).
//!
//! ```text
//! cargo build --release --bin oncemesh --example convergence
//! target/release/examples/convergence --keys 10000 --shared 100 --runs 3
//! ```
//!
//! Every node is started with the other two as `--peer`, each address
//! pointing at a relay ([`oncemesh::drill::Relay`], one per ordered pair)
//! inside this program that forwards to the real listen port. One run:
//!
//! 1. start the nodes, wait until every node sees both peers connected;
//! 2. cut every proxy (live connections reset, new ones refused) and wait
//!    until every node sees both peers disconnected;
//! 3. allocate `--keys` unique keys on each node over HTTP (`--clients`
//!    concurrent clients per node, all nodes at once), then `--shared` keys
//!    on all three nodes (same key, same payload: a customer retry that hit
//!    every region; a conflict because they are different transactions);
//! 4. heal every proxy and measure, polling each node every `--poll-ms`,
//!    the time until its `GET /v1/conflicts` lists exactly the S shared keys
//!    (each with 3 allocations: "every conflict visible"), then until that
//!    still holds and its `GET /v1/health` reports
//!    `ledger.keys` = 3K+S (health is only asked once the cheap conflict report
//!    is complete: it counts every key under every shard lock); also the bytes
//!    the proxies forwarded from heal to convergence, when the proxies first
//!    forwarded a connection again, the CPU time each node used meanwhile, the
//!    CPU other processes used (to reject disturbed runs), and node RSS;
//! 5. then keep polling until every node's `GET /v1/conflicts?state=open` is
//!    empty: each loser compensated by its own node, and every node has seen
//!    it (`resolved`).
//!
//! The `oncemesh` binary is `--bin`, or the one next to this example's own
//! directory (`target/release/oncemesh` for `target/release/examples/convergence`).

use clap::Parser;
use oncemesh::drill::Relay;
use serde_json::Value;
use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

#[derive(Parser, Debug, Clone)]
#[command(about = "Convergence of three oncemesh nodes after a healed partition")]
struct Args {
    /// The oncemesh binary (default: next to this example's directory).
    #[arg(long)]
    bin: Option<PathBuf>,
    /// Unique keys allocated on each node during the partition (K).
    #[arg(long, default_value_t = 10_000)]
    keys: usize,
    /// Keys allocated on all three nodes during the partition (S).
    #[arg(long, default_value_t = 100)]
    shared: usize,
    /// Concurrent HTTP clients per node while allocating.
    #[arg(long, default_value_t = 50)]
    clients: usize,
    /// Independent runs (fresh nodes each); the median is printed.
    #[arg(long, default_value_t = 1)]
    runs: usize,
    /// Poll period of each node's health and conflicts, ms.
    #[arg(long, default_value_t = 25)]
    poll_ms: u64,
    /// Give up on convergence after this many seconds.
    #[arg(long, default_value_t = 600)]
    timeout: u64,
    /// Extra argument for every `oncemesh run` (repeatable), e.g. --node-arg=--sync-interval=200ms.
    #[arg(long = "node-arg", allow_hyphen_values = true)]
    node_args: Vec<String>,
    /// Keep the node data dirs (with each node's log, node.log) and print where.
    #[arg(long)]
    keep: bool,
    /// Also print each run's figures as one JSON object per line.
    #[arg(long)]
    json: bool,
    /// Print a timeline after heal to stderr at every poll (complete conflicts
    /// per node, bytes forwarded); without it, every 5 s.
    #[arg(long)]
    trace: bool,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let bin = match &args.bin {
        Some(b) => b.clone(),
        None => default_binary()?,
    };
    anyhow::ensure!(
        bin.exists(),
        "oncemesh binary not found at {} (build it: cargo build --release --bin oncemesh, or pass --bin)",
        bin.display()
    );
    println!(
        "convergence: 3 nodes, K={} unique keys per node, S={} shared keys, {} clients per node, binary {}",
        args.keys,
        args.shared,
        args.clients,
        bin.display()
    );
    let mut results = Vec::new();
    for run in 1..=args.runs {
        let result = one_run(&args, &bin, run).await?;
        result.print(run);
        if args.json {
            println!("{}", result.json());
        }
        results.push(result);
    }
    if results.len() > 1 {
        let med = |f: &dyn Fn(&RunResult) -> f64| {
            let mut v: Vec<f64> = results.iter().map(f).collect();
            v.sort_by(f64::total_cmp);
            v[v.len() / 2]
        };
        println!(
            "median of {} runs: every conflict visible on every node {:.3} s after heal, converged {:.3} s after heal ({:.3} s after first reconnect), compensated {:.3} s, {:.1} bytes/allocation, partitioned allocation {:.0}/s",
            results.len(),
            med(&|r| r.conflicts_visible_s),
            med(&|r| r.converged_s),
            med(&|r| r.converged_s - r.reconnect_s),
            med(&|r| r.resolved_s),
            med(&|r| r.bytes_per_allocation()),
            med(&|r| r.allocation_rate),
        );
    }
    Ok(())
}

fn default_binary() -> anyhow::Result<PathBuf> {
    let me = std::env::current_exe()?;
    let dir = me
        .parent()
        .ok_or_else(|| anyhow::anyhow!("no parent dir of {}", me.display()))?;
    let name = format!("oncemesh{}", std::env::consts::EXE_SUFFIX);
    // target/<profile>/examples/convergence -> target/<profile>/oncemesh
    for candidate in [dir.join(&name), dir.join("..").join(&name)] {
        if candidate.exists() {
            return Ok(candidate);
        }
    }
    Ok(dir.join("..").join(name))
}

struct RunResult {
    keys: usize,
    shared: usize,
    allocate_s: f64,
    allocation_rate: f64,
    reconnect_s: f64,
    all_pairs_s: f64,
    per_node_s: Vec<f64>,
    converged_s: f64,
    /// Every node's conflict report lists exactly the shared keys, each
    /// with its three allocations (the issue's target; the keys may still
    /// be arriving).
    conflicts_visible_s: f64,
    /// Every conflict compensated, as every node reports it.
    resolved_s: f64,
    bytes: u64,
    cpu_s: Vec<f64>,
    idle_cpu_s: Vec<f64>,
    own_cpu_s: f64,
    other_cpu_s: f64,
    rss_mib: Vec<u64>,
    errors: u64,
}

impl RunResult {
    fn allocations(&self) -> usize {
        3 * self.keys + 3 * self.shared
    }
    fn bytes_per_allocation(&self) -> f64 {
        self.bytes as f64 / self.allocations() as f64
    }
    fn print(&self, run: usize) {
        println!(
            "run {run}: allocated {} in {:.2} s ({:.0}/s over 3 partitioned nodes, {} errors)",
            self.allocations(),
            self.allocate_s,
            self.allocation_rate,
            self.errors
        );
        println!(
            "run {run}: first reconnect {:.3} s after heal, every pair reconnected {:.3} s; converged {:.3} s after heal (per node: {}); {:.3} s after first reconnect",
            self.reconnect_s,
            self.all_pairs_s,
            self.converged_s,
            self.per_node_s
                .iter()
                .map(|s| format!("{s:.3}"))
                .collect::<Vec<_>>()
                .join(", "),
            self.converged_s - self.reconnect_s,
        );
        println!(
            "run {run}: every conflict visible on every node {:.3} s after heal; every conflict compensated, on every node's report, {:.3} s after heal",
            self.conflicts_visible_s, self.resolved_s
        );
        println!(
            "run {run}: {} bytes through the proxies = {:.1} bytes per allocation ({:.1} per allocation copy delivered); node CPU during convergence {} s",
            self.bytes,
            self.bytes_per_allocation(),
            self.bytes_per_allocation() / 2.0,
            self.cpu_s
                .iter()
                .map(|s| format!("{s:.2}"))
                .collect::<Vec<_>>()
                .join(" + "),
        );
        println!(
            "run {run}: node RSS after convergence {:?} MiB; this program (proxies, polls) used {:.2} CPU s and other processes {:.2} meanwhile; CPU of each partitioned node while idle before heal: {} s/s",
            self.rss_mib,
            self.own_cpu_s,
            self.other_cpu_s,
            self.idle_cpu_s
                .iter()
                .map(|s| format!("{s:.2}"))
                .collect::<Vec<_>>()
                .join(", "),
        );
    }
    fn json(&self) -> Value {
        serde_json::json!({
            "keys_per_node": self.keys, "shared": self.shared,
            "allocations": self.allocations(), "allocate_s": self.allocate_s,
            "allocation_rate": self.allocation_rate, "errors": self.errors,
            "reconnect_s": self.reconnect_s, "all_pairs_s": self.all_pairs_s,
            "converged_s": self.converged_s, "conflicts_visible_s": self.conflicts_visible_s,
            "resolved_s": self.resolved_s,
            "per_node_s": self.per_node_s, "bytes": self.bytes,
            "bytes_per_allocation": self.bytes_per_allocation(), "cpu_s": self.cpu_s,
            "idle_cpu_per_s": self.idle_cpu_s, "own_cpu_s": self.own_cpu_s, "other_cpu_s": self.other_cpu_s,
            "rss_mib_after": self.rss_mib,
        })
    }
}

struct NodeProc {
    child: Child,
    pid: u32,
    http: String,
    peer_id: String,
    _dir: Option<tempfile::TempDir>,
    dir: PathBuf,
}

async fn one_run(args: &Args, bin: &Path, run: usize) -> anyhow::Result<RunResult> {
    let http = oncemesh::tls::http_client()
        .pool_max_idle_per_host(args.clients)
        .tcp_nodelay(true)
        .timeout(Duration::from_secs(120))
        .build()?;
    // Identities, ports, proxies.
    let mut dirs = Vec::new();
    let mut ids = Vec::new();
    for i in 0..3 {
        let dir = tempfile::Builder::new()
            .prefix(&format!("oncemesh-conv-{run}-{i}-"))
            .tempdir()?;
        let out = Command::new(bin)
            .args(["id", "--data-dir"])
            .arg(dir.path())
            .output()
            .await?;
        anyhow::ensure!(out.status.success(), "oncemesh id failed: {:?}", out);
        ids.push(String::from_utf8(out.stdout)?.trim().to_owned());
        dirs.push(dir);
    }
    let listen: Vec<u16> = (0..3).map(|_| free_port()).collect::<Result<_, _>>()?;
    let http_ports: Vec<u16> = (0..3).map(|_| free_port()).collect::<Result<_, _>>()?;
    // proxies[i][j]: node i dials node j through it.
    let mut proxies: Vec<Relay> = Vec::new();
    let mut peer_args: Vec<Vec<String>> = vec![Vec::new(); 3];
    for (i, args_of_i) in peer_args.iter_mut().enumerate() {
        for (j, (port, id)) in listen.iter().zip(&ids).enumerate() {
            if i == j {
                continue;
            }
            let target: SocketAddr = format!("127.0.0.1:{port}").parse()?;
            let proxy = Relay::start(target)?;
            args_of_i.push(format!(
                "/ip4/127.0.0.1/tcp/{}/p2p/{id}",
                proxy.addr().port()
            ));
            proxies.push(proxy);
        }
    }
    // Start the nodes.
    let mut nodes = Vec::new();
    for (i, dir) in dirs.into_iter().enumerate() {
        let log = std::fs::File::create(dir.path().join("node.log"))?;
        let mut cmd = Command::new(bin);
        cmd.arg("run")
            .args(["--region", ["sgp", "lon", "nyc"][i]])
            .arg("--data-dir")
            .arg(dir.path())
            .args(["--listen", &format!("/ip4/127.0.0.1/tcp/{}", listen[i])])
            .args(["--http", &format!("127.0.0.1:{}", http_ports[i])]);
        for p in &peer_args[i] {
            cmd.args(["--peer", p]);
        }
        cmd.args(&args.node_args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log)
            .kill_on_drop(true);
        let mut child = cmd.spawn()?;
        let pid = child.id().unwrap_or(0);
        let stdout = child.stdout.take().expect("piped stdout");
        let mut lines = BufReader::new(stdout).lines();
        let banner = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
            .await
            .map_err(|_| anyhow::anyhow!("node {i} printed no start line in 30 s"))??
            .unwrap_or_default();
        anyhow::ensure!(
            banner.starts_with("oncemesh node started"),
            "node {i} did not start: {banner:?} (log: {})",
            dir.path().join("node.log").display()
        );
        // Keep draining stdout so the node never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        let path = dir.path().to_owned();
        nodes.push(NodeProc {
            child,
            pid,
            http: format!("http://127.0.0.1:{}", http_ports[i]),
            peer_id: ids[i].clone(),
            _dir: if args.keep {
                let _ = dir.keep();
                None
            } else {
                Some(dir)
            },
            dir: path,
        });
    }
    if args.keep {
        for (i, n) in nodes.iter().enumerate() {
            eprintln!(
                "run {run}: node {i} ({}) data and log in {}",
                n.peer_id,
                n.dir.display()
            );
        }
    }
    let timeout = Duration::from_secs(args.timeout);
    wait_peers(&http, &nodes, 2, Duration::from_secs(60)).await?;
    for p in &proxies {
        p.cut();
    }
    wait_peers(&http, &nodes, 0, Duration::from_secs(60)).await?;

    // Allocate during the partition.
    let prefix = format!("cv{:010x}", rand::random::<u64>() >> 24);
    let errors = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut jobs = Vec::new();
    for (i, node) in nodes.iter().enumerate() {
        let keys: Vec<String> = (0..args.keys)
            .map(|k| format!("{prefix}-n{i}-{k}"))
            .collect();
        jobs.push(tokio::spawn(allocate_all(
            http.clone(),
            node.http.clone(),
            keys,
            args.clients,
            errors.clone(),
        )));
    }
    for job in jobs {
        job.await?;
    }
    let shared: Vec<String> = (0..args.shared)
        .map(|k| format!("{prefix}-shared-{k}"))
        .collect();
    let mut jobs = Vec::new();
    for node in &nodes {
        jobs.push(tokio::spawn(allocate_all(
            http.clone(),
            node.http.clone(),
            shared.clone(),
            args.clients,
            errors.clone(),
        )));
    }
    for job in jobs {
        job.await?;
    }
    let allocate_s = started.elapsed().as_secs_f64();
    let errors = errors.load(Ordering::Relaxed);
    let want_keys = (3 * args.keys + args.shared) as u64;
    for node in &nodes {
        let h = get_json(&http, &format!("{}/v1/health", node.http)).await?;
        let keys = h["ledger"]["keys"].as_u64().unwrap_or(0);
        anyhow::ensure!(
            keys == (args.keys + args.shared) as u64,
            "{} holds {keys} keys before heal; expected {} (partition leaked, or allocations failed: {errors} errors)",
            node.http,
            args.keys + args.shared
        );
    }
    // Let the write queues drain before the clock starts, then see what the
    // partitioned nodes spend while nobody talks to them.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let idle_before: Vec<f64> = nodes.iter().map(|n| cpu_seconds(n.pid)).collect();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let idle_cpu_s: Vec<f64> = nodes
        .iter()
        .zip(&idle_before)
        .map(|(n, b)| (cpu_seconds(n.pid) - b) / 2.0)
        .collect();

    // Heal and measure.
    let bytes_before: u64 = proxies.iter().map(|p| p.bytes_forwarded()).sum();
    let cpu_before: Vec<f64> = nodes.iter().map(|n| cpu_seconds(n.pid)).collect();
    let machine_before = machine_busy_seconds();
    let own_before = cpu_seconds(std::process::id());
    let healed = Instant::now();
    for p in &proxies {
        p.heal();
    }
    let shared_set: BTreeSet<String> = shared.iter().cloned().collect();
    // Each node is polled on its own: answers slow down while a node applies
    // what arrives (30-120 ms each), and polling the nodes one after another
    // charged every node's time with the others' answers.
    let poll = Duration::from_millis(args.poll_ms);
    let outcomes = {
        let checks = nodes.iter().map(|node| {
            let (http, shared_set) = (&http, &shared_set);
            async move {
                let visible = seconds_until(healed, timeout, poll, async || {
                    complete_conflicts(http, &node.http).await.as_ref() == Some(shared_set)
                })
                .await?;
                let at = seconds_until(healed, timeout, poll, async || {
                    converged(http, &node.http, want_keys, shared_set).await
                })
                .await?;
                Some((visible, at, cpu_seconds(node.pid)))
            }
        });
        let mut all_checks = std::pin::pin!(futures::future::join_all(checks));
        let report_every = if args.trace {
            poll
        } else {
            Duration::from_secs(5)
        };
        loop {
            tokio::select! {
                outcomes = &mut all_checks => break outcomes,
                _ = tokio::time::sleep(report_every) => {
                    let bytes: u64 = proxies.iter().map(|p| p.bytes_forwarded()).sum();
                    eprintln!(
                        "[{:>6.3}s after heal] complete {} bytes={}",
                        healed.elapsed().as_secs_f64(),
                        conflict_counts(&http, &nodes).await,
                        bytes - bytes_before
                    );
                }
            }
        }
    };
    let bytes_at: u64 = proxies.iter().map(|p| p.bytes_forwarded()).sum();
    let mut per_node = Vec::with_capacity(3);
    let mut cpu_after = Vec::with_capacity(3);
    let mut conflicts_visible_s: f64 = 0.0;
    for outcome in outcomes {
        let Some((visible, at, cpu)) = outcome else {
            let status = status_lines(&http, &nodes).await;
            anyhow::bail!(
                "not converged {} s after heal:\n{status}",
                timeout.as_secs()
            );
        };
        per_node.push(at);
        cpu_after.push(cpu);
        conflicts_visible_s = conflicts_visible_s.max(visible);
    }
    // This program's proxies and polls share the nodes' cores.
    let own_cpu_s = cpu_seconds(std::process::id()) - own_before;
    // Everything the machine did meanwhile that was neither a node nor this program.
    let other_cpu_s = machine_busy_seconds()
        - machine_before
        - own_cpu_s
        - nodes
            .iter()
            .zip(&cpu_before)
            .map(|(n, b)| cpu_seconds(n.pid) - b)
            .sum::<f64>();
    let per_node_s = per_node;
    let converged_s = per_node_s.iter().copied().fold(0.0, f64::max);
    let resolved = nodes.iter().map(|node| {
        seconds_until(healed, timeout, poll, async || {
            no_open_conflicts(&http, &node.http).await
        })
    });
    let resolved_s = futures::future::join_all(resolved)
        .await
        .into_iter()
        .try_fold(0.0, |latest: f64, at| at.map(|at| latest.max(at)))
        .ok_or_else(|| {
            anyhow::anyhow!("conflicts still open {} s after heal", timeout.as_secs())
        })?;
    let accepts: Vec<f64> = proxies
        .iter()
        .map(|p| {
            p.reconnected_at().map_or(f64::NAN, |t| {
                t.saturating_duration_since(healed).as_secs_f64()
            })
        })
        .collect();
    let reconnect_s = accepts.iter().copied().fold(f64::INFINITY, f64::min);
    // A pair (i, j) is reconnected once either direction's proxy forwarded a connection.
    let all_pairs_s = [(0, 2), (1, 4), (3, 5)]
        .iter()
        .map(|&(a, b)| accepts[a].min(accepts[b]))
        .fold(0.0, f64::max);
    let cpu_s = cpu_after
        .iter()
        .zip(&cpu_before)
        .map(|(a, b)| a - b)
        .collect();
    let rss_mib: Vec<u64> = nodes.iter().map(|n| rss_mib(n.pid)).collect();
    for mut n in nodes {
        let _ = n.child.kill().await;
    }
    Ok(RunResult {
        keys: args.keys,
        shared: args.shared,
        allocate_s,
        allocation_rate: (3 * args.keys + 3 * args.shared) as f64 / allocate_s,
        reconnect_s,
        all_pairs_s,
        per_node_s,
        converged_s,
        conflicts_visible_s,
        resolved_s,
        bytes: bytes_at - bytes_before,
        cpu_s,
        idle_cpu_s,
        own_cpu_s,
        other_cpu_s,
        rss_mib,
        errors,
    })
}

/// Busy CPU seconds of the whole machine since boot (Linux /proc/stat; 0 elsewhere).
fn machine_busy_seconds() -> f64 {
    let Ok(stat) = std::fs::read_to_string("/proc/stat") else {
        return 0.0;
    };
    let Some(cpu) = stat.lines().next() else {
        return 0.0;
    };
    // user nice system idle iowait irq softirq steal: busy = all but idle and iowait.
    let ticks: Vec<u64> = cpu
        .split_whitespace()
        .skip(1)
        .take(8)
        .filter_map(|t| t.parse().ok())
        .collect();
    let busy: u64 = ticks
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != 3 && *i != 4)
        .map(|(_, t)| t)
        .sum();
    busy as f64 / 100.0
}

fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Resident memory of a process, MiB (Linux /proc; 0 elsewhere).
fn rss_mib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find(|l| l.starts_with("VmRSS"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb / 1024)
}

/// utime + stime of a process, seconds (Linux /proc; 0 elsewhere).
fn cpu_seconds(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    // Fields after the command name (which may contain spaces) start at ") ".
    let Some(rest) = stat.rsplit_once(") ").map(|(_, r)| r) else {
        return 0.0;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // state is field 3; utime and stime are fields 14 and 15 (1-based).
    let ticks: u64 = [11, 12]
        .iter()
        .filter_map(|&i| fields.get(i).and_then(|f| f.parse::<u64>().ok()))
        .sum();
    ticks as f64 / 100.0
}

async fn get_json(http: &reqwest::Client, url: &str) -> anyhow::Result<Value> {
    Ok(http
        .get(url)
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?)
}

async fn wait_peers(
    http: &reqwest::Client,
    nodes: &[NodeProc],
    want_connected: usize,
    budget: Duration,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + budget;
    for node in nodes {
        loop {
            let peers = get_json(http, &format!("{}/v1/peers", node.http)).await?;
            let connected = peers["peers"]
                .as_array()
                .map(|a| a.iter().filter(|p| p["connected"] == true).count())
                .unwrap_or(0);
            if connected == want_connected {
                break;
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "{}: {connected} peers connected, waiting for {want_connected}",
                node.http
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    Ok(())
}

/// Whether `node` holds every key and reports exactly the shared keys as
/// conflicts. The conflict report is cheap (it is as long as the conflicts)
/// and checked first; `/v1/health` counts every key under every shard lock, so
/// it is only asked once the conflicts are complete, to keep the poller from
/// slowing the nodes it measures.
async fn converged(
    http: &reqwest::Client,
    node: &str,
    want_keys: u64,
    shared: &BTreeSet<String>,
) -> bool {
    if complete_conflicts(http, node).await.as_ref() != Some(shared) {
        return false;
    }
    let Ok(health) = get_json(http, &format!("{node}/v1/health")).await else {
        return false;
    };
    health["ledger"]["keys"].as_u64() == Some(want_keys)
}

/// Polls `check` every `poll` until it holds and returns the seconds since
/// `healed` by then; `None` once `timeout` has passed.
async fn seconds_until(
    healed: Instant,
    timeout: Duration,
    poll: Duration,
    mut check: impl AsyncFnMut() -> bool,
) -> Option<f64> {
    while healed.elapsed() <= timeout {
        if check().await {
            return Some(healed.elapsed().as_secs_f64());
        }
        tokio::time::sleep(poll).await;
    }
    None
}

/// Whether the node reports no open conflict (all compensated).
async fn no_open_conflicts(http: &reqwest::Client, node: &str) -> bool {
    get_json(http, &format!("{node}/v1/conflicts?state=open"))
        .await
        .is_ok_and(|r| r["conflicts"].as_array().is_some_and(Vec::is_empty))
}

/// Keys in the node's conflict report that have all three allocations.
async fn complete_conflicts(http: &reqwest::Client, node: &str) -> Option<BTreeSet<String>> {
    let report = get_json(http, &format!("{node}/v1/conflicts")).await.ok()?;
    Some(
        report["conflicts"]
            .as_array()?
            .iter()
            .filter(|c| c["allocations"].as_array().map_or(0, Vec::len) == 3)
            .filter_map(|c| c["key"].as_str().map(str::to_owned))
            .collect(),
    )
}

async fn conflict_counts(http: &reqwest::Client, nodes: &[NodeProc]) -> String {
    let mut out = Vec::new();
    for n in nodes {
        let count = complete_conflicts(http, &n.http)
            .await
            .map_or(-1, |c| c.len() as i64);
        out.push(format!("conflicts={count}"));
    }
    out.join(" ")
}

async fn status_lines(http: &reqwest::Client, nodes: &[NodeProc]) -> String {
    let mut out = Vec::new();
    for n in nodes {
        let line = match get_json(http, &format!("{}/v1/health", n.http)).await {
            Ok(h) => format!(
                "{}: keys {} conflicts {} peers connected {}",
                n.http, h["ledger"]["keys"], h["ledger"]["conflicts"], h["peers"]["connected"]
            ),
            Err(e) => format!("{}: {e}", n.http),
        };
        out.push(line);
    }
    out.join("\n")
}

/// Allocates every key on one node with `clients` concurrent clients.
async fn allocate_all(
    http: reqwest::Client,
    node: String,
    keys: Vec<String>,
    clients: usize,
    errors: Arc<AtomicU64>,
) {
    let url = format!("{node}/v1/allocations");
    let keys = Arc::new(keys);
    let next = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let (http, url, keys, next, errors) = (
            http.clone(),
            url.clone(),
            keys.clone(),
            next.clone(),
            errors.clone(),
        );
        tasks.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed) as usize;
                let Some(key) = keys.get(i) else { break };
                // Every payment its own payload (a shared key's is the same
                // on every node: a retry), so no two fingerprints repeat and
                // compressed traffic is measured on realistic records.
                let payload = serde_json::json!({"amount": 1250, "currency": "EUR", "order": key});
                let ok = match http
                    .post(&url)
                    .json(&serde_json::json!({"key": key, "payload": payload}))
                    .send()
                    .await
                {
                    Ok(r) => r.status() == reqwest::StatusCode::CREATED,
                    Err(_) => false,
                };
                if !ok {
                    errors.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
}
