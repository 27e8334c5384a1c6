//! `lsplit edge`: serve the model on this device (head and tail here, trunk in-process or on a
//! trunk server) as an OpenAI-compatible HTTP API and a web page, and with `--image-model` a
//! Stable Diffusion model split the same way.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::Args;
use lsplit_device::{DiffusionTrunkChoice, DiffusionTrunks};
use lsplit_diffusion::{DevicePipeline, UnetSplit};
use lsplit_edge::{EdgeConfig, EdgeGuard, EdgeServer, ImageModel};
use lsplit_split::{GenerateOptions, Speculate};
use lsplit_wire::StepCodec;

use crate::args::{DeviceArgs, LogArgs, SamplingArgs};

/// The exit status when a second signal cuts open requests off: 128 + SIGINT, as a shell
/// reports a process stopped by Ctrl-C.
const SECOND_SIGNAL_EXIT: i32 = 130;

/// Options of `lsplit edge`.
#[derive(Debug, Args)]
pub struct EdgeArgs {
    /// Address to serve on (port 0 picks a free port, printed at start); any address but
    /// loopback needs --api-key
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// Key every API request must carry as `Authorization: Bearer KEY` (visible to other
    /// users of this machine in the process list: prefer --api-key-file)
    #[arg(long, value_name = "KEY", conflicts_with = "api_key_file")]
    pub api_key: Option<String>,
    /// File holding the API key (its first line, surrounding whitespace trimmed), so that the
    /// key stays out of the command line
    #[arg(long, value_name = "FILE")]
    pub api_key_file: Option<PathBuf>,
    /// Another name the `model` field of requests accepts for the text model, listed in
    /// /v1/models (repeatable, as vLLM's)
    #[arg(long, value_name = "NAME")]
    pub served_model_name: Vec<String>,
    #[command(flatten)]
    pub log: LogArgs,
    #[command(flatten)]
    pub device: DeviceArgs,
    /// Sampling settings of requests that leave them out
    #[command(flatten)]
    pub sampling: SamplingArgs,
    /// Check tokens drafted on the device several per step, saving round trips to the trunk:
    /// off, auto (the source and length that pay over a remote trunk), lookup (n-gram matches
    /// in the prompt and output), lookahead (Jacobi iterations and their n-grams), early-exit
    /// (head straight into tail, skipping the trunk) or draft (--draft-model). The output is the
    /// same whichever is chosen
    #[arg(long, value_name = "SOURCE", default_value_t = Speculate::Off)]
    pub speculate: Speculate,
    /// Tokens a request generates when it does not set max_tokens
    #[arg(long, default_value_t = 256)]
    pub max_tokens: usize,
    /// Generations and images served (or waiting their turn) at the same time; more are
    /// answered 429
    #[arg(long, default_value_t = 4)]
    pub max_sessions: usize,
    /// A diffusers-format Stable Diffusion 1.x, 2.x or SDXL directory: serves
    /// /v1/images/generations and the page's image tab
    #[arg(long, value_name = "DIR")]
    pub image_model: Option<PathBuf>,
    /// How the image model's UNet is divided: none (all here), component (whole UNet in the
    /// trunk) or lambda:N (the UNet cut after N levels at each end)
    #[arg(
        long,
        value_name = "MODE",
        default_value = "lambda:1",
        requires = "image_model"
    )]
    pub unet_split: UnetSplit,
    /// Run the image model's trunk on this diffusion trunk server (https://HOST:PORT, `lsplit
    /// serve --model DIR`), with the --ca, --token-file and client certificate flags; the split
    /// comes from its handshake
    #[arg(
        long,
        value_name = "URL",
        requires = "image_model",
        conflicts_with = "unet_split"
    )]
    pub image_cloud: Option<String>,
    /// How the image model's step tensors are encoded on the wire: f32 (lossless), f16, bf16,
    /// fp8-e4m3, fp8-e5m2, int8..int2 (per tensor) or int8-ch..int2-ch (per channel)
    #[arg(
        long,
        value_name = "CODEC",
        default_value = "f32",
        requires = "image_model"
    )]
    pub step_codec: StepCodec,
    /// Images: most MiB an image's attention may allocate at once on this device (it grows
    /// with the square of the image area); larger images are refused
    #[arg(
        long,
        value_name = "MIB",
        default_value_t = 4096,
        requires = "image_model"
    )]
    pub max_attention_mib: u64,
    /// Another name the Host header may carry (repeatable); the listen address and, on
    /// loopback, localhost are always answered. Other names are refused against DNS rebinding
    #[arg(long, value_name = "HOST")]
    pub allowed_host: Vec<String>,
    /// A web origin (e.g. http://localhost:3000, or *) whose pages may call the API
    /// (repeatable); pages of other sites are refused
    #[arg(long, value_name = "ORIGIN")]
    pub cors_origin: Vec<String>,
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

/// Loads the diffusion model of `--image-model`, if any, with its trunk sessions: in-process, or
/// one connection to the trunk server of `--image-cloud` per image.
fn load_images(args: &EdgeArgs) -> anyhow::Result<Option<ImageModel>> {
    let Some(dir) = &args.image_model else {
        return Ok(None);
    };
    let device = candle_core::Device::Cpu;
    let codec = args.step_codec;
    // With --image-cloud the server's handshake says where the UNet is cut.
    let choice = match &args.image_cloud {
        Some(url) => DiffusionTrunkChoice::Cloud(args.device.trunk.auth.files(url)?),
        None => DiffusionTrunkChoice::Local(args.unet_split),
    };
    let trunks = DiffusionTrunks::load(dir, choice, codec, &device)?;
    let pipeline = DevicePipeline::load(dir, trunks.split(), codec, &device)
        .with_context(|| format!("loading the image model {}", dir.display()))?;
    Ok(Some(ImageModel {
        pipeline,
        model_id: model_id(dir),
        trunks,
        codec,
        max_attention_bytes: args.max_attention_mib.saturating_mul(1 << 20),
    }))
}

/// The API key of `--api-key` or `--api-key-file`, if either is given.
fn api_key(args: &EdgeArgs) -> anyhow::Result<Option<String>> {
    let Some(file) = &args.api_key_file else {
        return Ok(args.api_key.clone());
    };
    let text = std::fs::read_to_string(file)
        .with_context(|| format!("reading the API key file {}", file.display()))?;
    Ok(Some(text.lines().next().unwrap_or("").trim().to_string()))
}

/// Runs the command until SIGTERM or SIGINT; a second signal stops it at once.
pub fn run(args: EdgeArgs) -> anyhow::Result<()> {
    let api_key = api_key(&args)?;
    lsplit_edge::check_listen(args.listen, api_key.as_deref())?;
    let defaults = GenerateOptions {
        max_tokens: args.max_tokens,
        sampling: args.sampling.params()?,
        speculate: args.speculate,
        ..GenerateOptions::default()
    };
    anyhow::ensure!(args.max_tokens > 0, "--max-tokens must be at least 1");
    anyhow::ensure!(args.max_sessions > 0, "--max-sessions must be at least 1");
    args.device
        .trunk
        .auth
        .check_needed(!args.device.trunk.cloud.is_empty() || args.image_cloud.is_some())?;
    let images = load_images(&args)?;
    let device = args.device.load()?;
    let trunk_location = device.trunk_location();
    let split = match device.model.policy() {
        Some(_) => device.describe(),
        None => "none".to_string(),
    };
    let codec = device.model.codec();
    let model_id = model_id(&device.path);
    let image_line = images.as_ref().map_or_else(String::new, |i| {
        format!(
            "; images {}, unet split {}, step codec {}, trunk {}",
            i.model_id,
            i.split(),
            i.codec,
            i.trunks.location()
        )
    });
    let guard = EdgeGuard {
        listen: Some(args.listen),
        allowed_hosts: args.allowed_host.clone(),
        cors_origins: args.cors_origin.clone(),
    };
    let config = EdgeConfig {
        device,
        model_id: model_id.clone(),
        aliases: args.served_model_name.clone(),
        defaults,
        api_key,
        max_sessions: args.max_sessions,
        images,
    };
    let server = EdgeServer::guarded(config, guard);
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
             {trunk_location}{image_line})"
        );
        let (signalled, first_signal) = tokio::sync::oneshot::channel::<()>();
        let shutdown = async move {
            crate::signal::wait_for_signal().await;
            tracing::info!("shutting down: open requests finish; a second Ctrl-C stops at once");
            let _ = signalled.send(());
        };
        tokio::select! {
            served = server.serve(listener, shutdown) => served?,
            _ = async {
                if first_signal.await.is_ok() {
                    crate::signal::wait_for_signal().await;
                } else {
                    std::future::pending::<()>().await;
                }
            } => {
                tracing::warn!("second signal: stopping now, open requests are cut off");
                std::process::exit(SECOND_SIGNAL_EXIT);
            }
        }
        Ok(())
    })
}
