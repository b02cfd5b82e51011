//! The health verdict and the indicators behind it: the precursors of
//! duplicates (store delta between regions, replication lag, clock skew,
//! cross-region retries, stale peers) as well as the duplicates and
//! compensations themselves.
//!
//! - [`crate::config::health`]: the `[health]` TOML section and its defaults.
//! - [`reasons`]: the reasons' stable codes and shape.
//! - [`indicators`]: the rolling baselines, fed by [`Health::sample_round`].
//!
//! A report costs O(peers + conflicted keys): counts come from the ledger's
//! kept counts, peers from the peer table, anomalies from detectors updated
//! once per sync round, never from a walk over the keys on the request path
//! (but for `Ledger::stats`'s settlement scan, cached for a second).

pub mod indicators;
pub mod reasons;

pub use indicators::Indicators;

use crate::compensation::Compensations;
use crate::estimator::Estimator;
use crate::ledger::Ledger;
use crate::metrics::{region_label, Code as CodeLabel, IndicatorLabels, Kind, Metrics};
use crate::peers::lag::LagTracker;
use crate::peers::status::{PeerStatus, PeerTable};
use crate::storage::Storage;
use reasons::{status_of, Code, Reason, Status};
use serde_json::{json, Value};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

/// The `/v1/health` answer: the status (which also sets the HTTP status)
/// and the body.
pub struct Report {
    /// ok, degraded or critical.
    pub status: Status,
    /// The reasons behind it.
    pub reasons: Vec<Reason>,
    /// The whole body.
    pub body: Value,
}

/// Health of one node: the handles its verdict is read from, and the
/// indicators' rolling baselines it keeps.
pub struct Health {
    /// Counts, conflicts, the clock.
    ledger: Arc<Ledger>,
    /// Whether writes fail, the durability watermark.
    storage: Arc<Storage>,
    /// Counters read and gauges refreshed.
    metrics: Arc<Metrics>,
    /// What we know of each peer.
    peers: Arc<PeerTable>,
    /// Replication lag per peer.
    lag: Arc<Mutex<LagTracker>>,
    /// The confidence model, exposure and calibration.
    estimator: Arc<Estimator>,
    /// This node's own compensations.
    compensations: Arc<Compensations>,
    /// The rolling baselines and fixed thresholds health is judged by.
    indicators: Mutex<Indicators>,
    /// This node's region, shown in the report.
    region: String,
    /// This node's peer id, shown in the report.
    peer_id: String,
    /// A peer's clock further off than this is a reason.
    max_clock_offset: Duration,
    /// How often peers are compared: an absent peer's delta is recounted
    /// every tenth round.
    sync_interval: Duration,
    /// When this process started: a peer never in sync counts from here.
    started_ms: u64,
}

impl Health {
    /// Health over these handles, judged by `settings` for the
    /// allowlisted `peer_ids`.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        ledger: Arc<Ledger>,
        storage: Arc<Storage>,
        metrics: Arc<Metrics>,
        peers: Arc<PeerTable>,
        lag: Arc<Mutex<LagTracker>>,
        estimator: Arc<Estimator>,
        compensations: Arc<Compensations>,
        config: &crate::config::NodeConfig,
        peer_id: String,
        started_ms: u64,
    ) -> Self {
        let peer_ids: Vec<String> = config.peers.iter().map(|p| p.peer_id.to_string()).collect();
        Self {
            ledger,
            storage,
            metrics,
            peers,
            lag,
            estimator,
            compensations,
            indicators: Mutex::new(Indicators::new(&config.health, &peer_ids)),
            region: config.region.clone(),
            peer_id,
            max_clock_offset: config.max_clock_offset,
            sync_interval: config.sync_interval,
            started_ms,
        }
    }

    fn indicators(&self) -> MutexGuard<'_, Indicators> {
        self.indicators.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn lag_tracker(&self) -> MutexGuard<'_, LagTracker> {
        self.lag.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// What health needs of the conflict report: how many conflicts are open
    /// (not yet compensated) and when the oldest of them was detected. One
    /// look at the conflicts per report: O(conflicted keys), not O(keys).
    fn open_conflicts(&self) -> (usize, Option<u64>) {
        let conflicts = self.ledger.conflicts();
        let open = conflicts.iter().filter(|c| !c.key.is_resolved());
        open.fold((0, None), |(n, oldest), c| {
            let t = c.detected_at_ms;
            (n + 1, Some(oldest.map_or(t, |o: u64| o.min(t))))
        })
    }

    /// Every reason that holds now; `oldest_open` is when the oldest open
    /// conflict was detected.
    fn reasons(
        &self,
        peers: &[PeerStatus],
        malformed: u64,
        oldest_open: Option<u64>,
        now: u64,
    ) -> Vec<Reason> {
        let mut out = Vec::new();
        if let Some(reason) = self.storage.failing() {
            out.push(Reason::new(
                Code::StorageFailed,
                format!(
                    "storage cannot write ({reason}): new allocations are refused until writes succeed again; retrying"
                ),
            ));
        }
        let indicators = self.indicators();
        let settings = indicators.settings();
        let max_offset_ms = self.max_clock_offset.as_millis() as u64;
        for p in peers {
            let region = p.region.as_deref();
            let stale_s =
                now.saturating_sub(p.last_in_sync_ms.unwrap_or(self.started_ms)) as f64 / 1000.0;
            if !p.connected {
                out.push(
                    Reason::new(
                        Code::PeerUnreachable,
                        format!(
                            "peer {} ({}) is not connected; last in sync {:.0} s ago",
                            p.peer_id,
                            region.unwrap_or("region unknown"),
                            stale_s
                        ),
                    )
                    .peer(&p.peer_id, region)
                    .crossed(stale_s, 0.0, "seconds"),
                );
            } else if stale_s > settings.stale_peer_after.as_secs_f64() {
                out.push(
                    Reason::new(
                        Code::PeerStale,
                        format!(
                            "peer {} has not been in sync for {:.0} s (threshold {} s)",
                            p.peer_id,
                            stale_s,
                            settings.stale_peer_after.as_secs_f64()
                        ),
                    )
                    .peer(&p.peer_id, region)
                    .crossed(
                        stale_s,
                        settings.stale_peer_after.as_secs_f64(),
                        "seconds",
                    ),
                );
            }
            if let Some(offset) = p.clock_offset_ms {
                if offset.unsigned_abs() > max_offset_ms {
                    out.push(
                        Reason::new(
                            Code::ClockOffset,
                            format!(
                                "peer {} clock is {offset} ms off ours (bound {max_offset_ms} ms)",
                                p.peer_id
                            ),
                        )
                        .peer(&p.peer_id, region)
                        .crossed(
                            offset as f64 / 1000.0,
                            max_offset_ms as f64 / 1000.0,
                            "seconds",
                        ),
                    );
                }
            }
        }
        indicators.reasons(peers, &mut out);
        let too_long = settings.conflict_open_too_long;
        drop(indicators);
        let (_, dead_lettered) = self.compensations.own_counts();
        if dead_lettered > 0 {
            out.push(
                Reason::new(
                    Code::DeadLettered,
                    format!("{dead_lettered} compensation(s) dead-lettered: an operator must look (oncemesh compensations --state dead-lettered)"),
                )
                .crossed(dead_lettered as f64, 0.0, "compensations"),
            );
        }
        if let Some(detected) = oldest_open {
            let open_s = now.saturating_sub(detected) as f64 / 1000.0;
            if open_s > too_long.as_secs_f64() {
                out.push(
                    Reason::new(
                        Code::ConflictOpenTooLong,
                        format!(
                            "a conflict has not been compensated for {open_s:.0} s (threshold {} s): see oncemesh conflicts --state open",
                            too_long.as_secs_f64()
                        ),
                    )
                    .crossed(open_s, too_long.as_secs_f64(), "seconds"),
                );
            }
        }
        if malformed > 0 {
            out.push(
                Reason::new(
                    Code::MalformedRecords,
                    format!("{malformed} malformed record(s) skipped"),
                )
                .crossed(malformed as f64, 0.0, "records"),
            );
        }
        out
    }

    /// Builds the `/v1/health` answer.
    pub fn report(&self) -> Report {
        let now = self.ledger.wall_ms();
        let stats = self.ledger.stats();
        let clock = self.ledger.clock();
        let peers = self.peers.snapshot();
        let (open_conflicts, oldest_open) = self.open_conflicts();
        let reasons = self.reasons(&peers, stats.malformed_records, oldest_open, now);
        let status = status_of(&reasons);
        let (in_flight, dead_lettered) = self.compensations.own_counts();
        let max_staleness_ms = peers
            .iter()
            .map(|p| {
                p.last_in_sync_ms
                    .map_or(u64::MAX, |t| now.saturating_sub(t))
            })
            .max();
        let near_miss_rate = self.indicators().near_miss_rate();
        let body = json!({
            "status": status.as_str(),
            "reasons": reasons,
            "region": self.region,
            "peer_id": self.peer_id,
            "peers": { "allowlisted": peers.len(), "connected": peers.iter().filter(|p| p.connected).count(),
                       "max_staleness_ms": max_staleness_ms },
            "store_delta": { "they_lack_changes": peers.iter().map(|p| p.they_lack_changes).sum::<u64>(),
                             "we_lack_heads": peers.iter().map(|p| p.we_lack_heads).sum::<u64>() },
            "replication_lag_seconds": { "max": peers.iter().map(|p| p.lag_seconds).fold(0.0, f64::max) },
            "clock": clock,
            "ledger": stats,
            "conflicts_open": open_conflicts,
            "cross_region_replays": self.metrics.cross_region_replays.get(),
            "near_miss_rate": near_miss_rate,
            "compensations": { "in_flight": in_flight, "dead_lettered": dead_lettered },
            "confidence_model": self.estimator.summary(),
            "exposure": self.estimator.exposure(),
            "durable_seq": self.storage.durable_seq(),
            "storage": { "failing": self.storage.failing(), "write_failures": self.storage.write_failures() },
        });
        Report {
            status,
            reasons,
            body,
        }
    }

    /// One sync round's sampling, on a blocking thread (it takes shard locks):
    /// each peer's store delta and replication lag into the peer table and its
    /// histograms, then every indicator into its detector.
    pub fn sample_round(&self) {
        let now = self.ledger.wall_ms();
        let windows = self.ledger.windows();
        self.lag_tracker()
            .retain(|doc| windows.live(doc.epoch, now));
        let mut total = 0i64;
        for was in self.peers.snapshot() {
            let key = was.peer_id.as_str();
            // Counting what an absent peer lacks walks every change since it
            // left, under the shard locks: while it is away, every tenth round.
            let recount = was.connected
                || now.saturating_sub(was.delta_counted_ms)
                    >= 10 * self.sync_interval.as_millis() as u64;
            let (lack, we_lack) = if recount {
                self.ledger.delta(key)
            } else {
                (was.they_lack_changes as usize, was.we_lack_heads as usize)
            };
            total += lack as i64;
            let lag = self.lag_tracker().lag_ms(key, now) as f64 / 1000.0;
            self.peers.update(key, |s| {
                s.they_lack_changes = lack as u64;
                s.we_lack_heads = we_lack as u64;
                if recount {
                    s.delta_counted_ms = now;
                }
                s.lag_seconds = lag;
            });
            if let Some(samples) = self.peers.samples(key) {
                samples.record_round(lag, lack as u64);
            }
        }
        self.metrics.store_delta_changes.set(total);
        let peers = self.peers.snapshot();
        let created = self
            .metrics
            .allocations
            .get(&Kind::of("created"))
            .map_or(0, |c| c.get());
        let mut indicators = self.indicators();
        for p in &peers {
            let offset = p
                .clock_offset_ms
                .filter(|_| p.connected)
                .map(|ms| ms as f64 / 1000.0);
            indicators.observe_peer(&p.peer_id, now, p.lag_seconds, p.they_lack_changes, offset);
        }
        indicators.observe_totals(now, self.metrics.cross_region_replays.get(), created);
    }

    /// Refreshes the gauges that mirror ledger, peer and health state.
    pub fn refresh_gauges(&self) {
        let m = &self.metrics;
        let stats = self.ledger.stats();
        let clock = self.ledger.clock();
        let now = self.ledger.wall_ms();
        m.keys.set(stats.keys as i64);
        m.documents.set(stats.documents as i64);
        m.expired_allocations.set(stats.expired_allocations as i64);
        m.journal_backlog.set(self.storage.journal_backlog() as i64);
        m.provisional.set(stats.provisional as i64);
        m.oldest_provisional_seconds.set(
            stats
                .oldest_provisional_ms
                .map_or(0.0, |t| now.saturating_sub(t) as f64 / 1000.0),
        );
        m.settled_ratio.set(if stats.keys == 0 {
            1.0
        } else {
            1.0 - stats.provisional as f64 / stats.keys as f64
        });
        m.skew_violations.set(clock.skew_violations as i64);
        m.max_clock_offset_seconds
            .set(clock.max_observed_offset_ms as f64 / 1000.0);
        m.malformed_records.set(stats.malformed_records as i64);
        let peers = self.peers.snapshot();
        m.peers_connected
            .set(peers.iter().filter(|p| p.connected).count() as i64);
        m.store_delta_changes
            .set(peers.iter().map(|p| p.they_lack_changes as i64).sum());
        let (in_flight, dead) = self.compensations.own_counts();
        m.compensations_in_flight.set(in_flight as i64);
        m.compensations_dead_lettered.set(dead as i64);
        self.refresh_uncertainty();
        let (open, oldest_open) = self.open_conflicts();
        m.conflicts_open.set(open as i64);
        let found = self.reasons(&peers, stats.malformed_records, oldest_open, now);
        m.health_status.set(status_of(&found).gauge());
        for code in Code::ALL {
            let present = found.iter().filter(|r| r.code == code).count();
            m.health_reasons
                .get_or_create(&CodeLabel {
                    code: code.as_str(),
                })
                .set(present as i64);
        }
        let regions: std::collections::BTreeMap<&str, String> = peers
            .iter()
            .map(|p| (p.peer_id.as_str(), region_label(p)))
            .collect();
        // Cleared first: a peer's region label may have changed since.
        m.indicator_anomalous.clear();
        m.indicator_baseline.clear();
        m.indicator_threshold.clear();
        for judged in self.indicators().judged() {
            let peer = judged.peer.unwrap_or_default();
            let labels = IndicatorLabels {
                indicator: judged.indicator,
                region: regions.get(peer.as_str()).cloned().unwrap_or_default(),
                peer,
            };
            // NaN while there is no baseline (before the first sample) or no
            // threshold (warming up): a gap on a graph, not a made-up number.
            let r = judged.reading;
            m.indicator_anomalous
                .get_or_create(&labels)
                .set(i64::from(r.is_some_and(|r| r.anomalous)));
            m.indicator_baseline
                .get_or_create(&labels)
                .set(r.map_or(f64::NAN, |r| r.mean));
            m.indicator_threshold
                .get_or_create(&labels)
                .set(r.and_then(|r| r.threshold).unwrap_or(f64::NAN));
        }
    }

    /// The exposure, failover and calibration gauges.
    fn refresh_uncertainty(&self) {
        use crate::metrics::{Currency, SituationLabel};
        let m = &self.metrics;
        let exposure = self.estimator.exposure();
        m.exposure_expected_duplicates
            .set(exposure.expected_duplicates);
        // A currency with nothing at risk any more leaves the exposition;
        // `unknown` is always there (at 0 when nothing is), so dashboards and
        // alerts find the family on every self.
        m.exposure_value_at_risk.clear();
        m.exposure_value_at_risk
            .get_or_create(&Currency {
                currency: crate::exposure::UNKNOWN.to_owned(),
            })
            .set(0.0);
        for (currency, value) in &exposure.value_at_risk {
            m.exposure_value_at_risk
                .get_or_create(&Currency {
                    currency: currency.clone(),
                })
                .set(*value);
        }
        let calibration = self.estimator.calibration_report();
        let summary = self.estimator.summary();
        for s in &summary.situations {
            let label = SituationLabel {
                situation: s.situation.as_str().to_owned(),
            };
            m.failover_rate.get_or_create(&label).set(s.failover_rate);
        }
        for table in &calibration.situations {
            let Some(situation) = table.situation else {
                continue;
            };
            let label = SituationLabel {
                situation: situation.as_str().to_owned(),
            };
            m.calibration_gap.get_or_create(&label).set(table.gap);
            m.calibration_resolved
                .get_or_create(&label)
                .set(table.resolved as i64);
        }
    }
}
