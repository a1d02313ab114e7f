"""Farthest point sampling (FPS): its share of VAE and MAR training steps, and the
torch loop against fpsample's exact compiled FPS. Prints two markdown tables.

FPS picks the VAE's query points (``query_mode: fps``): HR takes hr_tokens of surface
level 0, LR lr_tokens of level 1 (tiny 128 of 1024 / 64 of 256, paper 1024 of 16384 /
256 of 4096). It runs on every VAE training step and, through the frozen VAE that
encodes the targets, on every MAR training step.

Table 1, share of a step: every VAE call of ``farthest_point_sample`` is timed inside
the real step, once with the torch loop and once with fpsample, on identical model
copies, inputs and RNG state (so both compute the same loss or latents: checked).
  * tiny: a full VAE training step (forward + backward + AdamW) at HR and at LR, and
    full MAR-LR / MAR-HR training steps (frozen-VAE target encoding + tiny conditioner
    and MAR forward + backward + AdamW), with the presets' batch sizes;
  * paper: the VAE *encoder forward* (train mode) and the MAR target encoding (frozen
    VAE, eval mode) at the paper's point and token counts. The full paper steps are
    left out by default: the encoder forward alone takes seconds per shape on one CPU
    core, a VAE step adds 16 decoder blocks, 25600 occupancy queries and the backward
    pass, and the paper MAR needs pretrained CLIP/DINOv2 weights. ``--paper-full-step``
    adds the paper VAE training step (for a GPU: ``--device cuda``). The paper rows use
    ``--paper-batch`` shapes (default 1); on a CPU both FPS and the encoder scale
    linearly with the batch.
Table 2, FPS alone: milliseconds per batch of each implementation at tiny and paper
(N, K) from the same run, whether it returns the torch loop's indices, and fpsample's
faster bucket (kd-line) variant for reference (not used: it ignores the start index).

Inputs are random points on a sphere with their normals (FPS does the same work on any
cloud). On a CPU the clock is this process's CPU time and torch runs one thread
(``--threads``), so other jobs on a shared machine do not count; step times still vary
by several per cent between repeats, more than FPS costs in some rows.

Examples:
  python benchmarks/fps.py
  python benchmarks/fps.py --sizes tiny --repeats 5
  python benchmarks/fps.py --device cuda --paper-full-step --paper-batch 32
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import Callable

import fpsample
import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import mar3d.models.vae as vae_module  # noqa: E402
from mar3d.config import load_config, to_dict  # noqa: E402
from mar3d.models.vae import ShapeVAE, VAEConfig, farthest_point_sample  # noqa: E402
from mar3d.train.config import load_train_config  # noqa: E402
from mar3d.train.stages import MARStage  # noqa: E402
from mar3d.weights import save_model_dir  # noqa: E402

BACKENDS = ("torch", "fpsample")
RAW_CASES = ["4x1024:128", "4x256:64", "4x2048:256", "4x4096:256", "4x4096:512",
             "4x16384:1024", "4x16384:2048"]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", nargs="*", choices=["tiny", "paper"], default=["tiny", "paper"],
                   help="presets whose steps are measured (table 1; none: skip the table)")
    p.add_argument("--repeats", type=int, default=3, help="timed repetitions per row (after one warm-up)")
    p.add_argument("--paper-batch", type=int, default=1, help="shapes per paper-size step")
    p.add_argument("--paper-full-step", action="store_true",
                   help="also time a full paper VAE training step (slow on CPU)")
    p.add_argument("--cases", nargs="*", default=RAW_CASES, metavar="BxN:K",
                   help="batch x points : samples of table 2 (none: skip the table)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (fpsample then runs on a CPU copy)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--clock", choices=["cpu", "wall"],
                   help="process CPU time (default on a CPU: robust on a shared machine) or wall time")
    return p.parse_args(argv)


class Clock:
    """Seconds for timing on ``device``: CPU time of this process on a CPU (a shared
    machine's other jobs then do not count), wall time after a sync on a GPU."""

    def __init__(self, device: torch.device, kind: str):
        if kind == "cpu" and device.type != "cpu":
            raise ValueError("--clock cpu times CPU work only; use --clock wall on a GPU")
        self.device, self.kind = device, kind

    def __call__(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.process_time() if self.kind == "cpu" else time.perf_counter()


class TimedFPS:
    """Routes the VAE's FPS calls to one backend and adds up their time."""

    def __init__(self, backend: str, clock: Clock):
        self.backend, self.clock, self.seconds = backend, clock, 0.0

    def __call__(self, *args, **kwargs) -> torch.Tensor:
        start = self.clock()
        out = farthest_point_sample(*args, backend=self.backend, **kwargs)
        self.seconds += self.clock() - start
        return out

    def __enter__(self) -> "TimedFPS":
        vae_module.farthest_point_sample = self
        return self

    def __exit__(self, *exc) -> None:
        vae_module.farthest_point_sample = farthest_point_sample


def sphere_surfaces(batch: int, sizes: list[int], device: torch.device, seed: int = 0) -> list[torch.Tensor]:
    """A surface pyramid [B, n_k, 6] (xyz + normal) of random points on a sphere."""
    gen = torch.Generator().manual_seed(seed)
    levels = []
    for n in sizes:
        normal = torch.nn.functional.normalize(torch.randn(batch, n, 3, generator=gen), dim=-1)
        levels.append(torch.cat([0.9 * normal, normal], -1).to(device))
    return levels


def vae_step(size: str, level: str, batch: int | None, full: bool, device: torch.device) -> tuple[Callable, str]:
    """One VAE training step (``full``) or encoder forward (train mode) at ``level``."""
    tcfg = load_train_config("vae", f"train_vae_{size}")
    cfg = load_config(VAEConfig, f"vae_{size}")
    b = batch or tcfg.batch_size
    model = ShapeVAE(cfg).to(device).train()
    surfaces = sphere_surfaces(b, tcfg.surface_sizes, device)
    gen = torch.Generator().manual_seed(1)
    data = {f"surface_{k}": s for k, s in enumerate(surfaces)}
    data["occ_points"] = (torch.rand(b, tcfg.num_occ, 3, generator=gen) * 2 - 1).to(device)
    data["occ_labels"] = (data["occ_points"].norm(dim=-1) < 0.9).float()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step() -> float:
        if not full:
            with torch.no_grad():
                return float(model.encode_posterior(surfaces, level).mean.sum())
        loss = model(data, level=level)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return float(loss.detach())

    what = "VAE training step" if full else "VAE encoder forward"
    return step, f"{size} {what}, {level.upper()} (B={b}{fps_shape(cfg, tcfg.surface_sizes, (level,))})"


def fps_shape(cfg: VAEConfig, sizes: list[int], levels: tuple[str, ...]) -> str:
    finest = {"hr": sizes[0], "lr": sizes[1]}
    tokens = {"hr": cfg.hr_tokens, "lr": cfg.lr_tokens}
    return "".join(f", {tokens[lv]} of {finest[lv]}" for lv in levels)


def frozen_vae_folder(size: str, root: Path) -> Path:
    """A model folder, as the VAE stage saves one, of a freshly initialised preset VAE
    (what the frozen VAE's weights are does not change what FPS costs)."""
    folder = root / f"vae_{size}"
    if not folder.is_dir():
        with torch.random.fork_rng():  # the models built next get the same weights either way
            torch.manual_seed(0)
            cfg = load_config(VAEConfig, f"vae_{size}")
            save_model_dir(folder, ShapeVAE(cfg).state_dict(), to_dict(cfg), "vae")
    return folder


def mar_stage(size: str, level: str, device: torch.device, vae_root: Path) -> MARStage:
    """The MAR-``level`` training stage of the ``size`` presets, set up as training sets
    it up (frozen VAE loaded from its model folder)."""
    uri = frozen_vae_folder(size, vae_root)
    stage = MARStage(load_train_config(level, f"train_{level}_{size}",
                                       [f"vae_model_uri={uri}", "latent_norm=false"]), level)
    stage.setup(device, tracking_uri=None)
    return stage


def mar_step(size: str, level: str, batch: int | None, full: bool, device: torch.device,
             vae_root: Path) -> tuple[Callable, str]:
    """One MAR training step (``full``: target encoding + MAR forward/backward/AdamW) or
    only its target encoding."""
    stage = mar_stage(size, level, device, vae_root)
    cfg, sizes = stage.vae.cfg, stage.cfg.surface_sizes
    b = batch or stage.cfg.batch_size
    surfaces = sphere_surfaces(b, sizes, device)
    data = {f"surface_{k}": s for k, s in enumerate(surfaces)}
    image_size = stage.cfg.condition.image_size
    data["image"] = torch.randint(0, 256, (b, image_size, image_size, 4), dtype=torch.uint8,
                                  generator=torch.Generator().manual_seed(2)).to(device)
    model = stage.build_model().to(device).train() if full else None
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4) if full else None

    def step() -> float:
        if not full:
            return float(sum(z.sum() for z in stage.vae_latents(data) if z is not None))
        tokens, lr_tokens = stage.latents(data, model)
        loss = model(stage.features(data), tokens, lr_tokens)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return float(loss.detach())

    levels = ("lr", "hr") if level == "hr" else ("lr",)
    what = "training step" if full else "target encoding"
    return step, f"{size} MAR-{level.upper()} {what} (B={b}{fps_shape(cfg, sizes, levels)})"


def measure_step(build: Callable[[], tuple[Callable, str]], repeats: int, clock: Clock) -> dict:
    """Per backend: median step time, total FPS and step seconds, and the losses, with
    both backends interleaved on identical copies (same weights, inputs, RNG)."""
    steps = {}
    for backend in BACKENDS:
        torch.manual_seed(0)
        steps[backend], name = build()
    result = {"name": name}
    for backend in BACKENDS:
        result[backend] = {"step": [], "fps": [], "loss": []}
    for r in range(repeats + 1):
        for backend in BACKENDS:
            torch.manual_seed(100 + r)
            with TimedFPS(backend, clock) as fps:
                start = clock()
                loss = steps[backend]()
                seconds = clock() - start
            if r:  # r == 0 warms up
                rec = result[backend]
                rec["step"].append(seconds)
                rec["fps"].append(fps.seconds)
                rec["loss"].append(loss)
    return result


def share_row(res: dict) -> str:
    cells = [res["name"]]
    for backend in BACKENDS:
        rec = res[backend]
        share = sum(rec["fps"]) / sum(rec["step"])
        cells += [f"{1e3 * statistics.median(rec['step']):.1f}",
                  f"{1e3 * statistics.median(rec['fps']):.1f}", f"{100 * share:.1f} %"]
    t, f = (statistics.median(res[b]["step"]) for b in BACKENDS)
    same = res["torch"]["loss"] == res["fpsample"]["loss"]
    cells += [f"{t / f:.2f}x", "yes" if same else "NO"]
    return "| " + " | ".join(cells) + " |"


def share_table(args, clock: Clock, vae_root: Path) -> list[str]:
    device = clock.device
    builds = []
    for size in args.sizes:
        if size == "tiny":
            builds += [lambda lv=lv: vae_step("tiny", lv, None, True, device) for lv in ("hr", "lr")]
            builds += [lambda lv=lv: mar_step("tiny", lv, None, True, device, vae_root) for lv in ("lr", "hr")]
            continue
        b, full = args.paper_batch, args.paper_full_step
        builds += [lambda lv=lv: vae_step("paper", lv, b, False, device) for lv in ("hr", "lr")]
        if full:
            builds += [lambda lv=lv: vae_step("paper", lv, b, True, device) for lv in ("hr", "lr")]
        builds += [lambda lv=lv: mar_step("paper", lv, b, False, device, vae_root) for lv in ("lr", "hr")]
    lines = ["| step | ms (torch FPS) | of it FPS ms | FPS share | ms (fpsample) | of it FPS ms "
             "| FPS share | step speed-up | same output |",
             "|---|---:|---:|---:|---:|---:|---:|---:|:---:|"]
    for build in builds:
        lines.append(share_row(measure_step(build, args.repeats, clock)))
        print(lines[-1], file=sys.stderr, flush=True)
    return lines


def median_time(fn: Callable[[], torch.Tensor], repeats: int, clock: Clock) -> tuple[float, torch.Tensor]:
    times, out = [], None
    for _ in range(repeats):
        start = clock()
        out = fn()
        times.append(clock() - start)
    return statistics.median(times), out


def bucket_fps(xyz: torch.Tensor, k: int, first: list[int]) -> torch.Tensor:
    points = xyz.cpu().numpy()
    return torch.from_numpy(np.stack([fpsample.bucket_fps_kdline_sampling(p, k, 7, start_idx=int(s))
                                      for p, s in zip(points, first)]).astype(np.int64))


def fps_table(cases: list[str], repeats: int, clock: Clock) -> list[str]:
    lines = ["| B | N | K | torch ms / batch | fpsample ms / batch | speed-up | same indices "
             "| bucket kd-line ms (not used) | bucket same indices |",
             "|---:|---:|---:|---:|---:|---:|:---:|---:|:---:|"]
    for case in cases:
        shape, k = case.split(":")
        b, n, k = *map(int, shape.split("x")), int(k)
        xyz = torch.nn.functional.normalize(torch.randn(b, n, 3, generator=torch.Generator().manual_seed(n)),
                                            dim=-1).to(clock.device)
        t_torch, ref = median_time(lambda: farthest_point_sample(xyz, k, "canonical", backend="torch"),
                                   repeats, clock)
        t_fast, fast = median_time(lambda: farthest_point_sample(xyz, k, "canonical", backend="fpsample"),
                                   repeats, clock)
        t_bucket, bucket = median_time(lambda: bucket_fps(xyz, k, ref[:, 0].tolist()), repeats, clock)
        lines.append(f"| {b} | {n} | {k} | {1e3 * t_torch:.1f} | {1e3 * t_fast:.1f} | {t_torch / t_fast:.1f}x "
                     f"| {'yes' if torch.equal(ref, fast) else 'NO'} | {1e3 * t_bucket:.1f} "
                     f"| {'yes' if torch.equal(ref.cpu(), bucket) else 'no'} |")
        print(lines[-1], file=sys.stderr, flush=True)
    return lines


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    clock = Clock(device, args.clock or ("cpu" if device.type == "cpu" else "wall"))
    print(f"# FPS benchmark: device {device}, {args.threads} torch thread(s), {clock.kind} time, "
          f"median of {args.repeats}; fpsample {metadata.version('fpsample')}, torch {torch.__version__}\n")
    if args.sizes:
        with tempfile.TemporaryDirectory(prefix="fps-bench-") as vae_root:
            print("\n".join(share_table(args, clock, Path(vae_root))) + "\n")
    if args.cases:
        print("\n".join(fps_table(args.cases, args.repeats, clock)))


if __name__ == "__main__":
    main()
