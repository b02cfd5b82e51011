//! The compensation endpoint of a chaos run: node `i` posts its refunds to
//! `/refund/{i}`. It behaves as a payment provider does: the first accepted
//! call with an `Idempotency-Key` carries the refund out, later calls with
//! the same key only repeat the answer. The runner can make it fail (503,
//! nothing done) or hang (the refund is done, the answer comes after the
//! nodes' timeout, so the caller cannot know).

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use axum::Router;
use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

/// How the endpoint answers now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Mode {
    /// Carries out and answers 200.
    #[default]
    Ok,
    /// Answers 503 and does nothing.
    Fails,
    /// Carries out, then answers after this long.
    Hangs(Duration),
}

/// One call that carried a refund out (or repeated one).
#[derive(Debug, Clone)]
pub struct Effect {
    /// The node that called.
    pub node: usize,
    /// The `Idempotency-Key` it sent.
    pub idempotency_key: String,
    /// The loser's transaction, from the body.
    pub loser_txn: String,
    /// The loser's idempotency key (of the payment), from the body.
    pub key: String,
}

#[derive(Default)]
struct Inner {
    mode: Mode,
    /// Every call that was accepted, in order.
    accepted: Vec<Effect>,
    /// Calls refused (503) or malformed (400).
    refused: usize,
    /// Keys whose refund was carried out.
    done: BTreeSet<String>,
}

/// A running endpoint.
#[derive(Clone)]
pub struct Receiver {
    addr: SocketAddr,
    inner: Arc<Mutex<Inner>>,
}

fn lock(m: &Mutex<Inner>) -> MutexGuard<'_, Inner> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Receiver {
    /// Listens on a free loopback port.
    pub async fn start() -> std::io::Result<Receiver> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let inner = Arc::new(Mutex::new(Inner::default()));
        let app = Router::new()
            .route("/refund/{node}", post(refund))
            .with_state(inner.clone());
        tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, app).await {
                tracing::warn!(error = %e, "the chaos compensation endpoint stopped");
            }
        });
        Ok(Receiver { addr, inner })
    }

    /// The webhook URL node `i` is given.
    pub fn url(&self, i: usize) -> String {
        format!("http://{}/refund/{i}", self.addr)
    }

    /// Changes how it answers from now on.
    pub fn set_mode(&self, mode: Mode) {
        lock(&self.inner).mode = mode;
    }

    /// Every accepted call so far.
    pub fn accepted(&self) -> Vec<Effect> {
        lock(&self.inner).accepted.clone()
    }

    /// Calls refused so far.
    pub fn refused(&self) -> usize {
        lock(&self.inner).refused
    }

    /// Refunds carried out: distinct keys.
    pub fn effects(&self) -> usize {
        lock(&self.inner).done.len()
    }

    /// Losers refunded under more than one idempotency key: each would be
    /// refunded twice by a real provider. Keyed by (payment key, loser txn).
    pub fn refunded_twice(&self) -> BTreeMap<(String, String), BTreeSet<String>> {
        let mut keys: BTreeMap<(String, String), BTreeSet<String>> = BTreeMap::new();
        for e in &lock(&self.inner).accepted {
            keys.entry((e.key.clone(), e.loser_txn.clone()))
                .or_default()
                .insert(e.idempotency_key.clone());
        }
        keys.retain(|_, k| k.len() > 1);
        keys
    }
}

async fn refund(
    State(inner): State<Arc<Mutex<Inner>>>,
    Path(node): Path<usize>,
    headers: HeaderMap,
    body: Bytes,
) -> (StatusCode, String) {
    let key = headers
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let body: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
    let loser_txn = body["loser"]["txn_id"].as_str().unwrap_or("").to_owned();
    let payment_key = body["key"].as_str().unwrap_or("").to_owned();
    let (status, wait) = {
        let mut st = lock(&inner);
        match (st.mode, key) {
            (_, None) => {
                st.refused += 1;
                (StatusCode::BAD_REQUEST, None)
            }
            (Mode::Fails, Some(_)) => {
                st.refused += 1;
                (StatusCode::SERVICE_UNAVAILABLE, None)
            }
            (mode, Some(key)) => {
                st.done.insert(key.clone());
                st.accepted.push(Effect {
                    node,
                    idempotency_key: key,
                    loser_txn,
                    key: payment_key,
                });
                let wait = match mode {
                    Mode::Hangs(d) => Some(d),
                    _ => None,
                };
                (StatusCode::OK, wait)
            }
        }
    };
    if let Some(wait) = wait {
        tokio::time::sleep(wait).await;
    }
    (status, format!("{{\"status\":{}}}", status.as_u16()))
}
