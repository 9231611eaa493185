"""Presets: named sets of cases (mechanism specs at resolutions, or whole networks at image
sizes), with the threads, repeats and layer shape each runs with unless told otherwise."""

from __future__ import annotations

from dataclasses import dataclass

@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    specs: tuple[str, ...]
    resolutions: tuple[int, ...] = ()  # used when the user gives none
    threads: int = 0  # used when the user gives none (0: torch's default)
    repeat: int = 1  # fresh processes per case, used when the user gives none
    layer: tuple[tuple[str, int], ...] = ()  # the layer's stride, dim, heads where the preset sets them

    def shape(self, **given: int | None) -> dict[str, int]:
        """stride, dim and heads: those ``given`` (not None), else the preset's, else a
        BiFormer-T stage-1 layer (stride 4, dim 64, 2 heads)."""
        return {**LAYER_DEFAULTS, **dict(self.layer), **{k: v for k, v in given.items() if v is not None}}


LAYER_DEFAULTS = {"stride": 4, "dim": 64, "heads": 2}


DEFAULT_SPECS = (
    "full",
    "full:impl=naive",
    "window:window_size=8",
    "window:window_size=8,shift=4",
    "axial:stripe=1",
    "dilated:window_size=8,dilation=0",  # MaxViT grid: dilation = H / k at every size
    "neighborhood:kernel_size=7",
    "neighborhood:kernel_size=7,impl=gather",  # each query's k^2 keys copied out: the baseline for the tiled form
    "deformable:stride=8",
    "sra:sr_ratio=8",
    "bra:n_win=8,topk=1",
    "bra:n_win=8,topk=4",
    "bra:n_win=8,topk=16",
    "bra:n_win=8,topk=4,impl=gather",  # the official computation, the baseline for the fast one
    "bra:n_win=8,topk=16,impl=gather",
)
BRA_GRID_SPECS = ("full", "window:window_size=8") + tuple(
    f"bra:n_win={n_win},topk={topk}" for n_win in (4, 7, 8, 16) for topk in (1, 2, 4, 8, 16)
)
# bench fidelity's default set, built-ins only: the two commands pair on --preset / --setting biformer-t-stage3
FIDELITY_SPECS = (
    "full",
    "window:window_size=8",
    "axial:stripe=2",
    "dilated:window_size=6,dilation=3",
    "neighborhood",
    "deformable:stride=4",
    "sra:sr_ratio=4",
    "bra:n_win=4,topk=4",
) + tuple(f"bra:n_win=8,topk={k}" for k in (1, 2, 4, 8, 16))
CI_SPECS = (
    "full",
    "full:impl=naive",
    "window:window_size=8",
    "window:window_size=8,shift=4",
    "axial:stripe=1",
    "dilated:window_size=8,dilation=2",
    "neighborhood:kernel_size=7",
    "deformable:stride=8",
    "sra:sr_ratio=8",
    "bra:n_win=8,topk=4",
)


@dataclass(frozen=True)
class ModelPreset:
    """Whole networks: each entry a model (NAME or NAME@overrides), an image size and a batch."""

    name: str
    description: str
    models: tuple[tuple[str, int, int, int], ...]  # (model, height, width, batch)
    gpu_models: tuple[tuple[str, int, int, int], ...] = ()  # more, run only on a GPU (too slow for a CPU run)
    threads: int = 0
    repeat: int = 1


NAMED_MODELS = ("biformer_t", "biformer_s", "biformer_b", "swin_t", "swin_s", "swin_b")
# the mechanisms in the STL network; axial splits heads in two, so it gets heads of 48 channels
# (2/4/8 heads in stages 1-3 instead of 3/6/12: the same parameters and MACs)
STL_MODELS = ("stl:full", "stl:window:window_size=7", "stl:axial:stripe=1@head_dim=48",
              "stl:dilated:window_size=7,dilation=0", "stl:neighborhood:kernel_size=7", "stl:deformable",
              "stl:sra", "stl:bra:n_win=7")
DENSE_SIZES = ((512, 2048), (800, 1280))  # ADE20K and COCO inputs (height x width), as Swin and BiFormer count FLOPs
BACKBONE_CASES = (
    tuple((m, 224, 224, 64) for m in NAMED_MODELS)
    + tuple((m, h, w, 1) for h, w in ((224, 224),) + DENSE_SIZES for m in STL_MODELS
            if not (m == "stl:full" and (h, w) == (512, 2048)))
    # BRA's official region counts for dense prediction: n_win 8 (segmentation), 16 (detection)
    + (("stl:bra:n_win=8", 512, 2048, 1), ("stl:bra:n_win=16", 800, 1280, 1))
)
# global attention at 512x2048 takes 26 s a call on a 2-core CPU (3 minutes a case); 800x1280,
# nearly as many pixels, shows the same on a CPU run
BACKBONE_GPU_CASES = (("stl:full", 512, 2048, 1),)


PRESETS = {
    p.name: p
    for p in (
        Preset("default", "every mechanism at its paper's settings, full attention fused and naive, BRA topk 1/4/16 "
               "at n_win 8 (and the official gather BRA at topk 4/16)", DEFAULT_SPECS),
        Preset("bra-grid", "BRA over topk {1,2,4,8,16} x n_win {4,7,8,16}, with full and window as references",
               BRA_GRID_SPECS),
        # one thread: on a shared 2-core machine it halves the run-to-run spread of the timings
        # three processes per case: one process's timings can sit 2x off another's on this VM
        # 256 px (64x64 tokens): every case under 0.3 s a call, so bench gate's 20 processes take minutes
        Preset("ci", "small and fast, for the perf gate (256 px at stride 4, one thread; bench run: each case the "
               "median of 3 processes)", CI_SPECS, (256,), threads=1, repeat=3),
        # BiFormer-T (dims 64/128/256/512, 32 channels a head) at 1024 px: stage 3 is 64x64 tokens at stride 16
        Preset("biformer-t-stage3", "bench fidelity's default set on BiFormer-T's stage-3 layer at 1024 px: 64x64 tokens "
               "(stride 16), dim 256, 8 heads", FIDELITY_SPECS, (1024,), layer=(("stride", 16), ("dim", 256), ("heads", 8))),
        ModelPreset("backbones", "whole networks: BiFormer-T/S/B and Swin-T/S/B at 224 px, batch 64; the STL network "
                    "with each mechanism at 224, 512x2048 and 800x1280, batch 1 (global attention at 512x2048 on a GPU only)",
                    BACKBONE_CASES, BACKBONE_GPU_CASES),
    )
}


def preset(name: str) -> Preset | ModelPreset:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset '{name}'; known: {', '.join(PRESETS)}") from None
