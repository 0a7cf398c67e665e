//! Swarms on loopback (TCP, mDNS off) exercising discovery, gossip validation, the job
//! protocol and blob transfer, including interrupted and corrupt transfers.

use libp2p::multiaddr::Protocol;
use prost::Message;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tunenet_p2p::{
    ADVERT_TOPIC, Client, Event, JobRequest, JobResponse, MinerAdvert, Multiaddr, P2pConfig,
    P2pError, PeerId,
};
use tunenet_proto::v1;
use tunenet_store::BlobStore;
use tunenet_types::{BlobId, Identity};

const WAIT: Duration = Duration::from_secs(20);

struct Node {
    client: Client,
    events: mpsc::Receiver<Event>,
    task: JoinHandle<()>,
    peer: PeerId,
    addr: Multiaddr,
    store: BlobStore,
    identity: Identity,
    _dir: tempfile::TempDir,
}

impl Node {
    async fn start(bootstrap: Option<&Node>, tweak: impl FnOnce(&mut P2pConfig)) -> Node {
        // RUST_LOG=tunenet_p2p=debug shows a failing test's trace (captured per test).
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path()).unwrap();
        let mut config = P2pConfig::loopback();
        if let Some(b) = bootstrap {
            config.bootstrap = vec![b.addr.clone()];
        }
        tweak(&mut config);
        // The node key is the same type the rest of tunenet uses.
        let identity = Identity::generate();
        let (client, events, event_loop) =
            tunenet_p2p::new(identity.keypair(), config, store.clone()).unwrap();
        let task = tokio::spawn(event_loop.run());
        let peer = client.local_peer_id();
        assert_eq!(peer.to_base58(), identity.peer_id().0);
        let addr = client.listen_addrs().await.unwrap()[0]
            .clone()
            .with(Protocol::P2p(peer));
        Node {
            client,
            events,
            task,
            peer,
            addr,
            store,
            identity,
            _dir: dir,
        }
    }

    /// Waits for the first event `f` picks, skipping the others.
    async fn wait_for<T>(&mut self, mut f: impl FnMut(Event) -> Option<T>) -> T {
        tokio::time::timeout(WAIT, async {
            loop {
                let e = self.events.recv().await.expect("event loop stopped");
                if let Some(t) = f(e) {
                    return t;
                }
            }
        })
        .await
        .expect("timed out waiting for an event")
    }

    fn stop(self) {
        self.task.abort();
    }
}

fn blob(len: usize, seed: u8) -> Vec<u8> {
    let mut x = seed as u32 | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect()
}

fn advert() -> MinerAdvert {
    MinerAdvert {
        hardware: "cpu".into(),
        job_kinds: vec![v1::JobKind::FineTune as i32],
        max_model_params: 135_000_000,
        policy: "lora, 10s-10min".into(),
        price_hint: 1.0,
        ..Default::default()
    }
}

/// Retries `publish_advert` until some peer is subscribed.
async fn publish_until_ok(client: &Client, a: MinerAdvert) {
    tokio::time::timeout(WAIT, async {
        while client.publish_advert(a.clone()).await.is_err() {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
    .expect("no peer ever subscribed to the advert topic");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peers_meet_through_kademlia_and_exchange_offer_and_decision() {
    let b = Node::start(None, |_| {}).await;
    let mut miner = Node::start(Some(&b), |_| {}).await;
    let validator = Node::start(Some(&b), |_| {}).await;

    // Wait until the bootstrap node has the miner's addresses (from identify).
    tokio::time::timeout(WAIT, async {
        loop {
            let peers = b.client.peers().await.unwrap();
            if peers
                .iter()
                .any(|p| p.peer_id == miner.peer && !p.addrs.is_empty())
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("the bootstrap node never learnt the miner's address");
    // The validator knows only the bootstrap node and the miner's id: the request finds
    // the miner through a Kademlia look-up.
    let offer = v1::Offer {
        job_id: "comp1-0".into(),
        competition_id: "comp1".into(),
        kind: v1::JobKind::FineTune as i32,
        validator: validator.peer.to_base58(),
        base_params: 1000,
        time_budget_ms: 60_000,
        ..Default::default()
    };
    let ask = {
        let c = validator.client.clone();
        let (peer, offer) = (miner.peer, offer.clone());
        tokio::spawn(async move { c.request(peer, JobRequest::Offer(offer)).await })
    };
    let (from, channel) = miner
        .wait_for(|e| match e {
            Event::JobRequest {
                peer,
                request: JobRequest::Offer(o),
                channel,
            } => {
                assert_eq!(o, offer);
                Some((peer, channel))
            }
            _ => None,
        })
        .await;
    assert_eq!(from, validator.peer);
    let decision = v1::Decision {
        job_id: "comp1-0".into(),
        miner: miner.peer.to_base58(),
        accept: false,
        reject_code: v1::RejectCode::Busy as i32,
        reject_reason: "2 jobs running".into(),
        ..Default::default()
    };
    miner
        .client
        .respond(channel, JobResponse::Decision(decision.clone()))
        .await
        .unwrap();
    let answer = ask.await.unwrap().unwrap();
    assert_eq!(answer, JobResponse::Decision(decision));

    // A refusal comes back as an error that says why.
    let ask = {
        let c = validator.client.clone();
        let peer = miner.peer;
        tokio::spawn(async move {
            c.request(peer, JobRequest::Offer(v1::Offer::default()))
                .await
        })
    };
    let channel = miner
        .wait_for(|e| match e {
            Event::JobRequest { channel, .. } => Some(channel),
            _ => None,
        })
        .await;
    miner
        .client
        .respond(channel, JobResponse::Refused("no such competition".into()))
        .await
        .unwrap();
    match ask.await.unwrap() {
        Err(P2pError::Refused { reason, .. }) => assert!(reason.contains("no such")),
        other => panic!("expected a refusal, got {other:?}"),
    }

    let peers = validator.client.peers().await.unwrap();
    assert!(peers.iter().any(|p| p.peer_id == miner.peer && p.connected));
    assert!(
        !validator
            .client
            .find_peer(miner.peer)
            .await
            .unwrap()
            .is_empty()
    );
    // An id nobody knows fails with an error, not a hang.
    let stranger = PeerId::random();
    assert!(validator.client.find_peer(stranger).await.is_err());
    for n in [b, miner, validator] {
        n.stop();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn valid_adverts_are_delivered_and_bad_ones_rejected() {
    let mut validator = Node::start(None, |_| {}).await;
    let miner = Node::start(Some(&validator), |c| c.advert_interval_secs = 3600).await;

    let mut bad_sig = advert();
    bad_sig.sign(miner.identity.keypair(), now());
    bad_sig.max_model_params += 1; // signature no longer covers the bytes
    let mut stale = advert();
    stale.sign(miner.identity.keypair(), now() - 3_600_000);
    let mut big = advert();
    big.policy = "x".repeat(6000);
    big.sign(miner.identity.keypair(), now());

    // Wait until the topic mesh works, then send the bad ones, then a good one.
    let good = advert();
    publish_until_ok(&miner.client, good.clone()).await;
    let first = validator
        .wait_for(|e| match e {
            Event::MinerAdvert { peer, advert } => Some((peer, advert)),
            _ => None,
        })
        .await;
    assert_eq!(first.0, miner.peer);
    assert_eq!(first.1.max_model_params, good.max_model_params);
    first.1.verify().unwrap();

    for (what, a) in [("signature", &bad_sig), ("stale", &stale), ("limit", &big)] {
        miner
            .client
            .publish_raw(ADVERT_TOPIC, a.encode_to_vec())
            .await
            .unwrap();
        let reason = validator
            .wait_for(|e| match e {
                Event::GossipRejected { peer, reason, .. } => {
                    assert_eq!(peer, miner.peer);
                    Some(reason)
                }
                Event::MinerAdvert { advert, .. } => panic!("bad advert delivered: {advert:?}"),
                _ => None,
            })
            .await;
        assert!(reason.contains(what), "{what}: {reason}");
    }

    // A good advert still gets through afterwards and is listed with the peer.
    let mut later = advert();
    later.price_hint = 2.5;
    miner.client.publish_advert(later).await.unwrap();
    let got = validator
        .wait_for(|e| match e {
            Event::MinerAdvert { advert, .. } => Some(advert),
            Event::GossipRejected { reason, .. } => panic!("good advert rejected: {reason}"),
            _ => None,
        })
        .await;
    assert_eq!(got.price_hint, 2.5);
    let peers = validator.client.peers().await.unwrap();
    let listed = peers.iter().find(|p| p.peer_id == miner.peer).unwrap();
    assert_eq!(listed.advert.as_ref().map(|a| a.price_hint), Some(2.5));
    validator.stop();
    miner.stop();
}

fn now() -> u64 {
    tunenet_types::time::now_ms()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blob_is_found_through_providers_and_fetched() {
    let a = Node::start(None, |_| {}).await;
    let b = Node::start(Some(&a), |_| {}).await;
    let data = blob(5 * (1 << 20) + 1234, 7);
    let id = a.store.put(&data).unwrap();
    a.client.provide(id).await.unwrap();

    // C knows only B; B knows the provider record.
    let c = Node::start(Some(&b), |_| {}).await;
    let size = c.client.fetch_blob(id, 64 << 20).await.unwrap();
    assert_eq!(size, data.len() as u64);
    assert_eq!(c.store.get(&id).unwrap(), data);
    // A second fetch is served from the local store.
    assert_eq!(c.client.fetch_blob(id, 64 << 20).await.unwrap(), size);

    // Limits and unknown blobs are refused with errors that say so.
    let d = Node::start(Some(&b), |c| c.blob_fetch_rounds = 2).await;
    match d.client.fetch_blob(id, 1 << 20).await {
        Err(P2pError::BlobTooLarge { size: s, .. }) => assert_eq!(s, size),
        other => panic!("expected too large, got {other:?}"),
    }
    match d
        .client
        .fetch_blob(BlobId::of(b"nobody has this"), 1 << 20)
        .await
    {
        Err(P2pError::NoProviders { .. }) => {}
        other => panic!("expected no providers, got {other:?}"),
    }
    for n in [a, b, c, d] {
        n.stop();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interrupted_transfer_resumes_from_another_provider() {
    const CHUNKS: u64 = 12;
    let b = Node::start(None, |_| {}).await;
    let mut a = Node::start(Some(&b), |_| {}).await;
    let data = blob((CHUNKS as usize) << 20, 3);
    let id = a.store.put(&data).unwrap();
    a.client.provide(id).await.unwrap();

    let c = Node::start(Some(&b), |c| c.blob_parallel = 2).await;
    let fetch = {
        let client = c.client.clone();
        tokio::spawn(async move { client.fetch_blob(id, 64 << 20).await })
    };
    // Kill the provider after it has served a few chunks.
    let mut served_by_a = 0;
    while served_by_a < 4 {
        a.wait_for(|e| matches!(e, Event::BlobServed { .. }).then_some(()))
            .await;
        served_by_a += 1;
    }
    a.stop();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !fetch.is_finished(),
        "the fetch should be waiting for a provider"
    );

    // A second provider appears; the download continues where it stopped.
    let mut d = Node::start(Some(&b), |_| {}).await;
    assert_eq!(d.store.put(&data).unwrap(), id);
    d.client.provide(id).await.unwrap();
    let size = tokio::time::timeout(Duration::from_secs(60), fetch)
        .await
        .expect("fetch did not finish")
        .unwrap()
        .unwrap();
    assert_eq!(size, data.len() as u64);
    assert_eq!(BlobId::of(&c.store.get(&id).unwrap()), id);
    let mut served_by_d = 0;
    while let Ok(e) = d.events.try_recv() {
        if matches!(e, Event::BlobServed { .. }) {
            served_by_d += 1;
        }
    }
    assert!(
        served_by_d > 0 && served_by_d < CHUNKS,
        "the second provider served {served_by_d} of {CHUNKS} chunks: not a resume"
    );
    for n in [b, c, d] {
        n.stop();
    }
}

/// A provider on its own single-threaded runtime that the test can freeze: its
/// connections stay open and go silent, as over a link gone dark (or a process stopped
/// with SIGSTOP), until it is thawed.
struct Freezable {
    peer: PeerId,
    frozen: std::sync::Arc<std::sync::atomic::AtomicBool>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<()>,
}

impl Freezable {
    fn start(bootstrap: Multiaddr, data: Vec<u8>) -> Freezable {
        use std::sync::atomic::{AtomicBool, Ordering};
        let frozen = std::sync::Arc::new(AtomicBool::new(false));
        let stop = std::sync::Arc::new(AtomicBool::new(false));
        let (tx, rx) = std::sync::mpsc::channel();
        let (f, s) = (frozen.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let node = Node::start(None, |c| c.bootstrap = vec![bootstrap]).await;
                let id = node.store.put(&data).unwrap();
                node.client.provide(id).await.unwrap();
                tx.send(node.peer).unwrap();
                while !s.load(Ordering::SeqCst) {
                    // Blocking this thread stops every task of the node: nothing is
                    // read or written on its connections.
                    while f.load(Ordering::SeqCst) {
                        std::thread::sleep(Duration::from_millis(10));
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                node.stop();
            });
        });
        let peer = rx
            .recv_timeout(WAIT)
            .expect("the freezable node did not start");
        Freezable {
            peer,
            frozen,
            stop,
            thread,
        }
    }

    fn freeze(&self, on: bool) {
        self.frozen.store(on, std::sync::atomic::Ordering::SeqCst);
    }

    fn stop(self) {
        self.freeze(false);
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        self.thread.join().unwrap();
    }
}

/// A provider that goes silent with its connections open holds up nothing: its manifest
/// request is passed over after a short wait, its ranges stop counting against the
/// parallel streams, and once nothing is left unclaimed its chunks are asked of the
/// honest provider. Before, the download waited out the 30 s request timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_provider_gone_silent_does_not_hold_up_the_download() {
    const CHUNKS: usize = 24;
    let b = Node::start(None, |_| {}).await;
    let data = blob(CHUNKS << 20, 11);
    let honest = Node::start(Some(&b), |_| {}).await;
    let id = honest.store.put(&data).unwrap();
    honest.client.provide(id).await.unwrap();
    let silent = Freezable::start(b.addr.clone(), data.clone());

    let mut c = Node::start(Some(&b), |c| {
        c.blob_parallel = 4;
        c.request_timeout_secs = 30;
    })
    .await;
    // C must know both providers before one of them goes silent.
    tokio::time::timeout(WAIT, async {
        loop {
            let p = c.client.providers(id).await.unwrap_or_default();
            if p.contains(&honest.peer) && p.contains(&silent.peer) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
    .expect("C never learnt of both providers");
    silent.freeze(true);
    let started = std::time::Instant::now();
    let size = c.client.fetch_blob(id, 64 << 20).await.unwrap();
    let took = started.elapsed();
    assert_eq!(size, data.len() as u64);
    assert_eq!(c.store.get(&id).unwrap(), data);
    assert!(took < Duration::from_secs(10), "took {took:?}");
    let mut dropped = 0;
    while let Ok(e) = c.events.try_recv() {
        if matches!(e, Event::BlobProviderDropped { .. }) {
            dropped += 1;
        }
    }
    assert_eq!(dropped, 0, "a silent provider is not a liar");
    eprintln!("fetched {CHUNKS} MiB past a silent provider in {took:?}");
    silent.stop();
    for n in [b, honest, c] {
        n.stop();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_provider_is_dropped_and_honest_one_completes() {
    let b = Node::start(None, |_| {}).await;
    let liar = Node::start(Some(&b), |_| {}).await;
    let data = blob(6 << 20, 9);
    let id = liar.store.put(&data).unwrap();
    liar.client.provide(id).await.unwrap();
    // An honest node fetches it first (the liar computes its manifest from good bytes),
    // then provides it too.
    let honest = Node::start(Some(&b), |_| {}).await;
    honest.client.fetch_blob(id, 64 << 20).await.unwrap();
    honest.client.provide(id).await.unwrap();
    // Now the liar's copy rots: same length, different bytes.
    std::fs::write(liar.store.path(&id), blob(6 << 20, 10)).unwrap();

    let mut c = Node::start(Some(&b), |_| {}).await;
    let started = std::time::Instant::now();
    let size = c.client.fetch_blob(id, 64 << 20).await.unwrap();
    assert_eq!(size, data.len() as u64);
    // Ranges still in flight from the liar end when it is dropped: no waiting out the
    // 30 s request timeout.
    assert!(
        started.elapsed() < std::time::Duration::from_secs(10),
        "took {:?}",
        started.elapsed()
    );
    assert_eq!(c.store.get(&id).unwrap(), data);
    let dropped = c
        .wait_for(|e| match e {
            Event::BlobProviderDropped { peer, reason, .. } => Some((peer, reason)),
            _ => None,
        })
        .await;
    assert_eq!(dropped.0, liar.peer, "{}", dropped.1);
    for n in [b, liar, honest, c] {
        n.stop();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adverts_are_refreshed_and_competitions_announced() {
    let mut miner = Node::start(None, |c| c.advert_interval_secs = 1).await;
    let mut validator = Node::start(Some(&miner), |_| {}).await;
    publish_until_ok(&miner.client, advert()).await;
    let mut stamps = Vec::new();
    while stamps.len() < 2 {
        let a = validator
            .wait_for(|e| match e {
                Event::MinerAdvert { advert, .. } => Some(advert),
                _ => None,
            })
            .await;
        stamps.push(a.timestamp_ms);
    }
    assert!(stamps[1] > stamps[0], "heartbeat re-signs: {stamps:?}");

    let ann = tunenet_p2p::CompetitionAnnouncement {
        competition_id: "comp7".into(),
        kind: v1::JobKind::FineTune as i32,
        jobs: 3,
        description: "tiny llama, 2 min".into(),
        ..Default::default()
    };
    tokio::time::timeout(WAIT, async {
        while validator
            .client
            .announce_competition(ann.clone())
            .await
            .is_err()
        {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
    .expect("no peer ever subscribed to the competition topic");
    let (peer, got) = miner
        .wait_for(|e| match e {
            Event::Competition { peer, announcement } => Some((peer, announcement)),
            _ => None,
        })
        .await;
    assert_eq!(peer, validator.peer);
    assert_eq!(got.validator, validator.peer.to_base58());
    assert_eq!((got.competition_id.as_str(), got.jobs), ("comp7", 3));
    miner.stop();
    validator.stop();
}

/// A receipt and artifact record signed by `v`, with a sketch of `dim` values.
fn artifact_record(v: &Identity, artifact: &[u8], dim: usize) -> tunenet_types::ArtifactRecord {
    let mut receipt = tunenet_types::Receipt {
        job_id: tunenet_types::JobId::new("comp7-0").unwrap(),
        miner: Identity::generate().peer_id(),
        commit: BlobId::of(b"commit"),
        received_at_ms: now(),
        validator: v.peer_id(),
        validator_key: v.public_key_bytes(),
        signature: vec![],
    };
    receipt.signature = v.sign(&receipt.signing_bytes());
    let mut r = tunenet_types::ArtifactRecord {
        receipt,
        artifact: BlobId::of(artifact),
        sketch: (0..dim).map(|i| (i as f32).cos()).collect(),
        signature: vec![],
    };
    r.signature = v.sign(&r.signing_bytes());
    r
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn artifact_records_reach_other_validators_only_from_their_signer() {
    let mut a = Node::start(None, |_| {}).await;
    let mut b = Node::start(Some(&a), |_| {}).await;
    // A full-size sketch (the default sketch_dim) crosses whole.
    let record = artifact_record(&a.identity, b"weights", 4096);
    tokio::time::timeout(WAIT, async {
        while a
            .client
            .publish_artifact_record(record.clone())
            .await
            .is_err()
        {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
    .expect("no peer ever subscribed to the artifact-record topic");
    let (peer, got) = b
        .wait_for(|e| match e {
            Event::ArtifactRecord { peer, record } => Some((peer, record)),
            _ => None,
        })
        .await;
    assert_eq!(peer, a.peer);
    assert_eq!(got, record);
    // B cannot pass on A's record as its own: refused at B, and rejected by A if sent raw.
    let e = b
        .client
        .publish_artifact_record(record.clone())
        .await
        .unwrap_err();
    assert!(e.to_string().contains("signer"), "{e}");
    b.client
        .publish_raw(
            tunenet_p2p::ARTIFACT_RECORD_TOPIC,
            tunenet_p2p::gossip::encode_record(&artifact_record(&a.identity, b"x", 8)),
        )
        .await
        .unwrap();
    let (from, reason) = a
        .wait_for(|e| match e {
            Event::GossipRejected {
                peer,
                topic,
                reason,
            } if topic == tunenet_p2p::ARTIFACT_RECORD_TOPIC => Some((peer, reason)),
            _ => None,
        })
        .await;
    assert_eq!(from, b.peer);
    assert!(reason.contains("signed by"), "{reason}");
    a.stop();
    b.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quic_transport_carries_the_job_protocol() {
    let quic = |c: &mut P2pConfig| c.listen = vec!["/ip4/127.0.0.1/udp/0/quic-v1".parse().unwrap()];
    let mut miner = Node::start(None, quic).await;
    let validator = Node::start(None, quic).await;
    assert!(miner.addr.to_string().contains("quic-v1"));
    assert_eq!(
        validator.client.dial(miner.addr.clone()).await.unwrap(),
        miner.peer
    );
    let ask = {
        let c = validator.client.clone();
        let peer = miner.peer;
        let ack = v1::Assignment {
            job_id: "j".into(),
            nonce: vec![7; 32],
            ..Default::default()
        };
        tokio::spawn(async move { c.request(peer, JobRequest::Assignment(ack)).await })
    };
    let channel = miner
        .wait_for(|e| match e {
            Event::JobRequest {
                request: JobRequest::Assignment(a),
                channel,
                ..
            } => {
                assert_eq!(a.nonce, vec![7; 32]);
                Some(channel)
            }
            _ => None,
        })
        .await;
    let ack = v1::AssignmentAck { job_id: "j".into() };
    miner
        .client
        .respond(channel, JobResponse::AssignmentAck(ack.clone()))
        .await
        .unwrap();
    assert_eq!(ask.await.unwrap().unwrap(), JobResponse::AssignmentAck(ack));
    // A wrong address fails with an error rather than hanging.
    let nowhere: Multiaddr = "/ip4/127.0.0.1/tcp/1".parse().unwrap();
    assert!(matches!(
        validator.client.dial(nowhere).await,
        Err(P2pError::Dial { .. })
    ));
    miner.stop();
    validator.stop();
}

/// Two jobs on one base model fetch the same blobs at the same time: the blob is
/// downloaded once (the provider serves each chunk once), and both callers get it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_blob_asked_twice_at_once_is_downloaded_once() {
    const CHUNKS: usize = 6;
    let b = Node::start(None, |_| {}).await;
    let mut provider = Node::start(Some(&b), |_| {}).await;
    let data = blob(CHUNKS << 20, 21);
    let id = provider.store.put(&data).unwrap();
    provider.client.provide(id).await.unwrap();
    let c = Node::start(Some(&b), |_| {}).await;
    let (one, two) = (c.client.clone(), c.client.clone());
    let (a, bb) = tokio::join!(
        tokio::spawn(async move { one.fetch_blob_from(id, 64 << 20, &[]).await }),
        tokio::spawn(async move { two.fetch_blob(id, 64 << 20).await }),
    );
    assert_eq!(a.unwrap().unwrap(), data.len() as u64);
    assert_eq!(bb.unwrap().unwrap(), data.len() as u64);
    assert_eq!(c.store.get(&id).unwrap(), data);
    let mut served = 0;
    while let Ok(e) = provider.events.try_recv() {
        if matches!(e, Event::BlobServed { peer, .. } if peer == c.peer) {
            served += 1;
        }
    }
    assert_eq!(served, CHUNKS, "each chunk served once");
    for n in [b, provider, c] {
        n.stop();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revealed_artifact_is_fetched_from_the_miner() {
    let mut validator = Node::start(None, |_| {}).await;
    let miner = Node::start(Some(&validator), |_| {}).await;
    let artifact = blob(3 * (1 << 20) + 99, 5);
    let id = miner.store.put(&artifact).unwrap();
    miner.client.provide(id).await.unwrap();

    let header = v1::UploadHeader {
        job_id: "comp1-0".into(),
        miner: miner.peer.to_base58(),
        artifact: id.0.to_vec(),
        size: artifact.len() as u64,
        salt: vec![1; 16],
    };
    let ask = {
        let (c, peer, h) = (miner.client.clone(), validator.peer, header.clone());
        tokio::spawn(async move { c.request(peer, JobRequest::Reveal(h)).await })
    };
    let (from, got, channel) = validator
        .wait_for(|e| match e {
            Event::JobRequest {
                peer,
                request: JobRequest::Reveal(h),
                channel,
            } => Some((peer, h, channel)),
            _ => None,
        })
        .await;
    assert_eq!(got, header);
    let wanted = BlobId::from_slice(&got.artifact).unwrap();
    let size = validator
        .client
        .fetch_blob_from(wanted, got.size, &[from])
        .await
        .unwrap();
    assert_eq!(validator.store.get(&wanted).unwrap(), artifact);
    let result = v1::UploadResult {
        job_id: got.job_id,
        artifact: got.artifact,
        bytes_received: size,
    };
    validator
        .client
        .respond(channel, JobResponse::UploadResult(result.clone()))
        .await
        .unwrap();
    assert_eq!(
        ask.await.unwrap().unwrap(),
        JobResponse::UploadResult(result)
    );
    validator.stop();
    miner.stop();
}

/// Answers every job request `node` is handed with an empty decision, from a task of its
/// own (the node's other events are dropped).
fn answer_every_request(node: &mut Node) {
    let client = node.client.clone();
    let (_, closed) = mpsc::channel(1);
    let mut events = std::mem::replace(&mut node.events, closed);
    tokio::spawn(async move {
        while let Some(e) = events.recv().await {
            if let Event::JobRequest { channel, .. } = e {
                let _ = client
                    .respond(channel, JobResponse::Decision(v1::Decision::default()))
                    .await;
            }
        }
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_over_the_job_request_rate_is_refused_and_others_are_served() {
    let mut server = Node::start(None, |c| {
        c.job_requests_per_sec = 0.5;
        c.job_burst = 3;
    })
    .await;
    answer_every_request(&mut server);
    let flooder = Node::start(Some(&server), |_| {}).await;
    let other = Node::start(Some(&server), |_| {}).await;
    let offer = || JobRequest::Offer(v1::Offer::default());
    let (mut answered, mut refused) = (0, 0);
    for _ in 0..6 {
        match flooder.client.request(server.peer, offer()).await {
            Ok(JobResponse::Decision(_)) => answered += 1,
            Err(P2pError::Refused { reason, .. }) => {
                assert!(
                    reason.contains("limit of 0.5 job requests a second (burst 3)"),
                    "{reason}"
                );
                refused += 1;
            }
            other => panic!("{other:?}"),
        }
    }
    assert_eq!((answered, refused), (3, 3));
    // Another peer has its own allowance.
    assert!(matches!(
        other.client.request(server.peer, offer()).await,
        Ok(JobResponse::Decision(_))
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_past_the_limit_are_denied_and_the_first_is_kept() {
    let mut server = Node::start(None, |c| c.max_connections = 1).await;
    answer_every_request(&mut server);
    let offer = || JobRequest::Offer(v1::Offer::default());
    let first = Node::start(Some(&server), |_| {}).await;
    assert!(matches!(
        first.client.request(server.peer, offer()).await,
        Ok(JobResponse::Decision(_))
    ));
    // The server holds its one connection: a second peer is denied.
    let second = Node::start(Some(&server), |_| {}).await;
    let denied = tokio::time::timeout(WAIT, second.client.request(server.peer, offer()))
        .await
        .expect("the second peer's request hung");
    assert!(denied.is_err(), "{denied:?}");
    // The first is still served.
    assert!(matches!(
        first.client.request(server.peer, offer()).await,
        Ok(JobResponse::Decision(_))
    ));
}
