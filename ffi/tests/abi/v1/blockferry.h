/*
 * blockferry: the C ABI (link with -lblockferry_ffi). Licensed under Apache-2.0.
 *
 * Conventions, for every function below:
 * - Results: every fallible function returns a bf_result; BF_RESULT_OK is 0. After a failure,
 *   bf_last_error() copies the calling thread's message (naming the file, structure and
 *   offset concerned) into a buffer you own; bf_result_text() gives a static description.
 *   A successful call clears the thread's last error; the bf_last_error* calls never change it.
 * - Growth: BF_ABI_VERSION is the version of this header; bf_abi_version() that of the
 *   library, which runs every program built against its version or an older one. Every
 *   struct starts with `size_t size`: options structs are filled by their _init function,
 *   given sizeof the struct (bf_replicate_options_init(&o, sizeof o)), before fields are set;
 *   reports need only .size = sizeof the struct. Fields are only ever appended.
 * - Ownership: bf_store, bf_cancel, bf_sync and bf_sync_builder are opaque handles made by
 *   their _open/_create/_new function, released by exactly one call of their _free (NULL is
 *   ignored). Nothing else returned needs freeing: strings blockferry returns are static;
 *   everything else is copied into memory you own. Strings you pass are borrowed for the
 *   call only.
 * - Out-parameters are written only on success (exceptions are stated: *out_n of a
 *   too-small buffer, bf_verify's report on a mismatch).
 * - Nullability: every pointer is checked; a NULL where a value is required returns
 *   BF_RESULT_NULL_PARAMETER. Arguments documented as "NULL: ..." are optional.
 * - Codes you pass (bf_io_engine, bf_path_style) are integer types with named constants;
 *   a value that is none of them gives BF_RESULT_INVALID_PARAMETER.
 * - Buffers: (buf, len, out_n) receives NUL-terminated UTF-8; *out_n is the length without
 *   the NUL. The _json functions write nothing when it does not fit and return
 *   BF_RESULT_INSUFFICIENT_SIZE with *out_n the length needed.
 * - Threads: all functions may be called from any thread. A bf_store may be used by several
 *   threads at once (several replications into one store). Long calls (replicate, restore,
 *   verify, convert, gc, sync cycles) block their thread; bf_cancel_request() on the
 *   bf_cancel given to them stops them from any other thread. Progress callbacks are called
 *   on the thread that made the call, one at a time, in order, and only during the call.
 * - Panics never cross this boundary: they become BF_RESULT_PANIC.
 * - Strings are UTF-8 and NUL-terminated; other bytes give BF_RESULT_INVALID_PARAMETER.
 * - The shared library is libblockferry_ffi.so.1 (its SONAME) and exports only bf_*
 *   symbols; ffi/dist.sh builds it and a static library that defines no other global symbol.
 */

#ifndef BLOCKFERRY_H
#define BLOCKFERRY_H

/* The header of C ABI version 1, frozen: what programs built then were compiled against (ffi/tests/c/abi_v1.c, layout.c). Never regenerated. */

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/**
 * The version of the C ABI this library implements: incremented by every compatible
 * addition (a field appended to a struct, a new function or constant). A caller built
 * against header version N runs against any library whose `bf_abi_version()` is at least
 * N. An incompatible change would rename the shared library (its SONAME,
 * `libblockferry_ffi.so.1`), never reuse this number.
 */
#define BF_ABI_VERSION 1

/**
 * The crate version, as numbers (`bf_version()` gives it as text).
 */
#define BF_VERSION_MAJOR 0

/**
 * See [`BF_VERSION_MAJOR`].
 */
#define BF_VERSION_MINOR 1

/**
 * See [`BF_VERSION_MAJOR`].
 */
#define BF_VERSION_PATCH 0

/**
 * The result of every fallible call. The numbers are stable: a code is never renumbered or
 * reused. Codes from 100 are the engine's error kinds; below 100, the C boundary's own.
 */
typedef enum {
  /**
   * Success.
   */
  BF_RESULT_OK = 0,
  /**
   * A required pointer argument was NULL.
   */
  BF_RESULT_NULL_PARAMETER = 1,
  /**
   * An argument is not valid (a string that is not UTF-8, a code out of range).
   */
  BF_RESULT_INVALID_PARAMETER = 2,
  /**
   * The caller's buffer is too small; `*out_n` says how many bytes are needed.
   */
  BF_RESULT_INSUFFICIENT_SIZE = 3,
  /**
   * blockferry panicked (a bug); the call had no effect beyond what it had done so far.
   */
  BF_RESULT_PANIC = 4,
  /**
   * Reading or writing a local file or device failed.
   */
  BF_RESULT_IO = 100,
  /**
   * A source image is malformed.
   */
  BF_RESULT_INVALID_IMAGE = 101,
  /**
   * A source image is well formed but of a kind this version cannot read.
   */
  BF_RESULT_UNSUPPORTED_IMAGE = 102,
  /**
   * A change list is malformed or does not fit the disk.
   */
  BF_RESULT_INVALID_CHANGE_LIST = 103,
  /**
   * An object in the store is damaged.
   */
  BF_RESULT_CORRUPT = 104,
  /**
   * Something named does not exist: a snapshot, a job, a store, an image's parent.
   */
  BF_RESULT_NOT_FOUND = 105,
  /**
   * The store was written by a newer blockferry.
   */
  BF_RESULT_UNSUPPORTED_VERSION = 106,
  /**
   * The passphrase does not unlock the store, or none was given.
   */
  BF_RESULT_CREDENTIALS = 107,
  /**
   * The object store refused the credentials or denied the access.
   */
  BF_RESULT_ACCESS_DENIED = 108,
  /**
   * The store backend failed.
   */
  BF_RESULT_STORE = 109,
  /**
   * A snapshot does not match its source, or a stored chunk its id.
   */
  BF_RESULT_VERIFY_MISMATCH = 110,
  /**
   * Invalid arguments or configuration.
   */
  BF_RESULT_CONFIG = 111,
  /**
   * Another process holds what this needs (a running job, a gc).
   */
  BF_RESULT_BUSY = 112,
  /**
   * The operation was cancelled (`bf_cancel_request`); a replication keeps its progress.
   */
  BF_RESULT_CANCELLED = 113,
  /**
   * An internal invariant broke (a bug).
   */
  BF_RESULT_INTERNAL = 114,
} bf_result;

/**
 * The kind of a progress event.
 */
typedef enum {
  /**
   * A phase started; `bytes_total` is set.
   */
  BF_EVENT_KIND_STARTED = 0,
  /**
   * Counters moved (at most every 100 ms).
   */
  BF_EVENT_KIND_PROGRESS = 1,
  /**
   * Something the user should know; `message` is set.
   */
  BF_EVENT_KIND_WARNING = 2,
  /**
   * The phase finished (the operation's result says whether it succeeded).
   */
  BF_EVENT_KIND_FINISHED = 3,
} bf_event_kind;

/**
 * What an operation is doing.
 */
typedef enum {
  /**
   * Reading the source and storing chunks.
   */
  BF_PHASE_REPLICATING = 0,
  /**
   * Writing the index and the snapshot manifest.
   */
  BF_PHASE_COMMITTING = 1,
  /**
   * Writing a snapshot (or an image) out.
   */
  BF_PHASE_RESTORING = 2,
  /**
   * Checking a snapshot.
   */
  BF_PHASE_VERIFYING = 3,
  /**
   * Collecting garbage.
   */
  BF_PHASE_COLLECTING = 4,
} bf_phase;

/**
 * A cancellation flag (opaque). `bf_cancel_request` may be called from any thread while an
 * operation that was given it runs; `bf_cancel_reset` makes it ready for the next one.
 */
typedef struct bf_cancel bf_cancel;

/**
 * An open store (opaque). Safe to use from several threads at once, including for
 * concurrent replications; free it once no call on it is running.
 */
typedef struct bf_store bf_store;

/**
 * A continuous replication of one disk (opaque): made by `bf_sync_new`, a cycle per
 * `bf_sync_cycle`, released by `bf_sync_free`. One cycle at a time.
 */
typedef struct bf_sync bf_sync;

/**
 * Settings of a continuous replication (opaque): made by `bf_sync_builder_new`, changed by
 * the `bf_sync_builder_set_*` functions, turned into a `bf_sync` by `bf_sync_new`, released
 * by `bf_sync_builder_free`.
 */
typedef struct bf_sync_builder bf_sync_builder;

/**
 * A read engine (`bf_replicate_options.io_engine` and others).
 */
typedef uint32_t bf_io_engine;

/**
 * Options of `bf_replicate`. Fill with `bf_replicate_options_init(&opts, sizeof opts)`, then
 * set fields. Strings are borrowed for the call only.
 */
typedef struct {
  /**
   * The struct's size in bytes (set by `bf_replicate_options_init`).
   */
  size_t size;
  /**
   * Disk name recorded (NULL: the shortest of the image's file name and its paths with
   * more folders that no other source uses).
   */
  const char *name;
  /**
   * The source is the disk `name` at another path (moved, or a copy): take the name
   * although another source had it.
   */
  bool same_disk;
  /**
   * Follow parent and extent paths outside the image's folder.
   */
  bool allow_outside_folder;
  /**
   * Which disk of an OVA (index from 0, or file name; NULL: the first).
   */
  const char *disk;
  /**
   * Folder of the job database (NULL: `BLOCKFERRY_STATE_DIR`, else the XDG state folder).
   */
  const char *state_dir;
  /**
   * Record no job state (the run cannot be resumed).
   */
  bool no_state;
  /**
   * Start over instead of resuming an unfinished run of this job.
   */
  bool restart;
  /**
   * Compress chunks with lz4 (the default: true).
   */
  bool compression;
  /**
   * `O_DIRECT` reads with `io_uring`.
   */
  bool direct;
  /**
   * Hashing/compression/encryption threads (0: one per core).
   */
  uint32_t workers;
  /**
   * Memory for data in flight, in bytes (0: chosen from the machine).
   */
  uint64_t memory_budget;
  /**
   * Read engine (`BF_IO_ENGINE_*`).
   */
  bf_io_engine io_engine;
  /**
   * Chunks in flight with `io_uring` (0: the default).
   */
  uint32_t io_depth;
  /**
   * Uploads in flight on S3 (0: the default, 4).
   */
  uint32_t upload_jobs;
  /**
   * Seconds to wait for another run replicating the same disk before failing with
   * `BF_RESULT_BUSY` (0: fail at once).
   */
  uint32_t wait_secs;
  /**
   * S3 part size in bytes (0: from the memory budget).
   */
  uint64_t part_size;
  /**
   * Upload cap in bytes per second (0: none).
   */
  uint64_t bwlimit;
  /**
   * Make a delta on this snapshot (id, prefix, "latest" of the store or "latest-of-disk");
   * NULL for a full copy.
   */
  const char *base;
  /**
   * What changed since `base`: a change-list file, "hash" (compare every chunk) or
   * "chain" (what a snapshot-chain child allocates).
   */
  const char *changes;
  /**
   * The change list's format ("vmware-cbt", "hyperv-rct", "extents"; NULL: detected).
   */
  const char *changes_format;
  /**
   * The source's change-tracking id now, recorded for the next delta (or NULL).
   */
  const char *change_id;
  /**
   * Share of unchanged chunks a delta reads to check its list (0 to 1; default 0.01).
   */
  double verify_sample;
} bf_replicate_options;

/**
 * A progress event, valid only during the callback. `size` is this library's
 * `sizeof(bf_event)`: fields a newer header appends are there only when `size` covers them.
 */
typedef struct {
  /**
   * The struct's size in bytes (set by blockferry).
   */
  size_t size;
  /**
   * What happened.
   */
  bf_event_kind kind;
  /**
   * The phase it belongs to.
   */
  bf_phase phase;
  /**
   * Virtual bytes the phase covers.
   */
  uint64_t bytes_total;
  /**
   * Virtual bytes done (read, found zero, or skipped).
   */
  uint64_t bytes_done;
  /**
   * Bytes read from the source.
   */
  uint64_t bytes_read;
  /**
   * Bytes found zero or unallocated.
   */
  uint64_t bytes_zero;
  /**
   * Bytes the store already held.
   */
  uint64_t bytes_deduplicated;
  /**
   * Bytes written to the store (replicate) or the output (restore).
   */
  uint64_t bytes_written;
  /**
   * Of `bytes_done`, bytes done without work (durable from an earlier run, or unchanged).
   */
  uint64_t bytes_skipped;
  /**
   * Seconds since the phase started.
   */
  double elapsed_seconds;
  /**
   * Virtual bytes per second on average.
   */
  double rate;
  /**
   * For `BF_EVENT_KIND_WARNING`: the text (NUL-terminated); else NULL.
   */
  const char *message;
} bf_event;

/**
 * A progress callback: `userdata` as given, and the event (valid during the call only).
 * Called on the thread that called the operation, one event at a time and in order, only
 * while that call runs. It may call blockferry functions that do not take the operation's
 * own objects (to cancel, call `bf_cancel_request` on the operation's `bf_cancel`).
 */
typedef void (*bf_progress_cb)(void *userdata, const bf_event *event);

/**
 * What `bf_replicate` did. Set `size` to `sizeof(bf_replicate_report)` before the call.
 */
typedef struct {
  /**
   * The struct's size in bytes (set by the caller).
   */
  size_t size;
  /**
   * The new snapshot's id (NUL-terminated hex).
   */
  char snapshot[33];
  /**
   * The job id (NUL-terminated hex; empty without job state).
   */
  char job[33];
  /**
   * Whether this run resumed an interrupted one.
   */
  bool resumed;
  /**
   * Virtual size of the disk.
   */
  uint64_t virtual_size;
  /**
   * Bytes read from the source.
   */
  uint64_t bytes_read;
  /**
   * Bytes recorded as zero.
   */
  uint64_t bytes_zero;
  /**
   * Bytes the store already held.
   */
  uint64_t bytes_deduplicated;
  /**
   * Plaintext bytes of new chunks.
   */
  uint64_t bytes_new;
  /**
   * Bytes written to the store.
   */
  uint64_t bytes_stored;
  /**
   * Bytes a delta took from its base unread.
   */
  uint64_t bytes_unchanged;
  /**
   * Bytes an earlier, interrupted run had made durable.
   */
  uint64_t bytes_resumed;
  /**
   * New chunks stored.
   */
  uint64_t chunks_stored;
  /**
   * Wall time in seconds.
   */
  double seconds;
} bf_replicate_report;

/**
 * Options of `bf_restore`. Fill with `bf_restore_options_init(&opts, sizeof opts)`.
 */
typedef struct {
  /**
   * The struct's size in bytes (set by `bf_restore_options_init`).
   */
  size_t size;
  /**
   * Replace an existing file; write onto a block device (what it holds is overwritten).
   */
  bool force;
  /**
   * Write what can be read and leave zeros where chunks are missing or damaged (each
   * reported as a warning) instead of failing.
   */
  bool salvage;
  /**
   * Decrypting/decompressing threads (0: one per core).
   */
  uint32_t workers;
} bf_restore_options;

/**
 * What `bf_restore` wrote. Set `size` to `sizeof(bf_restore_report)` before the call.
 */
typedef struct {
  /**
   * The struct's size in bytes (set by the caller).
   */
  size_t size;
  /**
   * Virtual size written.
   */
  uint64_t virtual_size;
  /**
   * Bytes of data written (the rest left as holes, or zeros on a device).
   */
  uint64_t bytes_written;
  /**
   * Wall time in seconds.
   */
  double seconds;
} bf_restore_report;

/**
 * Options of `bf_verify`. Fill with `bf_verify_options_init(&opts, sizeof opts)`.
 */
typedef struct {
  /**
   * The struct's size in bytes (set by `bf_verify_options_init`).
   */
  size_t size;
  /**
   * Compare the snapshot with this image too (NULL: only check the store's chunks).
   */
  const char *image;
  /**
   * Which disk of an OVA `image` is (index from 0, or file name; NULL: the first).
   */
  const char *disk;
  /**
   * Follow the image's parent and extent paths outside its folder.
   */
  bool allow_outside_folder;
  /**
   * Rebuild unreadable index objects from the packs and record damaged chunks (and
   * snapshots) as damaged, so that the next replication stores that data again.
   */
  bool repair;
  /**
   * Read engine for the image (`BF_IO_ENGINE_*`).
   */
  bf_io_engine io_engine;
  /**
   * Checking threads (0: one per core).
   */
  uint32_t workers;
} bf_verify_options;

/**
 * What `bf_verify` found. Set `size` to `sizeof(bf_verify_report)` before the call.
 */
typedef struct {
  /**
   * The struct's size in bytes (set by the caller).
   */
  size_t size;
  /**
   * Whether the snapshot checked out.
   */
  bool ok;
  /**
   * Whether the image was compared too.
   */
  bool image_compared;
  /**
   * Distinct chunks checked.
   */
  uint64_t chunks_checked;
  /**
   * Virtual bytes covered.
   */
  uint64_t bytes_checked;
  /**
   * Problems found.
   */
  uint64_t problems_total;
  /**
   * Wall time in seconds.
   */
  double seconds;
} bf_verify_report;

/**
 * Options of `bf_convert`. Fill with `bf_convert_options_init(&opts, sizeof opts)`.
 */
typedef struct {
  /**
   * The struct's size in bytes (set by `bf_convert_options_init`).
   */
  size_t size;
  /**
   * Replace an existing file; write onto a block device.
   */
  bool force;
  /**
   * Read engine (`BF_IO_ENGINE_*`).
   */
  bf_io_engine io_engine;
  /**
   * Threads (0: one per core).
   */
  uint32_t workers;
} bf_convert_options;

/**
 * Options of `bf_store_prune`: which snapshots to keep, per disk. Fill with
 * `bf_prune_options_init(&opts, sizeof opts)`; a policy that keeps nothing is refused.
 */
typedef struct {
  /**
   * The struct's size in bytes (set by `bf_prune_options_init`).
   */
  size_t size;
  /**
   * Keep the newest this many.
   */
  uint32_t keep_last;
  /**
   * Keep the newest of each of the last this many days (UTC) that have snapshots.
   */
  uint32_t keep_daily;
  /**
   * Keep the newest of each of the last this many weeks (Monday to Sunday, UTC).
   */
  uint32_t keep_weekly;
  /**
   * Keep the newest of each of the last this many months (UTC).
   */
  uint32_t keep_monthly;
  /**
   * Only this disk's snapshots (NULL: every disk's).
   */
  const char *disk;
  /**
   * Only count; forget nothing.
   */
  bool dry_run;
} bf_prune_options;

/**
 * What `bf_store_prune` did (or would do, on a dry run). Set `size` to
 * `sizeof(bf_prune_report)` before the call.
 */
typedef struct {
  /**
   * The struct's size in bytes (set by the caller).
   */
  size_t size;
  /**
   * Snapshots kept.
   */
  uint64_t kept;
  /**
   * Snapshots forgotten.
   */
  uint64_t forgotten;
} bf_prune_report;

/**
 * Options of `bf_store_gc`. Fill with `bf_gc_options_init(&opts, sizeof opts)`.
 */
typedef struct {
  /**
   * The struct's size in bytes (set by `bf_gc_options_init`).
   */
  size_t size;
  /**
   * Repack packs until at most this share (0 to 1) of their bytes is unused (default
   * 0.1).
   */
  double max_unused;
  /**
   * Seconds to wait for running replications (0: fail with `BF_RESULT_BUSY` at once).
   */
  uint32_t wait_secs;
  /**
   * Only count; change nothing.
   */
  bool dry_run;
} bf_gc_options;

/**
 * What `bf_store_gc` did (or would do, on a dry run). Set `size` to
 * `sizeof(bf_gc_report)` before the call.
 */
typedef struct {
  /**
   * The struct's size in bytes (set by the caller).
   */
  size_t size;
  /**
   * Snapshots found.
   */
  uint64_t snapshots;
  /**
   * Chunks some snapshot references.
   */
  uint64_t chunks_live;
  /**
   * Referenced chunks missing from the store (should be 0).
   */
  uint64_t chunks_missing;
  /**
   * Packs deleted.
   */
  uint64_t packs_deleted;
  /**
   * Packs repacked.
   */
  uint64_t packs_repacked;
  /**
   * Store bytes before.
   */
  uint64_t bytes_before;
  /**
   * Store bytes after.
   */
  uint64_t bytes_after;
} bf_gc_report;

/**
 * How S3 requests address the bucket (`bf_s3_options.path_style`).
 */
typedef uint32_t bf_path_style;

/**
 * How to reach S3 (ignored for local stores). Fill with `bf_s3_options_init`; zero fields
 * take the defaults: the standard AWS chain for credentials and region,
 * `AWS_ENDPOINT_URL`. Over HTTPS, only the authorities in the PEM file `AWS_CA_BUNDLE`
 * names are trusted when it is set (else the system's).
 */
typedef struct {
  /**
   * The struct's size in bytes (set by `bf_s3_options_init`).
   */
  size_t size;
  /**
   * Endpoint URL of an S3-compatible service, or NULL.
   */
  const char *endpoint;
  /**
   * Region, or NULL.
   */
  const char *region;
  /**
   * Access key id, or NULL (then `secret_key` must be NULL too, and the AWS chain is used).
   */
  const char *access_key;
  /**
   * Secret access key, or NULL.
   */
  const char *secret_key;
  /**
   * Bucket addressing (`BF_PATH_STYLE_*`).
   */
  bf_path_style path_style;
  /**
   * Time limit of one attempt of one request, in seconds; 0 for the default (300).
   */
  uint32_t attempt_timeout_secs;
} bf_s3_options;

/**
 * Settings of a new store (`bf_store_create`). Fill with `bf_create_options_init`.
 */
typedef struct {
  /**
   * The struct's size in bytes (set by `bf_create_options_init`).
   */
  size_t size;
  /**
   * Chunk size: a power of two from 65536 to 16777216 (0: 1 MiB).
   */
  uint32_t chunk_size;
  /**
   * Encrypt (the default: true). An unencrypted store must be asked for with `false` and a
   * NULL passphrase.
   */
  bool encrypted;
} bf_create_options;

/**
 * `pread(2)`, one request at a time, with the kernel's readahead: portable (the default).
 */
#define BF_IO_ENGINE_PREAD 0

/**
 * `io_uring` where the kernel allows it, else `pread`.
 */
#define BF_IO_ENGINE_AUTO 1

/**
 * `io_uring`, or fail.
 */
#define BF_IO_ENGINE_URING 2

/**
 * Path-style for a custom endpoint, virtual-hosted for AWS (the default).
 */
#define BF_PATH_STYLE_AUTO 0

/**
 * `http://endpoint/bucket/key`: what most S3-compatible servers on one host need.
 */
#define BF_PATH_STYLE_PATH 1

/**
 * `http://bucket.endpoint/key`.
 */
#define BF_PATH_STYLE_VIRTUAL_HOSTED 2

#ifdef __cplusplus
extern "C" {
#endif // __cplusplus

/**
 * The engine's version, e.g. "0.1.0" (static; never NULL); `BF_VERSION_MAJOR`, `_MINOR`
 * and `_PATCH` are the header's.
 */
const char *bf_version(void);

/**
 * A static description of a result code (never NULL; a value that is no `bf_result` gets
 * "unknown result code").
 */
const char *bf_result_text(bf_result result);

/**
 * Copies the calling thread's last error message into `buf` (`len` bytes, NUL-terminated)
 * and sets `*out_n` (if not NULL) to its length without the NUL. If it does not fit, as
 * much as fits is written and `BF_RESULT_INSUFFICIENT_SIZE` returned. Does not change the
 * last error.
 *
 * # Safety
 * `buf` is NULL (with `len` 0) or writable for `len` bytes; `out_n` is NULL or writable.
 */
bf_result bf_last_error(char *buf, size_t len, size_t *out_n);

/**
 * The file the calling thread's last error concerns, like `bf_last_error`;
 * `BF_RESULT_NOT_FOUND` (writing nothing) when it names none.
 *
 * # Safety
 * As `bf_last_error`.
 */
bf_result bf_last_error_path(char *buf, size_t len, size_t *out_n);

/**
 * The byte offset the calling thread's last error concerns (in a file or on the virtual
 * disk) in `*out`; `BF_RESULT_NOT_FOUND` when it names none.
 *
 * # Safety
 * `out` is NULL or writable.
 */
bf_result bf_last_error_offset(uint64_t *out);

/**
 * The multipart upload part the calling thread's last error concerns in `*out`;
 * `BF_RESULT_NOT_FOUND` when it names none.
 *
 * # Safety
 * `out` is NULL or writable.
 */
bf_result bf_last_error_part(uint32_t *out);

/**
 * Makes a cancellation flag in `*out`; free it with `bf_cancel_free`.
 *
 * # Safety
 * `out` is writable.
 */
bf_result bf_cancel_new(bf_cancel **out);

/**
 * Asks every operation given `cancel` (since its last `bf_cancel_reset`) to stop; they
 * return `BF_RESULT_CANCELLED` soon after. Thread-safe; may be called any number of times.
 * NULL is ignored.
 *
 * # Safety
 * `cancel` is NULL or a live flag from `bf_cancel_new`.
 */
void bf_cancel_request(const bf_cancel *cancel);

/**
 * Makes a flag usable again after `bf_cancel_request`: operations given it from now on
 * run; those already cancelled stay cancelled. NULL is ignored.
 *
 * # Safety
 * As `bf_cancel_request`.
 */
void bf_cancel_reset(const bf_cancel *cancel);

/**
 * Frees a cancellation flag (NULL is ignored). Operations still running with it keep
 * their own reference; no other thread may use this pointer afterwards.
 *
 * # Safety
 * `cancel` is NULL or from `bf_cancel_new`, freed once.
 */
void bf_cancel_free(bf_cancel *cancel);

/**
 * The ABI version this library implements (`BF_ABI_VERSION` of its header). A program can
 * check at start that `bf_abi_version() >= BF_ABI_VERSION`, the version it was built with.
 */
uint32_t bf_abi_version(void);

/**
 * Fills `opts`, a struct of `size` bytes (give `sizeof *opts`), with the defaults.
 *
 * # Safety
 * `opts` is writable for `size` bytes.
 */
bf_result bf_replicate_options_init(bf_replicate_options *opts, size_t size);

/**
 * Copies `image` into the store as a new snapshot (a delta when `opts->base` is set).
 *
 * Blocks until done; `cancel` (NULL: none) stops it from another thread with
 * `BF_RESULT_CANCELLED`, keeping what was made durable: running the same replication again
 * resumes. `progress` (NULL: none) is called with `userdata` on the calling thread.
 * `opts` NULL means the defaults. `report` (NULL: not wanted) is filled on success.
 *
 * # Safety
 * `store` is a live store; `image` a NUL-terminated path; `opts` NULL or initialised by
 * `bf_replicate_options_init` with valid strings; `cancel` NULL or live; `report` NULL or
 * writable for its `size`.
 */
bf_result bf_replicate(const bf_store *store,
                       const char *image,
                       const bf_replicate_options *opts,
                       bf_progress_cb progress,
                       void *userdata,
                       const bf_cancel *cancel,
                       bf_replicate_report *report);

/**
 * Fills `opts`, a struct of `size` bytes (give `sizeof *opts`), with the defaults.
 *
 * # Safety
 * `opts` is writable for `size` bytes.
 */
bf_result bf_restore_options_init(bf_restore_options *opts, size_t size);

/**
 * Writes snapshot `snapshot` (id, unique prefix or "latest") to `out`: a file, created
 * sparse, that appears under its name only once whole, or a block device (only with
 * `opts->force`). Blocks; `progress`, `cancel` and `report` as for `bf_replicate`.
 *
 * # Safety
 * `store` live; `snapshot` and `out` NUL-terminated; the rest as for `bf_replicate`.
 */
bf_result bf_restore(const bf_store *store,
                     const char *snapshot,
                     const char *out,
                     const bf_restore_options *opts,
                     bf_progress_cb progress,
                     void *userdata,
                     const bf_cancel *cancel,
                     bf_restore_report *report);

/**
 * Fills `opts`, a struct of `size` bytes (give `sizeof *opts`), with the defaults.
 *
 * # Safety
 * `opts` is writable for `size` bytes.
 */
bf_result bf_verify_options_init(bf_verify_options *opts, size_t size);

/**
 * Checks every chunk of snapshot `snapshot` and, with `opts->image`, compares it with that
 * image. Returns `BF_RESULT_VERIFY_MISMATCH` when problems were found (the last error
 * describes the first) and fills `report` then too.
 *
 * # Safety
 * `store` live; `snapshot` NUL-terminated; the rest as for `bf_replicate`.
 */
bf_result bf_verify(const bf_store *store,
                    const char *snapshot,
                    const bf_verify_options *opts,
                    bf_progress_cb progress,
                    void *userdata,
                    const bf_cancel *cancel,
                    bf_verify_report *report);

/**
 * Fills `opts`, a struct of `size` bytes (give `sizeof *opts`), with the defaults.
 *
 * # Safety
 * `opts` is writable for `size` bytes.
 */
bf_result bf_convert_options_init(bf_convert_options *opts, size_t size);

/**
 * Writes an image's virtual disk to `out` as a sparse raw file that appears under its name
 * only once whole (or onto a block device, only with `opts->force`).
 *
 * # Safety
 * `image` and `out` NUL-terminated; `opts` NULL or initialised; the rest as for
 * `bf_replicate`.
 */
bf_result bf_convert(const char *image,
                     const char *out,
                     const bf_convert_options *opts,
                     bf_progress_cb progress,
                     void *userdata,
                     const bf_cancel *cancel);

/**
 * Fills `opts`, a struct of `size` bytes (give `sizeof *opts`), with the defaults.
 *
 * # Safety
 * `opts` is writable for `size` bytes.
 */
bf_result bf_prune_options_init(bf_prune_options *opts, size_t size);

/**
 * Forgets the snapshots a retention policy does not keep.
 *
 * # Safety
 * `store` live; `opts` initialised (not NULL: a policy is needed), its `disk` NULL or
 * NUL-terminated; `report` NULL or writable for its `size`.
 */
bf_result bf_store_prune(const bf_store *store,
                         const bf_prune_options *opts,
                         bf_prune_report *report);

/**
 * Fills `opts`, a struct of `size` bytes (give `sizeof *opts`), with the defaults.
 *
 * # Safety
 * `opts` is writable for `size` bytes.
 */
bf_result bf_gc_options_init(bf_gc_options *opts, size_t size);

/**
 * Deletes what no snapshot references, repacking packs with too much unused space.
 * `opts` NULL means the defaults; the rest as for `bf_replicate`.
 *
 * # Safety
 * `store` live; `opts` NULL or initialised; the rest as for `bf_replicate`.
 */
bf_result bf_store_gc(const bf_store *store,
                      const bf_gc_options *opts,
                      bf_progress_cb progress,
                      void *userdata,
                      const bf_cancel *cancel,
                      bf_gc_report *report);

/**
 * The store's snapshots as a JSON array (oldest first) in `buf`, NUL-terminated; `*out_n`
 * gets its length. If `len` is too small, nothing is written, `*out_n` is the length
 * needed (without the NUL) and `BF_RESULT_INSUFFICIENT_SIZE` is returned: call again with
 * a larger buffer. The same holds for every `_json` function.
 *
 * # Safety
 * `store` live; `buf` NULL (with `len` 0) or writable for `len` bytes; `out_n` NULL or
 * writable.
 */
bf_result bf_store_snapshots_json(const bf_store *store, char *buf, size_t len, size_t *out_n);

/**
 * What an image is (format, sizes, allocation, chain) as a JSON object; see
 * `bf_store_snapshots_json` for the buffer rules.
 *
 * # Safety
 * `path` NUL-terminated; buffer as for `bf_store_snapshots_json`.
 */
bf_result bf_image_info_json(const char *path, char *buf, size_t len, size_t *out_n);

/**
 * An image's allocation map as a JSON array of `{"start","length","data","zero","kind",
 * "file","offset"}` (`kind`: data, zero, unallocated; neighbours merged), as `blockferry map
 * --json` prints it; buffer rules as for `bf_store_snapshots_json`.
 *
 * # Safety
 * As `bf_image_info_json`.
 */
bf_result bf_image_map_json(const char *path, char *buf, size_t len, size_t *out_n);

/**
 * The disk images under `folder` as a JSON array of `{"path","ova_disk","role","format",
 * "subformat","virtual_size","allocated_bytes","chain","error"}` (`role`: disk, parent,
 * extent, unreadable; `error`: `{"kind","message"}` or null), as `blockferry discover
 * --json` lists them; buffer rules as for `bf_store_snapshots_json`.
 *
 * # Safety
 * As `bf_image_info_json`.
 */
bf_result bf_discover_json(const char *folder, char *buf, size_t len, size_t *out_n);

/**
 * The replication jobs of the job database in `state_dir` (NULL: the default folder) as a
 * JSON array; buffer rules as for `bf_store_snapshots_json`.
 *
 * # Safety
 * `state_dir` NULL or NUL-terminated; buffer as for `bf_store_snapshots_json`.
 */
bf_result bf_jobs_json(const char *state_dir, char *buf, size_t len, size_t *out_n);

/**
 * Fills `opts`, a struct of `size` bytes (give `sizeof *opts`), with the defaults.
 *
 * # Safety
 * `opts` is writable for `size` bytes.
 */
bf_result bf_s3_options_init(bf_s3_options *opts, size_t size);

/**
 * Fills `opts`, a struct of `size` bytes (give `sizeof *opts`), with the defaults.
 *
 * # Safety
 * `opts` is writable for `size` bytes.
 */
bf_result bf_create_options_init(bf_create_options *opts, size_t size);

/**
 * Creates a store at `location` (a folder, created if missing, or `s3://BUCKET/PREFIX`)
 * and opens it into `*out`: encrypted with the passphrase (`passphrase_len` bytes) unless
 * `opts->encrypted` is false. `opts` NULL means the defaults; `s3` NULL too.
 *
 * # Safety
 * `location` is a NUL-terminated string; `passphrase` is NULL or readable for
 * `passphrase_len` bytes; `opts` and `s3` NULL or initialised; `out` is writable.
 */
bf_result bf_store_create(const char *location,
                          const uint8_t *passphrase,
                          size_t passphrase_len,
                          const bf_create_options *opts,
                          const bf_s3_options *s3,
                          bf_store **out);

/**
 * Opens the store at `location` into `*out`, unlocking it with the passphrase (NULL for
 * an unencrypted store; `BF_RESULT_CREDENTIALS` if it does not unlock, or if a passphrase is
 * given for an unencrypted store). The store is checked against this client's record of it
 * in the default state folder (`BLOCKFERRY_STATE_DIR`, else under `$HOME`): a store whose id
 * or encryption changed under the client is refused (`BF_RESULT_CORRUPT`).
 *
 * # Safety
 * As `bf_store_create`.
 */
bf_result bf_store_open(const char *location,
                        const uint8_t *passphrase,
                        size_t passphrase_len,
                        const bf_s3_options *s3,
                        bf_store **out);

/**
 * Frees a store (NULL is ignored). No call on it may be running.
 *
 * # Safety
 * `store` is NULL or from `bf_store_open`/`bf_store_create`, freed once.
 */
void bf_store_free(bf_store *store);

/**
 * Aborts an unfinished job's uploads in its store and forgets it (a finished job is just
 * forgotten); `job` is its id or a unique prefix.
 *
 * # Safety
 * `job` NUL-terminated; `state_dir` NULL or NUL-terminated; `s3` NULL or initialised.
 */
bf_result bf_abandon_job(const char *job, const char *state_dir, const bf_s3_options *s3);

/**
 * Makes a builder with the defaults: no change source yet (one must be set), the default
 * job folder, a 1% verify sample, the default memory budget.
 *
 * # Safety
 * `out` is writable.
 */
bf_result bf_sync_builder_new(bf_sync_builder **out);

/**
 * Releases a builder (NULL is ignored).
 *
 * # Safety
 * `builder` is NULL or from `bf_sync_builder_new`, freed once.
 */
void bf_sync_builder_free(bf_sync_builder *builder);

/**
 * Where each cycle's changes come from: `"hash"` (compare every chunk), `"chain"` (the
 * image is a snapshot-chain child), `"dir"` (lists dropped in the folder `arg`; a cycle takes
 * those waiting and moves them to `arg/done/` once its snapshot is written) or `"given"`
 * (each `bf_sync_cycle` gets its list). `format` (NULL: detected) names the lists' format:
 * `vmware-cbt`, `hyperv-rct` or `extents`.
 *
 * # Safety
 * `builder` live; `source` NUL-terminated; `arg` and `format` NULL or NUL-terminated.
 */
bf_result bf_sync_builder_set_changes(bf_sync_builder *builder,
                                      const char *source,
                                      const char *arg,
                                      const char *format);

/**
 * The disk's name in the store (NULL: as a replication of the image names it).
 *
 * # Safety
 * `builder` live; `name` NULL or NUL-terminated.
 */
bf_result bf_sync_builder_set_name(bf_sync_builder *builder, const char *name);

/**
 * The job folder, where each cycle records what a killed cycle's successor resumes (NULL:
 * the default); `no_state` records nothing.
 *
 * # Safety
 * `builder` live; `dir` NULL or NUL-terminated.
 */
bf_result bf_sync_builder_set_state_dir(bf_sync_builder *builder, const char *dir, bool no_state);

/**
 * The share (0 to 1) of the chunks a list calls unchanged that each cycle reads to check it.
 *
 * # Safety
 * `builder` live.
 */
bf_result bf_sync_builder_set_verify_sample(bf_sync_builder *builder, double share);

/**
 * The memory budget of each cycle in bytes (0: the default).
 *
 * # Safety
 * `builder` live.
 */
bf_result bf_sync_builder_set_memory_budget(bf_sync_builder *builder, uint64_t bytes);

/**
 * Starts a continuous replication of `image` into `store` with the builder's settings (the
 * builder stays the caller's, to free or to build again).
 *
 * # Safety
 * `store` and `builder` live; `image` NUL-terminated; `out` writable.
 */
bf_result bf_sync_new(const bf_store *store,
                      const char *image,
                      const bf_sync_builder *builder,
                      bf_sync **out);

/**
 * Releases a sync (NULL is ignored).
 *
 * # Safety
 * `sync` is NULL or from `bf_sync_new`, freed once, with no cycle running.
 */
void bf_sync_free(bf_sync *sync);

/**
 * Runs one cycle: a delta on the disk's newest snapshot (a full copy when it has none)
 * from the sync's change source; with the source `"given"`, `(changes, len)` is the cycle's
 * list (taken against the base `bf_sync_base_json` tells), else NULL and 0. A cycle with no
 * list dropped does nothing and succeeds. Blocks; `progress` and `cancel` as for
 * `bf_replicate`. `bf_sync_cycle_json` then tells what it did; a failed cycle still counts
 * (the next one tries again).
 *
 * # Safety
 * `sync` and `store` live (the store the sync was made with); `changes` NULL or readable
 * for `len` bytes; `progress` callable with `userdata` as for `bf_replicate`; `cancel` NULL
 * or live.
 */
bf_result bf_sync_cycle(bf_sync *sync,
                        const bf_store *store,
                        const uint8_t *changes,
                        size_t len,
                        bf_progress_cb progress,
                        void *userdata,
                        const bf_cancel *cancel);

/**
 * What the last successful cycle did, as a JSON object (`cycle`, `lag_seconds`,
 * `last_success_unix_ms`, and `report`: the replication's report, or null when there was
 * no list); after a failed cycle, where the sync stands (the same without `report`). See
 * `bf_store_snapshots_json` for the buffer rules.
 *
 * # Safety
 * `sync` live; buffer as for `bf_store_snapshots_json`.
 */
bf_result bf_sync_cycle_json(const bf_sync *sync, char *buf, size_t len, size_t *out_n);

/**
 * The base of the next cycle as a JSON object (`snapshot`, `change_id`: null before the
 * first; `disk_size`): what a change list given to `bf_sync_cycle` is taken against. See
 * `bf_store_snapshots_json` for the buffer rules.
 *
 * # Safety
 * `sync` and `store` live; buffer as for `bf_store_snapshots_json`.
 */
bf_result bf_sync_base_json(const bf_sync *sync,
                            const bf_store *store,
                            char *buf,
                            size_t len,
                            size_t *out_n);

#ifdef __cplusplus
}  // extern "C"
#endif  // __cplusplus

#endif  /* BLOCKFERRY_H */
