//! `/v1/documents`: the ledger's automerge documents, for backups and for
//! carrying state between regions by hand during a long partition.

use super::ApiError;
use crate::ledger::SHARD_COUNT;
use crate::node::Node;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;
use std::sync::Arc;

/// Document id of a shard: `tokens-<n>` (docs/DATA_MODEL.md).
pub fn document_id(shard: usize) -> String {
    format!("tokens-{shard}")
}

fn parse_id(id: &str) -> Result<usize, ApiError> {
    id.strip_prefix("tokens-")
        .and_then(|n| n.parse::<usize>().ok())
        .filter(|&n| n < SHARD_COUNT && document_id(n) == id)
        .ok_or_else(|| {
            ApiError::not_found(format!(
                "no document '{id}'; ids are tokens-0 .. tokens-{}",
                SHARD_COUNT - 1
            ))
        })
}

/// Lists every document with its heads digest and size.
pub async fn list(State(node): State<Arc<Node>>) -> Json<serde_json::Value> {
    let ledger = node.ledger.clone();
    let docs = tokio::task::spawn_blocking(move || {
        (0..SHARD_COUNT)
            .map(|shard| {
                let digest = ledger.digest(shard);
                json!({
                    "id": document_id(shard),
                    "heads": ledger.heads(shard).iter().map(|h| h.to_string()).collect::<Vec<_>>(),
                    "heads_digest": blake3::Hash::from(digest).to_hex().to_string(),
                    "size_bytes": ledger.save_shard(shard).len(),
                })
            })
            .collect::<Vec<_>>()
    })
    .await
    .unwrap_or_default();
    Json(json!({ "documents": docs }))
}

/// One document as `Automerge::save` writes it.
pub async fn download(
    State(node): State<Arc<Node>>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let shard = parse_id(&id)?;
    let ledger = node.ledger.clone();
    let bytes = tokio::task::spawn_blocking(move || ledger.save_shard(shard))
        .await
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    Ok(([(header::CONTENT_TYPE, "application/octet-stream")], bytes).into_response())
}

/// Merges automerge bytes into a document; answers once the merge is durable.
pub async fn merge(
    State(node): State<Arc<Node>>,
    Path(id): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let shard = parse_id(&id)?;
    let body = body.map_err(ApiError::from)?;
    if body.is_empty() {
        return Err(ApiError::bad_request(
            "body is empty; send automerge document bytes",
        ));
    }
    let ledger = node.ledger.clone();
    let outcome = tokio::task::spawn_blocking(move || ledger.merge_bytes(shard, &body))
        .await
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
        .map_err(|e| ApiError::bad_request(format!("cannot merge into {id}: {e}")))?;
    node.storage
        .wait_durable(outcome.durable_seq)
        .await
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    node.after_merge(&outcome);
    Ok(Json(json!({
        "id": id,
        "new_allocations": outcome.new_allocations.len(),
        "conflicts_changed": outcome.conflicts_changed,
        "malformed_records": outcome.malformed.len(),
    })))
}
