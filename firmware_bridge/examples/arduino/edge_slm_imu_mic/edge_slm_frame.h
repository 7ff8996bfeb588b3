/*
 * edge-slm serial-bridge frame protocol, version 1 (see ../PROTOCOL.md).
 * C99, no malloc, no OS calls: builds unchanged for Arduino, ESP-IDF, Zephyr and host tests.
 */
#ifndef EDGE_SLM_FRAME_H
#define EDGE_SLM_FRAME_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define EDGE_SLM_FRAME_VERSION 1u
#define EDGE_SLM_FRAME_MAX_PAYLOAD 1024u
#define EDGE_SLM_FRAME_HEADER_SIZE 6u /* version u8, type u8, seq u16 LE, length u16 LE */
#define EDGE_SLM_FRAME_CRC_SIZE 4u    /* CRC-32 (IEEE, zlib) u32 LE */
#define EDGE_SLM_FRAME_OVERHEAD (EDGE_SLM_FRAME_HEADER_SIZE + EDGE_SLM_FRAME_CRC_SIZE)
#define EDGE_SLM_FRAME_MAX_RAW (EDGE_SLM_FRAME_OVERHEAD + EDGE_SLM_FRAME_MAX_PAYLOAD)
/* Longest COBS body of a legal frame, delimiter excluded (1039). */
#define EDGE_SLM_FRAME_MAX_COBS (EDGE_SLM_FRAME_MAX_RAW + EDGE_SLM_FRAME_MAX_RAW / 254u + 1u)
/* Buffer size that always holds edge_slm_frame_encode() output, delimiter included (1040). */
#define EDGE_SLM_FRAME_MAX_ENCODED (EDGE_SLM_FRAME_MAX_COBS + 1u)

enum edge_slm_msg_type {
    EDGE_SLM_MSG_HELLO = 0x01,
    EDGE_SLM_MSG_SENSOR_SAMPLES = 0x02,
    EDGE_SLM_MSG_AUDIO_CHUNK = 0x03,
    EDGE_SLM_MSG_COMMAND = 0x04,
    EDGE_SLM_MSG_ACK = 0x05,
    EDGE_SLM_MSG_LOG = 0x06,
    EDGE_SLM_MSG_HEARTBEAT = 0x07
};

/* A delivered frame. payload points into the decoder and is valid until its next feed call. */
typedef struct {
    uint8_t version;
    uint8_t type;
    uint16_t seq;
    uint16_t length;
    const uint8_t *payload;
} edge_slm_frame;

/* resyncs counts rejected frames; the other error counters say why each was rejected. */
typedef struct {
    uint32_t frames;
    uint32_t crc_errors;
    uint32_t cobs_errors;
    uint32_t length_errors;
    uint32_t oversize;
    uint32_t version_errors;
    uint32_t resyncs;
} edge_slm_frame_counters;

typedef struct {
    uint8_t buf[EDGE_SLM_FRAME_MAX_COBS];
    size_t len;
    uint8_t discarding;
    edge_slm_frame_counters counters;
} edge_slm_frame_decoder;

/* CRC-32 as zlib.crc32: start with crc = 0, chain calls to cover split buffers. */
uint32_t edge_slm_crc32(uint32_t crc, const uint8_t *data, size_t len);

/*
 * Encode one frame (header, payload, CRC, COBS, trailing 0x00) into out.
 * Returns the number of bytes written, or 0 when len > EDGE_SLM_FRAME_MAX_PAYLOAD or out_cap is
 * too small (EDGE_SLM_FRAME_MAX_ENCODED always suffices). payload may be NULL when len is 0.
 */
size_t edge_slm_frame_encode(uint8_t type, uint16_t seq, const uint8_t *payload, size_t len,
                             uint8_t *out, size_t out_cap);

void edge_slm_frame_decoder_init(edge_slm_frame_decoder *dec);

/*
 * Feed one received byte. Returns 1 and fills *frame when this byte completes a valid frame,
 * otherwise 0. Corrupt frames are counted and dropped; decoding resumes after the next 0x00.
 */
int edge_slm_frame_decoder_feed(edge_slm_frame_decoder *dec, uint8_t byte, edge_slm_frame *frame);


/* ---- payload helpers (PROTOCOL.md 4.1 - 4.7) ------------------------------------------------ */

enum edge_slm_ack_status { EDGE_SLM_ACK_OK = 0, EDGE_SLM_ACK_UNKNOWN_COMMAND = 1, EDGE_SLM_ACK_BAD_ARGS = 2,
                           EDGE_SLM_ACK_FAILED = 3 };
enum edge_slm_stream_kind { EDGE_SLM_STREAM_SENSOR = 1, EDGE_SLM_STREAM_AUDIO = 2 };
enum edge_slm_sample_format { EDGE_SLM_FORMAT_INT16 = 0, EDGE_SLM_FORMAT_FLOAT32 = 1 };
enum edge_slm_command_id { EDGE_SLM_CMD_CUSTOM = 0, EDGE_SLM_CMD_PING = 1, EDGE_SLM_CMD_HELLO = 2,
                           EDGE_SLM_CMD_START = 3, EDGE_SLM_CMD_STOP = 4, EDGE_SLM_CMD_SET_RATE = 5,
                           EDGE_SLM_CMD_RESET = 6, EDGE_SLM_CMD_SET = 7 };
enum edge_slm_log_level { EDGE_SLM_LOG_DEBUG = 0, EDGE_SLM_LOG_INFO = 1, EDGE_SLM_LOG_WARNING = 2,
                          EDGE_SLM_LOG_ERROR = 3 };

#define EDGE_SLM_SENSOR_HEADER_SIZE 14u
#define EDGE_SLM_AUDIO_HEADER_SIZE 4u
#define EDGE_SLM_HEARTBEAT_SIZE 20u
#define EDGE_SLM_COMMAND_MAX_ARGS 8u

/* Little-endian payload writer over a caller buffer; ok drops to 0 (and stays) on overflow. */
typedef struct {
    uint8_t *buf;
    size_t cap;
    size_t len;
    int ok;
} edge_slm_writer;

void edge_slm_writer_init(edge_slm_writer *w, uint8_t *buf, size_t cap);
void edge_slm_put_u8(edge_slm_writer *w, uint8_t v);
void edge_slm_put_u16(edge_slm_writer *w, uint16_t v);
void edge_slm_put_u32(edge_slm_writer *w, uint32_t v);
void edge_slm_put_u64(edge_slm_writer *w, uint64_t v);
void edge_slm_put_f32(edge_slm_writer *w, float v);
void edge_slm_put_bytes(edge_slm_writer *w, const uint8_t *data, size_t len);
/* u8 length + UTF-8 bytes; a NULL text is written as empty. Fails (ok = 0) beyond 255 bytes. */
void edge_slm_put_str8(edge_slm_writer *w, const char *text);
void edge_slm_put_str8n(edge_slm_writer *w, const char *text, size_t len);

/* Hello (4.4): call hello_begin once, then hello_add_stream exactly n_streams times. */
void edge_slm_hello_begin(edge_slm_writer *w, uint16_t max_payload, uint32_t boot_id, const char *device_name,
                          const char *firmware_version, uint8_t n_streams);
void edge_slm_hello_add_stream(edge_slm_writer *w, uint8_t kind, const char *name, uint8_t sample_format,
                               uint32_t sample_rate_hz, uint8_t channels, const char *const *channel_names,
                               const float *scales);
/* Sensor samples (4.1) and audio chunk (4.2): the header; append the samples with put_u16/put_bytes. */
void edge_slm_sensor_header(edge_slm_writer *w, uint8_t channels, uint8_t sample_format, uint32_t rate_hz,
                            uint64_t timestamp_us);
void edge_slm_audio_header(edge_slm_writer *w, uint32_t sample_rate);
void edge_slm_ack_payload(edge_slm_writer *w, uint16_t acked_seq, uint8_t status);
void edge_slm_log_payload(edge_slm_writer *w, uint8_t level, const char *text);

typedef struct {
    uint32_t uptime_ms;
    uint32_t frames_sent;
    uint32_t frames_dropped;
    uint32_t rx_frames;
    uint32_t rx_errors;
} edge_slm_heartbeat;

void edge_slm_heartbeat_payload(edge_slm_writer *w, const edge_slm_heartbeat *hb);

/* Command (4.5). Strings point into the parsed payload and are NOT NUL-terminated: use the lengths. */
typedef struct {
    const char *ptr;
    uint8_t len;
} edge_slm_str;

typedef struct {
    uint8_t id;
    edge_slm_str name;
    uint8_t n_args;
    edge_slm_str keys[EDGE_SLM_COMMAND_MAX_ARGS];
    edge_slm_str values[EDGE_SLM_COMMAND_MAX_ARGS];
} edge_slm_command;

void edge_slm_command_payload(edge_slm_writer *w, uint8_t id, const char *name, uint8_t n_args,
                              const char *const *keys, const char *const *values);
/* Returns 1 on success, 0 when the payload is malformed or has more than EDGE_SLM_COMMAND_MAX_ARGS args. */
int edge_slm_command_parse(const uint8_t *payload, size_t len, edge_slm_command *cmd);
/* 1 when s equals the NUL-terminated text. */
int edge_slm_str_eq(edge_slm_str s, const char *text);
/* The value of arg key, or an empty string with ptr NULL when absent. */
edge_slm_str edge_slm_command_arg(const edge_slm_command *cmd, const char *key);
/* Returns 1 and fills *acked_seq / *status when the payload is an ack (3 bytes), otherwise 0. */
int edge_slm_ack_parse(const uint8_t *payload, size_t len, uint16_t *acked_seq, uint8_t *status);

#ifdef __cplusplus
}
#endif

#endif /* EDGE_SLM_FRAME_H */
