//! `lsplit inspect`: what each part of a split holds.

use clap::Args;
use lsplit_model::{ComputeDevice, PartSpec};

use crate::args::{ModelArgs, SplitArgs};

/// Options of `lsplit inspect`.
#[derive(Debug, Args)]
pub struct InspectArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub split: SplitArgs,
    /// Also list every tensor of every part
    #[arg(long)]
    pub tensors: bool,
    /// Where the trunk would compute (`lsplit serve --device`): cpu, cuda or cuda:N
    #[arg(long, value_name = "DEVICE", default_value_t = ComputeDevice::Cpu)]
    pub device: ComputeDevice,
}

/// Runs the command.
pub fn run(args: InspectArgs) -> anyhow::Result<()> {
    let device = args.device.available()?;
    let (source, _) = args.model.open()?;
    let config = source.config();
    println!("model: {}", source.path().display());
    println!(
        "architecture: {}, {} layers, hidden {}, {} heads / {} KV heads, vocabulary {}, context {}{}",
        config.architecture,
        config.num_layers,
        config.hidden_size,
        config.num_heads,
        config.num_kv_heads,
        config.vocab_size,
        config.context_length,
        if config.tied_embeddings {
            ", tied embeddings"
        } else {
            ""
        }
    );
    let parts = match args.split.plan(config.num_layers)? {
        None => {
            println!("split: none");
            vec![PartSpec::whole(config.num_layers)]
        }
        Some(plan) => {
            println!("split: {plan}");
            println!("where the trunk computes: {device}");
            if let Some(adapter) = source.adapter() {
                adapter.check_off_trunk(plan.k1..plan.k2)?;
            }
            vec![plan.head(), plan.trunk(), plan.tail()]
        }
    };
    if let Some(adapter) = source.adapter() {
        println!("adapter: {}", adapter.describe());
    }
    println!(
        "{:<6} {:<10} {:>8} {:>14} {:>14}  where",
        "part", "layers", "tensors", "parameters", "bytes"
    );
    for spec in &parts {
        let tensors = source.part_tensors(spec)?;
        let params: u64 = tensors.iter().map(|t| t.params()).sum();
        let bytes: u64 = tensors.iter().map(|t| t.bytes).sum();
        let place = match spec.kind {
            lsplit_model::PartKind::Trunk => "cloud",
            _ => "device",
        };
        println!(
            "{:<6} {:<10} {:>8} {:>14} {:>14}  {place}",
            spec.kind.name(),
            format!("{}..{}", spec.layers.start, spec.layers.end),
            tensors.len(),
            params,
            bytes
        );
        if let Some(adapter) = source.adapter() {
            match adapter.layers_in(spec.layers.clone()) {
                layers if layers.is_empty() => println!("       adapter: none"),
                layers => println!(
                    "       adapter: {} on layers {layers:?}",
                    adapter.dir().display()
                ),
            }
        }
        if args.tensors {
            for t in &tensors {
                println!(
                    "    {:<40} {:<8} {:?} {} B",
                    t.name, t.dtype, t.shape, t.bytes
                );
            }
        }
    }
    Ok(())
}
