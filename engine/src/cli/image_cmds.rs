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
    let found = blockferry::discover(&a.folder, &opts)?;
    if a.json {
        print_json(&json!({ "images": found }))?;
        return Ok(ExitCode::SUCCESS);
    }
    outln!(
        "{:<10}  {:<6}  {:<18}  {:>10}  {:>10}  PATH",
        "ROLE",
        "FORMAT",
        "SUBFORMAT",
        "SIZE",
        "ALLOCATED"
    );
    for f in &found {
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
    Ok(ExitCode::SUCCESS)
}
