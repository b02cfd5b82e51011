//! Settlement when a node does not sync with every other: what each member
//! held, gossiped as summaries, and what follows from them.
//!
//! A member's summary of a shard is, for each live document, its version
//! vector: automerge actor → highest sequence number held, taken under the
//! shard lock. Node X calls its allocation A (arrival `a` of document D)
//! settled with member M when some summary S of M, for the shard of D:
//!
//! 1. covers X's state as of an arrival count `n ≥ a` of D (a checkpoint:
//!    X's clock of D when it had counted `n` arrivals): M held A then;
//! 2. is covered by X's state now, for every document of the shard: X holds
//!    everything M held then, so any competitor M made before, or had
//!    received, is known here; after that moment M holds A, so M answers a
//!    retry of its key as a replay instead of allocating again.
//!
//! That is the rule of [`super::Ledger::mark_in_sync`] (identical copies at
//! one moment) generalised: identical copies satisfy both at once, with the
//! checkpoint taken now. Any summary of M will do, not only its latest, so a
//! summary that arrives late or twice settles nothing too early. What is
//! established per member is kept as the peer's `synced_arrival`, so the
//! key views, the provisional counts and the resolutions follow unchanged.
//!
//! Summaries travel with sync traffic to neighbours, who keep the newest of
//! every member and forward it (gossip). A summary is only as trustworthy
//! as the neighbour that forwards it: before runtime membership they must be
//! signed by their member (docs/ARCHITECTURE.md, "Not built yet").

use super::document::ShardDocument;
use automerge::{ActorId, ChangeHash};
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;

/// One document's version vector: actor → highest sequence number held
/// (the genesis, the same on every node, left out).
pub type Clock = BTreeMap<ActorId, u64>;

/// Whether `a` holds every change `b` holds.
pub fn covers(a: &Clock, b: &Clock) -> bool {
    b.iter()
        .all(|(actor, seq)| a.get(actor).is_some_and(|held| held >= seq))
}

/// What a member held of one shard at one moment: each live document's clock.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ShardSummary {
    /// Clock per epoch.
    pub epochs: BTreeMap<u32, Clock>,
}

/// What a member held of every shard, as it made it.
#[derive(Debug, Clone, PartialEq)]
pub struct Summary {
    /// The member (peer id, text form).
    pub member: String,
    /// Grows with each summary the member makes (its HLC), so the newest wins.
    pub stamp: u64,
    /// Per shard, in shard order.
    pub shards: Vec<ShardSummary>,
}

/// Most checkpoints a document keeps: enough for the arrivals of a few
/// seconds of summaries; the oldest goes first (what it would have settled
/// the newer ones settle a little later).
const MAX_CHECKPOINTS: usize = 64;

/// One document's clock, kept current from its heads, and its checkpoints.
#[derive(Debug, Default)]
pub(super) struct DocClock {
    clock: Clock,
    /// The heads `clock` is as of.
    heads: Vec<ChangeHash>,
    /// (arrival count, clock then), oldest first, none settled yet.
    checkpoints: VecDeque<(u64, Clock)>,
}

impl DocClock {
    /// Brings the clock up to `doc`'s heads; whether it changed.
    pub fn refresh(&mut self, doc: &ShardDocument) -> bool {
        let heads = doc.heads();
        if heads == self.heads {
            return false;
        }
        for (actor, seq) in doc.changes_since(&self.heads) {
            let held = self.clock.entry(actor).or_default();
            *held = (*held).max(seq);
        }
        self.heads = heads;
        true
    }

    /// The clock as of the last refresh.
    pub fn clock(&self) -> &Clock {
        &self.clock
    }

    /// Notes that the document had counted `arrivals` when its clock read
    /// as it does now.
    pub fn checkpoint(&mut self, arrivals: u64) {
        if self.checkpoints.back().is_some_and(|(n, _)| *n >= arrivals) {
            return;
        }
        if self.checkpoints.len() == MAX_CHECKPOINTS {
            self.checkpoints.pop_front();
        }
        self.checkpoints.push_back((arrivals, self.clock.clone()));
    }

    /// The most arrivals a member whose clock of this document is `theirs`
    /// is known to hold (0: none), `arrivals` being the count now.
    pub fn held_by(&self, theirs: &Clock, arrivals: u64) -> u64 {
        if covers(theirs, &self.clock) {
            return arrivals;
        }
        self.checkpoints
            .iter()
            .rev()
            .find(|(_, clock)| covers(theirs, clock))
            .map_or(0, |(n, _)| *n)
    }

    /// Every member holds arrivals up to `through`: older checkpoints
    /// cannot settle anything more.
    pub fn settled_through(&mut self, through: u64) {
        while self.checkpoints.front().is_some_and(|(n, _)| *n <= through) {
            self.checkpoints.pop_front();
        }
    }
}

/// Which members' summaries a shard still waits to cover.
#[derive(Debug, Default)]
pub(super) struct Waiting {
    /// Newest uncovered summary per member.
    pub summaries: HashMap<String, Arc<Summary>>,
    /// When a summary of each member was last found covered (wall ms).
    pub covered_at_ms: HashMap<String, u64>,
}

/// The gossip table: the newest summary of each member, this node's own,
/// and which of them each neighbour was sent.
#[derive(Debug, Default)]
pub(super) struct Gossip {
    latest: HashMap<String, Arc<Summary>>,
    /// Per neighbour: the stamp of each member's summary it was sent or sent us.
    told: HashMap<String, HashMap<String, u64>>,
}

impl Gossip {
    /// Keeps `summary` if it is the newest of its member, noting that
    /// `from` has it; whether it was new.
    pub fn offer(&mut self, from: Option<&str>, summary: &Arc<Summary>) -> bool {
        if let Some(from) = from {
            self.told
                .entry(from.to_owned())
                .or_default()
                .entry(summary.member.clone())
                .and_modify(|s| *s = (*s).max(summary.stamp))
                .or_insert(summary.stamp);
        }
        let newer = self
            .latest
            .get(&summary.member)
            .is_none_or(|s| s.stamp < summary.stamp);
        if newer {
            self.latest
                .insert(summary.member.clone(), Arc::clone(summary));
        }
        newer
    }

    /// The newest summary of `member`.
    pub fn latest(&self, member: &str) -> Option<Arc<Summary>> {
        self.latest.get(member).cloned()
    }

    /// The summaries `peer` has not been told of, now marked told.
    pub fn for_peer(&mut self, peer: &str) -> Vec<Arc<Summary>> {
        let told = self.told.entry(peer.to_owned()).or_default();
        let mut out = Vec::new();
        for (member, summary) in &self.latest {
            if member == peer || told.get(member).is_some_and(|&s| s >= summary.stamp) {
                continue;
            }
            told.insert(member.clone(), summary.stamp);
            out.push(Arc::clone(summary));
        }
        out.sort_by(|a, b| a.member.cmp(&b.member));
        out
    }

    /// A new session with `peer`: what it was sent may have been lost, so
    /// it is told every newest summary again.
    pub fn forget(&mut self, peer: &str) {
        self.told.remove(peer);
    }

    /// Whether `peer` has summaries to be told of.
    pub fn has_news_for(&self, peer: &str) -> bool {
        let told = self.told.get(peer);
        self.latest.iter().any(|(member, summary)| {
            member != peer
                && told
                    .and_then(|t| t.get(member))
                    .is_none_or(|&s| s < summary.stamp)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn actor(n: u8) -> ActorId {
        ActorId::from(&[n; 16][..])
    }

    fn clock(entries: &[(u8, u64)]) -> Clock {
        entries.iter().map(|&(a, s)| (actor(a), s)).collect()
    }

    #[test]
    fn a_clock_covers_what_it_holds_at_least_as_far() {
        let big = clock(&[(1, 3), (2, 1)]);
        assert!(covers(&big, &clock(&[(1, 2)])));
        assert!(covers(&big, &clock(&[])));
        assert!(!covers(&big, &clock(&[(1, 4)])));
        assert!(!covers(&big, &clock(&[(3, 1)])));
    }

    #[test]
    fn held_by_takes_the_newest_checkpoint_the_member_covers() {
        let mut d = DocClock {
            clock: clock(&[(1, 1)]),
            ..DocClock::default()
        };
        d.checkpoint(1);
        d.clock = clock(&[(1, 2)]);
        d.checkpoint(2);
        d.clock = clock(&[(1, 2), (2, 1)]);
        assert_eq!(d.held_by(&clock(&[]), 3), 0);
        assert_eq!(d.held_by(&clock(&[(1, 1), (2, 5)]), 3), 1);
        assert_eq!(d.held_by(&clock(&[(1, 2)]), 3), 2);
        assert_eq!(d.held_by(&clock(&[(1, 2), (2, 1)]), 3), 3, "it holds all");
        d.settled_through(1);
        assert_eq!(d.held_by(&clock(&[(1, 1)]), 3), 0, "pruned");
    }

    fn summary(member: &str, stamp: u64) -> Arc<Summary> {
        Arc::new(Summary {
            member: member.into(),
            stamp,
            shards: Vec::new(),
        })
    }

    #[test]
    fn gossip_keeps_the_newest_and_tells_each_neighbour_once() {
        let mut g = Gossip::default();
        assert!(g.offer(Some("b"), &summary("m", 5)));
        assert!(!g.offer(Some("c"), &summary("m", 4)), "older");
        assert!(!g.has_news_for("b"), "b sent it");
        assert!(g.has_news_for("c"), "c has only an older one");
        assert_eq!(g.for_peer("c").len(), 1);
        assert!(g.for_peer("c").is_empty());
        assert!(g.offer(None, &summary("c", 1)));
        assert!(g.for_peer("c").is_empty(), "its own summary");
        assert_eq!(g.for_peer("d").len(), 2);
    }
}
