"""Load a gpt-oss checkpoint directory into a GptOssModel, tensor by tensor.

Two layouts, told apart by config.json (HF has `model_type`, OpenAI has `num_experts`):

    Hugging Face                                OpenAI original/
    config.json (+ generation_config.json)      config.json
    model.safetensors, or                       *.safetensors (any names)
    model-0000i-of-0000N.safetensors
      + model.safetensors.index.json
    model.layers.N.self_attn.q_proj.weight      block.N.attn.qkv.weight  (rows q | k | v)
    model.layers.N.mlp.experts.gate_up_...      block.N.mlp.mlp1_weight.blocks ...

A directory with no config.json but an original/ subdirectory is read from original/.
The parameters are allocated empty first; each tensor is then checked (name, shape, dtype)
and copied straight into its parameter, so the weights never exist twice in memory.
MXFP4 expert tensors stay packed uint8. Every problem is a CheckpointError naming the file
and, where there is one, the tensor.

Expert parallelism (`expert_ids`): a process that holds a subset of each layer's experts
reads only those rows of the expert tensors, through safetensors' lazy slices (one read
per run of consecutive ids), so it never materialises another rank's experts.
"""

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from safetensors import safe_open

from tandem.kernels.mxfp4 import E8M0_NAN
from tandem.workers.model.attention import AttentionBackend
from tandem.workers.model.config import (
    CheckpointError,
    GptOssConfig,
    is_original_config,
    read_config_json,
)
from tandem.workers.model.gpt_oss import GptOssModel
from tandem.workers.model.layers import MoEBlock
from tandem.workers.model.moe import MoEBackend
from tandem.workers.model.triton_backends import make_backends

__all__ = ["CheckpointError", "CheckpointFiles", "load_model", "resolve_checkpoint"]

HF_SINGLE_FILE = "model.safetensors"
HF_INDEX_FILE = "model.safetensors.index.json"

Layout = Literal["hf", "original"]
Kind = Literal["float", "packed"]
# Float tensors may be stored in any of these and are converted to the model dtype; packed
# MXFP4 blocks and scales must be bytes.
_FLOAT_DTYPES = ("BF16", "F16", "F32")
_PACKED_DTYPE = "U8"


@dataclass(frozen=True)
class CheckpointFiles:
    """Where a checkpoint's config and tensors are."""

    layout: Layout
    config_path: Path
    index_path: Path | None
    # Set for a sharded HF checkpoint.
    tensor_files: dict[str, Path]
    # Tensor name -> file that holds it (from the index when there is one).


@dataclass(frozen=True)
class _TensorSpec:
    """A tensor the checkpoint must contain and the parameters that receive it."""

    name: str
    shape: tuple[int, ...]
    kind: Kind
    targets: tuple[torch.Tensor, ...]
    # Consecutive row ranges of the tensor go to these, in order (qkv -> q, k, v).
    rows: tuple[int, ...] | None = None
    # Only these rows (dim 0: experts) are read, into the one target in this order.


def load_model(
    checkpoint_dir: str | Path,
    dtype: torch.dtype | None = None,
    device: torch.device | str = "cpu",
    attention: AttentionBackend | None = None,
    moe: MoEBackend | None = None,
    expert_ids: Sequence[int] | None = None,
) -> tuple[GptOssModel, GptOssConfig]:
    """Build and fill a GptOssModel from a checkpoint directory.

    expert_ids: the experts (global ids, ascending) this process holds; only their rows of
    the expert tensors are read (expert parallelism). None: all.

    dtype None means bfloat16 on CUDA and float32 elsewhere (CPU has no fast bf16 matmul).
    A backend left None is the default for the device: the Triton kernels on CUDA, the
    torch references elsewhere (tandem.workers.model.triton_backends.make_backends).
    """
    files, config = resolve_checkpoint(checkpoint_dir)
    device = torch.device(device)
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if attention is None or moe is None:
        default_attention, default_moe = make_backends(None, device)
        attention = attention if attention is not None else default_attention
        moe = moe if moe is not None else default_moe
    model = GptOssModel(
        config, dtype=dtype, attention=attention, moe=moe, device=device, expert_ids=expert_ids
    )
    specs = _original_specs(model) if files.layout == "original" else _hf_specs(model)
    _check_names(files, specs)
    _load_tensors(files, specs)
    return model.eval(), config


def resolve_checkpoint(checkpoint_dir: str | Path) -> tuple[CheckpointFiles, GptOssConfig]:
    """Detect the layout, read and validate the config, and map every tensor name to its file."""
    root = Path(checkpoint_dir)
    if not root.is_dir():
        raise CheckpointError(f"{root}: checkpoint directory not found")
    if not (root / "config.json").is_file() and (root / "original" / "config.json").is_file():
        root = root / "original"
    config_path = root / "config.json"
    raw = read_config_json(config_path)
    if "model_type" in raw:
        layout: Layout = "hf"
    elif is_original_config(raw):
        layout = "original"
    else:
        raise CheckpointError(
            f"{config_path}: unknown checkpoint layout: neither a Hugging Face config "
            "(model_type) nor an OpenAI original config (num_experts, experts_per_token)"
        )
    try:
        if layout == "hf":
            config = GptOssConfig.from_hf_dict(raw, source=str(config_path))
        else:
            config = GptOssConfig.from_original_dict(raw, source=str(config_path))
    except ValueError as e:
        raise CheckpointError(str(e)) from e

    index_path = root / HF_INDEX_FILE
    if layout == "hf" and index_path.is_file():
        tensor_files = _read_index(index_path)
        return CheckpointFiles(layout, config_path, index_path, tensor_files), config
    if layout == "hf":
        single = root / HF_SINGLE_FILE
        if not single.is_file():
            hint = " (the OpenAI weights are in original/)" if (root / "original").is_dir() else ""
            raise CheckpointError(
                f"{root}: Hugging Face layout needs {HF_SINGLE_FILE} or {HF_INDEX_FILE}{hint}"
            )
        weight_files = [single]
    else:
        weight_files = sorted(root.glob("*.safetensors"))
        if not weight_files:
            raise CheckpointError(f"{root}: no *.safetensors files for the original layout")
    tensor_files: dict[str, Path] = {}
    for path in weight_files:
        for name in _tensor_names(path):
            if name in tensor_files:
                raise CheckpointError(f"{path}: tensor {name} also appears in {tensor_files[name]}")
            tensor_files[name] = path
    return CheckpointFiles(layout, config_path, None, tensor_files), config


def _read_index(index_path: Path) -> dict[str, Path]:
    try:
        index = json.loads(index_path.read_text())
        weight_map = index["weight_map"]
        if not isinstance(weight_map, dict):
            raise TypeError("weight_map is not an object")
        tensor_files = {name: index_path.parent / file for name, file in weight_map.items()}
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{index_path}: not a valid safetensors index ({e!r})") from e
    for path in sorted(set(tensor_files.values())):
        if not path.is_file():
            listed = sorted(n for n, p in tensor_files.items() if p == path)
            raise CheckpointError(
                f"{path}: shard file missing; {index_path.name} puts {len(listed)} tensors there "
                f"(e.g. {listed[0]})"
            )
    return tensor_files


def _tensor_names(path: Path) -> list[str]:
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return list(f.keys())
    except Exception as e:  # safetensors raises its own error types for corrupt headers
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from e


def _check_names(files: CheckpointFiles, specs: list[_TensorSpec]) -> None:
    """Every expected tensor has a file and nothing unexpected is listed, before any reads."""
    expected = {spec.name for spec in specs}
    for spec in specs:
        if spec.name not in files.tensor_files:
            where = (
                files.index_path
                if files.index_path
                else sorted({str(p) for p in files.tensor_files.values()})
            )
            raise CheckpointError(f"tensor {spec.name} is missing (looked in {where})")
    extra = sorted(set(files.tensor_files) - expected)
    if extra:
        raise CheckpointError(
            f"{files.tensor_files[extra[0]]}: unexpected tensor {extra[0]} "
            f"({len(extra)} unexpected in all) for the {files.layout} layout"
        )


def _load_tensors(files: CheckpointFiles, specs: list[_TensorSpec]) -> None:
    by_file: dict[Path, list[_TensorSpec]] = {}
    for spec in specs:
        by_file.setdefault(files.tensor_files[spec.name], []).append(spec)
    for path, file_specs in by_file.items():
        try:
            handle = safe_open(str(path), framework="pt", device="cpu")
        except Exception as e:  # corrupt header or truncated data, from safetensors
            raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from e
        with handle as f:
            present = set(f.keys())
            for spec in file_specs:
                if spec.name not in present:
                    raise CheckpointError(
                        f"{path}: tensor {spec.name} is missing from this file "
                        f"(the index puts it here)"
                    )
                _check_and_copy(f, path, spec)


def _check_and_copy(f: safe_open, path: Path, spec: _TensorSpec) -> None:
    view = f.get_slice(spec.name)
    shape, dtype = tuple(view.get_shape()), view.get_dtype()
    if shape != spec.shape:
        raise CheckpointError(
            f"{path}: tensor {spec.name} has shape {list(shape)}, expected {list(spec.shape)}"
        )
    allowed = _FLOAT_DTYPES if spec.kind == "float" else (_PACKED_DTYPE,)
    if dtype not in allowed:
        raise CheckpointError(
            f"{path}: tensor {spec.name} has dtype {dtype}, expected {' or '.join(allowed)}"
        )
    try:
        tensor = f.get_tensor(spec.name) if spec.rows is None else _read_rows(view, spec.rows)
    except Exception as e:  # safetensors' own error types
        raise CheckpointError(f"{path}: cannot read tensor {spec.name} ({e})") from e
    if spec.kind == "packed" and spec.name.endswith("scales") and bool(
        (tensor == E8M0_NAN).any()
    ):
        raise CheckpointError(
            f"{path}: tensor {spec.name} holds scale byte {E8M0_NAN} (NaN in E8M0), which no "
            f"valid MXFP4 checkpoint contains and the MoE kernels do not decode"
        )
    row = 0
    with torch.no_grad():
        for target in spec.targets:
            rows = target.shape[0]
            target.copy_(tensor[row : row + rows])
            row += rows


def _read_rows(view, rows: tuple[int, ...]) -> torch.Tensor:
    """Rows `rows` (ascending) of a lazy safetensors slice, one read per consecutive run."""
    if not rows:
        return torch.empty((0, *view.get_shape()[1:]), dtype=torch.uint8)
    parts, start = [], 0
    for i in range(1, len(rows) + 1):
        if i == len(rows) or rows[i] != rows[i - 1] + 1:
            parts.append(view[rows[start] : rows[i - 1] + 1])
            start = i
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def _hf_specs(model: GptOssModel) -> list[_TensorSpec]:
    """Expected Hugging Face tensors; shapes come from the config, not from the parameters."""
    c = model.config
    d, v, heads = c.hidden_size, c.vocab_size, c.num_attention_heads
    q_rows, kv_rows = heads * c.head_dim, c.num_key_value_heads * c.head_dim
    specs = [_float("model.embed_tokens.weight", (v, d), model.embed_tokens)]
    for n, layer in enumerate(model.layers):
        p = f"model.layers.{n}."
        attn = layer.self_attn
        specs += [
            _float(p + "input_layernorm.weight", (d,), layer.input_layernorm.weight),
            _float(p + "self_attn.q_proj.weight", (q_rows, d), attn.q_proj.weight),
            _float(p + "self_attn.k_proj.weight", (kv_rows, d), attn.k_proj.weight),
            _float(p + "self_attn.v_proj.weight", (kv_rows, d), attn.v_proj.weight),
            _float(p + "self_attn.o_proj.weight", (d, q_rows), attn.o_proj.weight),
            _float(p + "self_attn.sinks", (heads,), attn.sinks),
            _float(
                p + "post_attention_layernorm.weight", (d,), layer.post_attention_layernorm.weight
            ),
        ]
        if c.attention_bias:
            specs += [
                _float(p + "self_attn.q_proj.bias", (q_rows,), attn.q_proj.bias),
                _float(p + "self_attn.k_proj.bias", (kv_rows,), attn.k_proj.bias),
                _float(p + "self_attn.v_proj.bias", (kv_rows,), attn.v_proj.bias),
                _float(p + "self_attn.o_proj.bias", (d,), attn.o_proj.bias),
            ]
        specs += _expert_specs(c, p + "mlp.", layer.mlp, True, model.expert_ids)
    specs += [
        _float("model.norm.weight", (d,), model.norm.weight),
        _float("lm_head.weight", (v, d), model.lm_head.weight),
    ]
    return specs


def _original_specs(model: GptOssModel) -> list[_TensorSpec]:
    """Expected OpenAI original/ tensors; the fused qkv splits by rows into q, k, v."""
    c = model.config
    d, v, heads = c.hidden_size, c.vocab_size, c.num_attention_heads
    q_rows, kv_rows = heads * c.head_dim, c.num_key_value_heads * c.head_dim
    qkv_rows = q_rows + 2 * kv_rows
    specs = [_float("embedding.weight", (v, d), model.embed_tokens)]
    for n, layer in enumerate(model.layers):
        p = f"block.{n}."
        a = layer.self_attn
        specs += [
            _float(p + "attn.norm.scale", (d,), layer.input_layernorm.weight),
            _float(
                p + "attn.qkv.weight",
                (qkv_rows, d),
                a.q_proj.weight,
                a.k_proj.weight,
                a.v_proj.weight,
            ),
            _float(p + "attn.qkv.bias", (qkv_rows,), a.q_proj.bias, a.k_proj.bias, a.v_proj.bias),
            _float(p + "attn.sinks", (heads,), a.sinks),
            _float(p + "attn.out.weight", (d, q_rows), a.o_proj.weight),
            _float(p + "attn.out.bias", (d,), a.o_proj.bias),
            _float(p + "mlp.norm.scale", (d,), layer.post_attention_layernorm.weight),
        ]
        specs += _expert_specs(c, p + "mlp.", layer.mlp, False, model.expert_ids)
    specs += [
        _float("norm.scale", (d,), model.norm.weight),
        _float("unembedding.weight", (v, d), model.lm_head.weight),
    ]
    return specs


def _expert_specs(
    c: GptOssConfig,
    prefix: str,
    mlp: MoEBlock,
    hf_names: bool,
    expert_ids: Sequence[int] | None,
) -> list[_TensorSpec]:
    d, e, i = c.hidden_size, c.num_local_experts, c.intermediate_size
    x = mlp.experts
    held = tuple(range(e)) if expert_ids is None else tuple(expert_ids)
    rows = None if held == tuple(range(e)) else held
    if hf_names:
        router, w1, b1 = "router", "experts.gate_up_proj_", "experts.gate_up_proj_bias"
        w2, b2 = "experts.down_proj_", "experts.down_proj_bias"
    else:
        router, w1, b1, w2, b2 = "gate", "mlp1_weight.", "mlp1_bias", "mlp2_weight.", "mlp2_bias"
    return [
        _float(prefix + f"{router}.weight", (e, d), mlp.router.weight),
        _float(prefix + f"{router}.bias", (e,), mlp.router.bias),
        _packed(prefix + w1 + "blocks", (e, 2 * i, d // 32, 16), x.gate_up_proj_blocks, rows),
        _packed(prefix + w1 + "scales", (e, 2 * i, d // 32), x.gate_up_proj_scales, rows),
        _TensorSpec(prefix + b1, (e, 2 * i), "float", (x.gate_up_proj_bias,), rows),
        _packed(prefix + w2 + "blocks", (e, d, i // 32, 16), x.down_proj_blocks, rows),
        _packed(prefix + w2 + "scales", (e, d, i // 32), x.down_proj_scales, rows),
        _TensorSpec(prefix + b2, (e, d), "float", (x.down_proj_bias,), rows),
    ]


def _float(name: str, shape: tuple[int, ...], *targets: torch.Tensor | None) -> _TensorSpec:
    return _TensorSpec(name, shape, "float", _present(name, targets))


def _packed(
    name: str, shape: tuple[int, ...], target: torch.Tensor, rows: tuple[int, ...] | None = None
) -> _TensorSpec:
    return _TensorSpec(name, shape, "packed", (target,), rows)


def _present(name: str, targets: tuple[torch.Tensor | None, ...]) -> tuple[torch.Tensor, ...]:
    if any(t is None for t in targets):
        raise CheckpointError(f"the model has no parameter for tensor {name} (bias disabled?)")
    return tuple(t for t in targets if t is not None)
