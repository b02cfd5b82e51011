//! The records that travel between regions inside the automerge documents.
//!
//! Each record is stored as one JSON text value (one automerge op), which
//! keeps the hot path at a single op per allocation and lets any automerge
//! implementation read the ledger with a JSON parser (docs/DATA_MODEL.md).
//! Every record has exactly one writer, the node that made it, so automerge
//! never has to pick between concurrent values: nothing is last-writer-wins.

use crate::hex_text::{HexText, Prefix};
use crate::hlc::Timestamp;
use crate::key::RecordFingerprint;
use serde::{Deserialize, Serialize};
use std::borrow::Cow;
use std::cmp::Ordering;
use std::fmt;
use std::sync::Arc;

/// Version tag written into every record, so a future schema can be told apart.
pub const RECORD_VERSION: u32 = 1;

/// The prefix of a transaction id.
pub struct TxnPrefix;

impl Prefix for TxnPrefix {
    const PREFIX: &'static str = "tx_";
}

/// A transaction id: `tx_` + 32 hex digits held as 16 bytes (any other
/// text a peer wrote, as written).
pub type TxnId = HexText<TxnPrefix, 16>;

/// One record of a batch as it is read: strings borrowed from the batch
/// text where they need no unescaping.
#[derive(Deserialize)]
struct BorrowedRecord<'a> {
    v: u32,
    #[serde(borrow)]
    key: Cow<'a, str>,
    #[serde(borrow)]
    txn_id: Cow<'a, str>,
    #[serde(borrow)]
    region: Cow<'a, str>,
    #[serde(borrow)]
    node: Cow<'a, str>,
    hlc: Timestamp,
    #[serde(borrow)]
    fingerprint: Cow<'a, str>,
    confidence: f64,
}

/// How a batch of allocation records is written (docs/DATA_MODEL.md).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BatchLayout {
    /// A JSON array of record objects, each naming every field: what every
    /// version reads.
    Objects,
    /// One object naming the layout, region and node once, the records as
    /// arrays of their other fields: about half the bytes, read by this
    /// version and later only.
    Compact,
}

/// The `v` of a batch in the compact layout.
pub const COMPACT_BATCH_VERSION: u32 = 2;

/// A record in the compact layout: key, txn_id, hlc, fingerprint, confidence.
type CompactRecord<'a> = (&'a str, &'a TxnId, Timestamp, &'a RecordFingerprint, f64);

/// A batch in the compact layout, as written.
#[derive(Serialize)]
struct CompactBatch<'a> {
    v: u32,
    region: &'a str,
    node: &'a str,
    records: Vec<CompactRecord<'a>>,
}

/// A batch in the compact layout, as read.
#[derive(Deserialize)]
struct BorrowedCompactBatch<'a> {
    v: u32,
    #[serde(borrow)]
    region: Cow<'a, str>,
    #[serde(borrow)]
    node: Cow<'a, str>,
    #[serde(borrow)]
    records: Vec<BorrowedCompactRecord<'a>>,
}

type BorrowedCompactRecord<'a> = (Cow<'a, str>, Cow<'a, str>, Timestamp, Cow<'a, str>, f64);

/// The region and node names of the record read last, reused while the
/// next record has the same ones (every record of a batch does).
#[derive(Default)]
struct LastNames {
    region: Option<Arc<str>>,
    node: Option<Arc<str>>,
}

fn reuse(last: &mut Option<Arc<str>>, name: &str) -> Arc<str> {
    match last {
        Some(known) if **known == *name => known.clone(),
        _ => last.insert(Arc::from(name)).clone(),
    }
}

/// One region's allocation of an idempotency key: what every region must see
/// to detect a duplicate and agree on the winner.
///
/// `key`, `region` and `node` are shared strings: a node holds every live
/// record in memory, the key index shares the record's key, and a ledger
/// interns region and node names, which repeat across every record of a node.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AllocationRecord {
    /// Schema version of this record.
    pub v: u32,
    /// The idempotency key.
    pub key: Arc<str>,
    /// Transaction id, unique across the cluster.
    pub txn_id: TxnId,
    /// Region name of the node that allocated.
    pub region: Arc<str>,
    /// libp2p peer id of the node that allocated; the only node that may
    /// compensate this allocation.
    pub node: Arc<str>,
    /// HLC timestamp of the allocation; with `node` it orders competing allocations.
    pub hlc: Timestamp,
    /// blake3 of the payload's canonical JSON, to tell replays from misuse.
    pub fingerprint: RecordFingerprint,
    /// Confidence that this was not a duplicate, when it was made.
    pub confidence: f64,
}

impl AllocationRecord {
    /// The order that decides a conflict: smallest (HLC, node id) wins; the
    /// transaction id breaks the (impossible in practice) remaining tie so the
    /// order is total and every node picks the same winner.
    pub fn precedence(&self, other: &Self) -> Ordering {
        (self.hlc, &self.node, &self.txn_id).cmp(&(other.hlc, &other.node, &other.txn_id))
    }

    /// Reads a batch as the documents hold it, in either layout
    /// ([`BatchLayout`]). Records of one batch share their region and node
    /// strings, so reading costs one string allocation per record (the key).
    pub fn parse_batch(text: &str) -> serde_json::Result<Vec<Self>> {
        if text.trim_start().starts_with('{') {
            return Self::parse_compact_batch(text);
        }
        let borrowed: Vec<BorrowedRecord<'_>> = serde_json::from_str(text)?;
        let mut last = LastNames::default();
        Ok(borrowed
            .into_iter()
            .map(|r| Self {
                v: r.v,
                key: Arc::from(r.key.as_ref()),
                txn_id: TxnId::new(&r.txn_id),
                region: reuse(&mut last.region, &r.region),
                node: reuse(&mut last.node, &r.node),
                hlc: r.hlc,
                fingerprint: RecordFingerprint::new(&r.fingerprint),
                confidence: r.confidence,
            })
            .collect())
    }

    fn parse_compact_batch(text: &str) -> serde_json::Result<Vec<Self>> {
        let batch: BorrowedCompactBatch<'_> = serde_json::from_str(text)?;
        if batch.v != COMPACT_BATCH_VERSION {
            return Err(serde::de::Error::custom(format!(
                "batch layout version {} is not {COMPACT_BATCH_VERSION}",
                batch.v
            )));
        }
        let region: Arc<str> = Arc::from(batch.region.as_ref());
        let node: Arc<str> = Arc::from(batch.node.as_ref());
        Ok(batch
            .records
            .into_iter()
            .map(|(key, txn_id, hlc, fingerprint, confidence)| Self {
                v: RECORD_VERSION,
                key: Arc::from(key.as_ref()),
                txn_id: TxnId::new(&txn_id),
                region: region.clone(),
                node: node.clone(),
                hlc,
                fingerprint: RecordFingerprint::new(&fingerprint),
                confidence,
            })
            .collect())
    }

    /// Writes records made by one node as one batch in `layout`. The
    /// compact layout names the batch's region and node once, from the
    /// first record: the caller passes one node's records.
    pub fn write_batch(records: &[&Self], layout: BatchLayout) -> String {
        match (layout, records.first()) {
            (BatchLayout::Compact, Some(first)) => serde_json::to_string(&CompactBatch {
                v: COMPACT_BATCH_VERSION,
                region: &first.region,
                node: &first.node,
                records: records
                    .iter()
                    .map(|r| (&*r.key, &r.txn_id, r.hlc, &r.fingerprint, r.confidence))
                    .collect(),
            }),
            _ => serde_json::to_string(records),
        }
        .unwrap_or_default()
    }

    /// Derives a transaction id that is unique because the (node, HLC) pair is:
    /// an HLC never repeats on one node, even across restarts (the clock is
    /// re-seeded from the stamps on disk).
    pub fn derive_txn_id(node: &str, hlc: Timestamp, key: &str) -> TxnId {
        let mut hasher = blake3::Hasher::new();
        hasher.update(node.as_bytes());
        hasher.update(&hlc.physical_ms.to_le_bytes());
        hasher.update(&hlc.logical.to_le_bytes());
        hasher.update(key.as_bytes());
        let digest = hasher.finalize();
        let mut id = [0u8; 16];
        id.copy_from_slice(&digest.as_bytes()[..16]);
        TxnId::from_bytes(id)
    }
}

/// Where a compensation is in its lifecycle: the state machine's
/// (`compensation::machine`) and the replicated record's, one type, written
/// as the kebab-case names docs/DATA_MODEL.md lists.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CompensationState {
    /// Created, first attempt not started yet.
    Pending,
    /// An attempt is in flight (or was when the node crashed).
    Running,
    /// The action succeeded; final.
    Succeeded,
    /// The last attempt failed retryably; another is scheduled.
    Failed,
    /// Given up (permanent failure or budget spent); needs an operator.
    DeadLettered,
    /// A state this version does not know, in a record a newer node wrote.
    /// The record is kept (its owner, attempts and last error still show)
    /// rather than refused as malformed: during a rolling upgrade that would
    /// hide a live compensation and raise malformed-record alarms over a
    /// healthy peer. It counts as neither succeeded nor dead-lettered, so
    /// the conflict stays open here until the owner writes a state this
    /// version knows. This node's own machine never enters it.
    #[serde(other)]
    Unknown,
}

impl CompensationState {
    /// Whether no automatic transition leaves this state; drivers stop here.
    /// [`CompensationState::Unknown`] is not: its owner may still move it.
    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Succeeded | Self::DeadLettered)
    }

    /// The name written into records and shown by the API.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Running => "running",
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
            Self::DeadLettered => "dead-lettered",
            Self::Unknown => "unknown",
        }
    }
}

impl fmt::Display for CompensationState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The replicated view of one loser's compensation, written only by the
/// loser's own node, so every region's conflict report can show it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CompensationRecord {
    /// Schema version of this record.
    pub v: u32,
    /// The idempotency key in conflict.
    pub key: String,
    /// The losing transaction being compensated.
    pub txn_id: String,
    /// The winning transaction when the compensation was scheduled.
    pub winner_txn_id: String,
    /// Peer id of the node that owns (and alone runs) the compensation.
    pub owner: String,
    /// Idempotency key sent with the action, stable across retries and crashes.
    pub idempotency_key: String,
    /// Where the compensation is.
    pub state: CompensationState,
    /// Attempts made so far.
    pub attempts: u32,
    /// Last error of a failed attempt.
    pub last_error: Option<String>,
    /// Wall-clock ms of the next retry, when one is scheduled.
    pub next_attempt_at_ms: Option<u64>,
    /// Wall-clock ms at which the owner detected the conflict.
    pub detected_at_ms: u64,
    /// Wall-clock ms of success.
    pub succeeded_at_ms: Option<u64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(ms: u64, node: &str) -> AllocationRecord {
        AllocationRecord {
            v: RECORD_VERSION,
            key: "k".into(),
            txn_id: AllocationRecord::derive_txn_id(node, Timestamp::new(ms, 0), "k"),
            region: "r".into(),
            node: node.into(),
            hlc: Timestamp::new(ms, 0),
            fingerprint: "f".into(),
            confidence: 1.0,
        }
    }

    #[test]
    fn earlier_hlc_wins_then_node_id() {
        assert_eq!(rec(1, "b").precedence(&rec(2, "a")), Ordering::Less);
        assert_eq!(rec(2, "a").precedence(&rec(2, "b")), Ordering::Less);
    }

    #[test]
    fn a_batch_reads_like_its_records_and_shares_names() {
        let mut escaped = rec(7, "n");
        escaped.key = "quote\"d\\key".into();
        let records = vec![rec(5, "n"), escaped, rec(9, "m")];
        let text = serde_json::to_string(&records).unwrap();
        let batch = AllocationRecord::parse_batch(&text).unwrap();
        assert_eq!(batch, records);
        assert!(Arc::ptr_eq(&batch[0].node, &batch[1].node));
        assert!(!Arc::ptr_eq(&batch[1].node, &batch[2].node));
        assert!(Arc::ptr_eq(&batch[0].region, &batch[2].region));
        for bad in ["", "[{}]", "[1]", "{\"v\":1}", "[{\"v\":1,\"key\":2}]"] {
            assert!(AllocationRecord::parse_batch(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_compact_batch_reads_as_the_same_records_in_fewer_bytes() {
        // As a node writes them: a peer id, a `jcs:` fingerprint.
        let node = "12D3KooWQnVbTZL2Jd5zP1pS8Hq6w3mXyKx8RkUuD7bCt9eFgHiJ";
        let written = |ms| AllocationRecord {
            key: format!("order-{ms}").into(),
            fingerprint: format!("jcs:{}", blake3::hash(&[ms as u8]).to_hex())
                .as_str()
                .into(),
            confidence: 0.9871,
            ..rec(ms, node)
        };
        let mut escaped = written(7);
        escaped.key = "quote\"d\\key".into();
        escaped.fingerprint = "0aff".into(); // the earlier scheme's form
        escaped.confidence = 0.1 + 0.2;
        let records = vec![written(5), escaped, written(9)];
        let refs: Vec<&AllocationRecord> = records.iter().collect();
        let compact = AllocationRecord::write_batch(&refs, BatchLayout::Compact);
        let objects = AllocationRecord::write_batch(&refs, BatchLayout::Objects);
        assert!(compact.starts_with(&format!(
            r#"{{"v":2,"region":"r","node":"{node}","records":[["order-5","tx_"#
        )));
        assert_eq!(AllocationRecord::parse_batch(&compact).unwrap(), records);
        assert_eq!(AllocationRecord::parse_batch(&objects).unwrap(), records);
        let saved_per_record = (objects.len() - compact.len()) / records.len();
        assert!(saved_per_record >= 90, "{compact} against {objects}");
        let batch = AllocationRecord::parse_batch(&compact).unwrap();
        assert!(Arc::ptr_eq(&batch[0].node, &batch[2].node));
        for bad in [
            r#"{"v":3,"region":"r","node":"n","records":[]}"#,
            r#"{"v":2,"region":"r","records":[]}"#,
            r#"{"v":2,"region":"r","node":"n","records":[["k","tx_1"]]}"#,
            r#"{"v":2,"region":"r","node":"n","records":[["k","tx_1","x","f",1.0]]}"#,
        ] {
            assert!(AllocationRecord::parse_batch(bad).is_err(), "{bad}");
        }
    }

    fn compensation(state: &str) -> String {
        format!(
            r#"{{"v":1,"key":"k","txn_id":"tx_l","winner_txn_id":"tx_w","owner":"n","idempotency_key":"oncemesh-comp-tx_l","state":{state},"attempts":2,"last_error":"HTTP 503: busy","next_attempt_at_ms":null,"detected_at_ms":1,"succeeded_at_ms":null}}"#
        )
    }

    #[test]
    fn compensation_states_are_written_with_the_data_models_names() {
        use CompensationState as S;
        let known = [
            (S::Pending, "pending"),
            (S::Running, "running"),
            (S::Succeeded, "succeeded"),
            (S::Failed, "failed"),
            (S::DeadLettered, "dead-lettered"),
        ];
        for (state, name) in known {
            assert_eq!(
                serde_json::to_string(&state).unwrap(),
                format!("\"{name}\"")
            );
            assert_eq!((state.as_str(), state.to_string()), (name, name.to_owned()));
            let record: CompensationRecord =
                serde_json::from_str(&compensation(&format!("\"{name}\""))).unwrap();
            assert_eq!(record.state, state);
            let again = serde_json::to_string(&record).unwrap();
            assert_eq!(
                again,
                compensation(&format!("\"{name}\"")),
                "written as read"
            );
        }
    }

    #[test]
    fn a_state_from_a_newer_node_keeps_its_record_as_unknown() {
        let record: CompensationRecord =
            serde_json::from_str(&compensation("\"reversed\"")).unwrap();
        assert_eq!(record.state, CompensationState::Unknown);
        assert!(!record.state.is_terminal());
        assert_eq!(
            (record.attempts, record.last_error.as_deref()),
            (2, Some("HTTP 503: busy"))
        );
        for not_a_name in ["3", "null", "[\"succeeded\"]"] {
            assert!(
                serde_json::from_str::<CompensationRecord>(&compensation(not_a_name)).is_err(),
                "{not_a_name}"
            );
        }
    }

    #[test]
    fn record_round_trips_as_json() {
        let r = rec(5, "n");
        let text = serde_json::to_string(&r).unwrap();
        assert_eq!(serde_json::from_str::<AllocationRecord>(&text).unwrap(), r);
    }
}
