//! File systems and volumes by their signatures, and the OS a file system holds: Linux from
//! `/etc/os-release` (read through `ext4-view`, which follows its symbolic link to
//! `/usr/lib/os-release`), Windows from its NTFS layout (`Windows/System32`, through the
//! `ntfs` crate) and its version from the registry's SOFTWARE hive (`regf`).

use serde::Serialize;

use super::disk::Window;
use super::regf;

/// Largest `os-release` read.
const MAX_OS_RELEASE: u64 = 64 << 10;
/// Largest registry hive looked into (a SOFTWARE hive is tens to hundreds of MiB on a real
/// system; only the cells on the path to `CurrentVersion` are read).
const MAX_HIVE: u64 = 1 << 30;

/// A file system or volume found on a partition (or on the whole disk).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct FileSystem {
    /// `ext2`, `ext3`, `ext4`, `xfs`, `ntfs`, `fat12`, `fat16`, `fat32`, `swap`, `lvm2`,
    /// `luks1`, `luks2`, `bitlocker`.
    pub kind: String,
    /// Its label, if it has one.
    pub label: Option<String>,
    /// Its UUID (or volume serial), if it has one.
    pub uuid: Option<String>,
    /// Whether it is encrypted (LUKS, BitLocker): its contents cannot be inspected.
    pub encrypted: bool,
    /// The OS it holds, if it holds one.
    pub os: Option<GuestOs>,
    /// What could not be read in it.
    pub problem: Option<String>,
}

/// An operating system found in a file system.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct GuestOs {
    /// `linux` or `windows`.
    pub family: String,
    /// The distribution (`debian`, `rhel`, …) or `windows`.
    pub distro: Option<String>,
    /// Its name (`Debian GNU/Linux`, `Windows Server 2022 Datacenter`).
    pub name: Option<String>,
    /// Its version (`12`, `10.0.20348`).
    pub version: Option<String>,
    /// Its human name (`PRETTY_NAME`, or the product name).
    pub pretty_name: Option<String>,
    /// Where it was read from.
    pub source: String,
}

fn le16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn text(b: &[u8]) -> Option<String> {
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    let s = String::from_utf8_lossy(&b[..end]).trim().to_owned();
    (!s.is_empty()).then_some(s)
}

fn uuid(b: &[u8]) -> String {
    let h = crate::store::format::hex(b);
    format!(
        "{}-{}-{}-{}-{}",
        &h[..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

/// What file system or volume the window holds, by signature; `None` if none is known.
pub(crate) fn detect(w: &Window) -> Option<FileSystem> {
    let head = w.head(0, 8192).ok()?;
    let fs = |kind: &str| FileSystem {
        kind: kind.to_owned(),
        ..FileSystem::default()
    };
    if head.len() >= 8 && head[..6] == *b"LUKS\xba\xbe" {
        let version = le16(&head, 6).swap_bytes();
        let mut f = fs(if version == 2 { "luks2" } else { "luks1" });
        f.encrypted = true;
        f.uuid = head.get(168..208).and_then(text);
        f.label = (version == 2)
            .then(|| head.get(24..72).and_then(text))
            .flatten();
        return Some(f);
    }
    if head.len() >= 11 && &head[3..11] == b"-FVE-FS-" {
        let mut f = fs("bitlocker");
        f.encrypted = true;
        return Some(f);
    }
    if head.len() >= 4 && &head[..4] == b"XFSB" {
        let mut f = fs("xfs");
        f.uuid = head.get(32..48).map(uuid);
        f.label = head.get(108..120).and_then(text);
        return Some(f);
    }
    if head.len() >= 11 && &head[3..11] == b"NTFS    " {
        let mut f = fs("ntfs");
        f.uuid = head.get(72..80).map(|s| {
            let mut serial = s.to_vec();
            serial.reverse();
            crate::store::format::hex(&serial).to_ascii_uppercase()
        });
        return Some(f);
    }
    // LVM2 physical volume: a label in one of the first four sectors.
    for s in 0..4 {
        let at = s * 512;
        if head.len() >= at + 32
            && &head[at..at + 8] == b"LABELONE"
            && &head[at + 24..at + 32] == b"LVM2 001"
        {
            let mut f = fs("lvm2");
            let pv = le32(&head, at + 20) as usize + at;
            f.uuid = head.get(pv..pv + 32).and_then(text);
            return Some(f);
        }
    }
    if head.len() >= 1024 + 0x78 && le16(&head, 1024 + 0x38) == 0xef53 {
        let sb = &head[1024..];
        let compat = le32(sb, 0x5c);
        let incompat = le32(sb, 0x60);
        let ro_compat = le32(sb, 0x64);
        // ext4: extents, 64-bit, flex_bg or huge files; ext3: a journal.
        let kind = if incompat & (0x40 | 0x80 | 0x200) != 0 || ro_compat & 0x8 != 0 {
            "ext4"
        } else if compat & 0x4 != 0 {
            "ext3"
        } else {
            "ext2"
        };
        let mut f = fs(kind);
        f.uuid = Some(uuid(&sb[0x68..0x78]));
        f.label = sb.get(0x78..0x88).and_then(text);
        return Some(f);
    }
    if head.len() >= 4096 && &head[4086..4096] == b"SWAPSPACE2" {
        let mut f = fs("swap");
        f.uuid = head.get(1036..1052).map(uuid);
        f.label = head.get(1052..1068).and_then(text);
        return Some(f);
    }
    if head.len() >= 512 && head[510..512] == [0x55, 0xaa] {
        if &head[82..87] == b"FAT32" {
            let mut f = fs("fat32");
            f.label = text(&head[71..82]).filter(|l| l != "NO NAME");
            f.uuid = Some(format!("{:04X}-{:04X}", le16(&head, 69), le16(&head, 67)));
            return Some(f);
        }
        if &head[54..59] == b"FAT12" || &head[54..59] == b"FAT16" {
            let mut f = fs(if &head[54..59] == b"FAT12" {
                "fat12"
            } else {
                "fat16"
            });
            f.label = text(&head[43..54]).filter(|l| l != "NO NAME");
            f.uuid = Some(format!("{:04X}-{:04X}", le16(&head, 41), le16(&head, 39)));
            return Some(f);
        }
    }
    None
}

/// Looks for an OS in the file system (ext2/3/4: `/etc/os-release`; NTFS: Windows).
pub(crate) fn find_os(w: &Window, f: &mut FileSystem) {
    let found = match f.kind.as_str() {
        "ext2" | "ext3" | "ext4" => linux(w),
        // The `ntfs` crate turns some errors of its parser into a panic (a short read inside
        // a structure reaches an `unreachable!`): it reads through a window padded with
        // zeros, so our side never fails a read, and a panic left is caught and reported as
        // a problem of this file system, never let out of the inspection.
        "ntfs" => std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| windows(w)))
            .unwrap_or_else(|_| Err("the NTFS reader stopped on damaged structures".to_owned())),
        _ => return,
    };
    match found {
        Ok(os) => f.os = os,
        Err(why) => f.problem = Some(why),
    }
}

fn linux(w: &Window) -> Result<Option<GuestOs>, String> {
    let fs = ext4_view::Ext4::load(Box::new(w.clone()))
        .map_err(|e| format!("the ext file system cannot be read: {e}"))?;
    for path in ["/etc/os-release", "/usr/lib/os-release"] {
        let meta = match fs.metadata(path) {
            Ok(m) => m,
            Err(ext4_view::Ext4Error::NotFound) => continue,
            Err(e) => return Err(format!("{path}: {e}")),
        };
        if meta.len() > MAX_OS_RELEASE {
            return Err(format!(
                "{path} is {} bytes: not an os-release file",
                meta.len()
            ));
        }
        let text = fs.read(path).map_err(|e| format!("{path}: {e}"))?;
        return Ok(Some(os_release(&String::from_utf8_lossy(&text), path)));
    }
    Ok(None)
}

/// The fields of an `os-release` file (shell-style `KEY="value"` lines).
fn os_release(text: &str, path: &str) -> GuestOs {
    let mut os = GuestOs {
        family: "linux".to_owned(),
        source: path.to_owned(),
        ..GuestOs::default()
    };
    for line in text.lines() {
        let Some((k, v)) = line.split_once('=') else {
            continue;
        };
        let v = v.trim();
        let v = v
            .strip_prefix('"')
            .and_then(|x| x.strip_suffix('"'))
            .or_else(|| v.strip_prefix('\'').and_then(|x| x.strip_suffix('\'')))
            .unwrap_or(v)
            .to_owned();
        match k.trim() {
            "ID" => os.distro = Some(v),
            "NAME" => os.name = Some(v),
            "VERSION_ID" => os.version = Some(v),
            "PRETTY_NAME" => os.pretty_name = Some(v),
            _ => {}
        }
    }
    os
}

fn windows(w: &Window) -> Result<Option<GuestOs>, String> {
    let mut r = w.padded();
    let mut ntfs =
        ntfs::Ntfs::new(&mut r).map_err(|e| format!("the NTFS file system cannot be read: {e}"))?;
    ntfs.read_upcase_table(&mut r)
        .map_err(|e| format!("the NTFS upcase table cannot be read: {e}"))?;
    let root = ntfs
        .root_directory(&mut r)
        .map_err(|e| format!("the NTFS root folder cannot be read: {e}"))?;
    let Some(windows) = child(&ntfs, &mut r, &root, "Windows")? else {
        return Ok(None);
    };
    let Some(system32) = child(&ntfs, &mut r, &windows, "System32")? else {
        return Ok(None);
    };
    let mut os = GuestOs {
        family: "windows".to_owned(),
        distro: Some("windows".to_owned()),
        source: "Windows/System32".to_owned(),
        ..GuestOs::default()
    };
    // The version from the SOFTWARE hive, when there is one.
    let hive = child(&ntfs, &mut r, &system32, "config")?
        .map(|config| child(&ntfs, &mut r, &config, "SOFTWARE"))
        .transpose()?
        .flatten();
    if let Some(hive) = hive {
        let data = hive
            .data(&mut r, "")
            .ok_or_else(|| "Windows/System32/config/SOFTWARE has no data".to_owned())?
            .map_err(|e| format!("Windows/System32/config/SOFTWARE: {e}"))?;
        let attr = data
            .to_attribute()
            .map_err(|e| format!("Windows/System32/config/SOFTWARE: {e}"))?;
        let len = attr.value_length();
        if len > MAX_HIVE {
            return Err(format!(
                "Windows/System32/config/SOFTWARE is {len} bytes: too large"
            ));
        }
        let value = attr
            .value(&mut r)
            .map_err(|e| format!("Windows/System32/config/SOFTWARE: {e}"))?;
        match regf::current_version(value.attach(&mut r)) {
            Ok(v) => {
                os.name.clone_from(&v.product_name);
                os.pretty_name = v.product_name;
                os.version = v.version;
                "Windows/System32/config/SOFTWARE".clone_into(&mut os.source);
            }
            Err(why) => return Err(format!("Windows/System32/config/SOFTWARE: {why}")),
        }
    }
    Ok(Some(os))
}

/// The entry `name` of directory `dir` (case-insensitive, as NTFS compares), if any.
fn child<'n>(
    ntfs: &'n ntfs::Ntfs,
    r: &mut Window,
    dir: &ntfs::NtfsFile<'n>,
    name: &str,
) -> Result<Option<ntfs::NtfsFile<'n>>, String> {
    let index = dir
        .directory_index(r)
        .map_err(|e| format!("an NTFS folder cannot be read: {e}"))?;
    let mut finder = index.finder();
    match ntfs::indexes::NtfsFileNameIndex::find(&mut finder, ntfs, r, name) {
        None => Ok(None),
        Some(Err(e)) => Err(format!("looking up {name:?}: {e}")),
        Some(Ok(entry)) => entry
            .to_file(ntfs, r)
            .map(Some)
            .map_err(|e| format!("opening {name:?}: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn os_release_fields() {
        let os = os_release(
            "PRETTY_NAME=\"Debian GNU/Linux 12 (bookworm)\"\nNAME=\"Debian GNU/Linux\"\nVERSION_ID=\"12\"\nID=debian\n",
            "/etc/os-release",
        );
        assert_eq!(os.distro.as_deref(), Some("debian"));
        assert_eq!(os.version.as_deref(), Some("12"));
        assert_eq!(
            os.pretty_name.as_deref(),
            Some("Debian GNU/Linux 12 (bookworm)")
        );
    }
}
