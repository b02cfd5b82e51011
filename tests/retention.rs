//! Retention: tokens are forgotten everywhere once they are older than
//! `--retention`, and their documents leave memory and disk. A key lives as
//! long as its winner: a retry straddling a window edge puts a loser in a
//! newer document than its winner, and the loser leaves with the winner (on
//! virtual time through the ledger, and with real nodes).

mod support;

use oncemesh::key::{fingerprint, IdempotencyKey};
use oncemesh::ledger::{
    AllocateRequest, Allocated, ChunkSink, DocId, Ledger, NodeIdentity, Stored, StoredDocument,
    Windows, SHARD_COUNT,
};
use oncemesh::record::TxnId;
use oncemesh::time::ManualClock;
use serde_json::json;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use support::{Cluster, ClusterOptions};

// ---------------------------------------------------------------------------
// The ledger's rule, on virtual time: two nodes' ledgers, no processes.
// ---------------------------------------------------------------------------

/// 4 s retention, so 1 s windows: epoch e is past the retention at (e + 5) s.
const RETENTION_MS: u64 = 4_000;
const KEY: &str = "order-straddling-retry";

/// A disk that keeps nothing of documents (a restart is given the documents
/// as the ledger saves them): only the notes of retired allocations, and
/// which documents it was asked to drop.
#[derive(Default)]
struct Disk {
    dropped: Mutex<Vec<DocId>>,
    retired: Mutex<Vec<(DocId, String)>>,
}

impl ChunkSink for Disk {
    fn journal(&self, _epoch: u32, _record: Vec<u8>) -> u64 {
        0
    }
    fn forget_journal(&self, _seqs: Vec<u64>) {}
    fn persist(&self, _doc: DocId, _bytes: Vec<u8>) -> u64 {
        0
    }
    fn snapshot(&self, _doc: DocId, _bytes: Vec<u8>) -> u64 {
        0
    }
    fn drop_document(&self, doc: DocId) {
        self.dropped.lock().unwrap().push(doc);
        self.retired.lock().unwrap().retain(|(d, _)| *d != doc);
    }
    fn retire(&self, doc: DocId, txns: Vec<String>) {
        let mut retired = self.retired.lock().unwrap();
        retired.extend(txns.into_iter().map(|txn| (doc, txn)));
    }
}

fn open_ledger(
    node: &str,
    peer: &str,
    clock: &ManualClock,
    stored: Stored,
    disk: Arc<Disk>,
) -> Ledger {
    Ledger::open(
        NodeIdentity {
            region: node.into(),
            node: node.into(),
        },
        vec![peer.into()],
        Arc::new(clock.clone()),
        500,
        Windows::for_retention(RETENTION_MS),
        stored,
        disk,
    )
    .expect("open the ledger")
}

fn allocate(ledger: &Ledger, amount: u32) -> Allocated {
    let key = IdempotencyKey::parse(KEY).unwrap();
    let request = AllocateRequest {
        key: key.clone(),
        fingerprint: fingerprint(&json!({ "amount": amount })).unwrap(),
        confidence: 0.9,
        stake: None,
    };
    let mut out = ledger.allocate_batch(key.shard(SHARD_COUNT), &[request]);
    let allocated = out.remove(0).expect("allocate");
    ledger.fold_pending();
    allocated
}

/// Every document of `from` merged into `to`.
fn send_all(from: &Ledger, to: &Ledger) {
    for (doc, _) in from.digests() {
        let bytes = from.save_document(doc).unwrap();
        to.merge_bytes(doc, &bytes).unwrap();
    }
}

/// What a restart of `ledger` reads back from `disk` holding its documents.
fn stored(ledger: &Ledger, disk: &Disk) -> Stored {
    Stored {
        documents: ledger
            .digests()
            .into_iter()
            .map(|(doc, _)| {
                let bytes = ledger.save_document(doc).unwrap();
                (doc, StoredDocument { bytes })
            })
            .collect(),
        retired: disk.retired.lock().unwrap().clone(),
        ..Stored::default()
    }
}

/// Node "a" allocates the key at 10.9 s (epoch 10); node "b", not yet
/// hearing of it, allocates it again at 11.1 s (epoch 11): a retry across a
/// window edge. Once they exchange documents both hold the conflict, with
/// a's allocation the winner. Returns the clock (at 11.1 s), the ledgers,
/// b's disk, and the winner's and the loser's transactions.
struct Straddle {
    clock: ManualClock,
    a: Ledger,
    b: Ledger,
    b_disk: Arc<Disk>,
    winner: TxnId,
    loser: TxnId,
}

fn straddling_conflict() -> Straddle {
    let clock = ManualClock::at(10_900);
    let a = open_ledger("a", "b", &clock, Stored::default(), Arc::default());
    let b_disk = Arc::new(Disk::default());
    let b = open_ledger("b", "a", &clock, Stored::default(), b_disk.clone());
    let winner = allocate(&a, 1);
    clock.set(11_100);
    let loser = allocate(&b, 1);
    assert!(!winner.replay && !loser.replay);
    assert_eq!(winner.allocation.epoch + 1, loser.allocation.epoch);
    send_all(&a, &b);
    send_all(&b, &a);
    let (winner, loser) = (
        winner.allocation.record.txn_id.clone(),
        loser.allocation.record.txn_id.clone(),
    );
    for ledger in [&a, &b] {
        let view = ledger.key(KEY).expect("the key is known");
        let txns: Vec<&TxnId> = view.allocations.iter().map(|a| &a.record.txn_id).collect();
        assert_eq!(txns, [&winner, &loser], "winner first");
        assert_eq!(ledger.conflicts().len(), 1);
    }
    Straddle {
        clock,
        a,
        b,
        b_disk,
        winner,
        loser,
    }
}

/// Epoch 10 (the winner's) is past the retention at 15 s, epoch 11 (the
/// loser's) only at 16 s.
const WINNER_EXPIRED_MS: u64 = 15_500;

/// `ledger` treats the key as never seen: no allocation, no conflict, and a
/// new request is a new transaction that competes with nothing.
fn assert_key_forgotten(ledger: &Ledger, s: &Straddle, when: &str) {
    let left: Option<Vec<TxnId>> = ledger.key(KEY).map(|v| {
        v.allocations
            .iter()
            .map(|a| a.record.txn_id.clone())
            .collect()
    });
    let conflicts = ledger.conflicts().len();
    let again = allocate(ledger, 1);
    let txn = &again.allocation.record.txn_id;
    assert!(
        !again.replay,
        "{when}: a retry was answered with {txn} as a replay (the loser is {})",
        s.loser
    );
    assert!(txn != &s.loser && txn != &s.winner, "{when}: {txn}");
    assert_eq!(left, None, "{when}: the key outlived its winner");
    assert_eq!(conflicts, 0, "{when}: a conflict is left");
    let view = ledger.key(KEY).unwrap();
    assert_eq!(
        view.allocations.len(),
        1,
        "{when}: the new allocation competes"
    );
}

#[test]
fn a_loser_leaves_with_its_winner_when_the_winners_window_expires_first() {
    let s = straddling_conflict();
    s.clock.set(WINNER_EXPIRED_MS);
    for ledger in [&s.a, &s.b] {
        let dropped = ledger.expire();
        assert_eq!(
            dropped.iter().map(|d| d.epoch).collect::<Vec<_>>(),
            [10],
            "only the winner's window"
        );
        assert_key_forgotten(ledger, &s, "live");
    }
}

#[test]
fn a_restart_after_the_winners_window_expired_agrees_with_the_live_node() {
    let s = straddling_conflict();
    s.clock.set(WINNER_EXPIRED_MS);
    s.b.expire();
    assert!(s.b.key(KEY).is_none());
    // The loser's document is still live, and holds the loser's record.
    let stored = stored(&s.b, &s.b_disk);
    assert!(stored.documents.keys().any(|d| d.epoch == 11));
    assert!(stored
        .retired
        .iter()
        .any(|(d, txn)| d.epoch == 11 && *txn == s.loser));
    let restarted = open_ledger("b", "a", &s.clock, stored, s.b_disk.clone());
    assert_key_forgotten(&restarted, &s, "after a restart");
}

#[test]
fn a_node_down_while_the_winners_window_expired_forgets_the_key_at_start() {
    let s = straddling_conflict();
    // b's disk as it was before the expiry; b starts again once it passed.
    let stored = stored(&s.b, &s.b_disk);
    assert!(stored.retired.is_empty());
    s.clock.set(WINNER_EXPIRED_MS);
    let disk = Arc::new(Disk::default());
    let restarted = open_ledger("b", "a", &s.clock, stored, disk.clone());
    assert!(
        disk.dropped.lock().unwrap().iter().all(|d| d.epoch == 10),
        "only the winner's window is dropped"
    );
    // Noted on disk, so that the next start agrees without the winner's document.
    let retired = disk.retired.lock().unwrap().clone();
    assert!(
        retired
            .iter()
            .any(|(d, txn)| d.epoch == 11 && *txn == s.loser),
        "{retired:?}"
    );
    assert_key_forgotten(&restarted, &s, "at start");
}

/// `ledger`'s allocations of the key, by transaction, and its conflicts.
fn key_state(ledger: &Ledger) -> (Vec<TxnId>, usize) {
    let txns = ledger.key(KEY).map_or_else(Vec::new, |v| {
        v.allocations
            .iter()
            .map(|a| a.record.txn_id.clone())
            .collect()
    });
    (txns, ledger.conflicts().len())
}

#[test]
fn a_new_allocation_by_a_node_that_forgot_the_winner_first_stays_on_every_node() {
    let s = straddling_conflict();
    s.clock.set(WINNER_EXPIRED_MS);
    // Only a's retention tick has come: a forgot the key, b still holds it.
    s.a.expire();
    let fresh = allocate(&s.a, 1);
    assert!(!fresh.replay);
    let fresh = fresh.allocation.record.txn_id.clone();
    send_all(&s.a, &s.b);
    // b's tick comes: the winner and its loser go, the new allocation,
    // stamped after the winner's window was past the retention, stays.
    s.b.expire();
    for (name, ledger) in [("a", &s.a), ("b", &s.b)] {
        assert_eq!(key_state(ledger), (vec![fresh.clone()], 0), "node {name}");
    }
    let again = allocate(&s.b, 1);
    assert!(
        again.replay,
        "a retry at b is a replay of the new allocation"
    );
    assert_eq!(again.allocation.record.txn_id, fresh);
}

#[test]
fn an_acknowledged_allocation_only_in_the_journal_survives_a_crash_after_the_winner_expired() {
    let s = straddling_conflict();
    // What b's disk holds before its expiry, which the crash keeps: the
    // drop of the winner's document was not committed yet.
    let mut on_disk = stored(&s.b, &s.b_disk);
    s.clock.set(WINNER_EXPIRED_MS);
    s.b.expire();
    let fresh = allocate(&s.b, 1);
    assert!(!fresh.replay, "b forgot the key: a new transaction");
    // Acknowledged from the journal, then SIGKILL before anything else.
    on_disk.journal.push(oncemesh::storage::JournalEntry {
        seq: 1,
        epoch: fresh.allocation.epoch,
        bytes: serde_json::to_vec(&*fresh.allocation.record).unwrap(),
    });
    let restarted = open_ledger("b", "a", &s.clock, on_disk, s.b_disk.clone());
    let txn = fresh.allocation.record.txn_id.clone();
    assert_eq!(key_state(&restarted), (vec![txn.clone()], 0));
    let again = allocate(&restarted, 1);
    assert!(
        again.replay,
        "the acknowledged allocation answers the retry"
    );
    assert_eq!(again.allocation.record.txn_id, txn);
}

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

// ---------------------------------------------------------------------------
// The same with real nodes, and the loser's compensation across it.
// ---------------------------------------------------------------------------

/// The window of `--retention 8s`: a quarter of it.
const WINDOW_MS: u64 = 2_000;

fn wall_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// The epoch of an allocation as the API shows it (`hlc` is physical ms,
/// `.`, logical counter).
fn epoch_of(allocation: &serde_json::Value) -> u64 {
    let hlc = allocation["hlc"].as_str().expect("an hlc");
    let ms: u64 = hlc.split('.').next().unwrap().parse().unwrap();
    ms / WINDOW_MS
}

async fn documents_of_epoch(c: &Cluster, node: usize, epoch: u64) -> usize {
    let (_, docs) = c.node(node).get_json("/v1/documents").await;
    docs["documents"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|d| d["epoch"] == epoch)
        .count()
}

async fn in_flight(c: &Cluster, node: usize) -> u64 {
    health(c, node).await["compensations"]["in_flight"]
        .as_u64()
        .unwrap_or(u64::MAX)
}

/// A customer's retry reaches another region three windows after the first
/// allocation, during a partition: winner and loser lie in documents three
/// windows apart. Once the winner's window passes the retention the key is
/// gone on both nodes, although the loser's document still lives; a restart
/// does not bring the loser back; a new retry is a new transaction; and the
/// loser's compensation, failing all along, is not dropped with the key: it
/// runs on and refunds the loser once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_leaves_with_its_winner_and_its_losers_compensation_still_runs_once() {
    use oncemesh::chaos::receiver::{Mode, Receiver};
    let rx = Receiver::start().await.expect("webhook receiver");
    rx.set_mode(Mode::Fails);
    let mut opts = ClusterOptions::default().args([
        "--retention",
        "8s",
        "--compensation-initial-backoff",
        "200ms",
        "--compensation-max-backoff",
        "500ms",
        "--compensation-max-attempts",
        "1000",
    ]);
    for i in 0..2 {
        opts = opts.node_args(
            i,
            [
                "--compensation".to_owned(),
                format!("webhook:{}", rx.url(i)),
            ],
        );
    }
    let c = Cluster::start(2, opts).await;
    c.isolate(0);
    let retry = json!({"key": KEY, "payload": {"amount_cents": 1250}});
    let (code, winner) = c.node(0).post_json("/v1/allocations", &retry).await;
    assert_eq!(code, 201, "{winner}");
    let winner_epoch = epoch_of(&winner);
    let start_of_loser_window = (winner_epoch + 3) * WINDOW_MS + 50;
    tokio::time::sleep(Duration::from_millis(
        start_of_loser_window.saturating_sub(wall_ms()),
    ))
    .await;
    let (code, loser) = c.node(1).post_json("/v1/allocations", &retry).await;
    assert_eq!(code, 201, "{loser}");
    let loser_epoch = epoch_of(&loser);
    assert_eq!(loser_epoch, winner_epoch + 3, "{winner}\n{loser}");
    let (winner, loser) = (winner["txn_id"].clone(), loser["txn_id"].clone());
    c.heal_all();

    // Both hold the conflict; the loser's refund fails and is retried.
    assert!(
        c.wait_until_async(Duration::from_secs(4), async || {
            let (_, report) = c.node(1).get_json("/v1/conflicts").await;
            report["conflicts"].as_array().unwrap().iter().any(|e| {
                e["key"] == KEY
                    && e["winner"] == winner
                    && e["compensations"][0]["txn_id"] == loser
                    && e["compensations"][0]["attempts"].as_u64() >= Some(1)
            })
        })
        .await,
        "no conflict with a failing compensation\n{}",
        c.logs(30)
    );
    let winner_expires_ms = (winner_epoch + 1) * WINDOW_MS + 8_000;
    assert!(
        wall_ms() < winner_expires_ms,
        "the conflict came too late to test"
    );

    // The winner's window passes the retention: the key is gone everywhere.
    for node in 0..2 {
        assert!(
            c.wait_until_async(Duration::from_secs(8), async || {
                c.node(node)
                    .get_json(&format!("/v1/allocations/{KEY}"))
                    .await
                    .0
                    == 404
            })
            .await,
            "node {node} still shows the key: {}\n{}",
            c.node(node)
                .get_json(&format!("/v1/allocations/{KEY}"))
                .await
                .1,
            c.logs(30)
        );
        let (_, report) = c.node(node).get_json("/v1/conflicts").await;
        assert_eq!(report["conflicts"], json!([]), "node {node}");
    }
    // ... while the loser's own document lives on, and its compensation runs.
    assert!(documents_of_epoch(&c, 1, loser_epoch).await > 0);
    assert_eq!(in_flight(&c, 1).await, 1, "{}", health(&c, 1).await);
    // No conflict report shows it any more; the owner's list of
    // compensations does, once its engine has seen the key go.
    assert!(
        c.wait_until_async(Duration::from_secs(3), async || {
            let (_, listed) = c.node(1).get_json("/v1/compensations").await;
            listed["compensations"]
                .as_array()
                .unwrap()
                .iter()
                .any(|comp| comp["txn_id"] == loser && comp["state"] != "succeeded")
        })
        .await,
        "{}",
        c.node(1).get_json("/v1/compensations").await.1
    );

    // A restart agrees: the loser is not back, its compensation resumes.
    c.kill(1);
    c.restart(1).await;
    assert!(
        documents_of_epoch(&c, 1, loser_epoch).await > 0,
        "the restart came too late to test"
    );
    let (code, view) = c.node(1).get_json(&format!("/v1/allocations/{KEY}")).await;
    assert_eq!(code, 404, "after a restart: {view}");
    assert_eq!(in_flight(&c, 1).await, 1, "{}", health(&c, 1).await);

    // A retry now is a new transaction that competes with nothing.
    let (code, again) = c.node(1).post_json("/v1/allocations", &retry).await;
    assert_eq!(code, 201, "{again}");
    assert!(
        again["txn_id"] != loser && again["txn_id"] != winner,
        "{again}"
    );
    assert!(
        c.wait_until_async(Duration::from_secs(5), async || {
            let (code, view) = c.node(0).get_json(&format!("/v1/allocations/{KEY}")).await;
            code == 200
                && view["allocations"].as_array().map(Vec::len) == Some(1)
                && view["allocations"][0]["txn_id"] == again["txn_id"]
        })
        .await,
        "{}",
        c.logs(30)
    );

    // The refund endpoint recovers: the loser is refunded, once.
    rx.set_mode(Mode::Ok);
    assert!(
        c.wait_until_async(Duration::from_secs(10), async || {
            in_flight(&c, 1).await == 0
        })
        .await,
        "{}\n{}",
        health(&c, 1).await,
        c.logs(30)
    );
    let refunds: Vec<_> = rx
        .accepted()
        .into_iter()
        .filter(|e| e.loser_txn == loser)
        .collect();
    assert!(!refunds.is_empty(), "the loser was never refunded");
    assert!(
        refunds.iter().all(|e| e.node == 1
            && e.idempotency_key == format!("oncemesh-comp-{}", loser.as_str().unwrap())),
        "{refunds:?}"
    );
    assert_eq!(rx.effects(), 1, "{:?}", rx.accepted());
    assert!(c
        .node(1)
        .log_tail(200)
        .contains("forgetting a finished compensation past the retention"));
}
