//! Node configuration: flags, an optional TOML file (`--config`), defaults,
//! and validation, so a bad value is refused at start with a message that
//! names it rather than discovered under load.

pub mod health;

use clap::Args;
use libp2p::{multiaddr::Protocol, Multiaddr, PeerId};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Configuration errors; each names the setting and the value.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The TOML file could not be read or parsed.
    #[error("config file {path}: {reason}")]
    File {
        /// File path.
        path: PathBuf,
        /// Cause.
        reason: String,
    },
    /// A setting has an invalid value.
    #[error("invalid {setting} '{value}': {reason}")]
    Invalid {
        /// Setting name, as the flag is spelled.
        setting: &'static str,
        /// Value given.
        value: String,
        /// What is wrong with it.
        reason: String,
    },
}

fn invalid(setting: &'static str, value: impl ToString, reason: impl ToString) -> ConfigError {
    ConfigError::Invalid {
        setting,
        value: value.to_string(),
        reason: reason.to_string(),
    }
}

/// Flags of `oncemesh run`. Every flag may also be set in the `--config`
/// TOML file under the same name with `_` for `-`; a flag on the command
/// line wins over the file.
#[derive(Args, Debug, Default, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct RunArgs {
    /// TOML file with any of these settings.
    #[arg(long, value_name = "FILE")]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// Region name shown in every allocation this node makes [default: local].
    #[arg(long)]
    pub region: Option<String>,
    /// Directory for the ledger, the compensation log and the node identity [default: ./oncemesh-data].
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// libp2p listen address [default: /ip4/127.0.0.1/tcp/0].
    #[arg(long, value_name = "MULTIADDR")]
    pub listen: Option<String>,
    /// A peer to dial and allow in, as MULTIADDR/p2p/PEERID (repeatable). Only these peers may connect.
    #[arg(long = "peer", value_name = "MULTIADDR/p2p/PEERID")]
    #[serde(default, rename = "peer")]
    pub peers: Vec<String>,
    /// HTTP API address [default: 127.0.0.1:7700].
    #[arg(long, value_name = "ADDR")]
    pub http: Option<String>,
    /// Bearer token required on every API request except /v1/health and /metrics.
    #[arg(long, env = "ONCEMESH_API_TOKEN", hide_env_values = true)]
    pub api_token: Option<String>,
    /// Read the bearer token from this file (e.g. a systemd credential,
    /// `%d/api-token`), so it appears on no command line.
    #[arg(long, value_name = "FILE", conflicts_with = "api_token")]
    pub api_token_file: Option<PathBuf>,
    /// Compensation action for this node's losing allocations: `log` or `webhook:URL` (http:// or https://) [default: log].
    #[arg(long, value_name = "log|webhook:URL")]
    pub compensation: Option<String>,
    /// Remote clocks further ahead than this count as skew violations, e.g. 500ms [default: 500ms].
    #[arg(long, value_name = "DURATION")]
    pub max_clock_offset: Option<String>,
    /// How long tokens are kept, e.g. 24h [default: 24h]. After it a key is
    /// forgotten everywhere and a new request for it is a new allocation.
    /// Every node of a cluster must use the same value (it sets the document
    /// time windows).
    #[arg(long, value_name = "DURATION")]
    pub retention: Option<String>,
    /// Anti-entropy period: how often in-sync checks run with each peer [default: 1s].
    #[arg(long, value_name = "DURATION")]
    pub sync_interval: Option<String>,
    /// Timeout of one webhook call [default: 10s].
    #[arg(long, value_name = "DURATION")]
    pub webhook_timeout: Option<String>,
    /// PEM bundle of the CA certificates an https:// webhook endpoint must
    /// chain to; replaces the system roots (for a private CA).
    #[arg(long, value_name = "FILE")]
    pub webhook_ca: Option<PathBuf>,
    /// PEM certificate (chain) this node presents to an https:// webhook
    /// endpoint that requires client certificates (mTLS).
    #[arg(long, value_name = "FILE")]
    pub webhook_client_cert: Option<PathBuf>,
    /// PEM private key of --webhook-client-cert.
    #[arg(long, value_name = "FILE")]
    pub webhook_client_key: Option<PathBuf>,
    /// Extra headers of every webhook call, such as `Authorization`: a
    /// The `[health]` section: thresholds and anomaly detection (TOML only;
    /// see `config::health`).
    #[arg(skip)]
    pub health: Option<crate::config::health::HealthFile>,
    /// `[webhook_headers]` table in the TOML file only, never a flag, since
    /// a command line is visible to every user of the machine.
    #[arg(skip)]
    #[serde(default)]
    pub webhook_headers: BTreeMap<String, String>,
    /// A file of extra webhook headers, one `Name: value` a line (`#`
    /// starts a comment), named in the TOML file only: credentials kept
    /// apart from the configuration, e.g. a mounted secret.
    #[arg(skip)]
    pub webhook_headers_file: Option<PathBuf>,
    /// Drill: run this node's clock ahead (e.g. 2s) or behind (e.g. -2s) of
    /// the host clock, to rehearse clock skew between regions [default: 0s].
    #[arg(long, value_name = "[-]DURATION", allow_hyphen_values = true)]
    pub drill_clock_offset: Option<String>,
    /// Attempts before a compensation is dead-lettered [default: 8].
    #[arg(long, value_name = "N")]
    pub compensation_max_attempts: Option<u32>,
    /// Wait after a compensation's first failed attempt; it doubles with each later one [default: 500ms].
    #[arg(long, value_name = "DURATION")]
    pub compensation_initial_backoff: Option<String>,
    /// Cap on the wait between compensation attempts (before jitter) [default: 60s].
    #[arg(long, value_name = "DURATION")]
    pub compensation_max_backoff: Option<String>,
    /// JSON pointer of a payload's amount, for the value at risk [default: /amount].
    #[arg(long, value_name = "POINTER")]
    pub amount_pointer: Option<String>,
    /// JSON pointer of a payload's currency, for the value at risk [default: /currency].
    #[arg(long, value_name = "POINTER")]
    pub currency_pointer: Option<String>,
}

/// How this node compensates its own losing allocations.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CompensationAction {
    /// Record the compensation only.
    Log,
    /// POST to this URL with an `Idempotency-Key` header.
    Webhook(String),
}

/// How webhook calls reach their endpoint beyond the URL: the TLS material
/// an https:// endpoint needs and the extra headers every call carries.
/// The files are read when the node starts ([`crate::compensation`]), so a
/// file that does not parse stops the node, naming the file.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WebhookOptions {
    /// CA bundle that replaces the system roots.
    pub ca: Option<PathBuf>,
    /// Client certificate and key for mTLS.
    pub client_identity: Option<ClientIdentity>,
    /// Extra request headers, in the order given.
    pub headers: Vec<Header>,
}

/// A client certificate (chain) and its private key, both PEM files.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClientIdentity {
    /// The certificate chain.
    pub cert: PathBuf,
    /// The private key.
    pub key: PathBuf,
}

/// An extra webhook header. Its value is usually a credential, so debug
/// output shows only the name.
#[derive(Clone, PartialEq, Eq)]
pub struct Header {
    /// Header name.
    pub name: String,
    /// Header value.
    pub value: String,
}

impl std::fmt::Debug for Header {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: <redacted>", self.name)
    }
}

/// Headers a webhook call sets itself; configuring them would break the
/// call's contract with the receiver.
const RESERVED_HEADERS: [&str; 5] = [
    "idempotency-key",
    "content-type",
    "content-length",
    "host",
    "transfer-encoding",
];

/// A peer from the allowlist.
#[derive(Clone, Debug)]
pub struct PeerAddress {
    /// Address to dial.
    pub addr: Multiaddr,
    /// Its identity; connections from any other identity are refused.
    pub peer_id: PeerId,
}

/// The validated configuration of a node.
#[derive(Clone, Debug)]
pub struct NodeConfig {
    /// Region name.
    pub region: String,
    /// Data directory.
    pub data_dir: PathBuf,
    /// libp2p listen address.
    pub listen: Multiaddr,
    /// Allowlisted peers.
    pub peers: Vec<PeerAddress>,
    /// HTTP API address.
    pub http: SocketAddr,
    /// Optional bearer token.
    pub api_token: Option<String>,
    /// Compensation action.
    pub compensation: CompensationAction,
    /// Clock skew bound.
    pub max_clock_offset: Duration,
    /// Token retention.
    pub retention: Duration,
    /// Anti-entropy period.
    pub sync_interval: Duration,
    /// Webhook call timeout.
    pub webhook_timeout: Duration,
    /// TLS material and extra headers of webhook calls.
    pub webhook: WebhookOptions,
    /// Attempts before dead-lettering.
    pub compensation_max_attempts: u32,
    /// Wait after the first failed compensation attempt.
    pub compensation_initial_backoff: Duration,
    /// Cap on the wait between compensation attempts.
    pub compensation_max_backoff: Duration,
    /// Drill offset of this node's clock, ms.
    pub drill_clock_offset_ms: i64,
    /// JSON pointer of a payload's amount.
    pub amount_pointer: String,
    /// JSON pointer of a payload's currency.
    pub currency_pointer: String,
    /// Health thresholds and anomaly detection.
    pub health: crate::config::health::HealthSettings,
}

impl RunArgs {
    /// Merges the `--config` file under the flags and validates the result.
    pub fn resolve(self) -> Result<NodeConfig, ConfigError> {
        let merged = match self.config.clone() {
            Some(path) => self.over(read_file(&path)?),
            None => self,
        };
        merged.validate()
    }

    fn over(self, file: RunArgs) -> RunArgs {
        RunArgs {
            config: self.config,
            region: self.region.or(file.region),
            data_dir: self.data_dir.or(file.data_dir),
            listen: self.listen.or(file.listen),
            peers: if self.peers.is_empty() {
                file.peers
            } else {
                self.peers
            },
            http: self.http.or(file.http),
            api_token: self.api_token.or(file.api_token),
            api_token_file: self.api_token_file.or(file.api_token_file),
            compensation: self.compensation.or(file.compensation),
            max_clock_offset: self.max_clock_offset.or(file.max_clock_offset),
            retention: self.retention.or(file.retention),
            sync_interval: self.sync_interval.or(file.sync_interval),
            webhook_timeout: self.webhook_timeout.or(file.webhook_timeout),
            webhook_ca: self.webhook_ca.or(file.webhook_ca),
            webhook_client_cert: self.webhook_client_cert.or(file.webhook_client_cert),
            webhook_client_key: self.webhook_client_key.or(file.webhook_client_key),
            webhook_headers: file.webhook_headers,
            webhook_headers_file: file.webhook_headers_file,
            drill_clock_offset: self.drill_clock_offset.or(file.drill_clock_offset),
            compensation_max_attempts: self
                .compensation_max_attempts
                .or(file.compensation_max_attempts),
            compensation_initial_backoff: self
                .compensation_initial_backoff
                .or(file.compensation_initial_backoff),
            compensation_max_backoff: self
                .compensation_max_backoff
                .or(file.compensation_max_backoff),
            amount_pointer: self.amount_pointer.or(file.amount_pointer),
            currency_pointer: self.currency_pointer.or(file.currency_pointer),
            health: self.health.or(file.health),
        }
    }

    fn validate(self) -> Result<NodeConfig, ConfigError> {
        let region = self.region.unwrap_or_else(|| "local".into());
        if !is_valid_region(&region) {
            return Err(invalid(
                "--region",
                &region,
                "use 1 to 64 characters of letters, digits, '-', '_' or '.'",
            ));
        }
        let listen_text = self.listen.unwrap_or_else(|| "/ip4/127.0.0.1/tcp/0".into());
        let listen: Multiaddr = listen_text
            .parse()
            .map_err(|e| invalid("--listen", &listen_text, e))?;
        let peers = self
            .peers
            .iter()
            .map(|p| parse_peer(p))
            .collect::<Result<Vec<_>, _>>()?;
        let http_text = self.http.unwrap_or_else(|| "127.0.0.1:7700".into());
        let http = http_text
            .parse()
            .map_err(|e| invalid("--http", &http_text, e))?;
        let compensation = match self.compensation.as_deref().unwrap_or("log") {
            "log" => CompensationAction::Log,
            other => match other.strip_prefix("webhook:") {
                Some(url) if url.starts_with("http://") || url.starts_with("https://") => {
                    CompensationAction::Webhook(url.to_owned())
                }
                _ => {
                    return Err(invalid(
                        "--compensation",
                        other,
                        "expected 'log', 'webhook:http://...' or 'webhook:https://...'",
                    ))
                }
            },
        };
        let webhook = webhook_options(
            &compensation,
            self.webhook_ca,
            self.webhook_client_cert,
            self.webhook_client_key,
            self.webhook_headers,
            self.webhook_headers_file,
        )?;
        let api_token = match (&self.api_token, &self.api_token_file) {
            (Some(_), Some(path)) => {
                return Err(invalid(
                    "--api-token-file",
                    path.display(),
                    "give --api-token or --api-token-file, not both",
                ))
            }
            (_, Some(path)) => Some(read_token(path)?),
            (token, None) => token.clone(),
        };
        if api_token.as_deref() == Some("") {
            return Err(invalid("--api-token", "", "must not be empty"));
        }
        let attempts = self.compensation_max_attempts.unwrap_or(8);
        if attempts == 0 {
            return Err(invalid(
                "--compensation-max-attempts",
                0,
                "must be at least 1",
            ));
        }
        let initial_backoff = duration(
            "--compensation-initial-backoff",
            self.compensation_initial_backoff,
            "500ms",
        )?;
        let max_backoff = duration(
            "--compensation-max-backoff",
            self.compensation_max_backoff,
            "60s",
        )?;
        if initial_backoff > max_backoff {
            return Err(invalid(
                "--compensation-initial-backoff",
                humantime::format_duration(initial_backoff),
                format!(
                    "must not exceed --compensation-max-backoff ({})",
                    humantime::format_duration(max_backoff)
                ),
            ));
        }
        let amount_pointer = self.amount_pointer.unwrap_or_else(|| "/amount".into());
        let currency_pointer = self.currency_pointer.unwrap_or_else(|| "/currency".into());
        for (setting, pointer) in [
            ("--amount-pointer", &amount_pointer),
            ("--currency-pointer", &currency_pointer),
        ] {
            crate::exposure::Pricing::new(pointer, "").map_err(|e| invalid(setting, pointer, e))?;
        }
        Ok(NodeConfig {
            region,
            data_dir: self.data_dir.unwrap_or_else(|| "oncemesh-data".into()),
            listen,
            peers,
            http,
            api_token,
            compensation,
            max_clock_offset: duration("--max-clock-offset", self.max_clock_offset, "500ms")?,
            retention: duration("--retention", self.retention, "24h")?,
            sync_interval: duration("--sync-interval", self.sync_interval, "1s")?,
            webhook_timeout: duration("--webhook-timeout", self.webhook_timeout, "10s")?,
            webhook,
            compensation_max_attempts: attempts,
            compensation_initial_backoff: initial_backoff,
            compensation_max_backoff: max_backoff,
            drill_clock_offset_ms: signed_ms(self.drill_clock_offset)?,
            amount_pointer,
            currency_pointer,
            health: self.health.unwrap_or_default().validate()?,
        })
    }
}

/// Whether `region` may name a region: 1 to 64 letters, digits, '-', '_'
/// or '.'. Peers report their region and it becomes a metric label, so
/// what a peer sends is held to the same rule.
pub fn is_valid_region(region: &str) -> bool {
    (1..=64).contains(&region.len())
        && region
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
}

/// The token in `path`, without the line end an editor leaves.
fn read_token(path: &Path) -> Result<String, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError::File {
        path: path.to_owned(),
        reason: e.to_string(),
    })?;
    Ok(text.trim_end_matches(['\r', '\n']).to_owned())
}

/// Checks the webhook settings against the action: TLS material only for
/// an https:// endpoint, a client certificate with its key, headers with
/// valid names and values that the call does not set itself.
fn webhook_options(
    action: &CompensationAction,
    ca: Option<PathBuf>,
    client_cert: Option<PathBuf>,
    client_key: Option<PathBuf>,
    headers: BTreeMap<String, String>,
    headers_file: Option<PathBuf>,
) -> Result<WebhookOptions, ConfigError> {
    let https = matches!(action, CompensationAction::Webhook(url) if url.starts_with("https://"));
    let webhook = matches!(action, CompensationAction::Webhook(_));
    for (setting, given) in [
        ("--webhook-ca", &ca),
        ("--webhook-client-cert", &client_cert),
        ("--webhook-client-key", &client_key),
    ] {
        if let (Some(path), false) = (given, https) {
            return Err(invalid(
                setting,
                path.display(),
                "is only used by a --compensation webhook:https://... endpoint",
            ));
        }
    }
    let client_identity = match (client_cert, client_key) {
        (Some(cert), Some(key)) => Some(ClientIdentity { cert, key }),
        (None, None) => None,
        (Some(cert), None) => {
            return Err(invalid(
                "--webhook-client-cert",
                cert.display(),
                "needs --webhook-client-key as well",
            ))
        }
        (None, Some(key)) => {
            return Err(invalid(
                "--webhook-client-key",
                key.display(),
                "needs --webhook-client-cert as well",
            ))
        }
    };
    let mut all: Vec<Header> = headers
        .into_iter()
        .map(|(name, value)| Header { name, value })
        .collect();
    if let Some(path) = headers_file {
        all.extend(read_headers_file(&path)?);
    }
    if !all.is_empty() && !webhook {
        return Err(invalid(
            "webhook_headers",
            all.iter()
                .map(|h| h.name.as_str())
                .collect::<Vec<_>>()
                .join(", "),
            "are only sent by a --compensation webhook:... action",
        ));
    }
    for header in &all {
        check_header(header)?;
    }
    Ok(WebhookOptions {
        ca,
        client_identity,
        headers: all,
    })
}

/// Reads `Name: value` lines; blank lines and lines starting with `#` are
/// skipped. The error names the file and the line, never a value.
fn read_headers_file(path: &Path) -> Result<Vec<Header>, ConfigError> {
    let file_error = |reason: String| ConfigError::File {
        path: path.to_owned(),
        reason,
    };
    let text = std::fs::read_to_string(path).map_err(|e| file_error(e.to_string()))?;
    let mut headers = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let Some((name, value)) = line.split_once(':') else {
            return Err(file_error(format!(
                "line {}: expected `Name: value`",
                n + 1
            )));
        };
        headers.push(Header {
            name: name.trim().to_owned(),
            value: value.trim().to_owned(),
        });
    }
    Ok(headers)
}

fn check_header(header: &Header) -> Result<(), ConfigError> {
    let name = reqwest::header::HeaderName::from_bytes(header.name.as_bytes())
        .map_err(|e| invalid("webhook header name", &header.name, e))?;
    if RESERVED_HEADERS.contains(&name.as_str()) {
        return Err(invalid(
            "webhook header name",
            &header.name,
            "is set by every webhook call itself",
        ));
    }
    if reqwest::header::HeaderValue::from_str(&header.value).is_err() {
        // The value is not repeated: it is usually a credential.
        return Err(invalid(
            "webhook header value",
            &header.name,
            "the value must be visible ASCII (or spaces and tabs)",
        ));
    }
    Ok(())
}

fn read_file(path: &Path) -> Result<RunArgs, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError::File {
        path: path.to_owned(),
        reason: e.to_string(),
    })?;
    toml::from_str(&text).map_err(|e| ConfigError::File {
        path: path.to_owned(),
        reason: e.to_string(),
    })
}

fn duration(
    setting: &'static str,
    value: Option<String>,
    default: &str,
) -> Result<Duration, ConfigError> {
    let text = value.unwrap_or_else(|| default.to_owned());
    let parsed = humantime::parse_duration(&text).map_err(|e| invalid(setting, &text, e))?;
    if parsed.is_zero() {
        return Err(invalid(setting, &text, "must be greater than zero"));
    }
    Ok(parsed)
}

fn signed_ms(value: Option<String>) -> Result<i64, ConfigError> {
    let Some(text) = value else {
        return Ok(0);
    };
    let (sign, magnitude) = match text.strip_prefix('-') {
        Some(rest) => (-1, rest),
        None => (1, text.strip_prefix('+').unwrap_or(&text)),
    };
    let parsed = humantime::parse_duration(magnitude)
        .map_err(|e| invalid("--drill-clock-offset", &text, e))?;
    Ok(sign * i64::try_from(parsed.as_millis()).unwrap_or(i64::MAX))
}

/// Parses `MULTIADDR/p2p/PEERID` into the address to dial and the identity.
pub fn parse_peer(text: &str) -> Result<PeerAddress, ConfigError> {
    let mut addr: Multiaddr = text.parse().map_err(|e| invalid("--peer", text, e))?;
    match addr.pop() {
        Some(Protocol::P2p(peer_id)) => Ok(PeerAddress { addr, peer_id }),
        _ => Err(invalid(
            "--peer",
            text,
            "must end with /p2p/PEERID (see `oncemesh id`)",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_make_a_working_single_node() {
        let config = RunArgs::default().resolve().unwrap();
        assert_eq!(config.region, "local");
        assert_eq!(config.http.to_string(), "127.0.0.1:7700");
        assert_eq!(config.max_clock_offset, Duration::from_millis(500));
        assert_eq!(config.retention, Duration::from_secs(24 * 3600));
        assert_eq!(config.compensation, CompensationAction::Log);
        assert!(config.peers.is_empty());
    }

    #[test]
    fn bad_values_name_the_setting() {
        let bad = RunArgs {
            retention: Some("forever".into()),
            ..RunArgs::default()
        };
        let err = bad.resolve().unwrap_err().to_string();
        assert!(
            err.contains("--retention") && err.contains("forever"),
            "{err}"
        );
        let bad = RunArgs {
            peers: vec!["/ip4/127.0.0.1/tcp/1".into()],
            ..RunArgs::default()
        };
        assert!(bad
            .resolve()
            .unwrap_err()
            .to_string()
            .contains("/p2p/PEERID"));
        let bad = RunArgs {
            compensation: Some("email".into()),
            ..RunArgs::default()
        };
        assert!(bad.resolve().is_err());
    }

    #[test]
    fn https_webhooks_take_tls_files_and_headers_from_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let secrets = dir.path().join("headers");
        std::fs::write(&secrets, "# credentials\nX-Api-Key: k-123\n\n").unwrap();
        let path = dir.path().join("node.toml");
        std::fs::write(
            &path,
            format!(
                "compensation = \"webhook:https://refunds.example/void\"\nwebhook_ca = \"ca.pem\"\nwebhook_headers_file = {:?}\n[webhook_headers]\nAuthorization = \"Bearer s3cret\"\n",
                secrets.display().to_string()
            ),
        )
        .unwrap();
        let config = RunArgs {
            config: Some(path),
            ..RunArgs::default()
        }
        .resolve()
        .unwrap();
        assert_eq!(
            config.compensation,
            CompensationAction::Webhook("https://refunds.example/void".into())
        );
        assert_eq!(config.webhook.ca, Some(PathBuf::from("ca.pem")));
        let names: Vec<&str> = config
            .webhook
            .headers
            .iter()
            .map(|h| h.name.as_str())
            .collect();
        assert_eq!(names, ["Authorization", "X-Api-Key"]);
        assert_eq!(config.webhook.headers[1].value, "k-123");
        assert!(
            !format!("{config:?}").contains("s3cret"),
            "debug output hides header values"
        );
    }

    #[test]
    fn webhook_settings_that_cannot_work_are_refused() {
        let https = || RunArgs {
            compensation: Some("webhook:https://refunds.example/void".into()),
            ..RunArgs::default()
        };
        let plain_with_ca = RunArgs {
            compensation: Some("webhook:http://127.0.0.1:9/void".into()),
            webhook_ca: Some("ca.pem".into()),
            ..RunArgs::default()
        };
        let err = plain_with_ca.resolve().unwrap_err().to_string();
        assert!(
            err.contains("--webhook-ca") && err.contains("https"),
            "{err}"
        );
        let cert_only = RunArgs {
            webhook_client_cert: Some("me.pem".into()),
            ..https()
        };
        assert!(cert_only
            .resolve()
            .unwrap_err()
            .to_string()
            .contains("--webhook-client-key"));
        for (name, value) in [
            ("Idempotency-Key", "x"),
            ("bad name", "x"),
            ("X-Ok", "line\nbreak"),
        ] {
            let bad = RunArgs {
                webhook_headers: BTreeMap::from([(name.to_owned(), value.to_owned())]),
                ..https()
            };
            let err = bad.resolve().unwrap_err().to_string();
            assert!(err.contains(name) && !err.contains("break"), "{err}");
        }
        let headers_for_log = RunArgs {
            webhook_headers: BTreeMap::from([("Authorization".to_owned(), "x".to_owned())]),
            ..RunArgs::default()
        };
        assert!(headers_for_log.resolve().is_err());
    }

    #[test]
    fn the_api_token_can_come_from_a_file_and_health_from_its_section() {
        let dir = tempfile::tempdir().unwrap();
        let token = dir.path().join("api-token");
        std::fs::write(&token, "s3cret\n").unwrap();
        let path = dir.path().join("node.toml");
        std::fs::write(
            &path,
            format!(
                "api_token_file = {:?}\n[health]\nlag_threshold = \"3s\"\n[health.anomaly]\nk = 2.5\n",
                token
            ),
        )
        .unwrap();
        let config = RunArgs {
            config: Some(path),
            ..RunArgs::default()
        }
        .resolve()
        .unwrap();
        assert_eq!(config.api_token.as_deref(), Some("s3cret"));
        assert_eq!(config.health.lag_threshold, Duration::from_secs(3));
        assert_eq!(config.health.lag.k, 2.5);
        let both = RunArgs {
            api_token: Some("x".into()),
            api_token_file: Some(token),
            ..RunArgs::default()
        };
        assert!(both.resolve().is_err());
    }

    #[test]
    fn the_example_deployment_files_are_valid_and_state_the_defaults() {
        for region in ["sgp", "lon", "nyc"] {
            let path = Path::new(env!("CARGO_MANIFEST_DIR"))
                .join(format!("examples/deploy/{region}.toml"));
            let config = RunArgs {
                config: Some(path),
                ..RunArgs::default()
            }
            .resolve()
            .unwrap_or_else(|e| panic!("{region}: {e}"));
            assert_eq!(config.region, region);
            assert_eq!(config.peers.len(), 2);
            // The files spell out the [health] defaults: they must be the code's.
            assert_eq!(
                config.health,
                crate::config::health::HealthSettings::default()
            );
        }
    }

    #[test]
    fn flags_override_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.toml");
        std::fs::write(&path, "region = \"lon\"\nhttp = \"127.0.0.1:9000\"\n").unwrap();
        let config = RunArgs {
            config: Some(path),
            http: Some("127.0.0.1:9001".into()),
            ..RunArgs::default()
        }
        .resolve()
        .unwrap();
        assert_eq!(config.region, "lon");
        assert_eq!(config.http.port(), 9001);
    }
}
