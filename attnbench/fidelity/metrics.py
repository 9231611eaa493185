"""What a sparse pattern keeps of full attention, measured per query on real images.

For one mechanism, one image and every query (or a seeded sample of them):

- ``keys_fraction``: the share of the image's tokens the query's pattern attends, per head,
  averaged over heads (a key that stands for several tokens, as in spatial reduction,
  covers them all);
- ``mass_kept``: the share of full attention's softmax mass that falls on those tokens.
  Full attention is built from the mechanism's own q, k and v of every token
  (``token_qkv``), so only the pattern differs, not the weights. Defined for patterns that
  choose which tokens a query sees; empty for a mechanism whose keys stand for every token
  (``covers_every_token``: pooled or approximated keys), where it would be 1 by definition;
- ``output_error``: ``|o_pattern - o_full| / |o_full|`` over all heads' channels, the
  attention outputs before the output projection (terms added outside the attention,
  such as BRA's lepe, left out of both).

A pattern that attended keys at random would keep about its key share of the mass; what
it keeps above that is what its choice of keys is worth. Everything runs in float64, so
that no weight inside a pattern underflows to zero and counts as unattended.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ..attention import AttentionBase, AttentionMap, build_attention, canonical, format_spec, list_attentions

METRICS = ("keys_fraction", "mass_kept", "output_error")
WEIGHT_KINDS = ("content", "random")
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
TOPKS = (1, 2, 4, 8, 16)  # the routed-region counts the default set sweeps, at n_win 8


@dataclass
class QueryFidelity:
    """Each metric per query, (Q,) each, in query order."""

    keys_fraction: Tensor
    mass_kept: Tensor
    output_error: Tensor

    @staticmethod
    def cat(parts: Sequence["QueryFidelity"]) -> "QueryFidelity":
        return QueryFidelity(*(torch.cat([getattr(p, m) for p in parts]) for m in METRICS))


@dataclass(frozen=True)
class Settings:
    resolution: int = 512  # images are centre-cropped square and resized to this side
    stride: int = 16  # pixels per token
    dim: int = 64
    heads: int = 2
    max_queries: int = 4096  # more tokens than this: a seeded random sample of queries
    seed: int = 0

    @property
    def grid(self) -> tuple[int, int]:
        return self.resolution // self.stride, self.resolution // self.stride

    def check(self) -> None:
        for name, option in (("resolution", "--resolution"), ("stride", "--stride"), ("dim", "--dim"),
                             ("heads", "--heads"), ("max_queries", "--queries")):  # named as the command line has them
            if getattr(self, name) < 1:
                raise ValueError(f"{option} {getattr(self, name)} must be >= 1")
        if self.resolution % self.stride:
            raise ValueError(f"--resolution {self.resolution} is not a multiple of --stride {self.stride}; "
                             f"try {self.resolution // self.stride * self.stride}")


# a layer shape a study and a `bench run --preset` of the same name share (sweep.PRESETS)
NAMED_SETTINGS = {
    "biformer-t-stage3": Settings(resolution=1024, stride=16, dim=256, heads=8),  # 64x64 tokens
}


def named_setting(name: str, max_queries: int, **given: int | None) -> Settings:
    """The named setting with ``max_queries``; a ValueError for an unknown name, or for
    options that would change the layer it names."""
    if name not in NAMED_SETTINGS:
        raise ValueError(f"unknown --setting '{name}'; known: {', '.join(NAMED_SETTINGS)}")
    clash = [f"--{k.replace('_', '-')}" for k, v in given.items() if v is not None]
    if clash:
        raise ValueError(f"{', '.join(clash)}: --setting {name} sets the grid, channels and heads; give one or the other")
    return replace(NAMED_SETTINGS[name], max_queries=max_queries)


def default_specs() -> list[str]:
    """``bench viz``'s set (every mechanism at its legible settings, plugins included) and BRA
    at n_win 8 over topk 1..16, deduplicated."""
    specs = [format_spec(info.name, info.demo) for info in list_attentions()]
    specs += [f"bra:n_win=8,topk={k}" for k in TOPKS]
    seen, out = set(), []
    for spec in specs:
        key = (canonical(spec).name, canonical(spec).params_text)
        if key not in seen:
            seen.add(key)
            out.append(spec)
    return out


def has_token_qkv(module: torch.nn.Module) -> bool:
    return type(module).token_qkv is not AttentionBase.token_qkv


def key_support(amap: AttentionMap, grid: tuple[int, int]) -> Tensor:
    """(Q, heads, H*W) bool: the image tokens each query attends in each head. Keys on a
    coarser grid cover the tokens they stand for; padded keys (BRA's auto_pad) are dropped."""
    H, W = grid
    seen = (amap.weights != 0).to(torch.uint8)
    sy, sx = amap.key_stride
    if (sy, sx) != (1, 1):
        seen = seen.repeat_interleave(sy, 2).repeat_interleave(sx, 3)
    seen = F.pad(seen, (0, max(0, W - seen.shape[3]), 0, max(0, H - seen.shape[2])))  # cells that end short
    return seen[:, :, :H, :W].flatten(2).bool()


def compare_to_full(amap: AttentionMap, q: Tensor, k: Tensor, v: Tensor, grid: tuple[int, int]) -> QueryFidelity:
    """The three metrics for the map's queries; q, k, v: (heads, H*W, d) as ``token_qkv`` gives them."""
    W = grid[1]
    tokens = torch.tensor([y * W + x for y, x in amap.queries])
    full = (q[:, tokens] @ k.transpose(-2, -1)).softmax(-1).transpose(0, 1)  # (Q, heads, N)
    support = key_support(amap, grid)
    mass = (full * support).sum(-1).mean(-1)
    keys = support.to(full.dtype).mean(-1).mean(-1)
    full_out = torch.einsum("qhn,hnd->qhd", full, v)
    pattern_out = torch.einsum("qhyx,hyxd->qhd", amap.weights.to(v.dtype), amap.values.to(v.dtype))
    error = (pattern_out - full_out).flatten(1).norm(dim=1) / full_out.flatten(1).norm(dim=1).clamp_min(1e-300)
    return QueryFidelity(keys, mass, error)


def query_positions(grid: tuple[int, int], limit: int, seed: int = 0) -> list[tuple[int, int]]:
    """Every position of the grid, row-major, or a seeded sample of ``limit`` of them."""
    H, W = grid
    ids = list(range(H * W))
    if len(ids) > limit:
        ids = sorted(random.Random(seed).sample(ids, limit))
    return [(i // W, i % W) for i in ids]


@torch.no_grad()
def measure(module: AttentionBase, tokens: Tensor, queries: list[tuple[int, int]], chunk: int = 256) -> QueryFidelity:
    """The metrics of ``module`` on ``tokens`` (1, H, W, C) for ``queries``, in chunks so that
    the maps hold chunk x heads x N weights at a time."""
    grid = tuple(tokens.shape[1:3])
    q, k, v = module.token_qkv(tokens)
    parts = [compare_to_full(module.attention_map(tokens, queries[i:i + chunk]), q, k, v, grid)
             for i in range(0, len(queries), chunk)]
    return QueryFidelity.cat(parts)


def build(spec: str, kind: str, settings: Settings, checkpoint: dict | None = None) -> AttentionBase | None:
    """The mechanism in float64 with ``kind`` weights: content, random, or checkpoint (None
    when the checkpoint does not hold this mechanism's tensors)."""
    from ..maps import build_for_viz

    if kind == "checkpoint":
        module = build_for_viz(spec, settings.dim, settings.heads, "random", checkpoint, settings.seed, partial="skip")
        if not getattr(module, "loaded_checkpoint", False):
            return None
    else:
        module = build_for_viz(spec, settings.dim, settings.heads, kind, seed=settings.seed)
    return module.double()


def check_specs(specs: list[str], settings: Settings, required: bool,
                content: bool = False) -> tuple[list[str], list[str]]:
    """(specs that can be measured on the grid, notes on those left out). Bad parameters,
    and a spec the grid cannot take, raise ValueError; so does one without ``token_qkv``
    (or, for ``content`` weights, without declared projections) when it was asked for
    (``required``); from the default set it is left out with a note."""
    from ..content import declared_projections

    keep, notes = [], []
    H, W = settings.grid
    probe = torch.zeros(1, H, W, settings.dim)
    for spec in specs:
        module = build_attention(spec, settings.dim, settings.heads)
        message = None
        if not has_token_qkv(module):
            message = f"{spec}: its mechanism does not define token_qkv, which fidelity needs to build full attention"
        elif content:
            try:
                declared_projections(module)
            except ValueError as exc:
                message = f"{spec}: {exc}"
        if message:
            if required:
                raise ValueError(message)
            notes.append(message + "; left out")
            continue
        try:
            with torch.no_grad():
                module.attention_map(probe, [(0, 0)])
        except ValueError as exc:
            raise ValueError(f"{spec} cannot run on the {H}x{W} token grid of --resolution {settings.resolution} "
                             f"--stride {settings.stride}: {exc}") from None
        keep.append(spec)
    return keep, notes


def summarise(values: Tensor) -> tuple[float, float, float]:
    """Mean, 25th and 75th percentile."""
    v = values.double()
    return float(v.mean()), float(torch.quantile(v, 0.25)), float(torch.quantile(v, 0.75))


def row(spec: str, kind: str, image: str, settings: Settings, result: QueryFidelity,
        covers_every_token: bool = False) -> dict:
    """One line of fidelity.csv: a mechanism on an image, its metrics' mean and quartiles over
    queries; mass kept left empty (None) for a mechanism whose keys stand for every token."""
    c = canonical(spec)
    H, W = settings.grid
    out = {"mechanism": c.name, "params": c.params_text, "image": image}
    for metric in METRICS:
        mean, p25, p75 = (None,) * 3 if metric == "mass_kept" and covers_every_token else \
            summarise(getattr(result, metric))
        out[metric] = mean
        out[f"{metric}_p25"], out[f"{metric}_p75"] = p25, p75
    out.update(weights=kind, label=c.label, resolution=settings.resolution, stride=settings.stride, height=H, width=W,
               dim=settings.dim, heads=settings.heads, queries=len(result.mass_kept))
    return out


def image_names(paths: list[Path]) -> list[str]:
    """File names, or whole paths where two images share a name."""
    names = [p.name for p in paths]
    return [n if names.count(n) == 1 else str(p) for n, p in zip(names, paths)]


class _Captured(Exception):
    """Raised by the feature hook: the rest of the network need not run."""


@dataclass
class Network:
    """A backbone whose features at the input of one block's attention are the tokens, and
    whose own attention there is measured too (weights kind ``network``)."""

    name: str
    stage: int  # 1-4
    model: torch.nn.Module

    @property
    def block(self) -> torch.nn.Module:
        return self.model.stage_blocks(self.stage - 1)[0]

    @property
    def spec(self) -> str:
        return self.block.attn_spec

    @property
    def reduction(self) -> int:
        return 4 * 2 ** (self.stage - 1)  # every backbone here: a stride-4 stem, then 2x per stage

    def features(self, picture) -> Tensor:
        """(1, h, w, C) float64: the stage's first block's attention input (after its norm)
        for an RGB picture in [0, 1], normalised as ImageNet models expect."""
        x = torch.from_numpy(picture).permute(2, 0, 1)[None].double()
        x = (x - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
        captured: list[Tensor] = []

        def hook(module, inputs, output):
            captured.append(output.detach())
            raise _Captured

        handle = self.block.norm1.register_forward_hook(hook)
        try:
            with torch.no_grad():
                self.model(x)
        except _Captured:
            pass
        finally:
            handle.remove()
        return captured[0]


def network_for(name: str, stage: int, state: dict | None) -> Network:
    """The backbone ``name`` (with ``state`` loaded, strictly) in float64; ValueErrors name what does not fit."""
    from ..backbones import build_model

    model = build_model(name).eval()
    if not 1 <= stage <= 4:
        raise ValueError(f"--stage {stage} is out of range; a backbone has stages 1..4")
    if state is not None:
        try:  # shapes that differ raise here; missing and unexpected keys come back
            missing, unexpected = (sorted(x) for x in model.load_state_dict(state, strict=False))
        except RuntimeError as exc:
            raise ValueError(f"the checkpoint does not fit {name}: {str(exc).splitlines()[-1].strip()}") from None
        if missing or unexpected:
            raise ValueError(f"the checkpoint does not fit {name}: missing {', '.join(missing[:3]) or 'nothing'}"
                             f"{', ...' if len(missing) > 3 else ''}; unexpected {', '.join(unexpected[:3]) or 'nothing'}"
                             f"{', ...' if len(unexpected) > 3 else ''}")
    network = Network(name, stage, model.double())
    if network.spec is None or not isinstance(network.block.attn, AttentionBase):
        raise ValueError(f"stage {stage} of {name} is global attention with LePE, not a zoo mechanism whose pattern "
                         "could be measured; choose another --stage")
    return network


def run(measurements: list[tuple[str, str, AttentionBase]], images: list[Path], settings: Settings, *,
        network: Network | None = None, on_row: Callable[[dict], None] = lambda r: None,
        on_step: Callable[[str], None] = lambda s: None, names: list[str] | None = None) -> list[dict]:
    """Every measurement (see :meth:`Study.plan`) on every image, each row handed to ``on_row`` as it
    finishes. With a ``network``, the tokens are its features; else the image's statistics."""
    from ..content import content_tokens, load_square
    from ..maps import mechanism_code

    rows = []
    queries = query_positions(settings.grid, settings.max_queries, settings.seed)
    for path, name in zip(images, names or image_names(images)):
        picture = load_square(path, settings.resolution)
        if network is not None:
            tokens = network.features(picture)
            if tuple(tokens.shape[1:3]) != settings.grid:
                raise ValueError(f"{network.name}'s stage {network.stage} gives a {tokens.shape[1]}x{tokens.shape[2]} map "
                                 f"at {settings.resolution} px, not {settings.grid[0]}x{settings.grid[1]}")
        else:
            tokens = content_tokens(picture, settings.stride, settings.dim).double()
        for kind, spec, module in measurements:
            on_step(f"{name}: {spec} ({kind})")
            with mechanism_code(spec):  # a failure names its mechanism
                result = measure(module, tokens, queries)
            rows.append(row(spec, kind, name, settings, result, bool(module.covers_every_token)))
            on_row(rows[-1])
    return rows


@dataclass(frozen=True)
class Study:
    """What `bench fidelity` measures, sent whole to each of its bounded processes: the
    mechanisms are built there, never in the caller's."""

    specs: tuple[str, ...]
    kinds: tuple[str, ...]  # weight kinds: content, random, checkpoint, network
    settings: Settings
    checkpoint_path: str | None = None  # an attention state dict (kind checkpoint), or with model the model's
    model: str | None = None  # a backbone whose stage's features are the tokens (kind network)
    stage: int = 1

    @property
    def checkpoint(self) -> dict | None:
        """The attention checkpoint, read where it is used (a state dict sent to another process
        would take a file descriptor per tensor)."""
        from ..maps import load_checkpoint

        return load_checkpoint(self.checkpoint_path) if self.checkpoint_path and not self.model else None

    def network(self) -> Network | None:
        from ..maps import read_state_dict

        state = read_state_dict(self.checkpoint_path) if self.checkpoint_path else None
        return network_for(self.model, self.stage, state) if self.model else None

    def plan(self, network: Network | None = None) -> list[tuple[str, str, AttentionBase]]:
        """(weights kind, spec, module) for each measurement of an image, each module built once:
        every spec with content and random weights, those the checkpoint fits with it, and for
        kind ``network`` the network's own attention."""
        from ..maps import mechanism_code

        out, checkpoint = [], self.checkpoint
        for kind in self.kinds:
            if kind == "network":
                out.append((kind, network.spec, network.block.attn))
                continue
            for spec in self.specs:
                with mechanism_code(spec):
                    module = build(spec, kind, self.settings, checkpoint)
                if module is not None:
                    out.append((kind, spec, module))
        return out


def network_shape(model: str, stage: int, checkpoint_path: str | None) -> tuple[int, int, int]:
    """(pixels per token, channels, heads) at ``stage`` of the backbone ``model``."""
    network = Study((), (), Settings(), checkpoint_path, model, stage).network()
    return network.reduction, network.block.norm1.normalized_shape[0], network.block.attn.num_heads


def check_study(study: Study, required: bool) -> tuple[tuple[str, ...], list[str], int]:
    """The specs the study can measure, notes on those left out, and the measurements per
    image; a ValueError for a spec the grid cannot take or a checkpoint that fits nothing."""
    from ..maps import mechanism_code

    kept, notes = [], []
    for spec in study.specs:
        with mechanism_code(spec):
            k, n = check_specs([spec], study.settings, required, content="content" in study.kinds)
        kept += k
        notes += n
    checked = replace(study, specs=tuple(kept))
    measurements = checked.plan(checked.network())
    if study.checkpoint_path and not study.model and not any(kind == "checkpoint" for kind, _, _ in measurements):
        raise ValueError(f"the checkpoint fits none of the mechanisms ({', '.join(kept)}) at --dim "
                         f"{study.settings.dim} --heads {study.settings.heads}; name the mechanism it was trained "
                         "for with --methods")
    return tuple(kept), notes, len(measurements)


def study_image(study: Study, path: Path, name: str) -> list[dict]:
    """Every measurement of ``study`` on one image: its rows (run in the study's bounded process)."""
    network = study.network()
    return run(study.plan(network), [path], study.settings, network=network, names=[name])
