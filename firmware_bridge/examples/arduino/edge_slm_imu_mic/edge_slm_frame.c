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


/* ---- payload helpers ------------------------------------------------------------------------ */

void edge_slm_writer_init(edge_slm_writer *w, uint8_t *buf, size_t cap)
{
    w->buf = buf;
    w->cap = cap;
    w->len = 0;
    w->ok = buf != NULL;
}

void edge_slm_put_bytes(edge_slm_writer *w, const uint8_t *data, size_t len)
{
    if (!w->ok || len > w->cap - w->len) {
        w->ok = 0;
        return;
    }
    if (len > 0) {
        memcpy(w->buf + w->len, data, len);
    }
    w->len += len;
}

void edge_slm_put_u8(edge_slm_writer *w, uint8_t v)
{
    edge_slm_put_bytes(w, &v, 1);
}

void edge_slm_put_u16(edge_slm_writer *w, uint16_t v)
{
    uint8_t b[2];
    b[0] = (uint8_t)(v & 0xFFu);
    b[1] = (uint8_t)(v >> 8);
    edge_slm_put_bytes(w, b, 2);
}

void edge_slm_put_u32(edge_slm_writer *w, uint32_t v)
{
    uint8_t b[4];
    int i;
    for (i = 0; i < 4; i++) {
        b[i] = (uint8_t)((v >> (8 * i)) & 0xFFu);
    }
    edge_slm_put_bytes(w, b, 4);
}

void edge_slm_put_u64(edge_slm_writer *w, uint64_t v)
{
    edge_slm_put_u32(w, (uint32_t)(v & 0xFFFFFFFFu));
    edge_slm_put_u32(w, (uint32_t)(v >> 32));
}

void edge_slm_put_f32(edge_slm_writer *w, float v)
{
    uint32_t bits;
    memcpy(&bits, &v, sizeof bits); /* IEEE-754 binary32 on every target we build for */
    edge_slm_put_u32(w, bits);
}

void edge_slm_put_str8n(edge_slm_writer *w, const char *text, size_t len)
{
    if (len > 255u) {
        w->ok = 0;
        return;
    }
    edge_slm_put_u8(w, (uint8_t)len);
    edge_slm_put_bytes(w, (const uint8_t *)text, len);
}

void edge_slm_put_str8(edge_slm_writer *w, const char *text)
{
    edge_slm_put_str8n(w, text, text == NULL ? 0 : strlen(text));
}

void edge_slm_hello_begin(edge_slm_writer *w, uint16_t max_payload, uint32_t boot_id, const char *device_name,
                          const char *firmware_version, uint8_t n_streams)
{
    edge_slm_put_u8(w, (uint8_t)EDGE_SLM_FRAME_VERSION);
    edge_slm_put_u16(w, max_payload);
    edge_slm_put_u32(w, boot_id);
    edge_slm_put_str8(w, device_name);
    edge_slm_put_str8(w, firmware_version);
    edge_slm_put_u8(w, n_streams);
}

void edge_slm_hello_add_stream(edge_slm_writer *w, uint8_t kind, const char *name, uint8_t sample_format,
                               uint32_t sample_rate_hz, uint8_t channels, const char *const *channel_names,
                               const float *scales)
{
    uint8_t i;
    edge_slm_put_u8(w, kind);
    edge_slm_put_str8(w, name);
    edge_slm_put_u8(w, sample_format);
    edge_slm_put_u32(w, sample_rate_hz);
    edge_slm_put_u8(w, channels);
    for (i = 0; i < channels; i++) {
        edge_slm_put_str8(w, channel_names[i]);
        edge_slm_put_f32(w, scales[i]);
    }
}

void edge_slm_sensor_header(edge_slm_writer *w, uint8_t channels, uint8_t sample_format, uint32_t rate_hz,
                            uint64_t timestamp_us)
{
    edge_slm_put_u8(w, channels);
    edge_slm_put_u8(w, sample_format);
    edge_slm_put_u32(w, rate_hz);
    edge_slm_put_u64(w, timestamp_us);
}

void edge_slm_audio_header(edge_slm_writer *w, uint32_t sample_rate)
{
    edge_slm_put_u32(w, sample_rate);
}

void edge_slm_ack_payload(edge_slm_writer *w, uint16_t acked_seq, uint8_t status)
{
    edge_slm_put_u16(w, acked_seq);
    edge_slm_put_u8(w, status);
}

void edge_slm_log_payload(edge_slm_writer *w, uint8_t level, const char *text)
{
    size_t len = text == NULL ? 0 : strlen(text);
    size_t room = w->cap > w->len + 1 ? w->cap - w->len - 1 : 0;
    if (room > EDGE_SLM_FRAME_MAX_PAYLOAD - 1u) {
        room = EDGE_SLM_FRAME_MAX_PAYLOAD - 1u;
    }
    if (len > room) { /* cut long text, never inside a UTF-8 sequence */
        len = room;
        while (len > 0 && ((uint8_t)text[len] & 0xC0u) == 0x80u) {
            len--;
        }
    }
    edge_slm_put_u8(w, level);
    edge_slm_put_bytes(w, (const uint8_t *)text, len);
}

void edge_slm_heartbeat_payload(edge_slm_writer *w, const edge_slm_heartbeat *hb)
{
    edge_slm_put_u32(w, hb->uptime_ms);
    edge_slm_put_u32(w, hb->frames_sent);
    edge_slm_put_u32(w, hb->frames_dropped);
    edge_slm_put_u32(w, hb->rx_frames);
    edge_slm_put_u32(w, hb->rx_errors);
}

void edge_slm_command_payload(edge_slm_writer *w, uint8_t id, const char *name, uint8_t n_args,
                              const char *const *keys, const char *const *values)
{
    uint8_t i;
    edge_slm_put_u8(w, id);
    edge_slm_put_str8(w, name);
    edge_slm_put_u8(w, n_args);
    for (i = 0; i < n_args; i++) {
        edge_slm_put_str8(w, keys[i]);
        edge_slm_put_str8(w, values[i]);
    }
}

static int read_str8(const uint8_t *p, size_t len, size_t *pos, edge_slm_str *out)
{
    uint8_t n;
    if (*pos >= len) {
        return 0;
    }
    n = p[*pos];
    if ((size_t)n > len - *pos - 1u) {
        return 0;
    }
    out->ptr = (const char *)(p + *pos + 1);
    out->len = n;
    *pos += 1u + n;
    return 1;
}

int edge_slm_command_parse(const uint8_t *payload, size_t len, edge_slm_command *cmd)
{
    size_t pos = 1;
    uint8_t i;
    if (payload == NULL || len < 1) {
        return 0;
    }
    cmd->id = payload[0];
    if (!read_str8(payload, len, &pos, &cmd->name) || pos >= len) {
        return 0;
    }
    cmd->n_args = payload[pos++];
    if (cmd->n_args > EDGE_SLM_COMMAND_MAX_ARGS) {
        return 0;
    }
    for (i = 0; i < cmd->n_args; i++) {
        if (!read_str8(payload, len, &pos, &cmd->keys[i]) || !read_str8(payload, len, &pos, &cmd->values[i])) {
            return 0;
        }
    }
    return 1;
}

int edge_slm_str_eq(edge_slm_str s, const char *text)
{
    size_t n = strlen(text);
    return s.ptr != NULL && n == s.len && memcmp(s.ptr, text, n) == 0;
}

edge_slm_str edge_slm_command_arg(const edge_slm_command *cmd, const char *key)
{
    edge_slm_str none;
    uint8_t i;
    for (i = 0; i < cmd->n_args; i++) {
        if (edge_slm_str_eq(cmd->keys[i], key)) {
            return cmd->values[i];
        }
    }
    none.ptr = NULL;
    none.len = 0;
    return none;
}

int edge_slm_ack_parse(const uint8_t *payload, size_t len, uint16_t *acked_seq, uint8_t *status)
{
    if (payload == NULL || len != 3u) {
        return 0;
    }
    *acked_seq = (uint16_t)(payload[0] | (payload[1] << 8));
    *status = payload[2];
    return 1;
}
