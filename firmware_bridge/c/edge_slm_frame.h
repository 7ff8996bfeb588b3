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

#ifdef __cplusplus
}
#endif

#endif /* EDGE_SLM_FRAME_H */
