//! Network faults made from outside the node: a TCP relay put on a link
//! between two nodes, which a drill cuts, heals, slows, makes one-way and
//! watches.
//!
//! The design asks that multi-node behaviour be tested with faults made
//! outside the node (a proxy the test cuts, SIGKILL, a skewed clock), never
//! with a hidden switch in the product. Nodes dial only the addresses they
//! are given (`--peer`), so pointing each `--peer` at a [`Relay`] in front of
//! the real listen port forces every byte of that link through it: the node
//! runs exactly the code it runs in production and sees nothing but what a
//! real network would do to it (connections reset, silence in one
//! direction, latency). Nothing here reaches into a node; the only drill
//! inside the node is the documented `--drill-clock-offset`.
//!
//! One relay carries the connections one node dials to one other node, so a
//! link between two nodes is two relays (one per ordered pair), and a
//! partition is a set of cut relays. `oncemesh demo`, the multi-process
//! tests and the convergence benchmark all wire their nodes this way;
//! [`Cluster`] starts real node processes wired so (the demo's and the chaos
//! runner's launcher) and kills, pauses and restarts them. A full disk is
//! made the same way, from outside: a [`SmallDisk`] (a tmpfs) under a
//! node's data dir, filled and freed.
//!
//! Each relay runs on a thread of its own with a single-threaded tokio
//! runtime, so it behaves the same under a plain `#[test]`, any tokio
//! runtime flavour or none, and keeps forwarding while the caller's runtime
//! is busy. Dropping it stops the thread and closes every connection it
//! carries.

mod cluster;
mod disk;
mod forward;
mod relay;
mod state;

pub use cluster::{Cluster, ClusterError, NodeProcess};
pub use disk::{DiskError, SmallDisk};
pub use relay::Relay;

/// Which way bytes travel through a relay, seen from the node that dials.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Direction {
    /// From the dialing node to the target (the node it dialed).
    ToTarget,
    /// From the target back to the dialing node.
    ToDialer,
}

impl Direction {
    /// Both directions, in the order of [`Direction::index`].
    pub const BOTH: [Direction; 2] = [Direction::ToTarget, Direction::ToDialer];

    /// The other way.
    pub fn reverse(self) -> Direction {
        match self {
            Direction::ToTarget => Direction::ToDialer,
            Direction::ToDialer => Direction::ToTarget,
        }
    }

    /// Position in per-direction arrays.
    fn index(self) -> usize {
        match self {
            Direction::ToTarget => 0,
            Direction::ToDialer => 1,
        }
    }
}

/// Why a relay could not start.
#[derive(Debug, thiserror::Error)]
pub enum DrillError {
    /// No port could be bound on 127.0.0.1 for the relay to listen on.
    #[error("relay to {target}: cannot listen on 127.0.0.1: {source}")]
    Listen {
        /// Where the relay was to forward.
        target: std::net::SocketAddr,
        /// Cause.
        source: std::io::Error,
    },
    /// The relay's thread or its runtime could not be started.
    #[error("relay to {target}: cannot start its thread: {source}")]
    Thread {
        /// Where the relay was to forward.
        target: std::net::SocketAddr,
        /// Cause.
        source: std::io::Error,
    },
}
