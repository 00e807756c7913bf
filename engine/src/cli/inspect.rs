//! `blockferry inspect`: what a disk holds, from an image file or a snapshot in a store.

use std::fmt::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::Args;

use super::output::human_bytes;
use super::{S3Args, StoreArgs, jobs, open_store, print_json};

#[derive(Debug, Args)]
pub(crate) struct InspectArgs {
    /// An image file, or with --store a snapshot (id, unique id prefix, DISK@latest, or
    /// `latest` of the only disk).
    target: String,
    /// Inspect a snapshot in this store (a local folder or s3://BUCKET/PREFIX).
    #[arg(long, value_name = "PATH|URL")]
    store: Option<String>,
    #[command(flatten)]
    s3: S3Args,
    /// Read the store's passphrase from this file (first line) instead of
    /// BLOCKFERRY_PASSPHRASE.
    #[arg(long, value_name = "FILE")]
    passphrase_file: Option<PathBuf>,
    #[command(flatten)]
    state: jobs::StateArgs,
    /// Follow parent and extent paths that lead outside the image's folder.
    #[arg(long)]
    allow_outside_folder: bool,
    /// Which disk of an OVA: its index from 0 or its file name (default: the first).
    #[arg(long, value_name = "DISK")]
    disk: Option<String>,
    /// Print the result as JSON on stdout.
    #[arg(long)]
    pub(crate) json: bool,
}

pub(crate) fn run(a: InspectArgs) -> anyhow::Result<ExitCode> {
    let json = a.json;
    let found = if let Some(store) = a.store {
        let args = StoreArgs {
            store,
            s3: a.s3,
            passphrase_file: a.passphrase_file,
            json,
            state: a.state,
        };
        let store = Arc::new(open_store(&args)?);
        blockferry::inspect_snapshot(&store, &a.target, &blockferry::Silent)?
    } else {
        let opts = blockferry::OpenOptions {
            allow_outside_folder: a.allow_outside_folder,
            ova_disk: a.disk,
            ..blockferry::OpenOptions::default()
        };
        blockferry::inspect_image(std::path::Path::new(&a.target), &opts)?
    };
    if json {
        print_json(&found)?;
    } else {
        print(&found)?;
    }
    Ok(ExitCode::SUCCESS)
}

fn print(i: &blockferry::Inspection) -> anyhow::Result<()> {
    let t = &i.table;
    let mut scheme = t.scheme.to_ascii_uppercase();
    if t.protective_mbr {
        scheme.push_str(if t.hybrid_mbr {
            " (hybrid MBR)"
        } else {
            " (protective MBR)"
        });
    }
    outln!(
        "{}: {}, partition table {scheme}",
        i.disk,
        human_bytes(i.virtual_size)
    );
    outln!(
        "boot: {}{}",
        i.boot.mode,
        if i.boot.evidence.is_empty() {
            String::new()
        } else {
            format!(" ({})", i.boot.evidence.join("; "))
        }
    );
    for v in &i.volumes {
        let part = t.partitions.iter().find(|p| Some(p.number) == v.partition);
        let what = match part {
            Some(p) => format!(
                "{:>3} {:<8} {:>10} at {:<12} {:<22}",
                p.number,
                p.kind,
                human_bytes(p.size),
                p.start,
                if p.type_name.is_empty() {
                    p.type_code.clone()
                } else {
                    p.type_name.clone()
                }
            ),
            None => format!("whole disk {:>10}", human_bytes(v.size)),
        };
        let fs = v.filesystem.as_ref().map_or_else(
            || "-".to_owned(),
            |f| {
                let mut s = f.kind.clone();
                if let Some(l) = &f.label {
                    let _ = write!(s, " {l:?}");
                }
                if let Some(os) = &f.os {
                    let name = os
                        .pretty_name
                        .clone()
                        .or_else(|| os.name.clone())
                        .unwrap_or_else(|| os.family.clone());
                    let _ = write!(s, ", {name}");
                    if let Some(v) = &os.version {
                        let _ = write!(s, " (version {v})");
                    }
                }
                if let Some(p) = &f.problem {
                    let _ = write!(s, " [{p}]");
                }
                s
            },
        );
        outln!("  {what} {fs}");
    }
    for p in &t.problems {
        outln!("problem: {p}");
    }
    Ok(())
}
