//! Loads a tokenizer from a Hugging Face model directory.

use std::path::{Path, PathBuf};

use serde_json::Value as Json;

use crate::{Parts, TokenizerError};

/// Loads `tokenizer.json` and the optional configuration files next to it.
pub(crate) fn load(dir: &Path) -> Result<Parts, TokenizerError> {
    let tokenizer_path = dir.join("tokenizer.json");
    let bytes = read(&tokenizer_path)?;
    let inner: tokenizers::Tokenizer =
        serde_json::from_slice(&bytes).map_err(|source| TokenizerError::Json {
            path: tokenizer_path,
            source,
        })?;
    let config_path = dir.join("tokenizer_config.json");
    let config = read_optional_json(&config_path)?.unwrap_or(Json::Null);
    let generation_path = dir.join("generation_config.json");
    let generation = read_optional_json(&generation_path)?.unwrap_or(Json::Null);

    let lookup = |field: &str| -> Result<Option<u32>, TokenizerError> {
        let Some(text) = token_text(&config, field, &config_path)? else {
            return Ok(None);
        };
        let id = inner.token_to_id(&text);
        if id.is_none() {
            tracing::warn!(
                field,
                text,
                "special token of tokenizer_config.json is not in the vocabulary"
            );
        }
        Ok(id)
    };
    let generation_eos = ids(&generation, "eos_token_id", &generation_path)?;
    let bos = match lookup("bos_token")? {
        Some(id) => Some(id),
        None => ids(&generation, "bos_token_id", &generation_path)?
            .first()
            .copied(),
    };
    let eos = lookup("eos_token")?.or_else(|| generation_eos.first().copied());

    let add_bos = match config.get("add_bos_token") {
        Some(Json::Bool(add)) => *add,
        Some(other) => {
            return Err(TokenizerError::HfConfig {
                path: config_path,
                message: format!("`add_bos_token` should be a boolean, found {other}"),
            });
        }
        // Without the flag, the post-processor (e.g. Llama 3's template) says whether BOS is added.
        None => {
            let with_special = inner
                .encode_fast("", true)
                .map_err(TokenizerError::Encode)?;
            bos.is_some() && with_special.get_ids().first() == bos.as_ref()
        }
    };

    let chat_template = match chat_template(&config, &config_path)? {
        Some(template) => Some(template),
        None => read_optional(&dir.join("chat_template.jinja"))?,
    };
    let text_of = |field: &str, id: Option<u32>| -> Result<Option<String>, TokenizerError> {
        Ok(token_text(&config, field, &config_path)?
            .or_else(|| id.and_then(|id| inner.id_to_token(id))))
    };
    let bos_text = text_of("bos_token", bos)?;
    let eos_text = text_of("eos_token", eos)?;
    let vocab_size = inner
        .get_vocab(true)
        .into_values()
        .max()
        .map_or(0, |max| max as usize + 1);

    Ok(Parts {
        vocab_size,
        bos,
        eos,
        declared_eog: generation_eos,
        add_bos,
        chat_template,
        bos_text,
        eos_text,
        inner,
    })
}

fn read(path: &Path) -> Result<Vec<u8>, TokenizerError> {
    std::fs::read(path).map_err(|source| TokenizerError::Io {
        path: path.to_owned(),
        source,
    })
}

fn read_optional(path: &Path) -> Result<Option<String>, TokenizerError> {
    match std::fs::read_to_string(path) {
        Ok(text) => Ok(Some(text)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(TokenizerError::Io {
            path: path.to_owned(),
            source,
        }),
    }
}

fn read_optional_json(path: &Path) -> Result<Option<Json>, TokenizerError> {
    read_optional(path)?
        .map(|text| {
            serde_json::from_str(&text).map_err(|source| TokenizerError::Json {
                path: path.to_owned(),
                source,
            })
        })
        .transpose()
}

fn unexpected(path: &Path, message: String) -> TokenizerError {
    TokenizerError::HfConfig {
        path: PathBuf::from(path),
        message,
    }
}

/// A special token of tokenizer_config.json: a string, an `AddedToken` object with `content`, or
/// null.
fn token_text(config: &Json, field: &str, path: &Path) -> Result<Option<String>, TokenizerError> {
    match config.get(field) {
        None | Some(Json::Null) => Ok(None),
        Some(Json::String(text)) => Ok(Some(text.clone())),
        Some(Json::Object(token)) => match token.get("content") {
            Some(Json::String(text)) => Ok(Some(text.clone())),
            _ => Err(unexpected(
                path,
                format!("`{field}` is an object without a string `content`"),
            )),
        },
        Some(other) => Err(unexpected(
            path,
            format!("`{field}` should be a string or a token object, found {other}"),
        )),
    }
}

/// Token ids of generation_config.json: one integer, a list of them, or null.
fn ids(config: &Json, field: &str, path: &Path) -> Result<Vec<u32>, TokenizerError> {
    let one = |value: &Json| {
        value
            .as_u64()
            .and_then(|id| u32::try_from(id).ok())
            .ok_or_else(|| {
                unexpected(
                    path,
                    format!("`{field}` should hold token ids, found {value}"),
                )
            })
    };
    match config.get(field) {
        None | Some(Json::Null) => Ok(Vec::new()),
        Some(Json::Array(values)) => values.iter().map(one).collect(),
        Some(value) => one(value).map(|id| vec![id]),
    }
}

/// The chat template of tokenizer_config.json: a string, or a list of named templates of which
/// the one named `default` (else the first) is used.
fn chat_template(config: &Json, path: &Path) -> Result<Option<String>, TokenizerError> {
    match config.get("chat_template") {
        None | Some(Json::Null) => Ok(None),
        Some(Json::String(template)) => Ok(Some(template.clone())),
        Some(Json::Array(named)) => {
            let template_of = |entry: &Json| {
                entry
                    .get("template")
                    .and_then(Json::as_str)
                    .map(str::to_owned)
            };
            let default = named
                .iter()
                .find(|entry| entry.get("name").and_then(Json::as_str) == Some("default"))
                .or_else(|| named.first());
            match default {
                None => Ok(None),
                Some(entry) => template_of(entry).map(Some).ok_or_else(|| {
                    unexpected(
                        path,
                        "`chat_template` list entry has no string `template`".to_owned(),
                    )
                }),
            }
        }
        Some(other) => Err(unexpected(
            path,
            format!("`chat_template` should be a string or a list, found {other}"),
        )),
    }
}
