//! Backend selection: `--backend ndarray|flex|wgpu|cuda` and `--device N` pick one of the
//! backends compiled in (cargo features `ndarray` (default), `flex`, `wgpu`, `cuda`), and run a
//! job generic over Burn's `Backend` (inference) or `AutodiffBackend` (training) on it.
//! `--precision f32|bf16` picks the compute dtype (see [`Precision`]).

use crate::model::{ModelBackend, TrainBackend};
use std::fmt;
use std::str::FromStr;

use anyhow::{bail, Result};
use burn::module::Module;
use burn::tensor::backend::Backend;
use burn::tensor::{DType, FloatDType};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    Ndarray,
    /// Burn's `flex` CPU backend (SIMD gemm, zero-copy views; bf16 by conversion to f32).
    Flex,
    Wgpu,
    Cuda,
}

impl BackendKind {
    pub const ALL: [BackendKind; 4] = [
        BackendKind::Ndarray,
        BackendKind::Flex,
        BackendKind::Wgpu,
        BackendKind::Cuda,
    ];

    pub fn is_compiled(self) -> bool {
        match self {
            BackendKind::Ndarray => true,
            BackendKind::Flex => cfg!(feature = "flex"),
            BackendKind::Wgpu => cfg!(feature = "wgpu"),
            BackendKind::Cuda => cfg!(feature = "cuda"),
        }
    }

    /// Whether the backend computes in bf16 (CUDA natively; flex by converting to f32 and back,
    /// which rounds like bf16 and serves to test the mixed-precision path on a CPU).
    pub fn supports_bf16(self) -> bool {
        matches!(self, BackendKind::Cuda | BackendKind::Flex)
    }

    /// Whether the backend computes on the CPU (one device: data-parallel ranks are workers
    /// sharing it, not separate devices).
    pub fn is_cpu(self) -> bool {
        matches!(self, BackendKind::Ndarray | BackendKind::Flex)
    }

    /// The CPU backend commands and recipes use unless told otherwise: flex when compiled in (it
    /// trains and generates faster than ndarray on a CPU; BENCHMARKS.md), else ndarray.
    pub fn cpu_default() -> BackendKind {
        if cfg!(feature = "flex") {
            BackendKind::Flex
        } else {
            BackendKind::Ndarray
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
            BackendKind::Flex => "flex",
            BackendKind::Wgpu => "wgpu",
            BackendKind::Cuda => "cuda",
        })
    }
}

impl FromStr for BackendKind {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "ndarray" => Ok(Self::Ndarray),
            "cpu" => Ok(Self::cpu_default()),
            "flex" => Ok(Self::Flex),
            "wgpu" | "vulkan" => Ok(Self::Wgpu),
            "cuda" => Ok(Self::Cuda),
            other => bail!("unknown backend `{other}`: expected one of ndarray, flex, wgpu, cuda"),
        }
    }
}

/// The compute precision. Parameters (and, in training, gradients and optimizer state) are
/// always f32: with `bf16` the forward and backward passes run on a bf16 copy of the weights
/// ([`compute_model`]), with norms, rotary tables, the final log-softmax and the loss in f32,
/// as transformers runs a bf16 model under mixed precision. An AdamW update of lr 1e-6 x a
/// unit step is far below bf16's resolution (2^-8 relative), so it survives only in f32
/// master weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// Everything in f32.
    #[default]
    F32,
    /// bf16 compute with f32 master weights (backends cuda and flex).
    Bf16,
}

impl Precision {
    /// Bytes of one activation element (and of a weight in the compute copy).
    pub fn bytes(self) -> u64 {
        match self {
            Precision::F32 => 4,
            Precision::Bf16 => 2,
        }
    }
}

impl fmt::Display for Precision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Precision::F32 => "f32",
            Precision::Bf16 => "bf16",
        })
    }
}

/// Error unless the backend `B` can compute in `precision` on `device`.
pub fn check_precision<B: Backend>(precision: Precision, device: &B::Device) -> Result<()> {
    if precision == Precision::Bf16 && !B::supports_dtype(device, DType::BF16) {
        bail!("precision bf16 needs a backend that computes in bf16 (cuda, or flex on the CPU); this backend does not");
    }
    Ok(())
}

/// The model the forward pass runs with: under `f32` the parameters themselves; under `bf16`
/// a copy cast to bf16 that keeps the parameter ids (under autodiff the cast is recorded, so
/// the gradients arrive, in f32, at the f32 master parameters of `model`).
pub fn compute_model<B: Backend, M: Module<B> + Clone>(model: &M, precision: Precision) -> M {
    match precision {
        Precision::F32 => model.clone(),
        Precision::Bf16 => crate::model::nn::cast_float_params(model.clone(), FloatDType::BF16),
    }
}

/// The backend, device and precision a command runs with.
#[derive(Debug, Clone, Copy, clap::Args)]
pub struct BackendArgs {
    /// flex (CPU, the default when compiled in), ndarray (CPU), wgpu (Vulkan/Metal/DX12;
    /// software Vulkan in CI) or cuda.
    #[arg(long, default_value_t = BackendKind::cpu_default())]
    pub backend: BackendKind,
    /// Device index (GPU backends); wgpu without it uses the default adapter.
    #[arg(long)]
    pub device: Option<usize>,
    /// Compute precision: f32, or bf16 (f32 weights, bf16 compute; cuda and flex).
    #[arg(long, value_enum, default_value_t = Precision::F32)]
    pub precision: Precision,
}

impl Default for BackendArgs {
    fn default() -> Self {
        Self {
            backend: BackendKind::cpu_default(),
            device: None,
            precision: Precision::F32,
        }
    }
}

pub type NdArrayBackend = burn::backend::NdArray<f32>;
#[cfg(feature = "flex")]
pub type FlexBackend = burn::backend::Flex<f32, i32>;
#[cfg(feature = "wgpu")]
pub type WgpuBackend = burn::backend::Wgpu<f32, i32>;
#[cfg(feature = "cuda")]
pub type CudaBackend = burn::backend::Cuda<f32, i32>;

/// A job that runs on any backend (inference).
pub trait BackendJob {
    type Output;
    fn run<B: ModelBackend>(self, device: B::Device) -> Result<Self::Output>;
}

/// A job that needs gradients (training).
pub trait AutodiffJob {
    type Output;
    fn run<B: TrainBackend>(self, device: B::Device) -> Result<Self::Output>;
}

fn not_compiled(kind: BackendKind) -> anyhow::Error {
    let compiled: Vec<String> = BackendKind::compiled()
        .iter()
        .map(|b| b.to_string())
        .collect();
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

/// Error unless `kind` can run here: for cuda, the NVIDIA driver (`libcuda`), NVRTC (which
/// compiles the kernels) and the device; for wgpu, an adapter (a Vulkan, Metal or DX12 driver).
/// Commands probe before any work starts, so that a machine without the driver gets an error
/// naming the backend, what was looked for and the alternatives, instead of a panic inside the
/// GPU runtime. The CPU backends always run.
pub fn probe(kind: BackendKind, device: Option<usize>) -> Result<()> {
    let found = match kind {
        BackendKind::Ndarray | BackendKind::Flex => return Ok(()),
        #[cfg(feature = "cuda")]
        BackendKind::Cuda => probe_cuda(device.unwrap_or(0)),
        #[cfg(feature = "wgpu")]
        BackendKind::Wgpu => probe_wgpu(device),
        #[allow(unreachable_patterns)]
        other => return Err(not_compiled(other)),
    };
    found.map_err(|what| {
        anyhow::anyhow!(
            "backend `{kind}` cannot run on this machine: {what}. Use `--backend flex` (or `--set backend=flex` in a recipe) to run on the CPU{}",
            if kind == BackendKind::Cuda { ", or --backend wgpu with a Vulkan/Metal/DX12 driver" } else { "" }
        )
    })
}

/// The shared libraries cudarc loads, by the names it tries (`libcuda.so`, `libcuda.so.1`, ...).
#[cfg(feature = "cuda")]
fn load_library(stem: &str, versions: &[&str]) -> Option<*mut libc::c_void> {
    let mut names = vec![format!("lib{stem}.so")];
    names.extend(versions.iter().map(|v| format!("lib{stem}.so.{v}")));
    names.iter().find_map(|name| {
        let c = std::ffi::CString::new(name.as_str()).ok()?;
        // SAFETY: dlopen with a valid C string; the library stays loaded for the process (as
        // cudarc keeps it loaded once it has found it).
        let handle = unsafe { libc::dlopen(c.as_ptr(), libc::RTLD_NOW | libc::RTLD_GLOBAL) };
        (!handle.is_null()).then_some(handle)
    })
}

#[cfg(feature = "cuda")]
fn probe_cuda(device: usize) -> std::result::Result<(), String> {
    const OK: i32 = 0;
    let Some(cuda) = load_library("cuda", &["1"]) else {
        return Err("the NVIDIA driver library (libcuda.so / libcuda.so.1) is not installed or not on LD_LIBRARY_PATH".into());
    };
    if load_library("nvrtc", &["13", "12", "11"]).is_none() {
        return Err("NVRTC (libnvrtc.so, from the CUDA toolkit), which compiles the kernels, is not installed or not on LD_LIBRARY_PATH".into());
    }
    type CuInit = unsafe extern "C" fn(u32) -> i32;
    type CuDeviceGetCount = unsafe extern "C" fn(*mut i32) -> i32;
    let symbol = |name: &str| {
        let c = std::ffi::CString::new(name).expect("symbol name");
        // SAFETY: dlsym on a handle dlopen returned.
        unsafe { libc::dlsym(cuda, c.as_ptr()) }
    };
    let (init, count) = (symbol("cuInit"), symbol("cuDeviceGetCount"));
    if init.is_null() || count.is_null() {
        return Err(
            "libcuda.so does not export cuInit / cuDeviceGetCount (not the NVIDIA driver?)".into(),
        );
    }
    // SAFETY: the driver API's own signatures: CUresult cuInit(unsigned), cuDeviceGetCount(int*).
    let (init, count): (CuInit, CuDeviceGetCount) = unsafe {
        (
            std::mem::transmute::<*mut libc::c_void, CuInit>(init),
            std::mem::transmute::<*mut libc::c_void, CuDeviceGetCount>(count),
        )
    };
    // SAFETY: calls into the driver with valid arguments.
    let rc = unsafe { init(0) };
    if rc != OK {
        return Err(format!("the NVIDIA driver did not initialise (cuInit error {rc}: no GPU, or driver and kernel module out of step?)"));
    }
    let mut n = 0i32;
    // SAFETY: `n` outlives the call.
    let rc = unsafe { count(&mut n) };
    if rc != OK || n <= 0 {
        return Err(format!(
            "the NVIDIA driver sees no GPU (cuDeviceGetCount: error {rc}, {n} devices)"
        ));
    }
    if device >= n as usize {
        return Err(format!(
            "there is no CUDA device {device}: the driver sees {n} (0..{})",
            n - 1
        ));
    }
    Ok(())
}

/// Creates the wgpu device as the backend would (cubecl panics when it finds no adapter: the
/// panic is caught here and its message kept, the default panic output silenced meanwhile).
#[cfg(feature = "wgpu")]
fn probe_wgpu(device: Option<usize>) -> std::result::Result<(), String> {
    use burn::tensor::Tensor;
    let dev = wgpu_device(device);
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let r = std::panic::catch_unwind(|| Tensor::<WgpuBackend, 1>::zeros([1], &dev).into_data());
    std::panic::set_hook(hook);
    r.map(|_| ()).map_err(|payload| {
        let msg = payload
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_default();
        // cubecl names the missing adapter where it panics on this thread; where the panic is on
        // its device thread, this one only sees the channel close: no detail worth showing.
        let detail = msg.lines().next().filter(|m| m.contains("adapter") || m.contains("device"));
        format!(
            "no wgpu adapter found{}{}: install a Vulkan driver (Linux: the GPU vendor's, or mesa-vulkan-drivers for software Vulkan), Metal (macOS) or DX12 (Windows)",
            device.map(|d| format!(" for device {d}")).unwrap_or_default(),
            detail.map(|d| format!(" ({d})")).unwrap_or_default()
        )
    })
}

/// Run `job` on the selected backend.
pub fn dispatch<J: BackendJob>(args: BackendArgs, job: J) -> Result<J::Output> {
    probe(args.backend, args.device)?;
    match args.backend {
        BackendKind::Ndarray => job.run::<NdArrayBackend>(Default::default()),
        #[cfg(feature = "flex")]
        BackendKind::Flex => job.run::<FlexBackend>(Default::default()),
        #[cfg(feature = "wgpu")]
        BackendKind::Wgpu => job.run::<WgpuBackend>(wgpu_device(args.device)),
        #[cfg(feature = "cuda")]
        BackendKind::Cuda => job.run::<CudaBackend>(burn::backend::cuda::CudaDevice::new(
            args.device.unwrap_or(0),
        )),
        #[allow(unreachable_patterns)]
        other => Err(not_compiled(other)),
    }
}

/// Gradient checkpointing (recipe `gradient_checkpointing = true`): burn's
/// `Autodiff<B, BalancedCheckpointing>`, which keeps the results of compute-bound operations
/// (matmuls, convolutions, reductions) for the backward pass and recomputes the memory-bound
/// ones (elementwise activations, norms' pieces, rotary, masks, layout changes) from them when
/// the backward pass needs them, instead of keeping every intermediate alive from the forward
/// pass to the backward pass. Same gradients; less activation memory; some recomputation.
pub type CheckpointedAutodiff<B> = burn::backend::Autodiff<
    B,
    burn::backend::autodiff::checkpoint::strategy::BalancedCheckpointing,
>;

/// Run `job` on the selected backend wrapped in `Autodiff` (with balanced gradient
/// checkpointing: [`CheckpointedAutodiff`]; per-layer checkpointing is the learner's, on plain
/// `Autodiff`).
pub fn dispatch_autodiff<J: AutodiffJob>(
    args: BackendArgs,
    gradient_checkpointing: GradientCheckpointing,
    job: J,
) -> Result<J::Output> {
    fn on<B: ModelBackend, J: AutodiffJob>(
        job: J,
        device: B::Device,
        checkpointing: bool,
    ) -> Result<J::Output> {
        if checkpointing {
            job.run::<CheckpointedAutodiff<B>>(device)
        } else {
            job.run::<burn::backend::Autodiff<B>>(device)
        }
    }
    probe(args.backend, args.device)?;
    let ck = gradient_checkpointing == GradientCheckpointing::Balanced;
    match args.backend {
        BackendKind::Ndarray => on::<NdArrayBackend, J>(job, Default::default(), ck),
        #[cfg(feature = "flex")]
        BackendKind::Flex => on::<FlexBackend, J>(job, Default::default(), ck),
        #[cfg(feature = "wgpu")]
        BackendKind::Wgpu => on::<WgpuBackend, J>(job, wgpu_device(args.device), ck),
        #[cfg(feature = "cuda")]
        BackendKind::Cuda => on::<CudaBackend, J>(
            job,
            burn::backend::cuda::CudaDevice::new(args.device.unwrap_or(0)),
            ck,
        ),
        #[allow(unreachable_patterns)]
        other => Err(not_compiled(other)),
    }
}

/// `gradient_checkpointing`: what the backward pass recomputes instead of keeping.
///
/// - `"off"` (or `false`): every intermediate of the forward pass is kept for the backward;
/// - `"balanced"` (or `true`): burn's balanced checkpointing: results of matmuls and reductions
///   are kept, elementwise intermediates recomputed from them
///   ([`CheckpointedAutodiff`]);
/// - `"layer"`: HF's per-layer checkpointing: the forward pass keeps only each decoder layer's
///   input; the backward pass reruns one layer at a time ([`crate::learn::layerwise`]), so the
///   activations held are `layers x B x T x C` plus one layer's working set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum GradientCheckpointing {
    #[default]
    Off,
    Balanced,
    Layer,
}

impl GradientCheckpointing {}

impl std::fmt::Display for GradientCheckpointing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            GradientCheckpointing::Off => "off",
            GradientCheckpointing::Balanced => "balanced",
            GradientCheckpointing::Layer => "layer",
        })
    }
}

impl std::str::FromStr for GradientCheckpointing {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "off" | "false" | "none" => Ok(Self::Off),
            "balanced" | "true" => Ok(Self::Balanced),
            "layer" => Ok(Self::Layer),
            other => anyhow::bail!("gradient_checkpointing must be \"off\", \"balanced\" or \"layer\" (or false / true), got \"{other}\""),
        }
    }
}

/// Written back as recipes spell it: `false`, `true` (balanced), `"layer"`.
impl serde::Serialize for GradientCheckpointing {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        match self {
            GradientCheckpointing::Off => s.serialize_bool(false),
            GradientCheckpointing::Balanced => s.serialize_bool(true),
            GradientCheckpointing::Layer => s.serialize_str("layer"),
        }
    }
}

impl<'de> serde::Deserialize<'de> for GradientCheckpointing {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        #[derive(serde::Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Bool(bool),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Bool(false) => Ok(Self::Off),
            Raw::Bool(true) => Ok(Self::Balanced),
            Raw::Text(t) => t.parse().map_err(serde::de::Error::custom),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_names_and_reports_missing_backends() {
        assert_eq!(
            "NDARRAY".parse::<BackendKind>().unwrap(),
            BackendKind::Ndarray
        );
        assert!("tpu".parse::<BackendKind>().is_err());
        struct Nop;
        impl BackendJob for Nop {
            type Output = ();
            fn run<B: ModelBackend>(self, _: B::Device) -> Result<()> {
                Ok(())
            }
        }
        for kind in BackendKind::ALL {
            let r = dispatch(
                BackendArgs {
                    backend: kind,
                    ..Default::default()
                },
                Nop,
            );
            if !kind.is_compiled() {
                let msg = r.unwrap_err().to_string();
                assert!(msg.contains("not compiled"), "{msg}");
            }
        }
    }
}
