//! Real `oncemesh run` processes on loopback, every link through a
//! [`Relay`]: the launcher `oncemesh demo` and `oncemesh chaos` share.
//!
//! Node `i` dials node `j` through `links[i][j]`, so cutting, slowing or
//! making one-way any set of relays is a partition of any shape. A node can
//! be killed (SIGKILL), paused (SIGSTOP / SIGCONT) and started again on its
//! data dir, ports and peer list with other extra flags (a clock offset), so
//! the faults of a drill come from outside the processes only.

use super::{DrillError, Relay};
use crate::client::{Client, ClientError};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// How long a node may take to print its start line.
const START_TIMEOUT: Duration = Duration::from_secs(20);

/// Why a node of the cluster could not be started or signalled.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// A file, directory, port or process of the cluster failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// Cause.
        source: std::io::Error,
    },
    /// A node did not print its start line.
    #[error("node {region} did not start: {reason} (see its log {log})")]
    Start {
        /// The node's region.
        region: String,
        /// What went wrong.
        reason: String,
        /// Its log file.
        log: PathBuf,
    },
    /// A node's identity could not be created.
    #[error("node {region}: {source}")]
    Identity {
        /// The node's region.
        region: String,
        /// Cause.
        source: crate::identity::IdentityError,
    },
    /// A relay could not start.
    #[error(transparent)]
    Relay(#[from] DrillError),
    /// The HTTP client of a node could not be made.
    #[error(transparent)]
    Client(#[from] ClientError),
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> ClusterError {
    let what = what.into();
    move |source| ClusterError::Io { what, source }
}

/// One node process of a [`Cluster`].
pub struct NodeProcess {
    /// Its region name (also the name of its data dir and log under the root).
    pub region: String,
    /// Its libp2p peer id.
    pub peer_id: String,
    /// Its HTTP address (`127.0.0.1:PORT`), kept across restarts.
    pub http: String,
    /// A client of its API.
    pub client: Client,
    /// The start line it printed last.
    pub banner: String,
    /// Its libp2p listen port, kept across restarts.
    listen_port: u16,
    /// The running process; `None` once killed.
    child: Option<Child>,
}

impl NodeProcess {
    /// Its process id while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().and_then(Child::id)
    }
}

/// N node processes wired through relays.
pub struct Cluster {
    exe: PathBuf,
    root: PathBuf,
    /// The nodes, in the order of the regions given.
    pub nodes: Vec<NodeProcess>,
    /// `links[i][j]` carries node i's dials to node j (`None` on the diagonal).
    pub links: Vec<Vec<Option<Relay>>>,
}

impl Cluster {
    /// Starts one `exe run` per region, data dirs and logs under `root`,
    /// each with `extra(i)` appended to its flags, every `--peer` pointing at
    /// a relay. Returns once every node printed its start line.
    pub async fn start(
        exe: &Path,
        root: &Path,
        regions: &[&str],
        extra: impl Fn(usize) -> Vec<String>,
    ) -> Result<Cluster, ClusterError> {
        let mut nodes = Vec::new();
        // Each node's listen port, held until the relays have bound theirs
        // so that no relay can be given a port a node is about to listen on.
        let mut probes = Vec::new();
        for region in regions {
            let keypair =
                crate::identity::load_or_create(&root.join(region)).map_err(|source| {
                    ClusterError::Identity {
                        region: (*region).to_owned(),
                        source,
                    }
                })?;
            let probe = std::net::TcpListener::bind("127.0.0.1:0").map_err(io("a free port"))?;
            nodes.push(NodeProcess {
                region: (*region).to_owned(),
                peer_id: keypair.public().to_peer_id().to_string(),
                http: "127.0.0.1:0".into(),
                client: Client::new("http://127.0.0.1:0")?,
                banner: String::new(),
                listen_port: probe.local_addr().map_err(io("a free port"))?.port(),
                child: None,
            });
            probes.push(probe);
        }
        let mut links = Vec::new();
        for i in 0..nodes.len() {
            let mut row = Vec::new();
            for (j, node) in nodes.iter().enumerate() {
                row.push(if i == j {
                    None
                } else {
                    Some(Relay::start(([127, 0, 0, 1], node.listen_port).into())?)
                });
            }
            links.push(row);
        }
        drop(probes);
        let mut cluster = Cluster {
            exe: exe.to_owned(),
            root: root.to_owned(),
            nodes,
            links,
        };
        for i in 0..regions.len() {
            cluster.launch(i, &extra(i)).await?;
        }
        Ok(cluster)
    }

    /// Every relay of the cluster.
    pub fn relays(&self) -> impl Iterator<Item = &Relay> {
        self.links.iter().flatten().flatten()
    }

    /// Kills node `i` with SIGKILL (a crash) and waits for it to be gone.
    pub async fn kill(&mut self, i: usize) {
        if let Some(mut child) = self.nodes[i].child.take() {
            let _ = child.start_kill();
            let _ = child.wait().await;
        }
    }

    /// Starts node `i` again on its data dir and ports with `extra` flags
    /// (killing it first if it still runs).
    pub async fn restart(&mut self, i: usize, extra: &[String]) -> Result<(), ClusterError> {
        self.kill(i).await;
        self.launch(i, extra).await
    }

    /// Stops (`true`: SIGSTOP) or resumes (`false`: SIGCONT) node `i`.
    pub fn pause(&self, i: usize, stop: bool) -> Result<(), ClusterError> {
        let Some(pid) = self.nodes[i].pid() else {
            return Ok(());
        };
        let signal = if stop { libc::SIGSTOP } else { libc::SIGCONT };
        let pid = libc::pid_t::try_from(pid).map_err(|_| ClusterError::Io {
            what: format!("pid {pid} of node {}", self.nodes[i].region),
            source: std::io::Error::from(std::io::ErrorKind::InvalidInput),
        })?;
        // SAFETY: kill(2) on a child we spawned and have not reaped.
        if unsafe { libc::kill(pid, signal) } != 0 {
            return Err(ClusterError::Io {
                what: format!("signalling node {}", self.nodes[i].region),
                source: std::io::Error::last_os_error(),
            });
        }
        Ok(())
    }

    /// Kills every node.
    pub async fn stop(&mut self) {
        for i in 0..self.nodes.len() {
            let _ = self.pause(i, false);
            self.kill(i).await;
        }
    }

    /// Spawns node `i` and reads its start line. Its HTTP port is the one it
    /// chose the first time, so clients keep working across restarts.
    async fn launch(&mut self, i: usize, extra: &[String]) -> Result<(), ClusterError> {
        let node = &self.nodes[i];
        let mut command = Command::new(&self.exe);
        command
            .arg("run")
            .args(["--region", &node.region])
            .arg("--data-dir")
            .arg(self.root.join(&node.region))
            .args([
                "--listen",
                &format!("/ip4/127.0.0.1/tcp/{}", node.listen_port),
            ])
            .args(["--http", &node.http]);
        for (j, link) in self.links[i].iter().enumerate() {
            if let Some(link) = link {
                command.args([
                    "--peer",
                    &format!(
                        "/ip4/127.0.0.1/tcp/{}/p2p/{}",
                        link.addr().port(),
                        self.nodes[j].peer_id
                    ),
                ]);
            }
        }
        command.args(extra);
        let log_path = self.root.join(format!("{}.log", node.region));
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(io(format!("opening {}", log_path.display())))?;
        let mut child = command
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log))
            .kill_on_drop(true)
            .spawn()
            .map_err(io(format!("starting {}", self.exe.display())))?;
        let failed = |reason: &str| ClusterError::Start {
            region: node.region.clone(),
            reason: reason.to_owned(),
            log: log_path.clone(),
        };
        let stdout = child.stdout.take().ok_or_else(|| failed("no stdout"))?;
        let mut lines = BufReader::new(stdout).lines();
        let banner = match tokio::time::timeout(START_TIMEOUT, lines.next_line()).await {
            Err(_) => return Err(failed("no start line within 20 s")),
            Ok(Err(e)) => return Err(failed(&e.to_string())),
            Ok(Ok(None)) => return Err(failed("it exited before its start line")),
            Ok(Ok(Some(line))) => line,
        };
        let http = banner
            .split_whitespace()
            .find_map(|t| t.strip_prefix("http="))
            .ok_or_else(|| failed("a start line without http="))?
            .to_owned();
        let node = &mut self.nodes[i];
        node.client = Client::new(&format!("http://{http}"))?;
        node.http = http;
        node.banner = banner;
        node.child = Some(child);
        Ok(())
    }
}
