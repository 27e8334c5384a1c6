//! The trunk fingerprint covers exactly the weights the trunk loads, and tells splits and models
//! apart.

mod common;

use std::collections::BTreeSet;
use std::sync::Mutex;

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder};
use common::{FAMILIES, model_dir};
use lsplit_diffusion::fingerprint::trunk_uses;
use lsplit_diffusion::unet::{UnetConfig, UnetCut, UnetTrunk};
use lsplit_diffusion::{ModelDir, UnetSplit, trunk_fingerprint};

/// Weights that remember which tensors were asked for.
struct Recording<'a> {
    weights: MmapedSafetensors,
    asked: &'a Mutex<BTreeSet<String>>,
}

impl SimpleBackend for Recording<'_> {
    fn get(
        &self,
        shape: Shape,
        name: &str,
        init: Init,
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<Tensor> {
        self.asked.lock().unwrap().insert(name.to_string());
        SimpleBackend::get(&self.weights, shape, name, init, dtype, device)
    }

    fn get_unchecked(
        &self,
        name: &str,
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<Tensor> {
        self.asked.lock().unwrap().insert(name.to_string());
        SimpleBackend::get_unchecked(&self.weights, name, dtype, device)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        SimpleBackend::contains_tensor(&self.weights, name)
    }
}

#[test]
fn the_fingerprint_covers_exactly_the_tensors_the_trunk_loads() {
    for family in FAMILIES {
        let root = model_dir(family);
        let dir = ModelDir::open(&root).unwrap();
        let config: UnetConfig = dir.config("unet", "config.json").unwrap();
        let file = dir.weights("unet").unwrap();
        for n in 1..=config.levels() {
            let asked = Mutex::new(BTreeSet::new());
            // SAFETY: the fixture is not modified while mapped.
            let weights = unsafe { MmapedSafetensors::new(&file) }.unwrap();
            let all: Vec<String> = weights.tensors().into_iter().map(|(n, _)| n).collect();
            let vb = VarBuilder::from_backend(
                Box::new(Recording {
                    weights,
                    asked: &asked,
                }),
                DType::F32,
                Device::Cpu,
            );
            let cut = UnetCut::new(&config, n).unwrap();
            UnetTrunk::load(&vb, &config, cut, "unet").unwrap();
            drop(vb);
            let loaded = asked.into_inner().unwrap();
            let fingerprinted: BTreeSet<String> = all
                .into_iter()
                .filter(|name| trunk_uses(name, UnetSplit::Lambda(n), config.levels()))
                .collect();
            assert_eq!(loaded, fingerprinted, "{family} lambda:{n}");
        }
    }
}

#[test]
fn fingerprints_differ_between_splits_and_models_and_repeat_exactly() {
    let mut seen = BTreeSet::new();
    for family in FAMILIES {
        for split in [
            UnetSplit::Component,
            UnetSplit::Lambda(1),
            UnetSplit::Lambda(2),
        ] {
            let first = trunk_fingerprint(&model_dir(family), split).unwrap();
            assert_eq!(first, trunk_fingerprint(&model_dir(family), split).unwrap());
            assert_eq!(first.split, split);
            assert!(
                seen.insert(first.sha256),
                "{family} {split} repeats a digest"
            );
            assert!(
                first
                    .to_string()
                    .starts_with(&format!("UNet {split} trunk sha256 ")),
                "{first}"
            );
        }
    }
    let none = trunk_fingerprint(&model_dir("sd15"), UnetSplit::None).unwrap_err();
    assert_eq!(
        none.to_string(),
        "--unet-split none has no trunk to fingerprint"
    );
    let deep = trunk_fingerprint(&model_dir("sd15"), UnetSplit::Lambda(9)).unwrap_err();
    assert_eq!(
        deep.to_string(),
        "lambda:9: this UNet has 2 levels; N must be between 1 and 2"
    );
}
