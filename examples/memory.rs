//! Memory per retained token (prints its figures; not a test).
//!
//! ```text
//! cargo run --release --example memory -- [TOKENS] [--batch 500]
//! ```
//!
//! Builds an in-process ledger of TOKENS unique allocations (default 1M), no
//! HTTP and no disk: requests go through `allocate_batch` in batches of one
//! shard's keys, and every batch is folded into its document
//! (`fold_pending`), as a node does under load. Prints the resident set size
//! (RSS, from /proc/self/status) before and after, with a progress line every
//! tenth of the way, and the RSS growth per token: the index plus the
//! automerge documents.

use oncemesh::key::{fingerprint, IdempotencyKey};
use oncemesh::ledger::{AllocateRequest, Ledger, NodeIdentity, SHARD_COUNT};
use std::time::Instant;

fn rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find(|l| l.starts_with("VmRSS:"))?
                .split_whitespace()
                .nth(1)?
                .parse::<u64>()
                .ok()
        })
        .map_or(0, |kib| kib * 1024)
}

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let mut tokens: usize = 1_000_000;
    let mut batch: usize = 500;
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--batch" => {
                batch = args
                    .next()
                    .ok_or_else(|| anyhow::anyhow!("--batch needs a number"))?
                    .parse()?
            }
            n => tokens = n.parse().map_err(|e| anyhow::anyhow!("TOKENS {n}: {e}"))?,
        }
    }
    anyhow::ensure!(batch > 0, "--batch must be at least 1");
    let ledger = Ledger::in_memory(
        NodeIdentity {
            region: "mem".into(),
            node: "12D3KooWMemoryExampleNode".into(),
        },
        vec!["12D3KooWMemoryExamplePeer".into()],
    );
    let payload = serde_json::json!({"amount": 1250, "currency": "EUR", "order": "o-1"});
    let fp = fingerprint(&payload)?;
    let before = rss_bytes();
    let started = Instant::now();
    // Keys are bucketed by shard so each batch is one shard's, as the node's
    // per-shard queues make them.
    let mut buckets: Vec<Vec<AllocateRequest>> = vec![Vec::new(); SHARD_COUNT];
    let mut made = 0usize;
    let mut next_report = tokens / 10;
    for i in 0..tokens {
        let key = IdempotencyKey::parse(&format!("mem-{i:010}"))?;
        let shard = key.shard(SHARD_COUNT);
        buckets[shard].push(AllocateRequest {
            key,
            fingerprint: fp.clone(),
            confidence: 0.99,
            stake: None,
        });
        if buckets[shard].len() == batch || i + 1 == tokens {
            for (shard, requests) in buckets.iter_mut().enumerate() {
                if requests.len() < batch && i + 1 < tokens {
                    continue;
                }
                for outcome in ledger.allocate_batch(shard, requests) {
                    anyhow::ensure!(!outcome?.replay, "keys are unique");
                }
                made += requests.len();
                requests.clear();
            }
            ledger.fold_pending();
        }
        if made >= next_report && next_report > 0 {
            eprintln!(
                "{made} tokens, RSS {} MiB, {:.0} allocations/s",
                rss_bytes() >> 20,
                made as f64 / started.elapsed().as_secs_f64()
            );
            next_report += tokens / 10;
        }
    }
    let stats = ledger.stats();
    anyhow::ensure!(
        stats.keys as usize == tokens,
        "ledger holds {} keys",
        stats.keys
    );
    let after = rss_bytes();
    let per_token = after.saturating_sub(before) as f64 / tokens as f64;
    println!(
        "{tokens} tokens in {} documents, built in {:.1} s: RSS {} MiB -> {} MiB, {per_token:.0} bytes per token",
        stats.documents,
        started.elapsed().as_secs_f64(),
        before >> 20,
        after >> 20,
    );
    Ok(())
}
