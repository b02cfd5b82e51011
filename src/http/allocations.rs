//! `POST /v1/allocations` (the key in the body or in an `Idempotency-Key`
//! header) and `GET /v1/allocations/{key}`.

use super::render::{allocation_json, key_json};
use super::ApiError;
use crate::key::{IdempotencyKey, InputError};
use crate::ledger::AllocateError;
use crate::node::{AllocationFailure, Node};
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use std::borrow::Cow;
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

/// The header of draft-ietf-httpapi-idempotency-key-header.
const IDEMPOTENCY_KEY: &str = "idempotency-key";

/// Allocates a key: 201 new, 200 replay, 409 misuse, 4xx invalid input.
///
/// The key comes in the body (`{"key", "payload"}`) or in an
/// `Idempotency-Key` header, and then the body is the payload itself.
pub async fn create(
    State(node): State<Arc<Node>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let body = body.map_err(ApiError::from)?;
    let (key, payload) = match header_key(&headers)? {
        None => {
            let body = body_form(&body)?;
            (body.key, body.payload)
        }
        Some(key) => (key.as_str().to_owned(), header_form(key.as_str(), &body)?),
    };
    match node.allocate(&key, &payload).await {
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

/// The `{"key", "payload"}` body.
fn body_form(body: &[u8]) -> Result<AllocateBody, ApiError> {
    // serde's derived struct visitor also accepts a JSON array (`["k", {}]`
    // as key, payload): only an object is a valid request body.
    if body.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return Err(ApiError::bad_request(
            "body must be a JSON object {\"key\": \"...\", \"payload\": {...}}, or the payload with an Idempotency-Key header",
        ));
    }
    serde_json::from_slice(body).map_err(|e| {
        ApiError::bad_request(format!(
            "body must be JSON {{\"key\": \"...\", \"payload\": {{...}}}}: {e}"
        ))
    })
}

/// The payload of a request whose key came in the header: the body itself
/// (an empty body is the empty payload), unless the body is in the body
/// form (members `key` and `payload` only), whose key must then be the
/// header's.
fn header_form(key: &str, body: &[u8]) -> Result<serde_json::Value, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(empty_object());
    }
    let value: serde_json::Value = serde_json::from_slice(body).map_err(|e| {
        ApiError::bad_request(format!(
            "with an Idempotency-Key header the body is the payload, a JSON object: {e}"
        ))
    })?;
    let is_body_form = value.as_object().is_some_and(|members| {
        members.contains_key("key") && members.keys().all(|m| m == "key" || m == "payload")
    });
    if !is_body_form {
        return Ok(value);
    }
    let body: AllocateBody = serde_json::from_value(value)
        .map_err(|e| ApiError::bad_request(format!("body has a key member: {e}")))?;
    if body.key != key {
        return Err(ApiError::bad_request(format!(
            "the request names two idempotency keys: '{key}' in the Idempotency-Key header and '{}' in the body",
            body.key
        )));
    }
    Ok(body.payload)
}

/// The key of the `Idempotency-Key` header, if there is one. The draft
/// makes its value a structured-field string (`"abc"`, with `\"` and `\\`
/// escapes); many clients send the bare key (`abc`), as Stripe's do. Both
/// are read. A key outside the key rules is a 422, as in the body form.
fn header_key(headers: &HeaderMap) -> Result<Option<IdempotencyKey>, ApiError> {
    let mut values = headers.get_all(IDEMPOTENCY_KEY).iter();
    let Some(value) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() {
        return Err(ApiError::bad_request(
            "the request has more than one Idempotency-Key header",
        ));
    }
    let raw = value.as_bytes();
    let unquoted = match raw {
        [b'"', inner @ .., b'"'] => Cow::Owned(structured_string(inner).ok_or_else(|| {
            ApiError::bad_request(
                "Idempotency-Key header: a quoted value must be a structured-field string (RFC 8941): only \\\" and \\\\ may be escaped",
            )
        })?),
        _ => Cow::Borrowed(raw),
    };
    IdempotencyKey::parse_bytes(&unquoted)
        .map(Some)
        .map_err(|e| {
            ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                format!("Idempotency-Key header: {e}"),
            )
        })
}

/// The content of an RFC 8941 string between its quotes, or `None` when an
/// escape is not `\"` or `\\`, or a quote is not escaped.
fn structured_string(inner: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(inner.len());
    let mut bytes = inner.iter();
    while let Some(&b) = bytes.next() {
        match b {
            b'\\' => match bytes.next() {
                Some(&escaped @ (b'"' | b'\\')) => out.push(escaped),
                _ => return None,
            },
            b'"' => return None,
            _ => out.push(b),
        }
    }
    Some(out)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_keys_bare_or_as_structured_strings() {
        let key = |value: &[u8]| {
            let mut headers = HeaderMap::new();
            headers.insert(
                IDEMPOTENCY_KEY,
                axum::http::HeaderValue::from_bytes(value).unwrap(),
            );
            header_key(&headers).map(|k| k.map(|k| k.as_str().to_owned()))
        };
        assert_eq!(key(b"order-1").unwrap().as_deref(), Some("order-1"));
        assert_eq!(key(b"\"order-1\"").unwrap().as_deref(), Some("order-1"));
        assert_eq!(key(br#""a\"b\\c""#).unwrap().as_deref(), Some(r#"a"b\c"#));
        assert_eq!(
            key(br#""a\nb""#).unwrap_err().status,
            StatusCode::BAD_REQUEST
        );
        assert_eq!(
            key(b"\"\"").unwrap_err().status,
            StatusCode::UNPROCESSABLE_ENTITY
        );
        assert_eq!(
            key(b"caf\xc3\xa9").unwrap_err().status,
            StatusCode::UNPROCESSABLE_ENTITY
        );
        assert_eq!(
            key(b"\"a b\"").unwrap_err().status,
            StatusCode::UNPROCESSABLE_ENTITY
        );
        assert_eq!(header_key(&HeaderMap::new()).unwrap(), None);
    }

    #[test]
    fn a_body_form_body_under_a_header_must_name_the_same_key() {
        let body = br#"{"key": "k1", "payload": {"amount": 1}}"#;
        assert_eq!(
            header_form("k1", body).unwrap(),
            serde_json::json!({"amount": 1})
        );
        assert_eq!(
            header_form("k2", body).unwrap_err().status,
            StatusCode::BAD_REQUEST
        );
        // A payload that merely has a `key` member is a payload.
        let payload = br#"{"key": "k1", "amount": 1}"#;
        assert_eq!(
            header_form("k2", payload).unwrap(),
            serde_json::json!({"key": "k1", "amount": 1})
        );
        assert_eq!(header_form("k", b" ").unwrap(), serde_json::json!({}));
        assert_eq!(
            header_form("k", b"{").unwrap_err().status,
            StatusCode::BAD_REQUEST
        );
    }
}
