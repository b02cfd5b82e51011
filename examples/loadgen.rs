//! HTTP load generator for `POST /v1/allocations` (prints its figures; not a test).
//!
//! ```text
//! cargo run --release --example loadgen -- --node http://127.0.0.1:7700 \
//!     --clients 50 --seconds 10 [--replay-share 0.1] [--rate 8000] [--api-token T] [--json]
//! cargo run --release --example loadgen -- --count 1000000 --progress 10   # a fixed number of keys
//! ```
//!
//! `--clients` concurrent clients share one keep-alive `reqwest::Client`. Each
//! request is a fresh key `<run prefix>-<client>-<n>` (the prefix is random, so
//! reruns against the same node never collide) or, with probability
//! `--replay-share`, a replay of one of that client's earlier keys with the
//! same payload (expected answer: 200 with `replay: true`).
//!
//! Without `--rate` the clients are closed-loop (each sends its next request as
//! soon as the previous one is answered): that measures the node's maximum
//! throughput. With `--rate R` the clients together offer R requests/s on a
//! fixed schedule, and each latency is measured from the moment the request
//! was *due*, not from when it was sent, so a slow answer that delays the
//! following requests is counted against them too (no coordinated omission).
//!
//! With `--count N` the run ends once N fresh keys were sent (or at
//! `--seconds`, whichever comes first): how `examples/footprint` fills a node.
//!
//! A progress line goes to stderr every `--progress` seconds (default 1); the
//! summary goes to stdout (and, with `--json`, one JSON object as the last
//! line).

use clap::Parser;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Parser, Debug)]
#[command(about = "HTTP load generator for oncemesh POST /v1/allocations")]
struct Args {
    /// Base URL of the node.
    #[arg(long, default_value = "http://127.0.0.1:7700")]
    node: String,
    /// Concurrent clients (each with at most one request in flight).
    #[arg(long, default_value_t = 50)]
    clients: usize,
    /// How long to send requests, in seconds.
    #[arg(long, default_value_t = 10.0)]
    seconds: f64,
    /// Stop after this many fresh keys were sent (over all clients).
    #[arg(long)]
    count: Option<u64>,
    /// Seconds between progress lines on stderr.
    #[arg(long, default_value_t = 1.0)]
    progress: f64,
    /// Share of requests that replay an earlier key of the same client (0..1).
    #[arg(long, default_value_t = 0.0)]
    replay_share: f64,
    /// Offered load in requests/s over all clients (default: as fast as answered).
    #[arg(long)]
    rate: Option<f64>,
    /// Bearer token for the node's API.
    #[arg(long, env = "ONCEMESH_API_TOKEN", hide_env_values = true)]
    api_token: Option<String>,
    /// Key prefix (default: random per run).
    #[arg(long)]
    prefix: Option<String>,
    /// Also print the summary as one JSON object on the last line of stdout.
    #[arg(long)]
    json: bool,
    /// Write every answered request as `<due ms since start> <latency us>` to this file
    /// (to see whether slow answers cluster in time).
    #[arg(long, value_name = "FILE")]
    latency_log: Option<std::path::PathBuf>,
}

#[derive(Default)]
struct Counters {
    /// Fresh keys sent (or about to be), for `--count`.
    issued: AtomicU64,
    created: AtomicU64,
    replays: AtomicU64,
    errors: AtomicU64,
}

/// What one client saw.
#[derive(Default)]
struct ClientReport {
    /// Latencies of answered requests (2xx), microseconds.
    latencies_us: Vec<u32>,
    /// When each of them was due, ms since start (only with --latency-log).
    due_ms: Vec<u32>,
    /// Requests whose replay did not come back as a replay.
    wrong_replays: u64,
    /// First few error messages.
    errors: Vec<String>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    anyhow::ensure!(args.clients > 0, "--clients must be at least 1");
    anyhow::ensure!(
        (0.0..=1.0).contains(&args.replay_share),
        "--replay-share must be within 0..=1"
    );
    if let Some(rate) = args.rate {
        anyhow::ensure!(rate > 0.0, "--rate must be positive");
    }
    anyhow::ensure!(args.progress > 0.0, "--progress must be positive");
    let prefix = args
        .prefix
        .clone()
        .unwrap_or_else(|| format!("lg{:012x}", rand::random::<u64>() >> 16));
    let client = oncemesh::tls::http_client()
        .pool_max_idle_per_host(args.clients)
        .tcp_nodelay(true)
        .timeout(Duration::from_secs(30))
        .build()?;
    let url = format!("{}/v1/allocations", args.node.trim_end_matches('/'));

    // Fail fast (and clearly) when the node is not there.
    let health = format!("{}/v1/health", args.node.trim_end_matches('/'));
    client
        .get(&health)
        .send()
        .await
        .map_err(|e| anyhow::anyhow!("node at {} does not answer: {e}", args.node))?;

    let counters = Arc::new(Counters::default());
    let started = Instant::now();
    let deadline = started + Duration::from_secs_f64(args.seconds);
    let mut tasks = Vec::with_capacity(args.clients);
    for id in 0..args.clients {
        let client = client.clone();
        let url = url.clone();
        let token = args.api_token.clone();
        let counters = counters.clone();
        let prefix = prefix.clone();
        let replay_share = args.replay_share;
        let count = args.count;
        // Client `id` sends its k-th request at start + (k * clients + id) / rate.
        let schedule = args.rate.map(|rate| {
            let period = Duration::from_secs_f64(args.clients as f64 / rate);
            let offset = Duration::from_secs_f64(id as f64 / rate);
            (period, offset)
        });
        tasks.push(tokio::spawn(async move {
            run_client(RunClient {
                id,
                client,
                url,
                token,
                prefix,
                replay_share,
                count,
                schedule,
                started,
                deadline,
                counters,
            })
            .await
        }));
    }

    let progress = {
        let counters = counters.clone();
        let every = args.progress;
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs_f64(every));
            tick.tick().await;
            let mut last = 0u64;
            loop {
                tick.tick().await;
                let created = counters.created.load(Ordering::Relaxed);
                let replays = counters.replays.load(Ordering::Relaxed);
                let errors = counters.errors.load(Ordering::Relaxed);
                eprintln!(
                    "[{:>5.1}s] allocations {created:>9}  rate {:>7.0}/s  replays {replays:>7}  errors {errors}",
                    started.elapsed().as_secs_f64(),
                    (created - last) as f64 / every,
                );
                last = created;
            }
        })
    };

    let mut latencies: Vec<u32> = Vec::new();
    let mut timeline: Vec<(u32, u32)> = Vec::new();
    let mut wrong_replays = 0;
    let mut error_samples: Vec<String> = Vec::new();
    for task in tasks {
        let report = task.await?;
        if args.latency_log.is_some() {
            timeline.extend(
                report
                    .due_ms
                    .iter()
                    .copied()
                    .zip(report.latencies_us.iter().copied()),
            );
        }
        latencies.extend(report.latencies_us);
        wrong_replays += report.wrong_replays;
        for e in report.errors {
            if error_samples.len() < 5 {
                error_samples.push(e);
            }
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    progress.abort();
    latencies.sort_unstable();
    if let Some(path) = &args.latency_log {
        use std::io::Write;
        timeline.sort_unstable();
        let mut out = std::io::BufWriter::new(std::fs::File::create(path)?);
        for (due, latency) in &timeline {
            writeln!(out, "{due} {latency}")?;
        }
        out.flush()?;
    }

    let created = counters.created.load(Ordering::Relaxed);
    let replays = counters.replays.load(Ordering::Relaxed);
    let errors = counters.errors.load(Ordering::Relaxed);
    let pct = |p: f64| -> f64 {
        if latencies.is_empty() {
            return f64::NAN;
        }
        let rank = ((p / 100.0) * latencies.len() as f64).ceil() as usize;
        latencies[rank.clamp(1, latencies.len()) - 1] as f64 / 1000.0
    };
    let (p50, p90, p99, max) = (pct(50.0), pct(90.0), pct(99.0), pct(100.0));
    let mode = match args.rate {
        Some(r) => format!("fixed offered load {r:.0} req/s (latency from due time)"),
        None => "closed loop (as fast as answered)".to_owned(),
    };
    println!(
        "loadgen: {} clients, {:.1} s, {mode}, replay share {}, node {}",
        args.clients, elapsed, args.replay_share, args.node
    );
    println!(
        "allocations/s {:>9.0}   ({created} new allocations)",
        created as f64 / elapsed
    );
    println!(
        "replays/s     {:>9.0}   ({replays} replays{})",
        replays as f64 / elapsed,
        if wrong_replays > 0 {
            format!(", {wrong_replays} NOT answered as replay")
        } else {
            String::new()
        }
    );
    println!(
        "requests/s    {:>9.0}",
        (created + replays) as f64 / elapsed
    );
    println!("errors        {errors:>9}");
    for e in &error_samples {
        println!("  error: {e}");
    }
    println!("latency ms    p50 {p50:.2}  p90 {p90:.2}  p99 {p99:.2}  max {max:.2}");
    if args.json {
        println!(
            "{}",
            serde_json::json!({
                "clients": args.clients,
                "seconds": elapsed,
                "rate": args.rate,
                "replay_share": args.replay_share,
                "allocations_per_s": created as f64 / elapsed,
                "replays_per_s": replays as f64 / elapsed,
                "created": created,
                "replays": replays,
                "wrong_replays": wrong_replays,
                "errors": errors,
                "p50_ms": p50, "p90_ms": p90, "p99_ms": p99, "max_ms": max,
                "prefix": prefix,
            })
        );
    }
    Ok(())
}

struct RunClient {
    id: usize,
    client: reqwest::Client,
    url: String,
    token: Option<String>,
    prefix: String,
    replay_share: f64,
    count: Option<u64>,
    schedule: Option<(Duration, Duration)>,
    started: Instant,
    deadline: Instant,
    counters: Arc<Counters>,
}

async fn run_client(c: RunClient) -> ClientReport {
    let mut report = ClientReport::default();
    let mut made: u64 = 0;
    let payload = serde_json::json!({"amount": 1250, "currency": "EUR"});
    let mut k: u32 = 0;
    loop {
        let due = match c.schedule {
            Some((period, offset)) => {
                let due = c.started + offset + period * k;
                k += 1;
                if due >= c.deadline {
                    break;
                }
                tokio::time::sleep_until(due.into()).await;
                due
            }
            None => {
                let now = Instant::now();
                if now >= c.deadline {
                    break;
                }
                now
            }
        };
        let replay = made > 0 && c.replay_share > 0.0 && rand::random_bool(c.replay_share);
        if !replay
            && c.count
                .is_some_and(|count| c.counters.issued.fetch_add(1, Ordering::Relaxed) >= count)
        {
            break;
        }
        let n = if replay {
            rand::random_range(0..made)
        } else {
            made += 1;
            made - 1
        };
        let key = format!("{}-{}-{}", c.prefix, c.id, n);
        let mut request = c
            .client
            .post(&c.url)
            .json(&serde_json::json!({"key": key, "payload": payload}));
        if let Some(token) = &c.token {
            request = request.bearer_auth(token);
        }
        let outcome = match request.send().await {
            Ok(response) => {
                let status = response.status();
                match response.bytes().await {
                    Ok(body) if status.is_success() => Ok((status, body)),
                    Ok(body) => Err(format!(
                        "{status}: {}",
                        String::from_utf8_lossy(&body[..body.len().min(200)])
                    )),
                    Err(e) => Err(format!("reading the answer: {e}")),
                }
            }
            Err(e) => Err(format!("request: {e}")),
        };
        let latency = due.elapsed();
        match outcome {
            Ok((status, body)) => {
                report
                    .latencies_us
                    .push(latency.as_micros().min(u32::MAX as u128) as u32);
                report
                    .due_ms
                    .push(due.duration_since(c.started).as_millis() as u32);
                let answered_replay = status == reqwest::StatusCode::OK
                    && serde_json::from_slice::<serde_json::Value>(&body)
                        .ok()
                        .and_then(|v| v.get("replay").and_then(|r| r.as_bool()))
                        .unwrap_or(false);
                if replay {
                    c.counters.replays.fetch_add(1, Ordering::Relaxed);
                    if !answered_replay {
                        report.wrong_replays += 1;
                    }
                } else if status == reqwest::StatusCode::CREATED {
                    c.counters.created.fetch_add(1, Ordering::Relaxed);
                } else {
                    // A fresh key answered as a replay: a collision with an
                    // earlier run, or a bug. Count it as an error.
                    c.counters.errors.fetch_add(1, Ordering::Relaxed);
                    if report.errors.len() < 5 {
                        report
                            .errors
                            .push(format!("fresh key {key} answered {status}"));
                    }
                }
            }
            Err(e) => {
                c.counters.errors.fetch_add(1, Ordering::Relaxed);
                if report.errors.len() < 5 {
                    report.errors.push(e);
                }
                if !replay {
                    // Keep the key out of the replay pool: it may not exist.
                    made -= 1;
                }
            }
        }
    }
    report
}
