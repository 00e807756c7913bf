//! Uploading one disk image to the same local S3 server (SeaweedFS on loopback, started by
//! `tests/s3-server.sh`) with blockferry, rclone and boto3's s3transfer, in one run, each with
//! its default settings; then getting it back (blockferry's restore against rclone's and
//! boto3's downloads of the uploaded file). Run: `cargo bench -p blockferry-benches --bench s3_upload`
//! (`BF_BENCH_MIB` sets the image size, default 1024; needs `rclone` from Debian and
//! installs boto3 into the server's venv).
//!
//! Two images: a realistic one (a quarter never written, a tenth zeros, OS-like text and
//! binaries, some blocks repeated: what a VM disk holds) and a worst case for blockferry (all
//! random: nothing to skip, deduplicate or compress). blockferry replicates into a new
//! encrypted store each time; the peers upload the file as it is.

// A benchmark harness prints its results.
#![allow(clippy::print_stdout)]

use std::path::Path;
use std::process::Command;

use anyhow::{Result, bail};
use blockferry_benches::{
    BOTO3_DOWNLOAD, BOTO3_UPLOAD, Paired, S3Server, blockferry_release, machine, make_image, time,
};

/// Runs of each tool per image, taken in turns.
const RUNS: usize = 3;

fn main() -> Result<()> {
    let mib: u64 = std::env::var("BF_BENCH_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1024);
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let bf = blockferry_release()?;
    let server = S3Server::start(&root)?;
    let python = server.boto3_python()?;
    if Command::new("rclone").arg("version").output().is_err() {
        bail!("rclone is missing: apt-get install rclone");
    }
    let work = root.join("target/bench-s3");
    std::fs::create_dir_all(&work)?;
    let state = work.join("state");
    let env = server.env();
    let cmd = |program: &Path| {
        let mut c = Command::new(program);
        // Plain HTTP on loopback: a CA bundle set for some proxy of the machine would only
        // trip rclone's SDK up.
        c.envs(env.iter().map(|(k, v)| (k, v.as_str())))
            .env("BLOCKFERRY_PASSPHRASE", "bench passphrase")
            .env("BLOCKFERRY_STATE_DIR", &state)
            .env_remove("AWS_CA_BUNDLE");
        c
    };
    println!("machine: {}", machine());
    println!(
        "S3 server: SeaweedFS (weed mini) on 127.0.0.1, sharing the machine; {RUNS} runs each in \
         turns, medians; default settings of every tool\n"
    );
    println!(
        "{:<16} {:>12} {:>12} {:>12} {:>14} {:>14}",
        "image", "blockferry s", "rclone s", "boto3 s", "rclone/bf", "boto3/bf"
    );
    let mut n = 0u32;
    for (name, realistic) in [("realistic", true), ("random", false)] {
        let image = work.join(format!("{name}-{mib}m.raw"));
        if !image.exists() {
            make_image(&image, mib, realistic)?;
        }
        // What a run uploaded is deleted after it (untimed): the server keeps its data on
        // this disk, which a few runs of gigabytes would fill.
        let remove = |what: &str, path: &str| -> Result<()> {
            let out = cmd(Path::new("rclone"))
                .arg(what)
                .arg(format!("bf:{}/{path}", server.bucket))
                .output()?;
            if !out.status.success() {
                bail!("rclone {what}: {}", String::from_utf8_lossy(&out.stderr));
            }
            Ok(())
        };
        let mut run_bf = || -> Result<f64> {
            n += 1;
            let prefix = format!("bench-bf-{}-{n}", std::process::id());
            let store = format!("s3://{}/{prefix}", server.bucket);
            let init = cmd(&bf).args(["init", "--store", &store]).output()?;
            if !init.status.success() {
                bail!("init: {}", String::from_utf8_lossy(&init.stderr));
            }
            let secs = time(
                cmd(&bf)
                    .arg("replicate")
                    .arg(&image)
                    .args(["--store", &store]),
            )?;
            remove("purge", &prefix)?;
            Ok(secs)
        };
        // A new key each run: rclone would skip a file the destination already has.
        let mut m = 0u32;
        let bf_vs_rclone = Paired::run(RUNS, &mut run_bf, || {
            m += 1;
            let key = format!("bench-rclone-{}/{name}-{m}.raw", std::process::id());
            let secs = time(
                cmd(Path::new("rclone"))
                    .arg("copyto")
                    .arg(&image)
                    .arg(format!("bf:{}/{key}", server.bucket)),
            )?;
            remove("deletefile", &key)?;
            Ok(secs)
        })?;
        let bf_vs_boto = Paired::run(RUNS, &mut run_bf, || {
            m += 1;
            let key = format!("bench-boto3-{}/{name}-{m}.raw", std::process::id());
            let secs = time(
                cmd(&python)
                    .args(["-c", BOTO3_UPLOAD])
                    .arg(&image)
                    .args([server.bucket.as_str(), &key]),
            )?;
            remove("deletefile", &key)?;
            Ok(secs)
        })?;
        let (bf1, rc) = bf_vs_rclone.medians();
        let (bf2, bo) = bf_vs_boto.medians();
        let both = f64::midpoint(bf1, bf2);
        println!(
            "{name:<16} {both:>12.2} {rc:>12.2} {bo:>12.2} {:>14.2} {:>14.2}",
            rc / bf1,
            bo / bf2
        );

        // Getting it back: one store and one uploaded copy (untimed), each read back RUNS
        // times into a new file (deleted after each run, also untimed).
        let prefix = format!("bench-bf-{}-restore", std::process::id());
        let store = format!("s3://{}/{prefix}", server.bucket);
        let key = format!("bench-copy-{}/{name}.raw", std::process::id());
        for c in [
            cmd(&bf).args(["init", "--store", &store]),
            cmd(&bf)
                .arg("replicate")
                .arg(&image)
                .args(["--store", &store]),
            cmd(Path::new("rclone"))
                .arg("copyto")
                .arg(&image)
                .arg(format!("bf:{}/{key}", server.bucket)),
        ] {
            let out = c.output()?;
            if !out.status.success() {
                bail!("{c:?}: {}", String::from_utf8_lossy(&out.stderr));
            }
        }
        let out = work.join("restored.raw");
        let mut restore = || -> Result<f64> {
            let secs = time(
                cmd(&bf)
                    .args(["restore", "--force", "--store", &store, "latest"])
                    .arg(&out),
            )?;
            std::fs::remove_file(&out)?;
            Ok(secs)
        };
        let restore_vs_rclone = Paired::run(RUNS, &mut restore, || {
            let secs = time(
                cmd(Path::new("rclone"))
                    .arg("copyto")
                    .arg(format!("bf:{}/{key}", server.bucket))
                    .arg(&out),
            )?;
            std::fs::remove_file(&out)?;
            Ok(secs)
        })?;
        let restore_vs_boto = Paired::run(RUNS, &mut restore, || {
            let secs = time(
                cmd(&python)
                    .args(["-c", BOTO3_DOWNLOAD, server.bucket.as_str(), &key])
                    .arg(&out),
            )?;
            std::fs::remove_file(&out)?;
            Ok(secs)
        })?;
        remove("purge", &prefix)?;
        remove("deletefile", &key)?;
        let (bf1, rc) = restore_vs_rclone.medians();
        let (bf2, bo) = restore_vs_boto.medians();
        let both = f64::midpoint(bf1, bf2);
        let label = format!("{name} (get)");
        println!(
            "{label:<16} {both:>12.2} {rc:>12.2} {bo:>12.2} {:>14.2} {:>14.2}",
            rc / bf1,
            bo / bf2
        );
    }
    println!(
        "\nratio > 1: blockferry is faster ({mib} MiB image; \"get\": blockferry's restore \
         against a download of the file the peer uploaded)"
    );
    Ok(())
}
