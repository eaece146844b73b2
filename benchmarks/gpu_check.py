"""One command for the first person with a GPU: does PQL run, how fast, and does it still learn sane numbers?

    python benchmarks/gpu_check.py                        # on the GPU: 6 runs of 300 iterations at 4096 envs, about 3 minutes
    python benchmarks/gpu_check.py --device cpu --tiny    # the same checks at toy sizes, well under a minute on 2 cores
    python benchmarks/gpu_check.py --critics scalar --flags="--compile"   # a speed-up, end to end
    python benchmarks/gpu_check.py --flags="--bf16"       # the networks in bfloat16 (FastTD3's way), end to end

It prints a header (GPU, torch and CUDA versions, date, command line), then Markdown tables, and
exits 1 if any check failed (listing which), 0 if all passed, 2 on a bad flag (before any work).

1. Training runs. pql.py and pql_threaded.py, each with the scalar critic and with
   --distributional (--critics), at the scripts' defaults (task Pendulum, 4096 envs, networks
   512-256-128, batch 8192, CUDA graphs on a GPU, ...) with --flags added, for 32 warm-up
   iterations plus --iterations, one subprocess each, run one at
   a time in --logdir/<run>/ (emptied first; the script's output is kept there in train.log). From
   each run's TensorBoard scalars (runs/*/events.*):
     * env steps/s and V-updates/s between the LAST TWO logged points (charts/SPS and
       charts/v_updates_per_s are averages since the start; with t = step / SPS and
       v = v_updates_per_s * t, the rates are (step_b - step_a) / (t_b - t_a) and
       (v_b - v_a) / (t_b - t_a)), so start-up and warm-up are left out. The log interval is
       --iterations / 8, so the window is 1/8 of the learning iterations, all after warm-up;
     * the achieved ratios: for pql_threaded.py the mean over its logged points of
       charts/v_updates_per_env_step and charts/v_updates_per_p_update, leaving out the first
       (the actor runs ahead of the learners by design, so the first interval with learning logs
       too few V-updates per env step, 0 in --tiny runs); pql.py does not log them
       (they hold exactly, by construction), so its V-updates per env step is computed from the
       two points above, (v_b - v_a) / ((step_b - step_a) / num_envs), and its V-updates per
       P-update is the configured 2;
     * whether every logged losses/critic_loss, losses/actor_loss and losses/q_mean is finite
       (each must have been logged at least once);
     * whether the final checkpoint runs/*/model.pt reloads and evaluates:
       `python <script> --eval-checkpoint <model.pt> --eval-episodes 4 --device <device>` must
       exit 0 and print a finite "mean return X".
   A run also fails on a non-zero exit code or on running past --timeout.
2. CPU against device env agreement. Each built-in task of envs.py, 64 envs, seed 4, on the CPU
   and on --device, stepped with the same random actions for --env-steps steps. Checked as
   tests/test_envs.py::test_cpu_and_cuda_agree does (torch.allclose, atol 1e-4) on the reset and
   the first 20 steps of every episode (all envs start their episodes together). Later steps are
   only reported: float32 rounding differences grow over an episode (on the CPU alone, a 1-ulp
   change of Pendulum's start states becomes ~1e-3 in the observations within 200 steps), so a
   free-running CPU-vs-GPU comparison may exceed 1e-4 late in an episode without any bug.
   With --device cpu the CPU is compared with itself (differences 0; the code path still runs).
3. CUDA graphs against eager updates, on a GPU: pql.py and pql_threaded.py with --no-cuda-graphs
   (scalar critic), the same checks as 1, so the table shows what the graphs gain; and pql.py's
   learner steps at the default sizes, 16 V-updates and 8 P-updates
   replayed from CUDA graphs against the same updates run eagerly from the same weights and seed
   (benchmarks/update_speed.py builds both, with TF32 or --flags' --no-tf32 or --bf16): the summed
   losses must agree to 1e-3 (relative) and every weight to 1e-4. With --device cpu it says they were skipped.
4. Multi-GPU placement, when there are at least 2 CUDA devices: pql_threaded.py (scalar critic)
   with --actor-device cuda:0 --v-learner-device cuda:1 (P-learner on --device), and with
   --v-learner-device cuda:1 alone; the same checks as 1. Otherwise it says it was skipped and why.

--tiny (used by tests/test_gpu_check.py) shrinks the runs to 16 envs, networks 32-32, batch 64,
buffer 16000, 4 warm-up and 16 learning iterations, one torch thread per run (OMP_NUM_THREADS=1):
it checks that everything runs end to end; its rates mean nothing.
"""
import concurrent.futures
import datetime
import glob
import math
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Optional, Tuple

import tyro

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
DEFAULT_LOGDIR = os.path.join(HERE, "logs", "gpu_check")

SCRIPTS = ["pql.py", "pql_threaded.py"]
CRITICS = ["scalar", "distributional"]
WARMUP_ITERATIONS = 32  # the scripts' default --warmup-iterations, passed explicitly to size --total-timesteps
V_UPDATES_PER_P_UPDATE = 2  # the scripts' default --v-updates-per-p-update (pql.py does not log the achieved one)
LOSS_TAGS = ["losses/critic_loss", "losses/actor_loss", "losses/q_mean"]
EVAL_EPISODES = 4
# --tiny: the sizes of tests/test_pql.py's tiny runs.
TINY_FLAGS = ["--hidden-dims", "32", "32", "--batch-size", "64", "--buffer-size", "16000"]
TINY = dict(num_envs=16, iterations=16, warmup_iterations=4)
# The env agreement check: tests/test_envs.py::test_cpu_and_cuda_agree's sizes and tolerance.
ENV_CHECK_NUM_ENVS, ENV_CHECK_SEED, ENV_CHECK_ATOL = 64, 4, 1e-4
ENV_CHECKED_STEPS = 20  # steps checked after each episode start (the test's horizon)


@dataclass
class Args:
    """Checks PQL on a GPU (or the CPU): training runs, their speed and sanity, env agreement, multi-GPU placement."""

    device: str = "cuda"
    """device of the runs and of the env agreement check: `cuda`, `cuda:N` or `cpu`"""
    iterations: Optional[int] = None
    """learning iterations per run, after the warm-up ones (default 300; 16 with --tiny)"""
    num_envs: Optional[int] = None
    """environments per run (default 4096, the scripts' default; 16 with --tiny)"""
    seed: int = 1
    """seed of every run"""
    env_steps: int = 300
    """steps of the CPU-vs-device env agreement check"""
    logdir: str = DEFAULT_LOGDIR
    """where each run gets its folder (emptied first): TensorBoard logs, checkpoint, train.log, eval.log"""
    timeout: float = 1800.0
    """seconds a training or evaluation subprocess may run before it is stopped and counted as failed"""
    critics: Tuple[str, ...] = tuple(CRITICS)
    """critics of the runs of check 1 (scalar, distributional); the --no-cuda-graphs and multi-GPU runs are scalar"""
    flags: str = ""
    """more flags for every training run, e.g. "--compile": a speed-up checked end to end"""
    tiny: bool = False
    """toy sizes (16 envs, networks 32-32, batch 64, buffer 16000, 4 warm-up iterations): a smoke test of the check itself"""


def fail_on_bad_flags(args):
    """Exit 2 with a message naming the flag, before any work starts."""
    def bad(message):
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)

    if args.iterations is not None and args.iterations < 1:
        bad(f"--iterations must be >= 1, got {args.iterations}")
    if args.num_envs is not None and args.num_envs < 1:
        bad(f"--num-envs must be >= 1, got {args.num_envs}")
    if not args.critics or any(critic not in CRITICS for critic in args.critics):
        bad(f"--critics must be among {', '.join(CRITICS)}, got {' '.join(args.critics) or 'none'}")
    if args.env_steps < 1:
        bad(f"--env-steps must be >= 1, got {args.env_steps}")
    if not args.timeout > 0:
        bad(f"--timeout must be > 0 seconds, got {args.timeout}")
    import torch  # only now: the checks above are instant even where torch takes seconds to import
    try:
        device = torch.device(args.device)
    except RuntimeError:
        bad(f"--device {args.device!r} is not a device; use cuda, cuda:N or cpu")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            bad(f"--device {args.device}: CUDA is not available on this machine (use --device cpu)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            bad(f"--device {args.device}: only {torch.cuda.device_count()} CUDA device(s) here")
    elif device.type != "cpu":
        bad(f"--device {args.device!r}: use cuda, cuda:N or cpu")


# ---------------------------------------------------------------------------------------------
# Header
# ---------------------------------------------------------------------------------------------
def header(device):
    import torch
    cpu = platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    if torch.device(device).type == "cuda":
        gpu = f"{torch.cuda.get_device_name(device)} ({torch.cuda.device_count()} CUDA device(s) visible)"
    else:
        gpu = f"none used (--device {device}; {torch.cuda.device_count()} CUDA device(s) visible)"
    command = " ".join(shlex.quote(arg) for arg in ["python", os.path.relpath(sys.argv[0], REPO), *sys.argv[1:]])
    return "\n".join([
        "# PQL GPU check",
        "",
        f"- GPU: {gpu}",
        f"- CPU: {cpu}, {os.cpu_count()} cores",
        f"- torch {torch.__version__}, CUDA {torch.version.cuda or 'none (CPU build)'}, Python {platform.python_version()}",
        f"- date: {datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}",
        f"- command (in {REPO}): `{command}`",
    ])


# ---------------------------------------------------------------------------------------------
# CPU-vs-device env agreement
# ---------------------------------------------------------------------------------------------
def compare_envs(task, device, steps):
    """Max abs obs and reward differences, CPU vs device, over the checked steps and over all
    steps, and whether the checked steps agree within the test's tolerance."""
    import torch

    sys.path.insert(0, REPO)
    import envs

    row = dict(task=task, device=device, steps=steps, checked_obs=0.0, checked_reward=0.0, all_obs=0.0, all_reward=0.0,
               ok=True, error=None)
    try:
        cpu = envs.make_env(task, ENV_CHECK_NUM_ENVS, "cpu", seed=ENV_CHECK_SEED)
        other = envs.make_env(task, ENV_CHECK_NUM_ENVS, device, seed=ENV_CHECK_SEED)

        def record(checked, obs_cpu, obs_other, reward_cpu=None, reward_other=None):
            pairs = [("obs", obs_cpu, obs_other.cpu())]
            if reward_cpu is not None:
                pairs.append(("reward", reward_cpu, reward_other.cpu()))
            for name, a, b in pairs:
                diff = (a - b).abs().max().item()
                row[f"all_{name}"] = max(row[f"all_{name}"], diff)
                if checked:
                    row[f"checked_{name}"] = max(row[f"checked_{name}"], diff)
                    row["ok"] &= torch.allclose(a, b, atol=ENV_CHECK_ATOL)  # as in tests/test_envs.py

        record(True, cpu.reset(), other.reset())
        generator = torch.Generator().manual_seed(0)
        for _ in range(steps):
            checked = cpu.t < ENV_CHECKED_STEPS  # the step within the current episode
            actions = torch.rand(ENV_CHECK_NUM_ENVS, cpu.act_dim, generator=generator) * 2 - 1
            obs_cpu, reward_cpu, *_ = cpu.step(actions)
            obs_other, reward_other, *_ = other.step(actions.to(device))
            record(checked, obs_cpu, obs_other, reward_cpu, reward_other)
    except Exception as error:  # a CUDA error, say: report it as this task's failure, go on with the others
        row.update(ok=False, error=f"{type(error).__name__}: {error}")
    return row


def env_failures(row):
    if row["error"] is not None:
        return [f"env agreement {row['task']}: {row['error']}"]
    if not row["ok"]:
        return [f"env agreement {row['task']}: CPU and {row['device']} differ by more than {ENV_CHECK_ATOL:g} within"
                f" the first {ENV_CHECKED_STEPS} steps of an episode (max abs obs {row['checked_obs']:.2e},"
                f" reward {row['checked_reward']:.2e})"]
    return []


def print_env_table(rows):
    print(f"## CPU vs device: built-in envs, {ENV_CHECK_NUM_ENVS} envs, seed {ENV_CHECK_SEED}, same random actions\n")
    print(f"Checked: the reset and the first {ENV_CHECKED_STEPS} steps of every episode, torch.allclose(atol={ENV_CHECK_ATOL:g});"
          " all steps: reported only (float32 rounding grows over an episode).\n")
    print("| task | compared | steps | max abs obs diff, checked | max abs reward diff, checked |"
          " max abs obs diff, all steps | max abs reward diff, all steps | agree |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        verdict = "yes" if not env_failures(r) else ("error" if r["error"] else "NO")
        print(f"| {r['task']} | cpu vs {r['device']} | {r['steps']} | {r['checked_obs']:.2e} | {r['checked_reward']:.2e} |"
              f" {r['all_obs']:.2e} | {r['all_reward']:.2e} | {verdict} |")


# ---------------------------------------------------------------------------------------------
# Training runs
# ---------------------------------------------------------------------------------------------
@dataclass
class Run:
    """One training run to make: its script, critic and role placement (pql_threaded.py flags)."""

    script: str
    critic: str = "scalar"
    placement: tuple = ()
    flags: tuple = ()  # other flags, e.g. ("--cuda-graphs",)

    @property
    def name(self):
        flags = "".join(f"-{flag.strip('-').split('-')[0]}-{device.replace(':', '')}"
                        for flag, device in zip(self.placement[::2], self.placement[1::2]))
        return f"{self.script.replace('.py', '')}-{self.critic}{flags}" + "".join(f"-{flag.strip('-')}" for flag in self.flags)


def run_commands(run, device, num_envs, iterations, warmup_iterations, seed, tiny):
    """The training and evaluation commands of one run (eval's model.pt is filled in later)."""
    log_interval = max(1, iterations // 8)  # <= iterations / 2: the last two points come after warm-up
    train = [sys.executable, os.path.join(REPO, run.script), "--device", device, "--seed", str(seed),
             "--num-envs", str(num_envs), "--warmup-iterations", str(warmup_iterations),
             "--total-timesteps", str((warmup_iterations + iterations) * num_envs),
             "--log-interval", str(log_interval), "--exp-name", "gpu_check"]
    if tiny:
        train += TINY_FLAGS
    if run.critic == "distributional":
        train.append("--distributional")
    train += list(run.placement) + list(run.flags)
    evaluate = [sys.executable, os.path.join(REPO, run.script), "--eval-checkpoint", None,
                "--eval-episodes", str(EVAL_EPISODES), "--device", device]
    return train, evaluate


def execute(command, cwd, log_path, timeout, tiny):
    """Run a command with its output in log_path: (exit code or None on time-out, output, seconds)."""
    start = time.time()
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if tiny:  # toy networks gain nothing from several threads, and on a busy machine their spinning costs 5x
        env["OMP_NUM_THREADS"] = "1"
    try:
        result = subprocess.run(command, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                timeout=timeout, env=env)
        code, output = result.returncode, result.stdout
    except subprocess.TimeoutExpired as expired:
        output = expired.stdout or b""  # bytes here, even with text=True
        code, output = None, output if isinstance(output, str) else output.decode(errors="replace")
    with open(log_path, "w") as f:
        f.write(" ".join(shlex.quote(str(part)) for part in command) + "\n\n" + output)
    return code, output, time.time() - start


def read_scalars(run_dir):
    """Every scalar tag of a run: {tag: [(step, value), ...]} (as tests/test_pql.py reads them)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(run_dir, size_guidance={"scalars": 0})  # 0: keep every point
    events.Reload()
    return {tag: [(s.step, s.value) for s in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def mean_after_first(points):
    """Mean of the logged values but the first, which covers the actor's head start: it runs
    ahead of the V-learner by design (pql_threaded.py's ACTOR_LEAD_ITERATIONS), so the first
    interval with learning logs too few V-updates per env step (0 when the interval is short)."""
    points = points[1:] if len(points) > 1 else points
    return sum(value for _, value in points) / len(points) if points else None


def summarize(run, scalars, num_envs, exit_code, eval_return, eval_problem, seconds=float("nan")):
    """One row of the runs' table from a run's scalars and outcome; row["failures"] lists what failed.

    exit_code: the training's, None if it timed out. eval_return: the parsed mean return, None if
    the evaluation failed, with eval_problem saying why."""
    critic = " ".join([run.critic, *run.flags])
    row = dict(script=run.script, critic=critic, placement=run.placement, exit_code=exit_code, seconds=seconds,
               env_steps_per_s=None, v_updates_per_s=None, v_per_env_step=None, v_per_p_update=None,
               losses_finite=None, eval_return=eval_return, failures=[])
    failures = row["failures"]
    if exit_code is None:
        failures.append("timed out (see --timeout)")
    elif exit_code != 0:
        failures.append(f"exit code {exit_code}")

    sps = scalars.get("charts/SPS", [])
    vps = dict(scalars.get("charts/v_updates_per_s", []))
    if len(sps) >= 2 and all(step in vps for step, _ in sps[-2:]):
        (step_a, sps_a), (step_b, sps_b) = sps[-2:]
        t_a, t_b = step_a / sps_a, step_b / sps_b
        v_a, v_b = vps[step_a] * t_a, vps[step_b] * t_b
        if t_b > t_a:
            row["env_steps_per_s"] = (step_b - step_a) / (t_b - t_a)
            row["v_updates_per_s"] = (v_b - v_a) / (t_b - t_a)
            row["v_per_env_step"] = (v_b - v_a) / ((step_b - step_a) / num_envs)
    else:
        failures.append(f"logged {len(sps)} points of charts/SPS and charts/v_updates_per_s, the rates need 2")
    if run.script == "pql_threaded.py":  # the achieved ratios, as logged
        row["v_per_env_step"] = mean_after_first(scalars.get("charts/v_updates_per_env_step", []))
        row["v_per_p_update"] = mean_after_first(scalars.get("charts/v_updates_per_p_update", []))
    else:
        row["v_per_p_update"] = f"{V_UPDATES_PER_P_UPDATE} (configured)"

    row["losses_finite"] = True
    for tag in LOSS_TAGS:
        points = scalars.get(tag, [])
        bad = [step for step, value in points if not math.isfinite(value)]
        if not points:
            failures.append(f"{tag} was never logged")
            row["losses_finite"] = False
        elif bad:
            failures.append(f"{tag} is not finite at env step {bad[0]:,}")
            row["losses_finite"] = False

    if eval_return is None:
        failures.append(f"evaluation of the checkpoint: {eval_problem}")
    elif not math.isfinite(eval_return):
        failures.append(f"evaluation of the checkpoint: mean return {eval_return}")
    return row


def check_run(run, device, num_envs, iterations, warmup_iterations, seed, tiny, logdir, timeout):
    """Train, read the logs, evaluate the checkpoint: the run's row of the table."""
    folder = os.path.join(logdir, run.name)
    shutil.rmtree(folder, ignore_errors=True)
    os.makedirs(folder)
    train, evaluate = run_commands(run, device, num_envs, iterations, warmup_iterations, seed, tiny)
    exit_code, _, seconds = execute(train, folder, os.path.join(folder, "train.log"), timeout, tiny)

    run_dirs = sorted(glob.glob(os.path.join(folder, "runs", "*")))
    scalars = read_scalars(run_dirs[-1]) if run_dirs else {}
    checkpoints = [path for path in (os.path.join(d, "model.pt") for d in run_dirs) if os.path.isfile(path)]
    eval_return, eval_problem = None, None
    if not checkpoints:
        eval_problem = f"no checkpoint {os.path.join(folder, 'runs', '*', 'model.pt')}"
    else:
        evaluate[evaluate.index(None)] = checkpoints[-1]
        code, output, _ = execute(evaluate, folder, os.path.join(folder, "eval.log"), timeout, tiny)
        found = re.search(r"mean return (\S+)", output)
        if code != 0:
            eval_problem = "timed out" if code is None else f"exit code {code} (see {os.path.join(folder, 'eval.log')})"
        elif not found:
            eval_problem = f"no 'mean return X' in its output (see {os.path.join(folder, 'eval.log')})"
        else:
            eval_return = float(found.group(1))
    row = summarize(run, scalars, num_envs, exit_code, eval_return, eval_problem, seconds)
    row["log"] = os.path.join(folder, "train.log")
    return row


def fmt(value, pattern):
    if value is None:
        return "-"
    return value if isinstance(value, str) else format(value, pattern)


def placement_text(row, device):
    if not row["placement"]:
        return f"all on {device}"
    flags = dict(zip(row["placement"][::2], row["placement"][1::2]))
    return ", ".join(f"{role} {flags.get(flag, device)}" for role, flag in
                     [("actor", "--actor-device"), ("V-learner", "--v-learner-device"), ("P-learner", "--p-learner-device")])


def print_runs_table(rows, device, num_envs, iterations):
    print(f"## Training runs: {num_envs:,} envs, {iterations} learning iterations each\n")
    print("Rates between the last two logged points. Ratios: pql_threaded.py's logged values (mean over the points after"
          " the first); pql.py's V-updates per env step from the rates, its V-updates per P-update as configured.\n")
    print("| script | critic | placement | exit code | seconds | env steps/s | V-updates/s | V-updates per env step |"
          " V-updates per P-update | losses finite | eval mean return | ok |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        exit_code = "timeout" if r["exit_code"] is None else r["exit_code"]
        finite = {True: "yes", False: "NO", None: "-"}[r["losses_finite"]]
        print(f"| {r['script']} | {r['critic']} | {placement_text(r, device)} | {exit_code} | {fmt(r['seconds'], '.1f')} |"
              f" {fmt(r['env_steps_per_s'], ',.0f')} | {fmt(r['v_updates_per_s'], ',.1f')} | {fmt(r['v_per_env_step'], '.2f')} |"
              f" {fmt(r['v_per_p_update'], '.2f')} | {finite} | {fmt(r['eval_return'], '.2f')} | {'NO' if r['failures'] else 'yes'} |")


def all_failures(run_rows, env_rows):
    """Every failed check, one line each; the exit code is 1 when there is any."""
    failures = [f"{' '.join([r['script'], r['critic'], *r['placement']])}: {problem}"
                for r in run_rows for problem in r["failures"]]
    return failures + [problem for r in env_rows for problem in env_failures(r)]


def eager_runs(device, flags=()):
    """Both scripts with --no-cuda-graphs (scalar critic), or None and why they are skipped: on a
    GPU the other runs replay CUDA graphs (the scripts' default there), these run eagerly."""
    import torch
    if torch.device(device).type != "cuda":
        return None, f"--device {device} (CUDA graphs need CUDA)"
    return [Run(script, flags=("--no-cuda-graphs", *flags)) for script in SCRIPTS], None


def graphs_against_eager(device, flags=(), hidden_dims=(512, 256, 128), batch_size=8192, updates=16):
    """pql.py's learner steps replayed from CUDA graphs against the same steps run eagerly: two
    learners built alike (benchmarks/update_speed.py), the same seed before each path's updates,
    both with the matrix products of the training runs: TF32 (the scripts' default on CUDA) unless
    `flags` (the training runs' flags) hold --no-tf32, bfloat16 autocast if they hold --bf16.
    Returns (largest relative difference of the summed losses, largest difference of any weight).
    Both paths draw each step's random numbers eagerly before it (RandomDraws) from the same
    generator state, so the batches and the target noise should be the same; if they were not, the
    losses would differ by far more than float rounding."""
    import torch
    sys.path.insert(0, HERE)
    from update_speed import Learners
    torch_device = torch.device(device)
    precision = "+bf16" if "--bf16" in flags else "" if "--no-tf32" in flags else "+tf32"
    paths = {}
    for path in ["eager", "graphs"]:
        learners = Learners(path + precision, hidden_dims, batch_size, torch_device, seed=0)
        torch.manual_seed(1234)
        for _ in range(updates // 8):
            learners.iteration()
        torch.cuda.synchronize(torch_device)
        paths[path] = learners
    eager, graphs = paths["eager"], paths["graphs"]
    loss_difference = max(abs(float(eager.stats[name]) - float(graphs.stats[name])) / max(abs(float(eager.stats[name])), 1e-6)
                          for name in ["critic_loss", "actor_loss"])
    weight_difference = max(float((a - b).abs().max().detach()) for module in ["critic", "critic_target", "actor"]
                            for a, b in zip(getattr(eager, module).parameters(), getattr(graphs, module).parameters()))
    return loss_difference, weight_difference


def multi_gpu_runs(device, flags=()):
    """The placement runs, or None and why they are skipped."""
    import torch
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if torch.device(device).type != "cuda":
        return None, f"--device {device} (they need CUDA)"
    if count < 2:
        return None, f"only {count} CUDA device(s) here, they need 2"
    return [Run("pql_threaded.py", placement=("--actor-device", "cuda:0", "--v-learner-device", "cuda:1"), flags=flags),
            Run("pql_threaded.py", placement=("--v-learner-device", "cuda:1"), flags=flags)], None


def main():
    args = tyro.cli(Args, description=__doc__)
    fail_on_bad_flags(args)
    num_envs = args.num_envs or (TINY["num_envs"] if args.tiny else 4096)
    iterations = args.iterations or (TINY["iterations"] if args.tiny else 300)
    warmup_iterations = TINY["warmup_iterations"] if args.tiny else WARMUP_ITERATIONS
    logdir = os.path.abspath(args.logdir)
    os.makedirs(logdir, exist_ok=True)
    print(header(args.device) + "\n", flush=True)
    start = time.time()

    sys.path.insert(0, REPO)
    import envs
    env_rows = [compare_envs(task, args.device, args.env_steps) for task in envs.list_tasks()]
    print(f"# env agreement done ({time.time() - start:.0f} s)", flush=True)

    flags = tuple(shlex.split(args.flags))
    runs = [Run(script, critic, flags=flags) for script in SCRIPTS for critic in args.critics]
    placement_runs, skipped_because = multi_gpu_runs(args.device, flags)
    eager_check_runs, eager_skipped_because = eager_runs(args.device, flags)

    def check(run):
        row = check_run(run, args.device, num_envs, iterations, warmup_iterations, args.seed, args.tiny, logdir, args.timeout)
        print(f"# {run.name}: {'ok' if not row['failures'] else 'FAILED'}, trained in {row['seconds']:.0f} s ({row['log']})", flush=True)
        return row

    # One run at a time, so each has the machine to itself while it is timed. --tiny's runs only
    # check that everything works, and most of their cost is start-up (imports): two at a time.
    with concurrent.futures.ThreadPoolExecutor(max_workers=2 if args.tiny else 1) as pool:
        run_rows = list(pool.map(check, runs + (eager_check_runs or []) + (placement_runs or [])))
    graph_failures = []
    if eager_check_runs is not None:
        try:
            loss_difference, weight_difference = graphs_against_eager(args.device, flags)
        except Exception as error:  # a failed capture is a failed check, not a lost report
            loss_difference = weight_difference = float("nan")
            graph_failures.append(f"CUDA graphs against eager updates: {type(error).__name__}: {str(error).splitlines()[0]}")
        graph_ok = loss_difference < 1e-3 and weight_difference < 1e-4
        if not graph_ok and not graph_failures:
            graph_failures.append(f"CUDA graphs against eager updates: losses differ by {loss_difference:.2e} (relative),"
                                  f" weights by {weight_difference:.2e} (need < 1e-3 and < 1e-4)")

    print()
    print_runs_table(run_rows, args.device, num_envs, iterations)
    print()
    placements = "pql_threaded.py with --actor-device cuda:0 --v-learner-device cuda:1, and with --v-learner-device cuda:1 alone"
    if placement_runs is None:
        print(f"Multi-GPU placement runs ({placements}): skipped, {skipped_because}.\n")
    else:
        print(f"Multi-GPU placement runs ({placements}): the rows with those devices above.\n")
    if eager_check_runs is None:
        print(f"CUDA graphs (--no-cuda-graphs runs, and 16 V-updates replayed against eager ones): skipped, {eager_skipped_because}.\n")
    else:
        print(f"CUDA graphs: the rows without --no-cuda-graphs replay them; 16 V-updates and 8 P-updates at the default sizes replayed from graphs"
              f" against the same updates run eagerly, same seed: summed losses differ by {loss_difference:.2e} (relative),"
              f" weights by at most {weight_difference:.2e}: {'ok' if graph_ok else 'FAILED'}.\n")
    print_env_table(env_rows)
    print(f"\nWhole check: {time.time() - start:.0f} s; logs in {logdir}\n")

    failures = all_failures(run_rows, env_rows) + graph_failures
    if failures:
        print(f"FAILED: {len(failures)} check(s):")
        for failure in failures:
            print(f"- {failure}")
        for r in run_rows:
            if r["failures"]:
                print(f"\nLast lines of {r['log']}:")
                with open(r["log"]) as f:
                    print("\n".join([line for line in f.read().splitlines() if line.strip()][-10:]))
        return 1
    print("All checks passed.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
