//! A raw socket sends bad or partial frames: the server closes that
//! connection (or answers with an error frame) and keeps serving others.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use common::*;
use futures::StreamExt;
use r3fs_net::{CallOptions, ClientConfig, RpcClient, RpcServer, ServerConfig};
use r3fs_wire::frame::{Frame, FrameCodec, FrameKind, FRAME_HEADER_BYTES};
use r3fs_wire::{body, ErrorBody, ErrorCode, Method};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::codec::{Encoder, FramedRead};

const CLOSE_WAIT: Duration = Duration::from_secs(3);

fn short_timeouts() -> ServerConfig {
    ServerConfig {
        frame_read_timeout: Duration::from_millis(200),
        idle_timeout: Duration::from_millis(300),
        ..ServerConfig::default()
    }
}

fn request<M: Method>(request_id: u64, body: Bytes) -> Frame {
    Frame {
        kind: FrameKind::Request,
        msg_type: M::ID,
        request_id,
        body,
        payload: Bytes::new(),
        payload_crc_in_body: false,
    }
}

fn encode(frame: Frame) -> BytesMut {
    let mut buf = BytesMut::new();
    FrameCodec::default().encode(frame, &mut buf).unwrap();
    buf
}

/// Waits until the server closes `stream` (EOF or reset); returns how long it took.
async fn expect_closed(stream: &mut TcpStream) -> Duration {
    let start = Instant::now();
    let mut buf = [0u8; 1024];
    loop {
        match tokio::time::timeout(CLOSE_WAIT, stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return start.elapsed(),
            Ok(Ok(_)) => continue,
            Err(_) => panic!("server did not close the connection within {CLOSE_WAIT:?}"),
        }
    }
}

async fn expect_others_served(server: &RpcServer) {
    let client = RpcClient::new(ClientConfig::default());
    let got = client
        .call::<Echo>(
            server.local_addr(),
            &"still here".to_string(),
            CallOptions::default(),
        )
        .await
        .unwrap();
    assert_eq!(got, "still here");
}

/// Sends `bytes` on a fresh connection and checks the server closes it.
async fn check_closes(bytes: &[u8]) -> Duration {
    let (server, _) = server(short_timeouts()).await;
    let mut stream = TcpStream::connect(server.local_addr()).await.unwrap();
    stream.write_all(bytes).await.unwrap();
    let took = expect_closed(&mut stream).await;
    expect_others_served(&server).await;
    server.shutdown().await;
    took
}

fn valid_echo() -> BytesMut {
    encode(request::<Echo>(1, body::encode(&"hi".to_string())))
}

#[tokio::test]
async fn garbage_closes_connection() {
    init_tracing();
    check_closes(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n and some more bytes to fill a header").await;
}

#[tokio::test]
async fn bad_magic_closes_connection() {
    let mut bytes = valid_echo();
    bytes[1] ^= 0x40;
    check_closes(&bytes).await;
}

#[tokio::test]
async fn unknown_flags_close_connection() {
    let mut bytes = valid_echo();
    bytes[4..6].copy_from_slice(&0x0100u16.to_le_bytes());
    check_closes(&bytes).await;
}

#[tokio::test]
async fn bad_body_crc_closes_connection() {
    let mut bytes = valid_echo();
    bytes[FRAME_HEADER_BYTES] ^= 1;
    check_closes(&bytes).await;
}

#[tokio::test]
async fn response_frame_from_client_closes_connection() {
    let mut frame = request::<Echo>(1, body::encode(&"hi".to_string()));
    frame.kind = FrameKind::Response;
    check_closes(&encode(frame)).await;
}

#[tokio::test]
async fn four_gib_length_rejected_without_waiting_for_it() {
    for offset in [16, 20] {
        let mut bytes = valid_echo();
        bytes[offset..offset + 4].copy_from_slice(&u32::MAX.to_le_bytes());
        // Only the header: the server must not wait for (or reserve) 4 GiB.
        let took = check_closes(&bytes[..FRAME_HEADER_BYTES]).await;
        assert!(took < Duration::from_millis(150), "took {took:?}");
    }
}

#[tokio::test]
async fn stalled_frame_closed_after_frame_read_timeout() {
    let bytes = valid_echo();
    let took = check_closes(&bytes[..FRAME_HEADER_BYTES + 1]).await;
    assert!(
        took >= Duration::from_millis(150),
        "closed too early: {took:?}"
    );
}

#[tokio::test]
async fn stalled_header_closed_after_frame_read_timeout() {
    let bytes = valid_echo();
    let took = check_closes(&bytes[..5]).await;
    assert!(
        took >= Duration::from_millis(150),
        "closed too early: {took:?}"
    );
}

#[tokio::test]
async fn idle_connection_closed() {
    let took = check_closes(&[]).await;
    assert!(
        took >= Duration::from_millis(250),
        "closed too early: {took:?}"
    );
}

#[tokio::test]
async fn slow_but_steady_sender_not_cut_by_idle_timeout() {
    let (server, _) = server(short_timeouts()).await;
    let mut stream = TcpStream::connect(server.local_addr()).await.unwrap();
    let (rd, mut wr) = stream.split();
    let mut answers = FramedRead::new(rd, FrameCodec::default());
    for id in 0..4 {
        tokio::time::sleep(Duration::from_millis(150)).await;
        wr.write_all(&encode(request::<Echo>(id, body::encode(&"x".to_string()))))
            .await
            .unwrap();
        let answer = answers.next().await.unwrap().unwrap();
        assert_eq!((answer.kind, answer.request_id), (FrameKind::Response, id));
    }
    server.shutdown().await;
}

/// Sends `frame` on `stream` and returns the answer.
async fn exchange(stream: &mut TcpStream, frame: Frame) -> Frame {
    stream.write_all(&encode(frame)).await.unwrap();
    let mut answers = FramedRead::new(stream, FrameCodec::default());
    tokio::time::timeout(CLOSE_WAIT, answers.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap()
}

async fn check_error_answer(addr: SocketAddr, frame: Frame, code: ErrorCode) {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let id = frame.request_id;
    let answer = exchange(&mut stream, frame).await;
    assert_eq!(
        (answer.kind, answer.request_id),
        (FrameKind::ErrorResponse, id)
    );
    let error: ErrorBody = body::decode(&answer.body).unwrap();
    assert_eq!(error.code, code, "{}", error.message);
    // The connection stays usable.
    let answer = exchange(
        &mut stream,
        request::<Echo>(id + 1, body::encode(&"ok".to_string())),
    )
    .await;
    assert_eq!(
        (answer.kind, answer.request_id),
        (FrameKind::Response, id + 1)
    );
    assert_eq!(body::decode::<String>(&answer.body).unwrap(), "ok");
}

#[tokio::test]
async fn undecodable_body_answered_bad_request() {
    let (server, _) = server(short_timeouts()).await;
    let addr = server.local_addr();
    check_error_answer(
        addr,
        request::<Echo>(7, Bytes::from_static(&[0xff, 0xff, 0xff])),
        ErrorCode::BadRequest,
    )
    .await;
    // Trailing bytes after a valid body are rejected too.
    let mut body = body::encode(&"hi".to_string()).to_vec();
    body.push(0);
    check_error_answer(
        addr,
        request::<Echo>(9, Bytes::from(body)),
        ErrorCode::BadRequest,
    )
    .await;
    server.shutdown().await;
}

#[tokio::test]
async fn unknown_method_answered_and_connection_kept() {
    let (server, _) = server(short_timeouts()).await;
    check_error_answer(
        server.local_addr(),
        request::<Unknown>(3, body::encode(&())),
        ErrorCode::UnknownMethod,
    )
    .await;
    server.shutdown().await;
}

#[tokio::test]
async fn payload_crc_left_to_a_handler_that_does_not_check_it_is_refused() {
    let (server, _) = server(short_timeouts()).await;
    let frame = Frame {
        payload: Bytes::from_static(b"unchecked bytes"),
        payload_crc_in_body: true,
        ..request::<Blob>(5, body::encode(&()))
    };
    check_error_answer(server.local_addr(), frame, ErrorCode::BadRequest).await;
    // A method whose answers carry their CRC takes bit 2 only as a request
    // for such an answer, never over a request payload.
    let frame = Frame {
        payload: Bytes::from_static(b"unchecked bytes"),
        payload_crc_in_body: true,
        ..request::<CheckedBlob>(9, body::encode(&"x".to_string()))
    };
    check_error_answer(server.local_addr(), frame, ErrorCode::BadRequest).await;
    server.shutdown().await;
}

/// A method whose answer carries its payload's CRC answers with that CRC
/// left out of the frame header only to a caller that asks (frame bit 2 on
/// its request), so older callers keep working; a caller refuses such an
/// answer for a method that does not carry the CRC.
#[tokio::test]
async fn a_response_payload_crc_in_the_body_is_only_for_callers_that_check_it() {
    let (server, _) = server(short_timeouts()).await;
    let addr = server.local_addr();
    let text = "bytes the caller checks".to_string();
    let mut stream = TcpStream::connect(addr).await.unwrap();
    for asks in [false, true] {
        let frame = Frame {
            payload_crc_in_body: asks,
            ..request::<CheckedBlob>(7, body::encode(&text))
        };
        let answer = exchange(&mut stream, frame).await;
        assert_eq!(answer.kind, FrameKind::Response);
        assert_eq!(answer.payload_crc_in_body, asks);
        assert_eq!(answer.payload, text.as_bytes());
        let crc: u32 = body::decode(&answer.body).unwrap();
        assert_eq!(crc, crc_fast::crc32_iscsi(text.as_bytes()));
    }
    // RpcClient asks, and hands the payload to the caller to check.
    let rpc = RpcClient::new(ClientConfig::default());
    let opts = CallOptions::default();
    let (crc, got) = rpc
        .call_with_payload::<CheckedBlob>(addr, &text, Bytes::new(), opts)
        .await
        .unwrap();
    assert_eq!(
        (crc, &got[..]),
        (crc_fast::crc32_iscsi(text.as_bytes()), text.as_bytes())
    );
    // It does not ask for a method without the CRC, so the server answers
    // with the CRC in the header.
    let (_, got) = rpc
        .call_with_payload::<UncheckedBlob>(addr, &text, Bytes::new(), opts)
        .await
        .unwrap();
    assert_eq!(&got[..], text.as_bytes());
    server.shutdown().await;

    // A peer that leaves the CRC out unasked is refused.
    let listener = tokio::net::TcpListener::bind(localhost()).await.unwrap();
    let peer = listener.local_addr().unwrap();
    let fake = tokio::spawn(async move {
        let (mut stream, _) = listener.accept().await.unwrap();
        let mut requests = FramedRead::new(&mut stream, FrameCodec::default());
        let request = requests.next().await.unwrap().unwrap();
        let answer = Frame {
            kind: FrameKind::Response,
            body: body::encode(&0u32),
            payload: Bytes::from_static(b"unchecked"),
            payload_crc_in_body: true,
            ..request
        };
        stream.write_all(&encode(answer)).await.unwrap();
        stream
    });
    // (This peer answers only one frame: no shared-memory handshake first.)
    let rpc = RpcClient::new(ClientConfig {
        share_payloads: false,
        ..ClientConfig::default()
    });
    let refused = rpc
        .call_with_payload::<UncheckedBlob>(peer, &text, Bytes::new(), opts)
        .await;
    assert!(
        matches!(refused, Err(r3fs_net::RpcError::UncheckedPayload { .. })),
        "{refused:?}"
    );
    drop(fake.await.unwrap());
}

/// A client's region the server cannot map (another host's, say) is
/// refused with a reason, a confirmation of a region never offered is
/// answered `false`, a malformed offer is a bad request, and a shared
/// payload on a connection that agreed on no region closes it.
#[tokio::test]
async fn shared_memory_handshake_refuses_what_it_cannot_map() {
    use r3fs_wire::share::{ConfirmShared, RegionOffer, ShareAnswer, ShareRegion, ShareRequest};
    let (server, _) = server(short_timeouts()).await;
    let addr = server.local_addr();
    let mut stream = TcpStream::connect(addr).await.unwrap();
    // An fd of this process that is no payload region: what a peer on
    // another host, whose pid and fd mean something else here, looks like.
    let offer = RegionOffer {
        pid: std::process::id(),
        fd: 0,
        token: 1,
        slots: 8,
        slot_bytes: 1024 * 1024,
    };
    let share = ShareRequest {
        offer,
        wants_answers: true,
    };
    let answer = exchange(&mut stream, request::<ShareRegion>(1, body::encode(&share))).await;
    assert_eq!(answer.kind, FrameKind::Response);
    let answer: ShareAnswer = body::decode(&answer.body).unwrap();
    let reason = answer.refused.expect("refused");
    // A fixed reason: nothing about this host's files goes to the peer.
    assert_eq!(reason, "the offered region cannot be mapped here");
    assert_eq!(answer.offer, None, "no region for answers either");
    let confirmed = exchange(
        &mut stream,
        request::<ConfirmShared>(2, body::encode(&7u128)),
    )
    .await;
    assert!(!body::decode::<bool>(&confirmed.body).unwrap());
    // One try per connection: no probing of other pids and fds.
    let again = exchange(&mut stream, request::<ShareRegion>(5, body::encode(&share))).await;
    let again: ShareAnswer = body::decode(&again.body).unwrap();
    assert_eq!(
        again.refused.as_deref(),
        Some("this connection asked to share a region already")
    );
    check_error_answer(
        addr,
        request::<ShareRegion>(3, Bytes::from_static(b"\xff")),
        ErrorCode::BadRequest,
    )
    .await;
    // A shared payload anyway.
    let frame = Frame {
        payload: payload(100_000),
        ..request::<Blob>(4, body::encode(&()))
    };
    let mut bytes = BytesMut::new();
    frame.encode_shared(0, &mut bytes);
    stream.write_all(&bytes).await.unwrap();
    expect_closed(&mut stream).await;
    expect_others_served(&server).await;
    server.shutdown().await;
}

/// TCP that never vouches for the peer's host: how a connection from
/// another host looks to the RPC layer.
#[derive(Clone)]
struct ElsewhereTransport;

struct ElsewhereListener(r3fs_net::transport::TcpTransportListener);

impl r3fs_net::Transport for ElsewhereTransport {
    type Stream = TcpStream;
    type Listener = ElsewhereListener;

    async fn connect(&self, addr: SocketAddr) -> std::io::Result<TcpStream> {
        r3fs_net::TcpTransport.connect(addr).await
    }

    async fn bind(&self, addr: SocketAddr) -> std::io::Result<ElsewhereListener> {
        Ok(ElsewhereListener(r3fs_net::TcpTransport.bind(addr).await?))
    }
}

impl r3fs_net::Listener for ElsewhereListener {
    type Stream = TcpStream;

    async fn accept(&mut self) -> std::io::Result<(TcpStream, SocketAddr)> {
        self.0.accept().await
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.0.local_addr()
    }
}

/// A peer on another host is refused before the server looks for its
/// region, and a client that cannot tell the server is on its host does
/// not offer one.
#[tokio::test]
async fn peers_on_other_hosts_share_no_memory() {
    use r3fs_net::shared::SharedRegion;
    use r3fs_wire::share::{ShareAnswer, ShareRegion, ShareRequest};
    let elsewhere = RpcServer::bind_with(
        ElsewhereTransport,
        localhost(),
        router(&Counter::default()),
        ServerConfig::default(),
    )
    .await
    .unwrap();
    // A region this process could map: only the host check refuses it.
    let region = SharedRegion::create(2, 64 * 1024).unwrap();
    let share = ShareRequest {
        offer: region.offer(),
        wants_answers: true,
    };
    let mut stream = TcpStream::connect(elsewhere.local_addr()).await.unwrap();
    let answer = exchange(&mut stream, request::<ShareRegion>(1, body::encode(&share))).await;
    let answer: ShareAnswer = body::decode(&answer.body).unwrap();
    assert_eq!(
        answer.refused.as_deref(),
        Some("the client is not on this server's host")
    );
    assert_eq!(answer.offer, None);
    elsewhere.shutdown().await;

    let (server, _) = server(ServerConfig::default()).await;
    let client = RpcClient::with_transport(ElsewhereTransport, ClientConfig::default());
    echo_blob(&client, server.local_addr(), &payload(1 << 20), "1 MiB").await;
    assert_eq!(client.shared_payloads(), 0);
    server.shutdown().await;
}
