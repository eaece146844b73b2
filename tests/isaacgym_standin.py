"""A stand-in for Isaac Gym + IsaacGymEnvs, to test envs.IsaacGymEnv without a GPU.

PointTask reproduces what matters of IsaacGymEnvs' VecTask.step and of a task's
post_physics_step (ant.py is the model), in the same order:

    step(actions):
        clamp actions to +-clip_actions; pre_physics_step; simulate
        post_physics_step:
            progress_buf += 1
            reset_idx(envs whose reset_buf is set)     <- lazy reset, one step late
            compute observations, then reward and reset_buf (terminal OR progress >= T-1)
        timeout_buf = (progress_buf >= T - 1) & (reset_buf != 0); extras["time_outs"]
        obs_dict["obs"] = clamp(obs_buf, +-clip_obs)
        return obs_dict, rew_buf, reset_buf, extras     <- its own buffers, reused in place
    reset(): returns the cached obs buffer only (no reset happens)

The dynamics: a point on a line, x += 0.25 * action. The episode fails when |x| > 1 and
times out at max_episode_length; a reset draws x ~ U[-reset_range, reset_range] (0.5 by
default; above 1 some reset states are terminal at once). obs = [x, 10 x], whose
second entry is clipped at +-5 by clip_obs. reward = 1 - |x|.
Every simulate() is logged (x before it and the action applied) so tests can see which
action hit which state.
"""

from __future__ import annotations

import sys
import types

import torch


class PointTask:
    def __init__(self, num_envs, device="cpu", seed=0, max_episode_length=10, clip_actions=1.0, clip_obs=5.0,
                 reset_range=0.5):
        self.num_envs = num_envs
        self.num_obs = 2
        self.num_actions = 1
        self.max_episode_length = max_episode_length
        self.device = device
        self.clip_actions = clip_actions
        self.clip_obs = clip_obs
        self.reset_range = reset_range
        self.generator = torch.Generator().manual_seed(seed)
        self.x = torch.zeros(num_envs, device=device)
        # VecTask.allocate_buffers: reset_buf starts at 1, obs at 0.
        self.obs_buf = torch.zeros(num_envs, 2, device=device)
        self.rew_buf = torch.zeros(num_envs, device=device)
        self.reset_buf = torch.ones(num_envs, dtype=torch.long, device=device)
        self.timeout_buf = torch.zeros(num_envs, dtype=torch.long, device=device)
        self.progress_buf = torch.zeros(num_envs, dtype=torch.long, device=device)
        self.extras = {}
        self.obs_dict = {}
        self.log = []

    # --- VecTask ---
    def step(self, actions):
        action_tensor = torch.clamp(actions, -self.clip_actions, self.clip_actions)
        self.pre_physics_step(action_tensor)
        self.simulate()
        self.post_physics_step()
        self.timeout_buf = (self.progress_buf >= self.max_episode_length - 1) & (self.reset_buf != 0)
        self.extras["time_outs"] = self.timeout_buf.to(self.device)
        self.obs_dict["obs"] = torch.clamp(self.obs_buf, -self.clip_obs, self.clip_obs).to(self.device)
        return self.obs_dict, self.rew_buf.to(self.device), self.reset_buf.to(self.device), self.extras

    def reset(self):
        self.obs_dict["obs"] = torch.clamp(self.obs_buf, -self.clip_obs, self.clip_obs).to(self.device)
        return self.obs_dict

    # --- the task ---
    def pre_physics_step(self, actions):
        self.actions = actions.clone()

    def simulate(self):
        self.log.append({"x_before": self.x.clone(), "action": self.actions[:, 0].clone()})
        self.x += 0.25 * self.actions[:, 0]

    def post_physics_step(self):
        self.progress_buf += 1
        env_ids = self.reset_buf.nonzero(as_tuple=False).flatten()
        if len(env_ids) > 0:
            self.reset_idx(env_ids)
        self.compute_observations()
        self.compute_reward()

    def reset_idx(self, env_ids):
        u = torch.rand(len(env_ids), generator=self.generator).to(self.device)
        self.x[env_ids] = (2 * u - 1) * self.reset_range
        self.progress_buf[env_ids] = 0
        self.reset_buf[env_ids] = 0

    def compute_observations(self):
        self.obs_buf[:, 0] = self.x
        self.obs_buf[:, 1] = 10 * self.x

    def compute_reward(self):
        self.rew_buf[:] = 1.0 - self.x.abs()
        ones = torch.ones_like(self.reset_buf)
        reset = torch.where(self.x.abs() > 1.0, ones, self.reset_buf)
        reset = torch.where(self.progress_buf >= self.max_episode_length - 1, ones, reset)
        self.reset_buf[:] = reset


def install(monkeypatch, **task_kwargs):
    """Put fake `isaacgym` and `isaacgymenvs` modules in sys.modules. Returns a dict that
    receives the created task ('task') and the arguments make() got ('make_kwargs')."""
    made = {}

    def make(seed, task, num_envs, sim_device, rl_device, graphics_device_id=-1, headless=False,
             multi_gpu=False, virtual_screen_capture=False, force_render=True):
        made["make_kwargs"] = dict(seed=seed, task=task, num_envs=num_envs, sim_device=sim_device,
                                   rl_device=rl_device, graphics_device_id=graphics_device_id, headless=headless)
        made["task"] = PointTask(num_envs, device=rl_device, seed=seed, **task_kwargs)
        return made["task"]

    isaacgymenvs = types.ModuleType("isaacgymenvs")
    isaacgymenvs.make = make
    monkeypatch.setitem(sys.modules, "isaacgym", types.ModuleType("isaacgym"))
    monkeypatch.setitem(sys.modules, "isaacgymenvs", isaacgymenvs)
    return made
