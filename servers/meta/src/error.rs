//! Meta errors: a POSIX errno with context, a KV failure, or corrupt state.

use r3fs_kv::{AsKvError, KvError};
use r3fs_wire::{ErrorBody, ErrorCode};

#[derive(Debug, Clone, thiserror::Error)]
pub enum MetaError {
    /// The operation is refused with a POSIX errno; `message` says why.
    #[error("{message} (errno {errno})")]
    Errno { errno: i32, message: String },
    #[error(transparent)]
    Kv(#[from] KvError),
    /// A stored record did not decode: the store is damaged or from a newer version.
    #[error("corrupt metadata at key {key}: {reason}")]
    Corrupt { key: String, reason: String },
}

impl MetaError {
    pub fn errno(&self) -> Option<i32> {
        match self {
            MetaError::Errno { errno, .. } => Some(*errno),
            _ => None,
        }
    }

    /// How this error travels back to the client.
    pub fn to_error_body(&self) -> ErrorBody {
        let code = match self {
            MetaError::Errno { errno, .. } => ErrorCode::Errno(*errno),
            MetaError::Kv(KvError::RetryLimit { .. }) => ErrorCode::Unavailable,
            MetaError::Kv(e) if e.is_retryable() => ErrorCode::Unavailable,
            MetaError::Kv(KvError::KeyTooLarge { .. } | KvError::ValueTooLarge { .. }) => {
                ErrorCode::Errno(libc::E2BIG)
            }
            MetaError::Kv(_) | MetaError::Corrupt { .. } => ErrorCode::Internal,
        };
        ErrorBody {
            code,
            message: self.to_string(),
        }
    }
}

impl AsKvError for MetaError {
    fn as_kv_error(&self) -> Option<&KvError> {
        match self {
            MetaError::Kv(e) => Some(e),
            _ => None,
        }
    }
}

/// `Err(MetaError::Errno)` with a formatted message.
macro_rules! fail {
    ($errno:ident, $($arg:tt)*) => {
        return Err($crate::error::MetaError::Errno {
            errno: libc::$errno,
            message: format!($($arg)*),
        })
    };
}
pub(crate) use fail;

/// A `MetaError::Errno` value with a formatted message.
macro_rules! errno {
    ($errno:ident, $($arg:tt)*) => {
        $crate::error::MetaError::Errno {
            errno: libc::$errno,
            message: format!($($arg)*),
        }
    };
}
pub(crate) use errno;
