"""Smoke tests: every example runs in its tiny mode and produces what it promises.

Each example runs in a subprocess exactly as a user runs it (``python examples/<name>.py --tiny``),
with the suite's strict JAX numerics switched on through the environment.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import numpy as np
import pytest

import matplotlib  # noqa: E402,F401  (installed by the test extra)
import flax  # noqa: E402,F401

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(ROOT, "examples")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def run_example(name: str, *args: str, timeout: float = 240.0) -> str:
    env = dict(os.environ)
    env.update(JAX_PLATFORMS="cpu", JAX_NUMPY_DTYPE_PROMOTION="strict",
               JAX_NUMPY_RANK_PROMOTION="raise", MPLBACKEND="Agg",
               PYTHONPATH=os.pathsep.join([ROOT, env.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    proc = subprocess.run([sys.executable, os.path.join(EXAMPLES, name), *args], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, (f"{name} failed with exit code {proc.returncode}\n"
                                  f"--- stdout ---\n{proc.stdout[-4000:]}\n"
                                  f"--- stderr ---\n{proc.stderr[-4000:]}")
    return proc.stdout


def assert_png(path: str, min_size=(300, 400)) -> np.ndarray:
    """The file exists, starts with the PNG signature, decodes, and is not a blank canvas."""
    import matplotlib.image as mpimg

    assert os.path.isfile(path), f"{path} was not written"
    with open(path, "rb") as f:
        assert f.read(8) == PNG_SIGNATURE, f"{path} is not a PNG file"
    img = mpimg.imread(path)
    assert img.ndim == 3 and img.shape[2] in (3, 4), img.shape
    assert img.shape[0] >= min_size[0] and img.shape[1] >= min_size[1], img.shape
    rgb = img[..., :3]
    assert float(rgb.std()) > 0.02, f"{path} looks blank"
    # Something is drawn in colour (paths, curves), not only black and white.
    saturation = rgb.max(axis=-1) - rgb.min(axis=-1)
    assert float((saturation > 0.3).mean()) > 0.001, f"{path} has no coloured content"
    return img


TOUR_ROWS = ("SGD+Nesterov", "Adam", "AdamW", "LAMB", "Lion", "Custom")


def test_tour_tiny(tmp_path):
    out = tmp_path / "tour"
    stdout = run_example("tour.py", "--tiny", "--out", str(out))

    # The chains: AdamW, LAMB and Lion printed from their repr, built of primitives.
    for alias in ("adamw", "lamb", "lion"):
        assert f"gradtx.{alias}(...) ==" in stdout
    assert "scale_by_learning_rate(" in stdout
    assert "scale_by_trust_ratio(" in stdout      # LAMB's chain is spelled out
    assert "scale_by_lion(" in stdout             # Lion's
    assert "scale_by_adam(" in stdout             # AdamW's
    # The custom optimizer is printed with every piece it is made of.
    for piece in ("clip_by_global_norm(", "scale_by_belief(", "add_decoupled_weight_decay(",
                  "warmup_cosine("):
        assert piece in stdout, piece

    # The table: a header and one row per optimizer with five columns of numbers.
    assert re.search(r"final train loss\s+test accuracy\s+steps to loss<\S+\s+state bytes\s+"
                     r"median step", stdout), stdout
    for name in TOUR_ROWS:
        row = re.search(rf"^{re.escape(name)}\s+(\d[\d.]*(?:e[-+]\d+)?)\s+(\d+\.\d)%\s+"
                        rf"(\d+|not reached)\s+"
                        rf"(\d+(?:\.\d)?) (KiB|B)\s+(\d+\.\d+) ms$", stdout, re.M)
        assert row, f"no table row for {name} in:\n{stdout}"
        loss, acc = float(row.group(1)), float(row.group(2))
        assert np.isfinite(loss) and 0.0 <= acc <= 100.0
        assert float(row.group(6)) > 0.0
    # Optimizer state sizes are real: SGD with momentum keeps one buffer per parameter, Adam two.
    sizes = {name: re.search(rf"^{re.escape(name)}\s.*?(\d+(?:\.\d)?) (KiB|B)\s", stdout,
                             re.M).group(1) for name in TOUR_ROWS}
    assert float(sizes["Adam"]) > 1.8 * float(sizes["SGD+Nesterov"])

    # The pictures, in the folder it names.
    assert str(out) in stdout
    assert_png(str(out / "convergence.png"))
    assert_png(str(out / "trajectories.png"))


def test_trajectories_tiny_with_gif(tmp_path):
    stdout = run_example("trajectories.py", "--tiny", "--gif", "--gif-function", "saddle",
                         "--out", str(tmp_path))
    for title in ("Rosenbrock", "Beale", "ravine", "Saddle", "Himmelblau"):
        assert title in stdout
    assert_png(str(tmp_path / "trajectories.png"), min_size=(500, 800))
    gif = tmp_path / "trajectories_saddle.gif"
    assert gif.is_file()
    from PIL import Image

    with Image.open(gif) as im:
        assert im.format == "GIF"
        assert getattr(im, "n_frames", 1) >= 3


def test_trajectory_paths_descend():
    """The picture is honest: on the ravine every optimizer's value drops well below the start."""
    sys.path.insert(0, EXAMPLES)
    try:
        import trajectories
    finally:
        sys.path.remove(EXAMPLES)
    results = trajectories.run_problem(trajectories.PROBLEMS["ravine"], steps=200)
    assert [r.name for r in results] == list(trajectories.STYLES)
    start_value = float(trajectories.ravine(np.asarray(trajectories.PROBLEMS["ravine"].start)))
    for r in results:
        assert r.path.shape == (201, 2) and r.values.shape == (201,)
        assert not r.diverged, r.name
        assert r.values[-1] < 0.05 * start_value, (r.name, r.values[-1], start_value)


def test_schedules_gallery_tiny(tmp_path):
    stdout = run_example("schedules.py", "--tiny", "--out", str(tmp_path))
    assert_png(str(tmp_path / "schedules.png"))
    import gradtx

    # Every public schedule appears in the gallery, titled with its repr (its arguments).
    base = gradtx.schedules.Schedule
    public = [getattr(gradtx.schedules, n) for n in gradtx.schedules.__all__]
    names = [c.__name__ for c in public
             if isinstance(c, type) and issubclass(c, base) and c is not base]
    assert len(names) >= 15, names
    for name in names:
        assert re.search(rf"^{re.escape(name)}\(", stdout, re.M), f"{name} is not in the gallery"
    assert "not shown in the gallery" not in stdout
    # The printed values are the schedules' own: warm-up/cosine starts at 0 and peaks after warm-up.
    row = re.search(r"^warmup_cosine\(.*\n\s+-> ([^\n]+)", stdout, re.M).group(1)
    values = [float(v) for v in row.split(",")]
    assert values[0] == 0.0 and values[1] == pytest.approx(0.1, rel=1e-6)


def test_flax_nnx_classifier_resume_is_bit_identical(tmp_path):
    """Interrupt after step 14 (checkpoint), resume to step 30: identical to one 30-step run."""
    full = run_example("flax_nnx_classifier.py", "--tiny", "--out", str(tmp_path / "full"))
    part = run_example("flax_nnx_classifier.py", "--tiny", "--stop-after", "14",
                       "--out", str(tmp_path / "resumed"))
    resumed = run_example("flax_nnx_classifier.py", "--tiny", "--resume",
                          "--out", str(tmp_path / "resumed"))
    pattern = r"digests after step (\d+): params (\w+), optimizer state (\w+)"
    full_d = re.search(pattern, full).groups()
    part_d = re.search(pattern, part).groups()
    resumed_d = re.search(pattern, resumed).groups()
    assert full_d[0] == resumed_d[0] == "30" and part_d[0] == "14"
    assert "resumed from the checkpoint of step 14" in resumed
    assert resumed_d == full_d                 # params and optimizer state, bit for bit
    assert part_d[1] != full_d[1]              # (and the digest does tell states apart)
    # The optimizer it promises, printed from its repr.
    for piece in ("clip_by_global_norm(", "add_decoupled_weight_decay(", "warmup_cosine(",
                  "ema_params(", "paths('*/bias', 'norm/scale')"):
        assert piece in full, piece
    acc = re.search(r"test accuracy (\d+\.\d)% \(raw parameters\), (\d+\.\d)% \(EMA", full)
    assert acc and float(acc.group(1)) > 50.0 and float(acc.group(2)) > 50.0
    assert (tmp_path / "full" / "checkpoints").is_dir()
    assert_png(str(tmp_path / "full" / "training.png"))
    assert_png(str(tmp_path / "resumed" / "training.png"))


def test_custom_optimizer_tiny():
    stdout = run_example("custom_optimizer.py", "--tiny")
    for piece in ("stateless(fn=centralise)", "scale_by_signum()", "add_decoupled_weight_decay(",
                  "warmup_cosine("):
        assert piece in stdout, piece
    assert "jit reuses the compiled step): True" in stdout
    assert "scale_by_signum: decay=1.5 is out of range" in stdout
    for name in ("AdamW", "centralised Signum"):
        row = re.search(rf"^{name}\s+(\d+\.\d+)\s+(\d+\.\d)%$", stdout, re.M)
        assert row, f"no result row for {name}:\n{stdout}"
        assert np.isfinite(float(row.group(1))) and float(row.group(2)) > 30.0


def test_flax_linen_trainstate_tiny(tmp_path):
    stdout = run_example("flax_linen_trainstate.py", "--tiny", "--out", str(tmp_path))
    diff = float(re.search(r"large-batch LAMB step: max \|difference\| = (\S+)", stdout).group(1))
    assert diff < 1e-5                              # accumulation == large batch (float rounding)
    assert "accumulate_gradients(" in stdout and "scale_by_trust_ratio(" in stdout
    assert "paths('*/kernel')" in stdout
    acc = float(re.search(r"test accuracy (\d+\.\d)%", stdout).group(1))
    assert acc > 20.0
    assert_png(str(tmp_path / "training.png"))


def test_transformer_lm_tiny(tmp_path):
    stdout = run_example("transformer_lm.py", "--tiny", "--out", str(tmp_path))
    assert "characters of Python standard-library source" in stdout
    # Per-group optimizers by path, printed from their repr.
    assert stdout.count("partition(") == 2
    assert "labels({'embeddings': paths('embed/*', 'embed_pos')}, default='rest')" in stdout
    assert "scale_by_adam(" in stdout and "scale_by_lion(" in stdout
    # Learning rates read from the state: the embeddings group runs at 0.3x the rest.
    lrs = re.findall(r"read from the optimizer state\): embeddings (\S+), rest (\S+)$", stdout,
                     re.M)
    assert len(lrs) == 2
    for embed, rest in lrs:
        assert float(embed) == pytest.approx(0.3 * float(rest), rel=1e-2)
    for name in ("AdamW", "Lion"):
        row = re.search(rf"^{name}\s+(\d+\.\d+)\s+(\d+\.\d+)\s+(\d+\.\d+)\s+\d+\.\ds$", stdout,
                        re.M)
        assert row, f"no result row for {name}:\n{stdout}"
        assert 0.0 < float(row.group(2)) < np.log(200.0)   # below a uniform guess over the vocab
    assert_png(str(tmp_path / "lm.png"))
