//! Compensation of losing allocations between real `oncemesh` processes,
//! against a real webhook receiver run by the test.
//!
//! Each test makes a conflict with a partition (every link through a fault
//! proxy), heals it, and checks on the receiver's side that every loser was
//! compensated exactly once in effect, by its own node, with one stable
//! idempotency key, and that the winner never was; and on every node's
//! conflict report that the compensation's state is replicated.
//!
//! Node i posts to `/refund/{i}` on the receiver, so the receiver knows which
//! node made each call without trusting the body.

mod support;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use axum::Router;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path as FsPath, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use support::{Cluster, ClusterOptions};

/// Budget for a partition to heal and every node to report the outcome.
const CONVERGE: Duration = Duration::from_secs(30);
/// Short compensation backoff so retries happen within the test's budget.
const INITIAL_BACKOFF: Duration = Duration::from_millis(100);
const BACKOFF_ARGS: [&str; 4] = [
    "--compensation-initial-backoff",
    "100ms",
    "--compensation-max-backoff",
    "400ms",
];
/// The jitter of the default retry policy (± this fraction of each wait).
const JITTER: f64 = 0.2;
const KEY_PREFIX: &str = "oncemesh-comp-";

// ---------------------------------------------------------------------------
// The webhook receiver: a refund endpoint that deduplicates by Idempotency-Key.
// ---------------------------------------------------------------------------

/// One call the receiver got.
#[derive(Clone, Debug)]
struct Call {
    /// Index of the node that made it (from the URL path).
    from: usize,
    /// The `Idempotency-Key` header.
    key: Option<String>,
    /// The `Authorization` header (an extra header from the node's config).
    authorization: Option<String>,
    body: Value,
    at: Instant,
    /// What the receiver answered (or will answer, for a slow call).
    status: u16,
}

impl Call {
    fn loser_txn(&self) -> &str {
        self.body["loser"]["txn_id"].as_str().unwrap_or("")
    }
}

#[derive(Default)]
struct Inner {
    /// Answer 503 to this many calls.
    fail_next: u32,
    /// Answer 400 to every call.
    reject: bool,
    /// Sleep `delay` before answering this many calls.
    slow_next: u32,
    delay: Duration,
    calls: Vec<Call>,
    /// The effects: idempotency key → loser txn whose refund was carried out.
    /// A refund is carried out when a call with a new key is accepted (before
    /// a slow answer goes out, so a caller killed meanwhile lost only the
    /// answer, as with a real payment provider).
    effects: BTreeMap<String, String>,
}

struct Receiver {
    addr: SocketAddr,
    /// `http` or `https`.
    scheme: &'static str,
    inner: Arc<Mutex<Inner>>,
    /// TLS handshakes the receiver refused or that failed (https only).
    handshakes_failed: Arc<AtomicUsize>,
}

fn lock(m: &Mutex<Inner>) -> MutexGuard<'_, Inner> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Receiver {
    async fn start() -> Receiver {
        let tcp = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the webhook receiver");
        Self::serve(tcp, "http", Arc::default())
    }

    /// A receiver behind TLS with `config` (its certificate, and whether it
    /// asks clients for theirs).
    async fn start_tls(config: rustls::ServerConfig) -> Receiver {
        let tcp = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the webhook receiver");
        let failed = Arc::new(AtomicUsize::new(0));
        let listener = TlsListener {
            tcp,
            acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(config)),
            failed: failed.clone(),
        };
        Self::serve(listener, "https", failed)
    }

    fn serve<L>(listener: L, scheme: &'static str, handshakes_failed: Arc<AtomicUsize>) -> Receiver
    where
        L: axum::serve::Listener<Addr = SocketAddr>,
    {
        let addr = listener.local_addr().expect("receiver address");
        let inner = Arc::new(Mutex::new(Inner::default()));
        let app = Router::new()
            .route("/refund/{from}", post(refund))
            .with_state(inner.clone());
        tokio::spawn(async move {
            axum::serve(listener, app).await.expect("webhook receiver");
        });
        Receiver {
            addr,
            scheme,
            inner,
            handshakes_failed,
        }
    }

    /// The webhook URL node `i` is given.
    fn url(&self, i: usize) -> String {
        format!("{}://{}/refund/{i}", self.scheme, self.addr)
    }

    fn state(&self) -> MutexGuard<'_, Inner> {
        lock(&self.inner)
    }

    fn calls(&self) -> Vec<Call> {
        self.state().calls.clone()
    }

    fn calls_for(&self, loser_txn: &str) -> Vec<Call> {
        let mut calls = self.calls();
        calls.retain(|c| c.loser_txn() == loser_txn);
        calls
    }

    fn effects_for(&self, loser_txn: &str) -> usize {
        self.state()
            .effects
            .values()
            .filter(|t| *t == loser_txn)
            .count()
    }

    fn effects(&self) -> usize {
        self.state().effects.len()
    }

    /// Every call so far, one line each, for failure messages.
    fn describe(&self) -> String {
        let st = self.state();
        let mut out = format!("receiver {}: {} call(s)\n", self.addr, st.calls.len());
        let first = st.calls.first().map(|c| c.at);
        for c in &st.calls {
            let _ = writeln!(
                out,
                "  +{:>5} ms from node {} key {:?} loser {} (node {}) winner {} attempt {} -> {}",
                first.map_or(0, |f| c.at.duration_since(f).as_millis()),
                c.from,
                c.key,
                c.loser_txn(),
                c.body["loser"]["node"],
                c.body["winner"]["txn_id"],
                c.body["attempt"],
                c.status
            );
        }
        let _ = writeln!(out, "  effects: {:?}", st.effects);
        out
    }
}

async fn refund(
    State(inner): State<Arc<Mutex<Inner>>>,
    Path(from): Path<usize>,
    headers: HeaderMap,
    body: Bytes,
) -> (StatusCode, String) {
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let (key, authorization) = (header("idempotency-key"), header("authorization"));
    let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let (status, answer, delay) = {
        let mut st = lock(&inner);
        let delay = (st.slow_next > 0).then(|| {
            st.slow_next -= 1;
            st.delay
        });
        let (status, answer) = if key.is_none() {
            (400, "missing Idempotency-Key".to_owned())
        } else if st.reject {
            (400, "refund refused: card account closed".to_owned())
        } else if st.fail_next > 0 {
            st.fail_next -= 1;
            (503, "refund service overloaded".to_owned())
        } else {
            let key = key.clone().unwrap_or_default();
            let loser = body["loser"]["txn_id"].as_str().unwrap_or("").to_owned();
            let duplicate = st.effects.contains_key(&key);
            st.effects.entry(key).or_insert(loser);
            let answer = json!({ "refunded": true, "duplicate": duplicate }).to_string();
            (200, answer)
        };
        st.calls.push(Call {
            from,
            key,
            authorization,
            body,
            at: Instant::now(),
            status,
        });
        (status, answer, delay)
    };
    if let Some(delay) = delay {
        tokio::time::sleep(delay).await;
    }
    (
        StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        answer,
    )
}

// ---------------------------------------------------------------------------
// Making a conflict.
// ---------------------------------------------------------------------------

/// One allocation of the contested key.
#[derive(Clone, Debug)]
struct Made {
    node: usize,
    txn: String,
    peer: String,
    hlc: String,
}

/// A cluster in which `key` was allocated by several nodes during a partition.
struct Scenario {
    c: Cluster,
    key: String,
    /// Sorted by (hlc, node): the first is the winner.
    made: Vec<Made>,
}

impl Scenario {
    fn winner(&self) -> &Made {
        &self.made[0]
    }

    fn losers(&self) -> &[Made] {
        &self.made[1..]
    }

    fn loser(&self) -> &Made {
        assert_eq!(self.made.len(), 2, "scenario has more than one loser");
        &self.made[1]
    }
}

/// Starts `n` nodes, each posting compensations to the receiver, cuts every
/// link, allocates `key` on each node in `allocating` (same payload: a
/// client's retry that hit another region; the first one made wins), and
/// returns without healing.
async fn partitioned_conflict(
    n: usize,
    allocating: &[usize],
    rx: &Receiver,
    extra_args: &[&str],
) -> Scenario {
    let opts = ClusterOptions::default().args(extra_args.iter().copied());
    partitioned_conflict_with(n, allocating, rx, opts).await
}

/// [`partitioned_conflict`] with the cluster's options (e.g. per-node flags).
async fn partitioned_conflict_with(
    n: usize,
    allocating: &[usize],
    rx: &Receiver,
    opts: ClusterOptions,
) -> Scenario {
    let mut opts = opts.args(BACKOFF_ARGS);
    for i in 0..n {
        opts = opts.node_args(
            i,
            [
                "--compensation".to_owned(),
                format!("webhook:{}", rx.url(i)),
            ],
        );
    }
    let c = Cluster::start(n, opts).await;
    for i in 0..n {
        c.isolate(i);
    }
    let key = "order-7-refund".to_owned();
    let mut made = Vec::new();
    for &node in allocating {
        // A few ms apart, on one machine's clock: allocations win in the
        // order made, so a test can give the winner and losers roles.
        tokio::time::sleep(Duration::from_millis(5)).await;
        let (code, body) = c
            .node(node)
            .post_json(
                "/v1/allocations",
                &json!({ "key": key, "payload": { "customer": 7, "amount_cents": 1250 } }),
            )
            .await;
        assert_eq!(code, 201, "allocate on node {node}: {body}");
        let field = |f: &str| {
            body[f]
                .as_str()
                .unwrap_or_else(|| panic!("no {f} in {body}"))
                .to_owned()
        };
        made.push(Made {
            node,
            txn: field("txn_id"),
            peer: field("node"),
            hlc: field("hlc"),
        });
        assert_eq!(made.last().unwrap().peer, c.node(node).peer_id());
    }
    made.sort_by(|a, b| (&a.hlc, &a.peer).cmp(&(&b.hlc, &b.peer)));
    for pair in made.windows(2) {
        assert_ne!(pair[0].txn, pair[1].txn, "one transaction twice: {made:?}");
    }
    Scenario { c, key, made }
}

/// The conflict report entry for `key` on `node`, if any.
async fn conflict_entry(c: &Cluster, node: usize, key: &str) -> Option<Value> {
    let (code, body) = c.node(node).try_get_json("/v1/conflicts").await.ok()?;
    if code != 200 {
        return None;
    }
    body["conflicts"]
        .as_array()?
        .iter()
        .find(|e| e["key"] == key)
        .cloned()
}

/// The compensation of `loser_txn` in a conflict report entry.
fn compensation<'a>(entry: &'a Value, loser_txn: &str) -> Option<&'a Value> {
    entry["compensations"]
        .as_array()?
        .iter()
        .find(|c| c["txn_id"] == loser_txn)
}

/// Waits until `node`'s report names `winner` the winner of `key` and
/// `check` holds for the compensation of every loser in `losers`; returns
/// the entry. Panics with logs if that does not happen within [`CONVERGE`].
async fn wait_for_report(
    s: &Scenario,
    rx: &Receiver,
    node: usize,
    losers: &[Made],
    what: &str,
    check: impl Fn(&Value) -> bool,
) -> Value {
    let mut last = None;
    let ok =
        s.c.wait_until_async(CONVERGE, async || {
            last = conflict_entry(&s.c, node, &s.key).await;
            last.as_ref().is_some_and(|e| {
                e["winner"] == s.winner().txn.as_str()
                    && losers
                        .iter()
                        .all(|l| compensation(e, &l.txn).is_some_and(&check))
            })
        })
        .await;
    let Some(entry) = last.clone().filter(|_| ok) else {
        panic!(
            "node {node} never reported {what} (winner {:?}, losers {losers:?}); last report entry: {last:?}\n{}\n{}",
            s.winner(),
            rx.describe(),
            s.c.logs(40)
        );
    };
    entry
}

fn state_is(state: &'static str) -> impl Fn(&Value) -> bool {
    move |c: &Value| c["state"] == state
}

/// Waits until `node`'s report shows `loser`'s compensation in `state`;
/// returns that compensation and, for failure messages, the whole entry.
async fn wait_for_loser_state(
    s: &Scenario,
    rx: &Receiver,
    node: usize,
    loser: &Made,
    state: &'static str,
) -> (Value, Value) {
    let losers = std::slice::from_ref(loser);
    let entry = wait_for_report(s, rx, node, losers, state, state_is(state)).await;
    let comp = compensation(&entry, &loser.txn)
        .cloned()
        .unwrap_or_default();
    (comp, entry)
}

/// Receiver-side checks for every loser: each call about it came from its
/// own node, named its own node as the loser and the winner as the winner,
/// and carried the one stable key (header and body); the refund was carried
/// out exactly once. No call ever named the winner as a loser.
fn assert_compensated_once_by_owner(s: &Scenario, rx: &Receiver) {
    let winner = s.winner();
    let all = rx.calls();
    let winner_calls = all.iter().filter(|c| c.loser_txn() == winner.txn).count();
    assert_eq!(
        winner_calls,
        0,
        "the winner {winner:?} was compensated\n{}",
        rx.describe()
    );
    for loser in s.losers() {
        let want_key = format!("{KEY_PREFIX}{}", loser.txn);
        let calls = rx.calls_for(&loser.txn);
        assert!(
            !calls.is_empty(),
            "no call for {loser:?}\n{}",
            rx.describe()
        );
        for call in &calls {
            let ctx = || format!("call {call:?} for loser {loser:?}\n{}", rx.describe());
            assert_eq!(call.from, loser.node, "made by another node: {}", ctx());
            assert_eq!(call.body["loser"]["node"], loser.peer.as_str(), "{}", ctx());
            assert_eq!(call.body["key"], s.key.as_str(), "{}", ctx());
            assert_eq!(call.key.as_deref(), Some(want_key.as_str()), "{}", ctx());
            assert_eq!(call.body["idempotency_key"], want_key.as_str(), "{}", ctx());
            assert_ne!(
                call.body["winner"]["txn_id"],
                loser.txn.as_str(),
                "{}",
                ctx()
            );
        }
        assert_eq!(
            rx.effects_for(&loser.txn),
            1,
            "refunds carried out for {loser:?}\n{}",
            rx.describe()
        );
    }
    assert_eq!(
        rx.effects(),
        s.losers().len(),
        "refunds other than one per loser\n{}",
        rx.describe()
    );
    // Every call was about a loser of this key.
    let known = all
        .iter()
        .filter(|c| s.losers().iter().any(|l| l.txn == c.loser_txn()))
        .count();
    assert_eq!(
        known,
        all.len(),
        "calls about unknown transactions\n{}",
        rx.describe()
    );
}

/// Waits up to `quiet` for any further call; fails if one arrives.
async fn assert_no_more_calls(rx: &Receiver, quiet: Duration) {
    let before = rx.calls().len();
    let more = support::wait_until(quiet, || rx.calls().len() != before).await;
    assert!(!more, "a call arrived after the end\n{}", rx.describe());
}

fn attempts(c: &Value) -> u64 {
    c["attempts"].as_u64().unwrap_or(0)
}

// ---------------------------------------------------------------------------
// Tests.
// ---------------------------------------------------------------------------

/// The basic contract: one effect per loser, by the loser's own node, with
/// the stable key; the winner never; every region reports `succeeded`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_losers_own_node_compensates_it_exactly_once() {
    let rx = Receiver::start().await;
    let s = partitioned_conflict(3, &[0, 1], &rx, &[]).await;
    s.c.heal_all();
    let loser = s.loser().clone();
    for node in 0..3 {
        let entry = wait_for_report(
            &s,
            &rx,
            node,
            std::slice::from_ref(&loser),
            "succeeded",
            |c| c["state"] == "succeeded" && attempts(c) >= 1,
        )
        .await;
        let comp = compensation(&entry, &loser.txn).unwrap();
        assert_eq!(comp["owner"], loser.peer.as_str(), "node {node}: {entry}");
        assert_eq!(attempts(comp), 1, "node {node}: {entry}");
        assert_eq!(
            comp["idempotency_key"],
            format!("{KEY_PREFIX}{}", loser.txn),
            "node {node}: {entry}"
        );
        assert_eq!(entry["compensations"].as_array().map(Vec::len), Some(1));
        assert_eq!(entry["resolved"], true, "node {node}: {entry}");
    }
    assert_eq!(rx.calls_for(&loser.txn).len(), 1, "{}", rx.describe());
    assert_compensated_once_by_owner(&s, &rx);
    assert_no_more_calls(&rx, Duration::from_secs(1)).await;
}

/// A refund call that takes seconds holds up none of its node's other
/// compensations: attempts of different losers run side by side.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_refund_call_does_not_hold_up_the_nodes_other_compensations() {
    let rx = Receiver::start().await;
    let slow = Duration::from_secs(4);
    {
        let mut st = rx.state();
        st.slow_next = 1;
        st.delay = slow;
    }
    let s = partitioned_conflict(2, &[0, 1], &rx, &[]).await;
    // Four more keys, each allocated by node 0 and then, a little later on
    // the same clock, by node 1: node 1 loses all five.
    for i in 0..4 {
        let key = format!("order-8{i}-refund");
        for node in 0..2 {
            let (code, body) =
                s.c.node(node)
                    .post_json(
                        "/v1/allocations",
                        &json!({ "key": key, "payload": { "customer": i } }),
                    )
                    .await;
            assert_eq!(code, 201, "allocate {key} on node {node}: {body}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    s.c.heal_all();
    let all_done =
        s.c.wait_until_async(CONVERGE, async || rx.effects() == 5)
            .await;
    assert!(all_done, "not every loser was refunded:\n{}", rx.describe());
    let calls = rx.calls();
    let slow_call = &calls[0];
    let others: Vec<&Call> = calls[1..]
        .iter()
        .filter(|c| c.from == slow_call.from)
        .collect();
    assert!(!others.is_empty(), "{}", rx.describe());
    assert!(
        others.iter().all(|c| c.at < slow_call.at + slow),
        "a compensation waited for the slow call of another:\n{}",
        rx.describe()
    );
    // Five losers, five calls, all by the losing node, none repeated.
    assert_eq!(calls.len(), 5, "{}", rx.describe());
    assert!(calls.iter().all(|c| c.from == 1), "{}", rx.describe());
}

/// 503 three times: retried with backoff, with the same key, then done once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retryable_failures_are_retried_with_backoff_and_the_same_key() {
    let rx = Receiver::start().await;
    rx.state().fail_next = 3;
    let s = partitioned_conflict(2, &[0, 1], &rx, &[]).await;
    s.c.heal_all();
    let loser = s.loser().clone();
    for node in 0..2 {
        let (comp, entry) = wait_for_loser_state(&s, &rx, node, &loser, "succeeded").await;
        assert_eq!(attempts(&comp), 4, "node {node}: {entry}");
        let error = comp["last_error"].as_str().unwrap_or("");
        assert!(error.contains("503"), "node {node}: {entry}");
    }
    let calls = rx.calls_for(&loser.txn);
    let statuses: Vec<u16> = calls.iter().map(|c| c.status).collect();
    assert_eq!(statuses, [503, 503, 503, 200], "{}", rx.describe());
    let attempt_numbers: Vec<&Value> = calls.iter().map(|c| &c.body["attempt"]).collect();
    assert_eq!(attempt_numbers, [1, 2, 3, 4], "{}", rx.describe());
    // Capped exponential backoff: the n-th wait is at least
    // initial * 2^(n-1) shrunk by the jitter.
    for (n, pair) in calls.windows(2).enumerate() {
        let gap = pair[1].at.duration_since(pair[0].at);
        let base = INITIAL_BACKOFF.as_secs_f64() * 2f64.powi(n as i32);
        let least = Duration::from_secs_f64(base.min(0.4) * (1.0 - JITTER));
        assert!(
            gap >= least,
            "retry {} came {gap:?} after the previous call (backoff at least {least:?})\n{}",
            n + 1,
            rx.describe()
        );
    }
    assert_compensated_once_by_owner(&s, &rx);
}

/// SIGKILL of the compensating node while its call is in flight: after the
/// restart it retries with the same key, so the refund still happens once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_compensating_node_killed_mid_call_retries_with_the_same_key() {
    let rx = Receiver::start().await;
    {
        let mut st = rx.state();
        st.slow_next = 1;
        st.delay = Duration::from_secs(3);
    }
    let s = partitioned_conflict(2, &[0, 1], &rx, &[]).await;
    s.c.heal_all();
    let loser = s.loser().clone();
    let arrived = support::wait_until(CONVERGE, || !rx.calls_for(&loser.txn).is_empty()).await;
    assert!(
        arrived,
        "no call arrived\n{}\n{}",
        rx.describe(),
        s.c.logs(40)
    );
    // The receiver is still sleeping on the first call: its answer never
    // reaches the node.
    s.c.kill(loser.node);
    assert_eq!(rx.calls_for(&loser.txn).len(), 1, "{}", rx.describe());
    s.c.restart(loser.node).await;
    for node in 0..2 {
        let (comp, entry) = wait_for_loser_state(&s, &rx, node, &loser, "succeeded").await;
        assert_eq!(attempts(&comp), 2, "node {node}: {entry}");
        let error = comp["last_error"].as_str().unwrap_or("");
        assert!(error.contains("interrupted"), "node {node}: {entry}");
    }
    let calls = rx.calls_for(&loser.txn);
    assert_eq!(calls.len(), 2, "{}", rx.describe());
    assert_compensated_once_by_owner(&s, &rx);
}

/// Three regions allocate the same key. The two later ones meet first, so
/// the last becomes a loser of the middle one; then the earliest arrives and
/// beats the middle one, which must then be compensated too. The earliest is
/// never compensated.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_three_region_conflict_compensates_both_losers_each_by_its_own_node() {
    let rx = Receiver::start().await;
    let s = partitioned_conflict(3, &[0, 1, 2], &rx, &[]).await;
    let (middle, last) = (s.made[1].clone(), s.made[2].clone());
    s.c.heal_link(middle.node, last.node);
    let last_done = support::wait_until(CONVERGE, || {
        rx.calls_for(&last.txn).iter().any(|c| c.status == 200)
    })
    .await;
    assert!(
        last_done,
        "the last allocation was never compensated against the middle one\n{}\n{}",
        rx.describe(),
        s.c.logs(40)
    );
    assert!(rx.calls_for(&middle.txn).is_empty(), "{}", rx.describe());
    s.c.heal_all();
    let winner = s.winner().txn.clone();
    for node in 0..3 {
        // The last loser's record first named the middle allocation its
        // winner; its owner rewrites it once it sees the first, and that
        // rewrite reaches each node a moment after the allocation itself.
        let entry = wait_for_report(
            &s,
            &rx,
            node,
            s.losers(),
            "succeeded against the final winner",
            |c| state_is("succeeded")(c) && c["winner_txn_id"] == winner.as_str(),
        )
        .await;
        for loser in s.losers() {
            let comp = compensation(&entry, &loser.txn).unwrap();
            assert_eq!(comp["owner"], loser.peer.as_str(), "node {node}: {entry}");
            assert_eq!(attempts(comp), 1, "node {node}: {entry}");
            assert_eq!(
                comp["winner_txn_id"],
                s.winner().txn.as_str(),
                "node {node}: {entry}"
            );
        }
        assert!(
            compensation(&entry, &s.winner().txn).is_none(),
            "node {node}: {entry}"
        );
        assert_eq!(entry["allocations"].as_array().map(Vec::len), Some(3));
    }
    for loser in s.losers() {
        assert_eq!(rx.calls_for(&loser.txn).len(), 1, "{}", rx.describe());
    }
    assert_compensated_once_by_owner(&s, &rx);
    assert_no_more_calls(&rx, Duration::from_secs(1)).await;
}

async fn cli(args: &[&str]) -> (i32, String) {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_oncemesh"))
        .args(args)
        .env_remove("ONCEMESH_NODE")
        .env_remove("ONCEMESH_API_TOKEN")
        .output()
        .await
        .expect("run oncemesh");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap_or(-1), text)
}

/// A 400 dead-letters at once and makes the node critical; after the
/// receiver is fixed, an operator retry compensates once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_permanent_failure_dead_letters_and_an_operator_retry_finishes_it() {
    let rx = Receiver::start().await;
    rx.state().reject = true;
    let s = partitioned_conflict(2, &[0, 1], &rx, &[]).await;
    s.c.heal_all();
    let loser = s.loser().clone();
    let owner = s.c.node(loser.node);
    for node in [loser.node, s.winner().node] {
        let (comp, entry) = wait_for_loser_state(&s, &rx, node, &loser, "dead-lettered").await;
        assert_eq!(attempts(&comp), 1, "node {node}: {entry}");
        let error = comp["last_error"].as_str().unwrap_or("");
        assert!(
            error.contains("400") && error.contains("card account closed"),
            "node {node}: {entry}"
        );
    }
    let (code, health) = owner.get_json("/v1/health").await;
    assert_eq!(health["status"], "critical", "{health}");
    assert_eq!(code, 503, "critical answers 503: {health}");
    let reasons = health["reasons"].as_array().unwrap();
    assert!(
        reasons.iter().any(|r| r["code"] == "dead_lettered"),
        "{health}"
    );
    assert_eq!(health["compensations"]["dead_lettered"], 1, "{health}");
    assert_eq!(rx.calls_for(&loser.txn).len(), 1, "{}", rx.describe());
    assert_eq!(rx.effects(), 0, "{}", rx.describe());

    // Only the owner can retry it.
    let winner_url = s.c.node(s.winner().node).http_url();
    let (code, out) = cli(&["retry-compensation", &loser.txn, "--node", &winner_url]).await;
    assert_ne!(code, 0, "retry on a node that does not own it: {out}");

    rx.state().reject = false;
    let (code, out) = cli(&[
        "retry-compensation",
        &loser.txn,
        "--node",
        &owner.http_url(),
    ])
    .await;
    assert_eq!(code, 0, "retry-compensation failed: {out}");
    for node in 0..2 {
        let (comp, entry) = wait_for_loser_state(&s, &rx, node, &loser, "succeeded").await;
        // A fresh budget after an operator retry: this was its first attempt.
        assert_eq!(attempts(&comp), 1, "node {node}: {entry}");
    }
    let statuses: Vec<u16> = rx.calls_for(&loser.txn).iter().map(|c| c.status).collect();
    assert_eq!(statuses, [400, 200], "{}", rx.describe());
    assert_compensated_once_by_owner(&s, &rx);
    let healthy =
        s.c.wait_until_async(CONVERGE, async || {
            owner.get_json("/v1/health").await.1["compensations"]["dead_lettered"] == 0
        })
        .await;
    assert!(healthy, "{}", owner.get_json("/v1/health").await.1);
    // A succeeded compensation cannot be retried again.
    let (code, out) = cli(&[
        "retry-compensation",
        &loser.txn,
        "--node",
        &owner.http_url(),
    ])
    .await;
    assert_ne!(code, 0, "retry of a succeeded compensation: {out}");
    assert_eq!(rx.effects(), 1, "{}", rx.describe());
}

/// A compensation that never succeeded is forgotten when its allocation
/// passes the retention: the node says so loudly in its log, stops counting
/// it as dead-lettered, and is no longer critical because of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_lettered_compensation_is_forgotten_loudly_once_its_allocation_expires() {
    let rx = Receiver::start().await;
    rx.state().reject = true;
    let s = partitioned_conflict(2, &[0, 1], &rx, &["--retention", "6s"]).await;
    s.c.heal_all();
    let loser = s.loser().clone();
    let owner = s.c.node(loser.node);
    let dead_lettered =
        async || owner.get_json("/v1/health").await.1["compensations"]["dead_lettered"].as_u64();
    assert!(
        s.c.wait_until_async(CONVERGE, async || dead_lettered().await == Some(1))
            .await,
        "never dead-lettered\n{}\n{}",
        rx.describe(),
        s.c.logs(40)
    );
    assert!(
        s.c.wait_until_async(Duration::from_secs(15), async || {
            dead_lettered().await == Some(0)
        })
        .await,
        "still dead-lettered after the retention\n{}",
        s.c.logs(40)
    );
    let (_, health) = owner.get_json("/v1/health").await;
    assert_ne!(health["status"], "critical", "{health}");
    let (_, conflicts) = owner.get_json("/v1/conflicts").await;
    assert_eq!(conflicts["conflicts"], json!([]), "{conflicts}");
    let log = std::fs::read_to_string(owner.log_path()).unwrap_or_default();
    assert!(
        log.contains("expired before its compensation succeeded") && log.contains(&loser.txn),
        "{}",
        owner.log_tail(40)
    );
    assert_eq!(rx.calls_for(&loser.txn).len(), 1, "{}", rx.describe());
}

// ---------------------------------------------------------------------------
// HTTPS endpoints: a private CA made by the test, mTLS.
// ---------------------------------------------------------------------------

/// A TLS listener for axum: handshakes each connection before handing it
/// over, and counts the handshakes that fail (a client that refuses the
/// certificate, or comes without the one required).
struct TlsListener {
    tcp: tokio::net::TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
    failed: Arc<AtomicUsize>,
}

impl axum::serve::Listener for TlsListener {
    type Io = tokio_rustls::server::TlsStream<tokio::net::TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            let Ok((tcp, addr)) = self.tcp.accept().await else {
                continue;
            };
            let handshake = self.acceptor.accept(tcp);
            match tokio::time::timeout(Duration::from_secs(5), handshake).await {
                Ok(Ok(tls)) => return (tls, addr),
                _ => {
                    self.failed.fetch_add(1, Ordering::SeqCst);
                }
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.tcp.local_addr()
    }
}

/// Certificates made for one test, the ones nodes read as PEM files.
struct Pki {
    dir: tempfile::TempDir,
    ca: rcgen::Certificate,
    ca_key: rcgen::KeyPair,
    server: rcgen::Certificate,
    server_key: rcgen::KeyPair,
}

impl Pki {
    fn new() -> Pki {
        let dir = tempfile::tempdir().expect("tempdir");
        let (ca, ca_key) = self_signed_ca("oncemesh test CA");
        let server_key = rcgen::KeyPair::generate().expect("server key");
        let mut params = rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned()])
            .expect("server certificate parameters");
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
        let server = params
            .signed_by(&server_key, &ca, &ca_key)
            .expect("server certificate");
        let pki = Pki {
            dir,
            ca,
            ca_key,
            server,
            server_key,
        };
        pki.write("ca.pem", &pki.ca.pem());
        pki
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn write(&self, name: &str, text: &str) -> PathBuf {
        let path = self.path(name);
        std::fs::write(&path, text).expect("write a PEM file");
        path
    }

    /// Another CA, which signed nothing the receiver presents.
    fn other_ca(&self) -> PathBuf {
        let (other, _) = self_signed_ca("some other CA");
        self.write("other-ca.pem", &other.pem())
    }

    /// A client certificate signed by the CA: (certificate, key) files.
    fn client_identity(&self, name: &str) -> (PathBuf, PathBuf) {
        let key = rcgen::KeyPair::generate().expect("client key");
        let mut params =
            rcgen::CertificateParams::new(vec![name.to_owned()]).expect("client parameters");
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
        let cert = params
            .signed_by(&key, &self.ca, &self.ca_key)
            .expect("client certificate");
        (
            self.write(&format!("{name}.pem"), &cert.pem()),
            self.write(&format!("{name}-key.pem"), &key.serialize_pem()),
        )
    }

    /// The receiver's TLS configuration; with `require_client_cert` it
    /// refuses clients without a certificate signed by the CA.
    fn server_config(&self, require_client_cert: bool) -> rustls::ServerConfig {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .expect("protocol versions");
        let builder = if require_client_cert {
            let mut roots = rustls::RootCertStore::empty();
            roots.add(self.ca.der().clone()).expect("CA as a root");
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                provider,
            )
            .build()
            .expect("client verifier");
            builder.with_client_cert_verifier(verifier)
        } else {
            builder.with_no_client_auth()
        };
        let key = rustls::pki_types::PrivateKeyDer::try_from(self.server_key.serialize_der())
            .expect("server key DER");
        builder
            .with_single_cert(vec![self.server.der().clone()], key)
            .expect("server certificate and key")
    }
}

fn self_signed_ca(name: &str) -> (rcgen::Certificate, rcgen::KeyPair) {
    let key = rcgen::KeyPair::generate().expect("CA key");
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("CA parameters");
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, name);
    params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::DigitalSignature,
    ];
    (params.self_signed(&key).expect("CA certificate"), key)
}

fn arg(path: &FsPath) -> String {
    path.to_str().expect("UTF-8 temp path").to_owned()
}

/// An https:// endpoint under a private CA: the losers are compensated once
/// each in effect, and every call carries the extra header that the TOML
/// file (not the command line) gave.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_https_endpoint_under_a_private_ca_is_compensated_once() {
    let pki = Pki::new();
    let rx = Receiver::start_tls(pki.server_config(false)).await;
    let config = pki.write(
        "node.toml",
        &format!(
            "webhook_ca = {:?}\n[webhook_headers]\nAuthorization = \"Bearer refund-token\"\n",
            arg(&pki.path("ca.pem"))
        ),
    );
    let s = partitioned_conflict(3, &[0, 1, 2], &rx, &["--config", &arg(&config)]).await;
    s.c.heal_all();
    for node in 0..3 {
        wait_for_report(
            &s,
            &rx,
            node,
            s.losers(),
            "succeeded",
            state_is("succeeded"),
        )
        .await;
    }
    assert_compensated_once_by_owner(&s, &rx);
    let calls = rx.calls();
    assert!(
        calls
            .iter()
            .all(|c| c.authorization.as_deref() == Some("Bearer refund-token")),
        "{}",
        rx.describe()
    );
    assert_eq!(rx.handshakes_failed.load(Ordering::SeqCst), 0);
    assert_no_more_calls(&rx, Duration::from_secs(1)).await;
}

/// A certificate that does not verify (signed by a CA the node was not
/// told to trust) is a failed attempt with a TLS error, every time, until
/// the compensation dead-letters: never a success, and no refund.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_that_does_not_verify_fails_every_attempt_and_dead_letters() {
    let pki = Pki::new();
    let rx = Receiver::start_tls(pki.server_config(false)).await;
    let other_ca = pki.other_ca();
    let s = partitioned_conflict(
        2,
        &[0, 1],
        &rx,
        &[
            "--webhook-ca",
            &arg(&other_ca),
            "--compensation-max-attempts",
            "3",
        ],
    )
    .await;
    s.c.heal_all();
    let loser = s.loser().clone();
    for node in 0..2 {
        let (comp, entry) = wait_for_loser_state(&s, &rx, node, &loser, "dead-lettered").await;
        assert_eq!(attempts(&comp), 3, "node {node}: {entry}");
        let error = comp["last_error"].as_str().unwrap_or("");
        assert!(
            error.contains("TLS error") && error.contains("certificate"),
            "node {node}: {entry}"
        );
    }
    assert!(rx.calls().is_empty(), "{}", rx.describe());
    assert_eq!(rx.effects(), 0);
    assert!(rx.handshakes_failed.load(Ordering::SeqCst) >= 3);
}

/// An endpoint that requires client certificates: the loser whose node
/// presents one signed by the CA is compensated; the one whose node has
/// none is refused at the handshake, with a TLS error, and dead-letters.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mtls_refuses_a_node_without_a_client_certificate_and_serves_one_with_it() {
    let pki = Pki::new();
    let rx = Receiver::start_tls(pki.server_config(true)).await;
    let (cert, key) = pki.client_identity("lon");
    let ca = arg(&pki.path("ca.pem"));
    let opts = ClusterOptions::default()
        .args(["--webhook-ca", &ca, "--compensation-max-attempts", "2"])
        .node_args(
            1,
            [
                "--webhook-client-cert",
                &arg(&cert),
                "--webhook-client-key",
                &arg(&key),
            ],
        );
    // Node 0 wins; node 1 (with a certificate) and node 2 (without) lose.
    let s = partitioned_conflict_with(3, &[0, 1, 2], &rx, opts).await;
    assert_eq!(
        s.made.iter().map(|m| m.node).collect::<Vec<_>>(),
        [0, 1, 2],
        "allocations win in the order made: {:?}",
        s.made
    );
    s.c.heal_all();
    let (with_cert, without) = (s.made[1].clone(), s.made[2].clone());
    for node in 0..3 {
        let (_, entry) = wait_for_loser_state(&s, &rx, node, &with_cert, "succeeded").await;
        let (refused, entry_2) =
            wait_for_loser_state(&s, &rx, node, &without, "dead-lettered").await;
        // In TLS 1.3 the client finishes its side of the handshake before
        // the server checks the client's certificate: the refusal reaches it
        // as a TLS alert, or, when the alert loses the race with the request,
        // as the connection closing under it. The receiver's count of failed
        // handshakes below is what shows the refusal happened there.
        let error = refused["last_error"].as_str().unwrap_or("");
        assert!(
            error.contains("TLS error") || error.contains("connection"),
            "node {node}: {entry} {entry_2}"
        );
        assert_eq!(attempts(&refused), 2, "node {node}: {entry_2}");
    }
    assert!(rx.calls_for(&without.txn).is_empty(), "{}", rx.describe());
    assert_eq!(rx.calls_for(&with_cert.txn).len(), 1, "{}", rx.describe());
    assert_eq!(rx.effects_for(&with_cert.txn), 1, "{}", rx.describe());
    assert!(rx.handshakes_failed.load(Ordering::SeqCst) >= 2);
}

/// A CA file that does not parse stops the node at start, naming the file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ca_file_that_does_not_parse_stops_the_node_naming_it() {
    let pki = Pki::new();
    let bad = pki.write(
        "not-a-ca.pem",
        "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
    );
    let data = pki.path("data");
    let (code, out) = cli(&[
        "run",
        "--data-dir",
        &arg(&data),
        "--http",
        "127.0.0.1:0",
        "--compensation",
        "webhook:https://127.0.0.1:9/refund",
        "--webhook-ca",
        &arg(&bad),
    ])
    .await;
    assert_ne!(code, 0, "{out}");
    assert!(
        out.contains(&arg(&bad)),
        "the message names the file: {out}"
    );
    assert!(!out.contains("oncemesh node started"), "{out}");
}
