//! Choosing the compute device from a string.

use candle_core::Device;

use crate::error::MlError;

/// Parses `"cpu"`, `"cuda"` or `"cuda:N"`. CUDA needs the crate's `cuda` feature.
pub fn parse_device(s: &str) -> Result<Device, MlError> {
    let spec = s.trim().to_ascii_lowercase();
    let err = |problem: String| MlError::Device {
        spec: s.to_string(),
        problem,
    };
    if spec == "cpu" {
        return Ok(Device::Cpu);
    }
    let ordinal = if spec == "cuda" {
        0
    } else if let Some(n) = spec.strip_prefix("cuda:") {
        n.parse::<usize>()
            .map_err(|_| err(format!("{n:?} is not a GPU number; write e.g. cuda:0")))?
    } else {
        return Err(err("unknown device; use \"cpu\" or \"cuda:N\"".into()));
    };
    cuda_device(ordinal).map_err(err)
}

#[cfg(feature = "cuda")]
fn cuda_device(ordinal: usize) -> Result<Device, String> {
    Device::new_cuda(ordinal).map_err(|e| format!("cannot open CUDA device {ordinal}: {e}"))
}

#[cfg(not(feature = "cuda"))]
fn cuda_device(_ordinal: usize) -> Result<Device, String> {
    Err("this build has no CUDA support; rebuild with the `cuda` feature or use \"cpu\"".into())
}
