//! The HTTP API and the command-line client against real `oncemesh run`
//! processes (one node each, HTTP on port 0, temp data dirs): allocation,
//! replay and misuse, input validation, the bearer token, the automerge
//! documents as a public format, merging documents by hand between two
//! unpeered regions, and the client subcommands.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::process::Output;
use std::time::Duration;

use automerge::{Automerge, ReadDoc, ScalarValue, Value as AmValue, ROOT};
use reqwest::Method;
use serde_json::{json, Value};
use support::{Cluster, ClusterOptions, Node};

const STATES: [&str; 5] = [
    "provisional",
    "settled",
    "conflicted",
    "compensating",
    "compensated",
];

fn one(region: &str) -> ClusterOptions {
    ClusterOptions::default().regions(&[region])
}

/// POSTs `body` as raw bytes (any content, any token) and returns
/// (status, JSON body or Value::String of the text).
async fn post_raw(
    node: &Node,
    path: &str,
    content_type: &str,
    body: Vec<u8>,
    token: Option<&str>,
) -> (u16, Value) {
    let mut req = node
        .client()
        .post(node.url(path))
        .header("content-type", content_type)
        .body(body);
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let resp = req
        .send()
        .await
        .unwrap_or_else(|e| panic!("POST {path}: {e:#}\n{}", node.describe()));
    let status = resp.status().as_u16();
    let bytes = resp.bytes().await.expect("response body");
    let value = serde_json::from_slice(&bytes)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()));
    (status, value)
}

/// GETs `path` and returns the raw body bytes (with the node's token).
async fn get_bytes(node: &Node, path: &str) -> (u16, Vec<u8>) {
    let mut req = node.client().get(node.url(path));
    if let Some(t) = node.api_token() {
        req = req.bearer_auth(t);
    }
    let resp = req
        .send()
        .await
        .unwrap_or_else(|e| panic!("GET {path}: {e:#}\n{}", node.describe()));
    let status = resp.status().as_u16();
    (status, resp.bytes().await.expect("response body").to_vec())
}

async fn allocate(node: &Node, key: &str, payload: Value) -> (u16, Value) {
    node.post_json(
        "/v1/allocations",
        &json!({ "key": key, "payload": payload }),
    )
    .await
}

/// A refused allocate request: what it is, the raw body, the expected status
/// (`None`: any 4xx), and a key that must stay unknown afterwards.
type BadCase = (&'static str, Vec<u8>, Option<u16>, Option<&'static str>);

/// The `error` message of an error response; panics if the shape is wrong.
fn error_message(status: u16, body: &Value, what: &str) -> String {
    match body.get("error").and_then(Value::as_str) {
        Some(m) if !m.trim().is_empty() => m.to_string(),
        _ => panic!("{what}: {status} response is not {{\"error\": \"...\"}}: {body}"),
    }
}

/// `ledger.allocations` of /v1/health.
async fn allocation_count(node: &Node) -> u64 {
    let (status, health) = node.get_json("/v1/health").await;
    assert_eq!(status, 200, "health: {health}");
    health["ledger"]["allocations"]
        .as_u64()
        .unwrap_or_else(|| panic!("health has no ledger.allocations count: {health}"))
}

/// Checks the fields scripts rely on in one allocation object.
fn check_allocation_fields(a: &Value, key: &str, region: &str, node: &str) {
    assert_eq!(a["key"], key, "key of {a}");
    let txn = a["txn_id"].as_str().unwrap_or("");
    assert!(!txn.is_empty(), "txn_id missing in {a}");
    assert_eq!(a["region"], region, "region of {a}");
    assert_eq!(a["node"], node, "node (peer id) of {a}");
    let hlc = a["hlc"].as_str().unwrap_or("");
    assert!(!hlc.is_empty(), "hlc must be a non-empty string in {a}");
    let c = a["confidence"]
        .as_f64()
        .unwrap_or_else(|| panic!("confidence is not a number in {a}"));
    assert!(
        (0.0..=1.0).contains(&c),
        "confidence {c} outside 0..=1 in {a}"
    );
    let state = a["state"].as_str().unwrap_or("");
    assert!(STATES.contains(&state), "unknown state {state:?} in {a}");
}

/// One allocation record as read from an automerge document with nothing but
/// an automerge library and docs/DATA_MODEL.md.
#[derive(Debug, Clone)]
struct DocRecord {
    /// The batch's map key.
    map_key: String,
    /// Position in its batch.
    index: usize,
    record: Value,
    /// Whether its batch is in the compact layout.
    compact: bool,
}

/// The records of a batch in either layout of docs/DATA_MODEL.md, as
/// record objects.
fn records_of_batch(batch: Value, what: &str) -> Vec<Value> {
    if let Value::Array(records) = batch {
        return records;
    }
    assert_eq!(
        batch["v"], 2,
        "{what}: a compact batch is layout 2: {batch}"
    );
    let rows = batch["records"]
        .as_array()
        .unwrap_or_else(|| panic!("{what}: a compact batch without records: {batch}"));
    rows.iter()
        .map(|row| {
            json!({
                "v": 1,
                "key": row[0], "txn_id": row[1], "hlc": row[2],
                "fingerprint": row[3], "confidence": row[4],
                "region": batch["region"], "node": batch["node"],
            })
        })
        .collect()
}

/// Reads root map "allocations": batch id -> JSON text of a batch.
fn read_allocations(bytes: &[u8], what: &str) -> Vec<DocRecord> {
    let doc = Automerge::load(bytes)
        .unwrap_or_else(|e| panic!("{what}: automerge cannot load the bytes: {e}"));
    let obj = match doc.get(ROOT, "allocations") {
        Ok(Some((AmValue::Object(automerge::ObjType::Map), id))) => id,
        other => panic!("{what}: root \"allocations\" is not a map: {other:?}"),
    };
    let mut out = Vec::new();
    for map_key in doc.keys(&obj) {
        let value = doc
            .get(&obj, map_key.as_str())
            .unwrap_or_else(|e| panic!("{what}: get {map_key}: {e}"))
            .unwrap_or_else(|| panic!("{what}: listed key {map_key} has no value"))
            .0;
        let text = match &value {
            AmValue::Scalar(s) => match s.as_ref() {
                ScalarValue::Str(t) => t.to_string(),
                other => panic!("{what}: allocations[{map_key}] is not text: {other:?}"),
            },
            other => panic!("{what}: allocations[{map_key}] is not text: {other:?}"),
        };
        let batch: Value = serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("{what}: allocations[{map_key}] is not JSON ({e}): {text}"));
        let compact = batch.is_object();
        let batch = records_of_batch(batch, what);
        assert!(!batch.is_empty(), "{what}: allocations[{map_key}] is empty");
        for (index, record) in batch.into_iter().enumerate() {
            out.push(DocRecord {
                map_key: map_key.clone(),
                index,
                record,
                compact,
            });
        }
    }
    out
}

/// Every document id listed by /v1/documents.
async fn document_ids(node: &Node) -> Vec<String> {
    let (status, body) = node.get_json("/v1/documents").await;
    assert_eq!(status, 200, "GET /v1/documents: {body}");
    body["documents"]
        .as_array()
        .unwrap_or_else(|| panic!("no documents array: {body}"))
        .iter()
        .map(|d| d["id"].as_str().expect("document id").to_string())
        .collect()
}

/// The id and bytes of the document holding `key`, found by reading every
/// document (the test does not assume the shard function).
async fn document_with_key(node: &Node, key: &str) -> (String, Vec<u8>) {
    let mut found = Vec::new();
    for id in document_ids(node).await {
        let (status, bytes) = get_bytes(node, &format!("/v1/documents/{id}")).await;
        assert_eq!(status, 200, "GET /v1/documents/{id}");
        if read_allocations(&bytes, &id)
            .iter()
            .any(|r| r.record["key"] == key)
        {
            found.push((id, bytes));
        }
    }
    assert_eq!(
        found.len(),
        1,
        "key {key} must be in exactly one document, found in {:?}",
        found.iter().map(|f| &f.0).collect::<Vec<_>>()
    );
    found.pop().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allocate_replay_and_misuse() {
    let cluster = Cluster::start(1, one("sgp")).await;
    let node = cluster.node(0);
    let payload = json!({"amount": 1250, "currency": "EUR", "meta": {"a": 1, "b": [1, 2]}});

    let (status, first) = allocate(node, "order-1", payload.clone()).await;
    assert_eq!(status, 201, "first allocation: {first}");
    check_allocation_fields(&first, "order-1", "sgp", node.peer_id());
    assert_eq!(first["replay"], false, "{first}");
    let txn = first["txn_id"].as_str().unwrap().to_string();

    // The same request again: the same transaction, flagged as a replay.
    let (status, again) = allocate(node, "order-1", payload.clone()).await;
    assert_eq!(status, 200, "replay: {again}");
    assert_eq!(again["replay"], true, "{again}");
    assert_eq!(
        again["txn_id"],
        txn.as_str(),
        "replay must return the same txn"
    );
    assert_eq!(again["hlc"], first["hlc"], "replay must not restamp");
    check_allocation_fields(&again, "order-1", "sgp", node.peer_id());

    // Key order and white space do not change the canonical fingerprint.
    let reordered = br#"{ "payload" : { "meta": {"b": [1,   2], "a": 1},
        "currency":"EUR",   "amount":1250 },
        "key": "order-1" }"#;
    let (status, reordered) = post_raw(
        node,
        "/v1/allocations",
        "application/json",
        reordered.to_vec(),
        None,
    )
    .await;
    assert_eq!(
        status, 200,
        "reordered payload must be a replay: {reordered}"
    );
    assert_eq!(reordered["replay"], true, "{reordered}");
    assert_eq!(reordered["txn_id"], txn.as_str());

    // Same key, another payload: 409 naming the key; nothing written.
    let (status, misuse) = allocate(node, "order-1", json!({"amount": 9999})).await;
    assert_eq!(status, 409, "misuse: {misuse}");
    let msg = error_message(status, &misuse, "misuse");
    assert!(
        msg.contains("order-1"),
        "409 message must name the key: {msg}"
    );
    // The same number written another way is the same payload (RFC 8785).
    let (status, same) = allocate(
        node,
        "order-1",
        json!({"amount": 1250.0, "currency": "EUR", "meta": {"a": 1.0, "b": [1e0, 2]}}),
    )
    .await;
    assert_eq!(status, 200, "1250.0 is 1250: {same}");
    assert_eq!(same["txn_id"], txn.as_str());

    let (status, shown) = node.get_json("/v1/allocations/order-1").await;
    assert_eq!(status, 200, "{shown}");
    assert_eq!(shown["key"], "order-1");
    assert!(
        STATES.contains(&shown["state"].as_str().unwrap_or("")),
        "{shown}"
    );
    let allocations = shown["allocations"].as_array().expect("allocations array");
    assert_eq!(allocations.len(), 1, "one allocation only: {shown}");
    assert_eq!(allocations[0]["txn_id"], txn.as_str());
    check_allocation_fields(&allocations[0], "order-1", "sgp", node.peer_id());
    assert_eq!(allocation_count(node).await, 1);

    // A later allocation gets a later HLC, and HLC strings sort like stamps.
    let (status, second) = allocate(node, "order-2", json!({})).await;
    assert_eq!(status, 201, "{second}");
    assert_ne!(second["txn_id"], txn.as_str(), "a new key gets a new txn");
    let (h1, h2) = (
        first["hlc"].as_str().unwrap(),
        second["hlc"].as_str().unwrap(),
    );
    assert!(h2 > h1, "later hlc {h2} must sort after {h1}");
    // A missing payload is the empty object.
    let (status, no_payload) = node
        .post_json("/v1/allocations", &json!({"key": "order-2"}))
        .await;
    assert_eq!(status, 200, "{no_payload}");
    assert_eq!(no_payload["txn_id"], second["txn_id"]);
    assert_eq!(allocation_count(node).await, 2);
}

/// POSTs `body` to `/v1/allocations` with `Idempotency-Key: <header>`.
async fn allocate_with_header(node: &Node, header: &[u8], body: &str) -> (u16, Value) {
    let value = reqwest::header::HeaderValue::from_bytes(header).expect("a header value");
    let resp = node
        .client()
        .post(node.url("/v1/allocations"))
        .header("idempotency-key", value)
        .header("content-type", "application/json")
        .body(body.to_owned())
        .send()
        .await
        .unwrap_or_else(|e| panic!("POST with header: {e:#}\n{}", node.describe()));
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_idempotency_key_header_takes_the_body_as_the_payload() {
    let cluster = Cluster::start(1, one("sgp")).await;
    let node = cluster.node(0);

    let (status, made) = allocate_with_header(
        node,
        b"pay-9",
        r#"{"amount": 1250, "currency": "EUR", "meta": {"a": 1, "b": 2}}"#,
    )
    .await;
    assert_eq!(status, 201, "header form, new key: {made}");
    check_allocation_fields(&made, "pay-9", "sgp", node.peer_id());
    assert_eq!(made["replay"], false);
    let txn = made["txn_id"].as_str().unwrap().to_owned();

    // Keys reordered, the number written another way, the key as the
    // draft's quoted string: the same request.
    let (status, again) = allocate_with_header(
        node,
        br#""pay-9""#,
        r#"{"meta": {"b": 2, "a": 1}, "currency": "EUR", "amount": 1250.0}"#,
    )
    .await;
    assert_eq!(status, 200, "replay: {again}");
    assert_eq!(again["replay"], true, "{again}");
    assert_eq!(again["txn_id"], txn.as_str());
    // The body form names the same allocation.
    let (status, body_form) = allocate(
        node,
        "pay-9",
        json!({"amount": 1250, "currency": "EUR", "meta": {"a": 1, "b": 2}}),
    )
    .await;
    assert_eq!(
        (status, &body_form["txn_id"]),
        (200, &json!(txn)),
        "{body_form}"
    );
    // So does the body form under the header, when both name one key.
    let (status, both) = allocate_with_header(
        node,
        b"pay-9",
        r#"{"key": "pay-9", "payload": {"amount": 1250, "currency": "EUR", "meta": {"a": 1, "b": 2}}}"#,
    )
    .await;
    assert_eq!((status, &both["txn_id"]), (200, &json!(txn)), "{both}");

    // Another payload: 409, as in the body form (docs/API.md says why not 422).
    let (status, misuse) = allocate_with_header(node, b"pay-9", r#"{"amount": 1}"#).await;
    assert_eq!(status, 409, "{misuse}");
    assert!(error_message(status, &misuse, "misuse").contains("pay-9"));

    // Two different keys in one request: 400, nothing written.
    let (status, two) = allocate_with_header(
        node,
        b"pay-10",
        r#"{"key": "pay-11", "payload": {"amount": 1}}"#,
    )
    .await;
    assert_eq!(status, 400, "{two}");
    let msg = error_message(status, &two, "two keys");
    assert!(msg.contains("pay-10") && msg.contains("pay-11"), "{msg}");

    // A header key outside printable ASCII: 422, as in the body form, and
    // counted with the body form's invalid requests.
    let invalid = r#"oncemesh_allocations_total{kind="invalid"}"#;
    let invalid_before = node.metric(invalid).await;
    for bad in [&b"caf\xc3\xa9"[..], b"\xff", br#""a b""#] {
        let (status, refused) = allocate_with_header(node, bad, r#"{"amount": 1}"#).await;
        assert_eq!(status, 422, "{bad:?}: {refused}");
        assert!(error_message(status, &refused, "bad key").contains("Idempotency-Key"));
    }
    let (status, _) = allocate(node, "caf\u{e9}", json!({})).await;
    assert_eq!(status, 422, "the body form agrees");
    assert_eq!(node.metric(invalid).await, invalid_before + 4.0);
    // A body that is not JSON, under the header: 400.
    let (status, _) = allocate_with_header(node, b"pay-12", "amount=1").await;
    assert_eq!(status, 400);

    for key in ["pay-10", "pay-11", "pay-12"] {
        let (status, _) = node.get_json(&format!("/v1/allocations/{key}")).await;
        assert_eq!(status, 404, "{key} must not be written");
    }
    assert_eq!(allocation_count(node).await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_refused_with_a_json_error_and_writes_nothing() {
    let cluster = Cluster::start(1, one("sgp")).await;
    let node = cluster.node(0);
    let (status, _) = allocate(node, "baseline", json!({"x": 1})).await;
    assert_eq!(status, 201);
    let baseline = allocation_count(node).await;

    // (what, raw body, expected status; None = any 4xx, key that must stay unknown)
    let long_key = "k".repeat(256);
    let big = "y".repeat(64 * 1024);
    let huge = "z".repeat(200 * 1024);
    let cases: Vec<BadCase> = vec![
        (
            "empty key",
            br#"{"key":"","payload":{}}"#.to_vec(),
            None,
            None,
        ),
        (
            "256-byte key",
            json!({"key": long_key, "payload": {}})
                .to_string()
                .into_bytes(),
            None,
            None,
        ),
        (
            "key with a space",
            br#"{"key":"a b","payload":{}}"#.to_vec(),
            None,
            None,
        ),
        (
            "key with a tab",
            br#"{"key":"a\tb","payload":{}}"#.to_vec(),
            None,
            None,
        ),
        (
            "key with BEL",
            br#"{"key":"a\u0007b","payload":{}}"#.to_vec(),
            None,
            None,
        ),
        (
            "key with DEL",
            br#"{"key":"a\u007fb","payload":{}}"#.to_vec(),
            None,
            None,
        ),
        (
            "non-ASCII key",
            r#"{"key":"café","payload":{}}"#.as_bytes().to_vec(),
            None,
            None,
        ),
        (
            "body not JSON",
            b"key=abc&payload=1".to_vec(),
            Some(400),
            None,
        ),
        (
            "truncated JSON",
            br#"{"key":"trunc","payload":{"#.to_vec(),
            Some(400),
            Some("trunc"),
        ),
        ("empty body", Vec::new(), Some(400), None),
        (
            "body is an array",
            br#"["k1", {}]"#.to_vec(),
            Some(400),
            None,
        ),
        ("body is a string", br#""k1""#.to_vec(), Some(400), None),
        (
            "missing key",
            br#"{"payload":{"a":1}}"#.to_vec(),
            Some(400),
            None,
        ),
        (
            "key not a string",
            br#"{"key":42,"payload":{}}"#.to_vec(),
            Some(400),
            None,
        ),
        (
            "payload is an array",
            br#"{"key":"pay-array","payload":[1,2]}"#.to_vec(),
            None,
            Some("pay-array"),
        ),
        (
            "payload is a string",
            br#"{"key":"pay-string","payload":"{}"}"#.to_vec(),
            None,
            Some("pay-string"),
        ),
        (
            "payload is null",
            br#"{"key":"pay-null","payload":null}"#.to_vec(),
            None,
            Some("pay-null"),
        ),
        (
            // canonical {"x":"yyy..."} is 64 KiB + 8 bytes
            "payload just over 64 KiB",
            json!({"key": "pay-big", "payload": {"x": big}})
                .to_string()
                .into_bytes(),
            Some(413),
            Some("pay-big"),
        ),
        (
            "payload far over 64 KiB",
            json!({"key": "pay-huge", "payload": {"x": huge}})
                .to_string()
                .into_bytes(),
            Some(413),
            Some("pay-huge"),
        ),
    ];
    for (what, body, expected, key) in cases {
        let (status, resp) =
            post_raw(node, "/v1/allocations", "application/json", body, None).await;
        match expected {
            Some(code) => assert_eq!(status, code, "{what}: {resp}"),
            None => assert!(
                (400..500).contains(&status),
                "{what}: want 4xx, got {status} {resp}"
            ),
        }
        error_message(status, &resp, what);
        if let Some(key) = key {
            let (status, resp) = node.get_json(&format!("/v1/allocations/{key}")).await;
            assert_eq!(status, 404, "{what}: key {key} must stay unknown: {resp}");
        }
        assert_eq!(
            allocation_count(node).await,
            baseline,
            "{what} changed the ledger"
        );
    }

    // The limits themselves are accepted: a 255-byte key, a 64 KiB payload.
    let key255 = "k".repeat(255);
    let (status, resp) = allocate(node, &key255, json!({})).await;
    assert_eq!(status, 201, "a 255-byte key is valid: {resp}");
    assert_eq!(resp["key"], key255.as_str());
    let (status, shown) = node.get_json(&format!("/v1/allocations/{key255}")).await;
    assert_eq!(status, 200, "{shown}");
    let exactly = "y".repeat(64 * 1024 - r#"{"x":""}"#.len());
    let (status, resp) = allocate(node, "pay-64k", json!({ "x": exactly })).await;
    assert_eq!(status, 201, "a payload of exactly 64 KiB is valid: {resp}");
    let (status, resp) = allocate(node, "!~printable-edges~!", json!({})).await;
    assert_eq!(status, 201, "0x21 and 0x7e are printable: {resp}");
    let baseline = baseline + 3;
    assert_eq!(allocation_count(node).await, baseline);

    // Reads of keys: invalid key is 4xx, unknown key is 404, both JSON errors.
    for (path, expected) in [
        (format!("/v1/allocations/{long_key}"), None),
        ("/v1/allocations/a%20b".to_string(), None),
        ("/v1/allocations/never-allocated".to_string(), Some(404)),
    ] {
        let (status, resp) = node.get_json(&path).await;
        match expected {
            Some(code) => assert_eq!(status, code, "GET {path}: {resp}"),
            None => assert!((400..500).contains(&status), "GET {path}: {status} {resp}"),
        }
        error_message(status, &resp, &path);
    }

    // Routes and methods.
    for (method, path, code) in [
        (Method::GET, "/v1/nope", 404),
        (Method::GET, "/", 404),
        (Method::POST, "/v1/allocations/x/y", 404),
        (Method::DELETE, "/v1/allocations", 405),
        (Method::GET, "/v1/allocations", 405),
        (Method::PUT, "/v1/allocations/baseline", 405),
        (Method::POST, "/v1/health", 405),
        (Method::DELETE, "/v1/documents/tokens-0", 405),
    ] {
        let (status, resp) = node.request(method.clone(), path, None).await;
        assert_eq!(status, code, "{method} {path}: {resp}");
        error_message(status, &resp, path);
    }
    let (status, resp) = node.get_json("/v1/conflicts?state=bogus").await;
    assert_eq!(status, 400, "unknown conflict filter: {resp}");
    error_message(status, &resp, "conflict filter");

    // Documents: unknown ids are 404, bytes that are not an oncemesh
    // document are 400, and nothing changes.
    let (status, docs_before) = node.get_json("/v1/documents").await;
    assert_eq!(status, 200, "{docs_before}");
    let first_doc = docs_before["documents"][0]["id"]
        .as_str()
        .expect("the baseline allocation made a document")
        .to_owned();
    for id in [
        "tokens-8",
        "tokens-99",
        "tokens-01",
        "tokens--1",
        "tokens-1-8",
        "tokens-1-01",
        "tokens-1-1-1",
        "nope",
    ] {
        let (status, resp) = node.get_json(&format!("/v1/documents/{id}")).await;
        assert_eq!(status, 404, "GET document {id}: {resp}");
        error_message(status, &resp, id);
        let (status, resp) = post_raw(
            node,
            &format!("/v1/documents/{id}"),
            "application/octet-stream",
            vec![0x85, 0x6f, 0x4a, 0x83],
            None,
        )
        .await;
        assert_eq!(status, 404, "POST document {id}: {resp}");
        error_message(status, &resp, id);
    }
    let (_, good) = get_bytes(node, &format!("/v1/documents/{first_doc}")).await;
    // The next window: one this node may hold but has not made yet.
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970")
        .as_millis() as u64;
    let lacking_doc = format!(
        "tokens-{}-3",
        oncemesh::ledger::Windows::default().epoch_of(now_ms) + 1
    );
    // A good document under an id from far in the future is refused: no
    // working clock writes there, and it would be kept until then.
    let (status, resp) = post_raw(
        node,
        "/v1/documents/tokens-4000000000-3",
        "application/octet-stream",
        good.clone(),
        None,
    )
    .await;
    assert_eq!(status, 400, "merge into a far-future document: {resp}");
    assert!(
        error_message(status, &resp, "far future").contains("ahead"),
        "{resp}"
    );
    let mut truncated = good.clone();
    truncated.truncate(good.len() / 2);
    let mut flipped = good.clone();
    let mid = flipped.len() / 2;
    flipped[mid] ^= 0xff;
    let mut foreign = Automerge::new();
    foreign
        .transact::<_, _, automerge::AutomergeError>(|tx| {
            use automerge::transaction::Transactable;
            tx.put_object(ROOT, "allocations", automerge::ObjType::Map)?;
            Ok(())
        })
        .expect("foreign doc");
    for (what, bytes) in [
        ("garbage", b"this is not automerge".to_vec()),
        ("empty", Vec::new()),
        ("truncated document", truncated),
        ("document with a flipped byte", flipped),
        (
            "automerge document without the oncemesh genesis",
            foreign.save(),
        ),
    ] {
        // Into an existing document, and into a valid id this node lacks
        // (which must not be left behind as an empty document).
        for id in [first_doc.as_str(), lacking_doc.as_str()] {
            let (status, resp) = post_raw(
                node,
                &format!("/v1/documents/{id}"),
                "application/octet-stream",
                bytes.clone(),
                None,
            )
            .await;
            assert_eq!(status, 400, "merge of {what} into {id}: {resp}");
            error_message(status, &resp, what);
        }
    }
    let (_, docs_after) = node.get_json("/v1/documents").await;
    assert_eq!(
        docs_before["documents"], docs_after["documents"],
        "refused merges must not change any document"
    );
    assert_eq!(allocation_count(node).await, baseline);
    let (status, conflicts) = node.get_json("/v1/conflicts").await;
    assert_eq!(status, 200);
    assert_eq!(conflicts["conflicts"], json!([]), "{conflicts}");
    let (status, health) = node.get_json("/v1/health").await;
    assert_eq!(status, 200);
    assert_eq!(
        health["status"], "ok",
        "bad input must not degrade the node: {health}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bearer_token_guards_the_api_but_not_health() {
    let cluster = Cluster::start(1, one("lon").api_token("secret")).await;
    let node = cluster.node(0);
    let body = json!({"key": "tok-refused", "payload": {}});

    for token in [None, Some("wrong"), Some("secretX"), Some("")] {
        let (status, resp) = node
            .try_request(Method::POST, "/v1/allocations", Some(&body), token)
            .await
            .expect("request");
        assert_eq!(status, 401, "POST with token {token:?}: {resp}");
        error_message(status, &resp, "401");
        for path in [
            "/v1/allocations/tok-refused",
            "/v1/conflicts",
            "/v1/peers",
            "/v1/documents",
            "/v1/documents/tokens-0",
        ] {
            let (status, resp) = node
                .try_request(Method::GET, path, None, token)
                .await
                .expect("request");
            assert_eq!(status, 401, "GET {path} with token {token:?}: {resp}");
        }
    }
    // Raw header forms that are not "Bearer secret" are refused too.
    for header in ["secret", "Basic c2VjcmV0", "bearer  secret"] {
        let resp = node
            .client()
            .get(node.url("/v1/conflicts"))
            .header("authorization", header)
            .send()
            .await
            .expect("request");
        assert_eq!(resp.status().as_u16(), 401, "Authorization: {header}");
    }

    // Health answers without a token.
    let (status, health) = node
        .try_request(Method::GET, "/v1/health", None, None)
        .await
        .expect("health");
    assert_eq!(status, 200, "{health}");
    assert_eq!(
        health["ledger"]["allocations"], 0,
        "refused POSTs wrote: {health}"
    );

    // With the token: accepted; the refused key was never written.
    let (status, resp) = node.get_json("/v1/allocations/tok-refused").await;
    assert_eq!(status, 404, "{resp}");
    let (status, resp) = allocate(node, "tok-ok", json!({"a": 1})).await;
    assert_eq!(status, 201, "{resp}");
    let (status, resp) = node.get_json("/v1/allocations/tok-ok").await;
    assert_eq!(status, 200, "{resp}");
    let (status, resp) = node.get_json("/v1/conflicts").await;
    assert_eq!(status, 200, "{resp}");
}

/// The document a key's allocation lives in, by docs/DATA_MODEL.md:
/// shard = u64_le(blake3(key)[0..8]) mod 8, epoch = hlc ms / window ms.
fn documented_id(key: &str, allocation: &Value) -> String {
    let hash = blake3::hash(key.as_bytes());
    let shard = u64::from_le_bytes(hash.as_bytes()[..8].try_into().unwrap()) % 8;
    let hlc_ms: u64 = allocation["hlc"].as_str().unwrap()[..16].parse().unwrap();
    let window_ms = 24 * 3600 * 1000 / 4;
    format!("tokens-{}-{shard}", hlc_ms / window_ms)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn documents_are_plain_automerge_readable_from_the_data_model() {
    let cluster = Cluster::start(1, one("nyc")).await;
    let node = cluster.node(0);
    let mut made = BTreeMap::new();
    for i in 0..24 {
        let key = format!("doc-key-{i}");
        let (status, resp) = allocate(node, &key, json!({"i": i})).await;
        assert_eq!(status, 201, "{resp}");
        made.insert(key, resp);
    }

    let (status, list) = node.get_json("/v1/documents").await;
    assert_eq!(status, 200, "{list}");
    let docs = list["documents"].as_array().expect("documents array");
    let ids: BTreeSet<String> = docs
        .iter()
        .map(|d| d["id"].as_str().expect("id").to_string())
        .collect();
    // docs/DATA_MODEL.md: tokens-<epoch>-<shard>, epoch = hlc ms / window
    // (a quarter of the 24 h default retention), shard from blake3 of the key.
    let expected: BTreeSet<String> = made.iter().map(|(k, r)| documented_id(k, r)).collect();
    assert_eq!(ids, expected, "{list}");
    let mut found: BTreeMap<String, (String, Value)> = BTreeMap::new();
    let mut digests = BTreeSet::new();
    for d in docs {
        let id = d["id"].as_str().unwrap();
        let digest = d["heads_digest"].as_str().expect("heads_digest string");
        assert!(
            digest.len() == 64 && digest.bytes().all(|b| b.is_ascii_hexdigit()),
            "heads_digest of {id} is not 32 bytes of hex: {digest}"
        );
        digests.insert(digest.to_string());
        let size = d["size_bytes"].as_u64().expect("size_bytes");
        let (status, bytes) = get_bytes(node, &format!("/v1/documents/{id}")).await;
        assert_eq!(status, 200, "GET {id}");
        assert_eq!(size, bytes.len() as u64, "size_bytes of {id}");
        let doc = Automerge::load(&bytes).expect("automerge load");
        // The genesis fields of docs/DATA_MODEL.md.
        let scalar = |name: &str| match doc.get(ROOT, name) {
            Ok(Some((AmValue::Scalar(v), _))) => v.into_owned(),
            other => panic!("{id}: root {name:?} is not a scalar: {other:?}"),
        };
        assert_eq!(
            scalar("schema"),
            ScalarValue::Str("oncemesh/2".into()),
            "{id}"
        );
        let (epoch, shard) = id
            .strip_prefix("tokens-")
            .and_then(|rest| rest.split_once('-'))
            .expect("tokens-<epoch>-<shard>");
        assert_eq!(
            scalar("shard"),
            ScalarValue::Uint(shard.parse().unwrap()),
            "{id}"
        );
        assert_eq!(
            scalar("epoch"),
            ScalarValue::Uint(epoch.parse().unwrap()),
            "{id}"
        );
        for r in read_allocations(&bytes, id) {
            let key = r.record["key"].as_str().expect("record key").to_string();
            if r.index == 0 {
                // docs/DATA_MODEL.md: <!physical ms, 16 hex><!logical, 8 hex>.<txn_id>
                let hlc = r.record["hlc"].as_str().expect("record hlc");
                let (physical, logical) = hlc.split_once('.').expect("hlc ms.logical");
                let expected = format!(
                    "{:016x}{:08x}.{}",
                    !physical.parse::<u64>().unwrap(),
                    !logical.parse::<u32>().unwrap(),
                    r.record["txn_id"].as_str().expect("txn_id")
                );
                assert_eq!(
                    r.map_key, expected,
                    "a batch's id is its first record's inverted stamp and txn_id"
                );
            }
            for field in ["key", "txn_id", "region", "node", "hlc", "fingerprint"] {
                assert!(
                    r.record[field].is_string(),
                    "{field} missing in {}",
                    r.record
                );
            }
            assert!(r.record["confidence"].is_number(), "{}", r.record);
            assert!(r.record["v"].is_u64(), "{}", r.record);
            assert!(
                r.compact,
                "a node with no peer to wait for writes compact batches"
            );
            let prior = found.insert(key.clone(), (id.to_string(), r.record));
            assert!(prior.is_none(), "key {key} in more than one place");
        }
    }
    assert_eq!(
        digests.len(),
        docs.len(),
        "different documents share a heads digest"
    );
    assert_eq!(
        found.len(),
        made.len(),
        "every allocation is in the documents"
    );
    for (key, resp) in &made {
        let (_, record) = &found[key];
        assert_eq!(record["txn_id"], resp["txn_id"], "{key}");
        assert_eq!(record["region"], "nyc", "{key}");
        assert_eq!(record["node"], node.peer_id(), "{key}");
        assert_eq!(record["hlc"], resp["hlc"], "{key}");
        assert_eq!(found[key].0, documented_id(key, resp), "document of {key}");
    }

    // A new allocation moves exactly the digest of the document holding it.
    let (status, resp) = allocate(node, "doc-key-late", json!({})).await;
    assert_eq!(status, 201, "{resp}");
    let (holder, bytes) = document_with_key(node, "doc-key-late").await;
    let (_, after) = node.get_json("/v1/documents").await;
    for (before, after) in docs.iter().zip(after["documents"].as_array().unwrap()) {
        assert_eq!(before["id"], after["id"]);
        let moved = before["heads_digest"] != after["heads_digest"];
        assert_eq!(
            moved,
            after["id"] == holder.as_str(),
            "digest of {}",
            after["id"]
        );
    }
    // Merging a document's own bytes back is a no-op.
    let (status, resp) = post_raw(
        node,
        &format!("/v1/documents/{holder}"),
        "application/octet-stream",
        bytes,
        None,
    )
    .await;
    assert_eq!(status, 200, "{resp}");
    assert_eq!(allocation_count(node).await, 25);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn documents_carried_by_hand_reveal_the_same_conflict_everywhere() {
    // Two regions that never talk to each other (no --peer): a long partition.
    let (a, b) = tokio::join!(Cluster::start(1, one("sgp")), Cluster::start(1, one("lon")));
    let (a, b) = (a.node(0), b.node(0));
    let payload = json!({"amount": 4700, "customer": "c-42"});
    let (status, in_a) = allocate(a, "dup-1", payload.clone()).await;
    assert_eq!(status, 201, "{in_a}");
    let (status, in_b) = allocate(b, "dup-1", payload.clone()).await;
    assert_eq!(status, 201, "{in_b}");
    let (txn_a, txn_b) = (
        in_a["txn_id"].as_str().unwrap().to_string(),
        in_b["txn_id"].as_str().unwrap().to_string(),
    );
    assert_ne!(txn_a, txn_b);

    // The winner is the smallest (hlc, node id), computed here independently.
    let rank = |r: &Value| {
        (
            r["hlc"].as_str().unwrap().to_string(),
            r["node"].as_str().unwrap().to_string(),
        )
    };
    let a_wins = rank(&in_a) < rank(&in_b);
    let (winner, loser) = if a_wins {
        (&txn_a, &txn_b)
    } else {
        (&txn_b, &txn_a)
    };
    let (win_node, lose_node) = if a_wins { (a, b) } else { (b, a) };

    // Export both documents first, so neither carries a compensation yet.
    let (doc_a, bytes_a) = document_with_key(a, "dup-1").await;
    let (doc_b, bytes_b) = document_with_key(b, "dup-1").await;
    assert_eq!(
        doc_a, doc_b,
        "a key lives in the same document on every node"
    );
    let path = format!("/v1/documents/{doc_a}");
    let (status, resp) =
        post_raw(b, &path, "application/octet-stream", bytes_a.clone(), None).await;
    assert_eq!(status, 200, "merge A into B: {resp}");
    let (status, resp) = post_raw(a, &path, "application/octet-stream", bytes_b, None).await;
    assert_eq!(status, 200, "merge B into A: {resp}");
    // Merging the same bytes twice changes nothing.
    let (status, resp) = post_raw(b, &path, "application/octet-stream", bytes_a, None).await;
    assert_eq!(status, 200, "merge A into B again: {resp}");

    let regions = BTreeMap::from([
        (txn_a.clone(), ("sgp", a.peer_id().to_string())),
        (txn_b.clone(), ("lon", b.peer_id().to_string())),
    ]);
    for (name, node) in [("A", a), ("B", b)] {
        let (status, report) = node.get_json("/v1/conflicts").await;
        assert_eq!(status, 200, "{report}");
        let list = report["conflicts"].as_array().expect("conflicts array");
        assert_eq!(
            list.len(),
            1,
            "{name}: exactly one conflicting key: {report}"
        );
        let c = &list[0];
        assert_eq!(c["key"], "dup-1", "{name}: {c}");
        assert_eq!(c["winner"], winner.as_str(), "{name} winner: {c}");
        assert!(c["detected_at"].is_string(), "{name}: detected_at: {c}");
        let allocations = c["allocations"].as_array().expect("allocations");
        assert_eq!(allocations.len(), 2, "{name}: {c}");
        let txns: BTreeSet<&str> = allocations
            .iter()
            .map(|x| x["txn_id"].as_str().unwrap())
            .collect();
        assert_eq!(
            txns,
            BTreeSet::from([txn_a.as_str(), txn_b.as_str()]),
            "{name}"
        );
        for x in allocations {
            let (region, peer) = &regions[x["txn_id"].as_str().unwrap()];
            check_allocation_fields(x, "dup-1", region, peer);
        }
        let comps = c["compensations"].as_array().expect("compensations");
        assert_eq!(comps.len(), 1, "{name}: one compensation per loser: {c}");
        assert_eq!(comps[0]["txn_id"], loser.as_str(), "{name}: {c}");
        assert_eq!(comps[0]["owner"], lose_node.peer_id(), "{name}: {c}");
        for field in ["state", "attempts", "last_error"] {
            assert!(comps[0].get(field).is_some(), "{name}: no {field} in {c}");
        }
        // The key shows both allocations.
        let (status, key) = node.get_json("/v1/allocations/dup-1").await;
        assert_eq!(status, 200, "{key}");
        assert_eq!(key["allocations"].as_array().unwrap().len(), 2, "{key}");
        assert_eq!(key["winner"], winner.as_str(), "{name}: {key}");
        assert_ne!(key["state"], "provisional");
        assert_ne!(key["state"], "settled");
        assert_eq!(allocation_count(node).await, 2, "{name}");
    }

    // The winner's node never compensates: open until it hears of it.
    let (_, open) = win_node.get_json("/v1/conflicts?state=open").await;
    assert_eq!(
        open["conflicts"][0]["key"], "dup-1",
        "open on the winner: {open}"
    );
    let (_, resolved) = win_node.get_json("/v1/conflicts?state=resolved").await;
    assert_eq!(resolved["conflicts"], json!([]), "{resolved}");

    // The loser's node compensates its own allocation (default action: log).
    let succeeded = |report: &Value| {
        report["conflicts"]
            .as_array()
            .and_then(|l| l.iter().find(|c| c["key"] == "dup-1"))
            .is_some_and(|c| c["compensations"][0]["state"] == "succeeded")
    };
    let ok = support::wait_until_async(Duration::from_secs(20), async || {
        succeeded(&lose_node.get_json("/v1/conflicts?state=resolved").await.1)
    })
    .await;
    assert!(
        ok,
        "loser's node never compensated: {}\n{}",
        lose_node.get_json("/v1/conflicts").await.1,
        lose_node.describe()
    );
    let (_, open) = lose_node.get_json("/v1/conflicts?state=open").await;
    assert_eq!(open["conflicts"], json!([]), "{open}");
    let (_, resolved) = lose_node.get_json("/v1/conflicts?state=resolved").await;
    let c = &resolved["conflicts"][0];
    assert_eq!(c["winner"], winner.as_str());
    let comp = &c["compensations"][0];
    assert_eq!(comp["txn_id"], loser.as_str());
    assert!(comp["attempts"].as_u64().unwrap_or(0) >= 1, "{comp}");
    let (_, key) = lose_node.get_json("/v1/allocations/dup-1").await;
    assert_eq!(key["state"], "compensated", "{key}");

    // Carrying the loser's document back tells the winner's node too.
    let (_, bytes) = get_bytes(lose_node, &path).await;
    let (status, resp) = post_raw(win_node, &path, "application/octet-stream", bytes, None).await;
    assert_eq!(status, 200, "{resp}");
    let (_, resolved) = win_node.get_json("/v1/conflicts?state=resolved").await;
    assert!(
        succeeded(&resolved),
        "winner's node sees the compensation: {resolved}"
    );
    assert_eq!(resolved["conflicts"][0]["winner"], winner.as_str());
    let (_, open) = win_node.get_json("/v1/conflicts?state=open").await;
    assert_eq!(open["conflicts"], json!([]), "{open}");
    // The winner's node never ran a compensation of its own.
    let (_, comps) = win_node.get_json("/v1/compensations").await;
    for comp in comps["compensations"].as_array().into_iter().flatten() {
        assert_eq!(comp["owner"], lose_node.peer_id(), "{comps}");
    }
}

async fn cli(args: &[&str]) -> Output {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_oncemesh"));
    cmd.args(args)
        .env_remove("ONCEMESH_NODE")
        .env_remove("ONCEMESH_API_TOKEN")
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    let what = format!("oncemesh {}", args.join(" "));
    support::within(Duration::from_secs(20), &what, cmd.output())
        .await
        .unwrap_or_else(|e| panic!("cannot run {what}: {e}"))
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn command_line_client() {
    let cluster = Cluster::start(1, one("sgp")).await;
    let node = cluster.node(0);
    let url = node.http_url();
    let url = url.as_str();

    let out = cli(&[
        "allocate",
        "cli-1",
        "--payload",
        r#"{"a":1}"#,
        "--node",
        url,
    ])
    .await;
    assert!(out.status.success(), "allocate: {out:?}");
    let (status, shown) = node.get_json("/v1/allocations/cli-1").await;
    assert_eq!(status, 200, "{shown}");
    let txn = shown["allocations"][0]["txn_id"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        text(&out.stdout).contains(&txn),
        "stdout must show {txn}: {out:?}"
    );

    let out = cli(&[
        "allocate",
        "cli-1",
        "--payload",
        r#"{ "a" : 1 }"#,
        "--node",
        url,
        "--json",
    ])
    .await;
    assert!(out.status.success(), "allocate --json: {out:?}");
    let body: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("allocate --json output is not JSON ({e}): {out:?}"));
    assert_eq!(body["txn_id"], txn.as_str());
    assert_eq!(body["replay"], true);

    let out = cli(&["allocate", "cli-2", "--node", url, "--json"]).await;
    assert!(out.status.success(), "{out:?}");
    let body: Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(body["replay"], false);
    assert_eq!(body["key"], "cli-2");

    let out = cli(&["status", "--node", url]).await;
    assert!(out.status.success(), "status: {out:?}");
    assert!(text(&out.stdout).starts_with("OK region sgp"), "{out:?}");
    assert!(text(&out.stdout).contains("no peers"), "{out:?}");
    let out = cli(&["status", "--node", url, "--json"]).await;
    let body: Value = serde_json::from_slice(&out.stdout).expect("status --json");
    assert_eq!(body["health"]["ledger"]["allocations"], 2);
    assert_eq!(body["peers"], json!([]));

    let out = cli(&["conflicts", "--json", "--node", url]).await;
    assert!(out.status.success(), "conflicts: {out:?}");
    let body: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("conflicts --json is not JSON ({e}): {out:?}"));
    assert_eq!(body["conflicts"], json!([]), "{body}");
    let out = cli(&["conflicts", "--node", url]).await;
    assert!(out.status.success(), "conflicts table: {out:?}");

    // Refusals: non-zero exit, the reason on stderr, nothing on stdout.
    let out = cli(&["allocate", "bad key", "--node", url]).await;
    assert!(!out.status.success(), "a bad key must fail: {out:?}");
    let err = text(&out.stderr);
    assert!(err.contains("key"), "stderr names the problem: {err}");
    assert!(text(&out.stdout).trim().is_empty(), "{out:?}");
    let out = cli(&[
        "allocate",
        "cli-1",
        "--payload",
        r#"{"a":2}"#,
        "--node",
        url,
    ])
    .await;
    assert!(!out.status.success(), "misuse must fail: {out:?}");
    assert!(text(&out.stderr).contains("cli-1"), "{out:?}");
    let out = cli(&["allocate", "cli-3", "--payload", "not json", "--node", url]).await;
    assert!(!out.status.success(), "{out:?}");
    assert!(text(&out.stderr).contains("--payload"), "{out:?}");
    assert_eq!(node.get_json("/v1/allocations/cli-3").await.0, 404);
    let dead = format!("http://127.0.0.1:{}", support::free_port());
    let out = cli(&["status", "--node", &dead]).await;
    assert!(!out.status.success(), "unreachable node: {out:?}");
    assert!(!text(&out.stderr).trim().is_empty(), "{out:?}");
    assert_eq!(allocation_count(node).await, 2);

    // `id` creates the identity once and prints the same peer id after.
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("fresh");
    let data = data.to_str().unwrap();
    let first = cli(&["id", "--data-dir", data]).await;
    let second = cli(&["id", "--data-dir", data]).await;
    assert!(
        first.status.success() && second.status.success(),
        "{first:?} {second:?}"
    );
    let id = text(&first.stdout).trim().to_string();
    assert!(
        !id.is_empty() && !id.contains(char::is_whitespace),
        "{first:?}"
    );
    assert_eq!(id, text(&second.stdout).trim(), "peer id must be stable");
    assert_ne!(id, node.peer_id(), "a fresh data dir has its own identity");
    let out = cli(&["id", "--data-dir", node.data_dir().to_str().unwrap()]).await;
    assert_eq!(text(&out.stdout).trim(), node.peer_id());

    // A bad setting is refused at start, naming the flag.
    let run_dir = dir.path().join("run");
    let out = cli(&[
        "run",
        "--retention",
        "forever",
        "--data-dir",
        run_dir.to_str().unwrap(),
        "--http",
        "127.0.0.1:0",
    ])
    .await;
    assert!(
        !out.status.success(),
        "--retention forever must not start: {out:?}"
    );
    let err = text(&out.stderr);
    assert!(
        err.contains("--retention"),
        "stderr names --retention: {err}"
    );
    assert!(
        !text(&out.stdout).contains("oncemesh node started"),
        "{out:?}"
    );
}

/// `oncemesh::client` against real nodes: every call, both allocate forms,
/// keys that need escaping in a path, typed errors, and a conflict made by
/// carrying a document between two unpeered regions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_library_client_reads_every_answer_of_a_real_node() {
    use oncemesh::client::{Client, ClientError, ConflictFilter, HealthStatus};
    let (a, b) = tokio::join!(Cluster::start(1, one("sgp")), Cluster::start(1, one("lon")));
    let (a, b) = (a.node(0), b.node(0));
    let (ca, cb) = (
        Client::new(&a.http_url()).expect("client of A"),
        Client::new(&b.http_url()).expect("client of B"),
    );
    let payload = json!({"amount": 1299, "currency": "EUR"});

    let made = ca.allocate("pay/1?x=%", &payload).await.expect("allocate");
    assert!(!made.replay);
    assert_eq!(made.allocation.key, "pay/1?x=%");
    assert_eq!(made.allocation.region, "sgp");
    assert_eq!(made.allocation.node, a.peer_id());
    assert!(made.allocation.fingerprint.starts_with("jcs:"));
    let again = ca
        .allocate_with_header("pay/1?x=%", &json!({"currency": "EUR", "amount": 1299.0}))
        .await
        .expect("allocate with the header");
    assert!(again.replay);
    assert_eq!(again.allocation.txn_id, made.allocation.txn_id);
    let report = ca.allocation("pay/1?x=%").await.expect("key report");
    let report = report.expect("the key is known");
    assert_eq!(report.allocations.len(), 1);
    assert_eq!(report.allocations[0].txn_id, made.allocation.txn_id);
    assert_eq!(
        ca.allocation("never-made").await.expect("404 is None"),
        None
    );

    let reused = ca.allocate("pay/1?x=%", &json!({"amount": 1})).await;
    assert!(
        reused.as_ref().is_err_and(ClientError::is_key_reused),
        "{reused:?}"
    );
    let invalid = ca.allocate("bad key", &payload).await;
    assert!(
        matches!(invalid, Err(ClientError::InvalidKey(_))),
        "{invalid:?}"
    );
    let dead = Client::new(&format!("http://127.0.0.1:{}", support::free_port())).unwrap();
    assert!(matches!(
        dead.health().await,
        Err(ClientError::Unreachable { .. })
    ));

    let health = ca.health().await.expect("health");
    assert_eq!(health.status, HealthStatus::Ok, "{health:?}");
    assert_eq!(health.extra["region"], "sgp");
    assert!(ca.peers().await.expect("peers").is_empty());

    // One key in both regions, then each region's document carried to the other.
    let in_a = ca.allocate("dup-2", &payload).await.expect("allocate in A");
    let in_b = cb.allocate("dup-2", &payload).await.expect("allocate in B");
    let (doc, bytes_a) = document_with_key(a, "dup-2").await;
    let (_, bytes_b) = document_with_key(b, "dup-2").await;
    let path = format!("/v1/documents/{doc}");
    assert_eq!(
        post_raw(b, &path, "application/octet-stream", bytes_a, None)
            .await
            .0,
        200
    );
    assert_eq!(
        post_raw(a, &path, "application/octet-stream", bytes_b, None)
            .await
            .0,
        200
    );
    for client in [&ca, &cb] {
        let conflicts = client.conflicts(None).await.expect("conflicts");
        assert_eq!(conflicts.len(), 1, "{conflicts:?}");
        let c = &conflicts[0];
        assert_eq!(c.key, "dup-2");
        let txns: BTreeSet<&str> = c.allocations.iter().map(|x| x.txn_id.as_str()).collect();
        assert_eq!(
            txns,
            BTreeSet::from([
                in_a.allocation.txn_id.as_str(),
                in_b.allocation.txn_id.as_str()
            ])
        );
        assert_eq!(c.compensations.len(), 1, "{c:?}");
        assert_ne!(
            c.winner.as_deref(),
            Some(c.compensations[0].txn_id.as_str())
        );
        let open = client.conflicts(Some(ConflictFilter::Open)).await.unwrap();
        let resolved = client
            .conflicts(Some(ConflictFilter::Resolved))
            .await
            .unwrap();
        assert_eq!(open.len() + resolved.len(), 1, "{open:?} {resolved:?}");
    }
    // The loser's own node compensates it (log action) and says so.
    let loser = {
        let c = &ca.conflicts(None).await.unwrap()[0];
        c.compensations[0].clone()
    };
    let owner = if loser.owner == a.peer_id() { &ca } else { &cb };
    let mut done = Vec::new();
    let compensated = support::wait_until_async(Duration::from_secs(10), async || {
        done = owner
            .compensations(Some("succeeded"))
            .await
            .unwrap_or_default();
        !done.is_empty()
    })
    .await;
    assert!(compensated, "{:?}", owner.compensations(None).await);
    assert_eq!(done[0].txn_id, loser.txn_id);
    assert!(done[0].idempotency_key.is_some());
    // Only a dead-lettered compensation can be retried: the node's 4xx comes back typed.
    let retried = owner.retry_compensation(&loser.txn_id).await;
    assert!(
        retried.as_ref().is_err_and(|e| e.status().is_some()),
        "{retried:?}"
    );
}
