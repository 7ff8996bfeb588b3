/*
 * The logic of the Arduino example sketch (examples/arduino/edge_slm_imu_mic), board-agnostic:
 * a 6-axis IMU and a PDM microphone streamed over the edge-slm serial protocol. The .ino only
 * wires the hardware into imu_mic_hal; host tests drive the same code with a simulated board.
 * C99, no malloc, no OS calls.
 */
#ifndef IMU_MIC_APP_H
#define IMU_MIC_APP_H

#include "edge_slm_device.h"

#ifdef __cplusplus
extern "C" {
#endif

#define IMU_MIC_AUDIO_RING 4096u  /* samples; 256 ms at 16 kHz */
#define IMU_MIC_AUDIO_CHUNK 256u  /* samples per audio frame */
#define IMU_MIC_IMU_BLOCK 13u     /* IMU samples per frame (~8 frames/s at 104 Hz) */
#define IMU_MIC_HEARTBEAT_MS 1000u

typedef struct {
    /* Write a whole frame to the serial port; return len, or 0 when it could not be sent. */
    size_t (*serial_write)(const uint8_t *data, size_t len);
    uint32_t (*millis)(void);
    uint32_t (*micros)(void); /* wraps every 71.6 minutes; the app extends it to 64 bits */
    /* Read one IMU sample when a new one is ready: accel in g (x, y, z), gyro in dps; 1 if read. */
    int (*imu_read)(float accel_g[3], float gyro_dps[3]);
    /* Start/stop the microphone; mic_start returns 1 on success. */
    int (*mic_start)(uint32_t sample_rate);
    void (*mic_stop)(void);
} imu_mic_hal;

typedef struct {
    imu_mic_hal hal;
    edge_slm_device dev;
    edge_slm_stream_desc streams[2];
    float imu_scales[6];
    float mic_scale[1];
    int16_t imu_block[IMU_MIC_IMU_BLOCK * 6];
    unsigned imu_count;
    uint64_t imu_first_us;
    int16_t ring[IMU_MIC_AUDIO_RING];
    volatile uint32_t ring_head; /* written by the microphone interrupt only */
    volatile uint32_t ring_tail; /* written by imu_mic_poll only */
    volatile uint32_t audio_overruns;
    uint32_t reported_overruns;
    int mic_running;
    uint32_t last_micros;
    uint64_t micros_high;
    uint32_t next_heartbeat_ms;
} imu_mic_app;

/* imu_rate_hz: the rate the IMU really runs at (fixed by the IMU library); mic_rate_hz: PDM rate. */
void imu_mic_init(imu_mic_app *app, const imu_mic_hal *hal, uint32_t boot_id, const char *device_name,
                  uint32_t imu_rate_hz, uint32_t mic_rate_hz);
/* Send the boot hello and log; call once at the end of setup(). */
void imu_mic_begin(imu_mic_app *app);
/* Feed one byte received from the host. */
void imu_mic_rx(imu_mic_app *app, uint8_t byte);
/* Call from the microphone callback (interrupt context): copies samples into the ring buffer. */
void imu_mic_push_audio(imu_mic_app *app, const int16_t *samples, size_t n);
/* Call every loop(): reads the IMU, sends full blocks and audio chunks, heartbeats. */
void imu_mic_poll(imu_mic_app *app);
/* The 64-bit microsecond clock used for timestamps. */
uint64_t imu_mic_time_us(imu_mic_app *app);

#ifdef __cplusplus
}
#endif

#endif /* IMU_MIC_APP_H */
