/*
 * edge-slm device side of the serial bridge (see edge_slm_device.h and ../PROTOCOL.md 4.4-4.7).
 */
#include "edge_slm_device.h"

#include <string.h>

void edge_slm_device_init(edge_slm_device *dev, const char *device_name, const char *firmware_version,
                          uint32_t boot_id, edge_slm_stream_desc *streams, uint8_t n_streams,
                          edge_slm_write_fn write, edge_slm_command_fn on_command, void *ctx)
{
    memset(dev, 0, sizeof *dev);
    dev->device_name = device_name;
    dev->firmware_version = firmware_version;
    dev->boot_id = boot_id;
    dev->streams = streams;
    dev->n_streams = n_streams > EDGE_SLM_DEVICE_MAX_STREAMS ? (uint8_t)EDGE_SLM_DEVICE_MAX_STREAMS : n_streams;
    dev->write = write;
    dev->on_command = on_command;
    dev->ctx = ctx;
    edge_slm_frame_decoder_init(&dev->rx);
}

int edge_slm_device_send(edge_slm_device *dev, uint8_t type, const uint8_t *payload, size_t len)
{
    size_t n;
    dev->current_seq = dev->seq;
    dev->seq = (uint16_t)(dev->seq + 1u);
    n = edge_slm_frame_encode(type, dev->current_seq, payload, len, dev->tx, sizeof dev->tx);
    if (n == 0 || dev->write(dev->ctx, dev->tx, n) != n) {
        dev->frames_dropped++;
        return 0;
    }
    dev->frames_sent++;
    return 1;
}

void edge_slm_device_flush_line(edge_slm_device *dev)
{
    static const uint8_t zero = 0;
    dev->write(dev->ctx, &zero, 1);
}

int edge_slm_device_hello(edge_slm_device *dev)
{
    edge_slm_writer w;
    uint8_t i;
    edge_slm_writer_init(&w, dev->payload, sizeof dev->payload);
    edge_slm_hello_begin(&w, (uint16_t)EDGE_SLM_FRAME_MAX_PAYLOAD, dev->boot_id, dev->device_name,
                         dev->firmware_version, dev->n_streams);
    for (i = 0; i < dev->n_streams; i++) {
        const edge_slm_stream_desc *s = &dev->streams[i];
        edge_slm_hello_add_stream(&w, s->kind, s->name, EDGE_SLM_FORMAT_INT16, s->rate_hz, s->channels,
                                  s->channel_names, s->scales);
    }
    return w.ok && edge_slm_device_send(dev, EDGE_SLM_MSG_HELLO, w.buf, w.len);
}

int edge_slm_device_log(edge_slm_device *dev, uint8_t level, const char *text)
{
    edge_slm_writer w;
    edge_slm_writer_init(&w, dev->payload, sizeof dev->payload);
    edge_slm_log_payload(&w, level, text);
    return w.ok && edge_slm_device_send(dev, EDGE_SLM_MSG_LOG, w.buf, w.len);
}

int edge_slm_device_heartbeat(edge_slm_device *dev, uint32_t uptime_ms)
{
    edge_slm_writer w;
    edge_slm_heartbeat hb;
    hb.uptime_ms = uptime_ms;
    hb.frames_sent = dev->frames_sent;
    hb.frames_dropped = dev->frames_dropped;
    hb.rx_frames = dev->rx.counters.frames;
    hb.rx_errors = dev->rx.counters.resyncs;
    edge_slm_writer_init(&w, dev->payload, sizeof dev->payload);
    edge_slm_heartbeat_payload(&w, &hb);
    return w.ok && edge_slm_device_send(dev, EDGE_SLM_MSG_HEARTBEAT, w.buf, w.len);
}

size_t edge_slm_device_samples_per_frame(const edge_slm_device *dev, uint8_t s)
{
    const edge_slm_stream_desc *d = &dev->streams[s];
    size_t header = d->kind == EDGE_SLM_STREAM_AUDIO ? EDGE_SLM_AUDIO_HEADER_SIZE : EDGE_SLM_SENSOR_HEADER_SIZE;
    return (EDGE_SLM_FRAME_MAX_PAYLOAD - header) / (2u * (d->channels ? d->channels : 1u));
}

int edge_slm_device_send_samples(edge_slm_device *dev, uint8_t s, const int16_t *samples, size_t n,
                                 uint64_t timestamp_us)
{
    const edge_slm_stream_desc *d;
    size_t per_frame, done = 0, i;
    int frames = 0;
    if (s >= dev->n_streams) {
        return 0;
    }
    d = &dev->streams[s];
    per_frame = edge_slm_device_samples_per_frame(dev, s);
    while (done < n) {
        size_t count = n - done < per_frame ? n - done : per_frame;
        edge_slm_writer w;
        edge_slm_writer_init(&w, dev->payload, sizeof dev->payload);
        if (d->kind == EDGE_SLM_STREAM_AUDIO) {
            edge_slm_audio_header(&w, d->rate_hz);
        } else {
            uint64_t offset_us = d->rate_hz ? (uint64_t)done * 1000000u / d->rate_hz : 0u;
            edge_slm_sensor_header(&w, d->channels, EDGE_SLM_FORMAT_INT16, d->rate_hz, timestamp_us + offset_us);
        }
        for (i = 0; i < count * d->channels; i++) {
            edge_slm_put_u16(&w, (uint16_t)samples[done * d->channels + i]);
        }
        if (w.ok && edge_slm_device_send(dev, d->kind == EDGE_SLM_STREAM_AUDIO ? EDGE_SLM_MSG_AUDIO_CHUNK
                                                                              : EDGE_SLM_MSG_SENSOR_SAMPLES,
                                         w.buf, w.len)) {
            frames++;
        }
        done += count;
    }
    return frames;
}

int edge_slm_device_find_stream(const edge_slm_device *dev, edge_slm_str name)
{
    uint8_t i;
    for (i = 0; i < dev->n_streams; i++) {
        if (edge_slm_str_eq(name, dev->streams[i].name)) {
            return i;
        }
    }
    return -1;
}

static uint32_t parse_u32(edge_slm_str s, int *ok)
{
    uint32_t v = 0;
    uint8_t i;
    *ok = s.ptr != NULL && s.len > 0 && s.len <= 9;
    for (i = 0; *ok && i < s.len; i++) {
        if (s.ptr[i] < '0' || s.ptr[i] > '9') {
            *ok = 0;
        } else {
            v = v * 10u + (uint32_t)(s.ptr[i] - '0');
        }
    }
    return v;
}

/* start/stop/set_rate act on the stream named by arg "stream", or on every stream without it. */
static uint8_t builtin_command(edge_slm_device *dev, const edge_slm_command *cmd, int *handled)
{
    edge_slm_str target = edge_slm_command_arg(cmd, "stream");
    int index = target.ptr ? edge_slm_device_find_stream(dev, target) : -1;
    uint8_t i;
    *handled = 1;
    if (target.ptr && index < 0 &&
        (cmd->id == EDGE_SLM_CMD_START || cmd->id == EDGE_SLM_CMD_STOP || cmd->id == EDGE_SLM_CMD_SET_RATE)) {
        return EDGE_SLM_ACK_BAD_ARGS;
    }
    switch (cmd->id) {
    case EDGE_SLM_CMD_PING:
    case EDGE_SLM_CMD_HELLO:
        return EDGE_SLM_ACK_OK;
    case EDGE_SLM_CMD_START:
    case EDGE_SLM_CMD_STOP:
        for (i = 0; i < dev->n_streams; i++) {
            if (index < 0 || index == i) {
                dev->enabled[i] = cmd->id == EDGE_SLM_CMD_START;
            }
        }
        break;
    case EDGE_SLM_CMD_SET_RATE: {
        int ok;
        uint32_t rate = parse_u32(edge_slm_command_arg(cmd, "rate"), &ok);
        if (!ok || rate == 0) {
            return EDGE_SLM_ACK_BAD_ARGS;
        }
        for (i = 0; i < dev->n_streams; i++) {
            if ((index < 0 || index == i) && dev->streams[i].max_rate_hz && rate > dev->streams[i].max_rate_hz) {
                return EDGE_SLM_ACK_BAD_ARGS;
            }
        }
        {
            uint32_t old[EDGE_SLM_DEVICE_MAX_STREAMS];
            uint8_t status = EDGE_SLM_ACK_OK;
            for (i = 0; i < dev->n_streams; i++) {
                old[i] = dev->streams[i].rate_hz;
                if (index < 0 || index == i) {
                    dev->streams[i].rate_hz = rate;
                }
            }
            if (dev->on_command != NULL) {
                status = dev->on_command(dev->ctx, dev, cmd);
            }
            for (i = 0; status != EDGE_SLM_ACK_OK && i < dev->n_streams; i++) {
                dev->streams[i].rate_hz = old[i]; /* the hardware said no: keep announcing the real rate */
            }
            return status;
        }
    }
    default:
        *handled = 0;
        return EDGE_SLM_ACK_UNKNOWN_COMMAND;
    }
    /* the application hears about start/stop too (to power sensors, reset timers); it may refuse */
    if (dev->on_command != NULL) {
        return dev->on_command(dev->ctx, dev, cmd);
    }
    return EDGE_SLM_ACK_OK;
}

static void handle_frame(edge_slm_device *dev, const edge_slm_frame *frame)
{
    edge_slm_command cmd;
    edge_slm_writer w;
    uint8_t ack[3];
    uint8_t status;
    int handled;

    if (frame->type == EDGE_SLM_MSG_HELLO) { /* the host asks who we are */
        edge_slm_device_hello(dev);
        return;
    }
    if (frame->type != EDGE_SLM_MSG_COMMAND) {
        return; /* host heartbeats and acks need no answer */
    }
    if (!edge_slm_command_parse(frame->payload, frame->length, &cmd)) {
        status = EDGE_SLM_ACK_BAD_ARGS;
        cmd.id = EDGE_SLM_CMD_CUSTOM;
    } else {
        status = builtin_command(dev, &cmd, &handled);
        if (!handled) {
            status = dev->on_command != NULL ? dev->on_command(dev->ctx, dev, &cmd) : EDGE_SLM_ACK_UNKNOWN_COMMAND;
        }
    }
    edge_slm_writer_init(&w, ack, sizeof ack);
    edge_slm_ack_payload(&w, frame->seq, status);
    edge_slm_device_send(dev, EDGE_SLM_MSG_ACK, w.buf, w.len);
    if (status == EDGE_SLM_ACK_OK && cmd.id == EDGE_SLM_CMD_HELLO) {
        edge_slm_device_hello(dev);
    }
}

int edge_slm_device_feed(edge_slm_device *dev, uint8_t byte)
{
    edge_slm_frame frame;
    if (!edge_slm_frame_decoder_feed(&dev->rx, byte, &frame)) {
        return 0;
    }
    handle_frame(dev, &frame);
    return 1;
}
