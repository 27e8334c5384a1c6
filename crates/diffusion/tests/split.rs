//! Split equals unsplit: with the f32 codec, `component` and every `lambda:N` give the same image
//! bytes as the whole pipeline, in-process, for the three tiny families. Lossy codecs change the
//! image by a bounded amount, and what crosses is counted to the byte.

mod common;

use std::sync::Arc;

use candle_core::Device;
use common::{FAMILIES, model_dir};
use lsplit_diffusion::quality::{psnr, ssim};
use lsplit_diffusion::scheduler::SchedulerKind;
use lsplit_diffusion::{
    DevicePipeline, Generated, ImageRequest, LocalDiffusionTrunk, StepProgress, UnetSplit,
    load_trunk_model,
};
use lsplit_wire::StepCodec;

fn request(seed: u64) -> ImageRequest {
    ImageRequest {
        prompt: "a lighthouse at dawn".into(),
        negative: Some("blurry".into()),
        steps: 3,
        guidance: 7.0,
        seed,
        width: 64,
        height: 64,
        scheduler: None,
    }
}

fn generate(family: &str, split: UnetSplit, codec: StepCodec, request: &ImageRequest) -> Generated {
    let root = model_dir(family);
    let pipeline = DevicePipeline::load(&root, split, codec, &Device::Cpu).unwrap();
    let mut steps_seen = 0;
    let mut on_step = |p: &StepProgress<'_>| {
        steps_seen += 1;
        assert_eq!((p.step, p.total), (steps_seen, request.steps));
        assert_eq!(p.uplink.is_some(), split != UnetSplit::None);
        Ok(())
    };
    let out = match split {
        UnetSplit::None => pipeline.generate(request, None, &mut on_step).unwrap(),
        _ => {
            let model = Arc::new(load_trunk_model(&root, split, &Device::Cpu).unwrap());
            let mut trunk = LocalDiffusionTrunk::new(model, codec, Device::Cpu);
            pipeline
                .generate(request, Some(&mut trunk), &mut on_step)
                .unwrap()
        }
    };
    assert_eq!(steps_seen, request.steps);
    out
}

fn levels(family: &str) -> usize {
    if family == "sdxl" { 3 } else { 2 }
}

#[test]
fn every_split_gives_the_unsplit_image_bytes() {
    for family in FAMILIES {
        let request = request(42);
        let whole = generate(family, UnetSplit::None, StepCodec::F32, &request);
        assert_eq!(
            whole.bytes,
            Default::default(),
            "{family}: nothing crosses unsplit"
        );
        let mut splits = vec![UnetSplit::Component];
        splits.extend((1..=levels(family)).map(UnetSplit::Lambda));
        for split in splits {
            let out = generate(family, split, StepCodec::F32, &request);
            assert_eq!(out.image, whole.image, "{family} {split}");
            assert_eq!(out.bytes.steps, 3, "{family} {split}");
        }
    }
}

/// Euler ancestral draws fresh noise each step from the seeded source: still identical.
#[test]
fn ancestral_scheduler_split_equals_unsplit() {
    let mut request = request(7);
    request.scheduler = Some(SchedulerKind::EulerAncestral);
    let whole = generate("sd15", UnetSplit::None, StepCodec::F32, &request);
    let split = generate("sd15", UnetSplit::Lambda(1), StepCodec::F32, &request);
    assert_eq!(split.image, whole.image);
    let other = generate("sd15", UnetSplit::None, StepCodec::F32, &{
        let mut r = request.clone();
        r.scheduler = Some(SchedulerKind::Euler);
        r
    });
    assert_ne!(other.image, whole.image, "the ancestral noise must matter");
}

#[test]
fn same_seed_same_image_other_seed_other_image() {
    let a = generate("sd21", UnetSplit::None, StepCodec::F32, &request(1));
    let b = generate("sd21", UnetSplit::None, StepCodec::F32, &request(1));
    let c = generate("sd21", UnetSplit::None, StepCodec::F32, &request(2));
    assert_eq!(a.image, b.image);
    assert_ne!(a.image, c.image);
}

/// Byte counts from the shapes (sd15: latents 4x8x8, text 77x32, UNet levels of 32 and 64
/// channels, time embedding 128, guidance batch 2), f32 = 4 bytes a value.
#[test]
fn bytes_that_cross_are_counted_exactly() {
    let request = request(3);
    let context = 2 * 77 * 32 * 4;
    let lambda = generate("sd15", UnetSplit::Lambda(1), StepCodec::F32, &request);
    assert_eq!(lambda.bytes.setup, context);
    // Up: the first down block's output [2, 32, 4, 4] and the time embedding [2, 128].
    assert_eq!(lambda.bytes.up, 3 * (2 * 32 * 4 * 4 + 2 * 128) * 4);
    // Down: the deepest up block's output [2, 64, 8, 8].
    assert_eq!(lambda.bytes.down, 3 * (2 * 64 * 8 * 8) * 4);

    let component = generate("sd15", UnetSplit::Component, StepCodec::F32, &request);
    assert_eq!(component.bytes.setup, context);
    assert_eq!(component.bytes.up, 3 * (4 * 8 * 8) * 4);
    assert_eq!(component.bytes.down, 3 * (4 * 8 * 8) * 4);

    // int4 per channel: per channel 8 bytes of min and scale, then 4 bits a value.
    let int4 = generate(
        "sd15",
        UnetSplit::Lambda(1),
        "int4-ch".parse().unwrap(),
        &request,
    );
    let packed = |channels: usize, values: usize| channels * 8 + values.div_ceil(2);
    assert_eq!(int4.bytes.setup, packed(77, 2 * 77 * 32));
    assert_eq!(
        int4.bytes.up,
        3 * (packed(32, 2 * 32 * 16) + packed(128, 2 * 128))
    );
    assert_eq!(int4.bytes.down, 3 * packed(64, 2 * 64 * 64));
}

/// Lossy codecs: the image moves away from the f32 image, less for wider codecs.
#[test]
fn lossy_codecs_stay_close_to_f32() {
    let request = request(5);
    let reference = generate("sd15", UnetSplit::Lambda(1), StepCodec::F32, &request);
    let quality = |codec: &str| {
        let out = generate(
            "sd15",
            UnetSplit::Lambda(1),
            codec.parse().unwrap(),
            &request,
        );
        (
            psnr(&out.image, &reference.image).unwrap(),
            ssim(&out.image, &reference.image).unwrap(),
        )
    };
    let (f16, f16_ssim) = quality("f16");
    let (int8, _) = quality("int8");
    let (int2, int2_ssim) = quality("int2");
    assert!(
        f16 > 40.0 && f16_ssim > 0.99,
        "f16: {f16} dB, SSIM {f16_ssim}"
    );
    assert!(int8 > 25.0, "int8: {int8} dB");
    assert!(
        int2 < int8 && int2_ssim < f16_ssim,
        "int2 {int2} dB vs int8 {int8} dB"
    );
}

#[test]
fn bad_requests_get_clear_errors() {
    let root = model_dir("sd15");
    let err = |split: UnetSplit| {
        DevicePipeline::load(&root, split, StepCodec::F32, &Device::Cpu)
            .err()
            .unwrap()
            .to_string()
    };
    assert_eq!(
        err(UnetSplit::Lambda(3)),
        "lambda:3: this UNet has 2 levels; N must be between 1 and 2"
    );
    let pipeline =
        DevicePipeline::load(&root, UnetSplit::None, StepCodec::F32, &Device::Cpu).unwrap();
    let mut r = request(1);
    r.width = 72;
    let e = pipeline.generate(&r, None, &mut |_| Ok(())).unwrap_err();
    assert_eq!(
        e.to_string(),
        "image size 72x64: width and height must be multiples of 16 (at most 8192) for this model"
    );
    let mut r = request(1);
    r.steps = 0;
    let e = pipeline.generate(&r, None, &mut |_| Ok(())).unwrap_err();
    assert_eq!(e.to_string(), "0 steps: expected 1 to 1000");
    let model = Arc::new(load_trunk_model(&root, UnetSplit::Lambda(1), &Device::Cpu).unwrap());
    let mut trunk = LocalDiffusionTrunk::new(model, StepCodec::F32, Device::Cpu);
    let e = pipeline
        .generate(&request(1), Some(&mut trunk), &mut |_| Ok(()))
        .unwrap_err();
    assert_eq!(e.to_string(), "UNet split none runs without a trunk");
}

/// The device's own attention for an image (the UNet levels it runs, both guidance halves,
/// and the VAE's single head over every latent position) grows with the square of the area:
/// the edge bounds it before drawing.
#[test]
fn the_device_s_attention_memory_follows_the_image_area() {
    let root = model_dir("sd15");
    let bytes = |split, side| {
        DevicePipeline::load(&root, split, StepCodec::F32, &Device::Cpu)
            .unwrap()
            .attention_bytes(side, side)
    };
    let got = [
        bytes(UnetSplit::Lambda(1), 64),
        bytes(UnetSplit::Lambda(1), 8192),
        bytes(UnetSplit::Component, 64),
        bytes(UnetSplit::None, 64),
    ];
    // 64x64 is an 8x8 latent: level 0 attends over 64 positions with 2 heads for both halves
    // (2 x 2 x 64² floats), the VAE over 64 positions with one (64² floats); 8192x8192 is a
    // 1024x1024 latent, 2^20 positions: 2 x 2 x 2^40 floats.
    assert_eq!(got, [65536, 17592186044416, 16384, 65536]);
}

/// The trunk refuses, from the shapes alone, a step whose attention would not fit its budget:
/// attention memory grows with the square of the image area.
#[test]
fn the_trunk_bounds_attention_memory() {
    let root = model_dir("sd15");
    let model = load_trunk_model(&root, UnetSplit::Lambda(1), &Device::Cpu).unwrap();
    let step = |shape: &[usize]| {
        let t = candle_core::Tensor::zeros(shape, candle_core::DType::F32, &Device::Cpu).unwrap();
        vec![StepCodec::F32.encode(&t).unwrap()]
    };
    // [2, 32, 4, 4] after the first level of an 8x8 latent: the mid block attends over 4x4
    // positions with 2 heads: 2 x 2 x 16² floats = 4096 bytes.
    let ok = step(&[2, 32, 4, 4]);
    model.check_attention_budget(&ok, 4096).unwrap();
    let e = model.check_attention_budget(&ok, 4095).unwrap_err();
    assert_eq!(
        e.to_string(),
        "a step of shape [2, 32, 4, 4] needs 0 MiB for attention, past this trunk's limit of 0 MiB"
    );
    let hostile = step(&[1, 32, 256, 256]);
    let e = model.check_attention_budget(&hostile, 4 << 30).unwrap_err();
    assert_eq!(
        e.to_string(),
        "a step of shape [1, 32, 256, 256] needs 32768 MiB for attention, past this trunk's \
         limit of 4096 MiB"
    );
}
