//! `lsplit bench --quality`: prints what [`lsplit_split::codecs::measure`] finds, how much each
//! lossy codec changes the split model's output against the lossless f32 codec.

use std::sync::Arc;

use anyhow::Context;
use indicatif::{ProgressBar, ProgressStyle};
use lsplit_model::{ModelSource, SplitPlan};
use lsplit_split::codecs::{self, PROMPTS};
use lsplit_tokenizer::Tokenizer;

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
    let progress = ProgressBar::new(PROMPTS.len() as u64).with_style(
        ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len}")
            .context("progress bar template")?,
    );
    progress.set_message("comparing codecs");
    let quality = codecs::measure(source, tokenizer, plan, tokens, &mut |done, _| {
        progress.set_position(done as u64)
    })?;
    progress.finish_and_clear();
    let (results, largest_logit) = (&quality.results, quality.largest_logit);

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
    for r in results {
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
