/* The layout of every field published in C ABI version 1: where it is and how big. Built
 * once against the frozen version-1 header (ffi/tests/abi/v1/blockferry.h) and once against
 * the current one, the two outputs must be the same: a published field never moves, changes
 * size or disappears (fields are only appended; the library checks they start past the
 * older size).
 *
 *   layout > FILE
 */
#include <stddef.h>
#include <stdio.h>

#include "blockferry.h"

#define F(type, field)                                                        \
  printf("%s.%s %zu %zu\n", #type, #field, offsetof(type, field), \
         sizeof(((type *)0)->field))

int main(void) {
  F(bf_s3_options, size); F(bf_s3_options, endpoint); F(bf_s3_options, region);
  F(bf_s3_options, access_key); F(bf_s3_options, secret_key); F(bf_s3_options, path_style);
  F(bf_s3_options, attempt_timeout_secs);

  F(bf_create_options, size); F(bf_create_options, chunk_size); F(bf_create_options, encrypted);

  F(bf_replicate_options, size); F(bf_replicate_options, name);
  F(bf_replicate_options, same_disk); F(bf_replicate_options, allow_outside_folder);
  F(bf_replicate_options, disk); F(bf_replicate_options, state_dir);
  F(bf_replicate_options, no_state); F(bf_replicate_options, restart);
  F(bf_replicate_options, compression); F(bf_replicate_options, direct);
  F(bf_replicate_options, workers); F(bf_replicate_options, memory_budget);
  F(bf_replicate_options, io_engine); F(bf_replicate_options, io_depth);
  F(bf_replicate_options, upload_jobs); F(bf_replicate_options, wait_secs);
  F(bf_replicate_options, part_size); F(bf_replicate_options, bwlimit);
  F(bf_replicate_options, base); F(bf_replicate_options, changes);
  F(bf_replicate_options, changes_format); F(bf_replicate_options, change_id);
  F(bf_replicate_options, verify_sample);

  F(bf_replicate_report, size); F(bf_replicate_report, snapshot); F(bf_replicate_report, job);
  F(bf_replicate_report, resumed); F(bf_replicate_report, virtual_size);
  F(bf_replicate_report, bytes_read); F(bf_replicate_report, bytes_zero);
  F(bf_replicate_report, bytes_deduplicated); F(bf_replicate_report, bytes_new);
  F(bf_replicate_report, bytes_stored); F(bf_replicate_report, bytes_unchanged);
  F(bf_replicate_report, bytes_resumed); F(bf_replicate_report, chunks_stored);
  F(bf_replicate_report, seconds);

  F(bf_restore_options, size); F(bf_restore_options, force); F(bf_restore_options, salvage);
  F(bf_restore_options, workers);
  F(bf_restore_report, size); F(bf_restore_report, virtual_size);
  F(bf_restore_report, bytes_written); F(bf_restore_report, seconds);

  F(bf_verify_options, size); F(bf_verify_options, image); F(bf_verify_options, disk);
  F(bf_verify_options, allow_outside_folder); F(bf_verify_options, repair);
  F(bf_verify_options, io_engine); F(bf_verify_options, workers);
  F(bf_verify_report, size); F(bf_verify_report, ok); F(bf_verify_report, image_compared);
  F(bf_verify_report, chunks_checked); F(bf_verify_report, bytes_checked);
  F(bf_verify_report, problems_total); F(bf_verify_report, seconds);

  F(bf_convert_options, size); F(bf_convert_options, force); F(bf_convert_options, io_engine);
  F(bf_convert_options, workers);

  F(bf_prune_options, size); F(bf_prune_options, keep_last); F(bf_prune_options, keep_daily);
  F(bf_prune_options, keep_weekly); F(bf_prune_options, keep_monthly);
  F(bf_prune_options, disk); F(bf_prune_options, dry_run);
  F(bf_prune_report, size); F(bf_prune_report, kept); F(bf_prune_report, forgotten);

  F(bf_gc_options, size); F(bf_gc_options, max_unused); F(bf_gc_options, wait_secs);
  F(bf_gc_options, dry_run);
  F(bf_gc_report, size); F(bf_gc_report, snapshots); F(bf_gc_report, chunks_live);
  F(bf_gc_report, chunks_missing); F(bf_gc_report, packs_deleted);
  F(bf_gc_report, packs_repacked); F(bf_gc_report, bytes_before); F(bf_gc_report, bytes_after);

  F(bf_event, size); F(bf_event, kind); F(bf_event, phase); F(bf_event, bytes_total);
  F(bf_event, bytes_done); F(bf_event, bytes_read); F(bf_event, bytes_zero);
  F(bf_event, bytes_deduplicated); F(bf_event, bytes_written); F(bf_event, bytes_skipped);
  F(bf_event, elapsed_seconds); F(bf_event, rate); F(bf_event, message);

  /* Codes are values too. */
  printf("BF_IO_ENGINE %d %d %d\n", BF_IO_ENGINE_PREAD, BF_IO_ENGINE_AUTO, BF_IO_ENGINE_URING);
  printf("BF_PATH_STYLE %d %d %d\n", BF_PATH_STYLE_AUTO, BF_PATH_STYLE_PATH,
         BF_PATH_STYLE_VIRTUAL_HOSTED);
  printf("BF_RESULT %d %d %d %d\n", BF_RESULT_OK, BF_RESULT_PANIC, BF_RESULT_IO,
         BF_RESULT_INTERNAL);
  return 0;
}
