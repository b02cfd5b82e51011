//! The compensation actions: `log` records only; `webhook` POSTs to the
//! operator's refund/void endpoint with a stable `Idempotency-Key`, so the
//! receiver can deduplicate retries and restarts.

use super::machine::Outcome;
use crate::config::CompensationAction;
use crate::record::AllocationRecord;
use serde_json::json;
use std::time::Duration;

/// Runs compensation actions of one kind.
pub struct Executor {
    action: CompensationAction,
    client: reqwest::Client,
}

/// What a compensation is about: the loser, the winner, the stable key.
pub struct Subject<'a> {
    /// The losing allocation (this node's).
    pub loser: &'a AllocationRecord,
    /// The winning allocation.
    pub winner: &'a AllocationRecord,
    /// Idempotency key of the compensation.
    pub idempotency_key: &'a str,
    /// Attempt number, for the receiver's logs.
    pub attempt: u32,
}

impl Executor {
    /// An executor for `action`, with `timeout` per webhook call.
    pub fn new(action: CompensationAction, timeout: Duration) -> Self {
        let client = reqwest::Client::builder()
            .timeout(timeout)
            .build()
            .unwrap_or_default();
        Self { action, client }
    }

    /// Runs the action once. Never panics; every failure is an outcome.
    pub async fn run(&self, subject: &Subject<'_>) -> Outcome {
        match &self.action {
            CompensationAction::Log => {
                tracing::info!(
                    key = %subject.loser.key,
                    loser = %subject.loser.txn_id,
                    winner = %subject.winner.txn_id,
                    idempotency_key = subject.idempotency_key,
                    "compensation recorded (log action): void the losing transaction"
                );
                Outcome::Success
            }
            CompensationAction::Webhook(url) => {
                let body = json!({
                    "type": "oncemesh.compensation",
                    "idempotency_key": subject.idempotency_key,
                    "attempt": subject.attempt,
                    "key": subject.loser.key,
                    "loser": subject.loser,
                    "winner": subject.winner,
                });
                let sent = self
                    .client
                    .post(url)
                    .header("Idempotency-Key", subject.idempotency_key)
                    .json(&body)
                    .send()
                    .await;
                match sent {
                    Ok(response) => {
                        let status = response.status().as_u16();
                        let text = response.text().await.unwrap_or_default();
                        Outcome::from_http_status(status, &text)
                    }
                    Err(e) => Outcome::Retryable(format!("webhook {url}: {e}")),
                }
            }
        }
    }
}
