//! Client subcommands: call a node's HTTP API through [`crate::client`],
//! print a table or the JSON.

use super::table::render;
use super::ClientArgs;
use crate::client::{Client, ConflictFilter};
use crate::record::CompensationState;
use serde::Serialize;
use serde_json::Value;

/// The client for `--node` and `--api-token`.
pub(super) fn connect(args: &ClientArgs) -> anyhow::Result<Client> {
    let client = Client::new(&args.node)?;
    Ok(match &args.api_token {
        Some(token) => client.with_api_token(token.clone()),
        None => client,
    })
}

fn s(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn or_dash(v: Option<&str>) -> String {
    v.unwrap_or("-").to_owned()
}

fn short(text: &str) -> String {
    if text.len() > 16 {
        format!("…{}", &text[text.len() - 12..])
    } else {
        text.to_owned()
    }
}

fn print_json<T: Serialize>(v: &T) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

/// `oncemesh allocate`.
pub async fn allocate(args: &ClientArgs, key: &str, payload: &str) -> anyhow::Result<i32> {
    let payload: Value = serde_json::from_str(payload)
        .map_err(|e| anyhow::anyhow!("--payload is not JSON ({e}): {payload}"))?;
    let answer = connect(args)?.allocate(key, &payload).await?;
    if args.json {
        print_json(&answer)?;
    } else {
        let a = &answer.allocation;
        let what = if answer.replay { "replay of" } else { "new" };
        println!(
            "{what} transaction {} for key {} (region {}, hlc {}, confidence {:.4}, {})",
            a.txn_id, a.key, a.region, a.hlc, a.confidence, a.state
        );
    }
    Ok(0)
}

/// `oncemesh conflicts`.
pub async fn conflicts(args: &ClientArgs, state: Option<&str>) -> anyhow::Result<i32> {
    let filter = match state {
        Some("open") => Some(ConflictFilter::Open),
        Some("resolved") => Some(ConflictFilter::Resolved),
        Some(other) => anyhow::bail!("unknown state '{other}'; use open or resolved"),
        None => None,
    };
    let list = connect(args)?.conflicts(filter).await?;
    if args.json {
        print_json(&serde_json::json!({ "conflicts": list }))?;
        return Ok(0);
    }
    let mut rows = Vec::new();
    for c in &list {
        let winner = c.winner.as_deref().unwrap_or("-");
        for a in &c.allocations {
            let role = if a.txn_id == winner {
                if c.winner_final {
                    "winner (final)".to_owned()
                } else {
                    "winner (provisional)".to_owned()
                }
            } else {
                let comp = c
                    .compensations
                    .iter()
                    .find(|comp| comp.txn_id == a.txn_id)
                    .map(|comp| format!("{} x{}", comp.state, comp.attempts))
                    .unwrap_or_else(|| CompensationState::Pending.to_string());
                format!("loser: {comp}")
            };
            rows.push(vec![
                c.key.clone(),
                a.region.clone(),
                short(&a.txn_id),
                a.hlc.to_string(),
                format!("{:.4}", a.confidence),
                role,
            ]);
        }
    }
    println!(
        "{}",
        render(
            &[
                "KEY",
                "REGION",
                "TXN",
                "HLC",
                "CONF@ALLOC",
                "ROLE / COMPENSATION"
            ],
            &rows
        )
    );
    println!("{} conflicting key(s)", list.len());
    Ok(0)
}

/// `oncemesh status`.
pub async fn status(args: &ClientArgs) -> anyhow::Result<i32> {
    let health = connect(args)?.health().await?;
    if args.json {
        print_json(&health)?;
        return Ok(0);
    }
    let exposure = health.exposure.clone();
    // The indicators' shape is still growing: read them as JSON.
    let body = Value::Object(health.extra);
    println!(
        "status: {} (region {}, peer {})",
        health.status.as_str(),
        s(&body["region"]),
        s(&body["peer_id"])
    );
    for reason in &health.reasons {
        println!("  - {}", s(reason));
    }
    let l = &body["ledger"];
    let rows = vec![
        vec!["keys".into(), s(&l["keys"])],
        vec!["allocations".into(), s(&l["allocations"])],
        vec!["provisional".into(), s(&l["provisional"])],
        vec!["conflicts open".into(), s(&body["conflicts_open"])],
        vec![
            "cross-region replays".into(),
            s(&body["cross_region_replays"]),
        ],
        vec![
            "peers connected".into(),
            format!(
                "{} / {}",
                s(&body["peers"]["connected"]),
                s(&body["peers"]["allowlisted"])
            ),
        ],
        vec![
            "max peer staleness ms".into(),
            s(&body["peers"]["max_staleness_ms"]),
        ],
        vec![
            "store delta (changes peers lack)".into(),
            s(&body["store_delta"]["they_lack_changes"]),
        ],
        vec![
            "clock skew violations".into(),
            s(&body["clock"]["skew_violations"]),
        ],
        vec![
            "max remote clock offset ms".into(),
            s(&body["clock"]["max_observed_offset_ms"]),
        ],
        vec![
            "compensations in flight".into(),
            s(&body["compensations"]["in_flight"]),
        ],
        vec![
            "compensations dead-lettered".into(),
            s(&body["compensations"]["dead_lettered"]),
        ],
    ];
    println!("{}", render(&["INDICATOR", "VALUE"], &rows));
    if let Some(exposure) = &exposure {
        println!("{}", super::calibration::exposure_lines(exposure));
    }
    Ok(0)
}

/// `oncemesh peers`.
pub async fn peers(args: &ClientArgs) -> anyhow::Result<i32> {
    let peers = connect(args)?.peers().await?;
    if args.json {
        print_json(&serde_json::json!({ "peers": peers }))?;
        return Ok(0);
    }
    let rows: Vec<Vec<String>> = peers
        .iter()
        .map(|p| {
            let delta = p.extra.get("store_delta").unwrap_or(&Value::Null);
            vec![
                p.peer_id.clone(),
                if p.connected { "yes" } else { "no" }.into(),
                or_dash(p.last_in_sync.as_deref()),
                s(&delta["they_lack_changes"]),
                s(&delta["we_lack_heads"]),
                p.clock_offset_ms.map_or("-".into(), |ms| ms.to_string()),
            ]
        })
        .collect();
    println!(
        "{}",
        render(
            &[
                "PEER",
                "CONNECTED",
                "LAST IN SYNC",
                "THEY LACK",
                "WE LACK (HEADS)",
                "CLOCK OFFSET MS"
            ],
            &rows
        )
    );
    Ok(0)
}

/// `oncemesh compensations`.
pub async fn compensations(args: &ClientArgs, state: Option<&str>) -> anyhow::Result<i32> {
    let list = connect(args)?.compensations(state).await?;
    if args.json {
        print_json(&serde_json::json!({ "compensations": list }))?;
        return Ok(0);
    }
    let rows: Vec<Vec<String>> = list
        .iter()
        .map(|c| {
            vec![
                or_dash(c.key.as_deref()),
                c.txn_id.clone(),
                short(&c.owner),
                c.state.clone(),
                c.attempts.to_string(),
                or_dash(c.next_attempt_at.as_deref()),
                or_dash(c.last_error.as_deref()),
            ]
        })
        .collect();
    println!(
        "{}",
        render(
            &[
                "KEY",
                "LOSER TXN",
                "OWNER",
                "STATE",
                "ATTEMPTS",
                "NEXT RETRY",
                "LAST ERROR"
            ],
            &rows
        )
    );
    Ok(0)
}

/// `oncemesh retry-compensation`.
pub async fn retry(args: &ClientArgs, txn: &str) -> anyhow::Result<i32> {
    let compensation = connect(args)?.retry_compensation(txn).await?;
    if args.json {
        print_json(&compensation)?;
    } else {
        println!("compensation of {txn} is {} again", compensation.state);
    }
    Ok(0)
}
