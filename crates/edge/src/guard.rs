//! What a local server must check before anything else, because any web page the user opens
//! can send requests to it: the `Host` header (against DNS rebinding), the `Origin` of browser
//! requests (against other sites), and the `Content-Type` of API requests (a cross-site form
//! or a no-preflight `fetch` can only send `text/plain` and form types). llama.cpp's server
//! and ollama check the same.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use axum::extract::{Request, State as Shared};
use axum::http::header::{
    ACCESS_CONTROL_ALLOW_HEADERS, ACCESS_CONTROL_ALLOW_METHODS, ACCESS_CONTROL_ALLOW_ORIGIN,
    ACCESS_CONTROL_MAX_AGE, CONTENT_TYPE, HOST, ORIGIN, VARY,
};
use axum::http::{HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use crate::State;
use crate::error::ApiError;

/// Who may talk to the edge besides its own page: `lsplit edge`'s `--allowed-host` and
/// `--cors-origin`, and the address it listens on.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EdgeGuard {
    /// The address the server listens on; its IP may be named in `Host`. Loopback names (`localhost`, `127.0.0.1`, `[::1]`) are always allowed
    /// for a loopback or unspecified address.
    pub listen: Option<SocketAddr>,
    /// Other names `Host` may carry (`--allowed-host`), with or without a port.
    pub allowed_hosts: Vec<String>,
    /// Origins of other sites whose pages may call the API (`--cors-origin`), e.g.
    /// `http://localhost:3000`; `*` allows every origin.
    pub cors_origins: Vec<String>,
}

impl EdgeGuard {
    /// Whether a request's `Host` (`name` or `name:port`) names this server.
    fn host_allowed(&self, host: &str) -> bool {
        let host = host.to_ascii_lowercase();
        if self.allowed_hosts.iter().any(|allowed| {
            allowed.eq_ignore_ascii_case(&host) || allowed.eq_ignore_ascii_case(name(&host))
        }) {
            return true;
        }
        let name = name(&host);
        let ip = name
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<IpAddr>()
            .ok();
        let listen = self.listen.map(|a| a.ip());
        let local = listen.is_none_or(|ip| ip.is_loopback() || ip.is_unspecified());
        match ip {
            Some(ip) => {
                ip.is_loopback() && local
                    || Some(ip) == listen
                    || listen.is_some_and(|l| l.is_unspecified())
            }
            None => name == "localhost" && local,
        }
    }

    /// Whether a browser page from `origin` may call the API, given the request's `host`: its
    /// own page (same scheme-less authority) always, others when `--cors-origin` names them.
    fn origin_allowed(&self, origin: &str, host: Option<&str>) -> bool {
        let own = origin
            .strip_prefix("http://")
            .or_else(|| origin.strip_prefix("https://"))
            .is_some_and(|authority| host.is_some_and(|h| h.eq_ignore_ascii_case(authority)));
        own || self.cross_origin_allowed(origin)
    }

    fn cross_origin_allowed(&self, origin: &str) -> bool {
        self.cors_origins
            .iter()
            .any(|allowed| allowed == "*" || allowed.eq_ignore_ascii_case(origin))
    }
}

/// The name part of a `Host` value (`[::1]:8080` -> `[::1]`, `a.b:80` -> `a.b`).
fn name(host: &str) -> &str {
    match host.rfind(':') {
        Some(i) if !host[i..].contains(']') => &host[..i],
        _ => host,
    }
}

/// A 403 for a request from where this server does not answer.
fn forbidden(message: String, code: &'static str) -> ApiError {
    ApiError {
        status: StatusCode::FORBIDDEN,
        message,
        kind: "invalid_request_error",
        param: None,
        code: Some(code),
    }
}

/// Whether `path` is an API endpoint (the page's assets are not).
fn is_api(path: &str) -> bool {
    path.starts_with("/v1/") || path.starts_with("/lsplit/")
}

/// Checks `Host`, `Origin` and (for API requests with a body) `Content-Type`; answers a CORS
/// preflight from an allowed origin, and marks the answers to it.
pub(crate) async fn check(
    Shared(state): Shared<Arc<State>>,
    request: Request,
    next: Next,
) -> Response {
    let guard = &state.guard;
    let headers = request.headers();
    let host = headers.get(HOST).and_then(|v| v.to_str().ok());
    if let Some(host) = host
        && !guard.host_allowed(host)
    {
        return forbidden(
            format!(
                "the Host header `{}` does not name this server; start lsplit edge with \
                 --allowed-host NAME to answer to another name",
                truncated(host)
            ),
            "host_not_allowed",
        )
        .into_response();
    }
    let origin = match headers.get(ORIGIN).map(|v| v.to_str()) {
        None => None,
        Some(Ok(origin)) if guard.origin_allowed(origin, host) => Some(origin.to_string()),
        Some(origin) => {
            let origin = origin.unwrap_or("(not text)");
            return forbidden(
                format!(
                    "requests from pages of `{}` are refused; start lsplit edge with \
                     --cors-origin ORIGIN to allow that site",
                    truncated(origin)
                ),
                "origin_not_allowed",
            )
            .into_response();
        }
    };
    let cross = origin.filter(|o| guard.cross_origin_allowed(o));
    if request.method() == Method::OPTIONS && cross.is_some() {
        let mut response = StatusCode::NO_CONTENT.into_response();
        allow(&mut response, cross.as_deref());
        let headers = response.headers_mut();
        headers.insert(
            ACCESS_CONTROL_ALLOW_METHODS,
            HeaderValue::from_static("GET, POST"),
        );
        headers.insert(
            ACCESS_CONTROL_ALLOW_HEADERS,
            HeaderValue::from_static("authorization, content-type"),
        );
        headers.insert(ACCESS_CONTROL_MAX_AGE, HeaderValue::from_static("600"));
        return response;
    }
    if request.method() == Method::POST && is_api(request.uri().path()) {
        let content_type = request
            .headers()
            .get(CONTENT_TYPE)
            .map(|v| v.to_str().unwrap_or("(not text)"));
        let json = content_type.is_some_and(|t| {
            t.split(';')
                .next()
                .is_some_and(|essence| essence.trim().eq_ignore_ascii_case("application/json"))
        });
        if !json {
            return ApiError {
                status: StatusCode::UNSUPPORTED_MEDIA_TYPE,
                message: format!(
                    "the request body must be JSON sent as Content-Type: application/json (got \
                     {})",
                    content_type
                        .map_or("no Content-Type".into(), |t| format!("`{}`", truncated(t)))
                ),
                kind: "invalid_request_error",
                param: None,
                code: Some("unsupported_media_type"),
            }
            .into_response();
        }
    }
    let mut response = next.run(request).await;
    allow(&mut response, cross.as_deref());
    response
}

/// Lets the page of `origin` (an allowed other site) read `response`.
fn allow(response: &mut Response, origin: Option<&str>) {
    let Some(value) = origin.and_then(|o| HeaderValue::from_str(o).ok()) else {
        return;
    };
    let headers = response.headers_mut();
    headers.insert(ACCESS_CONTROL_ALLOW_ORIGIN, value);
    headers.append(VARY, HeaderValue::from_static("Origin"));
}

/// At most 100 bytes of a header quoted in an error.
fn truncated(text: &str) -> &str {
    let mut end = text.len().min(100);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_name_the_listen_address_or_an_allowed_name() {
        let guard = EdgeGuard {
            listen: Some("127.0.0.1:8080".parse().expect("addr")),
            allowed_hosts: vec!["edge.lan".into()],
            cors_origins: vec![],
        };
        for host in [
            "127.0.0.1:8080",
            "localhost:8080",
            "[::1]:8080",
            "EDGE.lan:8080",
            "edge.lan",
        ] {
            assert!(guard.host_allowed(host), "{host}");
        }
        for host in [
            "evil.example",
            "evil.example:8080",
            "10.0.0.1:8080",
            "localhost.evil:80",
        ] {
            assert!(!guard.host_allowed(host), "{host}");
        }
        let public = EdgeGuard {
            listen: Some("192.168.1.5:8080".parse().expect("addr")),
            ..EdgeGuard::default()
        };
        assert!(public.host_allowed("192.168.1.5:8080"));
        assert!(!public.host_allowed("localhost:8080"));
    }

    #[test]
    fn origins_are_the_page_itself_or_allowed_sites() {
        let guard = EdgeGuard {
            cors_origins: vec!["http://localhost:3000".into()],
            ..EdgeGuard::default()
        };
        let host = Some("127.0.0.1:8080");
        assert!(guard.origin_allowed("http://127.0.0.1:8080", host));
        assert!(guard.origin_allowed("http://localhost:3000", host));
        assert!(!guard.origin_allowed("http://evil.example", host));
        assert!(!guard.origin_allowed("null", host));
    }
}
