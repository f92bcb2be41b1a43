//! mgmtd errors and how they travel to callers.

use r3fs_kv::{AsKvError, KvError};
use r3fs_wire::{ErrorBody, ErrorCode};

#[derive(Debug, Clone, thiserror::Error)]
pub enum MgmtdError {
    /// This mgmtd does not hold the lease (or it is about to lapse).
    #[error("not the primary mgmtd{}", primary.as_ref().map(|p| format!("; the primary is {p}")).unwrap_or_default())]
    NotPrimary { primary: Option<String> },
    /// The caller asked for something invalid; `errno` says what kind.
    #[error("{message}")]
    Refused { errno: i32, message: String },
    #[error(transparent)]
    Kv(#[from] KvError),
    #[error("corrupt mgmtd record {key}: {reason}")]
    Corrupt { key: String, reason: String },
}

impl MgmtdError {
    pub fn refused(errno: i32, message: impl Into<String>) -> MgmtdError {
        MgmtdError::Refused {
            errno,
            message: message.into(),
        }
    }

    pub fn to_error_body(&self) -> ErrorBody {
        let code = match self {
            MgmtdError::NotPrimary { .. } => ErrorCode::Unavailable,
            MgmtdError::Refused { errno, .. } => ErrorCode::Errno(*errno),
            MgmtdError::Kv(e) if e.is_retryable() => ErrorCode::Unavailable,
            MgmtdError::Kv(KvError::RetryLimit { .. }) => ErrorCode::Unavailable,
            MgmtdError::Kv(_) | MgmtdError::Corrupt { .. } => ErrorCode::Internal,
        };
        ErrorBody {
            code,
            message: self.to_string(),
        }
    }
}

impl AsKvError for MgmtdError {
    fn as_kv_error(&self) -> Option<&KvError> {
        match self {
            MgmtdError::Kv(e) => Some(e),
            _ => None,
        }
    }
}
