//! A daemon's presence on the libp2p network: it joins (mDNS, Kademlia bootstrap), a miner
//! gossips its signed advert, a validator announces its competitions; job requests that
//! arrive over libp2p are answered by the daemon's handler (`transport::serve`).

use crate::error::NodeError;
use crate::transport::{P2pHandler, serve};
use std::sync::Arc;
use tunenet_engine::MinerPolicy;
use tunenet_p2p::{MinerAdvert, P2pConfig};
use tunenet_store::BlobStore;
use tunenet_types::{Identity, JobKind};

/// Joins the network and answers job requests with the handler `make_handler` builds
/// (given the client); for a miner (`advert` given, see [`miner_advert`]), publishes its
/// advert. Returns the client; its event loop and event pump run on the runtime until the
/// daemon stops.
pub async fn join(
    identity: &Identity,
    config: P2pConfig,
    blobs: BlobStore,
    advert: Option<MinerAdvert>,
    make_handler: impl FnOnce(tunenet_p2p::Client) -> Arc<dyn P2pHandler>,
) -> Result<tunenet_p2p::Client, NodeError> {
    let (client, events, event_loop) = tunenet_p2p::new(identity.keypair(), config, blobs)
        .map_err(|e| NodeError::Other(format!("`p2p`: {e}")))?;
    tokio::spawn(event_loop.run());
    let addrs = client
        .listen_addrs()
        .await
        .map_err(|e| NodeError::Other(format!("p2p listen: {e}")))?;
    let me = client.local_peer_id();
    for a in &addrs {
        tracing::info!(addr = %format!("{a}/p2p/{me}"), "p2p listening");
    }
    serve(client.clone(), events, make_handler(client.clone()));
    if let Some(advert) = advert {
        // No peer may be subscribed yet; the advert heartbeat publishes it again.
        if let Err(e) = client.publish_advert(advert).await {
            tracing::debug!(error = %e, "first advert not delivered yet; the heartbeat retries");
        }
    }
    Ok(client)
}

/// A miner's advert (unsigned: publishing stamps and signs it): its device setting and
/// inventory, the job kinds and sizes its policy takes, and its price per device-hour.
pub fn miner_advert(
    identity: &Identity,
    device: &str,
    policy: &MinerPolicy,
    inventory: &tunenet_hw::Inventory,
    price_per_gpu_hour: f64,
) -> MinerAdvert {
    let p = policy;
    MinerAdvert {
        peer_id: identity.peer_id().0,
        public_key: identity.public_key_bytes(),
        hardware: format!("{device}: {}", inventory.summary()),
        inventory: Some(crate::hardware::inventory_pb(inventory)),
        job_kinds: p
            .kinds
            .iter()
            .map(|k| match k {
                JobKind::FineTune => tunenet_proto::v1::JobKind::FineTune as i32,
                JobKind::Inference => tunenet_proto::v1::JobKind::Inference as i32,
            })
            .collect(),
        max_model_params: p.max_model_params,
        policy: format!(
            "up to {} jobs at once, budgets {}-{} s{}",
            p.max_concurrent_jobs,
            p.min_time_budget_secs,
            p.max_time_budget_secs,
            if p.paused { ", paused" } else { "" }
        ),
        price_hint: price_per_gpu_hour,
        ..Default::default()
    }
}
