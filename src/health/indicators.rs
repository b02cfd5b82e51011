//! The leading indicators health is judged by, judged against the node's
//! own baselines: per peer the replication lag, the store delta and the
//! clock offset; node-wide the near-miss rate (cross-region replays per new
//! allocation). Fed once per sync round with the time; no I/O.

use super::reasons::{Code, Reason};
use crate::anomaly::{Detector, Reading};
use crate::config::health::HealthSettings;
use crate::peers::status::PeerStatus;
use std::collections::{BTreeMap, VecDeque};

/// Fewest new allocations over the near-miss window for a rate to mean
/// anything: below it no sample is taken.
const NEAR_MISS_MIN_ALLOCATIONS: u64 = 20;

/// One peer's detectors.
#[derive(Clone, Debug)]
struct PeerDetectors {
    lag: Detector,
    delta: Detector,
    offset: Detector,
}

/// One baseline-judged indicator, for metrics and reasons.
#[derive(Clone, Debug)]
pub struct Judged {
    /// lag, delta, clock_offset or near_miss_rate.
    pub indicator: &'static str,
    /// The peer, for per-peer indicators.
    pub peer: Option<String>,
    /// The last reading (`None` before the first sample).
    pub reading: Option<Reading>,
}

/// Every detector of the node.
#[derive(Clone, Debug)]
pub struct Indicators {
    settings: HealthSettings,
    peers: BTreeMap<String, PeerDetectors>,
    near_miss: Detector,
    /// (ms, cross-region replays, new allocations) at each round within
    /// the near-miss window.
    totals: VecDeque<(u64, u64, u64)>,
    near_miss_rate: Option<f64>,
}

impl Indicators {
    /// Detectors for the allowlisted `peers`, judged by `settings`.
    pub fn new(settings: &HealthSettings, peers: &[String]) -> Self {
        let peers = peers
            .iter()
            .map(|p| {
                (
                    p.clone(),
                    PeerDetectors {
                        lag: Detector::new(settings.lag),
                        delta: Detector::new(settings.delta),
                        offset: Detector::new(settings.clock_offset),
                    },
                )
            })
            .collect();
        Self {
            settings: settings.clone(),
            peers,
            near_miss: Detector::new(settings.near_miss),
            totals: VecDeque::new(),
            near_miss_rate: None,
        }
    }

    /// The thresholds in force.
    pub fn settings(&self) -> &HealthSettings {
        &self.settings
    }

    /// One round's sample of a peer: lag in seconds, changes it lacks, and
    /// the absolute clock offset in seconds if measured.
    pub fn observe_peer(
        &mut self,
        peer: &str,
        now_ms: u64,
        lag_seconds: f64,
        delta: u64,
        offset_seconds: Option<f64>,
    ) {
        let Some(d) = self.peers.get_mut(peer) else {
            return;
        };
        d.lag.observe(now_ms, lag_seconds);
        d.delta.observe(now_ms, delta as f64);
        if let Some(offset) = offset_seconds {
            d.offset.observe(now_ms, offset.abs());
        }
    }

    /// One round's node-wide totals since start: replays answered with
    /// another region's allocation, and new allocations.
    pub fn observe_totals(&mut self, now_ms: u64, replays: u64, allocations: u64) {
        let window = self.settings.near_miss_window.as_millis() as u64;
        self.totals.push_back((now_ms, replays, allocations));
        while self
            .totals
            .front()
            .is_some_and(|(t, _, _)| now_ms.saturating_sub(*t) > window)
        {
            self.totals.pop_front();
        }
        let Some(&(_, r0, a0)) = self.totals.front() else {
            return;
        };
        let allocated = allocations.saturating_sub(a0);
        self.near_miss_rate = (allocated >= NEAR_MISS_MIN_ALLOCATIONS)
            .then(|| replays.saturating_sub(r0) as f64 / allocated as f64);
        if let Some(rate) = self.near_miss_rate {
            self.near_miss.observe(now_ms, rate);
        }
    }

    /// Cross-region replays per new allocation over the near-miss window,
    /// when enough allocations were made in it.
    pub fn near_miss_rate(&self) -> Option<f64> {
        self.near_miss_rate
    }

    /// Every indicator, for the metrics.
    pub fn judged(&self) -> Vec<Judged> {
        let mut out = Vec::new();
        for (peer, d) in &self.peers {
            for (indicator, detector) in [
                ("lag", &d.lag),
                ("delta", &d.delta),
                ("clock_offset", &d.offset),
            ] {
                out.push(Judged {
                    indicator,
                    peer: Some(peer.clone()),
                    reading: detector.last(),
                });
            }
        }
        out.push(Judged {
            indicator: "near_miss_rate",
            peer: None,
            reading: self.near_miss.last(),
        });
        out
    }

    /// The reasons these indicators give, fixed thresholds and baselines,
    /// with `peers` as the table shows them now.
    pub fn reasons(&self, peers: &[PeerStatus], out: &mut Vec<Reason>) {
        let s = &self.settings;
        for p in peers {
            let region = p.region.as_deref();
            let lag_limit = s.lag_threshold.as_secs_f64();
            if p.lag_seconds > lag_limit {
                out.push(
                    Reason::new(
                        Code::LagHigh,
                        format!(
                            "allocations made here reach peer {} only after {:.1} s (threshold {lag_limit} s)",
                            p.peer_id, p.lag_seconds
                        ),
                    )
                    .peer(&p.peer_id, region)
                    .crossed(p.lag_seconds, lag_limit, "seconds"),
                );
            }
            if p.they_lack_changes > s.delta_threshold {
                out.push(
                    Reason::new(
                        Code::DeltaHigh,
                        format!(
                            "peer {} lacks {} changes (threshold {})",
                            p.peer_id, p.they_lack_changes, s.delta_threshold
                        ),
                    )
                    .peer(&p.peer_id, region)
                    .crossed(
                        p.they_lack_changes as f64,
                        s.delta_threshold as f64,
                        "changes",
                    ),
                );
            }
            let Some(d) = self.peers.get(&p.peer_id) else {
                continue;
            };
            let anomalies = [
                (Code::LagAnomalous, &d.lag, "replication lag", "seconds"),
                (Code::DeltaAnomalous, &d.delta, "store delta", "changes"),
                (
                    Code::ClockOffsetAnomalous,
                    &d.offset,
                    "clock offset",
                    "seconds",
                ),
            ];
            for (code, detector, what, unit) in anomalies {
                if let Some(reason) = anomaly(code, detector, what, unit, Some(p)) {
                    out.push(reason);
                }
            }
        }
        if let Some(rate) = self.near_miss_rate.filter(|r| *r > s.near_miss_threshold) {
            out.push(
                Reason::new(
                    Code::NearMissRateHigh,
                    format!(
                        "{:.2} % of new allocations were retried in another region within {} (threshold {:.2} %)",
                        rate * 100.0,
                        humantime::format_duration(s.near_miss_window),
                        s.near_miss_threshold * 100.0
                    ),
                )
                .crossed(rate, s.near_miss_threshold, "ratio"),
            );
        }
        if let Some(reason) = anomaly(
            Code::NearMissAnomalous,
            &self.near_miss,
            "near-miss rate",
            "ratio",
            None,
        ) {
            out.push(reason);
        }
    }
}

/// The reason an anomalous detector gives, if it is anomalous now.
fn anomaly(
    code: Code,
    detector: &Detector,
    what: &str,
    unit: &'static str,
    peer: Option<&PeerStatus>,
) -> Option<Reason> {
    let r = detector.last().filter(|r| r.anomalous)?;
    let threshold = r.threshold?;
    let whose = peer.map_or(String::new(), |p| format!(" to peer {}", p.peer_id));
    let reason = Reason::new(
        code,
        format!(
            "{what}{whose} is {} {unit}, above its baseline of {} {unit} (threshold {})",
            short(r.value),
            short(r.mean),
            short(threshold)
        ),
    )
    .crossed(r.value, threshold, unit)
    .baseline(r.mean);
    Some(match peer {
        Some(p) => reason.peer(&p.peer_id, p.region.as_deref()),
        None => reason,
    })
}

/// A number short enough for a sentence.
fn short(v: f64) -> String {
    if v.abs() >= 100.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.3}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::health::HealthFile;

    fn drill_settings() -> HealthSettings {
        toml::from_str::<HealthFile>(
            "[anomaly]\nwindow = \"60s\"\nwarmup = \"10s\"\nsustain = \"3s\"\n",
        )
        .unwrap()
        .validate()
        .unwrap()
    }

    fn peer(id: &str) -> PeerStatus {
        PeerStatus {
            peer_id: id.into(),
            region: Some("lon".into()),
            connected: true,
            ..PeerStatus::default()
        }
    }

    #[test]
    fn a_lag_jump_on_one_peer_raises_lag_anomalous_for_that_peer_only() {
        let mut ind = Indicators::new(&drill_settings(), &["a".into(), "b".into()]);
        let mut out = Vec::new();
        for s in 0..30u64 {
            ind.observe_peer("a", s * 1000, 0.02, 3, Some(0.001));
            ind.observe_peer("b", s * 1000, 0.02, 3, Some(0.001));
        }
        ind.reasons(&[peer("a"), peer("b")], &mut out);
        assert!(out.is_empty(), "{out:?}");
        for s in 30..35u64 {
            ind.observe_peer("a", s * 1000, 2.0, 3, Some(0.001));
            ind.observe_peer("b", s * 1000, 0.02, 3, Some(0.001));
        }
        ind.reasons(&[peer("a"), peer("b")], &mut out);
        assert_eq!(out.len(), 1, "{out:?}");
        assert_eq!(out[0].code, Code::LagAnomalous);
        assert_eq!(out[0].peer.as_deref(), Some("a"));
        assert_eq!(out[0].region.as_deref(), Some("lon"));
        assert!(out[0].baseline.unwrap() < 0.1 && out[0].value == Some(2.0));
    }

    #[test]
    fn fixed_thresholds_apply_without_any_baseline() {
        let ind = Indicators::new(&HealthSettings::default(), &["a".into()]);
        let mut p = peer("a");
        p.lag_seconds = 31.0;
        p.they_lack_changes = 60_000;
        let mut out = Vec::new();
        ind.reasons(&[p], &mut out);
        let codes: Vec<_> = out.iter().map(|r| r.code).collect();
        assert_eq!(codes, [Code::LagHigh, Code::DeltaHigh]);
        assert_eq!(out[0].threshold, Some(30.0));
    }

    #[test]
    fn the_near_miss_rate_is_measured_over_its_window_with_enough_allocations() {
        let mut ind = Indicators::new(&HealthSettings::default(), &[]);
        ind.observe_totals(0, 0, 0);
        ind.observe_totals(1000, 1, 10);
        assert_eq!(ind.near_miss_rate(), None, "10 allocations are too few");
        ind.observe_totals(2000, 4, 200);
        assert_eq!(ind.near_miss_rate(), Some(0.02));
        let mut out = Vec::new();
        ind.reasons(&[], &mut out);
        assert_eq!(out[0].code, Code::NearMissRateHigh);
        // Six minutes later the early replays are out of the window.
        ind.observe_totals(362_000, 4, 400);
        ind.observe_totals(363_000, 4, 600);
        assert_eq!(ind.near_miss_rate(), Some(0.0));
    }
}
