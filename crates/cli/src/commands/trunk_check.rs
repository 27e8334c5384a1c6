//! `lsplit trunk-check`: the trunk on a compute device (`--device cuda`) against the same trunk
//! on the CPU, and its speed with many concurrent sessions; prints what
//! [`lsplit_split::devices`] measures. `scripts/gpu-check.sh` runs it on the GPU machine.

use anyhow::Context;
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use lsplit_model::ComputeDevice;
use lsplit_split::codecs::PROMPTS;
use lsplit_split::devices;
use serde_json::json;

use crate::args::{ModelArgs, SplitArgs};

/// Options of `lsplit trunk-check`.
#[derive(Debug, Args)]
pub struct TrunkCheckArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub split: SplitArgs,
    /// The device whose trunk is checked against the CPU's: cpu, cuda or cuda:N
    #[arg(long, value_name = "DEVICE", default_value_t = ComputeDevice::Cpu)]
    pub device: ComputeDevice,
    /// Built-in prompts (those of `lsplit bench --quality`) of the agreement check; 0 skips it
    #[arg(long, default_value_t = PROMPTS.len() as u64, value_parser = clap::value_parser!(u64).range(0..=PROMPTS.len() as u64))]
    pub prompts: u64,
    /// Greedy tokens per prompt of the agreement check
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u64).range(1..=4096))]
    pub tokens: u64,
    /// Sessions of the batched-against-solo check on --device; 0 skips it
    #[arg(long, default_value_t = 8)]
    pub batch_sessions: usize,
    /// Decode steps of the batched-against-solo check, after each session's prompt
    #[arg(long, default_value_t = 4)]
    pub batch_steps: usize,
    /// Concurrent sessions to time the trunk with on --device (e.g. 1,16,64,256); none skips it
    #[arg(long, value_name = "LIST", value_delimiter = ',')]
    pub sessions: Vec<usize>,
    /// Positions each timed session holds before its timed steps
    #[arg(long, default_value_t = 16)]
    pub context: usize,
    /// Timed decode steps (one row per session each)
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u64).range(1..))]
    pub steps: u64,
    /// Print one JSON object instead of lines
    #[arg(long)]
    pub json: bool,
}

/// Runs the command.
pub fn run(args: TrunkCheckArgs) -> anyhow::Result<()> {
    let device = args.device.open()?;
    let (source, tokenizer) = args.model.open()?;
    let plan = args
        .split
        .plan(source.config().num_layers)?
        .context("trunk-check needs a split with a trunk: leave out --no-split")?;
    anyhow::ensure!(
        args.sessions.iter().all(|&n| n > 0),
        "--sessions counts must be at least 1"
    );
    let mut report = json!({
        "model": source.path().display().to_string(),
        "split": plan.to_string(),
        "device": args.device.to_string(),
        "reference": "cpu",
    });
    let say = |line: String| {
        if !args.json {
            println!("{line}");
        }
    };
    say(format!(
        "model: {}, split {plan}, trunk on {} against the trunk on the CPU",
        source.path().display(),
        args.device
    ));

    if args.prompts > 0 {
        let progress = ProgressBar::new(args.prompts).with_style(
            ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len}")
                .context("progress bar template")?,
        );
        progress.set_message("greedy runs on both trunks");
        let result = devices::agreement(
            &source,
            tokenizer,
            plan,
            &device,
            (args.prompts as usize, args.tokens as usize),
            &mut |done, _| progress.set_position(done as u64),
        )?;
        progress.finish_and_clear();
        let tokens: usize = result.per_prompt.iter().map(|a| a.tokens).sum();
        let percent = 100.0 * result.agreeing_tokens() as f64 / tokens.max(1) as f64;
        say(format!(
            "agreement: {}/{} prompts identical, {}/{tokens} greedy tokens ({percent:.2}%), \
             largest logit difference {}",
            result.identical(),
            result.per_prompt.len(),
            result.agreeing_tokens(),
            result.max_logit_error()
        ));
        report["agreement"] = json!({
            "prompts": result.per_prompt.len(),
            "tokens_per_prompt": args.tokens,
            "identical_prompts": result.identical(),
            "agreeing_tokens": result.agreeing_tokens(),
            "tokens": tokens,
            "agreement_percent": percent,
            "max_logit_difference": result.max_logit_error(),
            "median_prompt_max_logit_difference": result.median_logit_error(),
        });
    }

    let part = (args.batch_sessions > 0 || !args.sessions.is_empty())
        .then(|| source.load_part(&plan.trunk(), &device))
        .transpose()?;
    if let Some(part) = &part {
        if args.batch_sessions > 0 {
            let largest =
                devices::batched_against_solo(part, args.batch_sessions, args.batch_steps)?;
            say(format!(
                "batched against solo on {}: {} sessions, {} decode steps, largest difference \
                 {largest}{}",
                args.device,
                args.batch_sessions,
                args.batch_steps,
                if largest == 0.0 { " (identical)" } else { "" }
            ));
            report["batched_vs_solo"] = json!({
                "sessions": args.batch_sessions,
                "steps": args.batch_steps,
                "max_difference": largest,
                "identical": largest == 0.0,
            });
        }
        let mut timings = Vec::new();
        for &sessions in &args.sessions {
            let rate =
                devices::steps_per_second(part, sessions, args.context, args.steps as usize)?;
            say(format!(
                "{sessions} sessions at context {}: {rate:.1} trunk steps/s in all",
                args.context
            ));
            timings.push(json!({
                "sessions": sessions,
                "context": args.context,
                "steps": args.steps,
                "steps_per_second": rate,
            }));
        }
        if !timings.is_empty() {
            report["throughput"] = json!(timings);
        }
    }
    if args.json {
        println!("{report}");
    }
    Ok(())
}
