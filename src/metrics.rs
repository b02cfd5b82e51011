//! Prometheus metrics of a node: the leading indicators an operator watches
//! (store delta, clock skew, cross-region retries, compensations), not only
//! the duplicates themselves.
//!
//! Counters are bumped where events happen; gauges that mirror ledger state
//! are refreshed right before each scrape, so they cost nothing in between.
//! Per-peer series ([`PeerSeries`]) are written at each scrape from the
//! peer table, labelled `peer` (its id) and `region` (as the peer reports
//! it): one series per allowlisted peer, never more. The text is the
//! Prometheus exposition format 0.0.4, which every scraper and `promtool`
//! read.

use crate::peers::status::{PeerSamples, PeerStatus, PeerTable};
use crate::time::Clock;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;

/// The `Content-Type` of [`Metrics::encode`]'s text.
pub const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

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

/// A health reason's `code`, as a label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Code {
    /// The stable code (see docs/OPERATIONS.md).
    pub code: &'static str,
}

/// A baseline-judged indicator, as labels: `peer` and `region` are empty
/// for the node-wide near-miss rate.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct IndicatorLabels {
    /// lag, delta, clock_offset or near_miss_rate.
    pub indicator: &'static str,
    /// Peer id, or empty.
    pub peer: String,
    /// The peer's region as it reports it, or empty.
    pub region: String,
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
    /// Largest offset of a remote HLC stamp ahead of our clock, seconds.
    pub max_clock_offset_seconds: Gauge<f64, AtomicU64>,
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
    /// Compensations this node started (its allocations that lost).
    pub compensations_started: Counter,
    /// 0 ok, 1 degraded, 2 critical: the `status` of `/v1/health`.
    pub health_status: Gauge,
    /// Health reasons present now, by code (every known code, 0 when absent).
    pub health_reasons: Family<Code, Gauge>,
    /// Whether an indicator is anomalous against its baseline now (0 or 1).
    pub indicator_anomalous: Family<IndicatorLabels, Gauge>,
    /// The baseline (exponentially weighted mean) of each indicator.
    pub indicator_baseline: Family<IndicatorLabels, Gauge<f64, AtomicU64>>,
    /// The value above which each indicator counts as above its baseline.
    pub indicator_threshold: Family<IndicatorLabels, Gauge<f64, AtomicU64>>,
}

impl Metrics {
    /// Registers every metric under the `oncemesh_` prefix; `peers` writes
    /// the per-peer series.
    pub fn new(peers: PeerSeries) -> Self {
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
            max_clock_offset_seconds: Gauge::default(),
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
            compensations_started: Counter::default(),
            health_status: Gauge::default(),
            health_reasons: Family::default(),
            indicator_anomalous: Family::default(),
            indicator_baseline: Family::default(),
            indicator_threshold: Family::default(),
            registry: Registry::default(),
        };
        // Every outcome's series exists from the start, at 0, so rates and
        // alert rules over them have a series to work on before it happens.
        for kind in ["created", "replay", "mismatch", "invalid", "error"] {
            m.allocations.get_or_create(&Kind::of(kind)).inc_by(0);
        }
        for kind in ["succeeded", "failed", "dead-lettered"] {
            m.compensations.get_or_create(&Kind::of(kind)).inc_by(0);
        }
        let r = &mut registry;
        r.register_collector(Box::new(peers));
        r.register(
            "compensations_started",
            "Compensations this node started",
            m.compensations_started.clone(),
        );
        r.register(
            "health_status",
            "Health: 0 ok, 1 degraded, 2 critical",
            m.health_status.clone(),
        );
        r.register(
            "health_reasons",
            "Health reasons present now, by code",
            m.health_reasons.clone(),
        );
        r.register(
            "indicator_anomalous",
            "Indicator above its own baseline for the sustain time (1) or not (0)",
            m.indicator_anomalous.clone(),
        );
        r.register(
            "indicator_baseline",
            "Exponentially weighted mean of the indicator",
            m.indicator_baseline.clone(),
        );
        r.register(
            "indicator_threshold",
            "Value above which the indicator counts as above its baseline",
            m.indicator_threshold.clone(),
        );
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
            "Keys in conflict with a loser not compensated yet (as /v1/health's conflicts_open)",
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
            "max_clock_offset_observed_seconds",
            "Largest remote HLC stamp offset ahead of our clock",
            m.max_clock_offset_seconds.clone(),
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

    /// The Prometheus text exposition (format 0.0.4) of every metric.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if let Err(e) =
            prometheus_client::encoding::prometheus_text::encode(&mut out, &self.registry)
        {
            tracing::error!(error = %e, "metrics encoding failed");
        }
        out
    }
}

/// Labels of a per-peer series.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PeerLabels {
    peer: String,
    region: String,
}

/// Labels of a per-peer series that counts one way.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PeerDirection {
    peer: String,
    region: String,
    direction: &'static str,
}

/// Labels of a per-peer count of dropped messages.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PeerKind {
    peer: String,
    region: String,
    kind: &'static str,
}

/// The region label of a peer: as it last reported it, `unknown` before.
pub fn region_label(status: &PeerStatus) -> String {
    status.region.as_deref().unwrap_or("unknown").to_owned()
}

/// Writes the per-peer series at each scrape, from the peer table: the
/// labels are always the peer's current ones, and there are exactly as many
/// series as allowlisted peers.
#[derive(Clone)]
pub struct PeerSeries {
    /// The table the series come from.
    pub peers: Arc<PeerTable>,
    /// The node's clock, for the seconds since a peer was in sync.
    pub clock: crate::time::SharedClock,
    /// When the node started: a peer never in sync counts from here.
    pub started_ms: u64,
}

impl std::fmt::Debug for PeerSeries {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerSeries").finish_non_exhaustive()
    }
}

/// One per-peer family: a name, its help, its type, and how to write a
/// peer's samples of it.
struct PeerFamily {
    name: &'static str,
    help: &'static str,
    kind: MetricType,
    write: fn(
        &mut prometheus_client::encoding::MetricEncoder,
        &PeerLabels,
        &PeerStatus,
        &PeerSamples,
        &PeerSeries,
    ) -> std::fmt::Result,
}

fn gauge(
    e: &mut prometheus_client::encoding::MetricEncoder,
    labels: &PeerLabels,
    value: f64,
) -> std::fmt::Result {
    ConstGauge::new(value).encode(e.encode_family(labels)?)
}

fn counter(
    e: &mut prometheus_client::encoding::MetricEncoder,
    labels: &impl EncodeLabelSet,
    value: u64,
) -> std::fmt::Result {
    ConstCounter::new(value).encode(e.encode_family(labels)?)
}

fn both_ways(
    e: &mut prometheus_client::encoding::MetricEncoder,
    l: &PeerLabels,
    sent: u64,
    received: u64,
) -> std::fmt::Result {
    for (direction, value) in [("sent", sent), ("received", received)] {
        let labels = PeerDirection {
            peer: l.peer.clone(),
            region: l.region.clone(),
            direction,
        };
        counter(e, &labels, value)?;
    }
    Ok(())
}

const PEER_FAMILIES: &[PeerFamily] = &[
    PeerFamily {
        name: "peer_connected",
        help: "Whether a connection to the peer is open (1) or not (0)",
        kind: MetricType::Gauge,
        write: |e, l, s, _, _| gauge(e, l, f64::from(u8::from(s.connected))),
    },
    PeerFamily {
        name: "peer_seconds_since_in_sync",
        help:
            "Seconds since every document was identical here and on the peer (since start if never)",
        kind: MetricType::Gauge,
        write: |e, l, s, _, series| {
            let now = series.clock.now_ms();
            let since = s.last_in_sync_ms.unwrap_or(series.started_ms);
            gauge(e, l, now.saturating_sub(since) as f64 / 1000.0)
        },
    },
    PeerFamily {
        name: "peer_changes_they_lack",
        help: "Changes the peer lacks (store delta, our side)",
        kind: MetricType::Gauge,
        write: |e, l, s, _, _| gauge(e, l, s.they_lack_changes as f64),
    },
    PeerFamily {
        name: "peer_heads_we_lack",
        help: "Heads the peer announced that we have not seen (store delta, their side)",
        kind: MetricType::Gauge,
        write: |e, l, s, _, _| gauge(e, l, s.we_lack_heads as f64),
    },
    PeerFamily {
        name: "peer_replication_lag_now_seconds",
        help: "Age of the oldest allocation made here that the peer's digests do not show yet",
        kind: MetricType::Gauge,
        write: |e, l, s, _, _| gauge(e, l, s.lag_seconds),
    },
    PeerFamily {
        name: "peer_replication_lag_seconds",
        help: "Replication lag to the peer, sampled every sync round",
        kind: MetricType::Histogram,
        write: |e, l, _, h, _| h.lag_seconds.encode(e.encode_family(l)?),
    },
    PeerFamily {
        name: "peer_store_delta_changes",
        help: "Changes the peer lacks, sampled every sync round",
        kind: MetricType::Histogram,
        write: |e, l, _, h, _| h.delta_changes.encode(e.encode_family(l)?),
    },
    PeerFamily {
        name: "peer_clock_offset_seconds",
        help: "Measured offset of the peer's clock against ours (positive: ahead)",
        kind: MetricType::Gauge,
        write: |e, l, s, _, _| match s.clock_offset_ms {
            Some(ms) => gauge(e, l, ms as f64 / 1000.0),
            None => Ok(()),
        },
    },
    PeerFamily {
        name: "peer_clock_skew_violations",
        help: "Times the peer's clock was measured further ahead than max_clock_offset",
        kind: MetricType::Counter,
        write: |e, l, s, _, _| counter(e, l, s.skew_violations),
    },
    PeerFamily {
        name: "peer_sync_messages",
        help: "Sync requests exchanged with the peer, by direction",
        kind: MetricType::Counter,
        write: |e, l, s, _, _| both_ways(e, l, s.messages_sent, s.messages_received),
    },
    PeerFamily {
        name: "peer_sync_bytes",
        help: "Sync payload bytes exchanged with the peer, by direction",
        kind: MetricType::Counter,
        write: |e, l, s, _, _| both_ways(e, l, s.bytes_sent, s.bytes_received),
    },
    PeerFamily {
        name: "peer_dropped_messages",
        help: "Messages from the peer dropped, by kind",
        kind: MetricType::Counter,
        write: |e, l, s, _, _| {
            for (kind, value) in &s.dropped_by_kind {
                let labels = PeerKind {
                    peer: l.peer.clone(),
                    region: l.region.clone(),
                    kind,
                };
                counter(e, &labels, *value)?;
            }
            Ok(())
        },
    },
    PeerFamily {
        name: "peer_redial_attempts",
        help: "Redial attempts to the peer since start",
        kind: MetricType::Counter,
        write: |e, l, s, _, _| counter(e, l, s.redials_total),
    },
];

impl Collector for PeerSeries {
    fn encode(&self, mut encoder: DescriptorEncoder) -> std::fmt::Result {
        let peers = self.peers.with_samples();
        if peers.is_empty() {
            return Ok(());
        }
        let labelled: Vec<_> = peers
            .iter()
            .map(|(s, h)| {
                let labels = PeerLabels {
                    peer: s.peer_id.clone(),
                    region: region_label(s),
                };
                (labels, s, *h)
            })
            .collect();
        for family in PEER_FAMILIES {
            let mut e = encoder.encode_descriptor(family.name, family.help, None, family.kind)?;
            for (labels, status, histograms) in &labelled {
                (family.write)(&mut e, labels, status, histograms, self)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peer_series_carry_the_reported_region_and_one_series_per_peer() {
        let table = Arc::new(PeerTable::new([
            ("12D3KooA".to_owned(), "/ip4/127.0.0.1/tcp/1".to_owned()),
            ("12D3KooB".to_owned(), "/ip4/127.0.0.1/tcp/2".to_owned()),
        ]));
        table.update("12D3KooA", |s| {
            s.region = Some("lon".into());
            s.connected = true;
            s.count_drop("malformed");
            s.count_message(crate::peers::status::Direction::Sent, 300);
        });
        table.samples("12D3KooA").unwrap().lag_seconds.observe(0.02);
        let metrics = Metrics::new(PeerSeries {
            peers: table,
            clock: Arc::new(crate::time::SystemClock),
            started_ms: 0,
        });
        let text = metrics.encode();
        assert!(
            text.contains(r#"oncemesh_peer_connected{peer="12D3KooA",region="lon"} 1"#),
            "{text}"
        );
        assert!(text.contains(r#"oncemesh_peer_connected{peer="12D3KooB",region="unknown"} 0"#));
        assert!(text.contains(
            r#"oncemesh_peer_sync_bytes_total{peer="12D3KooA",region="lon",direction="sent"} 300"#
        ));
        assert!(text.contains(
            r#"oncemesh_peer_dropped_messages_total{peer="12D3KooA",region="lon",kind="malformed"} 1"#
        ));
        assert!(text.contains(
            r#"oncemesh_peer_replication_lag_seconds_bucket{le="0.02",peer="12D3KooA",region="lon"} 1"#
        ) || text.contains(
            r#"oncemesh_peer_replication_lag_seconds_bucket{peer="12D3KooA",region="lon",le="0.02"} 1"#
        ), "{text}");
        assert_eq!(
            text.matches("oncemesh_peer_redial_attempts_total{").count(),
            2,
            "{text}"
        );
    }
}
