"""Long videos: frame 600 must cost no more time and memory than frame 20 (NUWA-Infinity's pool is bounded).

An image animation on the shipped video model (frame extent e_f = 2), a still of 2 x 1 patches
grown by 600 frames:

time_ratio   = seconds per frame over frames 591..600 / over frames 11..20, both in the one 600-frame run
               (same process, same model); goal <= 1.2.
pool_ratio   = bytes the Nearby Context Pool holds after frame 600 / after frame 20; goal <= 1.2.
memory_ratio = peak resident memory of generating (and decoding) 600 frames / 20 frames, each in a fresh
               child process of this script, the decoded frames' and the token grid's own bytes taken out
               (they are the output, which grows with its length); goal <= 1.2.
"""
import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from nuwa_core.infinity.generation import NuwaInfinity
from nuwa_core.infinity.patch_samplers import SamplerSettings

MODEL = ROOT / "models" / "nuwa" / "nuwa_infinity_plaza.safetensors"
EARLY, LATE = 20, 600
WINDOW = 10  # frames timed at each end
GOAL = 1.2


def still(model: NuwaInfinity) -> torch.Tensor:
    """A real 2 x 1-patch still: the top-left of the shipped video model's first frame."""
    from nuwa_core.images import load_image
    ph, pw = model.patch_pixels
    return load_image(ROOT / "models" / "nuwa" / "nuwa_infinity_plaza.jpg")[:, :ph, :2 * pw]


def animate(model: NuwaInfinity, frames: int, on_frame=None):
    state = model.canvas_from_image(still(model))
    per_frame = state.grid[1] * state.grid[2]

    def hook(done, total, s):
        if on_frame is not None and done % per_frame == 0:
            on_frame(done // per_frame, s)

    return model.generate(state, model.plan_frames(state, frames), SamplerSettings(top_k=64),
                          generator=torch.Generator().manual_seed(0), callback=hook)


def child(model_path: str, frames: int) -> None:
    torch.set_num_threads(1)
    model = NuwaInfinity.load(model_path)
    state = animate(model, frames)
    video = model.decode(state)
    with open("/proc/self/status") as f:
        peak = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    output = video.numel() * video.element_size() + state.tokens.numel() * state.tokens.element_size()
    print(json.dumps({"peak_bytes": peak - output, "pool_peak": state.pool.peak_size}))


def measure_child(model_path: str, frames: int) -> dict:
    out = subprocess.run([sys.executable, __file__, "--model", model_path, "--child", str(frames)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=str(MODEL))
    p.add_argument("--child", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args.model, args.child)
    torch.set_num_threads(1)
    model = NuwaInfinity.load(args.model)
    animate(model, 2)  # warm-up
    stamps, pool_bytes = {}, {}

    def on_frame(n, state):
        stamps[n] = time.perf_counter()
        pool_bytes[n] = state.pool.nbytes

    start = time.perf_counter()
    stamps[0] = start
    state = animate(model, LATE, on_frame)
    total = time.perf_counter() - start
    early = (stamps[EARLY] - stamps[EARLY - WINDOW]) / WINDOW
    late = (stamps[LATE] - stamps[LATE - WINDOW]) / WINDOW
    mem_early, mem_late = measure_child(args.model, EARLY), measure_child(args.model, LATE)
    rows = [("frames 11..20", early, pool_bytes[EARLY], EARLY, mem_early),
            ("frames 591..600", late, pool_bytes[LATE], LATE, mem_late)]
    print(f"model {Path(args.model).name}, extent {model.renderer.config.extent}, canvas {state.grid} patches, "
          f"{total:.1f} s for {LATE} frames")
    print(f"{'':>16} | {'s / frame':>9} | {'pool bytes':>10} | {'run of':>6} | {'peak RSS - output':>17} | pool peak")
    for name, sec, pool, frames, mem in rows:
        print(f"{name:>16} | {sec:9.3f} | {pool:10d} | {frames:6d} | {mem['peak_bytes'] / 2**20:13.1f} MiB | "
              f"{mem['pool_peak']}")
    figures = {"time_ratio": round(late / early, 3), "pool_ratio": round(pool_bytes[LATE] / pool_bytes[EARLY], 3),
               "memory_ratio": round(mem_late["peak_bytes"] / mem_early["peak_bytes"], 3),
               "seconds_per_frame": [round(early, 4), round(late, 4)], "frames": LATE, "goal": GOAL}
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
