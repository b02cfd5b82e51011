//! A cluster of real `oncemesh` processes on 127.0.0.1, wired so that every
//! connection between two nodes goes through a [`Relay`] per ordered pair.
//!
//! Node i is started with one `--peer` per other node j, pointing at the
//! relay (i→j), which forwards to node j's real listen port. Nodes only dial
//! configured addresses, so cutting / delaying relays partitions / slows the
//! mesh from outside the processes.
//!
//! Processes are SIGKILLed on drop (also when the test panics; then every
//! node's log tail is printed). On Linux each node also gets
//! `PR_SET_PDEATHSIG = SIGKILL`, so none outlives a test binary that is killed.
//! Set `ONCEMESH_KEEP_TMP=1` to keep the node directories after the test.

use std::fmt::Write as _;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write as _};
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use reqwest::Method;
use serde_json::Value;
use tempfile::TempDir;

use super::{localhost, tail_lines, POLL};
use oncemesh::drill::Relay;

/// The binary under test.
pub const BINARY: &str = env!("CARGO_BIN_EXE_oncemesh");
/// Prefix of the one line a node prints on stdout once started.
pub const START_PREFIX: &str = "oncemesh node started";
/// Lines of log shown in failure messages.
const TAIL: usize = 60;
/// Attempts to start a node when its listen port turns out to be taken.
const PORT_ATTEMPTS: usize = 4;
const DEFAULT_REGIONS: [&str; 3] = ["sgp", "lon", "nyc"];

/// How to start a cluster. `ClusterOptions::default()` plus builder methods.
#[derive(Clone, Debug)]
pub struct ClusterOptions {
    /// Region names, one per node; missing ones default to
    /// "sgp", "lon", "nyc", then "r3", "r4", ...
    pub regions: Vec<String>,
    /// Extra arguments for every node (after the harness's own).
    pub args: Vec<String>,
    /// Extra arguments for node i (after `args`); may be shorter than n.
    pub node_args: Vec<Vec<String>>,
    /// Environment variables for every node.
    pub env: Vec<(String, String)>,
    /// Environment variables for node i (after `env`); may be shorter than n.
    pub node_env: Vec<Vec<(String, String)>>,
    /// Passed as `--api-token` to every node and sent by the HTTP helpers
    /// as `Authorization: Bearer <token>`.
    pub api_token: Option<String>,
    /// Budget for the start line, then again for /v1/health to answer (200,
    /// or 503 with status critical).
    pub ready_timeout: Duration,
}

impl Default for ClusterOptions {
    fn default() -> Self {
        ClusterOptions {
            regions: Vec::new(),
            args: Vec::new(),
            node_args: Vec::new(),
            env: Vec::new(),
            node_env: Vec::new(),
            api_token: None,
            ready_timeout: Duration::from_secs(30),
        }
    }
}

impl ClusterOptions {
    pub fn regions<S: AsRef<str>>(mut self, regions: &[S]) -> Self {
        self.regions = regions.iter().map(|r| r.as_ref().to_string()).collect();
        self
    }

    /// Adds arguments for every node, e.g. `.args(["--compensation", "log"])`.
    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }

    /// Adds arguments for node `i` only.
    pub fn node_args<I, S>(mut self, i: usize, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        if self.node_args.len() <= i {
            self.node_args.resize(i + 1, Vec::new());
        }
        self.node_args[i].extend(args.into_iter().map(Into::into));
        self
    }

    /// Sets an environment variable for every node.
    pub fn env(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }

    /// Sets an environment variable for node `i` only (e.g. FAKETIME).
    pub fn node_env(mut self, i: usize, key: impl Into<String>, value: impl Into<String>) -> Self {
        if self.node_env.len() <= i {
            self.node_env.resize(i + 1, Vec::new());
        }
        self.node_env[i].push((key.into(), value.into()));
        self
    }

    pub fn api_token(mut self, token: impl Into<String>) -> Self {
        self.api_token = Some(token.into());
        self
    }

    pub fn ready_timeout(mut self, timeout: Duration) -> Self {
        self.ready_timeout = timeout;
        self
    }

    fn region(&self, i: usize) -> String {
        match self.regions.get(i) {
            Some(r) => r.clone(),
            None => DEFAULT_REGIONS
                .get(i)
                .map(|r| r.to_string())
                .unwrap_or_else(|| format!("r{i}")),
        }
    }
}

/// What a node printed on its start line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StartLine {
    pub region: String,
    pub peer_id: String,
    pub http: SocketAddr,
    pub listen: Vec<String>,
}

/// Parses `oncemesh node started region=R peer_id=P http=H listen=L [listen=L2...]`.
pub fn parse_start_line(line: &str) -> Result<StartLine, String> {
    let rest = line
        .trim()
        .strip_prefix(START_PREFIX)
        .ok_or_else(|| format!("start line does not begin with {START_PREFIX:?}: {line:?}"))?;
    let (mut region, mut peer_id, mut http, mut listen) = (None, None, None, Vec::new());
    for token in rest.split_whitespace() {
        let Some((name, value)) = token.split_once('=') else {
            continue;
        };
        match name {
            "region" => region = Some(value.to_string()),
            "peer_id" => peer_id = Some(value.to_string()),
            "http" => {
                let addr = value
                    .trim_start_matches("http://")
                    .trim_end_matches('/')
                    .parse::<SocketAddr>()
                    .map_err(|e| format!("bad http={value:?} in start line {line:?}: {e}"))?;
                http = Some(addr);
            }
            "listen" => listen.push(value.to_string()),
            _ => {}
        }
    }
    let missing = |what: &str| format!("start line has no {what}=: {line:?}");
    Ok(StartLine {
        region: region.ok_or_else(|| missing("region"))?,
        peer_id: peer_id.ok_or_else(|| missing("peer_id"))?,
        http: http.ok_or_else(|| missing("http"))?,
        listen,
    })
}

/// `/ip4/127.0.0.1/tcp/{port}`
pub fn tcp_multiaddr(port: u16) -> String {
    format!("/ip4/127.0.0.1/tcp/{port}")
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// One `oncemesh` process (running or not) and its directories.
pub struct Node {
    index: usize,
    region: String,
    peer_id: String,
    root: Option<TempDir>,
    root_path: PathBuf,
    data_dir: PathBuf,
    log_path: PathBuf,
    /// Everything but `run`, `--listen` and `--http`.
    fixed_args: Vec<String>,
    env: Vec<(String, String)>,
    api_token: Option<String>,
    client: reqwest::Client,
    state: Mutex<NodeState>,
}

struct NodeState {
    child: Option<Child>,
    listen_port: u16,
    /// 0 until the first start; then the last port, reused by `restart`.
    http_port: u16,
    http: Option<SocketAddr>,
    listen: Vec<String>,
    launches: u32,
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let st = lock(&self.state);
        f.debug_struct("Node")
            .field("index", &self.index)
            .field("region", &self.region)
            .field("peer_id", &self.peer_id)
            .field("pid", &st.child.as_ref().map(Child::id))
            .field("listen_port", &st.listen_port)
            .field("http", &st.http)
            .field("root", &self.root_path)
            .finish()
    }
}

/// A process just spawned, not yet known to be ready.
struct Launch {
    start_line: tokio::sync::oneshot::Receiver<String>,
    spawned_at: Instant,
    /// Log length at spawn: failure diagnosis reads from here.
    log_offset: u64,
    listen_port: u16,
}

enum LaunchError {
    /// Listen (or fixed http) port was taken: worth retrying on a new port.
    PortTaken(String),
    Fatal(String),
}

impl LaunchError {
    fn message(self) -> String {
        match self {
            LaunchError::PortTaken(m) | LaunchError::Fatal(m) => m,
        }
    }
}

impl Node {
    pub fn index(&self) -> usize {
        self.index
    }

    pub fn region(&self) -> &str {
        &self.region
    }

    pub fn peer_id(&self) -> &str {
        &self.peer_id
    }

    /// The node's `--data-dir` (persisted across `restart`).
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// The node's temp dir: holds `data/` and `node.log`.
    pub fn root_dir(&self) -> &Path {
        &self.root_path
    }

    /// Stderr of every run, plus stdout lines after the start line.
    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// Last `n` lines of the node's log.
    pub fn log_tail(&self, n: usize) -> String {
        tail_lines(&self.log_path, n)
    }

    /// The node's real listen port (peers reach it through proxies only).
    pub fn listen_port(&self) -> u16 {
        lock(&self.state).listen_port
    }

    /// `/ip4/127.0.0.1/tcp/{listen_port}`
    pub fn listen_multiaddr(&self) -> String {
        tcp_multiaddr(self.listen_port())
    }

    /// The `listen=` values of the last start line.
    pub fn announced_listen_addrs(&self) -> Vec<String> {
        lock(&self.state).listen.clone()
    }

    /// HTTP address from the last start line. Panics if the node never started.
    pub fn http_addr(&self) -> SocketAddr {
        lock(&self.state).http.unwrap_or_else(|| {
            panic!(
                "node {} ({}) has no http address: it never started\n{}",
                self.index,
                self.region,
                self.log_section()
            )
        })
    }

    /// `http://127.0.0.1:PORT` (no trailing slash).
    pub fn http_url(&self) -> String {
        format!("http://{}", self.http_addr())
    }

    /// `http_url() + path`; `path` starts with '/'.
    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.http_url(), path)
    }

    /// The shared HTTP client (no proxy, no connection reuse, 10 s timeout).
    pub fn client(&self) -> &reqwest::Client {
        &self.client
    }

    pub fn api_token(&self) -> Option<&str> {
        self.api_token.as_deref()
    }

    pub fn pid(&self) -> Option<u32> {
        lock(&self.state).child.as_ref().map(Child::id)
    }

    /// Whether the process is alive (it may still be starting).
    pub fn is_running(&self) -> bool {
        let mut st = lock(&self.state);
        match st.child.as_mut() {
            Some(child) => matches!(child.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// Exit status if the process has exited (None if running or never started).
    pub fn exit_status(&self) -> Option<ExitStatus> {
        let mut st = lock(&self.state);
        st.child.as_mut().and_then(|c| c.try_wait().ok().flatten())
    }

    /// The node's `/metrics` text (empty if it cannot be read).
    pub async fn metrics_text(&self) -> String {
        match self.client().get(self.url("/metrics")).send().await {
            Ok(response) => response.text().await.unwrap_or_default(),
            Err(_) => String::new(),
        }
    }

    /// Sum of every sample of a metric whose line starts with `name`.
    pub async fn metric(&self, name: &str) -> f64 {
        self.metrics_text()
            .await
            .lines()
            .filter(|l| l.starts_with(name))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    /// GET `path`, with the cluster's API token. Panics (with the log tail) if
    /// the request cannot be made at all; any HTTP status is returned.
    pub async fn get_json(&self, path: &str) -> (u16, Value) {
        self.request(Method::GET, path, None).await
    }

    /// POST `body` as JSON to `path`, with the cluster's API token.
    pub async fn post_json(&self, path: &str, body: &Value) -> (u16, Value) {
        self.request(Method::POST, path, Some(body)).await
    }

    /// Any method, with the cluster's API token; panics with the log tail on a
    /// transport error (connection refused, timeout...).
    pub async fn request(&self, method: Method, path: &str, body: Option<&Value>) -> (u16, Value) {
        let token = self.api_token.clone();
        match self
            .try_request(method.clone(), path, body, token.as_deref())
            .await
        {
            Ok(r) => r,
            Err(e) => panic!("{method} {path} on node {}: {e}", self.describe()),
        }
    }

    /// The non-panicking form, with an explicit token (`None`: no
    /// Authorization header). The body is parsed as JSON when it is JSON,
    /// else returned as `Value::String` (empty body: `Value::Null`).
    pub async fn try_request(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
        token: Option<&str>,
    ) -> Result<(u16, Value), String> {
        let http = lock(&self.state).http.ok_or("node never started")?;
        let url = format!("http://{http}{path}");
        let mut req = self.client.request(method, &url);
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        if let Some(b) = body {
            req = req.json(b);
        }
        let resp = req.send().await.map_err(|e| format!("{url}: {e:#}"))?;
        let status = resp.status().as_u16();
        let bytes = resp
            .bytes()
            .await
            .map_err(|e| format!("{url}: reading body of a {status} response: {e:#}"))?;
        let value = if bytes.iter().all(u8::is_ascii_whitespace) {
            Value::Null
        } else {
            serde_json::from_slice(&bytes)
                .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()))
        };
        Ok((status, value))
    }

    /// `try_request(GET ...)` with the cluster's token: for polling a node
    /// that may be down.
    pub async fn try_get_json(&self, path: &str) -> Result<(u16, Value), String> {
        let token = self.api_token.clone();
        self.try_request(Method::GET, path, None, token.as_deref())
            .await
    }

    /// "node 1 (lon, pid 1234)" plus the log tail: for failure messages.
    pub fn describe(&self) -> String {
        format!(
            "{} ({}, pid {:?})\n{}",
            self.index,
            self.region,
            self.pid(),
            self.log_section()
        )
    }

    fn log_section(&self) -> String {
        format!(
            "--- last {TAIL} lines of {} ---\n{}\n--- end of log ---",
            self.log_path.display(),
            self.log_tail(TAIL)
        )
    }

    fn log_since(&self, offset: u64) -> String {
        let text = std::fs::read(&self.log_path).unwrap_or_default();
        let from = usize::try_from(offset).unwrap_or(0).min(text.len());
        String::from_utf8_lossy(&text[from..]).into_owned()
    }

    fn log_note(&self, note: &str) {
        if let Ok(mut f) = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
        {
            let _ = writeln!(f, "=== harness: {note}");
        }
    }

    fn command_args(&self, listen_port: u16, http_port: u16) -> Vec<String> {
        let mut args = vec![
            "run".to_string(),
            "--region".to_string(),
            self.region.clone(),
            "--data-dir".to_string(),
            self.data_dir.display().to_string(),
            "--listen".to_string(),
            tcp_multiaddr(listen_port),
            "--http".to_string(),
            format!("127.0.0.1:{http_port}"),
        ];
        args.extend(self.fixed_args.iter().cloned());
        args
    }

    /// Spawns the process (the node must not be running).
    fn spawn(&self) -> Result<Launch, String> {
        let mut st = lock(&self.state);
        if let Some(child) = st.child.as_mut() {
            if matches!(child.try_wait(), Ok(None)) {
                return Err(format!("node {} is already running", self.index));
            }
        }
        st.launches += 1;
        let args = self.command_args(st.listen_port, st.http_port);
        let log_offset = std::fs::metadata(&self.log_path)
            .map(|m| m.len())
            .unwrap_or(0);
        let mut log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .map_err(|e| format!("cannot open {}: {e}", self.log_path.display()))?;
        let _ = writeln!(
            log,
            "=== harness: launch #{} of node {} ({}): {} {}",
            st.launches,
            self.index,
            self.region,
            BINARY,
            args.join(" ")
        );
        let stderr = log
            .try_clone()
            .map_err(|e| format!("cannot dup log file: {e}"))?;
        let mut cmd = Command::new(BINARY);
        cmd.args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(stderr));
        if std::env::var_os("RUST_BACKTRACE").is_none() {
            cmd.env("RUST_BACKTRACE", "1");
        }
        cmd.envs(self.env.iter().map(|(k, v)| (k, v)));
        let mut child = spawn_child(cmd).map_err(|e| format!("cannot spawn {BINARY}: {e}"))?;
        let stdout = child.stdout.take().ok_or("child has no stdout pipe")?;
        let (tx, rx) = tokio::sync::oneshot::channel();
        std::thread::Builder::new()
            .name(format!("oncemesh-{}-stdout", self.region))
            .spawn(move || forward_stdout(stdout, log, tx))
            .map_err(|e| format!("cannot start stdout reader thread: {e}"))?;
        st.child = Some(child);
        Ok(Launch {
            start_line: rx,
            spawned_at: Instant::now(),
            log_offset,
            listen_port: st.listen_port,
        })
    }

    /// Waits for the start line, checks it, then waits for /v1/health to answer.
    /// On failure the process is killed.
    async fn wait_ready(&self, launch: Launch, timeout: Duration) -> Result<(), LaunchError> {
        let result = self.wait_ready_inner(launch, timeout).await;
        if result.is_err() {
            self.kill_process();
        }
        result
    }

    async fn wait_ready_inner(&self, launch: Launch, timeout: Duration) -> Result<(), LaunchError> {
        let Launch {
            mut start_line,
            spawned_at,
            log_offset,
            listen_port,
        } = launch;
        let deadline = spawned_at + timeout;
        let failure = |what: String| -> LaunchError {
            let since = self.log_since(log_offset).to_ascii_lowercase();
            let port_taken = ["address already in use", "addrinuse", "os error 98"]
                .iter()
                .any(|needle| since.contains(needle));
            let msg = format!(
                "node {} ({}) failed to start: {what}\n{}",
                self.index,
                self.region,
                self.log_section()
            );
            if port_taken {
                LaunchError::PortTaken(msg)
            } else {
                LaunchError::Fatal(msg)
            }
        };

        // 1. The start line.
        let line = loop {
            if Instant::now() >= deadline {
                return Err(failure(format!("no start line within {timeout:?}")));
            }
            tokio::select! {
                line = &mut start_line => match line {
                    Ok(line) => break line,
                    Err(_) => {
                        // Stdout closed: the process is exiting.
                        let status = self.wait_exit(Duration::from_secs(2)).await;
                        return Err(failure(format!(
                            "stdout closed before the start line (exit status: {})",
                            status.map_or("still running".into(), |s| s.to_string())
                        )));
                    }
                },
                _ = tokio::time::sleep(Duration::from_millis(100)) => {
                    if let Some(status) = self.exit_status() {
                        return Err(failure(format!("exited before its start line: {status}")));
                    }
                }
            }
        };
        let start =
            parse_start_line(&line).map_err(|e| LaunchError::Fatal(failure(e).message()))?;
        if start.peer_id != self.peer_id {
            return Err(LaunchError::Fatal(
                failure(format!(
                    "start line peer_id={} but `oncemesh id` said {}",
                    start.peer_id, self.peer_id
                ))
                .message(),
            ));
        }
        if start.region != self.region {
            return Err(LaunchError::Fatal(
                failure(format!(
                    "start line region={} but it was started with --region {}",
                    start.region, self.region
                ))
                .message(),
            ));
        }
        let port = listen_port.to_string();
        let listens_on_port = start.listen.iter().any(|a| {
            let parts: Vec<&str> = a.split('/').collect();
            parts.windows(2).any(|w| w[0] == "tcp" && w[1] == port)
        });
        if !start.listen.is_empty() && !listens_on_port {
            return Err(LaunchError::PortTaken(
                failure(format!(
                    "start line listen={:?} does not include port {listen_port}",
                    start.listen
                ))
                .message(),
            ));
        }
        {
            let mut st = lock(&self.state);
            st.http = Some(start.http);
            st.http_port = start.http.port();
            st.listen = start.listen.clone();
        }

        // 2. The health endpoint.
        let health_deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.exit_status() {
                return Err(failure(format!(
                    "exited after its start line, before /v1/health answered: {status}"
                )));
            }
            let token = self.api_token.clone();
            let last = match self
                .try_request(Method::GET, "/v1/health", None, token.as_deref())
                .await
            {
                Ok((200, _)) => return Ok(()),
                // Critical (503) still means the node is up and answering:
                // a node restarted with a dead-lettered compensation is.
                Ok((503, body)) if body["status"] == "critical" => return Ok(()),
                Ok((code, body)) => format!("{code} {body}"),
                Err(e) => e,
            };
            if Instant::now() >= health_deadline {
                return Err(failure(format!(
                    "GET /v1/health did not answer 200 within {timeout:?}; last: {last}"
                )));
            }
            tokio::time::sleep(POLL).await;
        }
    }

    async fn wait_exit(&self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.exit_status() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// SIGKILL and reap; returns the exit status if there was a process.
    fn kill_process(&self) -> Option<ExitStatus> {
        let mut child = lock(&self.state).child.take()?;
        let _ = child.kill();
        child.wait().ok()
    }

    /// Sends `signal` (name for `kill -s`) to the process, if it is running.
    fn signal(&self, signal: &str) -> Result<(), String> {
        let pid = self
            .pid()
            .ok_or_else(|| format!("node {} has no process", self.index))?;
        let status = Command::new("kill")
            .args(["-s", signal, &pid.to_string()])
            .status()
            .map_err(|e| format!("cannot run kill -s {signal} {pid}: {e}"))?;
        if status.success() {
            Ok(())
        } else {
            Err(format!("kill -s {signal} {pid}: {status}"))
        }
    }
}

/// Sends the first start line to `tx`; copies every other stdout line to the log.
fn forward_stdout(
    stdout: std::process::ChildStdout,
    mut log: File,
    tx: tokio::sync::oneshot::Sender<String>,
) {
    let mut tx = Some(tx);
    let mut reader = BufReader::new(stdout);
    let mut buf = Vec::new();
    loop {
        buf.clear();
        match reader.read_until(b'\n', &mut buf) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let line = String::from_utf8_lossy(&buf);
        let line = line.trim_end_matches(['\r', '\n']);
        if tx.is_some() && line.trim_start().starts_with(START_PREFIX) {
            let _ = writeln!(log, "[stdout] {line}");
            if let Some(tx) = tx.take() {
                let _ = tx.send(line.to_string());
            }
        } else {
            let _ = writeln!(log, "[stdout] {line}");
        }
    }
}

/// A running cluster; see the module docs.
pub struct Cluster {
    nodes: Vec<Node>,
    /// `proxies[i][j]`: carries connections node i dials to node j (None on the diagonal).
    proxies: Vec<Vec<Option<Relay>>>,
    ready_timeout: Duration,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("nodes", &self.nodes)
            .finish_non_exhaustive()
    }
}

impl Cluster {
    /// Starts `n` nodes and waits until all are ready; panics with the
    /// failing node's log tail otherwise.
    pub async fn start(n: usize, opts: ClusterOptions) -> Cluster {
        match Cluster::try_start(n, opts).await {
            Ok(c) => c,
            Err(e) => panic!("cluster failed to start: {e}"),
        }
    }

    pub async fn try_start(n: usize, opts: ClusterOptions) -> Result<Cluster, String> {
        if n == 0 {
            return Err("a cluster needs at least one node".into());
        }
        let client = oncemesh::tls::http_client()
            .no_proxy()
            .pool_max_idle_per_host(0)
            .connect_timeout(Duration::from_secs(2))
            .timeout(Duration::from_secs(10))
            .build()
            .map_err(|e| format!("cannot build HTTP client: {e}"))?;

        // Directories and identities.
        let mut dirs = Vec::with_capacity(n);
        for i in 0..n {
            let region = opts.region(i);
            let root = tempfile::Builder::new()
                .prefix(&format!("oncemesh-{i}-{region}-"))
                .tempdir()
                .map_err(|e| format!("cannot create temp dir: {e}"))?;
            let data_dir = root.path().join("data");
            std::fs::create_dir_all(&data_dir)
                .map_err(|e| format!("cannot create {}: {e}", data_dir.display()))?;
            let peer_id = peer_id_of(&data_dir).await?;
            dirs.push((region, root, data_dir, peer_id));
        }

        // Listen ports: held until spawn so the proxies cannot be given one.
        let mut held = Vec::with_capacity(n);
        for _ in 0..n {
            let l = TcpListener::bind("127.0.0.1:0")
                .map_err(|e| format!("cannot reserve a port: {e}"))?;
            let port = l.local_addr().map_err(|e| e.to_string())?.port();
            held.push((l, port));
        }

        let mut proxies: Vec<Vec<Option<Relay>>> = Vec::with_capacity(n);
        for i in 0..n {
            let mut row = Vec::with_capacity(n);
            for (j, (_, port)) in held.iter().enumerate() {
                row.push(if i == j {
                    None
                } else {
                    Some(
                        Relay::start(localhost(*port))
                            .map_err(|e| format!("cannot start proxy {i}->{j}: {e}"))?,
                    )
                });
            }
            proxies.push(row);
        }

        let peer_ids: Vec<String> = dirs.iter().map(|d| d.3.clone()).collect();
        let mut nodes = Vec::with_capacity(n);
        for (index, (region, root, data_dir, peer_id)) in dirs.into_iter().enumerate() {
            let mut fixed_args = Vec::new();
            for (j, peer_j) in peer_ids.iter().enumerate() {
                if let Some(p) = &proxies[index][j] {
                    fixed_args.push("--peer".to_string());
                    fixed_args.push(format!("{}/p2p/{peer_j}", tcp_multiaddr(p.addr().port())));
                }
            }
            if let Some(t) = &opts.api_token {
                fixed_args.push("--api-token".into());
                fixed_args.push(t.clone());
            }
            fixed_args.extend(opts.args.iter().cloned());
            fixed_args.extend(opts.node_args.get(index).into_iter().flatten().cloned());
            let mut env = opts.env.clone();
            env.extend(opts.node_env.get(index).into_iter().flatten().cloned());
            let root_path = root.path().to_path_buf();
            nodes.push(Node {
                index,
                region,
                peer_id,
                log_path: root_path.join("node.log"),
                root: Some(root),
                root_path,
                data_dir,
                fixed_args,
                env,
                api_token: opts.api_token.clone(),
                client: client.clone(),
                state: Mutex::new(NodeState {
                    child: None,
                    listen_port: held[index].1,
                    http_port: 0,
                    http: None,
                    listen: Vec::new(),
                    launches: 0,
                }),
            });
        }
        drop(held);

        let cluster = Cluster {
            nodes,
            proxies,
            ready_timeout: opts.ready_timeout,
        };
        // Spawn everything first so the nodes boot in parallel, then wait for each.
        let mut launches = Vec::with_capacity(n);
        for node in &cluster.nodes {
            launches.push(node.spawn()?);
        }
        for (i, launch) in launches.into_iter().enumerate() {
            cluster.boot(i, Some(launch)).await?;
        }
        Ok(cluster)
    }

    /// Waits for node i's launch (or spawns it) until ready, moving it to a
    /// fresh listen port (and retargeting the proxies into it) if its port
    /// turns out to be taken.
    async fn boot(&self, i: usize, mut launch: Option<Launch>) -> Result<(), String> {
        let node = &self.nodes[i];
        let mut attempt = 1;
        loop {
            let l = match launch.take() {
                Some(l) => l,
                None => node.spawn()?,
            };
            match node.wait_ready(l, self.ready_timeout).await {
                Ok(()) => return Ok(()),
                Err(LaunchError::PortTaken(msg)) if attempt < PORT_ATTEMPTS => {
                    attempt += 1;
                    let port = super::free_port();
                    {
                        let mut st = lock(&node.state);
                        st.listen_port = port;
                        st.http_port = 0;
                    }
                    for row in &self.proxies {
                        if let Some(p) = &row[i] {
                            p.set_target(localhost(port));
                        }
                    }
                    node.log_note(&format!(
                        "port taken, retrying on listen port {port}: {}",
                        msg.lines().next().unwrap_or("")
                    ));
                }
                Err(e) => return Err(e.message()),
            }
        }
    }

    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    pub fn node(&self, i: usize) -> &Node {
        &self.nodes[i]
    }

    pub fn nodes(&self) -> &[Node] {
        &self.nodes
    }

    /// The proxy carrying connections node i dials to node j.
    pub fn proxy(&self, i: usize, j: usize) -> &Relay {
        self.proxies[i][j]
            .as_ref()
            .unwrap_or_else(|| panic!("no proxy from node {i} to itself"))
    }

    fn all_proxies(&self) -> impl Iterator<Item = &Relay> {
        self.proxies.iter().flatten().flatten()
    }

    /// Cuts every link to and from node i (live connections dropped, new ones refused).
    pub fn isolate(&self, i: usize) {
        for j in 0..self.len() {
            if j != i {
                self.proxy(i, j).cut();
                self.proxy(j, i).cut();
            }
        }
    }

    /// Splits the cluster into `group` and the rest: cuts every link across.
    pub fn partition(&self, group: &[usize]) {
        for i in 0..self.len() {
            for j in 0..self.len() {
                if i != j && group.contains(&i) != group.contains(&j) {
                    self.proxy(i, j).cut();
                }
            }
        }
    }

    /// Heals every cut (delays are left as they are; see `set_delay_all`).
    pub fn heal_all(&self) {
        for p in self.all_proxies() {
            p.heal();
        }
    }

    /// Cuts the link between i and j, both directions.
    pub fn cut_link(&self, i: usize, j: usize) {
        self.proxy(i, j).cut();
        self.proxy(j, i).cut();
    }

    pub fn heal_link(&self, i: usize, j: usize) {
        self.proxy(i, j).heal();
        self.proxy(j, i).heal();
    }

    /// Latency per chunk on the link between i and j, both directions.
    pub fn set_link_delay(&self, i: usize, j: usize, delay: Duration) {
        self.proxy(i, j).set_delay(delay);
        self.proxy(j, i).set_delay(delay);
    }

    pub fn set_delay_all(&self, delay: Duration) {
        for p in self.all_proxies() {
            p.set_delay(delay);
        }
    }

    /// Bytes forwarded on the link between i and j, both proxies added up.
    pub fn link_bytes(&self, i: usize, j: usize) -> u64 {
        self.proxy(i, j).bytes_forwarded() + self.proxy(j, i).bytes_forwarded()
    }

    /// SIGKILL node i and reap it (no-op if it is not running).
    pub fn kill(&self, i: usize) {
        let node = &self.nodes[i];
        if let Some(status) = node.kill_process() {
            node.log_note(&format!("killed with SIGKILL ({status})"));
        }
    }

    /// SIGTERM node i and wait up to `grace` for it to exit, then SIGKILL.
    /// Returns the exit status (None if it had to be killed or was not running).
    pub async fn stop(&self, i: usize, grace: Duration) -> Option<ExitStatus> {
        let node = &self.nodes[i];
        node.pid()?;
        if let Err(e) = node.signal("TERM") {
            node.log_note(&format!("SIGTERM failed: {e}"));
        }
        let status = node.wait_exit(grace).await;
        node.log_note(&format!("stop: exit status {status:?}"));
        if status.is_none() {
            self.kill(i);
        } else {
            lock(&node.state).child = None;
        }
        status
    }

    /// SIGSTOP node i: the process freezes, its sockets stay open.
    pub fn pause(&self, i: usize) {
        let node = &self.nodes[i];
        if let Err(e) = node.signal("STOP") {
            panic!("pause node {i}: {e}\n{}", node.log_section());
        }
        node.log_note("paused (SIGSTOP)");
    }

    /// SIGCONT node i.
    pub fn resume(&self, i: usize) {
        let node = &self.nodes[i];
        if let Err(e) = node.signal("CONT") {
            panic!("resume node {i}: {e}\n{}", node.log_section());
        }
        node.log_note("resumed (SIGCONT)");
    }

    /// Kills node i if it runs, then starts it again with the same data dir,
    /// listen port, args and env, trying to keep its HTTP port; waits until
    /// ready. Panics with the log tail if it does not come back.
    pub async fn restart(&self, i: usize) {
        if let Err(e) = self.try_restart(i).await {
            panic!("restart of node {i} failed: {e}");
        }
    }

    pub async fn try_restart(&self, i: usize) -> Result<(), String> {
        self.kill(i);
        self.nodes[i].log_note("restart");
        self.boot(i, None).await
    }

    /// Polls `cond` every 50 ms; true once it holds, false after `timeout`.
    pub async fn wait_until(&self, timeout: Duration, cond: impl FnMut() -> bool) -> bool {
        super::wait_until(timeout, cond).await
    }

    /// [`Cluster::wait_until`] for conditions that await (HTTP calls).
    pub async fn wait_until_async<F: AsyncFnMut() -> bool>(
        &self,
        timeout: Duration,
        cond: F,
    ) -> bool {
        super::wait_until_async(timeout, cond).await
    }

    /// Every node's log tail, for failure messages.
    pub fn logs(&self, n: usize) -> String {
        let mut out = String::new();
        for node in &self.nodes {
            let _ = writeln!(
                out,
                "===== node {} ({}) {} =====\n{}",
                node.index,
                node.region,
                node.log_path.display(),
                node.log_tail(n)
            );
        }
        out
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for node in &self.nodes {
            node.kill_process();
        }
        let keep = std::env::var_os("ONCEMESH_KEEP_TMP").is_some_and(|v| !v.is_empty() && v != "0");
        if std::thread::panicking() {
            eprintln!(
                "\n##### oncemesh cluster logs (test panicked) #####\n{}",
                self.logs(TAIL)
            );
        }
        if keep {
            for node in &mut self.nodes {
                if let Some(root) = node.root.take() {
                    eprintln!("keeping node {} dir {}", node.index, root.keep().display());
                }
            }
        }
        // Proxies and temp dirs are dropped after this (fields drop in order).
    }
}

/// Runs `oncemesh id --data-dir DIR` and returns the peer id it prints.
async fn peer_id_of(data_dir: &Path) -> Result<String, String> {
    let dir = data_dir.to_path_buf();
    let out = tokio::task::spawn_blocking(move || {
        Command::new(BINARY)
            .arg("id")
            .arg("--data-dir")
            .arg(&dir)
            .stdin(Stdio::null())
            .output()
    })
    .await
    .map_err(|e| format!("oncemesh id task failed: {e}"))?
    .map_err(|e| format!("cannot run {BINARY} id: {e}"))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let id = stdout
        .lines()
        .map(str::trim)
        .rfind(|l| !l.is_empty())
        .unwrap_or("");
    if !out.status.success() || id.is_empty() || id.contains(char::is_whitespace) {
        return Err(format!(
            "`oncemesh id --data-dir {}` failed ({}): stdout {stdout:?}\nstderr:\n{stderr}",
            data_dir.display(),
            out.status
        ));
    }
    Ok(id.to_string())
}

/// Spawns from one long-lived thread so that `PR_SET_PDEATHSIG` (which fires
/// when the *thread* that forked the child exits) only fires when the whole
/// test process dies, never because a tokio worker thread was retired.
#[cfg(target_os = "linux")]
fn spawn_child(mut cmd: Command) -> std::io::Result<Child> {
    use std::os::unix::process::CommandExt;
    use std::sync::mpsc;
    use std::sync::OnceLock;

    type Job = (Command, mpsc::Sender<std::io::Result<Child>>);
    static SPAWNER: OnceLock<mpsc::Sender<Job>> = OnceLock::new();

    extern "C" {
        fn prctl(option: std::ffi::c_int, ...) -> std::ffi::c_int;
    }
    const PR_SET_PDEATHSIG: std::ffi::c_int = 1;
    const SIGKILL: std::ffi::c_ulong = 9;

    // SAFETY: the closure only makes one async-signal-safe syscall.
    unsafe {
        cmd.pre_exec(|| {
            prctl(PR_SET_PDEATHSIG, SIGKILL);
            Ok(())
        });
    }
    let spawner = SPAWNER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("oncemesh-spawner".into())
            .spawn(move || {
                for (mut cmd, reply) in rx {
                    let _ = reply.send(cmd.spawn());
                }
            })
            .unwrap_or_else(|e| panic!("cannot start the process spawner thread: {e}"));
        tx
    });
    let (reply_tx, reply_rx) = mpsc::channel();
    spawner
        .send((cmd, reply_tx))
        .map_err(|_| std::io::Error::other("process spawner thread is gone"))?;
    reply_rx
        .recv()
        .map_err(|_| std::io::Error::other("process spawner thread dropped the request"))?
}

#[cfg(not(target_os = "linux"))]
fn spawn_child(mut cmd: Command) -> std::io::Result<Child> {
    cmd.spawn()
}
