//! The API key: when one is set, every API request must carry `Authorization: Bearer KEY`.

use std::sync::Arc;

use axum::extract::{Request, State as Shared};
use axum::http::header::AUTHORIZATION;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use subtle::ConstantTimeEq;

use crate::State;
use crate::error::ApiError;

/// Lets the request through when no key is set or it carries the key (compared in constant
/// time); answers 401 in OpenAI's shape otherwise.
pub(crate) async fn require_key(
    Shared(state): Shared<Arc<State>>,
    request: Request,
    next: Next,
) -> Response {
    let Some(key) = &state.api_key else {
        return next.run(request).await;
    };
    let sent = request
        .headers()
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    match sent {
        None => ApiError::unauthorized(
            "You didn't provide an API key. You need to provide your API key in an \
             Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).",
            None,
        )
        .into_response(),
        Some(sent) if bool::from(sent.as_bytes().ct_eq(key.as_bytes())) => next.run(request).await,
        Some(_) => ApiError::unauthorized("Incorrect API key provided.", Some("invalid_api_key"))
            .into_response(),
    }
}
