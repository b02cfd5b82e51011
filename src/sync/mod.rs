//! Replication between nodes, with no I/O: the policy ([`engine`]), the
//! messages ([`message`]) and the work each step does on the ledger
//! ([`work`]). The swarm's event loop (`crate::p2p`) and the simulator are
//! shells around these: they move bytes and time, nothing else.

pub mod engine;
pub mod message;
pub mod topology;
pub mod work;

pub use engine::{Action, BuildOrder, Engine, Input, PeerKey};
pub use topology::Topology;
