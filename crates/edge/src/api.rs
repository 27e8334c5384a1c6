//! OpenAI's request shapes for chat and text completions, and how their settings become a
//! generation: request values override the server's defaults (the `lsplit edge` flags, the
//! same as `lsplit generate`'s), so a request without settings generates what
//! `lsplit generate` generates.

use lsplit_split::{GenerateOptions, SamplingParams};
use lsplit_tokenizer::ChatMessage;
use serde::Deserialize;

use crate::error::ApiError;
use crate::handlers::parse;
use crate::image_request::ImageBody;

/// The API's request bodies, as [`check_body`] reads them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyKind {
    /// `POST /v1/chat/completions`.
    Chat,
    /// `POST /v1/completions`.
    Completion,
    /// `POST /v1/images/generations` and `/lsplit/images/stream`.
    Image,
}

/// Every check of a request body that needs no model, in the order the handlers run them:
/// the JSON shape of `kind`'s request, its messages or prompt, and its settings for a prompt
/// of `prompt_tokens` in a context of `context`. The fuzz targets feed it arbitrary bytes: it
/// must answer an error, never panic.
pub fn check_body(
    kind: BodyKind,
    body: &[u8],
    prompt_tokens: usize,
    context: usize,
) -> Result<(), ApiError> {
    let settings = match kind {
        BodyKind::Chat => {
            let request: ChatRequest = parse(body)?;
            request.conversation()?;
            request.settings
        }
        BodyKind::Completion => {
            let request: CompletionRequest = parse(body)?;
            request.text()?;
            request.settings
        }
        BodyKind::Image => {
            parse::<ImageBody>(body)?;
            return Ok(());
        }
    };
    settings.options(&GenerateOptions::default(), prompt_tokens, context)?;
    settings.stop_sequences()?;
    Ok(())
}

/// The settings chat and text completions share, OpenAI's names first, then llama.cpp's
/// extensions (`top_k`, `repeat_penalty`, `repeat_last_n`) and lsplit's (`lsplit_trace`).
#[derive(Debug, Default, Deserialize)]
pub(crate) struct Settings {
    pub model: Option<String>,
    pub max_tokens: Option<usize>,
    pub max_completion_tokens: Option<usize>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub seed: Option<u64>,
    pub stop: Option<Stop>,
    pub n: Option<u32>,
    pub stream: Option<bool>,
    pub stream_options: Option<StreamOptions>,
    pub presence_penalty: Option<f32>,
    pub frequency_penalty: Option<f32>,
    pub logprobs: Option<serde_json::Value>,
    pub top_k: Option<usize>,
    pub repeat_penalty: Option<f32>,
    pub repeat_last_n: Option<usize>,
    /// Adds per-token timings, bytes and the rows that crossed the wire to the answer.
    pub lsplit_trace: Option<bool>,
}

/// `stop`: one string or up to four.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub(crate) enum Stop {
    One(String),
    Many(Vec<String>),
}

/// `stream_options`.
#[derive(Debug, Default, Deserialize)]
pub(crate) struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

/// `POST /v1/chat/completions`.
#[derive(Debug, Deserialize)]
pub(crate) struct ChatRequest {
    pub messages: Vec<Message>,
    pub tools: Option<Vec<serde_json::Value>>,
    #[serde(flatten)]
    pub settings: Settings,
}

/// One chat message; `content` is a string or a list of text parts.
#[derive(Debug, Deserialize)]
pub(crate) struct Message {
    pub role: String,
    pub content: Option<Content>,
}

/// A message's content.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub(crate) enum Content {
    Text(String),
    Parts(Vec<Part>),
}

/// One part of a multi-part message.
#[derive(Debug, Deserialize)]
pub(crate) struct Part {
    #[serde(rename = "type")]
    pub kind: String,
    pub text: Option<String>,
}

/// `POST /v1/completions`.
#[derive(Debug, Deserialize)]
pub(crate) struct CompletionRequest {
    pub prompt: Prompt,
    pub echo: Option<bool>,
    pub suffix: Option<String>,
    #[serde(flatten)]
    pub settings: Settings,
}

/// `prompt`: a string, or a list holding one string.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub(crate) enum Prompt {
    One(String),
    Many(Vec<String>),
}

/// The most stop sequences a request may give, as in OpenAI's API.
const MAX_STOP_SEQUENCES: usize = 4;

impl ChatRequest {
    /// The conversation for the chat template, after checking what this server supports.
    pub fn conversation(&self) -> Result<Vec<ChatMessage>, ApiError> {
        if self.tools.as_ref().is_some_and(|t| !t.is_empty()) {
            return Err(ApiError::invalid(
                Some("tools"),
                "tools are not supported by lsplit edge",
            ));
        }
        if self.messages.is_empty() {
            return Err(ApiError::invalid(
                Some("messages"),
                "messages must hold at least one message",
            ));
        }
        self.messages
            .iter()
            .map(|m| {
                let content = match &m.content {
                    None => String::new(),
                    Some(Content::Text(text)) => text.clone(),
                    Some(Content::Parts(parts)) => parts
                        .iter()
                        .map(|p| match (p.kind.as_str(), &p.text) {
                            ("text", Some(text)) => Ok(text.as_str()),
                            (kind, _) => Err(ApiError::invalid(
                                Some("messages"),
                                format!(
                                    "message parts of type `{kind}` are not supported: only text"
                                ),
                            )),
                        })
                        .collect::<Result<String, _>>()?,
                };
                Ok(ChatMessage::new(m.role.clone(), content))
            })
            .collect()
    }
}

impl CompletionRequest {
    /// The prompt text, after checking what this server supports.
    pub fn text(&self) -> Result<&str, ApiError> {
        if self.echo == Some(true) {
            return Err(ApiError::invalid(Some("echo"), "echo is not supported"));
        }
        if self.suffix.as_ref().is_some_and(|s| !s.is_empty()) {
            return Err(ApiError::invalid(Some("suffix"), "suffix is not supported"));
        }
        match &self.prompt {
            Prompt::One(text) => Ok(text),
            Prompt::Many(texts) if texts.len() == 1 => Ok(&texts[0]),
            Prompt::Many(_) => Err(ApiError::invalid(
                Some("prompt"),
                "prompt must be one string (batches of prompts are not supported)",
            )),
        }
    }
}

impl Settings {
    /// Whether to answer with Server-Sent Events.
    pub fn stream(&self) -> bool {
        self.stream.unwrap_or(false)
    }

    /// Whether the stream ends with a usage chunk.
    pub fn include_usage(&self) -> bool {
        self.stream_options
            .as_ref()
            .is_some_and(|o| o.include_usage)
    }

    /// Whether to add lsplit's per-token trace.
    pub fn trace(&self) -> bool {
        self.lsplit_trace.unwrap_or(false)
    }

    /// The stop sequences, checked.
    pub fn stop_sequences(&self) -> Result<Vec<String>, ApiError> {
        let stops = match &self.stop {
            None => Vec::new(),
            Some(Stop::One(s)) => vec![s.clone()],
            Some(Stop::Many(many)) => many.clone(),
        };
        if stops.len() > MAX_STOP_SEQUENCES {
            return Err(ApiError::invalid(
                Some("stop"),
                format!("at most {MAX_STOP_SEQUENCES} stop sequences are allowed"),
            ));
        }
        if stops.iter().any(String::is_empty) {
            return Err(ApiError::invalid(
                Some("stop"),
                "stop sequences must not be empty",
            ));
        }
        Ok(stops)
    }

    /// The generation options: the request's values over `defaults`, checked, with
    /// `max_tokens` fitted to what the context leaves after `prompt_tokens` (the default) or
    /// refused when the request asks for more.
    pub fn options(
        &self,
        defaults: &GenerateOptions,
        prompt_tokens: usize,
        context: usize,
    ) -> Result<GenerateOptions, ApiError> {
        if self.n.is_some_and(|n| n != 1) {
            return Err(ApiError::invalid(
                Some("n"),
                "n must be 1: lsplit edge generates one choice per request",
            ));
        }
        for (param, value) in [
            ("presence_penalty", self.presence_penalty),
            ("frequency_penalty", self.frequency_penalty),
        ] {
            if value.is_some_and(|v| v != 0.0) {
                return Err(ApiError::invalid(
                    Some(param),
                    format!("{param} is not supported; use repeat_penalty"),
                ));
            }
        }
        if self
            .logprobs
            .as_ref()
            .is_some_and(|v| !v.is_null() && *v != serde_json::Value::Bool(false))
        {
            return Err(ApiError::invalid(
                Some("logprobs"),
                "logprobs are not supported",
            ));
        }
        let d = &defaults.sampling;
        let temperature = self.temperature.unwrap_or(d.temperature);
        if !(temperature >= 0.0 && temperature.is_finite()) {
            return Err(ApiError::invalid(
                Some("temperature"),
                "temperature must be a finite number >= 0",
            ));
        }
        let top_p = self.top_p.or(d.top_p);
        if top_p.is_some_and(|p| !(p > 0.0 && p <= 1.0)) {
            return Err(ApiError::invalid(Some("top_p"), "top_p must be in (0, 1]"));
        }
        let repetition_penalty = self.repeat_penalty.unwrap_or(d.repetition_penalty);
        if !(repetition_penalty > 0.0 && repetition_penalty.is_finite()) {
            return Err(ApiError::invalid(
                Some("repeat_penalty"),
                "repeat_penalty must be a positive number",
            ));
        }
        let sampling = SamplingParams {
            temperature,
            top_k: self.top_k.or(d.top_k),
            top_p,
            repetition_penalty,
            repeat_last_n: self.repeat_last_n.unwrap_or(d.repeat_last_n),
            seed: self.seed.unwrap_or(d.seed),
        };
        let left = context.saturating_sub(prompt_tokens);
        let max_tokens = match self.max_completion_tokens.or(self.max_tokens) {
            Some(0) => {
                return Err(ApiError::invalid(
                    Some("max_tokens"),
                    "max_tokens must be at least 1",
                ));
            }
            // Compared without adding: a count near usize::MAX must not wrap past the check.
            Some(asked) if asked > left || prompt_tokens > context => {
                return Err(context_exceeded(context, prompt_tokens, asked));
            }
            Some(asked) => asked,
            None if left == 0 => {
                return Err(context_exceeded(context, prompt_tokens, 1));
            }
            None => defaults.max_tokens.min(left),
        };
        Ok(GenerateOptions {
            max_tokens,
            sampling,
            speculate: defaults.speculate,
            ..GenerateOptions::default()
        })
    }
}

/// OpenAI's error for a prompt plus completion longer than the context.
fn context_exceeded(context: usize, prompt: usize, completion: usize) -> ApiError {
    ApiError {
        code: Some("context_length_exceeded"),
        ..ApiError::invalid(
            Some("messages"),
            format!(
                "This model's maximum context length is {context} tokens. However, you \
                 requested {} tokens ({prompt} in the messages, {completion} in the \
                 completion). Please reduce the length of the messages or completion.",
                prompt as u128 + completion as u128
            ),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(json: &str) -> Settings {
        serde_json::from_str(json).expect("settings")
    }

    #[test]
    fn request_values_override_the_defaults() {
        let defaults = GenerateOptions::default();
        let options = settings(r#"{"temperature": 0.7, "seed": 5, "top_k": 40}"#)
            .options(&defaults, 10, 100)
            .expect("options");
        assert_eq!(options.sampling.temperature, 0.7);
        assert_eq!(options.sampling.seed, 5);
        assert_eq!(options.sampling.top_k, Some(40));
        assert_eq!(options.sampling.top_p, None);
        assert_eq!(
            options.max_tokens, 90,
            "the default is fitted to the context"
        );
        let options = settings("{}")
            .options(&defaults, 10, 1000)
            .expect("options");
        assert_eq!(options, defaults);
    }

    #[test]
    fn max_tokens_beyond_the_context_is_refused() {
        let error = settings(r#"{"max_tokens": 95}"#)
            .options(&GenerateOptions::default(), 10, 100)
            .expect_err("too long");
        assert_eq!(error.status, 400);
        assert_eq!(error.code, Some("context_length_exceeded"));
        assert_eq!(
            error.message,
            "This model's maximum context length is 100 tokens. However, you requested 105 \
             tokens (10 in the messages, 95 in the completion). Please reduce the length of \
             the messages or completion."
        );
        assert!(
            settings(r#"{"max_completion_tokens": 90}"#)
                .options(&GenerateOptions::default(), 10, 100)
                .is_ok()
        );
    }

    #[test]
    fn unsupported_settings_name_their_parameter() {
        let defaults = GenerateOptions::default();
        for (json, param) in [
            (r#"{"n": 2}"#, "n"),
            (r#"{"temperature": -1}"#, "temperature"),
            (r#"{"top_p": 0}"#, "top_p"),
            (r#"{"presence_penalty": 0.5}"#, "presence_penalty"),
            (r#"{"logprobs": true}"#, "logprobs"),
            (r#"{"max_tokens": 0}"#, "max_tokens"),
        ] {
            let error = settings(json).options(&defaults, 1, 100).expect_err(json);
            assert_eq!(error.param, Some(param), "{json}");
            assert_eq!(error.status, 400, "{json}");
        }
        let stops = settings(r#"{"stop": ["a", "b", "c", "d", "e"]}"#).stop_sequences();
        assert_eq!(stops.expect_err("five stops").param, Some("stop"));
        let stops = settings(r#"{"stop": "\n\n"}"#).stop_sequences();
        assert_eq!(stops.expect("one stop"), vec!["\n\n".to_string()]);
    }

    #[test]
    fn chat_content_may_be_text_parts() {
        let request: ChatRequest = serde_json::from_str(
            r#"{"messages": [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": [{"type": "text", "text": "Hi "},
                                             {"type": "text", "text": "there"}]}]}"#,
        )
        .expect("request");
        assert_eq!(
            request.conversation().expect("conversation"),
            vec![
                ChatMessage::new("system", "Be brief."),
                ChatMessage::new("user", "Hi there")
            ]
        );
        let request: ChatRequest = serde_json::from_str(
            r#"{"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}"#,
        )
        .expect("request");
        let error = request.conversation().expect_err("image part");
        assert!(error.message.contains("`image_url`"), "{}", error.message);
    }
}
