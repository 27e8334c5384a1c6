//! The privacy term of split fine-tuning: distance correlation's value where it is known
//! exactly, its gradient against finite differences, and a few steps of training with it
//! moving the head's rows away from the public head's.

use std::sync::Arc;

use candle_core::{Device, Tensor, Var};
use lsplit_model::{DenseTrunk, ModelSource, SplitPlan, Target};
use lsplit_train::{
    Dataset, LocalTrainTrunk, Schedule, TrainOptions, Trainer, distance_correlation,
};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// `rows` × `width` values drawn uniformly from [-1, 1) with `seed`.
fn random(rows: usize, width: usize, seed: u64) -> Vec<f32> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..rows * width)
        .map(|_| rng.random_range(-1.0..1.0))
        .collect()
}

fn tensor(values: Vec<f32>, rows: usize, width: usize) -> Tensor {
    Tensor::from_vec(values, (rows, width), &Device::Cpu).expect("tensor")
}

fn value(x: &Tensor, y: &Tensor) -> f32 {
    distance_correlation(x, y)
        .expect("distance correlation")
        .to_scalar::<f32>()
        .expect("scalar")
}

#[test]
fn distance_correlation_is_blind_to_shifts_scales_and_rotations_only() {
    let (n, d) = (12, 4);
    let x = random(n, d, 1);
    // Each row rotated by 90 degrees in its first two coordinates, scaled by 3 and shifted.
    let moved: Vec<f32> = x
        .chunks(d)
        .flat_map(|r| {
            [
                -3.0 * r[1] + 5.0,
                3.0 * r[0] - 2.0,
                3.0 * r[2],
                3.0 * r[3] + 1.0,
            ]
        })
        .collect();
    let x = tensor(x, n, d);
    assert!((value(&x, &x) - 1.0).abs() < 1e-5, "{}", value(&x, &x));
    let moved = tensor(moved, n, d);
    assert!(
        (value(&x, &moved) - 1.0).abs() < 1e-5,
        "a linear disguise keeps it at 1: {}",
        value(&x, &moved)
    );
    let other = tensor(random(n, d, 2), n, d);
    assert!(
        value(&x, &other) < 0.9,
        "independent rows: {}",
        value(&x, &other)
    );

    let err = distance_correlation(&x, &tensor(random(3, d, 3), 3, d)).expect_err("rows differ");
    assert_eq!(
        err.to_string(),
        "distance correlation needs two sets of the same rows, at least two: got 12 and 3"
    );
    let same = tensor(vec![0.5; 2 * d], 2, d);
    let err = distance_correlation(&same, &same).expect_err("no spread");
    assert_eq!(
        err.to_string(),
        "distance correlation of rows that are all equal"
    );
}

#[test]
fn distance_correlation_gradient_matches_finite_differences() {
    let (n, d) = (7, 5);
    let values = random(n, d, 11);
    let y = tensor(random(n, 3, 12), n, 3);
    let x = Var::from_tensor(&tensor(values.clone(), n, d)).expect("var");
    let grads = distance_correlation(x.as_tensor(), &y)
        .expect("distance correlation")
        .backward()
        .expect("backward");
    let grad: Vec<f32> = grads
        .get(x.as_tensor())
        .expect("a gradient")
        .flatten_all()
        .expect("flat")
        .to_vec1()
        .expect("values");
    let h = 1e-2;
    for index in [0, 4, d + 2, 3 * d + 1, n * d - 1] {
        let at = |delta: f32| {
            let mut v = values.clone();
            v[index] += delta;
            value(&tensor(v, n, d), &y)
        };
        let numeric = (at(h) - at(-h)) / (2.0 * h);
        assert!(
            (grad[index] - numeric).abs() <= 1e-3 + 0.02 * grad[index].abs(),
            "x[{index}]: analytic {}, finite difference {numeric}",
            grad[index]
        );
        assert!(grad[index].abs() > 1e-4, "x[{index}] moves the term");
    }
}

fn tiny() -> Arc<ModelSource> {
    let path =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../model/tests/data/tiny-llama-hf");
    Arc::new(ModelSource::open(&path).expect("open"))
}

fn options(privacy_weight: f64) -> TrainOptions {
    TrainOptions {
        rank: 4,
        alpha: 8.0,
        rslora: false,
        targets: Target::ALL.to_vec(),
        lr: 1e-2,
        steps: 8,
        warmup: 1,
        schedule: Schedule::Constant,
        accumulate: 2,
        weight_decay: 0.0,
        seed: 7,
        privacy_weight,
    }
}

fn trainer(source: &Arc<ModelSource>, plan: SplitPlan, privacy_weight: f64) -> Trainer {
    let trunk = DenseTrunk::new(source.clone(), plan.k1..plan.k2, 1 << 20).expect("trunk");
    Trainer::new(
        source.clone(),
        plan,
        options(privacy_weight),
        Box::new(LocalTrainTrunk::new(trunk)),
    )
    .expect("trainer")
}

#[test]
fn the_privacy_term_moves_the_head_rows_from_the_public_heads() {
    let source = tiny();
    let tokenizer = lsplit_split::load_tokenizer(&source).expect("tokenizer");
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("data.jsonl");
    std::fs::write(
        &path,
        [
            r#"{"text": "the quick brown fox jumps over the lazy dog"}"#,
            r#"{"text": "a stitch in time saves nine"}"#,
            r#"{"text": "the quick brown fox jumps again"}"#,
        ]
        .join("\n"),
    )
    .expect("write data");
    let data = Dataset::read(&path, &tokenizer, 32, 0.0, 3)
        .expect("data")
        .train;
    let plan = SplitPlan::new(1, 3, 4).expect("plan");
    let mut plain = trainer(&source, plan, 0.0);
    let mut private = trainer(&source, plan, 10.0);
    // A fresh adapter changes nothing: the rows are the public head's.
    let before = private.distance_correlation(&data).expect("measure");
    assert!((before - 1.0).abs() < 1e-5, "{before}");
    for _ in 0..8 {
        let report = plain.step(&data).expect("step");
        assert_eq!(report.privacy, None);
        let report = private.step(&data).expect("step");
        let term = report.privacy.expect("a privacy term");
        assert!(term.is_finite() && report.loss.is_finite());
    }
    let plain_after = plain.distance_correlation(&data).expect("measure");
    let private_after = private.distance_correlation(&data).expect("measure");
    assert!(
        private_after < before - 0.05 && private_after < plain_after - 0.05,
        "distance correlation: {before} before, {plain_after} after plain training, \
         {private_after} after training with the privacy term"
    );

    // No head layer, nothing to change: refused.
    let trunk = DenseTrunk::new(source.clone(), 0..3, 1 << 20).expect("trunk");
    let err = Trainer::new(
        source.clone(),
        SplitPlan::new(0, 3, 4).expect("plan"),
        options(1.0),
        Box::new(LocalTrainTrunk::new(trunk)),
    )
    .err()
    .expect("refused");
    assert_eq!(
        err.to_string(),
        "the split 0:3 leaves the device no head layer: a privacy term has no rows to change"
    );
}
