//! Anomaly flags against a node's own baseline: pure code, fed samples and
//! the time they were taken, so it is tested on virtual time.
//!
//! A fixed threshold tells an operator when an indicator is bad in absolute
//! terms; it cannot tell when a link that usually replicates in 20 ms takes
//! 900 ms, long before any fixed bound is reached. Each [`Detector`] keeps
//! an exponentially weighted mean and variance of one indicator (the
//! replication lag to one peer, say) with a time constant of
//! [`DetectorParams::window`], and says the indicator is anomalous once it
//! has stayed above `mean + max(k · sd, min_excess)` for
//! [`DetectorParams::sustain`]:
//!
//! - the weights follow time, not sample counts (`alpha = 1 - e^(-dt/window)`),
//!   so an irregular sampling rate does not change what "the last hour" means;
//! - nothing is flagged until the baseline has learned for
//!   [`DetectorParams::warmup`]: a fresh node has no idea what normal is;
//! - `min_excess` keeps a flat series (a lag that is always 0 has a standard
//!   deviation of 0) from flagging every blip;
//! - samples above the threshold are not learned, so an incident does not
//!   become the baseline while it lasts; one that lasts a whole window is
//!   taken as the new normal: the baseline starts again from it (and warms
//!   up again), while the fixed thresholds beside it still apply.

use std::time::Duration;

/// How one detector judges its indicator. The window, warm-up, sustain and
/// `k` come from the `[health.anomaly]` TOML section; `min_excess` is per
/// indicator (docs/OPERATIONS.md lists the defaults and their reasons).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DetectorParams {
    /// Time constant of the exponentially weighted mean and variance.
    pub window: Duration,
    /// Learning time before anything may be flagged.
    pub warmup: Duration,
    /// How long an indicator must stay above its threshold to be flagged.
    pub sustain: Duration,
    /// Standard deviations above the mean that count as above the baseline.
    pub k: f64,
    /// Least distance above the mean that counts, in the indicator's unit.
    pub min_excess: f64,
}

/// What a detector made of one sample.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Reading {
    /// The sample.
    pub value: f64,
    /// The baseline's mean before this sample.
    pub mean: f64,
    /// The threshold the sample was compared with (`None` while warming up).
    pub threshold: Option<f64>,
    /// Since when (ms) the indicator has been above its threshold, if it is.
    pub above_since_ms: Option<u64>,
    /// Above the threshold for at least `sustain`.
    pub anomalous: bool,
}

/// A rolling baseline of one indicator and whether it is anomalous now.
#[derive(Clone, Debug)]
pub struct Detector {
    params: DetectorParams,
    mean: f64,
    variance: f64,
    learned_ms: u64,
    last_ms: Option<u64>,
    above_since_ms: Option<u64>,
    last: Option<Reading>,
}

impl Detector {
    /// A detector that has seen nothing yet.
    pub fn new(params: DetectorParams) -> Self {
        Self {
            params,
            mean: 0.0,
            variance: 0.0,
            learned_ms: 0,
            last_ms: None,
            above_since_ms: None,
            last: None,
        }
    }

    /// Feeds the sample `value` taken at `now_ms`. Samples must come in time
    /// order; one that does not, or that is not a finite number, is ignored
    /// and the previous reading is returned.
    pub fn observe(&mut self, now_ms: u64, value: f64) -> Option<Reading> {
        if !value.is_finite() || self.last_ms.is_some_and(|t| now_ms < t) {
            return self.last;
        }
        let Some(last_ms) = self.last_ms else {
            self.last_ms = Some(now_ms);
            self.mean = value;
            self.last = Some(Reading {
                value,
                mean: value,
                threshold: None,
                above_since_ms: None,
                anomalous: false,
            });
            return self.last;
        };
        let dt = now_ms - last_ms;
        let threshold = (self.learned_ms >= self.params.warmup.as_millis() as u64).then(|| {
            self.mean + (self.params.k * self.variance.sqrt()).max(self.params.min_excess)
        });
        let above = threshold.is_some_and(|t| value > t);
        self.above_since_ms = if above {
            Some(self.above_since_ms.unwrap_or(now_ms))
        } else {
            None
        };
        let anomalous = self
            .above_since_ms
            .is_some_and(|since| now_ms - since >= self.params.sustain.as_millis() as u64);
        let reading = Reading {
            value,
            mean: self.mean,
            threshold,
            above_since_ms: self.above_since_ms,
            anomalous,
        };
        self.last_ms = Some(now_ms);
        self.last = Some(reading);
        let window_ms = self.params.window.as_millis() as u64;
        match self.above_since_ms {
            None => {
                self.learn(dt, value);
                self.learned_ms += dt;
            }
            // A whole window above: this is the new normal.
            Some(since) if now_ms - since >= window_ms => {
                self.mean = value;
                self.variance = 0.0;
                self.learned_ms = 0;
                self.above_since_ms = None;
            }
            Some(_) => {}
        }
        self.last
    }

    /// The last reading, if any sample came.
    pub fn last(&self) -> Option<Reading> {
        self.last
    }

    fn learn(&mut self, dt_ms: u64, value: f64) {
        let window = self.params.window.as_secs_f64().max(f64::MIN_POSITIVE);
        let alpha = 1.0 - (-(dt_ms as f64 / 1000.0) / window).exp();
        let diff = value - self.mean;
        let step = alpha * diff;
        self.mean += step;
        self.variance = (1.0 - alpha) * (self.variance + diff * step);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn params() -> DetectorParams {
        DetectorParams {
            window: Duration::from_secs(600),
            warmup: Duration::from_secs(60),
            sustain: Duration::from_secs(30),
            k: 4.0,
            min_excess: 0.5,
        }
    }

    /// Feeds `f(second)` once a second from `from` to `to`; returns the last reading.
    fn run(d: &mut Detector, from: u64, to: u64, f: impl Fn(u64) -> f64) -> Reading {
        let mut last = None;
        for s in from..to {
            last = d.observe(s * 1000, f(s));
        }
        last.expect("at least one sample")
    }

    /// A lag that wobbles around 50 ms.
    fn normal(s: u64) -> f64 {
        0.05 + 0.01 * ((s % 7) as f64 - 3.0) / 3.0
    }

    #[test]
    fn a_jump_well_above_the_baseline_is_flagged_after_the_sustain_time() {
        let mut d = Detector::new(params());
        let r = run(&mut d, 0, 3600, normal);
        assert!(!r.anomalous);
        assert!((r.mean - 0.05).abs() < 0.01, "{r:?}");
        let threshold = r.threshold.unwrap();
        assert!(threshold < 0.6, "{r:?}");
        // The link slows to 2 s: above at once, anomalous 30 s later.
        let r = d.observe(3600 * 1000, 2.0).unwrap();
        assert_eq!(r.above_since_ms, Some(3_600_000));
        assert!(!r.anomalous);
        let r = run(&mut d, 3601, 3629, |_| 2.0);
        assert!(!r.anomalous, "{r:?}");
        let r = run(&mut d, 3629, 3632, |_| 2.0);
        assert!(r.anomalous, "{r:?}");
        // The incident does not become the baseline while it lasts.
        let r = run(&mut d, 3632, 3632 + 500, |_| 2.0);
        assert!(r.anomalous && r.mean < 0.1, "{r:?}");
        // Back to normal: no longer flagged at the first normal sample.
        let r = d.observe((3632 + 500) * 1000, 0.05).unwrap();
        assert!(!r.anomalous && r.above_since_ms.is_none(), "{r:?}");
    }

    #[test]
    fn a_short_spike_is_not_flagged() {
        let mut d = Detector::new(params());
        run(&mut d, 0, 600, normal);
        let r = run(&mut d, 600, 620, |_| 3.0);
        assert!(!r.anomalous && r.above_since_ms == Some(600_000), "{r:?}");
        let r = d.observe(620_000, 0.05).unwrap();
        assert!(!r.anomalous && r.above_since_ms.is_none());
        // The next spike starts its own sustain time.
        let r = run(&mut d, 621, 640, |_| 3.0);
        assert!(!r.anomalous, "{r:?}");
    }

    #[test]
    fn nothing_is_flagged_while_warming_up() {
        let mut d = Detector::new(params());
        let r = run(&mut d, 0, 59, |_| 0.0);
        assert_eq!(r.threshold, None);
        let r = run(&mut d, 59, 59 + 45, |_| 100.0);
        // 100 is above from the first sample after warm-up, and 30 s later flagged.
        assert!(r.anomalous, "{r:?}");
        let mut d = Detector::new(params());
        let r = run(&mut d, 0, 50, |s| if s < 10 { 0.0 } else { 100.0 });
        assert!(!r.anomalous && r.threshold.is_none(), "{r:?}");
    }

    #[test]
    fn a_flat_series_needs_the_least_excess() {
        let mut d = Detector::new(params());
        run(&mut d, 0, 600, |_| 0.0);
        // sd is 0: 0.4 is within min_excess, 0.6 is not.
        let r = d.observe(600_000, 0.4).unwrap();
        assert!(
            r.above_since_ms.is_none() && r.threshold == Some(0.5),
            "{r:?}"
        );
        let r = run(&mut d, 601, 640, |_| 0.6);
        assert!(r.anomalous, "{r:?}");
    }

    #[test]
    fn a_level_that_lasts_a_window_becomes_the_baseline() {
        let mut d = Detector::new(params());
        run(&mut d, 0, 600, normal);
        let r = run(&mut d, 600, 600 + 599, |_| 2.0);
        assert!(r.anomalous, "{r:?}");
        // A window above: the baseline starts again from the new level.
        let r = run(&mut d, 1199, 1202, |_| 2.0);
        assert!(!r.anomalous && r.threshold.is_none(), "{r:?}");
        let r = run(&mut d, 1202, 1400, |_| 2.0);
        assert!(!r.anomalous && (r.mean - 2.0).abs() < 1e-9, "{r:?}");
    }

    #[test]
    fn irregular_sampling_means_the_same_window() {
        // Once a second or once every ten seconds, the same hour of a level
        // shift moves the mean about the same way.
        let p = DetectorParams {
            min_excess: 1e9,
            ..params()
        };
        let (mut fast2, mut slow2) = (Detector::new(p), Detector::new(p));
        for s in 0..1200 {
            fast2.observe(s * 1000, if s < 600 { 0.0 } else { 1.0 });
        }
        for s in (0..1200).step_by(10) {
            slow2.observe(s * 1000, if s < 600 { 0.0 } else { 1.0 });
        }
        let (a, b) = (fast2.last().unwrap().mean, slow2.last().unwrap().mean);
        assert!((a - b).abs() < 0.03, "{a} vs {b}");
        assert!((a - (1.0 - (-1.0f64).exp())).abs() < 0.03, "{a}");
    }

    #[test]
    fn bad_samples_are_ignored() {
        let mut d = Detector::new(params());
        assert_eq!(d.observe(1000, f64::NAN), None);
        let first = d.observe(2000, 1.0);
        assert_eq!(d.observe(3000, f64::INFINITY), first);
        assert_eq!(d.observe(1000, 5.0), first, "a sample from the past");
    }

    proptest! {
        #[test]
        fn never_panics_and_mean_stays_within_the_samples(
            samples in proptest::collection::vec((0u64..10_000, -1e6f64..1e6), 1..200)
        ) {
            let mut d = Detector::new(params());
            let (mut t, mut lo, mut hi) = (0u64, f64::MAX, f64::MIN);
            for (dt, v) in samples {
                t += dt;
                lo = lo.min(v);
                hi = hi.max(v);
                let r = d.observe(t, v).unwrap();
                prop_assert!(r.mean >= lo - 1e-6 && r.mean <= hi + 1e-6);
            }
        }
    }
}
