//! Reading chunks of a virtual disk: a source's [`Mapping`]s of a chunk turned into file
//! reads ([`plan_reads`]), and the one [`ChunkReader`] interface (submit a chunk, complete
//! it) with a `pread` and an `io_uring` implementation. Replicate, convert, verify and a
//! delta's samples all read through this.

use std::collections::VecDeque;
#[cfg(target_os = "linux")]
use std::os::fd::{AsFd, BorrowedFd};

use super::buf::{BufferPool, PooledBuf};
use super::{Pread, ReadBackend, SourceFile};
use crate::error::{Error, ErrorKind, Result};
use crate::image::{BlockSource, Mapping, Target};

/// One piece of a chunk: where `len` bytes at `at` in the chunk's buffer come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Piece {
    /// Zeros (a hole, an unallocated or a zero range).
    Zero { at: usize, len: usize },
    /// Bytes of source file `file` at `offset`.
    Data {
        file: usize,
        at: usize,
        len: usize,
        offset: u64,
    },
    /// Bytes `skip..skip + len` of the compressed grain of `stored_len` bytes at `offset` of
    /// file `file`, `grain_len` bytes inflated.
    Grain {
        file: usize,
        at: usize,
        len: usize,
        offset: u64,
        stored_len: u32,
        grain_len: u32,
        skip: u32,
    },
}

/// Turns `maps` (a source's mappings of exactly `[offset, offset + len)`, in order) into the
/// pieces that fill a buffer of `len` bytes. Fails unless they tile the range exactly: buffers
/// are reused without clearing, so a gap would leave another chunk's bytes in place.
pub(crate) fn plan_reads(
    maps: &[Mapping],
    offset: u64,
    len: u64,
    out: &mut Vec<Piece>,
) -> Result<()> {
    let outside = || Error::internal("mapping outside chunk");
    out.clear();
    let mut next = offset;
    for m in maps {
        if m.virt != next {
            return Err(Error::internal("mappings leave a gap or overlap"));
        }
        next = next
            .checked_add(m.len)
            .ok_or_else(|| Error::internal("mapping past the disk"))?;
        let at = usize::try_from(m.virt - offset).map_err(|_| outside())?;
        let n = usize::try_from(m.len).map_err(|_| outside())?;
        out.push(match m.target {
            Target::Zero | Target::Unallocated => Piece::Zero { at, len: n },
            Target::Data { file, offset } => Piece::Data {
                file,
                at,
                len: n,
                offset,
            },
            Target::Deflate {
                file,
                offset,
                stored_len,
                grain_len,
                skip,
            } => Piece::Grain {
                file,
                at,
                len: n,
                offset,
                stored_len,
                grain_len,
                skip,
            },
        });
    }
    if next != offset + len {
        return Err(Error::internal("mappings do not cover the chunk"));
    }
    Ok(())
}

/// Whether a range's mappings hold any data to read.
pub(crate) fn has_data(maps: &[Mapping]) -> bool {
    maps.iter().any(|m| m.target.is_data())
}

/// Whether every byte is zero (vectorises: no early exit inside a 4 KiB block).
pub fn is_zero(buf: &[u8]) -> bool {
    buf.chunks(4096)
        .all(|block| block.iter().fold(0u8, |acc, &b| acc | b) == 0)
}

/// The last compressed grain a reader inflated, and the buffers it reuses: a grain larger
/// than a chunk (streamOptimized grains are up to 64 MiB) is inflated once for all the chunks
/// it holds, not once per chunk, and no buffer is allocated per chunk.
#[derive(Debug, Default)]
pub(crate) struct GrainCache {
    packed: Vec<u8>,
    grain: Vec<u8>,
    /// File index and offset of the grain in `grain`.
    key: Option<(usize, u64)>,
}

impl GrainCache {
    /// The inflated grain at `file_offset` of file `file` (read and inflated unless it is the
    /// one held), and the compressed bytes read to get it (0 if it was held).
    fn grain(
        &mut self,
        src: &SourceFile,
        backend: &mut dyn ReadBackend,
        file: usize,
        file_offset: u64,
        stored_len: u32,
        grain_len: u32,
    ) -> Result<(&[u8], u64)> {
        if self.key == Some((file, file_offset)) && self.grain.len() == grain_len as usize {
            return Ok((&self.grain, 0));
        }
        self.key = None;
        self.packed.resize(stored_len as usize, 0);
        backend.read_exact_at(src, &mut self.packed, file_offset)?;
        self.grain.resize(grain_len as usize, 0);
        crate::image::inflate_grain(&self.packed, &mut self.grain).map_err(|why| {
            Error::new(ErrorKind::InvalidImage, why)
                .with_path(src.path())
                .with_offset(file_offset)
        })?;
        self.key = Some((file, file_offset));
        Ok((&self.grain, u64::from(stored_len)))
    }
}

fn source_file(source: &dyn BlockSource, file: usize) -> Result<&SourceFile> {
    source
        .file(file)
        .ok_or_else(|| Error::internal("mapping names an unknown file"))
}

/// Fills `buf` from `pieces` with single reads through `backend`: data is read, everything
/// else zero-filled, so `buf` may hold anything on entry. Returns bytes read from files.
fn fill_pieces(
    source: &dyn BlockSource,
    backend: &mut dyn ReadBackend,
    grains: &mut GrainCache,
    pieces: &[Piece],
    buf: &mut [u8],
) -> Result<u64> {
    let outside = || Error::internal("mapping outside chunk");
    let mut read = 0;
    for p in pieces {
        match *p {
            Piece::Zero { at, len } => buf.get_mut(at..at + len).ok_or_else(outside)?.fill(0),
            Piece::Data {
                file,
                at,
                len,
                offset,
            } => {
                let dst = buf.get_mut(at..at + len).ok_or_else(outside)?;
                backend.read_exact_at(source_file(source, file)?, dst, offset)?;
                read += len as u64;
            }
            Piece::Grain {
                file,
                at,
                len,
                offset,
                stored_len,
                grain_len,
                skip,
            } => {
                let dst = buf.get_mut(at..at + len).ok_or_else(outside)?;
                let src = source_file(source, file)?;
                let (grain, n) = grains.grain(src, backend, file, offset, stored_len, grain_len)?;
                let skip = skip as usize;
                dst.copy_from_slice(grain.get(skip..skip + len).ok_or_else(outside)?);
                read += n;
            }
        }
    }
    Ok(read)
}

/// Reads single chunks with `pread`: the chunk reader of convert, verify, a delta's sample
/// and a resumed job's check, and of replicate when `io_uring` is not used.
#[derive(Debug, Default)]
pub(crate) struct ChunkFill {
    pieces: Vec<Piece>,
    grains: GrainCache,
}

impl ChunkFill {
    /// Reads `[offset, offset + buf.len())` of `source` into `buf` following `maps` (the
    /// source's mappings of exactly that range). Returns bytes read from files.
    pub(crate) fn fill(
        &mut self,
        source: &dyn BlockSource,
        backend: &mut dyn ReadBackend,
        maps: &[Mapping],
        offset: u64,
        buf: &mut [u8],
    ) -> Result<u64> {
        plan_reads(maps, offset, buf.len() as u64, &mut self.pieces)?;
        fill_pieces(source, backend, &mut self.grains, &self.pieces, buf)
    }

    /// Maps and reads `[offset, offset + len)` of `source` into `buf` (resized to `len`);
    /// `None` when the range holds no data (nothing read). With the bytes read from files.
    pub(crate) fn read_range<'b>(
        &mut self,
        source: &dyn BlockSource,
        backend: &mut dyn ReadBackend,
        maps: &mut Vec<Mapping>,
        offset: u64,
        len: u64,
        buf: &'b mut Vec<u8>,
    ) -> Result<(Option<&'b [u8]>, u64)> {
        maps.clear();
        source.map(offset, len, maps)?;
        crate::image::coalesce(maps);
        if !has_data(maps) {
            return Ok((None, 0));
        }
        let n = usize::try_from(len).map_err(|_| Error::internal("chunk too large"))?;
        buf.resize(n, 0);
        let read = self.fill(source, backend, maps, offset, buf)?;
        Ok((Some(buf.as_slice()), read))
    }
}

/// A chunk whose reads completed.
#[derive(Debug)]
pub(crate) struct Filled {
    /// What the caller submitted it with.
    pub(crate) token: u64,
    /// The chunk's bytes.
    pub(crate) buf: PooledBuf,
    /// Bytes read from files for it.
    pub(crate) read: u64,
}

/// Reads chunks of one source into pooled buffers, some at a time: submit a chunk while
/// [`has_room`](ChunkReader::has_room), take chunks back (in any order) with
/// [`complete`](ChunkReader::complete).
pub(crate) trait ChunkReader {
    /// Whether another chunk can be submitted now.
    fn has_room(&self) -> bool;
    /// Chunks submitted and not yet taken back.
    fn in_flight(&self) -> usize;
    /// Starts reading `[offset, offset + buf.len())` following `maps` (the source's mappings
    /// of exactly that range) into `buf`, to be handed back with `token`.
    fn submit(&mut self, token: u64, buf: PooledBuf, maps: &[Mapping], offset: u64) -> Result<()>;
    /// A chunk whose reads completed, waiting for one if `wait`; `None` when none is.
    fn complete(&mut self, wait: bool) -> Result<Option<Filled>>;
}

/// [`ChunkReader`] with single synchronous reads: a submitted chunk is read at once.
pub(crate) struct PreadChunks<'a> {
    source: &'a dyn BlockSource,
    backend: Box<dyn ReadBackend>,
    fill: ChunkFill,
    ready: Option<Filled>,
}

impl<'a> PreadChunks<'a> {
    pub(crate) fn new(source: &'a dyn BlockSource, backend: Box<dyn ReadBackend>) -> Self {
        PreadChunks {
            source,
            backend,
            fill: ChunkFill::default(),
            ready: None,
        }
    }
}

impl ChunkReader for PreadChunks<'_> {
    fn has_room(&self) -> bool {
        self.ready.is_none()
    }

    fn in_flight(&self) -> usize {
        usize::from(self.ready.is_some())
    }

    fn submit(
        &mut self,
        token: u64,
        mut buf: PooledBuf,
        maps: &[Mapping],
        offset: u64,
    ) -> Result<()> {
        let read = self
            .fill
            .fill(self.source, self.backend.as_mut(), maps, offset, &mut buf)?;
        self.ready = Some(Filled { token, buf, read });
        Ok(())
    }

    fn complete(&mut self, _wait: bool) -> Result<Option<Filled>> {
        Ok(self.ready.take())
    }
}

/// Descriptors of a source's files opened with `O_DIRECT`, opened on first use. Borrowed
/// by a [`RingChunks`], so they outlive every read the ring has in the kernel.
#[cfg(target_os = "linux")]
#[derive(Debug)]
pub(crate) struct DirectFiles(Vec<std::sync::OnceLock<Option<std::fs::File>>>);

#[cfg(target_os = "linux")]
impl DirectFiles {
    /// Slots for every file of `source`.
    pub(crate) fn new(source: &dyn BlockSource) -> DirectFiles {
        DirectFiles(
            (0..source.n_files())
                .map(|_| std::sync::OnceLock::new())
                .collect(),
        )
    }

    /// File `index` opened with `O_DIRECT`; `None` where the file system refuses it.
    fn fd(&self, index: usize, src: &SourceFile) -> Option<BorrowedFd<'_>> {
        use std::os::fd::AsRawFd;
        use std::os::unix::fs::OpenOptionsExt;
        self.0
            .get(index)?
            .get_or_init(|| {
                // Through the open descriptor, not the path: the very file the reader parsed.
                std::fs::OpenOptions::new()
                    .read(true)
                    .custom_flags(libc::O_DIRECT)
                    .open(format!("/proc/self/fd/{}", src.file().as_raw_fd()))
                    .ok()
            })
            .as_ref()
            .map(AsFd::as_fd)
    }
}

/// [`ChunkReader`] on `io_uring`: up to the ring's depth of chunks in flight. The ring reads
/// with descriptors of `source`'s files and of `direct`, both borrowed for `'a`, so they stay
/// open until the ring (which waits for the kernel when dropped) is gone.
#[cfg(target_os = "linux")]
pub(crate) struct RingChunks<'a> {
    source: &'a dyn BlockSource,
    direct: Option<&'a DirectFiles>,
    ring: super::uring::ChunkRing<'a>,
    /// Chunks of compressed grains, read and inflated at submission.
    sync: ChunkFill,
    inflated: VecDeque<Filled>,
    pieces: Vec<Piece>,
    reads: Vec<super::uring::ChunkRead<'a>>,
}

#[cfg(target_os = "linux")]
impl<'a> RingChunks<'a> {
    /// Reads `source` through `ring`, into buffers of `pool` (registered with the kernel
    /// where it allows), with `O_DIRECT` descriptors from `direct` where aligned.
    pub(crate) fn new(
        ring: super::uring::ChunkRing<'a>,
        source: &'a dyn BlockSource,
        direct: Option<&'a DirectFiles>,
        pool: &BufferPool,
    ) -> Self {
        let mut ring = ring;
        match ring.register_pool(pool) {
            Ok(n) => tracing::debug!(buffers = n, "read buffers registered with io_uring"),
            Err(e) => tracing::debug!(error = %e, "read buffers not registered with io_uring"),
        }
        RingChunks {
            source,
            direct,
            ring,
            sync: ChunkFill::default(),
            inflated: VecDeque::new(),
            pieces: Vec::new(),
            reads: Vec::new(),
        }
    }
}

#[cfg(target_os = "linux")]
fn ring_error(e: std::io::Error) -> Error {
    Error::new(ErrorKind::Io, "io_uring failed").with_source(e)
}

#[cfg(target_os = "linux")]
impl<'a> ChunkReader for RingChunks<'a> {
    fn has_room(&self) -> bool {
        self.ring.has_room()
    }

    fn in_flight(&self) -> usize {
        self.ring.in_flight() + self.inflated.len()
    }

    fn submit(
        &mut self,
        token: u64,
        mut buf: PooledBuf,
        maps: &[Mapping],
        offset: u64,
    ) -> Result<()> {
        use super::sys::DIRECT_ALIGN;
        use super::uring::ChunkRead;
        let len = buf.len();
        plan_reads(maps, offset, len as u64, &mut self.pieces)?;
        if self.pieces.iter().any(|p| matches!(p, Piece::Grain { .. })) {
            // Compressed grains (streamOptimized): read and inflated here.
            let read = fill_pieces(
                self.source,
                &mut Pread,
                &mut self.sync.grains,
                &self.pieces,
                &mut buf,
            )?;
            self.inflated.push_back(Filled { token, buf, read });
            return Ok(());
        }
        self.reads.clear();
        let source: &'a dyn BlockSource = self.source;
        for p in &self.pieces {
            match *p {
                Piece::Zero { at, len: n } => buf
                    .get_mut(at..at + n)
                    .ok_or_else(|| Error::internal("mapping outside chunk"))?
                    .fill(0),
                Piece::Data {
                    file,
                    at,
                    len: n,
                    offset,
                } => {
                    if at.checked_add(n).is_none_or(|end| end > len) {
                        return Err(Error::internal("mapping outside chunk"));
                    }
                    let src = source_file(source, file)?;
                    let buffered = src.file().as_fd();
                    let aligned = at % DIRECT_ALIGN == 0
                        && n % DIRECT_ALIGN == 0
                        && offset % DIRECT_ALIGN as u64 == 0;
                    let fd = self
                        .direct
                        .filter(|_| aligned)
                        .and_then(|d| d.fd(file, src))
                        .unwrap_or(buffered);
                    self.reads.push(ChunkRead {
                        fd,
                        fallback_fd: buffered,
                        file,
                        at,
                        len: n,
                        offset,
                    });
                }
                Piece::Grain { .. } => return Err(Error::internal("a grain among ring reads")),
            }
        }
        self.ring.queue(token, buf, &self.reads).map_err(ring_error)
    }

    fn complete(&mut self, wait: bool) -> Result<Option<Filled>> {
        if let Some(done) = self.inflated.pop_front() {
            return Ok(Some(done));
        }
        let Some(done) = self.ring.complete(wait).map_err(ring_error)? else {
            return Ok(None);
        };
        match done.result {
            Ok(read) => Ok(Some(Filled {
                token: done.token,
                buf: done.buf,
                read,
            })),
            Err(f) => {
                let path = self
                    .source
                    .file(f.file)
                    .map_or_else(std::path::PathBuf::new, |s| s.path().to_path_buf());
                let msg = if f.error.kind() == std::io::ErrorKind::UnexpectedEof {
                    "the image ended before its expected size (was it truncated while reading?)"
                } else {
                    "reading the image"
                };
                Err(Error::io(msg, &path, f.error).with_offset(f.offset))
            }
        }
    }
}

#[cfg(test)]
mod tests;
