//! `lsplit image`: text to image with Stable Diffusion, the UNet whole, cut (`lambda:N`) or in the
//! cloud (`component`), the text encoders, the latents and the VAE always on this device.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context;
use candle_core::Device;
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use lsplit_device::{DiffusionTrunkChoice, DiffusionTrunks};
use lsplit_diffusion::quality::{codecs, psnr, ssim};
use lsplit_diffusion::{
    DevicePipeline, DiffusionTrunk, Generated, ImageRequest, RgbImage, SchedulerKind, StepProgress,
    UnetSplit,
};
use lsplit_wire::StepCodec;

use crate::args::CloudArgs;

/// Options of `lsplit image`.
#[derive(Debug, Args)]
pub struct ImageArgs {
    /// What to draw
    pub prompt: String,
    /// Where to write the PNG
    #[arg(long, short = 'o', value_name = "FILE", default_value = "image.png")]
    pub output: PathBuf,
    /// A diffusers-format Stable Diffusion 1.x, 2.x or SDXL directory (model_index.json, unet/,
    /// vae/, text_encoder/, tokenizer/, scheduler/); the weights are yours to bring
    #[arg(long, short = 'm', value_name = "DIR")]
    pub model: PathBuf,
    /// Denoising steps
    #[arg(long, default_value_t = 30)]
    pub steps: usize,
    /// Classifier-free guidance scale (1 or less turns guidance off)
    #[arg(long, default_value_t = 7.5)]
    pub guidance: f64,
    /// Seed of the noise: the same seed gives the same image [default: a random seed, printed]
    #[arg(long)]
    pub seed: Option<u64>,
    /// What to steer away from
    #[arg(long, value_name = "TEXT")]
    pub negative: Option<String>,
    /// Image width in pixels [default: the model's training size]
    #[arg(long)]
    pub width: Option<usize>,
    /// Image height in pixels [default: the model's training size]
    #[arg(long)]
    pub height: Option<usize>,
    /// How the UNet is divided: none (all here), component (whole UNet in the cloud, as in the
    /// original work) or lambda:N (the UNet cut after N levels at each end)
    #[arg(
        long,
        value_name = "MODE",
        default_value = "lambda:1",
        conflicts_with = "cloud"
    )]
    pub unet_split: UnetSplit,
    /// Scheduler: euler, euler-a or ddim [default: the class in scheduler_config.json]
    #[arg(long)]
    pub scheduler: Option<SchedulerKind>,
    /// How step tensors are encoded on the wire: f32 (lossless), f16, bf16, fp8-e4m3, fp8-e5m2,
    /// int8..int2 (affine, per tensor) or int8-ch..int2-ch (per channel)
    #[arg(long, default_value = "f32")]
    pub codec: StepCodec,
    /// Also make the lossless image and print PSNR and SSIM of this one against it
    #[arg(long)]
    pub compare: bool,
    /// Every N steps, decode the latents and write a preview beside the output
    /// (OUTPUT.step-007.png)
    #[arg(long, value_name = "N")]
    pub preview_every: Option<usize>,
    /// Print the bytes that crossed and the time taken to stderr
    #[arg(long)]
    pub stats: bool,
    /// Instead of one image, print a Markdown table: for every split mode and every codec, the
    /// bytes per step and PSNR/SSIM against the lossless image (in-process trunk)
    #[arg(long, conflicts_with_all = ["cloud", "compare", "preview_every"])]
    pub codec_table: bool,
    #[command(flatten)]
    pub cloud: CloudArgs,
}

/// Runs the command.
pub fn run(args: ImageArgs) -> anyhow::Result<()> {
    let device = Device::Cpu;
    args.cloud.auth.check_needed(args.cloud.cloud.is_some())?;
    if args.codec_table {
        return codec_table(&args, &device);
    }
    let choice = match args.cloud.files()? {
        Some(files) => DiffusionTrunkChoice::Cloud(files),
        None => DiffusionTrunkChoice::Local(args.unet_split),
    };
    let trunks = DiffusionTrunks::load(&args.model, choice, args.codec, &device)?;
    let split = trunks.split();
    let mut trunk = trunks.open()?;
    let pipeline = DevicePipeline::load(&args.model, split, args.codec, &device)
        .with_context(|| format!("loading {}", args.model.display()))?;
    let seed = args.seed.unwrap_or_else(rand::random);
    if args.seed.is_none() {
        eprintln!("seed: {seed}");
    }
    let request = request(&args, &pipeline, seed);
    if args.preview_every == Some(0) {
        anyhow::bail!("--preview-every must be at least 1");
    }

    let started = Instant::now();
    let generated = generate(
        &pipeline,
        &request,
        trunk.as_deref_mut().map(|t| t as &mut dyn DiffusionTrunk),
        &args,
        "image",
    )?;
    let elapsed = started.elapsed();
    write_png(&generated.image, &args.output)?;
    eprintln!("wrote {}", args.output.display());

    if args.stats {
        let b = generated.bytes;
        eprintln!(
            "split: {split}, codec: {}, {} steps in {:.2} s",
            args.codec,
            request.steps,
            elapsed.as_secs_f64()
        );
        if let (Some(up), Some(down)) = (b.up.checked_div(b.steps), b.down.checked_div(b.steps)) {
            eprintln!(
                "bytes: setup {} once, up {} ({up} per step), down {} ({down} per step)",
                b.setup, b.up, b.down
            );
        }
    }
    if args.compare {
        let reference = DevicePipeline::load(&args.model, UnetSplit::None, StepCodec::F32, &device)
            .with_context(|| format!("loading {} for the f32 reference", args.model.display()))?;
        let lossless = generate(&reference, &request, None, &args, "f32 reference")?;
        println!(
            "against f32: PSNR {} dB, SSIM {:.6}",
            format_psnr(psnr(&generated.image, &lossless.image)?),
            ssim(&generated.image, &lossless.image)?
        );
    }
    Ok(())
}

/// The request the options describe, for a pipeline (its default size fills in).
fn request(args: &ImageArgs, pipeline: &DevicePipeline, seed: u64) -> ImageRequest {
    let size = pipeline.default_size();
    ImageRequest {
        prompt: args.prompt.clone(),
        negative: args.negative.clone(),
        steps: args.steps,
        guidance: args.guidance,
        seed,
        width: args.width.unwrap_or(size),
        height: args.height.unwrap_or(size),
        scheduler: args.scheduler,
    }
}

/// `--codec-table`: every split mode times every codec, against the unsplit f32 image.
fn codec_table(args: &ImageArgs, device: &Device) -> anyhow::Result<()> {
    let reference = DevicePipeline::load(&args.model, UnetSplit::None, StepCodec::F32, device)
        .with_context(|| format!("loading {}", args.model.display()))?;
    let request = request(args, &reference, args.seed.unwrap_or(0));
    println!(
        "| split | codec | setup bytes | up bytes/step | down bytes/step | PSNR (dB) | SSIM |"
    );
    println!("|---|---|---:|---:|---:|---:|---:|");
    let bar = progress_bar("f32 reference", request.steps);
    let mut shown = String::new();
    let table = codecs::codec_table(
        &args.model,
        &reference,
        &request,
        device,
        &mut |label, p| {
            if shown != label {
                shown = label.to_string();
                bar.reset();
                bar.set_length(p.total as u64);
                bar.set_message(shown.clone());
            }
            bar.set_position(p.step as u64);
            Ok(())
        },
        &mut |row| {
            let b = row.bytes;
            bar.suspend(|| {
                println!(
                    "| {} | {} | {} | {} | {} | {} | {:.4} |",
                    row.split,
                    row.codec,
                    b.setup,
                    b.up / b.steps.max(1),
                    b.down / b.steps.max(1),
                    format_psnr(row.psnr),
                    row.ssim
                )
            });
        },
    );
    bar.finish_and_clear();
    table.with_context(|| format!("the codec table of {}", args.model.display()))?;
    Ok(())
}

fn format_psnr(db: f64) -> String {
    if db.is_infinite() {
        "inf".into()
    } else {
        format!("{db:.2}")
    }
}

/// Runs the pipeline with a progress bar and the previews.
fn generate(
    pipeline: &DevicePipeline,
    request: &ImageRequest,
    trunk: Option<&mut dyn DiffusionTrunk>,
    args: &ImageArgs,
    label: &str,
) -> anyhow::Result<Generated> {
    let progress = progress_bar(label, request.steps);
    let previews = args.preview_every.filter(|_| label == "image");
    let mut on_step = |p: &StepProgress<'_>| {
        progress.set_position(p.step as u64);
        if let Some(every) = previews
            && p.step.is_multiple_of(every)
            && p.step < p.total
        {
            let image = pipeline.decode(p.latents)?;
            let path = preview_path(&args.output, p.step);
            write_png(&image, &path)
                .map_err(|e| lsplit_diffusion::DiffusionError::Request(format!("{e:#}")))?;
        }
        Ok(())
    };
    let result = pipeline.generate(request, trunk, &mut on_step);
    progress.finish_and_clear();
    Ok(result?)
}

/// A progress bar of `steps` denoising steps, named `label`.
fn progress_bar(label: &str, steps: usize) -> ProgressBar {
    let progress = ProgressBar::new(steps as u64).with_style(
        ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} {elapsed}")
            .expect("a valid progress template")
            .progress_chars("=> "),
    );
    progress.set_message(label.to_string());
    progress
}

/// `out.png` -> `out.step-007.png`.
fn preview_path(output: &Path, step: usize) -> PathBuf {
    let stem = output
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "image".into());
    output.with_file_name(format!("{stem}.step-{step:03}.png"))
}

fn write_png(image: &RgbImage, path: &Path) -> anyhow::Result<()> {
    let png = image.to_png()?;
    std::fs::write(path, png).with_context(|| format!("writing {}", path.display()))
}
