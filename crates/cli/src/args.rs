//! Options shared by several commands.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::{Args, ValueEnum};
use lsplit_device::{Device, DeviceOptions, PolicyChoice};
use lsplit_model::{KvPrecision, ModelSource, SplitPlan};
use lsplit_remote::CloudFiles;
use lsplit_split::{DraftModel, Obfuscation, SamplingParams, UplinkNoise, load_tokenizer};
use lsplit_tokenizer::Tokenizer;
use lsplit_wire::Codec;

/// How `serve` and `edge` write their log to stderr.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Lines for people
    Text,
    /// One JSON object per event, for log collectors
    Json,
}

/// Logging flags of the long-running commands.
#[derive(Debug, Args)]
pub struct LogArgs {
    /// How the log on stderr is written (what is logged: LSPLIT_LOG, else RUST_LOG, else warn)
    #[arg(long, value_enum, value_name = "FORMAT", default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

/// Starts the log on stderr in `format`, filtered by `LSPLIT_LOG` or, when that is unset,
/// the ecosystem's `RUST_LOG` (both in `tracing`'s filter syntax, e.g. `lsplit_server=debug`),
/// warnings and errors only when neither is set.
pub fn init_logging(format: LogFormat) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("LSPLIT_LOG")
        .or_else(|_| EnvFilter::try_from_default_env())
        .unwrap_or_else(|_| EnvFilter::new("warn"));
    let log = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(filter);
    match format {
        LogFormat::Text => log.init(),
        LogFormat::Json => log.json().init(),
    }
}

/// Which model to run.
#[derive(Debug, Args)]
pub struct ModelArgs {
    /// A GGUF file or a Hugging Face model directory [default: SmolLM2-135M-Instruct Q4_1,
    /// fetched on first use]
    #[arg(long, short = 'm', value_name = "PATH")]
    pub model: Option<PathBuf>,
    /// Precision of the KV cache: f32 (exact), f16 (llama.cpp's default: half the memory, and
    /// long contexts decode faster, with every cached value rounded to half precision) or q8
    /// (8-bit values with a scale per 32: 0.28x f32's memory; head dimensions a multiple of 32)
    #[arg(long, value_name = "PRECISION", default_value_t = KvPrecision::F32)]
    pub kv_cache: KvPrecision,
    /// A LoRA adapter in PEFT's format (adapter_config.json, adapter_model.safetensors) for
    /// the device's layers; one that updates a trunk layer is refused
    #[arg(long, value_name = "DIR")]
    pub adapter: Option<PathBuf>,
}

impl ModelArgs {
    /// The model's path, fetching the default model if none was given.
    pub fn path(&self) -> anyhow::Result<PathBuf> {
        match &self.model {
            Some(path) => Ok(path.clone()),
            None => Ok(lsplit_fetch::ensure_default_model_with_progress()?),
        }
    }

    /// Opens the model (fetching the default one if needed), with `--adapter` if given, and
    /// builds its tokenizer.
    pub fn open(&self) -> anyhow::Result<(ModelSource, Arc<Tokenizer>)> {
        let path = self.path()?;
        let mut source = ModelSource::open(&path)?;
        source.set_kv_precision(self.kv_cache);
        if let Some(dir) = &self.adapter {
            source.load_adapter(dir)?;
        }
        let tokenizer = load_tokenizer(&source)
            .with_context(|| format!("building the tokenizer of {}", path.display()))?;
        Ok((source, Arc::new(tokenizer)))
    }
}

/// Where the model is cut.
#[derive(Debug, Args)]
pub struct SplitArgs {
    /// Split points K1:K2: head = layers [0,K1), trunk = [K1,K2), tail = [K2,L)
    #[arg(long, value_name = "K1:K2", conflicts_with_all = ["local_layers", "no_split"])]
    pub split: Option<String>,
    /// N local layers at each end (K1 = N, K2 = L - N) [default: 2]
    #[arg(
        short = 'n',
        long = "local-layers",
        value_name = "N",
        conflicts_with = "no_split"
    )]
    pub local_layers: Option<usize>,
    /// Run the whole model in one part (the baseline)
    #[arg(long)]
    pub no_split: bool,
}

/// Local layers at each end when no split is given.
pub const DEFAULT_LOCAL_LAYERS: usize = 2;

impl SplitArgs {
    /// The split plan for a model of `layers` layers, or `None` with `--no-split`.
    pub fn plan(&self, layers: usize) -> anyhow::Result<Option<SplitPlan>> {
        if self.no_split {
            return Ok(None);
        }
        let plan = match (&self.split, self.local_layers) {
            (Some(text), _) => SplitPlan::parse(text, layers)?,
            (None, n) => SplitPlan::symmetric(n.unwrap_or(DEFAULT_LOCAL_LAYERS), layers)?,
        };
        Ok(Some(plan))
    }
}

/// How the split points of each step are chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum PolicyKind {
    /// The same split points at every step (--split, -n)
    Fixed,
    /// Split points drawn afresh at every step from --k1 and --k2, from a per-session secret
    Random,
}

/// Random split points and obfuscation: what makes a session keyed.
#[derive(Debug, Args)]
pub struct PolicyArgs {
    /// How split points are chosen at each step
    #[arg(long, value_enum, default_value_t = PolicyKind::Fixed)]
    pub split_policy: PolicyKind,
    /// Layers K1 is drawn from with --split-policy random, e.g. 1,2,3,4
    #[arg(long, value_name = "LIST", requires = "k2")]
    pub k1: Option<String>,
    /// Layers K2 is drawn from with --split-policy random, e.g. 26,27,28,29
    #[arg(long, value_name = "LIST", requires = "k1")]
    pub k2: Option<String>,
    /// Disguise rows on the wire: none, or permute (a secret per-session permutation of the
    /// hidden dimension, undone on the other side). The permutation is broken from one row:
    /// matching one row with the public weights reveals it, and the cloud receives it anyway
    /// (PRIVACY.md)
    #[arg(long, value_name = "HOW", default_value_t = Obfuscation::None)]
    pub obfuscate: Obfuscation,
    /// Add Gaussian noise to every uplink row on this device before it is sent: SIGMA times
    /// the row's RMS (after --uplink-clip). PRIVACY.md gives each SIGMA's epsilon and what it
    /// costs in accuracy
    #[arg(long, value_name = "SIGMA")]
    pub uplink_noise: Option<f32>,
    /// Clip each uplink row's RMS to at most RMS before the noise is added
    #[arg(long, value_name = "RMS", requires = "uplink_noise")]
    pub uplink_clip: Option<f32>,
    /// Seed of the uplink noise, so that a run repeats exactly [default: fresh from the
    /// operating system each session: a seed the cloud can guess lets it remove the noise]
    #[arg(long, value_name = "N", requires = "uplink_noise")]
    pub noise_seed: Option<u64>,
}

impl PolicyArgs {
    /// The policy choice these flags make; lists are checked against the model when it loads.
    pub fn choice(&self) -> anyhow::Result<PolicyChoice> {
        match (self.split_policy, &self.k1, &self.k2) {
            (PolicyKind::Random, Some(k1), Some(k2)) => Ok(PolicyChoice::Random {
                k1: k1.clone(),
                k2: k2.clone(),
            }),
            (PolicyKind::Random, _, _) => {
                anyhow::bail!(
                    "--split-policy random needs --k1 and --k2 lists, e.g. --k1 1,2,3,4 --k2 26,27,28,29"
                )
            }
            (PolicyKind::Fixed, None, None) => Ok(PolicyChoice::Fixed),
            (PolicyKind::Fixed, _, _) => {
                anyhow::bail!(
                    "--k1 and --k2 are for --split-policy random; a fixed split is --split K1:K2"
                )
            }
        }
    }

    /// The uplink noise these flags ask for, if any.
    pub fn noise(&self) -> anyhow::Result<Option<UplinkNoise>> {
        self.uplink_noise
            .map(|sigma| UplinkNoise::new(sigma, self.uplink_clip, self.noise_seed))
            .transpose()
            .map_err(anyhow::Error::from)
    }
}

/// The device side of `lsplit generate` and `lsplit edge`: the model, where it is cut, how
/// each step's split points are drawn, and where the trunk runs.
#[derive(Debug, Args)]
pub struct DeviceArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub split: SplitArgs,
    #[command(flatten)]
    pub policy: PolicyArgs,
    #[command(flatten)]
    pub trunk: TrunkArgs,
    #[command(flatten)]
    pub draft: DraftArgs,
}

/// The draft model of `--speculate draft`.
#[derive(Debug, Args)]
pub struct DraftArgs {
    /// A model with this model's tokenizer (GGUF file or Hugging Face directory), run whole on
    /// this device to draft tokens for --speculate draft; auto considers it too
    #[arg(long, value_name = "PATH")]
    pub draft_model: Option<PathBuf>,
}

impl DraftArgs {
    /// Loads the draft model, if one was given, checked against the model's `tokenizer`.
    pub fn load(&self, tokenizer: &Tokenizer) -> anyhow::Result<Option<DraftModel>> {
        let Some(path) = &self.draft_model else {
            return Ok(None);
        };
        let draft = DraftModel::load(path, tokenizer, &candle_core::Device::Cpu)
            .with_context(|| format!("loading the draft model {}", path.display()))?;
        Ok(Some(draft))
    }
}

impl DeviceArgs {
    /// Loads the device side the flags describe: the model, its split (or the split of the
    /// trunk server of `--cloud`, connected to and checked first) and how sessions draw and
    /// disguise and noise their rows.
    pub fn load(&self) -> anyhow::Result<Device> {
        let choice = self.policy.choice()?;
        let noise = self.policy.noise()?;
        let path = self.model.path()?;
        let (source, tokenizer) = self.model.open()?;
        let split = self.split.plan(source.config().num_layers)?;
        let cloud = self
            .trunk
            .auth
            .hops(&self.trunk.cloud)?
            .iter()
            .map(CloudFiles::options)
            .collect::<Result<_, _>>()?;
        let draft = self.draft.load(&tokenizer)?;
        let mut device = Device::load(DeviceOptions {
            path,
            source,
            tokenizer,
            split,
            cloud,
            trunk_adapter: self.trunk.trunk_adapter.clone(),
            policy: choice,
            obfuscation: self.policy.obfuscate,
            codec: self.trunk.codec,
        })?;
        if let Some(draft) = draft {
            device.model = device.model.with_draft_model(draft);
        }
        device.model.set_uplink_noise(noise)?;
        Ok(device)
    }
}

/// Where the trunk runs and how hidden rows travel to it.
#[derive(Debug, Args)]
pub struct TrunkArgs {
    /// How hidden rows are encoded on the wire: f32 (lossless), f16, bf16, int8
    #[arg(long, default_value_t = Codec::F32)]
    pub codec: Codec,
    /// Run the trunk on this server (https://HOST:PORT), or on several that divide its layers
    /// (URL1,URL2: each runs the layers after the previous one's); the split comes from them
    #[arg(
        long,
        value_name = "URL",
        value_delimiter = ',',
        conflicts_with_all = ["split", "local_layers", "no_split"]
    )]
    pub cloud: Vec<String>,
    /// The public LoRA adapter the server of --cloud applies to its layers (its `serve
    /// --adapter`): checked in the server's fingerprint, never applied on the device
    #[arg(long, value_name = "DIR", requires = "cloud")]
    pub trunk_adapter: Option<PathBuf>,
    #[command(flatten)]
    pub auth: CloudAuthArgs,
}

/// Where the diffusion trunk runs (`lsplit image --cloud`).
#[derive(Debug, Args)]
pub struct CloudArgs {
    /// Run the trunk on this server (https://HOST:PORT); the UNet split comes from it
    #[arg(long, value_name = "URL")]
    pub cloud: Option<String>,
    #[command(flatten)]
    pub auth: CloudAuthArgs,
}

impl CloudArgs {
    /// The connection of `--cloud`, if given.
    pub fn files(&self) -> anyhow::Result<Option<CloudFiles>> {
        self.cloud
            .as_deref()
            .map(|url| self.auth.files(url))
            .transpose()
    }
}

/// How the device proves who it is to a trunk server and checks the server (with `--cloud`, or
/// `lsplit edge --image-cloud`). With several servers in `--cloud`, each file flag names one
/// file for all of them or one per server, in the same order.
#[derive(Debug, Args)]
pub struct CloudAuthArgs {
    /// CA certificate (PEM) the server must chain to [default: the system's roots]
    #[arg(long, value_name = "FILE", value_delimiter = ',')]
    pub ca: Vec<PathBuf>,
    /// File holding the bearer token the server expects
    #[arg(long, value_name = "FILE", value_delimiter = ',')]
    pub token_file: Vec<PathBuf>,
    /// Client certificate (PEM) for a server that requires mutual TLS
    #[arg(
        long,
        value_name = "FILE",
        value_delimiter = ',',
        requires = "client_key"
    )]
    pub client_cert: Vec<PathBuf>,
    /// Private key (PEM) of --client-cert
    #[arg(
        long,
        value_name = "FILE",
        value_delimiter = ',',
        requires = "client_cert"
    )]
    pub client_key: Vec<PathBuf>,
    /// Allow a plaintext http:// server: what crosses travels unencrypted
    #[arg(long)]
    pub insecure: bool,
}

impl CloudAuthArgs {
    /// Refuses these flags when no trunk server is named (they would be silently ignored).
    pub fn check_needed(&self, server: bool) -> anyhow::Result<()> {
        let given = [
            ("--ca", !self.ca.is_empty()),
            ("--token-file", !self.token_file.is_empty()),
            ("--client-cert", !self.client_cert.is_empty()),
            ("--insecure", self.insecure),
        ];
        match given.iter().find(|(_, set)| *set) {
            Some((flag, _)) if !server => {
                anyhow::bail!("{flag} is for a trunk server: it needs --cloud URL")
            }
            _ => Ok(()),
        }
    }

    /// The connections to `urls`, in order.
    pub fn hops(&self, urls: &[String]) -> anyhow::Result<Vec<CloudFiles>> {
        let hops = urls.len();
        let pick = |files: &[PathBuf], flag: &str, hop: usize| match files.len() {
            0 => Ok(None),
            1 => Ok(Some(files[0].clone())),
            n if n == hops => Ok(Some(files[hop].clone())),
            n => Err(anyhow::anyhow!(
                "{flag} names {n} files for {hops} trunk servers: give one for all of them or \
                 one per server, in the order of --cloud"
            )),
        };
        (0..hops)
            .map(|hop| {
                Ok(CloudFiles {
                    url: urls[hop].clone(),
                    ca: pick(&self.ca, "--ca", hop)?,
                    token_file: pick(&self.token_file, "--token-file", hop)?,
                    client_cert: pick(&self.client_cert, "--client-cert", hop)?,
                    client_key: pick(&self.client_key, "--client-key", hop)?,
                    insecure: self.insecure,
                })
            })
            .collect()
    }

    /// The connection to `url` with these files.
    pub fn files(&self, url: &str) -> anyhow::Result<CloudFiles> {
        let mut hops = self.hops(&[url.to_string()])?;
        Ok(hops.remove(0))
    }
}

/// How tokens are chosen.
#[derive(Debug, Args)]
pub struct SamplingArgs {
    /// Softmax temperature; 0 is greedy
    #[arg(long, short = 't', default_value_t = 0.0)]
    pub temperature: f32,
    /// Sample only among the K most likely tokens
    #[arg(long)]
    pub top_k: Option<usize>,
    /// Sample only among the most likely tokens whose probabilities add up to P
    #[arg(long)]
    pub top_p: Option<f32>,
    /// Penalty on recently generated tokens (1 = none)
    #[arg(long, default_value_t = 1.0)]
    pub repeat_penalty: f32,
    /// How many recent tokens the repetition penalty considers
    #[arg(long, default_value_t = 64)]
    pub repeat_last_n: usize,
    /// Random seed, for repeatable sampling
    #[arg(long, default_value_t = 299_792_458)]
    pub seed: u64,
}

impl SamplingArgs {
    /// The sampler settings.
    pub fn params(&self) -> anyhow::Result<SamplingParams> {
        anyhow::ensure!(
            self.temperature >= 0.0 && self.temperature.is_finite(),
            "--temperature must be a finite number >= 0"
        );
        if let Some(p) = self.top_p {
            anyhow::ensure!(p > 0.0 && p <= 1.0, "--top-p must be in (0, 1]");
        }
        anyhow::ensure!(
            self.repeat_penalty > 0.0 && self.repeat_penalty.is_finite(),
            "--repeat-penalty must be a positive number"
        );
        Ok(SamplingParams {
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            repetition_penalty: self.repeat_penalty,
            repeat_last_n: self.repeat_last_n,
            seed: self.seed,
        })
    }
}
