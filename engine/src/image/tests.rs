use std::path::Path;

use super::*;

#[test]
fn formats_are_detected_by_content_not_name() {
    let mem = |bytes: &[u8]| MemFile::new("disk.raw", bytes.to_vec());
    let mut vhd_tail = vec![0u8; 1024];
    vhd_tail[512..520].copy_from_slice(b"conectix");
    assert_eq!(detect(&mem(&vhd_tail)).unwrap(), Detected::Vhd);
    assert_eq!(detect(&mem(b"vhdxfile and more")).unwrap(), Detected::Vhdx);
    assert_eq!(detect(&mem(b"KDMV....")).unwrap(), Detected::Vmdk);
    assert_eq!(detect(&mem(b"COWD....")).unwrap(), Detected::Vmdk);
    assert_eq!(
        detect(&mem(&0xcafe_babe_u64.to_le_bytes())).unwrap(),
        Detected::Vmdk
    );
    assert_eq!(
        detect(&mem(b"\n# Disk DescriptorFile\nversion=1\n")).unwrap(),
        Detected::Vmdk
    );
    assert_eq!(
        detect(&mem(b"createType=\"vmfs\"\n\xff\xfe")).unwrap(),
        Detected::Vmdk
    );
    assert_eq!(
        detect(&mem(b"QFI\xfb")).unwrap(),
        Detected::Unsupported("qcow2")
    );
    let mut tar = vec![0u8; 1024];
    tar[257..262].copy_from_slice(b"ustar");
    assert_eq!(detect(&mem(&tar)).unwrap(), Detected::Ova);
    assert_eq!(detect(&mem(b"")).unwrap(), Detected::Raw);
    assert_eq!(detect(&mem(&[0u8; 4096])).unwrap(), Detected::Raw);
}

#[test]
fn recorded_paths_stay_in_the_folder() {
    let dir = tempfile::tempdir().unwrap();
    let folder = dir.path();
    std::fs::write(folder.join("base.vhd"), b"x").unwrap();
    std::fs::create_dir(folder.join("sub")).unwrap();
    std::fs::write(folder.join("sub").join("deep.vhd"), b"x").unwrap();
    let opts = OpenOptions::default();
    let real = |p: &Path| std::fs::canonicalize(p).unwrap();
    // Relative, Windows-style, and absolute from another host (found by name here).
    assert_eq!(
        resolve_path(folder, "base.vhd", &opts).unwrap(),
        real(&folder.join("base.vhd"))
    );
    assert_eq!(
        resolve_path(folder, ".\\base.vhd", &opts).unwrap(),
        real(&folder.join("base.vhd"))
    );
    assert_eq!(
        resolve_path(folder, "sub\\deep.vhd", &opts).unwrap(),
        real(&folder.join("sub/deep.vhd"))
    );
    assert_eq!(
        resolve_path(folder, "C:\\VMs\\x\\base.vhd", &opts).unwrap(),
        real(&folder.join("base.vhd"))
    );
    assert_eq!(
        resolve_path(folder, "/srv/other/base.vhd", &opts).unwrap(),
        real(&folder.join("base.vhd"))
    );
    // Refused: escapes, empty, NUL, absurdly long, directories.
    let sub = folder.join("sub");
    for bad in ["../base.vhd", "..\\base.vhd", "", "a\0b", "C:\\", "sub"] {
        assert!(
            resolve_path(
                if bad.starts_with("..") { &sub } else { folder },
                bad,
                &opts
            )
            .is_err(),
            "{bad:?}"
        );
    }
    assert!(resolve_path(folder, &"x".repeat(5000), &opts).is_err());
    // Allowed when asked.
    let allow = OpenOptions {
        allow_outside_folder: true,
        ..OpenOptions::default()
    };
    assert_eq!(
        resolve_path(&sub, "../base.vhd", &allow).unwrap(),
        real(&folder.join("base.vhd"))
    );
}

#[test]
fn neighbouring_mappings_coalesce_only_when_they_continue_each_other() {
    use super::{Mapping, Target, coalesce};
    let data = |virt, len, file, offset| Mapping {
        virt,
        len,
        target: Target::Data { file, offset },
    };
    let other = |virt, len, target| Mapping { virt, len, target };
    let mut maps = vec![
        data(0, 10, 0, 100),
        data(10, 10, 0, 110), // continues: merged
        data(20, 10, 0, 200), // same file, elsewhere
        data(30, 10, 1, 210), // other file, right offset
        other(40, 5, Target::Zero),
        other(45, 5, Target::Zero),
        other(50, 5, Target::Unallocated),
        other(55, 5, Target::Unallocated),
        data(60, 4, 1, u64::MAX - 3), // at the very end of the offsets: no overflow
        data(64, 4, 1, 0),
    ];
    coalesce(&mut maps);
    assert_eq!(
        maps,
        vec![
            data(0, 20, 0, 100),
            data(20, 10, 0, 200),
            data(30, 10, 1, 210),
            other(40, 10, Target::Zero),
            other(50, 10, Target::Unallocated),
            data(60, 4, 1, u64::MAX - 3),
            data(64, 4, 1, 0),
        ]
    );
    let mut empty = Vec::new();
    coalesce(&mut empty);
    assert!(empty.is_empty());
}
