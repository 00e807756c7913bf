/* One full replication through the C ABI (benches/bindings.rs times this process).
 *
 *   replicate IMAGE STORE STATE_DIR     (BLOCKFERRY_PASSPHRASE unlocks the store)
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "blockferry.h"

static void progress(void *userdata, const bf_event *event) {
  (void)event;
  ++*(unsigned long *)userdata;
}

int main(int argc, char **argv) {
  if (argc != 4) return 2;
  const char *pass = getenv("BLOCKFERRY_PASSPHRASE");
  bf_store *store = NULL;
  bf_result r = bf_store_open(argv[2], (const unsigned char *)pass, pass ? strlen(pass) : 0,
                              NULL, &store);
  bf_replicate_options opts;
  if (r == BF_RESULT_OK) r = bf_replicate_options_init(&opts, sizeof opts);
  opts.state_dir = argv[3];
  unsigned long events = 0;
  bf_replicate_report rep = {.size = sizeof rep};
  if (r == BF_RESULT_OK) r = bf_replicate(store, argv[1], &opts, progress, &events, NULL, &rep);
  if (r != BF_RESULT_OK) {
    char msg[1024];
    bf_last_error(msg, sizeof msg, NULL);
    fprintf(stderr, "%s: %s\n", bf_result_text(r), msg);
    return 1;
  }
  printf("%s %llu %lu\n", rep.snapshot, (unsigned long long)rep.bytes_new, events);
  bf_store_free(store);
  return 0;
}
