/* meshd-loadgen: many player connections from one small process (`meshd bots --engine native`).
 *
 * The same bots as meshd/_bots.py (log in, a `move` input ten times a second
 * following a scenario, a ping every second, read every view), written in C
 * so that a load test of N players measures the server, not the Python
 * decoding of N clients on the same cores. One thread, one epoll set.
 *
 * It reads views exactly as docs/protocol.md describes them: it walks every
 * CBOR item (it keeps only the tick, its own entity's position and whether
 * its own entity is in view), so a malformed frame ends that bot with a
 * "bad frame" disconnect.
 *
 * usage: meshd-loadgen HOST PORT COUNT DURATION SCENARIO TARGET_X TARGET_Y NAME_PREFIX
 * prints one JSON summary with the keys of `meshd bots --json`.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <netdb.h>
#include <netinet/tcp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define MAX_FRAME (16u << 20)
#define MOVE_EVERY 0.1
#define PING_EVERY 1.0
#define TURN_EVERY 10.0
#define CROWD_RADIUS 25.0
#define LOGINS_IN_FLIGHT 50
#define MAX_RTTS 64

enum phase { IDLE, LOGGING_IN, READY, PLAYING, DONE };
enum scenario { WANDER, RUSH, CROSS, CROWD };

typedef struct {
    int fd;
    enum phase phase;
    int connected;
    char reason[96];
    uint8_t *buf;
    size_t len, cap;
    uint8_t out[256];
    size_t out_len;
    uint64_t entity, seq, last_tick, views, gaps, missing_self;
    int has_tick, self_in_view, knows_self;
    double x, y, hx, hy;
    double next_move, next_ping, first_view, last_view;
    uint64_t ping_id;
    double ping_sent;
    double rtts[MAX_RTTS];
    int n_rtts;
    uint64_t rng;
} Bot;

static double world_size = 1000.0;
static enum scenario scenario;
static double target_x, target_y, run_started, duration;

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec / 1e9;
}

static double uniform(Bot *b) { /* xorshift64*: a bot's own reproducible dice */
    b->rng ^= b->rng >> 12;
    b->rng ^= b->rng << 25;
    b->rng ^= b->rng >> 27;
    return (double)((b->rng * 2685821657736338717ULL) >> 11) / 9007199254740992.0;
}

/* -- CBOR writing: just the heads and values the client messages need -- */

static size_t put_head(uint8_t *p, int major, uint64_t value) {
    uint8_t m = (uint8_t)(major << 5);
    if (value < 24) { p[0] = m | (uint8_t)value; return 1; }
    if (value < 0x100) { p[0] = m | 24; p[1] = (uint8_t)value; return 2; }
    if (value < 0x10000) { p[0] = m | 25; p[1] = value >> 8; p[2] = (uint8_t)value; return 3; }
    if (value < 0x100000000ULL) {
        p[0] = m | 26;
        for (int i = 0; i < 4; i++) p[1 + i] = (uint8_t)(value >> (24 - 8 * i));
        return 5;
    }
    p[0] = m | 27;
    for (int i = 0; i < 8; i++) p[1 + i] = (uint8_t)(value >> (56 - 8 * i));
    return 9;
}

static size_t put_text(uint8_t *p, const char *s) {
    size_t n = strlen(s), h = put_head(p, 3, n);
    memcpy(p + h, s, n);
    return h + n;
}

static size_t put_double(uint8_t *p, double v) {
    uint64_t bits;
    memcpy(&bits, &v, 8);
    p[0] = 0xfb;
    for (int i = 0; i < 8; i++) p[1 + i] = (uint8_t)(bits >> (56 - 8 * i));
    return 9;
}

/* Frame the body written at out+4 (n bytes) and queue it; 0 if the socket would not take it all. */
static int send_frame(Bot *b, uint8_t *out, size_t n) {
    out[0] = n >> 24; out[1] = n >> 16; out[2] = n >> 8; out[3] = (uint8_t)n;
    ssize_t sent = send(b->fd, out, n + 4, MSG_NOSIGNAL);
    if (sent == (ssize_t)(n + 4)) return 1;
    snprintf(b->reason, sizeof b->reason, "send: %s", sent < 0 ? strerror(errno) : "short write");
    return 0;
}

static int send_login(Bot *b, const char *name, const char *secret) {
    uint8_t out[256], *p = out + 4;
    p += put_head(p, 5, 4);
    p += put_text(p, "version"); p += put_head(p, 0, 1);
    p += put_text(p, "name"); p += put_text(p, name);
    p += put_text(p, "secret"); p += put_text(p, secret);
    p += put_text(p, "type"); p += put_text(p, "Login");
    return send_frame(b, out, (size_t)(p - out - 4));
}

static int send_move(Bot *b, double dx, double dy) {
    uint8_t out[128], *p = out + 4;
    p += put_head(p, 5, 4);
    p += put_text(p, "seq"); p += put_head(p, 0, ++b->seq);
    p += put_text(p, "action"); p += put_text(p, "move");
    p += put_text(p, "args"); p += put_head(p, 5, 2);
    p += put_text(p, "dx"); p += put_double(p, dx);
    p += put_text(p, "dy"); p += put_double(p, dy);
    p += put_text(p, "type"); p += put_text(p, "Input");
    return send_frame(b, out, (size_t)(p - out - 4));
}

static int send_ping(Bot *b) {
    uint8_t out[64], *p = out + 4;
    b->ping_id = ++b->seq;
    b->ping_sent = now();
    p += put_head(p, 5, 2);
    p += put_text(p, "id"); p += put_head(p, 0, b->ping_id);
    p += put_text(p, "type"); p += put_text(p, "Ping");
    return send_frame(b, out, (size_t)(p - out - 4));
}

/* -- CBOR reading -------------------------------------------------------- */

typedef struct {
    const uint8_t *p, *end;
    int ok;
} Reader;

/* The head of the next item: its major type, and its argument in *value. */
static int head(Reader *r, uint64_t *value) {
    if (!r->ok || r->p >= r->end) return r->ok = 0, -1;
    uint8_t first = *r->p++;
    int major = first >> 5, info = first & 31, size;
    if (info < 24) { *value = (uint64_t)info; return major; }
    if (info == 24) size = 1;
    else if (info == 25) size = 2;
    else if (info == 26) size = 4;
    else if (info == 27) size = 8;
    else return r->ok = 0, -1; /* indefinite lengths are not allowed */
    if (r->end - r->p < size) return r->ok = 0, -1;
    uint64_t v = 0;
    for (int i = 0; i < size; i++) v = (v << 8) | *r->p++;
    *value = v;
    return major;
}

static double half_to_double(uint16_t h) {
    int exponent = (h >> 10) & 31, mantissa = h & 1023;
    double v = exponent == 0 ? ldexp(mantissa, -24)
             : exponent == 31 ? (mantissa ? NAN : INFINITY)
             : ldexp(mantissa + 1024, exponent - 25);
    return (h & 0x8000) ? -v : v;
}

/* A number item (int or float) as a double. */
static double number(Reader *r) {
    if (!r->ok || r->p >= r->end) return r->ok = 0, 0.0;
    uint8_t first = *r->p;
    uint64_t v;
    if (first == 0xf9 || first == 0xfa || first == 0xfb) {
        int size = first == 0xf9 ? 2 : first == 0xfa ? 4 : 8;
        if (r->end - r->p < 1 + size) return r->ok = 0, 0.0;
        uint64_t bits = 0;
        for (int i = 1; i <= size; i++) bits = (bits << 8) | r->p[i];
        r->p += 1 + size;
        if (size == 2) return half_to_double((uint16_t)bits);
        if (size == 4) { uint32_t b32 = (uint32_t)bits; float f; memcpy(&f, &b32, 4); return f; }
        double d;
        memcpy(&d, &bits, 8);
        return d;
    }
    int major = head(r, &v);
    if (major == 0) return (double)v;
    if (major == 1) return -1.0 - (double)v;
    return r->ok = 0, 0.0;
}

static void skip(Reader *r, int depth) {
    uint64_t v;
    if (depth > 32) { r->ok = 0; return; }
    int major = head(r, &v);
    if (major == 2 || major == 3) {
        if ((uint64_t)(r->end - r->p) < v) { r->ok = 0; return; }
        r->p += v;
    } else if (major == 4) {
        for (uint64_t i = 0; i < v && r->ok; i++) skip(r, depth + 1);
    } else if (major == 5) {
        for (uint64_t i = 0; i < 2 * v && r->ok; i++) skip(r, depth + 1);
    } else if (major == 6) {
        r->ok = 0; /* no tags on this protocol */
    }
}

/* A text item, compared with `want`; the text (not NUL-terminated) in *s, *n. */
static int text(Reader *r, const char **s, size_t *n) {
    uint64_t v;
    if (head(r, &v) != 3 || (uint64_t)(r->end - r->p) < v) return r->ok = 0, 0;
    *s = (const char *)r->p;
    *n = (size_t)v;
    r->p += v;
    return 1;
}

static int is(const char *s, size_t n, const char *want) {
    return n == strlen(want) && memcmp(s, want, n) == 0;
}

/* One [id, kind, x, y, z, state] or [id, x, y, z] item; if it is us, note where we are. */
static void entity_item(Reader *r, Bot *b, int *saw_self) {
    uint64_t items, id;
    if (head(r, &items) != 4 || (items != 6 && items != 4) || head(r, &id) != 0) {
        r->ok = 0;
        return;
    }
    if (items == 6) skip(r, 1);
    double x = number(r), y = number(r);
    for (uint64_t i = items == 6 ? 4 : 3; i < items; i++) skip(r, 1); /* z, state */
    if (id == b->entity) {
        b->x = x, b->y = y, b->knows_self = 1, *saw_self = 1;
    }
}

/* -- scenarios (the same as meshd/_bots.py) -------------------------------- */

static void steer(Bot *b) {
    enum scenario s = scenario;
    double size = world_size, elapsed = now() - run_started;
    if (!b->knows_self) { b->hx = b->hy = 0.0; return; }
    if (s == CROWD) {
        double tx = target_x * size - b->x, ty = target_y * size - b->y;
        if (b->entity % 2 == 0 && hypot(tx, ty) > CROWD_RADIUS * 0.8) {
            b->hx = tx, b->hy = ty;
            return;
        }
        s = WANDER;
    }
    if (s == WANDER) {
        int moving = b->hx != 0.0 || b->hy != 0.0;
        if (moving && uniform(b) >= MOVE_EVERY / TURN_EVERY) return;
        double angle = uniform(b) * 2 * M_PI;
        b->hx = cos(angle), b->hy = sin(angle);
    } else if (s == RUSH) {
        double tx = target_x * size - b->x, ty = target_y * size - b->y;
        if (elapsed < duration / 2) {
            int far = hypot(tx, ty) > 3.0;
            b->hx = far ? tx : 0.0, b->hy = far ? ty : 0.0;
        } else {
            b->hx = -tx + uniform(b) * 2 - 1, b->hy = -ty + uniform(b) * 2 - 1;
        }
    } else { /* cross: east until 70% of the world, then west until 30%, and again */
        int east = b->hx >= 0;
        if (east && b->x > 0.7 * size) east = 0;
        else if (!east && b->x < 0.3 * size) east = 1;
        b->hx = east ? 1.0 : -1.0, b->hy = 0.0;
    }
}

/* -- frames from the server -------------------------------------------------- */

static void fail(Bot *b, const char *reason) {
    if (b->phase != DONE) {
        if (!b->reason[0]) snprintf(b->reason, sizeof b->reason, "%s", reason);
        b->phase = DONE;
        close(b->fd);
    }
}

static void on_frame(Bot *b, const uint8_t *body, size_t n, double t) {
    Reader r = {body, body + n, 1};
    uint64_t pairs, v;
    const char *key, *type = "";
    size_t key_n, type_n = 0;
    uint64_t tick = 0, player = 0, pong = 0;
    char code[48] = "", message[160] = "";
    int saw_self = 0;
    if (head(&r, &pairs) != 5) { fail(b, "bad frame: not a map"); return; }
    int left = 0;
    for (uint64_t i = 0; i < pairs && r.ok; i++) {
        if (!text(&r, &key, &key_n)) break;
        if (is(key, key_n, "type")) {
            text(&r, &type, &type_n);
        } else if (is(key, key_n, "tick") || is(key, key_n, "player") || is(key, key_n, "id")) {
            if (head(&r, &v) != 0) { r.ok = 0; break; }
            if (key_n == 4) tick = v; else if (key_n == 6) player = v; else pong = v;
        } else if (is(key, key_n, "world_size")) {
            world_size = number(&r);
        } else if (is(key, key_n, "enter") || is(key, key_n, "update")) {
            if (head(&r, &v) != 4) { r.ok = 0; break; }
            for (uint64_t j = 0; j < v && r.ok; j++) entity_item(&r, b, &saw_self);
        } else if (is(key, key_n, "leave")) {
            if (head(&r, &v) != 4) { r.ok = 0; break; }
            for (uint64_t j = 0, id; j < v && r.ok; j++) {
                if (head(&r, &id) != 0) r.ok = 0;
                else if (id == b->entity) left = 1;
            }
        } else if (is(key, key_n, "code") || is(key, key_n, "message")) {
            const char *s;
            size_t sn;
            if (!text(&r, &s, &sn)) break;
            char *into = key_n == 4 ? code : message;
            size_t cap = key_n == 4 ? sizeof code : sizeof message;
            snprintf(into, cap, "%.*s", (int)sn, s);
        } else {
            skip(&r, 1);
        }
    }
    if (!r.ok || r.p != r.end) { fail(b, "bad frame: malformed CBOR"); return; }
    if (is(type, type_n, "View")) {
        if (b->views == 0) b->first_view = t;
        b->views++;
        b->last_view = t;
        if (b->has_tick && tick != b->last_tick + 1) b->gaps++;
        b->has_tick = 1, b->last_tick = tick;
        if (saw_self) b->self_in_view = 1;
        if (left) b->self_in_view = 0;
        if (!b->self_in_view) b->missing_self++;
    } else if (is(type, type_n, "Pong")) {
        if (pong == b->ping_id && b->ping_sent > 0 && b->n_rtts < MAX_RTTS) {
            b->rtts[b->n_rtts++] = (t - b->ping_sent) * 1000.0;
            b->ping_sent = 0;
        }
    } else if (is(type, type_n, "Welcome")) {
        b->entity = player;
        b->phase = READY;
        b->connected = 1;
    } else if (is(type, type_n, "Error")) {
        char reason[sizeof b->reason];
        snprintf(reason, sizeof reason, "%s: %.*s", code, (int)(sizeof reason / 2), message);
        fail(b, reason);
    }
}

static void on_readable(Bot *b) {
    for (;;) {
        if (b->cap - b->len < 65536) {
            b->cap = b->cap ? b->cap * 2 : 131072;
            b->buf = realloc(b->buf, b->cap);
        }
        ssize_t got = recv(b->fd, b->buf + b->len, b->cap - b->len, 0);
        if (got == 0) { fail(b, "the server closed the connection"); return; }
        if (got < 0) {
            if (errno == EAGAIN || errno == EWOULDBLOCK) break;
            fail(b, strerror(errno));
            return;
        }
        b->len += (size_t)got;
    }
    double t = now();
    size_t at = 0;
    while (b->phase != DONE && b->len - at >= 4) {
        const uint8_t *h = b->buf + at;
        uint32_t n = (uint32_t)h[0] << 24 | h[1] << 16 | h[2] << 8 | h[3];
        if (n > MAX_FRAME) { fail(b, "bad frame: too large"); return; }
        if (b->len - at < 4 + (size_t)n) break;
        on_frame(b, h + 4, n, t);
        at += 4 + (size_t)n;
    }
    if (b->phase == DONE) return;
    memmove(b->buf, b->buf + at, b->len - at);
    b->len -= at;
    if (b->cap > (1u << 20) && b->len < 65536) { /* a burst passed: give the memory back */
        b->cap = 131072;
        b->buf = realloc(b->buf, b->cap);
    }
}

static int open_connection(Bot *b, const struct sockaddr_in *addr, int epoll_fd, uint32_t i) {
    b->fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
    int one = 1;
    setsockopt(b->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    if (connect(b->fd, (const struct sockaddr *)addr, sizeof *addr) < 0 && errno != EINPROGRESS) {
        snprintf(b->reason, sizeof b->reason, "login: %.80s", strerror(errno));
        close(b->fd);
        return 0;
    }
    struct epoll_event ev = {.events = EPOLLIN | EPOLLOUT | EPOLLRDHUP, .data.u32 = i};
    epoll_ctl(epoll_fd, EPOLL_CTL_ADD, b->fd, &ev);
    return 1;
}

static int by_value(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

int main(int argc, char **argv) {
    if (argc != 9) {
        fprintf(stderr, "usage: %s HOST PORT COUNT DURATION SCENARIO TARGET_X TARGET_Y PREFIX\n",
                argv[0]);
        return 2;
    }
    const char *names[] = {"wander", "rush", "cross", "crowd"};
    int count = atoi(argv[3]);
    duration = atof(argv[4]);
    scenario = (enum scenario)-1;
    for (int i = 0; i < 4; i++)
        if (strcmp(argv[5], names[i]) == 0) scenario = (enum scenario)i;
    target_x = atof(argv[6]), target_y = atof(argv[7]);
    const char *prefix = argv[8];
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons((uint16_t)atoi(argv[2]))};
    if (count < 1 || (int)scenario < 0 || inet_pton(AF_INET, argv[1], &addr.sin_addr) != 1) {
        fprintf(stderr, "meshd-loadgen: bad arguments (HOST must be an IPv4 address)\n");
        return 2;
    }
    Bot *bots = calloc((size_t)count, sizeof *bots);
    int epoll_fd = epoll_create1(0);
    struct epoll_event events[256];
    double connect_started = now();
    int next = 0, in_flight = 0, settled = 0;
    /* Log in a few at a time (the server hashes secrets one by one), then play together. */
    while (settled < count) {
        while (next < count && in_flight < LOGINS_IN_FLIGHT) {
            Bot *b = &bots[next];
            b->rng = 0x9E3779B97F4A7C15ULL * (uint64_t)(next + 1);
            if (open_connection(b, &addr, epoll_fd, (uint32_t)next)) {
                b->phase = LOGGING_IN;
                in_flight++;
            } else {
                b->phase = DONE;
                settled++;
            }
            next++;
        }
        int n = epoll_wait(epoll_fd, events, 256, 100);
        for (int e = 0; e < n; e++) {
            Bot *b = &bots[events[e].data.u32];
            if (b->phase == READY) { /* logged in, waiting for the others: keep reading */
                on_readable(b);
                continue;
            }
            if (b->phase != LOGGING_IN) continue;
            if ((events[e].events & EPOLLOUT) && !b->out_len) {
                char name[64], secret[80];
                snprintf(name, sizeof name, "%s-%u", prefix, events[e].data.u32);
                snprintf(secret, sizeof secret, "%s-secret", name);
                b->out_len = 1;
                struct epoll_event ev = {.events = EPOLLIN | EPOLLRDHUP, .data.u32 = events[e].data.u32};
                epoll_ctl(epoll_fd, EPOLL_CTL_MOD, b->fd, &ev);
                if (!send_login(b, name, secret)) fail(b, b->reason);
            } else if (events[e].events & (EPOLLIN | EPOLLRDHUP | EPOLLERR | EPOLLHUP)) {
                on_readable(b);
            }
            if (b->phase != LOGGING_IN) {
                in_flight--, settled++;
                if (!b->connected) { /* as the Python bots say it */
                    char reason[sizeof b->reason];
                    snprintf(reason, sizeof reason, "login: %.80s", b->reason);
                    memcpy(b->reason, reason, sizeof reason);
                }
            }
        }
    }
    double connect_s = now() - connect_started;
    run_started = now();
    double end = run_started + duration, last_timers = 0;
    for (int i = 0; i < count; i++) {
        Bot *b = &bots[i];
        if (b->phase != READY) continue;
        b->phase = PLAYING;
        b->next_move = run_started + uniform(b) * MOVE_EVERY;
        b->next_ping = run_started + uniform(b) * PING_EVERY;
    }
    for (double t = now(); t < end; t = now()) {
        int n = epoll_wait(epoll_fd, events, 256, 2);
        for (int e = 0; e < n; e++) {
            Bot *b = &bots[events[e].data.u32];
            if (b->phase == PLAYING) on_readable(b);
        }
        t = now();
        if (t - last_timers < 0.002) continue;
        last_timers = t;
        for (int i = 0; i < count; i++) {
            Bot *b = &bots[i];
            if (b->phase != PLAYING) continue;
            if (t >= b->next_move) {
                b->next_move += MOVE_EVERY;
                steer(b);
                if (!send_move(b, b->hx, b->hy)) fail(b, b->reason);
            }
            if (b->phase == PLAYING && t >= b->next_ping) {
                b->next_ping += PING_EVERY;
                if (!send_ping(b)) fail(b, b->reason);
            }
        }
    }
    /* Summary: the keys of `meshd bots --json`. */
    int connected = 0, disconnects = 0, n_rates = 0, n_rtts = 0;
    double rate_sum = 0, rate_min = INFINITY;
    uint64_t gaps = 0, missing = 0;
    for (int i = 0; i < count; i++) {
        Bot *b = &bots[i];
        connected += b->connected;
        disconnects += b->reason[0] != 0;
        gaps += b->gaps, missing += b->missing_self, n_rtts += b->n_rtts;
        if (b->connected && b->views > 1 && b->last_view > b->first_view) {
            double rate = (double)b->views / (b->last_view - b->first_view);
            rate_sum += rate, n_rates++;
            if (rate < rate_min) rate_min = rate;
        }
    }
    double *rtts = malloc(sizeof(double) * (size_t)(n_rtts + 1));
    n_rtts = 0;
    for (int i = 0; i < count; i++)
        for (int j = 0; j < bots[i].n_rtts; j++) rtts[n_rtts++] = bots[i].rtts[j];
    qsort(rtts, (size_t)n_rtts, sizeof *rtts, by_value);
    double p50 = n_rtts ? rtts[(int)(0.5 * n_rtts) < n_rtts ? (int)(0.5 * n_rtts) : n_rtts - 1] : 0;
    double p99 = n_rtts ? rtts[(int)(0.99 * n_rtts) < n_rtts ? (int)(0.99 * n_rtts) : n_rtts - 1] : 0;
    printf("{\"engine\": \"native\", \"scenario\": \"%s\", \"count\": %d, \"connected\": %d, "
           "\"disconnects\": %d, \"disconnect_reasons\": {",
           names[scenario], count, connected, disconnects);
    /* Reasons, counted: a quadratic scan is fine for a summary printed once. */
    int first = 1;
    for (int i = 0; i < count; i++) {
        if (!bots[i].reason[0]) continue;
        int seen = 0, same = 0;
        for (int j = 0; j < i && !seen; j++) seen = strcmp(bots[j].reason, bots[i].reason) == 0;
        if (seen) continue;
        for (int j = i; j < count; j++) same += strcmp(bots[j].reason, bots[i].reason) == 0;
        printf("%s\"", first ? "" : ", ");
        for (const char *c = bots[i].reason; *c; c++)
            if (*c == '"' || *c == '\\') printf("\\%c", *c);
            else if ((unsigned char)*c >= 0x20) putchar(*c);
        printf("\": %d", same);
        first = 0;
    }
    printf("}, \"connect_s\": %.2f, \"duration_s\": %g, \"updates_per_s\": %.2f, "
           "\"updates_per_s_min\": %.2f, \"tick_gaps\": %llu, \"missing_self\": %llu, "
           "\"rtt_ms\": {\"p50\": %.2f, \"p99\": %.2f}}\n",
           connect_s, duration, n_rates ? rate_sum / n_rates : 0.0, n_rates ? rate_min : 0.0,
           (unsigned long long)gaps, (unsigned long long)missing, p50, p99);
    return 0;
}
