use super::*;

const MIB: u64 = 1 << 20;

fn set(ranges: &[(u64, u64)]) -> ExtentSet {
    ExtentSet::from_ranges(ranges.iter().copied(), u64::MAX).unwrap()
}

fn pairs(s: &ExtentSet) -> Vec<(u64, u64)> {
    s.iter().map(|e| (e.offset, e.len)).collect()
}

#[test]
fn sets_are_sorted_disjoint_and_coalesced() {
    let s = set(&[(100, 10), (0, 5), (5, 5), (105, 20), (200, 0), (50, 1)]);
    assert_eq!(pairs(&s), [(0, 10), (50, 1), (100, 25)]);
    assert_eq!(s.bytes(), 36);
    assert_eq!(pairs(&s.complement(130)), [(10, 40), (51, 49), (125, 5)]);
    assert_eq!(pairs(&s.complement(8)), Vec::<(u64, u64)>::new());
    assert_eq!(pairs(&ExtentSet::new().complement(7)), [(0, 7)]);
    let u = s.union(&set(&[(9, 42), (300, 1)]));
    assert_eq!(pairs(&u), [(0, 51), (100, 25), (300, 1)]);
    assert!(s.intersects(104, 2));
    assert!(!s.intersects(10, 40));
    assert!(s.intersects(49, 2));
    assert!(!s.intersects(125, 100));
}

#[test]
fn ranges_past_the_disk_are_refused() {
    let e = ExtentSet::from_ranges([(0, 10), (95, 10)], 100).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidChangeList);
    assert!(e.to_string().contains("extent 1"), "{e}");
    assert!(ExtentSet::from_ranges([(u64::MAX, 2)], u64::MAX).is_err());
    assert!(ExtentSet::from_ranges([(100, 0)], 100).is_ok());
}

#[test]
fn chunk_ranges_round_out_and_merge() {
    let s = set(&[(0, 1), (MIB - 1, 2), (5 * MIB, MIB), (7 * MIB + 3, 1)]);
    assert_eq!(s.chunk_ranges(MIB), [0..2, 5..6, 7..8]);
    let merged = set(&[(MIB, 1), (2 * MIB, 1)]).chunk_ranges(MIB);
    assert_eq!((merged.len(), merged[0].clone()), (1, 1..3));
}

#[test]
fn vmware_cbt_lists() {
    let disk = 4 * MIB;
    let one = format!(
        r#"{{"startOffset": 0, "length": {disk}, "changeId": "52 aa/7", "newChangeId": "52 aa/8",
            "changedArea": [{{"start": 65536, "length": 65536}}, {{"start": 0, "length": 4096}}]}}"#
    );
    let l = ChangeList::parse(one.as_bytes(), None, disk).unwrap();
    assert_eq!(l.format, ChangeFormat::VmwareCbt);
    assert_eq!(l.base_change_id.as_deref(), Some("52 aa/7"));
    assert_eq!(l.new_change_id.as_deref(), Some("52 aa/8"));
    assert_eq!(pairs(&l.extents), [(0, 4096), (65536, 65536)]);
    assert!(!l.all_allocated());

    // Several calls (PowerCLI casing), together covering the disk.
    let many = format!(
        r#"[{{"StartOffset": 0, "Length": {half}, "ChangeId": "*",
              "ChangedArea": [{{"Start": 0, "Length": 512}}]}},
            {{"StartOffset": {half}, "Length": {half}, "ChangeId": "*", "ChangedArea": []}}]"#,
        half = disk / 2
    );
    let l = ChangeList::parse(many.as_bytes(), Some(ChangeFormat::VmwareCbt), disk).unwrap();
    assert!(l.all_allocated());

    // One call of several: refused, naming what is missing.
    let partial = format!(
        r#"{{"startOffset": 0, "length": {}, "changedArea": []}}"#,
        disk / 2
    );
    let e = ChangeList::parse(partial.as_bytes(), None, disk).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidChangeList);
    assert!(e.to_string().contains("QueryChangedDiskAreas"), "{e}");

    for bad in [
        // An area outside its call's range.
        format!(
            r#"{{"startOffset": 0, "length": {disk}, "changedArea": [{{"start": {disk}, "length": 1}}]}}"#
        ),
        // Negative numbers.
        format!(
            r#"{{"startOffset": 0, "length": {disk}, "changedArea": [{{"start": -1, "length": 1}}]}}"#
        ),
        // Overflow.
        r#"{"startOffset": 18446744073709551615, "length": 2, "changedArea": []}"#.to_owned(),
        // Parts disagreeing on the base.
        format!(
            r#"[{{"startOffset": 0, "length": {disk}, "changeId": "a/1"}},
                {{"startOffset": 0, "length": {disk}, "changeId": "a/2"}}]"#
        ),
        // Not JSON at all, or the wrong shape.
        "{".to_owned(),
        r#"{"startOffset": "zero"}"#.to_owned(),
        "[]".to_owned(),
    ] {
        let e = ChangeList::parse(bad.as_bytes(), Some(ChangeFormat::VmwareCbt), disk).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidChangeList, "{bad}: {e}");
    }
}

#[test]
fn hyperv_rct_lists() {
    let disk = 8 * MIB;
    let text = r#"{"ChangedByteOffsets": [4194304, 0], "ChangedByteLengths": [1048576, 512],
                   "TargetRctId": "rctX:1234:5", "ProcessedByteLength": 8388608, "ByteOffset": 0}"#;
    let l = ChangeList::parse(text.as_bytes(), None, disk).unwrap();
    assert_eq!(l.format, ChangeFormat::HypervRct);
    assert_eq!(l.base_change_id.as_deref(), Some("rctX:1234:5"));
    assert_eq!(pairs(&l.extents), [(0, 512), (4 * MIB, MIB)]);
    // Without ProcessedByteLength, what a result covered is unknown: refused.
    let bare = r#"{"ChangedByteOffsets": [], "ChangedByteLengths": [], "ByteLength": 8388608}"#;
    let e = ChangeList::parse(bare.as_bytes(), None, disk).unwrap_err();
    assert!(e.to_string().contains("ProcessedByteLength"), "{e}");

    for bad in [
        r#"{"ChangedByteOffsets": [0], "ChangedByteLengths": [], "ProcessedByteLength": 8388608}"#,
        r#"{"ChangedByteOffsets": [0], "ChangedByteLengths": [9000000], "ProcessedByteLength": 8388608}"#,
        r#"{"ChangedByteOffsets": [], "ChangedByteLengths": [], "ByteOffset": 0, "ProcessedByteLength": 4096}"#,
        r#"{"ChangedByteOffsets": [], "ChangedByteLengths": [], "ByteOffset": 0}"#,
    ] {
        let e = ChangeList::parse(bad.as_bytes(), Some(ChangeFormat::HypervRct), disk).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidChangeList, "{bad}: {e}");
    }
}

#[test]
fn plain_extent_lists() {
    let disk = 16 * MIB;
    let text = "# offset,length\n0,4096\n\n0x100000 0x1000  # hex\n4096\t4096\n";
    let l = ChangeList::parse(text.as_bytes(), None, disk).unwrap();
    assert_eq!(l.format, ChangeFormat::Extents);
    assert_eq!(pairs(&l.extents), [(0, 8192), (MIB, 4096)]);
    let json = r#"[[0, 10], {"offset": 20, "length": 5}]"#;
    let l = ChangeList::parse(json.as_bytes(), None, disk).unwrap();
    assert_eq!(pairs(&l.extents), [(0, 10), (20, 5)]);
    let doc = r#"{"changeId": "a", "newChangeId": "b", "extents": [[1, 1]]}"#;
    let l = ChangeList::parse(doc.as_bytes(), None, disk).unwrap();
    assert_eq!(
        (l.base_change_id.as_deref(), l.new_change_id.as_deref()),
        (Some("a"), Some("b"))
    );
    assert!(
        ChangeList::parse(b"", None, disk)
            .unwrap()
            .extents
            .is_empty()
    );

    for bad in [
        "0,4096,1\n",
        "-5,10\n",
        "0\n",
        "x,1\n",
        "18446744073709551616,1\n",
        "16777215,2\n",
        "[[0, -1]]",
    ] {
        let e = ChangeList::parse(bad.as_bytes(), Some(ChangeFormat::Extents), disk).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidChangeList, "{bad}: {e}");
    }
    let e = ChangeList::parse(b"1,1\n2 2\nzz\n", None, disk).unwrap_err();
    assert!(e.to_string().contains("line 3"), "{e}");
    assert!(ChangeList::parse(&[0xff, b'\n'], None, disk).is_err());
}

#[test]
fn format_names_round_trip() {
    for f in [
        ChangeFormat::VmwareCbt,
        ChangeFormat::HypervRct,
        ChangeFormat::Extents,
    ] {
        assert_eq!(ChangeFormat::from_name(f.name()).unwrap(), f);
    }
    assert_eq!(
        ChangeFormat::from_name("qcow").unwrap_err().kind(),
        ErrorKind::Config
    );
}

#[test]
fn builders_stay_within_their_cap_by_rounding_out() {
    // In order and out of order: 1000 disjoint 1-byte ranges 100 KiB apart, at most 8 kept.
    for reverse in [false, true] {
        let mut b = ExtentBuilder::new(1 << 30, 8);
        let mut idx: Vec<u64> = (0..1000).collect();
        if reverse {
            idx.reverse();
        }
        for i in &idx {
            b.add(i * 100_000, 1).unwrap();
        }
        assert!(b.granularity() >= 64 << 10);
        let g = b.granularity();
        let s = b.finish();
        assert!(s.len() <= 8, "{} extents", s.len());
        // Every range is still in the set: rounding out never drops a change.
        for i in &idx {
            assert!(s.intersects(i * 100_000, 1), "range {i} lost");
        }
        for e in s.iter() {
            assert!(e.offset % g == 0, "{e:?} not on a {g} boundary");
        }
    }
    // Exact while it fits.
    let mut b = ExtentBuilder::new(100, 4);
    for (o, l) in [(10, 5), (0, 3), (12, 10), (50, 1)] {
        b.add(o, l).unwrap();
    }
    assert_eq!(b.granularity(), 1);
    assert_eq!(pairs(&b.finish()), [(0, 3), (10, 12), (50, 1)]);
    let e = ExtentBuilder::new(100, 4).add(99, 2).unwrap_err();
    assert!(e.to_string().contains("extent 0"), "{e}");
}

#[test]
fn hyperv_lists_longer_than_a_window_pair_up() {
    // Two results of 5 and 4 entries, the arrays in both orders, over windows of 3 entries.
    let disk = 64 * MIB;
    let offsets: Vec<u64> = (0..9).map(|i| i * 2 * MIB).collect();
    let lengths: Vec<u64> = (0..9).map(|i| 4096 * (i + 1)).collect();
    let text = format!(
        r#"[{{"ChangedByteOffsets": {:?}, "ChangedByteLengths": {:?}, "ByteOffset": 0,
              "ProcessedByteLength": {half}, "TargetRctId": "rctX:1:2"}},
            {{"ChangedByteLengths": {:?}, "ChangedByteOffsets": {:?}, "ByteOffset": {half},
              "ProcessedByteLength": {half}}}]"#,
        &offsets[..5],
        &lengths[..5],
        &lengths[5..],
        &offsets[5..],
        half = disk / 2
    );
    let l = ChangeList::parse(text.as_bytes(), None, disk).unwrap();
    let want: Vec<(u64, u64)> = offsets.into_iter().zip(lengths).collect();
    assert_eq!(pairs(&l.extents), want);
    assert_eq!(l.base_change_id.as_deref(), Some("rctX:1:2"));
}

#[test]
fn lists_read_from_files_as_streams_equal_lists_parsed_from_memory() {
    let dir = tempfile::tempdir().unwrap();
    let disk = 16 * MIB;
    for text in [
        "0,4096\n65536,4096\n",
        r#"[[0, 10], {"offset": 20, "length": 5}]"#,
        r#"{"changeId": "a", "extents": [[1, 1]]}"#,
        r#"{"ChangedByteOffsets": [0, 4096], "ChangedByteLengths": [512, 512], "ProcessedByteLength": 16777216}"#,
    ] {
        let path = dir.path().join("list");
        std::fs::write(&path, text).unwrap();
        let read = ChangeList::read(&path, None, disk).unwrap();
        assert_eq!(
            read,
            ChangeList::parse(text.as_bytes(), None, disk).unwrap(),
            "{text}"
        );
    }
}
