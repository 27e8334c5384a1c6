//! The codec-quality experiment of `lsplit bench --quality`: how much each lossy codec changes
//! the split model's output, against the lossless f32 codec, over a fixed set of varied
//! prompts, next to the floor that any 1-ulp perturbation of the hidden rows causes.

use std::sync::Arc;

use lsplit_model::{ModelPart, ModelSource, SplitPlan};
use lsplit_tokenizer::Tokenizer;
use lsplit_wire::Codec;

use crate::{
    Agreement, DeviceModel, GreedyRun, LocalTrunk, Obfuscation, Session, SplitError, SplitPolicy,
    StepRows, Trunk, TrunkError,
};

/// The prompts, sent through the model's chat template: facts, arithmetic, code, stories,
/// lists, translation, advice and reasoning, short and long.
pub const PROMPTS: [&str; 24] = [
    "What is the capital of France?",
    "Explain photosynthesis in two sentences.",
    "Write a haiku about the sea.",
    "What is 17 multiplied by 23?",
    "Write a Python function that reverses a string.",
    "List three primary colors.",
    "Translate 'good morning' into Spanish.",
    "Who wrote Romeo and Juliet?",
    "Give me a tip for sleeping better.",
    "Why is the sky blue?",
    "Write the opening line of a mystery novel.",
    "What is the boiling point of water in Fahrenheit?",
    "Summarize the plot of Cinderella in one sentence.",
    "How many legs does a spider have?",
    "Suggest a name for a pet goldfish.",
    "What does HTML stand for?",
    "Describe a sunset to someone who has never seen one.",
    "If a train travels 60 miles in 1.5 hours, what is its average speed?",
    "Write a SQL query that counts the rows of a table named users.",
    "What are the three states of matter?",
    "Tell me a joke about computers.",
    "How do I make a cup of tea?",
    "What is the largest planet in the solar system?",
    "Compose a short thank-you note to a teacher.",
];

/// The trunk's input scaled by 1 + 2^-23 (at most one f32 ulp per value), then the trunk: the
/// floor of logit error that any perturbation of the hidden rows causes, codec or not.
struct NudgedTrunk(LocalTrunk);

impl Trunk for NudgedTrunk {
    fn layers(&self) -> std::ops::Range<usize> {
        self.0.layers()
    }

    /// The tag covers the rows' shape, not their values: the nudged step keeps it.
    fn step(&mut self, message: &StepRows) -> Result<StepRows, TrunkError> {
        let rows = &message.rows;
        let nudged = rows
            .decode(&candle_core::Device::Cpu)?
            .affine(1.0 + f64::from(f32::EPSILON), 0.0)
            .map_err(lsplit_model::ModelError::from)?;
        self.0.step(&StepRows {
            rows: Codec::F32.encode(&nudged, rows.start)?,
            ..message.clone()
        })
    }
}

/// One row of the table: a codec (or the 1-ulp nudge) over every prompt.
#[derive(Debug, Clone, PartialEq)]
pub struct CodecResult {
    /// The codec's name, or `f32+1ulp` for the nudge.
    pub name: String,
    /// Its agreement with the f32 reference on each prompt, in [`PROMPTS`] order.
    pub per_prompt: Vec<Agreement>,
}

impl CodecResult {
    /// Prompts whose greedy output is the reference's.
    pub fn identical(&self) -> usize {
        self.per_prompt
            .iter()
            .filter(|a| a.agreeing_tokens == a.tokens)
            .count()
    }

    /// Leading greedy tokens equal to the reference's, over every prompt.
    pub fn agreeing_tokens(&self) -> usize {
        self.per_prompt.iter().map(|a| a.agreeing_tokens).sum()
    }

    /// The largest logit error over every prompt.
    pub fn max_logit_error(&self) -> f32 {
        self.per_prompt
            .iter()
            .map(|a| a.max_logit_error)
            .fold(0.0, f32::max)
    }

    /// The median over prompts of each prompt's largest logit error (0 with no prompts).
    pub fn median_logit_error(&self) -> f32 {
        let mut errors: Vec<f32> = self.per_prompt.iter().map(|a| a.max_logit_error).collect();
        errors.sort_by(f32::total_cmp);
        errors.get(errors.len() / 2).copied().unwrap_or(0.0)
    }
}

/// What the experiment measured.
#[derive(Debug, Clone, PartialEq)]
pub struct CodecQuality {
    /// f16, bf16, int8, then the 1-ulp nudge of f32.
    pub results: Vec<CodecResult>,
    /// The largest `|logit|` of the f32 reference runs, the scale the errors compare with.
    pub largest_logit: f32,
}

/// A new session of `model` with a fresh in-process trunk of `trunk`, or of the nudged trunk.
fn session<'a>(
    model: &'a DeviceModel,
    trunk: &Arc<ModelPart>,
    nudge: bool,
) -> Result<Session<'a>, SplitError> {
    let keys = model.new_keys(Obfuscation::None)?;
    let local = LocalTrunk::new(trunk.clone(), &keys)?;
    let trunk: Box<dyn Trunk> = if nudge {
        Box::new(NudgedTrunk(local))
    } else {
        Box::new(local)
    };
    model.session(trunk, &keys)
}

/// Measures f16, bf16 and int8 against f32 on split `plan`, `tokens` greedy tokens for each of
/// [`PROMPTS`], with the floor any 1-ulp perturbation causes; `progress` is told the prompts
/// done and the total.
pub fn measure(
    source: &ModelSource,
    tokenizer: Arc<Tokenizer>,
    plan: SplitPlan,
    tokens: usize,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<CodecQuality, SplitError> {
    let device = candle_core::Device::Cpu;
    let trunk = Arc::new(source.load_part(&plan.trunk(), &device)?);
    let model = |codec| {
        DeviceModel::split(
            source,
            SplitPolicy::fixed(plan),
            tokenizer.clone(),
            codec,
            &device,
        )
    };
    let reference = model(Codec::F32)?;
    let lossy = [Codec::F16, Codec::Bf16, Codec::Int8];
    let lossy_models = lossy
        .iter()
        .map(|&codec| model(codec))
        .collect::<Result<Vec<_>, _>>()?;
    let mut results: Vec<CodecResult> = lossy
        .iter()
        .map(|codec| codec.to_string())
        .chain(["f32+1ulp".to_string()])
        .map(|name| CodecResult {
            name,
            per_prompt: Vec::new(),
        })
        .collect();
    let mut largest_logit = 0f32;
    for (done, prompt) in PROMPTS.iter().enumerate() {
        let prompt = reference.prompt_tokens(prompt, false)?;
        let run = GreedyRun::generate(session(&reference, &trunk, false)?, &prompt, tokens)?;
        for logits in &run.logits {
            largest_logit = logits.iter().fold(largest_logit, |m, l| m.max(l.abs()));
        }
        for (model, result) in lossy_models.iter().zip(&mut results) {
            let free = session(model, &trunk, false)?;
            let forced = session(model, &trunk, false)?;
            result
                .per_prompt
                .push(Agreement::measure(&run, free, forced, &prompt)?);
        }
        let floor = Agreement::measure(
            &run,
            session(&reference, &trunk, true)?,
            session(&reference, &trunk, true)?,
            &prompt,
        )?;
        results[lossy.len()].per_prompt.push(floor);
        progress(done + 1, PROMPTS.len());
    }
    Ok(CodecQuality {
        results,
        largest_logit,
    })
}
