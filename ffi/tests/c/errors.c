/* Error paths of the C ABI: NULL arguments, bad paths and images, wrong passphrase, small
 * buffers, bad options, structs whose size is wrong. Every one returns its documented code
 * with a message; none crashes. A successful call clears the last error.
 *
 *   errors DIR
 */
#define _FILE_OFFSET_BITS 64
#define _POSIX_C_SOURCE 200809L
#include <stdbool.h>

#include "common.h"

static void expect_message(const char *needle) {
  char msg[1024];
  size_t n = 0;
  OK(bf_last_error(msg, sizeof msg, &n));
  if (strstr(msg, needle) == NULL) {
    fprintf(stderr, "last error %s lacks %s\n", msg, needle);
    exit(1);
  }
}

int main(int argc, char **argv) {
  if (argc != 2) return 2;
  const char *dir = argv[1];
  char *disk = join(dir, "disk.raw");
  make_disk(disk, 4 << 20, 1 << 20, 3);
  char *loc = join(dir, "store");
  const char pass[] = "pw";
  bf_store *store = NULL;

  /* NULL where a value is required. */
  EXPECT(bf_store_open(NULL, NULL, 0, NULL, &store), BF_RESULT_NULL_PARAMETER);
  expect_message("location is NULL");
  EXPECT(bf_store_create(loc, (const uint8_t *)pass, 2, NULL, NULL, NULL),
         BF_RESULT_NULL_PARAMETER);
  EXPECT(bf_replicate(NULL, disk, NULL, NULL, NULL, NULL, NULL), BF_RESULT_NULL_PARAMETER);
  EXPECT(bf_cancel_new(NULL), BF_RESULT_NULL_PARAMETER);
  EXPECT(bf_replicate_options_init(NULL, sizeof(bf_replicate_options)), BF_RESULT_NULL_PARAMETER);
  EXPECT(bf_store_create(loc, NULL, 5, NULL, NULL, &store), BF_RESULT_NULL_PARAMETER);
  CHECK(store == NULL); /* out-parameters untouched on failure */
  bf_store_free(NULL);
  bf_cancel_free(NULL);
  bf_cancel_request(NULL);
  bf_cancel_reset(NULL);

  /* Encryption must be asked for consistently. */
  bf_create_options co;
  OK(bf_create_options_init(&co, sizeof co));
  CHECK(co.encrypted && co.chunk_size == 0);
  EXPECT(bf_store_create(loc, NULL, 0, &co, NULL, &store), BF_RESULT_CONFIG);
  co.encrypted = false;
  EXPECT(bf_store_create(loc, (const uint8_t *)pass, 2, &co, NULL, &store),
         BF_RESULT_INVALID_PARAMETER);
  co.encrypted = true;
  co.chunk_size = 12345;
  EXPECT(bf_store_create(loc, (const uint8_t *)pass, 2, &co, NULL, &store), BF_RESULT_CONFIG);
  /* Clear, as a successful call leaves it. */
  OK(bf_store_create(loc, (const uint8_t *)pass, 2, NULL, NULL, &store));
  size_t n = 1;
  char msg[64] = "untouched";
  OK(bf_last_error(msg, sizeof msg, &n));
  CHECK(n == 0 && msg[0] == 0);
  EXPECT(bf_last_error_path(msg, sizeof msg, &n), BF_RESULT_NOT_FOUND);
  bf_store_free(store);
  store = NULL;

  /* Wrong and missing passphrases, a store that does not exist. */
  EXPECT(bf_store_open(loc, (const uint8_t *)"nope", 4, NULL, &store), BF_RESULT_CREDENTIALS);
  expect_message("passphrase");
  EXPECT(bf_store_open(loc, NULL, 0, NULL, &store), BF_RESULT_CREDENTIALS);
  char *missing = join(dir, "no-store-here");
  EXPECT(bf_store_open(missing, (const uint8_t *)pass, 2, NULL, &store), BF_RESULT_NOT_FOUND);
  CHECK(store == NULL);
  /* A passphrase for an unencrypted store is refused (its config may have been swapped). */
  char *plain = join(dir, "plain");
  co.chunk_size = 0;
  co.encrypted = false;
  OK(bf_store_create(plain, NULL, 0, &co, NULL, &store));
  bf_store_free(store);
  store = NULL;
  EXPECT(bf_store_open(plain, (const uint8_t *)pass, 2, NULL, &store), BF_RESULT_CREDENTIALS);
  expect_message("not encrypted");
  free(plain);
  OK(bf_store_open(loc, (const uint8_t *)pass, 2, NULL, &store));

  /* Bad paths and bad images. */
  char *nofile = join(dir, "missing.vmdk");
  EXPECT(bf_replicate(store, nofile, NULL, NULL, NULL, NULL, NULL), BF_RESULT_IO);
  char path[1024];
  OK(bf_last_error_path(path, sizeof path, &n));
  CHECK(strcmp(path, nofile) == 0 && n == strlen(nofile));
  char *bad = join(dir, "bad.vhdx");
  FILE *f = fopen(bad, "wb");
  CHECK(f != NULL);
  fputs("vhdxfile", f);
  for (int i = 0; i < 300000; i++) fputc(i & 0xff, f);
  fclose(f);
  EXPECT(bf_replicate(store, bad, NULL, NULL, NULL, NULL, NULL), BF_RESULT_INVALID_IMAGE);
  expect_message("bad.vhdx");
  char json[256];
  EXPECT(bf_image_info_json(bad, json, sizeof json, &n), BF_RESULT_INVALID_IMAGE);
  uint64_t off = 0;
  bf_result has_offset = bf_last_error_offset(&off);
  CHECK(has_offset == BF_RESULT_OK || has_offset == BF_RESULT_NOT_FOUND);
  EXPECT(bf_last_error_offset(NULL), BF_RESULT_NULL_PARAMETER);
  uint32_t part = 0;
  EXPECT(bf_last_error_part(&part), BF_RESULT_NOT_FOUND); /* no upload part in an image error */

  /* Structs whose size is not one of theirs: never initialised, too short, a newer
   * caller's that sets a field this library lacks; a newer caller's whose extra fields are
   * zero (their defaults) is fine. */
  bf_replicate_options opts;
  memset(&opts, 0, sizeof opts);
  EXPECT(bf_replicate(store, disk, &opts, NULL, NULL, NULL, NULL), BF_RESULT_INVALID_PARAMETER);
  expect_message("bf_replicate_options_init(opts, sizeof *opts)");
  EXPECT(bf_replicate_options_init(&opts, 12), BF_RESULT_INVALID_PARAMETER);
  struct {
    bf_replicate_options known;
    uint64_t newer_field;
  } newer;
  OK(bf_replicate_options_init(&newer.known, sizeof newer));
  CHECK(newer.known.size == sizeof newer && newer.newer_field == 0);
  newer.known.no_state = true;
  newer.newer_field = 1;
  EXPECT(bf_replicate(store, disk, &newer.known, NULL, NULL, NULL, NULL),
         BF_RESULT_INVALID_PARAMETER);
  expect_message("newer header");
  OK(bf_replicate_options_init(&opts, sizeof opts));
  opts.no_state = true;
  bf_replicate_report unsized;
  memset(&unsized, 0, sizeof unsized);
  EXPECT(bf_replicate(store, disk, &opts, NULL, NULL, NULL, &unsized), BF_RESULT_INVALID_PARAMETER);
  expect_message("report.size = sizeof *report");
  CHECK(unsized.bytes_read == 0); /* refused before any work */
  bf_s3_options s3;
  OK(bf_s3_options_init(&s3, sizeof s3));
  s3.path_style = 7;
  EXPECT(bf_abandon_job("0000", dir, &s3), BF_RESULT_INVALID_PARAMETER);
  expect_message("BF_PATH_STYLE_AUTO");

  /* Options out of range, strings that are not UTF-8, a bad change list. */
  OK(bf_replicate_options_init(&opts, sizeof opts));
  opts.no_state = true;
  opts.io_engine = 9;
  EXPECT(bf_replicate(store, disk, &opts, NULL, NULL, NULL, NULL), BF_RESULT_INVALID_PARAMETER);
  expect_message("BF_IO_ENGINE_PREAD");
  OK(bf_replicate_options_init(&opts, sizeof opts));
  opts.no_state = true;
  opts.name = "\xff\xfe";
  EXPECT(bf_replicate(store, disk, &opts, NULL, NULL, NULL, NULL), BF_RESULT_INVALID_PARAMETER);
  expect_message("UTF-8");
  OK(bf_replicate_options_init(&opts, sizeof opts));
  opts.no_state = true;
  opts.changes = "hash";
  EXPECT(bf_replicate(store, disk, &opts, NULL, NULL, NULL, NULL), BF_RESULT_CONFIG);
  bf_replicate_report rep = {.size = sizeof rep};
  OK(bf_replicate_options_init(&opts, sizeof opts));
  opts.no_state = true;
  OK(bf_replicate(store, disk, &opts, NULL, NULL, NULL, &rep));
  char *cbt = join(dir, "cbt.json");
  f = fopen(cbt, "wb");
  fputs("{\"changedArea\": [{\"start\": 0, \"length\": 999999999999}]}", f);
  fclose(f);
  opts.base = "latest";
  opts.changes = cbt;
  EXPECT(bf_replicate(store, disk, &opts, NULL, NULL, NULL, NULL), BF_RESULT_INVALID_CHANGE_LIST);
  expect_message("cbt.json");

  /* Unknown snapshots; an existing output without force. */
  char *out = join(dir, "out.raw");
  EXPECT(bf_restore(store, "feedfacefeedface", out, NULL, NULL, NULL, NULL, NULL),
         BF_RESULT_NOT_FOUND);
  OK(bf_restore(store, rep.snapshot, out, NULL, NULL, NULL, NULL, NULL));
  EXPECT(bf_restore(store, rep.snapshot, out, NULL, NULL, NULL, NULL, NULL), BF_RESULT_CONFIG);
  bf_restore_options ro;
  OK(bf_restore_options_init(&ro, sizeof ro));
  ro.force = true;
  OK(bf_restore(store, rep.snapshot, out, &ro, NULL, NULL, NULL, NULL));

  /* A verify that finds the image changed. */
  make_disk(disk, 4 << 20, 1 << 20, 4);
  bf_verify_options vo;
  OK(bf_verify_options_init(&vo, sizeof vo));
  vo.image = disk;
  bf_verify_report v = {.size = sizeof v};
  EXPECT(bf_verify(store, rep.snapshot, &vo, NULL, NULL, NULL, &v), BF_RESULT_VERIFY_MISMATCH);
  CHECK(!v.ok && v.problems_total > 0);
  expect_message("problem");

  /* Buffers: too small for JSON (nothing written), too small for the message (truncated). */
  char tiny[4] = "abc";
  EXPECT(bf_store_snapshots_json(store, tiny, sizeof tiny, &n), BF_RESULT_INSUFFICIENT_SIZE);
  CHECK(n > sizeof tiny && strcmp(tiny, "abc") == 0);
  EXPECT(bf_store_snapshots_json(store, NULL, 8, &n), BF_RESULT_NULL_PARAMETER);
  EXPECT(bf_restore(store, "feedfacefeedface", out, NULL, NULL, NULL, NULL, NULL),
         BF_RESULT_NOT_FOUND);
  char cut[8];
  EXPECT(bf_last_error(cut, sizeof cut, &n), BF_RESULT_INSUFFICIENT_SIZE);
  CHECK(strlen(cut) == 7 && n > 7);
  EXPECT(bf_last_error(NULL, 0, &n), BF_RESULT_INSUFFICIENT_SIZE);

  /* Every code has a text; unknown ones too. */
  for (int code = 0; code < 200; code++) CHECK(bf_result_text((bf_result)code) != NULL);
  CHECK(strcmp(bf_result_text(BF_RESULT_CREDENTIALS), "the passphrase does not unlock the store") == 0);
  CHECK(strcmp(bf_result_text((bf_result)9999), "unknown result code") == 0);

  /* Prune needs its options (a policy); one that keeps nothing is refused. */
  bf_prune_options po;
  OK(bf_prune_options_init(&po, sizeof po));
  EXPECT(bf_store_prune(store, NULL, NULL), BF_RESULT_NULL_PARAMETER);
  EXPECT(bf_store_prune(store, &po, NULL), BF_RESULT_CONFIG);

  /* Jobs: abandoning one that does not exist. */
  char *state = join(dir, "state");
  EXPECT(bf_abandon_job("0000", state, NULL), BF_RESULT_NOT_FOUND);

  bf_store_free(store);
  free(state); free(out); free(cbt); free(bad); free(nofile); free(missing); free(loc); free(disk);
  printf("errors: ok\n");
  return 0;
}
