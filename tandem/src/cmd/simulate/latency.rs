//! The simulated workers' clock: step times as functions fitted to measured engine runs.
//!
//! `prefill_s(new, cached) = a + b*new + c*new*(cached + new/2)`: a fixed cost, a per-token cost (the matmuls) and
//! attention over the average context the new tokens see. `decode_s(batch, context) = a + b*batch + c*context`,
//! with `context` the sum of the batch's sequence lengths: weights read once per step, per-sequence work, and KV
//! read. [`measure`] times the real engine at a spread of sizes and fits both by least squares; the fit and its
//! points travel as JSON, and the default one (measured on the development machine) is compiled in.

use crate::cmd::ModelArgs;
use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use std::time::Instant;
use tandem_engine::sampling::argmax;

/// `a + b*x + c*y` with the fitted coefficients.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
pub struct Linear3 {
    pub a: f64,
    pub b: f64,
    pub c: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Point {
    /// Prefill: new tokens; decode: batch size.
    pub x: usize,
    /// Prefill: cached tokens before them; decode: sum of the batch's contexts.
    pub y: usize,
    pub seconds: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LatencyModel {
    /// Where the points came from (machine, model, date).
    pub source: String,
    pub prefill: Linear3,
    pub decode: Linear3,
    pub prefill_points: Vec<Point>,
    pub decode_points: Vec<Point>,
}

/// The fit measured with `tandem simulate --measure` on the development machine.
const DEFAULT: &str = include_str!("../../../../bench/latency-model-cpu.json");

impl LatencyModel {
    pub fn builtin() -> Self {
        serde_json::from_str(DEFAULT).expect("the compiled-in latency model is valid JSON")
    }

    pub fn load(path: &std::path::Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read latency model {}", path.display()))?;
        serde_json::from_str(&text)
            .with_context(|| format!("latency model {} is not valid", path.display()))
    }

    pub fn prefill_s(&self, new: usize, cached: usize) -> f64 {
        let (n, c) = (new as f64, cached as f64);
        let p = self.prefill;
        (p.a + p.b * n + p.c * n * (c + n / 2.0)).max(1e-6)
    }

    pub fn decode_s(&self, batch: usize, context: usize) -> f64 {
        let d = self.decode;
        (d.a + d.b * batch as f64 + d.c * context as f64).max(1e-6)
    }

    /// One line for reports.
    pub fn describe(&self) -> String {
        let (p, d) = (self.prefill, self.decode);
        format!(
            "{}: prefill_s = {:.3e} + {:.3e}*new + {:.3e}*new*(cached+new/2); decode_s = {:.3e} + {:.3e}*batch + {:.3e}*context",
            self.source, p.a, p.b, p.c, d.a, d.b, d.c
        )
    }
}

/// Least squares for `s = a + b*f1 + c*f2` through the normal equations.
pub fn fit(rows: &[(f64, f64, f64)]) -> Result<Linear3> {
    let mut m = [[0f64; 4]; 3];
    for &(f1, f2, s) in rows {
        let v = [1.0, f1, f2];
        for i in 0..3 {
            for j in 0..3 {
                m[i][j] += v[i] * v[j];
            }
            m[i][3] += v[i] * s;
        }
    }
    // Gaussian elimination with partial pivoting.
    for col in 0..3 {
        let piv = (col..3)
            .max_by(|&a, &b| m[a][col].abs().total_cmp(&m[b][col].abs()))
            .unwrap_or(col);
        m.swap(col, piv);
        if m[col][col].abs() < 1e-30 {
            anyhow::bail!("the measured points do not determine a fit (too few distinct sizes)");
        }
        let pivot = m[col];
        for (r, row) in m.iter_mut().enumerate() {
            if r != col {
                let f = row[col] / pivot[col];
                for (x, p) in row.iter_mut().zip(pivot).skip(col) {
                    *x -= f * p;
                }
            }
        }
    }
    Ok(Linear3 {
        a: m[0][3] / m[0][0],
        b: m[1][3] / m[1][1],
        c: m[2][3] / m[2][2],
    })
}

/// Times the real engine and fits the model. Prefill: cold prompts of several lengths and prompts that extend a
/// cached prefix; decode: steps over batches of several sizes at two context lengths.
pub fn measure(args: &ModelArgs, threads: usize) -> Result<LatencyModel> {
    let mut args = args.clone();
    args.kv_cache_mib = args.kv_cache_mib.max(512);
    let mut loaded = crate::cmd::load(&args, threads)?;
    let eng = &mut loaded.engine;
    let vocab = eng.model.config.vocab;
    let token = |i: usize, salt: usize| (100 + (i * 7919 + salt * 104_729) % (vocab - 100)) as u32;
    let prefill_sizes = [
        (16, 0),
        (64, 0),
        (128, 0),
        (256, 0),
        (512, 0),
        (1024, 0),
        (128, 512),
        (256, 768),
    ];
    let batches = [1usize, 2, 4, 8, 16];
    let contexts = [64usize, 320];
    let pb = crate::progress::bar(
        (prefill_sizes.len() + batches.len() * contexts.len()) as u64,
        "measuring",
    );
    let mut salt = 1;
    let mut prefill_points = Vec::new();
    for &(new, cached) in &prefill_sizes {
        salt += 1;
        let prompt: Vec<u32> = (0..cached + new).map(|i| token(i, salt)).collect();
        if cached > 0 {
            // Leave the prefix in the prefix cache.
            let s = eng.add_sequence(&prompt[..cached])?;
            eng.prefill(s)?;
            eng.remove_sequence(s)?;
        }
        let s = eng.add_sequence(&prompt)?;
        let t = Instant::now();
        eng.prefill(s)?;
        prefill_points.push(Point {
            x: new,
            y: cached,
            seconds: t.elapsed().as_secs_f64(),
        });
        eng.remove_sequence(s)?;
        pb.inc(1);
    }
    let mut decode_points = Vec::new();
    for &ctx in &contexts {
        for &b in &batches {
            let mut seqs = Vec::new();
            for s in 0..b {
                salt += 1;
                let prompt: Vec<u32> = (0..ctx).map(|i| token(i, salt * 64 + s)).collect();
                let id = eng.add_sequence(&prompt)?;
                let logits = eng.prefill(id)?;
                eng.append_token(id, argmax(&logits))?;
                seqs.push(id);
            }
            let steps = 8;
            let t = Instant::now();
            for _ in 0..steps {
                eng.step_greedy(&seqs)?;
            }
            decode_points.push(Point {
                x: b,
                y: b * (ctx + 1 + steps / 2),
                seconds: t.elapsed().as_secs_f64() / steps as f64,
            });
            for s in seqs {
                eng.remove_sequence(s)?;
            }
            pb.inc(1);
        }
    }
    pb.finish_and_clear();
    let prefill = fit(&prefill_points
        .iter()
        .map(|p| {
            (
                p.x as f64,
                p.x as f64 * (p.y as f64 + p.x as f64 / 2.0),
                p.seconds,
            )
        })
        .collect::<Vec<_>>())?;
    let decode = fit(&decode_points
        .iter()
        .map(|p| (p.x as f64, p.y as f64, p.seconds))
        .collect::<Vec<_>>())?;
    Ok(LatencyModel {
        source: format!(
            "measured {} with {} on {threads} threads",
            crate::cmd::simulate::today(),
            args.model.display()
        ),
        prefill,
        decode,
        prefill_points,
        decode_points,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fit_recovers_known_coefficients() {
        let rows: Vec<(f64, f64, f64)> = [(1.0, 10.0), (2.0, 3.0), (5.0, 7.0), (9.0, 1.0)]
            .iter()
            .map(|&(x, y)| (x, y, 0.5 + 2.0 * x + 0.25 * y))
            .collect();
        let f = fit(&rows).unwrap();
        assert!(
            (f.a - 0.5).abs() < 1e-9 && (f.b - 2.0).abs() < 1e-9 && (f.c - 0.25).abs() < 1e-9,
            "{f:?}"
        );
        assert!(fit(&[(1.0, 1.0, 1.0), (1.0, 1.0, 2.0)]).is_err());
    }

    #[test]
    fn the_builtin_model_is_plausible() {
        let m = LatencyModel::builtin();
        assert!(m.prefill_s(512, 0) > m.prefill_s(64, 0));
        assert!(m.prefill_s(256, 768) > m.prefill_s(256, 0));
        assert!(m.decode_s(16, 16 * 512) > m.decode_s(1, 512));
        assert!(!m.prefill_points.is_empty() && !m.decode_points.is_empty());
    }
}
