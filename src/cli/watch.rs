//! `oncemesh conflicts --watch`: follows the conflict report and prints each
//! new conflict and each change of a compensation's state as it happens,
//! one line per event (`--json`: one JSON object per line), until Ctrl-C.
//! It polls `GET /v1/conflicts`; a node that stops answering is reported on
//! stderr and asked again, so a watch outlasts a restart.

use super::client::{call, s, short};
use super::ClientArgs;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::time::Duration;

/// What has been printed already: conflicts by key, compensation states by
/// loser transaction.
#[derive(Default)]
struct Seen {
    conflicts: HashMap<String, ()>,
    compensations: HashMap<String, (String, String)>,
}

/// The events a fresh report holds against what was seen.
fn events(report: &Value, seen: &mut Seen) -> Vec<Value> {
    let mut out = Vec::new();
    for c in report["conflicts"].as_array().into_iter().flatten() {
        let key = s(&c["key"]);
        if seen.conflicts.insert(key.clone(), ()).is_none() {
            let allocations: Vec<Value> = c["allocations"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|a| json!({"txn_id": a["txn_id"], "region": a["region"], "hlc": a["hlc"], "confidence": a["confidence"]}))
                .collect();
            out.push(json!({
                "event": "conflict", "key": key, "winner": c["winner"],
                "detected_at": c["detected_at"], "allocations": allocations,
            }));
        }
        for comp in c["compensations"].as_array().into_iter().flatten() {
            let txn = s(&comp["txn_id"]);
            let now = (s(&comp["state"]), s(&comp["attempts"]));
            if seen.compensations.get(&txn) != Some(&now) {
                seen.compensations.insert(txn.clone(), now);
                out.push(json!({
                    "event": "compensation", "key": key, "txn_id": txn, "owner": comp["owner"],
                    "state": comp["state"], "attempts": comp["attempts"], "last_error": comp["last_error"],
                }));
            }
        }
    }
    out
}

/// One line for a human.
fn line(event: &Value) -> String {
    if event["event"] == "conflict" {
        let regions: Vec<String> = event["allocations"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|a| format!("{} in {}", short(&s(&a["txn_id"])), s(&a["region"])))
            .collect();
        format!(
            "{}  CONFLICT      {}  winner {}  allocations: {}",
            s(&event["detected_at"]),
            s(&event["key"]),
            short(&s(&event["winner"])),
            regions.join(", ")
        )
    } else {
        let error = event["last_error"]
            .as_str()
            .map_or(String::new(), |e| format!("  last error: {e}"));
        format!(
            "{}  COMPENSATION  {}  loser {} (owner {})  {} after {} attempt(s){error}",
            crate::http::rfc3339(crate::time::Clock::now_ms(&crate::time::SystemClock)),
            s(&event["key"]),
            short(&s(&event["txn_id"])),
            short(&s(&event["owner"])),
            s(&event["state"]),
            s(&event["attempts"])
        )
    }
}

/// Runs the watch until interrupted; `state` filters as `oncemesh conflicts` does.
pub async fn watch(args: &ClientArgs, state: Option<&str>, every: Duration) -> anyhow::Result<i32> {
    let path = match state {
        Some(state) => format!("/v1/conflicts?state={state}"),
        None => "/v1/conflicts".to_owned(),
    };
    let mut seen = Seen::default();
    let mut first = true;
    let mut reachable = true;
    loop {
        match call(args, reqwest::Method::GET, &path, None).await {
            Ok((200, report)) => {
                if !reachable {
                    eprintln!("node answers again");
                    reachable = true;
                }
                let found = events(&report, &mut seen);
                if first && !args.json {
                    println!(
                        "watching {} ({} conflict(s) so far); Ctrl-C to stop",
                        args.node,
                        seen.conflicts.len()
                    );
                }
                for event in found.iter().filter(|_| !first) {
                    if args.json {
                        println!("{event}");
                    } else {
                        println!("{}", line(event));
                    }
                }
                first = false;
            }
            Ok((code, body)) => {
                eprintln!("error ({code}): {body}");
            }
            Err(e) => {
                if reachable {
                    eprintln!("{e:#}; asking again every {every:?}");
                    reachable = false;
                }
            }
        }
        tokio::select! {
            _ = tokio::signal::ctrl_c() => return Ok(0),
            _ = tokio::time::sleep(every) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_conflict_and_each_compensation_change_is_an_event_once() {
        let mut seen = Seen::default();
        let report = |state: &str| {
            json!({"conflicts": [{
                "key": "order-7", "winner": "t1", "detected_at": "2024-01-01T00:00:00Z",
                "allocations": [{"txn_id": "t1", "region": "sgp"}, {"txn_id": "t2", "region": "lon"}],
                "compensations": [{"txn_id": "t2", "owner": "n2", "state": state, "attempts": 1}],
            }]})
        };
        let first = events(&report("running"), &mut seen);
        assert_eq!(first.len(), 2);
        assert_eq!(first[0]["event"], "conflict");
        assert!(
            line(&first[0]).contains("CONFLICT      order-7"),
            "{}",
            line(&first[0])
        );
        assert!(events(&report("running"), &mut seen).is_empty());
        let next = events(&report("succeeded"), &mut seen);
        assert_eq!(next.len(), 1);
        assert_eq!(next[0]["state"], "succeeded");
        assert!(line(&next[0]).contains("succeeded after 1 attempt(s)"));
    }
}
