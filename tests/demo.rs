//! `oncemesh demo` for scripts: `--json` prints the whole summary as one
//! JSON document on stdout (the narration on stderr), `--seed` makes the
//! traffic reproducible, and the exit code says whether every duplicate was
//! found on every region and compensated once.

mod support;

use serde_json::Value;
use std::time::Duration;

/// Runs the demo with `args`; returns the exit code, stdout and stderr.
async fn demo(args: &[&str]) -> (Option<i32>, String, String) {
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_oncemesh"));
    command
        .arg("demo")
        .args(args)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    let out = support::within(Duration::from_secs(120), "oncemesh demo", command.output())
        .await
        .expect("run oncemesh demo");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_prints_its_summary_as_json_and_its_seed_replays_the_traffic() {
    let args = ["--partition", "3s", "--seed", "7", "--json"];
    let (code, stdout, stderr) = demo(&args).await;
    assert_eq!(
        code,
        Some(0),
        "demo failed\nstdout:\n{stdout}\nstderr:\n{stderr}"
    );
    let first: Value = serde_json::from_str(&stdout)
        .unwrap_or_else(|e| panic!("stdout is not one JSON document ({e}):\n{stdout}"));
    assert!(
        stderr.contains("Partition"),
        "the narration goes to stderr: {stderr}"
    );
    assert_eq!(first["seed"], 7);
    assert_eq!(first["ok"], true, "{first}");
    assert_eq!(first["every_duplicate_compensated_once"], true, "{first}");
    let duplicates = first["partition"]["duplicates"].as_u64().unwrap_or(0);
    assert!(duplicates > 0, "the partition made duplicates: {first}");
    assert_eq!(first["heal"]["conflicts_found"], duplicates, "{first}");
    let reports = first["reports"].as_array().expect("reports");
    assert_eq!(reports.len(), 3, "{first}");
    for r in reports {
        assert_eq!(r["conflicts"], duplicates, "{r}");
    }

    // The same seed sends the same traffic.
    let (code, stdout, stderr) = demo(&args).await;
    assert_eq!(
        code,
        Some(0),
        "second run\nstdout:\n{stdout}\nstderr:\n{stderr}"
    );
    let second: Value = serde_json::from_str(&stdout).expect("JSON again");
    for field in [
        "/normal/cross_region_retries",
        "/partition/allocations",
        "/partition/retries_in_lon",
        "/partition/duplicates",
        "/heal/conflicts_found",
    ] {
        assert_eq!(first.pointer(field), second.pointer(field), "{field}");
    }
    let conflicts_keys = |v: &Value| v["sample_conflict"]["key"].clone();
    assert_eq!(conflicts_keys(&first), conflicts_keys(&second));
}
