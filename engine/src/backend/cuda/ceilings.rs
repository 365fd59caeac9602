//! The two ceilings every GPU figure is judged against, measured on the device at hand: device-to-device copy
//! bandwidth (bytes read plus bytes written) and the bf16 GEMM rate of the backend's own GEMM path.

use super::{CudaBackend, CudaMatrix};
use crate::error::{EngineError, Result};
use std::time::Instant;

#[derive(Debug, Clone, Copy)]
pub struct Ceilings {
    /// Bytes read plus bytes written per second by a large device-to-device copy.
    pub copy_bytes_per_s: f64,
    /// FLOP/s of an 8192-cube bf16 GEMM (f32 accumulate and output) through the backend.
    pub gemm_flops_per_s: f64,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Measures both ceilings (median of 10 after a warm-up; random data, never zeros).
pub fn ceilings(b: &CudaBackend) -> Result<Ceilings> {
    let dev =
        |e: cudarc::driver::DriverError| EngineError::Device(format!("measuring ceilings: {e}"));
    let s = &b.stream;
    let n = 1usize << 29; // 1 GiB of u16
    let host: Vec<u16> = (0..n as u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 16) as u16)
        .collect();
    let src = s.clone_htod(&host).map_err(dev)?;
    let mut dst = s.alloc_zeros::<u16>(n).map_err(dev)?;
    let mut times = Vec::new();
    for i in 0..11 {
        s.synchronize().map_err(dev)?;
        let t = Instant::now();
        s.memcpy_dtod(&src, &mut dst).map_err(dev)?;
        s.synchronize().map_err(dev)?;
        if i > 0 {
            times.push(t.elapsed().as_secs_f64());
        }
    }
    let copy_bytes_per_s = 2.0 * (n * 2) as f64 / median(times);
    drop((src, dst));

    let d = 8192usize;
    let host: Vec<u16> = (0..(d * d) as u32)
        .map(|i| {
            half::bf16::from_f32(((i.wrapping_mul(2_654_435_761) >> 8) as f32 / 16_777_216.0) - 0.5)
                .to_bits()
        })
        .collect();
    let w = CudaMatrix {
        rows: d,
        cols: d,
        data: s.clone_htod(&host).map_err(dev)?,
    };
    let xb = s.clone_htod(&host).map_err(dev)?;
    let mut out = s.alloc_zeros::<f32>(d * d).map_err(dev)?;
    let mut times = Vec::new();
    for i in 0..11 {
        s.synchronize().map_err(dev)?;
        let t = Instant::now();
        b.gemm(&w, &xb, d, &mut out);
        s.synchronize().map_err(dev)?;
        if i > 0 {
            times.push(t.elapsed().as_secs_f64());
        }
    }
    crate::backend::Backend::check(b)?;
    let gemm_flops_per_s = 2.0 * (d * d * d) as f64 / median(times);
    Ok(Ceilings {
        copy_bytes_per_s,
        gemm_flops_per_s,
    })
}
