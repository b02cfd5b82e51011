//! Replication lag per peer: the time from an allocation here to the moment
//! the peer's digest of its document shows it. Pure bookkeeping, fed by the
//! allocation path, the folder and the in-sync comparisons, with times
//! passed in.
//!
//! Equal digests of a document mean the peer holds everything in it, but an
//! allocation is in its document only once the folder has written it
//! there; until then, equal digests say nothing about it. So allocations
//! wait in `unfolded` until a folding round that surely included them has
//! finished, and are then tagged with that round's number (its
//! *generation*). A comparison records the generation it started at: if
//! the digests were equal, every allocation of that document tagged with
//! that generation or before is on the peer. The errors all go one way:
//! an allocation is never taken as shown before it is, at worst a round
//! later.
//!
//! Per document only the oldest allocation of each round is kept, and at
//! most [`MAX_ROUNDS`] rounds (the oldest two merged into one beyond that,
//! which can only make the lag read longer), so a peer that is away for
//! hours costs a bounded amount of memory.

use crate::ledger::DocId;
use std::collections::{HashMap, VecDeque};

/// Most folding rounds remembered per document while some peer has not
/// shown them.
const MAX_ROUNDS: usize = 1024;

#[derive(Clone, Copy, Debug)]
struct Round {
    generation: u64,
    oldest_ms: u64,
}

/// The lag bookkeeping of a node: see the module docs.
#[derive(Debug, Default)]
pub struct LagTracker {
    unfolded: HashMap<DocId, u64>,
    generation: u64,
    rounds: HashMap<DocId, VecDeque<Round>>,
    /// Per peer and document, the generation its digest last showed.
    shown: HashMap<String, HashMap<DocId, u64>>,
}

impl LagTracker {
    /// Bookkeeping for the allowlisted `peers`.
    pub fn new(peers: impl IntoIterator<Item = String>) -> Self {
        Self {
            shown: peers.into_iter().map(|p| (p, HashMap::new())).collect(),
            ..Self::default()
        }
    }

    /// A new allocation in `doc` was acknowledged at `at_ms`.
    pub fn allocated(&mut self, doc: DocId, at_ms: u64) {
        let oldest = self.unfolded.entry(doc).or_insert(at_ms);
        *oldest = (*oldest).min(at_ms);
    }

    /// Called right before a folding round: the allocations it will surely
    /// write (an allocation is pending before it is acknowledged).
    pub fn take_unfolded(&mut self) -> HashMap<DocId, u64> {
        std::mem::take(&mut self.unfolded)
    }

    /// Called once the folding round that began with `take_unfolded`
    /// returned `batch` has finished: those allocations are in their
    /// documents now.
    pub fn folded(&mut self, batch: HashMap<DocId, u64>) {
        self.generation += 1;
        for (doc, oldest_ms) in batch {
            let rounds = self.rounds.entry(doc).or_default();
            rounds.push_back(Round {
                generation: self.generation,
                oldest_ms,
            });
            if rounds.len() > MAX_ROUNDS {
                if let Some(first) = rounds.pop_front() {
                    if let Some(next) = rounds.front_mut() {
                        next.oldest_ms = next.oldest_ms.min(first.oldest_ms);
                    }
                }
            }
        }
    }

    /// Folding rounds finished so far: read before a comparison starts.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// `peer`'s digest of `doc` was equal to ours in a comparison that
    /// started at `generation`.
    pub fn shown(&mut self, peer: &str, doc: DocId, generation: u64) {
        let Some(shown) = self.shown.get_mut(peer) else {
            return;
        };
        let at = shown.entry(doc).or_default();
        *at = (*at).max(generation);
        // Rounds every peer has shown are of no more use.
        let everyone = self
            .shown
            .values()
            .map(|docs| docs.get(&doc).copied().unwrap_or(0))
            .min()
            .unwrap_or(0);
        if let Some(rounds) = self.rounds.get_mut(&doc) {
            while rounds.front().is_some_and(|r| r.generation <= everyone) {
                rounds.pop_front();
            }
            if rounds.is_empty() {
                self.rounds.remove(&doc);
            }
        }
    }

    /// How long ago, at `now_ms`, the oldest allocation `peer` does not yet
    /// show was made, ms; 0 when it shows every one.
    pub fn lag_ms(&self, peer: &str, now_ms: u64) -> u64 {
        let shown = self.shown.get(peer);
        let oldest = self
            .rounds
            .iter()
            .filter_map(|(doc, rounds)| {
                let at = shown.and_then(|s| s.get(doc)).copied().unwrap_or(0);
                let i = rounds.partition_point(|r| r.generation <= at);
                rounds.range(i..).map(|r| r.oldest_ms).min()
            })
            .min();
        oldest.map_or(0, |t| now_ms.saturating_sub(t))
    }

    /// Forgets documents for which `live` is false (past the retention).
    pub fn retain(&mut self, live: impl Fn(DocId) -> bool) {
        self.rounds.retain(|doc, _| live(*doc));
        self.unfolded.retain(|doc, _| live(*doc));
        for docs in self.shown.values_mut() {
            docs.retain(|doc, _| live(*doc));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: DocId = DocId { epoch: 1, shard: 0 };
    const B: DocId = DocId { epoch: 1, shard: 1 };

    fn tracker() -> LagTracker {
        LagTracker::new(["p".to_owned(), "q".to_owned()])
    }

    fn fold(t: &mut LagTracker) {
        let batch = t.take_unfolded();
        t.folded(batch);
    }

    #[test]
    fn lag_runs_from_the_allocation_to_the_digest_that_shows_it() {
        let mut t = tracker();
        assert_eq!(t.lag_ms("p", 1000), 0);
        t.allocated(A, 1000);
        t.allocated(A, 1010);
        assert_eq!(t.lag_ms("p", 1050), 0, "not folded: not yet replicable");
        fold(&mut t);
        assert_eq!(t.lag_ms("p", 1050), 50);
        assert_eq!(t.lag_ms("q", 1050), 50);
        let g = t.generation();
        t.shown("p", A, g);
        assert_eq!(t.lag_ms("p", 1100), 0);
        assert_eq!(t.lag_ms("q", 1100), 100, "q has not shown it");
        t.shown("q", A, g);
        assert_eq!(t.lag_ms("q", 1100), 0);
        assert!(t.rounds.is_empty(), "rounds every peer showed are dropped");
    }

    #[test]
    fn a_comparison_that_began_before_a_fold_does_not_show_what_it_folded() {
        let mut t = tracker();
        t.allocated(A, 1000);
        let started_at = t.generation();
        fold(&mut t);
        t.shown("p", A, started_at);
        assert_eq!(t.lag_ms("p", 1200), 200);
        // An allocation acknowledged while a round ran waits for the next one.
        let batch = t.take_unfolded();
        t.allocated(B, 1300);
        t.folded(batch);
        t.shown("p", A, t.generation());
        t.shown("p", B, t.generation());
        assert_eq!(t.lag_ms("p", 1400), 0, "B is not in a finished round yet");
        fold(&mut t);
        assert_eq!(t.lag_ms("p", 1400), 100);
    }

    #[test]
    fn the_oldest_unshown_allocation_over_every_document_counts() {
        let mut t = tracker();
        t.allocated(A, 1000);
        fold(&mut t);
        t.allocated(B, 2000);
        t.allocated(A, 2500);
        fold(&mut t);
        let g = t.generation();
        t.shown("p", A, g);
        assert_eq!(t.lag_ms("p", 3000), 1000, "B's allocation at 2000");
        t.shown("p", B, g);
        assert_eq!(t.lag_ms("p", 3000), 0);
        assert_eq!(t.lag_ms("q", 3000), 2000);
        assert_eq!(
            t.lag_ms("stranger", 3000),
            2000,
            "unknown peers show nothing"
        );
    }

    #[test]
    fn a_peer_away_for_long_costs_bounded_memory_and_keeps_its_oldest_allocation() {
        let mut t = tracker();
        for i in 0..(3 * MAX_ROUNDS as u64) {
            t.allocated(A, 1000 + i);
            fold(&mut t);
            t.shown("p", A, t.generation());
        }
        assert_eq!(t.rounds[&A].len(), MAX_ROUNDS);
        assert_eq!(t.lag_ms("q", 10_000), 9000);
        assert_eq!(t.lag_ms("p", 10_000), 0);
        t.retain(|doc| doc != A);
        assert_eq!(t.lag_ms("q", 10_000), 0);
    }
}
