// edge-slm serial bridge example: 6-axis IMU + PDM microphone streamed to the host.
// Thin on purpose: all protocol and streaming logic is in imu_mic_app.c (tested on the host with
// gcc); this file only connects the Arduino libraries to it. See README.md for boards and wiring.
//
// The .c/.h files next to this sketch are copies of firmware_bridge/c/ (a test keeps them equal).

#include <PDM.h>

#if defined(ARDUINO_ARDUINO_NANO33BLE)
#include <Arduino_LSM9DS1.h>  // Nano 33 BLE / BLE Sense (rev 1): accel+gyro at 119 Hz
#define IMU_RATE_HZ 119
#define BOARD_NAME "nano33-ble"
#else
#include <Arduino_LSM6DS3.h>  // Nano 33 IoT, Nano RP2040 Connect (LSM6DSOX: use Arduino_LSM6DSOX): 104 Hz
#define IMU_RATE_HZ 104
#define BOARD_NAME "nano33-iot"
#endif

#include "imu_mic_app.h"

#define SERIAL_BAUD 921600  // ignored by native USB CDC, used by UART bridges
#define MIC_RATE_HZ 16000

static imu_mic_app app;
static int16_t pdm_buffer[256];

static size_t hal_serial_write(const uint8_t *data, size_t len) {
  // Blocking write: at 16 kHz audio + IMU the link needs ~35 KB/s, far below USB CDC speed.
  return Serial.write(data, len);
}
static uint32_t hal_millis(void) { return millis(); }
static uint32_t hal_micros(void) { return micros(); }

static int hal_imu_read(float accel_g[3], float gyro_dps[3]) {
  if (!IMU.accelerationAvailable() || !IMU.gyroscopeAvailable()) return 0;
  IMU.readAcceleration(accel_g[0], accel_g[1], accel_g[2]);
  IMU.readGyroscope(gyro_dps[0], gyro_dps[1], gyro_dps[2]);
  return 1;
}

static void on_pdm_data() {  // interrupt context: copy and return
  int bytes = PDM.available();
  if (bytes > (int)sizeof pdm_buffer) bytes = sizeof pdm_buffer;
  PDM.read(pdm_buffer, bytes);
  imu_mic_push_audio(&app, pdm_buffer, (size_t)bytes / 2);
}

static int hal_mic_start(uint32_t rate) {
  PDM.onReceive(on_pdm_data);
  return PDM.begin(1, (long)rate) ? 1 : 0;
}
static void hal_mic_stop(void) { PDM.end(); }

void setup() {
  Serial.begin(SERIAL_BAUD);
  while (!Serial) {
  }
  static const imu_mic_hal hal = {hal_serial_write, hal_millis, hal_micros, hal_imu_read, hal_mic_start,
                                  hal_mic_stop};
  // A boot id that differs between resets tells the host a new stream began.
  uint32_t boot_id = micros() ^ ((uint32_t)analogRead(A0) << 16) ^ 0x5eed1234u;
  imu_mic_init(&app, &hal, boot_id, BOARD_NAME, IMU_RATE_HZ, MIC_RATE_HZ);
  int imu_ok = IMU.begin();
  imu_mic_begin(&app);
  if (!imu_ok) {
    edge_slm_device_log(&app.dev, EDGE_SLM_LOG_ERROR, "IMU not found: check the board and the IMU library");
  }
}

void loop() {
  while (Serial.available() > 0) {
    imu_mic_rx(&app, (uint8_t)Serial.read());
  }
  imu_mic_poll(&app);
}
