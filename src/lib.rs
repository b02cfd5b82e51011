//! oncemesh keeps payment idempotency tokens exactly-once across regions
//! without a central coordinator.
//!
//! One node runs per region. Clients allocate a transaction for an
//! idempotency key at their local node; nodes replicate allocations to each
//! other as automerge documents over libp2p; when a merge shows one key
//! allocated in two regions, every node picks the same winner (smallest
//! hybrid-logical-clock stamp, then node id) and the loser's own node
//! compensates it, exactly once in effect.
//!
//! # Layout
//! - [`key`]: validation of keys and payloads, payload fingerprints over
//!   their RFC 8785 form ([`jcs`]).
//! - [`time`]: the clock the logic takes as an input (wall, drill, virtual).
//! - [`hlc`]: the hybrid logical clock.
//! - [`anomaly`]: rolling baselines that flag indicators above their normal.
//! - [`record`]: the replicated records (JSON inside automerge);
//!   [`hex_text`]: their hex identifiers, held as bytes.
//! - [`ledger`]: sharded automerge documents plus the in-memory index of
//!   every key's allocations; conflicts, winners, settlement. No I/O.
//! - [`storage`]: redb with group commit; the durability watermark.
//! - [`confidence`]: the calibrated model of how likely a provisional
//!   allocation is not a duplicate, and the score of how well it held.
//! - [`exposure`]: expected duplicates and value at risk of provisional
//!   allocations.
//! - [`compensation`]: the state machine, its durable log, the actions, and
//!   the engine that owns this node's compensations.
//! - [`peers`]: what this node knows of each peer, and the replication lag.
//! - [`estimator`]: the node's one confidence model, its calibration score
//!   and the pricing, fed by what the node observes.
//! - [`allocator`]: the allocation path, from request to durable answer.
//! - [`health`]: the health verdict and the indicators behind it.
//! - [`sync`]: replication with no I/O: the policy engine, the messages,
//!   the work each step does on the ledger.
//! - [`p2p`]: the libp2p swarm (a shell around [`sync`]) and the wire codec.
//! - [`identity`]: the node's libp2p key in its data dir (its peer id).
//! - [`node`]: wires everything together (each subsystem gets the handles
//!   it needs, not the node) and owns shutdown; only [`cli`] imports it.
//! - [`http`]: the JSON API; [`client`]: a typed client of it; [`cli`]: the
//!   `oncemesh` command line.
//! - [`sim`]: the deterministic simulator of a whole cluster; [`check`]: the
//!   recorded history of a run and the checker it shares with [`chaos`],
//!   the runner of real node processes under faults made from outside.
//! - [`metrics`]: Prometheus metrics; [`config`]: flags and TOML.
//! - [`tls`]: the rustls provider every HTTP client uses.
//! - [`drill`]: a TCP relay that makes network faults from outside the
//!   nodes (the demo, the tests and the benchmarks put one on every link),
//!   and a small filesystem to fill under a node's data dir.
#![deny(missing_docs)]

pub mod allocator;
pub mod anomaly;
pub mod chaos;
pub mod check;
pub mod cli;
pub mod client;
pub mod compensation;
pub mod confidence;
pub mod config;
pub mod drill;
pub mod estimator;
pub mod exposure;
pub mod group_commit;
pub mod health;
pub mod hex_text;
pub mod hlc;
pub mod http;
pub mod identity;
pub mod jcs;
pub mod journal;
pub mod key;
pub mod ledger;
pub mod metrics;
pub mod node;
pub mod p2p;
pub mod peers;
pub mod record;
pub mod sim;
pub mod storage;
pub mod sync;
pub mod time;
pub mod tls;
