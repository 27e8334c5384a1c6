//! Renders Hugging Face chat templates with minijinja.

use minijinja::{Environment, Error, ErrorKind, Value, context};

use crate::{ChatMessage, TokenizerError};

/// Renders `source` like transformers' `apply_chat_template`: jinja2 with `trim_blocks` and
/// `lstrip_blocks`, `raise_exception`, and Python string methods through minijinja-contrib.
pub(crate) fn render(
    source: &str,
    messages: &[ChatMessage],
    add_generation_prompt: bool,
    bos_token: Option<&str>,
    eos_token: Option<&str>,
) -> Result<String, TokenizerError> {
    let mut env = Environment::new();
    env.set_trim_blocks(true);
    env.set_lstrip_blocks(true);
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_function("raise_exception", raise_exception);
    let template = env.template_from_named_str("chat_template", source)?;
    // A token the model lacks is undefined (renders empty), as in transformers, not `none`.
    let token = |text: Option<&str>| text.map_or(Value::UNDEFINED, Value::from);
    Ok(template.render(context! {
        messages,
        add_generation_prompt,
        bos_token => token(bos_token),
        eos_token => token(eos_token),
    })?)
}

/// Templates call `raise_exception("...")` to reject conversations they cannot format.
fn raise_exception(message: String) -> Result<(), Error> {
    Err(Error::new(ErrorKind::InvalidOperation, message))
}
