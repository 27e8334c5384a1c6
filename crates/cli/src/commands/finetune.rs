//! `lsplit finetune`: train a LoRA adapter on the device's layers (head and tail) on the user's
//! own data, while the trunk computes its layers' forward and backward passes, in-process or on
//! a trunk server (`--cloud`), which sees hidden rows and their gradients only. With
//! `--uplink-noise` those rows are noised as `lsplit generate` noises them, and the adapter
//! learns to work through the noise (a device-side denoiser).

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use anyhow::Context;
use clap::{Args, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use lsplit_model::{DenseTrunk, ModelSource, SplitPlan, Target, TrunkFingerprint};
use lsplit_remote::{RemoteTrainTrunk, Traffic};
use lsplit_split::{MAX_SIGMA, UplinkNoise, load_tokenizer};
use lsplit_train::{
    Dataset, Example, LocalTrainTrunk, Schedule, TrainOptions, TrainTrunk, Trainer,
};
use lsplit_wire::Codec;

use crate::args::{CloudArgs, SplitArgs};

/// Bytes of layer inputs the in-process trunk keeps between a step's forward and backward
/// passes; the rest are recomputed.
const TRUNK_BUDGET: usize = 256 << 20;

/// Bytes of dequantized trunk layers the in-process trunk keeps between passes (SmolLM2-135M's
/// 26 trunk layers take 370 MB); layers past it are read again at each pass.
const TRUNK_WEIGHTS: usize = 1 << 30;

/// Options of `lsplit finetune`.
#[derive(Debug, Args)]
pub struct FinetuneArgs {
    /// Training data: JSONL, one {"text": ...} or {"messages": [{"role", "content"}...]} per
    /// line (with messages, the assistant's turns are what is learnt)
    #[arg(long, value_name = "FILE")]
    pub data: PathBuf,
    /// Where the adapter goes, in PEFT's format (adapter_config.json,
    /// adapter_model.safetensors); checkpoints go to DIR/checkpoint
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// A GGUF file or a Hugging Face model directory [default: SmolLM2-135M-Instruct Q4_1,
    /// fetched on first use]
    #[arg(long, short = 'm', value_name = "PATH")]
    pub model: Option<PathBuf>,
    #[command(flatten)]
    pub split: SplitArgs,
    /// Optimizer steps
    #[arg(long, value_name = "N", default_value_t = 200)]
    pub steps: usize,
    /// Peak learning rate
    #[arg(long, value_name = "X", default_value_t = 1e-3)]
    pub lr: f64,
    /// LoRA rank
    #[arg(long, value_name = "R", default_value_t = 8)]
    pub rank: usize,
    /// LoRA alpha [default: twice the rank]
    #[arg(long, value_name = "ALPHA")]
    pub alpha: Option<f64>,
    /// Scale the update by alpha / sqrt(rank) (rsLoRA) instead of alpha / rank
    #[arg(long)]
    pub rslora: bool,
    /// Projections adapted in each device layer: q, k, v, o, gate, up, down, comma-separated
    #[arg(
        long,
        value_name = "LIST",
        value_delimiter = ',',
        default_value = "q,k,v,o,gate,up,down"
    )]
    pub targets: Vec<String>,
    /// Examples whose gradients are summed into each step
    #[arg(long, value_name = "N", default_value_t = 4)]
    pub accumulate: usize,
    /// Steps of linear warmup [default: a tenth of the steps]
    #[arg(long, value_name = "N")]
    pub warmup: Option<usize>,
    /// The learning rate after warmup
    #[arg(long, value_enum, default_value_t = ScheduleArg::Cosine)]
    pub schedule: ScheduleArg,
    /// AdamW's decoupled weight decay
    #[arg(long, value_name = "X", default_value_t = 0.0)]
    pub weight_decay: f64,
    /// Share of the examples held out to measure the loss on, before and after
    #[arg(long, value_name = "FRACTION", default_value_t = 0.1)]
    pub eval_fraction: f64,
    /// Also report the loss and perplexity on FILE (JSONL like --data, every line counted)
    /// before and after training, e.g. a general text, to see what else the adapter changed;
    /// repeatable
    #[arg(long, value_name = "FILE")]
    pub eval_data: Vec<PathBuf>,
    /// Longest training sequence in tokens; longer ones are cut into windows
    #[arg(long, value_name = "TOKENS", default_value_t = 256)]
    pub max_len: usize,
    /// Write a checkpoint to OUT/checkpoint every N steps (0: only at the end)
    #[arg(long, value_name = "N", default_value_t = 50)]
    pub checkpoint_every: usize,
    /// Continue the run checkpointed in OUT/checkpoint
    #[arg(long)]
    pub resume: bool,
    /// Weight of a privacy term added to the loss: the distance correlation between the
    /// head's output rows and the public head's rows for the same tokens (NoPeek), which
    /// pushes the rows the trunk server sees away from what the public weights would send
    /// while the task loss keeps the model useful; 0 trains for the task alone. Needs a head
    /// layer. The distance correlation on the held-out examples is reported before and after
    #[arg(long, value_name = "W", default_value_t = 0.0)]
    pub privacy_weight: f64,
    /// Add Gaussian noise to every row sent to the trunk, in training and in the losses
    /// reported: SIGMA times the row's RMS (after --uplink-clip), as `lsplit generate
    /// --uplink-noise` adds it, so that the tail's adapter learns to undo the noise's effect on
    /// the trunk's output (a device-side denoiser). Generate with the same noise
    #[arg(long, value_name = "SIGMA")]
    pub uplink_noise: Option<f32>,
    /// Clip each uplink row's RMS to at most RMS before the noise is added
    #[arg(long, value_name = "RMS", requires = "uplink_noise")]
    pub uplink_clip: Option<f32>,
    /// Also report each loss with uplink noise SIGMA (0: none) before and after training, to
    /// see the adapter at other noise levels than its own; repeatable
    #[arg(long, value_name = "SIGMA")]
    pub eval_noise: Vec<f32>,
    /// Seed of the noise of --uplink-noise and --eval-noise, so that a run repeats exactly
    /// [default: --seed]. A seed the trunk server can guess lets it remove the noise
    #[arg(long, value_name = "N")]
    pub noise_seed: Option<u64>,
    /// Seeds the adapter's initialisation, the held-out draw and the order of examples
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[command(flatten)]
    pub cloud: CloudArgs,
    /// How rows and gradients are encoded to and from the trunk server: f32 (exact), f16,
    /// bf16, int8
    #[arg(long, default_value_t = Codec::F32, requires = "cloud")]
    pub codec: Codec,
}

/// `--schedule`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ScheduleArg {
    /// Half a cosine down to 0
    Cosine,
    /// A line down to 0
    Linear,
    /// Held
    Constant,
}

impl From<ScheduleArg> for Schedule {
    fn from(arg: ScheduleArg) -> Self {
        match arg {
            ScheduleArg::Cosine => Schedule::Cosine,
            ScheduleArg::Linear => Schedule::Linear,
            ScheduleArg::Constant => Schedule::Constant,
        }
    }
}

/// The targets `--targets` names.
fn targets(names: &[String]) -> anyhow::Result<Vec<Target>> {
    names
        .iter()
        .map(|name| {
            let name = name.trim();
            Target::ALL
                .into_iter()
                .find(|t| t.module() == name || t.module().strip_suffix("_proj") == Some(name))
                .with_context(|| {
                    format!("--targets: unknown projection `{name}` (q, k, v, o, gate, up, down)")
                })
        })
        .collect()
}

/// The noise of `--uplink-noise` (none: none), clipped by `--uplink-clip`, drawn from
/// `--noise-seed` or `--seed`.
fn uplink_noise(args: &FinetuneArgs, sigma: Option<f32>) -> anyhow::Result<Option<UplinkNoise>> {
    let seed = Some(args.noise_seed.unwrap_or(args.seed));
    Ok(sigma
        .map(|sigma| UplinkNoise::new(sigma, args.uplink_clip, seed))
        .transpose()?)
}

/// The `--eval-noise` levels, each with the label of its loss lines.
fn eval_noises(args: &FinetuneArgs) -> anyhow::Result<Vec<(String, Option<UplinkNoise>)>> {
    anyhow::ensure!(
        args.noise_seed.is_none() || args.uplink_noise.is_some() || !args.eval_noise.is_empty(),
        "--noise-seed seeds --uplink-noise or --eval-noise; give one of them"
    );
    args.eval_noise
        .iter()
        .map(|&sigma| {
            anyhow::ensure!(
                sigma == 0.0 || (sigma > 0.0 && sigma <= MAX_SIGMA),
                "--eval-noise must be 0 or a number in (0, {MAX_SIGMA}], not {sigma}"
            );
            if sigma == 0.0 {
                return Ok(("no uplink noise".to_string(), None));
            }
            Ok((
                format!("uplink noise {sigma}"),
                uplink_noise(args, Some(sigma))?,
            ))
        })
        .collect()
}

/// Runs the command.
pub fn run(args: FinetuneArgs) -> anyhow::Result<()> {
    let noise = uplink_noise(&args, args.uplink_noise)?;
    let eval_noises = eval_noises(&args)?;
    let path = match &args.model {
        Some(path) => path.clone(),
        None => lsplit_fetch::ensure_default_model_with_progress()?,
    };
    let source = Arc::new(ModelSource::open(&path)?);
    let layers = source.config().num_layers;
    let tokenizer = load_tokenizer(&source)
        .with_context(|| format!("building the tokenizer of {}", path.display()))?;
    let data = Dataset::read(
        &args.data,
        &tokenizer,
        args.max_len,
        args.eval_fraction,
        args.seed,
    )?;
    let evals = args
        .eval_data
        .iter()
        .map(|path| {
            let set = Dataset::read(path, &tokenizer, args.max_len, 0.0, args.seed)?;
            Ok((path.display().to_string(), set.train))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let mut traffic = None;
    let (plan, trunk): (SplitPlan, Box<dyn TrainTrunk>) = match args.cloud.files()? {
        Some(files) => {
            anyhow::ensure!(
                args.split.split.is_none()
                    && args.split.local_layers.is_none()
                    && !args.split.no_split,
                "--cloud: the split comes from the trunk server; leave out --split, -n and --no-split"
            );
            let mut options = files.options()?;
            options.codecs = vec![args.codec];
            let remote = RemoteTrainTrunk::connect(options)
                .with_context(|| format!("connecting to the trunk server {}", files.url))?;
            let layers_there = remote.layers();
            remote.verify(&TrunkFingerprint::compute(&source, layers_there.clone())?)?;
            let plan = SplitPlan::new(layers_there.start, layers_there.end, layers)?;
            traffic = Some(remote.traffic());
            (plan, Box::new(remote))
        }
        None => {
            args.cloud.auth.check_needed(false)?;
            let plan = match args.split.plan(layers)? {
                Some(plan) => plan,
                None => SplitPlan::new(layers, layers, layers)?,
            };
            let local = DenseTrunk::new(source.clone(), plan.k1..plan.k2, TRUNK_BUDGET)?
                .with_weight_cache(TRUNK_WEIGHTS);
            (plan, Box::new(LocalTrainTrunk::new(local)))
        }
    };
    let options = TrainOptions {
        rank: args.rank,
        alpha: args.alpha.unwrap_or(2.0 * args.rank as f64),
        rslora: args.rslora,
        targets: targets(&args.targets)?,
        lr: args.lr,
        steps: args.steps,
        warmup: args.warmup.unwrap_or(args.steps / 10),
        schedule: args.schedule.into(),
        accumulate: args.accumulate,
        weight_decay: args.weight_decay,
        seed: args.seed,
        privacy_weight: args.privacy_weight,
        uplink_noise: noise,
    };
    let mut trainer = Trainer::new(source, plan, options, trunk)?;
    let checkpoint = args.out.join("checkpoint");
    if args.resume {
        trainer.resume(&checkpoint)?;
        println!("resuming at step {}", trainer.steps_done());
    }
    println!(
        "training {} adapter values on layers {:?} (split {plan}) with {} examples, {} held out",
        trainer.adapter().params(),
        trainer.adapter().shape().layers,
        data.train.len(),
        data.held_out.len()
    );
    if let Some(noise) = noise {
        println!(
            "the trunk receives rows with uplink noise `{}` (noise seed {}), in training and in \
             the losses below unless they name another",
            noise.flags(),
            args.noise_seed.unwrap_or(args.seed)
        );
    }
    report_losses(&mut trainer, &data.held_out, &evals, &eval_noises, "before")?;
    let privacy_set = privacy_set(&args, &data);
    report_privacy(&trainer, privacy_set, "before")?;
    let start_step = trainer.steps_done();
    let bar = ProgressBar::new(args.steps as u64).with_position(start_step as u64);
    bar.set_style(
        ProgressStyle::with_template("{bar:30} {pos}/{len} steps {msg} [{elapsed} < {eta}]")
            .expect("a valid template"),
    );
    let started = Instant::now();
    let payload = |t: &Traffic| {
        (
            t.sent.load(Ordering::Relaxed),
            t.received.load(Ordering::Relaxed),
        )
    };
    let payload_before = traffic.as_deref().map(payload);
    let mut tokens = 0;
    let (mut first, mut last) = (None, None);
    while trainer.steps_done() < args.steps {
        let report = trainer.step(&data.train)?;
        tokens += report.tokens;
        first.get_or_insert(report.loss);
        last = Some(report.loss);
        bar.set_position(report.step as u64);
        let privacy = report
            .privacy
            .map_or_else(String::new, |d| format!(" · dcor {d:.3}"));
        bar.set_message(format!(
            "loss {:.4}{privacy} · lr {:.2e} · {:.0} tok/s",
            report.loss,
            report.lr,
            tokens as f64 / started.elapsed().as_secs_f64()
        ));
        if args.checkpoint_every > 0 && report.step % args.checkpoint_every == 0 {
            trainer.checkpoint(&checkpoint)?;
        }
    }
    bar.finish();
    let seconds = started.elapsed().as_secs_f64();
    trainer.checkpoint(&checkpoint)?;
    trainer.save(&args.out)?;
    if let (Some(first), Some(last)) = (first, last) {
        println!(
            "training loss: first step {first:.4}, last step {last:.4}; {:.1} tokens/s over {} steps ({tokens} tokens)",
            tokens as f64 / seconds,
            trainer.steps_done() - start_step
        );
    }
    if let (Some(traffic), Some((sent0, received0))) = (&traffic, payload_before) {
        let (sent, received) = payload(traffic);
        let (sent, received) = (sent - sent0, received - received0);
        let per_token = |bytes: u64| bytes as f64 / tokens.max(1) as f64;
        println!(
            "payload over {} training tokens: {sent} bytes sent to the trunk server ({:.0} per token), {received} received ({:.0} per token)",
            tokens,
            per_token(sent),
            per_token(received)
        );
    }
    report_losses(&mut trainer, &data.held_out, &evals, &eval_noises, "after")?;
    report_privacy(&trainer, privacy_set, "after")?;
    println!("adapter written to {}", args.out.display());
    Ok(())
}

/// Prints the loss and perplexity on the held-out examples (if any) and on each `--eval-data`
/// file, `when` ("before" or "after") training: with the run's own uplink noise, then with
/// each of `noises` (labelled).
fn report_losses(
    trainer: &mut Trainer,
    held_out: &[Example],
    evals: &[(String, Vec<Example>)],
    noises: &[(String, Option<UplinkNoise>)],
    when: &str,
) -> anyhow::Result<()> {
    let held_out = (!held_out.is_empty()).then(|| ("held-out".to_string(), held_out));
    let named = evals
        .iter()
        .map(|(path, set)| (path.clone(), set.as_slice()));
    for (name, set) in held_out.into_iter().chain(named) {
        let print = |label: String, eval: lsplit_train::Evaluation| {
            println!(
                "{name} loss {when}{label}: {:.4} (perplexity {:.3}, {} tokens)",
                eval.loss,
                eval.perplexity(),
                eval.tokens
            );
        };
        print(String::new(), trainer.evaluate(set)?);
        for (label, noise) in noises {
            print(
                format!(" ({label})"),
                trainer.evaluate_with_noise(set, *noise)?,
            );
        }
    }
    Ok(())
}

/// The examples the privacy term is reported on: none without `--privacy-weight`, else the
/// held-out ones (the training ones when none is held out).
fn privacy_set<'a>(args: &FinetuneArgs, data: &'a Dataset) -> &'a [Example] {
    match (args.privacy_weight > 0.0, data.held_out.is_empty()) {
        (false, _) => &[],
        (true, false) => &data.held_out,
        (true, true) => &data.train,
    }
}

/// Prints the mean distance correlation of the head's rows with the public head's on `set`
/// (nothing when it is empty), `when` ("before" or "after") training.
fn report_privacy(trainer: &Trainer, set: &[Example], when: &str) -> anyhow::Result<()> {
    if !set.is_empty() {
        println!(
            "distance correlation with the public head's rows {when}: {:.4} ({} examples)",
            trainer.distance_correlation(set)?,
            set.len()
        );
    }
    Ok(())
}
