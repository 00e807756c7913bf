//! `blockferry inspect`: what a disk holds, from an image file or a snapshot in a store.

use std::fmt::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::Args;

use super::output::human_bytes;
use super::{S3Args, StoreArgs, jobs, open_store, print_json};

/// A store, when the command is given one (`inspect` of a snapshot, `validate`'s free space).
#[derive(Debug, Args)]
pub(crate) struct OptStoreArgs {
    /// The store: a local folder or s3://BUCKET/PREFIX.
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
}

impl OptStoreArgs {
    /// The store, opened as every command opens it; `None` when none was given.
    pub(crate) fn open(self, json: bool) -> anyhow::Result<Option<Arc<blockferry::Store>>> {
        let Some(store) = self.store else {
            return Ok(None);
        };
        let args = StoreArgs {
            store,
            s3: self.s3,
            passphrase_file: self.passphrase_file,
            json,
            state: self.state,
        };
        Ok(Some(Arc::new(open_store(&args)?)))
    }
}

#[derive(Debug, Args)]
pub(crate) struct InspectArgs {
    /// An image file, or with --store a snapshot in that store (id, unique id prefix,
    /// DISK@latest, or `latest` of the only disk).
    target: String,
    #[command(flatten)]
    store: OptStoreArgs,
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
    let found = if let Some(store) = a.store.open(json)? {
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

#[derive(Debug, Args)]
pub(crate) struct ValidateArgs {
    /// A VM (its .vmx, .ovf, .ova or .vmcx) or a disk image.
    path: PathBuf,
    /// Where the VM is going: aws (VM Import/Export), azure, or generic (any hypervisor).
    #[arg(long, value_name = "aws|azure|generic", default_value = "generic")]
    target: String,
    /// With --store: check that its file system has room for the disks' allocated bytes.
    #[command(flatten)]
    store: OptStoreArgs,
    /// Follow parent and extent paths that lead outside the image's folder.
    #[arg(long)]
    allow_outside_folder: bool,
    /// Print the result as JSON on stdout.
    #[arg(long)]
    pub(crate) json: bool,
}

/// Exit 0 when no check failed, 3 when one did (as verify).
pub(crate) fn validate(a: ValidateArgs) -> anyhow::Result<ExitCode> {
    let req = blockferry::ValidateRequest {
        target: blockferry::ImportTarget::from_name(&a.target)?,
        store: a.store.open(a.json)?,
        open: blockferry::OpenOptions {
            allow_outside_folder: a.allow_outside_folder,
            ..blockferry::OpenOptions::default()
        },
    };
    let v = blockferry::validate(&a.path, &req)?;
    if a.json {
        print_json(&v)?;
    } else {
        outln!(
            "{} for {}:",
            v.subject,
            serde_json::to_value(v.target)?.as_str().unwrap_or_default()
        );
        for c in &v.checks {
            let status = match c.status {
                blockferry::CheckStatus::Pass => "pass",
                blockferry::CheckStatus::Warn => "WARN",
                blockferry::CheckStatus::Fail => "FAIL",
            };
            outln!("  {status:<4}  {:<16} {}: {}", c.id, c.subject, c.reason);
            if let Some(fix) = &c.fix
                && c.status != blockferry::CheckStatus::Pass
            {
                outln!("        fix: {fix}");
            }
        }
        let failed = v
            .checks
            .iter()
            .filter(|c| c.status == blockferry::CheckStatus::Fail)
            .count();
        outln!(
            "{}: {failed} failed, {} warned, {} checks",
            if v.passed { "ready" } else { "NOT READY" },
            v.warnings,
            v.checks.len()
        );
    }
    Ok(if v.passed {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(3)
    })
}
