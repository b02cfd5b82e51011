//! `oncemesh calibration`, and the exposure lines of `oncemesh status`: can
//! this node's numbers be trusted, and what do they mean in money.

use super::client::{report, s};
use super::table::render;
use super::ClientArgs;
use serde_json::Value;

/// `oncemesh calibration`.
pub async fn show(args: &ClientArgs) -> anyhow::Result<i32> {
    let mut code = 0;
    let Some(body) = report(args, "/v1/calibration", None, &mut code).await? else {
        return Ok(code);
    };
    let tables = body["situations"].as_array().into_iter().flatten();
    let rows: Vec<Vec<String>> = tables
        .chain(std::iter::once(&body["overall"]))
        .map(|t| {
            vec![
                t["situation"].as_str().unwrap_or("all").to_owned(),
                s(&t["resolved"]),
                fixed(&t["mean_confidence"], 4),
                fixed(&t["conflict_free_share"], 4),
                fixed(&t["gap"], 4),
                fixed(&t["ece"], 4),
                s(&t["verdict"]),
            ]
        })
        .collect();
    println!(
        "{}",
        render(
            &[
                "SITUATION",
                "RESOLVED",
                "MEAN CONFIDENCE",
                "NO CONFLICT",
                "GAP",
                "ECE",
                "VERDICT"
            ],
            &rows
        )
    );
    let episodes: Vec<Vec<String>> = body["episodes"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|e| {
            let duration = match (e["started_ms"].as_u64(), e["ended_ms"].as_u64()) {
                (Some(start), Some(end)) => {
                    format!("{:.1} s", end.saturating_sub(start) as f64 / 1e3)
                }
                _ => "under way".into(),
            };
            vec![
                s(&e["id"]),
                s(&e["worst"]),
                duration,
                s(&e["allocations"]),
                fixed(&e["expected_duplicates"], 2),
                s(&e["conflicts_found"]),
                (e["allocations"].as_u64().unwrap_or(0))
                    .saturating_sub(e["resolved"].as_u64().unwrap_or(0))
                    .to_string(),
            ]
        })
        .collect();
    if episodes.is_empty() {
        println!("\nno partition episode since the node started");
    } else {
        println!(
            "\n{}",
            render(
                &[
                    "EPISODE",
                    "WORST",
                    "LASTED",
                    "ALLOCATIONS",
                    "EXPECTED DUPLICATES",
                    "CONFLICTS FOUND",
                    "UNRESOLVED"
                ],
                &episodes
            )
        );
    }
    Ok(0)
}

/// The exposure section of `oncemesh status`, from health's `exposure`.
pub fn exposure_lines(exposure: &Value) -> String {
    let mut rows = vec![vec![
        "expected duplicates".to_owned(),
        fixed(&exposure["expected_duplicates"], 3),
    ]];
    for (currency, value) in exposure["value_at_risk"].as_object().into_iter().flatten() {
        rows.push(vec![format!("value at risk, {currency}"), fixed(value, 2)]);
    }
    render(&["EXPOSURE", "VALUE"], &rows)
}

fn fixed(v: &Value, digits: usize) -> String {
    v.as_f64().map_or_else(|| s(v), |x| format!("{x:.digits$}"))
}
