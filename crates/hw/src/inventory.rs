//! What this box has: the CPU (model, cores, vector extensions), memory, and every NVIDIA
//! GPU the driver reports through NVML. NVML is loaded at run time, so a machine without
//! the driver builds and runs this and reports no GPU, with the reason.
//!
//! Everything here is self-declared: a validator stores it and shows it, but trusts only
//! the benchmark it verifies itself ([`crate::bench`]).

use serde::{Deserialize, Serialize};

/// The CPU, as the operating system describes it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct CpuInfo {
    /// Model name (`/proc/cpuinfo`'s `model name`), or the architecture when unknown.
    pub model: String,
    /// Logical cores this process may use.
    pub logical_cores: u32,
    /// Vector extensions the matrix kernels use: `avx2`, `avx512f`, `fma`, `neon`.
    pub features: Vec<String>,
}

/// One NVIDIA GPU, as NVML reports it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct GpuInfo {
    /// NVML's index (the CUDA ordinal when `CUDA_DEVICE_ORDER=PCI_BUS_ID`).
    pub index: u32,
    /// E.g. `NVIDIA A100-SXM4-80GB`.
    pub name: String,
    /// `GPU-…`, stable across reboots.
    pub uuid: String,
    pub memory_total_bytes: u64,
    pub memory_free_bytes: u64,
    /// CUDA compute capability, e.g. `8.0`.
    pub compute_capability: String,
    /// Enforced power limit, watts (absent where NVML does not report one).
    pub power_limit_w: Option<f64>,
    /// Active NVLink links (0 on PCIe-only cards).
    pub nvlink_links: u32,
}

/// The whole inventory of a box.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Inventory {
    pub cpu: CpuInfo,
    pub memory_total_bytes: u64,
    pub memory_available_bytes: u64,
    pub gpus: Vec<GpuInfo>,
    /// NVIDIA driver version, when NVML loaded.
    pub driver_version: Option<String>,
    /// Highest CUDA version the driver supports, e.g. `12.4`.
    pub cuda_version: Option<String>,
    /// Why no GPU is listed, when NVML could not be used (no driver, no permission).
    pub nvml_error: Option<String>,
}

/// Longest strings kept from NVML or the OS (inventories travel in signed adverts).
const MAX_FIELD: usize = 128;
/// Most GPUs listed (NVML supports far fewer per box).
pub const MAX_GPUS: usize = 64;

fn clip(s: &str) -> String {
    s.chars().take(MAX_FIELD).collect()
}

impl Inventory {
    /// This machine's inventory: the CPU and memory from the OS, GPUs through NVML.
    pub fn collect() -> Inventory {
        Self::collect_with_nvml(None)
    }

    /// As [`Inventory::collect`], loading NVML from `nvml_library` when given (tests
    /// point it at a path that does not exist to see the no-driver report).
    pub fn collect_with_nvml(nvml_library: Option<&std::path::Path>) -> Inventory {
        let (memory_total_bytes, memory_available_bytes) = memory();
        let mut inv = Inventory {
            cpu: cpu(),
            memory_total_bytes,
            memory_available_bytes,
            ..Default::default()
        };
        match nvml(nvml_library) {
            Ok(n) => {
                inv.gpus = n.gpus;
                inv.driver_version = Some(n.driver_version);
                inv.cuda_version = n.cuda_version;
            }
            Err(e) => inv.nvml_error = Some(e),
        }
        inv
    }

    /// Whether `other` describes the same hardware: the same CPU, memory size, driver, and
    /// GPUs (by UUID, name, memory size and compute capability, in order). What changes
    /// from moment to moment (free memory) does not count: a GPU that left the bus, a new
    /// card or a driver upgrade does.
    pub fn same_hardware(&self, other: &Inventory) -> bool {
        let gpu_key = |g: &GpuInfo| {
            (
                g.uuid.clone(),
                g.name.clone(),
                g.memory_total_bytes,
                g.compute_capability.clone(),
            )
        };
        self.cpu == other.cpu
            && self.memory_total_bytes == other.memory_total_bytes
            && self.driver_version == other.driver_version
            && self.gpus.len() == other.gpus.len()
            && self
                .gpus
                .iter()
                .zip(&other.gpus)
                .all(|(a, b)| gpu_key(a) == gpu_key(b))
    }

    /// A one-line summary, e.g. `4x NVIDIA A100-SXM4-80GB (80 GiB), 64 cores, 503 GiB`.
    pub fn summary(&self) -> String {
        let gpus = if self.gpus.is_empty() {
            "no NVIDIA GPU".to_string()
        } else {
            let mut groups: Vec<(String, u64, usize)> = Vec::new();
            for g in &self.gpus {
                match groups
                    .iter_mut()
                    .find(|(n, m, _)| *n == g.name && *m == g.memory_total_bytes)
                {
                    Some(e) => e.2 += 1,
                    None => groups.push((g.name.clone(), g.memory_total_bytes, 1)),
                }
            }
            groups
                .iter()
                .map(|(n, m, c)| format!("{c}x {n} ({} GiB)", gib(*m)))
                .collect::<Vec<_>>()
                .join(" + ")
        };
        format!(
            "{gpus}; {} ({} cores); {} GiB memory",
            self.cpu.model,
            self.cpu.logical_cores,
            gib(self.memory_total_bytes)
        )
    }

    /// The inventory as an operator reads it (`tunenet hardware`).
    pub fn render(&self) -> String {
        let mut s = String::new();
        s.push_str(&format!(
            "CPU     {} ({} cores{})\n",
            self.cpu.model,
            self.cpu.logical_cores,
            if self.cpu.features.is_empty() {
                String::new()
            } else {
                format!("; {}", self.cpu.features.join(", "))
            }
        ));
        s.push_str(&format!(
            "Memory  {} GiB total, {} GiB available\n",
            gib(self.memory_total_bytes),
            gib(self.memory_available_bytes)
        ));
        match (&self.nvml_error, self.gpus.is_empty()) {
            (Some(e), _) => s.push_str(&format!("GPUs    none: {e}\n")),
            (None, true) => {
                s.push_str("GPUs    none: the NVIDIA driver loaded but reports no GPU\n")
            }
            (None, false) => {
                s.push_str(&format!(
                    "Driver  {} (CUDA {})\n",
                    self.driver_version.as_deref().unwrap_or("?"),
                    self.cuda_version.as_deref().unwrap_or("?")
                ));
                for g in &self.gpus {
                    s.push_str(&format!(
                        "GPU {}   {}  {}  {} GiB ({} GiB free)  compute {}  {}  NVLink {}\n",
                        g.index,
                        g.name,
                        g.uuid,
                        gib(g.memory_total_bytes),
                        gib(g.memory_free_bytes),
                        g.compute_capability,
                        g.power_limit_w
                            .map(|w| format!("{w:.0} W"))
                            .unwrap_or_else(|| "power limit ?".into()),
                        if g.nvlink_links == 0 {
                            "none".to_string()
                        } else {
                            format!("{} links", g.nvlink_links)
                        }
                    ));
                }
            }
        }
        s
    }

    /// Checks an inventory received from someone else: sizes bounded, names printable.
    pub fn validate(&self) -> Result<(), String> {
        if self.gpus.len() > MAX_GPUS {
            return Err(format!(
                "lists {} GPUs; at most {MAX_GPUS} are accepted",
                self.gpus.len()
            ));
        }
        let strings = std::iter::once(&self.cpu.model)
            .chain(self.cpu.features.iter())
            .chain(
                self.gpus
                    .iter()
                    .flat_map(|g| [&g.name, &g.uuid, &g.compute_capability]),
            )
            .chain(self.driver_version.iter())
            .chain(self.cuda_version.iter())
            .chain(self.nvml_error.iter());
        for s in strings {
            if s.chars().count() > MAX_FIELD * 4 || s.chars().any(|c| c.is_control()) {
                return Err(format!("has an overlong or unprintable field: {s:?}"));
            }
        }
        if self.cpu.features.len() > 32 {
            return Err("lists more than 32 CPU features".into());
        }
        Ok(())
    }
}

fn gib(b: u64) -> u64 {
    (b + (1 << 29)) >> 30
}

fn cpu() -> CpuInfo {
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name") || l.starts_with("Model"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| clip(v.trim()))
        })
        .unwrap_or_else(|| std::env::consts::ARCH.to_string());
    let logical_cores = std::thread::available_parallelism()
        .map(|n| n.get() as u32)
        .unwrap_or(1);
    CpuInfo {
        model,
        logical_cores,
        features: cpu_features(),
    }
}

#[cfg(target_arch = "x86_64")]
fn cpu_features() -> Vec<String> {
    let mut f = Vec::new();
    if std::arch::is_x86_feature_detected!("avx2") {
        f.push("avx2".to_string());
    }
    if std::arch::is_x86_feature_detected!("avx512f") {
        f.push("avx512f".to_string());
    }
    if std::arch::is_x86_feature_detected!("fma") {
        f.push("fma".to_string());
    }
    f
}

#[cfg(target_arch = "aarch64")]
fn cpu_features() -> Vec<String> {
    if std::arch::is_aarch64_feature_detected!("neon") {
        vec!["neon".to_string()]
    } else {
        vec![]
    }
}

#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
fn cpu_features() -> Vec<String> {
    vec![]
}

/// Total and available memory from `/proc/meminfo` (zeros where it cannot be read).
fn memory() -> (u64, u64) {
    let Ok(s) = std::fs::read_to_string("/proc/meminfo") else {
        return (0, 0);
    };
    let field = |name: &str| {
        s.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
            .map(|kib| kib * 1024)
            .unwrap_or(0)
    };
    (field("MemTotal:"), field("MemAvailable:"))
}

struct Nvml {
    gpus: Vec<GpuInfo>,
    driver_version: String,
    cuda_version: Option<String>,
}

fn nvml(library: Option<&std::path::Path>) -> Result<Nvml, String> {
    use nvml_wrapper::error::NvmlError;
    let init = match library {
        Some(p) => nvml_wrapper::Nvml::builder().lib_path(p.as_os_str()).init(),
        None => nvml_wrapper::Nvml::init(),
    };
    let nvml = init.map_err(|e| match e {
        NvmlError::LibloadingError(_) | NvmlError::LibraryNotFound => {
            "no NVIDIA driver found (libnvidia-ml could not be loaded)".to_string()
        }
        NvmlError::DriverNotLoaded => "the NVIDIA driver is installed but not loaded".to_string(),
        NvmlError::NoPermission => "no permission to talk to the NVIDIA driver".to_string(),
        other => format!("NVML failed to start: {other}"),
    })?;
    let driver_version = nvml
        .sys_driver_version()
        .map(|v| clip(&v))
        .map_err(|e| format!("NVML gave no driver version: {e}"))?;
    let cuda_version = nvml.sys_cuda_driver_version().ok().map(|v| {
        format!(
            "{}.{}",
            nvml_wrapper::cuda_driver_version_major(v),
            nvml_wrapper::cuda_driver_version_minor(v)
        )
    });
    let count = nvml
        .device_count()
        .map_err(|e| format!("NVML could not count GPUs: {e}"))?;
    let mut gpus = Vec::new();
    for index in 0..count.min(MAX_GPUS as u32) {
        let d = nvml
            .device_by_index(index)
            .map_err(|e| format!("NVML could not open GPU {index}: {e}"))?;
        let mem = d.memory_info().ok();
        let nvlink_links = (0..18u32)
            .filter(|&l| d.link_wrapper_for(l).is_active().unwrap_or(false))
            .count() as u32;
        gpus.push(GpuInfo {
            index,
            name: d
                .name()
                .map(|n| clip(&n))
                .unwrap_or_else(|_| "unknown".into()),
            uuid: d.uuid().map(|u| clip(&u)).unwrap_or_default(),
            memory_total_bytes: mem.as_ref().map(|m| m.total).unwrap_or(0),
            memory_free_bytes: mem.as_ref().map(|m| m.free).unwrap_or(0),
            compute_capability: d
                .cuda_compute_capability()
                .map(|c| format!("{}.{}", c.major, c.minor))
                .unwrap_or_default(),
            power_limit_w: d.enforced_power_limit().ok().map(|mw| mw as f64 / 1000.0),
            nvlink_links,
        });
    }
    Ok(Nvml {
        gpus,
        driver_version,
        cuda_version,
    })
}
