//! Readiness validation: every check shown failing (or warning, where that is its strongest
//! verdict) on a disk or VM built to fail it, and passing on one built to pass it.

use std::fmt::Write;
use std::path::Path;
use std::process::Output;

use blockferry_tests::vhdx_builder::{VhdxSpec, write_vhdx};
use blockferry_tests::{MIB, Rng, Sandbox, qemu, write_at};
use serde_json::Value;

use crate::inspect::{debian_bios, have_tools, rocky_uefi, run, run_in, windows_uefi};

/// Runs `validate --json`; returns the exit code and the result.
fn validate(sb: &Sandbox, path: &Path, extra: &[&str]) -> (i32, Value) {
    let mut args = vec!["validate", path.to_str().unwrap(), "--json"];
    args.extend_from_slice(extra);
    let out: Output = sb.run(&args);
    let v: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "{e}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (out.status.code().unwrap_or(-1), v)
}

/// The status of check `id` (of the one subject that has it, or the first).
fn status<'a>(v: &'a Value, id: &str) -> &'a str {
    v["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["id"] == id)
        .unwrap_or_else(|| panic!("no check {id}: {v:#}"))["status"]
        .as_str()
        .unwrap()
}

fn expect(v: &Value, code: i32, id: &str, want: &str, reason: &str) {
    assert_eq!(status(v, id), want, "{id}: {v:#}");
    let check = v["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["id"] == id)
        .unwrap();
    assert!(
        check["reason"].as_str().unwrap().contains(reason),
        "{id}: {reason:?} not in {check}"
    );
    if want == "fail" {
        assert_eq!(code, 3, "{v:#}");
        assert!(
            check["fix"].as_str().is_some_and(|f| !f.is_empty()),
            "{check}"
        );
    }
}

#[test]
fn every_check_fails_on_a_disk_made_to_fail_it_and_passes_on_a_good_one() {
    if !have_tools() {
        return;
    }
    let sb = Sandbox::new();

    // A good disk: Debian 12, MBR, BIOS, 64 MiB; every disk check passes for Azure.
    let debian = debian_bios(&sb);
    let (code, v) = validate(&sb, &debian, &["--target", "azure"]);
    assert_eq!(code, 0, "{v:#}");
    for id in [
        "chain",
        "image-health",
        "disk-size",
        "sector-size",
        "partition-table",
        "encryption",
        "boot",
        "os",
    ] {
        assert_eq!(status(&v, id), "pass", "{id}: {v:#}");
    }
    assert_eq!(v["passed"], true);

    // os: Rocky Linux is not in AWS's list; Debian 12 is newer than AWS documents.
    let rocky = rocky_uefi(&sb);
    let (code, v) = validate(&sb, &rocky, &["--target", "aws"]);
    expect(&v, code, "os", "fail", "not among the distributions");
    assert_eq!(status(&v, "boot"), "pass");
    let (code, v) = validate(&sb, &debian, &["--target", "aws"]);
    expect(
        &v,
        code,
        "os",
        "fail",
        "outside what the target imports for debian (6 to 11)",
    );
    let (_, v) = validate(&sb, &rocky, &["--target", "azure"]);
    assert_eq!(status(&v, "os"), "pass", "{v:#}");

    // encryption: a LUKS partition; the Windows OS itself passes.
    let windows = windows_uefi(&sb);
    let (code, v) = validate(&sb, &windows, &["--target", "aws"]);
    expect(&v, code, "encryption", "fail", "partition 4 is luks2");
    expect(
        &v,
        code,
        "os",
        "pass",
        "Windows Server 2022 Datacenter (build 20348)",
    );

    // chain: a child whose parent is gone.
    let child_dir = sb.path("chain");
    std::fs::create_dir_all(&child_dir).unwrap();
    let base = child_dir.join("base.vmdk");
    let child = child_dir.join("child.vmdk");
    qemu(&["create", "-q", "-f", "vmdk", base.to_str().unwrap(), "16M"]);
    qemu(&[
        "create",
        "-q",
        "-f",
        "vmdk",
        "-b",
        "base.vmdk",
        "-F",
        "vmdk",
        child.to_str().unwrap(),
    ]);
    let (code, v) = validate(&sb, &child, &[]);
    assert_eq!(status(&v, "chain"), "pass", "{v:#}");
    std::fs::remove_file(&base).unwrap();
    let (code2, v) = validate(&sb, &child, &[]);
    expect(&v, code2, "chain", "fail", "cannot be opened");
    let _ = code;

    // image-health: the unclean-shutdown flag of a sparse VMDK (its strongest verdict: warn).
    let unclean = sb.path("unclean.vmdk");
    qemu(&[
        "create",
        "-q",
        "-f",
        "vmdk",
        unclean.to_str().unwrap(),
        "16M",
    ]);
    write_at(&unclean, 72, &[1]);
    let (code, v) = validate(&sb, &unclean, &[]);
    expect(&v, code, "image-health", "warn", "unclean");

    // disk-size: 17 TiB for AWS (a sparse VHDX), a size not a whole MiB for Azure.
    let huge = sb.path("huge.vhdx");
    qemu(&["create", "-q", "-f", "vhdx", huge.to_str().unwrap(), "17T"]);
    let (code, v) = validate(&sb, &huge, &["--target", "aws"]);
    expect(&v, code, "disk-size", "fail", "up to 16 TiB");
    let odd = sb.path("odd.raw");
    std::fs::File::create(&odd)
        .unwrap()
        .set_len(64 * MIB + 512)
        .unwrap();
    let (code, v) = validate(&sb, &odd, &["--target", "azure"]);
    expect(&v, code, "disk-size", "fail", "not a whole number of MiB");

    // sector-size: a VHDX with 4096-byte logical sectors.
    let native = sb.path("4kn.vhdx");
    write_vhdx(
        &native,
        &VhdxSpec {
            size: 64 * MIB,
            block_size: 1 << 20,
            logical_sector: 4096,
            data_write_guid: [7; 16],
            parent: None,
            blocks: Vec::new(),
        },
    );
    let (code, v) = validate(&sb, &native, &["--target", "aws"]);
    expect(&v, code, "sector-size", "fail", "4096-byte logical sectors");

    // partition-table: two partitions that overlap.
    let overlap = sb.path("overlap.raw");
    std::fs::File::create(&overlap)
        .unwrap()
        .set_len(64 * MIB)
        .unwrap();
    run_in(
        "sfdisk",
        &["-q", overlap.to_str().unwrap()],
        "label: dos\nstart=2048, size=8192, type=83\nstart=10240, size=8192, type=83\n",
    );
    // Move the second to start inside the first (sfdisk refuses to write an overlap).
    write_at(&overlap, 446 + 16 + 8, &4096u32.to_le_bytes());
    let (code, v) = validate(&sb, &overlap, &[]);
    expect(&v, code, "partition-table", "fail", "overlap");

    // boot: partitions but no boot loader; BIOS boot from a disk over 2 TiB.
    let noboot = sb.path("noboot.raw");
    std::fs::File::create(&noboot)
        .unwrap()
        .set_len(64 * MIB)
        .unwrap();
    run_in(
        "sfdisk",
        &["-q", noboot.to_str().unwrap()],
        "label: dos\nstart=2048, type=83\n",
    );
    let (code, v) = validate(&sb, &noboot, &[]);
    expect(&v, code, "boot", "fail", "no boot loader found");
    let big = sb.path("big.raw");
    std::fs::File::create(&big)
        .unwrap()
        .set_len(3 << 40)
        .unwrap();
    run_in(
        "sfdisk",
        &["-q", big.to_str().unwrap()],
        "label: dos\nstart=2048, size=4194304, type=83, bootable\n",
    );
    write_at(&big, 0, &[0xeb, 0x63, 0x90]);
    let (code, v) = validate(&sb, &big, &["--target", "aws"]);
    expect(&v, code, "boot", "fail", "over 2 TiB needs GPT and UEFI");

    // store-space: a store on a 4 MiB file system, and one with room.
    // A disk with 8 MiB of data (and the Debian disk's boot sector, so only the store fails).
    let full = sb.path("full.raw");
    std::fs::copy(&debian, &full).unwrap();
    write_at(&full, 48 * MIB, &Rng::seeded("store-space").bytes(8 << 20));
    let small = sb.path("small-fs");
    std::fs::create_dir_all(&small).unwrap();
    run(
        "mount",
        &[
            "-t",
            "tmpfs",
            "-o",
            "size=4M",
            "tmpfs",
            small.to_str().unwrap(),
        ],
    );
    let store = small.join("store");
    let init = sb.run(&["init", "--store", store.to_str().unwrap()]);
    let result = std::panic::catch_unwind(|| {
        assert!(
            init.status.success(),
            "{}",
            String::from_utf8_lossy(&init.stderr)
        );
        let (code, v) = validate(&sb, &full, &["--store", store.to_str().unwrap()]);
        expect(&v, code, "store-space", "fail", "bytes free");
    });
    run("umount", &[small.to_str().unwrap()]);
    result.unwrap();
    sb.init(&["--no-encryption"]);
    let (code, v) = validate(&sb, &debian, &["--store", &sb.store()]);
    assert_eq!(status(&v, "store-space"), "pass", "{v:#}");
    assert_eq!(code, 0, "{v:#}");
}

#[test]
fn vm_checks_fail_on_vms_made_to_fail_them() {
    let Some(corpus) = crate::corpus::corpus() else {
        return;
    };
    if !blockferry_tests::have_qemu() {
        return;
    }
    let sb = Sandbox::new();
    // A good VM: two disks, found.
    let good = sb.path("good");
    std::fs::create_dir_all(&good).unwrap();
    let mut vmx = String::from("displayName = \"good\"\n");
    for i in 0..2 {
        qemu(&[
            "create",
            "-q",
            "-f",
            "vmdk",
            good.join(format!("d{i}.vmdk")).to_str().unwrap(),
            "8M",
        ]);
        writeln!(vmx, "scsi0:{i}.fileName = \"d{i}.vmdk\"").unwrap();
    }
    std::fs::write(good.join("good.vmx"), &vmx).unwrap();
    let (_, v) = validate(&sb, &good.join("good.vmx"), &["--target", "aws"]);
    for id in ["vm-encryption", "vm-disks", "disk-count"] {
        assert_eq!(status(&v, id), "pass", "{id}: {v:#}");
    }
    assert_eq!(
        v["checks"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|c| c["id"] == "chain")
            .count(),
        2
    );

    // disk-count: 22 disks, one more than AWS imports with a VM.
    let many = sb.path("many");
    std::fs::create_dir_all(&many).unwrap();
    let mut vmx = String::from("displayName = \"many\"\n");
    for i in 0..22 {
        let (c, u) = (i / 15, i % 15);
        qemu(&[
            "create",
            "-q",
            "-f",
            "vmdk",
            many.join(format!("d{i}.vmdk")).to_str().unwrap(),
            "1M",
        ]);
        writeln!(vmx, "scsi{c}:{u}.fileName = \"d{i}.vmdk\"").unwrap();
    }
    std::fs::write(many.join("many.vmx"), &vmx).unwrap();
    let (code, v) = validate(&sb, &many.join("many.vmx"), &["--target", "aws"]);
    expect(
        &v,
        code,
        "disk-count",
        "fail",
        "22 disks; the target imports at most 21",
    );

    // vm-disks: a disk the folder does not hold.
    let gone = sb.path("gone");
    std::fs::create_dir_all(&gone).unwrap();
    std::fs::write(
        gone.join("gone.vmx"),
        "displayName = \"gone\"\nscsi0:0.fileName = \"missing.vmdk\"\n",
    )
    .unwrap();
    let (code, v) = validate(&sb, &gone.join("gone.vmx"), &[]);
    expect(&v, code, "vm-disks", "fail", "scsi0:0");

    // vm-encryption: the corpus's encrypted VMware VM.
    let enc = sb.path("enc");
    std::fs::create_dir_all(&enc).unwrap();
    std::fs::copy(corpus.join("encrypted.vmx"), enc.join("encrypted.vmx")).unwrap();
    let (code, v) = validate(&sb, &enc.join("encrypted.vmx"), &[]);
    expect(&v, code, "vm-encryption", "fail", "encrypted");

    // Text output names the verdict.
    let out = sb.run(&["validate", enc.join("encrypted.vmx").to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(3));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("FAIL  vm-encryption") && text.contains("NOT READY"),
        "{text}"
    );
}
