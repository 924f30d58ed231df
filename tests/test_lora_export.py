"""LoRA exports against PEFT and transformers: our adapted model's logits equal those of the exported PEFT
folder loaded with ``PeftModel.from_pretrained`` on the HF base, and of a plain HF model holding the merged
weights (W + alpha / r * B A); every target kind (LLM q/k/v, gate/up, the ViT's permuted qkv, the projector)."""
import torch

from tests.multiproc import run_ranks

RANK, ALPHA = 4, 8.0
LOGITS_ATOL = 1e-5


def _export_and_compare(rank, world, folder):
    from mindspeed_mm.platform import setup_platform

    platform = setup_platform("cpu")
    from peft import PeftModel

    from checkpoint import lora_io
    from mindspeed_mm.models import lora
    from mindspeed_mm.models.mapping import hub_key
    from mindspeed_mm.models.qwen2vl import QWEN2VL
    from mindspeed_mm.platform.distributed import destroy_distributed, init_distributed
    from tests.hf_reference import VOCAB, build_our_model, hf_forward, hf_model, hf_state, make_batch, our_config

    init_distributed(platform, 1, 1, seed=1)
    hf = hf_model()
    cfg = our_config(hf.config)
    settings = lora.LoRASettings(RANK, ALPHA, targets=lora.TARGETS)
    specs = lora.adapter_specs(QWEN2VL.mapping, cfg, settings.targets)
    full = lora.init_full(specs, RANK, seed=3)
    gen = torch.Generator().manual_seed(5)
    for name in full:  # B = 0 at init: give every adapter a non-zero product
        if ".lora_B." in name:
            full[name] = 0.1 * torch.randn(full[name].shape, generator=gen)
    model = build_our_model(hf, cfg)
    lora.apply_lora(model, specs, settings, full, 1, 0)
    batch = make_batch("right")
    real = batch["attention_mask"].bool()
    with torch.no_grad():
        ours = model.eval()(batch["input_ids"], None, batch["attention_mask"], batch["pixel_values"],
                            batch["image_grid_thw"])[..., :VOCAB]
        plain = hf_forward(hf, batch, with_labels=False).logits

    hf_adapters = lora.full_to_hf(full, specs, cfg)
    files = lora_io.write_peft_adapter(folder, hf_adapters, settings)
    peft = PeftModel.from_pretrained(hf_model(), folder).eval()
    with torch.no_grad():
        via_peft = hf_forward(peft.base_model.model, batch, with_labels=False).logits

    base = {hub_key(k): v for k, v in hf_state(hf).items()}
    merged = lora.merged_weights(base, hf_adapters, specs, settings.scale)
    merged_model = hf_model()
    state = merged_model.state_dict()
    for hub, t in merged.items():
        state[lora_io.module_path(hub[:-len(".weight")]) + ".weight"] = t
    merged_model.load_state_dict(state)
    with torch.no_grad():
        via_merged = hf_forward(merged_model, batch, with_labels=False).logits
    destroy_distributed()
    diff = lambda a, b: float((a - b)[real].abs().max())  # noqa: E731
    return dict(files=files, peft=diff(ours, via_peft), merged=diff(ours, via_merged),
                moved=diff(ours, plain), merged_count=len(merged))


def test_peft_folder_and_merged_weights_give_our_logits(tmp_path):
    (r,) = run_ranks(_export_and_compare, 1, timeout=300, folder=str(tmp_path / "adapter"))
    assert sorted(r["files"]) == ["adapter_config.json", "adapter_model.safetensors"]
    assert r["moved"] > 1e-2, r  # the adapters change the model
    assert r["peft"] < LOGITS_ATOL and r["merged"] < LOGITS_ATOL, r
    assert r["merged_count"] == 2 * 4 + 3 * (3 + 1 + 2 + 1) + 2  # HF projections: ViT, LLM, projector
