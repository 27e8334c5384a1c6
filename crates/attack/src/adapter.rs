//! A private adapter for the table: a LoRA adapter in PEFT's format with random matrices, which
//! only the device holds. It stands in for a fine-tuned one (`lsplit finetune` does not exist
//! yet): what matters to the attacker is that the head's weights are not the public ones.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{Device, Tensor};
use lsplit_model::{LlamaConfig, Target};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha20Rng;
use rand_distr::StandardNormal;

use crate::AttackError;

/// Rank of the table's private adapter.
pub const RANK: usize = 8;

/// Writes into `dir` a LoRA adapter of every projection of `layers`, rank [`RANK`], drawn
/// from `seed`: `A` with entries of variance `1/in` and `B` of variance `strength²/r`, so that
/// each update's RMS is about `strength` times its input's (`alpha = r`: scale 1).
pub fn write_random_adapter(
    dir: &Path,
    config: &LlamaConfig,
    layers: &[usize],
    strength: f32,
    seed: u64,
) -> Result<(), AttackError> {
    let io = |source: std::io::Error| AttackError::Scratch {
        path: dir.to_path_buf(),
        source,
    };
    std::fs::create_dir_all(dir).map_err(io)?;
    let mut rng = ChaCha20Rng::seed_from_u64(seed);
    let mut tensors = HashMap::new();
    for &layer in layers {
        for target in Target::ALL {
            for (i, (name, shape)) in target
                .lora_matrices(layer, RANK, config)
                .into_iter()
                .enumerate()
            {
                let std = if i == 0 {
                    1.0 / (shape[1] as f32).sqrt()
                } else {
                    strength / (RANK as f32).sqrt()
                };
                let values: Vec<f32> = (0..shape[0] * shape[1])
                    .map(|_| std * rng.sample::<f32, _>(StandardNormal))
                    .collect();
                tensors.insert(
                    name,
                    Tensor::from_vec(values, (shape[0], shape[1]), &Device::Cpu)?,
                );
            }
        }
    }
    candle_core::safetensors::save(&tensors, dir.join("adapter_model.safetensors"))?;
    let modules: Vec<&str> = Target::ALL.iter().map(|t| t.module()).collect();
    let config = serde_json::json!({
        "peft_type": "LORA",
        "r": RANK,
        "lora_alpha": RANK,
        "target_modules": modules,
        "layers_to_transform": layers,
        "bias": "none",
    });
    std::fs::write(dir.join("adapter_config.json"), config.to_string()).map_err(io)
}
