#!/usr/bin/env python3
"""Record diffusers' scheduler behaviour over many configurations for the scheduler tests.

Run by hand (not in CI) from the repository root:

    python crates/diffusion/scripts/make_scheduler_cases.py

with torch 2.5.1, diffusers 0.31.0 and numpy 2.x installed. It (re)writes
crates/diffusion/tests/fixtures/scheduler_cases.json:

    {"sample": [...], "model_output": [...], "noise": [...],   # shape [1,1,2,2], fixed values
     "cases": [{"kind": "euler"|"euler-a"|"ddim", "steps": N, "config": {...},
                "timesteps": [...], "init_noise_sigma": x,
                "checks": [{"step": k, "scaled": [...], "prev": [...]}]}]}

For every case the scheduler is `Class.from_config(config)` with `set_timesteps(steps)`; it walks
every timestep in order (diffusers' schedulers count steps internally) with the same fixed
sample, model output and (Euler ancestral) noise at each step, and records scale_model_input and
step(...).prev_sample at the first, second and last steps. DDIM runs with eta 0. Floats are
written with repr, so float32 values read back exactly.
"""

import json
from pathlib import Path

import torch
from diffusers import DDIMScheduler, EulerAncestralDiscreteScheduler, EulerDiscreteScheduler
import diffusers.schedulers.scheduling_euler_ancestral_discrete as ancestral_module

OUT = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "scheduler_cases.json"
CLASSES = {
    "euler": EulerDiscreteScheduler,
    "euler-a": EulerAncestralDiscreteScheduler,
    "ddim": DDIMScheduler,
}
# Values chosen so DDIM's clip_sample bites on the predicted clean sample.
SAMPLE = torch.tensor([[[[1.5, -0.75], [0.25, -2.0]]]])
MODEL_OUTPUT = torch.tensor([[[[0.5, -1.25], [1.75, 0.125]]]])
NOISE = torch.tensor([[[[-0.375, 0.625], [1.125, -0.875]]]])

SD = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "steps_offset": 1}
LINEAR = {}  # the classes' defaults: linear betas 0.0001..0.02, steps_offset 0


def configs():
    for base_name, base in (("sd", SD), ("linear", LINEAR)):
        for spacing in ("leading", "linspace", "trailing"):
            for prediction in ("epsilon", "v_prediction", "sample"):
                for kind in CLASSES:
                    if kind == "euler-a" and prediction == "sample":
                        continue  # diffusers raises NotImplementedError
                    config = dict(base, timestep_spacing=spacing, prediction_type=prediction)
                    if kind == "ddim":
                        config.update(clip_sample=False, set_alpha_to_one=False)
                    for steps in (4, 30):
                        yield kind, steps, config
    # Class defaults with no spacing given (linspace for Euler, leading for DDIM).
    for kind in CLASSES:
        yield kind, 10, {}
    # numpy's arange gives 62 trailing timesteps for 61 steps.
    for kind in CLASSES:
        yield kind, 61, dict(SD, timestep_spacing="trailing")
    yield "euler", 30, dict(SD, final_sigmas_type="sigma_min")
    yield "ddim", 4, dict(SD, clip_sample=True, clip_sample_range=1.0, set_alpha_to_one=True)
    yield "ddim", 4, dict(SD, clip_sample=True, clip_sample_range=0.5, set_alpha_to_one=False)
    for kind in CLASSES:
        yield kind, 10, dict(
            SD, rescale_betas_zero_snr=True, timestep_spacing="trailing", prediction_type="v_prediction"
        )
    betas = [0.0005 + 0.0002 * i for i in range(100)]
    for kind in CLASSES:
        yield kind, 7, {"num_train_timesteps": 100, "trained_betas": betas, "timestep_spacing": "trailing"}


def values(tensor):
    return [float(v) for v in tensor.flatten().tolist()]


def run(kind, steps, config):
    scheduler = CLASSES[kind].from_config(config)
    scheduler.set_timesteps(steps)
    timesteps = scheduler.timesteps
    count = len(timesteps)
    checked = sorted({0, 1, count - 1})
    checks = []
    for k, t in enumerate(timesteps):
        scaled = scheduler.scale_model_input(SAMPLE.clone(), t)
        extra = {"eta": 0.0} if kind == "ddim" else {}
        prev = scheduler.step(MODEL_OUTPUT.clone(), t, SAMPLE.clone(), **extra).prev_sample
        if k in checked:
            checks.append({"step": k, "scaled": values(scaled), "prev": values(prev)})
    return {
        "kind": kind,
        "steps": steps,
        "config": dict(config, _class_name=CLASSES[kind].__name__),
        "timesteps": values(timesteps.to(torch.float64)),
        "init_noise_sigma": float(scheduler.init_noise_sigma),
        "checks": checks,
    }


def main():
    ancestral_module.randn_tensor = lambda shape, **_kwargs: NOISE.clone().reshape(shape)
    cases = [run(kind, steps, config) for kind, steps, config in configs()]
    document = {
        "sample": values(SAMPLE),
        "model_output": values(MODEL_OUTPUT),
        "noise": values(NOISE),
        "cases": cases,
    }
    OUT.write_text(json.dumps(document, separators=(",", ":")) + "\n")
    print(f"wrote {len(cases)} cases to {OUT}")


if __name__ == "__main__":
    main()
