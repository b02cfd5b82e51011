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
