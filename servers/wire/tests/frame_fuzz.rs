//! Property tests: `FrameCodec::decode` never panics on any input, and
//! encoding then decoding any frame gives it back, however the stream is split.

use bytes::{Bytes, BytesMut};
use proptest::prelude::*;
use r3fs_wire::frame::{Frame, FrameCodec, FrameKind, FrameLimits};
use tokio_util::codec::{Decoder, Encoder};

/// Small limits so random lengths hit both sides of them.
const LIMITS: FrameLimits = FrameLimits {
    body_bytes_max: 4096,
    payload_bytes_max: 8192,
};

fn arb_frame() -> impl Strategy<Value = Frame> {
    (
        prop_oneof![
            Just(FrameKind::Request),
            Just(FrameKind::Response),
            Just(FrameKind::ErrorResponse)
        ],
        any::<u16>(),
        any::<u64>(),
        proptest::collection::vec(any::<u8>(), 0..512),
        proptest::collection::vec(any::<u8>(), 0..1024),
        any::<bool>(),
    )
        .prop_map(
            |(kind, msg_type, request_id, body, payload, crc_in_body)| Frame {
                kind,
                msg_type,
                request_id,
                body: Bytes::from(body),
                payload: Bytes::from(payload),
                // Only requests may leave the payload CRC to the body.
                payload_crc_in_body: crc_in_body && kind == FrameKind::Request,
            },
        )
}

fn encode_all(frames: &[Frame]) -> Vec<u8> {
    let mut codec = FrameCodec::new(LIMITS);
    let mut buf = BytesMut::new();
    for f in frames {
        codec.encode(f.clone(), &mut buf).unwrap();
    }
    buf.to_vec()
}

/// Feeds `chunks` one after another, then EOF; returns the frames decoded
/// before the first error, and whether an error happened.
fn feed(chunks: &[&[u8]]) -> (Vec<Frame>, bool) {
    let mut codec = FrameCodec::new(LIMITS);
    let mut buf = BytesMut::new();
    let mut frames = Vec::new();
    for chunk in chunks {
        buf.extend_from_slice(chunk);
        loop {
            match codec.decode(&mut buf) {
                Ok(Some(f)) => frames.push(f),
                Ok(None) => break,
                Err(_) => return (frames, true),
            }
        }
    }
    loop {
        match codec.decode_eof(&mut buf) {
            Ok(Some(f)) => frames.push(f),
            Ok(None) => return (frames, false),
            Err(_) => return (frames, true),
        }
    }
}

fn split_at_points(bytes: &[u8], mut points: Vec<usize>) -> Vec<&[u8]> {
    points.iter_mut().for_each(|p| *p %= bytes.len() + 1);
    points.sort_unstable();
    let mut chunks = Vec::new();
    let mut start = 0;
    for p in points {
        chunks.push(&bytes[start..p]);
        start = p;
    }
    chunks.push(&bytes[start..]);
    chunks
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
        let (frames, _) = feed(&[&bytes]);
        for f in frames {
            prop_assert!(f.body.len() <= LIMITS.body_bytes_max as usize);
        }
    }

    #[test]
    fn arbitrary_bytes_after_valid_magic_never_panic(
        tail in proptest::collection::vec(any::<u8>(), 0..2048),
    ) {
        let mut bytes = b"R3FS".to_vec();
        bytes.extend_from_slice(&tail);
        feed(&[&bytes]);
    }

    #[test]
    fn round_trip_any_split(
        frames in proptest::collection::vec(arb_frame(), 1..5),
        points in proptest::collection::vec(any::<usize>(), 0..8),
    ) {
        let bytes = encode_all(&frames);
        let chunks = split_at_points(&bytes, points);
        let (got, failed) = feed(&chunks);
        prop_assert!(!failed);
        prop_assert_eq!(got, frames);
    }

    #[test]
    fn mutated_stream_never_panics_and_never_yields_corrupt_frames(
        frames in proptest::collection::vec(arb_frame(), 1..4),
        mutations in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..6),
        points in proptest::collection::vec(any::<usize>(), 0..6),
        cut in any::<usize>(),
    ) {
        let mut bytes = encode_all(&frames);
        for (at, xor) in mutations {
            let at = at % bytes.len();
            bytes[at] ^= xor;
        }
        bytes.truncate(cut % (bytes.len() + 1));
        let chunks = split_at_points(&bytes, points);
        let (got, _) = feed(&chunks);
        // A mutation may hit only header fields the CRCs do not cover
        // (msg_type, request_id), so frames may differ there; sizes and
        // contents that are CRC-covered must still be consistent.
        for f in got {
            prop_assert!(f.body.len() <= LIMITS.body_bytes_max as usize);
            prop_assert!(f.payload.len() <= LIMITS.payload_bytes_max as usize);
        }
    }
}
