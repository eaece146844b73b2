"""Batched environments for pql: three small built-in tasks in plain torch, plus
adapters for Gymnasium (`gym:<id>`), Isaac Gym (`isaacgym:<Task>`) and mjlab (`mjlab:<TaskId>`).

Every environment, whatever its source, speaks the same interface:

    env = make_env(task, num_envs, device="cpu", seed=0)
    obs = env.reset()                 # float32 (num_envs, obs_dim) on env.device
    next_obs, reward, terminated, truncated, info = env.step(actions)

- `actions` is a float tensor (num_envs, act_dim) in [-1, 1]; values outside are
  clipped and each env scales them to its own bounds.
- `reward` is float32 (num_envs,); `terminated` and `truncated` are bool (num_envs,).
- Finished envs reset inside `step`, so `next_obs` is always the obs to act on next.
- `info["final_obs"]` is the true last obs of an episode that ended this step and equals
  `next_obs` elsewhere: a trainer can always store it as the transition's next state.
- `info["episode_return"]`, `info["episode_length"]` (float32) hold the undiscounted return
  and length of an episode that ended this step, and 0 elsewhere.
- `info["valid"]` (bool) is False where this step's transition is not a real one and must
  not be learned from. Only the Isaac Gym adapter ever sets it False (see IsaacGymEnv).

Checking that actions are finite costs one host-device sync per step: it is on by default
and a GPU trainer can turn it off with `env.check_finite_actions = False`.

This file must run under Isaac Gym's Python 3.8 and torch <= 2.4, so it uses only
Python 3.8 syntax and torch 2.0 APIs. Run `python envs.py` for a table of tasks.
"""

from __future__ import annotations

import contextlib
import importlib.util
import math
import os
import random
import sys
from typing import Dict, List, Tuple

import torch

GYM_INSTALL = 'pip install "gymnasium[mujoco]"'
ISAACGYM_INSTALL = (
    "Isaac Gym tasks need Isaac Gym Preview 4 and IsaacGymEnvs, in a Python 3.8 environment:\n"
    "  1. download Isaac Gym Preview 4 from https://developer.nvidia.com/isaac-gym and unpack it\n"
    "  2. pip install -e isaacgym/python\n"
    "  3. git clone https://github.com/isaac-sim/IsaacGymEnvs && pip install -e IsaacGymEnvs\n"
    '  4. pip install "numpy<1.24"   (isaacgym uses np.float, removed in numpy 1.24)'
)

MJLAB_INSTALL = (
    "pip install -r requirements-mjlab.txt (mjlab 1.6.0, Python 3.10 to 3.13; install torch first: "
    "requirements.txt, or the build for your CUDA version from https://pytorch.org)"
)

StepResult = Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, Dict[str, torch.Tensor]]


# ---------------------------------------------------------------------------------------
# Helpers shared by all environments
# ---------------------------------------------------------------------------------------


def check_actions(env, actions: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Validate a batch of actions and return it clipped to [-1, 1] on env.device.

    Shape and dtype checks read only metadata, so they are free. The finite check needs
    the answer on the host, which on a GPU is a sync: hence the switch."""
    expected = (env.num_envs, env.act_dim)
    if not isinstance(actions, torch.Tensor):
        raise ValueError(f"actions must be a torch.Tensor of shape {expected}, got {type(actions).__name__}")
    if tuple(actions.shape) != expected:
        raise ValueError(f"actions must have shape (num_envs, act_dim) = {expected}, got {tuple(actions.shape)}")
    if not actions.is_floating_point():
        raise ValueError(f"actions must be a floating-point tensor, got dtype {actions.dtype}")
    if env.check_finite_actions and not bool(torch.isfinite(actions).all()):
        raise ValueError(
            "actions contain NaN or inf (this check costs one host sync per step; "
            "set env.check_finite_actions = False to skip it)"
        )
    return actions.to(device=env.device, dtype=dtype).clamp(-1.0, 1.0)


def end_episodes(ret: torch.Tensor, length: torch.Tensor, done: torch.Tensor):
    """Report the return and length of episodes that ended (0 elsewhere) and restart
    their running sums. All on device: no sync."""
    out_ret = torch.where(done, ret, torch.zeros_like(ret))
    out_len = torch.where(done, length, torch.zeros_like(length))
    ret.masked_fill_(done, 0.0)
    length.masked_fill_(done, 0.0)
    return out_ret, out_len


# Counter-based random numbers. torch.rand draws different numbers on CPU and CUDA for the
# same seed, and a torch.Generator per env would need a Python loop. Instead draw d of
# episode e of env i is a hash of the counter c = e * num_draws + d, offset by a key that
# hashes (seed, i): the same integers give the same bits on any device, nothing has to be
# carried or synced, and any env can redraw its start state at any step.
MASK32 = 0xFFFFFFFF
GOLDEN = 0x61C88647  # 2**32 (1 - 1/phi): a Weyl-sequence step that spreads counters apart


def hash32(x: torch.Tensor) -> torch.Tensor:
    """Mix an int64 tensor of 32-bit values into well-scrambled 32-bit values.

    The xor-shift-multiply rounds follow Wellons' 'lowbias32'; both multipliers are below
    2**31, so every product stays below 2**63 and never overflows int64 on any device."""
    x = x ^ (x >> 16)  # a new tensor; the rest works in place on it
    x.mul_(0x7FEB352D).bitwise_and_(MASK32)
    x.bitwise_xor_(x >> 15)
    x.mul_(0x31848BAB).bitwise_and_(MASK32)
    return x.bitwise_xor_(x >> 16)


def env_keys(seed: int, num_envs: int, device: torch.device) -> torch.Tensor:
    """One 32-bit key per env, fixed for the life of the env: hash(hash(seed) ^ env index)."""
    s = hash32(torch.tensor([(seed ^ (seed >> 32)) & MASK32], dtype=torch.int64))
    return hash32(torch.arange(num_envs, dtype=torch.int64) ^ s).to(device)


# ---------------------------------------------------------------------------------------
# Built-in tasks
# ---------------------------------------------------------------------------------------


class BuiltinEnv:
    """Bookkeeping shared by the built-in tasks: action checks, episode counting,
    auto-reset and info. A task subclass only supplies its physics:

        initial_state(u)     u: uniform (0, 1) draws (num_draws, num_envs) -> state
        observe(state)       -> obs (obs_dim, num_envs)
        dynamics(state, a)   a: actions in [-1, 1], (act_dim, num_envs)
                             -> (next state, its obs, reward)

    dynamics() returns the obs too, so that obs and reward can share work (the cos of
    the pole angle, the arm's tip position).

    The state is one tensor with a row per state variable, (state_dim, num_envs), and
    the tasks work row by row. Rows are contiguous, so elementwise math runs on the fast
    path and rebuilding a state or an obs is torch.stack along dim 0, a plain copy of
    rows (stacking columns into (num_envs, dim) costs ~10x more on a CPU). Obs are
    transposed to (num_envs, obs_dim) once, at the end of step().

    None of the built-in tasks terminates, and all envs start together at reset(), so
    every env reaches max_episode_length on the same step, a step the host can count
    itself. So step() needs no per-env done masks and no sync: on that step all envs
    end and reset; on the others the reset work is skipped. (A task with early
    terminations would need per-env masks: see how the Gymnasium adapter tracks
    episodes.) `dtype` sets the precision of the physics and of obs and reward: float32
    by default; the tests use float64 to compare with Gymnasium digit for digit."""

    task = ""
    obs_dim = 0
    act_dim = 0
    state_dim = 0
    num_draws = 0  # uniform numbers needed to draw one initial state
    max_episode_length = 0

    def __init__(self, num_envs: int, device="cpu", seed: int = 0, dtype: torch.dtype = torch.float32):
        self.num_envs = num_envs
        self.device = torch.device(device)
        self.seed = seed
        self.dtype = dtype
        self.check_finite_actions = True
        self.state = torch.zeros(self.state_dim, num_envs, dtype=dtype, device=self.device)
        self.running_return = torch.zeros(num_envs, dtype=torch.float32, device=self.device)
        self.t = 0  # steps into the current episode, the same for every env
        self.episode = 0  # episodes started since reset(), the same for every env
        # Counter base of draw d of env i: key_i + d * GOLDEN; episode e adds e * num_draws * GOLDEN.
        draws = torch.arange(self.num_draws, dtype=torch.int64, device=self.device)
        self.draw_base = draws[:, None] * GOLDEN + env_keys(seed, num_envs, self.device)
        self.reset()  # a valid state from the start; reset() again gives the same one

    def uniforms(self) -> torch.Tensor:
        """Uniform (0, 1) draws for the current episode of every env: (num_draws, num_envs)."""
        offset = (self.episode * self.num_draws * GOLDEN) & MASK32
        bits = hash32((self.draw_base + offset).bitwise_and_(MASK32))
        # The top 24 bits make a float32 exactly; +0.5 keeps the value away from 0 and 1.
        return (bits >> 8).to(self.dtype).add_(0.5).mul_(2.0**-24)

    def reset(self) -> torch.Tensor:
        self.t = self.episode = 0
        self.running_return.zero_()
        self.state = self.initial_state(self.uniforms())
        return self.observe(self.state).t().contiguous()

    def step(self, actions: torch.Tensor) -> StepResult:
        a = check_actions(self, actions, self.dtype).t()  # rows (act_dim, num_envs), a view
        state, obs, reward = self.dynamics(self.state, a)
        final_obs = obs.t().contiguous()
        self.running_return += reward
        self.t += 1

        terminated = torch.zeros(self.num_envs, dtype=torch.bool, device=self.device)
        if self.t < self.max_episode_length:
            self.state = state
            truncated = terminated.clone()
            next_obs = final_obs.clone()  # equal, but its own tensor: safe to modify in place
            ep_return = torch.zeros_like(self.running_return)
            ep_length = torch.zeros_like(self.running_return)
        else:  # the time limit: every env ends here and starts its next episode
            truncated = torch.ones_like(terminated)
            ep_return = self.running_return.clone()
            ep_length = torch.full_like(ep_return, float(self.t))
            self.running_return.zero_()
            self.t = 0
            self.episode += 1
            self.state = self.initial_state(self.uniforms())
            next_obs = self.observe(self.state).t().contiguous()

        info = {
            "final_obs": final_obs,
            "episode_return": ep_return,
            "episode_length": ep_length,
            "valid": torch.ones_like(terminated),
        }
        return next_obs, reward, terminated, truncated, info

    def close(self):
        pass

    def initial_state(self, u: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def dynamics(self, state: torch.Tensor, a: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def observe(self, state: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


def angle_normalize(x: torch.Tensor) -> torch.Tensor:
    """Wrap an angle to [-pi, pi), written as Gymnasium writes it (torch.remainder, like
    numpy's %, takes the sign of the divisor)."""
    return torch.remainder(x + math.pi, 2 * math.pi) - math.pi


class Pendulum(BuiltinEnv):
    """Gymnasium's Pendulum-v1, ported op for op.

    state   [theta, theta_dot], theta = 0 upright, not wrapped (as in Gymnasium)
    obs     [cos theta, sin theta, theta_dot]
    action  [torque / 2]: torque = 2 * action, in [-2, 2] N m
    reward  -(angle_normalize(theta)^2 + 0.1 theta_dot^2 + 0.001 torque^2), in [-16.27, 0],
            computed on the state before the step (as Gymnasium does)
    start   theta ~ U[-pi, pi], theta_dot ~ U[-1, 1]
    length  200 steps (dt = 0.05 s), truncation only"""

    task = "Pendulum"
    obs_dim, act_dim, state_dim, num_draws = 3, 1, 2, 2
    max_episode_length = 200
    max_speed, max_torque, dt, g, m, l = 8.0, 2.0, 0.05, 10.0, 1.0, 1.0

    def initial_state(self, u):
        return torch.stack([math.pi * (2 * u[0] - 1), 2 * u[1] - 1])

    def observe(self, state):
        th, thdot = state
        return torch.stack([th.cos(), th.sin(), thdot])

    def dynamics(self, state, a):
        th, thdot = state
        g, m, l, dt = self.g, self.m, self.l, self.dt
        u = self.max_torque * a[0]
        costs = angle_normalize(th) ** 2 + 0.1 * thdot**2 + 0.001 * (u**2)
        # Semi-implicit Euler: the new velocity moves the angle, as in Gymnasium.
        newthdot = thdot + (3 * g / (2 * l) * th.sin() + 3.0 / (m * l**2) * u) * dt
        newthdot = newthdot.clamp(-self.max_speed, self.max_speed)
        newth = th + newthdot * dt
        state = torch.stack([newth, newthdot])
        return state, self.observe(state), -costs


class CartpoleSwingup(BuiltinEnv):
    """Swing a pole up from hanging and balance it, after DeepMind Control's
    cartpole/swingup (same masses, force, time step, rail and reward).

    state   [x, theta, x_dot, theta_dot], theta = 0 upright, pi hanging down
    obs     [x, cos theta, sin theta, x_dot, theta_dot]
    action  [force / 10]: force = 10 * action N on the cart
    reward  upright * centered * small_control * small_velocity, in [0, 1], with
              upright        = (cos theta + 1) / 2
              centered       = (1 + 0.1 ** (x / 2)^2) / 2
              small_control  = (4 + 1 - action^2) / 5
              small_velocity = (1 + 0.1 ** (theta_dot / 5)^2) / 2
            (dm_control's tolerance() with bounds 0: gaussian sigmoid, value 0.1 at the
            margin, and the quadratic sigmoid with value 0 at margin 1 for the control),
            computed on the state after the step
    start   x, theta - pi, x_dot, theta_dot each uniform with std 0.01 (dm_control draws
            Gaussians of std 0.01; uniforms cost fewer ops and serve the same purpose)
    length  1000 steps (dt = 0.01 s), truncation only

    Physics: cart 1 kg, uniform pole 0.1 kg and 1 m long, frictionless (dm_control's
    damping of 5e-4 and 2e-6 is negligible), the classic cart-pole equations of motion,
    one semi-implicit Euler step of 0.01 s per control step (dm_control uses RK4 at the
    same step; pole frequency * dt ~ 0.04, far inside the stable range). The cart runs on
    a rail |x| <= 1.8 m; hitting the end stops the cart dead (an inelastic end stop; the
    impulse on the pole is ignored)."""

    task = "CartpoleSwingup"
    obs_dim, act_dim, state_dim, num_draws = 5, 1, 4, 4
    max_episode_length = 1000
    cart_mass, pole_mass, half_length, gravity = 1.0, 0.1, 0.5, 9.81
    max_force, dt, rail = 10.0, 0.01, 1.8

    def initial_state(self, u):
        half_width = 0.01 * math.sqrt(3.0)  # U[-w, w] has std w / sqrt(3)
        x, th, xd, thd = half_width * (2 * u - 1)
        return torch.stack([x, th + math.pi, xd, thd])

    def observe(self, state):
        x, th, xd, thd = state
        return torch.stack([x, th.cos(), th.sin(), xd, thd])

    def dynamics(self, state, a):
        x, th, xd, thd = state
        mc, mp, l, g, dt = self.cart_mass, self.pole_mass, self.half_length, self.gravity, self.dt
        total = mc + mp
        u = a[0]
        sin, cos = th.sin(), th.cos()
        temp = (self.max_force * u + mp * l * thd * thd * sin) / total
        thacc = (g * sin - cos * temp) / (l * (4.0 / 3.0 - mp * cos * cos / total))
        xacc = temp - mp * l * thacc * cos / total
        xd = xd + dt * xacc
        thd = thd + dt * thacc
        x = x + dt * xd
        th = th + dt * thd
        # End stop: clamp the cart to the rail and kill its velocity there.
        xd = xd.masked_fill(x.abs() > self.rail, 0.0)
        x = x.clamp(-self.rail, self.rail)

        cos, sin = th.cos(), th.sin()
        obs = torch.stack([x, cos, sin, xd, thd])
        # 0.1 ** z == exp(ln(0.1) * z): dm_control's gaussian tolerance, value 0.1 at the margin.
        ln01 = math.log(0.1)
        upright = (cos + 1) / 2
        centered = (1 + torch.exp((ln01 / 4.0) * x * x)) / 2
        small_control = (5 - u * u) / 5
        small_velocity = (1 + torch.exp((ln01 / 25.0) * thd * thd)) / 2
        reward = upright * centered * small_control * small_velocity
        return torch.stack([x, th, xd, thd]), obs, reward


class Reacher(BuiltinEnv):
    """Move the tip of a planar two-link arm to a random target, after Gymnasium's
    Reacher-v5 (same geometry, target area, obs layout and episode length) but with real
    arm inertia instead of Reacher's heavy rotor inertia, so the links' coupling matters.

    state   [q1, q2, q1_dot, q2_dot, target_x, target_y]
    obs     [cos q1, cos q2, sin q1, sin q2, target_x, target_y, q1_dot, q2_dot,
             tip_x - target_x, tip_y - target_y]
    action  [tau1, tau2]: joint torques in N m (max torque 1)
    reward  -|tip - target| - 0.1 |action|^2, on the state after the step
    start   q1, q2 ~ U[-0.1, 0.1], at rest, target uniform in the disc of radius 0.2 m
            around the base (Gymnasium samples the same disc, and adds velocity noise of
            +-0.005 rad/s, which we leave out: the random target already breaks symmetry)
    length  50 steps (dt = 0.02 s, 1 s in all, as Gymnasium's Reacher), truncation only

    Physics: links of 0.1 m and 0.11 m, uniform rods of 1 kg each, rotor inertia
    0.005 kg m^2 and viscous damping 0.05 N m s per joint, no gravity (the arm lies in a
    horizontal plane). Rigid-body dynamics M(q) q_ddot = tau - c(q, q_dot) - b q_dot,
    the 2x2 mass matrix inverted in closed form, integrated by semi-implicit Euler in
    `substeps` steps per control step. One step of 0.02 s is the default: it is stable
    here (damping / inertia * dt ~ 0.1) and loses ~1.3% of the kinetic energy of an
    undamped arm in 0.8 s; 2 substeps halve that and cost ~30% more per env step (too
    much for the speed goal, see benchmarks/bench_envs.py). The elbow stops at +-3 rad
    (like Reacher's joint range); the shoulder turns freely."""

    task = "Reacher"
    obs_dim, act_dim, state_dim, num_draws = 10, 2, 6, 4
    max_episode_length = 50
    l1, l2, m1, m2 = 0.1, 0.11, 1.0, 1.0
    armature, damping, max_torque = 0.005, 0.05, 1.0
    dt, substeps, elbow_limit = 0.02, 1, 3.0
    target_radius, control_cost = 0.2, 0.1

    def __init__(self, num_envs: int, device="cpu", seed: int = 0, dtype: torch.dtype = torch.float32):
        # Mass matrix of two uniform rods (centre of mass mid-link, inertia m l^2 / 12)
        # plus rotor inertia on each joint:
        #   M11 = k1 + 2 k2 cos q2,   M12 = k3 + k2 cos q2,   M22 = k3 + armature
        lc1, lc2 = self.l1 / 2, self.l2 / 2
        i1, i2 = self.m1 * self.l1**2 / 12, self.m2 * self.l2**2 / 12
        self.k1 = i1 + i2 + self.m1 * lc1**2 + self.m2 * (self.l1**2 + lc2**2) + self.armature
        self.k2 = self.m2 * self.l1 * lc2
        self.k3 = i2 + self.m2 * lc2**2
        super().__init__(num_envs, device, seed, dtype)

    def initial_state(self, u):
        q1, q2 = 0.2 * u[0:2] - 0.1
        rest = torch.zeros_like(q1)
        # Uniform in a disc: radius R sqrt(U) gives equal density per unit area.
        r = self.target_radius * u[2].sqrt()
        phi = (2 * math.pi) * u[3]
        return torch.stack([q1, q2, rest, rest, r * phi.cos(), r * phi.sin()])

    def trig_and_tip(self, q1, q2):
        """cos and sin of [q1, q2, q1 + q2], and the tip position. One cos and one sin
        call on the stacked angles: on a CPU each such call may start the thread pool."""
        angles = torch.stack([q1, q2, q1 + q2])
        cos, sin = angles.cos(), angles.sin()
        tip_x = self.l1 * cos[0] + self.l2 * cos[2]
        tip_y = self.l1 * sin[0] + self.l2 * sin[2]
        return cos, sin, tip_x, tip_y

    def observe(self, state):
        q1, q2, qd1, qd2, tx, ty = state
        cos, sin, px, py = self.trig_and_tip(q1, q2)
        return torch.stack([cos[0], cos[1], sin[0], sin[1], tx, ty, qd1, qd2, px - tx, py - ty])

    def dynamics(self, state, a):
        q1, q2, qd1, qd2, tx, ty = state
        tau1, tau2 = self.max_torque * a
        k1, k2, k3, b = self.k1, self.k2, self.k3, self.damping
        m22, h = k3 + self.armature, self.dt / self.substeps
        for _ in range(self.substeps):
            c2, s2 = q2.cos(), q2.sin()
            m11, m12 = (2 * k2) * c2 + k1, k2 * c2 + k3
            # Generalized forces tau - c(q, q_dot) - b q_dot, Coriolis/centrifugal terms
            #   c1 = -k2 sin q2 (2 q1_dot + q2_dot) q2_dot,   c2 = k2 sin q2 q1_dot^2
            hs = k2 * s2
            f1 = tau1 + hs * (2 * qd1 + qd2) * qd2 - b * qd1
            f2 = tau2 - hs * qd1 * qd1 - b * qd2
            # q_ddot = M^-1 f, with M^-1 = [[m22, -m12], [-m12, m11]] / det M
            inv_det = 1.0 / (m11 * m22 - m12 * m12)
            qd1 = qd1 + (h * (m22 * f1 - m12 * f2)) * inv_det
            qd2 = qd2 + (h * (m11 * f2 - m12 * f1)) * inv_det
            q1 = q1 + h * qd1
            q2 = q2 + h * qd2
            # Elbow end stop: clamp the angle and kill the velocity there (inelastic).
            qd2 = qd2.masked_fill(q2.abs() > self.elbow_limit, 0.0)
            q2 = q2.clamp(-self.elbow_limit, self.elbow_limit)

        state = torch.stack([q1, q2, qd1, qd2, tx, ty])
        obs = self.observe(state)
        dx, dy = obs[8], obs[9]  # tip - target
        reward = -(dx * dx + dy * dy).sqrt() - self.control_cost * (a * a).sum(0)
        return state, obs, reward


TASKS = {"Pendulum": Pendulum, "CartpoleSwingup": CartpoleSwingup, "Reacher": Reacher}


# ---------------------------------------------------------------------------------------
# Gymnasium adapter: any Box-action Gymnasium env, stepped on the CPU
# ---------------------------------------------------------------------------------------


class GymnasiumEnv:
    """`gym:<id>`: Gymnasium's synchronous vector env with same-step auto-reset, which
    hands back the true final obs of finished episodes in info["final_obs"] (the default
    next-step mode would instead return a junk transition after each episode end).

    Gymnasium runs on the CPU in numpy float64: each step copies actions to the host and
    obs back to env.device as float32. Returns keep Gymnasium's meaning: `terminated` and
    `truncated` can both be True when an episode fails on its last allowed step."""

    def __init__(self, env_id: str, num_envs: int, device="cpu", seed: int = 0):
        try:
            import gymnasium
            import numpy as np
        except ImportError as e:
            raise ImportError(f"task 'gym:{env_id}' needs Gymnasium: {GYM_INSTALL}") from e
        if not hasattr(gymnasium.vector, "AutoresetMode"):
            raise ImportError(f"task 'gym:{env_id}' needs gymnasium >= 1.1 (same-step autoreset): {GYM_INSTALL}")
        self.np = np
        self.task = "gym:" + env_id
        self.num_envs = num_envs
        self.device = torch.device(device)
        self.seed = seed
        self.check_finite_actions = True
        try:
            self.env = gymnasium.make_vec(
                env_id,
                num_envs=num_envs,
                vectorization_mode="sync",
                vector_kwargs={"autoreset_mode": gymnasium.vector.AutoresetMode.SAME_STEP},
            )
        except gymnasium.error.DependencyNotInstalled as e:
            raise ImportError(f"task 'gym:{env_id}' needs extra packages: {GYM_INSTALL} ({e})") from e
        act_space, obs_space = self.env.single_action_space, self.env.single_observation_space
        if not isinstance(act_space, gymnasium.spaces.Box) or len(act_space.shape) != 1:
            raise ValueError(f"gym:{env_id}: only flat continuous (Box) action spaces are supported, got {act_space}")
        if not np.all(np.isfinite(act_space.low)) or not np.all(np.isfinite(act_space.high)):
            raise ValueError(f"gym:{env_id}: action bounds must be finite to rescale [-1, 1], got {act_space}")
        if len(obs_space.shape) != 1:
            raise ValueError(f"gym:{env_id}: only flat observation spaces are supported, got {obs_space}")
        self.obs_dim = int(obs_space.shape[0])
        self.act_dim = int(act_space.shape[0])
        # [-1, 1] -> [low, high]: Humanoid's bounds are +-0.4, InvertedPendulum's +-3.
        self.action_low = act_space.low.astype(np.float64)
        self.action_high = act_space.high.astype(np.float64)
        spec = self.env.spec
        # 0 means "no time limit" (an env registered without max_episode_steps).
        self.max_episode_length = int(spec.max_episode_steps or 0) if spec is not None else 0
        self.running_return = torch.zeros(num_envs, dtype=torch.float32, device=self.device)
        self.running_length = torch.zeros(num_envs, dtype=torch.float32, device=self.device)

    def to_torch(self, x) -> torch.Tensor:
        return torch.as_tensor(self.np.asarray(x), dtype=torch.float32).to(self.device)

    def reset(self) -> torch.Tensor:
        # Seeds env i with seed + i; later auto-resets continue each env's own generator.
        obs, _ = self.env.reset(seed=self.seed)
        self.running_return.zero_()
        self.running_length.zero_()
        return self.to_torch(obs)

    def step(self, actions: torch.Tensor) -> StepResult:
        np = self.np
        a = check_actions(self, actions, torch.float32).cpu().numpy().astype(np.float64)
        scaled = self.action_low + (a + 1.0) * 0.5 * (self.action_high - self.action_low)
        obs, reward, terminated, truncated, info = self.env.step(scaled)

        final_obs = np.array(obs, dtype=np.float64)
        finished = info.get("_final_obs")
        if finished is not None and finished.any():
            # info["final_obs"] is an object array holding None for unfinished envs.
            final_obs[finished] = np.stack(info["final_obs"][finished])

        reward = self.to_torch(reward)
        terminated = torch.as_tensor(terminated, dtype=torch.bool).to(self.device)
        truncated = torch.as_tensor(truncated, dtype=torch.bool).to(self.device)
        self.running_return += reward
        self.running_length += 1.0
        ep_return, ep_length = end_episodes(self.running_return, self.running_length, terminated | truncated)
        info = {
            "final_obs": self.to_torch(final_obs),
            "episode_return": ep_return,
            "episode_length": ep_length,
            "valid": torch.ones_like(terminated),
        }
        return self.to_torch(obs), reward, terminated, truncated, info

    def close(self):
        self.env.close()


# ---------------------------------------------------------------------------------------
# Isaac Gym adapter
# ---------------------------------------------------------------------------------------


class IsaacGymEnv:
    """`isaacgym:<Task>`: an IsaacGymEnvs task (Ant, Humanoid, ShadowHand, ...).

    `import isaacgym` must run before the first `import torch` in the process or it
    raises. This file imports torch at the top, so it cannot do that itself: the trainer
    (pql.py) imports isaacgym first when the task starts with "isaacgym:", and this adapter
    only checks that it happened.

    What IsaacGymEnvs' VecTask.step does, and how it is mapped here:
    - It clamps actions to +-clipActions and returns (obs_dict, rew_buf, reset_buf,
      extras); reset_buf is 1 for BOTH kinds of episode end and extras["time_outs"] marks
      those that hit the time limit. So truncated = done & time_outs and terminated =
      done & ~time_outs. When a failure and the time limit fall on the same step, Isaac
      Gym flags it as a time-out and so do we: that one transition gets bootstrapped.
    - Reset is lazy: envs that finished are reset at the start of the NEXT step's
      post-physics. So the obs returned with done=1 is the true terminal obs (it is
      next_obs and final_obs here), and the next step applies the action chosen on that
      terminal obs, then throws the result away and returns a reset obs. That step is not
      a transition of any episode: we report it with valid=False, reward 0, no done, and
      the reset obs as next_obs. Its action is wasted.
    - Counting: after a reset step the task's progress counter is 0 and a time-out comes
      when it reaches max_episode_length - 1, so a timed-out episode has
      max_episode_length - 1 valid transitions (plus the invalid reset step). That holds for
      tasks that reset in post_physics_step (Ant, Humanoid, ...). Tasks that reset in
      pre_physics_step (ShadowHand, AllegroHand) reset first and then simulate the reset
      step's (wasted) action and count it: their counter is 1 after it, a timed-out episode
      has max_episode_length - 2 valid transitions, and the reset step's obs is the reset
      state one physics step on. The flags above are right for both kinds.
    - reset() only returns the cached obs buffer; to get real reset obs we do what PQL's
      public code does: set reset_buf to 1 and step zero actions.
    - Isaac Gym seeds torch, numpy and random once in isaacgymenvs.make(seed=...);
      GPU physics is not bitwise reproducible, so neither is this adapter."""

    def __init__(self, task_name: str, num_envs: int, device="cpu", seed: int = 0):
        if "isaacgym" not in sys.modules:
            if importlib.util.find_spec("isaacgym") is None:
                raise ImportError(f"task 'isaacgym:{task_name}' needs Isaac Gym, which is not installed.\n{ISAACGYM_INSTALL}")
            raise RuntimeError(
                f"task 'isaacgym:{task_name}': `import isaacgym` must come before `import torch` "
                "(pql.py does this when --task starts with 'isaacgym:'); import it first in your script"
            )
        try:
            import isaacgymenvs
        except ImportError as e:
            raise ImportError(f"task 'isaacgym:{task_name}' needs IsaacGymEnvs.\n{ISAACGYM_INSTALL}") from e
        self.task = "isaacgym:" + task_name
        self.device = torch.device(device)
        if self.device.type == "cuda":
            index = self.device.index if self.device.index is not None else 0
            self.device = torch.device("cuda", index)
            sim_device, graphics_device_id = str(self.device), index
        else:
            sim_device, graphics_device_id = "cpu", -1
        self.env = isaacgymenvs.make(
            seed=seed,
            task=task_name,
            num_envs=num_envs,
            sim_device=sim_device,
            rl_device=str(self.device),
            graphics_device_id=graphics_device_id,
            headless=True,
            force_render=False,
        )
        self.num_envs = num_envs
        self.seed = seed
        self.obs_dim = int(self.env.num_obs)
        self.act_dim = int(self.env.num_actions)
        self.max_episode_length = int(self.env.max_episode_length)
        self.check_finite_actions = True
        n = num_envs
        self.running_return = torch.zeros(n, dtype=torch.float32, device=self.device)
        self.running_length = torch.zeros(n, dtype=torch.float32, device=self.device)
        # pending[i]: env i reported reset_buf=1 last step, so this step is its reset step.
        # VecTask starts with reset_buf = 1 everywhere: all pending until reset().
        self.pending = torch.ones(n, dtype=torch.bool, device=self.device)

    def raw_step(self, actions: torch.Tensor):
        """Step Isaac Gym and copy what we keep: VecTask returns its own buffers
        (rew_buf, reset_buf, extras), which the next step overwrites in place."""
        obs_dict, rew, reset_buf, extras = self.env.step(actions)
        obs = obs_dict["obs"].to(device=self.device, dtype=torch.float32).clone()
        done = reset_buf.to(self.device) != 0
        time_outs = extras.get("time_outs")
        if time_outs is None:  # very old IsaacGymEnvs: no time-out flag, treat ends as failures
            time_outs = torch.zeros_like(done)
        time_outs = time_outs.to(self.device) != 0
        rew = rew.to(device=self.device, dtype=torch.float32).clone()
        return obs, rew, done, time_outs

    def reset(self) -> torch.Tensor:
        self.env.reset_buf[:] = 1
        zeros = torch.zeros(self.num_envs, self.act_dim, dtype=torch.float32, device=self.device)
        obs, _, done, _ = self.raw_step(zeros)
        self.pending = done  # a reset state that is already 'done' gets another reset step
        self.running_return.zero_()
        self.running_length.zero_()
        return obs

    def step(self, actions: torch.Tensor) -> StepResult:
        a = check_actions(self, actions, torch.float32)
        obs, rew, raw_done, time_outs = self.raw_step(a)
        valid = ~self.pending
        self.pending = raw_done
        done = raw_done & valid
        truncated = done & time_outs
        terminated = done & ~time_outs
        reward = torch.where(valid, rew, torch.zeros_like(rew))
        self.running_return += reward
        self.running_length += valid
        ep_return, ep_length = end_episodes(self.running_return, self.running_length, done)
        info = {"final_obs": obs.clone(), "episode_return": ep_return, "episode_length": ep_length, "valid": valid}
        return obs, reward, terminated, truncated, info

    def close(self):
        pass


# ---------------------------------------------------------------------------------------
# mjlab adapter
# ---------------------------------------------------------------------------------------


class PrivateTorchRng:
    """A private copy of torch's global generator states (the CPU one and, once CUDA is
    initialised, every GPU's), swapped in around every mjlab call with `with rng:`
    (MjlabEnv.inside_mjlab).

    mjlab draws its resets, noise and events from torch's GLOBAL generator and reseeds it
    (and numpy's and Python's) when built. Without this, building an eval env would reseed
    the trainer, and every draw of the trainer would shift the simulator's. With it, an
    MjlabEnv follows exactly the random stream of a standalone mjlab env with its seed.
    The swap is not thread-safe: another thread drawing from the global generators meanwhile
    would draw from mjlab's stream, and be rewound when the caller's is restored. So
    pql_threaded.py's learner threads draw from generators of their own (RandomDraws)."""

    def __init__(self, device: torch.device):
        import numpy  # mjlab needs it anyway; envs.py itself does not

        self.np = numpy
        if device.type == "cuda":
            torch.cuda.init()  # so that the first capture already holds the GPUs' states
        self.states = None  # None until the first `with`: mjlab starts from the caller's state
        self.saved = None

    def capture(self):
        # torch.manual_seed (mjlab's seeding) reseeds every GPU, not only the env's device. (Before
        # CUDA is initialised it queues that reseed for later: build a CPU env after CUDA is up.)
        cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
        return torch.get_rng_state(), cuda

    def restore(self, states):
        torch.set_rng_state(states[0])
        if states[1] is not None:
            torch.cuda.set_rng_state_all(states[1])

    def __enter__(self):
        self.saved = self.capture()
        if self.states is not None:
            self.restore(self.states)
        # mjlab's seeding also sets Python's and numpy's generators and PYTHONHASHSEED.
        self.host_states = random.getstate(), self.np.random.get_state(), os.environ.get("PYTHONHASHSEED")
        return self

    def __exit__(self, *exc):
        self.states = self.capture()
        self.restore(self.saved)
        python_state, numpy_state, hash_seed = self.host_states
        random.setstate(python_state)
        self.np.random.set_state(numpy_state)
        if hash_seed is None:
            os.environ.pop("PYTHONHASHSEED", None)
        else:
            os.environ["PYTHONHASHSEED"] = hash_seed
        return False


class MjlabEnv:
    """`mjlab:<TaskId>`: a task of mjlab (Isaac Lab's manager-based API on MuJoCo Warp), e.g.
    mjlab:Mjlab-Cartpole-Balance or mjlab:Mjlab-Velocity-Flat-Unitree-Go1; it runs on the
    CPU (Warp's CPU backend, slow) or on CUDA. `python -m mjlab.scripts.list_envs` lists them.

    How mjlab's step maps onto the interface:
    - The task's config is built with `auto_reset = False`: then mjlab's step returns the
      TRUE terminal obs of finished envs (info["final_obs"]) and refuses to step again until
      they are reset, which we do at once with `reset(env_ids=...)`: next_obs holds the reset
      obs there. mjlab's partial reset recomputes the obs of ALL envs (with fresh noise);
      the others keep the step's obs, so each env gets one obs (one noise draw) per step,
      as with mjlab's own auto-reset.
    - Observations: the "actor" group (the policy's inputs, with the task's observation
      noise; "policy" in older mjlab and Isaac Lab), one flat vector. The privileged
      "critic" group is not used: PQL's critic sees what the policy sees.
    - Actions in [-1, 1] are multiplied by `action_scale` (1 by default) and sent as mjlab's
      raw actions, which each action term maps to `scale * a + offset` itself: for the
      Cartpoles +-1 is the motor's full range (+-10 N); for Go1 +-1 moves the joint targets
      +-0.37 rad (hip, thigh) and +-0.25 rad (calf) around the standing pose.
    - Rewards are mjlab's, as its own training logs them: multiplied by the control step dt
      (0.05 s for the Cartpoles: at most 0.05 per step). pql.py's per-task reward scales
      account for that. `terminated` and `truncated` are mjlab's `terminated` and
      `time_outs`; both can be True on one step, a failure on the time limit's step, which
      the trainers then do not bootstrap (Isaac Gym's adapter, told only that the episode
      ended on its time limit, bootstraps it). Tasks with `is_finite_horizon = True`
      report their time-limit ends as terminations (as mjlab's own rsl_rl wrapper does).
    - Host syncs per step, which matter on CUDA: two in mjlab's step, one here (mjlab's
      reset needs the ids of the finished envs), plus the finite-action check; a step with
      resets adds mjlab's reset path.
    - Seeding: see PrivateTorchRng. reset() restarts mjlab's random stream where the build left
      it, so it draws the same starts every time (counters and curricula are mjlab's to keep).
    `cfg_hook(cfg)`, if given, edits mjlab's env config before the env is built."""

    def __init__(self, task_id: str, num_envs: int, device="cpu", seed: int = 0,
                 action_scale: float = 1.0, cfg_hook=None):
        try:
            import mjlab.tasks  # noqa: F401  (importing it registers the tasks)
            import warp
            from mjlab.envs import ManagerBasedRlEnv
            from mjlab.tasks.registry import list_tasks, load_env_cfg
        except ImportError as e:
            raise ImportError(f"task 'mjlab:{task_id}' needs mjlab: {MJLAB_INSTALL} ({e})") from e
        if os.environ.get("MJLAB_WARP_QUIET", "1").lower() not in ("0", "false", "no") and hasattr(warp.config, "log_level"):
            # Warp logs a line per kernel module it loads (some 35 per env); mjlab's switch for
            # that, MJLAB_WARP_QUIET, does not reach the Warp 1.19 it installs. Set it to 0 to see them.
            warp.config.log_level = max(warp.config.log_level, warp.LOG_WARNING)
        if task_id not in list_tasks():
            raise ValueError(f"unknown mjlab task {task_id!r}; mjlab has: {', '.join(sorted(list_tasks()))}")
        self.task = "mjlab:" + task_id
        self.num_envs = num_envs
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.seed = seed
        self.action_scale = float(action_scale)
        self.check_finite_actions = True
        cfg = load_env_cfg(task_id)  # a deep copy of the registered config
        cfg.scene.num_envs = num_envs
        cfg.seed = seed
        cfg.auto_reset = False
        if cfg_hook is not None:
            cfg_hook(cfg)
        self.rng = PrivateTorchRng(self.device)
        with self.inside_mjlab():
            self.env = ManagerBasedRlEnv(cfg, device=str(self.device))
        # reset() starts mjlab's random stream over from here, where a standalone env with this seed
        # starts its first reset (reseeding instead would reuse the numbers the build's
        # randomisation events drew, e.g. Go1's friction and mass, for the start states).
        self.rng_after_build = self.rng.states

        manager = self.env.observation_manager
        self.obs_group = next((g for g in ("actor", "policy") if g in manager.group_obs_dim), None)
        if self.obs_group is None:
            raise ValueError(f"{self.task}: no 'actor' or 'policy' observation group; it has {list(manager.group_obs_dim)}")
        dims = manager.group_obs_dim[self.obs_group]
        if not manager.group_obs_concatenate[self.obs_group] or len(dims) != 1:
            raise ValueError(f"{self.task}: observation group {self.obs_group!r} is not one flat vector (dims {dims})")
        self.obs_dim = int(dims[0])
        self.act_dim = int(self.env.action_manager.total_action_dim)
        self.max_episode_length = int(self.env.max_episode_length)
        self.finite_horizon = bool(getattr(self.env.cfg, "is_finite_horizon", False))
        self.running_return = torch.zeros(num_envs, dtype=torch.float32, device=self.device)
        self.running_length = torch.zeros(num_envs, dtype=torch.float32, device=self.device)

    @contextlib.contextmanager
    def inside_mjlab(self):
        """The context of every call into mjlab: its own random stream (PrivateTorchRng) and, on
        CUDA, the env's GPU as torch's current device. mjlab wraps Warp's stream in
        torch.cuda.ExternalStream objects, which belong to whichever GPU is current when they are
        made: with the env on another GPU (pql.py --device cuda:1 leaves cuda:0 current) they would
        be tagged with the wrong one, and mjlab's writes into its buffers would not run on Warp's
        stream as mjlab means them to."""
        with contextlib.ExitStack() as context:
            if self.device.type == "cuda":
                context.enter_context(torch.cuda.device(self.device))
            context.enter_context(self.rng)
            yield

    def observe(self, obs_groups) -> torch.Tensor:
        return obs_groups[self.obs_group].to(device=self.device, dtype=torch.float32)

    def reset(self) -> torch.Tensor:
        self.rng.states = self.rng_after_build
        with self.inside_mjlab():
            obs_groups, _ = self.env.reset()
        self.running_return.zero_()
        self.running_length.zero_()
        return self.observe(obs_groups).clone()

    def step(self, actions: torch.Tensor) -> StepResult:
        a = check_actions(self, actions, torch.float32) * self.action_scale
        with self.inside_mjlab():
            obs_groups, reward, terminated, truncated, _ = self.env.step(a)
            final_obs = self.observe(obs_groups)  # a fresh tensor (mjlab concatenates the terms)
            # mjlab reuses its reward and termination buffers: copy them.
            reward = reward.to(device=self.device, dtype=torch.float32).clone()
            terminated = terminated.to(self.device).clone()
            truncated = truncated.to(self.device).clone()
            done = terminated | truncated
            if self.finite_horizon:  # the time limit is part of the task: no bootstrapping
                terminated, truncated = done, torch.zeros_like(done)
            done_ids = done.nonzero(as_tuple=False).squeeze(-1)  # a host sync: mjlab resets by id
            if done_ids.numel() > 0:
                reset_groups, _ = self.env.reset(env_ids=done_ids)
                next_obs = torch.where(done[:, None], self.observe(reset_groups), final_obs)
            else:
                next_obs = final_obs.clone()
        self.running_return += reward
        self.running_length += 1.0
        ep_return, ep_length = end_episodes(self.running_return, self.running_length, done)
        info = {"final_obs": final_obs, "episode_return": ep_return, "episode_length": ep_length,
                "valid": torch.ones_like(done)}
        return next_obs, reward, terminated, truncated, info

    def close(self):
        with self.inside_mjlab():
            self.env.close()


# ---------------------------------------------------------------------------------------
# Entry points
# ---------------------------------------------------------------------------------------


def list_tasks() -> List[str]:
    return list(TASKS)


def make_env(task: str, num_envs: int, device="cpu", seed: int = 0, dtype: torch.dtype = torch.float32):
    """Build an environment. `task` is a built-in name (see list_tasks()), 'gym:<id>',
    'isaacgym:<Task>' or 'mjlab:<TaskId>'. `dtype` sets the physics precision of built-in tasks only."""
    if isinstance(num_envs, bool) or not isinstance(num_envs, int) or num_envs < 1:
        raise ValueError(f"num_envs must be an integer >= 1, got {num_envs!r}")
    if dtype != torch.float32 and task not in TASKS:
        raise ValueError(f"dtype {dtype} is only supported by the built-in tasks, not {task!r}")
    if task.startswith("gym:"):
        return GymnasiumEnv(task[len("gym:"):], num_envs, device, seed)
    if task.startswith("isaacgym:"):
        return IsaacGymEnv(task[len("isaacgym:"):], num_envs, device, seed)
    if task.startswith("mjlab:"):
        return MjlabEnv(task[len("mjlab:"):], num_envs, device, seed)
    if task in TASKS:
        return TASKS[task](num_envs, device, seed, dtype)
    raise ValueError(
        f"unknown task {task!r}. Built-in tasks: {', '.join(TASKS)}. "
        f"Or 'gym:<id>' for a Gymnasium env (e.g. gym:HalfCheetah-v5; {GYM_INSTALL}) "
        "or 'isaacgym:<Task>' for an IsaacGymEnvs task (e.g. isaacgym:Ant) "
        "or 'mjlab:<TaskId>' for an mjlab task (e.g. mjlab:Mjlab-Cartpole-Balance)."
    )


if __name__ == "__main__":
    print(f"{'task':<18}{'obs_dim':>8}{'act_dim':>8}{'max_episode_length':>20}")
    for name, cls in TASKS.items():
        print(f"{name:<18}{cls.obs_dim:>8}{cls.act_dim:>8}{cls.max_episode_length:>20}")
    print()
    print("Adapters:")
    print(f"  gym:<id>          any Gymnasium env with a Box action space, e.g. gym:HalfCheetah-v5 ({GYM_INSTALL})")
    print("  isaacgym:<Task>   an IsaacGymEnvs task, e.g. isaacgym:Ant (import isaacgym before torch)")
    print(f"  mjlab:<TaskId>    an mjlab task, e.g. mjlab:Mjlab-Cartpole-Balance ({MJLAB_INSTALL})")
