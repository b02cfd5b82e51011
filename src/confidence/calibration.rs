//! How well this node's confidence held: the score kept in production.
//!
//! A confidence is a probability, so it can be checked: of this node's
//! allocations given confidence about *c*, a share of about *c* must end
//! without a conflict. Once an allocation is resolved (settled, or a
//! competing allocation turned up) it is counted in the reliability table of
//! the situation it was made in. Each partition episode (a stretch of time
//! during which some peer was unreachable) also keeps the duplicates the
//! node expected among the allocations it made then, beside the conflicts
//! that turned up: the figure an operator compares after a heal. Memory is
//! fixed: ten bins per situation and the last [`MAX_EPISODES`] episodes.

use super::Situation;
use serde::{Deserialize, Serialize};
use std::collections::VecDeque;

/// Bins of a reliability table, by confidence: `[0, 0.1)`, ..., `[0.9, 1.0]`.
const BINS: usize = 10;
/// Episodes kept, newest last.
pub const MAX_EPISODES: usize = 32;
/// Resolved allocations below which a table is too small to judge.
const TOO_FEW: u64 = 30;
/// Gap between mean confidence and the share without conflict that is
/// always tolerated: the model's own accuracy target.
const TOLERATED_GAP: f64 = 0.05;

#[derive(Debug, Clone, Copy, Default)]
struct Bin {
    count: u64,
    confidence_sum: f64,
    conflict_free: u64,
}

impl Bin {
    fn add(&mut self, other: &Bin) {
        self.count += other.count;
        self.confidence_sum += other.confidence_sum;
        self.conflict_free += other.conflict_free;
    }
}

/// One situation's reliability table.
#[derive(Debug, Clone, Default)]
struct Reliability {
    bins: [Bin; BINS],
}

impl Reliability {
    fn record(&mut self, confidence: f64, conflicted: bool) {
        let confidence = if confidence.is_finite() {
            confidence.clamp(0.0, 1.0)
        } else {
            0.0
        };
        let bin = &mut self.bins[((confidence * BINS as f64) as usize).min(BINS - 1)];
        bin.count += 1;
        bin.confidence_sum += confidence;
        bin.conflict_free += u64::from(!conflicted);
    }

    fn report(&self, situation: Option<Situation>) -> ReliabilityReport {
        let mut total = Bin::default();
        self.bins.iter().for_each(|b| total.add(b));
        let n = total.count.max(1) as f64;
        let mean_confidence = total.confidence_sum / n;
        let conflict_free_share = total.conflict_free as f64 / n;
        let ece = self
            .bins
            .iter()
            .filter(|b| b.count > 0)
            .map(|b| {
                let count = b.count as f64;
                (count / n) * (b.confidence_sum / count - b.conflict_free as f64 / count).abs()
            })
            .sum();
        let gap = mean_confidence - conflict_free_share;
        let standard_error = (conflict_free_share * (1.0 - conflict_free_share) / n).sqrt();
        let verdict = if total.count < TOO_FEW {
            Verdict::TooFewResolved
        } else if gap.abs() <= TOLERATED_GAP.max(2.0 * standard_error) {
            Verdict::Calibrated
        } else if gap > 0.0 {
            Verdict::Overconfident
        } else {
            Verdict::Underconfident
        };
        ReliabilityReport {
            situation,
            resolved: total.count,
            mean_confidence,
            conflict_free_share,
            gap,
            standard_error,
            ece,
            verdict,
            bins: self
                .bins
                .iter()
                .enumerate()
                .filter(|(_, b)| b.count > 0)
                .map(|(i, b)| BinReport {
                    from: i as f64 / BINS as f64,
                    to: (i + 1) as f64 / BINS as f64,
                    count: b.count,
                    mean_confidence: b.confidence_sum / b.count as f64,
                    conflict_free_share: b.conflict_free as f64 / b.count as f64,
                })
                .collect(),
        }
    }
}

/// Whether a table's numbers can be trusted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Verdict {
    /// Fewer than 30 resolved allocations: nothing can be said yet.
    TooFewResolved,
    /// Mean confidence within 0.05 (or two standard errors) of the share
    /// without conflict.
    Calibrated,
    /// More conflicts than the confidence said: the numbers are too high.
    Overconfident,
    /// Fewer conflicts than the confidence said: the numbers are too low
    /// (the safe side).
    Underconfident,
}

impl Verdict {
    /// Text form, as in the API.
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::TooFewResolved => "too-few-resolved",
            Verdict::Calibrated => "calibrated",
            Verdict::Overconfident => "overconfident",
            Verdict::Underconfident => "underconfident",
        }
    }
}

/// One row of a reliability table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BinReport {
    /// Lower end of the confidence bin.
    pub from: f64,
    /// Upper end of the confidence bin.
    pub to: f64,
    /// Resolved allocations in the bin.
    pub count: u64,
    /// Their mean confidence when made.
    pub mean_confidence: f64,
    /// The share of them that ended without a conflict.
    pub conflict_free_share: f64,
}

/// A situation's reliability table, as `GET /v1/calibration` shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReliabilityReport {
    /// The situation (`None`: over every situation).
    pub situation: Option<Situation>,
    /// Resolved allocations counted.
    pub resolved: u64,
    /// Their mean confidence when made.
    pub mean_confidence: f64,
    /// The share of them that ended without a conflict.
    pub conflict_free_share: f64,
    /// `mean_confidence − conflict_free_share`: positive means overconfident.
    pub gap: f64,
    /// Standard error of the share, for judging the gap.
    pub standard_error: f64,
    /// Expected calibration error over the bins.
    pub ece: f64,
    /// Whether the numbers can be trusted.
    pub verdict: Verdict,
    /// The non-empty bins.
    pub bins: Vec<BinReport>,
}

/// A stretch of time during which some peer was unreachable from this node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Episode {
    /// Number of the episode since the node started (from 1).
    pub id: u32,
    /// Wall-clock ms when the first peer was found unreachable.
    pub started_ms: u64,
    /// Wall-clock ms when every peer was reachable again; `None` while it lasts.
    pub ended_ms: Option<u64>,
    /// The worst situation seen during it (`isolated` if every peer was cut off).
    pub worst: Situation,
    /// Allocations this node made during it.
    pub allocations: u64,
    /// The duplicates this node expected among them: the sum of 1 − confidence.
    pub expected_duplicates: f64,
    /// Those allocations resolved so far.
    pub resolved: u64,
    /// Those that turned out duplicates (a competing allocation arrived).
    pub conflicts_found: u64,
}

/// Partition episodes: the current one and the last ones that ended.
#[derive(Debug, Clone, Default)]
struct Episodes {
    current: Option<Episode>,
    ended: VecDeque<Episode>,
    last_id: u32,
}

impl Episodes {
    fn observe(&mut self, situation: Situation, now_ms: u64) -> u32 {
        if situation == Situation::InSync {
            if let Some(mut episode) = self.current.take() {
                episode.ended_ms = Some(now_ms);
                if self.ended.len() == MAX_EPISODES {
                    self.ended.pop_front();
                }
                self.ended.push_back(episode);
            }
            return 0;
        }
        let last_id = &mut self.last_id;
        let episode = self.current.get_or_insert_with(|| {
            *last_id = last_id.wrapping_add(1).max(1);
            Episode {
                id: *last_id,
                started_ms: now_ms,
                ended_ms: None,
                worst: situation,
                allocations: 0,
                expected_duplicates: 0.0,
                resolved: 0,
                conflicts_found: 0,
            }
        });
        episode.worst = episode.worst.max(situation);
        episode.id
    }

    fn get_mut(&mut self, id: u32) -> Option<&mut Episode> {
        if id == 0 {
            return None;
        }
        self.current
            .iter_mut()
            .chain(self.ended.iter_mut())
            .find(|e| e.id == id)
    }
}

/// The score of this node's confidence: reliability tables per situation and
/// partition episodes. Pure: fed what the node observes, with `now` passed in.
#[derive(Debug, Clone, Default)]
pub struct Calibration {
    tables: [Reliability; 3],
    episodes: Episodes,
    unattributed_resolved: u64,
    unattributed_conflicted: u64,
}

impl Calibration {
    /// Tells the episode tracker the node's situation at `now_ms`; returns
    /// the id of the episode under way (0 when every peer is reachable), to
    /// be recorded with an allocation made now.
    pub fn observe_situation(&mut self, situation: Situation, now_ms: u64) -> u32 {
        self.episodes.observe(situation, now_ms)
    }

    /// A new allocation of this node, made during `episode` with `confidence`.
    pub fn record_allocation(&mut self, episode: u32, confidence: f64) {
        if let Some(e) = self.episodes.get_mut(episode) {
            e.allocations += 1;
            e.expected_duplicates += (1.0 - confidence).clamp(0.0, 1.0);
        }
    }

    /// An allocation of this node is resolved. `situation` is `None` for one
    /// whose situation is not known (made before the node restarted): it is
    /// counted apart, in no table.
    pub fn record_resolved(
        &mut self,
        situation: Option<Situation>,
        episode: u32,
        confidence: f64,
        conflicted: bool,
    ) {
        let Some(situation) = situation else {
            self.unattributed_resolved += 1;
            self.unattributed_conflicted += u64::from(conflicted);
            return;
        };
        self.tables[situation.index()].record(confidence, conflicted);
        if let Some(e) = self.episodes.get_mut(episode) {
            e.resolved += 1;
            e.conflicts_found += u64::from(conflicted);
        }
    }

    /// The whole score, as `GET /v1/calibration` shows it.
    pub fn report(&self) -> CalibrationReport {
        let mut overall = Reliability::default();
        for table in &self.tables {
            for (sum, bin) in overall.bins.iter_mut().zip(table.bins.iter()) {
                sum.add(bin);
            }
        }
        CalibrationReport {
            overall: overall.report(None),
            situations: Situation::ALL
                .iter()
                .map(|s| self.tables[s.index()].report(Some(*s)))
                .collect(),
            episodes: self
                .episodes
                .ended
                .iter()
                .chain(self.episodes.current.iter())
                .cloned()
                .collect(),
            unattributed: Unattributed {
                resolved: self.unattributed_resolved,
                conflicted: self.unattributed_conflicted,
            },
        }
    }
}

/// Resolved allocations whose situation was not known.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Unattributed {
    /// Resolved allocations made before this node last started.
    pub resolved: u64,
    /// Of those, the ones that conflicted.
    pub conflicted: u64,
}

/// `GET /v1/calibration`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CalibrationReport {
    /// Every resolved allocation of this node with a known situation.
    pub overall: ReliabilityReport,
    /// One table per situation.
    pub situations: Vec<ReliabilityReport>,
    /// Partition episodes, oldest first; the last one may still be under way.
    pub episodes: Vec<Episode>,
    /// Resolved allocations made before the node last started.
    pub unattributed: Unattributed,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_score_what_they_were_told() {
        let mut c = Calibration::default();
        // 100 in sync at 1.0, none conflicting; 100 isolated at 0.7, 30 conflicting.
        for _ in 0..100 {
            c.record_resolved(Some(Situation::InSync), 0, 1.0, false);
        }
        for i in 0..100 {
            c.record_resolved(Some(Situation::Isolated), 0, 0.7, i < 30);
        }
        // 40 partial at 0.95 with 20 conflicts: overconfident.
        for i in 0..40 {
            c.record_resolved(Some(Situation::Partial), 0, 0.95, i < 20);
        }
        let r = c.report();
        let [in_sync, partial, isolated] = &r.situations[..] else {
            panic!("{r:?}")
        };
        assert_eq!(
            (in_sync.resolved, in_sync.verdict),
            (100, Verdict::Calibrated)
        );
        assert!((isolated.conflict_free_share - 0.7).abs() < 1e-9);
        assert!(isolated.ece < 1e-9, "{isolated:?}");
        assert_eq!(isolated.verdict, Verdict::Calibrated);
        assert_eq!(partial.verdict, Verdict::Overconfident);
        assert!((partial.gap - 0.45).abs() < 1e-9, "{partial:?}");
        assert_eq!(r.overall.resolved, 240);
    }

    #[test]
    fn episodes_count_their_own_allocations() {
        let mut c = Calibration::default();
        assert_eq!(c.observe_situation(Situation::InSync, 0), 0);
        let first = c.observe_situation(Situation::Partial, 1_000);
        assert_eq!(c.observe_situation(Situation::Isolated, 2_000), first);
        for _ in 0..10 {
            c.record_allocation(first, 0.8);
        }
        assert_eq!(c.observe_situation(Situation::InSync, 5_000), 0);
        // Resolutions arrive after the heal and still count for the episode.
        for i in 0..10 {
            c.record_resolved(Some(Situation::Isolated), first, 0.8, i < 3);
        }
        let second = c.observe_situation(Situation::Partial, 9_000);
        assert_ne!(first, second);
        let r = c.report();
        assert_eq!(r.episodes.len(), 2);
        let e = &r.episodes[0];
        assert_eq!(
            (e.started_ms, e.ended_ms, e.worst),
            (1_000, Some(5_000), Situation::Isolated)
        );
        assert_eq!((e.allocations, e.resolved, e.conflicts_found), (10, 10, 3));
        assert!((e.expected_duplicates - 2.0).abs() < 1e-9);
        assert_eq!(r.episodes[1].ended_ms, None);
    }

    #[test]
    fn episodes_are_bounded() {
        let mut c = Calibration::default();
        for i in 0..(MAX_EPISODES as u64 + 10) {
            c.observe_situation(Situation::Partial, i * 10);
            c.observe_situation(Situation::InSync, i * 10 + 5);
        }
        let r = c.report();
        assert_eq!(r.episodes.len(), MAX_EPISODES);
        assert_eq!(
            r.episodes.last().map(|e| e.id),
            Some(MAX_EPISODES as u32 + 10)
        );
    }

    #[test]
    fn unknown_situations_are_counted_apart() {
        let mut c = Calibration::default();
        c.record_resolved(None, 0, 0.5, true);
        let r = c.report();
        assert_eq!((r.unattributed.resolved, r.unattributed.conflicted), (1, 1));
        assert_eq!(r.overall.resolved, 0);
        assert_eq!(r.overall.verdict, Verdict::TooFewResolved);
    }
}
