//! VMs of an OVF descriptor (standalone, or inside an OVA): one per virtual system.

use std::collections::HashMap;
use std::path::Path;

use super::{ConfigKind, Nic, Vm, VmDisk, VmFirmware, read_text};
use crate::error::{Error, ErrorKind, Result};
use crate::image::ova;
use crate::image::ovf::{Envelope, OvfItem, allocation_unit, parse_envelope};
use crate::io::SourceFile;

/// The VMs of a standalone `.ovf`; its disk files are beside it.
pub(super) fn read_ovf(path: &Path) -> Result<Vec<Vm>> {
    let text = read_text(path, "OVF descriptor")?;
    let env = parse_envelope(text.as_bytes()).map_err(|why| bad(path, &why))?;
    let dir = path.parent().unwrap_or(Path::new("."));
    Ok(vms(path, ConfigKind::Ovf, &env, |disk_index| {
        let file = &env.disks[disk_index].file;
        (Some(dir.join(file)), None)
    }))
}

/// The VMs of an OVA's descriptor; its disks are the OVA's members, by index.
pub(super) fn read_ova(path: &Path) -> Result<Vec<Vm>> {
    let file = SourceFile::open(path)?;
    let env = ova::envelope(&file)?;
    Ok(vms(path, ConfigKind::Ova, &env, |disk_index| {
        (Some(path.to_path_buf()), Some(disk_index))
    }))
}

fn bad(path: &Path, why: &str) -> Error {
    Error::new(ErrorKind::InvalidImage, format!("OVF descriptor: {why}")).with_path(path)
}

fn vms(
    config: &Path,
    kind: ConfigKind,
    env: &Envelope,
    locate: impl Fn(usize) -> (Option<std::path::PathBuf>, Option<usize>),
) -> Vec<Vm> {
    let several = env.systems.len() > 1;
    env.systems
        .iter()
        .map(|sys| {
            let mut vm = Vm {
                config: config.to_path_buf(),
                kind: Some(kind),
                system: several.then(|| sys.id.clone()),
                name: Some(sys.name.clone()).filter(|n| !n.is_empty()),
                id: sys
                    .identifier
                    .clone()
                    .or_else(|| config_value(&sys.config, "uuid").map(str::to_owned))
                    .or_else(|| Some(sys.id.clone()).filter(|i| !i.is_empty())),
                guest_os: sys
                    .os_type
                    .clone()
                    .or_else(|| sys.os_description.clone())
                    .or_else(|| sys.os_id.as_ref().map(|id| format!("CIM OS {id}"))),
                ..Vm::default()
            };
            let efi = config_value(&sys.config, "firmware")
                .is_some_and(|f| f.eq_ignore_ascii_case("efi"));
            vm.firmware = Some(if efi {
                VmFirmware::Efi
            } else {
                VmFirmware::Bios
            });
            vm.secure_boot = Some(
                efi && config_value(&sys.config, "uefi.secureBoot.enabled")
                    .is_some_and(|v| v.eq_ignore_ascii_case("true")),
            );
            let controllers: HashMap<&str, &OvfItem> = sys
                .items
                .iter()
                .filter(|i| matches!(i.resource_type, 5 | 6 | 20))
                .map(|i| (i.instance.as_str(), i))
                .collect();
            for item in &sys.items {
                match item.resource_type {
                    3 => vm.cpus = item.quantity.and_then(|q| u32::try_from(q).ok()),
                    4 => {
                        let unit = if item.units.is_empty() {
                            Some(1 << 20)
                        } else {
                            allocation_unit(&item.units)
                        };
                        vm.memory_bytes =
                            item.quantity.zip(unit).and_then(|(q, u)| q.checked_mul(u));
                    }
                    10 => vm.nics.push(Nic {
                        name: item.name.clone(),
                        kind: Some(item.subtype.clone()).filter(|s| !s.is_empty()),
                        mac: super::normal_mac(&item.address),
                        mac_static: None,
                        network: Some(item.connection.clone()).filter(|s| !s.is_empty()),
                        connected: item.automatic_allocation,
                    }),
                    17 => vm.disks.push(disk(item, &controllers, env, &locate)),
                    _ => {}
                }
            }
            vm
        })
        .collect()
}

fn config_value<'a>(config: &'a [(String, String)], key: &str) -> Option<&'a str> {
    config
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(key))
        .map(|(_, v)| v.as_str())
}

fn disk(
    item: &OvfItem,
    controllers: &HashMap<&str, &OvfItem>,
    env: &Envelope,
    locate: &impl Fn(usize) -> (Option<std::path::PathBuf>, Option<usize>),
) -> VmDisk {
    let controller = controllers.get(item.parent.as_str());
    let (controller_name, controller_type) = match controller {
        Some(c) => {
            let kind = match c.resource_type {
                5 => "ide".to_owned(),
                6 if c.subtype.is_empty() => "scsi".to_owned(),
                _ if c.subtype.is_empty() => "storage".to_owned(),
                _ => c.subtype.clone(),
            };
            (c.name.clone(), Some(kind))
        }
        None => (item.parent.clone(), None),
    };
    // `ovf:/disk/<diskId>` (or `/disk/<diskId>`) names the disk; a `ovf:/file/<fileId>`
    // names a file directly.
    let reference = item.host_resource.rsplit('/').next().unwrap_or_default();
    let index = env.disks.iter().position(|d| d.id == reference);
    let mut d = VmDisk {
        controller: controller_name.clone(),
        controller_type,
        slot: format!("{controller_name}:{}", item.address_on_parent),
        configured_path: item.host_resource.clone(),
        ..VmDisk::default()
    };
    match index {
        Some(i) => {
            let (path, ova_disk) = locate(i);
            d.configured_path.clone_from(&env.disks[i].file);
            d.capacity = env.disks[i].capacity;
            d.path = path;
            d.ova_disk = ova_disk;
        }
        None => {
            d.problem = Some(format!(
                "the item names {:?}, which the disk section does not list",
                item.host_resource
            ));
        }
    }
    d
}
