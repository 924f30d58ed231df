"""LoRA optimizer steps against PEFT: our training step (pretrain_qwen2vl.py's build: megatron DDP,
distributed Adam, clipping) with LoRA, next to PEFT's LoRA on the HF model + torch AdamW + clip_grad_norm_,
the same adapters to start with, the same batch of drawn conversations with images.  The losses follow
each other step by step, and after the steps our adapters exported as a PEFT folder and loaded with
``PeftModel.from_pretrained`` on the HF base give our logits."""
import tempfile

from tests.multiproc import run_ranks

RANK, LR, STEPS = 8, 1e-3, 6
LLM_PEFT = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _steps(rank, world, folder):
    from mindspeed_mm.platform import setup_platform

    platform = setup_platform("cpu")
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model

    from checkpoint.lora_io import write_peft_adapter
    from mindspeed_mm.models import lora
    from mindspeed_mm.models.mapping import hub_key
    from mindspeed_mm.models.qwen2vl import QWEN2VL
    from mindspeed_mm.platform.distributed import destroy_distributed, init_distributed
    from mindspeed_mm.training.checkpointing import unwrap
    from mindspeed_mm.training.step import train_step
    from scripts.bench_train import training_flags
    from tests.train_fixtures import small_pair

    init_distributed(platform, 1, 1, seed=0)
    flags = lambda model_json: training_flags(model_json, 2, LR, extra=[  # noqa: E731
        "--lora-rank", str(RANK), "--lora-alpha", str(2 * RANK), "--load", "unused"])
    with tempfile.TemporaryDirectory() as tmp:
        batch, hf, config, model, optimizer, scheduler = small_pair(tmp, flags)
        base = {k: v.detach().clone() for k, v in hf.state_dict().items()}
    stage = unwrap(model)
    specs = lora.adapter_specs(QWEN2VL.mapping, stage.cfg, lora.DEFAULT_TARGETS)

    def our_adapters():
        full = {}
        for adapter in lora.adapters_of(stage).values():
            full.update(lora.merge(adapter.spec, [[t.detach().clone() for t in adapter.local_tensors()]]))
        return lora.full_to_hf(full, specs, stage.cfg)

    start = our_adapters()
    peft = get_peft_model(hf, LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules=LLM_PEFT))
    with torch.no_grad():
        for name, p in peft.base_model.model.named_parameters():
            if "lora_" in name:
                module, ab, _, _ = name.rsplit(".", 3)
                p.copy_(start[f"{hub_key(module)}.{ab}.weight"])
    trained = [p for p in peft.parameters() if p.requires_grad]
    adamw = torch.optim.AdamW(trained, lr=LR, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    hf_batch = {k: batch[k] for k in ("input_ids", "attention_mask", "mm_token_type_ids", "pixel_values",
                                      "image_grid_thw", "labels")}
    ours, theirs = [], []
    for i in range(STEPS):
        ours.append(train_step(model, optimizer, scheduler, [batch], config, iteration=i + 1).loss)
        adamw.zero_grad()
        loss = peft.base_model.model(**hf_batch, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trained, 1.0)
        adamw.step()
        theirs.append(float(loss))

    write_peft_adapter(folder, our_adapters(), lora.LoRASettings(RANK, 2.0 * RANK))
    from transformers import Qwen2VLForConditionalGeneration

    plain = Qwen2VLForConditionalGeneration(hf.config).float()
    plain.load_state_dict(base)  # PEFT wrapped ``hf`` in place: a fresh model holds the base
    reloaded = PeftModel.from_pretrained(plain, folder).eval()
    model.eval()
    with torch.no_grad():
        want = reloaded.base_model.model(**{k: v for k, v in hf_batch.items() if k != "labels"},
                                         use_cache=False).logits
        got = stage(batch["input_ids"], batch["position_ids"], batch["attention_mask"], batch["pixel_values"],
                    batch["image_grid_thw"])[..., :want.shape[-1]]
    real = batch["attention_mask"].bool()
    destroy_distributed()
    return dict(ours=ours, theirs=theirs, logits=float((got - want)[real].abs().max()))


def test_lora_steps_follow_peft_and_the_export_reloads(tmp_path):
    (r,) = run_ranks(_steps, 1, timeout=400, folder=str(tmp_path / "adapter"))
    gaps = [abs(a - b) / abs(b) for a, b in zip(r["ours"], r["theirs"])]
    assert max(gaps) < 1e-5, (r["ours"], r["theirs"])
    assert r["ours"][-1] < r["ours"][0] - 0.05, r["ours"]  # the adapters learned
    assert r["logits"] < 1e-5, r
