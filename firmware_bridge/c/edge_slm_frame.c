/*
 * edge-slm serial-bridge frame protocol, version 1: encoder and byte-at-a-time decoder.
 * Must match firmware_bridge/protocol.py byte for byte and counter for counter (test_vectors.json).
 */
#include "edge_slm_frame.h"

#include <string.h>

/* Bitwise CRC-32 (reflected, poly 0xEDB88320): no 1 KB table, which matters on small MCUs. */
uint32_t edge_slm_crc32(uint32_t crc, const uint8_t *data, size_t len)
{
    size_t i;
    int bit;
    crc = ~crc;
    for (i = 0; i < len; i++) {
        crc ^= data[i];
        for (bit = 0; bit < 8; bit++) {
            crc = (crc >> 1) ^ (0xEDB88320u & (0u - (crc & 1u)));
        }
    }
    return ~crc;
}

/* Streaming COBS writer: the frame is encoded straight into the caller's buffer, no raw copy. */
typedef struct {
    uint8_t *out;
    size_t cap;
    size_t pos;
    size_t code_pos;
    uint8_t code;
    int ok;
} cobs_writer;

static void cobs_emit(cobs_writer *w, uint8_t byte)
{
    if (w->pos >= w->cap) {
        w->ok = 0;
        return;
    }
    w->out[w->pos++] = byte;
}

static void cobs_put(cobs_writer *w, uint8_t byte)
{
    if (!w->ok) {
        return;
    }
    if (w->code == 0xFF) { /* previous block is full and more data follows: open a new one */
        w->out[w->code_pos] = 0xFF;
        w->code_pos = w->pos;
        cobs_emit(w, 0);
        w->code = 1;
        if (!w->ok) {
            return;
        }
    }
    if (byte == 0) {
        w->out[w->code_pos] = w->code;
        w->code_pos = w->pos;
        cobs_emit(w, 0);
        w->code = 1;
    } else {
        cobs_emit(w, byte);
        w->code++;
    }
}

static void cobs_put_all(cobs_writer *w, const uint8_t *data, size_t len)
{
    size_t i;
    for (i = 0; i < len; i++) {
        cobs_put(w, data[i]);
    }
}

size_t edge_slm_frame_encode(uint8_t type, uint16_t seq, const uint8_t *payload, size_t len,
                             uint8_t *out, size_t out_cap)
{
    uint8_t header[EDGE_SLM_FRAME_HEADER_SIZE];
    uint8_t trailer[EDGE_SLM_FRAME_CRC_SIZE];
    uint32_t crc;
    cobs_writer w;

    if (len > EDGE_SLM_FRAME_MAX_PAYLOAD || out == NULL || out_cap == 0 || (len > 0 && payload == NULL)) {
        return 0;
    }
    header[0] = (uint8_t)EDGE_SLM_FRAME_VERSION;
    header[1] = type;
    header[2] = (uint8_t)(seq & 0xFFu);
    header[3] = (uint8_t)(seq >> 8);
    header[4] = (uint8_t)(len & 0xFFu);
    header[5] = (uint8_t)(len >> 8);
    crc = edge_slm_crc32(0, header, sizeof header);
    if (len > 0) {
        crc = edge_slm_crc32(crc, payload, len);
    }
    trailer[0] = (uint8_t)(crc & 0xFFu);
    trailer[1] = (uint8_t)((crc >> 8) & 0xFFu);
    trailer[2] = (uint8_t)((crc >> 16) & 0xFFu);
    trailer[3] = (uint8_t)(crc >> 24);

    w.out = out;
    w.cap = out_cap;
    w.pos = 1; /* out[0] is the first code byte */
    w.code_pos = 0;
    w.code = 1;
    w.ok = 1;
    cobs_put_all(&w, header, sizeof header);
    if (len > 0) {
        cobs_put_all(&w, payload, len);
    }
    cobs_put_all(&w, trailer, sizeof trailer);
    if (!w.ok) {
        return 0;
    }
    w.out[w.code_pos] = w.code;
    cobs_emit(&w, 0); /* frame delimiter */
    return w.ok ? w.pos : 0;
}

void edge_slm_frame_decoder_init(edge_slm_frame_decoder *dec)
{
    memset(dec, 0, sizeof *dec);
}

/* In-place COBS decode (output never outgrows input). Returns the decoded length, or -1. */
static long cobs_decode_in_place(uint8_t *buf, size_t len)
{
    size_t in = 0;
    size_t out = 0;
    while (in < len) {
        uint8_t code = buf[in];
        size_t end = in + code;
        size_t i;
        if (code == 0 || end > len) {
            return -1;
        }
        for (i = in + 1; i < end; i++) {
            if (buf[i] == 0) {
                return -1;
            }
            buf[out++] = buf[i];
        }
        in = end;
        if (code != 0xFF && in < len) {
            buf[out++] = 0;
        }
    }
    return (long)out;
}

static void reject(edge_slm_frame_decoder *dec, uint32_t *reason)
{
    (*reason)++;
    dec->counters.resyncs++;
}

/* The order of checks is part of the protocol: protocol.py counts in the same order. */
static int parse_frame(edge_slm_frame_decoder *dec, edge_slm_frame *frame)
{
    long decoded = cobs_decode_in_place(dec->buf, dec->len);
    const uint8_t *raw = dec->buf;
    size_t n;
    uint16_t length;
    uint32_t crc;

    if (decoded < 0) {
        reject(dec, &dec->counters.cobs_errors);
        return 0;
    }
    n = (size_t)decoded;
    if (n < EDGE_SLM_FRAME_OVERHEAD) {
        reject(dec, &dec->counters.length_errors);
        return 0;
    }
    length = (uint16_t)(raw[4] | (raw[5] << 8));
    if (length > EDGE_SLM_FRAME_MAX_PAYLOAD) {
        reject(dec, &dec->counters.oversize);
        return 0;
    }
    if (n != EDGE_SLM_FRAME_OVERHEAD + length) {
        reject(dec, &dec->counters.length_errors);
        return 0;
    }
    crc = (uint32_t)raw[n - 4] | ((uint32_t)raw[n - 3] << 8) | ((uint32_t)raw[n - 2] << 16) |
          ((uint32_t)raw[n - 1] << 24);
    if (crc != edge_slm_crc32(0, raw, n - EDGE_SLM_FRAME_CRC_SIZE)) {
        reject(dec, &dec->counters.crc_errors);
        return 0;
    }
    if (raw[0] != EDGE_SLM_FRAME_VERSION) {
        reject(dec, &dec->counters.version_errors);
        return 0;
    }
    frame->version = raw[0];
    frame->type = raw[1];
    frame->seq = (uint16_t)(raw[2] | (raw[3] << 8));
    frame->length = length;
    frame->payload = raw + EDGE_SLM_FRAME_HEADER_SIZE;
    dec->counters.frames++;
    return 1;
}

int edge_slm_frame_decoder_feed(edge_slm_frame_decoder *dec, uint8_t byte, edge_slm_frame *frame)
{
    int delivered = 0;
    if (byte != 0) {
        if (dec->discarding) {
            return 0;
        }
        if (dec->len >= sizeof dec->buf) { /* no legal frame is this long: drop to the next 0x00 */
            reject(dec, &dec->counters.oversize);
            dec->discarding = 1;
            dec->len = 0;
            return 0;
        }
        dec->buf[dec->len++] = byte;
        return 0;
    }
    if (dec->discarding) {
        dec->discarding = 0;
    } else if (dec->len > 0) { /* an empty frame is an idle delimiter, not an error */
        delivered = parse_frame(dec, frame);
    }
    dec->len = 0;
    return delivered;
}
