/* A program built against the frozen header of C ABI version 1 (ffi/tests/abi/v1), run
 * against the library as it is now, which has grown since (bf_replicate_options gained
 * stall_warning_secs in version 2): its shorter structs must be filled, read and written
 * only as far as they go, the new options taking their defaults, and every call must work
 * as it did.
 *
 *   abi_v1 DIR
 */
#define _FILE_OFFSET_BITS 64
#define _POSIX_C_SOURCE 200809L
#include <stdbool.h>

#include "common.h"

#if BF_ABI_VERSION != 1
#error "abi_v1.c is built against the version-1 header (-Iffi/tests/abi/v1)"
#endif

static int events;
static void on_event(void *userdata, const bf_event *e) {
  (void)userdata;
  /* The library's event is at least as long as the one this program knows. */
  CHECK(e->size >= sizeof(bf_event));
  events++;
}

int main(int argc, char **argv) {
  if (argc != 2) return 2;
  printf("built against C ABI %d, running on %u\n", BF_ABI_VERSION, bf_abi_version());
  CHECK(bf_abi_version() >= BF_ABI_VERSION);
  const char *dir = argv[1];
  char *disk = join(dir, "disk.raw");
  make_disk(disk, 8 << 20, 3 << 20, 5);
  char *loc = join(dir, "store");
  char *state = join(dir, "state");

  bf_create_options co;
  OK(bf_create_options_init(&co, sizeof co));
  co.encrypted = false;
  bf_store *store = NULL;
  OK(bf_store_create(loc, NULL, 0, &co, NULL, &store));

  /* The options struct the library has grown: a guard after it shows that init and the
   * call touch nothing past this program's struct. */
  struct {
    bf_replicate_options opts;
    unsigned char guard[64];
  } o;
  memset(o.guard, 0x5a, sizeof o.guard);
  OK(bf_replicate_options_init(&o.opts, sizeof o.opts));
  CHECK(o.opts.size == sizeof o.opts);
  for (size_t i = 0; i < sizeof o.guard; i++) CHECK(o.guard[i] == 0x5a);
  CHECK(o.opts.compression && o.opts.verify_sample > 0.0);
  o.opts.state_dir = state;
  o.opts.name = "v1-disk";
  bf_replicate_report rep = {.size = sizeof rep};
  OK(bf_replicate(store, disk, &o.opts, on_event, NULL, NULL, &rep));
  CHECK(rep.virtual_size == (8 << 20) && rep.bytes_new == (3 << 20) && events > 0);
  CHECK(strlen(rep.snapshot) == 16);

  /* A delta with this version's fields: base, changes. */
  make_disk(disk, 8 << 20, 3 << 20, 6);
  o.opts.base = "latest";
  o.opts.changes = "hash";
  bf_replicate_report delta = {.size = sizeof delta};
  OK(bf_replicate(store, disk, &o.opts, NULL, NULL, NULL, &delta));
  CHECK(delta.bytes_new == (3 << 20));
  for (size_t i = 0; i < sizeof o.guard; i++) CHECK(o.guard[i] == 0x5a);

  bf_verify_options vo;
  OK(bf_verify_options_init(&vo, sizeof vo));
  vo.image = disk;
  bf_verify_report v = {.size = sizeof v};
  OK(bf_verify(store, delta.snapshot, &vo, NULL, NULL, NULL, &v));
  CHECK(v.ok && v.image_compared);

  bf_restore_options ro;
  OK(bf_restore_options_init(&ro, sizeof ro));
  char *out = join(dir, "restored.raw");
  bf_restore_report rr = {.size = sizeof rr};
  OK(bf_restore(store, delta.snapshot, out, &ro, NULL, NULL, NULL, &rr));
  CHECK(same_file(out, disk) && rr.bytes_written == (3 << 20));

  bf_prune_options po;
  OK(bf_prune_options_init(&po, sizeof po));
  po.keep_last = 1;
  bf_prune_report pr = {.size = sizeof pr};
  OK(bf_store_prune(store, &po, &pr));
  CHECK(pr.kept == 1 && pr.forgotten == 1);
  bf_gc_options go;
  OK(bf_gc_options_init(&go, sizeof go));
  bf_gc_report gr = {.size = sizeof gr};
  OK(bf_store_gc(store, &go, NULL, NULL, NULL, &gr));
  CHECK(gr.snapshots == 1 && gr.chunks_missing == 0);

  bf_store_free(store);
  free(out); free(state); free(loc); free(disk);
  printf("abi_v1: ok\n");
  return 0;
}
