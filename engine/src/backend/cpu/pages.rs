//! Zeroed buffers for the KV store, mapped from the OS directly and marked for transparent huge pages.
//!
//! Decode attention reads each sequence's keys and values as scattered runs of one block each (4 KiB per KV head at
//! f32 and 16 tokens), so with 4 KiB pages nearly every run costs a TLB miss, whose page walk is dear under a
//! hypervisor. On 2 MiB pages a run's translation is almost always cached: on the development VM, one core read
//! scattered 4 KiB runs at 6.3 GB/s on small pages and 8.7 on huge ones (sequentially: 23 and 31). Where the kernel
//! does not grant huge pages (THP off, or `madvise` mode refused) the buffer still works on small ones; the advice
//! is a hint.

use half::f16;
use std::marker::PhantomData;
use std::ops::{Deref, DerefMut};

/// Element types whose all-zero bit pattern is a valid value (so a fresh anonymous mapping is a zeroed array).
///
/// # Safety
/// Implementors must be plain data: no padding, no invalid bit patterns, alignment at most a page's.
pub unsafe trait Zeroed: Copy {}
// SAFETY: plain numbers; zero bits are 0.0, 0 and +0.0.
unsafe impl Zeroed for f32 {}
// SAFETY: as above.
unsafe impl Zeroed for u8 {}
// SAFETY: as above (f16 is a transparent u16).
unsafe impl Zeroed for f16 {}

/// `len` elements of `T`, zeroed, on their own anonymous mapping.
pub struct Pages<T: Zeroed> {
    /// `None` for an empty buffer (a mapping cannot be empty).
    map: Option<memmap2::MmapMut>,
    len: usize,
    _t: PhantomData<T>,
}

impl<T: Zeroed> Pages<T> {
    pub fn zeroed(len: usize) -> std::io::Result<Self> {
        let bytes = len
            .checked_mul(size_of::<T>())
            .ok_or_else(|| std::io::Error::other("buffer size overflows"))?;
        let map = if bytes == 0 {
            None
        } else {
            let map = memmap2::MmapMut::map_anon(bytes)?;
            #[cfg(target_os = "linux")]
            {
                // Only a hint: without it the pages are small, and everything else is the same.
                let _ = map.advise(memmap2::Advice::HugePage);
            }
            Some(map)
        };
        Ok(Self {
            map,
            len,
            _t: PhantomData,
        })
    }
}

impl<T: Zeroed> Deref for Pages<T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        match &self.map {
            // SAFETY: the mapping holds `len * size_of::<T>()` bytes, page-aligned (so aligned for T), and every bit
            // pattern there is a valid T (`Zeroed`); it lives as long as `self`.
            Some(m) => unsafe { std::slice::from_raw_parts(m.as_ptr().cast::<T>(), self.len) },
            None => &[],
        }
    }
}

impl<T: Zeroed> DerefMut for Pages<T> {
    fn deref_mut(&mut self) -> &mut [T] {
        match &mut self.map {
            // SAFETY: as in `deref`, borrowed mutably through `self`.
            Some(m) => unsafe {
                std::slice::from_raw_parts_mut(m.as_mut_ptr().cast::<T>(), self.len)
            },
            None => &mut [],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_start_zeroed_and_hold_what_is_written() {
        let mut p = Pages::<f32>::zeroed(1 << 20).expect("map");
        assert_eq!(p.len(), 1 << 20);
        assert!(p.iter().all(|&x| x == 0.0));
        p[12345] = 2.5;
        assert_eq!(p[12345], 2.5);
        let h = Pages::<f16>::zeroed(3).expect("map");
        assert_eq!(&h[..], &[f16::ZERO; 3]);
        assert!(Pages::<u8>::zeroed(0).expect("empty").is_empty());
        assert!(Pages::<f32>::zeroed(usize::MAX / 2).is_err());
    }
}
