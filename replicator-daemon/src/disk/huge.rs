//! Asking the kernel to back a buffer with transparent huge pages.
//!
//! Owns [`advise_huge_pages`], for [`super::aligned::BufPool`]'s large
//! buffers. A buffer of 4 KiB pages is scattered in physical memory, so an
//! O_DIRECT transfer of 1 MiB is 256 segments: more than a virtio disk
//! takes in one request here (`max_segments` 254), so it goes out as two,
//! and every segment is a descriptor the host walks. Backed by 2 MiB pages,
//! it is one segment. Measured on this project's VM with fio (io_uring,
//! O_DIRECT, 1 MiB at depth 16) and huge pages on or off for its buffers:
//! reads 1324–1364 MB/s against 2434–2715, writes 1979–2174 against
//! 2986–3079. Where transparent huge pages are off (`never`), or the
//! advice fails, the buffer simply stays in small pages.
//!
//! This module holds one of the crate's three pieces of `unsafe` (the
//! others are `disk::uring` and `busy_poll`): the `madvise` call.
#![allow(unsafe_code)]

/// Size and alignment of a transparent huge page on x86-64 and arm64 with
/// 4 KiB base pages.
pub const HUGE_PAGE_BYTES: usize = 2 * 1024 * 1024;

/// Advises MADV_HUGEPAGE for `buf`; returns whether the kernel took it.
/// `buf` must start at a [`HUGE_PAGE_BYTES`] boundary to be backed by
/// whole huge pages (the kernel takes an advice on any page-aligned range).
pub fn advise_huge_pages(buf: &mut [u8]) -> bool {
    if buf.is_empty() || (buf.as_ptr() as usize) % 4096 != 0 {
        return false;
    }
    // SAFETY: the range is exactly `buf`, memory this process owns and
    // that is borrowed exclusively here; MADV_HUGEPAGE changes only which
    // page size the kernel may back it with, never its contents or its
    // validity, so no Rust reference into it is affected.
    let rc = unsafe {
        libc::madvise(
            buf.as_mut_ptr().cast::<libc::c_void>(),
            buf.len(),
            libc::MADV_HUGEPAGE,
        )
    };
    rc == 0
}
