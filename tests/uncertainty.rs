//! Explicit uncertainty on real processes: three nodes through the fault
//! relay, one region cut off twice while a quarter of its customers fail
//! over to another region. The cut-off node's confidence must learn from the
//! first heal, its live exposure (expected duplicates, value at risk per
//! currency) must mean what it says and fall to zero once everything has
//! resolved, `/v1/calibration` must list both episodes with the
//! duplicates expected beside those found, and what the model learnt must
//! outlive a restart.

mod support;

use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::time::Duration;
use support::{Cluster, ClusterOptions};

/// Allocations the cut-off region makes in each partition.
const PER_PARTITION: usize = 60;
/// Every `FAILOVER`-th customer of the cut-off region also tries London.
const FAILOVER: usize = 4;

async fn all_in_sync(c: &Cluster) {
    for node in 0..c.len() {
        let want = c.len() - 1;
        assert!(
            c.wait_until_async(Duration::from_secs(20), async || {
                let (_, h) = c.node(node).get_json("/v1/health").await;
                h["peers"]["connected"] == want && h["ledger"]["provisional"] == 0
            })
            .await,
            "node {node} never got in sync with its peers\n{}",
            c.logs(30)
        );
    }
}

/// What one partition of node 0 showed.
struct Round {
    mean_confidence: f64,
    expected_duplicates: f64,
    conflicts_found: usize,
}

async fn exposure(c: &Cluster, node: usize) -> Value {
    c.node(node).get_json("/v1/health").await.1["exposure"].clone()
}

/// Cuts node 0 off, makes its allocations (a quarter of them also made in
/// London by customers failing over), checks the live exposure, heals, and
/// counts the conflicts the heal reveals.
async fn partition_round(c: &Cluster, round: usize) -> Round {
    c.isolate(0);
    assert!(
        c.wait_until_async(Duration::from_secs(10), async || {
            c.node(0).get_json("/v1/health").await.1["peers"]["connected"] == 0
        })
        .await,
        "node 0 still connected after the cut"
    );
    let mut confidences = Vec::new();
    let mut at_risk: BTreeMap<&str, f64> = BTreeMap::new();
    for i in 0..PER_PARTITION {
        let key = format!("round{round}-pay{i}");
        let currency = if i % 3 == 0 { "USD" } else { "EUR" };
        let amount = 100.0 + i as f64;
        let body = json!({"key": key, "payload": {"amount": amount, "currency": currency}});
        let (code, made) = c.node(0).post_json("/v1/allocations", &body).await;
        assert_eq!(code, 201, "{made}");
        let confidence = made["confidence_at_allocation"].as_f64().unwrap();
        confidences.push(confidence);
        *at_risk.entry(currency).or_default() += (1.0 - confidence) * amount;
        if i % FAILOVER == 0 {
            let (code, v) = c.node(1).post_json("/v1/allocations", &body).await;
            assert_eq!(
                code, 201,
                "London cannot see Singapore's allocation yet: {v}"
            );
        }
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    let mean_confidence = confidences.iter().sum::<f64>() / confidences.len() as f64;
    let expected: f64 = confidences.iter().map(|c| 1.0 - c).sum();

    // While cut off: the exposure is the sum over what was made, per currency.
    let live = exposure(c, 0).await;
    let live_expected = live["expected_duplicates"].as_f64().unwrap();
    assert!(
        (live_expected - expected).abs() < 1e-6,
        "expected duplicates {live_expected}, allocations say {expected}: {live}"
    );
    for (currency, value) in &at_risk {
        let shown = live["value_at_risk"][currency].as_f64().unwrap_or(-1.0);
        assert!(
            (shown - value).abs() < 1e-6 * value.max(1.0),
            "{currency}: value at risk {shown}, allocations say {value}: {live}"
        );
    }
    assert_eq!(live["provisional"], PER_PARTITION, "{live}");
    let metric = c
        .node(0)
        .metric("oncemesh_exposure_expected_duplicates")
        .await;
    assert!(
        (metric - expected).abs() < 1e-6,
        "metric {metric}, expected {expected}"
    );

    c.heal_all();
    let failovers = PER_PARTITION.div_ceil(FAILOVER);
    let prefix = format!("round{round}-");
    let found = async || {
        let (_, report) = c.node(0).get_json("/v1/conflicts").await;
        report["conflicts"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|k| k["key"].as_str().unwrap().starts_with(&prefix))
            .count()
    };
    assert!(
        c.wait_until_async(Duration::from_secs(30), async || found().await == failovers)
            .await,
        "round {round}: {} of {failovers} conflicts found after heal\n{}",
        found().await,
        c.logs(30)
    );
    // Once everything settled or met its competitor, nothing is at risk.
    for node in 0..c.len() {
        assert!(
            c.wait_until_async(Duration::from_secs(20), async || {
                let e = exposure(c, node).await;
                e["expected_duplicates"] == 0.0 && e["provisional"] == 0
            })
            .await,
            "node {node} still shows exposure after heal: {}",
            exposure(c, node).await
        );
    }
    let after = exposure(c, 0).await;
    assert_eq!(after["value_at_risk"], json!({}), "{after}");
    Round {
        mean_confidence,
        expected_duplicates: expected,
        conflicts_found: found().await,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_off_region_learns_failover_from_its_first_heal() {
    let c = Cluster::start(3, ClusterOptions::default()).await;
    all_in_sync(&c).await;
    let first = partition_round(&c, 1).await;
    all_in_sync(&c).await;
    let second = partition_round(&c, 2).await;
    println!(
        "first partition: mean confidence {:.4}, expected duplicates {:.2}, conflicts found {}",
        first.mean_confidence, first.expected_duplicates, first.conflicts_found
    );
    println!(
        "second partition: mean confidence {:.4}, expected duplicates {:.2}, conflicts found {}",
        second.mean_confidence, second.expected_duplicates, second.conflicts_found
    );
    assert!(
        second.mean_confidence < first.mean_confidence - 0.02,
        "the first heal taught nothing: {:.4} then {:.4}",
        first.mean_confidence,
        second.mean_confidence
    );
    let found = second.conflicts_found as f64;
    // From the second partition on, the confidence given is the share that
    // ended without a conflict (as the simulation requires of it).
    let conflict_free = 1.0 - found / PER_PARTITION as f64;
    assert!(
        (second.mean_confidence - conflict_free).abs() <= 0.05,
        "second partition: mean confidence {:.4}, {conflict_free:.4} ended without a conflict",
        second.mean_confidence
    );
    assert!(
        second.expected_duplicates >= found / 2.0 && second.expected_duplicates <= found * 2.0,
        "second partition: {:.2} duplicates expected, {found} found",
        second.expected_duplicates
    );

    // The score: both episodes, each with what was expected and what was found.
    let (code, calibration) = c.node(0).get_json("/v1/calibration").await;
    assert_eq!(code, 200, "{calibration}");
    let episodes: Vec<&Value> = calibration["episodes"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["allocations"].as_u64().unwrap() > 0)
        .collect();
    assert_eq!(episodes.len(), 2, "{calibration}");
    for (episode, round) in episodes.iter().zip([&first, &second]) {
        assert_eq!(episode["worst"], "isolated", "{episode}");
        assert!(episode["ended_ms"].is_u64(), "{episode}");
        assert_eq!(episode["allocations"], PER_PARTITION, "{episode}");
        assert_eq!(episode["resolved"], PER_PARTITION, "{episode}");
        assert_eq!(
            episode["conflicts_found"], round.conflicts_found,
            "{episode}"
        );
        let expected = episode["expected_duplicates"].as_f64().unwrap();
        assert!(
            (expected - round.expected_duplicates).abs() < 1e-6,
            "{episode}"
        );
    }
    let isolated = &calibration["situations"][2];
    assert_eq!(isolated["situation"], "isolated", "{calibration}");
    assert_eq!(isolated["resolved"], 2 * PER_PARTITION, "{calibration}");
    let conflict_free = isolated["conflict_free_share"].as_f64().unwrap();
    let failovers = 2 * PER_PARTITION.div_ceil(FAILOVER);
    assert!(
        (conflict_free - (1.0 - failovers as f64 / (2 * PER_PARTITION) as f64)).abs() < 1e-9,
        "{isolated}"
    );
    // London's failover allocations were made with Singapore unreachable.
    let (_, london) = c.node(1).get_json("/v1/calibration").await;
    assert!(
        london["situations"][1]["resolved"].as_u64().unwrap() >= failovers as u64,
        "{london}"
    );

    // What the model learnt outlives a restart: the next partition after it
    // is judged by both heals, not by the prior again.
    let learnt = |h: &Value| h["confidence_model"]["situations"][2].clone();
    let before = learnt(&c.node(0).get_json("/v1/health").await.1);
    assert_eq!(before["resolved"], 2.0 * PER_PARTITION as f64, "{before}");
    assert!(
        c.stop(0, Duration::from_secs(10)).await.is_some(),
        "node 0 did not stop on SIGTERM\n{}",
        c.logs(20)
    );
    c.restart(0).await;
    let after = learnt(&c.node(0).get_json("/v1/health").await.1);
    assert_eq!(
        after, before,
        "learnt before the restart: {before}, after: {after}"
    );
}
