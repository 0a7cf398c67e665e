//! The one task that owns the swarm: it turns client commands into swarm calls and swarm
//! events into replies and [`Event`]s. Pending requests wait in maps keyed by request or
//! query id; nothing here panics on what a peer sends, and events are never awaited on
//! (a slow consumer loses events with a warning rather than stalling the network).

use crate::behaviour::{Behaviour, BehaviourEvent};
use crate::config::P2pConfig;
use crate::error::P2pError;
use crate::gossip::{
    self, ADVERT_TOPIC, ARTIFACT_RECORD_TOPIC, COMPETITION_TOPIC, Gossip, SCORE_ATTESTATION_TOPIC,
};
use crate::messages::pb::{CompetitionAnnouncement, MinerAdvert};
use crate::messages::{JobRequest, JobResponse, pb};
use crate::serve::{Answer, BlobServer, Served};
use crate::stream::StreamServer;
use futures::StreamExt;
use libp2p::gossipsub::{self, IdentTopic, MessageAcceptance};
use libp2p::kad::{self, GetProvidersOk, QueryId, QueryResult, RecordKey};
use libp2p::multiaddr::Protocol;
use libp2p::request_response::{self, OutboundRequestId, ResponseChannel};
use libp2p::swarm::dial_opts::DialOpts;
use libp2p::swarm::{ConnectionId, SwarmEvent};
use libp2p::{Multiaddr, PeerId, Swarm, identify, mdns};
use prost::Message;
use std::collections::{HashMap, HashSet};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use tunenet_types::time::now_ms;
use tunenet_types::{ArtifactRecord, BlobId, ScoreAttestation};

/// Peers remembered (connected or recently seen) for [`crate::Client::peers`].
const MAX_PEERS: usize = 4096;
/// Addresses remembered per peer.
const MAX_ADDRS: usize = 8;

/// Something that happened on the network that the node should know about.
#[derive(Debug)]
pub enum Event {
    /// The first connection to a peer was established.
    PeerConnected {
        /// The peer.
        peer: PeerId,
    },
    /// The last connection to a peer closed.
    PeerDisconnected {
        /// The peer.
        peer: PeerId,
    },
    /// A valid miner advert arrived (signed by `peer`).
    MinerAdvert {
        /// The miner that signed it.
        peer: PeerId,
        /// The advert.
        advert: MinerAdvert,
    },
    /// A valid competition announcement arrived (signed by `peer`).
    Competition {
        /// The validator that signed it.
        peer: PeerId,
        /// The announcement.
        announcement: CompetitionAnnouncement,
    },
    /// A valid artifact record arrived, published and signed by the validator that
    /// received the artifact (`peer`); its signatures are checked.
    ArtifactRecord {
        /// The validator that signed it.
        peer: PeerId,
        /// The record.
        record: ArtifactRecord,
    },
    /// A valid score attestation arrived, published and signed by its validator (`peer`).
    Attestation {
        /// The validator that signed it.
        peer: PeerId,
        /// The attestation.
        attestation: ScoreAttestation,
    },
    /// A gossip message failed validation and was rejected (its sender loses score).
    GossipRejected {
        /// The peer that forwarded it.
        peer: PeerId,
        /// The topic it came on.
        topic: String,
        /// Why it was rejected.
        reason: String,
    },
    /// A peer sent a job request; answer it with [`crate::Client::respond`].
    JobRequest {
        /// The requesting peer.
        peer: PeerId,
        /// The request.
        request: JobRequest,
        /// Where the answer goes.
        channel: JobChannel,
    },
    /// This node sent a chunk of a provided blob to a peer.
    BlobServed {
        /// Who asked.
        peer: PeerId,
        /// The blob.
        id: BlobId,
        /// The chunk's index.
        index: u64,
    },
    /// A provider sent bad blob data and was disconnected.
    BlobProviderDropped {
        /// The provider.
        peer: PeerId,
        /// The blob.
        id: BlobId,
        /// What was wrong.
        reason: String,
    },
}

/// The reply slot of an inbound job request.
#[derive(Debug)]
pub struct JobChannel(pub(crate) ResponseChannel<JobResponse>);

/// What is known about a peer.
#[derive(Clone, Debug, PartialEq)]
pub struct PeerInfo {
    /// Its id (= its node id).
    pub peer_id: PeerId,
    /// Addresses it listens on, as far as known.
    pub addrs: Vec<Multiaddr>,
    /// Whether a connection is open now.
    pub connected: bool,
    /// Its latest valid miner advert, if it is a miner.
    pub advert: Option<MinerAdvert>,
}

type Reply<T> = oneshot::Sender<Result<T, P2pError>>;

/// What a [`crate::Client`] asks the event loop to do.
pub(crate) enum Command {
    ListenAddrs(oneshot::Sender<Vec<Multiaddr>>),
    Dial(Multiaddr, Reply<PeerId>),
    Peers(oneshot::Sender<Vec<PeerInfo>>),
    PublishAdvert(MinerAdvert, Reply<()>),
    Announce(CompetitionAnnouncement, Reply<()>),
    PublishRecord(ArtifactRecord, Reply<()>),
    PublishAttestation(ScoreAttestation, Reply<()>),
    PublishRaw(String, Vec<u8>, Reply<()>),
    Job(PeerId, JobRequest, Reply<JobResponse>),
    Respond(JobChannel, JobResponse, Reply<()>),
    /// Serve a blob and announce it; `true`: answer when the announcement is done, `false`:
    /// as soon as it is served and the announcement started.
    Provide(
        BlobId,
        std::sync::Arc<crate::chunks::Manifest>,
        Reply<()>,
        bool,
    ),
    GetProviders(BlobId, Reply<Vec<PeerId>>),
    Blob(PeerId, pb::BlobRequest, Reply<pb::BlobResponse>),
    FindPeer(PeerId, Reply<Vec<Multiaddr>>),
    DropPeer(PeerId, BlobId, String),
}

#[derive(Default)]
struct PeerEntry {
    addrs: Vec<Multiaddr>,
    connected: bool,
    advert: Option<MinerAdvert>,
}

/// Owns the swarm; run it with [`EventLoop::run`] on its own task.
pub struct EventLoop {
    swarm: Swarm<Behaviour>,
    keypair: libp2p_identity::Keypair,
    config: P2pConfig,
    commands: mpsc::Receiver<Command>,
    events: mpsc::Sender<Event>,
    served: mpsc::Receiver<Served>,
    server: BlobServer,
    /// Inbound `/tunenet/blob-stream/1` streams, and the tasks answering them (aborted
    /// with the loop, so a stopped node stops serving).
    incoming: libp2p_stream::IncomingStreams,
    stream_server: StreamServer,
    serving: tokio::task::JoinSet<()>,
    peers: HashMap<PeerId, PeerEntry>,
    my_advert: Option<MinerAdvert>,
    listen_waiters: Vec<oneshot::Sender<Vec<Multiaddr>>>,
    dials: HashMap<ConnectionId, (Multiaddr, Reply<PeerId>)>,
    jobs: HashMap<OutboundRequestId, Reply<JobResponse>>,
    blobs: HashMap<OutboundRequestId, Reply<pb::BlobResponse>>,
    providing: HashMap<QueryId, Reply<()>>,
    providers: HashMap<QueryId, (HashSet<PeerId>, Reply<Vec<PeerId>>)>,
    finding: HashMap<QueryId, (PeerId, Reply<Vec<Multiaddr>>)>,
    /// Per peer: job-request tokens (`job_requests_per_sec`, `job_burst`); none: no limit.
    job_buckets: Option<crate::rate::RateBuckets<PeerId>>,
}

impl EventLoop {
    pub(crate) fn new(
        swarm: Swarm<Behaviour>,
        keypair: libp2p_identity::Keypair,
        config: P2pConfig,
        commands: mpsc::Receiver<Command>,
        events: mpsc::Sender<Event>,
        (served, server): (mpsc::Receiver<Served>, BlobServer),
        (incoming, stream_server): (libp2p_stream::IncomingStreams, StreamServer),
    ) -> Self {
        let job_buckets =
            crate::rate::RateBuckets::new(config.job_requests_per_sec, config.job_burst);
        EventLoop {
            swarm,
            keypair,
            config,
            commands,
            events,
            served,
            server,
            incoming,
            stream_server,
            serving: tokio::task::JoinSet::new(),
            peers: HashMap::new(),
            my_advert: None,
            listen_waiters: Vec::new(),
            dials: HashMap::new(),
            jobs: HashMap::new(),
            blobs: HashMap::new(),
            providing: HashMap::new(),
            providers: HashMap::new(),
            finding: HashMap::new(),
            job_buckets,
        }
    }

    /// Runs until every [`crate::Client`] is dropped.
    pub async fn run(mut self) {
        if !self.config.bootstrap.is_empty()
            && let Err(e) = self.swarm.behaviour_mut().kad.bootstrap()
        {
            tracing::warn!(error = %e, "kademlia bootstrap could not start");
        }
        let period = Duration::from_secs(self.config.advert_interval_secs.max(1));
        let mut heartbeat = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
        loop {
            tokio::select! {
                event = self.swarm.select_next_some() => self.on_swarm_event(event),
                command = self.commands.recv() => match command {
                    Some(c) => self.on_command(c),
                    None => break,
                },
                Some(served) = self.served.recv() => self.on_served(served),
                Some((peer, stream)) = self.incoming.next() => self.on_blob_stream(peer, stream),
                Some(_) = self.serving.join_next(), if !self.serving.is_empty() => {}
                _ = heartbeat.tick() => self.on_heartbeat(),
            }
        }
        tracing::debug!("p2p event loop stopped: every client was dropped");
    }

    fn emit(&self, event: Event) {
        if let Err(e) = self.events.try_send(event) {
            tracing::warn!(event = ?e.into_inner(), "p2p event dropped: the node is not reading events fast enough");
        }
    }

    fn entry(&mut self, peer: PeerId) -> &mut PeerEntry {
        if self.peers.len() >= MAX_PEERS
            && !self.peers.contains_key(&peer)
            && let Some(old) = self
                .peers
                .iter()
                .find(|(_, e)| !e.connected)
                .map(|(p, _)| *p)
        {
            self.peers.remove(&old);
        }
        self.peers.entry(peer).or_default()
    }

    fn remember_addr(&mut self, peer: PeerId, addr: Multiaddr) {
        let e = self.entry(peer);
        if !e.addrs.contains(&addr) {
            if e.addrs.len() >= MAX_ADDRS {
                e.addrs.remove(0);
            }
            e.addrs.push(addr);
        }
    }

    fn publish(&mut self, topic: &str, data: Vec<u8>) -> Result<(), P2pError> {
        self.swarm
            .behaviour_mut()
            .gossipsub
            .publish(IdentTopic::new(topic), data)
            .map(|_| ())
            .map_err(|e| P2pError::Publish {
                topic: topic.to_string(),
                reason: e.to_string(),
            })
    }

    fn publish_advert(&mut self) -> Result<(), P2pError> {
        let Some(mut advert) = self.my_advert.clone() else {
            return Ok(());
        };
        advert.sign(&self.keypair, now_ms());
        self.publish(ADVERT_TOPIC, advert.encode_to_vec())
    }

    fn on_heartbeat(&mut self) {
        if let Err(e) = self.publish_advert() {
            tracing::debug!(error = %e, "advert heartbeat not published");
        }
        self.redial_bootstrap();
    }

    /// Dials again every bootstrap peer this node is not connected to: one that was not
    /// up yet when this node started (or restarted since) is joined on the next heartbeat.
    fn redial_bootstrap(&mut self) {
        let mut dialed = false;
        for addr in self.config.bootstrap.clone() {
            let Some(Protocol::P2p(peer)) = addr.iter().last() else {
                continue;
            };
            if self.swarm.is_connected(&peer) {
                continue;
            }
            self.swarm
                .behaviour_mut()
                .kad
                .add_address(&peer, addr.clone());
            match self.swarm.dial(addr.clone()) {
                Ok(()) => dialed = true,
                Err(e) => tracing::debug!(%addr, error = %e, "bootstrap peer not dialed"),
            }
        }
        if dialed && let Err(e) = self.swarm.behaviour_mut().kad.bootstrap() {
            tracing::debug!(error = %e, "kademlia bootstrap could not start");
        }
    }

    fn on_command(&mut self, command: Command) {
        match command {
            Command::ListenAddrs(reply) => {
                let addrs: Vec<Multiaddr> = self.swarm.listeners().cloned().collect();
                if addrs.is_empty() {
                    self.listen_waiters.push(reply);
                } else {
                    let _ = reply.send(addrs);
                }
            }
            Command::Dial(addr, reply) => {
                let opts = DialOpts::from(addr.clone());
                let id = opts.connection_id();
                match self.swarm.dial(opts) {
                    Ok(()) => {
                        self.dials.insert(id, (addr, reply));
                    }
                    Err(e) => {
                        let _ = reply.send(Err(P2pError::Dial {
                            addr: addr.to_string(),
                            reason: e.to_string(),
                        }));
                    }
                }
            }
            Command::Peers(reply) => {
                let mut list: Vec<PeerInfo> = self
                    .peers
                    .iter()
                    .map(|(p, e)| PeerInfo {
                        peer_id: *p,
                        addrs: e.addrs.clone(),
                        connected: e.connected,
                        advert: e.advert.clone(),
                    })
                    .collect();
                list.sort_by_key(|p| p.peer_id.to_base58());
                let _ = reply.send(list);
            }
            Command::PublishAdvert(advert, reply) => {
                self.my_advert = Some(advert);
                let _ = reply.send(self.publish_advert());
            }
            Command::Announce(mut ann, reply) => {
                ann.sign(&self.keypair, now_ms());
                let _ = reply.send(self.publish(COMPETITION_TOPIC, ann.encode_to_vec()));
            }
            Command::PublishRecord(record, reply) => {
                let data = gossip::encode_record(&record);
                let _ = reply.send(self.publish(ARTIFACT_RECORD_TOPIC, data));
            }
            Command::PublishAttestation(a, reply) => {
                let data = gossip::encode_attestation(&a);
                let _ = reply.send(self.publish(SCORE_ATTESTATION_TOPIC, data));
            }
            Command::PublishRaw(topic, data, reply) => {
                let _ = reply.send(self.publish(&topic, data));
            }
            Command::Job(peer, request, reply) => {
                self.dial_known(peer);
                let id = self.swarm.behaviour_mut().job.send_request(&peer, request);
                self.jobs.insert(id, reply);
            }
            Command::Respond(channel, response, reply) => {
                let r = self
                    .swarm
                    .behaviour_mut()
                    .job
                    .send_response(channel.0, response)
                    .map_err(|_| P2pError::ResponseDropped);
                let _ = reply.send(r);
            }
            Command::Provide(id, manifest, reply, wait) => {
                self.server.cache(manifest);
                if !self.server.provide(id) {
                    let _ = reply.send(Err(P2pError::Kad(format!(
                        "not providing {id}: this node already provides the most blobs it may"
                    ))));
                    return;
                }
                let key = RecordKey::new(&id.0);
                match self.swarm.behaviour_mut().kad.start_providing(key) {
                    Ok(q) if wait => {
                        self.providing.insert(q, reply);
                    }
                    Ok(_) => {
                        let _ = reply.send(Ok(()));
                    }
                    Err(e) => {
                        let _ = reply.send(Err(P2pError::Kad(e.to_string())));
                    }
                }
            }
            Command::GetProviders(id, reply) => {
                let q = self
                    .swarm
                    .behaviour_mut()
                    .kad
                    .get_providers(RecordKey::new(&id.0));
                self.providers.insert(q, (HashSet::new(), reply));
            }
            Command::Blob(peer, request, reply) => {
                self.dial_known(peer);
                let id = self.swarm.behaviour_mut().blob.send_request(&peer, request);
                self.blobs.insert(id, reply);
            }
            Command::FindPeer(peer, reply) => {
                let known = self.peers.get(&peer).map(|e| e.addrs.clone());
                match known {
                    Some(addrs) if self.swarm.is_connected(&peer) => {
                        let _ = reply.send(Ok(addrs));
                    }
                    _ => {
                        let q = self.swarm.behaviour_mut().kad.get_closest_peers(peer);
                        self.finding.insert(q, (peer, reply));
                    }
                }
            }
            Command::DropPeer(peer, id, reason) => {
                tracing::warn!(%peer, blob = %id, %reason, "dropping a provider that sent bad data");
                let _ = self.swarm.disconnect_peer_id(peer);
                self.emit(Event::BlobProviderDropped { peer, id, reason });
            }
        }
    }

    /// Dials a peer that is not connected through the addresses remembered for it (the
    /// behaviours add theirs), so that a request to a peer found earlier finds its way.
    fn dial_known(&mut self, peer: PeerId) {
        if self.swarm.is_connected(&peer) {
            return;
        }
        let addrs = self
            .peers
            .get(&peer)
            .map(|e| e.addrs.clone())
            .unwrap_or_default();
        if !addrs.is_empty() {
            let opts = DialOpts::peer_id(peer)
                .addresses(addrs)
                .extend_addresses_through_behaviour()
                .build();
            let _ = self.swarm.dial(opts);
        }
    }

    fn on_blob_stream(&mut self, peer: PeerId, stream: libp2p::Stream) {
        // Each task holds a read permit while it sends; this bounds those still waiting
        // for their request.
        let limit = 4 * self.config.blob_serve_concurrency.clamp(1, 1024);
        if self.serving.len() >= limit {
            tracing::debug!(%peer, "blob stream dropped: too many open at once");
            return;
        }
        self.serving
            .spawn(self.stream_server.clone().serve(peer, stream));
    }

    fn on_served(&mut self, s: Served) {
        if let Some(m) = s.manifest {
            self.server.cache(m);
        }
        if self
            .swarm
            .behaviour_mut()
            .blob
            .send_response(s.channel, s.response)
            .is_err()
        {
            tracing::debug!(peer = %s.peer, blob = %s.id, "blob requester went away");
            return;
        }
        if let Some(index) = s.chunk {
            self.emit(Event::BlobServed {
                peer: s.peer,
                id: s.id,
                index,
            });
        }
    }

    fn on_swarm_event(&mut self, event: SwarmEvent<BehaviourEvent>) {
        match event {
            SwarmEvent::NewListenAddr { address, .. } => {
                tracing::info!(%address, "p2p listening");
                let addrs: Vec<Multiaddr> = self.swarm.listeners().cloned().collect();
                for w in self.listen_waiters.drain(..) {
                    let _ = w.send(addrs.clone());
                }
            }
            SwarmEvent::ConnectionEstablished {
                peer_id,
                connection_id,
                endpoint,
                num_established,
                ..
            } => {
                if endpoint.is_dialer() {
                    let addr = endpoint.get_remote_address().clone();
                    self.remember_addr(peer_id, strip_p2p(addr));
                }
                self.entry(peer_id).connected = true;
                if let Some((_, reply)) = self.dials.remove(&connection_id) {
                    let _ = reply.send(Ok(peer_id));
                }
                if num_established.get() == 1 {
                    tracing::debug!(peer = %peer_id, "peer connected");
                    self.emit(Event::PeerConnected { peer: peer_id });
                }
            }
            SwarmEvent::ConnectionClosed {
                peer_id,
                connection_id,
                num_established,
                cause,
                ..
            } if num_established > 0 => {
                tracing::debug!(peer = %peer_id, ?connection_id, num_established, cause = ?cause, "connection closed");
            }
            SwarmEvent::ConnectionClosed {
                peer_id,
                connection_id,
                cause,
                ..
            } => {
                tracing::debug!(peer = %peer_id, ?connection_id, cause = ?cause, "peer disconnected");
                self.entry(peer_id).connected = false;
                self.emit(Event::PeerDisconnected { peer: peer_id });
            }
            SwarmEvent::OutgoingConnectionError {
                connection_id,
                error,
                ..
            } => {
                if let Some((addr, reply)) = self.dials.remove(&connection_id) {
                    let _ = reply.send(Err(P2pError::Dial {
                        addr: addr.to_string(),
                        reason: error.to_string(),
                    }));
                }
            }
            SwarmEvent::Behaviour(event) => self.on_behaviour_event(event),
            _ => {}
        }
    }

    fn on_behaviour_event(&mut self, event: BehaviourEvent) {
        match event {
            BehaviourEvent::Identify(identify::Event::Received { peer_id, info, .. }) => {
                let speaks_kad = info
                    .protocols
                    .iter()
                    .any(|p| p.as_ref() == crate::behaviour::KAD_PROTOCOL);
                for addr in info.listen_addrs.into_iter().take(MAX_ADDRS) {
                    if speaks_kad {
                        self.swarm
                            .behaviour_mut()
                            .kad
                            .add_address(&peer_id, addr.clone());
                    }
                    self.remember_addr(peer_id, addr);
                }
            }
            BehaviourEvent::Mdns(mdns::Event::Discovered(found)) => {
                for (peer, addr) in found {
                    self.swarm
                        .behaviour_mut()
                        .kad
                        .add_address(&peer, addr.clone());
                    self.remember_addr(peer, addr.clone());
                    if !self.swarm.is_connected(&peer) {
                        let _ = self
                            .swarm
                            .dial(DialOpts::peer_id(peer).addresses(vec![addr]).build());
                    }
                }
            }
            BehaviourEvent::Gossipsub(gossipsub::Event::Message {
                propagation_source,
                message_id,
                message,
            }) => self.on_gossip(propagation_source, message_id, message),
            BehaviourEvent::Kad(kad::Event::OutboundQueryProgressed {
                id, result, step, ..
            }) => self.on_kad_query(id, result, step.last),
            BehaviourEvent::Ping(libp2p::ping::Event {
                peer,
                connection,
                result: Err(e),
            }) => {
                // A dead link keeps its TCP connection open; close it, so what waits on it
                // fails now and is retried once the peer is reachable again.
                tracing::info!(%peer, error = %e, "closing a connection whose peer stopped answering pings");
                self.swarm.close_connection(connection);
            }
            BehaviourEvent::Job(event) => self.on_job_event(event),
            BehaviourEvent::Blob(event) => self.on_blob_event(event),
            _ => {}
        }
    }

    fn on_gossip(&mut self, source: PeerId, id: gossipsub::MessageId, message: gossipsub::Message) {
        let topic = message.topic.as_str().to_string();
        let verdict = gossip::validate(
            &topic,
            &message.data,
            message.source.as_ref(),
            now_ms(),
            self.config.max_message_age().as_millis() as u64,
        );
        let gs = &mut self.swarm.behaviour_mut().gossipsub;
        match verdict {
            Ok((signer, gossip)) => {
                gs.report_message_validation_result(&id, &source, MessageAcceptance::Accept);
                match gossip {
                    Gossip::Advert(advert) => {
                        self.entry(signer).advert = Some(advert.clone());
                        self.emit(Event::MinerAdvert {
                            peer: signer,
                            advert,
                        });
                    }
                    Gossip::Competition(announcement) => self.emit(Event::Competition {
                        peer: signer,
                        announcement,
                    }),
                    Gossip::ArtifactRecord(record) => self.emit(Event::ArtifactRecord {
                        peer: signer,
                        record,
                    }),
                    Gossip::Attestation(attestation) => self.emit(Event::Attestation {
                        peer: signer,
                        attestation,
                    }),
                }
            }
            Err(reason) => {
                gs.report_message_validation_result(&id, &source, MessageAcceptance::Reject);
                tracing::info!(peer = %source, %topic, %reason, "gossip message rejected");
                self.emit(Event::GossipRejected {
                    peer: source,
                    topic,
                    reason,
                });
            }
        }
    }

    fn on_kad_query(&mut self, id: QueryId, result: QueryResult, last: bool) {
        match result {
            QueryResult::StartProviding(r) => {
                if let Err(e) = &r {
                    tracing::debug!(error = %e, "provider record reached fewer peers than hoped");
                }
                if let Some(reply) = self.providing.remove(&id) {
                    // The record is stored locally either way; peers will find it as they ask.
                    let _ = reply.send(Ok(()));
                }
            }
            QueryResult::GetClosestPeers(r) => {
                let Some((wanted, reply)) = self.finding.remove(&id) else {
                    return;
                };
                let found = match r {
                    Ok(ok) => ok.peers,
                    Err(kad::GetClosestPeersError::Timeout { peers, .. }) => peers,
                };
                let addrs = found
                    .into_iter()
                    .find(|p| p.peer_id == wanted)
                    .map(|p| p.addrs)
                    .unwrap_or_default();
                if addrs.is_empty() {
                    let _ = reply.send(Err(P2pError::Kad(format!(
                        "peer {wanted} was not found in the DHT; is it running and bootstrapped?"
                    ))));
                    return;
                }
                for a in addrs.iter().take(MAX_ADDRS) {
                    self.remember_addr(wanted, strip_p2p(a.clone()));
                }
                let _ = reply.send(Ok(addrs));
            }
            QueryResult::GetProviders(r) => {
                if let Ok(GetProvidersOk::FoundProviders { key, providers }) = &r {
                    let me = *self.swarm.local_peer_id();
                    let stored = self.swarm.behaviour_mut().kad.store_mut().providers_of(key);
                    for p in providers.iter().filter(|p| **p != me) {
                        if let Some((set, _)) = self.providers.get_mut(&id) {
                            set.insert(*p);
                        }
                        if !self.swarm.is_connected(p) {
                            // Dial while the query still holds the addresses it learnt.
                            let addrs = stored.get(p).cloned().unwrap_or_default();
                            let opts = DialOpts::peer_id(*p)
                                .addresses(addrs)
                                .extend_addresses_through_behaviour()
                                .build();
                            let _ = self.swarm.dial(opts);
                        }
                    }
                }
                let finished = last
                    || matches!(
                        r,
                        Ok(GetProvidersOk::FinishedWithNoAdditionalRecord { .. }) | Err(_)
                    );
                // Answer with the first providers found rather than when the whole query
                // ends: a query waits out every peer it asked, and one peer whose link is
                // down held every other node's transfers for its request timeout. The
                // fetch asks again each round, so later providers are not lost.
                let found = self
                    .providers
                    .get(&id)
                    .is_some_and(|(set, _)| !set.is_empty());
                if (finished || found)
                    && let Some((set, reply)) = self.providers.remove(&id)
                {
                    let _ = reply.send(Ok(set.into_iter().collect()));
                    if !finished && let Some(mut q) = self.swarm.behaviour_mut().kad.query_mut(&id)
                    {
                        q.finish();
                    }
                }
            }
            _ => {}
        }
    }

    fn on_job_event(&mut self, event: request_response::Event<JobRequest, JobResponse>) {
        use request_response::{Event as E, Message as M};
        match event {
            E::Message {
                peer,
                message: M::Request {
                    request, channel, ..
                },
                ..
            } => {
                if let Some(b) = &self.job_buckets
                    && !b.allow(&peer)
                {
                    tracing::debug!(%peer, "job request refused: over the rate limit");
                    let refused = JobResponse::Refused(format!(
                        "{peer} is over this node's limit of {} job requests a second (burst {}); slow down",
                        self.config.job_requests_per_sec, self.config.job_burst
                    ));
                    let _ = self
                        .swarm
                        .behaviour_mut()
                        .job
                        .send_response(channel, refused);
                    return;
                }
                self.emit(Event::JobRequest {
                    peer,
                    request,
                    channel: JobChannel(channel),
                })
            }
            E::Message {
                peer,
                message:
                    M::Response {
                        request_id,
                        response,
                    },
                ..
            } => {
                if let Some(reply) = self.jobs.remove(&request_id) {
                    let r = match response {
                        JobResponse::Refused(reason) => Err(P2pError::Refused { peer, reason }),
                        other => Ok(other),
                    };
                    let _ = reply.send(r);
                }
            }
            E::OutboundFailure {
                peer,
                request_id,
                error,
                ..
            } => {
                if let Some(reply) = self.jobs.remove(&request_id) {
                    let reason = error.to_string();
                    let e = match error {
                        request_response::OutboundFailure::DialFailure => {
                            P2pError::Unreachable { peer, reason }
                        }
                        _ => P2pError::Request { peer, reason },
                    };
                    let _ = reply.send(Err(e));
                }
            }
            E::InboundFailure { peer, error, .. } => {
                tracing::debug!(%peer, %error, "inbound job request failed");
            }
            E::ResponseSent { .. } => {}
        }
    }

    fn on_blob_event(&mut self, event: request_response::Event<pb::BlobRequest, pb::BlobResponse>) {
        use request_response::{Event as E, Message as M};
        match event {
            E::Message {
                peer,
                message: M::Request {
                    request, channel, ..
                },
                ..
            } => {
                if let Answer::Now(channel, response) = self.server.handle(peer, request, channel) {
                    let _ = self
                        .swarm
                        .behaviour_mut()
                        .blob
                        .send_response(channel, response);
                }
            }
            E::Message {
                message:
                    M::Response {
                        request_id,
                        response,
                    },
                ..
            } => {
                if let Some(reply) = self.blobs.remove(&request_id) {
                    let _ = reply.send(Ok(response));
                }
            }
            E::OutboundFailure {
                peer,
                request_id,
                error,
                ..
            } => {
                if let Some(reply) = self.blobs.remove(&request_id) {
                    let _ = reply.send(Err(P2pError::Request {
                        peer,
                        reason: error.to_string(),
                    }));
                }
            }
            E::InboundFailure { peer, error, .. } => {
                tracing::debug!(%peer, %error, "inbound blob request failed");
            }
            E::ResponseSent { .. } => {}
        }
    }
}

/// An address without its trailing `/p2p/<id>`, as stored per peer.
fn strip_p2p(mut addr: Multiaddr) -> Multiaddr {
    if matches!(addr.iter().last(), Some(Protocol::P2p(_))) {
        addr.pop();
    }
    addr
}

/// Addresses of a blob's providers as this node's own DHT store knows them.
trait ProvidersOf {
    fn providers_of(&mut self, key: &RecordKey) -> HashMap<PeerId, Vec<Multiaddr>>;
}

impl ProvidersOf for kad::store::MemoryStore {
    fn providers_of(&mut self, key: &RecordKey) -> HashMap<PeerId, Vec<Multiaddr>> {
        use kad::store::RecordStore;
        self.providers(key)
            .into_iter()
            .map(|r| (r.provider, r.addresses))
            .collect()
    }
}
