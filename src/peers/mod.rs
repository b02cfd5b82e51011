//! What this node knows of its allowlisted peers: their status (connection,
//! sync, clock offset, message counts) and the replication lag towards each.
//! Written by the swarm's shell, the allocation path and the sampling round;
//! read by health, the API, the metrics and the confidence model. It lives
//! apart from [`crate::p2p`] so that those readers need not depend on the
//! swarm.

pub mod lag;
pub mod status;
