"""Every registered objective satisfies the `Objective` protocol and builds its model(s) one way:
`build_model()` alone, or `parts` + `build_parts()` with the first part named "model"."""

from __future__ import annotations

import pytest

from data_pipeline.config import load_config
from trainer.config import TrainConfig
from trainer.engine import MODEL, objective_parts
from trainer.objectives import OBJECTIVES, Objective, build_objective


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_registered_objective_follows_the_protocol(name, tmp_path):
    cfg = load_config(TrainConfig, None, [f"name={name}", f"objective={name}",
                                          f"checkpoint.storage_path={tmp_path}"])  # fmt: skip
    objective = build_objective(cfg)
    assert isinstance(objective, Objective), name
    assert objective.name == name
    parts = objective_parts(objective)
    assert parts[0] == MODEL
    if len(parts) == 1:
        assert callable(getattr(objective, "build_model", None)), name
    else:
        assert callable(getattr(objective, "build_parts", None)), name


def test_protocol_rejects_an_object_missing_a_required_method():
    class NoLoss:
        name = "x"

        def dataset(self): ...

        def tokens_in_batch(self, batch): ...

        def flops_per_token(self): ...

        def export_state_dict(self, engine): ...

    assert not isinstance(NoLoss(), Objective)


def test_unknown_objective_names_the_known_ones(tmp_path):
    cfg = load_config(TrainConfig, None, ["name=x", f"checkpoint.storage_path={tmp_path}"])
    cfg.objective = "nope"
    with pytest.raises(ValueError, match="unknown objective 'nope' .*known: clip, dalle"):
        build_objective(cfg)
