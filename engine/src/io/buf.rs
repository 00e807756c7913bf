//! Owned, pooled buffers: a fixed number of buffers is allocated once and cycles between
//! the stages; a stage that needs one waits for one to come back. This is what bounds memory.

use std::fmt;
use std::ops::{Deref, DerefMut};
use std::time::Duration;

use super::sys::AlignedBuf;
use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, bounded};

/// A bounded pool of byte buffers of one capacity.
#[derive(Clone)]
pub struct BufferPool {
    tx: Sender<AlignedBuf>,
    rx: Receiver<AlignedBuf>,
    capacity: usize,
    count: usize,
}

impl fmt::Debug for BufferPool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BufferPool")
            .field("capacity", &self.capacity)
            .field("count", &self.count)
            .field("free", &self.rx.len())
            .finish_non_exhaustive()
    }
}

impl BufferPool {
    /// A pool of `count` buffers, each able to hold `capacity` bytes without reallocating.
    /// Buffers are allocated lazily, on first use, so an idle pool costs nothing.
    pub fn new(count: usize, capacity: usize) -> BufferPool {
        let (tx, rx) = bounded(count);
        // Allocated on first use: an idle pool costs nothing.
        for _ in 0..count {
            tx.send(AlignedBuf::empty())
                .expect("the pool has room for every buffer");
        }
        BufferPool {
            tx,
            rx,
            capacity,
            count,
        }
    }

    /// Bytes the pool holds once every buffer has been used.
    pub fn footprint(&self) -> usize {
        self.count * self.capacity
    }

    /// Allocates every free buffer now and says where each lies (start, capacity), for
    /// registering them with the kernel. These buffers then never move and are never freed
    /// while any clone of the pool lives: a buffer goes back to the pool when dropped, and the
    /// pool replaces only buffers below its capacity, which these are not.
    pub fn allocate_all(&self) -> Vec<(*mut u8, usize)> {
        let mut taken = Vec::with_capacity(self.count);
        while let Ok(mut buf) = self.rx.try_recv() {
            if buf.capacity() < self.capacity {
                buf = AlignedBuf::new(self.capacity);
            }
            taken.push(buf);
        }
        let regions = taken
            .iter_mut()
            .map(|b| (b.as_mut_ptr(), b.capacity()))
            .collect();
        for buf in taken {
            // Room for every buffer the pool made.
            let _ = self.tx.try_send(buf);
        }
        regions
    }

    /// Waits up to `timeout` for a free buffer (cleared, with full capacity reserved).
    pub fn get_timeout(&self, timeout: Duration) -> Option<PooledBuf> {
        match self.rx.recv_timeout(timeout) {
            Ok(mut buf) => {
                if buf.capacity() < self.capacity {
                    buf = AlignedBuf::new(self.capacity);
                }
                buf.set_len(0);
                Some(PooledBuf {
                    buf,
                    home: self.tx.clone(),
                })
            }
            Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => None,
        }
    }
}

/// A buffer on loan from a [`BufferPool`]; it goes back when dropped.
pub struct PooledBuf {
    buf: AlignedBuf,
    home: Sender<AlignedBuf>,
}

impl fmt::Debug for PooledBuf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PooledBuf")
            .field("len", &self.buf.len())
            .finish_non_exhaustive()
    }
}

impl PooledBuf {
    /// Capacity in bytes (what the pool gives every buffer).
    pub fn capacity(&self) -> usize {
        self.buf.capacity()
    }

    /// Sets the length (bytes hold whatever the last use left, all initialised).
    ///
    /// # Panics
    /// If `len` exceeds the capacity.
    pub fn set_len(&mut self, len: usize) {
        self.buf.set_len(len);
    }

    /// The start of the buffer, for reads the kernel does into it.
    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        self.buf.as_mut_ptr()
    }
}

// Only the bytes are lent out, never the allocation: a pooled buffer stays where the pool
// put it (what `io_uring` fixed buffers rely on), and nothing can swap it for another.
impl Deref for PooledBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.buf
    }
}

impl DerefMut for PooledBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        &mut self.buf
    }
}

impl AsRef<[u8]> for PooledBuf {
    fn as_ref(&self) -> &[u8] {
        &self.buf
    }
}

impl Drop for PooledBuf {
    fn drop(&mut self) {
        // The pool has room for every buffer it created, so this never blocks; if the pool
        // is gone the buffer is simply freed.
        let buf = std::mem::replace(&mut self.buf, AlignedBuf::empty());
        let _ = self.home.try_send(buf);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_cycle_and_bound() {
        let pool = BufferPool::new(2, 1024);
        let a = pool.get_timeout(Duration::from_millis(10)).unwrap();
        let b = pool.get_timeout(Duration::from_millis(10)).unwrap();
        assert!(a.capacity() >= 1024);
        assert!(pool.get_timeout(Duration::from_millis(10)).is_none());
        drop(a);
        let c = pool.get_timeout(Duration::from_millis(10)).unwrap();
        assert!(c.capacity() >= 1024 && c.is_empty());
        assert_eq!(c.as_ptr() as usize % super::super::sys::DIRECT_ALIGN, 0);
        drop((b, c));
        assert_eq!(pool.footprint(), 2048);
    }
}
