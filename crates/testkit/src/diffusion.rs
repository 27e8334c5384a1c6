//! The tiny random-weight diffusers fixtures split on a real diffusion trunk server, and the
//! in-process reference that a remote image must equal byte for byte.

use std::path::PathBuf;
use std::sync::Arc;

use candle_core::Device;
use lsplit_diffusion::{
    DevicePipeline, DiffusionError, DiffusionTrunk, Generated, ImageRequest, ImageSetup,
    LocalDiffusionTrunk, StepRequest, UnetSplit, load_trunk_model, trunk_fingerprint,
};
use lsplit_remote::{RemoteDiffusionTrunk, RemoteOptions};
use lsplit_server::{Access, DevCertificates, DiffusionLimits, DiffusionOptions, DiffusionServer};

use crate::{RunningServer, tls_access};
use lsplit_wire::{StepCodec, StepTensor};

/// The bearer token the test servers ask for.
pub const TOKEN: &str = "s3cret-diffusion";

/// The tiny diffusers model of `family` (sd15, sd21, sdxl).
pub fn model_dir(family: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../diffusion/tests/fixtures")
        .join(format!("tiny-{family}"))
}

/// A 2-step 64x64 image with guidance, seeded.
pub fn request(seed: u64) -> ImageRequest {
    ImageRequest {
        prompt: "a lighthouse at dawn".into(),
        negative: Some("blurry".into()),
        steps: 2,
        guidance: 7.0,
        seed,
        width: 64,
        height: 64,
        scheduler: None,
    }
}

/// Server options with TLS from `certs`, the token [`TOKEN`] and every step codec.
pub fn server_options(certs: &DevCertificates) -> DiffusionOptions {
    DiffusionOptions {
        limits: DiffusionLimits::default(),
        codecs: StepCodec::all().to_vec(),
        access: Access {
            token: Some(TOKEN.into()),
            ..tls_access(certs)
        },
    }
}

/// Client options trusting `certs`' CA, with the right token and short retry bounds.
pub fn client_options(url: &str, certs: &DevCertificates) -> RemoteOptions {
    let mut options = crate::client_options(url, certs, lsplit_wire::Codec::F32);
    options.token = Some(TOKEN.into());
    options
}

/// Serves the `split` trunk of `family` on 127.0.0.1 (port 0 picks a free one), named
/// `localhost` as the certificates are.
pub fn serve(
    family: &str,
    split: UnetSplit,
    options: DiffusionOptions,
    port: u16,
) -> RunningServer {
    let root = model_dir(family);
    let model = load_trunk_model(&root, split, &Device::Cpu).expect("trunk model");
    let fingerprint = trunk_fingerprint(&root, split).expect("fingerprint");
    let server = DiffusionServer::new(model, fingerprint, options).expect("server");
    RunningServer::start(server, port, "localhost", true)
}

/// Connects to `server` offering `codecs` and checks its trunk against `family`'s files.
pub fn connect(
    server: &RunningServer,
    certs: &DevCertificates,
    codecs: &[StepCodec],
    family: &str,
) -> RemoteDiffusionTrunk {
    let trunk =
        RemoteDiffusionTrunk::connect(client_options(&server.url, certs), codecs).expect("connect");
    trunk.verify_model(&model_dir(family)).expect("fingerprint");
    trunk
}

/// The device's pipeline for `split`.
pub fn pipeline(family: &str, split: UnetSplit, codec: StepCodec) -> DevicePipeline {
    DevicePipeline::load(&model_dir(family), split, codec, &Device::Cpu).expect("pipeline")
}

/// Generates `request` with `trunk` (none for the unsplit baseline).
pub fn generate(
    pipeline: &DevicePipeline,
    request: &ImageRequest,
    trunk: Option<&mut dyn DiffusionTrunk>,
) -> Generated {
    pipeline
        .generate(request, trunk, &mut |_| Ok(()))
        .expect("generate")
}

/// The unsplit image's bytes.
pub fn unsplit(family: &str, seed: u64) -> Vec<u8> {
    generate(
        &pipeline(family, UnetSplit::None, StepCodec::F32),
        &request(seed),
        None,
    )
    .image
    .data
}

/// The image with the trunk in this process.
pub fn in_process(family: &str, split: UnetSplit, codec: StepCodec, seed: u64) -> Generated {
    let model = load_trunk_model(&model_dir(family), split, &Device::Cpu).expect("trunk");
    let mut trunk = LocalDiffusionTrunk::new(Arc::new(model), codec, Device::Cpu);
    generate(
        &pipeline(family, split, codec),
        &request(seed),
        Some(&mut trunk),
    )
}

/// What a device sends for one image: its setup and every step, as encoded.
#[derive(Debug, Clone, Default)]
pub struct Captured {
    /// The image's setup.
    pub setup: Option<ImageSetup>,
    /// Every step request, in order.
    pub steps: Vec<StepRequest>,
}

/// An in-process trunk that records what crosses it.
pub struct Capturing {
    /// The trunk that computes.
    pub inner: LocalDiffusionTrunk,
    /// What crossed it so far.
    pub captured: Captured,
}

impl DiffusionTrunk for Capturing {
    fn begin_image(&mut self, setup: ImageSetup) -> Result<(), DiffusionError> {
        self.captured.setup = Some(setup.clone());
        self.inner.begin_image(setup)
    }

    fn step(&mut self, request: StepRequest) -> Result<Vec<StepTensor>, DiffusionError> {
        self.captured.steps.push(request.clone());
        self.inner.step(request)
    }
}

/// The messages a well-behaved device sends for `family`'s `split` trunk in f32.
pub fn capture(family: &str, split: UnetSplit) -> Captured {
    let model = load_trunk_model(&model_dir(family), split, &Device::Cpu).expect("trunk");
    let mut trunk = Capturing {
        inner: LocalDiffusionTrunk::new(Arc::new(model), StepCodec::F32, Device::Cpu),
        captured: Captured::default(),
    };
    generate(
        &pipeline(family, split, StepCodec::F32),
        &request(1),
        Some(&mut trunk),
    );
    trunk.captured
}
