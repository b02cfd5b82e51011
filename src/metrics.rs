//! Prometheus metrics of a node: the leading indicators an operator watches
//! (store delta, clock skew, cross-region retries, compensations), not only
//! the duplicates themselves.
//!
//! Counters are bumped where events happen; gauges that mirror ledger state
//! are refreshed right before each scrape, so they cost nothing in between.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;

/// A label with one `kind` value.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Kind {
    /// What the sample counts.
    pub kind: String,
}

impl Kind {
    /// Label set for `kind`.
    pub fn of(kind: &str) -> Self {
        Self {
            kind: kind.to_owned(),
        }
    }
}

/// A label with one `currency` value.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Currency {
    /// The currency the amount is in, as payloads name it.
    pub currency: String,
}

/// A label with one `situation` value (in-sync, partial, isolated).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SituationLabel {
    /// The situation an allocation was made in.
    pub situation: String,
}

/// Every metric of the node, registered once at start.
pub struct Metrics {
    registry: Registry,
    /// Allocate requests by outcome: created, replay, mismatch, invalid, error.
    pub allocations: Family<Kind, Counter>,
    /// Replays answered with another region's allocation: cross-region retries.
    pub cross_region_replays: Counter,
    /// Conflicts first detected on this node.
    pub conflicts_detected: Counter,
    /// Keys currently in conflict.
    pub conflicts_open: Gauge,
    /// Keys with a single allocation not yet settled.
    pub provisional: Gauge,
    /// Age in seconds of the oldest provisional allocation.
    pub oldest_provisional_seconds: Gauge<f64, AtomicU64>,
    /// Fraction of keys that are settled.
    pub settled_ratio: Gauge<f64, AtomicU64>,
    /// Distinct keys held.
    pub keys: Gauge,
    /// Live ledger documents (shards times live time windows).
    pub documents: Gauge,
    /// Allocations dropped because they passed the retention, since start.
    pub expired_allocations: Gauge,
    /// Confidence given to new allocations.
    pub confidence_at_allocation: Histogram,
    /// Duration of each group commit (write + fsync), seconds.
    pub commit_seconds: Histogram,
    /// Jobs per group commit.
    pub commit_batch: Histogram,
    /// Duration of each journal group commit (write + fdatasync), seconds:
    /// what every new allocation waits for.
    pub journal_commit_seconds: Histogram,
    /// Entries per journal group commit.
    pub journal_commit_batch: Histogram,
    /// Allocations written into automerge documents per folding round.
    pub fold_batch: Histogram,
    /// Acknowledged allocations found only in the journal at start (the
    /// previous process stopped before folding them into a document).
    pub journal_recovered: Gauge,
    /// Journal entries whose allocations are not yet in durable document
    /// chunks (stays near one folding round's worth; growth means the
    /// folder or the store is falling behind).
    pub journal_backlog: Gauge,
    /// Remote HLC stamps further ahead than `max_clock_offset`.
    pub skew_violations: Gauge,
    /// Largest offset of a remote clock ahead of ours, milliseconds.
    pub max_clock_offset_ms: Gauge,
    /// Inbound connections refused because the peer is not allowlisted.
    pub refused_peers: Counter,
    /// Peer messages dropped: malformed, oversized, undecodable, by kind.
    pub dropped_messages: Family<Kind, Counter>,
    /// Sync messages sent to peers.
    pub sync_messages_sent: Counter,
    /// Sync payload bytes sent to peers.
    pub sync_bytes_sent: Counter,
    /// Sync payload bytes received from peers.
    pub sync_bytes_received: Counter,
    /// Peers currently connected.
    pub peers_connected: Gauge,
    /// Changes peers lack, summed over peers and shards.
    pub store_delta_changes: Gauge,
    /// Malformed records found in documents (skipped).
    pub malformed_records: Gauge,
    /// Compensation attempts by outcome: succeeded, failed, dead-lettered.
    pub compensations: Family<Kind, Counter>,
    /// Compensations of this node not yet finished.
    pub compensations_in_flight: Gauge,
    /// Compensations of this node waiting in the dead-letter state.
    pub compensations_dead_lettered: Gauge,
    /// Time from detection of a conflict to a succeeded compensation, seconds.
    pub compensation_seconds: Histogram,
    /// Expected duplicates among this node's provisional allocations.
    pub exposure_expected_duplicates: Gauge<f64, AtomicU64>,
    /// Value at risk of this node's provisional allocations, by currency.
    pub exposure_value_at_risk: Family<Currency, Gauge<f64, AtomicU64>>,
    /// Estimated chance that an allocation made in a situation meets a failover attempt.
    pub failover_rate: Family<SituationLabel, Gauge<f64, AtomicU64>>,
    /// Mean confidence minus the share without conflict over resolved allocations,
    /// by situation: positive means overconfident.
    pub calibration_gap: Family<SituationLabel, Gauge<f64, AtomicU64>>,
    /// Resolved allocations the calibration score counts, by situation.
    pub calibration_resolved: Family<SituationLabel, Gauge>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Registers every metric under the `oncemesh_` prefix.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("oncemesh");
        let m = Self {
            allocations: Family::default(),
            cross_region_replays: Counter::default(),
            conflicts_detected: Counter::default(),
            conflicts_open: Gauge::default(),
            provisional: Gauge::default(),
            oldest_provisional_seconds: Gauge::default(),
            settled_ratio: Gauge::default(),
            keys: Gauge::default(),
            documents: Gauge::default(),
            expired_allocations: Gauge::default(),
            confidence_at_allocation: Histogram::new([0.5, 0.9, 0.99, 0.999, 0.9999, 0.99999, 1.0]),
            commit_seconds: Histogram::new(exponential_buckets(0.0001, 2.0, 16)),
            commit_batch: Histogram::new(exponential_buckets(1.0, 2.0, 14)),
            fold_batch: Histogram::new(exponential_buckets(1.0, 2.0, 14)),
            journal_commit_seconds: Histogram::new(exponential_buckets(0.0001, 2.0, 16)),
            journal_commit_batch: Histogram::new(exponential_buckets(1.0, 2.0, 14)),
            journal_recovered: Gauge::default(),
            journal_backlog: Gauge::default(),
            skew_violations: Gauge::default(),
            max_clock_offset_ms: Gauge::default(),
            refused_peers: Counter::default(),
            dropped_messages: Family::default(),
            sync_messages_sent: Counter::default(),
            sync_bytes_sent: Counter::default(),
            sync_bytes_received: Counter::default(),
            peers_connected: Gauge::default(),
            store_delta_changes: Gauge::default(),
            malformed_records: Gauge::default(),
            compensations: Family::default(),
            compensations_in_flight: Gauge::default(),
            compensations_dead_lettered: Gauge::default(),
            compensation_seconds: Histogram::new(exponential_buckets(0.01, 2.0, 16)),
            exposure_expected_duplicates: Gauge::default(),
            exposure_value_at_risk: Family::default(),
            failover_rate: Family::default(),
            calibration_gap: Family::default(),
            calibration_resolved: Family::default(),
            registry: Registry::default(),
        };
        let r = &mut registry;
        r.register(
            "allocations",
            "Allocate requests by outcome",
            m.allocations.clone(),
        );
        r.register(
            "cross_region_replays",
            "Replays answered with another region's allocation",
            m.cross_region_replays.clone(),
        );
        r.register(
            "conflicts_detected",
            "Conflicts first detected on this node",
            m.conflicts_detected.clone(),
        );
        r.register(
            "conflicts_open",
            "Keys currently in conflict",
            m.conflicts_open.clone(),
        );
        r.register(
            "provisional_allocations",
            "Keys with one allocation not yet settled",
            m.provisional.clone(),
        );
        r.register(
            "oldest_provisional_age_seconds",
            "Age of the oldest provisional allocation",
            m.oldest_provisional_seconds.clone(),
        );
        r.register(
            "settled_ratio",
            "Fraction of keys that are settled",
            m.settled_ratio.clone(),
        );
        r.register("keys", "Distinct idempotency keys held", m.keys.clone());
        r.register("documents", "Live ledger documents", m.documents.clone());
        r.register(
            "expired_allocations",
            "Allocations dropped past the retention since start",
            m.expired_allocations.clone(),
        );
        r.register(
            "confidence_at_allocation",
            "Confidence given to new allocations",
            m.confidence_at_allocation.clone(),
        );
        r.register(
            "commit_seconds",
            "Group commit duration (write and fsync)",
            m.commit_seconds.clone(),
        );
        r.register(
            "commit_batch_jobs",
            "Jobs per group commit",
            m.commit_batch.clone(),
        );
        r.register(
            "journal_commit_seconds",
            "Journal group commit duration (write and fdatasync)",
            m.journal_commit_seconds.clone(),
        );
        r.register(
            "journal_commit_batch_entries",
            "Entries per journal group commit",
            m.journal_commit_batch.clone(),
        );
        r.register(
            "fold_batch_allocations",
            "Allocations written into documents per folding round",
            m.fold_batch.clone(),
        );
        r.register(
            "journal_recovered_allocations",
            "Acknowledged allocations recovered from the journal at start",
            m.journal_recovered.clone(),
        );
        r.register(
            "journal_backlog_entries",
            "Journal entries not yet in durable document chunks",
            m.journal_backlog.clone(),
        );
        r.register(
            "clock_skew_violations",
            "Remote stamps further ahead than max_clock_offset",
            m.skew_violations.clone(),
        );
        r.register(
            "max_clock_offset_observed_ms",
            "Largest remote clock offset ahead of ours",
            m.max_clock_offset_ms.clone(),
        );
        r.register(
            "refused_peers",
            "Connections refused: peer not in the allowlist",
            m.refused_peers.clone(),
        );
        r.register(
            "dropped_peer_messages",
            "Peer messages dropped, by kind",
            m.dropped_messages.clone(),
        );
        r.register(
            "sync_messages_sent",
            "Sync messages sent to peers",
            m.sync_messages_sent.clone(),
        );
        r.register(
            "sync_bytes_sent",
            "Sync payload bytes sent",
            m.sync_bytes_sent.clone(),
        );
        r.register(
            "sync_bytes_received",
            "Sync payload bytes received",
            m.sync_bytes_received.clone(),
        );
        r.register(
            "peers_connected",
            "Peers currently connected",
            m.peers_connected.clone(),
        );
        r.register(
            "store_delta_changes",
            "Changes connected peers lack, summed",
            m.store_delta_changes.clone(),
        );
        r.register(
            "malformed_records",
            "Malformed records skipped",
            m.malformed_records.clone(),
        );
        r.register(
            "compensations",
            "Compensation attempts by outcome",
            m.compensations.clone(),
        );
        r.register(
            "compensations_in_flight",
            "Own compensations not yet finished",
            m.compensations_in_flight.clone(),
        );
        r.register(
            "compensations_dead_lettered",
            "Own compensations dead-lettered",
            m.compensations_dead_lettered.clone(),
        );
        r.register(
            "compensation_seconds",
            "Detection to succeeded compensation",
            m.compensation_seconds.clone(),
        );
        r.register(
            "exposure_expected_duplicates",
            "Expected duplicates among own provisional allocations (sum of 1 - confidence)",
            m.exposure_expected_duplicates.clone(),
        );
        r.register(
            "exposure_value_at_risk",
            "Sum of (1 - confidence) x amount over own provisional allocations, by currency",
            m.exposure_value_at_risk.clone(),
        );
        r.register(
            "confidence_failover_rate",
            "Estimated chance that an allocation made in a situation meets a failover attempt",
            m.failover_rate.clone(),
        );
        r.register(
            "calibration_gap",
            "Mean confidence minus share without conflict over resolved allocations",
            m.calibration_gap.clone(),
        );
        r.register(
            "calibration_resolved_allocations",
            "Resolved own allocations counted by the calibration score",
            m.calibration_resolved.clone(),
        );
        Self { registry, ..m }
    }

    /// The Prometheus text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            tracing::error!(error = %e, "metrics encoding failed");
        }
        out
    }
}
