//! Hardware over the wire: the miner's inventory in its status and advert, the verified
//! benchmark's messages (signed, checked, converted), the miner's side of a challenge and
//! the validator's: it challenges every known miner, times the answer on its own clock,
//! verifies it in `O(n²)` ([`tunenet_hw::bench`]) and stores the result per miner.

use crate::transport::Transport;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tunenet_hw::bench::{self, Challenge, Dtype, Opening, Reveal, Spec, TileRef};
use tunenet_hw::inventory::{CpuInfo, GpuInfo, Inventory};
use tunenet_proto::v1;
use tunenet_rpc::Status;
use tunenet_store::{Store, StoreExt};
use tunenet_types::identity::{Canonical, verify_signature};
use tunenet_types::{Identity, PeerIdStr, time::now_ms};

/// Tree of verified hardware records, keyed by miner peer id.
pub const HARDWARE: &str = "hardware";
/// How far a challenge's timestamp may be from the miner's clock.
const MAX_SKEW_MS: u64 = 5 * 60 * 1000;
/// How long a miner keeps a computed answer waiting for its reveal.
const PENDING_FOR: Duration = Duration::from_secs(120);

// ---------------------------------------------------------------- conversions

/// The wire form of an inventory.
pub fn inventory_pb(inv: &Inventory) -> v1::HardwareInventory {
    v1::HardwareInventory {
        cpu_model: inv.cpu.model.clone(),
        cpu_cores: inv.cpu.logical_cores,
        cpu_features: inv.cpu.features.clone(),
        memory_total_bytes: inv.memory_total_bytes,
        memory_available_bytes: inv.memory_available_bytes,
        gpus: inv
            .gpus
            .iter()
            .map(|g| v1::GpuDevice {
                index: g.index,
                name: g.name.clone(),
                uuid: g.uuid.clone(),
                memory_total_bytes: g.memory_total_bytes,
                memory_free_bytes: g.memory_free_bytes,
                compute_capability: g.compute_capability.clone(),
                power_limit_w: g.power_limit_w.unwrap_or(0.0),
                nvlink_links: g.nvlink_links,
            })
            .collect(),
        driver_version: inv.driver_version.clone().unwrap_or_default(),
        cuda_version: inv.cuda_version.clone().unwrap_or_default(),
        nvml_error: inv.nvml_error.clone().unwrap_or_default(),
    }
}

/// An inventory from the wire, bounded and checked.
pub fn inventory_from_pb(p: &v1::HardwareInventory) -> Result<Inventory, String> {
    let opt = |s: &str| (!s.is_empty()).then(|| s.to_string());
    let inv = Inventory {
        cpu: CpuInfo {
            model: p.cpu_model.clone(),
            logical_cores: p.cpu_cores,
            features: p.cpu_features.clone(),
        },
        memory_total_bytes: p.memory_total_bytes,
        memory_available_bytes: p.memory_available_bytes,
        gpus: p
            .gpus
            .iter()
            .map(|g| GpuInfo {
                index: g.index,
                name: g.name.clone(),
                uuid: g.uuid.clone(),
                memory_total_bytes: g.memory_total_bytes,
                memory_free_bytes: g.memory_free_bytes,
                compute_capability: g.compute_capability.clone(),
                power_limit_w: (g.power_limit_w > 0.0).then_some(g.power_limit_w),
                nvlink_links: g.nvlink_links,
            })
            .collect(),
        driver_version: opt(&p.driver_version),
        cuda_version: opt(&p.cuda_version),
        nvml_error: opt(&p.nvml_error),
    };
    inv.validate().map_err(|e| format!("the inventory {e}"))?;
    Ok(inv)
}

fn dtype_pb(d: Dtype) -> i32 {
    (match d {
        Dtype::F32 => v1::BenchDtype::F32,
        Dtype::Bf16 => v1::BenchDtype::Bf16,
        Dtype::F16 => v1::BenchDtype::F16,
    }) as i32
}

fn dtype_from_pb(d: i32) -> Result<Dtype, String> {
    match v1::BenchDtype::try_from(d) {
        Ok(v1::BenchDtype::F32) => Ok(Dtype::F32),
        Ok(v1::BenchDtype::Bf16) => Ok(Dtype::Bf16),
        Ok(v1::BenchDtype::F16) => Ok(Dtype::F16),
        _ => Err(format!("unknown benchmark dtype {d}")),
    }
}

fn array32(b: &[u8], what: &str) -> Result<[u8; 32], String> {
    b.try_into()
        .map_err(|_| format!("{what} must be 32 bytes, not {}", b.len()))
}

pub(crate) fn spec_of(c: &v1::BenchmarkChallenge) -> Result<Spec, String> {
    let spec = Spec {
        n: c.n,
        k: c.k,
        tile: c.tile,
        dtype: dtype_from_pb(c.dtype)?,
    };
    spec.validate()?;
    Ok(spec)
}

/// The bytes a validator signs for a challenge.
pub fn challenge_signing_bytes(c: &v1::BenchmarkChallenge) -> Vec<u8> {
    let mut b = Canonical::new("tunenet/v1/benchmark-challenge");
    b.bytes(c.challenge_id.as_bytes())
        .bytes(c.validator.as_bytes())
        .bytes(&c.seed)
        .u64(c.n as u64)
        .u64(c.k as u64)
        .u64(c.tile as u64)
        .u64(c.dtype as u32 as u64)
        .u64(c.devices.len() as u64);
    for d in &c.devices {
        b.u64(*d as u64);
    }
    b.u64(c.issued_at_ms).finish()
}

/// The bytes a miner signs for its commitment (roots, its time report, its inventory, its
/// price).
pub fn commitment_signing_bytes(c: &v1::BenchmarkCommitment) -> Vec<u8> {
    let mut b = Canonical::new("tunenet/v1/benchmark-commitment");
    b.bytes(c.challenge_id.as_bytes())
        .bytes(c.miner.as_bytes())
        .u64(c.devices.len() as u64);
    for d in &c.devices {
        b.u64(d.device as u64).u64(d.roots.len() as u64);
        for r in &d.roots {
            b.bytes(r);
        }
    }
    b.u64(c.reported_compute_ms);
    if let Some(inv) = &c.inventory {
        b.bytes(&prost::Message::encode_to_vec(inv));
    }
    b.u64(c.price_per_gpu_hour.to_bits());
    b.finish()
}

/// The bytes a validator signs for a reveal.
pub fn reveal_signing_bytes(r: &v1::BenchmarkReveal) -> Vec<u8> {
    let mut b = Canonical::new("tunenet/v1/benchmark-reveal");
    b.bytes(r.challenge_id.as_bytes())
        .bytes(&r.r_seed)
        .bytes(r.validator.as_bytes())
        .u64(r.tiles.len() as u64);
    for t in &r.tiles {
        b.u64(t.matrix as u64).u64(t.index as u64);
    }
    b.finish()
}

/// The wire form of one device's opening.
pub fn opening_pb(device: u32, o: Opening) -> v1::DeviceOpening {
    v1::DeviceOpening {
        device,
        products: o
            .products
            .into_iter()
            .map(|values| v1::ProductVector { values })
            .collect(),
        tiles: o
            .tiles
            .into_iter()
            .map(|t| v1::OpenedTile {
                tile: Some(v1::TileRef {
                    matrix: t.tile.matrix,
                    index: t.tile.index,
                }),
                values: t.values,
                path: t.path.into_iter().map(|p| p.to_vec()).collect(),
            })
            .collect(),
    }
}

pub(crate) fn opening_from_pb(d: &v1::DeviceOpening) -> Result<Opening, String> {
    let mut tiles = Vec::new();
    for t in &d.tiles {
        let r = t.tile.as_ref().ok_or("an opened tile names no tile")?;
        let mut path = Vec::new();
        for p in &t.path {
            path.push(array32(p, "a Merkle path entry")?);
        }
        tiles.push(bench::OpenedTile {
            tile: TileRef {
                matrix: r.matrix,
                index: r.index,
            },
            values: t.values.clone(),
            path,
        });
    }
    Ok(Opening {
        products: d.products.iter().map(|p| p.values.clone()).collect(),
        tiles,
    })
}

// ---------------------------------------------------------------- the miner's side

struct Pending {
    validator: String,
    computed: Vec<(u32, bench::Computed)>,
    at: Instant,
}

/// A miner's benchmark service: computes challenges on its devices, keeps the products
/// until the reveal, and opens them.
pub struct MinerBench {
    identity: Identity,
    /// Re-read while the miner runs: a GPU can leave the bus, a driver can change.
    inventory: Mutex<Inventory>,
    price_per_gpu_hour: f64,
    /// Largest matrix side it computes (bounds what a validator can make it spend).
    max_n: u32,
    pending: Mutex<HashMap<String, Pending>>,
    busy: tokio::sync::Mutex<()>,
}

impl MinerBench {
    pub fn new(
        identity: Identity,
        inventory: Inventory,
        max_n: u32,
        price_per_gpu_hour: f64,
    ) -> Arc<MinerBench> {
        Arc::new(MinerBench {
            identity,
            inventory: Mutex::new(inventory),
            price_per_gpu_hour,
            max_n,
            pending: Mutex::new(HashMap::new()),
            busy: tokio::sync::Mutex::new(()),
        })
    }

    /// The inventory as last read.
    pub fn inventory(&self) -> Inventory {
        self.inventory.lock().expect("inventory lock").clone()
    }

    /// Replaces the inventory with a fresh reading; true when the hardware changed (free
    /// memory aside).
    pub fn refresh(&self, now: Inventory) -> bool {
        let mut inv = self.inventory.lock().expect("inventory lock");
        let changed = !inv.same_hardware(&now);
        *inv = now;
        changed
    }

    pub fn price_per_gpu_hour(&self) -> f64 {
        self.price_per_gpu_hour
    }

    pub fn peer_id(&self) -> PeerIdStr {
        self.identity.peer_id()
    }

    /// The devices a challenge may name: every GPU of the inventory, else the CPU (0).
    fn device_count(&self) -> u32 {
        (self.inventory().gpus.len() as u32).max(1)
    }

    fn open_device(&self, index: u32) -> Result<tunenet_ml::Device, String> {
        if self.inventory().gpus.is_empty() {
            return Ok(tunenet_ml::Device::Cpu);
        }
        tunenet_ml::parse_device(&format!("cuda:{index}")).map_err(|e| e.to_string())
    }

    /// Computes a challenge and answers with the signed commitment.
    pub async fn challenge(
        self: &Arc<Self>,
        c: v1::BenchmarkChallenge,
    ) -> Result<v1::BenchmarkCommitment, Status> {
        let bad = |m: String| Status::invalid_argument(format!("benchmark challenge: {m}"));
        verify_signature(
            &PeerIdStr(c.validator.clone()),
            &c.validator_key,
            &challenge_signing_bytes(&c),
            &c.signature,
        )
        .map_err(|e| Status::unauthenticated(format!("benchmark challenge: {e}")))?;
        if now_ms().abs_diff(c.issued_at_ms) > MAX_SKEW_MS {
            return Err(Status::failed_precondition(
                "benchmark challenge: issued more than 5 minutes from this miner's clock",
            ));
        }
        let spec = spec_of(&c).map_err(bad)?;
        if spec.n > self.max_n {
            return Err(Status::resource_exhausted(format!(
                "benchmark challenge: n = {} is over this miner's limit of {}",
                spec.n, self.max_n
            )));
        }
        let seed = array32(&c.seed, "the seed").map_err(bad)?;
        let devices: Vec<u32> = if c.devices.is_empty() {
            (0..self.device_count()).collect()
        } else {
            c.devices.clone()
        };
        let mut seen = std::collections::HashSet::new();
        if devices
            .iter()
            .any(|d| *d >= self.device_count() || !seen.insert(*d))
        {
            return Err(bad(format!(
                "devices {devices:?}: this miner has {} (no repeats)",
                self.device_count()
            )));
        }
        let _busy = self.busy.try_lock().map_err(|_| {
            Status::resource_exhausted("benchmark challenge: another one is running")
        })?;
        let start = Instant::now();
        let mut tasks = Vec::new();
        for d in devices {
            let device = self.open_device(d).map_err(|e| {
                Status::failed_precondition(format!("benchmark challenge: device {d}: {e}"))
            })?;
            let ch = Challenge {
                seed,
                spec,
                device: d,
            };
            tasks.push(tokio::task::spawn_blocking(move || {
                bench::compute(&ch, &device).map(|c| (d, c))
            }));
        }
        let mut computed = Vec::new();
        for t in tasks {
            let r = t
                .await
                .map_err(|e| Status::internal(format!("benchmark worker: {e}")))?;
            computed.push(r.map_err(Status::internal)?);
        }
        let reported_compute_ms = start.elapsed().as_millis() as u64;
        let mut out = v1::BenchmarkCommitment {
            challenge_id: c.challenge_id.clone(),
            miner: self.identity.peer_id().0,
            miner_key: self.identity.public_key_bytes(),
            devices: computed
                .iter()
                .map(|(d, c)| v1::DeviceRoots {
                    device: *d,
                    roots: c.roots().iter().map(|r| r.to_vec()).collect(),
                })
                .collect(),
            reported_compute_ms,
            inventory: Some(inventory_pb(&self.inventory())),
            signature: vec![],
            price_per_gpu_hour: self.price_per_gpu_hour,
        };
        out.signature = self.identity.sign(&commitment_signing_bytes(&out));
        let mut pending = self.pending.lock().expect("pending lock");
        pending.retain(|_, p| p.at.elapsed() < PENDING_FOR);
        pending.insert(
            c.challenge_id,
            Pending {
                validator: c.validator,
                computed,
                at: Instant::now(),
            },
        );
        Ok(out)
    }

    /// Opens a computed challenge after the validator's reveal.
    pub async fn open(
        self: &Arc<Self>,
        r: v1::BenchmarkReveal,
    ) -> Result<v1::BenchmarkOpening, Status> {
        verify_signature(
            &PeerIdStr(r.validator.clone()),
            &r.validator_key,
            &reveal_signing_bytes(&r),
            &r.signature,
        )
        .map_err(|e| Status::unauthenticated(format!("benchmark reveal: {e}")))?;
        let p = {
            let mut pending = self.pending.lock().expect("pending lock");
            match pending.get(&r.challenge_id) {
                Some(p) if p.validator != r.validator => {
                    return Err(Status::permission_denied(
                        "benchmark reveal: the challenge came from another validator",
                    ));
                }
                Some(_) => pending.remove(&r.challenge_id).expect("present"),
                None => {
                    return Err(Status::not_found(format!(
                        "benchmark reveal: no computed challenge `{}` (answered, expired or never sent)",
                        r.challenge_id
                    )));
                }
            }
        };
        let reveal = Reveal {
            r_seed: array32(&r.r_seed, "r_seed").map_err(Status::invalid_argument)?,
            tiles: r
                .tiles
                .iter()
                .map(|t| TileRef {
                    matrix: t.matrix,
                    index: t.index,
                })
                .collect(),
        };
        let miner = self.identity.peer_id().0;
        let challenge_id = r.challenge_id;
        tokio::task::spawn_blocking(move || {
            let mut devices = Vec::new();
            for (d, c) in &p.computed {
                let o = bench::open(c, &reveal).map_err(Status::invalid_argument)?;
                devices.push(opening_pb(*d, o));
            }
            Ok(v1::BenchmarkOpening {
                challenge_id,
                miner,
                devices,
            })
        })
        .await
        .map_err(|e| Status::internal(format!("benchmark worker: {e}")))?
    }
}

// ---------------------------------------------------------------- the validator's side

/// How a validator benchmarks its miners (`[hardware]` in its config).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HardwareConfig {
    /// Benchmark miners at all.
    pub enabled: bool,
    /// Re-benchmark a miner this often (and at once when its inventory changes).
    pub check_interval_secs: u64,
    /// Compare each miner's declared inventory (its status or advert) with its record
    /// this often, to benchmark it again when its hardware changed.
    pub inventory_poll_secs: u64,
    /// Matrix side for a miner without GPUs.
    pub cpu_n: u32,
    /// Matrix side for GPUs.
    pub gpu_n: u32,
    /// Matrices per device per challenge.
    pub k: u32,
    /// Side of a committed tile.
    pub tile: u32,
    /// Tiles opened per matrix: a miner that computed a fraction f of the tiles passes
    /// with probability at most f^open_tiles per matrix.
    pub open_tiles: u32,
    /// The dtypes benchmarked on GPUs, each in turn (CPUs: f32 only).
    pub gpu_dtypes: Vec<String>,
}

impl Default for HardwareConfig {
    fn default() -> Self {
        HardwareConfig {
            enabled: true,
            check_interval_secs: 3600,
            inventory_poll_secs: 60,
            cpu_n: 512,
            gpu_n: 8192,
            k: 1,
            tile: 32,
            open_tiles: 8,
            gpu_dtypes: vec!["f32".into(), "bf16".into()],
        }
    }
}

impl HardwareConfig {
    /// Checks sizes and dtypes before the daemon starts.
    pub fn validate(&self) -> Result<(), String> {
        for (what, n) in [("cpu_n", self.cpu_n), ("gpu_n", self.gpu_n)] {
            Spec {
                n,
                k: self.k,
                tile: self.tile,
                dtype: Dtype::F32,
            }
            .validate()
            .map_err(|e| format!("`hardware.{what}`: {e}"))?;
        }
        for d in &self.gpu_dtypes {
            Dtype::parse(d).map_err(|e| format!("`hardware.gpu_dtypes`: {e}"))?;
        }
        if self.open_tiles == 0 {
            return Err("`hardware.open_tiles` must be at least 1".into());
        }
        if self.inventory_poll_secs == 0 {
            return Err("`hardware.inventory_poll_secs` must be at least 1".into());
        }
        Ok(())
    }
}

/// One device's verified result.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DeviceResult {
    pub device: u32,
    /// The inventory's name for it (self-declared), or `cpu`.
    pub name: String,
    pub dtype: Dtype,
    /// Verified: the challenge's work over the validator's time, all devices at once.
    pub tflops: f64,
    /// The datasheet figure of the GPU the inventory names, for this dtype.
    pub datasheet_tflops: Option<f64>,
}

/// The outcome of one challenge.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BenchRun {
    pub spec: Spec,
    pub checked_at_ms: u64,
    /// From sending the challenge to receiving the commitment, on the validator's clock.
    pub measured_ms: u64,
    /// The miner's own report of its compute time.
    pub reported_ms: u64,
    pub verified: bool,
    /// The failed check and why, when not verified.
    pub failure: Option<String>,
    pub devices: Vec<DeviceResult>,
    /// The validator's own verification time.
    pub verify_ms: u64,
    /// From sending the reveal to receiving the opening.
    #[serde(default)]
    pub open_ms: u64,
    /// One round trip to the miner just before the challenge (connection included): what
    /// the network adds to `measured_ms`. Over libp2p, where there is no such call, the
    /// reveal's round trip stands in (an upper bound).
    #[serde(default)]
    pub ping_ms: u64,
}

/// What a validator knows of a miner's hardware.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct HardwareRecord {
    pub miner: String,
    pub addr: String,
    /// The miner's own inventory (self-declared), as signed in its last commitment.
    pub inventory: Inventory,
    /// The latest run per dtype.
    pub runs: Vec<BenchRun>,
    /// Disagreements between what the miner says and what was measured, with the numbers.
    pub flags: Vec<String>,
    /// Why the last attempt got no answer, when it did not.
    pub unreachable: Option<String>,
    pub updated_at_ms: u64,
    /// What the miner asks per device-hour, as signed in its last answer (0: not priced).
    #[serde(default)]
    pub price_per_gpu_hour: f64,
}

impl HardwareRecord {
    /// The devices a miner is paid for: its GPUs, or its CPU when it has none.
    pub fn devices(&self) -> u32 {
        (self.inventory.gpus.len() as u32).max(1)
    }

    /// The best verified figure in any dtype, summed over devices (0 when none verified).
    pub fn best_verified_tflops(&self) -> f64 {
        self.runs
            .iter()
            .filter(|r| r.verified)
            .map(|r| r.devices.iter().map(|d| d.tflops).sum::<f64>())
            .fold(0.0, f64::max)
    }

    /// The best verified figure for `dtype`, summed over devices.
    pub fn verified_tflops(&self, dtype: Dtype) -> Option<f64> {
        self.runs
            .iter()
            .filter(|r| r.verified && r.spec.dtype == dtype)
            .map(|r| r.devices.iter().map(|d| d.tflops).sum())
            .fold(None, |a: Option<f64>, b| Some(a.map_or(b, |a| a.max(b))))
    }

    /// One line for the console.
    pub fn summary(&self) -> String {
        let mut parts = Vec::new();
        for r in &self.runs {
            if r.verified {
                let t: f64 = r.devices.iter().map(|d| d.tflops).sum();
                parts.push(format!(
                    "{} {:.3} TFLOPS verified ({} device{})",
                    r.spec.dtype,
                    t,
                    r.devices.len(),
                    if r.devices.len() == 1 { "" } else { "s" }
                ));
            } else {
                parts.push(format!(
                    "{} FAILED: {}",
                    r.spec.dtype,
                    r.failure.as_deref().unwrap_or("?")
                ));
            }
        }
        if let Some(u) = &self.unreachable {
            parts.push(format!("last attempt: {u}"));
        }
        if parts.is_empty() {
            "not benchmarked yet".into()
        } else {
            parts.join("; ")
        }
    }
}

/// The flags a run raises against the miner's own claims.
pub fn flags_of(inv: &Inventory, run: &BenchRun) -> Vec<String> {
    let mut flags = Vec::new();
    if run.verified && run.spec.dtype == Dtype::F32 {
        for d in &run.devices {
            if let Some(peak) = d.datasheet_tflops
                && d.tflops < bench::CLAIM_FLOOR * peak
            {
                flags.push(format!(
                    "claims_more_than_verified: device {} is declared as {} (datasheet {peak} TFLOPS f32) but delivered {:.3} verified TFLOPS ({:.1} % of it; under {:.0} % is flagged)",
                    d.device,
                    d.name,
                    d.tflops,
                    100.0 * d.tflops / peak,
                    100.0 * bench::CLAIM_FLOOR
                ));
            }
        }
    }
    // The miner's report is part of the validator's interval: it cannot be longer, and
    // far shorter (beyond what the network adds, bounded by the reveal's round trip)
    // means the report is not the truth.
    let slack_ms = (3 * run.ping_ms).max(100);
    if run.reported_ms > run.measured_ms + slack_ms {
        flags.push(format!(
            "time_report: the miner reported {} ms of compute, longer than the {} ms the validator measured from challenge to commitment",
            run.reported_ms, run.measured_ms
        ));
    } else if run.reported_ms * 2 < run.measured_ms && run.measured_ms > run.reported_ms + slack_ms
    {
        flags.push(format!(
            "time_report: the miner reported {} ms of compute; the validator measured {} ms from challenge to commitment (the verified figure uses the validator's)",
            run.reported_ms, run.measured_ms
        ));
    }
    let _ = inv;
    flags
}

/// Sends one challenge to the miner at `addr`, times it, reveals, verifies; returns the
/// miner's peer id, its inventory, its price per device-hour and the run.
pub async fn challenge_miner(
    transport: &Transport,
    identity: &Identity,
    addr: &str,
    spec: Spec,
    open_tiles: u32,
) -> Result<(String, Inventory, f64, BenchRun), String> {
    let mut rng = rand::rngs::StdRng::from_os_rng();
    let seed: [u8; 32] = rng.random();
    let mut c = v1::BenchmarkChallenge {
        challenge_id: format!("bench-{:016x}", rng.random::<u64>()),
        validator: identity.peer_id().0,
        validator_key: identity.public_key_bytes(),
        seed: seed.to_vec(),
        n: spec.n,
        k: spec.k,
        tile: spec.tile,
        dtype: dtype_pb(spec.dtype),
        devices: vec![],
        issued_at_ms: now_ms(),
        signature: vec![],
    };
    c.signature = identity.sign(&challenge_signing_bytes(&c));
    let ping = transport.ping(addr).await;
    let sent = Instant::now();
    let commitment = transport
        .benchmark(addr, c.clone())
        .await
        .map_err(|e| format!("no commitment: {e}"))?;
    let measured_ms = sent.elapsed().as_millis() as u64;
    let checked_at_ms = now_ms();
    // Who answered, and what it says it has: signed together with the roots.
    verify_signature(
        &PeerIdStr(commitment.miner.clone()),
        &commitment.miner_key,
        &commitment_signing_bytes(&commitment),
        &commitment.signature,
    )
    .map_err(|e| format!("bad commitment signature: {e}"))?;
    if commitment.challenge_id != c.challenge_id {
        return Err("the commitment answers another challenge".into());
    }
    let miner = commitment.miner.clone();
    let inventory = match &commitment.inventory {
        Some(i) => inventory_from_pb(i)?,
        None => return Err("the commitment carries no inventory".into()),
    };
    let price = commitment.price_per_gpu_hour;
    if !price.is_finite() || price < 0.0 {
        return Err(format!(
            "the commitment's price per device-hour ({price}) is not a finite number of at least 0"
        ));
    }
    let failed = |why: String, devices: Vec<DeviceResult>| BenchRun {
        spec,
        checked_at_ms,
        measured_ms,
        reported_ms: commitment.reported_compute_ms,
        verified: false,
        failure: Some(why),
        devices,
        verify_ms: 0,
        open_ms: 0,
        ping_ms: ping.map_or(0, |p| p.as_millis() as u64),
    };
    let expected = (inventory.gpus.len() as u32).max(1);
    let ids: Vec<u32> = commitment.devices.iter().map(|d| d.device).collect();
    if ids != (0..expected).collect::<Vec<_>>() {
        let why = format!(
            "devices: committed for devices {ids:?}, but the inventory lists {expected} (every device, in order, at once)"
        );
        return Ok((miner, inventory, price, failed(why, vec![])));
    }
    let mut roots = Vec::new();
    for d in &commitment.devices {
        let mut r = Vec::new();
        for b in &d.roots {
            match array32(b, "a root") {
                Ok(a) => r.push(a),
                Err(e) => {
                    return Ok((
                        miner,
                        inventory,
                        price,
                        failed(format!("malformed: {e}"), vec![]),
                    ));
                }
            }
        }
        roots.push(r);
    }
    let reveal = bench::draw_reveal(&spec, open_tiles, &mut rng);
    let mut rv = v1::BenchmarkReveal {
        challenge_id: c.challenge_id.clone(),
        r_seed: reveal.r_seed.to_vec(),
        tiles: reveal
            .tiles
            .iter()
            .map(|t| v1::TileRef {
                matrix: t.matrix,
                index: t.index,
            })
            .collect(),
        validator: identity.peer_id().0,
        validator_key: identity.public_key_bytes(),
        signature: vec![],
    };
    rv.signature = identity.sign(&reveal_signing_bytes(&rv));
    let revealed = Instant::now();
    let opening = match transport.benchmark_open(addr, rv).await {
        Ok(o) => o,
        Err(e) => {
            return Ok((
                miner,
                inventory,
                price,
                failed(format!("opening: no answer to the reveal: {e}"), vec![]),
            ));
        }
    };
    let open_ms = revealed.elapsed().as_millis() as u64;
    let ping_ms = ping.map_or(open_ms, |p| p.as_millis() as u64);
    let secs = measured_ms.max(1) as f64 / 1000.0;
    let devices: Vec<DeviceResult> = (0..expected)
        .map(|d| {
            let gpu = inventory.gpus.get(d as usize);
            DeviceResult {
                device: d,
                name: gpu.map(|g| g.name.clone()).unwrap_or_else(|| "cpu".into()),
                dtype: spec.dtype,
                tflops: bench::tflops(&spec, secs),
                datasheet_tflops: gpu
                    .and_then(|g| bench::datasheet(&g.name))
                    .and_then(|s| s.peak(spec.dtype)),
            }
        })
        .collect();
    if opening.challenge_id != c.challenge_id || opening.devices.len() != roots.len() {
        let why = format!(
            "malformed: the opening answers {} device(s) of challenge `{}`",
            opening.devices.len(),
            opening.challenge_id
        );
        return Ok((miner, inventory, price, failed(why, devices)));
    }
    let t = Instant::now();
    let result = tokio::task::spawn_blocking(move || {
        for (i, d) in opening.devices.iter().enumerate() {
            if d.device != i as u32 {
                return Err(format!("malformed: opening {i} is for device {}", d.device));
            }
            let o = opening_from_pb(d).map_err(|e| format!("malformed: {e}"))?;
            let ch = Challenge {
                seed,
                spec,
                device: i as u32,
            };
            bench::verify(&ch, &roots[i], &reveal, &o)
                .map_err(|f| format!("{} on device {i}: {f}", f.check()))?;
        }
        Ok(())
    })
    .await
    .map_err(|e| format!("verification worker: {e}"))?;
    let verify_ms = t.elapsed().as_millis() as u64;
    let run = match result {
        Ok(()) => BenchRun {
            spec,
            checked_at_ms,
            measured_ms,
            reported_ms: commitment.reported_compute_ms,
            verified: true,
            failure: None,
            devices,
            verify_ms,
            open_ms,
            ping_ms,
        },
        Err(why) => BenchRun {
            verify_ms,
            open_ms,
            ..failed(why, devices)
        },
    };
    Ok((miner, inventory, price, run))
}

/// Benchmarks the miner at `addr` in every configured dtype and stores the record.
pub async fn check_miner(
    transport: &Transport,
    identity: &Identity,
    store: &dyn Store,
    cfg: &HardwareConfig,
    addr: &str,
    previous: Option<HardwareRecord>,
) -> HardwareRecord {
    // The size follows what the miner said last time; a first look uses the CPU size
    // and, when the answer lists GPUs, goes again at the GPU size.
    let mut known_gpus = previous
        .as_ref()
        .map(|p| !p.inventory.gpus.is_empty())
        .unwrap_or(false);
    let mut rec = previous.unwrap_or_else(|| HardwareRecord {
        addr: addr.to_string(),
        ..Default::default()
    });
    rec.addr = addr.to_string();
    for _attempt in 0..2 {
        let (n, dtypes) = if known_gpus {
            let d: Vec<Dtype> = cfg
                .gpu_dtypes
                .iter()
                .filter_map(|d| Dtype::parse(d).ok())
                .collect();
            (cfg.gpu_n, d)
        } else {
            (cfg.cpu_n, vec![Dtype::F32])
        };
        let mut runs = Vec::new();
        let mut flags = Vec::new();
        let mut gpus_now = known_gpus;
        rec.unreachable = None;
        for dtype in dtypes {
            let spec = Spec {
                n,
                k: cfg.k,
                tile: cfg.tile,
                dtype,
            };
            match challenge_miner(transport, identity, addr, spec, cfg.open_tiles).await {
                Ok((miner, inv, price, run)) => {
                    rec.price_per_gpu_hour = price;
                    if !rec.miner.is_empty() && rec.miner != miner {
                        tracing::info!(%addr, old = %rec.miner, new = %miner, "another miner answers at this address");
                    }
                    rec.miner = miner;
                    gpus_now = !inv.gpus.is_empty();
                    flags.extend(flags_of(&inv, &run));
                    match &run.failure {
                        None => {
                            tracing::info!(%addr, miner = %rec.miner, dtype = %dtype, n, tflops = run.devices.iter().map(|d| d.tflops).sum::<f64>(), ms = run.measured_ms, verify_ms = run.verify_ms, "benchmark verified")
                        }
                        Some(f) => {
                            tracing::warn!(%addr, miner = %rec.miner, dtype = %dtype, n, failure = %f, "benchmark failed")
                        }
                    }
                    rec.inventory = inv;
                    runs.push(run);
                }
                Err(e) => {
                    tracing::warn!(%addr, error = %e, "benchmark: no usable answer");
                    rec.unreachable = Some(e);
                    break;
                }
            }
            if gpus_now != known_gpus {
                break;
            }
        }
        if !runs.is_empty() {
            rec.runs = runs;
            rec.flags = flags;
        }
        rec.updated_at_ms = now_ms();
        if gpus_now == known_gpus || rec.unreachable.is_some() {
            break;
        }
        known_gpus = gpus_now;
    }
    if !rec.miner.is_empty()
        && let Err(e) = store.put_json(HARDWARE, &rec.miner, &rec)
    {
        tracing::warn!(error = %e, "could not store a hardware record");
    }
    rec
}

/// Every stored hardware record.
pub fn records(store: &dyn Store) -> Vec<HardwareRecord> {
    store
        .scan_json::<HardwareRecord>(HARDWARE, "")
        .unwrap_or_default()
        .into_iter()
        .map(|(_, r)| r)
        .collect()
}

/// Benchmarks every miner the validator knows, each when its record is missing or older
/// than the interval, one at a time (a benchmark shares nothing with another).
pub fn spawn_checker(
    transport: Transport,
    identity: Identity,
    store: Arc<dyn Store>,
    cfg: HardwareConfig,
    miners: tokio::sync::watch::Receiver<Vec<String>>,
    on_record: impl Fn() + Send + 'static,
) {
    if !cfg.enabled {
        return;
    }
    tokio::spawn(async move {
        let mut last: HashMap<String, u64> = HashMap::new();
        // When each miner's declared inventory was last compared with its record.
        let mut looked: HashMap<String, u64> = HashMap::new();
        loop {
            let addrs = miners.borrow().clone();
            let now = now_ms();
            for addr in addrs {
                let previous = records(store.as_ref()).into_iter().find(|r| r.addr == addr);
                let mut due = last
                    .get(&addr)
                    .is_none_or(|t| now.saturating_sub(*t) >= cfg.check_interval_secs * 1000);
                // Between scheduled checks, a miner whose hardware changed (a GPU gone, a
                // card added, a new driver) is benchmarked again at once.
                let look = looked
                    .get(&addr)
                    .is_none_or(|t| now.saturating_sub(*t) >= cfg.inventory_poll_secs * 1000);
                if !due
                    && look
                    && let Some(prev) = &previous
                {
                    looked.insert(addr.clone(), now);
                    if let Some(inv) = transport
                        .declared_inventory(&addr)
                        .await
                        .and_then(|p| inventory_from_pb(&p).ok())
                        && !inv.same_hardware(&prev.inventory)
                    {
                        tracing::info!(%addr, was = %prev.inventory.summary(), now = %inv.summary(), "the miner's hardware changed: benchmarking it again");
                        due = true;
                    }
                }
                if !due {
                    continue;
                }
                let rec =
                    check_miner(&transport, &identity, store.as_ref(), &cfg, &addr, previous).await;
                // Unreachable miners are tried again on the next pass, not an hour later.
                if rec.unreachable.is_none() {
                    last.insert(addr, now_ms());
                    on_record();
                }
            }
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
    });
}

// ---------------------------------------------------------------- price and value

/// What a miner costs and delivers, for the console.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct MinerValue {
    /// Devices it is paid for: its GPUs, or 1 (the CPU).
    pub devices: u32,
    /// Its signed price per device-hour (0: not priced).
    pub price_per_gpu_hour: f64,
    /// Jobs it was scored in.
    pub jobs_scored: u32,
    /// Mean quality over them (a job's qualities have mean 1).
    pub mean_quality: f64,
    /// Price x devices x the mean time budget of its scored jobs, in hours: what a job of
    /// this validator's costs at its price.
    pub cost_per_job: f64,
    /// `mean_quality / cost_per_job`; 0 when the miner is not priced or was never scored.
    pub quality_per_cost: f64,
}

/// A miner's value from its record and the (quality, time budget in ms) of every job it
/// was scored in.
pub fn value_of(rec: &HardwareRecord, scored: &[(f64, u64)]) -> MinerValue {
    let devices = rec.devices();
    let price = rec.price_per_gpu_hour;
    let n = scored.len();
    let (mean_quality, mean_hours) = if n == 0 {
        (0.0, 0.0)
    } else {
        (
            scored.iter().map(|(q, _)| q).sum::<f64>() / n as f64,
            scored.iter().map(|(_, ms)| *ms as f64).sum::<f64>() / n as f64 / 3.6e6,
        )
    };
    let cost_per_job = price * devices as f64 * mean_hours;
    MinerValue {
        devices,
        price_per_gpu_hour: price,
        jobs_scored: n as u32,
        mean_quality,
        cost_per_job,
        quality_per_cost: if cost_per_job > 0.0 && n > 0 {
            mean_quality / cost_per_job
        } else {
            0.0
        },
    }
}

// ---------------------------------------------------------------- jobs matched to hardware

/// What a competition requires of a miner's hardware (`[competitions.hardware]`). Every
/// part is judged on what the validator verified: a GPU counts only when its benchmark
/// delivered at least [`bench::CLAIM_FLOOR`] of its model's datasheet f32 figure.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HardwareRequirement {
    /// GPU models accepted, matched in the GPU's name (e.g. `["A100", "H100"]`); empty:
    /// any model.
    pub gpu_models: Vec<String>,
    /// Least memory per counted GPU, GB.
    pub min_gpu_memory_gb: f64,
    /// Least number of counted GPUs.
    pub min_gpus: u32,
    /// Least verified TFLOPS per dtype (`f32`, `bf16`, `f16`), summed over devices.
    pub min_verified_tflops: std::collections::BTreeMap<String, f64>,
}

impl HardwareRequirement {
    /// No requirement at all.
    pub fn is_empty(&self) -> bool {
        self.gpu_models.is_empty()
            && self.min_gpu_memory_gb <= 0.0
            && self.min_gpus == 0
            && self.min_verified_tflops.is_empty()
    }

    /// Whether any GPU is required.
    fn wants_gpus(&self) -> bool {
        !self.gpu_models.is_empty() || self.min_gpu_memory_gb > 0.0 || self.min_gpus > 0
    }

    /// Checks the values serde cannot.
    pub fn validate(&self) -> Result<(), String> {
        if !(self.min_gpu_memory_gb.is_finite() && self.min_gpu_memory_gb >= 0.0) {
            return Err("`hardware.min_gpu_memory_gb` must be 0 or more".into());
        }
        for (d, t) in &self.min_verified_tflops {
            Dtype::parse(d).map_err(|e| format!("`hardware.min_verified_tflops`: {e}"))?;
            if !(t.is_finite() && *t >= 0.0) {
                return Err(format!(
                    "`hardware.min_verified_tflops.{d}` must be 0 or more"
                ));
            }
        }
        if self.gpu_models.iter().any(|m| m.trim().is_empty()) {
            return Err("`hardware.gpu_models` has an empty name".into());
        }
        Ok(())
    }

    /// The requirement as offers carry it: JSON, or empty for none.
    pub fn to_offer(&self) -> String {
        if self.is_empty() {
            String::new()
        } else {
            serde_json::to_string(self).unwrap_or_default()
        }
    }

    /// The requirement an offer carries (empty: none).
    pub fn from_offer(s: &str) -> Result<HardwareRequirement, String> {
        if s.trim().is_empty() || s.trim() == "cpu" {
            return Ok(HardwareRequirement::default());
        }
        serde_json::from_str(s).map_err(|e| format!("the offer's hardware requirement: {e}"))
    }

    fn gpu_fits(&self, g: &GpuInfo) -> bool {
        let name = g.name.to_ascii_lowercase();
        (self.gpu_models.is_empty()
            || self
                .gpu_models
                .iter()
                .any(|m| name.contains(&m.trim().to_ascii_lowercase())))
            && g.memory_total_bytes as f64 >= self.min_gpu_memory_gb * 1e9
    }

    /// Whether a miner's own inventory meets the GPU part (the miner's policy check: it
    /// knows what it has).
    pub fn check_inventory(&self, inv: &Inventory) -> Result<(), String> {
        if !self.wants_gpus() {
            return Ok(());
        }
        let fit = inv.gpus.iter().filter(|g| self.gpu_fits(g)).count() as u32;
        if fit < self.min_gpus.max(1) {
            return Err(format!(
                "the job needs {}; this box has {fit} such GPU(s) ({})",
                self.describe(),
                inv.summary()
            ));
        }
        Ok(())
    }

    /// Whether the validator's verified record of a miner meets the requirement; the
    /// reason in words when it does not.
    pub fn check(&self, rec: Option<&HardwareRecord>) -> Result<(), String> {
        if self.is_empty() {
            return Ok(());
        }
        let Some(rec) = rec else {
            return Err("not benchmarked yet".into());
        };
        let f32_run = rec
            .runs
            .iter()
            .find(|r| r.spec.dtype == Dtype::F32 && r.verified);
        if self.wants_gpus() {
            let Some(run) = f32_run else {
                return Err(match rec.runs.iter().find(|r| !r.verified) {
                    Some(r) => format!(
                        "its benchmark failed: {}",
                        r.failure.as_deref().unwrap_or("?")
                    ),
                    None => "no verified f32 benchmark yet".into(),
                });
            };
            let counted = rec
                .inventory
                .gpus
                .iter()
                .enumerate()
                .filter(|(i, g)| {
                    self.gpu_fits(g)
                        && run.devices.iter().any(|d| {
                            d.device == *i as u32
                                && d.datasheet_tflops
                                    .is_some_and(|p| d.tflops >= bench::CLAIM_FLOOR * p)
                        })
                })
                .count() as u32;
            if counted < self.min_gpus.max(1) {
                return Err(format!(
                    "needs {}; {counted} of its GPUs qualify with a verified speed that matches their model (declared: {})",
                    self.describe(),
                    rec.inventory.summary()
                ));
            }
        }
        for (d, want) in &self.min_verified_tflops {
            let dtype = Dtype::parse(d).map_err(|e| e.to_string())?;
            match rec.verified_tflops(dtype) {
                Some(got) if got >= *want => {}
                Some(got) => {
                    return Err(format!(
                        "needs {want} verified TFLOPS {dtype}; it delivered {got:.3}"
                    ));
                }
                None => {
                    return Err(format!(
                        "no verified {dtype} benchmark; needs {want} TFLOPS"
                    ));
                }
            }
        }
        Ok(())
    }

    /// The requirement in words.
    pub fn describe(&self) -> String {
        let mut parts = Vec::new();
        if self.wants_gpus() {
            parts.push(format!(
                "{} GPU(s){}{}",
                self.min_gpus.max(1),
                if self.gpu_models.is_empty() {
                    String::new()
                } else {
                    format!(" of {}", self.gpu_models.join("/"))
                },
                if self.min_gpu_memory_gb > 0.0 {
                    format!(" with {} GB or more", self.min_gpu_memory_gb)
                } else {
                    String::new()
                }
            ));
        }
        for (d, t) in &self.min_verified_tflops {
            parts.push(format!("{t} verified TFLOPS {d}"));
        }
        if parts.is_empty() {
            "nothing".into()
        } else {
            parts.join(", ")
        }
    }
}

/// Why each known miner is or is not offered a competition's jobs.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Eligibility {
    pub addr: String,
    pub miner: Option<String>,
    pub offered: bool,
    pub reason: String,
}

/// Splits `addrs` by the requirement, using the stored records.
pub fn eligibility(
    req: &HardwareRequirement,
    addrs: &[String],
    records: &[HardwareRecord],
) -> Vec<Eligibility> {
    addrs
        .iter()
        .map(|a| {
            let rec = records.iter().find(|r| &r.addr == a);
            let verdict = req.check(rec);
            Eligibility {
                addr: a.clone(),
                miner: rec.map(|r| r.miner.clone()),
                offered: verdict.is_ok(),
                reason: match verdict {
                    Ok(()) if req.is_empty() => "no hardware requirement".into(),
                    Ok(()) => format!("meets {}", req.describe()),
                    Err(e) => e,
                },
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(name: &str, tflops: f64, verified: bool) -> HardwareRecord {
        let inventory = Inventory {
            gpus: vec![GpuInfo {
                name: name.into(),
                memory_total_bytes: 80_000_000_000,
                ..Default::default()
            }],
            ..Default::default()
        };
        let spec = Spec {
            n: 512,
            k: 1,
            tile: 32,
            dtype: Dtype::F32,
        };
        HardwareRecord {
            miner: "m".into(),
            addr: "http://m".into(),
            runs: vec![BenchRun {
                spec,
                checked_at_ms: 0,
                measured_ms: 10,
                reported_ms: 10,
                verified,
                failure: (!verified).then(|| "tile on device 0: wrong".into()),
                devices: vec![DeviceResult {
                    device: 0,
                    name: name.into(),
                    dtype: Dtype::F32,
                    tflops,
                    datasheet_tflops: bench::datasheet(name).map(|d| d.f32),
                }],
                verify_ms: 1,
                open_ms: 1,
                ping_ms: 1,
            }],
            inventory,
            ..Default::default()
        }
    }

    #[test]
    fn requirements_count_only_gpus_whose_verified_speed_matches_their_model() {
        let req = HardwareRequirement {
            gpu_models: vec!["A100".into()],
            min_gpus: 1,
            min_gpu_memory_gb: 40.0,
            ..Default::default()
        };
        assert!(
            req.check(Some(&record("NVIDIA A100-SXM4-80GB", 15.0, true)))
                .is_ok()
        );
        let slow = req
            .check(Some(&record("NVIDIA A100-SXM4-80GB", 0.05, true)))
            .unwrap_err();
        assert!(slow.contains("0 of its GPUs qualify"), "{slow}");
        let failed = req
            .check(Some(&record("NVIDIA A100-SXM4-80GB", 15.0, false)))
            .unwrap_err();
        assert!(failed.contains("benchmark failed"), "{failed}");
        let other = req.check(Some(&record("Tesla V100-SXM2-16GB", 14.0, true)));
        assert!(other.is_err());
        assert_eq!(req.check(None).unwrap_err(), "not benchmarked yet");
        let speed = HardwareRequirement {
            min_verified_tflops: [("f32".to_string(), 1.0)].into(),
            ..Default::default()
        };
        assert!(speed.check(Some(&record("cpu", 2.0, true))).is_ok());
        assert!(
            speed
                .check(Some(&record("cpu", 0.5, true)))
                .unwrap_err()
                .contains("delivered 0.500")
        );
        assert!(HardwareRequirement::default().check(None).is_ok());
    }

    #[test]
    fn requirements_travel_in_offers_and_bad_ones_are_refused() {
        let req = HardwareRequirement {
            min_gpus: 4,
            ..Default::default()
        };
        assert_eq!(
            HardwareRequirement::from_offer(&req.to_offer()).unwrap(),
            req
        );
        assert!(HardwareRequirement::from_offer("").unwrap().is_empty());
        assert!(HardwareRequirement::from_offer("cpu").unwrap().is_empty());
        assert!(HardwareRequirement::from_offer("{bad").is_err());
        let inv = Inventory::default();
        assert!(req.check_inventory(&inv).unwrap_err().contains("4 GPU(s)"));
        let bad = HardwareRequirement {
            min_verified_tflops: [("f64".to_string(), 1.0)].into(),
            ..Default::default()
        };
        assert!(bad.validate().unwrap_err().contains("f64"));
    }

    #[test]
    fn a_cpu_posing_as_an_a100_and_a_false_time_report_are_flagged() {
        let rec = record("NVIDIA A100-SXM4-80GB", 0.04, true);
        let mut run = rec.runs[0].clone();
        let flags = flags_of(&rec.inventory, &run);
        assert!(
            flags[0].starts_with("claims_more_than_verified"),
            "{flags:?}"
        );
        run.devices[0].tflops = 15.0;
        run.measured_ms = 2000;
        run.reported_ms = 1;
        let flags = flags_of(&rec.inventory, &run);
        assert_eq!(flags.len(), 1);
        assert!(flags[0].starts_with("time_report"), "{flags:?}");
        run.reported_ms = 1900;
        assert!(flags_of(&rec.inventory, &run).is_empty());
    }

    #[test]
    fn value_is_quality_per_unit_of_cost_over_the_jobs_a_miner_was_scored_in() {
        let mut rec = HardwareRecord {
            inventory: Inventory {
                gpus: vec![Default::default(); 4],
                ..Default::default()
            },
            price_per_gpu_hour: 2.0,
            ..Default::default()
        };
        // Two half-hour jobs at qualities 1.2 and 0.8: 4 GPUs x 2 x 0.5 h = 4 per job.
        let v = value_of(&rec, &[(1.2, 1_800_000), (0.8, 1_800_000)]);
        assert_eq!(v.devices, 4);
        assert_eq!(v.jobs_scored, 2);
        assert!((v.mean_quality - 1.0).abs() < 1e-12, "{v:?}");
        assert!((v.cost_per_job - 4.0).abs() < 1e-12, "{v:?}");
        assert!((v.quality_per_cost - 0.25).abs() < 1e-12, "{v:?}");
        // Unpriced or never scored: no value to rank by.
        assert_eq!(value_of(&rec, &[]).quality_per_cost, 0.0);
        rec.price_per_gpu_hour = 0.0;
        assert_eq!(value_of(&rec, &[(1.0, 60_000)]).quality_per_cost, 0.0);
        // A CPU miner is paid for one device.
        rec.inventory.gpus.clear();
        assert_eq!(value_of(&rec, &[]).devices, 1);
    }
}
