"""A keyword-spotting dataset spoken by espeak-ng: commands, unknown words and noise-only clips, split by voice.

Host only (needs /usr/bin/espeak-ng); numpy + edge_slm.audio. Never imports TensorFlow.

Vocabulary: the ten Speech Commands words (yes no up down left right on off stop go), an `_unknown_`
class (other words, several chosen to sound close to a command: yet, nope, cup, town, lift, light, of,
top, goat ...) and `_silence_` (noise only). A voice is an espeak-ng language voice plus a variant
("en-gb+m3"); the held-out split uses variants that never occur in training, so its accuracy measures
voices the model has not heard. Utterances are synthesised at 22,050 Hz, cached on disk by
(text, voice, speed, pitch), resampled to 16 kHz with edge_slm.audio.resample, placed at a random
offset in a 1 s clip and mixed with white, pink, brown or hum/fan noise at the requested SNRs.
Everything is deterministic for a seed.
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import subprocess
import tempfile
import wave
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edge_slm.errors import ConversionError

COMMANDS = ("yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go")
UNKNOWN_LABEL = "_unknown_"
SILENCE_LABEL = "_silence_"
# Close to a command (first group) or just other words; no homophones of a command (know, write).
UNKNOWN_WORDS = (
    "yet", "yep", "yak", "nope", "note", "cup", "pup", "town", "gown", "lift", "loft", "light", "bright", "ride",
    "of", "oft", "top", "shop", "stock", "goat", "gold", "dog", "bed", "bird", "cat", "happy", "house", "tree",
    "wow", "seven", "eight", "nine", "zero", "four", "learn", "follow", "forward", "hello", "table", "water",
    "music", "window", "coffee", "yellow", "sheila", "marvin", "bottom", "start", "over", "open",
)
LANGUAGES = ("en-us", "en-gb", "en-gb-scotland", "en-gb-x-gbclan", "en-gb-x-rp", "en-gb-x-gbcwmd", "en-029",
             "en-us-nyc")
TRAIN_VARIANTS = ("m1", "m2", "m4", "m6", "m7", "m8", "f1", "f3", "f4", "klatt", "klatt4", "Alex", "Alicia",
                  "Andrea", "Annie", "anika", "aunty", "belinda", "david", "Gene", "grandma", "john", "linda", "max",
                  "Mike", "quincy", "robert", "shelby", "travis")
HELDOUT_VARIANTS = ("m3", "m5", "f2", "f5", "klatt2", "Andy", "paul", "steph")
NOISES = ("white", "pink", "brown", "hum")
SPEECH_RATE = 22050  # what espeak-ng writes
ESPEAK = "espeak-ng"

Progress = Callable[[int, int, str], None]


def voices(variants: Sequence[str], languages: Sequence[str] = LANGUAGES) -> list[str]:
    """Every language voice with every variant: ["en-us+m1", "en-gb+m1", ...]."""
    return [f"{lang}+{v}" for v in variants for lang in languages]


def labels_for(commands: Sequence[str] = COMMANDS) -> list[str]:
    """Class names in model output order: the commands, then _unknown_, then _silence_."""
    return [*commands, UNKNOWN_LABEL, SILENCE_LABEL]


def espeak_binary() -> str:
    path = shutil.which(ESPEAK) or ("/usr/bin/espeak-ng" if os.access("/usr/bin/espeak-ng", os.X_OK) else None)
    if path is None:
        raise ConversionError("espeak-ng is not installed; the keyword dataset is spoken by it: apt-get install espeak-ng")
    return path


# --- speech ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Utterance:
    """One espeak-ng rendition; the cache key."""

    text: str
    voice: str
    speed: int  # words per minute (-s)
    pitch: int  # 0..99 (-p)

    def key(self) -> str:
        raw = f"{self.text}\0{self.voice}\0{self.speed}\0{self.pitch}".encode()
        return hashlib.sha1(raw).hexdigest()[:20]


def _read_pcm16(data: bytes) -> tuple[np.ndarray, int]:
    with wave.open(io.BytesIO(data)) as w:
        rate, width, channels = w.getframerate(), w.getsampwidth(), w.getnchannels()
        frames = w.readframes(w.getnframes())
    if width != 2:
        raise ConversionError(f"espeak-ng wrote {8 * width}-bit audio; expected 16-bit")
    pcm = np.frombuffer(frames, dtype="<i2").astype(np.float32) / 32768.0
    return pcm.reshape(-1, channels).mean(axis=1), rate


def _synthesize(u: Utterance, cache_dir: Path, binary: str) -> Path:
    path = cache_dir / f"{u.key()}.wav"
    if path.is_file():
        return path
    fd, tmp = tempfile.mkstemp(suffix=".wav", dir=cache_dir)
    os.close(fd)
    try:
        cmd = [binary, "-v", u.voice, "-s", str(u.speed), "-p", str(u.pitch), "-w", tmp, u.text]
        proc = subprocess.run(cmd, capture_output=True, timeout=60)
        if proc.returncode != 0 or os.path.getsize(tmp) <= 44:
            raise ConversionError(f"espeak-ng failed for {u}: {proc.stderr.decode(errors='replace').strip()[:200]}")
        os.replace(tmp, path)  # atomic: a parallel writer of the same key never leaves a torn file
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def _speak(u: Utterance, cache_dir: str, binary: str, sample_rate: int) -> str:
    """Worker: espeak-ng -> 22,050 Hz WAV (cached) -> trimmed, resampled float32 .npy (cached); returns its path."""
    from edge_slm.audio import resample

    cache = Path(cache_dir)
    out = cache / f"{u.key()}-{sample_rate}.npy"
    if out.is_file():
        return str(out)
    pcm, rate = _read_pcm16(_synthesize(u, cache, binary).read_bytes())
    pcm = trim(pcm)
    if rate != sample_rate:
        pcm = resample(pcm, rate, sample_rate)
    fd, tmp = tempfile.mkstemp(suffix=".npy", dir=cache)
    with os.fdopen(fd, "wb") as fh:
        np.save(fh, np.asarray(pcm, dtype=np.float32))
    os.replace(tmp, out)
    return str(out)


def synthesize(utterances: Sequence[Utterance], cache_dir: str | Path, *, workers: int = 2,
               sample_rate: int = 16000, progress: Progress | None = None) -> dict[Utterance, np.ndarray]:
    """Speak every distinct utterance -> trimmed float32 audio at `sample_rate`.

    espeak-ng runs in `workers` worker processes, each also trimming the silence around the word and
    resampling 22,050 Hz -> sample_rate with edge_slm.audio.resample (CPU-bound, hence processes, not
    threads). Both the WAV and the resampled audio are cached in cache_dir.
    """
    cache = Path(cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    binary = espeak_binary()
    todo = list(dict.fromkeys(utterances))
    paths: dict[Utterance, str] = {}
    missing = []
    for u in todo:
        p = cache / f"{u.key()}-{sample_rate}.npy"
        if p.is_file():
            paths[u] = str(p)
        else:
            missing.append(u)
    if 0 < len(missing) <= 8 or workers <= 1:
        for i, u in enumerate(missing, 1):
            _speak(u, str(cache), binary, sample_rate)
            if progress:
                progress(len(todo) - len(missing) + i, len(todo), "speaking")
    elif missing:
        _run_workers(missing, cache, binary, sample_rate, workers, len(todo) - len(missing), len(todo), progress)
    for u in missing:
        paths[u] = str(cache / f"{u.key()}-{sample_rate}.npy")
    return {u: np.load(paths[u]) for u in todo}


def _run_workers(missing: list[Utterance], cache: Path, binary: str, sample_rate: int, workers: int,
                 done: int, total: int, progress: Progress | None) -> None:
    """Split the jobs over `workers` fresh Python processes (python -m converters.datasets.keywords);
    plain subprocesses, so no fork of a process that may run TensorFlow's threads and no __main__ re-import."""
    import json
    import sys
    import time

    n = max(1, min(workers, len(missing) // 16 + 1))
    chunks = [missing[i::n] for i in range(n)]
    root = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH", "")]))}
    procs = []
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        for i, chunk in enumerate(chunks):
            job = Path(tmp) / f"job{i}.json"
            job.write_text(json.dumps([[u.text, u.voice, u.speed, u.pitch] for u in chunk]))
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "converters.datasets.keywords", "speak", str(job), str(cache), binary,
                 str(sample_rate)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))
        outs = [cache / f"{u.key()}-{sample_rate}.npy" for u in missing]
        try:
            while any(p.poll() is None for p in procs):
                time.sleep(0.25)
                if progress:
                    progress(done + sum(o.is_file() for o in outs), total, "speaking")
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                p.wait()
        for p in procs:
            if p.returncode != 0:
                err = p.stderr.read().decode(errors="replace").strip().splitlines() if p.stderr else []
                raise ConversionError(f"a speech worker failed: {err[-1] if err else f'exit {p.returncode}'}")
            if p.stderr:
                p.stderr.close()
    if progress:
        progress(total, total, "speaking")


def trim(x: np.ndarray, rel_threshold: float = 0.02, pad: int = 220) -> np.ndarray:
    """Cut the silence espeak-ng puts around a word (keeps `pad` samples either side)."""
    if len(x) == 0:
        return x
    loud = np.flatnonzero(np.abs(x) >= rel_threshold * max(float(np.max(np.abs(x))), 1e-9))
    if len(loud) == 0:
        return x[:0]
    return x[max(0, loud[0] - pad): loud[-1] + pad]


# --- noise ----------------------------------------------------------------------------------------
def _spectral(rng: np.random.Generator, n: int, exponent: float) -> np.ndarray:
    """Gaussian noise whose power falls as 1/f**exponent (0 white, 1 pink, 2 brown), unit RMS."""
    spec = np.fft.rfft(rng.standard_normal(n))
    f = np.arange(len(spec), dtype=np.float64)
    f[0] = 1.0
    spec *= f ** (-exponent / 2.0)
    spec[0] = 0.0
    x = np.fft.irfft(spec, n)
    return x / max(float(np.sqrt(np.mean(x ** 2))), 1e-12)


def _hum(rng: np.random.Generator, n: int, rate: int) -> np.ndarray:
    """Mains hum (50 or 60 Hz and harmonics) plus a fan: low band noise modulated at the blade rate."""
    t = np.arange(n) / rate
    mains = rng.choice([50.0, 60.0])
    hum = sum(rng.uniform(0.3, 1.0) / k * np.sin(2 * np.pi * mains * k * t + rng.uniform(0, 2 * np.pi))
              for k in range(1, 9))
    spec = np.fft.rfft(rng.standard_normal(n))
    freqs = np.fft.rfftfreq(n, 1 / rate)
    lo, hi = rng.uniform(80, 200), rng.uniform(600, 1500)
    spec *= np.exp(-0.5 * ((np.log(np.maximum(freqs, 1.0)) - np.log(np.sqrt(lo * hi))) / 0.6) ** 2)
    fan = np.fft.irfft(spec, n)
    fan /= max(float(np.sqrt(np.mean(fan ** 2))), 1e-12)
    blade = rng.uniform(8, 30)
    fan *= 1.0 + 0.5 * np.sin(2 * np.pi * blade * t + rng.uniform(0, 2 * np.pi))
    x = rng.uniform(0.3, 1.0) * hum / max(float(np.sqrt(np.mean(hum ** 2))), 1e-12) + fan
    return x / max(float(np.sqrt(np.mean(x ** 2))), 1e-12)


def make_noise(kind: str, n: int, rng: np.random.Generator, sample_rate: int = 16000) -> np.ndarray:
    """Unit-RMS noise of a kind in NOISES, float64 [n]."""
    if kind == "white":
        x = rng.standard_normal(n)
        return x / max(float(np.sqrt(np.mean(x ** 2))), 1e-12)
    if kind == "pink":
        return _spectral(rng, n, 1.0)
    if kind == "brown":
        return _spectral(rng, n, 2.0)
    if kind == "hum":
        return _hum(rng, n, sample_rate)
    raise ConversionError(f"unknown noise {kind!r}; choose from {', '.join(NOISES)}")


def _rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(x, dtype=np.float64)))) if len(x) else 0.0


# --- clips ----------------------------------------------------------------------------------------
@dataclass
class KeywordSplit:
    """audio: float32 [n, clip samples]; y: int32 class ids; meta: one dict per clip."""

    audio: np.ndarray
    y: np.ndarray
    meta: list[dict[str, Any]]

    @property
    def voices(self) -> set[str]:
        return {m["voice"] for m in self.meta if m["voice"]}

    def __len__(self) -> int:
        return len(self.y)


@dataclass
class KeywordDataset:
    labels: list[str]
    sample_rate: int
    clip_s: float
    train: KeywordSplit
    test: KeywordSplit  # held-out voices only
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def commands(self) -> list[str]:
        return [lab for lab in self.labels if lab not in (UNKNOWN_LABEL, SILENCE_LABEL)]


@dataclass(frozen=True)
class _ClipPlan:
    label: int
    utterance: Utterance | None  # None: a silence clip
    noise: str
    snr_db: float | None
    gain: float
    seed: int


def _plan_split(rng: np.random.Generator, commands: Sequence[str], unknown_words: Sequence[str],
                voice_list: Sequence[str], per_command: int, unknown_share: float, silence_share: float,
                noises: Sequence[str], snrs: Sequence[float], speeds: tuple[int, int],
                pitches: tuple[int, int], mixes: int) -> list[_ClipPlan]:
    n_unknown = int(round(per_command * unknown_share * len(commands)))
    n_silence = int(round(per_command * silence_share * len(commands)))
    unknown_order = rng.permutation(max(n_unknown, 1))
    texts = [(i, w) for i, w in enumerate(commands) for _ in range(-(-per_command // mixes))]
    texts += [(len(commands), unknown_words[k % len(unknown_words)]) for k in unknown_order[:-(-n_unknown // mixes)]]
    plans = []
    # Voices cycle so every voice speaks every command about equally often.
    order = rng.permutation(len(voice_list))
    counts: dict[int, int] = {}
    for j, (label, text) in enumerate(texts):
        voice = voice_list[order[j % len(order)]] if label < len(commands) else voice_list[rng.integers(len(voice_list))]
        u = Utterance(text, voice, int(rng.integers(speeds[0], speeds[1] + 1) // 5 * 5),
                      int(rng.integers(pitches[0], pitches[1] + 1) // 5 * 5))
        want = per_command if label < len(commands) else n_unknown
        for _ in range(mixes):  # the same rendition in several mixes (noise, SNR, offset, level)
            if counts.get(label, 0) >= want:
                break
            counts[label] = counts.get(label, 0) + 1
            plans.append(_ClipPlan(label, u, str(rng.choice(list(noises))), float(rng.choice(list(snrs))),
                                   float(rng.uniform(0.15, 0.9)), int(rng.integers(2 ** 31))))
    for _ in range(n_silence):
        plans.append(_ClipPlan(len(commands) + 1, None, str(rng.choice(list(noises))), None,
                               float(np.exp(rng.uniform(np.log(3e-4), np.log(0.08)))), int(rng.integers(2 ** 31))))
    return plans


def mix_clip(speech: np.ndarray | None, plan_noise: str, snr_db: float | None, gain: float, n: int,
             rng: np.random.Generator, sample_rate: int) -> tuple[np.ndarray, dict[str, Any]]:
    """Place `speech` at a random offset in n samples and add noise at snr_db; None speech -> noise only.

    For speech, `gain` is the peak of the mixed clip; for noise only it is the noise RMS.
    """
    noise = make_noise(plan_noise, n, rng, sample_rate)
    info: dict[str, Any] = {"offset_s": None, "duration_s": 0.0}
    if speech is None:
        return (noise * gain).astype(np.float32), info
    s = speech[:n]
    offset = int(rng.integers(0, n - len(s) + 1))
    clip = np.zeros(n)
    clip[offset:offset + len(s)] = s
    # SNR against the speech power where it is voiced, not diluted by the rest of the second.
    noise *= _rms(s) / (10 ** (snr_db / 20.0))
    clip += noise
    clip *= gain / max(float(np.max(np.abs(clip))), 1e-9)
    info.update(offset_s=offset / sample_rate, duration_s=len(s) / sample_rate)
    return clip.astype(np.float32), info


def _render(plans: list[_ClipPlan], speech: dict[Utterance, np.ndarray], n: int, sample_rate: int,
            labels: list[str]) -> KeywordSplit:
    audio = np.zeros((len(plans), n), dtype=np.float32)
    meta = []
    for i, p in enumerate(plans):
        rng = np.random.default_rng(p.seed)
        clip, info = mix_clip(speech[p.utterance] if p.utterance else None, p.noise, p.snr_db, p.gain, n, rng,
                              sample_rate)
        audio[i] = clip
        u = p.utterance
        meta.append({"label": labels[p.label], "text": u.text if u else "", "voice": u.voice if u else "",
                     "speed": u.speed if u else None, "pitch": u.pitch if u else None, "noise": p.noise,
                     "snr_db": p.snr_db, "gain": round(p.gain, 4), **info})
    return KeywordSplit(audio, np.asarray([p.label for p in plans], dtype=np.int32), meta)


def tqdm_progress(desc: str = "keywords") -> Progress:
    """A Progress callback drawing a tqdm bar on stderr."""
    from tqdm import tqdm

    bars: dict[str, Any] = {}

    def update(done: int, total: int, what: str) -> None:
        bar = bars.get(what)
        if bar is None:
            bar = bars[what] = tqdm(total=total, desc=f"{desc}: {what}", unit="utt", leave=False, dynamic_ncols=True)
        bar.update(done - bar.n)
        if done >= total:
            bar.close()

    return update


def make_keyword_dataset(
    cache_dir: str | Path,
    *,
    commands: Sequence[str] = COMMANDS,
    unknown_words: Sequence[str] = UNKNOWN_WORDS,
    train_variants: Sequence[str] = TRAIN_VARIANTS,
    heldout_variants: Sequence[str] = HELDOUT_VARIANTS,
    languages: Sequence[str] = LANGUAGES,
    train_per_command: int = 300,
    test_per_command: int = 30,
    unknown_share: float = 0.5,
    silence_share: float = 0.12,
    noises: Sequence[str] = NOISES,
    snrs_db: Sequence[float] = (20.0, 10.0, 5.0),
    speeds: tuple[int, int] = (130, 210),
    pitches: tuple[int, int] = (15, 85),
    sample_rate: int = 16000,
    clip_s: float = 1.0,
    mixes_per_utterance: int = 2,
    seed: int = 0,
    workers: int = 2,
    progress: Progress | None = None,
) -> KeywordDataset:
    """Speak, mix and split the dataset. `unknown_share`/`silence_share` are clip counts relative to
    all command clips (0.5 -> half as many unknown clips as command clips in total).

    The test split uses only `heldout_variants` voices; training never hears them. With
    `mixes_per_utterance` > 1 each espeak-ng rendition is mixed into that many clips (other noise, SNR,
    offset and level): fewer espeak-ng calls for the same number of clips.
    """
    if set(train_variants) & set(heldout_variants):
        raise ConversionError(f"variants in both splits: {sorted(set(train_variants) & set(heldout_variants))}")
    if not commands or len(set(commands)) != len(commands):
        raise ConversionError("commands must be distinct and non-empty")
    clash = set(commands) & set(unknown_words)
    if clash:
        raise ConversionError(f"{sorted(clash)} are commands and unknown words at once")
    for k in noises:
        make_noise(k, 16, np.random.default_rng(0), sample_rate)  # validates the names early
    labels = labels_for(commands)
    rng = np.random.default_rng(seed)
    common = dict(commands=commands, unknown_words=unknown_words, unknown_share=unknown_share,
                  silence_share=silence_share, noises=noises, snrs=snrs_db, speeds=speeds, pitches=pitches,
                  mixes=max(1, int(mixes_per_utterance)))
    train_plans = _plan_split(rng, voice_list=voices(train_variants, languages), per_command=train_per_command,
                              **common)
    test_plans = _plan_split(rng, voice_list=voices(heldout_variants, languages), per_command=test_per_command,
                             **common)
    wanted = [p.utterance for p in train_plans + test_plans if p.utterance]
    speech = synthesize(wanted, cache_dir, workers=workers, sample_rate=sample_rate, progress=progress)
    n = int(round(clip_s * sample_rate))
    settings = {"seed": seed, "commands": list(commands), "unknown_words": list(unknown_words),
                "train_variants": list(train_variants), "heldout_variants": list(heldout_variants),
                "languages": list(languages), "noises": list(noises), "snrs_db": list(snrs_db),
                "speeds": list(speeds), "pitches": list(pitches),
                "mixes_per_utterance": int(mixes_per_utterance)}
    return KeywordDataset(labels, sample_rate, clip_s, _render(train_plans, speech, n, sample_rate, labels),
                          _render(test_plans, speech, n, sample_rate, labels), settings)


# --- long recordings for streaming tests ----------------------------------------------------------
@dataclass
class SpokenEvent:
    word: str
    label: str  # the command, or _unknown_
    voice: str
    t_start: float  # seconds
    t_end: float


@dataclass
class Recording:
    samples: np.ndarray  # float32 [n]
    sample_rate: int
    events: list[SpokenEvent]

    @property
    def commands(self) -> list[SpokenEvent]:
        return [e for e in self.events if e.label != UNKNOWN_LABEL]

    @property
    def duration_s(self) -> float:
        return len(self.samples) / self.sample_rate


def make_recording(
    cache_dir: str | Path,
    *,
    duration_s: float = 60.0,
    commands: Sequence[str] = COMMANDS,
    unknown_words: Sequence[str] = UNKNOWN_WORDS,
    variants: Sequence[str] = HELDOUT_VARIANTS,
    languages: Sequence[str] = LANGUAGES,
    unknown_share: float = 0.2,
    gap_s: tuple[float, float] = (1.2, 2.5),
    noise: str = "pink",
    snr_db: float = 15.0,
    speeds: tuple[int, int] = (140, 190),
    pitches: tuple[int, int] = (30, 70),
    sample_rate: int = 16000,
    seed: int = 1,
    workers: int = 2,
) -> Recording:
    """A long recording: words separated by `gap_s` pauses over continuous noise, with their true times.

    Every command occurs; `unknown_share` of the words are unknown words. The noise level is set from
    the mean speech RMS so that the SNR holds on average.
    """
    rng = np.random.default_rng(seed)
    vs = voices(variants, languages)
    n = int(round(duration_s * sample_rate))
    plans: list[tuple[str, str, Utterance]] = []
    k = 0
    while len(plans) < 400:
        if rng.random() < unknown_share:
            word, label = str(rng.choice(list(unknown_words))), UNKNOWN_LABEL
        else:
            word = commands[k % len(commands)]
            label, k = word, k + 1
        u = Utterance(word, vs[int(rng.integers(len(vs)))], int(rng.integers(speeds[0], speeds[1] + 1) // 5 * 5),
                      int(rng.integers(pitches[0], pitches[1] + 1) // 5 * 5))
        plans.append((word, label, u))
    # Synthesize in order until the recording is full; rendering too many is cheap (cached).
    speech = synthesize([u for _, _, u in plans[:int(duration_s / gap_s[0]) + 2]], cache_dir, workers=workers,
                        sample_rate=sample_rate)
    out = np.zeros(n)
    events: list[SpokenEvent] = []
    pos = int(rng.uniform(*gap_s) * sample_rate / 2)
    for word, label, u in plans:
        if u not in speech:
            speech.update(synthesize([u], cache_dir, workers=1, sample_rate=sample_rate))
        s = speech[u] * rng.uniform(0.4, 0.9) / max(float(np.max(np.abs(speech[u]))), 1e-9)
        if pos + len(s) + int(0.5 * sample_rate) > n:
            break
        out[pos:pos + len(s)] = s
        events.append(SpokenEvent(word, label, u.voice, pos / sample_rate, (pos + len(s)) / sample_rate))
        pos += len(s) + int(rng.uniform(*gap_s) * sample_rate)
    speech_rms = float(np.mean([_rms(out[int(e.t_start * sample_rate):int(e.t_end * sample_rate)]) for e in events]))
    out += make_noise(noise, n, rng, sample_rate) * speech_rms / (10 ** (snr_db / 20.0))
    out *= 0.9 / max(float(np.max(np.abs(out))), 1e-9)
    return Recording(out.astype(np.float32), sample_rate, events)


def _worker_main(argv: list[str]) -> int:
    """python -m converters.datasets.keywords speak JOBS.json CACHE_DIR ESPEAK RATE (used by synthesize())."""
    import json

    if len(argv) != 5 or argv[0] != "speak":
        print("usage: python -m converters.datasets.keywords speak JOBS.json CACHE_DIR ESPEAK RATE")
        return 2
    _, job, cache, binary, rate = argv
    for text, voice, speed, pitch in json.loads(Path(job).read_text()):
        _speak(Utterance(text, voice, int(speed), int(pitch)), cache, binary, int(rate))
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(_worker_main(sys.argv[1:]))
