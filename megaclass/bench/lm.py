"""`megaclass bench lm`: one training step (forward + backward) of a small random transformers causal LM with
a large vocabulary, its loss computed four ways:

  unpatched  transformers' own loss (ForCausalLMLoss on the [B, T, V] logits)
  megaclass  megaclass.integrations.transformers.patch (the fused op on the output layer's input)
  cce        cut-cross-entropy's own patch, cut_cross_entropy.transformers.cce_patch (impl torch_compile
             on CPU, cce on CUDA), where the installed cut-cross-entropy has it
  cce-op     megaclass's patch with cut_cross_entropy.linear_cross_entropy as the loss (same impl): the
             two ops side by side inside the same model, for a cut-cross-entropy without cce_patch
  liger      Liger-Kernel's patch of the model (CUDA only, when installed)

Each variant runs in its own process on the same model (seed 0) and tokens: the median of --repeats
timed steps after one warm-up, and the peak memory the timed steps add beyond the model, its inputs
and the previous step's state (`megaclass.memory.MemoryProbe`; the gradients are set to None before each step).
The loss is printed for each: the variants must agree on it. The workers inherit the environment
(THP_MEM_ALLOC_ENABLE unset unless the caller sets it), as in `megaclass bench ce`.
"""
from __future__ import annotations

import argparse
import json
import logging
import statistics
import time

import torch

from megaclass.argtypes import output_file, positive_int
from megaclass.bench.ranks import RankFailed, launch, machine
from megaclass.io import atomic_write_text
from megaclass.memory import MemoryProbe

log = logging.getLogger(__name__)

VARIANTS = ("unpatched", "megaclass", "cce", "cce-op", "liger")
FAMILIES = ("llama", "qwen2", "mistral", "gemma2", "gpt2")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def register(subparsers) -> None:
    p = subparsers.add_parser("lm", help="a language model's training step: transformers' loss, megaclass, "
                                         "cut-cross-entropy, Liger-Kernel",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--family", choices=FAMILIES, default="llama", help="model family (default llama)")
    p.add_argument("--vocab", type=positive_int, default=128_256, help="vocabulary size (default 128256, Llama 3's)")
    p.add_argument("--hidden", type=positive_int, default=512, help="hidden size (default 512)")
    p.add_argument("--layers", type=positive_int, default=2, help="decoder layers (default 2)")
    p.add_argument("--seq", type=positive_int, default=1024, help="tokens per sequence (default 1024)")
    p.add_argument("--batch", type=positive_int, default=2, help="sequences per step (default 2)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="model dtype (default fp32)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="device (default cpu)")
    p.add_argument("--repeats", type=positive_int, default=3, help="timed steps per variant; the median is reported")
    p.add_argument("--threads", type=positive_int, default=torch.get_num_threads(),
                   help=f"CPU threads per variant (default {torch.get_num_threads()})")
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of: " + ", ".join(VARIANTS))
    p.add_argument("--json", type=output_file, default=None, metavar="OUT", help="also write the results as JSON to OUT")
    p.set_defaults(func=run)


def available(name: str, device: str) -> str | None:
    """None if the variant can run here, else why not."""
    if name in ("cce", "cce-op"):
        try:
            import cut_cross_entropy
        except ImportError:
            return "cut_cross_entropy is not installed"
        if name == "cce":
            try:
                from cut_cross_entropy.transformers import cce_patch  # noqa: F401
            except ImportError:
                version = getattr(cut_cross_entropy, "__version__", None) or _dist_version("cut-cross-entropy")
                return f"cut-cross-entropy {version} has no transformers patch (cce_patch)"
    if name == "liger":
        if device != "cuda":
            return "Liger-Kernel runs on CUDA only"
        try:
            import liger_kernel  # noqa: F401
        except ImportError:
            return "liger_kernel is not installed"
    return None


def _dist_version(name):
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version(name)
    except PackageNotFoundError:
        return "?"


def build_model(family: str, vocab: int, hidden: int, layers: int, seq: int):
    """A random model of the family (no download), dropout off so that every variant sees the same loss."""
    import transformers as t
    heads = max(1, hidden // 64)
    common = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
                  num_attention_heads=heads, num_key_value_heads=max(1, heads // 2) if heads % 2 == 0 else heads,
                  max_position_embeddings=max(seq, 128), bos_token_id=0, eos_token_id=0, pad_token_id=0)
    if family == "llama":
        return t.LlamaForCausalLM(t.LlamaConfig(**common))
    if family == "qwen2":
        return t.Qwen2ForCausalLM(t.Qwen2Config(**common))
    if family == "mistral":
        return t.MistralForCausalLM(t.MistralConfig(**common, sliding_window=None))
    if family == "gemma2":  # soft-capped logits (final_logit_softcapping 30, the default)
        return t.Gemma2ForCausalLM(t.Gemma2Config(**common, head_dim=hidden // heads))
    if family == "gpt2":  # lm_head tied to the token embedding
        return t.GPT2LMHeadModel(t.GPT2Config(vocab_size=vocab, n_embd=hidden, n_layer=layers, n_head=heads,
                                              n_positions=max(seq, 128), resid_pdrop=0.0, embd_pdrop=0.0,
                                              attn_pdrop=0.0, bos_token_id=0, eos_token_id=0))
    raise ValueError(f"unknown family {family!r}")


def _cce_impl(device):
    return "cce" if device.type == "cuda" else "torch_compile"


def _apply(name, model, device):
    """The variant's loss on the model (in place or returned)."""
    if name == "unpatched":
        return model
    from megaclass.integrations import transformers as integration
    if name == "megaclass":
        return integration.patch(model)
    if name == "cce":
        from cut_cross_entropy.transformers import cce_patch
        return cce_patch(model, impl=_cce_impl(device))
    if name == "cce-op":
        from cut_cross_entropy import linear_cross_entropy as cce

        def loss(hidden, weight, target, sample_weight=None, *, bias=None, ignore_index=-100, reduction="mean",
                 softcap=None):
            if sample_weight is not None or bias is not None:
                raise ValueError("cce-op: cut_cross_entropy.linear_cross_entropy has no per-token weights or bias")
            return cce(hidden, weight, target, ignore_index=ignore_index, softcap=softcap, reduction=reduction,
                       impl=_cce_impl(device))
        integration.linear_cross_entropy = loss  # this worker process only
        return integration.patch(model)
    if name == "liger":
        from liger_kernel.transformers import _apply_liger_kernel_to_instance
        _apply_liger_kernel_to_instance(model=model)
        return model
    raise ValueError(f"unknown variant {name!r}")


def worker(spec) -> dict:
    torch.set_num_threads(spec["threads"])
    device, dtype = torch.device(spec["device"]), DTYPES[spec["dtype"]]
    torch.manual_seed(0)
    model = build_model(spec["family"], spec["vocab"], spec["hidden"], spec["layers"], spec["seq"])
    model = _apply(spec["variant"], model.to(device=device, dtype=dtype), device)
    gen = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, spec["vocab"], (spec["batch"], spec["seq"]), generator=gen).to(device)

    def step():
        model.zero_grad(set_to_none=True)
        loss = model(input_ids=input_ids, labels=input_ids).loss
        loss.backward()
        return loss

    cuda = device.type == "cuda"
    step()  # warm-up: allocator, thread pools, compilation
    model.zero_grad(set_to_none=True)
    memory = MemoryProbe(device)
    times = []
    for _ in range(spec["repeats"]):
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        loss = step()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return {"median_s": statistics.median(times), "min_s": min(times), "peak_bytes": memory.added(),
            "loss": float(loss.detach().float())}


def run(args) -> int:
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("megaclass bench lm: --device cuda but no CUDA GPU is visible")
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"megaclass bench lm: unknown variant(s) {unknown}; choose from {list(VARIANTS)}")
    spec = {key: getattr(args, key) for key in ("family", "vocab", "hidden", "layers", "seq", "batch", "dtype",
                                                 "device", "repeats", "threads")}
    env = {"OMP_NUM_THREADS": str(args.threads)}
    machine_info = machine(args.device)  # before the benchmark's own load
    results = []
    for name in names:
        row = {"variant": name}
        why = available(name, args.device)
        if why is not None:
            row["skipped"] = why
        else:
            log.info("running %s ...", name)
            try:
                row.update(launch("megaclass.bench.lm:worker", dict(spec, variant=name), 1, env)[0])
            except RankFailed as exc:
                row["error"] = str(exc)
        results.append(row)
    report = {"config": spec, "machine": machine_info, "results": results}
    print(format_table(report))
    if args.json:
        atomic_write_text(args.json, json.dumps(report, indent=2))
    return 0


def format_table(report) -> str:
    cfg, m = report["config"], report["machine"]
    base = next((r for r in report["results"] if r["variant"] == "unpatched" and "median_s" in r), None)
    lines = [f"{cfg['family']}: vocab {cfg['vocab']}, hidden {cfg['hidden']}, {cfg['layers']} layers, "
             f"{cfg['batch']} × {cfg['seq']} tokens, {cfg['dtype']} {cfg['device']}, {cfg['threads']} threads, "
             f"median of {cfg['repeats']} steps ({m.get('gpu', m['cpu'])}; torch {m['torch']})",
             "| variant | step ms | × unpatched | peak MB | × unpatched | loss |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in report["results"]:
        if "median_s" not in r:
            why = f"skipped: {r['skipped']}" if "skipped" in r else f"failed: {r.get('error', '?')}"
            lines.append(f"| {r['variant']} | {why} | | | | |")
            continue
        time_ratio = f"{r['median_s'] / base['median_s']:.2f}" if base else "-"
        mem_ratio = f"{r['peak_bytes'] / base['peak_bytes']:.2f}" if base and base["peak_bytes"] else "-"
        lines.append(f"| {r['variant']} | {r['median_s'] * 1e3:.0f} | {time_ratio} | {r['peak_bytes'] / 2**20:.0f} | "
                     f"{mem_ratio} | {r['loss']:.6f} |")
    return "\n".join(lines)

