//! JSON shapes of the API. The field names here are a contract that
//! scripts rely on (DESIGN.md): `key`, `txn_id`, `region`, `node`, `hlc`,
//! `confidence`, `state`, `replay`; more fields are added, never renamed.

use crate::ledger::{Allocation, ConflictView, KeyState, KeyView};
use crate::node::Node;
use crate::record::{AllocationRecord, CompensationRecord};
use serde_json::{json, Value};
use std::time::{Duration, UNIX_EPOCH};

/// Wall-clock milliseconds as RFC 3339 text.
pub fn rfc3339(ms: u64) -> String {
    humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_millis(ms)).to_string()
}

/// One allocation with its current confidence and role within its key.
pub fn allocation_json(node: &Node, allocation: &Allocation, view: Option<&KeyView>) -> Value {
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
                node.confidence_now(&view.unsynced_peers)
            };
            (view.state(), role, confidence)
        }
        None => (KeyState::Provisional, "sole", record.confidence),
    };
    let mut json = record_json(record, confidence, state);
    json["confidence_at_allocation"] = record.confidence.into();
    json["role"] = role.into();
    json
}

/// The fields every allocation object carries (DESIGN.md's contract).
fn record_json(record: &AllocationRecord, confidence: f64, state: KeyState) -> Value {
    json!({
        "key": record.key,
        "txn_id": record.txn_id,
        "region": record.region,
        "node": record.node,
        "hlc": record.hlc.to_string(),
        "fingerprint": record.fingerprint,
        "confidence": confidence,
        "state": state.as_str(),
    })
}

/// A key with every allocation, as `GET /v1/allocations/{key}` shows it.
pub fn key_json(node: &Node, view: &KeyView) -> Value {
    json!({
        "key": view.key,
        "state": view.state().as_str(),
        "settled": view.settled,
        "winner": view.winner().map(|w| w.record.txn_id.clone()),
        "allocations": view.allocations.iter().map(|a| allocation_json(node, a, Some(view))).collect::<Vec<_>>(),
        "compensations": compensations_json(view),
        "unsynced_peers": view.unsynced_peers,
    })
}

/// One entry of the conflict report. Allocations carry the confidence they
/// had when they were made: the report is about what was believed then.
pub fn conflict_json(view: &ConflictView) -> Value {
    let key = &view.key;
    let allocations: Vec<Value> = key
        .allocations
        .iter()
        .map(|a| record_json(&a.record, a.record.confidence, key.state()))
        .collect();
    json!({
        "key": key.key,
        "state": key.state().as_str(),
        "resolved": is_resolved(key),
        "allocations": allocations,
        "winner": key.winner().map(|w| w.record.txn_id.clone()),
        // The winner can still change while a missing region may hold an
        // earlier allocation; once settled it cannot.
        "winner_final": key.settled,
        "compensations": compensations_json(key),
        "detected_at": rfc3339(view.detected_at_ms),
        "detected_at_ms": view.detected_at_ms,
    })
}

/// Whether every loser of a conflicted key is compensated.
pub fn is_resolved(key: &KeyView) -> bool {
    key.state() == KeyState::Compensated
}

/// One compensation per loser; a loser whose owner has not yet reported
/// shows as pending with no attempts.
fn compensations_json(view: &KeyView) -> Vec<Value> {
    view.allocations
        .iter()
        .skip(1)
        .map(|loser| {
            match view
                .compensations
                .iter()
                .find(|c| c.txn_id == loser.record.txn_id)
            {
                Some(c) => compensation_json(c),
                None => json!({
                    "txn_id": loser.record.txn_id, "owner": loser.record.node,
                    "state": "pending", "attempts": 0, "last_error": null,
                    "next_attempt_at": null, "idempotency_key": null,
                }),
            }
        })
        .collect()
}

/// A compensation record as the API shows it.
pub fn compensation_json(c: &CompensationRecord) -> Value {
    json!({
        "key": c.key,
        "txn_id": c.txn_id,
        "winner_txn_id": c.winner_txn_id,
        "owner": c.owner,
        "state": c.state,
        "attempts": c.attempts,
        "last_error": c.last_error,
        "next_attempt_at": c.next_attempt_at_ms.map(rfc3339),
        "succeeded_at": c.succeeded_at_ms.map(rfc3339),
        "idempotency_key": c.idempotency_key,
    })
}
