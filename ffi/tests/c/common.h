/* Helpers of the C tests: checks that print the blockferry error and exit. */
#ifndef BF_TEST_COMMON_H
#define BF_TEST_COMMON_H

#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "blockferry.h"

static inline void fail_at(const char *file, int line, const char *what, bf_result r) {
  char msg[1024];
  size_t n = 0;
  bf_last_error(msg, sizeof msg, &n);
  fprintf(stderr, "%s:%d: %s: result %d (%s): %s\n", file, line, what, (int)r,
          bf_result_text(r), msg);
  exit(1);
}

/* Requires BF_RESULT_OK. */
#define OK(call)                                  \
  do {                                            \
    bf_result r_ = (call);                        \
    if (r_ != BF_RESULT_OK) fail_at(__FILE__, __LINE__, #call, r_); \
  } while (0)

/* Requires a given result. */
#define EXPECT(call, want)                                                       \
  do {                                                                           \
    bf_result r_ = (call);                                                       \
    if (r_ != (want)) {                                                          \
      fprintf(stderr, "%s:%d: %s: want %d, got %d\n", __FILE__, __LINE__, #call, \
              (int)(want), (int)r_);                                             \
      exit(1);                                                                   \
    }                                                                            \
  } while (0)

#define CHECK(cond)                                                      \
  do {                                                                   \
    if (!(cond)) {                                                       \
      fprintf(stderr, "%s:%d: check failed: %s\n", __FILE__, __LINE__, #cond); \
      exit(1);                                                           \
    }                                                                    \
  } while (0)

/* Writes a sparse disk of `size` bytes with pseudo-random data in [0, data). */
static inline void make_disk(const char *path, uint64_t size, uint64_t data, uint32_t seed) {
  FILE *f = fopen(path, "wb");
  CHECK(f != NULL);
  uint32_t x = seed * 2654435761u + 1;
  static unsigned char block[1 << 16];
  for (uint64_t off = 0; off < data; off += sizeof block) {
    for (size_t i = 0; i < sizeof block; i++) {
      x ^= x << 13; x ^= x >> 17; x ^= x << 5;
      block[i] = (unsigned char)x;
    }
    size_t n = data - off < sizeof block ? (size_t)(data - off) : sizeof block;
    CHECK(fwrite(block, 1, n, f) == n);
  }
  CHECK(fseeko(f, (off_t)size - 1, SEEK_SET) == 0);
  CHECK(fputc(0, f) == 0);
  CHECK(fclose(f) == 0);
}

/* Whether two files have the same bytes. */
static inline int same_file(const char *a, const char *b) {
  FILE *fa = fopen(a, "rb"), *fb = fopen(b, "rb");
  CHECK(fa && fb);
  int same = 1;
  static unsigned char ba[1 << 16], bb[1 << 16];
  for (;;) {
    size_t na = fread(ba, 1, sizeof ba, fa), nb = fread(bb, 1, sizeof bb, fb);
    if (na != nb || memcmp(ba, bb, na) != 0) { same = 0; break; }
    if (na == 0) break;
  }
  fclose(fa);
  fclose(fb);
  return same;
}

static inline char *join(const char *dir, const char *name) {
  size_t n = strlen(dir) + strlen(name) + 2;
  char *p = malloc(n);
  CHECK(p != NULL);
  snprintf(p, n, "%s/%s", dir, name);
  return p;
}

#endif
