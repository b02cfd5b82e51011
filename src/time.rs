//! The clock every piece of the node's logic reads, as an input.
//!
//! Ledger, HLC, retention, settlement and compensation never read the
//! system clock themselves: they take a [`Clock`], so that the same code
//! runs on the wall clock in a node, shifted in a skew drill, and on virtual
//! time in tests and the simulator.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

/// Wall-clock milliseconds since the UNIX epoch, from wherever they come.
pub trait Clock: Send + Sync + 'static {
    /// Milliseconds since the UNIX epoch; may jump backwards, the HLC copes.
    fn now_ms(&self) -> u64;
}

/// A clock shared by the parts of one node.
pub type SharedClock = Arc<dyn Clock>;

impl Clock for SharedClock {
    fn now_ms(&self) -> u64 {
        (**self).now_ms()
    }
}

/// The real wall clock (SystemTime since UNIX_EPOCH, ms): production time.
#[derive(Clone, Copy, Debug, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    /// Never panics: a clock before 1970 reads 0.
    fn now_ms(&self) -> u64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
    }
}

/// The wall clock shifted by a fixed offset: the `--drill-clock-offset`
/// option of `oncemesh run`, so operators (and the tests and the demo) can
/// rehearse a region whose clock is skewed without touching the host clock.
#[derive(Clone, Copy, Debug, Default)]
pub struct OffsetClock {
    /// Milliseconds added to the system clock (negative: behind).
    pub offset_ms: i64,
}

impl Clock for OffsetClock {
    fn now_ms(&self) -> u64 {
        SystemClock.now_ms().saturating_add_signed(self.offset_ms)
    }
}

/// Virtual time, moved by hand: for tests and the simulator. Clones share
/// the same time.
#[derive(Clone, Debug, Default)]
pub struct ManualClock(Arc<AtomicU64>);

impl ManualClock {
    /// A clock that reads `ms`.
    pub fn at(ms: u64) -> Self {
        Self(Arc::new(AtomicU64::new(ms)))
    }

    /// Sets the time (it may go backwards, as a stepped wall clock can).
    pub fn set(&self, ms: u64) {
        self.0.store(ms, Ordering::SeqCst);
    }

    /// Moves the time forward by `ms`.
    pub fn advance(&self, ms: u64) {
        self.0.fetch_add(ms, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now_ms(&self) -> u64 {
        self.0.load(Ordering::SeqCst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clocks_read_what_they_should() {
        assert!(SystemClock.now_ms() > 1_600_000_000_000);
        let ahead = OffsetClock { offset_ms: 60_000 }.now_ms();
        assert!(ahead >= SystemClock.now_ms() + 59_000);
        let manual = ManualClock::at(5);
        let shared: SharedClock = Arc::new(manual.clone());
        manual.advance(10);
        assert_eq!(shared.now_ms(), 15);
        manual.set(3);
        assert_eq!(shared.now_ms(), 3);
    }
}
