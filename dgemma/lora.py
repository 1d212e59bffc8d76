"""LoRA adapters for DiffusionGemma: surgery applied from outside the model (like quant.py), and adapter folders in
the PEFT format, named for transformers' `DiffusionGemmaForBlockDiffusion`.

    from dgemma.lora import LoRAConfig, apply_lora, save_adapter, load_adapter, merge_lora
    apply_lora(model, LoRAConfig(rank=8, alpha=16))     # in place: targets become LoRALinear, the rest is frozen
    save_adapter(model, "runs/x/adapter")                # adapter_config.json + adapter_model.safetensors (PEFT)
    load_adapter(model, "runs/x/adapter")                # a fresh base model, with the adapter applied
    merge_lora(model)                                    # W += (alpha / r) B A, back to plain nn.Linear

A `LoRALinear` keeps the base layer's weight as its own `weight` parameter (frozen), so state-dict keys of the base
weights do not change, and adds `lora_A [r, in]` and `lora_B [out, r]`:

    y = x W^T + dropout(x) A^T B^T * scaling,      scaling = alpha / r   (alpha / sqrt(r) with rslora)

which is PEFT's LoRA layer, computed in the same order. A is initialised as PEFT does (Kaiming-uniform, a=sqrt(5)),
B with zeros, so a fresh adapter leaves the model's outputs exactly unchanged.

The PEFT format. transformers' model holds the text stack twice, the encoder copy
(`model.encoder.language_model.layers.N...`) and the decoder copy (`model.decoder.layers.N...`), with tied weights;
dgemma has one set of weights that serves as both. PEFT wraps each copy's linear separately, so a dgemma adapter is
written to both copies (the same tensors) and `peft.PeftModel.from_pretrained(hf_model, folder)` computes what dgemma
computes with the adapter. An adapter whose two copies differ (trained elsewhere with separate encoder and decoder
adapters) cannot be expressed with one set of weights and is refused on load, naming the first module that differs.
The `target_modules` regex covers the text layers only: PEFT 0.21 does not support the vision tower's clippable
linears. The default targets are the attention projections and the dense ("shared") MLP; experts, router and
self-conditioning stay frozen, as in NeMo's LoRA recipe.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dgemma.fsio import replacing, write_json_atomic
from dgemma.model import DiffusionGemma

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ATTENTION_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_TARGETS = ("gate_proj", "up_proj", "down_proj")
DEFAULT_TARGETS = ATTENTION_TARGETS + MLP_TARGETS
_PARENT = {**{t: "self_attn" for t in ATTENTION_TARGETS}, **{t: "mlp" for t in MLP_TARGETS}}
# transformers' names of the two copies of dgemma's `layers.N.` prefix: the decoder copy first (what `save_pretrained`
# writes for the tied base weights), then the encoder copy.
HF_COPIES = ("model.decoder.layers.", "model.encoder.language_model.layers.")
PEFT_PREFIX = "base_model.model."


class LoRAError(ValueError):
    """An adapter setting or folder that cannot be used; the message names it and the fix."""


@dataclass(frozen=True)
class LoRAConfig:
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = DEFAULT_TARGETS  # module names inside each layer (q_proj, ..., down_proj)
    use_rslora: bool = False  # scaling alpha / sqrt(rank) instead of alpha / rank

    def validate(self) -> None:
        problems = []
        if self.rank < 1:
            problems.append(f"--lora-rank must be >= 1 (got {self.rank})")
        if not (math.isfinite(self.alpha) and self.alpha > 0):
            problems.append(f"--lora-alpha must be a finite number > 0 (got {self.alpha})")
        if not 0 <= self.dropout < 1:
            problems.append(f"--lora-dropout must be in [0, 1) (got {self.dropout})")
        unknown = [t for t in self.targets if t not in DEFAULT_TARGETS]
        if unknown or not self.targets:
            problems.append(f"--lora-targets {','.join(self.targets) or '(empty)'}: choose among "
                            f"{','.join(DEFAULT_TARGETS)} (experts, router and self-conditioning are not LoRA targets)")
        if problems:
            raise LoRAError("; ".join(problems))

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)


class LoRALinear(nn.Module):
    """A bias-free linear layer with a low-rank update: y = x W^T + dropout(x) A^T B^T * scaling."""

    def __init__(self, base: nn.Linear, rank: int, scaling: float, dropout: float = 0.0):
        super().__init__()
        if base.bias is not None:
            raise LoRAError("LoRALinear supports bias-free linears only (DiffusionGemma has no biases)")
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight  # the same Parameter: state-dict keys of the base weights do not change
        self.weight.requires_grad_(False)
        self.rank, self.scaling = rank, scaling
        w = base.weight
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, device=w.device, dtype=w.dtype))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, device=w.device, dtype=w.dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # PEFT's default init of A
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False

    def delta(self) -> torch.Tensor:
        """The weight update scaling * B A: [out, in], in the weight's dtype."""
        return (self.lora_B.float() @ self.lora_A.float() * self.scaling).to(self.weight.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight)
        if self.merged:
            return y
        return y + F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_B) * self.scaling

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the update into the weight (outputs unchanged up to rounding); `unmerge` takes it out again."""
        if not self.merged:
            self.weight.add_(self.delta())
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self.weight.sub_(self.delta())
            self.merged = False

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, rank={self.rank}, scaling={self.scaling:g}"


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    """dgemma module name (`layers.N.self_attn.q_proj`) -> its LoRALinear."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def target_names(model: DiffusionGemma, targets: tuple[str, ...]) -> list[str]:
    """The dgemma module names a target list selects, in layer order (full layers have no v_proj)."""
    names = []
    for i, layer in enumerate(model.layers):
        for t in targets:
            parent = getattr(layer, _PARENT[t])
            if isinstance(getattr(parent, t, None), (nn.Linear, LoRALinear)):
                names.append(f"layers.{i}.{_PARENT[t]}.{t}")
    return names


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name), child, module)


def apply_lora(model: DiffusionGemma, cfg: LoRAConfig) -> DiffusionGemma:
    """Freeze every parameter and replace the target linears by LoRALinear (in place; returns the model).
    Only the lora_A/lora_B parameters are left trainable."""
    cfg.validate()
    if lora_modules(model):
        raise LoRAError("the model already carries a LoRA adapter; merge it (merge_lora) or load a fresh base model")
    for p in model.parameters():
        p.requires_grad_(False)
    for name in target_names(model, cfg.targets):
        base = model.get_submodule(name)
        _set_module(model, name, LoRALinear(base, cfg.rank, cfg.scaling, cfg.dropout).train(model.training))
    model.lora_config = cfg  # read by save_adapter
    return model


def merge_lora(model: DiffusionGemma) -> DiffusionGemma:
    """Fold every adapter into its weight and put plain nn.Linear modules back (in place; returns the model)."""
    for name, m in lora_modules(model).items():
        m.merge()
        plain = nn.Linear(m.in_features, m.out_features, bias=False, device="meta")
        plain.weight = m.weight
        _set_module(model, name, plain)
    if hasattr(model, "lora_config"):
        del model.lora_config
    return model


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; tied parameters are counted once."""
    seen, trainable, total = set(), 0, 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return trainable, total


# ---------------------------------------------------------------------------------------------------------------
# The PEFT format
def target_regex(targets: tuple[str, ...]) -> str:
    """PEFT `target_modules`: both text-stack copies of transformers' model, these modules only (not the vision
    tower, not self-conditioning). PEFT matches a string with re.fullmatch against the module name."""
    attn = [t for t in ATTENTION_TARGETS if t in targets]
    mlp = [t for t in MLP_TARGETS if t in targets]
    inner = "|".join(([rf"self_attn\.({'|'.join(attn)})"] if attn else []) + ([rf"mlp\.({'|'.join(mlp)})"] if mlp else []))
    return rf"model\.(encoder\.language_model|decoder)\.layers\.\d+\.({inner})"


def peft_config(cfg: LoRAConfig, base_model: str | None = None) -> dict[str, Any]:
    """adapter_config.json for PEFT 0.21 (the fields PEFT reads; PEFT fills the rest with its defaults)."""
    return {
        "peft_type": "LORA", "task_type": None, "base_model_name_or_path": base_model,
        "auto_mapping": {"base_model_class": "DiffusionGemmaForBlockDiffusion",
                         "parent_library": "transformers.models.diffusion_gemma.modeling_diffusion_gemma"},
        "r": cfg.rank, "lora_alpha": cfg.alpha, "lora_dropout": cfg.dropout, "use_rslora": cfg.use_rslora,
        "target_modules": target_regex(cfg.targets), "bias": "none", "fan_in_fan_out": False,
        "init_lora_weights": True, "use_dora": False, "modules_to_save": None, "rank_pattern": {},
        "alpha_pattern": {}, "layers_to_transform": None, "layers_pattern": None, "inference_mode": True,
    }


def adapter_state_dict(model: DiffusionGemma) -> dict[str, torch.Tensor]:
    """PEFT-named adapter tensors (both copies of every module), contiguous CPU copies."""
    out = {}
    for name, m in lora_modules(model).items():
        rest = name.removeprefix("layers.")
        for copy in HF_COPIES:
            for kind, t in (("lora_A", m.lora_A), ("lora_B", m.lora_B)):
                out[f"{PEFT_PREFIX}{copy}{rest}.{kind}.weight"] = t.detach().to("cpu").contiguous().clone()
    return out


def save_adapter(model: DiffusionGemma, folder: str | os.PathLike[str], base_model: str | None = None,
                 dtype: torch.dtype | None = None) -> Path:
    """Write adapter_config.json and adapter_model.safetensors into `folder` (each to a temporary name, renamed into
    place). `dtype` casts the tensors (default: as trained)."""
    from safetensors.torch import save_file

    cfg = getattr(model, "lora_config", None)
    if cfg is None or not lora_modules(model):
        raise LoRAError("the model carries no LoRA adapter to save; apply_lora or load_adapter first")
    if any(m.merged for m in lora_modules(model).values()):
        raise LoRAError("the adapter is merged into the weights; unmerge it before saving it")
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    tensors = adapter_state_dict(model)
    if dtype is not None:
        tensors = {k: v.to(dtype) for k, v in tensors.items()}
    with replacing(out / ADAPTER_WEIGHTS) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt"})
    write_json_atomic(out / ADAPTER_CONFIG, peft_config(cfg, base_model))
    return out


def read_adapter_config(folder: str | os.PathLike[str]) -> LoRAConfig:
    """The LoRAConfig of a PEFT adapter folder; refuses what dgemma's LoRA cannot reproduce."""
    path = Path(folder).expanduser() / ADAPTER_CONFIG
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise LoRAError(f"{path} not found; --adapter must be a folder written by `dgemma finetune --lora-rank` or "
                        "PEFT's save_pretrained") from None
    except (OSError, ValueError) as e:
        raise LoRAError(f"cannot read {path} ({e}); the adapter folder is damaged") from None
    if not isinstance(raw, dict) or raw.get("peft_type") != "LORA":
        raise LoRAError(f"{path}: peft_type is {raw.get('peft_type') if isinstance(raw, dict) else None!r}, "
                        "not 'LORA'; only LoRA adapters are supported")
    unsupported = [k for k, ok in (("use_dora", not raw.get("use_dora")), ("bias", raw.get("bias", "none") == "none"),
                                   ("fan_in_fan_out", not raw.get("fan_in_fan_out")),
                                   ("rank_pattern", not raw.get("rank_pattern")),
                                   ("alpha_pattern", not raw.get("alpha_pattern")),
                                   ("modules_to_save", not raw.get("modules_to_save")),
                                   ("lora_bias", not raw.get("lora_bias"))) if not ok]
    if unsupported:
        raise LoRAError(f"{path}: {', '.join(unsupported)} set; dgemma supports plain LoRA (same rank and alpha for "
                        "every module, no bias, no DoRA, no modules_to_save)")
    try:
        rank, alpha = int(raw["r"]), float(raw["lora_alpha"])
    except (KeyError, TypeError, ValueError):
        raise LoRAError(f"{path}: needs integer 'r' and number 'lora_alpha'") from None
    dropout = float(raw.get("lora_dropout") or 0.0)
    # The targets are read from the weight file's names (load_adapter): PEFT's target_modules may be any regex.
    return LoRAConfig(rank=rank, alpha=alpha, dropout=dropout, use_rslora=bool(raw.get("use_rslora")))


_PEFT_KEY = re.compile(r"(?:base_model\.model\.)?(model\.decoder\.layers\.|model\.encoder\.language_model\.layers\.)"
                       r"(\d+\.(?:self_attn|mlp)\.\w+)\.(lora_[AB])(?:\.default)?\.weight")


def read_adapter(model: DiffusionGemma, folder: str | os.PathLike[str]) -> tuple[LoRAConfig, dict[str, tuple]]:
    """The PEFT adapter in `folder`, checked against `model` but not applied: its config (targets read from the
    weight names) and dgemma module name -> (lora_A [r, in], lora_B [out, r]) for every module the file holds."""
    from safetensors.torch import load_file

    folder = Path(folder).expanduser()
    cfg = read_adapter_config(folder)
    try:
        tensors = load_file(str(folder / ADAPTER_WEIGHTS))
    except FileNotFoundError:
        raise LoRAError(f"{folder / ADAPTER_WEIGHTS} not found; the adapter folder is incomplete") from None
    except (OSError, ValueError, RuntimeError) as e:  # safetensors raises SafetensorError (an Exception) on junk
        raise LoRAError(f"cannot read {folder / ADAPTER_WEIGHTS} ({e}); the adapter folder is damaged") from None
    copies: dict[str, dict[str, dict[str, torch.Tensor]]] = {}  # dgemma module -> copy -> A/B
    for key, t in tensors.items():
        m = _PEFT_KEY.fullmatch(key)
        if m is None:
            raise LoRAError(f"{folder / ADAPTER_WEIGHTS}: tensor {key!r} is not a LoRA weight of a text-layer "
                            "linear of DiffusionGemmaForBlockDiffusion; dgemma cannot apply it")
        copy, rest, kind = m.groups()
        copies.setdefault(f"layers.{rest}", {}).setdefault(copy, {})[kind] = t
    if not copies:
        raise LoRAError(f"{folder / ADAPTER_WEIGHTS} holds no LoRA weights")
    targets = tuple(t for t in DEFAULT_TARGETS if any(name.endswith("." + t) for name in copies))
    cfg = LoRAConfig(rank=cfg.rank, alpha=cfg.alpha, dropout=cfg.dropout, targets=targets, use_rslora=cfg.use_rslora)
    expected = set(target_names(model, targets))
    if set(copies) - expected:
        raise LoRAError(f"{folder}: the adapter names modules this model does not have "
                        f"({sorted(set(copies) - expected)[:3]}); it was trained for another architecture")
    weights = {}
    for name, found in copies.items():
        pairs = list(found.values())
        for kind in ("lora_A", "lora_B"):
            if any(kind not in p for p in pairs):
                raise LoRAError(f"{folder}: {name} has no {kind} tensor in one of its copies; the file is incomplete")
        first = pairs[0]
        for other in pairs[1:]:
            if not all(torch.equal(first[k], other[k]) for k in ("lora_A", "lora_B")):
                raise LoRAError(f"{folder}: the encoder and decoder copies of {name} carry different adapters; "
                                "dgemma has one set of weights for both, so it can only apply adapters trained "
                                "with both copies equal (as dgemma writes them)")
        a, b = first["lora_A"], first["lora_B"]
        base = model.get_submodule(name)
        want_a, want_b = (cfg.rank, base.in_features), (base.out_features, cfg.rank)
        if tuple(a.shape) != want_a or tuple(b.shape) != want_b:
            raise LoRAError(f"{folder}: {name} has lora_A {tuple(a.shape)} / lora_B {tuple(b.shape)} but this model "
                            f"expects {want_a} / {want_b} (rank {cfg.rank}); was the adapter trained on another "
                            "base model?")
        weights[name] = (a, b)
    return cfg, weights


def load_adapter(model: DiffusionGemma, folder: str | os.PathLike[str]) -> DiffusionGemma:
    """Apply the PEFT adapter in `folder` to a base model (in place; returns the model, adapter not merged)."""
    cfg, weights = read_adapter(model, folder)
    apply_lora(model, cfg)
    # A module absent from the file keeps B = 0 (no update): PEFT skips modules without weights in the same way.
    for name, module in lora_modules(model).items():
        if name in weights:
            a, b = weights[name]
            with torch.no_grad():
                module.lora_A.copy_(a)
                module.lora_B.copy_(b)
    return model


# ---------------------------------------------------------------------------------------------------------------
# Several adapters on one base, chosen per token row (serving: `dgemma serve --lora NAME=PATH`)
class AdapterRows:
    """Which rows of the next pass's flattened tokens belong to which adapter: [(adapter index, row indices)],
    set by the engine before each pass and shared by every MultiLoRALinear of a model. Empty: the base model.

    `plan(adapters)` turns the groups of the adapters one module carries into the index tensors of its batched
    product (made once per pass and shared by every module carrying the same adapters)."""

    def __init__(self) -> None:
        self._groups: list[tuple[int, torch.Tensor]] = []
        self._plans: dict[tuple[int, ...], AdapterPlan | None] = {}
        self.min_rows = 0  # pad each adapter's rows to at least this many (the engine's batch-invariant mode)
        self.names: dict[str, int] = {}  # adapter name -> index

    @property
    def groups(self) -> list[tuple[int, torch.Tensor]]:
        return self._groups

    @groups.setter
    def groups(self, groups: list[tuple[int, torch.Tensor]]) -> None:
        self._groups = groups
        self._plans = {}

    def plan(self, adapters: tuple[int, ...]) -> AdapterPlan | None:
        """The batched layout of this pass's rows for a module carrying `adapters` (sorted indices); None when
        none of them has rows in this pass."""
        if adapters not in self._plans:
            self._plans[adapters] = AdapterPlan.make(
                [(i, rows) for i, rows in self._groups if i in adapters], adapters, self.min_rows)
        return self._plans[adapters]


@dataclass
class AdapterPlan:
    """One pass's rows laid out for a batched LoRA product over G adapters: gather `gather` [G * R] from the
    flattened input (each adapter's rows, then repeats of its first row up to R = max(rows per adapter, min_rows)),
    compute [G, R, ...] with one bmm per factor, keep the real rows `keep` [n] and add them at rows `rows` [n]."""

    slots: torch.Tensor  # [G] position of each present adapter in the module's stacks
    gather: torch.Tensor  # [G * R]
    keep: torch.Tensor  # [n]
    rows: torch.Tensor  # [n]
    width: int  # R
    every: bool  # all the module's adapters are present, in stack order (no selection of the stacks needed)

    @staticmethod
    def make(groups: list[tuple[int, torch.Tensor]], adapters: tuple[int, ...], min_rows: int) -> AdapterPlan | None:
        if not groups:
            return None
        width = max(min_rows, max(rows.numel() for _, rows in groups))
        gather, keep = [], []
        for g, (_, rows) in enumerate(groups):
            n = rows.numel()
            gather.append(torch.cat([rows, rows[:1].expand(width - n)]))
            keep.append(torch.arange(g * width, g * width + n, device=rows.device))
        slots = [adapters.index(i) for i, _ in groups]
        dev = groups[0][1].device
        return AdapterPlan(torch.tensor(slots, device=dev), torch.cat(gather), torch.cat(keep),
                           torch.cat([rows for _, rows in groups]), width, slots == list(range(len(adapters))))


class MultiLoRALinear(nn.Module):
    """A frozen bias-free linear with several LoRA adapters, applied per row and never merged:

        y = x W^T;   y[rows of a] += (x[rows of a] A_a^T) B_a^T * scaling_a   for each adapter a

    the arithmetic of `LoRALinear.forward` (base product, then the update added), so a row gets the values it gets
    with that adapter alone. Rows of no adapter get the base product only.

    `forward` does the adapters of one rank at once: their A and B are stacked, and each factor is one batched
    product over the adapters present in the pass (ranks are not zero-padded to one stack, since a longer inner
    dimension changes the matmul's rounding). `forward_grouped`, one adapter at a time, is its slow twin
    (tests/test_multi_lora.py checks they agree bit for bit)."""

    def __init__(self, base: nn.Module, rows: AdapterRows):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.weight.requires_grad_(False)
        self.rows = rows
        self.lora: dict[int, tuple[torch.Tensor, torch.Tensor, float]] = {}  # adapter index -> (A, B, scaling)
        # per rank: (adapter indices in stack order, A [K, r, in], B [K, out, r], fp32 scalings [K, 1, 1])
        self.stacks: dict[int, tuple[tuple[int, ...], torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def add(self, index: int, a: torch.Tensor, b: torch.Tensor, scaling: float) -> None:
        w = self.weight
        self.lora[index] = (a.to(w.device, w.dtype), b.to(w.device, w.dtype), scaling)
        rank = a.shape[0]
        same = tuple(sorted(i for i, (a_i, _, _) in self.lora.items() if a_i.shape[0] == rank))
        # fp32 scalings, multiplied in place: the arithmetic of `LoRALinear`'s `* scaling` by a Python float, also
        # for half-precision weights (a bf16 scaling would round alpha / r first)
        scalings = torch.tensor([self.lora[i][2] for i in same], dtype=torch.float32, device=w.device)
        self.stacks[rank] = (same, torch.stack([self.lora[i][0] for i in same]),
                             torch.stack([self.lora[i][1] for i in same]), scalings.view(-1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight)
        if not self.rows.groups:
            return y
        flat_x, flat_y = x.reshape(-1, self.in_features), y.view(-1, self.out_features)
        for adapters, a, b, scaling in self.stacks.values():
            plan = self.rows.plan(adapters)
            if plan is None:
                continue
            if not plan.every:
                a, b, scaling = (t.index_select(0, plan.slots) for t in (a, b, scaling))
            xs = flat_x.index_select(0, plan.gather).view(-1, plan.width, self.in_features)
            update = torch.bmm(torch.bmm(xs, a.transpose(1, 2)), b.transpose(1, 2)).mul_(scaling)
            flat_y.index_add_(0, plan.rows, update.view(-1, self.out_features).index_select(0, plan.keep))
        return y

    def forward_grouped(self, x: torch.Tensor) -> torch.Tensor:
        """The slow twin of `forward`: each adapter's rows through its own two products."""
        y = F.linear(x, self.weight)
        groups = [(self.lora[i], rows) for i, rows in self.rows.groups if i in self.lora]
        if not groups:
            return y
        flat_x, flat_y = x.reshape(-1, self.in_features), y.view(-1, self.out_features)
        for (a, b, scaling), rows in groups:
            xs = flat_x.index_select(0, rows)
            n = xs.shape[0]
            if n < self.rows.min_rows:
                xs = torch.cat([xs, xs.new_zeros(self.rows.min_rows - n, xs.shape[1])])
            flat_y.index_add_(0, rows, (F.linear(F.linear(xs, a), b) * scaling)[:n])
        return y

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, adapters={sorted(self.lora)}"


@dataclass
class ServedAdapter:
    name: str
    path: str
    config: LoRAConfig
    index: int  # 1, 2, ...: the AdapterRows index of its rows
    nbytes: int  # memory of its A and B tensors


def attach_adapters(model: DiffusionGemma, adapters: dict[str, str | os.PathLike[str]]) -> list[ServedAdapter]:
    """Load several PEFT adapters onto one base model, unmerged (in place): every module any of them targets
    becomes a MultiLoRALinear, and `model.adapter_rows` (an AdapterRows) chooses per row which one applies.
    Refuses, naming the adapter, a folder that is not an adapter or one trained for another base; the model is
    changed only once every adapter has loaded."""
    if lora_modules(model) or hasattr(model, "adapter_rows"):
        raise LoRAError("the model already carries adapters; --lora needs the plain base model (drop --adapter)")
    loaded = []
    for i, (name, folder) in enumerate(adapters.items(), start=1):
        try:
            cfg, weights = read_adapter(model, folder)
        except LoRAError as e:
            raise LoRAError(f"adapter {name!r}: {e}") from None
        nbytes = sum(t.numel() * t.element_size() for pair in weights.values() for t in pair)
        loaded.append((ServedAdapter(name, str(folder), cfg, i, nbytes), weights))
    rows = AdapterRows()
    modules: dict[str, MultiLoRALinear] = {}
    for served, weights in loaded:
        for module_name, (a, b) in weights.items():
            if module_name not in modules:
                modules[module_name] = MultiLoRALinear(model.get_submodule(module_name), rows)
            modules[module_name].add(served.index, a, b, served.config.scaling)
    for module_name, module in modules.items():
        _set_module(model, module_name, module)
    rows.names = {served.name: served.index for served, _ in loaded}
    model.adapter_rows = rows
    return [served for served, _ in loaded]


def adapter_summary(model: DiffusionGemma) -> dict[str, Any]:
    cfg = getattr(model, "lora_config", None)
    trainable, total = trainable_parameters(model)
    return {"rank": cfg.rank if cfg else None, "alpha": cfg.alpha if cfg else None,
            "targets": list(cfg.targets) if cfg else [], "modules": len(lora_modules(model)),
            "trainable_parameters": trainable, "total_parameters": total, "share": trainable / max(total, 1),
            **({"config": asdict(cfg)} if cfg else {})}
