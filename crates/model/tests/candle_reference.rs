//! Our unsplit SmolLM2-135M-Instruct (Q4_1 GGUF) against candle-transformers'
//! `quantized_llama::ModelWeights` on the same file: the same 64 greedy tokens after a
//! chat-formatted prompt, with logits that agree to float rounding at every step.

mod common;

use common::{candle_greedy, ours_greedy};
use lsplit_model::{ModelSource, TokenizerSource};
use lsplit_tokenizer::{ChatMessage, Tokenizer};

const STEPS: usize = 64;

#[test]
fn greedy_tokens_match_candle_transformers() {
    let path = lsplit_fetch::ensure_default_model().expect("fetch the default model");
    let source = ModelSource::open(&path).expect("open model");
    let TokenizerSource::Gguf(metadata) = source.tokenizer_source() else {
        panic!("the default model is a GGUF file");
    };
    let tokenizer = Tokenizer::from_gguf(metadata).expect("tokenizer");
    let text = tokenizer
        .apply_chat_template(
            &[ChatMessage::new(
                "user",
                "Write a short poem about the sea and the wind.",
            )],
            true,
        )
        .expect("chat template");
    assert!(text.starts_with("<|im_start|>"), "{text}");
    let prompt = tokenizer.encode(&text, false).expect("encode");
    assert!(prompt.len() > 10, "{prompt:?}");

    let (ours, our_logits) = ours_greedy(&source, &prompt, STEPS);
    let (theirs, their_logits) = candle_greedy(&path, &prompt, STEPS);

    let text = tokenizer.decode(&ours).expect("decode");
    assert_eq!(
        ours,
        theirs,
        "greedy tokens differ; ours: {text:?}, candle-transformers: {:?}",
        tokenizer.decode(&theirs).expect("decode")
    );
    // Same weights and kernels; the attention's arithmetic is arranged differently (scale
    // multiplied vs divided, additive vs filled mask), so logits agree to rounding.
    for (i, (a, b)) in our_logits.iter().zip(&their_logits).enumerate() {
        let diff = a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
        assert!(diff < 1e-2, "step {i}: logits differ by {diff}");
    }
    // A real answer, not a degenerate loop.
    let distinct: std::collections::BTreeSet<_> = ours.iter().collect();
    assert!(distinct.len() > 16, "{text:?}");
}
