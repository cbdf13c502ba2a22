"""Recipes: validation names the key and the allowed values; a recipe runs end to end on real MNIST."""

from __future__ import annotations

import pytest
import torch
import yaml

from deepshrink import cli
from deepshrink.compress.prune import sparsity_report
from deepshrink.compress.train import evaluate
from deepshrink.errors import DeepShrinkError
from deepshrink.fileformat.model_io import load, read
from deepshrink.models import lenet_300_100
from deepshrink.recipes import builtin_recipes, load_recipe, parse_recipe, run_recipe
from deepshrink.recipes.runner import recipe_data
from deepshrink.recipes.schema import EncodeStage, PruneStage, ShareStage

pytestmark = pytest.mark.usefixtures("one_thread")


def _recipe(*stages: dict, **top: object) -> dict:
    return {"model": "lenet-300-100", "data": "mnist", "stages": list(stages), **top}


@pytest.mark.parametrize(
    "raw, message",
    [
        (_recipe({"prune": {"sparsty": 0.9}}), "stages[0].prune: unknown key 'sparsty'; allowed: epochs, lr"),
        (_recipe({"prune": {"sparsity": 1.0}}), "stages[0].prune: sparsity=1.0 must be a number in [0, 1)"),
        (_recipe({"prune": {"sparsity": {"fc1": "lots"}}}), "sparsity[fc1]='lots' must be a number in [0, 1)"),
        (
            _recipe({"prune": {"sparsity": 0.5, "granularity": "row"}}),
            "granularity='row' must be one of fine, vector, kernel, filter, channel",
        ),
        (
            _recipe({"prune": {"sparsity": 0.5, "schedule": "cubic"}}),
            "schedule='cubic' must be one of iterative, gradual",
        ),
        (_recipe({"prune": {"sparsity": 0.5, "quality": 1.0}}), "give exactly one of sparsity"),
        (_recipe({"prune": {"quality": 1.0, "schedule": "gradual"}}), "quality works with schedule: iterative"),
        (_recipe({"prune": {"sparsity": {"fc1": 0.5}, "scope": "global"}}), "scope: global needs"),
        (_recipe({"prune": {"sparsity": 0.5, "steps": 0}}), "steps=0 must be an integer >= 1"),
        (_recipe({"share": {"bits": 17}}), "stages[0].share: bits=17 must be an integer >= 1 and <= 16"),
        (_recipe({"share": {"bits": {"fc1": 2.5}}}), "bits[fc1]=2.5 must be an integer"),
        (_recipe({"share": {"init": "zeros"}}), "init='zeros' must be one of linear, density, random, kmeans++"),
        (_recipe({"train": {"lr": 0}}), "stages[0].train: lr=0 must be a number > 0"),
        (_recipe({"train": {"optimizer": "lbfgs"}}), "optimizer='lbfgs' must be one of sgd, adam"),
        (_recipe({"train": {"augment": {"flip": 1}}}), "stages[0].train: augment: unknown key 'flip'; allowed: shift"),
        (_recipe({"prune": {"sparsity": 0.5, "augment": {"shift": -1}}}), "augment: shift=-1 must be a number in [0"),
        (_recipe({"train": {}}, holdout=-5), "holdout=-5 must be an integer >= 0"),
        (_recipe({"encode": {"coder": "zip"}}), "coder='zip' must be one of"),
        (_recipe({"encode": {"array_dtype": "int8"}}), "array_dtype='int8' must be one of float32, float16"),
        (_recipe({"encode": {}}, {"train": {}}), "encode must be the last stage"),
        (_recipe({"shrink": {}}), "stages[0]: unknown stage 'shrink'; allowed: train, prune, share"),
        (_recipe({"train": {}, "share": {}}), "stages[0] must be a mapping with one key"),
        (_recipe({"train": [1]}), "stages[0].train must be a mapping of settings"),
        (_recipe({"train": {}}, data="cifar"), "data='cifar' must be one of mnist, digits"),
        (_recipe({"train": {}}, epochs=3), "recipe: unknown key 'epochs'; allowed: model, stages"),
        (_recipe(), "stages must be a non-empty list"),
        ({"stages": [{"train": {}}]}, "give exactly one of model (a factory to build) or pretrained"),
        ([1, 2], "a recipe must be a mapping"),
    ],
)
def test_bad_recipes_name_the_key_and_the_allowed_values(raw, message):
    with pytest.raises(DeepShrinkError) as err:
        parse_recipe(raw)
    assert message in str(err.value)


def test_values_are_parsed_into_typed_stages():
    recipe = parse_recipe(
        _recipe(
            {"prune": {"sparsity": {"fc1": 0.9, "fc*": "0.5"}, "granularity": {"fc1": "filter"}, "lr": "1e-3"}},
            {"share": {"bits": {"fc": 4}}},
            {"encode": {"coder": "ans", "index_bits": 4, "array_dtype": "float16"}},
        )
    )
    prune, share, encode = recipe.stages
    assert isinstance(prune, PruneStage) and prune.sparsity == {"fc1": 0.9, "fc*": 0.5} and prune.lr == 0.001
    assert isinstance(share, ShareStage) and share.bits == {"fc": 4}
    assert isinstance(encode, EncodeStage) and encode.options()["coder"] == "ans"
    assert encode.options()["array_dtype"] == "float16"


def test_builtin_recipes_load_and_bad_files_are_reported(tmp_path):
    assert {"lenet-300-100", "lenet-5", "digits-demo"} <= set(builtin_recipes())
    for name in builtin_recipes():
        assert load_recipe(name).stages
    broken = tmp_path / "broken.yaml"
    broken.write_text("model: [unclosed\n")
    with pytest.raises(DeepShrinkError, match="not valid YAML"):
        load_recipe(broken)
    with pytest.raises(DeepShrinkError, match="neither a file nor a built-in recipe; built-ins: digits-demo"):
        load_recipe(tmp_path / "missing.yaml")


def test_yaml_tags_are_never_executed(tmp_path):
    evil = tmp_path / "evil.yaml"
    evil.write_text("model: !!python/object/apply:os.system ['echo hacked']\nstages: [{train: {}}]\n")
    with pytest.raises(DeepShrinkError, match="not valid YAML"):
        load_recipe(evil)


def test_holdout_trains_without_the_last_examples_and_measures_on_them():
    full_train, test = recipe_data(parse_recipe(_recipe({"train": {}}, data="digits")), None)
    train, held = recipe_data(parse_recipe(_recipe({"train": {}}, data="digits", holdout=100)), None)
    assert len(train[1]) == len(full_train[1]) - 100 and not torch.equal(held[0], test[0][:100])
    torch.testing.assert_close(torch.cat([train[0], held[0]]), full_train[0])
    torch.testing.assert_close(torch.cat([train[1], held[1]]), full_train[1])
    with pytest.raises(DeepShrinkError, match="holdout=5000 must be below the"):
        recipe_data(parse_recipe(_recipe({"train": {}}, data="digits", holdout=5000)), None)


def test_cli_seed_applies_to_a_recipe(tmp_path, capsys):
    def run(seed: str | None, name: str) -> bytes:
        out = tmp_path / name
        args = ["compress", "--recipe", "digits-demo", "--max-steps", "4", "--out", str(out)]
        assert cli.main(args + (["--seed", seed] if seed else [])) == 0
        return out.read_bytes()

    default, one, again = run(None, "default.dsz"), run("1", "one.dsz"), run("1", "again.dsz")
    assert read(tmp_path / "default.dsz").metadata["seed"] == load_recipe("digits-demo").seed
    assert read(tmp_path / "one.dsz").metadata["seed"] == 1
    assert one == again and one != default  # the seed changed the training, and repeats it
    assert cli.main(["compress", "--recipe", "digits-demo", "--seed", "-1"]) == 2
    assert "seed=-1 must be an integer >= 0" in capsys.readouterr().err


def test_gradual_filter_recipe_runs_on_mnist_and_the_file_reloads(trained_lenet300, data_root, tmp_path):
    recipe = parse_recipe(
        _recipe(
            {
                "prune": {
                    "sparsity": {"fc1": 0.9, "fc2": 0.8},
                    "schedule": "gradual",
                    "every": 10,
                    "epochs": 0.15,
                    "granularity": {"fc2": "channel"},
                    "lr": 0.01,
                }
            },
            {"share": {"bits": 5, "epochs": 0.05, "lr": 0.005}},
            {"encode": {"coder": "huffman", "index_bits": 5}},
            batch_size=128,
        )
    )
    out = tmp_path / "lenet.dsz"
    result = run_recipe(recipe, model=trained_lenet300, data_dir=str(data_root), out=str(out))
    model = result["model"]
    assert result["accuracy"] > 0.93, result["stages"]
    kept = {r.name: r.kept_fraction for r in sparsity_report(model)}
    assert kept["fc1.weight"] == pytest.approx(0.1, abs=0.002) and kept["fc3.weight"] == 1.0
    fc2 = model.fc2.weight
    assert ((fc2 != 0).any(0).float().mean()).item() == pytest.approx(0.2, abs=0.01)  # whole input columns went
    assert out.stat().st_size == result["bytes"] < 60_000
    loaded = load(out)
    x = torch.rand(16, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model.eval()(x))


def test_cli_compress_recipe_writes_the_file(tmp_path, data_root):
    torch.manual_seed(0)
    state = tmp_path / "dense.pt"
    torch.save(lenet_300_100().state_dict(), state)
    path = tmp_path / "r.yaml"
    path.write_text(
        yaml.safe_dump(
            _recipe(
                {"train": {"epochs": 1, "lr": 0.05}},
                {"prune": {"quality": 0.5, "steps": 2, "epochs": 0.1}},
                {"share": {"bits": 4, "epochs": 0}},
                batch_size=256,
            )
        )
    )
    out = tmp_path / "r.dsz"
    assert (
        cli.main(
            [
                "compress",
                "--recipe",
                str(path),
                "--data-dir",
                str(data_root),
                "--out",
                str(out),
                "--state-dict",
                str(state),
                "--max-steps",
                "60",
            ]
        )
        == 0
    )
    model = load(out)
    from deepshrink.data.mnist import load_mnist

    assert evaluate(model, load_mnist(data_root, "test")) > 0.85
    assert cli.main(["compress", "--recipe", str(tmp_path / "nope.yaml")]) == 2


def test_a_factory_outside_deepshrink_models_needs_trust():
    recipe = parse_recipe(
        {"model": "os:system", "model_kwargs": {"command": "echo hacked"}, "data": "digits", "stages": [{"train": {}}]}
    )
    with pytest.raises(DeepShrinkError, match="importing it runs its code"):
        run_recipe(recipe)
    trusted = parse_recipe(
        {
            "model": "deepshrink.models.lenet:lenet_300_100",
            "model_kwargs": {"in_features": 64},
            "data": "digits",
            "max_steps": 2,
            "stages": [{"train": {}}],
        }
    )
    with pytest.raises(DeepShrinkError, match="deepshrink.models.lenet:lenet_300_100"):
        run_recipe(trusted)
    assert run_recipe(trusted, trust_factory=True)["stages"][0]["stage"] == "0: train"


def test_one_shot_stages_and_distillation_run_from_a_recipe(tmp_path):
    recipe = parse_recipe(
        {
            "model": "lenet-300-100",
            "model_kwargs": {"in_features": 64},
            "data": "digits",
            "seed": 0,
            "calibration": {"samples": 512, "batch_size": 64},
            "stages": [
                {"train": {"epochs": 10, "lr": 0.05}},
                {"prune": {"method": "sparsegpt", "sparsity": {"fc1": 0.8, "fc2": 0.7}, "epochs": 0}},
                {"share": {"method": "calibrated", "bits": 3, "epochs": 0}},
                {"distill": {"steps": 40, "lr": 0.001, "hidden": ["fc2"]}},
                {"encode": {"coder": "ans"}},
            ],
        }
    )
    out = tmp_path / "digits.dsz"
    result = run_recipe(recipe, out=str(out))
    assert [r["stage"] for r in result["stages"]] == ["0: train", "1: prune", "2: share", "3: distill"]
    trained = result["stages"][0]["accuracy"]
    assert trained > 0.9 and result["accuracy"] > trained - 0.05, result["stages"]
    kept = {r.name: r.kept_fraction for r in sparsity_report(result["model"])}
    assert kept["fc1.weight"] == pytest.approx(0.2, abs=0.01) and kept["fc3.weight"] == 1.0
    x = torch.rand(8, 64)
    with torch.no_grad():
        torch.testing.assert_close(load(out)(x), result["model"].eval()(x))


def test_stages_that_need_labels_say_so_and_one_shot_settings_are_checked():
    with pytest.raises(DeepShrinkError, match="method: wanda prunes once"):
        parse_recipe(_recipe({"prune": {"method": "wanda", "sparsity": 0.5, "schedule": "gradual"}}))
    with pytest.raises(DeepShrinkError, match="epochs"):
        parse_recipe(_recipe({"prune": {"sparsity": 0.5, "epochs": 0}}))  # magnitude pruning retrains
    assert parse_recipe(_recipe({"prune": {"method": "wanda", "sparsity": 0.5, "epochs": 0}})).stages[0].epochs == 0
    with pytest.raises(DeepShrinkError, match="give exactly one of model"):
        parse_recipe({"model": "lenet-5", "pretrained": "x", "stages": [{"train": {}}]})
    with pytest.raises(DeepShrinkError, match="stages\\[0\\].distill: steps=0"):
        parse_recipe(_recipe({"distill": {"steps": 0}}))


def test_a_device_that_is_not_here_is_named():
    recipe = parse_recipe(_recipe({"train": {}}, data="digits", model_kwargs={"in_features": 64}, max_steps=1))
    with pytest.raises(DeepShrinkError, match="is not a device"):
        run_recipe(recipe, device="gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(DeepShrinkError, match="no CUDA device here"):
            run_recipe(recipe, device="cuda")
    assert run_recipe(recipe, device="cpu")["stages"][0]["stage"] == "0: train"
