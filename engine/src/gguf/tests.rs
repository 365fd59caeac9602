//! Parser tests over synthesized files: every value type, both versions, custom alignment, and every way of lying.

use super::*;

/// A minimal GGUF writer for tests.
struct Writer {
    out: Vec<u8>,
}

impl Writer {
    fn new(version: u32, tensors: u64, kvs: u64) -> Self {
        let mut out = b"GGUF".to_vec();
        out.extend(version.to_le_bytes());
        out.extend(tensors.to_le_bytes());
        out.extend(kvs.to_le_bytes());
        Self { out }
    }
    fn str(&mut self, s: &str) {
        self.out.extend((s.len() as u64).to_le_bytes());
        self.out.extend(s.as_bytes());
    }
    fn kv(&mut self, key: &str, ty: u32, payload: &[u8]) {
        self.str(key);
        self.out.extend(ty.to_le_bytes());
        self.out.extend(payload);
    }
    fn tensor(&mut self, name: &str, dims: &[u64], ty: u32, offset: u64) {
        self.str(name);
        self.out.extend((dims.len() as u32).to_le_bytes());
        for d in dims {
            self.out.extend(d.to_le_bytes());
        }
        self.out.extend(ty.to_le_bytes());
        self.out.extend(offset.to_le_bytes());
    }
    fn pad(&mut self, align: usize) {
        while !self.out.len().is_multiple_of(align) {
            self.out.push(0);
        }
    }
}

fn sample(version: u32, align: Option<u32>) -> Vec<u8> {
    let kvs = 13 + align.is_some() as u64;
    let mut w = Writer::new(version, 2, kvs);
    w.kv("u8", 0, &[7]);
    w.kv("i8", 1, &[0xff]);
    w.kv("u16", 2, &500u16.to_le_bytes());
    w.kv("i16", 3, &(-500i16).to_le_bytes());
    w.kv("u32", 4, &70000u32.to_le_bytes());
    w.kv("i32", 5, &(-70000i32).to_le_bytes());
    w.kv("f32", 6, &1.5f32.to_le_bytes());
    w.kv("bool", 7, &[1]);
    let mut s = Vec::new();
    s.extend(5u64.to_le_bytes());
    s.extend(b"hello");
    w.kv("str", 8, &s);
    let mut arr = Vec::new();
    arr.extend(4u32.to_le_bytes());
    arr.extend(3u64.to_le_bytes());
    for v in [1u32, 2, 3] {
        arr.extend(v.to_le_bytes());
    }
    w.kv("arr", 9, &arr);
    w.kv("u64", 10, &(1u64 << 40).to_le_bytes());
    w.kv("i64", 11, &(-1i64).to_le_bytes());
    w.kv("f64", 12, &2.25f64.to_le_bytes());
    if let Some(a) = align {
        w.kv("general.alignment", 4, &a.to_le_bytes());
    }
    let align = align.unwrap_or(32) as u64;
    w.tensor("a", &[4, 2], 0, 0);
    w.tensor("b", &[32], 8, align.max(32));
    w.pad(align as usize);
    for i in 0..8 {
        w.out.extend((i as f32).to_le_bytes());
    }
    w.pad(align as usize);
    while !(w.out.len() as u64).is_multiple_of(align) || !w.out.len().is_multiple_of(32) {
        w.out.push(0);
    }
    // Q8_0 block: scale 1.0 then 32 quants.
    w.out.extend(half::f16::from_f32(1.0).to_le_bytes());
    w.out.extend((0..32).map(|i| i as u8));
    w.out
}

#[test]
fn reads_every_value_type_in_v2_and_v3() {
    for version in [2, 3] {
        let f = GgufFile::from_bytes(sample(version, None)).unwrap();
        assert_eq!(f.version, version);
        assert_eq!(f.get("u8"), Some(&MetaValue::U8(7)));
        assert_eq!(f.get("i8"), Some(&MetaValue::I8(-1)));
        assert_eq!(f.get("u16"), Some(&MetaValue::U16(500)));
        assert_eq!(f.get("i16"), Some(&MetaValue::I16(-500)));
        assert_eq!(f.get("u32"), Some(&MetaValue::U32(70000)));
        assert_eq!(f.get("i32"), Some(&MetaValue::I32(-70000)));
        assert_eq!(f.get("f32"), Some(&MetaValue::F32(1.5)));
        assert_eq!(f.get("bool"), Some(&MetaValue::Bool(true)));
        assert_eq!(f.get_str("str"), Some("hello"));
        assert_eq!(
            f.get("arr").and_then(|a| a.as_array()).map(|a| a.len()),
            Some(3)
        );
        assert_eq!(f.get_u64("u64"), Some(1 << 40));
        assert_eq!(f.get("i64"), Some(&MetaValue::I64(-1)));
        assert_eq!(f.get_f64("f64"), Some(2.25));
        let a = f.tensor("a").unwrap();
        assert_eq!((a.ty, a.elems(), a.len), (GgmlType::F32, 8, 32));
        let bytes = f.tensor_bytes(a);
        assert_eq!(f32::from_le_bytes(bytes[4..8].try_into().unwrap()), 1.0);
        let b = f.tensor("b").unwrap();
        assert_eq!((b.ty, b.len), (GgmlType::Q8_0, 34));
        assert_eq!(f.tensor_bytes(b)[2 + 31], 31);
    }
}

#[test]
fn honours_custom_alignment() {
    let f = GgufFile::from_bytes(sample(3, Some(64))).unwrap();
    assert_eq!(f.alignment, 64);
    assert_eq!(f.tensor("a").unwrap().start % 64, 0);
    assert_eq!(f.tensor("b").unwrap().start % 64, 0);
}

#[test]
fn every_truncation_is_an_error_not_a_panic() {
    let full = sample(3, None);
    for cut in 0..full.len() {
        let r = GgufFile::from_bytes(full[..cut].to_vec());
        assert!(r.is_err(), "prefix of {cut} bytes parsed");
    }
}

#[test]
fn lying_counts_do_not_allocate() {
    let mut w = Writer::new(3, u64::MAX / 2, 0);
    w.out.extend([0u8; 16]);
    let e = GgufFile::from_bytes(w.out).unwrap_err().to_string();
    assert!(e.contains("tensor count"), "{e}");

    let mut w = Writer::new(3, 0, 1);
    w.str("k");
    w.out.extend(9u32.to_le_bytes());
    w.out.extend(10u32.to_le_bytes());
    w.out.extend((1u64 << 60).to_le_bytes());
    let e = GgufFile::from_bytes(w.out).unwrap_err().to_string();
    assert!(e.contains("cannot fit"), "{e}");
}

#[test]
fn rejects_bad_magic_version_type_and_ranges() {
    let e = GgufFile::from_bytes(b"GGML\x03\0\0\0".to_vec())
        .unwrap_err()
        .to_string();
    assert!(e.contains("not a GGUF file"), "{e}");
    let e = GgufFile::from_bytes(Writer::new(1, 0, 0).out)
        .unwrap_err()
        .to_string();
    assert!(e.contains("version 1"), "{e}");

    let mut w = Writer::new(3, 1, 0);
    w.tensor("x", &[32], 7, 0); // Q5_1: not supported
    w.pad(32);
    w.out.extend([0u8; 24]);
    let e = GgufFile::from_bytes(w.out).unwrap_err();
    assert!(matches!(e, EngineError::UnsupportedModel(_)), "{e}");
    assert!(e.to_string().contains("Q5_1"), "{e}");

    let mut w = Writer::new(3, 1, 0);
    w.tensor("x", &[1 << 20, 1 << 20], 0, 0);
    w.pad(32);
    let e = GgufFile::from_bytes(w.out).unwrap_err().to_string();
    assert!(e.contains("runs past the end"), "{e}");

    let mut w = Writer::new(3, 1, 0);
    w.tensor("x", &[u64::MAX, 4], 0, 0);
    let e = GgufFile::from_bytes(w.out).unwrap_err().to_string();
    assert!(e.contains("overflow"), "{e}");
}

#[test]
fn random_bytes_never_panic() {
    let base = sample(3, None);
    let mut s = 0x9e3779b97f4a7c15u64;
    for _ in 0..2000 {
        let mut b = base.clone();
        for _ in 0..4 {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            let at = (s as usize) % b.len();
            b[at] = (s >> 32) as u8;
        }
        let _ = GgufFile::from_bytes(b);
    }
}
