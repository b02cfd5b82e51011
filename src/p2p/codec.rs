//! Wire format of the one application protocol between nodes. A request
//! carries the sender's clock and time window, the peers it is connected
//! to, the heads digest of every live document, and automerge sync messages
//! for the documents that need one; the response carries the same of the
//! responder after applying them, without messages. The connected peers let
//! a node leave a change to its author ([`crate::ledger::relay`]).
//!
//! ```text
//! frame    = len:u32be body                  (len <= MAX_FRAME)
//! request  = version:u8 header count:u32be { doc digest:[32] msg_len:u32be msg }*
//! response = version:u8 header count:u32be { doc digest:[32] }*
//! header   = hlc [origin] window_ms:u64be peers:u8 { node_tag:[8] }*
//! origin   = wall_ms:u64be held_ms:u32be region_len:u8 region   (version 4 only)
//! hlc      = physical_ms:u64be logical:u32be
//! doc      = epoch:u32be shard:u8
//! ```
//!
//! Version 4 frames carry the sender's [`Origin`]: its region, as the
//! `region` label of per-peer metrics shows it, and its own wall clock,
//! from which the receiver of a response estimates the peer's clock offset
//! as NTP does. The HLC stamp cannot tell that: a node that merged a
//! skewed peer's stamps issues stamps as far ahead itself, so every peer
//! would look skewed.
//!
//! Under [`PROTOCOL_COMPACT`] (`/oncemesh/sync/4`, which only adds that
//! the node reads compact batches) and [`PROTOCOL`] (`/oncemesh/sync/3`)
//! frames are version 4 and a
//! request's body travels as one zstd frame that states its decompressed
//! size, at most [`MAX_FRAME`]. The records inside are JSON text: a frame
//! after a partition shrinks four times, which is what crosses the links
//! between regions, and what the encryption and multiplexing layers handle.
//! Nodes of earlier versions speak version 3 frames (no origin), compressed
//! under [`PROTOCOL_V2`] (`/oncemesh/sync/2`) or as they are under
//! [`PROTOCOL_UNCOMPRESSED`] (`/oncemesh/sync/1`): a node offers all three,
//! libp2p settles on the newest its peer knows, and a frame of either
//! version decodes under any of them, so a cluster can be upgraded one
//! node at a time. Responses are a few digests, never compressed.
//!
//! Decoding never panics. A request frame that is oversized, does not
//! decompress within the limit or does not decode is handed to the node as
//! [`InboundRequest::Malformed`] (the request-response layer would drop a
//! read error silently), so the node can count it and log it with the
//! sender's peer id; the node keeps serving.

use crate::hlc::Timestamp;
use crate::ledger::{DocId, NodeTag};
use crate::sync::message::{DocMessage, Origin, SyncRequest, SyncResponse};
use bytes::Bytes;
use futures::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use libp2p::StreamProtocol;
use std::io;

/// The protocol of this version: [`PROTOCOL`]'s frames, spoken by nodes
/// that read allocation batches in the compact layout. A peer that offers
/// it (identify lists it) is handed compact batches
/// ([`crate::ledger::Ledger::set_peer_reads_compact_batches`]).
pub const PROTOCOL_COMPACT: StreamProtocol = StreamProtocol::new("/oncemesh/sync/4");
/// Compressed requests and version 4 frames: what the previous version
/// speaks.
pub const PROTOCOL: StreamProtocol = StreamProtocol::new("/oncemesh/sync/3");
/// Compressed requests, version 3 frames: what the previous version speaks.
pub const PROTOCOL_V2: StreamProtocol = StreamProtocol::new("/oncemesh/sync/2");
/// Version 3 frames uncompressed: what nodes of earlier versions speak.
pub const PROTOCOL_UNCOMPRESSED: StreamProtocol = StreamProtocol::new("/oncemesh/sync/1");
/// zstd level of request bodies: the fastest standard level. On the frames
/// of a partition level 3 packed no smaller (8 % larger) and took more than
/// twice as long.
const ZSTD_LEVEL: i32 = 1;
/// Largest frame accepted or sent. A peer further behind than one frame can
/// carry catches up over several rounds only if automerge splits its
/// message, which it does not: the limit is sized for ~1M allocations.
pub const MAX_FRAME: usize = 64 * 1024 * 1024;
/// Frames without an [`Origin`], as earlier versions send them.
const VERSION_WITHOUT_ORIGIN: u8 = 3;
/// Frames with one.
const VERSION: u8 = 4;
/// Longest region name (as `--region` allows).
const MAX_REGION: usize = 64;
/// Most documents one frame may list.
const MAX_DOCS: usize = 1 << 16;

/// A request as read off the wire: well formed, or why it is not.
#[derive(Clone, Debug, PartialEq)]
pub enum InboundRequest {
    /// A request that decoded.
    Sync(SyncRequest),
    /// A request that did not; never sent, only received.
    Malformed(String),
}

/// The request-response codec for [`PROTOCOL`] and [`PROTOCOL_UNCOMPRESSED`].
#[derive(Clone, Default)]
pub struct SyncCodec;

fn invalid(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.to_owned())
}

/// The fields every frame starts with.
struct Header {
    hlc: Timestamp,
    origin: Option<Origin>,
    window_ms: u64,
    connected: Vec<NodeTag>,
    count: usize,
}

/// A cursor over a frame body that fails instead of panicking.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> io::Result<&'a [u8]> {
        if self.0.len() < n {
            return Err(invalid("frame is shorter than its fields"));
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }
    fn u8(&mut self) -> io::Result<u8> {
        Ok(self.take(1)?[0])
    }
    fn u32(&mut self) -> io::Result<u32> {
        let mut b = [0u8; 4];
        b.copy_from_slice(self.take(4)?);
        Ok(u32::from_be_bytes(b))
    }
    fn u64(&mut self) -> io::Result<u64> {
        let mut b = [0u8; 8];
        b.copy_from_slice(self.take(8)?);
        Ok(u64::from_be_bytes(b))
    }
    fn digest(&mut self) -> io::Result<[u8; 32]> {
        let mut d = [0u8; 32];
        d.copy_from_slice(self.take(32)?);
        Ok(d)
    }
    fn header(&mut self) -> io::Result<Header> {
        let version = self.u8()?;
        if version != VERSION && version != VERSION_WITHOUT_ORIGIN {
            return Err(invalid("unknown sync protocol version"));
        }
        let hlc = Timestamp::new(self.u64()?, self.u32()?);
        let origin = if version == VERSION {
            let wall_ms = self.u64()?;
            let held_ms = self.u32()?;
            let len = usize::from(self.u8()?);
            let region = std::str::from_utf8(self.take(len)?)
                .ok()
                .filter(|r| crate::config::is_valid_region(r))
                .ok_or_else(|| invalid("the sender's region is not a valid region name"))?;
            Some(Origin {
                region: region.to_owned(),
                wall_ms,
                held_ms,
            })
        } else {
            None
        };
        let window_ms = self.u64()?;
        let peers = usize::from(self.u8()?);
        let mut connected = Vec::with_capacity(peers);
        for _ in 0..peers {
            let mut tag = [0u8; 8];
            tag.copy_from_slice(self.take(8)?);
            connected.push(NodeTag(tag));
        }
        let count = self.u32()? as usize;
        if count > MAX_DOCS {
            return Err(invalid("too many documents in one frame"));
        }
        Ok(Header {
            hlc,
            origin,
            window_ms,
            connected,
            count,
        })
    }
    fn doc(&mut self) -> io::Result<DocId> {
        Ok(DocId {
            epoch: self.u32()?,
            shard: self.u8()?,
        })
    }
    fn finish(&self) -> io::Result<()> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(invalid("trailing bytes after the last field"))
        }
    }
}

/// Decodes a request body.
pub fn decode_request(body: &Bytes) -> io::Result<SyncRequest> {
    let mut r = Reader(body);
    let header = r.header()?;
    let mut docs = Vec::with_capacity(header.count.min(1024));
    for _ in 0..header.count {
        let doc = r.doc()?;
        let digest = r.digest()?;
        let len = r.u32()? as usize;
        docs.push(DocMessage {
            doc,
            digest,
            message: body.slice_ref(r.take(len)?),
        });
    }
    r.finish()?;
    Ok(SyncRequest {
        hlc: header.hlc,
        origin: header.origin,
        window_ms: header.window_ms,
        connected: header.connected,
        docs,
    })
}

/// Decodes a response body.
pub fn decode_response(body: &[u8]) -> io::Result<SyncResponse> {
    let mut r = Reader(body);
    let header = r.header()?;
    let mut digests = Vec::with_capacity(header.count.min(1024));
    for _ in 0..header.count {
        digests.push((r.doc()?, r.digest()?));
    }
    r.finish()?;
    Ok(SyncResponse {
        hlc: header.hlc,
        origin: header.origin,
        window_ms: header.window_ms,
        connected: header.connected,
        digests,
    })
}

/// The fields of a header, as they are to be written.
struct HeaderOut<'a> {
    hlc: Timestamp,
    /// `None`: a version 3 frame.
    origin: Option<&'a Origin>,
    window_ms: u64,
    connected: &'a [NodeTag],
    count: usize,
}

impl HeaderOut<'_> {
    fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.len());
        out.push(if self.origin.is_some() {
            VERSION
        } else {
            VERSION_WITHOUT_ORIGIN
        });
        out.extend_from_slice(&self.hlc.physical_ms.to_be_bytes());
        out.extend_from_slice(&self.hlc.logical.to_be_bytes());
        if let Some(origin) = self.origin {
            let region = region_bytes(origin);
            out.extend_from_slice(&origin.wall_ms.to_be_bytes());
            out.extend_from_slice(&origin.held_ms.to_be_bytes());
            out.push(region.len() as u8);
            out.extend_from_slice(region);
        }
        out.extend_from_slice(&self.window_ms.to_be_bytes());
        let connected = &self.connected[..self.connected.len().min(usize::from(u8::MAX))];
        out.push(connected.len() as u8);
        for tag in connected {
            out.extend_from_slice(&tag.0);
        }
        out.extend_from_slice(&(self.count.min(MAX_DOCS) as u32).to_be_bytes());
        out
    }

    fn len(&self) -> usize {
        let origin = self.origin.map_or(0, |o| 8 + 4 + 1 + region_bytes(o).len());
        let peers = self.connected.len().min(usize::from(u8::MAX));
        1 + 8 + 4 + origin + 8 + 1 + 8 * peers + 4
    }
}

/// The region as sent: at most [`MAX_REGION`] bytes (a valid one never is more).
fn region_bytes(origin: &Origin) -> &[u8] {
    let bytes = origin.region.as_bytes();
    &bytes[..bytes.len().min(MAX_REGION)]
}

/// Bytes of a document id on the wire: epoch and shard.
const DOC_ID_BYTES: usize = 4 + 1;

fn doc_bytes(doc: DocId) -> [u8; DOC_ID_BYTES] {
    let e = doc.epoch.to_be_bytes();
    [e[0], e[1], e[2], e[3], doc.shard]
}

/// Writes a request body to `out`, a buffer or a compressor; with its
/// origin (version 4) when `with_origin` and it has one.
fn put_request<W: io::Write>(
    request: &SyncRequest,
    with_origin: bool,
    out: &mut W,
) -> io::Result<()> {
    out.write_all(&request_header(request, with_origin).encode())?;
    for d in request.docs.iter().take(MAX_DOCS) {
        out.write_all(&doc_bytes(d.doc))?;
        out.write_all(&d.digest)?;
        out.write_all(&(d.message.len() as u32).to_be_bytes())?;
        out.write_all(&d.message)?;
    }
    Ok(())
}

fn request_header(request: &SyncRequest, with_origin: bool) -> HeaderOut<'_> {
    HeaderOut {
        hlc: request.hlc,
        origin: request.origin.as_ref().filter(|_| with_origin),
        window_ms: request.window_ms,
        connected: &request.connected,
        count: request.docs.len(),
    }
}

/// Size of a request body: the header, then each document's fields and message.
fn request_len(request: &SyncRequest, with_origin: bool) -> usize {
    let docs: usize = request
        .docs
        .iter()
        .take(MAX_DOCS)
        .map(|d| DOC_ID_BYTES + 32 + 4 + d.message.len())
        .sum();
    request_header(request, with_origin).len() + docs
}

/// Encodes a request body: version 4 if it has an origin, else version 3.
pub fn encode_request(request: &SyncRequest) -> Vec<u8> {
    encode_request_as(request, true)
}

fn encode_request_as(request: &SyncRequest, with_origin: bool) -> Vec<u8> {
    // Sized once: a frame after a partition carries megabytes, and growing
    // the buffer by doubling copied it and faulted its pages in again.
    let mut out = Vec::with_capacity(request_len(request, with_origin));
    put_request(request, with_origin, &mut out).expect("writing to a Vec cannot fail");
    out
}

/// Encodes and compresses a request body in one pass (as [`PROTOCOL`] and
/// [`PROTOCOL_V2`] carry it): the messages go from where they are straight
/// into the compressor, with no uncompressed frame in between. The zstd
/// frame states the body's size.
pub fn compress_request(request: &SyncRequest) -> io::Result<Vec<u8>> {
    compress_request_as(request, true)
}

fn compress_request_as(request: &SyncRequest, with_origin: bool) -> io::Result<Vec<u8>> {
    let len = request_len(request, with_origin);
    // The receiver refuses a body that unpacks past the limit: fail here,
    // as an uncompressed frame over it does, rather than send it.
    if len > MAX_FRAME {
        return Err(invalid("refusing to send a frame over the 64 MiB limit"));
    }
    // About a quarter is typical; the Vec grows if a frame packs worse.
    let mut encoder = zstd::stream::write::Encoder::new(Vec::with_capacity(len / 3), ZSTD_LEVEL)?;
    encoder.include_contentsize(true)?;
    encoder.set_pledged_src_size(Some(len as u64))?;
    put_request(request, with_origin, &mut encoder)?;
    encoder.finish()
}

/// Encodes a response body: version 4 if it has an origin, else version 3.
pub fn encode_response(response: &SyncResponse) -> Vec<u8> {
    encode_response_as(response, true)
}

fn encode_response_as(response: &SyncResponse, with_origin: bool) -> Vec<u8> {
    let mut out = HeaderOut {
        hlc: response.hlc,
        origin: response.origin.as_ref().filter(|_| with_origin),
        window_ms: response.window_ms,
        connected: &response.connected,
        count: response.digests.len(),
    }
    .encode();
    for (doc, digest) in response.digests.iter().take(MAX_DOCS) {
        out.extend_from_slice(&doc_bytes(*doc));
        out.extend_from_slice(digest);
    }
    out
}

/// Decompresses a body received under [`PROTOCOL`]. The size the zstd frame
/// states is checked against [`MAX_FRAME`] before anything is allocated,
/// and the output can never grow past it: a small frame that would expand
/// to gigabytes is refused, not unpacked.
pub fn decompress_body(frame: &[u8]) -> io::Result<Vec<u8>> {
    let size = match zstd::zstd_safe::get_frame_content_size(frame) {
        Ok(Some(size)) if size <= MAX_FRAME as u64 => size as usize,
        Ok(Some(_)) => return Err(invalid("compressed frame expands past the 64 MiB limit")),
        _ => return Err(invalid("compressed frame does not state its size")),
    };
    let body = zstd::bulk::decompress(frame, size)
        .map_err(|e| invalid(&format!("compressed frame does not decompress: {e}")))?;
    if body.len() != size {
        return Err(invalid("compressed frame is shorter than it states"));
    }
    Ok(body)
}

async fn read_frame<T: AsyncRead + Unpin + Send>(io: &mut T) -> io::Result<Vec<u8>> {
    let mut len = [0u8; 4];
    io.read_exact(&mut len).await?;
    let len = u32::from_be_bytes(len) as usize;
    if len > MAX_FRAME {
        return Err(invalid("frame larger than the 64 MiB limit"));
    }
    let mut body = vec![0u8; len];
    io.read_exact(&mut body).await?;
    Ok(body)
}

async fn write_frame<T: AsyncWrite + Unpin + Send>(io: &mut T, body: Vec<u8>) -> io::Result<()> {
    if body.len() > MAX_FRAME {
        return Err(invalid("refusing to send a frame over the 64 MiB limit"));
    }
    io.write_all(&(body.len() as u32).to_be_bytes()).await?;
    io.write_all(&body).await?;
    io.close().await
}

impl libp2p::request_response::Codec for SyncCodec {
    type Protocol = StreamProtocol;
    type Request = InboundRequest;
    type Response = SyncResponse;

    async fn read_request<T>(
        &mut self,
        protocol: &StreamProtocol,
        io: &mut T,
    ) -> io::Result<InboundRequest>
    where
        T: AsyncRead + Unpin + Send,
    {
        let body = read_frame(io).await.and_then(|frame| {
            if *protocol != PROTOCOL_UNCOMPRESSED {
                decompress_body(&frame)
            } else {
                Ok(frame)
            }
        });
        match body {
            Ok(body) => Ok(match decode_request(&Bytes::from(body)) {
                Ok(request) => InboundRequest::Sync(request),
                Err(e) => InboundRequest::Malformed(e.to_string()),
            }),
            Err(e) if e.kind() == io::ErrorKind::InvalidData => {
                Ok(InboundRequest::Malformed(e.to_string()))
            }
            Err(e) => Err(e),
        }
    }

    async fn read_response<T>(&mut self, _: &StreamProtocol, io: &mut T) -> io::Result<SyncResponse>
    where
        T: AsyncRead + Unpin + Send,
    {
        decode_response(&read_frame(io).await?)
    }

    async fn write_request<T>(
        &mut self,
        protocol: &StreamProtocol,
        io: &mut T,
        request: InboundRequest,
    ) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        match request {
            InboundRequest::Sync(request) => {
                let with_origin = carries_origin(protocol);
                let body = if *protocol == PROTOCOL_UNCOMPRESSED {
                    encode_request_as(&request, false)
                } else {
                    compress_request_as(&request, with_origin)?
                };
                write_frame(io, body).await
            }
            InboundRequest::Malformed(_) => Err(invalid("refusing to send a malformed request")),
        }
    }

    async fn write_response<T>(
        &mut self,
        protocol: &StreamProtocol,
        io: &mut T,
        response: SyncResponse,
    ) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        write_frame(io, encode_response_as(&response, carries_origin(protocol))).await
    }
}

/// Whether frames under `protocol` are version 4 (with the sender's origin).
fn carries_origin(protocol: &StreamProtocol) -> bool {
    *protocol == PROTOCOL_COMPACT || *protocol == PROTOCOL
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn round_trip() {
        let request = SyncRequest {
            hlc: Timestamp::new(7, 3),
            origin: Some(Origin {
                region: "sgp".into(),
                wall_ms: 1_700_000_000_123,
                held_ms: 0,
            }),
            window_ms: 6000,
            connected: vec![NodeTag([4; 8]), NodeTag([5; 8])],
            docs: vec![
                DocMessage {
                    doc: DocId {
                        epoch: 12,
                        shard: 2,
                    },
                    digest: [9; 32],
                    message: Bytes::from(vec![1; 3000]),
                };
                3
            ],
        };
        let encoded = encode_request(&request);
        assert!(
            encoded.capacity() < encoded.len() + 64,
            "the frame is sized once, not grown: {} bytes in {}",
            encoded.len(),
            encoded.capacity()
        );
        assert_eq!(request_len(&request, true), encoded.len());
        let packed = compress_request(&request).unwrap();
        assert_eq!(decompress_body(&packed).unwrap(), encoded);
        let oversized = SyncRequest {
            docs: vec![DocMessage {
                message: Bytes::from(vec![0; MAX_FRAME]),
                ..request.docs[0].clone()
            }],
            ..request.clone()
        };
        assert!(compress_request(&oversized).is_err());
        let encoded = Bytes::from(encoded);
        assert_eq!(decode_request(&encoded).unwrap(), request);
        let response = SyncResponse {
            hlc: Timestamp::new(8, 0),
            origin: Some(Origin {
                region: "lon".into(),
                wall_ms: 1_700_000_000_456,
                held_ms: 17,
            }),
            window_ms: 6000,
            connected: vec![],
            digests: vec![
                (DocId { epoch: 1, shard: 0 }, [1; 32]),
                (DocId { epoch: 1, shard: 7 }, [2; 32]),
            ],
        };
        assert_eq!(
            decode_response(&encode_response(&response)).unwrap(),
            response
        );
    }

    #[test]
    fn the_clock_offset_is_read_from_the_middle_of_the_round_trip_and_of_the_hold() {
        // 100 ms each way, held 300 ms, the peer's clock 2 s ahead: it
        // received at 1100 (3100 by its clock) and answered at 3400.
        let origin = Origin {
            region: "lon".into(),
            wall_ms: 3400,
            held_ms: 300,
        };
        assert_eq!(origin.clock_offset_ms(1000, 1500), 2000);
        // A peer behind, and no hold.
        let behind = Origin {
            wall_ms: 500,
            held_ms: 0,
            ..origin.clone()
        };
        assert_eq!(behind.clock_offset_ms(1000, 1000), -500);
        let far = Origin {
            wall_ms: u64::MAX,
            ..origin
        };
        assert!(far.clock_offset_ms(0, 0) > 0, "saturates, never wraps");
    }

    #[test]
    fn frames_for_earlier_versions_leave_the_origin_out_and_both_versions_decode() {
        let with = SyncRequest {
            hlc: Timestamp::new(7, 3),
            origin: Some(Origin {
                region: "nyc".into(),
                wall_ms: 5,
                held_ms: 0,
            }),
            window_ms: 6000,
            connected: vec![NodeTag([4; 8])],
            docs: vec![DocMessage {
                doc: DocId { epoch: 1, shard: 2 },
                digest: [9; 32],
                message: Bytes::from_static(b"abc"),
            }],
        };
        let without = SyncRequest {
            origin: None,
            ..with.clone()
        };
        let v3 = encode_request_as(&with, false);
        assert_eq!(v3[0], VERSION_WITHOUT_ORIGIN);
        assert_eq!(v3, encode_request(&without));
        assert_eq!(request_len(&with, false), v3.len());
        assert_eq!(decode_request(&Bytes::from(v3)).unwrap(), without);
        let v4 = encode_request(&with);
        assert_eq!(v4[0], VERSION);
        assert_eq!(decode_request(&Bytes::from(v4)).unwrap(), with);
        let packed = compress_request_as(&with, false).unwrap();
        assert_eq!(decompress_body(&packed).unwrap(), encode_request(&without));
    }

    #[test]
    fn a_region_that_is_not_a_region_name_makes_the_frame_malformed() {
        for region in ["", "sgp lon", "ünï", &"x".repeat(65)] {
            let response = SyncResponse {
                hlc: Timestamp::new(1, 0),
                origin: Some(Origin {
                    region: region.into(),
                    wall_ms: 1,
                    held_ms: 0,
                }),
                window_ms: 6000,
                connected: vec![],
                digests: vec![],
            };
            let mut bytes = encode_response(&response);
            if region.len() > MAX_REGION {
                // What a hostile sender could write: a length byte over the cap.
                bytes = [
                    &bytes[..25],
                    &[65],
                    region.as_bytes(),
                    &bytes[25 + 1 + 64..],
                ]
                .concat();
            }
            assert!(decode_response(&bytes).is_err(), "{region:?}");
        }
    }

    #[test]
    fn a_compressed_body_round_trips_and_a_bomb_is_refused_unpacked() {
        let body: Vec<u8> = (0..100_000u32)
            .flat_map(|i| (i % 251).to_be_bytes())
            .collect();
        let packed = zstd::bulk::compress(&body, ZSTD_LEVEL).unwrap();
        assert!(packed.len() < body.len() / 4, "{} bytes", packed.len());
        assert_eq!(decompress_body(&packed).unwrap(), body);
        // 65 MiB of zeros pack into a few kilobytes; the stated size is refused.
        let bomb = zstd::bulk::compress(&vec![0; MAX_FRAME + 1024 * 1024], ZSTD_LEVEL).unwrap();
        assert!(bomb.len() < 64 * 1024);
        let refused = decompress_body(&bomb).unwrap_err().to_string();
        assert!(refused.contains("64 MiB"), "{refused}");
        for bad in [&b""[..], b"not zstd", &packed[..packed.len() / 2]] {
            assert!(decompress_body(bad).is_err());
        }
    }

    proptest! {
        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = decode_request(&Bytes::from(bytes.clone()));
            let _ = decode_response(&bytes);
            let _ = decompress_body(&bytes);
        }
    }
}
