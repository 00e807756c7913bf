/* Continuous replication from C: cycles by hash, from a drop folder, and with lists given
 * by the caller against the base the sync tells; every snapshot restores.
 *
 *   sync DIR
 */
#define _FILE_OFFSET_BITS 64
#define _POSIX_C_SOURCE 200809L
#include <stdbool.h>
#include <sys/stat.h>

#include "common.h"

static void write_at(const char *path, long offset, uint32_t seed, size_t n) {
  FILE *f = fopen(path, "r+b");
  CHECK(f != NULL);
  CHECK(fseek(f, offset, SEEK_SET) == 0);
  uint32_t x = seed * 2654435761u + 7;
  for (size_t i = 0; i < n; i++) {
    x ^= x << 13; x ^= x >> 17; x ^= x << 5;
    CHECK(fputc((int)(x & 0xff), f) != EOF);
  }
  CHECK(fclose(f) == 0);
}

static void write_file(const char *path, const char *text) {
  FILE *f = fopen(path, "wb");
  CHECK(f != NULL);
  CHECK(fputs(text, f) >= 0);
  CHECK(fclose(f) == 0);
}

/* The snapshot id of the last cycle's report (empty when it had none). */
static void last_snapshot(const bf_sync *sync, char id[33]) {
  char buf[8192];
  size_t n = 0;
  OK(bf_sync_cycle_json(sync, buf, sizeof buf, &n));
  id[0] = 0;
  const char *at = strstr(buf, "\"snapshot\":\"");
  if (at != NULL) {
    at += 12;
    size_t len = strcspn(at, "\"");
    CHECK(len < 33);
    memcpy(id, at, len);
    id[len] = 0;
  }
}

static void restores_as(const bf_store *store, const char *dir, const char *id, const char *disk) {
  char *out = join(dir, id);
  OK(bf_restore(store, id, out, NULL, NULL, NULL, NULL, NULL));
  CHECK(same_file(out, disk));
  free(out);
}

int main(int argc, char **argv) {
  if (argc != 2) return 2;
  const char *dir = argv[1];
  char *disk = join(dir, "vm.raw");
  make_disk(disk, 8u << 20, 4u << 20, 3);
  char *loc = join(dir, "store");
  char *state = join(dir, "state");
  bf_store *store = NULL;
  bf_create_options co;
  OK(bf_create_options_init(&co, sizeof co));
  co.encrypted = false;
  OK(bf_store_create(loc, NULL, 0, &co, NULL, &store));

  /* A builder without a source of changes builds nothing. */
  bf_sync_builder *b = NULL;
  OK(bf_sync_builder_new(&b));
  OK(bf_sync_builder_set_state_dir(b, state, false));
  bf_sync *sync = NULL;
  EXPECT(bf_sync_new(store, disk, b, &sync), BF_RESULT_INVALID_PARAMETER);
  EXPECT(bf_sync_builder_set_changes(b, "dir", NULL, NULL), BF_RESULT_INVALID_PARAMETER);

  /* By hash: a full copy, then a delta on it. */
  OK(bf_sync_builder_set_changes(b, "hash", NULL, NULL));
  OK(bf_sync_new(store, disk, b, &sync));
  char first[33], second[33];
  OK(bf_sync_cycle(sync, store, NULL, 0, NULL, NULL, NULL));
  last_snapshot(sync, first);
  CHECK(first[0] != 0);
  restores_as(store, dir, first, disk);
  write_at(disk, 1 << 20, 5, 4096);
  OK(bf_sync_cycle(sync, store, NULL, 0, NULL, NULL, NULL));
  last_snapshot(sync, second);
  CHECK(strcmp(first, second) != 0);
  restores_as(store, dir, second, disk);
  char buf[8192];
  size_t n = 0;
  OK(bf_sync_cycle_json(sync, buf, sizeof buf, &n));
  CHECK(strstr(buf, "\"cycle\":2") != NULL);
  CHECK(strstr(buf, first) != NULL); /* the second is a delta on the first */
  /* A list given to a sync whose changes are not given is refused. */
  EXPECT(bf_sync_cycle(sync, store, (const uint8_t *)"[]", 2, NULL, NULL, NULL),
         BF_RESULT_CONFIG);
  bf_sync_free(sync);

  /* From a drop folder: no list, nothing done; a list, a delta; the list filed. */
  char *drop = join(dir, "drop");
  CHECK(mkdir(drop, 0700) == 0);
  OK(bf_sync_builder_set_changes(b, "dir", drop, "extents"));
  OK(bf_sync_new(store, disk, b, &sync));
  char none[33];
  OK(bf_sync_cycle(sync, store, NULL, 0, NULL, NULL, NULL));
  last_snapshot(sync, none);
  CHECK(none[0] == 0);
  write_at(disk, 3 << 20, 9, 4096);
  char *list = join(drop, "001.json");
  write_file(list, "[[3145728, 4096]]");
  char third[33];
  OK(bf_sync_cycle(sync, store, NULL, 0, NULL, NULL, NULL));
  last_snapshot(sync, third);
  CHECK(third[0] != 0);
  restores_as(store, dir, third, disk);
  char *filed = join(drop, "done/001.json");
  struct stat st;
  CHECK(stat(filed, &st) == 0 && stat(list, &st) != 0);
  bf_sync_free(sync);

  /* Lists given by the caller, against the base the sync tells. */
  OK(bf_sync_builder_set_changes(b, "given", NULL, NULL));
  OK(bf_sync_new(store, disk, b, &sync));
  OK(bf_sync_base_json(sync, store, buf, sizeof buf, &n));
  CHECK(strstr(buf, third) != NULL && strstr(buf, "\"disk_size\":8388608") != NULL);
  EXPECT(bf_sync_cycle(sync, store, NULL, 0, NULL, NULL, NULL), BF_RESULT_CONFIG);
  write_at(disk, 6 << 20, 13, 4096);
  const char *given = "{\"extents\": [[6291456, 4096]], \"newChangeId\": \"c-4\"}";
  OK(bf_sync_cycle(sync, store, (const uint8_t *)given, strlen(given), NULL, NULL, NULL));
  char fourth[33];
  last_snapshot(sync, fourth);
  restores_as(store, dir, fourth, disk);
  bf_sync_free(sync);

  bf_sync_builder_free(b);
  bf_sync_builder_free(NULL);
  bf_sync_free(NULL);
  bf_store_free(store);
  free(filed);
  free(list);
  free(drop);
  free(state);
  free(loc);
  free(disk);
  printf("sync: 5 cycles, 4 snapshots, each restored\n");
  return 0;
}
