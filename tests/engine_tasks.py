"""A tiny Task for the engine tests, and a CLI to train it in a subprocess (kill/resume, DDP).

The task fits a noisy linear map with a small MLP (BatchNorm for buffers, dropout for torch
RNG use, Adam + a step LR schedule); its data come only from the engine's batch generator.

    python tests/engine_tasks.py --run-dir RUN --weights-out W.safetensors [engine options]
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import numpy as np
import torch
import typer
from torch import nn

from emsynth.config import StrictModel
from emsynth.engine import EngineConfig, StepContext, Task, save_weights, train, unwrap
from emsynth.engine.cli import TrainOptions, train_options
from emsynth.engine.task import step_context

FEATURES = 4


class TinyConfig(StrictModel):
    hidden: int = 8
    batch: int = 16
    batchnorm: bool = True
    dropout: float = 0.1
    lr: float = 0.02
    step_sleep: float = 0.0  # seconds slept per step, to make a subprocess slow enough to kill
    # Also draw one batch per extra seed and train on the concatenation: emulates DDP's
    # averaged gradient over ranks seeded seed+1, seed+2, ... in a single process.
    emulate_ranks: int = 1
    engine: EngineConfig = EngineConfig(steps=30, checkpoint_every=10, log_every=5, val_every=0,
                                        image_every=0)


class TinyTask(Task):
    def __init__(self, cfg: TinyConfig, val_consumes_rng: bool = True):
        self.cfg = cfg
        self.batch_size = cfg.batch
        self.val_consumes_rng = val_consumes_rng
        self.losses: list[float] = []  # every loss returned, to check the logs against
        self.steps_taken = 0  # checkpointed through extra_state
        self.image_steps: list[int] = []
        true_rng = np.random.default_rng(1234)
        self.true_map = torch.from_numpy(true_rng.standard_normal((FEATURES, 1))).float()
        self._emulated_rngs = [np.random.default_rng(cfg.engine.seed + rank)
                               for rank in range(1, cfg.emulate_ranks)]

    def task_config(self) -> dict:
        return self.cfg.model_dump(include={"hidden", "batch", "batchnorm", "dropout", "lr"})

    def setup(self, ctx: StepContext) -> None:
        hidden = self.cfg.hidden
        net = nn.Sequential(
            nn.Linear(FEATURES, hidden),
            nn.BatchNorm1d(hidden) if self.cfg.batchnorm else nn.Identity(),
            nn.ReLU(), nn.Dropout(self.cfg.dropout), nn.Linear(hidden, 1),
        ).to(ctx.device)
        self.modules = {"net": ctx.wrap(net)}
        opt = torch.optim.Adam(self.modules["net"].parameters(), lr=self.cfg.lr)
        self.optimizers = {"opt": opt}
        self.schedulers = {"lr": torch.optim.lr_scheduler.StepLR(opt, step_size=7, gamma=0.5)}

    def _draw(self, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.from_numpy(rng.standard_normal((self.cfg.batch, FEATURES))).float()
        noise = torch.from_numpy(rng.standard_normal((self.cfg.batch, 1))).float()
        return x, x @ self.true_map + 0.1 * noise

    def sample_batch(self, rng: np.random.Generator):
        parts = [self._draw(rng)] + [self._draw(extra) for extra in self._emulated_rngs]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])

    def train_step(self, batch, ctx: StepContext) -> dict[str, float]:
        if self.cfg.step_sleep:
            import time

            time.sleep(self.cfg.step_sleep)
        x, y = (t.to(ctx.device) for t in batch)
        net, opt = self.modules["net"], self.optimizers["opt"]
        with ctx.autocast():
            pred = net(x)
        loss = nn.functional.mse_loss(pred.float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        self.steps_taken += 1
        self.losses.append(loss.item())
        return {"loss": loss.item(), "x_mean": x.mean().item()}

    def validate(self, ctx: StepContext) -> dict[str, float]:
        net = unwrap(self.modules["net"])
        net.eval()
        if self.val_consumes_rng:  # the engine must isolate this from the training streams
            torch.rand(3)
            np.random.rand()
        x, y = (t.to(ctx.device) for t in self._draw(np.random.default_rng(99)))
        return {"mse": nn.functional.mse_loss(net(x).float(), y).item()}

    def log_images(self, step: int, writer, out_dir, ctx: StepContext) -> None:
        import imageio.v3 as iio

        self.image_steps.append(step)
        image = (np.linspace(0, 255, 64).reshape(8, 8)).astype(np.uint8)
        writer.add_image("ramp", image[None], global_step=step)
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        iio.imwrite(Path(out_dir) / f"ramp_{step:06d}.png", image)

    def extra_state(self) -> dict:
        return {"steps_taken": self.steps_taken}

    def load_extra_state(self, state: dict) -> None:
        self.steps_taken = int(state["steps_taken"])


def tiny(**engine) -> TinyConfig:
    """A small deterministic test config on the CPU; one thread keeps it fast on shared cores."""
    base = {"steps": 20, "checkpoint_every": 10, "log_every": 5, "val_every": 0,
            "image_every": 0, "deterministic": True, "num_threads": 1, "device": "cpu"}
    return TinyConfig(engine=EngineConfig(**{**base, **engine}))


def run_task(cfg: TinyConfig, run_dir, resume: bool = True, **task_args) -> tuple[TinyTask, dict]:
    task = TinyTask(cfg, **task_args)
    return task, train(task, cfg.engine, run_dir, resume=resume)


def weights(task: TinyTask) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in unwrap(task.modules["net"]).state_dict().items()}


def assert_bitwise_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key, value in a.items():
        assert torch.equal(value, b[key]), f"{key} differs"


app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


@app.command()
@train_options()
def main(
    opts: TrainOptions,
    weights_out: Annotated[Path, typer.Option(help="Where to save the final weights; under "
                                              "torchrun each rank writes <stem>_rank<R>.safetensors.")],
) -> None:
    """Train the tiny engine-test task."""
    cfg = opts.load(TinyConfig)
    task = TinyTask(cfg)
    result = train(task, cfg.engine, opts.run_dir, resume=opts.resume)
    ctx = step_context(cfg.engine)
    if ctx.world_size > 1:
        weights_out = weights_out.with_name(f"{weights_out.stem}_rank{ctx.rank}"
                                            f"{weights_out.suffix}")
    save_weights(weights_out, task.modules, {"steps_taken": task.steps_taken, **result})
    print(f"stop_reason={result['stop_reason']} step={result['step']}", file=sys.stderr)


if __name__ == "__main__":
    app()
