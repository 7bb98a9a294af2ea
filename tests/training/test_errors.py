"""Errors early and by name (docs/TRAINING.md "What happens when things go wrong"): every path checked
before any model is built, LoRA that cannot train refused, a damaged newest checkpoint named and
skipped, a finished run reported instead of resumed, files written with the umask's mode."""

from __future__ import annotations

import json
import os
import stat
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from apt_core.backbone import build_flow_model
from apt_core.lora import inject_lora
from apt_core.models.io import save_wan
from bench.trainer_scaling import write_synthetic_shards
from tests.single_process import single_process_env
from training.__main__ import main
from training.checkpoint import verify
from training.config import ConfigError, load_config
from training.distributed import destroy
from training.loop import RunComplete, train

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "configs/tiny_cpu.toml"
TEACHER = ["--run.stage=teacher", "--monitor.val_every=0", "--monitor.log_every=1", "--checkpoint.keep=0"]


def _train(monkeypatch, *overrides: str, resume: bool | str = False) -> dict:
    single_process_env(monkeypatch)
    ok = False
    try:
        result = train(load_config(TINY, list(overrides)), resume=resume)
        ok = True
    finally:
        destroy(barrier=ok)
    return result


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("errors")
    torch.manual_seed(3)
    seeded = build_flow_model("tiny")  # Wan's init: the output head is all zero
    trained = build_flow_model("tiny")
    with torch.no_grad():
        trained.head.head.weight.normal_(std=0.02)
    save_file({"x": torch.zeros(2)}, str(root / "no_context.safetensors"))
    good = root / "good.safetensors"
    save_wan(trained, good)
    (root / "truncated.safetensors").write_bytes(good.read_bytes()[:200])
    (root / "empty_dir").mkdir()
    return {"data": write_synthetic_shards(root / "shards", num=8), "zero_head": save_wan(seeded, root / "zero_head.safetensors"),
            "good": good, "root": root}


# ----------------------------------------------------------------------------------------------
# Paths: checked before any model is built
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "key, value, match",
    [
        ("apt.video.data", "{root}/vidoes", r"apt.video.data = '{root}/vidoes': shard directory .*vidoes does not exist"),
        ("data.path", "{root}/empty_dir", r"data.path = '{root}/empty_dir': .*no index parts"),
        ("model.init_from", "{root}/missing.safetensors", r"model.init_from = '{root}/missing.safetensors': file not found"),
        ("model.init_from", "{root}/truncated.safetensors", r"model.init_from = '{root}/truncated.safetensors': not a readable"),
        ("apt.generator_init", "{root}/empty_dir", r"apt.generator_init = '{root}/empty_dir': file not found \(it is a directory\)"),
        ("monitor.val_prompts", "{root}/no_context.safetensors", r"monitor.val_prompts = .*has no 'context' tensor"),
    ],
)
def test_bad_paths_fail_before_any_model_is_built(monkeypatch, files, tmp_path, key, value, match):
    root = str(files["root"])
    value, match = value.format(root=root), match.format(root=root)
    run_dir = tmp_path / "run"
    args = [f"--run.dir={run_dir}", f"--data.path={files['data']}", f"--{key}={value}"]
    t0 = time.perf_counter()
    with pytest.raises(ConfigError, match=match):
        _train(monkeypatch, *args)
    assert time.perf_counter() - t0 < 1.0  # not after the image phase (which trains, validates, exports)
    assert not run_dir.exists()  # nothing was written, nothing was built


def test_cli_reports_a_bad_path_as_a_config_error(monkeypatch, files, tmp_path, capsys):
    single_process_env(monkeypatch)
    code = main(["--config", str(TINY), f"--run.dir={tmp_path / 'run'}", f"--data.path={files['data']}",
                 f"--apt.video.data={tmp_path / 'typo'}"])
    err = capsys.readouterr().err
    assert code == 2 and f"apt-train: config error: apt.video.data = '{tmp_path / 'typo'}'" in err
    assert "Traceback" not in err and not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------------------------
# LoRA that cannot train
# ----------------------------------------------------------------------------------------------


def test_lora_on_a_zero_head_is_refused(monkeypatch, files, tmp_path):
    # the premise: with Wan's zero-initialised head frozen, every LoRA gradient is exactly zero
    model = build_flow_model("tiny")
    assert not model.head.head.weight.any()
    model.requires_grad_(False)
    inject_lora(model, 4, None)
    x, t, ctx = torch.randn(2, 16, 1, 4, 4), torch.rand(2), torch.randn(2, 8, 32)
    from apt_core.backbone import WanCond

    model(x, t, WanCond(ctx)).pow(2).mean().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None and not g.any() for g in grads)

    common = [f"--run.dir={tmp_path / 'run'}", f"--data.path={files['data']}", "--model.lora_rank=4"]
    with pytest.raises(ConfigError, match=r"model.lora_rank = 4 on a seeded init \(model.init_from = ''\)"):
        _train(monkeypatch, *common)
    with pytest.raises(ConfigError, match=rf"apt.generator_init = '{files['zero_head']}', whose output head .* all zero"):
        _train(monkeypatch, *common, f"--model.init_from={files['good']}", f"--apt.generator_init={files['zero_head']}")
    assert not (tmp_path / "run").exists()
    # trained weights: accepted, and the adapters do move
    result = _train(monkeypatch, *common, *TEACHER, "--run.steps=2", "--teacher.lr=1e-2", f"--model.init_from={files['good']}")
    lora = load_file(result["export"]["lora"])
    ups = [v for k, v in lora.items() if k.endswith("lora_up.weight")]
    assert ups and any(v.any() for v in ups)


# ----------------------------------------------------------------------------------------------
# Finished runs and damaged checkpoints
# ----------------------------------------------------------------------------------------------


def test_finished_run_says_so_and_more_steps_train_on(monkeypatch, files, tmp_path, capsys):
    args = [f"--run.dir={tmp_path}", f"--data.path={files['data']}", *TEACHER, "--checkpoint.every=1"]
    _train(monkeypatch, *args, "--run.steps=2")
    with pytest.raises(RunComplete, match=rf"{tmp_path} is already complete at step 2 .*use --run.dir=<new dir> for a new "
                                          r"run, raise run.steps \(with --overwrite to replace its export\) to train "
                                          r"on, or --export-only"):
        _train(monkeypatch, *args, "--run.steps=2")
    single_process_env(monkeypatch)
    assert main(["--config", str(TINY), *args, "--run.steps=2"]) == 1
    assert "already complete at step 2" in capsys.readouterr().err
    more = _train(monkeypatch, *args, "--run.steps=3", "--export.overwrite=true")
    assert more["resumed_from"].endswith("step-2") and more["step"] == 3
    # at its last step but without its export (stopped by a signal there, or killed while exporting): export it
    Path(more["export"]["model"]).unlink()
    again = _train(monkeypatch, *args, "--run.steps=3")
    assert again["step"] == 3 and Path(again["export"]["model"]).is_file()


def test_damaged_newest_checkpoint_is_named_and_skipped(monkeypatch, files, tmp_path):
    args = [f"--run.dir={tmp_path}", f"--data.path={files['data']}", *TEACHER, "--checkpoint.every=2", "--run.steps=4"]
    first = _train(monkeypatch, *args)
    clean = load_file(first["export"]["model"])
    Path(first["export"]["model"]).unlink()
    shard = tmp_path / "checkpoints/step-4/__0_0.distcp"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])  # a truncated copy / full disk
    assert verify(tmp_path / "checkpoints/step-2") == []
    assert any(str(shard) in p and "truncated" in p for p in verify(tmp_path / "checkpoints/step-4"))

    with pytest.raises(ValueError, match=rf"--resume {tmp_path}/checkpoints/step-4: the checkpoint is damaged: {shard}"):
        _train(monkeypatch, *args, resume=str(tmp_path / "checkpoints/step-4"))
    with pytest.warns(RuntimeWarning, match=rf"checkpoint {tmp_path}/checkpoints/step-4 is damaged \({shard} has"):
        again = _train(monkeypatch, *args)
    assert again["resumed_from"] == str(tmp_path / "checkpoints/step-2") and again["step"] == 4
    events = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    warned = [e for e in events if e.get("event") == "warning" and str(shard) in e["message"]]
    assert len(warned) == 1 and warned[0]["step"] == 2
    # steps 3-4 were retrained from step 2 (same seeds): the same weights as the undamaged run
    redone = load_file(again["export"]["model"])
    assert all(torch.equal(clean[k], redone[k]) for k in clean)
    assert verify(tmp_path / "checkpoints/step-4") == []  # re-saved whole


# ----------------------------------------------------------------------------------------------
# File modes
# ----------------------------------------------------------------------------------------------


def test_run_files_get_the_umask_mode(monkeypatch, tmp_path):
    old = os.umask(0o022)
    try:
        data = write_synthetic_shards(tmp_path / "shards", num=8)
        _train(monkeypatch, f"--run.dir={tmp_path / 'run'}", f"--data.path={data}", *TEACHER, "--run.steps=1",
               "--monitor.val_every=1", "--monitor.val_seeds=[0]")
    finally:
        os.umask(old)
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    kinds = {p.suffix for p in written}
    assert {".safetensors", ".distcp", ".json", ".toml", ".mp4", ".png"} <= kinds
    assert (tmp_path / "run/export/teacher.safetensors").is_file()
    assert list((tmp_path / "run/samples").rglob("samples.safetensors"))
    modes = {str(p.relative_to(tmp_path)): oct(stat.S_IMODE(p.stat().st_mode)) for p in written}
    assert all(m == "0o644" for m in modes.values()), modes


def test_readme_sequence_starts_a_new_run_for_each_command():
    """README's headless commands run one after another (checked by hand, 2 min here): no command may
    land on the finished run dir of an earlier one, or it would stop with 'already complete'."""
    import shlex

    from training.__main__ import parse_args

    text = (ROOT / "README.md").read_text()
    block = text.split("## Headless training", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    dirs = []
    for line in block.replace("\\\n", " ").splitlines():  # continued lines joined
        argv = shlex.split(line, comments=True)
        if not argv or argv[0] not in ("apt-train", "torchrun") or "tiny_cpu.toml" not in line:
            continue
        argv = argv[argv.index("--config"):]
        args, overrides = parse_args(argv)
        dirs.append(load_config(ROOT / args.config, overrides).run.dir)
    assert len(dirs) == 2 and len(set(dirs)) == 2, dirs
