/* A C server: accepts HBONE tunnels from one expected client identity and echoes them; refuses
 * authority port 1 with 401 and other identities with 403. Prints "port <n>" once listening, and
 * stops when its standard input closes, printing what it accepted.
 *
 * Usage: server <ca-dir> <server-spiffe-id> <expected-client-spiffe-id> */
#include "common.h"

#define MAX_TUNNELS 64

static const char *expected_client;
static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_t echoes[MAX_TUNNELS];
static int accepted, refused;

static int on_accept(void *user_data, const char *peer, const char *authority, int fd) {
    (void)user_data;
    size_t len = strlen(authority);
    int verdict = 0;
    pthread_mutex_lock(&mu);
    if (len >= 2 && strcmp(authority + len - 2, ":1") == 0) {
        verdict = 401;
    } else if (strcmp(peer, expected_client) != 0 || accepted == MAX_TUNNELS) {
        verdict = 403;
    } else if (pthread_create(&echoes[accepted], NULL, echo_thread, (void *)(intptr_t)fd) != 0) {
        verdict = 503;
    } else {
        accepted++;
    }
    if (verdict != 0) refused++;
    pthread_mutex_unlock(&mu);
    return verdict;
}

int main(int argc, char **argv) {
    if (argc != 4) FAIL("usage: %s <ca-dir> <server-id> <expected-client-id>", argv[0]);
    expected_client = argv[3];
    meshwire_context *ctx = NULL;
    CHECK_OK(meshwire_context_new_local_ca(argv[1], argv[2], &ctx));
    meshwire_server *server = NULL;
    CHECK_OK(meshwire_server_start(ctx, "127.0.0.1:0", on_accept, NULL, &server));
    uint16_t port = 0;
    CHECK_OK(meshwire_server_port(server, &port));
    printf("port %u\n", port);
    fflush(stdout);

    char buf[64];
    while (read(0, buf, sizeof buf) > 0) {
    }

    meshwire_server_free(server);
    for (int i = 0; i < accepted; i++) CHECK(pthread_join(echoes[i], NULL) == 0);
    meshwire_context_free(ctx);
    printf("server: accepted=%d refused=%d\n", accepted, refused);
    return 0;
}
