//! Settlement and confidence on real processes: an allocation settles once
//! every peer holds it; while a peer is cut off it stays provisional with a
//! confidence below 1 that falls as the partition lasts; after heal it
//! settles (or turns conflicted). Clock skew made with the drill option shows
//! in health.

mod support;

use serde_json::{json, Value};
use std::time::{Duration, Instant};
use support::{Cluster, ClusterOptions};

async fn all_connected(c: &Cluster) {
    for node in 0..c.len() {
        let want = c.len() - 1;
        assert!(
            c.wait_until_async(Duration::from_secs(20), async || {
                c.node(node).get_json("/v1/health").await.1["peers"]["connected"] == want
            })
            .await,
            "node {node} never connected to its peers\n{}",
            c.logs(30)
        );
    }
}

async fn state_of(c: &Cluster, node: usize, key: &str) -> Value {
    c.node(node)
        .get_json(&format!("/v1/allocations/{key}"))
        .await
        .1
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_allocation_settles_within_a_second_when_all_peers_are_connected() {
    let c = Cluster::start(3, ClusterOptions::default()).await;
    all_connected(&c).await;
    // Let the first anti-entropy round finish so every pair is in sync.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (code, made) = c
        .node(1)
        .post_json("/v1/allocations", &json!({"key": "fast", "payload": {}}))
        .await;
    assert_eq!(code, 201, "{made}");
    let at_allocation = made["confidence"].as_f64().unwrap();
    assert!(at_allocation > 0.99, "connected peers: {made}");
    let started = Instant::now();
    assert!(
        c.wait_until_async(Duration::from_secs(1), async || {
            state_of(&c, 1, "fast").await["state"] == "settled"
        })
        .await,
        "not settled after {:?}: {}\n{}",
        started.elapsed(),
        state_of(&c, 1, "fast").await,
        c.logs(30)
    );
    let settled = state_of(&c, 1, "fast").await;
    assert_eq!(settled["allocations"][0]["confidence"], 1.0);
    assert_eq!(
        settled["allocations"][0]["confidence_at_allocation"],
        at_allocation
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitioned_allocations_stay_provisional_with_falling_confidence_then_settle() {
    let c = Cluster::start(3, ClusterOptions::default()).await;
    all_connected(&c).await;
    c.isolate(0);
    let (code, made) = c
        .node(0)
        .post_json("/v1/allocations", &json!({"key": "cut-off", "payload": {}}))
        .await;
    assert_eq!(code, 201, "{made}");
    assert_eq!(made["state"], "provisional");
    let first = made["confidence"].as_f64().unwrap();
    assert!(first < 1.0, "{made}");
    tokio::time::sleep(Duration::from_secs(3)).await;
    let later = state_of(&c, 0, "cut-off").await;
    assert_eq!(later["state"], "provisional", "{later}");
    let second = later["allocations"][0]["confidence"].as_f64().unwrap();
    assert!(
        second < first,
        "confidence did not fall: {first} then {second}"
    );
    assert!(second > 0.0);
    let (_, health) = c.node(0).get_json("/v1/health").await;
    assert_eq!(health["status"], "degraded", "{health}");
    assert!(health["ledger"]["provisional"].as_u64().unwrap() >= 1);
    c.heal_all();
    assert!(
        c.wait_until_async(Duration::from_secs(20), async || {
            state_of(&c, 0, "cut-off").await["state"] == "settled"
        })
        .await,
        "never settled after heal: {}\n{}",
        state_of(&c, 0, "cut-off").await,
        c.logs(30)
    );
    assert_eq!(
        state_of(&c, 0, "cut-off").await["allocations"][0]["confidence"],
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_allocated_on_both_sides_of_a_partition_turns_conflicted_not_settled() {
    let c = Cluster::start(2, ClusterOptions::default()).await;
    all_connected(&c).await;
    c.isolate(0);
    for node in 0..2 {
        let (code, v) = c
            .node(node)
            .post_json("/v1/allocations", &json!({"key": "twice", "payload": {}}))
            .await;
        assert_eq!(code, 201, "{v}");
    }
    c.heal_all();
    for node in 0..2 {
        assert!(
            c.wait_until_async(Duration::from_secs(20), async || {
                let v = state_of(&c, node, "twice").await;
                v["allocations"].as_array().is_some_and(|a| a.len() == 2)
                    && ["conflicted", "compensating", "compensated"]
                        .contains(&v["state"].as_str().unwrap_or(""))
            })
            .await,
            "node {node}: {}\n{}",
            state_of(&c, node, "twice").await,
            c.logs(30)
        );
        let v = state_of(&c, node, "twice").await;
        let loser = v["allocations"]
            .as_array()
            .unwrap()
            .iter()
            .find(|a| a["role"] == "loser")
            .cloned()
            .unwrap();
        assert_eq!(loser["confidence"], 0.0, "{v}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_skewed_clock_shows_in_peers_and_health() {
    // Node 1 runs 3 s ahead (drill option); the default bound is 500 ms.
    let c = Cluster::start(
        2,
        ClusterOptions::default().node_args(1, ["--drill-clock-offset", "3s"]),
    )
    .await;
    all_connected(&c).await;
    assert!(
        c.wait_until_async(Duration::from_secs(10), async || {
            let (_, peers) = c.node(0).get_json("/v1/peers").await;
            peers["peers"][0]["clock_offset_ms"]
                .as_i64()
                .is_some_and(|o| o > 2500)
        })
        .await,
        "{}",
        c.node(0).get_json("/v1/peers").await.1
    );
    let (_, health) = c.node(0).get_json("/v1/health").await;
    assert!(
        health["clock"]["skew_violations"].as_u64().unwrap() > 0,
        "{health}"
    );
    let reason = health["reasons"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["code"] == "clock_offset")
        .unwrap_or_else(|| panic!("no clock_offset reason: {health}"));
    assert_eq!(reason["peer"], c.node(1).peer_id(), "{health}");
    assert!(reason["value"].as_f64().unwrap() > 2.5, "{health}");
    assert_eq!(reason["threshold"], 0.5, "{health}");
    // Data still flows (no data is refused), and the HLC orders after the
    // skewed stamps: a new allocation on node 0 carries an HLC above node 1's.
    let (_, ahead) = c
        .node(1)
        .post_json(
            "/v1/allocations",
            &json!({"key": "from-the-future", "payload": {}}),
        )
        .await;
    assert!(
        c.wait_until_async(Duration::from_secs(10), async || {
            c.node(0)
                .get_json("/v1/allocations/from-the-future")
                .await
                .0
                == 200
        })
        .await
    );
    let (_, after) = c
        .node(0)
        .post_json(
            "/v1/allocations",
            &json!({"key": "after-it", "payload": {}}),
        )
        .await;
    assert!(
        after["hlc"].as_str().unwrap() > ahead["hlc"].as_str().unwrap(),
        "{after} vs {ahead}"
    );
}
