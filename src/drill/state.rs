//! What a relay's handle and its connection tasks share: the faults in
//! force, the target, and the counters.

use super::Direction;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// The faults in force on a relay; a watch channel, so that connection tasks
/// wake up when one changes instead of polling.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct Faults {
    /// New connections are reset at once.
    pub cut: bool,
    /// Bumped by every cut: a connection accepted before it dies.
    pub cuts: u64,
    /// Bytes travelling this way wait (nothing is lost) until healed.
    pub held: Option<Direction>,
}

/// When the relay last healed and first carried a connection after that.
#[derive(Debug, Default)]
struct Reconnect {
    healed_at: Option<Instant>,
    first_accept: Option<Instant>,
}

/// State of one relay.
#[derive(Debug)]
pub(super) struct Shared {
    target: Mutex<SocketAddr>,
    pub faults: watch::Sender<Faults>,
    delay_nanos: [AtomicU64; 2],
    bytes: [AtomicU64; 2],
    live: AtomicUsize,
    accepted: AtomicU64,
    reconnect: Mutex<Reconnect>,
}

impl Shared {
    pub fn new(target: SocketAddr) -> Shared {
        Shared {
            target: Mutex::new(target),
            faults: watch::channel(Faults::default()).0,
            delay_nanos: Default::default(),
            bytes: Default::default(),
            live: AtomicUsize::new(0),
            accepted: AtomicU64::new(0),
            reconnect: Mutex::default(),
        }
    }

    pub fn target(&self) -> SocketAddr {
        *lock(&self.target)
    }

    pub fn set_target(&self, target: SocketAddr) {
        *lock(&self.target) = target;
    }

    pub fn delay(&self, direction: Direction) -> Duration {
        Duration::from_nanos(self.delay_nanos[direction.index()].load(Ordering::Relaxed))
    }

    pub fn set_delay(&self, direction: Direction, delay: Duration) {
        let nanos = u64::try_from(delay.as_nanos()).unwrap_or(u64::MAX);
        self.delay_nanos[direction.index()].store(nanos, Ordering::Relaxed);
    }

    /// Counts bytes handed to the receiving socket.
    pub fn count(&self, direction: Direction, bytes: usize) {
        self.bytes[direction.index()].fetch_add(bytes as u64, Ordering::Relaxed);
    }

    pub fn bytes(&self, direction: Direction) -> u64 {
        self.bytes[direction.index()].load(Ordering::Relaxed)
    }

    pub fn live(&self) -> usize {
        self.live.load(Ordering::SeqCst)
    }

    pub fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::Relaxed)
    }

    /// Records a connection let through; the guard keeps it counted as live.
    pub fn admit(self: &std::sync::Arc<Self>) -> LiveGuard {
        self.live.fetch_add(1, Ordering::SeqCst);
        self.accepted.fetch_add(1, Ordering::Relaxed);
        let mut reconnect = lock(&self.reconnect);
        if reconnect.healed_at.is_some() && reconnect.first_accept.is_none() {
            reconnect.first_accept = Some(Instant::now());
        }
        LiveGuard(self.clone())
    }

    /// Marks a heal: the next connection let through is its first reconnect.
    pub fn healed(&self) {
        *lock(&self.reconnect) = Reconnect {
            healed_at: Some(Instant::now()),
            first_accept: None,
        };
    }

    pub fn reconnected_at(&self) -> Option<Instant> {
        lock(&self.reconnect).first_accept
    }
}

/// Keeps a connection in the live count while it is forwarded.
pub(super) struct LiveGuard(std::sync::Arc<Shared>);

impl Drop for LiveGuard {
    fn drop(&mut self) {
        self.0.live.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A poisoned lock still holds a valid address or pair of instants.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}
