//! Our unsplit SmolLM2-135M-Instruct (Q4_1 GGUF) against candle-transformers'
//! `quantized_llama::ModelWeights` on the same file: the same 64 greedy tokens after a
//! chat-formatted prompt, with logits that agree to float rounding at every step.

use std::fs::File;
use std::io::BufReader;

use candle_core::quantized::gguf_file::Content;
use candle_core::{Device, Tensor};
use candle_transformers::models::quantized_llama::ModelWeights;
use lsplit_model::{ModelSource, PartSpec};
use lsplit_tokenizer::{ChatMessage, Tokenizer};

const STEPS: usize = 64;

fn argmax(values: &[f32]) -> u32 {
    let mut best = 0;
    for (i, v) in values.iter().enumerate() {
        if *v > values[best] {
            best = i;
        }
    }
    best as u32
}

#[test]
fn greedy_tokens_match_candle_transformers() {
    let path = lsplit_fetch::ensure_default_model().expect("fetch the default model");
    let mut reader = BufReader::new(File::open(&path).expect("open model"));
    let content = Content::read(&mut reader).expect("read GGUF header");
    let tokenizer = Tokenizer::from_gguf(&content.metadata).expect("tokenizer");
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

    // Ours.
    let source = ModelSource::open(&path).expect("open model");
    let layers = source.config().num_layers;
    let whole = source
        .load_part(&PartSpec::whole(layers), &Device::Cpu)
        .expect("load whole model");
    let mut cache = whole.new_cache();
    let mut step = |tokens: &[u32]| -> Vec<f32> {
        let start = cache.len();
        let hidden = whole
            .forward(&whole.embed(tokens).expect("embed"), start, &mut cache)
            .expect("forward");
        whole
            .logits(&hidden)
            .and_then(|l| Ok(l.to_vec1::<f32>()?))
            .expect("logits")
    };
    let mut ours = Vec::new();
    let mut our_logits = vec![step(&prompt)];
    for _ in 0..STEPS {
        let next = argmax(our_logits.last().expect("logits"));
        ours.push(next);
        if ours.len() < STEPS {
            our_logits.push(step(&[next]));
        }
    }

    // candle-transformers.
    let mut model =
        ModelWeights::from_gguf(content, &mut reader, &Device::Cpu).expect("candle model");
    let mut run = |tokens: &[u32], pos: usize| -> Vec<f32> {
        let x = Tensor::new(tokens, &Device::Cpu)
            .and_then(|t| t.unsqueeze(0))
            .expect("input");
        model
            .forward(&x, pos)
            .and_then(|l| l.squeeze(0))
            .and_then(|l| l.to_vec1())
            .expect("candle forward")
    };
    let mut theirs = Vec::new();
    let mut their_logits = vec![run(&prompt, 0)];
    for i in 0..STEPS {
        let next = argmax(their_logits.last().expect("logits"));
        theirs.push(next);
        if theirs.len() < STEPS {
            their_logits.push(run(&[next], prompt.len() + i));
        }
    }

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
