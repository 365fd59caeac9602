//! The rule that turns one row of logits and a uniform number into a token, written once so that every backend
//! draws the same token from the same inputs: the host runs it here, a GPU runs the same steps in its
//! `sample_rows` kernel and sends back only the ids.
//!
//! Steps: the row's penalties ([`Penalty`]: each named token's logit `l` becomes `(l > 0 ? l / r : l * r) - s`); then
//! greedy (the argmax, lowest index on ties) when the temperature is 0; else `z = logit * (1 / T)`; top-k keeps
//! every `z` at least the k-th largest (ties at the cut all stay); weights `p = exp(z - max z)`; min-p keeps `p >=
//! min_p` (the largest weight is 1); top-p keeps every `p` at least the largest threshold whose kept mass reaches
//! `top_p` of the total (again ties stay); then the kept weights are walked in token-id order and the first whose
//! running sum exceeds `u * total` is drawn. Thresholds and index order, rather than sorting, make the choice
//! independent of evaluation order, which a GPU cannot reproduce otherwise; sums are f64 so that the host's and a
//! device's different summation orders agree but for draws within about 1e-15 of a boundary.

use super::argmax;

/// One row's draw: the sampling parameters that act on logits, the penalties of the tokens the sequence has seen,
/// and the uniform number from the sequence's seeded generator. Decided on the host, carried out wherever the
/// logits are.
#[derive(Debug, Clone, PartialEq)]
pub struct Draw {
    /// 0: greedy (the rest but `penalties` is ignored).
    pub temperature: f32,
    /// 0 disables.
    pub top_k: u32,
    /// 1 disables.
    pub top_p: f32,
    /// 0 disables.
    pub min_p: f32,
    /// Uniform in `[0, 1)`.
    pub u: f32,
    /// At most one per token, in any order; empty without penalties.
    pub penalties: Vec<Penalty>,
}

/// What the repetition, presence and frequency penalties do to one token's logit, folded into two numbers by the
/// sampler ([`super::Sampler::next_draw`]): `l` becomes `(l > 0 ? l / repetition : l * repetition) - subtract`
/// (two roundings, in that order, on every backend).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Penalty {
    pub token: u32,
    /// 1 leaves the logit's scale alone.
    pub repetition: f32,
    /// presence + frequency x count for output tokens, else 0.
    pub subtract: f32,
}

impl Penalty {
    pub fn apply(&self, l: f32) -> f32 {
        let scaled = if l > 0.0 {
            l / self.repetition
        } else {
            l * self.repetition
        };
        scaled - self.subtract
    }
}

/// `logits` with `penalties` applied (borrowed as is when there are none).
fn penalized<'a>(logits: &'a [f32], penalties: &[Penalty]) -> std::borrow::Cow<'a, [f32]> {
    if penalties.is_empty() {
        return std::borrow::Cow::Borrowed(logits);
    }
    let mut l = logits.to_vec();
    for p in penalties {
        if let Some(v) = l.get_mut(p.token as usize) {
            *v = p.apply(*v);
        }
    }
    std::borrow::Cow::Owned(l)
}

/// The token `d` draws from `logits`.
pub fn draw(logits: &[f32], d: &Draw) -> u32 {
    let logits = &*penalized(logits, &d.penalties);
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
        let cut = top_p_cut(&p, d.top_p);
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

/// The largest kept weight whose mass (the sum of every weight at least as large) reaches `top_p` of the total;
/// the smallest kept weight if rounding leaves every mass short; 0 when no weight is kept. Weights are non-negative,
/// so their bits order them: one pass sums the mass of each binade (exponent), and only the binade where the target
/// falls is sorted.
fn top_p_cut(p: &[f32], top_p: f32) -> f32 {
    let binade = |w: f32| (w.to_bits() >> 23) as usize;
    let mut mass = [0f64; 256];
    let mut total = 0f64;
    for &w in p.iter().filter(|&&w| w > 0.0) {
        mass[binade(w)] += w as f64;
        total += w as f64;
    }
    let target = top_p as f64 * total;
    let mut above = 0f64;
    for b in (0..256).rev() {
        if mass[b] == 0.0 {
            continue;
        }
        let lowest = mass[..b].iter().all(|&m| m == 0.0);
        if above + mass[b] >= target || lowest {
            let mut band: Vec<f32> = p
                .iter()
                .copied()
                .filter(|&w| w > 0.0 && binade(w) == b)
                .collect();
            band.sort_unstable_by(|a, b| b.total_cmp(a));
            let mut i = 0;
            let mut cut = band[0];
            while i < band.len() {
                cut = band[i];
                while i < band.len() && band[i] == cut {
                    above += cut as f64;
                    i += 1;
                }
                if above >= target {
                    return cut;
                }
            }
            // Rounding left this binade short: the next one down holds the cut, else this is the smallest kept.
            if lowest {
                return cut;
            }
            continue;
        }
        above += mass[b];
    }
    0.0
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
            penalties: Vec::new(),
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
    fn penalties_act_before_greedy_and_draws() {
        let l = [2.0, 3.0, -1.0, 0.5];
        let pen = |token, repetition, subtract| Penalty {
            token,
            repetition,
            subtract,
        };
        // Token 1 divided by 2 (1.5) loses to token 0; then a subtraction of 0.6 leaves 1.4 for token 0 and makes
        // token 1 the largest again.
        let mut g = d(0.0, 0, 1.0, 0.0, 0.0);
        g.penalties = vec![pen(1, 2.0, 0.0)];
        assert_eq!(draw(&l, &g), 0);
        g.penalties.push(pen(0, 1.0, 0.6));
        assert_eq!(draw(&l, &g), 1);
        // A negative logit is multiplied: -1 x 0.5 = -0.5 beats 0.5 - 1.1 = -0.6 once both others are pushed down.
        g.penalties = vec![
            pen(0, 1.0, 10.0),
            pen(1, 1.0, 10.0),
            pen(2, 0.5, 0.0),
            pen(3, 1.0, 1.1),
        ];
        assert_eq!(draw(&l, &g), 2);
        // A sampled draw sees the same logits: with top-k 1 it is the penalized argmax.
        let mut s = d(0.8, 1, 1.0, 0.0, 0.5);
        s.penalties = g.penalties.clone();
        assert_eq!(draw(&l, &s), 2);
        // Out-of-vocabulary tokens are ignored.
        s.penalties = vec![pen(99, 2.0, 1.0)];
        assert_eq!(draw(&l, &s), 1);
    }

    #[test]
    fn the_top_p_cut_is_the_one_a_full_sort_finds() {
        // Reference: sort every kept weight, largest first, and stop at the first distinct value whose mass
        // reaches the target.
        fn by_sorting(p: &[f32], top_p: f32) -> f32 {
            let mut kept: Vec<f32> = p.iter().copied().filter(|&w| w > 0.0).collect();
            let target = top_p as f64 * kept.iter().map(|&w| w as f64).sum::<f64>();
            kept.sort_unstable_by(|a, b| b.total_cmp(a));
            let (mut mass, mut cut, mut i) = (0f64, 0f32, 0);
            while i < kept.len() {
                cut = kept[i];
                while i < kept.len() && kept[i] == cut {
                    mass += cut as f64;
                    i += 1;
                }
                if mass >= target {
                    break;
                }
            }
            cut
        }
        let mut rng = crate::rng::Rng::new(3);
        for case in 0..200 {
            let n = 1 + case * 7;
            // Weights over many binades, some zeros, and ties (values on a coarse grid in every fourth case).
            let p: Vec<f32> = (0..n)
                .map(|_| {
                    let w = (-(rng.next_f32() * 30.0)).exp();
                    match case % 4 {
                        0 => (w * 8.0).round() / 8.0,
                        1 if rng.next_f32() < 0.2 => 0.0,
                        _ => w,
                    }
                })
                .collect();
            for top_p in [0.0, 0.1, 0.5, 0.9, 0.99, 0.999_999] {
                assert_eq!(
                    top_p_cut(&p, top_p),
                    by_sorting(&p, top_p),
                    "case {case} top_p {top_p}"
                );
            }
        }
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
