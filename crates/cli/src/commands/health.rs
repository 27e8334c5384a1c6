//! `lsplit health`: ask a trunk server's gRPC health service whether it serves, over TLS, for
//! container health checks, Kubernetes probes and scripts (exit status 0 only when SERVING).

use std::time::Duration;

use clap::Args;
use lsplit_remote::{ServingStatus, TRUNK_SERVICE, check_health};

use crate::args::CloudAuthArgs;

/// Options of `lsplit health`.
#[derive(Debug, Args)]
pub struct HealthArgs {
    /// The trunk server: https://HOST:PORT (http:// with --insecure)
    #[arg(value_name = "URL")]
    pub url: String,
    /// The service asked about (a diffusion server's is lsplit.diffusion.v1.DiffusionTrunk;
    /// "" is the server as a whole, which stays SERVING while it drains)
    #[arg(long, default_value = TRUNK_SERVICE)]
    pub service: String,
    /// Seconds to connect, and again to get the answer
    #[arg(long, value_name = "N", default_value_t = 5)]
    pub timeout_secs: u64,
    #[command(flatten)]
    pub auth: CloudAuthArgs,
}

/// Prints the status; fails unless it is SERVING.
pub fn run(args: HealthArgs) -> anyhow::Result<()> {
    let mut options = args.auth.files(&args.url)?.options()?;
    options.connect_timeout = Duration::from_secs(args.timeout_secs);
    options.step_timeout = Duration::from_secs(args.timeout_secs);
    let status = check_health(&options, &args.service)?;
    println!("{}", status.as_str_name());
    anyhow::ensure!(
        status == ServingStatus::Serving,
        "{} reports {} for {:?}",
        args.url,
        status.as_str_name(),
        args.service
    );
    Ok(())
}
