//! VHDX log replay, in memory (MS-VHDX 2.3): the file is never written.
//!
//! A VHDX whose header has a non-zero log GUID holds metadata updates in its circular log
//! that may not have reached their place in the file. The active sequence of log entries is
//! found (valid entries with consecutive sequence numbers whose head's tail points into the
//! sequence; the highest head sequence number wins) and its writes are kept in an
//! [`Overlay`] of 4 KiB sectors through which every metadata read then goes.

use std::collections::BTreeMap;
use std::path::Path;

use super::util::{ReadAt, invalid, read_struct};
use crate::error::Result;

const SECTOR: u64 = 4096;
const MIB: u64 = 1024 * 1024;
/// Largest log region read into memory (Hyper-V and qemu write 1 MiB logs).
const MAX_LOG_BYTES: u64 = 64 * MIB;
/// Most 4 KiB sectors an overlay may hold, and most sector writes a replay may perform.
const MAX_OVERLAY_SECTORS: u64 = 1 << 20;
/// Highest file offset a log may write (well past any valid VHDX).
const MAX_FILE_OFFSET: u64 = 1 << 48;
/// Bound on the search: bytes checksummed and entries walked, per byte / sector of log.
const SEARCH_BUDGET: u64 = 16;

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn le64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// File sectors as the replayed log leaves them: `Some(bytes)` written, `None` zeroed.
#[derive(Debug, Clone, Default)]
pub(crate) struct Overlay {
    sectors: BTreeMap<u64, Option<Box<[u8]>>>,
    /// The file's size after replay (the log can extend it).
    pub(crate) size: u64,
    /// Entries replayed.
    pub(crate) entries: usize,
}

impl Overlay {
    fn put(&mut self, r: &dyn ReadAt, at: u64, data: Option<Box<[u8]>>) -> Result<()> {
        if self.sectors.len() as u64 >= MAX_OVERLAY_SECTORS && !self.sectors.contains_key(&at) {
            return Err(invalid(
                r,
                "VHDX log",
                at,
                "the log rewrites more of the file than blockferry holds in memory",
            ));
        }
        self.sectors.insert(at, data);
        Ok(())
    }

    /// Whether the replay touched any byte of `[start, end)`.
    pub(crate) fn touches(&self, start: u64, end: u64) -> bool {
        self.sectors
            .range(start - start % SECTOR..end)
            .next()
            .is_some()
    }
}

/// A [`ReadAt`] that sees the file as the replayed log leaves it.
pub(crate) struct Replayed<'a> {
    pub(crate) inner: &'a dyn ReadAt,
    pub(crate) overlay: &'a Overlay,
}

impl ReadAt for Replayed<'_> {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let end = offset + buf.len() as u64;
        if end > self.overlay.size {
            return Err(invalid(
                self.inner,
                "VHDX",
                offset,
                "read past the end of the file",
            ));
        }
        // Bytes past the real end (a log-extended file) read as zeros unless overlaid.
        let real_end = end.min(self.inner.size());
        buf.fill(0);
        if offset < real_end {
            let n = usize::try_from(real_end - offset).expect("fits in the buffer");
            self.inner.read_exact_at(&mut buf[..n], offset)?;
        }
        for (&at, data) in self.overlay.sectors.range(offset - offset % SECTOR..end) {
            let from = at.max(offset);
            let to = (at + SECTOR).min(end);
            let dst = &mut buf[usize::try_from(from - offset).expect("in buffer")
                ..usize::try_from(to - offset).expect("in buffer")];
            match data {
                Some(bytes) => dst.copy_from_slice(
                    &bytes[usize::try_from(from - at).expect("in sector")
                        ..usize::try_from(to - at).expect("in sector")],
                ),
                None => dst.fill(0),
            }
        }
        Ok(())
    }

    fn size(&self) -> u64 {
        self.overlay.size
    }

    fn path(&self) -> &Path {
        self.inner.path()
    }
}

/// One validated log entry.
struct Entry {
    /// Offset of the entry in the log.
    at: u64,
    length: u64,
    tail: u64,
    sequence: u64,
    flushed_file_offset: u64,
    last_file_offset: u64,
    /// (file offset, data) per data descriptor, `None` data for zero ranges with their length.
    writes: Vec<(u64, Write)>,
}

enum Write {
    Data(Box<[u8]>),
    Zero(u64),
}

/// Replays the log at `[log_offset, log_offset + log_length)` whose entries carry `log_guid`.
pub(crate) fn replay(
    r: &dyn ReadAt,
    log_guid: [u8; 16],
    log_offset: u64,
    log_length: u64,
) -> Result<Overlay> {
    if log_length == 0
        || !log_length.is_multiple_of(MIB)
        || !log_offset.is_multiple_of(MIB)
        || log_offset < MIB
    {
        return Err(invalid(
            r,
            "VHDX header",
            64 * 1024 + 68,
            "log offset or length not a non-zero multiple of 1 MiB",
        ));
    }
    let log = read_struct(r, "VHDX log", log_offset, log_length, MAX_LOG_BYTES)?;
    let entries = search(r, &log, &log_guid, log_offset)?;
    let head = entries.last().expect("a candidate sequence is not empty");
    if r.size() < head.flushed_file_offset {
        return Err(invalid(
            r,
            "VHDX log",
            log_offset + head.at,
            format!(
                "the file is truncated: the log says it was at least {} bytes",
                head.flushed_file_offset
            ),
        ));
    }
    let mut overlay = Overlay {
        size: r.size().max(head.last_file_offset),
        entries: entries.len(),
        ..Overlay::default()
    };
    // Work, not just distinct sectors, is bounded: zero descriptors can repeat a huge range.
    let mut work = 0u64;
    for e in &entries {
        for (file_offset, w) in &e.writes {
            let sectors = match w {
                Write::Data(_) => 1,
                Write::Zero(len) => len / SECTOR,
            };
            work = work.saturating_add(sectors);
            if work > MAX_OVERLAY_SECTORS {
                return Err(invalid(
                    r,
                    "VHDX log",
                    log_offset + e.at,
                    "the log rewrites more of the file than blockferry replays in memory",
                ));
            }
            // Offsets were bounded by `entry_at`: no overflow below.
            match w {
                Write::Data(bytes) => overlay.put(r, *file_offset, Some(bytes.clone()))?,
                Write::Zero(_) => {
                    for s in 0..sectors {
                        overlay.put(r, file_offset + s * SECTOR, None)?;
                    }
                }
            }
            overlay.size = overlay.size.max(file_offset + sectors * SECTOR);
        }
    }
    Ok(overlay)
}

/// Finds the active sequence (MS-VHDX 2.3.3): the valid run of consecutive entries whose head
/// has the highest sequence number and whose head's tail points into the run. Each position
/// is validated at most once, and the whole search is bounded by [`SEARCH_BUDGET`].
fn search(r: &dyn ReadAt, log: &[u8], guid: &[u8; 16], log_offset: u64) -> Result<Vec<Entry>> {
    let log_length = log.len() as u64;
    let sectors = log_length / SECTOR;
    let mut arena: Vec<Entry> = Vec::new();
    let mut memo: std::collections::HashMap<u64, Option<usize>> = std::collections::HashMap::new();
    let (mut bytes_budget, mut steps_budget) =
        (SEARCH_BUDGET * log_length, SEARCH_BUDGET * sectors + 16);
    let too_damaged = || {
        invalid(
            r,
            "VHDX log",
            log_offset,
            "the log is too damaged to find its entries",
        )
    };
    let mut candidate: Option<Vec<usize>> = None;
    let (mut cur_tail, mut old_tail) = (0u64, 0u64);
    loop {
        let mut seq: Vec<usize> = Vec::new();
        let mut head = cur_tail;
        while (seq.len() as u64) <= sectors {
            steps_budget = steps_budget.checked_sub(1).ok_or_else(too_damaged)?;
            let idx = if let Some(&v) = memo.get(&head) {
                v
            } else {
                let v = entry_at(log, head, guid, &mut bytes_budget).map(|e| {
                    arena.push(e);
                    arena.len() - 1
                });
                if bytes_budget == 0 {
                    return Err(too_damaged());
                }
                memo.insert(head, v);
                v
            };
            match idx {
                Some(i)
                    if seq.last().is_none_or(|&p| {
                        arena[p].sequence.checked_add(1) == Some(arena[i].sequence)
                    }) =>
                {
                    head = (head + arena[i].length) % log_length;
                    seq.push(i);
                }
                _ => break,
            }
        }
        let head_entry = seq.last().map(|&h| &arena[h]);
        let valid = head_entry.is_some_and(|h| seq.iter().any(|&e| arena[e].at == h.tail));
        if valid
            && head_entry.map(|h| h.sequence)
                > candidate
                    .as_ref()
                    .and_then(|c| c.last().map(|&h| arena[h].sequence))
        {
            let tail = head_entry.map_or(0, |h| h.tail);
            let from = seq.iter().position(|&e| arena[e].at == tail).unwrap_or(0);
            candidate = Some(seq[from..].to_vec());
        }
        cur_tail = if valid {
            head
        } else {
            (cur_tail + SECTOR) % log_length
        };
        if cur_tail < old_tail || (valid && cur_tail == old_tail) {
            break;
        }
        old_tail = cur_tail;
    }
    let Some(chosen) = candidate else {
        return Err(invalid(
            r,
            "VHDX log",
            log_offset,
            "the header says the log must be replayed, but it holds no valid sequence of entries",
        ));
    };
    // Take the chosen entries out of the arena, in order.
    let mut slots: Vec<Option<Entry>> = arena.into_iter().map(Some).collect();
    Ok(chosen.into_iter().filter_map(|i| slots[i].take()).collect())
}

/// Reads `len` bytes of the circular log from `at`, wrapping at its end.
fn wrapped(log: &[u8], at: u64, len: u64) -> Vec<u8> {
    let n = log.len();
    let at = usize::try_from(at).unwrap_or(0) % n.max(1);
    let len = usize::try_from(len).unwrap_or(0).min(n);
    let first = len.min(n - at);
    let mut out = Vec::with_capacity(len);
    out.extend_from_slice(&log[at..at + first]);
    out.extend_from_slice(&log[..len - first]);
    out
}

/// Validates the entry at `at` (MS-VHDX 2.3.1): every field, checksum, descriptors and data
/// sectors. `None` when anything is off; the search then moves on.
fn entry_at(log: &[u8], at: u64, guid: &[u8; 16], budget: &mut u64) -> Option<Entry> {
    let log_len = log.len() as u64;
    let h = wrapped(log, at, 64);
    if &h[..4] != b"loge" || &h[32..48] != guid || le32(&h, 28) != 0 {
        return None;
    }
    let length = u64::from(le32(&h, 8));
    let tail = u64::from(le32(&h, 12));
    let sequence = le64(&h, 16);
    let count = u64::from(le32(&h, 24));
    let (flushed, last) = (le64(&h, 40 + 8), le64(&h, 56));
    if length == 0
        || length % SECTOR != 0
        || length > log_len
        || tail % SECTOR != 0
        || tail >= log_len
        || sequence == 0
        || flushed % MIB != 0
        || last % MIB != 0
    {
        return None;
    }
    let desc_sectors = (count + 2).div_ceil(128);
    if desc_sectors * SECTOR > length {
        return None;
    }
    *budget = budget.saturating_sub(length);
    let bytes = wrapped(log, at, length);
    let crc = crc32c::crc32c_append(
        crc32c::crc32c_append(crc32c::crc32c(&bytes[..4]), &[0; 4]),
        &bytes[8..],
    );
    if crc != le32(&bytes, 4) {
        return None;
    }
    let mut writes = Vec::new();
    let mut data_sector = desc_sectors;
    for d in 0..count {
        let at_d = usize::try_from(64 + d * 32).ok()?;
        let desc = &bytes[at_d..at_d + 32];
        if le64(desc, 24) != sequence {
            return None;
        }
        let file_offset = le64(desc, 16);
        if !file_offset.is_multiple_of(SECTOR) || file_offset >= MAX_FILE_OFFSET {
            return None;
        }
        match &desc[..4] {
            b"zero" => {
                let len = le64(desc, 8);
                if !len.is_multiple_of(SECTOR)
                    || le32(desc, 4) != 0
                    || len > MAX_FILE_OFFSET - file_offset
                {
                    return None;
                }
                writes.push((file_offset, Write::Zero(len)));
            }
            b"desc" => {
                let s = usize::try_from(data_sector * SECTOR).ok()?;
                let sector = bytes.get(s..s + 4096)?;
                let seq = (u64::from(le32(sector, 4)) << 32) | u64::from(le32(sector, 4092));
                if &sector[..4] != b"data" || seq != sequence {
                    return None;
                }
                let mut out = vec![0u8; 4096];
                out[..8].copy_from_slice(&desc[8..16]);
                out[8..4092].copy_from_slice(&sector[8..4092]);
                out[4092..].copy_from_slice(&desc[4..8]);
                writes.push((file_offset, Write::Data(out.into_boxed_slice())));
                data_sector += 1;
            }
            _ => return None,
        }
    }
    if data_sector * SECTOR != length {
        return None;
    }
    Some(Entry {
        at,
        length,
        tail,
        sequence,
        flushed_file_offset: flushed,
        last_file_offset: last,
        writes,
    })
}
