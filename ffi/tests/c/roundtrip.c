/* A full replicate, verify and restore through the C ABI, into a local store and, when an
 * S3 endpoint is given, into S3; progress through a callback (on the calling thread, as the
 * header says); JSON queries in the CLI's shapes.
 *
 *   roundtrip DIR DISK_MIB [ENDPOINT BUCKET ACCESS_KEY SECRET_KEY]
 */
#define _FILE_OFFSET_BITS 64
#define _POSIX_C_SOURCE 200809L
#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <unistd.h>

#include "common.h"

typedef struct {
  atomic_int started, progress, finished;
  atomic_ullong last_done;
  atomic_int went_back;
  pthread_t caller;      /* the thread that made the call */
  atomic_int elsewhere;  /* events delivered on another thread */
} counts;

static void on_event(void *userdata, const bf_event *e) {
  counts *c = userdata;
  if (!pthread_equal(pthread_self(), c->caller)) atomic_store(&c->elsewhere, 1);
  CHECK(e->size >= sizeof(bf_event));
  switch (e->kind) {
    case BF_EVENT_KIND_STARTED: atomic_fetch_add(&c->started, 1); break;
    case BF_EVENT_KIND_PROGRESS:
    case BF_EVENT_KIND_FINISHED:
      if (e->phase == BF_PHASE_REPLICATING) {
        if (e->bytes_done < atomic_load(&c->last_done)) atomic_store(&c->went_back, 1);
        atomic_store(&c->last_done, e->bytes_done);
      }
      if (e->kind == BF_EVENT_KIND_FINISHED) atomic_fetch_add(&c->finished, 1);
      else atomic_fetch_add(&c->progress, 1);
      break;
    case BF_EVENT_KIND_WARNING: CHECK(e->message != NULL); break;
  }
}

static void round_trip(const char *dir, const char *location, const bf_s3_options *s3,
                       const char *disk, uint64_t size, uint64_t data) {
  const char pass[] = "correct horse battery staple";
  bf_store *store = NULL;
  OK(bf_store_create(location, (const uint8_t *)pass, strlen(pass), NULL, s3, &store));
  CHECK(store != NULL);

  bf_replicate_options opts;
  OK(bf_replicate_options_init(&opts, sizeof opts));
  CHECK(opts.size == sizeof opts && opts.compression && opts.io_engine == BF_IO_ENGINE_PREAD);
  char *state = join(dir, "state");
  opts.state_dir = state;
  counts c = {0};
  c.caller = pthread_self();
  bf_replicate_report rep = {.size = sizeof rep};
  OK(bf_replicate(store, disk, &opts, on_event, &c, NULL, &rep));
  CHECK(rep.size == sizeof rep);
  printf("%s: snapshot %s: %llu new bytes in %.2fs\n", location, rep.snapshot,
         (unsigned long long)rep.bytes_new, rep.seconds);
  CHECK(strlen(rep.snapshot) == 16 && strlen(rep.job) == 16);
  CHECK(rep.virtual_size == size);
  CHECK(rep.bytes_new == data);
  CHECK(rep.bytes_zero == size - data);
  CHECK(!rep.resumed);
  CHECK(atomic_load(&c.started) >= 1 && atomic_load(&c.finished) >= 1);
  CHECK(!atomic_load(&c.went_back));
  CHECK(!atomic_load(&c.elsewhere));

  /* Reopen it, as another program would. */
  bf_store_free(store);
  store = NULL;
  OK(bf_store_open(location, (const uint8_t *)pass, strlen(pass), s3, &store));

  bf_verify_options vo;
  OK(bf_verify_options_init(&vo, sizeof vo));
  vo.image = disk;
  bf_verify_report v = {.size = sizeof v};
  OK(bf_verify(store, rep.snapshot, &vo, NULL, NULL, NULL, &v));
  CHECK(v.ok && v.image_compared && v.problems_total == 0);

  char *out = join(dir, s3 ? "restored-s3.raw" : "restored.raw");
  bf_restore_report rr = {.size = sizeof rr};
  OK(bf_restore(store, "latest", out, NULL, on_event, &c, NULL, &rr));
  CHECK(!atomic_load(&c.elsewhere));
  CHECK(rr.virtual_size == size && rr.bytes_written == data);
  CHECK(same_file(out, disk));

  /* Export as a VHDX (ABI version 3): blockferry reads it back as the disk. */
  char *vhdx = join(dir, s3 ? "export-s3.vhdx" : "export.vhdx");
  bf_export_options eo;
  OK(bf_export_options_init(&eo, sizeof eo));
  CHECK(eo.format == BF_EXPORT_FORMAT_RAW);
  eo.format = BF_EXPORT_FORMAT_VHDX;
  bf_export_report er = {.size = sizeof er};
  OK(bf_export(store, rep.snapshot, vhdx, &eo, on_event, &c, NULL, &er));
  CHECK(!atomic_load(&c.elsewhere));
  CHECK(er.virtual_size == size && er.bytes_written == data && strcmp(er.snapshot, rep.snapshot) == 0);
  char info[4096];
  size_t info_n = 0;
  OK(bf_image_info_json(vhdx, info, sizeof info, &info_n));
  CHECK(strstr(info, "\"format\":\"vhdx\"") != NULL);
  char *vmdk = join(dir, s3 ? "export-s3.vmdk" : "export.vmdk");
  eo.format = BF_EXPORT_FORMAT_VMDK;
  OK(bf_export(store, rep.snapshot, vmdk, &eo, NULL, NULL, NULL, &er));
  OK(bf_image_info_json(vmdk, info, sizeof info, &info_n));
  CHECK(strstr(info, "\"subformat\":\"streamOptimized\"") != NULL);
  eo.format = 9;
  EXPECT(bf_export(store, rep.snapshot, vhdx, &eo, NULL, NULL, NULL, NULL), BF_RESULT_INVALID_PARAMETER);
  free(vmdk);
  free(vhdx);

  /* JSON queries: ask for the size first, then read. */
  size_t need = 0;
  EXPECT(bf_store_snapshots_json(store, NULL, 0, &need), BF_RESULT_INSUFFICIENT_SIZE);
  CHECK(need > 0);
  char *json = malloc(need + 1);
  size_t n = 0;
  OK(bf_store_snapshots_json(store, json, need + 1, &n));
  CHECK(n == need && strlen(json) == n && strstr(json, rep.snapshot) != NULL);
  free(json);

  /* A second run stores nothing new. */
  OK(bf_replicate(store, disk, &opts, NULL, NULL, NULL, &rep));
  CHECK(rep.bytes_new == 0 && rep.bytes_deduplicated == data);
  bf_prune_options po;
  OK(bf_prune_options_init(&po, sizeof po));
  po.keep_last = 1;
  bf_prune_report pr = {.size = sizeof pr};
  OK(bf_store_prune(store, &po, &pr));
  CHECK(pr.kept == 1 && pr.forgotten == 1);
  bf_gc_options go;
  OK(bf_gc_options_init(&go, sizeof go));
  go.max_unused = 0.05;
  go.wait_secs = 60;
  bf_gc_report gr = {.size = sizeof gr};
  OK(bf_store_gc(store, &go, NULL, NULL, NULL, &gr));
  CHECK(gr.snapshots == 1 && gr.chunks_missing == 0);

  bf_store_free(store);
  free(out);
  free(state);
}

int main(int argc, char **argv) {
  if (argc != 3 && argc != 7) {
    fprintf(stderr, "usage: %s DIR DISK_MIB [ENDPOINT BUCKET ACCESS_KEY SECRET_KEY]\n", argv[0]);
    return 2;
  }
  printf("blockferry %s, C ABI %u (header %d)\n", bf_version(), bf_abi_version(), BF_ABI_VERSION);
  CHECK(bf_abi_version() >= BF_ABI_VERSION);
  char version[32];
  snprintf(version, sizeof version, "%d.%d.%d", BF_VERSION_MAJOR, BF_VERSION_MINOR,
           BF_VERSION_PATCH);
  CHECK(strcmp(version, bf_version()) == 0);
  const char *dir = argv[1];
  uint64_t mib = strtoull(argv[2], NULL, 10);
  uint64_t size = mib << 20, data = (mib / 2) << 20;
  char *disk = join(dir, "disk.raw");
  make_disk(disk, size, data, 7);

  char buf[4096];
  size_t n = 0;
  OK(bf_image_info_json(disk, buf, sizeof buf, &n));
  CHECK(strstr(buf, "\"format\":\"raw\"") != NULL);
  OK(bf_image_map_json(disk, buf, sizeof buf, &n));
  CHECK(strstr(buf, "\"kind\":\"data\"") != NULL && strstr(buf, "\"file\":") != NULL);
  OK(bf_discover_json(dir, buf, sizeof buf, &n));
  CHECK(strstr(buf, "\"role\":\"disk\"") != NULL);
  /* The fields the CLI's discover --json has, allocated_bytes among them (the C discover
   * once dropped it): the data, and the block the disk's last byte is in. */
  const char *allocated = strstr(buf, "\"allocated_bytes\":");
  CHECK(allocated != NULL);
  unsigned long long allocated_bytes = strtoull(allocated + strlen("\"allocated_bytes\":"), NULL, 10);
  CHECK(allocated_bytes >= data && allocated_bytes <= data + (1 << 20));
  /* VMs: a .vmx whose disk is not there is listed with the problem named. */
  char *vmx = join(dir, "cvm.vmx");
  FILE *f = fopen(vmx, "w");
  CHECK(f != NULL);
  fputs("displayName = \"cvm\"\nnumvcpus = \"2\"\nscsi0:0.fileName = \"gone.vmdk\"\n", f);
  fclose(f);
  OK(bf_discover_vms_json(dir, buf, sizeof buf, &n));
  CHECK(strstr(buf, "\"name\":\"cvm\"") != NULL && strstr(buf, "\"cpus\":2") != NULL);
  CHECK(strstr(buf, "\"slot\":\"scsi0:0\"") != NULL && strstr(buf, "not among the images") != NULL);
  unlink(vmx);
  free(vmx);

  char *local = join(dir, "store");
  round_trip(dir, local, NULL, disk, size, data);

  if (argc == 7) {
    char url[512];
    snprintf(url, sizeof url, "s3://%s/c-roundtrip-%ld", argv[4], (long)getpid());
    bf_s3_options s3;
    OK(bf_s3_options_init(&s3, sizeof s3));
    CHECK(s3.path_style == BF_PATH_STYLE_AUTO);
    s3.endpoint = argv[3]; /* path-style by default with an endpoint */
    s3.region = "us-east-1";
    s3.access_key = argv[5];
    s3.secret_key = argv[6];
    round_trip(dir, url, &s3, disk, size, data);
  }
  char *state = join(dir, "state");
  OK(bf_jobs_json(state, buf, sizeof buf, &n));
  CHECK(strstr(buf, "\"state\":\"done\"") != NULL);
  free(state);
  free(local);
  free(disk);
  printf("roundtrip: ok\n");
  return 0;
}
