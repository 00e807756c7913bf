use std::process::{Command, Stdio};

use blockferry_tests::{MIB, PASSPHRASE, Rng, Sandbox, bin, make_image};

/// Runs a command and returns its exit code and peak RSS in bytes.
///
/// The peak is the child's own `VmHWM`, polled from /proc until it exits. (wait4's
/// `ru_maxrss` would not do: the child is spawned sharing this test process's memory until it
/// execs, and the kernel carries that high-water mark over into the child's figure.)
fn run_peak_rss(cmd: &mut Command) -> (i32, u64) {
    let mut child = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let status_path = format!("/proc/{}/status", child.id());
    let mut peak = 0u64;
    loop {
        if let Ok(text) = std::fs::read_to_string(&status_path)
            && let Some(line) = text.lines().find(|l| l.starts_with("VmHWM:"))
        {
            let kib: u64 = line
                .split_whitespace()
                .nth(1)
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            peak = peak.max(kib * 1024);
        }
        if let Some(status) = child.try_wait().unwrap() {
            return (status.code().unwrap_or(-1), peak);
        }
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
}

/// A dense image several times the budget stays within budget + a small constant.
/// (The 8 GiB measurement of the issue is a manual run, see ARCHITECTURE.md.)
#[test]
fn peak_rss_stays_within_the_budget() {
    let mut rng = Rng::seeded("peak_rss");
    let sb = Sandbox::new();
    sb.init(&[]);
    let image = sb.path("dense.raw");
    let data: Vec<(u64, Vec<u8>)> = (0..8)
        .map(|i| (i * 64 * MIB, rng.bytes(64 << 20)))
        .collect();
    make_image(&image, 512 * MIB, &data);
    drop(data);
    let budget = 48 * MIB;
    let (status, peak) = run_peak_rss(
        Command::new(bin())
            .args([
                "replicate",
                image.to_str().unwrap(),
                "--store",
                &sb.store(),
                "--memory-budget",
                "48M",
            ])
            .env("BLOCKFERRY_PASSPHRASE", PASSPHRASE),
    );
    assert_eq!(status, 0);
    assert!(peak > 0, "no VmHWM reading");
    eprintln!(
        "peak RSS {} MiB for a 512 MiB dense image with a 48 MiB budget",
        peak / MIB
    );
    // The constant: program, libraries, allocator slack, thread stacks.
    assert!(
        peak < budget + 24 * MIB,
        "peak RSS {peak} exceeds budget {budget} + 24 MiB"
    );
}
