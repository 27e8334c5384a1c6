use std::ops::Range;
use std::sync::{Arc, Mutex};

use candle_core::Device;
use lsplit_model::{ModelPart, ModelSource, PartKind, PartSpec, SplitPlan};
use lsplit_tokenizer::{ChatMessage, Tokenizer};
use lsplit_wire::Codec;

use crate::draft::DraftModel;
use crate::session::Session;
use crate::speculate::Drafter;
use crate::{LocalTrunk, Obfuscation, SessionKeys, SplitError, SplitPolicy, Trunk, UplinkNoise};

/// What the device holds: either the whole model (the `--no-split` baseline, the reference a
/// split is checked against), or the head and tail of a split whose trunk lives elsewhere.
#[derive(Debug)]
pub(crate) enum Parts {
    Unsplit(Arc<ModelPart>),
    Split {
        policy: SplitPolicy,
        head: Arc<ModelPart>,
        tail: Arc<ModelPart>,
    },
}

/// The device's share of a model: tokenizer, head and tail (or the whole model), the codec
/// its hidden rows cross the wire in, and the noise its uplink rows get, if any.
#[derive(Debug)]
pub struct DeviceModel {
    tokenizer: Arc<Tokenizer>,
    pub(crate) parts: Parts,
    codec: Codec,
    pub(crate) uplink_noise: Option<UplinkNoise>,
    context_length: usize,
    layers: usize,
    draft: Option<DraftModel>,
    /// What `--speculate auto` has learnt of the link and the draft sources, handed from one
    /// session to the next so that each generation need not measure them again.
    drafter: Mutex<Option<Drafter>>,
}

impl DeviceModel {
    /// Loads the whole model into one part: the unsplit baseline.
    pub fn unsplit(
        source: &ModelSource,
        tokenizer: Arc<Tokenizer>,
        device: &Device,
    ) -> Result<Self, SplitError> {
        let whole = source.load_part(&PartSpec::whole(source.config().num_layers), device)?;
        Ok(Self {
            tokenizer,
            parts: Parts::Unsplit(Arc::new(whole)),
            codec: Codec::F32,
            uplink_noise: None,
            context_length: source.config().context_length,
            layers: source.config().num_layers,
            draft: None,
            drafter: Mutex::default(),
        })
    }

    /// Loads a head and a tail holding every layer `policy` may give them (the deepest K1,
    /// from the shallowest K2); the trunk is supplied per session. A fixed split is
    /// [`SplitPolicy::fixed`]. The source's adapter, if any, must update no layer that any
    /// draw of `policy` gives the trunk: a device adapter stays on the device.
    pub fn split(
        source: &ModelSource,
        policy: SplitPolicy,
        tokenizer: Arc<Tokenizer>,
        codec: Codec,
        device: &Device,
    ) -> Result<Self, SplitError> {
        let layers = source.config().num_layers;
        if policy.layers() != layers {
            return Err(SplitError::Layout(
                "the policy is for a model with another number of layers",
            ));
        }
        if let Some(adapter) = source.adapter() {
            adapter.check_off_trunk(policy.trunk_layers())?;
        }
        let head = source.load_part(
            &PartSpec {
                kind: PartKind::Head,
                layers: policy.head_layers(),
            },
            device,
        )?;
        let tail = source.load_part(
            &PartSpec {
                kind: PartKind::Tail,
                layers: policy.tail_layers(),
            },
            device,
        )?;
        Ok(Self {
            tokenizer,
            parts: Parts::Split {
                policy,
                head: Arc::new(head),
                tail: Arc::new(tail),
            },
            codec,
            uplink_noise: None,
            context_length: source.config().context_length,
            layers,
            draft: None,
            drafter: Mutex::default(),
        })
    }

    /// Adds a draft model (`--speculate draft`, and a source `auto` considers), loaded with
    /// this model's tokenizer checked.
    pub fn with_draft_model(self, draft: DraftModel) -> Self {
        Self {
            draft: Some(draft),
            ..self
        }
    }

    /// The draft model, if one was added.
    pub fn draft_model(&self) -> Option<&DraftModel> {
        self.draft.as_ref()
    }

    /// The drafter `auto` left after this device's last session over a network link, if any.
    pub(crate) fn take_drafter(&self) -> Option<Drafter> {
        self.drafter.lock().ok()?.take()
    }

    /// Keeps `drafter` for this device's next session that drafts with `auto`.
    pub(crate) fn keep_drafter(&self, drafter: Drafter) {
        if let Ok(mut kept) = self.drafter.lock() {
            *kept = Some(drafter);
        }
    }

    /// The tokenizer shared by every session.
    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// The codec hidden rows are sent in.
    pub fn codec(&self) -> Codec {
        self.codec
    }

    /// Makes every session started afterwards add `noise` to its uplink rows (`None`: none);
    /// the unsplit baseline has no uplink to add it to.
    pub fn set_uplink_noise(&mut self, noise: Option<UplinkNoise>) -> Result<(), SplitError> {
        if noise.is_some() && matches!(self.parts, Parts::Unsplit(_)) {
            return Err(SplitError::Layout(
                "uplink noise needs a split: the unsplit model sends nothing",
            ));
        }
        self.uplink_noise = noise;
        Ok(())
    }

    /// The noise sessions add to their uplink rows, if any.
    pub fn uplink_noise(&self) -> Option<&UplinkNoise> {
        self.uplink_noise.as_ref()
    }

    /// The split points of a fixed split; `None` for the unsplit baseline and random splits.
    pub fn plan(&self) -> Option<SplitPlan> {
        let policy = self.policy().filter(|p| p.is_fixed())?;
        SplitPlan::new(policy.k1s()[0], policy.k2s()[0], policy.layers()).ok()
    }

    /// The split policy; `None` for the unsplit baseline.
    pub fn policy(&self) -> Option<&SplitPolicy> {
        match &self.parts {
            Parts::Split { policy, .. } => Some(policy),
            Parts::Unsplit(_) => None,
        }
    }

    /// The layers the trunk must hold for this device: the union of every draw's (`[k1, k2)`
    /// of a fixed split).
    pub fn trunk_layers(&self) -> Option<Range<usize>> {
        self.policy().map(SplitPolicy::trunk_layers)
    }

    /// Layers of the whole model.
    pub fn layers(&self) -> usize {
        self.layers
    }

    /// The model's context length in positions.
    pub fn context_length(&self) -> usize {
        self.context_length
    }

    /// The parts loaded on the device.
    pub fn parts(&self) -> Vec<&ModelPart> {
        match &self.parts {
            Parts::Unsplit(whole) => vec![whole],
            Parts::Split { head, tail, .. } => vec![head, tail],
        }
    }

    /// Tokens for a user prompt: wrapped in the model's chat template unless `raw` (or the model
    /// has none), in which case the text is sent as is.
    pub fn prompt_tokens(&self, prompt: &str, raw: bool) -> Result<Vec<u32>, SplitError> {
        let tokens = if raw || self.tokenizer.chat_template().is_none() {
            self.tokenizer
                .encode(prompt, self.tokenizer.add_bos_token())?
        } else {
            let text = self
                .tokenizer
                .apply_chat_template(&[ChatMessage::new("user", prompt)], true)?;
            self.tokenizer.encode(&text, false)?
        };
        if tokens.is_empty() {
            return Err(SplitError::EmptyPrompt);
        }
        Ok(tokens)
    }

    /// Keys for a new session of this split: its policy, `obfuscation` and a fresh secret.
    pub fn new_keys(&self, obfuscation: Obfuscation) -> Result<SessionKeys, SplitError> {
        let policy = self
            .policy()
            .ok_or(SplitError::Layout("an unsplit model takes no trunk"))?;
        Ok(SessionKeys::fresh(policy.clone(), obfuscation))
    }

    /// Starts a generation session of a split model: `trunk` must have been opened with `keys`.
    pub fn session(
        &self,
        trunk: Box<dyn Trunk>,
        keys: &SessionKeys,
    ) -> Result<Session<'_>, SplitError> {
        Session::split(self, trunk, keys)
    }

    /// Starts a session of a split model with fresh keys and a trunk session of `trunk` run in
    /// this process (benchmarks and experiments play the cloud this way).
    pub fn local_session(
        &self,
        trunk: &Arc<ModelPart>,
        obfuscation: Obfuscation,
    ) -> Result<Session<'_>, SplitError> {
        let keys = self.new_keys(obfuscation)?;
        self.session(Box::new(LocalTrunk::new(Arc::clone(trunk), &keys)?), &keys)
    }

    /// Starts a generation session of the unsplit baseline.
    pub fn unsplit_session(&self) -> Result<Session<'_>, SplitError> {
        Session::unsplit(self)
    }
}

/// Builds the tokenizer of a model from where its format keeps it.
pub fn load_tokenizer(source: &lsplit_model::ModelSource) -> Result<Tokenizer, SplitError> {
    Ok(match source.tokenizer_source() {
        lsplit_model::TokenizerSource::Gguf(metadata) => Tokenizer::from_gguf(metadata)?,
        lsplit_model::TokenizerSource::HuggingFace(dir) => Tokenizer::from_hf_dir(dir)?,
    })
}
