//! A draft model (`--draft-model`): a model with the same tokenizer as the split one, run whole
//! on the device, whose greedy continuation a multi-token step checks.

use std::path::Path;
use std::sync::Arc;

use candle_core::Device;
use lsplit_model::{KvCache, ModelPart, ModelSource, PartSpec};
use lsplit_tokenizer::Tokenizer;

use crate::sampler::argmax;
use crate::{SplitError, load_tokenizer};

/// A loaded draft model, shared by every session of a device (a clone shares its weights).
#[derive(Debug, Clone)]
pub struct DraftModel {
    part: Arc<ModelPart>,
    context: usize,
}

impl DraftModel {
    /// Loads the model at `path` (GGUF file or Hugging Face directory) whole, after checking
    /// that its tokenizer is `target`'s: the same token for every id.
    pub fn load(path: &Path, target: &Tokenizer, device: &Device) -> Result<Self, SplitError> {
        let source = ModelSource::open(path)?;
        let tokenizer = load_tokenizer(&source)?;
        check_same_tokenizer(&tokenizer, target)?;
        let config = source.config();
        let part = source.load_part(&PartSpec::whole(config.num_layers), device)?;
        Ok(Self {
            context: config.context_length,
            part: Arc::new(part),
        })
    }

    /// The loaded model.
    pub fn part(&self) -> &ModelPart {
        &self.part
    }
}

/// Refuses a draft tokenizer that does not give every token the id `target` gives it: its
/// drafts would be other tokens than the ones it meant.
fn check_same_tokenizer(draft: &Tokenizer, target: &Tokenizer) -> Result<(), SplitError> {
    let (ours, theirs) = (draft.vocab_size(), target.vocab_size());
    if ours != theirs {
        return Err(SplitError::DraftModel(format!(
            "its tokenizer has {ours} tokens but the model's has {theirs}: a draft model needs \
             the model's tokenizer"
        )));
    }
    let differs = (0..theirs as u32).find(|&id| draft.id_to_token(id) != target.id_to_token(id));
    if let Some(id) = differs {
        return Err(SplitError::DraftModel(format!(
            "its tokenizer gives id {id} to {:?} but the model's to {:?}: a draft model needs \
             the model's tokenizer",
            draft.id_to_token(id).unwrap_or_default(),
            target.id_to_token(id).unwrap_or_default()
        )));
    }
    Ok(())
}

/// One session's use of the draft model: its KV cache and the tokens that cache holds.
pub(crate) struct DraftCache {
    model: Arc<ModelPart>,
    context: usize,
    cache: KvCache,
    tokens: Vec<u32>,
}

impl DraftCache {
    pub(crate) fn new(model: &DraftModel) -> Self {
        Self {
            cache: model.part.new_cache(),
            model: Arc::clone(&model.part),
            context: model.context,
            tokens: Vec::new(),
        }
    }

    /// Runs `tokens` (the sequence so far) into an empty cache in one pass, as a prompt is
    /// run, so that the first draft costs what later ones do: the tokens new to the model.
    pub(crate) fn prefill(&mut self, tokens: &[u32]) -> Result<(), SplitError> {
        let tokens = &tokens[..tokens.len().min(self.context)];
        if tokens.is_empty() || !self.tokens.is_empty() {
            return Ok(());
        }
        let model = &self.model;
        model.forward(&model.embed(tokens)?, 0, &mut self.cache)?;
        self.tokens = tokens.to_vec();
        Ok(())
    }

    /// Up to `count` tokens the draft model picks greedily after `tokens`, each one below
    /// `vocab` (the split model's vocabulary). The cache keeps what it ran; the next call
    /// forgets what no longer agrees with its tokens (the drafts that were not kept), so a
    /// step costs the draft model only the tokens that are new to it.
    pub(crate) fn draft(
        &mut self,
        tokens: &[u32],
        count: usize,
        vocab: usize,
    ) -> Result<Vec<u32>, SplitError> {
        let count = count.min(self.context.saturating_sub(tokens.len()));
        if count == 0 || tokens.is_empty() {
            return Ok(Vec::new());
        }
        // Runs at least the last token, whose logits the first draft comes from.
        let common = self
            .tokens
            .iter()
            .zip(tokens)
            .take_while(|(a, b)| a == b)
            .count()
            .min(tokens.len() - 1);
        self.cache.truncate(common);
        self.tokens.truncate(common);
        let mut fresh = tokens[common..].to_vec();
        let mut drafted = Vec::with_capacity(count);
        loop {
            let model = &self.model;
            let start = self.tokens.len();
            let hidden = model.forward(&model.embed(&fresh)?, start, &mut self.cache)?;
            self.tokens.append(&mut fresh);
            let next = argmax(&model.logits(&hidden)?.to_vec1::<f32>()?);
            if next as usize >= vocab {
                break;
            }
            drafted.push(next);
            if drafted.len() == count {
                break;
            }
            fresh.push(next);
        }
        Ok(drafted)
    }
}
