"""Hugging Face models as users compile them: GPT-2 (``Conv1D``: addmm with (in, out) weights),
Llama (grouped-query attention, rotary embeddings, a decorated ``forward(*args, **kwargs)``) and
BERT (padding mask); and their attention made block-sparse. Tiny configs built in memory: nothing is
downloaded."""

import itertools

import pytest
import torch

import sparse_compiler
from sparse_compiler import state
from sparse_compiler.layouts import get_layout

transformers = pytest.importorskip("transformers")

OPTIONS = {"density": 0.25, "block_size": 16, "rescale_init": False}
TOKENS = torch.randint(0, 1000, (2, 64), generator=torch.Generator().manual_seed(0))


def _gpt2(positions=64):
    config = transformers.GPT2Config(vocab_size=1000, n_positions=positions, n_embd=64, n_layer=2, n_head=4)
    return transformers.GPT2LMHeadModel(config), {}


def _llama(positions=64):
    config = transformers.LlamaConfig(
        vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=positions,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(config), {}


def _mistral(positions=64, window=120):
    """Llama-like, with a sliding-window cache (which keeps its last ``window - 1`` keys)."""
    config = transformers.MistralConfig(
        vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=positions, sliding_window=window,
    )  # fmt: skip
    return transformers.MistralForCausalLM(config), {}


def _bert():
    config = transformers.BertConfig(
        vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=64,
    )  # fmt: skip
    mask = torch.ones_like(TOKENS)
    mask[1, 48:] = 0
    return transformers.BertForMaskedLM(config), {"attention_mask": mask}


# per model: the weights that must become sparse (per layer), and those that must stay dense and why
EXPECTED = {
    "gpt2": (_gpt2, ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"], {"lm_head": "tied"}),
    "llama": (_llama, ["self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"],
              {"self_attn.k_proj": "no flat butterfly", "lm_head": ""}),  # k/v: 32x64, too small
    "bert": (_bert, ["attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
                     "intermediate.dense", "output.dense"], {"cls.predictions.decoder": "tied"}),
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_model_compiles_sparse_and_equals_its_eager_sparse_self(name):
    make, sparse_names, dense_names = EXPECTED[name]
    torch.manual_seed(0)
    model, extra = make()
    model.eval()  # no dropout; gradients stay on
    inputs = {"input_ids": TOKENS, "labels": TOKENS, **extra}
    loss = torch.compile(model, backend="sparsify", options=dict(OPTIONS))(**inputs).loss
    report = sparse_compiler.last_report()
    rows = [r for r in report.rows if r["kind"] != "attention"]
    sparse = {r["module"] for r in rows if r["decision"] == "sparse"}
    for layer in range(2):
        for suffix in sparse_names:
            assert any(m.endswith(f"{layer}.{suffix}") for m in sparse), f"{suffix} of layer {layer} is not sparse"
    for suffix, why in dense_names.items():
        dense = [r for r in rows if r["module"].endswith(suffix) and r["decision"] == "dense"]
        assert dense and all(why in r["reason"] for r in dense), (suffix, [r["reason"] for r in dense])
    assert not any(r["module"].startswith("0.") for r in rows)  # named from the model, not from args[0]
    # the eager model now is the sparse model the compiled one computes
    torch.testing.assert_close(loss, model(**inputs).loss, rtol=1e-5, atol=1e-5)
    # a training step keeps the dropped blocks at zero
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    loss.backward()
    opt.step()
    checked = 0
    for p in model.parameters():
        record = state.layout_of(p)
        if record is None:
            continue
        key, stored = record
        keep = get_layout(key).element_mask()
        assert torch.count_nonzero((p if stored == "out_in" else p.t())[~keep]) == 0
        checked += 1
    assert checked == len({r["parameter"] for r in rows if r["decision"] == "sparse"})


@pytest.mark.parametrize("name", ["bert", "gpt2", "llama"])
def test_model_attention_becomes_block_sparse_as_its_masked_reference(name, monkeypatch):
    """Attention as Hugging Face writes it (its causal mask, rotary embeddings, Llama's grouped
    query heads) is rewritten, and the compiled model equals the eager one whose attention keeps
    only the layout's pairs."""
    from sparse_compiler.layouts.attention import attention_element_mask, get_attention_layout

    torch.manual_seed(0)
    model, extra = EXPECTED[name][0]()
    model.eval()
    ids = TOKENS  # 64 tokens: 4 blocks of 16
    options = {"targets": ("attention",), "attention_block_size": 16, "attention_min_seq_len": 32}
    with torch.no_grad():
        got = torch.compile(model, backend="sparsify", options=options)(input_ids=ids, **extra).logits
    decisions = [r for r in sparse_compiler.last_report().rows if r["kind"] == "attention"]
    assert len(decisions) == 2 and all(r["decision"] == "sparse" for r in decisions), decisions
    (key,) = {r["layout"] for r in decisions}
    layout = get_attention_layout(key)
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def masked_sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        allowed = attention_element_mask(layout, q.shape[-2], k.shape[-2], is_causal, device=q.device)
        if attn_mask is not None:
            allowed = allowed & attn_mask if attn_mask.dtype == torch.bool else allowed & (attn_mask == 0)
        kwargs = {"enable_gqa": True} if enable_gqa else {}
        return sdpa(q, k, v, attn_mask=allowed, scale=scale, **kwargs)

    with torch.no_grad():
        dense = model(input_ids=ids, **extra).logits
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", masked_sdpa)
    with torch.no_grad():
        want = model(input_ids=ids, **extra).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert (got - dense).abs().max() > 1e-3  # the layout drops pairs the dense model attends to


def test_gpt2_with_a_fixed_pattern_gives_a_sequence_the_same_logits_alone_and_right_padded():
    """With ``attention_seq_len`` a sequence's logits do not depend on the batch it is padded into
    (as with dense causal attention). The first call, without a mask, also leaves FlexAttention's
    own compilation cache in a state the second call, with one, must survive."""
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=1000, n_positions=256, n_embd=64, n_layer=2, n_head=4)
    model = transformers.GPT2LMHeadModel(config).eval()
    ids = torch.randint(0, 1000, (2, 192), generator=torch.Generator().manual_seed(1))
    padding = torch.ones_like(ids)
    padding[0, 128:] = 0
    options = {"targets": ("attention",), "attention_block_size": 16, "attention_min_seq_len": 32,
               "attention_density": 0.2, "attention_seq_len": 192}
    compiled = torch.compile(model, backend="sparsify", options=options)
    with torch.no_grad():
        alone = compiled(input_ids=ids[:1, :128]).logits
        rows = [r for r in sparse_compiler.last_report().rows if r["kind"] == "attention"]
        batch = compiled(input_ids=ids, attention_mask=padding).logits
        rows += [r for r in sparse_compiler.last_report().rows if r["kind"] == "attention"]
        dense = model(input_ids=ids[:1, :128]).logits
    assert len(rows) == 4 and all(r["decision"] == "sparse" for r in rows), [r["reason"] for r in rows]
    # the padded batch's mask, built in the graph, is seen to be causal: the same (causal) pattern
    assert len({r["layout"].replace("lq=192,lk=192", "lq=128,lk=128") for r in rows}) == 1
    assert all(",causal=1," in r["layout"] for r in rows)
    torch.testing.assert_close(alone[0], batch[0, :128], rtol=1e-4, atol=1e-4)
    assert (alone - dense).abs().max() > 1e-3  # the pattern drops pairs dense attention keeps


@pytest.mark.parametrize("name,cache", [("gpt2", "dynamic"), ("gpt2", "static"), ("llama", "dynamic"),
                                        ("llama", "static"), ("mistral", "dynamic")])  # fmt: skip
def test_cached_decoding_with_a_fixed_pattern_follows_the_uncached_forward(name, cache, monkeypatch):
    """Greedy decoding with Hugging Face's key/value caches (GPT-2; Llama: rotary embeddings and
    grouped-query heads; Mistral: a sliding-window cache, here within its window), growing
    (``DynamicCache``) or preallocated and written in place (``StaticCache``): each step's queries
    take their rows of the fixed pattern, so every step's logits equal the eager model's on the whole
    sequence with the fixed layout applied."""
    from sparse_compiler.layouts.attention import attention_element_mask, attention_layout_at, get_attention_layout

    torch.manual_seed(0)
    model = {"gpt2": _gpt2, "llama": _llama, "mistral": _mistral}[name](positions=128)[0].eval()
    # the kernels from 101 keys on: the 100-token prompt through SDPA, every cache step reading the kept blocks
    options = {"targets": ("attention",), "attention_block_size": 16, "attention_density": 0.2,
               "attention_seq_len": 128, "attention_min_seq_len": 101}
    compiled = torch.compile(model, backend="sparsify", options=options)
    ids = torch.randint(0, 1000, (1, 100), generator=torch.Generator().manual_seed(2))
    steps, rows = [], []
    past = transformers.StaticCache(config=model.config, max_cache_len=128) if cache == "static" else None
    with torch.no_grad():
        out = compiled(input_ids=ids, past_key_values=past, use_cache=True)
        for _ in range(8):
            ids = torch.cat([ids, out.logits[:, -1:].argmax(-1)], 1)
            out = compiled(input_ids=ids[:, -1:], past_key_values=out.past_key_values, use_cache=True)
            steps.append(out.logits[:, -1])
            rows += [r for r in sparse_compiler.last_report().rows if r["kind"] == "attention"]
    step = "static key/value cache step" if cache == "static" else "key/value cache step"
    assert rows and all(r["decision"] == "sparse" and step in r["reason"] for r in rows), [r["reason"] for r in rows]
    assert {r["lowering"] for r in rows} == {"kept_blocks"}  # reads only the kept key/value blocks
    n = ids.shape[1]
    layout = attention_layout_at(get_attention_layout(rows[0]["layout"]), n, n)
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def masked_sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        allowed = attention_element_mask(layout, q.shape[-2], k.shape[-2], True, device=q.device)
        kwargs = {"enable_gqa": True} if enable_gqa else {}
        return sdpa(q, k, v, attn_mask=allowed, scale=scale, **kwargs)

    with torch.no_grad():
        dense = model(input_ids=ids).logits[0, -8:]
        monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", masked_sdpa)
        want = model(input_ids=ids).logits[0, -8:]
    torch.testing.assert_close(torch.cat(steps), want, rtol=1e-4, atol=1e-4)
    assert (want - dense).abs().max() > 1e-3  # the pattern drops pairs dense attention keeps


def test_a_sliding_window_cache_keeps_cache_steps_dense_with_the_reason():
    """Mistral's sliding-window cache keeps only its last keys, so its first key is not position 0
    once the window is full: a fixed pattern cannot place the queries, and the report says so."""
    model = _mistral(positions=128, window=32)[0].eval()
    options = {"targets": ("attention",), "attention_block_size": 16, "attention_density": 0.2,
               "attention_seq_len": 128, "attention_min_seq_len": 17}  # fmt: skip
    compiled = torch.compile(model, backend="sparsify", options=options)
    ids = torch.randint(0, 1000, (1, 40), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        out = compiled(input_ids=ids, use_cache=True)
        nxt = out.logits[:, -1:].argmax(-1)
        compiled(input_ids=nxt, past_key_values=out.past_key_values, use_cache=True)
    rows = [r for r in sparse_compiler.last_report().rows if r["kind"] == "attention"]
    assert rows and all(r["decision"] == "dense" and "sliding window" in r["reason"] for r in rows), rows


def test_generate_with_a_compiled_forward_follows_the_fixed_pattern_with_either_cache(monkeypatch):
    """``model.generate`` as users call it, with the forward compiled: a static and a dynamic cache,
    with the prompt at once or in chunks of 40 (``prefill_chunk_size``: the later chunks, more than
    a block of queries over the cache, are read block row by block row), give the greedy tokens and
    the logits of the eager model run on the whole sequence at each step with the fixed layout
    applied."""
    from sparse_compiler.kernels import cache_step
    from sparse_compiler.layouts.attention import attention_element_mask, attention_layout_at, get_attention_layout

    pieces = []
    by_rows = cache_step.cache_step_pieces
    monkeypatch.setattr(cache_step, "cache_step_pieces", lambda *a: pieces.append(by_rows(*a)) or pieces[-1])

    torch.manual_seed(0)
    model = _llama(positions=256)[0].eval()
    ids = torch.randint(0, 1000, (1, 100), generator=torch.Generator().manual_seed(3))
    eager_forward = model.forward
    options = {"targets": ("attention",), "attention_block_size": 16, "attention_density": 0.3,
               "attention_seq_len": 256, "attention_min_seq_len": 64}  # fmt: skip
    model.forward = torch.compile(model.forward, backend="sparsify", options=options)
    generated, rows = {}, []
    # four ways to generate with one compiled forward: 10 graphs, as plain Inductor compiles (8 are allowed)
    with torch._dynamo.config.patch(recompile_limit=16):
        for cache, chunk in itertools.product(("static", "dynamic"), (None, 40)):
            generated[cache, chunk] = model.generate(ids, max_new_tokens=6, do_sample=False, output_logits=True,
                                                     cache_implementation=cache, prefill_chunk_size=chunk,
                                                     return_dict_in_generate=True)  # fmt: skip
            rows = rows or [r for r in sparse_compiler.last_report().rows if r["kind"] == "attention"]  # (a decode step)
    # by their block rows: the chunks of 40 queries over 80 and over 100 keys, and with the static
    # cache the first one too (its queries at positions 0..39 of 256 slots)
    assert sorted({tuple(p) for p in pieces if len(p) > 1}) == [
        ((0, 16), (16, 32), (32, 40)), ((40, 48), (48, 64), (64, 80)), ((80, 96), (96, 100))]
    assert rows and all(r["lowering"] == "kept_blocks" for r in rows)
    model.forward = eager_forward
    sdpa, seq, want, dense = torch.nn.functional.scaled_dot_product_attention, ids, [], []
    for _ in range(6):
        layout = attention_layout_at(get_attention_layout(rows[0]["layout"]), seq.shape[1], seq.shape[1])

        def masked_sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False,
                        layout=layout):  # fmt: skip
            allowed = attention_element_mask(layout, q.shape[-2], k.shape[-2], True)
            return sdpa(q, k, v, attn_mask=allowed, scale=scale, **({"enable_gqa": True} if enable_gqa else {}))

        with torch.no_grad(), pytest.MonkeyPatch.context() as mp:
            dense.append(model(input_ids=seq).logits[:, -1])
            mp.setattr(torch.nn.functional, "scaled_dot_product_attention", masked_sdpa)
            want.append(model(input_ids=seq).logits[:, -1])
        seq = torch.cat([seq, want[-1].argmax(-1, keepdim=True)], 1)
    for key, out in generated.items():
        assert torch.equal(out.sequences, seq), key
        torch.testing.assert_close(torch.cat(out.logits), torch.cat(want), rtol=1e-4, atol=1e-4)
    assert (torch.cat(want) - torch.cat(dense)).abs().max() > 1e-3  # the pattern drops pairs dense attention keeps
