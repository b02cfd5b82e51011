//! What the examples that measure real `oncemesh` processes share: finding
//! the binaries next to the example, starting a node and reading its start
//! line, a free port, a process's resident memory, and medians.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// The binary `name` built beside this example: `target/<profile>/NAME` for
/// `target/<profile>/examples/EXAMPLE`, or in the examples dir itself (the
/// load generator).
pub fn sibling_binary(name: &str) -> anyhow::Result<PathBuf> {
    let me = std::env::current_exe()?;
    let dir = me
        .parent()
        .ok_or_else(|| anyhow::anyhow!("no parent dir of {}", me.display()))?;
    let name = format!("{name}{}", std::env::consts::EXE_SUFFIX);
    let found = [dir.join(&name), dir.join("..").join(&name)]
        .into_iter()
        .find(|c| c.exists());
    found.ok_or_else(|| {
        anyhow::anyhow!(
            "{name} not found next to {} (build it: cargo build --release --bin oncemesh --examples)",
            me.display()
        )
    })
}

/// A TCP port free on loopback now.
pub fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Resident memory of a process, bytes (Linux /proc; 0 elsewhere).
pub fn rss_bytes(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find(|l| l.starts_with("VmRSS:"))?
                .split_whitespace()
                .nth(1)?
                .parse::<u64>()
                .ok()
        })
        .map_or(0, |kib| kib * 1024)
}

/// The median of some figures (the upper one of an even count); NaN if none.
pub fn median(values: impl IntoIterator<Item = f64>) -> f64 {
    let mut v: Vec<f64> = values.into_iter().collect();
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

/// A running `oncemesh run` process, killed when dropped.
pub struct Node {
    /// The process.
    pub child: Child,
    /// Its pid.
    pub pid: u32,
}

impl Node {
    /// Spawns `command` (an `oncemesh run ...`, or one wrapped in another
    /// program) with stderr appended to `log`, and waits for its start line;
    /// stdout is drained afterwards so the node never blocks on a full pipe.
    pub async fn start(mut command: Command, log: &Path) -> anyhow::Result<Node> {
        let log_file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)?;
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log_file)
            .kill_on_drop(true)
            .spawn()?;
        let pid = child.id().unwrap_or(0);
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| anyhow::anyhow!("no stdout"))?;
        let mut lines = BufReader::new(stdout).lines();
        let banner = tokio::time::timeout(Duration::from_secs(60), lines.next_line())
            .await
            .map_err(|_| anyhow::anyhow!("no start line in 60 s (log: {})", log.display()))??
            .unwrap_or_default();
        anyhow::ensure!(
            banner.starts_with("oncemesh node started"),
            "the node did not start: {banner:?} (log: {})",
            log.display()
        );
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Ok(Node { child, pid })
    }

    /// Sends `signal` and waits until the process has exited.
    pub async fn stop(&mut self, signal: libc::c_int) -> anyhow::Result<()> {
        let pid = libc::pid_t::try_from(self.pid)?;
        // SAFETY: kill(2) on a child we spawned and have not reaped yet.
        if unsafe { libc::kill(pid, signal) } != 0 {
            anyhow::bail!("signalling pid {pid}: {}", std::io::Error::last_os_error());
        }
        self.child.wait().await?;
        Ok(())
    }
}
