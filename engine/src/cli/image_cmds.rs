//! `info`, `map`, `convert`: looking at and unpacking disk images.

use std::io::{IsTerminal, Write};
use std::process::ExitCode;

use serde_json::json;

use blockferry::{BlockSource, MapRow, Mapping, OpenOptions};
use blockferry::{CancelToken, ConvertOptions};

use super::output::{Bar, human_bytes};
use super::{ConvertArgs, DiscoverArgs, ImageArgs, print_json};

fn open(a: &ImageArgs) -> anyhow::Result<Box<dyn BlockSource>> {
    let opts = OpenOptions {
        allow_outside_folder: a.allow_outside_folder,
        ova_disk: a.disk.clone(),
        ..OpenOptions::default()
    };
    Ok(blockferry::open_image_with(&a.image, &opts)?)
}

pub(crate) fn info(a: &ImageArgs) -> anyhow::Result<ExitCode> {
    // A child whose parent is missing is still described, with the parent it names.
    let (src, missing_parent) = match open(a) {
        Ok(src) => (src, None),
        Err(e) => match e.downcast_ref::<blockferry::Error>() {
            Some(be) if be.kind() == blockferry::ErrorKind::NotFound => {
                let single = blockferry::open_image_alone(&a.image)?;
                (single, Some(be.message().to_owned()))
            }
            _ => return Err(e),
        },
    };
    let info = src.info();
    let layers = src.layers();
    let parent_named: Vec<String> = src
        .parent_link()
        .map(|l| l.candidates.clone())
        .unwrap_or_default();
    if a.json {
        let mut v = serde_json::to_value(blockferry::describe(src.as_ref()))?;
        v["file"] = json!(a.image.display().to_string());
        v["parent_paths"] = json!(parent_named);
        v["parent_missing"] = json!(missing_parent);
        print_json(&v)?;
        return Ok(if missing_parent.is_some() {
            ExitCode::FAILURE
        } else {
            ExitCode::SUCCESS
        });
    }
    outln!("file:            {}", a.image.display());
    outln!("format:          {} ({})", info.format, info.subformat);
    outln!(
        "virtual size:    {} ({} bytes)",
        human_bytes(info.virtual_size),
        info.virtual_size
    );
    outln!(
        "sector size:     {} logical, {} physical",
        info.logical_sector_size,
        info.physical_sector_size
    );
    outln!(
        "allocated:       {} ({} bytes)",
        human_bytes(info.allocated_bytes),
        info.allocated_bytes
    );
    if layers.len() > 1 {
        outln!("chain (top first):");
        for l in &layers {
            outln!(
                "  {} ({} {}, {})",
                l.path.display(),
                l.format,
                l.subformat,
                human_bytes(l.virtual_size)
            );
        }
    }
    for l in &layers {
        for n in &l.notes {
            outln!("note: {}: {n}", l.path.display());
        }
    }
    if let Some(missing) = &missing_parent {
        outln!("parent:          {}", parent_named.join(" | "));
        eprintln!("error: {missing}");
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}

pub(crate) fn map(a: &ImageArgs) -> anyhow::Result<ExitCode> {
    let src = open(a)?;
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    let mut first = true;
    // Neighbouring mappings that continue each other come merged.
    let mut emit = |e: &Mapping, out: &mut dyn Write| -> std::io::Result<()> {
        let row = MapRow::of(src.as_ref(), e);
        if a.json {
            let v = serde_json::to_string(&row).map_err(std::io::Error::other)?;
            write!(out, "{}{v}", if first { "[\n" } else { ",\n" })?;
        } else {
            if first {
                writeln!(
                    out,
                    "{:<16} {:<16} {:<12} {:<16} FILE",
                    "START", "LENGTH", "KIND", "OFFSET"
                )?;
            }
            let offset = row.offset.map(|o| format!("{o:#x}")).unwrap_or_default();
            writeln!(
                out,
                "{:<#16x} {:<#16x} {:<12} {offset:<16} {}",
                row.start,
                row.length,
                row.kind,
                row.file.unwrap_or_default()
            )?;
        }
        first = false;
        Ok(())
    };
    blockferry::for_each_extent(src.as_ref(), |e| -> anyhow::Result<()> {
        Ok(emit(e, &mut out)?)
    })?;
    if a.json {
        writeln!(out, "{}", if first { "[]" } else { "\n]" })?;
    }
    out.flush()?;
    Ok(ExitCode::SUCCESS)
}

pub(crate) fn convert(a: &ConvertArgs) -> anyhow::Result<ExitCode> {
    let src = open(&a.image)?;
    let opts = ConvertOptions {
        force: a.force,
        workers: a.workers,
        cancel: CancelToken::new(),
        ..ConvertOptions::default()
    };
    let bar = Bar::new(
        !a.image.json && std::io::stderr().is_terminal(),
        "converting",
    );
    let report = blockferry::convert(src.as_ref(), &a.out, &opts, &bar)?;
    bar.done();
    if a.image.json {
        print_json(&serde_json::to_value(&report)?)?;
    } else {
        outln!(
            "wrote {} ({} of data) to {} in {:.1}s",
            human_bytes(report.virtual_size),
            human_bytes(report.bytes_written),
            a.out.display(),
            report.seconds
        );
    }
    Ok(ExitCode::SUCCESS)
}

pub(crate) fn discover(a: &DiscoverArgs) -> anyhow::Result<ExitCode> {
    let opts = OpenOptions {
        allow_outside_folder: a.allow_outside_folder,
        ..OpenOptions::default()
    };
    let found = blockferry::discover_all(&a.folder, &opts)?;
    if a.json {
        print_json(&serde_json::to_value(&found)?)?;
        return Ok(ExitCode::SUCCESS);
    }
    if a.csv {
        for row in vm_csv(&found.vms) {
            outln!("{row}");
        }
        return Ok(ExitCode::SUCCESS);
    }
    print_images(&found.images)?;
    if !found.vms.is_empty() {
        outln!("");
        print_vms(&found.vms)?;
    }
    Ok(ExitCode::SUCCESS)
}

fn print_images(found: &[blockferry::Found]) -> anyhow::Result<()> {
    outln!(
        "{:<10}  {:<6}  {:<18}  {:>10}  {:>10}  PATH",
        "ROLE",
        "FORMAT",
        "SUBFORMAT",
        "SIZE",
        "ALLOCATED"
    );
    for f in found {
        let path = match f.ova_disk {
            Some(i) => format!("{} (disk {i})", f.path.display()),
            None => f.path.display().to_string(),
        };
        match &f.error {
            Some(e) => outln!("{:<10}  {path}: {e}", f.role.name()),
            None => outln!(
                "{:<10}  {:<6}  {:<18}  {:>10}  {:>10}  {path}{}",
                f.role.name(),
                f.format,
                f.subformat,
                human_bytes(f.virtual_size),
                human_bytes(f.allocated_bytes),
                if f.chain.len() > 1 {
                    format!(" ({} images in its chain)", f.chain.len())
                } else {
                    String::new()
                }
            ),
        }
    }
    Ok(())
}

fn print_vms(vms: &[blockferry::Vm]) -> anyhow::Result<()> {
    for vm in vms {
        let what = vm
            .system
            .as_ref()
            .map_or_else(String::new, |s| format!(" (system {s})"));
        outln!("VM {}{what}", vm.config.display());
        if let Some(e) = &vm.error {
            outln!("  error: {e}");
            continue;
        }
        let opt = |v: Option<String>| v.unwrap_or_else(|| "-".to_owned());
        outln!("  name       {}", opt(vm.name.clone()));
        outln!("  id         {}", opt(vm.id.clone()));
        outln!(
            "  hardware   {} CPUs, {} memory, {} firmware{}",
            opt(vm.cpus.map(|c| c.to_string())),
            opt(vm.memory_bytes.map(human_bytes)),
            opt(vm.firmware.map(|f| format!("{f:?}").to_ascii_lowercase())),
            if vm.secure_boot == Some(true) {
                ", secure boot"
            } else {
                ""
            }
        );
        outln!("  guest OS   {}", opt(vm.guest_os.clone()));
        if vm.encrypted {
            outln!("  encrypted  yes");
        }
        for n in &vm.nics {
            outln!(
                "  nic        {} {} mac {} network {}",
                n.name,
                opt(n.kind.clone()),
                opt(n.mac.clone()),
                opt(n.network.clone())
            );
        }
        for d in &vm.disks {
            let target = match (&d.path, d.ova_disk) {
                (Some(p), Some(i)) => format!("{} (disk {i})", p.display()),
                (Some(p), None) => p.display().to_string(),
                (None, _) => d.configured_path.clone(),
            };
            let size = d
                .virtual_size
                .or(d.capacity)
                .map_or_else(String::new, |s| format!(", {}", human_bytes(s)));
            let chain = if d.chain.len() > 1 {
                format!(", chain of {}", d.chain.len())
            } else {
                String::new()
            };
            outln!(
                "  disk       {} ({}) {target}{size}{chain}",
                d.slot,
                opt(d.controller_type.clone())
            );
            if let Some(p) = &d.problem {
                outln!("             {p}");
            }
        }
        for s in &vm.snapshots {
            outln!(
                "  snapshot   {} {:?}{}{}",
                s.id,
                s.name,
                s.parent
                    .as_ref()
                    .map_or_else(String::new, |p| format!(" on {p}")),
                if s.current { " (current)" } else { "" }
            );
        }
        for w in &vm.warnings {
            outln!("  warning    {w}");
        }
    }
    Ok(())
}

/// One CSV row per VM disk (a VM without disks, or one that cannot be read, has one row),
/// header first; fields quoted as RFC 4180 says.
fn vm_csv(vms: &[blockferry::Vm]) -> Vec<String> {
    fn field(s: &str) -> String {
        if s.contains([',', '"', '\n', '\r']) {
            format!("\"{}\"", s.replace('"', "\"\""))
        } else {
            s.to_owned()
        }
    }
    let header = [
        "vm",
        "vm_id",
        "config",
        "kind",
        "cpus",
        "memory_bytes",
        "firmware",
        "secure_boot",
        "guest_os",
        "encrypted",
        "nics",
        "controller",
        "controller_type",
        "slot",
        "disk",
        "ova_disk",
        "format",
        "virtual_size",
        "allocated_bytes",
        "chain_length",
        "chain",
        "problem",
    ];
    let mut rows = vec![header.join(",")];
    for vm in vms {
        let kind = vm
            .kind
            .map(|k| format!("{k:?}").to_ascii_lowercase())
            .unwrap_or_default();
        let nics: Vec<String> = vm
            .nics
            .iter()
            .map(|n| {
                format!(
                    "{}={}",
                    n.network.as_deref().unwrap_or("-"),
                    n.mac.as_deref().unwrap_or("-")
                )
            })
            .collect();
        let vm_fields = [
            vm.name.clone().unwrap_or_default(),
            vm.id.clone().unwrap_or_default(),
            vm.config.display().to_string(),
            kind,
            vm.cpus.map(|c| c.to_string()).unwrap_or_default(),
            vm.memory_bytes.map(|m| m.to_string()).unwrap_or_default(),
            vm.firmware
                .map(|f| format!("{f:?}").to_ascii_lowercase())
                .unwrap_or_default(),
            vm.secure_boot.map(|b| b.to_string()).unwrap_or_default(),
            vm.guest_os.clone().unwrap_or_default(),
            vm.encrypted.to_string(),
            nics.join(" "),
        ];
        let base: Vec<String> = vm_fields.iter().map(|f| field(f)).collect();
        if vm.disks.is_empty() {
            let problem = vm
                .error
                .as_ref()
                .map(ToString::to_string)
                .unwrap_or_default();
            let mut row = base.clone();
            row.extend(std::iter::repeat_n(String::new(), 10));
            row.push(field(&problem));
            rows.push(row.join(","));
        }
        for d in &vm.disks {
            let chain: Vec<String> = d.chain.iter().map(|p| p.display().to_string()).collect();
            let mut row = base.clone();
            row.extend(
                [
                    d.controller.clone(),
                    d.controller_type.clone().unwrap_or_default(),
                    d.slot.clone(),
                    d.path
                        .as_ref()
                        .map_or_else(|| d.configured_path.clone(), |p| p.display().to_string()),
                    d.ova_disk.map(|i| i.to_string()).unwrap_or_default(),
                    d.format.unwrap_or_default().to_owned(),
                    d.virtual_size
                        .or(d.capacity)
                        .map(|s| s.to_string())
                        .unwrap_or_default(),
                    d.allocated_bytes.map(|s| s.to_string()).unwrap_or_default(),
                    d.chain.len().to_string(),
                    chain.join(";"),
                    d.problem.clone().unwrap_or_default(),
                ]
                .iter()
                .map(|f| field(f)),
            );
            rows.push(row.join(","));
        }
    }
    rows
}
