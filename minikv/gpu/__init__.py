"""The efficient GPU path: a flat ragged KV cache and a Triton decode-attention kernel.

The reference path (``minikv.cache``) does not need this package. Importing it needs no
Triton and no GPU: the Triton kernel is imported only when a CUDA decode step runs.

* ``layout``         -- the flat layout (segments + offsets, like cu_seqlens), plain PyTorch, any device
* ``store``          -- ``FlatStore``: build from a keep mask, append, attend, report bytes
* ``triton_decode``  -- the decode kernel (split-K over each segment) and its merge
* ``reference``      -- the slow, obvious float32 definition the kernel is tested against
* ``bench``          -- ``python -m minikv bench``: full vs masked vs padded vs ragged attention
* ``e2e``            -- SmolLM2 decode tokens/s on the GPU, full cache vs presses
* ``plots``          -- the layout picture and the benchmark's figures (from its JSON)
"""

from .store import FlatStore

__all__ = ["FlatStore"]
