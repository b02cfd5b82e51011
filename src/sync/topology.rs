//! Who syncs with whom: a bounded set of neighbours per node, the same on
//! every node for the same membership, and along which of them each
//! author's changes are pushed.
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
//! Changes are pushed eagerly along one spanning tree per author (breadth
//! first from the author over the overlay, ties broken by peer id, so every
//! node computes the same tree): a node forwards an author's changes only
//! to its children in that author's tree, which gives each change N − 1
//! pushes instead of one per overlay link. Anything a broken tree misses is
//! repaired by anti-entropy with the neighbours, and a change held back
//! longer than `crate::ledger::relay::RELAY_GRACE` goes along every link.

use super::engine::PeerKey;
use std::collections::{BTreeMap, BTreeSet, VecDeque};

/// The overlay as one node sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topology {
    /// This node's neighbours (every other member in a full mesh).
    pub neighbours: Vec<PeerKey>,
    /// Per neighbour, the authors whose changes this node pushes to it
    /// (`None`: every author's, as in a full mesh).
    pub forwards: Option<BTreeMap<PeerKey, BTreeSet<PeerKey>>>,
}

impl Topology {
    /// The overlay for `me` among `members` (which may or may not list `me`)
    /// with at most `fanout` neighbours (at least 2).
    pub fn new(me: &str, members: &[PeerKey], fanout: usize) -> Self {
        let mut all: Vec<PeerKey> = members.to_vec();
        all.push(me.to_owned());
        all.sort();
        all.dedup();
        if all.len() <= fanout.max(2) + 1 {
            return Self {
                neighbours: all.into_iter().filter(|m| m != me).collect(),
                forwards: None,
            };
        }
        let graph = overlay(&all, fanout.max(2) / 2);
        let neighbours: Vec<PeerKey> = graph
            .get(me)
            .map(|n| n.iter().cloned().collect())
            .unwrap_or_default();
        let mut forwards: BTreeMap<PeerKey, BTreeSet<PeerKey>> = neighbours
            .iter()
            .map(|n| (n.clone(), BTreeSet::new()))
            .collect();
        for author in &all {
            for (child, parent) in spanning_tree(&graph, author) {
                if parent == me {
                    if let Some(set) = forwards.get_mut(&child) {
                        set.insert(author.clone());
                    }
                }
            }
        }
        Self {
            neighbours,
            forwards: Some(forwards),
        }
    }

    /// Whether every member is a neighbour.
    pub fn is_full_mesh(&self) -> bool {
        self.forwards.is_none()
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

/// Breadth first from `root`: each other reachable member with its parent.
fn spanning_tree(
    graph: &BTreeMap<PeerKey, BTreeSet<PeerKey>>,
    root: &str,
) -> BTreeMap<PeerKey, PeerKey> {
    let mut parent: BTreeMap<PeerKey, PeerKey> = BTreeMap::new();
    let mut seen: BTreeSet<&str> = BTreeSet::from([root]);
    let mut queue = VecDeque::from([root.to_owned()]);
    while let Some(node) = queue.pop_front() {
        for next in graph.get(&node).into_iter().flatten() {
            if seen.insert(next.as_str()) {
                parent.insert(next.clone(), node.clone());
                queue.push_back(next.clone());
            }
        }
    }
    parent
}

#[cfg(test)]
mod tests {
    use super::*;

    fn members(n: usize) -> Vec<PeerKey> {
        (0..n).map(|i| format!("12D3KooWMember{i:04}")).collect()
    }

    #[test]
    fn a_small_cluster_is_the_full_mesh() {
        let all = members(7);
        let t = Topology::new(&all[2], &all, 6);
        assert!(t.is_full_mesh());
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

    #[test]
    fn each_authors_changes_reach_every_member_once_along_its_tree() {
        let all = members(60);
        let tops: BTreeMap<&str, Topology> = all
            .iter()
            .map(|m| (m.as_str(), Topology::new(m, &all, 6)))
            .collect();
        for author in &all {
            // Follow the pushes from the author: every member is reached,
            // and none twice.
            let mut reached: BTreeMap<&str, usize> = BTreeMap::from([(author.as_str(), 1)]);
            let mut queue = VecDeque::from([author.as_str()]);
            while let Some(node) = queue.pop_front() {
                let forwards = tops[node].forwards.as_ref().expect("bounded");
                for (to, authors) in forwards {
                    if authors.contains(author) {
                        *reached.entry(to.as_str()).or_default() += 1;
                        queue.push_back(to);
                    }
                }
            }
            assert_eq!(reached.len(), all.len(), "{author} misses members");
            assert!(reached.values().all(|&n| n == 1), "{author}: {reached:?}");
        }
    }
}
