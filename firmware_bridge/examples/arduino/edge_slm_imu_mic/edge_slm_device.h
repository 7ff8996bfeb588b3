/*
 * edge-slm device side of the serial bridge: hello, commands with acks, logs, heartbeats and
 * sample streams on top of edge_slm_frame. Shared by the Arduino sketch and the host-built
 * virtual MCU, so what the tests exercise is what the board runs. C99, no malloc, no OS calls.
 */
#ifndef EDGE_SLM_DEVICE_H
#define EDGE_SLM_DEVICE_H

#include "edge_slm_frame.h"

#ifdef __cplusplus
extern "C" {
#endif

#define EDGE_SLM_DEVICE_MAX_STREAMS 4u

/* One stream the device offers; rate_hz is changed in place by the set_rate command. */
typedef struct {
    uint8_t kind;          /* EDGE_SLM_STREAM_SENSOR or EDGE_SLM_STREAM_AUDIO */
    const char *name;      /* "imu", "mic" */
    uint32_t rate_hz;
    uint8_t channels;
    const char *const *channel_names;
    const float *scales;   /* physical value per int16 step, one per channel */
    uint32_t max_rate_hz;  /* set_rate refuses 0 and anything above this */
} edge_slm_stream_desc;

struct edge_slm_device;
/* Write a whole encoded frame; return len when written, 0 when it had to be dropped. */
typedef size_t (*edge_slm_write_fn)(void *ctx, const uint8_t *data, size_t len);
/* Called for commands the device layer does not handle itself, and after it applied start, stop and
 * set_rate (a non-OK answer to set_rate rolls the rate back). Return an EDGE_SLM_ACK_* status. */
typedef uint8_t (*edge_slm_command_fn)(void *ctx, struct edge_slm_device *dev, const edge_slm_command *cmd);

typedef struct edge_slm_device {
    const char *device_name;
    const char *firmware_version;
    uint32_t boot_id;
    edge_slm_stream_desc *streams;
    uint8_t n_streams;
    uint8_t enabled[EDGE_SLM_DEVICE_MAX_STREAMS];
    uint16_t seq;          /* seq of the next frame; a dropped frame still uses one, so the host sees the gap */
    uint16_t current_seq;  /* seq of the frame being written, for the write callback */
    uint32_t frames_sent;
    uint32_t frames_dropped;
    edge_slm_write_fn write;
    edge_slm_command_fn on_command;
    void *ctx;
    edge_slm_frame_decoder rx;
    uint8_t payload[EDGE_SLM_FRAME_MAX_PAYLOAD];
    uint8_t tx[EDGE_SLM_FRAME_MAX_ENCODED];
} edge_slm_device;

void edge_slm_device_init(edge_slm_device *dev, const char *device_name, const char *firmware_version,
                          uint32_t boot_id, edge_slm_stream_desc *streams, uint8_t n_streams,
                          edge_slm_write_fn write, edge_slm_command_fn on_command, void *ctx);
/* Encode and write one frame; returns 1 when written, 0 when dropped (counted). */
int edge_slm_device_send(edge_slm_device *dev, uint8_t type, const uint8_t *payload, size_t len);
/* A lone 0x00 so the host drops whatever partial frame it holds (call once at boot). */
void edge_slm_device_flush_line(edge_slm_device *dev);
int edge_slm_device_hello(edge_slm_device *dev);
int edge_slm_device_log(edge_slm_device *dev, uint8_t level, const char *text);
int edge_slm_device_heartbeat(edge_slm_device *dev, uint32_t uptime_ms);
/* Send n interleaved int16 samples of stream index s, split into as many frames as needed;
 * returns the number of frames written. timestamp_us is the device time of the first sample. */
int edge_slm_device_send_samples(edge_slm_device *dev, uint8_t s, const int16_t *samples, size_t n,
                                 uint64_t timestamp_us);
/* Most samples (per channel) of stream s that fit in one frame. */
size_t edge_slm_device_samples_per_frame(const edge_slm_device *dev, uint8_t s);
/* Index of the stream with this name, or -1. */
int edge_slm_device_find_stream(const edge_slm_device *dev, edge_slm_str name);
/* Feed one received byte: answers hello requests, handles ping/hello/start/stop/set_rate, passes
 * other commands to on_command, and acks every command. Returns 1 when a frame was handled. */
int edge_slm_device_feed(edge_slm_device *dev, uint8_t byte);

#ifdef __cplusplus
}
#endif

#endif /* EDGE_SLM_DEVICE_H */
