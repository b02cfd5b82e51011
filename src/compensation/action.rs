//! The compensation actions: `log` records only; `webhook` POSTs to the
//! operator's refund/void endpoint with a stable `Idempotency-Key`, so the
//! receiver can deduplicate retries and restarts.
//!
//! An https:// endpoint is reached with rustls ([`crate::tls`]): the system
//! roots or a private CA bundle, and a client certificate where the
//! endpoint asks for one. The TLS files are read once, when the node
//! starts, so a file that does not parse stops the node instead of failing
//! every compensation later.

use super::machine::Outcome;
use crate::config::{CompensationAction, WebhookOptions};
use crate::record::AllocationRecord;
use reqwest::header::{HeaderMap, HeaderName, HeaderValue};
use serde_json::json;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Why the webhook client could not be set up; each names the file.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    /// A TLS file could not be read.
    #[error("webhook {what} {path}: {reason}")]
    Read {
        /// Which setting the file belongs to.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// Cause.
        reason: String,
    },
    /// A TLS file was read but holds no usable PEM material.
    #[error("webhook {what} {path} does not parse: {reason}")]
    Parse {
        /// Which setting the file belongs to.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// Cause.
        reason: String,
    },
    /// The HTTP client refused the material (e.g. a CA that is not a
    /// certificate, or a key that does not match its certificate).
    #[error("webhook client: {0}")]
    Client(String),
}

/// Runs compensation actions of one kind.
pub enum Executor {
    /// Record only.
    Log,
    /// POST to `url`.
    Webhook {
        /// The endpoint.
        url: String,
        /// Client with the TLS material and timeout.
        client: reqwest::Client,
        /// Extra headers of every call.
        headers: HeaderMap,
    },
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
    /// An executor for `action`, with `timeout` per webhook call and the
    /// TLS material and headers of `options`, read from disk now.
    pub fn new(
        action: &CompensationAction,
        options: &WebhookOptions,
        timeout: Duration,
    ) -> Result<Self, SetupError> {
        let url = match action {
            CompensationAction::Log => return Ok(Self::Log),
            CompensationAction::Webhook(url) => url.clone(),
        };
        let mut builder = crate::tls::http_client().timeout(timeout);
        if let Some(path) = &options.ca {
            let bytes = read("CA file", path)?;
            let roots = reqwest::Certificate::from_pem_bundle(&bytes)
                .map_err(|e| parse_error("CA file", path, crate::tls::error_chain(&e)))?;
            if roots.is_empty() {
                return Err(parse_error(
                    "CA file",
                    path,
                    "no PEM certificate (-----BEGIN CERTIFICATE-----) in it".into(),
                ));
            }
            // Only these roots: a private CA must not widen to every public one.
            builder = builder.tls_certs_only(roots);
        }
        if let Some(identity) = &options.client_identity {
            let mut pem = read("client certificate", &identity.cert)?;
            pem.push(b'\n');
            pem.extend(read("client key", &identity.key)?);
            let parsed = reqwest::Identity::from_pem(&pem).map_err(|e| {
                parse_error(
                    "client certificate and key",
                    &identity.cert,
                    format!(
                        "{} (with key {})",
                        crate::tls::error_chain(&e),
                        identity.key.display()
                    ),
                )
            })?;
            builder = builder.identity(parsed);
        }
        let client = builder
            .build()
            .map_err(|e| SetupError::Client(describe_setup_failure(options, &e)))?;
        let mut headers = HeaderMap::new();
        for header in &options.headers {
            // config/ checked both; a failure here would be a bug there.
            let (Ok(name), Ok(mut value)) = (
                HeaderName::from_bytes(header.name.as_bytes()),
                HeaderValue::from_str(&header.value),
            ) else {
                return Err(SetupError::Client(format!(
                    "header {} is not a valid HTTP header",
                    header.name
                )));
            };
            value.set_sensitive(true);
            headers.append(name, value);
        }
        Ok(Self::Webhook {
            url,
            client,
            headers,
        })
    }

    /// Runs the action once. Never panics; every failure is an outcome.
    pub async fn run(&self, subject: &Subject<'_>) -> Outcome {
        match self {
            Self::Log => {
                tracing::info!(
                    key = %subject.loser.key,
                    loser = %subject.loser.txn_id,
                    winner = %subject.winner.txn_id,
                    idempotency_key = subject.idempotency_key,
                    "compensation recorded (log action): void the losing transaction"
                );
                Outcome::Success
            }
            Self::Webhook {
                url,
                client,
                headers,
            } => {
                let body = json!({
                    "type": "oncemesh.compensation",
                    "idempotency_key": subject.idempotency_key,
                    "attempt": subject.attempt,
                    "key": subject.loser.key,
                    "loser": subject.loser,
                    "winner": subject.winner,
                });
                let sent = client
                    .post(url)
                    .headers(headers.clone())
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
                    Err(e) => Outcome::Retryable(describe_call_failure(url, &e)),
                }
            }
        }
    }
}

/// The `last_error` of a call that got no answer: a TLS failure says so
/// first, since it will not pass by itself as a timeout might.
fn describe_call_failure(url: &str, error: &reqwest::Error) -> String {
    let chain = crate::tls::error_chain(error);
    if crate::tls::is_tls_failure(error) {
        format!("webhook {url}: TLS error: {chain}")
    } else {
        format!("webhook {url}: {chain}")
    }
}

/// A client the builder refused: name the files it was given, since the
/// builder's message does not.
fn describe_setup_failure(options: &WebhookOptions, error: &reqwest::Error) -> String {
    let mut files: Vec<String> = Vec::new();
    if let Some(ca) = &options.ca {
        files.push(format!("CA file {}", ca.display()));
    }
    if let Some(identity) = &options.client_identity {
        files.push(format!(
            "client certificate {} and key {}",
            identity.cert.display(),
            identity.key.display()
        ));
    }
    let chain = crate::tls::error_chain(error);
    if files.is_empty() {
        chain
    } else {
        format!("{chain} (check {})", files.join(", "))
    }
}

fn read(what: &'static str, path: &Path) -> Result<Vec<u8>, SetupError> {
    std::fs::read(path).map_err(|e| SetupError::Read {
        what,
        path: path.to_owned(),
        reason: e.to_string(),
    })
}

fn parse_error(what: &'static str, path: &Path, reason: String) -> SetupError {
    SetupError::Parse {
        what,
        path: path.to_owned(),
        reason,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ClientIdentity;

    fn https() -> CompensationAction {
        CompensationAction::Webhook("https://127.0.0.1:9/void".into())
    }

    /// The message of the error setting up a webhook with `options`.
    fn setup_error(options: &WebhookOptions) -> String {
        Executor::new(&https(), options, Duration::from_secs(1))
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default()
    }

    #[test]
    fn tls_files_that_do_not_parse_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let garbage = dir.path().join("ca.pem");
        std::fs::write(&garbage, "not a certificate\n").unwrap();
        let broken = dir.path().join("broken.pem");
        std::fs::write(
            &broken,
            "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        let missing = dir.path().join("missing.pem");
        for path in [&garbage, &broken, &missing] {
            let options = WebhookOptions {
                ca: Some(path.clone()),
                ..WebhookOptions::default()
            };
            let err = setup_error(&options);
            assert!(err.contains(&path.display().to_string()), "{err}");
        }
        let options = WebhookOptions {
            client_identity: Some(ClientIdentity {
                cert: garbage.clone(),
                key: missing.clone(),
            }),
            ..WebhookOptions::default()
        };
        let err = setup_error(&options);
        assert!(err.contains(&missing.display().to_string()), "{err}");
    }

    #[test]
    fn system_roots_serve_when_no_ca_is_given() {
        let executor = Executor::new(&https(), &WebhookOptions::default(), Duration::from_secs(1));
        assert!(matches!(executor, Ok(Executor::Webhook { .. })));
        let log = Executor::new(
            &CompensationAction::Log,
            &WebhookOptions::default(),
            Duration::from_secs(1),
        );
        assert!(matches!(log, Ok(Executor::Log)));
    }
}
