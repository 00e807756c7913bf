use super::*;

#[test]
fn locks_of_gone_or_silent_holders_are_stale() {
    let mut info = LockInfo::new(LockKind::Shared, "test");
    let now = now_unix_ms();
    assert!(!info.is_stale(now), "this process is alive");
    let mut child = std::process::Command::new("true").spawn().unwrap();
    let pid = child.id();
    child.wait().unwrap();
    info.pid = pid;
    assert!(info.is_stale(now), "its process is gone");
    info.pid = std::process::id();
    assert!(
        info.is_stale(now + u64::try_from(LOCK_STALE.as_millis()).unwrap() + 1),
        "not refreshed"
    );
    info.host = "elsewhere".to_owned();
    info.pid = pid;
    assert!(
        !info.is_stale(now),
        "another host's process cannot be looked at"
    );
    if !info.boot.is_empty() {
        info.host = Identity::here().host;
        info.pid = std::process::id();
        info.boot = "another boot".to_owned();
        assert!(info.is_stale(now), "a lock from before a reboot");
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
