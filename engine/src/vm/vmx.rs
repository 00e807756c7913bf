//! VMware `.vmx` (a VM's configuration) and `.vmsd` (its snapshot tree): lines of
//! `key = "value"`, keys without case, values with `|XX` hex escapes.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;

use super::{ConfigKind, Nic, Vm, VmDisk, VmFirmware, VmSnapshot, normal_mac, read_text};
use crate::error::{Error, ErrorKind, Result};

/// Longest line read; a longer one makes the file unreadable (no VMware key needs more).
const MAX_LINE: usize = 64 << 10;
/// Most snapshots read from a `.vmsd` (VMware allows 32 in a chain; trees are larger).
const MAX_SNAPSHOTS: usize = 4096;
/// Most devices of one kind (NICs, disks) read.
const MAX_DEVICES: usize = 1024;

/// The pairs of a `.vmx` or `.vmsd`, keys in lower case; the last of a repeated key wins.
pub(super) fn parse(text: &str, path: &Path, what: &str) -> Result<HashMap<String, String>> {
    let mut pairs = HashMap::new();
    for (n, line) in text.lines().enumerate() {
        if line.len() > MAX_LINE {
            return Err(Error::new(
                ErrorKind::InvalidImage,
                format!(
                    "{what}: line {} is {} bytes long (at most {} KiB are read): not a VMware \
                     configuration",
                    n + 1,
                    line.len(),
                    MAX_LINE >> 10
                ),
            )
            .with_path(path));
        }
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let Some((key, value)) = line.split_once('=') else {
            continue;
        };
        let value = value.trim();
        let value = value
            .strip_prefix('"')
            .and_then(|v| v.strip_suffix('"'))
            .unwrap_or(value);
        pairs.insert(key.trim().to_ascii_lowercase(), unescape(value));
    }
    Ok(pairs)
}

/// VMware's `|XX` escapes (`|22` is `"`, `|7C` is `|`).
fn unescape(v: &str) -> String {
    if !v.contains('|') {
        return v.to_owned();
    }
    let bytes = v.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'|'
            && let Some(hex) = v.get(i + 1..i + 3)
            && let Ok(b) = u8::from_str_radix(hex, 16)
        {
            out.push(b);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn is_true(v: Option<&String>) -> Option<bool> {
    v.map(|v| matches!(v.to_ascii_lowercase().as_str(), "true" | "yes" | "1"))
}

/// `42 1d 4a 6b 8e 4f 6e 3a-9c 5a 33 2d 52 0e 2b 97` as a UUID, else as written.
fn uuid(raw: &str) -> String {
    let hex: String = raw.chars().filter(char::is_ascii_hexdigit).collect();
    if hex.len() != 32 {
        return raw.to_owned();
    }
    let h = hex.to_ascii_lowercase();
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

/// Reads a `.vmx` (and the `.vmsd` beside it).
pub(super) fn read(path: &Path) -> Result<Vm> {
    let text = read_text(path, "VMware configuration")?;
    let kv = parse(&text, path, "VMware configuration")?;
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut vm = Vm {
        config: path.to_path_buf(),
        kind: Some(ConfigKind::Vmx),
        name: kv.get("displayname").cloned(),
        id: kv
            .get("uuid.bios")
            .or_else(|| kv.get("vc.uuid"))
            .map(|u| uuid(u)),
        cpus: kv
            .get("numvcpus")
            .map_or(Some(1), |n| n.trim().parse().ok()),
        // VMware's defaults (1 CPU, BIOS) hold only where the devices are readable.
        memory_bytes: kv
            .get("memsize")
            .and_then(|m| m.trim().parse::<u64>().ok())
            .and_then(|m| m.checked_mul(1 << 20)),
        guest_os: kv.get("guestos").cloned(),
        encrypted: kv.contains_key("encryption.keysafe") || kv.contains_key("encryption.data"),
        ..Vm::default()
    };
    let efi = kv
        .get("firmware")
        .is_some_and(|f| f.eq_ignore_ascii_case("efi"));
    vm.firmware = Some(if efi {
        VmFirmware::Efi
    } else {
        VmFirmware::Bios
    });
    vm.secure_boot = Some(efi && is_true(kv.get("uefi.secureboot.enabled")).unwrap_or(false));
    if vm.encrypted {
        // The devices (and these settings) are sealed in `encryption.data`: what is not in
        // the clear is unknown, not VMware's default.
        vm.cpus = kv.get("numvcpus").and_then(|n| n.trim().parse().ok());
        if !kv.contains_key("firmware") {
            vm.firmware = None;
            vm.secure_boot = None;
        }
        vm.warnings.push(
            "the VM is encrypted (VMware VM encryption): its devices are sealed in \
             encryption.data and cannot be read without the key from the key provider"
                .to_owned(),
        );
    }
    vm.nics = nics(&kv);
    vm.disks = disks(&kv, dir);
    let vmsd = kv
        .get("checkpoint.vmsd")
        .filter(|v| !v.is_empty())
        .map(|v| dir.join(v))
        .or_else(|| {
            let own = path.with_extension("vmsd");
            own.is_file().then_some(own)
        });
    if let Some(vmsd) = vmsd {
        match read_text(&vmsd, "snapshot list").and_then(|t| parse(&t, &vmsd, "snapshot list")) {
            Ok(pairs) => vm.snapshots = snapshots(&pairs, &vmsd, &mut vm.warnings),
            Err(e) => vm
                .warnings
                .push(format!("the snapshots cannot be read: {e}")),
        }
    }
    Ok(vm)
}

/// Indexes `n` of keys `<prefix><n>.<field>`, in order.
fn indexes(kv: &HashMap<String, String>, prefix: &str) -> Vec<u32> {
    let set: HashSet<u32> = kv
        .keys()
        .filter_map(|k| {
            let rest = k.strip_prefix(prefix)?;
            let (n, _) = rest.split_once('.')?;
            n.parse().ok()
        })
        .collect();
    let mut v: Vec<u32> = set.into_iter().collect();
    v.sort_unstable();
    v.truncate(MAX_DEVICES);
    v
}

fn nics(kv: &HashMap<String, String>) -> Vec<Nic> {
    indexes(kv, "ethernet")
        .into_iter()
        .filter_map(|n| {
            let get = |field: &str| kv.get(&format!("ethernet{n}.{field}"));
            if is_true(get("present")) == Some(false) {
                return None;
            }
            let kind = get("addresstype").map(|t| t.to_ascii_lowercase());
            let mac_static = kind.as_deref().map(|t| t == "static");
            let mac = if mac_static == Some(true) {
                get("address")
            } else {
                get("generatedaddress").or_else(|| get("address"))
            };
            Some(Nic {
                name: format!("ethernet{n}"),
                kind: get("virtualdev").cloned(),
                mac: mac.and_then(|m| normal_mac(m)),
                mac_static,
                network: get("networkname")
                    .or_else(|| get("vnet"))
                    .or_else(|| get("connectiontype"))
                    .cloned(),
                connected: is_true(get("startconnected")),
            })
        })
        .collect()
}

/// Disks on `scsiN:M`, `sataN:M`, `ideN:M` and `nvmeN:M` that are present and not CD drives.
fn disks(kv: &HashMap<String, String>, dir: &Path) -> Vec<VmDisk> {
    let mut slots: BTreeMap<(usize, u32, u32), VmDisk> = BTreeMap::new();
    for (key, value) in kv {
        let Some(slot) = key.strip_suffix(".filename") else {
            continue;
        };
        let Some((bus, controller, unit)) = slot_parts(slot) else {
            continue;
        };
        let get = |field: &str| kv.get(&format!("{slot}.{field}"));
        let device = get("devicetype").map(|d| d.to_ascii_lowercase());
        if is_true(get("present")) == Some(false)
            || device.as_deref().is_some_and(|d| d.contains("cdrom"))
            || !value.to_ascii_lowercase().ends_with(".vmdk")
            || is_true(kv.get(&format!("{bus}{controller}.present"))) == Some(false)
            || slots.len() >= MAX_DEVICES
        {
            continue;
        }
        let controller_type = match bus {
            "scsi" => kv.get(&format!("scsi{controller}.virtualdev")).cloned(),
            "sata" => Some("ahci".to_owned()),
            "nvme" => Some("nvme".to_owned()),
            _ => Some("ide".to_owned()),
        };
        let order = ["scsi", "sata", "nvme", "ide"]
            .iter()
            .position(|b| *b == bus)
            .unwrap_or(4);
        // A relative name is beside the .vmx; an absolute one (a datastore path written on
        // the ESXi host) is matched by its trailing components instead.
        let path = (!is_absolute_anywhere(value)).then(|| dir.join(value));
        slots.insert(
            (order, controller, unit),
            VmDisk {
                controller: format!("{bus}{controller}"),
                controller_type,
                slot: format!("{bus}{controller}:{unit}"),
                configured_path: value.clone(),
                path,
                ..VmDisk::default()
            },
        );
    }
    slots.into_values().collect()
}

/// `scsi0:1` → (`scsi`, 0, 1).
fn slot_parts(slot: &str) -> Option<(&'static str, u32, u32)> {
    let bus = ["scsi", "sata", "nvme", "ide"]
        .into_iter()
        .find(|b| slot.starts_with(b))?;
    let (c, u) = slot[bus.len()..].split_once(':')?;
    Some((bus, c.parse().ok()?, u.parse().ok()?))
}

/// An absolute path on this host, on an ESXi host or on Windows.
fn is_absolute_anywhere(p: &str) -> bool {
    p.starts_with('/') || p.starts_with('\\') || p.as_bytes().get(1) == Some(&b':')
}

/// The snapshot tree of a `.vmsd`; a parent that is missing or closes a loop is dropped
/// with a warning.
fn snapshots(
    kv: &HashMap<String, String>,
    vmsd: &Path,
    warnings: &mut Vec<String>,
) -> Vec<VmSnapshot> {
    let current = kv.get("snapshot.current").cloned();
    let mut list: Vec<VmSnapshot> = indexes(kv, "snapshot")
        .into_iter()
        .take(MAX_SNAPSHOTS)
        .filter_map(|n| {
            let get = |field: &str| kv.get(&format!("snapshot{n}.{field}"));
            let id = get("uid")?.clone();
            let disks = (0..get("numdisks")
                .and_then(|d| d.parse::<u32>().ok())
                .unwrap_or(0)
                .min(256))
                .filter_map(|d| get(&format!("disk{d}.filename")).cloned())
                .collect();
            Some(VmSnapshot {
                current: current.as_deref() == Some(id.as_str()),
                name: get("displayname").cloned().unwrap_or_default(),
                parent: get("parent").cloned().filter(|p| !p.is_empty()),
                id,
                disks,
            })
        })
        .collect();
    let ids: HashSet<String> = list.iter().map(|s| s.id.clone()).collect();
    for s in &mut list {
        if let Some(p) = &s.parent
            && !ids.contains(p)
        {
            warnings.push(format!(
                "{}: snapshot {} names parent {p}, which the list does not hold",
                vmsd.display(),
                s.id
            ));
            s.parent = None;
        }
    }
    // Walk each snapshot's parents; one that comes back to itself is a loop, broken at the
    // snapshot that closes it.
    let parent_of: HashMap<String, Option<String>> = list
        .iter()
        .map(|s| (s.id.clone(), s.parent.clone()))
        .collect();
    let mut broken: HashSet<String> = HashSet::new();
    for s in &list {
        let mut seen = HashSet::new();
        let mut at = Some(s.id.clone());
        while let Some(id) = at {
            if broken.contains(&id) {
                break;
            }
            if !seen.insert(id.clone()) {
                warnings.push(format!(
                    "{}: the snapshot tree has a loop through snapshot {id}; its parent link \
                     is left out",
                    vmsd.display()
                ));
                broken.insert(id);
                break;
            }
            at = parent_of.get(&id).cloned().flatten();
        }
    }
    for s in &mut list {
        if broken.contains(&s.id) {
            s.parent = None;
        }
    }
    list
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_and_uuids() {
        assert_eq!(unescape("a|22b|7Cc"), "a\"b|c");
        assert_eq!(unescape("a|zz"), "a|zz");
        assert_eq!(
            uuid("42 1d 4a 6b 8e 4f 6e 3a-9c 5a 33 2d 52 0e 2b 97"),
            "421d4a6b-8e4f-6e3a-9c5a-332d520e2b97"
        );
        assert_eq!(slot_parts("scsi0:1"), Some(("scsi", 0, 1)));
        assert_eq!(slot_parts("sata1:15"), Some(("sata", 1, 15)));
        assert_eq!(slot_parts("ethernet0"), None);
    }

    #[test]
    fn snapshot_loops_are_broken_and_said() {
        let text = "snapshot0.uid = \"1\"\nsnapshot0.parent = \"2\"\nsnapshot1.uid = \"2\"\n\
                    snapshot1.parent = \"1\"\nsnapshot2.uid = \"3\"\nsnapshot2.parent = \"9\"\n\
                    snapshot.current = \"3\"\n";
        let kv = parse(text, Path::new("x.vmsd"), "snapshot list").unwrap();
        let mut warnings = Vec::new();
        let list = snapshots(&kv, Path::new("x.vmsd"), &mut warnings);
        assert_eq!(list.len(), 3);
        assert!(warnings.iter().any(|w| w.contains("loop")), "{warnings:?}");
        assert!(
            warnings.iter().any(|w| w.contains("parent 9")),
            "{warnings:?}"
        );
        assert!(
            list.iter()
                .any(|s| s.id == "3" && s.current && s.parent.is_none())
        );
        // No walk from any snapshot loops now.
        let parents: HashMap<_, _> = list
            .iter()
            .map(|s| (s.id.clone(), s.parent.clone()))
            .collect();
        for s in &list {
            let mut at = s.parent.clone();
            let mut n = 0;
            while let Some(p) = at {
                n += 1;
                assert!(n < 10);
                at = parents.get(&p).cloned().flatten();
            }
        }
    }

    #[test]
    fn long_lines_are_refused() {
        let text = format!("displayName = \"{}\"\n", "x".repeat(1 << 20));
        let err = parse(&text, Path::new("big.vmx"), "VMware configuration").unwrap_err();
        assert!(err.to_string().contains("line 1"), "{err}");
    }
}
