//! What this machine has for each backend (for `kestrel doctor`): the NVIDIA driver, the GPUs,
//! NVRTC, cuDNN and, with the `tensorrt` feature, libnvinfer and libnvonnxparser. Only looks:
//! every library is checked for presence before it is called (cudarc panics on a missing one),
//! and nothing here panics or fails.
#![allow(unsafe_code)]

use cudarc::driver::{result as drv, sys as dsys};
use serde::Serialize;

/// A component's state: `Ok(version or detail)`, or why it is missing with the fix.
pub type Finding = std::result::Result<String, String>;

/// One GPU as the driver reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Gpu {
    pub index: usize,
    pub name: String,
    /// `sm_XY`.
    pub compute_capability: String,
}

/// The CUDA side of the machine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CudaReport {
    /// libcuda.so.1 and the CUDA version the driver supports.
    pub driver: Finding,
    /// The GPUs, or why none can be listed.
    pub gpus: std::result::Result<Vec<Gpu>, String>,
    /// libnvrtc (CUDA 13): compiles Kestrel's kernels.
    pub nvrtc: Finding,
    /// libcudnn.so.9.
    pub cudnn: Finding,
}

/// A CUDA version integer (1000 * major + 10 * minor) in words.
pub fn cuda_version(v: i32) -> String {
    format!("{}.{}", v / 1000, v % 1000 / 10)
}

/// A cuDNN version integer (9.x: 10000 * major + 100 * minor + patch) in words.
pub fn cudnn_version(v: usize) -> String {
    if v >= 10000 {
        format!("{}.{}.{}", v / 10000, v / 100 % 100, v % 100)
    } else {
        format!("{}.{}.{}", v / 1000, v / 100 % 10, v % 100)
    }
}

/// Look at the driver, GPUs, NVRTC and cuDNN.
pub fn cuda_report() -> CudaReport {
    // SAFETY: these only try to open the shared libraries.
    let (has_driver, has_nvrtc, has_cudnn) = unsafe {
        (
            dsys::is_culib_present(),
            cudarc::nvrtc::sys::is_culib_present(),
            cudarc::cudnn::sys::is_culib_present(),
        )
    };
    let driver = if has_driver {
        let mut v = 0i32;
        // SAFETY: the library is present; writes one int.
        match unsafe { dsys::cuDriverGetVersion(&mut v) }.result() {
            Ok(()) => Ok(format!("libcuda.so.1, supports CUDA {}", cuda_version(v))),
            Err(e) => Err(format!(
                "libcuda.so.1 found but not usable ({e:?}); reinstall the NVIDIA driver"
            )),
        }
    } else {
        Err(
            "libcuda.so.1 not found: no NVIDIA driver; install the NVIDIA driver (CUDA 13 capable)"
                .into(),
        )
    };
    let gpus = if driver.is_ok() {
        list_gpus()
    } else {
        Err("not checked: no NVIDIA driver".into())
    };
    let nvrtc = if has_nvrtc {
        let (mut major, mut minor) = (0i32, 0i32);
        // SAFETY: the library is present; writes two ints.
        match unsafe { cudarc::nvrtc::sys::nvrtcVersion(&mut major, &mut minor) }.result() {
            Ok(()) => Ok(format!("{major}.{minor}")),
            Err(e) => Err(format!("libnvrtc found but not usable ({e:?})")),
        }
    } else {
        Err(
            "libnvrtc (CUDA 13) not found; install the CUDA toolkit or `pip install \
             nvidia-cuda-nvrtc`, and add its lib folder to LD_LIBRARY_PATH"
                .into(),
        )
    };
    let cudnn = if has_cudnn {
        Ok(cudnn_version(cudarc::cudnn::result::get_version()))
    } else {
        Err(
            "libcudnn.so.9 not found; install cuDNN 9 (e.g. `pip install nvidia-cudnn-cu13`) and \
             add its lib folder to LD_LIBRARY_PATH"
                .into(),
        )
    };
    CudaReport {
        driver,
        gpus,
        nvrtc,
        cudnn,
    }
}

fn list_gpus() -> std::result::Result<Vec<Gpu>, String> {
    drv::init().map_err(|e| format!("the NVIDIA driver failed to initialise ({e:?})"))?;
    let n = drv::device::get_count().map_err(|e| format!("cannot count GPUs ({e:?})"))?;
    if n == 0 {
        return Err("the NVIDIA driver reports no GPU".into());
    }
    (0..n)
        .map(|i| {
            let dev = drv::device::get(i).map_err(|e| format!("GPU {i}: {e:?}"))?;
            let name = drv::device::get_name(dev).map_err(|e| format!("GPU {i}: {e:?}"))?;
            let attr = |a| {
                // SAFETY: a valid device and attribute.
                unsafe { drv::device::get_attribute(dev, a) }.map_err(|e| format!("GPU {i}: {e:?}"))
            };
            let major =
                attr(dsys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)?;
            let minor =
                attr(dsys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)?;
            Ok(Gpu {
                index: i as usize,
                name,
                compute_capability: format!("sm_{major}{minor}"),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_read_as_people_write_them() {
        assert_eq!(cuda_version(13000), "13.0");
        assert_eq!(cuda_version(12080), "12.8");
        assert_eq!(cudnn_version(91400), "9.14.0");
        assert_eq!(cudnn_version(8907), "8.9.7");
    }

    #[test]
    fn the_report_never_panics_and_names_fixes() {
        let r = cuda_report();
        if let Err(e) = &r.driver {
            assert!(e.contains("libcuda.so.1"), "{e}");
            assert!(r.gpus.is_err());
        }
        if let Err(e) = &r.cudnn {
            assert!(
                e.contains("libcudnn.so.9") && e.contains("LD_LIBRARY_PATH"),
                "{e}"
            );
        }
    }
}
