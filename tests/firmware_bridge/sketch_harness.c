/*
 * Runs the Arduino sketch's logic (firmware_bridge/c/imu_mic_app.c) on a simulated board:
 * a 104 Hz IMU producing a known motion, a 16 kHz microphone producing a ramp, a micros() clock
 * that wraps 2 s after boot, and a serial port that is stdout. Host bytes from a file are fed in
 * at a given simulated time.   usage: sketch_harness HOST_BYTES FEED_AT_MS RUN_MS > out.bin
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>

#include "imu_mic_app.h"

static uint64_t sim_us;
static uint64_t next_imu_us, next_mic_us;
static int mic_on;
static uint32_t mic_n;
static imu_mic_app app;

#define WRAP_OFFSET (0xFFFFFFFFu - 2000000u)

static size_t hal_write(const uint8_t *data, size_t len) { return fwrite(data, 1, len, stdout); }
static uint32_t hal_millis(void) { return (uint32_t)(sim_us / 1000u); }
static uint32_t hal_micros(void) { return (uint32_t)(sim_us + WRAP_OFFSET); }

static int hal_imu_read(float a[3], float g[3])
{
    double t;
    if (sim_us < next_imu_us) return 0;
    t = (double)next_imu_us / 1e6;
    next_imu_us += 1000000u / 104u;
    a[0] = (float)(0.5 * sin(2 * 3.14159265358979 * 5.0 * t));
    a[1] = -0.25f;
    a[2] = 1.0f;
    g[0] = 0.0f;
    g[1] = 250.0f;
    g[2] = (float)(100.0 * cos(2 * 3.14159265358979 * 5.0 * t));
    return 1;
}

static int hal_mic_start(uint32_t rate) { mic_on = rate == 16000u; next_mic_us = sim_us; return mic_on; }
static void hal_mic_stop(void) { mic_on = 0; }

int main(int argc, char **argv)
{
    static const imu_mic_hal hal = {hal_write, hal_millis, hal_micros, hal_imu_read, hal_mic_start, hal_mic_stop};
    static uint8_t host[65536];
    size_t n_host = 0, i;
    uint64_t feed_at, run_until;
    FILE *f;
    if (argc != 4 || (f = fopen(argv[1], "rb")) == NULL) {
        fprintf(stderr, "usage: sketch_harness HOST_BYTES FEED_AT_MS RUN_MS\n");
        return 2;
    }
    n_host = fread(host, 1, sizeof host, f);
    fclose(f);
    feed_at = (uint64_t)atol(argv[2]) * 1000u;
    run_until = (uint64_t)atol(argv[3]) * 1000u;
    imu_mic_init(&app, &hal, 0xB007u, "sim-board", 104, 16000);
    imu_mic_begin(&app);
    for (; sim_us < run_until; sim_us += 100) {
        if (sim_us == feed_at) {
            for (i = 0; i < n_host; i++) imu_mic_rx(&app, host[i]);
        }
        if (mic_on && sim_us >= next_mic_us) { /* a PDM interrupt with 16 ms of audio */
            int16_t buf[256];
            for (i = 0; i < 256; i++) buf[i] = (int16_t)(mic_n++ % 30000u);
            imu_mic_push_audio(&app, buf, 256);
            next_mic_us += 16000u;
        }
        imu_mic_poll(&app);
    }
    return 0;
}
