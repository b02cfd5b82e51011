//! A payment service made idempotent by oncemesh: the integration a
//! payment team copies.
//!
//! The payment handler knows nothing of retries. A layer in front of it
//! takes the request's `Idempotency-Key` header and asks the region's
//! oncemesh node first, with the request body as the payload:
//! - a new allocation: the handler runs, once, with the transaction id the
//!   node gave (the id to charge under); its answer is kept;
//! - a replay (the same key and payload, here or in any region the node
//!   has heard from): the handler does not run; the client gets the first
//!   answer again, marked `Idempotent-Replayed: true`;
//! - the key with another payload (409): refused, the handler does not run;
//! - the node unreachable or failing: refused with 503, the handler does
//!   not run. A payment must never run unchecked.
//!
//! ```sh
//! cargo run -- run &                                   # a node on 127.0.0.1:7700
//! cargo run --example idempotent_service -- --listen 127.0.0.1:8080
//! curl -i -XPOST localhost:8080/payments -H 'Idempotency-Key: order-42' \
//!      -H 'content-type: application/json' -d '{"amount": 1299, "currency": "EUR"}'
//! ```
//!
//! Answers are kept in memory here; a real service keeps them with its
//! payments, under the transaction id, so a replay that reaches another
//! instance (or region) finds the first answer too. Until the first
//! answer is kept, a replay is answered 409 "in progress", as
//! draft-ietf-httpapi-idempotency-key-header does for a request still
//! being processed: the client retries later.

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Extension, Json, Router};
use clap::Parser;
use oncemesh::client::{Allocated, Client, ClientError};
use serde::{Deserialize, Serialize};
use serde_json::json;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// Largest request body the layer reads: the node's payload limit.
const MAX_BODY: usize = 64 * 1024;

/// The transaction a request runs under, handed to the handler by the layer.
#[derive(Clone, Debug)]
pub struct Transaction {
    /// The node's transaction id for this idempotency key.
    pub txn_id: String,
    /// The key the client sent.
    pub key: String,
}

/// An answer kept for replays.
#[derive(Clone)]
struct KeptAnswer {
    status: StatusCode,
    content_type: Option<HeaderValue>,
    body: Bytes,
}

/// What the layer needs: the node, and the answers given so far.
#[derive(Clone)]
struct Guard {
    node: Client,
    answers: Arc<Mutex<HashMap<String, KeptAnswer>>>,
}

/// The layer's work for one request.
async fn idempotent(State(guard): State<Guard>, request: Request, next: Next) -> Response {
    let Some(key) = request
        .headers()
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
    else {
        return refuse(
            StatusCode::BAD_REQUEST,
            "an Idempotency-Key header is required",
        );
    };
    let (parts, body) = request.into_parts();
    let Ok(bytes) = axum::body::to_bytes(body, MAX_BODY).await else {
        return refuse(StatusCode::PAYLOAD_TOO_LARGE, "the body is over 64 KiB");
    };
    let Ok(payload) = serde_json::from_slice::<serde_json::Value>(&bytes) else {
        return refuse(StatusCode::BAD_REQUEST, "the body must be a JSON object");
    };
    let allocated: Allocated = match guard.node.allocate_with_header(&key, &payload).await {
        Ok(allocated) => allocated,
        // The request's fault (409: the key with another payload; 422: a
        // key or payload the node refuses): the client hears the node's word.
        Err(ClientError::InvalidKey(e)) => {
            return refuse(StatusCode::UNPROCESSABLE_ENTITY, &e.to_string())
        }
        Err(e @ ClientError::Api { status, .. }) if (400..500).contains(&status) => {
            let status = StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_REQUEST);
            return refuse(status, &e.to_string());
        }
        Err(e) => {
            return refuse(
                StatusCode::SERVICE_UNAVAILABLE,
                &format!("cannot check the idempotency key, nothing was done: {e}"),
            )
        }
    };
    let txn_id = allocated.allocation.txn_id;
    if allocated.replay {
        let kept = lock(&guard.answers).get(&txn_id).cloned();
        return match kept {
            Some(kept) => answer(kept, true),
            None => refuse(
                StatusCode::CONFLICT,
                "a request with this key is still in progress; retry later",
            ),
        };
    }
    let mut request = Request::from_parts(parts, Body::from(bytes));
    request.extensions_mut().insert(Transaction {
        txn_id: txn_id.clone(),
        key,
    });
    let response = next.run(request).await;
    let (parts, body) = response.into_parts();
    let Ok(body) = axum::body::to_bytes(body, usize::MAX).await else {
        return refuse(
            StatusCode::INTERNAL_SERVER_ERROR,
            "the handler's answer was cut off",
        );
    };
    let kept = KeptAnswer {
        status: parts.status,
        content_type: parts.headers.get(header::CONTENT_TYPE).cloned(),
        body,
    };
    lock(&guard.answers).insert(txn_id, kept.clone());
    answer(kept, false)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn answer(kept: KeptAnswer, replayed: bool) -> Response {
    let mut response = (kept.status, kept.body).into_response();
    if let Some(content_type) = kept.content_type {
        response
            .headers_mut()
            .insert(header::CONTENT_TYPE, content_type);
    }
    if replayed {
        response
            .headers_mut()
            .insert("idempotent-replayed", HeaderValue::from_static("true"));
    }
    response
}

fn refuse(status: StatusCode, message: &str) -> Response {
    (status, Json(json!({ "error": message }))).into_response()
}

/// A payment as the service's clients send it.
#[derive(Deserialize)]
struct Payment {
    amount: u64,
    currency: String,
}

/// The service's answer.
#[derive(Serialize)]
struct Receipt {
    payment_id: String,
    amount: u64,
    currency: String,
    charge: u64,
}

/// The service's own state: how many charges it made (what a duplicate
/// would show).
#[derive(Default)]
pub struct Payments {
    charges: AtomicU64,
}

impl Payments {
    /// Charges made so far.
    pub fn charges(&self) -> u64 {
        self.charges.load(Ordering::SeqCst)
    }
}

/// The payment handler, unaware of retries.
async fn pay(
    State(payments): State<Arc<Payments>>,
    Extension(txn): Extension<Transaction>,
    Json(payment): Json<Payment>,
) -> (StatusCode, Json<Receipt>) {
    let charge = payments.charges.fetch_add(1, Ordering::SeqCst) + 1;
    tracing::info!(key = txn.key, txn = txn.txn_id, "charging");
    (
        StatusCode::CREATED,
        Json(Receipt {
            payment_id: txn.txn_id,
            amount: payment.amount,
            currency: payment.currency,
            charge,
        }),
    )
}

/// The service: `POST /payments` behind the idempotency layer.
pub fn app(node: Client) -> (Router, Arc<Payments>) {
    let payments = Arc::new(Payments::default());
    let guard = Guard {
        node,
        answers: Arc::default(),
    };
    let router = Router::new()
        .route("/payments", post(pay))
        .route_layer(middleware::from_fn_with_state(guard, idempotent))
        .with_state(payments.clone());
    (router, payments)
}

/// Options of the example.
#[derive(Parser)]
struct Args {
    /// The region's oncemesh node.
    #[arg(long, env = "ONCEMESH_NODE", default_value = "http://127.0.0.1:7700")]
    node: String,
    /// Where the service listens.
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: String,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let (app, _) = app(Client::new(&args.node)?);
    let listener = tokio::net::TcpListener::bind(&args.listen).await?;
    eprintln!("payments on http://{}/payments", listener.local_addr()?);
    axum::serve(listener, app).await?;
    Ok(())
}
