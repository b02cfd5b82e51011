//! Multi-process test harness for oncemesh: real `oncemesh` processes, one per
//! region, every inter-node byte going through a relay the test controls
//! ([`oncemesh::drill::Relay`], one per ordered pair of nodes). Each test file uses a subset, hence the `dead_code` allowance.
#![allow(dead_code)]

pub mod cluster;

use std::future::Future;
use std::io::{Read, Seek, SeekFrom};
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::path::Path;
use std::time::Duration;

#[allow(unused_imports)]
pub use cluster::{Cluster, ClusterOptions, Node};

/// Polling period of the `wait_until*` helpers.
pub const POLL: Duration = Duration::from_millis(50);

/// Polls `cond` every 50 ms until it is true (returns true) or `timeout`
/// passes (returns false). Sleeps with tokio, so it never blocks a runtime thread.
pub async fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Like [`wait_until`] for a condition that needs to await (HTTP calls):
/// `wait_until_async(t, async || node.get_json("/v1/peers").await.0 == 200).await`.
/// Each attempt is also bounded by the remaining time.
pub async fn wait_until_async<F>(timeout: Duration, mut cond: F) -> bool
where
    F: AsyncFnMut() -> bool,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Ok(true) = tokio::time::timeout_at(deadline, cond()).await {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Runs `fut` with a deadline, panicking with `what` if it does not finish in time.
pub async fn within<T>(timeout: Duration, what: &str, fut: impl Future<Output = T>) -> T {
    match tokio::time::timeout(timeout, fut).await {
        Ok(v) => v,
        Err(_) => panic!("timed out after {timeout:?}: {what}"),
    }
}

/// A port that was free on 127.0.0.1 a moment ago (bind :0, read, release).
pub fn free_port() -> u16 {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .unwrap_or_else(|e| panic!("cannot bind 127.0.0.1:0 to pick a free port: {e}"));
    listener
        .local_addr()
        .unwrap_or_else(|e| panic!("cannot read local address of a bound socket: {e}"))
        .port()
}

pub fn localhost(port: u16) -> SocketAddr {
    SocketAddr::from((Ipv4Addr::LOCALHOST, port))
}

/// The last `n` lines of a (log) file, reading at most its last 256 KiB.
/// Never fails: an unreadable file yields a line saying why.
pub fn tail_lines(path: &Path, n: usize) -> String {
    const MAX: u64 = 256 * 1024;
    let read = || -> std::io::Result<String> {
        let mut f = std::fs::File::open(path)?;
        let len = f.metadata()?.len();
        let start = len.saturating_sub(MAX);
        f.seek(SeekFrom::Start(start))?;
        let mut buf = Vec::new();
        f.read_to_end(&mut buf)?;
        let text = String::from_utf8_lossy(&buf);
        let mut lines: Vec<&str> = text.lines().collect();
        if start > 0 && !lines.is_empty() {
            lines.remove(0); // probably cut in the middle
        }
        let from = lines.len().saturating_sub(n);
        Ok(lines[from..].join("\n"))
    };
    read().unwrap_or_else(|e| format!("<cannot read {}: {e}>", path.display()))
}
