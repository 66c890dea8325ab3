//! Which compute devices exist, and parsing of `--device` values.

use anyhow::{bail, Result};
use tch::Device;

/// Parses `cpu`, `cuda` (= `cuda:0`), `cuda:N` or `auto` (first CUDA device, else CPU).
pub fn parse_device(spec: &str) -> Result<Device> {
    let spec = spec.trim().to_ascii_lowercase();
    let device = match spec.as_str() {
        "cpu" => Device::Cpu,
        "auto" => Device::cuda_if_available(),
        "cuda" => Device::Cuda(0),
        s => match s.strip_prefix("cuda:").map(str::parse::<usize>) {
            Some(Ok(i)) => Device::Cuda(i),
            _ => bail!("unknown device `{spec}`: use cpu, cuda, cuda:N or auto"),
        },
    };
    if let Device::Cuda(i) = device {
        let count = tch::Cuda::device_count();
        if i as i64 >= count {
            bail!(
                "device cuda:{i} requested but {count} CUDA device(s) are visible{}",
                if count == 0 {
                    " (is this a CUDA build? see README \"GPU build\")"
                } else {
                    ""
                }
            );
        }
    }
    Ok(device)
}

/// Every device inference can use: all CUDA devices, or the CPU when there are none.
pub fn default_devices() -> Vec<Device> {
    let n = tch::Cuda::device_count();
    if n > 0 {
        (0..n as usize).map(Device::Cuda).collect()
    } else {
        vec![Device::Cpu]
    }
}

/// A human-readable name such as `cpu` or `cuda:1`.
pub fn device_name(device: Device) -> String {
    match device {
        Device::Cpu => "cpu".to_string(),
        Device::Cuda(i) => format!("cuda:{i}"),
        other => format!("{other:?}").to_lowercase(),
    }
}
