//! `blockferry boot-test`: disks that really boot (a boot sector, and Debian's kernel with a
//! busybox initramfs, made by `tests/make-boot-disks.sh` from Debian packages) pass once
//! replicated, the Linux one served from an S3 store; a disk with a broken boot sector fails
//! with its console attached; a GPT disk with an EFI system partition goes through OVMF;
//! nothing is written to the store.

use std::path::{Path, PathBuf};
use std::process::Command;

use blockferry_tests::{Sandbox, Value, s3_backend};

/// Whether qemu-system is here; under `BF_REQUIRE_TOOLS=1` (CI) its absence fails.
fn have_qemu_system() -> bool {
    let ok = Command::new("qemu-system-x86_64")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        ok || std::env::var_os("BF_REQUIRE_TOOLS").is_none(),
        "qemu-system-x86_64 is missing: apt-get install qemu-system-x86 qemu-utils"
    );
    ok
}

/// The test disks, made once per test process.
fn disks() -> &'static PathBuf {
    static DIR: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    DIR.get_or_init(|| {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let dir = blockferry_tests::bin().parent().unwrap().join("boot-disks");
        let out = Command::new(root.join("make-boot-disks.sh"))
            .arg(&dir)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "make-boot-disks.sh: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        dir
    })
}

/// Every object of a local store: name and size (locks aside, which readers write).
fn store_files(store: &Path) -> Vec<(String, u64)> {
    let mut out: Vec<(String, u64)> = blockferry_tests::objects(store.to_str().unwrap(), "")
        .into_iter()
        .filter(|p| !p.to_string_lossy().contains("/locks/"))
        .map(|p| {
            let len = std::fs::metadata(&p).unwrap().len();
            (p.display().to_string(), len)
        })
        .collect();
    out.sort();
    out
}

fn boot_test(sb: &Sandbox, snap: &str, extra: &[&str]) -> (i32, Value) {
    let store = sb.store();
    let mut args = vec!["boot-test", snap, "--store", &store, "--json"];
    args.extend_from_slice(extra);
    let out = sb.run(&args);
    let report: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "boot-test printed no report ({e}): {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (out.status.code().unwrap_or(-1), report)
}

#[test]
fn a_boot_sector_boots_and_a_broken_one_fails_with_its_console() {
    if !have_qemu_system() {
        return;
    }
    let sb = Sandbox::new();
    sb.init(&[]);
    let good = sb.replicate(&disks().join("bios.raw"), &["--name", "good"])["snapshot"]
        .as_str()
        .unwrap()
        .to_owned();
    let bad = sb.replicate(&disks().join("broken.raw"), &["--name", "bad"])["snapshot"]
        .as_str()
        .unwrap()
        .to_owned();
    let before = store_files(&sb.path("store"));
    let (code, report) = boot_test(
        &sb,
        &good,
        &[
            "--expect",
            "BLOCKFERRY-BOOT-SECTOR-OK",
            "--timeout",
            "60s",
            "--accel",
            "tcg",
        ],
    );
    assert_eq!(code, 0, "{report}");
    assert_eq!(report["passed"], true);
    assert_eq!(report["firmware"], "bios");
    let console = std::fs::read_to_string(report["console_log"].as_str().unwrap()).unwrap();
    assert!(console.contains("BLOCKFERRY-BOOT-SECTOR-OK"), "{console}");
    let shot = report["screenshot"].as_str().expect("a screenshot");
    assert_eq!(&std::fs::read(shot).unwrap()[..8], b"\x89PNG\r\n\x1a\n");

    let (code, report) = boot_test(
        &sb,
        &bad,
        &[
            "--expect",
            "BLOCKFERRY-BOOT-SECTOR-OK",
            "--timeout",
            "15s",
            "--accel",
            "tcg",
        ],
    );
    assert_eq!(code, 3, "{report}");
    assert_eq!(report["passed"], false);
    let console = std::fs::read_to_string(report["console_log"].as_str().unwrap()).unwrap();
    assert!(
        !console.contains("BLOCKFERRY-BOOT-SECTOR-OK"),
        "the broken disk printed the marker: {console}"
    );
    // The store is as it was: the guest wrote to its overlay only.
    assert_eq!(store_files(&sb.path("store")), before);
}

/// `BLOCKFERRY-LINUX-UP on 6.1.0-…`: the marker and a kernel release.
/// The console's text without its terminal escape sequences (`ESC [ … letter`): the
/// firmware and the boot loader move the cursor, sometimes inside a word
/// (`L\x1b[05;02Hoading vmlinuz`), as CI once saw.
fn without_escapes(console: &str) -> String {
    let mut out = String::with_capacity(console.len());
    let mut chars = console.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\x1b' && chars.peek() == Some(&'[') {
            chars.next();
            for d in chars.by_ref() {
                if d.is_ascii_alphabetic() {
                    break;
                }
            }
            continue;
        }
        out.push(c);
    }
    out
}

fn regex_like_marker(console: &str) -> bool {
    console
        .split("BLOCKFERRY-LINUX-UP on ")
        .nth(1)
        .is_some_and(|rest| {
            rest.chars().next().is_some_and(|c| c.is_ascii_digit()) && rest.contains("amd64")
        })
}

#[test]
fn a_linux_disk_boots_from_an_s3_store() {
    if !have_qemu_system() {
        return;
    }
    let made = disks().join("linux.raw").exists();
    assert!(
        made || std::env::var_os("BF_REQUIRE_TOOLS").is_none(),
        "no linux.raw: apt-get install linux-image-amd64 busybox-static syslinux mtools dosfstools"
    );
    if !made {
        return;
    }
    let sb = Sandbox::new_s3("boot");
    sb.init(&[]);
    let snap = sb.replicate(&disks().join("linux.raw"), &[])["snapshot"]
        .as_str()
        .unwrap()
        .to_owned();
    let backend = s3_backend(&sb.store());
    let listing = |b: &std::sync::Arc<dyn blockferry::ObjectStore>| -> Vec<(String, u64)> {
        b.list_sized("")
            .unwrap()
            .into_iter()
            .filter(|(k, _)| !k.starts_with("locks/"))
            .collect()
    };
    let before = listing(&backend);
    let (code, report) = boot_test(
        &sb,
        &snap,
        &[
            "--expect",
            "BLOCKFERRY-LINUX-UP on [0-9]",
            "--timeout",
            "150s",
            "--accel",
            "tcg",
        ],
    );
    assert_eq!(code, 0, "{report}");
    let console =
        without_escapes(&std::fs::read_to_string(report["console_log"].as_str().unwrap()).unwrap());
    // syslinux loaded Debian's kernel, whose init printed the marker with the kernel's
    // release (uname -r).
    assert!(console.contains("Loading vmlinuz... ok"), "{console}");
    assert!(
        regex_like_marker(&console),
        "the init ran under the kernel: {console}"
    );
    assert_eq!(listing(&backend), before, "nothing written to the store");
}

/// A disk whose GPT has an EFI system partition boots through OVMF when the firmware is
/// left to `auto`: the firmware reaches the snapshot's disk (served over NBD) and reports
/// what it found there. The partition holds no loader, so it goes on to its other options.
#[test]
fn a_gpt_disk_with_an_efi_partition_boots_through_uefi() {
    if !have_qemu_system() {
        return;
    }
    let sb = Sandbox::new();
    sb.init(&[]);
    let disk = sb.path("esp.raw");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(64 << 20)
        .unwrap();
    let mut sfdisk = Command::new("sfdisk")
        .args(["-q", disk.to_str().unwrap()])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(
        sfdisk.stdin.as_mut().unwrap(),
        b"label: gpt\nstart=2048, size=100000, type=C12A7328-F81F-11D2-BA4B-00A0C93EC93B\n",
    )
    .unwrap();
    drop(sfdisk.stdin.take());
    assert!(sfdisk.wait().unwrap().success());
    let snap = sb.replicate(&disk, &["--name", "uefi"])["snapshot"]
        .as_str()
        .unwrap()
        .to_owned();
    let before = store_files(&sb.path("store"));
    let (code, report) = boot_test(
        &sb,
        &snap,
        &[
            "--expect",
            r#"BdsDxe: failed to load Boot[0-9]+ "UEFI QEMU HARDDISK"#,
            "--timeout",
            "90s",
            "--accel",
            "tcg",
        ],
    );
    assert_eq!(code, 0, "{report}");
    assert_eq!(report["firmware"], "uefi", "{report}");
    assert_eq!(store_files(&sb.path("store")), before);
}
