//! The rule that turns one row of logits and a uniform number into a token, written once so that every backend
//! draws the same token from the same inputs: the host runs it here, a GPU runs the same steps in its
//! `sample_rows` kernel and sends back only the ids.
//!
//! Steps: greedy (the argmax, lowest index on ties) when the temperature is 0; else `z = logit * (1 / T)`; top-k keeps
//! every `z` at least the k-th largest (ties at the cut all stay); weights `p = exp(z - max z)`; min-p keeps `p >=
//! min_p` (the largest weight is 1); top-p keeps every `p` at least the largest threshold whose kept mass reaches
//! `top_p` of the total (again ties stay); then the kept weights are walked in token-id order and the first whose
//! running sum exceeds `u * total` is drawn. Thresholds and index order, rather than sorting, make the choice
//! independent of evaluation order, which a GPU cannot reproduce otherwise; sums are f64 so that the host's and a
//! device's different summation orders agree but for draws within about 1e-15 of a boundary.

use super::argmax;

/// One row's draw: the sampling parameters that act on logits, and the uniform number from the sequence's seeded
/// generator. Decided on the host, carried out wherever the logits are.
#[derive(Debug, Clone, Copy, PartialEq)]
#[repr(C)]
pub struct Draw {
    /// 0: greedy (the rest is ignored).
    pub temperature: f32,
    /// 0 disables.
    pub top_k: u32,
    /// 1 disables.
    pub top_p: f32,
    /// 0 disables.
    pub min_p: f32,
    /// Uniform in `[0, 1)`.
    pub u: f32,
}

/// The token `d` draws from `logits`.
pub fn draw(logits: &[f32], d: &Draw) -> u32 {
    if d.temperature == 0.0 || logits.is_empty() {
        return argmax(logits);
    }
    let inv = 1.0 / d.temperature;
    let z: Vec<f32> = logits.iter().map(|&l| l * inv).collect();
    let zmax = z.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    let k = d.top_k as usize;
    let zmin = if k > 0 && k < z.len() {
        let mut sorted = z.clone();
        sorted.select_nth_unstable_by(k - 1, |a, b| b.total_cmp(a));
        sorted[k - 1]
    } else {
        f32::NEG_INFINITY
    };
    let mut p: Vec<f32> = z
        .iter()
        .map(|&v| if v >= zmin { (v - zmax).exp() } else { 0.0 })
        .collect();
    if d.min_p > 0.0 {
        p.iter_mut()
            .filter(|w| **w < d.min_p)
            .for_each(|w| *w = 0.0);
    }
    if d.top_p < 1.0 {
        let mut kept: Vec<f32> = p.iter().copied().filter(|&w| w > 0.0).collect();
        let total: f64 = p.iter().map(|&w| w as f64).sum();
        let target = d.top_p as f64 * total;
        // Mass of every weight >= each distinct value, from the largest down; the cut is the first value whose
        // mass reaches the target.
        kept.sort_unstable_by(|a, b| b.total_cmp(a));
        let mut mass = 0f64;
        let mut cut = 0f32;
        let mut i = 0;
        while i < kept.len() {
            let v = kept[i];
            while i < kept.len() && kept[i] == v {
                mass += v as f64;
                i += 1;
            }
            cut = v;
            if mass >= target {
                break;
            }
        }
        p.iter_mut().filter(|w| **w < cut).for_each(|w| *w = 0.0);
    }
    let total: f64 = p.iter().map(|&w| w as f64).sum();
    let r = d.u as f64 * total;
    let mut acc = 0f64;
    let mut last = 0;
    for (i, &w) in p.iter().enumerate() {
        if w > 0.0 {
            acc += w as f64;
            last = i;
            if acc > r {
                return i as u32;
            }
        }
    }
    last as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(temperature: f32, top_k: u32, top_p: f32, min_p: f32, u: f32) -> Draw {
        Draw {
            temperature,
            top_k,
            top_p,
            min_p,
            u,
        }
    }

    #[test]
    fn draws_walk_the_kept_weights_in_token_order() {
        // Weights at T = 1: exp(0) = 1 for token 1, exp(-1) for token 0 and 2, tiny for 3.
        let l = [2.0, 3.0, 2.0, -20.0];
        let total = 1.0 + 2.0 * (-1f64).exp();
        let w0 = (-1f64).exp() / total;
        assert_eq!(draw(&l, &d(1.0, 0, 1.0, 0.0, 0.0)), 0);
        assert_eq!(draw(&l, &d(1.0, 0, 1.0, 0.0, (w0 - 1e-4) as f32)), 0);
        assert_eq!(draw(&l, &d(1.0, 0, 1.0, 0.0, (w0 + 1e-4) as f32)), 1);
        assert_eq!(draw(&l, &d(1.0, 0, 1.0, 0.0, 0.9999)), 2);
        // Greedy ignores u; top-k 1 leaves only the best.
        assert_eq!(draw(&l, &d(0.0, 0, 1.0, 0.0, 0.9)), 1);
        assert_eq!(draw(&l, &d(1.0, 1, 1.0, 0.0, 0.9)), 1);
        // Top-k 2 with a tie at the cut keeps both tied tokens.
        assert_eq!(draw(&l, &d(1.0, 2, 1.0, 0.0, 0.9999)), 2);
        // min-p 0.5 drops tokens 0 and 2 (weights 0.37).
        assert_eq!(draw(&l, &d(1.0, 0, 1.0, 0.5, 0.0)), 1);
        // top-p 0.5: token 1 alone holds 0.58 of the mass.
        assert_eq!(draw(&l, &d(1.0, 0, 0.5, 0.0, 0.0)), 1);
        // top-p 0.7 needs the next value, held by two tied tokens: all three stay.
        assert_eq!(draw(&l, &d(1.0, 0, 0.7, 0.0, 0.0)), 0);
    }

    #[test]
    fn frequencies_follow_the_softmax() {
        let l: Vec<f32> = (0..8).map(|i| i as f32 * 0.3).collect();
        let mut counts = [0usize; 8];
        let n = 20000;
        for i in 0..n {
            let u = (i as f32 + 0.5) / n as f32;
            counts[draw(&l, &d(0.7, 0, 1.0, 0.0, u)) as usize] += 1;
        }
        let w: Vec<f64> = l.iter().map(|&v| ((v / 0.7) as f64).exp()).collect();
        let s: f64 = w.iter().sum();
        for (c, wi) in counts.iter().zip(&w) {
            let want = wi / s * n as f64;
            assert!((*c as f64 - want).abs() <= 2.0, "{c} vs {want}");
        }
    }
}
