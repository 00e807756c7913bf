use super::*;
use crate::error::ErrorKind;

#[test]
fn plan_stays_within_budget() {
    let mut planned = 0;
    for budget in [32usize << 20, 64 << 20, 256 << 20, 4 << 30] {
        for chunk in [64usize << 10, 1 << 20, 4 << 20] {
            for workers in [1, 2, 8] {
                match plan(budget, chunk, workers) {
                    Ok(p) => {
                        assert!(p.total <= budget, "{budget} {chunk} {workers}: {p:?}");
                        assert!(p.read_bufs > p.workers);
                        assert!(p.pack_target >= 2 * chunk);
                        planned += 1;
                    }
                    // Only a budget below what the settings need may fail.
                    Err(e) => assert!(
                        budget < min_memory_budget(chunk, workers, 1, None, 0),
                        "{budget} {chunk} {workers}: {e}"
                    ),
                }
            }
        }
    }
    assert!(planned >= 30, "only {planned} of 36 settings planned");
    let err = plan(8 << 20, 16 << 20, 2).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Config);
    assert!(err.to_string().contains("too small"), "{err}");
}

#[test]
fn default_budget_follows_the_machine_and_plans() {
    let budget = default_memory_budget();
    let floor = (worker_count(0) * (8 << 20)).max(64 << 20);
    assert!(budget >= floor, "{budget}");
    if let Some(usable) = crate::io::sys::usable_memory() {
        assert!(budget <= (usable / 8).max(floor), "{budget} of {usable}");
    }
    // The pipeline fits in it with the default chunk size and workers.
    plan(budget, 1 << 20, 0).unwrap();
}

#[test]
fn the_least_budget_always_plans() {
    for chunk in [64usize << 10, 1 << 20, 4 << 20, 16 << 20] {
        for workers in [1, 2, 8] {
            for (uploads, min_part, part_size) in [
                (1, None, 0),
                (4, Some(5u64 << 20), 0),
                (2, Some(5 << 20), 32 << 20),
            ] {
                let least = min_memory_budget(chunk, workers, uploads, min_part, part_size);
                let p = plan_parts(least, chunk, workers, uploads, min_part, part_size)
                    .unwrap_or_else(|e| panic!("{chunk} {workers} {uploads}: {e}"));
                assert!(p.total <= least);
            }
        }
    }
}
