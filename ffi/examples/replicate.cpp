// Embedding blockferry from C++ through its C ABI: RAII handles, exceptions for errors,
// a lambda as the progress callback.
//
//   replicate-cpp IMAGE STORE_DIR RESTORED   (BLOCKFERRY_PASSPHRASE for an encrypted store)

#include <cstdio>
#include <cstdlib>
#include <functional>
#include <memory>
#include <stdexcept>
#include <string>

#include "blockferry.h"

namespace bf {

// A blockferry failure: the result code and the thread's error message.
class Error : public std::runtime_error {
 public:
  explicit Error(bf_result code) : std::runtime_error(message()), code_(code) {}
  bf_result code() const { return code_; }

 private:
  static std::string message() {
    size_t n = 0;
    bf_last_error(nullptr, 0, &n);
    std::string text(n + 1, '\0');
    bf_last_error(text.data(), text.size(), &n);
    text.resize(n);
    return text;
  }
  bf_result code_;
};

inline void check(bf_result r) {
  if (r != BF_RESULT_OK) throw Error(r);
}

using Progress = std::function<void(const bf_event &)>;

// Calls a std::function (on the thread that called the operation, one event at a time).
extern "C" inline void trampoline(void *userdata, const bf_event *event) {
  (*static_cast<Progress *>(userdata))(*event);
}

class Store {
 public:
  static Store open_or_create(const std::string &location, const std::string &passphrase) {
    bf_store *s = nullptr;
    const auto *p = reinterpret_cast<const uint8_t *>(passphrase.data());
    bf_result r = bf_store_open(location.c_str(), passphrase.empty() ? nullptr : p,
                                passphrase.size(), nullptr, &s);
    if (r == BF_RESULT_NOT_FOUND) {
      bf_create_options opts;
      check(bf_create_options_init(&opts, sizeof opts));
      opts.encrypted = !passphrase.empty();
      check(bf_store_create(location.c_str(), passphrase.empty() ? nullptr : p,
                            passphrase.size(), &opts, nullptr, &s));
    } else {
      check(r);
    }
    return Store(s);
  }

  bf_replicate_report replicate(const std::string &image, Progress progress) const {
    bf_replicate_options opts;
    check(bf_replicate_options_init(&opts, sizeof opts));
    bf_replicate_report report{};
    report.size = sizeof report;
    check(bf_replicate(handle_.get(), image.c_str(), &opts, trampoline, &progress, nullptr,
                       &report));
    return report;
  }

  bf_verify_report verify(const std::string &snapshot, const std::string &image) const {
    bf_verify_options opts;
    check(bf_verify_options_init(&opts, sizeof opts));
    opts.image = image.c_str();
    bf_verify_report report{};
    report.size = sizeof report;
    check(bf_verify(handle_.get(), snapshot.c_str(), &opts, nullptr, nullptr, nullptr, &report));
    return report;
  }

  void restore(const std::string &snapshot, const std::string &out) const {
    bf_restore_options opts;
    check(bf_restore_options_init(&opts, sizeof opts));
    opts.force = true;
    check(bf_restore(handle_.get(), snapshot.c_str(), out.c_str(), &opts, nullptr, nullptr,
                     nullptr, nullptr));
  }

 private:
  explicit Store(bf_store *s) : handle_(s, bf_store_free) {}
  std::unique_ptr<bf_store, decltype(&bf_store_free)> handle_;
};

}  // namespace bf

int main(int argc, char **argv) {
  if (argc != 4) {
    std::fprintf(stderr, "usage: %s IMAGE STORE_DIR RESTORED\n", argv[0]);
    return 2;
  }
  const char *pass = std::getenv("BLOCKFERRY_PASSPHRASE");
  try {
    auto store = bf::Store::open_or_create(argv[2], pass ? pass : "");
    int events = 0;
    auto report = store.replicate(argv[1], [&](const bf_event &e) {
      if (e.kind == BF_EVENT_KIND_FINISHED) {
        std::printf("read %llu of %llu bytes\n", (unsigned long long)e.bytes_read,
                    (unsigned long long)e.bytes_total);
      }
      events++;
    });
    std::printf("snapshot %s: %llu new bytes, %d events\n", report.snapshot,
                (unsigned long long)report.bytes_new, events);
    if (!store.verify(report.snapshot, argv[1]).ok) return 1;
    store.restore(report.snapshot, argv[3]);
    std::printf("restored to %s\n", argv[3]);
  } catch (const bf::Error &e) {
    std::fprintf(stderr, "blockferry error %d: %s\n", static_cast<int>(e.code()), e.what());
    return 1;
  }
  return 0;
}
