"""Mixed-precision recipes: ``--quant [NAME=]recipe:FILE``, one scheme per linear layer."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from conftest import make_tiny_llama
from evalsuite.errors import EvalsuiteError
from evalsuite.quantize import parse_scheme, parse_schemes, quantize_
from evalsuite.quantize.int4_wo import WeightOnlyInt4Linear
from evalsuite.quantize.int8_wo import WeightOnlyInt8Linear
from evalsuite.quantize.recipe import SCHEMA, RecipeConfig, bits_per_weight
from evalsuite.quantize.registry import describe

DOWN = "model.layers.*.mlp.down_proj"
Q0 = "model.layers.0.self_attn.q_proj"


def write(tmp_path, data, name="mix.json"):
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


def recipe(default="int4-wo-g32", layers=((DOWN, "int8-wo"), (Q0, "fp"))):
    return {"schema": SCHEMA, "default": default, "layers": [{"pattern": p, "scheme": s} for p, s in layers]}


def test_each_layer_takes_its_first_matching_rule_else_the_default(tmp_path):
    path = write(tmp_path, recipe(layers=((DOWN, "int8-wo"), (Q0, "fp"), ("model.layers.0.*", "int8-wo"))))
    config = parse_scheme(f"mix=recipe:{path}")
    assert isinstance(config, RecipeConfig) and config.name == "mix" and config.spec == f"recipe:{path.resolve()}"
    fp = make_tiny_llama(tie=False)
    q = quantize_(copy.deepcopy(fp), config)
    assert type(q.get_submodule(Q0)) is torch.nn.Linear  # "fp" comes before the block-0 rule
    assert isinstance(q.get_submodule("model.layers.0.mlp.down_proj"), WeightOnlyInt8Linear)
    assert isinstance(q.get_submodule("model.layers.0.self_attn.k_proj"), WeightOnlyInt8Linear)
    assert isinstance(q.get_submodule("model.layers.1.self_attn.k_proj"), WeightOnlyInt4Linear)
    assert type(q.lm_head) is torch.nn.Linear  # the head is not the recipe's


def test_a_layer_is_quantized_exactly_as_its_scheme_alone_would(tmp_path):
    """Per-layer dispatch over the built-in handlers: a recipe of int8-wo everywhere is int8-wo."""
    fp = make_tiny_llama(tie=False)
    ids = torch.randint(0, 256, (1, 16))
    mixed = quantize_(copy.deepcopy(fp), parse_scheme(f"recipe:{write(tmp_path, recipe('int8-wo', ()))}"))
    plain = quantize_(copy.deepcopy(fp), parse_scheme("int8-wo"))
    assert torch.equal(mixed(ids).logits, plain(ids).logits)


def test_results_record_the_recipe_its_sha256_and_bits_per_weight(tmp_path):
    import hashlib

    path = write(tmp_path, recipe())
    config = parse_scheme(f"recipe:{path}")
    q = quantize_(copy.deepcopy(make_tiny_llama(tie=False)), config)
    details = describe(config, q, torch.device("cpu"), torch.float32)
    assert details["recipe"]["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert json.loads(details["recipe"]["content"]) == recipe()
    assert details["recipe"]["layers_by_scheme"] == {"fp": 1, "int8-wo": 2, "int4-wo-g32": 11}
    # fp32 tiny model: int8 rows (64 or 128 wide) carry one fp32 scale, int4-g32 groups an fp32 scale + zero
    n = {"q": 64 * 64, "kv": 64 * 32, "o": 64 * 64, "mlp": 64 * 128}
    fp_bits, int8 = 32 * n["q"], 2 * (n["mlp"] * 8 + 64 * 32)
    int4_weights = n["q"] + 2 * (2 * n["kv"] + n["o"] + 2 * n["mlp"])  # q of block 1, the rest but down of both
    int4 = int4_weights * (4 + 2 * 32 / 32)
    total = n["q"] * 2 + n["kv"] * 4 + n["o"] * 2 + n["mlp"] * 6
    assert details["bits_per_weight"] == pytest.approx((fp_bits + int8 + int4) / total)
    # judged as its default scheme, whatever the user named it ("mix" alone matches only the catch-all)
    assert details["limits_as"] == "int4-wo-g32"
    from evalsuite.judge.config import load_gate_config

    assert load_gate_config().scheme("mix", details["limits_as"])[0] == "int4-* (as int4-wo-g32)"


def test_a_recipe_is_a_yaml_file_too(tmp_path):
    path = write(tmp_path, f"schema: {SCHEMA}\ndefault: int8-wo\nlayers:\n  - {{pattern: '{DOWN}', scheme: fp}}\n",
                 "r.yaml")
    assert parse_scheme(f"recipe:{path}").rules == ((DOWN, "fp"),)


@pytest.mark.parametrize("data,message", [
    (recipe(layers=((DOWN, "int3-magic"),)), "layers\\[0\\]: unknown quantization scheme 'int3-magic'"),
    (recipe(default="nope"), "default: unknown quantization scheme 'nope'"),
    ({**recipe(), "schema": "evalsuite.recipe/2"}, "schema 'evalsuite.recipe/2' is not supported"),
    ({"default": "int8-wo"}, "schema None is not supported"),
    (recipe(layers=((DOWN, "int8-wo+head"),)), "does not quantize the output head"),
    ({**recipe(), "layers": [{"pattern": DOWN}]}, "expected \\{pattern: GLOB, scheme: NAME\\}"),
])
def test_a_bad_recipe_is_refused_when_parsed(tmp_path, data, message):
    with pytest.raises(EvalsuiteError, match=message):
        parse_schemes(f"int8-wo,recipe:{write(tmp_path, data)}")


def test_an_unreadable_or_malformed_recipe_is_one_line(tmp_path):
    with pytest.raises(EvalsuiteError, match="cannot read the recipe"):
        parse_scheme(f"recipe:{tmp_path / 'missing.json'}")
    with pytest.raises(EvalsuiteError, match="not valid JSON"):
        parse_scheme(f"recipe:{write(tmp_path, '{', 'bad.json')}")


def test_a_pattern_matching_no_layer_is_refused_when_quantizing(tmp_path):
    config = parse_scheme(f"recipe:{write(tmp_path, recipe(layers=(('model.layers.9.*', 'fp'),)))}")
    with pytest.raises(EvalsuiteError, match="pattern model.layers.9.\\* matches no quantized linear layer"):
        quantize_(copy.deepcopy(make_tiny_llama()), config)


def test_bits_per_weight_of_plain_schemes():
    from evalsuite.quantize.recipe import linear_layers

    fp = make_tiny_llama(tie=False)
    layers = linear_layers(fp)
    assert bits_per_weight(fp, layers) == 32
    q = quantize_(copy.deepcopy(fp), parse_scheme("int4-wo-g32"))
    assert bits_per_weight(q, layers) == pytest.approx(4 + 2 * 32 / 32)


def tiny_model_dir(tmp_path, tokenizer):
    """A tiny random Llama saved as a Hugging Face folder with SmolLM2's tokenizer."""
    from safetensors.torch import save_model

    model_dir = tmp_path / "tiny"
    model = make_tiny_llama(vocab_size=len(tokenizer), tie=False)
    model.config.save_pretrained(model_dir)
    save_model(model, str(model_dir / "model.safetensors"))
    tokenizer.save_pretrained(model_dir)
    return model_dir


def test_cli_runs_a_recipe_variant_in_the_ppl_and_speed_stages(tmp_path, monkeypatch, smollm2):
    from evalsuite.commands.cli import main
    from evalsuite.results import Results

    model_dir = tiny_model_dir(tmp_path, smollm2.tokenizer)
    path = write(tmp_path, recipe())
    out = tmp_path / "out"
    argv = ["run", "--model", str(model_dir), "--quant", f"mix=recipe:{path}", "--stages", "ppl,speed", "--device",
            "cpu", "--limit", "2", "--ppl-context", "64", "--ppl-windows", "4", "--no-progress", "--threads", "1",
            "--no-history", "--out", str(out)]
    monkeypatch.setattr("sys.argv", ["evalsuite", *argv])
    assert main(argv) == 0
    results = Results.load(out / "results.json")
    assert results.run["quant_specs"] == {"mix": f"recipe:{path.resolve()}"}
    assert results.run["quant_details"]["mix"]["recipe"]["layers_by_scheme"]["int8-wo"] == 2
    assert results.find(stage="ppl", variant="mix", metric="kld_mean")
    assert results.find(stage="speed", variant="mix", metric="tokens_per_s")


def test_cli_refuses_a_bad_recipe_before_the_model_loads(tmp_path, monkeypatch, capsys):
    from evalsuite.commands.cli import main

    path = write(tmp_path, recipe(layers=((DOWN, "int3-magic"),)))
    argv = ["run", "--model", str(tmp_path / "no-model-here"), "--quant", f"recipe:{path}", "--stages", "ppl",
            "--out", str(tmp_path / "out")]
    monkeypatch.setattr("sys.argv", ["evalsuite", *argv])
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "int3-magic" in err and "Traceback" not in err


def test_cli_a_recipe_pattern_matching_no_layer_is_one_line_exit_2(tmp_path, monkeypatch, capsys, smollm2):
    """A recipe whose pattern names no layer of the model (a recipe written for another model): one
    line naming the pattern, usage error, no results written as if measured."""
    from evalsuite.commands.cli import main

    path = write(tmp_path, recipe(layers=(("model.layers.9.*", "int8-wo"),)))
    out = tmp_path / "out"
    argv = ["run", "--model", str(tiny_model_dir(tmp_path, smollm2.tokenizer)), "--quant", f"mix=recipe:{path}",
            "--stages", "ppl", "--device", "cpu", "--limit", "2", "--ppl-context", "64", "--no-progress",
            "--threads", "1", "--no-history", "--out", str(out)]
    monkeypatch.setattr("sys.argv", ["evalsuite", *argv])
    assert main(argv) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and "pattern model.layers.9.* matches no quantized linear layer" in err[0]
    assert "Traceback" not in err[0]
