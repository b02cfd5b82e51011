//! The compensation engine: each losing allocation is compensated by the
//! node that made it, and by no other, exactly once in effect.
//!
//! Every transition of the state machine ([`machine`]) is appended to the
//! durable compensation log and waited for before the engine acts on it, so
//! a crash at any point resumes from the log: an attempt that was running is
//! retried with the same idempotency key, which the receiver deduplicates.
//! The log also holds what the compensation is about ([`subject`]: the
//! loser's and the winner's records), so that one still being retried when
//! its key passes the retention and leaves the ledger runs on to its end.
//! After each transition the owner queues the state, and the engine writes
//! what is queued into the replicated ledger at each turn of its loop, so
//! every region's conflict report shows it.

//! All of it is one [`Compensations`] engine, which owns its state (the
//! registry of this node's compensations, the outbox of states to publish,
//! the inbox of keys whose conflicts changed) and holds narrow handles to
//! the ledger, storage and metrics.

pub mod action;
mod engine;
pub mod machine;
mod subject;

pub use engine::{Compensations, RetryError};
