//! The `[health]` section of the TOML file: the fixed thresholds and the
//! anomaly detectors' parameters health is judged by, with defaults that
//! docs/OPERATIONS.md explains.
//!
//! ```toml
//! [health]
//! stale_peer_after = "10s"
//! conflict_open_too_long = "60s"
//! lag_threshold = "30s"
//! delta_threshold = 50000
//! near_miss_threshold = 0.01
//! near_miss_window = "5m"
//!
//! [health.anomaly]
//! window = "1h"
//! warmup = "10m"
//! sustain = "2m"
//! k = 4.0
//! lag_min_excess = "500ms"
//! delta_min_excess = 1000
//! clock_offset_min_excess = "100ms"
//! near_miss_min_excess = 0.005
//! ```

use crate::anomaly::DetectorParams;
use crate::config::ConfigError;
use serde::Deserialize;
use std::time::Duration;

/// The `[health]` table as written in the file; every field optional.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthFile {
    /// A connected peer not in sync for longer is `peer_stale`.
    pub stale_peer_after: Option<String>,
    /// A conflict open (not yet compensated) for longer is reported.
    pub conflict_open_too_long: Option<String>,
    /// A replication lag above this is `lag_high`.
    pub lag_threshold: Option<String>,
    /// More changes than this missing from a peer is `delta_high`.
    pub delta_threshold: Option<u64>,
    /// Cross-region replays per new allocation above this is `near_miss_rate_high`.
    pub near_miss_threshold: Option<f64>,
    /// The time over which the near-miss rate is measured.
    pub near_miss_window: Option<String>,
    /// The anomaly detectors.
    pub anomaly: Option<AnomalyFile>,
}

/// The `[health.anomaly]` table as written in the file.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AnomalyFile {
    /// Time constant of the baselines.
    pub window: Option<String>,
    /// Learning time before anything is flagged.
    pub warmup: Option<String>,
    /// How long an indicator stays above its baseline before it is flagged.
    pub sustain: Option<String>,
    /// Standard deviations above the mean that count as above the baseline.
    pub k: Option<f64>,
    /// Least excess over the baseline that counts for the lag.
    pub lag_min_excess: Option<String>,
    /// Least excess for the store delta, in changes.
    pub delta_min_excess: Option<u64>,
    /// Least excess for the clock offset.
    pub clock_offset_min_excess: Option<String>,
    /// Least excess for the near-miss rate (replays per allocation).
    pub near_miss_min_excess: Option<f64>,
}

/// The validated health settings.
#[derive(Clone, Debug, PartialEq)]
pub struct HealthSettings {
    /// See [`HealthFile::stale_peer_after`].
    pub stale_peer_after: Duration,
    /// See [`HealthFile::conflict_open_too_long`].
    pub conflict_open_too_long: Duration,
    /// See [`HealthFile::lag_threshold`].
    pub lag_threshold: Duration,
    /// See [`HealthFile::delta_threshold`].
    pub delta_threshold: u64,
    /// See [`HealthFile::near_miss_threshold`].
    pub near_miss_threshold: f64,
    /// See [`HealthFile::near_miss_window`].
    pub near_miss_window: Duration,
    /// Detector parameters per indicator.
    pub lag: DetectorParams,
    /// See [`HealthSettings::lag`].
    pub delta: DetectorParams,
    /// See [`HealthSettings::lag`].
    pub clock_offset: DetectorParams,
    /// See [`HealthSettings::lag`].
    pub near_miss: DetectorParams,
}

impl Default for HealthSettings {
    fn default() -> Self {
        HealthFile::default()
            .validate()
            .expect("the defaults are valid")
    }
}

fn invalid(setting: &'static str, value: impl ToString, reason: &str) -> ConfigError {
    ConfigError::Invalid {
        setting,
        value: value.to_string(),
        reason: reason.to_owned(),
    }
}

fn duration(
    setting: &'static str,
    value: &Option<String>,
    default: &str,
) -> Result<Duration, ConfigError> {
    let text = value.as_deref().unwrap_or(default);
    let parsed =
        humantime::parse_duration(text).map_err(|e| invalid(setting, text, &e.to_string()))?;
    if parsed.is_zero() {
        return Err(invalid(setting, text, "must be greater than zero"));
    }
    Ok(parsed)
}

fn positive(setting: &'static str, value: Option<f64>, default: f64) -> Result<f64, ConfigError> {
    let v = value.unwrap_or(default);
    if !(v.is_finite() && v > 0.0) {
        return Err(invalid(setting, v, "must be a number greater than zero"));
    }
    Ok(v)
}

impl HealthFile {
    /// Fills in the defaults and checks every value.
    pub fn validate(&self) -> Result<HealthSettings, ConfigError> {
        let a = self.anomaly.clone().unwrap_or_default();
        let window = duration("health.anomaly.window", &a.window, "1h")?;
        let warmup = duration("health.anomaly.warmup", &a.warmup, "10m")?;
        let sustain = duration("health.anomaly.sustain", &a.sustain, "2m")?;
        let k = positive("health.anomaly.k", a.k, 4.0)?;
        if sustain >= window {
            return Err(invalid(
                "health.anomaly.sustain",
                humantime::format_duration(sustain),
                "must be shorter than health.anomaly.window",
            ));
        }
        let params = |min_excess: f64| DetectorParams {
            window,
            warmup,
            sustain,
            k,
            min_excess,
        };
        let delta_threshold = self.delta_threshold.unwrap_or(50_000);
        if delta_threshold == 0 {
            return Err(invalid("health.delta_threshold", 0, "must be at least 1"));
        }
        Ok(HealthSettings {
            stale_peer_after: duration("health.stale_peer_after", &self.stale_peer_after, "10s")?,
            conflict_open_too_long: duration(
                "health.conflict_open_too_long",
                &self.conflict_open_too_long,
                "60s",
            )?,
            lag_threshold: duration("health.lag_threshold", &self.lag_threshold, "30s")?,
            delta_threshold,
            near_miss_threshold: positive(
                "health.near_miss_threshold",
                self.near_miss_threshold,
                0.01,
            )?,
            near_miss_window: duration("health.near_miss_window", &self.near_miss_window, "5m")?,
            lag: params(
                duration("health.anomaly.lag_min_excess", &a.lag_min_excess, "500ms")?
                    .as_secs_f64(),
            ),
            delta: params(a.delta_min_excess.unwrap_or(1000).max(1) as f64),
            clock_offset: params(
                duration(
                    "health.anomaly.clock_offset_min_excess",
                    &a.clock_offset_min_excess,
                    "100ms",
                )?
                .as_secs_f64(),
            ),
            near_miss: params(positive(
                "health.anomaly.near_miss_min_excess",
                a.near_miss_min_excess,
                0.005,
            )?),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_the_documented_ones() {
        let s = HealthSettings::default();
        assert_eq!(s.stale_peer_after, Duration::from_secs(10));
        assert_eq!(s.lag_threshold, Duration::from_secs(30));
        assert_eq!(s.lag.window, Duration::from_secs(3600));
        assert_eq!(s.lag.sustain, Duration::from_secs(120));
        assert_eq!(s.lag.k, 4.0);
        assert_eq!(s.lag.min_excess, 0.5);
        assert_eq!(s.clock_offset.min_excess, 0.1);
        assert_eq!(s.delta.min_excess, 1000.0);
    }

    #[test]
    fn a_toml_section_sets_them_and_bad_values_name_the_setting() {
        let file: HealthFile = toml::from_str(
            "lag_threshold = \"5s\"\n[anomaly]\nwindow = \"20s\"\nwarmup = \"5s\"\nsustain = \"2s\"\nk = 3.0\n",
        )
        .unwrap();
        let s = file.validate().unwrap();
        assert_eq!(s.lag_threshold, Duration::from_secs(5));
        assert_eq!(s.near_miss.window, Duration::from_secs(20));
        assert_eq!(s.delta.k, 3.0);
        let bad: HealthFile = toml::from_str("[anomaly]\nk = -1.0\n").unwrap();
        assert!(bad
            .validate()
            .unwrap_err()
            .to_string()
            .contains("health.anomaly.k"));
        let bad: HealthFile =
            toml::from_str("[anomaly]\nwindow = \"1m\"\nsustain = \"2m\"\n").unwrap();
        assert!(bad.validate().unwrap_err().to_string().contains("sustain"));
        assert!(toml::from_str::<HealthFile>("lag = 1\n").is_err());
    }
}
