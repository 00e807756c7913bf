//! Byte layouts of store format v1. docs/FORMAT.md is the specification; this module is the
//! only code that knows the layouts, and each has a golden vector in `format/tests.rs`.
//!
//! Every decoder treats its input as untrusted: lengths and counts are checked against the
//! object's size and documented caps before anything is allocated.

use super::crypto::{NONCE_BYTES, Sealer, TAG_BYTES};
use crate::error::{Error, ErrorKind, Result};
use crate::io::buf::PooledBuf;
use crate::io::sys::AlignedBuf;

/// The store format version this code writes and reads.
pub const FORMAT_VERSION: u16 = 1;

/// A chunk or page id: keyed blake3 of the plaintext.
pub type Id = [u8; 32];
/// The id recorded for an all-zero (or unallocated) chunk; it is never stored.
pub const ZERO_ID: Id = [0u8; 32];
/// A pack's random identity.
pub type PackId = [u8; 16];

/// Blob header: flags (1), reserved (3), raw length (u32 LE).
pub const BLOB_HEADER: usize = 8;
/// Bytes a blob adds to its payload.
pub const BLOB_OVERHEAD: usize = BLOB_HEADER + NONCE_BYTES + TAG_BYTES;
const FLAG_LZ4: u8 = 1;

/// Pack header: magic (6), version (2), pack id (16).
pub const PACK_HEADER: usize = 24;
const PACK_MAGIC: &[u8; 6] = b"BFPACK";
const PACK_END_MAGIC: &[u8; 6] = b"BFPEND";
/// Pack footer: trailer length (u32 LE), end magic (6), version (2).
pub const PACK_FOOTER: usize = 12;
/// One trailer or index entry: id (32), offset (u64), stored length (u32), raw length (u32).
pub const ENTRY_BYTES: usize = 48;
/// Most chunk records one pack holds (each pack key seals at most this many records).
pub const MAX_PACK_CHUNKS: usize = 16 << 10;
/// Largest pack a replication or a repack writes (before its trailer).
pub const MAX_PACK_BYTES: usize = 32 << 20;
/// Longest valid trailer record: every entry of a full pack, sealed.
pub const MAX_TRAILER_RECORD: usize = MAX_PACK_CHUNKS * ENTRY_BYTES + BLOB_OVERHEAD;

/// Kinds of metadata objects, each with its own magic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetaKind {
    /// `index/…`: chunk id → pack location.
    Index,
    /// `pages/…`: one page of a snapshot's chunk map.
    Page,
    /// `snapshots/…`: a snapshot manifest, the commit point.
    Snapshot,
}

impl MetaKind {
    fn magic(self) -> &'static [u8; 6] {
        match self {
            MetaKind::Index => b"BFINDX",
            MetaKind::Page => b"BFPAGE",
            MetaKind::Snapshot => b"BFSNAP",
        }
    }

    /// Largest plaintext accepted for this kind (a cap against hostile length fields).
    fn max_raw(self) -> usize {
        match self {
            MetaKind::Index => 256 << 20,
            MetaKind::Page => 4 + PAGE_ENTRIES * 32,
            MetaKind::Snapshot => 64 << 20,
        }
    }
}

/// Metadata envelope header: magic (6), version (2), flags (1), reserved (3), raw length (4).
pub const META_HEADER: usize = 16;

/// Chunk positions per manifest page.
pub const PAGE_ENTRIES: usize = 4096;

/// Where a chunk lives: which pack, where in it, how long, and its plaintext length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    /// The chunk id.
    pub id: Id,
    /// Offset of the blob in its pack.
    pub offset: u64,
    /// Length of the blob (header, nonce, payload, tag).
    pub stored_len: u32,
    /// Length of the chunk's plaintext.
    pub raw_len: u32,
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4-byte slice"))
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8-byte slice"))
}

fn len_u32(len: usize, what: &str) -> Result<u32> {
    u32::try_from(len).map_err(|_| Error::internal(format!("{what} of {len} bytes exceeds u32")))
}

/// Checks magic and version of a header; a newer version is [`ErrorKind::UnsupportedVersion`].
fn check_magic(bytes: &[u8], magic: [u8; 6], object: &str) -> Result<()> {
    if bytes.len() < 8 || bytes[..6] != magic {
        return Err(Error::corrupt(
            object,
            format!(
                "not a blockferry {} object (bad magic)",
                String::from_utf8_lossy(&magic)
            ),
        )
        .with_offset(0));
    }
    let version = u16::from_le_bytes([bytes[6], bytes[7]]);
    if version > FORMAT_VERSION {
        return Err(Error::new(
            ErrorKind::UnsupportedVersion,
            format!(
                "written in store format version {version}, newer than this blockferry reads \
                 ({FORMAT_VERSION}); upgrade blockferry to read it"
            ),
        )
        .with_object(object));
    }
    if version == 0 {
        return Err(Error::corrupt(object, "format version 0 is not valid").with_offset(6));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Blobs (chunk records inside packs)

/// A growable byte buffer records are encoded into: a `Vec<u8>`, or the aligned buffer a
/// replication builds its packs in ([`AlignedBuf`], written with `O_DIRECT`). Growing it
/// hands out bytes that are already initialised, so that encoding into a reused buffer costs
/// no zero-filling.
pub trait RecordBuf {
    /// Bytes in the buffer.
    fn len(&self) -> usize;
    /// Whether the buffer holds no bytes.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Lengthens the buffer by `n` bytes (of unspecified values) and returns all of it.
    fn grow(&mut self, n: usize) -> &mut [u8];
    /// Shortens the buffer to `len` bytes (no-op if it is not longer).
    fn truncate(&mut self, len: usize);
    /// Appends `bytes`.
    fn extend_from_slice(&mut self, bytes: &[u8]) {
        let at = self.len();
        self.grow(bytes.len())[at..].copy_from_slice(bytes);
    }
}

impl RecordBuf for Vec<u8> {
    fn len(&self) -> usize {
        self.len()
    }
    fn grow(&mut self, n: usize) -> &mut [u8] {
        self.resize(self.len() + n, 0);
        &mut self[..]
    }
    fn truncate(&mut self, len: usize) {
        self.truncate(len);
    }
    fn extend_from_slice(&mut self, bytes: &[u8]) {
        self.extend_from_slice(bytes);
    }
}

impl RecordBuf for AlignedBuf {
    fn len(&self) -> usize {
        <[u8]>::len(self)
    }
    fn grow(&mut self, n: usize) -> &mut [u8] {
        let len = <[u8]>::len(self);
        let need = len.checked_add(n).expect("a buffer size below isize::MAX");
        if need > self.capacity() {
            // Sized by the caller's plan, so this is rare: move to a larger allocation.
            let mut bigger = AlignedBuf::new(need.max(self.capacity() * 2));
            bigger.set_len(len);
            bigger.copy_from_slice(self);
            *self = bigger;
        }
        self.set_len(need);
        &mut self[..]
    }
    fn truncate(&mut self, len: usize) {
        if len < <[u8]>::len(self) {
            self.set_len(len);
        }
    }
}

/// A pooled buffer never moves to a larger allocation (a pool's buffers stay where they are:
/// the read pool's are registered with `io_uring`). The pack buffers' pool is sized for a full
/// pack with its trailer (see `pipeline::plan_parts`), so growing past capacity is a bug.
impl RecordBuf for PooledBuf {
    fn len(&self) -> usize {
        <[u8]>::len(self)
    }
    fn grow(&mut self, n: usize) -> &mut [u8] {
        let need = <[u8]>::len(self).saturating_add(n);
        assert!(
            need <= self.capacity(),
            "a pooled buffer is sized for what goes into it"
        );
        self.set_len(need);
        &mut self[..]
    }
    fn truncate(&mut self, len: usize) {
        if len < <[u8]>::len(self) {
            self.set_len(len);
        }
    }
}

/// Encodes one chunk as a blob, appending it to `out`; returns whether its payload is
/// compressed (false: the chunk's bytes were copied as they are).
///
/// The chunk is lz4-compressed when that shrinks it (and `compress` is set), kept raw otherwise,
/// then sealed in place with the chunk id and the blob header as associated data.
pub fn encode_blob<B: RecordBuf + ?Sized>(
    sealer: &Sealer,
    id: &Id,
    data: &[u8],
    compress: bool,
    out: &mut B,
) -> Result<bool> {
    let start = out.len();
    let raw_len = len_u32(data.len(), "chunk")?;
    let payload_at = start + BLOB_HEADER + NONCE_BYTES;
    let room = if compress {
        lz4_flex::block::get_maximum_output_size(data.len()).max(data.len())
    } else {
        data.len()
    };
    let rec = out.grow(BLOB_HEADER + NONCE_BYTES + room);
    let compressed = if compress {
        match lz4_flex::block::compress_into(data, &mut rec[payload_at..]) {
            Ok(n) if n < data.len() => Some(n),
            _ => None,
        }
    } else {
        None
    };
    let payload_len = compressed.unwrap_or_else(|| {
        rec[payload_at..payload_at + data.len()].copy_from_slice(data);
        data.len()
    });
    rec[start..payload_at].fill(0);
    rec[start] = if compressed.is_some() { FLAG_LZ4 } else { 0 };
    rec[start + 4..start + 8].copy_from_slice(&raw_len.to_le_bytes());
    let aad = blob_aad(id, &rec[start..start + BLOB_HEADER]);
    out.truncate(payload_at + payload_len);
    // The record is the tail of `out`: seal its payload in place, no copy.
    sealer.seal(&aad, out, start + BLOB_HEADER)?;
    Ok(compressed.is_some())
}

/// Upper bound of the bytes [`encode_blob`] appends for a chunk of `len` bytes.
pub fn blob_bound(len: usize) -> usize {
    BLOB_OVERHEAD + lz4_flex::block::get_maximum_output_size(len).max(len)
}

fn blob_aad(id: &Id, header: &[u8]) -> [u8; 32 + BLOB_HEADER] {
    let mut aad = [0u8; 32 + BLOB_HEADER];
    aad[..32].copy_from_slice(id);
    aad[32..].copy_from_slice(header);
    aad
}

/// The checked header of a chunk record: long enough, known flags, a plaintext length of at
/// most `max_raw` (a hostile header cannot make a reader allocate more).
fn blob_header(
    record: &[u8],
    max_raw: usize,
    object: &str,
    offset: u64,
) -> Result<[u8; BLOB_HEADER]> {
    let corrupt = |msg: &str| Error::corrupt(object, msg.to_owned()).with_offset(offset);
    if record.len() < BLOB_OVERHEAD {
        return Err(corrupt("chunk record shorter than its header"));
    }
    let mut header = [0u8; BLOB_HEADER];
    header.copy_from_slice(&record[..BLOB_HEADER]);
    if header[0] & !FLAG_LZ4 != 0 || header[1..4] != [0, 0, 0] {
        return Err(corrupt("chunk record has unknown flags"));
    }
    if u32_at(&header, 4) as usize > max_raw {
        return Err(corrupt("chunk record claims more bytes than a chunk holds"));
    }
    Ok(header)
}

/// A buffer a chunk's plaintext is decoded into: a `Vec`, or an [`AlignedBuf`] that a
/// direct (`O_DIRECT`) write can take as it is.
pub trait PlainBuf: AsRef<[u8]> {
    /// Makes the buffer `len` bytes long (what it holds before is unspecified) and returns
    /// those bytes.
    fn reset(&mut self, len: usize) -> &mut [u8];
}

impl PlainBuf for Vec<u8> {
    fn reset(&mut self, len: usize) -> &mut [u8] {
        // Only bytes beyond the old length are zero-filled: they are all overwritten.
        self.resize(len, 0);
        self
    }
}

impl PlainBuf for AlignedBuf {
    fn reset(&mut self, len: usize) -> &mut [u8] {
        if self.capacity() < len {
            *self = AlignedBuf::new(len);
        }
        self.set_len(len);
        self
    }
}

/// Opens a blob in place and writes the chunk's plaintext to `out` (its length set to the
/// plaintext's).
///
/// `max_raw` caps the plaintext length (the store's chunk size): a hostile header cannot make
/// us allocate more. The caller checks the plaintext against `id`.
pub fn decode_blob(
    sealer: &Sealer,
    id: &Id,
    record: &mut [u8],
    max_raw: usize,
    object: &str,
    offset: u64,
    out: &mut (impl PlainBuf + ?Sized),
) -> Result<()> {
    let corrupt = |msg: &str| Error::corrupt(object, msg.to_owned()).with_offset(offset);
    let header = blob_header(record, max_raw, object, offset)?;
    let flags = header[0];
    let raw_len = u32_at(&header, 4) as usize;
    let aad = blob_aad(id, &header);
    let payload = sealer
        .open(&aad, record, BLOB_HEADER)
        .map_err(|_| corrupt("chunk record failed authentication (damaged, or not this chunk)"))?;
    if flags & FLAG_LZ4 == 0 {
        if payload.len() != raw_len {
            return Err(corrupt("raw chunk record length disagrees with its header"));
        }
        out.reset(raw_len).copy_from_slice(payload);
    } else {
        match lz4_flex::block::decompress_into(payload, out.reset(raw_len)) {
            Ok(n) if n == raw_len => {}
            _ => {
                return Err(corrupt(
                    "compressed chunk does not decompress to its length",
                ));
            }
        }
    }
    Ok(())
}

/// Moves a sealed chunk record from one pack to another (a garbage collection's repack):
/// opens it with the old pack's sealer, checks its header, and appends it to `out` sealed with
/// the new pack's sealer and a fresh nonce. The payload (compressed or not) is not decoded.
#[allow(clippy::too_many_arguments)]
pub fn reseal_blob(
    from: &Sealer,
    to: &Sealer,
    id: &Id,
    record: &mut [u8],
    max_raw: usize,
    object: &str,
    offset: u64,
    out: &mut impl RecordBuf,
) -> Result<()> {
    let corrupt = |msg: &str| Error::corrupt(object, msg.to_owned()).with_offset(offset);
    let header = blob_header(record, max_raw, object, offset)?;
    let aad = blob_aad(id, &header);
    let payload = from
        .open(&aad, record, BLOB_HEADER)
        .map_err(|_| corrupt("chunk record failed authentication (damaged, or not this chunk)"))?;
    let start = out.len();
    out.extend_from_slice(&header);
    out.extend_from_slice(&[0u8; NONCE_BYTES]);
    out.extend_from_slice(payload);
    to.seal(&aad, out, start + BLOB_HEADER)
}

// ---------------------------------------------------------------------------------------------
// Packs

/// The header that opens every pack.
pub fn pack_header(pack_id: &PackId) -> [u8; PACK_HEADER] {
    let mut h = [0u8; PACK_HEADER];
    h[..6].copy_from_slice(PACK_MAGIC);
    h[6..8].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    h[8..].copy_from_slice(pack_id);
    h
}

/// Appends entries in their 48-byte encoding (as in trailers and index objects).
pub fn encode_entries(entries: &[Entry], out: &mut Vec<u8>) {
    for e in entries {
        out.extend_from_slice(&e.id);
        out.extend_from_slice(&e.offset.to_le_bytes());
        out.extend_from_slice(&e.stored_len.to_le_bytes());
        out.extend_from_slice(&e.raw_len.to_le_bytes());
    }
}

fn decode_entry(b: &[u8]) -> Entry {
    Entry {
        id: b[..32].try_into().expect("32-byte id"),
        offset: u64_at(b, 32),
        stored_len: u32_at(b, 40),
        raw_len: u32_at(b, 44),
    }
}

/// Decodes entries in their 48-byte encoding; `None` if the length is not a multiple of 48.
pub fn decode_entries(bytes: &[u8]) -> Option<Vec<Entry>> {
    if !bytes.len().is_multiple_of(ENTRY_BYTES) {
        return None;
    }
    Some(bytes.chunks_exact(ENTRY_BYTES).map(decode_entry).collect())
}

/// Appends the sealed trailer (a copy of the pack's entries) and the footer to a pack.
pub fn finish_pack<B>(sealer: &Sealer, pack: &mut B, entries: &[Entry]) -> Result<()>
where
    B: RecordBuf + AsRef<[u8]>,
{
    let header: [u8; PACK_HEADER] = pack.as_ref()[..PACK_HEADER]
        .try_into()
        .expect("a pack starts with its header");
    append_trailer(sealer, &header, entries, pack)
}

/// Appends the trailer and footer of the pack whose header is `header` to `out`, which may
/// hold only the pack's last bytes (the last part of a multipart upload).
pub fn append_trailer(
    sealer: &Sealer,
    header: &[u8; PACK_HEADER],
    entries: &[Entry],
    pack: &mut impl RecordBuf,
) -> Result<()> {
    let header = *header;
    let mut record = vec![0u8; NONCE_BYTES];
    encode_entries(entries, &mut record);
    sealer.seal(&trailer_aad(&header), &mut record, 0)?;
    let record_len = len_u32(record.len(), "pack trailer")?;
    pack.extend_from_slice(&record);
    pack.extend_from_slice(&record_len.to_le_bytes());
    pack.extend_from_slice(PACK_END_MAGIC);
    pack.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    Ok(())
}

fn trailer_aad(header: &[u8; PACK_HEADER]) -> [u8; PACK_HEADER + 7] {
    let mut aad = [0u8; PACK_HEADER + 7];
    aad[..PACK_HEADER].copy_from_slice(header);
    aad[PACK_HEADER..].copy_from_slice(b"trailer");
    aad
}

/// Reads a whole pack's trailer: checks header, footer and trailer authentication, and that
/// every entry lies inside the pack's blob area. Used by tests and fuzzing; stores read only
/// a pack's ends (see [`decode_pack_tail`]).
pub fn decode_pack_trailer(sealer: &Sealer, pack: &[u8], object: &str) -> Result<Vec<Entry>> {
    check_magic(pack, *PACK_MAGIC, object)?;
    let header: [u8; PACK_HEADER] = pack
        .get(..PACK_HEADER)
        .and_then(|h| h.try_into().ok())
        .ok_or_else(|| Error::corrupt(object, "pack truncated inside its header"))?;
    decode_pack_tail(sealer, &header, pack, 0, pack.len() as u64, object)
}

/// Reads a pack's trailer from its `header` and `tail`, the pack's last bytes starting at
/// pack offset `tail_at` (they must hold the footer and the whole trailer record); `size` is
/// the pack's length. Checks the end marker, the trailer's authentication (bound to the
/// header), and that every entry lies inside the pack's blob area.
pub fn decode_pack_tail(
    sealer: &Sealer,
    header: &[u8; PACK_HEADER],
    tail: &[u8],
    tail_at: u64,
    size: u64,
    object: &str,
) -> Result<Vec<Entry>> {
    if size < (PACK_HEADER + PACK_FOOTER) as u64 || tail.len() < PACK_FOOTER {
        return Err(Error::corrupt(
            object,
            "pack truncated: shorter than header and footer",
        ));
    }
    if tail_at.checked_add(tail.len() as u64) != Some(size) {
        return Err(Error::internal("pack tail does not end the pack").with_object(object));
    }
    let footer_at = tail.len() - PACK_FOOTER;
    let footer = &tail[footer_at..];
    let footer_pos = tail_at + footer_at as u64;
    if &footer[4..10] != PACK_END_MAGIC {
        return Err(
            Error::corrupt(object, "pack truncated or damaged: end marker missing")
                .with_offset(footer_pos),
        );
    }
    let record_len = u64::from(u32_at(footer, 0));
    let trailer_pos = footer_pos
        .checked_sub(record_len)
        .filter(|&at| at >= PACK_HEADER as u64)
        .ok_or_else(|| {
            Error::corrupt(object, "pack trailer length points outside the pack")
                .with_offset(footer_pos)
        })?;
    let in_tail = trailer_pos
        .checked_sub(tail_at)
        .and_then(|d| usize::try_from(d).ok())
        .ok_or_else(|| {
            Error::corrupt(object, "pack trailer starts before the bytes read of it")
                .with_offset(trailer_pos)
        })?;
    let mut record = tail[in_tail..footer_at].to_vec();
    let plain = sealer
        .open(&trailer_aad(header), &mut record, 0)
        .map_err(|_| {
            Error::corrupt(object, "pack trailer failed authentication").with_offset(trailer_pos)
        })?;
    if !plain.len().is_multiple_of(ENTRY_BYTES) {
        return Err(Error::corrupt(object, "pack trailer has a partial entry"));
    }
    let entries: Vec<Entry> = plain.chunks_exact(ENTRY_BYTES).map(decode_entry).collect();
    for e in &entries {
        let end = e.offset.checked_add(u64::from(e.stored_len));
        if e.offset < PACK_HEADER as u64 || end.is_none_or(|end| end > trailer_pos) {
            return Err(
                Error::corrupt(object, "pack trailer entry points outside the pack")
                    .with_offset(e.offset),
            );
        }
    }
    Ok(entries)
}

/// The pack id recorded in a pack's header.
pub fn pack_id_of(pack: &[u8], object: &str) -> Result<PackId> {
    check_magic(pack, *PACK_MAGIC, object)?;
    pack.get(8..PACK_HEADER)
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| Error::corrupt(object, "pack truncated inside its header"))
}

// ---------------------------------------------------------------------------------------------
// Metadata envelopes (index, pages, snapshots)

/// Seals a metadata object. The object's key is bound as associated data, so an object cannot
/// be passed off under another name.
pub fn seal_meta(sealer: &Sealer, kind: MetaKind, key: &str, payload: &[u8]) -> Result<Vec<u8>> {
    let raw_len = len_u32(payload.len(), "metadata object")?;
    let mut out = Vec::with_capacity(META_HEADER + NONCE_BYTES + payload.len() / 2 + TAG_BYTES);
    out.extend_from_slice(kind.magic());
    out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    out.extend_from_slice(&[0u8; 4]);
    out.extend_from_slice(&raw_len.to_le_bytes());
    out.extend_from_slice(&[0u8; NONCE_BYTES]);
    let compressed = lz4_flex::block::compress(payload);
    if compressed.len() < payload.len() {
        out[8] = FLAG_LZ4;
        out.extend_from_slice(&compressed);
    } else {
        out.extend_from_slice(payload);
    }
    let aad = meta_aad(&out[..META_HEADER], key);
    sealer.seal(&aad, &mut out, META_HEADER)?;
    Ok(out)
}

fn meta_aad(header: &[u8], key: &str) -> Vec<u8> {
    let mut aad = Vec::with_capacity(META_HEADER + key.len());
    aad.extend_from_slice(header);
    aad.extend_from_slice(key.as_bytes());
    aad
}

/// Opens a metadata object: magic, version, authentication, decompression, length caps.
pub fn open_meta(
    sealer: &Sealer,
    kind: MetaKind,
    key: &str,
    mut bytes: Vec<u8>,
) -> Result<Vec<u8>> {
    check_magic(&bytes, *kind.magic(), key)?;
    if bytes.len() < META_HEADER + NONCE_BYTES + TAG_BYTES {
        return Err(Error::corrupt(
            key,
            "object truncated: shorter than its header",
        ));
    }
    let flags = bytes[8];
    let raw_len = u32_at(&bytes, 12) as usize;
    if flags & !FLAG_LZ4 != 0 || bytes[9..12] != [0, 0, 0] {
        return Err(Error::corrupt(key, "object has unknown flags").with_offset(8));
    }
    if raw_len > kind.max_raw() {
        return Err(Error::corrupt(key, "object claims more bytes than allowed").with_offset(12));
    }
    let aad = meta_aad(&bytes[..META_HEADER], key);
    let payload = sealer.open(&aad, &mut bytes, META_HEADER).map_err(|_| {
        Error::corrupt(
            key,
            "object failed authentication (damaged, truncated, or not from this store)",
        )
    })?;
    if flags & FLAG_LZ4 == 0 {
        if payload.len() != raw_len {
            return Err(Error::corrupt(
                key,
                "object length disagrees with its header",
            ));
        }
        return Ok(payload.to_vec());
    }
    let mut out = vec![0u8; raw_len];
    match lz4_flex::block::decompress_into(payload, &mut out) {
        Ok(n) if n == raw_len => Ok(out),
        _ => Err(Error::corrupt(
            key,
            "object does not decompress to its length",
        )),
    }
}

/// Index payload: `n_packs u32`, then per pack `pack id (16) | n_entries u32 | entries`.
pub fn encode_index(packs: &[(PackId, Vec<Entry>)]) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    out.extend_from_slice(&len_u32(packs.len(), "index pack count")?.to_le_bytes());
    for (pack_id, entries) in packs {
        out.extend_from_slice(pack_id);
        out.extend_from_slice(&len_u32(entries.len(), "index entry count")?.to_le_bytes());
        encode_entries(entries, &mut out);
    }
    Ok(out)
}

/// Decodes an index payload; counts are checked against the bytes present before allocating.
pub fn decode_index(payload: &[u8], object: &str) -> Result<Vec<(PackId, Vec<Entry>)>> {
    let corrupt =
        |at: usize, msg: &str| Error::corrupt(object, msg.to_owned()).with_offset(at as u64);
    if payload.len() < 4 {
        return Err(corrupt(0, "index truncated"));
    }
    let n_packs = u32_at(payload, 0) as usize;
    let mut at = 4;
    if n_packs > (payload.len() - at) / 20 {
        return Err(corrupt(0, "index pack count exceeds its size"));
    }
    let mut packs = Vec::with_capacity(n_packs);
    for _ in 0..n_packs {
        if payload.len() - at < 20 {
            return Err(corrupt(at, "index truncated inside a pack record"));
        }
        let pack_id: PackId = payload[at..at + 16].try_into().expect("16-byte id");
        let n = u32_at(payload, at + 16) as usize;
        at += 20;
        let bytes = n
            .checked_mul(ENTRY_BYTES)
            .filter(|&b| b <= payload.len() - at)
            .ok_or_else(|| corrupt(at - 4, "index entry count exceeds its size"))?;
        let entries = payload[at..at + bytes]
            .chunks_exact(ENTRY_BYTES)
            .map(decode_entry)
            .collect();
        at += bytes;
        packs.push((pack_id, entries));
    }
    if at != payload.len() {
        return Err(corrupt(at, "index has trailing bytes"));
    }
    Ok(packs)
}

/// Page payload: `n u32 | n × id`, `n ≤ PAGE_ENTRIES`.
pub fn encode_page(ids: &[Id]) -> Result<Vec<u8>> {
    if ids.len() > PAGE_ENTRIES {
        return Err(Error::internal("manifest page overfull"));
    }
    let mut out = Vec::with_capacity(4 + ids.len() * 32);
    out.extend_from_slice(&len_u32(ids.len(), "page")?.to_le_bytes());
    for id in ids {
        out.extend_from_slice(id);
    }
    Ok(out)
}

/// Decodes a page payload.
pub fn decode_page(payload: &[u8], object: &str) -> Result<Vec<Id>> {
    if payload.len() < 4 {
        return Err(Error::corrupt(object, "page truncated"));
    }
    let n = u32_at(payload, 0) as usize;
    if n > PAGE_ENTRIES || payload.len() != 4 + n * 32 {
        return Err(Error::corrupt(
            object,
            "page entry count disagrees with its size",
        ));
    }
    Ok(payload[4..]
        .chunks_exact(32)
        .map(|c| c.try_into().expect("32-byte id"))
        .collect())
}

/// Lowercase hex of bytes.
pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        write!(s, "{b:02x}").expect("writing to a String cannot fail");
    }
    s
}

/// Parses lowercase or uppercase hex into exactly `N` bytes.
pub fn unhex<const N: usize>(s: &str) -> Option<[u8; N]> {
    if s.len() != N * 2 || !s.is_ascii() {
        return None;
    }
    let mut out = [0u8; N];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(&s[i * 2..i * 2 + 2], 16).ok()?;
    }
    Some(out)
}

/// Parses hex of any length (even) into bytes.
pub fn unhex_vec(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) || !s.is_ascii() {
        return None;
    }
    (0..s.len() / 2)
        .map(|i| u8::from_str_radix(&s[i * 2..i * 2 + 2], 16).ok())
        .collect()
}

#[cfg(test)]
mod tests;
