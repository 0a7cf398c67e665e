//! The protocol inventory (one `NetworkBehaviour` struct) and the swarm built from a
//! node's key and `P2pConfig`: TCP (noise, yamux) and QUIC transports.

use crate::chunks::{CHUNK_SIZE, MAX_BLOB_SIZE};
use crate::codec::ProstCodec;
use crate::config::P2pConfig;
use crate::error::P2pError;
use crate::gossip::{
    ADVERT_TOPIC, ARTIFACT_RECORD_TOPIC, COMPETITION_TOPIC, MAX_RECORD_BYTES,
    SCORE_ATTESTATION_TOPIC,
};
use crate::messages::{JobRequest, JobResponse, pb};
use libp2p::gossipsub::{self, IdentTopic};
use libp2p::kad::{self, store::MemoryStore, store::MemoryStoreConfig};
use libp2p::request_response::{self, ProtocolSupport};
use libp2p::swarm::{NetworkBehaviour, behaviour::toggle::Toggle};
use libp2p::{StreamProtocol, Swarm, identify, mdns, noise, ping, tcp, yamux};
use libp2p_identity::Keypair;
use std::time::Duration;

/// The job protocol's name.
pub const JOB_PROTOCOL: &str = "/tunenet/job/1";
/// The blob protocol's name.
pub const BLOB_PROTOCOL: &str = "/tunenet/blob/1";
/// tunenet's own Kademlia DHT, apart from the public IPFS one.
pub const KAD_PROTOCOL: &str = "/tunenet/kad/1.0.0";
/// The identify protocol version string.
pub const IDENTIFY_PROTOCOL: &str = "/tunenet/id/1.0.0";

/// The largest job message (offers, assignments, commitments and their answers are small).
pub const MAX_JOB_MESSAGE: usize = 256 * 1024;
/// The largest gossip message gossipsub will carry at all.
const MAX_GOSSIP_TRANSMIT: usize = 2 * MAX_RECORD_BYTES;

pub(crate) type JobCodec = ProstCodec<JobRequest, JobResponse>;
pub(crate) type BlobCodec = ProstCodec<pb::BlobRequest, pb::BlobResponse>;

/// Every protocol a tunenet node speaks.
#[derive(NetworkBehaviour)]
pub(crate) struct Behaviour {
    /// Denies connections past `max_connections`, `max_connections_per_peer` and
    /// `max_pending_incoming`.
    pub limits: libp2p::connection_limits::Behaviour,
    pub identify: identify::Behaviour,
    pub kad: kad::Behaviour<MemoryStore>,
    pub mdns: Toggle<mdns::tokio::Behaviour>,
    pub gossipsub: gossipsub::Behaviour,
    pub job: request_response::Behaviour<JobCodec>,
    pub blob: request_response::Behaviour<BlobCodec>,
    /// Raw streams: `/tunenet/blob-stream/1` (see `crate::stream`).
    pub stream: libp2p_stream::Behaviour,
    /// Liveness: a connection whose peer stops answering pings is closed (see
    /// [`PING_INTERVAL`]), so requests on it fail at once instead of waiting out their
    /// timeout after the link is back.
    pub ping: ping::Behaviour,
}

/// How often each connection is pinged.
pub const PING_INTERVAL: Duration = Duration::from_secs(5);
/// How long a ping may go unanswered before its connection counts as dead.
pub const PING_TIMEOUT: Duration = Duration::from_secs(10);

fn setup(what: &str) -> impl FnOnce(String) -> P2pError + '_ {
    move |e| P2pError::Setup(format!("{what}: {e}"))
}

impl Behaviour {
    fn new(key: &Keypair, config: &P2pConfig) -> Result<Self, P2pError> {
        let peer_id = key.public().to_peer_id();

        let identify = identify::Behaviour::new(
            identify::Config::new(IDENTIFY_PROTOCOL.into(), key.public())
                .with_agent_version(format!("tunenet/{}", env!("CARGO_PKG_VERSION"))),
        );

        let mut kad_config = kad::Config::new(StreamProtocol::new(KAD_PROTOCOL));
        kad_config.set_query_timeout(Duration::from_secs(20));
        let store = MemoryStore::with_config(
            peer_id,
            MemoryStoreConfig {
                max_provided_keys: 1 << 16,
                ..Default::default()
            },
        );
        let mut kad = kad::Behaviour::with_config(peer_id, store, kad_config);
        // Loopback and LAN nodes never get a confirmed external address; serve the DHT anyway.
        kad.set_mode(Some(kad::Mode::Server));

        let mdns = if config.mdns {
            Some(
                mdns::tokio::Behaviour::new(mdns::Config::default(), peer_id)
                    .map_err(|e| setup("mdns")(e.to_string()))?,
            )
        } else {
            None
        };

        let gossip_config = gossipsub::ConfigBuilder::default()
            .validation_mode(gossipsub::ValidationMode::Strict)
            .validate_messages()
            .max_transmit_size(MAX_GOSSIP_TRANSMIT)
            .heartbeat_interval(Duration::from_secs(1))
            .build()
            .map_err(|e| setup("gossipsub config")(e.to_string()))?;
        let mut gossipsub = gossipsub::Behaviour::new(
            gossipsub::MessageAuthenticity::Signed(key.clone()),
            gossip_config,
        )
        .map_err(|e| setup("gossipsub")(e.to_string()))?;
        let mut score = gossipsub::PeerScoreParams::default();
        for topic in [
            ADVERT_TOPIC,
            COMPETITION_TOPIC,
            ARTIFACT_RECORD_TOPIC,
            SCORE_ATTESTATION_TOPIC,
        ] {
            let topic = IdentTopic::new(topic);
            // Rejected messages count against the sender (invalid_message_deliveries_weight).
            score
                .topics
                .insert(topic.hash(), gossipsub::TopicScoreParams::default());
            gossipsub
                .subscribe(&topic)
                .map_err(|e| setup("gossipsub subscribe")(e.to_string()))?;
        }
        gossipsub
            .with_peer_score(score, gossipsub::PeerScoreThresholds::default())
            .map_err(setup("gossipsub peer score"))?;

        let rr = request_response::Config::default().with_request_timeout(config.request_timeout());
        let job = request_response::Behaviour::with_codec(
            JobCodec::new(MAX_JOB_MESSAGE, MAX_JOB_MESSAGE),
            [(StreamProtocol::new(JOB_PROTOCOL), ProtocolSupport::Full)],
            rr.clone(),
        );
        let max_manifest = (MAX_BLOB_SIZE / CHUNK_SIZE) as usize * 32;
        let blob = request_response::Behaviour::with_codec(
            BlobCodec::new(1024, max_manifest.max(CHUNK_SIZE as usize) + 1024),
            [(StreamProtocol::new(BLOB_PROTOCOL), ProtocolSupport::Full)],
            rr,
        );

        let cap = |n: u32| (n > 0).then_some(n);
        let limits = libp2p::connection_limits::Behaviour::new(
            libp2p::connection_limits::ConnectionLimits::default()
                .with_max_established(cap(config.max_connections))
                .with_max_established_per_peer(cap(config.max_connections_per_peer))
                .with_max_pending_incoming(cap(config.max_pending_incoming)),
        );
        Ok(Behaviour {
            limits,
            identify,
            kad,
            mdns: mdns.into(),
            gossipsub,
            job,
            blob,
            stream: libp2p_stream::Behaviour::new(),
            ping: ping::Behaviour::new(
                ping::Config::new()
                    .with_interval(PING_INTERVAL)
                    .with_timeout(PING_TIMEOUT),
            ),
        })
    }
}

/// Builds the swarm: the node's key is its libp2p identity, so its PeerId is its node id.
/// Must run inside a tokio runtime.
pub(crate) fn build_swarm(key: &Keypair, config: &P2pConfig) -> Result<Swarm<Behaviour>, P2pError> {
    let behaviour = Behaviour::new(key, config)?;
    let idle = Duration::from_secs(config.idle_timeout_secs.max(1));
    let swarm = libp2p::SwarmBuilder::with_existing_identity(key.clone())
        .with_tokio()
        .with_tcp(
            tcp::Config::default().nodelay(true),
            noise::Config::new,
            yamux::Config::default,
        )
        .map_err(|e| setup("tcp transport")(e.to_string()))?
        .with_quic()
        .with_behaviour(|_| behaviour)
        .map_err(|e| setup("behaviour")(e.to_string()))?
        .with_swarm_config(|c| c.with_idle_connection_timeout(idle))
        .build();
    Ok(swarm)
}
