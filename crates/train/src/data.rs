//! The user's training data: JSONL lines of chat `messages` or plain `text`, tokenized, cut to
//! the sequence length, with the positions that are trained on, and a held-out share.

use std::io::{BufRead, BufReader};
use std::path::Path;

use lsplit_tokenizer::{ChatMessage, Tokenizer};
use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;
use serde::Deserialize;

use crate::{Result, TrainError};

/// The longest data file read: a user's own data, not a corpus.
const MAX_DATA_BYTES: u64 = 1 << 30;

/// One training sequence: its tokens, and which tokens are predicted in the loss.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Example {
    /// Token ids.
    pub ids: Vec<u32>,
    /// `trained[i]`: whether `ids[i]` counts in the loss (predicted from `ids[..i]`); never the
    /// first.
    pub trained: Vec<bool>,
}

impl Example {
    /// Tokens predicted in the loss.
    pub fn targets(&self) -> usize {
        self.trained.iter().filter(|&&t| t).count()
    }
}

/// Training and held-out examples.
#[derive(Debug, Clone)]
pub struct Dataset {
    /// What training draws from.
    pub train: Vec<Example>,
    /// What the held-out loss is measured on.
    pub held_out: Vec<Example>,
}

/// One JSONL line.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Line {
    #[serde(default)]
    messages: Option<Vec<ChatMessage>>,
    #[serde(default)]
    text: Option<String>,
}

impl Dataset {
    /// Reads `path`: each non-empty line `{"text": ...}` (every token trained) or
    /// `{"messages": [{"role", "content"}...]}` (the assistant's turns trained, through the
    /// model's chat template), cut into sequences of at most `max_len` tokens; shuffled with
    /// `seed`, and `held_out` of them (a fraction in `[0, 1)`) kept aside.
    pub fn read(
        path: &Path,
        tokenizer: &Tokenizer,
        max_len: usize,
        held_out: f64,
        seed: u64,
    ) -> Result<Self> {
        if max_len < 2 {
            return Err(TrainError::Options(
                "the sequence length must be at least 2 tokens".into(),
            ));
        }
        if !(0.0..1.0).contains(&held_out) {
            return Err(TrainError::Options(format!(
                "the held-out fraction {held_out} is not within [0, 1)"
            )));
        }
        let io = |source| TrainError::Io {
            path: path.to_path_buf(),
            source,
        };
        let file = std::fs::File::open(path).map_err(io)?;
        let len = file.metadata().map_err(io)?.len();
        if len > MAX_DATA_BYTES {
            return Err(TrainError::NoData(format!(
                "{} is {len} bytes; training data is read whole, up to {MAX_DATA_BYTES}",
                path.display()
            )));
        }
        let mut examples = Vec::new();
        for (index, line) in BufReader::new(file).lines().enumerate() {
            let line = line.map_err(io)?;
            if line.trim().is_empty() {
                continue;
            }
            let bad = |reason: String| TrainError::Data {
                path: path.to_path_buf(),
                line: index + 1,
                reason,
            };
            let parsed: Line = serde_json::from_str(&line)
                .map_err(|e| bad(format!("not a JSON object with `messages` or `text`: {e}")))?;
            let (ids, trained) = match (parsed.messages, parsed.text) {
                (Some(messages), None) => chat_tokens(tokenizer, &messages).map_err(bad)?,
                (None, Some(text)) => {
                    let ids = tokenizer.encode(&text, tokenizer.add_bos_token())?;
                    let trained = (0..ids.len()).map(|i| i > 0).collect();
                    (ids, trained)
                }
                _ => return Err(bad("a line holds either `messages` or `text`".into())),
            };
            examples.extend(windows(ids, trained, max_len));
        }
        if examples.is_empty() {
            return Err(TrainError::NoData(format!(
                "{} holds nothing to train on (no text, or no assistant turn)",
                path.display()
            )));
        }
        examples.shuffle(&mut ChaCha8Rng::seed_from_u64(seed));
        let keep = ((examples.len() as f64 * held_out).round() as usize).min(examples.len() - 1);
        let held_out = examples.split_off(examples.len() - keep);
        Ok(Self {
            train: examples,
            held_out,
        })
    }
}

/// A conversation's tokens through the chat template, each message's span tokenized on its own
/// (what the template adds for message `i` is `render(..=i)` less `render(..i)`), the
/// assistant's spans trained; the generation prompt before an assistant turn is not.
fn chat_tokens(
    tokenizer: &Tokenizer,
    messages: &[ChatMessage],
) -> std::result::Result<(Vec<u32>, Vec<bool>), String> {
    if messages.is_empty() {
        return Err("`messages` is empty".into());
    }
    let render = |upto: usize, prompt: bool| {
        if upto == 0 && !prompt {
            return Ok(String::new());
        }
        tokenizer
            .apply_chat_template(&messages[..upto], prompt)
            .map_err(|e| e.to_string())
    };
    let (mut ids, mut trained) = (Vec::new(), Vec::new());
    let mut push = |text: &str, train: bool| -> std::result::Result<(), String> {
        let tokens = tokenizer.encode(text, false).map_err(|e| e.to_string())?;
        trained.extend(std::iter::repeat_n(train, tokens.len()));
        ids.extend(tokens);
        Ok(())
    };
    let mut done = String::new();
    for (i, message) in messages.iter().enumerate() {
        let assistant = message.role == "assistant";
        if assistant {
            let prompt = render(i, true)?;
            push(suffix(&prompt, &done)?, false)?;
            done = prompt;
        }
        let full = render(i + 1, false)?;
        push(suffix(&full, &done)?, assistant)?;
        done = full;
    }
    if let Some(first) = trained.first_mut() {
        *first = false;
    }
    Ok((ids, trained))
}

/// What `longer` adds to `prefix`.
fn suffix<'a>(longer: &'a str, prefix: &str) -> std::result::Result<&'a str, String> {
    longer.strip_prefix(prefix).ok_or_else(|| {
        "the chat template does not render a conversation as its earlier turns plus the new one"
            .to_string()
    })
}

/// A sequence cut into windows of at most `max_len` tokens, each but the first starting with
/// the previous one's last token (whose prediction was trained there); windows with no trained
/// token are dropped.
fn windows(ids: Vec<u32>, trained: Vec<bool>, max_len: usize) -> Vec<Example> {
    let mut out = Vec::new();
    let mut start = 0;
    while start + 1 < ids.len() {
        let end = (start + max_len).min(ids.len());
        let mut mask = trained[start..end].to_vec();
        mask[0] = false;
        let example = Example {
            ids: ids[start..end].to_vec(),
            trained: mask,
        };
        if example.targets() > 0 {
            out.push(example);
        }
        start = end - 1;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_overlap_by_one_token_and_skip_untrained_ones() {
        let ids: Vec<u32> = (0..7).collect();
        let trained = vec![false, false, false, true, true, true, true];
        let got = windows(ids, trained, 3);
        assert_eq!(
            got,
            vec![
                Example {
                    ids: vec![2, 3, 4],
                    trained: vec![false, true, true]
                },
                Example {
                    ids: vec![4, 5, 6],
                    trained: vec![false, true, true]
                },
            ]
        );
    }
}
