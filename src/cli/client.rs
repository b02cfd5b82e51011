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

/// A JSON value as a table cell (`-` for null).
pub(super) fn s(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn or_dash(v: Option<&str>) -> String {
    v.unwrap_or("-").to_owned()
}

/// A long id cut to its last characters.
pub(super) fn short(text: &str) -> String {
    if text.len() > 16 {
        format!("…{}", &text[text.len() - 12..])
    } else {
        text.to_owned()
    }
}

/// Prints JSON for scripts.
pub(super) fn print_json<T: Serialize>(v: &T) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

/// Calls a route whose answer the CLI reads as plain JSON (the health and
/// peer reports, whose shape keeps growing); returns (status, JSON body).
pub(super) async fn call(
    args: &ClientArgs,
    method: reqwest::Method,
    path: &str,
    body: Option<Value>,
) -> anyhow::Result<(u16, Value)> {
    let url = format!("{}{}", args.node.trim_end_matches('/'), path);
    let http = crate::tls::http_client().build()?;
    let mut request = http.request(method, &url);
    if let Some(token) = &args.api_token {
        request = request.bearer_auth(token);
    }
    if let Some(body) = body {
        request = request.json(&body);
    }
    let response = request.send().await.map_err(|e| {
        anyhow::anyhow!(
            "cannot reach the node at {} (is it running? see --node): {e}",
            args.node
        )
    })?;
    let status = response.status().as_u16();
    let text = response.text().await.unwrap_or_default();
    let json = serde_json::from_str(&text).unwrap_or(Value::String(text));
    Ok((status, json))
}

/// Prints an API error and returns the exit code for it.
pub(super) fn fail(status: u16, body: &Value) -> i32 {
    let message = body
        .get("error")
        .and_then(Value::as_str)
        .map(str::to_owned)
        .unwrap_or_else(|| body.to_string());
    eprintln!("error: {message} (HTTP {status})");
    1
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
