"""Under FSDP2 with bf16 parameters the model gets its inputs as given: the timestep, the time
modulation e0 and the RoPE tables reach the blocks in fp32 (cast_forward_inputs=False). A real
1-process gloo group in a subprocess, the real model and the real parallelize()."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = r"""
import json, torch
from training.config import load_config
from training.distributed import destroy, init_distributed
from training.parallelize import parallelize
from apt_core.backbone import WanCond, build_flow_model

cfg = load_config("configs/tiny_cpu.toml", ["--parallel.mixed_precision=bf16", "--parallel.attention=auto"])
world = init_distributed("cpu", "gloo")
model = build_flow_model("tiny", device="meta")
full = build_flow_model("tiny").state_dict()
model = parallelize(model, full, cfg.parallel, world)
seen = {}
def root_hook(module, args):
    seen["t"] = str(args[1].dtype)
def block_hook(module, args):
    x, e0, context, rope = args
    seen["block"] = {"x": str(x.dtype), "e0": str(e0.dtype), "rope_cos": str(rope[0].dtype),
                     "weight": str(module.self_attn.q.weight.dtype)}
model.register_forward_pre_hook(root_hook)
model.blocks[1].register_forward_pre_hook(block_hook)
x = torch.randn(2, 16, 1, 4, 4)
t = torch.tensor([0.999, 0.5])
out = model(x, t, WanCond(torch.randn(2, 5, 32)))
seen["out"] = str(out.dtype)
seen["finite"] = bool(torch.isfinite(out).all())
seen["attention"] = sorted({m.attention_backend for m in model.modules() if hasattr(m, "attention_backend")})
print("RESULT " + json.dumps(seen))
destroy()
"""


def _run(script: str) -> str:
    """Run `script` in a fresh interpreter (its own 1-process gloo group); return its stdout."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env={**env, "PYTHONPATH": str(ROOT)},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_bf16_fsdp_keeps_the_timestep_modulation_and_rope_in_fp32():
    stdout = _run(SCRIPT)
    seen = json.loads(next(ln for ln in stdout.splitlines() if ln.startswith("RESULT "))[7:])
    assert seen["block"]["weight"] == "torch.bfloat16"  # FSDP's compute dtype reached the block
    assert seen["block"]["x"] == "torch.bfloat16"  # the tokens come out of a bf16 patch embedding
    assert seen["t"] == "torch.float32", seen  # 0.999 in bf16 would be 1.0
    assert seen["block"]["e0"] == "torch.float32" and seen["block"]["rope_cos"] == "torch.float32", seen
    assert seen["out"] == "torch.float32" and seen["finite"]
    assert seen["attention"] == ["auto"]  # parallel.attention reached every attention layer


EXACT_SCRIPT = r"""
import torch
from training.config import load_config
from training.distributed import destroy, init_distributed
from training.parallelize import parallelize
from apt_core.backbone import build_flow_model
from apt_core.discriminator import APTDiscriminator
from apt_core.trainer import APTConfig, APTTrainer, make_rmsprop

cfg = load_config("configs/tiny_cpu.toml")
world = init_distributed("cpu", "gloo")
gen = build_flow_model("tiny")
D = APTDiscriminator(build_flow_model("tiny", device="meta"), copy_backbone=False)
D = parallelize(D, APTDiscriminator(build_flow_model("tiny")).state_dict(), cfg.parallel, world)
try:
    APTTrainer(gen, D, make_rmsprop(gen.parameters(), 1e-4), make_rmsprop(D.parameters(), 1e-4), APTConfig(r1_mode="exact"))
except ValueError as err:
    print("REFUSED " + str(err))
APTTrainer(gen, D, make_rmsprop(gen.parameters(), 1e-4), make_rmsprop(D.parameters(), 1e-4), APTConfig())
print("APPROX OK")
destroy()
"""


def test_exact_r1_with_an_fsdp_discriminator_is_refused_by_name():
    stdout = _run(EXACT_SCRIPT)
    assert "REFUSED r1_mode='exact' does not run with an FSDP2-sharded discriminator" in stdout
    assert "APPROX OK" in stdout
