//! Convergence after a healed partition, measured on three real `oncemesh`
//! processes (prints its figures; not a test).
//!
//! ```text
//! cargo build --release --bin oncemesh --example convergence
//! target/release/examples/convergence --keys 50000 --shared 100 --runs 3
//! sudo target/release/examples/convergence --keys 50000 --shared 100 --runs 3 --netns
//! ```
//!
//! Every node is started with the other two as `--peer`. Two ways to join
//! and partition them:
//!
//! - on loopback (the default), each `--peer` address pointing at a relay
//!   ([`oncemesh::drill::Relay`], one per ordered pair) inside this program
//!   that forwards to the real listen port; a cut resets the relay's live
//!   connections and refuses new ones;
//! - with `--netns` (root and `ip netns`), each node in a network namespace
//!   of its own, the three joined pairwise by veth links with no relay: the
//!   nodes speak TCP to each other through the kernel only. A cut sets
//!   every link down and resets the TCP connections over it (`ss -K`, as
//!   the relay does; a connection left hanging on a down link would only
//!   die minutes later, and after the heal its retransmission backoff, not
//!   the node, would set the time); a heal sets the links up. Each
//!   namespace also has a veth link to this program's namespace for the
//!   HTTP API only, never cut, with no route beyond it. The namespaces are
//!   deleted at the end (their links with them).
//!
//! One run:
//!
//! 1. start the nodes, wait until every node sees both peers connected, and
//!    read each node's RSS;
//! 2. cut every link and wait until every node sees both peers disconnected;
//! 3. allocate `--keys` unique keys on each node over HTTP (`--clients`
//!    concurrent clients per node, all nodes at once), then `--shared` keys
//!    on all three nodes (same key, same payload: a customer retry that hit
//!    every region; a conflict because they are different transactions);
//! 4. heal every link and measure, polling each node every `--poll-ms`,
//!    the time until its `GET /v1/conflicts` lists exactly the S shared keys
//!    (each with 3 allocations: "every conflict visible"), then until that
//!    still holds and its `GET /v1/health` reports
//!    `ledger.keys` = 3K+S (health is only asked once the cheap conflict report
//!    is complete: it counts every key under every shard lock); also the bytes
//!    the relays forwarded (or the veth links sent, TCP/IP headers and
//!    acknowledgements included) from heal to convergence, when the relays
//!    first forwarded a connection again, the CPU time each node used
//!    meanwhile, and the CPU other processes used (to reject disturbed runs);
//! 5. then keep polling until every node's `GET /v1/conflicts?state=open` is
//!    empty: each loser compensated by its own node, and every node has seen
//!    it (`resolved`), and read each node's RSS again: its growth over step
//!    1, per token the node holds (3K+S).
//!
//! The `oncemesh` binary is `--bin`, or the one next to this example's own
//! directory (`target/release/oncemesh` for `target/release/examples/convergence`).

mod support;

use clap::Parser;
use oncemesh::drill::Relay;
use serde_json::Value;
use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use support::{free_port, median, rss_bytes, sibling_binary, Node};
use tokio::process::Command;

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
    /// Run the nodes in three network namespaces joined by veth links, no
    /// relay (needs root and `ip`).
    #[arg(long)]
    netns: bool,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let bin = args
        .bin
        .clone()
        .map_or_else(|| sibling_binary("oncemesh"), Ok)?;
    println!(
        "convergence: 3 nodes {}, K={} unique keys per node, S={} shared keys, {} clients per node, binary {}",
        if args.netns {
            "in network namespaces joined by veth links"
        } else {
            "on loopback through relays"
        },
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
        let med = |f: &dyn Fn(&RunResult) -> f64| median(results.iter().map(f));
        println!(
            "median of {} runs: every conflict visible on every node {:.3} s after heal, converged {:.3} s after heal ({} s after first reconnect), compensated {:.3} s, {:.1} bytes/allocation, partitioned allocation {:.0}/s, RSS growth per token held {:.0} B (the node that grew most)",
            results.len(),
            med(&|r| r.conflicts_visible_s),
            med(&|r| r.converged_s),
            secs(med(&|r| r.converged_s - r.reconnect_s)),
            med(&|r| r.resolved_s),
            med(&|r| r.bytes_per_allocation()),
            med(&|r| r.allocation_rate),
            med(&|r| r.rss_growth_per_token().fold(0.0, f64::max)),
        );
    }
    Ok(())
}

/// Seconds with three decimals, or `-` for a figure this mode cannot see.
fn secs(s: f64) -> String {
    if s.is_nan() {
        "-".into()
    } else {
        format!("{s:.3}")
    }
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
    /// Each node's RSS once connected, before the load, bytes.
    rss_before: Vec<u64>,
    /// Each node's RSS once every conflict was compensated, bytes.
    rss_after: Vec<u64>,
    errors: u64,
}

impl RunResult {
    fn allocations(&self) -> usize {
        3 * self.keys + 3 * self.shared
    }
    fn bytes_per_allocation(&self) -> f64 {
        self.bytes as f64 / self.allocations() as f64
    }
    /// Each node's RSS growth per token it holds (3K+S keys).
    fn rss_growth_per_token(&self) -> impl Iterator<Item = f64> + '_ {
        let held = (3 * self.keys + self.shared) as f64;
        self.rss_before
            .iter()
            .zip(&self.rss_after)
            .map(move |(b, a)| a.saturating_sub(*b) as f64 / held)
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
            "run {run}: first reconnect {} s after heal, every pair reconnected {} s; converged {:.3} s after heal (per node: {}); {} s after first reconnect",
            secs(self.reconnect_s),
            secs(self.all_pairs_s),
            self.converged_s,
            self.per_node_s
                .iter()
                .map(|s| format!("{s:.3}"))
                .collect::<Vec<_>>()
                .join(", "),
            secs(self.converged_s - self.reconnect_s),
        );
        println!(
            "run {run}: every conflict visible on every node {:.3} s after heal; every conflict compensated, on every node's report, {:.3} s after heal",
            self.conflicts_visible_s, self.resolved_s
        );
        println!(
            "run {run}: {} bytes over the links = {:.1} bytes per allocation ({:.1} per allocation copy delivered); node CPU during convergence {} s",
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
            "run {run}: node RSS {} MiB before the load, {} MiB once compensated: {} B per token held",
            self.rss_before
                .iter()
                .map(|b| format!("{}", b >> 20))
                .collect::<Vec<_>>()
                .join(", "),
            self.rss_after
                .iter()
                .map(|b| format!("{}", b >> 20))
                .collect::<Vec<_>>()
                .join(", "),
            self.rss_growth_per_token()
                .map(|g| format!("{g:.0}"))
                .collect::<Vec<_>>()
                .join(", "),
        );
        println!(
            "run {run}: this program (relays, polls) used {:.2} CPU s and other processes {:.2} meanwhile; CPU of each partitioned node while idle before heal: {} s/s",
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
            "rss_before": self.rss_before, "rss_after": self.rss_after,
            "rss_growth_per_token": self.rss_growth_per_token().collect::<Vec<_>>(),
        })
    }
}

struct NodeProc {
    node: Node,
    http: String,
    peer_id: String,
    _dir: Option<tempfile::TempDir>,
    dir: PathBuf,
}

/// How the three nodes reach each other, and how they are partitioned.
enum Links {
    /// On loopback, node i dialing node j through `relays[k]` (k counting
    /// the ordered pairs i != j row by row), to listen ports `listen`.
    Relays {
        relays: Vec<Relay>,
        listen: Vec<u16>,
        http: Vec<u16>,
    },
    /// In network namespaces joined by veth links.
    Netns(Netns),
}

impl Links {
    fn relays() -> anyhow::Result<Links> {
        let listen: Vec<u16> = (0..3).map(|_| free_port()).collect::<Result<_, _>>()?;
        let http: Vec<u16> = (0..3).map(|_| free_port()).collect::<Result<_, _>>()?;
        let mut relays = Vec::new();
        for i in 0..3 {
            for (j, port) in listen.iter().enumerate() {
                if i != j {
                    relays.push(Relay::start(SocketAddr::from(([127, 0, 0, 1], *port)))?);
                }
            }
        }
        Ok(Links::Relays {
            relays,
            listen,
            http,
        })
    }

    /// `oncemesh run` for node i, with its HTTP, listen and peer addresses.
    fn command(&self, bin: &Path, i: usize, ids: &[String]) -> (Command, String) {
        let (mut command, http, listen) = match self {
            Links::Relays { listen, http, .. } => (
                Command::new(bin),
                format!("127.0.0.1:{}", http[i]),
                format!("/ip4/127.0.0.1/tcp/{}", listen[i]),
            ),
            Links::Netns(netns) => {
                let mut command = Command::new("ip");
                command.args(["netns", "exec", &netns.names[i]]).arg(bin);
                (
                    command,
                    format!("{}:{NETNS_HTTP_PORT}", Netns::api_addr(i)),
                    format!("/ip4/0.0.0.0/tcp/{NETNS_P2P_PORT}"),
                )
            }
        };
        command
            .args(["run", "--http", &http, "--listen", &listen])
            .args(["--region", ["sgp", "lon", "nyc"][i]]);
        for (j, id) in ids.iter().enumerate().filter(|(j, _)| *j != i) {
            let to = match self {
                Links::Relays { relays, .. } => {
                    let k = 2 * i + j - usize::from(j > i);
                    format!("127.0.0.1/tcp/{}", relays[k].addr().port())
                }
                Links::Netns(_) => format!("{}/tcp/{NETNS_P2P_PORT}", Netns::link_addr(j, i)),
            };
            command.args(["--peer", &format!("/ip4/{to}/p2p/{id}")]);
        }
        (command, format!("http://{http}"))
    }

    fn cut(&self) -> anyhow::Result<()> {
        match self {
            Links::Relays { relays, .. } => relays.iter().for_each(Relay::cut),
            Links::Netns(netns) => netns.set_links(false)?,
        }
        Ok(())
    }

    fn heal(&self) -> anyhow::Result<()> {
        match self {
            Links::Relays { relays, .. } => relays.iter().for_each(Relay::heal),
            Links::Netns(netns) => netns.set_links(true)?,
        }
        Ok(())
    }

    /// Bytes the relays forwarded, or the veth links between the nodes sent.
    fn bytes(&self) -> u64 {
        match self {
            Links::Relays { relays, .. } => relays.iter().map(Relay::bytes_forwarded).sum(),
            Links::Netns(netns) => netns.bytes_sent(),
        }
    }

    /// Seconds from `healed` until each relay forwarded a connection again
    /// (none in namespaces, where nothing in between sees connections).
    fn reconnects(&self, healed: Instant) -> Vec<f64> {
        match self {
            Links::Relays { relays, .. } => relays
                .iter()
                .map(|p| {
                    p.reconnected_at().map_or(f64::NAN, |t| {
                        t.saturating_duration_since(healed).as_secs_f64()
                    })
                })
                .collect(),
            Links::Netns(_) => Vec::new(),
        }
    }
}

/// Every node's HTTP port in its namespace.
const NETNS_HTTP_PORT: u16 = 7700;
/// Every node's libp2p port in its namespace.
const NETNS_P2P_PORT: u16 = 7800;

/// Three network namespaces, node i in `names[i]`, joined pairwise by veth
/// links (`p<j>` in namespace i leads to namespace j, subnet
/// 10.201.<3*lo+hi>.0/30), and each joined to this program's namespace by a
/// veth link `api` (10.202.<i>.0/30) for the HTTP API. No namespace has a
/// route beyond its own links, so nothing crosses a link that is down by
/// another way. Deleted (with their links) on drop.
struct Netns {
    names: Vec<String>,
}

impl Netns {
    fn create(tag: &str) -> anyhow::Result<Netns> {
        let mut netns = Netns { names: Vec::new() };
        for i in 0..3 {
            let name = format!("{tag}-{i}");
            ip(None, &["netns", "add", &name])?;
            netns.names.push(name);
            ip(Some(&netns.names[i]), &["link", "set", "dev", "lo", "up"])?;
            let api = Netns::api_addr(i);
            let ours = format!("{}1", &api[..api.len() - 1]);
            veth(
                &format!("{tag}x{i}"),
                (None, &format!("{tag}m{i}"), &ours),
                (Some(&netns.names[i]), "api", &api),
            )?;
        }
        for i in 0..3 {
            for j in i + 1..3 {
                veth(
                    &format!("{tag}l{i}{j}"),
                    (
                        Some(&netns.names[i]),
                        &format!("p{j}"),
                        &Netns::link_addr(i, j),
                    ),
                    (
                        Some(&netns.names[j]),
                        &format!("p{i}"),
                        &Netns::link_addr(j, i),
                    ),
                )?;
            }
        }
        Ok(netns)
    }

    /// Node i's address on its link to this program.
    fn api_addr(i: usize) -> String {
        format!("10.202.{i}.2")
    }

    /// Node `me`'s address on its link to node `other`.
    fn link_addr(me: usize, other: usize) -> String {
        let (lo, hi) = (me.min(other), me.max(other));
        format!("10.201.{}.{}", 3 * lo + hi, if me == lo { 1 } else { 2 })
    }

    /// Sets every link between the nodes up or down; down also resets the
    /// TCP connections over them, in each namespace.
    fn set_links(&self, up: bool) -> anyhow::Result<()> {
        for (i, name) in self.names.iter().enumerate() {
            for j in (0..3).filter(|j| *j != i) {
                let dev = format!("p{j}");
                ip(
                    Some(name),
                    &["link", "set", "dev", &dev, if up { "up" } else { "down" }],
                )?;
            }
        }
        if !up {
            for name in &self.names {
                run(std::process::Command::new("ip")
                    .args(["netns", "exec", name])
                    .args(["ss", "-K", "-tn", "dst", "10.201.0.0/16"]))?;
            }
        }
        Ok(())
    }

    /// Bytes sent on the links between the nodes (both ends of each).
    fn bytes_sent(&self) -> u64 {
        let mut total = 0;
        for (i, name) in self.names.iter().enumerate() {
            for j in (0..3).filter(|j| *j != i) {
                let Ok(out) = std::process::Command::new("ip")
                    .args(["-n", name, "-j", "-s", "link", "show", &format!("p{j}")])
                    .output()
                else {
                    continue;
                };
                let stats: Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
                total += stats[0]["stats64"]["tx"]["bytes"].as_u64().unwrap_or(0);
            }
        }
        total
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        for name in &self.names {
            let _ = ip(None, &["netns", "del", name]);
        }
    }
}

/// A veth pair, each end (namespace or ours, name, address in a /30) up;
/// made under `tmp` names in our namespace first, then moved and renamed.
fn veth(
    tmp: &str,
    a: (Option<&str>, &str, &str),
    b: (Option<&str>, &str, &str),
) -> anyhow::Result<()> {
    let (ta, tb) = (format!("{tmp}a"), format!("{tmp}b"));
    ip(
        None,
        &["link", "add", &ta, "type", "veth", "peer", "name", &tb],
    )?;
    for (t, (ns, name, addr)) in [(ta, a), (tb, b)] {
        if let Some(ns) = ns {
            ip(None, &["link", "set", "dev", &t, "netns", ns])?;
        }
        ip(ns, &["link", "set", "dev", &t, "name", name])?;
        ip(ns, &["addr", "add", &format!("{addr}/30"), "dev", name])?;
        ip(ns, &["link", "set", "dev", name, "up"])?;
    }
    Ok(())
}

/// Runs `ip [-n NS] ARGS`.
fn ip(ns: Option<&str>, args: &[&str]) -> anyhow::Result<()> {
    let mut command = std::process::Command::new("ip");
    if let Some(ns) = ns {
        command.args(["-n", ns]);
    }
    run(command.args(args))
}

fn run(command: &mut std::process::Command) -> anyhow::Result<()> {
    let out = command.output()?;
    anyhow::ensure!(
        out.status.success(),
        "{command:?} failed: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}

async fn one_run(args: &Args, bin: &Path, run: usize) -> anyhow::Result<RunResult> {
    let http = oncemesh::tls::http_client()
        .pool_max_idle_per_host(args.clients)
        .tcp_nodelay(true)
        .timeout(Duration::from_secs(120))
        .build()?;
    // Identities, links.
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
    let links = if args.netns {
        Links::Netns(Netns::create(&format!(
            "om{}r{run}",
            std::process::id() % 100_000
        ))?)
    } else {
        Links::relays()?
    };
    // Start the nodes.
    let mut nodes = Vec::new();
    for (i, dir) in dirs.into_iter().enumerate() {
        let (mut command, url) = links.command(bin, i, &ids);
        command
            .arg("--data-dir")
            .arg(dir.path())
            .args(&args.node_args);
        let node = Node::start(command, &dir.path().join("node.log")).await?;
        let path = dir.path().to_owned();
        nodes.push(NodeProc {
            node,
            http: url,
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
    let rss_before: Vec<u64> = nodes.iter().map(|n| rss_bytes(n.node.pid)).collect();
    links.cut()?;
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
    let idle_before: Vec<f64> = nodes.iter().map(|n| cpu_seconds(n.node.pid)).collect();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let idle_cpu_s: Vec<f64> = nodes
        .iter()
        .zip(&idle_before)
        .map(|(n, b)| (cpu_seconds(n.node.pid) - b) / 2.0)
        .collect();

    // Heal and measure.
    let bytes_before = links.bytes();
    let cpu_before: Vec<f64> = nodes.iter().map(|n| cpu_seconds(n.node.pid)).collect();
    let machine_before = machine_busy_seconds();
    let own_before = cpu_seconds(std::process::id());
    let healed = Instant::now();
    links.heal()?;
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
                Some((visible, at, cpu_seconds(node.node.pid)))
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
                    let bytes = links.bytes();
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
    let bytes_at = links.bytes();
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
    // This program's relays and polls share the nodes' cores.
    let own_cpu_s = cpu_seconds(std::process::id()) - own_before;
    // Everything the machine did meanwhile that was neither a node nor this program.
    let other_cpu_s = machine_busy_seconds()
        - machine_before
        - own_cpu_s
        - nodes
            .iter()
            .zip(&cpu_before)
            .map(|(n, b)| cpu_seconds(n.node.pid) - b)
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
    let accepts = links.reconnects(healed);
    let (reconnect_s, all_pairs_s) = if accepts.is_empty() {
        (f64::NAN, f64::NAN)
    } else {
        // A pair (i, j) is reconnected once either direction's relay forwarded a connection.
        let all_pairs_s = [(0, 2), (1, 4), (3, 5)]
            .iter()
            .map(|&(a, b)| accepts[a].min(accepts[b]))
            .fold(0.0, f64::max);
        (
            accepts.iter().copied().fold(f64::INFINITY, f64::min),
            all_pairs_s,
        )
    };
    let cpu_s = cpu_after
        .iter()
        .zip(&cpu_before)
        .map(|(a, b)| a - b)
        .collect();
    let rss_after: Vec<u64> = nodes.iter().map(|n| rss_bytes(n.node.pid)).collect();
    for mut n in nodes {
        n.node.stop(libc::SIGKILL).await?;
    }
    drop(links);
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
        rss_before,
        rss_after,
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
