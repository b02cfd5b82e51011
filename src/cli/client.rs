//! Client subcommands: call a node's HTTP API, print a table or the JSON.

use super::table::render;
use super::ClientArgs;
use anyhow::Context;
use serde_json::Value;

/// Calls the API; returns (status, JSON body).
pub(super) async fn call(
    args: &ClientArgs,
    method: reqwest::Method,
    path: &str,
    body: Option<Value>,
) -> anyhow::Result<(u16, Value)> {
    let url = format!("{}{}", args.node.trim_end_matches('/'), path);
    let mut request = reqwest::Client::new().request(method, &url);
    if let Some(token) = &args.api_token {
        request = request.bearer_auth(token);
    }
    if let Some(body) = body {
        request = request.json(&body);
    }
    let response = request.send().await.with_context(|| {
        format!(
            "cannot reach the node at {} (is it running? see --node)",
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
    eprintln!("error ({status}): {message}");
    1
}

/// A JSON value as a table cell (`-` for null).
pub(super) fn s(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// A long id cut to its last characters.
pub(super) fn short(id: &Value) -> String {
    let text = s(id);
    if text.len() > 16 {
        format!("…{}", &text[text.len() - 12..])
    } else {
        text
    }
}

/// Prints JSON for scripts.
pub(super) fn print_json(v: &Value) {
    println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
}

/// GETs a report. `Ok(Some(body))` when a table is to be printed;
/// `Ok(None)` when the answer was already printed (`--json`) or was an error,
/// with the exit code in `code`.
async fn report(
    args: &ClientArgs,
    path: &str,
    state: Option<&str>,
    code: &mut i32,
) -> anyhow::Result<Option<Value>> {
    let path = match state {
        Some(state) => format!("{path}?state={state}"),
        None => path.to_owned(),
    };
    let (status, body) = call(args, reqwest::Method::GET, &path, None).await?;
    if status != 200 {
        *code = fail(status, &body);
        return Ok(None);
    }
    if args.json {
        print_json(&body);
        return Ok(None);
    }
    Ok(Some(body))
}

/// `oncemesh allocate`.
pub async fn allocate(args: &ClientArgs, key: &str, payload: &str) -> anyhow::Result<i32> {
    let payload: Value = serde_json::from_str(payload)
        .with_context(|| format!("--payload is not JSON: {payload}"))?;
    let (status, body) = call(
        args,
        reqwest::Method::POST,
        "/v1/allocations",
        Some(serde_json::json!({ "key": key, "payload": payload })),
    )
    .await?;
    if !(200..300).contains(&status) {
        return Ok(fail(status, &body));
    }
    if args.json {
        print_json(&body);
    } else {
        let what = if body["replay"] == Value::Bool(true) {
            "replay of"
        } else {
            "new"
        };
        println!(
            "{what} transaction {} for key {} (region {}, hlc {}, confidence {:.4}, {})",
            s(&body["txn_id"]),
            s(&body["key"]),
            s(&body["region"]),
            s(&body["hlc"]),
            body["confidence"].as_f64().unwrap_or(0.0),
            s(&body["state"])
        );
    }
    Ok(0)
}

/// `oncemesh conflicts`.
pub async fn conflicts(args: &ClientArgs, state: Option<&str>) -> anyhow::Result<i32> {
    let mut code = 0;
    let Some(body) = report(args, "/v1/conflicts", state, &mut code).await? else {
        return Ok(code);
    };
    let list = body["conflicts"].as_array().cloned().unwrap_or_default();
    let mut rows = Vec::new();
    for c in &list {
        let winner = s(&c["winner"]);
        for a in c["allocations"].as_array().into_iter().flatten() {
            let txn = s(&a["txn_id"]);
            let compensation = c["compensations"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|comp| comp["txn_id"] == a["txn_id"]);
            let role = if txn == winner {
                if c["winner_final"] == Value::Bool(true) {
                    "winner (final)".to_owned()
                } else {
                    "winner (provisional)".to_owned()
                }
            } else {
                let comp = compensation
                    .map(|comp| format!("{} x{}", s(&comp["state"]), s(&comp["attempts"])))
                    .unwrap_or_else(|| "pending".into());
                format!("loser: {comp}")
            };
            rows.push(vec![
                s(&c["key"]),
                s(&a["region"]),
                short(&a["txn_id"]),
                s(&a["hlc"]),
                format!("{:.4}", a["confidence"].as_f64().unwrap_or(0.0)),
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
    let mut code = 0;
    let Some(body) = report(args, "/v1/compensations", state, &mut code).await? else {
        return Ok(code);
    };
    let rows: Vec<Vec<String>> = body["compensations"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|c| {
            vec![
                s(&c["key"]),
                s(&c["txn_id"]),
                short(&c["owner"]),
                s(&c["state"]),
                s(&c["attempts"]),
                s(&c["next_attempt_at"]),
                s(&c["last_error"]),
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
    let path = format!("/v1/compensations/{txn}/retry");
    let (status, body) = call(args, reqwest::Method::POST, &path, None).await?;
    if status != 200 {
        return Ok(fail(status, &body));
    }
    if args.json {
        print_json(&body);
    } else {
        println!("compensation of {txn} is {} again", s(&body["state"]));
    }
    Ok(0)
}
