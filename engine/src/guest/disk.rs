//! A disk's bytes by offset, for inspection: an image through its reader (holes read as
//! zeros), or a snapshot through the store; and windows onto a partition for the file system
//! readers. Reads go through a small cache of 64 KiB blocks (file system readers ask for a
//! few bytes at a time), so memory is bounded whatever the disk.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::error::{Error, ErrorKind, Result};
use crate::image::{BlockSource, Mapping};
use crate::io::Pread;
use crate::io::chunks::ChunkFill;
use crate::nbd::disk::{Chunk, Disk};

/// Size of a cached block.
const BLOCK: u64 = 64 << 10;
/// Blocks kept (4 MiB).
const BLOCKS_KEPT: usize = 64;

/// Random-access reads of a whole virtual disk.
pub(crate) trait DiskBytes: Send + Sync {
    /// Its virtual size.
    fn size(&self) -> u64;
    /// Fills `buf` from `offset`; a read past the end is an error.
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()>;
    /// What it is, for messages.
    fn describe(&self) -> String;
}

/// One block of a disk, read whole (clipped at the end).
pub(crate) trait BlockRead {
    fn read_block(&mut self, offset: u64, len: u64, out: &mut Vec<u8>) -> Result<()>;
}

/// The cache in front of a [`BlockRead`].
struct Cached<R> {
    inner: R,
    blocks: HashMap<u64, (Arc<Vec<u8>>, u64)>,
    clock: u64,
}

impl<R: BlockRead> Cached<R> {
    fn new(inner: R) -> Self {
        Cached {
            inner,
            blocks: HashMap::new(),
            clock: 0,
        }
    }

    fn read(&mut self, size: u64, offset: u64, buf: &mut [u8]) -> Result<()> {
        let end = offset
            .checked_add(buf.len() as u64)
            .filter(|&e| e <= size)
            .ok_or_else(|| {
                Error::new(
                    ErrorKind::InvalidImage,
                    format!(
                        "a read of {} bytes at {offset} goes past the disk's end ({size} bytes)",
                        buf.len()
                    ),
                )
            })?;
        let mut at = offset;
        while at < end {
            let block = at / BLOCK * BLOCK;
            let data = self.block(size, block)?;
            let from = usize::try_from(at - block).unwrap_or(0);
            let n = usize::try_from((block + BLOCK).min(end) - at).unwrap_or(0);
            let to = usize::try_from(at - offset).unwrap_or(0);
            buf[to..to + n].copy_from_slice(&data[from..from + n]);
            at += n as u64;
        }
        Ok(())
    }

    fn block(&mut self, size: u64, block: u64) -> Result<Arc<Vec<u8>>> {
        self.clock += 1;
        let now = self.clock;
        if let Some((data, used)) = self.blocks.get_mut(&block) {
            *used = now;
            return Ok(data.clone());
        }
        let len = BLOCK.min(size - block);
        let mut data = Vec::new();
        self.inner.read_block(block, len, &mut data)?;
        if self.blocks.len() >= BLOCKS_KEPT
            && let Some(&old) = self
                .blocks
                .iter()
                .min_by_key(|(_, (_, used))| *used)
                .map(|(k, _)| k)
        {
            self.blocks.remove(&old);
        }
        let data = Arc::new(data);
        self.blocks.insert(block, (data.clone(), now));
        Ok(data)
    }
}

/// A disk read block by block through the cache.
pub(crate) struct CachedDisk<R> {
    size: u64,
    name: String,
    state: Mutex<Cached<R>>,
}

impl<R: BlockRead + Send> DiskBytes for CachedDisk<R> {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let mut state = self
            .state
            .lock()
            .map_err(|_| Error::internal("a disk reader's lock is poisoned"))?;
        state.read(self.size, offset, buf)
    }

    fn describe(&self) -> String {
        self.name.clone()
    }
}

/// An image read through its format reader.
pub(crate) type ImageBytes = CachedDisk<ImageRead>;

pub(crate) struct ImageRead {
    source: Box<dyn BlockSource>,
    fill: ChunkFill,
    maps: Vec<Mapping>,
}

impl BlockRead for ImageRead {
    fn read_block(&mut self, offset: u64, len: u64, out: &mut Vec<u8>) -> Result<()> {
        let mut backend = Pread;
        let (data, _) = self.fill.read_range(
            self.source.as_ref(),
            &mut backend,
            &mut self.maps,
            offset,
            len,
            out,
        )?;
        if data.is_none() {
            out.clear();
            out.resize(usize::try_from(len).unwrap_or(0), 0);
        }
        Ok(())
    }
}

impl CachedDisk<ImageRead> {
    pub(crate) fn new(source: Box<dyn BlockSource>) -> ImageBytes {
        let size = source.info().virtual_size;
        let name = source
            .opened_path()
            .map_or_else(|| "the image".to_owned(), |p| p.display().to_string());
        ImageBytes {
            size,
            name,
            state: Mutex::new(Cached::new(ImageRead {
                source,
                fill: ChunkFill::default(),
                maps: Vec::new(),
            })),
        }
    }
}

/// A snapshot read through the store (the NBD server's disk, with its chunk cache).
pub(crate) type SnapshotBytes = CachedDisk<SnapshotRead>;

pub(crate) struct SnapshotRead(Disk);

impl BlockRead for SnapshotRead {
    fn read_block(&mut self, offset: u64, len: u64, out: &mut Vec<u8>) -> Result<()> {
        out.clear();
        let chunk = self.0.chunk;
        let end = offset + len;
        let mut at = offset;
        while at < end {
            let c = at / chunk;
            let start = c * chunk;
            let clen = self.0.chunk_len(c);
            let from = at - start;
            let n = (start + clen).min(end) - at;
            match self.0.chunk(c)? {
                Chunk::Zero => out.resize(out.len() + usize::try_from(n).unwrap_or(0), 0),
                Chunk::Data(d) => {
                    let from = usize::try_from(from).unwrap_or(0);
                    let to = from + usize::try_from(n).unwrap_or(0);
                    out.extend_from_slice(d.get(from..to).ok_or_else(|| {
                        Error::corrupt("chunk", "a chunk is shorter than its position")
                    })?);
                }
            }
            at += n;
        }
        Ok(())
    }
}

/// A snapshot's chunks cached: 16 MiB (or one chunk, if larger).
const SNAPSHOT_CACHE: u64 = 16 << 20;

impl CachedDisk<SnapshotRead> {
    pub(crate) fn open(store: Arc<crate::store::Store>, spec: &str) -> Result<SnapshotBytes> {
        let disk = Disk::open(store, spec, SNAPSHOT_CACHE)?;
        Ok(SnapshotBytes {
            name: format!(
                "snapshot {} of {}",
                disk.snapshot.id, disk.snapshot.disk.name
            ),
            size: disk.size,
            state: Mutex::new(Cached::new(SnapshotRead(disk))),
        })
    }
}

/// Bytes held in memory (tests, fuzzing).
pub(crate) struct MemBytes(pub(crate) Vec<u8>);

impl DiskBytes for MemBytes {
    fn size(&self) -> u64 {
        self.0.len() as u64
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let start = usize::try_from(offset).unwrap_or(usize::MAX);
        let src = start
            .checked_add(buf.len())
            .and_then(|end| self.0.get(start..end))
            .ok_or_else(|| Error::new(ErrorKind::InvalidImage, "read past the disk's end"))?;
        buf.copy_from_slice(src);
        Ok(())
    }

    fn describe(&self) -> String {
        "the disk".to_owned()
    }
}

/// A partition (or the whole disk) as a file system reader sees it: offsets from its start,
/// nothing past its end.
#[derive(Clone)]
pub(crate) struct Window {
    pub(crate) disk: Arc<dyn DiskBytes>,
    pub(crate) start: u64,
    pub(crate) len: u64,
    pos: u64,
    /// Reads through `io::Read` past the end give zeros (see [`Window::padded`]).
    padded: bool,
}

impl Window {
    pub(crate) fn new(disk: Arc<dyn DiskBytes>, start: u64, len: u64) -> Window {
        Window {
            disk,
            start,
            len,
            pos: 0,
            padded: false,
        }
    }

    /// The same window, whose `io::Read` gives zeros past its end instead of stopping (for a
    /// reader that must never see a short read).
    pub(crate) fn padded(&self) -> Window {
        Window {
            padded: true,
            ..self.clone()
        }
    }

    /// Fills `buf` from `offset` in the window.
    pub(crate) fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let end = offset.checked_add(buf.len() as u64);
        if end.is_none_or(|e| e > self.len) {
            return Err(Error::new(
                ErrorKind::InvalidImage,
                format!(
                    "a read of {} bytes at {offset} goes past the partition's end ({} bytes)",
                    buf.len(),
                    self.len
                ),
            ));
        }
        self.disk.read_at(self.start + offset, buf)
    }

    /// Up to `len` bytes from `offset` (fewer at the window's end).
    pub(crate) fn head(&self, offset: u64, len: usize) -> Result<Vec<u8>> {
        let n = usize::try_from(self.len.saturating_sub(offset))
            .unwrap_or(usize::MAX)
            .min(len);
        let mut buf = vec![0u8; n];
        self.read_at(offset, &mut buf)?;
        Ok(buf)
    }
}

impl ext4_view::Ext4Read for Window {
    fn read(
        &mut self,
        start_byte: u64,
        dst: &mut [u8],
    ) -> std::result::Result<(), Box<dyn std::error::Error + Send + Sync + 'static>> {
        self.read_at(start_byte, dst).map_err(Into::into)
    }
}

impl std::io::Read for Window {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = usize::try_from(self.len.saturating_sub(self.pos))
            .unwrap_or(usize::MAX)
            .min(buf.len());
        if n > 0 {
            self.read_at(self.pos, &mut buf[..n])
                .map_err(std::io::Error::other)?;
        }
        let n = if self.padded {
            buf[n..].fill(0);
            buf.len()
        } else {
            n
        };
        self.pos = self.pos.saturating_add(n as u64);
        Ok(n)
    }
}

impl std::io::Seek for Window {
    fn seek(&mut self, pos: std::io::SeekFrom) -> std::io::Result<u64> {
        let to = match pos {
            std::io::SeekFrom::Start(p) => Some(p),
            std::io::SeekFrom::End(d) => self.len.checked_add_signed(d),
            std::io::SeekFrom::Current(d) => self.pos.checked_add_signed(d),
        };
        let to = to.ok_or_else(|| std::io::Error::other("seek out of range"))?;
        self.pos = to;
        Ok(to)
    }
}
