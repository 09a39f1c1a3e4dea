"""Conditioning for cross-denoise passes: what region passes inherit, and crops of it for window passes.

Two jobs, both on ComfyUI's own conditioning structures:

1. :func:`region_pass_conditioning` (raw CONDITIONING, before sampling): a region pass uses the region's
   prompt in place of the global positive's *unrestricted* entries (those without an area or mask), and
   inherits what those entries attach to the whole picture: the ControlNet chain, hooks (LoRA hooks,
   unless the region's own CLIP set some) and GLIGEN boxes. The global positive's *restricted* entries
   (Conditioning Set Area / Set Mask, the masked entries of a Combine) are the user's own regional
   prompts; they are carried into every pass, like in a plain KSampler.

2. :class:`WindowConditioning` (processed conditions, during sampling): a window pass runs the model
   on a crop of the latent, so every condition is cropped to it: masks, areas (offset to the window;
   an area's soft edge is kept as ComfyUI computes it on the whole canvas), noise-shaped model inputs
   (inpainting ``c_concat``), GLIGEN boxes, and ControlNet / T2I-Adapter hints (each window gets its
   own part of the hint as ComfyUI sizes it for the canvas or the condition's area). A window that is
   the whole canvas passes conditions through untouched. Whatever cannot be cropped raises a
   ValueError naming the node and what to do instead.
"""

from __future__ import annotations

import comfy.conds
import comfy.controlnet
import comfy.samplers
import comfy.utils
import torch

from ..mepg_core import window_crop as wc

WHO = "MEPG Cross-Denoise"
# What an unrestricted positive entry attaches to the picture as a whole (key, what users call it).
PICTURE_ADDONS = (("control", "ControlNets"), ("gligen", "GLIGEN boxes"), ("hooks", "hooks (e.g. LoRA hooks)"))
# Control classes whose hint can be cropped (core ComfyUI; subclasses from other packs may keep state
# this module does not know about, so they are refused rather than cropped wrongly).
CROPPABLE_CONTROLS = (comfy.controlnet.ControlNet, comfy.controlnet.ControlLora, comfy.controlnet.T2IAdapter)


def is_restricted(entry) -> bool:
    """Whether a raw CONDITIONING entry ``[tensor, dict]`` is limited to part of the picture."""
    return "area" in entry[1] or "mask" in entry[1]


def region_pass_conditioning(region_conditioning: list, positive: list, region_label: str) -> list:
    """The raw CONDITIONING of a region's pass (see the module docstring). Raises a ValueError when the
    global positive's unrestricted entries disagree on an add-on (which one would the region take?)."""
    unrestricted = [e for e in positive if not is_restricted(e)] or list(positive)
    addons = {}
    for key, what in PICTURE_ADDONS:
        values = []
        for entry in unrestricted:
            value = entry[1].get(key)
            if not any(value is v for v in values):
                values.append(value)
        if len(values) > 1:
            raise ValueError(
                f"{WHO}: the global positive's entries carry different {what}, so region {region_label!r} "
                f"cannot tell which to keep. Apply them to the whole positive (after Conditioning Combine), "
                f"or give every entry the same")
        if values and values[0] is not None:
            addons[key] = values[0]
            if key == "control":
                flag = unrestricted[0][1].get("control_apply_to_uncond")
                if flag is not None:
                    addons["control_apply_to_uncond"] = flag
    out = []
    for tensor, options in region_conditioning:
        options = dict(options)
        for key, value in addons.items():
            options.setdefault(key, value)  # the region's own (e.g. its CLIP's hooks) win
        out.append([tensor, options])
    return out + [e for e in positive if is_restricted(e)]


class WindowConditioning:
    """Processed conditions cropped to windows, for one sampling run on a ``canvas_hw`` latent.

    Crops are cached per (list, window); control copies made for windows are cleaned up by
    :meth:`cleanup` (call it when the run ends).
    """

    def __init__(self, canvas_hw: tuple[int, int]):
        self.canvas_hw = (int(canvas_hw[0]), int(canvas_hw[1]))
        self._crops: dict[tuple, list] = {}
        self._controls: dict[tuple, object] = {}
        self._hints: dict[tuple, torch.Tensor] = {}

    def crop(self, name: str, conds: list[dict] | None, window: wc.Window | None) -> list[dict] | None:
        """``conds`` (processed, one list, named ``name`` for the cache) for a pass on ``window``
        (``None`` or the whole canvas: unchanged)."""
        height, width = self.canvas_hw
        if conds is None or window is None or tuple(window) == (0, 0, width, height):
            return conds
        key = (name, tuple(window))
        if key not in self._crops:
            cropped = [self._crop_one(c, tuple(window)) for c in conds]
            self._crops[key] = [c for c in cropped if c is not None]
        return self._crops[key]

    def cleanup(self) -> None:
        for control in self._controls.values():
            control.cleanup()
        self._controls.clear()
        self._crops.clear()
        self._hints.clear()

    # -- one condition ---------------------------------------------------------------------------------
    def _crop_one(self, cond: dict, window: wc.Window) -> dict | None:
        area = cond.get("area")
        if area is not None and len(area) != 4:
            raise ValueError(f"{WHO}: an area condition with {len(area) // 2} dimensions cannot be cropped to a "
                             "window (image latents have two)")
        frame = wc.frame_of(area, self.canvas_hw)
        part = wc.intersect(frame, window)
        if part is None:
            return None  # acts nowhere in this window
        x1, y1, x2, y2 = window
        out = dict(cond)
        if area is not None:
            out["area"] = wc.relative_to(part, window)
            if "mask" not in cond:
                # ComfyUI softens an area's inner edges on the whole canvas; keep exactly that weight.
                out["mask"] = self._canvas_area_weight(area)[:, y1:y2, x1:x2]
                out["mask_strength"] = 1.0
        if "mask" in cond:
            mask = cond["mask"]
            if tuple(mask.shape[-2:]) != self.canvas_hw:
                raise ValueError(f"{WHO}: a condition mask of {tuple(mask.shape[-2:])} on a {self.canvas_hw} latent")
            out["mask"] = mask[..., y1:y2, x1:x2]
        out["model_conds"] = {k: self._crop_model_cond(k, v, window) for k, v in cond["model_conds"].items()}
        if cond.get("control") is not None:
            out["control"] = self._control_for(cond["control"], frame, part)
        if "gligen" in cond:
            out["gligen"] = self._crop_gligen(cond["gligen"], frame, part)
        return out

    def _canvas_area_weight(self, area) -> torch.Tensor:
        """``[1, H, W]``: the weight ComfyUI gives an area condition (without mask) on the whole canvas."""
        height, width = self.canvas_hw
        probe = comfy.samplers.get_area_and_mult({"area": area, "model_conds": {}, "uuid": None},
                                                 torch.zeros(1, 1, height, width), torch.zeros(1))
        h, w, y, x = probe.area
        weight = torch.zeros(1, height, width)
        weight[0, y:y + h, x:x + w] = probe.mult[0, 0]
        return weight

    def _crop_model_cond(self, name: str, cond, window: wc.Window):
        if not isinstance(cond, comfy.conds.CONDNoiseShape):
            return cond
        data = cond.cond
        if tuple(data.shape[-2:]) != self.canvas_hw:
            raise ValueError(f"{WHO}: the model input '{name}' is {tuple(data.shape[-2:])}, not the latent's "
                             f"{self.canvas_hw}; it cannot be cropped to a region window")
        x1, y1, x2, y2 = window
        return cond._copy_with(data[..., y1:y2, x1:x2])

    def _crop_gligen(self, gligen, frame: wc.Area, part: wc.Area):
        kind, model, positions = gligen[0], gligen[1], gligen[2]
        if kind != "position":
            return gligen
        boxes = [(int(p[1]), int(p[2]), int(p[3]), int(p[4])) for p in positions]
        kept = [(positions[i][0], *box) for i, box in wc.crop_boxes(boxes, frame, part)]
        return (kind, model, kept) + tuple(gligen[3:])

    # -- controls ----------------------------------------------------------------------------------------
    def _control_for(self, control, frame: wc.Area, part: wc.Area):
        """A copy of ``control`` (and its chain) whose hint is the part of the frame's hint inside
        ``part``; the control itself when ``part`` is its whole frame."""
        if control is None or part == frame:
            return control
        key = (id(control), frame, part)
        if key in self._controls:
            return self._controls[key]
        if type(control) not in CROPPABLE_CONTROLS:
            raise ValueError(
                f"{WHO}: a region window cannot crop the hint of {type(control).__name__} (from "
                f"{type(control).__module__}); only core ComfyUI ControlNet, Control-LoRA and T2I-Adapter hints "
                "can be. Apply the control with core 'Apply ControlNet', or set p1 to 0 (global steps only)")
        copy = control.copy()
        # Runtime state the original got from pre_run when sampling started.
        for attr in ("timestep_range", "model_sampling_current", "manual_cast_dtype"):
            if hasattr(control, attr):
                setattr(copy, attr, getattr(control, attr))
        if isinstance(control, comfy.controlnet.ControlLora):
            copy.control_model = control.control_model
        copy.cond_hint_original = self._hint_part(control, control.cond_hint_original, frame, part,
                                                  _pixel_ratio(control))
        if getattr(control, "extra_concat_orig", None):
            copy.extra_concat_orig = [self._hint_part(control, c, frame, part, control.compression_ratio)
                                      for c in control.extra_concat_orig]
        copy.set_previous_controlnet(self._control_for(control.previous_controlnet, frame, part))
        self._controls[key] = copy
        return copy

    def _hint_part(self, control, hint: torch.Tensor, frame: wc.Area, part: wc.Area, ratio: int) -> torch.Tensor:
        # The hint as ComfyUI sizes it for the frame (center crop to the frame's shape, then scale), cut.
        fh, fw, fy, fx = frame
        ph, pw, py, px = part
        key = (id(hint), fh, fw, ratio)
        if key not in self._hints:
            self._hints[key] = comfy.utils.common_upscale(hint, fw * ratio, fh * ratio, control.upscale_algorithm,
                                                          "center")
        full = self._hints[key]
        top, left = (py - fy) * ratio, (px - fx) * ratio
        return full[..., top:top + ph * ratio, left:left + pw * ratio]


def _pixel_ratio(control) -> int:
    """Hint pixels per latent cell, as the control computes it when it sizes its hint."""
    ratio = int(control.compression_ratio)
    vae = getattr(control, "vae", None)
    if vae is not None:
        ratio *= int(vae.spacial_compression_encode())
    return ratio
