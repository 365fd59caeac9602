//! The entropy stage: a chunk's encoded payload compressed by static rANS, with frequency tables per byte class and
//! per key channel.
//!
//! Quantized KV codes are far from uniform (values cluster near the middle of a token's range), and the f16
//! parameters between them have predictable high bytes; LZ4 finds no repeats in either, an entropy coder does
//! (CacheGen, Liu et al. 2024, codes quantized KV arithmetically for the same reason). Both ends know the layout of
//! every byte from the header alone ([`PayloadModel`]), so the stage keeps one byte table per [`ByteClass`] at no
//! cost in side information beyond the tables. int4 keys go further: a key channel keeps its place in its 32-dim
//! group token after token (outlier channels sit at the ends of the range, quiet ones in the middle), so each of a
//! key byte's two 4-bit codes is coded with the table of its own channel: on the default model that takes key codes
//! from 0.94 to about 0.77 of their bits, where one table for all keys leaves them at 0.94.
//!
//! Layout: the byte tables, one per class in order, then the channel tables, one per channel context; each starts
//! with a flag: 0 (nothing of it in the payload), 1 (a table follows), 2 (coded flat, every value at equal
//! frequency: what near-random bytes such as f16 low bytes cost anyway, without a table) or, for channel tables
//! only, 3 (a compact table follows). A table is a bitmap of the values present (32 bytes for bytes, 2 for 4-bit
//! codes), then each present value's frequency (at least 1, summing to 4096) as one byte if below 128, else two (low
//! seven bits with the top bit set, then the rest). A compact table is 8 bytes: a 4-bit level per value (value `2i`
//! in the low half of byte `i`), level `l` standing for a weight of `LEVEL_WEIGHTS[l]` (0 for absent, then about
//! `2^(l / 2)`), the weights normalized to 4096 as counts are. A channel codes a few hundred symbols per chunk, so
//! its table's size matters as much as its precision; the encoder sends whichever of the three costs least. Then the rANS
//! stream: two 32-bit states in `[2^23, 2^31)`, each as four big-endian bytes, symbol `k` (counting from 0, a key
//! byte's low code before its high one) coded by state `k % 2`, both renormalized a byte at a time from the one
//! stream. Decoding the whole payload must leave both states at `2^23` with the stream used up.

use tandem_engine::kv::codec::{ByteClass, CLASSES, PayloadModel};

/// Frequencies of one table sum to `1 << SCALE_BITS`.
const SCALE_BITS: u32 = 12;
const SCALE: u32 = 1 << SCALE_BITS;
/// The lower bound of the coder's state.
const LOW: u32 = 1 << 23;
/// The weight of each level of a compact 16-value table: `round(2^(l / 2))`, level 0 absent.
const LEVEL_WEIGHTS: [u64; 16] = [0, 1, 2, 3, 4, 6, 8, 11, 16, 23, 32, 45, 64, 91, 128, 181];

/// How a table travels: the flag byte before it.
const ABSENT: u8 = 0;
const FULL: u8 = 1;
const FLAT: u8 = 2;
const COMPACT: u8 = 3;
/// Bytes of a compact table: a 4-bit level for each of 16 values.
const COMPACT_BYTES: usize = 8;

/// The form the encoder chose for a table, with what it writes after the flag.
enum Form {
    Full,
    Compact([u8; 16]),
    Flat,
}

/// Two levels a byte, value `2i` in the low half of byte `i`.
fn pack_levels(levels: &[u8; 16]) -> [u8; COMPACT_BYTES] {
    std::array::from_fn(|i| levels[2 * i] | levels[2 * i + 1] << 4)
}

/// The levels [`pack_levels`] wrote into `packed` (`COMPACT_BYTES` long).
fn unpack_levels(packed: &[u8]) -> [u8; 16] {
    std::array::from_fn(|v| packed[v / 2] >> (4 * (v % 2)) & 0x0f)
}

/// Why a stream does not decode.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum EntropyError {
    #[error("entropy stage: the tables end early")]
    TablesCut,
    #[error("entropy stage: table {0} is malformed ({1})")]
    BadTable(usize, &'static str),
    #[error("entropy stage: a symbol of table {0}, which the stream left out")]
    NoTable(usize),
    #[error("entropy stage: the stream ends early")]
    StreamCut,
    #[error("entropy stage: the stream does not end where the payload does")]
    BadEnd,
    #[error("entropy stage: the stream's starting state is out of range")]
    BadState,
}

/// One table's frequencies and cumulative starts over an alphabet of 256 (bytes) or 16 (4-bit codes) values.
struct Table {
    freq: Vec<u32>,
    start: Vec<u32>,
}

impl Table {
    /// Frequencies normalized to [`SCALE`], each present value at least 1, from raw counts (not all zero).
    fn from_counts(counts: &[u64]) -> Self {
        let total: u64 = counts.iter().sum();
        let mut freq: Vec<u32> = counts
            .iter()
            .map(|&c| {
                if c > 0 {
                    ((c * SCALE as u64) / total).max(1) as u32
                } else {
                    0
                }
            })
            .collect();
        // Rounding down leaves a shortfall, which the most frequent value takes; lifting rare values to 1 may
        // overshoot instead, which comes off the largest frequencies first (never below 1: at most 256 values
        // share 4096 slots, so there is always room).
        let sum: u32 = freq.iter().sum();
        let mut order: Vec<usize> = (0..freq.len()).collect();
        order.sort_by_key(|&i| std::cmp::Reverse(freq[i]));
        if sum < SCALE {
            freq[order[0]] += SCALE - sum;
        }
        let mut excess = sum.saturating_sub(SCALE);
        while excess > 0 {
            for &i in &order {
                if excess == 0 {
                    break;
                }
                if freq[i] > 1 {
                    freq[i] -= 1;
                    excess -= 1;
                }
            }
        }
        debug_assert_eq!(
            freq.iter().sum::<u32>(),
            SCALE,
            "a table must sum to the scale"
        );
        Self::from_freq(freq)
    }

    fn from_freq(freq: Vec<u32>) -> Self {
        let start = freq
            .iter()
            .scan(0, |acc, &f| {
                let s = *acc;
                *acc += f;
                Some(s)
            })
            .collect();
        Self { freq, start }
    }

    /// Every value of an alphabet of `n` at equal frequency.
    fn flat(n: usize) -> Self {
        Self::from_freq(vec![SCALE / n as u32; n])
    }

    fn write(&self, out: &mut Vec<u8>) {
        let mut bitmap = vec![0u8; self.freq.len() / 8];
        for (b, &f) in self.freq.iter().enumerate() {
            if f > 0 {
                bitmap[b / 8] |= 1 << (b % 8);
            }
        }
        out.extend_from_slice(&bitmap);
        for &f in self.freq.iter().filter(|&&f| f > 0) {
            if f < 128 {
                out.push(f as u8);
            } else {
                out.extend_from_slice(&[0x80 | (f & 0x7f) as u8, (f >> 7) as u8]);
            }
        }
    }

    /// Bytes of the table as [`Table::write`] writes it.
    fn table_bytes(&self) -> usize {
        let present = self
            .freq
            .iter()
            .map(|&f| (f > 0) as usize + (f >= 128) as usize);
        self.freq.len() / 8 + present.sum::<usize>()
    }

    /// Bytes of `counts` coded with this table (the entropy under its frequencies; infinite where a counted value
    /// has no frequency).
    fn coded_bytes(&self, counts: &[u64]) -> f64 {
        let bits: f64 = counts
            .iter()
            .zip(&self.freq)
            .filter(|(c, _)| **c > 0)
            .map(|(&c, &f)| c as f64 * (SCALE as f64 / f as f64).log2())
            .sum();
        bits / 8.0
    }

    /// A 16-value table from its compact form: one 4-bit level per value (0: absent), each level `l` standing for
    /// a weight of about `2^(l / 2)`, normalized as [`Table::from_counts`] does. Half a level of error is at most
    /// 19% in a value's probability, about 0.02 bits a symbol; the table costs 8 bytes where a full one costs
    /// 20-30, which on a chunk's few hundred symbols per channel is the larger saving.
    fn from_levels(levels: &[u8; 16]) -> Option<Self> {
        let weights: Vec<u64> = levels.iter().map(|&l| LEVEL_WEIGHTS[l as usize]).collect();
        weights
            .iter()
            .any(|&w| w > 0)
            .then(|| Self::from_counts(&weights))
    }

    /// The compact levels of `counts` (not all zero): each present value's level from its count against the
    /// largest, the largest at level 15, none below 1.
    fn levels(counts: &[u64]) -> [u8; 16] {
        let max = *counts.iter().max().expect("16 counts") as f64;
        std::array::from_fn(|v| match counts[v] {
            0 => 0,
            c => (15.0 - (2.0 * (max / c as f64).log2()).round()).max(1.0) as u8,
        })
    }

    /// Reads a table of an alphabet of `n` written by [`Table::write`] from `bytes[*pos..]`.
    fn read(bytes: &[u8], pos: &mut usize, n: usize, id: usize) -> Result<Self, EntropyError> {
        let bitmap = bytes
            .get(*pos..*pos + n / 8)
            .ok_or(EntropyError::TablesCut)?;
        *pos += n / 8;
        let mut freq = vec![0u32; n];
        let mut sum = 0u32;
        for (b, f) in freq.iter_mut().enumerate() {
            if bitmap[b / 8] >> (b % 8) & 1 == 1 {
                let lo = *bytes.get(*pos).ok_or(EntropyError::TablesCut)?;
                *pos += 1;
                *f = lo as u32;
                if lo & 0x80 != 0 {
                    let hi = *bytes.get(*pos).ok_or(EntropyError::TablesCut)?;
                    *pos += 1;
                    *f = (lo & 0x7f) as u32 | (hi as u32) << 7;
                }
                if *f == 0 || *f > SCALE {
                    return Err(EntropyError::BadTable(
                        id,
                        "a present value's frequency is 0 or above 4096",
                    ));
                }
                sum += *f;
            }
        }
        if sum != SCALE {
            return Err(EntropyError::BadTable(id, "frequencies do not sum to 4096"));
        }
        Ok(Self::from_freq(freq))
    }

    /// The value whose range holds each of the [`SCALE`] slots.
    fn slots(&self) -> Vec<u8> {
        let mut s = vec![0u8; SCALE as usize];
        for (v, (&lo, &f)) in self.start.iter().zip(&self.freq).enumerate() {
            s[lo as usize..(lo + f) as usize].fill(v as u8);
        }
        s
    }
}

/// Calls `f(table, value)` for every coded symbol of the payload, in order or in reverse. Byte tables are
/// `0..CLASSES`; channel table `c` of int4 keys is `CLASSES + c`, and a key byte is two symbols, its low code then
/// its high one.
fn each_symbol(payload: &[u8], model: &PayloadModel, reverse: bool, mut f: impl FnMut(usize, u8)) {
    let key = ByteClass::KeyNibbles as u8;
    let table =
        |ch: Option<&u32>| CLASSES + *ch.expect("the model names a channel per key byte") as usize;
    if reverse {
        let mut ch = model.channels.iter().rev();
        for (&b, &class) in payload.iter().zip(&model.classes).rev() {
            if class == key {
                let t = table(ch.next());
                f(t + 1, b >> 4);
                f(t, b & 0x0f);
            } else {
                f(class as usize, b);
            }
        }
    } else {
        let mut ch = model.channels.iter();
        for (&b, &class) in payload.iter().zip(&model.classes) {
            if class == key {
                let t = table(ch.next());
                f(t, b & 0x0f);
                f(t + 1, b >> 4);
            } else {
                f(class as usize, b);
            }
        }
    }
}

/// Alphabet size of table `t`.
fn alphabet(t: usize) -> usize {
    if t < CLASSES { 256 } else { 16 }
}

/// Compresses `payload`, laid out as `model` says (same length).
pub fn compress(payload: &[u8], model: &PayloadModel) -> Vec<u8> {
    assert_eq!(payload.len(), model.len(), "compress: a class per byte");
    let n_tables = CLASSES + model.channel_tables();
    let mut counts: Vec<Vec<u64>> = (0..n_tables).map(|t| vec![0; alphabet(t)]).collect();
    let mut n_symbols = 0;
    each_symbol(payload, model, false, |t, v| {
        counts[t][v as usize] += 1;
        n_symbols += 1;
    });
    let mut out = Vec::with_capacity(payload.len() / 2 + 1024);
    let mut tables: Vec<Option<Table>> = Vec::with_capacity(n_tables);
    for c in &counts {
        let n: u64 = c.iter().sum();
        if n == 0 {
            out.push(ABSENT);
            tables.push(None);
            continue;
        }
        // The cheapest of a full table, a compact one (16-value alphabets) and none (flat), tables included.
        let full = Table::from_counts(c);
        let mut best = (
            full.table_bytes() as f64 + full.coded_bytes(c),
            Form::Full,
            full,
        );
        if c.len() == 16 {
            let levels = Table::levels(c);
            let t = Table::from_levels(&levels).expect("some value is counted");
            let cost = COMPACT_BYTES as f64 + t.coded_bytes(c);
            if cost < best.0 {
                best = (cost, Form::Compact(levels), t);
            }
        }
        let flat_bytes = n as f64 * (c.len() as f64).log2() / 8.0;
        if flat_bytes <= best.0 {
            best = (flat_bytes, Form::Flat, Table::flat(c.len()));
        }
        let (_, form, t) = best;
        match form {
            Form::Full => {
                out.push(FULL);
                t.write(&mut out);
            }
            Form::Compact(levels) => {
                out.push(COMPACT);
                out.extend(pack_levels(&levels));
            }
            Form::Flat => out.push(FLAT),
        }
        tables.push(Some(t));
    }
    // rANS encodes the last symbol first; its output is read back to front. Symbol k goes through state k % 2
    // (two independent chains, which the CPU overlaps), both renormalizing into the one stream.
    let mut stream = Vec::with_capacity(payload.len() / 2);
    let mut x = [LOW; 2];
    let mut k = n_symbols;
    each_symbol(payload, model, true, |t, v| {
        k -= 1;
        let t = tables[t].as_ref().expect("a table with symbols is written");
        let (f, s) = (t.freq[v as usize], t.start[v as usize]);
        let x = &mut x[k & 1];
        let x_max = ((LOW >> SCALE_BITS) << 8) * f;
        while *x >= x_max {
            stream.push(*x as u8);
            *x >>= 8;
        }
        *x = ((*x / f) << SCALE_BITS) + *x % f + s;
    });
    stream.extend_from_slice(&x[1].to_le_bytes());
    stream.extend_from_slice(&x[0].to_le_bytes());
    out.extend(stream.iter().rev());
    out
}

/// Decompresses what [`compress`] made of a payload laid out as `model` says (whose length is the payload's).
pub fn decompress(bytes: &[u8], model: &PayloadModel) -> Result<Vec<u8>, EntropyError> {
    let n_tables = CLASSES + model.channel_tables();
    let mut pos = 0;
    let mut tables = Vec::with_capacity(n_tables);
    for id in 0..n_tables {
        let flag = *bytes.get(pos).ok_or(EntropyError::TablesCut)?;
        pos += 1;
        let t = match flag {
            ABSENT => None,
            FULL => Some(Table::read(bytes, &mut pos, alphabet(id), id)?),
            FLAT => Some(Table::flat(alphabet(id))),
            COMPACT if alphabet(id) == 16 => {
                let packed = bytes
                    .get(pos..pos + COMPACT_BYTES)
                    .ok_or(EntropyError::TablesCut)?;
                pos += COMPACT_BYTES;
                let t = Table::from_levels(&unpack_levels(packed)).ok_or(
                    EntropyError::BadTable(id, "a compact table with no value present"),
                )?;
                Some(t)
            }
            _ => {
                return Err(EntropyError::BadTable(
                    id,
                    "its flag is not 0, 1, 2 or (for a channel table) 3",
                ));
            }
        };
        // Byte tables look a slot's value up; the 16 values of a channel table are searched (building 4096 slots
        // for each of hundreds of channel tables would cost more than decoding the chunk).
        tables.push(t.map(|t| {
            let slots = if t.freq.len() > 16 {
                t.slots()
            } else {
                Vec::new()
            };
            (t, slots)
        }));
    }
    let mut x = [0u32; 2];
    for x in &mut x {
        let head = bytes.get(pos..pos + 4).ok_or(EntropyError::StreamCut)?;
        *x = u32::from_be_bytes([head[0], head[1], head[2], head[3]]);
        pos += 4;
        if !(LOW..LOW << 8).contains(x) {
            return Err(EntropyError::BadState);
        }
    }
    let mut k = 0usize;
    let mut decode = |id: usize| -> Result<u8, EntropyError> {
        let (t, slots) = tables
            .get(id)
            .and_then(|t| t.as_ref())
            .ok_or(EntropyError::NoTable(id))?;
        let x = &mut x[k & 1];
        k += 1;
        let slot = *x & (SCALE - 1);
        let v = match slots.get(slot as usize) {
            Some(&v) => v,
            None => (t.start.partition_point(|&s| s <= slot) - 1) as u8,
        };
        *x = t.freq[v as usize] * (*x >> SCALE_BITS) + slot - t.start[v as usize];
        while *x < LOW {
            let next = *bytes.get(pos).ok_or(EntropyError::StreamCut)?;
            pos += 1;
            *x = *x << 8 | next as u32;
        }
        Ok(v)
    };
    let mut out = Vec::with_capacity(model.len());
    let mut channels = model.channels.iter();
    for &class in &model.classes {
        out.push(if class == ByteClass::KeyNibbles as u8 {
            let t = CLASSES + *channels.next().ok_or(EntropyError::NoTable(CLASSES))? as usize;
            let lo = decode(t)?;
            lo | decode(t + 1)? << 4
        } else {
            decode(class as usize)?
        });
    }
    if x != [LOW; 2] || pos != bytes.len() {
        return Err(EntropyError::BadEnd);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use tandem_engine::kv::KvFormat;
    use tandem_engine::kv::codec::{BlockShape, Codec, Fill};

    fn m(classes: &[u8]) -> PayloadModel {
        PayloadModel::of_byte_classes(classes.to_vec())
    }

    /// Bytes of two classes: class 0 skewed toward a few values, class 1 uniform.
    fn sample(n: usize, seed: u64) -> (Vec<u8>, Vec<u8>) {
        let mut s = seed | 1;
        let mut next = || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            s
        };
        let classes: Vec<u8> = (0..n).map(|i| (i % 5 == 0) as u8).collect();
        let bytes = classes
            .iter()
            .map(|&c| {
                let r = next();
                if c == 0 {
                    (120 + (r % 7) * (r % 3)) as u8
                } else {
                    r as u8
                }
            })
            .collect();
        (bytes, classes)
    }

    #[test]
    fn round_trips_and_shrinks_skewed_bytes() {
        for n in [0, 1, 2, 100, 10_000] {
            let (bytes, classes) = sample(n, n as u64 + 3);
            let packed = compress(&bytes, &m(&classes));
            assert_eq!(decompress(&packed, &m(&classes)).unwrap(), bytes, "n = {n}");
            if n == 10_000 {
                // Within 1% of the sample's own order-0 entropy per class, plus the tables (at most 545 bytes
                // each, and none for the uniform class, which goes flat).
                let mut bits = 0f64;
                for class in 0..2u8 {
                    let mut counts = [0f64; 256];
                    let picked = bytes.iter().zip(&classes).filter(|(_, c)| **c == class);
                    picked.for_each(|(&b, _)| counts[b as usize] += 1.0);
                    let total: f64 = counts.iter().sum();
                    bits -= counts
                        .iter()
                        .filter(|&&c| c > 0.0)
                        .map(|&c| c * (c / total).log2())
                        .sum::<f64>();
                }
                let bound = bits / 8.0 * 1.01 + 2.0 * 545.0 + 16.0;
                assert!(
                    (packed.len() as f64) < bound,
                    "{} bytes, bound {bound:.0}",
                    packed.len()
                );
                assert!(
                    packed.len() < bytes.len() * 6 / 10,
                    "{} of {}",
                    packed.len(),
                    bytes.len()
                );
            }
        }
        // One value only: a table of one entry, a stream of nearly nothing.
        let packed = compress(&[7; 5000], &m(&[0; 5000]));
        assert!(packed.len() < 64, "{}", packed.len());
        assert_eq!(decompress(&packed, &m(&[0; 5000])).unwrap(), vec![7; 5000]);
    }

    /// The model of `blocks` int4 blocks of 2 heads x 16 tokens x 64 dims.
    fn int4_model(blocks: usize) -> PayloadModel {
        let shape = BlockShape {
            kv_heads: 2,
            block_size: 16,
            head_dim: 64,
        };
        let mut model = PayloadModel::default();
        for _ in 0..blocks {
            model.push_block(Codec::Int4, KvFormat::F16, shape, Fill::middle(16));
        }
        model
    }

    /// A payload laid out as `model`: each key byte `key(channel, r)` of a pseudo-random `r`, every other byte `r`'s
    /// low byte.
    fn payload_of(
        model: &PayloadModel,
        seed: u64,
        mut key: impl FnMut(usize, u32) -> u8,
    ) -> Vec<u8> {
        let mut s = seed;
        let mut channels = model.channels.iter();
        model
            .classes
            .iter()
            .map(|&class| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let r = (s >> 20) as u32;
                if class == ByteClass::KeyNibbles as u8 {
                    key(*channels.next().unwrap() as usize, r)
                } else {
                    r as u8
                }
            })
            .collect()
    }

    #[test]
    fn key_codes_take_their_channels_tables() {
        // Each channel's codes keep to two values of its own; over all channels every value is common. Channel
        // tables code a key code in about one bit, where one table for all would need four.
        let model = int4_model(8);
        let bytes = payload_of(&model, 7, |ch, r| {
            let code = |c: usize, bit: u32| ((c as u32 * 5 + (r >> bit & 1)) % 16) as u8;
            code(ch, 0) | code(ch + 1, 1) << 4
        });
        let packed = compress(&bytes, &model);
        assert_eq!(decompress(&packed, &model).unwrap(), bytes);
        let keys = model
            .classes
            .iter()
            .filter(|&&c| c == ByteClass::KeyNibbles as u8)
            .count();
        let others = bytes.len() - keys;
        // Key bytes at 2 bits (two codes of one bit) plus 128 small channel tables; the rest flat.
        let bound = others + keys / 4 + 128 * 8 + 64;
        assert!(
            packed.len() < bound,
            "{} bytes, bound {bound}",
            packed.len()
        );
        // The same payload with the key bytes under one byte table (a byte's two codes are five apart, give or
        // take one: about 5.5 bits) costs over a bit more per key byte.
        let classes = model
            .classes
            .iter()
            .map(|&c| c.min(ByteClass::RawHigh as u8))
            .collect();
        let pooled = compress(&bytes, &PayloadModel::of_byte_classes(classes));
        assert!(
            pooled.len() > packed.len() + keys / 8,
            "{} vs {}",
            pooled.len(),
            packed.len()
        );
    }

    #[test]
    fn channel_tables_travel_compact_where_that_is_cheaper() {
        // 256 tokens: each channel's codes bell-shaped around a centre of its own, all 16 values present, as int4
        // keys are. A full table costs 20-30 bytes a channel, a compact one 8.
        let model = int4_model(16);
        let mut counts = vec![[0u64; 16]; model.channel_tables()];
        let bytes = payload_of(&model, 11, |ch, r| {
            let code = |c: usize, bits: u32| {
                let bell: u32 = (0..6).map(|i| bits >> (2 * i) & 3).sum();
                ((c % 5) as u32 + bell).min(15) as u8
            };
            let (lo, hi) = (code(ch, r), code(ch + 1, r >> 12));
            counts[ch][lo as usize] += 1;
            counts[ch + 1][hi as usize] += 1;
            lo | hi << 4
        });
        let packed = compress(&bytes, &model);
        assert_eq!(decompress(&packed, &model).unwrap(), bytes);
        let entropy: f64 = counts
            .iter()
            .map(|c| {
                let n: u64 = c.iter().sum();
                c.iter()
                    .filter(|&&k| k > 0)
                    .map(|&k| k as f64 * (n as f64 / k as f64).log2())
                    .sum::<f64>()
                    / 8.0
            })
            .sum();
        let keys = model
            .classes
            .iter()
            .filter(|&&c| c == ByteClass::KeyNibbles as u8)
            .count();
        // The other bytes flat; key codes within 3% of their entropy; 9 bytes per channel table.
        let bound = (bytes.len() - keys) as f64 + entropy * 1.03 + 9.0 * counts.len() as f64 + 64.0;
        assert!(
            (packed.len() as f64) < bound,
            "{} bytes, bound {bound:.0}",
            packed.len()
        );
    }

    #[test]
    fn a_compact_table_with_nothing_present_is_refused() {
        let model = int4_model(1);
        let bytes = vec![0x53u8; model.len()];
        let mut packed = compress(&bytes, &model);
        // Rewrite the first channel table as compact with every level 0.
        let at = (0..CLASSES).fold(0, |pos, _| match packed[pos] {
            FULL => {
                let mut p = pos + 1;
                Table::read(&packed, &mut p, 256, 0).unwrap();
                p
            }
            _ => pos + 1,
        });
        let end = match packed[at] {
            FULL => {
                let mut p = at + 1;
                Table::read(&packed, &mut p, 16, CLASSES).unwrap();
                p
            }
            COMPACT => at + 9,
            _ => at + 1,
        };
        packed.splice(at..end, [COMPACT, 0, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(
            decompress(&packed, &model),
            Err(EntropyError::BadTable(
                CLASSES,
                "a compact table with no value present"
            ))
        );
    }

    #[test]
    fn tables_sum_to_the_scale_when_rare_bytes_overshoot() {
        // 56 common bytes take 73 slots each (4,088); lifting 200 rare ones to a slot each overshoots by 192, which
        // must come off the common ones.
        let mut counts = [0u64; 256];
        for (b, c) in counts.iter_mut().enumerate() {
            *c = if b < 56 { 1_000_000 } else { 1 };
        }
        let t = Table::from_counts(&counts);
        assert_eq!(t.freq.iter().sum::<u32>(), SCALE);
        assert!(t.freq[56..].iter().all(|&f| f == 1));
        assert!(
            t.freq[..56].iter().all(|&f| (68..73).contains(&f)),
            "{:?}",
            &t.freq[..56]
        );
        let bytes: Vec<u8> = (0..=255u8).cycle().take(3000).collect();
        let classes = vec![0u8; bytes.len()];
        assert_eq!(
            decompress(&compress(&bytes, &m(&classes)), &m(&classes)).unwrap(),
            bytes
        );
    }

    #[test]
    fn refuses_damaged_streams() {
        let (bytes, classes) = sample(3000, 11);
        let packed = compress(&bytes, &m(&classes));
        // Cut anywhere: an error, never a panic or a short payload.
        for cut in [0, 1, 20, packed.len() / 2, packed.len() - 1] {
            assert!(
                decompress(&packed[..cut], &m(&classes)).is_err(),
                "cut at {cut}"
            );
        }
        // A byte of a class with no table.
        let mut other = classes.clone();
        other[10] = 3;
        assert_eq!(
            decompress(&packed, &m(&other)),
            Err(EntropyError::NoTable(3))
        );
        // A flag that is none of 0, 1, 2.
        let mut flagged = packed.clone();
        flagged[0] = 3;
        assert!(matches!(
            decompress(&flagged, &m(&classes)),
            Err(EntropyError::BadTable(0, _))
        ));
        // Trailing bytes.
        let mut longer = packed.clone();
        longer.push(0);
        assert_eq!(decompress(&longer, &m(&classes)), Err(EntropyError::BadEnd));
    }

    proptest! {
        #[test]
        fn any_bytes_decode_or_fail_cleanly(
            junk in proptest::collection::vec(any::<u8>(), 0..400),
            n in 0usize..300,
        ) {
            let classes: Vec<u8> = (0..n).map(|i| (i % CLASSES) as u8).collect();
            let _ = decompress(&junk, &m(&classes));
        }

        #[test]
        fn random_payloads_round_trip(
            bytes in proptest::collection::vec(any::<u8>(), 0..2000),
            period in 1usize..7,
        ) {
            let classes: Vec<u8> = (0..bytes.len()).map(|i| (i % period % CLASSES) as u8).collect();
            let packed = compress(&bytes, &m(&classes));
            prop_assert_eq!(decompress(&packed, &m(&classes)).unwrap(), bytes);
        }

        #[test]
        fn random_int4_payloads_round_trip(blocks in 1usize..4, seed in any::<u64>()) {
            let model = int4_model(blocks);
            let mut s = seed | 1;
            let bytes: Vec<u8> = (0..model.len()).map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                s as u8
            }).collect();
            let packed = compress(&bytes, &model);
            prop_assert_eq!(decompress(&packed, &model).unwrap(), bytes);
            // Damaged: cut short, an error.
            prop_assert!(decompress(&packed[..packed.len() / 2], &model).is_err());
        }
    }
}
