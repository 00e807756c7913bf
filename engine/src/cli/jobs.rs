//! `jobs`, `abandon`, `cleanup`: the replication jobs the job database records, and the
//! multipart uploads stopped jobs leave in a store.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Args;
use serde_json::json;

use blockferry::{JobDb, JobKind, JobState, default_state_dir};

use super::output::{human_bytes, rfc3339};
use super::{S3Args, StoreArgs, backend, print_json, s3_options};

/// Where the job database lives.
#[derive(Debug, Args)]
pub(crate) struct StateArgs {
    /// Folder of the job database (default: BLOCKFERRY_STATE_DIR, else
    /// $XDG_STATE_HOME/blockferry, else ~/.local/state/blockferry).
    #[arg(long, value_name = "DIR")]
    state_dir: Option<PathBuf>,
}

impl StateArgs {
    pub(crate) fn dir(&self) -> anyhow::Result<PathBuf> {
        match &self.state_dir {
            Some(d) => Ok(d.clone()),
            None => Ok(default_state_dir()?),
        }
    }
}

#[derive(Debug, Args)]
pub(crate) struct JobsArgs {
    #[command(flatten)]
    state: StateArgs,
    /// Print the jobs as JSON on stdout.
    #[arg(long)]
    pub(crate) json: bool,
}

#[derive(Debug, Args)]
pub(crate) struct AbandonArgs {
    /// The job id (or a unique prefix of it), as `blockferry jobs` shows.
    job: String,
    #[command(flatten)]
    state: StateArgs,
    #[command(flatten)]
    s3: S3Args,
    /// Print the result as JSON on stdout.
    #[arg(long)]
    pub(crate) json: bool,
}

#[derive(Debug, Args)]
pub(crate) struct CleanupArgs {
    #[command(flatten)]
    pub(crate) store: StoreArgs,
    /// Only uploads started longer ago than this (uploads of jobs still running on other
    /// hosts are younger).
    #[arg(long, value_name = "DURATION", default_value = "24h", value_parser = humantime::parse_duration)]
    older_than: Duration,
    /// Show what would be aborted without aborting anything.
    #[arg(long)]
    dry_run: bool,
    /// Also abort the uploads of jobs the store records as under way (stopped jobs of any
    /// host, which could still resume them; running ones too, which then fail).
    #[arg(long)]
    include_stopped_jobs: bool,
}

pub(crate) fn list(a: &JobsArgs) -> anyhow::Result<ExitCode> {
    let db = JobDb::open(&a.state.dir()?)?;
    let jobs = db.list()?;
    if a.json {
        print_json(&json!({ "jobs": jobs }))?;
        return Ok(ExitCode::SUCCESS);
    }
    if jobs.is_empty() {
        eprintln!("no jobs in {}", db.dir().display());
        return Ok(ExitCode::SUCCESS);
    }
    outln!(
        "{:<16}  {:<8}  {:<20}  {:>4}  {:>10}  {:>10}  FROM → TO",
        "JOB",
        "STATE",
        "UPDATED",
        "RUNS",
        "SENT",
        "RESENT"
    );
    for j in &jobs {
        let state = match (j.state, j.running) {
            (JobState::Done, _) => "done",
            (JobState::Active, true) => "running",
            (JobState::Active, false) => "stopped",
        };
        outln!(
            "{:<16}  {:<8}  {:<20}  {:>4}  {:>10}  {:>10}  {} → {}{}",
            j.id,
            state,
            rfc3339(j.updated_unix_ms),
            j.runs,
            human_bytes(j.bytes_sent),
            human_bytes(j.bytes_resent),
            if j.kind == JobKind::Export {
                &j.store
            } else {
                &j.source
            },
            if j.kind == JobKind::Export {
                &j.source
            } else {
                &j.store
            },
            j.snapshot
                .as_ref()
                .map(|s| format!(" (snapshot {s})"))
                .or_else(|| j.last_error.as_ref().map(|e| format!(" (stopped on: {e})")))
                .unwrap_or_default(),
        );
    }
    Ok(ExitCode::SUCCESS)
}

pub(crate) fn abandon(a: &AbandonArgs) -> anyhow::Result<ExitCode> {
    let db = JobDb::open(&a.state.dir()?)?;
    let job = db.abandon_job(&a.job, &s3_options(&a.s3))?;
    if a.json {
        print_json(&json!({ "abandoned": job.id }))?;
    } else {
        eprintln!(
            "job {} abandoned: its uploads are aborted and it is forgotten",
            job.id
        );
    }
    Ok(ExitCode::SUCCESS)
}

#[derive(Debug, Args)]
pub(crate) struct UnpinArgs {
    /// The store: a local folder or s3://BUCKET/PREFIX.
    #[arg(long, value_name = "PATH|URL")]
    store: String,
    #[command(flatten)]
    state: StateArgs,
    /// Print the result as JSON on stdout.
    #[arg(long)]
    pub(crate) json: bool,
}

pub(crate) fn unpin(a: &UnpinArgs) -> anyhow::Result<ExitCode> {
    let db = JobDb::open(&a.state.dir()?)?;
    let location = blockferry::pin_location(&a.store);
    let known = db.unpin_store(&location)?;
    if a.json {
        print_json(&json!({ "store": location, "forgotten": known }))?;
    } else if known {
        eprintln!("forgot this client's record of the store at {location}");
    } else {
        eprintln!("this client had no record of a store at {location}");
    }
    Ok(ExitCode::SUCCESS)
}

pub(crate) fn cleanup(a: &CleanupArgs) -> anyhow::Result<ExitCode> {
    let backend = backend(&a.store, false)?;
    let db = JobDb::open(&a.store.state.dir()?)?;
    let report = db.cleanup_uploads(&backend, a.older_than, a.include_stopped_jobs, a.dry_run)?;
    let (aborted, kept) = (report.aborted, report.kept);
    if a.store.json {
        print_json(&json!({ "aborted": aborted, "kept": kept, "dry_run": a.dry_run }))?;
    } else {
        eprintln!(
            "{} {} stale multipart upload(s) of {}; kept {kept} (younger than {}, of jobs \
             that may still resume, or not blockferry's)",
            if a.dry_run { "would abort" } else { "aborted" },
            aborted.len(),
            backend.location(),
            humantime::format_duration(a.older_than)
        );
        if backend.location().starts_with("s3://") {
            eprintln!(
                "hint: a bucket lifecycle rule does this on the S3 side too: \
                 AbortIncompleteMultipartUpload with DaysAfterInitiation (e.g. 7) on the \
                 store's prefix"
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}
