//! `/v1/documents`: the ledger's automerge documents, for backups and for
//! carrying state between regions by hand during a long partition.

use super::{Api, ApiError};
use crate::ledger::{DocId, MergeError};
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;
use std::sync::Arc;

fn parse_id(id: &str) -> Result<DocId, ApiError> {
    id.parse::<DocId>()
        .map_err(|e| ApiError::not_found(format!("no document {e}; GET /v1/documents lists them")))
}

/// Lists every live document with its heads, heads digest and size.
/// Pending allocations are folded in first, so the documents hold every
/// allocation acknowledged before the request.
pub async fn list(State(api): State<Arc<Api>>) -> Json<serde_json::Value> {
    let ledger = api.ledger.clone();
    let docs = tokio::task::spawn_blocking(move || {
        ledger.fold_pending();
        ledger
            .digests()
            .into_iter()
            .map(|(doc, digest)| {
                json!({
                    "id": doc.to_string(),
                    "epoch": doc.epoch,
                    "shard": doc.shard,
                    "heads": ledger.heads(doc).unwrap_or_default().iter().map(|h| h.to_string()).collect::<Vec<_>>(),
                    "heads_digest": blake3::Hash::from(digest).to_hex().to_string(),
                    "size_bytes": ledger.save_document(doc).map_or(0, |b| b.len()),
                })
            })
            .collect::<Vec<_>>()
    })
    .await
    .unwrap_or_default();
    Json(json!({ "documents": docs }))
}

/// One document as `Automerge::save` writes it, with every allocation
/// acknowledged before the request.
pub async fn download(
    State(api): State<Arc<Api>>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let doc = parse_id(&id)?;
    let ledger = api.ledger.clone();
    let bytes = tokio::task::spawn_blocking(move || {
        ledger.fold_pending();
        ledger.save_document(doc)
    })
    .await
    .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
    .ok_or_else(|| ApiError::not_found(format!("no document '{id}' on this node")))?;
    Ok(([(header::CONTENT_TYPE, "application/octet-stream")], bytes).into_response())
}

/// Merges automerge bytes into a document; answers once the merge is durable.
pub async fn merge(
    State(api): State<Arc<Api>>,
    Path(id): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let doc = parse_id(&id)?;
    let body = body.map_err(ApiError::from)?;
    if body.is_empty() {
        return Err(ApiError::bad_request(
            "body is empty; send automerge document bytes",
        ));
    }
    let ledger = api.ledger.clone();
    let outcome = tokio::task::spawn_blocking(move || ledger.merge_bytes(doc, &body))
        .await
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
        .map_err(|e| match e {
            MergeError::Expired(_) => ApiError::new(StatusCode::GONE, e.to_string()),
            MergeError::TooFarAhead(_) => ApiError::bad_request(e.to_string()),
            MergeError::Document(e) => {
                ApiError::bad_request(format!("cannot merge into {id}: {e}"))
            }
        })?;
    api.storage
        .wait_durable(outcome.durable_seq)
        .await
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    (api.on_merge)(&outcome);
    Ok(Json(json!({
        "id": id,
        "new_allocations": outcome.new_allocations.len(),
        "conflicts_changed": outcome.conflicts_changed,
        "malformed_records": outcome.malformed.len(),
    })))
}
