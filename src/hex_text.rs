//! Identifiers that are a fixed prefix and hex digits, held as their bytes.
//!
//! A node keeps every live record in memory, and two of a record's fields
//! are hex digests written as text: the fingerprint (`jcs:` + 64 digits)
//! and the transaction id (`tx_` + 32). As `String`s they cost 24 bytes
//! plus a heap block of 48 to 80 each, per token; as bytes, 32 and 16,
//! inline. Text of any other form (a record of an earlier scheme, or a
//! peer's record that does not follow the data model) is kept exactly as
//! written, so nothing read is changed and everything written back reads
//! the same: the type is a representation, not a validation.

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;
use std::marker::PhantomData;

/// The prefix of one kind of identifier.
pub trait Prefix {
    /// What comes before the hex digits.
    const PREFIX: &'static str;
}

/// `PREFIX` + 2 × N lowercase hex digits as N bytes, or any other text as
/// written.
pub struct HexText<P: Prefix, const N: usize> {
    repr: Repr<N>,
    prefix: PhantomData<P>,
}

#[derive(Clone, PartialEq, Eq, Hash)]
enum Repr<const N: usize> {
    Bytes([u8; N]),
    Text(Box<str>),
}

impl<P: Prefix, const N: usize> HexText<P, N> {
    /// The identifier of `text`.
    pub fn new(text: &str) -> Self {
        let repr = match Self::parse_bytes(text) {
            Some(bytes) => Repr::Bytes(bytes),
            None => Repr::Text(text.into()),
        };
        Self {
            repr,
            prefix: PhantomData,
        }
    }

    /// The identifier `PREFIX` + hex of `bytes`.
    pub fn from_bytes(bytes: [u8; N]) -> Self {
        Self {
            repr: Repr::Bytes(bytes),
            prefix: PhantomData,
        }
    }

    fn parse_bytes(text: &str) -> Option<[u8; N]> {
        let digits = text.strip_prefix(P::PREFIX)?.as_bytes();
        if digits.len() != 2 * N {
            return None;
        }
        let mut bytes = [0u8; N];
        for (byte, pair) in bytes.iter_mut().zip(digits.chunks_exact(2)) {
            *byte = (lower_hex_digit(pair[0])? << 4) | lower_hex_digit(pair[1])?;
        }
        Some(bytes)
    }

    /// The identifier's bytes, when it has the prefix and hex form.
    pub fn bytes(&self) -> Option<&[u8; N]> {
        match &self.repr {
            Repr::Bytes(bytes) => Some(bytes),
            Repr::Text(_) => None,
        }
    }

    /// The identifier as text, exactly as it was read or made.
    pub fn to_text(&self) -> String {
        self.to_string()
    }
}

fn lower_hex_digit(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    }
}

impl<P: Prefix, const N: usize> fmt::Display for HexText<P, N> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.repr {
            Repr::Text(text) => f.write_str(text),
            Repr::Bytes(bytes) => {
                f.write_str(P::PREFIX)?;
                bytes.iter().try_for_each(|b| write!(f, "{b:02x}"))
            }
        }
    }
}

impl<P: Prefix, const N: usize> fmt::Debug for HexText<P, N> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{self:?}", self = self.to_string())
    }
}

impl<P: Prefix, const N: usize> Clone for HexText<P, N> {
    fn clone(&self) -> Self {
        Self {
            repr: self.repr.clone(),
            prefix: PhantomData,
        }
    }
}

impl<P: Prefix, const N: usize> PartialEq for HexText<P, N> {
    fn eq(&self, other: &Self) -> bool {
        self.repr == other.repr
    }
}

impl<P: Prefix, const N: usize> Eq for HexText<P, N> {}

impl<P: Prefix, const N: usize> std::hash::Hash for HexText<P, N> {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.repr.hash(state);
    }
}

/// Orders as the text does: lowercase hex sorts like the bytes it spells.
impl<P: Prefix, const N: usize> Ord for HexText<P, N> {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        match (&self.repr, &other.repr) {
            (Repr::Bytes(a), Repr::Bytes(b)) => a.cmp(b),
            _ => self.to_string().cmp(&other.to_string()),
        }
    }
}

impl<P: Prefix, const N: usize> PartialOrd for HexText<P, N> {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl<P: Prefix, const N: usize> PartialEq<str> for HexText<P, N> {
    fn eq(&self, text: &str) -> bool {
        match &self.repr {
            Repr::Text(own) => **own == *text,
            Repr::Bytes(bytes) => Self::parse_bytes(text).is_some_and(|b| b == *bytes),
        }
    }
}

impl<P: Prefix, const N: usize> PartialEq<String> for HexText<P, N> {
    fn eq(&self, text: &String) -> bool {
        *self == **text
    }
}

impl<P: Prefix, const N: usize> PartialEq<HexText<P, N>> for String {
    fn eq(&self, id: &HexText<P, N>) -> bool {
        *id == **self
    }
}

impl<P: Prefix, const N: usize> PartialEq<HexText<P, N>> for &str {
    fn eq(&self, id: &HexText<P, N>) -> bool {
        *id == **self
    }
}

impl<P: Prefix, const N: usize> PartialEq<&str> for HexText<P, N> {
    fn eq(&self, text: &&str) -> bool {
        *self == **text
    }
}

impl<P: Prefix, const N: usize> From<String> for HexText<P, N> {
    fn from(text: String) -> Self {
        Self::new(&text)
    }
}

impl<P: Prefix, const N: usize> From<&str> for HexText<P, N> {
    fn from(text: &str) -> Self {
        Self::new(text)
    }
}

impl<P: Prefix, const N: usize> Serialize for HexText<P, N> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de, P: Prefix, const N: usize> Deserialize<'de> for HexText<P, N> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = std::borrow::Cow::<'de, str>::deserialize(deserializer)?;
        Ok(Self::new(&text))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Tx;
    impl Prefix for Tx {
        const PREFIX: &'static str = "tx_";
    }
    type Id = HexText<Tx, 2>;

    #[test]
    fn the_hex_form_is_held_as_bytes_and_written_back_the_same() {
        let id = Id::new("tx_0aff");
        assert_eq!(id.bytes(), Some(&[0x0a, 0xff]));
        assert_eq!(id.to_string(), "tx_0aff");
        assert_eq!(id, *"tx_0aff");
        assert_eq!(Id::from_bytes([0x0a, 0xff]), id);
        assert_eq!(serde_json::to_string(&id).unwrap(), "\"tx_0aff\"");
        assert_eq!(serde_json::from_str::<Id>("\"tx_0aff\"").unwrap(), id);
    }

    #[test]
    fn any_other_text_is_kept_exactly_as_written() {
        for text in [
            "tx_0AFF", "tx_0af", "tx_0aff0", "0aff", "", "tx_0afg", "tx_é1",
        ] {
            let id = Id::new(text);
            assert_eq!(id.bytes(), None, "{text}");
            assert_eq!(id.to_string(), text);
            assert_eq!(id, *text);
            assert_ne!(id, *"tx_0aff");
        }
        assert_ne!(
            Id::new("tx_0AFF"),
            Id::new("tx_0aff"),
            "case is part of the text"
        );
        let escaped = serde_json::from_str::<Id>(r#""tx_\"q""#).unwrap();
        assert_eq!(escaped.to_string(), "tx_\"q");
    }

    #[test]
    fn it_sorts_as_its_text() {
        let mut texts = [
            "tx_ff00", "tx_0aff", "tx_0AFF", "tx_", "tx_0b", "tx_0a00", "u",
        ];
        let mut ids: Vec<Id> = texts.iter().map(|t| Id::new(t)).collect();
        texts.sort_unstable();
        ids.sort();
        let sorted: Vec<String> = ids.iter().map(Id::to_string).collect();
        assert_eq!(sorted, texts);
    }

    #[test]
    fn held_as_bytes_it_is_smaller_than_a_string() {
        assert!(std::mem::size_of::<HexText<Tx, 32>>() <= 40);
    }
}
