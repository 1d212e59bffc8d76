"""Checkpoint folders in the Hugging Face DiffusionGemma format: read, validate, write, describe.

A checkpoint folder holds `config.json`, the weights (`model.safetensors`, or `model.safetensors.index.json` plus
the shards it names) and optionally `generation_config.json` and `tokenizer.json`. It is the same folder that
transformers' `DiffusionGemmaForBlockDiffusion.save_pretrained` writes and `from_pretrained` reads (spec A4).

    load_checkpoint(path, dtype=None, device="cpu") -> (ModelConfig, DiffusionGemma)
    save_checkpoint(model, path, generation_config=None, tokenizer_path=None, dtype=None) -> Path
    load_generation_config(path) -> dict
    describe(path) -> dict                   # header-only summary for `dgemma info` (also random:PRESET)
    run_folder_checkpoint(path) -> Path|None # the checkpoint inside a `dgemma train` run folder
    hf_to_dgemma / dgemma_to_hf              # the name map, over state dicts, shape tables or bare key lists

The name map is the table `KEY_RULES` below: dgemma's module names are the checkpoint's `model.decoder.*` names,
so the map is the identity after the prefix, plus the encoder's own layer scalar and the tied copies
(transformers ties the encoder text stack and the LM head to the decoder; either copy is accepted on load, the
decoder copy wins, and only the decoder copy is written, as transformers itself does).

Loading builds the model on the meta device and assigns tensors read through safetensors' memory map, so a model
never sits in memory twice. Every problem with a folder (files, JSON, keys, shapes, dtypes) is collected first and
reported in one `CheckpointError`; a tensor holding NaN or infinity is reported at load, naming the tensor and file.
"""

from __future__ import annotations

import json
import logging
import math
import re
import shutil
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from dgemma.config import FULL, SLIDING, ConfigError, ModelConfig, preset
from dgemma.fsio import install_folder, new_sibling_dir
from dgemma.model import DiffusionGemma, rope_inv_freq

logger = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
GENERATION_CONFIG_NAME = "generation_config.json"
TOKENIZER_NAME = "tokenizer.json"
TOKENIZER_EXTRAS = ("tokenizer_config.json",)  # copied along with tokenizer.json when they sit beside it

FIX_HINT = ("re-save the checkpoint with transformers (save_pretrained) or dgemma (save_checkpoint), "
            "or point to a complete DiffusionGemma checkpoint folder")
CORRUPT_HINT = "the checkpoint is corrupt; re-export or re-download it"
RANDOM_PREFIX = "random:"  # `random:PRESET` names a random-weight model built from a preset (see random_config)
RUN_LATEST, RUN_CHECKPOINTS = "latest", "checkpoints"  # a `dgemma train` run folder (see train.py's docstring)
BUNDLED_TOKENIZER = Path(__file__).resolve().parent / "assets" / TOKENIZER_NAME  # the tokenizer of random:PRESET
MAX_LISTED = 30  # keys listed per kind of problem; the rest are counted


class CheckpointError(ValueError):
    """A checkpoint folder cannot be read or written; the message names every offending file, field and key."""

    def __init__(self, where: str | Path, problems: list[str], hint: str = FIX_HINT):
        self.where, self.problems = str(where), list(problems)
        what = problems[0] if len(problems) == 1 else f"{len(problems)} problems: " + "; ".join(problems)
        super().__init__(f"{where}: {what}. To fix: {hint}")


# ---------------------------------------------------------------------------------------------------------------
# The name map (data). First matching rule wins, in both directions.
PRIMARY = "primary"  # the copy transformers writes; dgemma reads it first and writes only it
ALTERNATE = "alternate"  # a tied copy: accepted when the primary is absent, never written
SKIP = "skip"  # vision weights: dgemma has no vision tower


@dataclass(frozen=True)
class KeyRule:
    hf: str  # pattern; {n} = layer index, {name} = any dotted name, {param} = a layer tensor other than its scalar
    dgemma: str | None
    role: str


KEY_RULES: tuple[KeyRule, ...] = (
    KeyRule("model.encoder.language_model.layers.{n}.layer_scalar", "layers.{n}.encoder_layer_scalar", PRIMARY),
    KeyRule("model.decoder.{name}", "{name}", PRIMARY),
    KeyRule("model.encoder.language_model.embed_tokens.weight", "embed_tokens.weight", ALTERNATE),
    KeyRule("model.encoder.language_model.layers.{n}.{param}", "layers.{n}.{param}", ALTERNATE),
    KeyRule("model.encoder.language_model.norm.weight", "norm.weight", ALTERNATE),
    KeyRule("lm_head.weight", "embed_tokens.weight", ALTERNATE),
    KeyRule("model.encoder.vision_tower.{name}", None, SKIP),
    KeyRule("model.encoder.embed_vision.{name}", None, SKIP),
)

_PLACEHOLDERS = {"n": r"\d+", "name": r"[\w.]+", "param": r"(?!(?:encoder_)?layer_scalar$)[\w.]+"}


def _compile(pattern: str) -> re.Pattern:
    parts = re.split(r"\{(\w+)\}", pattern)  # literal, placeholder, literal, ...
    rx = "".join(re.escape(p) if i % 2 == 0 else f"(?P<{p}>{_PLACEHOLDERS[p]})" for i, p in enumerate(parts))
    return re.compile(rx)


_COMPILED = [(rule, _compile(rule.hf), _compile(rule.dgemma) if rule.dgemma else None) for rule in KEY_RULES]


def _hf_rule(hf_key: str) -> tuple[KeyRule, str | None] | None:
    """The rule an HF key falls under and the dgemma key it names (None for skipped keys)."""
    for rule, hf_rx, _ in _COMPILED:
        m = hf_rx.fullmatch(hf_key)
        if m:
            return rule, (rule.dgemma.format(**m.groupdict()) if rule.dgemma else None)
    return None


def hf_names(dgemma_key: str) -> list[str]:
    """HF names that hold `dgemma_key`, in order of preference: the primary copy first, then tied copies."""
    primary, alternates = [], []
    for rule, _, dg_rx in _COMPILED:
        m = dg_rx.fullmatch(dgemma_key) if dg_rx else None
        if m is None:
            continue
        name = rule.hf.format(**m.groupdict())
        if rule.role == PRIMARY:
            if not primary:
                primary.append(name)
        else:
            alternates.append(name)
    return primary + alternates


def dgemma_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """dgemma state-dict key -> shape, read off a model built on the meta device (no memory)."""
    with torch.device("meta"):
        model = DiffusionGemma(config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def hf_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """The keys and shapes transformers writes for this config (text weights only)."""
    return dgemma_to_hf(dgemma_shapes(config), config)


@dataclass
class KeyPlan:
    """How a set of HF keys covers the dgemma state dict."""

    sources: dict[str, str] = field(default_factory=dict)  # dgemma key -> HF key it is read from
    unused_copies: dict[str, list[str]] = field(default_factory=dict)  # dgemma key -> other copies present
    skipped: list[str] = field(default_factory=list)  # vision keys
    unexpected: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # dgemma keys with no copy at all

    def problems(self) -> list[str]:
        out = []
        if self.missing:
            names = [" or ".join(hf_names(k)) for k in self.missing]
            out.append(f"missing {len(names)} tensor(s): {_listing(names)}")
        if self.unexpected:
            out.append(f"unexpected {len(self.unexpected)} tensor(s) for this config: {_listing(self.unexpected)}")
        return out


def plan_keys(hf_keys: Iterable[str], config: ModelConfig,
              expected: Mapping[str, tuple[int, ...]] | None = None) -> KeyPlan:
    """Match HF keys against the dgemma state dict of `config` (see KEY_RULES)."""
    expected = dgemma_shapes(config) if expected is None else expected
    plan = KeyPlan()
    copies: dict[str, list[str]] = {}
    for hk in hf_keys:
        hit = _hf_rule(hk)
        if hit is not None and hit[0].role == SKIP:
            plan.skipped.append(hk)
            continue
        dk = hit[1] if hit is not None else None
        # A key is accepted only if it maps to a dgemma key whose own list of HF names contains it again
        # (e.g. `model.decoder.layers.0.encoder_layer_scalar` maps somewhere but is not a real HF name).
        if dk is None or dk not in expected or hk not in hf_names(dk):
            plan.unexpected.append(hk)
            continue
        copies.setdefault(dk, []).append(hk)
    for dk in expected:
        present = copies.get(dk)
        if not present:
            plan.missing.append(dk)
            continue
        order = hf_names(dk)
        present = sorted(present, key=order.index)
        plan.sources[dk] = present[0]
        if len(present) > 1:
            plan.unused_copies[dk] = present[1:]
    return plan


def _shape_of(value: Any) -> tuple[int, ...] | None:
    if hasattr(value, "shape"):
        return tuple(value.shape)
    if isinstance(value, (tuple, list)) and all(isinstance(v, int) for v in value):
        return tuple(value)
    return None


def _shape_problems(shapes: Mapping[str, tuple[int, ...] | None], hf_to_dg: Mapping[str, str],
                    expected: Mapping[str, tuple[int, ...]]) -> list[str]:
    """shapes: HF key -> shape (None = unknown); hf_to_dg: HF key -> dgemma key."""
    bad = [f"{hk} expected {list(expected[dk])} got {list(shapes[hk])}" for hk, dk in hf_to_dg.items()
           if shapes.get(hk) is not None and tuple(shapes[hk]) != expected[dk]]
    return [f"wrong shape for {len(bad)} tensor(s): {_listing(bad)}"] if bad else []


def _all_copies(plan: KeyPlan) -> dict[str, str]:
    """HF key -> dgemma key for every accepted HF key, used or not."""
    out = {hk: dk for dk, hk in plan.sources.items()}
    out.update({hk: dk for dk, hks in plan.unused_copies.items() for hk in hks})
    return out


def _note_skipped(skipped: list[str]) -> None:
    if skipped:
        logger.info("dgemma: skipped %d vision tensor(s) (model.encoder.vision_tower.*, model.encoder.embed_vision.*); "
                    "dgemma is text-only", len(skipped))


def hf_to_dgemma(state_dict_or_keys: Mapping[str, Any] | Iterable[str], config: ModelConfig) -> dict[str, Any]:
    """Rename an HF DiffusionGemma state dict (or shape table) to dgemma names.

    Given a mapping, returns {dgemma key: value} taking the decoder copy of tied weights when present (a warning
    names tied copies that differ). Given bare keys, returns {dgemma key: HF key it would be read from}.
    Raises CheckpointError listing missing, unexpected and wrongly shaped keys."""
    is_map = isinstance(state_dict_or_keys, Mapping)
    keys = list(state_dict_or_keys)
    expected = dgemma_shapes(config)
    plan = plan_keys(keys, config, expected)
    problems = plan.problems()
    if is_map:
        shapes = {k: _shape_of(state_dict_or_keys[k]) for k in keys}
        problems += _shape_problems(shapes, _all_copies(plan), expected)
    if problems:
        raise CheckpointError("state dict", problems)
    _note_skipped(plan.skipped)
    if not is_map:
        return dict(plan.sources)
    out = {dk: state_dict_or_keys[hk] for dk, hk in plan.sources.items()}
    differ = [hk for dk, hks in plan.unused_copies.items() for hk in hks
              if isinstance(out[dk], torch.Tensor) and not torch.equal(out[dk], state_dict_or_keys[hk])]
    if differ:
        logger.warning("dgemma: %d tied copy(ies) differ from the decoder copy and were ignored: %s",
                       len(differ), _listing(differ))
    return out


def dgemma_to_hf(state_dict_or_keys: Mapping[str, Any] | Iterable[str], config: ModelConfig) -> dict[str, Any]:
    """Rename a dgemma state dict (or shape table) to the HF names transformers writes.

    Given a mapping, returns {HF key: value}; given bare keys, returns {HF key: dgemma key}.
    Raises CheckpointError if keys are missing or unknown, or shapes are wrong."""
    is_map = isinstance(state_dict_or_keys, Mapping)
    keys = list(state_dict_or_keys)
    expected = dgemma_shapes(config)
    unknown = [k for k in keys if k not in expected]
    missing = [k for k in expected if k not in set(keys)]
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} dgemma tensor(s): {_listing(missing)}")
    if unknown:
        problems.append(f"unexpected {len(unknown)} dgemma tensor(s): {_listing(unknown)}")
    known = [k for k in keys if k in expected]
    if is_map:
        bad = [f"{k} expected {list(expected[k])} got {list(s)}" for k in known
               if (s := _shape_of(state_dict_or_keys[k])) is not None and s != expected[k]]
        if bad:
            problems.append(f"wrong shape for {len(bad)} tensor(s): {_listing(bad)}")
    if problems:
        raise CheckpointError("state dict", problems)
    names = {k: hf_names(k)[0] for k in known}
    if not is_map:
        return {hk: dk for dk, hk in names.items()}
    return {names[k]: state_dict_or_keys[k] for k in known}


def _listing(items: list[str]) -> str:
    shown = ", ".join(items[:MAX_LISTED])
    return shown if len(items) <= MAX_LISTED else f"{shown} (and {len(items) - MAX_LISTED} more)"


# ---------------------------------------------------------------------------------------------------------------
# Dtypes
_FILE_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
_DTYPE_ALIASES = {"float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
                  "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
                  "float16": torch.float16, "fp16": torch.float16, "half": torch.float16}


def resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """float32/bfloat16/float16 (as a torch dtype or a name such as "bf16"); None stays None."""
    if dtype is None:
        return None
    resolved = _DTYPE_ALIASES.get(dtype.lower()) if isinstance(dtype, str) else dtype
    if resolved not in _DTYPE_NAMES:
        raise CheckpointError("dtype", [f"unsupported dtype {dtype!r}"],
                              hint="use float32, bfloat16 or float16")
    return resolved


# ---------------------------------------------------------------------------------------------------------------
# Reading the folder (headers only)
@dataclass
class CheckpointInfo:
    """What a valid checkpoint folder holds, read from config.json and the safetensors headers only."""

    folder: Path
    config: ModelConfig
    weight_files: list[Path]
    tensors: dict[str, tuple[str, tuple[int, ...], Path]]  # HF key -> (file dtype, shape, file)
    plan: KeyPlan
    dtype: torch.dtype  # the dtype the weights are stored in

    @property
    def file_size(self) -> int:
        return sum(f.stat().st_size for f in self.weight_files)


class _HeaderError(Exception):
    pass


def _read_header(file: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Key -> (dtype, shape) from a safetensors header: 8-byte little-endian length, then JSON."""
    size = file.stat().st_size
    with open(file, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise _HeaderError(f"{file} is not a safetensors file (only {size} bytes)")
        n = int.from_bytes(head, "little")
        if n > size - 8:
            raise _HeaderError(f"{file} is not a safetensors file or is truncated (header length {n} > file size)")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise _HeaderError(f"{file} has a corrupt safetensors header") from None
    if not isinstance(header, dict):
        raise _HeaderError(f"{file} has a corrupt safetensors header")
    header.pop("__metadata__", None)
    out, end = {}, 0
    for key, entry in header.items():
        try:
            out[key] = (str(entry["dtype"]), tuple(int(s) for s in entry["shape"]))
            end = max(end, int(entry["data_offsets"][1]))
        except (KeyError, TypeError, ValueError, IndexError):
            raise _HeaderError(f"{file} has a corrupt safetensors header entry for {key}") from None
    if 8 + n + end > size:
        raise _HeaderError(f"{file} is truncated ({size} bytes, the header says {8 + n + end})")
    return out


def _read_json(file: Path, problems: list[str]) -> Any:
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as e:
        problems.append(f"{file} is not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})")
    except (OSError, UnicodeDecodeError) as e:
        problems.append(f"{file} cannot be read ({e})")
    return None


def _scan_weights(folder: Path, problems: list[str]) -> tuple[list[Path], dict[str, tuple[str, tuple, Path]]]:
    """Find the weight files and read their headers; problems are appended, never raised."""
    single, index = folder / WEIGHTS_NAME, folder / INDEX_NAME
    if single.is_file():
        try:
            return [single], {k: (d, s, single) for k, (d, s) in _read_header(single).items()}
        except _HeaderError as e:
            problems.append(str(e))
            return [], {}
    if not index.is_file():
        problems.append(f"missing weights: neither {WEIGHTS_NAME} nor {INDEX_NAME} is in the folder")
        return [], {}
    raw = _read_json(index, problems)
    if raw is None:
        return [], {}
    weight_map = raw.get("weight_map") if isinstance(raw, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        problems.append(f"{index} has no 'weight_map' object of tensor name -> shard file")
        return [], {}
    files, tensors = [], {}
    for shard_name in sorted(set(weight_map.values())):
        shard = folder / shard_name
        if not shard.is_file():
            problems.append(f"missing shard {shard_name} (named in {INDEX_NAME})")
            continue
        try:
            header = _read_header(shard)
        except _HeaderError as e:
            problems.append(str(e))
            continue
        files.append(shard)
        absent = [k for k, v in weight_map.items() if v == shard_name and k not in header]
        if absent:
            problems.append(f"{INDEX_NAME} places {len(absent)} tensor(s) in {shard_name} but the shard lacks them: "
                            f"{_listing(absent)}")
        tensors.update({k: (*header[k], shard) for k, v in weight_map.items() if v == shard_name and k in header})
    return files, tensors


def scan_checkpoint(path: str | Path) -> CheckpointInfo:
    """Validate a checkpoint folder from its config and headers; raise one CheckpointError naming every problem."""
    folder = Path(path)
    if not folder.exists():
        raise CheckpointError(folder, ["checkpoint folder does not exist"],
                              hint="check the path, or pass random:PRESET for a random-weight model")
    if not folder.is_dir():
        hint = (f"pass the folder that holds it, {folder.parent}" if folder.name in (CONFIG_NAME, WEIGHTS_NAME, INDEX_NAME)
                else "pass the checkpoint folder")
        raise CheckpointError(folder, [f"not a folder (expected a folder holding config.json and {WEIGHTS_NAME})"],
                              hint=hint)
    if not (folder / CONFIG_NAME).is_file():
        inner = run_folder_checkpoint(folder)
        if inner is not None:
            problem = f"is a training run folder, not a checkpoint (no {CONFIG_NAME} at its top level)"
            raise CheckpointError(folder, [problem], hint=f"pass {inner}, the run's newest checkpoint")
    problems: list[str] = []
    config = None
    if not (folder / CONFIG_NAME).is_file():
        problems.append(f"missing {CONFIG_NAME}")
    else:
        try:
            config = ModelConfig.from_hf_config(folder / CONFIG_NAME)
        except ConfigError as e:
            problems.append(str(e))
    files, tensors = _scan_weights(folder, problems)
    plan, dtype = KeyPlan(), torch.float32
    if config is not None and files:  # at least one header was read: check the keys against the config
        expected = dgemma_shapes(config)
        plan = plan_keys(tensors, config, expected)
        problems += plan.problems()
        copies = _all_copies(plan)
        problems += _shape_problems({k: v[1] for k, v in tensors.items()}, copies, expected)
        bad = [f"{hk} has dtype {tensors[hk][0]}" for hk in copies if tensors[hk][0] not in _FILE_DTYPES]
        if bad:
            problems.append(f"unsupported dtype in {len(bad)} tensor(s) (dgemma reads F32, BF16 or F16): "
                            f"{_listing(bad)}")
        embed = plan.sources.get("embed_tokens.weight")
        stored = [tensors[hk][0] for hk in copies]
        name = tensors[embed][0] if embed else (Counter(stored).most_common(1)[0][0] if stored else "F32")
        dtype = _FILE_DTYPES.get(name, torch.float32)
    if problems:
        raise CheckpointError(folder, problems)
    return CheckpointInfo(folder=folder, config=config, weight_files=files, tensors=tensors, plan=plan, dtype=dtype)


def run_folder_checkpoint(path: str | Path) -> Path | None:
    """If `path` is a `dgemma train` run folder (or its `checkpoints/` folder) rather than a checkpoint, the
    checkpoint to load instead: `path/latest` when it holds a config.json, else the newest `step-*` folder that does.
    None for anything else. The returned path is spelled from `path` as given (`runs/x/latest`, not resolved)."""
    folder = Path(path)
    if (folder / CONFIG_NAME).is_file() or not folder.is_dir():
        return None
    if (folder / RUN_LATEST / CONFIG_NAME).is_file():
        return folder / RUN_LATEST
    for root in (folder / RUN_CHECKPOINTS, folder):
        steps = sorted(p for p in root.glob("step-*") if (p / CONFIG_NAME).is_file())
        if steps:
            return steps[-1]
    return None


# ---------------------------------------------------------------------------------------------------------------
# Loading
def load_checkpoint(path: str | Path, dtype: torch.dtype | str | None = None,
                    device: str | torch.device = "cpu") -> tuple[ModelConfig, DiffusionGemma]:
    """Load a checkpoint folder into a DiffusionGemma on `device`, in `dtype` (default: the stored dtype).

    The model is built on the meta device and the tensors are assigned as read from the memory-mapped files,
    so peak memory stays near one copy of the weights. Vision weights are skipped. On the CPU in the stored dtype
    the tensors stay backed by the files' private (copy-on-write) memory map, so pages are read when first used:
    replace such files by renaming (as save_checkpoint does), never by truncating them while the model lives."""
    info = scan_checkpoint(path)
    target = resolve_dtype(dtype) or info.dtype
    device = torch.device(device)
    _note_skipped(info.plan.skipped)
    with torch.device("meta"):
        model = DiffusionGemma(info.config)
    by_file: dict[Path, list[tuple[str, str]]] = {}
    for dk, hk in info.plan.sources.items():
        by_file.setdefault(info.tensors[hk][2], []).append((dk, hk))
    state: dict[str, torch.Tensor] = {}
    corrupt: dict[Path, list[str]] = {}  # file -> tensors with NaN/inf as stored
    overflow: list[str] = []  # finite in the file, infinite once cast to float16
    for file, pairs in by_file.items():
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for dk, hk in pairs:
                stored = f.get_tensor(hk)  # [shape] backed by the file's memory map
                bad = count_nonfinite(stored)
                if bad:
                    corrupt.setdefault(file, []).append(f"{hk} ({bad} of {stored.numel()} values)")
                t = stored.to(device=device, dtype=target)
                if not bad and target == torch.float16 and stored.dtype != torch.float16 and count_nonfinite(t):
                    overflow.append(hk)
                state[dk] = t
    if corrupt:
        one_file = len(corrupt) == 1
        problems = []
        for file, names in corrupt.items():
            prefix = "" if one_file else f"{file.name}: "
            what = f"tensor {names[0]} contains" if len(names) == 1 else f"{len(names)} tensors contain"
            listed = "" if len(names) == 1 else f": {_listing(names)}"
            problems.append(f"{prefix}{what} NaN/inf{listed}")
        raise CheckpointError(next(iter(corrupt)) if one_file else info.folder, problems, hint=CORRUPT_HINT)
    if overflow:
        problem = (f"{len(overflow)} tensor(s) hold values beyond float16's range (+-65504) and would become "
                   f"infinite: {_listing(overflow)}")
        raise CheckpointError(info.folder, [problem],
                              hint="load in bfloat16 or float32 (dtype=torch.bfloat16, or --dtype bfloat16)")
    model.load_state_dict(state, strict=True, assign=True)
    del state
    _rebuild_buffers(model, device)
    left = [n for n, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
    if left:  # a new buffer in model.py that _rebuild_buffers does not know: fail loudly, not at first use
        raise RuntimeError(f"load_checkpoint left tensors on the meta device: {left}; teach _rebuild_buffers them")
    return info.config, model.eval()


NONFINITE_CHUNK = 1 << 22  # elements checked at a time: the temporary mask is at most 4 MiB, whatever the tensor


def count_nonfinite(t: torch.Tensor) -> int:
    """Number of NaN/inf entries of a floating-point tensor (0 for other dtypes), read in chunks so that checking
    even the largest tensor allocates only a small mask, never a copy of the tensor."""
    if not t.is_floating_point() or t.numel() == 0:
        return 0
    flat = t.reshape(-1)  # a view: tensors read from safetensors are contiguous
    bad = 0
    for start in range(0, flat.numel(), NONFINITE_CHUNK):
        finite = torch.isfinite(flat[start:start + NONFINITE_CHUNK])
        if not bool(finite.all()):
            bad += int(finite.numel() - finite.sum())
    return bad


def _rebuild_buffers(model: DiffusionGemma, device: torch.device) -> None:
    """Re-create the non-persistent buffers `DiffusionGemma.__init__` computes (they are not in checkpoints)."""
    cfg = model.config
    fresh = {
        "embed_scale": torch.tensor(math.sqrt(cfg.hidden_size)),
        f"inv_freq_{SLIDING}": rope_inv_freq(cfg, SLIDING),
        f"inv_freq_{FULL}": rope_inv_freq(cfg, FULL),
    }
    for name, value in fresh.items():
        setattr(model, name, value.to(device))  # `name` is a registered buffer: this replaces the meta tensor


def load_generation_config(path: str | Path) -> dict:
    """The folder's generation_config.json as a dict ({} when absent); `path` is the folder or the file."""
    p = Path(path)
    file = p / GENERATION_CONFIG_NAME if p.is_dir() else p
    if not file.is_file():
        return {}
    problems: list[str] = []
    raw = _read_json(file, problems)
    if not problems and not isinstance(raw, dict):
        problems.append(f"{file} must hold a JSON object")
    if problems:
        raise CheckpointError(file, problems, hint=f"fix or delete {GENERATION_CONFIG_NAME}")
    return raw


# ---------------------------------------------------------------------------------------------------------------
# Saving
def save_checkpoint(model: DiffusionGemma, path: str | Path, generation_config: dict | None = None,
                    tokenizer_path: str | Path | None = None, dtype: torch.dtype | str | None = None) -> Path:
    """Write `model` as a transformers-loadable checkpoint folder at `path`, atomically.

    Everything is written to a temporary sibling folder first and then swapped into place, so an interrupted or
    failed save leaves any previous checkpoint at `path` intact. An existing folder is replaced as a whole (files
    in it that this call does not write are dropped); `tokenizer_path` (a tokenizer.json or a folder holding one)
    may point inside the old folder. Returns the folder."""
    target = Path(path).resolve()  # a symlinked checkpoint folder is replaced where it really lives
    dtype = resolve_dtype(dtype) or model.dtype
    if dtype not in _DTYPE_NAMES:
        raise CheckpointError(target, [f"model dtype {dtype} cannot be saved"], hint="pass dtype=torch.bfloat16")
    if target.exists():
        if not target.is_dir():
            raise CheckpointError(target, ["exists and is not a folder; refusing to replace it"],
                                  hint="choose another path or remove the file")
        if any(target.iterdir()) and not (target / CONFIG_NAME).exists():
            raise CheckpointError(target, ["is a non-empty folder that is not a checkpoint; refusing to replace it"],
                                  hint="choose an empty or new folder")
    tokenizer_files = _tokenizer_files(tokenizer_path) if tokenizer_path is not None else []
    tensors = _tensors_for_save(model, dtype)
    config = model.config.to_hf_config()
    config.pop("torch_dtype", None)
    config["dtype"] = _DTYPE_NAMES[dtype]

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = new_sibling_dir(target, "tmp")
    try:
        _write_json(tmp / CONFIG_NAME, config)
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        if generation_config is not None:
            _write_json(tmp / GENERATION_CONFIG_NAME, generation_config)
        for src in tokenizer_files:
            shutil.copyfile(src, tmp / src.name)
        install_folder(tmp, target)  # fsyncs every file first
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _tensors_for_save(model: DiffusionGemma, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """HF-named CPU tensors, contiguous, in `dtype`, no two sharing storage (safetensors refuses shared memory)."""
    out, seen = {}, set()
    for hk, t in dgemma_to_hf(model.state_dict(), model.config).items():
        t = t.detach().to(device="cpu", dtype=dtype)
        if not t.is_contiguous() or t.untyped_storage().data_ptr() in seen:
            t = t.clone(memory_format=torch.contiguous_format)
        seen.add(t.untyped_storage().data_ptr())
        out[hk] = t
    return out


def _tokenizer_files(tokenizer_path: str | Path) -> list[Path]:
    p = Path(tokenizer_path)
    file = p / TOKENIZER_NAME if p.is_dir() else p
    if not file.is_file():
        raise CheckpointError(p, [f"no {TOKENIZER_NAME} found"], hint="pass a tokenizer.json or a folder holding one")
    return [file] + [file.parent / n for n in TOKENIZER_EXTRAS if (file.parent / n).is_file()]


def _write_json(file: Path, data: Any) -> None:
    """A file inside the staging folder (install_folder fsyncs it): sorted keys, so saves compare as text."""
    file.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


# ---------------------------------------------------------------------------------------------------------------
# Describing
def random_config(spec: str):
    """The config and tokenizer of `random:PRESET`: the named preset, its vocabulary widened to the bundled
    tokenizer's and its eos ids set to the tokenizer's stop ids (what `api.load` builds the random model from).
    Returns (ModelConfig, Tokenizer); an unknown preset is a ConfigError listing the valid names."""
    from dgemma.tokenizer import Tokenizer  # lazily: reading checkpoints needs no tokenizer

    name = spec.removeprefix(RANDOM_PREFIX)
    try:
        cfg = preset(name)
    except ConfigError:
        from dgemma.config import PRESETS

        raise ConfigError(f"{spec}: unknown preset {name!r}; use random:NAME with NAME one of {sorted(PRESETS)}, "
                          "e.g. random:tiny") from None
    tok = Tokenizer.from_path(BUNDLED_TOKENIZER)
    if cfg.vocab_size < tok.vocab_size:
        cfg = cfg.replace(vocab_size=tok.vocab_size)
    return cfg.replace(eos_token_ids=tuple(tok.stop_ids())), tok


def _describe_config(cfg: ModelConfig) -> dict[str, Any]:
    n_full = sum(not cfg.is_sliding(i) for i in range(cfg.num_hidden_layers))
    return {
        "layers": cfg.num_hidden_layers,
        "sliding_layers": cfg.num_hidden_layers - n_full,
        "full_layers": n_full,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "attention_heads": cfg.num_attention_heads,
        "head_dim": cfg.head_dim,
        "global_head_dim": cfg.global_head_dim,
        "kv_heads": cfg.num_key_value_heads,
        "global_kv_heads": cfg.num_global_key_value_heads,
        "experts": cfg.num_experts,
        "top_k_experts": cfg.top_k_experts,
        "moe_intermediate_size": cfg.moe_intermediate_size,
        "sliding_window": cfg.sliding_window,
        "canvas_length": cfg.canvas_length,
        "vocab_size": cfg.vocab_size,
        "final_logit_softcapping": cfg.final_logit_softcapping,
    }


def _describe_parameters(cfg: ModelConfig) -> dict[str, int]:
    counts = cfg.num_parameters()
    return {k: counts[k] for k in ("total", "active_per_token", "embedding", "experts")}


def describe(path: str | Path) -> dict[str, Any]:
    """A summary of a checkpoint for `dgemma info`, from config.json and the safetensors headers (no weights read).

    `random:PRESET` (as `dgemma generate --model` takes it) is described from the preset config alone, with the same
    fields: float32, no weight files, and the tensor count a saved checkpoint of it would hold."""
    if isinstance(path, str) and path.startswith(RANDOM_PREFIX):
        cfg, _ = random_config(path)
        return {
            "path": path,
            "config": _describe_config(cfg),
            "parameters": _describe_parameters(cfg),
            "dtype": _DTYPE_NAMES[torch.float32],  # random weights are built in float32 unless a dtype is asked for
            "weight_files": [],
            "file_size_bytes": 0,
            "tensors": len(hf_shapes(cfg)),  # on the meta device: no memory
            "skipped_vision_tensors": 0,
            "has_generation_config": False,
            "has_tokenizer": True,  # the bundled tokenizer
        }
    info = scan_checkpoint(path)
    return {
        "path": str(info.folder),
        "config": _describe_config(info.config),
        "parameters": _describe_parameters(info.config),
        "dtype": _DTYPE_NAMES[info.dtype],
        "weight_files": [f.name for f in info.weight_files],
        "file_size_bytes": info.file_size,
        "tensors": len(info.tensors),
        "skipped_vision_tensors": len(info.plan.skipped),
        "has_generation_config": (info.folder / GENERATION_CONFIG_NAME).is_file(),
        "has_tokenizer": (info.folder / TOKENIZER_NAME).is_file(),
    }
