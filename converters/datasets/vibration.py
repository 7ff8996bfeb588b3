"""Synthetic machine-vibration / IMU recordings: rotating machines, their common faults, real sensor artefacts.

Host only (numpy); never imports TensorFlow, edge_slm tasks or devices. Deterministic for a seed.

Physics (what each condition adds to a machine's normal signature)
-------------------------------------------------------------------
A machine is a shaft turning at f_r (15-45 Hz, i.e. 900-2700 rpm) with a slow speed wander of about 1%
(load and supply changes). Everything tied to the shaft is generated from the integrated shaft angle
theta(t) = 2*pi * integral f_r dt, so harmonics stay phase-locked to the rotor while the speed varies.
Accelerometer axes: x and y radial (90 degrees apart, different stiffness), z axial, plus gravity on z.

* normal: 1x, 2x, 3x shaft harmonics of small amplitude (residual unbalance and alignment), broadband
  noise, and the machine frame's structural resonance (150-400 Hz, Q 8-20) excited by that noise.
* imbalance: a rotating force m*e*omega^2 at 1x, phase-locked, radial only; 1x amplitude goes up 3-6x
  (ISO 21940-11; Randall, "Vibration-based Condition Monitoring", Wiley 2011, sec. 2.2).
* misalignment: strong 2x radial and high axial 1x/2x vibration (Piotrowski, "Shaft Alignment Handbook",
  3rd ed., CRC 2006, ch. 2; Randall 2011 sec. 2.2.3).
* bearing outer / inner race defect: every rolling element that passes the defect strikes it, an
  impulse that rings the bearing/housing resonance (900-1400 Hz here, damping 3-6%). The strike rates
  come from the bearing geometry (n balls, ball diameter d, pitch diameter D, contact angle phi):
      BPFO = n/2 * f_r * (1 - d/D cos phi),   BPFI = n/2 * f_r * (1 + d/D cos phi)
  with 1-2% random jitter from rolling-element slip. An outer-race defect sits still in the load zone,
  so its impulses have constant strength; an inner-race defect turns with the shaft through the load
  zone once per revolution, so its impulses are amplitude-modulated at f_r (sidebands at BPFI +- f_r in
  the envelope spectrum). McFadden & Smith, "Model for the vibration produced by a single point defect
  in a rolling element bearing", J. Sound Vib. 96(1), 1984; Randall & Antoni, "Rolling element bearing
  diagnostics - a tutorial", MSSP 25(2), 2011. Geometry ranges bracket the 6205 bearing of the Case
  Western Reserve University data set (9 balls, d/D = 0.203: BPFO = 3.58 x, BPFI = 5.42 x).
* looseness: a loose foot or bearing fit truncates the response; the spectrum shows many 1x harmonics
  (up to ~10x) and half harmonics (0.5x, 1.5x) (Randall 2011 sec. 2.2.4; ISO 13373-3).

Sensor artefacts (Artefacts): slow baseline drift (MEMS offset with temperature), isolated spikes
(EMI glitches), dropouts (lost packets, NaN runs), and saturation: the signal is digitised as an int16
ADC with a full scale (e.g. +-4 g), so shocks beyond it clip at +-32767 counts.

Machines differ in shaft speed, bearing geometry, resonances, noise level, harmonic amplitudes and
axis gains, so a train/test split by machine measures generalisation to machines never seen.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

SAMPLE_RATE = 3200.0  # Hz: the top output data rate of common MEMS accelerometers (ADXL345)
ACCEL_CHANNELS = ("ax", "ay", "az")
GYRO_CHANNELS = ("gx", "gy", "gz")
CONDITIONS = ("normal", "imbalance", "misalignment", "bearing_outer", "bearing_inner", "looseness")
INT16_FULL = 32768
GYRO_FULL_SCALE = 2000.0  # deg/s, the widest range of common MEMS gyros


@dataclass(frozen=True)
class Bearing:
    """Rolling-element bearing geometry; characteristic defect frequencies as multiples of shaft speed."""

    n_balls: int
    ball_d: float  # mm
    pitch_d: float  # mm
    contact_angle_deg: float = 0.0

    @property
    def _ratio(self) -> float:
        return self.ball_d / self.pitch_d * math.cos(math.radians(self.contact_angle_deg))

    def bpfo(self, shaft_hz: float) -> float:
        """Ball-pass frequency, outer race (Hz)."""
        return self.n_balls / 2.0 * shaft_hz * (1.0 - self._ratio)

    def bpfi(self, shaft_hz: float) -> float:
        """Ball-pass frequency, inner race (Hz)."""
        return self.n_balls / 2.0 * shaft_hz * (1.0 + self._ratio)

    def ftf(self, shaft_hz: float) -> float:
        """Fundamental train (cage) frequency (Hz)."""
        return shaft_hz / 2.0 * (1.0 - self._ratio)


@dataclass(frozen=True)
class Machine:
    """One machine's fixed properties; drawn by make_machine from a seed."""

    machine_id: int
    shaft_hz: float
    speed_wander: float  # relative amplitude of the slow speed variation
    bearing: Bearing
    bearing_resonance_hz: float
    bearing_damping: float
    structure_hz: float
    structure_q: float
    noise_g: float
    harmonics_g: tuple[float, float, float]  # 1x, 2x, 3x amplitude in normal operation
    phases: tuple[float, ...]  # fixed phases of shaft-locked components
    axis_gain: tuple[float, float, float]  # x, y, z sensitivity of the mount
    full_scale_g: float = 4.0

    @property
    def rpm(self) -> float:
        return self.shaft_hz * 60.0


@dataclass(frozen=True)
class Artefacts:
    """Sensor artefacts to add; rates are per second of recording."""

    drift_g: float = 0.05  # amplitude of the slow baseline wander
    gravity: bool = True  # 1 g on the z axis, as a MEMS accelerometer measures it
    spike_rate: float = 0.0
    spike_g: float = 2.5
    dropout_rate: float = 0.0
    dropout_len: tuple[int, int] = (5, 120)  # samples
    shock_rate: float = 0.0  # impacts big enough to saturate the int16 ADC
    shock_g: float = 12.0

    @classmethod
    def clean(cls) -> Artefacts:
        return cls(drift_g=0.0, gravity=False)

    @classmethod
    def field_like(cls) -> Artefacts:
        """What a real installation shows now and then: drift, spikes, dropouts and a rare shock."""
        return cls(drift_g=0.1, spike_rate=0.5, dropout_rate=0.3, shock_rate=0.1)


@dataclass
class Recording:
    """samples: float32 [n, channels] in g (accel) and deg/s (gyro); NaN where a sample was lost."""

    samples: np.ndarray
    sample_rate: float
    channels: tuple[str, ...]
    machine: Machine
    condition: str
    severity: float
    t0: float = 0.0
    events: dict[str, list[int]] = field(default_factory=dict)  # artefact kind -> sample indices

    @property
    def label(self) -> int:
        return CONDITIONS.index(self.condition)


def make_machine(machine_id: int, seed: int = 0) -> Machine:
    """Draw a machine's properties; the same (machine_id, seed) always gives the same machine."""
    rng = np.random.default_rng([seed, machine_id, 7919])
    n_balls = int(rng.integers(8, 11))
    pitch = float(rng.uniform(36.0, 46.0))
    ball = pitch * float(rng.uniform(0.18, 0.25))
    a1 = float(rng.uniform(0.03, 0.06))
    return Machine(
        machine_id=machine_id,
        shaft_hz=float(rng.uniform(15.0, 45.0)),
        speed_wander=float(rng.uniform(0.004, 0.015)),
        bearing=Bearing(n_balls, round(ball, 3), round(pitch, 3), float(rng.uniform(0.0, 15.0))),
        bearing_resonance_hz=float(rng.uniform(900.0, 1400.0)),
        bearing_damping=float(rng.uniform(0.03, 0.06)),
        structure_hz=float(rng.uniform(150.0, 400.0)),
        structure_q=float(rng.uniform(8.0, 20.0)),
        noise_g=float(rng.uniform(0.008, 0.02)),
        harmonics_g=(a1, a1 * float(rng.uniform(0.25, 0.45)), a1 * float(rng.uniform(0.08, 0.18))),
        phases=tuple(float(p) for p in rng.uniform(0, 2 * np.pi, 16)),
        axis_gain=(float(rng.uniform(0.9, 1.1)), float(rng.uniform(0.7, 0.95)), float(rng.uniform(0.4, 0.6))),
    )


def _shaft_angle(m: Machine, n: int, fs: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Instantaneous shaft speed (Hz) and integrated angle (rad) with a slow, smooth wander."""
    t = np.arange(n) / fs
    slow = np.sin(2 * np.pi * rng.uniform(0.05, 0.2) * t + rng.uniform(0, 2 * np.pi))
    slow += 0.5 * np.sin(2 * np.pi * rng.uniform(0.3, 0.7) * t + rng.uniform(0, 2 * np.pi))
    speed = m.shaft_hz * (1.0 + m.speed_wander * slow / 1.5)
    theta = 2 * np.pi * np.cumsum(speed) / fs + rng.uniform(0, 2 * np.pi)
    return speed, theta


def _resonance(x: np.ndarray, fs: float, fn: float, zeta: float) -> np.ndarray:
    """x through a single-degree-of-freedom resonator (acceleration response, unit gain at fn / 2 zeta)."""
    n = len(x)
    f = np.fft.rfftfreq(2 * n, 1.0 / fs)
    r = f / fn
    h = (2j * zeta * r) / (1.0 - r**2 + 2j * zeta * r)  # unit peak: a band-pass resonance
    y = np.fft.irfft(np.fft.rfft(x, 2 * n) * h, 2 * n)[:n]
    return y


def _impulse_train(theta: np.ndarray, per_rev: float, fs: float, rng: np.random.Generator,
                   jitter: float) -> tuple[np.ndarray, np.ndarray]:
    """Indices and shaft angles where a defect is struck per_rev times per revolution (with slip jitter)."""
    revs = theta / (2 * np.pi)
    count = (revs - revs[0]) * per_rev
    # slip: each interval between strikes varies by a few percent (Randall & Antoni 2011, sec. 2.1)
    k = np.cumsum(1.0 + rng.normal(0.0, jitter, int(count[-1]) + 2))
    idx = np.searchsorted(count, k)
    idx = idx[(idx > 0) & (idx < len(theta))]
    return idx, theta[idx]


def _bearing_signal(m: Machine, theta: np.ndarray, fs: float, rng: np.random.Generator, inner: bool,
                    strength: float) -> np.ndarray:
    per_rev = m.bearing.bpfi(1.0) if inner else m.bearing.bpfo(1.0)
    idx, angles = _impulse_train(theta, per_rev, fs, rng, jitter=0.015)
    amp = np.full(len(idx), strength)
    if inner:  # the defect turns with the shaft through the load zone once per revolution
        amp *= 0.5 * (1.0 + np.cos(angles - m.phases[5]))
    amp *= rng.uniform(0.8, 1.2, len(idx))
    pulses = np.zeros(len(theta))
    np.add.at(pulses, idx, amp)
    return _resonance(pulses, fs, m.bearing_resonance_hz, m.bearing_damping) * 8.0


def _shaft(theta: np.ndarray, amps: Sequence[float], orders: Sequence[float], phases: Sequence[float],
           shift: float = 0.0) -> np.ndarray:
    out = np.zeros_like(theta)
    for a, k, p in zip(amps, orders, phases):
        out += a * np.cos(k * theta + p + shift)
    return out


def simulate(machine: Machine, condition: str, seconds: float = 4.0, *, seed: int = 0,
             severity: float | None = None, artefacts: Artefacts | None = None, gyro: bool = False,
             sample_rate: float = SAMPLE_RATE, t0: float = 0.0) -> Recording:
    """One recording of MACHINE in CONDITION; severity 0..1 (None draws one), deterministic for seed."""
    if condition not in CONDITIONS:
        raise ValueError(f"unknown condition {condition!r}; choose one of {', '.join(CONDITIONS)}")
    art = artefacts if artefacts is not None else Artefacts()
    rng = np.random.default_rng([seed, machine.machine_id, CONDITIONS.index(condition), 104729])
    sev = float(rng.uniform(0.2, 1.0) if severity is None else severity)
    fs = float(sample_rate)
    n = int(round(seconds * fs))
    m = machine
    _, theta = _shaft_angle(m, n, fs, rng)
    a1, a2, a3 = m.harmonics_g
    ph = m.phases
    # radial x and y see the same rotating vector 90 degrees apart; z (axial) sees a little of it
    x = _shaft(theta, (a1, a2, a3), (1, 2, 3), ph[:3])
    y = _shaft(theta, (a1, a2, a3), (1, 2, 3), ph[:3], shift=-np.pi / 2)
    z = _shaft(theta, (0.25 * a1, 0.2 * a2), (1, 2), ph[3:5])
    if condition == "imbalance":
        extra = a1 * 6.0 * sev
        x += extra * np.cos(theta + ph[0])
        y += extra * np.cos(theta + ph[0] - np.pi / 2)
    elif condition == "misalignment":
        k2 = a1 * 4.0 * sev
        x += k2 * np.cos(2 * theta + ph[6])
        y += k2 * np.cos(2 * theta + ph[6] - np.pi / 2)
        z += a1 * 3.0 * sev * np.cos(theta + ph[7]) + k2 * 0.8 * np.cos(2 * theta + ph[8])
    elif condition in ("bearing_outer", "bearing_inner"):
        b = _bearing_signal(m, theta, fs, rng, condition == "bearing_inner", strength=0.8 * sev)
        x += b
        y += 0.7 * b
        z += 0.3 * b
    elif condition == "looseness":
        base = a1 * 2.5 * sev
        orders = [0.5, 1.5] + list(range(1, 11))
        amps = [0.4 * base, 0.3 * base] + [base / (k**0.6) for k in range(1, 11)]
        x += _shaft(theta, amps, orders, ph[2:14])
        y += 0.8 * _shaft(theta, amps, orders, ph[1:13], shift=-np.pi / 2)
        z += 0.4 * _shaft(theta, amps, orders, ph[3:15])
    sig = np.stack([x, y, z], axis=1)
    noise = rng.normal(0.0, m.noise_g, (n, 3))
    structure = np.stack([_resonance(rng.normal(0.0, m.noise_g, n), fs, m.structure_hz, 0.5 / m.structure_q)
                          for _ in range(3)], axis=1)
    sig = (sig + noise + 1.5 * structure) * np.asarray(m.axis_gain)
    events: dict[str, list[int]] = {}
    if condition == "looseness":  # the loose part also rattles: a little more broadband energy
        sig += rng.normal(0.0, m.noise_g * sev, (n, 3))
    channels = ACCEL_CHANNELS
    if gyro:
        sig = np.concatenate([sig, _gyro(sig, fs, rng)], axis=1)
        channels = ACCEL_CHANNELS + GYRO_CHANNELS
    sig = _add_artefacts(sig, fs, rng, art, events)
    sig = _adc(sig, m.full_scale_g, gyro)
    if art.dropout_rate > 0:
        for _ in range(rng.poisson(art.dropout_rate * seconds)):
            start = int(rng.integers(0, n))
            length = int(rng.integers(art.dropout_len[0], art.dropout_len[1] + 1))
            sig[start:start + length, :] = np.nan  # a lost packet loses every axis
            events.setdefault("dropout", []).append(start)
    return Recording(sig.astype(np.float32), fs, channels, m, condition, sev, t0, events)


def _gyro(accel: np.ndarray, fs: float, rng: np.random.Generator) -> np.ndarray:
    """Angular rate (deg/s) of a housing rocking about a pivot 0.15 m away: velocity / lever arm."""
    n = len(accel)
    f = np.fft.rfftfreq(n, 1.0 / fs)
    spec = np.fft.rfft(accel[:, [1, 0, 2]] * 9.81, axis=0)
    w = 2j * np.pi * np.maximum(f, 1e-9)
    vel_spec = np.where(f[:, None] > 5.0, spec / w[:, None], 0.0)
    vel = np.fft.irfft(vel_spec, n, axis=0)
    rate = np.degrees(vel / 0.15)
    return rate + rng.normal(0.0, 0.05, (n, 3))


def _add_artefacts(sig: np.ndarray, fs: float, rng: np.random.Generator, art: Artefacts,
                   events: dict[str, list[int]]) -> np.ndarray:
    n = len(sig)
    t = np.arange(n) / fs
    if art.gravity:
        sig[:, 2] += 1.0
    if art.drift_g > 0:
        for c in range(sig.shape[1]):
            f1, f2 = rng.uniform(0.01, 0.08), rng.uniform(0.1, 0.3)
            sig[:, c] += art.drift_g * (np.sin(2 * np.pi * f1 * t + rng.uniform(0, 6.3))
                                        + 0.3 * np.sin(2 * np.pi * f2 * t + rng.uniform(0, 6.3)))
    for _ in range(rng.poisson(art.spike_rate * n / fs)):
        i = int(rng.integers(0, n))
        sig[i, int(rng.integers(0, 3))] += art.spike_g * rng.choice([-1.0, 1.0])
        events.setdefault("spike", []).append(i)
    for _ in range(rng.poisson(art.shock_rate * n / fs)):
        i = int(rng.integers(0, n))
        length = min(n - i, int(0.05 * fs))
        tt = np.arange(length) / fs
        ring = art.shock_g * np.exp(-tt * 60.0) * np.sin(2 * np.pi * 180.0 * tt + 1.0)
        sig[i:i + length, :3] += ring[:, None] * np.array([1.0, 0.6, 0.3])
        events.setdefault("shock", []).append(i)
    return sig


def _adc(sig: np.ndarray, full_scale_g: float, gyro: bool) -> np.ndarray:
    """Digitise as a 16-bit ADC: quantise to counts and clip at full scale (accel; gyro at +-2000 deg/s)."""
    out = sig.copy()
    for cols, fs in (((0, 1, 2), full_scale_g), ((3, 4, 5), GYRO_FULL_SCALE)):
        cols = [c for c in cols if c < sig.shape[1]]
        if not cols or (not gyro and cols[0] >= 3):
            continue
        counts = np.clip(np.round(sig[:, cols] / fs * INT16_FULL), -INT16_FULL, INT16_FULL - 1)
        out[:, cols] = counts * (fs / INT16_FULL)
    return out


def make_dataset(n_machines: int = 16, seconds: float = 4.0, *, seed: int = 0,
                 conditions: Sequence[str] = CONDITIONS, artefacts: Artefacts | None = None,
                 gyro: bool = False, normal_only: int = 0) -> list[Recording]:
    """One recording per (machine, condition) for machines 0..n_machines-1, then `normal_only` more
    machines recorded in normal operation only (healthy machines are plentiful, faulty ones rare).
    Deterministic for seed."""
    out = []
    for mid in range(n_machines + normal_only):
        m = make_machine(mid, seed)
        for cond in (conditions if mid < n_machines else ("normal",)):
            out.append(simulate(m, cond, seconds, seed=seed, artefacts=artefacts, gyro=gyro))
    return out


def split_by_machine(recordings: Sequence[Recording], fractions: Sequence[float] = (0.6, 0.2, 0.2),
                     seed: int = 0) -> list[list[Recording]]:
    """Split into groups (train, val, test, ...) so that no machine appears in two groups.

    Machines with fault recordings and normal-only machines are split separately, so every group
    gets its share of both.
    """
    conds: dict[int, set[str]] = {}
    for r in recordings:
        conds.setdefault(r.machine.machine_id, set()).add(r.condition)
    groups: list[set[int]] = [set() for _ in fractions]
    rng = np.random.default_rng(seed)
    for kind in (True, False):
        ids = sorted(i for i, c in conds.items() if (c == {"normal"}) is kind)
        order = list(rng.permutation(ids)) if ids else []
        counts = [int(round(f * len(ids))) for f in fractions]
        counts[0] = len(ids) - sum(counts[1:])
        start = 0
        for g, c in zip(groups, counts):
            g.update(int(i) for i in order[start:start + c])
            start += c
    return [[r for r in recordings if r.machine.machine_id in g] for g in groups]
