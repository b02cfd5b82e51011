//! `oncemesh status` and `oncemesh peers`: what an on-call engineer reads
//! first. `status` is one screen: the region and its verdict with every
//! reason, a row per peer (connected, lag p50 / p99, delta, clock offset,
//! since when), the ledger's provisional / settled / conflicted counts,
//! exposure once the node reports it, and compensations. `--json` prints
//! the same as one JSON document for scripts.

use super::client::{call, fail, print_json, s, short};
use super::table::render;
use super::ClientArgs;
use serde_json::{json, Value};

/// Exit codes of `oncemesh status`, so a script can act on the verdict
/// (1 is any error, as for every subcommand).
fn exit_code(status: &Value) -> i32 {
    match status.as_str() {
        Some("ok") => 0,
        Some("degraded") => 2,
        _ => 3,
    }
}

/// GETs `/v1/health`, which answers 503 with a body when critical.
async fn health(args: &ClientArgs) -> anyhow::Result<Result<Value, i32>> {
    let (code, body) = call(args, reqwest::Method::GET, "/v1/health", None).await?;
    if code == 200 || (code == 503 && body.get("status").is_some()) {
        Ok(Ok(body))
    } else {
        Ok(Err(fail(code, &body)))
    }
}

async fn peer_list(args: &ClientArgs) -> anyhow::Result<Result<Value, i32>> {
    let (code, body) = call(args, reqwest::Method::GET, "/v1/peers", None).await?;
    if code == 200 {
        Ok(Ok(body["peers"].clone()))
    } else {
        Ok(Err(fail(code, &body)))
    }
}

/// `oncemesh status`: exits 0 when the node is ok, 2 when degraded, 3 when
/// critical.
pub async fn status(args: &ClientArgs) -> anyhow::Result<i32> {
    let health = match health(args).await? {
        Ok(h) => h,
        Err(code) => return Ok(code),
    };
    let peers = match peer_list(args).await? {
        Ok(p) => p,
        Err(code) => return Ok(code),
    };
    if args.json {
        print_json(&json!({ "health": health, "peers": peers }))?;
    } else {
        println!("{}", render_status(&health, &peers));
    }
    Ok(exit_code(&health["status"]))
}

/// `oncemesh peers`.
pub async fn peers(args: &ClientArgs) -> anyhow::Result<i32> {
    let peers = match peer_list(args).await? {
        Ok(p) => p,
        Err(code) => return Ok(code),
    };
    if args.json {
        print_json(&json!({ "peers": peers }))?;
    } else {
        println!("{}", peer_table(&peers, false));
    }
    Ok(0)
}

fn seconds(v: &Value) -> String {
    match v.as_f64() {
        None => "-".into(),
        Some(x) if x < 1.0 => format!("{:.0}ms", x * 1000.0),
        Some(x) if x < 100.0 => format!("{x:.1}s"),
        Some(x) => format!("{x:.0}s"),
    }
}

fn offset(v: &Value) -> String {
    v.as_i64()
        .map_or_else(|| "-".into(), |ms| format!("{ms:+}ms"))
}

/// A row per peer; `short_ids` abbreviates peer ids to fit one screen.
fn peer_table(peers: &Value, short_ids: bool) -> String {
    if peers.as_array().is_none_or(|p| p.is_empty()) {
        return "no peers (a single node: no --peer configured)".into();
    }
    let rows: Vec<Vec<String>> = peers
        .as_array()
        .into_iter()
        .flatten()
        .map(|p| {
            let lag = &p["replication_lag_seconds"];
            vec![
                if short_ids {
                    short(&s(&p["peer_id"]))
                } else {
                    s(&p["peer_id"])
                },
                s(&p["region"]),
                if p["connected"] == Value::Bool(true) {
                    "yes".into()
                } else {
                    "NO".into()
                },
                seconds(&p["seconds_since_in_sync"]),
                seconds(&lag["now"]),
                seconds(&lag["p50"]),
                seconds(&lag["p99"]),
                s(&p["store_delta"]["they_lack_changes"]),
                s(&p["store_delta"]["we_lack_heads"]),
                offset(&p["clock_offset_ms"]),
                s(&p["skew_violations"]),
                s(&p["connected_since"]),
            ]
        })
        .collect();
    render(
        &[
            "PEER",
            "REGION",
            "CONNECTED",
            "OUT OF SYNC",
            "LAG",
            "LAG P50",
            "LAG P99",
            "THEY LACK",
            "WE LACK",
            "OFFSET",
            "SKEW",
            "CONNECTED SINCE",
        ],
        &rows,
    )
}

/// The one screen.
fn render_status(h: &Value, peers: &Value) -> String {
    let mut out = Vec::new();
    out.push(format!(
        "{} region {} (peer {})",
        s(&h["status"]).to_uppercase(),
        s(&h["region"]),
        s(&h["peer_id"])
    ));
    let reasons = h["reasons"].as_array().cloned().unwrap_or_default();
    for r in &reasons {
        out.push(format!(
            "  {:<8} {:<22} {}",
            s(&r["severity"]),
            s(&r["code"]),
            s(&r["message"])
        ));
    }
    out.push(String::new());
    out.push(peer_table(peers, true));
    out.push(String::new());
    let l = &h["ledger"];
    let n = |v: &Value| v.as_u64().unwrap_or(0);
    let settled = n(&l["keys"]).saturating_sub(n(&l["provisional"]) + n(&l["conflicts"]));
    out.push(format!(
        "ledger        {} keys: {} provisional, {} settled, {} conflicted ({} open)",
        s(&l["keys"]),
        s(&l["provisional"]),
        settled,
        s(&l["conflicts"]),
        s(&h["conflicts_open"])
    ));
    if let Some(line) = exposure_line(&h["exposure"]) {
        out.push(line);
    }
    out.push(format!(
        "compensations {} in flight, {} dead-lettered",
        s(&h["compensations"]["in_flight"]),
        s(&h["compensations"]["dead_lettered"])
    ));
    let rate = h["near_miss_rate"]
        .as_f64()
        .map_or("-".into(), |r| format!("{:.3} %", r * 100.0));
    out.push(format!(
        "near misses   {} cross-region replays; {rate} of new allocations lately",
        s(&h["cross_region_replays"])
    ));
    out.push(format!(
        "clock         {} skew violations; largest remote stamp ahead {} ms (bound {} ms)",
        s(&h["clock"]["skew_violations"]),
        s(&h["clock"]["max_observed_offset_ms"]),
        s(&h["clock"]["max_offset_ms"])
    ));
    out.join("\n")
}

/// Exposure (expected duplicates and value at risk among provisional
/// allocations), shown once `/v1/health` reports it; nothing before.
fn exposure_line(exposure: &Value) -> Option<String> {
    let expected = exposure.get("expected_duplicates")?;
    let at_risk: Vec<String> = exposure["value_at_risk"]
        .as_object()
        .into_iter()
        .flatten()
        .map(|(currency, amount)| format!("{} {currency}", s(amount)))
        .collect();
    Some(format!(
        "exposure      {} expected duplicates; at risk {}",
        s(expected),
        if at_risk.is_empty() {
            "-".into()
        } else {
            at_risk.join(", ")
        }
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_screen_shows_the_verdict_reasons_peers_and_counts() {
        let health = json!({
            "status": "degraded", "region": "sgp", "peer_id": "12D3KooWsgp",
            "reasons": [{"code": "peer_unreachable", "severity": "degraded", "message": "peer X is not connected"}],
            "ledger": {"keys": 10, "provisional": 3, "conflicts": 2},
            "conflicts_open": 1,
            "compensations": {"in_flight": 1, "dead_lettered": 0},
            "near_miss_rate": 0.0125, "cross_region_replays": 4,
            "clock": {"skew_violations": 0, "max_observed_offset_ms": 3, "max_offset_ms": 500},
        });
        let peers = json!([{
            "peer_id": "12D3KooWAAAAAAAAAAAAAAAAlon", "region": "lon", "connected": false,
            "seconds_since_in_sync": 37.2,
            "replication_lag_seconds": {"now": 36.0, "p50": 0.02, "p99": 30.5},
            "store_delta": {"they_lack_changes": 12, "we_lack_heads": 0},
            "clock_offset_ms": -4, "skew_violations": 0,
        }]);
        let text = render_status(&health, &peers);
        assert!(text.starts_with("DEGRADED region sgp"), "{text}");
        assert!(text.contains("peer_unreachable"), "{text}");
        assert!(text.contains("lon") && text.contains("NO") && text.contains("37.2s"));
        assert!(text.contains("20ms") && text.contains("30.5s") && text.contains("-4ms"));
        assert!(
            text.contains("3 provisional, 5 settled, 2 conflicted (1 open)"),
            "{text}"
        );
        assert!(text.contains("1.250 %"), "{text}");
        assert!(
            !text.contains("exposure"),
            "nothing made up before the node reports it"
        );
        let mut with_exposure = health.clone();
        with_exposure["exposure"] =
            json!({"expected_duplicates": 0.7, "value_at_risk": {"EUR": 12.5}});
        let text = render_status(&with_exposure, &peers);
        assert!(
            text.contains("exposure      0.7 expected duplicates; at risk 12.5 EUR"),
            "{text}"
        );
        assert_eq!(exit_code(&health["status"]), 2);
    }
}
