//! `attrstream_device_memory_bytes{device}`: memory in use on each CUDA device the workers
//! run on, read from NVML (`libnvidia-ml.so.1`, part of the NVIDIA driver) when the gauge is
//! collected.
//!
//! NVML is opened at run time, so nothing links against it and a CPU-only host simply has no
//! such gauge. It reports the whole device (every process on it, libtorch's cache included),
//! which is what running out of memory depends on; libtorch's own allocator statistics are
//! not reachable through `tch`. A query costs a few microseconds and creates no CUDA context.
//!
//! `cuda:N` is mapped to an NVML device through `CUDA_VISIBLE_DEVICES` (indices or `GPU-…`
//! UUIDs) when it is set, else NVML index N. CUDA orders devices fastest first while NVML uses
//! the PCI bus order; they agree on hosts with identical GPUs (the usual case for a node pool),
//! and `CUDA_DEVICE_ORDER=PCI_BUS_ID` makes them agree everywhere.

use std::ffi::{c_char, c_int, c_uint, c_void, CString};
use std::sync::OnceLock;

use tch::Device;

use super::metrics::{Metrics, ProbeGuard};

const NVML_SUCCESS: c_int = 0;

/// `nvmlMemory_t`.
#[repr(C)]
#[derive(Default)]
struct NvmlMemory {
    total: u64,
    free: u64,
    used: u64,
}

type DeviceHandle = *mut c_void;

/// The NVML functions attrstream uses, resolved once per process.
struct Nvml {
    /// Keeps the library loaded while the function pointers are in use.
    _library: libloading::Library,
    by_index: unsafe extern "C" fn(c_uint, *mut DeviceHandle) -> c_int,
    by_uuid: unsafe extern "C" fn(*const c_char, *mut DeviceHandle) -> c_int,
    memory_info: unsafe extern "C" fn(DeviceHandle, *mut NvmlMemory) -> c_int,
}

impl Nvml {
    /// Loads and initialises NVML; `None` where there is no NVIDIA driver.
    fn load() -> Option<Self> {
        // SAFETY: loading the driver's NVML runs its initialisers, which are safe to run in a
        // process; the symbols are looked up with the signatures of the NVML headers (nvml.h).
        unsafe {
            let library = libloading::Library::new("libnvidia-ml.so.1").ok()?;
            let init: unsafe extern "C" fn() -> c_int = *library.get(b"nvmlInit_v2\0").ok()?;
            let by_index = *library.get(b"nvmlDeviceGetHandleByIndex_v2\0").ok()?;
            let by_uuid = *library.get(b"nvmlDeviceGetHandleByUUID\0").ok()?;
            let memory_info = *library.get(b"nvmlDeviceGetMemoryInfo\0").ok()?;
            if init() != NVML_SUCCESS {
                tracing::debug!("NVML did not initialise; no device memory gauge");
                return None;
            }
            Some(Self {
                _library: library,
                by_index,
                by_uuid,
                memory_info,
            })
        }
    }

    /// The process-wide instance (NVML is initialised once and never shut down).
    fn get() -> Option<&'static Nvml> {
        static NVML: OnceLock<Option<Nvml>> = OnceLock::new();
        NVML.get_or_init(Nvml::load).as_ref()
    }

    fn handle(&self, device: &NvmlDevice) -> Option<DeviceHandle> {
        let mut handle: DeviceHandle = std::ptr::null_mut();
        // SAFETY: `handle` is a valid out-pointer; the UUID is a NUL-terminated string.
        let status = unsafe {
            match device {
                NvmlDevice::Index(i) => (self.by_index)(*i, &mut handle),
                NvmlDevice::Uuid(uuid) => (self.by_uuid)(uuid.as_ptr(), &mut handle),
            }
        };
        (status == NVML_SUCCESS && !handle.is_null()).then_some(handle)
    }

    fn used_bytes(&self, handle: DeviceHandle) -> Option<u64> {
        let mut memory = NvmlMemory::default();
        // SAFETY: `handle` came from NVML and stays valid while NVML is initialised (for the
        // life of the process); `memory` is a valid out-pointer of the struct NVML fills.
        let status = unsafe { (self.memory_info)(handle, &mut memory) };
        (status == NVML_SUCCESS).then_some(memory.used)
    }
}

// SAFETY: NVML is thread-safe (nvml.h: "NVML is thread-safe so it is safe to make
// simultaneous NVML calls from multiple threads"); the library handle is only read.
unsafe impl Send for Nvml {}
unsafe impl Sync for Nvml {}

/// How NVML names the device behind `cuda:N`.
#[derive(Debug, Clone, PartialEq, Eq)]
enum NvmlDevice {
    Index(c_uint),
    Uuid(CString),
}

/// The NVML device of CUDA ordinal `ordinal`, given `CUDA_VISIBLE_DEVICES`.
fn nvml_device(ordinal: usize, visible: Option<&str>) -> Option<NvmlDevice> {
    let Some(visible) = visible.map(str::trim).filter(|v| !v.is_empty()) else {
        return Some(NvmlDevice::Index(ordinal as c_uint));
    };
    let entry = visible.split(',').map(str::trim).nth(ordinal)?;
    if let Ok(index) = entry.parse::<c_uint>() {
        return Some(NvmlDevice::Index(index));
    }
    if entry.starts_with("GPU-") {
        return CString::new(entry).ok().map(NvmlDevice::Uuid);
    }
    None // MIG instances and anything else: no whole-device figure to report
}

/// Reports the memory in use of each CUDA device in `devices` while the guards live; none on
/// hosts without NVML or without CUDA devices.
pub fn watch(devices: &[Device], metrics: &Metrics) -> Vec<ProbeGuard> {
    let mut ordinals: Vec<usize> = devices
        .iter()
        .filter_map(|d| match d {
            Device::Cuda(i) => Some(*i),
            _ => None,
        })
        .collect();
    ordinals.sort_unstable();
    ordinals.dedup();
    if ordinals.is_empty() {
        return Vec::new();
    }
    let Some(nvml) = Nvml::get() else {
        tracing::info!("NVML (libnvidia-ml.so.1) not found: attrstream_device_memory_bytes is not reported");
        return Vec::new();
    };
    let visible = std::env::var("CUDA_VISIBLE_DEVICES").ok();
    let mut guards = Vec::new();
    for ordinal in ordinals {
        let handle = nvml_device(ordinal, visible.as_deref()).and_then(|d| nvml.handle(&d));
        let Some(handle) = handle else {
            tracing::warn!(
                device = ordinal,
                "no NVML device for cuda:{ordinal}; its memory is not reported"
            );
            continue;
        };
        let handle = SendHandle(handle);
        guards.push(metrics.watch_device_memory(&format!("cuda:{ordinal}"), move || {
            let handle = &handle;
            nvml.used_bytes(handle.0).map(|b| b as i64)
        }));
    }
    guards
}

/// An NVML device handle, usable from the thread that collects metrics.
struct SendHandle(DeviceHandle);

// SAFETY: NVML device handles are process-wide and NVML calls are thread-safe (see above).
unsafe impl Send for SendHandle {}
unsafe impl Sync for SendHandle {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cuda_ordinals_map_through_cuda_visible_devices() {
        assert_eq!(nvml_device(1, None), Some(NvmlDevice::Index(1)));
        assert_eq!(nvml_device(1, Some("")), Some(NvmlDevice::Index(1)));
        assert_eq!(nvml_device(1, Some("3, 5")), Some(NvmlDevice::Index(5)));
        assert_eq!(nvml_device(2, Some("3,5")), None);
        assert_eq!(
            nvml_device(0, Some("GPU-8e2c1b7f-aaaa-bbbb-cccc-0123456789ab")),
            Some(NvmlDevice::Uuid(
                CString::new("GPU-8e2c1b7f-aaaa-bbbb-cccc-0123456789ab").unwrap()
            ))
        );
        assert_eq!(nvml_device(0, Some("MIG-1234")), None);
    }

    #[test]
    fn cpu_workers_report_no_device_memory() {
        let t = super::super::Telemetry::local().unwrap();
        assert!(watch(&[Device::Cpu], t.metrics()).is_empty());
        assert!(!t.prometheus_text().contains("attrstream_device_memory_bytes{"));
    }
}
