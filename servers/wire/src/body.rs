//! How a frame body is encoded: postcard, the whole body, nothing after it.
//!
//! Knows nothing of frames or methods; callers pick the type.
//!
//! # Limits
//! The body length limit is enforced by [`crate::frame::FrameLimits`] before a
//! body ever reaches [`decode`].

use bytes::Bytes;
use serde::{de::DeserializeOwned, Serialize};

/// Expected size of a small body; the first allocation of [`encode`].
const BODY_BYTES_INITIAL: usize = 64;

/// Why a body did not decode.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    #[error("body does not decode: {0}")]
    Postcard(#[from] postcard::Error),
    #[error("body has {len} trailing bytes after the value")]
    TrailingBytes { len: usize },
}

/// Encodes a value as a body. Panics only for types postcard cannot encode
/// at all (such as sequences of unknown length), which is a programming error.
pub fn encode<T: Serialize>(value: &T) -> Bytes {
    let buf = Vec::with_capacity(BODY_BYTES_INITIAL);
    let buf = postcard::to_extend(value, buf).expect("type is postcard-encodable");
    Bytes::from(buf)
}

/// Decodes a whole body; trailing bytes are an error.
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, BodyError> {
    let (value, rest) = postcard::take_from_bytes(bytes)?;
    if !rest.is_empty() {
        return Err(BodyError::TrailingBytes { len: rest.len() });
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Req {
        parent: u64,
        name: String,
        flags: Option<u32>,
    }

    #[test]
    fn round_trip() {
        let req = Req {
            parent: 1,
            name: "a".into(),
            flags: Some(3),
        };
        let bytes = encode(&req);
        assert_eq!(decode::<Req>(&bytes).unwrap(), req);
    }

    #[test]
    fn trailing_bytes_rejected() {
        let mut bytes = encode(&5u32).to_vec();
        bytes.push(0);
        let err = decode::<u32>(&bytes).unwrap_err();
        assert!(matches!(err, BodyError::TrailingBytes { len: 1 }));
    }

    #[test]
    fn garbage_rejected() {
        assert!(matches!(
            decode::<Req>(&[0xff; 3]),
            Err(BodyError::Postcard(_))
        ));
        assert!(matches!(decode::<u64>(&[]), Err(BodyError::Postcard(_))));
    }
}
