//! Backend selection: `--backend ndarray|wgpu|cuda` and `--device N` pick one of the backends
//! compiled in (cargo features `ndarray` (default), `wgpu`, `cuda`), and run a job generic over
//! Burn's `Backend` (inference) or `AutodiffBackend` (training) on it.

use std::fmt;
use std::str::FromStr;

use anyhow::{bail, Result};
use burn::tensor::backend::{AutodiffBackend, Backend};

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    Ndarray,
    Wgpu,
    Cuda,
}

impl BackendKind {
    pub const ALL: [BackendKind; 3] = [BackendKind::Ndarray, BackendKind::Wgpu, BackendKind::Cuda];

    pub fn is_compiled(self) -> bool {
        match self {
            BackendKind::Ndarray => true,
            BackendKind::Wgpu => cfg!(feature = "wgpu"),
            BackendKind::Cuda => cfg!(feature = "cuda"),
        }
    }

    pub fn compiled() -> Vec<BackendKind> {
        Self::ALL.into_iter().filter(|b| b.is_compiled()).collect()
    }
}

impl fmt::Display for BackendKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BackendKind::Ndarray => "ndarray",
            BackendKind::Wgpu => "wgpu",
            BackendKind::Cuda => "cuda",
        })
    }
}

impl FromStr for BackendKind {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "ndarray" | "cpu" => Ok(Self::Ndarray),
            "wgpu" | "vulkan" => Ok(Self::Wgpu),
            "cuda" => Ok(Self::Cuda),
            other => bail!("unknown backend `{other}`: expected one of ndarray, wgpu, cuda"),
        }
    }
}

/// The backend and device a command runs on.
#[derive(Debug, Clone, Copy, clap::Args)]
pub struct BackendArgs {
    /// ndarray (CPU, default), wgpu (Vulkan/Metal/DX12; software Vulkan in CI) or cuda.
    #[arg(long, default_value = "ndarray")]
    pub backend: BackendKind,
    /// Device index (GPU backends); wgpu without it uses the default adapter.
    #[arg(long)]
    pub device: Option<usize>,
}

impl Default for BackendArgs {
    fn default() -> Self {
        Self { backend: BackendKind::Ndarray, device: None }
    }
}

pub type NdArrayBackend = burn::backend::NdArray<f32>;
#[cfg(feature = "wgpu")]
pub type WgpuBackend = burn::backend::Wgpu<f32, i32>;
#[cfg(feature = "cuda")]
pub type CudaBackend = burn::backend::Cuda<f32, i32>;

/// A job that runs on any backend (inference).
pub trait BackendJob {
    type Output;
    fn run<B: Backend>(self, device: B::Device) -> Result<Self::Output>;
}

/// A job that needs gradients (training).
pub trait AutodiffJob {
    type Output;
    fn run<B: AutodiffBackend>(self, device: B::Device) -> Result<Self::Output>;
}

fn not_compiled(kind: BackendKind) -> anyhow::Error {
    let compiled: Vec<String> = BackendKind::compiled().iter().map(|b| b.to_string()).collect();
    anyhow::anyhow!(
        "backend `{kind}` is not compiled into this binary (compiled: {}); rebuild with `cargo build --release --features {kind}`",
        compiled.join(", ")
    )
}

#[cfg(feature = "wgpu")]
fn wgpu_device(index: Option<usize>) -> burn::backend::wgpu::WgpuDevice {
    match index {
        None => burn::backend::wgpu::WgpuDevice::DefaultDevice,
        Some(i) => burn::backend::wgpu::WgpuDevice::DiscreteGpu(i),
    }
}

/// Run `job` on the selected backend.
pub fn dispatch<J: BackendJob>(args: BackendArgs, job: J) -> Result<J::Output> {
    match args.backend {
        BackendKind::Ndarray => job.run::<NdArrayBackend>(Default::default()),
        #[cfg(feature = "wgpu")]
        BackendKind::Wgpu => job.run::<WgpuBackend>(wgpu_device(args.device)),
        #[cfg(feature = "cuda")]
        BackendKind::Cuda => job.run::<CudaBackend>(burn::backend::cuda::CudaDevice::new(args.device.unwrap_or(0))),
        #[allow(unreachable_patterns)]
        other => Err(not_compiled(other)),
    }
}

/// Run `job` on the selected backend wrapped in `Autodiff`.
pub fn dispatch_autodiff<J: AutodiffJob>(args: BackendArgs, job: J) -> Result<J::Output> {
    use burn::backend::Autodiff;
    match args.backend {
        BackendKind::Ndarray => job.run::<Autodiff<NdArrayBackend>>(Default::default()),
        #[cfg(feature = "wgpu")]
        BackendKind::Wgpu => job.run::<Autodiff<WgpuBackend>>(wgpu_device(args.device)),
        #[cfg(feature = "cuda")]
        BackendKind::Cuda => {
            job.run::<Autodiff<CudaBackend>>(burn::backend::cuda::CudaDevice::new(args.device.unwrap_or(0)))
        }
        #[allow(unreachable_patterns)]
        other => Err(not_compiled(other)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_names_and_reports_missing_backends() {
        assert_eq!("NDARRAY".parse::<BackendKind>().unwrap(), BackendKind::Ndarray);
        assert!("tpu".parse::<BackendKind>().is_err());
        struct Nop;
        impl BackendJob for Nop {
            type Output = ();
            fn run<B: Backend>(self, _: B::Device) -> Result<()> {
                Ok(())
            }
        }
        for kind in BackendKind::ALL {
            let r = dispatch(BackendArgs { backend: kind, device: None }, Nop);
            if !kind.is_compiled() {
                let msg = r.unwrap_err().to_string();
                assert!(msg.contains("not compiled"), "{msg}");
            }
        }
    }
}
