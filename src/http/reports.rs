//! Reports for operators: conflicts, compensations, peers, health, metrics.

use super::render::{compensation_json, conflict_json, rfc3339};
use super::{json_list, off_runtime, Api, ApiError};
use axum::extract::{Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};
use std::sync::Arc;

/// Filter of the conflict report.
#[derive(Deserialize)]
pub struct ConflictFilter {
    state: Option<String>,
}

/// `GET /v1/conflicts[?state=open|resolved]`.
pub async fn conflicts(
    State(api): State<Arc<Api>>,
    Query(filter): Query<ConflictFilter>,
) -> Result<Response, ApiError> {
    let want_resolved = match filter.state.as_deref() {
        None => None,
        Some("open") => Some(false),
        Some("resolved") => Some(true),
        Some(other) => {
            return Err(ApiError::bad_request(format!(
                "unknown state '{other}'; use open or resolved"
            )))
        }
    };
    off_runtime(move || {
        let conflicts = api.ledger.conflicts();
        let list: Vec<_> = conflicts
            .iter()
            .filter(|c| want_resolved.is_none_or(|r| c.key.is_resolved() == r))
            .map(conflict_json)
            .collect();
        json_list("conflicts", &list)
    })
    .await?
}

/// `GET /v1/calibration`: how well this node's confidence held, per
/// situation and per partition episode.
pub async fn calibration(
    State(api): State<Arc<Api>>,
) -> Json<crate::confidence::calibration::CalibrationReport> {
    Json(api.estimator.calibration_report())
}

/// Filter of the compensation list.
#[derive(Deserialize)]
pub struct CompensationFilter {
    state: Option<String>,
}

/// `GET /v1/compensations[?state=...]`: every compensation known here
/// (this node's and, replicated, every other region's), and this node's
/// that still run after their key passed the retention (no conflict
/// report shows those).
pub async fn compensations(
    State(api): State<Arc<Api>>,
    Query(filter): Query<CompensationFilter>,
) -> Result<Response, ApiError> {
    off_runtime(move || {
        let conflicts = api.ledger.conflicts();
        let outliving = api.compensations.outliving_their_keys();
        let list: Vec<_> = conflicts
            .iter()
            .flat_map(|c| &c.key.compensations)
            .chain(&outliving)
            .filter(|c| {
                filter
                    .state
                    .as_deref()
                    .is_none_or(|s| c.state.as_str() == s)
            })
            .map(compensation_json)
            .collect();
        json_list("compensations", &list)
    })
    .await?
}

/// `POST /v1/compensations/{txn}/retry`: an operator sends a dead-lettered
/// compensation back for another round of attempts.
pub async fn retry_compensation(
    State(api): State<Arc<Api>>,
    Path(txn): Path<String>,
) -> Result<Response, ApiError> {
    match api.compensations.operator_retry(&txn).await {
        Ok(record) => Ok(Json(compensation_json(&record)).into_response()),
        Err(e) => Err(ApiError::new(e.status(), e.to_string())),
    }
}

/// `GET /v1/peers`: every allowlisted peer, with its region, replication
/// lag (now and p50 / p99 over the last samples), store delta both ways,
/// clock offset and message counts.
pub async fn peers(State(api): State<Arc<Api>>) -> Json<Value> {
    let now = api.ledger.wall_ms();
    let list: Vec<Value> = api
        .peers
        .snapshot()
        .into_iter()
        .map(|p| {
            let since_in_sync = now.saturating_sub(p.last_in_sync_ms.unwrap_or(api.started_ms));
            let samples = api.peers.samples(&p.peer_id);
            json!({
                "peer_id": p.peer_id,
                "region": p.region,
                "address": p.address,
                "connected": p.connected,
                "connected_since": p.connected_since_ms.map(rfc3339),
                "last_in_sync": p.last_in_sync_ms.map(rfc3339),
                "last_in_sync_ms": p.last_in_sync_ms,
                "seconds_since_in_sync": since_in_sync as f64 / 1000.0,
                "replication_lag_seconds": {
                    "now": p.lag_seconds,
                    "p50": samples.and_then(|s| s.recent_lag_quantile(0.5)),
                    "p99": samples.and_then(|s| s.recent_lag_quantile(0.99)),
                },
                "store_delta": { "they_lack_changes": p.they_lack_changes, "we_lack_heads": p.we_lack_heads },
                "clock_offset_ms": p.clock_offset_ms,
                "skew_violations": p.skew_violations,
                "sync_messages": { "sent": p.messages_sent, "received": p.messages_received },
                "sync_bytes": { "sent": p.bytes_sent, "received": p.bytes_received },
                "dropped_messages": p.dropped_messages,
                "dropped_by_kind": p.dropped_by_kind,
                "redial_attempts": p.redial_attempts,
                "redials_total": p.redials_total,
            })
        })
        .collect();
    Json(json!({ "peers": list }))
}

/// `GET /v1/health`: ok, degraded or critical, with the reasons and the
/// leading indicators behind them. 200 for ok and degraded (the node
/// serves), 503 for critical, so a load balancer's check needs no parsing.
pub async fn health(State(api): State<Arc<Api>>) -> Result<Response, ApiError> {
    let report = off_runtime(move || api.health.report()).await?;
    let code = match report.status {
        crate::health::reasons::Status::Critical => StatusCode::SERVICE_UNAVAILABLE,
        _ => StatusCode::OK,
    };
    Ok((code, Json(report.body)).into_response())
}

/// `GET /metrics` in the Prometheus text format.
pub async fn metrics(State(api): State<Arc<Api>>) -> Result<Response, ApiError> {
    let text = off_runtime(move || {
        api.health.refresh_gauges();
        api.metrics.encode()
    })
    .await?;
    Ok((
        StatusCode::OK,
        [(header::CONTENT_TYPE, crate::metrics::CONTENT_TYPE)],
        text,
    )
        .into_response())
}
