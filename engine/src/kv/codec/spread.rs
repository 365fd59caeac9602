//! The turn the `int4` codec applies to each key before quantizing it: an orthonormal Walsh-Hadamard transform of
//! the head vector, which spreads a few large channels over all of them.
//!
//! Keys carry outlier channels (the slowly turning RoPE pairs hold most of a key's magnitude), so a 32-dim group
//! that contains one gets a wide range and coarse codes for every other channel in it. After the transform each
//! channel is a signed sum of all of them, the ranges even out, and the error the codes leave is spread evenly
//! instead of falling on the few channels that set the range (QuaRot, Ashkboos et al. 2024, and QuIP#, Tseng et al.
//! 2024, rotate for the same reason). The transform is orthonormal and its own inverse, so the decoder applies it
//! again to the decoded codes; a score `q . k` is unchanged by turning both sides, and the error of `q . k` has the
//! same size as the key error's length, which the transform does not change.
//!
//! Measured with `tandem eval kv` (bench/RESULTS.md, 2026-12-04 "(fourth)"): mean KL against the uncompressed run
//! about halves on five texts; turning values as well gains nothing measurable, so they are left as they are.
//!
//! A head of `head_dim` dims is split into runs whose lengths are the powers of two in `head_dim`'s binary form,
//! largest first (64 is one run, 96 is 64 + 32, 80 is 64 + 16), and each run is transformed alone; both ends derive
//! the runs from the layout the transfer header carries.

/// The runs a `head_dim`-long vector is turned in: the powers of two of `head_dim`'s binary form, largest first.
pub fn runs(head_dim: usize) -> impl Iterator<Item = std::ops::Range<usize>> {
    let mut start = 0;
    std::iter::from_fn(move || {
        let rest = head_dim - start;
        (rest > 0).then(|| {
            let run = start..start + (1 << rest.ilog2());
            start = run.end;
            run
        })
    })
}

/// Turns one head vector in place (applying it twice gives the vector back up to float rounding).
pub fn turn(x: &mut [f32]) {
    for run in runs(x.len()) {
        walsh_hadamard(&mut x[run]);
    }
}

/// Turns every `head_dim`-long vector of `x` (a block half in `[head][token][dim]` order).
pub fn turn_all(x: &mut [f32], head_dim: usize) {
    x.chunks_exact_mut(head_dim).for_each(turn);
}

/// The orthonormal transform of a power-of-two run: butterflies of doubling span (the first three spans within
/// each run of eight at once, the rest across whole lanes of eight, which vectorize), then one scaling by
/// `1 / sqrt(len)`.
fn walsh_hadamard(x: &mut [f32]) {
    let n = x.len();
    debug_assert!(n.is_power_of_two());
    let mut span = 1;
    if n >= 8 {
        x.chunks_exact_mut(8).for_each(eight);
        span = 8;
    }
    while span < n {
        for pair in x.chunks_exact_mut(2 * span) {
            let (a, b) = pair.split_at_mut(span);
            for (u, v) in a.iter_mut().zip(b.iter_mut()) {
                let (s, d) = (*u + *v, *u - *v);
                *u = s;
                *v = d;
            }
        }
        span *= 2;
    }
    let norm = 1.0 / (n as f32).sqrt();
    x.iter_mut().for_each(|v| *v *= norm);
}

/// Spans 1, 2 and 4 of eight values (unnormalized).
fn eight(x: &mut [f32]) {
    let [a, b, c, d, e, f, g, h] = [x[0], x[1], x[2], x[3], x[4], x[5], x[6], x[7]];
    let (a, b, c, d, e, f, g, h) = (a + b, a - b, c + d, c - d, e + f, e - f, g + h, g - h);
    let (a, b, c, d, e, f, g, h) = (a + c, b + d, a - c, b - d, e + g, f + h, e - g, f - h);
    x.copy_from_slice(&[a + e, b + f, c + g, d + h, a - e, b - f, c - g, d - h]);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lcg(seed: &mut u64) -> f32 {
        *seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((*seed >> 40) as f32 / (1u64 << 24) as f32) - 0.5
    }

    #[test]
    fn turning_twice_gives_the_vector_back_and_keeps_its_length() {
        let mut seed = 7;
        for len in [1, 2, 3, 16, 32, 64, 80, 96, 128, 130] {
            let x: Vec<f32> = (0..len).map(|_| lcg(&mut seed)).collect();
            let mut y = x.clone();
            turn(&mut y);
            let norm = |v: &[f32]| v.iter().map(|a| a * a).sum::<f32>().sqrt();
            assert!(
                (norm(&x) - norm(&y)).abs() <= 1e-5 * norm(&x).max(1.0),
                "len {len}"
            );
            if len >= 2 {
                assert_ne!(x, y, "len {len}: the turn changed nothing");
            }
            turn(&mut y);
            for (i, (a, b)) in x.iter().zip(&y).enumerate() {
                assert!((a - b).abs() <= 1e-6, "len {len} dim {i}: {a} -> {b}");
            }
        }
    }

    #[test]
    fn one_large_channel_is_spread_over_its_run() {
        // A 64-dim head with one outlier: afterwards every dim holds +-outlier / 8 plus the small ones' share.
        let mut x = vec![0.01f32; 64];
        x[5] = 8.0;
        turn(&mut x);
        let (lo, hi) = x.iter().fold((f32::MAX, 0f32), |(lo, hi), v| {
            (lo.min(v.abs()), hi.max(v.abs()))
        });
        assert!(hi < 1.2 && lo > 0.8, "magnitudes {lo}..{hi}");
    }

    #[test]
    fn runs_are_the_binary_form_of_the_head_largest_first() {
        let all = |n| runs(n).collect::<Vec<_>>();
        assert_eq!(all(64), vec![(0..64)]);
        assert_eq!(all(96), [0..64, 64..96]);
        assert_eq!(all(7), [0..4, 4..6, 6..7]);
        assert!(all(0).is_empty());
    }

    #[test]
    fn a_head_that_is_not_a_power_of_two_turns_in_runs() {
        // 80 = 64 + 16: a change in the last 16 dims never reaches the first 64.
        let mut a = vec![0f32; 80];
        let mut b = a.clone();
        b[70] = 1.0;
        turn(&mut a);
        turn(&mut b);
        assert_eq!(a[..64], b[..64]);
        assert!(b[64..].iter().all(|v| (v.abs() - 0.25).abs() < 1e-6));
    }
}
