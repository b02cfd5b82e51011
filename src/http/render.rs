//! JSON shapes of the API. The field names here are a contract that
//! scripts rely on (DESIGN.md): `key`, `txn_id`, `region`, `node`, `hlc`,
//! `confidence`, `state`, `replay`; more fields are added, never renamed.
//!
//! The shapes are structs that borrow from the ledger's views and serialize
//! straight to the response body: no intermediate `serde_json::Value` tree,
//! whose building and copying was most of the cost of answering an
//! operator's poll of the conflict report.

use crate::estimator::Estimator;
use crate::hlc::Timestamp;
use crate::key::RecordFingerprint;
use crate::ledger::{Allocation, ConflictView, KeyView};
use crate::record::{AllocationRecord, CompensationRecord, CompensationState, TxnId};
use serde::Serialize;
use std::time::{Duration, UNIX_EPOCH};

/// Wall-clock milliseconds as RFC 3339 text.
pub fn rfc3339(ms: u64) -> String {
    humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_millis(ms)).to_string()
}

/// One allocation as the API shows it. The extras (`confidence_at_allocation`,
/// `role`, `replay`) appear where they mean something and are left out
/// elsewhere.
#[derive(Serialize)]
pub struct AllocationJson<'a> {
    key: &'a str,
    txn_id: &'a TxnId,
    region: &'a str,
    node: &'a str,
    hlc: Timestamp,
    fingerprint: &'a RecordFingerprint,
    confidence: f64,
    state: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    confidence_at_allocation: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    role: Option<&'static str>,
    /// Set by the allocate answer: whether this was a replay.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub replay: Option<bool>,
}

impl<'a> AllocationJson<'a> {
    /// The fields every allocation object carries (DESIGN.md's contract).
    fn of(record: &'a AllocationRecord, confidence: f64, state: &'static str) -> Self {
        Self {
            key: &record.key,
            txn_id: &record.txn_id,
            region: &record.region,
            node: &record.node,
            hlc: record.hlc,
            fingerprint: &record.fingerprint,
            confidence,
            state,
            confidence_at_allocation: None,
            role: None,
            replay: None,
        }
    }
}

/// One allocation with its current confidence and role within its key.
pub fn allocation_json<'a>(
    estimator: &Estimator,
    allocation: &'a Allocation,
    view: Option<&KeyView>,
) -> AllocationJson<'a> {
    let record = &allocation.record;
    let (state, role, confidence) = match view {
        Some(view) => {
            let is_winner = view
                .winner()
                .is_some_and(|w| w.record.txn_id == record.txn_id);
            let role = match (view.allocations.len(), is_winner) {
                (1, _) => "sole",
                (_, true) => "winner",
                _ => "loser",
            };
            let confidence = if role == "loser" {
                0.0
            } else if view.settled {
                1.0
            } else {
                estimator.confidence_now(&view.unsynced_peers)
            };
            (view.state().as_str(), role, confidence)
        }
        None => ("provisional", "sole", record.confidence),
    };
    AllocationJson {
        confidence_at_allocation: Some(record.confidence),
        role: Some(role),
        ..AllocationJson::of(record, confidence, state)
    }
}

/// A key with every allocation, as `GET /v1/allocations/{key}` shows it.
#[derive(Serialize)]
pub struct KeyJson<'a> {
    key: &'a str,
    state: &'static str,
    settled: bool,
    winner: Option<&'a TxnId>,
    allocations: Vec<AllocationJson<'a>>,
    compensations: Vec<CompensationJson<'a>>,
    unsynced_peers: &'a [String],
}

/// The key view of `GET /v1/allocations/{key}`.
pub fn key_json<'a>(estimator: &Estimator, view: &'a KeyView) -> KeyJson<'a> {
    KeyJson {
        key: &view.key,
        state: view.state().as_str(),
        settled: view.settled,
        winner: view.winner().map(|w| &w.record.txn_id),
        allocations: view
            .allocations
            .iter()
            .map(|a| allocation_json(estimator, a, Some(view)))
            .collect(),
        compensations: compensations_json(view),
        unsynced_peers: &view.unsynced_peers,
    }
}

/// One entry of the conflict report.
#[derive(Serialize)]
pub struct ConflictJson<'a> {
    key: &'a str,
    state: &'static str,
    resolved: bool,
    allocations: Vec<AllocationJson<'a>>,
    winner: Option<&'a TxnId>,
    /// The winner can still change while a missing region may hold an
    /// earlier allocation; once settled it cannot.
    winner_final: bool,
    compensations: Vec<CompensationJson<'a>>,
    detected_at: String,
    detected_at_ms: u64,
}

/// One entry of the conflict report. Allocations carry the confidence they
/// had when they were made: the report is about what was believed then.
pub fn conflict_json(view: &ConflictView) -> ConflictJson<'_> {
    let key = &view.key;
    let state = key.state().as_str();
    ConflictJson {
        key: &key.key,
        state,
        resolved: key.is_resolved(),
        allocations: key
            .allocations
            .iter()
            .map(|a| AllocationJson::of(&a.record, a.record.confidence, state))
            .collect(),
        winner: key.winner().map(|w| &w.record.txn_id),
        winner_final: key.settled,
        compensations: compensations_json(key),
        detected_at: rfc3339(view.detected_at_ms),
        detected_at_ms: view.detected_at_ms,
    }
}

/// A loser's compensation: its owner's record, or, before the owner has
/// reported, a pending placeholder with no attempts.
#[derive(Serialize)]
#[serde(untagged)]
pub enum CompensationJson<'a> {
    /// The owner's replicated record.
    Known(KnownCompensation<'a>),
    /// Nothing reported yet.
    Pending {
        txn_id: &'a TxnId,
        owner: &'a str,
        state: CompensationState,
        attempts: u32,
        last_error: Option<&'a str>,
        next_attempt_at: Option<String>,
        idempotency_key: Option<&'a str>,
    },
}

/// A compensation record as the API shows it.
#[derive(Serialize)]
pub struct KnownCompensation<'a> {
    key: &'a str,
    txn_id: &'a str,
    winner_txn_id: &'a str,
    owner: &'a str,
    state: CompensationState,
    attempts: u32,
    last_error: Option<&'a str>,
    next_attempt_at: Option<String>,
    succeeded_at: Option<String>,
    idempotency_key: &'a str,
}

/// A compensation record as the API shows it.
pub fn compensation_json(c: &CompensationRecord) -> KnownCompensation<'_> {
    KnownCompensation {
        key: &c.key,
        txn_id: &c.txn_id,
        winner_txn_id: &c.winner_txn_id,
        owner: &c.owner,
        state: c.state,
        attempts: c.attempts,
        last_error: c.last_error.as_deref(),
        next_attempt_at: c.next_attempt_at_ms.map(rfc3339),
        succeeded_at: c.succeeded_at_ms.map(rfc3339),
        idempotency_key: &c.idempotency_key,
    }
}

/// One compensation per loser, in precedence order.
fn compensations_json(view: &KeyView) -> Vec<CompensationJson<'_>> {
    view.allocations
        .iter()
        .skip(1)
        .map(|loser| {
            match view
                .compensations
                .iter()
                .find(|c| c.txn_id == loser.record.txn_id)
            {
                Some(c) => CompensationJson::Known(compensation_json(c)),
                None => CompensationJson::Pending {
                    txn_id: &loser.record.txn_id,
                    owner: &loser.record.node,
                    state: CompensationState::Pending,
                    attempts: 0,
                    last_error: None,
                    next_attempt_at: None,
                    idempotency_key: None,
                },
            }
        })
        .collect()
}
