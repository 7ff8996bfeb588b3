/*
 * virtual_mcu: a host-built stand-in for a microcontroller that speaks the edge-slm serial
 * protocol over a pty or an inherited file descriptor, using the same edge_slm_device.c as the
 * Arduino sketch. Portable C99 + POSIX. Run `virtual_mcu --help` for the options.
 *
 * It streams 6-channel int16 IMU samples (accelerometer in g steps, gyro in dps steps: a sine
 * vibration plus a configurable fault harmonic), PCM16 audio read from a WAV or raw file,
 * heartbeats and logs, answers commands with acks, and can damage its output on purpose
 * (--corrupt P, seeded) while keeping exact books on which frames that cost the host.
 * On exit (or when --frames is reached) it prints one report line on stderr:
 *   virtual_mcu: report sent=N dropped=N corrupted=N lost=N last_seq=N lost_seqs=a,b,...
 * where lost_seqs are the frames a correct decoder cannot deliver: hit themselves, or following
 * a frame whose delimiter was hit.
 */
#define _XOPEN_SOURCE 600
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <termios.h>
#include <time.h>
#include <unistd.h>

#include "edge_slm_device.h"

#define PI 3.14159265358979323846
#define MAX_LOST 200000
#define IMU_CH 6
#define G_PER_STEP (1.0 / 8192.0)  /* +-4 g full scale */
#define DPS_PER_STEP (1.0 / 65.536) /* +-500 dps full scale */

typedef struct {
    /* options */
    const char *pty_link;
    int fd;
    const char *name;
    uint32_t boot_id;
    uint32_t seed;
    uint32_t imu_rate;
    unsigned imu_block;
    double vib_hz, vib_amp_g, fault_harmonic, fault_amp_g, noise_g;
    const char *audio_path;
    uint32_t audio_rate;
    unsigned audio_block;
    int audio_loop;
    int autostart;
    unsigned heartbeat_ms;
    double speed;
    double corrupt;
    long max_frames;
    double linger_s;
    /* state */
    uint32_t rng, noise_rng;
    int16_t *audio;
    size_t audio_len, audio_pos;
    uint64_t imu_n, audio_n;
    double imu_base_s, audio_base_s;
    uint32_t corrupted, lost;
    uint16_t lost_seqs[MAX_LOST];
    int prev_delimiter_hit;
    long last_seq;
    edge_slm_device dev;
} vmcu;

static volatile sig_atomic_t stop_requested;

static void on_signal(int sig)
{
    (void)sig;
    stop_requested = 1;
}

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static uint32_t xorshift32(uint32_t *state)
{
    uint32_t x = *state;
    x ^= x << 13;
    x ^= x >> 17;
    x ^= x << 5;
    return *state = x;
}

static double uniform(uint32_t *state)
{
    return (double)(xorshift32(state) >> 8) / 16777216.0;
}

/* Write everything, waiting for the port to take it (the pty is non-blocking). */
static int write_all(int fd, const uint8_t *data, size_t len)
{
    size_t done = 0;
    while (done < len) {
        ssize_t n = write(fd, data + done, len - done);
        if (n > 0) {
            done += (size_t)n;
        } else if (n < 0 && (errno == EAGAIN || errno == EINTR)) {
            struct pollfd p;
            p.fd = fd;
            p.events = POLLOUT;
            p.revents = 0;
            if (stop_requested) {
                return -1;
            }
            poll(&p, 1, 50);
        } else {
            return -1;
        }
    }
    return 0;
}

static size_t port_write(void *ctx, const uint8_t *data, size_t len)
{
    vmcu *m = (vmcu *)ctx;
    uint8_t buf[EDGE_SLM_FRAME_MAX_ENCODED];
    size_t i;
    int hit = 0;
    if (len > sizeof buf) {
        return 0;
    }
    memcpy(buf, data, len);
    if (m->corrupt > 0) {
        for (i = 0; i < len; i++) {
            if (uniform(&m->rng) < m->corrupt) {
                buf[i] ^= (uint8_t)(1u + xorshift32(&m->rng) % 255u);
                hit = 1;
            }
        }
    }
    if (len > 1) { /* a frame, not the boot-time lone delimiter */
        if (hit) {
            m->corrupted++;
        }
        if ((hit || m->prev_delimiter_hit) && m->lost < MAX_LOST) {
            m->lost_seqs[m->lost++] = m->dev.current_seq;
        }
        m->last_seq = m->dev.current_seq;
    }
    m->prev_delimiter_hit = buf[len - 1] != 0;
    if (write_all(m->fd, buf, len) != 0) {
        return 0;
    }
    return len;
}

static uint8_t app_command(void *ctx, edge_slm_device *dev, const edge_slm_command *cmd)
{
    vmcu *m = (vmcu *)ctx;
    char msg[128];
    if (cmd->id == EDGE_SLM_CMD_START || cmd->id == EDGE_SLM_CMD_STOP || cmd->id == EDGE_SLM_CMD_SET_RATE) {
        /* restart sample clocks so timestamps stay consistent with the (new) rate */
        m->imu_n = 0;
        m->audio_n = 0;
        m->imu_base_s = -1;
        m->audio_base_s = -1;
        snprintf(msg, sizeof msg, "%.*s: imu %s at %lu Hz, mic %s", (int)cmd->name.len, cmd->name.ptr,
                 dev->enabled[0] ? "on" : "off", (unsigned long)dev->streams[0].rate_hz,
                 dev->n_streams > 1 && dev->enabled[1] ? "on" : "off");
        edge_slm_device_log(dev, EDGE_SLM_LOG_INFO, msg);
        return EDGE_SLM_ACK_OK;
    }
    if (cmd->id == EDGE_SLM_CMD_SET || edge_slm_str_eq(cmd->name, "set")) {
        edge_slm_str v = edge_slm_command_arg(cmd, "fault_amp");
        char num[32];
        char *end;
        double x;
        if (v.ptr == NULL || v.len == 0 || v.len >= sizeof num) {
            return EDGE_SLM_ACK_BAD_ARGS;
        }
        memcpy(num, v.ptr, v.len);
        num[v.len] = '\0';
        x = strtod(num, &end);
        if (*end != '\0' || x < 0 || x > 3.5) {
            return EDGE_SLM_ACK_BAD_ARGS;
        }
        m->fault_amp_g = x;
        snprintf(msg, sizeof msg, "fault amplitude now %.3f g", x);
        edge_slm_device_log(dev, EDGE_SLM_LOG_INFO, msg);
        return EDGE_SLM_ACK_OK;
    }
    if (cmd->id == EDGE_SLM_CMD_RESET) {
        return EDGE_SLM_ACK_FAILED; /* a virtual MCU reset is a process restart: kill and start it */
    }
    snprintf(msg, sizeof msg, "unknown command %.*s", (int)cmd->name.len, cmd->name.ptr);
    edge_slm_device_log(dev, EDGE_SLM_LOG_WARNING, msg);
    return EDGE_SLM_ACK_UNKNOWN_COMMAND;
}

static int16_t clamp16(double v)
{
    if (v > 32767.0) return 32767;
    if (v < -32768.0) return -32768;
    return (int16_t)lrint(v);
}

static void imu_block(vmcu *m, int16_t *out, unsigned n, uint64_t first)
{
    unsigned i;
    double rate = (double)m->dev.streams[0].rate_hz;
    for (i = 0; i < n; i++) {
        double t = m->imu_base_s + (double)(first + i) / rate;
        double w = 2.0 * PI * m->vib_hz * t;
        double vib = m->vib_amp_g * sin(w) + m->fault_amp_g * sin(m->fault_harmonic * w);
        double g[IMU_CH];
        int c;
        g[0] = vib;
        g[1] = 0.5 * m->vib_amp_g * sin(w + 1.0) + 0.5 * m->fault_amp_g * sin(m->fault_harmonic * w + 2.0);
        g[2] = 1.0 + 0.3 * vib; /* gravity on z */
        g[3] = 20.0 * sin(w + 0.5) / DPS_PER_STEP * G_PER_STEP;
        g[4] = 10.0 * sin(w + 1.5) / DPS_PER_STEP * G_PER_STEP;
        g[5] = 5.0 * m->fault_amp_g * sin(m->fault_harmonic * w) / DPS_PER_STEP * G_PER_STEP;
        for (c = 0; c < IMU_CH; c++) {
            double noise = (uniform(&m->noise_rng) - 0.5) * 2.0 * m->noise_g;
            out[i * IMU_CH + c] = clamp16((g[c] + noise) / G_PER_STEP);
        }
    }
}

static uint32_t rd32(const uint8_t *p) { return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24; }
static uint16_t rd16(const uint8_t *p) { return (uint16_t)(p[0] | p[1] << 8); }

/* WAV (PCM16 mono) or raw PCM16 LE at --audio-rate. */
static int load_audio(vmcu *m)
{
    FILE *f = fopen(m->audio_path, "rb");
    uint8_t *data;
    long size;
    size_t start = 0, len, i;
    if (f == NULL || fseek(f, 0, SEEK_END) != 0 || (size = ftell(f)) < 0 || fseek(f, 0, SEEK_SET) != 0) {
        fprintf(stderr, "virtual_mcu: cannot read audio file %s: %s\n", m->audio_path, strerror(errno));
        if (f) fclose(f);
        return -1;
    }
    data = (uint8_t *)malloc((size_t)size + 1);
    if (data == NULL || fread(data, 1, (size_t)size, f) != (size_t)size) {
        fprintf(stderr, "virtual_mcu: cannot read audio file %s\n", m->audio_path);
        fclose(f);
        free(data);
        return -1;
    }
    fclose(f);
    len = (size_t)size;
    if (len >= 12 && memcmp(data, "RIFF", 4) == 0 && memcmp(data + 8, "WAVE", 4) == 0) {
        size_t pos = 12;
        int have_fmt = 0;
        len = 0;
        while (pos + 8 <= (size_t)size) {
            uint32_t csize = rd32(data + pos + 4);
            if (memcmp(data + pos, "fmt ", 4) == 0 && csize >= 16 && pos + 8 + 16 <= (size_t)size) {
                const uint8_t *c = data + pos + 8;
                if (rd16(c) != 1 || rd16(c + 2) != 1 || rd16(c + 14) != 16) {
                    fprintf(stderr, "virtual_mcu: %s is not 16-bit mono PCM (format %u, %u channels, %u bits); "
                            "convert it with sox or ffmpeg\n", m->audio_path, rd16(c), rd16(c + 2), rd16(c + 14));
                    free(data);
                    return -1;
                }
                m->audio_rate = rd32(c + 4);
                have_fmt = 1;
            } else if (memcmp(data + pos, "data", 4) == 0) {
                start = pos + 8;
                len = (size_t)size - start; /* espeak-ng writing to a pipe leaves the size unset */
                if (csize < len) len = csize;
                break;
            }
            pos += 8 + csize + (csize & 1u);
        }
        if (!have_fmt || start == 0) {
            fprintf(stderr, "virtual_mcu: %s has no fmt or data chunk\n", m->audio_path);
            free(data);
            return -1;
        }
    }
    m->audio_len = len / 2;
    m->audio = (int16_t *)malloc((m->audio_len ? m->audio_len : 1) * sizeof(int16_t));
    if (m->audio == NULL) {
        free(data);
        return -1;
    }
    for (i = 0; i < m->audio_len; i++) {
        m->audio[i] = (int16_t)rd16(data + start + 2 * i);
    }
    free(data);
    return 0;
}

static int open_pty(vmcu *m)
{
    struct termios t;
    int master = posix_openpt(O_RDWR | O_NOCTTY);
    int slave;
    const char *name;
    if (master < 0 || grantpt(master) != 0 || unlockpt(master) != 0 || (name = ptsname(master)) == NULL) {
        fprintf(stderr, "virtual_mcu: cannot create a pty: %s\n", strerror(errno));
        return -1;
    }
    /* Raw mode before the host opens it, so no byte is translated or echoed meanwhile. The slave
     * stays open here, so the master never sees a hangup while the host reconnects. */
    slave = open(name, O_RDWR | O_NOCTTY);
    if (slave < 0 || tcgetattr(slave, &t) != 0) {
        fprintf(stderr, "virtual_mcu: cannot open %s: %s\n", name, strerror(errno));
        return -1;
    }
    t.c_iflag &= ~(tcflag_t)(IGNBRK | BRKINT | PARMRK | ISTRIP | INLCR | IGNCR | ICRNL | IXON);
    t.c_oflag &= ~(tcflag_t)OPOST;
    t.c_lflag &= ~(tcflag_t)(ECHO | ECHONL | ICANON | ISIG | IEXTEN);
    t.c_cflag &= ~(tcflag_t)(CSIZE | PARENB);
    t.c_cflag |= CS8;
    t.c_cc[VMIN] = 1;
    t.c_cc[VTIME] = 0;
    if (tcsetattr(slave, TCSANOW, &t) != 0) {
        fprintf(stderr, "virtual_mcu: cannot set raw mode on %s: %s\n", name, strerror(errno));
        return -1;
    }
    if (m->pty_link != NULL) {
        unlink(m->pty_link);
        if (symlink(name, m->pty_link) != 0) {
            fprintf(stderr, "virtual_mcu: cannot link %s -> %s: %s\n", m->pty_link, name, strerror(errno));
            return -1;
        }
    }
    fprintf(stderr, "virtual_mcu: pty %s link %s\n", name, m->pty_link ? m->pty_link : "-");
    return master;
}

static void report(vmcu *m)
{
    uint32_t i;
    fprintf(stderr, "virtual_mcu: report sent=%lu dropped=%lu corrupted=%lu lost=%lu last_seq=%ld lost_seqs=",
            (unsigned long)m->dev.frames_sent, (unsigned long)m->dev.frames_dropped, (unsigned long)m->corrupted,
            (unsigned long)m->lost, m->last_seq);
    for (i = 0; i < m->lost; i++) {
        fprintf(stderr, i ? ",%u" : "%u", (unsigned)m->lost_seqs[i]);
    }
    fprintf(stderr, "\n");
    fflush(stderr);
}

static void usage(void)
{
    fprintf(stderr,
            "usage: virtual_mcu (--pty LINK | --fd N) [options]\n"
            "  --pty LINK          create a pty and symlink LINK to its slave (the host opens LINK)\n"
            "  --fd N              speak over an inherited file descriptor instead\n"
            "  --name NAME         device name in hello (virtual-mcu)\n"
            "  --boot-id N         boot id in hello (default: from seed and time)\n"
            "  --seed N            seed for noise and corruption (1)\n"
            "  --imu-rate HZ       IMU sample rate (200)      --imu-block N  samples per frame (20)\n"
            "  --vib-hz F          vibration frequency (30)   --vib-amp G    its amplitude in g (0.5)\n"
            "  --fault-harmonic K  fault at K x vib-hz (3)    --fault-amp G  fault amplitude in g (0)\n"
            "  --noise G           uniform noise in g (0.01)\n"
            "  --audio FILE        PCM16 mono WAV, or raw PCM16 LE at --audio-rate (16000)\n"
            "  --audio-block N     audio samples per frame, <= 510 (256)   --audio-loop  repeat the file\n"
            "  --autostart         stream from boot instead of waiting for a start command\n"
            "  --heartbeat-ms N    heartbeat period, wall clock (500; 0 = none)\n"
            "  --speed X           1 = real time, 10 = ten times faster, 0 = as fast as the port takes (1)\n"
            "  --corrupt P         replace each sent byte with probability P (0)\n"
            "  --frames N          stop streaming after N frames, report, linger, exit\n"
            "  --linger S          seconds to keep answering commands after --frames (1)\n");
}

static int parse_args(vmcu *m, int argc, char **argv)
{
    int i;
    for (i = 1; i < argc; i++) {
        const char *a = argv[i];
        const char *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (strcmp(a, "--autostart") == 0) { m->autostart = 1; continue; }
        if (strcmp(a, "--audio-loop") == 0) { m->audio_loop = 1; continue; }
        if (strcmp(a, "--help") == 0) { usage(); exit(0); }
        if (v == NULL) { fprintf(stderr, "virtual_mcu: %s needs a value\n", a); return -1; }
        i++;
        if (strcmp(a, "--pty") == 0) m->pty_link = v;
        else if (strcmp(a, "--fd") == 0) m->fd = atoi(v);
        else if (strcmp(a, "--name") == 0) m->name = v;
        else if (strcmp(a, "--boot-id") == 0) m->boot_id = (uint32_t)strtoul(v, NULL, 0);
        else if (strcmp(a, "--seed") == 0) m->seed = (uint32_t)strtoul(v, NULL, 0);
        else if (strcmp(a, "--imu-rate") == 0) m->imu_rate = (uint32_t)strtoul(v, NULL, 0);
        else if (strcmp(a, "--imu-block") == 0) m->imu_block = (unsigned)strtoul(v, NULL, 0);
        else if (strcmp(a, "--vib-hz") == 0) m->vib_hz = atof(v);
        else if (strcmp(a, "--vib-amp") == 0) m->vib_amp_g = atof(v);
        else if (strcmp(a, "--fault-harmonic") == 0) m->fault_harmonic = atof(v);
        else if (strcmp(a, "--fault-amp") == 0) m->fault_amp_g = atof(v);
        else if (strcmp(a, "--noise") == 0) m->noise_g = atof(v);
        else if (strcmp(a, "--audio") == 0) m->audio_path = v;
        else if (strcmp(a, "--audio-rate") == 0) m->audio_rate = (uint32_t)strtoul(v, NULL, 0);
        else if (strcmp(a, "--audio-block") == 0) m->audio_block = (unsigned)strtoul(v, NULL, 0);
        else if (strcmp(a, "--heartbeat-ms") == 0) m->heartbeat_ms = (unsigned)strtoul(v, NULL, 0);
        else if (strcmp(a, "--speed") == 0) m->speed = atof(v);
        else if (strcmp(a, "--corrupt") == 0) m->corrupt = atof(v);
        else if (strcmp(a, "--frames") == 0) m->max_frames = atol(v);
        else if (strcmp(a, "--linger") == 0) m->linger_s = atof(v);
        else { fprintf(stderr, "virtual_mcu: unknown option %s (see --help)\n", a); return -1; }
    }
    if ((m->pty_link == NULL) == (m->fd < 0)) {
        fprintf(stderr, "virtual_mcu: give exactly one of --pty LINK or --fd N\n");
        return -1;
    }
    if (m->imu_rate == 0 || m->imu_block == 0 || m->imu_block * IMU_CH * 2u + EDGE_SLM_SENSOR_HEADER_SIZE >
        EDGE_SLM_FRAME_MAX_PAYLOAD || m->audio_block == 0 || m->audio_block > 510 || m->speed < 0 ||
        m->corrupt < 0 || m->corrupt > 1) {
        fprintf(stderr, "virtual_mcu: need imu-rate > 0, 1 <= imu-block <= 84, 1 <= audio-block <= 510, "
                        "speed >= 0, 0 <= corrupt <= 1\n");
        return -1;
    }
    return 0;
}

static void service_rx(vmcu *m, int timeout_ms)
{
    struct pollfd p;
    uint8_t buf[512];
    ssize_t n, i;
    p.fd = m->fd;
    p.events = POLLIN;
    p.revents = 0;
    if (poll(&p, 1, timeout_ms) <= 0 || !(p.revents & POLLIN)) {
        return;
    }
    n = read(m->fd, buf, sizeof buf);
    for (i = 0; i < n; i++) {
        edge_slm_device_feed(&m->dev, buf[i]);
    }
}

int main(int argc, char **argv)
{
    static vmcu m;
    static const char *const imu_names[IMU_CH] = {"ax", "ay", "az", "gx", "gy", "gz"};
    static const char *const mic_names[1] = {"mic"};
    static float imu_scales[IMU_CH];
    static const float mic_scale[1] = {1.0f / 32768.0f};
    static int16_t samples[510 * IMU_CH];
    edge_slm_stream_desc streams[2];
    double t0, next_hb, vt, linger_until = -1;
    int c;
    struct sigaction sa;

    m.fd = -1;
    m.name = "virtual-mcu";
    m.seed = 1;
    m.imu_rate = 200;
    m.imu_block = 20;
    m.vib_hz = 30;
    m.vib_amp_g = 0.5;
    m.fault_harmonic = 3;
    m.noise_g = 0.01;
    m.audio_rate = 16000;
    m.audio_block = 256;
    m.heartbeat_ms = 500;
    m.speed = 1.0;
    m.max_frames = -1;
    m.linger_s = 1.0;
    m.last_seq = -1;
    if (parse_args(&m, argc, argv) != 0) {
        return 2;
    }
    m.rng = m.seed * 2654435761u + 1u;
    m.noise_rng = m.seed * 40503u + 7u;
    if (m.boot_id == 0) {
        m.boot_id = (uint32_t)time(NULL) ^ ((uint32_t)getpid() << 16) ^ m.seed;
    }
    if (m.audio_path != NULL && load_audio(&m) != 0) {
        return 2;
    }
    for (c = 0; c < IMU_CH; c++) { /* scales in SI units: m/s^2 and rad/s per step */
        imu_scales[c] = c < 3 ? (float)(G_PER_STEP * 9.80665) : (float)(DPS_PER_STEP * PI / 180.0);
    }
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_signal;
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    signal(SIGPIPE, SIG_IGN);
    if (m.pty_link != NULL && (m.fd = open_pty(&m)) < 0) {
        return 1;
    }
    fcntl(m.fd, F_SETFL, fcntl(m.fd, F_GETFL) | O_NONBLOCK);

    streams[0].kind = EDGE_SLM_STREAM_SENSOR;
    streams[0].name = "imu";
    streams[0].rate_hz = m.imu_rate;
    streams[0].channels = IMU_CH;
    streams[0].channel_names = imu_names;
    streams[0].scales = imu_scales;
    streams[0].max_rate_hz = 6660;
    streams[1].kind = EDGE_SLM_STREAM_AUDIO;
    streams[1].name = "mic";
    streams[1].rate_hz = m.audio_rate;
    streams[1].channels = 1;
    streams[1].channel_names = mic_names;
    streams[1].scales = mic_scale;
    streams[1].max_rate_hz = 48000;
    edge_slm_device_init(&m.dev, m.name, "virtual-mcu 1.0", m.boot_id, streams, m.audio ? 2 : 1, port_write,
                         app_command, &m);
    m.imu_base_s = m.audio_base_s = -1;
    edge_slm_device_flush_line(&m.dev);
    edge_slm_device_hello(&m.dev);
    edge_slm_device_log(&m.dev, EDGE_SLM_LOG_INFO, "boot ok");
    if (m.autostart) {
        m.dev.enabled[0] = 1;
        m.dev.enabled[1] = m.audio != NULL;
    }
    fprintf(stderr, "virtual_mcu: ready boot_id=%lu\n", (unsigned long)m.boot_id);
    fflush(stderr);

    t0 = now_s();
    next_hb = t0 + m.heartbeat_ms / 1000.0;
    vt = 0;
    while (!stop_requested) {
        double now = now_s();
        int imu_on = m.dev.enabled[0], mic_on = m.dev.n_streams > 1 && m.dev.enabled[1];
        double next_imu, next_mic, next_event = 1e30;
        int wait_ms;

        if (linger_until >= 0) {
            if (now >= linger_until) break;
            service_rx(&m, 20);
            continue;
        }
        if (m.imu_base_s < 0) m.imu_base_s = vt;
        if (m.audio_base_s < 0) m.audio_base_s = vt;
        next_imu = m.imu_base_s + (double)m.imu_n / m.dev.streams[0].rate_hz;
        next_mic = m.audio_base_s + (double)m.audio_n / m.dev.streams[1].rate_hz;
        if (imu_on) next_event = next_imu;
        if (mic_on && next_mic < next_event) next_event = next_mic;

        if (m.speed > 0) {
            vt = (now - t0) * m.speed;
            double wait_s = next_event > vt ? (next_event - vt) / m.speed : 0.0;
            wait_ms = wait_s > 0.05 ? 50 : (int)(wait_s * 1000.0) + (wait_s > 0);
        } else {
            wait_ms = (imu_on || mic_on) ? 0 : 20;
            if (imu_on || mic_on) vt = next_event;
        }
        if (m.heartbeat_ms) {
            int hb_ms = (int)((next_hb - now) * 1000.0) + 1;
            if (hb_ms < wait_ms) wait_ms = hb_ms < 0 ? 0 : hb_ms;
        }
        if (wait_ms > 50) wait_ms = 50;
        service_rx(&m, wait_ms);
        now = now_s();
        if (m.heartbeat_ms && now >= next_hb) {
            edge_slm_device_heartbeat(&m.dev, (uint32_t)((now - t0) * 1000.0));
            next_hb += m.heartbeat_ms / 1000.0;
            if (next_hb < now) next_hb = now + m.heartbeat_ms / 1000.0;
        }
        imu_on = m.dev.enabled[0];
        mic_on = m.dev.n_streams > 1 && m.dev.enabled[1];
        if (m.imu_base_s >= 0 && imu_on && vt >= m.imu_base_s + (double)m.imu_n / m.dev.streams[0].rate_hz) {
            uint64_t ts = (uint64_t)llround((m.imu_base_s + (double)m.imu_n / m.dev.streams[0].rate_hz) * 1e6);
            imu_block(&m, samples, m.imu_block, m.imu_n);
            edge_slm_device_send_samples(&m.dev, 0, samples, m.imu_block, ts);
            m.imu_n += m.imu_block;
        }
        if (m.audio_base_s >= 0 && mic_on && vt >= m.audio_base_s + (double)m.audio_n / m.dev.streams[1].rate_hz) {
            size_t n = m.audio_block;
            if (m.audio_pos >= m.audio_len) {
                if (m.audio_loop && m.audio_len > 0) {
                    m.audio_pos = 0;
                } else {
                    m.dev.enabled[1] = 0;
                    edge_slm_device_log(&m.dev, EDGE_SLM_LOG_INFO, "audio file finished");
                    n = 0;
                }
            }
            if (n > m.audio_len - m.audio_pos) n = m.audio_len - m.audio_pos;
            if (n > 0) {
                edge_slm_device_send_samples(&m.dev, 1, m.audio + m.audio_pos, n, 0);
                m.audio_pos += n;
                m.audio_n += n;
            }
        }
        if (m.max_frames >= 0 && (long)(m.dev.frames_sent + m.dev.frames_dropped) >= m.max_frames) {
            m.dev.enabled[0] = m.dev.enabled[1] = 0;
            report(&m);
            linger_until = now_s() + m.linger_s;
        }
    }
    if (linger_until < 0) {
        report(&m);
    }
    if (m.pty_link != NULL) {
        unlink(m.pty_link); /* unplugged: the device node goes away */
    }
    free(m.audio);
    return 0;
}
