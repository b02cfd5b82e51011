//! The task that owns the swarm: a shell around [`crate::sync::Engine`].
//! It turns swarm events into the engine's inputs and carries out the
//! actions it returns (dial, build, send, compare); the ledger work runs on
//! blocking threads ([`crate::sync::work`]) and reports back through a
//! channel. No replication policy lives here. See the module docs of
//! [`crate::p2p`].

use super::codec::{
    InboundRequest, SyncCodec, PROTOCOL, PROTOCOL_COMPACT, PROTOCOL_UNCOMPRESSED, PROTOCOL_V2,
};
use super::{Handles, NetworkError};
use crate::config::NodeConfig;
use crate::ledger::DocId;
use crate::metrics::Kind;
use crate::peers::status::Direction;
use crate::sync::engine::HOUSEKEEPING;
use crate::sync::message::{Origin, SyncRequest, SyncResponse};
use crate::sync::{work, Action, Engine, Input};
use futures::StreamExt;
use libp2p::allow_block_list::{self, AllowedPeers};
use libp2p::request_response::{self, OutboundRequestId, ProtocolSupport, ResponseChannel};
use libp2p::swarm::dial_opts::{DialOpts, PeerCondition};
use libp2p::swarm::{ListenError, NetworkBehaviour, SwarmEvent};
use libp2p::{identify, identity::Keypair, noise, ping, tcp, yamux, Multiaddr, PeerId, Swarm};
use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// A request not answered within this is failed and the session reset.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

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
    Built { peer: PeerId, built: work::Built },
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
        ours: Vec<DocId>,
        in_sync: BTreeSet<DocId>,
    },
    /// Our documents' digests, for an anti-entropy round.
    Digests(Vec<(DocId, [u8; 32])>),
}

/// What the shell keeps of a peer: the transport's side of it.
struct Link {
    key: String,
    addr: Multiaddr,
    connections: usize,
    /// Our request in flight to it.
    in_flight: Option<OutboundRequestId>,
    /// A request built and waiting for the engine's [`Action::Send`].
    built: Option<SyncRequest>,
    /// When the last request left, by our wall clock: one end of a clock
    /// offset measurement.
    sent_wall_ms: u64,
}

/// Owns the swarm and the replication engine.
pub struct EventLoop {
    /// The subsystems the shell feeds and reads.
    handles: Arc<Handles>,
    swarm: Swarm<Behaviour>,
    links: HashMap<PeerId, Link>,
    by_key: HashMap<String, PeerId>,
    engine: Engine,
    internal_tx: mpsc::UnboundedSender<Internal>,
    internal_rx: mpsc::UnboundedReceiver<Internal>,
    /// Answers under way, so shutdown waits for them.
    tasks: TaskTracker,
    /// A sampling round ([`crate::health::Health::sample_round`]) is running.
    sampling: Arc<AtomicBool>,
    /// The engine's monotonic time counts from here.
    started: std::time::Instant,
}

impl EventLoop {
    /// Builds the swarm and listens; returns the loop and the listen addresses.
    pub async fn start(
        handles: Arc<Handles>,
        config: &NodeConfig,
        keypair: Keypair,
        tasks: TaskTracker,
    ) -> Result<(Self, Vec<Multiaddr>), NetworkError> {
        let net = |e: &dyn std::fmt::Display| NetworkError(e.to_string());
        let mut allow = allow_block_list::Behaviour::<AllowedPeers>::default();
        for peer in &config.peers {
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
                        (PROTOCOL_COMPACT, ProtocolSupport::Full),
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
        swarm.listen_on(config.listen.clone()).map_err(|e| {
            // libp2p's transport error displays nothing of an I/O cause
            // (such as the port being taken): name the cause itself.
            let cause =
                std::error::Error::source(&e).map_or_else(|| e.to_string(), |c| c.to_string());
            NetworkError(format!("cannot listen on {}: {cause}", config.listen))
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
                _ = &mut deadline => return Err(NetworkError(format!("no listen address on {} after 10 s", config.listen))),
            }
        }
        let mut links = HashMap::new();
        let mut by_key = HashMap::new();
        for p in &config.peers {
            let key = p.peer_id.to_string();
            by_key.insert(key.clone(), p.peer_id);
            links.insert(
                p.peer_id,
                Link {
                    key,
                    addr: p.addr.clone(),
                    connections: 0,
                    in_flight: None,
                    built: None,
                    sent_wall_ms: 0,
                },
            );
        }
        let started = std::time::Instant::now();
        let engine = Engine::new(by_key.keys().cloned(), config.sync_interval, 0);
        let (internal_tx, internal_rx) = mpsc::unbounded_channel();
        Ok((
            Self {
                handles,
                swarm,
                links,
                by_key,
                engine,
                internal_tx,
                internal_rx,
                tasks,
                sampling: Arc::new(AtomicBool::new(false)),
                started,
            },
            listen_addrs,
        ))
    }

    /// Runs until `shutdown`.
    pub async fn run(mut self, shutdown: CancellationToken) {
        let mut housekeeping = tokio::time::interval(HOUSEKEEPING);
        housekeeping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let changes = self.handles.changes.clone();
        loop {
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                Some(internal) = self.internal_rx.recv() => self.on_internal(internal),
                event = self.swarm.select_next_some() => self.on_swarm_event(event),
                _ = changes.changed() => self.input(Input::DocsChanged(changes.take())),
                _ = housekeeping.tick() => self.input(Input::Tick),
            }
        }
    }

    /// Hands `input` to the engine and carries out what it returns. The
    /// engine's timers run on the monotonic clock; which documents are live
    /// follows the node's wall clock.
    fn input(&mut self, input: Input) {
        let now = monotonic_ms(self.started);
        let wall = self.handles.ledger.wall_ms();
        let windows = self.handles.ledger.windows();
        let actions = self
            .engine
            .handle(input, now, &|epoch| windows.live(epoch, wall));
        for action in actions {
            self.act(action);
        }
    }

    fn key_of(&self, peer: &PeerId) -> Option<String> {
        self.links.get(peer).map(|l| l.key.clone())
    }

    fn act(&mut self, action: Action) {
        match action {
            Action::Dial(key) => {
                let Some((&id, link)) = self
                    .by_key
                    .get(&key)
                    .and_then(|id| self.links.get(id).map(|l| (id, l)))
                else {
                    return;
                };
                let opts = DialOpts::peer_id(id)
                    .addresses(vec![link.addr.clone()])
                    .condition(PeerCondition::DisconnectedAndNotDialing)
                    .build();
                if let Err(e) = self.swarm.dial(opts) {
                    tracing::debug!(peer = %id, error = %e, "dial not started");
                    self.input(Input::DialFailed(key));
                }
            }
            Action::RedialScheduled(key) => self.handles.peers.update(&key, |s| {
                s.redial_attempts += 1;
                s.redials_total += 1;
            }),
            Action::ResetSession(key) => self.handles.ledger.reset_sync(&key),
            Action::Build(order) => {
                let Some(&peer) = self.by_key.get(&order.peer) else {
                    return;
                };
                let handles = self.handles.clone();
                let tx = self.internal_tx.clone();
                tokio::task::spawn_blocking(move || {
                    // The engine waits for every build it asked for: one that
                    // panicked still reports, with nothing to send.
                    let built = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        work::build(&handles.ledger, &order)
                    }))
                    .unwrap_or_else(|_| {
                        tracing::error!(peer = %order.peer, "building a sync request panicked; nothing sent");
                        work::Built {
                            request: None,
                            deferred: Vec::new(),
                        }
                    });
                    let _ = tx.send(Internal::Built { peer, built });
                });
            }
            Action::Send(key) => {
                let Some(&peer) = self.by_key.get(&key) else {
                    return;
                };
                let Some(link) = self.links.get_mut(&peer) else {
                    return;
                };
                let Some(request) = link.built.take() else {
                    return;
                };
                let bytes: usize = request.docs.iter().map(|d| d.message.len()).sum();
                self.handles.metrics.sync_messages_sent.inc();
                self.handles.metrics.sync_bytes_sent.inc_by(bytes as u64);
                self.handles
                    .peers
                    .update(&key, |s| s.count_message(Direction::Sent, bytes));
                link.sent_wall_ms = self.handles.ledger.wall_ms();
                let id = self
                    .swarm
                    .behaviour_mut()
                    .sync
                    .send_request(&peer, InboundRequest::Sync(request));
                link.in_flight = Some(id);
            }
            Action::AntiEntropyRound => {
                self.off_loop(|handles| Internal::Digests(handles.ledger.digests()));
                // One sampling round at a time: counting a far-behind peer's
                // delta can take longer than a round, and rounds must not pile up.
                if !self.sampling.swap(true, Ordering::AcqRel) {
                    let (handles, sampling) = (self.handles.clone(), self.sampling.clone());
                    tokio::task::spawn_blocking(move || {
                        handles.health.sample_round();
                        sampling.store(false, Ordering::Release);
                    });
                }
            }
            Action::Compare { peer: key, theirs } => {
                let Some(&peer) = self.by_key.get(&key) else {
                    return;
                };
                self.off_loop(move |handles| {
                    let (ours, in_sync) = mark_in_sync(handles, &key, &theirs);
                    Internal::Compared {
                        peer,
                        ours,
                        in_sync,
                    }
                });
            }
            Action::InSync(key) => {
                let now = self.handles.ledger.wall_ms();
                self.handles
                    .peers
                    .update(&key, |s| s.last_in_sync_ms = Some(now));
            }
            Action::Resynced { outage, .. } => self.handles.estimator.observe_peer_resync(outage),
        }
    }

    /// Runs `work`, which takes shard locks, on the blocking pool and hands
    /// what it returns back to the loop. A peer's large message holds a
    /// shard lock for tens of milliseconds while it is applied; the event
    /// loop waiting for it stopped every connection's traffic meanwhile
    /// (up to a fifth of a node's time while converging after a partition).
    fn off_loop(&self, work: impl FnOnce(&Handles) -> Internal + Send + 'static) {
        let handles = self.handles.clone();
        let tx = self.internal_tx.clone();
        tokio::task::spawn_blocking(move || {
            let _ = tx.send(work(&handles));
        });
    }

    fn on_internal(&mut self, internal: Internal) {
        match internal {
            Internal::Built { peer, built } => {
                let Some(link) = self.links.get_mut(&peer) else {
                    return;
                };
                let has_request = built.request.is_some() && link.connections > 0;
                link.built = built.request;
                let key = link.key.clone();
                self.input(Input::Built {
                    peer: key,
                    has_request,
                    deferred: built.deferred,
                });
                // Not sent (the peer went away meanwhile): dropped.
                if let Some(link) = self.links.get_mut(&peer) {
                    link.built = None;
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
                if let Some(key) = self.key_of(&peer) {
                    self.input(Input::Answered { peer: key, applied });
                }
            }
            Internal::Compared {
                peer,
                ours,
                in_sync,
            } => {
                if let Some(key) = self.key_of(&peer) {
                    self.input(Input::Compared {
                        peer: key,
                        ours,
                        in_sync,
                    });
                }
            }
            Internal::Digests(ours) => self.input(Input::OurDigests(ours)),
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
                let Some(link) = self.links.get_mut(&peer_id) else {
                    return;
                };
                link.connections = num_established as usize;
                if num_established > 0 {
                    return;
                }
                tracing::warn!(peer = %peer_id, cause = ?cause.map(|c| c.to_string()), "peer disconnected; will redial");
                link.in_flight = None;
                let key = link.key.clone();
                self.handles.peers.update(&key, |s| s.connected = false);
                // A partition episode starts the moment a peer is lost.
                self.handles.estimator.observe_situation();
                self.handles.metrics.peers_connected.dec();
                self.input(Input::Disconnected(key));
            }
            SwarmEvent::OutgoingConnectionError {
                peer_id: Some(id),
                error,
                ..
            } => {
                tracing::debug!(peer = %id, %error, "dial failed");
                if let Some(key) = self.key_of(&id) {
                    self.input(Input::DialFailed(key));
                }
            }
            SwarmEvent::IncomingConnectionError {
                peer_id,
                error,
                send_back_addr,
                ..
            } => {
                if matches!(error, ListenError::Denied { .. }) {
                    self.handles.metrics.refused_peers.inc();
                    tracing::warn!(peer = ?peer_id.map(|p| p.to_string()), from = %send_back_addr, "refused a peer that is not in the allowlist");
                }
            }
            SwarmEvent::Behaviour(BehaviourEvent::Sync(event)) => self.on_sync_event(event),
            SwarmEvent::Behaviour(BehaviourEvent::Identify(identify::Event::Received {
                peer_id,
                info,
                ..
            })) => {
                if let Some(link) = self.links.get(&peer_id) {
                    let reads = info.protocols.contains(&PROTOCOL_COMPACT);
                    self.handles
                        .ledger
                        .set_peer_reads_compact_batches(&link.key, reads);
                }
            }
            _ => {}
        }
    }

    fn on_connected(&mut self, peer_id: PeerId) {
        let Some(link) = self.links.get_mut(&peer_id) else {
            // The allowlist behaviour denies these before they get here.
            return;
        };
        link.connections += 1;
        if link.connections > 1 {
            return;
        }
        tracing::info!(peer = %peer_id, "peer connected");
        let key = link.key.clone();
        let now = self.handles.ledger.wall_ms();
        self.handles.peers.update(&key, |s| {
            s.connected = true;
            s.connected_since_ms = Some(now);
            s.redial_attempts = 0;
        });
        // ...and ends the moment every peer is back.
        self.handles.estimator.observe_situation();
        self.handles.metrics.peers_connected.inc();
        self.input(Input::Connected(key));
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
                let Some(link) = self.links.get_mut(&peer) else {
                    return;
                };
                let current = link.in_flight == Some(request_id);
                if current {
                    link.in_flight = None;
                }
                let key = link.key.clone();
                tracing::debug!(%peer, %error, "sync request failed; resetting the session");
                self.input(Input::RequestFailed { peer: key, current });
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
        drop_record(&self.handles, &peer.to_string(), kind, why);
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
        let observation = self.handles.ledger.observe_remote_clock(hlc);
        let offset_ms = match (origin, measured) {
            (_, Some(offset)) => offset,
            (None, None) => observation.offset_ms,
            (Some(_), None) => {
                self.note_region(peer, origin);
                return;
            }
        };
        let bound = self.handles.max_clock_offset.as_millis() as i64;
        let violation = offset_ms > bound;
        self.handles.peers.update(peer, |s| {
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
            self.handles
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
        let Some(key) = self.key_of(&peer) else {
            self.drop_message(
                peer,
                "not-allowlisted",
                "request from a peer outside the allowlist",
            );
            return;
        };
        let ours = self.handles.ledger.windows().window_ms;
        if request.window_ms != ours {
            let why = format!(
                "peer cuts documents into {} ms windows, we use {ours} ms: every node needs the same --retention",
                request.window_ms
            );
            self.drop_message(peer, "window-mismatch", &why);
            return;
        }
        self.observe_clock(&key, request.hlc, request.origin.as_ref(), None);
        self.input(Input::RequestArrived {
            peer: key.clone(),
            digests: request.docs.iter().map(|d| (d.doc, d.digest)).collect(),
            connected: request.connected.clone(),
        });
        let connected = self.engine.connected_tags();
        let handles = self.handles.clone();
        let tx = self.internal_tx.clone();
        let received_ms = handles.ledger.wall_ms();
        self.tasks.spawn(async move {
            let received: usize = request.docs.iter().map(|d| d.message.len()).sum();
            handles.metrics.sync_bytes_received.inc_by(received as u64);
            handles
                .peers
                .update(&key, |s| s.count_message(Direction::Received, received));
            let apply_handles = handles.clone();
            let apply_key = key.clone();
            let applied = tokio::task::spawn_blocking(move || {
                let handles = &apply_handles;
                work::apply(
                    &handles.ledger,
                    &apply_key,
                    request,
                    |outcome| (handles.on_merge)(outcome),
                    |kind, why| drop_record(handles, &apply_key, kind, why),
                )
            })
            .await
            .unwrap_or_default();
            // Answer only once what we received is on disk: the sender takes
            // equal digests as "this peer holds my allocations".
            if handles
                .storage
                .wait_durable(applied.durable_seq)
                .await
                .is_err()
            {
                return;
            }
            // Shard locks again: off the runtime's workers.
            let answer_handles = handles.clone();
            let their_digests = applied.their_digests;
            let Ok(response) = tokio::task::spawn_blocking(move || {
                mark_in_sync(&answer_handles, &key, &their_digests);
                let held_ms = answer_handles.ledger.wall_ms().saturating_sub(received_ms);
                work::response(&answer_handles.ledger, connected, held_ms)
            })
            .await
            else {
                return;
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
        let now = self.handles.ledger.wall_ms();
        let Some(link) = self.links.get_mut(&peer) else {
            return;
        };
        let current = link.in_flight == Some(request_id);
        if current {
            link.in_flight = None;
        }
        let key = link.key.clone();
        let measured = response
            .origin
            .as_ref()
            .map(|o| o.clock_offset_ms(link.sent_wall_ms, now));
        self.observe_clock(&key, response.hlc, response.origin.as_ref(), measured);
        self.input(Input::ResponseArrived {
            peer: key,
            current,
            digests: response.digests,
            connected: response.connected,
        });
    }
}

fn drop_record(handles: &Handles, peer: &str, kind: &'static str, why: &str) {
    handles
        .metrics
        .dropped_messages
        .get_or_create(&Kind::of(kind))
        .inc();
    handles.peers.update(peer, |s| s.count_drop(kind));
    tracing::warn!(peer, kind, why, "dropped a sync message from a peer");
}

/// Milliseconds since `started`, on the monotonic clock.
fn monotonic_ms(started: std::time::Instant) -> u64 {
    u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX)
}

/// Records which of `theirs` (the peer's digests) equal ours, and that the
/// peer shows every allocation folded before the comparison began (see
/// [`crate::peers::lag`]). Returns our live documents and those in sync.
fn mark_in_sync(
    handles: &Handles,
    peer: &str,
    theirs: &[(DocId, [u8; 32])],
) -> (Vec<DocId>, BTreeSet<DocId>) {
    let generation = handles.lag_tracker().generation();
    let (ours, in_sync) = work::compare(&handles.ledger, peer, theirs);
    let mut lag = handles.lag_tracker();
    for doc in &in_sync {
        lag.shown(peer, *doc, generation);
    }
    (ours, in_sync)
}
