//! Batched trunk steps give each session exactly its solo output.

use candle_core::{Device, Tensor};
use lsplit_model::{KvCache, ModelPart, ModelSource, SplitPlan};

/// The trunk of the default model split at 2:28 (layers 2 to 27).
fn trunk() -> ModelPart {
    let path = lsplit_fetch::ensure_default_model().expect("default model");
    let source = ModelSource::open(&path).expect("model");
    let plan = SplitPlan::new(2, 28, source.config().num_layers).expect("split");
    source
        .load_part(&plan.trunk(), &Device::Cpu)
        .expect("trunk")
}

fn rows(seed: usize, rows: usize, width: usize) -> Tensor {
    let values: Vec<f32> = (0..rows * width)
        .map(|i| (((i * 7919 + seed * 104_729) % 2001) as f32 - 1000.0) * 1e-3)
        .collect();
    Tensor::from_vec(values, (rows, width), &Device::Cpu).expect("tensor")
}

fn bits(t: &Tensor) -> Vec<u32> {
    t.flatten_all()
        .and_then(|t| t.to_vec1::<f32>())
        .expect("values")
        .into_iter()
        .map(f32::to_bits)
        .collect()
}

#[test]
fn a_batch_of_sessions_matches_each_session_alone_bit_for_bit() {
    let part = trunk();
    let width = part.config().hidden_size;

    // Four sessions: prompts of 5, 300 (longer than a prefill chunk, so it runs in chunks
    // beside the batch), 1 and 3 rows, then four one-row steps each.
    let prompts = [5usize, 300, 1, 3];
    let mut solo: Vec<KvCache> = prompts.iter().map(|_| part.new_cache()).collect();
    let mut batched: Vec<KvCache> = prompts.iter().map(|_| part.new_cache()).collect();
    let mut positions = vec![0usize; prompts.len()];
    for step in 0..5 {
        let inputs: Vec<Tensor> = prompts
            .iter()
            .enumerate()
            .map(|(s, &p)| rows(s * 10 + step, if step == 0 { p } else { 1 }, width))
            .collect();
        let expected: Vec<Vec<u32>> = inputs
            .iter()
            .zip(solo.iter_mut())
            .zip(&positions)
            .map(|((x, cache), &start)| bits(&part.forward(x, start, cache).expect("solo")))
            .collect();
        let mut items: Vec<(&Tensor, usize, &mut KvCache)> = inputs
            .iter()
            .zip(batched.iter_mut())
            .zip(&positions)
            .map(|((x, cache), &start)| (x, start, cache))
            .collect();
        let got: Vec<Vec<u32>> = part
            .forward_batch(&mut items)
            .expect("batch")
            .iter()
            .map(bits)
            .collect();
        assert_eq!(got, expected, "step {step}");
        for (position, input) in positions.iter_mut().zip(&inputs) {
            *position += input.dims()[0];
        }
    }
    let lens: Vec<usize> = batched.iter().map(KvCache::len).collect();
    assert_eq!(lens, vec![9, 304, 5, 7]);
}

#[test]
fn a_batch_with_a_misplaced_item_is_refused_before_touching_any_cache() {
    let part = trunk();
    let width = part.config().hidden_size;
    let (a, b) = (rows(1, 2, width), rows(2, 1, width));
    let (mut ca, mut cb) = (part.new_cache(), part.new_cache());
    let mut items: Vec<(&Tensor, usize, &mut KvCache)> = vec![(&a, 0, &mut ca), (&b, 4, &mut cb)];
    let err = part
        .forward_batch(&mut items)
        .expect_err("position 4 of an empty cache");
    assert_eq!(
        err.to_string(),
        lsplit_model::ModelError::Position {
            expected: 0,
            got: 4
        }
        .to_string()
    );
    assert_eq!((ca.len(), ca.bytes(), cb.len(), cb.bytes()), (0, 0, 0, 0));
}
