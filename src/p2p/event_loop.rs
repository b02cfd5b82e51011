//! The task that owns the swarm. See the module docs of [`crate::p2p`].

use super::codec::{
    DocMessage, InboundRequest, Origin, SyncCodec, SyncRequest, SyncResponse, PROTOCOL,
    PROTOCOL_UNCOMPRESSED, PROTOCOL_V2,
};
use super::status::Direction;
use crate::ledger::{DocId, MergeError, NodeTag, Withhold, SHARD_COUNT};
use crate::metrics::Kind;
use crate::node::{Node, StartError};
use bytes::Bytes;
use futures::StreamExt;
use libp2p::allow_block_list::{self, AllowedPeers};
use libp2p::request_response::{self, OutboundRequestId, ProtocolSupport, ResponseChannel};
use libp2p::swarm::dial_opts::{DialOpts, PeerCondition};
use libp2p::swarm::{ListenError, NetworkBehaviour, SwarmEvent};
use libp2p::{identify, identity::Keypair, noise, ping, tcp, yamux, Multiaddr, PeerId, Swarm};
use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Redial backoff: quick first, and capped low, so a healed link is back
/// within about a tenth of a second (a failed dial on a dead link costs
/// next to nothing, and no second dial starts while one is pending). The whole
/// mesh back at once also matters to relay suppression: while only some
/// links are up, changes are relayed, and then sent again by their authors.
const FIRST_BACKOFF: Duration = Duration::from_millis(50);
const MAX_BACKOFF: Duration = Duration::from_millis(100);
/// How often redials and the anti-entropy round are checked.
const HOUSEKEEPING: Duration = Duration::from_millis(50);
/// A request not answered within this is failed and the session reset.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Least time between two requests to a peer whose only news from us would
/// be our heads (see [`crate::ledger::relay`]): it keeps a follower's
/// acknowledgements to about ten a second per peer instead of one per change it
/// applies, while any change of ours goes at once.
const HEADS_GAP: Duration = Duration::from_millis(100);
/// How long after a link changes (a peer connects, or reports different
/// peers) an author we reach is still trusted to reach that peer too. When
/// a partition heals, every pair reconnects within milliseconds, but a
/// peer's report of its new links reaches us only with its next message,
/// often after the first big exchange; relaying an author's changes
/// meanwhile sent 10-15 % of a heal twice. A link that really stays down
/// costs its relayed changes this much delay, once.
const LINK_SETTLE: Duration = Duration::from_secs(2);

#[derive(NetworkBehaviour)]
struct Behaviour {
    allow: allow_block_list::Behaviour<AllowedPeers>,
    identify: identify::Behaviour,
    ping: ping::Behaviour,
    sync: request_response::Behaviour<SyncCodec>,
}

/// Results of blocking work, handed back to the loop.
enum Internal {
    /// A request for `peer` is built (or there was nothing to send).
    Built {
        peer: PeerId,
        request: Option<SyncRequest>,
        /// Documents whose message was held back as heads only.
        deferred: Vec<DocId>,
    },
    /// A received request was applied and made durable; answer it.
    Respond {
        peer: PeerId,
        channel: ResponseChannel<SyncResponse>,
        response: SyncResponse,
        applied: BTreeSet<DocId>,
    },
    /// A peer's answer was compared with our documents.
    Compared {
        peer: PeerId,
        /// Our live documents when the comparison began.
        ours: Vec<DocId>,
        /// Those the peer holds identical copies of.
        in_sync: BTreeSet<DocId>,
    },
    /// Our documents' digests, for an anti-entropy round.
    Digests(Vec<(DocId, [u8; 32])>),
}

#[derive(PartialEq)]
enum Outbound {
    Idle,
    Building,
    InFlight(OutboundRequestId),
}

struct Peer {
    key: String,
    tag: NodeTag,
    /// The peers this peer said it is connected to, in its last message.
    reports: Vec<NodeTag>,
    /// When it last connected or reported different links.
    links_changed_at: Option<Instant>,
    addr: Multiaddr,
    connections: usize,
    outbound: Outbound,
    /// Documents with news for this peer.
    dirty: BTreeSet<DocId>,
    /// Every live document has news (after a reconnect or a failure).
    dirty_all: bool,
    /// Send a request even without sync messages (anti-entropy round).
    heartbeat: bool,
    /// When the last request to this peer went out.
    last_sent: Option<Instant>,
    /// The same by our wall clock: one end of a clock offset measurement.
    sent_wall_ms: u64,
    /// Documents whose heads-only message was held back, and since when.
    deferred: BTreeSet<DocId>,
    deferred_since: Option<Instant>,
    /// The next round sends heads-only messages too (the deferred ones are due).
    flush: bool,
    /// The peer's last known digest of each document.
    their_digests: HashMap<DocId, [u8; 32]>,
    backoff: Duration,
    next_dial: Option<Instant>,
    out_of_sync_since: Option<u64>,
}

/// Owns the swarm and the per-peer replication state.
pub struct EventLoop {
    node: Arc<Node>,
    swarm: Swarm<Behaviour>,
    peers: HashMap<PeerId, Peer>,
    internal_tx: mpsc::UnboundedSender<Internal>,
    internal_rx: mpsc::UnboundedReceiver<Internal>,
    last_heartbeat: Instant,
    /// When the last link change stops settling (see [`LINK_SETTLE`]).
    settle_ends: Option<Instant>,
    /// A sampling round ([`crate::node::health::sample_round`]) is running.
    sampling: Arc<AtomicBool>,
}

impl EventLoop {
    /// Builds the swarm and listens; returns the loop and the listen addresses.
    pub async fn start(
        node: Arc<Node>,
        keypair: Keypair,
    ) -> Result<(Self, Vec<Multiaddr>), StartError> {
        let net = |e: &dyn std::fmt::Display| StartError::Network(e.to_string());
        let mut allow = allow_block_list::Behaviour::<AllowedPeers>::default();
        for peer in &node.config.peers {
            allow.allow_peer(peer.peer_id);
        }
        let mut swarm = libp2p::SwarmBuilder::with_existing_identity(keypair)
            .with_tokio()
            .with_tcp(
                tcp::Config::default().nodelay(true),
                noise::Config::new,
                yamux::Config::default,
            )
            .map_err(|e| net(&e))?
            .with_behaviour(|key| Behaviour {
                allow,
                identify: identify::Behaviour::new(identify::Config::new(
                    "/oncemesh/id/1".into(),
                    key.public(),
                )),
                ping: ping::Behaviour::default(),
                sync: request_response::Behaviour::new(
                    // Newest first: a peer of an earlier version settles on the older one.
                    [
                        (PROTOCOL, ProtocolSupport::Full),
                        (PROTOCOL_V2, ProtocolSupport::Full),
                        (PROTOCOL_UNCOMPRESSED, ProtocolSupport::Full),
                    ],
                    request_response::Config::default()
                        .with_request_timeout(REQUEST_TIMEOUT)
                        .with_max_concurrent_streams(64),
                ),
            })
            .map_err(|e| net(&e))?
            .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(3600)))
            .build();
        swarm.listen_on(node.config.listen.clone()).map_err(|e| {
            // libp2p's transport error displays nothing of an I/O cause
            // (such as the port being taken): name the cause itself.
            let cause =
                std::error::Error::source(&e).map_or_else(|| e.to_string(), |c| c.to_string());
            StartError::Network(format!("cannot listen on {}: {cause}", node.config.listen))
        })?;
        let mut listen_addrs = Vec::new();
        let deadline = tokio::time::sleep(Duration::from_secs(10));
        tokio::pin!(deadline);
        while listen_addrs.is_empty() {
            tokio::select! {
                event = swarm.select_next_some() => match event {
                    SwarmEvent::NewListenAddr { address, .. } => listen_addrs.push(address),
                    SwarmEvent::ListenerError { error, .. } => return Err(net(&error)),
                    SwarmEvent::ListenerClosed { reason: Err(error), .. } => return Err(net(&error)),
                    _ => {}
                },
                _ = &mut deadline => return Err(StartError::Network(format!("no listen address on {} after 10 s", node.config.listen))),
            }
        }
        let peers = node
            .config
            .peers
            .iter()
            .map(|p| {
                (
                    p.peer_id,
                    Peer {
                        key: p.peer_id.to_string(),
                        tag: NodeTag::of(&p.peer_id.to_string()),
                        reports: Vec::new(),
                        links_changed_at: None,
                        addr: p.addr.clone(),
                        connections: 0,
                        outbound: Outbound::Idle,
                        dirty: BTreeSet::new(),
                        dirty_all: false,
                        heartbeat: false,
                        last_sent: None,
                        sent_wall_ms: 0,
                        deferred: BTreeSet::new(),
                        deferred_since: None,
                        flush: false,
                        their_digests: HashMap::new(),
                        backoff: FIRST_BACKOFF,
                        next_dial: Some(Instant::now()),
                        out_of_sync_since: None,
                    },
                )
            })
            .collect();
        let (internal_tx, internal_rx) = mpsc::unbounded_channel();
        Ok((
            Self {
                node,
                swarm,
                peers,
                internal_tx,
                internal_rx,
                last_heartbeat: Instant::now(),
                settle_ends: None,
                sampling: Arc::new(AtomicBool::new(false)),
            },
            listen_addrs,
        ))
    }

    /// Runs until `shutdown`.
    pub async fn run(mut self, shutdown: CancellationToken) {
        let mut housekeeping = tokio::time::interval(HOUSEKEEPING);
        housekeeping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let changes = self.node.changes.clone();
        loop {
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                Some(internal) = self.internal_rx.recv() => self.on_internal(internal),
                event = self.swarm.select_next_some() => self.on_swarm_event(event),
                _ = changes.changed() => {
                    let changed = changes.take();
                    self.for_every_peer(|p| p.dirty.extend(changed.iter().copied()));
                }
                _ = housekeeping.tick() => self.housekeeping(),
            }
        }
    }

    fn housekeeping(&mut self) {
        let now = Instant::now();
        let due: Vec<PeerId> = self
            .peers
            .iter()
            .filter(|(_, p)| p.connections == 0 && p.next_dial.is_some_and(|t| t <= now))
            .map(|(id, _)| *id)
            .collect();
        for id in due {
            self.dial(id);
        }
        self.flush_deferred(now);
        if self.settle_ends.is_some_and(|t| t <= now) {
            // Links still unreported after settling are really down: what
            // was left to their authors goes by relay now.
            self.settle_ends = None;
            self.resend_to_all();
        }
        if now.duration_since(self.last_heartbeat) >= self.node.config.sync_interval {
            self.last_heartbeat = now;
            self.heartbeat();
        }
    }

    /// Sends the held-back heads of every peer that has waited [`HEADS_GAP`].
    fn flush_deferred(&mut self, now: Instant) {
        self.for_every_peer(|p| {
            if p.deferred_since
                .is_some_and(|t| now.duration_since(t) >= HEADS_GAP)
            {
                p.dirty.append(&mut p.deferred);
                p.deferred_since = None;
                p.flush = true;
            }
        });
    }

    fn dial(&mut self, id: PeerId) {
        let Some(peer) = self.peers.get_mut(&id) else {
            return;
        };
        peer.next_dial = None;
        let opts = DialOpts::peer_id(id)
            .addresses(vec![peer.addr.clone()])
            .condition(PeerCondition::DisconnectedAndNotDialing)
            .build();
        if let Err(e) = self.swarm.dial(opts) {
            tracing::debug!(peer = %id, error = %e, "dial not started");
            self.schedule_redial(id);
        }
    }

    fn schedule_redial(&mut self, id: PeerId) {
        if let Some(peer) = self.peers.get_mut(&id) {
            if peer.connections > 0 || peer.next_dial.is_some() {
                return;
            }
            peer.next_dial = Some(Instant::now() + peer.backoff);
            peer.backoff = (peer.backoff * 2).min(MAX_BACKOFF);
            self.node.peers.update(&peer.key, |s| {
                s.redial_attempts += 1;
                s.redials_total += 1;
            });
        }
    }

    /// Anti-entropy: every connected peer gets every live document's digest,
    /// and a sync message wherever its last known digest differs from ours.
    /// The digests are read off the event loop (see [`EventLoop::off_loop`]);
    /// the round goes on in [`EventLoop::heartbeat_with`].
    fn heartbeat(&mut self) {
        self.off_loop(|node| Internal::Digests(node.ledger.digests()));
        // One sampling round at a time: counting a far-behind peer's delta
        // can take longer than a round, and rounds must not pile up.
        if !self.sampling.swap(true, Ordering::AcqRel) {
            let (node, sampling) = (self.node.clone(), self.sampling.clone());
            tokio::task::spawn_blocking(move || {
                crate::node::health::sample_round(&node);
                sampling.store(false, Ordering::Release);
            });
        }
    }

    /// Runs `work`, which takes shard locks, on the blocking pool and hands
    /// what it returns back to the loop. A peer's large message holds a
    /// shard lock for tens of milliseconds while it is applied; the event
    /// loop waiting for it stopped every connection's traffic meanwhile
    /// (up to a fifth of a node's time while converging after a partition).
    fn off_loop(&self, work: impl FnOnce(&Node) -> Internal + Send + 'static) {
        let node = self.node.clone();
        let tx = self.internal_tx.clone();
        tokio::task::spawn_blocking(move || {
            let _ = tx.send(work(&node));
        });
    }

    fn heartbeat_with(&mut self, ours: Vec<(DocId, [u8; 32])>) {
        let windows = self.node.ledger.windows();
        let now = self.node.ledger.wall_ms();
        let ids: Vec<PeerId> = self.peers.keys().copied().collect();
        for id in ids {
            if let Some(p) = self.peers.get_mut(&id) {
                p.their_digests
                    .retain(|doc, _| windows.live(doc.epoch, now));
                if p.connections == 0 {
                    continue;
                }
                p.heartbeat = true;
                for (doc, digest) in &ours {
                    if p.their_digests.get(doc) != Some(digest) {
                        p.dirty.insert(*doc);
                    }
                }
            }
            self.kick(id);
        }
    }

    /// Starts building a request for `id` if it is connected, idle and has
    /// something to send.
    fn kick(&mut self, id: PeerId) {
        let Some(peer) = self.peers.get_mut(&id) else {
            return;
        };
        let has_work = peer.heartbeat || peer.dirty_all || !peer.dirty.is_empty();
        if peer.connections == 0 || peer.outbound != Outbound::Idle || !has_work {
            return;
        }
        let dirty = std::mem::take(&mut peer.dirty);
        let all = std::mem::take(&mut peer.dirty_all);
        let heartbeat = std::mem::take(&mut peer.heartbeat);
        let flush = std::mem::take(&mut peer.flush);
        let told_recently = peer.last_sent.is_some_and(|t| t.elapsed() < HEADS_GAP);
        peer.outbound = Outbound::Building;
        let their = peer.their_digests.clone();
        let key = peer.key.clone();
        let mut withhold = self.withhold_for(id);
        // Heads alone wait while authors send the peer their changes
        // themselves and it heard from us a moment ago.
        withhold.heads =
            !withhold.authors.is_empty() && told_recently && !(all || heartbeat || flush);
        let connected = self.connected_tags();
        let node = self.node.clone();
        let tx = self.internal_tx.clone();
        tokio::task::spawn_blocking(move || {
            let mut docs = Vec::new();
            let mut deferred = Vec::new();
            let mut any_message = false;
            for (doc, digest) in node.ledger.digests() {
                let wanted = all || dirty.contains(&doc);
                let message = if wanted {
                    // A peer whose digest differs while nothing is under way
                    // lost a message with a connection: send again.
                    let unstick = heartbeat && their.get(&doc).is_some_and(|d| *d != digest);
                    node.ledger
                        .generate_sync(doc, &key, unstick, &withhold)
                        .map(Bytes::from)
                        .unwrap_or_default()
                } else {
                    Bytes::new()
                };
                if wanted && withhold.heads && message.is_empty() {
                    deferred.push(doc);
                }
                any_message |= !message.is_empty();
                docs.push(DocMessage {
                    doc,
                    digest,
                    message,
                });
            }
            let request = (any_message || heartbeat).then(|| SyncRequest {
                hlc: node.ledger.stamp(),
                origin: Some(origin(&node, 0)),
                window_ms: node.ledger.windows().window_ms,
                connected,
                docs,
            });
            let _ = tx.send(Internal::Built {
                peer: id,
                request,
                deferred,
            });
        });
    }

    fn on_internal(&mut self, internal: Internal) {
        match internal {
            Internal::Built {
                peer,
                request,
                deferred,
            } => {
                let Some(p) = self.peers.get_mut(&peer) else {
                    return;
                };
                p.outbound = Outbound::Idle;
                if !deferred.is_empty() {
                    p.deferred.extend(deferred);
                    p.deferred_since.get_or_insert_with(Instant::now);
                }
                match request {
                    Some(request) if p.connections > 0 => {
                        let bytes: usize = request.docs.iter().map(|d| d.message.len()).sum();
                        self.node.metrics.sync_messages_sent.inc();
                        self.node.metrics.sync_bytes_sent.inc_by(bytes as u64);
                        self.node
                            .peers
                            .update(&p.key, |s| s.count_message(Direction::Sent, bytes));
                        p.sent_wall_ms = self.node.ledger.wall_ms();
                        let id = self
                            .swarm
                            .behaviour_mut()
                            .sync
                            .send_request(&peer, InboundRequest::Sync(request));
                        p.outbound = Outbound::InFlight(id);
                        p.last_sent = Some(Instant::now());
                    }
                    _ => self.kick(peer),
                }
            }
            Internal::Respond {
                peer,
                channel,
                response,
                applied,
            } => {
                if self
                    .swarm
                    .behaviour_mut()
                    .sync
                    .send_response(channel, response)
                    .is_err()
                {
                    tracing::debug!(%peer, "peer went away before our sync answer");
                }
                // The automerge protocol answers every message it receives.
                if let Some(p) = self.peers.get_mut(&peer) {
                    p.dirty.extend(applied);
                }
                self.kick(peer);
            }
            Internal::Compared {
                peer,
                ours,
                in_sync,
            } => self.on_compared(peer, &ours, &in_sync),
            Internal::Digests(ours) => self.heartbeat_with(ours),
        }
    }

    fn on_swarm_event(&mut self, event: SwarmEvent<BehaviourEvent>) {
        match event {
            SwarmEvent::ConnectionEstablished { peer_id, .. } => self.on_connected(peer_id),
            SwarmEvent::ConnectionClosed {
                peer_id,
                num_established,
                cause,
                ..
            } => {
                if let Some(p) = self.peers.get_mut(&peer_id) {
                    p.connections = num_established as usize;
                    if num_established == 0 {
                        tracing::warn!(peer = %peer_id, cause = ?cause.map(|c| c.to_string()), "peer disconnected; will redial");
                        p.outbound = Outbound::Idle;
                        p.reports.clear();
                        let key = p.key.clone();
                        self.node.peers.update(&key, |s| s.connected = false);
                        // A partition episode starts the moment a peer is lost.
                        self.node.observe_situation();
                        self.node.ledger.reset_sync(&key);
                        self.node.metrics.peers_connected.dec();
                        self.schedule_redial(peer_id);
                        // Changes it authored were left to it: relay them now.
                        self.resend_to_all();
                    }
                }
            }
            SwarmEvent::OutgoingConnectionError {
                peer_id: Some(id),
                error,
                ..
            } => {
                tracing::debug!(peer = %id, %error, "dial failed");
                self.schedule_redial(id);
            }
            SwarmEvent::IncomingConnectionError {
                peer_id,
                error,
                send_back_addr,
                ..
            } => {
                if matches!(error, ListenError::Denied { .. }) {
                    self.node.metrics.refused_peers.inc();
                    tracing::warn!(peer = ?peer_id.map(|p| p.to_string()), from = %send_back_addr, "refused a peer that is not in the allowlist");
                }
            }
            SwarmEvent::Behaviour(BehaviourEvent::Sync(event)) => self.on_sync_event(event),
            _ => {}
        }
    }

    fn on_connected(&mut self, peer_id: PeerId) {
        let Some(p) = self.peers.get_mut(&peer_id) else {
            // The allowlist behaviour denies these before they get here.
            return;
        };
        p.connections += 1;
        if p.connections > 1 {
            return;
        }
        tracing::info!(peer = %peer_id, "peer connected");
        p.backoff = FIRST_BACKOFF;
        p.next_dial = None;
        p.dirty_all = true;
        p.heartbeat = true;
        let key = p.key.clone();
        let now = self.node.ledger.wall_ms();
        self.node.peers.update(&key, |s| {
            s.connected = true;
            s.connected_since_ms = Some(now);
            s.redial_attempts = 0;
        });
        // ...and ends the moment every peer is back.
        self.node.observe_situation();
        self.node.metrics.peers_connected.inc();
        self.node.ledger.reset_sync(&key);
        self.links_changed(peer_id);
        self.kick(peer_id);
    }

    fn on_sync_event(&mut self, event: request_response::Event<InboundRequest, SyncResponse>) {
        use request_response::{Event, InboundFailure, Message};
        match event {
            Event::Message {
                peer,
                message:
                    Message::Request {
                        request, channel, ..
                    },
                ..
            } => match request {
                InboundRequest::Sync(request) => self.on_request(peer, request, channel),
                InboundRequest::Malformed(why) => self.drop_message(peer, "malformed", &why),
            },
            Event::Message {
                peer,
                message:
                    Message::Response {
                        request_id,
                        response,
                    },
                ..
            } => self.on_response(peer, request_id, response),
            Event::OutboundFailure {
                peer,
                error,
                request_id,
                ..
            } => {
                if let Some(p) = self.peers.get_mut(&peer) {
                    if p.outbound == Outbound::InFlight(request_id) {
                        p.outbound = Outbound::Idle;
                    }
                    p.dirty_all = true;
                    let key = p.key.clone();
                    tracing::debug!(%peer, %error, "sync request failed; resetting the session");
                    self.node.ledger.reset_sync(&key);
                }
            }
            Event::InboundFailure { peer, error, .. } => {
                let kind = match &error {
                    InboundFailure::Io(e) if e.kind() == std::io::ErrorKind::InvalidData => {
                        "malformed"
                    }
                    InboundFailure::Io(_) => "io",
                    InboundFailure::Timeout => "timeout",
                    InboundFailure::UnsupportedProtocols => "unsupported",
                    _ => return,
                };
                self.drop_message(peer, kind, &error.to_string());
            }
            Event::ResponseSent { .. } => {}
        }
    }

    fn drop_message(&self, peer: PeerId, kind: &'static str, why: &str) {
        drop_record(&self.node, &peer.to_string(), kind, why);
    }

    /// Takes in what a peer's message says of its clock and region. The
    /// HLC stamp always moves our clock (and counts skew node-wide). The
    /// peer's own offset is `measured` when the message is a response of a
    /// peer that reports its wall clock; a peer of an earlier version
    /// reports none, and its HLC stamp stands in as before.
    fn observe_clock(
        &self,
        peer: &str,
        hlc: crate::hlc::Timestamp,
        origin: Option<&Origin>,
        measured: Option<i64>,
    ) {
        let observation = self.node.ledger.observe_remote_clock(hlc);
        let offset_ms = match (origin, measured) {
            (_, Some(offset)) => offset,
            (None, None) => observation.offset_ms,
            (Some(_), None) => {
                self.note_region(peer, origin);
                return;
            }
        };
        let bound = self.node.config.max_clock_offset.as_millis() as i64;
        let violation = offset_ms > bound;
        self.node.peers.update(peer, |s| {
            s.clock_offset_ms = Some(offset_ms);
            s.skew_violations += u64::from(violation);
            if let Some(o) = origin {
                s.region = Some(o.region.as_str().into());
            }
        });
        if violation {
            tracing::warn!(
                peer,
                offset_ms,
                "peer clock is ahead of ours by more than max_clock_offset"
            );
        }
    }

    fn note_region(&self, peer: &str, origin: Option<&Origin>) {
        if let Some(o) = origin {
            self.node
                .peers
                .update(peer, |s| s.region = Some(o.region.as_str().into()));
        }
    }

    fn on_request(
        &mut self,
        peer: PeerId,
        request: SyncRequest,
        channel: ResponseChannel<SyncResponse>,
    ) {
        let Some(p) = self.peers.get_mut(&peer) else {
            self.drop_message(
                peer,
                "not-allowlisted",
                "request from a peer outside the allowlist",
            );
            return;
        };
        let key = p.key.clone();
        let ours = self.node.ledger.windows().window_ms;
        if request.window_ms != ours {
            let why = format!(
                "peer cuts documents into {} ms windows, we use {ours} ms: every node needs the same --retention",
                request.window_ms
            );
            self.drop_message(peer, "window-mismatch", &why);
            return;
        }
        let (windows, now) = (self.node.ledger.windows(), self.node.ledger.wall_ms());
        for d in &request.docs {
            // Only documents that may be held are remembered: a peer cannot
            // grow this map with made-up ids.
            if windows.live(d.doc.epoch, now) {
                p.their_digests.insert(d.doc, d.digest);
            }
        }
        self.observe_clock(&key, request.hlc, request.origin.as_ref(), None);
        self.record_reports(peer, &request.connected);
        let connected = self.connected_tags();
        let node = self.node.clone();
        let tx = self.internal_tx.clone();
        let received_ms = node.ledger.wall_ms();
        tokio::spawn(async move {
            let received: usize = request.docs.iter().map(|d| d.message.len()).sum();
            node.metrics.sync_bytes_received.inc_by(received as u64);
            node.peers
                .update(&key, |s| s.count_message(Direction::Received, received));
            let apply_node = node.clone();
            let apply_key = key.clone();
            let applied =
                tokio::task::spawn_blocking(move || apply(&apply_node, &apply_key, request))
                    .await
                    .unwrap_or_default();
            // Answer only once what we received is on disk: the sender takes
            // equal digests as "this peer holds my allocations".
            if node
                .storage
                .wait_durable(applied.durable_seq)
                .await
                .is_err()
            {
                return;
            }
            // Shard locks again: off the runtime's workers.
            let answer_node = node.clone();
            let their_digests = applied.their_digests;
            let Ok(digests) = tokio::task::spawn_blocking(move || {
                mark_in_sync(&answer_node, &key, &their_digests);
                answer_node.ledger.digests()
            })
            .await
            else {
                return;
            };
            let held_ms = node.ledger.wall_ms().saturating_sub(received_ms);
            let response = SyncResponse {
                hlc: node.ledger.stamp(),
                origin: Some(origin(&node, u32::try_from(held_ms).unwrap_or(u32::MAX))),
                window_ms: node.ledger.windows().window_ms,
                connected,
                digests,
            };
            let _ = tx.send(Internal::Respond {
                peer,
                channel,
                response,
                applied: applied.docs,
            });
        });
    }

    fn on_response(&mut self, peer: PeerId, request_id: OutboundRequestId, response: SyncResponse) {
        let now = self.node.ledger.wall_ms();
        let windows = self.node.ledger.windows();
        let Some(p) = self.peers.get_mut(&peer) else {
            return;
        };
        if p.outbound == Outbound::InFlight(request_id) {
            p.outbound = Outbound::Idle;
        }
        let key = p.key.clone();
        let measured = response
            .origin
            .as_ref()
            .map(|o| o.clock_offset_ms(p.sent_wall_ms, now));
        let theirs: Vec<(DocId, [u8; 32])> = response
            .digests
            .iter()
            .filter(|(doc, _)| windows.live(doc.epoch, now))
            .copied()
            .collect();
        p.their_digests.extend(theirs.iter().copied());
        self.observe_clock(&key, response.hlc, response.origin.as_ref(), measured);
        self.record_reports(peer, &response.connected);
        // Which documents the peer holds as we do is settled in
        // `on_compared`, once they are compared off the loop.
        self.off_loop(move |node| {
            let ours = node
                .ledger
                .digests()
                .into_iter()
                .map(|(doc, _)| doc)
                .collect();
            let in_sync = mark_in_sync(node, &key, &theirs);
            Internal::Compared {
                peer,
                ours,
                in_sync,
            }
        });
    }

    /// The second half of [`EventLoop::on_response`]: records whether the
    /// peer is in sync, then starts its next round.
    fn on_compared(&mut self, peer: PeerId, ours: &[DocId], in_sync: &BTreeSet<DocId>) {
        let now = self.node.ledger.wall_ms();
        let Some(p) = self.peers.get_mut(&peer) else {
            return;
        };
        let key = p.key.clone();
        // In sync with the peer: every document we hold is identical there
        // (a document it does not list is one it lacks).
        let all_in_sync = ours.iter().all(|doc| in_sync.contains(doc));
        let resynced_after = if all_in_sync {
            p.out_of_sync_since.take()
        } else {
            p.out_of_sync_since.get_or_insert(now);
            None
        };
        if all_in_sync {
            self.node
                .peers
                .update(&key, |s| s.last_in_sync_ms = Some(now));
        }
        if let Some(since) = resynced_after {
            self.node
                .confidence_model()
                .observe_peer_resync(Duration::from_millis(now.saturating_sub(since)));
        }
        self.kick(peer);
    }

    /// Tags of the peers we are connected to, as our messages report them.
    fn connected_tags(&self) -> Vec<NodeTag> {
        let mut tags: Vec<NodeTag> = self
            .peers
            .values()
            .filter(|p| p.connections > 0)
            .map(|p| p.tag)
            .collect();
        tags.sort_unstable();
        tags
    }

    /// The authors whose changes `target` gets from them directly: peers
    /// we are connected to that say they are connected to `target`, while
    /// `target` says the same of them, or whose links to each other are
    /// still settling ([`LINK_SETTLE`]). See [`crate::ledger::relay`].
    fn withhold_for(&self, target: PeerId) -> Withhold {
        let Some(t) = self.peers.get(&target) else {
            return Withhold::nothing();
        };
        let now = Instant::now();
        let settling = |p: &Peer| {
            p.links_changed_at
                .is_some_and(|at| now.duration_since(at) < LINK_SETTLE)
        };
        let authors = self
            .peers
            .iter()
            .filter(|(id, a)| {
                **id != target
                    && a.connections > 0
                    && ((a.reports.contains(&t.tag) && t.reports.contains(&a.tag))
                        || settling(a)
                        || settling(t))
            })
            .map(|(_, a)| a.tag)
            .collect();
        Withhold {
            authors,
            heads: false,
        }
    }

    /// Keeps what `peer` says it is connected to. When that changes, what
    /// may be left to authors changes too: every peer gets a fresh round.
    fn record_reports(&mut self, peer: PeerId, connected: &[NodeTag]) {
        let Some(p) = self.peers.get_mut(&peer) else {
            return;
        };
        if p.reports != connected {
            p.reports = connected.to_vec();
            self.links_changed(peer);
            self.resend_to_all();
        }
    }

    /// Notes that `peer`'s links changed: see [`LINK_SETTLE`].
    fn links_changed(&mut self, peer: PeerId) {
        let now = Instant::now();
        if let Some(p) = self.peers.get_mut(&peer) {
            p.links_changed_at = Some(now);
        }
        self.settle_ends = Some(now + LINK_SETTLE);
    }

    /// Marks every document dirty for every peer and starts their rounds.
    fn resend_to_all(&mut self) {
        self.for_every_peer(|p| p.dirty_all = true);
    }

    /// Applies `mark` to every peer, then starts its round if it has work.
    fn for_every_peer(&mut self, mut mark: impl FnMut(&mut Peer)) {
        let ids: Vec<PeerId> = self.peers.keys().copied().collect();
        for id in ids {
            if let Some(p) = self.peers.get_mut(&id) {
                mark(p);
            }
            self.kick(id);
        }
    }
}

/// What applying one request did.
#[derive(Default)]
struct Applied {
    durable_seq: u64,
    docs: BTreeSet<DocId>,
    their_digests: Vec<(DocId, [u8; 32])>,
}

/// Applies the sync messages of a request (blocking: automerge work).
fn apply(node: &Node, peer: &str, request: SyncRequest) -> Applied {
    let mut applied = Applied::default();
    for d in request.docs {
        if usize::from(d.doc.shard) >= SHARD_COUNT {
            let why = format!("{} names a shard that does not exist", d.doc);
            drop_record(node, peer, "bad-shard", &why);
            continue;
        }
        applied.their_digests.push((d.doc, d.digest));
        if d.message.is_empty() {
            continue;
        }
        let message = match automerge::sync::Message::decode(&d.message) {
            Ok(m) => m,
            Err(e) => {
                drop_record(node, peer, "undecodable", &e.to_string());
                continue;
            }
        };
        match node.ledger.receive_sync(d.doc, peer, message) {
            Ok(outcome) => {
                applied.durable_seq = applied.durable_seq.max(outcome.durable_seq);
                applied.docs.insert(d.doc);
                node.after_merge(&outcome);
            }
            // A peer whose clock is behind may still offer a document we
            // already dropped: normal at window edges, not an attack.
            Err(MergeError::Expired(doc)) => {
                tracing::debug!(peer, %doc, "ignored a document past the retention");
            }
            Err(e @ MergeError::TooFarAhead(_)) => {
                drop_record(node, peer, "too-far-ahead", &e.to_string())
            }
            Err(e) => drop_record(node, peer, "rejected", &e.to_string()),
        }
    }
    applied
}

fn drop_record(node: &Node, peer: &str, kind: &'static str, why: &str) {
    node.metrics
        .dropped_messages
        .get_or_create(&Kind::of(kind))
        .inc();
    node.peers.update(peer, |s| s.count_drop(kind));
    tracing::warn!(peer, kind, why, "dropped a sync message from a peer");
}

/// This node's region and wall clock, as its frames carry them.
fn origin(node: &Node, held_ms: u32) -> Origin {
    Origin {
        region: node.config.region.clone(),
        wall_ms: node.ledger.wall_ms(),
        held_ms,
    }
}

/// Records which of `theirs` (the peer's digests) equal ours, and that the
/// peer shows every allocation folded before the comparison began (see
/// [`crate::p2p::lag`]). Returns the documents in sync.
fn mark_in_sync(node: &Node, peer: &str, theirs: &[(DocId, [u8; 32])]) -> BTreeSet<DocId> {
    let generation = node.lag_tracker().generation();
    let in_sync: BTreeSet<DocId> = theirs
        .iter()
        .filter(|(doc, digest)| node.ledger.mark_in_sync_if(*doc, peer, digest))
        .map(|(doc, _)| *doc)
        .collect();
    let mut lag = node.lag_tracker();
    for doc in &in_sync {
        lag.shown(peer, *doc, generation);
    }
    in_sync
}
