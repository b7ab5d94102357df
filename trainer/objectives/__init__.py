"""Objectives: what differs between recipes is the model and `loss(model, batch)`, not the loop.

An objective provides:
    build_model() -> nn.Module                 single-device module (the engine distributes it)
    dataset()     -> ray.data.Dataset          the rows it trains on
    loss(engine, batch) -> (loss, metrics)     one micro-batch
    tokens_in_batch(batch), flops_per_token()  for throughput and MFU
    export_state_dict(engine) -> dict | None   consolidated weights for safetensors (rank 0)

Optional hooks (the loop calls them when present):
    on_step(step)                              before each micro-batch: schedules follow the step
    log_images(engine, batch) -> {name: uint8 (H, W, 3)}   at log steps (eval mode, no grad)
    callbacks                                  loop callbacks (trainer/callbacks.py), e.g. the
                                               EMA, whose per-rank state is checkpointed
    write_export(local_dir, weights)           an ecosystem layout beside model.safetensors
    batch_regrouper(world) -> fn | None        maps each epoch's batch stream (ldm buckets)

Several parts, an optimizer each (a GAN; see trainer/engine.py): declare `parts = ("model",
"discriminator")` and `build_parts() -> {part: nn.Module}` instead of `build_model`; optionally
`optimizer_section(part)` and `active_parts(step)`. Such objectives receive the dict of engines by
part (`loss(engines, batch, part)`, `log_images(engines, batch)`, `export_state_dict(engines)`).

`Objective` states the required part as a typed Protocol; `tests/trainer/test_objectives.py`
checks every registered objective against it. The registry maps the config's `objective:` name to
a builder (no import strings in YAML).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

from trainer.config import TrainConfig


@runtime_checkable
class Objective(Protocol):
    """What every objective provides (single-part: `build_model`; several parts: `parts` and
    `build_parts` instead, see above)."""

    name: str

    def dataset(self) -> Any: ...  # ray.data.Dataset

    def loss(self, engine: Any, batch: dict, *part: str) -> tuple[Any, dict]: ...

    def tokens_in_batch(self, batch: dict) -> int: ...

    def flops_per_token(self) -> float: ...

    def export_state_dict(self, engine: Any) -> dict | None: ...


def _dalle(cfg: TrainConfig):
    from trainer.objectives.dalle import DalleObjective

    return DalleObjective(cfg)


def _clip(cfg: TrainConfig):
    from trainer.objectives.clip import ClipObjective

    return ClipObjective(cfg)


def _dvae(cfg: TrainConfig):
    from trainer.objectives.dvae import DvaeObjective

    return DvaeObjective(cfg)


def _vqgan(cfg: TrainConfig):
    from trainer.objectives.vqgan import VqganObjective

    return VqganObjective(cfg)


def _klae(cfg: TrainConfig):
    from trainer.objectives.klae import KlaeObjective

    return KlaeObjective(cfg)


def _ldm(cfg: TrainConfig):
    from trainer.objectives.ldm import LdmObjective

    return LdmObjective(cfg)


OBJECTIVES: dict[str, Callable] = {
    "dalle": _dalle,
    "clip": _clip,
    "dvae": _dvae,
    "vqgan": _vqgan,
    "klae": _klae,
    "ldm": _ldm,
}


def build_objective(cfg: TrainConfig) -> Objective:
    try:
        return OBJECTIVES[cfg.objective](cfg)
    except KeyError:
        raise ValueError(
            f"unknown objective {cfg.objective!r} (known: {', '.join(sorted(OBJECTIVES))})"
        ) from None
