//! The fleet against one CLI process: 64 disks (raw, VMDK, VHDX, VHD; 16–256 MiB) replicated
//! by `blockferry.fleet` on a Dask `LocalCluster` of 4 worker processes, and the same disks
//! one after another by one `blockferry` CLI process at a time, into fresh encrypted stores
//! on the tests' SeaweedFS on loopback, in turns; then the scheduling overhead per disk, from
//! empty disks (`benches/fleet/fleet.py` measures; this builds and sets up).
//!
//! Run: `cargo bench -p blockferry-benches --bench fleet` (needs `qemu-img` and `python3`;
//! `BF_BENCH_FLEET_ROUNDS`, default 2; `BF_BENCH_S3=0` for local folder stores).

// A benchmark harness prints its results.
#![allow(clippy::print_stdout)]

use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result, bail};
use blockferry_benches::{blockferry_release, machine};

fn main() -> Result<()> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let work = root.join("target/bench-fleet");
    std::fs::create_dir_all(&work)?;
    let cli = blockferry_release()?;
    // The package with its `fleet` extra, a release build, as a user installs it.
    let venv = work.join("venv");
    let python = venv.join("bin/python");
    if !python.exists() {
        status(Command::new("python3").arg("-m").arg("venv").arg(&venv))?;
    }
    status(
        Command::new(venv.join("bin/pip"))
            .args(["install", "--quiet", "--force-reinstall"])
            .arg(format!("{}[fleet]", root.join("python").display())),
    )?;
    let mut cmd = Command::new(&python);
    cmd.arg(root.join("benches/fleet/fleet.py"))
        .arg(&cli)
        .arg(work.join("run"))
        .args([
            "--rounds",
            &std::env::var("BF_BENCH_FLEET_ROUNDS").unwrap_or_else(|_| "2".to_owned()),
        ]);
    if std::env::var("BF_BENCH_S3").as_deref() != Ok("0") {
        let out = Command::new(root.join("tests/s3-server.sh"))
            .arg("start")
            .arg(root.join("target/s3"))
            .output()
            .context("starting the tests' S3 server")?;
        if !out.status.success() {
            bail!(
                "tests/s3-server.sh: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            if let Some((k, v)) = line.split_once('=') {
                cmd.env(k, v);
            }
        }
    }
    println!("machine: {}", machine());
    status(&mut cmd)
}

fn status(cmd: &mut Command) -> Result<()> {
    let s = cmd.status().with_context(|| format!("running {cmd:?}"))?;
    if !s.success() {
        bail!("{cmd:?} failed: {s}");
    }
    Ok(())
}
