"""The core op and the cache run without torch's compiler stack: `import torch._dynamo` costs seconds of start-up
(every CLI run and every rank process pays it), so nothing on the eager path may import it."""
import subprocess
import sys

SCRIPT = r"""
import sys, torch
from deepforcing_kernels import CachePolicy, RopeSpec, available_backends, sink_attention
from deepforcing_kernels import StreamingKVCache
q, k, v = (torch.randn(1, n, 2, 64) for n in (8, 40, 40))
for b in available_backends("cpu"):
    sink_attention(q, k, v, rope=RopeSpec.wan(64), sink_len=8, sink_shift=3, return_mass=True, backend=b)
# a compressing Deep Forcing stream, long enough for Top-C to fire (its host helpers are the extension's)
cache = StreamingKVCache(CachePolicy.deep_forcing(), num_layers=1, batch_size=1, num_heads=2, head_dim=64,
                         tokens_per_frame=1, rope=RopeSpec.wan(64), dtype=torch.float32)
for f0 in range(0, 60, 3):
    for _ in range(2):
        cache.layers[0].attend(*(torch.randn(1, 3, 2, 64) for _ in range(3)), start_frame=f0)
print("backends", ",".join(available_backends("cpu")))
print("dynamo", "torch._dynamo" in sys.modules)
"""


def test_eager_op_does_not_import_the_compiler_stack():
    r = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    lines = dict(line.split(" ", 1) for line in r.stdout.splitlines())
    assert "reference" in lines["backends"]
    assert lines["dynamo"] == "False", "an eager sink_attention call imported torch._dynamo"
