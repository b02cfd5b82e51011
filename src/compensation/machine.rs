//! The compensation state machine: one per losing allocation, driven only by
//! the node that made that allocation.
//!
//! When a merge shows two regions allocated the same key, the loser's
//! allocation must be undone (refund/void) exactly once in effect. This module
//! is the pure core of that: no I/O, no clock (`now_ms` is passed in), no
//! randomness of its own (jitter comes from a caller-provided `u64`).
//!
//! States: `pending → running → succeeded`; `running → failed → running …`
//! with capped exponential backoff and jitter; `running → dead-lettered` on a
//! permanent failure or when `max_attempts` is used up. `succeeded` is final;
//! `dead-lettered` leaves only through [`Compensation::operator_retry`].
//!
//! Write-ahead rule: every transition method mutates the machine and returns
//! the [`LogEntry`] that describes it. The caller must append that entry to the
//! durable local log *before* acting on it (calling the webhook after
//! `Started`, publishing the state after `Finished`). If the append fails, drop
//! the in-memory value and rebuild it with [`Compensation::replay`]. Replay
//! uses the same [`Compensation::apply`] as live transitions, so it cannot
//! disagree with them.
//!
//! Crash rule: a log that ends with `Started` replays to `running`: the
//! attempt may or may not have reached the receiver. On restart the caller
//! must call [`Compensation::resume_after_crash`] on every `running`
//! compensation. That counts the interrupted attempt as a retryable failure
//! (normal backoff, dead-letter if the budget is spent, so crash loops cannot
//! retry forever). The next attempt uses the same idempotency key, so the
//! receiver deduplicates it if the first one already went through.

pub use crate::record::CompensationState;
use serde::{Deserialize, Serialize};

/// Prefix of every compensation idempotency key. The whole key is this
/// prefix plus the loser's transaction id. It never contains the attempt
/// number, so all retries (after a crash or an operator retry too) send the
/// same key.
pub const IDEMPOTENCY_KEY_PREFIX: &str = "oncemesh-comp-";

/// Longest response body kept in an error, so a chatty receiver cannot bloat
/// the replicated state.
const MAX_ERROR_BODY_CHARS: usize = 512;

/// Why a transition or replay was refused. The machine never panics.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MachineError {
    /// The requested step is not allowed from the current state.
    #[error("compensation {txn}: cannot {action} while {state}")]
    InvalidTransition {
        /// Loser transaction id.
        txn: String,
        /// The refused step.
        action: &'static str,
        /// The state it was refused in.
        state: CompensationState,
    },
    /// An attempt was started before its backoff elapsed.
    #[error("compensation {txn}: next attempt not due until {due_at_ms} ms")]
    NotDue {
        /// Loser transaction id.
        txn: String,
        /// When the attempt becomes due.
        due_at_ms: u64,
    },
    /// A log to replay is empty, does not start with `Scheduled`, or skips
    /// an attempt number.
    #[error("corrupt compensation log: {0}")]
    CorruptLog(String),
    /// A [`RetryPolicy`] is unusable.
    #[error("invalid retry policy: {0}")]
    InvalidPolicy(&'static str),
}

/// How often and how fast a failing compensation is retried. Bounded,
/// because unbounded retries against paid APIs mean unbounded cost.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct RetryPolicy {
    /// Wait after the first failed attempt; it doubles with each later one.
    pub initial_backoff_ms: u64,
    /// Cap on the wait before jitter.
    pub max_backoff_ms: u64,
    /// Attempts before dead-lettering (per operator retry).
    pub max_attempts: u32,
    /// Fraction (0..=1) by which each wait is randomly stretched or shrunk.
    pub jitter: f64,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            initial_backoff_ms: 500,
            max_backoff_ms: 60_000,
            max_attempts: 8,
            jitter: 0.2,
        }
    }
}

impl RetryPolicy {
    /// Rejects policies that would never attempt, or whose numbers make no sense.
    pub fn validate(&self) -> Result<(), MachineError> {
        if self.max_attempts == 0 {
            return Err(MachineError::InvalidPolicy(
                "max_attempts must be at least 1",
            ));
        }
        if self.initial_backoff_ms > self.max_backoff_ms {
            return Err(MachineError::InvalidPolicy(
                "initial_backoff_ms must not exceed max_backoff_ms",
            ));
        }
        if !(0.0..=1.0).contains(&self.jitter) {
            return Err(MachineError::InvalidPolicy(
                "jitter must be a fraction in 0..=1",
            ));
        }
        Ok(())
    }

    /// Wait after failed attempt `attempt` (1-based): `min(max, initial *
    /// 2^(attempt-1))` moved by up to ± `jitter` of itself, chosen by
    /// `jitter_rand`. Never above `max * (1 + jitter)`; saturates, never overflows.
    pub fn backoff_ms(&self, attempt: u32, jitter_rand: u64) -> u64 {
        let doublings = attempt.saturating_sub(1);
        let base = 1u64.checked_shl(doublings).map_or(u64::MAX, |factor| {
            self.initial_backoff_ms.saturating_mul(factor)
        });
        let capped = base.min(self.max_backoff_ms);
        let span = ((capped as f64 * self.jitter.clamp(0.0, 1.0)) as u64).min(capped);
        let width = span.saturating_mul(2).saturating_add(1);
        (capped - span).saturating_add(jitter_rand % width)
    }
}

/// The result of one attempt of the compensating action.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Outcome {
    /// Done (webhook 2xx, or the log action).
    Success,
    /// Worth retrying (5xx, 408, 429, network error, interrupted attempt).
    Retryable(String),
    /// Retrying cannot help (other 4xx); dead-letters at once.
    Permanent(String),
}

impl Outcome {
    /// Classifies a webhook response per the contract, keeping the status and
    /// (truncated) body as the error for the report.
    pub fn from_http_status(status: u16, body: &str) -> Self {
        let body: String = body.chars().take(MAX_ERROR_BODY_CHARS).collect();
        let error = format!("HTTP {status}: {body}");
        match status {
            200..=299 => Self::Success,
            408 | 429 => Self::Retryable(error),
            400..=499 => Self::Permanent(error),
            _ => Self::Retryable(error),
        }
    }
}

/// One durable log record, appended *before* the caller acts on it; replaying
/// the log rebuilds the compensation after a crash.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "entry", rename_all = "kebab-case")]
pub enum LogEntry {
    /// The loser was detected and its compensation created; always first.
    Scheduled {
        /// Loser transaction id.
        loser_txn: String,
        /// Detection time.
        at_ms: u64,
    },
    /// Attempt `attempt` is about to run the action.
    Started {
        /// 1-based attempt number since creation or the last operator retry.
        attempt: u32,
        /// Start time.
        at_ms: u64,
    },
    /// Attempt `attempt` ended (or was declared interrupted after a crash).
    Finished {
        /// The attempt that ended.
        attempt: u32,
        /// End time.
        at_ms: u64,
        /// What happened.
        outcome: Outcome,
        /// When the next attempt is due; `Some` exactly when a retryable
        /// failure is retried (`None` with a retryable outcome = budget spent).
        next_attempt_at_ms: Option<u64>,
    },
    /// An operator re-queued a dead-lettered compensation.
    OperatorRetry {
        /// When the operator asked.
        at_ms: u64,
    },
}

impl LogEntry {
    fn action(&self) -> &'static str {
        match self {
            Self::Scheduled { .. } => "schedule",
            Self::Started { .. } => "start",
            Self::Finished { .. } => "finish",
            Self::OperatorRetry { .. } => "operator-retry",
        }
    }
}

/// A wall clock read this far before the last transition went backwards
/// (NTP slews, a VM resumes, an operator sets it): waits measured on it no
/// longer count.
const CLOCK_STEP_MS: u64 = 1_000;

/// One loser's compensation. This is what the owning node writes into the
/// replicated state (only that node writes it) and what the report shows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Compensation {
    /// The losing allocation's transaction id.
    pub loser_txn: String,
    /// Key sent with every attempt; see [`Compensation::idempotency_key_for`].
    pub idempotency_key: String,
    /// Current state.
    pub state: CompensationState,
    /// Attempts started since creation or the last operator retry.
    pub attempts: u32,
    /// Most recent failure message (kept after a later success, as history).
    pub last_error: Option<String>,
    /// When the next attempt is due; `Some` only while pending or failed.
    pub next_attempt_at_ms: Option<u64>,
    /// When the loser was detected.
    pub detected_at_ms: u64,
    /// When the action succeeded.
    pub succeeded_at_ms: Option<u64>,
    /// How many times an operator re-queued it from dead-lettered.
    pub operator_retries: u32,
    /// Wall-clock ms of the last transition: a clock that reads earlier
    /// than this went backwards, and a wait measured on it would last as
    /// long as the jump.
    #[serde(default)]
    pub last_at_ms: u64,
}

impl Compensation {
    /// Creates a pending compensation, due at once, and its `Scheduled` entry.
    pub fn new(loser_txn: &str, detected_at_ms: u64) -> (Self, LogEntry) {
        let comp = Self {
            loser_txn: loser_txn.to_owned(),
            idempotency_key: Self::idempotency_key_for(loser_txn),
            state: CompensationState::Pending,
            attempts: 0,
            last_error: None,
            next_attempt_at_ms: Some(detected_at_ms),
            detected_at_ms,
            succeeded_at_ms: None,
            operator_retries: 0,
            last_at_ms: detected_at_ms,
        };
        let entry = LogEntry::Scheduled {
            loser_txn: loser_txn.to_owned(),
            at_ms: detected_at_ms,
        };
        (comp, entry)
    }

    /// The idempotency key for a loser: [`IDEMPOTENCY_KEY_PREFIX`] + the
    /// loser's transaction id, and nothing else, so every retry on every
    /// restart sends the same key and the receiver can deduplicate.
    pub fn idempotency_key_for(loser_txn: &str) -> String {
        format!("{IDEMPOTENCY_KEY_PREFIX}{loser_txn}")
    }

    /// Whether an attempt may start at `now_ms`: its wait is over, or the
    /// clock went back more than a second past the last transition (a jump backwards would
    /// otherwise hold every retry back by the size of the jump; retrying
    /// early is safe, the idempotency key stays the same).
    pub fn due(&self, now_ms: u64) -> bool {
        matches!(
            self.state,
            CompensationState::Pending | CompensationState::Failed
        ) && self.next_attempt_at_ms.is_some_and(|at| {
            at <= now_ms || now_ms.saturating_add(CLOCK_STEP_MS) < self.last_at_ms
        })
    }

    /// Pending or failed (and due) → running; counts the attempt. Log the
    /// entry, then run the action with [`Self::idempotency_key`].
    pub fn start(&mut self, now_ms: u64) -> Result<LogEntry, MachineError> {
        if !matches!(
            self.state,
            CompensationState::Pending | CompensationState::Failed
        ) {
            return Err(self.invalid("start"));
        }
        if !self.due(now_ms) {
            return Err(MachineError::NotDue {
                txn: self.loser_txn.clone(),
                due_at_ms: self.next_attempt_at_ms.unwrap_or(u64::MAX),
            });
        }
        self.record(LogEntry::Started {
            attempt: self.attempts.saturating_add(1),
            at_ms: now_ms,
        })
    }

    /// Running → succeeded, failed (retry scheduled with backoff from
    /// `jitter_rand`) or dead-lettered (permanent, or `max_attempts` used).
    pub fn finish(
        &mut self,
        outcome: Outcome,
        policy: &RetryPolicy,
        now_ms: u64,
        jitter_rand: u64,
    ) -> Result<LogEntry, MachineError> {
        if self.state != CompensationState::Running {
            return Err(self.invalid("finish"));
        }
        let next_attempt_at_ms = match outcome {
            Outcome::Retryable(_) if self.attempts < policy.max_attempts => {
                Some(now_ms.saturating_add(policy.backoff_ms(self.attempts, jitter_rand)))
            }
            _ => None,
        };
        self.record(LogEntry::Finished {
            attempt: self.attempts,
            at_ms: now_ms,
            outcome,
            next_attempt_at_ms,
        })
    }

    /// On restart, for a compensation replayed as running: the interrupted
    /// attempt counts as a retryable failure, so it is retried (same key)
    /// after the normal backoff, or dead-lettered if the budget is spent.
    pub fn resume_after_crash(
        &mut self,
        policy: &RetryPolicy,
        now_ms: u64,
        jitter_rand: u64,
    ) -> Result<LogEntry, MachineError> {
        if self.state != CompensationState::Running {
            return Err(self.invalid("resume"));
        }
        let error = format!(
            "attempt {} interrupted by a restart; outcome unknown, retrying with the same idempotency key",
            self.attempts
        );
        self.finish(Outcome::Retryable(error), policy, now_ms, jitter_rand)
    }

    /// Dead-lettered → pending, due at once, with a fresh attempt budget
    /// (`attempts` back to 0; `operator_retries` counts these). The key is
    /// unchanged, so a retry still cannot compensate twice.
    pub fn operator_retry(&mut self, now_ms: u64) -> Result<LogEntry, MachineError> {
        if self.state != CompensationState::DeadLettered {
            return Err(self.invalid("operator-retry"));
        }
        self.record(LogEntry::OperatorRetry { at_ms: now_ms })
    }

    /// Applies one logged transition; used by every live transition and by
    /// replay. Checks state and attempt numbers, not time.
    pub fn apply(&mut self, entry: &LogEntry) -> Result<(), MachineError> {
        use CompensationState as S;
        if let LogEntry::Started { at_ms, .. }
        | LogEntry::Finished { at_ms, .. }
        | LogEntry::OperatorRetry { at_ms } = entry
        {
            self.last_at_ms = *at_ms;
        }
        match (entry, self.state) {
            (LogEntry::Started { attempt, .. }, S::Pending | S::Failed) => {
                self.expect_attempt(*attempt, self.attempts.saturating_add(1))?;
                self.state = S::Running;
                self.attempts = *attempt;
                self.next_attempt_at_ms = None;
            }
            (
                LogEntry::Finished {
                    attempt,
                    at_ms,
                    outcome,
                    next_attempt_at_ms,
                },
                S::Running,
            ) => {
                self.expect_attempt(*attempt, self.attempts)?;
                self.next_attempt_at_ms = None;
                self.state = match (outcome, next_attempt_at_ms) {
                    (Outcome::Success, _) => {
                        self.succeeded_at_ms = Some(*at_ms);
                        S::Succeeded
                    }
                    (Outcome::Retryable(error), Some(next)) => {
                        self.last_error = Some(error.clone());
                        self.next_attempt_at_ms = Some(*next);
                        S::Failed
                    }
                    (Outcome::Retryable(error) | Outcome::Permanent(error), _) => {
                        self.last_error = Some(error.clone());
                        S::DeadLettered
                    }
                };
            }
            (LogEntry::OperatorRetry { at_ms }, S::DeadLettered) => {
                self.state = S::Pending;
                self.attempts = 0;
                self.next_attempt_at_ms = Some(*at_ms);
                self.operator_retries = self.operator_retries.saturating_add(1);
            }
            (entry, _) => return Err(self.invalid(entry.action())),
        }
        Ok(())
    }

    /// Rebuilds a compensation from its durable log (on restart).
    pub fn replay(entries: &[LogEntry]) -> Result<Self, MachineError> {
        let Some((LogEntry::Scheduled { loser_txn, at_ms }, rest)) = entries.split_first() else {
            let why = "it must start with a scheduled entry";
            return Err(MachineError::CorruptLog(why.into()));
        };
        let (mut comp, _) = Self::new(loser_txn, *at_ms);
        for entry in rest {
            comp.apply(entry)?;
        }
        Ok(comp)
    }

    fn record(&mut self, entry: LogEntry) -> Result<LogEntry, MachineError> {
        self.apply(&entry)?;
        Ok(entry)
    }

    fn expect_attempt(&self, found: u32, expected: u32) -> Result<(), MachineError> {
        if found == expected {
            return Ok(());
        }
        let txn = &self.loser_txn;
        let why = format!("{txn}: entry for attempt {found}, expected attempt {expected}");
        Err(MachineError::CorruptLog(why))
    }

    fn invalid(&self, action: &'static str) -> MachineError {
        MachineError::InvalidTransition {
            txn: self.loser_txn.clone(),
            action,
            state: self.state,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use CompensationState as S;

    const TXN: &str = "txn-42";

    const POLICY: RetryPolicy = RetryPolicy {
        initial_backoff_ms: 100,
        max_backoff_ms: 1_000,
        max_attempts: 3,
        jitter: 0.2,
    };

    fn retryable() -> Outcome {
        Outcome::Retryable("HTTP 503: busy".into())
    }

    fn in_state(state: S) -> Compensation {
        let (mut comp, _) = Compensation::new(TXN, 0);
        if state == S::Pending {
            return comp;
        }
        comp.start(0).unwrap();
        let outcome = match state {
            S::Running => return comp,
            S::Succeeded => Outcome::Success,
            S::Failed => retryable(),
            _ => Outcome::Permanent("HTTP 400: no".into()),
        };
        comp.finish(outcome, &POLICY, 0, 0).unwrap();
        comp
    }

    type Step = fn(&mut Compensation) -> Result<LogEntry, MachineError>;

    #[test]
    fn every_transition_allowed_or_refused_cleanly() {
        let all = [S::Pending, S::Running, S::Succeeded, S::Failed];
        for state in all.into_iter().chain([S::DeadLettered]) {
            let steps: [(&str, Step, &[S]); 4] = [
                ("start", |c| c.start(u64::MAX), &[S::Pending, S::Failed]),
                (
                    "finish",
                    |c| c.finish(Outcome::Success, &POLICY, 1, 0),
                    &[S::Running],
                ),
                (
                    "resume",
                    |c| c.resume_after_crash(&POLICY, 1, 0),
                    &[S::Running],
                ),
                (
                    "operator-retry",
                    |c| c.operator_retry(1),
                    &[S::DeadLettered],
                ),
            ];
            for (action, step, allowed) in steps {
                let mut comp = in_state(state);
                let before = comp.clone();
                match step(&mut comp) {
                    Ok(entry) => {
                        assert!(allowed.contains(&state), "{action} from {state}");
                        let mut replayed = before.clone();
                        replayed.apply(&entry).unwrap();
                        assert_eq!(replayed, comp);
                    }
                    Err(err) => {
                        assert!(!allowed.contains(&state), "{action} from {state}: {err}");
                        let want = format!("compensation {TXN}: cannot {action} while {state}");
                        assert_eq!((err.to_string(), &comp), (want, &before));
                    }
                }
            }
            assert!(in_state(state).apply(&Compensation::new(TXN, 0).1).is_err());
        }
    }

    #[test]
    fn a_state_only_a_newer_node_knows_allows_no_step() {
        let mut comp = in_state(S::Pending);
        comp.state = S::Unknown;
        let before = comp.clone();
        assert!(comp.start(u64::MAX).is_err());
        assert!(comp.finish(Outcome::Success, &POLICY, 1, 0).is_err());
        assert!(comp.resume_after_crash(&POLICY, 1, 0).is_err());
        assert!(comp.operator_retry(1).is_err());
        assert!(!comp.due(u64::MAX));
        assert_eq!(comp, before);
    }

    #[test]
    fn happy_path_and_crash_resume_keep_one_key() {
        let (mut comp, first) = Compensation::new(TXN, 10);
        assert_eq!(comp.idempotency_key, "oncemesh-comp-txn-42");
        assert!(comp.due(10) && !comp.due(9));
        let mut log = vec![first, comp.start(10).unwrap()];
        assert_eq!(
            (comp.state, comp.attempts, comp.due(u64::MAX)),
            (S::Running, 1, false)
        );
        // Crash here: replay gives running; resume counts the attempt and retries later.
        let mut resumed = Compensation::replay(&log).unwrap();
        assert_eq!(resumed, comp);
        log.push(resumed.resume_after_crash(&POLICY, 30, 0).unwrap());
        assert_eq!(resumed.state, S::Failed);
        assert!(resumed
            .last_error
            .as_deref()
            .is_some_and(|e| e.contains("interrupted")));
        let at = resumed.next_attempt_at_ms.unwrap();
        log.push(resumed.start(at).unwrap());
        log.push(
            resumed
                .finish(Outcome::Success, &POLICY, at + 5, 0)
                .unwrap(),
        );
        assert_eq!((resumed.state, resumed.attempts), (S::Succeeded, 2));
        assert_eq!(resumed.succeeded_at_ms, Some(at + 5));
        assert_eq!(resumed.idempotency_key, comp.idempotency_key);
        assert_eq!(Compensation::replay(&log).unwrap(), resumed);
    }

    #[test]
    fn dead_letters_after_exactly_max_attempts_retryable_failures() {
        let p = POLICY;
        let (mut comp, _) = Compensation::new(TXN, 0);
        let mut now = 0;
        for n in 1..=p.max_attempts {
            comp.start(now).unwrap();
            comp.finish(retryable(), &p, now, 12_345).unwrap();
            assert_eq!(
                (comp.attempts, comp.last_error.as_deref()),
                (n, Some("HTTP 503: busy"))
            );
            if n == p.max_attempts {
                assert_eq!(
                    (comp.state, comp.next_attempt_at_ms),
                    (S::DeadLettered, None)
                );
            } else {
                assert_eq!(comp.state, S::Failed);
                let at = comp.next_attempt_at_ms.unwrap();
                assert!(at > now);
                assert!(matches!(
                    comp.start(at - 1),
                    Err(MachineError::NotDue { .. })
                ));
                now = at;
            }
        }
    }

    #[test]
    fn permanent_failure_dead_letters_at_once_and_operator_retry_resets_budget() {
        let (mut comp, first) = Compensation::new(TXN, 0);
        let mut log = vec![first, comp.start(0).unwrap()];
        let outcome = Outcome::from_http_status(422, "bad refund");
        log.push(comp.finish(outcome, &POLICY, 5, 0).unwrap());
        assert_eq!((comp.state, comp.attempts), (S::DeadLettered, 1));
        assert_eq!(comp.last_error.as_deref(), Some("HTTP 422: bad refund"));
        assert!(!comp.due(u64::MAX));
        log.push(comp.operator_retry(50).unwrap());
        assert_eq!(
            (comp.state, comp.attempts, comp.operator_retries),
            (S::Pending, 0, 1)
        );
        assert_eq!(comp.next_attempt_at_ms, Some(50));
        log.push(comp.start(50).unwrap());
        assert_eq!(comp.attempts, 1);
        assert_eq!(Compensation::replay(&log).unwrap(), comp);
    }

    #[test]
    fn a_clock_that_jumps_back_does_not_hold_a_retry_back() {
        let (mut comp, _) = Compensation::new("tx", 1_000_000);
        comp.start(1_000_000).unwrap();
        let failed = Outcome::Retryable("HTTP 503".into());
        comp.finish(failed, &POLICY, 1_000_100, 0).unwrap();
        let due_at = comp.next_attempt_at_ms.unwrap();
        assert!(!comp.due(due_at - 1), "waits its backoff on a steady clock");
        // The wall clock steps back five minutes: the wait would last that long.
        assert!(
            comp.due(1_000_100 - 300_000),
            "due at once after a jump backwards"
        );
        // Replayed from its log, the same holds.
        let log = [
            LogEntry::Scheduled {
                loser_txn: "tx".into(),
                at_ms: 1_000_000,
            },
            LogEntry::Started {
                attempt: 1,
                at_ms: 1_000_000,
            },
            LogEntry::Finished {
                attempt: 1,
                at_ms: 1_000_100,
                outcome: Outcome::Retryable("HTTP 503".into()),
                next_attempt_at_ms: Some(due_at),
            },
        ];
        let replayed = Compensation::replay(&log).unwrap();
        assert!(replayed.due(700_000) && !replayed.due(due_at - 1));
    }

    #[test]
    fn http_statuses_are_classified_per_contract() {
        for status in [200, 204, 299] {
            assert_eq!(Outcome::from_http_status(status, "x"), Outcome::Success);
        }
        for status in [408, 429, 500, 503, 599] {
            let got = Outcome::from_http_status(status, "x");
            assert!(matches!(got, Outcome::Retryable(_)), "{status}");
        }
        for status in [400, 401, 404, 409, 422, 499] {
            let got = Outcome::from_http_status(status, &"y".repeat(2_000));
            assert!(
                matches!(&got, Outcome::Permanent(e) if e.len() < 600),
                "{status}"
            );
        }
    }

    #[test]
    fn bad_logs_and_policies_are_rejected() {
        let started = |attempt| LogEntry::Started { attempt, at_ms: 0 };
        assert!(matches!(
            Compensation::replay(&[]),
            Err(MachineError::CorruptLog(_))
        ));
        let err = Compensation::replay(&[started(1)]).unwrap_err();
        assert!(matches!(err, MachineError::CorruptLog(_)));
        let err = in_state(S::Pending).apply(&started(2)).unwrap_err();
        assert_eq!(
            err.to_string(),
            "corrupt compensation log: txn-42: entry for attempt 2, expected attempt 1"
        );
        let d = RetryPolicy::default();
        assert!(d.validate().is_ok());
        let bad = [
            (0, 500, 0.2),
            (8, 61_000, 0.2),
            (8, 500, 1.5),
            (8, 500, f64::NAN),
        ];
        for (max_attempts, initial_backoff_ms, jitter) in bad {
            let p = RetryPolicy {
                max_attempts,
                initial_backoff_ms,
                jitter,
                ..d
            };
            assert!(p.validate().is_err(), "{p:?}");
        }
    }

    #[test]
    fn serde_names_and_backoff_saturation() {
        assert_eq!(S::DeadLettered.to_string(), "dead-lettered");
        assert_eq!(
            serde_json::to_string(&S::DeadLettered).unwrap(),
            "\"dead-lettered\""
        );
        let json = serde_json::to_string(&LogEntry::OperatorRetry { at_ms: 5 }).unwrap();
        assert_eq!(json, r#"{"entry":"operator-retry","at_ms":5}"#);
        let huge = RetryPolicy {
            initial_backoff_ms: u64::MAX,
            max_backoff_ms: u64::MAX,
            ..POLICY
        };
        let huge = RetryPolicy {
            jitter: 1.0,
            ..huge
        };
        for attempt in [0, 1, 64, 65, u32::MAX] {
            huge.backoff_ms(attempt, u64::MAX);
        }
    }

    fn outcome() -> impl Strategy<Value = Outcome> {
        prop_oneof![
            3 => Just(retryable()),
            1 => Just(Outcome::Success),
            1 => Just(Outcome::Permanent("HTTP 400: no".into())),
        ]
    }

    /// Runs attempts until terminal, with `outcomes` then successes; returns the log written.
    fn drive(comp: &mut Compensation, outcomes: &[Outcome], now: &mut u64) -> Vec<LogEntry> {
        let mut outcomes = outcomes.iter().cloned();
        let mut log = Vec::new();
        while !comp.state.is_terminal() {
            *now = (*now).max(comp.next_attempt_at_ms.unwrap_or(0));
            log.push(comp.start(*now).unwrap());
            *now += 7;
            let outcome = outcomes.next().unwrap_or(Outcome::Success);
            log.push(comp.finish(outcome, &POLICY, *now, *now * 31).unwrap());
        }
        log
    }

    proptest! {
        #[test]
        fn backoff_stays_within_bounds(
            initial in 0u64..100_000,
            extra in 0u64..10_000_000,
            jitter in 0.0f64..=1.0,
            attempt in 0u32..100,
            rand in any::<u64>(),
        ) {
            let p = RetryPolicy { initial_backoff_ms: initial, max_backoff_ms: initial + extra, max_attempts: 8, jitter };
            prop_assert!(p.validate().is_ok());
            let max = p.max_backoff_ms as f64;
            let base = (initial as f64 * 2f64.powi(attempt.saturating_sub(1) as i32)).min(max);
            let wait = p.backoff_ms(attempt, rand) as f64;
            prop_assert!(wait + 1e-6 >= base * (1.0 - jitter), "{wait} < {base}");
            prop_assert!(wait <= base * (1.0 + jitter) + 1e-6 && wait <= max * (1.0 + jitter) + 1e-6);
            let no_jitter = RetryPolicy { jitter: 0.0, ..p };
            prop_assert!(no_jitter.backoff_ms(attempt, rand) <= no_jitter.backoff_ms(attempt + 1, rand));
        }

        #[test]
        fn crash_at_every_step_resumes_to_a_consistent_end(
            outcomes in prop::collection::vec(outcome(), 0..10),
            later in prop::collection::vec(outcome(), 0..10),
            operator_retries in any::<bool>(),
        ) {
            let (mut comp, first) = Compensation::new(TXN, 0);
            let mut now = 0;
            let mut log = vec![first];
            log.extend(drive(&mut comp, &outcomes, &mut now));
            if operator_retries && comp.state == S::DeadLettered {
                log.push(comp.operator_retry(now).unwrap());
                log.extend(drive(&mut comp, &later, &mut now));
            }
            prop_assert_eq!(&Compensation::replay(&log).unwrap(), &comp);
            for entry in &log {
                let json = serde_json::to_string(entry).unwrap();
                prop_assert_eq!(&serde_json::from_str::<LogEntry>(&json).unwrap(), entry);
            }
            for cut in 1..=log.len() {
                let mut resumed_log = log[..cut].to_vec();
                let mut resumed = Compensation::replay(&resumed_log).unwrap();
                let mut restart = now + 1_000;
                if resumed.state == S::Running {
                    resumed_log.push(resumed.resume_after_crash(&POLICY, restart, 3).unwrap());
                }
                resumed_log.extend(drive(&mut resumed, &later, &mut restart));
                prop_assert!(resumed.state.is_terminal());
                prop_assert_eq!(&resumed.idempotency_key, &comp.idempotency_key);
                prop_assert!((1..=POLICY.max_attempts).contains(&resumed.attempts));
                let since_retry = resumed_log.iter().rev()
                    .take_while(|e| !matches!(e, LogEntry::OperatorRetry { .. }))
                    .filter(|e| matches!(e, LogEntry::Started { .. }))
                    .count();
                prop_assert_eq!(resumed.attempts as usize, since_retry);
                let successes = resumed_log.iter()
                    .filter(|e| matches!(e, LogEntry::Finished { outcome: Outcome::Success, .. }))
                    .count();
                prop_assert!(successes <= 1);
                prop_assert_eq!(successes == 1, resumed.state == S::Succeeded);
                prop_assert_eq!(&Compensation::replay(&resumed_log).unwrap(), &resumed);
            }
        }
    }
}
