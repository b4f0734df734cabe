//! `ApiError`: what the VMM answers when a request fails, and the HTTP status it maps to.

use thiserror::Error;

/// A failed request, as the VMM reports it. The variant picks the HTTP status; the message
/// goes to the client in `{"error": "..."}` and should name the device and the cause.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum ApiError {
    /// The request is not valid in the VM's current state or configuration (400).
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
}

impl ApiError {
    /// The kind.
    pub fn kind(&self) -> ApiErrorKind {
        match self {
            ApiError::BadRequest(_) => ApiErrorKind::BadRequest,
            ApiError::NotFound(_) => ApiErrorKind::NotFound,
            ApiError::Conflict(_) => ApiErrorKind::Conflict,
            ApiError::Internal(_) => ApiErrorKind::Internal,
        }
    }

    /// The HTTP status code it maps to.
    pub fn status(&self) -> u16 {
        self.kind().status()
    }

    /// The message.
    pub fn message(&self) -> &str {
        match self {
            ApiError::BadRequest(m)
            | ApiError::NotFound(m)
            | ApiError::Conflict(m)
            | ApiError::Internal(m) => m,
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
            ApiErrorKind::Internal => 500,
        }
    }
}
