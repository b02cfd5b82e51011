//! The arrivals of one document that some peer may not hold yet, kept so
//! that health and metrics count provisional keys without a scan.
//!
//! A key is provisional while it has one allocation and that allocation's
//! arrival is past what every peer's copy of its document covers (see
//! [`super::Group::settled_through`]). Arrival numbers of a document are
//! consecutive, so the unsettled ones are a run at the end: this keeps that
//! run (the HLC time of each, for the oldest provisional allocation's age)
//! and, among them, the arrivals of keys that are in conflict, which are
//! conflicted rather than provisional. A sync that settles a prefix takes it
//! from the front. Memory: 8 bytes per allocation not yet on every peer.

use std::collections::{BTreeSet, VecDeque};

/// One document's unsettled arrivals.
#[derive(Debug, Default)]
pub(super) struct Unsettled {
    /// Arrival number of `hlc_ms[0]`.
    first: u64,
    /// HLC physical ms of each unsettled arrival, in arrival order.
    hlc_ms: VecDeque<u64>,
    /// Unsettled arrivals whose key has more than one allocation.
    conflicted: BTreeSet<u64>,
}

impl Unsettled {
    /// Arrival `arrival` (the next number) of an allocation stamped `hlc_ms`.
    pub fn arrived(&mut self, arrival: u64, hlc_ms: u64) {
        if self.hlc_ms.is_empty() {
            self.first = arrival;
        }
        self.hlc_ms.push_back(hlc_ms);
    }

    /// Every peer's copy covers arrivals up to `through`.
    pub fn settled_through(&mut self, through: u64) {
        while self.first <= through && self.hlc_ms.pop_front().is_some() {
            self.first += 1;
        }
        if self.conflicted.first().is_some_and(|&a| a <= through) {
            self.conflicted = self.conflicted.split_off(&through.saturating_add(1));
        }
    }

    /// The key of `arrival` now has more than one allocation.
    pub fn conflicted(&mut self, arrival: u64) {
        if (self.first..self.first + self.hlc_ms.len() as u64).contains(&arrival) {
            self.conflicted.insert(arrival);
        }
    }

    /// The key of `arrival` has one allocation again (its competitor
    /// expired): provisional until settled.
    pub fn unconflicted(&mut self, arrival: u64) {
        self.conflicted.remove(&arrival);
    }

    /// Provisional allocations among the unsettled arrivals.
    pub fn provisional(&self) -> u64 {
        (self.hlc_ms.len() - self.conflicted.len()) as u64
    }

    /// HLC ms of the first unsettled arrival that is provisional.
    pub fn oldest_provisional_ms(&self) -> Option<u64> {
        (self.first..)
            .zip(&self.hlc_ms)
            .find(|(arrival, _)| !self.conflicted.contains(arrival))
            .map(|(_, ms)| *ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_follow_arrivals_settlement_and_conflicts() {
        let mut u = Unsettled::default();
        for (arrival, ms) in [(1, 100), (2, 90), (3, 120), (4, 130)] {
            u.arrived(arrival, ms);
        }
        assert_eq!((u.provisional(), u.oldest_provisional_ms()), (4, Some(100)));
        u.conflicted(1);
        u.conflicted(9);
        assert_eq!((u.provisional(), u.oldest_provisional_ms()), (3, Some(90)));
        u.settled_through(2);
        assert_eq!((u.provisional(), u.oldest_provisional_ms()), (2, Some(120)));
        u.settled_through(10);
        assert_eq!((u.provisional(), u.oldest_provisional_ms()), (0, None));
        u.arrived(5, 140);
        assert_eq!((u.provisional(), u.oldest_provisional_ms()), (1, Some(140)));
        u.conflicted(5);
        assert_eq!(u.provisional(), 0);
        u.unconflicted(5);
        assert_eq!(u.provisional(), 1);
    }
}
