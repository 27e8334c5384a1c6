//! Fixtures shared by the diffusion tests: the tiny random-weight models made by
//! `tests/fixtures/make_tiny_models.py` with diffusers, and their golden tensors.

#![allow(dead_code)]

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{Device, Tensor};

/// The three tiny families.
pub const FAMILIES: [&str; 3] = ["sd15", "sd21", "sdxl"];

/// The fixture directory of a family.
pub fn model_dir(family: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(format!("tiny-{family}"))
}

/// The golden tensors diffusers recorded for a family.
pub fn goldens(family: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(model_dir(family).join("goldens.safetensors"), &Device::Cpu)
        .expect("goldens load")
}

/// Largest absolute difference between two tensors of the same shape.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims(), "shapes differ");
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// Largest absolute value of a tensor.
pub fn max_abs(a: &Tensor) -> f32 {
    a.abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// Asserts `ours` is within `rel` of `golden`'s scale (its largest magnitude).
pub fn assert_close(what: &str, ours: &Tensor, golden: &Tensor, rel: f32) {
    let diff = max_abs_diff(ours, golden);
    let scale = max_abs(golden).max(1e-6);
    assert!(
        diff <= rel * scale,
        "{what}: max |diff| {diff} exceeds {rel} x scale {scale}"
    );
}
