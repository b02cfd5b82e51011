//! Cost of a scrape (prints its figures; not a test): times `GET /metrics`
//! and `GET /v1/health` on a running node, one request at a time, so the
//! figure is the node's answer time for each, not a throughput.
//!
//! ```text
//! cargo run --release --example scrape -- --node http://127.0.0.1:7700 [--count 200]
//! ```
//!
//! Fill the node first (e.g. `examples/loadgen`), then run this; it prints
//! the node's key count from `/v1/health`, then per route the body size and
//! the p50, p99 and largest latency over `--count` requests (after 10 warm-up
//! requests each), and `--json` adds one JSON object as the last line.

use clap::Parser;
use std::time::{Duration, Instant};

#[derive(Parser, Debug)]
#[command(about = "Times GET /metrics and GET /v1/health on a running oncemesh node")]
struct Args {
    /// Base URL of the node.
    #[arg(long, default_value = "http://127.0.0.1:7700")]
    node: String,
    /// Requests per route.
    #[arg(long, default_value_t = 200)]
    count: usize,
    /// Pause between two requests, ms (a scraper asks every few seconds,
    /// not back to back).
    #[arg(long, default_value_t = 20)]
    pause_ms: u64,
    /// Print a JSON summary as the last line too.
    #[arg(long)]
    json: bool,
}

fn quantile(sorted: &[Duration], q: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    anyhow::ensure!(args.count > 0, "--count must be at least 1");
    let client = oncemesh::tls::http_client().build()?;
    let base = args.node.trim_end_matches('/');
    let health: serde_json::Value = client
        .get(format!("{base}/v1/health"))
        .send()
        .await?
        .json()
        .await?;
    let keys = health["ledger"]["keys"].as_u64().unwrap_or(0);
    println!("node {base}: {keys} keys, status {}", health["status"]);
    let mut summary = serde_json::json!({ "keys": keys });
    for route in ["/metrics", "/v1/health"] {
        let url = format!("{base}{route}");
        let mut times = Vec::with_capacity(args.count);
        let mut bytes = 0;
        for i in 0..args.count + 10 {
            let started = Instant::now();
            let body = client.get(&url).send().await?.bytes().await?;
            let took = started.elapsed();
            if i >= 10 {
                times.push(took);
                bytes = body.len();
            }
            tokio::time::sleep(Duration::from_millis(args.pause_ms)).await;
        }
        times.sort();
        let (p50, p99, max) = (
            quantile(&times, 0.5),
            quantile(&times, 0.99),
            *times.last().unwrap_or(&Duration::ZERO),
        );
        println!(
            "GET {route}: {bytes} bytes; p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms over {} requests",
            p50.as_secs_f64() * 1e3,
            p99.as_secs_f64() * 1e3,
            max.as_secs_f64() * 1e3,
            times.len()
        );
        summary[route] = serde_json::json!({
            "bytes": bytes, "p50_ms": p50.as_secs_f64() * 1e3,
            "p99_ms": p99.as_secs_f64() * 1e3, "max_ms": max.as_secs_f64() * 1e3,
        });
    }
    if args.json {
        println!("{summary}");
    }
    Ok(())
}
