//! Guest inspection of disks built here with Debian's tools (sfdisk, sgdisk, mkfs.ext4 -d,
//! mkfs.xfs, mkfs.vfat, mkntfs and ntfscp, cryptsetup, pvcreate), read raw, through VMDK and
//! VHDX, and from a snapshot in an S3 store; hostile tables and file systems.

use std::path::{Path, PathBuf};
use std::process::Command;

use blockferry_tests::{MIB, Rng, Sandbox, have_qemu, qemu_from_raw, write_at};
use serde_json::Value;

/// Whether every tool is here (CI installs them: `BF_REQUIRE_TOOLS` makes a missing one fail).
pub(crate) fn have_tools() -> bool {
    let tools = [
        "sfdisk",
        "sgdisk",
        "mkfs.ext4",
        "mkfs.xfs",
        "mkfs.vfat",
        "mkntfs",
        "ntfscp",
        "ntfs-3g",
        "cryptsetup",
        "mkswap",
        "pvcreate",
        "losetup",
    ];
    let missing: Vec<&str> = tools
        .iter()
        .copied()
        .filter(|t| {
            !Command::new("sh")
                .args(["-c", &format!("command -v {t}")])
                .output()
                .is_ok_and(|o| o.status.success())
        })
        .collect();
    assert!(
        missing.is_empty() || std::env::var_os("BF_REQUIRE_TOOLS").is_none(),
        "missing: {missing:?} (gdisk xfsprogs ntfs-3g cryptsetup-bin lvm2 dosfstools fdisk)"
    );
    if !missing.is_empty() {
        eprintln!("skipping: {missing:?} not installed");
    }
    missing.is_empty() && have_qemu()
}

pub(crate) fn run(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd).args(args).output().expect(cmd);
    assert!(
        out.status.success(),
        "{cmd} {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub(crate) fn run_in(cmd: &str, args: &[&str], input: &str) {
    use std::io::Write;
    let mut child = Command::new(cmd)
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect(cmd);
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{cmd} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Copies a file system image into a disk at `offset`, leaving its holes holes.
fn place(disk: &Path, part: &Path, offset: u64) {
    let data = std::fs::read(part).unwrap();
    for (i, block) in data.chunks(1 << 16).enumerate() {
        if block.iter().any(|&b| b != 0) {
            write_at(disk, offset + (i as u64) * (1 << 16), block);
        }
    }
}

fn os_release(root: &Path, text: &str, symlink: bool) {
    std::fs::create_dir_all(root.join("etc")).unwrap();
    std::fs::create_dir_all(root.join("usr/lib")).unwrap();
    if symlink {
        // As Debian ships it: /etc/os-release -> ../usr/lib/os-release.
        std::fs::write(root.join("usr/lib/os-release"), text).unwrap();
        std::os::unix::fs::symlink("../usr/lib/os-release", root.join("etc/os-release")).unwrap();
    } else {
        std::fs::write(root.join("etc/os-release"), text).unwrap();
    }
    std::fs::create_dir_all(root.join("boot")).unwrap();
    std::fs::write(root.join("boot/vmlinuz"), b"not really a kernel").unwrap();
}

fn ext4(sb: &Sandbox, name: &str, size_mib: u64, label: &str, root: &Path) -> PathBuf {
    let img = sb.path(name);
    run(
        "mkfs.ext4",
        &[
            "-q",
            "-F",
            "-L",
            label,
            "-d",
            root.to_str().unwrap(),
            img.to_str().unwrap(),
            &format!("{size_mib}M"),
        ],
    );
    img
}

/// A minimal registry hive (regf) holding `Microsoft\Windows NT\CurrentVersion` with the
/// values Windows Server 2022 has there, laid out as the format's public description says.
fn software_hive() -> Vec<u8> {
    let mut bins = vec![0u8; 32];
    let cell = |bins: &mut Vec<u8>, data: &[u8]| -> u32 {
        let at = bins.len();
        let size = (data.len() + 4).next_multiple_of(8);
        bins.extend_from_slice(&(-i32::try_from(size).unwrap()).to_le_bytes());
        bins.extend_from_slice(data);
        bins.resize(at + size, 0);
        (at) as u32
    };
    let utf16 = |s: &str| -> Vec<u8> {
        s.encode_utf16()
            .chain([0])
            .flat_map(u16::to_le_bytes)
            .collect()
    };
    let sz = |bins: &mut Vec<u8>, name: &str, value: &str| -> u32 {
        let data = utf16(value);
        let data_at = cell(bins, &data);
        let mut vk = b"vk".to_vec();
        vk.extend_from_slice(&(name.len() as u16).to_le_bytes());
        vk.extend_from_slice(&(data.len() as u32).to_le_bytes());
        vk.extend_from_slice(&data_at.to_le_bytes());
        vk.extend_from_slice(&1u32.to_le_bytes()); // REG_SZ
        vk.extend_from_slice(&1u16.to_le_bytes()); // ASCII name
        vk.extend_from_slice(&0u16.to_le_bytes());
        vk.extend_from_slice(name.as_bytes());
        cell(bins, &vk)
    };
    let dword = |bins: &mut Vec<u8>, name: &str, value: u32| -> u32 {
        let mut vk = b"vk".to_vec();
        vk.extend_from_slice(&(name.len() as u16).to_le_bytes());
        vk.extend_from_slice(&0x8000_0004u32.to_le_bytes());
        vk.extend_from_slice(&value.to_le_bytes());
        vk.extend_from_slice(&4u32.to_le_bytes()); // REG_DWORD
        vk.extend_from_slice(&1u16.to_le_bytes());
        vk.extend_from_slice(&0u16.to_le_bytes());
        vk.extend_from_slice(name.as_bytes());
        cell(bins, &vk)
    };
    let nk =
        |bins: &mut Vec<u8>, name: &str, root: bool, sub: Option<u32>, values: &[u32]| -> u32 {
            let list = if values.is_empty() {
                u32::MAX
            } else {
                let offsets: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
                cell(bins, &offsets)
            };
            let mut k = b"nk".to_vec();
            k.extend_from_slice(&(0x20u16 | if root { 0x4 } else { 0 }).to_le_bytes());
            k.extend_from_slice(&[0; 8]); // last written
            k.extend_from_slice(&0u32.to_le_bytes()); // access bits
            k.extend_from_slice(&0u32.to_le_bytes()); // parent (not read back here)
            k.extend_from_slice(&u32::from(sub.is_some()).to_le_bytes());
            k.extend_from_slice(&0u32.to_le_bytes());
            k.extend_from_slice(&sub.unwrap_or(u32::MAX).to_le_bytes());
            k.extend_from_slice(&u32::MAX.to_le_bytes());
            k.extend_from_slice(&(values.len() as u32).to_le_bytes());
            k.extend_from_slice(&list.to_le_bytes());
            k.extend_from_slice(&u32::MAX.to_le_bytes()); // security
            k.extend_from_slice(&u32::MAX.to_le_bytes()); // class name
            k.extend_from_slice(&[0; 20]); // largest lengths, work var
            k.extend_from_slice(&(name.len() as u16).to_le_bytes());
            k.extend_from_slice(&0u16.to_le_bytes());
            k.extend_from_slice(name.as_bytes());
            cell(bins, &k)
        };
    let lf = |bins: &mut Vec<u8>, key: u32, name: &str| -> u32 {
        let mut l = b"lf".to_vec();
        l.extend_from_slice(&1u16.to_le_bytes());
        l.extend_from_slice(&key.to_le_bytes());
        let mut hint = [0u8; 4];
        for (h, b) in hint.iter_mut().zip(name.bytes()) {
            *h = b;
        }
        l.extend_from_slice(&hint);
        cell(bins, &l)
    };
    let values = [
        sz(&mut bins, "ProductName", "Windows Server 2022 Datacenter"),
        sz(&mut bins, "CurrentBuildNumber", "20348"),
        sz(&mut bins, "CurrentVersion", "6.3"),
        sz(&mut bins, "EditionID", "ServerDatacenter"),
        dword(&mut bins, "CurrentMajorVersionNumber", 10),
        dword(&mut bins, "CurrentMinorVersionNumber", 0),
    ];
    let cv = nk(&mut bins, "CurrentVersion", false, None, &values);
    let l = lf(&mut bins, cv, "CurrentVersion");
    let wnt = nk(&mut bins, "Windows NT", false, Some(l), &[]);
    let l = lf(&mut bins, wnt, "Windows NT");
    let ms = nk(&mut bins, "Microsoft", false, Some(l), &[]);
    let l = lf(&mut bins, ms, "Microsoft");
    let root = nk(&mut bins, "ROOT", true, Some(l), &[]);
    let size = bins.len().next_multiple_of(4096);
    bins.resize(size, 0);
    bins[..4].copy_from_slice(b"hbin");
    bins[8..12].copy_from_slice(&(size as u32).to_le_bytes());
    let mut base = vec![0u8; 4096];
    base[..4].copy_from_slice(b"regf");
    base[4..8].copy_from_slice(&1u32.to_le_bytes());
    base[8..12].copy_from_slice(&1u32.to_le_bytes());
    base[20..24].copy_from_slice(&1u32.to_le_bytes());
    base[24..28].copy_from_slice(&5u32.to_le_bytes());
    base[32..36].copy_from_slice(&1u32.to_le_bytes());
    base[36..40].copy_from_slice(&root.to_le_bytes());
    base[40..44].copy_from_slice(&(size as u32).to_le_bytes());
    base[44..48].copy_from_slice(&1u32.to_le_bytes());
    let sum = (0..127).fold(0u32, |x, i| {
        x ^ u32::from_le_bytes(base[i * 4..i * 4 + 4].try_into().unwrap())
    });
    base[508..512].copy_from_slice(&sum.to_le_bytes());
    base.extend_from_slice(&bins);
    base
}

/// Disk 1: MBR, BIOS: a bootable ext4 root (Debian 12, os-release a symlink) and swap.
pub(crate) fn debian_bios(sb: &Sandbox) -> PathBuf {
    let root = sb.path("debian-root");
    os_release(
        &root,
        "PRETTY_NAME=\"Debian GNU/Linux 12 (bookworm)\"\nNAME=\"Debian GNU/Linux\"\nVERSION_ID=\"12\"\nVERSION=\"12 (bookworm)\"\nID=debian\n",
        true,
    );
    let disk = sb.path("debian.raw");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(64 * MIB)
        .unwrap();
    run_in(
        "sfdisk",
        &["-q", disk.to_str().unwrap()],
        "label: dos\nstart=2048, size=81920, type=83, bootable\nstart=83968, type=82\n",
    );
    let part = ext4(sb, "debian-root.img", 40, "root", &root);
    place(&disk, &part, MIB);
    let swap = sb.path("swap.img");
    std::fs::File::create(&swap)
        .unwrap()
        .set_len(64 * MIB - 83968 * 512)
        .unwrap();
    run("mkswap", &["-q", "-L", "swap0", swap.to_str().unwrap()]);
    place(&disk, &swap, 83968 * 512);
    // Boot code in the MBR (a jump and a few instructions, as any loader starts).
    write_at(
        &disk,
        0,
        &[0xeb, 0x63, 0x90, 0x10, 0x8e, 0xd0, 0xbc, 0x00, 0xb0],
    );
    disk
}

/// Disk 2: GPT, UEFI: ESP (FAT32), ext4 root (Rocky Linux 9.3), XFS data.
pub(crate) fn rocky_uefi(sb: &Sandbox) -> PathBuf {
    let root = sb.path("rocky-root");
    os_release(
        &root,
        "NAME=\"Rocky Linux\"\nVERSION=\"9.3 (Blue Onyx)\"\nID=\"rocky\"\nID_LIKE=\"rhel centos fedora\"\nVERSION_ID=\"9.3\"\nPRETTY_NAME=\"Rocky Linux 9.3 (Blue Onyx)\"\n",
        false,
    );
    let disk = sb.path("rocky.raw");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(420 * MIB)
        .unwrap();
    let d = disk.to_str().unwrap();
    run(
        "sgdisk",
        &["-n", "1:1M:+34M", "-t", "1:EF00", "-c", "1:EFI System", d],
    );
    run(
        "sgdisk",
        &["-n", "2:0:+40M", "-t", "2:8300", "-c", "2:root", d],
    );
    run(
        "sgdisk",
        &["-n", "3:0:+300M", "-t", "3:8300", "-c", "3:data", d],
    );
    let esp = sb.path("esp.img");
    std::fs::File::create(&esp)
        .unwrap()
        .set_len(34 * MIB)
        .unwrap();
    run(
        "mkfs.vfat",
        &["-F", "32", "-n", "ESP", esp.to_str().unwrap()],
    );
    place(&disk, &esp, MIB);
    let part = ext4(sb, "rocky-root.img", 40, "rocky", &root);
    place(&disk, &part, 35 * MIB);
    let xfs = sb.path("xfs.img");
    std::fs::File::create(&xfs)
        .unwrap()
        .set_len(300 * MIB)
        .unwrap();
    run("mkfs.xfs", &["-q", "-L", "data", xfs.to_str().unwrap()]);
    place(&disk, &xfs, 75 * MIB);
    disk
}

/// Disk 3: GPT, UEFI: ESP, Microsoft reserved, NTFS with Windows/System32 and its SOFTWARE
/// hive, and a LUKS2 volume; an LVM PV on an MBR disk of its own.
pub(crate) fn windows_uefi(sb: &Sandbox) -> PathBuf {
    let disk = sb.path("windows.raw");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(200 * MIB)
        .unwrap();
    let d = disk.to_str().unwrap();
    run("sgdisk", &["-n", "1:1M:+34M", "-t", "1:EF00", d]);
    run("sgdisk", &["-n", "2:0:+16M", "-t", "2:0C01", d]);
    run(
        "sgdisk",
        &[
            "-n",
            "3:0:+80M",
            "-t",
            "3:0700",
            "-c",
            "3:Basic data partition",
            d,
        ],
    );
    run("sgdisk", &["-n", "4:0:+40M", "-t", "4:8309", d]);
    let esp = sb.path("win-esp.img");
    std::fs::File::create(&esp)
        .unwrap()
        .set_len(34 * MIB)
        .unwrap();
    run("mkfs.vfat", &["-F", "32", esp.to_str().unwrap()]);
    place(&disk, &esp, MIB);
    let ntfs = sb.path("ntfs.img");
    std::fs::File::create(&ntfs)
        .unwrap()
        .set_len(80 * MIB)
        .unwrap();
    let n = ntfs.to_str().unwrap();
    run("mkntfs", &["-q", "-F", "-Q", "-L", "Windows", n]);
    // ntfscp copies files into folders that exist: the folders are made through ntfs-3g.
    let mnt = sb.path("ntfs-mnt");
    std::fs::create_dir_all(&mnt).unwrap();
    run("ntfs-3g", &[n, mnt.to_str().unwrap()]);
    std::fs::create_dir_all(mnt.join("Windows/System32/config")).unwrap();
    run("umount", &[mnt.to_str().unwrap()]);
    let hive = sb.path("SOFTWARE");
    std::fs::write(&hive, software_hive()).unwrap();
    run(
        "ntfscp",
        &[
            "-f",
            n,
            hive.to_str().unwrap(),
            "/Windows/System32/config/SOFTWARE",
        ],
    );
    let kernel = sb.path("ntoskrnl.exe");
    std::fs::write(&kernel, b"MZ not really").unwrap();
    run(
        "ntfscp",
        &[
            "-f",
            n,
            kernel.to_str().unwrap(),
            "/Windows/System32/ntoskrnl.exe",
        ],
    );
    place(&disk, &ntfs, 51 * MIB);
    let luks = sb.path("luks.img");
    std::fs::File::create(&luks)
        .unwrap()
        .set_len(40 * MIB)
        .unwrap();
    run_in(
        "cryptsetup",
        &[
            "luksFormat",
            "--batch-mode",
            "--type",
            "luks2",
            "--pbkdf",
            "pbkdf2",
            "--pbkdf-force-iterations",
            "1000",
            "--label",
            "secret",
            luks.to_str().unwrap(),
            "-",
        ],
        "passphrase",
    );
    place(&disk, &luks, 131 * MIB);
    disk
}

/// Disk 4: MBR with an LVM physical volume (pvcreate needs a block device: a loop device).
fn lvm(sb: &Sandbox) -> PathBuf {
    let disk = sb.path("lvm.raw");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(32 * MIB)
        .unwrap();
    run_in(
        "sfdisk",
        &["-q", disk.to_str().unwrap()],
        "label: dos\nstart=2048, type=8e\n",
    );
    let pv = sb.path("pv.img");
    std::fs::File::create(&pv)
        .unwrap()
        .set_len(31 * MIB)
        .unwrap();
    let dev = run("losetup", &["-f", "--show", pv.to_str().unwrap()]);
    let dev = dev.trim();
    let made = Command::new("pvcreate")
        .args(["-ff", "-y", dev])
        .output()
        .unwrap();
    run("losetup", &["-d", dev]);
    assert!(
        made.status.success(),
        "pvcreate: {}",
        String::from_utf8_lossy(&made.stderr)
    );
    place(&disk, &pv, MIB);
    disk
}

fn fs_of(v: &Value, partition: u64) -> &Value {
    v["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["partition"] == partition)
        .map_or_else(
            || panic!("no partition {partition}: {v:#}"),
            |x| &x["filesystem"],
        )
}

/// Checks what the inspection of each disk must say (whatever the wrapper).
fn check(name: &str, v: &Value) {
    let parts = v["table"]["partitions"].as_array().unwrap();
    assert!(
        v["table"]["problems"].as_array().unwrap().is_empty(),
        "{name}: {v:#}"
    );
    match name {
        "debian" => {
            assert_eq!(v["table"]["scheme"], "mbr", "{v:#}");
            assert_eq!(parts.len(), 2);
            assert_eq!(parts[0]["start"], MIB);
            assert_eq!(parts[0]["size"], 40 * MIB);
            assert_eq!(parts[0]["alignment"], MIB);
            assert_eq!(parts[0]["bootable"], true);
            assert_eq!(parts[0]["type_code"], "0x83");
            assert_eq!(parts[1]["type_name"], "Linux swap");
            let root = fs_of(v, 1);
            assert_eq!(root["kind"], "ext4");
            assert_eq!(root["label"], "root");
            assert_eq!(root["os"]["family"], "linux");
            assert_eq!(root["os"]["distro"], "debian");
            assert_eq!(root["os"]["version"], "12");
            assert_eq!(root["os"]["pretty_name"], "Debian GNU/Linux 12 (bookworm)");
            assert_eq!(root["os"]["source"], "/etc/os-release");
            assert_eq!(fs_of(v, 2)["kind"], "swap");
            assert_eq!(fs_of(v, 2)["label"], "swap0");
            assert_eq!(v["boot"]["mode"], "bios");
        }
        "rocky" => {
            assert_eq!(v["table"]["scheme"], "gpt");
            assert_eq!(v["table"]["protective_mbr"], true);
            assert_eq!(v["table"]["hybrid_mbr"], false);
            assert_eq!(parts.len(), 3);
            assert_eq!(parts[0]["type_name"], "EFI system");
            assert_eq!(parts[0]["name"], "EFI System");
            assert_eq!(parts[2]["name"], "data");
            assert_eq!(fs_of(v, 1)["kind"], "fat32");
            assert_eq!(fs_of(v, 1)["label"], "ESP");
            let root = fs_of(v, 2);
            assert_eq!(root["kind"], "ext4");
            assert_eq!(root["os"]["distro"], "rocky");
            assert_eq!(root["os"]["version"], "9.3");
            assert_eq!(fs_of(v, 3)["kind"], "xfs");
            assert_eq!(fs_of(v, 3)["label"], "data");
            assert_eq!(v["boot"]["mode"], "uefi");
        }
        "windows" => {
            assert_eq!(v["table"]["scheme"], "gpt");
            assert_eq!(parts[1]["type_name"], "Microsoft reserved");
            assert_eq!(parts[2]["type_name"], "Microsoft basic data");
            let nt = fs_of(v, 3);
            assert_eq!(nt["kind"], "ntfs", "{v:#}");
            assert_eq!(nt["os"]["family"], "windows", "{v:#}");
            assert_eq!(nt["os"]["name"], "Windows Server 2022 Datacenter");
            assert_eq!(nt["os"]["version"], "10.0.20348");
            assert_eq!(nt["os"]["source"], "Windows/System32/config/SOFTWARE");
            let luks = fs_of(v, 4);
            assert_eq!(luks["kind"], "luks2");
            assert_eq!(luks["encrypted"], true);
            assert_eq!(luks["label"], "secret");
            assert_eq!(v["boot"]["mode"], "uefi");
            assert_eq!(v["os"].as_array().unwrap().len(), 1);
        }
        "lvm" => {
            assert_eq!(fs_of(v, 1)["kind"], "lvm2");
            assert_eq!(fs_of(v, 1)["uuid"].as_str().unwrap().len(), 32);
            assert_eq!(v["boot"]["mode"], "none");
        }
        _ => unreachable!(),
    }
}

#[test]
fn guests_are_inspected_through_every_wrapper_and_from_a_store() {
    if !have_tools() {
        return;
    }
    let sb = Sandbox::new();
    let disks = [
        ("debian", debian_bios(&sb)),
        ("rocky", rocky_uefi(&sb)),
        ("windows", windows_uefi(&sb)),
        ("lvm", lvm(&sb)),
    ];
    for (name, raw) in &disks {
        let v = sb.json(&["inspect", raw.to_str().unwrap()]);
        check(name, &v);
        for (fmt, opts, ext) in [
            ("vmdk", "subformat=monolithicSparse", "vmdk"),
            ("vhdx", "", "vhdx"),
        ] {
            let wrapped = raw.with_extension(ext);
            qemu_from_raw(raw, &wrapped, fmt, opts);
            let v = sb.json(&["inspect", wrapped.to_str().unwrap()]);
            check(name, &v);
        }
    }
    // The text form names what matters.
    let text = sb.ok(&["inspect", disks[2].1.to_str().unwrap()]);
    for needle in [
        "GPT (protective MBR)",
        "boot: uefi",
        "Windows Server 2022 Datacenter",
        "luks2 \"secret\"",
    ] {
        assert!(text.contains(needle), "{needle:?} not in:\n{text}");
    }
}

#[test]
fn a_snapshot_in_an_s3_store_is_inspected() {
    if !have_tools() {
        return;
    }
    let sb = Sandbox::new_s3("inspect");
    sb.init(&[]);
    let disk = rocky_uefi(&sb);
    sb.replicate(&disk, &[]);
    let mut args = vec!["inspect", "--store"];
    let store = sb.store();
    args.push(&store);
    args.push("rocky.raw@latest");
    let v = sb.json(&args);
    check("rocky", &v);
    assert!(v["disk"].as_str().unwrap().contains("rocky.raw"), "{v}");
}

#[test]
fn hostile_tables_and_file_systems_fail_clearly() {
    if !have_tools() {
        return;
    }
    let sb = Sandbox::new();
    let mbr = |entries: &[(u8, u8, u32, u32)]| {
        let mut d = vec![0u8; 8 << 20];
        for (i, &(flag, kind, lba, count)) in entries.iter().enumerate() {
            let e = &mut d[446 + i * 16..462 + i * 16];
            e[0] = flag;
            e[4] = kind;
            e[8..12].copy_from_slice(&lba.to_le_bytes());
            e[12..16].copy_from_slice(&count.to_le_bytes());
        }
        d[510..512].copy_from_slice(&[0x55, 0xaa]);
        d
    };
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "overlap",
            mbr(&[(0, 0x83, 2048, 8192), (0, 0x83, 4096, 4096)]),
            "partitions 1 and 2 overlap",
        ),
        (
            "range",
            mbr(&[(0, 0x83, 2048, 0xffff_0000)]),
            "reaches past the disk's end",
        ),
    ];
    for (name, bytes, needle) in cases {
        let p = sb.path(&format!("{name}.raw"));
        std::fs::write(&p, bytes).unwrap();
        let v = sb.json(&["inspect", p.to_str().unwrap()]);
        let problems = v["table"]["problems"].to_string();
        assert!(problems.contains(needle), "{name}: {problems}");
    }
    // GPT: 2^32 - 1 entries (header CRC right), then the header damaged, then the entries.
    let gpt = sb.path("gpt.raw");
    std::fs::File::create(&gpt)
        .unwrap()
        .set_len(16 * MIB)
        .unwrap();
    run(
        "sgdisk",
        &["-n", "1:1M:+4M", "-t", "1:8300", gpt.to_str().unwrap()],
    );
    let good = std::fs::read(&gpt).unwrap();
    let mut huge = good.clone();
    huge[512 + 80..512 + 84].copy_from_slice(&u32::MAX.to_le_bytes());
    let mut h = huge[512..512 + 92].to_vec();
    h[16..20].fill(0);
    huge[512 + 16..512 + 20].copy_from_slice(&crc32(&h).to_le_bytes());
    // The backup too, so that neither is usable.
    let last = good.len() - 512;
    huge[last..last + 512].fill(0);
    let mut bad_header = good.clone();
    bad_header[512 + 24] ^= 0xff;
    let mut bad_entries = good.clone();
    bad_entries[1024 + 40] ^= 0x01;
    for (name, bytes, needle) in [
        ("gpt-huge", huge, "4294967295 entries"),
        ("gpt-header", bad_header, "the backup header was used"),
        ("gpt-entries", bad_entries, "the backup header was used"),
    ] {
        let p = sb.path(&format!("{name}.raw"));
        std::fs::write(&p, bytes).unwrap();
        let v = sb.json(&["inspect", p.to_str().unwrap()]);
        let problems = v["table"]["problems"].to_string();
        assert!(problems.contains(needle), "{name}: {v:#}");
        if name != "gpt-huge" {
            assert_eq!(v["table"]["partitions"][0]["start"], MIB, "{name}: {v}");
        }
    }
    // ext4: a symbolic link loop for os-release, and a damaged superblock.
    let root = sb.path("loop-root");
    std::fs::create_dir_all(root.join("etc")).unwrap();
    std::os::unix::fs::symlink("os-release", root.join("etc/os-release")).unwrap();
    let img = ext4(&sb, "loop.img", 8, "loop", &root);
    let v = sb.json(&["inspect", img.to_str().unwrap()]);
    let fs = &v["volumes"][0]["filesystem"];
    assert_eq!(fs["kind"], "ext4");
    assert!(
        fs["os"].is_null() && fs["problem"].as_str().is_some(),
        "{v:#}"
    );
    let mut bytes = std::fs::read(&img).unwrap();
    // s_log_block_size far out of range.
    bytes[1024 + 0x18..1024 + 0x1c].copy_from_slice(&40u32.to_le_bytes());
    std::fs::write(&img, &bytes).unwrap();
    let v = sb.json(&["inspect", img.to_str().unwrap()]);
    let fs = &v["volumes"][0]["filesystem"];
    assert!(
        fs["problem"].as_str().unwrap().contains("cannot be read"),
        "{v:#}"
    );

    // Damaged copies of a real disk, in process: an answer or an error, never a panic, fast.
    let disk = debian_bios(&sb);
    // The MBR and the root file system's first 7 MiB (the swap partition is then out of range).
    let mut good = std::fs::read(&disk).unwrap();
    good.truncate(8 << 20);
    let mut rng = Rng::seeded("inspect-damage");
    let started = std::time::Instant::now();
    for i in 0..300 {
        let mut bad = good.clone();
        let n = 1 + rng.below(16);
        for _ in 0..n {
            // The MBR, the ext4 superblock, group descriptors and inode tables.
            let at = if i % 2 == 0 {
                rng.below(1024)
            } else {
                MIB + rng.below(2 * MIB)
            };
            bad[at as usize] ^= 1 << rng.below(8);
        }
        let _ = blockferry::inspect_bytes(bad);
    }
    assert!(started.elapsed().as_secs() < 60, "{:?}", started.elapsed());
}

/// CRC-32 (IEEE), as GPT uses.
fn crc32(b: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &byte in b {
        crc ^= u32::from(byte);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xedb8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}
