//! The CUDA backend: bf16 weights in GPU memory, f32 activations, a paged KV store (f32 or f16) in GPU memory
//! ([`kv`]), kernels in CUDA C compiled at start-up with NVRTC ([`module`]), and GEMMs through cuBLAS (bf16
//! operands, f32 accumulate and output) or, for a few rows, the backend's own GEMV ([`gemm`]). Each step's layout
//! goes to the GPU in one copy ([`plan`]); decode steps are recorded once per shape and replayed as CUDA graphs
//! ([`graphs`]). CUDA is loaded at run time (cudarc's dynamic loading), so the binary builds and runs on machines
//! without it; [`CudaBackend::new`] says clearly when there is no usable GPU.
//!
//! The backend trait's operations cannot fail one by one; the first CUDA error is kept (as CUDA itself keeps a
//! sticky error) and [`crate::backend::Backend::check`] reports it at the end of the forward pass.

mod attention_check;
mod ceilings;
mod device_link;
mod gemm;
mod graphs;
mod kivi2;
mod kivi2_check;
mod kv;
mod module;
mod nccl;
mod open_blocks;
mod ops;
mod plan;
mod selfcheck;
mod staging;
mod transfer_check;

pub use ceilings::{
    AttentionShape, Ceilings, ceilings, decode_attention_time, gemv_read_rate, peer_copy_rate,
};
pub use kv::CudaKvStore;
pub use nccl::{DeviceBytes, LinkRank, NcclId, NcclLink, loopback_check, nccl_present};
pub use plan::CudaPlan;
pub use selfcheck::{KernelCheck, check_kernels};
pub use staging::StagingShape;

use crate::error::{EngineError, Result};
use cudarc::cublas::{CudaBlas, sys as blas_sys};
use cudarc::driver::{
    CudaContext, CudaSlice, CudaStream, DevicePtr, DevicePtrMut, DriverError, LaunchConfig,
};
use graphs::Graphs;
use module::Kernels;
use std::sync::{Arc, Mutex};

/// Whether the CUDA driver library can be loaded on this machine.
pub fn driver_present() -> bool {
    // SAFETY: only tries to open the driver library; nothing from it is called.
    unsafe { cudarc::driver::sys::is_culib_present() }
}

/// GPUs this machine has (0 without a CUDA driver, or when the driver cannot count them).
pub fn device_count() -> usize {
    if !driver_present() {
        return 0;
    }
    CudaContext::device_count().map_or(0, |n| n.max(0) as usize)
}

/// cuBLAS's workspace, given to it up front so that it never allocates while a step is being recorded.
const BLAS_WORKSPACE_BYTES: usize = 32 << 20;

pub struct CudaBackend {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    blas: CudaBlas,
    _blas_workspace: CudaSlice<u8>,
    k: Kernels,
    /// The bf16 copy of a GEMM's input (activations are f32).
    xb: Mutex<Option<CudaSlice<u16>>>,
    /// Split attention's partial results.
    part: Mutex<Option<CudaSlice<f32>>>,
    /// Split attention's arrival counts per (row, KV head); zero between launches.
    arrived: Mutex<Option<CudaSlice<u32>>>,
    /// The current step's plan words ([`plan::Packed`]).
    plan_buf: Mutex<Option<CudaSlice<u32>>>,
    /// Token ids chosen on the device.
    ids: Mutex<Option<CudaSlice<u32>>>,
    graphs: Mutex<Graphs>,
    /// Streaming multiprocessors, for sizing grids.
    sms: usize,
    /// Whether the small-batch products may start before the kernel ahead of them finishes (programmatic dependent
    /// launch: sm_90 and later, unless `TANDEM_CUDA_PDL=0`). Their weight loads then overlap that kernel's tail; they
    /// wait for it (`griddepcontrol.wait`) before reading its output.
    early_launch: bool,
    error: Mutex<Option<String>>,
    /// With `TANDEM_CUDA_PROFILE` set: synchronize after every operation and sum wall time per operation.
    profile: Option<Mutex<Profile>>,
    tally_warned: std::sync::atomic::AtomicBool,
}

/// Time per operation, when profiling.
struct Profile {
    last: std::time::Instant,
    spent: Vec<(&'static str, f64)>,
}

/// A bf16 weight matrix on the device, row-major `rows x cols`.
pub struct CudaMatrix {
    pub rows: usize,
    pub cols: usize,
    data: CudaSlice<u16>,
}

/// Row-major f32 activations on the device; the allocation only grows. Kernels whose output feeds a cuBLAS GEMM
/// also write a bf16 copy (`bf16`, valid while `bf16_fresh`), which the GEMM then reads as is.
pub struct CudaTensor {
    pub rows: usize,
    pub cols: usize,
    buf: Option<CudaSlice<f32>>,
    bf16: Option<CudaSlice<u16>>,
    bf16_fresh: bool,
}

impl CudaTensor {
    fn len(&self) -> usize {
        self.rows * self.cols
    }
}

fn grid_1d(n: usize) -> LaunchConfig {
    let blocks = n.div_ceil(256).clamp(1, 65_535) as u32;
    LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    }
}

fn cfg(grid: (u32, u32), threads: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (grid.0, grid.1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    }
}

impl CudaBackend {
    /// Opens GPU `ordinal`, compiles (or loads from the on-disk cache) the kernels and creates the cuBLAS handle.
    /// CUDA graphs for decode steps are on unless `TANDEM_CUDA_GRAPHS=0` (or profiling, which times each kernel).
    pub fn new(ordinal: usize) -> Result<Self> {
        if !driver_present() {
            return Err(EngineError::BackendUnavailable(
                "no CUDA driver (libcuda) on this machine".into(),
            ));
        }
        let dev = |e: DriverError| EngineError::Device(format!("CUDA: {e}"));
        let count = CudaContext::device_count().map_err(dev)?;
        if ordinal >= count as usize {
            return Err(EngineError::BackendUnavailable(format!(
                "GPU {ordinal} requested; this machine has {count}"
            )));
        }
        let ctx = CudaContext::new(ordinal).map_err(dev)?;
        // SAFETY: the backend uses one stream for everything, so cross-stream events are never needed (and event
        // records would get in the way of graph capture). Set before any allocation.
        unsafe { ctx.disable_event_tracking() };
        // A stream of its own: the legacy default stream cannot be captured into a graph.
        let stream = ctx.new_stream().map_err(dev)?;
        let k = Kernels::load(&ctx)?;
        let blas = CudaBlas::new(stream.clone())
            .map_err(|e| EngineError::Device(format!("cuBLAS: {e:?}")))?;
        let mut workspace = stream
            .alloc_zeros::<u8>(BLAS_WORKSPACE_BYTES)
            .map_err(dev)?;
        {
            let (ptr, _guard) = workspace.device_ptr_mut(&stream);
            // SAFETY: the workspace outlives the handle's use (both live in the backend).
            let status = unsafe {
                blas_sys::cublasSetWorkspace_v2(*blas.handle(), ptr as *mut _, BLAS_WORKSPACE_BYTES)
            };
            if status != blas_sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS {
                return Err(EngineError::Device(format!("cuBLAS workspace: {status:?}")));
            }
        }
        let sms = ctx
            .attribute(
                cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT,
            )
            .map_err(dev)? as usize;
        let major = ctx
            .attribute(
                cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR,
            )
            .map_err(dev)?;
        let early_launch =
            major >= 9 && std::env::var("TANDEM_CUDA_PDL").map_or(true, |v| v != "0");
        let profile = std::env::var_os("TANDEM_CUDA_PROFILE").map(|_| {
            Mutex::new(Profile {
                last: std::time::Instant::now(),
                spent: Vec::new(),
            })
        });
        let graphs_on =
            profile.is_none() && std::env::var("TANDEM_CUDA_GRAPHS").map_or(true, |v| v != "0");
        Ok(Self {
            part: Mutex::new(None),
            arrived: Mutex::new(None),
            plan_buf: Mutex::new(None),
            ids: Mutex::new(None),
            graphs: Mutex::new(Graphs::new(graphs_on)),
            sms,
            early_launch,
            ctx,
            stream,
            blas,
            _blas_workspace: workspace,
            k,
            xb: Mutex::new(None),
            error: Mutex::new(None),
            profile,
            tally_warned: Default::default(),
        })
    }

    /// The device's name, e.g. "NVIDIA H200".
    pub fn device_name(&self) -> String {
        self.ctx.name().unwrap_or_else(|_| "unknown GPU".into())
    }

    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// Decode step shapes recorded as CUDA graphs so far.
    pub fn recorded_graphs(&self) -> usize {
        lock(&self.graphs).recorded()
    }

    /// Keeps the first error.
    fn fail(&self, what: &str, e: impl std::fmt::Debug) {
        let mut slot = lock(&self.error);
        if slot.is_none() {
            *slot = Some(format!("{what}: {e:?}"));
        }
    }

    fn ok<T, E: std::fmt::Debug>(&self, what: &str, r: std::result::Result<T, E>) -> Option<T> {
        r.map_err(|e| self.fail(what, e)).ok()
    }

    /// Ends a step whose head writes one token id per row of `x` (`rows` of them): `launch(x, ids)` issues the
    /// kernel, then the ids come to the host (zeros, with the failure recorded, when something is missing).
    fn token_ids(
        &self,
        x: &CudaTensor,
        rows: usize,
        launch: impl FnOnce(&CudaSlice<f32>, &mut CudaSlice<u32>),
    ) -> Vec<u32> {
        let (Some(xb), true) = (x.buf.as_ref(), rows > 0) else {
            self.finish_step();
            return Vec::new();
        };
        let mut ids = lock(&self.ids);
        if !self.ensure("token id buffer", &mut ids, rows) {
            self.finish_step();
            return vec![0; rows];
        }
        let Some(ids) = ids.as_mut() else {
            return vec![0; rows];
        };
        launch(xb, ids);
        self.finish_step();
        let mut out = vec![0u32; rows];
        self.ok(
            "copying token ids to the host",
            self.stream.memcpy_dtoh(&ids.slice(0..rows), &mut out),
        );
        self.mark("token ids to host");
        out
    }

    /// Makes `buf` hold at least `need` elements (never fewer than one), reallocating (and dropping every recorded
    /// graph, which names the old memory) when it is smaller.
    fn ensure<T>(&self, what: &str, buf: &mut Option<CudaSlice<T>>, need: usize) -> bool
    where
        T: cudarc::driver::DeviceRepr + cudarc::driver::ValidAsZeroBits,
    {
        let need = need.max(1);
        if buf.as_ref().is_some_and(|b| b.len() >= need) {
            return true;
        }
        lock(&self.graphs).invalidate();
        *buf = self.ok(what, self.stream.alloc_zeros::<T>(need));
        buf.is_some()
    }

    /// Makes `t` hold `rows x cols`, growing its allocation if needed; it is about to be written.
    fn resize(&self, t: &mut CudaTensor, rows: usize, cols: usize) {
        self.ensure("allocating activations", &mut t.buf, rows * cols);
        t.rows = rows;
        t.cols = cols;
        t.bf16_fresh = false;
    }

    /// Where a kernel writing `t` should put its bf16 copy: the device address when a GEMM through cuBLAS will read
    /// `t` (the GEMV does not take it), else 0 (no copy). `t` has its shape already.
    fn bf16_target(&self, t: &mut CudaTensor) -> u64 {
        t.bf16_fresh = false;
        let n = t.len();
        if self.gemv_takes(t.rows, t.cols) || !self.ensure("allocating a bf16 copy", &mut t.bf16, n)
        {
            return 0;
        }
        t.bf16_fresh = true;
        t.bf16.as_ref().map_or(0, |b| b.device_ptr(&self.stream).0)
    }

    /// Issues one kernel (or library call), unless a recorded graph will run the step.
    fn launch(
        &self,
        what: &'static str,
        go: impl FnOnce() -> std::result::Result<(), DriverError>,
    ) {
        if lock(&self.graphs).replaying() {
            return;
        }
        self.ok(what, go());
        self.mark(what);
    }

    /// Launches `f` (a 1-D grid, no dynamic shared memory) with `args` pointing at its argument values, allowed to
    /// start before the kernel ahead of it finishes where `early_launch` says so. Such a kernel must call
    /// `wait_prior()` before it reads anything an earlier kernel wrote.
    fn launch_early(
        &self,
        what: &'static str,
        f: &cudarc::driver::CudaFunction,
        grid: u32,
        block: u32,
        args: &mut [*mut std::ffi::c_void],
    ) {
        use cudarc::driver::sys;
        // SAFETY: an all-zero launch attribute is a valid value of the C struct; the fields used are set below.
        let mut attr: sys::CUlaunchAttribute = unsafe { std::mem::zeroed() };
        attr.id = sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION;
        attr.value.programmaticStreamSerializationAllowed = 1;
        let config = sys::CUlaunchConfig {
            gridDimX: grid,
            gridDimY: 1,
            gridDimZ: 1,
            blockDimX: block,
            blockDimY: 1,
            blockDimZ: 1,
            sharedMemBytes: 0,
            hStream: self.stream.cu_stream(),
            attrs: &mut attr,
            numAttrs: u32::from(self.early_launch),
        };
        self.launch(what, || {
            self.ctx.bind_to_thread()?;
            // SAFETY: `args` holds one pointer per kernel parameter, in order, to values of the parameter's type
            // that outlive the call; the function and stream belong to this backend's context.
            unsafe {
                sys::cuLaunchKernelEx(
                    &config,
                    f.cu_function(),
                    args.as_mut_ptr(),
                    std::ptr::null_mut(),
                )
                .result()
            }
        });
    }

    /// Runs the step's recorded graph, if it has one (at the step's head, before results are copied back).
    fn finish_step(&self) {
        let r = lock(&self.graphs).finish(&self.stream);
        self.ok("CUDA graph", r);
    }

    /// Profiling: charges the time since the previous mark to `what` (after the device finished it).
    fn mark(&self, what: &'static str) {
        let Some(p) = &self.profile else { return };
        let _ = self.stream.synchronize();
        let mut p = lock(p);
        let now = std::time::Instant::now();
        let dt = (now - p.last).as_secs_f64();
        p.last = now;
        match p.spent.iter_mut().find(|(n, _)| *n == what) {
            Some((_, t)) => *t += dt,
            None => p.spent.push((what, dt)),
        }
    }

    /// Profiling: seconds per operation since the last call (empty unless `TANDEM_CUDA_PROFILE` is set).
    pub fn take_profile(&self) -> Vec<(&'static str, f64)> {
        let Some(p) = &self.profile else {
            return Vec::new();
        };
        let mut p = lock(p);
        p.last = std::time::Instant::now();
        std::mem::take(&mut p.spent)
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Marks its operation when dropped.
struct Marked<'a>(&'a CudaBackend, &'static str);

impl Drop for Marked<'_> {
    fn drop(&mut self) {
        self.0.mark(self.1);
    }
}
