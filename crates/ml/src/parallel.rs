//! Collectives: the one interface through which data-parallel training sums gradients
//! and tensor-parallel models sum partial results across devices.
//!
//! A [`Collective`] is made once for a group of `world` ranks; each rank joins from its
//! own thread with [`Collective::join`] and then calls [`RankComm::all_reduce_sum`] in
//! lock step with the others (every rank the same calls, in the same order, with tensors
//! of the same shapes). Two implementations:
//!
//! * [`ThreadCollective`]: ranks are threads of one process on any devices (logical CPU
//!   devices in tests, or GPUs without NCCL); the sum goes through host memory and is
//!   added in rank order, so every rank gets bit-identical results.
//! * `NcclCollective` (the `nccl` feature): ranks are CUDA devices of one process; the sum
//!   is NCCL's all-reduce on each device's stream, as in multi-GPU PyTorch.

use std::sync::{Arc, Condvar, Mutex};

use candle_core::{DType, Device, Tensor};

use crate::error::MlError;

/// A group of ranks that can sum tensors across themselves.
pub trait Collective: Send + Sync {
    /// Ranks in the group.
    fn world(&self) -> usize;
    /// Joins the group as `rank`, whose tensors live on `device`. Called once per rank,
    /// from the thread that will use the handle; may block until every rank has joined.
    fn join(&self, rank: usize, device: &Device) -> Result<Box<dyn RankComm>, MlError>;
    /// What it is, for logs: "threads" or "nccl".
    fn kind(&self) -> &'static str;
}

/// One rank's handle on its group.
pub trait RankComm {
    /// This rank.
    fn rank(&self) -> usize;
    /// Ranks in the group.
    fn world(&self) -> usize;
    /// The element-wise sum over every rank of each tensor (f32), on this rank's device.
    /// Every rank must call it with the same number of tensors and the same shapes.
    fn all_reduce_sum(&mut self, tensors: &[Tensor]) -> Result<Vec<Tensor>, MlError>;
    /// Called once by a rank that stops on an error of its own, in place of its next
    /// collective call: the other ranks' pending or next call then fails instead of
    /// waiting for it. (Threads: exact. NCCL: a no-op; a failed GPU leaves its peers
    /// waiting in NCCL, as in PyTorch without a watchdog.)
    fn abort(&mut self) {}
}

fn comm_err(what: &str, e: impl std::fmt::Display) -> MlError {
    MlError::Invalid(format!("collective {what}: {e}"))
}

/// Threads of one process, summing through host memory.
pub struct ThreadCollective {
    shared: Arc<ThreadShared>,
}

struct ThreadShared {
    world: usize,
    round: Mutex<Round>,
    wake: Condvar,
}

/// One rendezvous: what each rank brought, and the last completed round's sum.
#[derive(Default)]
struct Round {
    /// Completed rounds.
    generation: u64,
    deposits: Vec<Option<Vec<Tensor>>>,
    arrived: usize,
    /// The sum of the last completed round (`Err` when its tensors did not match).
    result: Option<Arc<Result<Vec<Tensor>, String>>>,
    /// A rank aborted: every call fails from now on.
    broken: bool,
}

impl ThreadCollective {
    /// A group of `world` ranks (at least 1).
    pub fn new(world: usize) -> ThreadCollective {
        let world = world.max(1);
        ThreadCollective {
            shared: Arc::new(ThreadShared {
                world,
                round: Mutex::new(Round {
                    deposits: vec![None; world],
                    ..Default::default()
                }),
                wake: Condvar::new(),
            }),
        }
    }
}

impl Collective for ThreadCollective {
    fn world(&self) -> usize {
        self.shared.world
    }

    fn join(&self, rank: usize, device: &Device) -> Result<Box<dyn RankComm>, MlError> {
        if rank >= self.shared.world {
            return Err(comm_err(
                "join",
                format!("rank {rank} in a group of {}", self.shared.world),
            ));
        }
        Ok(Box::new(ThreadRank {
            rank,
            device: device.clone(),
            shared: self.shared.clone(),
        }))
    }

    fn kind(&self) -> &'static str {
        "threads"
    }
}

struct ThreadRank {
    rank: usize,
    device: Device,
    shared: Arc<ThreadShared>,
}

/// The element-wise sums of every rank's tensors, added in rank order.
fn sum_in_rank_order(deposits: &[Option<Vec<Tensor>>]) -> Result<Vec<Tensor>, String> {
    let mut acc: Option<Vec<Tensor>> = None;
    for (r, d) in deposits.iter().enumerate() {
        let d = d
            .as_ref()
            .ok_or_else(|| format!("rank {r} brought nothing"))?;
        acc = Some(match acc {
            None => d.clone(),
            Some(a) if a.len() != d.len() => {
                return Err(format!(
                    "rank {r} brought {} tensors where rank 0 brought {}",
                    d.len(),
                    a.len()
                ));
            }
            Some(a) => a
                .iter()
                .zip(d)
                .map(|(x, y)| x + y)
                .collect::<candle_core::Result<Vec<_>>>()
                .map_err(|e| format!("rank {r}: {e}"))?,
        });
    }
    acc.ok_or_else(|| "an empty group".into())
}

impl RankComm for ThreadRank {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world(&self) -> usize {
        self.shared.world
    }

    fn abort(&mut self) {
        let sh = &self.shared;
        if let Ok(mut round) = sh.round.lock() {
            round.broken = true;
        }
        sh.wake.notify_all();
    }

    fn all_reduce_sum(&mut self, tensors: &[Tensor]) -> Result<Vec<Tensor>, MlError> {
        let sh = &self.shared;
        if sh.world == 1 {
            return Ok(tensors.to_vec());
        }
        let host = tensors
            .iter()
            .map(|t| t.to_dtype(DType::F32)?.to_device(&Device::Cpu))
            .collect::<candle_core::Result<Vec<_>>>();
        let host = match host {
            Ok(h) => h,
            Err(e) => {
                self.abort();
                return Err(comm_err("all-reduce", e));
            }
        };
        let broken = || {
            comm_err(
                "all-reduce",
                "another rank of the group failed, so this one stops too",
            )
        };
        let mut round = sh
            .round
            .lock()
            .map_err(|_| comm_err("all-reduce", "poisoned"))?;
        if round.broken {
            return Err(broken());
        }
        let generation = round.generation;
        round.deposits[self.rank] = Some(host);
        round.arrived += 1;
        if round.arrived == sh.world {
            // The last to arrive adds up (in rank order: identical bits for every rank).
            let result = sum_in_rank_order(&round.deposits);
            round.result = Some(Arc::new(result));
            round.deposits.iter_mut().for_each(|d| *d = None);
            round.arrived = 0;
            round.generation += 1;
            sh.wake.notify_all();
        } else {
            while round.generation == generation && !round.broken {
                round = sh
                    .wake
                    .wait(round)
                    .map_err(|_| comm_err("all-reduce", "poisoned"))?;
            }
            if round.generation == generation {
                return Err(broken());
            }
        }
        // Each rank reads this round's result before it can deposit for the next one, and
        // the next result is only written once every rank has deposited again.
        let result = round.result.clone().ok_or_else(broken)?;
        drop(round);
        match result.as_ref() {
            // Back on this rank's device, in each tensor's own dtype.
            Ok(sum) => sum
                .iter()
                .zip(tensors)
                .map(|(s, t)| s.to_dtype(t.dtype())?.to_device(&self.device))
                .collect::<candle_core::Result<Vec<_>>>()
                .map_err(|e| comm_err("all-reduce", e)),
            Err(e) => Err(comm_err("all-reduce", e)),
        }
    }
}

#[cfg(feature = "nccl")]
pub use nccl::NcclCollective;

#[cfg(feature = "nccl")]
mod nccl {
    use super::*;
    use candle_core::cuda_backend::cudarc::nccl::safe::{Comm, Id, ReduceOp};
    use candle_core::{CpuStorage, CudaStorage, CustomOp1, Layout, Shape};

    /// CUDA devices of one process, summing with NCCL's all-reduce.
    pub struct NcclCollective {
        world: usize,
        id: Id,
    }

    impl NcclCollective {
        /// A group of `world` CUDA ranks.
        pub fn new(world: usize) -> Result<NcclCollective, MlError> {
            let id = Id::new().map_err(|e| comm_err("NCCL id", format!("{e:?}")))?;
            Ok(NcclCollective {
                world: world.max(1),
                id,
            })
        }
    }

    impl Collective for NcclCollective {
        fn world(&self) -> usize {
            self.world
        }

        fn join(&self, rank: usize, device: &Device) -> Result<Box<dyn RankComm>, MlError> {
            let cuda = device
                .as_cuda_device()
                .map_err(|e| comm_err("NCCL join", e))?;
            let comm = Comm::from_rank(cuda.cuda_stream(), rank, self.world, self.id)
                .map_err(|e| comm_err("NCCL join", format!("{e:?}")))?;
            Ok(Box::new(NcclRank {
                rank,
                world: self.world,
                comm,
            }))
        }

        fn kind(&self) -> &'static str {
            "nccl"
        }
    }

    struct NcclRank {
        rank: usize,
        world: usize,
        comm: Comm,
    }

    struct AllReduce<'a>(&'a Comm);

    impl CustomOp1 for AllReduce<'_> {
        fn name(&self) -> &'static str {
            "nccl-all-reduce"
        }

        fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
            candle_core::bail!("NCCL all-reduce needs tensors on a CUDA device")
        }

        fn cuda_fwd(
            &self,
            s: &CudaStorage,
            l: &Layout,
        ) -> candle_core::Result<(CudaStorage, Shape)> {
            let n = l.shape().elem_count();
            let dev = s.device.clone();
            let src = s.as_cuda_slice::<f32>()?;
            let src = match l.contiguous_offsets() {
                Some((a, b)) => src.slice(a..b),
                None => candle_core::bail!("NCCL all-reduce needs a contiguous tensor"),
            };
            let mut dst = dev.alloc_zeros::<f32>(n)?;
            self.0
                .all_reduce(&src, &mut dst, &ReduceOp::Sum)
                .map_err(|e| candle_core::Error::Msg(format!("NCCL all-reduce: {e:?}")))?;
            Ok((CudaStorage::wrap_cuda_slice(dst, dev), l.shape().clone()))
        }
    }

    impl RankComm for NcclRank {
        fn rank(&self) -> usize {
            self.rank
        }

        fn world(&self) -> usize {
            self.world
        }

        fn all_reduce_sum(&mut self, tensors: &[Tensor]) -> Result<Vec<Tensor>, MlError> {
            tensors
                .iter()
                .map(|t| {
                    t.to_dtype(DType::F32)?
                        .contiguous()?
                        .apply_op1_no_bwd(&AllReduce(&self.comm))?
                        .to_dtype(t.dtype())
                })
                .collect::<candle_core::Result<Vec<_>>>()
                .map_err(|e| comm_err("NCCL all-reduce", e))
        }
    }
}

/// The collective for a group of devices: NCCL when every device is a GPU and the build
/// has the `nccl` feature, threads otherwise.
pub fn collective_for(devices: &[Device]) -> Result<Arc<dyn Collective>, MlError> {
    #[cfg(feature = "nccl")]
    if devices.len() > 1 && devices.iter().all(|d| d.is_cuda()) {
        return Ok(Arc::new(nccl::NcclCollective::new(devices.len())?));
    }
    Ok(Arc::new(ThreadCollective::new(devices.len())))
}
