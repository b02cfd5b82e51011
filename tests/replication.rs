//! Replication between real `oncemesh` processes over libp2p, with every
//! link through a fault proxy the test controls (partitions are made outside
//! the nodes).

mod support;

use serde_json::{json, Value};
use std::collections::BTreeSet;
use std::time::Duration;
use support::{Cluster, ClusterOptions};

const CONVERGE: Duration = Duration::from_secs(30);

async fn allocate(c: &Cluster, node: usize, key: &str, payload: Value) -> (u16, Value) {
    c.node(node)
        .post_json(
            "/v1/allocations",
            &json!({ "key": key, "payload": payload }),
        )
        .await
}

async fn conflict_keys(c: &Cluster, node: usize) -> Vec<(String, String)> {
    let (_, body) = c.node(node).get_json("/v1/conflicts").await;
    body["conflicts"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|c| {
            (
                c["key"].as_str().unwrap_or_default().to_owned(),
                c["winner"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect()
}

async fn key_count(c: &Cluster, node: usize) -> u64 {
    let (_, health) = c.node(node).get_json("/v1/health").await;
    health["ledger"]["keys"].as_u64().unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_allocation_reaches_every_region_and_replays_there() {
    let c = Cluster::start(3, ClusterOptions::default()).await;
    assert!(
        c.wait_until_async(CONVERGE, async || {
            let (_, peers) = c.node(0).get_json("/v1/peers").await;
            peers["peers"]
                .as_array()
                .is_some_and(|p| p.iter().all(|p| p["connected"] == true))
        })
        .await,
        "peers never connected\n{}",
        c.logs(30)
    );
    let (code, made) = allocate(&c, 0, "order-1", json!({"amount": 42})).await;
    assert_eq!(code, 201, "{made}");
    let txn = made["txn_id"].as_str().unwrap().to_owned();
    for node in [1, 2] {
        assert!(
            c.wait_until_async(Duration::from_secs(5), async || {
                c.node(node).get_json("/v1/allocations/order-1").await.0 == 200
            })
            .await,
            "node {node} never saw the allocation\n{}",
            c.logs(30)
        );
    }
    let (code, replay) = allocate(&c, 2, "order-1", json!({"amount": 42})).await;
    assert_eq!(code, 200, "{replay}");
    assert_eq!(replay["replay"], true);
    assert_eq!(replay["txn_id"], txn.as_str());
    assert_eq!(replay["region"], "sgp");
    // Two more retries there: every one is a cross-region retry for the
    // operator, but only the first was a near miss for the confidence model.
    for _ in 0..2 {
        assert_eq!(
            allocate(&c, 2, "order-1", json!({"amount": 42})).await.0,
            200
        );
    }
    let (_, health) = c.node(2).get_json("/v1/health").await;
    assert_eq!(health["cross_region_replays"], 3, "{health}");
    assert_eq!(
        health["confidence_model"]["cross_region_replays"], 1.0,
        "{health}"
    );
    // A different payload on another region is refused there too.
    let (code, _) = allocate(&c, 1, "order-1", json!({"amount": 43})).await;
    assert_eq!(code, 409);
    // With every peer connected the allocation settles everywhere.
    assert!(
        c.wait_until_async(Duration::from_secs(5), async || {
            c.node(0).get_json("/v1/allocations/order-1").await.1["state"] == "settled"
        })
        .await,
        "never settled\n{}",
        c.logs(30)
    );

    // Number formatting does not make another payload (RFC 8785
    // fingerprints): a replay on the node that made it and on its peers.
    let (code, made) = allocate(&c, 0, "order-2", json!({"amount": 1.0})).await;
    assert_eq!(code, 201, "{made}");
    for (node, amount) in [(0, "1"), (1, "1e0"), (2, "10E-1")] {
        assert!(
            c.wait_until_async(Duration::from_secs(5), async || {
                c.node(node).get_json("/v1/allocations/order-2").await.0 == 200
            })
            .await,
            "node {node} never saw order-2\n{}",
            c.logs(30)
        );
        let text = format!(r#"{{"key": "order-2", "payload": {{"amount": {amount}}}}}"#);
        let answer = c
            .node(node)
            .client()
            .post(c.node(node).url("/v1/allocations"))
            .header("content-type", "application/json")
            .body(text)
            .send()
            .await
            .expect("allocate");
        assert_eq!(answer.status(), 200, "amount {amount} on node {node}");
        let replay: Value = answer.json().await.expect("JSON answer");
        assert_eq!(replay["replay"], true, "{replay}");
        assert_eq!(replay["txn_id"], made["txn_id"], "{replay}");
    }
    // Every peer offered the compact layout when it connected, so the
    // batch came to node 1 in it (docs/DATA_MODEL.md, "Batch layouts").
    let batch = batch_holding(&c, 1, "order-2").await;
    assert!(batch.starts_with(r#"{"v":2,"#), "{batch}");
}

/// The text of the batch that holds `key`'s allocation in node `node`'s
/// documents, read with automerge as any reader of the data model would.
async fn batch_holding(c: &Cluster, node: usize, key: &str) -> String {
    use automerge::ReadDoc;
    let n = c.node(node);
    let (_, listed) = n.get_json("/v1/documents").await;
    for id in listed["documents"].as_array().into_iter().flatten() {
        let path = format!("/v1/documents/{}", id["id"].as_str().unwrap_or_default());
        let bytes = n.client().get(n.url(&path)).send().await.expect("GET");
        let bytes = bytes.bytes().await.expect("document bytes");
        let doc = automerge::Automerge::load(&bytes).expect("an automerge document");
        let Ok(Some((_, batches))) = doc.get(automerge::ROOT, "allocations") else {
            continue;
        };
        for item in doc.map_range(&batches, ..) {
            let value = item.value.into_value();
            let text = value.as_str().unwrap_or_default();
            if text.contains(&format!("\"{key}\"")) {
                return text.to_owned();
            }
        }
    }
    panic!("no batch of node {node} holds {key}\n{}", c.logs(30));
}

/// Isolates node 0, allocates `dup` on 0 and 1 plus `unique` keys each,
/// optionally SIGKILLs node 1 during the partition, heals, and checks the
/// outcome on every node.
async fn partition_then_heal(kill_during_partition: bool) {
    let unique = 200;
    let c = Cluster::start(3, ClusterOptions::default()).await;
    assert!(
        c.wait_until_async(CONVERGE, async || {
            let (_, h) = c.node(0).get_json("/v1/health").await;
            h["peers"]["connected"] == 2
        })
        .await,
        "{}",
        c.logs(30)
    );
    c.isolate(0);
    let (a_code, a) = allocate(&c, 0, "dup", json!({"customer": 7})).await;
    let (b_code, b) = allocate(&c, 1, "dup", json!({"customer": 7})).await;
    assert_eq!((a_code, b_code), (201, 201), "{a}\n{b}");
    assert_ne!(a["txn_id"], b["txn_id"]);
    // Cut off from both peers, node 0 knows it may be racing another region.
    assert!(a["confidence"].as_f64().unwrap() < 1.0, "{a}");
    for i in 0..unique {
        assert_eq!(
            allocate(&c, 0, &format!("a-{i}"), json!({"i": i})).await.0,
            201
        );
        assert_eq!(
            allocate(&c, 1, &format!("b-{i}"), json!({"i": i})).await.0,
            201
        );
    }
    if kill_during_partition {
        c.kill(1);
        c.restart(1).await;
        let (code, again) = c.node(1).get_json("/v1/allocations/dup").await;
        assert_eq!(code, 200, "{again}");
        assert_eq!(again["allocations"][0]["txn_id"], b["txn_id"]);
    }
    c.heal_all();
    // The expected winner: smallest (hlc, node).
    let mut both = [a.clone(), b.clone()];
    both.sort_by_key(|v| {
        (
            v["hlc"].as_str().unwrap().to_owned(),
            v["node"].as_str().unwrap().to_owned(),
        )
    });
    let winner = both[0]["txn_id"].as_str().unwrap().to_owned();
    let want = vec![("dup".to_owned(), winner.clone())];
    for node in 0..3 {
        let ok = c
            .wait_until_async(CONVERGE, async || {
                conflict_keys(&c, node).await == want && key_count(&c, node).await == 2 * unique + 1
            })
            .await;
        assert!(
            ok,
            "node {node}: conflicts {:?}, keys {}\n{}",
            conflict_keys(&c, node).await,
            key_count(&c, node).await,
            c.logs(40)
        );
    }
    // Every unique key is on every node, as the transaction its region made.
    for node in 0..3 {
        for i in (0..unique).step_by(37) {
            let (code, v) = c
                .node(node)
                .get_json(&format!("/v1/allocations/b-{i}"))
                .await;
            assert_eq!(code, 200, "node {node} lacks b-{i}: {v}");
            assert_eq!(v["allocations"].as_array().unwrap().len(), 1);
        }
    }
    // The loser is compensated by its own node, and every node reports it.
    let loser = both[1]["txn_id"].as_str().unwrap().to_owned();
    for node in 0..3 {
        assert!(
            c.wait_until_async(CONVERGE, async || {
                let (_, body) = c.node(node).get_json("/v1/conflicts").await;
                body["conflicts"][0]["compensations"][0]["txn_id"] == loser.as_str()
                    && body["conflicts"][0]["compensations"][0]["state"] == "succeeded"
            })
            .await,
            "node {node} never showed the compensation of {loser}\n{}",
            c.logs(40)
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partition_conflict_is_seen_by_every_node_with_one_winner() {
    partition_then_heal(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_killed_during_a_partition_loses_nothing() {
    partition_then_heal(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_outside_the_allowlist_gets_and_pushes_nothing() {
    let c = Cluster::start(2, ClusterOptions::default()).await;
    let (code, _) = allocate(&c, 0, "secret", json!({})).await;
    assert_eq!(code, 201);
    // A fourth node with its own identity dials node 0 directly; node 0 does
    // not list it.
    let target = format!(
        "/ip4/127.0.0.1/tcp/{}/p2p/{}",
        c.node(0).listen_port(),
        c.node(0).peer_id()
    );
    let intruder = Cluster::start(
        1,
        ClusterOptions::default()
            .regions(&["evil"])
            .args(["--peer", &target]),
    )
    .await;
    let (code, _) = allocate(&intruder, 0, "pushed", json!({})).await;
    assert_eq!(code, 201);
    assert!(
        c.wait_until_async(CONVERGE, async || {
            c.node(0).metric("oncemesh_refused_peers_total").await >= 1.0
        })
        .await,
        "no refusal counted\n{}\n{}",
        c.logs(20),
        intruder.logs(20)
    );
    // Give replication every chance, then check nothing crossed either way.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        intruder.node(0).get_json("/v1/allocations/secret").await.0,
        404
    );
    assert_eq!(c.node(0).get_json("/v1/allocations/pushed").await.0, 404);
    assert_eq!(c.node(1).get_json("/v1/allocations/pushed").await.0, 404);
    let (_, peers) = intruder.node(0).get_json("/v1/peers").await;
    assert_eq!(peers["peers"][0]["connected"], false, "{peers}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_regions_converge_after_each_was_cut_off_in_turn() {
    let c = Cluster::start(3, ClusterOptions::default()).await;
    let mut expected = BTreeSet::new();
    for round in 0..3 {
        c.isolate(round);
        for node in 0..3 {
            let key = format!("r{round}-n{node}");
            assert_eq!(allocate(&c, node, &key, json!({})).await.0, 201);
            expected.insert(key);
        }
        c.heal_all();
    }
    for node in 0..3 {
        assert!(
            c.wait_until_async(CONVERGE, async || key_count(&c, node).await
                == expected.len() as u64)
                .await,
            "node {node} has {} keys\n{}",
            key_count(&c, node).await,
            c.logs(30)
        );
        assert!(conflict_keys(&c, node).await.is_empty());
    }
}

/// A node leaves a change to its author while the author reaches the third
/// region itself (no copy crosses twice), and relays it once that link is cut.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_its_author_cannot_deliver_is_relayed_by_the_third_region() {
    let c = Cluster::start(3, ClusterOptions::default()).await;
    assert!(
        c.wait_until_async(CONVERGE, async || {
            let mut all = true;
            for node in 0..3 {
                let (_, peers) = c.node(node).get_json("/v1/peers").await;
                all &= peers["peers"]
                    .as_array()
                    .is_some_and(|p| p.iter().all(|p| p["connected"] == true));
            }
            all
        })
        .await,
        "peers never connected\n{}",
        c.logs(30)
    );
    // Two anti-entropy rounds: every node has heard whom the others reach.
    tokio::time::sleep(Duration::from_secs(2)).await;
    c.set_link_delay(0, 2, Duration::from_secs(4));
    assert_eq!(allocate(&c, 0, "relayed-1", json!({})).await.0, 201);
    let holds = async |node: usize| {
        c.wait_until_async(CONVERGE, async || {
            c.node(node).get_json("/v1/allocations/relayed-1").await.0 == 200
        })
        .await
    };
    assert!(holds(1).await, "node 1 never got it\n{}", c.logs(30));
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        c.node(2).get_json("/v1/allocations/relayed-1").await.0,
        404,
        "node 1 relayed a change its author was still sending"
    );
    c.cut_link(0, 2);
    assert!(
        holds(2).await,
        "node 2 never got it through node 1\n{}",
        c.logs(30)
    );
}
