//! Consistency health on real processes: `/metrics` parses as Prometheus
//! text (`promtool check metrics`) and holds every metric the alert rules
//! and the dashboard name; a cut link, a drilled clock and a slowed link
//! raise the right peer's indicators and health codes, and only that
//! peer's; `oncemesh status`, `peers` and `conflicts` (with `--watch`) read a
//! live cluster.

mod support;

use serde_json::{json, Value};
use std::collections::BTreeSet;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;
use support::{Cluster, ClusterOptions};
use tokio::io::{AsyncBufReadExt, BufReader};

const SETTLE: Duration = Duration::from_secs(20);

async fn all_connected(c: &Cluster) {
    for node in 0..c.len() {
        let want = c.len() - 1;
        assert!(
            c.wait_until_async(SETTLE, async || {
                c.node(node).get_json("/v1/health").await.1["peers"]["connected"] == want
            })
            .await,
            "node {node} never connected to its peers\n{}",
            c.logs(30)
        );
    }
}

/// What node `at` says of node `peer` in `/v1/peers`.
async fn peer_row(c: &Cluster, at: usize, peer: usize) -> Value {
    let (_, peers) = c.node(at).get_json("/v1/peers").await;
    peers["peers"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|p| p["peer_id"] == c.node(peer).peer_id())
        .cloned()
        .unwrap_or_else(|| panic!("node {at} does not list node {peer}: {peers}"))
}

fn reasons(health: &Value) -> Vec<Value> {
    health["reasons"].as_array().cloned().unwrap_or_default()
}

fn has_reason(health: &Value, code: &str, peer: &str) -> bool {
    reasons(health)
        .iter()
        .any(|r| r["code"] == code && r["peer"] == peer)
}

fn repo_file(path: &str) -> String {
    let full = Path::new(env!("CARGO_MANIFEST_DIR")).join(path);
    std::fs::read_to_string(&full).unwrap_or_else(|e| panic!("{}: {e}", full.display()))
}

/// Runs `promtool` with `args`, `stdin` on its standard input.
fn promtool(args: &[&str], stdin: &str) -> (bool, String) {
    use std::io::Write;
    let mut child = std::process::Command::new("promtool")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| {
            panic!(
                "promtool not found ({e}): install Debian's `prometheus` package, as .ci/run does"
            )
        });
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(stdin.as_bytes())
        .expect("write to promtool");
    let out = child.wait_with_output().expect("promtool ran");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// Metric names a Prometheus text exposition declares or samples.
fn exported_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for line in text.lines() {
        let name = match line.strip_prefix("# TYPE ") {
            Some(rest) => rest.split_whitespace().next(),
            None if line.starts_with('#') => None,
            None => line.split(['{', ' ']).next(),
        };
        if let Some(name) = name.filter(|n| !n.is_empty()) {
            names.insert(name.to_owned());
            for suffix in ["_bucket", "_sum", "_count"] {
                if line.starts_with("# TYPE ") && line.ends_with(" histogram") {
                    names.insert(format!("{name}{suffix}"));
                }
            }
        }
    }
    names
}

/// Every `oncemesh_...` name in a file's text.
fn names_used(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let bytes = text.as_bytes();
    let mut i = 0;
    while let Some(at) = text[i..].find("oncemesh_") {
        let start = i + at;
        let mut end = start;
        while end < bytes.len() && (bytes[end].is_ascii_alphanumeric() || bytes[end] == b'_') {
            end += 1;
        }
        let before_ok =
            start == 0 || !(bytes[start - 1].is_ascii_alphanumeric() || bytes[start - 1] == b'_');
        if before_ok {
            names.insert(text[start..end].to_owned());
        }
        i = end;
    }
    names
}

/// Makes one conflict (node 0 cut off, the key allocated on both sides,
/// then heal) and waits until node 0 reports it compensated.
async fn make_a_conflict(c: &Cluster, key: &str) {
    c.isolate(0);
    for node in [0, 1] {
        let (code, body) = c
            .node(node)
            .post_json(
                "/v1/allocations",
                &json!({"key": key, "payload": {"n": node}}),
            )
            .await;
        assert_eq!(code, 201, "{body}");
    }
    c.heal_all();
    assert!(
        c.wait_until_async(Duration::from_secs(30), async || {
            let (_, r) = c.node(0).get_json("/v1/conflicts?state=resolved").await;
            r["conflicts"]
                .as_array()
                .is_some_and(|l| l.iter().any(|x| x["key"] == key))
        })
        .await,
        "the conflict on {key} was never compensated\n{}",
        c.logs(30)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_parse_as_prometheus_text_and_hold_every_name_the_rules_and_dashboard_use() {
    let c = Cluster::start(3, ClusterOptions::default()).await;
    all_connected(&c).await;
    make_a_conflict(&c, "metrics-dup").await;
    let text = c.node(0).metrics_text().await;
    // Detected, and compensated: no longer open, on the gauge as in health.
    assert!(
        text.contains("\noncemesh_conflicts_detected_total 1\n"),
        "{text}"
    );
    assert!(text.contains("\noncemesh_conflicts_open 0\n"), "{text}");
    let (ok, lint) = promtool(&["check", "metrics"], &text);
    assert!(ok, "promtool check metrics: {lint}\n{text}");
    let exported = exported_names(&text);
    for file in [
        "examples/prometheus/alerts.yml",
        "examples/grafana/oncemesh.json",
    ] {
        let used = names_used(&repo_file(file));
        assert!(used.len() > 10, "{file} names only {used:?}");
        let missing: Vec<_> = used.difference(&exported).collect();
        assert!(
            missing.is_empty(),
            "{file} uses names the node does not export: {missing:?}\n{text}"
        );
    }
    let rules = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/prometheus/alerts.yml");
    let (ok, out) = promtool(&["check", "rules", rules.to_str().unwrap()], "");
    assert!(ok, "{out}");
    serde_json::from_str::<Value>(&repo_file("examples/grafana/oncemesh.json"))
        .expect("the dashboard is JSON");
    // Per-peer series carry each peer's id and the region it reports.
    for (peer, region) in [(1, "lon"), (2, "nyc")] {
        let series = format!(
            "oncemesh_peer_connected{{peer=\"{}\",region=\"{region}\"}} 1",
            c.node(peer).peer_id()
        );
        assert!(text.contains(&series), "no {series}\n{text}");
    }
    assert_eq!(
        text.matches("oncemesh_peer_redial_attempts_total{").count(),
        2,
        "one series per allowlisted peer\n{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cutting_one_link_raises_that_peers_lag_delta_and_staleness_only_and_health_recovers() {
    let c = Cluster::start(3, ClusterOptions::default()).await;
    all_connected(&c).await;
    assert!(
        c.wait_until_async(SETTLE, async || c.node(0).get_json("/v1/health").await.1
            ["status"]
            == "ok")
            .await,
        "{}",
        c.node(0).get_json("/v1/health").await.1
    );
    let (lon, nyc) = (
        c.node(1).peer_id().to_owned(),
        c.node(2).peer_id().to_owned(),
    );
    c.cut_link(0, 1);
    for i in 0..20 {
        let (code, _) = c
            .node(0)
            .post_json(
                "/v1/allocations",
                &json!({"key": format!("cut-{i}"), "payload": {}}),
            )
            .await;
        assert_eq!(code, 201);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        c.wait_until_async(SETTLE, async || {
            let p = peer_row(&c, 0, 1).await;
            p["replication_lag_seconds"]["now"].as_f64() > Some(3.0)
                && p["store_delta"]["they_lack_changes"].as_u64() > Some(0)
                && p["seconds_since_in_sync"].as_f64() > Some(4.0)
        })
        .await,
        "the cut peer's indicators did not rise: {}",
        peer_row(&c, 0, 1).await
    );
    let other = peer_row(&c, 0, 2).await;
    assert_eq!(other["connected"], true, "{other}");
    assert!(
        other["replication_lag_seconds"]["now"].as_f64() < Some(1.0),
        "{other}"
    );
    assert_eq!(other["store_delta"]["they_lack_changes"], 0, "{other}");
    assert!(
        other["seconds_since_in_sync"].as_f64() < Some(3.0),
        "{other}"
    );
    let (code, health) = c.node(0).get_json("/v1/health").await;
    assert_eq!(
        (code, health["status"].as_str()),
        (200, Some("degraded")),
        "{health}"
    );
    assert!(has_reason(&health, "peer_unreachable", &lon), "{health}");
    assert!(
        !reasons(&health).iter().any(|r| r["peer"] == nyc),
        "{health}"
    );
    let text = c.node(0).metrics_text().await;
    assert!(
        text.contains(&format!(
            "oncemesh_peer_connected{{peer=\"{lon}\",region=\"lon\"}} 0"
        )),
        "{text}"
    );
    assert!(
        text.contains(&format!(
            "oncemesh_peer_connected{{peer=\"{nyc}\",region=\"nyc\"}} 1"
        )),
        "{text}"
    );
    assert!(
        text.contains("oncemesh_health_reasons{code=\"peer_unreachable\"} 1"),
        "{text}"
    );

    c.heal_link(0, 1);
    assert!(
        c.wait_until_async(SETTLE, async || {
            let (code, h) = c.node(0).get_json("/v1/health").await;
            let p = peer_row(&c, 0, 1).await;
            code == 200
                && h["status"] == "ok"
                && p["replication_lag_seconds"]["now"] == 0.0
                && p["store_delta"]["they_lack_changes"] == 0
        })
        .await,
        "not back to ok after heal: {} {}",
        c.node(0).get_json("/v1/health").await.1,
        peer_row(&c, 0, 1).await
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drilled_clock_shows_as_that_peers_offset_and_skew_on_the_others_only() {
    let c = Cluster::start(
        3,
        ClusterOptions::default().node_args(1, ["--drill-clock-offset", "3s"]),
    )
    .await;
    all_connected(&c).await;
    let skewed = c.node(1).peer_id().to_owned();
    for (at, other) in [(0, 2), (2, 0)] {
        assert!(
            c.wait_until_async(SETTLE, async || {
                let p = peer_row(&c, at, 1).await;
                p["clock_offset_ms"].as_i64() > Some(2500)
                    && p["skew_violations"].as_u64() > Some(0)
                    && peer_row(&c, at, other).await["clock_offset_ms"].is_i64()
            })
            .await,
            "node {at}: {}",
            peer_row(&c, at, 1).await
        );
        let fine = peer_row(&c, at, other).await;
        let offset = fine["clock_offset_ms"].as_i64().expect("measured");
        assert!(
            offset.abs() < 300,
            "node {at} sees node {other} {offset} ms off: {fine}"
        );
        assert_eq!(fine["skew_violations"], 0, "{fine}");
        let (_, health) = c.node(at).get_json("/v1/health").await;
        assert_eq!(health["status"], "degraded", "{health}");
        assert!(has_reason(&health, "clock_offset", &skewed), "{health}");
        assert!(
            !reasons(&health)
                .iter()
                .any(|r| r["code"] == "clock_offset" && r["peer"] != skewed),
            "{health}"
        );
    }
    let text = c.node(0).metrics_text().await;
    let line = text
        .lines()
        .find(|l| {
            l.starts_with(&format!(
                "oncemesh_peer_clock_skew_violations_total{{peer=\"{skewed}\""
            ))
        })
        .unwrap_or_else(|| panic!("{text}"));
    assert!(!line.ends_with(" 0"), "{line}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lag_far_above_its_baseline_raises_lag_anomalous_in_a_drill() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("node.toml");
    std::fs::write(
        &config,
        "[health.anomaly]\nwindow = \"60s\"\nwarmup = \"5s\"\nsustain = \"2s\"\nlag_min_excess = \"300ms\"\n",
    )
    .unwrap();
    let c = Cluster::start(
        2,
        ClusterOptions::default().args(["--config", config.to_str().unwrap()]),
    )
    .await;
    all_connected(&c).await;
    let url = c.node(0).url("/v1/allocations");
    let stop = tokio_util::sync::CancellationToken::new();
    let traffic = tokio::spawn({
        let stop = stop.clone();
        let client = oncemesh::tls::http_client().build().unwrap();
        async move {
            for i in 0..2000 {
                if stop.is_cancelled() {
                    break;
                }
                let body = json!({"key": format!("steady-{i}"), "payload": {}});
                let _ = client.post(&url).json(&body).send().await;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    });
    let peer = c.node(1).peer_id().to_owned();
    // Warm-up on a normal link, then the link slows to a second each way.
    tokio::time::sleep(Duration::from_secs(8)).await;
    let (_, calm) = c.node(0).get_json("/v1/health").await;
    assert!(!has_reason(&calm, "lag_anomalous", &peer), "{calm}");
    c.set_link_delay(0, 1, Duration::from_secs(1));
    assert!(
        c.wait_until_async(Duration::from_secs(30), async || {
            has_reason(
                &c.node(0).get_json("/v1/health").await.1,
                "lag_anomalous",
                &peer,
            )
        })
        .await,
        "no lag_anomalous: {}\n{}",
        c.node(0).get_json("/v1/health").await.1,
        peer_row(&c, 0, 1).await
    );
    let (_, health) = c.node(0).get_json("/v1/health").await;
    if let Some(r) = reasons(&health)
        .iter()
        .find(|r| r["code"] == "lag_anomalous")
    {
        let (value, threshold, baseline) = (
            r["value"].as_f64().unwrap(),
            r["threshold"].as_f64().unwrap(),
            r["baseline"].as_f64().unwrap(),
        );
        assert!(value > threshold && baseline < 0.3, "{r}");
        assert_eq!(r["unit"], "seconds");
    }
    let text = c.node(0).metrics_text().await;
    assert!(
        text.contains(&format!(
            "oncemesh_indicator_anomalous{{indicator=\"lag\",peer=\"{peer}\",region=\"lon\"}} 1"
        )),
        "{text}"
    );
    c.set_link_delay(0, 1, Duration::ZERO);
    assert!(
        c.wait_until_async(Duration::from_secs(30), async || {
            !has_reason(
                &c.node(0).get_json("/v1/health").await.1,
                "lag_anomalous",
                &peer,
            )
        })
        .await,
        "lag_anomalous did not clear: {}",
        c.node(0).get_json("/v1/health").await.1
    );
    stop.cancel();
    let _ = traffic.await;
}

/// Runs the `oncemesh` client with `args`; returns (exit code, stdout, stderr).
async fn cli(args: &[&str]) -> (i32, String, String) {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_oncemesh"))
        .args(args)
        .env_remove("ONCEMESH_NODE")
        .env_remove("ONCEMESH_API_TOKEN")
        .output()
        .await
        .expect("run oncemesh");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Starts `oncemesh conflicts --watch` against `url`; returns the child and
/// a channel of its stdout lines.
fn watch(
    url: &str,
    json: bool,
) -> (
    tokio::process::Child,
    tokio::sync::mpsc::UnboundedReceiver<String>,
) {
    let mut args = vec!["conflicts", "--watch", "--interval", "200ms", "--node", url];
    if json {
        args.push("--json");
    }
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_oncemesh"))
        .args(&args)
        .env_remove("ONCEMESH_API_TOKEN")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("start the watch");
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok(Some(line)) = lines.next_line().await {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    (child, rx)
}

/// Waits for a line with `needle`; returns every line read.
async fn line_with(
    rx: &mut tokio::sync::mpsc::UnboundedReceiver<String>,
    needle: &str,
) -> Vec<String> {
    let mut seen = Vec::new();
    let found = tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(line) = rx.recv().await {
            let hit = line.contains(needle);
            seen.push(line);
            if hit {
                return true;
            }
        }
        false
    })
    .await;
    assert!(matches!(found, Ok(true)), "no line with {needle}: {seen:?}");
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_peers_and_conflicts_read_a_live_cluster_and_watch_prints_a_healed_conflict() {
    let c = Cluster::start(3, ClusterOptions::default()).await;
    all_connected(&c).await;
    let (url0, url2) = (c.node(0).http_url(), c.node(2).http_url());
    c.isolate(0);
    for node in [0, 1] {
        let (code, body) = c
            .node(node)
            .post_json(
                "/v1/allocations",
                &json!({"key": "cli-dup", "payload": {"n": node}}),
            )
            .await;
        assert_eq!(code, 201, "{body}");
    }
    let (mut human, mut human_lines) = watch(&url2, false);
    let (mut machine, mut machine_lines) = watch(&url0, true);
    line_with(&mut human_lines, "watching").await;
    // Partitioned: node 0's status says so, with a row per peer.
    let (code, out, err) = cli(&["status", "--node", &url0]).await;
    assert_eq!(code, 2, "degraded exits 2: {out}{err}");
    assert!(out.starts_with("DEGRADED region sgp"), "{out}");
    assert!(
        out.contains("peer_unreachable") && out.contains("lon") && out.contains("nyc"),
        "{out}"
    );
    assert!(
        out.contains("LAG P99") && out.contains("provisional"),
        "{out}"
    );

    c.heal_all();
    line_with(&mut human_lines, "CONFLICT      cli-dup").await;
    let lines = line_with(&mut machine_lines, "\"cli-dup\"").await;
    let event: Value =
        serde_json::from_str(lines.last().unwrap()).expect("one JSON object per line");
    assert_eq!(event["key"], "cli-dup", "{event}");
    line_with(&mut human_lines, "succeeded").await;
    let _ = human.kill().await;
    let _ = machine.kill().await;

    assert!(
        c.wait_until_async(SETTLE, async || c.node(0).get_json("/v1/health").await.1
            ["status"]
            == "ok")
            .await,
        "{}",
        c.node(0).get_json("/v1/health").await.1
    );
    let (code, out, err) = cli(&["status", "--node", &url0]).await;
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.starts_with("OK region sgp") && out.contains("1 conflicted (0 open)"),
        "{out}"
    );
    let (code, out, _) = cli(&["status", "--node", &url0, "--json"]).await;
    assert_eq!(code, 0);
    let status: Value = serde_json::from_str(&out).expect("status --json");
    assert_eq!(status["health"]["status"], "ok", "{status}");
    let regions: BTreeSet<_> = status["peers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["region"].as_str().unwrap_or("-").to_owned())
        .collect();
    assert_eq!(
        regions,
        BTreeSet::from(["lon".to_owned(), "nyc".to_owned()]),
        "{status}"
    );

    let (code, out, _) = cli(&["peers", "--node", &url0]).await;
    assert_eq!(code, 0);
    assert!(
        out.contains("LAG P50") && out.contains(c.node(1).peer_id()) && out.contains("lon"),
        "{out}"
    );
    // Lag quantiles appear with the first sync round's sample.
    let mut peers = Value::Null;
    let sampled = c
        .wait_until_async(SETTLE, async || {
            let (_, out, _) = cli(&["peers", "--node", &url0, "--json"]).await;
            peers = serde_json::from_str(&out).expect("peers --json");
            peers["peers"].as_array().is_some_and(|l| {
                l.iter()
                    .all(|p| p["replication_lag_seconds"]["p99"].is_number())
            })
        })
        .await;
    assert!(sampled, "{peers}");
    let (code, out, _) = cli(&["conflicts", "--node", &url0]).await;
    assert_eq!(code, 0);
    assert!(
        out.contains("cli-dup") && out.contains("1 conflicting key(s)"),
        "{out}"
    );
    let (_, out, _) = cli(&["conflicts", "--node", &url0, "--json"]).await;
    let report: Value = serde_json::from_str(&out).expect("conflicts --json");
    assert_eq!(report["conflicts"][0]["key"], "cli-dup", "{report}");
}
