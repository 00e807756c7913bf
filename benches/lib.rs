//! Shared pieces of the end-to-end benchmark harnesses: the machine, the binaries, timing.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, Result, bail};

/// Builds the release `blockferry` binary and returns its path.
pub fn blockferry_release() -> Result<PathBuf> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let status = Command::new(cargo)
        .args([
            "build",
            "--quiet",
            "--release",
            "-p",
            "blockferry",
            "--bin",
            "blockferry",
        ])
        .status()
        .context("running cargo build")?;
    if !status.success() {
        bail!("building blockferry failed");
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    Ok(root.join("target/release/blockferry"))
}

/// One line about the machine: CPU model, cores, memory, kernel.
pub fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .next()
                .map(|l| l.split_whitespace().nth(1).unwrap_or("0").to_owned())
        })
        .and_then(|kb| kb.parse::<u64>().ok())
        .map_or_else(|| "?".into(), |kb| format!("{} GiB", kb >> 20));
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!("{cpu}, {cores} cores, {mem} RAM, Linux {}", kernel.trim())
}

/// Runs a command and returns its wall time in seconds (failing on a non-zero exit).
pub fn time(cmd: &mut Command) -> Result<f64> {
    let start = Instant::now();
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    let secs = start.elapsed().as_secs_f64();
    if !out.status.success() {
        bail!("{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(secs)
}

/// Timings of two commands measured in turns (A, B, A, B, ...), so that whatever else the
/// machine does in the meantime falls on both alike.
#[derive(Debug, Clone)]
pub struct Paired {
    /// Wall times of the first command, sorted.
    pub a: Vec<f64>,
    /// Wall times of the second command, sorted.
    pub b: Vec<f64>,
}

impl Paired {
    /// Runs `a` and `b` in turns, `n` times each.
    pub fn run(
        n: usize,
        mut a: impl FnMut() -> Result<f64>,
        mut b: impl FnMut() -> Result<f64>,
    ) -> Result<Self> {
        let (mut ta, mut tb) = (Vec::with_capacity(n), Vec::with_capacity(n));
        for _ in 0..n {
            ta.push(a()?);
            tb.push(b()?);
        }
        ta.sort_by(f64::total_cmp);
        tb.sort_by(f64::total_cmp);
        Ok(Self { a: ta, b: tb })
    }

    /// Median times of A and B.
    #[must_use]
    pub fn medians(&self) -> (f64, f64) {
        (median(&self.a), median(&self.b))
    }

    /// Best (least disturbed) times of A and B.
    #[must_use]
    pub fn bests(&self) -> (f64, f64) {
        (self.a[0], self.b[0])
    }
}

fn median(sorted: &[f64]) -> f64 {
    let n = sorted.len();
    if n % 2 == 1 {
        sorted[n / 2]
    } else {
        f64::midpoint(sorted[n / 2 - 1], sorted[n / 2])
    }
}
