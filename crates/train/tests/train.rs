//! Split fine-tuning on the tiny test models: the data's trained positions, the loss falling,
//! checkpoints that resume bit for bit, and a trained adapter that the inference path loads and
//! runs as the training pass does (on a Hugging Face model and on a GGUF model, whose query and
//! key rows are permuted), a privacy term that moves the head's rows from the public head's,
//! and uplink noise that reaches the trunk, repeats from its seed and is learnt around.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::Device;
use lsplit_model::{DenseTrunk, ModelSource, PartSpec, Pass, SplitPlan, Target};
use lsplit_split::UplinkNoise;
use lsplit_train::{Dataset, Example, LocalTrainTrunk, Schedule, TrainOptions, Trainer};

fn tiny() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../model/tests/data/tiny-llama-hf")
}

fn options(steps: usize) -> TrainOptions {
    TrainOptions {
        rank: 4,
        alpha: 8.0,
        rslora: false,
        targets: Target::ALL.to_vec(),
        lr: 1e-2,
        steps,
        warmup: 2,
        schedule: Schedule::Cosine,
        accumulate: 2,
        weight_decay: 0.0,
        seed: 7,
        privacy_weight: 0.0,
        uplink_noise: None,
    }
}

fn trainer(source: &Arc<ModelSource>, plan: SplitPlan, options: TrainOptions) -> Trainer {
    let trunk = DenseTrunk::new(source.clone(), plan.k1..plan.k2, 1 << 20).expect("trunk");
    Trainer::new(
        source.clone(),
        plan,
        options,
        Box::new(LocalTrainTrunk::new(trunk)),
    )
    .expect("trainer")
}

fn write_data(dir: &Path, lines: &[&str]) -> PathBuf {
    let path = dir.join("data.jsonl");
    std::fs::write(&path, lines.join("\n")).expect("write data");
    path
}

#[test]
fn chat_lines_train_the_assistant_turns_only() {
    let source = ModelSource::open(&tiny()).expect("open");
    let tokenizer = lsplit_split::load_tokenizer(&source).expect("tokenizer");
    let dir = tempfile::tempdir().expect("tempdir");
    let path = write_data(
        dir.path(),
        &[
            r#"{"messages": [{"role": "user", "content": "Capital of France?"}, {"role": "assistant", "content": "Paris"}]}"#,
        ],
    );
    let data = Dataset::read(&path, &tokenizer, 256, 0.0, 1).expect("data");
    assert_eq!(data.train.len(), 1);
    assert!(data.held_out.is_empty());
    let example = &data.train[0];
    let trained: Vec<u32> = example
        .ids
        .iter()
        .zip(&example.trained)
        .filter(|(_, t)| **t)
        .map(|(&id, _)| id)
        .collect();
    assert_eq!(
        tokenizer.decode(&trained).expect("decode"),
        "Paris<|im_end|>\n"
    );
    let all = tokenizer.decode(&example.ids).expect("decode");
    assert!(
        all.ends_with("<|im_start|>assistant\nParis<|im_end|>\n"),
        "{all:?}"
    );
}

#[test]
fn bad_lines_are_refused_with_their_line_number() {
    let source = ModelSource::open(&tiny()).expect("open");
    let tokenizer = lsplit_split::load_tokenizer(&source).expect("tokenizer");
    let dir = tempfile::tempdir().expect("tempdir");
    let cases = [
        (
            r#"{"text": "fine"}"#.to_string() + "\n{\"prompt\": 1}",
            "data.jsonl:2: not a JSON object",
        ),
        (
            r#"{"text": "a", "messages": []}"#.to_string(),
            "either `messages` or `text`",
        ),
        ("not json".to_string(), "not a JSON object"),
        (r#"{"messages": []}"#.to_string(), "`messages` is empty"),
    ];
    for (text, expected) in cases {
        let path = write_data(dir.path(), &[&text]);
        let err = Dataset::read(&path, &tokenizer, 256, 0.0, 1).expect_err("refused");
        let message = err.to_string();
        assert!(message.contains(expected), "{text}: {message}");
    }
    let path = write_data(
        dir.path(),
        &[r#"{"messages": [{"role": "user", "content": "hi"}]}"#],
    );
    let err = Dataset::read(&path, &tokenizer, 256, 0.0, 1).expect_err("nothing to train");
    assert!(err.to_string().contains("nothing to train on"), "{err}");
}

fn text_examples(source: &ModelSource) -> Vec<Example> {
    let tokenizer = lsplit_split::load_tokenizer(source).expect("tokenizer");
    let dir = tempfile::tempdir().expect("tempdir");
    let path = write_data(
        dir.path(),
        &[
            r#"{"text": "the quick brown fox jumps over the lazy dog"}"#,
            r#"{"text": "a stitch in time saves nine"}"#,
            r#"{"text": "the quick brown fox jumps again"}"#,
        ],
    );
    Dataset::read(&path, &tokenizer, 32, 0.0, 3)
        .expect("data")
        .train
}

#[test]
fn training_through_the_trunk_lowers_the_loss() {
    let source = Arc::new(ModelSource::open(&tiny()).expect("open"));
    let data = text_examples(&source);
    let mut trainer = trainer(&source, SplitPlan::new(1, 3, 4).expect("plan"), options(20));
    let before = trainer.evaluate(&data).expect("evaluate");
    for step in 1..=20 {
        let report = trainer.step(&data).expect("step");
        assert_eq!(report.step, step);
        assert!(report.loss.is_finite());
    }
    let after = trainer.evaluate(&data).expect("evaluate");
    assert!(
        after.loss < 0.8 * before.loss,
        "loss {} -> {}",
        before.loss,
        after.loss
    );
}

#[test]
fn a_resumed_run_ends_bit_for_bit_where_the_whole_run_does() {
    let source = Arc::new(ModelSource::open(&tiny()).expect("open"));
    let data = text_examples(&source);
    let plan = SplitPlan::new(1, 3, 4).expect("plan");
    let dir = tempfile::tempdir().expect("tempdir");

    let mut whole = trainer(&source, plan, options(4));
    for _ in 0..4 {
        whole.step(&data).expect("step");
    }
    whole.save(&dir.path().join("whole")).expect("save");

    let mut first = trainer(&source, plan, options(4));
    for _ in 0..2 {
        first.step(&data).expect("step");
    }
    let checkpoint = dir.path().join("checkpoint");
    first.checkpoint(&checkpoint).expect("checkpoint");
    drop(first);
    let mut second = trainer(&source, plan, options(4));
    second.resume(&checkpoint).expect("resume");
    assert_eq!(second.steps_done(), 2);
    for _ in 0..2 {
        second.step(&data).expect("step");
    }
    second.save(&dir.path().join("resumed")).expect("save");
    let bytes = |name: &str| {
        std::fs::read(dir.path().join(name).join("adapter_model.safetensors")).expect("read")
    };
    assert_eq!(bytes("whole"), bytes("resumed"));

    // Another run's checkpoint is refused, saying why.
    let mut other = trainer(&source, SplitPlan::new(2, 3, 4).expect("plan"), options(4));
    let err = other.resume(&checkpoint).expect_err("another split");
    assert!(err.to_string().contains("split 1:3"), "{err}");
}

/// Trains a few steps on `source` (any ids below its vocabulary), saves the adapter, loads it
/// into the inference path, and compares that path's logits with the training pass's.
fn trained_adapter_runs_in_inference(model: &Path) {
    let source = Arc::new(ModelSource::open(model).expect("open"));
    let layers = source.config().num_layers;
    let example = Example {
        ids: vec![1, 17, 200, 42, 5, 99, 211, 7],
        trained: vec![false, true, true, true, true, true, true, true],
    };
    let plan = SplitPlan::new(1, layers - 1, layers).expect("plan");
    let mut trainer = trainer(&source, plan, options(3));
    for _ in 0..3 {
        trainer.step(std::slice::from_ref(&example)).expect("step");
    }
    let dir = tempfile::tempdir().expect("tempdir");
    trainer.save(dir.path()).expect("save");

    let whole = |source: &ModelSource| {
        let part = source
            .load_part(&PartSpec::whole(layers), &Device::Cpu)
            .expect("part");
        let mut cache = part.new_cache();
        let hidden = part
            .forward(&part.embed(&example.ids).expect("embed"), 0, &mut cache)
            .expect("forward");
        part.row_logits(&hidden)
            .expect("logits")
            .flatten_all()
            .expect("flat")
            .to_vec1::<f32>()
            .expect("v")
    };
    let base = whole(&source);
    let mut adapted = ModelSource::open(model).expect("open");
    adapted
        .load_adapter(dir.path())
        .expect("our own adapter loads");
    let inference = whole(&adapted);

    let pass = Pass::new(source.config(), example.ids.len()).expect("pass");
    let mut x = adapted
        .load_part(
            &SplitPlan::new(0, 0, layers).expect("plan").head(),
            &Device::Cpu,
        )
        .expect("head")
        .embed(&example.ids)
        .expect("embed");
    let pairs: BTreeMap<usize, _> = (0..layers)
        .filter_map(|l| trainer.adapter().layer_pairs(l).map(|p| (l, p)))
        .collect();
    for layer in 0..layers {
        x = source
            .dense_layer(layer)
            .expect("layer")
            .forward(&x, pairs.get(&layer), &pass)
            .expect("forward");
    }
    let training: Vec<f32> = source
        .dense_output()
        .expect("output")
        .logits(&x, &pass)
        .expect("logits")
        .flatten_all()
        .expect("flat")
        .to_vec1()
        .expect("v");
    let diff = |a: &[f32], b: &[f32]| {
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max)
    };
    assert!(
        diff(&inference, &training) <= 1e-4,
        "{}",
        diff(&inference, &training)
    );
    assert!(
        diff(&inference, &base) > 1e-2,
        "the adapter changes the logits"
    );
}

#[test]
fn a_trained_adapter_loads_into_the_inference_path_of_a_hugging_face_model() {
    trained_adapter_runs_in_inference(&tiny());
}

#[test]
fn the_privacy_term_moves_the_head_rows_from_the_public_heads() {
    let source = Arc::new(ModelSource::open(&tiny()).expect("open"));
    let data = text_examples(&source);
    let plan = SplitPlan::new(1, 3, 4).expect("plan");
    let mut plain = trainer(&source, plan, options(8));
    let private_options = TrainOptions {
        privacy_weight: 10.0,
        ..options(8)
    };
    let mut private = trainer(&source, plan, private_options.clone());
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
    let plan = SplitPlan::new(0, 3, 4).expect("plan");
    let trunk = DenseTrunk::new(source.clone(), plan.k1..plan.k2, 1 << 20).expect("trunk");
    let err = Trainer::new(
        source.clone(),
        plan,
        private_options,
        Box::new(LocalTrainTrunk::new(trunk)),
    )
    .err()
    .expect("refused");
    assert_eq!(
        err.to_string(),
        "the split 0:3 leaves the device no head layer: a privacy term has no rows to change"
    );
}

/// `options(steps)` with uplink noise `sigma` drawn from `seed` (none: the training seed).
fn noisy(steps: usize, sigma: f32, seed: Option<u64>) -> TrainOptions {
    TrainOptions {
        uplink_noise: Some(UplinkNoise::new(sigma, None, seed).expect("noise")),
        ..options(steps)
    }
}

#[test]
fn uplink_noise_reaches_the_trunk_repeats_from_its_seed_and_is_learnt_around() {
    let source = Arc::new(ModelSource::open(&tiny()).expect("open"));
    let data = text_examples(&source);
    let plan = SplitPlan::new(1, 3, 4).expect("plan");
    let first_loss = |options: TrainOptions| {
        trainer(&source, plan, options)
            .step(&data)
            .expect("step")
            .loss
    };
    // The first step's loss, before any update: the noise alone moves it.
    let clean = first_loss(options(8));
    let noised = first_loss(noisy(8, 2.0, None));
    assert!(
        (noised - clean).abs() > 0.01 * clean,
        "first loss {clean} without noise, {noised} with"
    );
    // The same seed draws the same noise, the training seed by default; another seed another.
    assert_eq!(first_loss(noisy(8, 2.0, None)), noised);
    assert_eq!(first_loss(noisy(8, 2.0, Some(7))), noised);
    assert_ne!(first_loss(noisy(8, 2.0, Some(8))), noised);

    // Training with the noise lowers the loss with the noise.
    let mut run = trainer(&source, plan, noisy(20, 2.0, None));
    let before = run.evaluate(&data).expect("evaluate");
    let unnoised = run.evaluate_with_noise(&data, None).expect("evaluate");
    assert!(
        (before.loss - unnoised.loss).abs() > 0.005 * unnoised.loss,
        "held-out loss {} with the noise, {} without",
        before.loss,
        unnoised.loss
    );
    for _ in 0..20 {
        run.step(&data).expect("step");
    }
    let after = run.evaluate(&data).expect("evaluate");
    assert!(
        after.loss < 0.95 * before.loss,
        "noisy loss {} -> {}",
        before.loss,
        after.loss
    );

    // Its checkpoint records the noise: a run with other noise, or none, is refused.
    let dir = tempfile::tempdir().expect("tempdir");
    run.checkpoint(dir.path()).expect("checkpoint");
    let err = trainer(&source, plan, noisy(20, 0.2, None))
        .resume(dir.path())
        .expect_err("other noise");
    let message = err.to_string();
    assert!(
        message.contains("privacy weight 0, uplink noise 2 (seed 7)); this one is")
            && message.ends_with("privacy weight 0, uplink noise 0.2 (seed 7)"),
        "{message}"
    );
    let err = trainer(&source, plan, options(20))
        .resume(dir.path())
        .expect_err("no noise");
    assert!(err.to_string().ends_with("uplink noise none"), "{err}");
    trainer(&source, plan, noisy(20, 2.0, Some(7)))
        .resume(dir.path())
        .expect("the same noise resumes");

    // With no trunk, no row is sent: refused.
    let err = Trainer::new(
        source.clone(),
        SplitPlan::new(4, 4, 4).expect("plan"),
        noisy(2, 2.0, None),
        Box::new(LocalTrainTrunk::new(
            DenseTrunk::new(source.clone(), 4..4, 1 << 20).expect("trunk"),
        )),
    )
    .err()
    .expect("refused");
    assert_eq!(
        err.to_string(),
        "the split 4:4 sends no rows to a trunk: uplink noise has nothing to noise"
    );
}
