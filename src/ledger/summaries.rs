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
            stamp: (t.physical_ms << 20) | u64::from(t.logical.min(0xF_FFFF)),
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

#[cfg(test)]
mod tests {
    use super::super::{AllocateRequest, DiscardSink, NodeIdentity, Stored, Windows};
    use super::*;
    use crate::key::IdempotencyKey;
    use crate::time::ManualClock;

    /// Node `me` of the cluster {a, b, c}.
    fn ledger(me: &str, clock: &ManualClock) -> Ledger {
        let peers = ["a", "b", "c"].iter().filter(|p| **p != me);
        Ledger::open(
            NodeIdentity {
                region: me.into(),
                node: me.into(),
            },
            peers.map(|p| p.to_string()).collect(),
            Arc::new(clock.clone()),
            500,
            Windows::for_retention(600_000),
            Stored::default(),
            Arc::new(DiscardSink),
        )
        .unwrap()
    }

    fn allocate(ledger: &Ledger, amount: u32) {
        let key = IdempotencyKey::parse("the-key").unwrap();
        let out = ledger.allocate_batch(
            key.shard(SHARD_COUNT),
            &[AllocateRequest {
                key,
                fingerprint: crate::key::fingerprint(&serde_json::json!({ "amount": amount }))
                    .unwrap(),
                confidence: 0.9,
                stake: None,
            }],
        );
        assert!(out[0].is_ok());
        ledger.fold_pending();
    }

    fn send_all(from: &Ledger, to: &Ledger) {
        for (doc, _) in from.digests() {
            if let Some(bytes) = from.save_document(doc) {
                to.merge_bytes(doc, &bytes).unwrap();
            }
        }
    }

    fn settled(ledger: &Ledger) -> bool {
        ledger.key("the-key").is_some_and(|v| v.settled)
    }

    #[test]
    fn a_member_reached_only_through_a_neighbour_settles_once_it_holds_and_is_held() {
        let clock = ManualClock::at(1_800_000_000_000);
        let (a, b, c) = (
            ledger("a", &clock),
            ledger("b", &clock),
            ledger("c", &clock),
        );
        allocate(&a, 1);
        a.summary();
        send_all(&a, &b);
        // b holds it and a holds all b has; c's summary, forwarded by b,
        // lacks it.
        a.receive_summaries("b", &[b.summary(), c.summary()]);
        assert!(!settled(&a), "c does not hold it yet");
        assert!(a.member_covered_at("c").is_some(), "a holds all c had");
        send_all(&b, &c);
        // A forged or stale summary of a member outside the cluster counts for nothing.
        let stranger = Arc::new(Summary {
            member: "z".into(),
            ..(*c.summary()).clone()
        });
        a.receive_summaries("b", &[stranger]);
        assert!(!settled(&a));
        a.receive_summaries("b", &[c.summary()]);
        assert!(
            settled(&a),
            "every member holds it, and a holds all they had"
        );
    }

    #[test]
    fn a_member_whose_competitor_we_lack_settles_nothing_until_we_hold_it() {
        let clock = ManualClock::at(1_800_000_000_000);
        let (a, b, c) = (
            ledger("a", &clock),
            ledger("b", &clock),
            ledger("c", &clock),
        );
        allocate(&a, 1);
        allocate(&c, 2);
        a.summary();
        send_all(&a, &b);
        send_all(&a, &c);
        // c holds a's allocation, and its own competitor that a lacks.
        a.receive_summaries("b", &[b.summary(), c.summary()]);
        assert!(!settled(&a), "a does not hold all c had");
        send_all(&c, &a);
        assert_eq!(a.conflicts().len(), 1);
        a.receive_summaries("b", &[c.summary()]);
        assert!(!settled(&a), "a key in conflict is never settled");
    }
}
