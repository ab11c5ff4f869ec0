//! The one error type of the crate. The gRPC layer maps each variant to one status code.

use crate::model::CheckpointError;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Bad input: names the offending field.
    #[error("invalid {field}: {message}")]
    InvalidArgument { field: String, message: String },
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    ResourceExhausted(String),
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    /// A libtorch failure: details go to the logs, not to clients.
    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),
    #[error("internal error: {0}")]
    Internal(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> Error {
    Error::InvalidArgument { field: field.into(), message: message.into() }
}
