//! Who syncs with whom: a bounded set of neighbours per node, the same on
//! every node for the same membership.
//!
//! Up to `fanout + 1` members the overlay is the full mesh (three regions
//! behave exactly as before). Beyond that, each node's neighbours are its
//! two neighbours on each of `fanout / 2` rings, every ring the members
//! sorted by blake3 of (ring, peer id): a union of random Hamiltonian
//! cycles, so the overlay is connected (each ring alone is), symmetric, of
//! degree at most `fanout`, and of small diameter (about log N / log
//! (fanout − 1): 4-5 hops for 200 members and a fanout of 6). A partition
//! that cuts some rings leaves the others; links that are down are redialled
//! and anti-entropy repairs what they missed.
//!
//! New changes go to every neighbour at once and each forwards them on
//! (a flood over the overlay: every change crosses each link about once,
//! about N × fanout / 2 pushes, against N × (N − 1) in the full mesh).
//! One spanning tree per author (Plumtree's eager push) was tried first:
//! fewer pushes in theory, but a change travels with its dependencies, and
//! a node can apply it only once those came along their own authors' trees,
//! so each hop waited for the slowest of several paths (at 50 nodes, 2.3 s
//! to every node against 0.9 s flooding) and asked for the missing ones
//! (more requests, not fewer).

use super::engine::PeerKey;
use std::collections::{BTreeMap, BTreeSet};

/// The overlay as one node sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topology {
    /// This node's neighbours (every other member in a full mesh).
    pub neighbours: Vec<PeerKey>,
    /// Whether every member is a neighbour.
    pub full_mesh: bool,
}

impl Topology {
    /// The overlay for `me` among `members` (which may or may not list `me`)
    /// with at most `fanout` neighbours (at least 2).
    pub fn new(me: &str, members: &[PeerKey], fanout: usize) -> Self {
        let mut all: Vec<PeerKey> = members.to_vec();
        all.push(me.to_owned());
        all.sort();
        all.dedup();
        if all.len() <= fanout.max(2).saturating_add(1) {
            return Self {
                neighbours: all.into_iter().filter(|m| m != me).collect(),
                full_mesh: true,
            };
        }
        let neighbours = overlay(&all, fanout.max(2) / 2)
            .remove(me)
            .map(|n| n.into_iter().collect())
            .unwrap_or_default();
        Self {
            neighbours,
            full_mesh: false,
        }
    }
}

/// Every member's neighbours: its two neighbours on each of `rings` rings.
fn overlay(all: &[PeerKey], rings: usize) -> BTreeMap<PeerKey, BTreeSet<PeerKey>> {
    let mut graph: BTreeMap<PeerKey, BTreeSet<PeerKey>> = BTreeMap::new();
    for ring in 0..rings.max(1) {
        let mut order: Vec<(blake3::Hash, &PeerKey)> = all
            .iter()
            .map(|m| {
                let mut h = blake3::Hasher::new();
                h.update(&(ring as u64).to_le_bytes());
                h.update(m.as_bytes());
                (h.finalize(), m)
            })
            .collect();
        order.sort_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
        let n = order.len();
        for i in 0..n {
            let (a, b) = (order[i].1, order[(i + 1) % n].1);
            graph.entry(a.clone()).or_default().insert(b.clone());
            graph.entry(b.clone()).or_default().insert(a.clone());
        }
    }
    graph
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::VecDeque;

    fn members(n: usize) -> Vec<PeerKey> {
        (0..n).map(|i| format!("12D3KooWMember{i:04}")).collect()
    }

    #[test]
    fn a_small_cluster_is_the_full_mesh() {
        let all = members(7);
        let t = Topology::new(&all[2], &all, 6);
        assert!(t.full_mesh);
        assert_eq!(t.neighbours.len(), 6);
        assert!(!t.neighbours.contains(&all[2]));
    }

    /// Hops from `root` to every member, over the neighbours each computes.
    fn eccentricity(all: &[PeerKey], root: &str, fanout: usize) -> Option<usize> {
        let mut dist: BTreeMap<&str, usize> = BTreeMap::from([(root, 0)]);
        let mut queue = VecDeque::from([root]);
        let tops: BTreeMap<&str, Topology> = all
            .iter()
            .map(|m| (m.as_str(), Topology::new(m, all, fanout)))
            .collect();
        while let Some(node) = queue.pop_front() {
            let d = dist[node];
            for next in &tops[node].neighbours {
                if !dist.contains_key(next.as_str()) {
                    dist.insert(next, d + 1);
                    queue.push_back(next);
                }
            }
        }
        (dist.len() == all.len()).then(|| dist.values().copied().max().unwrap_or(0))
    }

    #[test]
    fn a_large_cluster_is_bounded_symmetric_connected_and_shallow() {
        let all = members(200);
        let tops: Vec<Topology> = all.iter().map(|m| Topology::new(m, &all, 6)).collect();
        for (i, t) in tops.iter().enumerate() {
            assert!(t.neighbours.len() <= 6 && t.neighbours.len() >= 2, "{t:?}");
            for n in &t.neighbours {
                let j = all.iter().position(|m| m == n).expect("a member");
                assert!(tops[j].neighbours.contains(&all[i]), "not symmetric");
            }
        }
        let diameter = all
            .iter()
            .map(|m| eccentricity(&all, m, 6).expect("connected"))
            .max()
            .unwrap_or(0);
        assert!(diameter <= 6, "diameter {diameter}");
    }
}
