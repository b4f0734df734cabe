//! HTTP replies, written by us rather than by dbs-uhttp, byte for byte as micro_http writes
//! them.
//!
//! dbs-uhttp parses requests (and receives `SCM_RIGHTS` fds) well, but its `StatusCode` is a
//! closed enum of 11 codes without 409 Conflict, and its own parse-error replies are not valid
//! JSON. So the server uses dbs-uhttp's `HttpConnection` for reading only and renders replies
//! here. The wire is micro_http's, because Cloud Hypervisor's client (`ch-remote`,
//! `api_client`) parses exactly that:
//! - the status line is `HTTP/1.1 NNN ` with no reason phrase (the client reads everything
//!   after `HTTP/1.1 ` up to the CR as the number);
//! - headers `Server`, `Connection`, `Allow` (405 only), then `Content-Type` and
//!   `Content-Length` only when there is a body (the client reads `Content-Length: ` spelled
//!   so, and without it takes the reply to end with the headers);
//! - error bodies are a JSON array of strings, the message first, then its causes;
//! - every body is ASCII: the client reads 256-byte chunks and converts each to UTF-8 on its
//!   own, so a multi-byte character split across two chunks would make it fail. Non-ASCII
//!   characters in JSON strings are written as `\uXXXX` escapes.

use serde::Serialize;

use crate::types::ErrorBody;

/// Writes `json` (serde_json's output) with every non-ASCII character as a `\uXXXX` escape
/// (UTF-16 surrogate pairs above U+FFFF). serde_json only emits non-ASCII inside strings, so
/// the result is the same JSON value.
pub fn ascii_json(json: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(json.len());
    for c in json.chars() {
        if c.is_ascii() {
            out.push(c as u8);
        } else {
            let mut units = [0u16; 2];
            for u in c.encode_utf16(&mut units) {
                out.extend_from_slice(format!("\\u{u:04x}").as_bytes());
            }
        }
    }
    out
}

/// The status codes the API replies with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HttpStatus {
    /// 200.
    Ok,
    /// 204.
    NoContent,
    /// 400.
    BadRequest,
    /// 404.
    NotFound,
    /// 405.
    MethodNotAllowed,
    /// 408: a request not completed within the server's request timeout.
    RequestTimeout,
    /// 409.
    Conflict,
    /// 413.
    PayloadTooLarge,
    /// 429: the server holds too many received fds, all connections together.
    TooManyRequests,
    /// 431: the request line and headers are over the server's bound.
    HeadersTooLarge,
    /// 500.
    InternalServerError,
    /// 503.
    ServiceUnavailable,
}

impl HttpStatus {
    /// Numeric code.
    pub fn code(self) -> u16 {
        match self {
            HttpStatus::Ok => 200,
            HttpStatus::NoContent => 204,
            HttpStatus::BadRequest => 400,
            HttpStatus::NotFound => 404,
            HttpStatus::MethodNotAllowed => 405,
            HttpStatus::RequestTimeout => 408,
            HttpStatus::Conflict => 409,
            HttpStatus::PayloadTooLarge => 413,
            HttpStatus::TooManyRequests => 429,
            HttpStatus::HeadersTooLarge => 431,
            HttpStatus::InternalServerError => 500,
            HttpStatus::ServiceUnavailable => 503,
        }
    }

    /// The status for an [`crate::ApiError`] code (400/404/409/500).
    pub fn from_api_code(code: u16) -> HttpStatus {
        match code {
            400 => HttpStatus::BadRequest,
            404 => HttpStatus::NotFound,
            409 => HttpStatus::Conflict,
            _ => HttpStatus::InternalServerError,
        }
    }
}

/// The `Server` header's value.
pub const SERVER: &str = "ioasid-vmm API";

/// One reply, ready to render.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reply {
    /// Status.
    pub status: HttpStatus,
    /// JSON body (none for 204).
    pub body: Option<Vec<u8>>,
    /// Methods for the `Allow` header of a 405.
    pub allow: Vec<&'static str>,
    /// Close the connection after this reply (after a parse error the stream is out of sync).
    pub close: bool,
}

impl Reply {
    /// 204 without a body.
    pub fn no_content() -> Reply {
        Reply {
            status: HttpStatus::NoContent,
            body: None,
            allow: Vec::new(),
            close: false,
        }
    }

    /// `status` with `value` serialized as the (ASCII-only) body.
    pub fn json<T: Serialize>(status: HttpStatus, value: &T) -> Reply {
        match serde_json::to_string(value) {
            Ok(body) => Reply {
                status,
                body: Some(ascii_json(&body)),
                allow: Vec::new(),
                close: false,
            },
            Err(e) => Reply::error(
                HttpStatus::InternalServerError,
                format!("Cannot serialize the reply: {e}"),
            ),
        }
    }

    /// `status` with the body `["message"]`.
    pub fn error(status: HttpStatus, message: impl Into<String>) -> Reply {
        Reply::errors(status, vec![message.into()])
    }

    /// `status` with the body `["message", "cause", ...]`, outermost first.
    pub fn errors(status: HttpStatus, messages: Vec<String>) -> Reply {
        // Serializing strings cannot fail; fall back to a fixed body anyway.
        let body = serde_json::to_string(&ErrorBody(messages))
            .map(|b| ascii_json(&b))
            .unwrap_or_else(|_| br#"["Unprintable error"]"#.to_vec());
        Reply {
            status,
            body: Some(body),
            allow: Vec::new(),
            close: false,
        }
    }

    /// Marks the reply as the last on its connection.
    pub fn closing(mut self) -> Reply {
        self.close = true;
        self
    }

    /// Renders the reply as micro_http does (see the module documentation). `http10` picks
    /// `HTTP/1.0` for 1.0 clients.
    pub fn render(&self, http10: bool) -> Vec<u8> {
        let version = if http10 { "HTTP/1.0" } else { "HTTP/1.1" };
        let mut out = format!(
            "{version} {} \r\nServer: {SERVER}\r\nConnection: {}\r\n",
            self.status.code(),
            if self.close { "close" } else { "keep-alive" }
        );
        if !self.allow.is_empty() {
            out.push_str(&format!("Allow: {}\r\n", self.allow.join(", ")));
        }
        // A 204 carries no body; like micro_http, no body means no Content-Length either.
        let body = match (&self.body, self.status) {
            (_, HttpStatus::NoContent) | (None, _) => None,
            (Some(b), _) if b.is_empty() => None,
            (Some(b), _) => Some(b),
        };
        if let Some(b) = body {
            out.push_str(&format!(
                "Content-Type: application/json\r\nContent-Length: {}\r\n",
                b.len()
            ));
        }
        out.push_str("\r\n");
        let mut bytes = out.into_bytes();
        if let Some(b) = body {
            bytes.extend_from_slice(b);
        }
        bytes
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn renders_409_with_json_error_array() {
        let r = Reply::error(HttpStatus::Conflict, "Device id \"a\" exists").render(false);
        let text = String::from_utf8(r).unwrap();
        assert!(text.starts_with("HTTP/1.1 409 \r\n"), "{text}");
        let (_, body) = text.split_once("\r\n\r\n").unwrap();
        let v: Vec<String> = serde_json::from_str(body).unwrap();
        assert_eq!(v, vec!["Device id \"a\" exists".to_string()]);
        assert!(text.contains(&format!("Content-Length: {}\r\n", body.len())));
    }

    #[test]
    fn renders_204_without_length() {
        let text = String::from_utf8(Reply::no_content().render(true)).unwrap();
        assert_eq!(
            text,
            "HTTP/1.0 204 \r\nServer: ioasid-vmm API\r\nConnection: keep-alive\r\n\r\n"
        );
    }

    #[test]
    fn bodies_are_ascii() {
        let r = Reply::error(
            HttpStatus::NotFound,
            "Unknown route /api/v1/vm.\u{e9}t\u{1f600}",
        );
        let body = r.body.unwrap();
        assert!(body.is_ascii());
        let text = std::str::from_utf8(&body).unwrap();
        assert!(text.contains("\\u00e9t\\ud83d\\ude00"), "{text}");
        let v: Vec<String> = serde_json::from_slice(&body).unwrap();
        assert_eq!(v[0], "Unknown route /api/v1/vm.\u{e9}t\u{1f600}");
    }
}
