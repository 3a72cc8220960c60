/* The MTA side of the milter protocol as a load generator, in C, for
 * bench/milter_bench.py.
 *
 *     milter_load SPEC SESSIONS CONCURRENCY > RESULTS
 *
 * Why C: the MTAs that talk to a milter (Postfix's milter8.c, Sendmail's
 * own client) are C.  The Python client (milter_client.py) spends 0.25 ms
 * of CPU per message, which on a small machine is taken from the milter it
 * measures, and more from a faster milter than from a slower one.  This
 * one does what milter_client.MilterClient does, packet for packet (one
 * write per packet, as milter8.c flushes each command), for 0.13 ms (most
 * of it the kernel's: waking the milter's thread for each packet).
 *
 * SPEC is libmilter's socket syntax (unix:PATH, inet:PORT@HOST,
 * inet6:PORT@HOST).  SESSIONS is the file milter_bench.py writes: a u32
 * session count, then for each session a u32 step count and its steps,
 * each a u8 kind, a u32 length and the packet's command octet and data
 * (all integers little-endian).  A MACRO step is always sent and never
 * answered; the others are skipped or sent without waiting for a reply as
 * the milter's negotiated protocol says (SMFIP_NO* and SMFIP_NR_*), as
 * milter8.c does.  A HEADER step's value keeps its leading space only when
 * SMFIP_HDR_LEADSPC was negotiated.  A BODY step after a SKIP reply is
 * not sent.
 *
 * Output: "elapsed SECONDS", then one line per session:
 * "INDEX STAGE COMMAND CODE LATENCY_NS", STAGE being mail, rcpt or eom
 * (the step whose reply decided), COMMAND the reply's command octet and
 * CODE the first octet of its data (a reply code's class) or "-"; or
 * "INDEX error - - LATENCY_NS" for a session that failed.  A CONTINUE at
 * MAIL or RCPT goes on; at end of message it is reported as it is.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

enum kind { MACRO, CONNECT, HELO, MAIL, RCPT, HEADER, EOH, BODY, EOM, KINDS };

/* mfdef.h: the step's "do not send" and "no reply" protocol bits. */
static const uint32_t skip_bit[KINDS] = {0, 0x1, 0x2, 0x4, 0x8, 0x20, 0x40, 0x10, 0};
static const uint32_t no_reply_bit[KINDS] = {0, 0x1000, 0x2000, 0x4000, 0x8000, 0x80,
                                             0x40000, 0x80000, 0};
static const char *stage_name[KINDS] = {0, 0, 0, "mail", "rcpt", 0, 0, 0, "eom"};
#define HDR_LEADSPC 0x100000u
#define MAX_PACKET (2 * 65535)

struct step { uint8_t kind; uint32_t length; const uint8_t *data; };
struct session { uint32_t count; struct step *steps; };
struct result { const char *stage; char command; char code; int error; long long ns; };

static struct session *sessions;
static struct result *results;
static uint32_t session_count;
static atomic_uint next_session;
static const char *spec;

struct conn { int fd; uint8_t buffer[65536]; size_t start, end; };

static void die(const char *what) { perror(what); exit(2); }

static const char *spec_path;              /* unix: and local: */
static struct sockaddr_storage spec_address; /* inet: and inet6: */
static socklen_t spec_size;
static int spec_family;
static atomic_int failure_told;

/* libmilter's socket syntax, checked once, before any session. */
static void parse_spec(void)
{
    const char *colon = strchr(spec, ':');
    if (colon == NULL) goto bad;
    if (strncmp(spec, "unix:", 5) == 0 || strncmp(spec, "local:", 6) == 0) {
        spec_path = colon + 1;
        if (strlen(spec_path) >= sizeof ((struct sockaddr_un *) 0)->sun_path) goto bad;
        spec_family = AF_UNIX;
        return;
    }
    int inet6 = strncmp(spec, "inet6:", 6) == 0;
    if (!inet6 && strncmp(spec, "inet:", 5) != 0) goto bad;
    const char *host = strchr(colon + 1, '@');
    char name[256];
    if (host == NULL) goto bad;
    int port = atoi(colon + 1);
    if (port <= 0 || port > 65535) goto bad;
    snprintf(name, sizeof name, "%s", host + 1);
    if (name[0] == '[') {
        memmove(name, name + 1, strlen(name));
        name[strcspn(name, "]")] = 0;
    }
    if (inet6) {
        struct sockaddr_in6 *a = (struct sockaddr_in6 *) &spec_address;
        a->sin6_family = AF_INET6;
        a->sin6_port = htons(port);
        if (inet_pton(AF_INET6, name, &a->sin6_addr) != 1) goto bad;
        spec_size = sizeof *a;
    } else {
        struct sockaddr_in *a = (struct sockaddr_in *) &spec_address;
        a->sin_family = AF_INET;
        a->sin_port = htons(port);
        if (inet_pton(AF_INET, name, &a->sin_addr) != 1) goto bad;
        spec_size = sizeof *a;
    }
    spec_family = inet6 ? AF_INET6 : AF_INET;
    return;
bad:
    fprintf(stderr, "milter_load: %s: not unix:PATH, local:PATH, inet:PORT@ADDRESS or "
                    "inet6:PORT@ADDRESS (an address, not a name)\n", spec);
    exit(2);
}

/* The first failure of a run is said on stderr; the rest are counted. */
static void tell_failure(const char *what)
{
    int error = errno;
    if (atomic_exchange(&failure_told, 1) == 0)
        fprintf(stderr, "milter_load: %s: %s: %s\n", spec, what,
                error ? strerror(error) : "connection closed by the milter");
}

static int connect_to(void)
{
    int fd = socket(spec_family, SOCK_STREAM, 0);
    if (fd < 0) {
        tell_failure("socket");
        return -1;
    }
    /* Before connect: a milter whose backlog is full must not hang us. */
    struct timeval timeout = {.tv_sec = 30};
    int one = 1;   /* as Postfix: no Nagle delay on small writes */
    if (setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, sizeof timeout) < 0
        || setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &timeout, sizeof timeout) < 0
        || (spec_family != AF_UNIX
            && setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one) < 0)) {
        tell_failure("setsockopt");
        close(fd);
        return -1;
    }
    int connected;
    if (spec_family == AF_UNIX) {
        struct sockaddr_un address = {.sun_family = AF_UNIX};
        strcpy(address.sun_path, spec_path);   /* length checked by parse_spec */
        connected = connect(fd, (struct sockaddr *) &address, sizeof address);
    } else {
        connected = connect(fd, (struct sockaddr *) &spec_address, spec_size);
    }
    if (connected < 0) {
        tell_failure("connect");
        close(fd);
        return -1;
    }
    return fd;
}

static int send_packet(int fd, uint8_t command, const uint8_t *data, uint32_t length)
{
    uint8_t head[5];
    uint32_t size = htonl(length + 1);
    memcpy(head, &size, 4);
    head[4] = command;
    struct iovec parts[2] = {{head, 5}, {(void *) data, length}};
    struct msghdr message = {.msg_iov = parts, .msg_iovlen = length ? 2 : 1};
    size_t left = 5 + length;
    while (left > 0) {
        ssize_t sent = sendmsg(fd, &message, MSG_NOSIGNAL);
        if (sent < 0) {
            if (errno == EINTR) continue;
            return -1;
        }
        left -= sent;
        while (message.msg_iovlen && (size_t) sent >= message.msg_iov->iov_len) {
            sent -= message.msg_iov->iov_len;
            message.msg_iov++;
            message.msg_iovlen--;
        }
        if (message.msg_iovlen) {
            message.msg_iov->iov_base = (uint8_t *) message.msg_iov->iov_base + sent;
            message.msg_iov->iov_len -= sent;
        }
    }
    return 0;
}

static int read_exactly(struct conn *c, uint8_t *out, size_t count)
{
    while (count > 0) {
        if (c->start == c->end) {
            ssize_t got = read(c->fd, c->buffer, sizeof c->buffer);
            if (got < 0 && errno == EINTR) continue;
            if (got == 0) errno = 0;   /* closed by the milter */
            if (got <= 0) return -1;
            c->start = 0;
            c->end = got;
        }
        size_t take = c->end - c->start < count ? c->end - c->start : count;
        if (out != NULL) {
            memcpy(out, c->buffer + c->start, take);
            out += take;
        }
        c->start += take;
        count -= take;
    }
    return 0;
}

/* One packet: its command, and the first octet of its data (0 if none);
 * the rest is read and dropped. */
static int read_packet(struct conn *c, uint8_t *command, uint8_t *first)
{
    uint32_t length;
    if (read_exactly(c, (uint8_t *) &length, 4) < 0) return -1;
    length = ntohl(length);
    if (length < 1 || length > MAX_PACKET || read_exactly(c, command, 1) < 0) return -1;
    *first = 0;
    if (length > 1 && read_exactly(c, first, 1) < 0) return -1;
    return length > 2 ? read_exactly(c, NULL, length - 2) : 0;
}

/* Modifications and progress up to a final reply (milter_client.reply). */
static int read_reply(struct conn *c, uint8_t *command, uint8_t *first)
{
    for (;;) {
        if (read_packet(c, command, first) < 0) return -1;
        if (strchr("acdrtys", *command) != NULL && *command != 0) return 0;
    }
}

static int negotiate(struct conn *c, uint32_t *protocol)
{
    uint32_t offer[3] = {htonl(6), htonl(0x1FF), htonl(0x1FFFFF)};
    uint32_t length;
    uint8_t reply[MAX_PACKET];
    if (send_packet(c->fd, 'O', (uint8_t *) offer, sizeof offer) < 0
        || read_exactly(c, (uint8_t *) &length, 4) < 0)
        return -1;
    length = ntohl(length);
    if (length < 13 || length > MAX_PACKET || read_exactly(c, reply, length) < 0
        || reply[0] != 'O')
        return -1;
    memcpy(protocol, reply + 9, 4);
    *protocol = ntohl(*protocol);
    return 0;
}

static int run_session(const struct session *s, struct result *r)
{
    struct conn *c = malloc(sizeof *c);
    uint32_t protocol;
    int skipping_body = 0, status = -1;
    if (c == NULL) return -1;
    c->start = c->end = 0;
    c->fd = connect_to();
    if (c->fd < 0) goto done;
    if (negotiate(c, &protocol) < 0) {
        tell_failure("option negotiation");
        goto done;
    }
    r->stage = NULL;
    for (uint32_t i = 0; i < s->count; i++) {
        const struct step *step = &s->steps[i];
        const uint8_t *data = step->data + 1;
        uint32_t length = step->length - 1;
        if (step->kind != MACRO && (protocol & skip_bit[step->kind]))
            continue;
        if (step->kind == BODY && skipping_body)
            continue;
        uint8_t *edited = NULL;
        if (step->kind == HEADER && !(protocol & HDR_LEADSPC)) {
            size_t name = strnlen((const char *) data, length) + 1;
            if (name < length && data[name] == ' ') {
                edited = malloc(length);
                if (edited == NULL) goto done;
                memcpy(edited, data, name);
                memcpy(edited + name, data + name + 1, length - name - 1);
                data = edited;
                length--;
            }
        }
        int sent = send_packet(c->fd, step->data[0], data, length);
        free(edited);
        if (sent < 0) {
            tell_failure("write");
            goto done;
        }
        if (step->kind == MACRO || (protocol & no_reply_bit[step->kind]))
            continue;
        uint8_t command, first;
        if (read_reply(c, &command, &first) < 0) {
            tell_failure("read");
            goto done;
        }
        if (step->kind == BODY && command == 's')
            skipping_body = 1;
        /* As milter_bench.run_session: only MAIL, RCPT and end of message
         * decide; a CONTINUE before the end goes on. */
        if (stage_name[step->kind] != NULL && (command != 'c' || step->kind == EOM)) {
            r->stage = stage_name[step->kind];
            r->command = command;
            r->code = first;
            break;
        }
    }
    if (r->stage != NULL) {
        send_packet(c->fd, 'Q', NULL, 0);
        status = 0;
    }
done:
    if (c->fd >= 0) close(c->fd);
    free(c);
    return status;
}

static void *worker(void *unused)
{
    (void) unused;
    for (;;) {
        unsigned index = atomic_fetch_add(&next_session, 1);
        if (index >= session_count) return NULL;
        struct timespec start, end;
        clock_gettime(CLOCK_MONOTONIC, &start);
        results[index].error = run_session(&sessions[index], &results[index]) < 0;
        clock_gettime(CLOCK_MONOTONIC, &end);
        results[index].ns = (end.tv_sec - start.tv_sec) * 1000000000LL
                            + (end.tv_nsec - start.tv_nsec);
    }
}

static uint32_t take_u32(const uint8_t **at, const uint8_t *end)
{
    if (end - *at < 4) {
        fprintf(stderr, "milter_load: the sessions file is cut short\n");
        exit(2);
    }
    uint32_t value = (*at)[0] | (*at)[1] << 8 | (*at)[2] << 16 | (uint32_t) (*at)[3] << 24;
    *at += 4;
    return value;
}

static void load(const char *path)
{
    FILE *stream = fopen(path, "rb");
    if (stream == NULL) die(path);
    fseek(stream, 0, SEEK_END);
    long size = ftell(stream);
    rewind(stream);
    uint8_t *content = malloc(size);
    if (content == NULL || fread(content, 1, size, stream) != (size_t) size) die(path);
    fclose(stream);
    const uint8_t *at = content, *end = content + size;
    session_count = take_u32(&at, end);
    sessions = calloc(session_count, sizeof *sessions);
    results = calloc(session_count, sizeof *results);
    if (sessions == NULL || results == NULL) die("calloc");
    for (uint32_t i = 0; i < session_count; i++) {
        sessions[i].count = take_u32(&at, end);
        sessions[i].steps = calloc(sessions[i].count, sizeof *sessions[i].steps);
        if (sessions[i].steps == NULL) die("calloc");
        for (uint32_t j = 0; j < sessions[i].count; j++) {
            struct step *step = &sessions[i].steps[j];
            if (at >= end) {
                fprintf(stderr, "milter_load: the sessions file is cut short\n");
                exit(2);
            }
            step->kind = *at++;
            step->length = take_u32(&at, end);
            if (step->kind >= KINDS || step->length < 1 || step->length > MAX_PACKET
                || (size_t) (end - at) < step->length) {
                fprintf(stderr, "milter_load: bad step %u of session %u\n", j, i);
                exit(2);
            }
            step->data = at;
            at += step->length;
        }
    }
}

int main(int argc, char **argv)
{
    if (argc != 4) {
        fprintf(stderr, "usage: milter_load SPEC SESSIONS CONCURRENCY\n");
        return 2;
    }
    spec = argv[1];
    parse_spec();
    load(argv[2]);
    int concurrency = atoi(argv[3]);
    if (concurrency < 1) concurrency = 1;
    pthread_t *threads = calloc(concurrency, sizeof *threads);
    struct timespec start, end;
    clock_gettime(CLOCK_MONOTONIC, &start);
    for (int i = 0; i < concurrency; i++)
        if (pthread_create(&threads[i], NULL, worker, NULL) != 0) die("pthread_create");
    for (int i = 0; i < concurrency; i++)
        pthread_join(threads[i], NULL);
    clock_gettime(CLOCK_MONOTONIC, &end);
    free(threads);
    printf("elapsed %.6f\n", (end.tv_sec - start.tv_sec) + (end.tv_nsec - start.tv_nsec) / 1e9);
    for (uint32_t i = 0; i < session_count; i++) {
        const struct result *r = &results[i];
        if (r->error)
            printf("%u error - - %lld\n", i, r->ns);
        else if (r->code >= 0x21 && r->code < 0x7F)
            printf("%u %s %c %c %lld\n", i, r->stage, r->command, r->code, r->ns);
        else
            printf("%u %s %c - %lld\n", i, r->stage, r->command, r->ns);
    }
    return 0;
}
