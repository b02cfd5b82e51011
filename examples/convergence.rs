//! Convergence after a healed partition, measured on three real `oncemesh`
//! processes on loopback (prints its figures; not a test).
//!
//! ```text
//! cargo build --release --bin oncemesh --example convergence
//! target/release/examples/convergence --keys 10000 --shared 100 --runs 3
//! ```
//!
//! Every node is started with the other two as `--peer`, each address
//! pointing at a TCP proxy inside this program (one per ordered pair) that
//! forwards to the real listen port. One run:
//!
//! 1. start the nodes, wait until every node sees both peers connected;
//! 2. cut every proxy (live connections reset, new ones refused) and wait
//!    until every node sees both peers disconnected;
//! 3. allocate `--keys` unique keys on each node over HTTP (`--clients`
//!    concurrent clients per node, all nodes at once), then `--shared` keys
//!    on all three nodes (same key, same payload: a customer retry that hit
//!    every region; a conflict because they are different transactions);
//! 4. heal every proxy and measure, polling each node every `--poll-ms`,
//!    the time until its `GET /v1/health` reports `ledger.keys` = 3K+S and its
//!    `GET /v1/conflicts` lists exactly the S shared keys; also the bytes the
//!    proxies forwarded from heal to convergence, the first reconnection after
//!    heal, and the CPU time each node process used meanwhile.
//!
//! The `oncemesh` binary is `--bin`, or the one next to this example's own
//! directory (`target/release/oncemesh` for `target/release/examples/convergence`).

use clap::Parser;
use serde_json::Value;
use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::process::{Child, Command};
use tokio::sync::watch;

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
            "median of {} runs: converged {:.3} s after heal ({:.3} s after first reconnect), {:.1} bytes/allocation, partitioned allocation {:.0}/s",
            results.len(),
            med(&|r| r.converged_s),
            med(&|r| r.converged_s - r.reconnect_s),
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
    per_node_s: Vec<f64>,
    converged_s: f64,
    bytes: u64,
    cpu_s: Vec<f64>,
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
            "run {run}: first reconnect {:.3} s after heal; converged {:.3} s after heal (per node: {}); {:.3} s after reconnect",
            self.reconnect_s,
            self.converged_s,
            self.per_node_s
                .iter()
                .map(|s| format!("{s:.3}"))
                .collect::<Vec<_>>()
                .join(", "),
            self.converged_s - self.reconnect_s,
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
    }
    fn json(&self) -> Value {
        serde_json::json!({
            "keys_per_node": self.keys, "shared": self.shared,
            "allocations": self.allocations(), "allocate_s": self.allocate_s,
            "allocation_rate": self.allocation_rate, "errors": self.errors,
            "reconnect_s": self.reconnect_s, "converged_s": self.converged_s,
            "per_node_s": self.per_node_s, "bytes": self.bytes,
            "bytes_per_allocation": self.bytes_per_allocation(), "cpu_s": self.cpu_s,
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
    let http = reqwest::Client::builder()
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
    let mut proxies: Vec<Arc<Proxy>> = Vec::new();
    let mut peer_args: Vec<Vec<String>> = vec![Vec::new(); 3];
    for i in 0..3 {
        for j in 0..3 {
            if i == j {
                continue;
            }
            let target: SocketAddr = format!("127.0.0.1:{}", listen[j]).parse()?;
            let proxy = Proxy::start(target).await?;
            peer_args[i].push(format!(
                "/ip4/127.0.0.1/tcp/{}/p2p/{}",
                proxy.addr.port(),
                ids[j]
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
        p.cut().await;
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
    // Let the write queues drain before the clock starts.
    tokio::time::sleep(Duration::from_millis(500)).await;

    // Heal and measure.
    let bytes_before: u64 = proxies.iter().map(|p| p.bytes()).sum();
    let cpu_before: Vec<f64> = nodes.iter().map(|n| cpu_seconds(n.pid)).collect();
    let healed = Instant::now();
    for p in &proxies {
        p.heal();
    }
    let shared_set: BTreeSet<String> = shared.iter().cloned().collect();
    let mut per_node: Vec<Option<f64>> = vec![None; 3];
    let mut cpu_after = cpu_before.clone();
    let mut bytes_at = 0;
    let mut last_report = Instant::now();
    while per_node.iter().any(Option::is_none) {
        if healed.elapsed() > timeout {
            let status = status_lines(&http, &nodes).await;
            anyhow::bail!(
                "not converged {} s after heal:\n{status}",
                timeout.as_secs()
            );
        }
        for (i, node) in nodes.iter().enumerate() {
            if per_node[i].is_some() {
                continue;
            }
            if converged(&http, &node.http, want_keys, &shared_set).await {
                per_node[i] = Some(healed.elapsed().as_secs_f64());
                cpu_after[i] = cpu_seconds(node.pid);
                bytes_at = proxies.iter().map(|p| p.bytes()).sum();
            }
        }
        if last_report.elapsed() > Duration::from_secs(5) {
            last_report = Instant::now();
            eprintln!(
                "[{:>5.1}s after heal] {}",
                healed.elapsed().as_secs_f64(),
                status_lines(&http, &nodes).await.replace('\n', " | ")
            );
        }
        tokio::time::sleep(Duration::from_millis(args.poll_ms)).await;
    }
    let per_node_s: Vec<f64> = per_node
        .into_iter()
        .map(Option::unwrap_or_default)
        .collect();
    let converged_s = per_node_s.iter().copied().fold(0.0, f64::max);
    let reconnect_s = proxies
        .iter()
        .filter_map(|p| p.first_accept_after_heal())
        .map(|t| t.saturating_duration_since(healed).as_secs_f64())
        .fold(f64::INFINITY, f64::min);
    let cpu_s = cpu_after
        .iter()
        .zip(&cpu_before)
        .map(|(a, b)| a - b)
        .collect();
    for mut n in nodes {
        let _ = n.child.kill().await;
    }
    Ok(RunResult {
        keys: args.keys,
        shared: args.shared,
        allocate_s,
        allocation_rate: (3 * args.keys + 3 * args.shared) as f64 / allocate_s,
        reconnect_s,
        per_node_s,
        converged_s,
        bytes: bytes_at - bytes_before,
        cpu_s,
        errors,
    })
}

fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
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

async fn converged(
    http: &reqwest::Client,
    node: &str,
    want_keys: u64,
    shared: &BTreeSet<String>,
) -> bool {
    let Ok(health) = get_json(http, &format!("{node}/v1/health")).await else {
        return false;
    };
    if health["ledger"]["keys"].as_u64() != Some(want_keys) {
        return false;
    }
    let Ok(report) = get_json(http, &format!("{node}/v1/conflicts")).await else {
        return false;
    };
    let keys: BTreeSet<String> = report["conflicts"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|c| c["key"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    let complete = report["conflicts"].as_array().is_some_and(|a| {
        a.iter()
            .all(|c| c["allocations"].as_array().map_or(0, Vec::len) == 3)
    });
    &keys == shared && complete
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
            let payload = serde_json::json!({"amount": 1250, "currency": "EUR"});
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed) as usize;
                let Some(key) = keys.get(i) else { break };
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

/// A TCP forwarder that can be cut (live connections reset, new ones
/// refused) and healed, counting the bytes it forwards.
struct Proxy {
    addr: SocketAddr,
    cut: AtomicBool,
    epoch: watch::Sender<u64>,
    bytes: AtomicU64,
    healed_at: Mutex<Option<Instant>>,
    first_accept: Mutex<Option<Instant>>,
}

impl Proxy {
    async fn start(target: SocketAddr) -> anyhow::Result<Arc<Self>> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let proxy = Arc::new(Self {
            addr: listener.local_addr()?,
            cut: AtomicBool::new(false),
            epoch: watch::channel(0).0,
            bytes: AtomicU64::new(0),
            healed_at: Mutex::new(None),
            first_accept: Mutex::new(None),
        });
        let me = proxy.clone();
        tokio::spawn(async move {
            loop {
                let Ok((inbound, _)) = listener.accept().await else {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                };
                let epoch = me.epoch.subscribe();
                if me.cut.load(Ordering::SeqCst) {
                    reset(inbound);
                    continue;
                }
                {
                    let healed = *me.healed_at.lock().unwrap_or_else(|p| p.into_inner());
                    let mut first = me.first_accept.lock().unwrap_or_else(|p| p.into_inner());
                    if healed.is_some() && first.is_none() {
                        *first = Some(Instant::now());
                    }
                }
                tokio::spawn(forward(inbound, target, me.clone(), epoch));
            }
        });
        Ok(proxy)
    }

    async fn cut(&self) {
        self.cut.store(true, Ordering::SeqCst);
        self.epoch.send_modify(|e| *e += 1);
        // Connection tasks see the epoch change and reset both sides.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    fn heal(&self) {
        *self.healed_at.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
        self.cut.store(false, Ordering::SeqCst);
    }

    fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }

    fn first_accept_after_heal(&self) -> Option<Instant> {
        *self.first_accept.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn reset(stream: TcpStream) {
    let _ = stream.set_zero_linger();
    drop(stream);
}

async fn forward(
    mut inbound: TcpStream,
    target: SocketAddr,
    proxy: Arc<Proxy>,
    mut epoch: watch::Receiver<u64>,
) {
    let Ok(mut outbound) = TcpStream::connect(target).await else {
        return reset(inbound);
    };
    let _ = inbound.set_nodelay(true);
    let _ = outbound.set_nodelay(true);
    let cut = {
        let (ri, wi) = inbound.split();
        let (ro, wo) = outbound.split();
        let both = async { tokio::try_join!(pipe(ri, wo, &proxy), pipe(ro, wi, &proxy)) };
        tokio::select! {
            _ = both => false,
            _ = epoch.changed() => true,
        }
    };
    if cut {
        reset(inbound);
        reset(outbound);
    }
}

async fn pipe<R, W>(mut from: R, mut to: W, proxy: &Proxy) -> std::io::Result<()>
where
    R: tokio::io::AsyncRead + Unpin,
    W: tokio::io::AsyncWrite + Unpin,
{
    use tokio::io::AsyncReadExt;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = from.read(&mut buf).await?;
        if n == 0 {
            return to.shutdown().await;
        }
        proxy.bytes.fetch_add(n as u64, Ordering::Relaxed);
        to.write_all(&buf[..n]).await?;
    }
}
