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

/// splitmix64: a fast, seeded generator for bench data.
#[derive(Debug, Clone)]
pub struct Rng(pub u64);

impl Rng {
    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A number below `n`.
    pub fn below(&mut self, n: usize) -> usize {
        usize::try_from(self.next_u64() % n as u64).unwrap_or(0)
    }

    /// Fills `buf` with random bytes.
    pub fn fill(&mut self, buf: &mut [u8]) {
        for c in buf.chunks_mut(8) {
            let v = self.next_u64().to_le_bytes();
            c.copy_from_slice(&v[..c.len()]);
        }
    }
}

const WORDS: &[&str] = &[
    "the ", "kernel ", "lib", "usr/", "share/", "config ", "0x00", "\n", "error: ", "systemd ",
    "python3 ", "int ", "return ", "{\n", "}\n", "ELF", "GNU ", "linux ", "module ", "= ",
];

/// Writes a disk image of `mib` MiB: `realistic` (a quarter never written, a tenth zeros,
/// OS-like text and binaries, some blocks repeated: what a VM disk holds) or all random.
pub fn make_image(path: &Path, mib: u64, realistic: bool) -> Result<()> {
    use std::io::{Seek, SeekFrom, Write};
    let mut f = std::fs::File::create(path)?;
    f.set_len(mib << 20)?;
    let mut rng = Rng(0x5eed_0fb1_0c00);
    let mut block = vec![0u8; 1 << 20];
    let mut kept: Vec<Vec<u8>> = Vec::new();
    for i in 0..mib {
        let kind = if realistic { rng.next_u64() % 20 } else { 19 };
        match kind {
            // A quarter never written: a hole.
            0..=4 => continue,
            // Written zeros.
            5 | 6 => block.fill(0),
            // OS-like text and code.
            7..=12 => {
                let mut at = 0;
                while at < block.len() {
                    let w = WORDS[rng.below(WORDS.len())].as_bytes();
                    let n = w.len().min(block.len() - at);
                    block[at..at + n].copy_from_slice(&w[..n]);
                    at += n;
                }
            }
            // A block seen before (shared libraries, copies).
            13 | 14 if !kept.is_empty() => {
                let k = rng.below(kept.len());
                block.copy_from_slice(&kept[k]);
            }
            // Compressed or encrypted content.
            _ => rng.fill(&mut block),
        }
        if realistic && kept.len() < 64 && rng.next_u64().is_multiple_of(8) {
            kept.push(block.clone());
        }
        f.seek(SeekFrom::Start(i << 20))?;
        f.write_all(&block)?;
    }
    f.sync_all()?;
    Ok(())
}
