//! `oncemesh demo`: the incident that motivates oncemesh, replayed on one
//! machine. Three regions run as separate `oncemesh run` processes on
//! loopback, every link through a relay the demo can cut. Customers pay in
//! their home region and some retries land in another region; then
//! Singapore is cut off while retries keep crossing between Singapore and
//! London, London's clock runs ahead, and finally the network heals. The
//! demo then prints what each region reports: the same conflicts, the same
//! winners, every loser compensated by its own node, and the precursors
//! (cross-region retries, clock skew) that announced them.
//!
//! `--seed N` makes the traffic reproducible (who pays where, how much, who
//! retries in which region); `--json` prints the whole [`Summary`] as one
//! JSON document on stdout and the narration on stderr. The exit code says
//! whether every duplicate was found by every region and compensated once.

use super::table::render;
use crate::client::Conflict;
use crate::drill::{Cluster, NodeProcess};
use crate::record::CompensationState;
use anyhow::{bail, Context};
use clap::Args;
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use serde::Serialize;
use serde_json::json;
use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// Options of the demo.
#[derive(Args, Debug)]
pub struct DemoArgs {
    /// Keep the three regions' data dirs and logs here (default: a temporary
    /// directory, removed at the end).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// How long Singapore stays cut off.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    pub partition: Duration,
    /// Customers paying in each phase.
    #[arg(long, default_value_t = 120)]
    pub customers: usize,
    /// How far London's clock runs ahead (drill), beyond the 500 ms bound.
    #[arg(long, default_value = "800ms", value_parser = humantime::parse_duration)]
    pub skew: Duration,
    /// Seed of the traffic: the same seed sends the same payments and the
    /// same retries (default: a random seed, printed).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Print the summary as one JSON document on stdout (the narration
    /// goes to stderr).
    #[arg(long)]
    pub json: bool,
}

const REGIONS: [&str; 3] = ["sgp", "lon", "nyc"];

/// The state of a compensation that is done, as the API names it (the
/// client keeps states as the text the node sent).
const SUCCEEDED: &str = CompensationState::Succeeded.as_str();

/// One in this many customers of the normal phase retries in another region.
const NORMAL_RETRY_ONE_IN: u32 = 7;
/// One in this many of Singapore's customers retries in London during the partition.
const PARTITION_RETRY_ONE_IN: u32 = 4;

/// Everything the demo found, as `--json` prints it. One struct, so new
/// findings are new fields.
#[derive(Debug, Serialize)]
pub struct Summary {
    /// Seed of the traffic.
    pub seed: u64,
    /// The three regions.
    pub regions: Vec<RegionInfo>,
    /// Phase 1: normal traffic.
    pub normal: NormalPhase,
    /// Phase 2: Singapore cut off, London's clock ahead.
    pub partition: PartitionPhase,
    /// Phase 3: the network heals.
    pub heal: HealPhase,
    /// What each region reports afterwards.
    pub reports: Vec<RegionReport>,
    /// Every region picked the same winner for every conflict.
    pub winners_agree: bool,
    /// Every region found exactly the keys that were allocated twice, and
    /// reports each loser compensated, once.
    pub every_duplicate_compensated_once: bool,
    /// One conflict as nyc, a bystander, reports it.
    pub sample_conflict: Option<SampleConflict>,
    /// Both of the above: what the exit code says.
    pub ok: bool,
}

/// A region of the demo.
#[derive(Debug, Serialize)]
pub struct RegionInfo {
    /// Region name.
    pub name: String,
    /// Its node's peer id.
    pub peer_id: String,
    /// Its node's HTTP address.
    pub http: String,
}

/// Phase 1.
#[derive(Debug, Serialize)]
pub struct NormalPhase {
    /// Customers who paid.
    pub customers: usize,
    /// Of them, retries sent to another region after replication.
    pub cross_region_retries: usize,
    /// Retries answered as replays of the original transaction.
    pub replays: usize,
}

/// Phase 2.
#[derive(Debug, Serialize)]
pub struct PartitionPhase {
    /// How long Singapore was cut off.
    pub duration_ms: u64,
    /// How far London's clock ran ahead.
    pub skew_ms: u64,
    /// Allocations Singapore made while cut off.
    pub allocations: usize,
    /// Lowest and highest confidence Singapore gave them.
    pub confidence_min: f64,
    /// See `confidence_min`.
    pub confidence_max: f64,
    /// One provisional payment watched while the partition lasted.
    pub watched_key: String,
    /// Its confidence early in the partition.
    pub confidence_early: f64,
    /// Its confidence at the end of it.
    pub confidence_late: f64,
    /// Retries sent to London.
    pub retries_in_lon: usize,
    /// Of them, allocated a second time: the duplicates of the incident.
    pub duplicates: usize,
    /// What Singapore's exposure said just before the heal: the duplicates it
    /// expected among its provisional payments (sum of 1 − confidence).
    pub expected_duplicates: f64,
    /// And the money at risk, per currency, in the payloads' units (cents).
    pub value_at_risk: std::collections::BTreeMap<String, f64>,
}

/// Phase 3.
#[derive(Debug, Serialize)]
pub struct HealPhase {
    /// Conflicts every region reports resolved.
    pub conflicts_found: usize,
    /// From heal until every region reported every conflict compensated.
    pub seconds_to_compensated: f64,
}

/// What one region reports at the end.
#[derive(Debug, Serialize)]
pub struct RegionReport {
    /// Region name.
    pub region: String,
    /// Keys it holds.
    pub keys: u64,
    /// Conflicts it reports.
    pub conflicts: usize,
    /// Compensations it ran and reports succeeded.
    pub compensated_by_it: usize,
    /// Requests it answered with another region's allocation.
    pub cross_region_replays: u64,
    /// Remote clocks seen beyond the bound.
    pub skew_violations: u64,
    /// Largest remote clock offset seen, ms.
    pub max_offset_ms: i64,
    /// Its health verdict.
    pub health: &'static str,
}

/// One conflict, allocation by allocation.
#[derive(Debug, Serialize)]
pub struct SampleConflict {
    /// The key.
    pub key: String,
    /// Its allocations, winner first.
    pub allocations: Vec<SampleAllocation>,
}

/// One allocation of [`SampleConflict`].
#[derive(Debug, Serialize)]
pub struct SampleAllocation {
    /// Region that made it.
    pub region: String,
    /// Its transaction.
    pub txn_id: String,
    /// Its HLC stamp.
    pub hlc: String,
    /// The confidence it was given when made.
    pub confidence_at_allocation: f64,
    /// winner, or loser.
    pub role: &'static str,
}

/// Where the narration goes: stdout, or stderr when stdout carries JSON.
#[derive(Clone, Copy)]
struct Narrator {
    to_stderr: bool,
}

impl Narrator {
    fn say(self, text: impl std::fmt::Display) {
        if self.to_stderr {
            eprintln!("{text}");
        } else {
            println!("{text}");
        }
    }
}

/// Runs the demo.
pub async fn run(args: DemoArgs) -> anyhow::Result<i32> {
    let say = Narrator {
        to_stderr: args.json,
    };
    let (root, temporary) = match &args.data_dir {
        Some(dir) => (dir.clone(), false),
        None => (
            std::env::temp_dir().join(format!("oncemesh-demo-{}", std::process::id())),
            true,
        ),
    };
    std::fs::create_dir_all(&root).with_context(|| format!("creating {}", root.display()))?;
    let outcome = play(&args, &root, say).await;
    if temporary {
        let _ = std::fs::remove_dir_all(&root);
    } else {
        say.say(format!(
            "\ndata dirs and node logs kept in {}",
            root.display()
        ));
    }
    let summary = outcome?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&summary)?);
    }
    Ok(if summary.ok { 0 } else { 1 })
}

async fn play(args: &DemoArgs, root: &std::path::Path, say: Narrator) -> anyhow::Result<Summary> {
    let seed = args.seed.unwrap_or_else(rand::random);
    say.say(format!(
        "oncemesh demo: three regions on this machine ({}), traffic seed {seed}",
        REGIONS.join(", ")
    ));
    let mut cluster = start_regions(args, root, say).await?;
    let result = scenario(args, seed, &cluster, say).await;
    cluster.stop().await;
    result
}

/// Starts the three regions wired through relays, London's clock ahead.
async fn start_regions(
    args: &DemoArgs,
    root: &std::path::Path,
    say: Narrator,
) -> anyhow::Result<Cluster> {
    let exe = std::env::current_exe().context("locating the oncemesh binary")?;
    let skew = format!("{}ms", args.skew.as_millis());
    let cluster = Cluster::start(&exe, root, &REGIONS, |i| {
        if REGIONS[i] == "lon" {
            vec!["--drill-clock-offset".into(), skew.clone()]
        } else {
            Vec::new()
        }
    })
    .await?;
    for node in &cluster.nodes {
        say.say(format!("  {}", node.banner));
    }
    Ok(cluster)
}

async fn wait_for(
    what: &str,
    timeout: Duration,
    mut check: impl AsyncFnMut() -> anyhow::Result<bool>,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if check().await.unwrap_or(false) {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!("timed out waiting for {what}")
}

/// A payment: the customer and an amount the seed chose.
fn payment(customer: usize, amount_cents: u64) -> serde_json::Value {
    json!({ "customer": customer, "amount": amount_cents, "currency": "EUR" })
}

/// The confidence `region` shows now for the first allocation of `key`.
async fn confidence_of(region: &NodeProcess, key: &str) -> anyhow::Result<f64> {
    let report = region.client.allocation(key).await?;
    Ok(report
        .and_then(|r| r.allocations.first().map(|a| a.confidence))
        .unwrap_or(1.0))
}

async fn scenario(
    args: &DemoArgs,
    seed: u64,
    cluster: &Cluster,
    say: Narrator,
) -> anyhow::Result<Summary> {
    let regions = &cluster.nodes;
    let links = &cluster.links;
    let mut rng = StdRng::seed_from_u64(seed);
    wait_for(
        "the regions to connect",
        Duration::from_secs(30),
        async || {
            for r in regions {
                if r.client.peers().await?.iter().any(|p| !p.connected) {
                    return Ok(false);
                }
            }
            Ok(true)
        },
    )
    .await?;
    // Keys allocated by more than one region: what every region must find.
    let mut duplicate_keys: BTreeSet<String> = BTreeSet::new();

    say.say(format!("\n1. Normal traffic: {} customers pay in their home region; about one in {NORMAL_RETRY_ONE_IN} retries in another region.", args.customers));
    let mut retries = Vec::new();
    for c in 0..args.customers {
        let home = rng.random_range(0..REGIONS.len());
        let amount = rng.random_range(500..200_000u64);
        let key = format!("pay-{c}");
        regions[home]
            .client
            .allocate(&key, &payment(c, amount))
            .await?;
        if rng.random_range(0..NORMAL_RETRY_ONE_IN) == 0 {
            let other = (home + rng.random_range(1..REGIONS.len())) % REGIONS.len();
            retries.push((c, key, amount, other));
        }
    }
    // Clients whose answer was slow retry a moment later, elsewhere; by then
    // replication has carried the allocation: a replay, not a duplicate.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut replays = 0;
    for (c, key, amount, other) in &retries {
        if regions[*other]
            .client
            .allocate(key, &payment(*c, *amount))
            .await?
            .replay
        {
            replays += 1;
        } else {
            duplicate_keys.insert(key.clone());
        }
    }
    say.say(format!(
        "   {replays} of {} cross-region retries answered as replays of the original transaction.",
        retries.len()
    ));
    let normal = NormalPhase {
        customers: args.customers,
        cross_region_retries: retries.len(),
        replays,
    };

    say.say(format!(
        "\n2. Partition: Singapore is cut off for {:?}; London's clock runs {:?} ahead. Customers of sgp whose\n   request times out retry in lon.",
        args.partition, args.skew
    ));
    for (i, row) in links.iter().enumerate() {
        for (j, link) in row.iter().enumerate() {
            if let Some(link) = link {
                if i == 0 || j == 0 {
                    link.cut();
                }
            }
        }
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = Instant::now();
    let mut confidences = Vec::new();
    let mut orders = Vec::new();
    for c in 0..args.customers {
        let key = format!("order-{c}");
        let amount = rng.random_range(500..200_000u64);
        let made = regions[0]
            .client
            .allocate(&key, &payment(c, amount))
            .await?;
        confidences.push(made.allocation.confidence);
        orders.push((c, key, amount));
    }
    let retrying: Vec<_> = orders
        .iter()
        .filter(|_| rng.random_range(0..PARTITION_RETRY_ONE_IN) == 0)
        .collect();
    let mut duplicates = 0;
    for (c, key, amount) in &retrying {
        if !regions[1]
            .client
            .allocate(key, &payment(*c, *amount))
            .await?
            .replay
        {
            duplicates += 1;
            duplicate_keys.insert(key.clone());
        }
    }
    let watched_key = orders.get(1).map_or("order-0".into(), |o| o.1.clone());
    let confidence_early = confidence_of(&regions[0], &watched_key).await?;
    tokio::time::sleep(args.partition.saturating_sub(started.elapsed())).await;
    let confidence_late = confidence_of(&regions[0], &watched_key).await?;
    let exposure = regions[0]
        .client
        .health()
        .await?
        .exposure
        .unwrap_or_default();
    let partition = PartitionPhase {
        duration_ms: args.partition.as_millis() as u64,
        skew_ms: args.skew.as_millis() as u64,
        allocations: orders.len(),
        confidence_min: confidences.iter().cloned().fold(1.0, f64::min),
        confidence_max: confidences.iter().cloned().fold(0.0, f64::max),
        watched_key,
        confidence_early,
        confidence_late,
        retries_in_lon: retrying.len(),
        duplicates,
        expected_duplicates: exposure.expected_duplicates,
        value_at_risk: exposure.value_at_risk,
    };
    say.say(format!(
        "   sgp answered every request (available in the partition) and said how sure it was: confidence {:.3}..{:.3};",
        partition.confidence_min, partition.confidence_max
    ));
    say.say(format!("   one provisional payment's confidence fell from {confidence_early:.4} to {confidence_late:.4} as the partition lasted."));
    say.say(format!("   {duplicates} of {} retries were allocated a second time in lon: the duplicates of the incident.", retrying.len()));
    let at_risk: Vec<String> = partition
        .value_at_risk
        .iter()
        .map(|(currency, cents)| format!("{:.2} {currency}", cents / 100.0))
        .collect();
    say.say(format!(
        "   before the heal sgp expected {:.1} duplicates among its {} provisional payments, {} at risk.",
        partition.expected_duplicates,
        exposure.provisional,
        if at_risk.is_empty() { "nothing".to_owned() } else { at_risk.join(", ") }
    ));

    say.say("\n3. Heal: the regions sync with no coordinator.");
    for row in links {
        for link in row.iter().flatten() {
            link.heal();
        }
    }
    let healed = Instant::now();
    let mut found = 0;
    wait_for(
        "every region to report every conflict compensated",
        Duration::from_secs(60),
        async || {
            let mut sets = Vec::new();
            for r in regions {
                let open = r
                    .client
                    .conflicts(Some(crate::client::ConflictFilter::Open))
                    .await?;
                if !open.is_empty() {
                    return Ok(false);
                }
                let resolved = r
                    .client
                    .conflicts(Some(crate::client::ConflictFilter::Resolved))
                    .await?;
                sets.push(resolved.into_iter().map(|c| c.key).collect::<BTreeSet<_>>());
            }
            found = sets[0].len();
            Ok(found >= duplicate_keys.len() && sets.windows(2).all(|w| w[0] == w[1]))
        },
    )
    .await?;
    let heal = HealPhase {
        conflicts_found: found,
        seconds_to_compensated: healed.elapsed().as_secs_f64(),
    };
    say.say(format!(
        "   all {found} conflicts found and compensated, the same on every region, {:.1} s after heal (sgp had expected {:.1}).",
        heal.seconds_to_compensated, partition.expected_duplicates
    ));

    let mut reports = Vec::new();
    let mut winners = Vec::new();
    let mut compensated_once = true;
    let mut sample_conflict = None;
    for r in regions {
        let health = r.client.health().await?;
        let conflicts = r.client.conflicts(None).await?;
        let keys: BTreeSet<&str> = conflicts.iter().map(|c| c.key.as_str()).collect();
        compensated_once &= keys == duplicate_keys.iter().map(String::as_str).collect()
            && conflicts.iter().all(each_loser_compensated_once);
        let mut w: Vec<(String, Option<String>)> = conflicts
            .iter()
            .map(|c| (c.key.clone(), c.winner.clone()))
            .collect();
        w.sort();
        winners.push(w);
        let compensated_by_it = conflicts
            .iter()
            .flat_map(|c| &c.compensations)
            .filter(|comp| comp.owner == r.peer_id && comp.state == SUCCEEDED)
            .count();
        let x = &health.extra;
        reports.push(RegionReport {
            region: r.region.clone(),
            keys: x["ledger"]["keys"].as_u64().unwrap_or(0),
            conflicts: conflicts.len(),
            compensated_by_it,
            cross_region_replays: x["cross_region_replays"].as_u64().unwrap_or(0),
            skew_violations: x["clock"]["skew_violations"].as_u64().unwrap_or(0),
            max_offset_ms: x["clock"]["max_observed_offset_ms"].as_i64().unwrap_or(0),
            health: health.status.as_str(),
        });
        if r.region == "nyc" {
            sample_conflict = conflicts.first().map(sample);
        }
    }
    let winners_agree = winners.windows(2).all(|w| w[0] == w[1]);
    let summary = Summary {
        seed,
        regions: regions
            .iter()
            .map(|r| RegionInfo {
                name: r.region.clone(),
                peer_id: r.peer_id.clone(),
                http: r.http.clone(),
            })
            .collect(),
        normal,
        partition,
        heal,
        reports,
        winners_agree,
        every_duplicate_compensated_once: compensated_once,
        sample_conflict,
        ok: winners_agree && compensated_once,
    };
    narrate_reports(&summary, say);
    Ok(summary)
}

/// Each loser of `c` has one compensation, and it succeeded.
fn each_loser_compensated_once(c: &Conflict) -> bool {
    let losers: BTreeSet<&str> = c
        .allocations
        .iter()
        .map(|a| a.txn_id.as_str())
        .filter(|t| Some(*t) != c.winner.as_deref())
        .collect();
    let compensated: Vec<&str> = c
        .compensations
        .iter()
        .filter(|comp| comp.state == SUCCEEDED)
        .map(|comp| comp.txn_id.as_str())
        .collect();
    compensated.len() == losers.len() && compensated.iter().all(|t| losers.contains(t))
}

fn sample(c: &Conflict) -> SampleConflict {
    SampleConflict {
        key: c.key.clone(),
        allocations: c
            .allocations
            .iter()
            .map(|a| SampleAllocation {
                region: a.region.clone(),
                txn_id: a.txn_id.clone(),
                hlc: a.hlc.to_string(),
                confidence_at_allocation: a.confidence,
                role: if Some(a.txn_id.as_str()) == c.winner.as_deref() {
                    "winner"
                } else {
                    "loser"
                },
            })
            .collect(),
    }
}

fn narrate_reports(summary: &Summary, say: Narrator) {
    say.say("\n4. What each region reports:");
    let rows: Vec<Vec<String>> = summary
        .reports
        .iter()
        .map(|r| {
            vec![
                r.region.to_owned(),
                r.keys.to_string(),
                r.conflicts.to_string(),
                r.compensated_by_it.to_string(),
                r.cross_region_replays.to_string(),
                r.skew_violations.to_string(),
                format!("{} ms", r.max_offset_ms),
                r.health.to_owned(),
            ]
        })
        .collect();
    say.say(render(
        &[
            "REGION",
            "KEYS",
            "CONFLICTS",
            "COMPENSATED BY IT",
            "X-REGION REPLAYS",
            "SKEW VIOLATIONS",
            "MAX OFFSET",
            "HEALTH",
        ],
        &rows,
    ));
    let yes_no = |b: bool| if b { "yes" } else { "NO" };
    say.say(format!(
        "   every region picked the same winner for every conflict: {}",
        yes_no(summary.winners_agree)
    ));
    say.say(format!(
        "   every duplicate found by every region and compensated once: {}",
        yes_no(summary.every_duplicate_compensated_once)
    ));
    if let Some(c) = &summary.sample_conflict {
        say.say("\n   One conflict as nyc (a bystander) reports it:");
        for a in &c.allocations {
            let role = if a.role == "winner" {
                "winner"
            } else {
                "loser, compensated by its own region"
            };
            say.say(format!(
                "     {} {} hlc {} confidence-at-allocation {:.3}  {role}",
                a.region, a.txn_id, a.hlc, a.confidence_at_allocation
            ));
        }
    }
    say.say(format!(
        "\n   replay this run's traffic with: oncemesh demo --seed {}",
        summary.seed
    ));
}
