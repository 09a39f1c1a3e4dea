"""``make demo``: run the pack's shipped example workflows headless in a real ComfyUI server.

1. ``workflows/layout_preview_api.json``: a layout -> region masks -> a preview of the boxes.
2. ``workflows/regions_ksampler_api.json``: the same layout's region conditioning driving a KSampler.
   No SDXL weights can ship with the pack, so unless ``CHECKPOINTS="a.safetensors ..."`` names real
   checkpoints, this step uses seeded random-weight SDXL-architecture checkpoints made on the fly: its
   image is noise by design, and the output says so.

Everything is written into ``demo-output/``; the paths are printed at the end.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
from host import ComfyServer, error_message, free_port, prepare_base  # noqa: E402
from mepg_testing import EXPERTS, FIXTURE_DIR, link_checkpoints  # noqa: E402

OUT = ROOT / "demo-output"
BASE = ROOT / ".host" / "demo-base"


def checkpoint_choice() -> tuple[str, bool]:
    """The checkpoint file name to load and whether it is a real one the user gave."""
    named = os.environ.get("CHECKPOINTS", "").split()
    if named:
        first = Path(named[0]).expanduser().resolve()
        if first.suffix != ".safetensors" or not first.is_file():
            raise SystemExit(f"CHECKPOINTS: {first} is not a .safetensors file")
        link_checkpoints(BASE, {"user": first})
        return first.name, True
    paths = {"base": FIXTURE_DIR / "tiny_sdxl_base.safetensors"}
    if not paths["base"].exists():
        print("[demo] making tiny random-weight SDXL-architecture checkpoints (no real weights ship)", flush=True)
        subprocess.run([sys.executable, str(ROOT / "tools" / "make_tiny_models.py"), "--out", str(FIXTURE_DIR),
                        "--experts", *EXPERTS], check=True)
    link_checkpoints(BASE, paths)
    return paths["base"].name, False


def save_outputs(server: ComfyServer, entry: dict, names: dict[str, str]) -> list[Path]:
    written = []
    counts: dict[str, int] = {}
    for node_id, data in server.images(entry):
        stem = names.get(node_id, f"node{node_id}")
        counts[stem] = counts.get(stem, 0) + 1
        path = OUT / (f"{stem}.png" if counts[stem] == 1 else f"{stem}_{counts[stem]}.png")
        path.write_bytes(data)
        written.append(path)
    return written


def main() -> int:
    if OUT.exists():
        shutil.rmtree(OUT)
    OUT.mkdir()
    prepare_base(BASE, with_tiny_models=True)
    ckpt, real = checkpoint_choice()
    preview_wf = json.loads((ROOT / "workflows" / "layout_preview_api.json").read_text())
    sample_wf = json.loads((ROOT / "workflows" / "regions_ksampler_api.json").read_text())
    sample_wf["1"]["inputs"]["ckpt_name"] = ckpt
    if not real:
        sample_wf["3"]["inputs"].update(width=512, height=352)
        sample_wf["6"]["inputs"]["steps"] = 8

    report: dict = {"checkpoint": ckpt, "real_weights": real, "timings_s": {}}
    written: list[Path] = []
    print("[demo] starting ComfyUI (CPU, 127.0.0.1) with the pack mounted ...", flush=True)
    t0 = time.perf_counter()
    with ComfyServer(port=free_port(), base=BASE, log_path=OUT / "comfyui.log") as server:
        report["timings_s"]["server_start"] = round(time.perf_counter() - t0, 2)
        for label, wf, names in (
            ("layout_preview", preview_wf, {"3": "layout_preview", "5": "region_mask"}),
            ("regions_ksampler", sample_wf, {"8": "image", "9": "image_layout_overlay"}),
        ):
            t = time.perf_counter()
            entry = server.run(wf, timeout=1800)
            report["timings_s"][label] = round(time.perf_counter() - t, 2)
            if entry["status"]["status_str"] != "success":
                print(f"[demo] {label} failed: {error_message(entry)}", file=sys.stderr)
                return 1
            written += save_outputs(server, entry, names)
    report["layout"] = json.loads(preview_wf["1"]["inputs"]["json_text"])
    report_path = OUT / "report.json"
    report_path.write_text(json.dumps(report, indent=2))
    written.append(report_path)

    print("\n[demo] outputs:")
    for p in written:
        print(f"  {p.relative_to(ROOT)}")
    if not real:
        print("\n[demo] NOTE: the image was sampled with seeded RANDOM-WEIGHT SDXL-architecture checkpoints, made\n"
              "       on the fly because no SDXL weights can ship with the pack: it is noise by design. The layout\n"
              "       preview and masks are real. Use real weights with:\n"
              '         make demo CHECKPOINTS="/path/to/sdxl.safetensors"')
    return 0


if __name__ == "__main__":
    sys.exit(main())
