//! Uploading one disk image to the same local S3 server (SeaweedFS on loopback, started by
//! `tests/s3-server.sh`) with blockferry, rclone and boto3's s3transfer, in one run, each with
//! its default settings. Run: `cargo bench -p blockferry-benches --bench s3_upload`
//! (`BF_BENCH_MIB` sets the image size, default 1024; needs `rclone` from Debian and
//! installs boto3 into the server's venv).
//!
//! Two images: a realistic one (a quarter never written, a tenth zeros, OS-like text and
//! binaries, some blocks repeated: what a VM disk holds) and a worst case for blockferry (all
//! random: nothing to skip, deduplicate or compress). blockferry replicates into a new
//! encrypted store each time; the peers upload the file as it is.

// A benchmark harness prints its results.
#![allow(clippy::print_stdout)]

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};
use blockferry_benches::{Paired, blockferry_release, machine, time};

/// Runs of each tool per image, taken in turns.
const RUNS: usize = 3;

struct Server {
    endpoint: String,
    bucket: String,
    key: String,
    secret: String,
    venv: PathBuf,
}

fn start_server(root: &Path) -> Result<Server> {
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
    Ok(Server {
        endpoint: var("BF_S3_ENDPOINT")?,
        bucket: var("BF_S3_BUCKET")?,
        key: var("BF_S3_ACCESS_KEY")?,
        secret: var("BF_S3_SECRET_KEY")?,
        venv: dir.join("venv"),
    })
}

/// splitmix64.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A number below `n`.
    fn below(&mut self, n: usize) -> usize {
        usize::try_from(self.next() % n as u64).unwrap_or(0)
    }

    fn fill(&mut self, buf: &mut [u8]) {
        for c in buf.chunks_mut(8) {
            let v = self.next().to_le_bytes();
            c.copy_from_slice(&v[..c.len()]);
        }
    }
}

const WORDS: &[&str] = &[
    "the ", "kernel ", "lib", "usr/", "share/", "config ", "0x00", "\n", "error: ", "systemd ",
    "python3 ", "int ", "return ", "{\n", "}\n", "ELF", "GNU ", "linux ", "module ", "= ",
];

/// Writes the image of `mib` MiB; `realistic` or all random.
fn make_image(path: &Path, mib: u64, realistic: bool) -> Result<()> {
    use std::io::{Seek, SeekFrom, Write};
    let mut f = std::fs::File::create(path)?;
    f.set_len(mib << 20)?;
    let mut rng = Rng(0x5eed_0fb1_0c00);
    let mut block = vec![0u8; 1 << 20];
    let mut kept: Vec<Vec<u8>> = Vec::new();
    for i in 0..mib {
        let kind = if realistic { rng.next() % 20 } else { 19 };
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
        if realistic && kept.len() < 64 && rng.next().is_multiple_of(8) {
            kept.push(block.clone());
        }
        f.seek(SeekFrom::Start(i << 20))?;
        f.write_all(&block)?;
    }
    f.sync_all()?;
    Ok(())
}

fn main() -> Result<()> {
    let mib: u64 = std::env::var("BF_BENCH_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1024);
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let bf = blockferry_release()?;
    let server = start_server(&root)?;
    let python = server.venv.join("bin/python");
    if !Command::new(&python)
        .args(["-c", "import boto3"])
        .status()?
        .success()
    {
        let ok = Command::new(server.venv.join("bin/pip"))
            .args(["install", "--quiet", "boto3"])
            .status()?
            .success();
        if !ok {
            bail!("installing boto3 failed");
        }
    }
    if Command::new("rclone").arg("version").output().is_err() {
        bail!("rclone is missing: apt-get install rclone");
    }
    let work = root.join("target/bench-s3");
    std::fs::create_dir_all(&work)?;
    let state = work.join("state");
    let env = [
        ("AWS_ACCESS_KEY_ID", server.key.as_str()),
        ("AWS_SECRET_ACCESS_KEY", server.secret.as_str()),
        ("AWS_ENDPOINT_URL", server.endpoint.as_str()),
        ("AWS_REGION", "us-east-1"),
        ("BLOCKFERRY_PASSPHRASE", "bench passphrase"),
        ("RCLONE_CONFIG_BF_TYPE", "s3"),
        ("RCLONE_CONFIG_BF_PROVIDER", "SeaweedFS"),
        ("RCLONE_CONFIG_BF_ENDPOINT", server.endpoint.as_str()),
        ("RCLONE_CONFIG_BF_ACCESS_KEY_ID", server.key.as_str()),
        ("RCLONE_CONFIG_BF_SECRET_ACCESS_KEY", server.secret.as_str()),
        ("RCLONE_CONFIG_BF_REGION", "us-east-1"),
    ];
    let cmd = |program: &Path| {
        let mut c = Command::new(program);
        // Plain HTTP on loopback: a CA bundle set for some proxy of the machine would only
        // trip rclone's SDK up.
        c.envs(env)
            .env("BLOCKFERRY_STATE_DIR", &state)
            .env_remove("AWS_CA_BUNDLE");
        c
    };
    let boto = "import sys, boto3\n\
                boto3.client('s3').upload_file(sys.argv[1], sys.argv[2], sys.argv[3])\n";

    println!("machine: {}", machine());
    println!(
        "S3 server: SeaweedFS (weed mini) on 127.0.0.1, sharing the machine; {RUNS} runs each in \
         turns, medians; default settings of every tool\n"
    );
    println!(
        "{:<12} {:>12} {:>12} {:>12} {:>14} {:>14}",
        "image", "blockferry s", "rclone s", "boto3 s", "rclone/bf", "boto3/bf"
    );
    let mut n = 0u32;
    for (name, realistic) in [("realistic", true), ("random", false)] {
        let image = work.join(format!("{name}-{mib}m.raw"));
        if !image.exists() {
            make_image(&image, mib, realistic)?;
        }
        let mut run_bf = || -> Result<f64> {
            n += 1;
            let store = format!("s3://{}/bench-bf-{}-{n}", server.bucket, std::process::id());
            let init = cmd(&bf).args(["init", "--store", &store]).output()?;
            if !init.status.success() {
                bail!("init: {}", String::from_utf8_lossy(&init.stderr));
            }
            time(
                cmd(&bf)
                    .arg("replicate")
                    .arg(&image)
                    .args(["--store", &store]),
            )
        };
        // A new key each run: rclone would skip a file the destination already has.
        let mut m = 0u32;
        let bf_vs_rclone = Paired::run(RUNS, &mut run_bf, || {
            m += 1;
            time(
                cmd(Path::new("rclone"))
                    .arg("copyto")
                    .arg(&image)
                    .arg(format!(
                        "bf:{}/bench-rclone-{}/{name}-{m}.raw",
                        server.bucket,
                        std::process::id()
                    )),
            )
        })?;
        let bf_vs_boto = Paired::run(RUNS, &mut run_bf, || {
            m += 1;
            time(cmd(&python).args(["-c", boto]).arg(&image).args([
                server.bucket.as_str(),
                &format!("bench-boto3-{}/{name}-{m}.raw", std::process::id()),
            ]))
        })?;
        let (bf1, rc) = bf_vs_rclone.medians();
        let (bf2, bo) = bf_vs_boto.medians();
        let bf = f64::midpoint(bf1, bf2);
        println!(
            "{name:<12} {bf:>12.2} {rc:>12.2} {bo:>12.2} {:>14.2} {:>14.2}",
            rc / bf1,
            bo / bf2
        );
    }
    println!("\nratio > 1: blockferry is faster ({mib} MiB image)");
    Ok(())
}
