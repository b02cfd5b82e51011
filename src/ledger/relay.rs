//! Who authored a change, so that a node need not relay it to a peer its
//! author reaches directly.
//!
//! With three or more regions in a full mesh, the automerge sync protocol
//! sends every change along every link: node B forwards A's changes to C
//! while A sends them to C too, and C decodes and hashes both copies. After
//! a partition that doubled the bytes and much of the CPU of converging.
//! Each node therefore names itself in the first eight bytes of its actor
//! ids ([`NodeTag`]), reports which peers it is connected to, and holds back
//! from a peer the changes whose author is connected to both of them
//! ([`Withhold`]), even when the peer asks for it by hash (it sees the
//! author's heads in ours). A change held back longer than [`RELAY_GRACE`]
//! is sent anyway. Once either side reports the author gone it is sent at
//! the next round after the link settles (the event loop's `LINK_SETTLE`,
//! 2 s; at once when the author is gone from us).
//!
//! What is left to the authors, the automerge protocol still acknowledges:
//! every applied message changes our heads, and the new heads go back as a
//! message of their own. Between two followers of an allocating node that
//! was an endless exchange of messages carrying nothing but heads, a round
//! trip per change of the allocating node, most of each follower's sync
//! requests under load. A peer told our heads recently is therefore told
//! the next ones a little later ([`Withhold::heads`]), while any message
//! with changes in it goes at once.

use automerge::{ActorId, ChangeHash};
use std::collections::HashMap;
use std::time::Duration;

/// Longest a change is held back from a peer because its author should be
/// sending it: a safety net for an author whose link to that peer is up but
/// stuck, well above the second or two a whole partition takes to converge.
pub const RELAY_GRACE: Duration = Duration::from_secs(5);

/// Eight bytes naming a node: blake3 of its peer id. The same on every node,
/// so a receiver can tell who authored a change from its actor id.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodeTag(pub [u8; 8]);

impl NodeTag {
    /// The tag of the node with peer id `peer` (text form).
    pub fn of(peer: &str) -> Self {
        let hash = blake3::hash(peer.as_bytes());
        let mut tag = [0u8; 8];
        tag.copy_from_slice(&hash.as_bytes()[..8]);
        Self(tag)
    }

    /// A fresh actor id for this node: the tag, then eight random bytes, so
    /// a restarted process never reuses an actor (and its sequence numbers).
    pub fn new_actor(self) -> ActorId {
        let random = ActorId::random();
        let mut bytes = [0u8; 16];
        bytes[..8].copy_from_slice(&self.0);
        bytes[8..].copy_from_slice(&random.to_bytes()[..8]);
        ActorId::from(bytes.as_slice())
    }

    /// An actor of this node with a chosen suffix instead of a random one:
    /// for the deterministic simulator, where one seed must reproduce a
    /// run down to every change hash.
    pub fn actor_with(self, suffix: [u8; 8]) -> ActorId {
        let mut bytes = [0u8; 16];
        bytes[..8].copy_from_slice(&self.0);
        bytes[8..].copy_from_slice(&suffix);
        ActorId::from(bytes.as_slice())
    }

    /// The node that authored a change with this actor id, if the actor has
    /// the shape [`NodeTag::new_actor`] makes.
    pub fn of_actor(actor: &ActorId) -> Option<Self> {
        let bytes = actor.to_bytes();
        (bytes.len() == 16).then(|| {
            let mut tag = [0u8; 8];
            tag.copy_from_slice(&bytes[..8]);
            Self(tag)
        })
    }
}

/// What a sync message for one peer may leave out: changes authored by
/// these nodes, each connected to that peer.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Withhold {
    /// Authors whose changes the peer gets from them directly.
    pub authors: Vec<NodeTag>,
    /// Hold back a message that would carry only our heads (no changes, no
    /// request for changes): the peer was told them a moment ago and they
    /// can wait for the next round.
    pub heads: bool,
}

impl Withhold {
    /// Holds nothing back.
    pub fn nothing() -> Self {
        Self::default()
    }

    /// Whether a change by `actor` is left to its author.
    pub fn covers(&self, actor: &ActorId) -> bool {
        !self.authors.is_empty()
            && NodeTag::of_actor(actor).is_some_and(|t| self.authors.contains(&t))
    }
}

/// Per (peer, document): when each change now held back from the peer was
/// first held back, so that [`RELAY_GRACE`] can be enforced per change.
#[derive(Debug, Default)]
pub struct HeldBack {
    /// Wall-clock ms at which each change was first held back.
    first_held: HashMap<ChangeHash, u64>,
}

impl HeldBack {
    /// Of `hashes` (the changes a message would hold back now, at `now_ms`),
    /// those first held back less than [`RELAY_GRACE`] ago; forgets every
    /// other change.
    pub fn within_grace(&mut self, hashes: Vec<ChangeHash>, now_ms: u64) -> Vec<ChangeHash> {
        let grace = RELAY_GRACE.as_millis() as u64;
        let mut first_held = HashMap::with_capacity(hashes.len());
        let mut keep = Vec::with_capacity(hashes.len());
        for hash in hashes {
            // A clock stepped back restarts the grace at most: a change is
            // never held back for the size of the step.
            let since = self
                .first_held
                .get(&hash)
                .map_or(now_ms, |&t| t.min(now_ms));
            first_held.insert(hash, since);
            if now_ms.saturating_sub(since) < grace {
                keep.push(hash);
            }
        }
        self.first_held = first_held;
        keep
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_actor_names_its_node_and_is_fresh_each_time() {
        let tag = NodeTag::of("12D3KooWA");
        let (a, b) = (tag.new_actor(), tag.new_actor());
        assert_ne!(a, b);
        assert_eq!(NodeTag::of_actor(&a), Some(tag));
        assert_eq!(NodeTag::of_actor(&b), Some(tag));
        assert_ne!(NodeTag::of("12D3KooWB"), tag);
        assert_eq!(NodeTag::of_actor(&ActorId::from(b"short".as_slice())), None);
    }

    #[test]
    fn withhold_covers_only_the_listed_authors() {
        let a = NodeTag::of("a");
        let b = NodeTag::of("b");
        let w = Withhold {
            authors: vec![a],
            heads: false,
        };
        assert!(w.covers(&a.new_actor()));
        assert!(!w.covers(&b.new_actor()));
        assert!(!Withhold::nothing().covers(&a.new_actor()));
    }

    #[test]
    fn each_change_is_held_back_for_the_grace_at_most() {
        let (x, y) = (ChangeHash([1; 32]), ChangeHash([2; 32]));
        let (t0, grace) = (1_000_000, RELAY_GRACE.as_millis() as u64);
        let mut held = HeldBack::default();
        assert_eq!(held.within_grace(vec![x], t0), vec![x]);
        assert_eq!(held.within_grace(vec![x, y], t0 + grace / 2), vec![x, y]);
        // x's grace is over, y's is not.
        assert_eq!(held.within_grace(vec![x, y], t0 + grace), vec![y]);
        // A change no longer held back is forgotten: held again, it starts over.
        assert_eq!(held.within_grace(vec![], t0 + grace), vec![]);
        assert_eq!(held.within_grace(vec![x], t0 + grace * 2), vec![x]);
    }

    #[test]
    fn a_clock_stepped_back_holds_a_change_back_for_one_grace_at_most() {
        let x = ChangeHash([1; 32]);
        let (t0, grace) = (1_000_000, RELAY_GRACE.as_millis() as u64);
        let mut held = HeldBack::default();
        assert_eq!(held.within_grace(vec![x], t0), vec![x]);
        // The wall clock steps back five minutes.
        let back = t0 - 300_000;
        assert_eq!(held.within_grace(vec![x], back), vec![x]);
        assert_eq!(held.within_grace(vec![x], back + grace), vec![]);
    }
}
