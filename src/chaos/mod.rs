//! The chaos runner: the real `oncemesh` binary under faults made from
//! outside, judged by the checker the simulator uses ([`crate::check`]).
//!
//! One run ([`run_seed`]) starts N node processes wired through relays
//! ([`crate::drill::Cluster`]), each on a data dir of its own small
//! filesystem ([`SmallDisk`], where it can be mounted) and compensating
//! through the [`receiver`]; plays the [`workload`] (customers with
//! cross-region retries and replays) while the [`schedule`] of the seed
//! cuts, splits, slows and one-ways links, kills, pauses, clock-skews nodes
//! and fills their disks, and makes the endpoint fail or hang, and while
//! the nodes are asked which keys they call settled ([`claims`]). Then it
//! heals everything (the faults still in force when the traffic ends stay
//! so until its last retries are done), waits for the cluster to converge
//! (identical documents, no open conflict) within a bound, reads every
//! node's end state through its API and hands it with the recorded history
//! to [`crate::check::judge`]. `oncemesh chaos` runs many seeds.

pub mod claims;
pub mod receiver;
pub mod schedule;
pub mod workload;

use crate::check::{self, NodeState, Report, Violation};
use crate::client::{Client, ClientError, ConflictFilter};
use crate::drill::{Cluster, ClusterError, Direction, DiskError, SmallDisk};
use receiver::{Mode, Receiver};
use schedule::{Episode, Fault};
use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;
use workload::{Counts, Recorder, Workload};

/// Region names of the first nodes; later ones are `r5`, `r6`, ...
const REGIONS: [&str; 5] = ["sgp", "lon", "nyc", "fra", "syd"];
/// How long one API call of the runner may take once the cluster is healed.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);
/// The nodes' webhook timeout; a hanging endpoint answers after twice it.
const WEBHOOK_TIMEOUT: Duration = Duration::from_secs(1);
/// Size of each node's small filesystem, MiB, for a run of `seconds` of
/// traffic: a node's data dir grows by about 70 KiB a second under the
/// workload (2 MiB after 30 s, docs/RELIABILITY.md), so only the ballast
/// fills it, and the ballast (memory, on a tmpfs) stays small.
fn disk_mib(seconds: u64) -> u64 {
    64 + seconds / 2
}

/// Whether a run gives each node a small filesystem of its own, which its
/// full-disk episodes fill.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum FullDisk {
    /// Where one can be mounted (as root); else the full-disk episodes are
    /// skipped and the outcome says why.
    #[default]
    Auto,
    /// Always: a run that cannot mount one fails.
    Required,
    /// Never: the full-disk episodes are skipped.
    Off,
}

/// What a run does.
#[derive(Debug, Clone)]
pub struct Options {
    /// Nodes (regions).
    pub nodes: usize,
    /// How long customers pay while faults run.
    pub workload: Duration,
    /// How long the healed cluster may take to converge.
    pub converge_within: Duration,
    /// Whether nodes get small filesystems to fill.
    pub full_disk: FullDisk,
}

/// Why a run could not be carried out (a broken invariant is not an error:
/// it is in the [`Report`]).
#[derive(Debug, thiserror::Error)]
pub enum ChaosError {
    /// The cluster could not be started or a node restarted.
    #[error(transparent)]
    Cluster(#[from] ClusterError),
    /// The compensation endpoint could not listen.
    #[error("the compensation endpoint: {0}")]
    Receiver(std::io::Error),
    /// A node's API failed while its end state was read.
    #[error("reading node {node}'s {what}: {reason}")]
    Read {
        /// The node's index.
        node: usize,
        /// What was read.
        what: &'static str,
        /// Why it failed.
        reason: String,
    },
    /// The nodes did not connect to each other at the start.
    #[error("the nodes did not connect to each other within 30 s")]
    NoMesh,
    /// A node's small filesystem could not be mounted (when required),
    /// filled, freed or unmounted.
    #[error(transparent)]
    Disk(#[from] DiskError),
    /// A node's disk could not be filled.
    #[error("filling node {node}'s disk: {reason}")]
    Fill {
        /// The node's index.
        node: usize,
        /// Why.
        reason: String,
    },
}

/// What one seed's run found.
#[derive(Debug)]
pub struct Outcome {
    /// The checker's verdict and figures.
    pub report: Report,
    /// Faults injected, by kind.
    pub faults: BTreeMap<&'static str, usize>,
    /// Episodes of the schedule not injected, by kind, and why (a full disk
    /// where no small filesystem could be mounted).
    pub skipped: BTreeMap<&'static str, (usize, String)>,
    /// Settlement claims the nodes made when asked.
    pub claims: usize,
    /// What the clients did.
    pub counts: Counts,
    /// Compensation calls the endpoint accepted (retries included).
    pub calls_accepted: usize,
    /// Calls it refused while failing.
    pub calls_refused: usize,
    /// Refunds carried out: distinct idempotency keys.
    pub effects: usize,
    /// Expected calibration error of the confidences given, over ten bins.
    pub ece: f64,
    /// Sum of (1 − confidence) over new allocations: the duplicates the
    /// nodes expected.
    pub expected_duplicates: f64,
    /// New allocations that ended in a conflict.
    pub conflicted_allocations: usize,
    /// Wall time of the run.
    pub seconds: f64,
}

/// Region name of node `i`.
fn region(i: usize) -> String {
    REGIONS
        .get(i)
        .map_or_else(|| format!("r{i}"), |r| (*r).to_owned())
}

/// The flags a node runs with beyond its place in the cluster.
fn node_flags(receiver: &Receiver, i: usize, offset_ms: i64) -> Vec<String> {
    let mut flags: Vec<String> = vec![
        "--compensation".into(),
        format!("webhook:{}", receiver.url(i)),
        "--webhook-timeout".into(),
        format!("{}ms", WEBHOOK_TIMEOUT.as_millis()),
        "--compensation-initial-backoff".into(),
        "100ms".into(),
        "--compensation-max-backoff".into(),
        "2s".into(),
        // A run's failing endpoint lasts seconds; nothing should need an
        // operator to leave the dead letters.
        "--compensation-max-attempts".into(),
        "100000".into(),
    ];
    if offset_ms != 0 {
        flags.extend(["--drill-clock-offset".into(), format!("{offset_ms}ms")]);
    }
    flags
}

/// Bounds a call of the runner's; a paused or wedged node must not hang the run.
async fn bounded<T>(call: impl Future<Output = Result<T, ClientError>>) -> Result<T, String> {
    match tokio::time::timeout(CALL_TIMEOUT, call).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!("no answer within {CALL_TIMEOUT:?}")),
    }
}

/// Runs the seed: `exe` is the `oncemesh` binary, `root` an empty dir for
/// the nodes' data dirs and logs. Every small filesystem mounted is
/// unmounted before it returns, an error or not, what the nodes wrote on
/// it moved into `root` as if there had been none.
pub async fn run_seed(
    exe: &Path,
    root: &Path,
    options: &Options,
    seed: u64,
) -> Result<Outcome, ChaosError> {
    let started = Instant::now();
    let receiver = Receiver::start().await.map_err(ChaosError::Receiver)?;
    let regions: Vec<String> = (0..options.nodes).map(region).collect();
    let disks = small_disks(root, &regions, options)?;
    let names: Vec<&str> = regions.iter().map(String::as_str).collect();
    let outcome = match Cluster::start(exe, root, &names, |i| node_flags(&receiver, i, 0)).await {
        Ok(mut cluster) => {
            let outcome = play(&mut cluster, &receiver, &disks, options, seed).await;
            cluster.stop().await;
            outcome
        }
        Err(e) => Err(e.into()),
    };
    for disk in disks.into_iter().flatten() {
        // The fills are done: this is the only owner (else the drop
        // unmounts it).
        if let Ok(disk) = Arc::try_unwrap(disk) {
            disk.unmount(true)?;
        }
    }
    let mut outcome = outcome?;
    outcome.seconds = started.elapsed().as_secs_f64();
    Ok(outcome)
}

/// Each node's small filesystem over its data dir, or why there are none.
type Disks = Result<Vec<Arc<SmallDisk>>, String>;

fn small_disks(root: &Path, regions: &[String], options: &Options) -> Result<Disks, ChaosError> {
    if options.full_disk == FullDisk::Off {
        return Ok(Err("--full-disk off".into()));
    }
    let size = disk_mib(options.workload.as_secs());
    let mut disks = Vec::new();
    for region in regions {
        match SmallDisk::mount(&root.join(region), size) {
            Ok(disk) => disks.push(Arc::new(disk)),
            Err(e) if options.full_disk == FullDisk::Auto => return Ok(Err(e.to_string())),
            Err(e) => return Err(e.into()),
        }
    }
    Ok(Ok(disks))
}

async fn play(
    cluster: &mut Cluster,
    receiver: &Receiver,
    disks: &Disks,
    options: &Options,
    seed: u64,
) -> Result<Outcome, ChaosError> {
    if !wait_until(Duration::from_secs(30), async || meshed(cluster).await).await {
        return Err(ChaosError::NoMesh);
    }
    let episodes = schedule::plan(seed, options.nodes, options.workload.as_millis() as u64);
    let recorder = Arc::new(Recorder::new(seed));
    let clients: Vec<Client> = cluster.nodes.iter().map(|n| n.client.clone()).collect();
    let customers = tokio::spawn(workload::run(
        Workload {
            clients: clients.clone(),
            seed,
            until: Instant::now() + options.workload,
        },
        recorder.clone(),
    ));
    let stop_sampling = CancellationToken::new();
    let sampler = tokio::spawn(claims::sample(
        clients,
        recorder.clone(),
        seed,
        stop_sampling.clone(),
    ));
    let mut faults = Faults {
        cluster,
        receiver,
        recorder: &recorder,
        disks,
        offsets: vec![0; options.nodes],
        down: BTreeSet::new(),
        paused: BTreeSet::new(),
        full: BTreeSet::new(),
    };
    let mut counted: BTreeMap<&'static str, usize> = BTreeMap::new();
    let mut skipped: BTreeMap<&'static str, (usize, String)> = BTreeMap::new();
    // What is still in force when the traffic stops stays so until the
    // heal, after the last retries.
    let workload_ms = options.workload.as_millis() as u64;
    let mut steps: Vec<(u64, bool, &Episode)> = episodes
        .iter()
        .flat_map(|e| [(e.start_ms, true, e), (e.end_ms, false, e)])
        .filter(|s| s.0 < workload_ms)
        .collect();
    steps.sort_by_key(|s| s.0);
    for (at, begin, episode) in steps {
        let wait = Duration::from_millis(at).saturating_sub(Duration::from_millis(recorder.now()));
        tokio::time::sleep(wait).await;
        let kind = episode.fault.kind();
        if let Some(why) = faults.cannot(&episode.fault) {
            if begin {
                recorder.note(format!("skip {:?}: {why}", episode.fault));
                skipped.entry(kind).or_insert((0, why.to_owned())).0 += 1;
            }
        } else if begin {
            *counted.entry(kind).or_default() += 1;
            faults.begin(&episode.fault).await?;
        } else {
            faults.end(&episode.fault).await?;
        }
    }
    if let Err(e) = customers.await {
        recorder.note(format!("the workload stopped: {e}"));
    }
    stop_sampling.cancel();
    let claims = sampler.await.unwrap_or_else(|e| {
        recorder.note(format!("the settlement sampler stopped: {e}"));
        0
    });
    faults.heal_all().await?;
    let cluster: &Cluster = faults.cluster;
    let healed = recorder.now();
    let converged = wait_until(options.converge_within, async || converged(cluster).await).await;
    let converged_after_ms = converged.then(|| recorder.now().saturating_sub(healed));
    let (mut history, counts) = recorder.finish();
    for effect in receiver.accepted() {
        history.compensated(effect.node, effect.idempotency_key, effect.loser_txn);
    }
    for ((key, txn), keys) in receiver.refunded_twice() {
        history.violation(Violation::new(
            "compensation",
            format!(
                "the loser {txn} was refunded under {} keys: {keys:?}",
                keys.len()
            ),
            Some(key),
        ));
    }
    for (i, node) in cluster.nodes.iter().enumerate() {
        if let Some(reason) = storage_failing(&node.client).await {
            history.violation(Violation::new(
                "storage",
                format!("node {i}'s storage still fails after the heal: {reason}"),
                None,
            ));
        }
    }
    let keys: Vec<String> = history.keys().cloned().collect();
    let mut states = Vec::new();
    for i in 0..cluster.nodes.len() {
        states.push(Some(end_state(cluster, i, &keys).await?));
    }
    let report = check::judge(
        history,
        &states,
        check::Run {
            seed,
            converged_after_ms,
            ..check::Run::default()
        },
    );
    Ok(Outcome {
        ece: check::ece(&report.outcomes),
        expected_duplicates: report.outcomes.iter().map(|(c, _)| 1.0 - c).sum(),
        conflicted_allocations: report.outcomes.iter().filter(|(_, x)| *x).count(),
        report,
        faults: counted,
        skipped,
        claims,
        counts,
        calls_accepted: receiver.accepted().len(),
        calls_refused: receiver.refused(),
        effects: receiver.effects(),
        seconds: 0.0,
    })
}

/// Why the node's storage says it cannot write, if it does (or its health
/// cannot be read).
async fn storage_failing(client: &Client) -> Option<String> {
    match bounded(client.health()).await {
        Ok(health) => health
            .extra
            .get("storage")
            .and_then(|s| s.get("failing"))
            .and_then(|f| f.as_str())
            .map(str::to_owned),
        Err(e) => Some(format!("health unreadable: {e}")),
    }
}

/// Polls `check` every 250 ms until it holds or `within` passes.
async fn wait_until(within: Duration, mut check: impl AsyncFnMut() -> bool) -> bool {
    let deadline = Instant::now() + within;
    loop {
        if check().await {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Every node reports every peer connected.
async fn meshed(cluster: &Cluster) -> bool {
    for node in &cluster.nodes {
        match bounded(node.client.peers()).await {
            Ok(peers) if peers.iter().all(|p| p.connected) => {}
            _ => return false,
        }
    }
    true
}

/// Every node holds the same documents and no open conflict.
async fn converged(cluster: &Cluster) -> bool {
    let mut first = None;
    for node in &cluster.nodes {
        let open = bounded(node.client.conflicts(Some(ConflictFilter::Open))).await;
        if !open.is_ok_and(|o| o.is_empty()) {
            return false;
        }
        let Ok(digests) = digests(&node.client).await else {
            return false;
        };
        match &first {
            None => first = Some(digests),
            Some(f) if *f != digests => return false,
            Some(_) => {}
        }
    }
    true
}

async fn digests(client: &Client) -> Result<BTreeMap<String, String>, String> {
    Ok(bounded(client.documents())
        .await?
        .into_iter()
        .map(|d| (d.id, d.heads_digest))
        .collect())
}

/// Node `i`'s end state through its API: each of `keys` it holds (its
/// allocations in the order of the winner rule, smallest (HLC, node id)
/// first, computed here and not taken from the node), its conflict report
/// and its documents' digests.
async fn end_state(cluster: &Cluster, i: usize, keys: &[String]) -> Result<NodeState, ChaosError> {
    let client = &cluster.nodes[i].client;
    let failed = |what: &'static str| {
        move |reason: String| ChaosError::Read {
            node: i,
            what,
            reason,
        }
    };
    let owner = |peer: &str| cluster.nodes.iter().position(|n| n.peer_id == peer);
    let mut state = NodeState::default();
    for key in keys {
        let Some(report) = bounded(client.allocation(key))
            .await
            .map_err(failed("key report"))?
        else {
            continue;
        };
        let mut allocations = report.allocations;
        allocations.sort_by(|a, b| (a.hlc, &a.node, &a.txn_id).cmp(&(b.hlc, &b.node, &b.txn_id)));
        state.keys.insert(
            key.clone(),
            allocations
                .into_iter()
                .map(|a| {
                    let by = owner(&a.node);
                    (a.txn_id, by)
                })
                .collect(),
        );
    }
    for conflict in bounded(client.conflicts(None))
        .await
        .map_err(failed("conflict report"))?
    {
        if let Some(winner) = conflict.winner {
            state.conflicts.insert(conflict.key, winner);
        }
    }
    state.digests = digests(client).await.map_err(failed("documents"))?;
    Ok(state)
}

/// The faults in force and how to begin and undo them.
struct Faults<'a> {
    cluster: &'a mut Cluster,
    receiver: &'a Receiver,
    recorder: &'a Recorder,
    disks: &'a Disks,
    /// Each node's clock offset, ms, kept across restarts.
    offsets: Vec<i64>,
    down: BTreeSet<usize>,
    paused: BTreeSet<usize>,
    /// Nodes whose disk is full.
    full: BTreeSet<usize>,
}

impl Faults<'_> {
    /// Why `fault` cannot be injected in this run, if it cannot.
    fn cannot(&self, fault: &Fault) -> Option<&str> {
        match (fault, self.disks) {
            (Fault::FullDisk(_), Err(why)) => Some(why),
            _ => None,
        }
    }

    /// Node `n`'s small filesystem (only asked for when [`Faults::cannot`]
    /// said none is missing).
    fn disk(&self, n: usize) -> Result<Arc<SmallDisk>, ChaosError> {
        match self.disks {
            Ok(disks) => Ok(disks[n].clone()),
            Err(why) => Err(ChaosError::Fill {
                node: n,
                reason: why.clone(),
            }),
        }
    }

    /// The relays between a node in `a` and a node not in `a`.
    fn cut_between(&self, a: &BTreeSet<usize>) {
        for (i, row) in self.cluster.links.iter().enumerate() {
            for (j, link) in row.iter().enumerate() {
                if let Some(link) = link {
                    if a.contains(&i) != a.contains(&j) {
                        link.cut();
                    }
                }
            }
        }
    }

    async fn begin(&mut self, fault: &Fault) -> Result<(), ChaosError> {
        self.recorder.note(format!("begin {fault:?}"));
        match fault {
            Fault::Isolate(n) => self.cut_between(&BTreeSet::from([*n])),
            Fault::Split(group) => self.cut_between(&group.iter().copied().collect()),
            Fault::OneWay { from, to } => {
                // links[from][to] carries from's dials: only answers pass;
                // links[to][from] carries to's dials: only requests pass.
                if let Some(l) = &self.cluster.links[*from][*to] {
                    l.one_way(Direction::ToDialer);
                }
                if let Some(l) = &self.cluster.links[*to][*from] {
                    l.one_way(Direction::ToTarget);
                }
            }
            Fault::Delay { node, ms } => {
                for (i, row) in self.cluster.links.iter().enumerate() {
                    for (j, link) in row.iter().enumerate() {
                        if let Some(link) = link {
                            if i == *node || j == *node {
                                link.set_delay(Duration::from_millis(*ms));
                            }
                        }
                    }
                }
            }
            Fault::Kill(n) => {
                self.cluster.kill(*n).await;
                self.down.insert(*n);
            }
            Fault::Pause(n) => {
                self.cluster.pause(*n, true)?;
                self.paused.insert(*n);
            }
            Fault::Skew { node, offset_ms } => {
                self.offsets[*node] = *offset_ms;
                self.restart(*node).await?;
            }
            Fault::FullDisk(n) => {
                let disk = self.disk(*n)?;
                let bytes = tokio::task::spawn_blocking(move || disk.fill())
                    .await
                    .map_err(|e| ChaosError::Fill {
                        node: *n,
                        reason: e.to_string(),
                    })??;
                self.full.insert(*n);
                self.recorder.note(format!(
                    "node {n}'s disk filled with {} MiB of ballast",
                    bytes >> 20
                ));
            }
            Fault::WebhookFails => self.receiver.set_mode(Mode::Fails),
            Fault::WebhookHangs => self.receiver.set_mode(Mode::Hangs(WEBHOOK_TIMEOUT * 2)),
        }
        Ok(())
    }

    /// Frees node `n`'s disk, noting first whether the node said its
    /// storage was failing (the fault was felt).
    async fn free(&mut self, n: usize) -> Result<(), ChaosError> {
        let felt = storage_failing(&self.cluster.nodes[n].client).await;
        self.recorder.note(format!(
            "node {n}'s disk freed; its storage failing then: {}",
            felt.as_deref().unwrap_or("no")
        ));
        self.disk(n)?.free()?;
        self.full.remove(&n);
        Ok(())
    }

    async fn end(&mut self, fault: &Fault) -> Result<(), ChaosError> {
        self.recorder.note(format!("end {fault:?}"));
        match fault {
            Fault::Isolate(_) | Fault::Split(_) | Fault::OneWay { .. } | Fault::Delay { .. } => {
                for link in self.cluster.relays() {
                    link.heal();
                    link.set_delay(Duration::ZERO);
                }
            }
            Fault::Kill(n) => self.restart(*n).await?,
            Fault::Pause(n) => {
                self.cluster.pause(*n, false)?;
                self.paused.remove(n);
            }
            Fault::Skew { .. } => {}
            Fault::FullDisk(n) => self.free(*n).await?,
            Fault::WebhookFails | Fault::WebhookHangs => self.receiver.set_mode(Mode::Ok),
        }
        Ok(())
    }

    async fn restart(&mut self, n: usize) -> Result<(), ChaosError> {
        let flags = node_flags(self.receiver, n, self.offsets[n]);
        self.cluster.restart(n, &flags).await?;
        self.down.remove(&n);
        Ok(())
    }

    /// Undoes whatever is still in force.
    async fn heal_all(&mut self) -> Result<(), ChaosError> {
        self.recorder.note("heal everything".into());
        self.receiver.set_mode(Mode::Ok);
        for n in std::mem::take(&mut self.full) {
            self.free(n).await?;
        }
        for link in self.cluster.relays() {
            link.heal();
            link.set_delay(Duration::ZERO);
        }
        for n in std::mem::take(&mut self.paused) {
            self.cluster.pause(n, false)?;
        }
        for n in std::mem::take(&mut self.down) {
            self.restart(n).await?;
        }
        Ok(())
    }
}
