//! The error of command-line interpretation: every rejected value names its flag, the key
//! and what is accepted.

use thiserror::Error;

/// Errors of command-line interpretation.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ConfigError {
    /// A value was not accepted.
    #[error("{flag}: invalid value '{value}' for {key} (accepted: {accepted})")]
    InvalidValue {
        /// The flag, e.g. `--memory`.
        flag: &'static str,
        /// The key within the flag, e.g. `size`.
        key: String,
        /// The rejected value.
        value: String,
        /// What would be accepted.
        accepted: &'static str,
    },
    /// An unknown key.
    #[error("{flag}: unknown option '{key}' (accepted: {accepted})")]
    UnknownKey {
        /// The flag.
        flag: &'static str,
        /// The key.
        key: String,
        /// The accepted keys.
        accepted: &'static str,
    },
    /// A key given twice.
    #[error("{flag}: option '{key}' given more than once")]
    DuplicateKey {
        /// The flag.
        flag: &'static str,
        /// The key.
        key: String,
    },
    /// Something required is missing or two options conflict.
    #[error("{flag}: {reason}")]
    Invalid {
        /// The flag (or flags).
        flag: &'static str,
        /// What is wrong.
        reason: String,
    },
}
