//! The trunk on a compute device (a GPU) against the same trunk on the CPU, for `lsplit
//! trunk-check`: greedy agreement and the largest logit difference over [`PROMPTS`], whether a
//! batch of sessions computes exactly what each session does alone, and the aggregate trunk
//! steps per second of many concurrent sessions.

use std::sync::Arc;
use std::time::Instant;

use candle_core::{Device, Tensor};
use lsplit_model::{KvCache, ModelError, ModelPart, ModelSource, SplitPlan};
use lsplit_tokenizer::Tokenizer;
use lsplit_wire::Codec;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::codecs::{CodecResult, PROMPTS};
use crate::{Agreement, DeviceModel, GreedyRun, LocalTrunk, Obfuscation, SplitError, SplitPolicy};

/// Runs `tokens` greedy tokens of each of the first `prompts` [`PROMPTS`] with the trunk of
/// `plan` on the CPU (the reference) and on `device`, head and tail on the CPU for both;
/// returns `device`'s agreement with the reference on each prompt. `progress` is told the
/// prompts done and the total.
pub fn agreement(
    source: &ModelSource,
    tokenizer: Arc<Tokenizer>,
    plan: SplitPlan,
    device: &Device,
    (prompts, tokens): (usize, usize),
    progress: &mut dyn FnMut(usize, usize),
) -> Result<CodecResult, SplitError> {
    let cpu = Device::Cpu;
    let model = DeviceModel::split(
        source,
        SplitPolicy::fixed(plan),
        tokenizer,
        Codec::F32,
        &cpu,
    )?;
    let reference = Arc::new(source.load_part(&plan.trunk(), &cpu)?);
    let candidate = Arc::new(source.load_part(&plan.trunk(), device)?);
    let session = |trunk: &Arc<ModelPart>| {
        let keys = model.new_keys(Obfuscation::None)?;
        let local = LocalTrunk::new(trunk.clone(), &keys)?;
        model.session(Box::new(local), &keys)
    };
    let prompts = &PROMPTS[..prompts.min(PROMPTS.len())];
    let mut per_prompt = Vec::with_capacity(prompts.len());
    for (done, prompt) in prompts.iter().enumerate() {
        let prompt = model.prompt_tokens(prompt, false)?;
        let run = GreedyRun::generate(session(&reference)?, &prompt, tokens)?;
        per_prompt.push(Agreement::measure(
            &run,
            session(&candidate)?,
            session(&candidate)?,
            &prompt,
        )?);
        progress(done + 1, prompts.len());
    }
    Ok(CodecResult {
        name: lsplit_model::ComputeDevice::of(device).to_string(),
        per_prompt,
    })
}

/// `count` hidden rows of `part`'s width with values in [-1, 1), seeded: the trunk's input in
/// the checks below, which need rows of the right shape rather than a real prompt's.
fn rows(part: &ModelPart, count: usize, rng: &mut StdRng) -> Result<Tensor, ModelError> {
    let width = part.config().hidden_size;
    let values: Vec<f32> = (0..count * width)
        .map(|_| rng.random_range(-1.0..1.0))
        .collect();
    Ok(Tensor::from_vec(values, (count, width), &Device::Cpu)?)
}

/// Runs `sessions` sessions through `part` alone and as one batch, the same rows for both: a
/// prompt of 2 to 9 rows each, then `steps` decode rows. Returns the largest `|batched - solo|`
/// over every output value (0 when the batch computes exactly what each session does alone).
pub fn batched_against_solo(
    part: &ModelPart,
    sessions: usize,
    steps: usize,
) -> Result<f32, ModelError> {
    let mut rng = StdRng::seed_from_u64(22);
    let mut inputs = Vec::with_capacity(steps + 1);
    inputs.push(
        (0..sessions)
            .map(|i| rows(part, 2 + i % 8, &mut rng))
            .collect::<Result<Vec<_>, _>>()?,
    );
    for _ in 0..steps {
        inputs.push(
            (0..sessions)
                .map(|_| rows(part, 1, &mut rng))
                .collect::<Result<Vec<_>, _>>()?,
        );
    }
    let mut solo: Vec<KvCache> = (0..sessions).map(|_| part.new_cache()).collect();
    let mut batched: Vec<KvCache> = (0..sessions).map(|_| part.new_cache()).collect();
    let mut largest = 0f32;
    for step in &inputs {
        let starts: Vec<usize> = solo.iter().map(KvCache::len).collect();
        let alone = step
            .iter()
            .zip(&mut solo)
            .zip(&starts)
            .map(|((rows, cache), &start)| part.forward(rows, start, cache))
            .collect::<Result<Vec<_>, _>>()?;
        let mut batch: Vec<(&Tensor, usize, &mut KvCache)> = step
            .iter()
            .zip(&starts)
            .zip(&mut batched)
            .map(|((rows, &start), cache)| (rows, start, cache))
            .collect();
        let together = part.forward_batch(&mut batch)?;
        for (a, b) in alone.iter().zip(&together) {
            let difference = (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
            largest = largest.max(if difference.is_nan() {
                f32::INFINITY
            } else {
                difference
            });
        }
    }
    Ok(largest)
}

/// The aggregate trunk steps per second of `sessions` concurrent sessions of `part`, each at a
/// context of `context` positions: `steps` batched decode steps of one row per session, timed
/// after the prompts (and one untimed step) have run.
pub fn steps_per_second(
    part: &ModelPart,
    sessions: usize,
    context: usize,
    steps: usize,
) -> Result<f64, ModelError> {
    let mut rng = StdRng::seed_from_u64(22);
    let mut caches: Vec<KvCache> = (0..sessions).map(|_| part.new_cache()).collect();
    let step = |caches: &mut [KvCache], count: usize, rng: &mut StdRng| {
        let inputs = (0..caches.len())
            .map(|_| rows(part, count, rng))
            .collect::<Result<Vec<_>, _>>()?;
        let mut batch: Vec<(&Tensor, usize, &mut KvCache)> = inputs
            .iter()
            .zip(caches.iter_mut())
            .map(|(rows, cache)| (rows, cache.len(), cache))
            .collect();
        part.forward_batch(&mut batch).map(|_| ())
    };
    step(&mut caches, context.max(1), &mut rng)?;
    step(&mut caches, 1, &mut rng)?;
    let inputs: Vec<Vec<Tensor>> = (0..steps)
        .map(|_| (0..sessions).map(|_| rows(part, 1, &mut rng)).collect())
        .collect::<Result<_, _>>()?;
    let started = Instant::now();
    for step in &inputs {
        let mut batch: Vec<(&Tensor, usize, &mut KvCache)> = step
            .iter()
            .zip(caches.iter_mut())
            .map(|(rows, cache)| (rows, cache.len(), cache))
            .collect();
        part.forward_batch(&mut batch)?;
    }
    Ok((sessions * steps) as f64 / started.elapsed().as_secs_f64())
}
