//! `lsplit generate`: stream a completion, head and tail here, trunk in-process.

use std::io::Write;
use std::sync::Arc;

use clap::Args;
use lsplit_split::{DeviceModel, GenerateOptions, LocalTrunk, Trunk};
use lsplit_wire::Codec;

use crate::args::{ModelArgs, SamplingArgs, SplitArgs};

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
}

/// Runs the command.
pub fn run(args: GenerateArgs) -> anyhow::Result<()> {
    let options = GenerateOptions {
        max_tokens: args.max_tokens,
        sampling: args.sampling.params()?,
    };
    let (source, tokenizer) = args.model.open()?;
    let device = candle_core::Device::Cpu;
    let plan = args.split.plan(source.config().num_layers)?;
    let (model, trunk) = match plan {
        None => (DeviceModel::unsplit(&source, tokenizer, &device)?, None),
        Some(plan) => {
            let model = DeviceModel::split(&source, plan, tokenizer, args.codec, &device)?;
            let part = Arc::new(source.load_part(&plan.trunk(), &device)?);
            let trunk: Box<dyn Trunk> = Box::new(LocalTrunk::new(part));
            (model, Some(trunk))
        }
    };
    tracing::info!(split = ?model.plan(), codec = %model.codec(), "model loaded");
    let prompt = model.prompt_tokens(&args.prompt, args.raw)?;
    let mut session = model.session(trunk)?;
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
        let split = model
            .plan()
            .map_or("none (whole model in one part)".to_string(), |p| {
                p.to_string()
            });
        eprintln!(
            "split: {split}, codec: {}, stop: {:?}",
            model.codec(),
            generation.stop
        );
        eprintln!("{}", generation.stats);
    }
    Ok(())
}
