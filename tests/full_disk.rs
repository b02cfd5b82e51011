//! A full disk, survived without a restart: a real node whose data dir is a
//! small filesystem (a 24 MiB tmpfs) is filled up under it. While writes fail
//! new allocations get a clear 500, health is `critical`, and nothing
//! acknowledged is lost; once space is freed the node resumes by itself,
//! health is `ok` again and new allocations succeed; after a restart every
//! acknowledged allocation is still there.
//!
//! Mounting needs root (the CI machine runs tests as root); without it the
//! test fails saying so rather than passing unnoticed.

mod support;

use oncemesh::chaos::receiver::{Mode, Receiver};
use oncemesh::client::{Client, HealthStatus};
use oncemesh::drill::SmallDisk;
use serde_json::{json, Value};
use std::path::Path;
use std::time::Duration;
use support::{Cluster, ClusterOptions};

/// A small tmpfs over `at`, carrying over what it held; the test fails
/// saying so without root.
fn small_disk(at: &Path, size_mib: u64) -> SmallDisk {
    SmallDisk::mount(at, size_mib).unwrap_or_else(|e| {
        panic!("this test mounts a small tmpfs as the node's data dir and needs root: {e}")
    })
}

async fn allocate(c: &Cluster, key: &str) -> (u16, Value) {
    c.node(0)
        .post_json(
            "/v1/allocations",
            &json!({"key": key, "payload": {"amount": 1}}),
        )
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_is_survived_without_a_restart() {
    let c = Cluster::start(1, ClusterOptions::default().regions(&["sgp"])).await;
    // Move the node's data dir onto a small filesystem of its own.
    c.stop(0, Duration::from_secs(10)).await;
    let disk = small_disk(c.node(0).data_dir(), 24);
    c.restart(0).await;

    let mut acknowledged = Vec::new();
    for i in 0..50 {
        let key = format!("before-{i}");
        let (code, v) = allocate(&c, &key).await;
        assert_eq!(code, 201, "{v}");
        acknowledged.push((key, v["txn_id"].as_str().unwrap().to_owned()));
    }

    disk.fill().unwrap();
    // Allocations now fail: the first ones may still fit in what was left.
    let mut refused = Vec::new();
    for i in 0..400 {
        let key = format!("full-{i}");
        let (code, v) = allocate(&c, &key).await;
        match code {
            201 => acknowledged.push((key, v["txn_id"].as_str().unwrap().to_owned())),
            500 => {
                let error = v["error"].as_str().unwrap_or_default();
                assert!(error.contains("cannot write"), "unclear error: {v}");
                refused.push(key);
            }
            other => panic!("unexpected {other}: {v}"),
        }
        if refused.len() >= 20 {
            break;
        }
    }
    assert!(
        refused.len() >= 20,
        "the full disk never refused an allocation"
    );
    let (code, health) = c.node(0).get_json("/v1/health").await;
    assert_eq!(health["status"], "critical", "{code} {health}");
    assert!(
        health["storage"]["failing"].is_string(),
        "health does not say storage fails: {health}"
    );
    // The library's client reads a critical verdict (a 503) as a verdict.
    let client = Client::new(&c.node(0).http_url()).unwrap();
    let health = client.health().await.expect("a critical health report");
    assert_eq!(health.status, HealthStatus::Critical, "{health:?}");
    // What was acknowledged is still answered while the disk is full.
    for (key, txn) in acknowledged.iter().take(5) {
        let (code, v) = allocate(&c, key).await;
        assert_eq!(
            (code, v["txn_id"].as_str()),
            (200, Some(txn.as_str())),
            "{v}"
        );
    }

    // Free the space: the node resumes by itself.
    disk.free().unwrap();
    assert!(
        c.wait_until_async(Duration::from_secs(20), async || {
            c.node(0).get_json("/v1/health").await.1["storage"]["failing"].is_null()
        })
        .await,
        "storage never resumed after space was freed\n{}",
        c.logs(40)
    );
    for i in 0..20 {
        let key = format!("after-{i}");
        let (code, v) = allocate(&c, &key).await;
        assert_eq!(code, 201, "after space was freed: {v}");
        acknowledged.push((key, v["txn_id"].as_str().unwrap().to_owned()));
    }
    assert!(
        c.wait_until_async(Duration::from_secs(20), async || {
            c.node(0).get_json("/v1/health").await.1["status"] == "ok"
        })
        .await,
        "health never returned to ok: {}",
        c.node(0).get_json("/v1/health").await.1
    );
    // A refused allocation was never acknowledged: a retry is a new
    // allocation or, if it reached the disk after all, a replay of it.
    for key in &refused {
        let (code, v) = allocate(&c, key).await;
        assert!(code == 200 || code == 201, "retry of {key}: {code} {v}");
    }

    // Nothing acknowledged was lost, across a restart too.
    c.restart(0).await;
    for (key, txn) in &acknowledged {
        let (code, v) = allocate(&c, key).await;
        assert_eq!(code, 200, "{key} after restart: {v}");
        assert_eq!(v["txn_id"].as_str(), Some(txn.as_str()), "{v}");
    }
    c.stop(0, Duration::from_secs(10)).await;
    drop(disk);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_store_reopens_its_database_after_a_failed_commit() {
    use oncemesh::storage::Storage;
    let root = tempfile::tempdir().unwrap();
    let disk = small_disk(root.path(), 16);
    let (storage, _) = Storage::open(root.path(), std::sync::Arc::new(|_| {})).unwrap();
    let first = storage.append_chunk((1, 0), vec![1; 1024]);
    storage.wait_durable(first).await.unwrap();
    disk.fill().unwrap();
    // A chunk the full disk cannot take: redb fails, and refuses everything
    // after an I/O error until the database is opened again.
    let big = storage.append_chunk((1, 0), vec![2; 4 << 20]);
    let refused = storage.wait_durable(big).await;
    assert!(refused.is_err(), "a 4 MiB chunk fit on a full disk");
    assert!(storage.failing().is_some());
    disk.free().unwrap();
    assert!(
        support::wait_until(Duration::from_secs(20), || storage.failing().is_none()).await,
        "the store never resumed: {:?}",
        storage.failing()
    );
    let after = storage.append_chunk((1, 0), vec![3; 1024]);
    storage.wait_durable(after).await.unwrap();
    storage.close();
    let (_, loaded) = Storage::open(root.path(), std::sync::Arc::new(|_| {})).unwrap();
    let doc = &loaded.documents[&(1, 0)];
    assert_eq!(
        doc.len(),
        1024 + (4 << 20) + 1024,
        "every chunk, the failed one too"
    );
    assert!(storage.write_failures() >= 1);
    drop(disk);
}

/// A compensation due while its node cannot write: its attempt cannot be
/// logged, so the engine waits for the disk instead of trying again at once
/// in a loop (which queued a log entry a turn for the writer, each written
/// once space was freed, filling it again, and a log with an attempt
/// started twice cannot be replayed), and compensates once space is freed
/// and the endpoint answers, with a log that replays at restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_compensation_waits_for_a_full_disk_without_spinning() {
    let rx = Receiver::start().await.unwrap();
    rx.set_mode(Mode::Fails);
    let opts = ClusterOptions::default()
        .regions(&["sgp", "lon"])
        .args(["--compensation-initial-backoff", "500ms"])
        .args(["--compensation-max-backoff", "1s"])
        .node_args(
            0,
            [
                "--compensation".to_owned(),
                format!("webhook:{}", rx.url(0)),
            ],
        )
        .node_args(
            1,
            [
                "--compensation".to_owned(),
                format!("webhook:{}", rx.url(1)),
            ],
        );
    let c = Cluster::start(2, opts).await;
    let mut disks = Vec::new();
    for i in 0..2 {
        c.stop(i, Duration::from_secs(10)).await;
        disks.push(small_disk(c.node(i).data_dir(), 24));
        c.restart(i).await;
    }
    c.isolate(0);
    let mut made = Vec::new();
    for i in 0..2 {
        let (code, v) = c
            .node(i)
            .post_json(
                "/v1/allocations",
                &json!({"key": "twice", "payload": {"amount": 1}}),
            )
            .await;
        assert_eq!(code, 201, "node {i}: {v}");
        made.push((
            v["hlc"].as_str().unwrap().to_owned(),
            v["node"].as_str().unwrap().to_owned(),
        ));
    }
    // The winner has the smallest (HLC, node id); the other node compensates.
    let loser = if made[0] < made[1] { 1 } else { 0 };
    c.heal_all();
    let node = c.node(loser);
    let compensation = async || {
        let (_, report) = node.get_json("/v1/conflicts").await;
        report["conflicts"][0]["compensations"][0].clone()
    };
    assert!(
        c.wait_until_async(Duration::from_secs(20), async || {
            let now = compensation().await;
            now["attempts"].as_u64() >= Some(2) && now["state"] == "failed"
        })
        .await,
        "the loser's node never tried its compensation: {}\n{}",
        compensation().await,
        c.logs(40)
    );
    // Waiting for its next attempt, due within a second, on a disk that
    // will not take the attempt's log entry.
    disks[loser].fill().unwrap();
    let before = std::fs::read_to_string(node.log_path()).unwrap().len();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let log = std::fs::read_to_string(node.log_path()).unwrap();
    let tries = log[before..].matches("cannot log").count();
    assert!(
        tries <= 20,
        "{tries} failed tries to log the compensation in 3 s of a full disk"
    );

    rx.set_mode(Mode::Ok);
    disks[loser].free().unwrap();
    assert!(
        c.wait_until_async(Duration::from_secs(20), async || {
            compensation().await["state"] == "succeeded"
        })
        .await,
        "the compensation never ran after space was freed: {}\n{}",
        compensation().await,
        c.logs(40)
    );
    assert_eq!(rx.effects(), 1, "one refund");
    assert!(node.get_json("/v1/health").await.1["storage"]["failing"].is_null());
    // Its log replays: each transition was logged once.
    c.restart(loser).await;
    let log = std::fs::read_to_string(node.log_path()).unwrap();
    assert!(
        !log.contains("compensation log unreadable"),
        "{}",
        c.logs(20)
    );
    assert!(
        c.wait_until_async(Duration::from_secs(10), async || {
            compensation().await["state"] == "succeeded"
        })
        .await,
        "after a restart: {}",
        compensation().await
    );
    for i in 0..2 {
        c.stop(i, Duration::from_secs(10)).await;
    }
    drop(disks);
}
