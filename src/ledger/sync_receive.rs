//! Receiving an automerge sync message without walking the whole history.
//!
//! automerge 0.12's `receive_sync_message` trims the session's
//! `sent_hashes` by visiting every ancestor of the peer's heads, on every
//! message, even when nothing is left to trim: a cost that grows with the
//! number of changes in the document. A document takes a change per folding
//! round (40 a second under load), so within an hour every received message
//! cost milliseconds (4 ms at 64 000 changes, against 6 µs here).
//!
//! [`receive`] hands automerge the message with a stand-in head it cannot
//! know, so its walk starts from nothing, and then records the peer's real
//! heads in the sync state the way automerge does. `sent_hashes` is trimmed
//! of the hashes the peer names as its heads only; a hash left there just
//! keeps a change the peer already has from being sent again. Past
//! [`MAX_UNTRIMMED`] hashes (or for a message without heads, which resets the
//! session) automerge's own receive runs and trims them all.

use automerge::sync::{self, SyncDoc};
use automerge::{Automerge, AutomergeError, ChangeHash, PatchLog};

/// `sent_hashes` left untrimmed before automerge's full trim runs once.
pub const MAX_UNTRIMMED: usize = 1024;

/// A head no document has: hashes are SHA-256 of change bytes.
const UNKNOWN_HEAD: ChangeHash = ChangeHash([0; 32]);

/// Most probes per hash a bloom filter of a peer may ask for (automerge
/// writes 7). Each probe of each hash costs a step when the next message is
/// generated, and automerge reserves memory for all of them at once.
pub const MAX_BLOOM_PROBES: u64 = 64;
/// Largest bloom filter a peer may send, bytes (16 MiB: some 13 million
/// changes at automerge's 10 bits each). automerge's probe arithmetic is
/// 32-bit and overflows on a filter past 256 MiB.
pub const MAX_BLOOM_BYTES: usize = 1 << 24;

/// Why `message` must not reach automerge, if it must not: a bloom filter
/// automerge 0.12 would divide by zero over (entries but no bits), loop and
/// allocate over (billions of probes), or overflow on. The filter is only
/// read when our next message to the peer is generated, so this is checked
/// on receipt, where the message can still be refused and counted.
pub fn unusable_bloom(message: &sync::Message) -> Option<String> {
    for have in &message.have {
        let bytes = have.bloom.to_bytes();
        let mut rest = bytes.as_slice();
        let mut next = || leb128::read::unsigned(&mut rest).ok();
        let (Some(entries), Some(bits_per_entry), Some(probes)) = (next(), next(), next()) else {
            if bytes.is_empty() {
                continue; // No entries: automerge never probes it.
            }
            return Some("a bloom filter whose header does not read".into());
        };
        let bits = rest.len();
        if entries > 0 && bits == 0 {
            return Some(format!(
                "a bloom filter of {entries} entries with no bits ({bits_per_entry} per entry)"
            ));
        }
        if probes > MAX_BLOOM_PROBES {
            return Some(format!(
                "a bloom filter with {probes} probes per hash (at most {MAX_BLOOM_PROBES})"
            ));
        }
        if bits > MAX_BLOOM_BYTES {
            return Some(format!(
                "a bloom filter of {bits} bytes (at most {MAX_BLOOM_BYTES})"
            ));
        }
    }
    None
}

/// Receives one sync message into `doc`, logging patches into `log`, with
/// the same effect on `doc` and `state` as automerge's
/// `receive_sync_message_log_patches` (except that `sent_hashes` may keep
/// hashes the peer already has).
pub fn receive(
    doc: &mut Automerge,
    state: &mut sync::State,
    mut message: sync::Message,
    log: &mut PatchLog,
) -> Result<(), AutomergeError> {
    if message.heads.is_empty() || state.sent_hashes.len() > MAX_UNTRIMMED {
        return doc.receive_sync_message_log_patches(state, message, log);
    }
    let heads = std::mem::replace(&mut message.heads, vec![UNKNOWN_HEAD]);
    let heads_before = doc.get_heads();
    let no_changes = message.changes.is_empty();
    state.sent_hashes.retain(|h| !heads.contains(h));
    doc.receive_sync_message_log_patches(state, message, log)?;

    // What automerge does with the heads once the changes are applied.
    if no_changes && heads == heads_before {
        state.last_sent_heads.clone_from(&heads);
    }
    let known: Vec<ChangeHash> = heads
        .iter()
        .filter(|h| doc.get_change_meta_by_hash(h).is_some())
        .copied()
        .collect();
    if known.len() == heads.len() {
        state.shared_heads.clone_from(&heads);
    } else {
        state.shared_heads.extend(known);
        state.shared_heads.sort();
        state.shared_heads.dedup();
    }
    state.their_heads = Some(heads);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use automerge::transaction::Transactable;
    use automerge::ROOT;

    fn doc(actor: u8) -> Automerge {
        Automerge::new().with_actor(automerge::ActorId::from(&[actor; 16][..]))
    }

    fn put(doc: &mut Automerge, key: &str) {
        let mut tx = doc.transaction();
        tx.put(ROOT, key, "v").unwrap();
        tx.commit();
    }

    /// One side of a sync pair, received both ways: automerge's own receive
    /// and ours, on copies, so every state can be compared.
    struct Twin {
        doc: Automerge,
        ours: sync::State,
        theirs_doc: Automerge,
        theirs: sync::State,
    }

    impl Twin {
        fn new(doc: Automerge) -> Self {
            Self {
                theirs_doc: doc.clone(),
                doc,
                ours: sync::State::new(),
                theirs: sync::State::new(),
            }
        }

        fn put(&mut self, key: &str) {
            put(&mut self.doc, key);
            put(&mut self.theirs_doc, key);
        }

        /// The next message, checked to be the same from both copies.
        fn generate(&mut self) -> Option<sync::Message> {
            let ours = self.doc.generate_sync_message(&mut self.ours);
            let theirs = self.theirs_doc.generate_sync_message(&mut self.theirs);
            assert_eq!(
                ours.as_ref().map(|m| m.clone().encode()),
                theirs.map(|m| m.encode()),
                "both receives lead to the same next message"
            );
            ours
        }

        fn receive(&mut self, message: sync::Message) {
            let mut log = PatchLog::inactive();
            receive(&mut self.doc, &mut self.ours, message.clone(), &mut log).unwrap();
            self.theirs_doc
                .receive_sync_message(&mut self.theirs, message)
                .unwrap();
            let (a, b) = (&self.ours, &self.theirs);
            assert_eq!(self.doc.get_heads(), self.theirs_doc.get_heads());
            assert_eq!(a.shared_heads, b.shared_heads, "shared heads");
            assert_eq!(a.last_sent_heads, b.last_sent_heads, "last sent heads");
            assert_eq!(a.their_heads, b.their_heads, "their heads");
            assert_eq!(a.their_need, b.their_need, "their need");
            assert_eq!(a.in_flight, b.in_flight, "in flight");
            assert!(
                a.sent_hashes.is_superset(&b.sent_hashes),
                "never forgets a hash automerge keeps"
            );
        }
    }

    /// Exchanges messages until neither side has one.
    fn settle(a: &mut Twin, b: &mut Twin) {
        for _ in 0..20 {
            let mut quiet = true;
            if let Some(m) = a.generate() {
                b.receive(m);
                quiet = false;
            }
            if let Some(m) = b.generate() {
                a.receive(m);
                quiet = false;
            }
            if quiet {
                return;
            }
        }
        panic!("sync did not settle");
    }

    #[test]
    fn states_match_automerges_own_receive_through_concurrent_edits() {
        let mut a = Twin::new(doc(1));
        let mut b = Twin::new(doc(2));
        a.put("a0");
        settle(&mut a, &mut b);
        for round in 0..5 {
            // Both sides edit while messages cross.
            a.put(&format!("a{round}x"));
            let to_b = a.generate();
            b.put(&format!("b{round}"));
            let to_a = b.generate();
            if let Some(m) = to_b {
                b.receive(m);
            }
            a.put(&format!("a{round}y"));
            if let Some(m) = to_a {
                a.receive(m);
            }
            settle(&mut a, &mut b);
            assert_eq!(a.doc.get_heads(), b.doc.get_heads(), "round {round}");
        }
    }

    #[test]
    fn a_third_peers_changes_arrive_through_a_relay() {
        // c's changes reach a only through b: a sees heads it does not know.
        let mut a = Twin::new(doc(1));
        let mut b = Twin::new(doc(2));
        let mut c = doc(3);
        put(&mut c, "c0");
        put(&mut c, "c1");
        b.doc.merge(&mut c.clone()).unwrap();
        b.theirs_doc.merge(&mut c).unwrap();
        a.put("a0");
        settle(&mut a, &mut b);
        assert_eq!(a.doc.get_heads(), b.doc.get_heads());
        assert_eq!(a.doc.get_changes(&[]).len(), 3);
    }
}
