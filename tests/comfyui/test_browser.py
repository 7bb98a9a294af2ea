"""The bundled workflows in the real ComfyUI web UI, driven in headless Chromium (issue 15).

For each workflows/*.json: open the frontend served by the test server, load the workflow through
the template browser (sidebar Templates -> ComfyUI-APT -> card), then assert what a user would see:
no missing-node dialog, no toast (zod/validation alerts included), every widget value equal by name
to the API twin's input for that node id (read back from app.graph), and no two nodes' boxes
overlapping once the frontend has sized them. The one-step and training workflows are then queued
with the UI's Run button on the tiny models (harness.tiny: the same stand-ins as the API tests) and
must succeed. A screenshot per workflow is saved under the test's tmp_path.

Needs Debian's `chromium` (or APT_CHROMIUM=<executable>) and `pip install playwright` (its driver
only: never `playwright install`); skipped without them, and without COMFYUI_DIR/COMFYUI_VENV.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.comfyui.harness import ROOT, RUN, api_twin, error_of, tiny
from tests.nodes.make_workflows import workflows

COMFYUI_DIR, COMFYUI_VENV = os.environ.get("COMFYUI_DIR"), os.environ.get("COMFYUI_VENV")
CHROMIUM = os.environ.get("APT_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
QUEUED = {"apt_t2v_one_step", "apt_train_single_gpu"}  # queued from the UI on the tiny models
pytestmark = [
    pytest.mark.comfyui,
    pytest.mark.slow,
    pytest.mark.skipif(not (COMFYUI_DIR and COMFYUI_VENV), reason="real ComfyUI suite: set COMFYUI_DIR and COMFYUI_VENV (docs/COMFYUI.md)"),
]

# Records every toast (PrimeVue .p-toast-message) the page shows, before the app starts.
TOAST_RECORDER = """
window.__aptToasts = [];
new MutationObserver((records) => {
  for (const r of records) for (const n of r.addedNodes) {
    if (n.nodeType !== 1) continue;
    const found = n.matches('.p-toast-message') ? [n] : [...n.querySelectorAll('.p-toast-message')];
    for (const t of found) window.__aptToasts.push(t.innerText.trim());
  }
}).observe(document, {childList: true, subtree: true});
"""

# What the frontend made of the loaded graph: per node its type, box and widgets.
READ_GRAPH = """() => {
  const H = window.LiteGraph.NODE_TITLE_HEIGHT;
  return window.app.graph.nodes.map((n) => ({
    id: n.id, type: n.type, title: n.title,
    box: [n.pos[0], n.pos[1] - H, n.size[0], n.size[1] + H],
    size: [n.size[0], n.size[1]], computed: Array.from(n.computeSize()),
    widgets: (n.widgets || []).map((w) => ({name: w.name, type: w.type, value: w.value})),
  }));
}"""

# Turn the loaded graph into the tiny one: {node id: {class_type, inputs}} from harness.tiny.
MAKE_TINY = """(changes) => {
  const g = window.app.graph;
  const link = (id) => (g.links instanceof Map ? g.links.get(id) : g.links[id]);
  const setWidgets = (node, inputs) => {
    for (const [name, value] of Object.entries(inputs)) {
      const w = (node.widgets || []).find((w) => w.name === name);
      if (!w) throw new Error(`node ${node.id} (${node.type}) has no widget ${name}`);
      w.value = value;
    }
  };
  for (const [id, change] of Object.entries(changes)) {
    let node = g.getNodeById(Number(id));
    if (node.type !== change.class_type) {  // a stand-in replaces the node, same outputs
      const repl = window.LiteGraph.createNode(change.class_type);
      repl.pos = [node.pos[0], node.pos[1]];
      g.add(repl);
      (node.outputs || []).forEach((out, slot) => {
        for (const l of [...(out.links || [])]) {
          const L = link(l);
          repl.connect(slot, g.getNodeById(L.target_id), L.target_slot);
        }
      });
      g.remove(node);
      node = repl;
    }
    setWidgets(node, change.inputs);
  }
  window.app.graph.setDirtyCanvas(true, true);
}"""


def is_link(value) -> bool:
    return isinstance(value, list) and len(value) == 2 and isinstance(value[1], int)


def same(a, b) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        return isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool) \
            and math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)
    return a == b and type(a) is type(b)


def widget_mismatches(nodes: list[dict], twin: dict) -> list[str]:
    """Every API-twin widget input whose widget (by name, same node id) is missing or holds another value."""
    by_id = {str(n["id"]): n for n in nodes}
    out = []
    for nid, spec in twin.items():
        node = by_id.get(nid)
        if node is None or node["type"] != spec["class_type"]:
            out.append(f"node {nid} {spec['class_type']}: loaded as {node and node['type']}")
            continue
        widgets = {w["name"]: w["value"] for w in node["widgets"]}
        for name, want in spec["inputs"].items():
            if is_link(want):
                continue
            if name not in widgets:
                out.append(f"node {nid} {spec['class_type']}.{name}: no widget (widgets: {list(widgets)})")
            elif not same(widgets[name], want):
                out.append(f"node {nid} {spec['class_type']}.{name} = {widgets[name]!r}, workflow intends {want!r}")
    return out


def overlaps(nodes: list[dict]) -> list[str]:
    """Pairs of nodes whose boxes (title bar included) intersect."""
    out = []
    for i, a in enumerate(nodes):
        for b in nodes[i + 1:]:
            (ax, ay, aw, ah), (bx, by, bw, bh) = a["box"], b["box"]
            if min(ax + aw, bx + bw) > max(ax, bx) and min(ay + ah, by + bh) > max(ay, by):
                out.append(f"{a['id']} {a['type']} {[round(v) for v in a['box']]} overlaps "
                           f"{b['id']} {b['type']} {[round(v) for v in b['box']]}")
    return out


def tiny_changes(name: str, run_id: str) -> dict[str, dict]:
    """The node-by-node differences between the API twin and harness.tiny's runnable version of it."""
    twin = api_twin(name)
    small = tiny(twin, run_id)
    changes = {}
    for nid, spec in small.items():
        old = twin[nid]
        inputs = {k: v for k, v in spec["inputs"].items() if not is_link(v) and (spec["class_type"] != old["class_type"]
                                                                                 or old["inputs"].get(k) != v)}
        if inputs or spec["class_type"] != old["class_type"]:
            changes[nid] = {"class_type": spec["class_type"], "inputs": inputs}
    return changes


@pytest.fixture(scope="module")
def browser(comfy):
    sync_api = pytest.importorskip("playwright.sync_api", reason="browser test: pip install playwright (docs/COMFYUI.md)")
    if not Path(CHROMIUM).is_file():
        pytest.skip(f"browser test: no Chromium at {CHROMIUM} (apt-get install chromium, or set APT_CHROMIUM)")
    # A user who has seen the tutorial; the bundled models are absent here (tiny ones are used instead);
    # screenshots in full detail without minimap and canvas info. The navigation settings are stored:
    # frontend 1.27.10 throws on a brand-new user, setting them from NavigationMode's onChange before
    # they are registered (a page error unrelated to this pack).
    code, _ = comfy.post("/settings", {"Comfy.TutorialCompleted": True, "Comfy.Workflow.ShowMissingModelsWarning": False,
                                       "Comfy.Canvas.NavigationMode": "legacy", "Comfy.Canvas.LeftMouseClickBehavior": "panning",
                                       "Comfy.Canvas.MouseWheelScroll": "zoom", "LiteGraph.Canvas.MinFontSizeForLOD": 0,
                                       "Comfy.Minimap.Visible": False, "Comfy.Graph.CanvasInfo": False})
    assert code == 200, code
    with sync_api.sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield b
        b.close()
    for kind in ("diffusion_models", "loras"):
        shutil.rmtree(comfy.dir / "models" / kind / "apt_test" / f"{RUN}-ui", ignore_errors=True)


@dataclass
class UI:
    """The browser page shared by the workflows (booting the frontend is the slow part)."""

    page: Any
    errors: list[str] = field(default_factory=list)  # JavaScript errors since the last load
    ready: bool = False  # the frontend is up and in a known state (reloaded after a failed test)


@pytest.fixture(scope="module")
def ui(browser):
    context = browser.new_context(viewport={"width": 1600, "height": 900})
    u = UI(context.new_page())
    u.page.add_init_script(TOAST_RECORDER)
    u.page.on("pageerror", lambda e: u.errors.append(f"{e.stack or e}"))
    yield u
    context.close()


def open_template(ui: UI, comfy, name: str) -> None:
    """Load `name` from the template browser, as a user does: sidebar Templates, ComfyUI-APT, the card."""
    page = ui.page
    if not ui.ready:
        page.goto(comfy.url)
        page.wait_for_function("window.app && window.app.vueAppReady && window.app.graph", timeout=120_000)
    page.evaluate("() => { window.__aptToasts = []; for (const n of window.app.graph.nodes) n.__aptOld = true; }")
    ui.errors.clear()
    page.locator(".templates-tab-button").first.click()
    page.get_by_role("option", name="ComfyUI-APT", exact=True).click()
    page.locator(f'[data-testid="template-workflow-{name}"]').click()
    expected = len(json.loads((ROOT / "workflows" / f"{name}.json").read_text())["nodes"])
    page.wait_for_function(f"window.app.graph.nodes.length === {expected} && !window.app.graph.nodes.some((n) => n.__aptOld)",
                           timeout=60_000)
    page.wait_for_timeout(1500)  # let the canvas draw and any toast or dialog appear


def problems_in(ui: UI, name: str, nodes: list[dict]) -> list[str]:
    """Everything a user would see go wrong with the loaded workflow (module docstring)."""
    page, problems = ui.page, []
    missing = page.locator(".comfy-missing-nodes")
    if missing.count():
        problems.append(f"missing-node dialog: {missing.first.inner_text()}")
    problems += [f"toast: {t}" for t in page.evaluate("window.__aptToasts")]
    problems += [f"page error: {e}" for e in ui.errors]
    problems += widget_mismatches(nodes, api_twin(name))
    problems += overlaps(nodes)
    return problems


@pytest.mark.parametrize("name", sorted(workflows()))
def test_workflow_in_the_web_ui(comfy, ui, tmp_path, name):
    page = ui.page
    open_template(ui, comfy, name)
    ui.ready = False  # until this test passes
    shot = tmp_path / f"{name}.png"
    page.screenshot(path=str(shot))
    nodes = page.evaluate(READ_GRAPH)
    (tmp_path / f"{name}.nodes.json").write_text(json.dumps(nodes, indent=1))
    problems = problems_in(ui, name, nodes)
    assert not problems, f"{name} in the web UI (screenshot {shot}):\n" + "\n".join(problems)

    if name in QUEUED:
        page.evaluate(MAKE_TINY, tiny_changes(name, f"{RUN}-ui"))
        with page.expect_response(lambda r: r.url.endswith("/prompt") and r.request.method == "POST") as sent:
            page.locator('[data-testid="queue-button"]').first.click()
        assert sent.value.status == 200, f"{name}: the UI's prompt was refused: {sent.value.text()[:3000]}"
        entry = comfy.wait(sent.value.json()["prompt_id"], 600)
        assert entry["status"]["status_str"] == "success", f"{name} queued from the UI failed: {error_of(entry)}"
        page.wait_for_timeout(1500)  # the outputs' previews arrive and grow their nodes
        shot = tmp_path / f"{name}.queued.png"
        page.screenshot(path=str(shot))
        after = page.evaluate(READ_GRAPH)
        (tmp_path / f"{name}.queued.nodes.json").write_text(json.dumps(after, indent=1))
        grown = overlaps(after) + [f"page error: {e}" for e in ui.errors]
        assert not grown, f"{name} after its run in the web UI (screenshot {shot}):\n" + "\n".join(grown)
    ui.ready = True
