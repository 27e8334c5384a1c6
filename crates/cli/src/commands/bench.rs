//! `lsplit bench`: prefill and decode speed of the unsplit model and a split, side by side.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use lsplit_split::{DeviceModel, LocalTrunk, Sampler, SamplingParams, Session, Trunk};
use lsplit_wire::Codec;

use crate::args::{ModelArgs, SplitArgs};

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
    /// Runs of each configuration (alternating); medians are reported
    #[arg(long, default_value_t = 5)]
    pub runs: usize,
    /// Codec of the split's hidden rows
    #[arg(long, default_value_t = Codec::F32)]
    pub codec: Codec,
}

struct Measure {
    prefill: Vec<f64>,
    decode: Vec<f64>,
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
    let device = candle_core::Device::Cpu;
    let unsplit = DeviceModel::unsplit(&source, tokenizer.clone(), &device)?;
    let split = DeviceModel::split(&source, plan, tokenizer.clone(), args.codec, &device)?;
    let trunk_part = Arc::new(source.load_part(&plan.trunk(), &device)?);
    let prompt = bench_prompt(&unsplit, args.prompt_tokens)?;

    let progress = ProgressBar::new((2 * args.runs) as u64).with_style(
        ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len}")
            .context("progress bar template")?,
    );
    progress.set_message("benchmarking");
    let mut whole = Measure {
        prefill: Vec::new(),
        decode: Vec::new(),
    };
    let mut parts = Measure {
        prefill: Vec::new(),
        decode: Vec::new(),
    };
    for _ in 0..args.runs {
        run_once(
            unsplit.session(None)?,
            &prompt,
            args.decode_tokens,
            &mut whole,
        )?;
        progress.inc(1);
        let trunk: Box<dyn Trunk> = Box::new(LocalTrunk::new(trunk_part.clone()));
        run_once(
            split.session(Some(trunk))?,
            &prompt,
            args.decode_tokens,
            &mut parts,
        )?;
        progress.inc(1);
    }
    progress.finish_and_clear();

    println!(
        "model: {} ({} layers), split {plan}, codec {}, {} runs (median)",
        source.path().display(),
        config.num_layers,
        args.codec,
        args.runs
    );
    println!(
        "{:<28} {:>12} {:>12} {:>14}",
        "measure", "unsplit", "split", "split/unsplit"
    );
    for (name, a, b) in [
        (
            format!("prefill {} tokens (tok/s)", args.prompt_tokens),
            median(&mut whole.prefill),
            median(&mut parts.prefill),
        ),
        (
            format!("decode {} tokens (tok/s)", args.decode_tokens),
            median(&mut whole.decode),
            median(&mut parts.decode),
        ),
    ] {
        println!("{name:<28} {a:>12.1} {b:>12.1} {:>14.3}", b / a);
    }
    Ok(())
}

/// A prompt of exactly `tokens` tokens, from ordinary English text repeated as needed.
fn bench_prompt(model: &DeviceModel, tokens: usize) -> anyhow::Result<Vec<u32>> {
    const TEXT: &str = "The lighthouse keeper climbed the spiral stairs every evening, counting \
        the steps, watching the ships pass in the fading light, and writing in his logbook \
        about the weather, the tides and the birds that nested on the rocks below. ";
    let piece = model.tokenizer().encode(TEXT, false)?;
    anyhow::ensure!(!piece.is_empty(), "the tokenizer produced no tokens");
    Ok(piece.iter().copied().cycle().take(tokens).collect())
}

fn run_once(
    mut session: Session<'_>,
    prompt: &[u32],
    decode_tokens: usize,
    measure: &mut Measure,
) -> anyhow::Result<()> {
    let mut sampler = Sampler::new(SamplingParams::default());
    let mut history = prompt.to_vec();
    let t = Instant::now();
    let mut logits = session.forward(prompt)?;
    measure.prefill.push(rate(prompt.len(), t.elapsed()));
    let t = Instant::now();
    for _ in 0..decode_tokens {
        let next = sampler.sample(&logits, &history);
        history.push(next);
        logits = session.forward(&[next])?;
    }
    measure.decode.push(rate(decode_tokens, t.elapsed()));
    Ok(())
}

fn rate(count: usize, time: Duration) -> f64 {
    count as f64 / time.as_secs_f64().max(f64::MIN_POSITIVE)
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}
