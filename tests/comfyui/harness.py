"""Driving a real ComfyUI for the integration suite: server start/stop, prompts, tiny-model graphs.

Everything ComfyUI-side runs in ComfyUI's own venv ($COMFYUI_VENV) via shared/comfyui/tools/serve.sh;
this side only speaks HTTP (standard library). `tiny()` turns a shipped API twin into a graph the
tiny random Wan (make_tiny_wan.py) can run on CPU: small sizes and step counts, tiny model files,
and STAND-INS for the umT5 text encoder and the CLIP vision encoder, which cannot be had here: CLIPTextEncode ->
testnodes' TestZeroConditioning, CLIPLoader -> apt_testnodes' APTTestStandInCLIP, CLIPVisionEncode ->
APTTestStandInClipVisionOutput.
"""

from __future__ import annotations

import copy
import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SHARED_TOOLS = Path(os.environ.get("APT_SHARED_TOOLS", ROOT.parent / "shared" / "comfyui" / "tools"))
PACK_NAME = "ComfyUI-APT"
TINY_WAN = "tiny_wan21_t2v.safetensors"
TINY_VAE = "tiny_wan21_vae.safetensors"
RUN = f"t{uuid.uuid4().hex[:8]}"  # unique names for this session's files
I2V, T2V_3 = "apt_test_tiny_wan21_i2v.safetensors", "apt_test_tiny_wan21_t2v_3layers.safetensors"
TI2V = "apt_test_tiny_wan22_ti2v.safetensors"  # Wan 2.2 TI2V-5B stand-in: 48 channels, ComfyUI class WAN22
A14B_HIGH, A14B_LOW = "apt_test_tiny_wan22_a14b_high_noise.safetensors", "apt_test_tiny_wan22_a14b_low_noise.safetensors"
TINY_MODELS = (I2V, T2V_3, TI2V, A14B_HIGH, A14B_LOW)  # make_tiny_variants.py


LINKS = ((PACK_NAME, ROOT), ("testnodes", SHARED_TOOLS / "testnodes"), ("apt_testnodes", ROOT / "tests" / "comfyui" / "apt_testnodes"))


def free_port() -> int:
    """A free 127.0.0.1 port: the OS's choice, or one in $APT_COMFY_PORTS ("18400-18499") when set."""
    lo, _, hi = os.environ.get("APT_COMFY_PORTS", "0-0").partition("-")
    for port in range(int(lo), int(hi) + 1) if int(lo) else [0]:
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return s.getsockname()[1]
    raise RuntimeError(f"no free port in APT_COMFY_PORTS={os.environ['APT_COMFY_PORTS']}")


def remove_stale_links(custom_nodes: Path) -> list[str]:
    """Remove links this harness left in ComfyUI's custom_nodes/ before it ran from its own base
    directory (same names, pointing at what it links, or dangling); they would load a second copy."""
    removed = []
    for name, target in LINKS:
        link = custom_nodes / name
        if link.is_symlink() and (not link.exists() or link.resolve() == target.resolve()):
            link.unlink()
            removed.append(str(link))
    return removed


class Comfy:
    """A running ComfyUI server (127.0.0.1 only) that loads this pack and the test node packs and
    nothing else: its base directory is a temporary one (custom_nodes/ with our links, user/,
    temp/), and the models are those of the ComfyUI checkout (extra paths, listed first)."""

    def __init__(self, comfy_dir: Path, venv: Path, workdir: Path):
        self.dir, self.venv, self.work = Path(comfy_dir), Path(venv), Path(workdir)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.base = self.work / "base"
        self.input, self.output = self.work / "input", self.work / "output"
        self.log = self.work / "server.log"
        self.pid: int | None = None
        self.linked: list[Path] = []

    def link_packs(self) -> None:
        """Link the packs under test into the server's own custom_nodes/ (replacing stale links there)."""
        custom = self.base / "custom_nodes"
        custom.mkdir(parents=True, exist_ok=True)
        for name, target in LINKS:
            link = custom / name
            if link.is_symlink():
                link.unlink()
            link.symlink_to(target, target_is_directory=True)
            self.linked.append(link)

    def unlink_packs(self) -> None:
        """Remove the links link_packs made."""
        for link in self.linked:
            if link.is_symlink():
                link.unlink()
        self.linked = []

    def model_paths_config(self) -> Path:
        """extra_model_paths YAML: every folder of the checkout's models/, ahead of the base directory's."""
        kinds = sorted(p.name for p in (self.dir / "models").iterdir() if p.is_dir())
        lines = ["apt_test_models:", f"  base_path: {json.dumps(str(self.dir))}", "  is_default: true"]
        lines += [f"  {kind}: models/{kind}" for kind in kinds]
        path = self.work / "extra_model_paths.yaml"
        path.write_text("\n".join(lines) + "\n")
        return path

    def start(self) -> Comfy:
        self.input.mkdir(parents=True, exist_ok=True)
        self.output.mkdir(parents=True, exist_ok=True)
        for link in remove_stale_links(self.dir / "custom_nodes"):
            print(f"removed a stale link left by an earlier version of this harness: {link}")
        self.link_packs()
        env = {**os.environ, "COMFYUI_DIR": str(self.dir), "COMFYUI_VENV": str(self.venv), "COMFY_LOG": str(self.log),
               "COMFY_LOGDIR": str(self.work)}
        out = subprocess.run(["bash", str(SHARED_TOOLS / "serve.sh"), "--port", str(self.port), "--",
                              "--base-directory", str(self.base), "--extra-model-paths-config", str(self.model_paths_config()),
                              "--output-directory", str(self.output), "--input-directory", str(self.input)],
                             env=env, capture_output=True, text=True, timeout=300)
        if out.returncode != 0:
            self.unlink_packs()
            raise RuntimeError(f"ComfyUI did not start:\n{out.stderr[-4000:]}")
        self.pid = int(out.stdout.strip().splitlines()[-1])
        return self

    def stop(self) -> None:
        """Stop the server (and wait for it) and remove the links start made."""
        if self.pid is not None:
            try:
                os.kill(self.pid, signal.SIGTERM)
                for _ in range(100):
                    os.kill(self.pid, 0)
                    time.sleep(0.1)
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.pid = None
        self.unlink_packs()

    def make_models(self, *args: str) -> None:
        """Run make_tiny_wan.py (in ComfyUI's venv) unless its files exist."""
        env = {**os.environ, "COMFYUI_DIR": str(self.dir)}
        subprocess.run([str(self.venv / "bin" / "python"), str(SHARED_TOOLS / "make_tiny_wan.py"), *args], env=env, check=True,
                       capture_output=True, timeout=600)

    # -- HTTP -----------------------------------------------------------------------------------
    def get(self, path: str):
        with urllib.request.urlopen(self.url + path, timeout=60) as r:
            data = r.read()
        return json.loads(data) if data else None

    def post(self, path: str, body: dict | None = None):
        req = urllib.request.Request(self.url + path, data=json.dumps(body or {}).encode(),
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                data = r.read()
                return r.status, (json.loads(data) if data else None)
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"null")

    def submit(self, prompt: dict) -> str:
        code, resp = self.post("/prompt", {"prompt": prompt, "client_id": str(uuid.uuid4())})
        if code != 200:
            raise AssertionError(f"prompt rejected (HTTP {code}): {json.dumps(resp)[:3000]}")
        return resp["prompt_id"]

    def wait(self, prompt_id: str, timeout: float = 600) -> dict:
        t0 = time.time()
        while time.time() - t0 < timeout:
            entry = (self.get(f"/history/{prompt_id}") or {}).get(prompt_id)
            if entry and (entry.get("status", {}).get("completed") or entry.get("status", {}).get("status_str") == "error"):
                return entry
            time.sleep(0.25)
        raise TimeoutError(f"prompt {prompt_id} not done after {timeout}s")

    def run(self, prompt: dict, timeout: float = 600) -> dict:
        """Submit, wait, return the history entry; raise with ComfyUI's error if it failed."""
        entry = self.wait(self.submit(prompt), timeout)
        if entry["status"]["status_str"] != "success":
            raise AssertionError(f"prompt failed: {error_of(entry)}")
        return entry


def error_of(entry: dict) -> str:
    """The execution error / interruption message of a history entry ('' if none)."""
    for ev, data in entry.get("status", {}).get("messages", []):
        if ev == "execution_error":
            return f"{data.get('node_type')}: {data.get('exception_type')}: {data.get('exception_message')}"
        if ev == "execution_interrupted":
            return f"interrupted at {data.get('node_type')}"
    return ""


def texts(entry: dict) -> list[str]:
    """All ui text outputs (PreviewAny, our nodes' reports) of a history entry."""
    out = []
    for o in entry.get("outputs", {}).values():
        out.extend(str(t) for t in o.get("text", []))
    return out


# ----------------------------------------------------------------------------------------------
# Shipped graphs made runnable on the tiny random Wan
# ----------------------------------------------------------------------------------------------


def api_twin(name: str) -> dict:
    return json.loads((ROOT / "workflows" / "api" / f"{name}.json").read_text())


def tiny(prompt: dict, run_id: str, unet: str = TINY_WAN, overrides: dict[str, dict] | None = None) -> dict:
    """A shipped API graph with tiny sizes/steps/models and the text-encoder stand-ins (module docstring)."""
    p = copy.deepcopy(prompt)
    for node in p.values():
        ct, inp = node["class_type"], node["inputs"]
        if ct == "UNETLoader":
            inp["unet_name"] = TINY_WAN if inp["unet_name"].startswith("wan2.1_") else unet
        elif ct == "VAELoader":
            inp["vae_name"] = TINY_VAE
        elif ct == "CLIPLoader":  # stand-in for the umT5 text encoder (see apt_testnodes)
            node.update(class_type="APTTestStandInCLIP", inputs={})
        elif ct == "CLIPTextEncode":  # stand-in for encoding a prompt with umT5
            node.update(class_type="TestZeroConditioning", inputs={"batch": 1, "length": 16, "dim": 4096})
        elif ct == "CLIPVisionEncode":  # stand-in for CLIP ViT-H/14 (see apt_testnodes); CLIPVisionLoader is then unused
            node.update(class_type="APTTestStandInClipVisionOutput", inputs={"seed": 0})
        elif ct in ("EmptyHunyuanLatentVideo", "WanImageToVideo"):
            inp.update(width=64, height=64, length=min(inp["length"], 9))
        elif ct == "APTDatasetFromFolder":
            inp.update(output_dir=f"apt/datasets/{run_id}", width=64, height=64, num_frames=5, fps=8.0)
        elif ct == "APTLoadDataset":
            inp.update(path=f"apt/datasets/{run_id}")
        elif ct == "APTConsistencyDistill":
            inp.update(iterations=2, lr=1e-3, cd_steps=4, grid_shift=2.0, lora_rank=4, precision="fp32", run_name=f"{run_id}-cd", resume=False)
        elif ct == "APTDiscriminator":
            inp.update(lora_rank=2)
        elif ct == "APTTrain":
            inp.update(steps=2, lr=1e-3, batch_size=1, grad_accum=1, lora_rank=4, val_every=1, precision="fp32", run_name=f"{run_id}-apt", resume=False)
        elif ct == "APTSaveGenerator":
            inp.update(filename=f"apt_test/{run_id}/{inp['format']}", dtype="fp32")
        elif ct in ("SaveVideo", "SaveImage"):
            inp["filename_prefix"] = f"apt_test/{run_id}/{ct}"
        elif ct == "APTExportTrainConfig":
            inp.update(filename=f"apt/configs/{run_id}")
    for nid, changes in (overrides or {}).items():
        p[nid]["inputs"].update(changes)
    return p


def write_media(folder: Path) -> None:
    """A small real media folder: 2 captioned videos, 1 captioned image, 1 corrupt video, 1 uncaptioned image."""
    import numpy as np
    from PIL import Image

    from apt_core.media import write_video

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(2):
        write_video(folder / f"clip{i}.mp4", rng.integers(0, 255, (10, 72, 80, 3), dtype=np.uint8), fps=8, overwrite=True)
        (folder / f"clip{i}.txt").write_text(f"a test clip number {i}")
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(folder / "still.png")
    (folder / "still.txt").write_text("a still image")
    (folder / "broken.mp4").write_bytes(b"\x00 not a video" * 64)
    (folder / "broken.txt").write_text("never decoded")
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(folder / "uncaptioned.png")
