use super::*;

#[test]
fn locks_of_gone_or_silent_holders_are_stale() {
    let mut info = LockInfo::new(LockKind::Shared, "test");
    assert!(!info.is_stale(0), "this process is alive");
    let mut child = std::process::Command::new("true").spawn().unwrap();
    let pid = child.id();
    child.wait().unwrap();
    info.pid = pid;
    assert!(info.is_stale(0), "its process is gone");
    info.pid = std::process::id();
    assert!(
        info.is_stale(u64::try_from(LOCK_STALE.as_millis()).unwrap() + 1),
        "not refreshed"
    );
    info.host = "elsewhere".to_owned();
    info.pid = pid;
    assert!(
        !info.is_stale(0),
        "another host's process cannot be looked at"
    );
    if !info.boot.is_empty() {
        info.host = Identity::here().host;
        info.pid = std::process::id();
        info.boot = "another boot".to_owned();
        assert!(info.is_stale(0), "a lock from before a reboot");
    }
}

#[test]
fn lock_objects_round_trip_as_documented() {
    let info = LockInfo::new(LockKind::Exclusive, "gc");
    let json: serde_json::Value = serde_json::to_value(&info).unwrap();
    assert_eq!(json["kind"], "exclusive");
    for field in [
        "operation",
        "host",
        "boot",
        "pid",
        "created_unix_ms",
        "refreshed_unix_ms",
    ] {
        assert!(json.get(field).is_some(), "{field} missing from {json}");
    }
    let back: LockInfo = serde_json::from_value(json).unwrap();
    assert_eq!(back, info);
}

/// A lock of another host, written now, whose holder's clock is `skew_min` minutes off.
fn foreign_lock(backend: &dyn ObjectStore, skew_min: i64) -> String {
    let mut info = LockInfo::new(LockKind::Shared, "replicate");
    info.host = "another-host".to_owned();
    let skewed = i64::try_from(now_unix_ms()).unwrap() + skew_min * 60_000;
    info.created_unix_ms = u64::try_from(skewed).unwrap();
    info.refreshed_unix_ms = info.created_unix_ms;
    write_lock(backend, &info).unwrap()
}

/// Issue 16.3: a lock's age is judged by the store's clock (when the store says the object
/// was written), not by comparing its holder's clock with the reader's. Before the fix a
/// holder whose clock was 40 minutes behind had its live lock taken for stale (and deleted
/// by a gc); one whose clock was ahead kept a dead lock alive.
#[test]
fn lock_age_is_judged_by_the_store_s_clock() {
    let dir = tempfile::tempdir().unwrap();
    let backend: Arc<dyn ObjectStore> =
        Arc::new(crate::store::local::LocalStore::create(dir.path()).unwrap());
    let live = foreign_lock(backend.as_ref(), -40);
    let gc = StoreLock::gc(&backend).unwrap();
    gc.exclusive(Duration::from_millis(300), &|| false, &mut |_| {})
        .unwrap_err();
    assert!(
        backend.size(&live).is_ok(),
        "a live lock of a host whose clock is behind was deleted"
    );
    backend.delete(&live).unwrap();
    // Written 40 minutes ago by the store's clock, whatever its holder's clock says.
    let dead = foreign_lock(backend.as_ref(), 60);
    let old = std::time::SystemTime::now() - Duration::from_secs(40 * 60);
    std::fs::File::options()
        .write(true)
        .open(dir.path().join(&dead))
        .unwrap()
        .set_modified(old)
        .unwrap();
    gc.exclusive(Duration::from_secs(5), &|| false, &mut |_| {})
        .unwrap();
    assert!(backend.size(&dead).is_err(), "a dead lock was kept");
}

/// Issue 16.3: a refresh that finds its old lock object deleted (a gc took it for stale)
/// marks the lock lost, so the holder never commits.
#[test]
fn a_refresh_that_finds_its_lock_gone_loses_it() {
    let dir = tempfile::tempdir().unwrap();
    let backend: Arc<dyn ObjectStore> =
        Arc::new(crate::store::local::LocalStore::create(dir.path()).unwrap());
    let lock = StoreLock::shared(&backend, "replicate", &|| false, &mut |_| {}).unwrap();
    lock.check().unwrap();
    for key in lock.held.keys() {
        backend.delete(&key).unwrap();
    }
    lock.held.refresh();
    // The refresh wrote a new object; the lock is lost all the same.
    assert_eq!(backend.list("locks/").unwrap().len(), 1);
    let e = lock.check().unwrap_err();
    assert!(e.to_string().contains("lost"), "{e}");
}
