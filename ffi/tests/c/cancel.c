/* Cancel from a second thread while a replication runs, then resume it; cancel from the
 * progress callback; reuse a flag after bf_cancel_reset.
 *
 *   cancel DIR
 */
#define _FILE_OFFSET_BITS 64
#define _POSIX_C_SOURCE 200809L
#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <time.h>

#include "common.h"

static atomic_ullong written;

static void on_event(void *userdata, const bf_event *e) {
  (void)userdata;
  if (e->phase == BF_PHASE_REPLICATING) atomic_store(&written, e->bytes_written);
}

/* Cancels the operation from its own callback once something was written. */
static void cancel_from_callback(void *userdata, const bf_event *e) {
  if (e->phase == BF_PHASE_REPLICATING && e->bytes_written > 0) bf_cancel_request(userdata);
}

static void *canceller(void *arg) {
  const bf_cancel *cancel = arg;
  struct timespec pause = {0, 10 * 1000 * 1000};
  for (int i = 0; i < 3000 && atomic_load(&written) < (24ull << 20); i++) nanosleep(&pause, NULL);
  bf_cancel_request(cancel);
  bf_cancel_request(cancel); /* idempotent */
  return NULL;
}

int main(int argc, char **argv) {
  if (argc != 2) return 2;
  const char *dir = argv[1];
  char *disk = join(dir, "big.raw");
  make_disk(disk, 96ull << 20, 96ull << 20, 11);
  char *loc = join(dir, "store");
  char *state = join(dir, "state");
  bf_store *store = NULL;
  bf_create_options co;
  OK(bf_create_options_init(&co, sizeof co));
  co.encrypted = false;
  OK(bf_store_create(loc, NULL, 0, &co, NULL, &store));

  bf_cancel *cancel = NULL;
  OK(bf_cancel_new(&cancel));
  bf_replicate_options opts;
  OK(bf_replicate_options_init(&opts, sizeof opts));
  opts.state_dir = state;
  opts.bwlimit = 32ull << 20; /* slow enough to be stopped half-way */
  pthread_t t;
  CHECK(pthread_create(&t, NULL, canceller, cancel) == 0);
  bf_replicate_report rep;
  memset(&rep, 0xab, sizeof rep);
  rep.size = sizeof rep;
  EXPECT(bf_replicate(store, disk, &opts, on_event, NULL, cancel, &rep), BF_RESULT_CANCELLED);
  CHECK(pthread_join(t, NULL) == 0);
  CHECK((unsigned char)rep.snapshot[0] == 0xab); /* not written on failure */
  /* Still cancelled: a flag stays so until reset. */
  EXPECT(bf_replicate(store, disk, &opts, NULL, NULL, cancel, &rep), BF_RESULT_CANCELLED);

  char buf[4096];
  size_t n = 0;
  OK(bf_jobs_json(state, buf, sizeof buf, &n));
  CHECK(strstr(buf, "\"state\":\"active\"") != NULL);

  /* Cancelled from the callback, on the calling thread, with the flag reset for reuse. */
  bf_cancel_reset(cancel);
  EXPECT(bf_replicate(store, disk, &opts, cancel_from_callback, cancel, cancel, &rep),
         BF_RESULT_CANCELLED);

  /* The same replication again, with the flag reset, resumes: what was durable is not
   * sent again. */
  bf_cancel_reset(cancel);
  opts.bwlimit = 0;
  OK(bf_replicate(store, disk, &opts, NULL, NULL, cancel, &rep));
  bf_cancel_free(cancel);
  printf("resumed %d: %llu bytes durable before, %llu deduplicated, %llu new\n", rep.resumed,
         (unsigned long long)rep.bytes_resumed, (unsigned long long)rep.bytes_deduplicated,
         (unsigned long long)rep.bytes_new);
  CHECK(rep.resumed);
  CHECK(rep.bytes_resumed + rep.bytes_deduplicated >= (16ull << 20));
  bf_verify_options vo;
  OK(bf_verify_options_init(&vo, sizeof vo));
  vo.image = disk;
  bf_verify_report v = {.size = sizeof v};
  OK(bf_verify(store, rep.snapshot, &vo, NULL, NULL, NULL, &v));
  CHECK(v.ok);
  bf_store_free(store);
  free(disk); free(loc); free(state);
  printf("cancel: ok\n");
  return 0;
}
