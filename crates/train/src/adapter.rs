//! The adapter being trained: one LoRA pair of variables per target of each device layer.

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{Device, Tensor, Var};
use lsplit_model::{
    LayerPairs, LlamaConfig, LoraPair, LoraShape, ModelFormat, Target, lora_scale, write_peft,
};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::Result;

/// LoRA matrices being trained, in the model file's row order.
#[derive(Debug)]
pub struct TrainableAdapter {
    shape: LoraShape,
    pairs: BTreeMap<(usize, Target), [Var; 2]>,
}

impl TrainableAdapter {
    /// A fresh adapter of `shape` as PEFT initialises one: `A` uniform in `±1/sqrt(in)` (Kaiming
    /// uniform with `a = sqrt(5)`), drawn from `seed`, and `B` zero, so that it starts as the
    /// base model.
    pub fn new(shape: LoraShape, config: &LlamaConfig, seed: u64) -> Result<Self> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut pairs = BTreeMap::new();
        for &layer in &shape.layers {
            for &target in &shape.targets {
                let [(_, [r, inp]), (_, [out, _])] =
                    target.lora_matrices(layer, shape.rank, config);
                let bound = 1.0 / (inp as f32).sqrt();
                let a: Vec<f32> = (0..r * inp)
                    .map(|_| rng.random_range(-bound..bound))
                    .collect();
                let a = Var::from_tensor(&Tensor::from_vec(a, (r, inp), &Device::Cpu)?)?;
                let b = Var::zeros((out, r), candle_core::DType::F32, &Device::Cpu)?;
                pairs.insert((layer, target), [a, b]);
            }
        }
        Ok(Self { shape, pairs })
    }

    /// What it is: rank, alpha, targets and layers.
    pub fn shape(&self) -> &LoraShape {
        &self.shape
    }

    /// Its variables, `A` then `B` of each pair, by layer then target.
    pub fn vars(&self) -> impl Iterator<Item = &Var> {
        self.pairs.values().flatten()
    }

    /// Its number of trained values.
    pub fn params(&self) -> usize {
        self.vars().map(|v| v.elem_count()).sum()
    }

    /// The pairs of model layer `layer` as the training pass applies them.
    pub fn layer_pairs(&self, layer: usize) -> Option<LayerPairs> {
        let scale = lora_scale(self.shape.alpha, self.shape.rank, self.shape.rslora);
        let pairs: LayerPairs = self
            .pairs
            .range((layer, Target::Q)..=(layer, Target::Down))
            .map(|(&(_, target), [a, b])| {
                let pair = LoraPair {
                    a: a.as_tensor().clone(),
                    b: b.as_tensor().clone(),
                    scale,
                };
                (target, pair)
            })
            .collect();
        (!pairs.is_empty()).then_some(pairs)
    }

    /// Sets every variable from `values` (in [`TrainableAdapter::vars`]' order), checking shapes.
    pub fn set(&self, values: &[Tensor]) -> Result<()> {
        if values.len() != self.pairs.len() * 2 {
            return Err(crate::TrainError::Options(format!(
                "{} tensors for an adapter of {}",
                values.len(),
                self.pairs.len() * 2
            )));
        }
        for (var, value) in self.vars().zip(values) {
            var.set(value)?;
        }
        Ok(())
    }

    /// Writes it in PEFT's format into `dir`, for a model of `config` stored as `format`.
    pub fn save(&self, dir: &Path, config: &LlamaConfig, format: ModelFormat) -> Result<()> {
        let matrices = self
            .pairs
            .iter()
            .map(|(&key, [a, b])| (key, (a.as_tensor().clone(), b.as_tensor().clone())))
            .collect();
        Ok(write_peft(dir, &self.shape, &matrices, config, format)?)
    }
}
