"""What a worker's paged KV cache looks like, so two workers can agree before moving blocks.

Both ends of a pair describe their cache with a `KVLayout` and exchange it as JSON at pair
setup (through the rendezvous store, never a pickle). Blocks are copied byte for byte, so
every field that changes the meaning or the size of a block must be equal on both sides;
only the number of blocks of each group may differ (each worker sizes its own pool).

Cache of one layer (both ends, see the brief's paged-cache contract):

    key_cache / value_cache  [num_blocks_of_its_group, block_size, heads_per_rank, head_dim]
                             (heads_per_rank = num_kv_heads / kv_head_shards)
    block b of group g       = slots b*block_size .. (b+1)*block_size - 1 in every layer of g
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any, Protocol

import torch

# Dtypes a KV cache may have; the wire carries raw bytes, so any fixed-width dtype works.
_DTYPES = ("bfloat16", "float16", "float32", "float8_e4m3fn", "float8_e5m2", "uint8")


class KVLayoutMismatch(ValueError):
    """Two workers' KV layouts differ; the message names every field that differs."""


class _ConfigWithGroups(Protocol):
    num_hidden_layers: int
    num_key_value_heads: int
    head_dim: int

    def kv_group_of_layer(self, layer: int) -> int: ...


@dataclass(frozen=True)
class KVLayout:
    """Shape and meaning of one worker's paged KV cache (everything but block counts)."""

    model: str
    # Model identity (name or checkpoint hash): blocks of another model are garbage here.
    dtype: str
    # torch dtype name of the cache, e.g. "bfloat16".
    block_size: int
    # Tokens per block.
    num_layers: int
    layer_groups: tuple[int, ...]
    # KV group index of every layer (index into config.kv_groups: full first, then sliding).
    num_kv_heads: int
    head_dim: int
    kv_head_shards: int = 1
    # Ranks of one worker its KV heads are split over: rank i holds heads [i H/S, (i+1) H/S)
    # and its cache has H/S heads. 1: every rank holds every head (replicated attention, as
    # expert-parallel workers of any size run it; workers/expert_parallel/kv_replica.py), so
    # a worker's rank count is not part of its layout, only how its heads are split.

    def __post_init__(self) -> None:
        if not isinstance(self.model, str) or not self.model:
            raise ValueError(f"model must be a non-empty string, got {self.model!r}")
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {_DTYPES}, got {self.dtype!r}")
        for name in ("block_size", "num_layers", "num_kv_heads", "head_dim", "kv_head_shards"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.num_kv_heads % self.kv_head_shards:
            raise ValueError(
                f"kv_head_shards {self.kv_head_shards} must divide num_kv_heads {self.num_kv_heads}"
            )
        if not isinstance(self.layer_groups, tuple):
            raise ValueError(
                f"layer_groups must be a tuple, got {type(self.layer_groups).__name__}"
            )
        if len(self.layer_groups) != self.num_layers:
            raise ValueError(
                f"layer_groups has {len(self.layer_groups)} entries, "
                f"num_layers is {self.num_layers}"
            )
        if any(not isinstance(g, int) or isinstance(g, bool) for g in self.layer_groups):
            raise ValueError(f"layer_groups must hold integers, got {self.layer_groups!r}")
        # Groups are numbered 0..G-1 and none is empty, as config.kv_groups guarantees.
        if sorted(set(self.layer_groups)) != list(range(max(self.layer_groups) + 1)):
            raise ValueError(
                f"layer_groups must use every group 0..G-1 at least once, got {self.layer_groups!r}"
            )

    @classmethod
    def from_config(
        cls, config: _ConfigWithGroups, model: str, dtype: torch.dtype, block_size: int
    ) -> KVLayout:
        """Layout of a gpt-oss config's cache (`GptOssConfig` or anything with its fields)."""
        num_layers = config.num_hidden_layers
        return cls(
            model=model,
            dtype=dtype_name(dtype),
            block_size=block_size,
            num_layers=num_layers,
            layer_groups=tuple(config.kv_group_of_layer(i) for i in range(num_layers)),
            num_kv_heads=config.num_key_value_heads,
            head_dim=config.head_dim,
        )

    @property
    def num_groups(self) -> int:
        return max(self.layer_groups) + 1

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    @property
    def block_bytes(self) -> int:
        """Bytes of one block of one layer's key cache (the value cache has as many)."""
        element = torch.empty((), dtype=self.torch_dtype).element_size()
        return self.block_size * self.heads_per_rank * self.head_dim * element

    @property
    def heads_per_rank(self) -> int:
        """KV heads in one rank's cache."""
        return self.num_kv_heads // self.kv_head_shards

    def layers_of_group(self, group: int) -> tuple[int, ...]:
        return tuple(i for i, g in enumerate(self.layer_groups) if g == group)

    def check_compatible(self, other: KVLayout) -> None:
        """Raise KVLayoutMismatch naming each field where `other` differs from this layout."""
        differences = [
            f"{f.name} {getattr(self, f.name)!r} here vs {getattr(other, f.name)!r} at peer"
            for f in fields(self)
            if getattr(self, f.name) != getattr(other, f.name)
        ]
        if differences:
            raise KVLayoutMismatch("KV layouts differ: " + "; ".join(differences))

    def check_caches(self, kv_caches: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> list[int]:
        """Validate per-layer (key, value) caches against this layout; return blocks per group.

        All caches must be contiguous, on one device, of this dtype and of shape
        [num_blocks_of_group, block_size, heads_per_rank, head_dim], with one block count per
        group (layers of a group share block ids).
        """
        if len(kv_caches) != self.num_layers:
            raise ValueError(f"kv_caches has {len(kv_caches)} layers, layout has {self.num_layers}")
        blocks: list[int | None] = [None] * self.num_groups
        device = kv_caches[0][0].device
        for layer, pair in enumerate(kv_caches):
            if len(pair) != 2:
                raise ValueError(f"kv_caches[{layer}] must be a (key, value) pair")
            group = self.layer_groups[layer]
            for name, cache in zip(("key", "value"), pair, strict=True):
                where = f"kv_caches[{layer}] {name}"
                if cache.dtype != self.torch_dtype:
                    raise ValueError(f"{where} has dtype {cache.dtype}, layout says {self.dtype}")
                if cache.device != device:
                    raise ValueError(f"{where} is on {cache.device}, layer 0 is on {device}")
                if not cache.is_contiguous():
                    raise ValueError(f"{where} must be contiguous")
                expected = (self.block_size, self.heads_per_rank, self.head_dim)
                if cache.dim() != 4 or tuple(cache.shape[1:]) != expected:
                    raise ValueError(
                        f"{where} has shape {tuple(cache.shape)}, expected [num_blocks, "
                        f"{', '.join(map(str, expected))}]"
                    )
                if blocks[group] is None:
                    blocks[group] = cache.shape[0]
                elif cache.shape[0] != blocks[group]:
                    raise ValueError(
                        f"{where} has {cache.shape[0]} blocks, other layers of group {group} "
                        f"have {blocks[group]}"
                    )
        return [int(b) for b in blocks if b is not None]

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> KVLayout:
        """Parse a peer's layout; a malformed one is a KVLayoutMismatch, not a crash."""
        try:
            data: Any = json.loads(text)
            if not isinstance(data, dict):
                raise ValueError(f"expected a JSON object, got {type(data).__name__}")
            names = {f.name for f in fields(cls)}
            if set(data) != names:
                raise ValueError(f"fields {sorted(data)} instead of {sorted(names)}")
            data["layer_groups"] = tuple(data["layer_groups"])
            return cls(**data)
        except (ValueError, TypeError) as e:
            raise KVLayoutMismatch(f"peer sent an unreadable KV layout: {e}") from e


def dtype_name(dtype: torch.dtype) -> str:
    """'bfloat16' for torch.bfloat16."""
    return str(dtype).removeprefix("torch.")
