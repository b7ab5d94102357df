from dataclasses import asdict, dataclass, field
from typing import ClassVar, Literal

import pytest

from data_pipeline.config import (
    REQUIRED,
    ConfigError,
    StorageConfig,
    apply_overrides,
    from_dict,
    load_config,
)
from data_pipeline.digits import DigitsConfig


@dataclass
class Inner:
    lr: float = 1e-3
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    mode: Literal["a", "b"] = "a"


@dataclass
class Outer:
    name: str = REQUIRED
    steps: int = 10
    flag: bool = False
    path: str | None = None
    inner: Inner = field(default_factory=Inner)
    storage: StorageConfig = field(default_factory=StorageConfig)


def write(tmp_path, text):
    p = tmp_path / "cfg.yaml"
    p.write_text(text)
    return p


def test_yaml_and_overrides_build_typed_tree(tmp_path):
    p = write(tmp_path, "name: run1\nsteps: 5\ninner:\n  lr: 3e-4\n  mode: b\n")
    cfg = load_config(Outer, p, ["inner.betas=[0.5, 0.6]", "flag=true", "path=/x", "name=007"])
    assert cfg.name == "007"  # a str field keeps override text verbatim
    assert cfg.steps == 5 and cfg.flag is True and cfg.path == "/x"
    assert cfg.inner.lr == 3e-4 and isinstance(cfg.inner.lr, float)  # YAML 1.1 reads 3e-4 as str
    assert load_config(Outer, None, ["name=x", "inner.lr=1e-2"]).inner.lr == 0.01
    assert cfg.inner.betas == [0.5, 0.6] and cfg.inner.mode == "b"


def test_unknown_key_in_file_names_key_and_file(tmp_path):
    p = write(tmp_path, "name: x\ninner:\n  lrr: 3\n")
    with pytest.raises(ConfigError) as e:
        load_config(Outer, p)
    assert "inner.lrr" in str(e.value) and str(p) in str(e.value)
    assert "lr" in str(e.value)  # lists the valid keys


def test_unknown_key_on_command_line():
    with pytest.raises(ConfigError, match=r"command line: unknown key 'inner\.nope'"):
        load_config(Outer, None, ["name=x", "inner.nope=1"])
    with pytest.raises(ConfigError, match=r"'steps' has no sub-keys"):
        load_config(Outer, None, ["name=x", "steps.deep=1"])


@pytest.mark.parametrize(
    "text, key",
    [
        ("name: x\nsteps: ten\n", "steps"),
        ("name: x\nsteps: 1.5\n", "steps"),
        ("name: x\nflag: 1\n", "flag"),
        ("name: x\ninner: 3\n", "inner"),
        ("name: x\ninner:\n  betas: 0.9\n", "inner.betas"),
        ("name: x\ninner:\n  betas: [0.9, hi]\n", "inner.betas[1]"),
        ("name: x\ninner:\n  mode: c\n", "inner.mode"),
        ("name: 5\n", "name"),
    ],
)
def test_wrong_type_names_key_and_file(tmp_path, text, key):
    p = write(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        load_config(Outer, p)
    assert f"'{key}'" in str(e.value) and str(p) in str(e.value)


def test_wrong_type_on_command_line():
    with pytest.raises(ConfigError, match=r"command line: 'steps' expects int, got str 'many'"):
        load_config(Outer, None, ["name=x", "steps=many"])


def test_missing_required_value(tmp_path):
    p = write(tmp_path, "steps: 3\n")
    with pytest.raises(ConfigError, match=r"missing required value 'name'") as e:
        load_config(Outer, p)
    assert str(p) in str(e.value)


def test_malformed_override_and_bad_file(tmp_path):
    with pytest.raises(ConfigError, match="must look like key.sub=value"):
        apply_overrides(Outer(name="x"), ["steps"])
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(Outer, tmp_path / "absent.yaml")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(Outer, write(tmp_path, "- 1\n- 2\n"))
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(Outer, write(tmp_path, "a: [1,\n"))


def test_asdict_round_trip_across_a_boundary():
    cfg = load_config(Outer, None, ["name=x", "inner.lr=0.5", "storage.region=eu-west-1"])
    assert from_dict(Outer, asdict(cfg)) == cfg


def test_digits_config_requires_out():
    with pytest.raises(ConfigError, match="missing required value 'out'"):
        load_config(DigitsConfig)
    assert load_config(DigitsConfig, None, ["out=/tmp/x"]).image_size == 32


def test_presets_in_yaml_and_on_the_command_line(tmp_path):
    from trainer.config import TrainConfig
    from trainer.models.dalle import dalle_preset

    p = tmp_path / "t.yaml"
    p.write_text("name: x\ndalle:\n  preset: digits\n  depth: 3\n")
    cfg = load_config(TrainConfig, p)
    assert cfg.dalle == dalle_preset("digits", depth=3)  # explicit keys win over the preset
    cfg = load_config(TrainConfig, p, ["dalle.depth=2", "dalle.preset=tiny"])
    assert cfg.dalle == dalle_preset("tiny", depth=2)  # presets apply first, whatever the order
    with pytest.raises(ConfigError, match=r"'dalle.preset': unknown DALL-E preset 'huge'"):
        load_config(TrainConfig, p, ["dalle.preset=huge"])


@dataclass
class Opt:
    lr: float = 1e-3
    steps: int = 10


@dataclass
class Moved:
    """`Outer` after two keys moved: `inner.lr` to `opt.lr`, and `steps` into `opt`."""

    RENAMED: ClassVar[dict[str, str]] = {"inner.lr": "opt.lr", "steps": "opt.steps"}
    name: str = REQUIRED
    inner: Inner = field(default_factory=Inner)
    opt: Opt = field(default_factory=Opt)


def test_renamed_keys_fail_naming_the_new_key_and_migrate_on_request(tmp_path):
    p = write(tmp_path, "name: x\nsteps: 3\ninner:\n  lr: 0.5\n  mode: b\n")
    with pytest.raises(ConfigError) as e:
        load_config(Moved, p)
    assert str(p) in str(e.value) and "'inner.lr'" in str(e.value) and "'opt.lr'" in str(e.value)
    with pytest.raises(ConfigError, match=r"command line: unknown key 'steps'.* 'opt\.steps'"):
        load_config(Moved, None, ["name=x", "steps=3"])
    with pytest.raises(ConfigError, match=r"'inner\.lr'.* 'opt\.lr'"):
        load_config(Moved, None, ["name=x", "inner.lr=0.1"])
    # A config that an earlier version wrote (a run directory's) loads with `migrate`.
    cfg = load_config(Moved, p, migrate=True)
    assert (cfg.opt.lr, cfg.opt.steps, cfg.inner.mode) == (0.5, 3, "b")
    both = write(tmp_path, "name: x\nsteps: 3\nopt:\n  steps: 4\n")
    with pytest.raises(ConfigError, match="both 'steps' and its new name 'opt.steps'"):
        load_config(Moved, both, migrate=True)


def test_train_settings_moved_out_of_the_model_shapes(tmp_path):
    """dalle.text_insert_p and the other training-only keys of the shape sections (#13) live in
    `<objective>_train:`; the old keys are errors naming the new ones; old run configs load."""
    from dataclasses import fields
    from pathlib import Path

    from trainer.config import TrainConfig

    with pytest.raises(ConfigError, match=r"'dalle\.text_insert_p'.* 'dalle_train\.text_insert_p'"):
        load_config(TrainConfig, None, ["name=x", "dalle.text_insert_p=0.5"])
    sections = {f.name for f in fields(TrainConfig)}
    cfg = TrainConfig(name="x")
    for old, new in TrainConfig.RENAMED.items():
        (old_sec, key), (new_sec, new_key) = old.split("."), new.split(".")
        assert key == new_key and new_sec == f"{old_sec}_train" and new_sec in sections
        assert hasattr(getattr(cfg, new_sec), key) and not hasattr(getattr(cfg, old_sec), key)
    old_run = write(
        tmp_path,
        "name: x\nobjective: vqgan\nvqgan:\n  n_embed: 64\n  disc_start: 7\n"
        "faults:\n  kill_at_step: 0\n  kill_marker: ''\n",  # replaced keys: dropped
    )
    cfg = load_config(TrainConfig, old_run, migrate=True)
    assert (cfg.vqgan.n_embed, cfg.vqgan_train.disc_start) == (64, 7)
    assert cfg.faults.kill_at_steps == [] and cfg.faults.marker_dir == ""
    with pytest.raises(ConfigError, match=r"'faults\.kill_at_step'.* 'faults\.kill_at_steps'"):
        load_config(TrainConfig, None, ["name=x", "faults.kill_at_step=3"])
    with pytest.raises(ConfigError, match=r"'faults\.kill_marker'.* 'faults\.marker_dir'"):
        load_config(TrainConfig, write(tmp_path, "name: x\nfaults:\n  kill_marker: m\n"))
    configs = Path(__file__).resolve().parents[2] / "jobs" / "configs"
    moved = {"dvae": "tau_steps", "vqgan": "disc_start", "klae": "scale_batches"}
    for objective, key in moved.items():  # the shipped configs set them in the new sections
        cfg = load_config(TrainConfig, configs / f"{objective}_digits.yaml")
        assert getattr(getattr(cfg, f"{objective}_train"), key) > 0
    assert load_config(TrainConfig, configs / "dalle_digits.yaml").dalle_train.text_insert_p > 0


def test_shipped_configs_load():
    """Every YAML under jobs/configs/ is valid for its job."""
    from pathlib import Path

    from trainer.config import TrainConfig

    configs = sorted(
        (Path(__file__).resolve().parents[2] / "jobs" / "configs").glob("dalle_*.yaml")
    )
    assert len(configs) >= 5
    for path in configs:
        cfg = load_config(TrainConfig, path)
        assert cfg.dalle.seq_len > 0, path


@pytest.mark.parametrize(
    ("avx512_bf16", "amx", "explicit", "want"),
    [
        (True, False, "auto", "bf16"),
        (False, True, "auto", "bf16"),
        (False, False, "auto", "fp32"),  # AVX2-only CPU: bf16 would be emulated
        (False, False, "bf16", "bf16"),  # an explicit choice is kept (the loop warns)
        (True, False, "fp32", "fp32"),
    ],
)
def test_auto_precision_follows_the_cpu(monkeypatch, avx512_bf16, amx, explicit, want):
    import torch

    from trainer.config import TrainConfig
    from trainer.engine import build_deepspeed_config, native_bf16, resolve_precision

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    assert native_bf16() == (avx512_bf16 or amx)
    assert resolve_precision(explicit) == want
    cfg = load_config(TrainConfig, None, ["name=x", f"engine.precision={explicit}"])
    ds = build_deepspeed_config(cfg, world_size=1)
    assert ds.get("bf16", {}).get("enabled", False) == (want == "bf16")
    assert "fp16" not in ds


def test_a_fault_kill_without_a_marker_dir_is_refused():
    """A kill that no marker records would repeat in every restarted attempt; the driver
    checks it before any worker starts (trainer.launch) and the workers again."""
    from trainer.config import TrainConfig
    from trainer.faults import FaultInjector, check_faults

    cfg = load_config(TrainConfig, None, ["name=x", "faults.kill_in_save_at_step=3"])
    with pytest.raises(ValueError, match="faults.marker_dir is empty"):
        check_faults(cfg.faults)
    with pytest.raises(ValueError, match="faults.marker_dir is empty"):
        FaultInjector(cfg)
    ok = load_config(
        TrainConfig, None, ["name=x", "faults.kill_at_steps=[3]", "faults.marker_dir=m"]
    )
    check_faults(ok.faults)
