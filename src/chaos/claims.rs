//! Settlement claims of a chaos run: while the customers pay, every few
//! hundred milliseconds ask each node about a handful of keys
//! (`GET /v1/allocations/{key}`) and record each that it calls settled with
//! a single allocation ([`History::settled_claim`]). The checker then fails
//! the run if a competing allocation of such a key had been acknowledged
//! anywhere before the question was asked: from settled on, a retry
//! anywhere must be a replay.
//!
//! The keys asked about are mostly the latest ones retried in another
//! region (the only ones that can end in a conflict, so the only ones a
//! node can call settled wrongly), and a few of any age. At its rate (about
//! 36 cheap reads a second on three nodes, beside some 60 durable writes)
//! it does not change what the customers see.
//!
//! [`History::settled_claim`]: crate::check::History::settled_claim

use super::workload::Recorder;
use crate::client::Client;
use rand::rngs::StdRng;
use rand::SeedableRng;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Time between two rounds of questions.
const EVERY: Duration = Duration::from_millis(500);
/// Latest retried keys asked about per round.
const RETRIED_PER_ROUND: usize = 4;
/// Keys of any age asked about per round.
const ANY_PER_ROUND: usize = 2;
/// How long one node may take over one round's questions (a paused node
/// must not hold up the others' next round).
const ROUND_TIMEOUT: Duration = Duration::from_millis(1_000);

/// Asks the nodes (`clients`, by index) about keys of the `recorder`'s
/// history until `stop`; the claims go into the history. Returns how many
/// were made.
pub async fn sample(
    clients: Vec<Client>,
    recorder: Arc<Recorder>,
    seed: u64,
    stop: CancellationToken,
) -> usize {
    // A stream of its own, apart from the customers' (`seed * 1000 + line`).
    let mut rng = StdRng::seed_from_u64(seed.wrapping_mul(1_000).wrapping_add(999));
    let claims = AtomicUsize::new(0);
    loop {
        tokio::select! {
            biased;
            _ = stop.cancelled() => return claims.into_inner(),
            _ = tokio::time::sleep(EVERY) => {}
        }
        let mut keys = recorder.recently_retried(RETRIED_PER_ROUND);
        keys.extend(recorder.history().some_keys(&mut rng, ANY_PER_ROUND));
        keys.sort_unstable();
        keys.dedup();
        let rounds = clients.iter().enumerate().map(|(node, client)| {
            let asking = ask(&recorder, &claims, node, client, &keys);
            tokio::time::timeout(ROUND_TIMEOUT, asking)
        });
        futures::future::join_all(rounds).await;
    }
}

/// Asks `node` about each of `keys`, records the settled ones and counts
/// them in `claims`.
async fn ask(
    recorder: &Recorder,
    claims: &AtomicUsize,
    node: usize,
    client: &Client,
    keys: &[String],
) {
    for key in keys {
        // The node answers after it is asked: a rival acknowledged before
        // the question certainly came before the claim.
        let at = recorder.now();
        let Ok(Some(report)) = client.allocation(key).await else {
            continue;
        };
        if let [only] = report.allocations.as_slice() {
            if report.settled {
                recorder
                    .history()
                    .settled_claim(at, node, key, only.txn_id.clone());
                claims.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}
