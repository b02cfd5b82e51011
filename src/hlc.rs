//! Hybrid logical clock (Kulkarni et al., "Logical Physical Clocks", 2014).
//!
//! Every idempotency-token allocation is stamped so that regions agree which one
//! came first. Wall clocks with last-writer-wins are unsafe for that: during a
//! partition, a region whose clock lags can allocate a token *after* another region
//! did yet stamp it *earlier*, and the merge lets the duplicate through. An HLC never
//! runs backwards, is strictly greater than every stamp it has issued or received
//! (so causal order survives clock skew), and stays within the observed skew of
//! physical time, so a stamp still means "roughly when".
//!
//! Stamps print as fixed-width strings that sort like the stamps, usable directly as
//! storage or CRDT keys. The width caps both parts: the logical counter at
//! [`MAX_LOGICAL`] (one more carries into the millisecond) and physical time at
//! [`MAX_PHYSICAL_MS`] (larger inputs are clamped, never overflowed).

use std::fmt;
use std::str::FromStr;

use crate::time::{Clock, SystemClock};

/// Largest logical counter the 5-digit string form holds; one more carries into `physical_ms`.
pub const MAX_LOGICAL: u32 = 99_999;
/// Largest physical time the 16-digit string form holds (year ~316 million); inputs clamp here.
pub const MAX_PHYSICAL_MS: u64 = 9_999_999_999_999_999;
const STR_LEN: usize = 16 + 1 + 5;

/// An HLC timestamp: physical milliseconds + logical counter, ordered by (physical_ms, logical).
///
/// Serialized (serde, `Display`) as `format!("{:016}.{:05}", physical_ms, logical)`,
/// which sorts lexicographically exactly like the timestamps themselves.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Timestamp {
    /// Physical component: milliseconds since the UNIX epoch (possibly a peer's, if ahead).
    pub physical_ms: u64,
    /// Logical component: orders events within the same millisecond.
    pub logical: u32,
}

impl Timestamp {
    /// The smallest timestamp; the state of a fresh clock.
    pub const ZERO: Self = Self::new(0, 0);
    /// The largest timestamp the string form holds; a clock fed beyond it saturates here.
    pub const MAX: Self = Self::new(MAX_PHYSICAL_MS, MAX_LOGICAL);

    /// Builds a timestamp from its two parts (not range-checked, see [`Self::is_representable`]).
    pub const fn new(physical_ms: u64, logical: u32) -> Self {
        Self {
            physical_ms,
            logical,
        }
    }

    /// Whether the fixed-width string form can hold this stamp; every stamp an [`Hlc`] issues can.
    pub const fn is_representable(&self) -> bool {
        self.physical_ms <= MAX_PHYSICAL_MS && self.logical <= MAX_LOGICAL
    }
}

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016}.{:05}", self.physical_ms, self.logical)
    }
}

/// Errors from reading a timestamp: corrupt stored or received data is rejected, not guessed at.
#[derive(Debug, thiserror::Error)]
pub enum HlcError {
    /// The text is not exactly `DDDDDDDDDDDDDDDD.DDDDD` (16 digits, dot, 5 digits).
    #[error("malformed HLC timestamp {input:?}: {reason}")]
    Malformed {
        /// The offending text (first 64 characters).
        input: String,
        /// What is wrong with it.
        reason: &'static str,
    },
}

impl FromStr for Timestamp {
    type Err = HlcError;

    fn from_str(s: &str) -> Result<Self, HlcError> {
        let bad = |reason| HlcError::Malformed {
            input: s.chars().take(64).collect(),
            reason,
        };
        let b = s.as_bytes();
        if b.len() != STR_LEN {
            return Err(bad("expected 22 characters: 16 digits, '.', 5 digits"));
        }
        if b[16] != b'.' {
            return Err(bad("expected '.' after the 16 physical digits"));
        }
        let digits = |part: &[u8]| {
            part.iter().try_fold(0u64, |acc, &d| {
                d.is_ascii_digit().then(|| acc * 10 + u64::from(d - b'0'))
            })
        };
        let physical_ms =
            digits(&b[..16]).ok_or_else(|| bad("physical part is not 16 ASCII digits"))?;
        let logical = digits(&b[17..]).and_then(|v| u32::try_from(v).ok());
        let logical = logical.ok_or_else(|| bad("logical part is not 5 ASCII digits"))?;
        Ok(Self::new(physical_ms, logical))
    }
}

impl serde::Serialize for Timestamp {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if !self.is_representable() {
            return Err(serde::ser::Error::custom(format!(
                "HLC timestamp {self:?} exceeds the string width"
            )));
        }
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Timestamp {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        /// Parses the string where it lies: one allocation less per record read.
        struct Text;
        impl serde::de::Visitor<'_> for Text {
            type Value = Timestamp;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("an HLC timestamp string")
            }
            fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<Timestamp, E> {
                s.parse().map_err(E::custom)
            }
        }
        d.deserialize_str(Text)
    }
}

/// What `update` observed about a remote timestamp, for skew metrics and alerts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Observation {
    /// remote.physical_ms - local physical now, signed (positive = remote is ahead).
    pub offset_ms: i64,
    /// The remote was more than `max_offset_ms` ahead (it was merged anyway).
    pub skew_violation: bool,
}

/// A hybrid logical clock: issues stamps for local events and merges peers' stamps.
///
/// Not internally synchronised (`&mut self`); share it behind a mutex. Edge cases:
/// physical readings and remote stamps beyond [`MAX_PHYSICAL_MS`] are clamped to
/// [`Timestamp::MAX`]; once there (only reachable via such a stamp) the clock
/// saturates and repeats `Timestamp::MAX` instead of panicking or wrapping.
#[derive(Debug)]
pub struct Hlc<C: Clock = SystemClock> {
    clock: C,
    max_offset_ms: u64,
    last: Timestamp,
    skew_violations: u64,
    max_observed_offset_ms: i64,
}

impl<C: Clock> Hlc<C> {
    /// A clock at [`Timestamp::ZERO`]; remotes more than `max_offset_ms` ahead count as skew.
    pub fn new(clock: C, max_offset_ms: u64) -> Self {
        Self {
            clock,
            max_offset_ms,
            last: Timestamp::ZERO,
            skew_violations: 0,
            max_observed_offset_ms: 0,
        }
    }

    fn physical_now(&self) -> u64 {
        self.clock.now_ms().min(MAX_PHYSICAL_MS)
    }

    /// Stamp for a local event (send/allocate).
    ///
    /// Strictly greater than every stamp returned or observed before (short of saturation).
    pub fn now(&mut self) -> Timestamp {
        let (pt, l) = (self.physical_now(), self.last);
        self.last = if pt > l.physical_ms {
            Timestamp::new(pt, 0)
        } else {
            carry(l.physical_ms, u64::from(l.logical) + 1)
        };
        self.last
    }

    /// Feed a timestamp received from a peer (every received change).
    ///
    /// The remote stamp is ALWAYS merged (no data is refused, ordering safety first), even
    /// when it is more than `max_offset_ms` ahead; that is reported as a skew violation.
    /// After `update(r)`, every later `now()` is `> r`.
    pub fn update(&mut self, remote: Timestamp) -> Observation {
        let pt = self.physical_now();
        let (l, m) = (self.last, remote.min(Timestamp::MAX));
        let top = l.physical_ms.max(m.physical_ms).max(pt);
        let logical = match (top == l.physical_ms, top == m.physical_ms) {
            (true, true) => u64::from(l.logical.max(m.logical)) + 1,
            (true, false) => u64::from(l.logical) + 1,
            (false, true) => u64::from(m.logical) + 1,
            (false, false) => 0,
        };
        self.last = carry(top, logical);

        let diff = i128::from(remote.physical_ms) - i128::from(pt);
        // Clamped into i64 range first, so the cast is exact.
        let offset_ms = diff.clamp(i128::from(i64::MIN), i128::from(i64::MAX)) as i64;
        let skew_violation = remote.physical_ms.saturating_sub(pt) > self.max_offset_ms;
        self.skew_violations += u64::from(skew_violation);
        self.max_observed_offset_ms = self.max_observed_offset_ms.max(offset_ms);
        Observation {
            offset_ms,
            skew_violation,
        }
    }

    /// Raise the clock to at least `ts` without counting skew.
    ///
    /// Used on restart to re-seed from the stamps already on disk, so no stamp is reissued.
    pub fn observe_local(&mut self, ts: Timestamp) {
        self.last = self.last.max(ts.min(Timestamp::MAX));
    }

    /// The most recent stamp issued or merged.
    pub fn last(&self) -> Timestamp {
        self.last
    }

    /// The configured skew tolerance.
    pub fn max_offset_ms(&self) -> u64 {
        self.max_offset_ms
    }

    /// How many remote stamps so far were more than `max_offset_ms` ahead.
    pub fn skew_violations(&self) -> u64 {
        self.skew_violations
    }

    /// Largest amount (ms) any remote stamp was ahead of local physical time; 0 if none was.
    pub fn max_observed_offset_ms(&self) -> i64 {
        self.max_observed_offset_ms
    }
}

/// `(physical_ms, logical)`, carrying a logical counter above [`MAX_LOGICAL`] into the next
/// millisecond (still monotonic) and saturating at [`Timestamp::MAX`].
fn carry(physical_ms: u64, logical: u64) -> Timestamp {
    match u32::try_from(logical) {
        Ok(c) if c <= MAX_LOGICAL => Timestamp::new(physical_ms, c),
        _ if physical_ms < MAX_PHYSICAL_MS => Timestamp::new(physical_ms + 1, 0),
        _ => Timestamp::MAX,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::time::ManualClock;
    use proptest::prelude::*;

    /// A remote stamp `ahead` ms from `clock`'s now (negative = behind).
    fn remote(clock: &ManualClock, ahead: i64, logical: u32) -> Timestamp {
        ts(clock.now_ms().saturating_add_signed(ahead), logical)
    }

    const START: u64 = 1_000_000;
    fn hlc(max_offset_ms: u64) -> (ManualClock, Hlc<ManualClock>) {
        let clock = ManualClock::at(START);
        (clock.clone(), Hlc::new(clock, max_offset_ms))
    }
    fn ts(p: u64, l: u32) -> Timestamp {
        Timestamp::new(p, l)
    }

    #[derive(Clone, Debug)]
    enum Op {
        Forward(u64),
        Back(u64),
        Now,
        Update(i64, u32),
    }
    fn ops() -> impl Strategy<Value = Vec<Op>> {
        let logical = prop_oneof![0u32..10, Just(MAX_LOGICAL)];
        let op = prop_oneof![
            (0u64..50).prop_map(Op::Forward),
            (0u64..5_000).prop_map(Op::Back),
            Just(Op::Now),
            Just(Op::Now),
            (-5_000i64..5_000, logical).prop_map(|(a, l)| Op::Update(a, l)),
        ];
        prop::collection::vec(op, 0..200)
    }

    proptest! {
        #[test]
        fn monotonic_and_above_every_observed(ops in ops()) {
            let (clock, mut h) = hlc(1_000);
            let mut floor = Timestamp::ZERO; // max of everything issued or observed
            for op in ops {
                match op {
                    Op::Forward(d) => clock.set(clock.now_ms() + d),
                    Op::Back(d) => clock.set(clock.now_ms().saturating_sub(d)),
                    Op::Now => {
                        let t = h.now();
                        prop_assert!(t > floor, "{t} not > {floor}");
                        floor = t;
                    }
                    Op::Update(ahead, logical) => {
                        let r = remote(&clock, ahead, logical);
                        h.update(r);
                        prop_assert!(h.last() > r && h.last() > floor);
                        floor = h.last();
                    }
                }
                prop_assert!(h.last().is_representable());
            }
        }

        #[test]
        fn drift_bounded_by_largest_observed_offset(ops in ops()) {
            let (clock, mut h) = hlc(1_000);
            for op in ops {
                match op {
                    // Physical time only moves forward here.
                    Op::Forward(d) | Op::Back(d) => clock.set(clock.now_ms() + d),
                    Op::Now => drop(h.now()),
                    Op::Update(ahead, logical) => drop(h.update(remote(&clock, ahead, logical))),
                }
                let drift = h.last().physical_ms.saturating_sub(clock.now_ms()) as i64;
                // +1: a remote with logical == MAX_LOGICAL carries into the next millisecond.
                prop_assert!(drift <= h.max_observed_offset_ms() + 1);
            }
        }

        #[test]
        fn logical_stays_below_events_per_ms(n in 1usize..50, events in 0usize..2_000) {
            let (clock, mut h) = hlc(1_000);
            for i in 0..events {
                if i % n == 0 {
                    clock.set(clock.now_ms() + 1);
                }
                prop_assert!((h.now().logical as usize) < n);
            }
        }

        #[test]
        fn string_round_trips_and_sorts_like_ord(
            a in (0..=MAX_PHYSICAL_MS, 0..=MAX_LOGICAL),
            b in (0..=MAX_PHYSICAL_MS, 0..=MAX_LOGICAL),
        ) {
            let (a, b) = (ts(a.0, a.1), ts(b.0, b.1));
            let (sa, sb) = (a.to_string(), b.to_string());
            prop_assert_eq!(sa.len(), STR_LEN);
            prop_assert_eq!(sa.parse::<Timestamp>().ok(), Some(a));
            prop_assert_eq!(sa.cmp(&sb), a.cmp(&b));
            let json = serde_json::to_string(&a).map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert_eq!(serde_json::from_str::<Timestamp>(&json).ok(), Some(a));
        }

        #[test]
        fn from_str_never_panics(s in any::<String>(), t in "[0-9.+-]{20,24}") {
            for s in [s, t] {
                if let Ok(v) = s.parse::<Timestamp>() {
                    prop_assert_eq!(v.to_string(), s); // only the canonical form is accepted
                }
            }
        }

        #[test]
        fn skew_counted_iff_ahead_more_than_max_offset(
            max in 0u64..1_000,
            aheads in prop::collection::vec(-2_000i64..2_000, 1..20),
        ) {
            let (clock, mut h) = hlc(max);
            let mut expected = 0;
            for a in aheads {
                let obs = h.update(remote(&clock, a, 0));
                prop_assert_eq!(obs, Observation { offset_ms: a, skew_violation: a > max as i64 });
                expected += u64::from(a > max as i64);
                prop_assert_eq!(h.skew_violations(), expected);
            }
        }
    }

    #[test]
    fn paper_cases() {
        let (clock, mut h) = hlc(500);
        assert_eq!(h.now(), ts(START, 0)); // pt ahead of l: take pt, reset c
        assert_eq!(h.now(), ts(START, 1)); // pt stalled: count
        clock.set(START - 10);
        assert_eq!(h.now(), ts(START, 2)); // pt went backwards: l holds
        h.update(ts(START + 100, 7)); // remote ahead: take m.l, m.c + 1
        assert_eq!(h.last(), ts(START + 100, 8));
        h.update(ts(START + 100, 20)); // equal l: max(c, m.c) + 1
        assert_eq!(h.last(), ts(START + 100, 21));
        h.update(ts(START, 50)); // remote behind, local l largest: c + 1
        assert_eq!(h.last(), ts(START + 100, 22));
        clock.set(START + 200);
        h.update(ts(START + 150, 3)); // pt largest: pt, 0
        assert_eq!(h.last(), ts(START + 200, 0));
        assert_eq!((h.skew_violations(), h.max_observed_offset_ms()), (0, 110));
        let obs = h.update(ts(START + 800, 0)); // 600 ahead > 500: merged anyway, counted
        assert!(obs.skew_violation && obs.offset_ms == 600);
        assert_eq!((h.last(), h.skew_violations()), (ts(START + 800, 1), 1));
    }

    #[test]
    fn logical_overflow_carries_into_next_ms() {
        let (_, mut h) = hlc(500);
        h.observe_local(ts(START, MAX_LOGICAL - 1));
        assert_eq!(h.now(), ts(START, MAX_LOGICAL));
        assert_eq!(h.now(), ts(START + 1, 0));
        h.update(ts(START + 1, u32::MAX)); // out-of-range logical from a peer
        assert_eq!(h.now(), ts(START + 2, 1));
    }

    #[test]
    fn observe_local_raises_without_skew() {
        let (_, mut h) = hlc(0);
        h.observe_local(ts(START + 10_000, 4));
        h.observe_local(ts(1, 0)); // never lowers
        assert_eq!(h.now(), ts(START + 10_000, 5));
        assert_eq!((h.skew_violations(), h.max_observed_offset_ms()), (0, 0));
    }

    #[test]
    fn extreme_inputs_saturate_without_panic() {
        let (clock, mut h) = hlc(u64::MAX);
        let obs = h.update(ts(u64::MAX, u32::MAX));
        assert_eq!((obs.offset_ms, obs.skew_violation), (i64::MAX, false));
        assert_eq!((h.now(), h.now()), (Timestamp::MAX, Timestamp::MAX));
        clock.set(u64::MAX);
        assert_eq!(h.now(), Timestamp::MAX);
        assert!(h.update(ts(0, 0)).offset_ms < 0);
        assert!(serde_json::to_string(&ts(u64::MAX, 0)).is_err());
    }

    #[test]
    fn string_form() {
        let good = "0001764172165123.00003";
        assert_eq!(ts(1_764_172_165_123, 3).to_string(), good);
        let json = serde_json::to_string(&ts(1, 2)).ok();
        assert_eq!(json.as_deref(), Some("\"0000000000000001.00002\""));
        let mut bad: Vec<String> = ["", "1.1", &good[1..], &format!("{good}0")]
            .map(String::from)
            .into();
        for i in 0..good.len() {
            for c in ["x", "+", "-", " ", "é", "."] {
                bad.push(format!("{}{c}{}", &good[..i], &good[i + 1..]));
            }
        }
        for b in bad.iter().filter(|b| b.as_str() != good) {
            assert!(
                matches!(b.parse::<Timestamp>(), Err(HlcError::Malformed { .. })),
                "{b}"
            );
        }
        assert!(SystemClock.now_ms() > 1_600_000_000_000);
    }
}
