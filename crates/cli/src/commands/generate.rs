//! `lsplit generate`: stream a completion, head and tail here, trunk in-process or on a
//! trunk server (`--cloud`).

use std::io::Write;

use clap::Args;
use lsplit_split::GenerateOptions;

use crate::args::{ModelArgs, SamplingArgs, SplitArgs, TrunkArgs};
use crate::device::{self, Device, TrunkSource};

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
    /// Print per-part time, bytes per token and tokens/s to stderr
    #[arg(long)]
    pub stats: bool,
    #[command(flatten)]
    pub trunk: TrunkArgs,
}

/// Runs the command.
pub fn run(args: GenerateArgs) -> anyhow::Result<()> {
    let options = GenerateOptions {
        max_tokens: args.max_tokens,
        sampling: args.sampling.params()?,
    };
    let Device { model, trunks, .. } = device::load(&args.model, &args.split, &args.trunk)?;
    let trunk = trunks.as_ref().map(TrunkSource::open).transpose()?;
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
        if let Some(url) = &args.trunk.cloud {
            eprintln!("(trunk time is the round trips to {url}: network plus remote trunk)");
        }
    }
    Ok(())
}
