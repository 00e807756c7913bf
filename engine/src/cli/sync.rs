//! `sync`: continuous replication. Every interval, a delta on the disk's newest snapshot from
//! the change source the user names; the first cycle (no snapshot yet) is a full copy. Each
//! cycle is an ordinary resumable replication, so a killed `sync` picks up where it stopped;
//! SIGINT/SIGTERM cancel the cycle in flight (no snapshot is written) and end the loop.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use clap::Args;
use serde_json::json;

use blockferry::changes::{ChangeFormat, ChangeList, MAX_LIST_BYTES};
use blockferry::pipeline::{Changes, DEFAULT_VERIFY_SAMPLE, DeltaOptions};
use blockferry::{CancelToken, ErrorKind, ReplicateOptions, Silent, Store};

use super::output::{human_bytes, rfc3339};
use super::{StoreArgs, open_store, parse_percent, parse_size};

#[derive(Debug, Args)]
pub(crate) struct SyncArgs {
    /// The disk image (re-opened every cycle).
    image: PathBuf,
    /// Follow parent and extent paths that lead outside the image's folder.
    #[arg(long)]
    allow_outside_folder: bool,
    #[command(flatten)]
    pub(super) store: StoreArgs,
    /// Name of the disk in the store (default: as replicate names it); deltas chain on the
    /// newest snapshot of this name.
    #[arg(long)]
    name: Option<String>,
    /// Time between the starts of two cycles.
    #[arg(long, value_name = "DURATION", default_value = "5m", value_parser = humantime::parse_duration)]
    every: Duration,
    /// Stop after this many cycles (default: run until SIGINT/SIGTERM).
    #[arg(long)]
    cycles: Option<u64>,
    /// A shell command printing the change list since the base on stdout. It gets
    /// BLOCKFERRY_BASE_SNAPSHOT, BLOCKFERRY_BASE_CHANGE_ID (empty before the first copy) and
    /// BLOCKFERRY_DISK_SIZE in its environment.
    #[arg(long, value_name = "CMD", group = "source")]
    changes_command: Option<String>,
    /// A folder where change lists are dropped: each cycle takes the oldest (by name) and
    /// moves it to DIR/done/ once its snapshot is written; no file, no cycle.
    #[arg(long, value_name = "DIR", group = "source")]
    changes_dir: Option<PathBuf>,
    /// `hash`: read everything every cycle and keep what differs by chunk id.
    #[arg(long, value_name = "hash", group = "source")]
    changes: Option<String>,
    /// The image is a snapshot-chain child whose allocation is what changed.
    #[arg(long, group = "source")]
    changes_from_chain: bool,
    /// The change lists' format, instead of detecting it.
    #[arg(long, value_name = "vmware-cbt|hyperv-rct|extents")]
    changes_format: Option<String>,
    /// Share of the chunks a list calls unchanged that each cycle reads to check it.
    #[arg(long, value_name = "PERCENT", default_value = "1%", value_parser = parse_percent)]
    verify_sample: f64,
    /// Memory the pipeline may use for data in flight (default: 64 MiB per core, at least
    /// 256 MiB, at most an eighth of the machine's or the container's memory, and never less
    /// than the store's chunk size needs).
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    memory_budget: Option<u64>,
}

/// Opens the image as the arguments say.
fn open_image(a: &SyncArgs) -> blockferry::Result<Box<dyn blockferry::image::BlockSource>> {
    let opts = blockferry::image::OpenOptions {
        allow_outside_folder: a.allow_outside_folder,
        ..blockferry::image::OpenOptions::default()
    };
    blockferry::image::open_with(&a.image, &opts)
}

/// Where this cycle's changes come from.
enum Source {
    /// A list, and the dropped files it came from (moved to `done/` after the snapshot).
    List(ChangeList, Vec<PathBuf>),
    Hash,
    /// Nothing to do this cycle (no list dropped).
    Nothing,
}

/// When the disk's newest snapshot in the store was written, if it has one.
fn newest_snapshot(store: &Store, disk: &str) -> Option<(SystemTime, Instant)> {
    let newest = store.latest_of(disk).ok()??;
    let at = UNIX_EPOCH + Duration::from_millis(newest.created_unix_ms);
    let age = SystemTime::now().duration_since(at).unwrap_or_default();
    Some((at, Instant::now().checked_sub(age)?))
}

/// A cancel token that SIGINT and SIGTERM set: the command stops cleanly at its next check.
pub(super) fn cancel_on_signals() -> anyhow::Result<CancelToken> {
    let stop = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(signal, Arc::clone(&stop))
            .context("installing a signal handler")?;
    }
    Ok(CancelToken::from_flag(stop))
}

pub(crate) fn run(a: &SyncArgs) -> anyhow::Result<ExitCode> {
    if a.changes.as_deref().is_some_and(|c| c != "hash") {
        anyhow::bail!(
            "sync --changes takes only `hash` (use --changes-dir or --changes-command for lists)"
        );
    }
    if a.changes_command.is_none()
        && a.changes_dir.is_none()
        && a.changes.is_none()
        && !a.changes_from_chain
    {
        anyhow::bail!(
            "sync needs a change source: --changes-command CMD, --changes-dir DIR, \
             --changes hash or --changes-from-chain"
        );
    }
    let cancel = cancel_on_signals()?;
    let store = open_store(&a.store)?;
    // The disk's name as a replication of this image records it (the image's file name,
    // unless another source has that).
    let disk = match &a.name {
        Some(name) => name.clone(),
        None => blockferry::pipeline::disk_name(&store, open_image(a)?.as_ref(), None)?,
    };
    // A restarted sync reports the lag from the disk's newest snapshot until its own first.
    let mut last_success = newest_snapshot(&store, &disk);
    let mut cycle = 0u64;
    while a.cycles.is_none_or(|n| cycle < n) && !cancel.is_cancelled() {
        cycle += 1;
        let started = Instant::now();
        let started_at = SystemTime::now();
        match run_cycle(a, &store, &disk, &cancel) {
            Ok(Some(report)) => {
                last_success = Some((started_at, started));
                print_cycle(a, cycle, Some(&report), None, last_success)?;
            }
            Ok(None) => print_cycle(a, cycle, None, None, last_success)?,
            Err(e) if cancel.is_cancelled() => {
                tracing::debug!("cycle cancelled: {e:#}");
                break;
            }
            Err(e) => print_cycle(a, cycle, None, Some(&e), last_success)?,
        }
        if a.cycles.is_some_and(|n| cycle >= n) {
            break;
        }
        // Wait for the next tick, waking for a signal.
        let next = started + a.every;
        while Instant::now() < next && !cancel.is_cancelled() {
            std::thread::sleep((next - Instant::now()).min(Duration::from_millis(100)));
        }
    }
    if cancel.is_cancelled() {
        eprintln!("sync stopped by signal; no partial snapshot was written");
    }
    Ok(ExitCode::SUCCESS)
}

/// One cycle: the change source, then a replication (full if the disk has no snapshot yet).
fn run_cycle(
    a: &SyncArgs,
    store: &Store,
    disk: &str,
    cancel: &CancelToken,
) -> anyhow::Result<Option<blockferry::ReplicateReport>> {
    let size = open_image(a)?.info().virtual_size;
    let base = store.latest_of(disk)?;
    let format = a
        .changes_format
        .as_deref()
        .map(ChangeFormat::from_name)
        .transpose()?;
    let changes = if let Some(cmd) = &a.changes_command {
        let out = run_command(cmd, base.as_ref(), size)?;
        Source::List(
            ChangeList::parse(&out, format, size).context("the changes command's output")?,
            Vec::new(),
        )
    } else if let Some(dir) = &a.changes_dir {
        let files = pending_files(dir)?;
        if files.is_empty() {
            Source::Nothing
        } else {
            Source::List(merge_lists(&files, format, size)?, files)
        }
    } else if a.changes_from_chain {
        Source::List(ChangeList::from_chain(open_image(a)?.as_ref())?, Vec::new())
    } else {
        Source::Hash
    };
    // Opened after the change source ran (a command may have just written the disk, or
    // snapshotted it): the state read is the one the list describes.
    let source = open_image(a)?;
    if source.info().virtual_size != size {
        anyhow::bail!(
            "{} changed size while its change list was taken",
            a.image.display()
        );
    }
    let mut done_files = Vec::new();
    let (delta, change_id) = match (changes, &base) {
        (Source::Nothing, Some(_)) => return Ok(None),
        // The first copy needs no list.
        (Source::Nothing | Source::Hash, None) => (None, None),
        (Source::List(list, file), None) => {
            done_files = file;
            (None, list.new_change_id)
        }
        (Source::List(list, file), Some(b)) => {
            done_files = file;
            let id = list.new_change_id.clone();
            (
                Some(DeltaOptions {
                    base: b.id.clone(),
                    changes: Changes::List(list),
                    verify_sample: a.verify_sample,
                    change_id: None,
                }),
                id,
            )
        }
        (Source::Hash, Some(b)) => (
            Some(DeltaOptions {
                base: b.id.clone(),
                changes: Changes::Hash,
                verify_sample: DEFAULT_VERIFY_SAMPLE,
                change_id: None,
            }),
            None,
        ),
    };
    let opts = ReplicateOptions {
        memory_budget: a
            .memory_budget
            .map_or(0, |b| usize::try_from(b).unwrap_or(usize::MAX).max(1)),
        disk_name: Some(disk.to_owned()),
        cancel: cancel.clone(),
        job_state: Some(a.store.state.dir()?),
        restart_if_changed: true,
        delta,
        change_id,
        ..ReplicateOptions::default()
    };
    let report = blockferry::replicate(store, source.as_ref(), &opts, &Silent)?;
    // Only now, with the snapshot durable. (Stopped before this, the next cycle takes these
    // lists again with any newer ones: more than needed is read, nothing is missed.)
    for file in done_files {
        let done = file.parent().unwrap_or(Path::new(".")).join("done");
        std::fs::create_dir_all(&done).with_context(|| format!("creating {}", done.display()))?;
        let to = done.join(file.file_name().unwrap_or_default());
        std::fs::rename(&file, &to)
            .with_context(|| format!("moving {} to {}", file.display(), to.display()))?;
    }
    Ok(Some(report))
}

/// Runs the user's changes command; its stdout (at most the list cap) is the list.
fn run_command(
    cmd: &str,
    base: Option<&blockferry::Snapshot>,
    size: u64,
) -> anyhow::Result<Vec<u8>> {
    let mut child = Command::new("sh")
        .args(["-c", cmd])
        .env(
            "BLOCKFERRY_BASE_SNAPSHOT",
            base.map_or("", |b| b.id.as_str()),
        )
        .env(
            "BLOCKFERRY_BASE_CHANGE_ID",
            base.and_then(|b| b.change_id.as_deref()).unwrap_or(""),
        )
        .env("BLOCKFERRY_DISK_SIZE", size.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .with_context(|| format!("running the changes command {cmd:?}"))?;
    let mut out = Vec::new();
    child
        .stdout
        .take()
        .context("the changes command's stdout")?
        .take(MAX_LIST_BYTES + 1)
        .read_to_end(&mut out)
        .context("reading the changes command's output")?;
    if out.len() as u64 > MAX_LIST_BYTES {
        // It would block on a full pipe for ever: stop it.
        let _ = child.kill();
        let _ = child.wait();
        anyhow::bail!(
            "the changes command {cmd:?} printed more than {} MiB",
            MAX_LIST_BYTES >> 20
        );
    }
    let status = child.wait().context("waiting for the changes command")?;
    if !status.success() {
        anyhow::bail!("the changes command {cmd:?} failed ({status})");
    }
    Ok(out)
}

/// The change lists waiting in `dir`, oldest (by name) first; dot files (lists still being
/// written: drop a list as a dot file, then rename it) and folders are skipped.
fn pending_files(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let entry = entry?;
        let name = entry.file_name();
        if entry.file_type()?.is_file() && !name.to_string_lossy().starts_with('.') {
            files.push(entry.path());
        }
    }
    files.sort();
    Ok(files)
}

/// All waiting lists as one: the union of their extents, from the first one's base to the
/// last one's new change id (each must follow the one before, when they say).
fn merge_lists(
    files: &[PathBuf],
    format: Option<ChangeFormat>,
    size: u64,
) -> anyhow::Result<ChangeList> {
    let mut merged: Option<ChangeList> = None;
    for file in files {
        if std::fs::metadata(file).is_ok_and(|m| m.len() == 0) {
            anyhow::bail!(
                "{} is empty: drop change lists whole (write a dot file, then rename it)",
                file.display()
            );
        }
        let list = ChangeList::read(file, format, size)?;
        merged = Some(match merged {
            None => list,
            Some(mut m) => {
                if let (Some(prev), Some(base)) = (&m.new_change_id, &list.base_change_id)
                    && prev != base
                {
                    anyhow::bail!(
                        "{} was taken against change id {base:?}, but the list before it \
                         ends at {prev:?}",
                        file.display()
                    );
                }
                if m.format != list.format {
                    m.format = ChangeFormat::Extents;
                }
                m.extents = m.extents.union(&list.extents);
                m.new_change_id = list.new_change_id.or(m.new_change_id);
                m
            }
        });
    }
    merged.context("no change list")
}

fn print_cycle(
    a: &SyncArgs,
    cycle: u64,
    report: Option<&blockferry::ReplicateReport>,
    error: Option<&anyhow::Error>,
    last_success: Option<(SystemTime, Instant)>,
) -> anyhow::Result<()> {
    // The replication lag (RPO): how old the newest snapshot's view of the disk is.
    let lag = last_success.map(|(_, at)| at.elapsed().as_secs_f64());
    let last = last_success.map(|(t, _)| {
        rfc3339(
            t.duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
        )
    });
    if a.store.json {
        let mut line = json!({
            "cycle": cycle,
            "lag_seconds": lag,
            "last_success": last,
        });
        if let Some(r) = report {
            line["report"] = serde_json::to_value(r).unwrap_or_default();
        }
        if let Some(e) = error {
            line["error"] = json!(format!("{e:#}"));
            if let Some(k) = e
                .downcast_ref::<blockferry::Error>()
                .map(blockferry::Error::kind)
            {
                line["kind"] = json!(format!("{k:?}"));
            }
        }
        // One line per cycle, for log shippers.
        outln!("{}", serde_json::to_string(&line)?);
        return Ok(());
    }
    let lag = lag.map_or_else(|| "-".to_owned(), |s| format!("{s:.0}s"));
    let last = last.unwrap_or_else(|| "never".to_owned());
    match (report, error) {
        (Some(r), _) => eprintln!(
            "cycle {cycle}: snapshot {}{} read {}, new {}; lag {lag}, last success {last}",
            r.snapshot,
            r.base
                .as_deref()
                .map(|b| format!(" (delta on {b})"))
                .unwrap_or_default(),
            human_bytes(r.bytes_read),
            human_bytes(r.bytes_new),
        ),
        (None, Some(e)) => {
            let hint = match e
                .downcast_ref::<blockferry::Error>()
                .map(blockferry::Error::kind)
            {
                Some(ErrorKind::InvalidChangeList) => " (the list was refused)",
                _ => "",
            };
            eprintln!("cycle {cycle}: failed{hint}: {e:#}; lag {lag}, last success {last}");
        }
        (None, None) => {
            eprintln!("cycle {cycle}: no change list yet; lag {lag}, last success {last}");
        }
    }
    Ok(())
}
