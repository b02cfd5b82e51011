//! The replication policy as a state machine with no I/O, in the manner of
//! raft-rs's `RawNode`: the shell (the swarm's event loop, or the simulator)
//! hands it [`Input`]s with the time, and carries out the [`Action`]s it
//! returns. Every scheduling rule and constant of replication lives here:
//! when a peer gets a request and for which documents, redial backoff,
//! anti-entropy rounds, what is left to a change's author, when heads alone
//! wait, and when a peer counts as in sync.
//!
//! Why the rules are what they are is told at each constant; the measured
//! effects are in docs/BENCHMARKS.md.

use super::topology::Topology;
use crate::ledger::{DocId, NodeTag, Withhold};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

/// Redial backoff: quick first, and capped low, so a healed link is back
/// within about a tenth of a second (a failed dial on a dead link costs
/// next to nothing, and no second dial starts while one is pending). The whole
/// mesh back at once also matters to relay suppression: while only some
/// links are up, changes are relayed, and then sent again by their authors.
pub const FIRST_BACKOFF: Duration = Duration::from_millis(50);
/// See [`FIRST_BACKOFF`].
pub const MAX_BACKOFF: Duration = Duration::from_millis(100);
/// How often redials and the anti-entropy round are checked: the shell
/// sends [`Input::Tick`] this often.
pub const HOUSEKEEPING: Duration = Duration::from_millis(50);
/// Least time between two requests to a peer whose only news from us would
/// be our heads (see [`crate::ledger::relay`]): it keeps a follower's
/// acknowledgements to about ten a second per peer instead of one per change it
/// applies, while any change of ours goes at once.
pub const HEADS_GAP: Duration = Duration::from_millis(100);
/// How long after a link changes (a peer connects, or reports different
/// peers) an author we reach is still trusted to reach that peer too. When
/// a partition heals, every pair reconnects within milliseconds, but a
/// peer's report of its new links reaches us only with its next message,
/// often after the first big exchange; relaying an author's changes
/// meanwhile sent 10-15 % of a heal twice. A link that really stays down
/// costs its relayed changes this much delay, once.
pub const LINK_SETTLE: Duration = Duration::from_secs(2);

/// A peer, by its peer id's text form.
pub type PeerKey = String;

/// What happened, as the shell tells it.
#[derive(Debug, Clone, PartialEq)]
pub enum Input {
    /// Time passed (every [`HOUSEKEEPING`]).
    Tick,
    /// The first connection to the peer is up.
    Connected(PeerKey),
    /// The last connection to the peer closed.
    Disconnected(PeerKey),
    /// A dial failed, or could not start.
    DialFailed(PeerKey),
    /// These documents changed here (new allocations, merged changes).
    DocsChanged(BTreeSet<DocId>),
    /// Our live documents' digests, read for an anti-entropy round
    /// ([`Action::AntiEntropyRound`]).
    OurDigests(Vec<(DocId, [u8; 32])>),
    /// The request [`Action::Build`] asked for is built; `has_request` when
    /// there is something to send; `deferred` are documents whose heads-only
    /// message was held back.
    Built {
        /// The peer.
        peer: PeerKey,
        /// Whether a request is ready.
        has_request: bool,
        /// Held-back documents.
        deferred: Vec<DocId>,
    },
    /// A request from the peer arrived (its live documents' digests and the
    /// peers it is connected to); the shell applies it and answers.
    RequestArrived {
        /// The peer.
        peer: PeerKey,
        /// Its digests of documents that may be held here.
        digests: Vec<(DocId, [u8; 32])>,
        /// The peers it says it is connected to.
        connected: Vec<NodeTag>,
    },
    /// The shell answered the peer's request; `applied` are the documents
    /// its messages changed here (the automerge protocol answers each).
    Answered {
        /// The peer.
        peer: PeerKey,
        /// Documents with an applied message.
        applied: BTreeSet<DocId>,
    },
    /// An answer to a request of ours arrived.
    ResponseArrived {
        /// The peer.
        peer: PeerKey,
        /// Whether it answers the request in flight (not an older one).
        current: bool,
        /// Its digests of documents that may be held here.
        digests: Vec<(DocId, [u8; 32])>,
        /// The peers it says it is connected to.
        connected: Vec<NodeTag>,
    },
    /// The shell compared the peer's digests with ours
    /// ([`Action::Compare`]): `ours` were our live documents, `in_sync` those
    /// the peer holds identical copies of.
    Compared {
        /// The peer.
        peer: PeerKey,
        /// Our live documents when the comparison began.
        ours: Vec<DocId>,
        /// Those in sync.
        in_sync: BTreeSet<DocId>,
    },
    /// The shell has news for these peers that rides on any request (the
    /// settlement summaries of a bounded overlay): the next anti-entropy
    /// round sends them one even if their documents are in sync.
    NewsFor(BTreeSet<PeerKey>),
    /// A request of ours failed (timeout, closed stream).
    RequestFailed {
        /// The peer.
        peer: PeerKey,
        /// Whether it was the request in flight (not an older one).
        current: bool,
    },
}

/// Which documents a request is to carry sync messages for.
#[derive(Debug, Clone, PartialEq)]
pub struct BuildOrder {
    /// The peer.
    pub peer: PeerKey,
    /// Every live document (after a reconnect or a failure).
    pub all: bool,
    /// Otherwise these.
    pub docs: BTreeSet<DocId>,
    /// An anti-entropy round: send even without any sync message, and
    /// resend to a peer whose digest differs while nothing is under way.
    pub heartbeat: bool,
    /// The peer's last known digests (to tell a lost message, see `heartbeat`).
    pub their_digests: HashMap<DocId, [u8; 32]>,
    /// What the messages leave to their authors.
    pub withhold: Withhold,
    /// The peers we are connected to, as the request reports them.
    pub connected: Vec<NodeTag>,
}

/// What the shell is to do, in order.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Dial the peer.
    Dial(PeerKey),
    /// A redial is scheduled (for the peer's redial count).
    RedialScheduled(PeerKey),
    /// Start a new sync session with the peer (keep shared heads, forget
    /// what was in flight).
    ResetSession(PeerKey),
    /// Build a request (off the event loop: it takes shard locks), then
    /// report [`Input::Built`].
    Build(BuildOrder),
    /// Send the request just built to the peer.
    Send(PeerKey),
    /// Read our digests for an anti-entropy round (off the loop), then
    /// report [`Input::OurDigests`]; also the moment for the shell's
    /// once-a-round sampling.
    AntiEntropyRound,
    /// Compare the peer's digests with ours (off the loop), then report
    /// [`Input::Compared`].
    Compare {
        /// The peer.
        peer: PeerKey,
        /// Its digests.
        theirs: Vec<(DocId, [u8; 32])>,
    },
    /// Every document was identical on both sides just now.
    InSync(PeerKey),
    /// The peer is in sync again after `outage` out of sync (for the
    /// confidence model).
    Resynced {
        /// The peer.
        peer: PeerKey,
        /// How long it was out of sync.
        outage: Duration,
    },
}

/// Where the peer's outbound request stands: one in flight at most, so
/// each direction's messages arrive in order, as the automerge protocol
/// assumes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outbound {
    Idle,
    Building,
    InFlight,
}

/// What the engine keeps of one peer.
#[derive(Debug)]
struct Peer {
    tag: NodeTag,
    /// The peers this peer said it is connected to, in its last message.
    reports: Vec<NodeTag>,
    /// When it last connected or reported different links.
    links_changed_at: Option<u64>,
    connected: bool,
    outbound: Outbound,
    /// Documents with news for this peer.
    dirty: BTreeSet<DocId>,
    /// Every live document has news (after a reconnect or a failure).
    dirty_all: bool,
    /// Send a request even without sync messages (anti-entropy round).
    heartbeat: bool,
    /// When the last request to this peer went out.
    last_sent: Option<u64>,
    /// Documents whose heads-only message was held back, and since when.
    deferred: BTreeSet<DocId>,
    deferred_since: Option<u64>,
    /// The next round sends heads-only messages too (the deferred ones are due).
    flush: bool,
    /// The peer's last known digest of each document.
    their_digests: HashMap<DocId, [u8; 32]>,
    backoff: Duration,
    next_dial: Option<u64>,
    out_of_sync_since: Option<u64>,
    /// The shell has news for it (see [`Input::NewsFor`]).
    news: bool,
}

/// Which epochs are live, as the engine is told at each call.
pub type IsLive<'a> = &'a dyn Fn(u32) -> bool;

/// The replication policy of one node; see the module docs.
#[derive(Debug)]
pub struct Engine {
    peers: BTreeMap<PeerKey, Peer>,
    sync_interval: Duration,
    last_round: u64,
    /// When the last link change stops settling (see [`LINK_SETTLE`]).
    settle_ends: Option<u64>,
    /// In a bounded overlay, which neighbour the next quiet round keeps
    /// alive; `None` in a full mesh.
    bounded: Option<usize>,
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl Engine {
    /// An engine for the allowlisted `peers`, each to be dialled at once,
    /// with an anti-entropy round every `sync_interval`, starting at `now`.
    pub fn new(
        peers: impl IntoIterator<Item = PeerKey>,
        sync_interval: Duration,
        now: u64,
    ) -> Self {
        Self::full_mesh(peers, sync_interval, now)
    }

    /// An engine for the neighbours of `topology`. In a full mesh it is
    /// [`Engine::new`] over every other member. In a bounded overlay new
    /// changes still go to every neighbour at once (each forwards them on),
    /// but a message with nothing but our heads waits for the next round
    /// that has the peer anyway, and a round goes only to neighbours whose
    /// digests differ from ours, that have news ([`Input::NewsFor`]), and
    /// one more in turn: a quiet node sends one request per round whatever
    /// the cluster's size.
    pub fn with_topology(topology: &Topology, sync_interval: Duration, now: u64) -> Self {
        let mut engine = Self::full_mesh(topology.neighbours.clone(), sync_interval, now);
        if !topology.full_mesh {
            engine.bounded = Some(0);
        }
        engine
    }

    fn full_mesh(
        peers: impl IntoIterator<Item = PeerKey>,
        sync_interval: Duration,
        now: u64,
    ) -> Self {
        let peers = peers
            .into_iter()
            .map(|key| {
                let peer = Peer {
                    tag: NodeTag::of(&key),
                    reports: Vec::new(),
                    links_changed_at: None,
                    connected: false,
                    outbound: Outbound::Idle,
                    dirty: BTreeSet::new(),
                    dirty_all: false,
                    heartbeat: false,
                    last_sent: None,
                    deferred: BTreeSet::new(),
                    deferred_since: None,
                    flush: false,
                    their_digests: HashMap::new(),
                    backoff: FIRST_BACKOFF,
                    next_dial: Some(now),
                    out_of_sync_since: None,
                    news: false,
                };
                (key, peer)
            })
            .collect();
        Self {
            peers,
            sync_interval,
            last_round: now,
            settle_ends: None,
            bounded: None,
        }
    }

    /// Takes in `input` at `now`, ms of a monotonic clock (never the wall
    /// clock, which may jump: a jump backwards would hold back every redial
    /// and anti-entropy round by its size); `live` tells which epochs may be
    /// held. Returns what the shell is to do, in order.
    pub fn handle(&mut self, input: Input, now: u64, live: IsLive<'_>) -> Vec<Action> {
        let mut out = Vec::new();
        match input {
            Input::Tick => self.tick(now, &mut out),
            Input::Connected(key) => self.connected(&key, now, &mut out),
            Input::Disconnected(key) => self.disconnected(&key, now, &mut out),
            Input::DialFailed(key) => self.schedule_redial(&key, now, &mut out),
            Input::DocsChanged(docs) => {
                self.for_every_peer(now, &mut out, |p| p.dirty.extend(docs.iter().copied()))
            }
            Input::OurDigests(ours) => self.round_with(&ours, now, live, &mut out),
            Input::Built {
                peer,
                has_request,
                deferred,
            } => self.built(&peer, has_request, deferred, now, &mut out),
            Input::RequestArrived {
                peer,
                digests,
                connected,
            } => {
                if let Some(p) = self.peers.get_mut(&peer) {
                    // Only documents that may be held are remembered: a peer
                    // cannot grow this map with made-up ids.
                    p.their_digests
                        .extend(digests.into_iter().filter(|(doc, _)| live(doc.epoch)));
                }
                self.reports(&peer, connected, now, &mut out);
            }
            Input::Answered { peer, applied } => {
                if let Some(p) = self.peers.get_mut(&peer) {
                    p.dirty.extend(applied);
                }
                self.kick(&peer, now, &mut out);
            }
            Input::ResponseArrived {
                peer,
                current,
                digests,
                connected,
            } => {
                let Some(p) = self.peers.get_mut(&peer) else {
                    return out;
                };
                if current && p.outbound == Outbound::InFlight {
                    p.outbound = Outbound::Idle;
                }
                let theirs: Vec<(DocId, [u8; 32])> = digests
                    .into_iter()
                    .filter(|(doc, _)| live(doc.epoch))
                    .collect();
                p.their_digests.extend(theirs.iter().copied());
                self.reports(&peer, connected, now, &mut out);
                // Which documents the peer holds as we do is settled once
                // they are compared off the loop.
                out.push(Action::Compare { peer, theirs });
            }
            Input::Compared {
                peer,
                ours,
                in_sync,
            } => self.compared(&peer, &ours, &in_sync, now, &mut out),
            Input::NewsFor(peers) => {
                for key in peers {
                    if let Some(p) = self.peers.get_mut(&key) {
                        p.news = true;
                    }
                }
            }
            Input::RequestFailed { peer: key, current } => {
                if let Some(p) = self.peers.get_mut(&key) {
                    if current && p.outbound == Outbound::InFlight {
                        p.outbound = Outbound::Idle;
                    }
                    p.dirty_all = true;
                    out.push(Action::ResetSession(key));
                }
            }
        }
        out
    }

    /// Tags of the peers we are connected to, as our messages report them.
    pub fn connected_tags(&self) -> Vec<NodeTag> {
        let mut tags: Vec<NodeTag> = self
            .peers
            .values()
            .filter(|p| p.connected)
            .map(|p| p.tag)
            .collect();
        tags.sort_unstable();
        tags
    }

    /// Whether the peer is connected, as the engine was told.
    pub fn is_connected(&self, peer: &str) -> bool {
        self.peers.get(peer).is_some_and(|p| p.connected)
    }

    fn tick(&mut self, now: u64, out: &mut Vec<Action>) {
        let due: Vec<PeerKey> = self
            .peers
            .iter()
            .filter(|(_, p)| !p.connected && p.next_dial.is_some_and(|t| t <= now))
            .map(|(k, _)| k.clone())
            .collect();
        for key in due {
            if let Some(p) = self.peers.get_mut(&key) {
                p.next_dial = None;
            }
            out.push(Action::Dial(key));
        }
        // The held-back heads of every peer that has waited [`HEADS_GAP`]
        // (in a bounded overlay they wait for the peer's next round).
        let flush_heads = self.bounded.is_none();
        self.for_every_peer(now, out, |p| {
            if !flush_heads {
                return;
            }
            if p.deferred_since
                .is_some_and(|t| now.saturating_sub(t) >= ms(HEADS_GAP))
            {
                p.dirty.append(&mut p.deferred);
                p.deferred_since = None;
                p.flush = true;
            }
        });
        if self.settle_ends.is_some_and(|t| t <= now) {
            // Links still unreported after settling are really down: what
            // was left to their authors goes by relay now.
            self.settle_ends = None;
            self.for_every_peer(now, out, |p| p.dirty_all = true);
        }
        if now.saturating_sub(self.last_round) >= ms(self.sync_interval) {
            self.last_round = now;
            out.push(Action::AntiEntropyRound);
        }
    }

    /// Anti-entropy: every connected peer gets every live document's digest,
    /// and a sync message wherever its last known digest differs from ours.
    fn round_with(
        &mut self,
        ours: &[(DocId, [u8; 32])],
        now: u64,
        live: IsLive<'_>,
        out: &mut Vec<Action>,
    ) {
        let keys: Vec<PeerKey> = self.peers.keys().cloned().collect();
        // In a bounded overlay, the one neighbour kept alive this round.
        let keepalive = self.bounded.as_mut().and_then(|rotation| {
            let connected: Vec<&PeerKey> = keys
                .iter()
                .filter(|k| self.peers.get(*k).is_some_and(|p| p.connected))
                .collect();
            *rotation = rotation.wrapping_add(1);
            (!connected.is_empty()).then(|| connected[*rotation % connected.len()].clone())
        });
        let bounded = self.bounded.is_some();
        for key in keys {
            if let Some(p) = self.peers.get_mut(&key) {
                p.their_digests.retain(|doc, _| live(doc.epoch));
                if !p.connected {
                    continue;
                }
                let mut differs = false;
                for (doc, digest) in ours {
                    if p.their_digests.get(doc) != Some(digest) {
                        p.dirty.insert(*doc);
                        differs = true;
                    }
                }
                let news = std::mem::take(&mut p.news);
                p.heartbeat = !bounded || differs || news || keepalive.as_ref() == Some(&key);
            }
            self.kick(&key, now, out);
        }
    }

    fn connected(&mut self, key: &str, now: u64, out: &mut Vec<Action>) {
        let Some(p) = self.peers.get_mut(key) else {
            return;
        };
        p.connected = true;
        p.backoff = FIRST_BACKOFF;
        p.next_dial = None;
        p.dirty_all = true;
        p.heartbeat = true;
        out.push(Action::ResetSession(key.to_owned()));
        self.links_changed(key, now);
        self.kick(key, now, out);
    }

    fn disconnected(&mut self, key: &str, now: u64, out: &mut Vec<Action>) {
        let Some(p) = self.peers.get_mut(key) else {
            return;
        };
        p.connected = false;
        // A build under way still reports back; until it has, no other
        // starts, so that one request at most is ever in flight.
        if p.outbound == Outbound::InFlight {
            p.outbound = Outbound::Idle;
        }
        p.reports.clear();
        out.push(Action::ResetSession(key.to_owned()));
        self.schedule_redial(key, now, out);
        // Changes it authored were left to it: relay them now.
        self.for_every_peer(now, out, |p| p.dirty_all = true);
    }

    fn schedule_redial(&mut self, key: &str, now: u64, out: &mut Vec<Action>) {
        let Some(p) = self.peers.get_mut(key) else {
            return;
        };
        if p.connected || p.next_dial.is_some() {
            return;
        }
        p.next_dial = Some(now.saturating_add(ms(p.backoff)));
        p.backoff = (p.backoff * 2).min(MAX_BACKOFF);
        out.push(Action::RedialScheduled(key.to_owned()));
    }

    /// Starts building a request for `key` if it is connected, idle and has
    /// something to send.
    fn kick(&mut self, key: &str, now: u64, out: &mut Vec<Action>) {
        let mut withhold = self.withhold_for(key, now);
        let connected = self.connected_tags();
        let Some(p) = self.peers.get_mut(key) else {
            return;
        };
        let has_work = p.heartbeat || p.dirty_all || !p.dirty.is_empty();
        if !p.connected || p.outbound != Outbound::Idle || !has_work {
            return;
        }
        let docs = std::mem::take(&mut p.dirty);
        let all = std::mem::take(&mut p.dirty_all);
        let heartbeat = std::mem::take(&mut p.heartbeat);
        let flush = std::mem::take(&mut p.flush);
        let told_recently = p
            .last_sent
            .is_some_and(|t| now.saturating_sub(t) < ms(HEADS_GAP));
        p.outbound = Outbound::Building;
        // Heads alone wait while authors send the peer their changes
        // themselves and it heard from us a moment ago; in a bounded
        // overlay, always until the peer's next round.
        withhold.heads = if self.bounded.is_some() {
            !(all || heartbeat)
        } else {
            !withhold.authors.is_empty() && told_recently && !(all || heartbeat || flush)
        };
        out.push(Action::Build(BuildOrder {
            peer: key.to_owned(),
            all,
            docs,
            heartbeat,
            their_digests: p.their_digests.clone(),
            withhold,
            connected,
        }));
    }

    fn built(
        &mut self,
        key: &str,
        has_request: bool,
        deferred: Vec<DocId>,
        now: u64,
        out: &mut Vec<Action>,
    ) {
        let Some(p) = self.peers.get_mut(key) else {
            return;
        };
        p.outbound = Outbound::Idle;
        if !deferred.is_empty() {
            p.deferred.extend(deferred);
            p.deferred_since.get_or_insert(now);
        }
        if has_request && p.connected {
            p.outbound = Outbound::InFlight;
            p.last_sent = Some(now);
            out.push(Action::Send(key.to_owned()));
        } else {
            self.kick(key, now, out);
        }
    }

    /// Records whether the peer is in sync, then starts its next round.
    fn compared(
        &mut self,
        key: &str,
        ours: &[DocId],
        in_sync: &BTreeSet<DocId>,
        now: u64,
        out: &mut Vec<Action>,
    ) {
        let Some(p) = self.peers.get_mut(key) else {
            return;
        };
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
            out.push(Action::InSync(key.to_owned()));
        }
        if let Some(since) = resynced_after {
            out.push(Action::Resynced {
                peer: key.to_owned(),
                outage: Duration::from_millis(now.saturating_sub(since)),
            });
        }
        self.kick(key, now, out);
    }

    /// The authors whose changes `target` gets from them directly: peers
    /// we are connected to that say they are connected to `target`, while
    /// `target` says the same of them, or whose links to each other are
    /// still settling ([`LINK_SETTLE`]). See [`crate::ledger::relay`].
    fn withhold_for(&self, target: &str, now: u64) -> Withhold {
        let Some(t) = self.peers.get(target) else {
            return Withhold::nothing();
        };
        let settling = |p: &Peer| {
            p.links_changed_at
                .is_some_and(|at| now.saturating_sub(at) < ms(LINK_SETTLE))
        };
        let authors = self
            .peers
            .iter()
            .filter(|(key, a)| {
                key.as_str() != target
                    && a.connected
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

    /// Keeps what `key` says it is connected to. When that changes, what
    /// may be left to authors changes too: every peer gets a fresh round.
    fn reports(&mut self, key: &str, connected: Vec<NodeTag>, now: u64, out: &mut Vec<Action>) {
        let Some(p) = self.peers.get_mut(key) else {
            return;
        };
        if p.reports != connected {
            p.reports = connected;
            self.links_changed(key, now);
            self.for_every_peer(now, out, |p| p.dirty_all = true);
        }
    }

    /// Notes that `key`'s links changed: see [`LINK_SETTLE`].
    fn links_changed(&mut self, key: &str, now: u64) {
        if let Some(p) = self.peers.get_mut(key) {
            p.links_changed_at = Some(now);
        }
        self.settle_ends = Some(now.saturating_add(ms(LINK_SETTLE)));
    }

    /// Applies `mark` to every peer, then starts its round if it has work.
    fn for_every_peer(&mut self, now: u64, out: &mut Vec<Action>, mut mark: impl FnMut(&mut Peer)) {
        let keys: Vec<PeerKey> = self.peers.keys().cloned().collect();
        for key in keys {
            if let Some(p) = self.peers.get_mut(&key) {
                mark(p);
            }
            self.kick(&key, now, out);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "12D3KooWPeerA";
    const B: &str = "12D3KooWPeerB";

    fn doc(shard: u8) -> DocId {
        DocId { epoch: 7, shard }
    }

    fn live(_: u32) -> bool {
        true
    }

    fn engine() -> Engine {
        Engine::new([A.to_owned(), B.to_owned()], Duration::from_secs(1), 0)
    }

    fn builds(actions: &[Action]) -> Vec<&BuildOrder> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::Build(order) => Some(order),
                _ => None,
            })
            .collect()
    }

    /// Connects `peer` and answers its first build with a request, so that
    /// one is in flight.
    fn connect(e: &mut Engine, peer: &str, now: u64) {
        let actions = e.handle(Input::Connected(peer.into()), now, &live);
        assert_eq!(actions[0], Action::ResetSession(peer.into()));
        let order = builds(&actions)[0];
        assert!(order.all && order.heartbeat, "{order:?}");
        let sent = e.handle(
            Input::Built {
                peer: peer.into(),
                has_request: true,
                deferred: vec![],
            },
            now,
            &live,
        );
        assert_eq!(sent, [Action::Send(peer.into())]);
    }

    fn respond(e: &mut Engine, peer: &str, now: u64, connected: Vec<NodeTag>) -> Vec<Action> {
        e.handle(
            Input::ResponseArrived {
                peer: peer.into(),
                current: true,
                digests: vec![(doc(0), [1; 32])],
                connected,
            },
            now,
            &live,
        )
    }

    #[test]
    fn a_build_that_outlives_its_connection_is_the_only_one_until_it_reports() {
        let mut e = engine();
        e.handle(Input::Tick, 0, &live);
        connect(&mut e, A, 0);
        respond(&mut e, A, 10, vec![]);
        // A build is under way when the link drops and comes back.
        let changed = e.handle(Input::DocsChanged([doc(1)].into()), 20, &live);
        assert_eq!(builds(&changed).len(), 1, "{changed:?}");
        e.handle(Input::Disconnected(A.into()), 30, &live);
        let again = e.handle(Input::Connected(A.into()), 40, &live);
        assert!(
            builds(&again).is_empty(),
            "a second build while one is out: {again:?}"
        );
        // The old build reports: it is sent, and nothing else is built.
        let sent = e.handle(
            Input::Built {
                peer: A.into(),
                has_request: true,
                deferred: vec![],
            },
            50,
            &live,
        );
        assert_eq!(sent, [Action::Send(A.into())]);
        assert!(builds(&e.handle(Input::Tick, 60, &live)).is_empty());
    }

    #[test]
    fn every_peer_is_dialled_at_once_and_redialled_with_capped_backoff() {
        let mut e = engine();
        let first = e.handle(Input::Tick, 0, &live);
        assert_eq!(first, [Action::Dial(A.into()), Action::Dial(B.into())]);
        assert!(
            e.handle(Input::Tick, 10, &live).is_empty(),
            "no second dial while one is pending"
        );
        let failed = e.handle(Input::DialFailed(A.into()), 10, &live);
        assert_eq!(failed, [Action::RedialScheduled(A.into())]);
        assert!(!e
            .handle(Input::Tick, 59, &live)
            .contains(&Action::Dial(A.into())));
        assert!(e
            .handle(Input::Tick, 60, &live)
            .contains(&Action::Dial(A.into())));
        // The backoff doubles to the cap and stays there.
        for (fail_at, due) in [(70, 170), (170, 270)] {
            e.handle(Input::DialFailed(A.into()), fail_at, &live);
            assert!(!e
                .handle(Input::Tick, due - 1, &live)
                .contains(&Action::Dial(A.into())));
            assert!(e
                .handle(Input::Tick, due, &live)
                .contains(&Action::Dial(A.into())));
        }
        // A connection resets it.
        connect(&mut e, A, 300);
        e.handle(Input::Disconnected(A.into()), 400, &live);
        assert!(e
            .handle(Input::Tick, 450, &live)
            .contains(&Action::Dial(A.into())));
    }

    /// Finishes every build in `actions` without sending, and those that
    /// follow, until the engine is quiet; returns the orders seen.
    fn drain(e: &mut Engine, mut actions: Vec<Action>, now: u64) -> Vec<BuildOrder> {
        let mut seen = Vec::new();
        while let Some(order) = builds(&actions).first().map(|o| (*o).clone()) {
            actions.retain(|a| !matches!(a, Action::Build(o) if o.peer == order.peer));
            let more = e.handle(
                Input::Built {
                    peer: order.peer.clone(),
                    has_request: false,
                    deferred: vec![],
                },
                now,
                &live,
            );
            actions.extend(more);
            seen.push(order);
        }
        seen
    }

    #[test]
    fn one_request_is_in_flight_at_a_time() {
        let mut e = engine();
        connect(&mut e, A, 0);
        let changed = e.handle(Input::DocsChanged([doc(3)].into()), 5, &live);
        assert!(
            builds(&changed).is_empty(),
            "a request is in flight: {changed:?}"
        );
        // An answer to an older request does not free the peer.
        e.handle(
            Input::ResponseArrived {
                peer: A.into(),
                current: false,
                digests: vec![],
                connected: vec![],
            },
            6,
            &live,
        );
        let still = e.handle(
            Input::Compared {
                peer: A.into(),
                ours: vec![],
                in_sync: BTreeSet::new(),
            },
            7,
            &live,
        );
        assert!(builds(&still).is_empty(), "{still:?}");
        // The answer to it asks for a comparison; the next round follows it.
        let answered = respond(&mut e, A, 10, vec![]);
        assert!(answered.contains(&Action::Compare {
            peer: A.into(),
            theirs: vec![(doc(0), [1; 32])],
        }));
        let compared = e.handle(
            Input::Compared {
                peer: A.into(),
                ours: vec![doc(0)],
                in_sync: [doc(0)].into(),
            },
            11,
            &live,
        );
        let order = builds(&compared)[0];
        assert_eq!((order.all, &order.docs), (false, &BTreeSet::from([doc(3)])));
    }

    #[test]
    fn a_failed_request_resends_everything_in_a_new_session() {
        let mut e = engine();
        connect(&mut e, A, 0);
        let failed = e.handle(
            Input::RequestFailed {
                peer: A.into(),
                current: true,
            },
            5,
            &live,
        );
        assert_eq!(failed, [Action::ResetSession(A.into())]);
        let kicked = e.handle(Input::DocsChanged(BTreeSet::new()), 6, &live);
        assert!(builds(&kicked)[0].all);
    }

    #[test]
    fn anti_entropy_marks_the_documents_whose_digests_differ() {
        let mut e = engine();
        connect(&mut e, A, 0);
        respond(&mut e, A, 5, vec![]);
        e.handle(
            Input::Built {
                peer: A.into(),
                has_request: false,
                deferred: vec![],
            },
            6,
            &live,
        );
        assert!(!e
            .handle(Input::Tick, 999, &live)
            .contains(&Action::AntiEntropyRound));
        assert!(e
            .handle(Input::Tick, 1_000, &live)
            .contains(&Action::AntiEntropyRound));
        let round = e.handle(
            Input::OurDigests(vec![(doc(0), [1; 32]), (doc(1), [2; 32])]),
            1_001,
            &live,
        );
        let order = builds(&round)[0];
        assert!(order.heartbeat);
        assert_eq!(order.docs, BTreeSet::from([doc(1)]), "doc 0 is equal there");
    }

    #[test]
    fn changes_are_left_to_an_author_both_sides_say_is_linked_and_heads_wait() {
        let mut e = engine();
        connect(&mut e, A, 0);
        connect(&mut e, B, 0);
        let (a, b) = (NodeTag::of(A), NodeTag::of(B));
        // Each says it reaches the other.
        let mut actions = respond(&mut e, A, 10, vec![b]);
        actions.extend(respond(&mut e, B, 10, vec![a]));
        for peer in [A, B] {
            actions.extend(e.handle(
                Input::Compared {
                    peer: peer.into(),
                    ours: vec![],
                    in_sync: BTreeSet::new(),
                },
                10,
                &live,
            ));
        }
        let early = drain(&mut e, actions, 10);
        assert!(
            early.iter().all(|o| !o.withhold.authors.is_empty()),
            "while links settle an author counts as reaching: {early:?}"
        );
        let after = 10 + ms(LINK_SETTLE) + 1;
        // Settled: one round for everybody, then quiet.
        let settled = e.handle(Input::Tick, after, &live);
        drain(&mut e, settled, after);
        let to_b = e.handle(Input::DocsChanged([doc(2)].into()), after, &live);
        let order = builds(&to_b)
            .into_iter()
            .find(|o| o.peer == B)
            .cloned()
            .expect("a build for B");
        assert_eq!(
            order.withhold.authors,
            vec![a],
            "A's changes reach B from A"
        );
        assert!(
            !order.withhold.heads,
            "B was not told anything a moment ago"
        );
        drain(&mut e, to_b, after);
        // Just told: with an author sending, heads alone wait...
        connect_send(&mut e, B, after + 1);
        respond(&mut e, B, after + 2, vec![a]);
        let quick = e.handle(
            Input::Compared {
                peer: B.into(),
                ours: vec![],
                in_sync: BTreeSet::new(),
            },
            after + 3,
            &live,
        );
        assert!(builds(&quick).is_empty());
        let change = e.handle(Input::DocsChanged([doc(4)].into()), after + 4, &live);
        let held = builds(&change)
            .into_iter()
            .find(|o| o.peer == B)
            .cloned()
            .expect("a build for B");
        assert!(held.withhold.heads, "{held:?}");
        let deferred = e.handle(
            Input::Built {
                peer: B.into(),
                has_request: false,
                deferred: vec![doc(4)],
            },
            after + 5,
            &live,
        );
        assert!(builds(&deferred).is_empty());
        // ...for HEADS_GAP, then go in a round that sends heads too.
        let flushed = e.handle(Input::Tick, after + 5 + ms(HEADS_GAP), &live);
        let flush = builds(&flushed)
            .into_iter()
            .find(|o| o.peer == B)
            .cloned()
            .expect("the deferred heads");
        assert!(
            flush.docs.contains(&doc(4)) && !flush.withhold.heads,
            "{flush:?}"
        );
    }

    /// A change for `peer` built and sent at `now`.
    fn connect_send(e: &mut Engine, peer: &str, now: u64) {
        let actions = e.handle(Input::DocsChanged([doc(9)].into()), now, &live);
        assert!(
            builds(&actions).iter().any(|o| o.peer == peer),
            "{actions:?}"
        );
        let sent = e.handle(
            Input::Built {
                peer: peer.into(),
                has_request: true,
                deferred: vec![],
            },
            now,
            &live,
        );
        assert_eq!(sent, [Action::Send(peer.into())]);
    }

    #[test]
    fn a_peer_in_sync_again_reports_how_long_it_was_out() {
        let mut e = engine();
        connect(&mut e, A, 0);
        let apart = e.handle(
            Input::Compared {
                peer: A.into(),
                ours: vec![doc(0), doc(1)],
                in_sync: [doc(0)].into(),
            },
            100,
            &live,
        );
        assert!(!apart.contains(&Action::InSync(A.into())));
        let together = e.handle(
            Input::Compared {
                peer: A.into(),
                ours: vec![doc(0), doc(1)],
                in_sync: [doc(0), doc(1)].into(),
            },
            2_600,
            &live,
        );
        assert!(together.contains(&Action::InSync(A.into())));
        assert!(together.contains(&Action::Resynced {
            peer: A.into(),
            outage: Duration::from_millis(2_500),
        }));
    }

    #[test]
    fn a_bounded_round_goes_to_neighbours_that_differ_have_news_or_whose_turn_it_is() {
        let members: Vec<PeerKey> = (0..20).map(|i| format!("12D3KooWMember{i:04}")).collect();
        let topology = Topology::new(&members[0], &members, 4);
        assert!(!topology.full_mesh);
        let mut e = Engine::with_topology(&topology, Duration::from_secs(1), 0);
        for n in &topology.neighbours {
            connect(&mut e, n, 0);
            respond(&mut e, n, 5, vec![]);
            let compared = e.handle(
                Input::Compared {
                    peer: n.clone(),
                    ours: vec![doc(0)],
                    in_sync: [doc(0)].into(),
                },
                6,
                &live,
            );
            drain(&mut e, compared, 6);
        }
        let round = |e: &mut Engine, digest: u8, at: u64| -> Vec<PeerKey> {
            let actions = e.handle(Input::OurDigests(vec![(doc(0), [digest; 32])]), at, &live);
            drain(e, actions, at)
                .into_iter()
                .filter(|o| o.heartbeat)
                .map(|o| o.peer)
                .collect()
        };
        // Quiet and in sync: one neighbour in turn, a different one each round.
        let first = round(&mut e, 1, 1_000);
        let second = round(&mut e, 1, 2_000);
        assert_eq!((first.len(), second.len()), (1, 1), "{first:?} {second:?}");
        assert_ne!(first, second);
        // News for one: it too.
        let news = topology.neighbours[0].clone();
        e.handle(Input::NewsFor([news.clone()].into()), 2_500, &live);
        let with_news = round(&mut e, 1, 3_000);
        assert!(
            with_news.contains(&news) && with_news.len() <= 2,
            "{with_news:?}"
        );
        // Our documents changed: every neighbour, whose digest now differs.
        assert_eq!(round(&mut e, 2, 4_000).len(), topology.neighbours.len());
        // A change goes at once, but heads alone wait for the peer's round.
        let changed = e.handle(Input::DocsChanged([doc(3)].into()), 4_100, &live);
        let orders = builds(&changed);
        assert!(!orders.is_empty() && orders.iter().all(|o| o.withhold.heads));
    }

    #[test]
    fn a_lost_peer_has_its_authored_changes_relayed_and_is_redialled() {
        let mut e = engine();
        connect(&mut e, A, 0);
        connect(&mut e, B, 0);
        respond(&mut e, B, 5, vec![]);
        e.handle(
            Input::Built {
                peer: B.into(),
                has_request: false,
                deferred: vec![],
            },
            6,
            &live,
        );
        let lost = e.handle(Input::Disconnected(A.into()), 10, &live);
        assert_eq!(lost[0], Action::ResetSession(A.into()));
        assert!(lost.contains(&Action::RedialScheduled(A.into())));
        let to_b = builds(&lost)[0];
        assert!(to_b.peer == B && to_b.all, "{to_b:?}");
        assert!(to_b.withhold.authors.is_empty());
        assert_eq!(e.connected_tags(), vec![NodeTag::of(B)]);
    }
}
