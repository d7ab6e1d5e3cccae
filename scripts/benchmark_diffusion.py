"""Benchmark of the CIResDiff denoiser and samplers, and the kappa experiment; writes docs/benchmarks.md.

Measures, for the default ``AttentionDiffusionUNet``:

- forward and forward+backward time per patch (batch 1) and peak memory (CUDA: the allocator's
  peak; CPU: the process's maximum resident set size, which includes the interpreter);
- the activation memory a training step keeps for the backward pass, counted exactly with
  autograd's saved-tensor hooks on a smaller patch and scaled to the training patch and batch;
- whole-volume sliding-window sampling time of the residual-shift sampler (T = 15), DDIM (50
  steps) and DDPM (T = 1000), measured in the same run and reported as ratios. DDPM may be
  timed on its first N steps and extrapolated (``--ddpm-measured-steps``), labelled as such;
- ``--kappa``: kappa = 2.0 (ResShift) against kappa = 0.1 (CIResDiff's released code) on toy
  volumes in [0, 1]: a tiny denoiser trained for a fixed budget per kappa and seed, then the
  PSNR of its samples against x0.

CPU (what docs/benchmarks.md reports; a smaller volume for all three samplers, DDPM extrapolated):
``python scripts/benchmark_diffusion.py --patch 64 --volume 32 32 48 --roi 32 --kappa``.
GPU (the paper's grid; 1000 DDPM steps over 196 windows would take hours, so DDPM stays extrapolated):
``python scripts/benchmark_diffusion.py --device cuda --amp bf16 --volume 512 512 256 --roi 96``.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import resource
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from monai.networks.schedulers import DDIMScheduler, DDPMScheduler

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from custom.engines import ResidualShiftPrepareBatch  # noqa: E402
from custom.inferer import DiffusionSamplingInferer, ResidualShiftInferer  # noqa: E402
from custom.networks import AttentionDiffusionUNet  # noqa: E402
from custom.scheduler import ResidualShiftScheduler  # noqa: E402

SECTION = "## Diffusion"
CONTEXT_TOKENS, CONTEXT_DIM = 32, 256


def machine_name(device: torch.device) -> str:
    """A one-line description of the machine the numbers come from."""
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    model = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text(encoding="utf-8").splitlines()
                 if line.startswith("model name")]
        model = names[0] if names else model
    return (f"CPU {model} ({len(os.sched_getaffinity(0))} cores, shared), {torch.get_num_threads()} torch threads, "
            f"torch {torch.__version__}")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    """Mean wall time of ``fn`` over ``repeats`` calls after one warm-up call."""
    fn()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    synchronize(device)
    return (time.perf_counter() - start) / repeats


def peak_memory_gib(device: torch.device) -> float:
    """CUDA: peak allocated since the last reset; CPU: the process's maximum resident set size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # kB on Linux


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def saved_activation_gib(network: torch.nn.Module, patch: int, device: torch.device, amp: torch.dtype | None) -> float:
    """Bytes autograd keeps for the backward pass of one forward (batch 1, ``patch``^3), in GiB.

    Every saved tensor is counted once per storage, so views and tensors saved twice are not
    double-counted. Convolution and normalisation activations scale with the voxel count; the
    bottleneck attention uses torch's scaled_dot_product_attention, linear in memory on GPU.
    """
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return t

    x, t, c = inputs(network, 1, patch, device)
    network.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            out = network(x, t, c)
    del out
    return sum(storages.values()) / 2**30


def inputs(network: AttentionDiffusionUNet, batch: int, patch: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    x = torch.rand(batch, 2, patch, patch, patch, device=device)
    t = torch.randint(0, 15, (batch,), device=device)
    c = torch.randn(batch, CONTEXT_TOKENS, CONTEXT_DIM, device=device)
    return x, t, c


def benchmark_denoiser(args: argparse.Namespace, device: torch.device, amp: torch.dtype | None) -> dict:
    """Forward and forward+backward time and peak memory of the default denoiser on one patch."""
    torch.manual_seed(0)
    network = AttentionDiffusionUNet(context_dim=CONTEXT_DIM).to(device)
    result = {"parameters": sum(p.numel() for p in network.parameters())}
    probe = args.memory_probe_patch
    scale = (args.train_patch / probe) ** 3 * args.train_batch
    result["saved_probe_gib"] = saved_activation_gib(network, probe, device, torch.bfloat16)
    result["estimated_train_gib"] = result["saved_probe_gib"] * scale + result["parameters"] * 16 / 2**30
    x, t, c = inputs(network, 1, args.patch, device)

    def forward() -> None:
        with torch.inference_mode(), torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            network(x, t, c)

    def forward_backward() -> None:
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            loss = network(x, t, c).float().square().mean()
        loss.backward()
        network.zero_grad(set_to_none=True)

    network.eval()
    reset_peak(device)
    result["forward_s"] = timed(forward, device, args.repeats)
    result["forward_peak_gib"] = peak_memory_gib(device)
    network.train()
    reset_peak(device)
    result["forward_backward_s"] = timed(forward_backward, device, args.repeats)
    result["forward_backward_peak_gib"] = peak_memory_gib(device)
    return result


class _Stop(Exception):
    """Raised by ``_CountingNetwork`` to end a timed sampling run after N steps."""


class _CountingNetwork(torch.nn.Module):
    """Wraps the denoiser, counts reverse steps (distinct timesteps seen) and stops after ``limit``."""

    def __init__(self, network: torch.nn.Module, limit: int | None) -> None:
        super().__init__()
        self.network = network
        self.limit = limit
        self.steps: list[int] = []

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        step = int(timesteps[0])
        if not self.steps or self.steps[-1] != step:
            if self.limit is not None and len(self.steps) == self.limit:
                raise _Stop
            self.steps.append(step)
        return self.network(x, timesteps, context)


def time_sampler(inferer: DiffusionSamplingInferer, network: torch.nn.Module, y0: torch.Tensor, context: torch.Tensor,
                 total_steps: int, measured_steps: int | None, device: torch.device) -> tuple[float, str]:
    """Wall time of one whole-volume sample; extrapolated linearly from ``measured_steps`` when given."""
    counting = _CountingNetwork(network, measured_steps)
    synchronize(device)
    start = time.perf_counter()
    try:
        inferer(y0, counting, context)
    except _Stop:
        pass
    synchronize(device)
    elapsed = time.perf_counter() - start
    if measured_steps is None or measured_steps >= total_steps:
        return elapsed, f"measured ({len(counting.steps)} steps)"
    return elapsed / len(counting.steps) * total_steps, f"extrapolated from {len(counting.steps)} steps"


def benchmark_sampling(args: argparse.Namespace, device: torch.device, amp: torch.dtype | None) -> dict:
    """Whole-volume sampling time of the residual sampler against DDIM and DDPM, same network and windows."""
    torch.manual_seed(0)
    network = AttentionDiffusionUNet(context_dim=CONTEXT_DIM).to(device).eval()
    y0 = torch.rand(1, 1, *args.volume, device=device)
    context = torch.randn(1, CONTEXT_TOKENS, CONTEXT_DIM, device=device)
    window = dict(roi_size=args.roi, sw_batch_size=args.sw_batch_size, overlap=args.overlap, autocast_dtype=amp)
    ddpm_measured = args.ddpm_measured_steps or None
    runs = {
        "residual shift (T = 15)": (ResidualShiftInferer(ResidualShiftScheduler(), **window), 15, None),
        "DDIM (50 steps)": (DiffusionSamplingInferer(DDIMScheduler(1000), num_inference_steps=50, **window), 50, None),
        "DDPM (T = 1000)": (DiffusionSamplingInferer(DDPMScheduler(1000), **window), 1000, ddpm_measured),
    }
    results = {}
    for name, (inferer, steps, measured) in runs.items():
        seconds, how = time_sampler(inferer, network, y0, context, steps, measured, device)
        results[name] = {"seconds": seconds, "how": how, "per_step": seconds / steps}
        print(f"  {name}: {seconds:.1f} s ({how})", flush=True)
    return results


def toy_pairs(n: int, size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Toy (y0, x0) pairs in [0, 1]: smooth lung-like texture; x0 adds a localised blob of 0.1-0.3.

    y0 is a smoothed random field mapped to [0.1, 0.5] (parenchyma and vessels); the follow-up x0
    gains a Gaussian blob of random centre, width and amplitude (fibrotic densification), clipped to [0, 1].
    """
    field = torch.rand(n, 1, size, size, size, generator=generator)
    for _ in range(2):
        field = torch.nn.functional.avg_pool3d(field, 3, stride=1, padding=1, count_include_pad=False)
    low, high = field.amin(dim=(2, 3, 4), keepdim=True), field.amax(dim=(2, 3, 4), keepdim=True)
    field = (field - low) / (high - low)
    y0 = 0.1 + 0.4 * field
    grid = torch.stack(torch.meshgrid(*[torch.arange(size, dtype=torch.float32)] * 3, indexing="ij"))
    centre = torch.rand(n, 3, 1, 1, 1, generator=generator) * size * 0.5 + size * 0.25
    width = torch.rand(n, 1, 1, 1, 1, generator=generator) * size * 0.1 + size * 0.1
    amplitude = torch.rand(n, 1, 1, 1, 1, generator=generator) * 0.2 + 0.1
    blob = amplitude * torch.exp(-((grid.unsqueeze(0) - centre) ** 2).sum(1, keepdim=True) / (2 * width**2))
    return y0, (y0 + blob).clamp(0, 1)


def psnr(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-case PSNR in dB for data range 1."""
    mse = ((prediction - target) ** 2).mean(dim=(1, 2, 3, 4))
    return -10 * torch.log10(mse)


def kappa_experiment(args: argparse.Namespace) -> dict:
    """Train a tiny denoiser per kappa and seed for a fixed budget, then sample held-out toy pairs."""
    results: dict[float, list[float]] = {}
    identity = []
    for kappa in args.kappas:
        for seed in range(args.kappa_seeds):
            torch.manual_seed(seed)
            generator = torch.Generator().manual_seed(seed)
            scheduler = ResidualShiftScheduler(kappa=kappa)
            inferer = ResidualShiftInferer(scheduler, roi_size=args.kappa_size, seed=1000 + seed)
            # the bundle's training step (configs/train.json) without text and mean patches; its
            # steps and noise come from the global random state seeded above
            prepare = ResidualShiftPrepareBatch(scheduler)
            network = AttentionDiffusionUNet(channels=(8, 16, 32), attention_levels=(False, False, False),
                                             norm_num_groups=4, num_head_channels=8, with_conditioning=False)
            optimiser = torch.optim.Adam(network.parameters(), lr=2e-3)
            for _ in range(args.kappa_train_steps):
                y0, x0 = toy_pairs(4, args.kappa_size, generator)
                inputs, target, _, kwargs = prepare({"image": y0, "target": x0})
                loss = torch.nn.functional.mse_loss(network(inputs, **kwargs), target)
                optimiser.zero_grad()
                loss.backward()
                optimiser.step()
            network.eval()
            y0, x0 = toy_pairs(8, args.kappa_size, torch.Generator().manual_seed(10_000 + seed))
            value = psnr(inferer(y0, network), x0).mean().item()
            results.setdefault(kappa, []).append(value)
            if kappa == args.kappas[0]:
                identity.append(psnr(y0, x0).mean().item())
            print(f"  kappa {kappa} seed {seed}: PSNR {value:.2f} dB", flush=True)
    return {"psnr": results, "identity": identity}


def mean_std(values: list[float]) -> str:
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / max(len(values) - 1, 1))
    return f"{mean:.2f} ± {std:.2f}"


def report_cost(args: argparse.Namespace, device: torch.device, denoiser: dict, sampling: dict) -> str:
    amp = args.amp if args.amp != "none" else "fp32"
    memory = ("CUDA peak allocated" if device.type == "cuda"
              else "process max RSS (includes ~0.5 GiB interpreter and torch)")
    residual = sampling["residual shift (T = 15)"]["seconds"]
    lines = [
        f"Machine: {machine_name(device)}; precision {amp}. Command: `python scripts/benchmark_diffusion.py "
        f"{' '.join(sys.argv[1:])}`.",
        "",
        f"Default `AttentionDiffusionUNet()` (channels (32, 64, 128, 256), 1 residual block per level, text fusion at "
        f"the two coarsest levels, bottleneck self-attention): {denoiser['parameters']:,} parameters; "
        f"context {CONTEXT_TOKENS} tokens x {CONTEXT_DIM}.",
        "",
        "| patch (batch 1) | time | peak memory |",
        "| --- | --- | --- |",
        f"| forward, {args.patch}^3 | {denoiser['forward_s']:.2f} s | "
        f"{denoiser['forward_peak_gib']:.2f} GiB ({memory}) |",
        f"| forward + backward, {args.patch}^3 | {denoiser['forward_backward_s']:.2f} s | "
        f"{denoiser['forward_backward_peak_gib']:.2f} GiB ({memory}) |",
        "",
        f"Training memory estimate (bf16 autocast, {args.train_patch}^3, batch {args.train_batch}): autograd saves "
        f"{denoiser['saved_probe_gib']:.3f} GiB for one {args.memory_probe_patch}^3 patch, counted with saved-tensor "
        f"hooks; scaled by voxels and batch, plus fp32 weights, gradients and Adam moments: "
        f"**~{denoiser['estimated_train_gib']:.1f} GiB** (an estimate; allocator overhead and cuDNN workspaces come "
        "on top).",
        "",
        f"Whole-volume sampling of one {'x'.join(map(str, args.volume))} volume, windows {args.roi}^3, overlap "
        f"{args.overlap}, {args.sw_batch_size} windows per call, Gaussian blending (same network and windows for all "
        "three):",
        "",
        "| sampler | time | per step | relative to residual shift |",
        "| --- | --- | --- | --- |",
    ]
    for name, r in sampling.items():
        lines.append(f"| {name} | {r['seconds']:.1f} s ({r['how']}) | {r['per_step']:.2f} s | "
                     f"{r['seconds'] / residual:.1f}x |")
    return "\n".join(lines)


def report_kappa(args: argparse.Namespace, kappa: dict) -> str:
    rows = [f"| kappa = {k} | {mean_std(v)} dB | " + ", ".join(f"{x:.2f}" for x in v) + " |"
            for k, v in kappa["psnr"].items()]
    best = max(kappa["psnr"], key=lambda k: sum(kappa["psnr"][k]))
    return "\n".join(
        [
            f"Toy pairs in [0, 1], {args.kappa_size}^3: y0 a smoothed random texture in [0.1, 0.5], x0 = y0 plus a "
            "Gaussian blob of amplitude 0.1-0.3 (random centre and width). Per kappa and seed: a tiny denoiser "
            f"(channels (8, 16, 32), no text) trained {args.kappa_train_steps} steps (batch 4, Adam 2e-3) with "
            "`ResidualShiftPrepareBatch` and the MSE, "
            "then 15-step sampling of 8 held-out pairs; PSNR against x0 (data range 1), mean ± std over "
            f"{args.kappa_seeds} seeds. Identity (x0 = y0): {mean_std(kappa['identity'])} dB.",
            "",
            "| kappa | PSNR | per seed |",
            "| --- | --- | --- |",
            *rows,
            "",
            f"Higher PSNR here: kappa = {best}.",
        ]
    )


def update_benchmarks(
    path: Path, subsections: dict[str, str], placeholders: dict[str, str], section: str = SECTION
) -> None:
    """Replace (or add) ``### `` subsections inside one ``## `` section; keep everything else.

    Args:
        path: the benchmarks page.
        subsections: title -> new content.
        placeholders: title -> content written only where that subsection does not exist yet.
        section: the ``## `` heading line of the section.
    """
    text = path.read_text(encoding="utf-8") if path.exists() else "# Benchmarks\n"
    lines = text.rstrip("\n").split("\n")
    if section not in lines:
        lines += ["", section, ""]
    start = lines.index(section)
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    body = lines[start + 1 : end]
    parts: dict[str, list[str]] = {}
    order: list[str] = []
    head = None
    for line in body:
        if line.startswith("### "):
            head = line
            order.append(head)
            parts[head] = []
        elif head is not None:
            parts[head].append(line)
    intro = body[: body.index(order[0])] if order else body
    for title, content in {**subsections, **{t: c for t, c in placeholders.items() if f"### {t}" not in parts}}.items():
        heading = f"### {title}"
        if heading not in parts:
            order.append(heading)
        parts[heading] = ["", content, ""]
    new_body = intro + [line for heading in order for line in [heading, *parts[heading]]]
    path.write_text("\n".join(lines[:start + 1] + new_body + lines[end:]).rstrip("\n") + "\n", encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--amp", choices=["none", "bf16", "fp16"], default="none")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (the machine is shared)")
    parser.add_argument("--patch", type=int, default=96,
                        help="patch of the timings (CPU: 64 keeps the backward in RAM)")
    parser.add_argument("--train-patch", type=int, default=96, help="training patch of the memory estimate")
    parser.add_argument("--train-batch", type=int, default=2)
    parser.add_argument("--memory-probe-patch", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--volume", type=int, nargs=3, default=[32, 32, 48])
    parser.add_argument("--roi", type=int, default=32)
    parser.add_argument("--overlap", type=float, default=0.25)
    parser.add_argument("--sw-batch-size", type=int, default=4)
    parser.add_argument("--ddpm-measured-steps", type=int, default=20, help="0 runs all 1000 DDPM steps")
    parser.add_argument("--skip-cost", action="store_true", help="skip the denoiser and sampling timings")
    parser.add_argument("--kappa", action="store_true", help="run the kappa experiment")
    parser.add_argument("--kappas", type=float, nargs="+", default=[2.0, 0.1])
    parser.add_argument("--kappa-seeds", type=int, default=3)
    parser.add_argument("--kappa-train-steps", type=int, default=300)
    parser.add_argument("--kappa-size", type=int, default=16)
    parser.add_argument("--output", type=Path, default=Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    amp = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.amp]
    subsections, placeholders = {}, {}
    if not args.skip_cost:
        print("denoiser cost ...", flush=True)
        denoiser = benchmark_denoiser(args, device, amp)
        print(denoiser, flush=True)
        print("whole-volume sampling ...", flush=True)
        sampling = benchmark_sampling(args, device, amp)
        kind = "GPU" if device.type == "cuda" else "CPU"
        subsections[f"Denoiser cost and sampling time ({kind})"] = report_cost(args, device, denoiser, sampling)
        if device.type != "cuda":
            placeholders["Denoiser cost and sampling time (GPU)"] = "not yet measured (no GPU in this session)"
    if args.kappa:
        print("kappa experiment ...", flush=True)
        with_threads = torch.get_num_threads()
        torch.set_num_threads(1)  # tiny tensors: one thread is faster on a shared machine
        kappa = kappa_experiment(args)
        torch.set_num_threads(with_threads)
        subsections["kappa: 2.0 (ResShift) or 0.1 (CIResDiff's code) for CT in [0, 1]"] = report_kappa(args, kappa)
    for title, content in subsections.items():
        print(f"\n### {title}\n\n{content}")
    update_benchmarks(args.output, subsections, placeholders)
    print(f"\nwritten to {args.output}")


if __name__ == "__main__":
    main()
