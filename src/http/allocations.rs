//! `POST /v1/allocations` and `GET /v1/allocations/{key}`.

use super::render::{allocation_json, key_json};
use super::ApiError;
use crate::key::InputError;
use crate::ledger::AllocateError;
use crate::node::{AllocationFailure, Node};
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use std::sync::Arc;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AllocateBody {
    key: String,
    #[serde(default = "empty_object")]
    payload: serde_json::Value,
}

fn empty_object() -> serde_json::Value {
    serde_json::Value::Object(Default::default())
}

/// Allocates a key: 201 new, 200 replay, 409 misuse, 4xx invalid input.
pub async fn create(
    State(node): State<Arc<Node>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let body = body.map_err(ApiError::from)?;
    // serde's derived struct visitor also accepts a JSON array (`["k", {}]`
    // as key, payload): only an object is a valid request body.
    if body.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return Err(ApiError::bad_request(
            "body must be a JSON object {\"key\": \"...\", \"payload\": {...}}",
        ));
    }
    let body: AllocateBody = serde_json::from_slice(&body).map_err(|e| {
        ApiError::bad_request(format!(
            "body must be JSON {{\"key\": \"...\", \"payload\": {{...}}}}: {e}"
        ))
    })?;
    match node.allocate(&body.key, &body.payload).await {
        Ok(allocated) => {
            let mut json = allocation_json(&node, &allocated.allocation, allocated.view.as_ref());
            json.replay = Some(allocated.replay);
            let status = if allocated.replay {
                StatusCode::OK
            } else {
                StatusCode::CREATED
            };
            Ok((status, Json(json)).into_response())
        }
        Err(AllocationFailure::Input(e @ InputError::PayloadTooLarge { .. })) => {
            Err(ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, e.to_string()))
        }
        Err(AllocationFailure::Input(e)) => Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            e.to_string(),
        )),
        Err(AllocationFailure::Refused(e @ AllocateError::FingerprintMismatch { .. })) => {
            Err(ApiError::new(StatusCode::CONFLICT, e.to_string()))
        }
        Err(e @ AllocationFailure::ShuttingDown) => Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            e.to_string(),
        )),
        Err(e) => {
            tracing::error!(error = %e, "allocation failed");
            Err(ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                e.to_string(),
            ))
        }
    }
}

/// Every allocation of one key and the key's state.
pub async fn show(
    State(node): State<Arc<Node>>,
    Path(key): Path<String>,
) -> Result<Response, ApiError> {
    crate::key::IdempotencyKey::parse(&key)
        .map_err(|e| ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, e.to_string()))?;
    let ledger = node.ledger.clone();
    let looked_up = key.clone();
    let view = super::off_runtime(move || ledger.key(&looked_up))
        .await?
        .ok_or_else(|| ApiError::not_found(format!("idempotency key '{key}' is unknown here")))?;
    // Never show what is not yet durable: a reader could act on it.
    for allocation in &view.allocations {
        node.storage
            .wait(allocation.durable)
            .await
            .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    }
    Ok(Json(key_json(&node, &view)).into_response())
}
