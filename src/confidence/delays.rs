//! The distribution of retry delays: how long after a key's first allocation
//! another region's attempt on it comes. A histogram of log-spaced buckets,
//! log-linear inside a bucket, so that double submits (tens of ms), client
//! retries (seconds) and people (minutes) all get resolution.

/// Number of retry-delay buckets: `[0, 10 ms)`, then edges growing by √2 up to ~23 h, then
/// one overflow bucket.
pub(super) const BUCKETS: usize = 48;
/// Upper edge of the first bucket, in seconds.
const FIRST_EDGE_SECS: f64 = 0.01;

/// Mass per delay bucket: pseudo-counts of a prior, or observations.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) struct Delays(pub [f64; BUCKETS]);

impl Default for Delays {
    fn default() -> Self {
        Self([0.0; BUCKETS])
    }
}

impl Delays {
    /// `weight` pseudo-counts spread log-uniformly over `[lo, hi]` seconds.
    pub fn log_uniform(lo: f64, hi: f64, weight: f64) -> Self {
        let mut mass = [0.0; BUCKETS];
        if hi > lo {
            let span = (hi / lo).ln();
            for (i, m) in mass.iter_mut().enumerate() {
                let (b_lo, b_hi) = edges(i);
                let overlap = hi.min(b_hi).ln() - lo.max(b_lo).ln();
                *m = weight * (overlap / span).max(0.0);
            }
        } else {
            mass[bucket_of(lo)] = weight;
        }
        Self(mass)
    }

    /// Adds `weight` observations of a delay of `secs` seconds.
    pub fn add(&mut self, secs: f64, weight: f64) {
        self.0[bucket_of(secs)] += weight;
    }

    /// Halves every count (forgetting old history).
    pub fn halve(&mut self) {
        self.0.iter_mut().for_each(|m| *m /= 2.0);
    }

    /// Total mass.
    pub fn total(&self) -> f64 {
        self.0.iter().sum()
    }

    /// The sum of several histograms, normalised to a probability distribution
    /// (all zero if they hold no mass).
    pub fn normalised(parts: &[&Delays]) -> Distribution {
        let mut mass = [0.0; BUCKETS];
        for part in parts {
            for (m, p) in mass.iter_mut().zip(part.0.iter()) {
                *m += p;
            }
        }
        let total: f64 = mass.iter().sum();
        if total > 0.0 && total.is_finite() {
            mass.iter_mut().for_each(|m| *m /= total);
        } else {
            mass = [0.0; BUCKETS];
        }
        Distribution(mass)
    }
}

/// A normalised delay histogram.
#[derive(Debug, Clone, Copy)]
pub(super) struct Distribution([f64; BUCKETS]);

impl Distribution {
    /// P(delay < `x` seconds), log-linear inside a bucket.
    pub fn cdf(&self, x: f64) -> f64 {
        let mut acc = 0.0;
        for (i, m) in self.0.iter().enumerate() {
            let (lo, hi) = edges(i);
            if x >= hi {
                acc += m;
                continue;
            }
            if x > lo {
                let within = if i == 0 {
                    x / hi
                } else if hi.is_finite() {
                    (x / lo).ln() / (hi / lo).ln()
                } else {
                    0.0
                };
                acc += m * within;
            }
            break;
        }
        acc.clamp(0.0, 1.0)
    }

    /// Quantile `q`, in seconds (inverse of [`Distribution::cdf`]).
    pub fn quantile(&self, q: f64) -> f64 {
        let mut acc = 0.0;
        for (i, &m) in self.0.iter().enumerate() {
            let (lo, hi) = edges(i);
            if m > 0.0 && acc + m >= q {
                let within = ((q - acc) / m).clamp(0.0, 1.0);
                return if i == 0 {
                    hi * within
                } else if hi.is_finite() {
                    lo * (hi / lo).powf(within)
                } else {
                    lo
                };
            }
            acc += m;
        }
        0.0
    }

    /// P(delay < remaining outage + `lag`) for a peer unreachable for `age`
    /// seconds, when outages are Lomax with scale `scale` and shape `shape`:
    /// the remaining outage is then Lomax with scale `scale + age`. Each
    /// bucket's mass sits at its geometric middle; the overflow bucket
    /// (retries after about a day) never counts as inside the window.
    pub fn before_heal(&self, age: f64, lag: f64, scale: f64, shape: f64) -> f64 {
        let scale = scale + age;
        (0..BUCKETS - 1)
            .map(|i| {
                let (lo, hi) = edges(i);
                let delay = if i == 0 { hi / 2.0 } else { (lo * hi).sqrt() };
                let wait = (delay - lag).max(0.0);
                let survive = (scale / (scale + wait)).powf(shape);
                self.0[i] * if survive.is_finite() { survive } else { 0.0 }
            })
            .sum::<f64>()
            .clamp(0.0, 1.0)
    }
}

/// Lower and upper edge of bucket `i`, in seconds.
fn edges(i: usize) -> (f64, f64) {
    let edge = |k: usize| FIRST_EDGE_SECS * std::f64::consts::SQRT_2.powi(k as i32);
    match i {
        0 => (0.0, FIRST_EDGE_SECS),
        i if i >= BUCKETS - 1 => (edge(BUCKETS - 2), f64::INFINITY),
        i => (edge(i - 1), edge(i)),
    }
}

/// Bucket holding a delay of `secs` seconds.
fn bucket_of(secs: f64) -> usize {
    if secs.is_nan() || secs < FIRST_EDGE_SECS {
        return 0;
    }
    let steps = 2.0 * (secs / FIRST_EDGE_SECS).log2();
    let index = 1 + steps.floor().min(BUCKETS as f64) as usize;
    index.min(BUCKETS - 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cdf_and_quantile_are_inverse_and_monotone() {
        let d = Delays::normalised(&[&Delays::log_uniform(1.0, 300.0, 10.0)]);
        assert_eq!(d.cdf(0.5), 0.0);
        assert!((d.cdf(1_000.0) - 1.0).abs() < 1e-9);
        let mut last = 0.0;
        for q in [0.1, 0.25, 0.5, 0.75, 0.9] {
            let x = d.quantile(q);
            assert!(x > last, "{q}: {x}");
            assert!((d.cdf(x) - q).abs() < 1e-6, "{q}: cdf({x}) = {}", d.cdf(x));
            last = x;
        }
    }

    #[test]
    fn buckets_cover_every_delay() {
        for secs in [
            f64::NAN,
            -1.0,
            0.0,
            0.009,
            0.01,
            1.0,
            86_400.0,
            f64::INFINITY,
        ] {
            assert!(bucket_of(secs) < BUCKETS, "{secs}");
        }
        assert_eq!(bucket_of(1e12), BUCKETS - 1);
    }

    #[test]
    fn a_longer_outage_leaves_more_retries_before_heal() {
        let d = Delays::normalised(&[&Delays::log_uniform(1.0, 300.0, 10.0)]);
        let young = d.before_heal(1.0, 0.25, 10.0, 1.5);
        let old = d.before_heal(600.0, 0.25, 10.0, 1.5);
        assert!(0.0 < young && young < old && old <= 1.0, "{young} {old}");
    }
}
