//! Partition tables: MBR (primary, extended and logical partitions), GPT (header and entry
//! CRCs, the backup when the primary is damaged), protective and hybrid MBRs. Every count,
//! offset and size is checked against the disk and a cap; what is wrong is a problem on the
//! table, never a panic.

use serde::Serialize;

use super::disk::DiskBytes;
use crate::error::Result;

/// GPT entries read at most (the usual table holds 128; 16384 is far beyond any real one).
const MAX_GPT_ENTRIES: u32 = 16384;
/// Logical partitions followed at most in an extended partition's chain.
const MAX_LOGICAL: usize = 128;
const SECTOR: u64 = 512;

/// A partition.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Partition {
    /// Its number as Linux counts (MBR: 1–4 primary, 5… logical; GPT: the entry's index + 1).
    pub number: u32,
    /// `primary`, `extended`, `logical` or `gpt`.
    pub kind: &'static str,
    /// The type: `0x83` for MBR, the type GUID for GPT.
    pub type_code: String,
    /// What that type means (`Linux filesystem`, `EFI system`, …), if known.
    pub type_name: String,
    /// The GPT partition name, if any.
    pub name: Option<String>,
    /// The GPT partition's unique GUID.
    pub guid: Option<String>,
    /// First byte.
    pub start: u64,
    /// Size in bytes.
    pub size: u64,
    /// The largest power of two (at most 1 MiB) its start is a multiple of.
    pub alignment: u64,
    /// MBR active (bootable) flag, or GPT legacy-BIOS-bootable attribute.
    pub bootable: bool,
}

/// The partition table of a disk.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[allow(clippy::struct_excessive_bools)] // what a table says, flag by flag
pub struct PartitionTable {
    /// `gpt`, `mbr` or `none`.
    pub scheme: &'static str,
    /// The GPT's disk GUID.
    pub disk_guid: Option<String>,
    /// The MBR is a GPT's protective MBR (one partition of type 0xEE).
    pub protective_mbr: bool,
    /// The MBR lists real partitions beside a GPT (a hybrid MBR).
    pub hybrid_mbr: bool,
    /// The first 440 bytes (the MBR's boot code) are not all zero.
    pub mbr_boot_code: bool,
    /// The GPT's backup copy was used (the primary is damaged).
    pub gpt_backup_used: bool,
    /// The partitions, in table order.
    pub partitions: Vec<Partition>,
    /// What is wrong with the table (damage, overlaps, partitions out of the disk).
    pub problems: Vec<String>,
}

impl PartitionTable {
    /// Whether a partition is typed EFI system (GPT type, or MBR type 0xEF).
    pub fn has_esp(&self) -> bool {
        self.partitions.iter().any(Partition::is_esp)
    }
}

impl Partition {
    /// Whether it is typed EFI system (GPT type, or MBR type 0xEF).
    pub fn is_esp(&self) -> bool {
        self.type_code == ESP_GUID || self.type_code == "0xef"
    }
}

fn le16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn le64(b: &[u8], at: usize) -> u64 {
    u64::from(le32(b, at)) | u64::from(le32(b, at + 4)) << 32
}

/// A GUID as its mixed-endian text (`C12A7328-F81F-11D2-BA4B-00A0C93EC93B`).
pub(crate) fn guid(b: &[u8]) -> String {
    format!(
        "{:08X}-{:04X}-{:04X}-{:02X}{:02X}-{}",
        le32(b, 0),
        le16(b, 4),
        le16(b, 6),
        b[8],
        b[9],
        crate::store::format::hex(&b[10..16]).to_ascii_uppercase()
    )
}

/// The EFI system partition's type GUID.
pub(crate) const ESP_GUID: &str = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B";
/// The BIOS boot partition's type GUID (GRUB on a GPT disk booted by BIOS).
pub(crate) const BIOS_BOOT_GUID: &str = "21686148-6449-6E6F-744E-656564454649";

fn gpt_type_name(g: &str) -> &'static str {
    match g {
        ESP_GUID => "EFI system",
        BIOS_BOOT_GUID => "BIOS boot",
        "0FC63DAF-8483-4772-8E79-3D69D8477DE4" => "Linux filesystem",
        "0657FD6D-A4AB-43C4-84E5-0933C84B4F4F" => "Linux swap",
        "E6D6D379-F507-44C2-A23C-238F2A3DF928" => "Linux LVM",
        "A19D880F-05FC-4D3B-A006-743F0F84911E" => "Linux RAID",
        "4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709" => "Linux root (x86-64)",
        "BC13C2FF-59E6-4262-A352-B275FD6F7172" => "Linux extended boot",
        "CA7D7CCB-63ED-4C53-861C-1742536059CC" => "Linux LUKS",
        "EBD0A0A2-B9E5-4433-87C0-68B6B72699C7" => "Microsoft basic data",
        "E3C9E316-0B5C-4DB8-817D-F92DF00215AE" => "Microsoft reserved",
        "DE94BBA4-06D1-4D40-A16A-BFD50179D6AC" => "Windows recovery",
        "5808C8AA-7E8F-42E0-85D2-E1E90434CFB3" => "Windows LDM metadata",
        "AF9B60A0-1431-4F62-BC68-3311714A69AD" => "Windows LDM data",
        _ => "",
    }
}

fn mbr_type_name(t: u8) -> &'static str {
    match t {
        0x01 => "FAT12",
        0x04 | 0x06 | 0x0e => "FAT16",
        0x05 | 0x0f | 0x85 => "Extended",
        0x07 => "NTFS/exFAT",
        0x0b | 0x0c => "FAT32",
        0x27 => "Windows recovery",
        0x82 => "Linux swap",
        0x83 => "Linux",
        0x8e => "Linux LVM",
        0xfd => "Linux RAID",
        0xee => "GPT protective",
        0xef => "EFI system",
        _ => "",
    }
}

fn alignment(start: u64) -> u64 {
    if start == 0 {
        return 1 << 20;
    }
    (1u64 << start.trailing_zeros().min(20)).min(1 << 20)
}

fn crc32(data: &[u8]) -> u32 {
    let mut c = flate2::Crc::new();
    c.update(data);
    c.sum()
}

/// Reads the partition table of `disk`.
///
/// # Errors
/// Only a read that fails (an unreadable image); damage is in [`PartitionTable::problems`].
pub(crate) fn read_table(disk: &dyn DiskBytes) -> Result<PartitionTable> {
    let size = disk.size();
    let mut t = PartitionTable {
        scheme: "none",
        ..PartitionTable::default()
    };
    if size < SECTOR {
        return Ok(t);
    }
    let mut mbr = vec![0u8; 512];
    disk.read_at(0, &mut mbr)?;
    t.mbr_boot_code = mbr[..440].iter().any(|&b| b != 0);
    let has_mbr = mbr[510..512] == [0x55, 0xaa];
    let entries: Vec<(u8, u8, u64, u64)> = if has_mbr {
        (0..4)
            .map(|i| {
                let e = &mbr[446 + i * 16..462 + i * 16];
                (e[0], e[4], u64::from(le32(e, 8)), u64::from(le32(e, 12)))
            })
            .collect()
    } else {
        Vec::new()
    };
    let protective = entries.iter().any(|e| e.1 == 0xee);
    if protective {
        t.protective_mbr = true;
        t.hybrid_mbr = entries.iter().any(|e| e.1 != 0 && e.1 != 0xee);
        if read_gpt(disk, &mut t) {
            check_layout(size, &mut t);
            return Ok(t);
        }
        // No usable GPT: fall back to what the MBR says.
        t.protective_mbr = false;
    } else if size >= 2 * SECTOR {
        // A GPT without a protective MBR is still a GPT (some tools write none).
        let mut head = vec![0u8; 8];
        disk.read_at(SECTOR, &mut head)?;
        if head == b"EFI PART" && read_gpt(disk, &mut t) {
            t.problems.push(
                "a GPT without a protective MBR (tools that only read MBRs see an empty disk)"
                    .into(),
            );
            check_layout(size, &mut t);
            return Ok(t);
        }
    }
    if !has_mbr || entries.iter().all(|e| e.1 == 0) {
        return Ok(t);
    }
    t.scheme = "mbr";
    for (i, &(flag, kind, lba, count)) in entries.iter().enumerate() {
        if kind == 0 {
            continue;
        }
        if flag != 0 && flag != 0x80 {
            t.problems.push(format!(
                "MBR entry {}: boot flag {flag:#04x} is neither 0 nor 0x80",
                i + 1
            ));
        }
        let extended = matches!(kind, 0x05 | 0x0f | 0x85);
        t.partitions.push(Partition {
            number: u32::try_from(i + 1).unwrap_or(0),
            kind: if extended { "extended" } else { "primary" },
            type_code: format!("{kind:#04x}"),
            type_name: mbr_type_name(kind).to_owned(),
            start: lba * SECTOR,
            size: count * SECTOR,
            alignment: alignment(lba * SECTOR),
            bootable: flag == 0x80,
            ..Partition::default()
        });
        if extended {
            logical(disk, lba, count, &mut t)?;
        }
    }
    check_layout(size, &mut t);
    Ok(t)
}

/// The logical partitions of an extended partition: a chain of EBRs, each naming the next
/// relative to the extended partition's start.
fn logical(
    disk: &dyn DiskBytes,
    ext_lba: u64,
    ext_count: u64,
    t: &mut PartitionTable,
) -> Result<()> {
    let mut next = 0u64;
    let mut seen = std::collections::HashSet::new();
    let mut number = 5u32;
    loop {
        let ebr_lba = ext_lba + next;
        if !seen.insert(ebr_lba) {
            t.problems.push(format!(
                "the extended partition's chain loops back to sector {ebr_lba}; logical partitions after it are left out"
            ));
            return Ok(());
        }
        if seen.len() > MAX_LOGICAL {
            t.problems.push(format!(
                "more than {MAX_LOGICAL} logical partitions; the rest are left out"
            ));
            return Ok(());
        }
        if next >= ext_count || (ebr_lba + 1) * SECTOR > disk.size() {
            t.problems.push(format!(
                "an extended boot record at sector {ebr_lba} lies outside the extended partition or the disk"
            ));
            return Ok(());
        }
        let mut ebr = vec![0u8; 512];
        disk.read_at(ebr_lba * SECTOR, &mut ebr)?;
        if ebr[510..512] != [0x55, 0xaa] {
            t.problems.push(format!(
                "the extended boot record at sector {ebr_lba} has no 0x55AA signature"
            ));
            return Ok(());
        }
        let (flag, kind, lba, count) = (
            ebr[446],
            ebr[450],
            u64::from(le32(&ebr, 454)),
            u64::from(le32(&ebr, 458)),
        );
        if kind != 0 && count != 0 {
            let start = (ebr_lba + lba) * SECTOR;
            t.partitions.push(Partition {
                number,
                kind: "logical",
                type_code: format!("{kind:#04x}"),
                type_name: mbr_type_name(kind).to_owned(),
                start,
                size: count * SECTOR,
                alignment: alignment(start),
                bootable: flag == 0x80,
                ..Partition::default()
            });
            number += 1;
        }
        let (link_kind, link_lba) = (ebr[466], u64::from(le32(&ebr, 470)));
        if link_kind == 0 || link_lba == 0 {
            return Ok(());
        }
        next = link_lba;
    }
}

/// Reads the GPT into `t`: the primary, else the backup; `false` when neither is valid.
fn read_gpt(disk: &dyn DiskBytes, t: &mut PartitionTable) -> bool {
    let last_lba = disk.size() / SECTOR - 1;
    let primary = gpt_header(disk, 1, last_lba);
    let (header, why_primary) = match primary {
        Ok(h) => (Some(h), None),
        Err(why) => (None, Some(why)),
    };
    let (header, backup) = match header {
        Some(h) => (h, false),
        None => match gpt_header(disk, last_lba, last_lba) {
            Ok(h) => (h, true),
            Err(why_backup) => {
                t.problems.push(format!(
                    "GPT: the primary header is damaged ({}) and so is the backup ({why_backup})",
                    why_primary.unwrap_or_default()
                ));
                return false;
            }
        },
    };
    t.scheme = "gpt";
    if backup {
        t.gpt_backup_used = true;
        t.problems.push(format!(
            "GPT: the primary header is damaged ({}); the backup header was used",
            why_primary.unwrap_or_default()
        ));
    }
    t.disk_guid = Some(guid(&header.raw[56..72]));
    for (i, e) in header.entries.chunks_exact(header.entry_size).enumerate() {
        if e[..16].iter().all(|&b| b == 0) {
            continue;
        }
        let first = le64(e, 32);
        let last = le64(e, 40);
        let type_code = guid(&e[..16]);
        let name_units: Vec<u16> = e[56..128]
            .chunks_exact(2)
            .map(|c| u16::from_le_bytes([c[0], c[1]]))
            .take_while(|&u| u != 0)
            .collect();
        let name = String::from_utf16_lossy(&name_units);
        let number = u32::try_from(i + 1).unwrap_or(u32::MAX);
        if last < first {
            t.problems.push(format!(
                "GPT partition {number} ends (LBA {last}) before it starts (LBA {first})"
            ));
            continue;
        }
        let start = first.saturating_mul(SECTOR);
        t.partitions.push(Partition {
            number,
            kind: "gpt",
            type_name: gpt_type_name(&type_code).to_owned(),
            type_code,
            name: (!name.is_empty()).then_some(name),
            guid: Some(guid(&e[16..32])),
            start,
            size: (last - first + 1).saturating_mul(SECTOR),
            alignment: alignment(start),
            bootable: le64(e, 48) & 0b100 != 0,
        });
    }
    true
}

struct GptHeader {
    raw: Vec<u8>,
    entries: Vec<u8>,
    entry_size: usize,
}

/// The GPT header at `lba` with its entry array, both CRCs checked.
fn gpt_header(
    disk: &dyn DiskBytes,
    lba: u64,
    last_lba: u64,
) -> std::result::Result<GptHeader, String> {
    let mut raw = vec![0u8; 512];
    disk.read_at(lba * SECTOR, &mut raw)
        .map_err(|e| e.to_string())?;
    if &raw[..8] != b"EFI PART" {
        return Err(format!("no \"EFI PART\" signature at LBA {lba}"));
    }
    let header_size = usize::try_from(le32(&raw, 12)).unwrap_or(0);
    if !(92..=512).contains(&header_size) {
        return Err(format!("header size {header_size} is not within 92..=512"));
    }
    let stored = le32(&raw, 16);
    let mut copy = raw[..header_size].to_vec();
    copy[16..20].fill(0);
    let computed = crc32(&copy);
    if stored != computed {
        return Err(format!(
            "header CRC {stored:#010x}, computed {computed:#010x} (the header at LBA {lba} is damaged)"
        ));
    }
    let entries_lba = le64(&raw, 72);
    let count = le32(&raw, 80);
    let entry_size = le32(&raw, 84);
    if count > MAX_GPT_ENTRIES {
        return Err(format!(
            "it claims {count} entries (at most {MAX_GPT_ENTRIES} are read)"
        ));
    }
    if !(128..=4096).contains(&entry_size) || !entry_size.is_power_of_two() {
        return Err(format!(
            "entry size {entry_size} is not a power of two in 128..=4096"
        ));
    }
    let bytes = u64::from(count) * u64::from(entry_size);
    let end_lba = entries_lba
        .checked_add(bytes.div_ceil(SECTOR))
        .filter(|&e| entries_lba >= 1 && e <= last_lba + 1)
        .ok_or_else(|| {
            format!("its entry array (LBA {entries_lba}, {bytes} bytes) lies outside the disk")
        })?;
    let _ = end_lba;
    let mut entries = vec![0u8; usize::try_from(bytes).map_err(|_| "too large".to_owned())?];
    disk.read_at(entries_lba * SECTOR, &mut entries)
        .map_err(|e| e.to_string())?;
    let stored = le32(&raw, 88);
    let computed = crc32(&entries);
    if stored != computed {
        return Err(format!(
            "entry array CRC {stored:#010x}, computed {computed:#010x} (the entries at LBA {entries_lba} are damaged)"
        ));
    }
    Ok(GptHeader {
        raw,
        entries,
        entry_size: usize::try_from(entry_size).unwrap_or(128),
    })
}

/// Partitions out of the disk, overlapping, or empty are problems; those out of the disk
/// are clipped (a file system is not looked for past the end).
fn check_layout(size: u64, t: &mut PartitionTable) {
    let mut problems = Vec::new();
    for p in &t.partitions {
        if p.size == 0 {
            problems.push(format!("partition {} is empty", p.number));
        } else if p.start.saturating_add(p.size) > size {
            problems.push(format!(
                "partition {} ({} bytes at {}) reaches past the disk's end ({size} bytes)",
                p.number, p.size, p.start
            ));
        }
    }
    let mut spans: Vec<&Partition> = t
        .partitions
        .iter()
        .filter(|p| p.kind != "extended" && p.size > 0)
        .collect();
    spans.sort_by_key(|p| p.start);
    for w in spans.windows(2) {
        if w[0].start + w[0].size > w[1].start {
            problems.push(format!(
                "partitions {} and {} overlap (at byte {})",
                w[0].number, w[1].number, w[1].start
            ));
        }
    }
    t.problems.extend(problems);
}

#[cfg(test)]
mod tests {
    use super::super::disk::MemBytes;
    use super::*;

    fn mbr(entries: &[(u8, u8, u32, u32)]) -> Vec<u8> {
        let mut d = vec![0u8; 16 << 20];
        for (i, &(flag, kind, lba, count)) in entries.iter().enumerate() {
            let e = &mut d[446 + i * 16..462 + i * 16];
            e[0] = flag;
            e[4] = kind;
            e[8..12].copy_from_slice(&lba.to_le_bytes());
            e[12..16].copy_from_slice(&count.to_le_bytes());
        }
        d[510] = 0x55;
        d[511] = 0xaa;
        d
    }

    #[test]
    fn mbr_overlaps_and_ranges_are_problems() {
        let d = mbr(&[
            (0x80, 0x83, 2048, 8192),
            (0, 0x83, 4096, 8192),
            (0, 0x07, 30000, 1 << 30),
        ]);
        let t = read_table(&MemBytes(d)).unwrap();
        assert_eq!(t.scheme, "mbr");
        assert_eq!(t.partitions.len(), 3);
        assert!(t.partitions[0].bootable && t.partitions[0].alignment == 1 << 20);
        assert!(
            t.problems.iter().any(|p| p.contains("overlap")),
            "{:?}",
            t.problems
        );
        assert!(
            t.problems.iter().any(|p| p.contains("past the disk's end")),
            "{:?}",
            t.problems
        );
    }

    #[test]
    fn extended_chains_that_loop_end() {
        let mut d = mbr(&[(0, 0x05, 2048, 20000)]);
        // EBR at 2048: a logical partition, and a link back to itself.
        let ebr = 2048 * 512;
        d[ebr + 450] = 0x83;
        d[ebr + 454..ebr + 458].copy_from_slice(&2048u32.to_le_bytes());
        d[ebr + 458..ebr + 462].copy_from_slice(&4096u32.to_le_bytes());
        d[ebr + 466] = 0x05;
        d[ebr + 470..ebr + 474].copy_from_slice(&0u32.to_le_bytes());
        d[ebr + 510] = 0x55;
        d[ebr + 511] = 0xaa;
        // A link of 0 ends the chain; make it point at itself through a non-zero offset.
        d[ebr + 470..ebr + 474].copy_from_slice(&1u32.to_le_bytes());
        let ebr2 = 2049 * 512;
        d[ebr2 + 466] = 0x05;
        d[ebr2 + 470..ebr2 + 474].copy_from_slice(&1u32.to_le_bytes());
        d[ebr2 + 510] = 0x55;
        d[ebr2 + 511] = 0xaa;
        let t = read_table(&MemBytes(d)).unwrap();
        assert_eq!(
            t.partitions.iter().filter(|p| p.kind == "logical").count(),
            1
        );
        assert!(
            t.problems.iter().any(|p| p.contains("loops")),
            "{:?}",
            t.problems
        );
    }

    #[test]
    fn gpt_with_huge_counts_or_bad_crcs_is_refused_clearly() {
        let mut d = mbr(&[(0, 0xee, 1, 0xffff_ffff)]);
        d[512..520].copy_from_slice(b"EFI PART");
        d[512 + 12..512 + 16].copy_from_slice(&92u32.to_le_bytes());
        d[512 + 72..512 + 80].copy_from_slice(&2u64.to_le_bytes());
        d[512 + 80..512 + 84].copy_from_slice(&u32::MAX.to_le_bytes());
        d[512 + 84..512 + 88].copy_from_slice(&128u32.to_le_bytes());
        let mut h = d[512..512 + 92].to_vec();
        h[16..20].fill(0);
        let crc = crc32(&h);
        d[512 + 16..512 + 20].copy_from_slice(&crc.to_le_bytes());
        let t = read_table(&MemBytes(d.clone())).unwrap();
        assert!(
            t.problems.iter().any(|p| p.contains("4294967295 entries")),
            "{:?}",
            t.problems
        );
        d[512 + 16] ^= 1;
        let t = read_table(&MemBytes(d)).unwrap();
        assert!(
            t.problems.iter().any(|p| p.contains("header CRC")),
            "{:?}",
            t.problems
        );
    }

    #[test]
    fn guids_read_mixed_endian() {
        let esp = [
            0x28, 0x73, 0x2a, 0xc1, 0x1f, 0xf8, 0xd2, 0x11, 0xba, 0x4b, 0x00, 0xa0, 0xc9, 0x3e,
            0xc9, 0x3b,
        ];
        assert_eq!(guid(&esp), ESP_GUID);
    }
}
