//! A miner's devices as job slots: one slot per configured device (`devices = ["cuda:0",
//! "cuda:1"]`, `["auto"]` for every GPU of the inventory, `["cpu:0", "cpu:1"]` for logical
//! CPU slots). A job is placed on the free slot with the most free memory that its
//! estimate fits; several jobs run at once on different slots; the status says which job
//! runs where.

use std::sync::Mutex;
use tunenet_hw::Inventory;
use tunenet_types::JobId;

/// One slot.
#[derive(Clone, Debug)]
pub struct Slot {
    /// As configured: `cpu`, `cpu:1`, `cuda:0`.
    pub name: String,
    /// The device the job's tensors live on.
    pub device: tunenet_ml::Device,
    /// Memory the slot offers a job, bytes (a GPU's free memory when the miner started;
    /// None on CPUs, where the policy's own memory bound applies).
    pub memory_bytes: Option<u64>,
    /// The job running on it.
    pub job: Option<JobId>,
}

/// The miner's slots.
#[derive(Debug)]
pub struct DevicePool {
    slots: Mutex<Vec<Slot>>,
    /// One job per slot (`devices` given); otherwise the single `device` is shared by
    /// every job the policy accepts, as before slots existed.
    exclusive: bool,
    /// Jobs on the shared device.
    shared: Mutex<Vec<JobId>>,
}

impl DevicePool {
    /// The slots `devices` names (empty: the single `device`). `auto` means every GPU of
    /// `inventory`, or the CPU where it lists none. Errors name the entry that is wrong.
    pub fn new(
        devices: &[String],
        device: &str,
        inventory: &Inventory,
    ) -> Result<DevicePool, String> {
        let names: Vec<String> = match devices {
            [] => vec![device.to_string()],
            [one] if one == "auto" => {
                if inventory.gpus.is_empty() {
                    vec!["cpu".into()]
                } else {
                    inventory
                        .gpus
                        .iter()
                        .map(|g| format!("cuda:{}", g.index))
                        .collect()
                }
            }
            list => list.to_vec(),
        };
        let mut slots = Vec::new();
        for name in names {
            if slots.iter().any(|s: &Slot| s.name == name) {
                return Err(format!("`devices`: `{name}` is listed twice"));
            }
            let (device, memory_bytes) = if name == "cpu" || name.starts_with("cpu:") {
                let n = name.strip_prefix("cpu:").unwrap_or("0");
                n.parse::<u32>().map_err(|_| {
                    format!("`devices`: `{name}`: a logical CPU slot is `cpu` or `cpu:N`")
                })?;
                (tunenet_ml::Device::Cpu, None)
            } else if name == "auto" {
                return Err("`devices`: `auto` stands alone (every GPU of the box)".into());
            } else {
                let d = tunenet_ml::parse_device(&name)
                    .map_err(|e| format!("`devices`: `{name}`: {e}"))?;
                let index: Option<u32> = name.strip_prefix("cuda:").and_then(|i| i.parse().ok());
                let free = index
                    .and_then(|i| inventory.gpus.iter().find(|g| g.index == i))
                    .map(|g| g.memory_free_bytes);
                (d, free)
            };
            slots.push(Slot {
                name,
                device,
                memory_bytes,
                job: None,
            });
        }
        Ok(DevicePool {
            slots: Mutex::new(slots),
            exclusive: !devices.is_empty(),
            shared: Mutex::new(Vec::new()),
        })
    }

    /// The first slot's device (what memory estimates resolve `auto` precision against).
    pub fn first_device(&self) -> tunenet_ml::Device {
        self.lock()[0].device.clone()
    }

    /// Whether each slot takes one job at a time.
    pub fn exclusive(&self) -> bool {
        self.exclusive
    }

    /// How many slots there are.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether there are none (never, once built).
    pub fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Slot>> {
        self.slots.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether a job needing `need` bytes fits some slot now (free, with the memory).
    pub fn fits(&self, need: Option<u64>) -> Result<(), String> {
        if !self.exclusive {
            return Ok(());
        }
        pick(&self.lock(), need).map(|_| ())
    }

    /// Places `job` on the free slot with the most memory that fits `need`; returns the
    /// slot's name and device, or why no slot can take it.
    pub fn place(
        &self,
        job: &JobId,
        need: Option<u64>,
    ) -> Result<(String, tunenet_ml::Device), String> {
        let mut slots = self.lock();
        if !self.exclusive {
            let mut shared = self.shared.lock().unwrap_or_else(|e| e.into_inner());
            if !shared.contains(job) {
                shared.push(job.clone());
            }
            return Ok((slots[0].name.clone(), slots[0].device.clone()));
        }
        if let Some(s) = slots.iter().find(|s| s.job.as_ref() == Some(job)) {
            return Ok((s.name.clone(), s.device.clone()));
        }
        let i = pick(&slots, need)?;
        slots[i].job = Some(job.clone());
        Ok((slots[i].name.clone(), slots[i].device.clone()))
    }

    /// Places `job` on up to `want` free slots at once (at least one), each fitting
    /// `need` (every data-parallel replica holds the whole model), the ones with the most
    /// memory first; returns their names and devices, the first leading. With a shared
    /// device, or `want` 1, this is [`DevicePool::place`].
    pub fn place_group(
        &self,
        job: &JobId,
        need: Option<u64>,
        want: usize,
    ) -> Result<Vec<(String, tunenet_ml::Device)>, String> {
        if !self.exclusive || want <= 1 {
            return self.place(job, need).map(|one| vec![one]);
        }
        let mut slots = self.lock();
        let held: Vec<usize> = (0..slots.len())
            .filter(|i| slots[*i].job.as_ref() == Some(job))
            .collect();
        if !held.is_empty() {
            return Ok(held
                .iter()
                .map(|i| (slots[*i].name.clone(), slots[*i].device.clone()))
                .collect());
        }
        let mut group = Vec::new();
        while group.len() < want {
            match pick(&slots, need) {
                Ok(i) => {
                    slots[i].job = Some(job.clone());
                    group.push(i);
                }
                Err(e) if group.is_empty() => return Err(e),
                Err(_) => break,
            }
        }
        Ok(group
            .iter()
            .map(|i| (slots[*i].name.clone(), slots[*i].device.clone()))
            .collect())
    }

    /// Frees `job`'s slot, if it holds one.
    pub fn release(&self, job: &JobId) {
        self.shared
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|j| j != job);
        for s in self.lock().iter_mut() {
            if s.job.as_ref() == Some(job) {
                s.job = None;
            }
        }
    }

    /// The slot `job` runs on (`cuda:0+cuda:1` for a data-parallel group).
    pub fn slot_of(&self, job: &JobId) -> Option<String> {
        if !self.exclusive {
            let on = self
                .shared
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .contains(job);
            return on.then(|| self.lock()[0].name.clone());
        }
        let names: Vec<String> = self
            .lock()
            .iter()
            .filter(|s| s.job.as_ref() == Some(job))
            .map(|s| s.name.clone())
            .collect();
        (!names.is_empty()).then(|| names.join("+"))
    }

    /// Every slot: its name and the job on it.
    pub fn slots(&self) -> Vec<(String, Option<JobId>)> {
        self.lock()
            .iter()
            .map(|s| (s.name.clone(), s.job.clone()))
            .collect()
    }
}

/// What one training run on a base model showed: tokens per optimiser step and tokens per
/// second per device (a data-parallel run's throughput divided by its devices).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Throughput {
    pub tokens_per_step: f64,
    pub tokens_per_sec_per_device: f64,
}

/// Devices a job of `steps` optimiser steps needs to finish within `secs`, at `seen`
/// (the last run on the same base model; scaling taken as linear in the devices), between
/// 1 and `most`. With nothing seen yet, `most`: an unknown job gets every device it may.
pub fn devices_for_budget(steps: usize, seen: Option<Throughput>, secs: f64, most: usize) -> usize {
    let most = most.max(1);
    let Some(t) = seen else { return most };
    if !(t.tokens_per_sec_per_device > 0.0 && t.tokens_per_step > 0.0) {
        return most;
    }
    if secs <= 0.0 {
        return most;
    }
    let one_device_secs = steps as f64 * t.tokens_per_step / t.tokens_per_sec_per_device;
    ((one_device_secs / secs).ceil() as usize).clamp(1, most)
}

/// Opens each device a list names (`cpu`, `cpu:N` for a logical CPU device, `cuda:N`);
/// the error names the config key and the entry that is wrong.
pub fn parse_device_list(names: &[String], key: &str) -> Result<Vec<tunenet_ml::Device>, String> {
    names
        .iter()
        .map(|name| {
            if let Some(n) = name.strip_prefix("cpu:") {
                n.parse::<u32>()
                    .map(|_| tunenet_ml::Device::Cpu)
                    .map_err(|_| {
                        format!("`{key}`: `{name}`: a logical CPU device is `cpu` or `cpu:N`")
                    })
            } else {
                tunenet_ml::parse_device(name).map_err(|e| format!("`{key}`: `{name}`: {e}"))
            }
        })
        .collect()
}

/// The free slot with the most memory that fits `need` (unknown memory fits any need).
fn pick(slots: &[Slot], need: Option<u64>) -> Result<usize, String> {
    let free: Vec<usize> = (0..slots.len())
        .filter(|i| slots[*i].job.is_none())
        .collect();
    if free.is_empty() {
        return Err(format!(
            "every device is busy ({})",
            slots
                .iter()
                .map(|s| format!(
                    "{}: {}",
                    s.name,
                    s.job.as_ref().map(|j| j.as_str()).unwrap_or("-")
                ))
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    let fits = |i: &usize| match (need, slots[*i].memory_bytes) {
        (Some(n), Some(m)) => n <= m,
        _ => true,
    };
    free.iter()
        .copied()
        .filter(fits)
        .max_by_key(|i| slots[*i].memory_bytes.unwrap_or(u64::MAX))
        .ok_or_else(|| {
            format!(
                "the job needs about {:.1} GiB; the free devices have {}",
                need.unwrap_or(0) as f64 / (1u64 << 30) as f64,
                free.iter()
                    .map(|i| format!(
                        "{} {:.1} GiB",
                        slots[*i].name,
                        slots[*i].memory_bytes.unwrap_or(0) as f64 / (1u64 << 30) as f64
                    ))
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(s: &str) -> JobId {
        JobId::new(s).unwrap()
    }

    #[test]
    fn logical_cpu_slots_take_one_job_each_and_free_on_release() {
        let pool = DevicePool::new(
            &["cpu:0".into(), "cpu:1".into()],
            "cpu",
            &Inventory::default(),
        )
        .unwrap();
        assert_eq!(pool.len(), 2);
        let (a, _) = pool.place(&job("a"), None).unwrap();
        let (b, _) = pool.place(&job("b"), None).unwrap();
        assert_ne!(a, b, "two jobs at once on two devices");
        // Placing the same job again keeps its slot.
        assert_eq!(pool.place(&job("a"), None).unwrap().0, a);
        let busy = pool.place(&job("c"), None).unwrap_err();
        assert!(
            busy.contains("every device is busy") && busy.contains("a"),
            "{busy}"
        );
        pool.release(&job("a"));
        assert_eq!(pool.place(&job("c"), None).unwrap().0, a);
        assert_eq!(pool.slot_of(&job("b")).as_deref(), Some(b.as_str()));
    }

    #[test]
    fn jobs_go_where_their_memory_estimate_fits() {
        let mut pool = DevicePool::new(
            &["cpu:0".into(), "cpu:1".into()],
            "cpu",
            &Inventory::default(),
        )
        .unwrap();
        // Two GPUs' worth of free memory: 10 GiB and 40 GiB.
        {
            let slots = pool.slots.get_mut().unwrap();
            slots[0].memory_bytes = Some(10 << 30);
            slots[1].memory_bytes = Some(40 << 30);
        }
        // A 20 GiB job fits only the second; a 5 GiB job then takes the first.
        assert_eq!(pool.place(&job("big"), Some(20 << 30)).unwrap().0, "cpu:1");
        assert_eq!(pool.place(&job("small"), Some(5 << 30)).unwrap().0, "cpu:0");
        pool.release(&job("small"));
        let e = pool.place(&job("huge"), Some(60 << 30)).unwrap_err();
        assert!(
            e.contains("needs about 60.0 GiB") && e.contains("cpu:0 10.0 GiB"),
            "{e}"
        );
        assert!(pool.fits(Some(1 << 30)).is_ok());
    }

    #[test]
    fn a_data_parallel_job_takes_a_group_of_free_slots() {
        let pool = DevicePool::new(
            &["cpu:0".into(), "cpu:1".into(), "cpu:2".into()],
            "cpu",
            &Inventory::default(),
        )
        .unwrap();
        let g = pool.place_group(&job("dp"), None, 2).unwrap();
        assert_eq!(g.len(), 2);
        assert_eq!(pool.slot_of(&job("dp")).unwrap().split('+').count(), 2);
        // Asking again keeps the same group.
        assert_eq!(pool.place_group(&job("dp"), None, 2).unwrap().len(), 2);
        // Only one slot is left: a second group job gets what is free.
        assert_eq!(pool.place_group(&job("b"), None, 2).unwrap().len(), 1);
        let e = pool.place_group(&job("c"), None, 2).unwrap_err();
        assert!(e.contains("every device is busy"), "{e}");
        pool.release(&job("dp"));
        assert_eq!(pool.place_group(&job("c"), None, 4).unwrap().len(), 2);
        assert_eq!(pool.slot_of(&job("dp")), None);
    }

    #[test]
    fn a_job_takes_as_many_devices_as_its_budget_needs() {
        let seen = Some(Throughput {
            tokens_per_step: 1000.0,
            tokens_per_sec_per_device: 500.0,
        });
        // 100 steps at 2 s a step on one device: 200 s.
        assert_eq!(devices_for_budget(100, seen, 250.0, 4), 1);
        assert_eq!(devices_for_budget(100, seen, 120.0, 4), 2);
        assert_eq!(devices_for_budget(100, seen, 60.0, 4), 4);
        assert_eq!(
            devices_for_budget(100, seen, 10.0, 4),
            4,
            "never more than allowed"
        );
        assert_eq!(
            devices_for_budget(100, None, 250.0, 3),
            3,
            "unknown: all it may"
        );
        assert_eq!(devices_for_budget(100, seen, 0.0, 2), 2);
    }

    #[test]
    fn a_single_device_is_shared_by_every_job_as_before() {
        let pool = DevicePool::new(&[], "cpu", &Inventory::default()).unwrap();
        assert!(!pool.exclusive());
        assert_eq!(pool.place(&job("a"), None).unwrap().0, "cpu");
        assert_eq!(pool.place(&job("b"), None).unwrap().0, "cpu");
        assert_eq!(pool.slot_of(&job("a")).as_deref(), Some("cpu"));
        pool.release(&job("a"));
        assert_eq!(pool.slot_of(&job("a")), None);
    }

    #[test]
    fn auto_means_every_gpu_or_the_cpu_and_bad_entries_are_named() {
        let pool = DevicePool::new(&["auto".into()], "cpu", &Inventory::default()).unwrap();
        assert_eq!(pool.slots(), vec![("cpu".to_string(), None)]);
        let pool = DevicePool::new(&[], "cpu", &Inventory::default()).unwrap();
        assert_eq!(pool.len(), 1);
        let e = DevicePool::new(&["cpu:x".into()], "cpu", &Inventory::default()).unwrap_err();
        assert!(e.contains("cpu:x"), "{e}");
        let e = DevicePool::new(
            &["cpu:0".into(), "cpu:0".into()],
            "cpu",
            &Inventory::default(),
        )
        .unwrap_err();
        assert!(e.contains("twice"), "{e}");
        let e = DevicePool::new(&["cpu".into(), "auto".into()], "cpu", &Inventory::default())
            .unwrap_err();
        assert!(e.contains("auto"), "{e}");
    }
}
