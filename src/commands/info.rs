//! `attrstream info`: what libtorch and devices this build sees.

use std::process::ExitCode;

use anyhow::Result;
use serde_json::json;

/// Prints libtorch's version, CUDA availability and the devices as JSON.
pub fn run() -> Result<ExitCode> {
    let cuda_devices = tch::Cuda::device_count();
    let devices: Vec<String> = crate::device::default_devices()
        .into_iter()
        .map(crate::device::device_name)
        .collect();
    let info = json!({
        "attrstream": env!("CARGO_PKG_VERSION"),
        "commit": env!("ATTRSTREAM_GIT_COMMIT"),
        "libtorch": env!("ATTRSTREAM_LIBTORCH_VERSION"),
        "cuda_available": tch::Cuda::is_available(),
        "cudnn_available": tch::Cuda::cudnn_is_available(),
        "cuda_device_count": cuda_devices,
        "cuda_build": cfg!(feature = "cuda"),
        "devices": devices,
        "cpu_threads": tch::get_num_threads(),
    });
    println!("{}", serde_json::to_string_pretty(&info)?);
    Ok(ExitCode::SUCCESS)
}
