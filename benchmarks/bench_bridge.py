"""Serial-bridge decode throughput: the Python FrameDecoder (alone, and with payload parsing as
McuSession does it) and the C decoder (edge_slm_frame.c, built with gcc -O2), for sensor and audio
frames, against what common baud rates deliver (bytes/s = baud / 10 with 8N1 framing).

Host script. Implementations run interleaved round by round, so drift on the shared machine hits
all of them alike; the table shows the median round.

    .venv/bin/python benchmarks/bench_bridge.py [--mbytes 4] [--rounds 3] [--json]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # for _common, which puts the repo root on sys.path

import numpy as np  # noqa: E402
from _common import ROOT, loadavg, machine, say  # noqa: E402

from edge_slm.table import format_table  # noqa: E402
from firmware_bridge.protocol import (  # noqa: E402
    FrameDecoder,
    Heartbeat,
    MsgType,
    encode_frame,
    pack_audio_chunk,
    pack_heartbeat,
    pack_sensor_samples,
    unpack_audio_chunk,
    unpack_sensor_samples,
)

BAUDS = [9600, 115200, 230400, 460800, 921600, 2_000_000]
READ_CHUNK = 4096  # what one serial read typically returns at high rates

C_BENCH = r"""
#define _POSIX_C_SOURCE 199309L
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include "edge_slm_frame.h"
/* bench_decode FILE ROUNDS: feed FILE through the byte-at-a-time decoder ROUNDS times. */
int main(int argc, char **argv) {
    FILE *f = fopen(argv[1], "rb");
    long size, r, rounds = atol(argv[2]);
    unsigned char *buf;
    unsigned long frames = 0, checksum = 0;
    size_t i;
    struct timespec a, b;
    static edge_slm_frame_decoder dec;
    edge_slm_frame fr;
    if (!f) return 2;
    fseek(f, 0, SEEK_END); size = ftell(f); fseek(f, 0, SEEK_SET);
    buf = malloc((size_t)size);
    if (fread(buf, 1, (size_t)size, f) != (size_t)size) return 2;
    edge_slm_frame_decoder_init(&dec);
    clock_gettime(CLOCK_MONOTONIC, &a);
    for (r = 0; r < rounds; r++)
        for (i = 0; i < (size_t)size; i++)
            if (edge_slm_frame_decoder_feed(&dec, buf[i], &fr)) { frames++; checksum += fr.seq + fr.length; }
    clock_gettime(CLOCK_MONOTONIC, &b);
    printf("%lu %lu %.9f\n", frames, checksum, (b.tv_sec - a.tv_sec) + (b.tv_nsec - a.tv_nsec) * 1e-9);
    return dec.counters.resyncs != 0;
}
"""


def gcc_version(gcc: str | None) -> str:
    if not gcc:
        return "not installed"
    return subprocess.run([gcc, "--version"], capture_output=True, text=True).stdout.splitlines()[0]


def workloads(mbytes: float) -> dict[str, tuple[bytes, int, int]]:
    """name -> (stream, frames, payload bytes per frame); each stream is about mbytes long."""
    rng = np.random.default_rng(0)
    payloads = {
        "imu 6ch x 20 (sensor)": pack_sensor_samples(rng.integers(-2000, 2000, (20, 6)).astype(np.int16), 200, 1),
        "imu 6ch x 84 (sensor, max)": pack_sensor_samples(rng.integers(-2000, 2000, (84, 6)).astype(np.int16), 200, 1),
        "pcm16 x 256 (audio)": pack_audio_chunk((rng.normal(0, 3000, 256)).astype(np.int16), 16000),
        "pcm16 x 510 (audio, max)": pack_audio_chunk((rng.normal(0, 3000, 510)).astype(np.int16), 16000),
        "heartbeat (20 B)": pack_heartbeat(Heartbeat(1, 2, 3, 4, 5)),
    }
    out = {}
    for name, payload in payloads.items():
        msg_type = MsgType.HEARTBEAT if name.startswith("heartbeat") else (
            MsgType.AUDIO_CHUNK if "audio" in name else MsgType.SENSOR_SAMPLES)
        one = len(encode_frame(msg_type, 0, payload))
        n = max(1, int(mbytes * 1e6 / one))
        stream = b"".join(encode_frame(msg_type, i & 0xFFFF, payload) for i in range(n))
        out[name] = (stream, n, len(payload))
    return out


def bench_python(stream: bytes, n: int, parse: bool) -> float:
    decoder = FrameDecoder()
    got = 0
    t = time.perf_counter()
    for i in range(0, len(stream), READ_CHUNK):
        for frame in decoder.feed(stream[i : i + READ_CHUNK]):
            got += 1
            if parse:
                if frame.msg_type == MsgType.SENSOR_SAMPLES:
                    unpack_sensor_samples(frame.payload).samples.astype(np.float32)
                elif frame.msg_type == MsgType.AUDIO_CHUNK:
                    unpack_audio_chunk(frame.payload).samples.astype(np.float32)
    elapsed = time.perf_counter() - t
    assert got == n and decoder.counters.resyncs == 0
    return elapsed


def build_c(gcc: str, tmp: Path) -> Path:
    src = tmp / "bench_decode.c"
    src.write_text(C_BENCH)
    out = tmp / "bench_decode"
    c_dir = ROOT / "firmware_bridge" / "c"
    subprocess.run([gcc, "-std=c99", "-O2", "-I", str(c_dir), "-o", str(out), str(src),
                    str(c_dir / "edge_slm_frame.c")], check=True, capture_output=True, text=True)
    return out


def bench_c(binary: Path, path: Path, n: int, stream_len: int) -> float:
    rounds = max(1, int(20e6 / stream_len))  # about 20 MB per measurement, so startup does not count
    out = subprocess.run([str(binary), str(path), str(rounds)], capture_output=True, text=True, check=True)
    frames, _, seconds = out.stdout.split()
    assert int(frames) == n * rounds
    return float(seconds) / rounds


def build_virtual_mcu(gcc: str, tmp: Path) -> Path:
    c_dir = ROOT / "firmware_bridge" / "c"
    out = tmp / "virtual_mcu"
    subprocess.run([gcc, "-std=c99", "-O2", "-o", str(out), str(c_dir / "virtual_mcu.c"),
                    str(c_dir / "edge_slm_device.c"), str(c_dir / "edge_slm_frame.c"), "-lm"],
                   check=True, capture_output=True, text=True)
    return out


def bench_end_to_end(binary: Path, tmp: Path, stream: str, seconds: float) -> dict[str, Any]:
    """The virtual MCU at full speed on a pty, read by SerialLink + McuSession: what a host really sustains."""
    from firmware_bridge.mcu import McuSession

    raw = tmp / "noise.raw"
    raw.write_bytes(np.random.default_rng(1).normal(0, 3000, 16000).astype("<i2").tobytes())
    link = tmp / f"tty_{stream}"
    proc = subprocess.Popen([str(binary), "--pty", str(link), "--speed", "0", "--audio", str(raw), "--audio-loop",
                             "--imu-block", "20", "--audio-block", "256", "--heartbeat-ms", "0"],
                            stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    while "ready" not in proc.stderr.readline():
        pass
    blocks = [0, 0]  # blocks, samples

    def on_block(block: Any) -> None:
        blocks[0] += 1
        blocks[1] += len(block.samples)

    session = McuSession.from_url(str(link), on_block=on_block)
    try:
        session.start(timeout=10)
        session.command("start", {"stream": stream})
        c0, t0 = session.counters, time.perf_counter()
        time.sleep(seconds)
        c1, t1 = session.counters, time.perf_counter()
        session.command("stop", timeout=5)
    finally:
        session.stop()
        proc.terminate()
        proc.wait(timeout=10)
    dt = t1 - t0
    return {"frames_per_s": (c1["frames"] - c0["frames"]) / dt,
            "mb_per_s": (c1["link_bytes_in"] - c0["link_bytes_in"]) / dt / 1e6,
            "link_drops": c1["link_dropped"] - c0["link_dropped"], "lost_frames": c1["lost_frames"] - c0["lost_frames"]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mbytes", type=float, default=4.0, help="size of each test stream in MB (4)")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the median is reported (3)")
    ap.add_argument("--e2e-seconds", type=float, default=3.0, help="end-to-end measurement per stream (3)")
    ap.add_argument("--json", action="store_true", help="print JSON instead of tables")
    args = ap.parse_args()

    gcc = shutil.which("gcc")
    mach = machine(packages=("numpy",), extra={"gcc": gcc_version(gcc)}, host=("kernel",))
    loads = workloads(args.mbytes)
    impls = ["python decoder", "python decoder + parse", "C decoder (-O2)"] if gcc else [
        "python decoder", "python decoder + parse"]
    times: dict[tuple[str, str], list[float]] = {}
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        binary = build_c(gcc, tmp) if gcc else None
        paths = {}
        for i, (name, (stream, _, _)) in enumerate(loads.items()):
            paths[name] = tmp / f"stream{i}.bin"
            paths[name].write_bytes(stream)
        for r in range(args.rounds):
            say(f"round {r + 1}/{args.rounds}")
            for name, (stream, n, _) in loads.items():
                for impl in impls:
                    if impl.startswith("C"):
                        s = bench_c(binary, paths[name], n, len(stream))
                    else:
                        s = bench_python(stream, n, parse=impl.endswith("parse"))
                    times.setdefault((name, impl), []).append(s)
        e2e = {}
        if gcc:
            vmcu = build_virtual_mcu(gcc, tmp)
            for stream in ("imu", "mic"):
                say(f"end to end: {stream}")
                e2e[stream] = bench_end_to_end(vmcu, tmp, stream, args.e2e_seconds)
    mach["loadavg_end"] = loadavg()

    rows = []
    for name, (stream, n, payload) in loads.items():
        for impl in impls:
            s = statistics.median(times[(name, impl)])
            rows.append({"payload": name, "impl": impl, "payload_bytes": payload, "wire_bytes": len(stream) // n,
                         "frames_per_s": n / s, "mb_per_s": len(stream) / s / 1e6})
    baud_rows = []
    for baud in BAUDS:
        line = baud / 10
        row: dict[str, Any] = {"baud": baud, "line_kb_per_s": line / 1e3}
        for r in rows:
            row[f"{r['impl']} | {r['payload']}"] = r["mb_per_s"] * 1e6 / line
        baud_rows.append(row)

    if args.json:
        print(json.dumps({"machine": mach, "throughput": rows, "headroom": baud_rows, "end_to_end": e2e}, indent=1))
        return 0
    print(format_table(["machine", ""], [[k, v] for k, v in mach.items()]))
    print()
    print(format_table(
        ["payload", "implementation", "payload B", "wire B/frame", "frames/s", "MB/s"],
        [[r["payload"], r["impl"], r["payload_bytes"], r["wire_bytes"], f"{r['frames_per_s']:.0f}",
          f"{r['mb_per_s']:.2f}"] for r in rows]))
    if e2e:
        print()
        print("End to end: virtual MCU at full speed -> pty -> SerialLink thread -> McuSession -> on_block")
        print(format_table(
            ["stream", "frames/s", "MB/s", "headroom at 2 Mbaud", "link queue drops", "lost frames"],
            [[("imu 6ch x 20 (sensor)" if k == "imu" else "pcm16 x 256 (audio)"), f"{v['frames_per_s']:.0f}",
              f"{v['mb_per_s']:.2f}", f"{v['mb_per_s'] * 1e6 / 200_000:.0f}x", v["link_drops"], v["lost_frames"]]
             for k, v in e2e.items()]))
    print()
    print("Headroom = decoder bytes/s / line bytes/s (baud/10); below 1 the host cannot keep up with a saturated line.")
    for name in loads:
        print()
        print(format_table(
            ["baud", "line KB/s", "line frames/s", *[f"{impl}" for impl in impls]],
            [[b["baud"], f"{b['line_kb_per_s']:.1f}",
              f"{b['baud'] / 10 / (len(loads[name][0]) / loads[name][1]):.0f}",
              *[f"{b[f'{impl} | {name}']:.0f}x" for impl in impls]] for b in baud_rows]))
        print(f"  ({name})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
