//! What a compensation is about, the losing allocation and the one it lost
//! to, kept in the compensation log beside the state machine's entries.
//!
//! The action is given both records. Looking them up in the ledger at each
//! attempt and at a restart tied a compensation's life to its key's, and a
//! key leaves the ledger once its winner passes the retention, even while
//! its loser's compensation is still being retried; that compensation must
//! still run to its end, once (DESIGN.md). With its subject in its own log,
//! a compensation needs the ledger only to learn of new losers and of a
//! winner that moved (a later entry then holds the new winner).

use super::machine::LogEntry;
use crate::record::AllocationRecord;
use serde::{Deserialize, Serialize};
use std::borrow::Cow;
use std::sync::Arc;

/// The loser (this node's allocation) and the winner it lost to.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Subject {
    /// The losing allocation.
    pub loser: Arc<AllocationRecord>,
    /// The winning allocation, as last known.
    pub winner: Arc<AllocationRecord>,
}

/// The stored form: `{"entry": "subject", "loser": {...}, "winner": {...}}`,
/// tagged like the machine's entries.
#[derive(Serialize, Deserialize)]
#[serde(tag = "entry", rename_all = "kebab-case")]
enum Stored {
    Subject(Subject),
}

/// Only the tag of a stored entry.
#[derive(Deserialize)]
struct Tag<'a> {
    #[serde(borrow)]
    entry: Cow<'a, str>,
}

impl Subject {
    /// The log entry that records this subject.
    pub fn encode(&self) -> Result<Vec<u8>, serde_json::Error> {
        serde_json::to_vec(&Stored::Subject(self.clone()))
    }
}

/// A compensation's log as read back: the machine's entries in order, and
/// the subject last written (`None` in logs of versions that wrote none).
/// A damaged subject entry is skipped with a warning: the one before it, or
/// the ledger's records while the key is held, still say what it is about,
/// and the machine's entries alone decide whether it runs.
pub fn read(raw: &[Vec<u8>]) -> Result<(Vec<LogEntry>, Option<Subject>), serde_json::Error> {
    let mut entries = Vec::with_capacity(raw.len());
    let mut subject = None;
    for bytes in raw {
        let tag: Tag = serde_json::from_slice(bytes)?;
        if tag.entry == "subject" {
            match serde_json::from_slice(bytes) {
                Ok(Stored::Subject(s)) => subject = Some(s),
                Err(e) => {
                    tracing::warn!(error = %e, "skipping a damaged subject entry of a compensation log");
                }
            }
        } else {
            entries.push(serde_json::from_slice(bytes)?);
        }
    }
    Ok((entries, subject))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compensation::machine::Compensation;
    use crate::hlc::Timestamp;

    fn record(txn: &str, ms: u64) -> Arc<AllocationRecord> {
        Arc::new(AllocationRecord {
            v: 1,
            key: "order-1".into(),
            txn_id: txn.into(),
            region: "sgp".into(),
            node: "node".into(),
            hlc: Timestamp::new(ms, 0),
            fingerprint: "jcs:00".into(),
            confidence: 0.5,
        })
    }

    #[test]
    fn the_last_subject_in_a_log_is_the_one_read_back() {
        let first = Subject {
            loser: record("tx_l", 5),
            winner: record("tx_w", 3),
        };
        let moved = Subject {
            winner: record("tx_earlier", 1),
            ..first.clone()
        };
        let (_, scheduled) = Compensation::new("tx_l", 7);
        let raw = vec![
            serde_json::to_vec(&scheduled).unwrap(),
            first.encode().unwrap(),
            moved.encode().unwrap(),
        ];
        let (entries, subject) = read(&raw).unwrap();
        assert_eq!(entries, std::slice::from_ref(&scheduled));
        assert_eq!(subject, Some(moved));
        // A log written before subjects were.
        let old = vec![serde_json::to_vec(&scheduled).unwrap()];
        assert_eq!(read(&old).unwrap(), (vec![scheduled.clone()], None));
        // A damaged subject is skipped: the one before it still holds, and
        // the machine's entries are read as ever.
        let damaged = vec![
            serde_json::to_vec(&scheduled).unwrap(),
            first.encode().unwrap(),
            b"{\"entry\":\"subject\"}".to_vec(),
        ];
        assert_eq!(
            read(&damaged).unwrap(),
            (vec![scheduled.clone()], Some(first))
        );
        assert!(read(&[b"not json".to_vec()]).is_err());
    }
}
