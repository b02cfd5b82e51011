//! `oncemesh demo`: the incident, replayed on one machine.

use clap::Args;

/// Options of the demo.
#[derive(Args, Debug)]
pub struct DemoArgs {
    /// Keep the demo's data dirs here instead of a temporary directory.
    #[arg(long)]
    pub data_dir: Option<std::path::PathBuf>,
}

/// Runs the demo.
pub async fn run(_args: DemoArgs) -> anyhow::Result<i32> {
    anyhow::bail!("the demo is not available yet")
}
