//! Just enough of a Windows registry hive (`regf`) to read the SOFTWARE hive's
//! `Microsoft\Windows NT\CurrentVersion`: key nodes (`nk`), subkey lists (`lf`, `lh`, `li`,
//! `ri`), value lists and values (`vk`) with their data in place or in a cell. Cells are read
//! one at a time through `Read + Seek`, so a hive of any size costs a few KiB; every offset
//! is checked against the hive's bins and every count capped. The layout follows the public
//! description of the format (Maxim Suhanov's "Windows registry file format specification").

use std::io::{Read, Seek, SeekFrom};

/// Where the hive bins start.
const BINS: u64 = 4096;
/// Largest cell read (names and the short values read here are far smaller).
const MAX_CELL: u32 = 64 << 10;
/// Most subkeys or values looked through in one key.
const MAX_ENTRIES: u32 = 1 << 16;

/// What `CurrentVersion` says.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct WindowsVersion {
    /// `ProductName` (`Windows Server 2022 Datacenter`).
    pub(crate) product_name: Option<String>,
    /// `major.minor.build` (`10.0.20348`), from the numbers or `CurrentVersion`.
    pub(crate) version: Option<String>,
}

struct Hive<R> {
    r: R,
    /// End of the bins (from the base block's size).
    end: u64,
}

fn le16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn le32(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

impl<R: Read + Seek> Hive<R> {
    /// The data of the cell at `offset` (relative to the bins), without its size field.
    fn cell(&mut self, offset: u32) -> Result<Vec<u8>, String> {
        let at = BINS + u64::from(offset);
        if offset == u32::MAX || at + 4 > self.end {
            return Err(format!("a cell offset {offset:#x} outside the hive"));
        }
        self.r
            .seek(SeekFrom::Start(at))
            .map_err(|e| e.to_string())?;
        let mut size = [0u8; 4];
        self.r.read_exact(&mut size).map_err(|e| e.to_string())?;
        let size = i32::from_le_bytes(size).unsigned_abs();
        if !(8..=MAX_CELL).contains(&size) || at + u64::from(size) > self.end {
            return Err(format!(
                "the cell at {offset:#x} has a size of {size} bytes"
            ));
        }
        let mut data = vec![0u8; usize::try_from(size - 4).unwrap_or(0)];
        self.r.read_exact(&mut data).map_err(|e| e.to_string())?;
        Ok(data)
    }

    /// The key node at `offset`.
    fn key(&mut self, offset: u32) -> Result<Vec<u8>, String> {
        let k = self.cell(offset)?;
        if k.get(..2) != Some(b"nk") || k.len() < 76 {
            return Err(format!("the cell at {offset:#x} is not a key node"));
        }
        Ok(k)
    }

    /// The subkey of key `k` named `name` (compared without case), if any.
    fn subkey(&mut self, k: &[u8], name: &str) -> Result<Option<Vec<u8>>, String> {
        let count = le32(k, 20).unwrap_or(0).min(MAX_ENTRIES);
        if count == 0 {
            return Ok(None);
        }
        let mut offsets = Vec::new();
        self.list(le32(k, 28).unwrap_or(u32::MAX), &mut offsets, 0)?;
        for o in offsets {
            let sub = self.key(o)?;
            if key_name(&sub).eq_ignore_ascii_case(name) {
                return Ok(Some(sub));
            }
        }
        Ok(None)
    }

    /// The key offsets of a subkey list (`ri` lists of lists followed one level deep).
    fn list(&mut self, offset: u32, out: &mut Vec<u32>, depth: u32) -> Result<(), String> {
        let l = self.cell(offset)?;
        let count = u32::from(le16(&l, 2).unwrap_or(0)).min(MAX_ENTRIES);
        let (step, nested) = match l.get(..2) {
            Some(b"lf" | b"lh") => (8, false),
            Some(b"li") => (4, false),
            Some(b"ri") if depth == 0 => (4, true),
            _ => return Err(format!("the cell at {offset:#x} is not a subkey list")),
        };
        for i in 0..usize::try_from(count).unwrap_or(0) {
            let Some(o) = le32(&l, 4 + i * step) else {
                return Err(format!(
                    "the subkey list at {offset:#x} is shorter than its count"
                ));
            };
            if nested {
                self.list(o, out, depth + 1)?;
            } else if out.len() < MAX_ENTRIES as usize {
                out.push(o);
            }
        }
        Ok(())
    }

    /// The values of key `k` by name: (name, type, data).
    fn values(&mut self, k: &[u8]) -> Result<Vec<(String, u32, Vec<u8>)>, String> {
        let count = le32(k, 36).unwrap_or(0).min(MAX_ENTRIES);
        if count == 0 {
            return Ok(Vec::new());
        }
        let list = self.cell(le32(k, 40).unwrap_or(u32::MAX))?;
        let mut out = Vec::new();
        for i in 0..usize::try_from(count).unwrap_or(0) {
            let Some(o) = le32(&list, i * 4) else { break };
            let v = self.cell(o)?;
            if v.get(..2) != Some(b"vk") || v.len() < 20 {
                return Err(format!("the cell at {o:#x} is not a value"));
            }
            let name_len = usize::from(le16(&v, 2).unwrap_or(0));
            let flags = le16(&v, 16).unwrap_or(0);
            let raw_name = v.get(20..20 + name_len).unwrap_or_default();
            let name = if flags & 1 != 0 {
                String::from_utf8_lossy(raw_name).into_owned()
            } else {
                utf16(raw_name)
            };
            let size = le32(&v, 4).unwrap_or(0);
            let kind = le32(&v, 12).unwrap_or(0);
            let data = if size & 0x8000_0000 != 0 {
                // Four bytes at most, in the offset field itself.
                let n = usize::try_from(size & 0x7fff_ffff).unwrap_or(0).min(4);
                v[8..8 + n].to_vec()
            } else if size <= MAX_CELL {
                let mut d = self.cell(le32(&v, 8).unwrap_or(u32::MAX))?;
                d.truncate(usize::try_from(size).unwrap_or(0));
                d
            } else {
                // Big data (`db` cells): not needed for the values read here.
                Vec::new()
            };
            out.push((name, kind, data));
        }
        Ok(out)
    }
}

fn utf16(b: &[u8]) -> String {
    let units: Vec<u16> = b
        .chunks_exact(2)
        .map(|c| u16::from_le_bytes([c[0], c[1]]))
        .collect();
    String::from_utf16_lossy(&units)
        .trim_end_matches('\0')
        .to_owned()
}

fn key_name(k: &[u8]) -> String {
    let len = usize::from(le16(k, 72).unwrap_or(0));
    let raw = k.get(76..76 + len).unwrap_or_default();
    if le16(k, 2).unwrap_or(0) & 0x20 != 0 {
        String::from_utf8_lossy(raw).into_owned()
    } else {
        utf16(raw)
    }
}

/// Reads `Microsoft\Windows NT\CurrentVersion` of a SOFTWARE hive.
pub(crate) fn current_version<R: Read + Seek>(mut r: R) -> Result<WindowsVersion, String> {
    let mut base = [0u8; 512];
    r.seek(SeekFrom::Start(0)).map_err(|e| e.to_string())?;
    r.read_exact(&mut base)
        .map_err(|e| format!("no base block: {e}"))?;
    if &base[..4] != b"regf" {
        return Err("not a registry hive (no \"regf\" signature)".to_owned());
    }
    let root = le32(&base, 36).unwrap_or(u32::MAX);
    let bins = u64::from(le32(&base, 40).unwrap_or(0));
    let len = r.seek(SeekFrom::End(0)).map_err(|e| e.to_string())?;
    let mut hive = Hive {
        r,
        end: (BINS + bins).min(len),
    };
    let mut k = hive.key(root)?;
    for name in ["Microsoft", "Windows NT", "CurrentVersion"] {
        k = hive
            .subkey(&k, name)?
            .ok_or_else(|| format!("the hive has no key {name:?} on the way to CurrentVersion"))?;
    }
    let values = hive.values(&k)?;
    let get = |name: &str| {
        values
            .iter()
            .find(|(n, _, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, kind, data)| (*kind, data.as_slice()))
    };
    let text = |name: &str| {
        get(name)
            .filter(|(kind, _)| matches!(kind, 1 | 2))
            .map(|(_, d)| utf16(d))
            .filter(|s| !s.is_empty())
    };
    let dword = |name: &str| {
        get(name)
            .filter(|(k, _)| *k == 4)
            .and_then(|(_, d)| le32(d, 0))
    };
    let build = text("CurrentBuildNumber").or_else(|| text("CurrentBuild"));
    let version = match (
        dword("CurrentMajorVersionNumber"),
        dword("CurrentMinorVersionNumber"),
    ) {
        (Some(major), Some(minor)) => Some(format!("{major}.{minor}")),
        _ => text("CurrentVersion"),
    }
    .map(|v| match &build {
        Some(b) => format!("{v}.{b}"),
        None => v,
    });
    Ok(WindowsVersion {
        product_name: text("ProductName"),
        version,
    })
}
