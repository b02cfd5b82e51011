//! Fuzz targets: every place where the node reads bytes from outside (a
//! peer, an API client, the config file, its own data dir after damage).
//! Each target takes arbitrary bytes and must neither panic nor break the
//! invariant it states; a decoder may refuse the bytes with an error.
//!
//! One copy, two drivers: `tests/fuzz_decoders.rs` runs every target on
//! random and mutated inputs in the test suite (a short pass), and the
//! cargo-fuzz crate in `fuzz/` runs them coverage-guided for the long runs
//! recorded in docs/RELIABILITY.md.
#![allow(dead_code)]

use oncemesh::hlc::Timestamp;
use oncemesh::journal::decode_segment;
use oncemesh::ledger::{DocId, Ledger, NodeIdentity, Windows, SHARD_COUNT};
use oncemesh::record::{AllocationRecord, BatchLayout, CompensationRecord};
use std::sync::OnceLock;

/// A target: arbitrary bytes in, a panic out on a bug.
pub type Target = fn(&[u8]);

/// Every target, by name, as the drivers list them.
pub const TARGETS: &[(&str, Target)] = &[
    ("journal_segment", journal_segment),
    ("config_toml", config_toml),
    ("record_json", record_json),
    ("document_upload", document_upload),
    ("sync_message", sync_message),
];

/// A damaged journal segment: whatever is read back checks, and no byte is
/// counted twice.
pub fn journal_segment(data: &[u8]) {
    let read = decode_segment(data);
    let kept: usize = read.entries.iter().map(|e| 24 + e.bytes.len()).sum();
    assert_eq!(
        kept + read.skipped_bytes,
        data.len(),
        "bytes lost or counted twice"
    );
}

/// The TOML file of `oncemesh run --config`: refused with a message, or a
/// configuration that validated.
pub fn config_toml(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(args) = toml::from_str::<oncemesh::config::RunArgs>(text) {
        let _ = args.resolve();
    }
}

/// Records as peers write them into documents (batches of allocations,
/// compensation states).
pub fn record_json(data: &[u8]) {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(batch) = AllocationRecord::parse_batch(text) {
            for record in &batch {
                let _ = record.precedence(&batch[0]);
            }
        }
    }
    let _ = serde_json::from_slice::<CompensationRecord>(data);
}

/// A ledger shared by the targets that merge into one: building one per
/// input would be most of the work. Its documents grow with what is merged,
/// as a node's would.
fn ledger() -> &'static Ledger {
    static LEDGER: OnceLock<Ledger> = OnceLock::new();
    LEDGER.get_or_init(|| {
        Ledger::in_memory(
            NodeIdentity {
                region: "fuzz".into(),
                node: "12D3KooWFuzzNode".into(),
            },
            vec!["12D3KooWFuzzPeer".into()],
        )
    })
}

/// A live document of the shared ledger, picked by the first byte.
fn live_doc(pick: u8) -> DocId {
    let now = oncemesh::time::Clock::now_ms(&oncemesh::time::SystemClock);
    DocId {
        epoch: Windows::default().epoch_of(now),
        shard: pick % SHARD_COUNT as u8,
    }
}

/// `POST /v1/documents/{id}` bodies (automerge bytes): merged, or refused
/// with an error; the ledger answers afterwards.
pub fn document_upload(data: &[u8]) {
    let Some((&pick, bytes)) = data.split_first() else {
        return;
    };
    let ledger = ledger();
    let _ = ledger.merge_bytes(live_doc(pick), bytes);
    let _ = ledger.conflicts();
    let _ = ledger.stats();
}

/// A peer's automerge sync message for one document.
pub fn sync_message(data: &[u8]) {
    let Some((&pick, bytes)) = data.split_first() else {
        return;
    };
    let Ok(message) = automerge::sync::Message::decode(bytes) else {
        return;
    };
    let ledger = ledger();
    let doc = live_doc(pick);
    let _ = ledger.receive_sync(doc, "12D3KooWFuzzPeer", message);
    let _ = ledger.generate_sync(doc, "12D3KooWFuzzPeer", false, &Default::default());
}

/// Valid inputs for each target, for mutation: what real peers, clients
/// and disks hand over.
pub fn seeds(target: &str) -> Vec<Vec<u8>> {
    match target {
        "journal_segment" => vec![journal_seed()],
        "config_toml" => vec![
            b"region = \"sgp\"\nretention = \"24h\"\npeer = [\"/ip4/127.0.0.1/tcp/7801/p2p/12D3KooWFuzzPeer\"]\n".to_vec(),
            b"max_clock_offset = \"500ms\"\ncompensation = \"webhook:http://127.0.0.1:9/void\"\n".to_vec(),
        ],
        "record_json" => {
            let (k1, k2) = (record("k1"), record("k2"));
            [BatchLayout::Objects, BatchLayout::Compact]
                .map(|layout| AllocationRecord::write_batch(&[&k1, &k2], layout).into_bytes())
                .to_vec()
        }
        "document_upload" => vec![[vec![0u8], saved_document()].concat()],
        "sync_message" => sync_seeds(),
        _ => Vec::new(),
    }
}

fn record(key: &str) -> AllocationRecord {
    AllocationRecord {
        v: oncemesh::record::RECORD_VERSION,
        key: key.into(),
        txn_id: AllocationRecord::derive_txn_id("12D3KooWFuzzPeer", Timestamp::new(5, 0), key),
        region: "lon".into(),
        node: "12D3KooWFuzzPeer".into(),
        hlc: Timestamp::new(5, 0),
        fingerprint: "jcs:0000".into(),
        confidence: 0.9,
    }
}

/// A journal segment with a few entries, written by the journal itself.
fn journal_seed() -> Vec<u8> {
    let dir = match tempfile::tempdir() {
        Ok(dir) => dir,
        Err(_) => return Vec::new(),
    };
    let Ok((journal, _)) =
        oncemesh::journal::Journal::open(dir.path(), std::sync::Arc::new(|_| {}))
    else {
        return Vec::new();
    };
    let mut last = 0;
    for i in 0..4 {
        last = journal.append(
            1,
            serde_json::to_vec(&record(&format!("j{i}"))).unwrap_or_default(),
        );
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build();
    if let Ok(rt) = rt {
        let _ = rt.block_on(journal.wait_durable(last));
    }
    journal.close();
    std::fs::read_dir(dir.path().join(oncemesh::journal::JOURNAL_DIR))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| std::fs::read(e.path()).ok())
        .find(|bytes| !bytes.is_empty())
        .unwrap_or_default()
}

/// A peer's ledger with a few allocations in shard 0's live document.
fn peer_ledger() -> Ledger {
    let peer = Ledger::in_memory(
        NodeIdentity {
            region: "lon".into(),
            node: "12D3KooWFuzzPeer".into(),
        },
        vec!["12D3KooWFuzzNode".into()],
    );
    let mut n = 0;
    while n < 4 {
        let key = format!("seed-{n}-{}", n * 7919);
        let Ok(parsed) = oncemesh::key::IdempotencyKey::parse(&key) else {
            continue;
        };
        n += 1;
        let shard = parsed.shard(SHARD_COUNT);
        let Ok(fingerprint) = oncemesh::key::fingerprint(&serde_json::json!({"n": n})) else {
            continue;
        };
        peer.allocate_batch(
            shard,
            &[oncemesh::ledger::AllocateRequest {
                key: parsed,
                fingerprint,
                confidence: 1.0,
                stake: None,
            }],
        );
    }
    peer.fold_pending();
    peer
}

fn saved_document() -> Vec<u8> {
    let peer = peer_ledger();
    (0..SHARD_COUNT as u8)
        .filter_map(|s| peer.save_document(live_doc(s)))
        .find(|bytes| bytes.len() > 100)
        .unwrap_or_default()
}

fn sync_seeds() -> Vec<Vec<u8>> {
    let peer = peer_ledger();
    (0..SHARD_COUNT as u8)
        .filter_map(|s| {
            let message =
                peer.generate_sync(live_doc(s), "12D3KooWFuzzNode", false, &Default::default())?;
            Some([vec![s], message].concat())
        })
        .collect()
}
