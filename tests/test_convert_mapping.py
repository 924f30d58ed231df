"""The mapping table and TP/PP split/merge, against the HF Qwen2-VL model's own parameters."""
import pytest
import torch

from mindspeed_mm.models.mapping import EMBEDDING, OUTPUT_LAYER, hub_key
from mindspeed_mm.models.parallel import stage_layer_counts
from mindspeed_mm.models.qwen2vl import QWEN2VL
from mindspeed_mm.errors import UserError
from mindspeed_mm.models.qwen2vl.config import Qwen2VLConfig
from scripts.make_tiny_qwen2vl import tiny_config

hf_to_mm, mm_to_hf, shard_state, merge_shards, stage_names = (
    QWEN2VL.hf_to_mm, QWEN2VL.mm_to_hf, QWEN2VL.shard_state, QWEN2VL.merge_shards, QWEN2VL.stage_names)
check_hf_keys, hf_shapes, ours_shapes = QWEN2VL.mapping.check_hf_keys, QWEN2VL.mapping.hf_shapes, QWEN2VL.mapping.ours_shapes

# vocab 2100 is not a multiple of 128: padding is exercised at every TP size.  8 heads in 4 query
# groups (GQA) so TP=4 still splits whole groups; head_dim 16 -> mrope sections summing to 8.
SIZES = dict(vocab_size=2100, num_hidden_layers=3, num_attention_heads=8, num_key_value_heads=4,
             rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]})


def _hf_model_state(tied: bool, seed: int = 0):
    """(HF state dict in transformers' internal key layout, our config) of a random tiny model."""
    from transformers import Qwen2VLForConditionalGeneration

    hf_cfg = tiny_config(tie_word_embeddings=tied, **SIZES)
    torch.manual_seed(seed)
    model = Qwen2VLForConditionalGeneration(hf_cfg)
    with torch.no_grad():  # randomise norms and biases too, so no two parameters are equal by construction
        for p in model.parameters():
            p.copy_(torch.randn_like(p))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    if tied:
        state.pop("lm_head.weight", None)
    return state, Qwen2VLConfig.from_hf(hf_cfg.to_dict())


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def hf_state(request):
    return _hf_model_state(request.param)


def test_internal_and_hub_layouts_round_trip(hf_state):
    internal, cfg = hf_state
    assert any(k.startswith("model.language_model.") for k in internal)  # transformers-5 internal names
    hub = {hub_key(k): v for k, v in internal.items()}
    assert any(k.startswith("model.layers.") for k in hub) and any(k.startswith("visual.") for k in hub)
    for source in (internal, hub):
        ours = hf_to_mm(source, cfg)
        assert {k: tuple(v.shape) for k, v in ours.items()} == ours_shapes(cfg)
        back = mm_to_hf(ours, cfg)
        assert back.keys() == hub.keys()
        for k in hub:
            assert torch.equal(back[k], hub[k]), k
    assert hf_shapes(cfg) == {k: tuple(v.shape) for k, v in hub.items()}


def test_text_qkv_is_megatron_gqa_layout(hf_state):
    internal, cfg = hf_state
    ours = hf_to_mm(internal, cfg)
    nh, ng, hd = cfg.text.num_attention_heads, cfg.text.num_query_groups, cfg.text.kv_channels
    attn = "model.language_model.layers.1.self_attn."
    qkv = ours["language_model.decoder.layers.1.self_attention.linear_qkv.weight"]
    bias = ours["language_model.decoder.layers.1.self_attention.linear_qkv.bias"]
    row = 0
    for g in range(ng):
        for head in range(g * nh // ng, (g + 1) * nh // ng):  # the query heads that share kv group g
            assert torch.equal(qkv[row:row + hd], internal[attn + "q_proj.weight"][head * hd:(head + 1) * hd])
            assert torch.equal(bias[row:row + hd], internal[attn + "q_proj.bias"][head * hd:(head + 1) * hd])
            row += hd
        for proj in ("k_proj", "v_proj"):
            assert torch.equal(qkv[row:row + hd], internal[attn + proj + ".weight"][g * hd:(g + 1) * hd])
            row += hd
    assert row == qkv.shape[0]
    fc1 = ours["language_model.decoder.layers.1.mlp.linear_fc1.weight"]
    mlp = "model.language_model.layers.1.mlp."
    assert torch.equal(fc1, torch.cat([internal[mlp + "gate_proj.weight"], internal[mlp + "up_proj.weight"]]))


def test_vision_qkv_is_per_head(hf_state):
    internal, cfg = hf_state
    ours = hf_to_mm(internal, cfg)
    heads, hd = cfg.vision.num_attention_heads, cfg.vision.hidden_size // cfg.vision.num_attention_heads
    hf_qkv = internal["model.visual.blocks.0.attn.qkv.weight"]  # rows [q all heads; k all heads; v all heads]
    qkv = ours["vision_encoder.blocks.layers.0.self_attention.linear_qkv.weight"]
    for h in range(heads):
        for j in range(3):
            src = hf_qkv[j * heads * hd + h * hd: j * heads * hd + (h + 1) * hd]
            assert torch.equal(qkv[(3 * h + j) * hd:(3 * h + j + 1) * hd], src)
    patch = internal["model.visual.patch_embed.proj.weight"]
    assert torch.equal(ours["vision_encoder.patch_embed.weight"], patch.reshape(patch.shape[0], -1))


def test_vocab_padding_and_tied_output(hf_state):
    internal, cfg = hf_state
    ours = hf_to_mm(internal, cfg)
    emb = ours[EMBEDDING]
    assert emb.shape[0] == cfg.text.padded_vocab_size(1) > cfg.text.vocab_size
    assert torch.equal(emb[:cfg.text.vocab_size], internal["model.language_model.embed_tokens.weight"])
    assert not emb[cfg.text.vocab_size:].any()
    assert (OUTPUT_LAYER in ours) == (not cfg.text.tie_word_embeddings)


@pytest.mark.parametrize("tp,stage_layers", [(1, [3]), (2, [3]), (4, [1, 2]), (2, [0, 2, 1]), (1, [0, 0, 3])])
def test_shard_merge_round_trip(hf_state, tp, stage_layers):
    internal, cfg = hf_state
    full = hf_to_mm(internal, cfg)
    pp = len(stage_layers)
    shards = {(t, p): shard_state(full, cfg, tp, t, stage_layers, p) for t in range(tp) for p in range(pp)}
    merged = merge_shards(shards, cfg, stage_layers)
    assert merged.keys() == full.keys()
    for k in full:
        assert torch.equal(merged[k], full[k]), k

    vocab, padded = cfg.text.vocab_size, cfg.text.padded_vocab_size(tp)
    first, last = shards[(tp - 1, 0)], shards[(tp - 1, pp - 1)]
    emb = first[EMBEDDING]  # the last TP rank holds the padding rows
    assert emb.shape[0] == padded // tp and not emb[vocab - (tp - 1) * padded // tp:].any()
    # Local layer indices on every stage; the vision encoder on the first stage only.
    for p, n in enumerate(stage_layers):
        layers = {int(k.split(".")[3]) for k in shards[(0, p)] if k.startswith("language_model.decoder.layers.")}
        assert layers == set(range(n))
        assert any(k.startswith("vision_encoder.") for k in shards[(0, p)]) == (p == 0)
    if cfg.text.tie_word_embeddings:  # megatron: a copy of the embedding on the last stage only when PP > 1
        assert (OUTPUT_LAYER in last) == (pp > 1)
        if pp > 1:
            assert torch.equal(last[OUTPUT_LAYER], emb)
    else:
        assert OUTPUT_LAYER in last and last[OUTPUT_LAYER].shape[0] == padded // tp


def test_tp_pieces_follow_megatron_splits(hf_state):
    internal, cfg = hf_state
    full = hf_to_mm(internal, cfg)
    tp, ng, hd = 2, cfg.text.num_query_groups, cfg.text.kv_channels
    ranks = [shard_state(full, cfg, tp, r, [3], 0) for r in range(tp)]
    name = "language_model.decoder.layers.0."
    per_group = full[name + "self_attention.linear_qkv.weight"].shape[0] // ng
    ffn = cfg.text.ffn_hidden_size
    for r, st in enumerate(ranks):
        # qkv: whole query groups; fc1: [gate_r; up_r]; proj / fc2: input columns.
        groups = range(r * ng // tp, (r + 1) * ng // tp)
        want = torch.cat([full[name + "self_attention.linear_qkv.weight"][g * per_group:(g + 1) * per_group]
                          for g in groups])
        assert torch.equal(st[name + "self_attention.linear_qkv.weight"], want)
        fc1 = full[name + "mlp.linear_fc1.weight"]
        part = ffn // tp
        assert torch.equal(st[name + "mlp.linear_fc1.weight"],
                           torch.cat([fc1[r * part:(r + 1) * part], fc1[ffn + r * part:ffn + (r + 1) * part]]))
        proj = full[name + "self_attention.linear_proj.weight"]
        assert torch.equal(st[name + "self_attention.linear_proj.weight"],
                           proj[:, r * proj.shape[1] // tp:(r + 1) * proj.shape[1] // tp])
        # Norms and row-parallel biases are replicated.
        assert torch.equal(st[name + "input_layernorm.weight"], full[name + "input_layernorm.weight"])
        vis = "vision_encoder.blocks.layers.0.mlp.linear_fc2.bias"
        assert torch.equal(st[vis], full[vis])
    assert per_group == (cfg.text.num_attention_heads // ng + 2) * hd


def test_stage_layer_counts():
    assert stage_layer_counts(28, [0, 0, 10, 20]) == [0, 10, 10, 8]
    assert stage_layer_counts(28, [0]) == [28]
    assert stage_layer_counts(28) == [28]
    assert stage_layer_counts(28, pipeline_num_layers=[0, 14, 14]) == [0, 14, 14]
    for bad in ([1, 10], [0, 20, 10], [0, 30]):
        with pytest.raises(UserError, match="pipeline-layer-index"):
            stage_layer_counts(28, bad)
    with pytest.raises(UserError, match="summing to 28"):
        stage_layer_counts(28, pipeline_num_layers=[10, 10])
    # both spellings, and the rule training applies: the last stage holds an LLM layer
    assert stage_layer_counts(28, "0,0,10,20") == stage_layer_counts(28, ["0", "0,10", "20"]) == [0, 10, 10, 8]
    assert stage_layer_counts(28, pipeline_num_layers="0,10,10,8") == [0, 10, 10, 8]
    with pytest.raises(UserError, match="last pipeline stage must hold at least one LLM layer"):
        stage_layer_counts(2, [0, 2])
    with pytest.raises(UserError, match="last pipeline stage"):
        stage_layer_counts(3, pipeline_num_layers=[3, 0])


def test_bad_states_name_the_parameter(hf_state):
    internal, cfg = hf_state
    hub = {hub_key(k): v for k, v in internal.items()}
    with pytest.raises(UserError, match="missing.*model.norm.weight"):
        hf_to_mm({k: v for k, v in hub.items() if k != "model.norm.weight"}, cfg)
    with pytest.raises(UserError, match="not used by Qwen2-VL.*visual.extra"):
        hf_to_mm({**hub, "visual.extra": torch.zeros(1)}, cfg)
    with pytest.raises(UserError, match="model.norm.weight has shape"):
        hf_to_mm({**hub, "model.norm.weight": torch.zeros(7)}, cfg)
    with pytest.raises(UserError, match="same parameter"):
        hf_to_mm({**internal, "model.norm.weight": hub["model.norm.weight"]}, cfg)
    with pytest.raises(UserError, match="missing"):
        check_hf_keys([], cfg)
    full = hf_to_mm(hub, cfg)
    shards = {(0, p): shard_state(full, cfg, 1, 0, [1, 2], p) for p in range(2)}
    shards[(0, 1)]["language_model.decoder.layers.5.mlp.linear_fc2.weight"] = torch.zeros(1)
    with pytest.raises(UserError, match="tp=0 pp=1: 1 unexpected parameter"):
        merge_shards(shards, cfg, [1, 2])
    with pytest.raises(UserError, match="does not divide text.num_query_groups"):
        shard_state(full, cfg, 8, 0, [3], 0)
    with pytest.raises(UserError, match="hold 2 LLM layers"):
        stage_names(cfg, [1, 1], 0)
