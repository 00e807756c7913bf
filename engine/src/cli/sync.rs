//! `sync`: continuous replication. Every interval, a cycle of the engine's [`ContinuousReplication`] (a delta on
//! the disk's newest snapshot from the change source the user names; see
//! `blockferry::pipeline::sync`). This module keeps the loop, the signals (SIGINT/SIGTERM
//! cancel the cycle in flight, no snapshot is written, and end the loop), the changes
//! command and the output.

use std::io::Read;
use std::path::PathBuf;
use std::process::{Command, ExitCode, Stdio};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use serde_json::json;

use blockferry::MAX_LIST_BYTES;
use blockferry::{
    CancelToken, ChangeFormat, ContinuousReplication, CycleBase, ErrorKind, ReplicateOptions,
    Silent, SyncChanges, SyncCycle, SyncRequest, SyncStatus,
};

use super::metrics::{CycleObserver, SyncMetrics};
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
    /// Serve Prometheus metrics (bytes sent, cycles, lag) at http://ADDR/metrics, as
    /// HOST:PORT (port 0: any free port, printed on stderr).
    #[arg(long, value_name = "HOST:PORT")]
    metrics: Option<String>,
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

/// The engine's request from the arguments.
fn request(a: &SyncArgs) -> anyhow::Result<SyncRequest> {
    let format = a
        .changes_format
        .as_deref()
        .map(ChangeFormat::from_name)
        .transpose()?;
    let changes = if a.changes_command.is_some() {
        SyncChanges::Given { format }
    } else if let Some(dir) = &a.changes_dir {
        SyncChanges::Folder {
            dir: dir.clone(),
            format,
        }
    } else if a.changes_from_chain {
        SyncChanges::Chain
    } else if a.changes.as_deref() == Some("hash") {
        SyncChanges::Hash
    } else if a.changes.is_some() {
        anyhow::bail!(
            "sync --changes takes only `hash` (use --changes-dir or --changes-command for lists)"
        );
    } else {
        anyhow::bail!(
            "sync needs a change source: --changes-command CMD, --changes-dir DIR, \
             --changes hash or --changes-from-chain"
        );
    };
    Ok(SyncRequest {
        image: a.image.clone(),
        open: blockferry::OpenOptions {
            allow_outside_folder: a.allow_outside_folder,
            ..blockferry::OpenOptions::default()
        },
        name: a.name.clone(),
        changes,
        verify_sample: a.verify_sample,
        replicate: ReplicateOptions {
            memory_budget: a
                .memory_budget
                .map_or(0, |b| usize::try_from(b).unwrap_or(usize::MAX).max(1)),
            job_state: Some(a.store.state.dir()?),
            ..ReplicateOptions::default()
        },
    })
}

pub(crate) fn run(a: &SyncArgs) -> anyhow::Result<ExitCode> {
    let request = request(a)?;
    let cancel = cancel_on_signals()?;
    let store = open_store(&a.store)?;
    let mut sync = ContinuousReplication::new(&store, request)?;
    let metrics = match &a.metrics {
        Some(addr) => {
            let m = Arc::new(SyncMetrics::new(sync.disk()));
            let at = m.serve(addr)?;
            eprintln!("metrics: http://{at}/metrics");
            Some(m)
        }
        None => None,
    };
    while a.cycles.is_none_or(|n| sync.status().cycle < n) && !cancel.is_cancelled() {
        let started = Instant::now();
        let given = match &a.changes_command {
            Some(cmd) => match sync
                .base(&store)
                .map_err(anyhow::Error::from)
                .and_then(|b| run_command(cmd, &b))
            {
                Ok(list) => Some(list),
                Err(e) => {
                    // The cycle fails before it starts: counted like any failed cycle.
                    let status = sync.fail_cycle();
                    if let Some(m) = &metrics {
                        m.cycle_done(&status, None, started.elapsed().as_secs_f64());
                    }
                    print_cycle(a, &status, None, Some(&e))?;
                    wait(started + a.every, &cancel);
                    continue;
                }
            },
            None => None,
        };
        let outcome = match &metrics {
            Some(m) => sync.cycle(&store, given.as_deref(), &cancel, &CycleObserver::new(m)),
            None => sync.cycle(&store, given.as_deref(), &cancel, &Silent),
        };
        let seconds = started.elapsed().as_secs_f64();
        match outcome {
            Ok(c) => {
                if let Some(m) = &metrics {
                    m.cycle_done(&c.status, Some(&c), seconds);
                }
                print_cycle(a, &c.status, Some(&c), None)?;
            }
            Err(e) if cancel.is_cancelled() => {
                tracing::debug!("cycle cancelled: {e:#}");
                break;
            }
            Err(e) => {
                let status = sync.status();
                if let Some(m) = &metrics {
                    m.cycle_done(&status, None, seconds);
                }
                print_cycle(a, &status, None, Some(&e.into()))?;
            }
        }
        if a.cycles.is_some_and(|n| sync.status().cycle >= n) {
            break;
        }
        wait(started + a.every, &cancel);
    }
    if cancel.is_cancelled() {
        eprintln!("sync stopped by signal; no partial snapshot was written");
    }
    Ok(ExitCode::SUCCESS)
}

/// Waits until `next`, waking for a signal.
fn wait(next: Instant, cancel: &CancelToken) {
    while Instant::now() < next && !cancel.is_cancelled() {
        std::thread::sleep((next - Instant::now()).min(Duration::from_millis(100)));
    }
}

/// Runs the user's changes command; its stdout (at most the list cap) is the list.
fn run_command(cmd: &str, base: &CycleBase) -> anyhow::Result<Vec<u8>> {
    let mut child = Command::new("sh")
        .args(["-c", cmd])
        .env(
            "BLOCKFERRY_BASE_SNAPSHOT",
            base.snapshot.as_deref().unwrap_or(""),
        )
        .env(
            "BLOCKFERRY_BASE_CHANGE_ID",
            base.change_id.as_deref().unwrap_or(""),
        )
        .env("BLOCKFERRY_DISK_SIZE", base.disk_size.to_string())
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

fn print_cycle(
    a: &SyncArgs,
    status: &SyncStatus,
    cycle: Option<&SyncCycle>,
    error: Option<&anyhow::Error>,
) -> anyhow::Result<()> {
    let report = cycle.and_then(|c| c.report.as_ref());
    let last = status.last_success_unix_ms.map(rfc3339);
    let n = status.cycle;
    if a.store.json {
        let mut line = json!({
            "cycle": n,
            "lag_seconds": status.lag_seconds,
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
    let lag = status
        .lag_seconds
        .map_or_else(|| "-".to_owned(), |s| format!("{s:.0}s"));
    let last = last.unwrap_or_else(|| "never".to_owned());
    match (report, error) {
        (Some(r), _) => eprintln!(
            "cycle {n}: snapshot {}{} read {}, new {}; lag {lag}, last success {last}",
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
            eprintln!("cycle {n}: failed{hint}: {e:#}; lag {lag}, last success {last}");
        }
        (None, None) => {
            eprintln!("cycle {n}: no change list yet; lag {lag}, last success {last}");
        }
    }
    Ok(())
}
