//! The `oncemesh` binary: parses the command line and hands over to
//! [`oncemesh::cli`]. Logs go to stderr (RUST_LOG filters them); stdout is
//! kept for what scripts read.

use clap::Parser;

#[tokio::main]
async fn main() {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "oncemesh=info,warn".into()),
        )
        .init();
    let cli = oncemesh::cli::Cli::parse();
    let code = match oncemesh::cli::run(cli).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            1
        }
    };
    std::process::exit(code);
}
