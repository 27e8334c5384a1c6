//! Prompt to text conditioning, as the diffusers pipelines build it: SD 1.x/2.x take the final
//! hidden states of one CLIP encoder; SDXL concatenates the penultimate hidden states of two
//! encoders and adds the second one's pooled projection.

use candle_core::{D, DType, Device, Tensor};
use candle_nn::VarBuilder;

use crate::clip::{ClipConfig, ClipTextModel};
use crate::clip_tokenizer::ClipTokenizer;
use crate::error::DiffusionError;
use crate::model_dir::{Family, ModelDir};

/// One tokenizer and its encoder.
struct Encoder {
    tokenizer: ClipTokenizer,
    model: ClipTextModel,
}

impl Encoder {
    fn load(
        dir: &ModelDir,
        tokenizer_dir: &str,
        encoder: &str,
        with_projection: bool,
        device: &Device,
    ) -> Result<Self, DiffusionError> {
        let tokenizer = ClipTokenizer::from_dir(&dir.root.join(tokenizer_dir))?;
        let config: ClipConfig = dir.config(encoder, "config.json")?;
        let file = dir.weights(encoder)?;
        // SAFETY: the weights file is memory-mapped read-only and not modified while mapped.
        let vb = unsafe { VarBuilder::from_mmaped_safetensors(&[&file], DType::F32, device) }
            .map_err(|e| DiffusionError::Weights {
                file: file.display().to_string(),
                message: e.to_string(),
            })?;
        let model = ClipTextModel::load(vb, &config, with_projection, &file.display().to_string())?;
        if tokenizer.max_length() > config.max_position_embeddings {
            return Err(DiffusionError::Config(format!(
                "{}: model_max_length {} exceeds the encoder's {} positions",
                dir.root.join(tokenizer_dir).display(),
                tokenizer.max_length(),
                config.max_position_embeddings
            )));
        }
        Ok(Self { tokenizer, model })
    }

    fn ids(&self, text: &str, device: &Device) -> Result<Tensor, DiffusionError> {
        let ids = self.tokenizer.encode_padded(text)?;
        Ok(Tensor::new(ids.as_slice(), device)?.unsqueeze(0)?)
    }
}

/// The prompt's conditioning for one image, ready for the UNet.
#[derive(Debug, Clone)]
pub struct PromptEmbeddings {
    /// `[1, tokens, cross_attention_dim]` for the prompt.
    pub prompt: Tensor,
    /// The same for the negative prompt (or the empty prompt).
    pub negative: Tensor,
    /// SDXL: pooled projections `[1, width]` of the prompt and the negative prompt.
    pub pooled: Option<(Tensor, Tensor)>,
}

/// The text encoders of a pipeline.
pub struct TextEncoders {
    family: Family,
    force_zeros_for_empty_prompt: bool,
    first: Encoder,
    second: Option<Encoder>,
}

impl TextEncoders {
    /// Loads the tokenizers and text encoders the family needs.
    pub fn load(dir: &ModelDir, device: &Device) -> Result<Self, DiffusionError> {
        let first = Encoder::load(dir, "tokenizer", "text_encoder", false, device)?;
        let second = match dir.family {
            Family::StableDiffusion => None,
            Family::StableDiffusionXl => Some(Encoder::load(
                dir,
                "tokenizer_2",
                "text_encoder_2",
                true,
                device,
            )?),
        };
        Ok(Self {
            family: dir.family,
            force_zeros_for_empty_prompt: dir.force_zeros_for_empty_prompt,
            first,
            second,
        })
    }

    /// Encodes the prompt and the negative prompt (`None`: the empty prompt, or zeros for SDXL).
    pub fn encode(
        &self,
        prompt: &str,
        negative: Option<&str>,
        device: &Device,
    ) -> Result<PromptEmbeddings, DiffusionError> {
        match (&self.family, &self.second) {
            (Family::StableDiffusionXl, Some(second)) => {
                let (prompt_embeds, pooled) = self.encode_xl(second, prompt, device)?;
                let (negative_embeds, negative_pooled) =
                    if negative.is_none() && self.force_zeros_for_empty_prompt {
                        (prompt_embeds.zeros_like()?, pooled.zeros_like()?)
                    } else {
                        self.encode_xl(second, negative.unwrap_or(""), device)?
                    };
                Ok(PromptEmbeddings {
                    prompt: prompt_embeds,
                    negative: negative_embeds,
                    pooled: Some((pooled, negative_pooled)),
                })
            }
            _ => {
                let encode = |text: &str| -> Result<Tensor, DiffusionError> {
                    Ok(self
                        .first
                        .model
                        .forward(&self.first.ids(text, device)?)?
                        .last)
                };
                Ok(PromptEmbeddings {
                    prompt: encode(prompt)?,
                    negative: encode(negative.unwrap_or(""))?,
                    pooled: None,
                })
            }
        }
    }

    fn encode_xl(
        &self,
        second: &Encoder,
        text: &str,
        device: &Device,
    ) -> Result<(Tensor, Tensor), DiffusionError> {
        let one = self.first.model.forward(&self.first.ids(text, device)?)?;
        let two = second.model.forward(&second.ids(text, device)?)?;
        let pooled = two.pooled.ok_or_else(|| {
            DiffusionError::Config("text_encoder_2 has no text_projection".into())
        })?;
        let embeds = Tensor::cat(&[&one.penultimate, &two.penultimate], D::Minus1)?;
        Ok((embeds, pooled))
    }
}
