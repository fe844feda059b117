"""The Triton path differentiates with the op's one autograd rule (no silently detached output), also under the
interpreter on CPU."""
import pytest  # noqa: E402
import torch  # noqa: E402
from triton_interp import gpu_like_bf16_casts  # noqa: F401  (first: imports triton under the interpreter)

from deepforcing_kernels import RopeSpec, sink_attention  # noqa: E402

pytestmark = pytest.mark.triton
ROPE = RopeSpec.wan(64)


@pytest.mark.parametrize("shift", [dict(sink_len=6, sink_shift=5), dict(key_shift="perkey")])
def test_triton_gradients_agree_with_the_oracle(monkeypatch, shift):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    if shift.get("key_shift") == "perkey":
        shift = dict(key_shift=torch.randint(-40, 40, (16,), generator=torch.Generator().manual_seed(2)))
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, L, H, 64, generator=g).requires_grad_() for L, H in ((8, 4), (16, 2), (16, 2)))
    res = sink_attention(q, k, v, rope=ROPE, backend="triton", return_lse=True, **shift)
    assert res.out.requires_grad and res.lse.requires_grad
    w_out = torch.randn(res.out.shape, generator=g)
    w_lse = torch.randn(res.lse.shape, generator=g)
    ((res.out * w_out).sum() + (res.lse * w_lse).sum()).backward()
    got = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    want = sink_attention(q, k, v, rope=ROPE, backend="reference", return_lse=True, **shift)
    ((want.out * w_out).sum() + (want.lse * w_lse).sum()).backward()
    for a, t in zip(got, (q, k, v)):
        torch.testing.assert_close(a, t.grad, atol=1e-4, rtol=1e-3)
