"""Does SnapKV's window size matter in query-aware mode? A small CPU check on SmolLM2.

10 pass-key samples of ~1k tokens, compression ratio 0.5, question inside the compressed part.
Prints accuracy per press; then, for sample 0, the fraction of the key's digit tokens kept per
layer under snapkv and adakv_snapkv with a 16-token window. About 3 minutes on 2 CPU cores:

    python scripts/window_size_check.py
"""

import torch

import minikv
from minikv.evaluate import score_answer
from minikv.hf import prefill, split_chat_template
from minikv.tasks import passkey_sample

CASES = [("snapkv", {}), ("snapkv", {"window_size": 16}), ("adakv_snapkv", {"window_size": 16}),
         ("critical_adakv_snapkv", {"window_size": 16})]


def main(n_samples: int = 10, ratio: float = 0.5):
    model, tok = minikv.load_model(quiet=True)
    samples = [passkey_sample(i, 1024) for i in range(n_samples)]
    for name, kw in CASES:
        press = minikv.get_press(name, ratio, **kw)
        ok = sum(score_answer(minikv.generate(model, tok, s.context, s.question, press=press, max_new_tokens=12,
                                              query_aware=True).answer, s.answer) for s in samples)
        print(f"{name:<22} window {kw.get('window_size', 64):>3}  cr {ratio}: {ok}/{n_samples} pass keys", flush=True)

    s = samples[0]
    ctx, _ = split_chat_template(tok, s.context, s.question, query_aware=True)
    ids, key = ctx[0].tolist(), tok(s.answer, add_special_tokens=False).input_ids
    starts = [i for i in range(len(ids) - len(key)) if ids[i:i + len(key)] == key]
    needle = torch.tensor([p + j for p in starts for j in range(len(key))])
    for name in ("snapkv", "adakv_snapkv"):
        cache, _ = prefill(model, ctx, minikv.get_press(name, ratio, window_size=16))
        kept = torch.stack([cache.selections[i].keep[0][:, needle].float().mean(-1) for i in sorted(cache.selections)])
        counts = torch.stack([cache.selections[i].counts[0] for i in sorted(cache.selections)])
        print(f"{name}: key tokens kept {kept.mean():.2f} on average over layers and heads; "
              f"head budgets {int(counts.min())}..{int(counts.max())}")


if __name__ == "__main__":
    main()
