//! `lsplit serve`: hold only the trunk layers of a split model and serve them to devices.
//!
//! A GGUF file or Hugging Face directory serves a language model's trunk layers; a diffusers
//! directory (one with `model_index.json`) serves the trunk of its UNet for `--unet-split`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use lsplit_diffusion::{UnetSplit, load_trunk_model, trunk_fingerprint};
use lsplit_model::{ComputeDevice, KvPrecision, ModelSource, SplitPlan, TrunkFingerprint};
use lsplit_server::{
    Access, DiffusionLimits, DiffusionOptions, DiffusionServer, Limits, ServerError, ServerOptions,
    ServerStats, TlsFiles, TrainingLimits, TransportLimits, TrunkServer,
};
use lsplit_wire::{Codec, StepCodec};

use lsplit_split::SplitPolicy;

use crate::args::{DEFAULT_LOCAL_LAYERS, LogArgs, PolicyKind};

/// How long open sessions may run on after SIGTERM/SIGINT before the server exits anyway.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// Options of `lsplit serve`.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// A GGUF file, a Hugging Face model directory or a diffusers directory (with
    /// model_index.json) [default: SmolLM2-135M-Instruct Q4_1, fetched on first use]
    #[arg(long, short = 'm', value_name = "PATH")]
    pub model: Option<PathBuf>,
    /// Diffusion models: the UNet's part served, component (the whole UNet with guidance) or
    /// lambda:N (its middle, cut after N levels at each end) [default: lambda:1]
    #[arg(long, value_name = "SPLIT")]
    pub unet_split: Option<UnetSplit>,
    /// The trunk's layers K1:K2 [default: all but 2 layers at each end]
    #[arg(long, value_name = "K1:K2", conflicts_with = "k1")]
    pub split: Option<String>,
    /// fixed serves --split; random serves every layer a draw from --k1 and --k2 may need
    #[arg(long, value_enum, default_value_t = PolicyKind::Fixed)]
    pub split_policy: PolicyKind,
    /// Layers K1 is drawn from with --split-policy random, e.g. 1,2,3,4
    #[arg(long, value_name = "LIST", requires = "k2")]
    pub k1: Option<String>,
    /// Layers K2 is drawn from with --split-policy random, e.g. 26,27,28,29
    #[arg(long, value_name = "LIST", requires = "k1")]
    pub k2: Option<String>,
    /// Address to listen on (port 0 picks a free port, printed at start)
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:50051")]
    pub listen: SocketAddr,
    /// TLS certificate chain (PEM), e.g. server.pem from `lsplit cert`
    #[arg(long, value_name = "FILE", required_unless_present = "insecure")]
    pub cert: Option<PathBuf>,
    /// TLS private key (PEM), e.g. server.key from `lsplit cert`
    #[arg(long, value_name = "FILE", required_unless_present = "insecure")]
    pub key: Option<PathBuf>,
    /// File holding the bearer token every device must present
    #[arg(long, value_name = "FILE")]
    pub token_file: Option<PathBuf>,
    /// Require client certificates signed by this CA (mutual TLS)
    #[arg(long, value_name = "FILE", requires = "cert")]
    pub client_ca: Option<PathBuf>,
    /// Serve plaintext gRPC without TLS: hidden states travel unencrypted
    #[arg(long, conflicts_with_all = ["cert", "key", "client_ca"])]
    pub insecure: bool,
    /// Codecs offered to devices [default: f32,f16,bf16,int8 for a language model; every step
    /// codec (f32, f16, bf16, fp8-e4m3, fp8-e5m2, int8..int2, int8-ch..int2-ch) for a
    /// diffusion model]
    #[arg(long, value_name = "LIST", value_delimiter = ',')]
    pub codecs: Option<Vec<String>>,
    /// Sessions served at the same time
    #[arg(long, default_value_t = 16)]
    pub max_sessions: usize,
    /// Positions one session may reach [default: the model's context length]
    #[arg(long)]
    pub max_context: Option<usize>,
    /// Largest message accepted, in bytes [default: 16 MiB for a language model, 128 MiB for a
    /// diffusion model]
    #[arg(long)]
    pub max_message_bytes: Option<usize>,
    /// Diffusion models: most tensor elements one setup or step may declare [default: 32 Mi]
    #[arg(long)]
    pub max_step_elements: Option<u64>,
    /// Diffusion models: most MiB a step's attention may allocate at once (it grows with the
    /// square of the image area) [default: 4096]
    #[arg(long)]
    pub max_attention_mib: Option<u64>,
    /// Seconds a session may stay silent before it is closed (and its KV cache freed)
    #[arg(long, default_value_t = 300)]
    pub idle_timeout_secs: u64,
    /// Precision of the trunk's KV caches: f32 (exact), f16 (half the memory and the reads of
    /// a long context, values rounded to half precision) or q8 (8-bit values with a scale per
    /// 32: 0.28x f32's memory) [default: f32]
    #[arg(long, value_name = "PRECISION")]
    pub kv_cache: Option<KvPrecision>,
    /// A public LoRA adapter in PEFT's format for the trunk's own layers (it may update no
    /// other); the fingerprint devices check then covers it, so only devices that hold the
    /// same adapter's trunk share connect
    #[arg(long, value_name = "DIR")]
    pub adapter: Option<PathBuf>,
    /// Where the trunk of a language model computes: cpu, or a GPU (cuda, cuda:N) in a build
    /// with the `cuda` feature (scripts/build-cuda.sh). Only the trunk's layers go to the GPU;
    /// its KV caches stay in host memory
    #[arg(long, value_name = "DEVICE", default_value_t = ComputeDevice::Cpu)]
    pub device: ComputeDevice,
    /// MiB all sessions' KV caches may hold together
    #[arg(long, default_value_t = 2048)]
    pub kv_budget_mib: u64,
    /// Also serve split fine-tuning (`lsplit finetune --cloud`): the forward and backward
    /// passes of the trunk's layers, computed on the CPU in f32 one layer at a time
    #[arg(long, conflicts_with = "adapter")]
    pub training: bool,
    /// MiB of layer inputs one training session keeps between its forward and backward
    /// passes; the rest are recomputed
    #[arg(long, default_value_t = 64, requires = "training")]
    pub training_budget_mib: usize,
    /// MiB of the trunk's layers kept dequantized (f32) for training sessions, shared by all of
    /// them; layers past it are dequantized at each pass
    #[arg(long, default_value_t = 1024, requires = "training")]
    pub training_weights_mib: usize,
    /// Most positions of one training sequence (the training pass attends over a whole
    /// sequence at once, so its memory grows with the square of this); longer ones are refused
    #[arg(
        long,
        value_name = "ROWS",
        default_value_t = 1024,
        requires = "training"
    )]
    pub training_max_rows: usize,
    /// Threads for the network (TLS, HTTP/2, sessions) [default: a quarter of the cores, at
    /// least one]; the trunk's compute uses its own pool (RAYON_NUM_THREADS)
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub io_threads: Option<u16>,
    /// Longest a batch of steps is held open (milliseconds, fractions allowed) for the other
    /// sessions answered last to send their next step, so that they run in one batch; 0 runs
    /// whatever is waiting at once. It never exceeds a quarter of the previous batch's time
    #[arg(long, default_value_t = 2.0, value_parser = non_negative_ms)]
    pub batch_wait_ms: f64,
    /// Seconds a new session stream may take to send its first message (Open or Setup)
    /// before it is closed; a stream holds a session slot only from that message
    #[arg(long, default_value_t = 10)]
    pub handshake_timeout_secs: u64,
    /// Sessions one client address may hold at once [default: --max-sessions]
    #[arg(long)]
    pub max_sessions_per_peer: Option<usize>,
    /// Connections open at once [default: 512]
    #[arg(long)]
    pub max_connections: Option<usize>,
    /// Connections one client address may hold at once [default: 64]
    #[arg(long)]
    pub max_connections_per_peer: Option<usize>,
    /// TLS handshakes in progress at once; later connections wait [default: 64]
    #[arg(long)]
    pub max_tls_handshakes: Option<usize>,
    /// HTTP/2 streams one connection may have open at once [default: 32]
    #[arg(long)]
    pub max_streams_per_connection: Option<u32>,
    /// Health Watch streams (which need no token) open at once [default: 64]
    #[arg(long)]
    pub max_health_watches: Option<usize>,
    /// Session streams open at once that have not sent their first request [default: 256]
    #[arg(long)]
    pub max_waiting_streams: Option<usize>,
    /// Of those, the streams one client address may hold [default: 32]
    #[arg(long)]
    pub max_waiting_streams_per_peer: Option<usize>,
    /// Also serve Prometheus metrics at http://ADDR/metrics
    #[arg(long, value_name = "ADDR")]
    pub metrics: Option<SocketAddr>,
    /// On SIGTERM or SIGINT, report NOT_SERVING on gRPC health for N seconds while still
    /// accepting sessions, so that a load balancer moves new sessions elsewhere first; then
    /// stop accepting and let open sessions finish
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub drain_secs: u64,
    #[command(flatten)]
    pub log: LogArgs,
}

fn read(path: &Path, what: &str) -> anyhow::Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("reading the {what} {}", path.display()))
}

/// Whether `path` is a diffusers model directory.
fn is_diffusers(path: &Path) -> bool {
    path.join("model_index.json").is_file()
}

/// The bearer token, TLS identity and transport caps from the command line, with the warnings
/// each absence deserves.
fn access(args: &ServeArgs) -> anyhow::Result<Access> {
    let token = match &args.token_file {
        Some(file) => {
            let token = String::from_utf8(read(file, "token file")?)
                .context("the token file is not UTF-8")?
                .trim()
                .to_string();
            anyhow::ensure!(
                !token.is_empty(),
                "the token file {} is empty",
                file.display()
            );
            Some(token)
        }
        None => None,
    };
    let tls = match (&args.cert, &args.key) {
        (Some(cert), Some(key)) => Some(TlsFiles {
            cert_pem: read(cert, "certificate")?,
            key_pem: read(key, "key")?,
            client_ca_pem: args
                .client_ca
                .as_deref()
                .map(|ca| read(ca, "client CA"))
                .transpose()?,
        }),
        _ => None,
    };
    if tls.is_none() {
        tracing::warn!("serving WITHOUT TLS (--insecure): hidden states travel in plaintext");
    }
    if token.is_none() {
        tracing::warn!("no --token-file: any client that reaches this address can use the trunk");
    }
    Ok(Access {
        token,
        tls,
        transport: transport(args),
    })
}

/// The transport limits from the command line, the library's defaults where a flag is absent.
fn transport(args: &ServeArgs) -> TransportLimits {
    let defaults = TransportLimits::default();
    TransportLimits {
        handshake_timeout: Duration::from_secs(args.handshake_timeout_secs),
        max_sessions_per_peer: args.max_sessions_per_peer.unwrap_or(args.max_sessions),
        max_connections: args.max_connections.unwrap_or(defaults.max_connections),
        max_connections_per_peer: args
            .max_connections_per_peer
            .unwrap_or(defaults.max_connections_per_peer),
        max_tls_handshakes: args
            .max_tls_handshakes
            .unwrap_or(defaults.max_tls_handshakes),
        max_streams_per_connection: args
            .max_streams_per_connection
            .unwrap_or(defaults.max_streams_per_connection),
        max_health_watches: args
            .max_health_watches
            .unwrap_or(defaults.max_health_watches),
        max_waiting_streams: args
            .max_waiting_streams
            .unwrap_or(defaults.max_waiting_streams),
        max_waiting_streams_per_peer: args
            .max_waiting_streams_per_peer
            .unwrap_or(defaults.max_waiting_streams_per_peer),
        ..defaults
    }
}

/// Parses `--codecs` with `parse`, or returns `default` when it is absent.
fn codecs<C, E: std::fmt::Display>(
    args: &ServeArgs,
    default: Vec<C>,
    parse: impl Fn(&str) -> Result<C, E>,
) -> anyhow::Result<Vec<C>> {
    match &args.codecs {
        None => Ok(default),
        Some(names) => names
            .iter()
            .map(|name| parse(name.trim()).map_err(|e| anyhow::anyhow!("--codecs: {e}")))
            .collect(),
    }
}

/// Runs the command until SIGTERM or SIGINT.
pub fn run(args: ServeArgs) -> anyhow::Result<()> {
    let path = match &args.model {
        Some(path) => path.clone(),
        None => lsplit_fetch::ensure_default_model_with_progress()?,
    };
    if is_diffusers(&path) {
        return run_diffusion(args, &path);
    }
    anyhow::ensure!(
        args.unet_split.is_none(),
        "--unet-split is for diffusion models; {} is a language model",
        path.display()
    );
    anyhow::ensure!(
        args.max_step_elements.is_none(),
        "--max-step-elements is for diffusion models; {} is a language model",
        path.display()
    );
    anyhow::ensure!(
        args.max_attention_mib.is_none(),
        "--max-attention-mib is for diffusion models; {} is a language model",
        path.display()
    );
    let codecs = codecs(&args, Codec::ALL.to_vec(), str::parse::<Codec>)?;
    anyhow::ensure!(
        args.adapter.is_none() || args.device == ComputeDevice::Cpu,
        "--adapter runs on the CPU only: leave out --device {}",
        args.device
    );
    let device = args.device.open()?;
    let mut source = ModelSource::open(&path)?;
    source.set_kv_precision(args.kv_cache.unwrap_or_default());
    let layers = source.config().num_layers;
    let plan = match (args.split_policy, &args.split, &args.k1, &args.k2) {
        (PolicyKind::Random, _, Some(k1), Some(k2)) => {
            let union = SplitPolicy::parse(k1, k2, layers)?.trunk_layers();
            SplitPlan::new(union.start, union.end, layers)?
        }
        (PolicyKind::Random, ..) => {
            anyhow::bail!("--split-policy random needs --k1 and --k2 lists")
        }
        (PolicyKind::Fixed, _, Some(_), _) => {
            anyhow::bail!("--k1 and --k2 are for --split-policy random")
        }
        (PolicyKind::Fixed, Some(text), ..) => SplitPlan::parse(text, layers)?,
        (PolicyKind::Fixed, None, ..) => SplitPlan::symmetric(DEFAULT_LOCAL_LAYERS, layers)?,
    };
    let mut fingerprint = TrunkFingerprint::compute(&source, plan.k1..plan.k2)?;
    if let Some(dir) = &args.adapter {
        source.load_adapter(dir)?;
        let adapter = source.adapter().context("the adapter just loaded")?;
        let outside: Vec<usize> = adapter
            .layers()
            .into_iter()
            .filter(|l| !(plan.k1..plan.k2).contains(l))
            .collect();
        anyhow::ensure!(
            outside.is_empty(),
            "{}: the adapter updates layers {outside:?}, outside the trunk's layers {}..{}: \
             a server adapts its own layers only",
            dir.display(),
            plan.k1,
            plan.k2
        );
        fingerprint = fingerprint.with_adapter(adapter)?;
    }
    let adapted = source
        .adapter()
        .map(|a| format!(" with adapter {} on layers {:?}", a.describe(), a.layers()))
        .unwrap_or_default();
    let part = source.load_part(&plan.trunk(), &device)?;
    let options = ServerOptions {
        limits: Limits {
            max_sessions: args.max_sessions,
            max_context: args.max_context.unwrap_or(usize::MAX),
            max_message_bytes: args.max_message_bytes.unwrap_or(16 << 20),
            idle_timeout: Duration::from_secs(args.idle_timeout_secs),
            kv_budget_bytes: args.kv_budget_mib << 20,
        },
        codecs,
        access: access(&args)?,
        batch_wait: Duration::from_secs_f64(args.batch_wait_ms / 1000.0),
    };
    let scheme = scheme(&options.access.tls);
    let mut server = TrunkServer::new(part, fingerprint.clone(), options)?;
    if args.training {
        server = server.with_training(
            Arc::new(source),
            TrainingLimits {
                activation_bytes: args.training_budget_mib << 20,
                weight_bytes: args.training_weights_mib << 20,
                max_rows: args.training_max_rows,
            },
        )?;
    }
    let stats = server.stats();
    serve_until_signal(
        &args,
        stats,
        |addr| {
            format!(
                "lsplit serve: trunk {fingerprint} (on {}){adapted}{} on {scheme}://{addr}",
                args.device,
                if args.training { ", training too" } else { "" }
            )
        },
        |listener, shutdown, drain| server.serve_draining(listener, shutdown, drain),
    )
}

/// Serves the trunk of the diffusers model at `path`.
fn run_diffusion(args: ServeArgs, path: &Path) -> anyhow::Result<()> {
    let language_only = [
        ("--split", args.split.is_some()),
        ("--k1/--k2", args.k1.is_some() || args.k2.is_some()),
        ("--split-policy", args.split_policy != PolicyKind::Fixed),
        ("--max-context", args.max_context.is_some()),
        ("--kv-cache", args.kv_cache.is_some()),
        ("--adapter", args.adapter.is_some()),
        ("--device", args.device != ComputeDevice::Cpu),
    ];
    for (flag, given) in language_only {
        anyhow::ensure!(
            !given,
            "{flag} is for language models; {} is a diffusion model (use --unet-split)",
            path.display()
        );
    }
    let split = args.unet_split.unwrap_or(UnetSplit::Lambda(1));
    anyhow::ensure!(
        split != UnetSplit::None,
        "--unet-split none runs everything on the device: there is no trunk to serve"
    );
    let codecs = codecs(&args, StepCodec::all().to_vec(), str::parse::<StepCodec>)?;
    let model = load_trunk_model(path, split, &candle_core::Device::Cpu)
        .with_context(|| format!("loading the {split} trunk of {}", path.display()))?;
    let fingerprint = trunk_fingerprint(path, split)?;
    let defaults = DiffusionLimits::default();
    let options = DiffusionOptions {
        limits: DiffusionLimits {
            max_sessions: args.max_sessions,
            max_message_bytes: args.max_message_bytes.unwrap_or(defaults.max_message_bytes),
            idle_timeout: Duration::from_secs(args.idle_timeout_secs),
            max_step_elements: args.max_step_elements.unwrap_or(defaults.max_step_elements),
            max_attention_bytes: args
                .max_attention_mib
                .map_or(defaults.max_attention_bytes, |mib| {
                    mib.saturating_mul(1 << 20)
                }),
        },
        codecs,
        access: access(&args)?,
    };
    let scheme = scheme(&options.access.tls);
    let server = DiffusionServer::new(model, fingerprint, options)?;
    let stats = server.stats();
    serve_until_signal(
        &args,
        stats,
        |addr| format!("lsplit serve: {fingerprint} on {scheme}://{addr}"),
        |listener, shutdown, drain| server.serve_draining(listener, shutdown, drain),
    )
}

fn scheme(tls: &Option<TlsFiles>) -> &'static str {
    if tls.is_some() { "https" } else { "http" }
}

/// Completes when the process is asked to stop.
type Shutdown = Pin<Box<dyn Future<Output = ()> + Send>>;

/// Listens on `--listen` (and `--metrics`), prints `banner` of the bound address, and runs
/// `serve` until SIGTERM or SIGINT, then drains for `--drain-secs` and gives open sessions
/// [`SHUTDOWN_GRACE`] to finish.
fn serve_until_signal<Served>(
    args: &ServeArgs,
    stats: ServerStats,
    banner: impl FnOnce(SocketAddr) -> String,
    serve: impl FnOnce(tokio::net::TcpListener, Shutdown, Duration) -> Served,
) -> anyhow::Result<()>
where
    Served: Future<Output = Result<(), ServerError>>,
{
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(
            args.io_threads
                .map_or_else(lsplit_server::default_io_threads, usize::from),
        )
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let drain = Duration::from_secs(args.drain_secs);
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(args.listen)
            .await
            .with_context(|| format!("listening on {}", args.listen))?;
        println!("{}", banner(listener.local_addr()?));
        if let Some(metrics) = args.metrics {
            let listener = tokio::net::TcpListener::bind(metrics)
                .await
                .with_context(|| format!("listening for metrics on {metrics}"))?;
            println!("metrics on http://{}/metrics", listener.local_addr()?);
            tokio::spawn(lsplit_server::serve_metrics(
                listener,
                stats,
                std::future::pending(),
            ));
        }
        let (signalled, grace) = tokio::sync::oneshot::channel::<()>();
        let shutdown = async move {
            crate::signal::wait_for_signal().await;
            tracing::info!("shutting down: no new sessions, open steps finish");
            let _ = signalled.send(());
        };
        tokio::select! {
            result = serve(listener, Box::pin(shutdown), drain) => result?,
            _ = async {
                let _ = grace.await;
                tokio::time::sleep(drain + SHUTDOWN_GRACE).await;
            } => tracing::warn!("sessions still open {SHUTDOWN_GRACE:?} after draining; exiting"),
        }
        Ok(())
    })
}

/// Parses `--batch-wait-ms`: milliseconds from 0 to 1000.
fn non_negative_ms(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(ms) if (0.0..=1000.0).contains(&ms) => Ok(ms),
        _ => Err(format!(
            "expected milliseconds from 0 to 1000, got {text:?}"
        )),
    }
}
