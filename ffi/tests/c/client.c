/* A C client: dials through HBONE with a local-CA identity, sends bytes, checks the echo.
 *
 * Usage: client <ca-dir> <client-spiffe-id> <peer-address> <authority> <expected-server-spiffe-id> */
#include "common.h"

int main(int argc, char **argv) {
    if (argc != 6) FAIL("usage: %s <ca-dir> <client-id> <peer-address> <authority> <expected-server-id>", argv[0]);
    meshwire_context *ctx = NULL;
    CHECK_OK(meshwire_context_new_local_ca(argv[1], argv[2], &ctx));
    const char *expected[] = {argv[5]};
    meshwire_header metadata[] = {{"baggage", "k8s.namespace.name=test"}};
    int fd = -1;
    CHECK_OK(meshwire_dial(ctx, argv[3], argv[4], expected, 1, metadata, 1, &fd));
    exchange(fd, 100000, 3);
    meshwire_context_free(ctx);
    printf("client: ok\n");
    return 0;
}
