//! `io_uring` reads: many chunk reads in flight from one thread.
//!
//! A [`ChunkRing`] takes a chunk's buffer together with the reads that fill it and owns the
//! buffer until every one of those reads has completed; only then does [`ChunkRing::complete`]
//! hand it back. Dropping the ring waits for every read still in the kernel before any buffer
//! is freed. Short reads are resubmitted for the rest, `EINTR`/`EAGAIN` retried, and a read
//! that `O_DIRECT` refuses (`EINVAL`) is retried through the buffered descriptor.

use std::io;
use std::marker::PhantomData;
use std::os::fd::{AsRawFd, BorrowedFd};

use io_uring::{IoUring, opcode, types};

use super::buf::{BufferPool, PooledBuf};

/// One read of a chunk: `len` bytes of a file at `offset`, into the buffer at `at`. Its
/// descriptors are borrowed for the ring's lifetime `'fd`: they stay open while it reads.
#[derive(Debug, Clone, Copy)]
pub struct ChunkRead<'fd> {
    /// The descriptor to read with (possibly opened `O_DIRECT`).
    pub fd: BorrowedFd<'fd>,
    /// A buffered descriptor of the same file, for a retry when `O_DIRECT` refuses.
    pub fallback_fd: BorrowedFd<'fd>,
    /// Which source file, for errors.
    pub file: usize,
    /// Offset in the chunk buffer.
    pub at: usize,
    /// Bytes to read.
    pub len: usize,
    /// Offset in the file.
    pub offset: u64,
}

/// A read that failed.
#[derive(Debug)]
pub struct ReadFailure {
    /// Which source file.
    pub file: usize,
    /// Where in it.
    pub offset: u64,
    /// Why; `UnexpectedEof` when the file ended first.
    pub error: io::Error,
}

/// A chunk whose reads all completed.
#[derive(Debug)]
pub struct Done {
    /// What the caller gave with it.
    pub token: u64,
    /// The buffer, filled where the reads said (unless one failed).
    pub buf: PooledBuf,
    /// Bytes read, or the first failure.
    pub result: Result<u64, ReadFailure>,
}

struct Op<'fd> {
    read: ChunkRead<'fd>,
    /// Bytes of this read done so far.
    done: usize,
    finished: bool,
}

struct Pending<'fd> {
    token: u64,
    buf: PooledBuf,
    ops: Vec<Op<'fd>>,
    left: usize,
    failure: Option<ReadFailure>,
}

/// A ring with the chunks whose reads are in flight. It reads with descriptors borrowed for
/// `'fd` (see [`ChunkRead`]), so whatever owns them outlives the ring, which waits for the
/// kernel when dropped: the order is checked by the compiler, not kept by a comment.
pub struct ChunkRing<'fd> {
    ring: IoUring,
    slots: Vec<Option<Pending<'fd>>>,
    free: Vec<usize>,
    /// Reads submitted whose completion was not reaped yet.
    in_kernel: usize,
    /// Chunks whose reads all completed, waiting to be handed back.
    ready: Vec<usize>,
    /// Most reads in the kernel at once: what the completion queue holds, so that no
    /// completion ever overflows it.
    max_in_kernel: usize,
    /// Buffers registered with the kernel (fixed buffers): start address, capacity, index.
    fixed: Vec<(usize, usize, u16)>,
    /// The pool those buffers belong to: held so that they stay allocated for as long as the
    /// ring, whose descriptor (declared before, so closed first) registers them.
    fixed_pool: Option<BufferPool>,
    /// Reads submitted into registered buffers.
    fixed_reads: u64,
    _fds: PhantomData<BorrowedFd<'fd>>,
}

impl std::fmt::Debug for ChunkRing<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChunkRing")
            .field("chunks", &(self.slots.len() - self.free.len()))
            .field("in_kernel", &self.in_kernel)
            .finish_non_exhaustive()
    }
}

impl<'fd> ChunkRing<'fd> {
    /// A ring for up to `depth` chunks in flight. Fails where `io_uring` is unavailable
    /// (`ENOSYS`, `EPERM` under seccomp or `kernel.io_uring_disabled`, old kernels).
    pub fn new(depth: usize) -> io::Result<ChunkRing<'fd>> {
        let depth = depth.clamp(1, 1024);
        let entries = u32::try_from(depth.next_power_of_two() * 4).unwrap_or(4096);
        let ring = IoUring::new(entries)?;
        // IORING_OP_READ came with Linux 5.6: an older ring would fail every read.
        let mut probe = io_uring::Probe::new();
        ring.submitter().register_probe(&mut probe)?;
        if !probe.is_supported(opcode::Read::CODE) {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "this kernel's io_uring has no read operation (Linux 5.6 or later needed)",
            ));
        }
        let max_in_kernel = usize::try_from(ring.params().cq_entries()).unwrap_or(64);
        Ok(ChunkRing {
            max_in_kernel,
            ring,
            slots: (0..depth).map(|_| None).collect(),
            free: (0..depth).rev().collect(),
            in_kernel: 0,
            ready: Vec::new(),
            fixed: Vec::new(),
            fixed_pool: None,
            fixed_reads: 0,
            _fds: PhantomData,
        })
    }

    /// Registers the buffers of `pool` with the kernel (fixed buffers), so that reads into
    /// them skip mapping and pinning their pages on every read; reads into other memory go
    /// as before. Returns how many were registered. Fails, leaving the ring as it was, where
    /// the kernel refuses (over `RLIMIT_MEMLOCK`, say).
    pub fn register_pool(&mut self, pool: &BufferPool) -> io::Result<usize> {
        if self.fixed_pool.is_some() {
            return Ok(0);
        }
        let mut regions = pool.allocate_all();
        // The kernel takes at most 16384 buffers.
        regions.truncate(16384);
        if regions.is_empty() {
            return Ok(0);
        }
        let iovecs: Vec<libc::iovec> = regions
            .iter()
            .map(|&(ptr, len)| libc::iovec {
                iov_base: ptr.cast(),
                iov_len: len,
            })
            .collect();
        // SAFETY: each region is a buffer of `pool`, allocated by `allocate_all`, which never
        // moves or frees it while a clone of the pool lives (a dropped buffer goes back to the
        // pool; pooled buffers never grow into new allocations). The ring keeps such a clone
        // in `fixed_pool`, dropped only after `ring` (field order), whose closing ends the
        // registration; so the memory is valid for as long as it is registered.
        unsafe { self.ring.submitter().register_buffers(&iovecs)? };
        self.fixed = regions
            .iter()
            .zip(0u16..)
            .map(|(&(ptr, len), i)| (ptr.addr(), len, i))
            .collect();
        self.fixed_pool = Some(pool.clone());
        Ok(self.fixed.len())
    }

    /// Reads submitted into registered buffers so far (resubmissions count again).
    pub fn fixed_reads(&self) -> u64 {
        self.fixed_reads
    }

    /// The index of the registered buffer that holds `len` bytes at `ptr`, if any.
    fn fixed_index(&self, ptr: *mut u8, len: usize) -> Option<u16> {
        let addr = ptr.addr();
        self.fixed
            .iter()
            .find(|&&(start, cap, _)| addr >= start && addr + len <= start + cap)
            .map(|&(_, _, i)| i)
    }

    /// Whether another chunk can be queued.
    pub fn has_room(&self) -> bool {
        !self.free.is_empty()
    }

    /// Chunks queued and not yet handed back.
    pub fn in_flight(&self) -> usize {
        self.slots.len() - self.free.len()
    }

    /// Queues a chunk: `reads` fill parts of `buf` (each within its capacity); the ring owns
    /// `buf` until [`ChunkRing::complete`] returns it. The caller checks [`has_room`] first.
    ///
    /// # Panics
    /// If there is no room, or a read lies outside the buffer.
    ///
    /// [`has_room`]: ChunkRing::has_room
    pub fn queue(
        &mut self,
        token: u64,
        buf: PooledBuf,
        reads: &[ChunkRead<'fd>],
    ) -> io::Result<()> {
        let slot = self.free.pop().expect("queue called with room");
        let cap = buf.capacity();
        for r in reads {
            assert!(r.at + r.len <= cap, "a read lies outside its buffer");
        }
        let ops: Vec<Op> = reads
            .iter()
            .map(|r| Op {
                read: *r,
                done: 0,
                finished: r.len == 0,
            })
            .collect();
        let left = ops.iter().filter(|o| !o.finished).count();
        self.slots[slot] = Some(Pending {
            token,
            buf,
            ops,
            left,
            failure: None,
        });
        if left == 0 {
            self.ready.push(slot);
            return Ok(());
        }
        for (i, r) in reads.iter().enumerate() {
            if r.len > 0 {
                self.submit_op(slot, i, false);
            }
        }
        // Hand the reads to the kernel now rather than at the next wait.
        self.submit_now()
    }

    /// `io_uring_enter` without waiting, retried when interrupted or out of resources.
    fn submit_now(&mut self) -> io::Result<()> {
        loop {
            match self.ring.submit() {
                Ok(_) => return Ok(()),
                Err(e) if matches!(e.raw_os_error(), Some(libc::EINTR | libc::EAGAIN)) => {}
                // Completions are waiting to be reaped; what is queued goes with the next call.
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => return Ok(()),
                Err(e) => return Err(e),
            }
        }
    }

    /// Waits for completions until another read fits in the completion queue (a chunk of
    /// many small grains can hold more reads than it).
    fn make_room(&mut self) -> io::Result<()> {
        while self.in_kernel >= self.max_in_kernel {
            self.reap(true)?;
        }
        Ok(())
    }

    /// Submits what is queued and accounts every completion there is, waiting for one first
    /// if `wait`. Returns how many were reaped.
    fn reap(&mut self, wait: bool) -> io::Result<usize> {
        loop {
            let submitted = if wait {
                self.ring.submit_and_wait(1)
            } else {
                self.ring.submit()
            };
            match submitted {
                Ok(_) => break,
                Err(e) if matches!(e.raw_os_error(), Some(libc::EINTR | libc::EAGAIN)) => {}
                // Completions waiting to be reaped: reap them below.
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => break,
                Err(e) => return Err(e),
            }
        }
        let reaped: Vec<(u64, i32)> = self
            .ring
            .completion()
            .map(|c| (c.user_data(), c.result()))
            .collect();
        // Every completion taken off the queue is accounted, whatever happens to the others.
        self.in_kernel -= reaped.len();
        for (data, res) in &reaped {
            self.reaped(*data, *res);
        }
        Ok(reaped.len())
    }

    /// Pushes the rest of read `i` of chunk `slot` to the submission queue. A read that cannot
    /// be submitted fails (and so finishes) there.
    fn submit_op(&mut self, slot: usize, i: usize, buffered: bool) {
        if let Err(e) = self.try_submit_op(slot, i, buffered) {
            self.finish(slot, i, Some(e));
        }
    }

    fn try_submit_op(&mut self, slot: usize, i: usize, buffered: bool) -> io::Result<()> {
        self.make_room()?;
        let pending = self.slots[slot].as_mut().expect("a queued chunk");
        let op = &pending.ops[i];
        let fd = if buffered {
            op.read.fallback_fd
        } else {
            op.read.fd
        }
        .as_raw_fd();
        let at = op.read.at + op.done;
        let len = op.read.len - op.done;
        let offset = op.read.offset + op.done as u64;
        // Inside the buffer: `queue` checked `read.at + read.len` against its capacity.
        let ptr = pending.buf.as_mut_ptr().wrapping_add(at);
        let len32 = u32::try_from(len).map_err(|_| io::Error::other("read over 4 GiB"))?;
        let fixed = self.fixed_index(ptr, len);
        let entry = match fixed {
            Some(index) => opcode::ReadFixed::new(types::Fd(fd), ptr, len32, index)
                .offset(offset)
                .build(),
            None => opcode::Read::new(types::Fd(fd), ptr, len32)
                .offset(offset)
                .build(),
        }
        .user_data(((slot as u64) << 32) | i as u64);
        loop {
            // SAFETY: the entry points into the heap buffer of `self.slots[slot]` (a fixed
            // read names the registered buffer that holds that same memory), which the
            // ring owns until this read's completion is reaped (`complete` hands a buffer back
            // only when all its reads completed, and `Drop` waits for every read in the
            // kernel); the buffer's memory never moves (a fixed allocation), and the reads of
            // a chunk cover disjoint parts of it (the chunk's mappings do not overlap). The
            // descriptor stays open: it is borrowed for `'fd`, which outlives the ring, and
            // the ring's `Drop` waits for every read in the kernel.
            let pushed = unsafe { self.ring.submission().push(&entry) };
            if pushed.is_ok() {
                break;
            }
            // Submission queue full: hand what is queued to the kernel and try again.
            self.submit_now()?;
        }
        self.in_kernel += 1;
        self.fixed_reads += u64::from(fixed.is_some());
        Ok(())
    }

    /// Marks read `i` of chunk `slot` finished (failed with `error`, if any).
    fn finish(&mut self, slot: usize, i: usize, error: Option<io::Error>) {
        let pending = self.slots[slot].as_mut().expect("a chunk in flight");
        let op = &mut pending.ops[i];
        if op.finished {
            return;
        }
        if let Some(error) = error {
            pending.failure.get_or_insert(ReadFailure {
                file: op.read.file,
                offset: op.read.offset,
                error,
            });
        }
        op.finished = true;
        pending.left -= 1;
        if pending.left == 0 {
            self.ready.push(slot);
        }
    }

    /// Returns a chunk whose reads all completed, waiting for one if `wait` (and any is in
    /// flight); `None` when there is none.
    pub fn complete(&mut self, wait: bool) -> io::Result<Option<Done>> {
        loop {
            if let Some(slot) = self.ready.pop() {
                let p = self.slots[slot].take().expect("a ready chunk");
                self.free.push(slot);
                let bytes = p.ops.iter().map(|o| o.done as u64).sum();
                return Ok(Some(Done {
                    token: p.token,
                    buf: p.buf,
                    result: match p.failure {
                        Some(f) => Err(f),
                        None => Ok(bytes),
                    },
                }));
            }
            if self.in_kernel == 0 {
                return Ok(None);
            }
            if self.reap(wait)? == 0 && !wait {
                return Ok(None);
            }
        }
    }

    /// Accounts one completion: resubmits what is left of a short or interrupted read.
    fn reaped(&mut self, data: u64, res: i32) {
        let slot = usize::try_from(data >> 32).expect("a slot index");
        let i = usize::try_from(data & 0xffff_ffff).expect("an op index");
        let pending = self.slots[slot].as_mut().expect("a chunk in flight");
        let op = &mut pending.ops[i];
        match res.cmp(&0) {
            std::cmp::Ordering::Greater => {
                op.done += usize::try_from(res).expect("positive");
                if op.done < op.read.len {
                    return self.submit_op(slot, i, false);
                }
                self.finish(slot, i, None);
            }
            std::cmp::Ordering::Equal => {
                self.finish(slot, i, Some(io::Error::from(io::ErrorKind::UnexpectedEof)));
            }
            std::cmp::Ordering::Less => {
                let errno = -res;
                if errno == libc::EINTR || errno == libc::EAGAIN {
                    self.submit_op(slot, i, false);
                } else if errno == libc::EINVAL
                    && op.read.fd.as_raw_fd() != op.read.fallback_fd.as_raw_fd()
                {
                    // O_DIRECT refused this one (alignment the file system wants larger):
                    // read it through the page cache.
                    op.read.fd = op.read.fallback_fd;
                    self.submit_op(slot, i, true);
                } else {
                    self.finish(slot, i, Some(io::Error::from_raw_os_error(errno)));
                }
            }
        }
    }
}

impl Drop for ChunkRing<'_> {
    fn drop(&mut self) {
        // Every read still in the kernel writes into a buffer the ring owns: wait for all of
        // them before the buffers go.
        while self.in_kernel > 0 {
            match self.ring.submit_and_wait(1) {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                Err(_) => {
                    // The ring cannot wait: leak the buffers rather than free memory the
                    // kernel may still write.
                    for p in self.slots.iter_mut().filter_map(Option::take) {
                        std::mem::forget(p.buf);
                    }
                    return;
                }
            }
            let n = self.ring.completion().count();
            self.in_kernel = self.in_kernel.saturating_sub(n);
        }
    }
}

#[cfg(test)]
mod tests;
