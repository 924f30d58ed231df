"""Issue 11, data side: user mistakes give one line naming the file / key / folder; quiet
data losses (leading newlines, 16-bit PNGs, too-long samples) are fixed or counted."""

import json
import os

import numpy as np
import pytest
from PIL import Image

from mindspeed_mm.data.builder import build_dataloader, build_train_valid_datasets
from mindspeed_mm.data.config import data_config_from_dict, validate_data_json
from mindspeed_mm.data.formats import Conversation
from mindspeed_mm.data.images import check_images, load_pixels
from mindspeed_mm.data.llava import main as llava_main
from mindspeed_mm.constants import IGNORE_INDEX
from mindspeed_mm.data.template import Qwen2VLTemplate
from mindspeed_mm.data.workers import effective_workers, spare_cores, usable_cores
from mindspeed_mm.errors import UserError
from tests.data_fixtures import data_config, make_processor_dir, save_image, write_json


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("uerr")
    model_dir = make_processor_dir(str(root / "tiny"))
    (root / "img").mkdir()
    save_image(root / "img" / "a.png", 64, 48)
    return root, model_dir


@pytest.fixture(scope="module")
def processors(env):
    from transformers import AutoTokenizer, Qwen2VLImageProcessor

    return AutoTokenizer.from_pretrained(env[1]), Qwen2VLImageProcessor.from_pretrained(env[1])


def _rec(answer="A picture.", image=True, question="Describe."):
    return {"images": ["img/a.png"] if image else [],
            "messages": [{"role": "user", "content": ("<image>" if image else "") + question},
                         {"role": "assistant", "content": answer}]}


def _cfg(root, model_dir, dataset, name, **basic):
    return data_config_from_dict(data_config(model_dir, dataset, str(root / f"cache-{name}"), str(root), **basic))


# ---- item 4: an answer's leading newline is trained --------------------------------
def test_answer_leading_newline_is_supervised_as_generation_sees_it(processors):
    tok, _ = processors
    template = Qwen2VLTemplate(tok)
    enc = template.encode(Conversation([("user", "Hi"), ("assistant", "\nHello")], []), [])
    # Generation is prompted with exactly these tokens ...
    prompt = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False,
                                     add_generation_prompt=True)
    prompt_ids = tok(prompt)["input_ids"]
    assert enc.input_ids[:len(prompt_ids)].tolist() == prompt_ids
    assert (enc.labels[:len(prompt_ids)] == IGNORE_INDEX).all()
    # ... and must produce the whole answer, its newline included, after them.
    supervised = enc.labels[enc.labels != IGNORE_INDEX].tolist()
    assert tok.decode(supervised) == "\nHello<|im_end|>\n"
    assert enc.input_ids[len(prompt_ids):].tolist() == tok("\nHello<|im_end|>\n")["input_ids"]


# ---- item 5: 16-bit PNGs ------------------------------------------------------------
def test_16bit_png_is_scaled_to_8bit_not_white(tmp_path, processors):
    _, ip = processors
    rng = np.random.default_rng(0)
    a16 = rng.integers(0, 65536, (48, 64), dtype=np.uint16)
    path = str(tmp_path / "g16.png")
    Image.fromarray(a16).save(path)
    assert Image.open(path).mode.startswith("I")
    pixels, grid = load_pixels([path], ip)
    expected = ip(images=[Image.fromarray((a16 >> 8).astype(np.uint8), "L")], return_tensors="np")
    np.testing.assert_allclose(pixels, expected["pixel_values"], atol=1e-6)
    assert np.array_equal(grid, expected["image_grid_thw"])
    assert check_images([path], ip) == [tuple(int(v) for v in grid[0])]


# ---- item 12: LLaVA converter with a wrong --image-dir -------------------------------
def test_llava_wrong_image_dir_is_an_error_naming_it_and_writes_nothing(tmp_path, capsys):
    recs = [{"id": str(i), "image": f"{i}.jpg",
             "conversations": [{"from": "human", "value": "<image>\nQ"}, {"from": "gpt", "value": "A"}]}
            for i in range(3)]
    src, out = write_json(tmp_path / "llava.json", recs), tmp_path / "out.json"
    wrong = tmp_path / "no_such_dir"
    assert llava_main(["--llava-json", src, "--image-dir", str(wrong), "--output", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: ") and str(wrong) in err and "missing_image=3" in err
    assert not out.exists()


# ---- item 16: no more workers than work or cores -------------------------------------
def test_effective_workers():
    cores = usable_cores()
    assert cores == len(os.sched_getaffinity(0))
    assert effective_workers(16, 1) == 1
    assert effective_workers(16, 1000) == min(16, cores)
    assert effective_workers(0, 1000) == 0
    assert effective_workers(2, 0) == 1
    assert effective_workers(8, 1000, cores=0) == 0  # no spare core: load in-process
    assert effective_workers(8, 1000, cores=3) == 3


def test_spare_cores_leave_the_computation_its_cores():
    cores = usable_cores()
    assert spare_cores() == cores  # on an accelerator, one process: every core
    assert spare_cores(computing_threads=cores) == 0  # CPU training on every core: no worker
    assert spare_cores(2, 0) == cores // 2  # two processes share the node
    assert spare_cores(2, 1) == max(0, cores - 2) // 2


def test_preprocessing_and_loader_workers_are_capped(env):
    root, model_dir = env
    ds_file = write_json(root / "few.json", [_rec(), _rec(image=False)])
    cfg = _cfg(root, model_dir, ds_file, "workers", preprocessing_num_workers=16)
    cfg.dataloader_param.num_workers = 64
    lines = []
    ds, _ = build_train_valid_datasets(cfg, progress=False, log=lines.append)
    assert any("preprocessing 2 samples with 1 worker process(es)" in x for x in lines), lines
    loader = build_dataloader(ds, cfg, pin_memory=False, log=lines.append)
    assert loader.num_workers == min(usable_cores(), 1)  # 2 samples, batch 2: one micro-batch
    assert any("loader uses 1 worker" in x for x in lines), lines


# ---- item 17: empty dataset, missing-image paths --------------------------------------
def test_empty_dataset_names_the_file(env):
    root, model_dir = env
    ds_file = write_json(root / "empty.json", [])
    with pytest.raises(UserError) as e:
        build_train_valid_datasets(_cfg(root, model_dir, ds_file, "empty"), progress=False, log=lambda *_: None)
    assert "empty.json" in str(e.value) and "no samples" in str(e.value) and "dropped" not in str(e.value)


def test_missing_image_path_is_not_joined_twice(env):
    root, model_dir = env
    rel = os.path.relpath(root)
    given = f"{rel}/img/nope.png"  # already under dataset_dir, as the guide writes paths
    rec = {**_rec(), "images": [given]}
    ds_file = write_json(root / "miss.json", [rec, _rec()])
    cfg = data_config_from_dict(data_config(model_dir, ds_file, str(root / "cache-miss"), rel))
    lines = []
    build_train_valid_datasets(cfg, progress=False, log=lines.append)
    line = next(x for x in lines if "missing_image" in x)
    assert repr(given) in line and f"{rel}/{rel}" not in line, line


# ---- item 10: model folder ------------------------------------------------------------
@pytest.mark.parametrize("case", ["missing", "no_tokenizer"])
def test_model_folder_errors_are_one_line(env, tmp_path, case):
    root, model_dir = env
    model = tmp_path / "model"
    if case == "no_tokenizer":
        model.mkdir()
        (model / "config.json").write_text("{}")
    ds_file = write_json(root / "one.json", [_rec()])
    cfg = _cfg(root, str(model), ds_file, f"model-{case}")
    with pytest.raises(UserError) as e:
        build_train_valid_datasets(cfg, progress=False, log=lambda *_: None)
    msg = str(e.value)
    assert "model_name_or_path" in msg and str(model) in msg and "\n" not in msg
    assert ("not found" if case == "missing" else "no tokenizer") in msg


# ---- item 3: --seq-length bounds variable-length batches -------------------------------
def test_longer_than_seq_length_dropped_and_counted(env):
    root, model_dir = env
    short, long_ = _rec(image=False, answer="ok"), _rec(image=False, answer="word " * 60)
    ds_file = write_json(root / "lens.json", [short, long_, short])
    cfg = _cfg(root, model_dir, ds_file, "lens")
    full, _ = build_train_valid_datasets(cfg, progress=False, log=lambda *_: None)
    lengths = sorted(len(full[i]["input_ids"]) for i in range(len(full)))
    bound = lengths[0]
    lines = []
    ds, _ = build_train_valid_datasets(cfg, progress=False, log=lines.append, max_seq_length=bound)
    assert len(ds) == 2 and all(len(ds[i]["input_ids"]) <= bound for i in range(2))
    assert "data: 2 usable samples of 3, dropped 1" in lines
    assert any("dropped 1 (longer_than_seq_length)" in x and "reusing" not in x for x in lines), lines
    with pytest.raises(UserError, match="longer_than_seq_length"):
        build_train_valid_datasets(cfg, progress=False, log=lambda *_: None, max_seq_length=bound - 1)


# ---- item 7: cheap full validation of data.json ------------------------------------------
def test_validate_data_json(env, tmp_path):
    root, model_dir = env
    ds_file = write_json(root / "val.json", [_rec()])
    good = data_config(model_dir, ds_file, str(tmp_path / "cache"), str(root))
    assert validate_data_json(write_json(tmp_path / "good.json", good)).dataset_param
    assert not (tmp_path / "cache").exists()  # nothing built

    def bad(edit, *words):
        d = json.loads(json.dumps(good))
        edit(d["dataset_param"])
        path = write_json(tmp_path / "bad.json", d)
        with pytest.raises(UserError) as e:
            validate_data_json(path)
        assert str(e.value).startswith(path) and "\n" not in str(e.value)
        for w in words:
            assert w in str(e.value)

    bad(lambda d: d["basic_parameters"].update(dataset="nope.json"), "dataset", "nope.json")
    bad(lambda d: d["basic_parameters"].update(dataset_dir=str(tmp_path / "gone")), "dataset_dir", "gone")
    bad(lambda d: d["preprocess_parameters"].update(model_name_or_path=str(tmp_path)), "no tokenizer")
    bad(lambda d: d["preprocess_parameters"].pop("model_name_or_path"), "model_name_or_path", "required")
    bad(lambda d: d["basic_parameters"].update(cutoff_len="10"), "cutoff_len")
