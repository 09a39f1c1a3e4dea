"""Plant known bugs one at a time in a temporary copy of the pack and report which test kills each.

    .venv/bin/python tools/mutation_check.py                  # every bug of the list, unit then contract tier
    .venv/bin/python tools/mutation_check.py --only skip_background_pass ignore_alpha
    .venv/bin/python tools/mutation_check.py --only gate_input_zeros --tests \\
        "tests/contract/test_gate_training.py::test_gate_learns_a_spatially_varying_teacher" --why

The copy holds the checkout's tracked and unignored files; its ``.host`` links this checkout's ComfyUI and
tiny-model fixtures and gets its own ComfyUI base directories, so the checkout itself is never touched
(tests may run in it meanwhile). Each bug is a text replacement that must match exactly once (a bug
whose code has moved is reported, never silently skipped). First the unmutated copy must pass the
selected tests (by default the unit tier and the pack loading from the copy; ``--full-baseline`` for
every tier); then for each bug the tiers run in order (unit, then contract) with ``-x`` and stop at the
first failing test: that test is the bug's killer. A bug no test fails is ``SURVIVED`` and the exit
status is 1. Costs on a 2-core machine: about 1 min per bug killed in the unit tier, a few minutes for
one the contract tier must kill.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

UNIT = ["tests/unit/test_cross_denoise.py", "tests/unit/test_gating.py", "tests/unit/test_composition_core.py"]
CONTRACT = ["tests/contract/test_method_parts.py", "tests/contract/test_cross_denoise.py",
            "tests/contract/test_moe_patch.py",
            "tests/contract/test_gate_training.py::test_gate_learns_a_spatially_varying_teacher"]
# The default baseline: the unit tier, and the pack loading in ComfyUI from the copy (the contract tier in
# full takes long on a small machine; --full-baseline runs it).
SMOKE = ["tests/contract/test_pack_loads.py"]


@dataclass(frozen=True)
class Bug:
    name: str
    path: str
    old: str
    new: str
    what: str


BUGS = [
    Bug("global_ignores_region_experts", "mepg_core/moe_routing.py",
        "routes = tuple(self.global_route(r.expert, r.style) for r in regions)",
        "routes = tuple(RegionRoute.prior([1.0] * self.stack.num_experts) for r in regions)",
        "global steps ignore each region's own experts (a prior of ones)"),
    Bug("softmax_for_sigmoid", "mepg_core/gating.py",
        "raw = torch.sigmoid(logits / options.temperature)",
        "raw = torch.softmax(logits / options.temperature, dim=-1)",
        "the gate's sigmoid replaced by a softmax"),
    Bug("gate_input_zeros", "mepg_core/gating.py",
        "logits = F.linear(x_float, _on(self.gate_weight, x_float), _on(self.gate_bias, x_float))",
        "logits = F.linear(torch.zeros_like(x_float), _on(self.gate_weight, x_float), _on(self.gate_bias, x_float))",
        "the gate fed zeros instead of its input"),
    Bug("swap_two_experts", "mepg_core/gating.py",
        "        bias = None if self.expert_bias is None else self.expert_bias[expert]\n",
        "        expert = {0: 1, 1: 0}.get(expert, expert)\n"
        "        bias = None if self.expert_bias is None else self.expert_bias[expert]\n",
        "experts 0 and 1 swapped in the q/k/v projections"),
    Bug("skip_background_pass", "mepg_core/cross_denoise.py",
        "    if bg_window is not None:\n        x1, y1, x2, y2 = bg_window",
        "    if False:\n        x1, y1, x2, y2 = bg_window",
        "the local step's background pass skipped"),
    Bug("ignore_alpha", "mepg_core/cross_denoise.py",
        "    weights, bg_weight = fusion_weights(plan, alpha)\n    weights = weights.to(x.device, x.dtype)\n"
        "    bg_weight = bg_weight.to(x.device, x.dtype)\n    out = torch.zeros_like(x)\n    for i,",
        "    weights, bg_weight = fusion_weights(plan, 1.0)\n    weights = weights.to(x.device, x.dtype)\n"
        "    bg_weight = bg_weight.to(x.device, x.dtype)\n    out = torch.zeros_like(x)\n    for i,",
        "the local fusion ignores alpha"),
    Bug("never_interleave", "mepg_core/cross_denoise.py",
        "if settings.interleave > 0 and (step + 1) % settings.interleave == 0:",
        "if False and settings.interleave > 0 and (step + 1) % settings.interleave == 0:",
        "global steps never interleaved in the local phase"),
    Bug("step_index_off_by_one", "mepg_core/cross_denoise.py",
        "abs(sigmas[i + 1])):\n            return i\n",
        "abs(sigmas[i + 1])):\n            return min(i + 1, n - 1)\n",
        "sigma-to-step index one step late"),
    Bug("region_prediction_shifted", "mepg_core/cross_denoise.py",
        "out[..., y1:y2, x1:x2] += wi * denoise(i, seen)",
        "out[..., y1:y2, x1:x2] += wi * denoise(i, seen).roll(1, -1)",
        "a region's prediction put back one cell to the right"),
    Bug("style_replaces_gate", "mepg_core/moe_routing.py",
        "return RegionRoute.prior((w > 0).float())",
        "return RegionRoute.fixed(w)",
        "a style gives fixed equal weights (the gate is not consulted)"),
    Bug("global_alpha_constant", "mepg_core/cross_denoise.py",
        "    return settings.global_alpha_start + (settings.global_alpha_end - settings.global_alpha_start) * f\n",
        "    return settings.global_alpha_start\n",
        "fusion's global_alpha schedule ignored (the start value at every global step)"),
    Bug("fusion_drops_regions", "mepg_core/cross_denoise.py",
        "            out[..., y1:y2, x1:x2] += wi * denoise(i, x[..., y1:y2, x1:x2])",
        "            pass",
        "fusion global steps drop the region passes (the global pass alone, under-weighted)"),
]


def copy_checkout(dest: Path) -> None:
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, check=True,
                           capture_output=True).stdout.decode().split("\0")
    for rel in filter(None, files):
        src = ROOT / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    (dest / ".venv").symlink_to(ROOT / ".venv", target_is_directory=True)
    (dest / ".host").mkdir()
    for shared in ("ComfyUI", "fixtures"):  # read only; the bases are the copy's own
        (dest / ".host" / shared).symlink_to(ROOT / ".host" / shared, target_is_directory=True)


def run_tests(copy: Path, tests: list[str], stop_first: bool, why: bool = False) -> tuple[bool, str, float]:
    """(passed, first failing test or a tail of the output, seconds); ``why``: with the first ``E`` line of
    pytest's report (the assertion and the values it saw)."""
    cmd = [str(ROOT / ".venv" / "bin" / "python"), "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rf", *tests]
    if stop_first:
        cmd.insert(4, "-x")
    started = time.perf_counter()
    done = subprocess.run(cmd, cwd=copy, capture_output=True, text=True, env={**os.environ, "PYTHONHASHSEED": "0"})
    seconds = time.perf_counter() - started
    if done.returncode == 0:
        return True, "", seconds
    failed = re.findall(r"^(?:FAILED|ERROR) (\S+)", done.stdout, re.M)
    if not failed:
        return False, (done.stdout + done.stderr)[-400:], seconds
    reason = re.search(r"^E +(.+)$", done.stdout, re.M)
    return False, failed[0] + (f" [{reason.group(1)[:300]}]" if why and reason else ""), seconds


def plant(copy: Path, bug: Bug) -> str:
    path = copy / bug.path
    text = path.read_text()
    if text.count(bug.old) != 1:
        raise SystemExit(f"bug {bug.name}: its code occurs {text.count(bug.old)} times in {bug.path} (moved?)")
    path.write_text(text.replace(bug.old, bug.new))
    return text


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", nargs="*", choices=[b.name for b in BUGS], help="plant only these bugs")
    ap.add_argument("--tests", nargs="*", help="test files / node ids to run instead of the two tiers")
    ap.add_argument("--keep-going", action="store_true", help="run every selected test (no -x): all killers")
    ap.add_argument("--skip-baseline", action="store_true", help="do not first check that the copy passes")
    ap.add_argument("--why", action="store_true", help="add the killing assertion's first line to each row")
    ap.add_argument("--full-baseline", action="store_true",
                    help="the baseline runs every selected tier (default: the unit tier and the pack loading)")
    a = ap.parse_args()
    bugs = [b for b in BUGS if not a.only or b.name in a.only]
    tiers = [a.tests] if a.tests else [UNIT, CONTRACT]
    rows = []
    with tempfile.TemporaryDirectory(prefix="mepg-mutation-") as tmp:
        copy = Path(tmp)
        copy_checkout(copy)
        if not a.skip_baseline:
            for tier in tiers if a.full_baseline or a.tests else [UNIT, SMOKE]:
                ok, detail, seconds = run_tests(copy, tier, stop_first=True)
                print(f"baseline {' '.join(tier)}: {'passed' if ok else 'FAILED ' + detail} ({seconds:.0f} s)",
                      flush=True)
                if not ok:
                    return 2
        for bug in bugs:
            original = plant(copy, bug)
            killer, seconds = None, 0.0
            try:
                for tier in tiers:
                    ok, detail, dt = run_tests(copy, tier, stop_first=not a.keep_going, why=a.why)
                    seconds += dt
                    if not ok:
                        killer = detail
                        break
            finally:
                (copy / bug.path).write_text(original)
            rows.append((bug, killer, seconds))
            print(f"{bug.name}: {killer or 'SURVIVED'} ({seconds:.0f} s)", flush=True)
    width = max(len(b.name) for b, _, _ in rows)
    print("\n| bug | what | killed by |\n|---|---|---|")
    for bug, killer, _ in rows:
        print(f"| {bug.name:<{width}} | {bug.what} | {killer or '**SURVIVED**'} |")
    return 0 if all(k for _, k, _ in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
