"""Build the keyword-spotting data: ten words spoken by espeak-ng, heard clean (source) and through one
fixed cheap microphone (target), as 40x49 log-mel features. Seeded and deterministic: a rerun on the same
machine writes the same arrays bit for bit (tests/test_kws_recipe.py compares their hashes).

Run from the repository root (needs espeak-ng 1.51 from Debian and scipy; nothing is downloaded):

    apt-get install -y espeak-ng && pip install scipy
    python models/recipes/kws_data.py          # ~20 s on 2 cores; writes models/data/kws_*.npz

Speakers: an espeak-ng accent + voice variant, a speed, pitch and gain drawn from rng([SEED, speaker]).
One espeak-ng call per speaker says all ten words with 400 ms gaps; the recording is split on its
silences, each word resampled to 16 kHz and placed at a random offset in a 1 s clip.
- source: 5 accents x 60 variants, one speaker each, clean audio;
- target: the 3 other accents x the 19 other variants x 4 prosodies, through `device` (300-3400 Hz
  band-pass, a short room reverb, pink noise and 50 Hz mains hum at 30 dB SNR).
Splits are by speaker: source 240 train / 60 test speakers, target 100 train / 128 test speakers.

Features: log-mel power, 40 mel bands (20-8000 Hz) x 49 frames (30 ms Hann windows every 20 ms), in dB
mapped from [DB_LO, DB_HI] to [0, 1] and stored as uint8 with `x_scale` = 1/255 (the loader multiplies
back to float32, see fgcompile/runtime/data.py).
"""
from __future__ import annotations

import io
import itertools
import multiprocessing
import pathlib
import shutil
import subprocess
import sys
import wave

import numpy as np
from scipy.signal import butter, fftconvolve, resample_poly, sosfilt

ROOT = pathlib.Path(__file__).resolve().parents[1]
SEED = 17
WORDS = ("yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go")
SOURCE_ACCENTS = ("en-us", "en", "en-gb-x-rp", "en-gb-scotland", "en-gb-x-gbclan")
TARGET_ACCENTS = ("en-us-nyc", "en-029", "en-gb-x-gbcwmd")
# espeak-ng 1.51's voice variants (espeak-ng-data/voices/!v) without the echo-heavy, whispered and
# robotic ones (echo amplitude > 20%, whisper*, croak, Demonic) and "Mr serious" (a space in its name)
VARIANTS = (
    "Alex", "Andrea", "Andy", "Annie", "AnxiousAndy", "Denis", "Diogo", "Gene", "Gene2", "Henrique", "Hugo",
    "Jacky", "Lee", "Mario", "Michael", "Mike", "Nguyen", "Storm", "Tweaky", "adam", "anika", "antonio",
    "aunty", "belinda", "benjamin", "boris", "caleb", "david", "ed", "edward", "edward2", "f1", "f2", "f3",
    "f4", "f5", "fast", "grandma", "grandpa", "gustave", "iven", "iven2", "iven3", "iven4", "john",
    "kaukovalta", "klatt", "klatt2", "klatt3", "klatt4", "klatt5", "klatt6", "linda", "m1", "m2", "m3", "m4",
    "m5", "m6", "m7", "m8", "marcelo", "max", "michel", "miguel", "norbert", "paul", "pedro", "quincy",
    "rob", "robert", "sandro", "shelby", "steph", "steph2", "steph3", "travis", "victor", "zac")
SOURCE_VARIANTS = 60
TARGET_PROSODIES = 4
RATE = 16000
WINDOW, HOP, NFFT, MELS, FRAMES = 480, 320, 512, 40, 49
DB_LO, DB_HI = -100.0, 0.0
SNR_DB = 30.0


def speakers() -> list[dict]:
    """Every speaker: domain, split, accent, variant and its own seed (the index into this list)."""
    variants = [VARIANTS[i] for i in np.random.default_rng(SEED).permutation(len(VARIANTS))]
    src = [("source", a, v) for a in SOURCE_ACCENTS for v in variants[:SOURCE_VARIANTS]]
    tgt = [("target", a, v) for a in TARGET_ACCENTS for v in variants[SOURCE_VARIANTS:]
           for _ in range(TARGET_PROSODIES)]
    out = []
    for domain, group, n_train in (("source", src, 240), ("target", tgt, 100)):
        order = np.random.default_rng([SEED, len(out)]).permutation(len(group))
        for rank, i in enumerate(order):
            _, accent, variant = group[i]
            out.append({"domain": domain, "split": "train" if rank < n_train else "test",
                        "accent": accent, "variant": variant})
    for k, s in enumerate(out):
        s["seed"] = k
    return out


def synthesize(voice: str, speed: int, pitch: int) -> tuple[np.ndarray, int]:
    text = ". ".join(WORDS) + "."
    wav = subprocess.run(["espeak-ng", "-v", voice, "-s", str(speed), "-p", str(pitch), "-g", "40",
                          "--stdout", text], capture_output=True, check=True).stdout
    with wave.open(io.BytesIO(wav)) as w:   # espeak's streamed header has no frame count: read to the end
        return np.frombuffer(w.readframes(2 ** 31), np.int16).astype(np.float64) / 32768.0, w.getframerate()


def split_words(audio: np.ndarray, rate: int, threshold: float = 1e-3, gap_s: float = 0.12) -> list[np.ndarray]:
    """The stretches where a 10 ms moving average of |audio| exceeds `threshold`, joined across pauses
    shorter than `gap_s` (stop consonants)."""
    k = int(0.01 * rate)
    active = np.convolve(np.abs(audio), np.ones(k) / k, "same") > threshold
    runs, pos = [], 0
    for on, group in itertools.groupby(active):
        n = len(list(group))
        if on:
            if runs and pos - runs[-1][1] < gap_s * rate:
                runs[-1][1] = pos + n
            else:
                runs.append([pos, pos + n])
        pos += n
    return [audio[a:b] for a, b in runs]


def place(word: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    clip = np.zeros(RATE)
    word = word[:RATE]
    start = int(rng.integers(0, RATE - len(word) + 1))
    clip[start:start + len(word)] = word
    return clip


def pink_noise(n: int, rng: np.random.Generator) -> np.ndarray:
    spectrum = np.fft.rfft(rng.standard_normal(n))
    f = np.arange(len(spectrum))
    spectrum[1:] /= np.sqrt(f[1:])
    spectrum[0] = 0
    return np.fft.irfft(spectrum, n)


def room_impulse(length_s: float = 0.08, rt60_s: float = 0.12, rng: np.random.Generator | None = None) -> np.ndarray:
    """An exponentially decaying reverb tail after the direct path; the defaults are the target room's
    fixed 80 ms tail (RT60 ~0.12 s, drawn from rng([SEED, 1]))."""
    rng = np.random.default_rng([SEED, 1]) if rng is None else rng
    t = np.arange(int(length_s * RATE)) / RATE
    ir = 0.3 * rng.standard_normal(len(t)) * np.exp(-6.9 * t / rt60_s)
    ir[0] = 1.0
    return ir / np.sqrt(np.sum(ir ** 2))


def band_pass(low_hz: float, high_hz: float) -> np.ndarray:
    """A microphone's 4th-order Butterworth band-pass as second-order sections."""
    return butter(4, [low_hz, high_hz], btype="bandpass", fs=RATE, output="sos")


def device(clip: np.ndarray, rng: np.random.Generator, sos: np.ndarray | None = None, room: np.ndarray | None = None,
           snr_db: float = SNR_DB, hum_hz: float = 50.0) -> np.ndarray:
    """A microphone in a room: band-pass `sos`, reverb `room`, then pink noise and `hum_hz` mains hum (with
    its odd harmonics) together at `snr_db` below the clip's power. The defaults are the target microphone
    (300-3400 Hz, ROOM, 30 dB, 50 Hz); recipes/fleet_data.py draws them per device."""
    sos = DEVICE_FILTER if sos is None else sos
    room = ROOM if room is None else room
    heard = fftconvolve(sosfilt(sos, clip), room)[:len(clip)]
    t = np.arange(len(clip)) / RATE
    phase = rng.uniform(0, 2 * np.pi)
    hum = sum(np.sin(2 * np.pi * hum_hz * h * t + h * phase) / h for h in (1, 3, 5))
    noise = pink_noise(len(clip), rng)
    interference = noise / np.std(noise) + hum / np.std(hum)
    gain = np.sqrt(np.mean(heard ** 2) / np.mean(interference ** 2) / 10 ** (snr_db / 10))
    return heard + gain * interference


def mel_filterbank() -> np.ndarray:
    mel = lambda f: 2595.0 * np.log10(1.0 + f / 700.0)
    hz = lambda m: 700.0 * (10 ** (m / 2595.0) - 1.0)
    edges = hz(np.linspace(mel(20.0), mel(RATE / 2), MELS + 2))
    bins = np.fft.rfftfreq(NFFT, 1.0 / RATE)
    lo, mid, hi = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    return np.maximum(0.0, np.minimum((bins - lo) / (mid - lo), (hi - bins) / (hi - mid)))


def log_mel(clips: np.ndarray) -> np.ndarray:
    """[N, 16000] audio -> [N, 40, 49] log-mel power in dB mapped to [0, 1] (DB_LO -> 0, DB_HI -> 1)."""
    idx = np.arange(FRAMES)[None, :] * HOP + np.arange(WINDOW)[:, None]
    frames = clips[:, idx] * np.hanning(WINDOW + 1)[:-1, None]
    power = np.abs(np.fft.rfft(frames, NFFT, axis=1)) ** 2
    db = 10.0 * np.log10(np.einsum("mk,nkt->nmt", MEL, power) + 1e-12)
    return np.clip((db - DB_LO) / (DB_HI - DB_LO), 0.0, 1.0)


DEVICE_FILTER = band_pass(300.0, 3400.0)
ROOM = room_impulse()
MEL = mel_filterbank()


def speaker_audio(s: dict, rng: np.random.Generator) -> np.ndarray:
    """One speaker's ten words as clean 1 s clips [10, 16000], drawing speed, pitch, gain and placement
    from `rng` (speaker_clips passes rng([SEED, 2, s["seed"]]))."""
    speed, pitch = int(rng.integers(120, 200)), int(rng.integers(25, 76))
    gain = 10 ** (rng.uniform(-12, 0) / 20)
    audio, rate = synthesize(f"{s['accent']}+{s['variant']}", speed, pitch)
    words = split_words(audio, rate)
    if len(words) != len(WORDS):
        raise RuntimeError(f"{s}: espeak-ng's recording split into {len(words)} words, not {len(WORDS)}")
    return np.stack([place(gain * resample_poly(w, RATE, rate), rng) for w in words])


def features(clips: np.ndarray) -> np.ndarray:
    """[N, 16000] audio -> uint8 codes [N, 40, 49] of log_mel (x_scale = 1/255 decodes them)."""
    return np.round(255.0 * log_mel(clips)).astype(np.uint8)


def speaker_clips(s: dict) -> tuple[np.ndarray, np.ndarray]:
    """One speaker's ten words as uint8 features [10, 40, 49] and labels; depends on nothing but `s`."""
    rng = np.random.default_rng([SEED, 2, s["seed"]])
    clips = speaker_audio(s, rng)
    if s["domain"] == "target":
        clips = np.stack([device(c, rng) for c in clips])
    return features(clips), np.arange(len(WORDS), dtype=np.int64)


def build(out_dir: pathlib.Path, workers: int = 2) -> dict[str, pathlib.Path]:
    if shutil.which("espeak-ng") is None:
        sys.exit("espeak-ng is not installed: apt-get install -y espeak-ng (Debian's 1.51).")
    who = speakers()
    with multiprocessing.Pool(workers) as pool:
        made = pool.map(speaker_clips, who, chunksize=8)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = {}
    for domain in ("source", "target"):
        for split in ("train", "test"):
            picked = [m for s, m in zip(who, made) if (s["domain"], s["split"]) == (domain, split)]
            x = np.concatenate([m[0] for m in picked])[:, None]
            y = np.concatenate([m[1] for m in picked])
            path = out_dir / f"kws_{domain}_{split}.npz"
            np.savez_compressed(path, x=x, y=y, x_scale=np.float32(1 / 255))
            written[f"{domain}_{split}"] = path
            print(f"{path.name}: {len(y)} clips, {path.stat().st_size / 2 ** 20:.2f} MiB")
    return written


if __name__ == "__main__":
    build(pathlib.Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "data")
