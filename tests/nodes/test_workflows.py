"""The example workflows validate against the real core node schemas plus ours, and their API twins match."""

import copy
import json

import pytest

from tests.nodes.comfy_schema import (
    ROOT,
    UUID_RE,
    all_object_info,
    check_frontend_schema,
    check_layout,
    check_ui,
    frontend_size,
    our_object_info,
    ui_to_api,
    widget_slots,
)
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
def test_workflow_passes_frontend_schema(name):
    """The frontend's zod check (else the toast 'Invalid workflow against zod schema: Invalid uuid at "id"')."""
    assert check_frontend_schema(_ui(name)) == []


def test_workflow_ids_are_distinct_uuids():
    ids = [_ui(n)["id"] for n in NAMES]
    assert all(UUID_RE.match(i) for i in ids) and len(set(ids)) == len(ids)


def _info(**inputs):
    return {"input": {"required": inputs}, "input_order": {"required": list(inputs)}}


def test_control_widgets_follow_the_frontend_rule():
    """useIntWidget: control widget if control_after_generate, else if the INT is named seed/noise_seed;
    a COMBO with control_after_generate gets the control and a filter-list widget."""
    def layout(**inputs):
        return [(name, tp) for name, tp, _ in widget_slots(_info(**inputs))]

    assert layout(seed=["INT", {}]) == [("seed", "INT"), (None, "CONTROL")]
    assert layout(noise_seed=["INT", {"default": 0}]) == [("noise_seed", "INT"), (None, "CONTROL")]
    assert layout(seed=["INT", {"control_after_generate": False}]) == [("seed", "INT")]
    assert layout(steps=["INT", {"control_after_generate": True}]) == [("steps", "INT"), (None, "CONTROL")]
    assert layout(seed=["FLOAT", {}], val_seed=["INT", {}]) == [("seed", "FLOAT"), ("val_seed", "INT")]
    assert layout(pick=[["a", "b"], {"control_after_generate": True}]) == [("pick", ["a", "b"]), (None, "CONTROL"), (None, "FILTER")]


def test_training_seeds_are_fixed():
    """A seed that a resumed run must keep declares control_after_generate False: no control widget,
    so the UI never changes it (the frontend's legacy default would add one set to 'randomize')."""
    infos = our_object_info()
    for node in ("APTConsistencyDistill", "APTTrain"):
        spec = infos[node]["input"]["required"]["seed"]
        assert spec[1]["control_after_generate"] is False, node
        assert None not in [name for name, *_ in widget_slots(infos[node])], node
    # every INT named like a seed states what it wants instead of relying on the legacy name rule
    for node, info in infos.items():
        for section in info["input"].values():
            for name, spec in section.items():
                if name in ("seed", "noise_seed") and spec[0] == "INT":
                    assert "control_after_generate" in spec[1], f"{node}.{name}"


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
    assert {"UNETLoader", "LoraLoaderModelOnly", "APTDiscriminator", "APTTrain", "APTSaveGenerator"} <= types["apt_train_from_lora"]
    assert "APTConsistencyDistill" not in types["apt_train_from_lora"]
    ui = _ui("apt_t2v_one_step")
    clip = next(n for n in ui["nodes"] if n["type"] == "CLIPLoader")
    assert clip["widgets_values"][1] == "wan" and clip["properties"]["models"][0]["directory"] == "text_encoders"


def test_train_from_lora_starts_apt_from_the_lora_model():
    """UNETLoader -> LoraLoaderModelOnly -> APT Train's generator; D from the original model; full save."""
    api = json.loads((UI_DIR / "api" / "apt_train_from_lora.json").read_text())
    by_type = {v["class_type"]: (k, v) for k, v in api.items()}
    unet, lora, train = by_type["UNETLoader"][0], by_type["LoraLoaderModelOnly"], by_type["APTTrain"][1]
    assert lora[1]["inputs"]["model"] == [unet, 0] and train["inputs"]["generator"] == [lora[0], 0]
    assert by_type["APTDiscriminator"][1]["inputs"]["model"] == [unet, 0]
    assert by_type["APTSaveGenerator"][1]["inputs"]["format"] == "full"
    assert train["inputs"]["run_name"] != json.loads((UI_DIR / "api" / "apt_train_single_gpu.json").read_text())["9"]["inputs"]["run_name"]


# -- layout: what the frontend shows -----------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_layout_no_overlap_every_node_in_its_group(name, infos):
    """With the sizes the frontend gives the nodes (LiteGraph computeSize), no two nodes overlap, every
    node lies inside one group below its title, and each note sits beside a group (issue 15, defect 3)."""
    ui = _ui(name)
    assert ui["groups"], "no groups"
    assert check_layout(ui, infos) == []


@pytest.mark.parametrize("name", NAMES)
def test_stored_sizes_are_kept_by_the_frontend(name, infos):
    """The frontend keeps max(stored, computed) size on load: stored >= computed means it shows the stored layout."""
    for n in _ui(name)["nodes"]:
        info = None if n["type"] in ("Note", "MarkdownNote") else infos[n["type"]]
        w, h = frontend_size(n["type"], info, n.get("title") or (info["display_name"] if info else n["type"]))
        assert n["size"][0] >= w and n["size"][1] >= h, (n["id"], n["type"], n["size"], (w, h))


# node.computeSize() read back in the real frontend (1.27.10, headless Chromium, tests/comfyui/test_browser.py)
MEASURED = {
    ("APTTrain", "APT Train (adversarial post-training)"): (265, 498), ("APTConsistencyDistill", "APT Consistency Distill"): (227, 386),
    ("APTDatasetFromFolder", "APT Dataset From Folder"): (210, 294), ("APTExportTrainConfig", "APT Export Train Config (TOML)"): (243, 202),
    ("APTSaveGenerator", "APT Save Generator (LoRA)"): (218, 130), ("APTOneStepSampler", "APT One-Step Sampler"): (210, 170),
    ("APTSamplerSelect", "APT Sampler (SAMPLER)"): (203, 26), ("APTLoadDataset", "APT Load Dataset"): (210, 78),
    ("RandomNoise", "RandomNoise"): (210, 82), ("CLIPTextEncode", "Prompt"): (210, 88), ("PreviewAny", "APT report"): (210, 88),
    ("PreviewImage", "CD loss"): (140, 26), ("SamplerCustomAdvanced", "SamplerCustomAdvanced"): (203, 106),
    ("BasicGuider", "BasicGuider"): (156, 46), ("VAEDecode", "VAE Decode"): (140, 46), ("SaveVideo", "Save Video"): (210, 106),
    ("LoraLoaderModelOnly", "Distilled few-step LoRA"): (210, 82), ("MarkdownNote", "MarkdownNote"): (210, 88),
}


@pytest.mark.parametrize("key", sorted(MEASURED))
def test_frontend_size_rule_matches_the_real_frontend(key, infos):
    """frontend_size: the height the frontend computes exactly, and at least its width (text widths are bounded)."""
    node_type, title = key
    w, h = frontend_size(node_type, None if node_type == "MarkdownNote" else infos[node_type], title)
    assert h == MEASURED[key][1] and MEASURED[key][0] <= w <= MEASURED[key][0] + 120, (w, h)


def test_training_workflows_are_grouped_by_stage():
    for name, middle in (("apt_train_single_gpu", "Stage 1"), ("apt_train_from_lora", "LoRA")):
        ui = _ui(name)
        titles = [g["title"] for g in ui["groups"]]
        assert titles[0] == "Data" and middle in titles[1] and titles[2].startswith("Stage 2") and titles[3] == "Outputs", titles
        assert sum(n["type"] == "MarkdownNote" for n in ui["nodes"]) == 4  # one note beside each group


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


def test_validator_catches_a_missing_seed_control(infos):
    """A node whose INT 'seed' has no control_after_generate declared gets a control widget in the
    frontend: widget values written without it slide by one (issue 15, defect 1)."""
    infos = copy.deepcopy(infos)
    del infos["APTOneStepSampler"]["input"]["required"]["seed"][1]["control_after_generate"]
    assert check_ui(_ui("apt_t2v_one_step"), infos) == []  # the legacy name rule adds the control all the same
    infos["APTOneStepSampler"]["input"]["required"]["seed"][1]["control_after_generate"] = False
    errs = check_ui(_ui("apt_t2v_one_step"), infos)
    assert any("4 widget values for 3 widgets" in e for e in errs) and any("steps='fixed'" in e for e in errs), errs


@pytest.mark.parametrize("mutation, expect", [
    (lambda ui: ui.__setitem__("id", "comfyui-apt-apt_t2v_one_step"), "workflow.id"),
    (lambda ui: ui.__setitem__("version", "0.4"), "version"),
    (lambda ui: ui["links"][0].pop(), "links[0]"),
    (lambda ui: ui["nodes"][0].pop("flags"), "flags: missing"),
    (lambda ui: ui["nodes"][0].__setitem__("pos", [0]), ".pos"),
    (lambda ui: ui["nodes"][0]["inputs"].append({"name": "x", "type": "INT", "link": "1"}), ".link"),
    (lambda ui: _node(ui, "VAELoader")["properties"]["models"][0].__setitem__("url", "wan_2.1_vae.safetensors"), ".url"),
    (lambda ui: ui.__setitem__("groups", [{"title": "g", "bounding": [0, 0, 10]}]), "groups[0].bounding"),
    (lambda ui: ui["extra"].__setitem__("ds", {"scale": 1}), "extra.ds.offset"),
])
def test_frontend_schema_check_catches(mutation, expect):
    errs = check_frontend_schema(_mutated(mutation))
    assert any(expect in e for e in errs), errs


def _shift(ui, node_id, dx, dy):
    n = next(n for n in ui["nodes"] if n["id"] == node_id)
    n["pos"] = [n["pos"][0] + dx, n["pos"][1] + dy]


@pytest.mark.parametrize("mutation, expect", [
    (lambda ui: _shift(ui, 2, 0, -60), "overlaps"),  # CLIPLoader onto UNETLoader
    (lambda ui: _shift(ui, 6, 0, 2000), "in 0 groups"),
    (lambda ui: ui["groups"][2]["bounding"].__setitem__(2, ui["groups"][2]["bounding"][2] - 40), "sticks out"),
    (lambda ui: _node(ui, "MarkdownNote")["pos"].__setitem__(1, 2000), "not beside"),
    (lambda ui: _node(ui, "MarkdownNote").__setitem__("pos", list(ui["groups"][0]["bounding"][:2])), "notes go beside"),
    (lambda ui: _node(ui, "APTOneStepSampler").__setitem__("size", [100, 40]), None),  # the frontend grows it back: no error
])
def test_layout_check_catches(mutation, expect, infos):
    errs = check_layout(_mutated(mutation), infos)
    if expect is None:
        assert errs == []
    else:
        assert any(expect in e for e in errs), errs
