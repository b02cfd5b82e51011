//! A TCP fault proxy driven by the test: every byte between two nodes goes
//! through one of these, so the test can cut, heal and slow a link from
//! outside the nodes.
//!
//! Each proxy owns a background thread running its own single-threaded tokio
//! runtime, so it works the same from a plain `#[test]` and from any flavour of
//! `#[tokio::test]`, and never depends on the caller's runtime making progress.
//! Dropping the proxy stops the thread and closes every connection it carries.

use std::io;
use std::net::{SocketAddr, TcpListener as StdTcpListener};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};

/// How long `cut()` waits for the live connections to be torn down.
const CUT_SETTLE: Duration = Duration::from_secs(2);
/// Bytes read per chunk; the delay applies to each chunk.
const CHUNK: usize = 16 * 1024;
/// Chunks in flight per direction when a delay is set (backpressure bound).
const IN_FLIGHT: usize = 256;

struct Shared {
    target: Mutex<SocketAddr>,
    cut: AtomicBool,
    /// Bumped by every `cut()`; each live connection watches it and dies on change.
    cut_epoch: watch::Sender<u64>,
    delay_nanos: AtomicU64,
    bytes: AtomicU64,
    live: AtomicUsize,
    accepted: AtomicU64,
}

impl Shared {
    fn delay(&self) -> Duration {
        Duration::from_nanos(self.delay_nanos.load(Ordering::Relaxed))
    }
}

/// A fault-injecting TCP forwarder from `addr()` to a target address.
pub struct FaultProxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
    shutdown: Option<watch::Sender<bool>>,
    thread: Option<JoinHandle<()>>,
}

impl FaultProxy {
    /// Listens on 127.0.0.1:0 and forwards every accepted connection to `target`.
    pub fn start(target: SocketAddr) -> io::Result<FaultProxy> {
        let listener = StdTcpListener::bind("127.0.0.1:0")?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let shared = Arc::new(Shared {
            target: Mutex::new(target),
            cut: AtomicBool::new(false),
            cut_epoch: watch::channel(0).0,
            delay_nanos: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            live: AtomicUsize::new(0),
            accepted: AtomicU64::new(0),
        });
        let (shutdown_tx, mut shutdown_rx) = watch::channel(false);
        let thread_shared = shared.clone();
        let thread = std::thread::Builder::new()
            .name(format!("fault-proxy-{}", addr.port()))
            .spawn(move || {
                runtime.block_on(async move {
                    let listener = match TcpListener::from_std(listener) {
                        Ok(l) => l,
                        Err(e) => {
                            eprintln!("fault proxy {addr}: cannot register listener: {e}");
                            return;
                        }
                    };
                    tokio::select! {
                        _ = accept_loop(listener, thread_shared) => {}
                        _ = shutdown_rx.wait_for(|stop| *stop) => {}
                    }
                });
                // Dropping the runtime drops every connection task, closing its sockets.
                drop(runtime);
            })?;
        Ok(FaultProxy {
            addr,
            shared,
            shutdown: Some(shutdown_tx),
            thread: Some(thread),
        })
    }

    /// The address to dial instead of the target.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Where new connections are forwarded.
    pub fn target(&self) -> SocketAddr {
        *lock(&self.shared.target)
    }

    /// Forward connections accepted from now on to `target` (live ones keep theirs).
    pub fn set_target(&self, target: SocketAddr) {
        *lock(&self.shared.target) = target;
    }

    /// Drops every live connection at once (RST on both sides) and, until
    /// `heal()`, accepts and immediately resets every new one. Returns once the
    /// live connections are torn down (or after 2 s).
    pub fn cut(&self) {
        self.shared.cut.store(true, Ordering::SeqCst);
        self.shared.cut_epoch.send_modify(|e| *e += 1);
        let deadline = Instant::now() + CUT_SETTLE;
        while self.shared.live.load(Ordering::SeqCst) > 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Lets new connections through again.
    pub fn heal(&self) {
        self.shared.cut.store(false, Ordering::SeqCst);
    }

    pub fn is_cut(&self) -> bool {
        self.shared.cut.load(Ordering::SeqCst)
    }

    /// Latency added to every chunk forwarded, in both directions, from now on
    /// (a pipeline delay: throughput is not capped). `Duration::ZERO` removes it.
    pub fn set_delay(&self, delay: Duration) {
        let nanos = u64::try_from(delay.as_nanos()).unwrap_or(u64::MAX);
        self.shared.delay_nanos.store(nanos, Ordering::Relaxed);
    }

    pub fn delay(&self) -> Duration {
        self.shared.delay()
    }

    /// Total bytes forwarded (handed to the receiving socket), both directions, since start.
    pub fn bytes_forwarded(&self) -> u64 {
        self.shared.bytes.load(Ordering::Relaxed)
    }

    /// Connections currently being forwarded.
    pub fn live_connections(&self) -> usize {
        self.shared.live.load(Ordering::SeqCst)
    }

    /// Connections accepted and forwarded since start (not counting those reset while cut).
    pub fn connections_accepted(&self) -> u64 {
        self.shared.accepted.load(Ordering::Relaxed)
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(true);
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl std::fmt::Debug for FaultProxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FaultProxy")
            .field("addr", &self.addr)
            .field("target", &self.target())
            .field("cut", &self.is_cut())
            .field("delay", &self.delay())
            .field("live", &self.live_connections())
            .field("bytes", &self.bytes_forwarded())
            .finish()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        let inbound = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(_) => {
                // EMFILE and friends: back off instead of spinning.
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        // Subscribe before checking the flag: a cut() racing with this accept
        // either is seen by the check or bumps the epoch after we subscribed.
        let cut_rx = shared.cut_epoch.subscribe();
        if shared.cut.load(Ordering::SeqCst) {
            reset(inbound);
            continue;
        }
        shared.live.fetch_add(1, Ordering::SeqCst);
        shared.accepted.fetch_add(1, Ordering::Relaxed);
        let shared = shared.clone();
        tokio::spawn(async move {
            let _live = LiveGuard(shared.clone());
            handle(inbound, shared, cut_rx).await;
        });
    }
}

struct LiveGuard(Arc<Shared>);

impl Drop for LiveGuard {
    fn drop(&mut self) {
        self.0.live.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Closes with RST rather than FIN: the peer sees a broken connection.
fn reset(stream: TcpStream) {
    let _ = stream.set_zero_linger();
    drop(stream);
}

async fn handle(mut inbound: TcpStream, shared: Arc<Shared>, mut cut_rx: watch::Receiver<u64>) {
    let target = *lock(&shared.target);
    let mut outbound = tokio::select! {
        r = TcpStream::connect(target) => match r {
            Ok(s) => s,
            Err(_) => return reset(inbound),
        },
        _ = cut_rx.changed() => return reset(inbound),
    };
    let _ = inbound.set_nodelay(true);
    let _ = outbound.set_nodelay(true);
    let was_cut = {
        let (ri, wi) = inbound.split();
        let (ro, wo) = outbound.split();
        let forward = async { tokio::try_join!(pipe(ri, wo, &shared), pipe(ro, wi, &shared)) };
        tokio::select! {
            _ = forward => false,
            _ = cut_rx.changed() => true,
        }
    };
    if was_cut {
        reset(inbound);
        reset(outbound);
    }
}

/// Copies one direction until EOF (then half-closes the writer) or an error.
async fn pipe<R, W>(mut from: R, mut to: W, shared: &Shared) -> io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let (tx, mut rx) = mpsc::channel::<(Instant, Vec<u8>)>(IN_FLIGHT);
    let reader = async move {
        let mut buf = vec![0u8; CHUNK];
        loop {
            let n = from.read(&mut buf).await?;
            if n == 0 {
                return Ok::<(), io::Error>(());
            }
            let due = Instant::now() + shared.delay();
            if tx.send((due, buf[..n].to_vec())).await.is_err() {
                return Ok(());
            }
        }
    };
    let writer = async move {
        while let Some((due, chunk)) = rx.recv().await {
            if due > Instant::now() {
                tokio::time::sleep_until(due.into()).await;
            }
            // Counted before the write so that a receiver never sees bytes the
            // counter does not include yet.
            shared
                .bytes
                .fetch_add(chunk.len() as u64, Ordering::Relaxed);
            to.write_all(&chunk).await?;
        }
        to.shutdown().await
    };
    tokio::try_join!(reader, writer).map(|_| ())
}
