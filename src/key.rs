//! Validation of what a client hands us: the idempotency key and the payload.
//!
//! Both are checked before anything is written, so a rejected request can
//! never leave a trace in the ledger. The payload itself never leaves this
//! node: only its fingerprint is replicated, which is all another region
//! needs to tell a replay (same fingerprint) from a misuse of the key (409).

use serde_json::Value;
use std::fmt;

/// Longest idempotency key accepted, in bytes.
pub const MAX_KEY_LEN: usize = 255;
/// Largest payload accepted, in bytes of its canonical JSON.
pub const MAX_PAYLOAD_BYTES: usize = 64 * 1024;

/// Why a key or payload was refused; the message names the offending value.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum InputError {
    /// Keys are 1..=255 bytes.
    #[error("idempotency key is empty")]
    EmptyKey,
    /// Keys are 1..=255 bytes.
    #[error("idempotency key is {len} bytes long; the limit is {MAX_KEY_LEN}")]
    KeyTooLong {
        /// Length of the refused key.
        len: usize,
    },
    /// Keys are printable ASCII without spaces (0x21..=0x7E).
    #[error("idempotency key has byte 0x{byte:02x} at offset {offset}; only printable ASCII 0x21..=0x7E is allowed")]
    KeyByte {
        /// The first offending byte.
        byte: u8,
        /// Its position in the key.
        offset: usize,
    },
    /// Payloads are JSON objects, so that fingerprints compare like with like.
    #[error("payload must be a JSON object, got {kind}")]
    PayloadNotObject {
        /// JSON type that was sent instead.
        kind: &'static str,
    },
    /// Payloads are bounded so one client cannot exhaust memory or disk.
    #[error("payload is {len} bytes of JSON; the limit is {MAX_PAYLOAD_BYTES}")]
    PayloadTooLarge {
        /// Size of the canonical JSON of the refused payload.
        len: usize,
    },
}

/// A validated idempotency key: 1..=255 bytes of printable ASCII.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct IdempotencyKey(String);

impl IdempotencyKey {
    /// Checks `raw` against the key rules of the contract.
    ///
    /// ```
    /// use oncemesh::key::{IdempotencyKey, InputError};
    /// assert!(IdempotencyKey::parse("order-42/retry-1").is_ok());
    /// assert_eq!(IdempotencyKey::parse(""), Err(InputError::EmptyKey));
    /// assert!(IdempotencyKey::parse("has space").is_err());
    /// ```
    pub fn parse(raw: &str) -> Result<Self, InputError> {
        if raw.is_empty() {
            return Err(InputError::EmptyKey);
        }
        if raw.len() > MAX_KEY_LEN {
            return Err(InputError::KeyTooLong { len: raw.len() });
        }
        if let Some((offset, &byte)) = raw
            .as_bytes()
            .iter()
            .enumerate()
            .find(|(_, b)| !(0x21..=0x7e).contains(*b))
        {
            return Err(InputError::KeyByte { byte, offset });
        }
        Ok(Self(raw.to_owned()))
    }

    /// The key as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Which ledger shard (automerge document) holds this key. Every node
    /// derives the same shard from the same key, so one key's allocations
    /// from every region always land in the same document.
    pub fn shard(&self, shard_count: usize) -> usize {
        shard_of(&self.0, shard_count)
    }
}

/// Shard of a raw key: the first 8 bytes of blake3(key), little endian,
/// modulo the shard count. Part of the data model (docs/DATA_MODEL.md).
pub fn shard_of(key: &str, shard_count: usize) -> usize {
    let hash = blake3::hash(key.as_bytes());
    let mut first = [0u8; 8];
    first.copy_from_slice(&hash.as_bytes()[..8]);
    (u64::from_le_bytes(first) % shard_count.max(1) as u64) as usize
}

impl fmt::Display for IdempotencyKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// blake3 of a payload's canonical JSON, hex encoded.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Fingerprint(pub String);

/// Validates a payload and returns its fingerprint.
///
/// ```
/// use oncemesh::key::fingerprint;
/// let a = fingerprint(&serde_json::json!({"amount": 1299, "currency": "EUR"})).unwrap();
/// let b = fingerprint(&serde_json::from_str(r#"{"currency":"EUR","amount":1299}"#).unwrap()).unwrap();
/// assert_eq!(a, b); // key order does not matter
/// assert!(fingerprint(&serde_json::json!([1, 2])).is_err()); // payloads are objects
/// ```
///
/// Canonical JSON here is serde_json's compact form with object keys sorted
/// by bytes (serde_json's default map is ordered) and numbers kept as sent.
/// Two requests whose payloads differ only in key order or white space get
/// the same fingerprint; `1` and `1.0` do not.
pub fn fingerprint(payload: &Value) -> Result<Fingerprint, InputError> {
    if !payload.is_object() {
        return Err(InputError::PayloadNotObject {
            kind: json_kind(payload),
        });
    }
    let canonical = serde_json::to_vec(payload).unwrap_or_default();
    if canonical.len() > MAX_PAYLOAD_BYTES {
        return Err(InputError::PayloadTooLarge {
            len: canonical.len(),
        });
    }
    Ok(Fingerprint(blake3::hash(&canonical).to_hex().to_string()))
}

fn json_kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn key_rules() {
        assert_eq!(IdempotencyKey::parse(""), Err(InputError::EmptyKey));
        assert_eq!(
            IdempotencyKey::parse(&"k".repeat(256)),
            Err(InputError::KeyTooLong { len: 256 })
        );
        assert!(IdempotencyKey::parse(&"k".repeat(255)).is_ok());
        assert_eq!(
            IdempotencyKey::parse("a b"),
            Err(InputError::KeyByte {
                byte: b' ',
                offset: 1
            })
        );
        assert!(matches!(
            IdempotencyKey::parse("caf\u{e9}"),
            Err(InputError::KeyByte { byte: 0xc3, .. })
        ));
        assert!(IdempotencyKey::parse("order-42/retry~!").is_ok());
    }

    #[test]
    fn fingerprint_ignores_key_order_but_not_values() {
        let a = fingerprint(&json!({"a": 1, "b": {"x": true, "y": null}})).unwrap();
        let b: Value = serde_json::from_str(r#"{ "b": {"y": null, "x": true}, "a": 1 }"#).unwrap();
        assert_eq!(a, fingerprint(&b).unwrap());
        assert_ne!(a, fingerprint(&json!({"a": 2, "b": {}})).unwrap());
    }

    #[test]
    fn payload_rules() {
        assert_eq!(
            fingerprint(&json!([1])),
            Err(InputError::PayloadNotObject { kind: "an array" })
        );
        let big = json!({ "x": "y".repeat(MAX_PAYLOAD_BYTES) });
        assert!(matches!(
            fingerprint(&big),
            Err(InputError::PayloadTooLarge { .. })
        ));
    }

    #[test]
    fn shards_are_stable_and_in_range() {
        for i in 0..1000 {
            let k = format!("key-{i}");
            let s = shard_of(&k, 8);
            assert!(s < 8);
            assert_eq!(s, shard_of(&k, 8));
        }
    }
}
