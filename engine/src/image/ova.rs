//! OVA: a tar archive of an OVF descriptor and its disks, read in place (never extracted).
//!
//! The tar's members are located by walking its 512-byte headers; the OVF (XML) names the
//! disks (`<Disk ovf:fileRef=…>` → `<File ovf:href=…>`); the chosen disk, almost always a
//! streamOptimized VMDK, is read through a window onto the archive.

pub use super::ovf::OvfDisk;
use super::ovf::{Envelope, parse_envelope};
use super::util::{ReadAt, invalid, read_struct};
use super::{BlockSource, OpenOptions, Vmdk};
use crate::error::{Error, ErrorKind, Result};
use crate::io::SourceFile;

const BLOCK: u64 = 512;
/// Most tar members walked.
const MAX_MEMBERS: usize = 10_000;
/// Largest OVF descriptor read.
const MAX_OVF: u64 = 16 << 20;
/// Largest pax extended header read (they hold a few records: a path, a size, times).
const MAX_PAX: u64 = 64 << 10;

/// A member of the archive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TarMember {
    /// Its name.
    pub name: String,
    /// Offset of its data in the archive.
    pub offset: u64,
    /// Its size.
    pub size: u64,
}

/// Whether a file is a tar archive (ustar magic at 257).
pub fn is_tar(head: &[u8]) -> bool {
    head.len() >= 263 && &head[257..262] == b"ustar"
}

fn octal(field: &[u8]) -> Option<u64> {
    if field.first().is_some_and(|b| b & 0x80 != 0) {
        // GNU base-256 for large sizes.
        return field[1..]
            .iter()
            .try_fold(u64::from(field[0] & 0x7f), |acc, &b| {
                acc.checked_mul(256)?.checked_add(u64::from(b))
            });
    }
    let text: String = field
        .iter()
        .take_while(|&&b| b != 0 && b != b' ')
        .map(|&b| b as char)
        .collect();
    let text = text.trim();
    if text.is_empty() {
        return Some(0);
    }
    u64::from_str_radix(text, 8).ok()
}

fn cstr(field: &[u8]) -> String {
    String::from_utf8_lossy(field.split(|&b| b == 0).next().unwrap_or_default()).into_owned()
}

/// What pax extended headers (POSIX.1-2001) say of the next member (`x`) or of all that
/// follow (`g`): the records blockferry uses.
#[derive(Debug, Clone, Default)]
struct Pax {
    path: Option<String>,
    size: Option<u64>,
}

impl Pax {
    /// Parses `"<length> <key>=<value>\n"` records.
    fn parse(raw: &[u8]) -> std::result::Result<Pax, String> {
        let mut pax = Pax::default();
        let mut rest = raw;
        // A header padded with NULs ends at the first one.
        while let Some(&first) = rest.first() {
            if first == 0 {
                break;
            }
            let space = rest
                .iter()
                .position(|&b| b == b' ')
                .filter(|&i| i > 0 && i <= 20)
                .ok_or("a record without its length")?;
            let len: usize = std::str::from_utf8(&rest[..space])
                .ok()
                .and_then(|t| t.parse().ok())
                .filter(|&l| l > space + 1 && l <= rest.len())
                .ok_or("a record length that is not a number within the header")?;
            let record = &rest[space + 1..len];
            let record = record
                .strip_suffix(b"\n")
                .ok_or("a record not ending in a newline")?;
            let eq = record
                .iter()
                .position(|&b| b == b'=')
                .ok_or("a record without '='")?;
            let (key, value) = (&record[..eq], &record[eq + 1..]);
            match key {
                b"path" => {
                    pax.path = Some(
                        String::from_utf8(value.to_vec())
                            .map_err(|_| "a path that is not UTF-8")?,
                    );
                }
                b"size" => {
                    pax.size = Some(
                        std::str::from_utf8(value)
                            .ok()
                            .and_then(|v| v.parse().ok())
                            .ok_or("a size that is not a number")?,
                    );
                }
                _ => {}
            }
            rest = &rest[len..];
        }
        Ok(pax)
    }

    /// `self` with what `next` sets taken over.
    fn merged(&self, next: &Pax) -> Pax {
        Pax {
            path: next.path.clone().or_else(|| self.path.clone()),
            size: next.size.or(self.size),
        }
    }
}

/// Lists the regular-file members of a tar archive (ustar, with GNU long names and pax
/// extended headers: the `path` and `size` records of `x` and `g` headers).
pub fn tar_members(r: &dyn ReadAt) -> Result<Vec<TarMember>> {
    let mut out = Vec::new();
    let mut at = 0u64;
    let mut long_name: Option<String> = None;
    let mut global = Pax::default();
    let mut next = Pax::default();
    while at + BLOCK <= r.size() {
        let h = read_struct(r, "tar header", at, BLOCK, BLOCK)?;
        if h.iter().all(|&b| b == 0) {
            break;
        }
        let sum: u64 = h
            .iter()
            .enumerate()
            .map(|(i, &b)| {
                if (148..156).contains(&i) {
                    32
                } else {
                    u64::from(b)
                }
            })
            .sum();
        if octal(&h[148..156]) != Some(sum) {
            return Err(invalid(r, "tar header", at, "checksum mismatch"));
        }
        let kind = h[156];
        let ustar_size = octal(&h[124..136])
            .ok_or_else(|| invalid(r, "tar header", at + 124, "size is not a number"))?;
        // A member's pax size overrides its header's (which is 0, or wrong, from 8 GiB on);
        // an extended header's own size is its header's.
        let pax = global.merged(&next);
        let size = match kind {
            b'x' | b'g' => ustar_size,
            _ => pax.size.unwrap_or(ustar_size),
        };
        let data = at + BLOCK;
        let end = data
            .checked_add(size)
            .filter(|&e| e <= r.size())
            .ok_or_else(|| {
                invalid(
                    r,
                    "tar header",
                    at + 124,
                    format!("a member of {size} bytes reaches past the end of the archive"),
                )
            })?;
        match kind {
            b'L' => {
                let name = read_struct(r, "tar long name", data, size, 4096)?;
                long_name = Some(cstr(&name));
            }
            b'x' | b'g' => {
                let raw = read_struct(r, "tar pax header", data, size, MAX_PAX)?;
                let parsed =
                    Pax::parse(&raw).map_err(|why| invalid(r, "tar pax header", data, why))?;
                if kind == b'x' {
                    next = next.merged(&parsed);
                } else {
                    global = global.merged(&parsed);
                }
            }
            b'0' | 0 => {
                let mut name = cstr(&h[..100]);
                let prefix = cstr(&h[345..500]);
                if !prefix.is_empty() {
                    name = format!("{prefix}/{name}");
                }
                if out.len() >= MAX_MEMBERS {
                    return Err(invalid(
                        r,
                        "tar archive",
                        at,
                        format!("more than {MAX_MEMBERS} members"),
                    ));
                }
                out.push(TarMember {
                    name: pax.path.or(long_name.take()).unwrap_or(name),
                    offset: data,
                    size,
                });
                next = Pax::default();
            }
            _ => {
                long_name = None;
                next = Pax::default();
            }
        }
        at = end.next_multiple_of(BLOCK);
    }
    Ok(out)
}

/// Parses an OVF descriptor's disk list (`DiskSection`), in order.
///
/// # Errors
/// As [`parse_envelope`].
pub fn parse_ovf(xml: &[u8]) -> std::result::Result<Vec<OvfDisk>, String> {
    parse_envelope(xml).map(|e| e.disks)
}

/// The disks an OVA's descriptor lists, in order (what `ova_disk` indexes).
pub fn disks(file: &SourceFile) -> Result<Vec<OvfDisk>> {
    Ok(contents(file)?.2)
}

/// An OVA's whole OVF descriptor (its virtual systems too), read in place.
pub fn envelope(file: &dyn ReadAt) -> Result<Envelope> {
    let members = tar_members(file)?;
    let ovf = descriptor(file, &members)?;
    let xml = read_struct(file, "OVF descriptor", ovf.offset, ovf.size, MAX_OVF)?;
    parse_envelope(&xml).map_err(|why| invalid(file, "OVF descriptor", ovf.offset, why))
}

/// The archive's `.ovf` member.
fn descriptor(file: &dyn ReadAt, members: &[TarMember]) -> Result<TarMember> {
    members
        .iter()
        .find(|m| m.name.to_ascii_lowercase().ends_with(".ovf"))
        .cloned()
        .ok_or_else(|| {
            Error::new(
                ErrorKind::InvalidImage,
                "the archive holds no .ovf descriptor: not an OVA",
            )
            .with_path(file.path())
        })
}

/// The archive's members, its OVF descriptor member and the disks that lists.
fn contents(file: &SourceFile) -> Result<(Vec<TarMember>, TarMember, Vec<OvfDisk>)> {
    let members = tar_members(file)?;
    let ovf = descriptor(file, &members)?;
    let xml = read_struct(file, "OVF descriptor", ovf.offset, ovf.size, MAX_OVF)?;
    let disks = parse_ovf(&xml).map_err(|why| invalid(file, "OVF descriptor", ovf.offset, why))?;
    if disks.is_empty() {
        return Err(invalid(
            file,
            "OVF descriptor",
            ovf.offset,
            "it lists no disks",
        ));
    }
    Ok((members, ovf, disks))
}

/// Opens disk `which` (index from 0, or file name; default the first) of an OVA.
pub fn open(
    file: SourceFile,
    which: Option<&str>,
    opts: &OpenOptions,
) -> Result<Box<dyn BlockSource>> {
    let (members, ovf, disks) = contents(&file)?;
    let idx = match which {
        None => 0,
        Some(w) => match w.parse::<usize>() {
            Ok(i) if i < disks.len() => i,
            _ => disks
                .iter()
                .position(|d| d.file == w || d.id == w)
                .ok_or_else(|| {
                    Error::config(format!(
                        "the OVA has no disk {w:?}; its disks: {}",
                        disks
                            .iter()
                            .map(|d| d.file.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ))
                })?,
        },
    };
    let disk = &disks[idx];
    let member = members
        .iter()
        .find(|m| m.name == disk.file)
        .ok_or_else(|| {
            invalid(
                &file,
                "OVA",
                ovf.offset,
                format!(
                    "the OVF names disk file {:?}, which the archive does not hold",
                    disk.file
                ),
            )
        })?;
    let mut vmdk = Vmdk::open_window(file, member.offset, member.size, opts)?;
    vmdk.set_member(&disk.file);
    vmdk.add_note(format!(
        "OVA disk {idx} (counted from 0) of {} ({}); the OVF lists: {}",
        disks.len(),
        disk.file,
        disks
            .iter()
            .map(|d| format!(
                "{} ({}, {})",
                d.file,
                d.id,
                d.capacity
                    .map_or_else(|| "size unknown".to_owned(), |c| format!("{c} bytes"))
            ))
            .collect::<Vec<_>>()
            .join("; ")
    ));
    Ok(Box::new(vmdk))
}
