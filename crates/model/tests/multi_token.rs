//! A step after the prompt that carries several tokens gives, row by row, exactly the logits of
//! one-token steps, and a cache cut back to the accepted tokens continues exactly as one that
//! never saw the rejected ones: what checking drafted tokens in one round trip needs.

use candle_core::Device;
use lsplit_model::{KvCache, MAX_STEP_ROWS, ModelPart, ModelSource, PartKind, PartSpec};

fn whole() -> ModelPart {
    let path = lsplit_fetch::ensure_default_model().expect("default model");
    let source = ModelSource::open(&path).expect("model");
    let layers = source.config().num_layers;
    let spec = PartSpec {
        kind: PartKind::Whole,
        layers: 0..layers,
    };
    source.load_part(&spec, &Device::Cpu).expect("whole model")
}

/// The logits after each of `tokens`, continuing `cache`, in one step.
fn step(part: &ModelPart, cache: &mut KvCache, tokens: &[u32]) -> Vec<Vec<u32>> {
    let start = cache.len();
    let hidden = part
        .forward(&part.embed(tokens).expect("embed"), start, cache)
        .expect("forward");
    let logits = part.row_logits(&hidden).expect("logits");
    logits
        .to_vec2::<f32>()
        .expect("values")
        .into_iter()
        .map(|row| row.into_iter().map(f32::to_bits).collect())
        .collect()
}

const PROMPT: [u32; 6] = [1, 504, 3458, 5248, 4910, 359];
const DRAFT: [u32; 5] = [2114, 28, 6022, 30, 1390];

#[test]
fn a_multi_token_step_gives_the_logits_of_one_token_steps_bit_for_bit() {
    let part = whole();
    let mut one_by_one = part.new_cache();
    step(&part, &mut one_by_one, &PROMPT);
    let expected: Vec<Vec<u32>> = DRAFT
        .iter()
        .map(|&t| step(&part, &mut one_by_one, &[t]).remove(0))
        .collect();

    let mut at_once = part.new_cache();
    step(&part, &mut at_once, &PROMPT);
    assert_eq!(step(&part, &mut at_once, &DRAFT), expected);
    assert_eq!(at_once.len(), PROMPT.len() + DRAFT.len());
}

#[test]
fn a_cache_cut_back_to_the_accepted_tokens_continues_as_if_none_were_rejected() {
    let part = whole();
    // Accept two drafted tokens of five, then continue with another token.
    let mut reference = part.new_cache();
    step(&part, &mut reference, &PROMPT);
    step(&part, &mut reference, &DRAFT[..2]);
    let expected = step(&part, &mut reference, &[77, 78, 79]);

    let mut cut = part.new_cache();
    step(&part, &mut cut, &PROMPT);
    step(&part, &mut cut, &DRAFT);
    cut.truncate(PROMPT.len() + 2);
    assert_eq!(cut.len(), PROMPT.len() + 2);
    assert_eq!(step(&part, &mut cut, &[77, 78, 79]), expected);
}

#[test]
fn the_largest_multi_token_step_still_matches_one_token_steps() {
    let part = whole();
    let draft: Vec<u32> = (0..MAX_STEP_ROWS as u32).map(|i| 300 + 17 * i).collect();
    let mut one_by_one = part.new_cache();
    step(&part, &mut one_by_one, &PROMPT);
    let expected: Vec<Vec<u32>> = draft
        .iter()
        .map(|&t| step(&part, &mut one_by_one, &[t]).remove(0))
        .collect();
    let mut at_once = part.new_cache();
    step(&part, &mut at_once, &PROMPT);
    assert_eq!(step(&part, &mut at_once, &draft), expected);
}
