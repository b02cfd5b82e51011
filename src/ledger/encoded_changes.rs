//! Changes kept in their encoded form, so that a sync message to each peer
//! reuses one encoding.
//!
//! automerge 0.12 keeps no change bytes: every change it sends is rebuilt
//! from its columnar op set and SHA-256 hashed again, once per peer. After
//! a partition a node sends each of its changes to every other region, and
//! that rebuilding was about 7 % of the CPU of converging. The bytes
//! exist once anyway, when a document hands its new changes to durable
//! storage; this keeps them, up to a byte budget per document (oldest
//! dropped first), and [`super::document::ShardDocument::generate_sync`]
//! puts them into messages itself. A change no longer held here is simply
//! rebuilt by automerge, as before.
//!
//! Which changes a message carries is still automerge's decision:
//! [`to_send`] computes the same set its sync protocol would (changes after
//! the peer's last sync that none of its bloom filters claim, their
//! dependents, and what it asked for by hash), and only the ones held here
//! are taken out of automerge's hands.

use automerge::sync::{ChunkList, Have, Message};
use automerge::{Automerge, ChangeHash};
use std::collections::{HashMap, HashSet, VecDeque};

/// Bytes kept per document: a region's share of one document after tens of
/// thousands of allocations in a partition, a few MiB per live document.
pub const BUDGET_BYTES: usize = 4 << 20;

/// Encoded changes by hash, oldest dropped first past [`BUDGET_BYTES`].
#[derive(Debug, Default)]
pub struct EncodedChanges {
    chunks: HashMap<ChangeHash, Vec<u8>>,
    order: VecDeque<ChangeHash>,
    bytes: usize,
}

impl EncodedChanges {
    /// Keeps `chunk`, the encoding of change `hash`.
    pub fn insert(&mut self, hash: ChangeHash, chunk: Vec<u8>) {
        if chunk.len() > BUDGET_BYTES || self.chunks.contains_key(&hash) {
            return;
        }
        self.bytes += chunk.len();
        self.chunks.insert(hash, chunk);
        self.order.push_back(hash);
        while self.bytes > BUDGET_BYTES {
            let Some(oldest) = self.order.pop_front() else {
                break;
            };
            if let Some(chunk) = self.chunks.remove(&oldest) {
                self.bytes -= chunk.len();
            }
        }
    }

    /// The encoding of `hash`, if kept.
    pub fn get(&self, hash: &ChangeHash) -> Option<&[u8]> {
        self.chunks.get(hash).map(Vec::as_slice)
    }

    /// Whether nothing is kept.
    pub fn is_empty(&self) -> bool {
        self.chunks.is_empty()
    }

    /// Drops everything (the document no longer takes new changes of ours).
    pub fn clear(&mut self) {
        *self = Self::default();
    }
}

/// The changes automerge's sync protocol sends a peer that sent us `have`
/// and `need` (automerge 0.12's `get_hashes_to_send`, through the public
/// API): every change since the peer's last sync that none of its bloom
/// filters claims, every change depending on one of those, and every
/// change it asked for by hash.
pub fn to_send(doc: &Automerge, have: &[Have], need: &[ChangeHash]) -> HashSet<ChangeHash> {
    if have.is_empty() {
        return need.iter().copied().collect();
    }
    let mut last_sync: Vec<ChangeHash> = have.iter().flat_map(|h| h.last_sync.clone()).collect();
    last_sync.sort_unstable();
    last_sync.dedup();
    let mut dependents: HashMap<ChangeHash, Vec<ChangeHash>> = HashMap::new();
    let mut send = HashSet::new();
    for meta in doc.get_changes_meta(&last_sync) {
        for dep in &meta.deps {
            dependents.entry(*dep).or_default().push(meta.hash);
        }
        if have.iter().all(|h| !h.bloom.contains_hash(&meta.hash)) {
            send.insert(meta.hash);
        }
    }
    let mut stack: Vec<ChangeHash> = send.iter().copied().collect();
    while let Some(hash) = stack.pop() {
        for dependent in dependents.get(&hash).into_iter().flatten() {
            if send.insert(*dependent) {
                stack.push(*dependent);
            }
        }
    }
    send.extend(need);
    send
}

/// `message` encoded with `extra` change chunks added to its changes, as
/// [`Message::encode`] would write the message holding them all. Every
/// chunk is copied once, into a buffer sized up front: putting them into
/// the message first would copy them twice more (into the message's own
/// vectors, then into a buffer that grows by doubling).
///
/// The layout is automerge's sync message v1: type byte, heads, need, have,
/// the changes (a LEB128 count, then each chunk with its LEB128 length),
/// then the flags. The parts before and after the changes come from
/// automerge's own encoder; a test checks the result byte for byte against
/// it.
pub fn encode_with<'a>(mut message: Message, extra: impl Iterator<Item = &'a [u8]>) -> Vec<u8> {
    let extra: Vec<&[u8]> = extra.collect();
    if extra.is_empty() {
        return message.encode();
    }
    // The changes automerge built itself go first, as they were.
    let built = std::mem::replace(&mut message.changes, ChunkList::empty());
    let chunks: Vec<&[u8]> = built.iter().chain(extra).collect();
    let flags = message.flags.take();
    let version = message.version.clone();
    // Ends in the change count 0, one byte.
    let before = message.encode();
    // Type byte, four empty lists (one byte each), then the flags.
    let after = Message {
        heads: Vec::new(),
        need: Vec::new(),
        have: Vec::new(),
        changes: ChunkList::empty(),
        flags,
        version,
    }
    .encode();
    let size: usize = chunks.iter().map(|c| c.len() + 10).sum();
    let mut out = Vec::with_capacity(before.len() + 10 + size + after.len());
    out.extend_from_slice(&before[..before.len() - 1]);
    write_leb128(&mut out, chunks.len());
    for chunk in chunks {
        write_leb128(&mut out, chunk.len());
        out.extend_from_slice(chunk);
    }
    out.extend_from_slice(&after[5..]);
    out
}

fn write_leb128(out: &mut Vec<u8>, n: usize) {
    // Writing into a Vec cannot fail.
    let _ = leb128::write::unsigned(out, n as u64);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hash(n: u8) -> ChangeHash {
        ChangeHash([n; 32])
    }

    #[test]
    fn a_message_with_chunks_added_encodes_as_automerge_encodes_it_whole() {
        use automerge::sync::{MessageFlags, State, SyncDoc};
        use automerge::transaction::Transactable;
        let mut doc = Automerge::new();
        let mut chunks = Vec::new();
        for i in 0..3 {
            doc.transact::<_, _, automerge::AutomergeError>(|tx| {
                tx.put(automerge::ROOT, format!("k{i}"), "x".repeat(200 * i))
            })
            .unwrap();
            chunks.push(doc.get_last_local_change().unwrap().raw_bytes().to_vec());
        }
        // A real message: heads, a bloom filter, flags.
        let real = doc.generate_sync_message(&mut State::new()).unwrap();
        assert!(real.flags.is_some() && !real.have.is_empty());
        let with_need = Message {
            need: doc.get_heads(),
            flags: Some(MessageFlags::new()),
            ..real.clone()
        };
        for (base, built) in [(real, 0), (with_need, 1)] {
            let mut whole = base.clone();
            whole.changes = chunks.clone().into();
            let mut partial = base;
            partial.changes = chunks[..built].to_vec().into();
            let extra = chunks[built..].iter().map(Vec::as_slice);
            assert_eq!(encode_with(partial, extra), whole.clone().encode());
            assert_eq!(Message::decode(&whole.encode()).unwrap().changes.len(), 3);
        }
        let alone = doc.generate_sync_message(&mut State::new()).unwrap();
        assert_eq!(
            encode_with(alone.clone(), std::iter::empty()),
            alone.encode()
        );
    }

    #[test]
    fn the_oldest_chunks_go_first_once_past_the_budget() {
        let mut kept = EncodedChanges::default();
        let quarter = vec![0u8; BUDGET_BYTES / 4];
        for n in 0..5 {
            kept.insert(hash(n), quarter.clone());
        }
        assert!(kept.get(&hash(0)).is_none(), "the oldest went first");
        for n in 1..5 {
            assert_eq!(kept.get(&hash(n)).map(<[u8]>::len), Some(quarter.len()));
        }
        kept.insert(hash(9), vec![0u8; BUDGET_BYTES + 1]);
        assert!(
            kept.get(&hash(9)).is_none(),
            "a chunk over the budget is not kept"
        );
        assert!(kept.get(&hash(1)).is_some(), "and evicts nothing");
        kept.clear();
        assert!(kept.is_empty());
    }
}
