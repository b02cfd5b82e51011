//! The ledger's side of settlement by summaries ([`super::coverage`]):
//! making this node's summary, taking in members' summaries, and what a
//! neighbour is to be told.

use super::coverage::{covers, ShardSummary, Summary};
use super::group::Group;
use super::{Ledger, Resolution, SHARD_COUNT};
use std::sync::Arc;

impl Ledger {
    /// This node's summary now: every live document's clock, shard by shard
    /// under its lock, each document's checkpoint taken at the same moment.
    /// The same summary again while nothing changed. Members' summaries that
    /// were waiting for this node to catch up are tried again.
    pub fn summary(&self) -> Arc<Summary> {
        let now = self.wall_ms();
        let mut shards = Vec::with_capacity(SHARD_COUNT);
        let mut resolved = Vec::new();
        for shard in 0..SHARD_COUNT {
            let mut guard = self.group(shard);
            let group = &mut *guard;
            let mut summary = ShardSummary::default();
            let mut changed = false;
            for (epoch, doc) in &mut group.docs {
                changed |= doc.clock.refresh(&doc.doc);
                doc.clock.checkpoint(doc.arrivals);
                summary.epochs.insert(*epoch, doc.clock.clock().clone());
            }
            if changed {
                let waiting: Vec<Arc<Summary>> =
                    group.waiting.summaries.values().cloned().collect();
                for s in waiting {
                    resolved.extend(self.take_in(group, &s, now));
                }
            }
            shards.push(summary);
        }
        self.hand_over(resolved);
        let mut gossip = self.gossip.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(last) = gossip.latest(&self.my_node) {
            if last.shards == shards {
                return last;
            }
        }
        let t = self.stamp();
        let summary = Arc::new(Summary {
            member: self.my_node.to_string(),
            stamp: t.physical_ms << 20 | u64::from(t.logical.min(0xF_FFFF)),
            shards,
        });
        gossip.offer(None, &summary);
        summary
    }

    /// Takes in summaries `from` a neighbour sent: the newest of each
    /// allowlisted member is kept (to forward) and settles what it can.
    /// A summary of a member not allowlisted, of this node, or not of
    /// every shard, is ignored.
    pub fn receive_summaries(&self, from: &str, summaries: &[Arc<Summary>]) {
        let fresh: Vec<Arc<Summary>> = {
            let mut gossip = self.gossip.lock().unwrap_or_else(|p| p.into_inner());
            summaries
                .iter()
                .filter(|s| {
                    s.shards.len() == SHARD_COUNT
                        && *s.member != *self.my_node
                        && self.peers.contains(&s.member)
                })
                .filter(|s| gossip.offer(Some(from), s))
                .cloned()
                .collect()
        };
        if fresh.is_empty() {
            return;
        }
        let now = self.wall_ms();
        let mut resolved = Vec::new();
        for shard in 0..SHARD_COUNT {
            let mut guard = self.group(shard);
            let group = &mut *guard;
            for doc in group.docs.values_mut() {
                doc.clock.refresh(&doc.doc);
            }
            for s in &fresh {
                resolved.extend(self.take_in(group, s, now));
            }
        }
        self.hand_over(resolved);
    }

    /// The summaries `peer` (a neighbour) has not been told of yet, marked told.
    pub fn summaries_for(&self, peer: &str) -> Vec<Arc<Summary>> {
        let mut gossip = self.gossip.lock().unwrap_or_else(|p| p.into_inner());
        gossip.for_peer(peer)
    }

    /// Whether `peer` has summaries to be told of.
    pub fn has_summaries_for(&self, peer: &str) -> bool {
        let gossip = self.gossip.lock().unwrap_or_else(|p| p.into_inner());
        gossip.has_news_for(peer)
    }

    /// When this node last held everything `member` held as of a summary of
    /// it, in every shard (wall ms; `None`: never yet): the staleness of a
    /// member that is not a neighbour.
    pub fn member_covered_at(&self, member: &str) -> Option<u64> {
        (0..SHARD_COUNT)
            .map(|shard| self.group(shard).waiting.covered_at_ms.get(member).copied())
            .try_fold(u64::MAX, |low, at| at.map(|at| low.min(at)))
    }

    /// Applies member `s.member`'s summary to `group` (clocks current):
    /// if this node holds everything it lists for the shard, each document's
    /// arrivals the member held count as synced with it; otherwise the
    /// summary waits for this node to catch up. Returns what settled.
    fn take_in(&self, group: &mut Group, s: &Arc<Summary>, now: u64) -> Vec<Resolution> {
        let Some(theirs) = s.shards.get(usize::from(group.shard)) else {
            return Vec::new();
        };
        let held = theirs.epochs.iter().all(|(epoch, clock)| {
            self.windows.expired(*epoch, now)
                || group
                    .docs
                    .get(epoch)
                    .map_or(clock.is_empty(), |d| covers(d.clock.clock(), clock))
        });
        let waiting = &mut group.waiting;
        if !held {
            let newer = waiting
                .summaries
                .get(&s.member)
                .is_none_or(|w| w.stamp < s.stamp);
            if newer {
                waiting.summaries.insert(s.member.clone(), Arc::clone(s));
            }
            return Vec::new();
        }
        if waiting
            .summaries
            .get(&s.member)
            .is_some_and(|w| w.stamp <= s.stamp)
        {
            waiting.summaries.remove(&s.member);
        }
        waiting.covered_at_ms.insert(s.member.clone(), now);
        let empty = Default::default();
        let mut epochs = Vec::new();
        for (epoch, doc) in &mut group.docs {
            let clock = theirs.epochs.get(epoch).unwrap_or(&empty);
            let through = doc.clock.held_by(clock, doc.arrivals);
            let synced = &mut doc
                .peers
                .entry(s.member.clone())
                .or_default()
                .synced_arrival;
            if through > 0 && synced.is_none_or(|n| n < through) {
                *synced = Some(through);
                epochs.push(*epoch);
            }
        }
        self.settle(group, &epochs)
    }

    /// Settles what every peer now holds of the documents of `epochs`
    /// (after a peer's synced arrivals rose); returns the resolutions.
    pub(super) fn settle(&self, group: &mut Group, epochs: &[u32]) -> Vec<Resolution> {
        let mut settled = Vec::new();
        for &epoch in epochs {
            if let Some(through) = group.settled_through(epoch, &self.peers) {
                group.settled(epoch, through);
                group.own.settled_through(epoch, through, &mut settled);
                if let Some(doc) = group.docs.get_mut(&epoch) {
                    doc.clock.settled_through(through);
                }
            }
        }
        settled
    }
}
