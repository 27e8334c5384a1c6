//! Tokenizers and chat templates for Llama-family models, built from GGUF metadata or from a
//! Hugging Face model directory.
//!
//! GGUF files carry their tokenizer as raw `tokenizer.ggml.*` metadata; this crate turns it into
//! a [`tokenizers`] pipeline that reproduces llama.cpp's token ids (the reference for GGUF), for
//! byte-level BPE (`gpt2`: SmolLM2, Llama 3) and SentencePiece BPE (`llama`: Llama 2, Mistral).
//! It also renders the model's Jinja chat template and decodes generated ids incrementally.

mod error;
mod gguf;
mod hf;
mod stream;
mod template;

use std::collections::HashMap;
use std::path::Path;

use candle_core::quantized::gguf_file::Value;

pub use error::TokenizerError;
pub use stream::StreamDecoder;

/// One message of a conversation, as passed to a chat template (`messages` in Jinja).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ChatMessage {
    /// Who speaks: `system`, `user` or `assistant` (templates may accept others).
    pub role: String,
    /// What is said.
    pub content: String,
}

impl ChatMessage {
    /// Builds a message from a role and its content.
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
        }
    }
}

/// Texts of tokens that end generation whatever the metadata says; llama.cpp detects the same
/// ones by text because many conversions declare only one end-of-sequence id.
const END_OF_GENERATION_TEXTS: &[&str] = &[
    "<|eot_id|>",
    "<|eom_id|>",
    "<|im_end|>",
    "<|end|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "<|end_of_text|>",
    "<EOT>",
    "<｜end▁of▁sentence｜>",
];

/// A text tokenizer plus the model's special tokens and chat template: everything needed to turn
/// a conversation into prompt ids and generated ids back into text.
#[derive(Clone, Debug)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    vocab_size: usize,
    bos: Option<u32>,
    eos: Option<u32>,
    end_of_generation: Vec<u32>,
    add_bos: bool,
    chat_template: Option<String>,
    bos_text: Option<String>,
    eos_text: Option<String>,
}

/// What a loader found; [`Tokenizer::assemble`] derives the rest.
struct Parts {
    inner: tokenizers::Tokenizer,
    vocab_size: usize,
    bos: Option<u32>,
    eos: Option<u32>,
    /// Further end-of-generation ids declared by the source (eot, eom, generation_config...).
    declared_eog: Vec<u32>,
    add_bos: bool,
    chat_template: Option<String>,
    bos_text: Option<String>,
    eos_text: Option<String>,
}

impl Tokenizer {
    /// Builds the tokenizer a GGUF file describes (`tokenizer.ggml.*` keys and
    /// `tokenizer.chat_template`), matching llama.cpp's tokenization of the same file.
    pub fn from_gguf(metadata: &HashMap<String, Value>) -> Result<Self, TokenizerError> {
        gguf::build(metadata).map(Self::assemble)
    }

    /// Loads a Hugging Face model directory: `tokenizer.json`, plus `tokenizer_config.json`
    /// (chat template, bos/eos token strings, `add_bos_token`), `chat_template.jinja` and
    /// `generation_config.json` (`eos_token_id`, possibly a list) when present.
    pub fn from_hf_dir(dir: &Path) -> Result<Self, TokenizerError> {
        hf::load(dir).map(Self::assemble)
    }

    fn assemble(parts: Parts) -> Self {
        let mut end_of_generation = Vec::new();
        let mut push = |id: u32| {
            if !end_of_generation.contains(&id) {
                end_of_generation.push(id);
            }
        };
        parts.eos.into_iter().for_each(&mut push);
        parts.declared_eog.into_iter().for_each(&mut push);
        let mut by_text: Vec<u32> = END_OF_GENERATION_TEXTS
            .iter()
            .filter_map(|text| parts.inner.token_to_id(text))
            .collect();
        by_text.sort_unstable();
        by_text.into_iter().for_each(push);
        Self {
            inner: parts.inner,
            vocab_size: parts.vocab_size,
            bos: parts.bos,
            eos: parts.eos,
            end_of_generation,
            add_bos: parts.add_bos,
            chat_template: parts.chat_template,
            bos_text: parts.bos_text,
            eos_text: parts.eos_text,
        }
    }

    /// Encodes text into token ids. Special tokens written in the text (e.g. `<|im_start|>`) are
    /// matched whole and become their ids. With `add_bos`, BOS is prepended when the model asks
    /// for it ([`Self::add_bos_token`]) and the text does not already start with it (chat
    /// templates often write the BOS token themselves).
    pub fn encode(&self, text: &str, add_bos: bool) -> Result<Vec<u32>, TokenizerError> {
        let encoding = self
            .inner
            .encode_fast(text, false)
            .map_err(TokenizerError::Encode)?;
        let mut ids = encoding.get_ids().to_vec();
        if let Some(bos) = self.bos.filter(|_| add_bos && self.add_bos)
            && ids.first() != Some(&bos)
        {
            ids.insert(0, bos);
        }
        Ok(ids)
    }

    /// Decodes token ids into text. Special tokens are kept as their text (`<|im_end|>`), so
    /// `decode(encode(s))` gives back `s`; callers that print generated text stop at
    /// [`Self::eos_tokens`] instead of relying on decode to hide them.
    pub fn decode(&self, ids: &[u32]) -> Result<String, TokenizerError> {
        if let Some(&id) = ids.iter().find(|&&id| id as usize >= self.vocab_size) {
            return Err(TokenizerError::TokenOutOfRange {
                id,
                vocab_size: self.vocab_size,
            });
        }
        self.inner
            .decode(ids, false)
            .map_err(TokenizerError::Decode)
    }

    /// Number of token ids (one more than the largest id), the size of the model's embedding.
    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    /// The beginning-of-sequence id, if the model has one.
    pub fn bos_token(&self) -> Option<u32> {
        self.bos
    }

    /// Whether the model wants BOS at the start of a prompt (`tokenizer.ggml.add_bos_token`,
    /// `add_bos_token` of tokenizer_config.json); [`Self::encode`] consults it.
    pub fn add_bos_token(&self) -> bool {
        self.add_bos
    }

    /// The declared end-of-sequence id, if any; [`Self::eos_tokens`] is what stops generation.
    pub fn eos_token(&self) -> Option<u32> {
        self.eos
    }

    /// Every id that ends generation: the eos id first, then declared end-of-turn ids (eot, eom,
    /// generation_config's list), then tokens such as `<|im_end|>` or `<|eot_id|>` found by their
    /// text, as llama.cpp does.
    pub fn eos_tokens(&self) -> &[u32] {
        &self.end_of_generation
    }

    /// The text of a token id as stored in the vocabulary (byte-level tokens stay encoded).
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// The id of a vocabulary entry or special token written exactly as stored.
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// The model's Jinja chat template source, if it ships one.
    pub fn chat_template(&self) -> Option<&str> {
        self.chat_template.as_deref()
    }

    /// Renders the chat template for `messages` the way Hugging Face transformers does (globals
    /// `messages`, `add_generation_prompt`, `bos_token`, `eos_token`, `raise_exception`; blocks
    /// trimmed; Python string methods such as `.strip()` available). The result is meant to be
    /// passed to [`Self::encode`].
    pub fn apply_chat_template(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String, TokenizerError> {
        let source = self
            .chat_template
            .as_deref()
            .ok_or(TokenizerError::NoChatTemplate)?;
        template::render(
            source,
            messages,
            add_generation_prompt,
            self.bos_text.as_deref(),
            self.eos_text.as_deref(),
        )
    }

    /// Starts an incremental decoder for streaming generated ids as text.
    pub fn decoder(&self) -> StreamDecoder<'_> {
        StreamDecoder::new(self)
    }

    /// The underlying `tokenizers` pipeline, e.g. to save it as a tokenizer.json.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }
}
