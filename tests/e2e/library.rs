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
    let source = blockferry::image::open(&image).unwrap();
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
    let Some(Event::Finished(last)) = events.last() else {
        panic!("no Finished event: {events:?}")
    };
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
    let source = blockferry::image::open(&image).unwrap();
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
