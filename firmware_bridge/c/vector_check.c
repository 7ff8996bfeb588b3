/*
 * Host-only checker for edge_slm_frame.c against ../test_vectors.txt (a line-based copy of
 * test_vectors.json). `vector_check FILE` prints "N passed, N failed" and exits 1 on any failure;
 * `vector_check --decode` decodes raw bytes from stdin and prints what it delivered and counted.
 *
 * Text format, one record per line, fields separated by single spaces, '-' for empty hex:
 *   F <name> <type> <seq> <payload_hex> <frame_hex>      a frame vector
 *   S <name> <stream_hex>                                 starts a stream vector, followed by
 *   E <type> <seq> <payload_hex>                          each frame it must deliver, then
 *   C <frames> <crc> <cobs> <length> <oversize> <version> <resyncs>   its expected counters
 * Payload vectors: the C helpers build the payload from the fields and must match it byte for
 * byte (text fields are hex of their UTF-8, '-' when empty; f32 fields are hex of their LE bits):
 *   PH <name> <payload_hex> <max_payload> <boot_id> <device> <firmware> <n_streams>
 *        then per stream: <kind> <name> <format> <rate> <channels>, then per channel: <name> <scale>
 *   PC <name> <payload_hex> <id> <cmd_name> <n_args> <key> <value> ...   (also parsed back)
 *   PL <name> <payload_hex> <level> <text>
 *   PB <name> <payload_hex> <uptime_ms> <frames_sent> <frames_dropped> <rx_frames> <rx_errors>
 *   PK <name> <payload_hex> <acked_seq> <status>                          (also parsed back)
 *   PS <name> <payload_hex> <channels> <format> <rate> <timestamp_us>     (header; samples copied)
 *   PU <name> <payload_hex> <sample_rate>                                 (header; samples copied)
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "edge_slm_frame.h"

#define MAX_LINE 65536
#define MAX_STREAM 16384
#define MAX_EXPECTED 64

typedef struct {
    unsigned type;
    unsigned seq;
    uint8_t payload[EDGE_SLM_FRAME_MAX_PAYLOAD];
    size_t len;
} expected_frame;

static char line[MAX_LINE];
static uint8_t stream[MAX_STREAM];
static size_t stream_len;
static char stream_name[256];
static expected_frame expected[MAX_EXPECTED];
static size_t n_expected;
static int passed, failed;

static int hexval(char c)
{
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
}

/* Parse hex ('-' means empty) into out; returns the byte count or -1. */
static long parse_hex(const char *hex, uint8_t *out, size_t cap)
{
    size_t n = 0;
    if (hex == NULL) return -1;
    if (strcmp(hex, "-") == 0) return 0;
    while (hex[0] && hex[1]) {
        int hi = hexval(hex[0]), lo = hexval(hex[1]);
        if (hi < 0 || lo < 0 || n >= cap) return -1;
        out[n++] = (uint8_t)(hi << 4 | lo);
        hex += 2;
    }
    return hex[0] ? -1 : (long)n;
}

static void result(const char *name, int ok, const char *why)
{
    if (ok) {
        passed++;
    } else {
        failed++;
        printf("FAIL %s: %s\n", name, why);
    }
}

static int counters_equal(const edge_slm_frame_counters *a, const unsigned long *want)
{
    return a->frames == want[0] && a->crc_errors == want[1] && a->cobs_errors == want[2] &&
           a->length_errors == want[3] && a->oversize == want[4] && a->version_errors == want[5] &&
           a->resyncs == want[6];
}

static void check_frame_vector(void)
{
    static uint8_t payload[EDGE_SLM_FRAME_MAX_PAYLOAD], want[EDGE_SLM_FRAME_MAX_ENCODED],
        got[EDGE_SLM_FRAME_MAX_ENCODED];
    char *name = strtok(NULL, " ");
    char *type_s = strtok(NULL, " ");
    char *seq_s = strtok(NULL, " ");
    long plen = parse_hex(strtok(NULL, " "), payload, sizeof payload);
    long flen = parse_hex(strtok(NULL, " "), want, sizeof want);
    edge_slm_frame_decoder dec;
    edge_slm_frame frame;
    unsigned type, seq;
    size_t n, i, delivered = 0;
    int ok = 1;

    if (name == NULL || type_s == NULL || seq_s == NULL || plen < 0 || flen < 0) {
        result(name ? name : "?", 0, "malformed F line");
        return;
    }
    type = (unsigned)strtoul(type_s, NULL, 10);
    seq = (unsigned)strtoul(seq_s, NULL, 10);
    n = edge_slm_frame_encode((uint8_t)type, (uint16_t)seq, payload, (size_t)plen, got, sizeof got);
    result(name, n == (size_t)flen && memcmp(got, want, n) == 0, "encoder output differs");
    if (n > 0 && edge_slm_frame_encode((uint8_t)type, (uint16_t)seq, payload, (size_t)plen, got, n - 1) != 0) {
        result(name, 0, "encoder wrote into a buffer that is too small");
    }

    edge_slm_frame_decoder_init(&dec);
    for (i = 0; i < (size_t)flen; i++) {
        if (edge_slm_frame_decoder_feed(&dec, want[i], &frame)) {
            delivered++;
            ok = ok && frame.type == type && frame.seq == seq && frame.length == (size_t)plen &&
                 memcmp(frame.payload, payload, (size_t)plen) == 0;
        }
    }
    result(name, ok && delivered == 1 && dec.counters.frames == 1 && dec.counters.resyncs == 0,
           "decoder did not deliver exactly this frame");
}

static void check_stream_vector(void)
{
    unsigned long want[7];
    edge_slm_frame_decoder dec;
    edge_slm_frame frame;
    size_t i, got = 0;
    int ok = 1;
    for (i = 0; i < 7; i++) {
        char *tok = strtok(NULL, " ");
        if (tok == NULL) {
            result(stream_name, 0, "malformed C line");
            return;
        }
        want[i] = strtoul(tok, NULL, 10);
    }
    edge_slm_frame_decoder_init(&dec);
    for (i = 0; i < stream_len; i++) {
        if (edge_slm_frame_decoder_feed(&dec, stream[i], &frame)) {
            const expected_frame *e = got < n_expected ? &expected[got] : NULL;
            ok = ok && e != NULL && frame.type == e->type && frame.seq == e->seq &&
                 frame.length == e->len && memcmp(frame.payload, e->payload, e->len) == 0;
            got++;
        }
    }
    result(stream_name, ok && got == n_expected, "delivered frames differ");
    result(stream_name, counters_equal(&dec.counters, want), "counters differ");
}


/* ---- payload vectors ---------------------------------------------------------------------- */

#define MAX_TEXTS 160

static char texts[MAX_TEXTS][260];
static size_t n_texts;

/* Next token as a NUL-terminated string decoded from hex; NULL when malformed. */
static const char *next_text(void)
{
    char *tok = strtok(NULL, " ");
    long n;
    if (tok == NULL || n_texts >= MAX_TEXTS) return NULL;
    n = parse_hex(tok, (uint8_t *)texts[n_texts], sizeof texts[n_texts] - 1);
    if (n < 0) return NULL;
    texts[n_texts][n] = '\0';
    return texts[n_texts++];
}

static int next_ul(unsigned long long *out)
{
    char *tok = strtok(NULL, " ");
    if (tok == NULL) return 0;
    *out = strtoull(tok, NULL, 10);
    return 1;
}

static float next_f32(int *ok)
{
    uint8_t b[4];
    uint32_t bits;
    float f;
    char *tok = strtok(NULL, " ");
    if (tok == NULL || parse_hex(tok, b, 4) != 4) {
        *ok = 0;
        return 0.0f;
    }
    bits = (uint32_t)b[0] | (uint32_t)b[1] << 8 | (uint32_t)b[2] << 16 | (uint32_t)b[3] << 24;
    memcpy(&f, &bits, sizeof f);
    return f;
}

static void check_payload_vector(const char *kind)
{
    static uint8_t want[EDGE_SLM_FRAME_MAX_PAYLOAD + 1], got[EDGE_SLM_FRAME_MAX_PAYLOAD + 1];
    char name[256];
    char *name_s = strtok(NULL, " ");
    long wlen;
    edge_slm_writer w;
    unsigned long long a = 0, b = 0, c = 0, d = 0, e = 0;
    int ok = 1;
    n_texts = 0;
    snprintf(name, sizeof name, "%s", name_s ? name_s : "?");
    wlen = parse_hex(strtok(NULL, " "), want, sizeof want);
    if (name_s == NULL || wlen < 0) {
        result(name, 0, "malformed payload line");
        return;
    }
    edge_slm_writer_init(&w, got, EDGE_SLM_FRAME_MAX_PAYLOAD);
    if (strcmp(kind, "PH") == 0) {
        static const char *ch_names[16];
        static float scales[16];
        const char *dev, *fw;
        unsigned long long n_streams, i, j;
        ok = next_ul(&a) && next_ul(&b) && (dev = next_text()) != NULL && (fw = next_text()) != NULL &&
             next_ul(&n_streams);
        if (ok) edge_slm_hello_begin(&w, (uint16_t)a, (uint32_t)b, dev, fw, (uint8_t)n_streams);
        for (i = 0; ok && i < n_streams; i++) {
            const char *sname;
            ok = next_ul(&a) && (sname = next_text()) != NULL && next_ul(&b) && next_ul(&c) && next_ul(&d) && d <= 16;
            for (j = 0; ok && j < d; j++) {
                ok = (ch_names[j] = next_text()) != NULL;
                if (ok) scales[j] = next_f32(&ok);
            }
            if (ok) edge_slm_hello_add_stream(&w, (uint8_t)a, sname, (uint8_t)b, (uint32_t)c, (uint8_t)d, ch_names, scales);
        }
    } else if (strcmp(kind, "PC") == 0) {
        static const char *keys[EDGE_SLM_COMMAND_MAX_ARGS], *values[EDGE_SLM_COMMAND_MAX_ARGS];
        const char *cname;
        edge_slm_command cmd;
        unsigned long long i;
        ok = next_ul(&a) && (cname = next_text()) != NULL && next_ul(&b) && b <= EDGE_SLM_COMMAND_MAX_ARGS;
        for (i = 0; ok && i < b; i++) {
            ok = (keys[i] = next_text()) != NULL && (values[i] = next_text()) != NULL;
        }
        if (ok) {
            edge_slm_command_payload(&w, (uint8_t)a, cname, (uint8_t)b, keys, values);
            ok = edge_slm_command_parse(want, (size_t)wlen, &cmd) && cmd.id == a && edge_slm_str_eq(cmd.name, cname) &&
                 cmd.n_args == b;
            for (i = 0; ok && i < b; i++) {
                ok = edge_slm_str_eq(cmd.keys[i], keys[i]) && edge_slm_str_eq(cmd.values[i], values[i]) &&
                     edge_slm_str_eq(edge_slm_command_arg(&cmd, keys[i]), values[i]);
            }
            result(name, ok, "command parser disagrees with the fields");
            ok = 1;
            /* every strict prefix of a command is malformed */
            for (i = 0; ok && i < (unsigned long long)wlen; i++) {
                ok = !edge_slm_command_parse(want, (size_t)i, &cmd);
            }
            result(name, ok, "command parser accepted a truncated payload");
        }
    } else if (strcmp(kind, "PL") == 0) {
        const char *text;
        ok = next_ul(&a) && (text = next_text()) != NULL;
        if (ok) edge_slm_log_payload(&w, (uint8_t)a, text);
    } else if (strcmp(kind, "PB") == 0) {
        edge_slm_heartbeat hb;
        ok = next_ul(&a) && next_ul(&b) && next_ul(&c) && next_ul(&d) && next_ul(&e);
        hb.uptime_ms = (uint32_t)a;
        hb.frames_sent = (uint32_t)b;
        hb.frames_dropped = (uint32_t)c;
        hb.rx_frames = (uint32_t)d;
        hb.rx_errors = (uint32_t)e;
        if (ok) edge_slm_heartbeat_payload(&w, &hb);
    } else if (strcmp(kind, "PK") == 0) {
        uint16_t seq;
        uint8_t status;
        ok = next_ul(&a) && next_ul(&b);
        if (ok) {
            edge_slm_ack_payload(&w, (uint16_t)a, (uint8_t)b);
            result(name, edge_slm_ack_parse(want, (size_t)wlen, &seq, &status) && seq == a && status == b,
                   "ack parser disagrees with the fields");
        }
    } else if (strcmp(kind, "PS") == 0) {
        ok = next_ul(&a) && next_ul(&b) && next_ul(&c) && next_ul(&d) && wlen >= (long)EDGE_SLM_SENSOR_HEADER_SIZE;
        if (ok) {
            edge_slm_sensor_header(&w, (uint8_t)a, (uint8_t)b, (uint32_t)c, (uint64_t)d);
            edge_slm_put_bytes(&w, want + EDGE_SLM_SENSOR_HEADER_SIZE, (size_t)wlen - EDGE_SLM_SENSOR_HEADER_SIZE);
        }
    } else if (strcmp(kind, "PU") == 0) {
        ok = next_ul(&a) && wlen >= (long)EDGE_SLM_AUDIO_HEADER_SIZE;
        if (ok) {
            edge_slm_audio_header(&w, (uint32_t)a);
            edge_slm_put_bytes(&w, want + EDGE_SLM_AUDIO_HEADER_SIZE, (size_t)wlen - EDGE_SLM_AUDIO_HEADER_SIZE);
        }
    } else {
        result(name, 0, "unknown payload kind");
        return;
    }
    if (!ok) {
        result(name, 0, "malformed payload fields");
        return;
    }
    result(name, w.ok && w.len == (size_t)wlen && memcmp(got, want, w.len) == 0, "payload helper output differs");
}

static int run_file(const char *path)
{
    FILE *f = fopen(path, "r");
    if (f == NULL) {
        fprintf(stderr, "cannot open %s\n", path);
        return 2;
    }
    while (fgets(line, sizeof line, f) != NULL) {
        char *kind;
        size_t len = strlen(line);
        if (len > 0 && line[len - 1] != '\n' && !feof(f)) {
            fprintf(stderr, "line longer than %d characters\n", MAX_LINE);
            fclose(f);
            return 2;
        }
        line[strcspn(line, "\r\n")] = '\0';
        kind = strtok(line, " ");
        if (kind == NULL || kind[0] == '#') {
            continue;
        } else if (strcmp(kind, "F") == 0) {
            check_frame_vector();
        } else if (strcmp(kind, "S") == 0) {
            char *name = strtok(NULL, " ");
            long n;
            snprintf(stream_name, sizeof stream_name, "%s", name ? name : "?");
            n = parse_hex(strtok(NULL, " "), stream, sizeof stream);
            stream_len = n < 0 ? 0 : (size_t)n;
            n_expected = 0;
            if (n < 0) result(stream_name, 0, "malformed S line");
        } else if (strcmp(kind, "E") == 0) {
            char *type_s = strtok(NULL, " ");
            char *seq_s = strtok(NULL, " ");
            expected_frame *e = &expected[n_expected];
            long n = n_expected < MAX_EXPECTED ? parse_hex(strtok(NULL, " "), e->payload, sizeof e->payload) : -1;
            if (type_s == NULL || seq_s == NULL || n < 0) {
                result(stream_name, 0, "malformed E line");
                continue;
            }
            e->type = (unsigned)strtoul(type_s, NULL, 10);
            e->seq = (unsigned)strtoul(seq_s, NULL, 10);
            e->len = (size_t)n;
            n_expected++;
        } else if (strcmp(kind, "C") == 0) {
            check_stream_vector();
        } else if (kind[0] == 'P' && kind[1] != '\0' && kind[2] == '\0') {
            check_payload_vector(kind);
        } else {
            result(kind, 0, "unknown record kind");
        }
    }
    fclose(f);
    printf("%d passed, %d failed\n", passed, failed);
    return (failed > 0 || passed == 0) ? 1 : 0;
}

static int run_decode(void)
{
    static edge_slm_frame_decoder dec;
    edge_slm_frame frame;
    int c;
    size_t i;
    edge_slm_frame_decoder_init(&dec);
    while ((c = getchar()) != EOF) {
        if (edge_slm_frame_decoder_feed(&dec, (uint8_t)c, &frame)) {
            printf("F %u %u ", frame.type, frame.seq);
            if (frame.length == 0) putchar('-');
            for (i = 0; i < frame.length; i++) printf("%02x", frame.payload[i]);
            putchar('\n');
        }
    }
    printf("C %lu %lu %lu %lu %lu %lu %lu\n", (unsigned long)dec.counters.frames,
           (unsigned long)dec.counters.crc_errors, (unsigned long)dec.counters.cobs_errors,
           (unsigned long)dec.counters.length_errors, (unsigned long)dec.counters.oversize,
           (unsigned long)dec.counters.version_errors, (unsigned long)dec.counters.resyncs);
    return 0;
}

int main(int argc, char **argv)
{
    if (argc == 2 && strcmp(argv[1], "--decode") == 0) {
        return run_decode();
    }
    if (argc != 2) {
        fprintf(stderr, "usage: vector_check VECTORS.txt | vector_check --decode < stream\n");
        return 2;
    }
    return run_file(argv[1]);
}
