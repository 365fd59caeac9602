//! Matrix products: `out = x @ w^T` with bf16 weights and f32 activations. Up to eight rows (decode at small
//! batch, bound by reading the weights once) go to the backend's own GEMV kernel, which reads each weight byte once
//! at full load width and takes up to three weights sharing one input in one launch; more rows go through cuBLAS
//! (the input copied to bf16 first, f32 accumulate and output).

use super::module::{GEMV_THREADS, fuller_last_wave};
use super::{CudaBackend, CudaMatrix, CudaTensor, grid_1d, lock};
use cudarc::cublas::sys as blas_sys;
use cudarc::driver::{CudaSlice, DevicePtr, DevicePtrMut, PushKernelArg};

impl CudaBackend {
    /// Whether a product with `rows` input rows of `cols` columns takes the GEMV (and the fused SwiGLU GEMV) rather
    /// than cuBLAS: up to eight rows, `cols % 8 == 0` (16-byte loads).
    pub(super) fn gemv_takes(&self, rows: usize, cols: usize) -> bool {
        (1..=self.k.gemv.len()).contains(&rows) && cols.is_multiple_of(8)
    }

    pub(super) fn matmul_rows(&self, x: &CudaTensor, pairs: &mut [(&CudaMatrix, &mut CudaTensor)]) {
        let Some(xf) = x.buf.as_ref() else { return };
        if self.gemv_takes(x.rows, x.cols) {
            for group in pairs.chunks_mut(3) {
                self.gemv(x.rows, x.cols, xf, group);
            }
            return;
        }
        let mut xb = lock(&self.xb);
        let xb = match (&x.bf16, x.bf16_fresh) {
            // Its producer wrote the bf16 copy already.
            (Some(b), true) => b,
            _ => {
                let n = x.len();
                if !self.ensure("allocating the GEMM input", &mut xb, n) {
                    return;
                }
                let Some(xb) = xb.as_mut() else { return };
                let nn = n as u64;
                let mut b = self.stream.launch_builder(&self.k.to_bf16);
                b.arg(xf).arg(&mut *xb).arg(&nn);
                self.launch("to_bf16", || unsafe { b.launch(grid_1d(n)) }.map(drop));
                xb
            }
        };
        for (w, out) in pairs.iter_mut() {
            self.resize(out, x.rows, w.rows);
            let Some(o) = out.buf.as_mut() else { return };
            self.launch("gemm", || {
                self.gemm(w, xb, x.rows, o);
                Ok(())
            });
        }
    }

    /// `gate = silu(x @ w_gate^T) * (x @ w_up^T)`: one GEMV pass over both weights for up to eight rows, else the
    /// two products (cuBLAS) and the elementwise kernel.
    pub(super) fn swiglu_rows(
        &self,
        x: &CudaTensor,
        w_gate: &CudaMatrix,
        w_up: &CudaMatrix,
        gate: &mut CudaTensor,
        up: &mut CudaTensor,
    ) {
        if !self.gemv_takes(x.rows, x.cols) || w_gate.rows != w_up.rows {
            self.matmul_rows(x, &mut [(w_gate, &mut *gate), (w_up, &mut *up)]);
            return crate::backend::Backend::silu_mul(self, gate, up);
        }
        self.resize(gate, x.rows, w_gate.rows);
        let (Some(xf), Some(o)) = (x.buf.as_ref(), gate.buf.as_mut()) else {
            return;
        };
        let (mut wg, mut wu) = (self.addr(&w_gate.data), self.addr(&w_up.data));
        let (mut op, mut xp) = (o.device_ptr_mut(&self.stream).0, self.addr(xf));
        let (mut n, mut k) = (w_gate.rows as i32, x.cols as i32);
        let mut args = [
            arg(&mut wg),
            arg(&mut wu),
            arg(&mut op),
            arg(&mut n),
            arg(&mut xp),
            arg(&mut k),
        ];
        let blocks = w_gate.rows.div_ceil(8) as u32;
        self.launch_early(
            "gemv_swiglu",
            &self.k.gemv_swiglu[x.rows - 1],
            blocks,
            256,
            &mut args,
        );
    }

    /// A device buffer's address, as a kernel argument.
    fn addr<T>(&self, s: &CudaSlice<T>) -> u64 {
        s.device_ptr(&self.stream).0
    }

    /// Up to three weights sharing the input `x` (`rows x k`, rows <= 8) in one launch of the small-batch kernel.
    fn gemv(
        &self,
        rows: usize,
        k: usize,
        x: &CudaSlice<f32>,
        group: &mut [(&CudaMatrix, &mut CudaTensor)],
    ) {
        let total: usize = group.iter().map(|(w, _)| w.rows).sum();
        for (w, out) in group.iter_mut() {
            self.resize(out, rows, w.rows);
        }
        // Unused slots: a real pointer with no rows.
        let first = self.addr(&group[0].0.data);
        let mut p = [first; 6]; // weight, output; three times
        let mut n = [0i32; 3];
        for (i, (w, out)) in group.iter_mut().enumerate() {
            let Some(o) = out.buf.as_mut() else { return };
            p[2 * i] = self.addr(&w.data);
            p[2 * i + 1] = o.device_ptr_mut(&self.stream).0;
            n[i] = w.rows as i32;
        }
        let (mut xp, mut k) = (self.addr(x), k as i32);
        let [w0, o0, w1, o1, w2, o2] = &mut p;
        let [n0, n1, n2] = &mut n;
        let mut args = [
            arg(w0),
            arg(o0),
            arg(n0),
            arg(w1),
            arg(o1),
            arg(n1),
            arg(w2),
            arg(o2),
            arg(n2),
            arg(&mut xp),
            arg(&mut k),
        ];
        let blocks = total.div_ceil(GEMV_THREADS / 32);
        let f = if rows == 1 {
            let [(a, pa), (b, pb)] = &self.k.gemv_one_row;
            [a, b][fuller_last_wave(blocks, self.sms, &[*pa, *pb])]
        } else {
            &self.k.gemv[rows - 1]
        };
        self.launch_early("gemv", f, blocks as u32, GEMV_THREADS as u32, &mut args);
    }

    /// `out (rows x w.rows) = x (rows x w.cols) @ w^T` in cuBLAS's column-major terms: `out^T = w . x^T`, with `w`
    /// (row-major, so column-major `w^T`) transposed and `x^T` as is.
    pub(super) fn gemm(
        &self,
        w: &CudaMatrix,
        xb: &CudaSlice<u16>,
        rows: usize,
        out: &mut CudaSlice<f32>,
    ) {
        let (m, n, k) = (w.rows as i32, rows as i32, w.cols as i32);
        let (alpha, beta) = (1.0f32, 0.0f32);
        let (a, _ga) = w.data.device_ptr(&self.stream);
        let (b, _gb) = xb.device_ptr(&self.stream);
        let (c, _gc) = out.device_ptr_mut(&self.stream);
        let r = unsafe {
            cudarc::cublas::result::gemm_ex(
                *self.blas.handle(),
                blas_sys::cublasOperation_t::CUBLAS_OP_T,
                blas_sys::cublasOperation_t::CUBLAS_OP_N,
                m,
                n,
                k,
                (&alpha) as *const f32 as *const _,
                a as *const _,
                blas_sys::cudaDataType_t::CUDA_R_16BF,
                k,
                b as *const _,
                blas_sys::cudaDataType_t::CUDA_R_16BF,
                k,
                (&beta) as *const f32 as *const _,
                c as *mut _,
                blas_sys::cudaDataType_t::CUDA_R_32F,
                m,
                blas_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                blas_sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        };
        self.ok("cuBLAS GEMM", r);
    }
}

/// A kernel argument for a raw launch: a pointer to its value.
fn arg<T>(v: &mut T) -> *mut std::ffi::c_void {
    (v as *mut T).cast()
}
