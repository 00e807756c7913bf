//! End-to-end tests: the real `blockferry` binary on real files, stores and devices.

// Test code: panics are how tests fail, and sizes here are small and trusted.
#![allow(
    clippy::unwrap_used,
    clippy::cast_possible_truncation,
    clippy::print_stdout
)]

/// The tamper-evident audit log.
mod audit;
/// Restore to and replicate from block devices (loop devices).
mod blockdev;
/// Boot tests of disks that really boot.
mod boot;
/// The demo and the `--json` contract.
mod cli;
/// Real-world images from Hyper-V and ESXi read to their known hashes.
mod corpus;
/// Kill -9 at random moments never leaves a broken snapshot.
mod crash;
/// Every crash point of a replication, a delta, a prune and a gc, enumerated in process.
mod crashpoints;
/// Cutover against a live source: rollback on failure, completion when run again.
mod cutover;
/// Replicate twice, shared content, holes and zero runs.
mod dedup;
/// Delta snapshots from change lists, and what happens when a list cannot be trusted.
mod delta;
/// Disks in a store: distinct names, histories by sequence, `latest` of a disk, rollbacks.
mod disks;
/// Read engines: io_uring and pread read every format alike.
mod engines;
/// Errors: wrong passphrase, damaged or missing objects, newer versions, bad inputs.
mod errors;
/// Export to image formats, with qemu-img as the oracle.
mod export;
/// Export to S3: downloads as the local export, resumes, delta exports by part copies.
mod export_s3;
/// Garbage collection: space reclaimed, kept snapshots intact, store locks.
mod gc;
/// Guest inspection: partition tables, file systems, boot mode, OS.
mod inspect;
/// Jobs: resume, changed sources, jobs/abandon/cleanup.
mod jobs;
/// The library facade: progress streams and cancellation.
mod library;
mod memory;
/// Peak memory stays within the budget.
/// Snapshots served over NBD to independent clients.
mod nbd;
/// qemu-img as an independent oracle for every format it can create.
mod oracle;
/// Restore and convert outputs: whole or absent, salvage, sparse.
mod outputs;
/// OVA archives read in place.
mod ova;
/// A damaged store repaired: chunks stored again, manifests recorded or forgotten, index
/// objects rebuilt.
mod repair;
/// Retention: prune.
mod retention;
/// replicate → restore gives identical bytes, for many shapes of image.
mod roundtrip;
/// The S3 backend against a real S3 server on loopback.
mod s3;
/// S3 under faults: kill -9 and resume, network cuts, 503 storms, lost answers.
mod s3_faults;
/// Continuous replication: sync with kills, every snapshot restores, clean stop on SIGTERM.
mod sync;
/// The store is untrusted: authenticated config, pinned stores, damaged indexes.
mod trust;
/// Readiness validation: each check failing and passing.
mod validate;
/// VHD chains and hostile VHDs built from the specification.
mod vhd;
/// Hostile VHDX files.
mod vhdx;
/// ESXi deltas and hostile VMDKs.
mod vmdk;
/// VM discovery: .vmx, .vmsd, OVF/OVA, .vmcx.
mod vms;
