/* Helpers shared by the C test programs: checks that exit with a message, an echo thread for
 * accepted tunnels, and a two-way exchange over a tunnel's file descriptor. */
#ifndef MESHWIRE_TEST_COMMON_H
#define MESHWIRE_TEST_COMMON_H

#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "meshwire.h"

#define FAIL(...)                                                    \
    do {                                                             \
        fprintf(stderr, "%s:%d: ", __FILE__, __LINE__);              \
        fprintf(stderr, __VA_ARGS__);                                \
        fprintf(stderr, "\n");                                       \
        exit(1);                                                     \
    } while (0)

#define CHECK(cond)                                                  \
    do {                                                             \
        if (!(cond)) FAIL("check failed: %s", #cond);                \
    } while (0)

/* Checks that a meshwire call returned `expected`; prints the status names and the last error if not. */
#define CHECK_STATUS(call, expected)                                                                  \
    do {                                                                                              \
        meshwire_status got_ = (call);                                                                \
        if (got_ != (expected))                                                                       \
            FAIL("%s returned %s, expected %s: %s", #call, meshwire_status_name(got_),                \
                 meshwire_status_name(expected), meshwire_last_error());                              \
    } while (0)

#define CHECK_OK(call) CHECK_STATUS(call, MESHWIRE_OK)

/* Checks that the thread's last error mentions `needle`. */
#define CHECK_ERROR_MENTIONS(needle)                                                                  \
    do {                                                                                              \
        const char *msg_ = meshwire_last_error();                                                     \
        if (msg_ == NULL || strstr(msg_, (needle)) == NULL)                                           \
            FAIL("last error %s does not mention %s", msg_ ? msg_ : "(null)", (needle));              \
    } while (0)

static inline void write_all(int fd, const unsigned char *buf, size_t len) {
    while (len > 0) {
        ssize_t n = write(fd, buf, len);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) FAIL("write: %s", strerror(errno));
        buf += n;
        len -= (size_t)n;
    }
}

/* Echoes everything read from the fd (an accepted tunnel) back, then half-closes and closes it. */
static inline void *echo_thread(void *arg) {
    int fd = (int)(intptr_t)arg;
    unsigned char buf[16384];
    for (;;) {
        ssize_t n = read(fd, buf, sizeof buf);
        if (n < 0 && errno == EINTR) continue;
        if (n < 0) FAIL("echo read: %s", strerror(errno));
        if (n == 0) break;
        write_all(fd, buf, (size_t)n);
    }
    shutdown(fd, SHUT_WR);
    close(fd);
    return NULL;
}

struct sender {
    int fd;
    const unsigned char *data;
    size_t len;
};

static inline void *send_then_half_close(void *arg) {
    struct sender *s = arg;
    write_all(s->fd, s->data, s->len);
    if (shutdown(s->fd, SHUT_WR) != 0) FAIL("shutdown: %s", strerror(errno));
    return NULL;
}

/* Sends `len` patterned bytes through the tunnel behind `fd` while reading the echo; checks that
 * exactly the same bytes come back before end of file, then closes the fd. */
static inline void exchange(int fd, size_t len, unsigned seed) {
    unsigned char *out = malloc(len);
    unsigned char *in = malloc(len + 1);
    CHECK(out != NULL && in != NULL);
    for (size_t i = 0; i < len; i++) out[i] = (unsigned char)((i * 31u + seed) & 0xff);
    struct sender s = {fd, out, len};
    pthread_t writer;
    CHECK(pthread_create(&writer, NULL, send_then_half_close, &s) == 0);
    size_t got = 0;
    for (;;) {
        ssize_t n = read(fd, in + got, len + 1 - got);
        if (n < 0 && errno == EINTR) continue;
        if (n < 0) FAIL("read: %s", strerror(errno));
        if (n == 0) break;
        got += (size_t)n;
        if (got > len) FAIL("more bytes came back than were sent");
    }
    CHECK(pthread_join(writer, NULL) == 0);
    if (got != len) FAIL("%zu of %zu bytes came back", got, len);
    if (memcmp(in, out, len) != 0) FAIL("the bytes that came back differ from those sent");
    close(fd);
    free(out);
    free(in);
}

#endif
