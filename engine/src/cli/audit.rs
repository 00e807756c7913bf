//! `blockferry audit verify | log`: the store's tamper-evident audit log.

use std::fmt::Write;
use std::process::ExitCode;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use clap::{Args, Subcommand};

use super::{StoreArgs, open_store, print_json};

#[derive(Debug, Subcommand)]
pub(crate) enum AuditCommand {
    /// Check every chain of the log: each record present, authentic, in place and linked;
    /// cross-references and the heads this client saw present; every snapshot recorded.
    /// Exit 3 when a problem is found.
    Verify(AuditVerifyArgs),
    /// List the records, oldest first.
    Log(AuditLogArgs),
}

impl AuditCommand {
    pub(crate) fn json(&self) -> bool {
        match self {
            AuditCommand::Verify(a) => a.store.json,
            AuditCommand::Log(a) => a.store.json,
        }
    }
}

#[derive(Debug, Args)]
pub(crate) struct AuditVerifyArgs {
    #[command(flatten)]
    store: StoreArgs,
}

#[derive(Debug, Args)]
pub(crate) struct AuditLogArgs {
    #[command(flatten)]
    store: StoreArgs,
    /// Only records from this date (YYYY-MM-DD, an RFC 3339 time) or this long ago (`24h`).
    #[arg(long, value_name = "DATE|DURATION")]
    since: Option<String>,
    /// Only records about this disk.
    #[arg(long, value_name = "DISK")]
    disk: Option<String>,
}

/// `--since` as Unix milliseconds.
pub(crate) fn since_ms(since: &str) -> anyhow::Result<u64> {
    let at = if let Ok(ago) = humantime::parse_duration(since) {
        SystemTime::now().checked_sub(ago).unwrap_or(UNIX_EPOCH)
    } else {
        let text = if since.len() == 10 {
            format!("{since}T00:00:00Z")
        } else {
            since.to_owned()
        };
        humantime::parse_rfc3339_weak(&text).map_err(|e| {
            anyhow::anyhow!("--since {since:?}: a date (YYYY-MM-DD), a time or a duration ({e})")
        })?
    };
    Ok(u64::try_from(
        at.duration_since(UNIX_EPOCH)
            .unwrap_or(Duration::ZERO)
            .as_millis(),
    )
    .unwrap_or(u64::MAX))
}

pub(crate) fn run(cmd: &AuditCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        AuditCommand::Verify(a) => {
            let store = open_store(&a.store)?;
            let report = store.audit_verify()?;
            if a.store.json {
                print_json(&report)?;
            } else {
                for r in &report.log {
                    outln!("{}", line(r));
                }
                for p in &report.problems {
                    if p.chain.is_empty() {
                        outln!("PROBLEM {}", p.problem);
                    } else {
                        outln!(
                            "PROBLEM chain {} record {}: {}",
                            p.chain,
                            p.position,
                            p.problem
                        );
                    }
                }
                outln!(
                    "{}: {} records in {} chains, {} problems",
                    if report.passed {
                        "the audit log is whole"
                    } else {
                        "THE AUDIT LOG WAS TAMPERED WITH OR DAMAGED"
                    },
                    report.records,
                    report.chains,
                    report.problems.len()
                );
            }
            Ok(if report.passed {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(3)
            })
        }
        AuditCommand::Log(a) => {
            let store = open_store(&a.store)?;
            let report = store.audit_verify()?;
            let since = a.since.as_deref().map(since_ms).transpose()?.unwrap_or(0);
            let records: Vec<&blockferry::AuditRecord> = report
                .log
                .iter()
                .filter(|r| r.time_unix_ms >= since)
                .filter(|r| a.disk.is_none() || r.disk == a.disk)
                .collect();
            if a.store.json {
                print_json(&records)?;
            } else {
                for r in records {
                    outln!("{}", line(r));
                }
                if !report.passed {
                    outln!(
                        "warning: `blockferry audit verify` finds {} problems in the log",
                        report.problems.len()
                    );
                }
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn line(r: &blockferry::AuditRecord) -> String {
    let when =
        humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_millis(r.time_unix_ms));
    let mut s = format!(
        "{when}  {:<10} {:<4}",
        r.op,
        if r.result == "ok" { "ok" } else { "FAILED" }
    );
    for (k, v) in [
        ("disk", &r.disk),
        ("snapshot", &r.snapshot),
        ("object", &r.object),
    ] {
        if let Some(v) = v {
            let _ = write!(s, " {k}={v}");
        }
    }
    if let Some(b) = r.bytes {
        let _ = write!(s, " bytes={b}");
    }
    let _ = write!(
        s,
        " by {}@{} ({}) chain {}#{}",
        r.user, r.host, r.tool, r.chain, r.seq
    );
    if r.result != "ok" {
        let _ = write!(s, ": {}", r.result);
    }
    s
}

#[derive(Debug, Args)]
pub(crate) struct ReportArgs {
    #[command(flatten)]
    pub(crate) store: StoreArgs,
    /// The period: from this date (YYYY-MM-DD, an RFC 3339 time) or this long ago (`30d`).
    #[arg(long, value_name = "DATE|DURATION")]
    since: Option<String>,
    /// html (one self-contained file with a timeline per disk), json or md.
    #[arg(long, value_name = "html|json|md", default_value = "md")]
    format: String,
    /// Write the report to this file instead of stdout.
    #[arg(long, short, value_name = "FILE")]
    output: Option<std::path::PathBuf>,
}

/// Exit 0, or 3 when the audit log did not verify (the report says so too).
pub(crate) fn report(a: &ReportArgs) -> anyhow::Result<ExitCode> {
    let store = open_store(&a.store)?;
    let since = a.since.as_deref().map(since_ms).transpose()?;
    let report = blockferry::compliance_report(&store, since)?;
    let text = match a.format.as_str() {
        "html" => report.to_html(),
        "md" => report.to_markdown(),
        "json" => serde_json::to_string_pretty(&report)? + "\n",
        other => anyhow::bail!("--format {other:?}: html, json or md"),
    };
    match &a.output {
        Some(path) => std::fs::write(path, text)
            .map_err(|e| anyhow::anyhow!("writing {}: {e}", path.display()))?,
        None => outln!("{}", text.trim_end()),
    }
    Ok(if report.audit_passed {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(3)
    })
}
