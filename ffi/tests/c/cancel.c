/* Cancel from a second thread while a replication runs, then resume it.
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
  OK(bf_store_create(loc, NULL, 0, false, 0, NULL, &store));

  bf_cancel *cancel = NULL;
  OK(bf_cancel_new(&cancel));
  bf_replicate_options opts;
  OK(bf_replicate_options_init(&opts));
  opts.state_dir = state;
  opts.bwlimit = 32ull << 20; /* slow enough to be stopped half-way */
  pthread_t t;
  CHECK(pthread_create(&t, NULL, canceller, cancel) == 0);
  bf_replicate_report rep;
  memset(&rep, 0xab, sizeof rep);
  EXPECT(bf_replicate(store, disk, &opts, on_event, NULL, cancel, &rep), BF_RESULT_CANCELLED);
  CHECK(pthread_join(t, NULL) == 0);
  CHECK((unsigned char)rep.snapshot[0] == 0xab); /* not written on failure */
  bf_cancel_free(cancel);

  char buf[4096];
  size_t n = 0;
  OK(bf_jobs_json(state, buf, sizeof buf, &n));
  CHECK(strstr(buf, "\"state\":\"active\"") != NULL);

  /* The same replication again resumes: what was durable is not sent again. */
  opts.bwlimit = 0;
  OK(bf_replicate(store, disk, &opts, NULL, NULL, NULL, &rep));
  printf("resumed %d: %llu bytes durable before, %llu deduplicated, %llu new\n", rep.resumed,
         (unsigned long long)rep.bytes_resumed, (unsigned long long)rep.bytes_deduplicated,
         (unsigned long long)rep.bytes_new);
  CHECK(rep.resumed);
  CHECK(rep.bytes_resumed + rep.bytes_deduplicated >= (16ull << 20));
  bf_verify_report v;
  OK(bf_verify(store, rep.snapshot, disk, 0, NULL, NULL, NULL, &v));
  CHECK(v.ok);
  bf_store_free(store);
  free(disk); free(loc); free(state);
  printf("cancel: ok\n");
  return 0;
}
