//! Virtual machines: their configurations read in place (VMware `.vmx` with its `.vmsd`
//! snapshot tree, OVF standalone or inside an OVA, Hyper-V `.vmcx`), each VM's disks
//! resolved to the image files discovery finds, with their chains.
//!
//! Agentless and read-only: a configuration is read, never written or locked; a file that
//! cannot be read is an entry with its error, and the rest of the listing goes on.

mod ovf_vm;
pub(crate) mod vmcx;
mod vmx;

use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::error::{Error, Result};
use crate::image::OpenOptions;
use crate::image::discover::{self, Found};

pub use vmcx::{VmcxFile, VmcxValue};

/// The key/value pairs of a `.vmx` or `.vmsd` text (keys in lower case), for the fuzz
/// targets.
///
/// # Errors
/// A line longer than VMware's configurations have.
pub fn vmx_pairs(text: &str) -> Result<std::collections::HashMap<String, String>> {
    vmx::parse(text, Path::new("fuzz.vmx"), "VMware configuration")
}

/// Which kind of configuration describes a VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ConfigKind {
    /// VMware `.vmx` (text key/value pairs).
    Vmx,
    /// A standalone OVF descriptor.
    Ovf,
    /// An OVA's OVF descriptor.
    Ova,
    /// Hyper-V `.vmcx` (binary key/value store).
    Vmcx,
}

/// A VM's firmware as its configuration sets it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum VmFirmware {
    /// Legacy BIOS.
    Bios,
    /// UEFI.
    Efi,
}

/// A network adapter.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Nic {
    /// Its name in the configuration (`ethernet0`, the OVF item's name, the Hyper-V
    /// adapter's name).
    pub name: String,
    /// The adapter type (`vmxnet3`, `e1000e`, `synthetic`, `legacy`, …).
    pub kind: Option<String>,
    /// Its MAC address (as `aa:bb:cc:dd:ee:ff`), when the configuration has one.
    pub mac: Option<String>,
    /// Whether the MAC is static (set by hand) rather than generated.
    pub mac_static: Option<bool>,
    /// The network (port group, switch) it connects to.
    pub network: Option<String>,
    /// Whether it is connected at power on.
    pub connected: Option<bool>,
}

/// A disk of a VM: where it is attached and which image chain is behind it.
#[derive(Debug, Clone, Default, Serialize)]
pub struct VmDisk {
    /// The controller (`scsi0`, `sata0`, `ide1`, `nvme0`, the OVF controller's name).
    pub controller: String,
    /// The controller's type (`pvscsi`, `lsilogic`, `ahci`, `ide`, `nvme`, …).
    pub controller_type: Option<String>,
    /// The slot (`scsi0:1`, `ide0:0`).
    pub slot: String,
    /// The file as the configuration names it.
    pub configured_path: String,
    /// The image file it resolves to under the discovered folder.
    pub path: Option<PathBuf>,
    /// For a disk in an OVA, its index among the OVA's disks (as `--ova-disk` takes it).
    pub ova_disk: Option<usize>,
    /// The capacity the configuration states, if any (OVF).
    pub capacity: Option<u64>,
    /// The image's format (`vmdk`, `vhdx`, …) when resolved.
    pub format: Option<&'static str>,
    /// The image's virtual size when resolved.
    pub virtual_size: Option<u64>,
    /// Bytes allocated in its whole chain, when resolved.
    pub allocated_bytes: Option<u64>,
    /// The chain's files, top first, when resolved.
    pub chain: Vec<PathBuf>,
    /// Why it could not be resolved or opened.
    pub problem: Option<String>,
}

/// A snapshot of a VM as its configuration records it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct VmSnapshot {
    /// Its id (`uid` in a `.vmsd`).
    pub id: String,
    /// Its display name.
    pub name: String,
    /// The id of the snapshot it was taken on, if any.
    pub parent: Option<String>,
    /// Whether the VM runs on it (the current snapshot).
    pub current: bool,
    /// The disk files it froze.
    pub disks: Vec<String>,
}

/// A virtual machine found under a folder.
#[derive(Debug, Default, Serialize)]
pub struct Vm {
    /// The configuration file.
    pub config: PathBuf,
    /// Its kind.
    pub kind: Option<ConfigKind>,
    /// For an OVF/OVA with several virtual systems, which one (its `ovf:id`).
    pub system: Option<String>,
    /// The VM's name.
    pub name: Option<String>,
    /// Its id or UUID (BIOS UUID for VMware, the global id for Hyper-V).
    pub id: Option<String>,
    /// Virtual CPUs.
    pub cpus: Option<u32>,
    /// Memory in bytes.
    pub memory_bytes: Option<u64>,
    /// Firmware.
    pub firmware: Option<VmFirmware>,
    /// Whether UEFI secure boot is on.
    pub secure_boot: Option<bool>,
    /// The guest OS as configured (VMware `guestOS`, the OVF OS section).
    pub guest_os: Option<String>,
    /// Whether the configuration says the VM is encrypted (its devices are then unreadable
    /// without the key).
    pub encrypted: bool,
    /// Network adapters.
    pub nics: Vec<Nic>,
    /// Disks.
    pub disks: Vec<VmDisk>,
    /// Snapshots.
    pub snapshots: Vec<VmSnapshot>,
    /// What could be read only in part (a snapshot tree with a loop, a disk not found).
    pub warnings: Vec<String>,
    /// Why the configuration could not be read at all.
    #[serde(serialize_with = "error_json")]
    pub error: Option<Error>,
}

/// What discovery finds under a folder: the image files and the VMs.
#[derive(Debug, Serialize)]
pub struct Discovery {
    /// Every image file (see [`discover::discover`]).
    pub images: Vec<Found>,
    /// Every VM configuration.
    pub vms: Vec<Vm>,
}

/// An error as `{"kind","message"}`, as [`Found`] shows its own.
#[allow(clippy::ref_option)]
fn error_json<S: serde::Serializer>(
    e: &Option<Error>,
    s: S,
) -> std::result::Result<S::Ok, S::Error> {
    #[derive(Serialize)]
    struct ErrorJson {
        kind: String,
        message: String,
    }
    e.as_ref()
        .map(|e| ErrorJson {
            kind: format!("{:?}", e.kind()),
            message: e.to_string(),
        })
        .serialize(s)
}

/// File name endings of VM configurations (compared in lower case).
const CONFIG_EXTENSIONS: [&str; 3] = ["vmx", "ovf", "vmcx"];
/// Largest configuration file read (`.vmx`, `.vmsd`, `.ovf`).
const MAX_TEXT_CONFIG: u64 = 16 << 20;

/// Finds the image files and the VMs under `folder`.
///
/// Fails only when `folder` cannot be listed; an unreadable configuration is a [`Vm`] with
/// its error, an unreadable image a [`Found`] with its own.
pub fn discover_all(folder: &Path, opts: &OpenOptions) -> Result<Discovery> {
    let images = discover::discover(folder, opts)?;
    let mut configs = discover::files_with(folder, &CONFIG_EXTENSIONS)?;
    configs.sort();
    let mut vms = Vec::new();
    for path in configs {
        let ext = path
            .extension()
            .and_then(|e| e.to_str())
            .map(str::to_ascii_lowercase)
            .unwrap_or_default();
        let found = match ext.as_str() {
            "vmx" => vmx::read(&path).map(|vm| vec![vm]),
            "ovf" => ovf_vm::read_ovf(&path),
            _ => vmcx::read_vm(&path).map(|vm| vm.into_iter().collect()),
        };
        match found {
            Ok(list) => vms.extend(list),
            Err(e) => vms.push(Vm {
                config: path,
                kind: Some(match ext.as_str() {
                    "vmx" => ConfigKind::Vmx,
                    "ovf" => ConfigKind::Ovf,
                    _ => ConfigKind::Vmcx,
                }),
                error: Some(e),
                ..Vm::default()
            }),
        }
    }
    // An OVA is a VM as well as its disks.
    let mut ovas: Vec<&Path> = images
        .iter()
        .filter(|f| f.ova_disk.is_some() || discover::is_ova(&f.path))
        .map(|f| f.path.as_path())
        .collect();
    ovas.dedup();
    for path in ovas {
        match ovf_vm::read_ova(path) {
            Ok(list) => vms.extend(list),
            Err(e) => vms.push(Vm {
                config: path.to_path_buf(),
                kind: Some(ConfigKind::Ova),
                error: Some(e),
                ..Vm::default()
            }),
        }
    }
    for vm in &mut vms {
        resolve_disks(vm, &images);
    }
    vms.sort_by(|a, b| a.config.cmp(&b.config).then(a.system.cmp(&b.system)));
    Ok(Discovery { images, vms })
}

/// Points each disk of `vm` at the discovered image it names, with that image's chain.
fn resolve_disks(vm: &mut Vm, images: &[Found]) {
    for d in &mut vm.disks {
        let hit = match (&d.path, d.ova_disk) {
            (Some(p), ova) => {
                let want = canonical(p);
                images
                    .iter()
                    .find(|f| f.ova_disk == ova && canonical(&f.path) == want)
            }
            (None, _) => by_suffix(&d.configured_path, images),
        };
        let Some(f) = hit else {
            if d.problem.is_none() {
                d.problem = Some(format!(
                    "{:?} is not among the images found under the folder",
                    d.configured_path
                ));
            }
            continue;
        };
        d.path = Some(f.path.clone());
        d.ova_disk = f.ova_disk;
        if let Some(e) = &f.error {
            d.problem = Some(format!("the image cannot be read: {e}"));
            continue;
        }
        d.format = Some(f.format);
        d.virtual_size = Some(f.virtual_size);
        d.allocated_bytes = Some(f.allocated_bytes);
        d.chain = f.chain.iter().map(|l| l.path.clone()).collect();
        d.problem = None;
    }
}

/// The image whose path ends with the most components of a path written on another host
/// (`C:\VMs\Disks\a.vhdx`, `/vmfs/volumes/ds1/vm/a.vmdk`), compared without case: at least
/// the file name must match, and a longer match wins.
fn by_suffix<'a>(configured: &str, images: &'a [Found]) -> Option<&'a Found> {
    let want: Vec<String> = configured
        .split(['\\', '/'])
        .filter(|c| !c.is_empty())
        .map(str::to_lowercase)
        .collect();
    images
        .iter()
        .filter(|f| f.ova_disk.is_none())
        .filter_map(|f| {
            let have: Vec<String> = f
                .path
                .components()
                .map(|c| c.as_os_str().to_string_lossy().to_lowercase())
                .collect();
            let n = want
                .iter()
                .rev()
                .zip(have.iter().rev())
                .take_while(|(a, b)| a == b)
                .count();
            (n > 0).then_some((n, f))
        })
        .max_by_key(|(n, _)| *n)
        .map(|(_, f)| f)
}

fn canonical(path: &Path) -> PathBuf {
    std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf())
}

/// A MAC address as six lower-case pairs joined by `:` (from `-`, `:` or bare hex), or
/// `None` when it is not one.
fn normal_mac(raw: &str) -> Option<String> {
    let hex: String = raw
        .chars()
        .filter(|c| !matches!(c, ':' | '-' | '.'))
        .collect();
    if hex.len() != 12 || !hex.chars().all(|c| c.is_ascii_hexdigit()) {
        return None;
    }
    let lower = hex.to_ascii_lowercase();
    let pairs: Vec<&str> = (0..6).map(|i| &lower[2 * i..2 * i + 2]).collect();
    Some(pairs.join(":"))
}

/// Reads a text configuration whole, with a cap.
fn read_text(path: &Path, what: &str) -> Result<String> {
    use std::io::Read;
    let f = std::fs::File::open(path)
        .map_err(|e| Error::io(format!("cannot open the {what}"), path, e))?;
    let mut bytes = Vec::new();
    f.take(MAX_TEXT_CONFIG + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| Error::io(format!("cannot read the {what}"), path, e))?;
    if u64::try_from(bytes.len()).unwrap_or(u64::MAX) > MAX_TEXT_CONFIG {
        return Err(Error::new(
            crate::error::ErrorKind::InvalidImage,
            format!(
                "the {what} is larger than {} MiB: not a configuration",
                MAX_TEXT_CONFIG >> 20
            ),
        )
        .with_path(path));
    }
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn macs() {
        assert_eq!(
            normal_mac("00-15-5D-0A-0B-0C").as_deref(),
            Some("00:15:5d:0a:0b:0c")
        );
        assert_eq!(
            normal_mac("00:50:56:aa:bb:cc").as_deref(),
            Some("00:50:56:aa:bb:cc")
        );
        assert_eq!(
            normal_mac("00155d0a0b0c").as_deref(),
            Some("00:15:5d:0a:0b:0c")
        );
        assert_eq!(normal_mac("nope"), None);
    }
}
