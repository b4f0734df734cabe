//! `ApiError`: what the VMM answers when a request fails, and the HTTP status it maps to.

use thiserror::Error;

/// A failed request, as the VMM reports it. The variant picks the HTTP status; the message
/// (and, for [`ApiError::Chain`], its causes) goes to the client as a JSON array of strings,
/// outermost first, as Cloud Hypervisor's clients read it. Messages name the device and the
/// cause.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum ApiError {
    /// The request is not valid in the VM's current configuration (400).
    #[error("{0}")]
    BadRequest(String),
    /// The device, or the VM, does not exist (404).
    #[error("{0}")]
    NotFound(String),
    /// A device with the same id or path already exists (409).
    #[error("{0}")]
    Conflict(String),
    /// The VMM failed while carrying the request out (500).
    #[error("{0}")]
    Internal(String),
    /// The request is not valid in the VM's current life-cycle state, e.g. booting a running
    /// VM (500, the status Cloud Hypervisor answers such requests with).
    #[error("{0}")]
    InvalidState(String),
    /// An error of `kind` with its causes: `messages[0]` is the message, the rest its
    /// causes, outermost first.
    #[error("{}", .messages.join(": "))]
    Chain {
        /// The kind, which picks the status.
        kind: ApiErrorKind,
        /// Message, then causes.
        messages: Vec<String>,
    },
}

/// The HTTP-independent kind of an [`ApiError`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ApiErrorKind {
    /// 400.
    BadRequest,
    /// 404.
    NotFound,
    /// 409.
    Conflict,
    /// 500.
    Internal,
    /// 500: not valid in the VM's life-cycle state.
    InvalidState,
}

impl ApiError {
    /// An error of `kind` from `error` and its `source()` chain, outermost first.
    pub fn from_chain(kind: ApiErrorKind, error: &dyn std::error::Error) -> ApiError {
        let mut messages = vec![error.to_string()];
        let mut source = error.source();
        while let Some(s) = source {
            messages.push(s.to_string());
            source = s.source();
        }
        ApiError::Chain { kind, messages }
    }

    /// The kind.
    pub fn kind(&self) -> ApiErrorKind {
        match self {
            ApiError::BadRequest(_) => ApiErrorKind::BadRequest,
            ApiError::NotFound(_) => ApiErrorKind::NotFound,
            ApiError::Conflict(_) => ApiErrorKind::Conflict,
            ApiError::Internal(_) => ApiErrorKind::Internal,
            ApiError::InvalidState(_) => ApiErrorKind::InvalidState,
            ApiError::Chain { kind, .. } => *kind,
        }
    }

    /// The HTTP status code it maps to.
    pub fn status(&self) -> u16 {
        self.kind().status()
    }

    /// The message (without its causes).
    pub fn message(&self) -> &str {
        match self {
            ApiError::BadRequest(m)
            | ApiError::NotFound(m)
            | ApiError::Conflict(m)
            | ApiError::Internal(m)
            | ApiError::InvalidState(m) => m,
            ApiError::Chain { messages, .. } => messages.first().map(String::as_str).unwrap_or(""),
        }
    }

    /// The message and its causes, outermost first: the body of the error reply.
    pub fn messages(&self) -> Vec<String> {
        match self {
            ApiError::Chain { messages, .. } => messages.clone(),
            other => vec![other.message().to_string()],
        }
    }
}

impl ApiErrorKind {
    /// The HTTP status code.
    pub fn status(self) -> u16 {
        match self {
            ApiErrorKind::BadRequest => 400,
            ApiErrorKind::NotFound => 404,
            ApiErrorKind::Conflict => 409,
            ApiErrorKind::Internal | ApiErrorKind::InvalidState => 500,
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[derive(Debug, Error)]
    #[error("Cannot assign 0000:00:03.0")]
    struct Outer(#[source] std::io::Error);

    #[test]
    fn chain_keeps_causes_in_order() {
        let e = Outer(std::io::Error::from_raw_os_error(libc::EBUSY));
        let a = ApiError::from_chain(ApiErrorKind::Conflict, &e);
        assert_eq!(a.status(), 409);
        let m = a.messages();
        assert_eq!(m.len(), 2);
        assert_eq!(m[0], "Cannot assign 0000:00:03.0");
        assert!(m[1].contains("busy"), "{m:?}");
        assert_eq!(a.message(), "Cannot assign 0000:00:03.0");
        assert!(a.to_string().starts_with("Cannot assign 0000:00:03.0: "));
        assert_eq!(ApiError::InvalidState("x".into()).status(), 500);
    }
}
