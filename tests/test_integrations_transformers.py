"""megaclass.integrations.transformers.patch against the unpatched transformers model (tiny random configs).

References: the unpatched model's own loss (transformers' ForCausalLMLoss, which upcasts the logits to
fp32, so it agrees to fp32 rounding), and F.cross_entropy in float64 on the unpatched model's float64
logits (tight: both sides float64, only summation orders differ).
"""
from __future__ import annotations

import copy
import inspect

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

from megaclass.integrations.transformers import patch  # noqa: E402

VOCAB, BATCH, SEQ = 211, 2, 12
_LAYERS = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2)


def _build(family):
    t = transformers
    if family == "llama":
        return t.LlamaForCausalLM(t.LlamaConfig(**_LAYERS))
    if family == "qwen2":
        return t.Qwen2ForCausalLM(t.Qwen2Config(**_LAYERS))
    if family == "mistral":
        return t.MistralForCausalLM(t.MistralConfig(**_LAYERS))
    if family == "gemma2":
        return t.Gemma2ForCausalLM(t.Gemma2Config(**_LAYERS, head_dim=8, final_logit_softcapping=None))
    if family == "gemma2-softcap":  # a small cap, so that it bends the random model's logits
        return t.Gemma2ForCausalLM(t.Gemma2Config(**_LAYERS, head_dim=8, final_logit_softcapping=0.5))
    if family == "gpt2":  # lm_head tied to the token embedding wte
        return t.GPT2LMHeadModel(t.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                                    resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,  # deterministic
                                                    bos_token_id=0, eos_token_id=0))
    if family == "cohere":  # logits * logit_scale, tied embeddings
        return t.CohereForCausalLM(t.CohereConfig(**_LAYERS, logit_scale=4.0))
    if family == "granite":  # logits / logits_scaling
        return t.GraniteForCausalLM(t.GraniteConfig(**_LAYERS, logits_scaling=0.25))
    raise ValueError(family)


FAMILIES = ["llama", "qwen2", "mistral", "gemma2", "gemma2-softcap", "gpt2", "cohere", "granite"]


def _pair(family, dtype=torch.float64, seed=0):
    """(patched, unpatched) copies of one random model."""
    torch.manual_seed(seed)
    ref = _build(family).to(dtype)
    return patch(copy.deepcopy(ref)), ref


def _batch(seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)
    labels = ids.clone()
    labels[0, 2:5] = -100  # ignored tokens inside a sequence
    labels[1, -1] = -100
    return ids, labels


def _reference_loss(model, ids, labels, weights=None, label_smoothing=0.0, z_loss=0.0):
    """Σ w·(CE + z_loss·lse²) / #non-ignored over the shifted tokens, F.cross_entropy on the unpatched model's
    own logits."""
    logits = model(ids).logits[:, :-1].reshape(-1, model.config.vocab_size)
    target = labels[:, 1:].reshape(-1)
    ce = F.cross_entropy(logits, target, ignore_index=-100, reduction="none", label_smoothing=label_smoothing)
    ce = ce + z_loss * torch.where(target != -100, torch.logsumexp(logits, -1) ** 2, 0)
    if weights is not None:
        ce = ce * weights[:, 1:].reshape(-1)
    return ce.sum() / (target != -100).sum()


def _grads(model):
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def _assert_grads_close(got, expected, rtol, atol):
    assert got.keys() == expected.keys() and got
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


# float64 on both sides; the orders of summation differ (the op adds over chunks and rows its own way)
TIGHT = dict(rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("family", FAMILIES)
def test_loss_and_every_gradient_match_the_unpatched_model(family):
    patched, ref = _pair(family)
    ids, labels = _batch()
    out = patched(ids, labels=labels)
    assert out.logits is None
    out.loss.backward()
    got = _grads(patched)

    expected = _reference_loss(ref, ids, labels)
    expected.backward()
    torch.testing.assert_close(out.loss, expected, **TIGHT)
    _assert_grads_close(got, _grads(ref), **TIGHT)

    # transformers' own loss computes in fp32 (it upcasts the logits): equal to fp32 rounding
    ref.zero_grad(set_to_none=True)
    own = ref(ids, labels=labels)
    own.loss.backward()
    torch.testing.assert_close(out.loss.float(), own.loss, rtol=1e-5, atol=1e-6)
    scale = max(g.abs().max() for g in got.values())
    _assert_grads_close(got, _grads(ref), rtol=1e-4, atol=1e-5 * float(scale))


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_num_items_in_batch_divides_the_sum(family):
    patched, ref = _pair(family)
    ids, labels = _batch()
    num_items = torch.tensor(37)  # as the Trainer passes it under gradient accumulation (not this batch's count)
    out = patched(ids, labels=labels, num_items_in_batch=num_items)
    out.loss.backward()
    own = ref(ids, labels=labels, num_items_in_batch=num_items)
    own.loss.backward()
    torch.testing.assert_close(out.loss.float(), own.loss, rtol=1e-5, atol=1e-6)
    _assert_grads_close(_grads(patched), _grads(ref), rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("family", ["llama", "gemma2", "gpt2"])
def test_loss_weights_against_a_hand_computation(family):
    patched, ref = _pair(family)
    ids, labels = _batch()
    weights = torch.rand(BATCH, SEQ, generator=torch.Generator().manual_seed(2), dtype=torch.float64) * 3
    weights[1, 4] = 0.0
    out = patched(ids, labels=labels, loss_weights=weights)
    out.loss.backward()
    expected = _reference_loss(ref, ids, labels, weights)
    expected.backward()
    torch.testing.assert_close(out.loss, expected, **TIGHT)
    _assert_grads_close(_grads(patched), _grads(ref), **TIGHT)


def test_loss_options_reach_the_op():
    patched, ref = _pair("llama")
    ids, labels = _batch()
    patch(patched, label_smoothing=0.1, z_loss=1e-2, chunk_size=5)  # patching again replaces the options
    assert len(patched.get_output_embeddings()._forward_pre_hooks) == 1
    out = patched(ids, labels=labels)
    out.loss.backward()
    expected = _reference_loss(ref, ids, labels, label_smoothing=0.1, z_loss=1e-2)
    expected.backward()
    torch.testing.assert_close(out.loss, expected, **TIGHT)
    _assert_grads_close(_grads(patched), _grads(ref), **TIGHT)


def test_patching_twice_is_harmless():
    patched, ref = _pair("gpt2")
    ids, labels = _batch()
    assert patch(patched) is patched
    assert len(patched.get_output_embeddings()._forward_pre_hooks) == 1
    torch.testing.assert_close(patched(ids, labels=labels).loss, _reference_loss(ref, ids, labels), **TIGHT)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_without_labels_the_model_is_unchanged(family):
    patched, ref = _pair(family, torch.float32)
    ids, _ = _batch()
    out, own = patched(ids), ref(ids)
    assert out.loss is None
    assert torch.equal(out.logits, own.logits)
    assert torch.equal(patched.generate(ids[:, :4], max_new_tokens=3, do_sample=False),
                       ref.generate(ids[:, :4], max_new_tokens=3, do_sample=False))


def test_shift_labels_and_return_dict():
    patched, ref = _pair("llama")
    ids, labels = _batch()
    expected = _reference_loss(ref, ids, labels)
    shifted = F.pad(labels, (0, 1), value=-100)[:, 1:]
    torch.testing.assert_close(patched(ids, labels=labels, shift_labels=shifted).loss, expected, **TIGHT)
    loss, *rest = patched(ids, labels=labels, return_dict=False)
    torch.testing.assert_close(loss, expected, **TIGHT)
    assert all(not (isinstance(t, torch.Tensor) and t.shape[-1] == VOCAB) for t in rest)  # no logits


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_tuple_output_keeps_the_unpatched_positions(family):
    """return_dict=False with labels: (loss, logits, cache, …) as the unpatched model returns it, with None
    for the logits the fused loss never made, so out[2] is still the cache (it was out[1])."""
    patched, ref = _pair(family)
    ids, labels = _batch()
    mine, own = patched(ids, labels=labels, return_dict=False), ref(ids, labels=labels, return_dict=False)
    assert len(mine) == len(own) >= 3 and own[1].shape[-1] == VOCAB and mine[1] is None
    torch.testing.assert_close(mine[0], _reference_loss(ref, ids, labels), **TIGHT)  # own[0] is fp32 (upcast)
    for got, want in zip(mine[2:], own[2:]):
        assert type(got) is type(want)
        if family == "llama":  # the cache: the same keys and values, layer by layer
            for layer_got, layer_want in zip(got.layers, want.layers):
                torch.testing.assert_close(layer_got.keys, layer_want.keys, **TIGHT)
                torch.testing.assert_close(layer_got.values, layer_want.values, **TIGHT)


def test_twenty_adamw_steps_track_the_unpatched_run():
    patched, ref = _pair("llama", torch.float32)
    losses = {}
    for name, model in (("patched", patched), ("unpatched", ref)):
        torch.manual_seed(3)
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        losses[name] = []
        for step in range(20):
            ids, labels = _batch(seed=10 + step % 4)
            loss = model(ids, labels=labels).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses[name].append(loss.item())
    a, b = torch.tensor(losses["patched"]), torch.tensor(losses["unpatched"])
    # fp32 rounding differences, grown over 20 AdamW steps; a wrong gradient would be off by far more
    torch.testing.assert_close(a, b, rtol=2e-4, atol=0)
    assert a[-4:].mean() < a[:4].mean() - 0.5  # it learns


def test_the_trainer_sees_loss_weights_in_the_signature():
    patched, _ = _pair("llama")
    params = inspect.signature(patched.forward).parameters
    assert "loss_weights" in params and "labels" in params and "input_ids" in params


def test_bad_input_names_the_argument():
    patched, _ = _pair("llama")
    ids, labels = _batch()
    bad = labels.clone()
    bad[1, 7] = VOCAB
    with pytest.raises(ValueError, match=rf"labels\[1, 7\] = {VOCAB} is outside the vocabulary \[0, {VOCAB}\)"):
        patched(ids, labels=bad)
    with pytest.raises(ValueError, match=r"loss_weights must be a tensor of labels' shape \[2, 12\].*got \[2, 11\]"):
        patched(ids, labels=labels, loss_weights=torch.ones(BATCH, SEQ - 1))
    weights = torch.ones(BATCH, SEQ)
    weights[0, 9] = -1.0
    with pytest.raises(ValueError, match=r"loss_weights\[0, 9\] = -1.0 must be finite and non-negative"):
        patched(ids, labels=labels, loss_weights=weights)
    with pytest.raises(ValueError, match="loss_weights were given without labels"):
        patched(ids, loss_weights=weights)
    with pytest.raises(TypeError, match=r"unknown loss option\(s\) \['label_smothing'\]"):
        patch(patched, label_smothing=0.1)
    with pytest.raises(TypeError, match="reduction"):
        patch(patched, reduction="sum")


def test_logits_changed_after_the_output_layer_are_refused():
    patched, _ = _pair("llama")
    # a family doing something to its logits that the config does not say (here: doubling them)
    patched.get_output_embeddings().register_forward_hook(lambda module, args, out: out * 2)
    ids, labels = _batch()
    with pytest.raises(RuntimeError, match="changes its logits after the output layer"):
        patched(ids, labels=labels)


def test_encoder_decoder_models_are_refused():
    t = transformers
    model = t.T5ForConditionalGeneration(t.T5Config(vocab_size=VOCAB, d_model=16, d_ff=32, num_layers=1, num_heads=2,
                                                     d_kv=8))
    with pytest.raises(TypeError, match="encoder-decoder"):
        patch(model)
