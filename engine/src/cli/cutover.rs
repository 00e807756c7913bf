//! `cutover`: sync until the downtime predicted is within the allowed, then stop the source
//! (pre-hook), take the final delta, verify, bring the target up to date, start it
//! (post-hook); roll back on failure.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::Args;

use blockferry::{Event, ReplicateOptions, SyncChanges, SyncRequest};

use super::{StoreArgs, open_store, print_json, s3_options};

#[derive(Debug, Args)]
pub(crate) struct CutoverArgs {
    /// The live source: a disk image or device, opened again each cycle.
    image: PathBuf,
    #[command(flatten)]
    pub(crate) store: StoreArgs,
    /// The target: a raw file (only changed chunks are written each cycle), or
    /// s3://BUCKET/KEY (a delta export each cycle for raw and vhd-fixed).
    #[arg(long, value_name = "FILE|URL")]
    to: String,
    /// The target's format (a file is raw).
    #[arg(long, value_name = "FORMAT", default_value = "raw")]
    format: String,
    /// The downtime allowed: the cutover starts when the prediction is within it.
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    max_downtime: Duration,
    /// Cut over now, whatever the prediction.
    #[arg(long)]
    now: bool,
    /// Pause between sync cycles.
    #[arg(long, value_name = "DURATION", default_value = "5s", value_parser = humantime::parse_duration)]
    interval: Duration,
    /// Give up (no go) after this many cycles.
    #[arg(long, value_name = "N", default_value_t = 100)]
    max_cycles: u64,
    /// Stops or freezes the source (a shell command).
    #[arg(long, value_name = "CMD")]
    pre_hook: Option<String>,
    /// Starts the target (a shell command; BLOCKFERRY_SNAPSHOT, BLOCKFERRY_TARGET,
    /// BLOCKFERRY_DISK, BLOCKFERRY_FORMAT and BLOCKFERRY_STORE in its environment).
    #[arg(long, value_name = "CMD")]
    post_hook: Option<String>,
    /// Restarts the source when anything after the pre-hook failed (BLOCKFERRY_ERROR says
    /// what).
    #[arg(long, value_name = "CMD")]
    rollback_hook: Option<String>,
    /// How long each hook may take.
    #[arg(long, value_name = "DURATION", default_value = "2m", value_parser = humantime::parse_duration)]
    hook_timeout: Duration,
    /// Each cycle's changes: `hash` (read the disk, keep what differs) or `chain` (the
    /// image is a snapshot child whose allocation is what changed).
    #[arg(long, value_name = "hash|chain", default_value = "hash")]
    changes: String,
    /// The disk's name in the store.
    #[arg(long, value_name = "NAME")]
    name: Option<String>,
    /// Boot the final snapshot before the post-hook (a failed boot rolls back).
    #[arg(long)]
    boot_test: bool,
    /// With --boot-test: the text the console must show.
    #[arg(long, value_name = "REGEX")]
    boot_expect: Option<String>,
    /// Share of the chunks the final delta did not write that are read back too.
    #[arg(long, value_name = "SHARE", default_value_t = 0.01)]
    verify_sample: f64,
    /// Also write the report (JSON) to this file.
    #[arg(long, value_name = "FILE")]
    report: Option<PathBuf>,
}

pub(crate) fn run(a: &CutoverArgs) -> anyhow::Result<ExitCode> {
    let changes = match a.changes.as_str() {
        "hash" => SyncChanges::Hash,
        "chain" => SyncChanges::Chain,
        other => anyhow::bail!("--changes {other:?}: hash or chain"),
    };
    let store = Arc::new(open_store(&a.store)?);
    let cancel = super::sync::cancel_on_signals()?;
    let request = blockferry::CutoverRequest {
        sync: SyncRequest {
            image: a.image.clone(),
            open: blockferry::OpenOptions::default(),
            name: a.name.clone(),
            changes,
            verify_sample: 0.0,
            replicate: ReplicateOptions {
                job_state: Some(a.store.state.dir()?),
                cancel: cancel.clone(),
                ..ReplicateOptions::default()
            },
        },
        max_downtime: a.max_downtime,
        now: a.now,
        interval: a.interval,
        max_cycles: a.max_cycles.max(1),
        pre_hook: a.pre_hook.clone(),
        post_hook: a.post_hook.clone(),
        rollback_hook: a.rollback_hook.clone(),
        hook_timeout: a.hook_timeout,
        to: a.to.clone(),
        format: blockferry::ExportFormat::from_name(&a.format)?,
        export: blockferry::ExportOptions {
            s3: Some(s3_options(&a.store.s3)),
            ..blockferry::ExportOptions::default()
        },
        boot_test: a.boot_test.then(|| blockferry::BootTestOptions {
            expect: a.boot_expect.clone(),
            cancel: cancel.clone(),
            ..blockferry::BootTestOptions::default()
        }),
        verify_sample: a.verify_sample,
        cancel,
    };
    let json = a.store.json;
    let observer = move |e: &Event| {
        if let (Event::Note(m) | Event::Warning(m), false) = (e, json) {
            eprintln!("{m}");
        }
    };
    let report = blockferry::cutover(&store, &request, &observer)?;
    if let Some(path) = &a.report {
        std::fs::write(path, serde_json::to_vec_pretty(&report)?)?;
    }
    if json {
        print_json(&report)?;
    } else {
        outln!(
            "cutover {} after {} sync cycles",
            report.outcome,
            report.cycles
        );
        for s in &report.steps {
            if s.name != "sync" {
                outln!(
                    "  {:<14} {:>7.2}s  {}  {}",
                    s.name,
                    s.seconds,
                    if s.ok { "ok    " } else { "FAILED" },
                    s.detail
                );
            }
        }
        if let (Some(p), Some(m)) = (
            report.predicted_downtime_seconds,
            report.measured_downtime_seconds,
        ) {
            outln!("downtime: predicted {p:.1}s, measured {m:.1}s");
        }
        if let Some(e) = &report.error {
            outln!("error: {e}");
        }
    }
    Ok(if report.outcome == "completed" {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}
