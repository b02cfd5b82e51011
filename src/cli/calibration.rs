//! `oncemesh calibration`: can this node's numbers be trusted.

use super::client::connect;
use super::table::render;
use super::ClientArgs;
use crate::confidence::calibration::ReliabilityReport;

/// `oncemesh calibration`.
pub async fn show(args: &ClientArgs) -> anyhow::Result<i32> {
    let report = connect(args)?.calibration().await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(0);
    }
    let row = |t: &ReliabilityReport| {
        vec![
            t.situation.map_or("all", |s| s.as_str()).to_owned(),
            t.resolved.to_string(),
            format!("{:.4}", t.mean_confidence),
            format!("{:.4}", t.conflict_free_share),
            format!("{:+.4}", t.gap),
            format!("{:.4}", t.ece),
            t.verdict.as_str().to_owned(),
        ]
    };
    let mut rows: Vec<Vec<String>> = report.situations.iter().map(row).collect();
    rows.push(row(&report.overall));
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
    let episodes: Vec<Vec<String>> = report
        .episodes
        .iter()
        .map(|e| {
            vec![
                e.id.to_string(),
                e.worst.as_str().to_owned(),
                e.ended_ms.map_or("under way".into(), |end| {
                    format!("{:.1} s", end.saturating_sub(e.started_ms) as f64 / 1e3)
                }),
                e.allocations.to_string(),
                format!("{:.2}", e.expected_duplicates),
                e.conflicts_found.to_string(),
                e.allocations.saturating_sub(e.resolved).to_string(),
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
