//! Where a part computes: the CPU, or a GPU through candle's CUDA backend when this crate is
//! built with its `cuda` feature (`lsplit serve --device cuda[:N]` runs the trunk there).

use std::fmt;
use std::str::FromStr;

use candle_core::{Device, DeviceLocation};

use crate::{ModelError, Result};

/// A compute device as a command line names it: `cpu`, `cuda` (the first GPU) or `cuda:N`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ComputeDevice {
    /// The CPU cores, with this crate's own kernels.
    #[default]
    Cpu,
    /// The CUDA GPU of this ordinal.
    Cuda(usize),
}

impl ComputeDevice {
    /// Whether this build can run parts on a GPU (the `cuda` feature).
    pub const CUDA_BUILT: bool = cfg!(feature = "cuda");

    /// Opens the device: a CUDA context on the GPU, once per call (candle shares nothing
    /// between two opened devices, so open it once and clone the [`Device`]).
    pub fn open(self) -> Result<Device> {
        match self.available()? {
            Self::Cpu => Ok(Device::Cpu),
            Self::Cuda(ordinal) => Device::new_cuda(ordinal).map_err(|e| {
                ModelError::Config(format!("cannot open the GPU cuda:{ordinal}: {e}"))
            }),
        }
    }

    /// This device, if this build can compute on it (a GPU needs the `cuda` feature).
    pub fn available(self) -> Result<Self> {
        match self {
            Self::Cuda(_) if !Self::CUDA_BUILT => Err(ModelError::CudaNotBuilt),
            device => Ok(device),
        }
    }

    /// The device a candle [`Device`] is, for reports and the handshake.
    pub fn of(device: &Device) -> Self {
        match device.location() {
            DeviceLocation::Cuda { gpu_id } => Self::Cuda(gpu_id),
            DeviceLocation::Cpu | DeviceLocation::Metal { .. } => Self::Cpu,
        }
    }
}

impl fmt::Display for ComputeDevice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Cpu => f.write_str("cpu"),
            Self::Cuda(ordinal) => write!(f, "cuda:{ordinal}"),
        }
    }
}

impl FromStr for ComputeDevice {
    type Err = ModelError;

    fn from_str(s: &str) -> Result<Self> {
        let bad = || {
            ModelError::Config(format!(
                "unknown device {s:?}: expected cpu, cuda or cuda:N (N the GPU's ordinal)"
            ))
        };
        match s.split_once(':') {
            None if s == "cpu" => Ok(Self::Cpu),
            None if s == "cuda" => Ok(Self::Cuda(0)),
            Some(("cuda", n)) if !n.starts_with('+') => {
                n.parse().map(Self::Cuda).map_err(|_| bad())
            }
            _ => Err(bad()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse_and_print_back() {
        for (text, device, shown) in [
            ("cpu", ComputeDevice::Cpu, "cpu"),
            ("cuda", ComputeDevice::Cuda(0), "cuda:0"),
            ("cuda:0", ComputeDevice::Cuda(0), "cuda:0"),
            ("cuda:3", ComputeDevice::Cuda(3), "cuda:3"),
        ] {
            assert_eq!(text.parse::<ComputeDevice>().unwrap(), device);
            assert_eq!(device.to_string(), shown);
        }
        for bad in [
            "", "gpu", "CUDA", "cuda:", "cuda:x", "cuda:-1", "cuda:+1", "cpu:0", "cuda:1:2",
        ] {
            let err = bad.parse::<ComputeDevice>().unwrap_err().to_string();
            assert_eq!(
                err,
                format!(
                    "model configuration: unknown device {bad:?}: expected cpu, cuda or cuda:N \
                     (N the GPU's ordinal)"
                )
            );
        }
    }

    #[test]
    fn the_cpu_opens_and_is_named_back() {
        let device = ComputeDevice::Cpu.open().unwrap();
        assert!(device.is_cpu());
        assert_eq!(ComputeDevice::of(&device), ComputeDevice::Cpu);
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn a_gpu_without_the_feature_is_a_clear_error() {
        let err = ComputeDevice::Cuda(0).open().unwrap_err().to_string();
        assert_eq!(
            err,
            "this lsplit was built without the `cuda` feature; see scripts/build-cuda.sh"
        );
    }
}
