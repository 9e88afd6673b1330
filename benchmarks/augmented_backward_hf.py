"""Benchmark: the augmented backward on Hugging Face ``transformers`` models (GPT-2, Llama, BERT,
ViT), against a plain backward in the same process.

For each architecture two checks:

* **exactness** on a tiny configuration in float64 and training mode (dropout on): the
  statistics against per-example gradients of the same batched graph (one ``autograd.grad`` per
  example's loss, both passes seeded alike), as the largest error relative to the largest entry
  over all parameters, and the per-example squared norms likewise;
* **speed** on a small but real configuration (``--layers`` x ``--width``, sequence ``--seq``,
  batch ``--batch``) in float32: plain and tracked training steps (forward + backward)
  interleaved for ``--rounds`` rounds; the median of the per-round ratios.

Modules that take the ``torch.func`` fallback are listed (Llama's ``LlamaRMSNorm``, ViT's
embeddings). GPT-2 and Llama get batched ``position_ids`` (a position embedding computed once
for the batch and broadcast has no per-example gradient, see docs/stats.md).

Run (``transformers`` is in the ``bench`` extra)::

    PYTHONPATH=src python benchmarks/augmented_backward_hf.py
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch
import torch.nn.functional as F

import sgdlab.stats as stats


def _models(tf, layers: int, width: int, seq: int, vocab: int) -> dict:
    """Constructors ``(model, batch -> per-example losses)`` per architecture."""
    heads = max(2, width // 64)

    def lm(model_cls, config):
        model = model_cls(config)

        def losses(batch):
            ids = batch
            pos = torch.arange(ids.shape[1]).expand_as(ids)
            logits = model(ids, position_ids=pos).logits[:, :-1]
            per = F.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="none"
            )
            return per.view(ids.shape[0], -1).mean(1)

        return model, losses, lambda b: torch.randint(0, vocab, (b, seq))

    def bert():
        config = tf.BertConfig(
            vocab_size=vocab,
            hidden_size=width,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            intermediate_size=4 * width,
            max_position_embeddings=seq,
            num_labels=3,
        )
        model = tf.BertForSequenceClassification(config)

        def losses(batch):
            ids, y = batch
            pos = torch.arange(ids.shape[1]).expand_as(ids)
            logits = model(ids, position_ids=pos, token_type_ids=torch.zeros_like(ids)).logits
            return F.cross_entropy(logits, y, reduction="none")

        return (
            model,
            losses,
            lambda b: (torch.randint(0, vocab, (b, seq)), torch.randint(0, 3, (b,))),
        )

    def vit():
        side = 32
        config = tf.ViTConfig(
            image_size=side,
            patch_size=4,
            num_channels=3,
            hidden_size=width,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            intermediate_size=4 * width,
            num_labels=10,
            hidden_dropout_prob=0.1,
            attention_probs_dropout_prob=0.1,
        )
        model = tf.ViTForImageClassification(config)

        def losses(batch):
            x, y = batch
            return F.cross_entropy(
                model(x.to(next(model.parameters()).dtype)).logits, y, reduction="none"
            )

        return model, losses, lambda b: (torch.randn(b, 3, side, side), torch.randint(0, 10, (b,)))

    return {
        "GPT-2": lambda: lm(
            tf.GPT2LMHeadModel,
            tf.GPT2Config(
                n_layer=layers, n_embd=width, n_head=heads, vocab_size=vocab, n_positions=seq
            ),
        ),
        "Llama": lambda: lm(
            tf.LlamaForCausalLM,
            tf.LlamaConfig(
                vocab_size=vocab,
                hidden_size=width,
                intermediate_size=2 * width,
                num_hidden_layers=layers,
                num_attention_heads=heads,
                num_key_value_heads=max(1, heads // 2),
                max_position_embeddings=seq,
            ),
        ),
        "BERT": bert,
        "ViT": vit,
    }


def exactness(make, batch: int = 4) -> tuple[float, float, tuple[str, ...]]:
    model, losses, data = make()
    model.double().train()
    params = [p for p in model.parameters() if p.requires_grad]
    torch.manual_seed(1)
    inputs = data(batch)
    torch.manual_seed(2)
    per_loss = losses(inputs)
    rows = []
    for b in range(batch):
        gs = torch.autograd.grad(per_loss[b], params, retain_graph=True, allow_unused=True)
        rows.append([torch.zeros_like(p) if g is None else g for g, p in zip(gs, params)])
    per = [torch.stack(r) for r in zip(*rows, strict=True)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tracker = stats.track(model, reduction="sum", per_example_norms=True)
    torch.manual_seed(2)
    losses(inputs).sum().backward()
    scale = max(float((g * g).mean(0).abs().max()) for g in per)
    err = 0.0
    for p, g in zip(params, per, strict=True):
        got = getattr(p, "grad_second_moment", None)
        got = torch.zeros_like(p) if got is None else got
        err = max(err, float((got - (g * g).mean(0)).abs().max()) / scale)
    norms = sum(g.pow(2).flatten(1).sum(1) for g in per)
    norm_err = float((tracker.per_example_sq_norms() - norms).abs().max() / norms.max())
    fallbacks = tracker.fallback_modules
    tracker.detach()
    return err, norm_err, fallbacks


def speed(make, batch: int, rounds: int) -> tuple[float, float, float]:
    model, losses, data = make()
    model.train()
    torch.manual_seed(3)
    inputs = data(batch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tracker = stats.track(model)

    def step(tracked: bool) -> float:
        model.zero_grad(set_to_none=True)
        t = time.perf_counter()
        if tracked:
            losses(inputs).mean().backward()
        else:
            with tracker.paused():
                loss = losses(inputs).mean()
            loss.backward()
        return time.perf_counter() - t

    step(True), step(False)  # warm-up
    plain, tracked, ratios = [], [], []
    for _ in range(rounds):
        a, b = step(False), step(True)
        plain.append(a), tracked.append(b), ratios.append(b / a)
    tracker.detach()
    return statistics.median(plain), statistics.median(tracked), statistics.median(ratios)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=8000)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    import transformers as tf  # noqa: PLC0415 - a bench-extra dependency

    tf.logging.set_verbosity_error()
    torch.manual_seed(0)
    tiny = _models(tf, 2, 16, 8, 50)
    real = _models(tf, args.layers, args.width, args.seq, args.vocab)
    print(
        f"torch {torch.__version__}, transformers {tf.__version__}, "
        f"{torch.get_num_threads()} threads; speed: {args.layers} layers x {args.width}, "
        f"sequence {args.seq}, batch {args.batch}, {args.rounds} rounds"
    )
    print(
        "| model | max err (statistics) | max err (norms) | plain step (ms) | sgdlab step (ms) "
        "| ratio | fallback modules |"
    )
    print("|---|---:|---:|---:|---:|---:|---|")
    for name in real:
        err, norm_err, fallbacks = exactness(tiny[name])
        t_plain, t_tracked, ratio = speed(real[name], args.batch, args.rounds)
        kinds = sorted({f.split(" (")[1].rstrip(")") for f in fallbacks})
        print(
            f"| {name} | {err:.1e} | {norm_err:.1e} | {t_plain * 1e3:.0f} | "
            f"{t_tracked * 1e3:.0f} | {ratio:.2f} | {', '.join(kinds) or '-'} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
