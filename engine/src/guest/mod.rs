//! Guest inspection, read-only, from an image (any format blockferry reads) or a snapshot
//! in a store: the partition table, each partition's file system or volume by signature,
//! the boot mode the disk supports, and the OS a file system holds.
//!
//! Nothing is mounted, written or locked in a source; a store's snapshot is read under a
//! reader lock (as the NBD server reads it). Damage is reported as problems, never a panic;
//! memory is bounded (a 4 MiB block cache, capped tables, cells read one at a time).

pub(crate) mod disk;
mod fs;
mod parts;
mod regf;

use std::path::Path;
use std::sync::Arc;

use serde::Serialize;

pub use fs::{FileSystem, GuestOs};
pub use parts::{Partition, PartitionTable};

use crate::error::Result;
use crate::image::{OpenOptions, open_with};
use crate::job::{CancelToken, Observer};
use crate::store::Store;
use disk::{DiskBytes, ImageBytes, SnapshotBytes, Window};

/// A partition (or the whole disk) and what it holds.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Volume {
    /// The partition's number, or `None` for the whole disk (no partition table).
    pub partition: Option<u32>,
    /// First byte on the disk.
    pub start: u64,
    /// Size in bytes.
    pub size: u64,
    /// The file system or volume found there, if any.
    pub filesystem: Option<FileSystem>,
}

/// The boot modes a disk supports.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct BootMode {
    /// `uefi`, `bios`, `both` or `none`.
    pub mode: &'static str,
    /// Why: the EFI system partition, the MBR's boot code and active partition, a BIOS boot
    /// partition.
    pub evidence: Vec<String>,
}

/// What a disk holds.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Inspection {
    /// What was inspected (the image's path, or the snapshot).
    pub disk: String,
    /// Its virtual size.
    pub virtual_size: u64,
    /// Its partition table.
    pub table: PartitionTable,
    /// Each partition (extended ones left out), or the whole disk, with what it holds.
    pub volumes: Vec<Volume>,
    /// The boot modes it supports.
    pub boot: BootMode,
    /// The operating systems found (each also under its volume).
    pub os: Vec<GuestOs>,
}

/// Inspects an image file (a chain, a descriptor, an OVA's disk as `opts` says).
///
/// # Errors
/// The image cannot be opened or read.
pub fn inspect_image(path: &Path, opts: &OpenOptions) -> Result<Inspection> {
    let src = open_with(path, opts)?;
    inspect(&(Arc::new(ImageBytes::new(src)) as Arc<dyn DiskBytes>))
}

/// Inspects a snapshot in a store (`ID`, `DISK@latest`, as `restore` takes it), read under a
/// reader lock so that a gc cannot take its chunks meanwhile.
///
/// # Errors
/// The snapshot cannot be found or read.
pub fn inspect_snapshot(
    store: &Arc<Store>,
    spec: &str,
    observer: &dyn Observer,
) -> Result<Inspection> {
    let _lock = crate::store::lock::reader_lock(store, "inspect", &CancelToken::new(), observer)?;
    inspect(&(Arc::new(SnapshotBytes::open(store.clone(), spec)?) as Arc<dyn DiskBytes>))
}

/// Inspects a disk held in memory (tests, fuzzing).
///
/// # Errors
/// As [`inspect_image`].
pub fn inspect_bytes(bytes: Vec<u8>) -> Result<Inspection> {
    inspect(&(Arc::new(disk::MemBytes(bytes)) as Arc<dyn DiskBytes>))
}

pub(crate) fn inspect(disk: &Arc<dyn DiskBytes>) -> Result<Inspection> {
    let size = disk.size();
    let table = parts::read_table(disk.as_ref())?;
    let spans: Vec<(Option<u32>, u64, u64)> = if table.scheme == "none" {
        vec![(None, 0, size)]
    } else {
        table
            .partitions
            .iter()
            .filter(|p| p.kind != "extended" && p.size > 0 && p.start < size)
            .map(|p| (Some(p.number), p.start, p.size.min(size - p.start)))
            .collect()
    };
    let mut volumes = Vec::new();
    for (partition, start, len) in spans {
        let w = Window::new(disk.clone(), start, len);
        let filesystem = fs::detect(&w).map(|mut f| {
            fs::find_os(&w, &mut f);
            f
        });
        volumes.push(Volume {
            partition,
            start,
            size: len,
            filesystem,
        });
    }
    let boot = boot_mode(&table, &volumes);
    let os = volumes
        .iter()
        .filter_map(|v| v.filesystem.as_ref()?.os.clone())
        .collect();
    Ok(Inspection {
        disk: disk.describe(),
        virtual_size: size,
        table,
        volumes,
        boot,
        os,
    })
}

/// UEFI needs an EFI system partition (GPT type, or MBR type 0xEF) with a FAT file system;
/// BIOS needs boot code in the MBR and, on an MBR disk, a partition to boot (active, or any
/// for boot loaders such as GRUB that ignore the flag), on a GPT disk a BIOS boot partition.
fn boot_mode(table: &PartitionTable, volumes: &[Volume]) -> BootMode {
    let mut evidence = Vec::new();
    let fs_of = |n: u32| {
        volumes
            .iter()
            .find(|v| v.partition == Some(n))
            .and_then(|v| v.filesystem.as_ref())
    };
    let mut uefi = false;
    for p in &table.partitions {
        if !p.is_esp() {
            continue;
        }
        match fs_of(p.number) {
            Some(f) if f.kind.starts_with("fat") => {
                uefi = true;
                evidence.push(format!("EFI system partition {} ({})", p.number, f.kind));
            }
            Some(f) => evidence.push(format!(
                "partition {} is typed EFI system but holds {}, not FAT",
                p.number, f.kind
            )),
            None => evidence.push(format!(
                "partition {} is typed EFI system but holds no file system",
                p.number
            )),
        }
    }
    let mut bios = false;
    if table.mbr_boot_code {
        match table.scheme {
            "mbr" => {
                bios = true;
                match table.partitions.iter().find(|p| p.bootable) {
                    Some(p) => evidence.push(format!(
                        "boot code in the MBR and active partition {}",
                        p.number
                    )),
                    None => {
                        evidence.push("boot code in the MBR (no partition is active)".to_owned());
                    }
                }
            }
            "gpt" => {
                if let Some(p) = table
                    .partitions
                    .iter()
                    .find(|p| p.type_code == parts::BIOS_BOOT_GUID)
                {
                    bios = true;
                    evidence.push(format!(
                        "boot code in the protective MBR and BIOS boot partition {}",
                        p.number
                    ));
                }
            }
            _ => {
                bios = true;
                evidence.push("boot code in the first sector (no partition table)".to_owned());
            }
        }
    }
    BootMode {
        mode: match (bios, uefi) {
            (true, true) => "both",
            (true, false) => "bios",
            (false, true) => "uefi",
            (false, false) => "none",
        },
        evidence,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Disks of every size up to two sectors, starting with each signature: an answer, never
    /// a panic (a signature check must not read past a short disk).
    #[test]
    fn tiny_disks_with_signatures_are_inspected() {
        let magics: [&[u8]; 6] = [
            b"LUKS\xba\xbe",
            b"XFSB",
            b"\xeb\x52\x90NTFS    ",
            b"\xeb\x52\x90-FVE-FS-",
            b"LABELONE",
            b"EFI PART",
        ];
        for magic in magics {
            for len in 0..1100 {
                let mut d = vec![0u8; len];
                let n = magic.len().min(len);
                d[..n].copy_from_slice(&magic[..n]);
                if len >= 512 {
                    d[510] = 0x55;
                    d[511] = 0xaa;
                }
                let found = inspect_bytes(d).unwrap();
                assert_eq!(found.virtual_size, u64::try_from(len).unwrap());
            }
        }
    }
}
