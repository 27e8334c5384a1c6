//! `lsplit bench --quality`: how much each lossy codec changes the split model's output,
//! against the lossless f32 codec, over a fixed set of varied prompts.

use std::sync::Arc;

use anyhow::Context;
use indicatif::{ProgressBar, ProgressStyle};
use lsplit_model::{ModelPart, ModelSource, SplitPlan};
use lsplit_split::{
    Agreement, DeviceModel, GreedyRun, LocalTrunk, Obfuscation, Session, SplitPolicy, StepRows,
    Trunk, TrunkError,
};
use lsplit_tokenizer::Tokenizer;
use lsplit_wire::Codec;

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
struct CodecResult {
    name: String,
    per_prompt: Vec<Agreement>,
}

impl CodecResult {
    fn identical(&self) -> usize {
        self.per_prompt
            .iter()
            .filter(|a| a.agreeing_tokens == a.tokens)
            .count()
    }

    fn agreeing_tokens(&self) -> usize {
        self.per_prompt.iter().map(|a| a.agreeing_tokens).sum()
    }

    fn max_logit_error(&self) -> f32 {
        self.per_prompt
            .iter()
            .map(|a| a.max_logit_error)
            .fold(0.0, f32::max)
    }

    fn median_logit_error(&self) -> f32 {
        let mut errors: Vec<f32> = self.per_prompt.iter().map(|a| a.max_logit_error).collect();
        errors.sort_by(f32::total_cmp);
        errors[errors.len() / 2]
    }
}

fn session<'a>(model: &'a DeviceModel, trunk: &Arc<ModelPart>) -> anyhow::Result<Session<'a>> {
    let keys = model.new_keys(Obfuscation::None)?;
    Ok(model.session(Box::new(LocalTrunk::new(trunk.clone(), &keys)?), &keys)?)
}

/// Measures f16, bf16 and int8 against f32 on split `plan`, `tokens` greedy tokens per prompt,
/// with the floor any 1-ulp perturbation causes, and prints a table (or JSON).
pub fn run(
    source: &ModelSource,
    tokenizer: Arc<Tokenizer>,
    plan: SplitPlan,
    tokens: usize,
    json: bool,
) -> anyhow::Result<()> {
    anyhow::ensure!(tokens > 0, "--decode-tokens must be at least 1");
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
    let nudged = || -> anyhow::Result<Session<'_>> {
        let keys = reference.new_keys(Obfuscation::None)?;
        let trunk = Box::new(NudgedTrunk(LocalTrunk::new(trunk.clone(), &keys)?));
        Ok(reference.session(trunk, &keys)?)
    };
    let mut largest_logit = 0f32;

    let progress = ProgressBar::new(PROMPTS.len() as u64).with_style(
        ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len}")
            .context("progress bar template")?,
    );
    progress.set_message("comparing codecs");
    for prompt in PROMPTS {
        let prompt = reference.prompt_tokens(prompt, false)?;
        let run = GreedyRun::generate(session(&reference, &trunk)?, &prompt, tokens)?;
        for logits in &run.logits {
            largest_logit = logits.iter().fold(largest_logit, |m, l| m.max(l.abs()));
        }
        for (model, result) in lossy_models.iter().zip(&mut results) {
            let free = session(model, &trunk)?;
            let forced = session(model, &trunk)?;
            result
                .per_prompt
                .push(Agreement::measure(&run, free, forced, &prompt)?);
        }
        let floor = Agreement::measure(&run, nudged()?, nudged()?, &prompt)?;
        results[lossy.len()].per_prompt.push(floor);
        progress.inc(1);
    }
    progress.finish_and_clear();

    if json {
        let codecs: Vec<String> = results
            .iter()
            .map(|r| {
                format!(
                    r#""{}":{{"identical_prompts":{},"agreeing_tokens":{},"max_logit_error":{},"median_prompt_max_logit_error":{}}}"#,
                    r.name,
                    r.identical(),
                    r.agreeing_tokens(),
                    r.max_logit_error(),
                    r.median_logit_error()
                )
            })
            .collect();
        println!(
            r#"{{"split":"{plan}","prompts":{},"tokens_per_prompt":{tokens},"largest_f32_logit":{largest_logit},{}}}"#,
            PROMPTS.len(),
            codecs.join(",")
        );
        return Ok(());
    }
    let total = PROMPTS.len() * tokens;
    println!(
        "model: {}, split {plan}, {} prompts x {tokens} greedy tokens, reference: f32 codec \
         (largest |logit| {largest_logit:.2})",
        source.path().display(),
        PROMPTS.len()
    );
    println!(
        "{:<9} {:>18} {:>22} {:>18} {:>26}",
        "codec",
        "identical outputs",
        "agreeing tokens",
        "max |logit error|",
        "median prompt max error"
    );
    for r in &results {
        println!(
            "{:<9} {:>18} {:>22} {:>18.4} {:>26.4}",
            r.name,
            format!("{}/{}", r.identical(), PROMPTS.len()),
            format!(
                "{}/{total} ({:.1}%)",
                r.agreeing_tokens(),
                100.0 * r.agreeing_tokens() as f64 / total as f64
            ),
            r.max_logit_error(),
            r.median_logit_error()
        );
    }
    Ok(())
}
