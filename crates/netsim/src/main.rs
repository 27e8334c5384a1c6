//! `lsplit-netsim`: forwards TCP with a one-way delay, jitter and a bandwidth cap, e.g. to put
//! an 80 ms round trip between `lsplit generate --cloud` and `lsplit serve` on one machine.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use lsplit_netsim::{Profile, serve};

/// Forward TCP from --listen to --to through a simulated link.
#[derive(Debug, Parser)]
#[command(version, about, long_about = None)]
struct Args {
    /// Address to listen on
    #[arg(long, default_value = "127.0.0.1:50100")]
    listen: SocketAddr,
    /// Address to forward to (a trunk server)
    #[arg(long)]
    to: SocketAddr,
    /// One-way delay in milliseconds (a round trip costs twice this)
    #[arg(long, default_value_t = 0.0)]
    delay_ms: f64,
    /// Uniform jitter of each chunk's delay, in milliseconds either way
    #[arg(long, default_value_t = 0.0)]
    jitter_ms: f64,
    /// Bandwidth cap each way, in kilobits per second
    #[arg(long)]
    rate_kbit: Option<f64>,
}

fn millis(ms: f64) -> anyhow::Result<Duration> {
    Duration::try_from_secs_f64(ms / 1e3).with_context(|| format!("{ms} ms is not a duration"))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let args = Args::parse();
    let profile = Profile {
        delay: millis(args.delay_ms)?,
        jitter: millis(args.jitter_ms)?,
        rate: match args.rate_kbit {
            Some(kbit) if kbit > 0.0 => Some((kbit * 1000.0 / 8.0) as u64),
            Some(kbit) => anyhow::bail!("--rate-kbit must be positive, not {kbit}"),
            None => None,
        },
    };
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    tracing::info!(listen = %args.listen, to = %args.to, ?profile, "forwarding");
    serve(listener, args.to, profile).await;
    Ok(())
}
