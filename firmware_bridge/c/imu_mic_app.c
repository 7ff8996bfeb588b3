/*
 * Board-agnostic logic of the edge_slm_imu_mic Arduino sketch (see imu_mic_app.h).
 */
#include "imu_mic_app.h"

#include <string.h>

#define G_PER_STEP (1.0f / 8192.0f) /* +-4 g in int16 */
#define DPS_PER_STEP (1.0f / 65.536f) /* +-500 dps in int16 */
#define STANDARD_GRAVITY 9.80665f
#define DEG_TO_RAD 0.017453292519943295f

enum { IMU = 0, MIC = 1 };

static const char *const imu_names[6] = {"ax", "ay", "az", "gx", "gy", "gz"};
static const char *const mic_names[1] = {"mic"};

static size_t write_frame(void *ctx, const uint8_t *data, size_t len)
{
    imu_mic_app *app = (imu_mic_app *)ctx;
    return app->hal.serial_write(data, len);
}

static int16_t to_steps(float value, float per_step)
{
    float steps = value / per_step;
    if (steps > 32767.0f) return 32767;
    if (steps < -32768.0f) return -32768;
    return (int16_t)(steps < 0 ? steps - 0.5f : steps + 0.5f);
}

static uint8_t on_command(void *ctx, edge_slm_device *dev, const edge_slm_command *cmd)
{
    imu_mic_app *app = (imu_mic_app *)ctx;
    switch (cmd->id) {
    case EDGE_SLM_CMD_START:
    case EDGE_SLM_CMD_STOP:
        app->imu_count = 0; /* a new block starts with the next sample */
        if (dev->enabled[MIC] && !app->mic_running) {
            app->ring_tail = app->ring_head;
            app->mic_running = app->hal.mic_start(dev->streams[MIC].rate_hz);
            if (!app->mic_running) {
                dev->enabled[MIC] = 0;
                edge_slm_device_log(dev, EDGE_SLM_LOG_ERROR, "microphone failed to start");
                return EDGE_SLM_ACK_FAILED;
            }
        } else if (!dev->enabled[MIC] && app->mic_running) {
            app->hal.mic_stop();
            app->mic_running = 0;
        }
        return EDGE_SLM_ACK_OK;
    case EDGE_SLM_CMD_SET_RATE:
        /* The Arduino IMU and PDM libraries run at fixed rates: only those rates are accepted. */
        return EDGE_SLM_ACK_FAILED;
    default:
        return EDGE_SLM_ACK_UNKNOWN_COMMAND;
    }
}

void imu_mic_init(imu_mic_app *app, const imu_mic_hal *hal, uint32_t boot_id, const char *device_name,
                  uint32_t imu_rate_hz, uint32_t mic_rate_hz)
{
    int i;
    memset(app, 0, sizeof *app);
    app->hal = *hal;
    for (i = 0; i < 6; i++) { /* SI units: m/s^2 and rad/s per int16 step */
        app->imu_scales[i] = i < 3 ? G_PER_STEP * STANDARD_GRAVITY : DPS_PER_STEP * DEG_TO_RAD;
    }
    app->mic_scale[0] = 1.0f / 32768.0f;
    app->streams[IMU].kind = EDGE_SLM_STREAM_SENSOR;
    app->streams[IMU].name = "imu";
    app->streams[IMU].rate_hz = imu_rate_hz;
    app->streams[IMU].channels = 6;
    app->streams[IMU].channel_names = imu_names;
    app->streams[IMU].scales = app->imu_scales;
    app->streams[IMU].max_rate_hz = imu_rate_hz;
    app->streams[MIC].kind = EDGE_SLM_STREAM_AUDIO;
    app->streams[MIC].name = "mic";
    app->streams[MIC].rate_hz = mic_rate_hz;
    app->streams[MIC].channels = 1;
    app->streams[MIC].channel_names = mic_names;
    app->streams[MIC].scales = app->mic_scale;
    app->streams[MIC].max_rate_hz = mic_rate_hz;
    edge_slm_device_init(&app->dev, device_name, "edge-slm-imu-mic 1.0", boot_id, app->streams,
                         mic_rate_hz ? 2 : 1, write_frame, on_command, app);
    app->last_micros = app->hal.micros();
}

void imu_mic_begin(imu_mic_app *app)
{
    edge_slm_device_flush_line(&app->dev);
    edge_slm_device_hello(&app->dev);
    edge_slm_device_log(&app->dev, EDGE_SLM_LOG_INFO, "boot ok");
    app->next_heartbeat_ms = app->hal.millis() + IMU_MIC_HEARTBEAT_MS;
}

void imu_mic_rx(imu_mic_app *app, uint8_t byte)
{
    edge_slm_device_feed(&app->dev, byte);
}

uint64_t imu_mic_time_us(imu_mic_app *app)
{
    uint32_t now = app->hal.micros();
    if (now < app->last_micros) {
        app->micros_high += (uint64_t)1 << 32;
    }
    app->last_micros = now;
    return app->micros_high | now;
}

void imu_mic_push_audio(imu_mic_app *app, const int16_t *samples, size_t n)
{
    size_t i;
    uint32_t head = app->ring_head;
    for (i = 0; i < n; i++) {
        if (head - app->ring_tail >= IMU_MIC_AUDIO_RING) {
            app->audio_overruns += (uint32_t)(n - i); /* the host is not keeping up: drop the newest */
            break;
        }
        app->ring[head % IMU_MIC_AUDIO_RING] = samples[i];
        head++;
    }
    app->ring_head = head;
}

static void poll_imu(imu_mic_app *app)
{
    float a[3], g[3];
    uint64_t now;
    int16_t *row;
    if (!app->hal.imu_read(a, g)) {
        return;
    }
    now = imu_mic_time_us(app);
    if (!app->dev.enabled[IMU]) {
        return;
    }
    if (app->imu_count == 0) {
        app->imu_first_us = now;
    }
    row = &app->imu_block[app->imu_count * 6];
    row[0] = to_steps(a[0], G_PER_STEP);
    row[1] = to_steps(a[1], G_PER_STEP);
    row[2] = to_steps(a[2], G_PER_STEP);
    row[3] = to_steps(g[0], DPS_PER_STEP);
    row[4] = to_steps(g[1], DPS_PER_STEP);
    row[5] = to_steps(g[2], DPS_PER_STEP);
    if (++app->imu_count == IMU_MIC_IMU_BLOCK) {
        edge_slm_device_send_samples(&app->dev, IMU, app->imu_block, IMU_MIC_IMU_BLOCK, app->imu_first_us);
        app->imu_count = 0;
    }
}

static void poll_mic(imu_mic_app *app)
{
    int16_t chunk[IMU_MIC_AUDIO_CHUNK];
    uint32_t i, tail = app->ring_tail;
    if (app->dev.n_streams < 2 || !app->dev.enabled[MIC]) {
        return;
    }
    while (app->ring_head - tail >= IMU_MIC_AUDIO_CHUNK) {
        for (i = 0; i < IMU_MIC_AUDIO_CHUNK; i++) {
            chunk[i] = app->ring[(tail + i) % IMU_MIC_AUDIO_RING];
        }
        tail += IMU_MIC_AUDIO_CHUNK;
        app->ring_tail = tail;
        edge_slm_device_send_samples(&app->dev, MIC, chunk, IMU_MIC_AUDIO_CHUNK, 0);
    }
}

void imu_mic_poll(imu_mic_app *app)
{
    uint32_t now_ms = app->hal.millis();
    poll_imu(app);
    poll_mic(app);
    if ((int32_t)(now_ms - app->next_heartbeat_ms) >= 0) {
        app->next_heartbeat_ms = now_ms + IMU_MIC_HEARTBEAT_MS;
        edge_slm_device_heartbeat(&app->dev, now_ms);
        if (app->audio_overruns != app->reported_overruns) {
            app->reported_overruns = app->audio_overruns;
            edge_slm_device_log(&app->dev, EDGE_SLM_LOG_WARNING, "audio ring overrun: samples dropped");
        }
    }
}
