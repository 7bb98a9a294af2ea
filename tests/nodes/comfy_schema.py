"""Node schemas as ComfyUI serves them (`GET /object_info`) and checks of workflows against them.

Core schemas: tests/fixtures/object_info.json (a real ComfyUI 0.3.64 server's /object_info; see
tests/fixtures/README.md). Our nodes' schemas are generated from their INPUT_TYPES exactly the way
ComfyUI's `server.py: node_info` does. `check_ui` validates a UI-format (v0.4) workflow, `ui_to_api`
converts one to the API (prompt) format the way the frontend does, for comparison with the twins.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
FIXTURE = ROOT / "tests" / "fixtures" / "object_info.json"
WIDGET_TYPES = ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")
CONTROL_VALUES = ("fixed", "increment", "decrement", "randomize")
SEED_NAMES = ("seed", "noise_seed")  # INT widgets the frontend gives a control widget unless declared otherwise
VIRTUAL_NODES = ("Note", "MarkdownNote")  # frontend-only nodes: not sent to the server
# Loader widgets whose choices are the files of the machine that served object_info
FILE_WIDGETS = ("unet_name", "clip_name", "vae_name", "lora_name", "ckpt_name")


def core_object_info() -> dict[str, dict]:
    return json.loads(FIXTURE.read_text())


def node_info(name: str, cls: type, display: dict[str, str]) -> dict:
    """`server.py: node_info` for a V1 node class."""
    spec = cls.INPUT_TYPES()
    info = {
        "input": spec,
        "input_order": {k: list(v.keys()) for k, v in spec.items()},
        "output": cls.RETURN_TYPES,
        "output_is_list": getattr(cls, "OUTPUT_IS_LIST", [False] * len(cls.RETURN_TYPES)),
        "output_name": getattr(cls, "RETURN_NAMES", cls.RETURN_TYPES),
        "name": name,
        "display_name": display.get(name, name),
        "description": getattr(cls, "DESCRIPTION", ""),
        "python_module": "custom_nodes.ComfyUI-APT",
        "category": getattr(cls, "CATEGORY", "sd"),
        "output_node": bool(getattr(cls, "OUTPUT_NODE", False)),
    }
    if hasattr(cls, "OUTPUT_TOOLTIPS"):
        info["output_tooltips"] = cls.OUTPUT_TOOLTIPS
    return json.loads(json.dumps(info))  # as served: tuples become lists


def our_object_info() -> dict[str, dict]:
    import nodes

    return {n: node_info(n, c, nodes.NODE_DISPLAY_NAME_MAPPINGS) for n, c in nodes.NODE_CLASS_MAPPINGS.items()}


def all_object_info() -> dict[str, dict]:
    return {**core_object_info(), **our_object_info()}


# ----------------------------------------------------------------------------------------------
# Input specs
# ----------------------------------------------------------------------------------------------


def input_specs(info: dict) -> list[tuple[str, Any, dict, bool]]:
    """(name, type, options, required) in input order (required then optional; hidden skipped)."""
    out = []
    for section in ("required", "optional"):
        entries = info["input"].get(section, {})
        for name in info.get("input_order", {}).get(section, list(entries)):
            spec = entries[name]
            tp = spec[0]
            opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
            out.append((name, tp, opts, section == "required"))
    return out


def is_widget(tp: Any, opts: dict) -> bool:
    return (isinstance(tp, list) or tp in WIDGET_TYPES) and not opts.get("forceInput", False)


def combo_options(tp: Any, opts: dict) -> list | None:
    if isinstance(tp, list):
        return tp
    if tp == "COMBO":
        return opts.get("options", [])
    return None


def control_slots(name: str, tp: Any, opts: dict) -> list[tuple[None, str, dict]]:
    """The widgets the frontend (1.27) adds after a widget, each with its own `widgets_values` entry.

    An INT gets a control_after_generate combo when it declares `control_after_generate` truthy or,
    when it declares nothing, when it is named seed / noise_seed (useIntWidget's legacy rule; so a
    seed that must not change declares `control_after_generate: False`). A COMBO declaring it gets
    the control combo plus a control_filter_list text widget (addValueControlWidgets). FLOAT, STRING
    and BOOLEAN never get one.
    """
    declared = opts.get("control_after_generate")
    if tp == "INT":
        wanted = name in SEED_NAMES if declared is None else bool(declared)
        return [(None, "CONTROL", {})] if wanted else []
    if combo_options(tp, opts) is not None and declared:
        return [(None, "CONTROL", {"combo": True}), (None, "FILTER", {})]
    return []


def widget_slots(info: dict) -> list[tuple[str | None, Any, dict]]:
    """Positional `widgets_values` layout: (input name, or None for a frontend-added control value, type, opts)."""
    slots = []
    for name, tp, opts, _ in input_specs(info):
        if is_widget(tp, opts):
            slots.append((name, tp, opts))
            slots.extend(control_slots(name, tp, opts))
    return slots


def socket_inputs(info: dict) -> dict[str, tuple[str, bool]]:
    """Inputs that take links: name -> (type, required)."""
    return {n: (tp, req) for n, tp, opts, req in input_specs(info) if not is_widget(tp, opts)}


def value_problem(name: str, tp: Any, opts: dict, value: Any) -> str | None:
    """Why a widget value does not fit its declaration, or None."""
    choices = combo_options(tp, opts)
    if choices is not None:
        if name in FILE_WIDGETS:
            return None if isinstance(value, str) and value.endswith((".safetensors", ".sft", ".pt", ".ckpt")) else f"{name}={value!r} is not a model file name"
        return None if value in choices else f"{name}={value!r} not in {choices}"
    if tp == "CONTROL":
        allowed = CONTROL_VALUES + (("increment-wrap",) if opts.get("combo") else ())
        return None if value in allowed else f"control_after_generate value {value!r} not in {allowed}"
    if tp == "FILTER":
        return None if isinstance(value, str) else f"control_filter_list value {value!r} is not a string"
    if tp == "BOOLEAN":
        return None if isinstance(value, bool) else f"{name}={value!r} is not a boolean"
    if tp == "STRING":
        return None if isinstance(value, str) else f"{name}={value!r} is not a string"
    if tp in ("INT", "FLOAT"):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (tp == "INT" and not isinstance(value, int)):
            return f"{name}={value!r} is not an {tp}"
        lo, hi = opts.get("min"), opts.get("max")
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            return f"{name}={value} outside [{lo}, {hi}]"
        return None
    return f"{name}: unknown widget type {tp!r}"


# ----------------------------------------------------------------------------------------------
# UI-format workflows
# ----------------------------------------------------------------------------------------------


def check_ui(ui: dict, infos: dict[str, dict]) -> list[str]:
    """Problems of a UI-format workflow: node types, links, sockets, widget values, model entries."""
    errs: list[str] = []
    if ui.get("version") != 0.4:
        errs.append(f"version {ui.get('version')!r}, expected 0.4")
    nodes = {n["id"]: n for n in ui["nodes"]}
    if len(nodes) != len(ui["nodes"]):
        errs.append("duplicate node ids")
    links = {lk[0]: lk for lk in ui["links"]}
    if ui.get("last_node_id") != max(nodes) or ui.get("last_link_id") != max(links, default=0):
        errs.append("last_node_id / last_link_id do not match the graph")
    for lid, src, sslot, dst, dslot, ltype in ui["links"]:
        where = f"link {lid} ({src}:{sslot} -> {dst}:{dslot})"
        if src not in nodes or dst not in nodes:
            errs.append(f"{where}: unknown node")
            continue
        a, b = nodes[src], nodes[dst]
        if a["type"] not in infos or b["type"] not in infos:
            continue  # reported below
        outs = infos[a["type"]]["output"]
        if sslot >= len(outs):
            errs.append(f"{where}: {a['type']} has {len(outs)} outputs")
            continue
        if dslot >= len(b.get("inputs", [])):
            errs.append(f"{where}: {b['type']} node has no input slot {dslot}")
            continue
        inp = b["inputs"][dslot]
        sockets = socket_inputs(infos[b["type"]])
        if inp["name"] not in sockets:
            errs.append(f"{where}: {b['type']} has no socket input {inp['name']!r}")
            continue
        want = sockets[inp["name"]][0]
        if want != "*" and not (outs[sslot] == want == ltype == inp["type"]):
            errs.append(f"{where}: type {outs[sslot]} -> {inp['name']}:{want} (link says {ltype}, input says {inp['type']})")
        if inp.get("link") != lid or lid not in a["outputs"][sslot].get("links", []):
            errs.append(f"{where}: node slots do not reference the link")
    for n in ui["nodes"]:
        where = f"node {n['id']} ({n['type']})"
        if n["type"] in VIRTUAL_NODES:
            continue
        if n["type"] not in infos:
            errs.append(f"{where}: unknown node type")
            continue
        info = infos[n["type"]]
        sockets = socket_inputs(info)
        names = [i["name"] for i in n.get("inputs", [])]
        for i in n.get("inputs", []):
            if i["name"] not in sockets:
                errs.append(f"{where}: input {i['name']!r} is not a socket of {n['type']}")
            elif i.get("link") is not None and i["link"] not in links:
                errs.append(f"{where}: input {i['name']!r} references missing link {i['link']}")
        for s, (tp, req) in sockets.items():
            if req and not any(i["name"] == s and i.get("link") is not None for i in n.get("inputs", [])):
                errs.append(f"{where}: required input {s!r} ({tp}) is not connected")
        if len(set(names)) != len(names):
            errs.append(f"{where}: duplicate inputs")
        if [o["type"] for o in n.get("outputs", [])] != list(info["output"]):
            errs.append(f"{where}: outputs {[o['type'] for o in n.get('outputs', [])]} != {info['output']}")
        slots, values = widget_slots(info), n.get("widgets_values", [])
        if len(values) != len(slots):
            errs.append(f"{where}: {len(values)} widget values for {len(slots)} widgets {[s[0] for s in slots]}")
        for (name, tp, opts), v in zip(slots, values):
            p = value_problem(name or "control_after_generate", tp, opts, v)
            if p:
                errs.append(f"{where}: {p}")
            if name in FILE_WIDGETS and not v.startswith("apt/"):
                listed = [m.get("name") for m in n.get("properties", {}).get("models", [])]
                if v not in listed:
                    errs.append(f"{where}: model file {v!r} has no properties.models entry (name, url, directory)")
        for m in n.get("properties", {}).get("models", []):
            if set(m) != {"name", "url", "directory"} or not m["url"].startswith("https://"):
                errs.append(f"{where}: properties.models entry {m} needs name, https url and directory")
    return errs


def ui_to_api(ui: dict, infos: dict[str, dict]) -> dict[str, dict]:
    """The API (prompt) format of a UI workflow, as the frontend's 'Export (API)' builds it."""
    links = {lk[0]: lk for lk in ui["links"]}
    out = {}
    for n in sorted(ui["nodes"], key=lambda n: n["id"]):
        if n["type"] in VIRTUAL_NODES or n.get("mode", 0) in (2, 4):
            continue
        info = infos[n["type"]]
        inputs: dict[str, Any] = {}
        for (name, _tp, _opts), v in zip(widget_slots(info), n.get("widgets_values", [])):
            if name is not None:
                inputs[name] = v
        for i in n.get("inputs", []):
            if i.get("link") is not None:
                _, src, slot, *_ = links[i["link"]]
                inputs[i["name"]] = [str(src), slot]
        out[str(n["id"])] = {"inputs": inputs, "class_type": n["type"], "_meta": {"title": n.get("title", info["display_name"])}}
    return out


# ----------------------------------------------------------------------------------------------
# The frontend's workflow schema (zod, ComfyUI_frontend 1.27 src/schemas/comfyWorkflowSchema.ts)
# ----------------------------------------------------------------------------------------------

# zod's z.string().uuid()
UUID_RE = re.compile(r"^[0-9a-fA-F]{8}\b-[0-9a-fA-F]{4}\b-[0-9a-fA-F]{4}\b-[0-9a-fA-F]{4}\b-[0-9a-fA-F]{12}$", re.IGNORECASE)


def _num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _int(v: Any) -> bool:
    return _num(v) and float(v).is_integer()


def _node_id(v: Any) -> bool:  # zNodeId: int | string
    return _int(v) or isinstance(v, str)


def _slot(v: Any) -> bool:  # zSlotIndex: int | numeric string
    return _int(v) or (isinstance(v, str) and v.strip().lstrip("-").isdigit())


def _data_type(v: Any) -> bool:  # zDataType: string | string[] | number
    return isinstance(v, str) or _num(v) or (isinstance(v, list) and all(isinstance(x, str) for x in v))


def _vector2(v: Any) -> bool:  # zVector2: [x, y] or {"0": x, "1": y, ...}
    if isinstance(v, dict):
        return _num(v.get("0")) and _num(v.get("1"))
    return isinstance(v, list) and len(v) == 2 and all(_num(x) for x in v)


def _url(v: Any) -> bool:
    from urllib.parse import urlparse

    if not isinstance(v, str):
        return False
    u = urlparse(v)
    return bool(u.scheme) and (bool(u.netloc) or u.scheme in ("file", "data", "mailto"))


def _optional(obj: dict, key: str, ok, what: str, where: str, errs: list[str], nullable: bool = False) -> None:
    if key in obj and not (ok(obj[key]) or (nullable and obj[key] is None)):
        errs.append(f"{where}.{key}: {obj[key]!r} is not {what}")


def _required(obj: dict, key: str, ok, what: str, where: str, errs: list[str]) -> None:
    if key not in obj:
        errs.append(f"{where}.{key}: missing ({what})")
    elif not ok(obj[key]):
        errs.append(f"{where}.{key}: {obj[key]!r} is not {what}")


def _model_file_problems(m: Any, where: str) -> list[str]:
    errs: list[str] = []
    if not isinstance(m, dict):
        return [f"{where}: not an object"]
    _required(m, "name", lambda v: isinstance(v, str), "a string", where, errs)
    _required(m, "url", _url, "a URL", where, errs)
    _required(m, "directory", lambda v: isinstance(v, str), "a string", where, errs)
    for k in ("hash", "hash_type"):
        _optional(m, k, lambda v: isinstance(v, str), "a string", where, errs)
    return errs


def _slots_problems(slots: Any, where: str, output: bool) -> list[str]:
    errs: list[str] = []
    if not isinstance(slots, list):
        return [f"{where}: not an array"]
    for i, s in enumerate(slots):
        w = f"{where}[{i}]"
        if not isinstance(s, dict):
            errs.append(f"{w}: not an object")
            continue
        _required(s, "name", lambda v: isinstance(v, str), "a string", w, errs)
        _required(s, "type", _data_type, "a data type", w, errs)
        _optional(s, "slot_index", _slot, "a slot index", w, errs)
        if output:
            _optional(s, "links", lambda v: isinstance(v, list) and all(_num(x) for x in v), "an array of link ids", w, errs,
                      nullable=True)
        else:
            _optional(s, "link", _num, "a link id", w, errs, nullable=True)
    return errs


def check_frontend_schema(ui: dict) -> list[str]:
    """Where a UI workflow (version 0.4) fails the frontend's zod schema `zComfyWorkflow`.

    The frontend runs this on every workflow it loads and shows 'Invalid workflow against zod
    schema: ...' for each failure (e.g. a graph `id` that is not a UUID).
    """
    errs: list[str] = []
    if not _num(ui.get("version")):
        return [f"version {ui.get('version')!r} is not a number (the frontend refuses the file)"]
    _optional(ui, "id", lambda v: isinstance(v, str) and UUID_RE.match(v) is not None, "a UUID", "workflow", errs)
    _optional(ui, "revision", _num, "a number", "workflow", errs)
    _required(ui, "last_node_id", _node_id, "a node id", "workflow", errs)
    _required(ui, "last_link_id", _num, "a number", "workflow", errs)
    if not isinstance(ui.get("nodes"), list):
        errs.append("workflow.nodes: not an array")
    if not isinstance(ui.get("links"), list):
        errs.append("workflow.links: not an array")
    for i, lk in enumerate(ui.get("links") or []):
        checks = (_num, _node_id, _slot, _node_id, _slot, _data_type)
        if not (isinstance(lk, list) and len(lk) == 6 and all(ok(v) for ok, v in zip(checks, lk))):
            errs.append(f"links[{i}]: {lk!r} is not [id, origin node, origin slot, target node, target slot, type]")
    for i, n in enumerate(ui.get("nodes") or []):
        w = f"nodes[{i}]"
        if not isinstance(n, dict):
            errs.append(f"{w}: not an object")
            continue
        _required(n, "id", _node_id, "a node id", w, errs)
        _required(n, "type", lambda v: isinstance(v, str), "a string", w, errs)
        _required(n, "pos", _vector2, "[x, y]", w, errs)
        _required(n, "size", _vector2, "[width, height]", w, errs)
        _required(n, "flags", lambda v: isinstance(v, dict), "an object", w, errs)
        for k in ("collapsed", "pinned", "allow_interaction", "horizontal", "skip_repeated_outputs"):
            _optional(n.get("flags") or {}, k, lambda v: isinstance(v, bool), "a boolean", f"{w}.flags", errs)
        _required(n, "order", _num, "a number", w, errs)
        _required(n, "mode", _num, "a number", w, errs)
        if "inputs" in n:
            errs += _slots_problems(n["inputs"], f"{w}.inputs", output=False)
        if "outputs" in n:
            errs += _slots_problems(n["outputs"], f"{w}.outputs", output=True)
        _required(n, "properties", lambda v: isinstance(v, dict), "an object", w, errs)
        props = n.get("properties") if isinstance(n.get("properties"), dict) else {}
        _optional(props, "Node name for S&R", lambda v: isinstance(v, str), "a string", f"{w}.properties", errs)
        for k, m in enumerate(props.get("models") or []):
            errs += _model_file_problems(m, f"{w}.properties.models[{k}]")
        _optional(n, "widgets_values", lambda v: isinstance(v, (list, dict)), "an array or object", w, errs)
        for k in ("color", "bgcolor"):
            _optional(n, k, lambda v: isinstance(v, str), "a string", w, errs)
    _optional(ui, "groups", lambda v: isinstance(v, list), "an array", "workflow", errs)
    for i, g in enumerate(ui.get("groups") or []):
        w = f"groups[{i}]"
        if not isinstance(g, dict):
            errs.append(f"{w}: not an object")
            continue
        _optional(g, "id", _num, "a number", w, errs)
        _required(g, "title", lambda v: isinstance(v, str), "a string", w, errs)
        _required(g, "bounding", lambda v: isinstance(v, list) and len(v) == 4 and all(_num(x) for x in v), "[x, y, w, h]", w, errs)
        _optional(g, "color", lambda v: isinstance(v, str), "a string", w, errs)
        _optional(g, "font_size", _num, "a number", w, errs)
        _optional(g, "locked", lambda v: isinstance(v, bool), "a boolean", w, errs)
    _optional(ui, "config", lambda v: isinstance(v, dict), "an object", "workflow", errs, nullable=True)
    for k in ("links_ontop", "align_to_grid"):
        _optional(ui.get("config") or {}, k, lambda v: isinstance(v, bool), "a boolean", "workflow.config", errs)
    _optional(ui, "extra", lambda v: isinstance(v, dict), "an object", "workflow", errs, nullable=True)
    extra = ui.get("extra") or {}
    if "ds" in extra:
        ds = extra["ds"]
        if not isinstance(ds, dict):
            errs.append("extra.ds: not an object")
        else:
            _required(ds, "scale", _num, "a number", "extra.ds", errs)
            _required(ds, "offset", _vector2, "[x, y]", "extra.ds", errs)
    _optional(extra, "frontendVersion", lambda v: isinstance(v, str), "a string", "extra", errs)
    for i, m in enumerate(ui.get("models") or []):
        errs += _model_file_problems(m, f"models[{i}]")
    return errs


# ----------------------------------------------------------------------------------------------
# Node sizes as the frontend computes them (LiteGraph LGraphNode.computeSize, frontend 1.27)
# ----------------------------------------------------------------------------------------------

TITLE_HEIGHT = 30  # LiteGraph.NODE_TITLE_HEIGHT: drawn above `pos`, not part of `size`
SLOT_HEIGHT = 20  # NODE_SLOT_HEIGHT: one row per socket input / output
WIDGET_HEIGHT = 20  # NODE_WIDGET_HEIGHT (+4 spacing each, +8 after the last)
DOM_WIDGET_MIN_HEIGHT = 50  # a multiline text / markdown widget's computeLayoutSize minHeight
NODE_WIDTH = 140  # LiteGraph.NODE_WIDTH; x1.5 when the node has widgets
WIDGET_PADDING = 42 + 2 * (15 + 6 + 10)  # BaseWidget minValueWidth + 2 * (margin + arrowMargin + arrowWidth)
# Widgets frontend extensions add to core nodes (name, type, options): PreviewAny's read-only text
EXTENSION_WIDGETS = {"PreviewAny": [("preview", "STRING", {"multiline": True})]}


def text_width(text: str) -> float:
    """An upper bound of the 14px Arial width of `text` (the frontend measures it on a canvas; its own
    fallback is 0.6 em per character; capitals are counted wider)."""
    return sum(11.0 if c.isupper() else 8.4 for c in text)


def frontend_size(node_type: str, info: dict | None, title: str) -> tuple[float, float]:
    """The size the frontend gives a node on load at least (it keeps max(stored size, this)).

    Width: title, socket labels, widget labels + value room, or 1.5 x NODE_WIDTH with widgets.
    Height: one 20px row per socket row (max of inputs, outputs), then 24px per widget (control
    widgets included), 54px per multiline text widget, +8, +6. The title bar is above `pos`.
    """
    if info is None:  # Note / MarkdownNote: one text widget
        widgets = [("text", "STRING", {"multiline": True})]
        sockets: list[str] = []
        outputs: list[str] = []
    else:
        widgets = [(n or "control_after_generate", tp, o) for n, tp, o in widget_slots(info)] + EXTENSION_WIDGETS.get(node_type, [])
        sockets = list(socket_inputs(info))
        outputs = list(info.get("output_name") or info["output"])
    rows = max(len(sockets), len(outputs), 1)
    labels = [n for n, tp, _ in widgets if tp not in ("CONTROL", "FILTER")]  # only input widgets have a label slot
    widget_w = max((text_width(n) for n in labels), default=0)
    in_w = max((text_width(n) for n in sockets), default=0)
    out_w = max((text_width(n) for n in outputs), default=0)
    slots_w = in_w + out_w + 2 * SLOT_HEIGHT + (5 if in_w and out_w else 0)
    title_w = TITLE_HEIGHT + text_width(title) + TITLE_HEIGHT * 0.33
    width = max(slots_w, widget_w + WIDGET_PADDING if widget_w else 0, title_w, NODE_WIDTH * (1.5 if widgets else 1))
    height = rows * SLOT_HEIGHT
    if widgets:
        for _, tp, opts in widgets:
            h = DOM_WIDGET_MIN_HEIGHT if tp == "STRING" and opts.get("multiline") else WIDGET_HEIGHT
            height += h + 4
        height += 8
    return width, height + 6


def node_box(node: dict, infos: dict[str, dict]) -> tuple[float, float, float, float]:
    """(x, y, w, h) a UI node covers once loaded: max(stored, computed) size, title bar included."""
    info = None if node["type"] in VIRTUAL_NODES else infos[node["type"]]
    title = node.get("title") or (info["display_name"] if info else node["type"])
    w, h = frontend_size(node["type"], info, title)
    w, h = max(w, node["size"][0]), max(h, node["size"][1])
    return node["pos"][0], node["pos"][1] - TITLE_HEIGHT, w, h + TITLE_HEIGHT


def overlap(a: tuple[float, ...], b: tuple[float, ...]) -> bool:
    """Whether two (x, y, w, h) boxes share area."""
    return a[0] < b[0] + b[2] and b[0] < a[0] + a[2] and a[1] < b[1] + b[3] and b[1] < a[1] + a[3]


def inside(a: tuple[float, ...], b: tuple[float, ...]) -> bool:
    """Whether box a lies within box b."""
    return b[0] <= a[0] and b[1] <= a[1] and a[0] + a[2] <= b[0] + b[2] and a[1] + a[3] <= b[1] + b[3]


def check_layout(ui: dict, infos: dict[str, dict]) -> list[str]:
    """Overlapping nodes, nodes outside every group (or in several), notes inside a group or far from all."""
    errs: list[str] = []
    boxes = {n["id"]: node_box(n, infos) for n in ui["nodes"]}
    label = {n["id"]: f"node {n['id']} ({n.get('title') or n['type']})" for n in ui["nodes"]}
    ids = sorted(boxes)
    for i, a in enumerate(ids):
        for b in ids[i + 1:]:
            if overlap(boxes[a], boxes[b]):
                errs.append(f"{label[a]} {boxes[a]} overlaps {label[b]} {boxes[b]}")
    groups = ui.get("groups") or []
    for g in groups:
        for other in groups:
            if other is not g and overlap(tuple(g["bounding"]), tuple(other["bounding"])):
                errs.append(f"group {g['title']!r} overlaps group {other['title']!r}")
    for n in ui["nodes"]:
        box = boxes[n["id"]]
        centre = (box[0] + box[2] / 2, box[1] + box[3] / 2, 0, 0)
        holders = [g for g in groups if inside(centre, tuple(g["bounding"]))]  # the frontend's membership rule
        if n["type"] in VIRTUAL_NODES:
            if holders:
                errs.append(f"{label[n['id']]} (a note) lies in group {holders[0]['title']!r}; notes go beside their group")
            elif groups and min(_gap(box, tuple(g["bounding"])) for g in groups) > 80:
                errs.append(f"{label[n['id']]} (a note) is not beside any group")
            continue
        if len(holders) != 1:
            errs.append(f"{label[n['id']]} is in {len(holders)} groups, expected 1")
            continue
        x, y, w, h = holders[0]["bounding"]
        title_h = holders[0].get("font_size", 24) * 1.4
        if not inside(box, (x, y + title_h, w, h - title_h)):
            errs.append(f"{label[n['id']]} {box} sticks out of group {holders[0]['title']!r} {holders[0]['bounding']}")
    return errs


def _gap(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    """Distance between two boxes (0 when they touch or overlap)."""
    dx = max(b[0] - (a[0] + a[2]), a[0] - (b[0] + b[2]), 0)
    dy = max(b[1] - (a[1] + a[3]), a[1] - (b[1] + b[3]), 0)
    return max(dx, dy)
