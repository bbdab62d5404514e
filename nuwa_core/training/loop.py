"""What every training stage shares: errors, DDP, the training checkpoint, stop requests, logging and
the step loop (`Run`).

Checkpointing: `OUT.train.safetensors` holds the fp32 weights of everything being trained (a GAN's
discriminator too), `OUT.train.pt` the step, optimizer, RNG and data-generator state (plain tensors
and dicts, readable with weights_only=True); both are written atomically. `--resume` continues
exactly. SIGINT/SIGTERM and `--max-minutes` save before stopping; a NaN loss stops without
overwriting the last good checkpoint. `OUT` itself is the shipped model (`--save-dtype`, fp16 by
default). Data position = the data generator's state: samples are drawn from it, so restoring it
continues the same sample sequence.

Distributed: under `torchrun --nproc_per_node=N` each process draws its own samples (seed + rank)
and gradients are averaged by DistributedDataParallel (gloo on CPU, nccl on CUDA).
"""
from __future__ import annotations

import csv
import json
import os
import signal
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn

from ..checkpoint import atomic_write, load_state_dict, load_strict, save_model_file


class TrainingError(ValueError):
    """Bad training input or a run that cannot continue; the message says what and why."""


class TrainingDiverged(TrainingError):
    """The loss became NaN/inf; the last good checkpoint is kept."""




class Dist:
    """The process group under torchrun, and the device this process trains on: `device` (e.g. ComfyUI's),
    else CUDA when there is one, else the CPU."""

    def __init__(self, device: str | torch.device | None = None):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.enabled = self.world > 1
        self.device = torch.device("cpu")
        if self.enabled:
            import torch.distributed as td
            if torch.cuda.is_available():
                self.device = torch.device("cuda", self.local_rank)
                torch.cuda.set_device(self.device)
            if not td.is_initialized():
                td.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
        elif device is not None:
            self.device = torch.device(device)
        elif torch.cuda.is_available():
            self.device = torch.device("cuda")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def wrap(self, module: nn.Module, find_unused_parameters: bool = False) -> nn.Module:
        if not self.enabled:
            return module
        from torch.nn.parallel import DistributedDataParallel as DDP
        return DDP(module, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                   broadcast_buffers=False, find_unused_parameters=find_unused_parameters)

    def barrier(self):
        if self.enabled:
            import torch.distributed as td
            td.barrier()

    def any_flag(self, flag: bool) -> bool:
        """True on every rank when any rank raised the flag (stop requests, NaN)."""
        if not self.enabled:
            return flag
        import torch.distributed as td
        t = torch.tensor([1.0 if flag else 0.0], device=self.device)
        td.all_reduce(t)
        return bool(t.item() > 0)

    def close(self):
        if self.enabled:
            import torch.distributed as td
            if td.is_initialized():
                td.destroy_process_group()



# --------------------------------------------------------------------------------------------
# Training checkpoints

def train_paths(out: Path) -> tuple[Path, Path]:
    return out.with_name(out.name + ".train.safetensors"), out.with_name(out.name + ".train.pt")


def rank_state_path(out: Path, rank: int) -> Path:
    return out.with_name(out.name + f".train.rank{rank}.pt")


def save_training(out: Path, modules: dict[str, nn.Module], state: dict, dist: Dist, data_gen: torch.Generator):
    """Weights (fp32 safetensors) and the state file; data RNG per rank."""
    if dist.enabled:  # every rank keeps its own data position
        rank_state = {"data_rng": data_gen.get_state()}
        atomic_write(rank_state_path(out, dist.rank), lambda tmp: torch.save(rank_state, tmp))
    if not dist.main:
        return
    weights, state_file = train_paths(out)
    tensors = {f"{name}.{k}": v for name, m in modules.items() for k, v in m.state_dict().items()}
    save_model_file(weights, tensors, "training_checkpoint", extra_metadata={"step": str(state["step"])})
    full = dict(state)
    full["data_rng"] = data_gen.get_state()
    full["torch_rng"] = torch.get_rng_state()
    atomic_write(state_file, lambda tmp: torch.save(full, tmp))


def load_training(out: Path, modules: dict[str, nn.Module], config: dict, dist: Dist) -> dict:
    weights, state_file = train_paths(out)
    if not weights.is_file() or not state_file.is_file():
        raise TrainingError(f"--resume: no training checkpoint next to {out} (expected {weights.name} and "
                            f"{state_file.name}); start without --resume")
    state = torch.load(state_file, map_location="cpu", weights_only=True)
    saved, config = _flat(json.loads(state["config"])), _flat(json.loads(json.dumps(config, sort_keys=True)))
    diff = sorted(k for k in set(saved) | set(config) if saved.get(k, "<absent>") != config.get(k, "<absent>"))
    if diff:
        detail = "; ".join(f"{k}: checkpoint {saved.get(k, '<absent>')!r} vs now {config.get(k, '<absent>')!r}"
                           for k in diff)
        raise TrainingError(f"--resume: the checkpoint {state_file.name} was trained with another configuration "
                            f"({detail}); use the same settings or start a new run")
    tensors, _ = load_state_dict(weights)
    for name, m in modules.items():
        prefix = name + "."
        load_strict(m, {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)},
                    f"{weights.name} ({name})")
    if dist.enabled:
        rp = rank_state_path(out, dist.rank)
        if rp.is_file():
            state["data_rng"] = torch.load(rp, map_location="cpu", weights_only=True)["data_rng"]
    return state


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out



class StopRequest:
    """SIGINT/SIGTERM set a flag; the loop saves and stops at the next step boundary."""

    def __init__(self):
        self.signal = None
        self._old = {}

    def __enter__(self):
        if hasattr(signal, "SIGTERM"):
            for sig in (signal.SIGINT, signal.SIGTERM):
                try:
                    self._old[sig] = signal.signal(sig, self._handle)
                except ValueError:  # not the main thread
                    pass
        return self

    def _handle(self, signum, frame):
        if self.signal is not None:  # second signal: give up at once
            raise KeyboardInterrupt
        self.signal = signum
        print(f"\n[train] received signal {signum}: saving a checkpoint and stopping after this step",
              file=sys.stderr, flush=True)

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def stop_reason(stop: StopRequest, dist: Dist, t0: float, max_minutes: float | None) -> str | None:
    """Why a training loop must stop now ("signal", "max-minutes"), agreed across DDP ranks; else None."""
    if dist.any_flag(stop.signal is not None):
        return "signal"
    if max_minutes and dist.any_flag((time.time() - t0) / 60 >= max_minutes):
        return "max-minutes"
    return None


class CsvLog:
    def __init__(self, log_dir: str | None, name: str, fields: list[str], resume: bool, enabled: bool):
        self.file = None
        if log_dir and enabled:
            path = Path(log_dir) / f"{name}.csv"
            path.parent.mkdir(parents=True, exist_ok=True)
            new = not (resume and path.is_file())
            self.file = open(path, "w" if new else "a", newline="")
            self.writer = csv.DictWriter(self.file, fieldnames=fields, extrasaction="ignore")
            if new:
                self.writer.writeheader()

    def write(self, row: dict):
        if self.file:
            self.writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
            self.file.flush()

    def close(self):
        if self.file:
            self.file.close()


def _progress(total, initial, enabled, desc):
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        return None
    return tqdm(total=total, initial=initial, disable=not enabled, desc=desc, dynamic_ncols=True,
                mininterval=2.0, file=sys.stderr)


def lr_factor(step: int, warmup: int, total: int = 0) -> float:
    """Linear warm-up over `warmup` steps; then, when `total` is given, linear decay to 0 at step
    `total` (NUWA-Infinity appendix A: 5% warm-up, linear decay); else constant."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if total > warmup:
        return max(0.0, (total - step) / (total - warmup))
    return 1.0


def set_lr(opt, lr: float, step: int, warmup: int, total: int = 0) -> None:
    for g in opt.param_groups:
        g["lr"] = lr * lr_factor(step, warmup, total)


def _finite(x: torch.Tensor) -> bool:
    return bool(torch.isfinite(x).all())


class Run:
    """What every training stage shares: resume, checkpoints and the step loop (CSV log, progress bar,
    signal / --max-minutes stop, NaN stop, saving every --save-every and sampling every --sample-every
    steps). A stage says what one step is and what its checkpoint holds beyond weights and optimizers.

    monitor(run, step, stats) -> a stop reason or None, called before every step: a caller's own stop
    (cancel, a time budget); it may also change `run.args.steps`, which the learning-rate schedule follows.
    A stage sets `run.preview` to a function that returns an IMAGE [1, H, W, 3] of how the model does.
    """

    def __init__(self, name: str, args, dist: Dist, modules: dict[str, nn.Module], optims: dict,
                 config: dict, data_gen: torch.Generator, monitor=None):
        self.name, self.args, self.dist, self.monitor = name, args, dist, monitor
        self.preview = None
        # the learning-rate schedule and the training region change what a run learns: a resumed run
        # must use the same ones (recorded only when used, so older checkpoints still resume)
        shared = {k: getattr(args, k) for k in ("decay", "train_box") if getattr(args, k, None) not in (None, "none")}
        self.config = {**config, **shared}
        self.modules, self.optims, self.data_gen = modules, optims, data_gen
        self.out = Path(args.out)

    def lr_total(self, units_per_step: int = 1) -> int:
        """The step (in the units set_lr counts) where --decay linear reaches 0; 0 without decay."""
        return self.args.steps * units_per_step if getattr(self.args, "decay", "none") == "linear" else 0

    def resume(self) -> dict:
        """Weights, optimizers and RNGs from the training checkpoint; -> its state (step, extras)."""
        st = load_training(self.out, self.modules, self.config, self.dist)
        for name, opt in self.optims.items():
            opt.load_state_dict(st["optim"][name])
        self.data_gen.set_state(st["data_rng"])
        torch.set_rng_state(st["torch_rng"])
        return st

    def save(self, step: int, **extra):
        state = {"step": step, **extra, "optim": {k: o.state_dict() for k, o in self.optims.items()},
                 "config": json.dumps(self.config, sort_keys=True)}
        save_training(self.out, self.modules, state, self.dist, self.data_gen)

    def loop(self, step: int, one_step, fields: list[str], postfix=None, sample=None, extra=dict):
        """Runs one_step(step, check) -> stats until --steps or a stop; saves at the end. -> (step, stopped, stats).

        check(loss) raises TrainingDiverged on a NaN/inf loss (any rank); postfix(stats, steps_per_s) ->
        progress-bar fields (the rate counts this run's steps only, also after --resume); sample(path) writes a sample (main rank); extra() -> what save() stores besides the optimizers.
        """
        args, dist = self.args, self.dist
        log = CsvLog(args.log_dir, self.name, fields, args.resume, dist.main)
        bar = _progress(args.steps, step, dist.main and not args.quiet, self.name)
        t0, first, last_good, stopped = time.time(), step, None, "steps"
        stats: dict = {"loss": float("nan")}

        def check(loss: torch.Tensor):
            bad = not _finite(loss.detach()) or step == args.debug_nan_at
            if dist.any_flag(bad):
                raise TrainingDiverged(_nan_message(self.out, step, last_good))

        try:
            with StopRequest() as stop:
                while step < args.steps:
                    reason = stop_reason(stop, dist, t0, args.max_minutes)
                    if not reason and self.monitor is not None:
                        reason = self.monitor(self, step, stats)
                    if reason:
                        stopped = reason
                        break
                    if args.stop_at and step >= args.stop_at:
                        stopped = "stop-at"
                        break
                    res = one_step(step, check)
                    step += 1
                    stats = {"step": step, "time": time.time() - t0, **res}
                    log.write(stats)
                    if bar is not None:
                        bar.update(1)
                        if postfix is not None:
                            bar.set_postfix(**postfix(stats, (step - first) / max(1e-9, stats["time"])))
                    if args.save_every and step % args.save_every == 0:
                        self.save(step, **extra())
                        last_good = step
                    if sample is not None and args.sample_every and dist.main and step % args.sample_every == 0:
                        sample(Path(args.sample_dir or "outputs/samples") / f"{self.name}_{step:06d}.png")
        finally:
            if bar is not None:
                bar.close()
            log.close()
        self.save(step, **extra())
        return step, stopped, stats

    def finish(self):
        self.dist.barrier()
        self.dist.close()


def dump_replica(out: Path, module: nn.Module, dist: Dist):
    """Tests: every rank writes its own copy of the weights, to check the replicas agree."""
    sd = {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}
    atomic_write(out.with_name(out.name + f".replica{dist.rank}.pt"), lambda tmp: torch.save(sd, tmp))


def _nan_message(out: Path, step: int, last_good) -> str:
    weights, _ = train_paths(out)
    where = (f"the last good checkpoint ({weights.name}, step {last_good}) is kept" if last_good is not None
             else "no checkpoint of this run was written yet" + (" (an older one is kept)" if weights.is_file() else ""))
    return (f"the loss became NaN or infinite at step {step}; stopping without saving. {where}. "
            f"Lower --lr or resume from the checkpoint with --resume")


def dtype_named(name: str) -> torch.dtype:
    return {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[name]
