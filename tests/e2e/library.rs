use blockferry::{
    CancelToken, ErrorKind, Event, EventStream, InitOptions, Phase, ReplicateOptions, Silent, Store,
};
use blockferry_tests::{MIB, Rng, Sandbox, make_image};

fn store(sb: &Sandbox) -> Store {
    let path = sb.store();
    Store::init(
        &path,
        &InitOptions {
            chunk_size: 1 << 20,
            passphrase: None,
        },
    )
    .unwrap();
    Store::open(&path, None).unwrap()
}

/// Progress arrives as a typed stream, in order: Started, Progress…, Finished.
#[test]
fn progress_events_stream_in_order() {
    let mut rng = Rng::seeded("progress_events");
    let sb = Sandbox::new();
    let store = store(&sb);
    let image = sb.path("disk.raw");
    make_image(&image, 96 * MIB, &[(0, rng.bytes(64 << 20))]);
    let source = blockferry::open_image(&image).unwrap();
    let (stream, events) = EventStream::new();
    let opts = ReplicateOptions {
        workers: 1,
        ..ReplicateOptions::default()
    };
    let report = blockferry::replicate(&store, source.as_ref(), &opts, &stream).unwrap();
    drop(stream);
    let events: Vec<Event> = events.iter().collect();
    assert!(
        matches!(events.first(), Some(Event::Started { phase: Phase::Replicating, bytes_total }) if *bytes_total == 96 * MIB),
        "{events:?}"
    );
    // Each phase ends with its own Finished: the replication's carries its figures, and
    // committing (a few small writes) ends the stream.
    let mut phase = None;
    let mut finished = Vec::new();
    for e in &events {
        match e {
            Event::Started { phase: p, .. } => phase = Some(*p),
            Event::Finished(p) => finished.push((phase, p.clone())),
            _ => {}
        }
    }
    let Some((Some(Phase::Replicating), last)) = finished.first() else {
        panic!("no Finished event for the replication: {events:?}")
    };
    assert!(
        matches!(events.last(), Some(Event::Finished(_))),
        "{events:?}"
    );
    assert_eq!(finished.len(), 2, "{events:?}");
    assert_eq!(last.bytes_done, 96 * MIB);
    assert_eq!(last.bytes_read, report.bytes_read);
    assert!(events.iter().any(|e| matches!(
        e,
        Event::Started {
            phase: Phase::Committing,
            ..
        }
    )));
    // Progress counters only grow.
    let mut done = 0;
    for e in &events {
        if let Event::Progress(p) = e {
            assert!(p.bytes_done >= done && p.bytes_done <= 96 * MIB);
            done = p.bytes_done;
        }
    }
}

/// A cancelled replication returns `Cancelled`, writes no snapshot, and the chunks it did
/// store are reused by the next run.
#[test]
fn cancel_writes_no_snapshot_and_keeps_work() {
    let mut rng = Rng::seeded("cancel");
    let sb = Sandbox::new();
    let store = store(&sb);
    let image = sb.path("disk.raw");
    make_image(&image, 256 * MIB, &[(0, rng.bytes(256 << 20))]);
    let source = blockferry::open_image(&image).unwrap();
    let cancel = CancelToken::new();
    let opts = ReplicateOptions {
        workers: 1,
        cancel: cancel.clone(),
        memory_budget: 32 << 20,
        ..ReplicateOptions::default()
    };
    let observer = |e: &Event| {
        if let Event::Progress(p) = e
            && p.bytes_done >= 64 * MIB
        {
            cancel.cancel();
        }
    };
    let err = blockferry::replicate(&store, source.as_ref(), &opts, &observer).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Cancelled, "{err}");
    assert!(
        store.snapshots().unwrap().0.is_empty(),
        "a cancelled run left a snapshot"
    );
    let kept = store.load_index().unwrap().len();
    assert!(
        kept >= 32,
        "the cancelled run's packs were not indexed ({kept} chunks)"
    );
    let again = blockferry::replicate(
        &store,
        source.as_ref(),
        &ReplicateOptions::default(),
        &Silent,
    )
    .unwrap();
    assert_eq!(again.bytes_deduplicated, kept as u64 * MIB, "{again:?}");
    assert_eq!(again.bytes_new, 256 * MIB - kept as u64 * MIB);
}

/// Discovery finds every image under a folder, tells disks from the parents and extents they
/// use, and reports what it cannot open instead of failing.
#[test]
fn discover_tells_disks_from_parents_and_extents() {
    use blockferry::{Role, discover};
    use blockferry_tests::vhdx_builder::{VhdxSpec, write_vhdx};
    if !blockferry_tests::have_qemu() {
        return;
    }
    let mut rng = Rng::seeded("discover");
    let sb = Sandbox::new();
    let root = sb.path("datastore");
    let vm = root.join("vm1");
    std::fs::create_dir_all(&vm).unwrap();
    // A VHDX chain: base.vhdx under top.avhdx.
    let spec = |guid: u8, parent: Option<([u8; 16], String)>, blocks| VhdxSpec {
        size: 8 * MIB,
        block_size: 1 << 20,
        logical_sector: 512,
        data_write_guid: [guid; 16],
        parent,
        blocks,
    };
    write_vhdx(
        &vm.join("base.vhdx"),
        &spec(0xb1, None, vec![(0, rng.bytes(1 << 20), None)]),
    );
    write_vhdx(
        &vm.join("top.avhdx"),
        &spec(
            0xc2,
            Some(([0xb1; 16], ".\\base.vhdx".into())),
            vec![(2, rng.bytes(1 << 20), None)],
        ),
    );
    // A monolithicFlat VMDK: a descriptor and its flat extent.
    let raw = sb.path("src.raw");
    make_image(&raw, 4 * MIB, &[(0, rng.bytes(1 << 20))]);
    blockferry_tests::qemu_from_raw(
        &raw,
        &root.join("flat.vmdk"),
        "vmdk",
        "subformat=monolithicFlat",
    );
    // A raw disk, a broken VHD, and a file that is no image at all.
    std::fs::copy(&raw, root.join("plain.img")).unwrap();
    std::fs::write(root.join("broken.vhd"), b"conectix and nothing else").unwrap();
    std::fs::write(root.join("notes.txt"), b"not an image").unwrap();

    let found = discover(&root, &blockferry::OpenOptions::default()).unwrap();
    let role = |name: &str| {
        found
            .iter()
            .find(|f| f.path.file_name().unwrap() == name)
            .unwrap_or_else(|| panic!("{name} not found: {found:?}"))
    };
    assert_eq!(found.len(), 6, "{found:?}");
    assert_eq!(role("top.avhdx").role, Role::Disk);
    assert_eq!(role("top.avhdx").chain.len(), 2);
    assert_eq!(role("top.avhdx").virtual_size, 8 * MIB);
    assert_eq!(role("base.vhdx").role, Role::Parent);
    assert_eq!(role("flat.vmdk").role, Role::Disk);
    assert_eq!(role("flat.vmdk").format, "vmdk");
    assert_eq!(role("flat-flat.vmdk").role, Role::Extent);
    assert_eq!(role("plain.img").role, Role::Disk);
    assert_eq!(role("plain.img").format, "raw");
    let broken = role("broken.vhd");
    assert_eq!(broken.role, Role::Unreadable);
    assert!(broken.error.is_some());

    // The CLI says the same.
    let out = std::process::Command::new(blockferry_tests::bin())
        .args(["discover", "--json", root.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let disks: Vec<&str> = v["images"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|i| i["role"] == "disk")
        .map(|i| i["path"].as_str().unwrap().rsplit('/').next().unwrap())
        .collect();
    assert_eq!(disks, ["flat.vmdk", "plain.img", "top.avhdx"]);
}
