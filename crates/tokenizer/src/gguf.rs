//! Builds a `tokenizers` pipeline from GGUF `tokenizer.ggml.*` metadata.

use std::collections::HashMap;

use candle_core::quantized::gguf_file::Value;
use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::decoders::strip::Strip;
use tokenizers::models::bpe::{BPE, Vocab};
use tokenizers::normalizers::{Prepend, Replace, Sequence as NormalizerSequence};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence as PreTokenizerSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{
    AddedToken, DecoderWrapper, NormalizerWrapper, PreTokenizerWrapper, SplitDelimiterBehavior,
};

use crate::{Parts, TokenizerError};

const MODEL: &str = "tokenizer.ggml.model";
const PRE: &str = "tokenizer.ggml.pre";
const TOKENS: &str = "tokenizer.ggml.tokens";
const TOKEN_TYPE: &str = "tokenizer.ggml.token_type";
const SCORES: &str = "tokenizer.ggml.scores";
const MERGES: &str = "tokenizer.ggml.merges";
const BOS: &str = "tokenizer.ggml.bos_token_id";
const EOS: &str = "tokenizer.ggml.eos_token_id";
const UNK: &str = "tokenizer.ggml.unknown_token_id";
const EOT: &str = "tokenizer.ggml.eot_token_id";
const EOM: &str = "tokenizer.ggml.eom_token_id";
const ADD_BOS: &str = "tokenizer.ggml.add_bos_token";
const ADD_SPACE_PREFIX: &str = "tokenizer.ggml.add_space_prefix";
const CHAT_TEMPLATE: &str = "tokenizer.chat_template";

/// SentencePiece's word-boundary marker, which stands for a space in `llama` vocabularies.
const SPM_SPACE: &str = "▁";

/// The Llama 3 pre-tokenizer regex (Hugging Face spelling; llama.cpp's `llama-bpe` is equivalent).
const LLAMA3_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// llama.cpp's token types (`tokenizer.ggml.token_type`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum TokenType {
    Normal,
    Unknown,
    Control,
    UserDefined,
    Unused,
    Byte,
}

impl TokenType {
    fn from_code(code: i64) -> Self {
        match code {
            2 => Self::Unknown,
            3 => Self::Control,
            4 => Self::UserDefined,
            5 => Self::Unused,
            6 => Self::Byte,
            _ => Self::Normal,
        }
    }
}

/// Typed access to the metadata map, with errors naming the key.
struct Meta<'a>(&'a HashMap<String, Value>);

impl<'a> Meta<'a> {
    fn wrong_type(key: &str, expected: &'static str, found: &Value) -> TokenizerError {
        TokenizerError::WrongType {
            key: key.to_owned(),
            expected,
            found: type_name(found),
        }
    }

    fn string(&self, key: &str) -> Result<Option<&'a str>, TokenizerError> {
        match self.0.get(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(v) => Err(Self::wrong_type(key, "a string", v)),
        }
    }

    fn array(&self, key: &str) -> Result<Option<&'a [Value]>, TokenizerError> {
        match self.0.get(key) {
            None => Ok(None),
            Some(Value::Array(items)) => Ok(Some(items)),
            Some(v) => Err(Self::wrong_type(key, "an array", v)),
        }
    }

    fn required_array(&self, key: &str) -> Result<&'a [Value], TokenizerError> {
        self.array(key)?
            .ok_or_else(|| TokenizerError::MissingKey(key.to_owned()))
    }

    fn strings(&self, key: &str) -> Result<Vec<&'a str>, TokenizerError> {
        self.required_array(key)?
            .iter()
            .map(|v| match v {
                Value::String(s) => Ok(s.as_str()),
                v => Err(Self::wrong_type(key, "an array of strings", v)),
            })
            .collect()
    }

    fn integer(&self, key: &str) -> Result<Option<i64>, TokenizerError> {
        self.0
            .get(key)
            .map(|v| integer(v).ok_or_else(|| Self::wrong_type(key, "an integer", v)))
            .transpose()
    }

    fn bool(&self, key: &str) -> Result<Option<bool>, TokenizerError> {
        match self.0.get(key) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(v) => Err(Self::wrong_type(key, "a boolean", v)),
        }
    }

    /// A token id key; ids outside the vocabulary are ignored with a warning, as llama.cpp does.
    fn token_id(&self, key: &str, n_tokens: usize) -> Result<Option<u32>, TokenizerError> {
        Ok(self.integer(key)?.and_then(|id| {
            let valid = u32::try_from(id)
                .ok()
                .filter(|&id| (id as usize) < n_tokens);
            if valid.is_none() {
                tracing::warn!(key, id, n_tokens, "ignoring out-of-range special token id");
            }
            valid
        }))
    }
}

fn integer(value: &Value) -> Option<i64> {
    match *value {
        Value::U8(v) => Some(v.into()),
        Value::I8(v) => Some(v.into()),
        Value::U16(v) => Some(v.into()),
        Value::I16(v) => Some(v.into()),
        Value::U32(v) => Some(v.into()),
        Value::I32(v) => Some(v.into()),
        Value::U64(v) => i64::try_from(v).ok(),
        Value::I64(v) => Some(v),
        _ => None,
    }
}

fn float(value: &Value) -> Option<f32> {
    match *value {
        Value::F32(v) => Some(v),
        // Scores are f32 in every known file; an f64 one is narrowed.
        Value::F64(v) => Some(v as f32),
        _ => None,
    }
}

fn type_name(value: &Value) -> String {
    match value {
        Value::U8(_) => "u8".into(),
        Value::I8(_) => "i8".into(),
        Value::U16(_) => "u16".into(),
        Value::I16(_) => "i16".into(),
        Value::U32(_) => "u32".into(),
        Value::I32(_) => "i32".into(),
        Value::U64(_) => "u64".into(),
        Value::I64(_) => "i64".into(),
        Value::F32(_) => "f32".into(),
        Value::F64(_) => "f64".into(),
        Value::Bool(_) => "bool".into(),
        Value::String(_) => "string".into(),
        Value::Array(items) => match items.first() {
            Some(first) => format!("array of {}", type_name(first)),
            None => "empty array".into(),
        },
    }
}

/// Builds the tokenizer of a GGUF file.
pub(crate) fn build(metadata: &HashMap<String, Value>) -> Result<Parts, TokenizerError> {
    let meta = Meta(metadata);
    let model = meta
        .string(MODEL)?
        .ok_or_else(|| TokenizerError::MissingKey(MODEL.to_owned()))?;
    let is_spm = match model {
        "gpt2" => false,
        "llama" => true,
        other => return Err(TokenizerError::UnsupportedModel(other.to_owned())),
    };
    let tokens = meta.strings(TOKENS)?;
    if tokens.is_empty() {
        return Err(TokenizerError::InvalidMetadata(format!(
            "`{TOKENS}` is empty"
        )));
    }
    let types = token_types(&meta, tokens.len())?;
    let vocab = vocab(&tokens);
    let n = tokens.len();

    let mut bos = meta.token_id(BOS, n)?;
    let mut eos = meta.token_id(EOS, n)?;
    let mut unk = meta.token_id(UNK, n)?;
    if is_spm {
        // llama.cpp's defaults for SentencePiece vocabularies (Llama 2 layout).
        bos = bos.or(Some(1).filter(|&id| id < n as u32));
        eos = eos.or(Some(2).filter(|&id| id < n as u32));
        unk = unk.or(Some(0));
    }
    let declared_eog: Vec<u32> = [meta.token_id(EOT, n)?, meta.token_id(EOM, n)?]
        .into_iter()
        .flatten()
        .collect();
    let add_bos = meta.bool(ADD_BOS)?.unwrap_or(is_spm);

    let mut inner = if is_spm {
        let add_space_prefix = meta.bool(ADD_SPACE_PREFIX)?.unwrap_or(true);
        let scores = scores(&meta, n)?;
        let unk_text = unk.map(|id| tokens[id as usize].to_owned());
        sentencepiece(&tokens, &types, &scores, vocab, unk_text, add_space_prefix)?
    } else {
        byte_level(&meta, vocab)?
    };
    let added: Vec<AddedToken> = tokens
        .iter()
        .zip(&types)
        .filter_map(|(&text, ty)| {
            let special = match ty {
                TokenType::Control | TokenType::Unknown => true,
                TokenType::UserDefined => false,
                _ => return None,
            };
            Some(AddedToken::from(text, special).normalized(false))
        })
        .collect();
    let n_added = added.len();
    inner.add_tokens(added).map_err(TokenizerError::Build)?;
    tracing::debug!(
        model,
        pre = meta.string(PRE)?,
        n_tokens = n,
        n_added,
        "built tokenizer from GGUF metadata"
    );

    let text_of = |id: Option<u32>| id.map(|id| tokens[id as usize].to_owned());
    Ok(Parts {
        vocab_size: n,
        bos,
        eos,
        declared_eog,
        add_bos,
        chat_template: meta.string(CHAT_TEMPLATE)?.map(str::to_owned),
        bos_text: text_of(bos),
        eos_text: text_of(eos),
        inner,
    })
}

fn token_types(meta: &Meta<'_>, n_tokens: usize) -> Result<Vec<TokenType>, TokenizerError> {
    let Some(codes) = meta.array(TOKEN_TYPE)? else {
        return Ok(vec![TokenType::Normal; n_tokens]);
    };
    if codes.len() != n_tokens {
        return Err(TokenizerError::InvalidMetadata(format!(
            "`{TOKEN_TYPE}` has {} entries for {n_tokens} tokens",
            codes.len()
        )));
    }
    codes
        .iter()
        .map(|v| {
            integer(v)
                .map(TokenType::from_code)
                .ok_or_else(|| Meta::wrong_type(TOKEN_TYPE, "an array of integers", v))
        })
        .collect()
}

fn scores(meta: &Meta<'_>, n_tokens: usize) -> Result<Vec<f32>, TokenizerError> {
    let values = meta.required_array(SCORES)?;
    if values.len() != n_tokens {
        return Err(TokenizerError::InvalidMetadata(format!(
            "`{SCORES}` has {} entries for {n_tokens} tokens",
            values.len()
        )));
    }
    values
        .iter()
        .map(|v| float(v).ok_or_else(|| Meta::wrong_type(SCORES, "an array of floats", v)))
        .collect()
}

/// Token text to id; when a text occurs twice the first id wins, like llama.cpp's lookup.
fn vocab(tokens: &[&str]) -> Vocab {
    let mut vocab = Vocab::with_capacity(tokens.len());
    for (id, &text) in (0u32..).zip(tokens) {
        if vocab.contains_key(text) {
            tracing::warn!(id, text, "duplicate token text in GGUF vocabulary");
        } else {
            vocab.insert(text.to_owned(), id);
        }
    }
    vocab
}

/// Byte-level BPE (`tokenizer.ggml.model = "gpt2"`): merges from the file, pre-tokenizer from
/// `tokenizer.ggml.pre`.
fn byte_level(meta: &Meta<'_>, vocab: Vocab) -> Result<tokenizers::Tokenizer, TokenizerError> {
    let merges = meta
        .strings(MERGES)?
        .into_iter()
        .enumerate()
        .map(|(i, merge)| {
            merge
                .split_once(' ')
                .map(|(left, right)| (left.to_owned(), right.to_owned()))
                .ok_or_else(|| {
                    TokenizerError::InvalidMetadata(format!(
                        "`{MERGES}` entry {i} ({merge:?}) is not two tokens separated by a space"
                    ))
                })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let pre = meta.string(PRE)?;
    let (pre_tokenizer, ignore_merges): (PreTokenizerWrapper, bool) = match pre {
        Some("smollm") => (
            PreTokenizerSequence::new(vec![
                Digits::new(true).into(),
                ByteLevel::new(false, true, true).into(),
            ])
            .into(),
            false,
        ),
        Some("llama-bpe" | "llama3") => (
            PreTokenizerSequence::new(vec![
                Split::new(
                    SplitPattern::Regex(LLAMA3_REGEX.to_owned()),
                    SplitDelimiterBehavior::Isolated,
                    false,
                )
                .map_err(TokenizerError::Build)?
                .into(),
                ByteLevel::new(false, true, false).into(),
            ])
            .into(),
            true,
        ),
        None | Some("gpt-2" | "default") => (ByteLevel::new(false, true, true).into(), false),
        Some(other) => return Err(TokenizerError::UnsupportedPreTokenizer(other.to_owned())),
    };
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .ignore_merges(ignore_merges)
        .build()
        .map_err(TokenizerError::Build)?;
    let mut tokenizer = tokenizers::Tokenizer::new(bpe);
    tokenizer
        .with_pre_tokenizer(Some(pre_tokenizer))
        .with_decoder(Some(ByteLevel::default()));
    Ok(tokenizer)
}

/// SentencePiece BPE (`tokenizer.ggml.model = "llama"`), converted the way Hugging Face's
/// `LlamaConverter` does: merges derived from the scored vocabulary, byte fallback for the rest.
fn sentencepiece(
    tokens: &[&str],
    types: &[TokenType],
    scores: &[f32],
    vocab: Vocab,
    unk: Option<String>,
    add_space_prefix: bool,
) -> Result<tokenizers::Tokenizer, TokenizerError> {
    let merges = spm_merges(tokens, types, scores, &vocab);
    let mut builder = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .fuse_unk(true)
        .byte_fallback(true);
    if let Some(unk) = unk {
        builder = builder.unk_token(unk);
    }
    let bpe = builder.build().map_err(TokenizerError::Build)?;

    let replace = |from: &str, to: &str| Replace::new(from, to).map_err(TokenizerError::Build);
    let mut normalizers: Vec<NormalizerWrapper> = Vec::new();
    if add_space_prefix {
        normalizers.push(Prepend::new(SPM_SPACE.to_owned()).into());
    }
    normalizers.push(replace(" ", SPM_SPACE)?.into());
    let mut decoders: Vec<DecoderWrapper> = vec![
        replace(SPM_SPACE, " ")?.into(),
        ByteFallback::new().into(),
        Fuse::new().into(),
    ];
    if add_space_prefix {
        decoders.push(Strip::new(' ', 1, 0).into());
    }

    let mut tokenizer = tokenizers::Tokenizer::new(bpe);
    tokenizer
        .with_normalizer(Some(NormalizerSequence::new(normalizers)))
        .map_err(TokenizerError::Build)?
        .with_decoder(Some(DecoderSequence::new(decoders)));
    Ok(tokenizer)
}

/// Merges implied by a SentencePiece vocabulary: every split of a piece into two pieces of the
/// vocabulary, ordered by the merged piece's score (higher first), ties by vocabulary order and
/// then by the ids of the two halves, as Hugging Face's `SentencePieceExtractor` orders them.
fn spm_merges(
    tokens: &[&str],
    types: &[TokenType],
    scores: &[f32],
    vocab: &Vocab,
) -> Vec<(String, String)> {
    let mergeable = |id: u32| {
        matches!(
            types[id as usize],
            TokenType::Normal | TokenType::UserDefined | TokenType::Unused
        )
    };
    let mut merges: Vec<(f32, u32, u32)> = Vec::new();
    for (id, &piece) in (0u32..).zip(tokens) {
        if !mergeable(id) || vocab.get(piece) != Some(&id) {
            continue;
        }
        let mut splits: Vec<(u32, u32)> = piece
            .char_indices()
            .skip(1)
            .filter_map(|(at, _)| {
                let (left, right) = piece.split_at(at);
                let left = *vocab.get(left)?;
                let right = *vocab.get(right)?;
                (mergeable(left) && mergeable(right)).then_some((left, right))
            })
            .collect();
        splits.sort_unstable();
        merges.extend(
            splits
                .into_iter()
                .map(|(left, right)| (scores[id as usize], left, right)),
        );
    }
    merges.sort_by(|a, b| b.0.total_cmp(&a.0));
    merges
        .into_iter()
        .map(|(_, left, right)| {
            (
                tokens[left as usize].to_owned(),
                tokens[right as usize].to_owned(),
            )
        })
        .collect()
}
