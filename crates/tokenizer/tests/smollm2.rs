//! The default model's tokenizer (SmolLM2-135M-Instruct GGUF, byte-level BPE, `smollm`
//! pre-tokenizer) against llama.cpp's golden ids, plus round trips, streaming, the chat
//! template and loading the same tokenizer from a Hugging Face directory.

mod common;

use std::collections::HashMap;
use std::sync::OnceLock;

use candle_core::quantized::gguf_file::{Content, Value};
use common::Rng;
use lsplit_tokenizer::{ChatMessage, Tokenizer};

/// GGUF metadata of the default model, fetched once per test binary.
fn metadata() -> &'static HashMap<String, Value> {
    static METADATA: OnceLock<HashMap<String, Value>> = OnceLock::new();
    METADATA.get_or_init(|| {
        let path = lsplit_fetch::ensure_default_model().expect("fetch the default model");
        let mut file = std::fs::File::open(&path).expect("open the default model");
        Content::read(&mut file)
            .expect("read GGUF metadata")
            .metadata
    })
}

/// The default model's tokenizer built from its GGUF metadata.
fn smollm2() -> &'static Tokenizer {
    static TOKENIZER: OnceLock<Tokenizer> = OnceLock::new();
    TOKENIZER.get_or_init(|| Tokenizer::from_gguf(metadata()).expect("build tokenizer"))
}

#[derive(serde::Deserialize)]
struct GoldenCase {
    text: String,
    ids: Vec<u32>,
    detokenized: String,
}

/// llama.cpp's tokenization of the default model, written by scripts/make_token_goldens.py.
#[derive(serde::Deserialize)]
struct Golden {
    n_vocab: usize,
    eog_ids: Vec<u32>,
    bos_id: u32,
    eos_id: u32,
    cases: Vec<GoldenCase>,
}

fn golden() -> Golden {
    serde_json::from_str(include_str!("data/smollm2_tokens.json")).expect("parse golden file")
}

/// Random strings from a fixed seed: ASCII, digits, whitespace, every plane, emoji.
fn random_strings() -> Vec<String> {
    let mut rng = Rng::new(0x5eed_1234);
    (0..300).map(|_| rng.string(40)).collect()
}

/// Streams `ids` through a fresh decoder and returns the concatenated pieces.
fn stream(tokenizer: &Tokenizer, ids: &[u32]) -> String {
    let mut decoder = tokenizer.decoder();
    let mut out = String::new();
    for &id in ids {
        if let Some(piece) = decoder.push(id).expect("push") {
            assert!(!piece.is_empty(), "empty piece pushed for id {id}");
            out.push_str(&piece);
        }
    }
    out.push_str(&decoder.finish().expect("finish").unwrap_or_default());
    out
}

#[test]
fn ids_match_llama_cpp() {
    let golden = golden();
    assert!(golden.cases.len() >= 40);
    let tokenizer = smollm2();
    let mut mismatches = Vec::new();
    for case in &golden.cases {
        let ids = tokenizer.encode(&case.text, false).expect("encode");
        if ids != case.ids {
            mismatches.push(format!(
                "{:?}\n  ours:      {ids:?}\n  llama.cpp: {:?}",
                case.text, case.ids
            ));
        }
    }
    assert!(mismatches.is_empty(), "{}", mismatches.join("\n"));
}

#[test]
fn decode_matches_llama_cpp_and_round_trips() {
    let tokenizer = smollm2();
    let mut lossy = Vec::new();
    for case in golden().cases {
        let decoded = tokenizer.decode(&case.ids).expect("decode");
        assert_eq!(decoded, case.detokenized, "decode of {:?}", case.text);
        if decoded != case.text {
            lossy.push(case.text);
        }
    }
    // Only the string with bytes missing from SmolLM2's byte alphabet loses text.
    assert_eq!(lossy, ["unencodable: \u{4} \u{934bb} end"]);
}

#[test]
fn random_strings_round_trip() {
    let tokenizer = smollm2();
    for text in random_strings() {
        let ids = tokenizer.encode(&text, false).expect("encode");
        assert_eq!(tokenizer.decode(&ids).expect("decode"), text);
    }
}

#[test]
fn stream_decoder_pieces_concatenate_to_decode() {
    let tokenizer = smollm2();
    let texts = golden().cases.into_iter().map(|case| case.text);
    for text in texts.chain(random_strings()) {
        let ids = tokenizer.encode(&text, false).expect("encode");
        let decoded = tokenizer.decode(&ids).expect("decode");
        assert_eq!(stream(tokenizer, &ids), decoded, "ids {ids:?}");
    }
}

#[test]
fn stream_decoder_holds_back_split_characters() {
    let tokenizer = smollm2();
    // "🤖" is one character that byte-level BPE spreads over several tokens.
    let ids = tokenizer.encode("a🤖", false).expect("encode");
    assert!(ids.len() > 2, "expected the emoji to span tokens: {ids:?}");
    let mut decoder = tokenizer.decoder();
    let pieces: Vec<Option<String>> = ids
        .iter()
        .map(|&id| decoder.push(id).expect("push"))
        .collect();
    assert_eq!(pieces.first(), Some(&Some("a".to_owned())));
    assert_eq!(pieces.last(), Some(&Some("🤖".to_owned())));
    assert!(pieces[1..pieces.len() - 1].iter().all(Option::is_none));
    assert_eq!(decoder.finish().expect("finish"), None);

    // An unfinished character is flushed by finish(), as decode() renders it.
    let partial = &ids[..ids.len() - 1];
    let mut decoder = tokenizer.decoder();
    let mut text = String::new();
    for &id in partial {
        text.push_str(&decoder.push(id).expect("push").unwrap_or_default());
    }
    assert_eq!(text, "a");
    let rest = decoder.finish().expect("finish").expect("pending bytes");
    assert_eq!(text + &rest, tokenizer.decode(partial).expect("decode"));
    assert!(rest.contains('\u{fffd}'));
}

#[test]
fn special_tokens_match_metadata_and_llama_cpp() {
    let golden = golden();
    let tokenizer = smollm2();
    assert_eq!(tokenizer.vocab_size(), 49152);
    assert_eq!(tokenizer.vocab_size(), golden.n_vocab);
    assert_eq!(tokenizer.bos_token(), Some(1));
    assert_eq!(tokenizer.bos_token(), Some(golden.bos_id));
    assert_eq!(tokenizer.eos_token(), Some(golden.eos_id));
    assert_eq!(tokenizer.token_to_id("<|im_end|>"), Some(2));
    assert_eq!(tokenizer.token_to_id("<|endoftext|>"), Some(0));
    // eos (<|im_end|>) first, then <|endoftext|> found by text.
    assert_eq!(tokenizer.eos_tokens(), &[2, 0]);
    // llama.cpp stops on the same ids (it also stops on the FIM `<reponame>` token).
    assert!(
        tokenizer
            .eos_tokens()
            .iter()
            .all(|id| golden.eog_ids.contains(id))
    );
    // SmolLM2 does not want BOS: encode(.., true) adds nothing.
    assert!(!tokenizer.add_bos_token());
    assert_eq!(
        tokenizer.encode("Hi", true).expect("encode"),
        tokenizer.encode("Hi", false).expect("encode")
    );
    assert_eq!(
        tokenizer
            .encode("<|im_start|>user\nHi<|im_end|>", false)
            .expect("encode"),
        [1, 4093, 198, 26843, 2]
    );
    assert_eq!(
        tokenizer.decode(&[1, 2]).expect("decode"),
        "<|im_start|><|im_end|>"
    );
}

#[test]
fn decode_rejects_ids_outside_the_vocabulary() {
    let tokenizer = smollm2();
    let err = tokenizer.decode(&[17, 49152]).expect_err("id out of range");
    assert_eq!(
        err.to_string(),
        "token id 49152 is out of range for a vocabulary of 49152 tokens"
    );
    let err = tokenizer
        .decoder()
        .push(u32::MAX)
        .expect_err("id out of range");
    assert!(err.to_string().contains("4294967295"), "{err}");
}

const SMOLLM2_TEMPLATE: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

#[test]
fn chat_template_renders_like_transformers() {
    let tokenizer = smollm2();
    assert_eq!(tokenizer.chat_template(), Some(SMOLLM2_TEMPLATE));
    // Expected strings rendered by jinja2 3.1.6 with transformers' settings.
    let prompt = tokenizer
        .apply_chat_template(&[ChatMessage::new("user", "Hi")], true)
        .expect("render");
    assert_eq!(
        prompt,
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    );
    let conversation = [
        ChatMessage::new("system", "Be brief."),
        ChatMessage::new("user", "2+2?"),
        ChatMessage::new("assistant", "4"),
    ];
    assert_eq!(
        tokenizer
            .apply_chat_template(&conversation, false)
            .expect("render"),
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n4<|im_end|>\n"
    );
    // The rendered prompt's role markers become single special-token ids.
    let ids = tokenizer.encode(&prompt, true).expect("encode");
    assert_eq!(ids.first(), Some(&1));
    assert_eq!(ids.iter().filter(|&&id| id == 1).count(), 3);
    assert_eq!(ids.iter().filter(|&&id| id == 2).count(), 2);
    assert_eq!(tokenizer.decode(&ids).expect("decode"), prompt);
}

#[test]
fn hf_dir_export_loads_and_encodes_identically() {
    let gguf = smollm2();
    let dir = tempfile::tempdir().expect("temp dir");
    gguf.inner()
        .save(dir.path().join("tokenizer.json"), false)
        .expect("save tokenizer.json");
    let config = serde_json::json!({
        "add_bos_token": false,
        "bos_token": "<|im_start|>",
        "eos_token": {"content": "<|im_end|>", "special": true},
        "chat_template": SMOLLM2_TEMPLATE,
    });
    std::fs::write(dir.path().join("tokenizer_config.json"), config.to_string()).expect("write");
    std::fs::write(
        dir.path().join("generation_config.json"),
        r#"{"bos_token_id": 1, "eos_token_id": [2, 5]}"#,
    )
    .expect("write");

    let hf = Tokenizer::from_hf_dir(dir.path()).expect("load HF dir");
    assert_eq!(hf.vocab_size(), 49152);
    assert_eq!(hf.bos_token(), Some(1));
    assert_eq!(hf.eos_token(), Some(2));
    assert_eq!(hf.eos_tokens(), &[2, 5, 0]);
    assert!(!hf.add_bos_token());
    for case in golden().cases {
        let ids = hf.encode(&case.text, false).expect("encode");
        assert_eq!(ids, case.ids, "{:?}", case.text);
        assert_eq!(hf.decode(&ids).expect("decode"), case.detokenized);
    }
    let messages = [ChatMessage::new("user", "Hi")];
    assert_eq!(
        hf.apply_chat_template(&messages, true).expect("render"),
        gguf.apply_chat_template(&messages, true).expect("render")
    );
}

#[test]
fn hf_dir_without_configs_infers_bos_from_the_post_processor() {
    let mut inner = smollm2().inner().clone();
    let post = tokenizers::processors::template::TemplateProcessing::builder()
        .try_single("<|im_start|> $A")
        .expect("template")
        .special_tokens(vec![("<|im_start|>", 1)])
        .build()
        .expect("post-processor");
    inner.with_post_processor(Some(post));
    let dir = tempfile::tempdir().expect("temp dir");
    inner
        .save(dir.path().join("tokenizer.json"), false)
        .expect("save tokenizer.json");
    std::fs::write(
        dir.path().join("generation_config.json"),
        r#"{"bos_token_id": 1, "eos_token_id": 2}"#,
    )
    .expect("write");
    std::fs::write(
        dir.path().join("chat_template.jinja"),
        "{{ bos_token }}|{{ eos_token }}",
    )
    .expect("write");

    let hf = Tokenizer::from_hf_dir(dir.path()).expect("load HF dir");
    assert!(hf.add_bos_token());
    assert_eq!(hf.encode("Hi", true).expect("encode"), [1, 26843]);
    assert_eq!(hf.encode("Hi", false).expect("encode"), [26843]);
    assert_eq!(
        hf.encode("<|im_start|>Hi", true).expect("encode"),
        [1, 26843]
    );
    assert_eq!(
        hf.apply_chat_template(&[], false).expect("render"),
        "<|im_start|>|<|im_end|>"
    );
}
