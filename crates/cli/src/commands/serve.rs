//! `lsplit serve`: hold only the trunk layers of a split model and serve them to devices.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use lsplit_model::{ModelSource, SplitPlan};
use lsplit_proto::TrunkFingerprint;
use lsplit_server::{Limits, ServerOptions, TlsFiles, TrunkServer};
use lsplit_wire::Codec;

use lsplit_split::SplitPolicy;

use crate::args::{DEFAULT_LOCAL_LAYERS, PolicyKind};

/// How long open sessions may run on after SIGTERM/SIGINT before the server exits anyway.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// Options of `lsplit serve`.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// A GGUF file or a Hugging Face model directory [default: SmolLM2-135M-Instruct Q4_1,
    /// fetched on first use]
    #[arg(long, short = 'm', value_name = "PATH")]
    pub model: Option<PathBuf>,
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
    /// Codecs offered to devices
    #[arg(long, value_delimiter = ',', default_value = "f32,f16,bf16,int8")]
    pub codecs: Vec<Codec>,
    /// Sessions served at the same time
    #[arg(long, default_value_t = 16)]
    pub max_sessions: usize,
    /// Positions one session may reach [default: the model's context length]
    #[arg(long)]
    pub max_context: Option<usize>,
    /// Largest message accepted, in bytes
    #[arg(long, default_value_t = 16 << 20)]
    pub max_message_bytes: usize,
    /// Seconds a session may stay silent before it is closed and its KV cache freed
    #[arg(long, default_value_t = 300)]
    pub idle_timeout_secs: u64,
    /// MiB all sessions' KV caches may hold together
    #[arg(long, default_value_t = 2048)]
    pub kv_budget_mib: u64,
    /// Also serve Prometheus metrics at http://ADDR/metrics
    #[arg(long, value_name = "ADDR")]
    pub metrics: Option<SocketAddr>,
}

fn read(path: &Path, what: &str) -> anyhow::Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("reading the {what} {}", path.display()))
}

/// Runs the command until SIGTERM or SIGINT.
pub fn run(args: ServeArgs) -> anyhow::Result<()> {
    let path = match &args.model {
        Some(path) => path.clone(),
        None => lsplit_fetch::ensure_default_model_with_progress()?,
    };
    let source = ModelSource::open(&path)?;
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
    let part = source.load_part(&plan.trunk(), &candle_core::Device::Cpu)?;
    let fingerprint = TrunkFingerprint::compute(&source, plan.k1..plan.k2)?;
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
    let options = ServerOptions {
        limits: Limits {
            max_sessions: args.max_sessions,
            max_context: args.max_context.unwrap_or(usize::MAX),
            max_message_bytes: args.max_message_bytes,
            idle_timeout: Duration::from_secs(args.idle_timeout_secs),
            kv_budget_bytes: args.kv_budget_mib << 20,
        },
        codecs: args.codecs.clone(),
        token,
        tls,
    };
    let scheme = if options.tls.is_some() {
        "https"
    } else {
        "http"
    };
    let server = TrunkServer::new(part, fingerprint.clone(), options)?;
    let stats = server.stats();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(args.listen)
            .await
            .with_context(|| format!("listening on {}", args.listen))?;
        let addr = listener.local_addr()?;
        println!("lsplit serve: trunk {fingerprint} on {scheme}://{addr}");
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
            result = server.serve(listener, shutdown) => result?,
            _ = async {
                let _ = grace.await;
                tokio::time::sleep(SHUTDOWN_GRACE).await;
            } => tracing::warn!("sessions still open {SHUTDOWN_GRACE:?} after the signal; exiting"),
        }
        Ok(())
    })
}
