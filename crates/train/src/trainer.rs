//! The device's training loop: the head and tail with the adapter, the trunk behind
//! [`TrainTrunk`], AdamW, checkpoints that resume exactly.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Arc;

use candle_core::{D, Device, Tensor, Var};
use lsplit_model::{
    DenseLayer, DenseOutput, LoraShape, ModelPart, ModelSource, Pass, SplitPlan, Target,
};
use lsplit_split::{UplinkNoise, add_noise};
use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::{ChaCha8Rng, ChaCha20Rng};
use serde::{Deserialize, Serialize};

use crate::privacy::distance_correlation;
use crate::{AdamW, Example, Result, Schedule, TrainError, TrainTrunk, TrainableAdapter};

/// What a run trains and how.
#[derive(Debug, Clone)]
pub struct TrainOptions {
    /// LoRA rank.
    pub rank: usize,
    /// LoRA alpha.
    pub alpha: f64,
    /// rsLoRA's scale `alpha / sqrt(r)`.
    pub rslora: bool,
    /// The projections adapted in each device layer.
    pub targets: Vec<Target>,
    /// Peak learning rate.
    pub lr: f64,
    /// Optimizer steps in the whole run.
    pub steps: usize,
    /// Steps of linear warmup.
    pub warmup: usize,
    /// The learning rate after warmup.
    pub schedule: Schedule,
    /// Examples whose gradients make one step.
    pub accumulate: usize,
    /// AdamW's decoupled weight decay.
    pub weight_decay: f64,
    /// Seeds the adapter's initialisation and the order of the examples.
    pub seed: u64,
    /// Weight of the privacy term added to each step's loss: the mean, over the step's
    /// examples, of the distance correlation between the head's output rows and the public
    /// head's rows for the same tokens ([`distance_correlation`]); 0 trains for the task alone.
    pub privacy_weight: f64,
    /// Noise added to the rows the trunk receives, in training and in [`Trainer::evaluate`], as
    /// `lsplit generate --uplink-noise` adds it, so that the tail's adapter learns to undo its
    /// effect (a device-side denoiser); drawn from its seed, else from `seed`.
    pub uplink_noise: Option<UplinkNoise>,
}

/// What one optimizer step did.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepReport {
    /// Steps done, this one included.
    pub step: usize,
    /// Mean cross-entropy per trained token of the step's examples (before the update).
    pub loss: f64,
    /// Tokens that went through the model.
    pub tokens: usize,
    /// The learning rate the update used.
    pub lr: f64,
    /// Mean distance correlation of the step's head rows with the public head's (before the
    /// update), when the run has a privacy term.
    pub privacy: Option<f64>,
}

/// The loss over some examples.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Evaluation {
    /// Mean cross-entropy per trained token, in nats.
    pub loss: f64,
    /// Trained tokens counted.
    pub tokens: usize,
}

impl Evaluation {
    /// `exp(loss)`.
    pub fn perplexity(&self) -> f64 {
        self.loss.exp()
    }
}

/// What a checkpoint's `state.json` records, to refuse resuming a different run.
#[derive(Debug, Serialize, Deserialize, PartialEq)]
struct State {
    step: usize,
    split: String,
    rank: usize,
    alpha: f64,
    rslora: bool,
    targets: Vec<String>,
    layers: Vec<usize>,
    seed: u64,
    accumulate: usize,
    /// Absent from checkpoints written before the privacy term: 0.
    #[serde(default)]
    privacy_weight: f64,
    /// The uplink noise's sigma, clip and seed; absent from checkpoints written before it, and
    /// for runs without noise.
    #[serde(default)]
    uplink_noise: Option<(f32, Option<f32>, u64)>,
}

impl State {
    /// What makes the run, for a refusal to resume another.
    fn describe(&self) -> String {
        let noise = match self.uplink_noise {
            None => "none".to_string(),
            Some((sigma, None, seed)) => format!("{sigma} (seed {seed})"),
            Some((sigma, Some(clip), seed)) => format!("{sigma} (clip {clip}, seed {seed})"),
        };
        format!(
            "split {}, rank {}, targets {}, seed {}, accumulate {}, privacy weight {}, uplink \
             noise {noise}",
            self.split,
            self.rank,
            self.targets.join(","),
            self.seed,
            self.accumulate,
            self.privacy_weight
        )
    }
}

/// The first of the ChaCha20 streams of held-out examples' noise; the streams below it are
/// the training positions', so no held-out draw repeats a training one.
const EVAL_STREAMS: u64 = 1 << 63;

/// Split fine-tuning of a LoRA adapter on the head's and tail's layers.
pub struct Trainer {
    source: Arc<ModelSource>,
    plan: SplitPlan,
    embeddings: ModelPart,
    layers: BTreeMap<usize, DenseLayer>,
    output: DenseOutput,
    adapter: TrainableAdapter,
    optimizer: AdamW,
    trunk: Box<dyn TrainTrunk>,
    options: TrainOptions,
}

impl Trainer {
    /// A fresh run on the model `source` split at `plan`, reaching its trunk through `trunk`.
    pub fn new(
        source: Arc<ModelSource>,
        plan: SplitPlan,
        options: TrainOptions,
        trunk: Box<dyn TrainTrunk>,
    ) -> Result<Self> {
        let layers: Vec<usize> = plan.head().layers.chain(plan.tail().layers).collect();
        if layers.is_empty() {
            return Err(TrainError::Options(format!(
                "the split {plan} leaves the device no layers to adapt"
            )));
        }
        if options.steps == 0 || options.accumulate == 0 || options.rank == 0 {
            return Err(TrainError::Options(
                "steps, accumulation and rank must be at least 1".into(),
            ));
        }
        if !(options.privacy_weight.is_finite() && options.privacy_weight >= 0.0) {
            return Err(TrainError::Options(format!(
                "the privacy weight {} is not a number of at least 0",
                options.privacy_weight
            )));
        }
        if options.privacy_weight > 0.0 && plan.head().layers.is_empty() {
            return Err(TrainError::Options(format!(
                "the split {plan} leaves the device no head layer: a privacy term has no rows to \
                 change"
            )));
        }
        if options.uplink_noise.is_some() && plan.k1 == plan.k2 {
            return Err(TrainError::Options(format!(
                "the split {plan} sends no rows to a trunk: uplink noise has nothing to noise"
            )));
        }
        if options.targets.is_empty() {
            return Err(TrainError::Options("no target modules to adapt".into()));
        }
        if !(options.lr.is_finite() && options.lr > 0.0) {
            return Err(TrainError::Options(format!(
                "the learning rate {} is not a positive number",
                options.lr
            )));
        }
        let shape = LoraShape {
            rank: options.rank,
            alpha: options.alpha,
            rslora: options.rslora,
            targets: options.targets.clone(),
            layers: layers.clone(),
        };
        let adapter = TrainableAdapter::new(shape, source.config(), options.seed)?;
        let optimizer = AdamW::new(adapter.vars(), options.weight_decay)?;
        let embed_only = SplitPlan::new(0, 0, source.config().num_layers)?.head();
        Ok(Self {
            embeddings: source.load_part(&embed_only, &Device::Cpu)?,
            layers: layers
                .iter()
                .map(|&l| Ok((l, source.dense_layer(l)?)))
                .collect::<Result<_>>()?,
            output: source.dense_output()?,
            source,
            plan,
            adapter,
            optimizer,
            trunk,
            options,
        })
    }

    /// The adapter being trained.
    pub fn adapter(&self) -> &TrainableAdapter {
        &self.adapter
    }

    /// Steps done.
    pub fn steps_done(&self) -> usize {
        self.optimizer.steps()
    }

    /// One optimizer step over the next `accumulate` examples of `data` (in an order drawn
    /// from the seed, epoch by epoch, so that a resumed run draws what the whole run would).
    pub fn step(&mut self, data: &[Example]) -> Result<StepReport> {
        if data.is_empty() {
            return Err(TrainError::NoData("no training examples".into()));
        }
        let step = self.optimizer.steps();
        let picked: Vec<(usize, &Example)> = (0..self.options.accumulate)
            .map(|micro| {
                let position = step * self.options.accumulate + micro;
                let epoch = position / data.len();
                let mut order: Vec<usize> = (0..data.len()).collect();
                order.shuffle(&mut ChaCha8Rng::seed_from_u64(
                    self.options.seed ^ (epoch as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15),
                ));
                (position, &data[order[position % data.len()]])
            })
            .collect();
        let targets: usize = picked.iter().map(|(_, e)| e.targets()).sum();
        let vars: Vec<Var> = self.adapter.vars().cloned().collect();
        let mut sums: Vec<Option<Tensor>> = vec![None; vars.len()];
        let mut total = 0.0;
        let mut privacy = 0.0;
        let weight = self.options.privacy_weight / picked.len() as f64;
        for &(position, example) in &picked {
            let pass = Pass::new(self.source.config(), example.ids.len())?;
            let noise = self.options.uplink_noise;
            let (head_out, tail_in, loss) =
                self.loss_sum(example, &pass, noise, position as u64)?;
            total += loss.to_scalar::<f32>()? as f64;
            let tail_grads = (loss / targets as f64)?.backward()?;
            let row_grad = tail_grads
                .get(tail_in.as_tensor())
                .ok_or_else(|| TrainError::Trunk("no gradient reached the tail's input".into()))?;
            // Detached: what crosses to the trunk and back is values, never a graph.
            let up_grad = self.trunk.backward(&row_grad.detach())?.detach();
            let head_grads = match head_out {
                Some(rows) => {
                    let mut objective = (&rows * up_grad)?.sum_all()?;
                    if weight > 0.0 {
                        let public = self.public_rows(&example.ids, &pass)?;
                        let term = distance_correlation(&rows, &public)?;
                        privacy += term.to_scalar::<f32>()? as f64;
                        objective = (objective + (term * weight)?)?;
                    }
                    Some(objective.backward()?)
                }
                None => None,
            };
            for (var, sum) in vars.iter().zip(&mut sums) {
                let grad = tail_grads
                    .get(var.as_tensor())
                    .or_else(|| head_grads.as_ref().and_then(|g| g.get(var.as_tensor())));
                if let Some(grad) = grad.map(Tensor::detach) {
                    *sum = Some(match sum.take() {
                        Some(s) => (s + grad)?,
                        None => grad,
                    });
                }
            }
        }
        let grads = vars
            .iter()
            .zip(sums)
            .map(|(v, s)| s.map_or_else(|| v.zeros_like(), Ok))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let o = &self.options;
        let lr = o.lr * o.schedule.factor(step, o.steps, o.warmup);
        self.optimizer.step(vars.iter(), &grads, lr)?;
        Ok(StepReport {
            step: step + 1,
            loss: total / targets as f64,
            tokens: picked.iter().map(|(_, e)| e.ids.len()).sum(),
            lr,
            privacy: (weight > 0.0).then(|| privacy / picked.len() as f64),
        })
    }

    /// The loss over `data`, with the adapter as it is now and the run's uplink noise.
    pub fn evaluate(&mut self, data: &[Example]) -> Result<Evaluation> {
        self.evaluate_with_noise(data, self.options.uplink_noise)
    }

    /// The loss over `data`, with the adapter as it is now and `noise` (none: none) on the rows
    /// the trunk receives. Example `i` draws the same noise at every call, so that losses
    /// before and after training differ by the adapter alone.
    pub fn evaluate_with_noise(
        &mut self,
        data: &[Example],
        noise: Option<UplinkNoise>,
    ) -> Result<Evaluation> {
        let (mut total, mut tokens) = (0.0, 0);
        for (i, example) in data.iter().enumerate() {
            let pass = Pass::new(self.source.config(), example.ids.len())?;
            let (_, _, loss) = self.loss_sum(example, &pass, noise, EVAL_STREAMS | i as u64)?;
            total += loss.to_scalar::<f32>()? as f64;
            tokens += example.targets();
        }
        if tokens == 0 {
            return Err(TrainError::NoData("no held-out tokens to evaluate".into()));
        }
        Ok(Evaluation {
            loss: total / tokens as f64,
            tokens,
        })
    }

    /// Mean over `data` of the distance correlation between the head's output rows, with the
    /// adapter as it is now, and the public head's rows ([`distance_correlation`]): how much
    /// of the public rows' geometry the uplink still carries (1 before any training).
    pub fn distance_correlation(&self, data: &[Example]) -> Result<f64> {
        if self.plan.head().layers.is_empty() {
            return Err(TrainError::Options(format!(
                "the split {} leaves the device no head layer",
                self.plan
            )));
        }
        if data.is_empty() {
            return Err(TrainError::NoData("no examples to measure".into()));
        }
        let mut total = 0.0;
        for example in data {
            let pass = Pass::new(self.source.config(), example.ids.len())?;
            let rows = self.head_rows(&example.ids, &pass, true)?;
            let public = self.public_rows(&example.ids, &pass)?;
            total += distance_correlation(&rows, &public)?.to_scalar::<f32>()? as f64;
        }
        Ok(total / data.len() as f64)
    }

    /// The head's output rows for `ids` (the sequence of `pass`), with the adapter's updates
    /// (`adapted`) or without.
    fn head_rows(&self, ids: &[u32], pass: &Pass, adapted: bool) -> Result<Tensor> {
        let mut x = self.embeddings.embed(ids)?;
        for layer in self.plan.head().layers {
            let pairs = adapted.then(|| self.adapter.layer_pairs(layer)).flatten();
            x = self.layers[&layer].forward(&x, pairs.as_ref(), pass)?;
        }
        Ok(x)
    }

    /// What the public head (no adapter) sends for `ids`: the rows the attacker matches
    /// against.
    fn public_rows(&self, ids: &[u32], pass: &Pass) -> Result<Tensor> {
        Ok(self.head_rows(ids, pass, false)?.detach())
    }

    /// The forward pass of `example` (the sequence of `pass`): the head's output rows (none
    /// without head layers), the tail's input as a variable, and the summed cross-entropy of its
    /// trained tokens. With
    /// `noise`, the trunk receives the rows noised by ChaCha20 stream `stream` of the noise's
    /// seed; the gradient the trunk returns goes to the head's rows as it is (straight
    /// through the noise).
    fn loss_sum(
        &mut self,
        example: &Example,
        pass: &Pass,
        noise: Option<UplinkNoise>,
        stream: u64,
    ) -> Result<(Option<Tensor>, Var, Tensor)> {
        let n = example.ids.len();
        let x = self.head_rows(&example.ids, pass, true)?;
        let head = self.plan.head().layers;
        let sent = match noise {
            Some(noise) => {
                let mut rng = ChaCha20Rng::seed_from_u64(self.noise_seed(&noise));
                rng.set_stream(stream);
                let (count, width) = x.dims2()?;
                let mut values = x.flatten_all()?.to_vec1::<f32>()?;
                add_noise(&mut values, width, &noise, &mut rng);
                Tensor::from_vec(values, (count, width), &Device::Cpu)?
            }
            None => x.detach(),
        };
        let down = self.trunk.forward(&sent)?;
        if down.dims() != x.dims() {
            return Err(TrainError::Trunk(format!(
                "the trunk returned rows of shape {:?} for {:?}",
                down.dims(),
                x.dims()
            )));
        }
        let tail_in = Var::from_tensor(&down)?;
        let mut y = tail_in.as_tensor().clone();
        for layer in self.plan.tail().layers {
            y = self.layers[&layer].forward(&y, self.adapter.layer_pairs(layer).as_ref(), pass)?;
        }
        let logits = self.output.logits(&y, pass)?.narrow(0, 0, n - 1)?;
        let targets = Tensor::new(&example.ids[1..], &Device::Cpu)?.unsqueeze(1)?;
        let mask: Vec<f32> = example.trained[1..]
            .iter()
            .map(|&t| f32::from(u8::from(t)))
            .collect();
        let mask = Tensor::from_vec(mask, n - 1, &Device::Cpu)?;
        let picked = candle_nn::ops::log_softmax(&logits, D::Minus1)?
            .gather(&targets, 1)?
            .squeeze(1)?;
        let loss = (picked * mask)?.sum_all()?.neg()?;
        Ok(((!head.is_empty()).then_some(x), tail_in, loss))
    }

    /// The seed `noise` draws from: its own, else the run's.
    fn noise_seed(&self, noise: &UplinkNoise) -> u64 {
        noise.seed().unwrap_or(self.options.seed)
    }

    /// Writes the adapter in PEFT's format into `dir`.
    pub fn save(&self, dir: &Path) -> Result<()> {
        self.adapter
            .save(dir, self.source.config(), self.source.format())
    }

    /// Writes a checkpoint into `dir`, replacing any there: the adapter in PEFT's format (so it
    /// can be tried at once), the variables and AdamW's moments exactly, and the run's state.
    /// It is written beside `dir` and renamed into place, so that a crash leaves the previous
    /// checkpoint whole.
    pub fn checkpoint(&self, dir: &Path) -> Result<()> {
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| TrainError::Io { path, source }
        };
        let staging = dir.with_extension("partial");
        if staging.exists() {
            std::fs::remove_dir_all(&staging).map_err(io(&staging))?;
        }
        self.save(&staging)?;
        let mut tensors = HashMap::new();
        for (i, var) in self.adapter.vars().enumerate() {
            tensors.insert(format!("var.{i}"), var.as_tensor().clone());
        }
        for (i, moment) in self.optimizer.moments().into_iter().enumerate() {
            tensors.insert(format!("moment.{i}"), moment);
        }
        candle_core::safetensors::save(&tensors, staging.join("trainer.safetensors"))?;
        let state = serde_json::to_string_pretty(&self.state()).expect("state serializes");
        let path = staging.join("state.json");
        std::fs::write(&path, state).map_err(io(&path))?;
        if dir.exists() {
            std::fs::remove_dir_all(dir).map_err(io(dir))?;
        }
        std::fs::rename(&staging, dir).map_err(io(dir))
    }

    /// Continues the run checkpointed in `dir`, which must be of the same split, adapter and
    /// seed.
    pub fn resume(&mut self, dir: &Path) -> Result<()> {
        let bad = |reason: String| TrainError::Checkpoint {
            path: dir.to_path_buf(),
            reason,
        };
        let path = dir.join("state.json");
        let text = std::fs::read_to_string(&path).map_err(|source| TrainError::Io {
            path: path.clone(),
            source,
        })?;
        let saved: State =
            serde_json::from_str(&text).map_err(|e| bad(format!("state.json: {e}")))?;
        let ours = State {
            step: saved.step,
            ..self.state()
        };
        if saved != ours {
            return Err(bad(format!(
                "it is of another run ({}); this one is {}",
                saved.describe(),
                ours.describe()
            )));
        }
        let tensors = candle_core::safetensors::load(dir.join("trainer.safetensors"), &Device::Cpu)
            .map_err(|e| bad(format!("trainer.safetensors: {e}")))?;
        let take = |kind: &str, count: usize| -> Result<Vec<Tensor>> {
            (0..count)
                .map(|i| {
                    tensors
                        .get(&format!("{kind}.{i}"))
                        .cloned()
                        .ok_or_else(|| bad(format!("trainer.safetensors lacks {kind}.{i}")))
                })
                .collect()
        };
        let vars = self.adapter.vars().count();
        let values = take("var", vars)?;
        for (var, value) in self.adapter.vars().zip(&values) {
            if var.shape() != value.shape() {
                return Err(bad("a saved matrix has the wrong shape".into()));
            }
        }
        self.adapter.set(&values)?;
        self.optimizer
            .restore(saved.step, take("moment", 2 * vars)?)?;
        Ok(())
    }

    fn state(&self) -> State {
        let shape = self.adapter.shape();
        State {
            step: self.optimizer.steps(),
            split: self.plan.to_string(),
            rank: shape.rank,
            alpha: shape.alpha,
            rslora: shape.rslora,
            targets: shape
                .targets
                .iter()
                .map(|t| t.module().to_string())
                .collect(),
            layers: shape.layers.clone(),
            seed: self.options.seed,
            accumulate: self.options.accumulate,
            privacy_weight: self.options.privacy_weight,
            uplink_noise: self
                .options
                .uplink_noise
                .map(|noise| (noise.sigma(), noise.clip(), self.noise_seed(&noise))),
        }
    }
}
