//! Tokenizers built from small synthetic GGUF metadata and Hugging Face directories: the
//! SentencePiece (`llama`) conversion, the byte-level pre-tokenizer choice, chat template
//! features and every error path.

mod common;

use std::collections::HashMap;

use candle_core::quantized::gguf_file::Value;
use common::Rng;
use lsplit_tokenizer::{ChatMessage, Tokenizer, TokenizerError};

fn string(text: &str) -> Value {
    Value::String(text.to_owned())
}

fn strings<S: AsRef<str>>(texts: &[S]) -> Value {
    Value::Array(texts.iter().map(|t| string(t.as_ref())).collect())
}

fn ints(values: &[i32]) -> Value {
    Value::Array(values.iter().map(|&v| Value::I32(v)).collect())
}

fn metadata(entries: Vec<(&str, Value)>) -> HashMap<String, Value> {
    entries
        .into_iter()
        .map(|(key, value)| (key.to_owned(), value))
        .collect()
}

/// A small Llama-2-style SentencePiece vocabulary: `<unk>`, `<s>`, `</s>`, optionally the 256
/// byte tokens, a user-defined `<tool>`, then scored pieces that spell "hello world".
fn spm_metadata(with_bytes: bool) -> HashMap<String, Value> {
    let mut tokens: Vec<String> = vec!["<unk>".into(), "<s>".into(), "</s>".into()];
    let mut types = vec![2, 3, 3];
    let mut scores = vec![0.0, 0.0, 0.0];
    if with_bytes {
        for byte in 0..=255u8 {
            tokens.push(format!("<0x{byte:02X}>"));
            types.push(6);
            scores.push(0.0);
        }
    }
    tokens.push("<tool>".into());
    types.push(4);
    scores.push(0.0);
    let pieces = [
        "▁", "h", "e", "l", "o", "w", "r", "d", "ll", "he", "▁he", "llo", "▁hello", "▁w", "or",
        "▁wor", "ld", "▁world",
    ];
    for (rank, piece) in pieces.iter().enumerate() {
        tokens.push((*piece).to_owned());
        types.push(1);
        scores.push(-1.0 - rank as f32);
    }
    metadata(vec![
        ("tokenizer.ggml.model", string("llama")),
        ("tokenizer.ggml.tokens", strings(&tokens)),
        ("tokenizer.ggml.token_type", ints(&types)),
        (
            "tokenizer.ggml.scores",
            Value::Array(scores.into_iter().map(Value::F32).collect()),
        ),
        ("tokenizer.ggml.bos_token_id", Value::U32(1)),
        ("tokenizer.ggml.eos_token_id", Value::U32(2)),
        ("tokenizer.ggml.unknown_token_id", Value::U32(0)),
    ])
}

fn ids(tokenizer: &Tokenizer, pieces: &[&str]) -> Vec<u32> {
    pieces
        .iter()
        .map(|piece| tokenizer.token_to_id(piece).expect("piece in vocabulary"))
        .collect()
}

fn stream(tokenizer: &Tokenizer, ids: &[u32]) -> String {
    let mut decoder = tokenizer.decoder();
    let mut out = String::new();
    for &id in ids {
        out.push_str(&decoder.push(id).expect("push").unwrap_or_default());
    }
    out.push_str(&decoder.finish().expect("finish").unwrap_or_default());
    out
}

#[test]
fn sentencepiece_ids_match_llama_cpp() {
    // Ids that llama.cpp (llama-cpp-python 0.3.36) gives for a GGUF of this same vocabulary.
    let expected: [(&str, &[u32]); 8] = [
        ("hello world", &[272, 277]),
        ("hold", &[260, 261, 264, 276]),
        ("hé!", &[260, 261, 198, 172, 36]),
        ("hé", &[260, 261, 198, 172]),
        ("<s>hello</s>", &[1, 272, 2]),
        ("hello<tool>world", &[272, 259, 277]),
        ("  hello  world ", &[260, 260, 272, 260, 277, 260]),
        ("a\nb", &[260, 100, 13, 101]),
    ];
    let tokenizer = Tokenizer::from_gguf(&spm_metadata(true)).expect("build");
    for (text, ids) in expected {
        assert_eq!(
            tokenizer.encode(text, false).expect("encode"),
            ids,
            "{text:?}"
        );
    }
    assert_eq!(
        tokenizer.encode("hello world", true).expect("encode"),
        [1, 272, 277]
    );
}

#[test]
fn sentencepiece_encodes_with_merges_from_scores() {
    let tokenizer = Tokenizer::from_gguf(&spm_metadata(true)).expect("build");
    assert_eq!(tokenizer.vocab_size(), 3 + 256 + 1 + 18);
    assert_eq!(tokenizer.token_to_id("▁hello"), Some(3 + 256 + 1 + 12));
    let hello_world = ids(&tokenizer, &["▁hello", "▁world"]);
    assert_eq!(
        tokenizer.encode("hello world", false).expect("encode"),
        hello_world
    );
    assert_eq!(
        tokenizer.decode(&hello_world).expect("decode"),
        "hello world"
    );
    // No piece spells "▁h" or "▁hold": the best merges are "ld" and the single characters.
    assert_eq!(
        tokenizer.encode("hold", false).expect("encode"),
        ids(&tokenizer, &["▁", "h", "o", "ld"])
    );
    // The "llama" model adds BOS by default, once.
    assert!(tokenizer.add_bos_token());
    assert_eq!(tokenizer.bos_token(), Some(1));
    assert_eq!(tokenizer.eos_tokens(), &[2]);
    let mut with_bos = vec![1];
    with_bos.extend(&hello_world);
    assert_eq!(
        tokenizer.encode("hello world", true).expect("encode"),
        with_bos
    );
    assert_eq!(
        tokenizer.encode("<s>hello world", true).expect("encode"),
        with_bos
    );
}

#[test]
fn sentencepiece_special_and_user_defined_tokens_are_matched_whole() {
    let tokenizer = Tokenizer::from_gguf(&spm_metadata(true)).expect("build");
    let ids_of = |text: &str| tokenizer.encode(text, false).expect("encode");
    assert_eq!(ids_of("<s>hello</s>"), [1, 272, 2]);
    assert_eq!(
        ids_of("hello<tool>world"),
        ids(&tokenizer, &["▁hello", "<tool>", "▁world"])
    );
    assert_eq!(
        tokenizer
            .decode(&ids_of("hello<tool>world"))
            .expect("decode"),
        "hello<tool> world"
    );
    assert_eq!(
        tokenizer.decode(&[1, 272, 2]).expect("decode"),
        "<s> hello</s>"
    );
}

#[test]
fn sentencepiece_byte_fallback_round_trips_text_outside_the_vocabulary() {
    let tokenizer = Tokenizer::from_gguf(&spm_metadata(true)).expect("build");
    let byte = |b: u32| 3 + b;
    // "é" (C3 A9) and "!" are not pieces: they become byte tokens.
    let ids = tokenizer.encode("hé!", false).expect("encode");
    let expected = [
        tokenizer.token_to_id("▁").expect("▁"),
        tokenizer.token_to_id("h").expect("h"),
        byte(0xC3),
        byte(0xA9),
        byte(0x21),
    ];
    assert_eq!(ids, expected);
    assert_eq!(tokenizer.decode(&ids).expect("decode"), "hé!");
    assert_eq!(stream(&tokenizer, &ids), "hé!");

    let mut rng = Rng::new(42);
    for _ in 0..200 {
        // "▁" is SentencePiece's space and "<" could spell a special token: neither round-trips.
        let text = rng.string(30).replace(['▁', '<'], "");
        let ids = tokenizer.encode(&text, false).expect("encode");
        let decoded = tokenizer.decode(&ids).expect("decode");
        assert_eq!(decoded, text, "ids {ids:?}");
        assert_eq!(stream(&tokenizer, &ids), decoded, "ids {ids:?}");
    }
}

#[test]
fn sentencepiece_without_byte_tokens_falls_back_to_unk() {
    let tokenizer = Tokenizer::from_gguf(&spm_metadata(false)).expect("build");
    assert_eq!(
        tokenizer.encode("hé", false).expect("encode"),
        [
            tokenizer.token_to_id("▁").expect("▁"),
            tokenizer.token_to_id("h").expect("h"),
            0
        ]
    );
}

/// A byte-level vocabulary of digits with merges "1 2", "3 4", "12 3", "4 5" and a control
/// `<|end|>`, with the given `tokenizer.ggml.pre`.
fn digits_metadata(pre: Option<&str>) -> HashMap<String, Value> {
    let tokens = ["<|end|>", "1", "2", "3", "4", "5", "12", "34", "123", "45"];
    let mut entries = vec![
        ("tokenizer.ggml.model", string("gpt2")),
        ("tokenizer.ggml.tokens", strings(&tokens)),
        (
            "tokenizer.ggml.token_type",
            ints(&[3, 1, 1, 1, 1, 1, 1, 1, 1, 1]),
        ),
        (
            "tokenizer.ggml.merges",
            strings(&["1 2", "3 4", "12 3", "4 5"]),
        ),
        ("tokenizer.ggml.eos_token_id", Value::U32(0)),
    ];
    if let Some(pre) = pre {
        entries.push(("tokenizer.ggml.pre", string(pre)));
    }
    metadata(entries)
}

#[test]
fn byte_level_pre_tokenizer_follows_tokenizer_ggml_pre() {
    let encode = |pre: Option<&str>| {
        let tokenizer = Tokenizer::from_gguf(&digits_metadata(pre)).expect("build");
        tokenizer.encode("12345<|end|>", false).expect("encode")
    };
    // The same ids as llama.cpp (llama-cpp-python 0.3.36) for a GGUF of this vocabulary.
    // GPT-2: one pre-token, merges by rank: 1+2, 3+4, then "12 3" no longer applies.
    assert_eq!(encode(None), [6, 7, 5, 0]);
    assert_eq!(encode(Some("gpt-2")), [6, 7, 5, 0]);
    // Llama 3: digits in groups of three; "123" is a whole vocabulary entry (ignore_merges).
    assert_eq!(encode(Some("llama-bpe")), [8, 9, 0]);
    assert_eq!(encode(Some("llama3")), [8, 9, 0]);
    // SmolLM: every digit on its own.
    assert_eq!(encode(Some("smollm")), [1, 2, 3, 4, 5, 0]);

    let tokenizer = Tokenizer::from_gguf(&digits_metadata(None)).expect("build");
    assert!(!tokenizer.add_bos_token());
    assert_eq!(tokenizer.bos_token(), None);
    assert_eq!(tokenizer.eos_tokens(), &[0]);
    assert_eq!(
        tokenizer.decode(&[6, 7, 5, 0]).expect("decode"),
        "12345<|end|>"
    );
}

#[test]
fn tokenizer_can_be_shared_across_threads() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Tokenizer>();
    assert_send_sync::<TokenizerError>();
}

fn error_of(result: Result<Tokenizer, TokenizerError>) -> String {
    result.expect_err("should fail").to_string()
}

#[test]
fn gguf_errors_name_the_problem() {
    let mut md = digits_metadata(None);
    md.insert("tokenizer.ggml.model".into(), string("bert"));
    assert_eq!(
        error_of(Tokenizer::from_gguf(&md)),
        "unsupported tokenizer.ggml.model `bert` (supported: `gpt2`, `llama`)"
    );

    let md = digits_metadata(Some("qwen2"));
    assert_eq!(
        error_of(Tokenizer::from_gguf(&md)),
        "unsupported pre-tokenizer tokenizer.ggml.pre `qwen2` (supported: `smollm`, `llama-bpe`, `llama3`, `gpt-2`, `default`)"
    );

    let mut md = digits_metadata(None);
    md.remove("tokenizer.ggml.tokens");
    assert_eq!(
        error_of(Tokenizer::from_gguf(&md)),
        "GGUF metadata has no `tokenizer.ggml.tokens` key"
    );

    let mut md = digits_metadata(None);
    md.remove("tokenizer.ggml.model");
    assert_eq!(
        error_of(Tokenizer::from_gguf(&md)),
        "GGUF metadata has no `tokenizer.ggml.model` key"
    );

    let mut md = digits_metadata(None);
    md.remove("tokenizer.ggml.merges");
    assert_eq!(
        error_of(Tokenizer::from_gguf(&md)),
        "GGUF metadata has no `tokenizer.ggml.merges` key"
    );

    let mut md = spm_metadata(false);
    md.remove("tokenizer.ggml.scores");
    assert_eq!(
        error_of(Tokenizer::from_gguf(&md)),
        "GGUF metadata has no `tokenizer.ggml.scores` key"
    );

    let mut md = digits_metadata(None);
    md.insert("tokenizer.ggml.tokens".into(), string("12"));
    assert_eq!(
        error_of(Tokenizer::from_gguf(&md)),
        "GGUF metadata key `tokenizer.ggml.tokens` should be an array, found string"
    );

    let mut md = digits_metadata(None);
    md.insert("tokenizer.ggml.add_bos_token".into(), Value::U8(1));
    assert_eq!(
        error_of(Tokenizer::from_gguf(&md)),
        "GGUF metadata key `tokenizer.ggml.add_bos_token` should be a boolean, found u8"
    );

    let mut md = digits_metadata(None);
    md.insert("tokenizer.ggml.merges".into(), strings(&["1 2", "34"]));
    assert_eq!(
        error_of(Tokenizer::from_gguf(&md)),
        "invalid GGUF tokenizer metadata: `tokenizer.ggml.merges` entry 1 (\"34\") is not two tokens separated by a space"
    );

    let mut md = digits_metadata(None);
    md.insert("tokenizer.ggml.token_type".into(), ints(&[1, 1]));
    assert_eq!(
        error_of(Tokenizer::from_gguf(&md)),
        "invalid GGUF tokenizer metadata: `tokenizer.ggml.token_type` has 2 entries for 10 tokens"
    );

    let mut md = digits_metadata(None);
    md.insert("tokenizer.ggml.merges".into(), strings(&["1 9"]));
    let message = error_of(Tokenizer::from_gguf(&md));
    assert!(
        message.starts_with("cannot build the tokenizer: "),
        "{message}"
    );
    assert!(message.contains('9'), "{message}");
}

#[test]
fn out_of_range_special_ids_are_ignored_like_llama_cpp() {
    let mut md = digits_metadata(None);
    md.insert("tokenizer.ggml.bos_token_id".into(), Value::U32(99));
    let tokenizer = Tokenizer::from_gguf(&md).expect("build");
    assert_eq!(tokenizer.bos_token(), None);
}

#[test]
fn hf_dir_errors_name_the_file() {
    let dir = tempfile::tempdir().expect("temp dir");
    let message = error_of(Tokenizer::from_hf_dir(dir.path()));
    assert!(message.starts_with("cannot read "), "{message}");
    assert!(message.contains("tokenizer.json"), "{message}");

    let tokenizer_json = dir.path().join("tokenizer.json");
    std::fs::write(&tokenizer_json, "{\"version\": \"1.0\", \"model\": ").expect("write");
    let message = error_of(Tokenizer::from_hf_dir(dir.path()));
    assert!(
        message.starts_with(&format!("invalid JSON in {}: ", tokenizer_json.display())),
        "{message}"
    );

    let good = Tokenizer::from_gguf(&digits_metadata(None)).expect("build");
    good.inner().save(&tokenizer_json, false).expect("save");
    let config = dir.path().join("tokenizer_config.json");
    std::fs::write(&config, "{\"eos_token\": ").expect("write");
    let message = error_of(Tokenizer::from_hf_dir(dir.path()));
    assert!(
        message.starts_with(&format!("invalid JSON in {}: ", config.display())),
        "{message}"
    );

    std::fs::write(&config, r#"{"add_bos_token": "yes"}"#).expect("write");
    let message = error_of(Tokenizer::from_hf_dir(dir.path()));
    assert_eq!(
        message,
        format!(
            "unexpected content in {}: `add_bos_token` should be a boolean, found \"yes\"",
            config.display()
        )
    );

    std::fs::write(&config, "{}").expect("write");
    std::fs::write(
        dir.path().join("generation_config.json"),
        r#"{"eos_token_id": [0, -1]}"#,
    )
    .expect("write");
    let message = error_of(Tokenizer::from_hf_dir(dir.path()));
    assert!(
        message.ends_with("generation_config.json: `eos_token_id` should hold token ids, found -1"),
        "{message}"
    );
}

/// A Hugging Face directory around the digits tokenizer with the given chat template entry.
fn hf_with_template(chat_template: serde_json::Value) -> Tokenizer {
    let dir = tempfile::tempdir().expect("temp dir");
    Tokenizer::from_gguf(&digits_metadata(None))
        .expect("build")
        .inner()
        .save(dir.path().join("tokenizer.json"), false)
        .expect("save");
    let config = serde_json::json!({"eos_token": "<|end|>", "chat_template": chat_template});
    std::fs::write(dir.path().join("tokenizer_config.json"), config.to_string()).expect("write");
    Tokenizer::from_hf_dir(dir.path()).expect("load")
}

#[test]
fn chat_template_supports_transformers_conventions() {
    // trim_blocks/lstrip_blocks, Python string methods, undefined bos_token, loop controls.
    let template = "{% for m in messages %}\n  {% if m.role == 'skip' %}{% continue %}{% endif %}\n{{ bos_token }}[{{ m.role.upper() }}] {{ m.content.strip() }}{{ eos_token }}\n{% endfor %}\n{% if add_generation_prompt %}[ASSISTANT]{% endif %}";
    let tokenizer = hf_with_template(serde_json::json!([
        {"name": "tool_use", "template": "unused"},
        {"name": "default", "template": template},
    ]));
    let messages = [
        ChatMessage::new("user", "  12  "),
        ChatMessage::new("skip", "x"),
        ChatMessage::new("assistant", "34"),
    ];
    assert_eq!(
        tokenizer
            .apply_chat_template(&messages, true)
            .expect("render"),
        "[USER] 12<|end|>\n[ASSISTANT] 34<|end|>\n[ASSISTANT]"
    );
}

#[test]
fn chat_template_errors_are_reported() {
    let tokenizer = hf_with_template(serde_json::json!(
        "{% if messages[0].role != 'user' %}{{ raise_exception('Conversation must start with a user message') }}{% endif %}ok"
    ));
    let messages = [ChatMessage::new("assistant", "1")];
    let message = tokenizer
        .apply_chat_template(&messages, false)
        .expect_err("raise_exception")
        .to_string();
    assert!(message.starts_with("chat template error: "), "{message}");
    assert!(
        message.contains("Conversation must start with a user message"),
        "{message}"
    );

    let tokenizer = hf_with_template(serde_json::json!("{% for m in messages %}"));
    let message = tokenizer
        .apply_chat_template(&messages, false)
        .expect_err("syntax error")
        .to_string();
    assert!(
        message.starts_with("chat template error: syntax error"),
        "{message}"
    );

    let tokenizer = Tokenizer::from_gguf(&digits_metadata(None)).expect("build");
    assert_eq!(tokenizer.chat_template(), None);
    assert_eq!(
        tokenizer
            .apply_chat_template(&messages, false)
            .expect_err("no template")
            .to_string(),
        "the model has no chat template"
    );
}
