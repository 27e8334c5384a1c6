//! `lsplit bench`: prefill and decode speed of the unsplit model and a split, side by side;
//! with `--quality`, the lossy codecs' effect on the split's output instead.

use std::ops::ControlFlow;
use std::sync::Arc;

use anyhow::Context;
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use lsplit_model::{ModelPart, SplitPlan};
use lsplit_split::{DeviceModel, GenerateOptions, Obfuscation, Session, Speculate, SplitPolicy};
use lsplit_tokenizer::Tokenizer;
use lsplit_wire::Codec;

use crate::args::{DraftArgs, ModelArgs, SplitArgs};

/// Options of `lsplit bench`.
#[derive(Debug, Args)]
pub struct BenchArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// The split to compare with the unsplit model
    #[command(flatten)]
    pub split: SplitArgs,
    /// Prompt length of the prefill measure, in tokens
    #[arg(long, default_value_t = 256)]
    pub prompt_tokens: usize,
    /// Greedy tokens of the decode measure
    #[arg(long, default_value_t = 128)]
    pub decode_tokens: usize,
    /// Runs of each configuration, taking turns in alternating order (unsplit, split, split,
    /// unsplit, ...); medians are reported
    #[arg(long, default_value_t = 5)]
    pub runs: usize,
    /// Codec of the split's hidden rows
    #[arg(long, default_value_t = Codec::F32)]
    pub codec: Codec,
    /// Measure only this configuration; only it is loaded, so the peak memory is its own
    #[arg(long, value_name = "CONFIG")]
    pub only: Option<Config>,
    /// Check tokens drafted on the device several per step, saving round trips to the trunk
    /// (decode measure): off, auto (the source and length that pay over a remote trunk), lookup
    /// (n-gram matches in the prompt and output), lookahead (Jacobi iterations and their
    /// n-grams), early-exit (head straight into tail; the unsplit column runs off) or draft
    /// (--draft-model). The output is the same whichever is chosen
    #[arg(long, value_name = "SOURCE", default_value_t = Speculate::Off)]
    pub speculate: Speculate,
    #[command(flatten)]
    pub draft: DraftArgs,
    /// Pass one token through each configuration, untimed, before the runs
    #[arg(long)]
    pub warmup: bool,
    /// Print every run and the medians as one JSON object instead of the table
    #[arg(long)]
    pub json: bool,
    /// Measure quality instead of speed: greedy agreement and max logit error of the f16,
    /// bf16 and int8 codecs against f32, over 24 built-in prompts of --decode-tokens tokens
    #[arg(long, conflicts_with_all = ["only", "codec", "runs", "warmup", "prompt_tokens"])]
    pub quality: bool,
}

/// A configuration that `lsplit bench` measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Config {
    /// The whole model in one part
    Unsplit,
    /// The split, with the trunk in-process
    Split,
}

impl Config {
    fn name(self) -> &'static str {
        match self {
            Self::Unsplit => "unsplit",
            Self::Split => "split",
        }
    }

    /// The drafting this configuration measures: early exit needs a split, so the unsplit
    /// model runs one-token steps instead.
    fn speculate(self, speculate: Speculate) -> Speculate {
        match (self, speculate) {
            (Self::Unsplit, Speculate::EarlyExit) => Speculate::Off,
            (_, other) => other,
        }
    }
}

#[derive(Default)]
struct Measure {
    prefill: Vec<f64>,
    decode: Vec<f64>,
}

impl Measure {
    /// Median prefill and decode tokens/s.
    fn medians(&self) -> [f64; 2] {
        [median(&self.prefill), median(&self.decode)]
    }
}

/// One measured configuration: its device model, its in-process trunk if split, its runs.
struct Column {
    config: Config,
    model: DeviceModel,
    trunk: Option<Arc<ModelPart>>,
    measure: Measure,
}

/// Runs the command.
pub fn run(args: BenchArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.runs > 0, "--runs must be at least 1");
    anyhow::ensure!(args.prompt_tokens > 0, "--prompt-tokens must be at least 1");
    let (source, tokenizer) = args.model.open()?;
    let config = source.config();
    anyhow::ensure!(
        args.prompt_tokens + args.decode_tokens <= config.context_length,
        "--prompt-tokens + --decode-tokens must fit the context length of {}",
        config.context_length
    );
    let plan = args.split.plan(config.num_layers)?.context(
        "bench compares a split with the unsplit model: give --split or -n, not --no-split",
    )?;
    if args.quality {
        return crate::commands::codec_quality::run(
            &source,
            tokenizer,
            plan,
            args.decode_tokens,
            args.json,
        );
    }
    let device = candle_core::Device::Cpu;
    let draft = args.draft.load(&tokenizer)?;
    let with_draft = |model: DeviceModel| match &draft {
        Some(draft) => model.with_draft_model(draft.clone()),
        None => model,
    };
    let mut columns = Vec::new();
    if args.only != Some(Config::Split) {
        columns.push(Column {
            config: Config::Unsplit,
            model: with_draft(DeviceModel::unsplit(&source, tokenizer.clone(), &device)?),
            trunk: None,
            measure: Measure::default(),
        });
    }
    if args.only != Some(Config::Unsplit) {
        columns.push(Column {
            config: Config::Split,
            model: with_draft(DeviceModel::split(
                &source,
                SplitPolicy::fixed(plan),
                tokenizer.clone(),
                args.codec,
                &device,
            )?),
            trunk: Some(Arc::new(source.load_part(&plan.trunk(), &device)?)),
            measure: Measure::default(),
        });
    }
    let prompt = bench_prompt(&tokenizer, args.prompt_tokens)?;

    if args.warmup {
        for column in &columns {
            session(&column.model, &column.trunk)?.forward(&prompt[..1])?;
        }
    }
    let progress = ProgressBar::new((columns.len() * args.runs) as u64).with_style(
        ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len}")
            .context("progress bar template")?,
    );
    progress.set_message("benchmarking");
    for run in 0..args.runs {
        // The columns take turns in alternating order (unsplit, split, split, unsplit, ...), so
        // that neither always runs in the state the other leaves the machine in.
        let mut order: Vec<usize> = (0..columns.len()).collect();
        if run % 2 == 1 {
            order.reverse();
        }
        for i in order {
            let column = &mut columns[i];
            run_once(
                session(&column.model, &column.trunk)?,
                &prompt,
                args.decode_tokens,
                column.config.speculate(args.speculate),
                &mut column.measure,
            )?;
            progress.inc(1);
        }
    }
    progress.finish_and_clear();

    if args.json {
        print_json(&args, config.num_layers, plan, &columns);
        return Ok(());
    }
    println!(
        "model: {} ({} layers), split {plan}, codec {}, speculate {}, {} runs (median)",
        source.path().display(),
        config.num_layers,
        args.codec,
        args.speculate,
        args.runs
    );
    print!("{:<28}", "measure");
    for column in &columns {
        print!(" {:>12}", column.config.name());
    }
    if columns.len() == 2 {
        print!(" {:>14}", "split/unsplit");
    }
    println!();
    let names = [
        format!("prefill {} tokens (tok/s)", args.prompt_tokens),
        format!("decode {} tokens (tok/s)", args.decode_tokens),
    ];
    for (row, name) in names.iter().enumerate() {
        let values: Vec<f64> = columns.iter().map(|c| c.measure.medians()[row]).collect();
        print!("{name:<28}");
        for value in &values {
            print!(" {value:>12.1}");
        }
        if let [a, b] = values[..] {
            print!(" {:>14.3}", b / a);
        }
        println!();
    }
    Ok(())
}

/// A new session of a column's model, with a fresh in-process trunk if it is split.
fn session<'a>(
    model: &'a DeviceModel,
    trunk: &Option<Arc<ModelPart>>,
) -> anyhow::Result<Session<'a>> {
    let Some(part) = trunk else {
        return Ok(model.unsplit_session()?);
    };
    Ok(model.local_session(part, Obfuscation::None)?)
}

/// Prints the options, every run and the medians of each configuration as one JSON object.
fn print_json(args: &BenchArgs, layers: usize, plan: SplitPlan, columns: &[Column]) {
    let list = |values: &[f64]| {
        let items: Vec<String> = values.iter().map(f64::to_string).collect();
        items.join(",")
    };
    let configs: Vec<String> = columns
        .iter()
        .map(|c| {
            let [prefill, decode] = c.measure.medians();
            format!(
                r#""{}":{{"prefill":[{}],"decode":[{}],"prefill_median":{prefill},"decode_median":{decode}}}"#,
                c.config.name(),
                list(&c.measure.prefill),
                list(&c.measure.decode),
            )
        })
        .collect();
    println!(
        r#"{{"layers":{layers},"split":"{plan}","codec":"{}","speculate":"{}","prompt_tokens":{},"decode_tokens":{},"runs":{},{}}}"#,
        args.codec,
        args.speculate,
        args.prompt_tokens,
        args.decode_tokens,
        args.runs,
        configs.join(",")
    );
}

/// A prompt of exactly `tokens` tokens, from ordinary English text repeated as needed.
fn bench_prompt(tokenizer: &Tokenizer, tokens: usize) -> anyhow::Result<Vec<u32>> {
    const TEXT: &str = "The lighthouse keeper climbed the spiral stairs every evening, counting \
        the steps, watching the ships pass in the fading light, and writing in his logbook \
        about the weather, the tides and the birds that nested on the rocks below. ";
    let piece = tokenizer.encode(TEXT, false)?;
    anyhow::ensure!(!piece.is_empty(), "the tokenizer produced no tokens");
    Ok(piece.iter().copied().cycle().take(tokens).collect())
}

/// One measured run: the prompt's prefill, then `decode_tokens` greedy decode steps (through
/// end-of-sequence tokens), timed by the session's own loop.
fn run_once(
    mut session: Session<'_>,
    prompt: &[u32],
    decode_tokens: usize,
    speculate: Speculate,
    measure: &mut Measure,
) -> anyhow::Result<()> {
    // The last token is sampled after the `decode_tokens`-th decode step, and not run.
    let options = GenerateOptions {
        max_tokens: decode_tokens + 1,
        ignore_eos: true,
        speculate,
        ..GenerateOptions::default()
    };
    let generation =
        session.generate_steps(prompt, &options, &mut |_| ControlFlow::Continue(()))?;
    let stats = &generation.stats;
    measure.prefill.push(stats.prefill_tokens_per_second());
    measure.decode.push(stats.decode_tokens_per_second());
    Ok(())
}

fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    sorted[sorted.len() / 2]
}
