//! Choosing where the tensors live: `auto`, `cpu` or `cuda:N` from the config.
//!
//! `auto` never fails: it uses the first GPU when this binary was built with the `cuda` feature
//! and one is usable, and otherwise the CPU, saying why. `cuda:N` is a promise the user asked
//! for, so when it cannot be kept the run stops with an error that says what is missing.
//!
//! The config holds a [`DeviceChoice`], parsed once when the config is loaded (a bad value is a
//! config error naming `extract.device`); in the TOML it stays the string `"cuda:1"`.

use candle_core::Device;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// A parsed `[extract] device` value; written back as its config spelling (`"auto"`, `"cpu"`,
/// `"cuda:N"`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(try_from = "String", into = "String")]
pub enum DeviceChoice {
    /// CUDA when built with it and a GPU is present, else the CPU.
    #[default]
    Auto,
    Cpu,
    Cuda(usize),
}

/// An opened device and, when `auto` fell back to the CPU, the reason (for the log).
#[derive(Debug, Clone)]
pub struct Opened {
    pub device: Device,
    /// Why `auto` did not pick a GPU; `None` when nothing was given up.
    pub fallback: Option<String>,
}

impl DeviceChoice {
    /// Parses "auto", "cpu", "cuda" (= cuda:0) or "cuda:N"; an error names `extract.device`.
    pub fn parse(s: &str) -> Result<Self> {
        Self::from_name(s).map_err(|message| Error::InvalidValue {
            key: "extract.device".into(),
            message,
        })
    }

    /// [`DeviceChoice::parse`] with the reason as text (the config loader adds the key).
    fn from_name(s: &str) -> std::result::Result<Self, String> {
        match s {
            "auto" => Ok(Self::Auto),
            "cpu" => Ok(Self::Cpu),
            "cuda" => Ok(Self::Cuda(0)),
            _ => s
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(Self::Cuda)
                .ok_or_else(|| format!("`{s}`: expected \"auto\", \"cpu\" or \"cuda:N\"")),
        }
    }

    /// Opens the device. `auto` falls back to the CPU (the reason is in [`Opened::fallback`]);
    /// `cuda:N` that cannot be opened is [`Error::Device`].
    pub fn open(self) -> Result<Opened> {
        match self {
            Self::Cpu => Ok(Opened {
                device: Device::Cpu,
                fallback: None,
            }),
            Self::Cuda(n) => match open_cuda(n) {
                Ok(device) => Ok(Opened {
                    device,
                    fallback: None,
                }),
                Err(reason) => Err(Error::Device {
                    device: format!("cuda:{n}"),
                    message: reason,
                }),
            },
            Self::Auto => Ok(match open_cuda(0) {
                Ok(device) => Opened {
                    device,
                    fallback: None,
                },
                Err(reason) => Opened {
                    device: Device::Cpu,
                    fallback: Some(if cfg!(feature = "cuda") {
                        format!("cuda:0: {reason}")
                    } else {
                        reason
                    }),
                },
            }),
        }
    }

    /// Opens the device and prints one line about the choice on behalf of `program`
    /// (`"extract: device auto: no usable GPU (...): using the CPU"`).
    pub fn open_logged(self, program: &str) -> Result<Device> {
        let opened = self.open()?;
        if let Some(reason) = &opened.fallback {
            eprintln!("{program}: device auto: {reason}: using the CPU");
        }
        Ok(opened.device)
    }
}

impl TryFrom<String> for DeviceChoice {
    type Error = String;

    fn try_from(s: String) -> std::result::Result<Self, String> {
        Self::from_name(&s)
    }
}

impl From<DeviceChoice> for String {
    fn from(d: DeviceChoice) -> String {
        d.to_string()
    }
}

impl std::fmt::Display for DeviceChoice {
    /// The config spelling: `auto`, `cpu`, `cuda:N`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Auto => f.write_str("auto"),
            Self::Cpu => f.write_str("cpu"),
            Self::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

/// Opens GPU `n`, or says why not. Never panics: a driver library that misbehaves inside
/// candle/cudarc (they panic on some driver errors) is caught and reported as a reason.
fn open_cuda(n: usize) -> std::result::Result<Device, String> {
    if !cfg!(feature = "cuda") {
        return Err(
            "this binary was built without CUDA (rebuild with `--features cuda`, \
                    or run scripts/build_cuda.sh)"
                .into(),
        );
    }
    // A panic inside the driver bindings must not print a backtrace in the middle of the log:
    // silence the hook while we try, then restore it.
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let result = std::panic::catch_unwind(|| Device::new_cuda(n));
    std::panic::set_hook(hook);
    match result {
        Ok(Ok(device)) => Ok(device),
        Ok(Err(e)) => Err(cuda_reason(&first_line(&e.to_string()))),
        Err(panic) => {
            let text = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "unknown error".into());
            Err(cuda_reason(&first_line(&text)))
        }
    }
}

/// The first line of an error text: candle appends a backtrace to its errors when
/// `RUST_BACKTRACE` is set, which has no place in a one-line reason.
fn first_line(text: &str) -> String {
    text.lines().next().unwrap_or_default().trim().to_string()
}

/// A user-facing reason from a CUDA error text: the driver's error names are cryptic, so the
/// common ones get a plain explanation in front.
fn cuda_reason(error: &str) -> String {
    let hint = if error.contains("NO_DEVICE") {
        "no CUDA GPU is visible (check nvidia-smi and CUDA_VISIBLE_DEVICES)"
    } else if error.contains("INVALID_DEVICE") {
        "there is no GPU with that index"
    } else if error.contains("STUB_LIBRARY") {
        "libcuda.so.1 is the CUDA toolkit's link stub, not an NVIDIA driver"
    } else if error.contains("INSUFFICIENT_DRIVER") || error.contains("COMPAT_NOT_SUPPORTED") {
        "the NVIDIA driver is older than the CUDA version this binary was built for"
    } else if error.contains("NOT_INITIALIZED") || error.contains("DEINITIALIZED") {
        "the NVIDIA driver could not be initialised"
    } else {
        "CUDA GPU not usable"
    };
    format!("{hint} ({error})")
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
            DeviceChoice::parse("cuda").ok(),
            Some(DeviceChoice::Cuda(0))
        );
        assert_eq!(
            DeviceChoice::parse("cuda:1").ok(),
            Some(DeviceChoice::Cuda(1))
        );
        assert!(DeviceChoice::parse("cuda:x").is_err());
        assert!(DeviceChoice::parse("gpu").is_err());
        let err = DeviceChoice::parse("gpu").expect_err("unknown").to_string();
        assert!(
            err.contains("extract.device") && err.contains("gpu"),
            "{err}"
        );
    }

    #[test]
    fn the_config_spelling_round_trips() {
        for (choice, text) in [
            (DeviceChoice::Auto, "auto"),
            (DeviceChoice::Cpu, "cpu"),
            (DeviceChoice::Cuda(3), "cuda:3"),
        ] {
            assert_eq!(choice.to_string(), text);
            assert_eq!(DeviceChoice::try_from(text.to_string()), Ok(choice));
        }
        // "cuda" is read as cuda:0 and written back in full.
        assert_eq!(
            String::from(DeviceChoice::try_from("cuda".to_string()).expect("cuda")),
            "cuda:0"
        );
    }

    #[test]
    fn cpu_is_always_cpu_without_a_note() {
        let o = DeviceChoice::Cpu.open().expect("cpu opens");
        assert!(o.device.is_cpu());
        assert!(o.fallback.is_none());
    }

    /// Without the `cuda` feature (CI, and this test build): `auto` falls back and says why,
    /// `cuda` is an error that names the device and how to get a CUDA build.
    #[cfg(not(feature = "cuda"))]
    #[test]
    fn without_cuda_auto_falls_back_and_cuda_is_a_clear_error() {
        let o = DeviceChoice::Auto.open().expect("auto never fails");
        assert!(o.device.is_cpu());
        let reason = o.fallback.expect("auto says why it is on the CPU");
        assert!(reason.contains("without CUDA"), "{reason}");
        let err = DeviceChoice::Cuda(0)
            .open()
            .expect_err("cuda is not built in");
        let text = err.to_string();
        assert!(text.contains("cuda:0"), "{text}");
        assert!(text.contains("--features cuda"), "{text}");
        assert!(text.contains("build_cuda.sh"), "{text}");
    }

    /// With the `cuda` feature on a machine without a usable GPU (the build machine, or the
    /// stub driver): the same contract, whatever the driver says.
    #[cfg(feature = "cuda")]
    #[test]
    fn with_cuda_auto_never_fails() {
        let o = DeviceChoice::Auto.open().expect("auto never fails");
        if o.device.is_cpu() {
            let reason = o.fallback.expect("auto says why it is on the CPU");
            assert!(reason.starts_with("cuda:0: "), "{reason}");
            let err = DeviceChoice::Cuda(0).open().expect_err("no usable GPU");
            let text = err.to_string();
            assert!(text.starts_with("device cuda:0: "), "{text}");
            assert_eq!(text.matches("cuda:0").count(), 1, "named once: {text}");
            assert_eq!(text.lines().count(), 1, "one line, no backtrace: {text}");
        }
    }

    #[test]
    fn driver_errors_get_a_plain_reason() {
        let r = cuda_reason("DriverError(CUDA_ERROR_NO_DEVICE, \"no CUDA-capable device\")");
        assert!(r.contains("no CUDA GPU is visible"), "{r}");
        let r = cuda_reason("DriverError(CUDA_ERROR_INVALID_DEVICE, \"invalid device\")");
        assert!(r.starts_with("there is no GPU with that index"), "{r}");
        let r = cuda_reason("DriverError(CUDA_ERROR_STUB_LIBRARY, \"stub\")");
        assert!(r.contains("link stub"), "{r}");
        let r = cuda_reason("something else");
        assert!(r.contains("not usable (something else)"), "{r}");
        // candle's errors carry a backtrace when RUST_BACKTRACE is set: only the first line.
        assert_eq!(
            first_line("DriverError(X)\n   0: candle::frame\n   1: ..."),
            "DriverError(X)"
        );
    }
}
