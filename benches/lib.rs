//! Shared pieces of the end-to-end benchmark harnesses: the machine, the binaries, timing.

use std::fmt::Write as _;
use std::os::unix::fs::FileExt;
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
            7..=12 => fill_words(&mut rng, &mut block, false),
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

/// Writes a dense, OS-like disk image of `mib` MiB in which no 4 KiB page repeats (nothing to
/// skip or deduplicate): text pages (configuration, logs, source), code-like pages (random
/// words with zeroed high bytes, as in binaries) and random pages (compressed or encrypted
/// files). lz4 stores it at about 0.7 of its size (0.68 measured).
pub fn make_os_image(path: &Path, mib: u64, seed: u64) -> Result<()> {
    use std::io::Write;
    let mut f = std::io::BufWriter::with_capacity(4 << 20, std::fs::File::create(path)?);
    let mut rng = Rng(seed);
    let mut page = [0u8; 4096];
    for _ in 0..mib * 256 {
        os_page(&mut rng, &mut page);
        f.write_all(&page)?;
    }
    f.into_inner()
        .map_err(std::io::IntoInnerError::into_error)?
        .sync_all()?;
    Ok(())
}

/// Fills one page of OS-like content (see [`make_os_image`]).
pub fn os_page(rng: &mut Rng, page: &mut [u8]) {
    match rng.next_u64() % 20 {
        // A number now and then, as in logs: the text never repeats exactly.
        0..=10 => fill_words(rng, page, true),
        11..=14 => {
            for c in page.chunks_mut(8) {
                let v = rng.next_u64();
                let v = if v.is_multiple_of(4) { v } else { v & 0xffff };
                c.copy_from_slice(&v.to_le_bytes()[..c.len()]);
            }
        }
        _ => rng.fill(page),
    }
}

/// Fills `buf` with OS-like words, with a number after about one word in four if
/// `numbers` is set.
fn fill_words(rng: &mut Rng, buf: &mut [u8], numbers: bool) {
    let mut at = 0;
    while at < buf.len() {
        let w = WORDS[rng.below(WORDS.len())].as_bytes();
        let n = w.len().min(buf.len() - at);
        buf[at..at + n].copy_from_slice(&w[..n]);
        at += n;
        if numbers && at + 8 < buf.len() && rng.next_u64().is_multiple_of(4) {
            let v = rng.next_u64() % 100_000;
            let digits = format!("{v} ");
            buf[at..at + digits.len()].copy_from_slice(digits.as_bytes());
            at += digits.len();
        }
    }
}

/// Wall time and peak resident memory of a finished command.
#[derive(Debug, Clone, Copy)]
pub struct Measured {
    /// Wall seconds.
    pub secs: f64,
    /// Peak resident set size in bytes (0 where unknown).
    pub peak_rss: u64,
}

/// Runs a command (failing on a non-zero exit) and measures its wall time and peak RSS
/// (`wait4`'s resource usage of that one child). Returns the measurement and its stdout.
pub fn measure(cmd: &mut Command) -> Result<(Measured, String)> {
    use std::io::Read;
    use std::process::Stdio;
    let start = Instant::now();
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("running {cmd:?}"))?;
    // Drained on threads, so a chatty child never blocks on a full pipe.
    let mut out_pipe = child.stdout.take().context("no stdout")?;
    let mut err_pipe = child.stderr.take().context("no stderr")?;
    let out_thread = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out_pipe.read_to_string(&mut s);
        s
    });
    let err_thread = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err_pipe.read_to_string(&mut s);
        s
    });
    let pid = libc::pid_t::try_from(child.id()).context("pid out of range")?;
    let mut status = 0;
    // SAFETY: an all-zero rusage is a valid value of this plain C struct.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `pid` is our own child, not yet reaped (`child` is never waited on); `status`
    // and `usage` are valid for writes for the duration of the call.
    let rc = unsafe { libc::wait4(pid, &raw mut status, 0, &raw mut usage) };
    let secs = start.elapsed().as_secs_f64();
    if rc != pid {
        bail!("waiting for {cmd:?}: {}", std::io::Error::last_os_error());
    }
    let out = out_thread.join().unwrap_or_default();
    let err = err_thread.join().unwrap_or_default();
    if !libc::WIFEXITED(status) || libc::WEXITSTATUS(status) != 0 {
        bail!("{cmd:?} failed: {err}");
    }
    // ru_maxrss is in KiB on Linux.
    let peak_rss = u64::try_from(usage.ru_maxrss).unwrap_or(0) * 1024;
    Ok((Measured { secs, peak_rss }, out))
}

/// Reads a file's data (holes skipped: a 1 TiB thin file holds little), so that the next run
/// finds it in the page cache.
pub fn warm(path: &Path) -> Result<()> {
    use std::os::fd::AsRawFd;
    let f = std::fs::File::open(path)?;
    let len = i64::try_from(f.metadata()?.len())?;
    let fd = f.as_raw_fd();
    let mut buf = vec![0u8; 8 << 20];
    let mut pos = 0i64;
    while pos < len {
        // SAFETY: lseek(2) on a descriptor this function owns; no memory is passed.
        let data = unsafe { libc::lseek(fd, pos, libc::SEEK_DATA) };
        if data < 0 {
            // ENXIO: no data after `pos`. Without SEEK_DATA (EINVAL), read it all.
            if std::io::Error::last_os_error().raw_os_error() == Some(libc::ENXIO) {
                break;
            }
            return read_range(&f, pos, len, &mut buf);
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
        let end = if hole < data { len } else { hole.min(len) };
        read_range(&f, data, end, &mut buf)?;
        pos = end;
    }
    Ok(())
}

fn read_range(f: &std::fs::File, mut at: i64, end: i64, buf: &mut [u8]) -> Result<()> {
    while at < end {
        let n = usize::try_from(end - at)
            .unwrap_or(usize::MAX)
            .min(buf.len());
        let got = f.read_at(&mut buf[..n], u64::try_from(at)?)?;
        if got == 0 {
            break;
        }
        at += i64::try_from(got)?;
    }
    Ok(())
}

/// Writes a new file back to the disk and reads it into the page cache, so that neither
/// writeback nor a cold read falls on a timed run.
pub fn settle(path: &Path) -> Result<()> {
    std::fs::File::open(path)?.sync_all()?;
    // Some formats are a descriptor and extent files: flush those too.
    // SAFETY: sync(2) takes no arguments and cannot fail.
    unsafe { libc::sync() };
    warm(path)
}

/// Empties the page cache (needs root); false where that is not allowed.
pub fn drop_caches() -> bool {
    // SAFETY: sync(2) takes no arguments and cannot fail.
    unsafe { libc::sync() };
    std::fs::write("/proc/sys/vm/drop_caches", "3").is_ok()
}

/// The local S3 server of the tests (SeaweedFS on loopback), as `tests/s3-server.sh` started
/// it.
#[derive(Debug, Clone)]
pub struct S3Server {
    /// `http://127.0.0.1:port`.
    pub endpoint: String,
    /// A bucket that exists.
    pub bucket: String,
    /// Access key.
    pub key: String,
    /// Secret key.
    pub secret: String,
    /// The server's Python venv (where boto3 can be installed).
    pub venv: PathBuf,
    /// The folder `tests/s3-server.sh` keeps the server in, and the script, when this
    /// process started the server: dropping the last handle stops it.
    _started: Option<std::sync::Arc<Started>>,
}

/// A server this process started; stopped when dropped.
#[derive(Debug)]
struct Started {
    script: PathBuf,
    dir: PathBuf,
}

impl Drop for Started {
    fn drop(&mut self) {
        let _ = Command::new("bash")
            .arg(&self.script)
            .arg("stop")
            .arg(&self.dir)
            .status();
    }
}

impl S3Server {
    /// Starts the server (or finds it running) with `tests/s3-server.sh`; one it started is
    /// stopped when the last clone of the returned handle is dropped.
    pub fn start(root: &Path) -> Result<S3Server> {
        let dir = root.join("target/s3");
        let out = Command::new("bash")
            .arg(root.join("tests/s3-server.sh"))
            .arg("start")
            .arg(&dir)
            .output()
            .context("running tests/s3-server.sh")?;
        if !out.status.success() {
            bail!(
                "starting the S3 server: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let text = String::from_utf8(out.stdout)?;
        let var = |name: &str| -> Result<String> {
            text.lines()
                .find_map(|l| l.strip_prefix(&format!("{name}=")))
                .map(str::to_owned)
                .with_context(|| format!("s3-server.sh printed no {name}"))
        };
        let started = (var("BF_S3_STARTED")? == "1").then(|| {
            std::sync::Arc::new(Started {
                script: root.join("tests/s3-server.sh"),
                dir: dir.clone(),
            })
        });
        Ok(S3Server {
            _started: started,
            endpoint: var("BF_S3_ENDPOINT")?,
            bucket: var("BF_S3_BUCKET")?,
            key: var("BF_S3_ACCESS_KEY")?,
            secret: var("BF_S3_SECRET_KEY")?,
            venv: dir.join("venv"),
        })
    }

    /// The server's Python with boto3 installed (installed on first use).
    pub fn boto3_python(&self) -> Result<PathBuf> {
        let python = self.venv.join("bin/python");
        if !Command::new(&python)
            .args(["-c", "import boto3"])
            .status()?
            .success()
        {
            let ok = Command::new(self.venv.join("bin/pip"))
                .args(["install", "--quiet", "boto3"])
                .status()?
                .success();
            if !ok {
                bail!("installing boto3 failed");
            }
        }
        Ok(python)
    }

    /// Environment for blockferry (AWS SDK variables), rclone (a remote named `bf`) and
    /// boto3 to reach the server.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("AWS_ACCESS_KEY_ID", self.key.clone()),
            ("AWS_SECRET_ACCESS_KEY", self.secret.clone()),
            ("AWS_ENDPOINT_URL", self.endpoint.clone()),
            ("AWS_REGION", "us-east-1".into()),
            ("RCLONE_CONFIG_BF_TYPE", "s3".into()),
            ("RCLONE_CONFIG_BF_PROVIDER", "SeaweedFS".into()),
            ("RCLONE_CONFIG_BF_ENDPOINT", self.endpoint.clone()),
            ("RCLONE_CONFIG_BF_ACCESS_KEY_ID", self.key.clone()),
            ("RCLONE_CONFIG_BF_SECRET_ACCESS_KEY", self.secret.clone()),
            ("RCLONE_CONFIG_BF_REGION", "us-east-1".into()),
        ]
    }
}

/// boto3's managed upload of one file: `python -c BOTO3_UPLOAD FILE BUCKET KEY`.
pub const BOTO3_UPLOAD: &str = "import sys, boto3\n\
    boto3.client('s3').upload_file(sys.argv[1], sys.argv[2], sys.argv[3])\n";

/// boto3's managed download of one object: `python -c BOTO3_DOWNLOAD BUCKET KEY FILE`.
pub const BOTO3_DOWNLOAD: &str = "import sys, boto3\n\
    boto3.client('s3').download_file(sys.argv[1], sys.argv[2], sys.argv[3])\n";

/// Chunk size the change generator assumes (blockferry's default).
pub const CHANGE_CHUNK: u64 = 1 << 20;
/// Bytes rewritten inside each changed chunk.
pub const CHANGE_WRITE: usize = 256 << 10;

/// Runs a command, failing on a non-zero exit; returns wall seconds and stdout.
pub fn run(cmd: &mut Command) -> Result<(f64, String)> {
    let start = Instant::now();
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    let secs = start.elapsed().as_secs_f64();
    if !out.status.success() {
        bail!("{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok((secs, String::from_utf8(out.stdout)?))
}

/// A number field of a `replicate --json` report.
pub fn field(json: &str, name: &str) -> u64 {
    json.split(&format!("\"{name}\":"))
        .nth(1)
        .and_then(|rest| {
            rest.trim_start()
                .split(|c: char| !c.is_ascii_digit())
                .next()
        })
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// The snapshot id of a `replicate --json` report.
pub fn snapshot_id(json: &str) -> Result<String> {
    json.split("\"snapshot\":")
        .nth(1)
        .and_then(|rest| rest.split('"').nth(1))
        .map(str::to_owned)
        .context("no snapshot id in the report")
}

/// Runs `cmd()` `n` times (page cache warmed before each); returns the median seconds and
/// the last stdout.
pub fn median_of(
    n: usize,
    image: &Path,
    mut cmd: impl FnMut() -> Command,
) -> Result<(f64, String)> {
    let mut times = Vec::new();
    let mut last = String::new();
    for _ in 0..n {
        warm(image)?;
        let (secs, out) = run(&mut cmd())?;
        times.push(secs);
        last = out;
    }
    times.sort_by(f64::total_cmp);
    Ok((times[n / 2], last))
}

/// Rewrites `CHANGE_WRITE` random bytes inside 1% of the chunks (chosen at random); returns the
/// VMware CBT `QueryChangedDiskAreas` result that describes the change.
pub fn change_one_percent(image: &Path, mib: u64, base_change_id: &str) -> Result<(String, u64)> {
    let f = std::fs::OpenOptions::new().write(true).open(image)?;
    let chunks = mib * (1 << 20) / CHANGE_CHUNK;
    let n = (chunks / 100).max(1);
    let mut rng = Rng(0xde17_a0c4_a9ed);
    let mut picked: Vec<u64> = Vec::new();
    while (picked.len() as u64) < n {
        let c = rng.next_u64() % chunks;
        if !picked.contains(&c) {
            picked.push(c);
        }
    }
    picked.sort_unstable();
    let mut buf = vec![0u8; CHANGE_WRITE];
    let mut areas = String::new();
    for c in &picked {
        let within = (rng.next_u64() % ((CHANGE_CHUNK - CHANGE_WRITE as u64) / 4096)) * 4096;
        let at = c * CHANGE_CHUNK + within;
        rng.fill(&mut buf);
        f.write_all_at(&buf, at)?;
        if !areas.is_empty() {
            areas.push_str(", ");
        }
        write!(areas, r#"{{"start": {at}, "length": {CHANGE_WRITE}}}"#)?;
    }
    f.sync_all()?;
    let size = mib << 20;
    Ok((
        format!(
            r#"{{"startOffset": 0, "length": {size}, "changeId": "{base_change_id}", "changedArea": [{areas}]}}"#
        ),
        n,
    ))
}
