//! An allowlisted peer that sends garbage on `/oncemesh/sync/1` or
//! `/oncemesh/sync/3` (compressed) cannot crash the node: every bad message
//! is dropped, counted and logged, and the node keeps serving.

mod support;

use bytes::Bytes;
use futures::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, StreamExt};
use libp2p::request_response::{self, ProtocolSupport};
use libp2p::{identity::Keypair, noise, tcp, yamux, Multiaddr, StreamProtocol};
use oncemesh::hlc::Timestamp;
use oncemesh::ledger::{DocId, Windows};
use oncemesh::p2p::codec::{
    decode_response, encode_request, MAX_FRAME, PROTOCOL, PROTOCOL_UNCOMPRESSED,
};
use oncemesh::sync::message::{DocMessage, SyncRequest};
use serde_json::json;
use std::io;
use std::time::Duration;
use support::{Cluster, ClusterOptions};

/// A codec that writes raw bytes as the request and reads whatever comes back.
#[derive(Clone, Default)]
struct RawCodec;

impl request_response::Codec for RawCodec {
    type Protocol = StreamProtocol;
    type Request = Vec<u8>;
    type Response = Vec<u8>;

    async fn read_request<T: AsyncRead + Unpin + Send>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
    ) -> io::Result<Vec<u8>> {
        let mut buf = Vec::new();
        io.read_to_end(&mut buf).await?;
        Ok(buf)
    }
    async fn read_response<T: AsyncRead + Unpin + Send>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
    ) -> io::Result<Vec<u8>> {
        let mut buf = Vec::new();
        io.take(1 << 20).read_to_end(&mut buf).await?;
        Ok(buf)
    }
    async fn write_request<T: AsyncWrite + Unpin + Send>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        req: Vec<u8>,
    ) -> io::Result<()> {
        io.write_all(&req).await?;
        io.close().await
    }
    async fn write_response<T: AsyncWrite + Unpin + Send>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        res: Vec<u8>,
    ) -> io::Result<()> {
        io.write_all(&res).await?;
        io.close().await
    }
}

fn frame(body: &[u8]) -> Vec<u8> {
    let mut out = (body.len() as u32).to_be_bytes().to_vec();
    out.extend_from_slice(body);
    out
}

/// A well-formed request body (the node's default windows) whose one
/// document, of `epoch` and `shard`, carries `message`: made by the node's
/// own encoder, so the bad parts are only the ones meant.
fn body_with_message(epoch: u32, shard: u8, message: &[u8]) -> Vec<u8> {
    let request = SyncRequest {
        hlc: Timestamp::new(1, 0),
        // A version 3 frame, as earlier versions send: it decodes under
        // every protocol.
        origin: None,
        window_ms: Windows::default().window_ms,
        connected: Vec::new(),
        docs: vec![DocMessage {
            doc: DocId { epoch, shard },
            digest: [0; 32],
            message: Bytes::copy_from_slice(message),
        }],
    };
    encode_request(&request)
}

fn request_with_message(epoch: u32, shard: u8, message: &[u8]) -> Vec<u8> {
    frame(&body_with_message(epoch, shard, message))
}

/// Sends each request as is to node 0 of `c` on `protocol`; returns how
/// many completed (answered or failed) within 20 s, and the answers.
async fn send_raw(
    c: &Cluster,
    keypair: &Keypair,
    protocol: StreamProtocol,
    requests: Vec<Vec<u8>>,
) -> (usize, Vec<Vec<u8>>) {
    let target: Multiaddr = format!("/ip4/127.0.0.1/tcp/{}", c.node(0).listen_port())
        .parse()
        .unwrap();
    let node_id: libp2p::PeerId = c.node(0).peer_id().parse().unwrap();
    let mut swarm = libp2p::SwarmBuilder::with_existing_identity(keypair.clone())
        .with_tokio()
        .with_tcp(
            tcp::Config::default(),
            noise::Config::new,
            yamux::Config::default,
        )
        .unwrap()
        .with_behaviour(|_| {
            request_response::Behaviour::<RawCodec>::new(
                [(protocol, ProtocolSupport::Outbound)],
                request_response::Config::default().with_request_timeout(Duration::from_secs(10)),
            )
        })
        .unwrap()
        .build();
    swarm.add_peer_address(node_id, target);
    let sent = requests.len();
    for request in requests {
        swarm.behaviour_mut().send_request(&node_id, request);
    }
    let (mut finished, mut answers) = (0, Vec::new());
    let deadline = tokio::time::sleep(Duration::from_secs(20));
    tokio::pin!(deadline);
    while finished < sent {
        tokio::select! {
            event = swarm.select_next_some() => match event {
                libp2p::swarm::SwarmEvent::Behaviour(request_response::Event::Message {
                    message: request_response::Message::Response { response, .. },
                    ..
                }) => {
                    finished += 1;
                    answers.push(response);
                }
                libp2p::swarm::SwarmEvent::Behaviour(
                    request_response::Event::OutboundFailure { .. },
                ) => finished += 1,
                _ => {}
            },
            _ = &mut deadline => break,
        }
    }
    (finished, answers)
}

/// Sends bad requests to node 0 of `c` on `protocol`, checks each one
/// completed, and returns the node's count of dropped messages afterwards.
async fn send_garbage(
    c: &Cluster,
    keypair: &Keypair,
    protocol: StreamProtocol,
    requests: Vec<Vec<u8>>,
) -> f64 {
    let sent = requests.len();
    let name = protocol.to_string();
    let (finished, _) = send_raw(c, keypair, protocol, requests).await;
    assert_eq!(
        finished,
        sent,
        "not every garbage request on {name} completed\n{}",
        c.logs(30)
    );
    c.node(0)
        .metric("oncemesh_dropped_peer_messages_total")
        .await
}

/// A body as a zstd frame, the way `/oncemesh/sync/2` carries it.
fn compress(body: &[u8]) -> std::io::Result<Vec<u8>> {
    zstd::bulk::compress(body, 1)
}

/// The epoch this machine's clock is in, with the node's default windows.
fn current_epoch() -> u32 {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970");
    Windows::default().epoch_of(now.as_millis() as u64)
}

/// The first sync message of an empty document: valid, and carrying nothing.
fn empty_sync_message() -> Vec<u8> {
    use automerge::sync::SyncDoc;
    automerge::Automerge::new()
        .generate_sync_message(&mut automerge::sync::State::new())
        .expect("a first message")
        .encode()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_on_the_sync_protocol_is_dropped_and_counted() {
    let keypair = Keypair::generate_ed25519();
    let hostile_id = keypair.public().to_peer_id();
    // Allowlist the hostile peer (at an address nobody listens on).
    let allow = format!("/ip4/127.0.0.1/tcp/9/p2p/{hostile_id}");
    let c = Cluster::start(1, ClusterOptions::default().args(["--peer", &allow])).await;
    assert_eq!(
        c.node(0)
            .post_json("/v1/allocations", &json!({"key": "before", "payload": {}}))
            .await
            .0,
        201
    );

    let garbage: Vec<Vec<u8>> = vec![
        b"hello there".to_vec(),         // short, nonsense length prefix
        frame(&[0xff; 64]),              // wrong version
        frame(&[1, 0, 0]),               // truncated header
        u32::MAX.to_be_bytes().to_vec(), // absurd length
        request_with_message(current_epoch(), 3, b"not an automerge sync message"), // undecodable
        request_with_message(current_epoch(), 200, b"x"), // shard that does not exist
        // A well-formed message for a document of the last epoch there is,
        // which no working clock reaches: it must not make a document.
        request_with_message(u32::MAX, 2, &empty_sync_message()),
        vec![], // nothing at all
    ];
    let dropped_uncompressed = send_garbage(&c, &keypair, PROTOCOL_UNCOMPRESSED, garbage).await;

    let compressed: Vec<Vec<u8>> = vec![
        frame(b"not zstd at all"),
        // A few kilobytes that would unpack past the frame limit.
        frame(&compress(&vec![0; MAX_FRAME + 1]).unwrap()),
        // Decompresses fine, then does not decode as a request.
        frame(&compress(&[0xff; 64]).unwrap()),
        // Decompresses and decodes; its one message does not.
        frame(
            &compress(&body_with_message(
                current_epoch(),
                5,
                b"still not a sync message",
            ))
            .unwrap(),
        ),
    ];
    let dropped_before_good = send_garbage(&c, &keypair, PROTOCOL, compressed).await;

    // A good request is answered on both: `/1` is what a node of an earlier
    // version speaks, `/3` (compressed) what this version speaks.
    let good = body_with_message(current_epoch(), 1, &empty_sync_message());
    for (protocol, frame_of_good) in [
        (PROTOCOL_UNCOMPRESSED, frame(&good)),
        (PROTOCOL, frame(&compress(&good).unwrap())),
    ] {
        let name = protocol.to_string();
        let (_, answers) = send_raw(&c, &keypair, protocol, vec![frame_of_good]).await;
        let answer = answers
            .first()
            .unwrap_or_else(|| panic!("no answer on {name}\n{}", c.logs(30)));
        let response = decode_response(answer.get(4..).unwrap_or_default())
            .unwrap_or_else(|e| panic!("answer on {name} does not decode: {e}"));
        assert!(!response.digests.is_empty(), "{name}: {response:?}");
    }

    // Still serving, nothing corrupted, and the drops are counted.
    let (code, health) = c.node(0).get_json("/v1/health").await;
    assert_eq!(code, 200);
    assert_eq!(health["ledger"]["keys"], 1, "{health}");
    assert_eq!(
        c.node(0)
            .post_json("/v1/allocations", &json!({"key": "after", "payload": {}}))
            .await
            .0,
        201
    );
    let metrics = c.node(0).metrics_text().await;
    let dropped = c
        .node(0)
        .metric("oncemesh_dropped_peer_messages_total")
        .await;
    assert!(
        dropped_uncompressed >= 6.0,
        "only {dropped_uncompressed} drops counted\n{metrics}"
    );
    assert!(
        dropped_before_good >= dropped_uncompressed + 4.0,
        "compressed garbage: only {} drops counted\n{metrics}",
        dropped_before_good - dropped_uncompressed
    );
    assert_eq!(
        dropped, dropped_before_good,
        "a good request was dropped\n{metrics}"
    );
    for kind in ["undecodable", "bad-shard", "too-far-ahead"] {
        assert!(
            metrics.contains(&format!(r#"kind="{kind}""#)),
            "no {kind} drop counted\n{metrics}"
        );
    }
    let (_, documents) = c.node(0).get_json("/v1/documents").await;
    assert!(
        !documents.to_string().contains(&u32::MAX.to_string()),
        "a document was made for the far future: {documents}"
    );
    assert!(c.node(0).is_running());
}
