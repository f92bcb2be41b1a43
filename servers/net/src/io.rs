//! The batching frame writer shared by server and client connections, which
//! also puts large payloads in the connection's shared region once the
//! peer mapped it ([`crate::shared`]).

use std::io;

use bytes::BytesMut;
use r3fs_wire::frame::{Frame, FrameKind};
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;

use crate::shared::{RegionCell, SHARED_PAYLOAD_BYTES_MIN};

/// Most bytes gathered from queued frames before one write.
pub const WRITE_BATCH_BYTES_MAX: usize = 1024 * 1024;
/// Initial write buffer.
const WRITE_BUFFER_BYTES: usize = 64 * 1024;
/// A buffer grown beyond this by a large frame is dropped after use.
const WRITE_BUFFER_RETAIN_BYTES_MAX: usize = 4 * WRITE_BATCH_BYTES_MAX;
/// Payloads at least this large are written from their own buffer, not copied.
const PAYLOAD_INLINE_BYTES_MAX: usize = 32 * 1024;

/// Writes frames from `rx` until every sender is gone, then shuts the stream
/// down. Frames queued together go out in one write; the stream is flushed
/// whenever the queue is empty. Large payloads go through the region
/// `shared` holds, once the handshake set it and while it has a free slot.
pub(crate) async fn write_frames<W: AsyncWrite + Unpin>(
    mut w: W,
    mut rx: mpsc::Receiver<Frame>,
    shared: RegionCell,
) -> io::Result<()> {
    let mut buf = BytesMut::with_capacity(WRITE_BUFFER_BYTES);
    while let Some(frame) = rx.recv().await {
        put(&mut w, &mut buf, &frame, &shared).await?;
        while buf.len() < WRITE_BATCH_BYTES_MAX {
            let Ok(frame) = rx.try_recv() else { break };
            put(&mut w, &mut buf, &frame, &shared).await?;
        }
        if !buf.is_empty() {
            w.write_all(&buf).await?;
            buf.clear();
        }
        w.flush().await?;
        if buf.capacity() > WRITE_BUFFER_RETAIN_BYTES_MAX {
            buf = BytesMut::with_capacity(WRITE_BUFFER_BYTES);
        }
    }
    w.shutdown().await
}

async fn put<W: AsyncWrite + Unpin>(
    w: &mut W,
    buf: &mut BytesMut,
    frame: &Frame,
    shared: &RegionCell,
) -> io::Result<()> {
    if frame.payload.len() >= SHARED_PAYLOAD_BYTES_MIN && frame.kind != FrameKind::ErrorResponse {
        if let Some(slot) = shared.get().and_then(|region| region.put(&frame.payload)) {
            frame.encode_shared(slot, buf);
            return Ok(());
        }
    }
    frame.encode_head(buf);
    if frame.payload.len() < PAYLOAD_INLINE_BYTES_MAX {
        buf.extend_from_slice(&frame.payload);
        return Ok(());
    }
    w.write_all(buf).await?;
    buf.clear();
    w.write_all(&frame.payload).await
}
