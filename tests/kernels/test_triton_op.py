"""The op-schema entry of the Triton kernels (``deepforcing_kernels.triton.op.sink_attention_cuda``) under
TRITON_INTERPRET=1 on CPU tensors: the three table shapes, the ``[0]`` mass, shifts at the ends of int64, the
capability check, and the module graph of ``deepforcing_kernels.triton`` (no cycle)."""
import ast
import pathlib

import pytest
import torch
from triton_interp import gpu_like_bf16_casts, small_tiles  # noqa: E402,F401  (first: imports triton under the interpreter)

triton = pytest.importorskip("triton")
from deepforcing_kernels import RopeSpec  # noqa: E402
from deepforcing_kernels.attention import SinkAttentionOutput  # noqa: E402
from deepforcing_kernels.rotation import rotation_tables  # noqa: E402
from deepforcing_kernels.testing import assert_within_budget  # noqa: E402
from deepforcing_kernels.triton import attention as triton_attention  # noqa: E402
from deepforcing_kernels.triton.configs import FwdConfig  # noqa: E402
from deepforcing_kernels.triton.op import sink_attention_cuda, triton_supports  # noqa: E402

pytestmark = pytest.mark.triton

SMALL_FWD = FwdConfig(32, 32, 4, 1, BLOCK_N_ROT=16)
SMALL_MASS = FwdConfig(16, 16, 4, 1)


@pytest.fixture(autouse=True)
def _interpret_small_tiles(small_tiles):  # noqa: F811  (the imported fixture)
    assert small_tiles == (SMALL_FWD, SMALL_MASS)  # the tiles these tests' shapes were chosen for


def _qkv(B, Lq, Lk, Hq, Hkv, D, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, Lq, Hq, D, generator=g).to(dtype), torch.randn(B, Lk, Hkv, D, generator=g).to(dtype),
            torch.randn(B, Lk, Hkv, D, generator=g).to(dtype))


def _op(q, k, v, rope, *, sink_len=0, sink_shift=0, key_shift=None, return_mass=True, mass=(0, None)):
    cos, sin, rot_len = rotation_tables(rope, sink_len, sink_shift, key_shift, q.shape[0], k.shape[1], q.device)
    m1 = q.shape[1] if mass[1] is None else mass[1]
    return sink_attention_cuda(q, k, v, cos, sin, rot_len, True if rope is None else rope.interleaved,
                               q.shape[-1] ** -0.5, return_mass, mass[0], m1), (cos, sin, rot_len)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("table", ["none", "sink", "perkey"])
def test_schema_entry_matches_the_oracle(table, dtype):
    B, Lq, Lk = 2, 21, 45
    q, k, v = _qkv(B, Lq, Lk, 4, 2, 64, dtype)
    rope = RopeSpec.wan(64)
    kw = {"none": {}, "sink": dict(sink_len=20, sink_shift=-9),
          "perkey": dict(key_shift=torch.randint(-10 ** 6, 10 ** 6, (B, Lk)))}[table]
    (out, lse, mass), (cos, sin, rot_len) = _op(q, k, v, rope, mass=(4, 17), **kw)
    assert cos.dim() == {"none": 1, "sink": 1, "perkey": 3}[table] and (cos.numel() == 0) == (table == "none")
    assert out.shape == q.shape and out.dtype == dtype
    assert lse.shape == (B, 4, Lq) and lse.dtype == torch.float32
    assert mass.shape == (B, 2, Lk) and mass.dtype == torch.float32
    assert_within_budget(SinkAttentionOutput(out, lse, mass), q, k, v, rope=rope, softmax_scale=64 ** -0.5,
                         mass_q_range=(4, 17), **kw)


def test_mass_not_asked_is_shape_0_and_empty_range_is_zeros():
    q, k, v = _qkv(1, 9, 20, 2, 1, 32, torch.float16)
    rope = RopeSpec.llama(32)
    (out, lse, mass), _ = _op(q, k, v, rope, sink_len=5, sink_shift=3, return_mass=False)
    assert mass.shape == (0,) and mass.dtype == torch.float32
    (out2, lse2, mass2), _ = _op(q, k, v, rope, sink_len=5, sink_shift=3, mass=(4, 4))
    assert mass2.shape == (1, 1, 20) and torch.count_nonzero(mass2) == 0
    torch.testing.assert_close(out, out2, rtol=0, atol=0)  # the mass pass does not change the forward
    torch.testing.assert_close(lse, lse2, rtol=0, atol=0)


@pytest.mark.parametrize("shift", [10 ** 15, -(10 ** 15), 2 ** 63 - 1, -(2 ** 63)], ids=str)
def test_huge_sink_shift_within_budget(shift):
    # the tables are cos / sin of the float64 angle itself (no fmod by a rounded 2*pi, which lost 6.7e-3 at 1e15
    # and 0.95 at 2**63 - 1 in fp32): the kernel then agrees with the oracle at any int64 shift
    B, Lq, Lk = 1, 17, 40
    q, k, v = _qkv(B, Lq, Lk, 2, 2, 64, torch.float32, seed=3)
    rope = RopeSpec.wan(64)
    (out, lse, mass), _ = _op(q, k, v, rope, sink_len=25, sink_shift=shift)
    assert_within_budget(SinkAttentionOutput(out, lse, mass), q, k, v, rope=rope, sink_len=25, sink_shift=shift,
                         softmax_scale=64 ** -0.5)


def test_huge_key_shift_within_budget():
    B, Lq, Lk = 2, 11, 30
    q, k, v = _qkv(B, Lq, Lk, 2, 1, 64, torch.float32, seed=4)
    rope = RopeSpec.gptj(64)
    ks = torch.tensor([2 ** 63 - 1, -(2 ** 63), 10 ** 15, -(10 ** 15), 0, 1], dtype=torch.int64)
    ks = ks[torch.randint(0, 6, (B, Lk), generator=torch.Generator().manual_seed(5))]
    (out, lse, mass), _ = _op(q, k, v, rope, key_shift=ks)
    assert_within_budget(SinkAttentionOutput(out, lse, mass), q, k, v, rope=rope, key_shift=ks,
                         softmax_scale=64 ** -0.5)


def test_triton_supports():
    for d in (16, 32, 64, 128, 256):
        for dt in (torch.float32, torch.float16, torch.bfloat16):
            assert triton_supports(d, dt) is None
    for d in (8, 48, 96, 100, 512):
        reason = triton_supports(d, torch.bfloat16)
        assert reason is not None and "head_dim" in reason and str(d) in reason
    assert "float64" in triton_supports(64, torch.float64)


def test_the_triton_package_has_no_import_cycle():
    # module-level imports between the package's modules must form a DAG (function-local imports excluded)
    root = pathlib.Path(triton_attention.__file__).parent
    graph = {}
    for path in root.glob("*.py"):
        deps = set()
        for node in ast.parse(path.read_text()).body:  # top level only
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                if node.module:
                    deps.add(node.module.split(".")[0])
                else:
                    deps.update(a.name for a in node.names)
        graph[path.stem] = {d for d in deps if (root / f"{d}.py").exists()}
    assert graph["mass"] & {"attention"} == set() and graph["attention"] & {"mass"} == set()
    state = {}

    def visit(n, stack):
        state[n] = "open"
        for d in graph.get(n, ()):
            assert state.get(d) != "open", f"import cycle: {' -> '.join(stack + [n, d])}"
            if d not in state:
                visit(d, stack + [n])
        state[n] = "done"

    for n in graph:
        if n not in state:
            visit(n, [])
