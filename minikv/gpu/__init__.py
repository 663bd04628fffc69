"""The efficient GPU path: a flat ragged KV cache and a Triton decode-attention kernel.

The reference path (``minikv.cache``) does not need this package. Importing it needs no
Triton and no GPU: the Triton kernel is imported only when a CUDA decode step runs.

* ``layout``         -- the flat layout (segments + offsets, like cu_seqlens), plain PyTorch, any device
* ``store``          -- ``FlatStore``: build from a keep mask, append, attend, report bytes
* ``triton_decode``  -- the decode kernel (split-K over each segment, then a merge), any head dim <= 256
* ``reference``      -- the slow, obvious float32 definition the kernel is tested against
* ``decoder``        -- ``StaticDecoder``: a Llama-style model's whole decode step on FlatStores, one CUDA graph per token
* ``triton_step``    -- the step's small fused kernels (residual + RMSNorm, RoPE + append, SiLU * up)
* ``triton_fused``   -- norm folded into the q/k/v and gate/up matmuls (``ops="fused"``; measured slower, an option)
* ``tune``           -- ``python -m minikv.gpu.tune``: per-op times of a layer, the attention launch-plan sweeps
* ``bench``          -- ``python -m minikv bench``: full vs masked vs padded vs ragged attention
* ``e2e``            -- decode tokens/s end to end (SmolLM2, a Llama-3.1-8B-shaped model): full caches vs presses
* ``plots``          -- the layout picture and the benchmarks' figures (from their JSON)
* ``notes``          -- the tables of results/gpu/NOTES.md, from the JSON
"""

from .store import FlatStore

__all__ = ["FlatStore"]
