//! The two terms of a peer's risk as functions of its staleness, tabulated.
//!
//! Evaluating them exactly walks every delay bucket (with a `powf` each for
//! the remaining outage), which is about a microsecond per peer: a query with
//! 50 peers would take 50 µs on every allocation. The estimates change slowly
//! (one observation moves them by a fraction of a percent once history has
//! built up), so each term is tabulated on a grid of staleness values and
//! interpolated; the table is rebuilt when the estimates have moved.

use super::delays::Distribution;

/// Grid points per octave of staleness, evenly spaced within the octave.
const PER_OCTAVE: usize = 4;
/// Smallest tabulated staleness above zero: 2^FIRST_OCTAVE s (about 8 ms).
const FIRST_OCTAVE: i32 = -7;
/// Tabulated octaves: 8 ms to 2^20 s (about 12 days); beyond, the last value.
const OCTAVES: usize = 27;
const POINTS: usize = OCTAVES * PER_OCTAVE + 1;

/// A peer's risk terms by staleness, for one delay distribution and outage model.
#[derive(Debug, Clone)]
pub(super) struct Curves {
    /// P(delay < age + lag): their allocations we cannot see yet.
    backward: [f64; POINTS + 1],
    /// P(delay < remaining outage + lag) for an unreachable peer: ours it
    /// will not see in time.
    before_heal: [f64; POINTS + 1],
    /// P(delay < lag): ours a connected peer will not see in time.
    within_lag: f64,
}

impl Curves {
    /// Tabulates the terms at the staleness of every grid point ([`age_at`]).
    pub fn build(delays: &Distribution, lag: f64, scale: f64, shape: f64) -> Self {
        let mut backward = [0.0; POINTS + 1];
        let mut before_heal = [0.0; POINTS + 1];
        for i in 0..=POINTS {
            let age = age_at(i);
            backward[i] = delays.cdf(age + lag);
            before_heal[i] = delays.before_heal(age, lag, scale, shape);
        }
        Self {
            backward,
            before_heal,
            within_lag: delays.cdf(lag),
        }
    }

    /// A table of no risk, to be replaced by a built one.
    pub fn empty() -> Self {
        Self {
            backward: [0.0; POINTS + 1],
            before_heal: [0.0; POINTS + 1],
            within_lag: 0.0,
        }
    }

    /// The two terms for one peer: the share of cross-region attempts on a
    /// new allocation that could conflict through it because we cannot see
    /// its allocations yet (backward), and because it will not see ours in
    /// time (forward).
    pub fn peer_terms(&self, staleness_secs: f64, behind_secs: f64, connected: bool) -> (f64, f64) {
        (
            self.backward(staleness_secs),
            self.forward(staleness_secs, behind_secs, connected),
        )
    }

    /// The backward term of a peer stale by `staleness_secs`.
    pub fn backward(&self, staleness_secs: f64) -> f64 {
        lerp(&self.backward, staleness_secs)
    }

    /// The forward term of a peer: before the heal if unreachable; a
    /// connected peer `behind_secs` slower than the lag sees ours within
    /// `lag + behind`, which is the backward table read at `behind`.
    pub fn forward(&self, staleness_secs: f64, behind_secs: f64, connected: bool) -> f64 {
        if !connected {
            lerp(&self.before_heal, staleness_secs)
        } else if behind_secs > 0.0 {
            lerp(&self.backward, behind_secs)
        } else {
            self.within_lag
        }
    }
}

/// A table of terms with the weight of the observations that moved the
/// estimates under it since it was built.
#[derive(Debug, Clone)]
pub(super) struct Tabulated {
    curves: Curves,
    unbuilt: f64,
}

impl Tabulated {
    /// A table to be built at the first query.
    pub fn unbuilt() -> Self {
        Self {
            curves: Curves::empty(),
            unbuilt: f64::INFINITY,
        }
    }

    /// Notes that observations of `weight` moved the estimates.
    pub fn moved(&mut self, weight: f64) {
        self.unbuilt += weight;
    }

    /// Whether the observations since the last build reach 1 % of the
    /// `basis` they rest on: a single observation then moves the terms by
    /// well under that, so the table may wait until then.
    pub fn stale(&self, basis: f64) -> bool {
        self.unbuilt >= 0.01 * basis
    }

    /// Replaces the table by a newly built one.
    pub fn rebuilt(&mut self, curves: Curves) {
        self.curves = curves;
        self.unbuilt = 0.0;
    }

    /// The table as last built.
    pub fn curves(&self) -> &Curves {
        &self.curves
    }
}

/// The table `t` at `age` seconds, interpolated between its grid points.
fn lerp(t: &[f64; POINTS + 1], age: f64) -> f64 {
    let (at, frac) = position(age);
    t[at] + (t[(at + 1).min(POINTS)] - t[at]) * frac
}

/// Staleness at grid point `i`: 0, then `2^(FIRST_OCTAVE + o) · (1 + j / PER_OCTAVE)`
/// for point `1 + o·PER_OCTAVE + j`.
fn age_at(i: usize) -> f64 {
    if i == 0 {
        return 0.0;
    }
    let (octave, step) = ((i - 1) / PER_OCTAVE, (i - 1) % PER_OCTAVE);
    2f64.powi(FIRST_OCTAVE + octave as i32) * (1.0 + step as f64 / PER_OCTAVE as f64)
}

/// The grid cell of `age` seconds and the fraction inside it, read from the
/// bits of the float (exponent: the octave; mantissa: the place in it), so
/// that a query takes no logarithm per peer.
fn position(age: f64) -> (usize, f64) {
    let first = 2f64.powi(FIRST_OCTAVE);
    if age.is_nan() || age <= 0.0 {
        return (0, 0.0);
    }
    if age < first {
        return (0, age / first);
    }
    let bits = age.to_bits();
    let octave = ((bits >> 52) & 0x7ff) as i32 - 1023 - FIRST_OCTAVE;
    if octave >= OCTAVES as i32 || !age.is_finite() {
        return (POINTS, 0.0);
    }
    // The mantissa as a number in [1, 2).
    let mantissa = f64::from_bits((bits & ((1u64 << 52) - 1)) | (1023u64 << 52));
    let steps = (mantissa - 1.0) * PER_OCTAVE as f64;
    let step = (steps as usize).min(PER_OCTAVE - 1);
    (
        1 + octave as usize * PER_OCTAVE + step,
        (steps - step as f64).clamp(0.0, 1.0),
    )
}

#[cfg(test)]
mod tests {
    use super::super::delays::Delays;
    use super::*;

    #[test]
    fn interpolation_stays_close_to_the_exact_terms() {
        let delays = Delays::normalised(&[
            &Delays::log_uniform(1.0, 300.0, 10.0),
            &Delays::log_uniform(0.1, 2.0, 3.0),
        ]);
        let curves = Curves::build(&delays, 0.25, 10.0, 1.5);
        for age in [0.0, 0.003, 0.2, 1.0, 2.7, 13.0, 47.0, 300.0, 5_000.0, 1e7] {
            for connected in [true, false] {
                let exact = delays.cdf(age + 0.25)
                    + if connected {
                        delays.cdf(0.25)
                    } else {
                        delays.before_heal(age, 0.25, 10.0, 1.5)
                    };
                let (backward, forward) = curves.peer_terms(age, 0.0, connected);
                let table = backward + forward;
                assert!(
                    (exact - table).abs() < 0.01,
                    "age {age} connected {connected}: exact {exact} table {table}"
                );
                // A connected peer that far behind sees ours within lag + age.
                let (_, slow) = curves.peer_terms(0.0, age, true);
                assert!((slow - delays.cdf(age + 0.25)).abs() < 0.01, "behind {age}");
            }
        }
    }

    #[test]
    fn positions_never_leave_the_table() {
        for age in [f64::NAN, -5.0, 0.0, 1e-9, 0.01, 1e6, 1e300, f64::INFINITY] {
            let (at, frac) = position(age);
            assert!(at <= POINTS && (0.0..=1.0).contains(&frac), "{age}");
        }
        // Grid points are found where they are.
        for i in 1..POINTS {
            let (at, frac) = position(age_at(i));
            assert_eq!((at, frac), (i, 0.0), "point {i} at {}", age_at(i));
        }
    }
}
