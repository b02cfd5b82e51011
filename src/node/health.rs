//! The health verdict and the gauges behind it: the precursors of duplicates
//! (store delta between regions, clock skew, cross-region retries, stale
//! peers) as well as the duplicates and compensations themselves.

use super::Node;
use serde_json::{json, Value};

/// A peer out of sync for longer than this makes the node degraded.
const STALE_PEER_MS: u64 = 10_000;

/// Builds the `/v1/health` body.
pub fn report(node: &Node) -> Value {
    let now = node.ledger.wall_ms();
    let stats = node.ledger.stats();
    let clock = node.ledger.clock();
    let peers = node.peers.snapshot();
    let mut reasons: Vec<String> = Vec::new();
    let mut critical = false;

    if let Some(reason) = node.storage.failing() {
        critical = true;
        reasons.push(format!(
            "storage cannot write ({reason}): new allocations are refused until writes succeed again; retrying"
        ));
    }
    let mut max_staleness_ms = 0u64;
    for p in &peers {
        let stale = p.last_in_sync_ms.map(|t| now.saturating_sub(t));
        max_staleness_ms = max_staleness_ms.max(stale.unwrap_or(u64::MAX));
        if !p.connected {
            reasons.push(format!("peer {} is not connected", p.peer_id));
        } else if stale.is_none_or(|s| s > STALE_PEER_MS) {
            reasons.push(format!(
                "peer {} has not been in sync for over {} s",
                p.peer_id,
                STALE_PEER_MS / 1000
            ));
        }
        if let Some(offset) = p.clock_offset_ms {
            if offset.unsigned_abs() > clock.max_offset_ms {
                reasons.push(format!(
                    "peer {} clock is {} ms off ours (bound {} ms)",
                    p.peer_id, offset, clock.max_offset_ms
                ));
            }
        }
    }
    let (in_flight, dead_lettered) = crate::compensation::own_counts(node);
    if dead_lettered > 0 {
        critical = true;
        reasons.push(format!(
            "{dead_lettered} compensation(s) dead-lettered: an operator must look (oncemesh compensations --state dead-lettered)"
        ));
    }
    let open_conflicts = node
        .ledger
        .conflicts()
        .iter()
        .filter(|c| !crate::http::is_resolved(&c.key))
        .count();
    if open_conflicts > 0 {
        reasons.push(format!("{open_conflicts} conflict(s) not yet compensated"));
    }
    if stats.malformed_records > 0 {
        reasons.push(format!(
            "{} malformed record(s) skipped",
            stats.malformed_records
        ));
    }
    let status = if critical {
        "critical"
    } else if reasons.is_empty() {
        "ok"
    } else {
        "degraded"
    };
    json!({
        "status": status,
        "reasons": reasons,
        "region": node.config.region,
        "peer_id": node.peer_id.to_string(),
        "peers": { "allowlisted": peers.len(), "connected": peers.iter().filter(|p| p.connected).count(),
                   "max_staleness_ms": if peers.is_empty() { None } else { Some(max_staleness_ms) } },
        "store_delta": { "they_lack_changes": peers.iter().map(|p| p.they_lack_changes).sum::<u64>(),
                         "we_lack_heads": peers.iter().map(|p| p.we_lack_heads).sum::<u64>() },
        "clock": clock,
        "ledger": stats,
        "conflicts_open": open_conflicts,
        "cross_region_replays": node.metrics.cross_region_replays.get(),
        "compensations": { "in_flight": in_flight, "dead_lettered": dead_lettered },
        "confidence_model": node.confidence_model().summary(),
        "exposure": node.exposure(),
        "durable_seq": node.storage.durable_seq(),
        "storage": { "failing": node.storage.failing(), "write_failures": node.storage.write_failures() },
    })
}

/// Refreshes the gauges that mirror ledger and peer state.
pub fn refresh_gauges(node: &Node) {
    let m = &node.metrics;
    let stats = node.ledger.stats();
    let clock = node.ledger.clock();
    let now = node.ledger.wall_ms();
    m.keys.set(stats.keys as i64);
    m.documents.set(stats.documents as i64);
    m.expired_allocations.set(stats.expired_allocations as i64);
    m.journal_backlog.set(node.storage.journal_backlog() as i64);
    m.conflicts_open.set(stats.conflicts as i64);
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
    m.max_clock_offset_ms.set(clock.max_observed_offset_ms);
    m.malformed_records.set(stats.malformed_records as i64);
    let peers = node.peers.snapshot();
    m.peers_connected
        .set(peers.iter().filter(|p| p.connected).count() as i64);
    m.store_delta_changes
        .set(peers.iter().map(|p| p.they_lack_changes as i64).sum());
    let (in_flight, dead) = crate::compensation::own_counts(node);
    m.compensations_in_flight.set(in_flight as i64);
    m.compensations_dead_lettered.set(dead as i64);
    refresh_uncertainty(node);
}

/// The exposure, failover and calibration gauges.
fn refresh_uncertainty(node: &Node) {
    use crate::metrics::{Currency, SituationLabel};
    let m = &node.metrics;
    let exposure = node.exposure();
    m.exposure_expected_duplicates
        .set(exposure.expected_duplicates);
    // A currency with nothing at risk any more leaves the exposition.
    m.exposure_value_at_risk.clear();
    for (currency, value) in &exposure.value_at_risk {
        m.exposure_value_at_risk
            .get_or_create(&Currency {
                currency: currency.clone(),
            })
            .set(*value);
    }
    let calibration = node.calibration_report();
    let summary = node.confidence_model().summary();
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
