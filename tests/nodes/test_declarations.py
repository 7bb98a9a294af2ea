"""Every node module imports without ComfyUI, and every node declaration is well formed."""

import importlib
import importlib.util
import inspect
import sys

import pytest

from tests.nodes.comfy_schema import ROOT, core_object_info, our_object_info

MODULES = ["nodes", "nodes.comfy_backbone", "nodes.comfy_env", "nodes.sampling", "nodes.dataset", "nodes.train",
           "nodes.node_run", "nodes.run_config", "nodes.io", "nodes.plot"]
COMFY_MODULES = ("comfy", "folder_paths", "comfy_api", "server", "latent_preview", "comfy_extras", "execution")
NATIVE = {"MODEL", "CONDITIONING", "LATENT", "VAE", "CLIP", "IMAGE", "SAMPLER", "SIGMAS", "INT", "FLOAT", "STRING", "BOOLEAN"}
CUSTOM = {"APT_DATASET", "APT_DISCRIMINATOR"}


def _mappings():
    import nodes

    return nodes.NODE_CLASS_MAPPINGS, nodes.NODE_DISPLAY_NAME_MAPPINGS


@pytest.mark.parametrize("name", MODULES)
def test_module_imports_without_comfyui(name):
    importlib.import_module(name)
    leaked = [m for m in sys.modules if m.split(".")[0] in COMFY_MODULES]
    assert not leaked, f"importing {name} imported ComfyUI modules {leaked}"


def test_package_loads_like_comfyui_loads_it():
    """ComfyUI imports the folder by file location under a mangled name; relative imports must work."""
    mod_name = str(ROOT).replace(".", "_x_") + "_probe"
    spec = importlib.util.spec_from_file_location(mod_name, ROOT / "__init__.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[mod_name] = module
    try:
        spec.loader.exec_module(module)
    finally:
        sys.modules.pop(mod_name, None)
    classes, display = _mappings()
    assert set(module.NODE_CLASS_MAPPINGS) == set(classes) and len(classes) == 10
    assert set(module.NODE_DISPLAY_NAME_MAPPINGS) == set(classes)
    assert str(ROOT) in sys.path and sys.path.index(str(ROOT)) >= 0


def test_ids_prefixed_and_not_shadowing_core():
    classes, display = _mappings()
    core = core_object_info()
    for node_id in classes:
        assert node_id.startswith("APT"), node_id
        assert node_id not in core, f"{node_id} collides with a core node (ComfyUI would ignore ours)"
        assert display[node_id].startswith("APT "), display[node_id]


@pytest.mark.parametrize("node_id", sorted(_mappings()[0]))
def test_declaration(node_id):
    cls = _mappings()[0][node_id]
    spec = cls.INPUT_TYPES()
    assert isinstance(spec, dict) and "required" in spec and set(spec) <= {"required", "optional", "hidden"}
    assert cls.CATEGORY.startswith("APT/") and cls.DESCRIPTION
    assert isinstance(cls.RETURN_TYPES, tuple) and all(isinstance(t, str) and t == t.upper() for t in cls.RETURN_TYPES)
    assert len(cls.RETURN_NAMES) == len(cls.RETURN_TYPES) == len(cls.OUTPUT_TOOLTIPS)
    assert set(cls.RETURN_TYPES) <= NATIVE | CUSTOM
    fn = getattr(cls, cls.FUNCTION)
    assert callable(fn)
    params = inspect.signature(fn).parameters
    for section, entries in spec.items():
        for name, value in entries.items():
            if section == "hidden":
                assert value in ("PROMPT", "UNIQUE_ID", "EXTRA_PNGINFO", "DYNPROMPT")
                assert params[name].default is None, f"hidden input {name} needs a default"
                continue
            assert isinstance(value, tuple) and len(value) == 2, f"{node_id}.{name}: (TYPE, options) expected"
            tp, opts = value
            assert isinstance(opts, dict) and isinstance(opts.get("tooltip"), str) and len(opts["tooltip"]) > 10, \
                f"{node_id}.{name} needs a tooltip"
            assert name in params, f"{node_id}.{cls.FUNCTION} does not take {name}"
            if section == "optional":
                assert params[name].default is None, f"optional input {name} needs a default"
            if isinstance(tp, list):
                assert tp and opts.get("default", tp[0]) in tp
                continue
            assert tp in NATIVE | CUSTOM, f"{node_id}.{name}: type {tp}"
            if tp in ("INT", "FLOAT"):
                assert opts["min"] <= opts["default"] <= opts["max"], f"{node_id}.{name} default outside range"
                assert isinstance(opts["default"], int) == (tp == "INT")
            if tp == "BOOLEAN":
                assert isinstance(opts["default"], bool)
            if tp == "STRING":
                assert isinstance(opts["default"], str)
    takes = [p for p in params if p != "self"]
    declared = [n for s in spec.values() for n in s]
    assert set(takes) == set(declared), f"{cls.FUNCTION} parameters {takes} != inputs {declared}"


def test_custom_types_are_produced_and_consumed():
    info = our_object_info()
    produced = {t for i in info.values() for t in i["output"]}
    consumed = {v[0] for i in info.values() for s in ("required", "optional") for v in i["input"].get(s, {}).values()
                if isinstance(v[0], str)}
    assert CUSTOM <= produced and CUSTOM <= consumed


def test_object_info_generation_matches_core_shape():
    """Our generated entries have exactly the keys a real /object_info entry of a V1 node has."""
    core = core_object_info()["KSampler"]
    ours = our_object_info()["APTOneStepSampler"]
    assert set(core) == set(ours)
    assert ours["input"]["required"]["seed"][1]["control_after_generate"] is True
