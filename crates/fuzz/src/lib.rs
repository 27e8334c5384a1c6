//! Every parser of untrusted bytes, as one function per fuzz target: each takes arbitrary bytes
//! and must return, never panic, hang or allocate without bound. `fuzz/` (a cargo-fuzz project,
//! outside the workspace because it needs nightly) calls them under libFuzzer; `tests/replay.rs`
//! feeds them every committed corpus and crash file on stable, so CI replays what was found.

use std::io::Cursor;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use arbitrary::Unstructured;
use candle_core::Device;
use candle_core::quantized::gguf_file::Content;
use lsplit_edge::BodyKind;
use lsplit_model::{ModelPart, ModelSource, PartKind, PartSpec};
use lsplit_proto::diffusion::pb::ImageRequest;
use lsplit_proto::diffusion::pb::image_request::Kind as ImageKind;
use lsplit_proto::pb::session_request::Kind as SessionKind;
use lsplit_proto::pb::train_request::Kind as TrainKind;
use lsplit_proto::pb::{SessionRequest, TrainRequest};
use lsplit_split::{Obfuscation, SessionKeys, SessionSecret, SplitPolicy, StepRows, TrunkState};
use lsplit_tokenizer::{ChatMessage, Tokenizer};
use lsplit_wire::{Codec, HiddenRows, StepCodec};
use prost::Message;

/// A fuzz target: arbitrary bytes in, nothing out.
pub type Target = fn(&[u8]);

/// Every target, by the name of its corpus directory and libFuzzer binary.
pub const TARGETS: [(&str, Target); 9] = [
    ("trunk_request", trunk_request),
    ("train_request", train_request),
    ("diffusion_request", diffusion_request),
    ("gguf_header", gguf_header),
    ("safetensors_header", safetensors_header),
    ("tokenizer_gguf", tokenizer_gguf),
    ("edge_body", edge_body),
    ("keyed_session", keyed_session),
    ("lora_adapter", lora_adapter),
];

/// Layers of the model the trunk protocol's keys are checked against (SmolLM2-135M's).
const LAYERS: usize = 30;

/// Most tensor elements the diffusion target lets a message declare (the server's default is
/// 32 Mi; a smaller bound keeps each run short).
const MAX_STEP_ELEMENTS: u64 = 1 << 20;

/// A trunk `SessionRequest` as the server reads it: the protobuf, then the `Open`'s codec and
/// keys, or the `Step`'s rows decoded as the trunk decodes them.
pub fn trunk_request(data: &[u8]) {
    let Ok(request) = SessionRequest::decode(data) else {
        return;
    };
    match request.kind {
        Some(SessionKind::Open(open)) => {
            let _ = lsplit_proto::codec_from_pb(open.codec);
            if let Some(keys) = &open.keys {
                let _ = lsplit_proto::keys_from_pb(keys, LAYERS);
            }
        }
        Some(SessionKind::Step(step)) => {
            if let Ok(step) = lsplit_proto::step_from_pb(step) {
                let _ = step.rows.end();
                let _ = step.rows.decode(&Device::Cpu);
            }
        }
        None => {}
    }
}

/// A `TrainRequest` of split fine-tuning as the server reads it: the protobuf, then the
/// `TrainOpen`'s codec, or a `Forward`'s rows or a `Backward`'s gradient decoded.
pub fn train_request(data: &[u8]) {
    let Ok(request) = TrainRequest::decode(data) else {
        return;
    };
    let rows = match request.kind {
        Some(TrainKind::Open(open)) => {
            let _ = lsplit_proto::codec_from_pb(open.codec);
            return;
        }
        Some(TrainKind::Forward(forward)) => forward.rows,
        Some(TrainKind::Backward(backward)) => backward.grad,
        None => return,
    };
    if let Some(Ok(rows)) = rows.map(lsplit_proto::rows_from_pb) {
        let _ = rows.decode(&Device::Cpu);
    }
}

/// A diffusion `ImageRequest` as the server reads it: the protobuf, its tensors checked
/// against a codec (the setup's, or one the first byte picks for a step) and an element
/// budget, then decoded.
pub fn diffusion_request(data: &[u8]) {
    let Ok(request) = ImageRequest::decode(data) else {
        return;
    };
    let picked = data.first().map_or(0, |b| b % StepCodec::all().len() as u8);
    let (tensors, codec) = match request.kind {
        Some(ImageKind::Setup(setup)) => (setup.conditioning, setup.codec),
        Some(ImageKind::Step(step)) => (
            step.inputs,
            u32::from(StepCodec::all()[picked as usize].id()),
        ),
        None => return,
    };
    let Some(codec) = u8::try_from(codec)
        .ok()
        .and_then(|id| StepCodec::from_id(id).ok())
    else {
        return;
    };
    let Ok(tensors) = lsplit_proto::diffusion::tensors_from_pb(tensors, codec, MAX_STEP_ELEMENTS)
    else {
        return;
    };
    for tensor in tensors {
        let _ = tensor.decode(&Device::Cpu);
    }
}

/// A scratch directory for the model-file targets, one per process.
fn scratch() -> &'static Path {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    DIR.get_or_init(|| tempfile::tempdir().expect("a scratch directory"))
        .path()
}

/// A GGUF file opened as `lsplit serve` and `lsplit generate` open a model.
pub fn gguf_header(data: &[u8]) {
    let path = scratch().join("model.gguf");
    std::fs::write(&path, data).expect("write the scratch file");
    let _ = ModelSource::open(&path);
}

/// The directory of the tiny Llama fixture (4 layers, hidden size 64) in the model crate.
fn tiny_model() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../model/tests/data/tiny-llama-hf")
}

/// A Hugging Face directory whose `model.safetensors` is `data`, beside the tiny fixture's
/// `config.json`, opened as a model, then its trunk layers loaded.
pub fn safetensors_header(data: &[u8]) {
    let dir = scratch().join("hf");
    std::fs::create_dir_all(&dir).expect("scratch directory");
    std::fs::copy(tiny_model().join("config.json"), dir.join("config.json")).expect("config");
    std::fs::write(dir.join("model.safetensors"), data).expect("write the scratch file");
    if let Ok(source) = ModelSource::open(&dir) {
        let spec = PartSpec {
            kind: PartKind::Trunk,
            layers: 1..3,
        };
        let _ = source.load_part(&spec, &Device::Cpu);
    }
}

/// A LoRA adapter directory whose `adapter_config.json` is `data` up to its first zero byte
/// and whose `adapter_model.safetensors` is the rest, read for the tiny fixture as `--adapter`
/// reads it; one that loads is then run over two tokens.
pub fn lora_adapter(data: &[u8]) {
    let split = data.iter().position(|&b| b == 0).unwrap_or(data.len());
    let (config, tensors) = data.split_at(split);
    let dir = scratch().join("lora");
    std::fs::create_dir_all(&dir).expect("scratch directory");
    std::fs::write(dir.join("adapter_config.json"), config).expect("write the scratch file");
    let tensors = tensors.get(1..).unwrap_or_default();
    std::fs::write(dir.join("adapter_model.safetensors"), tensors).expect("write the scratch file");
    let mut source = ModelSource::open(&tiny_model()).expect("the tiny fixture");
    if source.load_adapter(&dir).is_ok() {
        let whole = source
            .load_part(&PartSpec::whole(4), &Device::Cpu)
            .expect("the tiny fixture's layers");
        let mut cache = whole.new_cache();
        let rows = whole.embed(&[1, 2]).expect("two tokens");
        let _ = whole.forward(&rows, 0, &mut cache);
    }
}

/// The tokenizer and chat template of a GGUF file's metadata, then a chat rendered, encoded and
/// decoded with them.
pub fn tokenizer_gguf(data: &[u8]) {
    // candle's reader panics on some crafted headers; `ModelSource::open` guards it the same
    // way, so what is fuzzed here is what comes after.
    let read = std::panic::catch_unwind(|| Content::read(&mut Cursor::new(data)));
    let Ok(Ok(content)) = read else {
        return;
    };
    let Ok(tokenizer) = Tokenizer::from_gguf(&content.metadata) else {
        return;
    };
    let messages = [
        ChatMessage::new("system", "Be brief."),
        ChatMessage::new("user", "Hi <|im_end|> there"),
    ];
    if let Ok(text) = tokenizer.apply_chat_template(&messages, true)
        && let Ok(ids) = tokenizer.encode(&text, true)
    {
        let _ = tokenizer.decode(&ids);
        let mut stream = tokenizer.decoder();
        for &id in ids.iter().take(64) {
            let _ = stream.push(id);
        }
        let _ = stream.finish();
    }
    let vocab = tokenizer.vocab_size() as u32;
    let _ = tokenizer.decode(&[0, vocab.saturating_sub(1), vocab, u32::MAX]);
}

/// An edge API body: the first byte picks the endpoint and the prompt's length, the rest is
/// the body.
pub fn edge_body(data: &[u8]) {
    let Some((&first, body)) = data.split_first() else {
        return;
    };
    let kind = match first % 3 {
        0 => BodyKind::Chat,
        1 => BodyKind::Completion,
        _ => BodyKind::Image,
    };
    let _ = lsplit_edge::check_body(kind, body, usize::from(first) * 31, 8192);
}

/// The tiny fixture's layers 0..4 as a trunk, loaded once.
fn tiny_trunk() -> &'static Arc<ModelPart> {
    static PART: OnceLock<Arc<ModelPart>> = OnceLock::new();
    PART.get_or_init(|| {
        let source = ModelSource::open(&tiny_model()).expect("the tiny fixture");
        let spec = PartSpec {
            kind: PartKind::Trunk,
            layers: 0..4,
        };
        Arc::new(source.load_part(&spec, &Device::Cpu).expect("its trunk"))
    })
}

/// A keyed trunk session (random split points, permuted or not) fed a sequence of steps that
/// are mostly well-formed and correctly tagged, so that the fuzzer reaches the position,
/// catch-up and cache logic behind the tag check, with every field sometimes hostile.
pub fn keyed_session(data: &[u8]) {
    let _ = keyed_steps(&mut Unstructured::new(data));
}

/// The session of [`keyed_session`], read from `u`; `Err` when the input runs out.
fn keyed_steps(u: &mut Unstructured) -> arbitrary::Result<()> {
    let secret: [u8; 32] = u.arbitrary()?;
    let obfuscation = if u.arbitrary()? {
        Obfuscation::Permute
    } else {
        Obfuscation::None
    };
    let policy = SplitPolicy::random(&[0, 1], &[3, 4], 4).expect("a valid policy");
    let keys = SessionKeys {
        policy,
        obfuscation,
        secret: SessionSecret::from_bytes(secret),
    };
    let Ok(mut trunk) = TrunkState::new(tiny_trunk().clone(), &keys) else {
        return Ok(());
    };
    for _ in 0..u.int_in_range(1..=8)? {
        let step = if u.ratio(1, 8)? {
            u.arbitrary()?
        } else {
            trunk.next_step()
        };
        // Mostly none, sometimes a few positions of drafted tokens, rarely anything.
        let rewind = if u.ratio(1, 16)? {
            u.arbitrary()?
        } else if u.ratio(1, 4)? {
            u.int_in_range(1..=3)?
        } else {
            0
        };
        let start = match trunk.expected_start(rewind) {
            Some(start) if !u.ratio(1, 8)? => start,
            _ => u.arbitrary()?,
        };
        let rows = if u.ratio(1, 16)? {
            u.arbitrary::<u32>()? as usize
        } else {
            u.int_in_range(0..=6)?
        };
        let width = if u.ratio(1, 16)? {
            u.arbitrary::<u32>()? as usize
        } else {
            64
        };
        let codec = *u.choose(&Codec::ALL)?;
        let len = codec.payload_len(rows, width);
        let bytes = if len <= 4096 && u.ratio(7, 8)? {
            (0..len).map(|i| (i as u8).wrapping_mul(37) >> 2).collect()
        } else {
            u.arbitrary()?
        };
        let rows = HiddenRows {
            codec,
            rows,
            width,
            start,
            bytes,
        };
        let message = if u.ratio(7, 8)? {
            keys.uplink_rewinding(step, rewind, rows)
        } else {
            StepRows {
                step,
                rows,
                rewind,
                tag: u.arbitrary()?,
            }
        };
        let _ = trunk.step(&message);
    }
    Ok(())
}
