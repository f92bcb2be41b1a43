//! The frame: a fixed 32-byte header, a postcard body, then a bulk payload
//! carried as-is.
//!
//! Only bytes and their validation live here: no sockets, no timeouts, no
//! retries (that is `r3fs-net`), and no knowledge of what a body means (that
//! is [`crate::body`] and [`crate::method`]). Decoding never panics and never
//! allocates on the say-so of a length field that exceeds [`FrameLimits`].
//!
//! # Layout (little-endian)
//! ```text
//! offset size field
//!      0    4 magic        FRAME_MAGIC (b"R3FS")
//!      4    2 flags        bit 0 response, bit 1 error (only with bit 0),
//!                          bit 2 payload CRC in body (never with bit 1),
//!                          bit 3 payload in shared memory (never with bit 1)
//!      6    2 msg_type     Method::ID
//!      8    8 request_id
//!     16    4 body_len
//!     20    4 payload_len
//!     24    4 body_crc     CRC32C of the body
//!     28    4 payload_crc  CRC32C of the payload (0 when empty or when
//!                          bit 2 is set)
//!     32      body, then payload (with bit 3: an 8-byte slot reference)
//! ```
//!
//! A request of a method whose body carries the CRC32C of its payload
//! (`Method::PAYLOAD_CRC_IN_BODY`, storage writes) sets bit 2: the frame
//! layer then neither computes nor checks a payload CRC, and the handler
//! checks the payload against the body's CRC in the pass that checksums
//! what it stores. A 1 MiB write is then checksummed once per hop, not
//! three times (sender, receiver, handler). The server refuses bit 2 for a
//! method that does not check its payload itself.
//!
//! A response sets bit 2 only when its request did and the method's answer
//! carries the CRC its caller checks (`Method::RESPONSE_PAYLOAD_CRC_IN_BODY`,
//! storage reads): the request's bit 2 is the caller's opt-in, so an older
//! caller, which refuses the bit on a response, keeps getting answers with
//! the CRC in the header. (Upgrade servers before their callers: an older
//! server refuses bit 2 on a request of a method without a request payload
//! CRC.) A caller refuses the bit on an answer of any other method, and an
//! error response never sets it.
//!
//! # Shared payloads
//! Two processes on one host that agreed on it (the RPC layer's
//! `ShareRegion` handshake, see `r3fs-net`'s `shared` module) pass a
//! payload through a slot of the sender's shared-memory region instead of
//! the byte stream: the frame sets [`FLAG_PAYLOAD_SHARED`], its header
//! still gives the payload's real length and CRC (0 with bit 2), and the
//! stream carries a [`SharedRef`] in the payload's place. Whoever reads
//! such a frame copies the payload out of the slot, frees the slot, and
//! then checks the payload as for any frame. A decoder with no region
//! ([`Decoder::decode`] here) refuses the frame; only
//! [`FrameCodec::decode_head`] hands it on.
//!
//! # Limits
//! A body is at most `FrameLimits::body_bytes_max` (default
//! [`FRAME_BODY_BYTES_MAX`]), a payload at most `payload_bytes_max` (default
//! [`FRAME_PAYLOAD_BYTES_MAX`]); both are hard-capped at `u32::MAX` by the
//! header format.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio_util::codec::{Decoder, Encoder};

/// First four bytes of every frame.
pub const FRAME_MAGIC: u32 = u32::from_le_bytes(*b"R3FS");
/// Size of the fixed header.
pub const FRAME_HEADER_BYTES: usize = 32;
/// Default largest body accepted or sent.
pub const FRAME_BODY_BYTES_MAX: u32 = 16 * 1024 * 1024;
/// Default largest bulk payload accepted or sent.
pub const FRAME_PAYLOAD_BYTES_MAX: u32 = 64 * 1024 * 1024;

/// Flag bit: the frame answers a request.
pub const FLAG_RESPONSE: u16 = 1 << 0;
/// Flag bit: the response body is an [`crate::ErrorBody`]; only with [`FLAG_RESPONSE`].
pub const FLAG_ERROR: u16 = 1 << 1;
/// Flag bit: the body carries the payload's CRC32C and whoever takes the
/// payload checks it; the header's `payload_crc` is 0. On a request it also
/// asks for an answer flagged so, where the method allows (see the module
/// docs). Never with [`FLAG_ERROR`].
pub const FLAG_PAYLOAD_CRC_IN_BODY: u16 = 1 << 2;
/// Flag bit: the payload lies in a slot of the sender's shared-memory
/// region and the stream carries a [`SharedRef`] in its place. Never with
/// [`FLAG_ERROR`]; see the module docs.
pub const FLAG_PAYLOAD_SHARED: u16 = 1 << 3;
/// Bytes of a [`SharedRef`] on the stream.
pub const SHARED_REF_BYTES: usize = 8;

/// Where a shared payload lies: a slot of the sender's region, and the
/// payload's length (equal to the header's `payload_len`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SharedRef {
    pub slot: u32,
    pub len: u32,
}

impl SharedRef {
    fn write(&self, dst: &mut BytesMut) {
        dst.put_u32_le(self.slot);
        dst.put_u32_le(self.len);
    }

    fn read(mut src: &[u8]) -> SharedRef {
        SharedRef {
            slot: src.get_u32_le(),
            len: src.get_u32_le(),
        }
    }
}

/// What a frame is, as its flags say.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FrameKind {
    Request,
    Response,
    /// A response whose body is an [`crate::ErrorBody`].
    ErrorResponse,
}

impl FrameKind {
    /// The flag bits for this kind.
    pub fn flags(self) -> u16 {
        match self {
            FrameKind::Request => 0,
            FrameKind::Response => FLAG_RESPONSE,
            FrameKind::ErrorResponse => FLAG_RESPONSE | FLAG_ERROR,
        }
    }

    /// Parses flag bits; unknown bits and an error bit without the response
    /// bit are rejected.
    pub fn from_flags(flags: u16) -> Result<FrameKind, FrameError> {
        match flags {
            0 => Ok(FrameKind::Request),
            FLAG_RESPONSE => Ok(FrameKind::Response),
            f if f == FLAG_RESPONSE | FLAG_ERROR => Ok(FrameKind::ErrorResponse),
            _ => Err(FrameError::UnknownFlags { flags }),
        }
    }
}

/// Splits flag bits into the frame's kind, whether its payload CRC is
/// left to the body ([`FLAG_PAYLOAD_CRC_IN_BODY`]) and whether its payload
/// is shared ([`FLAG_PAYLOAD_SHARED`]); neither on an error response.
fn parse_flags(flags: u16) -> Result<(FrameKind, bool, bool), FrameError> {
    let crc_in_body = flags & FLAG_PAYLOAD_CRC_IN_BODY != 0;
    let shared = flags & FLAG_PAYLOAD_SHARED != 0;
    let kind = FrameKind::from_flags(flags & !(FLAG_PAYLOAD_CRC_IN_BODY | FLAG_PAYLOAD_SHARED))
        .map_err(|_| FrameError::UnknownFlags { flags })?;
    if (crc_in_body || shared) && kind == FrameKind::ErrorResponse {
        return Err(FrameError::UnknownFlags { flags });
    }
    Ok((kind, crc_in_body, shared))
}

/// Largest body and payload a codec accepts or emits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameLimits {
    pub body_bytes_max: u32,
    pub payload_bytes_max: u32,
}

impl Default for FrameLimits {
    fn default() -> Self {
        FrameLimits {
            body_bytes_max: FRAME_BODY_BYTES_MAX,
            payload_bytes_max: FRAME_PAYLOAD_BYTES_MAX,
        }
    }
}

impl FrameLimits {
    /// Checks a body and payload length against the limits.
    pub fn check(&self, body_len: usize, payload_len: usize) -> Result<(), FrameError> {
        let body_max = self.body_bytes_max as usize;
        if body_len > body_max {
            return Err(FrameError::BodyTooLarge {
                len: body_len as u64,
                max: self.body_bytes_max,
            });
        }
        let payload_max = self.payload_bytes_max as usize;
        if payload_len > payload_max {
            return Err(FrameError::PayloadTooLarge {
                len: payload_len as u64,
                max: self.payload_bytes_max,
            });
        }
        Ok(())
    }
}

/// Why bytes are not a valid frame. Any of these closes the connection.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("bad frame magic {found:#010x}, expected {FRAME_MAGIC:#010x}")]
    BadMagic { found: u32 },
    #[error("unknown frame flags {flags:#06x}")]
    UnknownFlags { flags: u16 },
    #[error("frame body of {len} bytes exceeds limit of {max} bytes")]
    BodyTooLarge { len: u64, max: u32 },
    #[error("frame payload of {len} bytes exceeds limit of {max} bytes")]
    PayloadTooLarge { len: u64, max: u32 },
    #[error("frame body crc mismatch: header says {expected:#010x}, body has {actual:#010x}")]
    BodyCrcMismatch { expected: u32, actual: u32 },
    #[error(
        "frame payload crc mismatch: header says {expected:#010x}, payload has {actual:#010x}"
    )]
    PayloadCrcMismatch { expected: u32, actual: u32 },
    #[error("shared payload refused: {reason}")]
    SharedPayload { reason: String },
    #[error("stream ended inside a frame ({buffered} bytes buffered)")]
    Truncated { buffered: usize },
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
}

/// A parsed and validated (magic, flags, limits) header. CRCs are checked
/// once the body and payload have arrived.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub kind: FrameKind,
    pub msg_type: u16,
    pub request_id: u64,
    pub body_len: u32,
    pub payload_len: u32,
    pub body_crc: u32,
    pub payload_crc: u32,
    /// [`FLAG_PAYLOAD_CRC_IN_BODY`]: `payload_crc` is 0 and not checked here.
    pub payload_crc_in_body: bool,
    /// [`FLAG_PAYLOAD_SHARED`]: a [`SharedRef`] stands in for the payload
    /// on the stream.
    pub payload_shared: bool,
}

impl Header {
    /// Parses and validates a header against `limits`; no allocation.
    pub fn parse(
        bytes: &[u8; FRAME_HEADER_BYTES],
        limits: &FrameLimits,
    ) -> Result<Header, FrameError> {
        let mut b: &[u8] = bytes;
        let magic = b.get_u32_le();
        if magic != FRAME_MAGIC {
            return Err(FrameError::BadMagic { found: magic });
        }
        let (kind, payload_crc_in_body, payload_shared) = parse_flags(b.get_u16_le())?;
        let msg_type = b.get_u16_le();
        let request_id = b.get_u64_le();
        let body_len = b.get_u32_le();
        let payload_len = b.get_u32_le();
        let body_crc = b.get_u32_le();
        let payload_crc = b.get_u32_le();
        limits.check(body_len as usize, payload_len as usize)?;
        Ok(Header {
            kind,
            msg_type,
            request_id,
            body_len,
            payload_len,
            body_crc,
            payload_crc,
            payload_crc_in_body,
            payload_shared,
        })
    }

    /// Writes the 32 header bytes.
    pub fn write(&self, dst: &mut BytesMut) {
        dst.reserve(FRAME_HEADER_BYTES);
        dst.put_u32_le(FRAME_MAGIC);
        let crc_flag = if self.payload_crc_in_body {
            FLAG_PAYLOAD_CRC_IN_BODY
        } else {
            0
        };
        let shared_flag = if self.payload_shared {
            FLAG_PAYLOAD_SHARED
        } else {
            0
        };
        dst.put_u16_le(self.kind.flags() | crc_flag | shared_flag);
        dst.put_u16_le(self.msg_type);
        dst.put_u64_le(self.request_id);
        dst.put_u32_le(self.body_len);
        dst.put_u32_le(self.payload_len);
        dst.put_u32_le(self.body_crc);
        dst.put_u32_le(self.payload_crc);
    }

    /// Bytes of body plus payload (or its [`SharedRef`]) following the
    /// header on the stream.
    pub fn rest_len(&self) -> usize {
        self.body_len as usize + self.stream_payload_len()
    }

    /// Bytes on the stream for the payload.
    fn stream_payload_len(&self) -> usize {
        if self.payload_shared {
            SHARED_REF_BYTES
        } else {
            self.payload_len as usize
        }
    }
}

/// One message: header fields, postcard body, and opaque bulk payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub kind: FrameKind,
    pub msg_type: u16,
    pub request_id: u64,
    pub body: Bytes,
    pub payload: Bytes,
    /// The body carries the payload's CRC32C and the receiving handler (or
    /// caller) checks it: no payload CRC is computed for the header or
    /// checked on arrival. Never on an error response; see the module docs.
    pub payload_crc_in_body: bool,
}

impl Frame {
    /// Header for this frame, CRCs computed. Panics if a length does not fit
    /// in `u32`; check with [`FrameLimits::check`] first.
    pub fn header(&self) -> Header {
        let body_len = u32::try_from(self.body.len()).expect("frame body length fits u32");
        let payload_len = u32::try_from(self.payload.len()).expect("frame payload length fits u32");
        Header {
            kind: self.kind,
            msg_type: self.msg_type,
            request_id: self.request_id,
            body_len,
            payload_len,
            body_crc: crc_fast::crc32_iscsi(&self.body),
            payload_crc: if self.payload_crc_in_body {
                0
            } else {
                payload_crc(&self.payload)
            },
            payload_crc_in_body: self.payload_crc_in_body,
            payload_shared: false,
        }
    }

    /// Writes header and body, but not the payload, so a large payload can
    /// be written from its own buffer without a copy.
    pub fn encode_head(&self, dst: &mut BytesMut) {
        dst.reserve(FRAME_HEADER_BYTES + self.body.len());
        self.header().write(dst);
        dst.extend_from_slice(&self.body);
    }

    /// Writes the whole frame for a payload the sender put in `slot` of its
    /// shared region: header (the payload's real length and CRC), body,
    /// then the [`SharedRef`]. Not for an error response.
    pub fn encode_shared(&self, slot: u32, dst: &mut BytesMut) {
        assert!(
            self.kind != FrameKind::ErrorResponse,
            "an error response carries no shared payload"
        );
        let header = Header {
            payload_shared: true,
            ..self.header()
        };
        dst.reserve(FRAME_HEADER_BYTES + self.body.len() + SHARED_REF_BYTES);
        header.write(dst);
        dst.extend_from_slice(&self.body);
        SharedRef {
            slot,
            len: header.payload_len,
        }
        .write(dst);
    }

    /// Total bytes on the wire.
    pub fn encoded_len(&self) -> usize {
        FRAME_HEADER_BYTES + self.body.len() + self.payload.len()
    }
}

fn payload_crc(payload: &[u8]) -> u32 {
    if payload.is_empty() {
        0
    } else {
        crc_fast::crc32_iscsi(payload)
    }
}

/// Payloads at least this large may be collected by the caller in a buffer
/// of its own ([`FrameCodec::decode_head`]), so they land aligned for
/// direct I/O instead of in the shared read buffer.
pub const LARGE_PAYLOAD_BYTES_MIN: usize = 64 * 1024;

/// The header and body of a frame whose payload the caller collects itself
/// (see [`FrameCodec::decode_head`]).
#[derive(Debug)]
pub struct FrameHead {
    header: Header,
    body: Bytes,
    shared: Option<SharedRef>,
}

impl FrameHead {
    /// Bytes of payload still to come (all of it).
    pub fn payload_len(&self) -> usize {
        self.header.payload_len as usize
    }

    /// Where the payload lies in the sender's shared region, if it does;
    /// then none of it comes on the stream.
    pub fn shared(&self) -> Option<SharedRef> {
        self.shared
    }

    /// The frame, once the caller has all `payload_len()` payload bytes;
    /// checks the payload CRC unless the frame leaves it to its handler.
    pub fn finish(self, payload: Bytes) -> Result<Frame, FrameError> {
        assert_eq!(
            payload.len(),
            self.payload_len(),
            "a frame head is finished with its whole payload"
        );
        let header = self.header;
        if !header.payload_crc_in_body {
            let actual = payload_crc(&payload);
            if actual != header.payload_crc {
                return Err(FrameError::PayloadCrcMismatch {
                    expected: header.payload_crc,
                    actual,
                });
            }
        }
        Ok(Frame {
            kind: header.kind,
            msg_type: header.msg_type,
            request_id: header.request_id,
            body: self.body,
            payload,
            payload_crc_in_body: header.payload_crc_in_body,
        })
    }
}

/// Decodes and encodes [`Frame`]s under a [`FrameLimits`].
#[derive(Debug, Clone, Default)]
pub struct FrameCodec {
    limits: FrameLimits,
}

impl FrameCodec {
    pub fn new(limits: FrameLimits) -> Self {
        FrameCodec { limits }
    }

    pub fn limits(&self) -> &FrameLimits {
        &self.limits
    }

    /// For a frame at the front of `src` with a payload of at least
    /// [`LARGE_PAYLOAD_BYTES_MIN`] bytes that has not fully arrived: once
    /// its header and body are in `src`, removes them (body CRC checked,
    /// limits enforced) and returns them; the payload's first bytes may
    /// follow in `src`. For a frame with a shared payload
    /// ([`FrameHead::shared`]): once all of it arrived, removes it and
    /// returns it. `None` when the front frame is small, complete, or its
    /// header or body is still incomplete: use [`Decoder::decode`].
    pub fn decode_head(&mut self, src: &mut BytesMut) -> Result<Option<FrameHead>, FrameError> {
        let Some(header) = self.front_header(src)? else {
            return Ok(None);
        };
        let head_len = FRAME_HEADER_BYTES + header.body_len as usize;
        if header.payload_shared {
            if src.len() < head_len + SHARED_REF_BYTES {
                return Ok(None);
            }
            let mut body = src.split_to(head_len).freeze();
            body.advance(FRAME_HEADER_BYTES);
            let shared = SharedRef::read(&src.split_to(SHARED_REF_BYTES));
            check_body(&header, &body)?;
            if shared.len != header.payload_len {
                return Err(FrameError::SharedPayload {
                    reason: format!(
                        "slot reference names {} bytes, the header {}",
                        shared.len, header.payload_len
                    ),
                });
            }
            return Ok(Some(FrameHead {
                header,
                body,
                shared: Some(shared),
            }));
        }
        let large = header.payload_len as usize >= LARGE_PAYLOAD_BYTES_MIN;
        let complete = src.len() >= head_len + header.payload_len as usize;
        if !large || complete || src.len() < head_len {
            return Ok(None);
        }
        let mut body = src.split_to(head_len).freeze();
        body.advance(FRAME_HEADER_BYTES);
        check_body(&header, &body)?;
        Ok(Some(FrameHead {
            header,
            body,
            shared: None,
        }))
    }

    /// The parsed header at the front of `src`, once all of it arrived.
    /// Validated before anything is reserved: a bad length never allocates.
    fn front_header(&self, src: &BytesMut) -> Result<Option<Header>, FrameError> {
        let Some(head) = src.get(..FRAME_HEADER_BYTES) else {
            return Ok(None);
        };
        let Ok(head) = <&[u8; FRAME_HEADER_BYTES]>::try_from(head) else {
            return Ok(None);
        };
        Header::parse(head, &self.limits).map(Some)
    }
}

fn check_body(header: &Header, body: &[u8]) -> Result<(), FrameError> {
    let actual = crc_fast::crc32_iscsi(body);
    if actual != header.body_crc {
        return Err(FrameError::BodyCrcMismatch {
            expected: header.body_crc,
            actual,
        });
    }
    Ok(())
}

impl Decoder for FrameCodec {
    type Item = Frame;
    type Error = FrameError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Frame>, FrameError> {
        let Some(header) = self.front_header(src)? else {
            return Ok(None);
        };
        let total = FRAME_HEADER_BYTES + header.rest_len();
        if src.len() < total {
            src.reserve(total - src.len());
            return Ok(None);
        }
        if header.payload_shared {
            return Err(FrameError::SharedPayload {
                reason: "the payload is in the sender's shared memory, \
                         and this connection maps none"
                    .to_string(),
            });
        }
        let mut rest = src.split_to(total).freeze();
        rest.advance(FRAME_HEADER_BYTES);
        let body = rest.split_to(header.body_len as usize);
        let payload = rest;
        check_body(&header, &body)?;
        FrameHead {
            header,
            body,
            shared: None,
        }
        .finish(payload)
        .map(Some)
    }

    fn decode_eof(&mut self, src: &mut BytesMut) -> Result<Option<Frame>, FrameError> {
        match self.decode(src)? {
            Some(frame) => Ok(Some(frame)),
            None if src.is_empty() => Ok(None),
            None => Err(FrameError::Truncated {
                buffered: src.len(),
            }),
        }
    }
}

impl Encoder<Frame> for FrameCodec {
    type Error = FrameError;

    fn encode(&mut self, frame: Frame, dst: &mut BytesMut) -> Result<(), FrameError> {
        self.limits.check(frame.body.len(), frame.payload.len())?;
        dst.reserve(frame.encoded_len());
        frame.encode_head(dst);
        dst.extend_from_slice(&frame.payload);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(body: &[u8], payload: &[u8]) -> Frame {
        Frame {
            kind: FrameKind::Request,
            msg_type: 0x0201,
            request_id: 7,
            body: Bytes::copy_from_slice(body),
            payload: Bytes::copy_from_slice(payload),
            payload_crc_in_body: false,
        }
    }

    fn encoded(f: &Frame) -> BytesMut {
        let mut buf = BytesMut::new();
        FrameCodec::default().encode(f.clone(), &mut buf).unwrap();
        buf
    }

    /// Decodes all of `bytes` (with EOF) and checks the outcome's debug text.
    fn check(bytes: &[u8], limits: FrameLimits, expect: &str) {
        let mut codec = FrameCodec::new(limits);
        let mut buf = BytesMut::from(bytes);
        let got = match codec.decode_eof(&mut buf) {
            Ok(Some(f)) => format!(
                "frame {:?} body={} payload={}",
                f.kind,
                f.body.len(),
                f.payload.len()
            ),
            Ok(None) => "none".to_string(),
            Err(e) => format!("{e:?}"),
        };
        assert!(got.starts_with(expect), "got {got}, expected {expect}");
    }

    #[test]
    fn round_trip_each_kind() {
        for kind in [
            FrameKind::Request,
            FrameKind::Response,
            FrameKind::ErrorResponse,
        ] {
            let mut f = frame(b"hello", b"payload bytes");
            f.kind = kind;
            let mut buf = encoded(&f);
            assert_eq!(buf.len(), f.encoded_len());
            let got = FrameCodec::default().decode(&mut buf).unwrap().unwrap();
            assert_eq!(got, f);
            assert!(buf.is_empty());
        }
    }

    #[test]
    fn empty_payload_has_zero_crc() {
        let buf = encoded(&frame(b"x", b""));
        assert_eq!(&buf[28..32], &[0, 0, 0, 0]);
        check(
            &buf,
            FrameLimits::default(),
            "frame Request body=1 payload=0",
        );
    }

    #[test]
    fn bad_magic_rejected() {
        let mut buf = encoded(&frame(b"x", b""));
        buf[0] ^= 0xff;
        check(&buf, FrameLimits::default(), "BadMagic");
    }

    #[test]
    fn unknown_flags_rejected() {
        let crc_in_body_on_an_error = FLAG_RESPONSE | FLAG_ERROR | FLAG_PAYLOAD_CRC_IN_BODY;
        let shared_on_an_error = FLAG_RESPONSE | FLAG_ERROR | FLAG_PAYLOAD_SHARED;
        for flags in [
            FLAG_ERROR,
            1 << 4,
            0x8001,
            0xffff,
            crc_in_body_on_an_error,
            shared_on_an_error,
        ] {
            let mut buf = encoded(&frame(b"x", b""));
            buf[4..6].copy_from_slice(&flags.to_le_bytes());
            check(&buf, FrameLimits::default(), "UnknownFlags");
        }
    }

    #[test]
    fn payload_crc_in_body_skips_the_payload_crc_both_ways() {
        let mut f = frame(b"x", b"payload bytes");
        f.payload_crc_in_body = true;
        let mut buf = encoded(&f);
        assert_eq!(&buf[28..32], &[0, 0, 0, 0], "no CRC computed");
        let flags = u16::from_le_bytes([buf[4], buf[5]]);
        assert_eq!(flags, FLAG_PAYLOAD_CRC_IN_BODY);
        // A damaged payload passes the frame layer: its handler checks it.
        let last = buf.len() - 1;
        buf[last] ^= 0x01;
        let got = FrameCodec::default().decode(&mut buf).unwrap().unwrap();
        assert!(got.payload_crc_in_body);
        assert_ne!(got.payload, f.payload);
        // A response may leave its payload CRC to the body too.
        let mut f = frame(b"x", b"payload bytes");
        f.kind = FrameKind::Response;
        f.payload_crc_in_body = true;
        let mut buf = encoded(&f);
        assert_eq!(&buf[28..32], &[0, 0, 0, 0], "no CRC computed");
        let got = FrameCodec::default().decode(&mut buf).unwrap().unwrap();
        assert!(got.payload_crc_in_body && got.kind == FrameKind::Response);
        // Without the flag the same damage is caught here.
        let mut buf = encoded(&frame(b"x", b"payload bytes"));
        let last = buf.len() - 1;
        buf[last] ^= 0x01;
        check(&buf, FrameLimits::default(), "PayloadCrcMismatch");
    }

    #[test]
    fn a_shared_payload_travels_as_a_slot_reference() {
        let mut f = frame(b"body", &[9u8; 100_000]);
        f.payload_crc_in_body = true;
        let mut buf = BytesMut::new();
        f.encode_shared(5, &mut buf);
        assert_eq!(buf.len(), FRAME_HEADER_BYTES + 4 + SHARED_REF_BYTES);
        let flags = u16::from_le_bytes([buf[4], buf[5]]);
        assert_eq!(flags, FLAG_PAYLOAD_CRC_IN_BODY | FLAG_PAYLOAD_SHARED);
        // The header keeps the real length, checked against the limits.
        assert_eq!(&buf[20..24], &100_000u32.to_le_bytes());
        let mut codec = FrameCodec::default();
        // Nothing until the reference arrived.
        let mut partial = BytesMut::from(&buf[..buf.len() - 1]);
        assert!(codec.decode_head(&mut partial).unwrap().is_none());
        let mut whole = buf.clone();
        let head = codec.decode_head(&mut whole).unwrap().unwrap();
        assert!(whole.is_empty());
        assert_eq!(
            head.shared(),
            Some(SharedRef {
                slot: 5,
                len: 100_000
            })
        );
        assert_eq!(head.payload_len(), 100_000);
        let got = head.finish(f.payload.clone()).unwrap();
        assert_eq!(got, f);
        // A decoder that maps no region refuses it.
        check(&buf, FrameLimits::default(), "SharedPayload");
        // A reference that disagrees with the header is refused.
        let mut bad = buf.clone();
        let at = bad.len() - 4;
        bad[at..].copy_from_slice(&7u32.to_le_bytes());
        let err = codec.decode_head(&mut bad).unwrap_err();
        assert!(matches!(err, FrameError::SharedPayload { .. }), "{err}");
        // The header's CRC still covers the real payload.
        let mut f = frame(b"body", b"real payload");
        let mut buf = BytesMut::new();
        f.encode_shared(0, &mut buf);
        let head = codec.decode_head(&mut buf).unwrap().unwrap();
        f.payload = Bytes::from_static(b"other payloa");
        let err = head.finish(f.payload.clone()).unwrap_err();
        assert!(matches!(err, FrameError::PayloadCrcMismatch { .. }));
    }

    #[test]
    fn over_limit_lengths_rejected_from_header_alone() {
        let buf = encoded(&frame(b"12345", b"123"));
        let small = FrameLimits {
            body_bytes_max: 4,
            payload_bytes_max: 100,
        };
        check(
            &buf[..FRAME_HEADER_BYTES],
            small,
            "BodyTooLarge { len: 5, max: 4 }",
        );
        let small = FrameLimits {
            body_bytes_max: 100,
            payload_bytes_max: 2,
        };
        check(
            &buf[..FRAME_HEADER_BYTES],
            small,
            "PayloadTooLarge { len: 3, max: 2 }",
        );
    }

    #[test]
    fn huge_length_field_does_not_allocate() {
        let mut head = encoded(&frame(b"", b""));
        head[16..20].copy_from_slice(&u32::MAX.to_le_bytes());
        let mut buf = BytesMut::from(&head[..]);
        let capacity_before = buf.capacity();
        let err = FrameCodec::default().decode(&mut buf).unwrap_err();
        assert!(matches!(err, FrameError::BodyTooLarge { .. }));
        assert_eq!(buf.capacity(), capacity_before);
        let mut head = encoded(&frame(b"", b""));
        head[20..24].copy_from_slice(&u32::MAX.to_le_bytes());
        check(&head, FrameLimits::default(), "PayloadTooLarge");
    }

    #[test]
    fn body_crc_mismatch_rejected() {
        let mut buf = encoded(&frame(b"body", b"pay"));
        buf[FRAME_HEADER_BYTES] ^= 1;
        check(&buf, FrameLimits::default(), "BodyCrcMismatch");
    }

    #[test]
    fn payload_crc_mismatch_rejected() {
        let mut buf = encoded(&frame(b"body", b"pay"));
        let last = buf.len() - 1;
        buf[last] ^= 1;
        check(&buf, FrameLimits::default(), "PayloadCrcMismatch");
        // A non-zero CRC on an empty payload is a mismatch too.
        let mut buf = encoded(&frame(b"body", b""));
        buf[28] = 1;
        check(&buf, FrameLimits::default(), "PayloadCrcMismatch");
    }

    #[test]
    fn truncated_at_eof_rejected() {
        let buf = encoded(&frame(b"body", b"payload"));
        for cut in [1, FRAME_HEADER_BYTES - 1, FRAME_HEADER_BYTES, buf.len() - 1] {
            check(&buf[..cut], FrameLimits::default(), "Truncated");
        }
        check(&[], FrameLimits::default(), "none");
    }

    #[test]
    fn partial_frame_waits_for_more() {
        let f = frame(b"body", b"payload");
        let all = encoded(&f);
        let mut codec = FrameCodec::default();
        let mut buf = BytesMut::new();
        for (i, byte) in all.iter().enumerate() {
            buf.put_u8(*byte);
            let got = codec.decode(&mut buf).unwrap();
            assert_eq!(got.is_some(), i == all.len() - 1);
        }
    }

    #[test]
    fn encoder_rejects_over_limit() {
        let mut codec = FrameCodec::new(FrameLimits {
            body_bytes_max: 2,
            payload_bytes_max: 2,
        });
        let mut buf = BytesMut::new();
        let err = codec.encode(frame(b"abc", b""), &mut buf).unwrap_err();
        assert!(matches!(err, FrameError::BodyTooLarge { len: 3, max: 2 }));
        let err = codec.encode(frame(b"", b"abc"), &mut buf).unwrap_err();
        assert!(matches!(
            err,
            FrameError::PayloadTooLarge { len: 3, max: 2 }
        ));
        assert!(buf.is_empty());
    }
}
