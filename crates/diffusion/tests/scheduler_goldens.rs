//! The schedulers against diffusers 0.31: goldens recorded by
//! `tests/fixtures/make_tiny_models.py` from each tiny family's `scheduler_config.json`
//! (`Class.from_config(config)`, `set_timesteps(4)`, four chained steps on fixed tensors).

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{Device, Tensor};
use lsplit_diffusion::{Scheduler, SchedulerConfig, SchedulerKind};

/// Largest accepted `|ours - diffusers| / max(|diffusers|, 1)` per element.
const TOLERANCE: f32 = 1e-5;

fn family_dir(family: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(format!("tiny-{family}"))
}

fn goldens(family: &str) -> HashMap<String, Tensor> {
    let path = family_dir(family).join("goldens.safetensors");
    candle_core::safetensors::load(&path, &Device::Cpu)
        .unwrap_or_else(|err| panic!("cannot load {}: {err}", path.display()))
}

fn golden<'a>(goldens: &'a HashMap<String, Tensor>, key: &str) -> &'a Tensor {
    goldens
        .get(key)
        .unwrap_or_else(|| panic!("golden `{key}` is missing"))
}

fn values(tensor: &Tensor) -> Vec<f32> {
    tensor.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

fn assert_close(what: &str, ours: &Tensor, expected: &Tensor) {
    assert_eq!(ours.dims(), expected.dims(), "{what}: shape");
    let worst = values(ours)
        .iter()
        .zip(values(expected))
        .map(|(a, b)| (a - b).abs() / b.abs().max(1.0))
        .fold(0f32, f32::max);
    assert!(
        worst <= TOLERANCE,
        "{what}: relative error {worst:e} exceeds {TOLERANCE:e}"
    );
}

fn check_family(family: &str) {
    let config = SchedulerConfig::load(&family_dir(family).join("scheduler/scheduler_config.json"))
        .expect("scheduler config parses");
    let goldens = goldens(family);
    for (name, kind) in [
        ("euler", SchedulerKind::Euler),
        ("euler_a", SchedulerKind::EulerAncestral),
        ("ddim", SchedulerKind::Ddim),
    ] {
        let scheduler = Scheduler::new(kind, &config, 4).unwrap();
        let expected_timesteps: Vec<f64> =
            values(golden(&goldens, &format!("sched_{name}_timesteps")))
                .into_iter()
                .map(f64::from)
                .collect();
        assert_eq!(scheduler.timesteps(), expected_timesteps, "{family} {name}");
        let expected_sigma = golden(&goldens, &format!("sched_{name}_init_noise_sigma"))
            .to_scalar::<f32>()
            .unwrap();
        assert_eq!(
            scheduler.init_noise_sigma() as f32,
            expected_sigma,
            "{family} {name} init_noise_sigma"
        );
        assert_eq!(
            scheduler.needs_noise(),
            kind == SchedulerKind::EulerAncestral
        );

        let mut sample = golden(&goldens, "sched_sample").clone();
        for k in 0..4 {
            let scaled = scheduler.scale_model_input(&sample, k).unwrap();
            assert_close(
                &format!("{family} {name} scaled {k}"),
                &scaled,
                golden(&goldens, &format!("sched_{name}_scaled_{k}")),
            );
            let noise = goldens.get(&format!("sched_{name}_noise_{k}"));
            let model_output = golden(&goldens, &format!("sched_model_output_{k}"));
            let previous = scheduler.step(model_output, k, &sample, noise).unwrap();
            let expected = golden(&goldens, &format!("sched_{name}_prev_{k}"));
            assert_close(&format!("{family} {name} prev {k}"), &previous, expected);
            // Continue from diffusers' sample so each step is checked on its own.
            sample = expected.clone();
        }
    }
}

#[test]
fn sd15_ddim_config_matches_diffusers() {
    check_family("sd15");
}

#[test]
fn sd21_euler_v_prediction_config_matches_diffusers() {
    check_family("sd21");
}

#[test]
fn sdxl_euler_epsilon_config_matches_diffusers() {
    check_family("sdxl");
}
