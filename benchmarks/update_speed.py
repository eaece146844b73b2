"""How fast are PQL's learner updates, and how far are they from the machine's arithmetic limit?

For each size (the README's CPU quick start, and the scripts' defaults) this builds pql.py's
networks for Pendulum, fills a replay buffer with random transitions, and times the learners' share
of one iteration of pql.py (8 V-updates and 4 P-updates, each with its sampling) for each code
path, side by side in one process, one iteration of each path in turn, so that a slow patch of the
machine hits all paths alike. The figures are the median iteration (this machine's speed drifts and
stalls; the mean is printed beside it):

    before    pql.py as it was before the fast path (commit BEFORE_FAST_PATH, read with `git show`):
              two separate Q networks, AdamW's default loop over tensors, a loop for the target update,
              two-dimensional indexing into the replay buffer
    eager     pql.py as it is: both Q heads in one batched matmul per layer (the scalar Q's last layer
              as a product and a sum), fused (or foreach) AdamW,
              one multi-tensor op for the target update, flat indexing, sampling on the device
    compile   the same steps under torch.compile, as --compile runs them (compile time printed apart)
    graphs    the same steps recorded as CUDA graphs, as --cuda-graphs runs them (CUDA only)
    compile-graphs  compiled, then recorded as CUDA graphs, as --compile --cuda-graphs run them (CUDA only)

A path named with "@REF" at the end (e.g. eager@18964d9, graphs+tf32@/tmp/pql_old.py) runs that path on
pql.py as of REF, a git commit or a file holding that version, instead of the pql.py beside this
script: one change measured against the code before it in one run, on a GPU machine too, whose copy
of the working tree has no git history (carry the old file: `git show REF:pql.py > old_pql.py`).
REF's pql.py must have today's learner steps (v_learner_step, RandomDraws; 2026-11-27 and later).

A path named with "+tf32" (e.g. graphs+tf32) runs with TF32 matrix products, as --tf32 does
(CUDA only; the scripts' default there since 2026-11-27): float32 numbers, multiplied on the tensor
cores with 10-bit mantissas. Without it the paths multiply in full float32. One named with
"+bf16" (e.g. compile-graphs+bf16) runs the networks' forward passes under bfloat16 autocast, as
--bf16 does (not for before); its limit is a large bfloat16 matmul's throughput.

Beside each figure: the arithmetic limit, the FLOPs of the updates' matrix products (counted layer
by layer) over the matmul throughput of this machine (a large float32 matmul, measured here), so
the gap between what the updates do and what they could do shows.

    python benchmarks/update_speed.py                       # quick start and default sizes, CPU
    python benchmarks/update_speed.py --device cuda --paths before eager graphs
    python benchmarks/update_speed.py --device cuda --sizes default --paths eager graphs compile-graphs graphs+tf32 compile-graphs+tf32
    python benchmarks/update_speed.py --device cuda --sizes default --paths graphs graphs+bf16 compile-graphs+tf32 compile-graphs+bf16
    python benchmarks/update_speed.py --paths before eager compile
    python benchmarks/update_speed.py --sizes quick-start --paths eager --profile   # where the time goes
    python benchmarks/update_speed.py --sizes quick-start --paths eager@HEAD eager   # the working tree's change against HEAD
"""
import copy
import functools
import importlib.util
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Tuple

import torch
import tyro

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench_envs import machine_name  # noqa: E402

import pql  # noqa: E402

SIZES = {  # name: (hidden dims, batch size), as in the README's quick start and the scripts' defaults
    "quick-start": ((64, 64), 1024),
    "default": ((512, 256, 128), 8192),
}
OBS_DIM, ACT_DIM = 3, 1  # Pendulum
PATHS = ("before", "eager", "compile", "graphs", "compile-graphs")
BEFORE_FAST_PATH = "1cedf45"  # the last commit of pql.py before the fast path (issue 12)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
V_UPDATES, P_UPDATES = 8, 4  # one iteration of pql.py at its default ratios


@dataclass
class Args:
    sizes: Tuple[str, ...] = ("quick-start", "default")
    """network and batch sizes to time: quick-start (64-64, batch 1024) and default (512-256-128, batch 8192)"""
    paths: Tuple[str, ...] = ("before", "eager")
    """code paths to time: before, eager, compile, graphs (CUDA only), compile-graphs (CUDA only); +tf32 after one: with TF32 matmuls (CUDA only); +bf16: under bfloat16 autocast (--bf16); @REF at the end: on pql.py as of REF, a git commit or a file"""
    device: str = "cpu"
    """device of the networks and the buffer"""
    seconds: float = 10.0
    """seconds of timed iterations per path and size (after warm-up), one iteration of each path in turn"""
    seed: int = 0
    """seed of the networks and the random transitions"""
    profile: bool = False
    """after the table, torch.profiler's ops with the most self time in 5 iterations of each path and size (on CUDA by input shapes)"""


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_flops_per_second(device, size=2048, seconds=2.0, dtype=torch.float32):
    """Throughput of a large matmul (float32 by default): the most this machine's arithmetic gives."""
    a, b = torch.randn(size, size, device=device, dtype=dtype), torch.randn(size, size, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    synchronize(device)
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        count += 1
        synchronize(device)
    return 2 * size**3 * count / (time.perf_counter() - start)


def mlp_flops(in_dim, hidden_dims, out_dim, batch):
    """Multiply-adds x 2 of one forward pass of pql.mlp through its matrix products."""
    dims = [in_dim, *hidden_dims, out_dim]
    return sum(2 * batch * d_in * d_out for d_in, d_out in zip(dims[:-1], dims[1:]))


def update_flops(hidden_dims, batch):
    """FLOPs of the matrix products of one V-update and one P-update. A backward pass costs two
    forward passes (gradients of inputs and of weights), one where only input gradients are needed
    (the P-learner's frozen critic copy)."""
    actor = mlp_flops(OBS_DIM, hidden_dims, ACT_DIM, batch)
    q_head = mlp_flops(OBS_DIM + ACT_DIM, hidden_dims, 1, batch)
    v_update = actor + 2 * q_head + 2 * q_head * 3  # target actions, target critic, critic forward + backward
    p_update = actor * 3 + 2 * q_head * 2  # actor forward + backward, critic forward + input gradients
    return v_update, p_update


def load_pql_at(ref, name):
    """pql.py as of `ref`, as a module of its own called `name`: `ref` is a file holding that pql.py
    (its path from here or from the repository's root), or else a git commit (read with `git show`,
    which needs the repository's history)."""
    path = next((p for p in (ref, os.path.join(REPO, ref)) if os.path.isfile(p)), None)
    if path is None:
        git = subprocess.run(["git", "show", f"{ref}:pql.py"], cwd=REPO, capture_output=True, text=True, check=False)
        if git.returncode != 0:
            raise ValueError(f"{ref} is neither a file nor a commit of this repository: {git.stderr.strip()}")
        path = os.path.join(tempfile.mkdtemp(), f"{name}.py")
        with open(path, "w") as f:
            f.write(git.stdout)
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_pql_before():
    """pql.py as of BEFORE_FAST_PATH, as a module of its own.

    Where the repository travels without its history (a copy of the working tree on a GPU machine),
    PQL_BEFORE_SOURCE names a file holding `git show BEFORE_FAST_PATH:pql.py` instead."""
    return load_pql_at(os.environ.get("PQL_BEFORE_SOURCE") or BEFORE_FAST_PATH, "pql_before")


class Learners:
    """One code path's learner state for one size, on the same random transitions."""

    def __init__(self, path, hidden_dims, batch_size, device, seed):
        path, _, ref = path.partition("@")
        path, _, precision = path.partition("+")
        if path == "before" and ref:
            raise ValueError("@ is not for before, which is pql.py at a fixed commit; name another path")
        if precision == "tf32" and device.type != "cuda":
            raise ValueError(f"+{precision} needs --device cuda")
        if precision == "bf16" and path == "before":
            raise ValueError("+bf16 is not for before: the code before had no --bf16")
        self.tf32 = precision == "tf32"
        torch.backends.cuda.matmul.allow_tf32 = self.tf32  # as it will be for this path's calls (and captures)
        if path == "before":
            module = load_pql_before()
        elif ref:
            module = load_pql_at(ref, "pql_at_" + "".join(c if c.isalnum() else "_" for c in ref))
            missing = [name for name in ("v_learner_step", "p_learner_step", "RandomDraws", "make_optimizer", "capture_cuda_graph")
                       if not hasattr(module, name)]
            if missing:
                raise ValueError(f"pql.py at {ref} has no {', '.join(missing)}: @REF needs the learner steps of 2026-11-27 or later")
        else:
            module = pql
        torch.manual_seed(seed)
        args = self.args = module.Args(hidden_dims=hidden_dims, batch_size=batch_size, **({"bf16": True} if precision == "bf16" else {}))
        self.buffer = module.ReplayBuffer(64, 1000, OBS_DIM, ACT_DIM, device)
        for _ in range(1000):
            self.buffer.add(torch.randn(64, OBS_DIM, device=device), torch.rand(64, ACT_DIM, device=device) * 2 - 1,
                            -torch.rand(64, device=device), torch.randn(64, OBS_DIM, device=device),
                            torch.zeros(64, dtype=torch.bool, device=device), torch.rand(64, device=device) < 0.005,
                            torch.ones(64, dtype=torch.bool, device=device))
        self.normalizer = module.ObsNormalizer(OBS_DIM, 5.0, device)
        self.normalizer.update(self.buffer.obs[:, :1000].reshape(-1, OBS_DIM))
        self.actor = module.Actor(OBS_DIM, ACT_DIM, hidden_dims).to(device)
        self.critic = module.make_critic(OBS_DIM, ACT_DIM, args).to(device)
        self.critic_target = copy.deepcopy(self.critic).requires_grad_(False)
        self.target_policy = copy.deepcopy(self.actor).requires_grad_(False)
        self.policy_critic = copy.deepcopy(self.critic).requires_grad_(False)
        self.module = module
        self.v_draws = self.p_draws = None  # the code before drew its random numbers inside its updates
        if path == "before":
            self.actor_optimizer = torch.optim.AdamW(self.actor.parameters(), lr=args.actor_lr)
            self.critic_optimizer = torch.optim.AdamW(self.critic.parameters(), lr=args.critic_lr)
            self.v_step, self.p_step = self.before_v_step, self.before_p_step
            return
        graphs = path in ("graphs", "compile-graphs")
        if graphs and device.type != "cuda":
            raise ValueError("CUDA graphs need --device cuda")
        self.actor_optimizer = module.make_optimizer(self.actor.parameters(), args.actor_lr, capturable=graphs)
        self.critic_optimizer = module.make_optimizer(self.critic.parameters(), args.critic_lr, capturable=graphs)
        stats = self.stats = {name: torch.zeros((), device=device) for name in
                 ["critic_loss", "q_mean", "outside_support", "critic_nonfinite", "actor_loss", "actor_nonfinite"]}
        v_step, p_step = (torch.compile(module.v_learner_step), torch.compile(module.p_learner_step)) if path.startswith("compile") else (
            module.v_learner_step, module.p_learner_step)
        window = self.buffer.window
        self.v_draws = module.RandomDraws(batch_size, 64, ACT_DIM, device)
        self.p_draws = module.RandomDraws(batch_size, 64, 0, device)
        self.v_step = functools.partial(v_step, self.buffer, window, self.v_draws, self.critic, self.critic_target, self.critic_optimizer,
                                        self.target_policy, self.normalizer, stats, args)
        self.p_step = functools.partial(p_step, self.buffer, window, self.p_draws, self.actor, self.actor_optimizer, self.policy_critic,
                                        self.normalizer, stats, args)
        if graphs:  # as pql.py records them
            self.v_step = module.capture_cuda_graph(self.v_step, [*self.critic.parameters(), *self.critic_target.parameters(),
                                                               *stats.values()], self.critic_optimizer, device)
            self.p_step = module.capture_cuda_graph(self.p_step, [*self.actor.parameters(), *stats.values()], self.actor_optimizer, device)

    def before_v_step(self):
        batch = self.buffer.sample(self.args.batch_size, self.args.nstep, self.args.gamma)
        self.module.update_critic(self.critic, self.critic_target, self.critic_optimizer, self.target_policy, self.normalizer, batch, self.args)

    def before_p_step(self):
        obs = self.buffer.sample_obs(self.args.batch_size)
        self.module.update_actor(self.actor, self.actor_optimizer, self.policy_critic, self.normalizer, obs, self.args)

    def iteration(self):
        """The learners' share of one iteration of pql.py: 8 V-updates, 4 P-updates (each with its
        random draws), hand-off."""
        torch.backends.cuda.matmul.allow_tf32 = self.tf32
        for v_update in range(1, V_UPDATES + 1):
            if self.v_draws is not None:
                self.v_draws.draw()
            self.v_step()
            if v_update % self.args.v_updates_per_p_update == 0:
                if self.p_draws is not None:
                    self.p_draws.draw()
                self.p_step()
        self.module.copy_weights(self.actor, self.target_policy)
        self.module.copy_weights(self.critic, self.policy_critic)


def rate(per_second):
    """Three significant digits, without an exponent: 1,234 and 92.1 and 1.87."""
    return f"{per_second:,.0f}" if per_second >= 100 else f"{per_second:.3g}"


def main():
    args = tyro.cli(Args)
    names = [p.partition("@")[0] for p in args.paths]  # without the @REF
    unknown = [p for p in names if p.partition("+")[0] not in PATHS or p.partition("+")[2] not in ("", "tf32", "bf16")]
    unknown += [p for p in args.paths if p.endswith("@")]
    if unknown or not args.paths or any(s not in SIZES for s in args.sizes) or not args.sizes or args.seconds <= 0:
        print(f"error: --paths must be among {', '.join(PATHS)}, each optionally with +tf32 or +bf16 and then @REF (got {list(args.paths)}), --sizes among"
              f" {', '.join(SIZES)} (got {list(args.sizes)}), --seconds > 0", file=sys.stderr)
        return 2
    device = pql.resolve_device(args.device)
    peak = {"": matmul_flops_per_second(device)}
    throughput = f"matmul throughput {peak[''] / 1e9:.1f} GFLOP/s (float32)"
    if any(name.endswith("+tf32") for name in names) and device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        peak["tf32"] = matmul_flops_per_second(device)
        torch.backends.cuda.matmul.allow_tf32 = False
        throughput += f", {peak['tf32'] / 1e9:.1f} GFLOP/s (float32 through TF32; the limit of the +tf32 paths)"
    if any(name.endswith("+bf16") for name in names):
        peak["bf16"] = matmul_flops_per_second(device, dtype=torch.bfloat16)
        throughput += f", {peak['bf16'] / 1e9:.1f} GFLOP/s (bfloat16; the limit of the +bf16 paths)"
    print(f"update_speed.py on {machine_name(device)}, {torch.get_num_threads()} torch threads, torch {torch.__version__}; {throughput}\n")
    baseline = "before" if "before" in args.paths else args.paths[0]  # the speed-ups are over it
    print("| size | path | V-updates/s | P-updates/s | iteration (8 V + 4 P) ms, median | mean | arithmetic limit, iteration ms |"
          f" x limit | speed-up over {baseline} |")
    print("|---|---|---|---|---|---|---|---|---|")
    for size in args.sizes:
        hidden_dims, batch_size = SIZES[size]
        v_flops, p_flops = update_flops(hidden_dims, batch_size)
        limits = {precision: (V_UPDATES * v_flops + P_UPDATES * p_flops) / flops_per_second for precision, flops_per_second in peak.items()}
        paths = {}
        for path in args.paths:
            try:
                start = time.perf_counter()
                learners = Learners(path, hidden_dims, batch_size, device, args.seed)
                for _ in range(2):  # warm-up; for compile, the compilation
                    learners.iteration()
                synchronize(device)
                if path.startswith("compile"):
                    print(f"# {size}, {path}: set-up with compiling and two warm-up iterations took {time.perf_counter() - start:.1f} s")
                paths[path] = learners
            except (RuntimeError, ValueError) as error:  # no git history; graphs on a CPU; a REF too old
                print(f"# {size}: path {path} unavailable here: {str(error).splitlines()[0]}")
        times = {path: [] for path in paths}  # seconds of each timed iteration
        end = time.perf_counter() + args.seconds * len(paths)
        while time.perf_counter() < end or not all(times.values()):
            for path, learners in paths.items():  # one iteration each, in turn: a slow patch of the machine hits every path
                start = time.perf_counter()
                learners.iteration()
                synchronize(device)
                times[path].append(time.perf_counter() - start)
        median = {path: statistics.median(seconds) for path, seconds in times.items()}
        for path in paths:
            iteration_s = median[path]
            speed_up = f"{median[baseline] / iteration_s:.2f}x" if baseline in paths else "-"
            limit = limits[path.partition("@")[0].partition("+")[2]]
            print(f"| {size} | {path} | {rate(V_UPDATES / iteration_s)} | {rate(P_UPDATES / iteration_s)} | {1000 * iteration_s:.1f} |"
                  f" {1000 * statistics.mean(times[path]):.1f} | {1000 * limit:.2f} | {iteration_s / limit:.0f} | {speed_up} |")
        if args.profile:
            for path, learners in paths.items():
                # On CUDA one row per op and input shapes, so that each matrix product's kernel time shows
                # apart (on the CPU recording the shapes slows the very ops it times, so not there).
                with torch.profiler.profile(record_shapes=device.type == "cuda") as profiler:
                    for _ in range(5):
                        learners.iteration()
                    synchronize(device)
                print(f"\n# {size}, {path}: the ops with the most self time over 5 iterations\n")
                print(profiler.key_averages(group_by_input_shape=device.type == "cuda").table(
                    sort_by="self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total", row_limit=16, max_shapes_column_width=60))
    return 0


if __name__ == "__main__":
    sys.exit(main())
