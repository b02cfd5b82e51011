//! The `oncemesh` command line: `run` starts a node, `id` prints its peer
//! id, the other subcommands are clients of a node's HTTP API, `demo`
//! replays the incident end to end on one machine, and `chaos` runs the
//! binary under faults on seeded schedules.

mod calibration;
mod chaos;
mod client;
mod demo;
mod status;
mod table;
mod watch;

use crate::config::RunArgs;
use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;

/// Exactly-once payment idempotency tokens across regions, with no coordinator.
#[derive(Parser, Debug)]
#[command(name = "oncemesh", version, about, long_about = None)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Start a node (one per region). Prints one line with its peer id, HTTP
    /// address and listen addresses, then logs to stderr until Ctrl-C/SIGTERM.
    ///
    /// Example: oncemesh run --region sgp --data-dir ./sgp --listen /ip4/0.0.0.0/tcp/7800
    ///   --peer /ip4/10.0.0.2/tcp/7800/p2p/12D3KooW...
    Run(Box<RunArgs>),
    /// Print this data dir's peer id (creating the identity if needed), to
    /// put in other nodes' --peer flags.
    Id {
        /// Data directory of the node.
        #[arg(long, default_value = "oncemesh-data")]
        data_dir: PathBuf,
    },
    /// Allocate a transaction for an idempotency key (201 new, 200 replay, 409 if
    /// the key was used with another payload).
    Allocate {
        /// The idempotency key (1-255 printable ASCII characters).
        key: String,
        /// The payload, a JSON object.
        #[arg(long, default_value = "{}")]
        payload: String,
        /// How to reach the node.
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Show the conflict report: keys allocated by more than one region, the
    /// winner, and each loser's compensation. With --watch, follow new
    /// conflicts and compensation outcomes as they happen (one line each,
    /// or one JSON object per line with --json) until Ctrl-C.
    Conflicts {
        /// Only open (not yet compensated) or resolved conflicts.
        #[arg(long, value_parser = ["open", "resolved"])]
        state: Option<String>,
        /// Follow the report instead of printing it once.
        #[arg(long)]
        watch: bool,
        /// How often --watch asks the node.
        #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
        interval: std::time::Duration,
        /// How to reach the node.
        #[command(flatten)]
        client: ClientArgs,
    },
    /// One screen for on-call: the node's verdict and every reason, a row
    /// per peer (connected, lag p50/p99, delta, clock offset), provisional /
    /// settled / conflicted counts, exposure, compensations. Exits 0 when ok,
    /// 2 when degraded, 3 when critical.
    Status {
        /// How to reach the node.
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Show how well this node's confidence held: per situation (in sync, some
    /// peers unreachable, isolated) the mean confidence given against the share
    /// that ended without a conflict, and per partition episode the duplicates
    /// expected against those found.
    Calibration {
        /// How to reach the node.
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Show each peer: region, connected, time out of sync, replication lag
    /// (now, p50, p99 over the last five minutes), store delta, clock offset.
    Peers {
        /// How to reach the node.
        #[command(flatten)]
        client: ClientArgs,
    },
    /// List compensations (every region's, as replicated here).
    Compensations {
        /// Only this state: pending, running, succeeded, failed, dead-lettered.
        #[arg(long)]
        state: Option<String>,
        /// How to reach the node.
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Send a dead-lettered compensation of this node back for another round
    /// of attempts (same idempotency key, so it cannot compensate twice).
    RetryCompensation {
        /// The losing transaction id.
        txn_id: String,
        /// How to reach the node.
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Run the incident on this machine: three regions as separate node
    /// processes, cross-region retries, a partition, a skewed clock, heal,
    /// and what every region reports afterwards.
    Demo(demo::DemoArgs),
    /// Run the real binary under faults from outside (partitions, delay,
    /// SIGKILL and restart, SIGSTOP pauses, clock skew, a full disk, a
    /// failing or hanging compensation endpoint) on seeded schedules, check
    /// the recorded history, and end with "N seeds, K failures".
    Chaos(chaos::ChaosArgs),
}

/// How to reach a node's API.
#[derive(Args, Debug, Clone)]
pub struct ClientArgs {
    /// Node API base URL.
    #[arg(
        long = "node",
        env = "ONCEMESH_NODE",
        default_value = "http://127.0.0.1:7700"
    )]
    pub node: String,
    /// Bearer token, if the node requires one.
    #[arg(long, env = "ONCEMESH_API_TOKEN", hide_env_values = true)]
    pub api_token: Option<String>,
    /// Print the API's JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// Runs a parsed command line; returns the process exit code.
pub async fn run(cli: Cli) -> anyhow::Result<i32> {
    match cli.command {
        Command::Run(args) => run_node(*args).await,
        Command::Id { data_dir } => {
            let keypair = crate::identity::load_or_create(&data_dir)?;
            println!("{}", keypair.public().to_peer_id());
            Ok(0)
        }
        Command::Allocate {
            key,
            payload,
            client,
        } => client::allocate(&client, &key, &payload).await,
        Command::Conflicts {
            state,
            watch: true,
            interval,
            client,
        } => watch::watch(&client, state.as_deref(), interval).await,
        Command::Conflicts { state, client, .. } => {
            client::conflicts(&client, state.as_deref()).await
        }
        Command::Status { client } => status::status(&client).await,
        Command::Peers { client } => status::peers(&client).await,
        Command::Calibration { client } => calibration::show(&client).await,
        Command::Compensations { state, client } => {
            client::compensations(&client, state.as_deref()).await
        }
        Command::RetryCompensation { txn_id, client } => client::retry(&client, &txn_id).await,
        Command::Demo(args) => demo::run(args).await,
        Command::Chaos(args) => chaos::run(args).await,
    }
}

async fn run_node(args: RunArgs) -> anyhow::Result<i32> {
    use std::io::Write;
    let config = args.resolve()?;
    let shutdown = tokio_util::sync::CancellationToken::new();
    let started = crate::node::start(config, shutdown.clone()).await?;
    println!("{}", started.banner());
    std::io::stdout().flush()?;
    tracing::info!(http = %started.http_addr, "node ready");
    wait_for_signal().await;
    tracing::info!("shutting down");
    shutdown.cancel();
    started.wait().await;
    Ok(0)
}

/// Returns on SIGINT (Ctrl-C) or SIGTERM.
async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
