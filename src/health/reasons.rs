//! Health reasons: each a stable `code` that scripts and alerts match on, a
//! sentence for the operator, the peer if any, the value and the threshold
//! or baseline it crossed. docs/OPERATIONS.md says what each means and what
//! to do about it.

use serde::Serialize;

/// How bad a reason is: the node's status is its worst reason's.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// Nothing to report.
    Ok,
    /// Working, with a precursor of duplicates or a fault to look at.
    Degraded,
    /// Cannot do its job (allocations cannot be made durable) or needs an
    /// operator now (dead-lettered compensations): `/v1/health` answers 503.
    Critical,
}

impl Status {
    /// The name `/v1/health` shows.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Ok => "ok",
            Status::Degraded => "degraded",
            Status::Critical => "critical",
        }
    }

    /// The value of the `oncemesh_health_status` gauge.
    pub fn gauge(self) -> i64 {
        self as i64
    }
}

/// The stable codes. Adding one is fine; renaming one breaks alerts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Code {
    /// The storage writer stopped after an I/O error.
    StorageFailed,
    /// A compensation of this node was dead-lettered.
    DeadLettered,
    /// An allowlisted peer is not connected.
    PeerUnreachable,
    /// A connected peer has not been in sync for too long.
    PeerStale,
    /// A peer's clock is further off than `max_clock_offset`.
    ClockOffset,
    /// The replication lag to a peer is above the fixed threshold.
    LagHigh,
    /// A peer lacks more changes than the fixed threshold.
    DeltaHigh,
    /// Cross-region replays per new allocation above the fixed threshold.
    NearMissRateHigh,
    /// The lag to a peer stays above its own baseline.
    LagAnomalous,
    /// The store delta to a peer stays above its own baseline.
    DeltaAnomalous,
    /// A peer's clock offset stays above its own baseline.
    ClockOffsetAnomalous,
    /// The near-miss rate stays above its own baseline.
    NearMissAnomalous,
    /// A conflict has not been compensated for too long.
    ConflictOpenTooLong,
    /// Malformed records were found in documents and skipped.
    MalformedRecords,
}

impl Code {
    /// Every code, for the `oncemesh_health_reasons` series (one each, 0
    /// when absent, so an alert rule's series always exists).
    pub const ALL: [Code; 14] = [
        Code::StorageFailed,
        Code::DeadLettered,
        Code::PeerUnreachable,
        Code::PeerStale,
        Code::ClockOffset,
        Code::LagHigh,
        Code::DeltaHigh,
        Code::NearMissRateHigh,
        Code::LagAnomalous,
        Code::DeltaAnomalous,
        Code::ClockOffsetAnomalous,
        Code::NearMissAnomalous,
        Code::ConflictOpenTooLong,
        Code::MalformedRecords,
    ];

    /// The code as JSON and metric labels spell it.
    pub fn as_str(self) -> &'static str {
        match self {
            Code::StorageFailed => "storage_failed",
            Code::DeadLettered => "dead_lettered",
            Code::PeerUnreachable => "peer_unreachable",
            Code::PeerStale => "peer_stale",
            Code::ClockOffset => "clock_offset",
            Code::LagHigh => "lag_high",
            Code::DeltaHigh => "delta_high",
            Code::NearMissRateHigh => "near_miss_rate_high",
            Code::LagAnomalous => "lag_anomalous",
            Code::DeltaAnomalous => "delta_anomalous",
            Code::ClockOffsetAnomalous => "clock_offset_anomalous",
            Code::NearMissAnomalous => "near_miss_anomalous",
            Code::ConflictOpenTooLong => "conflict_open_too_long",
            Code::MalformedRecords => "malformed_records",
        }
    }

    /// How bad it is.
    pub fn severity(self) -> Status {
        match self {
            Code::StorageFailed | Code::DeadLettered => Status::Critical,
            _ => Status::Degraded,
        }
    }
}

/// One reason, as `/v1/health` lists it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Reason {
    /// Stable code.
    pub code: Code,
    /// What it does to the status.
    pub severity: Status,
    /// A sentence for the operator.
    pub message: String,
    /// The peer concerned, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peer: Option<String>,
    /// That peer's region as it reports it, if known.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    /// The value that crossed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub value: Option<f64>,
    /// The fixed threshold, or the baseline's threshold, it crossed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub threshold: Option<f64>,
    /// The baseline (mean) of an anomalous indicator.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub baseline: Option<f64>,
    /// Unit of `value`, `threshold` and `baseline`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unit: Option<&'static str>,
}

impl Reason {
    /// A reason with `code` and `message`, nothing else yet.
    pub fn new(code: Code, message: impl Into<String>) -> Self {
        Self {
            code,
            severity: code.severity(),
            message: message.into(),
            peer: None,
            region: None,
            value: None,
            threshold: None,
            baseline: None,
            unit: None,
        }
    }

    /// About `peer`, of `region` if known.
    pub fn peer(mut self, peer: &str, region: Option<&str>) -> Self {
        self.peer = Some(peer.to_owned());
        self.region = region.map(str::to_owned);
        self
    }

    /// `value` crossed `threshold`, both in `unit`.
    pub fn crossed(mut self, value: f64, threshold: f64, unit: &'static str) -> Self {
        self.value = Some(value);
        self.threshold = Some(threshold);
        self.unit = Some(unit);
        self
    }

    /// The baseline mean behind the threshold.
    pub fn baseline(mut self, mean: f64) -> Self {
        self.baseline = Some(mean);
        self
    }
}

/// The status a list of reasons adds up to.
pub fn status_of(reasons: &[Reason]) -> Status {
    reasons
        .iter()
        .map(|r| r.severity)
        .max()
        .unwrap_or(Status::Ok)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_stable_and_distinct() {
        let names: std::collections::BTreeSet<_> = Code::ALL.iter().map(|c| c.as_str()).collect();
        assert_eq!(names.len(), Code::ALL.len());
        for code in Code::ALL {
            assert_eq!(
                serde_json::to_value(code).unwrap(),
                serde_json::json!(code.as_str())
            );
        }
    }

    #[test]
    fn the_worst_reason_sets_the_status() {
        assert_eq!(status_of(&[]), Status::Ok);
        let stale = Reason::new(Code::PeerStale, "x");
        let dead = Reason::new(Code::DeadLettered, "y");
        assert_eq!(status_of(std::slice::from_ref(&stale)), Status::Degraded);
        assert_eq!(status_of(&[stale, dead]), Status::Critical);
        let json = serde_json::to_value(
            Reason::new(Code::LagAnomalous, "z")
                .peer("12D3", Some("lon"))
                .crossed(2.0, 0.5, "seconds")
                .baseline(0.05),
        )
        .unwrap();
        assert_eq!(json["code"], "lag_anomalous");
        assert_eq!(json["severity"], "degraded");
        assert_eq!(json["region"], "lon");
        assert_eq!(json["threshold"], 0.5);
        assert_eq!(json["baseline"], 0.05);
    }
}
