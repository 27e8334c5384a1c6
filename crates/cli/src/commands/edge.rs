//! `lsplit edge`: serve the model on this device (head and tail here, trunk in-process or on a
//! trunk server) as an OpenAI-compatible HTTP API and a web page.

use std::net::SocketAddr;
use std::path::Path;

use anyhow::Context;
use clap::Args;
use lsplit_edge::{EdgeConfig, EdgeServer, OpenTrunk};
use lsplit_split::GenerateOptions;

use crate::args::{ModelArgs, SamplingArgs, SplitArgs, TrunkArgs};
use crate::device::{self, Device};

/// Options of `lsplit edge`.
#[derive(Debug, Args)]
pub struct EdgeArgs {
    /// Address to serve on (port 0 picks a free port, printed at start); any address but
    /// loopback needs --api-key
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// Key every API request must carry as `Authorization: Bearer KEY`
    #[arg(long, value_name = "KEY")]
    pub api_key: Option<String>,
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub split: SplitArgs,
    /// Sampling settings of requests that leave them out
    #[command(flatten)]
    pub sampling: SamplingArgs,
    /// Tokens a request generates when it does not set max_tokens
    #[arg(long, default_value_t = 256)]
    pub max_tokens: usize,
    /// Generations served at the same time; more are answered 429
    #[arg(long, default_value_t = 4)]
    pub max_sessions: usize,
    #[command(flatten)]
    pub trunk: TrunkArgs,
}

/// The model's name in the API: the file name without its extension, or the directory's name.
fn model_id(path: &Path) -> String {
    let name = if path.is_dir() {
        path.file_name()
    } else {
        path.file_stem()
    };
    name.map_or_else(|| "model".to_string(), |n| n.to_string_lossy().into_owned())
}

/// Runs the command until SIGTERM or SIGINT.
pub fn run(args: EdgeArgs) -> anyhow::Result<()> {
    lsplit_edge::check_listen(args.listen, args.api_key.as_deref())?;
    let defaults = GenerateOptions {
        max_tokens: args.max_tokens,
        sampling: args.sampling.params()?,
    };
    anyhow::ensure!(args.max_tokens > 0, "--max-tokens must be at least 1");
    anyhow::ensure!(args.max_sessions > 0, "--max-sessions must be at least 1");
    let Device {
        path,
        model,
        trunks,
        ..
    } = device::load(&args.model, &args.split, &args.trunk, None)?;
    let trunk_location = trunks
        .as_ref()
        .map_or_else(|| "none (unsplit)".to_string(), |t| t.location());
    let split = model
        .plan()
        .map_or_else(|| "none".to_string(), |p| p.to_string());
    let codec = model.codec();
    let model_id = model_id(&path);
    let server = EdgeServer::new(EdgeConfig {
        model,
        model_id: model_id.clone(),
        trunks: trunks.map(|t| Box::new(move || t.open()) as OpenTrunk),
        trunk_location: trunk_location.clone(),
        defaults,
        api_key: args.api_key.clone(),
        max_sessions: args.max_sessions,
    });
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(args.listen)
            .await
            .with_context(|| format!("listening on {}", args.listen))?;
        let addr = listener.local_addr()?;
        println!(
            "lsplit edge: http://{addr} (model {model_id}, split {split}, codec {codec}, trunk \
             {trunk_location})"
        );
        server
            .serve(listener, async {
                crate::signal::wait_for_signal().await;
                tracing::info!("shutting down: open requests finish");
            })
            .await?;
        Ok(())
    })
}
