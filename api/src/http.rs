//! HTTP replies, written by us rather than by dbs-uhttp.
//!
//! dbs-uhttp parses requests (and receives `SCM_RIGHTS` fds) well, but its `StatusCode` is a
//! closed enum of 11 codes without 409 Conflict, and its own parse-error replies are not valid
//! JSON. So the server uses dbs-uhttp's `HttpConnection` for reading only and renders replies
//! here: a status line, a few fixed headers and a JSON body.

use serde::Serialize;

use crate::types::ErrorBody;

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
    /// 409.
    Conflict,
    /// 413.
    PayloadTooLarge,
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
            HttpStatus::Conflict => 409,
            HttpStatus::PayloadTooLarge => 413,
            HttpStatus::InternalServerError => 500,
            HttpStatus::ServiceUnavailable => 503,
        }
    }

    /// Reason phrase.
    pub fn reason(self) -> &'static str {
        match self {
            HttpStatus::Ok => "OK",
            HttpStatus::NoContent => "No Content",
            HttpStatus::BadRequest => "Bad Request",
            HttpStatus::NotFound => "Not Found",
            HttpStatus::MethodNotAllowed => "Method Not Allowed",
            HttpStatus::Conflict => "Conflict",
            HttpStatus::PayloadTooLarge => "Payload Too Large",
            HttpStatus::InternalServerError => "Internal Server Error",
            HttpStatus::ServiceUnavailable => "Service Unavailable",
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

    /// `status` with `value` serialized as the body.
    pub fn json<T: Serialize>(status: HttpStatus, value: &T) -> Reply {
        match serde_json::to_vec(value) {
            Ok(body) => Reply {
                status,
                body: Some(body),
                allow: Vec::new(),
                close: false,
            },
            Err(e) => Reply::error(
                HttpStatus::InternalServerError,
                format!("Cannot serialize the reply: {e}"),
            ),
        }
    }

    /// `status` with `{"error": message}`.
    pub fn error(status: HttpStatus, message: impl Into<String>) -> Reply {
        let body = ErrorBody {
            error: message.into(),
        };
        // Serializing a struct of one String cannot fail; fall back to a fixed body anyway.
        let body = serde_json::to_vec(&body)
            .unwrap_or_else(|_| br#"{"error":"Unprintable error"}"#.to_vec());
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

    /// Renders the reply as `HTTP/1.x`. `http10` picks `HTTP/1.0` for 1.0 clients.
    pub fn render(&self, http10: bool) -> Vec<u8> {
        let version = if http10 { "HTTP/1.0" } else { "HTTP/1.1" };
        let mut out = format!(
            "{version} {} {}\r\nServer: ioasid-vmm API\r\nConnection: {}\r\n",
            self.status.code(),
            self.status.reason(),
            if self.close { "close" } else { "keep-alive" }
        );
        if !self.allow.is_empty() {
            out.push_str(&format!("Allow: {}\r\n", self.allow.join(", ")));
        }
        // RFC 9110: a 204 carries neither a body nor Content-Length.
        let body = match (&self.body, self.status) {
            (_, HttpStatus::NoContent) | (None, _) => None,
            (Some(b), _) => Some(b),
        };
        match body {
            Some(b) => out.push_str(&format!(
                "Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
                b.len()
            )),
            None if self.status == HttpStatus::NoContent => out.push_str("\r\n"),
            None => out.push_str("Content-Length: 0\r\n\r\n"),
        }
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
    fn renders_409_with_json_error() {
        let r = Reply::error(HttpStatus::Conflict, "Device id \"a\" exists").render(false);
        let text = String::from_utf8(r).unwrap();
        assert!(text.starts_with("HTTP/1.1 409 Conflict\r\n"), "{text}");
        let (_, body) = text.split_once("\r\n\r\n").unwrap();
        let v: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(v["error"], "Device id \"a\" exists");
        assert!(text.contains(&format!("Content-Length: {}\r\n", body.len())));
    }

    #[test]
    fn renders_204_without_length() {
        let text = String::from_utf8(Reply::no_content().render(true)).unwrap();
        assert!(text.starts_with("HTTP/1.0 204 No Content\r\n"), "{text}");
        assert!(!text.contains("Content-Length"), "{text}");
        assert!(text.ends_with("\r\n\r\n"));
    }
}
