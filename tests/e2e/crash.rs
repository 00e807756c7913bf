use std::process::{Command, Stdio};
use std::time::Duration;

use blockferry::{RestoreOptions, Silent, Store, VerifyOptions};
use blockferry_tests::{MIB, PASSPHRASE, Rng, Sandbox, bin, file_hash, make_image};

/// Kills `replicate` with SIGKILL at random moments, many times, then checks the store:
/// every snapshot it lists restores and verifies, and a final run completes normally.
#[test]
fn kill_9_never_leaves_a_broken_snapshot() {
    let mut rng = Rng::seeded("kill_9");
    let sb = Sandbox::new();
    sb.init(&[]);
    let image = sb.path("disk.raw");
    // Enough data that a run takes a while: incompressible and compressible parts.
    make_image(
        &image,
        160 * MIB,
        &[(0, rng.bytes(64 << 20)), (80 * MIB, rng.texty(64 << 20))],
    );
    // Calibrate: time one full run into a scratch store.
    let scratch = Sandbox::new();
    scratch.init(&[]);
    let t = std::time::Instant::now();
    scratch.replicate(&image, &[]);
    let mut full_ms = t.elapsed().as_millis() as u64;
    let store = sb.store();
    let mut killed = 0;
    for round in 0..10 {
        // Mutate the image a little each round so runs store something new.
        blockferry_tests::write_at(&image, rng.below(150 * MIB), &rng.bytes(1 << 20));
        // Within the run: kills land anywhere from start-up to the commit.
        let delay = rng.below(full_ms * 9 / 10 + 1);
        // The image changed since the last (killed) run: that job cannot resume, so each run
        // starts over (--restart); tests/e2e/jobs.rs and s3_faults.rs cover resuming.
        let child = Command::new(bin())
            .args(["replicate", image.to_str().unwrap(), "--store", &store])
            .arg("--restart")
            .env("BLOCKFERRY_PASSPHRASE", PASSPHRASE)
            .env("BLOCKFERRY_STATE_DIR", sb.path("state"))
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(delay));
        let pid = i32::try_from(child.id()).unwrap();
        // SAFETY: sending a signal to our own child process, whose pid we just read.
        unsafe { libc::kill(pid, libc::SIGKILL) };
        let out = child.wait_with_output().unwrap();
        let status = out.status;
        assert!(
            status.success() || std::os::unix::process::ExitStatusExt::signal(&status).is_some(),
            "a run failed instead of being killed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        if status.success() {
            // The run beat the kill: the machine got faster (less load from other tests).
            full_ms = delay.max(20);
        } else {
            killed += 1;
        }
        eprintln!("round {round}: killed after {delay} ms (full run {full_ms} ms): {status}");
    }
    assert!(
        killed >= 3,
        "too few runs were actually interrupted ({killed})"
    );
    let store_h = Store::open(&store, Some(PASSPHRASE.as_bytes())).unwrap();
    let (snaps, bad) = store_h.snapshots().unwrap();
    assert!(bad.is_empty(), "unreadable snapshots after kills: {bad:?}");
    for s in &snaps {
        let report =
            blockferry::verify(&store_h, &s.id, &VerifyOptions::default(), &Silent).unwrap();
        assert!(
            report.ok(),
            "snapshot {} left broken: {:?}",
            s.id,
            report.problems
        );
        let out = sb.path(&format!("{}.raw", s.id));
        blockferry::restore(&store_h, &s.id, &out, &RestoreOptions::default(), &Silent).unwrap();
        std::fs::remove_file(out).unwrap();
    }
    // The store keeps working: a complete run succeeds and restores exactly. (The last
    // killed run's job saw another state of the image: this one starts over too.)
    let last = sb.replicate(&image, &["--restart"]);
    let out = sb.restore(last["snapshot"].as_str().unwrap(), "final.raw");
    assert_eq!(file_hash(&image), file_hash(&out));
    sb.verify_latest_against(&image);
}
