//! What the model has learnt, as it is kept across restarts.
//!
//! A node restarted during an incident (a deploy, a crash) would otherwise
//! judge the rest of it by the prior alone, and a cluster that restarts
//! often would never get past its warm-up. The counts and histograms the
//! estimates rest on are few (a few hundred numbers), so they are saved as
//! a whole and read back at start; the tabulated terms are rebuilt from
//! them. What is read is checked number by number: a file that is not
//! exactly what a model could have written is refused as a whole, and the
//! node starts from the prior.

use super::delays::{Delays, BUCKETS};
use super::Situation;
use serde::{Deserialize, Serialize};

/// Version of the saved form; another version is refused.
pub const LEARNT_VERSION: u32 = 1;

/// The learnt state of a [`super::ConfidenceModel`], without its parameters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Learnt {
    /// [`LEARNT_VERSION`].
    pub v: u32,
    /// Local allocations counted.
    pub allocations: f64,
    /// Cross-region replays counted.
    pub replays: f64,
    /// Conflicts of allocations made in sync counted.
    pub conflicts: f64,
    /// Observed delays of cross-region attempts, per bucket.
    pub delays: Vec<f64>,
    /// Outages counted, and their log sum.
    pub outages: f64,
    /// Σ ln((c + d) / (c + m)) over the outages.
    pub outage_log_sum: f64,
    /// Allocations since the last halving.
    pub since_halving: u64,
    /// Per situation, in [`Situation::ALL`] order.
    pub situations: Vec<LearntSituation>,
}

/// What is learnt about one situation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LearntSituation {
    /// Delays of the conflicts its allocations met, per bucket.
    pub delays: Vec<f64>,
    /// Resolved allocations made in it.
    pub resolved: f64,
    /// Of those, the conflicted ones.
    pub conflicted: f64,
    /// Σ (1 − calm confidence) over them.
    pub calm_conflicts: f64,
    /// Σ calm confidence × failover window over them.
    pub failover_exposure: f64,
}

/// Why a saved state was refused.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum LearntError {
    /// Not the version this build writes.
    #[error("version {0} of the learnt confidence state, this build reads {LEARNT_VERSION}")]
    Version(u32),
    /// A count that is negative, infinite or not a number.
    #[error("{0} is not a finite count")]
    Count(&'static str),
    /// A histogram or table of the wrong length.
    #[error("{what} has {found} entries, not {expected}")]
    Length {
        /// Which one.
        what: &'static str,
        /// Entries found.
        found: usize,
        /// Entries expected.
        expected: usize,
    },
}

/// A count as the model keeps it: finite and not negative.
pub(super) fn count(x: f64, what: &'static str) -> Result<f64, LearntError> {
    if x.is_finite() && x >= 0.0 {
        Ok(x)
    } else {
        Err(LearntError::Count(what))
    }
}

/// A histogram read back, every bucket a count.
pub(super) fn histogram(values: &[f64], what: &'static str) -> Result<Delays, LearntError> {
    if values.len() != BUCKETS {
        return Err(LearntError::Length {
            what,
            found: values.len(),
            expected: BUCKETS,
        });
    }
    let mut mass = [0.0; BUCKETS];
    for (m, &v) in mass.iter_mut().zip(values) {
        *m = count(v, what)?;
    }
    Ok(Delays(mass))
}

impl Learnt {
    /// Checks the version and the shape; the numbers are checked as they
    /// are taken ([`count`], [`histogram`]).
    pub(super) fn check_shape(&self) -> Result<(), LearntError> {
        if self.v != LEARNT_VERSION {
            return Err(LearntError::Version(self.v));
        }
        if self.situations.len() != Situation::ALL.len() {
            return Err(LearntError::Length {
                what: "situations",
                found: self.situations.len(),
                expected: Situation::ALL.len(),
            });
        }
        Ok(())
    }
}
