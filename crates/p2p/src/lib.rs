//! tunenet's libp2p layer: identity and transports (TCP+noise+yamux, QUIC), discovery
//! (mDNS, Kademlia, identify), signed gossip (miner adverts, competitions, validators'
//! artifact records), the job
//! protocol carrying `tunenet_proto::v1` messages, and verified, resumable blob transfer.
//! One [`EventLoop`] owns the swarm; [`Client`] handles talk to it. No tonic or candle here.

mod behaviour;
pub mod chunks;
mod client;
pub mod codec;
mod config;
mod error;
mod event_loop;
mod fetch;
pub mod gossip;
pub mod messages;
pub mod rate;
mod serve;
mod stream;

pub use behaviour::{BLOB_PROTOCOL, JOB_PROTOCOL, KAD_PROTOCOL, MAX_JOB_MESSAGE};
pub use client::Client;
pub use config::P2pConfig;
pub use error::P2pError;
pub use event_loop::{Event, EventLoop, JobChannel, PeerInfo};
pub use gossip::{ADVERT_TOPIC, ARTIFACT_RECORD_TOPIC, COMPETITION_TOPIC, SCORE_ATTESTATION_TOPIC};
pub use libp2p::{Multiaddr, PeerId};
pub use messages::{CompetitionAnnouncement, JobRequest, JobResponse, MinerAdvert};
pub use rate::RateBuckets;
pub use stream::BLOB_STREAM_PROTOCOL;

use libp2p::multiaddr::Protocol;
use libp2p_identity::Keypair;
use tokio::sync::mpsc;
use tunenet_store::BlobStore;

/// Commands waiting for the event loop.
const COMMAND_CAPACITY: usize = 256;
/// Events waiting for the node; past this, events are dropped with a warning.
const EVENT_CAPACITY: usize = 1024;

/// Builds the p2p layer from the node's key (its PeerId is the node id), its settings and
/// its blob store: starts listening, dials the bootstrap peers, and returns the client,
/// the event stream and the loop to spawn (`tokio::spawn(event_loop.run())`). Must be
/// called inside a tokio runtime.
pub fn new(
    keypair: &Keypair,
    config: P2pConfig,
    store: BlobStore,
) -> Result<(Client, mpsc::Receiver<Event>, EventLoop), P2pError> {
    let mut swarm = behaviour::build_swarm(keypair, &config)?;
    for addr in &config.listen {
        swarm
            .listen_on(addr.clone())
            .map_err(|e| P2pError::BadAddress {
                addr: addr.to_string(),
                reason: e.to_string(),
            })?;
    }
    for addr in &config.external {
        swarm.add_external_address(addr.clone());
    }
    for addr in &config.bootstrap {
        let Some(Protocol::P2p(peer)) = addr.iter().last() else {
            return Err(P2pError::BadAddress {
                addr: addr.to_string(),
                reason: "a bootstrap address must end in /p2p/<peer id>".into(),
            });
        };
        swarm.behaviour_mut().kad.add_address(&peer, addr.clone());
        if let Err(e) = swarm.dial(addr.clone()) {
            tracing::warn!(%addr, error = %e, "bootstrap peer not dialed");
        }
    }
    let (cmd_tx, cmd_rx) = mpsc::channel(COMMAND_CAPACITY);
    let (event_tx, event_rx) = mpsc::channel(EVENT_CAPACITY);
    let concurrency = config.blob_serve_concurrency.clamp(1, 1024);
    let (served_tx, served_rx) = mpsc::channel(concurrency);
    let server = serve::BlobServer::new(store.clone(), concurrency, served_tx);
    let mut streams = swarm.behaviour().stream.new_control();
    let incoming = streams
        .accept(stream::protocol())
        .map_err(|e| P2pError::Setup(format!("blob stream protocol: {e}")))?;
    let (shared_store, provided, permits) = server.shared();
    let stream_server = stream::StreamServer {
        store: shared_store,
        provided,
        permits,
        events: event_tx.clone(),
        send_timeout: config.request_timeout(),
    };
    let client = Client {
        streams,
        commands: cmd_tx,
        local: keypair.public().to_peer_id(),
        store,
        config: config.clone(),
        fetching: Default::default(),
    };
    let event_loop = event_loop::EventLoop::new(
        swarm,
        keypair.clone(),
        config,
        cmd_rx,
        event_tx,
        (served_rx, server),
        (incoming, stream_server),
    );
    Ok((client, event_rx, event_loop))
}
