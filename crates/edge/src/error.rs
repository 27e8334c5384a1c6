//! Errors: the API's, in OpenAI's JSON shape with an HTTP status, and the server's own.

use std::net::SocketAddr;

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use lsplit_device::DeviceError;
use lsplit_split::SplitError;
use serde::Serialize;

/// Errors starting the edge server.
#[derive(Debug, thiserror::Error)]
pub enum EdgeError {
    /// Anyone who can reach a non-loopback address could use the model: a key is required.
    #[error(
        "listening on {0} exposes the API beyond this machine: pass --api-key KEY (clients send \
         `Authorization: Bearer KEY`), or listen on 127.0.0.1"
    )]
    ApiKeyRequired(SocketAddr),
    /// An empty key would let every client in.
    #[error("the API key is empty")]
    EmptyApiKey,
    /// Serving failed.
    #[error("serving HTTP: {0}")]
    Io(#[from] std::io::Error),
}

/// An API error: an HTTP status and OpenAI's `{"error": {message, type, param, code}}` body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    /// The HTTP status.
    pub status: StatusCode,
    /// What went wrong, for people.
    pub message: String,
    /// OpenAI's error type: `invalid_request_error`, `authentication_error`, `server_error`...
    pub kind: &'static str,
    /// The request field at fault, if one is.
    pub param: Option<&'static str>,
    /// A machine-readable code, e.g. `model_not_found`.
    pub code: Option<&'static str>,
}

#[derive(Serialize)]
struct Body<'a> {
    error: Detail<'a>,
}

#[derive(Serialize)]
struct Detail<'a> {
    message: &'a str,
    #[serde(rename = "type")]
    kind: &'a str,
    param: Option<&'a str>,
    code: Option<&'a str>,
}

impl ApiError {
    /// A 400 for a request that cannot be served as asked.
    pub fn invalid(param: Option<&'static str>, message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            kind: "invalid_request_error",
            param,
            code: None,
        }
    }

    /// A 400 for a body that is not JSON or not the expected shape.
    pub fn malformed(error: &serde_json::Error) -> Self {
        let message = if error.is_syntax() || error.is_eof() {
            format!("could not parse the JSON body of the request: {error}")
        } else {
            format!("invalid request body: {error}")
        };
        Self::invalid(None, message)
    }

    /// A 404 for a model this server does not serve.
    pub fn model_not_found(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::NOT_FOUND,
            message: message.into(),
            kind: "invalid_request_error",
            param: Some("model"),
            code: Some("model_not_found"),
        }
    }

    /// A 401 for a missing or wrong API key.
    pub fn unauthorized(message: impl Into<String>, code: Option<&'static str>) -> Self {
        Self {
            status: StatusCode::UNAUTHORIZED,
            message: message.into(),
            kind: "invalid_request_error",
            param: None,
            code,
        }
    }

    /// A 429 when every session slot is taken.
    pub fn busy(max_sessions: usize) -> Self {
        Self {
            status: StatusCode::TOO_MANY_REQUESTS,
            message: format!(
                "all {max_sessions} generation sessions are busy; retry when one finishes"
            ),
            kind: "rate_limit_error",
            param: None,
            code: Some("rate_limit_exceeded"),
        }
    }

    /// A 404 for a path the API does not have.
    pub fn no_route(method: &str, path: &str) -> Self {
        Self {
            status: StatusCode::NOT_FOUND,
            message: format!("no such endpoint: {method} {path}"),
            kind: "invalid_request_error",
            param: None,
            code: Some("unknown_url"),
        }
    }

    /// The error's JSON body.
    pub fn body(&self) -> String {
        let body = Body {
            error: Detail {
                message: &self.message,
                kind: self.kind,
                param: self.param,
                code: self.code,
            },
        };
        serde_json::to_string(&body).unwrap_or_else(|_| String::from("{}"))
    }
}

impl From<SplitError> for ApiError {
    /// The trunk failing is a bad gateway (502); anything else failing on the device is a 500.
    fn from(error: SplitError) -> Self {
        let status = match error {
            SplitError::Trunk(_) => StatusCode::BAD_GATEWAY,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        Self {
            status,
            message: error.to_string(),
            kind: "server_error",
            param: None,
            code: None,
        }
    }
}

impl From<DeviceError> for ApiError {
    /// A trunk session that cannot be opened is a bad gateway (502), as a failing trunk is.
    fn from(error: DeviceError) -> Self {
        match error {
            DeviceError::Split(e) => e.into(),
            DeviceError::Trunk(e) => SplitError::Trunk(e).into(),
            e => Self {
                status: StatusCode::INTERNAL_SERVER_ERROR,
                message: e.to_string(),
                kind: "server_error",
                param: None,
                code: None,
            },
        }
    }
}

/// Seconds a 429 asks the client to wait (`Retry-After`) before it tries again.
pub const RETRY_AFTER_SECS: u32 = 1;

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (
            self.status,
            [(header::CONTENT_TYPE, "application/json")],
            self.body(),
        )
            .into_response();
        if self.status == StatusCode::TOO_MANY_REQUESTS {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(RETRY_AFTER_SECS));
        }
        response
    }
}
