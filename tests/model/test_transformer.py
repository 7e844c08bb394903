"""The Transformer's behaviour: loss, padding, masking, KV cache, init, switches and shape errors."""

from __future__ import annotations

import math
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F

from llmtrain.errors import ConfigError
from llmtrain.model import ModelConfig, build_model
from llmtrain.model.transformer import KVCache, document_mask, document_positions

VOCAB = 100  # padded to 128


def small(arch: str = "llama", **overrides) -> ModelConfig:
    base = dict(arch=arch, n_layers=2, d_model=64, n_heads=4, max_seq_len=64, vocab_size=VOCAB)
    if arch == "llama":
        base["n_kv_heads"] = 2
    base.update(overrides)
    return ModelConfig(**base)


def model_for(arch: str = "llama", seed: int = 0, **overrides):
    torch.manual_seed(seed)
    return build_model(small(arch, **overrides)).eval()


ARCHS = ["llama", "gpt2"]


@pytest.mark.parametrize("arch", ARCHS)
def test_logits_are_padded_and_loss_is_cross_entropy_over_real_vocab(arch):
    model = model_for(arch)
    x = torch.randint(0, VOCAB, (2, 12))
    y = torch.randint(0, VOCAB, (2, 12))
    logits = model(x)
    assert logits.shape == (2, 12, 128)
    assert model.padded_vocab == 128 and model.vocab_size == VOCAB
    expected = F.cross_entropy(logits[..., :VOCAB].reshape(-1, VOCAB), y.reshape(-1))
    torch.testing.assert_close(model(x, y), expected, rtol=0, atol=1e-6)
    assert math.isfinite(expected.item()) and abs(expected.item() - math.log(VOCAB)) < 0.5


def test_padding_rows_never_affect_the_loss():
    model = model_for("llama", tie_embeddings=False)
    x, y = torch.randint(0, VOCAB, (2, 10)), torch.randint(0, VOCAB, (2, 10))
    before = model(x, y)
    with torch.no_grad():
        model.lm_head.weight[VOCAB:] = 50.0  # would dominate the softmax if it were included
    assert torch.equal(model(x, y), before)


def test_ignore_index_targets_are_left_out_of_the_mean():
    model = model_for("llama")
    x, y = torch.randint(0, VOCAB, (1, 10)), torch.randint(0, VOCAB, (1, 10))
    masked = y.clone()
    masked[0, :4] = -100
    logits = model(x)[0, 4:, :VOCAB]
    torch.testing.assert_close(model(x, masked), F.cross_entropy(logits, y[0, 4:]), rtol=0, atol=1e-6)


def test_tied_embeddings_share_one_tensor_and_untied_do_not():
    tied = model_for("gpt2", tie_embeddings=True)
    untied = model_for("gpt2", tie_embeddings=False)
    assert tied.lm_head.weight is tied.tok_emb.weight
    assert untied.lm_head.weight is not untied.tok_emb.weight
    assert untied.num_params() - tied.num_params() == VOCAB * 64


def test_init_scales_residual_projections_and_zeroes_padding_rows():
    torch.manual_seed(0)
    cfg = small("llama", n_layers=8, d_model=256, n_heads=4, n_kv_heads=4)
    model = build_model(cfg)
    resid_std = 0.02 / math.sqrt(2 * 8)
    assert abs(model.blocks[3].attn.proj.weight.std().item() - resid_std) < 0.1 * resid_std
    assert abs(model.blocks[3].mlp.down.weight.std().item() - resid_std) < 0.1 * resid_std
    assert abs(model.blocks[3].attn.qkv.weight.std().item() - 0.02) < 0.002
    assert torch.count_nonzero(model.tok_emb.weight[VOCAB:]) == 0
    assert torch.count_nonzero(model.lm_head.weight[VOCAB:]) == 0
    assert torch.equal(model.blocks[0].attn_norm.weight, torch.ones(256))


def test_llama_has_no_biases_and_gpt2_has_them():
    llama = {n for n, _ in model_for("llama").named_parameters()}
    gpt2 = {n for n, _ in model_for("gpt2").named_parameters()}
    assert not any(n.endswith(".bias") for n in llama)
    assert "blocks.0.attn.qkv.bias" in gpt2 and "blocks.0.mlp_norm.bias" in gpt2 and "pos_emb.weight" in gpt2
    assert "blocks.0.mlp.gate.weight" in llama and "pos_emb.weight" not in llama


# ---------------------------------------------------------------------------------------------
# KV cache


@pytest.mark.parametrize("arch", ARCHS)
def test_incremental_decoding_logits_equal_full_forward(arch):
    model = model_for(arch)
    x = torch.randint(0, VOCAB, (2, 20))
    full = model(x)[..., :VOCAB]
    cache = KVCache(model.cfg, 2, 20, x.device, torch.float32)
    pieces = [model.decode_step(x[:, :7], cache), model.decode_step(x[:, 7:11], cache)]  # prefill, chunk
    pieces += [model.decode_step(x[:, t : t + 1], cache) for t in range(11, 20)]  # one token at a time
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_generate_matches_argmax_of_full_forward(arch):
    model = model_for(arch)
    prompt = torch.randint(0, VOCAB, (2, 5))
    out = model.generate(prompt, max_new_tokens=8, temperature=0)
    assert out.shape == (2, 13) and torch.equal(out[:, :5], prompt)
    seq = prompt
    for _ in range(8):
        seq = torch.cat([seq, model(seq)[:, -1, :VOCAB].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, seq)


def test_generate_samples_only_real_vocab_and_pads_after_eos():
    model = model_for("llama")
    with torch.no_grad():
        model.lm_head.weight[VOCAB:] = 100.0  # padding logits huge: must still never be sampled
    gen = torch.Generator().manual_seed(0)
    out = model.generate(torch.randint(0, VOCAB, (4, 3)), 20, temperature=1.0, top_k=10, generator=gen)
    assert out.max().item() < VOCAB
    first = model.generate(torch.randint(0, VOCAB, (3, 3)), 10, temperature=0)
    eos = int(first[0, 3])  # the first greedy token of row 0 acts as EOS
    out = model.generate(first[:, :3], 10, temperature=0, eos_id=eos)
    assert out[0, 3] == eos and (out[0, 3:] == eos).all()


def test_generate_restores_training_mode_even_when_sampling_fails():
    model = model_for("llama")
    model.train()
    with pytest.raises(RuntimeError):
        model.generate(torch.zeros(1, 3), 4)  # float ids: the embedding lookup fails
    assert model.training


def test_generate_beyond_max_seq_len_is_refused():
    model = model_for("gpt2")
    with pytest.raises(ValueError, match="max_seq_len=64"):
        model.generate(torch.zeros(1, 60, dtype=torch.long), 10)


# ---------------------------------------------------------------------------------------------
# Document masking


def test_document_positions_restart_at_each_document():
    doc_ids = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2], [0, 1, 1, 1, 1, 1, 1, 1]])
    expected = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2], [0, 0, 1, 2, 3, 4, 5, 6]])
    assert torch.equal(document_positions(doc_ids), expected)
    mask = document_mask(doc_ids)[0, 0]
    assert mask[4].tolist() == [False, False, False, True, True, False, False, False]
    assert mask.diagonal().all()


@pytest.mark.parametrize("arch", ARCHS)
def test_doc_mask_makes_second_document_independent_of_the_first(arch):
    model = model_for(arch, doc_mask=True)
    doc2 = torch.randint(0, VOCAB, (1, 6))
    doc_ids = torch.tensor([[0] * 10 + [1] * 6])
    a = torch.cat([torch.randint(0, VOCAB, (1, 10)), doc2], dim=1)
    b = torch.cat([torch.randint(0, VOCAB, (1, 10)), doc2], dim=1)
    la, lb = model(a, doc_ids=doc_ids), model(b, doc_ids=doc_ids)
    torch.testing.assert_close(la[:, 10:], lb[:, 10:], rtol=0, atol=1e-5)
    assert not torch.allclose(la[:, :10], lb[:, :10])
    # positions restart: the packed document's logits equal the document alone
    torch.testing.assert_close(la[:, 10:], model(doc2), rtol=1e-5, atol=1e-5)


def test_without_doc_mask_documents_see_each_other():
    model = model_for("llama", doc_mask=False)
    doc_ids = torch.tensor([[0] * 8 + [1] * 4])
    tail = torch.randint(0, VOCAB, (1, 4))
    a = torch.cat([torch.zeros(1, 8, dtype=torch.long), tail], dim=1)
    b = torch.cat([torch.ones(1, 8, dtype=torch.long), tail], dim=1)
    assert not torch.allclose(model(a, doc_ids=doc_ids)[:, 8:], model(b, doc_ids=doc_ids)[:, 8:])


def test_doc_mask_with_a_single_document_equals_plain_causal():
    model = model_for("llama", doc_mask=True)
    x = torch.randint(0, VOCAB, (2, 16))
    one_doc = torch.zeros(2, 16, dtype=torch.int32)
    torch.testing.assert_close(model(x, doc_ids=one_doc), model(x), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Switches


def _grads(model, x, y, doc_ids=None):
    model.zero_grad()
    loss = model(x, y, doc_ids)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("arch", ARCHS)
def test_activation_checkpointing_gives_the_same_loss_and_gradients(arch):
    x, y = torch.randint(0, VOCAB, (2, 16)), torch.randint(0, VOCAB, (2, 16))
    doc_ids = torch.tensor([[0] * 9 + [1] * 7, [0] * 16])
    plain = model_for(arch, doc_mask=True).train()
    ckpt = model_for(arch, doc_mask=True, activation_checkpointing=True).train()
    loss_a, grads_a = _grads(plain, x, y, doc_ids)
    loss_b, grads_b = _grads(ckpt, x, y, doc_ids)
    assert torch.equal(loss_a, loss_b)
    for name, g in grads_a.items():
        torch.testing.assert_close(grads_b[name], g, rtol=1e-6, atol=1e-7, msg=name)


def test_dropout_is_off_by_default_and_active_in_training_when_set():
    x = torch.randint(0, VOCAB, (2, 16))
    default = model_for("gpt2").train()
    assert torch.equal(default(x), default(x))
    dropped = model_for("gpt2", dropout=0.2).train()
    assert not torch.allclose(dropped(x), dropped(x))
    dropped.eval()
    assert torch.equal(dropped(x), dropped(x))


def test_kernel_selection_matches_the_plain_model():
    x, y = torch.randint(0, VOCAB, (2, 16)), torch.randint(0, VOCAB, (2, 16))
    plain = model_for("llama").train()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a missing llmtrain.kernels falls back with one warning
        fused = model_for("llama", kernels=["rmsnorm", "swiglu", "fused_ce"]).train()
    loss_a, grads_a = _grads(plain, x, y)
    loss_b, grads_b = _grads(fused, x, y)
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-5, atol=1e-5)
    for name, g in grads_a.items():
        torch.testing.assert_close(grads_b[name], g, rtol=1e-4, atol=1e-5, msg=name)


def test_missing_kernel_package_falls_back_with_one_warning(monkeypatch):
    import llmtrain.model.transformer as transformer

    monkeypatch.setitem(sys.modules, "llmtrain.kernels", None)  # makes importing llmtrain.kernels fail
    monkeypatch.setattr(transformer, "_kernel_warning_shown", False)
    with pytest.warns(UserWarning, match="llmtrain.kernels is unavailable"):
        model = model_for("llama", kernels=["rmsnorm", "fused_ce"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model_for("llama", kernels=["swiglu"])  # the warning is shown once per process
    assert model.fused_ce is None and model.blocks[0].attn_norm.kernel is None
    plain = model_for("llama")
    x = torch.randint(0, VOCAB, (1, 8))
    assert torch.equal(model(x, x), plain(x, x))


def test_bf16_model_keeps_norms_and_rotary_accurate():
    model = model_for("llama", n_layers=4)
    x, y = torch.randint(0, VOCAB, (2, 32)), torch.randint(0, VOCAB, (2, 32))
    ref = model(x, y)
    low = model.to(torch.bfloat16)(x, y)
    assert low.dtype == torch.float32  # the loss is computed from fp32 logits
    assert abs(low.item() - ref.item()) < 2e-2


def test_doc_ids_must_match_the_inputs():
    model = model_for("llama", doc_mask=True)
    with pytest.raises(ValueError, match="doc_ids"):
        model(torch.zeros(1, 8, dtype=torch.long), doc_ids=torch.zeros(1, 9, dtype=torch.int32))


@pytest.mark.slow
def test_compile_switch_compiles_blocks_in_place_with_the_same_results():
    """Slow on CPU (about a minute of Inductor compilation); keeps checkpoint keys unchanged."""
    x = torch.randint(0, VOCAB, (2, 16))
    eager = model_for("llama", n_layers=1)
    compiled = model_for("llama", n_layers=1, compile=True)
    assert list(compiled.state_dict()) == list(eager.state_dict())
    torch.testing.assert_close(compiled(x, x), eager(x, x), rtol=1e-5, atol=1e-5)


def test_sequence_longer_than_max_seq_len_is_refused():
    model = model_for("llama")
    with pytest.raises(ValueError, match="max_seq_len=64"):
        model(torch.zeros(1, 65, dtype=torch.long))


# ---------------------------------------------------------------------------------------------
# Shape errors at build time name the key


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (dict(d_model=100, n_heads=8), "model.n_heads"),
        (dict(n_heads=4, n_kv_heads=3), "model.n_kv_heads"),
        (dict(n_heads=4, n_kv_heads=0), "model.n_kv_heads"),
        (dict(d_model=60, n_heads=4, n_kv_heads=4), "model.n_heads"),  # head dim 15: odd for rotary
        (dict(vocab_size=None), "model.vocab_size"),
        (dict(kernels=["flash"]), "model.kernels"),
        (dict(arch="mamba"), "model.arch"),
        (dict(n_layers=0), "model.n_layers"),
        (dict(dropout=1.0), "model.dropout"),
        (dict(ffn_hidden=0), "model.ffn_hidden"),
    ],
)
def test_bad_shapes_fail_at_build_time_naming_the_key(overrides, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")) as err:
        overrides = dict(overrides)
        build_model(small(overrides.pop("arch", "llama"), **overrides))
    assert "\n" not in str(err.value)


def test_odd_head_dim_is_fine_for_gpt2_which_has_no_rotary():
    model = model_for("gpt2", d_model=60, n_heads=4)
    assert model(torch.zeros(1, 4, dtype=torch.long)).shape == (1, 4, 128)
