//! Every codec round-trips random blocks within its stated error bound, and its decoder survives any bytes.

use super::*;
use half::f16;
use proptest::prelude::*;

const RAWS: [KvFormat; 6] = KvFormat::ALL;

/// A RoPE at the shape's head_dim (odd head dims have none: the rotation leaves them as they are).
fn rotation(s: BlockShape) -> KeyRotation {
    let rope = crate::model::RopeConfig {
        theta: 10_000.0,
        layout: crate::model::RopeLayout::Halves,
        freq_factors: None,
    };
    KeyRotation::new(&rope, s.head_dim, s.block_size)
}

fn shape_and_block() -> impl Strategy<Value = (BlockShape, Fill, Vec<f32>, Vec<f32>)> {
    (1usize..4, 1usize..20, 1usize..100).prop_flat_map(|(kv_heads, block_size, head_dim)| {
        let s = BlockShape {
            kv_heads,
            block_size,
            head_dim,
        };
        let n = s.elems();
        // Mostly moderate values with occasional outliers, as in real keys.
        let val = prop_oneof![
            8 => -4.0f32..4.0,
            1 => -300.0f32..300.0,
            1 => Just(0.0f32),
        ];
        let place = prop_oneof![Just(Place::Middle), Just(Place::First), Just(Place::Newest)];
        (
            Just(s),
            (0..=block_size, place).prop_map(|(tokens, place)| Fill { tokens, place }),
            proptest::collection::vec(val.clone(), n),
            proptest::collection::vec(val, n),
        )
    })
}

/// fp8's largest error on `v` under a head's largest magnitude `m`: half an E4M3 step (1/16 relative), the f32
/// scale's rounding, and the smallest subnormal's half.
fn fp8_bound(v: f32, m: f32) -> f32 {
    v.abs() / 16.0 + m / 448.0 / 1024.0 + 1e-6
}

/// int8's largest error in a row of largest magnitude `m`: half a step, plus the f16 scale's rounding.
fn int8_bound(m: f32) -> f32 {
    m / 127.0 * 0.5 * 1.002 + m / 1024.0 + 1e-6
}

/// The largest error `codec` may make on element `(h, t, d)` of `x` (tokens below `fill`).
fn bound(
    codec: Codec,
    raw: KvFormat,
    s: BlockShape,
    fill: Fill,
    x: &[f32],
    i: usize,
    key: bool,
) -> f32 {
    let tokens = fill.tokens;
    let (h, t, d) = (
        i / (s.block_size * s.head_dim),
        i / s.head_dim % s.block_size,
        i % s.head_dim,
    );
    let row = |h: usize, t: usize| &x[(h * s.block_size + t) * s.head_dim..][..s.head_dim];
    let f16_err = |v: f32| v.abs() / 2048.0 + 6e-8;
    let absmax = |it: &mut dyn Iterator<Item = f32>| it.fold(0f32, |m, v| m.max(v.abs()));
    let range = |it: &mut dyn Iterator<Item = f32>| {
        let (lo, hi) = it.fold((f32::INFINITY, f32::NEG_INFINITY), |(a, b), v| {
            (a.min(v), b.max(v))
        });
        (hi - lo, lo.abs().max(hi.abs()))
    };
    let g = d / 32 * 32;
    let group = |t: usize| row(h, t)[g..(g + 32).min(s.head_dim)].iter().copied();
    // Quantization step / 2, plus f16 rounding of the stored min and scale.
    let runs = |r: f32, m: f32, levels: f32| r / levels * 0.5 * 1.002 + m / 1024.0 + 1e-6;
    match codec {
        Codec::None => match raw.raw_wire() {
            KvFormat::F32 => 0.0,
            _ => f16_err(x[i]),
        },
        Codec::Kivi2 if kivi2_in_f16(s, fill) => f16_err(x[i]),
        Codec::Fp8 | Codec::Int8 | Codec::Int4 if key => {
            // Quantized after the turn: each turned dim within the codec's bound on the turned rows, and dim d a
            // signed sum of its run's turned errors over sqrt(run length); plus the float rounding of turning there
            // and back.
            let turned = |t: usize| {
                let mut y = row(h, t).to_vec();
                spread::turn(&mut y);
                y
            };
            let y = turned(t);
            let (row_max, head_max) = (
                absmax(&mut y.iter().copied()),
                absmax(&mut (0..tokens).flat_map(turned)),
            );
            let run = spread::runs(s.head_dim)
                .find(|r| r.contains(&d))
                .expect("every dim lies in a run");
            let len = run.len();
            let steps: f32 = run
                .map(|j| match codec {
                    Codec::Fp8 => fp8_bound(y[j], head_max),
                    Codec::Int8 => int8_bound(row_max),
                    _ => {
                        let g = j / 32 * 32;
                        let (r, m) = range(&mut y[g..(g + 32).min(s.head_dim)].iter().copied());
                        runs(r, m, 15.0)
                    }
                })
                .sum();
            let norm = y.iter().map(|v| v * v).sum::<f32>().sqrt();
            steps / (len as f32).sqrt() + norm * 1e-5
        }
        Codec::Fp8 => {
            let m = absmax(&mut (0..tokens).flat_map(|t| row(h, t).iter().copied()));
            fp8_bound(x[i], m)
        }
        Codec::Int8 => int8_bound(absmax(&mut row(h, t).iter().copied())),
        Codec::Int4 => {
            let (r, m) = range(&mut group(t));
            runs(r, m, 15.0)
        }
        Codec::Kivi2 => {
            // Keys: channel d over the block's tokens; values: the group along head_dim.
            let (r, m) = if key {
                range(&mut (0..s.block_size).map(|t| row(h, t)[d]))
            } else {
                range(&mut group(t))
            };
            runs(r, m, 3.0)
        }
    }
}

proptest! {
    #[test]
    fn round_trip_within_bounds((s, fill, k, v) in shape_and_block()) {
        let rot = rotation(s);
        for codec in Codec::ALL {
            for raw in RAWS {
                let c = BlockCoding { codec, raw, shape: s, keys: &rot };
                let mut bytes = Vec::new();
                encode_block(&c, BlockRef { k: &k, v: &v, fill }, &mut bytes);
                prop_assert_eq!(bytes.len(), encoded_len(codec, raw, s, fill));
                let (mut k2, mut v2) = (vec![f32::NAN; s.elems()], vec![f32::NAN; s.elems()]);
                decode_block(&c, fill, &bytes, &mut k2, &mut v2).unwrap();
                // kivi2 quantizes full blocks' keys in the block's frame: compare them there.
                let framed = codec == Codec::Kivi2 && !kivi2_in_f16(s, fill);
                let frame = |x: &[f32]| {
                    let mut x = x.to_vec();
                    if framed {
                        rot.to_block_frame(&mut x);
                    }
                    x
                };
                let (k, k2) = (frame(&k), frame(&k2));
                for (orig, back, key) in [(&k, &k2, true), (&v, &v2, false)] {
                    for i in 0..s.elems() {
                        let t = i / s.head_dim % s.block_size;
                        if t >= fill.tokens {
                            prop_assert_eq!(back[i], 0.0);
                            continue;
                        }
                        // Bounds are computed over the block as the encoder saw it (tokens past fill zeroed).
                        let mut seen = orig.clone();
                        packed::zero_past_fill(s, fill.tokens, &mut seen);
                        let b = bound(codec, raw, s, fill, &seen, i, key);
                        prop_assert!(
                            (back[i] - orig[i]).abs() <= b,
                            "{codec} {raw:?} {s:?} {fill:?}: element {i}: {} -> {} (bound {b})",
                            orig[i], back[i]
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn decoder_survives_any_bytes(
        bytes in proptest::collection::vec(any::<u8>(), 0..4000),
        heads in 1usize..3, block_size in 1usize..17, head_dim in 1usize..70, tokens in 0usize..20,
        first in any::<bool>(),
    ) {
        let s = BlockShape { kv_heads: heads, block_size, head_dim };
        let place = if first { Place::First } else { Place::Middle };
        let fill = Fill { tokens, place };
        let fits = Fill { tokens: tokens.min(block_size), place };
        let rot = rotation(s);
        for codec in Codec::ALL {
            let c = BlockCoding { codec, raw: KvFormat::F16, shape: s, keys: &rot };
            let (mut k, mut v) = (vec![0.0; s.elems()], vec![0.0; s.elems()]);
            let n = encoded_len(codec, KvFormat::F16, s, fits).min(bytes.len());
            // Random bytes of the right length decode or are refused; any other length is refused.
            let right = decode_block(&c, fill, &bytes[..n], &mut k, &mut v);
            if let Ok(()) = right {
                prop_assert!(k.iter().chain(&v).all(|x| x.is_finite()));
            }
            let wrong = decode_block(&c, fill, &bytes, &mut k, &mut v);
            if bytes.len() != encoded_len(codec, KvFormat::F16, s, fits) || tokens > block_size {
                prop_assert!(wrong.is_err());
            }
        }
    }
}

#[test]
fn sizes_for_the_default_model_shape() {
    // SmolLM2-135M: 3 KV heads of 64 dims; 16-token blocks. Bytes per block of one layer, K and V.
    let s = BlockShape {
        kv_heads: 3,
        block_size: 16,
        head_dim: 64,
    };
    let full = Fill::middle(16);
    let f16_bytes = encoded_len(Codec::None, KvFormat::F16, s, full);
    assert_eq!(
        encoded_len(Codec::None, KvFormat::F32, s, full),
        2 * f16_bytes
    );
    assert_eq!(f16_bytes, 2 * 3 * 16 * 64 * 2);
    assert_eq!(
        encoded_len(Codec::Fp8, KvFormat::F16, s, full),
        2 * 3 * (4 + 16 * 64)
    );
    assert_eq!(
        encoded_len(Codec::Int8, KvFormat::F16, s, full),
        2 * 3 * 16 * 66
    );
    // int4: 5 bits per element; kivi2: 3.5 bits per element (4 for keys, 3 for values).
    assert_eq!(
        encoded_len(Codec::Int4, KvFormat::F16, s, full) * 8,
        2 * s.elems() * 5
    );
    assert_eq!(
        encoded_len(Codec::Kivi2, KvFormat::F16, s, full) * 8,
        2 * s.elems() * 7 / 2
    );
    // A block still filling travels in f16 under kivi2, as do a sequence's first and newest full blocks.
    assert_eq!(
        encoded_len(Codec::Kivi2, KvFormat::F16, s, Fill::middle(5)),
        f16_bytes
    );
    for place in [Place::First, Place::Newest] {
        let fill = Fill { tokens: 16, place };
        assert_eq!(encoded_len(Codec::Kivi2, KvFormat::F16, s, fill), f16_bytes);
        assert_eq!(
            encoded_len(Codec::Int4, KvFormat::F16, s, fill),
            encoded_len(Codec::Int4, KvFormat::F16, s, full)
        );
    }
}

#[test]
fn places_of_a_sequence_blocks() {
    let places = |tokens: usize| -> Vec<(usize, Place)> {
        (0..tokens.div_ceil(4))
            .map(|i| Fill::of_block(i, tokens, 4))
            .map(|f| (f.tokens, f.place))
            .collect()
    };
    use Place::*;
    // 14 tokens: three full blocks (the third the newest) and a partial one.
    assert_eq!(
        places(14),
        [(4, First), (4, Middle), (4, Newest), (2, Middle)]
    );
    // 12 tokens: the last block is full, so it is the newest.
    assert_eq!(places(12), [(4, First), (4, Middle), (4, Newest)]);
    // One block: first wins.
    assert_eq!(places(4), [(4, First)]);
    assert_eq!(places(3), [(3, First)]);
}

#[test]
fn kivi2_keys_are_quantized_in_the_block_frame() {
    // The same raw key at every token of a block: RoPE makes each channel a sinusoid across the block, but in the
    // block's frame every token holds the same key, so 2-bit codes per channel reproduce it almost exactly.
    let s = BlockShape {
        kv_heads: 1,
        block_size: 16,
        head_dim: 64,
    };
    let rope = crate::model::RopeConfig {
        theta: 10_000.0,
        layout: crate::model::RopeLayout::Halves,
        freq_factors: None,
    };
    let rot = KeyRotation::new(&rope, 64, 16);
    let raw: Vec<f32> = (0..64).map(|d| ((d * 7 % 11) as f32 - 5.0) * 0.4).collect();
    let inv = rope.inv_freq(64);
    let mut k = Vec::new();
    for t in 0..16 {
        let mut key = raw.clone();
        for (p, f) in inv.iter().enumerate() {
            let (sn, cs) = (((100 + t) as f64) * (*f as f64)).sin_cos();
            let (a, b) = (key[p] as f64, key[p + 32] as f64);
            key[p] = (a * cs - b * sn) as f32;
            key[p + 32] = (a * sn + b * cs) as f32;
        }
        k.extend(key);
    }
    let v = vec![0.5f32; 16 * 64];
    let c = BlockCoding {
        codec: Codec::Kivi2,
        raw: KvFormat::F32,
        shape: s,
        keys: &rot,
    };
    let mut bytes = Vec::new();
    let fill = Fill::middle(16);
    encode_block(&c, BlockRef { k: &k, v: &v, fill }, &mut bytes);
    let (mut k2, mut v2) = (vec![0f32; k.len()], vec![0f32; v.len()]);
    decode_block(&c, fill, &bytes, &mut k2, &mut v2).unwrap();
    let worst = k
        .iter()
        .zip(&k2)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    // In the cache's frame the fast channels swing over about +-2 across the block (a 2-bit step near 1.3); in the
    // block's frame each channel is one value, which the min alone holds (to f16 rounding).
    assert!(worst < 0.01, "worst key error {worst}");
}

#[test]
fn names_parse_back() {
    for c in Codec::ALL {
        assert_eq!(Codec::parse(c.name()), Ok(c));
    }
    assert!(matches!(Codec::parse("int3"), Err(CodecError::Unknown(_))));
}

#[test]
fn byte_classes_follow_each_layout() {
    // A block of one repeated value: every f16 parameter and raw element is known, so the bytes the classes call
    // high bytes of a scale, a minimum or a raw element must be exactly those bytes of the encoded block.
    let value = 1.75f32;
    for (kv_heads, block_size, head_dim) in [(3, 16, 64), (2, 5, 40), (1, 8, 7)] {
        let s = BlockShape {
            kv_heads,
            block_size,
            head_dim,
        };
        let keys = rotation(s);
        let block = vec![value; s.elems()];
        for codec in Codec::ALL {
            for raw in [KvFormat::F32, KvFormat::F16] {
                for fill in [
                    Fill::middle(block_size),
                    Fill::middle(block_size - 1),
                    Fill::of_block(0, block_size, block_size),
                ] {
                    let c = BlockCoding {
                        codec,
                        raw,
                        shape: s,
                        keys: &keys,
                    };
                    let mut bytes = Vec::new();
                    let r = BlockRef {
                        k: &block,
                        v: &block,
                        fill,
                    };
                    encode_block(&c, r, &mut bytes);
                    let mut model = PayloadModel::default();
                    model.push_block(codec, raw, s, fill);
                    let classes = &model.classes;
                    assert_eq!(classes.len(), bytes.len(), "{codec:?} {s:?} {fill:?}");
                    // int4 keys: every code byte named by its channel, the channels of a group in order.
                    if codec == Codec::Int4 {
                        let named = &model.channels;
                        let key_bytes = classes
                            .iter()
                            .filter(|&&c| c == ByteClass::KeyNibbles as u8);
                        assert_eq!(named.len(), key_bytes.count());
                        assert_eq!(named.len(), kv_heads * block_size * head_dim.div_ceil(2));
                        let first_head: Vec<u32> = named[..head_dim.div_ceil(2)].to_vec();
                        let want: Vec<u32> = (0..head_dim as u32).step_by(2).collect();
                        assert_eq!(first_head, want, "{s:?}");
                        let last = (kv_heads - 1) * head_dim + (head_dim - 1) / 2 * 2;
                        assert_eq!(*named.last().unwrap() as usize, last);
                        assert!(model.channel_tables() >= last + 2);
                    }
                    let raw16 = f16::from_f32(value).to_le_bytes()[1];
                    let raw32 = value.to_le_bytes()[3];
                    let mut seen = [0usize; CLASSES + 1];
                    for (i, (&class, &b)) in classes.iter().zip(&bytes).enumerate() {
                        seen[class as usize] += 1;
                        let at = format!("{codec:?} {raw:?} {s:?} {fill:?} byte {i}");
                        match class {
                            // Tokens past the fill are zeros; the rest hold the value.
                            x if x == ByteClass::RawHigh as u8 => assert!(
                                b == 0
                                    || b == raw16
                                    || (raw == KvFormat::F32 && codec == Codec::None && b == raw32),
                                "{at}: {b:#x}"
                            ),
                            // (kivi2's keys are turned into the block's frame and fp8's, int8's and int4's by the
                            // Walsh-Hadamard transform, so their parameters vary; keys are the first half.)
                            _ if codec == Codec::Kivi2 && class != ByteClass::RawHigh as u8 => {}
                            _ if codec.turns_keys() && i < bytes.len() / 2 => {}
                            x if x == ByteClass::MinHigh as u8 => {
                                assert!(b == 0 || b == raw16, "{at}: {b:#x}")
                            }
                            // A constant run has scale 0 (asymmetric: high byte 0) or value / 127 (int8) or
                            // value / 448 (fp8, an f32).
                            x if x == ByteClass::ScaleHigh as u8 => assert!(
                                b == 0
                                    || b == f16::from_f32(value / 127.0).to_le_bytes()[1]
                                    || b == (value / 448.0).to_le_bytes()[3],
                                "{at}: {b:#x}"
                            ),
                            _ => {}
                        }
                    }
                    // kivi2's f16 blocks are as large as `none` at f16.
                    let as_f16 = bytes.len() == encoded_len(Codec::None, KvFormat::F16, s, fill);
                    let coded = codec != Codec::None && !(codec == Codec::Kivi2 && as_f16);
                    // Key codes (int4's by channel) and value codes, in halves of equal size but for kivi2 (4 bits
                    // per key element, 3 per value).
                    let kc =
                        seen[ByteClass::KeyCode as usize] + seen[ByteClass::KeyNibbles as usize];
                    let vc = seen[ByteClass::ValueCode as usize];
                    assert_eq!((kc > 0, vc > 0), (coded, coded), "{codec:?} {fill:?}");
                    if codec != Codec::Kivi2 {
                        assert_eq!(kc, vc, "{codec:?} {s:?}");
                    }
                }
            }
        }
    }
}
