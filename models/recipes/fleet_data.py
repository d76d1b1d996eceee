"""Build per-device data for a simulated fleet of 20 devices, for the two shipped tasks: each device sees
the target domain through its own sensor (digits) or microphone (keyword spotting), drawn at random.
Seeded and deterministic: a rerun writes the same arrays bit for bit (tests/test_fleet_data.py's slow test
compares their hashes with the shipped files).

Run from the repository root (needs scipy and scikit-learn, and espeak-ng 1.51 from Debian for kws;
nothing is downloaded):

    apt-get install -y espeak-ng && pip install scipy scikit-learn
    python models/recipes/fleet_data.py [OUT_DIR] [--only digits|kws]   # ~10 s on 2 cores

It writes OUT_DIR (default models/data)/fleet_digits.npz and fleet_kws.npz, each with
`x` [N, 1, ...], `y` int64 [N], `device` int16 [N] (0..19), `split` uint8 [N] (0 train, 1 test),
`shift` float32 [20, K] (device d's parameters in row d) and `shift_names` [K]. Rows are grouped by device,
train before test.

Digits (x float32 [N, 1, 8, 8] in [0, 1]; 60 train + 40 test per device, 6 and 4 per class): only images of
build_zoo's *target* pool (the ones behind digits_target_*; never source images, which pretrained the
model), a device's train drawn from the pool of digits_target_train and its test from that of
digits_target_test. Each device's sensor (`sensor_view`, build_zoo's `sensor_shift` with parameters):
rotation by angle_deg = ±U(5, 35) (the shipped target's is 20; scipy.ndimage.rotate, as build_zoo),
gain U(0.6, 1.0), black_level U(0, 0.25), then Gaussian pixel noise of std noise_std U(0, 0.06), clipped
to [0, 1].

Keyword spotting (x uint8 codes [N, 1, 40, 49] with x_scale = 1/255, as kws_*.npz; 40 train + 40 test
per device, 4 per word): kws_data's *target* speakers (accents and voice variants not used in
pretraining), 4 of its train speakers for a device's train and 4 of its test speakers for its test, no
speaker on two devices; each speaker's clean clips are those behind kws_target_*. Each device's
microphone (kws_data.device with parameters): 4th-order band-pass band_low_hz U(200, 500) to band_high_hz
U(2500, 5000), a room reverb of reverb_ms U(50, 150) with decay rt60_s U(0.1, 0.4), pink noise plus
hum_hz (50 or 60) mains hum at snr_db U(20, 35).
"""
from __future__ import annotations

import argparse
import multiprocessing
import pathlib
import shutil
import sys

import numpy as np
from scipy.ndimage import rotate

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import kws_data  # noqa: E402

from fgcompile.modelio import atomic_path  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
SEED = 29
DEVICES = 20
ZOO_SEED, ZOO_SOURCE, ZOO_TARGET_TRAIN = 0, 1000, 500   # build_zoo.make_splits: its permutation and cuts
DIGITS_PER_CLASS = {"train": 6, "test": 4}
KWS_SPEAKERS = {"train": 4, "test": 4}                  # x 10 words
DIGITS_SHIFT = ("angle_deg", "gain", "black_level", "noise_std")
KWS_SHIFT = ("band_low_hz", "band_high_hz", "reverb_ms", "rt60_s", "snr_db", "hum_hz")


def write(path: pathlib.Path, **arrays) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:   # a file object: savez would append .npz to tmp
        np.savez_compressed(f, **arrays)
    print(f"{path.name}: {len(arrays['y'])} examples, {path.stat().st_size / 2 ** 20:.2f} MiB")


def fleet_arrays(parts: list[tuple[int, int, np.ndarray, np.ndarray]], shift: list[list[float]],
                 names: tuple[str, ...]) -> dict:
    """(device, split, x, y) parts, in order, as the file's arrays."""
    return {"x": np.concatenate([p[2] for p in parts]), "y": np.concatenate([p[3] for p in parts]).astype(np.int64),
            "device": np.concatenate([np.full(len(p[3]), p[0], np.int16) for p in parts]),
            "split": np.concatenate([np.full(len(p[3]), p[1], np.uint8) for p in parts]),
            "shift": np.array(shift, np.float32), "shift_names": np.array(names)}


# ---------------------------------------------------------------------------------------------- digits
def digits_target_pool() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """build_zoo's target images before its sensor_shift: {"train": (x [500, 8, 8], y), "test": (x [297, ...], y)}."""
    from sklearn.datasets import load_digits
    digits = load_digits()
    x, y = (digits.images / 16.0).astype(np.float32), digits.target.astype(np.int64)
    tgt = np.random.default_rng(ZOO_SEED).permutation(len(x))[ZOO_SOURCE:]
    return {"train": (x[tgt[:ZOO_TARGET_TRAIN]], y[tgt[:ZOO_TARGET_TRAIN]]),
            "test": (x[tgt[ZOO_TARGET_TRAIN:]], y[tgt[ZOO_TARGET_TRAIN:]])}


def sensor_view(images: np.ndarray, angle_deg: float, gain: float, black_level: float, noise_std: float,
                rng: np.random.Generator) -> np.ndarray:
    """build_zoo's sensor_shift with parameters, plus pixel noise: clip(gain * rotate(x) + black + noise).
    Python-float parameters keep the arithmetic float32, so (20, 0.8, 0.15, 0) is sensor_shift bit for bit."""
    rotated = np.stack([rotate(im, angle_deg, reshape=False, order=1) for im in images])
    noise = (noise_std * rng.standard_normal(rotated.shape)).astype(np.float32)
    return np.clip(gain * rotated + black_level + noise, 0.0, 1.0).astype(np.float32)


def digits_device(d: int, pool: dict) -> tuple[list[float], dict[str, np.ndarray]]:
    """Device d's sensor parameters (DIGITS_SHIFT order) and its pool indices per split, per class balanced."""
    rng = np.random.default_rng([SEED, 0, d])
    shift = [float(rng.uniform(5, 35) * rng.choice([-1, 1])), float(rng.uniform(0.6, 1.0)),
             float(rng.uniform(0.0, 0.25)), float(rng.uniform(0.0, 0.06))]
    picks = {split: rng.permutation(np.concatenate([rng.choice(np.flatnonzero(pool[split][1] == c), k, replace=False)
                                                    for c in range(10)]))
             for split, k in DIGITS_PER_CLASS.items()}
    return shift, picks


def build_digits(out_dir: pathlib.Path) -> pathlib.Path:
    pool = digits_target_pool()
    parts, shifts = [], []
    for d in range(DEVICES):
        shift, picks = digits_device(d, pool)
        rng = np.random.default_rng([SEED, 1, d])
        for s, split in enumerate(("train", "test")):
            x, y = pool[split][0][picks[split]], pool[split][1][picks[split]]
            parts.append((d, s, sensor_view(x, *shift, rng)[:, None], y))
        shifts.append(shift)
    path = out_dir / "fleet_digits.npz"
    write(path, **fleet_arrays(parts, shifts, DIGITS_SHIFT))
    return path


# ------------------------------------------------------------------------------------ keyword spotting
def kws_device(d: int) -> list[float]:
    """Device d's microphone parameters in KWS_SHIFT order."""
    rng = np.random.default_rng([SEED, 2, d])
    return [float(rng.uniform(200, 500)), float(rng.uniform(2500, 5000)), float(rng.uniform(50, 150)),
            float(rng.uniform(0.1, 0.4)), float(rng.uniform(20, 35)), float(rng.choice([50, 60]))]


def kws_speakers() -> dict[str, list[list[dict]]]:
    """Per split, per device, its KWS_SPEAKERS[split] target speakers of that split (none on two devices)."""
    who = [s for s in kws_data.speakers() if s["domain"] == "target"]
    out = {}
    for i, (split, k) in enumerate(KWS_SPEAKERS.items()):
        group = [who[j] for j in np.random.default_rng([SEED, 3, i]).permutation(len(who)) if who[j]["split"] == split]
        out[split] = [group[d * k:(d + 1) * k] for d in range(DEVICES)]
    return out


def microphone(shift: list[float], d: int) -> dict:
    low, high, reverb_ms, rt60_s, snr_db, hum_hz = shift
    return {"sos": kws_data.band_pass(low, high), "snr_db": snr_db, "hum_hz": hum_hz,
            "room": kws_data.room_impulse(reverb_ms / 1000, rt60_s, np.random.default_rng([SEED, 4, d]))}


def heard(job: tuple[dict, int, dict]) -> np.ndarray:
    """One speaker's ten words (the clean clips behind kws_target_*) through device d's microphone."""
    s, d, mic = job
    clips = kws_data.speaker_audio(s, np.random.default_rng([kws_data.SEED, 2, s["seed"]]))
    rng = np.random.default_rng([SEED, 5, d, s["seed"]])
    return kws_data.features(np.stack([kws_data.device(c, rng, **mic) for c in clips]))


def build_kws(out_dir: pathlib.Path, workers: int = 2) -> pathlib.Path:
    if shutil.which("espeak-ng") is None:
        sys.exit("espeak-ng is not installed: apt-get install -y espeak-ng (Debian's 1.51).")
    shifts = [kws_device(d) for d in range(DEVICES)]
    mics = [microphone(shift, d) for d, shift in enumerate(shifts)]
    assigned = kws_speakers()
    order = [(d, s, split) for d in range(DEVICES) for s, split in enumerate(("train", "test"))]
    jobs = [(spk, d, mics[d]) for d, _, split in order for spk in assigned[split][d]]
    with multiprocessing.Pool(workers) as pool:
        made = pool.map(heard, jobs, chunksize=4)
    words = np.arange(len(kws_data.WORDS), dtype=np.int64)
    parts, at = [], 0
    for d, s, split in order:
        k = KWS_SPEAKERS[split]
        parts.append((d, s, np.concatenate(made[at:at + k])[:, None], np.tile(words, k)))
        at += k
    path = out_dir / "fleet_kws.npz"
    write(path, **fleet_arrays(parts, shifts, KWS_SHIFT), x_scale=np.float32(1 / 255))
    return path


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", nargs="?", type=pathlib.Path, default=ROOT / "data")
    parser.add_argument("--only", choices=("digits", "kws"))
    args = parser.parse_args()
    if args.only != "kws":
        build_digits(args.out_dir)
    if args.only != "digits":
        build_kws(args.out_dir)
