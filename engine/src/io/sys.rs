//! The few system calls std does not wrap: `SEEK_DATA`/`SEEK_HOLE` and block-device ioctls.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

/// Returns the data extents `(offset, len)` of a file below `size`, from `SEEK_DATA`/`SEEK_HOLE`.
///
/// File systems without hole support report the whole file as data, which is correct.
/// `cap` bounds the number of extents collected; past it, the rest of the file is reported
/// as one data extent (reading a few holes is correct, just slower).
pub fn data_extents(file: &File, size: u64, cap: usize) -> io::Result<Vec<(u64, u64)>> {
    let mut out = Vec::new();
    let mut pos = 0u64;
    while pos < size {
        let Some(data) = seek(file, pos, libc::SEEK_DATA)? else {
            break; // ENXIO: no data after pos.
        };
        if data >= size {
            break;
        }
        if out.len() + 1 >= cap {
            out.push((data, size - data));
            break;
        }
        let hole = seek(file, data, libc::SEEK_HOLE)?.unwrap_or(size).min(size);
        if hole <= data {
            // A file changing under us; treat the rest as data rather than loop.
            out.push((data, size - data));
            break;
        }
        out.push((data, hole - data));
        pos = hole;
    }
    Ok(out)
}

/// `lseek(fd, offset, whence)`, with `ENXIO` (no more data) as `None`.
fn seek(file: &File, offset: u64, whence: libc::c_int) -> io::Result<Option<u64>> {
    let offset = libc::off_t::try_from(offset)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "offset out of range"))?;
    // SAFETY: lseek only reads its integer arguments; the descriptor is valid for the
    // lifetime of `file`, which the borrow keeps alive across the call.
    let r = unsafe { libc::lseek(file.as_raw_fd(), offset, whence) };
    if r < 0 {
        let e = io::Error::last_os_error();
        return match e.raw_os_error() {
            Some(libc::ENXIO) => Ok(None),
            _ => Err(e),
        };
    }
    Ok(Some(
        u64::try_from(r).expect("lseek returned a non-negative offset"),
    ))
}

// From <linux/fs.h>: _IOR(0x12, 114, size_t), _IO(0x12, 104), _IO(0x12, 123).
const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;
const BLKSSZGET: libc::c_ulong = 0x1268;
const BLKPBSZGET: libc::c_ulong = 0x127b;

/// The process's real user id.
pub fn uid() -> u32 {
    // SAFETY: getuid has no preconditions and cannot fail.
    unsafe { libc::getuid() }
}

/// Bytes an unprivileged writer may still put into the file system holding `path`.
pub fn free_bytes(path: &std::path::Path) -> io::Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "a NUL in the path"))?;
    let mut st = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: `c` is a NUL-terminated path that lives across the call, and `st` is a
    // writable `statvfs` the call fills; it is read only when the call succeeded.
    let r = unsafe { libc::statvfs(c.as_ptr(), st.as_mut_ptr()) };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: statvfs returned 0, so it filled `st`.
    let st = unsafe { st.assume_init() };
    Ok(st.f_bavail.saturating_mul(st.f_frsize))
}

/// Size in bytes of a block device.
pub fn block_device_size(file: &File) -> io::Result<u64> {
    let mut size: u64 = 0;
    // SAFETY: BLKGETSIZE64 writes one u64 through the pointer, which points at `size`,
    // alive and writable for the whole call; the descriptor is valid while `file` lives.
    let r = unsafe { libc::ioctl(file.as_raw_fd(), BLKGETSIZE64, &raw mut size) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(size)
}

/// Logical and physical sector sizes of a block device.
pub fn block_device_sectors(file: &File) -> io::Result<(u32, u32)> {
    let mut logical: libc::c_int = 0;
    let mut physical: libc::c_uint = 0;
    // SAFETY: BLKSSZGET writes one int through the pointer, which points at `logical`,
    // alive and writable for the call; the descriptor is valid while `file` lives.
    let r = unsafe { libc::ioctl(file.as_raw_fd(), BLKSSZGET, &raw mut logical) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: BLKPBSZGET writes one unsigned int through the pointer, which points at
    // `physical`, alive and writable for the call; the descriptor is valid while `file` lives.
    let r = unsafe { libc::ioctl(file.as_raw_fd(), BLKPBSZGET, &raw mut physical) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    let logical = u32::try_from(logical).unwrap_or(512);
    Ok((logical, physical.max(logical)))
}

/// Alignment of read buffers: what `O_DIRECT` asks of memory on every common file system.
pub const DIRECT_ALIGN: usize = 4096;

/// A heap buffer aligned to [`DIRECT_ALIGN`], zero-filled when allocated, of fixed capacity:
/// it never moves while it lives, so a read the kernel has in flight into it stays valid as
/// long as its owner keeps it.
pub struct AlignedBuf {
    ptr: std::ptr::NonNull<u8>,
    cap: usize,
    len: usize,
}

// SAFETY: the buffer owns its allocation exclusively (like a Vec<u8>); nothing else aliases it.
unsafe impl Send for AlignedBuf {}
// SAFETY: shared references only read the initialised bytes, as with &[u8].
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    /// Allocates `cap` zeroed bytes (at least one block); `len` starts at 0.
    pub fn new(cap: usize) -> AlignedBuf {
        let cap = cap.max(DIRECT_ALIGN).next_multiple_of(DIRECT_ALIGN);
        let layout = std::alloc::Layout::from_size_align(cap, DIRECT_ALIGN)
            .expect("a buffer size below isize::MAX");
        // SAFETY: the layout has a non-zero size (at least one block).
        let raw = unsafe { std::alloc::alloc_zeroed(layout) };
        let Some(ptr) = std::ptr::NonNull::new(raw) else {
            std::alloc::handle_alloc_error(layout);
        };
        AlignedBuf { ptr, cap, len: 0 }
    }

    /// A buffer of no capacity (no allocation), to leave behind when one is moved out.
    pub fn empty() -> AlignedBuf {
        AlignedBuf {
            ptr: std::ptr::NonNull::dangling(),
            cap: 0,
            len: 0,
        }
    }

    /// Capacity in bytes (a multiple of [`DIRECT_ALIGN`]).
    pub fn capacity(&self) -> usize {
        self.cap
    }

    /// Sets the length (bytes hold whatever the last use left, all initialised).
    ///
    /// # Panics
    /// If `len` exceeds the capacity.
    pub fn set_len(&mut self, len: usize) {
        assert!(len <= self.cap, "a buffer cannot grow past its capacity");
        self.len = len;
    }

    /// The start of the buffer, for reads the kernel does into it.
    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        self.ptr.as_ptr()
    }
}

impl std::ops::Deref for AlignedBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: `len <= cap` bytes at `ptr` are initialised and owned by `self`.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl std::ops::DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `deref`, and the borrow of `self` is exclusive.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl AsRef<[u8]> for AlignedBuf {
    fn as_ref(&self) -> &[u8] {
        self
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        if self.cap == 0 {
            return;
        }
        let layout = std::alloc::Layout::from_size_align(self.cap, DIRECT_ALIGN)
            .expect("the layout it was allocated with");
        // SAFETY: `ptr` was allocated by `alloc_zeroed` with this very layout and is freed once.
        unsafe { std::alloc::dealloc(self.ptr.as_ptr(), layout) };
    }
}

impl std::fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AlignedBuf")
            .field("len", &self.len)
            .field("cap", &self.cap)
            .finish_non_exhaustive()
    }
}

// Machine probing: what the memory planner and the thread counts start from.

/// Memory this process may use: the machine's (`MemTotal`), or less under a control group
/// limit (v2 `memory.max`, v1 `memory.limit_in_bytes`). `None` where neither can be read.
pub(crate) fn usable_memory() -> Option<usize> {
    let read = |path: &str| std::fs::read_to_string(path).ok();
    let total = read("/proc/meminfo").and_then(|m| {
        let line = m.lines().find(|l| l.starts_with("MemTotal:"))?;
        let kib: usize = line.split_whitespace().nth(1)?.parse().ok()?;
        kib.checked_mul(1024)
    });
    // The limits of this process's control group and of its ancestors, from the paths in
    // /proc/self/cgroup (v2: "0::/path"; v1: "N:memory:/path" under the memory controller's
    // mount). "max" (v2) or a huge number (v1) when there is none: neither lowers the total.
    let mut files = Vec::new();
    for line in read("/proc/self/cgroup").unwrap_or_default().lines() {
        let (root, file, path) = if let Some(path) = line.strip_prefix("0::") {
            ("/sys/fs/cgroup", "memory.max", path)
        } else if let Some((_, path)) = line.split_once(":memory:") {
            ("/sys/fs/cgroup/memory", "memory.limit_in_bytes", path)
        } else {
            continue;
        };
        let mut dir = std::path::PathBuf::from(root);
        files.push(dir.join(file));
        for part in path.split('/').filter(|p| !p.is_empty() && *p != "..") {
            dir.push(part);
            files.push(dir.join(file));
        }
    }
    let limit = files
        .iter()
        .filter_map(|p| {
            std::fs::read_to_string(p)
                .ok()?
                .trim()
                .parse::<usize>()
                .ok()
        })
        .min();
    match (total, limit) {
        (Some(t), Some(l)) => Some(t.min(l)),
        (t, l) => t.or(l),
    }
}

/// Cores this process may run on (1 where that cannot be told).
pub(crate) fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, usize::from)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Seek, SeekFrom, Write};

    #[test]
    fn finds_data_between_holes() {
        let mut f = tempfile::tempfile().unwrap();
        f.set_len(64 << 20).unwrap();
        f.seek(SeekFrom::Start(8 << 20)).unwrap();
        f.write_all(&vec![1u8; 1 << 20]).unwrap();
        f.seek(SeekFrom::Start(40 << 20)).unwrap();
        f.write_all(&vec![2u8; 1 << 20]).unwrap();
        let ext = data_extents(&f, 64 << 20, 1000).unwrap();
        let total: u64 = ext.iter().map(|e| e.1).sum();
        assert!((2 << 20..64 << 20).contains(&total), "{ext:?}");
        assert!(ext.iter().any(|&(o, l)| o <= 8 << 20 && o + l >= 9 << 20));
        assert!(ext.iter().any(|&(o, l)| o <= 40 << 20 && o + l >= 41 << 20));
        // The cap turns the tail into one extent that still covers every byte of data.
        let capped = data_extents(&f, 64 << 20, 2).unwrap();
        assert_eq!(capped.len(), 2);
        assert_eq!(capped[1].0 + capped[1].1, 64 << 20);
    }
}
