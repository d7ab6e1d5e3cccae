"""Benchmark of whole-volume follow-up prediction and of training throughput; writes docs/benchmarks.md.

Measures, with the network of ``configs/inference.json`` (the shipped weights when they fit):

- the denoiser's FLOPs per window (``torch.utils.flop_counter``, multiply-add = 2 FLOPs);
- whole-volume residual-shift sampling (T = 15) of one grid: wall time, the part spent in the
  denoiser and the rest (padding, Gaussian blending, scheduler updates), achieved FLOP/s and,
  on CUDA, the fraction of the GPU's dense bf16 peak; peak memory;
- the same for each speed option asked for (``--sw-batch``, ``--channels-last``, ``--compile``);
  ``tests/test_inferer.py`` checks that they leave the sample equal (1e-4);
- a PyTorch-profiler table of one reverse step (where the time goes, by operator);
- training: 3D patches per second of forward + backward + Adam, and the scaling from 1 to 2
  processes with DistributedDataParallel (gloo on CPU, NCCL on CUDA), as efficiency.

CPU (what docs/benchmarks.md reports): ``python scripts/benchmark_inference.py``.
GPU: ``python scripts/benchmark_inference.py --device cuda --amp bf16 --grid 512 512 256 --roi 96 --sw-batch 4 8
--channels-last --compile --paper-scale``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from benchmark_diffusion import machine_name, peak_memory_gib, reset_peak, synchronize, update_benchmarks  # noqa: E402
from monai.bundle import ConfigParser  # noqa: E402

from custom.inferer import ResidualShiftInferer  # noqa: E402
from custom.scheduler import ResidualShiftScheduler  # noqa: E402

SECTION = "## Inference and training"
BF16_PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}
"""Dense bf16 tensor-core peaks from NVIDIA's data sheets (SXM parts), by device-name fragment."""
CONTEXT_TOKENS, CONTEXT_DIM = 64, 256


def build_network(device: torch.device, load_weights: bool, paper_scale: bool = False) -> tuple[torch.nn.Module, str]:
    """The inference config's denoiser, with the shipped weights when they exist.

    Args:
        device: where the network goes.
        load_weights: load ``models/model.pt`` (the shipped, demo-size network only).
        paper_scale: the network of ``configs/paper_scale.json`` instead (randomly initialised).
    """
    parser = ConfigParser()
    names = ("inference.json", "paper_scale.json")[: 1 + paper_scale]
    parser.read_config([str(ROOT / "configs" / name) for name in names])
    parser.update({"bundle_root": str(ROOT)})
    network = parser.get_parsed_content("network_def")
    weights = ROOT / "models" / "model.pt"
    source = "random initialisation"
    if load_weights and not paper_scale and weights.is_file():
        network.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
        source = "models/model.pt"
    return network.to(device).eval(), source


class TimedNetwork(torch.nn.Module):
    """Counts the windows the denoiser sees and the time it spends on them."""

    def __init__(self, network: torch.nn.Module, device: torch.device) -> None:
        super().__init__()
        self.network, self.device = network, device
        self.seconds, self.windows = 0.0, 0

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        synchronize(self.device)
        start = time.perf_counter()
        out = self.network(x, timesteps, context)
        synchronize(self.device)
        self.seconds += time.perf_counter() - start
        self.windows += x.shape[0]
        return out


def flops_per_window(network: torch.nn.Module, roi: int, device: torch.device) -> int:
    x = torch.rand(1, 2, roi, roi, roi, device=device)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        network(x, torch.tensor([7], device=device), torch.zeros(1, CONTEXT_TOKENS, CONTEXT_DIM, device=device))
    return counter.get_total_flops()


def time_sampling(network: torch.nn.Module, args: argparse.Namespace, device: torch.device, sw_batch: int,
                  channels_last: bool, compiled: bool) -> dict:
    """Sample one volume once (after a warm-up on the same volume) and split the time."""
    amp = torch.bfloat16 if args.amp == "bf16" else None
    net = network.to(memory_format=torch.channels_last_3d) if channels_last else network
    net = torch.compile(net) if compiled else net
    timed = TimedNetwork(net, device)
    inferer = ResidualShiftInferer(ResidualShiftScheduler(), roi_size=args.roi, sw_batch_size=sw_batch,
                                   overlap=args.overlap, autocast_dtype=amp, channels_last=channels_last, seed=0)
    y0 = torch.rand(1, 1, *args.grid, generator=torch.Generator().manual_seed(0)).to(device)
    context = torch.zeros(1, CONTEXT_TOKENS, CONTEXT_DIM, device=device)
    inferer(y0, timed, context)  # warm-up: compilation, cuDNN autotuning, the cached importance map
    timed.seconds, timed.windows = 0.0, 0
    reset_peak(device)
    synchronize(device)
    start = time.perf_counter()
    inferer(y0, timed, context)
    synchronize(device)
    total = time.perf_counter() - start
    network.to(memory_format=torch.contiguous_format)
    return {"seconds": total, "network_s": timed.seconds, "windows": timed.windows, "peak_gib": peak_memory_gib(device)}


def profile_one_step(network: torch.nn.Module, args: argparse.Namespace, device: torch.device) -> str:
    """The operators of one reverse step over the whole volume, by self time."""
    from torch.profiler import ProfilerActivity, profile

    inferer = ResidualShiftInferer(ResidualShiftScheduler(), roi_size=args.roi, sw_batch_size=args.sw_batch[0],
                                   overlap=args.overlap, seed=0)
    y0 = torch.rand(1, 1, *args.grid, device=device)
    context = torch.zeros(1, CONTEXT_TOKENS, CONTEXT_DIM, device=device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch.inference_mode():
        inferer.denoise(network, y0, y0, 7, context)
        with profile(activities=activities) as prof:
            inferer.denoise(network, y0, y0, 7, context)
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=8, max_name_column_width=40)


def _train_steps(rank: int, world: int, args: argparse.Namespace, port: int, results: dict) -> None:
    torch.set_num_threads(args.train_threads)
    device = torch.device(f"cuda:{rank}") if args.device == "cuda" else torch.device("cpu")
    if world > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    network, _ = build_network(device, load_weights=False, paper_scale=args.paper_scale)
    network.train()
    model = torch.nn.parallel.DistributedDataParallel(network) if world > 1 else network
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-4)
    x = torch.rand(args.train_batch, 2, *(args.train_patch,) * 3, device=device)
    target = torch.rand(args.train_batch, 1, *(args.train_patch,) * 3, device=device)
    context = torch.zeros(args.train_batch, CONTEXT_TOKENS, CONTEXT_DIM, device=device)
    steps = torch.randint(0, 15, (args.train_batch,), device=device)
    amp = torch.bfloat16 if args.amp == "bf16" else None

    def step() -> None:
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            loss = torch.nn.functional.mse_loss(model(x, steps, context).float(), target)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()

    step()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(args.train_steps):
        step()
    synchronize(device)
    seconds = time.perf_counter() - start
    if world > 1:
        dist.destroy_process_group()
    results[rank] = seconds


def training_throughput(args: argparse.Namespace, world: int) -> float:
    """Patches per second of all processes together."""
    results = mp.Manager().dict()
    if world == 1:
        _train_steps(0, 1, args, 0, results)
    else:
        mp.spawn(_train_steps, args=(world, args, 29641, results), nprocs=world, join=True)
    return world * args.train_batch * args.train_steps / max(results.values())


def report(args: argparse.Namespace, device: torch.device, machine: str, source: str, flops: int, runs: dict,
           profile_table: str, training: dict[int, float]) -> str:
    peak = next((v for k, v in BF16_PEAK_TFLOPS.items()
                 if device.type == "cuda" and k in torch.cuda.get_device_name(device)), None)
    memory = "CUDA peak allocated" if device.type == "cuda" else "process max RSS, includes the interpreter"
    lines = [
        f"Machine: {machine}; precision {'fp32' if args.amp == 'none' else 'bf16 autocast'}. "
        "Command: `python scripts/benchmark_inference.py "
        f"{' '.join(sys.argv[1:])}`.",
        "",
        f"Network of `configs/{'paper_scale' if args.paper_scale else 'inference'}.json` "
        f"({sum(p.numel() for p in build_network(torch.device('cpu'), False, args.paper_scale)[0].parameters()):,} "
        f"parameters, {source}); grid {'x'.join(map(str, args.grid))}, windows {args.roi}^3, overlap {args.overlap}, "
        f"T = 15 reverse steps, one sample. Denoiser cost: **{flops / 1e9:.2f} GFLOP per window** (multiply-add = 2).",
        "",
        "| option | total | in the denoiser | rest (pad, blend, update) | windows | achieved | of bf16 peak "
        "| peak memory |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, r in runs.items():
        achieved = flops * r["windows"] / r["network_s"]
        fraction = (f"{100 * achieved / (peak * 1e12):.1f} %" if peak
                    else "n/a (CPU)" if device.type == "cpu" else "unknown GPU")
        lines.append(f"| {name} | {r['seconds']:.1f} s | {r['network_s']:.1f} s | "
                     f"{r['seconds'] - r['network_s']:.1f} s | {r['windows']} | {achieved / 1e9:.1f} GFLOP/s | "
                     f"{fraction} | {r['peak_gib']:.2f} GiB ({memory}) |")
    one, two = training[1], training.get(2)
    scaling = (f"2 processes (DDP, {'NCCL' if device.type == 'cuda' else 'gloo'}) {two:.2f} patches/s: "
               f"scaling efficiency **{100 * two / (2 * one):.0f} %**" if two
               else "2 processes: not measured (one GPU)")
    lines += [
        "",
        f"Training step (forward + backward + Adam, {args.train_patch}^3 patches, batch {args.train_batch} per "
        f"process, {args.train_threads} thread(s) per process, {args.train_steps} timed steps): 1 process "
        f"{one:.2f} patches/s, {scaling}.",
        "",
        "One reverse step over the whole volume, by operator (PyTorch profiler):",
        "",
        "```",
        profile_table.rstrip(),
        "```",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--amp", choices=["none", "bf16"], default="none")
    parser.add_argument("--grid", type=int, nargs=3, default=[96, 96, 96])
    parser.add_argument("--roi", type=int, default=32)
    parser.add_argument("--overlap", type=float, default=0.25)
    parser.add_argument("--sw-batch", type=int, nargs="+", default=[4], help="window batch sizes to compare")
    parser.add_argument("--channels-last", action="store_true", help="also time channels_last_3d")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile")
    parser.add_argument("--paper-scale", action="store_true",
                        help="time the network of configs/paper_scale.json (15.1 M)")
    parser.add_argument("--train-patch", type=int, default=32)
    parser.add_argument("--train-batch", type=int, default=2)
    parser.add_argument("--train-steps", type=int, default=10)
    parser.add_argument("--train-threads", type=int, default=1)
    parser.add_argument("--output", type=Path, default=ROOT / "docs" / "benchmarks.md")
    args = parser.parse_args()
    device = torch.device(args.device)
    machine = machine_name(device)  # before the training runs change the thread count
    network, source = build_network(device, load_weights=True, paper_scale=args.paper_scale)
    flops = flops_per_window(network, args.roi, device)
    runs = {}
    for sw_batch in args.sw_batch:
        runs[f"sw_batch_size {sw_batch}"] = time_sampling(network, args, device, sw_batch, False, False)
        print(list(runs)[-1], runs[list(runs)[-1]], flush=True)
    best = min(args.sw_batch, key=lambda b: runs[f"sw_batch_size {b}"]["seconds"])
    if args.channels_last:
        runs[f"sw_batch_size {best}, channels_last_3d"] = time_sampling(network, args, device, best, True, False)
    if args.compile:
        runs[f"sw_batch_size {best}, torch.compile"] = time_sampling(network, args, device, best, False, True)
    profile_table = profile_one_step(network, args, device)
    worlds = (1, 2) if device.type == "cpu" or torch.cuda.device_count() >= 2 else (1,)
    training = {world: training_throughput(args, world) for world in worlds}
    print(training, flush=True)
    title = f"Whole-volume prediction and training ({'GPU' if device.type == 'cuda' else 'CPU'})"
    content = report(args, device, machine, source, flops, runs, profile_table, training)
    update_benchmarks(args.output, {title: content}, {}, section=SECTION)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
