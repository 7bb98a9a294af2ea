"""The example workflows validate against the real core node schemas plus ours, and their API twins match."""

import copy
import json

import pytest

from tests.nodes.comfy_schema import ROOT, all_object_info, check_ui, ui_to_api
from tests.nodes.make_workflows import generated, workflows

UI_DIR = ROOT / "workflows"
NAMES = sorted(workflows())


@pytest.fixture(scope="module")
def infos():
    return all_object_info()


def _ui(name):
    return json.loads((UI_DIR / f"{name}.json").read_text())


def test_committed_files_are_generated():
    stale = [str(p.relative_to(ROOT)) for p, text in generated().items() if not p.is_file() or p.read_text() != text]
    assert not stale, f"run `python -m tests.nodes.make_workflows`: out of date {stale}"
    listed = sorted(p.stem for p in UI_DIR.glob("*.json"))
    assert listed == NAMES, "workflows/ holds a JSON file the generator does not make"


def test_only_ui_files_are_templates():
    """ComfyUI lists `<pack>/workflows/*.json` (not recursive): top level = UI format, twins below api/."""
    for p in UI_DIR.glob("*.json"):
        assert "nodes" in json.loads(p.read_text()), f"{p} is listed as a template but is not UI format"
    for p in (UI_DIR / "api").glob("*.json"):
        assert all("class_type" in v for v in json.loads(p.read_text()).values())


@pytest.mark.parametrize("name", NAMES)
def test_workflow_validates(name, infos):
    assert check_ui(_ui(name), infos) == []


@pytest.mark.parametrize("name", NAMES)
def test_api_twin_equals_ui_graph(name, infos):
    api = json.loads((UI_DIR / "api" / f"{name}.json").read_text())
    assert ui_to_api(_ui(name), infos) == api


def test_required_workflow_contents():
    types = {n: {x["type"] for x in _ui(n)["nodes"]} for n in NAMES}
    assert {"UNETLoader", "CLIPLoader", "CLIPTextEncode", "EmptyHunyuanLatentVideo", "APTOneStepSampler", "VAELoader", "VAEDecode",
            "CreateVideo", "SaveVideo"} <= types["apt_t2v_one_step"]
    assert {"SamplerCustomAdvanced", "APTSamplerSelect", "APTSigmas"} <= types["apt_t2v_two_step_refine"]
    assert {"APTDatasetFromFolder", "APTConsistencyDistill", "APTDiscriminator", "APTTrain", "APTSaveGenerator", "PreviewImage",
            "SaveVideo"} <= types["apt_train_single_gpu"]
    assert "APTExportTrainConfig" in types["apt_export_cluster_config"]
    assert "SaveImage" in types["apt_t2i_one_step"]
    ui = _ui("apt_t2v_one_step")
    clip = next(n for n in ui["nodes"] if n["type"] == "CLIPLoader")
    assert clip["widgets_values"][1] == "wan" and clip["properties"]["models"][0]["directory"] == "text_encoders"


# -- the validator can fail -------------------------------------------------------------------


def _mutated(fn):
    ui = copy.deepcopy(_ui("apt_t2v_one_step"))
    fn(ui)
    return ui


def _node(ui, tp):
    return next(n for n in ui["nodes"] if n["type"] == tp)


@pytest.mark.parametrize("mutation, expect", [
    (lambda ui: ui["links"][0].__setitem__(5, "LATENT"), "type"),
    (lambda ui: _node(ui, "APTOneStepSampler")["widgets_values"].__setitem__(2, 3), "outside"),
    (lambda ui: _node(ui, "APTOneStepSampler")["widgets_values"].pop(1), "widget values"),
    (lambda ui: _node(ui, "CLIPLoader")["widgets_values"].__setitem__(1, "flux"), "not in"),
    (lambda ui: _node(ui, "VAELoader")["properties"].pop("models"), "properties.models"),
    (lambda ui: _node(ui, "VAEDecode").__setitem__("type", "VAEDecodeTurbo"), "unknown node type"),
    (lambda ui: _node(ui, "APTOneStepSampler")["inputs"][2].__setitem__("link", None), "not connected"),
])
def test_validator_catches(mutation, expect, infos):
    errs = check_ui(_mutated(mutation), infos)
    assert any(expect in e for e in errs), errs
