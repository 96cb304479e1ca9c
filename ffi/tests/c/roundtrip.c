/* The C API end to end: a local-CA context for a server and one for a client, a server whose
 * callback checks the client's identity and echoes, blocking and asynchronous dials exchanging data
 * both ways, refusals and errors, and everything freed (run under valgrind by the tests).
 *
 * Usage: roundtrip <ca-dir> */
#include "common.h"

#define SERVER_ID "spiffe://cluster.local/ns/test/sa/server"
#define CLIENT_ID "spiffe://cluster.local/ns/test/sa/client"
#define OTHER_ID "spiffe://cluster.local/ns/test/sa/other"
#define MAX_TUNNELS 8

struct server_state {
    pthread_mutex_t mu;
    int accepted;
    int refused;
    char last_peer[256];
    char last_authority[256];
    pthread_t echoes[MAX_TUNNELS];
};

static int on_accept(void *user_data, const char *peer, const char *authority, int fd) {
    struct server_state *s = user_data;
    pthread_mutex_lock(&s->mu);
    snprintf(s->last_peer, sizeof s->last_peer, "%s", peer);
    snprintf(s->last_authority, sizeof s->last_authority, "%s", authority);
    int verdict = 0;
    if (strcmp(authority, "127.0.0.1:1") == 0) {
        verdict = 401; /* "denied by policy" */
    } else if (strcmp(peer, CLIENT_ID) != 0 || s->accepted == MAX_TUNNELS) {
        verdict = 403;
    } else if (pthread_create(&s->echoes[s->accepted], NULL, echo_thread, (void *)(intptr_t)fd) != 0) {
        verdict = 503;
    } else {
        s->accepted++;
    }
    if (verdict != 0) s->refused++;
    pthread_mutex_unlock(&s->mu);
    return verdict;
}

struct dial_result {
    pthread_mutex_t mu;
    pthread_cond_t cond;
    int done;
    meshwire_status status;
    int fd;
    char error[512];
};

static void on_dialed(void *user_data, meshwire_status status, int fd, const char *error) {
    struct dial_result *r = user_data;
    pthread_mutex_lock(&r->mu);
    r->status = status;
    r->fd = fd;
    snprintf(r->error, sizeof r->error, "%s", error);
    r->done++;
    pthread_cond_signal(&r->cond);
    pthread_mutex_unlock(&r->mu);
}

static void wait_dialed(struct dial_result *r) {
    pthread_mutex_lock(&r->mu);
    while (!r->done) pthread_cond_wait(&r->cond, &r->mu);
    pthread_mutex_unlock(&r->mu);
}

int main(int argc, char **argv) {
    if (argc != 2) FAIL("usage: %s <ca-dir>", argv[0]);
    const char *ca_dir = argv[1];

    CHECK(strlen(meshwire_version()) > 0);
    CHECK(strcmp(meshwire_status_name(MESHWIRE_ERR_REFUSED), "MESHWIRE_ERR_REFUSED") == 0);

    meshwire_context *server_ctx = NULL, *client_ctx = NULL;
    CHECK_OK(meshwire_context_new_local_ca(ca_dir, SERVER_ID, &server_ctx));
    CHECK_OK(meshwire_context_new_local_ca(ca_dir, CLIENT_ID, &client_ctx));
    CHECK(strcmp(meshwire_last_error(), "") == 0);
    const char *identity = NULL;
    CHECK_OK(meshwire_context_identity(client_ctx, &identity));
    CHECK(strcmp(identity, CLIENT_ID) == 0);

    struct server_state state = {.mu = PTHREAD_MUTEX_INITIALIZER};
    meshwire_server *server = NULL;
    CHECK_OK(meshwire_server_start(server_ctx, "127.0.0.1:0", on_accept, &state, &server));
    uint16_t port = 0;
    CHECK_OK(meshwire_server_port(server, &port));
    CHECK(port != 0);
    char peer[64];
    snprintf(peer, sizeof peer, "127.0.0.1:%u", port);

    /* Blocking dial, with a metadata header, 256 KiB each way. */
    const char *expected[] = {SERVER_ID};
    meshwire_header metadata[] = {{"forwarded", "for=\"10.0.0.1:4711\""}};
    int fd = -1;
    CHECK_OK(meshwire_dial(client_ctx, peer, "10.1.2.3:8080", expected, 1, metadata, 1, &fd));
    CHECK(fd >= 0);
    exchange(fd, 256 * 1024, 7);
    pthread_mutex_lock(&state.mu);
    CHECK(strcmp(state.last_peer, CLIENT_ID) == 0);
    CHECK(strcmp(state.last_authority, "10.1.2.3:8080") == 0);
    pthread_mutex_unlock(&state.mu);

    /* Asynchronous dial; the server's identity is one of two accepted. */
    const char *either[] = {OTHER_ID, SERVER_ID};
    struct dial_result r = {.mu = PTHREAD_MUTEX_INITIALIZER, .cond = PTHREAD_COND_INITIALIZER, .fd = -1};
    CHECK_OK(meshwire_dial_async(client_ctx, peer, "svc.example.svc.cluster.local:80", either, 2, NULL, 0,
                                 on_dialed, &r));
    wait_dialed(&r);
    if (r.status != MESHWIRE_OK) FAIL("async dial: %s: %s", meshwire_status_name(r.status), r.error);
    exchange(r.fd, 4096, 11);
    pthread_mutex_lock(&state.mu);
    CHECK(strcmp(state.last_authority, "svc.example.svc.cluster.local:80") == 0);
    pthread_mutex_unlock(&state.mu);

    /* A server that is not who we expect. */
    const char *other[] = {OTHER_ID};
    fd = -1;
    CHECK_STATUS(meshwire_dial(client_ctx, peer, "10.1.2.3:8080", other, 1, NULL, 0, &fd), MESHWIRE_ERR_PEER_IDENTITY);
    CHECK_ERROR_MENTIONS(OTHER_ID);
    CHECK_ERROR_MENTIONS(SERVER_ID);
    CHECK(fd == -1);

    /* A tunnel the callback refuses, blocking and asynchronous. */
    CHECK_STATUS(meshwire_dial(client_ctx, peer, "127.0.0.1:1", expected, 1, NULL, 0, &fd), MESHWIRE_ERR_REFUSED);
    CHECK_ERROR_MENTIONS("401");
    struct dial_result refused = {.mu = PTHREAD_MUTEX_INITIALIZER, .cond = PTHREAD_COND_INITIALIZER};
    CHECK_OK(meshwire_dial_async(client_ctx, peer, "127.0.0.1:1", expected, 1, NULL, 0, on_dialed, &refused));
    wait_dialed(&refused);
    CHECK(refused.status == MESHWIRE_ERR_REFUSED && refused.fd == -1 && strstr(refused.error, "401") != NULL);

    /* Bad arguments. */
    CHECK_STATUS(meshwire_dial(NULL, peer, "10.1.2.3:8080", expected, 1, NULL, 0, &fd), MESHWIRE_ERR_NULL_ARGUMENT);
    CHECK_ERROR_MENTIONS("context");
    CHECK_STATUS(meshwire_dial(client_ctx, "not-an-address", "10.1.2.3:8080", expected, 1, NULL, 0, &fd),
                 MESHWIRE_ERR_INVALID_ARGUMENT);
    CHECK_ERROR_MENTIONS("not-an-address");
    CHECK_STATUS(meshwire_dial(client_ctx, peer, "10.1.2.3", expected, 1, NULL, 0, &fd), MESHWIRE_ERR_INVALID_ARGUMENT);
    CHECK_ERROR_MENTIONS("authority");
    const char *not_spiffe[] = {"web"};
    CHECK_STATUS(meshwire_dial(client_ctx, peer, "10.1.2.3:8080", not_spiffe, 1, NULL, 0, &fd),
                 MESHWIRE_ERR_INVALID_ARGUMENT);
    CHECK_STATUS(meshwire_dial_async(client_ctx, peer, "10.1.2.3:8080", expected, 1, NULL, 0, NULL, NULL),
                 MESHWIRE_ERR_NULL_ARGUMENT);
    CHECK_STATUS(meshwire_server_start(server_ctx, "127.0.0.1", on_accept, &state, &server), MESHWIRE_ERR_INVALID_ARGUMENT);
    CHECK_STATUS(meshwire_context_new_local_ca(ca_dir, "spiffe://cluster.local/ns/test/sa/x", NULL),
                 MESHWIRE_ERR_NULL_ARGUMENT);
    CHECK(fd == -1);

    meshwire_server_free(server);
    pthread_mutex_lock(&state.mu);
    CHECK(state.accepted == 2);
    CHECK(state.refused == 2);
    for (int i = 0; i < state.accepted; i++) CHECK(pthread_join(state.echoes[i], NULL) == 0);
    pthread_mutex_unlock(&state.mu);

    /* The server is gone: nothing listens on its port any more. */
    CHECK_STATUS(meshwire_dial(client_ctx, peer, "10.1.2.3:8080", expected, 1, NULL, 0, &fd), MESHWIRE_ERR_CONNECT);

    meshwire_context_free(client_ctx);
    meshwire_context_free(server_ctx);
    meshwire_context_free(NULL);
    meshwire_server_free(NULL);
    printf("roundtrip: ok\n");
    return 0;
}
