//! Choosing where the tensors live: `auto`, `cpu` or `cuda:N` from the config.

use candle_core::Device;

use crate::error::{Error, Result};

/// A parsed `[extract] device` value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceChoice {
    /// CUDA when built with it and a GPU is present, else the CPU.
    Auto,
    Cpu,
    Cuda(usize),
}

impl DeviceChoice {
    /// Parses "auto", "cpu", "cuda" (= cuda:0) or "cuda:N".
    pub fn parse(s: &str) -> Result<Self> {
        let bad = || Error::InvalidValue {
            key: "extract.device".into(),
            message: format!("`{s}`: expected \"auto\", \"cpu\" or \"cuda:N\""),
        };
        match s {
            "auto" => Ok(Self::Auto),
            "cpu" => Ok(Self::Cpu),
            "cuda" => Ok(Self::Cuda(0)),
            _ => s
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(Self::Cuda)
                .ok_or_else(bad),
        }
    }

    /// Opens the device. `auto` never fails: without CUDA it falls back to the CPU.
    pub fn open(self) -> Result<Device> {
        match self {
            Self::Cpu => Ok(Device::Cpu),
            Self::Cuda(n) => {
                if !candle_core::utils::cuda_is_available() {
                    return Err(Error::InvalidValue {
                        key: "extract.device".into(),
                        message: "cuda requested, but this binary was built without the `cuda` \
                                  feature (cargo run --features cuda ...)"
                            .into(),
                    });
                }
                Ok(Device::new_cuda(n)?)
            }
            Self::Auto => {
                if candle_core::utils::cuda_is_available() {
                    if let Ok(d) = Device::new_cuda(0) {
                        return Ok(d);
                    }
                }
                Ok(Device::Cpu)
            }
        }
    }
}

/// A short human name for log lines: "cpu" or "cuda:0".
pub fn describe(device: &Device) -> String {
    match device.location() {
        candle_core::DeviceLocation::Cpu => "cpu".into(),
        candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        candle_core::DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_device_names() {
        assert_eq!(DeviceChoice::parse("auto").ok(), Some(DeviceChoice::Auto));
        assert_eq!(DeviceChoice::parse("cpu").ok(), Some(DeviceChoice::Cpu));
        assert_eq!(
            DeviceChoice::parse("cuda:1").ok(),
            Some(DeviceChoice::Cuda(1))
        );
        assert!(DeviceChoice::parse("cuda:x").is_err());
        assert!(DeviceChoice::parse("gpu").is_err());
    }

    #[test]
    fn auto_falls_back_to_cpu_without_cuda() {
        let d = DeviceChoice::Auto.open().expect("auto never fails");
        if !candle_core::utils::cuda_is_available() {
            assert!(d.is_cpu());
        }
    }
}
