//! CLIP's byte-level BPE tokenizer from a diffusers `tokenizer/` folder (`vocab.json`,
//! `merges.txt`, `tokenizer_config.json`): lower-cased, words end in `</w>`, start and end tokens
//! around the text, padded or truncated to the model's 77 positions.

use std::path::Path;

use serde_json::{Value, json};

use crate::error::DiffusionError;
use crate::model_dir::read_json;

/// The pre-tokenizer pattern of CLIP (transformers' `CLIPTokenizerFast` conversion).
const CLIP_PATTERN: &str = r"'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";

/// A CLIP tokenizer with its special tokens and fixed length.
pub struct ClipTokenizer {
    inner: tokenizers::Tokenizer,
    bos: u32,
    eos: u32,
    pad: u32,
    max_length: usize,
}

impl ClipTokenizer {
    /// Reads a diffusers `tokenizer/` (or `tokenizer_2/`) folder.
    pub fn from_dir(dir: &Path) -> Result<Self, DiffusionError> {
        let bad = |m: String| DiffusionError::Tokenizer(format!("{}: {m}", dir.display()));
        let vocab: Value = read_json(&dir.join("vocab.json"))?;
        if vocab.as_object().is_none_or(|v| v.is_empty()) {
            return Err(bad("vocab.json is not a non-empty object".into()));
        }
        let merges_path = dir.join("merges.txt");
        let merges_text =
            std::fs::read_to_string(&merges_path).map_err(|e| bad(format!("merges.txt: {e}")))?;
        let merges: Vec<&str> = merges_text
            .lines()
            .filter(|l| !l.starts_with("#version") && !l.trim().is_empty())
            .collect();
        if let Some(line) = merges.iter().find(|l| l.split(' ').count() != 2) {
            return Err(bad(format!("merges.txt: malformed line {line:?}")));
        }
        let config: Value = read_json(&dir.join("tokenizer_config.json"))?;
        let special = |field: &str, default: &str| -> String {
            match config.get(field) {
                Some(Value::String(s)) => s.clone(),
                Some(Value::Object(o)) => o
                    .get("content")
                    .and_then(|c| c.as_str())
                    .unwrap_or(default)
                    .to_string(),
                _ => default.to_string(),
            }
        };
        let bos_text = special("bos_token", "<|startoftext|>");
        let eos_text = special("eos_token", "<|endoftext|>");
        let pad_text = special("pad_token", &eos_text);
        let unk_text = special("unk_token", &eos_text);
        let max_length = config
            .get("model_max_length")
            .and_then(|v| v.as_u64())
            .filter(|&n| (2..=4096).contains(&n))
            .unwrap_or(77) as usize;
        // transformers splits the special tokens out of the text before anything else, so a pad
        // token such as SD 2.x's "!" always stands alone (id of "!", never "!</w>").
        let mut specials: Vec<&String> = vec![&bos_text, &eos_text, &pad_text, &unk_text];
        specials.sort();
        specials.dedup();
        let added: Vec<Value> = specials
            .iter()
            .map(|text| {
                let id = vocab.get(text.as_str()).and_then(|v| v.as_u64());
                id.map(|id| {
                    json!({"id": id, "content": text, "single_word": false, "lstrip": false,
                           "rstrip": false, "normalized": false, "special": true})
                })
                .ok_or_else(|| bad(format!("special token {text:?} is not in vocab.json")))
            })
            .collect::<Result<_, _>>()?;
        let spec = json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": added,
            "normalizer": {"type": "Sequence", "normalizers": [
                {"type": "NFC"},
                {"type": "Replace", "pattern": {"Regex": r"\s+"}, "content": " "},
                {"type": "Lowercase"}
            ]},
            "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": CLIP_PATTERN}, "behavior": "Removed",
                 "invert": true},
                {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true,
                 "use_regex": true}
            ]},
            "post_processor": null,
            "decoder": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true,
                        "use_regex": true},
            "model": {"type": "BPE", "dropout": null, "unk_token": unk_text,
                      "continuing_subword_prefix": "", "end_of_word_suffix": "</w>",
                      "fuse_unk": false, "byte_fallback": false, "vocab": vocab,
                      "merges": merges}
        });
        let inner: tokenizers::Tokenizer =
            serde_json::from_value(spec).map_err(|e| bad(format!("vocab or merges: {e}")))?;
        let id = |text: &str| {
            inner
                .token_to_id(text)
                .ok_or_else(|| bad(format!("special token {text:?} is not in vocab.json")))
        };
        Ok(Self {
            bos: id(&bos_text)?,
            eos: id(&eos_text)?,
            pad: id(&pad_text)?,
            max_length,
            inner,
        })
    }

    /// The ids of `text` with start and end tokens, unpadded and untruncated.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, DiffusionError> {
        let encoding = self
            .inner
            .encode(text, false)
            .map_err(|e| DiffusionError::Tokenizer(e.to_string()))?;
        let mut ids = Vec::with_capacity(encoding.len() + 2);
        ids.push(self.bos);
        ids.extend_from_slice(encoding.get_ids());
        ids.push(self.eos);
        Ok(ids)
    }

    /// The ids the pipelines feed the text encoder: truncated to the model's length (keeping the
    /// end token) and padded with the pad token.
    pub fn encode_padded(&self, text: &str) -> Result<Vec<u32>, DiffusionError> {
        let mut ids = self.encode(text)?;
        if ids.len() > self.max_length {
            ids.truncate(self.max_length - 1);
            ids.push(self.eos);
        }
        ids.resize(self.max_length, self.pad);
        Ok(ids)
    }

    /// How many positions the text encoder takes.
    pub fn max_length(&self) -> usize {
        self.max_length
    }
}
