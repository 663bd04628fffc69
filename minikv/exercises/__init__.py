"""Self-checking exercises: one checker per exercise in ``exercises/`` (generated from ``solutions/``).

Every checker runs your function on lesson 02's worked example (4 KV heads, 100 tokens) and on
random small cases drawn by hypothesis -- several batch rows, every argument varied (alpha
including 0, epsilon, first_stage_ratio, window and kernel sizes), float16/bfloat16 inputs and tied
scores where they matter -- compares with minikv's own implementation
(:mod:`minikv.exercises.reference`), and raises :class:`ExerciseFailure` saying what differs:
shape, dtype, which row / head / token, expected vs got. Changing an input in place is a failure
too. When your answer is reproduced by a known mistake, the message adds two hints: "Hint 1
(idea)" and "Hint 2 (code)" (``set_hint_level(1)`` keeps the code hint back until you ask for it).
A stub that raises ``NotImplementedError`` passes through unchanged.

| exercise | your function | checker |
|---|---|---|
| 01 | ``window_scores(queries, keys)`` | :func:`check_window_scores` |
| 02 | ``pool_group_window(s, n_kv, window_size, kernel_size=5)`` | :func:`check_pooling` |
| 03 | ``uniform_keep_mask(scores, n_kept)`` | :func:`check_uniform_topk` |
| 04 | ``safeguard(scores, n_kept, alpha_safeguard=0.2)`` | :func:`check_safeguard` |
| 05 | ``adakv_keep_mask(scores, n_kept, alpha_safeguard=0.2)`` | :func:`check_adakv_selection` |
| 06 | ``floor_ceiling(L, compression_ratio, n_kv, alpha_safeguard=0.2)`` | :func:`check_floor_ceiling` |
| 07 | ``projected_value_norm(values, o_proj)`` | :func:`check_value_norm` |
| 08 | ``topk_per_head(scores, budgets)``, ``critical_adakv_keep_mask(scores, values, o_proj, n_kept, ...)`` | :func:`check_topk_per_head`, :func:`check_critical_adakv` |
| 09 | ``append_token(keys, values, k_new, v_new)``, ``ragged_attention(query, keys, values)`` | :func:`check_ragged_append`, :func:`check_ragged_attention` |
"""

from ._check import ExerciseFailure, set_hint_level
from .ragged import check_ragged_append, check_ragged_attention
from .scoring import check_pooling, check_value_norm, check_window_scores
from .selection import (check_adakv_selection, check_critical_adakv, check_floor_ceiling, check_safeguard,
                        check_topk_per_head, check_uniform_topk)

__all__ = ["ExerciseFailure", "set_hint_level", "check_window_scores", "check_pooling", "check_uniform_topk", "check_safeguard",
           "check_adakv_selection", "check_floor_ceiling", "check_value_norm", "check_topk_per_head",
           "check_critical_adakv", "check_ragged_append", "check_ragged_attention"]

#: exercise number -> the checkers of that exercise, in notebook order
CHECKERS = {
    "01": [check_window_scores], "02": [check_pooling], "03": [check_uniform_topk], "04": [check_safeguard],
    "05": [check_adakv_selection], "06": [check_floor_ceiling], "07": [check_value_norm],
    "08": [check_topk_per_head, check_critical_adakv], "09": [check_ragged_append, check_ragged_attention],
}
