//! A typed client of a node's HTTP API (docs/API.md): what the `oncemesh`
//! command line uses, and what a Rust payment service calls to make a
//! handler idempotent (`examples/idempotent_service.rs`).
//!
//! ```no_run
//! # async fn pay() -> Result<(), oncemesh::client::ClientError> {
//! use oncemesh::client::Client;
//! let node = Client::new("http://127.0.0.1:7700")?;
//! let answer = node
//!     .allocate("order-42", &serde_json::json!({"amount": 1299, "currency": "EUR"}))
//!     .await?;
//! if answer.replay {
//!     // A retry: answer as the first time, for transaction answer.allocation.txn_id.
//! }
//! # Ok(()) }
//! ```
//!
//! Every answer keeps the fields this client does not model in `extra`, so
//! a node newer than the client loses nothing when an answer is printed
//! again (`oncemesh status --json`).

use crate::hlc::Timestamp;
use crate::key::{IdempotencyKey, InputError};
use reqwest::{Method, RequestBuilder, StatusCode, Url};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// Why a call did not give the answer asked for.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The node URL is not an http:// or https:// URL.
    #[error("'{url}' is not a node URL (http://HOST:PORT or https://...): {reason}")]
    BadUrl {
        /// The URL given.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The key breaks the key rules; nothing was sent.
    #[error(transparent)]
    InvalidKey(#[from] InputError),
    /// The HTTP client could not be built.
    #[error("cannot set up the HTTP client: {0}")]
    Setup(String),
    /// No answer: the node is down, unreachable, or the call timed out.
    #[error("cannot reach the node at {url} (is it running? see --node): {reason}")]
    Unreachable {
        /// The node's base URL.
        url: String,
        /// The cause, with its chain.
        reason: String,
    },
    /// The node answered with an error status; `message` is its `error`.
    #[error("{message} (HTTP {status})")]
    Api {
        /// HTTP status.
        status: u16,
        /// The node's message.
        message: String,
    },
    /// The node answered 2xx with a body this client cannot read.
    #[error("the answer to {what} is not in the expected shape: {reason}")]
    Answer {
        /// Which call.
        what: String,
        /// The parse error.
        reason: String,
    },
}

impl ClientError {
    /// The HTTP status of an error answer.
    pub fn status(&self) -> Option<u16> {
        match self {
            Self::Api { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// True for the 409 of a key already used with another payload: the
    /// caller is reusing a key, and must not run the operation.
    pub fn is_key_reused(&self) -> bool {
        self.status() == Some(409)
    }
}

/// One allocation, as every answer shows it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Allocation {
    /// The idempotency key.
    pub key: String,
    /// The transaction id, the same in every region.
    pub txn_id: String,
    /// Region of the node that made it.
    pub region: String,
    /// Peer id of the node that made it.
    pub node: String,
    /// Its hybrid-logical-clock stamp.
    pub hlc: Timestamp,
    /// The payload's fingerprint.
    pub fingerprint: String,
    /// Confidence that it is not a duplicate (now, or when made: the field
    /// docs in docs/API.md say which answer shows which).
    pub confidence: f64,
    /// The key's state: provisional, settled, conflicted, compensating,
    /// compensated.
    pub state: String,
    /// Confidence when it was made, where the answer shows both.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub confidence_at_allocation: Option<f64>,
    /// sole, winner or loser, where the answer says.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
    /// Fields this client does not model.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// The answer to an allocate request.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Allocated {
    /// The allocation, new or existing.
    #[serde(flatten)]
    pub allocation: Allocation,
    /// True when the key was already allocated with this payload (200):
    /// answer as the first time, do not run the operation again.
    pub replay: bool,
}

/// A compensation of a losing allocation, or the placeholder of one whose
/// owner has not reported yet (no `key`, no idempotency key).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Compensation {
    /// The key in conflict (absent from a placeholder).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    /// The losing transaction.
    pub txn_id: String,
    /// Peer id of the node that runs it.
    pub owner: String,
    /// pending, running, succeeded, failed or dead-lettered.
    pub state: String,
    /// Attempts so far.
    pub attempts: u32,
    /// Last failure.
    #[serde(default)]
    pub last_error: Option<String>,
    /// When the next attempt is due (RFC 3339).
    #[serde(default)]
    pub next_attempt_at: Option<String>,
    /// The key the action sends, stable across retries.
    #[serde(default)]
    pub idempotency_key: Option<String>,
    /// Fields this client does not model.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// Every allocation of one key (`GET /v1/allocations/{key}`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct KeyReport {
    /// The key.
    pub key: String,
    /// Its state.
    pub state: String,
    /// Whether it can no longer gain an allocation.
    pub settled: bool,
    /// Winning transaction.
    pub winner: Option<String>,
    /// Every allocation, winner first.
    pub allocations: Vec<Allocation>,
    /// One per loser.
    pub compensations: Vec<Compensation>,
    /// Fields this client does not model.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// One entry of the conflict report.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Conflict {
    /// The key allocated more than once.
    pub key: String,
    /// Its state.
    pub state: String,
    /// Whether every loser is compensated.
    pub resolved: bool,
    /// Every allocation, with the confidence it had when made.
    pub allocations: Vec<Allocation>,
    /// Winning transaction.
    pub winner: Option<String>,
    /// Whether the winner can no longer change.
    pub winner_final: bool,
    /// One per loser.
    pub compensations: Vec<Compensation>,
    /// When this node saw the conflict (RFC 3339).
    pub detected_at: String,
    /// Fields this client does not model.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// Which conflicts to list.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConflictFilter {
    /// Not yet compensated.
    Open,
    /// Every loser compensated.
    Resolved,
}

/// The health verdict.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HealthStatus {
    /// Nothing to look at.
    Ok,
    /// A precursor of duplicates is showing.
    Degraded,
    /// Writes cannot be made durable, or a compensation needs an operator.
    Critical,
}

impl HealthStatus {
    /// The verdict as the API spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ok => "ok",
            Self::Degraded => "degraded",
            Self::Critical => "critical",
        }
    }
}

/// `GET /v1/health`. The leading indicators are in `extra` while their
/// shape grows (docs/API.md).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Health {
    /// The verdict.
    pub status: HealthStatus,
    /// Why, one entry per reason.
    pub reasons: Vec<Value>,
    /// Expected duplicates and value at risk of the node's provisional allocations.
    #[serde(default)]
    pub exposure: Option<crate::exposure::Exposure>,
    /// The indicators behind the verdict.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// One peer of `GET /v1/peers`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Peer {
    /// Its peer id.
    pub peer_id: String,
    /// Whether a connection is up.
    pub connected: bool,
    /// Last time it was in sync (RFC 3339).
    #[serde(default)]
    pub last_in_sync: Option<String>,
    /// Its clock's offset from ours, ms.
    #[serde(default)]
    pub clock_offset_ms: Option<i64>,
    /// Fields this client does not model.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

#[derive(Deserialize)]
struct Conflicts {
    conflicts: Vec<Conflict>,
}

#[derive(Deserialize)]
struct Compensations {
    compensations: Vec<Compensation>,
}

/// One of a node's automerge documents, as `GET /v1/documents` lists it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Document {
    /// Its id.
    pub id: String,
    /// blake3 over its heads: equal on two nodes when they hold the same changes.
    pub heads_digest: String,
    /// Its saved size.
    #[serde(default)]
    pub size_bytes: u64,
    /// Fields this client does not model.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

#[derive(Deserialize)]
struct Documents {
    documents: Vec<Document>,
}

#[derive(Deserialize)]
struct Peers {
    peers: Vec<Peer>,
}

/// A node's API, at one base URL, with an optional bearer token.
#[derive(Clone, Debug)]
pub struct Client {
    http: reqwest::Client,
    base: Url,
    token: Option<String>,
}

impl Client {
    /// A client of the node at `base_url` (e.g. `http://127.0.0.1:7700`,
    /// or a path prefix behind a proxy).
    pub fn new(base_url: &str) -> Result<Self, ClientError> {
        let bad = |reason: String| ClientError::BadUrl {
            url: base_url.to_owned(),
            reason,
        };
        let base = Url::parse(base_url).map_err(|e| bad(e.to_string()))?;
        if !matches!(base.scheme(), "http" | "https") || base.cannot_be_a_base() {
            return Err(bad("the scheme must be http or https".into()));
        }
        let http = crate::tls::http_client()
            .build()
            .map_err(|e| ClientError::Setup(crate::tls::error_chain(&e)))?;
        Ok(Self {
            http,
            base,
            token: None,
        })
    }

    /// Sends `Authorization: Bearer <token>` with every call.
    pub fn with_api_token(mut self, token: impl Into<String>) -> Self {
        self.token = Some(token.into());
        self
    }

    /// Allocates `key` for `payload` (a JSON object) in the body form:
    /// new (`replay: false`), or the existing allocation (`replay: true`).
    /// A key used with another payload is [`ClientError::is_key_reused`].
    pub async fn allocate(&self, key: &str, payload: &Value) -> Result<Allocated, ClientError> {
        IdempotencyKey::parse(key)?;
        let body = serde_json::json!({ "key": key, "payload": payload });
        let request = self.request(Method::POST, &["v1", "allocations"])?;
        self.call(request.json(&body), "allocate").await
    }

    /// [`Client::allocate`] in the header form: the key in an
    /// `Idempotency-Key` header, the payload as the body, as a service
    /// forwards the request it got.
    pub async fn allocate_with_header(
        &self,
        key: &str,
        payload: &Value,
    ) -> Result<Allocated, ClientError> {
        let key = IdempotencyKey::parse(key)?;
        let request = self
            .request(Method::POST, &["v1", "allocations"])?
            .header("Idempotency-Key", key.as_str())
            .json(payload);
        self.call(request, "allocate").await
    }

    /// Every allocation of `key`; `None` if the node does not know it.
    pub async fn allocation(&self, key: &str) -> Result<Option<KeyReport>, ClientError> {
        IdempotencyKey::parse(key)?;
        let request = self.request(Method::GET, &["v1", "allocations", key])?;
        match self.call(request, "the key report").await {
            Ok(report) => Ok(Some(report)),
            Err(e) if e.status() == Some(404) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// The conflict report, all or filtered.
    pub async fn conflicts(
        &self,
        filter: Option<ConflictFilter>,
    ) -> Result<Vec<Conflict>, ClientError> {
        let state = filter.map(|filter| match filter {
            ConflictFilter::Open => "open",
            ConflictFilter::Resolved => "resolved",
        });
        let request = self.request_with_state(&["v1", "conflicts"], state)?;
        let list: Conflicts = self.call(request, "the conflict report").await?;
        Ok(list.conflicts)
    }

    /// Every compensation known to the node, or those in `state`.
    pub async fn compensations(
        &self,
        state: Option<&str>,
    ) -> Result<Vec<Compensation>, ClientError> {
        let request = self.request_with_state(&["v1", "compensations"], state)?;
        let list: Compensations = self.call(request, "the compensation list").await?;
        Ok(list.compensations)
    }

    /// Sends a dead-lettered compensation of this node back for another
    /// round of attempts (same idempotency key).
    pub async fn retry_compensation(&self, txn_id: &str) -> Result<Compensation, ClientError> {
        let request = self.request(Method::POST, &["v1", "compensations", txn_id, "retry"])?;
        self.call(request, "the retry").await
    }

    /// The health verdict and its indicators, `critical` too (the node
    /// answers it with a 503 and the same body, for load balancers).
    pub async fn health(&self) -> Result<Health, ClientError> {
        let request = self.request(Method::GET, &["v1", "health"])?;
        self.call_accepting(
            request,
            "the health report",
            Some(StatusCode::SERVICE_UNAVAILABLE),
        )
        .await
    }

    /// How well the node's confidence held: per situation, per partition episode.
    pub async fn calibration(
        &self,
    ) -> Result<crate::confidence::calibration::CalibrationReport, ClientError> {
        let request = self.request(Method::GET, &["v1", "calibration"])?;
        self.call(request, "the calibration report").await
    }

    /// Each allowlisted peer and its replication state.
    pub async fn peers(&self) -> Result<Vec<Peer>, ClientError> {
        let request = self.request(Method::GET, &["v1", "peers"])?;
        let list: Peers = self.call(request, "the peer list").await?;
        Ok(list.peers)
    }

    /// The node's documents with their heads digests, to compare nodes.
    pub async fn documents(&self) -> Result<Vec<Document>, ClientError> {
        let request = self.request(Method::GET, &["v1", "documents"])?;
        let list: Documents = self.call(request, "the document list").await?;
        Ok(list.documents)
    }

    /// A request to the base URL plus `segments`, each percent-encoded (a
    /// key may hold `/`, `?` or `%`).
    fn request(&self, method: Method, segments: &[&str]) -> Result<RequestBuilder, ClientError> {
        Ok(self.send_to(method, self.url(segments)?))
    }

    /// A GET of a list, filtered by `?state=` when `state` is given.
    fn request_with_state(
        &self,
        segments: &[&str],
        state: Option<&str>,
    ) -> Result<RequestBuilder, ClientError> {
        let mut url = self.url(segments)?;
        if let Some(state) = state {
            url.query_pairs_mut().append_pair("state", state);
        }
        Ok(self.send_to(Method::GET, url))
    }

    fn url(&self, segments: &[&str]) -> Result<Url, ClientError> {
        let mut url = self.base.clone();
        url.path_segments_mut()
            .map_err(|()| ClientError::BadUrl {
                url: self.base.to_string(),
                reason: "cannot take a path".into(),
            })?
            .pop_if_empty()
            .extend(segments);
        Ok(url)
    }

    fn send_to(&self, method: Method, url: Url) -> RequestBuilder {
        let request = self.http.request(method, url);
        match &self.token {
            Some(token) => request.bearer_auth(token),
            None => request,
        }
    }

    /// Sends `request`; a 2xx body is read as `T`, any other status is an
    /// [`ClientError::Api`] with the node's message.
    async fn call<T: DeserializeOwned>(
        &self,
        request: RequestBuilder,
        what: &str,
    ) -> Result<T, ClientError> {
        self.call_accepting(request, what, None).await
    }

    /// [`Client::call`], reading the body of an `also` answer as if it
    /// were a success.
    async fn call_accepting<T: DeserializeOwned>(
        &self,
        request: RequestBuilder,
        what: &str,
        also: Option<StatusCode>,
    ) -> Result<T, ClientError> {
        let unreachable = |e: reqwest::Error| ClientError::Unreachable {
            url: self.base.to_string(),
            reason: crate::tls::error_chain(&e),
        };
        let response = request.send().await.map_err(unreachable)?;
        let status = response.status();
        let body = response.bytes().await.map_err(unreachable)?;
        if !status.is_success() && Some(status) != also {
            let message = serde_json::from_slice::<Value>(&body)
                .ok()
                .and_then(|v| v.get("error").and_then(Value::as_str).map(str::to_owned))
                .unwrap_or_else(|| String::from_utf8_lossy(&body).into_owned());
            return Err(ClientError::Api {
                status: status.as_u16(),
                message,
            });
        }
        serde_json::from_slice(&body).map_err(|e| ClientError::Answer {
            what: what.to_owned(),
            reason: e.to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_keep_the_fields_they_do_not_model() {
        let text = r#"{"key":"k","txn_id":"tx_1","region":"sgp","node":"12D3","hlc":"0001795711313012.00005",
            "fingerprint":"jcs:ab","confidence":0.5,"confidence_at_allocation":0.5,"state":"provisional",
            "role":"sole","replay":true,"new_field":{"x":1}}"#;
        let answer: Allocated = serde_json::from_str(text).unwrap();
        assert!(answer.replay);
        assert_eq!(answer.allocation.hlc, Timestamp::new(1795711313012, 5));
        assert_eq!(answer.allocation.extra["new_field"]["x"], 1);
        let again: Value = serde_json::to_value(&answer).unwrap();
        assert_eq!(again, serde_json::from_str::<Value>(text).unwrap());
    }

    #[test]
    fn urls_are_checked_and_keys_are_path_segments() {
        assert!(Client::new("127.0.0.1:7700").is_err());
        assert!(Client::new("ftp://host").is_err());
        let client = Client::new("http://127.0.0.1:7700/prefix/").unwrap();
        let request = client
            .request(Method::GET, &["v1", "allocations", "a/b?c%d"])
            .unwrap()
            .build()
            .unwrap();
        assert_eq!(
            request.url().as_str(),
            "http://127.0.0.1:7700/prefix/v1/allocations/a%2Fb%3Fc%25d"
        );
    }
}
