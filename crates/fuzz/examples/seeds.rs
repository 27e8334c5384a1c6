//! Writes the first inputs of every fuzz target into `fuzz/corpus/NAME/seed-*`: well-formed
//! messages, model headers, tokenizer metadata and API bodies for the fuzzer to mutate.
//!
//! `cargo run -p lsplit-fuzz --example seeds`

use std::path::Path;

use candle_core::quantized::gguf_file::{self, Value};
use lsplit_proto::diffusion::pb as dpb;
use lsplit_proto::pb;
use lsplit_split::{Obfuscation, SessionKeys, SplitPolicy};
use lsplit_wire::{Codec, HiddenRows, StepCodec};
use prost::Message;

fn write(target: &str, name: &str, bytes: &[u8]) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../fuzz/corpus")
        .join(target);
    std::fs::create_dir_all(&dir).expect("corpus directory");
    std::fs::write(dir.join(format!("seed-{name}")), bytes).expect("write a seed");
}

fn rows(codec: Codec, rows: usize, width: usize, start: usize) -> HiddenRows {
    let tensor = candle_core::Tensor::from_vec(
        (0..rows * width)
            .map(|i| i as f32 * 0.25 - 1.0)
            .collect::<Vec<f32>>(),
        (rows, width),
        &candle_core::Device::Cpu,
    )
    .expect("tensor");
    codec.encode(&tensor, start).expect("encode")
}

fn trunk_requests() {
    let keys = SessionKeys::fresh(
        SplitPolicy::random(&[1, 2, 3], &[27, 28, 29], 30).expect("policy"),
        Obfuscation::Permute,
    );
    let open = pb::SessionRequest {
        kind: Some(pb::session_request::Kind::Open(pb::Open {
            protocol_version: lsplit_proto::PROTOCOL_VERSION,
            codec: pb::Codec::F16 as i32,
            fingerprint_sha256: vec![7; 32],
            keys: Some(lsplit_proto::keys_to_pb(&keys)),
        })),
    };
    write("trunk_request", "open", &open.encode_to_vec());
    for codec in Codec::ALL {
        let step = keys.uplink(3, rows(codec, 2, 8, 5));
        let request = pb::SessionRequest {
            kind: Some(pb::session_request::Kind::Step(lsplit_proto::step_to_pb(
                &step,
            ))),
        };
        write(
            "trunk_request",
            &format!("step-{codec}"),
            &request.encode_to_vec(),
        );
    }
}

fn diffusion_requests() {
    let tensor = candle_core::Tensor::from_vec(
        (0..16).map(|i| i as f32 / 8.0).collect::<Vec<f32>>(),
        (1, 4, 2, 2),
        &candle_core::Device::Cpu,
    )
    .expect("tensor");
    for codec in [
        StepCodec::all()[0],
        StepCodec::all()[8],
        StepCodec::all()[18],
    ] {
        let encoded = codec.encode(&tensor).expect("encode");
        let pb_tensor = lsplit_proto::diffusion::tensor_to_pb(&encoded);
        let setup = dpb::ImageRequest {
            kind: Some(dpb::image_request::Kind::Setup(dpb::Setup {
                protocol_version: lsplit_proto::diffusion::DIFFUSION_PROTOCOL_VERSION,
                codec: u32::from(codec.id()),
                fingerprint_sha256: vec![1; 32],
                conditioning: vec![pb_tensor.clone()],
                guidance: Some(7.5),
            })),
        };
        write(
            "diffusion_request",
            &format!("setup-{codec}"),
            &setup.encode_to_vec(),
        );
        let step = dpb::ImageRequest {
            kind: Some(dpb::image_request::Kind::Step(dpb::Step {
                inputs: vec![pb_tensor],
                timestep: Some(981.0),
            })),
        };
        write(
            "diffusion_request",
            &format!("step-{codec}"),
            &step.encode_to_vec(),
        );
    }
}

fn strings(texts: &[&str]) -> Value {
    Value::Array(texts.iter().map(|t| Value::String((*t).into())).collect())
}

/// A GGUF holding `metadata` and no tensors.
fn gguf(metadata: &[(&str, Value)]) -> Vec<u8> {
    let refs: Vec<(&str, &Value)> = metadata.iter().map(|(k, v)| (*k, v)).collect();
    let mut out = std::io::Cursor::new(Vec::new());
    gguf_file::write(&mut out, &refs, &[]).expect("write GGUF");
    out.into_inner()
}

/// Llama hyperparameters of a tiny model.
fn llama_metadata() -> Vec<(&'static str, Value)> {
    vec![
        ("general.architecture", Value::String("llama".into())),
        ("llama.block_count", Value::U32(4)),
        ("llama.context_length", Value::U32(256)),
        ("llama.embedding_length", Value::U32(64)),
        ("llama.feed_forward_length", Value::U32(160)),
        ("llama.attention.head_count", Value::U32(4)),
        ("llama.attention.head_count_kv", Value::U32(2)),
        ("llama.attention.layer_norm_rms_epsilon", Value::F32(1e-5)),
        ("llama.rope.freq_base", Value::F32(10000.0)),
    ]
}

/// A SentencePiece vocabulary spelling "hello world", with a chat template.
fn tokenizer_metadata() -> Vec<(&'static str, Value)> {
    let mut tokens = vec!["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"];
    let pieces = [
        "▁", "h", "e", "l", "o", "w", "r", "d", "ll", "he", "▁he", "llo", "▁hello",
    ];
    tokens.extend(pieces);
    let types = (0..tokens.len())
        .map(|i| Value::I32(if i < 5 { 3 } else { 1 }))
        .collect();
    let scores = (0..tokens.len()).map(|i| Value::F32(-(i as f32))).collect();
    vec![
        ("tokenizer.ggml.model", Value::String("llama".into())),
        ("tokenizer.ggml.tokens", strings(&tokens)),
        ("tokenizer.ggml.token_type", Value::Array(types)),
        ("tokenizer.ggml.scores", Value::Array(scores)),
        ("tokenizer.ggml.bos_token_id", Value::U32(1)),
        ("tokenizer.ggml.eos_token_id", Value::U32(2)),
        ("tokenizer.ggml.unknown_token_id", Value::U32(0)),
        (
            "tokenizer.chat_template",
            Value::String(
                "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content | trim }}\
                 <|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n\
                 {% endif %}"
                    .into(),
            ),
        ),
    ]
}

fn model_files() {
    write("gguf_header", "llama", &gguf(&llama_metadata()));
    let mut both = llama_metadata();
    both.extend(tokenizer_metadata());
    write("gguf_header", "llama-tokenizer", &gguf(&both));
    write(
        "tokenizer_gguf",
        "spm-template",
        &gguf(&tokenizer_metadata()),
    );
    let mut bpe = tokenizer_metadata();
    bpe[0].1 = Value::String("gpt2".into());
    bpe.push(("tokenizer.ggml.merges", strings(&["h e", "l l", "he llo"])));
    write("tokenizer_gguf", "bpe-template", &gguf(&bpe));

    let header = br#"{"model.embed_tokens.weight":{"dtype":"F32","shape":[2,2],"data_offsets":[0,16]},"model.layers.1.input_layernorm.weight":{"dtype":"F16","shape":[4],"data_offsets":[16,24]}}"#;
    let mut file = (header.len() as u64).to_le_bytes().to_vec();
    file.extend_from_slice(header);
    file.extend((0..24u8).map(|b| b.wrapping_mul(11)));
    write("safetensors_header", "two-tensors", &file);
}

fn edge_bodies() {
    let bodies: [(u8, &str, &str); 4] = [
        (
            0,
            "chat",
            r#"{"model":"smol","messages":[{"role":"system","content":"Be brief."},{"role":"user","content":[{"type":"text","text":"hi"}]}],"max_tokens":12,"temperature":0.7,"top_p":0.9,"top_k":40,"stop":["\n\n","END"],"stream":true,"stream_options":{"include_usage":true},"seed":7}"#,
        ),
        (
            1,
            "completion",
            r#"{"prompt":["The sea is"],"max_completion_tokens":5,"repeat_penalty":1.1,"repeat_last_n":64,"stop":"."}"#,
        ),
        (
            2,
            "image",
            r#"{"prompt":"a red kite","size":"512x512","steps":20,"guidance":7.5,"seed":1,"scheduler":"euler","response_format":"b64_json","preview_every":5}"#,
        ),
        (
            3,
            "chat-bare",
            r#"{"messages":[{"role":"user","content":"hi"}],"n":1,"logprobs":false,"lsplit_trace":true}"#,
        ),
    ];
    for (first, name, body) in bodies {
        let mut bytes = vec![first];
        bytes.extend_from_slice(body.as_bytes());
        write("edge_body", name, &bytes);
    }
}

fn keyed_sessions() {
    for seed in 0..4u32 {
        let bytes: Vec<u8> = (0..800u32)
            .map(|i| (i.wrapping_mul(2654435761).wrapping_add(seed * 97) >> 13) as u8)
            .collect();
        write("keyed_session", &format!("pattern-{seed}"), &bytes);
    }
}

fn main() {
    trunk_requests();
    diffusion_requests();
    model_files();
    edge_bodies();
    keyed_sessions();
}
