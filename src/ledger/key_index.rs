//! The key index of a shard: every allocation of each key, found by key.
//!
//! A plain `HashMap<Arc<str>, _>` rehashes every key each time it grows,
//! and hashing a key means reading its string from wherever it lives on
//! the heap: at a heal that brings 100 000 keys, those cache misses were
//! 3-4 % of the node's CPU, and at a million keys one growth of a shard's
//! table reads 125 000 key strings under the shard lock. Each entry here keeps its key's
//! hash, so growing only moves entries. Keys are hashed with the standard
//! library's randomly seeded SipHash, as a `HashMap` would: they come from
//! clients and peers, so the hash must not be predictable.

use super::view::Allocation;
use hashbrown::HashTable;
use std::hash::{BuildHasher, RandomState};
use std::sync::Arc;

struct Entry {
    hash: u64,
    key: Arc<str>,
    allocations: Vec<Allocation>,
}

/// Allocations by key, each key's list in precedence order (kept by the caller).
#[derive(Default)]
pub(super) struct KeyIndex {
    table: HashTable<Entry>,
    hasher: RandomState,
}

impl KeyIndex {
    fn hash(&self, key: &str) -> u64 {
        self.hasher.hash_one(key)
    }

    /// The allocations of `key`, if it has any.
    pub fn get(&self, key: &str) -> Option<&Vec<Allocation>> {
        self.table
            .find(self.hash(key), |e| *e.key == *key)
            .map(|e| &e.allocations)
    }

    /// The allocations of `key`, to change in place.
    pub fn get_mut(&mut self, key: &str) -> Option<&mut Vec<Allocation>> {
        let hash = self.hash(key);
        self.table
            .find_mut(hash, |e| *e.key == *key)
            .map(|e| &mut e.allocations)
    }

    /// The allocations of `key`, an empty list made for it if it has none.
    pub fn list_for(&mut self, key: &Arc<str>) -> &mut Vec<Allocation> {
        let hash = self.hash(key);
        &mut self
            .table
            .entry(hash, |e| e.key == *key, |e| e.hash)
            .or_insert_with(|| Entry {
                hash,
                key: key.clone(),
                // Most keys keep one allocation: room for one, not the four
                // a first push reserves (about 120 bytes a key).
                allocations: Vec::with_capacity(1),
            })
            .into_mut()
            .allocations
    }

    /// Keeps the keys for which `keep` returns true; `keep` may also change
    /// a key's list.
    pub fn retain(&mut self, mut keep: impl FnMut(&str, &mut Vec<Allocation>) -> bool) {
        self.table.retain(|e| keep(&e.key, &mut e.allocations));
    }

    /// Every key's allocations, in no particular order.
    #[cfg(test)]
    pub fn values(&self) -> impl Iterator<Item = &Vec<Allocation>> {
        self.table.iter().map(|e| &e.allocations)
    }

    /// Keys with at least one allocation.
    pub fn len(&self) -> usize {
        self.table.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hlc::Timestamp;
    use crate::record::AllocationRecord;
    use crate::storage::Durable;

    fn allocation(key: &str) -> Allocation {
        Allocation {
            epoch: 0,
            replayed_here: false,
            arrival: 0,
            durable: Durable::Store(0),
            record: Arc::new(AllocationRecord {
                v: 1,
                key: key.into(),
                txn_id: format!("tx-{key}").into(),
                region: "r".into(),
                node: "n".into(),
                hlc: Timestamp::new(1, 0),
                fingerprint: "f".into(),
                confidence: 1.0,
            }),
        }
    }

    #[test]
    fn keys_are_found_after_the_table_grew_and_shrank() {
        let mut index = KeyIndex::default();
        let keys: Vec<Arc<str>> = (0..5_000).map(|i| format!("key-{i}").into()).collect();
        for key in &keys {
            index.list_for(key).push(allocation(key));
        }
        // A second list_for finds the same list rather than making one.
        index.list_for(&keys[7]).push(allocation(&keys[7]));
        assert_eq!(index.len(), 5_000);
        assert_eq!(index.get("key-7").map(Vec::len), Some(2));
        assert!(index.get("key-5000").is_none());
        index.retain(|key, _| !key.ends_with('3'));
        assert_eq!(index.len(), 4_500);
        assert!(index.get("key-13").is_none());
        index.get_mut("key-12").unwrap().clear();
        assert_eq!(index.get("key-12").map(Vec::len), Some(0));
        assert_eq!(index.values().map(Vec::len).sum::<usize>(), 4_500);
    }
}
