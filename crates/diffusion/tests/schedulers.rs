//! Scheduler configuration, timesteps and steps: exact error messages, timesteps worked out
//! from diffusers' formulas, and 111 configurations recorded from diffusers 0.31 by
//! `scripts/make_scheduler_cases.py` into `tests/fixtures/scheduler_cases.json`.

use candle_core::{Device, Tensor};
use lsplit_diffusion::scheduler::{BetaSchedule, PredictionType, TimestepSpacing};
use lsplit_diffusion::{Scheduler, SchedulerConfig, SchedulerKind};
use serde_json::{Value, json};

/// The scheduler_config.json of Stable Diffusion XL base, as published.
const SDXL_CONFIG: &str = r#"{
  "_class_name": "EulerDiscreteScheduler",
  "_diffusers_version": "0.19.0.dev0",
  "beta_end": 0.012,
  "beta_schedule": "scaled_linear",
  "beta_start": 0.00085,
  "clip_sample": false,
  "interpolation_type": "linear",
  "num_train_timesteps": 1000,
  "prediction_type": "epsilon",
  "sample_max_value": 1.0,
  "set_alpha_to_one": false,
  "skip_prk_steps": true,
  "steps_offset": 1,
  "timestep_spacing": "leading",
  "trained_betas": null,
  "use_karras_sigmas": false
}"#;

/// The scheduler_config.json of Stable Diffusion 1.5, as published.
const SD15_CONFIG: &str = r#"{
  "_class_name": "PNDMScheduler",
  "_diffusers_version": "0.6.0",
  "beta_end": 0.012,
  "beta_schedule": "scaled_linear",
  "beta_start": 0.00085,
  "num_train_timesteps": 1000,
  "set_alpha_to_one": false,
  "skip_prk_steps": true,
  "steps_offset": 1,
  "trained_betas": null,
  "clip_sample": false
}"#;

fn sdxl() -> SchedulerConfig {
    SchedulerConfig::from_json(SDXL_CONFIG).unwrap()
}

/// `SDXL_CONFIG` with `changes` merged in.
fn sdxl_with(changes: Value) -> SchedulerConfig {
    let mut config: Value = serde_json::from_str(SDXL_CONFIG).unwrap();
    for (key, value) in changes.as_object().unwrap() {
        config[key] = value.clone();
    }
    SchedulerConfig::from_json(&config.to_string()).unwrap()
}

fn parse_error(json: &str) -> String {
    SchedulerConfig::from_json(json).unwrap_err().to_string()
}

fn build_error(kind: SchedulerKind, config: &SchedulerConfig, steps: usize) -> String {
    Scheduler::new(kind, config, steps).unwrap_err().to_string()
}

fn timesteps(kind: SchedulerKind, config: &SchedulerConfig, steps: usize) -> Vec<f64> {
    Scheduler::new(kind, config, steps)
        .unwrap()
        .timesteps()
        .to_vec()
}

#[test]
fn empty_config_takes_diffusers_defaults() {
    let config = SchedulerConfig::from_json("{}").unwrap();
    assert_eq!(config, SchedulerConfig::default());
    assert_eq!(config.num_train_timesteps, 1000);
    assert_eq!((config.beta_start, config.beta_end), (0.0001, 0.02));
    assert_eq!(config.beta_schedule, BetaSchedule::Linear);
    assert_eq!(config.prediction_type, PredictionType::Epsilon);
    assert_eq!(config.steps_offset, 0);
    assert!(config.clip_sample && config.set_alpha_to_one);
    assert_eq!(
        config.timestep_spacing_for(SchedulerKind::Euler),
        TimestepSpacing::Linspace
    );
    assert_eq!(
        config.timestep_spacing_for(SchedulerKind::EulerAncestral),
        TimestepSpacing::Linspace
    );
    assert_eq!(
        config.timestep_spacing_for(SchedulerKind::Ddim),
        TimestepSpacing::Leading
    );
}

#[test]
fn published_configs_parse() {
    let config = sdxl();
    assert_eq!(config.class_kind().unwrap(), SchedulerKind::Euler);
    assert_eq!(config.beta_schedule, BetaSchedule::ScaledLinear);
    assert_eq!((config.beta_start, config.beta_end), (0.00085, 0.012));
    assert_eq!(config.steps_offset, 1);
    assert_eq!(config.timestep_spacing, Some(TimestepSpacing::Leading));
    assert_eq!(config.trained_betas, None);

    let sd15 = SchedulerConfig::from_json(SD15_CONFIG).unwrap();
    assert!(!sd15.set_alpha_to_one && !sd15.clip_sample);
    assert_eq!(sd15.timestep_spacing, None);
}

#[test]
fn scheduler_names_and_classes() {
    for kind in SchedulerKind::ALL {
        assert_eq!(kind.to_string().parse::<SchedulerKind>().unwrap(), kind);
        assert_eq!(
            SchedulerKind::from_class_name(kind.class_name()).unwrap(),
            kind
        );
    }
    assert_eq!(
        "euler-a".parse::<SchedulerKind>().unwrap(),
        SchedulerKind::EulerAncestral
    );
    assert_eq!(
        "dpm++".parse::<SchedulerKind>().unwrap_err().to_string(),
        "unknown scheduler `dpm++`: valid names are euler, euler-a, ddim"
    );
}

#[test]
fn unsupported_class_names_the_supported_ones() {
    let sd15 = SchedulerConfig::from_json(SD15_CONFIG).unwrap();
    assert_eq!(
        sd15.class_kind().unwrap_err().to_string(),
        "scheduler class `PNDMScheduler` is not supported: supported classes are \
         EulerDiscreteScheduler, EulerAncestralDiscreteScheduler and DDIMScheduler (pass \
         --scheduler euler|euler-a|ddim to override)"
    );
    let dpm = sdxl_with(json!({"_class_name": "DPMSolverMultistepScheduler"}));
    assert!(
        dpm.class_kind()
            .unwrap_err()
            .to_string()
            .starts_with("scheduler class `DPMSolverMultistepScheduler` is not supported")
    );
    assert_eq!(
        SchedulerConfig::from_json("{}")
            .unwrap()
            .class_kind()
            .unwrap_err()
            .to_string(),
        "invalid scheduler config: `_class_name` is missing (pass --scheduler \
         euler|euler-a|ddim)"
    );
    // Overriding the class uses the file's betas and spacing, as diffusers' from_config.
    assert_eq!(
        timesteps(SchedulerKind::Euler, &sd15, 4),
        [999.0, 666.0, 333.0, 0.0]
    );
    assert_eq!(
        timesteps(SchedulerKind::Ddim, &sd15, 4),
        [751.0, 501.0, 251.0, 1.0]
    );
}

#[test]
fn bad_values_are_rejected_by_name() {
    assert_eq!(
        parse_error(r#"{"beta_schedule": "squaredcos_cap_v2"}"#),
        "invalid scheduler config: beta_schedule `squaredcos_cap_v2` is not supported \
         (expected one of: linear, scaled_linear)"
    );
    assert_eq!(
        parse_error(r#"{"prediction_type": "flow"}"#),
        "invalid scheduler config: prediction_type `flow` is not supported (expected one of: \
         epsilon, v_prediction, sample)"
    );
    assert_eq!(
        parse_error(r#"{"timestep_spacing": "karras"}"#),
        "invalid scheduler config: timestep_spacing `karras` is not supported (expected one \
         of: linspace, leading, trailing)"
    );
    assert_eq!(
        parse_error(r#"{"interpolation_type": "cubic"}"#),
        "invalid scheduler config: interpolation_type `cubic` is not supported (expected one \
         of: linear, log_linear)"
    );
    assert_eq!(
        parse_error(r#"{"final_sigmas_type": "one"}"#),
        "invalid scheduler config: final_sigmas_type `one` is not supported (expected one of: \
         zero, sigma_min)"
    );
    assert_eq!(
        parse_error(r#"{"trained_betas": [0.1, 0.2]}"#),
        "invalid scheduler config: trained_betas has 2 values but num_train_timesteps is 1000"
    );
    assert_eq!(
        parse_error(r#"{"num_train_timesteps": 2, "trained_betas": [0.1, 1.5]}"#),
        "invalid scheduler config: trained_betas value 1.5 is outside [0, 1)"
    );
    assert_eq!(
        parse_error(r#"{"beta_start": -0.1}"#),
        "invalid scheduler config: beta_start must be in (0, 1), got -0.1"
    );
    assert_eq!(
        parse_error(r#"{"num_train_timesteps": 1}"#),
        "invalid scheduler config: num_train_timesteps must be at least 2, got 1"
    );
    assert!(
        parse_error(r#"{"num_train_timesteps": "many"}"#)
            .starts_with("invalid scheduler config: scheduler_config.json: invalid type: string")
    );
    assert!(parse_error("{").starts_with("invalid scheduler config: scheduler_config.json: EOF"));
}

#[test]
fn options_a_scheduler_cannot_honour_are_errors() {
    let karras = sdxl_with(json!({"use_karras_sigmas": true}));
    assert_eq!(
        build_error(SchedulerKind::Euler, &karras, 30),
        "invalid scheduler config: use_karras_sigmas is not supported by the Euler scheduler \
         (supported: linear interpolation of the training sigmas)"
    );
    // Euler ancestral and DDIM have no such option: diffusers ignores it for them.
    assert!(Scheduler::new(SchedulerKind::EulerAncestral, &karras, 30).is_ok());
    assert!(Scheduler::new(SchedulerKind::Ddim, &karras, 30).is_ok());
    for (change, option) in [
        (
            json!({"use_exponential_sigmas": true}),
            "use_exponential_sigmas",
        ),
        (json!({"use_beta_sigmas": true}), "use_beta_sigmas"),
        (
            json!({"interpolation_type": "log_linear"}),
            "interpolation_type `log_linear`",
        ),
        (
            json!({"timestep_type": "continuous"}),
            "timestep_type `continuous`",
        ),
    ] {
        assert!(
            build_error(SchedulerKind::Euler, &sdxl_with(change), 30).starts_with(&format!(
                "invalid scheduler config: {option} is not supported"
            ))
        );
    }
    assert_eq!(
        build_error(
            SchedulerKind::EulerAncestral,
            &sdxl_with(json!({"prediction_type": "sample"})),
            30
        ),
        "invalid scheduler config: prediction_type `sample` is not supported by the Euler \
         ancestral scheduler (diffusers does not implement it either)"
    );
    assert_eq!(
        build_error(
            SchedulerKind::Ddim,
            &sdxl_with(json!({"thresholding": true})),
            30
        ),
        "invalid scheduler config: thresholding is not supported by the DDIM scheduler"
    );
}

#[test]
fn step_counts_outside_the_training_range_are_errors() {
    let config = sdxl();
    for kind in SchedulerKind::ALL {
        for steps in [0, 1001] {
            assert_eq!(
                build_error(kind, &config, steps),
                format!(
                    "invalid scheduler config: the number of steps must be between 1 and \
                     num_train_timesteps (1000), got {steps}"
                )
            );
        }
    }
    // Leading spacing with steps_offset 1 puts the first of 1000 steps at timestep 1000.
    assert_eq!(
        build_error(SchedulerKind::Ddim, &config, 1000),
        "invalid scheduler config: DDIM timestep 1000 for 1000 steps (steps_offset 1) is \
         outside the 1000 training timesteps"
    );
}

#[test]
fn leading_spacing_counts_up_from_steps_offset() {
    let config = sdxl();
    let expected: Vec<f64> = (0..30).rev().map(|i| f64::from(i * 33 + 1)).collect();
    for kind in SchedulerKind::ALL {
        assert_eq!(timesteps(kind, &config, 4), [751.0, 501.0, 251.0, 1.0]);
        let thirty = timesteps(kind, &config, 30);
        assert_eq!(thirty, expected);
        assert_eq!(&thirty[..3], [958.0, 925.0, 892.0]);
    }
}

#[test]
fn trailing_spacing_counts_down_from_the_last_timestep() {
    let config = sdxl_with(json!({"timestep_spacing": "trailing"}));
    let expected = [
        999.0, 966.0, 932.0, 899.0, 866.0, 832.0, 799.0, 766.0, 732.0, 699.0, 666.0, 632.0, 599.0,
        566.0, 532.0, 499.0, 466.0, 432.0, 399.0, 366.0, 332.0, 299.0, 266.0, 232.0, 199.0, 166.0,
        132.0, 99.0, 66.0, 32.0,
    ];
    for kind in SchedulerKind::ALL {
        assert_eq!(timesteps(kind, &config, 4), [999.0, 749.0, 499.0, 249.0]);
        assert_eq!(timesteps(kind, &config, 30), expected);
    }
    // numpy's arange(1000, 0, -1000 / 61) has 62 elements, the last rounding to timestep -1:
    // diffusers runs them all. Euler clamps sigma there as np.interp does; DDIM would index
    // alphas_cumprod[-1] (the last timestep's), so it is refused.
    for kind in [SchedulerKind::Euler, SchedulerKind::EulerAncestral] {
        let steps = timesteps(kind, &config, 61);
        assert_eq!(steps.len(), 62);
        assert_eq!(&steps[60..], [15.0, -1.0]);
    }
    assert_eq!(
        build_error(SchedulerKind::Ddim, &config, 61),
        "invalid scheduler config: DDIM timestep -1 for 61 steps (steps_offset 1) is outside \
         the 1000 training timesteps"
    );
}

#[test]
fn linspace_spacing_is_fractional_for_euler_and_rounded_for_ddim() {
    let config = sdxl_with(json!({"timestep_spacing": "linspace"}));
    for kind in SchedulerKind::ALL {
        assert_eq!(timesteps(kind, &config, 4), [999.0, 666.0, 333.0, 0.0]);
    }
    // 999 * i / 29 as float32.
    let euler = timesteps(SchedulerKind::Euler, &config, 30);
    assert_eq!(euler.len(), 30);
    assert_eq!(
        &euler[..3],
        [999.0, 964.551_696_777_343_8, 930.103_454_589_843_8]
    );
    assert_eq!(&euler[28..], [34.448_276_519_775_39, 0.0]);
    assert_eq!(timesteps(SchedulerKind::EulerAncestral, &config, 30), euler);
    let ddim = timesteps(SchedulerKind::Ddim, &config, 30);
    assert_eq!(&ddim[..5], [999.0, 965.0, 930.0, 896.0, 861.0]);
    assert_eq!(&ddim[27..], [69.0, 34.0, 0.0]);
}

#[test]
fn init_noise_sigma_follows_the_spacing() {
    // Values from diffusers 0.31 for the SDXL config.
    let leading = Scheduler::new(SchedulerKind::Euler, &sdxl(), 30).unwrap();
    assert_eq!(leading.init_noise_sigma() as f32, 11.520_334);
    let linspace = sdxl_with(json!({"timestep_spacing": "linspace"}));
    let linspace = Scheduler::new(SchedulerKind::Euler, &linspace, 30).unwrap();
    assert_eq!(linspace.init_noise_sigma() as f32, 14.614_647);
    let zero_snr =
        sdxl_with(json!({"timestep_spacing": "trailing", "rescale_betas_zero_snr": true}));
    let zero_snr = Scheduler::new(SchedulerKind::Euler, &zero_snr, 4).unwrap();
    // sqrt(2^24 - 1) rounds to 4095.99976 in float32; torch's float32 sqrt gives 4096.
    assert_eq!(zero_snr.init_noise_sigma(), 4_095.999_755_859_375);
    assert_eq!(
        Scheduler::new(SchedulerKind::Ddim, &sdxl(), 30)
            .unwrap()
            .init_noise_sigma(),
        1.0
    );
}

#[test]
fn bad_step_arguments_are_errors() {
    let device = Device::Cpu;
    let sample = Tensor::ones((1, 4, 8, 8), candle_core::DType::F32, &device).unwrap();
    let ancestral = Scheduler::new(SchedulerKind::EulerAncestral, &sdxl(), 4).unwrap();
    assert!(ancestral.needs_noise());
    assert_eq!(
        ancestral
            .step(&sample, 0, &sample, None)
            .unwrap_err()
            .to_string(),
        "the Euler ancestral scheduler needs noise for every step"
    );
    let small = Tensor::ones((1, 4, 4, 4), candle_core::DType::F32, &device).unwrap();
    assert_eq!(
        ancestral
            .step(&sample, 0, &sample, Some(&small))
            .unwrap_err()
            .to_string(),
        "noise shape [1, 4, 4, 4] does not match the sample shape [1, 4, 8, 8]"
    );
    assert_eq!(
        ancestral
            .step(&small, 0, &sample, Some(&sample))
            .unwrap_err()
            .to_string(),
        "model output shape [1, 4, 4, 4] does not match the sample shape [1, 4, 8, 8]"
    );
    assert_eq!(
        ancestral
            .scale_model_input(&sample, 4)
            .unwrap_err()
            .to_string(),
        "step index 4 is out of range: the schedule has 4 steps"
    );
    // Deterministic schedulers ignore noise, whatever its shape.
    let euler = Scheduler::new(SchedulerKind::Euler, &sdxl(), 4).unwrap();
    assert!(!euler.needs_noise());
    let with_noise = euler.step(&sample, 3, &sample, Some(&small)).unwrap();
    let without = euler.step(&sample, 3, &sample, None).unwrap();
    assert_eq!(values(&with_noise), values(&without));
}

fn values(tensor: &Tensor) -> Vec<f32> {
    tensor.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

fn floats(value: &Value) -> Vec<f32> {
    value
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap() as f32)
        .collect()
}

fn tensor(value: &Value) -> Tensor {
    Tensor::from_vec(floats(value), (1, 1, 2, 2), &Device::Cpu).unwrap()
}

/// Asserts `|ours - diffusers| <= 1e-5 * max(|diffusers|, 1)` element by element.
fn assert_close(what: &str, ours: &Tensor, expected: &[f32]) {
    for (a, b) in values(ours).iter().zip(expected) {
        assert!(
            (a - b).abs() <= 1e-5 * b.abs().max(1.0),
            "{what}: {a} against diffusers' {b}"
        );
    }
}

#[test]
fn recorded_diffusers_cases_match() {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/scheduler_cases.json"
    );
    let document: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let sample = tensor(&document["sample"]);
    let model_output = tensor(&document["model_output"]);
    let noise = tensor(&document["noise"]);
    let cases = document["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 111);
    for case in cases {
        let config = SchedulerConfig::from_json(&case["config"].to_string()).unwrap();
        let kind = config.class_kind().unwrap();
        assert_eq!(kind.name(), case["kind"].as_str().unwrap());
        let steps = case["steps"].as_u64().unwrap() as usize;
        let what = format!("{kind} {steps} steps {}", case["config"]);
        // Timesteps are float32 (Euler) or integers (DDIM): compared as float32, which also
        // absorbs serde_json's last-bit float parsing.
        let expected_timesteps = floats(&case["timesteps"]);
        if kind == SchedulerKind::Ddim && expected_timesteps.iter().any(|&t| t < 0.0) {
            assert!(Scheduler::new(kind, &config, steps).is_err(), "{what}");
            continue;
        }
        let scheduler = Scheduler::new(kind, &config, steps).unwrap();
        let timesteps: Vec<f32> = scheduler.timesteps().iter().map(|&t| t as f32).collect();
        assert_eq!(timesteps, expected_timesteps, "{what}");
        let sigma = case["init_noise_sigma"].as_f64().unwrap();
        assert!(
            (scheduler.init_noise_sigma() - sigma).abs() <= 1e-6 * sigma,
            "{what}: init_noise_sigma {} against {sigma}",
            scheduler.init_noise_sigma()
        );
        for check in case["checks"].as_array().unwrap() {
            let step = check["step"].as_u64().unwrap() as usize;
            let scaled = scheduler.scale_model_input(&sample, step).unwrap();
            assert_close(
                &format!("{what} scaled {step}"),
                &scaled,
                &floats(&check["scaled"]),
            );
            let previous = scheduler
                .step(&model_output, step, &sample, Some(&noise))
                .unwrap();
            assert_close(
                &format!("{what} prev {step}"),
                &previous,
                &floats(&check["prev"]),
            );
        }
    }
}
