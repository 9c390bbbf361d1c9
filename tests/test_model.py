"""Model: causality with every option, recurrence without new weights, XSA, seams, attention backends,
compute dtype."""
import sys
import types
import warnings

import pytest
import torch

import train_gpt as tg
from train_gpt import config_from_env

FULL_OPTIONS = dict(PRESET="r1081",  # every frontier switch off: the tests below turn each on against it
                    VOCAB_SIZE="97", NUM_LAYERS="5", MODEL_DIM="64", NUM_HEADS="4", NUM_KV_HEADS="2", ROPE_DIMS="8",
                    XSA_LAST_N="5", NUM_LOOPS="2", LOOP_START="1", LOOP_END="2", PARALLEL_RESIDUAL_START="3",
                    LOGIT_SOFTCAP="30", MLP_MULT="2")


def randomized_model(**overrides) -> tg.GPT:
    """A model whose zero-initialized and unit-initialized parts are randomized, so every path
    (projections, gains, skips, mixes) actually carries signal."""
    torch.manual_seed(0)
    model = tg.GPT(config_from_env(overrides, base=FULL_OPTIONS)).double()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return model


@pytest.mark.parametrize("looping", [False, True])
@pytest.mark.parametrize("overrides", [{}, {"PARALLEL_RESIDUAL_START": "0"}, {"XSA_LAST_N": "0", "ROPE_DIMS": "16"},
                                       {"SMEAR_GATE": "1", "SPARSE_ATTN_GATE": "1", "VARLEN_ATTENTION": "1",
                                        "PARALLEL_LANES_START": "3"}])
def test_changing_token_j_changes_no_logit_before_j(looping, overrides):
    model = randomized_model(**overrides)
    model.looping = looping
    torch.manual_seed(1)
    tokens = torch.randint(0, 97, (2, 48))
    with torch.no_grad():
        reference = model.compute_logits(model.forward_hidden(tokens))
        for j in (0, 1, 17, 47):
            changed = tokens.clone()
            changed[:, j] = (changed[:, j] + 1 + torch.arange(2)) % 97
            logits = model.compute_logits(model.forward_hidden(changed))
            assert torch.equal(logits[:, :j], reference[:, :j]), f"position < {j} saw token {j}"
            assert not torch.allclose(logits[:, j], reference[:, j])  # the probe is real


def test_recurrence_adds_no_block_weights():
    with torch.device("meta"):
        plain = tg.GPT(config_from_env({"NUM_LOOPS": "0"}, base=FULL_OPTIONS))
        looped = tg.GPT(config_from_env({}, base=FULL_OPTIONS))
    count = lambda m: sum(p.numel() for p in m.parameters())
    extra_skip_slots = looped.skip_weights.size(0) - plain.skip_weights.size(0)
    assert looped.loop_order == [0, 1, 2, 1, 2, 1, 2, 3, 4] and len(looped.blocks) == len(plain.blocks) == 5
    # The only growth is the U-Net gates of the longer schedule: 2 vectors of MODEL_DIM per slot.
    assert count(looped) - count(plain) == 2 * 64 * extra_skip_slots
    names = lambda m: {n for n, _ in m.named_parameters()}
    assert names(looped) == names(plain)


def test_looping_changes_the_computation_with_the_same_parameters():
    model = randomized_model()
    tokens = torch.randint(0, 97, (1, 16))
    before = {n: p.clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        plain = model(tokens, tokens)
        model.looping = True
        looped = model(tokens, tokens)
    assert not torch.allclose(plain, looped)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_xsa_output_has_no_component_along_the_own_value():
    torch.manual_seed(0)
    y, v = torch.randn(2, 7, 6, 16, dtype=torch.float64), torch.randn(2, 7, 3, 16, dtype=torch.float64)
    out = tg.exclusive_self_attention(y, v)
    for head in range(6):
        own_value = v[:, :, head // 2]  # query heads 2g and 2g+1 share KV head g
        assert torch.allclose((out[:, :, head] * own_value).sum(-1), torch.zeros(2, 7, dtype=torch.float64), atol=1e-12)
    # Only that one component is removed: what is left of y is orthogonal to the removed part.
    assert torch.allclose(((y - out) * out).sum(-1), torch.zeros(2, 7, 6, dtype=torch.float64), atol=1e-12)


def test_partial_rope_rotates_only_the_first_dims_and_keeps_norms():
    x = torch.randn(1, 10, 2, 32, dtype=torch.float64)
    cos, sin = tg.rotary_tables(10, 8, 10000.0, "cpu", torch.float64)
    out = tg.apply_partial_rope(x, cos, sin)
    assert torch.equal(out[..., 8:], x[..., 8:])
    assert torch.allclose(out[..., :8].norm(dim=-1), x[..., :8].norm(dim=-1))
    assert torch.equal(out[:, 0], x[:, 0])  # position 0 is not rotated


def test_forward_is_hidden_then_logits_with_softcap():
    model = randomized_model()
    tokens = torch.randint(0, 97, (2, 12))
    with torch.no_grad():
        logits = model.compute_logits(model.forward_hidden(tokens))
        nll = model(tokens[:, :-1], tokens[:, 1:])
    assert logits.abs().max() <= 30.0
    expected = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 97), tokens[:, 1:].reshape(-1),
                                                 reduction="none")
    assert torch.allclose(nll.flatten().double(), expected.double(), atol=1e-6)


def test_zero_init_and_orthogonal_init():
    torch.manual_seed(0)
    model = tg.GPT(config_from_env({}, base=FULL_OPTIONS))
    state, block = model.state_dict(), model.blocks[0]
    for i in range(5):  # output projections start at zero; matrices with both sides >= 64 orthogonal
        assert torch.count_nonzero(state[f"blocks.{i}.attn.proj.weight"]) == 0
        assert torch.count_nonzero(state[f"blocks.{i}.mlp.proj.weight"]) == 0
        for name, shape in (("attn.c_q", (64, 64)), ("mlp.fc", (128, 64))):
            w = state[f"blocks.{i}.{name}.weight"]
            assert w.shape == shape and torch.allclose(w.T @ w, torch.eye(64), atol=1e-5), name
        for name in ("attn.c_k", "attn.c_v"):  # 32 x 64: nn.Linear's default, uniform within 1/sqrt(fan_in)
            w = state[f"blocks.{i}.{name}.weight"]
            assert w.shape == (32, 64) and 0.9 / 8 < w.abs().max() <= 1 / 8, name
    assert not torch.equal(state["blocks.0.attn.c_q.weight"],
                           state["blocks.1.attn.c_q.weight"])  # each drawn on its own
    assert torch.allclose(block.attn.q_gain, torch.full((4,), 5.25))
    assert model.blocks[2].norm_scale == pytest.approx(1 / 3 ** 0.5)
    assert [b.parallel for b in model.blocks] == [False, False, False, True, True]
    assert [b.attn.xsa for b in tg.GPT(config_from_env({**FULL_OPTIONS,
                                                        "XSA_LAST_N": "2"})).blocks] == [False] * 3 + [True] * 2


@pytest.mark.parametrize("requested", ["auto", "sdpa"])
def test_attention_backend_is_sdpa_without_cuda(requested):
    assert tg.pick_attention_backend(torch.device("cpu"), requested) == "sdpa"


FA3_INSTALL = ("flash_attn_interface), built from the hopper/ folder of the flash-attention repository: git clone "
               "https://github.com/Dao-AILab/flash-attention && cd flash-attention/hopper && python setup.py install")
FA2_INSTALL = "(module flash_attn): pip install flash-attn"


@pytest.mark.parametrize("requested, install", [("fa3", FA3_INSTALL), ("fa2", FA2_INSTALL)])
def test_a_named_flash_backend_on_cpu_stops_saying_what_to_install(requested, install):
    with pytest.raises(tg.ConfigError) as error:
        tg.pick_attention_backend(torch.device("cpu"), requested)
    message = str(error.value)
    assert message.startswith(f"ATTENTION_BACKEND={requested} cannot be used: ")
    assert "it needs a CUDA GPU and this run is on cpu" in message and install in message


BOTH = ("flash_attn_interface", "flash_attn")


def flash_module(name: str, functions=tg.FLASH_FUNCTIONS) -> types.ModuleType:
    module = types.ModuleType(name)
    for function in functions:
        setattr(module, function, lambda *args, **kwargs: None)
    return module


@pytest.fixture
def fake_gpu(monkeypatch):
    """A CUDA device of the given compute capability on which only `modules` can be imported (with the functions
    the model calls; "flash_attn (namespace)" stands for flash-attn-4's `flash_attn`, which has neither)."""
    def make(capability: tuple[int, int], modules=()):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Test GPU")
        for name in ("flash_attn_interface", "flash_attn"):  # None in sys.modules makes an import fail
            module = flash_module(name) if name in modules else None
            if f"{name} (namespace)" in modules:
                module = flash_module(name, functions=())
            monkeypatch.setitem(sys.modules, name, module)
        return torch.device("cuda", 0)
    return make


@pytest.mark.parametrize("capability, modules, expected", [
    ((9, 0), BOTH, "fa3"), ((9, 0), ("flash_attn",), "fa2"), ((9, 0), (), "sdpa"),
    ((8, 0), BOTH, "fa2"), ((7, 5), ("flash_attn",), "sdpa"), ((8, 0), ("flash_attn (namespace)",), "sdpa"),
    ((9, 0), ("flash_attn_interface", "flash_attn (namespace)"), "fa3")])
def test_auto_takes_the_best_backend_that_can_run(fake_gpu, capability, modules, expected):
    assert tg.pick_attention_backend(fake_gpu(capability, modules), "auto") == expected


@pytest.mark.parametrize("requested, capability, modules, why", [
    ("fa3", (8, 0), BOTH, "it needs a Hopper GPU (compute capability 9.x) and Test GPU has compute capability 8.0"),
    ("fa3", (9, 0), ("flash_attn",), "module flash_attn_interface cannot be imported"),
    ("fa2", (9, 0), ("flash_attn_interface",), "module flash_attn cannot be imported"),
    ("fa2", (7, 5), BOTH, "it needs compute capability 8.0 or newer and Test GPU has compute capability 7.5")])
def test_a_named_backend_that_cannot_run_on_this_gpu_stops(fake_gpu, requested, capability, modules, why):
    with pytest.raises(tg.ConfigError) as error:
        tg.pick_attention_backend(fake_gpu(capability, modules), requested)
    assert str(error.value).startswith(f"ATTENTION_BACKEND={requested} cannot be used: {why}")
    assert tg.ATTENTION_INSTALL[requested] in str(error.value)


@pytest.mark.parametrize("requested", ["fa3", "fa2", "sdpa"])
def test_a_named_backend_that_can_run_is_taken(fake_gpu, requested):
    assert tg.pick_attention_backend(fake_gpu((9, 0), BOTH), requested) == requested


def stream_dtypes(model: tg.GPT, tokens: torch.Tensor) -> tuple[set, torch.Tensor, torch.Tensor]:
    """The dtypes of every block's output, the hidden state and the per-token loss of one forward."""
    seen = set()
    hooks = [b.register_forward_hook(lambda _m, _args, out: seen.add(out.dtype)) for b in model.blocks]
    hidden = model.forward_hidden(tokens[:, :-1])
    nll = model(tokens[:, :-1], tokens[:, 1:])
    for h in hooks:
        h.remove()
    return seen, hidden, nll


def test_compute_dtype_is_the_parameters_dtype_on_cpu():
    model = tg.GPT(config_from_env({}, base=FULL_OPTIONS))
    assert model.compute_dtype == torch.float32 and model.double().compute_dtype == torch.float64
    model.compute_dtype = torch.bfloat16
    assert model.compute_dtype == torch.bfloat16
    model.compute_dtype = None  # back to the default
    assert model.compute_dtype == torch.float64


@pytest.mark.parametrize("looping", [False, True])
def test_a_bf16_residual_stream_keeps_float32_weights_head_and_loss(looping):
    """What CUDA runs, on the CPU: the stream between blocks is bf16, while the parameters, their
    gradients, the final norm, the logits and the loss stay float32, and the loss moves by bf16 noise."""
    model = randomized_model().float()
    model.looping = looping
    tokens = torch.randint(0, 97, (2, 33), generator=torch.Generator().manual_seed(2))
    dtypes, hidden, reference = stream_dtypes(model, tokens)
    assert dtypes == {torch.float32} and hidden.dtype == torch.float32
    model.compute_dtype = torch.bfloat16
    dtypes, hidden, nll = stream_dtypes(model, tokens)
    assert dtypes == {torch.bfloat16} and hidden.dtype == nll.dtype == torch.float32
    nll.mean().backward()
    assert all(p.dtype == p.grad.dtype == torch.float32 for p in model.parameters())
    assert not torch.equal(nll, reference)  # the bf16 path really ran
    assert abs(nll.mean().item() - reference.mean().item()) < 0.01 * reference.mean().item()
    torch.testing.assert_close(nll, reference, rtol=0.05, atol=0.05)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_cuda_the_stream_is_bf16_by_default_and_the_loss_stays_close():
    model = randomized_model().float().cuda()
    tokens = torch.randint(0, 97, (2, 33), generator=torch.Generator().manual_seed(2)).cuda()
    assert model.compute_dtype == torch.bfloat16
    with torch.autocast("cuda", dtype=torch.bfloat16):
        dtypes, hidden, nll = stream_dtypes(model, tokens)
        model.compute_dtype = torch.float32
        _, _, reference = stream_dtypes(model, tokens)
    assert dtypes == {torch.bfloat16} and hidden.dtype == nll.dtype == torch.float32
    assert abs(nll.mean().item() - reference.mean().item()) < 0.01 * reference.mean().item()


GATES = dict(SMEAR_GATE="1", SPARSE_ATTN_GATE="1")


def test_gates_start_as_the_identity_and_a_half():
    """Zero-initialized, SmearGate changes nothing and the sparse attention gate halves every head's output
    (sigmoid(0)): the gated model equals the plain one with its attention output projections halved."""
    torch.manual_seed(0)
    plain = tg.GPT(config_from_env({}, base=FULL_OPTIONS)).double()
    with torch.no_grad():
        for p in plain.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    gated = tg.GPT(config_from_env({**FULL_OPTIONS, **GATES})).double()
    missing, unexpected = gated.load_state_dict(plain.state_dict(), strict=False)
    assert sorted(missing) == sorted(["smear_w", "smear_lambda"] + [f"blocks.{i}.attn.gate_w" for i in range(5)])
    assert not unexpected
    halved = plain.state_dict()
    for i in range(5):
        halved[f"blocks.{i}.attn.proj.weight"] = halved[f"blocks.{i}.attn.proj.weight"] * 0.5
    plain.load_state_dict(halved)
    tokens = torch.randint(0, 97, (2, 24))
    with torch.no_grad():
        torch.testing.assert_close(gated.forward_hidden(tokens), plain.forward_hidden(tokens), rtol=1e-12, atol=1e-12)


def test_a_closed_sparse_gate_silences_its_head_only():
    cfg = config_from_env({**FULL_OPTIONS, **GATES, "XSA_LAST_N": "0"})
    torch.manual_seed(0)
    attn = tg.GPT(cfg).double().blocks[0].attn
    x = torch.randn(1, 6, 64, dtype=torch.float64)
    w = tg.LayerWeights(*(torch.randn(s, dtype=torch.float64) * 0.2 for s in [(64, 64), (32, 64), (32, 64), (64, 64),
                                                                               (128, 64), (64, 128)]))
    with torch.no_grad():
        attn.gate_w[2, 0] = -1e4 / cfg.SPARSE_ATTN_GATE_SCALE  # head 2 reads channel 0, kept positive below
        x[..., 0] = x[..., 0].abs() + 0.1
        captured = {}
        attn.proj.forward = lambda y, weight: captured.setdefault("y", y)  # the gated heads, before the projection
        attn(x, w, None)
    heads = captured["y"].view(1, 6, 4, 16)
    assert heads[:, :, 2].abs().max() == 0 and heads[:, :, [0, 1, 3]].abs().min() > 0


def test_smear_gate_never_carries_a_token_across_a_bos():
    """Two documents, each opened by BOS (id 1). Changing the last token of the first changes nothing the
    SmearGate gives the second; without the BOS mask (SMEAR_BOS_MASK=0, as #2135 runs) the second document's BOS
    takes it in."""
    ids = torch.tensor([[1, 5, 6, 7, 1, 8, 9, 10]])
    changed = ids.clone()
    changed[0, 3] = 50  # the first document's last token
    for masked in (True, False):
        torch.manual_seed(0)
        model = tg.GPT(config_from_env({**FULL_OPTIONS, **GATES, "SMEAR_BOS_MASK": str(int(masked))})).double()
        with torch.no_grad():
            model.smear_w.normal_()
            model.smear_lambda.fill_(1.0)
        with torch.no_grad():
            out, out_changed = (model.smear(model.tok_emb(i), i) for i in (ids, changed))
        second_document_same = torch.equal(out[0, 4:], out_changed[0, 4:])
        assert second_document_same == masked
        assert not torch.equal(out[0, 3], out_changed[0, 3])  # the probe is real


@pytest.mark.parametrize("switch", ["SMEAR_GATE", "VARLEN_ATTENTION"])
def test_a_tokenizer_whose_bos_is_not_bos_id_stops_a_run_that_cuts_documents(small_sample, tmp_path, switch):
    from test_training import tiny_env

    cfg = config_from_env(tiny_env(small_sample, tmp_path, BOS_ID=5, **{"SMEAR_GATE": 0, "VARLEN_ATTENTION": 0,
                                                                         switch: 1}))
    with pytest.raises(tg.ConfigError, match="starts documents with id 1 but BOS_ID=5; set BOS_ID=1"):
        tg.load_validation_data(cfg)
    assert tg.load_validation_data(tg.dataclasses.replace(cfg, **{switch: 0})).tokens.numel() > 0  # unused unless on


def test_the_muon_weight_decay_taper():
    cfg = config_from_env({"WD_TAPER_START": "0.7", "WD_TAPER_FINAL_MULT": "0.5"})
    assert [tg.weight_decay_multiplier(cfg, f) for f in (0.0, 0.7, 0.85, 1.0)] == pytest.approx([1, 1, 0.75, 0.5])
    assert {tg.weight_decay_multiplier(config_from_env({}), f) for f in (0.0, 0.9, 1.0)} == {1.0}  # off by default
    model = tg.GPT(config_from_env({"NUM_LOOPS": "0"}, base=FULL_OPTIONS))
    optimizers = tg.build_optimizers(cfg, model)
    tg.set_schedule(cfg, optimizers, step=10, frac=0.85)
    assert optimizers.muon.param_groups[0]["weight_decay"] == pytest.approx(0.095 * 0.75)
    assert [g["weight_decay"] for g in optimizers.adam.param_groups] == [cfg.EMBED_WD, cfg.ADAM_WD]  # Muon only


def test_document_isolated_attention_runs_each_document_as_if_alone():
    """Three documents packed in one row (each opened by BOS, id 1) give the logits each gets alone, and changing
    any token of one document changes no logit of the next."""
    model = randomized_model(VARLEN_ATTENTION="1", **GATES)
    torch.manual_seed(2)
    docs = [torch.cat([torch.tensor([1]), torch.randint(2, 97, (n,))]) for n in (5, 3, 7)]
    packed = torch.cat(docs)[None]
    with torch.no_grad():
        together = model.compute_logits(model.forward_hidden(packed))[0]
        alone = torch.cat([model.compute_logits(model.forward_hidden(d[None]))[0] for d in docs])
        torch.testing.assert_close(together, alone, rtol=0, atol=1e-5)  # RoPE: relative, up to its float32 tables
        starts = [0, 6, 10, 18]
        for n in range(2):
            changed = packed.clone()
            changed[0, starts[n + 1] - 1] = 96 if changed[0, starts[n + 1] - 1] != 96 else 95  # doc n's last token
            logits = model.compute_logits(model.forward_hidden(changed))[0]
            assert torch.equal(logits[starts[n + 1]:], together[starts[n + 1]:])
            assert not torch.equal(logits[starts[n + 1] - 1], together[starts[n + 1] - 1])  # the probe is real
    model.varlen = False  # without isolation the next document does see it
    with torch.no_grad():
        plain = model.compute_logits(model.forward_hidden(packed))[0]
        changed = packed.clone()
        changed[0, 5] = 96 if packed[0, 5] != 96 else 95
        assert not torch.equal(model.compute_logits(model.forward_hidden(changed))[0, 6:], plain[6:])


def test_flex_document_attention_is_the_masked_attention():
    """DOC_ATTENTION=flex: FlexAttention with a document block mask (causal, same document) gives what SDPA with the
    dense document mask gives, GQA included; here forward only, as FlexAttention has no CPU backward (the cuda test
    checks both directions)."""
    torch.manual_seed(3)
    ids = torch.randint(2, 97, (2, 40))
    ids[:, 0], ids[0, 9], ids[0, 30], ids[1, 17] = 1, 1, 1, 1
    q, k, v = torch.randn(2, 40, 4, 16), torch.randn(2, 40, 2, 16), torch.randn(2, 40, 2, 16)
    attend = tg.attention_function("sdpa")
    with warnings.catch_warnings():  # eager FlexAttention on a CPU warns that it runs unfused
        warnings.simplefilter("ignore")
        flex = attend(q, k, v, tg.document_block_mask(ids, bos_id=1))
        model = randomized_model(VARLEN_ATTENTION="1", **GATES)
        with torch.no_grad():
            masked = model.compute_logits(model.forward_hidden(ids))
            model.doc_attention = "flex"
            assert model.document_isolation(ids.device) == "flex"
            flexed = model.compute_logits(model.forward_hidden(ids))
    torch.testing.assert_close(flex, attend(q, k, v, tg.document_mask(ids, bos_id=1)), rtol=0, atol=1e-5)
    torch.testing.assert_close(flexed, masked, rtol=0, atol=1e-4)


def test_the_document_mask_is_causal_and_cut_at_every_bos():
    ids = torch.tensor([[7, 1, 5, 6, 1, 9]])
    mask = tg.document_mask(ids, bos_id=1)[0, 0].int()
    assert mask.tolist() == [[1, 0, 0, 0, 0, 0],
                             [0, 1, 0, 0, 0, 0],
                             [0, 1, 1, 0, 0, 0],
                             [0, 1, 1, 1, 0, 0],
                             [0, 0, 0, 0, 1, 0],
                             [0, 0, 0, 0, 1, 1]]


def test_packed_rows_cut_sequences_where_the_records_cu_seqlens_do():
    """TRAIN_LOADER=packed: a sequence starts at the row's start, at each BOS and every max_len tokens after the
    last of those, as the 1.0611 record's _build_cu_seqlens cuts (starts [0] + BOS, each segment split every
    max_len from its own start); the mask, the block mask and the varlen starts agree."""
    ids = torch.tensor([[7, 8, 1, 5, 6, 2, 3, 4, 9, 9, 9, 1, 5]])
    def record_cuts(bos_positions, total, max_len):
        starts = bos_positions if bos_positions and bos_positions[0] == 0 else [0] + bos_positions
        return [c for a, b in zip(starts, starts[1:] + [total]) for c in range(a, b, max_len)]
    want = record_cuts([2, 11], 13, 3)
    assert want == [0, 2, 5, 8, 11]
    assert tg.sequence_starts(ids, 1, 3)[0].nonzero().flatten().tolist() == want
    assert tg.document_starts(ids, 1, 3).tolist() == want + [13]
    segment = tg.sequence_starts(ids, 1, 3).cumsum(1)[0]
    same = (segment[:, None] == segment[None, :]) & torch.ones(13, 13, dtype=torch.bool).tril()
    assert torch.equal(tg.document_mask(ids, 1, 3)[0, 0], same)
    assert tg.sequence_starts(ids, 1)[0].nonzero().flatten().tolist() == [0, 2, 11]  # no max_len: BOS alone


def test_a_model_with_a_segment_length_runs_each_piece_of_a_long_document_alone():
    """GPT.segment_len (TRAIN_LOADER=packed): a 10-token document cut every 4 tokens gives, piece by piece, the
    logits each piece gets alone (no SmearGate: it reads the previous token across a cut by design)."""
    model = randomized_model(VARLEN_ATTENTION="1", SPARSE_ATTN_GATE="1")
    model.segment_len = 4
    torch.manual_seed(5)
    doc = torch.cat([torch.tensor([1]), torch.randint(2, 97, (9,))])[None]
    with torch.no_grad():
        together = model.compute_logits(model.forward_hidden(doc))[0]
        model.segment_len = None
        alone = torch.cat([model.compute_logits(model.forward_hidden(doc[:, i:i + 4]))[0] for i in (0, 4, 8)])
        whole = model.compute_logits(model.forward_hidden(doc))[0]
    torch.testing.assert_close(together, alone, rtol=0, atol=1e-5)
    assert not torch.allclose(whole[4:], together[4:], atol=1e-3)  # uncut, the later pieces read the earlier


def test_two_lanes_without_skips_or_x0_and_keeping_all_are_the_parallel_block_exactly():
    """Lanes that keep all of themselves and take all of both outputs, with no U-Net skip and no x0 mix (the two
    things only lane 0 receives), compute the single-stream parallel block, bit for bit."""
    torch.manual_seed(0)
    plain = tg.GPT(config_from_env({}, base=FULL_OPTIONS)).double()
    with torch.no_grad():
        for p in plain.parameters():
            p.add_(torch.randn_like(p) * 0.3)
        plain.skip_gates.fill_(1e4)  # sigmoid 1.0 exactly: the stream passes whole and no skip joins it
        for block in plain.blocks[3:]:
            block.resid_mix.copy_(torch.tensor([[1.0], [0.0]]))
    laned = tg.GPT(config_from_env({**FULL_OPTIONS, "PARALLEL_LANES_START": "3"})).double()
    missing, _ = laned.load_state_dict(plain.state_dict(), strict=False)
    assert sorted(missing) == [f"blocks.{i}.{n}" for i in (3, 4) for n in ("lane_keep", "lane_post")]
    assert all(torch.equal(b.lane_keep, torch.full((2,), 1.1)) for b in laned.blocks[3:])  # the record's start
    tokens = torch.randint(0, 97, (2, 24))
    with torch.no_grad():
        for block in laned.blocks[3:]:
            block.lane_keep.fill_(1.0)
        assert torch.equal(laned.forward_hidden(tokens), plain.forward_hidden(tokens))
        laned.blocks[4].lane_post.add_(torch.randn(2, 2))
        assert not torch.equal(laned.forward_hidden(tokens), plain.forward_hidden(tokens))  # the scalars are live


def test_the_skip_and_x0_reach_the_attention_lane_only():
    """At the first lane layer, the U-Net skip joins lane 0 and x0 is mixed into attention's read: the MLP's
    input (lane 1) is the same whatever the skip weights or the x0 mix are; attention's input is not."""
    model = randomized_model(PARALLEL_LANES_START="3")
    block = model.blocks[3]
    seen = {}
    block.attn.c_q.register_forward_pre_hook(lambda _m, args: seen.__setitem__("attention", args[0].clone()))
    block.mlp.fc.register_forward_pre_hook(lambda _m, args: seen.__setitem__("mlp", args[0].clone()))
    tokens = torch.randint(0, 97, (1, 12))

    def inputs():
        with torch.no_grad():
            model.forward_hidden(tokens)
        return dict(seen)

    order = model.layer_order()
    slot = order[len(order) // 2:].index(3)  # the decoder position of layer 3, whose skip this is
    for change in (lambda: model.skip_weights[slot].mul_(2.0), lambda: block.resid_mix[1].add_(1.0)):
        before = inputs()
        with torch.no_grad():
            change()
        after = inputs()
        assert torch.equal(after["mlp"], before["mlp"])
        assert not torch.allclose(after["attention"], before["attention"])


@pytest.mark.parametrize("reader, other", [(0, 1), (1, 0)], ids=["attention reads lane 0", "MLP reads lane 1"])
def test_each_sublayer_reads_its_own_lane(reader, other):
    model = randomized_model(PARALLEL_LANES_START="3")
    block, w = model.blocks[3], model.layer_weights()[3]
    with torch.no_grad():
        block.lane_keep.zero_()
        block.lane_post[other].zero_()  # only the reading sublayer writes
        x0 = torch.randn(1, 5, 64, dtype=torch.float64)
        lanes = torch.randn(2, 1, 5, 64, dtype=torch.float64)
        moved = lanes.clone()
        moved[other] += 1.0
        out, out_moved = block(lanes, x0, w, None), block(moved, x0, w, None)
        assert torch.equal(out, out_moved)
        moved = lanes.clone()
        moved[reader] += 1.0
        assert not torch.equal(out, block(moved, x0, w, None))


def test_lanes_cannot_start_inside_the_loop():
    with pytest.raises(tg.ConfigError, match="PARALLEL_LANES_START=2 must come after LOOP_END=2"):
        config_from_env({**FULL_OPTIONS, "PARALLEL_LANES_START": "2"})


def test_lanes_in_the_encoder_feed_their_mean_to_the_skip():
    """Lanes from layer 1 of 5 without recurrence: the encoder is layers 0 and 1, so layer 1's output is two
    (different) lanes, and it is both the stream and the skip that the first decoder block (layer 2) receives:
    lane 0 becomes gate*lane0 + (1-gate)*w*mean(skip lanes), lane 1 passes as it is. Causality holds."""
    model = randomized_model(NUM_LOOPS="0", PARALLEL_LANES_START="1")
    tokens = torch.randint(0, 97, (1, 12))
    seen = {}
    model.blocks[1].register_forward_hook(lambda _m, _a, out: seen.__setitem__("out", out.clone()))
    model.blocks[2].register_forward_pre_hook(lambda _m, args: seen.__setitem__("into", args[0].clone()))
    with torch.no_grad():
        model.forward_hidden(tokens)
    out, into = seen["out"], seen["into"]
    assert out.dim() == 4 and not torch.equal(out[0], out[1])
    gate, weight = torch.sigmoid(model.skip_gates[0]), model.skip_weights[0]
    assert torch.allclose(into[0], gate * out[0] + (1 - gate) * weight * out.mean(0))
    assert torch.equal(into[1], out[1])
    moved = tokens.clone()
    moved[0, 7] = (moved[0, 7] + 1) % 97
    with torch.no_grad():
        a, b = model.forward_hidden(tokens), model.forward_hidden(moved)
    assert torch.equal(a[:, :7], b[:, :7]) and not torch.equal(a[:, 7:], b[:, 7:])
