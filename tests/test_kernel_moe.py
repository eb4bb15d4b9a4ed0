"""MXFP4 MoE kernel against its fp32 torch reference, and the reference against a per-token loop.

Runs through the Triton interpreter on CPU (tests/conftest.py); shapes are tiny on purpose.
"""

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tandem.kernels.moe import (
    MoEGemvTiling,
    MoETiling,
    group_by_expert,
    moe_mxfp4,
    moe_mxfp4_reference,
    pack_f16_pairs,
    packed_f16_buffers,
    route,
    swiglu_f16_exponent,
)
from tests.support.moe_weights import (
    DEVICE,
    errors,
    make_weights,
    poisoned_rows,
)


def decode_mxfp4_bits(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Independent decode from the E2M1 bit fields (sign, 2-bit exponent, 1-bit mantissa)."""
    nibbles = torch.stack((blocks & 15, blocks >> 4), dim=-1).flatten(-2).double()  # [..., G, 32]
    sign = torch.where(nibbles >= 8, -1.0, 1.0)
    exponent = torch.div(nibbles % 8, 2, rounding_mode="floor")
    mantissa = nibbles % 2
    magnitude = torch.where(
        exponent == 0, 0.5 * mantissa, (1.0 + 0.5 * mantissa) * torch.exp2(exponent - 1)
    )
    values = sign * magnitude * torch.exp2(scales.double() - 127.0).unsqueeze(-1)
    return values.flatten(-2)


def per_token_moe(x: torch.Tensor, w: dict[str, torch.Tensor], top_k: int) -> torch.Tensor:
    """GPT_OSS.md 2.5 one token at a time in float64, sorting logits in Python."""
    w1 = decode_mxfp4_bits(w["gate_up_blocks"].cpu(), w["gate_up_scales"].cpu())  # [E, 2I, d]
    w2 = decode_mxfp4_bits(w["down_blocks"].cpu(), w["down_scales"].cpu())  # [E, d, I]
    b1, b2 = w["gate_up_bias"].cpu().double(), w["down_bias"].cpu().double()
    wr, br = w["router_weight"].cpu().double(), w["router_bias"].cpu().double()
    out = torch.zeros(x.shape, dtype=torch.float64)
    for t, row in enumerate(x.cpu().double()):
        logits = (wr @ row + br).tolist()
        chosen = sorted(range(len(logits)), key=lambda e: -logits[e])[:top_k]
        exps = [math.exp(logits[e] - logits[chosen[0]]) for e in chosen]
        for e, p in zip(chosen, exps, strict=True):
            z = w1[e] @ row + b1[e]
            gate = z[0::2].clamp(max=7.0)
            up = z[1::2].clamp(-7.0, 7.0)
            act = (up + 1) * gate * torch.sigmoid(1.702 * gate)
            out[t] += p / sum(exps) * (w2[e] @ act + b2[e])
    return out



def test_reference_matches_per_token_loop() -> None:
    w = make_weights(num_experts=5, d_model=64, d_ff=64, seed=0)
    x = poisoned_rows(9, 64, torch.float32, seed=1).contiguous()
    expected = per_token_moe(x, w, top_k=2)
    max_err, rms_err = errors(moe_mxfp4_reference(x, **w, top_k=2), expected)
    assert max_err < 1e-5 and rms_err < 1e-6, (max_err, rms_err)


def test_route_picks_top_experts_exactly() -> None:
    w = make_weights(num_experts=5, d_model=64, d_ff=64, seed=2)
    x = poisoned_rows(17, 64, torch.float32, seed=3)
    weights, experts = route(x, w["router_weight"], w["router_bias"], top_k=2)
    logits = (x.double() @ w["router_weight"].double().T + w["router_bias"].double()).cpu()
    for t in range(17):
        order = sorted(range(5), key=lambda e: -logits[t, e].item())[:2]
        assert experts[t].tolist() == order
        gap = logits[t, order[0]] - logits[t, order[1]]
        expected_first = 1.0 / (1.0 + math.exp(-gap))
        assert abs(weights[t, 0].item() - expected_first) < 1e-6
    assert experts.dtype == torch.int32


def test_route_bf16_router_matches_fp32_logits() -> None:
    """bf16 activations and router weights (as a bf16 checkpoint has them): the tensor-core
    dot on the GPU, an fp32 dot in the CPU interpreter; the same experts and weights as
    fp32 logits of the same values either way."""
    gen = torch.Generator().manual_seed(24)
    x = torch.randn(7, 64, generator=gen).to(torch.bfloat16)
    router_weight = (torch.randn(5, 64, generator=gen) / 8).to(torch.bfloat16)
    router_bias = torch.randn(5, generator=gen).to(torch.bfloat16)
    weights, experts = route(x.to(DEVICE), router_weight.to(DEVICE), router_bias.to(DEVICE), 2)
    logits = x.float() @ router_weight.float().T + router_bias.float()
    top, expected = torch.topk(logits, 2)
    assert experts.cpu().tolist() == expected.tolist()
    torch.testing.assert_close(weights.cpu(), torch.softmax(top, dim=-1), rtol=1e-5, atol=1e-6)


def test_route_ties_go_to_the_lower_expert() -> None:
    w = make_weights(num_experts=5, d_model=64, d_ff=64, seed=4)
    w["router_weight"][3] = w["router_weight"][1]
    w["router_bias"][3] = w["router_bias"][1] = 50.0   # experts 1 and 3: equal, and the top
    x = poisoned_rows(4, 64, torch.float32, seed=5)
    weights, experts = route(x, w["router_weight"], w["router_bias"], top_k=3)
    assert experts[:, :2].tolist() == [[1, 3]] * 4
    assert torch.equal(weights[:, 0], weights[:, 1])


@pytest.mark.parametrize("num_tokens", [0, 1, 3, 17, 300])
@pytest.mark.parametrize("block_m", [4, 16])
def test_group_by_expert_layout(num_tokens: int, block_m: int) -> None:
    # 300 tokens: 600 pairs, so the grouping passes span three chunks of pairs.
    num_experts, top_k = 5, 2
    gen = torch.Generator().manual_seed(num_tokens)
    # Skewed choice so one expert spans several blocks and expert 3 gets none.
    pool = torch.tensor([0, 0, 0, 1, 2, 4], dtype=torch.int32)
    experts = pool[torch.randint(0, 6, (num_tokens, top_k), generator=gen)]
    groups = group_by_expert(experts.to(DEVICE), num_experts, block_m)

    flat = experts.reshape(-1).tolist()
    pair_ids, block_expert = [], []
    offsets = [0]
    for e in range(num_experts):
        mine = [p for p, chosen in enumerate(flat) if chosen == e]
        offsets.append(offsets[-1] + len(mine))
        padded = -(-len(mine) // block_m) * block_m
        pair_ids += mine + [len(flat)] * (padded - len(mine))
        block_expert += [e] * (padded // block_m)
    num_blocks = groups.block_expert.numel()
    assert num_blocks >= len(block_expert)
    pair_ids += [len(flat)] * ((num_blocks - len(block_expert)) * block_m)
    block_expert += [-1] * (num_blocks - len(block_expert))
    assert groups.pair_ids.tolist() == pair_ids
    assert groups.block_expert.tolist() == block_expert
    assert groups.expert_offsets.tolist() == offsets
    assert groups.num_pairs == num_tokens * top_k


def check_kernel(
    num_tokens: int,
    dtype: torch.dtype,
    num_experts: int = 5,
    d_model: int = 64,
    d_ff: int = 64,
    top_k: int = 2,
    tiling: MoETiling | MoEGemvTiling | None = None,
    seed: int = 0,
    favour_expert: float = 0.0,
) -> None:
    w = make_weights(num_experts, d_model, d_ff, seed)
    w["router_bias"][0] += favour_expert
    x = poisoned_rows(num_tokens, d_model, dtype, seed + 1)
    out = moe_mxfp4(x, **w, top_k=top_k, tiling=tiling)
    assert out.shape == (num_tokens, d_model) and out.dtype == dtype
    expected = moe_mxfp4_reference(x, **w, top_k=top_k)
    max_err, rms_err = errors(out, expected)
    # fp32: only summation order differs. bf16: activations and output are rounded to bf16
    # (truncated on the CPU interpreter, up to 2^-7 relative), a few 1e-3 of the output.
    max_bound, rms_bound = (2e-5, 5e-6) if dtype == torch.float32 else (2e-2, 8e-3)
    assert max_err < max_bound and rms_err < rms_bound, (max_err, rms_err)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_tokens", [1, 3, 17])
def test_moe_kernel_matches_reference(num_tokens: int, dtype: torch.dtype) -> None:
    check_kernel(num_tokens, dtype, seed=num_tokens)


def test_moe_kernel_expert_spanning_blocks() -> None:
    # Expert 0 gets almost every token: 40 rows over 16-row blocks, the last one padded.
    check_kernel(40, torch.float32, tiling=MoETiling(16, 32, 32), seed=5, favour_expert=6.0)


def test_moe_kernel_odd_shapes() -> None:
    # d = 96 is not a multiple of block_k = 64 and d_ff = 32 is below block_n = 64.
    check_kernel(5, torch.float32, num_experts=3, d_model=96, d_ff=32, top_k=1, seed=7)
    check_kernel(6, torch.bfloat16, num_experts=4, d_model=96, d_ff=32, top_k=3, seed=8)


def test_moe_kernel_half_precision_grouped() -> None:
    # bf16/fp16 take tl.dot_scaled on the packed weights; d = 96 leaves a masked K tail.
    check_kernel(17, torch.float16, tiling=MoETiling(16, 32, 64), seed=11)
    check_kernel(6, torch.bfloat16, num_experts=4, d_model=96, d_ff=32, top_k=3,
                 tiling=MoETiling(16, 32, 64), seed=12)


def test_moe_kernel_wider_second_gemm() -> None:
    # down_block_n = 64 over d = 96: the second GEMM's last column tile is half masked.
    for dtype, seed in ((torch.float32, 13), (torch.bfloat16, 14)):
        check_kernel(9, dtype, num_experts=4, d_model=96, d_ff=64, top_k=2,
                     tiling=MoETiling(16, 32, 64, down_block_n=64), seed=seed)


def test_moe_kernel_second_gemm_tiled_apart() -> None:
    # The down GEMM with its own block_k (a masked K tail: d_ff = 96 over 64), warps and
    # stages; the first GEMM keeps its own.
    for dtype, seed in ((torch.float32, 15), (torch.bfloat16, 16)):
        check_kernel(11, dtype, num_experts=4, d_model=64, d_ff=96, top_k=2,
                     tiling=MoETiling(16, 32, 32, down_block_n=32, down_block_k=64,
                                      down_num_warps=2, down_num_stages=2), seed=seed)
    tiling = MoETiling(16, 32, 64, num_warps=4, num_stages=3, down_num_warps=8)
    assert tiling.down == (32, 64, 8, 3)


def test_moe_kernel_zero_tokens() -> None:
    w = make_weights(5, 64, 64, seed=9)
    out = moe_mxfp4(torch.empty(0, 64, device=DEVICE), **w, top_k=2)
    assert out.shape == (0, 64)


def test_moe_rejects_bad_shapes() -> None:
    w = make_weights(5, 64, 64, seed=10)
    w["down_scales"] = w["down_scales"][:, :, :1]
    with pytest.raises(ValueError, match="down_scales"):
        moe_mxfp4(torch.zeros(1, 64, device=DEVICE), **w, top_k=2)
    with pytest.raises(ValueError, match="block_k"):
        MoETiling(16, 16, 16)
    with pytest.raises(ValueError, match="down_block_k"):
        MoETiling(16, 16, 32, down_block_k=16)
    with pytest.raises(ValueError, match="down_num_warps"):
        MoETiling(16, 16, 32, down_num_warps=3)
    with pytest.raises(ValueError, match="down_num_stages"):
        MoETiling(16, 16, 32, down_num_stages=0)
    with pytest.raises(ValueError, match="down_block_n"):
        MoETiling(16, 32, 32, down_block_n=48)


# Tensor-core GEMVs (bf16/fp16 on CUDA). Their inline mma.sync cannot run in the CPU
# interpreter: there the activation packing runs, and the kernels are compiled for sm_90 to
# check the register layout the MMA relies on; on the GPU the kernels run against the
# reference.

def unpack_f16_pairs(xq: torch.Tensor, xe: torch.Tensor) -> torch.Tensor:
    """Inverse of pack_f16_pairs, written from the layout: [T, G, 2, 4] int64 + [T, G]."""
    num_tokens, groups = xe.shape
    out = torch.empty(num_tokens, groups, 4, 8, dtype=torch.float64)
    words = xq.cpu()
    for parity in range(2):
        for slot, (first, second) in enumerate(((0, 4), (2, 6))):
            half = (words[:, :, parity, :] >> (32 * slot)) & 0xFFFFFFFF
            for element, shift in ((first, 0), (second, 16)):
                bits = ((half >> shift) & 0xFFFF).to(torch.int16)
                out[:, :, :, element + parity] = bits.view(torch.float16).double()
    return (out * torch.exp2(xe.cpu().double())[:, :, None, None]).reshape(num_tokens, -1)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_pack_f16_pairs_is_exact(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(21)
    x = torch.randn(3, 32 * 20, generator=gen)
    x[0, :32] = 0.0                                   # an all-zero group
    x[1, 32:64] *= 1e30 if dtype == torch.bfloat16 else 1e3   # beyond f16's range in bf16
    x[2, 64:96] *= 1e-20 if dtype == torch.bfloat16 else 1e-3
    x = x.to(dtype).to(DEVICE)
    xq, xe = pack_f16_pairs(x)
    assert xq.shape == (3, 20, 2, 4) and xe.shape == (3, 20)
    assert torch.equal(unpack_f16_pairs(xq, xe), x.cpu().double())
    assert xe[0, 0] == -100 and xe[1, 1] > 80 if dtype == torch.bfloat16 else True


@pytest.mark.parametrize("num_tokens", [1, 19])
def test_route_packs_like_pack_f16_pairs(num_tokens: int) -> None:
    """The router GEMM's by-product (what moe_mxfp4 feeds the tensor-core GEMVs) equals the
    standalone packing, over several K splits and token blocks."""
    w = make_weights(5, 32 * 44, 64, seed=22)
    x = poisoned_rows(num_tokens, 32 * 44, torch.bfloat16, seed=23)
    packed = packed_f16_buffers(x)
    weights, experts = route(x, w["router_weight"], w["router_bias"], 2, packed)
    expected = pack_f16_pairs(x)
    assert torch.equal(packed[0], expected[0]) and torch.equal(packed[1], expected[1])
    plain = route(x, w["router_weight"], w["router_bias"], 2)
    assert torch.equal(weights, plain[0]) and torch.equal(experts, plain[1])


def test_swiglu_f16_exponent_bounds_the_activations() -> None:
    assert swiglu_f16_exponent(7.0, 1.702) == 0        # gpt-oss: |act| <= 56
    exp = swiglu_f16_exponent(1000.0, 1.702)
    assert 1001.0 * 1000.0 * 2.0 ** -exp < 2.0 ** 15


def test_gemv_tiling_checks_tensor_core_shapes() -> None:
    assert MoEGemvTiling(8, 128, num_warps=1, tensor_cores=True, down_block_n=16).down_n() == 16
    with pytest.raises(ValueError, match="rows per program"):
        MoEGemvTiling(4, 128, num_warps=1, tensor_cores=True)
    with pytest.raises(ValueError, match="rows per program"):
        MoEGemvTiling(8, 128, num_warps=4, tensor_cores=True)


_COMPILE_FOR_SM90 = """
import json, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from tandem.kernels import _moe_gemv_triton
signature = {
    "actq_ptr": "*i64", "words_ptr": "*i32", "scales_ptr": "*u8", "bias_ptr": "*bf16",
    "route_weight_ptr": "*fp32", "experts_ptr": "*i32", "y_ptr": "*fp32", "d_model": "i32",
    "groups": "i32", "stride_actq": "i32", "stride_y": "i32", "act_exp": "i32",
    "zero": "i32", "BLOCK_N": "constexpr", "STEP": "constexpr"}
warps, block_n = int(sys.argv[1]), int(sys.argv[2])
source = ASTSource(fn=_moe_gemv_triton._down_gemv_mma_kernel, signature=signature,
                   constexprs={"BLOCK_N": block_n, "STEP": 16}, attrs={})
compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32),
                          options={"num_warps": warps, "num_stages": 1})
print(json.dumps({"ttgir": compiled.asm["ttgir"], "ptx": compiled.asm["ptx"]}))
"""


@pytest.mark.parametrize("warps, block_n", [(1, 16), (2, 32)])
def test_tensor_core_gemv_layout_for_sm90(warps: int, block_n: int) -> None:
    """Lane 4m + q must hold column q of row m in every tile the MMA reads (one element per
    lane): threads [8, 4], order [1, 0], one element per thread, no conversion in the loop.
    Compiled (not run) for sm_90 in a process without the interpreter."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", _COMPILE_FOR_SM90, str(warps), str(block_n)],
                            capture_output=True, text=True, env=env, timeout=300,
                            cwd=Path(__file__).resolve().parents[1])
    assert result.returncode == 0, result.stderr[-2000:]
    asm = json.loads(result.stdout)
    ttgir = asm["ttgir"]
    loop = ttgir[ttgir.index("scf.for"):ttgir.index("scf.yield")]
    layouts = dict(re.findall(r"(#\w+) = (#ttg\.blocked<\{[^}]*\}>)", ttgir))
    used = set(re.findall(r"tensor<\d+x4x[^,>]+, (#\w+)>", loop))
    assert used and "convert_layout" not in loop
    for name in used:
        assert ("sizePerThread = [1, 1], threadsPerWarp = [8, 4], "
                f"warpsPerCTA = [{warps}, 1], order = [1, 0]") in layouts[name], layouts[name]
    assert asm["ptx"].count("mma.sync.aligned.m16n8k16") == 16 * block_n // (8 * warps)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="mma.sync runs on the GPU only")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_tensor_core_gemv_matches_reference(dtype: torch.dtype) -> None:
    tiling = MoEGemvTiling(8, 128, num_warps=1, tensor_cores=True, down_block_n=16)
    check_kernel(3, dtype, tiling=tiling, seed=31)
    # 3 groups (not a multiple of the 4-group step) and d_ff = 32: masked tails
    check_kernel(2, dtype, num_experts=4, d_model=96, d_ff=32, top_k=3, tiling=tiling, seed=32)
    check_kernel(4, dtype, num_experts=6, d_model=160, d_ff=96, top_k=4,
                 tiling=MoEGemvTiling(16, 128, num_warps=2, tensor_cores=True), seed=33)
