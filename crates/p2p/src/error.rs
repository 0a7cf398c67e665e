//! The p2p layer's errors. Each message says what went wrong and what to try.

use libp2p::PeerId;
use tunenet_types::BlobId;

/// Why a p2p operation failed.
#[derive(Debug, thiserror::Error)]
pub enum P2pError {
    /// The event loop has stopped, so no command can be carried out.
    #[error("the p2p event loop has stopped; restart the node")]
    Stopped,
    /// A listen, external or bootstrap address was unusable.
    #[error("bad address {addr}: {reason}; check the [p2p] section of the config")]
    BadAddress {
        /// The address as written.
        addr: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The swarm could not be built (transport or behaviour set-up).
    #[error("could not start libp2p: {0}")]
    Setup(String),
    /// Dialing a peer failed.
    #[error("could not connect to {addr}: {reason}; check that the peer is up and reachable")]
    Dial {
        /// What was dialed.
        addr: String,
        /// The transport's reason.
        reason: String,
    },
    /// A request to a peer failed on the wire (connection closed, timeout, unsupported).
    #[error("request to {peer} failed: {reason}")]
    Request {
        /// The peer asked.
        peer: PeerId,
        /// The transport's reason.
        reason: String,
    },
    /// An answer could not be sent: the requester went away first.
    #[error(
        "the requester went away before the answer was sent (connection closed or request timed out)"
    )]
    ResponseDropped,
    /// No connection to the peer could be opened (no known address, or none answered).
    #[error("cannot reach {peer}: {reason}; is it running, and does a bootstrap peer know it?")]
    Unreachable {
        /// The peer.
        peer: PeerId,
        /// The transport's reason.
        reason: String,
    },
    /// The peer answered, but refused the request.
    #[error("{peer} refused the request: {reason}")]
    Refused {
        /// The peer that refused.
        peer: PeerId,
        /// Its reason.
        reason: String,
    },
    /// The peer answered with something other than what was asked for.
    #[error("{peer} answered with an unexpected message: {reason}")]
    Protocol {
        /// The peer.
        peer: PeerId,
        /// What was wrong.
        reason: String,
    },
    /// Publishing on gossipsub failed (commonly: no peer subscribed yet).
    #[error("could not publish on {topic}: {reason}; it is retried at the next heartbeat")]
    Publish {
        /// The topic.
        topic: String,
        /// gossipsub's reason.
        reason: String,
    },
    /// A gossip message failed validation.
    #[error("invalid gossip message: {0}")]
    Invalid(String),
    /// No peer could provide a blob.
    #[error(
        "no peer provides blob {id} ({detail}); make sure a node that holds it is running and connected"
    )]
    NoProviders {
        /// The blob.
        id: BlobId,
        /// What was tried.
        detail: String,
    },
    /// The blob is larger than the caller allows.
    #[error("blob {id} is {size} bytes, over the limit of {limit}")]
    BlobTooLarge {
        /// The blob.
        id: BlobId,
        /// Its announced size.
        size: u64,
        /// The caller's limit.
        limit: u64,
    },
    /// The local blob store failed.
    #[error(transparent)]
    Store(#[from] tunenet_store::BlobError),
    /// A background task (disk I/O) died.
    #[error("a background blob task failed: {0}")]
    Task(String),
    /// A Kademlia operation failed.
    #[error("kademlia: {0}")]
    Kad(String),
}
