//! Validation of what a client hands us: the idempotency key and the payload.
//!
//! Both are checked before anything is written, so a rejected request can
//! never leave a trace in the ledger. The payload itself never leaves this
//! node: only its fingerprint is replicated, which is all another region
//! needs to tell a replay (same fingerprint) from a misuse of the key (409).

use crate::hex_text::{HexText, Prefix};
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
        Self::parse_bytes(raw.as_bytes())
    }

    /// Checks raw bytes, such as an HTTP header value, which need not be
    /// UTF-8: the error names the first byte outside the rules.
    ///
    /// ```
    /// use oncemesh::key::{IdempotencyKey, InputError};
    /// assert_eq!(
    ///     IdempotencyKey::parse_bytes(b"caf\xe9"),
    ///     Err(InputError::KeyByte { byte: 0xe9, offset: 3 })
    /// );
    /// ```
    pub fn parse_bytes(raw: &[u8]) -> Result<Self, InputError> {
        if raw.is_empty() {
            return Err(InputError::EmptyKey);
        }
        if raw.len() > MAX_KEY_LEN {
            return Err(InputError::KeyTooLong { len: raw.len() });
        }
        match raw
            .iter()
            .enumerate()
            .find(|(_, b)| !(0x21..=0x7e).contains(*b))
        {
            Some((offset, &byte)) => Err(InputError::KeyByte { byte, offset }),
            // Printable ASCII is UTF-8.
            None => Ok(Self(String::from_utf8_lossy(raw).into_owned())),
        }
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

/// Tag of the fingerprint scheme: blake3 of the payload's RFC 8785 form.
/// Part of the data model (docs/DATA_MODEL.md): a stored fingerprint
/// without it was written by a node of an earlier version, which hashed
/// serde_json's compact text with numbers as sent.
pub const JCS_TAG: &str = "jcs:";

/// The tag of the fingerprint scheme new records carry ([`JCS_TAG`]).
pub struct JcsTag;

impl Prefix for JcsTag {
    const PREFIX: &'static str = JCS_TAG;
}

/// A record's fingerprint: `jcs:` + 64 hex digits held as the 32 digest
/// bytes, a fingerprint of the earlier scheme (bare hex) as its text.
pub type RecordFingerprint = HexText<JcsTag, 32>;

/// A payload's fingerprint, as new records store it and as a record of the
/// earlier scheme would, so a replay is recognised whichever scheme the
/// node that made the allocation used (a rolling upgrade). Two fingerprints
/// are equal when their payloads have one canonical form, whatever text
/// they came in.
#[derive(Clone, Debug)]
pub struct Fingerprint {
    /// `jcs:` + hex blake3 of the RFC 8785 form: what new records carry.
    current: String,
    /// That blake3 digest.
    digest: [u8; 32],
    /// Hex blake3 of the earlier scheme's text, when that text differs
    /// from the RFC 8785 form (the digest is then another one).
    legacy: Option<String>,
}

impl PartialEq for Fingerprint {
    fn eq(&self, other: &Self) -> bool {
        self.current == other.current
    }
}

impl Eq for Fingerprint {}

impl Fingerprint {
    /// The value written into a new record, as text.
    pub fn as_str(&self) -> &str {
        &self.current
    }

    /// The value written into a new record.
    pub fn to_record(&self) -> RecordFingerprint {
        RecordFingerprint::from_bytes(self.digest)
    }

    /// Whether `stored`, a record's fingerprint of either scheme, is the
    /// fingerprint of this payload.
    pub fn matches(&self, stored: &RecordFingerprint) -> bool {
        if let Some(digest) = stored.bytes() {
            return self.digest == *digest;
        }
        let stored = stored.to_text();
        if stored.starts_with(JCS_TAG) {
            return stored == self.current;
        }
        match &self.legacy {
            Some(legacy) => stored == *legacy,
            None => Some(stored.as_str()) == self.current.strip_prefix(JCS_TAG),
        }
    }
}

/// Validates a payload and returns its fingerprint.
///
/// ```
/// use oncemesh::key::fingerprint;
/// let a = fingerprint(&serde_json::json!({"amount": 1299, "currency": "EUR"})).unwrap();
/// let b = fingerprint(&serde_json::from_str(r#"{"currency":"EUR","amount":1299.0}"#).unwrap()).unwrap();
/// assert_eq!(a, b); // neither key order nor number formatting matters
/// assert!(a.as_str().starts_with("jcs:"));
/// assert!(fingerprint(&serde_json::json!([1, 2])).is_err()); // payloads are objects
/// ```
///
/// The fingerprint is blake3 of the payload's RFC 8785 canonical form
/// ([`crate::jcs`]): two requests whose payloads differ only in key order,
/// white space, string escapes or number notation (`1`, `1.0`, `1e0`) get
/// the same fingerprint.
pub fn fingerprint(payload: &Value) -> Result<Fingerprint, InputError> {
    if !payload.is_object() {
        return Err(InputError::PayloadNotObject {
            kind: json_kind(payload),
        });
    }
    let canonical = crate::jcs::canonical(payload);
    if canonical.len() > MAX_PAYLOAD_BYTES {
        return Err(InputError::PayloadTooLarge {
            len: canonical.len(),
        });
    }
    let digest = blake3::hash(&canonical);
    // The earlier scheme: serde_json's compact text, keys in byte order.
    let earlier = serde_json::to_vec(payload).unwrap_or_default();
    Ok(Fingerprint {
        current: format!("{JCS_TAG}{}", digest.to_hex()),
        digest: *digest.as_bytes(),
        legacy: (earlier != canonical).then(|| blake3::hash(&earlier).to_hex().to_string()),
    })
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
    fn number_formatting_does_not_matter() {
        let text = |t: &str| fingerprint(&serde_json::from_str(t).unwrap()).unwrap();
        let one = text(r#"{"amount": 1}"#);
        assert_eq!(one, text(r#"{"amount": 1.0}"#));
        assert_eq!(one, text(r#"{"amount": 1e0}"#));
        assert_eq!(one, text(r#"{"amount": 10E-1}"#));
        assert_ne!(one, text(r#"{"amount": 1.5}"#));
        assert_eq!(text(r#"{"s": "\u00e9"}"#), text(r#"{"s": "é"}"#));
    }

    #[test]
    fn records_of_the_earlier_scheme_still_match() {
        let earlier = |payload: &Value| {
            RecordFingerprint::new(&blake3::hash(&serde_json::to_vec(payload).unwrap()).to_hex())
        };
        // Same text in both schemes: the digest is the same, only the tag differs.
        let plain = json!({"amount": 1250, "currency": "EUR"});
        let fp = fingerprint(&plain).unwrap();
        assert!(fp.matches(&earlier(&plain)));
        assert!(fp.matches(&fp.to_record()) && fp.matches(&RecordFingerprint::new(fp.as_str())));
        assert_eq!(fp.as_str(), format!("jcs:{}", earlier(&plain)));
        // A payload whose text the schemes write differently.
        let float: Value = serde_json::from_str(r#"{"amount": 1250.0}"#).unwrap();
        let fp = fingerprint(&float).unwrap();
        assert!(
            fp.matches(&earlier(&float)),
            "the old node's record of 1250.0"
        );
        assert!(
            !fp.matches(&earlier(&json!({"amount": 1250}))),
            "the old scheme kept 1250 and 1250.0 apart"
        );
        assert!(fp.matches(&fingerprint(&json!({"amount": 1250})).unwrap().to_record()));
        // Another payload matches neither scheme.
        let other = fingerprint(&json!({"amount": 9})).unwrap();
        assert!(!other.matches(&fp.to_record()) && !other.matches(&earlier(&float)));
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
