//! The situation an allocation is made in.
//!
//! Customers fail over to another region exactly when their region is in
//! trouble: a request that times out in a region cut off from the others is
//! retried elsewhere. Cross-region attempts are therefore likelier during a
//! partition than in calm times, and the model estimates how much likelier
//! separately for each situation.

use super::PeerView;
use serde::{Deserialize, Serialize};

/// Where this node stood towards its peers when it made an allocation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Situation {
    /// Every peer reachable (possibly still catching up).
    InSync,
    /// Some peers unreachable, at least one reachable: this node's customers
    /// are served as usual, and customers of a cut-off region may fail over here.
    Partial,
    /// Every peer unreachable: this node's own customers may be the ones
    /// timing out and failing over.
    Isolated,
}

impl Situation {
    /// Every situation, in table order.
    pub const ALL: [Situation; 3] = [Situation::InSync, Situation::Partial, Situation::Isolated];

    /// The situation given each peer's view; no peers is in sync.
    pub fn of(peers: &[PeerView]) -> Self {
        let unreachable = peers.iter().filter(|p| !p.connected).count();
        if unreachable == 0 {
            Situation::InSync
        } else if unreachable == peers.len() {
            Situation::Isolated
        } else {
            Situation::Partial
        }
    }

    /// Position in [`Situation::ALL`].
    pub fn index(self) -> usize {
        self as usize
    }

    /// Text form, as in the API and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Situation::InSync => "in-sync",
            Situation::Partial => "partial",
            Situation::Isolated => "isolated",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn view(connected: bool) -> PeerView {
        PeerView {
            staleness: Duration::from_secs(if connected { 0 } else { 30 }),
            connected,
            behind: Duration::ZERO,
        }
    }

    #[test]
    fn situations_follow_reachability() {
        assert_eq!(Situation::of(&[]), Situation::InSync);
        assert_eq!(Situation::of(&[view(true), view(true)]), Situation::InSync);
        assert_eq!(
            Situation::of(&[view(true), view(false)]),
            Situation::Partial
        );
        assert_eq!(
            Situation::of(&[view(false), view(false)]),
            Situation::Isolated
        );
        for (i, s) in Situation::ALL.iter().enumerate() {
            assert_eq!(s.index(), i);
        }
    }
}
