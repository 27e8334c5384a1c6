//! Incremental detokenization for streaming generated text.

use crate::{Tokenizer, TokenizerError};

const REPLACEMENT: char = char::REPLACEMENT_CHARACTER;

/// Incremental detokenizer for streaming: push ids one at a time and get back new text once it
/// is complete UTF-8 (byte-level BPE and byte-fallback tokens can split a character across
/// tokens, and SentencePiece spaces depend on the previous token).
///
/// The pieces returned by [`Self::push`] followed by [`Self::finish`] concatenate to
/// [`Tokenizer::decode`] of all pushed ids, for any ids that decode to valid UTF-8 (all that
/// encoding produces); for invalid byte runs the replacement characters may differ. It decodes
/// a short window of recent ids on each push, so the cost per token does not grow with length.
#[derive(Debug)]
pub struct StreamDecoder<'a> {
    tokenizer: &'a Tokenizer,
    /// Ids of the current window: those already returned as text, then pending ones.
    ids: Vec<u32>,
    /// How many ids at the start of the window were already returned as text.
    emitted: usize,
    /// Decoded text of `ids[..emitted]`; the next piece is what decoding the window adds to it.
    prefix: String,
}

impl<'a> StreamDecoder<'a> {
    pub(crate) fn new(tokenizer: &'a Tokenizer) -> Self {
        Self {
            tokenizer,
            ids: Vec::new(),
            emitted: 0,
            prefix: String::new(),
        }
    }

    /// Adds one id; returns the text it completes, or `None` while a character is still
    /// incomplete (or the id adds no text yet).
    pub fn push(&mut self, id: u32) -> Result<Option<String>, TokenizerError> {
        let vocab_size = self.tokenizer.vocab_size();
        if id as usize >= vocab_size {
            return Err(TokenizerError::TokenOutOfRange { id, vocab_size });
        }
        self.ids.push(id);
        let text = self.tokenizer.decode(&self.ids)?;
        if text.ends_with(REPLACEMENT) {
            return Ok(None);
        }
        let piece = match text.strip_prefix(self.prefix.as_str()) {
            Some(piece) if !piece.is_empty() => piece.to_owned(),
            _ => return Ok(None),
        };
        // Keep the ids just returned as context for the next piece (spaces, fused bytes).
        self.ids.drain(..self.emitted);
        self.emitted = self.ids.len();
        self.prefix = self.tokenizer.decode(&self.ids)?;
        Ok(Some(piece))
    }

    /// Returns whatever text is still pending (e.g. an incomplete character, decoded with
    /// replacement characters as [`Tokenizer::decode`] would) and resets the decoder for a new
    /// sequence.
    pub fn finish(&mut self) -> Result<Option<String>, TokenizerError> {
        let piece = if self.emitted < self.ids.len() {
            let text = self.tokenizer.decode(&self.ids)?;
            let start = common_prefix_len(&text, &self.prefix);
            text[start..].to_owned()
        } else {
            String::new()
        };
        self.ids.clear();
        self.emitted = 0;
        self.prefix.clear();
        Ok((!piece.is_empty()).then_some(piece))
    }
}

/// Length in bytes of the longest common prefix of `a` and `b`, a char boundary of both.
fn common_prefix_len(a: &str, b: &str) -> usize {
    a.char_indices()
        .zip(b.chars())
        .find(|((_, x), y)| x != y)
        .map_or(a.len().min(b.len()), |((at, _), _)| at)
}
