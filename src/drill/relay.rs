//! The handle of one relay: start it, make faults, read its counters.

use super::forward::accept_loop;
use super::state::{Faults, Shared};
use super::{Direction, DrillError};
use std::net::{SocketAddr, TcpListener as StdTcpListener};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use tokio::net::TcpListener;
use tokio::sync::oneshot;

/// How long [`Relay::cut`] waits for the live connections to be torn down.
const CUT_SETTLE: Duration = Duration::from_secs(2);

/// A TCP relay from [`Relay::addr`] on 127.0.0.1 to a target address, with
/// faults a drill switches on and off; see the [module docs](super).
///
/// Faults apply to new and live connections alike, except a new target,
/// which only connections accepted afterwards use.
pub struct Relay {
    addr: SocketAddr,
    shared: Arc<Shared>,
    /// Dropped to stop the relay's thread.
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Relay {
    /// Listens on 127.0.0.1 (a free port) and forwards every connection it
    /// accepts to `target`, on a thread of its own.
    pub fn start(target: SocketAddr) -> Result<Relay, DrillError> {
        let listen = |source| DrillError::Listen { target, source };
        let thread = |source| DrillError::Thread { target, source };
        let listener = StdTcpListener::bind("127.0.0.1:0").map_err(listen)?;
        listener.set_nonblocking(true).map_err(listen)?;
        let addr = listener.local_addr().map_err(listen)?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(thread)?;
        let shared = Arc::new(Shared::new(target));
        let (stop, stopped) = oneshot::channel::<()>();
        let tasks = shared.clone();
        let handle = std::thread::Builder::new()
            .name(format!("relay-{}", addr.port()))
            .spawn(move || {
                runtime.block_on(async move {
                    let listener = match TcpListener::from_std(listener) {
                        Ok(l) => l,
                        Err(e) => {
                            tracing::warn!(%addr, error = %e, "relay: cannot register its listener");
                            return;
                        }
                    };
                    tokio::select! {
                        _ = accept_loop(listener, tasks) => {}
                        _ = stopped => {}
                    }
                });
                // Dropping the runtime drops every connection task, closing its sockets.
                drop(runtime);
            })
            .map_err(thread)?;
        Ok(Relay {
            addr,
            shared,
            stop: Some(stop),
            thread: Some(handle),
        })
    }

    /// The address to dial instead of the target.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Where new connections are forwarded.
    pub fn target(&self) -> SocketAddr {
        self.shared.target()
    }

    /// Forwards connections accepted from now on to `target` (a node that
    /// restarted on another port); live ones keep theirs.
    pub fn set_target(&self, target: SocketAddr) {
        self.shared.set_target(target);
    }

    /// Drops every live connection at once (RST on both sides) and, until
    /// [`Relay::heal`], resets every new one as soon as it is accepted: a
    /// partition. Returns once the live connections are torn down (or after
    /// 2 s), so a caller may block a moment.
    pub fn cut(&self) {
        self.shared.faults.send_modify(|f| {
            f.cut = true;
            f.cuts += 1;
        });
        let deadline = Instant::now() + CUT_SETTLE;
        while self.shared.live() > 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Makes the link one-way: from now on only bytes travelling `pass` get
    /// through; the other direction's bytes (and its end of stream) wait in
    /// the relay, as a TCP sender's do while its packets are lost, until
    /// [`Relay::heal`]. Connections are still accepted and live ones stay
    /// open, so the nodes see silence, not an error.
    pub fn one_way(&self, pass: Direction) {
        self.shared
            .faults
            .send_modify(|f| f.held = Some(pass.reverse()));
    }

    /// Ends a cut and a one-way fault (held bytes flow on); delays stay as
    /// they are. Starts the clock of [`Relay::reconnected_at`].
    pub fn heal(&self) {
        self.shared.healed();
        self.shared.faults.send_modify(|f| {
            f.cut = false;
            f.held = None;
        });
    }

    /// Whether the relay is cut.
    pub fn is_cut(&self) -> bool {
        self.shared.faults.borrow().cut
    }

    /// The direction whose bytes are held, if the link is one-way.
    pub fn held(&self) -> Option<Direction> {
        self.shared.faults.borrow().held
    }

    /// Adds `delay` to every chunk forwarded in both directions from now on
    /// (a pipeline delay: throughput is not capped). `Duration::ZERO`
    /// removes it.
    pub fn set_delay(&self, delay: Duration) {
        for direction in Direction::BOTH {
            self.set_delay_toward(direction, delay);
        }
    }

    /// Adds `delay` to every chunk travelling `direction` from now on: an
    /// asymmetric path.
    pub fn set_delay_toward(&self, direction: Direction, delay: Duration) {
        self.shared.set_delay(direction, delay);
    }

    /// The delay added to bytes travelling `direction`.
    pub fn delay(&self, direction: Direction) -> Duration {
        self.shared.delay(direction)
    }

    /// Bytes forwarded (handed to the receiving socket) in both directions
    /// since start: what the link carried.
    pub fn bytes_forwarded(&self) -> u64 {
        Direction::BOTH.iter().map(|&d| self.bytes_toward(d)).sum()
    }

    /// Bytes forwarded travelling `direction` since start.
    pub fn bytes_toward(&self, direction: Direction) -> u64 {
        self.shared.bytes(direction)
    }

    /// Connections being forwarded now.
    pub fn live_connections(&self) -> usize {
        self.shared.live()
    }

    /// Connections let through since start (not those reset while cut).
    pub fn connections_accepted(&self) -> u64 {
        self.shared.accepted()
    }

    /// When the first connection after the latest [`Relay::heal`] was let
    /// through (None before a heal, or while none came yet): how long the
    /// nodes took to redial.
    pub fn reconnected_at(&self) -> Option<Instant> {
        self.shared.reconnected_at()
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl std::fmt::Debug for Relay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let faults: Faults = *self.shared.faults.borrow();
        f.debug_struct("Relay")
            .field("addr", &self.addr)
            .field("target", &self.target())
            .field("cut", &faults.cut)
            .field("held", &faults.held)
            .field("delay_to_target", &self.delay(Direction::ToTarget))
            .field("delay_to_dialer", &self.delay(Direction::ToDialer))
            .field("live", &self.live_connections())
            .field("bytes", &self.bytes_forwarded())
            .finish()
    }
}
