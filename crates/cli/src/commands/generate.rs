//! `lsplit generate`: stream a completion, head and tail here, trunk in-process or on a
//! trunk server (`--cloud`).

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::Args;
use lsplit_model::{ModelSource, SplitPlan};
use lsplit_proto::TrunkFingerprint;
use lsplit_remote::{RemoteOptions, RemoteTrunk};
use lsplit_split::{
    CaptureWriter, DeviceModel, GenerateOptions, LocalTrunk, SessionKeys, SessionSecret, Trunk,
};
use lsplit_wire::Codec;

use crate::args::{ModelArgs, PolicyArgs, SamplingArgs, SplitArgs};

/// Options of `lsplit generate`.
#[derive(Debug, Args)]
pub struct GenerateArgs {
    /// The prompt (wrapped in the model's chat template unless --raw)
    pub prompt: String,
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub split: SplitArgs,
    #[command(flatten)]
    pub policy: PolicyArgs,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    /// Maximum number of tokens to generate
    #[arg(long, default_value_t = 256)]
    pub max_tokens: usize,
    /// Send the prompt as is, without the chat template
    #[arg(long)]
    pub raw: bool,
    /// How hidden rows are encoded on the wire: f32 (lossless), f16, bf16, int8
    #[arg(long, default_value_t = Codec::F32)]
    pub codec: Codec,
    /// Print per-part time, bytes per token and tokens/s to stderr
    #[arg(long)]
    pub stats: bool,
    /// Write every message that crosses to and from the trunk into DIR (see PRIVACY.md)
    #[arg(long, value_name = "DIR", conflicts_with = "no_split")]
    pub capture: Option<PathBuf>,
    /// Run the trunk on this server (https://HOST:PORT); a fixed split's points come from it,
    /// and it must hold every layer a random policy may draw
    #[arg(long, value_name = "URL", conflicts_with_all = ["split", "local_layers", "no_split"])]
    pub cloud: Option<String>,
    /// CA certificate (PEM) the server must chain to [default: the system's roots]
    #[arg(long, value_name = "FILE", requires = "cloud")]
    pub ca: Option<PathBuf>,
    /// File holding the bearer token the server expects
    #[arg(long, value_name = "FILE", requires = "cloud")]
    pub token_file: Option<PathBuf>,
    /// Client certificate (PEM) for a server that requires mutual TLS
    #[arg(long, value_name = "FILE", requires_all = ["cloud", "client_key"])]
    pub client_cert: Option<PathBuf>,
    /// Private key (PEM) of --client-cert
    #[arg(long, value_name = "FILE", requires = "client_cert")]
    pub client_key: Option<PathBuf>,
    /// Allow a plaintext http:// server: hidden states travel unencrypted
    #[arg(long, requires = "cloud")]
    pub insecure: bool,
}

/// Connects to the trunk server, learns its split and checks its fingerprint against this
/// device's copy of the model.
fn connect_cloud(
    args: &GenerateArgs,
    url: &str,
    source: &ModelSource,
) -> anyhow::Result<(RemoteTrunk, SplitPlan)> {
    let read =
        |path: &PathBuf| std::fs::read(path).with_context(|| format!("reading {}", path.display()));
    let mut options = RemoteOptions::new(url, args.codec);
    options.ca_pem = args.ca.as_ref().map(read).transpose()?;
    options.token = args
        .token_file
        .as_ref()
        .map(|f| read(f).map(|t| String::from_utf8_lossy(&t).trim().to_string()))
        .transpose()?;
    if let (Some(cert), Some(key)) = (&args.client_cert, &args.client_key) {
        options.identity = Some((read(cert)?, read(key)?));
    }
    options.insecure = args.insecure;
    let remote = RemoteTrunk::connect(options)?;
    let server = &remote.info().fingerprint;
    let plan = SplitPlan::new(
        server.layers.start,
        server.layers.end,
        source.config().num_layers,
    )
    .with_context(|| format!("the server's trunk ({server}) does not fit this model"))?;
    remote.verify(&TrunkFingerprint::compute(source, server.layers.clone())?)?;
    Ok((remote, plan))
}

/// Runs the command.
pub fn run(args: GenerateArgs) -> anyhow::Result<()> {
    let options = GenerateOptions {
        max_tokens: args.max_tokens,
        sampling: args.sampling.params()?,
    };
    let (source, tokenizer) = args.model.open()?;
    let device = candle_core::Device::Cpu;
    let cloud = match &args.cloud {
        Some(url) => Some(connect_cloud(&args, url, &source)?),
        None => None,
    };
    let plan = match &cloud {
        Some((_, plan)) => Some(*plan),
        None => args.split.plan(source.config().num_layers)?,
    };
    let layers = source.config().num_layers;
    let policy = args.policy.policy(plan, layers)?;
    let (model, mut session) = match (plan, policy) {
        (None, _) => {
            let model = DeviceModel::unsplit(&source, tokenizer, &device)?;
            (model, None)
        }
        (Some(plan), None) => {
            let model = DeviceModel::split(&source, plan, tokenizer, args.codec, &device)?;
            let trunk: Box<dyn Trunk> = match cloud {
                Some((remote, _)) => Box::new(remote),
                None => Box::new(LocalTrunk::new(Arc::new(
                    source.load_part(&plan.trunk(), &device)?,
                ))),
            };
            (model, Some((trunk, None)))
        }
        (Some(_), Some(policy)) => {
            let keys = SessionKeys {
                policy: policy.clone(),
                obfuscation: args.policy.obfuscate,
                secret: SessionSecret::generate(),
            };
            let model = DeviceModel::keyed(&source, policy, tokenizer, args.codec, &device)?;
            let trunk: Box<dyn Trunk> = match cloud {
                Some((remote, _)) => Box::new(remote.with_keys(keys.clone())),
                None => {
                    let spec = lsplit_model::PartSpec {
                        kind: lsplit_model::PartKind::Trunk,
                        layers: keys.policy.trunk_layers(),
                    };
                    Box::new(LocalTrunk::keyed(
                        Arc::new(source.load_part(&spec, &device)?),
                        &keys,
                    )?)
                }
            };
            (model, Some((trunk, Some(keys))))
        }
    };
    let describe = match (model.policy(), model.plan()) {
        (Some(policy), _) => format!("{policy}, obfuscation {}", args.policy.obfuscate),
        (None, Some(plan)) => plan.to_string(),
        (None, None) => "none (whole model in one part)".to_string(),
    };
    tracing::info!(split = %describe, codec = %model.codec(), "model loaded");
    let prompt = model.prompt_tokens(&args.prompt, args.raw)?;
    let mut session = match session.take() {
        None => model.session(None)?,
        Some((trunk, None)) => model.session(Some(trunk))?,
        Some((trunk, Some(keys))) => model.keyed_session(trunk, &keys)?,
    };
    if let Some(dir) = &args.capture {
        session.capture(
            CaptureWriter::create(dir)
                .with_context(|| format!("starting the capture in {}", dir.display()))?,
        );
    }
    let mut stdout = std::io::stdout().lock();
    let mut write_error = None;
    let generation = session.generate(&prompt, &options, &mut |piece| {
        if write_error.is_none() {
            write_error = stdout
                .write_all(piece.as_bytes())
                .and_then(|()| stdout.flush())
                .err();
        }
    })?;
    if let Some(e) = write_error {
        return Err(e.into());
    }
    writeln!(stdout)?;
    if args.stats {
        eprintln!(
            "split: {describe}, codec: {}, stop: {:?}",
            model.codec(),
            generation.stop
        );
        eprintln!("{}", generation.stats);
        if let Some(url) = &args.cloud {
            eprintln!("(trunk time is the round trips to {url}: network plus remote trunk)");
        }
    }
    Ok(())
}
