//! The HTTP API (`/v1/...`, `/metrics`): JSON in and out, errors as
//! `{"error": "..."}` with a fitting status, optional bearer token.
//!
//! Handlers stay thin: they parse, call the subsystem ([`Api`] holds a
//! handle to each), and render. Bodies are
//! parsed by hand from bytes so every malformed request gets a message that
//! says what is wrong, in the same JSON error shape as every other error.

mod allocations;
mod documents;
mod render;
mod reports;

pub use render::rfc3339;

use crate::allocator::Allocator;
use crate::compensation::Compensations;
use crate::estimator::Estimator;
use crate::health::Health;
use crate::ledger::{Ledger, OnMerge};
use crate::metrics::Metrics;
use crate::peers::status::PeerTable;
use crate::storage::Storage;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use std::sync::Arc;

/// Largest allocate request body: a 64 KiB payload plus key and framing.
const ALLOCATE_BODY_LIMIT: usize = 80 * 1024;
/// Largest automerge upload for `POST /v1/documents/{id}`.
const DOCUMENT_BODY_LIMIT: usize = 512 * 1024 * 1024;

/// An API error: a status and a message for the `error` field.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    message: String,
}

impl ApiError {
    /// An error with `status` and `message`.
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
        }
    }

    /// 400 Bad Request.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }

    /// 404 Not Found.
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, message)
    }
}

/// Runs `work`, which takes shard locks, on tokio's blocking pool. A peer's
/// large message holds a shard lock for tens of milliseconds while it is
/// applied; a runtime worker waiting for it would hold up every other
/// request, and the network, meanwhile.
pub async fn off_runtime<T: Send + 'static>(
    work: impl FnOnce() -> T + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))
}

/// `{"<name>": [...]}` serialized, for a report built on the blocking pool
/// from the ledger's views: the answer leaves as bytes, so the views it
/// borrows from need not outlive the closure.
pub fn json_list<T: serde::Serialize>(name: &str, list: &[T]) -> Result<Response, ApiError> {
    let body = serde_json::to_vec(&std::collections::BTreeMap::from([(name, list)]))
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    Ok((
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/json")],
        body,
    )
        .into_response())
}

/// A body that could not be read (over the size limit: 413, or cut off)
/// gets the same JSON error shape as every other error, not axum's text.
impl From<axum::extract::rejection::BytesRejection> for ApiError {
    fn from(rejection: axum::extract::rejection::BytesRejection) -> Self {
        Self::new(rejection.status(), rejection.body_text())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (
            self.status,
            Json(serde_json::json!({ "error": self.message })),
        )
            .into_response()
    }
}

/// What the handlers reach: one handle per subsystem, not the whole node.
pub struct Api {
    /// The allocation path.
    pub allocator: Arc<Allocator>,
    /// Keys, conflicts and documents.
    pub ledger: Arc<Ledger>,
    /// Nothing is shown before it is durable.
    pub storage: Arc<Storage>,
    /// What we know of each peer.
    pub peers: Arc<PeerTable>,
    /// Current confidence and the calibration report.
    pub estimator: Arc<Estimator>,
    /// Operator retries of this node's compensations.
    pub compensations: Arc<Compensations>,
    /// `/v1/health` and the gauges of `/metrics`.
    pub health: Arc<Health>,
    /// `/metrics`.
    pub metrics: Arc<Metrics>,
    /// Acts on what an uploaded document brought in.
    pub on_merge: OnMerge,
    /// The bearer token every `/v1` route but health requires, if any.
    pub api_token: Option<String>,
    /// When this process started: a peer never in sync counts from here.
    pub started_ms: u64,
}

/// Builds the router over a running node's subsystems.
pub fn router(api: Arc<Api>) -> Router {
    let guarded = Router::new()
        .route(
            "/v1/allocations",
            post(allocations::create).layer(DefaultBodyLimit::max(ALLOCATE_BODY_LIMIT)),
        )
        .route("/v1/allocations/{key}", get(allocations::show))
        .route("/v1/conflicts", get(reports::conflicts))
        .route("/v1/compensations", get(reports::compensations))
        .route(
            "/v1/compensations/{txn}/retry",
            post(reports::retry_compensation),
        )
        .route("/v1/peers", get(reports::peers))
        .route("/v1/calibration", get(reports::calibration))
        .route("/v1/documents", get(documents::list))
        .route(
            "/v1/documents/{id}",
            get(documents::download)
                .post(documents::merge)
                .layer(DefaultBodyLimit::max(DOCUMENT_BODY_LIMIT)),
        )
        .route_layer(middleware::from_fn_with_state(api.clone(), require_token));
    Router::new()
        .route("/v1/health", get(reports::health))
        .route("/metrics", get(reports::metrics))
        .merge(guarded)
        .fallback(|| async { ApiError::not_found("no such route; see docs/API.md") })
        .method_not_allowed_fallback(|| async {
            ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method not allowed on this route",
            )
        })
        .with_state(api)
}

/// Refuses requests without the configured bearer token.
async fn require_token(State(api): State<Arc<Api>>, request: Request, next: Next) -> Response {
    let Some(expected) = api.api_token.as_deref() else {
        return next.run(request).await;
    };
    let given = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    if given.is_some_and(|g| constant_time_eq(g.as_bytes(), expected.as_bytes())) {
        next.run(request).await
    } else {
        ApiError::new(
            StatusCode::UNAUTHORIZED,
            "missing or wrong bearer token (Authorization: Bearer ...)",
        )
        .into_response()
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}
