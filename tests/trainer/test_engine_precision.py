"""The engine's mixed-precision modes and its model-state accounting, on real DeepSpeed engines
(one process, world size 1, gloo; a subprocess keeps DeepSpeed's process group out of pytest)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

# Writes {"autocast": {...}, "bytes_per_param": {...}} to argv[1].
SCRIPT = """
import json, sys, torch, torch.nn as nn, torch.distributed as dist
import deepspeed
dist.init_process_group("gloo", init_method="tcp://127.0.0.1:" + sys.argv[2], rank=0, world_size=1)
deepspeed.init_distributed(dist_backend="gloo")
torch.set_num_threads(1)
from data_pipeline.config import load_config
from data_pipeline.columns import IMAGE_CODES, TEXT_TOKENS
from trainer.config import TrainConfig
from trainer.engine import engine_state_bytes, initialize
from trainer.loop import compute_losses
from trainer.models.dalle import compute_dalle_loss
from trainer.objectives.dalle import DalleObjective
out = {}

# 1. engine.autocast: three steps of the engine (ZeRO-0, one rank) against the plain AMP loop:
# fp32 weights, forward + loss under bf16 autocast, fused AdamW, clipping at 1.0.
cfg = load_config(TrainConfig, None, ["name=t", "engine.zero_stage=0", "engine.precision=bf16",
                                      "engine.autocast=true", "optimizer.weight_decay=0",
                                      "data.batch_size=2"])
objective = DalleObjective(cfg)
torch.manual_seed(0)
engine, _ = initialize(cfg, objective.build_model, 1)
torch.manual_seed(0)
bare = objective.build_model()
opt = torch.optim.AdamW(bare.parameters(), lr=cfg.optimizer.lr, betas=tuple(cfg.optimizer.betas),
                        eps=cfg.optimizer.eps, weight_decay=0.0, fused=True)
m = cfg.dalle
g = torch.Generator().manual_seed(1)
batches = [{TEXT_TOKENS: torch.randint(1, m.text_vocab, (2, m.text_len), generator=g),
            IMAGE_CODES: torch.randint(0, m.image_vocab, (2, m.image_grid ** 2), generator=g)}
           for _ in range(3)]
for batch in batches:
    losses, _ = compute_losses(cfg, objective, {"model": engine}, batch, ["model"])
    engine.backward(losses["model"])
    engine.step()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        text, image = batch[TEXT_TOKENS], batch[IMAGE_CODES]
        tl, il = bare(text, image)
        t = cfg.dalle_train
        loss, _ = compute_dalle_loss(tl, il, bare.internal_text(text), image,
                                     text_weight=t.text_loss_weight,
                                     image_weight=t.image_loss_weight)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(bare.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
# The same steps without autocast: how far fp32 math lands from the bf16 one.
torch.manual_seed(0)
fp32 = objective.build_model()
opt32 = torch.optim.AdamW(fp32.parameters(), lr=cfg.optimizer.lr, betas=tuple(cfg.optimizer.betas),
                          eps=cfg.optimizer.eps, weight_decay=0.0, fused=True)
for batch in batches:
    text, image = batch[TEXT_TOKENS], batch[IMAGE_CODES]
    tl, il = fp32(text, image)
    t = cfg.dalle_train
    loss, _ = compute_dalle_loss(tl, il, fp32.internal_text(text), image,
                                 text_weight=t.text_loss_weight, image_weight=t.image_loss_weight)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(fp32.parameters(), 1.0)
    opt32.step()
    opt32.zero_grad(set_to_none=True)
e = dict(engine.module.named_parameters())
b = dict(bare.named_parameters())
f = dict(fp32.named_parameters())
out["autocast"] = {
    "dtypes": sorted({str(p.dtype) for p in e.values()}),
    "backward_allreduce": engine.enable_backward_allreduce,
    "engine_vs_bare": max((e[k].detach() - b[k].detach()).abs().max().item() for k in e),
    "bare_vs_fp32": max((b[k].detach() - f[k].detach()).abs().max().item() for k in e),
}

# 2. Model state held per parameter after two steps, by ZeRO stage and precision.
out["bytes_per_param"] = {}
for stage, prec in [(0, "fp32"), (0, "bf16"), (1, "fp32"), (1, "bf16"), (3, "fp32"), (3, "bf16")]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 256), nn.LayerNorm(256), nn.Linear(256, 64))
    n = sum(p.numel() for p in model.parameters())
    ds = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
          "gradient_clipping": 1.0, "zero_optimization": {"stage": stage},
          "zero_allow_untested_optimizer": True, "steps_per_print": 10**9}
    if prec == "bf16":
        ds["bf16"] = {"enabled": True}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    eng, *_ = deepspeed.initialize(model=model, optimizer=opt, config=ds, dist_init_required=False)
    dtype = torch.bfloat16 if prec == "bf16" else torch.float32
    for _ in range(2):
        eng.backward(eng(torch.randn(2, 64, dtype=dtype)).float().pow(2).mean())
        eng.step()
    out["bytes_per_param"][f"z{stage}_{prec}"] = engine_state_bytes(eng) / n
json.dump(out, open(sys.argv[1], "w"))
"""


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    from tests.conftest import free_port

    path = tmp_path_factory.mktemp("precision") / "out.json"
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "LOCAL_RANK": "0", "RANK": "0", "WORLD_SIZE": "1"}
    subprocess.run(
        [sys.executable, "-c", SCRIPT, str(path), str(free_port())], check=True, env=env
    )
    return json.loads(path.read_text())


@pytest.mark.slow
def test_autocast_engine_takes_the_plain_amp_loops_steps(measured):
    """engine.autocast=true keeps fp32 weights and runs the forward + loss under bf16 autocast:
    after three steps its weights match the plain PyTorch AMP loop's (DeepSpeed clips with its
    own norm, hence a tolerance) and are far from the fp32 loop's, so autocast is really on. One
    rank at ZeRO-0 skips DeepSpeed's gradient all-reduce pass, and the gradients still arrive."""
    a = measured["autocast"]
    assert a["dtypes"] == ["torch.float32"]
    assert a["backward_allreduce"] is False
    assert a["engine_vs_bare"] < 1e-5
    assert a["bare_vs_fp32"] > 100 * max(a["engine_vs_bare"], 1e-7)


@pytest.mark.slow
def test_model_state_bytes_follow_the_zero_accounting(measured):
    """`engine_state_bytes` per parameter on one rank, from the ZeRO paper's accounting with
    AdamW (two fp32 moments, 8 B): fp32 weights 4 + moments 8 (ZeRO-0; gradients are freed by
    the step); DeepSpeed's bf16 mode adds bf16 working weights 2 to fp32 master 4 + moments 8;
    ZeRO-1 keeps its fp32 partition as a copy beside fp32 weights (4 + 4 + 8); ZeRO-3 also
    keeps the gradient partition, in the working dtype (fp32: 4+4+8+4, bf16: 2+4+8+2). Tiny
    padding to DeepSpeed's alignment is allowed."""
    want = {"z0_fp32": 12, "z0_bf16": 14, "z1_fp32": 16, "z1_bf16": 14, "z3_fp32": 20, "z3_bf16": 16}
    got = measured["bytes_per_param"]
    assert got.keys() == want.keys()
    for k, v in want.items():
        assert v <= got[k] < v + 0.01, (k, got[k])
