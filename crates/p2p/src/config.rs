//! `[p2p]` settings: where to listen, whom to bootstrap from, and the limits of the gossip
//! and blob protocols. Every field has a default that works on a fresh machine.

use libp2p::Multiaddr;
use serde::{Deserialize, Serialize};
use std::time::Duration;

/// The p2p layer's settings (the `[p2p]` table of a node's config).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct P2pConfig {
    /// Addresses to listen on (TCP and QUIC by default, any interface, any port).
    pub listen: Vec<Multiaddr>,
    /// Addresses to tell other peers (e.g. a public IP behind NAT); none by default.
    pub external: Vec<Multiaddr>,
    /// Peers to join the network through, each ending in `/p2p/<peer id>`.
    pub bootstrap: Vec<Multiaddr>,
    /// Find peers on the local network with mDNS.
    pub mdns: bool,
    /// How often a published miner advert is re-signed and re-published, in seconds.
    pub advert_interval_secs: u64,
    /// Gossip messages older than this (or this far in the future) are rejected, in seconds.
    pub max_message_age_secs: u64,
    /// How long a job or blob request may take before it fails, in seconds.
    pub request_timeout_secs: u64,
    /// Chunk requests in flight per blob download.
    pub blob_parallel: usize,
    /// Chunk reads served at once; further requests are answered "busy".
    pub blob_serve_concurrency: usize,
    /// Rounds of provider look-ups before a blob download gives up.
    pub blob_fetch_rounds: u32,
    /// How long an idle connection is kept open, in seconds.
    pub idle_timeout_secs: u64,
    /// Connections established at once, in and out (0: no limit); past it new ones are
    /// denied.
    pub max_connections: u32,
    /// Connections established at once with one peer (0: no limit).
    pub max_connections_per_peer: u32,
    /// Incoming connections still handshaking at once (0: no limit).
    pub max_pending_incoming: u32,
    /// Job requests one peer may send a second, on average (0: no limit); past it the
    /// request is answered "refused" with the limit named.
    pub job_requests_per_sec: f64,
    /// Job requests one peer may send in a burst above that average.
    pub job_burst: u32,
}

impl Default for P2pConfig {
    fn default() -> Self {
        P2pConfig {
            listen: vec![
                "/ip4/0.0.0.0/tcp/0"
                    .parse()
                    .unwrap_or_else(|_| Multiaddr::empty()),
                "/ip4/0.0.0.0/udp/0/quic-v1"
                    .parse()
                    .unwrap_or_else(|_| Multiaddr::empty()),
            ],
            external: Vec::new(),
            bootstrap: Vec::new(),
            mdns: true,
            advert_interval_secs: 30,
            max_message_age_secs: 300,
            request_timeout_secs: 30,
            blob_parallel: 8,
            blob_serve_concurrency: 32,
            blob_fetch_rounds: 8,
            idle_timeout_secs: 60,
            max_connections: 1024,
            max_connections_per_peer: 4,
            max_pending_incoming: 256,
            job_requests_per_sec: 50.0,
            job_burst: 100,
        }
    }
}

impl P2pConfig {
    /// Settings for tests on one machine: loopback TCP on any port, no mDNS.
    pub fn loopback() -> Self {
        P2pConfig {
            listen: vec![
                "/ip4/127.0.0.1/tcp/0"
                    .parse()
                    .unwrap_or_else(|_| Multiaddr::empty()),
            ],
            mdns: false,
            ..P2pConfig::default()
        }
    }

    pub(crate) fn request_timeout(&self) -> Duration {
        Duration::from_secs(self.request_timeout_secs.max(1))
    }

    pub(crate) fn max_message_age(&self) -> Duration {
        Duration::from_secs(self.max_message_age_secs.max(1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_listen_on_tcp_and_quic_and_round_trip() {
        let c = P2pConfig::default();
        assert_eq!(c.listen.len(), 2);
        assert!(c.listen[1].to_string().contains("quic-v1"));
        assert!(c.mdns && c.bootstrap.is_empty());
        let text = toml::to_string(&c).unwrap();
        assert!(text.contains("/ip4/0.0.0.0/tcp/0"), "{text}");
        let back: P2pConfig = toml::from_str(&text).unwrap();
        assert_eq!(back, c);
    }

    #[test]
    fn unknown_keys_are_refused() {
        assert!(toml::from_str::<P2pConfig>("mdsn = false").is_err());
        let c: P2pConfig =
            toml::from_str("mdns = false\nbootstrap = [\"/ip4/127.0.0.1/tcp/4001\"]").unwrap();
        assert!(!c.mdns);
        assert_eq!(c.bootstrap.len(), 1);
    }
}
