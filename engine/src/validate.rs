//! Readiness validation: can this VM or disk be imported by a target (AWS VM Import/Export,
//! Azure, or any hypervisor), and if not, why and what to do. Each check is a rule over what
//! discovery, guest inspection and the image readers found; docs/VALIDATION.md states each
//! rule and its source. Read-only, like everything it builds on.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Serialize;

use crate::error::{Error, Result};
use crate::guest::{Inspection, inspect_image};
use crate::image::{OpenOptions, open_with};
use crate::store::Store;
use crate::vm::{Vm, discover_all};

/// Where the VM is going.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ImportTarget {
    /// AWS VM Import/Export (`import-image`, `import-snapshot`).
    Aws,
    /// Azure (a VHD uploaded as a managed disk or image).
    Azure,
    /// Any hypervisor: only what makes a disk unusable anywhere.
    Generic,
}

impl ImportTarget {
    /// `aws`, `azure` or `generic`.
    ///
    /// # Errors
    /// Any other name.
    pub fn from_name(name: &str) -> Result<ImportTarget> {
        match name {
            "aws" => Ok(ImportTarget::Aws),
            "azure" => Ok(ImportTarget::Azure),
            "generic" => Ok(ImportTarget::Generic),
            _ => Err(
                Error::config(format!("target {name:?}: aws, azure or generic"))
                    .with_setting("target"),
            ),
        }
    }
}

/// A check's outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CheckStatus {
    /// Fine.
    Pass,
    /// Likely fine, but look.
    Warn,
    /// The import will fail or the VM will not work.
    Fail,
}

/// One check of one disk (or of the VM).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Check {
    /// Which check (`chain`, `image-health`, `disk-size`, …; docs/VALIDATION.md).
    pub id: &'static str,
    /// What it was run on: the VM, or a disk's file.
    pub subject: String,
    /// Pass, warn or fail.
    pub status: CheckStatus,
    /// What was found.
    pub reason: String,
    /// What to do about a warning or failure.
    pub fix: Option<String>,
}

/// The result of [`validate`].
#[derive(Debug, Clone, Serialize)]
pub struct Validation {
    /// What was validated.
    pub subject: String,
    /// The target.
    pub target: ImportTarget,
    /// Every check, in order (VM checks first, then each disk's).
    pub checks: Vec<Check>,
    /// No check failed.
    pub passed: bool,
    /// How many warned.
    pub warnings: usize,
}

/// What [`validate`] needs.
#[derive(Debug, Clone)]
pub struct ValidateRequest {
    /// The target.
    pub target: ImportTarget,
    /// The store replication will write to, for the free-space check (none: not checked).
    pub store: Option<Arc<Store>>,
    /// How images are opened.
    pub open: OpenOptions,
}

const TIB: u64 = 1 << 40;

/// Validates a VM (its `.vmx`, `.ovf`, `.ova` or `.vmcx`) or a disk image.
///
/// # Errors
/// Only when the path itself cannot be looked at; everything wrong with what it holds is a
/// failing check.
pub fn validate(path: &Path, req: &ValidateRequest) -> Result<Validation> {
    let started = std::time::Instant::now();
    std::fs::metadata(path).map_err(|e| Error::io("cannot look at", path, e))?;
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase)
        .unwrap_or_default();
    let mut checks = Vec::new();
    let disks: Vec<(PathBuf, Option<usize>)> =
        if matches!(ext.as_str(), "vmx" | "ovf" | "ova" | "vmcx") {
            let vm = find_vm(path, &req.open)?;
            vm_checks(&vm, req.target, &mut checks);
            vm.disks
                .iter()
                .filter_map(|d| Some((d.path.clone()?, d.ova_disk)))
                .collect()
        } else {
            vec![(path.to_path_buf(), None)]
        };
    let mut allocated = 0u64;
    for (i, (disk, ova)) in disks.iter().enumerate() {
        let subject = match ova {
            Some(n) => format!("{} (disk {n})", disk.display()),
            None => disk.display().to_string(),
        };
        let open = OpenOptions {
            ova_disk: ova.map(|n| n.to_string()),
            ..req.open.clone()
        };
        allocated = allocated.saturating_add(disk_checks(
            disk,
            &subject,
            i == 0,
            &open,
            req.target,
            &mut checks,
        ));
    }
    if let Some(store) = &req.store {
        checks.push(store_space(store, allocated));
    }
    let passed = checks.iter().all(|c| c.status != CheckStatus::Fail);
    let warnings = checks
        .iter()
        .filter(|c| c.status == CheckStatus::Warn)
        .count();
    let v = Validation {
        subject: path.display().to_string(),
        target: req.target,
        checks,
        passed,
        warnings,
    };
    // With a store, the validation is part of its record (the compliance report lists it).
    if let Some(store) = &req.store {
        let mut ev = crate::store::audit::AuditEvent::new("validate", started, &Ok::<_, Error>(&v));
        ev.object = Some(v.subject.clone());
        store.audit(&ev)?;
    }
    Ok(v)
}

/// The VM of a configuration, its disks resolved among the images of its folder (for a
/// Hyper-V configuration under `Virtual Machines`, the VM's folder above it).
fn find_vm(config: &Path, open: &OpenOptions) -> Result<Vm> {
    let mut folder = config.parent().unwrap_or(Path::new(".")).to_path_buf();
    if folder
        .file_name()
        .is_some_and(|n| n.eq_ignore_ascii_case("Virtual Machines"))
        && let Some(up) = folder.parent()
    {
        folder = up.to_path_buf();
    }
    let want = std::fs::canonicalize(config).unwrap_or_else(|_| config.to_path_buf());
    let found = discover_all(&folder, open)?;
    let mut vm = found
        .vms
        .into_iter()
        .find(|v| std::fs::canonicalize(&v.config).unwrap_or_else(|_| v.config.clone()) == want)
        .ok_or_else(|| {
            Error::config("no VM configuration was found in the file").with_path(config)
        })?;
    if let Some(e) = vm.error.take() {
        return Err(e);
    }
    Ok(vm)
}

fn check(
    id: &'static str,
    subject: &str,
    status: CheckStatus,
    reason: String,
    fix: Option<&str>,
) -> Check {
    Check {
        id,
        subject: subject.to_owned(),
        status,
        reason,
        fix: fix.map(str::to_owned),
    }
}

fn vm_checks(vm: &Vm, target: ImportTarget, out: &mut Vec<Check>) {
    let subject = vm
        .name
        .clone()
        .unwrap_or_else(|| vm.config.display().to_string());
    if vm.encrypted {
        out.push(check(
            "vm-encryption",
            &subject,
            CheckStatus::Fail,
            "the VM's configuration is encrypted (its disks are encrypted by the hypervisor)"
                .into(),
            Some("decrypt the VM in its hypervisor before migrating it"),
        ));
    } else {
        out.push(check(
            "vm-encryption",
            &subject,
            CheckStatus::Pass,
            "the configuration is not encrypted".into(),
            None,
        ));
    }
    let missing: Vec<String> = vm
        .disks
        .iter()
        .filter_map(|d| d.problem.as_ref().map(|p| format!("{}: {p}", d.slot)))
        .collect();
    if vm.disks.is_empty() && vm.encrypted {
        out.push(check(
            "vm-disks",
            &subject,
            CheckStatus::Fail,
            "the disks are listed in the encrypted part of the configuration".into(),
            Some("decrypt the VM in its hypervisor before migrating it"),
        ));
    } else if vm.disks.is_empty() {
        out.push(check(
            "vm-disks",
            &subject,
            CheckStatus::Fail,
            "the configuration names no disk".into(),
            Some("check the configuration; a VM needs a boot disk"),
        ));
    } else if missing.is_empty() {
        out.push(check(
            "vm-disks",
            &subject,
            CheckStatus::Pass,
            format!("{} disk(s), each found with its chain", vm.disks.len()),
            None,
        ));
    } else {
        out.push(check("vm-disks", &subject, CheckStatus::Fail, missing.join("; "), Some("bring the disk files into the folder (or pass --allow-outside-folder), or fix the configuration")));
    }
    let limit = match target {
        ImportTarget::Aws => Some(21),
        ImportTarget::Azure => Some(65),
        ImportTarget::Generic => None,
    };
    let n = vm.disks.len();
    match limit {
        Some(l) if n > l => out.push(check(
            "disk-count",
            &subject,
            CheckStatus::Fail,
            format!("{n} disks; the target imports at most {l} with a VM"),
            Some("import the boot disk with the VM and the others as separate volumes (snapshots)"),
        )),
        _ => out.push(check(
            "disk-count",
            &subject,
            CheckStatus::Pass,
            format!("{n} disk(s)"),
            None,
        )),
    }
}

/// The checks of one disk; returns its allocated bytes (for the store's free space).
fn disk_checks(
    path: &Path,
    subject: &str,
    boot: bool,
    open: &OpenOptions,
    target: ImportTarget,
    out: &mut Vec<Check>,
) -> u64 {
    let src = match open_with(path, open) {
        Ok(s) => s,
        Err(e) => {
            out.push(check(
                "chain",
                subject,
                CheckStatus::Fail,
                format!("the image cannot be opened: {e}"),
                Some("repair or bring the missing parent or extent; see the error"),
            ));
            return 0;
        }
    };
    let info = src.info().clone();
    let layers = src.layers();
    let sizes_agree = layers.iter().all(|l| l.virtual_size == info.virtual_size);
    out.push(if sizes_agree {
        check(
            "chain",
            subject,
            CheckStatus::Pass,
            format!(
                "{} image(s) in the chain, parent links checked",
                layers.len()
            ),
            None,
        )
    } else {
        check(
            "chain",
            subject,
            CheckStatus::Warn,
            format!(
                "the chain's images differ in size: {}",
                layers
                    .iter()
                    .map(|l| format!("{} {}", l.path.display(), l.virtual_size))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            Some(
                "a child larger than its parent reads zeros past the parent's end; check the chain",
            ),
        )
    });
    let health: Vec<&String> = layers
        .iter()
        .flat_map(|l| l.notes.iter())
        .chain(info.notes.iter())
        .filter(|n| crate::image::is_health_note(n))
        .collect();
    out.push(if health.is_empty() {
        check("image-health", subject, CheckStatus::Pass, "no unclean-shutdown flag, unreplayed log or damaged header".into(), None)
    } else {
        check(
            "image-health",
            subject,
            CheckStatus::Warn,
            health.iter().map(|s| s.as_str()).collect::<Vec<_>>().join("; "),
            Some("shut the VM down cleanly in its hypervisor (or open and close the disk there) before the final replication"),
        )
    });
    if target == ImportTarget::Aws {
        let sesparse = layers
            .iter()
            .any(|l| l.subformat.eq_ignore_ascii_case("seSparse"));
        out.push(if sesparse {
            check(
                "format",
                subject,
                CheckStatus::Warn,
                "the chain holds an ESXi SEsparse delta, which AWS does not import as such".into(),
                Some("blockferry exports the disk whole (raw, VHD, VHDX or streamOptimized VMDK): import that export"),
            )
        } else {
            check("format", subject, CheckStatus::Pass, "no SEsparse delta in the chain".into(), None)
        });
    }
    out.push(size_check(subject, info.virtual_size, boot, target));
    out.push(if info.logical_sector_size == 512 {
        check("sector-size", subject, CheckStatus::Pass, "512-byte logical sectors".into(), None)
    } else {
        check(
            "sector-size",
            subject,
            if target == ImportTarget::Generic { CheckStatus::Warn } else { CheckStatus::Fail },
            format!("{}-byte logical sectors (4Kn); the guest's partitions and file systems are laid out for them", info.logical_sector_size),
            Some("the target presents 512-byte sectors: convert the guest's disk layout, or migrate at file level"),
        )
    });
    let allocated = info.allocated_bytes;
    drop(src);
    match inspect_image(path, open) {
        Ok(i) => guest_checks(&i, subject, boot, target, out),
        Err(e) => out.push(check(
            "partition-table",
            subject,
            CheckStatus::Fail,
            format!("the disk cannot be inspected: {e}"),
            None,
        )),
    }
    allocated
}

fn size_check(subject: &str, size: u64, boot: bool, target: ImportTarget) -> Check {
    let (limit, what) = match (target, boot) {
        (ImportTarget::Aws, _) => (
            16 * TIB,
            "AWS VM Import/Export imports volumes of up to 16 TiB",
        ),
        (ImportTarget::Azure, true) => (4 * TIB, "Azure OS disks are at most 4 TiB"),
        (ImportTarget::Azure, false) => (32 * TIB, "Azure data disks are at most 32 TiB"),
        (ImportTarget::Generic, _) => (u64::MAX, ""),
    };
    if size > limit {
        return check(
            "disk-size",
            subject,
            CheckStatus::Fail,
            format!("{size} bytes; {what}"),
            Some(
                "shrink the guest's file systems and the disk, or split the data onto several disks",
            ),
        );
    }
    if target == ImportTarget::Azure && !size.is_multiple_of(1 << 20) {
        return check(
            "disk-size",
            subject,
            CheckStatus::Fail,
            format!("{size} bytes is not a whole number of MiB, which Azure requires of a VHD"),
            Some(
                "grow the disk to the next MiB (qemu-img resize) before exporting it as vhd-fixed",
            ),
        );
    }
    if size == 0 {
        return check(
            "disk-size",
            subject,
            CheckStatus::Fail,
            "the disk is empty".into(),
            None,
        );
    }
    check(
        "disk-size",
        subject,
        CheckStatus::Pass,
        format!("{size} bytes ({} MiB)", size >> 20),
        None,
    )
}

fn guest_checks(
    i: &Inspection,
    subject: &str,
    boot: bool,
    target: ImportTarget,
    out: &mut Vec<Check>,
) {
    let t = &i.table;
    out.push(if !t.problems.is_empty() {
        check("partition-table", subject, CheckStatus::Fail, t.problems.join("; "), Some("repair the partition table in the guest (or from a rescue system) before migrating"))
    } else if t.scheme == "none" && boot {
        check("partition-table", subject, CheckStatus::Warn, "no partition table on the boot disk".into(), Some("a boot disk needs an MBR or GPT with a boot loader"))
    } else {
        check("partition-table", subject, CheckStatus::Pass, format!("{} with {} partition(s)", t.scheme.to_ascii_uppercase(), t.partitions.len()), None)
    });
    let encrypted: Vec<String> = i
        .volumes
        .iter()
        .filter_map(|v| {
            let f = v.filesystem.as_ref()?;
            f.encrypted.then(|| match v.partition {
                Some(n) => format!("partition {n} is {}", f.kind),
                None => format!("the disk is {}", f.kind),
            })
        })
        .collect();
    out.push(if encrypted.is_empty() {
        check("encryption", subject, CheckStatus::Pass, "no LUKS or BitLocker volume".into(), None)
    } else {
        check(
            "encryption",
            subject,
            if target == ImportTarget::Generic { CheckStatus::Warn } else { CheckStatus::Fail },
            format!("{} (image import of encrypted volumes is not supported)", encrypted.join("; ")),
            Some("decrypt the volumes in the guest (or suspend BitLocker) before the final replication"),
        )
    });
    if !boot {
        return;
    }
    let gpt_big = i.virtual_size > 2 * TIB;
    out.push(match i.boot.mode {
        "none" => check(
            "boot",
            subject,
            CheckStatus::Fail,
            format!("no boot loader found: no EFI system partition with FAT and no MBR boot code{}", if i.boot.evidence.is_empty() { String::new() } else { format!(" ({})", i.boot.evidence.join("; ")) }),
            Some("the first disk must be the boot disk; install a boot loader, or order the disks so"),
        ),
        "bios" if gpt_big => check(
            "boot",
            subject,
            CheckStatus::Fail,
            format!("BIOS boot from a disk of {} bytes: over 2 TiB needs GPT and UEFI", i.virtual_size),
            Some("convert the boot disk to GPT with an EFI system partition, or shrink it under 2 TiB"),
        ),
        mode => check("boot", subject, CheckStatus::Pass, format!("{mode} ({})", i.boot.evidence.join("; ")), None),
    });
    out.push(os_check(i, subject, target));
}

/// The OSes each target imports, as documented (docs/VALIDATION.md gives the sources): a
/// distribution id and its lowest and highest major version; Windows by build number.
fn os_table(target: ImportTarget) -> (&'static [(&'static str, u32, u32)], u32) {
    match target {
        ImportTarget::Aws => (
            &[
                ("amzn", 2, 2),
                ("centos", 5, 8),
                ("debian", 6, 11),
                ("fedora", 18, 21),
                ("ol", 5, 7),
                ("rhel", 5, 8),
                ("sles", 11, 15),
                ("ubuntu", 12, 22),
            ],
            3790,
        ),
        ImportTarget::Azure => (
            &[
                ("almalinux", 8, 9),
                ("debian", 11, 12),
                ("ol", 7, 9),
                ("rhel", 7, 9),
                ("rocky", 8, 9),
                ("sles", 12, 15),
                ("ubuntu", 20, 24),
            ],
            9600,
        ),
        ImportTarget::Generic => (&[], 0),
    }
}

fn os_check(i: &Inspection, subject: &str, target: ImportTarget) -> Check {
    let Some(os) = i.os.first() else {
        return check(
            "os",
            subject,
            CheckStatus::Warn,
            "no OS found on the boot disk (looked for /etc/os-release on ext file systems and Windows/System32 on NTFS; XFS and LVM are not read)".into(),
            Some("check the OS against the target's supported list by hand"),
        );
    };
    let name = os
        .pretty_name
        .clone()
        .or_else(|| os.name.clone())
        .unwrap_or_else(|| os.family.clone());
    if target == ImportTarget::Generic {
        return check("os", subject, CheckStatus::Pass, name, None);
    }
    let (table, min_build) = os_table(target);
    if os.family == "windows" {
        let build = os
            .version
            .as_deref()
            .and_then(|v| v.rsplit('.').next())
            .and_then(|b| b.parse::<u32>().ok());
        return match build {
            Some(b) if b >= min_build => check(
                "os",
                subject,
                CheckStatus::Pass,
                format!("{name} (build {b})"),
                None,
            ),
            Some(b) => check(
                "os",
                subject,
                CheckStatus::Fail,
                format!(
                    "{name} (build {b}) is older than the target imports (build {min_build} and later)"
                ),
                Some("upgrade Windows before migrating"),
            ),
            None => check(
                "os",
                subject,
                CheckStatus::Warn,
                format!("{name}: its version could not be read"),
                Some("check the Windows version against the target's list by hand"),
            ),
        };
    }
    let distro = os.distro.clone().unwrap_or_default();
    let major = os
        .version
        .as_deref()
        .and_then(|v| v.split('.').next())
        .and_then(|v| v.parse::<u32>().ok());
    match (table.iter().find(|(d, _, _)| *d == distro), major) {
        (Some((_, lo, hi)), Some(m)) if (*lo..=*hi).contains(&m) => {
            check("os", subject, CheckStatus::Pass, name, None)
        }
        (Some((_, lo, hi)), Some(m)) => check(
            "os",
            subject,
            CheckStatus::Fail,
            format!(
                "{name}: version {m} is outside what the target imports for {distro} ({lo} to {hi})"
            ),
            Some(
                "upgrade (or choose a target that supports it), or import the disks as snapshots and boot your own image",
            ),
        ),
        (Some(_), None) => check(
            "os",
            subject,
            CheckStatus::Warn,
            format!("{name}: no version in os-release"),
            Some("check the version against the target's list by hand"),
        ),
        (None, _) => check(
            "os",
            subject,
            CheckStatus::Fail,
            format!("{name} ({distro}) is not among the distributions the target documents"),
            Some(
                "import the disks as snapshots and attach them to an instance of a supported distribution, or choose another target",
            ),
        ),
    }
}

fn store_space(store: &Store, allocated: u64) -> Check {
    match store.free_bytes() {
        Ok(None) => check(
            "store-space",
            &store.location(),
            CheckStatus::Pass,
            "object storage: no fixed capacity".into(),
            None,
        ),
        Ok(Some(free)) if free >= allocated => check(
            "store-space",
            &store.location(),
            CheckStatus::Pass,
            format!("{free} bytes free for at most {allocated} allocated bytes"),
            None,
        ),
        Ok(Some(free)) => check(
            "store-space",
            &store.location(),
            CheckStatus::Fail,
            format!(
                "{free} bytes free, and the disks have {allocated} allocated bytes (before deduplication and compression)"
            ),
            Some("free space in the store's file system, or use another store"),
        ),
        Err(e) => check(
            "store-space",
            &store.location(),
            CheckStatus::Warn,
            format!("the free space cannot be read: {e}"),
            None,
        ),
    }
}
