//! The node's confidence, as a running node holds it: the model
//! ([`crate::confidence`]) and its calibration score, fed by what this node
//! observes (allocations, replays, resolutions, peers coming and going),
//! and the pricing that turns provisional allocations into a value at risk.
//!
//! The model itself is pure; this handle owns its one copy, so the
//! allocation path, the API, health and the swarm's shell feed and read the
//! same model without reaching through the node.

use crate::confidence::calibration::{Calibration, CalibrationReport};
use crate::confidence::{
    ConfidenceModel, ConfidenceParams, ConfidenceSummary, Estimate, PeerView, Situation,
};
use crate::exposure::{Exposure, Pricing};
use crate::ledger::{Ledger, Stake};
use crate::peers::status::PeerTable;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

/// File in the data dir holding what the confidence model has learnt.
pub const LEARNT_FILE: &str = "confidence.json";

/// What a new allocation is staked with: its confidence, the partition
/// episode it is made in, and what the ledger follows of it.
pub struct Assessment {
    /// The confidence it is given.
    pub confidence: f64,
    /// The partition episode it is made in (0: none).
    pub episode: u32,
    /// What the ledger keeps of it until it resolves; `None` with no peers,
    /// when nothing can compete.
    pub stake: Option<Stake>,
}

/// The confidence model, its calibration score and the pricing of one node.
pub struct Estimator {
    /// Where resolutions and the clock come from.
    ledger: Arc<Ledger>,
    /// How stale our view of each peer is.
    peers: Arc<PeerTable>,
    /// When this process started: a peer never in sync since counts as
    /// partitioned that long.
    started_ms: u64,
    /// The normal gap between two anti-entropy rounds, not staleness.
    sync_interval: Duration,
    /// The confidence estimator.
    model: Mutex<ConfidenceModel>,
    /// Reliability per situation and partition episodes.
    calibration: Mutex<Calibration>,
    /// Reads amounts and currencies from payloads, for the value at risk.
    pricing: Pricing,
    /// Where what the model learnt is saved ([`Estimator::save_learnt`]);
    /// `None` keeps it in memory only.
    learnt_path: Option<PathBuf>,
}

impl Estimator {
    /// The model of a node that started at `started_ms`: what it learnt
    /// before, if `data_dir` holds it, else the prior alone.
    pub fn new(
        ledger: Arc<Ledger>,
        peers: Arc<PeerTable>,
        started_ms: u64,
        sync_interval: Duration,
        pricing: Pricing,
        data_dir: Option<&Path>,
    ) -> Self {
        let learnt_path = data_dir.map(|dir| dir.join(LEARNT_FILE));
        let model = learnt_path
            .as_deref()
            .and_then(load_learnt)
            .unwrap_or_else(|| ConfidenceModel::new(ConfidenceParams::default()));
        Self {
            ledger,
            peers,
            started_ms,
            sync_interval,
            model: Mutex::new(model),
            calibration: Mutex::new(Calibration::default()),
            pricing,
            learnt_path,
        }
    }

    /// Saves what the model learnt (a new file put in place by rename, so
    /// a crash leaves the old one or the new one). A failure is logged: it
    /// costs only learning since the last save.
    pub fn save_learnt(&self) {
        let Some(path) = &self.learnt_path else {
            return;
        };
        let learnt = self.model().learnt();
        if let Err(e) = write_atomically(path, &learnt) {
            tracing::warn!(path = %path.display(), error = %e, "cannot save the learnt confidence state");
        }
    }

    fn model(&self) -> MutexGuard<'_, ConfidenceModel> {
        self.model.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn calibration(&self) -> MutexGuard<'_, Calibration> {
        self.calibration.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The confidence a new (or still provisional) allocation has: every
    /// allowlisted peer counts, those in `unsynced` with the staleness of our
    /// view of them, the others as in sync (they already hold the key).
    pub fn confidence_now(&self, unsynced: &[String]) -> f64 {
        if unsynced.is_empty() {
            return 1.0;
        }
        self.estimate_now(unsynced).confidence
    }

    /// [`Estimator::confidence_now`] with the situation and the terms
    /// behind it, after learning from what resolved meanwhile.
    fn estimate_now(&self, unsynced: &[String]) -> Estimate {
        self.learn();
        let views = self.peer_views(unsynced);
        self.model().estimate(&views)
    }

    /// What a new allocation of `payload` is staked with now; notes the
    /// situation it is made in.
    pub fn assess(&self, payload: &serde_json::Value) -> Assessment {
        let estimate = self.estimate_now(self.ledger.peers());
        let episode = self
            .calibration()
            .observe_situation(estimate.situation, self.ledger.wall_ms());
        // With no peers nothing can compete: nothing to follow.
        let stake = (!self.ledger.peers().is_empty()).then(|| Stake {
            confidence: estimate.confidence,
            estimate: Some(estimate),
            episode,
            price: self.pricing.price(payload),
        });
        Assessment {
            confidence: estimate.confidence,
            episode,
            stake,
        }
    }

    /// A new allocation was made with `confidence` in `episode`.
    pub fn observe_allocation(&self, episode: u32, confidence: f64) {
        self.model().observe_allocation();
        self.calibration().record_allocation(episode, confidence);
    }

    /// A client retried here, for the first time, a key another region
    /// allocated `delay` ago.
    pub fn observe_cross_region_replay(&self, delay: Duration) {
        self.model().observe_cross_region_replay(delay);
    }

    /// A peer came back in sync after `outage`.
    pub fn observe_peer_resync(&self, outage: Duration) {
        self.model().observe_peer_resync(outage);
    }

    /// One view per allowlisted peer, as the confidence model takes them.
    fn peer_views(&self, unsynced: &[String]) -> Vec<PeerView> {
        let now = self.ledger.wall_ms();
        self.peers
            .snapshot()
            .into_iter()
            .map(|p| {
                if !unsynced.contains(&p.peer_id) {
                    return PeerView {
                        staleness: Duration::ZERO,
                        connected: true,
                        behind: Duration::ZERO,
                    };
                }
                // Never in sync since this process started: treat as a
                // partition as old as the process. The gap between two
                // anti-entropy rounds is normal, not staleness.
                let staleness = p
                    .staleness(now)
                    .unwrap_or_else(|| Duration::from_millis(now.saturating_sub(self.started_ms)));
                // Our oldest allocation it has not shown yet: beyond one
                // round, a connected peer is slow or stalled (a pause, an
                // added delay) and will see new allocations late too.
                let lag = Duration::try_from_secs_f64(p.lag_seconds).unwrap_or_default();
                PeerView {
                    staleness: staleness.saturating_sub(self.sync_interval),
                    connected: p.connected,
                    behind: lag.saturating_sub(self.sync_interval),
                }
            })
            .collect()
    }

    /// Feeds the confidence model and the calibration score with this node's
    /// allocations that resolved since the last call.
    pub fn learn(&self) {
        let resolved = self.ledger.take_resolutions();
        if resolved.is_empty() {
            return;
        }
        {
            let mut model = self.model();
            for r in &resolved {
                let Some(estimate) = r.stake.estimate else {
                    continue;
                };
                if let Some(ms) = r.conflict_after_ms {
                    model.observe_conflict(Duration::from_millis(ms), estimate.situation);
                }
                model.observe_resolved(&estimate, r.conflict_after_ms.is_some());
            }
        }
        let mut calibration = self.calibration();
        for r in &resolved {
            calibration.record_resolved(
                r.stake.estimate.map(|e| e.situation),
                r.stake.episode,
                r.stake.confidence,
                r.conflict_after_ms.is_some(),
            );
        }
    }

    /// Tells the episode tracker where this node stands now, and learns:
    /// called as peers come and go, and twice a second.
    pub fn observe_situation(&self) {
        self.learn();
        let situation = Situation::of(&self.peer_views(self.ledger.peers()));
        self.calibration()
            .observe_situation(situation, self.ledger.wall_ms());
    }

    /// `GET /v1/calibration`: how well this node's confidence held.
    pub fn calibration_report(&self) -> CalibrationReport {
        self.observe_situation();
        self.calibration().report()
    }

    /// The model's current terms, for health.
    pub fn summary(&self) -> ConfidenceSummary {
        self.model().summary()
    }

    /// Expected duplicates and value at risk of this node's provisional allocations.
    pub fn exposure(&self) -> Exposure {
        self.pricing.report(&self.ledger.exposure())
    }
}

/// The model saved at `path`; `None` (the prior) if there is none or it is
/// refused, which is logged.
fn load_learnt(path: &Path) -> Option<ConfidenceModel> {
    let bytes = match std::fs::read(path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "cannot read the learnt confidence state; starting from the prior");
            return None;
        }
    };
    let resumed = serde_json::from_slice(&bytes)
        .map_err(|e| e.to_string())
        .and_then(|learnt| {
            ConfidenceModel::resume(ConfidenceParams::default(), &learnt).map_err(|e| e.to_string())
        });
    match resumed {
        Ok(model) => {
            tracing::info!(path = %path.display(), "confidence model resumed from what it learnt before");
            Some(model)
        }
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "refusing the learnt confidence state; starting from the prior");
            None
        }
    }
}

/// Writes `value` as JSON to `path` through a synced temporary file and a rename.
fn write_atomically(path: &Path, value: &impl serde::Serialize) -> std::io::Result<()> {
    use std::io::Write;
    let tmp = path.with_extension("json.tmp");
    let bytes = serde_json::to_vec(value).map_err(std::io::Error::other)?;
    let mut file = std::fs::File::create(&tmp)?;
    file.write_all(&bytes)?;
    file.sync_all()?;
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_saved_model_is_read_back_and_a_damaged_one_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(LEARNT_FILE);
        assert!(load_learnt(&path).is_none(), "no file: the prior");
        let mut model = ConfidenceModel::new(ConfidenceParams::default());
        (0..500).for_each(|_| model.observe_allocation());
        write_atomically(&path, &model.learnt()).unwrap();
        let read = load_learnt(&path).expect("read back");
        assert_eq!(read.summary(), model.summary());
        for damage in [&b"{"[..], b"[]", b"\xff\xfe", b""] {
            std::fs::write(&path, damage).unwrap();
            assert!(load_learnt(&path).is_none(), "{damage:?}");
        }
    }
}
