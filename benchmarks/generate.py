"""Single-shape generation cost: seconds per shape and peak memory, LR-only vs LR+HR.

For each model size, the same condition image is generated ``--num-shapes`` times
(after one warm-up shape) in each mode, and the time is split into

* **LR sampling**: the image encoders (run once per image, shared with HR) + MAR-LR
  (``num_inference_steps`` AR steps, guidance doubles the batch);
* **HR sampling**: MAR-HR on the same encoder features and the LR tokens (LR+HR mode only);
* **decode + extract**: the VAE's latent decoder and marching cubes over the occupancy
  field (``--extraction``, ``--resolution``).

The LR+HR / LR-only ratios (whole shape, and sampling alone) are measured in the same
run on the same device.

Sizes: ``tiny`` = presets vae_tiny + mar_tiny; ``paper`` = presets vae_paper + mar_paper
with the real CLIP ViT-L/14 and DINOv2-L architectures randomly initialised
(``clip_pretrained``/``dino_pretrained`` null) -- the cost does not depend on the weights'
values. Paper size runs only on CUDA (a "skipped" row otherwise). Random weights time the
sampling exactly; the extraction time depends on the decoded surface (hierarchical
extraction refines only cells near it), so the "queries" column says how many occupancy
queries the number covers; pass ``--model`` (a release folder or models:/ URI) for a
trained model's numbers.

Peak memory, two numbers per mode: "peak" (everything the process holds, models
included) and "above models" (peak minus what was held once the models were loaded, i.e.
the working memory of generating one shape).

* CUDA: ``torch.cuda.max_memory_allocated`` over one shape after the peak was reset, and
  ``memory_allocated`` before it (tensors only; the caching allocator's reserve and the
  CUDA context are not counted).
* CPU: a fresh process per mode (multiprocessing spawn) builds the models, reads its
  resident set size (RSS), and generates one shape while a psutil thread polls the RSS
  every 2 ms (the timed runs have no poller). A fresh process is needed because memory
  freed by earlier shapes stays mapped: within one process a later peak reads ~0 above a
  warm-up. RSS includes the Python/torch runtime (~0.5 GiB). Without psutil the peak is
  ``resource.getrusage(RUSAGE_SELF).ru_maxrss``, the process-lifetime peak, which also
  covers model loading.

    python benchmarks/generate.py                       # tiny on CPU (+ paper on CUDA)
    python benchmarks/generate.py --sizes paper --num-shapes 5 --resolution 256
    python benchmarks/generate.py --model models:/mar3d@champion --tracking-uri http://...
"""
from __future__ import annotations

import argparse
import os
import time
from dataclasses import dataclass

import numpy as np

MIB = 1024 * 1024


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", nargs="+", default=["tiny", "paper"], choices=["tiny", "paper"],
                   help="random-weight model sizes to time (ignored with --model)")
    p.add_argument("--model", default=None, help="release folder or models:/ URI instead of random weights")
    p.add_argument("--tracking-uri", default=None, help="MLflow tracking URI for models:/ URIs")
    p.add_argument("--device", default="auto", help="auto (CUDA if available), cpu or cuda")
    p.add_argument("--num-shapes", type=int, default=3, help="timed shapes per mode (after 1 warm-up)")
    p.add_argument("--num-inference-steps", type=int, default=None, help="AR steps (default: the model's)")
    p.add_argument("--diffusion-steps", type=int, default=None, help="(default: the model's)")
    p.add_argument("--guidance-scale", type=float, default=None,
                   help="final classifier-free guidance scale (default: the model's)")
    p.add_argument("--resolution", type=int, default=128, help="marching-cubes cells per axis")
    p.add_argument("--extraction", default="hierarchical", choices=["hierarchical", "dense"])
    p.add_argument("--image-size", type=int, default=224, help="side of the synthetic condition image")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = p.parse_args(argv)
    if args.num_shapes < 1:
        p.error("--num-shapes must be >= 1")
    return args


def random_pipeline(size: str, gen_cfg, device):
    """A pipeline of randomly initialised models of ``size`` (tiny | paper)."""
    import torch

    from mar3d.config import load_config
    from mar3d.inference import MAR3DPipeline
    from mar3d.models.condition import ConditionConfig, ImageEncoder
    from mar3d.models.mar import ConditionalMAR, MARConfig
    from mar3d.models.vae import ShapeVAE, VAEConfig

    torch.manual_seed(0)
    vae = ShapeVAE(load_config(VAEConfig, f"vae_{size}"))
    cond = load_config(ConditionConfig, f"mar_{size}", section="condition")
    if not cond.tiny and (cond.clip_pretrained or cond.dino_pretrained):
        raise ValueError("timing uses random encoders: the mar_paper preset must leave "
                         "clip_pretrained/dino_pretrained null")
    encoder = ImageEncoder(cond)
    lr, hr = (ConditionalMAR(cond, load_config(MARConfig, f"mar_{size}", section=s), encoder.spec)
              for s in ("lr", "hr"))
    for m in (vae, lr, hr):
        m.requires_grad_(False).eval()
    return MAR3DPipeline(vae, encoder, lr, hr, gen_cfg, device)


def condition_image(size: int) -> np.ndarray:
    """A synthetic RGBA condition: a coloured disc on white."""
    yy, xx = np.mgrid[:size, :size]
    img = np.full((size, size, 4), 255, np.uint8)
    img[(xx - size / 2) ** 2 + (yy - size / 2) ** 2 < (size / 3) ** 2, :3] = (200, 60, 40)
    return img


def build_pipeline(model: str | None, size: str | None, gen_kwargs: dict, device, tracking_uri=None):
    from mar3d.inference import PipelineConfig, MAR3DPipeline

    if model:
        return MAR3DPipeline.from_pretrained(model, PipelineConfig(**gen_kwargs), device=str(device),
                                             tracking_uri=tracking_uri)
    return random_pipeline(size, PipelineConfig(**gen_kwargs), device)


def _max_rss_mib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _cpu_memory_child(model, size, gen_kwargs, tracking_uri, threads, image, use_hr, sampling):
    """In a fresh process: (RSS with the models loaded, peak RSS while generating one
    shape), MiB. With psutil the peak is polled every 2 ms during the shape; without it,
    it is the process-lifetime ``ru_maxrss``, which also covers loading."""
    import threading

    import torch

    if threads:
        torch.set_num_threads(threads)
    pipe = build_pipeline(model, size, gen_kwargs, torch.device("cpu"), tracking_uri)
    try:
        import psutil
    except ImportError:
        loaded = _max_rss_mib()
        generate_one(pipe, image, seed=0, use_hr=use_hr, sampling=sampling)
        return loaded, _max_rss_mib()
    process = psutil.Process()
    loaded = peak = process.memory_info().rss
    stop = threading.Event()

    def poll():
        nonlocal peak
        while not stop.wait(0.002):
            peak = max(peak, process.memory_info().rss)
    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    try:
        generate_one(pipe, image, seed=0, use_hr=use_hr, sampling=sampling)
    finally:
        stop.set()
        poller.join()
    peak = max(peak, process.memory_info().rss)
    return loaded / MIB, peak / MIB


def cpu_memory(model, size, gen_kwargs, tracking_uri, threads, image, use_hr, sampling) -> tuple[float, float]:
    """(peak MiB, MiB above the loaded models) of one CPU shape, in a fresh process."""
    import multiprocessing as mp

    with mp.get_context("spawn").Pool(1) as pool:
        loaded, peak = pool.apply(_cpu_memory_child, (model, size, gen_kwargs, tracking_uri, threads,
                                                      image, use_hr, sampling))
    return peak, peak - loaded


def cuda_memory(pipe, image, use_hr: bool, sampling: dict) -> tuple[float, float]:
    """(peak MiB, MiB above what was allocated before) of one shape on CUDA."""
    import torch

    torch.cuda.synchronize(pipe.device)
    base = torch.cuda.memory_allocated(pipe.device)
    torch.cuda.reset_peak_memory_stats(pipe.device)
    generate_one(pipe, image, seed=0, use_hr=use_hr, sampling=sampling)
    torch.cuda.synchronize(pipe.device)
    peak = torch.cuda.max_memory_allocated(pipe.device)
    return peak / MIB, (peak - base) / MIB


@dataclass
class Timing:
    lr_s: float
    hr_s: float
    decode_s: float
    queries: int
    faces: int

    @property
    def total_s(self) -> float:
        return self.lr_s + self.hr_s + self.decode_s


def generate_one(pipe, image: np.ndarray, seed: int, use_hr: bool, sampling: dict) -> Timing:
    """One shape, the same steps as a ``MAR3DPipeline`` call with a clock between stages."""
    import torch

    from mar3d.inference import load_image

    def sync():
        if pipe.device.type == "cuda":
            torch.cuda.synchronize(pipe.device)

    with torch.no_grad():
        rgba = torch.from_numpy(load_image(image, pipe.config)).unsqueeze(0).to(pipe.device)
        gen = torch.Generator(device=pipe.device).manual_seed(seed)
        sync()
        t0 = time.perf_counter()
        features = pipe.encode(rgba)
        tokens = pipe.sample_lr(features, gen, **sampling)
        sync()
        t1 = time.perf_counter()
        if use_hr:
            tokens = pipe.sample_hr(features, tokens, gen, **sampling)
        sync()
        t2 = time.perf_counter()
        extraction = pipe.decode(tokens)
        sync()
        t3 = time.perf_counter()
    return Timing(t1 - t0, t2 - t1, t3 - t2, extraction.num_queries, len(extraction.mesh.faces))


def time_mode(pipe, image, use_hr: bool, sampling: dict, num_shapes: int) -> list[Timing]:
    generate_one(pipe, image, seed=1000, use_hr=use_hr, sampling=sampling)  # warm-up
    return [generate_one(pipe, image, seed=s, use_hr=use_hr, sampling=sampling)
            for s in range(num_shapes)]


def settings_of(pipe, sampling: dict) -> str:
    s = pipe.lr.mar.cfg.sampling
    iters = sampling.get("num_inference_steps") or s.num_inference_steps
    steps = sampling.get("diffusion_steps") or s.diffusion_steps
    guidance = sampling.get("guidance_scale") or s.guidance_scale
    return (f"{iters} AR steps, {steps} diffusion steps, guidance {guidance}, "
            f"{pipe.config.extraction} {pipe.config.resolution}^3")


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu")
                          if args.device == "auto" else args.device)
    gen_kwargs = {"resolution": args.resolution, "extraction": args.extraction}
    sampling = {k: v for k, v in {"num_inference_steps": args.num_inference_steps,
                                  "diffusion_steps": args.diffusion_steps,
                                  "guidance_scale": args.guidance_scale}.items() if v is not None}
    image = condition_image(args.image_size)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"CPU ({torch.get_num_threads()} torch threads, {os.cpu_count()} cores)"
    memory_kind = ("CUDA max_memory_allocated" if device.type == "cuda"
                   else "RSS of a fresh process per mode (psutil poll, else ru_maxrss)")
    print(f"device: {where}; {args.num_shapes} shapes per mode after 1 warm-up; "
          f"{args.image_size}px condition image; memory: {memory_kind}\n")
    print("| model | mode | settings | s/shape | LR sampling s | HR sampling s | decode+extract s "
          "| queries | faces | peak MiB | above models MiB | total vs LR-only | sampling vs LR-only |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")

    runs = [(args.model, None)] if args.model else [(None, s) for s in args.sizes]
    for model, size in runs:
        name = model or f"{size} (random init)"
        if size == "paper" and device.type != "cuda":
            print(f"| {name} | LR-only, LR+HR | | skipped: no CUDA (paper-size CLIP ViT-L/14 + "
                  f"DINOv2-L + 2 x MAR 1024x(16+16) would take minutes per shape on CPU) "
                  "| | | | | | | | | |")
            continue
        pipe = build_pipeline(model, size, gen_kwargs, device, args.tracking_uri)
        baseline = None
        for label, use_hr in (("LR-only", False), ("LR+HR", True)):
            timings = time_mode(pipe, image, use_hr, sampling, args.num_shapes)
            if device.type == "cuda":
                peak, above = cuda_memory(pipe, image, use_hr, sampling)
            else:
                peak, above = cpu_memory(model, size, gen_kwargs, args.tracking_uri, args.threads,
                                         image, use_hr, sampling)
            mean = lambda attr: float(np.mean([getattr(t, attr) for t in timings]))  # noqa: E731
            total, sampling_s = mean("total_s"), mean("lr_s") + mean("hr_s")
            baseline = baseline or (total, sampling_s)
            hr_cell = f"{mean('hr_s'):.3f}" if use_hr else "-"
            print(f"| {name} | {label} | {settings_of(pipe, sampling)} | {total:.3f} | "
                  f"{mean('lr_s'):.3f} | {hr_cell} | {mean('decode_s'):.3f} | "
                  f"{int(mean('queries'))} | {int(mean('faces'))} | {peak:.0f} | {above:.0f} | "
                  f"{total / baseline[0]:.2f}x | {sampling_s / baseline[1]:.2f}x |", flush=True)
        del pipe
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
