/* meshd-loadgen: many player connections from one small process (`meshd bots --engine native`).
 *
 * The same bots as meshd/ops/bots.py (log in, a `move` input ten times a second
 * following a scenario, a ping every second, read every view), written in C
 * so that a load test of N players measures the server, not the Python
 * decoding of N clients on the same cores. One thread, one epoll set.
 *
 * It reads views exactly as docs/protocol.md describes them: it walks every
 * CBOR item (it keeps only the tick, its own entity's position and whether
 * its own entity is in view), so a malformed frame ends that bot with a
 * "bad frame" disconnect. Any valid encoding is read: integers of every
 * width (minimal or not), half, single and double floats, simple values.
 *
 * A connection that ends without an Error (an end of stream, a reset: its
 * gateway process died) is made again as meshd.client does it: a Login with
 * the resume token of the latest Welcome, at once, then after 50 ms doubling
 * up to 250 ms, for RECONNECT_WITHIN seconds (then it is a disconnect). The
 * connect is non-blocking, in the same epoll set; moves and pings wait for it.
 *
 * usage: meshd-loadgen HOST PORT COUNT DURATION SCENARIO TARGET_X TARGET_Y NAME_PREFIX
 *        [RECONNECT_WITHIN]
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
#define MAX_RESUME 128 /* characters of a resume token the server takes back */
#define MAX_RECONNECT_MS 32
#define RETRY_FIRST 0.05
#define RETRY_MAX 0.25

/* BACKOFF: the connection was lost, the next try is at retry_at (no socket);
 * RECONNECTING: a new connection is being made and logged in. Either way the
 * bot goes back to `back_to` (READY or PLAYING) once welcomed again. */
enum phase { IDLE, LOGGING_IN, READY, PLAYING, BACKOFF, RECONNECTING, DONE };
enum scenario { WANDER, RUSH, CROSS, CROWD };

typedef struct {
    int fd;
    uint32_t index, conn; /* conn: which of the bot's connections fd is (stale epoll events) */
    enum phase phase, back_to;
    int connected, login_sent, send_errno;
    char reason[192];
    char lost[64], last_try[64]; /* why the connection went, why the last try failed */
    char resume[MAX_RESUME + 1];
    uint8_t *buf;
    size_t len, cap;
    uint64_t entity, first_entity, seq, last_tick, views, gaps, reconnect_gaps, missing_self;
    uint64_t bad_inputs; /* inputs the server refused (`bad_input`): the connection stays */
    int has_tick, self_in_view, knows_self, after_reconnect, entity_changed;
    double x, y, hx, hy;
    double next_move, next_ping, first_view, last_view;
    uint64_t ping_id;
    double ping_sent;
    double rtts[MAX_RTTS];
    int n_rtts;
    double lost_at, deadline, retry_at, pause;
    int reconnects, n_reconnect_ms;
    double reconnect_ms[MAX_RECONNECT_MS];
    uint64_t rng;
} Bot;

static double world_size = 1000.0;
static enum scenario scenario;
static double target_x, target_y, run_started, duration, reconnect_within = 5.0;
static const char *prefix;
static struct sockaddr_in server;
static int epoll_fd, reconnecting; /* reconnecting: bots in BACKOFF or RECONNECTING */

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

/* Frame the body written at out+4 (n bytes) and send it; 0 if the socket would not take it
 * all (send_errno: why, 0 for a short write). */
static int send_frame(Bot *b, uint8_t *out, size_t n) {
    out[0] = n >> 24; out[1] = n >> 16; out[2] = n >> 8; out[3] = (uint8_t)n;
    ssize_t sent = send(b->fd, out, n + 4, MSG_NOSIGNAL);
    if (sent == (ssize_t)(n + 4)) return 1;
    b->send_errno = sent < 0 ? errno : 0;
    return 0;
}

static int send_login(Bot *b) {
    char name[64], secret[80];
    snprintf(name, sizeof name, "%s-%u", prefix, b->index);
    snprintf(secret, sizeof secret, "%s-secret", name);
    uint8_t out[512], *p = out + 4;
    p += put_head(p, 5, 5);
    p += put_text(p, "version"); p += put_head(p, 0, 2);
    p += put_text(p, "name"); p += put_text(p, name);
    p += put_text(p, "secret"); p += put_text(p, secret);
    p += put_text(p, "resume"); p += put_text(p, b->resume);
    p += put_text(p, "type"); p += put_text(p, "Login");
    return send_frame(b, out, (size_t)(p - out - 4));
}

/* A move's direction is at most unit length: plugins may declare dx and dy within [-1, 1]. */
static int send_move(Bot *b, double dx, double dy) {
    double length = hypot(dx, dy);
    if (length > 1.0) dx /= length, dy /= length;
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

/* -- scenarios (the same as meshd/ops/bots.py) ---------------------------- */

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

/* -- connections ------------------------------------------------------------ */

static void close_connection(Bot *b) {
    if (b->fd >= 0) close(b->fd); /* closing also takes it out of the epoll set */
    b->fd = -1;
}

/* `from` into `into`, cut to fit (cutting a long reason is fine: it is only shown). */
static void reason_of(char *into, size_t cap, const char *from) {
    size_t n = strnlen(from, cap - 1);
    memcpy(into, from, n);
    into[n] = 0;
}

/* The bot is over: `reason` says why (unless it already says something). */
static void fail(Bot *b, const char *reason) {
    if (b->phase == DONE) return;
    if (!b->reason[0]) reason_of(b->reason, sizeof b->reason, reason);
    if (b->phase == BACKOFF || b->phase == RECONNECTING) reconnecting--;
    b->phase = DONE;
    close_connection(b);
}

/* A new non-blocking connection for the bot, in the epoll set; 0 (send_errno: why) if none. */
static int open_connection(Bot *b) {
    b->fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
    if (b->fd < 0) return b->send_errno = errno, 0;
    int one = 1;
    setsockopt(b->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    if (connect(b->fd, (const struct sockaddr *)&server, sizeof server) < 0
        && errno != EINPROGRESS) {
        b->send_errno = errno;
        close_connection(b);
        return 0;
    }
    b->conn++, b->len = 0, b->login_sent = 0;
    struct epoll_event ev = {.events = EPOLLIN | EPOLLOUT | EPOLLRDHUP,
                             .data.u64 = (uint64_t)b->conn << 32 | b->index};
    epoll_ctl(epoll_fd, EPOLL_CTL_ADD, b->fd, &ev);
    return 1;
}

/* One try at reconnecting failed (`why`): the next one after a pause, if time is left. */
static void try_failed(Bot *b, const char *why, double t) {
    close_connection(b);
    reason_of(b->last_try, sizeof b->last_try, why);
    b->phase = BACKOFF;
    b->retry_at = t + b->pause;
    b->pause = fmin(b->pause * 2, RETRY_MAX);
}

/* The connection ended with no Error (`why`): a bot that was logged in makes it again. */
static void connection_lost(Bot *b, const char *why, double t) {
    if (b->phase == RECONNECTING) { try_failed(b, why, t); return; }
    if ((b->phase != READY && b->phase != PLAYING) || reconnect_within <= 0) {
        fail(b, why);
        return;
    }
    close_connection(b);
    reason_of(b->lost, sizeof b->lost, why);
    reason_of(b->last_try, sizeof b->last_try, why);
    b->back_to = b->phase;
    b->phase = BACKOFF;
    b->lost_at = b->retry_at = t; /* the first try at once */
    b->deadline = t + reconnect_within;
    b->pause = RETRY_FIRST;
    reconnecting++;
}

/* Start the tries that are due; give up on bots out of time. */
static void reconnect_timers(Bot *bots, int count, double t) {
    for (int i = 0; i < count && reconnecting; i++) {
        Bot *b = &bots[i];
        if (b->phase != BACKOFF && b->phase != RECONNECTING) continue;
        if (t >= b->deadline) {
            char reason[sizeof b->reason];
            snprintf(reason, sizeof reason, "%.63s; no reconnect within %.3g s (last: %.63s)",
                     b->lost, reconnect_within, b->last_try);
            fail(b, reason);
        } else if (b->phase == BACKOFF && t >= b->retry_at) {
            if (open_connection(b)) b->phase = RECONNECTING;
            else try_failed(b, strerror(b->send_errno), t);
        }
    }
}

/* -- frames from the server -------------------------------------------------- */

static void welcomed(Bot *b, uint64_t player, double t) {
    b->entity = player;
    if (b->phase == LOGGING_IN) {
        b->first_entity = player;
        b->phase = READY;
        b->connected = 1;
        return;
    }
    /* a reconnect: the view stream starts over, entering everything in view again */
    if (player != b->first_entity) b->entity_changed = 1;
    if (b->n_reconnect_ms < MAX_RECONNECT_MS)
        b->reconnect_ms[b->n_reconnect_ms++] = (t - b->lost_at) * 1000.0;
    b->reconnects++;
    reconnecting--;
    b->phase = b->back_to;
    b->after_reconnect = 1;
    b->self_in_view = b->knows_self = 0;
    b->ping_sent = 0; /* its pong went with the old connection */
    if (b->phase == PLAYING) { /* moves and pings start again, without a burst to catch up */
        b->next_move = t;
        b->next_ping = t + uniform(b) * PING_EVERY;
    }
}

static void on_frame(Bot *b, const uint8_t *body, size_t n, double t) {
    Reader r = {body, body + n, 1};
    uint64_t pairs, v;
    const char *key, *type = "";
    size_t key_n, type_n = 0;
    uint64_t tick = 0, player = 0, pong = 0;
    char code[48] = "", message[160] = "", resume[MAX_RESUME + 1] = "";
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
        } else if (is(key, key_n, "resume")) {
            const char *s;
            size_t sn;
            if (!text(&r, &s, &sn)) break;
            /* a longer token would be refused in the Login: come back with the secret alone */
            if (sn <= MAX_RESUME) memcpy(resume, s, sn), resume[sn] = 0;
        } else {
            skip(&r, 1);
        }
    }
    if (!r.ok || r.p != r.end) { fail(b, "bad frame: malformed CBOR"); return; }
    if (is(type, type_n, "View")) {
        if (b->views == 0) b->first_view = t;
        b->views++;
        b->last_view = t;
        if (b->has_tick && tick != b->last_tick + 1) {
            if (b->after_reconnect) b->reconnect_gaps++; /* not a tick missed while connected */
            else b->gaps++;
        }
        b->after_reconnect = 0;
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
        memcpy(b->resume, resume, sizeof resume); /* always the latest (none: the secret alone) */
        if (b->phase == LOGGING_IN || b->phase == RECONNECTING) welcomed(b, player, t);
    } else if (is(type, type_n, "Error")) {
        if (!strcmp(code, "bad_input")) { /* that input was dropped; the connection stays */
            b->bad_inputs++;
            return;
        }
        char reason[sizeof b->reason];
        snprintf(reason, sizeof reason, "%s: %.*s", code, (int)(sizeof reason / 2), message);
        /* "not right now" while coming back: another try (the others come back too) */
        if (b->phase == RECONNECTING && (!strcmp(code, "busy") || !strcmp(code, "full")))
            try_failed(b, reason, t);
        else
            fail(b, reason);
    }
}

/* Read what there is; frames received before an end of stream or a reset count first
 * (an Error among them ends the bot instead of a reconnect). */
static void on_readable(Bot *b, double t) {
    const char *ended = NULL;
    for (;;) {
        if (b->cap - b->len < 65536) {
            b->cap = b->cap ? b->cap * 2 : 131072;
            b->buf = realloc(b->buf, b->cap);
        }
        ssize_t got = recv(b->fd, b->buf + b->len, b->cap - b->len, 0);
        if (got == 0) { ended = "the server closed the connection"; break; }
        if (got < 0) {
            if (errno == EINTR) continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK) break;
            ended = strerror(errno);
            break;
        }
        b->len += (size_t)got;
    }
    uint32_t conn = b->conn;
    size_t at = 0;
    while (b->fd >= 0 && b->conn == conn && b->len - at >= 4) {
        const uint8_t *h = b->buf + at;
        uint32_t n = (uint32_t)h[0] << 24 | h[1] << 16 | h[2] << 8 | h[3];
        if (n > MAX_FRAME) { fail(b, "bad frame: too large"); return; }
        if (b->len - at < 4 + (size_t)n) break;
        on_frame(b, h + 4, n, t);
        at += 4 + (size_t)n;
    }
    if (b->fd < 0 || b->conn != conn) return; /* closed by a frame: the buffer is done with */
    if (ended) { connection_lost(b, ended, t); return; }
    memmove(b->buf, b->buf + at, b->len - at);
    b->len -= at;
    if (b->cap > (1u << 20) && b->len < 65536) { /* a burst passed: give the memory back */
        b->cap = 131072;
        b->buf = realloc(b->buf, b->cap);
    }
}

/* A send failed: a broken connection is lost (after reading whatever Error waits before its
 * end), anything else (the socket would not take the frame) ends the bot. */
static void send_failed(Bot *b, double t) {
    int e = b->send_errno;
    char why[64];
    snprintf(why, sizeof why, "send: %s", e ? strerror(e) : "short write");
    if (e == EPIPE || e == ECONNRESET || e == ENOTCONN || e == ETIMEDOUT) {
        enum phase before = b->phase;
        uint32_t conn = b->conn;
        on_readable(b, t);
        if (b->fd >= 0 && b->conn == conn && b->phase == before) connection_lost(b, why, t);
    } else {
        fail(b, why);
    }
}

/* The connection of a bot logging in became writable (or failed): send the Login. */
static void on_connected(Bot *b, double t) {
    int error = 0;
    socklen_t size = sizeof error;
    if (getsockopt(b->fd, SOL_SOCKET, SO_ERROR, &error, &size) < 0) error = errno;
    if (error) {
        if (b->phase == RECONNECTING) try_failed(b, strerror(error), t);
        else fail(b, strerror(error));
        return;
    }
    b->login_sent = 1;
    struct epoll_event ev = {.events = EPOLLIN | EPOLLRDHUP,
                             .data.u64 = (uint64_t)b->conn << 32 | b->index};
    epoll_ctl(epoll_fd, EPOLL_CTL_MOD, b->fd, &ev);
    if (!send_login(b)) send_failed(b, t);
}

/* One epoll event, if it is about the bot's current connection. */
static void on_event(Bot *bots, const struct epoll_event *event, double t) {
    Bot *b = &bots[(uint32_t)event->data.u64];
    if (b->fd < 0 || b->conn != (uint32_t)(event->data.u64 >> 32)) return; /* stale */
    if ((b->phase == LOGGING_IN || b->phase == RECONNECTING) && !b->login_sent) {
        if (event->events & (EPOLLOUT | EPOLLERR | EPOLLHUP)) on_connected(b, t);
        return;
    }
    if (b->phase != DONE && b->phase != IDLE) on_readable(b, t);
}

static int by_value(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static double quantile(const double *sorted, int n, double q) {
    if (!n) return 0.0;
    int i = (int)(q * n);
    return sorted[i < n ? i : n - 1];
}

static void json_text(const char *s) {
    putchar('"');
    for (const char *c = s; *c; c++)
        if (*c == '"' || *c == '\\') printf("\\%c", *c);
        else if ((unsigned char)*c >= 0x20) putchar(*c);
    putchar('"');
}

int main(int argc, char **argv) {
    if (argc != 9 && argc != 10) {
        fprintf(stderr,
                "usage: %s HOST PORT COUNT DURATION SCENARIO TARGET_X TARGET_Y PREFIX "
                "[RECONNECT_WITHIN]\n",
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
    prefix = argv[8];
    if (argc == 10) reconnect_within = atof(argv[9]);
    server.sin_family = AF_INET;
    server.sin_port = htons((uint16_t)atoi(argv[2]));
    if (count < 1 || (int)scenario < 0 || inet_pton(AF_INET, argv[1], &server.sin_addr) != 1) {
        fprintf(stderr, "meshd-loadgen: bad arguments (HOST must be an IPv4 address)\n");
        return 2;
    }
    Bot *bots = calloc((size_t)count, sizeof *bots);
    for (int i = 0; i < count; i++) bots[i].fd = -1, bots[i].index = (uint32_t)i;
    epoll_fd = epoll_create1(0);
    struct epoll_event events[256];
    double connect_started = now();
    int next = 0, in_flight = 0, settled = 0;
    /* Log in a few at a time (the server hashes secrets one by one), then play together. */
    while (settled < count) {
        while (next < count && in_flight < LOGINS_IN_FLIGHT) {
            Bot *b = &bots[next];
            b->rng = 0x9E3779B97F4A7C15ULL * (uint64_t)(next + 1);
            if (open_connection(b)) {
                b->phase = LOGGING_IN;
                in_flight++;
            } else {
                char reason[sizeof b->reason];
                snprintf(reason, sizeof reason, "login: %.80s", strerror(b->send_errno));
                fail(b, reason);
                settled++;
            }
            next++;
        }
        int n = epoll_wait(epoll_fd, events, 256, reconnecting ? 2 : 100);
        double t = now();
        for (int e = 0; e < n; e++) {
            Bot *b = &bots[(uint32_t)events[e].data.u64];
            enum phase before = b->phase;
            on_event(bots, &events[e], t); /* a bot logged in keeps reading while it waits */
            if (before == LOGGING_IN && b->phase != LOGGING_IN) {
                in_flight--, settled++;
                if (!b->connected) { /* as the Python bots say it */
                    char reason[sizeof b->reason];
                    snprintf(reason, sizeof reason, "login: %.80s", b->reason);
                    memcpy(b->reason, reason, sizeof reason);
                }
            }
        }
        reconnect_timers(bots, count, now());
    }
    double connect_s = now() - connect_started;
    run_started = now();
    double end = run_started + duration, last_timers = 0;
    for (int i = 0; i < count; i++) {
        Bot *b = &bots[i];
        if (b->phase == BACKOFF || b->phase == RECONNECTING) b->back_to = PLAYING;
        if (b->phase != READY) continue;
        b->phase = PLAYING;
        b->next_move = run_started + uniform(b) * MOVE_EVERY;
        b->next_ping = run_started + uniform(b) * PING_EVERY;
    }
    for (double t = now(); t < end; t = now()) {
        int n = epoll_wait(epoll_fd, events, 256, 2);
        t = now();
        for (int e = 0; e < n; e++) on_event(bots, &events[e], t);
        if (t - last_timers < 0.002) continue;
        last_timers = t;
        reconnect_timers(bots, count, t);
        for (int i = 0; i < count; i++) {
            Bot *b = &bots[i];
            if (b->phase != PLAYING) continue;
            if (t >= b->next_move) {
                b->next_move += MOVE_EVERY;
                steer(b);
                if (!send_move(b, b->hx, b->hy)) send_failed(b, t);
            }
            if (b->phase == PLAYING && t >= b->next_ping) {
                b->next_ping += PING_EVERY;
                if (!send_ping(b)) send_failed(b, t);
            }
        }
    }
    /* Summary: the keys of `meshd bots --json`. A bot still reconnecting when the run ended
     * is not a disconnect (nor is it one for the Python bots). */
    int connected = 0, disconnects = 0, n_rates = 0, n_rtts = 0, n_ms = 0;
    int reconnects = 0, reconnected_bots = 0, entity_changed = 0;
    double rate_sum = 0, rate_min = INFINITY;
    uint64_t gaps = 0, reconnect_gaps = 0, missing = 0, bad_inputs = 0;
    for (int i = 0; i < count; i++) {
        Bot *b = &bots[i];
        connected += b->connected;
        disconnects += b->reason[0] != 0;
        gaps += b->gaps, reconnect_gaps += b->reconnect_gaps, missing += b->missing_self;
        bad_inputs += b->bad_inputs;
        n_rtts += b->n_rtts, n_ms += b->n_reconnect_ms;
        reconnects += b->reconnects, reconnected_bots += b->reconnects > 0;
        entity_changed += b->entity_changed;
        if (b->connected && b->views > 1 && b->last_view > b->first_view) {
            double rate = (double)b->views / (b->last_view - b->first_view);
            rate_sum += rate, n_rates++;
            if (rate < rate_min) rate_min = rate;
        }
    }
    double *rtts = malloc(sizeof(double) * (size_t)(n_rtts + 1));
    double *ms = malloc(sizeof(double) * (size_t)(n_ms + 1));
    n_rtts = n_ms = 0;
    for (int i = 0; i < count; i++) {
        for (int j = 0; j < bots[i].n_rtts; j++) rtts[n_rtts++] = bots[i].rtts[j];
        for (int j = 0; j < bots[i].n_reconnect_ms; j++) ms[n_ms++] = bots[i].reconnect_ms[j];
    }
    qsort(rtts, (size_t)n_rtts, sizeof *rtts, by_value);
    qsort(ms, (size_t)n_ms, sizeof *ms, by_value);
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
        printf("%s", first ? "" : ", ");
        json_text(bots[i].reason);
        printf(": %d", same);
        first = 0;
    }
    printf("}, \"connect_s\": %.2f, \"duration_s\": %g, \"updates_per_s\": %.2f, "
           "\"updates_per_s_min\": %.2f, \"tick_gaps\": %llu, \"missing_self\": %llu, "
           "\"rtt_ms\": {\"p50\": %.2f, \"p99\": %.2f}, \"reconnects\": %d, "
           "\"reconnected_bots\": %d, \"reconnect_ms\": {\"p50\": %.2f, \"max\": %.2f}, "
           "\"entity_changed\": %d, \"reconnect_gaps\": %llu, \"bad_inputs\": %llu}\n",
           connect_s, duration, n_rates ? rate_sum / n_rates : 0.0, n_rates ? rate_min : 0.0,
           (unsigned long long)gaps, (unsigned long long)missing, quantile(rtts, n_rtts, 0.5),
           quantile(rtts, n_rtts, 0.99), reconnects, reconnected_bots, quantile(ms, n_ms, 0.5),
           n_ms ? ms[n_ms - 1] : 0.0, entity_changed, (unsigned long long)reconnect_gaps,
           (unsigned long long)bad_inputs);
    return 0;
}
