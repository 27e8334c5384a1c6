//! `lsplit generate`: stream a completion, head and tail here, trunk in-process or on a
//! trunk server (`--cloud`).

use std::io::Write;
use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use lsplit_attack::Truth;
use lsplit_split::{CaptureWriter, GenerateOptions, Speculate};

use crate::args::{DeviceArgs, SamplingArgs};

/// Options of `lsplit generate`.
#[derive(Debug, Args)]
pub struct GenerateArgs {
    /// The prompt (wrapped in the model's chat template unless --raw)
    pub prompt: String,
    #[command(flatten)]
    pub device: DeviceArgs,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    /// Maximum number of tokens to generate
    #[arg(long, default_value_t = 256)]
    pub max_tokens: usize,
    /// Send the prompt as is, without the chat template
    #[arg(long)]
    pub raw: bool,
    /// Check tokens drafted on the device several per step, saving round trips to the trunk:
    /// off, auto (the source and length that pay over a remote trunk), lookup (n-gram matches
    /// in the prompt and output), lookahead (Jacobi iterations and their n-grams), early-exit
    /// (head straight into tail, skipping the trunk) or draft (--draft-model). The output is the
    /// same whichever is chosen
    #[arg(long, value_name = "SOURCE", default_value_t = Speculate::Off)]
    pub speculate: Speculate,
    /// Print per-part time, bytes per token, tokens per step and tokens/s to stderr
    #[arg(long)]
    pub stats: bool,
    /// Write every message that crosses to and from the trunk into DIR (see PRIVACY.md)
    #[arg(long, value_name = "DIR", conflicts_with = "no_split")]
    pub capture: Option<PathBuf>,
    /// Write the prompt's and the generated token ids, and the drafted ones that were rejected,
    /// to FILE (JSON), for `lsplit attack --truth FILE` to score its guesses against; they
    /// never cross the wire
    #[arg(long, value_name = "FILE")]
    pub save_tokens: Option<PathBuf>,
}

/// Runs the command.
pub fn run(args: GenerateArgs) -> anyhow::Result<()> {
    let options = GenerateOptions {
        max_tokens: args.max_tokens,
        sampling: args.sampling.params()?,
        speculate: args.speculate,
        ..GenerateOptions::default()
    };
    args.device
        .trunk
        .auth
        .check_needed(!args.device.trunk.cloud.is_empty())?;
    let device = args.device.load()?;
    let model = &device.model;
    let prompt = model.prompt_tokens(&args.prompt, args.raw)?;
    let mut session = device.session()?;
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
    if let Some(file) = &args.save_tokens {
        Truth {
            prompt,
            generated: generation.tokens.clone(),
            rejected: Some(generation.rejected.clone()),
        }
        .save(file)?;
    }
    if args.stats {
        let split = device.describe();
        eprintln!(
            "split: {split}, codec: {}, stop: {:?}",
            model.codec(),
            generation.stop
        );
        eprintln!("{}", generation.stats);
        if !args.device.trunk.cloud.is_empty() {
            let servers = args.device.trunk.cloud.join(" then ");
            let on = device
                .trunk_device()
                .map(|d| format!(", computed on {d}"))
                .unwrap_or_default();
            eprintln!(
                "(trunk time is the round trips to {servers}: network plus remote trunk{on})"
            );
        }
    }
    Ok(())
}
