//! `POST /v1/allocations` (the key in the body or in an `Idempotency-Key`
//! header) and `GET /v1/allocations/{key}`.

use super::render::{allocation_json, key_json};
use super::Api;
use super::ApiError;
use crate::allocator::AllocationFailure;
use crate::key::InputError;
use crate::ledger::AllocateError;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
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

/// The header of draft-ietf-httpapi-idempotency-key-header.
const IDEMPOTENCY_KEY: &str = "idempotency-key";

/// Allocates a key: 201 new, 200 replay, 409 misuse, 4xx invalid input.
///
/// The key comes in the body (`{"key", "payload"}`) or in an
/// `Idempotency-Key` header, and then the body is the payload itself.
pub async fn create(
    State(api): State<Arc<Api>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let body = body.map_err(ApiError::from)?;
    let header = header_key(&headers)?;
    let from_header = header.is_some();
    let (key, payload) = match header {
        None => {
            let body = body_form(&body)?;
            (body.key.into_bytes(), body.payload)
        }
        Some(key) => {
            let payload = header_form(&key, &body)?;
            (key, payload)
        }
    };
    match api.allocator.allocate(&key, &payload).await {
        Ok(allocated) => {
            let mut json = allocation_json(
                &api.estimator,
                &allocated.allocation,
                allocated.view.as_ref(),
            );
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
        Err(AllocationFailure::Input(e)) => {
            let key_error = matches!(
                e,
                InputError::EmptyKey | InputError::KeyTooLong { .. } | InputError::KeyByte { .. }
            );
            let message = if from_header && key_error {
                format!("Idempotency-Key header: {e}")
            } else {
                e.to_string()
            };
            Err(ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, message))
        }
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
fn header_form(key: &[u8], body: &[u8]) -> Result<serde_json::Value, ApiError> {
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
    if body.key.as_bytes() != key {
        return Err(ApiError::bad_request(format!(
            "the request names two idempotency keys: '{}' in the Idempotency-Key header and '{}' in the body",
            String::from_utf8_lossy(key),
            body.key
        )));
    }
    Ok(body.payload)
}

/// The key of the `Idempotency-Key` header, if there is one, as bytes:
/// [`Allocator::allocate`](crate::allocator::Allocator::allocate) checks it against the key rules, as in the body form
/// (a 422). The draft makes the value a structured-field string (`"abc"`,
/// with `\"` and `\\` escapes); many clients send the bare key (`abc`), as
/// Stripe's do. Both are read.
fn header_key(headers: &HeaderMap) -> Result<Option<Vec<u8>>, ApiError> {
    let mut values = headers.get_all(IDEMPOTENCY_KEY).iter();
    let Some(value) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() {
        return Err(ApiError::bad_request(
            "the request has more than one Idempotency-Key header",
        ));
    }
    match value.as_bytes() {
        [b'"', inner @ .., b'"'] => structured_string(inner).map(Some).ok_or_else(|| {
            ApiError::bad_request(
                "Idempotency-Key header: a quoted value must be a structured-field string (RFC 8941): only \\\" and \\\\ may be escaped",
            )
        }),
        raw => Ok(Some(raw.to_vec())),
    }
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
    State(api): State<Arc<Api>>,
    Path(key): Path<String>,
) -> Result<Response, ApiError> {
    crate::key::IdempotencyKey::parse(&key)
        .map_err(|e| ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, e.to_string()))?;
    let ledger = api.ledger.clone();
    let looked_up = key.clone();
    let view = super::off_runtime(move || ledger.key(&looked_up))
        .await?
        .ok_or_else(|| ApiError::not_found(format!("idempotency key '{key}' is unknown here")))?;
    // Never show what is not yet durable: a reader could act on it.
    for allocation in &view.allocations {
        api.storage
            .wait(allocation.durable)
            .await
            .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    }
    Ok(Json(key_json(&api.estimator, &view)).into_response())
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
            header_key(&headers).map(|k| k.map(|k| String::from_utf8_lossy(&k).into_owned()))
        };
        assert_eq!(key(b"order-1").unwrap().as_deref(), Some("order-1"));
        assert_eq!(key(b"\"order-1\"").unwrap().as_deref(), Some("order-1"));
        assert_eq!(key(br#""a\"b\\c""#).unwrap().as_deref(), Some(r#"a"b\c"#));
        assert_eq!(
            key(br#""a\nb""#).unwrap_err().status,
            StatusCode::BAD_REQUEST
        );
        assert_eq!(
            key(br#""a"b""#).unwrap_err().status,
            StatusCode::BAD_REQUEST
        );
        assert_eq!(header_key(&HeaderMap::new()).unwrap(), None);
        let mut two = HeaderMap::new();
        two.append(IDEMPOTENCY_KEY, "a".parse().unwrap());
        two.append(IDEMPOTENCY_KEY, "b".parse().unwrap());
        assert_eq!(
            header_key(&two).unwrap_err().status,
            StatusCode::BAD_REQUEST
        );
    }

    #[test]
    fn a_body_form_body_under_a_header_must_name_the_same_key() {
        let body = br#"{"key": "k1", "payload": {"amount": 1}}"#;
        assert_eq!(
            header_form(b"k1", body).unwrap(),
            serde_json::json!({"amount": 1})
        );
        assert_eq!(
            header_form(b"k2", body).unwrap_err().status,
            StatusCode::BAD_REQUEST
        );
        // A payload that merely has a `key` member is a payload.
        let payload = br#"{"key": "k1", "amount": 1}"#;
        assert_eq!(
            header_form(b"k2", payload).unwrap(),
            serde_json::json!({"key": "k1", "amount": 1})
        );
        assert_eq!(header_form(b"k", b" ").unwrap(), serde_json::json!({}));
        assert_eq!(
            header_form(b"k", b"{").unwrap_err().status,
            StatusCode::BAD_REQUEST
        );
    }
}
