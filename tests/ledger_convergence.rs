//! Property: whatever the allocations, whenever each ledger folds its pending
//! allocations into documents, and however the ledgers exchange state
//! (whole documents or the sync protocol, in any order), every ledger ends
//! with the same allocations, the same conflicts and the same winners, and
//! no acknowledged allocation is lost.

use oncemesh::key::{fingerprint, IdempotencyKey};
use oncemesh::ledger::{AllocateRequest, DocId, Ledger, NodeIdentity, Withhold, SHARD_COUNT};
use proptest::prelude::*;
use std::collections::{BTreeMap, BTreeSet};

#[derive(Clone, Debug)]
enum Op {
    Allocate { node: usize, key: u8, payload: u8 },
    MergeBytes { from: usize, to: usize },
    Sync { a: usize, b: usize },
    Fold { node: usize },
}

fn op(nodes: usize) -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0..nodes, 0u8..24, 0u8..2).prop_map(|(node, key, payload)| Op::Allocate { node, key, payload }),
        1 => (0..nodes, 0..nodes).prop_map(|(from, to)| Op::MergeBytes { from, to }),
        1 => (0..nodes, 0..nodes).prop_map(|(a, b)| Op::Sync { a, b }),
        2 => (0..nodes).prop_map(|node| Op::Fold { node }),
    ]
}

fn ledgers(n: usize) -> Vec<Ledger> {
    let ids: Vec<String> = (0..n).map(|i| format!("node-{i}")).collect();
    (0..n)
        .map(|i| {
            let peers = ids.iter().filter(|p| **p != ids[i]).cloned().collect();
            Ledger::in_memory(
                NodeIdentity {
                    region: format!("region-{i}"),
                    node: ids[i].clone(),
                },
                peers,
            )
        })
        .collect()
}

fn merge_bytes(ledgers: &[Ledger], from: usize, to: usize) {
    for (doc, _) in ledgers[from].digests() {
        let bytes = ledgers[from].save_document(doc).unwrap();
        ledgers[to].merge_bytes(doc, &bytes).unwrap();
    }
}

/// Runs the automerge sync protocol between two ledgers until both are quiet.
fn sync(ledgers: &[Ledger], a: usize, b: usize) {
    if a == b {
        return;
    }
    let (ida, idb) = (
        ledgers[a].identity().node.clone(),
        ledgers[b].identity().node.clone(),
    );
    // Documents either side holds; the other creates its copy on receipt.
    let mut docs: Vec<DocId> = ledgers[a].digests().into_iter().map(|(d, _)| d).collect();
    docs.extend(ledgers[b].digests().into_iter().map(|(d, _)| d));
    docs.sort();
    docs.dedup();
    for doc in docs {
        for _ in 0..20 {
            let ab = ledgers[a].generate_sync(doc, &idb, false, &Withhold::nothing());
            if let Some(m) = &ab {
                let msg = automerge::sync::Message::decode(m).unwrap();
                ledgers[b].receive_sync(doc, &ida, msg).unwrap();
            }
            let ba = ledgers[b].generate_sync(doc, &ida, false, &Withhold::nothing());
            if let Some(m) = &ba {
                let msg = automerge::sync::Message::decode(m).unwrap();
                ledgers[a].receive_sync(doc, &idb, msg).unwrap();
            }
            if ab.is_none() && ba.is_none() {
                break;
            }
        }
    }
}

/// key -> (winner txn, every txn), for comparison across ledgers.
fn summary(ledger: &Ledger) -> BTreeMap<String, (String, BTreeSet<String>)> {
    let mut out = BTreeMap::new();
    for k in 0u8..24 {
        let key = format!("key-{k}");
        if let Some(view) = ledger.key(&key) {
            let txns = view
                .allocations
                .iter()
                .map(|a| a.record.txn_id.to_string())
                .collect();
            out.insert(
                key,
                (view.winner().unwrap().record.txn_id.to_string(), txns),
            );
        }
    }
    out
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn ledgers_converge_on_allocations_conflicts_and_winners(
        ops in proptest::collection::vec(op(3), 1..80)
    ) {
        let nodes = ledgers(3);
        let mut acknowledged: Vec<(String, String)> = Vec::new();
        for op in &ops {
            match *op {
                Op::Allocate { node, key, payload } => {
                    let key = IdempotencyKey::parse(&format!("key-{key}")).unwrap();
                    let fp = fingerprint(&serde_json::json!({ "p": payload })).unwrap();
                    let shard = key.shard(SHARD_COUNT);
                    let out = nodes[node].allocate_batch(shard, &[AllocateRequest {
                        key: key.clone(), fingerprint: fp.clone(), confidence: 0.9,
                        stake: None,
                    }]);
                    match &out[0] {
                        Ok(a) => {
                            // A replay returns an allocation with the same fingerprint.
                            prop_assert_eq!(&a.allocation.record.fingerprint, fp.as_str());
                            acknowledged.push((key.to_string(), a.allocation.record.txn_id.to_string()));
                        }
                        Err(_) => {
                            // Refused only when the key exists with another payload.
                            let view = nodes[node].key(key.as_str()).unwrap();
                            prop_assert!(view.allocations.iter().all(|a| !fp.matches(&a.record.fingerprint)));
                        }
                    }
                }
                Op::MergeBytes { from, to } => merge_bytes(&nodes, from, to),
                Op::Sync { a, b } => sync(&nodes, a, b),
                Op::Fold { node } => {
                    nodes[node].fold_pending();
                }
            }
        }
        // Heal: every pending allocation into its document, then full mesh,
        // twice, alternating both mechanisms.
        for node in &nodes {
            node.fold_pending();
            prop_assert_eq!(node.pending_count(), 0);
        }
        for round in 0..2 {
            for a in 0..3 {
                for b in 0..3 {
                    if round == 0 { sync(&nodes, a, b) } else { merge_bytes(&nodes, a, b) }
                }
            }
        }
        let first = summary(&nodes[0]);
        for other in &nodes[1..] {
            prop_assert_eq!(&first, &summary(other));
            prop_assert_eq!(nodes[0].digests(), other.digests());
        }
        let conflicts: BTreeSet<String> = nodes[0].conflicts().iter().map(|c| c.key.key.clone()).collect();
        for other in &nodes[1..] {
            let theirs: BTreeSet<String> = other.conflicts().iter().map(|c| c.key.key.clone()).collect();
            prop_assert_eq!(&conflicts, &theirs);
        }
        // Every key with more than one transaction is reported as a conflict.
        for (key, (_, txns)) in &first {
            prop_assert_eq!(txns.len() > 1, conflicts.contains(key));
        }
        // Nothing acknowledged is ever lost.
        for (key, txn) in &acknowledged {
            prop_assert!(first.get(key).is_some_and(|(_, t)| t.contains(txn)), "lost {} {}", key, txn);
        }
    }
}

#[test]
fn winner_is_smallest_hlc_then_node_even_when_a_third_allocation_arrives_late() {
    let nodes = ledgers(3);
    let key = IdempotencyKey::parse("late").unwrap();
    let shard = key.shard(SHARD_COUNT);
    let fp = fingerprint(&serde_json::json!({})).unwrap();
    let mut made = Vec::new();
    for node in [2, 1, 0] {
        let out = nodes[node].allocate_batch(
            shard,
            &[AllocateRequest {
                key: key.clone(),
                fingerprint: fp.clone(),
                confidence: 1.0,
                stake: None,
            }],
        );
        made.push(out[0].as_ref().unwrap().allocation.record.clone());
        nodes[node].fold_pending();
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    // Node 2 allocated first (smallest HLC). Nodes 0 and 1 meet first.
    merge_bytes(&nodes, 0, 1);
    let before = nodes[1].key("late").unwrap();
    assert_eq!(&*before.winner().unwrap().record.node, "node-1");
    merge_bytes(&nodes, 2, 1);
    let after = nodes[1].key("late").unwrap();
    assert_eq!(after.allocations.len(), 3);
    assert_eq!(&*after.winner().unwrap().record.node, "node-2");
    assert_eq!(after.winner().unwrap().record.txn_id, made[0].txn_id);
}

/// A near miss is a request here for a key another node already holds.
/// The first one is; its repeats, and replays of this node's own
/// allocations, are not (they can no longer conflict).
#[test]
fn only_the_first_replay_of_another_nodes_allocation_is_a_near_miss() {
    let nodes = ledgers(2);
    let fp = fingerprint(&serde_json::json!({})).unwrap();
    let allocate = |node: usize, key: &str| {
        let key = IdempotencyKey::parse(key).unwrap();
        let request = AllocateRequest {
            key: key.clone(),
            fingerprint: fp.clone(),
            confidence: 1.0,
            stake: None,
        };
        let out = nodes[node].allocate_batch(key.shard(SHARD_COUNT), &[request]);
        let made = out.into_iter().next().unwrap().unwrap();
        nodes[node].fold_pending();
        (made.replay, made.first_near_miss)
    };
    assert_eq!(allocate(0, "theirs"), (false, false));
    assert_eq!(allocate(1, "mine"), (false, false));
    merge_bytes(&nodes, 0, 1);
    assert_eq!(allocate(1, "theirs"), (true, true), "the first retry here");
    assert_eq!(allocate(1, "theirs"), (true, false), "a repeat");
    assert_eq!(allocate(1, "mine"), (true, false), "our own allocation");
    // Each node has its own first.
    merge_bytes(&nodes, 1, 0);
    assert_eq!(allocate(0, "mine"), (true, true));
    assert_eq!(allocate(0, "theirs"), (true, false));
}

#[test]
fn compensation_states_written_together_take_one_change_per_document_and_reach_every_ledger() {
    use oncemesh::record::{CompensationRecord, CompensationState, RECORD_VERSION};
    let nodes = ledgers(2);
    let fp = fingerprint(&serde_json::json!({})).unwrap();
    // Two keys of one shard and one of another, allocated on both nodes.
    let shard_of = |k: &str| IdempotencyKey::parse(k).unwrap().shard(SHARD_COUNT);
    let first = shard_of("key-0");
    let candidates = || (1..64).map(|i| format!("key-{i}"));
    let same = candidates().find(|k| shard_of(k) == first).unwrap();
    let other = candidates().find(|k| shard_of(k) != first).unwrap();
    let keys = ["key-0".to_string(), same, other];
    for node in [0, 1] {
        for key in &keys {
            let key = IdempotencyKey::parse(key).unwrap();
            let shard = key.shard(SHARD_COUNT);
            let request = AllocateRequest {
                key,
                fingerprint: fp.clone(),
                confidence: 1.0,
                stake: None,
            };
            nodes[node].allocate_batch(shard, &[request])[0]
                .as_ref()
                .unwrap();
        }
        nodes[node].fold_pending();
    }
    sync(&nodes, 0, 1);
    let changes = |doc: DocId| {
        let bytes = nodes[0].save_document(doc).unwrap();
        automerge::Automerge::load(&bytes)
            .unwrap()
            .get_changes(&[])
            .len()
    };
    let before: BTreeMap<DocId, usize> = nodes[0]
        .digests()
        .into_iter()
        .map(|(d, _)| (d, changes(d)))
        .collect();
    let records: Vec<CompensationRecord> = keys
        .iter()
        .map(|key| {
            let view = nodes[0].key(key).unwrap();
            assert_eq!(view.allocations.len(), 2, "{key} is in conflict");
            CompensationRecord {
                v: RECORD_VERSION,
                key: key.clone(),
                txn_id: view.allocations[1].record.txn_id.to_string(),
                winner_txn_id: view.allocations[0].record.txn_id.to_string(),
                owner: view.allocations[1].record.node.to_string(),
                idempotency_key: format!("comp-{key}"),
                state: CompensationState::Succeeded,
                attempts: 1,
                last_error: None,
                next_attempt_at_ms: None,
                detected_at_ms: 1,
                succeeded_at_ms: Some(2),
            }
        })
        .collect();
    nodes[0].put_compensations(&records).unwrap();
    let added: Vec<usize> = before.iter().map(|(d, n)| changes(*d) - n).collect();
    assert_eq!(
        added.iter().sum::<usize>(),
        2,
        "one change per document: {added:?}"
    );
    sync(&nodes, 0, 1);
    for key in &keys {
        let view = nodes[1].key(key).unwrap();
        assert_eq!(view.compensations.len(), 1, "{key}");
        assert_eq!(view.compensations[0].state, CompensationState::Succeeded);
    }
}
