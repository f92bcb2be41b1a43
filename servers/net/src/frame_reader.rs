//! Frames from a byte stream, with large payloads read straight into their
//! own aligned, pooled buffers ([`crate::payload`]).
//!
//! Small frames are decoded from one growing read buffer as before. When a
//! frame's header announces a payload of at least
//! [`LARGE_PAYLOAD_BYTES_MIN`], the header and body are taken from the read
//! buffer, what already arrived of the payload is moved to a
//! [`PayloadBuf`], and further reads go into that buffer directly until the
//! payload is complete.
//!
//! A frame whose payload the sender put in its shared-memory region
//! ([`crate::shared`]) is resolved here: the payload is copied out of the
//! region this connection mapped, into a pooled buffer, before the frame is
//! returned; a connection that maps no region refuses such a frame.
//!
//! [`FrameReader::fill`] is cancel safe (a read that did not complete
//! consumed nothing), so callers may race it against timers and shutdown.

use bytes::BytesMut;
use r3fs_wire::frame::{Frame, FrameCodec, FrameError, FrameHead, FrameLimits};
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio_util::codec::Decoder;

use crate::payload::PayloadBuf;
use crate::shared::RegionCell;

/// Read buffer reserved per read of small frames.
const READ_BUFFER_BYTES: usize = 64 * 1024;
/// Below this much free read buffer, more is reserved before reading.
const READ_BUFFER_FREE_BYTES_MIN: usize = 4 * 1024;

/// See the module docs.
pub(crate) struct FrameReader {
    codec: FrameCodec,
    buf: BytesMut,
    large: Option<LargePayload>,
    /// The peer's region, once the handshake mapped it.
    region: RegionCell,
}

/// A frame whose payload is being read into its own buffer.
struct LargePayload {
    head: FrameHead,
    payload: PayloadBuf,
    filled: usize,
}

impl FrameReader {
    #[cfg(test)]
    pub(crate) fn new(limits: FrameLimits) -> FrameReader {
        FrameReader::with_region(limits, RegionCell::default())
    }

    /// A reader that resolves shared payloads through the region `region`
    /// holds once it is set.
    pub(crate) fn with_region(limits: FrameLimits, region: RegionCell) -> FrameReader {
        FrameReader {
            codec: FrameCodec::new(limits),
            buf: BytesMut::with_capacity(READ_BUFFER_BYTES),
            large: None,
            region,
        }
    }

    /// The next complete frame from what has been read, if any.
    pub(crate) fn try_frame(&mut self) -> Result<Option<Frame>, FrameError> {
        if let Some(large) = &self.large {
            if large.filled < large.head.payload_len() {
                return Ok(None);
            }
            let large = self.large.take().expect("checked");
            return large.head.finish(large.payload.freeze()).map(Some);
        }
        if let Some(head) = self.codec.decode_head(&mut self.buf)? {
            if let Some(at) = head.shared() {
                let Some(region) = self.region.get() else {
                    return Err(FrameError::SharedPayload {
                        reason: "the peer sent a shared payload before any region was agreed"
                            .to_string(),
                    });
                };
                let payload = region
                    .take(at)
                    .map_err(|reason| FrameError::SharedPayload { reason })?;
                return head.finish(payload).map(Some);
            }
            let len = head.payload_len();
            let mut payload = PayloadBuf::with_len(len);
            let arrived = self.buf.split_to(self.buf.len().min(len));
            let mut filled = 0;
            while filled < arrived.len() {
                let spare = payload.spare(filled);
                let n = spare.len().min(arrived.len() - filled);
                spare[..n].copy_from_slice(&arrived[filled..filled + n]);
                filled += n;
            }
            self.large = Some(LargePayload {
                head,
                payload,
                filled,
            });
            return self.try_frame();
        }
        self.codec.decode(&mut self.buf)
    }

    /// Whether part of a frame has been read (so the stream may not end here).
    pub(crate) fn is_mid_frame(&self) -> bool {
        self.large.is_some() || !self.buf.is_empty()
    }

    /// Bytes read but not yet returned as frames.
    pub(crate) fn buffered(&self) -> usize {
        self.buf.len() + self.large.as_ref().map_or(0, |l| l.filled)
    }

    /// Reads once from `rd`; `Ok(0)` at the end of the stream. Cancel safe.
    pub(crate) async fn fill<R: AsyncRead + Unpin>(
        &mut self,
        rd: &mut R,
    ) -> std::io::Result<usize> {
        if let Some(large) = &mut self.large {
            let filled = large.filled;
            let n = rd.read(large.payload.spare(filled)).await?;
            large.filled += n;
            return Ok(n);
        }
        if self.buf.capacity() - self.buf.len() < READ_BUFFER_FREE_BYTES_MIN {
            self.buf.reserve(READ_BUFFER_BYTES);
        }
        rd.read_buf(&mut self.buf).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use r3fs_wire::frame::{FrameKind, LARGE_PAYLOAD_BYTES_MIN};
    use tokio::io::AsyncWriteExt;
    use tokio_util::codec::Encoder;

    fn frame(payload_len: usize, crc_in_body: bool, id: u64) -> Frame {
        Frame {
            kind: FrameKind::Request,
            msg_type: 0x0301,
            request_id: id,
            body: Bytes::from(vec![id as u8; 40]),
            payload: Bytes::from(
                (0..payload_len)
                    .map(|i| (i % 251) as u8)
                    .collect::<Vec<_>>(),
            ),
            payload_crc_in_body: crc_in_body,
        }
    }

    async fn read_all(bytes: Vec<u8>, piece: usize) -> Result<Vec<Frame>, String> {
        let (mut tx, mut rx) = tokio::io::duplex(piece.max(1));
        let writer = tokio::spawn(async move {
            for chunk in bytes.chunks(piece.max(1)) {
                if tx.write_all(chunk).await.is_err() {
                    break;
                }
            }
        });
        let mut reader = FrameReader::new(FrameLimits::default());
        let mut frames = Vec::new();
        loop {
            while let Some(f) = reader.try_frame().map_err(|e| e.to_string())? {
                frames.push(f);
            }
            if reader.fill(&mut rx).await.map_err(|e| e.to_string())? == 0 {
                writer.await.unwrap();
                return if reader.is_mid_frame() {
                    Err(format!(
                        "ended inside a frame ({} bytes)",
                        reader.buffered()
                    ))
                } else {
                    Ok(frames)
                };
            }
        }
    }

    #[tokio::test]
    async fn small_and_large_frames_come_through_any_split_with_large_payloads_aligned() {
        let frames = vec![
            frame(10, false, 1),
            frame(LARGE_PAYLOAD_BYTES_MIN, false, 2),
            frame(0, false, 3),
            frame(1024 * 1024 + 5, true, 4),
            frame(LARGE_PAYLOAD_BYTES_MIN - 1, false, 5),
            frame(3 * LARGE_PAYLOAD_BYTES_MIN, false, 6),
        ];
        let mut bytes = BytesMut::new();
        for f in &frames {
            FrameCodec::default().encode(f.clone(), &mut bytes).unwrap();
        }
        for piece in [1, 7, 4096, 65_536, 1 << 20, bytes.len()] {
            let got = read_all(bytes.to_vec(), piece).await.unwrap();
            assert_eq!(got, frames, "pieces of {piece}");
            for f in got
                .iter()
                .filter(|f| f.payload.len() >= LARGE_PAYLOAD_BYTES_MIN)
            {
                assert_eq!(
                    f.payload.as_ptr() as usize % crate::payload::PAYLOAD_ALIGN,
                    0
                );
            }
        }
    }

    #[tokio::test]
    async fn a_damaged_large_payload_is_refused_unless_its_handler_checks_it() {
        for crc_in_body in [false, true] {
            let mut bytes = BytesMut::new();
            let f = frame(2 * LARGE_PAYLOAD_BYTES_MIN, crc_in_body, 9);
            FrameCodec::default().encode(f, &mut bytes).unwrap();
            let last = bytes.len() - 1;
            bytes[last] ^= 1;
            let got = read_all(bytes.to_vec(), 1000).await;
            match crc_in_body {
                false => assert!(got.unwrap_err().contains("payload crc mismatch")),
                true => assert_eq!(got.unwrap().len(), 1),
            }
        }
    }

    #[tokio::test]
    async fn a_stream_ending_inside_a_large_payload_is_reported() {
        let mut bytes = BytesMut::new();
        FrameCodec::default()
            .encode(frame(2 * LARGE_PAYLOAD_BYTES_MIN, false, 1), &mut bytes)
            .unwrap();
        let cut = bytes.len() - 10;
        let got = read_all(bytes[..cut].to_vec(), 5000).await;
        assert!(got.unwrap_err().contains("ended inside a frame"));
    }
}
