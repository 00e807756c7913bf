//! Change-list parsers. Every input is untrusted: sizes are capped before reading, numbers
//! must be non-negative integers, every range must lie within the disk, and a list that does
//! not cover the whole disk (one `QueryChangedDiskAreas` call of several) is refused, since
//! it would make a snapshot that silently misses changes.

use std::io::Read;
use std::path::Path;

use serde::Deserialize;

use super::{Extent, ExtentSet};
use crate::error::{Error, ErrorKind, Result};
use crate::image::{BlockSource, Target};

/// Longest change list read, in bytes.
pub const MAX_LIST_BYTES: u64 = 128 << 20;

/// The kinds of change lists.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChangeFormat {
    /// VMware `QueryChangedDiskAreas` results: one `DiskChangeInfo` or an array of them.
    VmwareCbt,
    /// Hyper-V `GetVirtualDiskChanges` results: `ChangedByteOffsets` / `ChangedByteLengths`.
    HypervRct,
    /// `offset,length` per line, or a JSON array of `[offset, length]` / objects.
    Extents,
    /// What the child of a snapshot chain allocates (VMDK delta, VHDX/VHD differencing).
    Chain,
}

impl ChangeFormat {
    /// The format's name on the command line.
    pub fn name(self) -> &'static str {
        match self {
            ChangeFormat::VmwareCbt => "vmware-cbt",
            ChangeFormat::HypervRct => "hyperv-rct",
            ChangeFormat::Extents => "extents",
            ChangeFormat::Chain => "chain",
        }
    }

    /// Parses a command-line name.
    pub fn from_name(name: &str) -> Result<ChangeFormat> {
        match name {
            "vmware-cbt" | "cbt" => Ok(ChangeFormat::VmwareCbt),
            "hyperv-rct" | "rct" => Ok(ChangeFormat::HypervRct),
            "extents" => Ok(ChangeFormat::Extents),
            _ => Err(Error::new(
                ErrorKind::Config,
                format!(
                    "unknown change-list format {name:?}: give vmware-cbt, hyperv-rct or extents"
                ),
            )),
        }
    }
}

/// A parsed change list, checked against the disk it describes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChangeList {
    /// What kind of list it was.
    pub format: ChangeFormat,
    /// The change id the list was taken against (VMware `changeId`, Hyper-V `TargetRctId`);
    /// `*` means the list names every allocated area, not changes.
    pub base_change_id: Option<String>,
    /// The source's change id now, if the list carries it (`newChangeId`, `NewRctId`): the
    /// snapshot records it so that the next delta can be checked against it.
    pub new_change_id: Option<String>,
    /// The bytes the list names.
    pub extents: ExtentSet,
}

impl ChangeList {
    /// Whether the list names every allocated area (VMware `changeId` `*`) rather than what
    /// changed since a base.
    pub fn all_allocated(&self) -> bool {
        self.base_change_id.as_deref() == Some("*")
    }

    /// Reads a change list from a file (at most [`MAX_LIST_BYTES`]); `format` `None` detects it.
    pub fn read(path: &Path, format: Option<ChangeFormat>, disk_size: u64) -> Result<ChangeList> {
        let file =
            std::fs::File::open(path).map_err(|e| Error::io("opening the change list", path, e))?;
        let mut text = Vec::new();
        file.take(MAX_LIST_BYTES + 1)
            .read_to_end(&mut text)
            .map_err(|e| Error::io("reading the change list", path, e))?;
        if text.len() as u64 > MAX_LIST_BYTES {
            return Err(Error::new(
                ErrorKind::InvalidChangeList,
                format!("change list larger than {} MiB", MAX_LIST_BYTES >> 20),
            )
            .with_path(path));
        }
        ChangeList::parse(&text, format, disk_size).map_err(|e| e.with_path(path))
    }

    /// Parses a change list of a disk of `disk_size` bytes; `format` `None` detects it.
    pub fn parse(text: &[u8], format: Option<ChangeFormat>, disk_size: u64) -> Result<ChangeList> {
        if text.len() as u64 > MAX_LIST_BYTES {
            return Err(invalid(format!(
                "change list larger than {} MiB",
                MAX_LIST_BYTES >> 20
            )));
        }
        let format = format.unwrap_or_else(|| detect(text));
        match format {
            ChangeFormat::VmwareCbt => parse_cbt(text, disk_size),
            ChangeFormat::HypervRct => parse_rct(text, disk_size),
            ChangeFormat::Extents | ChangeFormat::Chain => parse_extents(text, disk_size),
        }
    }
}

impl ChangeList {
    /// The change set of a snapshot chain: every range the top image (the child) allocates,
    /// data or zero, changed since its parent was taken. The list's base change id is the
    /// parent identity the child records, its new one the child's own identity.
    pub fn from_chain(source: &dyn BlockSource) -> Result<ChangeList> {
        let Some(top) = source.top_layer() else {
            return Err(invalid(
                "--changes-from-chain needs a child image (a VMDK snapshot delta or a VHDX/VHD \
                 differencing disk) joined to its parent",
            ));
        };
        let size = source.info().virtual_size;
        let mut ranges: Vec<(u64, u64)> = Vec::new();
        let mut maps = Vec::new();
        let mut at = 0;
        while at < size {
            let len = CHAIN_STEP.min(size - at);
            maps.clear();
            top.map(at, len, &mut maps)?;
            let mut off = at;
            for m in &maps {
                if !matches!(m.target, Target::Unallocated) {
                    match ranges.last_mut() {
                        Some((o, l)) if *o + *l == off => *l += m.len,
                        _ => ranges.push((off, m.len)),
                    }
                }
                off += m.len;
            }
            at += len;
        }
        Ok(ChangeList {
            format: ChangeFormat::Chain,
            base_change_id: top.parent_link().map(|l| l.identity.change_id()),
            new_change_id: top.identity().map(|i| i.change_id()),
            extents: ExtentSet::from_ranges(ranges, size)?,
        })
    }
}

/// Virtual bytes mapped per step when deriving a chain's change set.
const CHAIN_STEP: u64 = 1 << 30;

fn invalid(message: impl Into<String>) -> Error {
    Error::new(ErrorKind::InvalidChangeList, message)
}

/// The format of a list by its content: JSON naming CBT or RCT fields, else extents.
fn detect(text: &[u8]) -> ChangeFormat {
    let head = &text[..text.len().min(64 << 10)];
    let has = |needle: &str| {
        head.windows(needle.len())
            .any(|w| w.eq_ignore_ascii_case(needle.as_bytes()))
    };
    let json = text
        .iter()
        .find(|b| !b.is_ascii_whitespace())
        .is_some_and(|b| matches!(b, b'{' | b'['));
    if json && has("\"changedByteOffsets\"") {
        ChangeFormat::HypervRct
    } else if json && (has("\"changedArea\"") || has("\"startOffset\"")) {
        ChangeFormat::VmwareCbt
    } else {
        ChangeFormat::Extents
    }
}

/// Deserializes one object or an array of them.
fn one_or_many<T: for<'de> Deserialize<'de>>(text: &[u8], what: &str) -> Result<Vec<T>> {
    let array = text
        .iter()
        .find(|b| !b.is_ascii_whitespace())
        .is_some_and(|&b| b == b'[');
    let parsed = if array {
        serde_json::from_slice::<Vec<T>>(text)
    } else {
        serde_json::from_slice::<T>(text).map(|t| vec![t])
    };
    parsed.map_err(|e| invalid(format!("not a valid {what}: {e}")))
}

/// One id every part of a list agrees on (or none).
fn agreed(ids: impl Iterator<Item = Option<String>>, what: &str) -> Result<Option<String>> {
    let mut out: Option<String> = None;
    for id in ids.flatten() {
        match &out {
            Some(o) if *o != id => {
                return Err(invalid(format!(
                    "the list's parts name different {what}s ({o:?} and {id:?})"
                )));
            }
            _ => out = Some(id),
        }
    }
    Ok(out)
}

/// Checks that the ranges the list's parts cover span the whole disk.
fn check_coverage(covered: Vec<(u64, u64)>, disk_size: u64, how: &str) -> Result<()> {
    let clipped = covered.into_iter().filter_map(|(o, l)| {
        let end = o.saturating_add(l).min(disk_size);
        (o < end).then(|| (o, end - o))
    });
    let set = ExtentSet::from_ranges(clipped, disk_size)?;
    let missing = set.complement(disk_size);
    if let Some(Extent { offset, len }) = missing.iter().next() {
        return Err(invalid(format!(
            "the list covers only {} of the disk's {disk_size} bytes (bytes {offset}..{} are \
             not covered): {how}",
            set.bytes(),
            offset + len
        )));
    }
    Ok(())
}

#[derive(Deserialize)]
struct CbtArea {
    #[serde(alias = "Start")]
    start: u64,
    #[serde(alias = "Length")]
    length: u64,
}

#[derive(Deserialize)]
struct DiskChangeInfo {
    #[serde(rename = "startOffset", alias = "StartOffset")]
    start_offset: u64,
    #[serde(alias = "Length")]
    length: u64,
    #[serde(rename = "changedArea", alias = "ChangedArea", default)]
    changed_area: Vec<CbtArea>,
    #[serde(rename = "changeId", alias = "ChangeId", default)]
    change_id: Option<String>,
    #[serde(rename = "newChangeId", alias = "NewChangeId", default)]
    new_change_id: Option<String>,
}

fn parse_cbt(text: &[u8], disk_size: u64) -> Result<ChangeList> {
    let infos: Vec<DiskChangeInfo> = one_or_many(text, "VMware DiskChangeInfo list")?;
    if infos.is_empty() {
        return Err(invalid("the VMware change list holds no DiskChangeInfo"));
    }
    let mut ranges = Vec::new();
    let mut covered = Vec::new();
    for (i, info) in infos.iter().enumerate() {
        let info_end = info.start_offset.checked_add(info.length).ok_or_else(|| {
            invalid(format!(
                "DiskChangeInfo {i}: startOffset + length overflows"
            ))
        })?;
        covered.push((info.start_offset, info.length));
        for (j, a) in info.changed_area.iter().enumerate() {
            let end = a.start.checked_add(a.length);
            if a.start < info.start_offset || end.is_none_or(|e| e > info_end) {
                return Err(invalid(format!(
                    "DiskChangeInfo {i}, changedArea {j} (start {}, length {}) lies outside \
                     the range the call covered ({}..{info_end})",
                    a.start, a.length, info.start_offset
                )));
            }
            ranges.push((a.start, a.length));
        }
    }
    let base = agreed(infos.iter().map(|i| i.change_id.clone()), "changeId")?;
    let new = agreed(infos.iter().map(|i| i.new_change_id.clone()), "newChangeId")?;
    check_coverage(
        covered,
        disk_size,
        "give the results of every QueryChangedDiskAreas call (loop on startOffset until \
         startOffset + length reaches the disk's capacity)",
    )?;
    Ok(ChangeList {
        format: ChangeFormat::VmwareCbt,
        base_change_id: base,
        new_change_id: new,
        extents: ExtentSet::from_ranges(ranges, disk_size)?,
    })
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct RctChanges {
    #[serde(alias = "changedByteOffsets")]
    changed_byte_offsets: Vec<u64>,
    #[serde(alias = "changedByteLengths")]
    changed_byte_lengths: Vec<u64>,
    #[serde(alias = "targetRctId", default)]
    target_rct_id: Option<String>,
    #[serde(alias = "newRctId", default)]
    new_rct_id: Option<String>,
    #[serde(alias = "byteOffset", default)]
    byte_offset: Option<u64>,
    #[serde(alias = "processedByteLength", default)]
    processed_byte_length: Option<u64>,
}

fn parse_rct(text: &[u8], disk_size: u64) -> Result<ChangeList> {
    let calls: Vec<RctChanges> = one_or_many(text, "Hyper-V GetVirtualDiskChanges result")?;
    if calls.is_empty() {
        return Err(invalid("the Hyper-V change list holds no result"));
    }
    let mut ranges = Vec::new();
    let mut covered = Vec::new();
    for (i, c) in calls.iter().enumerate() {
        if c.changed_byte_offsets.len() != c.changed_byte_lengths.len() {
            return Err(invalid(format!(
                "result {i}: {} ChangedByteOffsets but {} ChangedByteLengths",
                c.changed_byte_offsets.len(),
                c.changed_byte_lengths.len()
            )));
        }
        // What the call covered: ProcessedByteLength from ByteOffset (a call may stop short
        // of the length asked for; without the field, coverage is unknown).
        let Some(processed) = c.processed_byte_length else {
            return Err(invalid(format!(
                "result {i} has no ProcessedByteLength: cannot tell which part of the disk it \
                 covered"
            )));
        };
        covered.push((c.byte_offset.unwrap_or(0), processed));
        ranges.extend(
            c.changed_byte_offsets
                .iter()
                .copied()
                .zip(c.changed_byte_lengths.iter().copied()),
        );
    }
    let base = agreed(calls.iter().map(|c| c.target_rct_id.clone()), "TargetRctId")?;
    let new = agreed(calls.iter().map(|c| c.new_rct_id.clone()), "NewRctId")?;
    check_coverage(
        covered,
        disk_size,
        "give the results of every GetVirtualDiskChanges call (loop while ProcessedByteLength \
         is short of the length asked for)",
    )?;
    Ok(ChangeList {
        format: ChangeFormat::HypervRct,
        base_change_id: base,
        new_change_id: new,
        extents: ExtentSet::from_ranges(ranges, disk_size)?,
    })
}

#[derive(Deserialize)]
#[serde(untagged)]
enum JsonExtent {
    Pair(u64, u64),
    Object {
        offset: u64,
        #[serde(alias = "len")]
        length: u64,
    },
}

#[derive(Deserialize)]
struct ExtentsDoc {
    #[serde(rename = "changeId", default)]
    change_id: Option<String>,
    #[serde(rename = "newChangeId", default)]
    new_change_id: Option<String>,
    extents: Vec<JsonExtent>,
}

fn parse_extents(text: &[u8], disk_size: u64) -> Result<ChangeList> {
    let first = text.iter().find(|b| !b.is_ascii_whitespace()).copied();
    let (base, new, ranges) = match first {
        Some(b'[') => {
            let list: Vec<JsonExtent> = serde_json::from_slice(text).map_err(|e| {
                invalid(format!(
                    "not a valid extent list (a JSON array of [offset, length] or \
                     {{\"offset\", \"length\"}}): {e}"
                ))
            })?;
            (None, None, list)
        }
        Some(b'{') => {
            let doc: ExtentsDoc = serde_json::from_slice(text).map_err(|e| {
                invalid(format!(
                    "not a valid extent document ({{\"extents\": [...], \"changeId\"?, \
                     \"newChangeId\"?}}): {e}"
                ))
            })?;
            (doc.change_id, doc.new_change_id, doc.extents)
        }
        _ => (None, None, parse_lines(text)?),
    };
    let ranges = ranges.into_iter().map(|e| match e {
        JsonExtent::Pair(o, l)
        | JsonExtent::Object {
            offset: o,
            length: l,
        } => (o, l),
    });
    Ok(ChangeList {
        format: ChangeFormat::Extents,
        base_change_id: base,
        new_change_id: new,
        extents: ExtentSet::from_ranges(ranges, disk_size)?,
    })
}

/// `offset,length` (or whitespace-separated) per line, decimal or `0x` hex; `#` starts a
/// comment.
fn parse_lines(text: &[u8]) -> Result<Vec<JsonExtent>> {
    let text = std::str::from_utf8(text).map_err(|e| {
        invalid(format!(
            "extent list is not UTF-8 text (byte {})",
            e.valid_up_to()
        ))
    })?;
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        let mut fields = line
            .split(|c: char| c == ',' || c.is_ascii_whitespace())
            .filter(|f| !f.is_empty());
        let (Some(o), Some(l), None) = (fields.next(), fields.next(), fields.next()) else {
            return Err(invalid(format!(
                "line {}: expected `offset,length`, found {line:?}",
                n + 1
            )));
        };
        let num = |s: &str| -> Result<u64> {
            let parsed = match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
                Some(hex) => u64::from_str_radix(hex, 16),
                None => s.parse::<u64>(),
            };
            parsed.map_err(|_| {
                invalid(format!(
                    "line {}: {s:?} is not a non-negative integer below 2^64",
                    n + 1
                ))
            })
        };
        out.push(JsonExtent::Pair(num(o)?, num(l)?));
    }
    Ok(out)
}
