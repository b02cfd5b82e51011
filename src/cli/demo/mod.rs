//! `oncemesh demo`: the incident that motivates oncemesh, replayed on one
//! machine. Three regions run as separate `oncemesh run` processes on
//! loopback, every link through a relay the demo can cut. Customers pay in
//! their home region and some retries land in another region; then
//! Singapore is cut off while retries keep crossing between Singapore and
//! London, London's clock runs ahead, and finally the network heals. The
//! demo then prints what each region reports: the same conflicts, the same
//! winners, every loser compensated by its own node, and the precursors
//! (cross-region retries, clock skew) that announced them.

mod proxy;

use super::table::render;
use anyhow::{bail, Context};
use clap::Args;
use proxy::Link;
use serde_json::{json, Value};
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

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
}

const REGIONS: [&str; 3] = ["sgp", "lon", "nyc"];

struct Region {
    name: &'static str,
    url: String,
    child: Child,
}

/// Runs the demo.
pub async fn run(args: DemoArgs) -> anyhow::Result<i32> {
    let (root, temporary) = match &args.data_dir {
        Some(dir) => (dir.clone(), false),
        None => (
            std::env::temp_dir().join(format!("oncemesh-demo-{}", std::process::id())),
            true,
        ),
    };
    std::fs::create_dir_all(&root).with_context(|| format!("creating {}", root.display()))?;
    let outcome = play(&args, &root).await;
    if temporary {
        let _ = std::fs::remove_dir_all(&root);
    } else {
        println!("\ndata dirs and node logs kept in {}", root.display());
    }
    outcome
}

async fn play(args: &DemoArgs, root: &std::path::Path) -> anyhow::Result<i32> {
    println!(
        "oncemesh demo: three regions on this machine ({})",
        REGIONS.join(", ")
    );
    let (mut regions, links) = start_regions(args, root).await?;
    let http = crate::tls::http_client().build()?;
    let result = scenario(args, &http, &regions, &links).await;
    for region in &mut regions {
        let _ = region.child.start_kill();
        let _ = region.child.wait().await;
    }
    result
}

/// Starts three nodes wired through relays; `links[i][j]` carries i's dials to j.
async fn start_regions(
    args: &DemoArgs,
    root: &std::path::Path,
) -> anyhow::Result<(Vec<Region>, Vec<Vec<Option<Link>>>)> {
    let exe = std::env::current_exe().context("locating the oncemesh binary")?;
    let mut ids = Vec::new();
    let mut ports = Vec::new();
    for name in REGIONS {
        let keypair = crate::node::identity::load_or_create(&root.join(name))?;
        ids.push(keypair.public().to_peer_id().to_string());
        let probe = std::net::TcpListener::bind("127.0.0.1:0")?;
        ports.push(probe.local_addr()?.port());
    }
    let mut links: Vec<Vec<Option<Link>>> = Vec::new();
    for i in 0..3 {
        let mut row = Vec::new();
        for (j, port) in ports.iter().enumerate() {
            row.push(if i == j {
                None
            } else {
                Some(Link::start(([127, 0, 0, 1], *port).into()).await?)
            });
        }
        links.push(row);
    }
    let mut regions = Vec::new();
    for (i, name) in REGIONS.iter().enumerate() {
        let mut command = Command::new(&exe);
        command
            .arg("run")
            .args(["--region", name])
            .arg("--data-dir")
            .arg(root.join(name))
            .args(["--listen", &format!("/ip4/127.0.0.1/tcp/{}", ports[i])])
            .args(["--http", "127.0.0.1:0"]);
        for (j, link) in links[i].iter().enumerate() {
            if let Some(link) = link {
                command.args([
                    "--peer",
                    &format!("/ip4/127.0.0.1/tcp/{}/p2p/{}", link.addr.port(), ids[j]),
                ]);
            }
        }
        if *name == "lon" {
            command.args([
                "--drill-clock-offset",
                &format!("{}ms", args.skew.as_millis()),
            ]);
        }
        let log = std::fs::File::create(root.join(format!("{name}.log")))?;
        let mut child = command
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log))
            .kill_on_drop(true)
            .spawn()
            .context("starting a node")?;
        let stdout = child.stdout.take().context("node stdout")?;
        let mut lines = BufReader::new(stdout).lines();
        let banner = tokio::time::timeout(Duration::from_secs(20), lines.next_line())
            .await
            .context("a node did not start within 20 s")??
            .context("a node exited before starting")?;
        let http = banner
            .split_whitespace()
            .find_map(|t| t.strip_prefix("http="))
            .context("start line without http=")?;
        println!("  {banner}");
        regions.push(Region {
            name,
            url: format!("http://{http}"),
            child,
        });
    }
    Ok((regions, links))
}

async fn get(http: &reqwest::Client, url: &str) -> anyhow::Result<Value> {
    Ok(http.get(url).send().await?.json().await?)
}

async fn allocate(
    http: &reqwest::Client,
    region: &Region,
    key: &str,
    payload: Value,
) -> anyhow::Result<Value> {
    let response = http
        .post(format!("{}/v1/allocations", region.url))
        .json(&json!({ "key": key, "payload": payload }))
        .send()
        .await?;
    Ok(response.json().await?)
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

async fn scenario(
    args: &DemoArgs,
    http: &reqwest::Client,
    regions: &[Region],
    links: &[Vec<Option<Link>>],
) -> anyhow::Result<i32> {
    wait_for(
        "the regions to connect",
        Duration::from_secs(30),
        async || {
            for r in regions {
                if get(http, &format!("{}/v1/health", r.url)).await?["peers"]["connected"] != 2 {
                    return Ok(false);
                }
            }
            Ok(true)
        },
    )
    .await?;

    println!("\n1. Normal traffic: {} customers pay in their home region; every 7th client retries in another region.", args.customers);
    let payment = |c: usize| json!({ "customer": c, "amount_cents": 1000 + c });
    for c in 0..args.customers {
        allocate(http, &regions[c % 3], &format!("pay-{c}"), payment(c)).await?;
    }
    // Clients whose answer was slow retry a moment later, elsewhere; by then
    // replication has carried the allocation: a replay, not a duplicate.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut replays = 0;
    for c in (0..args.customers).step_by(7) {
        let other = &regions[(c + 1) % 3];
        if allocate(http, other, &format!("pay-{c}"), payment(c)).await?["replay"] == true {
            replays += 1;
        }
    }
    println!("   {replays} cross-region retries answered as replays of the original transaction.");

    println!(
        "\n2. Partition: Singapore is cut off for {:?}; London's clock runs {:?} ahead. Customers of sgp whose\n   request times out retry in lon.",
        args.partition, args.skew
    );
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
    let order = |c: usize| json!({ "customer": c, "amount_cents": 5000 + c });
    for c in 0..args.customers {
        let made = allocate(http, &regions[0], &format!("order-{c}"), order(c)).await?;
        confidences.push(made["confidence"].as_f64().unwrap_or(1.0));
    }
    let mut duplicates = 0;
    for c in (0..args.customers).step_by(4) {
        let retry = allocate(http, &regions[1], &format!("order-{c}"), order(c)).await?;
        if retry["replay"] == false {
            duplicates += 1;
        }
    }
    let watched = get(http, &format!("{}/v1/allocations/order-1", regions[0].url)).await?;
    let early = watched["allocations"][0]["confidence"]
        .as_f64()
        .unwrap_or(1.0);
    tokio::time::sleep(args.partition.saturating_sub(started.elapsed())).await;
    let watched = get(http, &format!("{}/v1/allocations/order-1", regions[0].url)).await?;
    let late = watched["allocations"][0]["confidence"]
        .as_f64()
        .unwrap_or(1.0);
    let min = confidences.iter().cloned().fold(1.0, f64::min);
    println!(
        "   sgp answered every request (available in the partition) and said how sure it was: confidence {min:.3}..{:.3};",
        confidences.iter().cloned().fold(0.0, f64::max)
    );
    println!("   one provisional payment's confidence fell from {early:.4} to {late:.4} as the partition lasted.");
    println!("   {duplicates} retries were allocated a second time in lon: the duplicates of the incident.");

    println!("\n3. Heal: the regions sync with no coordinator.");
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
                let open = get(http, &format!("{}/v1/conflicts?state=open", r.url)).await?;
                let resolved = get(http, &format!("{}/v1/conflicts?state=resolved", r.url)).await?;
                if open["conflicts"].as_array().is_none_or(|l| !l.is_empty()) {
                    return Ok(false);
                }
                let mut keys: Vec<String> = resolved["conflicts"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|c| c["key"].to_string())
                    .collect();
                keys.sort();
                sets.push(keys);
            }
            found = sets[0].len();
            Ok(found >= duplicates && sets.windows(2).all(|w| w[0] == w[1]))
        },
    )
    .await?;
    println!(
        "   all {found} conflicts found and compensated, the same on every region, {:.1} s after heal.",
        healed.elapsed().as_secs_f64()
    );

    println!("\n4. What each region reports:");
    let mut rows = Vec::new();
    let mut winners = Vec::new();
    for r in regions {
        let health = get(http, &format!("{}/v1/health", r.url)).await?;
        let conflicts = get(http, &format!("{}/v1/conflicts", r.url)).await?;
        let list = conflicts["conflicts"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        let mut w: Vec<String> = list
            .iter()
            .map(|c| format!("{}={}", c["key"], c["winner"]))
            .collect();
        w.sort();
        winners.push(w);
        let compensated_here = list
            .iter()
            .flat_map(|c| c["compensations"].as_array().cloned().unwrap_or_default())
            .filter(|comp| comp["owner"] == health["peer_id"] && comp["state"] == "succeeded")
            .count();
        rows.push(vec![
            r.name.to_owned(),
            health["ledger"]["keys"].to_string(),
            list.len().to_string(),
            compensated_here.to_string(),
            health["cross_region_replays"].to_string(),
            health["clock"]["skew_violations"].to_string(),
            format!("{} ms", health["clock"]["max_observed_offset_ms"]),
            health["status"].as_str().unwrap_or("?").to_owned(),
        ]);
    }
    println!(
        "{}",
        render(
            &[
                "REGION",
                "KEYS",
                "CONFLICTS",
                "COMPENSATED BY IT",
                "X-REGION REPLAYS",
                "SKEW VIOLATIONS",
                "MAX OFFSET",
                "HEALTH"
            ],
            &rows
        )
    );
    let agree = winners.windows(2).all(|w| w[0] == w[1]);
    println!(
        "   every region picked the same winner for every conflict: {}",
        if agree { "yes" } else { "NO" }
    );
    let sample = get(http, &format!("{}/v1/conflicts", regions[2].url)).await?;
    if let Some(c) = sample["conflicts"].as_array().and_then(|l| l.first()) {
        println!("\n   One conflict as nyc (a bystander) reports it:");
        for a in c["allocations"].as_array().into_iter().flatten() {
            let role = if a["txn_id"] == c["winner"] {
                "winner"
            } else {
                "loser, compensated by its own region"
            };
            println!(
                "     {} {} hlc {} confidence-at-allocation {:.3}  {}",
                a["region"].as_str().unwrap_or("?"),
                a["txn_id"].as_str().unwrap_or("?"),
                a["hlc"].as_str().unwrap_or("?"),
                a["confidence"].as_f64().unwrap_or(0.0),
                role
            );
        }
    }
    Ok(if agree { 0 } else { 1 })
}
