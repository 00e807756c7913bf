//! Hyper-V `.vmcx`: a VM's configuration in Hyper-V's binary key/value store.
//!
//! Microsoft does not publish the format; docs/VM-CONFIGS.md ("Hyper-V `.vmcx`") says
//! what this reader relies on, learnt from a real file and public descriptions. In short:
//! two headers (at 0 and 4 KiB, the one with the higher sequence number is current), an
//! object table at 8 KiB listing key tables and file objects, and key tables whose entries
//! (typed values and nodes) name their parent node by (table index, offset). The tree read
//! from the root is the configuration. Checksums are not verified (their algorithm is not
//! known here); every offset, size and count is checked against the file and a cap.

use std::collections::{HashMap, HashSet};
use std::path::Path;

use super::{ConfigKind, Nic, Vm, VmDisk, VmFirmware, VmSnapshot, normal_mac};
use crate::error::{Error, ErrorKind, Result};
use crate::image::util::{MemFile, ReadAt, invalid, read_struct};
use crate::io::SourceFile;

const HEADER_SIGNATURE: u32 = 0x0128_2014;
const OBJECT_TABLE_SIGNATURE: u32 = 0x0111_0001;
const REPLAY_LOG_SIGNATURE: u32 = 0x0111_0003;
const KEY_TABLE_SIGNATURE: u16 = 0x0002;
/// The one version read (Windows Server 2016 and later write it).
const VERSION: u32 = 0x400;
const OBJECT_TABLE_OFFSET: u64 = 0x2000;
const HEADER_LEN: u64 = 46;
const OBJECT_ENTRY_LEN: usize = 18;
const KEY_TABLE_HEADER_LEN: usize = 10;
const KEY_ENTRY_HEADER_LEN: usize = 21;

/// Largest configuration file read.
const MAX_FILE: u64 = 256 << 20;
/// Most object table entries read (over all object tables).
const MAX_OBJECTS: usize = 1 << 16;
/// Largest key table or file object read.
const MAX_OBJECT: u64 = 16 << 20;
/// Most bytes read from file objects over the whole file.
const MAX_FILE_OBJECT_BYTES: u64 = 64 << 20;
/// Deepest node nesting kept.
const MAX_DEPTH: usize = 64;

/// A value of the configuration.
#[derive(Debug, Clone, PartialEq)]
pub enum VmcxValue {
    /// Signed integer.
    Int(i64),
    /// Unsigned integer.
    UInt(u64),
    /// Floating point.
    Double(f64),
    /// Text (UTF-16 in the file).
    Str(String),
    /// Bytes.
    Bytes(Vec<u8>),
    /// Boolean.
    Bool(bool),
    /// A node: named children in file order.
    Node(Vec<(String, VmcxValue)>),
}

impl VmcxValue {
    /// The child of a node by name (without case).
    pub fn get(&self, name: &str) -> Option<&VmcxValue> {
        match self {
            VmcxValue::Node(children) => children
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(name))
                .map(|(_, v)| v),
            _ => None,
        }
    }

    /// The value at a path of names below this node.
    pub fn at(&self, path: &[&str]) -> Option<&VmcxValue> {
        path.iter().try_fold(self, |v, name| v.get(name))
    }

    /// Text, if this is text.
    pub fn str(&self) -> Option<&str> {
        match self {
            VmcxValue::Str(s) => Some(s),
            _ => None,
        }
    }

    /// An integer, if this is one that fits.
    pub fn uint(&self) -> Option<u64> {
        match *self {
            VmcxValue::UInt(u) => Some(u),
            VmcxValue::Int(i) => u64::try_from(i).ok(),
            _ => None,
        }
    }

    /// A boolean, if this is one.
    pub fn bool(&self) -> Option<bool> {
        match *self {
            VmcxValue::Bool(b) => Some(b),
            _ => None,
        }
    }

    /// A node's children (none for a value).
    pub fn children(&self) -> &[(String, VmcxValue)] {
        match self {
            VmcxValue::Node(c) => c,
            _ => &[],
        }
    }
}

/// A parsed `.vmcx`.
#[derive(Debug, Clone, PartialEq)]
pub struct VmcxFile {
    /// The root node (its children: `configuration`, …).
    pub root: VmcxValue,
    /// Entries of the replay log not yet replayed into the file (the values read may be
    /// older than Hyper-V's view).
    pub unreplayed: u32,
}

/// Each node's children (by table index and offset; `None` is the root).
type Children = HashMap<Option<(u16, u32)>, Vec<(u16, u32)>>;

/// One key table entry as read.
struct RawEntry {
    kind: u8,
    parent: Option<(u16, u32)>,
    key: String,
    value: Option<VmcxValue>,
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn u64_at(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

impl VmcxFile {
    /// Parses a configuration held in memory (fuzzing, tests).
    ///
    /// # Errors
    /// As [`VmcxFile::read`].
    pub fn parse(name: &str, bytes: Vec<u8>) -> Result<VmcxFile> {
        Self::read(&MemFile::new(name, bytes))
    }

    /// Parses a configuration file.
    ///
    /// # Errors
    /// Not a `.vmcx` (signature), a version other than 0x400, or a structure out of range.
    pub fn read(r: &dyn ReadAt) -> Result<VmcxFile> {
        if r.size() > MAX_FILE {
            return Err(invalid(
                r,
                "VM configuration",
                0,
                format!("{} bytes: larger than any configuration", r.size()),
            ));
        }
        let header = current_header(r)?;
        let version = u32_at(&header, 10).unwrap_or(0);
        if version != VERSION {
            return Err(invalid(
                r,
                "VM configuration header",
                0,
                format!("version {version:#x}; only {VERSION:#x} is read"),
            ));
        }
        let unreplayed = replay_log_entries(r, u64_at(&header, 26).unwrap_or(0));
        let (tables, file_objects) = object_tables(r)?;
        // The current table of each index: the highest sequence number.
        let mut current: HashMap<u16, (u16, u64, Vec<u8>)> = HashMap::new();
        for (offset, size) in tables {
            let raw = read_struct(r, "key table", offset, size, MAX_OBJECT)?;
            let (Some(sig), Some(index), Some(seq)) =
                (u16_at(&raw, 0), u16_at(&raw, 2), u16_at(&raw, 4))
            else {
                return Err(invalid(r, "key table", offset, "shorter than its header"));
            };
            if sig != KEY_TABLE_SIGNATURE {
                return Err(invalid(
                    r,
                    "key table",
                    offset,
                    format!("signature {sig:#06x}, not {KEY_TABLE_SIGNATURE:#06x}"),
                ));
            }
            if current.get(&index).is_none_or(|(s, _, _)| seq > *s) {
                current.insert(index, (seq, offset, raw));
            }
        }
        let mut budget = MAX_FILE_OBJECT_BYTES;
        let mut entries: HashMap<(u16, u32), RawEntry> = HashMap::new();
        let mut order: Vec<(u16, u32)> = Vec::new();
        let mut indexes: Vec<&u16> = current.keys().collect();
        indexes.sort_unstable();
        for &index in indexes {
            let (_, offset, raw) = &current[&index];
            for (at, e) in table_entries(r, *offset, raw, &file_objects, &mut budget)? {
                order.push((index, at));
                entries.insert((index, at), e);
            }
        }
        let mut children: Children = HashMap::new();
        for id in &order {
            let e = &entries[id];
            if e.kind == 1 || e.kind == 2 || e.kind > 9 {
                continue;
            }
            children.entry(e.parent).or_default().push(*id);
        }
        let mut seen = HashSet::new();
        let root = VmcxValue::Node(build(None, &entries, &children, &mut seen, 0));
        Ok(VmcxFile { root, unreplayed })
    }
}

/// The header with the higher sequence number of the two whose signature is right.
fn current_header(r: &dyn ReadAt) -> Result<Vec<u8>> {
    let mut best: Option<(u16, Vec<u8>)> = None;
    for at in [0u64, 0x1000] {
        let Ok(h) = read_struct(r, "VM configuration header", at, HEADER_LEN, HEADER_LEN) else {
            continue;
        };
        if u32_at(&h, 0) != Some(HEADER_SIGNATURE) {
            continue;
        }
        let seq = u16_at(&h, 8).unwrap_or(0);
        if best.as_ref().is_none_or(|(s, _)| seq > *s) {
            best = Some((seq, h));
        }
    }
    best.map(|(_, h)| h).ok_or_else(|| {
        invalid(
            r,
            "VM configuration header",
            0,
            format!("neither header (at 0 and 0x1000) has the signature {HEADER_SIGNATURE:#010x}: not a Hyper-V configuration"),
        )
    })
}

/// How many entries the replay log holds (0 when it cannot be read: it is only a warning).
fn replay_log_entries(r: &dyn ReadAt, offset: u64) -> u32 {
    read_struct(r, "replay log", offset, 12, 12)
        .ok()
        .filter(|h| u32_at(h, 0) == Some(REPLAY_LOG_SIGNATURE))
        .and_then(|h| u32_at(&h, 8))
        .unwrap_or(0)
}

/// The key tables (offset, size) and file objects (offset → size) of the object tables.
#[allow(clippy::type_complexity)]
fn object_tables(r: &dyn ReadAt) -> Result<(Vec<(u64, u64)>, HashMap<u64, u64>)> {
    let mut tables = Vec::new();
    let mut files = HashMap::new();
    let mut pending = vec![OBJECT_TABLE_OFFSET];
    let mut visited = HashSet::new();
    let mut total = 0usize;
    while let Some(at) = pending.pop() {
        if !visited.insert(at) {
            continue;
        }
        let head = read_struct(r, "object table", at, 8, 8)?;
        if u32_at(&head, 0) != Some(OBJECT_TABLE_SIGNATURE) {
            return Err(invalid(
                r,
                "object table",
                at,
                format!("signature is not {OBJECT_TABLE_SIGNATURE:#010x}"),
            ));
        }
        let n = usize::try_from(u32_at(&head, 4).unwrap_or(0)).unwrap_or(usize::MAX);
        total = total.saturating_add(n);
        if total > MAX_OBJECTS {
            return Err(invalid(
                r,
                "object table",
                at,
                format!("more than {MAX_OBJECTS} objects"),
            ));
        }
        let len = u64::try_from(n * OBJECT_ENTRY_LEN).unwrap_or(u64::MAX);
        let raw = read_struct(r, "object table", at + 8, len, MAX_OBJECT)?;
        for e in raw.chunks_exact(OBJECT_ENTRY_LEN) {
            let (Some(offset), Some(size)) = (u64_at(e, 5), u32_at(e, 13)) else {
                continue;
            };
            if e[17] == 0 {
                continue;
            }
            match e[0] {
                1 => pending.push(offset),
                2 => tables.push((offset, u64::from(size))),
                3 => {
                    files.insert(offset, u64::from(size));
                }
                _ => {}
            }
        }
    }
    Ok((tables, files))
}

/// The entries of one key table, by their offset in it.
fn table_entries(
    r: &dyn ReadAt,
    table_offset: u64,
    raw: &[u8],
    file_objects: &HashMap<u64, u64>,
    budget: &mut u64,
) -> Result<Vec<(u32, RawEntry)>> {
    let mut out = Vec::new();
    let mut at = KEY_TABLE_HEADER_LEN;
    while at + KEY_ENTRY_HEADER_LEN <= raw.len() {
        let where_ = table_offset + u64::try_from(at).unwrap_or(u64::MAX);
        let bad = |why: String| invalid(r, "key table entry", where_, why);
        let kind_flags = u16_at(raw, at).unwrap_or(0);
        let size = usize::try_from(u32_at(raw, at + 2).unwrap_or(0)).unwrap_or(usize::MAX);
        if size == 0 {
            break;
        }
        let end = at
            .checked_add(size)
            .filter(|&e| e <= raw.len() && size >= KEY_ENTRY_HEADER_LEN)
            .ok_or_else(|| bad(format!("size {size} does not fit the table")))?;
        let kind = u8::try_from(kind_flags & 0xff).unwrap_or(0);
        let file_object = kind_flags >> 8 & 1 == 1;
        let parent_table = u16_at(raw, at + 6).unwrap_or(0);
        let parent_offset = u32_at(raw, at + 8).unwrap_or(0);
        let data_offset = usize::from(raw[at + 20]);
        let body = &raw[at + KEY_ENTRY_HEADER_LEN..end];
        let entry = if kind == 1 || kind == 2 || kind > 9 {
            RawEntry {
                kind,
                parent: None,
                key: String::new(),
                value: None,
            }
        } else {
            if data_offset == 0 || data_offset > body.len() {
                return Err(bad(format!(
                    "value offset {data_offset} outside the entry's {} bytes",
                    body.len()
                )));
            }
            let key = String::from_utf8_lossy(&body[..data_offset - 1]).into_owned();
            let data = &body[data_offset..];
            let value = if kind == 9 {
                None
            } else if file_object {
                Some(file_value(r, kind, data, file_objects, budget, where_)?)
            } else {
                Some(inline_value(kind, data).ok_or_else(|| {
                    bad(format!("value of {key:?} is shorter than its type needs"))
                })?)
            };
            RawEntry {
                kind,
                parent: (parent_table != 0).then_some((parent_table, parent_offset)),
                key,
                value,
            }
        };
        out.push((u32::try_from(at).unwrap_or(u32::MAX), entry));
        at = end;
    }
    Ok(out)
}

fn inline_value(kind: u8, data: &[u8]) -> Option<VmcxValue> {
    Some(match kind {
        3 => VmcxValue::Int(i64::from_le_bytes(data.get(..8)?.try_into().ok()?)),
        4 => VmcxValue::UInt(u64_at(data, 0)?),
        5 => VmcxValue::Double(f64::from_le_bytes(data.get(..8)?.try_into().ok()?)),
        6 | 7 => {
            let len = usize::try_from(u32_at(data, 0)?).ok()?;
            let bytes = data.get(4..4usize.checked_add(len)?)?;
            bytes_value(kind, bytes)
        }
        8 => VmcxValue::Bool(u32_at(data, 0)? != 0),
        _ => return None,
    })
}

fn bytes_value(kind: u8, bytes: &[u8]) -> VmcxValue {
    if kind == 6 {
        let units: Vec<u16> = bytes
            .chunks_exact(2)
            .map(|c| u16::from_le_bytes([c[0], c[1]]))
            .collect();
        let s = String::from_utf16_lossy(&units);
        VmcxValue::Str(s.trim_end_matches('\0').to_owned())
    } else {
        VmcxValue::Bytes(bytes.to_vec())
    }
}

/// A value kept in a file object: `size` bytes at the absolute `offset` the entry names.
fn file_value(
    r: &dyn ReadAt,
    kind: u8,
    data: &[u8],
    file_objects: &HashMap<u64, u64>,
    budget: &mut u64,
    entry_at: u64,
) -> Result<VmcxValue> {
    let (Some(size), Some(offset)) = (u32_at(data, 0), u64_at(data, 4)) else {
        return Err(invalid(
            r,
            "key table entry",
            entry_at,
            "a file object pointer shorter than 12 bytes",
        ));
    };
    let size = u64::from(size);
    let Some(&object_size) = file_objects.get(&offset) else {
        return Err(invalid(
            r,
            "key table entry",
            entry_at,
            format!("names file object {offset:#x}, which the object table does not list"),
        ));
    };
    if size > object_size || !matches!(kind, 6 | 7) {
        return Err(invalid(
            r,
            "key table entry",
            entry_at,
            format!(
                "a file object value of {size} bytes of type {kind} in an object of {object_size}"
            ),
        ));
    }
    *budget = budget.checked_sub(size).ok_or_else(|| {
        invalid(
            r,
            "file object",
            offset,
            format!(
                "more than {} MiB of values in file objects",
                MAX_FILE_OBJECT_BYTES >> 20
            ),
        )
    })?;
    let bytes = read_struct(r, "file object", offset, size, MAX_OBJECT)?;
    Ok(bytes_value(kind, &bytes))
}

/// The children of `parent`, depth first; an entry is taken once, so a loop of parent links
/// ends, and nodes deeper than [`MAX_DEPTH`] are left out.
fn build(
    parent: Option<(u16, u32)>,
    entries: &HashMap<(u16, u32), RawEntry>,
    children: &Children,
    seen: &mut HashSet<(u16, u32)>,
    depth: usize,
) -> Vec<(String, VmcxValue)> {
    let Some(ids) = children.get(&parent) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for id in ids {
        if !seen.insert(*id) {
            continue;
        }
        let e = &entries[id];
        let value = if e.kind == 9 {
            if depth >= MAX_DEPTH {
                continue;
            }
            VmcxValue::Node(build(Some(*id), entries, children, seen, depth + 1))
        } else {
            match &e.value {
                Some(v) => v.clone(),
                None => continue,
            }
        };
        out.push((e.key.clone(), value));
    }
    out
}

/// The VM a `.vmcx` describes; `None` for a configuration that is not a VM's (a snapshot's,
/// whose `type_id` is not "Virtual Machines").
pub(super) fn read_vm(path: &Path) -> Result<Option<Vm>> {
    let file = SourceFile::open(path)?;
    let parsed = VmcxFile::read(&file)?;
    let Some(config) = parsed.root.get("configuration") else {
        return Err(Error::new(
            ErrorKind::InvalidImage,
            "VM configuration: it has no \"configuration\" node",
        )
        .with_path(path));
    };
    let props = config.get("properties");
    let type_id = props
        .and_then(|p| p.get("type_id"))
        .and_then(VmcxValue::str);
    if type_id.is_some_and(|t| !t.eq_ignore_ascii_case("Virtual Machines")) {
        return Ok(None);
    }
    let mut vm = vm_of(config);
    vm.config = path.to_path_buf();
    if parsed.unreplayed > 0 {
        vm.warnings.push(format!(
            "the configuration's replay log holds {} entries Hyper-V has not written into it: \
             the values read may be older than Hyper-V's",
            parsed.unreplayed
        ));
    }
    Ok(Some(vm))
}

/// The VM fields of a configuration's `configuration` node.
fn vm_of(config: &VmcxValue) -> Vm {
    let props = config.get("properties");
    let text = |v: Option<&VmcxValue>| v.and_then(VmcxValue::str).map(str::to_owned);
    let mut vm = Vm {
        kind: Some(ConfigKind::Vmcx),
        name: text(props.and_then(|p| p.get("name"))),
        id: text(props.and_then(|p| p.get("global_id")))
            .or_else(|| text(config.at(&["settings", "global", "logical_id"]))),
        cpus: config
            .at(&["settings", "processors", "count"])
            .and_then(VmcxValue::uint)
            .and_then(|c| u32::try_from(c).ok()),
        memory_bytes: config
            .at(&["settings", "memory", "bank", "size"])
            .and_then(VmcxValue::uint)
            .and_then(|m| m.checked_mul(1 << 20)),
        encrypted: encrypted(config),
        ..Vm::default()
    };
    // Devices: the manifest lists each (its kind's GUID, its instance, its name); the
    // instance's settings are the node `_<instance>_`.
    let devices: Vec<(String, &VmcxValue)> = config
        .get("manifest")
        .map(VmcxValue::children)
        .unwrap_or_default()
        .iter()
        .filter_map(|(_, d)| {
            let name = d.get("name")?.str()?.to_owned();
            let instance = d.get("instance")?.str()?;
            let section = config.get(&format!("_{instance}_"))?;
            Some((name, section))
        })
        .collect();
    let mut scsi = 0u32;
    for (name, section) in &devices {
        let lower = name.to_ascii_lowercase();
        if lower.contains("uefi") {
            vm.firmware = Some(VmFirmware::Efi);
            vm.secure_boot = section.get("secure_boot_enabled").and_then(VmcxValue::bool);
        } else if lower.contains("bios") && vm.firmware.is_none() {
            vm.firmware = Some(VmFirmware::Bios);
            vm.secure_boot = Some(false);
        } else if lower.contains("ethernet") {
            vm.nics.push(nic(name, section));
        } else if lower.contains("ide controller") {
            vm.disks.extend(drives("ide", None, section));
        } else if lower.contains("scsi controller") {
            vm.disks.extend(drives("scsi", Some(scsi), section));
            scsi += 1;
        }
    }
    vm.snapshots = config
        .at(&["global_settings", "snapshots", "list"])
        .map(VmcxValue::children)
        .unwrap_or_default()
        .iter()
        .filter(|(k, _)| !k.eq_ignore_ascii_case("size"))
        .filter_map(|(_, v)| v.str())
        .map(|id| VmSnapshot {
            id: id.to_owned(),
            ..VmSnapshot::default()
        })
        .collect();
    vm
}

fn nic(device: &str, s: &VmcxValue) -> Nic {
    let get = |k: &str| s.get(k).and_then(VmcxValue::str).filter(|v| !v.is_empty());
    let mac_static = s.get("MacAddressIsStatic").and_then(VmcxValue::bool);
    // A dynamic MAC not yet assigned reads as all zeros.
    let mac = get("MacAddress")
        .and_then(normal_mac)
        .filter(|m| m != "00:00:00:00:00:00");
    Nic {
        name: get("FriendlyName").unwrap_or(device).to_owned(),
        kind: Some(if device.to_ascii_lowercase().contains("synthetic") {
            "synthetic".to_owned()
        } else {
            "legacy".to_owned()
        }),
        mac,
        mac_static,
        network: get("SwitchName")
            .or_else(|| {
                s.at(&["Connection", "AltSwitchName"])
                    .and_then(VmcxValue::str)
                    .filter(|v| !v.is_empty())
            })
            .map(str::to_owned),
        connected: s.get("IsConnected").and_then(VmcxValue::bool),
    }
}

/// The hard disks (`type` "VHD") of a controller's `controllerN/driveM` nodes.
fn drives(bus: &str, number: Option<u32>, section: &VmcxValue) -> Vec<VmDisk> {
    let mut out = Vec::new();
    for (cname, controller) in section.children() {
        let Some(c) = cname
            .strip_prefix("controller")
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        for (dname, drive) in controller.children() {
            let Some(d) = dname
                .strip_prefix("drive")
                .and_then(|n| n.parse::<u32>().ok())
            else {
                continue;
            };
            let kind = drive
                .get("type")
                .and_then(VmcxValue::str)
                .unwrap_or_default();
            let path = drive
                .get("pathname")
                .and_then(VmcxValue::str)
                .unwrap_or_default();
            if !kind.eq_ignore_ascii_case("VHD") || path.is_empty() {
                continue;
            }
            // IDE: two channels of two drives (ide0:1); SCSI: one controller, its drives.
            let controller = match number {
                Some(n) => format!("{bus}{n}"),
                None => format!("{bus}{c}"),
            };
            out.push(VmDisk {
                slot: format!("{controller}:{d}"),
                controller,
                controller_type: Some(if bus == "ide" {
                    "ide".into()
                } else {
                    "synthetic scsi".into()
                }),
                configured_path: path.to_owned(),
                ..VmDisk::default()
            });
        }
    }
    out
}

/// Whether a `security` node says the VM's state is encrypted or the VM is shielded.
fn encrypted(config: &VmcxValue) -> bool {
    fn any(v: &VmcxValue, in_security: bool) -> bool {
        v.children().iter().any(|(k, c)| {
            let lower = k.to_ascii_lowercase();
            let sec = in_security || lower == "security";
            (sec && (lower.contains("encrypt") || lower.contains("shield"))
                && c.bool() == Some(true))
                || any(c, sec)
        })
    }
    any(config, false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn not_a_vmcx_and_truncations_are_errors() {
        let err = VmcxFile::parse("x.vmcx", vec![0; 100]).unwrap_err();
        assert!(err.to_string().contains("not a Hyper-V"), "{err}");
        let mut header = vec![0u8; 0x3000];
        header[..4].copy_from_slice(&HEADER_SIGNATURE.to_le_bytes());
        header[10..14].copy_from_slice(&0x300u32.to_le_bytes());
        let err = VmcxFile::parse("x.vmcx", header.clone()).unwrap_err();
        assert!(err.to_string().contains("version 0x300"), "{err}");
        header[10..14].copy_from_slice(&VERSION.to_le_bytes());
        header[0x2000..0x2004].copy_from_slice(&OBJECT_TABLE_SIGNATURE.to_le_bytes());
        header[0x2004..0x2008].copy_from_slice(&u32::MAX.to_le_bytes());
        let err = VmcxFile::parse("x.vmcx", header).unwrap_err();
        assert!(err.to_string().contains("objects"), "{err}");
    }
}
