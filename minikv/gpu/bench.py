"""``python -m minikv bench``: one decode step of attention, four ways, on the same inputs.

  full     -- the whole cache, PyTorch SDPA                       (no compression)
  masked   -- the whole cache + an additive mask, SDPA             (kvpress: evicted tokens stay in memory)
  padded   -- every head padded to the longest kept head + mask    (ragged cache, the obvious way)
  ragged   -- minikv.gpu.FlatStore + the Triton split-K kernel     (ragged cache, the efficient way)
  uniform  -- SDPA on a dense cache of the same bytes as ragged    (what SnapKV's uniform budgets would cost)

SDPA is given its best shot: for one new token, the g query heads of a GQA group are passed as
g query *rows* of one KV head, so each KV head is read once (no repeat_kv).

Decode attention is bound by memory: the time floor is (bytes of K and V it must read) / bandwidth.
We report that bandwidth as a fraction of a device-to-device copy measured in the same run
(bytes read + written), the ceiling of what the memory system delivers.

Head imbalance: per (row, KV head) the "attention" a window would give each token is drawn as
softmax(sigma_h * z), z ~ N(0, 1), with a per-head temperature sigma_h ~ U(0.5, 3): low sigma = a
head that spreads its attention, high sigma = a head that looks at a few tokens. The real AdaKV
selection (minikv.policies.adakv_keep_mask, safeguard 0.2) then allocates the budgets. The
spread it produces is recorded with every row (min/max kept per head relative to the mean).
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import time

import torch
import torch.nn.functional as F

MODELS = {  # attention shapes: query heads, KV heads, head dim, plus the layer sizes for the prefill estimate
    "smollm2": dict(H=9, n_kv=3, d=64, hidden=576, inter=1536),
    "llama8b": dict(H=32, n_kv=8, d=128, hidden=4096, inter=14336),
}


def add_arguments(parser) -> None:
    """The bench command's options (defined in the torch-free minikv.cli, so --help needs no torch)."""
    from ..cli import add_bench_arguments

    add_bench_arguments(parser)


# -- inputs ----------------------------------------------------------------------------------------
def adakv_selection(b, n_kv, L, ratio, gen, device):
    """A realistic ragged keep mask: heads of different sharpness, then the real AdaKV allocation."""
    from ..budget import n_kept
    from ..policies import adakv_keep_mask

    sigma = 0.5 + 2.5 * torch.rand(b, n_kv, 1, generator=gen, device=device)  # (b, n_kv, 1)
    z = torch.randn(b, n_kv, L, generator=gen, device=device)
    scores = torch.softmax(sigma * z, dim=-1)  # (b, n_kv, L) each head's attention sums to 1
    k = n_kept(L, ratio)
    return adakv_keep_mask(scores, k, 0.2), scores, k


def imbalance(keep, k):
    c = keep.sum(-1).float() / k  # (b, n_kv) kept / mean budget
    return dict(min=c.min().item(), p10=c.quantile(0.1).item(), median=c.median().item(),
                p90=c.quantile(0.9).item(), max=c.max().item())


# -- the four (five) ways ------------------------------------------------------------------------
def sdpa_decode(query, keys, values, mask=None):
    """query (b, H, 1, d), keys/values (b, n_kv, L, d): the g heads of a group as g query rows."""
    b, H, _, d = query.shape
    n_kv = keys.shape[1]
    qg = query.reshape(b, n_kv, H // n_kv, d)  # (b, n_kv, g, d)
    out = F.scaled_dot_product_attention(qg, keys, values, attn_mask=mask)
    return out.reshape(b, H, 1, d)


def additive_mask(valid, g, dtype):
    """(b, n_kv, L) bool -> (b, n_kv, g, L) 0 / -inf, as kvpress-style masking needs."""
    m = torch.zeros(valid.shape, dtype=dtype, device=valid.device).masked_fill_(~valid, float("-inf"))
    return m[:, :, None, :].expand(-1, -1, g, -1)


def rel_err(out, ref):
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


def timed(fn, rep_ms):
    from triton.testing import do_bench

    return do_bench(fn, warmup=max(5, rep_ms / 4), rep=rep_ms, return_mode="median")


def timed_graph(fn, rep_ms):
    """Median time of fn replayed from a CUDA graph: the GPU's time without Python's launch overhead.

    No L2 flush here, so only trust it for caches well above the 50 MB L2 (H100/H200).
    """
    from triton.testing import do_bench_cudagraph

    return do_bench_cudagraph(fn, rep=rep_ms, return_mode="median")


def copy_bandwidth(device, rep_ms):
    n = 2 ** 30  # 2 GiB of bf16 -> read 2 GiB + write 2 GiB
    src = torch.randn(n, device=device, dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    ms = timed(lambda: dst.copy_(src), rep_ms)
    bw = 2 * src.numel() * src.element_size() / (ms * 1e-3)
    src = dst = None  # free the memory (not del: closures above still name them)
    return bw, ms


def matmul_rate(device, rep_ms):
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    bm = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    ms = timed(lambda: a @ bm, rep_ms)
    return 2 * 8192 ** 3 / (ms * 1e-3)


# -- kernel tiling sweep -----------------------------------------------------------------------------
def sweep(device, dtype, rep_ms, log):
    from . import triton_decode as td
    from .store import FlatStore

    gen = torch.Generator(device=device).manual_seed(1)
    results = []
    for model, L, b in [("smollm2", 32768, 32), ("llama8b", 32768, 16), ("llama8b", 131072, 8)]:
        m = MODELS[model]
        keys = torch.randn(b, m["n_kv"], L, m["d"], device=device, dtype=dtype, generator=gen)
        values = torch.randn_like(keys)
        keep, _, _ = adakv_selection(b, m["n_kv"], L, 0.75, gen, device)
        store = FlatStore.from_selection(keys, values, keep)
        keys = values = None  # free the memory (not del: closures above still name them)
        query = torch.randn(b, m["H"], 1, m["d"], device=device, dtype=dtype, generator=gen)
        ref = store.attend(query, m["d"] ** -0.5, use_triton=False)
        best = None
        for block_n in (32, 64, 128):
            for num_warps in (4, 8):
                for num_stages in (2, 3, 4):
                    for per_sm in (4, 8, 16):
                        if per_sm != 8 and (num_stages != 3 or num_warps != 4):
                            continue
                        kw = dict(block_n=block_n, num_warps=num_warps, num_stages=num_stages, programs=per_sm * td._sm_count(0))
                        f = lambda: td.flat_decode_attention(query, store.k_flat, store.v_flat, store.starts,
                                                             store._lengths, m["d"] ** -0.5, store.n_total,
                                                             store.max_len, **kw)
                        try:
                            err = rel_err(f(), ref)
                            ms = timed(f, rep_ms)
                        except Exception as e:  # e.g. out of shared memory for this tiling
                            log(f"  sweep {model} {kw}: failed {type(e).__name__}: {str(e)[:80]}")
                            continue
                        bw = 2 * store.n_total * m["d"] * keys_elt(dtype) / (ms * 1e-3)
                        row = dict(model=model, L=L, b=b, per_sm=per_sm, ms=ms, bw=bw, err=err, **kw)
                        results.append(row)
                        if err < 2e-2 and (best is None or ms < best["ms"]):
                            best = row
        log(f"  sweep best {model} L={L} b={b}: {best}")
        store = None  # free the memory (not del: closures above still name them)
        torch.cuda.empty_cache()
    return results


def keys_elt(dtype):
    return torch.tensor([], dtype=dtype).element_size()


def choose_config(results):
    """Per head dim, the tiling with the lowest total time over the sweep's shapes."""
    from . import triton_decode as td

    chosen = {}
    for d, models in ((64, ("smollm2",)), (128, ("llama8b",))):
        totals = {}
        for r in results:
            if r["model"] in models and r["err"] < 2e-2:
                key = (r["block_n"], r["num_warps"], r["num_stages"], r["per_sm"])
                totals.setdefault(key, []).append(r["ms"])
        n_shapes = max(len(v) for v in totals.values())
        key = min((k for k, v in totals.items() if len(v) == n_shapes), key=lambda k: sum(totals[k]))
        chosen[d] = dict(block_n=key[0], num_warps=key[1], num_stages=key[2], per_sm=key[3])
        td.CONFIG[d] = dict(chosen[d])
    return chosen


# -- compression overhead ----------------------------------------------------------------------------
def overhead(device, dtype, rep_ms, log):
    """Time of AdaKV selection on random scores + FlatStore build, vs one layer's prefill of 32k tokens."""
    from ..budget import n_kept
    from ..policies import adakv_keep_mask
    from .store import FlatStore

    rows = []
    L, b, ratio = 32768, 1, 0.75
    for model, m in MODELS.items():
        gen = torch.Generator(device=device).manual_seed(2)
        keys = torch.randn(b, m["n_kv"], L, m["d"], device=device, dtype=dtype, generator=gen)
        values = torch.randn_like(keys)
        scores = torch.rand(b, m["n_kv"], L, device=device, generator=gen)
        k = n_kept(L, ratio)
        keep = adakv_keep_mask(scores, k, 0.2)
        ms_select = timed(lambda: adakv_keep_mask(scores, k, 0.2), rep_ms)
        ms_build = timed(lambda: FlatStore.from_selection(keys, values, keep), rep_ms)
        # one layer's prefill: the projections + MLP as matrix products, and causal flash attention
        hid, H, n_kv, d, inter = m["hidden"], m["H"], m["n_kv"], m["d"], m["inter"]
        x = torch.randn(L, hid, device=device, dtype=dtype)
        w = {name: torch.randn(i, o, device=device, dtype=dtype) * 0.02 for name, (i, o) in dict(
            q=(hid, H * d), k=(hid, n_kv * d), v=(hid, n_kv * d), o=(H * d, hid),
            gate=(hid, inter), up=(hid, inter), down=(inter, hid)).items()}
        qh = torch.randn(1, H, L, d, device=device, dtype=dtype)
        kh = torch.randn(1, n_kv, L, d, device=device, dtype=dtype)

        def layer():
            _ = x @ w["q"], x @ w["k"], x @ w["v"]
            a = F.scaled_dot_product_attention(qh, kh, kh, is_causal=True, enable_gqa=True)
            o = a.transpose(1, 2).reshape(L, H * d) @ w["o"]
            h = F.silu(o @ w["gate"]) * (o @ w["up"])
            return h @ w["down"]

        ms_prefill = timed(layer, rep_ms)
        row = dict(model=model, L=L, b=b, ratio=ratio, select_ms=ms_select, build_ms=ms_build,
                   prefill_layer_ms=ms_prefill, overhead_frac=(ms_select + ms_build) / ms_prefill)
        log(f"  overhead {model}: select {ms_select:.3f} ms + build {ms_build:.3f} ms vs prefill layer "
            f"{ms_prefill:.3f} ms -> {100 * row['overhead_frac']:.1f}%")
        rows.append(row)
        keys = values = x = w = qh = kh = None  # free the memory (not del: closures above still name them)
        torch.cuda.empty_cache()
    return rows


# -- one layer's decode step, split into its parts ----------------------------------------------------
def layer_step(device, dtype, rep_ms, log):
    """Where a compressed layer's decode time goes: writing the new token vs attending (eager and graph)."""
    from . import layout
    from .store import FlatStore

    rows = []
    for model, L, b in (("smollm2", 8192, 64), ("llama8b", 32768, 8)):
        m = MODELS[model]
        gen = torch.Generator(device=device).manual_seed(4)
        keys = torch.randn(b, m["n_kv"], L, m["d"], device=device, dtype=dtype, generator=gen)
        keep, _, _ = adakv_selection(b, m["n_kv"], L, 0.75, gen, device)
        store = FlatStore.from_selection(keys, keys, keep)
        keys = None  # free the memory (not del: closures above still name them)
        nk = torch.randn(b, m["n_kv"], 1, m["d"], device=device, dtype=dtype, generator=gen)
        query = torch.randn(b, m["H"], 1, m["d"], device=device, dtype=dtype, generator=gen)

        def write():  # append without moving the lengths on, so it can be repeated
            slots = layout.append_slots(store.starts, store._lengths, 1).reshape(-1)
            store.k_flat.index_copy_(0, slots, nk.reshape(-1, m["d"]))
            store.v_flat.index_copy_(0, slots, nk.reshape(-1, m["d"]))

        attend = lambda: store.attend(query, m["d"] ** -0.5)
        row = dict(model=model, L=L, b=b, ratio=0.75, kv_bytes=store.nbytes,
                   write_ms=timed(write, rep_ms), write_graph_ms=timed_graph(write, rep_ms),
                   attend_ms=timed(attend, rep_ms), attend_graph_ms=timed_graph(attend, rep_ms))
        log(f"  layer step {model} L={L} b={b}: write {1e3 * row['write_ms']:.1f} us (graph {1e3 * row['write_graph_ms']:.1f}), "
            f"attend {1e3 * row['attend_ms']:.1f} us (graph {1e3 * row['attend_graph_ms']:.1f}), KV {store.nbytes / 1e9:.3f} GB")
        rows.append(row)
        store = None  # free the memory (not del: closures above still name them)
    return rows


# -- the main comparison ------------------------------------------------------------------------------
def bench_case(model, L, b, ratios, dtype, rep_ms, gen, device, copy_bw):
    from .store import FlatStore
    from .triton_decode import flat_decode_attention

    m = MODELS[model]
    H, n_kv, d = m["H"], m["n_kv"], m["d"]
    g = H // n_kv
    elt = keys_elt(dtype)
    keys = torch.randn(b, n_kv, L, d, device=device, dtype=dtype, generator=gen)
    values = torch.randn_like(keys)
    query = torch.randn(b, H, 1, d, device=device, dtype=dtype, generator=gen)
    full_bytes = 2 * keys.numel() * elt
    rows = []

    def add(method, ratio, ms, read_bytes, kv_bytes, graph_fn=None, **extra):
        if graph_fn is not None:
            extra["graph_ms"] = timed_graph(graph_fn, rep_ms)
        rows.append(dict(model=model, L=L, b=b, ratio=ratio, method=method, ms=ms, read_bytes=read_bytes,
                         kv_bytes=kv_bytes, bw=read_bytes / (ms * 1e-3), frac_copy=read_bytes / (ms * 1e-3) / copy_bw,
                         full_kv_bytes=full_bytes, **extra))

    f_full = lambda: sdpa_decode(query, keys, values)
    add("full", 0.0, timed(f_full, rep_ms), full_bytes, full_bytes, graph_fn=f_full)
    for ratio in ratios:
        keep, _, k = adakv_selection(b, n_kv, L, ratio, gen, device)
        spread = imbalance(keep, k)
        mask = additive_mask(keep, g, dtype)
        mask_bytes = keep.numel() * elt
        add("masked", ratio, timed(lambda: sdpa_decode(query, keys, values, mask), rep_ms),
            full_bytes + mask_bytes, full_bytes)
        mask = None  # free the memory (not del: closures above still name them)
        store = FlatStore.from_selection(keys, values, keep)
        pk, pv, valid = store.dense()  # (b, n_kv, Lmax, d): padded to the longest head
        pmask = additive_mask(valid, g, dtype)
        padded_bytes = 2 * pk.numel() * elt
        ref = sdpa_decode(query, pk, pv, pmask)
        add("padded", ratio, timed(lambda: sdpa_decode(query, pk, pv, pmask), rep_ms),
            padded_bytes + valid.numel() * elt, padded_bytes, Lmax=store.max_len)
        pk = pv = valid = pmask = None  # free the memory (not del: closures above still name them)
        out = store.attend(query, d ** -0.5)
        err = rel_err(out, ref)
        f_rag = lambda: store.attend(query, d ** -0.5)
        # the kernel with its merge as a second launch and with the merge fused in, both named explicitly (the
        # default changed between runs: fused in issue-13 run 1, two launches after the run-3 sweep)
        f_two = lambda: flat_decode_attention(query, store.k_flat, store.v_flat, store.starts, store._lengths, d ** -0.5,
                                              store.n_total, store.max_len, fused=False)
        f_fused = lambda: flat_decode_attention(query, store.k_flat, store.v_flat, store.starts, store._lengths,
                                                d ** -0.5, store.n_total, store.max_len, fused=True)
        add("ragged", ratio, timed(f_rag, rep_ms), 2 * store.n_total * d * elt, store.nbytes, graph_fn=f_rag,
            capacity_bytes=store.capacity_nbytes, rel_err_vs_padded=err, spread=spread, n_kept=k,
            ms_again=timed(f_rag, rep_ms),  # the same thing timed twice: the noise floor
            rel_err_two_launch=rel_err(f_two(), ref), graph_ms_two_launch=timed_graph(f_two, rep_ms),
            graph_ms_fused_merge=timed_graph(f_fused, rep_ms))
        n_uniform = store.n_total // (b * n_kv)  # same bytes, every head the same length: SnapKV's cache
        store = None  # free the memory (not del: closures above still name them)
        uk, uv = keys[:, :, :n_uniform].contiguous(), values[:, :, :n_uniform].contiguous()
        f_uni = lambda: sdpa_decode(query, uk, uv)
        add("uniform", ratio, timed(f_uni, rep_ms), 2 * uk.numel() * elt, 2 * uk.numel() * elt, graph_fn=f_uni)
        uk = uv = keep = None  # free the memory (not del: closures above still name them)
    keys = values = None  # free the memory (not del: closures above still name them)
    torch.cuda.empty_cache()
    return rows


def table(rows):
    """One line per (model, L, b, ratio): times in ms and the ragged kernel's bandwidth fraction."""
    by = {}
    for r in rows:
        by.setdefault((r["model"], r["L"], r["b"]), {}).setdefault(r["ratio"], {})[r["method"]] = r
    lines = [f"{'model':8} {'L':>6} {'b':>3} {'ratio':>5} | {'full':>8} {'masked':>8} {'padded':>8} {'ragged':>8} "
             f"{'uniform':>8} | {'rag/full':>8} {'rag bw':>6} {'uni bw':>6} {'full bw':>7} {'KV/full':>7} {'GB':>6} | "
             f"{'graph: rag':>10} {'2-launch':>8} {'uni':>7} {'full':>7}"]
    for (model, L, b), per in by.items():
        full = per[0.0]["full"]
        for ratio, mm in per.items():
            if ratio == 0.0:
                continue
            t = lambda k: f"{mm[k]['ms']:8.3f}" if k in mm else f"{'-':>8}"
            rag, uni = mm.get("ragged"), mm.get("uniform")
            lines.append(
                f"{model:8} {L:6d} {b:3d} {ratio:5.3f} | {full['ms']:8.3f} {t('masked')} {t('padded')} {t('ragged')} "
                f"{t('uniform')} | {rag['ms'] / full['ms']:8.3f} {rag['frac_copy']:6.1%} {uni['frac_copy']:6.1%} "
                f"{full['frac_copy']:7.1%} {rag['kv_bytes'] / full['kv_bytes']:7.4f} {rag['kv_bytes'] / 1e9:6.2f} | "
                f"{rag.get('graph_ms', float('nan')):10.3f} {rag.get('graph_ms_two_launch', float('nan')):8.3f} "
                f"{uni.get('graph_ms', float('nan')):7.3f} "
                f"{full.get('graph_ms', float('nan')):7.3f}")
    return "\n".join(lines)


def td_fused_default() -> bool:
    from .triton_decode import fused_merge_default

    return fused_merge_default()


def run(args) -> int:
    if not torch.cuda.is_available():
        print("minikv bench needs a CUDA GPU (the Triton kernel runs there); nothing to do on this machine.")
        return 1
    import triton

    device = torch.device("cuda")
    dtype = getattr(torch, args.dtype)
    os.makedirs(args.out, exist_ok=True)
    t0 = time.time()
    log_lines = []

    def log(s):
        print(s, flush=True)
        log_lines.append(s)

    props = torch.cuda.get_device_properties(device)
    meta = dict(gpu=props.name, sms=props.multi_processor_count, torch=torch.__version__, triton=triton.__version__,
                cuda=torch.version.cuda, python=platform.python_version(), dtype=args.dtype,
                date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                command="python -m minikv bench " + " ".join(f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()
                                                                if k not in ("command", "func")),
                imbalance="per-head softmax(sigma*z), sigma ~ U(0.5, 3), then AdaKV (alpha 0.2)",
                fused_merge=td_fused_default(), version="issue 13: fused merge, padded head dims")
    copy_bw, copy_ms = copy_bandwidth(device, args.rep_ms)
    meta.update(copy_bw=copy_bw, matmul_flops=matmul_rate(device, args.rep_ms))
    log(f"{props.name}: copy {copy_bw / 1e12:.2f} TB/s (read+write), bf16 matmul {meta['matmul_flops'] / 1e12:.0f} TFLOP/s")
    out = dict(meta=meta, sweep=[], chosen=None, rows=[], overhead=[])
    path = os.path.join(args.out, f"bench_{props.name.split()[-1].lower()}.json")

    def save():
        out["log"] = log_lines
        with open(path, "w") as f:
            json.dump(out, f, indent=1)

    if args.sweep:
        out["sweep"] = sweep(device, dtype, args.rep_ms / 2, log)
        out["chosen"] = choose_config(out["sweep"])
        log(f"chosen tilings: {out['chosen']}")
        save()
    if args.overhead:
        out["overhead"] = overhead(device, dtype, args.rep_ms, log)
        save()
    if args.layer_step:
        out["layer_step"] = layer_step(device, dtype, args.rep_ms, log)
        save()
    gen = torch.Generator(device=device).manual_seed(args.seed)
    ratios = [float(r) for r in args.ratios.split(",")]
    for model in args.models.split(","):
        for L in map(int, args.lengths.split(",")):
            for b in map(int, args.batches.split(",")):
                if time.time() - t0 > args.budget_s:
                    log(f"  budget reached: skipping {model} L={L} b={b}")
                    continue
                t1 = time.time()
                out["rows"] += bench_case(model, L, b, ratios, dtype, args.rep_ms, gen, device, copy_bw)
                log(f"  {model} L={L} b={b}: {time.time() - t1:.1f} s")
                save()
    out["table"] = table(out["rows"])
    save()
    print(f"\nwrote {path}  ({time.time() - t0:.0f} s)\n")
    print(out["table"])
    return 0


if __name__ == "__main__":
    import argparse

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    raise SystemExit(run(p.parse_args()))
