"""The model JSON: shipped configs match the official HF sizes; derivable from any HF config.json."""
import json

import pytest

from mindspeed_mm.errors import UserError
from mindspeed_mm.models.qwen2vl.config import Qwen2VLConfig
from scripts.make_tiny_qwen2vl import tiny_config
from tests.hf_reference import hub_flat_config

OFFICIAL = {  # hidden, layers, heads, kv heads, ffn, vocab, tied
    "2b": (1536, 28, 12, 2, 8960, 151936, True),
    "7b": (3584, 28, 28, 4, 18944, 152064, False),
    "72b": (8192, 80, 64, 8, 29568, 152064, False),
}


@pytest.mark.parametrize("name", sorted(OFFICIAL))
def test_shipped_model_json(name):
    cfg = Qwen2VLConfig.load(f"examples/qwen2vl/model_{name}.json")
    t, v = cfg.text, cfg.vision
    assert (t.hidden_size, t.num_layers, t.num_attention_heads, t.num_query_groups, t.ffn_hidden_size,
            t.vocab_size, t.tie_word_embeddings) == OFFICIAL[name]
    assert (v.num_layers, v.hidden_size, v.num_attention_heads, v.ffn_hidden_size, v.patch_size,
            v.spatial_merge_size, v.temporal_patch_size) == (32, 1280, 16, 5120, 14, 2, 2)
    assert t.mrope_section == [16, 24, 24] and t.rope_theta == 1e6
    assert (cfg.vision_start_token_id, cfg.vision_end_token_id, cfg.image_token_id, cfg.video_token_id) == \
        (151652, 151653, 151655, 151656)


def test_from_hf_both_layouts_agree(tmp_path):
    hf = tiny_config(tie_word_embeddings=True).to_dict()
    nested = Qwen2VLConfig.from_hf(hf)
    flat = Qwen2VLConfig.from_hf(hub_flat_config(hf))
    assert nested == flat
    assert nested.text.mrope_section == [4, 6, 6] and nested.text.tie_word_embeddings
    assert nested.text.num_query_groups == 2 and nested.vision.ffn_hidden_size == 256
    path = tmp_path / "config.json"
    path.write_text(json.dumps(hf))
    assert Qwen2VLConfig.load(str(path)) == nested  # an HF config.json works as --mm-model too


def test_bad_configs_name_the_key(tmp_path):
    with pytest.raises(UserError, match="not a Qwen2-VL config"):
        Qwen2VLConfig.from_hf({"model_type": "llama", "hidden_size": 8})
    bad = Qwen2VLConfig().to_dict()
    bad["text"]["hidden_sise"] = 3
    with pytest.raises(UserError, match="unknown key 'hidden_sise'"):
        Qwen2VLConfig.from_dict(bad)
    bad = Qwen2VLConfig().to_dict()
    bad["text"]["num_layers"] = "28"
    with pytest.raises(UserError, match="'num_layers' must be int"):
        Qwen2VLConfig.from_dict(bad)
    path = tmp_path / "m.json"
    path.write_text('{"text": {,}}')
    with pytest.raises(UserError, match="line 1, column 11"):
        Qwen2VLConfig.load(str(path))
    with pytest.raises(UserError, match="does not divide text.num_attention_heads = 28"):
        Qwen2VLConfig.load("examples/qwen2vl/model_7b.json").check_parallel(8)
