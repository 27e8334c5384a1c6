//! Malformed model directories get a clear error naming what is wrong, never a panic.

mod common;

use std::path::Path;

use candle_core::Device;
use common::model_dir;
use lsplit_diffusion::scheduler::SchedulerKind;
use lsplit_diffusion::{DevicePipeline, ImageRequest, UnetSplit, load_trunk_model};
use lsplit_wire::StepCodec;

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

/// A copy of tiny-sd15 changed by `edit`, and the error loading it gives.
fn load_error(edit: impl FnOnce(&Path)) -> String {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("model");
    copy_dir(&model_dir("sd15"), &root);
    edit(&root);
    let device = DevicePipeline::load(&root, UnetSplit::Lambda(1), StepCodec::F32, &Device::Cpu)
        .err()
        .map(|e| e.to_string());
    let trunk = load_trunk_model(&root, UnetSplit::Lambda(1), &Device::Cpu)
        .err()
        .map(|e| e.to_string());
    device
        .or(trunk)
        .expect("the damaged directory loaded")
        .replace(&root.display().to_string(), "ROOT")
}

fn edit_json(path: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let mut value: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    edit(&mut value);
    std::fs::write(path, serde_json::to_string(&value).unwrap()).unwrap();
}

#[test]
fn not_a_directory() {
    let e = DevicePipeline::load(
        Path::new("/nonexistent/model"),
        UnetSplit::None,
        StepCodec::F32,
        &Device::Cpu,
    )
    .err()
    .unwrap();
    assert_eq!(
        e.to_string(),
        "model directory: /nonexistent/model is not a directory (expected a diffusers-format \
         model directory)"
    );
}

#[test]
fn missing_or_broken_files() {
    assert_eq!(
        load_error(|r| std::fs::remove_file(r.join("model_index.json")).unwrap()),
        "model directory: ROOT/model_index.json: No such file or directory (os error 2)"
    );
    assert_eq!(
        load_error(|r| std::fs::write(r.join("model_index.json"), "{not json").unwrap()),
        "model directory: ROOT/model_index.json: invalid JSON: key must be a string at line 1 \
         column 2"
    );
    assert_eq!(
        load_error(|r| std::fs::remove_dir_all(r.join("vae")).unwrap()),
        "model directory: ROOT: missing component directory vae/"
    );
    assert_eq!(
        load_error(
            |r| std::fs::remove_file(r.join("unet/diffusion_pytorch_model.safetensors")).unwrap()
        ),
        "model directory: ROOT/unet: no diffusion_pytorch_model.safetensors (or \
         .fp16.safetensors) weights"
    );
    let truncated = load_error(|r| {
        let path = r.join("unet/diffusion_pytorch_model.safetensors");
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    });
    assert!(
        truncated.starts_with("weights ROOT/unet/diffusion_pytorch_model.safetensors: "),
        "{truncated}"
    );
    let garbage = load_error(|r| {
        std::fs::write(
            r.join("vae/diffusion_pytorch_model.safetensors"),
            b"garbage",
        )
        .unwrap()
    });
    assert!(
        garbage.starts_with("weights ROOT/vae/diffusion_pytorch_model.safetensors: "),
        "{garbage}"
    );
}

#[test]
fn unsupported_configs() {
    assert_eq!(
        load_error(|r| edit_json(&r.join("model_index.json"), |v| {
            v["_class_name"] = "StableDiffusion3Pipeline".into()
        })),
        "model directory: pipeline StableDiffusion3Pipeline is not supported (supported: \
         StableDiffusionPipeline, StableDiffusionXLPipeline)"
    );
    assert_eq!(
        load_error(|r| edit_json(&r.join("unet/config.json"), |v| {
            v["down_block_types"][1] = "SimpleCrossAttnDownBlock2D".into()
        })),
        "invalid config: unet: down block 1 SimpleCrossAttnDownBlock2D with up block 0 \
         UpBlock2D is not supported (CrossAttnDownBlock2D/CrossAttnUpBlock2D or \
         DownBlock2D/UpBlock2D)"
    );
    assert_eq!(
        load_error(|r| edit_json(&r.join("unet/config.json"), |v| {
            v["block_out_channels"] = serde_json::json!([32, 64, 64])
        })),
        "invalid config: unet: 3 block_out_channels but 2 down and 2 up block types"
    );
    assert_eq!(
        load_error(|r| edit_json(&r.join("text_encoder/config.json"), |v| {
            v["hidden_act"] = "relu".into()
        })),
        "invalid config: text encoder: hidden_act \"relu\" is not supported (quick_gelu, gelu)"
    );
    let shape = load_error(|r| {
        edit_json(&r.join("unet/config.json"), |v| {
            v["cross_attention_dim"] = 48.into()
        })
    });
    assert!(
        shape.starts_with("weights ROOT/unet/diffusion_pytorch_model.safetensors: "),
        "{shape}"
    );
    assert_eq!(
        load_error(
            |r| edit_json(&r.join("tokenizer/tokenizer_config.json"), |v| {
                v["bos_token"] = "<|start|>".into()
            })
        ),
        "tokenizer: ROOT/tokenizer: special token \"<|start|>\" is not in vocab.json"
    );
}

/// A scheduler class we do not implement (real SD 1.5 ships PNDM) is refused when generating,
/// with the way out; `--scheduler` overrides it.
#[test]
fn unsupported_scheduler_class_and_its_override() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("model");
    copy_dir(&model_dir("sd15"), &root);
    edit_json(&root.join("scheduler/scheduler_config.json"), |v| {
        v["_class_name"] = "PNDMScheduler".into()
    });
    let pipeline =
        DevicePipeline::load(&root, UnetSplit::None, StepCodec::F32, &Device::Cpu).unwrap();
    let mut request = ImageRequest {
        prompt: "a cat".into(),
        negative: None,
        steps: 2,
        guidance: 5.0,
        seed: 1,
        width: 64,
        height: 64,
        scheduler: None,
    };
    let e = pipeline
        .generate(&request, None, &mut |_| Ok(()))
        .unwrap_err();
    assert_eq!(
        e.to_string(),
        "scheduler class `PNDMScheduler` is not supported: supported classes are \
         EulerDiscreteScheduler, EulerAncestralDiscreteScheduler and DDIMScheduler (pass \
         --scheduler euler|euler-a|ddim to override)"
    );
    request.scheduler = Some(SchedulerKind::Ddim);
    pipeline.generate(&request, None, &mut |_| Ok(())).unwrap();
}

/// Half-precision weights (`*.fp16.safetensors`, as the diffusers hub variants are named) load
/// and give nearly the image of the f32 weights.
#[test]
fn f16_weights_load() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("model");
    copy_dir(&model_dir("sd15"), &root);
    for (component, stem) in [
        ("unet", "diffusion_pytorch_model"),
        ("vae", "diffusion_pytorch_model"),
        ("text_encoder", "model"),
    ] {
        let f32_path = root.join(component).join(format!("{stem}.safetensors"));
        let tensors = candle_core::safetensors::load(&f32_path, &Device::Cpu).unwrap();
        let half: std::collections::HashMap<String, candle_core::Tensor> = tensors
            .into_iter()
            .map(|(k, v)| (k, v.to_dtype(candle_core::DType::F16).unwrap()))
            .collect();
        candle_core::safetensors::save(
            &half,
            root.join(component)
                .join(format!("{stem}.fp16.safetensors")),
        )
        .unwrap();
        std::fs::remove_file(f32_path).unwrap();
    }
    let request = ImageRequest {
        prompt: "a lighthouse at dawn".into(),
        negative: None,
        steps: 2,
        guidance: 7.0,
        seed: 9,
        width: 64,
        height: 64,
        scheduler: None,
    };
    let image = |root: &Path| {
        DevicePipeline::load(root, UnetSplit::None, StepCodec::F32, &Device::Cpu)
            .unwrap()
            .generate(&request, None, &mut |_| Ok(()))
            .unwrap()
            .image
    };
    let half = image(&root);
    let full = image(&model_dir("sd15"));
    assert_ne!(half, full, "f16 weights round");
    let psnr = lsplit_diffusion::quality::psnr(&half, &full).unwrap();
    assert!(psnr > 35.0, "f16 weights: PSNR {psnr} dB against f32");
}
