//! Retention: tokens are forgotten everywhere once they are older than
//! `--retention`, and their documents leave memory and disk.

mod support;

use serde_json::json;
use std::time::Duration;
use support::{Cluster, ClusterOptions};

async fn health(c: &Cluster, node: usize) -> serde_json::Value {
    c.node(node).get_json("/v1/health").await.1
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_tokens_are_forgotten_on_every_node_and_stay_forgotten() {
    // 4 s retention: 1 s windows; an allocation is gone 4-5 s after it was made.
    let c = Cluster::start(2, ClusterOptions::default().args(["--retention", "4s"])).await;
    let (code, first) = c
        .node(0)
        .post_json(
            "/v1/allocations",
            &json!({"key": "short-lived", "payload": {"a": 1}}),
        )
        .await;
    assert_eq!(code, 201, "{first}");
    assert!(
        c.wait_until_async(Duration::from_secs(5), async || {
            c.node(1).get_json("/v1/allocations/short-lived").await.0 == 200
        })
        .await,
        "never replicated\n{}",
        c.logs(20)
    );
    // Within the retention a retry is a replay.
    let (code, replay) = c
        .node(1)
        .post_json(
            "/v1/allocations",
            &json!({"key": "short-lived", "payload": {"a": 1}}),
        )
        .await;
    assert_eq!(code, 200, "{replay}");
    assert_eq!(replay["txn_id"], first["txn_id"]);
    for node in 0..2 {
        assert!(
            c.wait_until_async(Duration::from_secs(10), async || {
                c.node(node).get_json("/v1/allocations/short-lived").await.0 == 404
            })
            .await,
            "node {node} kept an expired token\n{}",
            c.logs(20)
        );
        let h = health(&c, node).await;
        assert!(
            h["ledger"]["expired_allocations"].as_u64().unwrap() >= 1,
            "{h}"
        );
        assert_eq!(h["ledger"]["keys"], 0, "{h}");
    }
    // Sync does not bring it back, and neither does a restart (the chunks
    // are gone from disk, or dropped on load).
    tokio::time::sleep(Duration::from_millis(1500)).await;
    c.kill(0);
    c.restart(0).await;
    for node in 0..2 {
        assert_eq!(
            c.node(node).get_json("/v1/allocations/short-lived").await.0,
            404
        );
    }
    // After the retention a new request for the key is a new transaction.
    let (code, again) = c
        .node(0)
        .post_json(
            "/v1/allocations",
            &json!({"key": "short-lived", "payload": {"a": 1}}),
        )
        .await;
    assert_eq!(code, 201, "{again}");
    assert_ne!(again["txn_id"], first["txn_id"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_stays_bounded_under_steady_load_with_a_short_retention() {
    let c = Cluster::start(1, ClusterOptions::default().args(["--retention", "2s"])).await;
    let mut max_keys = 0;
    for round in 0..8 {
        for i in 0..50 {
            let (code, v) = c
                .node(0)
                .post_json(
                    "/v1/allocations",
                    &json!({"key": format!("steady-{round}-{i}"), "payload": {}}),
                )
                .await;
            assert_eq!(code, 201, "{v}");
        }
        let h = health(&c, 0).await;
        max_keys = max_keys.max(h["ledger"]["keys"].as_u64().unwrap());
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // 400 allocations over ~4 s with a 2 s retention (0.5 s windows): at most
    // about 2.5 s worth, i.e. well under everything made, is ever held.
    assert!(max_keys < 400, "held {max_keys} keys: nothing expired");
    let h = health(&c, 0).await;
    assert!(
        h["ledger"]["expired_allocations"].as_u64().unwrap() > 0,
        "{h}"
    );
    assert!(h["ledger"]["documents"].as_u64().unwrap() <= 8 * 6, "{h}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_with_different_retention_refuse_to_sync_and_say_why() {
    let c = Cluster::start(
        2,
        ClusterOptions::default().node_args(1, ["--retention", "48h"]),
    )
    .await;
    let (code, _) = c
        .node(0)
        .post_json("/v1/allocations", &json!({"key": "k", "payload": {}}))
        .await;
    assert_eq!(code, 201);
    assert!(
        c.wait_until_async(Duration::from_secs(10), async || {
            c.node(1)
                .metrics_text()
                .await
                .contains("kind=\"window-mismatch\"")
        })
        .await,
        "{}",
        c.logs(20)
    );
    assert!(c.node(1).log_tail(50).contains("--retention"));
    assert_eq!(c.node(1).get_json("/v1/allocations/k").await.0, 404);
}
