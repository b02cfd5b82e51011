//! The middleware example against a real `oncemesh` node: the payment
//! handler behind its idempotency layer runs once for a request sent
//! twice, a replay gets the first answer, and a misuse of the key or a
//! node that cannot be asked never reaches the handler.

mod support;

#[path = "../examples/idempotent_service.rs"]
#[allow(
    dead_code,
    reason = "the example's main serves it standalone; this test serves its router"
)]
mod idempotent_service;

use oncemesh::client::Client;
use serde_json::Value;
use support::{Cluster, ClusterOptions};

/// Serves the example's router on a free port; returns its payments URL.
async fn serve(node_url: &str) -> (String, std::sync::Arc<idempotent_service::Payments>) {
    let (app, payments) = idempotent_service::app(Client::new(node_url).expect("client"));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("address");
    tokio::spawn(async move {
        axum::serve(listener, app)
            .await
            .expect("the example service");
    });
    (format!("http://{addr}/payments"), payments)
}

async fn pay(
    http: &reqwest::Client,
    url: &str,
    key: Option<&str>,
    body: &str,
) -> (u16, Option<String>, Value) {
    let mut request = http
        .post(url)
        .header("content-type", "application/json")
        .body(body.to_owned());
    if let Some(key) = key {
        request = request.header("idempotency-key", key);
    }
    let response = request.send().await.expect("the service answers");
    let status = response.status().as_u16();
    let replayed = response
        .headers()
        .get("idempotent-replayed")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    (
        status,
        replayed,
        response.json().await.unwrap_or(Value::Null),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_identical_requests_run_the_handler_once() {
    let cluster = Cluster::start(1, ClusterOptions::default().regions(&["sgp"])).await;
    let node = cluster.node(0);
    let (url, payments) = serve(&node.http_url()).await;
    let http = oncemesh::tls::http_client().build().expect("client");

    let body = r#"{"amount": 1299, "currency": "EUR"}"#;
    let (status, replayed, first) = pay(&http, &url, Some("order-42"), body).await;
    assert_eq!(status, 201, "{first}");
    assert_eq!(replayed, None);
    assert_eq!(payments.charges(), 1);
    // The same request again, written another way: the first answer, no charge.
    let retry = r#"{"currency": "EUR", "amount": 1299.0}"#;
    let (status, replayed, second) = pay(&http, &url, Some("order-42"), retry).await;
    assert_eq!(status, 201, "{second}");
    assert_eq!(replayed.as_deref(), Some("true"));
    assert_eq!(second, first, "a replay is answered as the first time");
    assert_eq!(payments.charges(), 1, "the handler ran once");
    // The receipt names the node's transaction.
    let (_, shown) = node.get_json("/v1/allocations/order-42").await;
    assert_eq!(
        shown["allocations"][0]["txn_id"], first["payment_id"],
        "{shown}"
    );

    // The key with another payload: refused, no charge.
    let (status, _, refused) = pay(
        &http,
        &url,
        Some("order-42"),
        r#"{"amount": 1, "currency": "EUR"}"#,
    )
    .await;
    assert_eq!(status, 409, "{refused}");
    // No key, or a key the node refuses: refused, no charge.
    assert_eq!(pay(&http, &url, None, body).await.0, 400);
    assert_eq!(pay(&http, &url, Some("has space"), body).await.0, 422);
    assert_eq!(payments.charges(), 1);

    // A node that cannot be asked: nothing runs unchecked.
    let (dead_url, dead_payments) =
        serve(&format!("http://127.0.0.1:{}", support::free_port())).await;
    assert_eq!(pay(&http, &dead_url, Some("order-43"), body).await.0, 503);
    assert_eq!(dead_payments.charges(), 0);
}
