"""The user's own quantization: handler files and modules, torchao configs, pre-quantized checkpoints.

Mechanics run ``evalsuite run`` on a tiny random Llama that shares SmolLM2's tokenizer; the
torchao-vs-int8-wo comparison runs on SmolLM2 itself. A planted bug (one layer's scales doubled)
must fail the gate and be named, in a handler and in a checkpoint carrying it.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

from evalsuite.commands.cli import main
from evalsuite.errors import EvalsuiteError
from evalsuite.quantize import parse_scheme, parse_schemes
from evalsuite.quantize.spec import split_top_level
from evalsuite.results import Results
from tests.conftest import REPO, make_tiny_llama

EXAMPLE = REPO / "examples" / "int8_handler.py"
HANDLER = f"{EXAMPLE}:WeightOnlyInt8QuantHandler"
BAD = "model.layers.1.self_attn.v_proj"
HAVE_TORCHAO = importlib.util.find_spec("torchao") is not None
needs_torchao = pytest.mark.skipif(not HAVE_TORCHAO, reason="torchao not installed (pip install evalsuite[torchao])")

BUGGY = f'''
from int8_handler import WeightOnlyInt8QuantHandler

class DoubledScales(WeightOnlyInt8QuantHandler):
    """The planted bug: one layer's scales off by 2x."""
    def create_quantized_state_dict(self):
        sd = super().create_quantized_state_dict()
        sd["{BAD}.scales"] = sd["{BAD}.scales"] * 2
        return sd
'''


def save_hf(model: nn.Module, tokenizer, folder: Path) -> Path:
    from safetensors.torch import save_model

    folder.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(folder)
    save_model(model, str(folder / "model.safetensors"))
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module", autouse=True)
def _no_weight_loading_bars():
    """In a real run ``--no-progress`` disables them before transformers is imported; here it is
    imported already, so the one-line checks would see its bar."""
    from transformers.utils import logging

    logging.disable_progress_bar()
    yield
    logging.enable_progress_bar()


@pytest.fixture(scope="module")
def tokenizer(smollm2):
    return smollm2.tokenizer


@pytest.fixture(scope="module")
def tiny_dir(tokenizer, tmp_path_factory) -> Path:
    return save_hf(make_tiny_llama(vocab_size=len(tokenizer), layers=2), tokenizer, tmp_path_factory.mktemp("tiny"))


@pytest.fixture
def buggy_handler(tmp_path) -> str:
    shutil.copy(EXAMPLE, tmp_path / "int8_handler.py")
    (tmp_path / "buggy.py").write_text(BUGGY)
    return f"{tmp_path / 'buggy.py'}:DoubledScales"


def run(model: Path, out: Path, data_dir: Path, *extra: str) -> int:
    return main(["run", "--model", str(model), "--device", "cpu", "--data-dir", str(data_dir), "--out", str(out),
                 "--no-progress", "--no-history", "--limit", "2", "--ppl-context", "128", "--layer-tokens", "128",
                 "--layer-seq-len", "64", *extra])


def bless(blessed_out: Path, baselines: Path) -> None:
    """The user's flow: the honest variant's run becomes the baseline its later runs are gated on."""
    assert main(["baseline", "update", str(blessed_out / "results.json"), "--baselines", str(baselines),
                 "--allow-partial"]) == 0


def regression_against_baseline(results: Results, variant: str) -> dict:
    """The gated baseline check that pages on ``variant`` (a layer's SQNR is reported, not gated: the
    damage it does is gated through the paired KLD against the blessed baseline)."""
    failing = [v for v in results.verdicts if v.get("failing") and v.get("variant") == variant]
    assert failing and all(v["kind"] == "baseline" and v["stage"] == "ppl" for v in failing), results.verdicts
    return failing[0]


def verdict(results: Results, check: str) -> dict:
    return next(v for v in results.verdicts if v["check"] == check)


def value(results: Results, stage: str, variant: str, metric: str, task: str | None = None) -> float:
    found = results.find(stage, task, variant, metric)
    assert len(found) == 1, (variant, metric, found)
    return found[0].value


# --- the spec grammar ------------------------------------------------------------------------------


def test_commas_inside_arguments_do_not_split_entries():
    assert split_top_level("int8-wo, a=x.py:F(a=1, b=(2, 3)), torchao:C(s='x,y')") == [
        "int8-wo", "a=x.py:F(a=1, b=(2, 3))", "torchao:C(s='x,y')"]


def test_variant_names_default_to_the_spec_and_are_filesystem_safe():
    assert parse_scheme(HANDLER).name == "int8_handler.WeightOnlyInt8QuantHandler"
    assert parse_scheme("examples.int8_handler:quantize_int8").name == "int8_handler.quantize_int8"
    assert parse_scheme(f"mine={HANDLER}").name == "mine"
    assert parse_scheme("int8=int8-wo").name == "int8"
    assert parse_schemes("int8-wo,none2=int8-wo")[1].name == "none2"
    if HAVE_TORCHAO:
        cfg = parse_scheme("torchao:Int8WeightOnlyConfig(version=2)+head")
        assert cfg.name == "torchao.Int8WeightOnlyConfig-version2+head" and cfg.include_head
    for bad in ("fp=int8-wo", "a@b=int8-wo", "a/b=int8-wo"):
        with pytest.raises(EvalsuiteError):
            parse_scheme(bad)
    with pytest.raises(EvalsuiteError, match="given twice"):
        parse_schemes(f"{HANDLER},{HANDLER}")


def test_spec_keywords_are_literals_and_never_evaluated(tmp_path):
    marker = tmp_path / "pwned"
    with pytest.raises(EvalsuiteError, match="not a Python literal"):
        parse_scheme(f"{HANDLER}(filter_fn=__import__('os').system('touch {marker}'))")
    with pytest.raises(EvalsuiteError, match="must be keywords"):
        parse_scheme(f"{HANDLER}(64)")
    assert not marker.exists()


# --- handler files: the seed re-implemented outside evalsuite ---------------------------------------


@pytest.mark.slow
def test_example_handler_equals_builtin_int8_wo(tiny_dir, data_dir, tmp_path):
    """Class form, function form and module form of examples/int8_handler.py give the built-in
    int8-wo's KLD, perplexity and layer errors to float precision."""
    out = tmp_path / "run"
    quant = f"int8-wo,{HANDLER},fn={EXAMPLE}:quantize_int8,mod=examples.int8_handler:WeightOnlyInt8QuantHandler"
    assert run(tiny_dir, out, data_dir, "--quant", quant, "--stages", "ppl,layers") == 0
    results = Results.load(out / "results.json")
    handlers = ["int8_handler.WeightOnlyInt8QuantHandler", "fn", "mod"]
    assert results.run["quantized_layers"] == {"int8-wo": 14, **{h: 14 for h in handlers}}
    assert results.run["quant_specs"]["fn"] == f"{EXAMPLE}:quantize_int8"
    for metric in ("kld_mean", "token_ppl", "word_ppl", "ppl_ratio"):
        ref = value(results, "ppl", "int8-wo", metric)
        assert ref > 0
        for h in handlers:
            assert value(results, "ppl", h, metric) == pytest.approx(ref, rel=1e-9, abs=1e-12), (h, metric)
    for metric in ("weight_sqnr_db", "output_sqnr_db"):
        ref = value(results, "layers", "int8-wo", metric, BAD)
        for h in handlers:
            assert value(results, "layers", h, metric, BAD) == pytest.approx(ref, rel=1e-9)
    assert verdict(results, f"layers/{handlers[0]}/sqnr")["verdict"] == "PASS"


@pytest.mark.slow
def test_planted_bug_in_a_handler_fails_the_gate_and_names_the_layer(tiny_dir, data_dir, tmp_path, buggy_handler):
    baselines = tmp_path / "baselines"
    PAIRED = ("--baselines", str(baselines), "--limit", "8")  # windows enough for the paired t over windows
    assert run(tiny_dir, tmp_path / "blessed", data_dir, "--quant", f"int8-wo,bug={HANDLER}", "--stages", "ppl,layers",
               *PAIRED) == 0
    bless(tmp_path / "blessed", baselines)
    out = tmp_path / "run"
    code = run(tiny_dir, out, data_dir, "--quant", f"int8-wo,bug={buggy_handler}", "--stages", "ppl,layers", *PAIRED)
    assert code == 1
    results = Results.load(out / "results.json")
    regression_against_baseline(results, "bug")
    assert not [v for v in results.verdicts if v.get("failing") and v.get("variant") != "bug"]  # no false alarm
    assert verdict(results, "layers/int8-wo/sqnr")["verdict"] == "PASS"
    named = verdict(results, "layers/bug/sqnr")
    assert named["verdict"] == "WORSE" and named["task"] == BAD
    assert results.get("layers", "all", "bug", "layers_under_threshold").extra["under_threshold"] == [BAD]


def dequantized_copy(fp: nn.Module, handler_cls) -> nn.Module:
    """What a float checkpoint of ``handler_cls``'s output holds: each layer's effective weight."""
    q = copy.deepcopy(fp)
    handler = handler_cls(q, lambda m, fqn: isinstance(m, nn.Linear) and fqn != "lm_head")
    sd = handler.create_quantized_state_dict()
    handler.convert_for_runtime()
    q.load_state_dict(sd, assign=True)
    out = copy.deepcopy(fp)
    with torch.no_grad():
        for name, mod in q.named_modules():
            if hasattr(mod, "scales"):
                out.get_submodule(name).weight.copy_(mod.dequantize())
    return out


@pytest.mark.slow
def test_checkpoint_with_the_same_bug_fails_the_gate_and_names_the_layer(tiny_dir, data_dir, tmp_path, tokenizer,
                                                                         buggy_handler):
    from transformers import AutoModelForCausalLM

    from evalsuite.quantize.user import resolve
    from evalsuite.quantize.spec import parse_reference

    fp = AutoModelForCausalLM.from_pretrained(tiny_dir).eval()
    doubled = resolve(parse_reference(buggy_handler.split(":")[0] + ":DoubledScales"))
    honest = save_hf(dequantized_copy(fp, doubled.__mro__[1]), tokenizer, tmp_path / "honest")
    bug = save_hf(dequantized_copy(fp, doubled), tokenizer, tmp_path / "bug")
    baselines = tmp_path / "baselines"
    PAIRED = ("--baselines", str(baselines), "--limit", "8")  # windows enough for the paired t over windows
    assert run(tiny_dir, tmp_path / "blessed", data_dir, "--variant-model", f"honest={honest}",
               "--variant-model", f"bug={honest}", "--stages", "ppl,layers", *PAIRED) == 0
    bless(tmp_path / "blessed", baselines)
    out = tmp_path / "run"
    code = run(tiny_dir, out, data_dir, "--variant-model", f"honest={honest}", "--variant-model", f"bug={bug}",
               "--stages", "ppl,layers", *PAIRED)
    assert code == 1
    regression_against_baseline(Results.load(out / "results.json"), "bug")
    results = Results.load(out / "results.json")
    assert results.run["schemes"] == ["honest", "bug"]  # --quant defaults to none with --variant-model
    assert results.run["quantized_layers"] == {"honest": 14, "bug": 14}
    assert results.run["variant_models"]["bug"]["format"] == "hf"
    assert verdict(results, "layers/honest/sqnr")["verdict"] == "PASS"
    failed = verdict(results, "layers/bug/sqnr")
    assert failed["verdict"] == "WORSE" and failed["task"] == BAD
    assert value(results, "layers", "bug", "weight_sqnr_db", BAD) < 1.0  # 2w against w: 0 dB
    assert value(results, "ppl", "bug", "kld_mean") > value(results, "ppl", "honest", "kld_mean")


# --- torchao -------------------------------------------------------------------------------------


@needs_torchao
@pytest.mark.slow
def test_torchao_config_runs_through_quantize_with_the_head_policy(tiny_dir, data_dir, tmp_path):
    out = tmp_path / "run"
    code = run(tiny_dir, out, data_dir, "--quant", "torchao:Int8WeightOnlyConfig,head=torchao:Int8WeightOnlyConfig+head",
               "--stages", "layers")
    assert code == 4  # a layers-only run gates nothing (INCOMPLETE, no verdict); its records are the point here
    results = Results.load(out / "results.json")
    assert results.run["quantized_layers"] == {"torchao.Int8WeightOnlyConfig": 14, "head": 15}
    # weight SQNR through the tensor subclass's dequantize(): int8 per channel sits near 40 dB
    assert 30 < value(results, "layers", "head", "weight_sqnr_db", "lm_head") < 60
    assert results.find("layers", "lm_head", "torchao.Int8WeightOnlyConfig", "weight_sqnr_db") == []


@needs_torchao
def test_torchao_config_without_a_cpu_kernel_is_one_line_before_the_model_loads(tiny_dir, tmp_path, capsys):
    if importlib.util.find_spec("mslk") is not None:
        pytest.skip("mslk is installed: torchao's int4 may have a kernel here")
    out = tmp_path / "run"
    # a packing format given is never replaced by one that runs: its failure is the answer
    code = main(["run", "--model", str(tiny_dir), "--device", "cpu", "--quant",
                 "torchao:Int4WeightOnlyConfig(group_size=128, int4_packing_format='plain')",
                 "--stages", "none", "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert "Int4WeightOnlyConfig cannot run on cpu" in err[0] and "mslk" in err[0]
    assert not (out / "results.json").exists()


def _fake_probe(runs: set[str]):
    """A probe that passes only for the packing formats in ``runs`` (as where mslk is missing)."""
    def probe(cfg, device, dtype):
        fmt = getattr(cfg.config, "int4_packing_format", "opaque")
        return None if getattr(fmt, "value", fmt) in runs else ImportError("Requires mslk >= 1.0.0")
    return probe


@needs_torchao
def test_torchao_int4_without_a_packing_format_takes_the_one_that_runs_on_the_device(monkeypatch):
    from evalsuite.quantize import torchao_config
    from evalsuite.quantize.registry import check_runs_on, packing_note

    cuda = torch.device("cuda")
    monkeypatch.setattr(torchao_config, "_probe", _fake_probe({"tile_packed_to_4d"}))
    [cfg] = check_runs_on([parse_scheme("torchao:Int4WeightOnlyConfig(group_size=128)")], cuda, torch.bfloat16)
    assert cfg.config.int4_packing_format == "tile_packed_to_4d" and cfg.config.group_size == 128
    assert cfg.details["int4_packing_format"] == "tile_packed_to_4d"
    assert "Requires mslk" in cfg.details["why"]
    assert packing_note(cfg).startswith("--quant torchao:Int4WeightOnlyConfig(group_size=128): "
                                        "int4_packing_format=tile_packed_to_4d (the default packing 'plain'")
    # a default that runs is kept, and nothing is noted
    monkeypatch.setattr(torchao_config, "_probe", _fake_probe({"plain", "tile_packed_to_4d"}))
    [kept] = check_runs_on([parse_scheme("torchao:Int4WeightOnlyConfig")], cuda, torch.bfloat16)
    assert kept.config.int4_packing_format == "plain" and packing_note(kept) is None
    assert kept.details == {"limits_as": "int4-wo-g128"}  # nothing chosen; held to int4-wo-g128's limits
    # an explicit packing format is never overridden
    monkeypatch.setattr(torchao_config, "_probe", _fake_probe({"tile_packed_to_4d"}))
    with pytest.raises(EvalsuiteError, match="cannot run on cuda in bfloat16") as e:
        check_runs_on([parse_scheme("torchao:Int4WeightOnlyConfig(int4_packing_format='preshuffled')")], cuda,
                      torch.bfloat16)
    assert "tried" not in str(e.value)
    # nothing runs: one line naming the default's failure and each packing tried
    monkeypatch.setattr(torchao_config, "_probe", _fake_probe(set()))
    with pytest.raises(EvalsuiteError, match="Requires mslk.*tried int4_packing_format tile_packed_to_4d"):
        check_runs_on([parse_scheme("torchao:Int4WeightOnlyConfig")], cuda, torch.bfloat16)
    # another config is never given a packing
    with pytest.raises(EvalsuiteError, match="Int8WeightOnlyConfig cannot run") as e:
        check_runs_on([parse_scheme("torchao:Int8WeightOnlyConfig")], cuda, torch.bfloat16)
    assert "tried" not in str(e.value)


@needs_torchao
@pytest.mark.gpu
def test_gpu_torchao_int4_readme_example_runs_as_written():
    """The README's torchao int4 example on a GPU without mslk: tile_packed_to_4d, in bfloat16."""
    from evalsuite.quantize.registry import check_runs_on

    [cfg] = check_runs_on([parse_scheme("torchao:Int4WeightOnlyConfig(group_size=128)")], torch.device("cuda"),
                          torch.bfloat16)
    if importlib.util.find_spec("mslk") is None:
        assert cfg.details["int4_packing_format"] == "tile_packed_to_4d"


@needs_torchao
@pytest.mark.slow
def test_torchao_int4_runs_on_cpu_through_the_opaque_packing_and_says_so(tiny_dir, data_dir, tmp_path, capsys):
    """torchao 0.18 has no CPU kernel for Int4WeightOnlyConfig's packings; its CPU tinygemm layout
    (Int4OpaqueTensor) does: the README's int4 example runs here as written, noted and recorded."""
    if importlib.util.find_spec("mslk") is not None:
        pytest.skip("mslk is installed: the default packing may run here")
    out = tmp_path / "run"
    code = run(tiny_dir, out, data_dir, "--quant", "ao=torchao:Int4WeightOnlyConfig(group_size=32)", "--stages", "ppl")
    assert code in (0, 1)
    notes = [line for line in capsys.readouterr().err.splitlines() if "int4_packing_format=" in line]
    assert len(notes) == 1 and "int4_packing_format=opaque" in notes[0]
    results = Results.load(out / "results.json")
    details = results.run["quant_details"]["ao"]
    assert details["int4_packing_format"] == "opaque"
    assert details["torchao_config"].endswith("PrototypeInt4WeightOnlyConfig")
    assert results.run["quantized_layers"]["ao"] == 14
    # int4 at group 32 on a random model: close to fp, but not fp
    assert 0 < value(results, "ppl", "ao", "kld_mean", "wikitext2") < 0.05


@needs_torchao
@pytest.mark.slow
def test_smollm2_torchao_int8_kld_is_within_30_percent_of_builtin_int8_wo(smollm2_path, data_dir, tmp_path):
    """Real model, short run: the example handler equals int8-wo; torchao rounds differently but its
    KLD must be the same order (within ±30%)."""
    out = tmp_path / "run"
    code = main(["run", "--model", str(smollm2_path), "--device", "cpu", "--data-dir", str(data_dir), "--out", str(out),
                 "--no-progress", "--no-history", "--stages", "ppl", "--limit", "1", "--ppl-context", "512",
                 "--quant", f"int8-wo,seed={HANDLER},ao=torchao:Int8WeightOnlyConfig"])
    assert code == 0
    results = Results.load(out / "results.json")
    ref = value(results, "ppl", "int8-wo", "kld_mean")
    assert ref > 0
    assert value(results, "ppl", "seed", "kld_mean") == pytest.approx(ref, rel=1e-6)
    assert value(results, "ppl", "seed", "token_ppl") == pytest.approx(value(results, "ppl", "int8-wo", "token_ppl"), rel=1e-6)
    assert value(results, "ppl", "ao", "kld_mean") == pytest.approx(ref, rel=0.3)


# --- bad input: one line, exit 2 -------------------------------------------------------------------

NOT_A_HANDLER = "class NotAHandler:\n    def __init__(self, mod):\n        self.mod = mod\n"
NO_FILTER = "def quantize(model):\n    return model\n"
RAISES_AT_IMPORT = "raise RuntimeError('boom at import')\n"
NOT_CALLABLE = "X = 3\n"


@pytest.mark.parametrize("quant, files, extra, match", [
    ("/no/such/handler.py:Handler", {}, [], "/no/such/handler.py: no such file"),
    (f"{EXAMPLE}:Nope", {}, [], "has no attribute 'Nope'"),
    ("{tmp}/h.py:NotAHandler", {"h.py": NOT_A_HANDLER}, [],
     "class NotAHandler lacks create_quantized_state_dict() and convert_for_runtime()"),
    ("{tmp}/h.py:X", {"h.py": NOT_CALLABLE}, [], "X is of type 'int', not a handler class or function"),
    ("{tmp}/h.py:X", {"h.py": RAISES_AT_IMPORT}, [], "raised RuntimeError: boom at import"),
    ("no_such_pkg.quant:Handler", {}, [], "no module named 'no_such_pkg.quant'"),
    (f"{HANDLER}(groupsize=64)", {}, [], "does not accept these arguments"),
    (f"{HANDLER}(filter_fn=print)", {}, [], "not a Python literal"),
    ("{tmp}/h.py:quantize", {"h.py": NO_FILTER}, ["--skip-layers", "lm_head"], "--skip-layers cannot apply"),
    ("{tmp}/h.py:quantize+head", {"h.py": NO_FILTER}, [], "+head cannot apply"),
    ("a=int8-wo,a=int4-wo-g32", {}, [], "variant 'a' is given twice"),
    ("torchao:NoSuchConfig", {}, [], "has no config 'NoSuchConfig'"),
], ids=["missing-file", "no-attribute", "lacks-methods", "not-callable", "import-raises", "no-module", "bad-keyword",
        "not-literal", "skip-without-filter", "head-without-filter", "duplicate-name", "unknown-torchao-config"])
def test_bad_handler_specs_are_one_line_before_the_model_loads(quant, files, extra, match, tiny_dir, tmp_path, capsys):
    if quant.startswith("torchao:") and not HAVE_TORCHAO:
        pytest.skip("torchao not installed")
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    out = tmp_path / "run"
    code = main(["run", "--model", str(tiny_dir), "--quant", quant.format(tmp=tmp_path), "--stages", "none",
                 "--out", str(out), *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith("evalsuite: error:") and match in err[0], err[0]
    assert not out.exists()


RAISES = '''
class Boom:
    def __init__(self, mod):
        self.mod = mod
    def create_quantized_state_dict(self):
        raise ValueError("scales overflow in layer 3\\nsecond line of the message")
    def convert_for_runtime(self):
        return self.mod
'''
NAN_WEIGHTS = '''
import torch
def quantize(model):
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[0, 0] = float("nan")
    return model
'''
WIDER_VOCAB = '''
import torch
def quantize(model):
    head = model.lm_head
    model.lm_head = torch.nn.Linear(head.in_features, head.out_features + 8, bias=False)
    return model
'''


@pytest.mark.parametrize("text, attr, match", [
    (RAISES, "Boom", "handler boom ({tmp}/h.py:Boom) raised ValueError: scales overflow in layer 3"),
    (NAN_WEIGHTS, "quantize", "variant boom ({tmp}/h.py:quantize): model.layers.0.mlp.up_proj.weight holds NaN"),
    (WIDER_VOCAB, "quantize", "its logits have a vocabulary of 49160, the reference model's 49152"),
], ids=["raises", "nan-weights", "other-vocabulary"])
def test_bad_handler_output_is_one_line_and_keeps_the_results_so_far(text, attr, match, tiny_dir, tmp_path, capsys):
    (tmp_path / "h.py").write_text(text)
    out = tmp_path / "run"
    code = main(["run", "--model", str(tiny_dir), "--quant", f"boom={tmp_path}/h.py:{attr}", "--stages", "ppl",
                 "--out", str(out), "--no-history", "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert match.format(tmp=tmp_path) in err[0] and "results so far saved" in err[0]
    assert "second line" not in err[0]
    saved = json.loads((out / "results.json").read_text())
    assert saved["run"]["model"]["name"] == tiny_dir.name and "load" in saved["run"]["stage_seconds"]
    assert match.format(tmp=tmp_path) in saved["errors"][0]["message"]


def test_variant_model_specs_are_checked_before_the_model_loads(tiny_dir, tmp_path, capsys):
    for spec, match in ((f"fp={tiny_dir}", "variant name 'fp'"), ("nameless", "expected NAME=PATH"),
                        (f"x={tmp_path}/missing", "--variant-model x: "), (f"int8-wo={tiny_dir}", "already taken")):
        code = main(["run", "--model", str(tiny_dir), "--variant-model", spec, "--quant", "int8-wo", "--stages", "none",
                     "--out", str(tmp_path / "run")])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and match in err[0], (spec, err)
    assert not (tmp_path / "run").exists()


def test_variant_model_with_another_vocabulary_is_refused(tiny_dir, tmp_path, capsys):
    other = save_hf(make_tiny_llama(vocab_size=256, layers=2), None, tmp_path / "bytes")
    code = main(["run", "--model", str(tiny_dir), "--variant-model", f"other={other}", "--stages", "none",
                 "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert "it has a vocabulary of 256 tokens, the reference 49152" in err[0] and "meaningless" in err[0]


def test_same_size_but_different_tokenizer_is_a_difference():
    from evalsuite.load.variant import vocabulary_difference

    class Tok:
        def __init__(self, vocab):
            self.vocab = vocab

        def get_vocab(self):
            return self.vocab

    class Loaded:
        def __init__(self, vocab):
            self.tokenizer = Tok(vocab)
            self.info = type("Info", (), {"vocab_size": len(vocab)})()

    ref = Loaded({"a": 0, "b": 1, "c": 2})
    assert vocabulary_difference(ref, Loaded({"a": 0, "b": 1, "c": 2})) is None
    why = vocabulary_difference(ref, Loaded({"a": 0, "b": 1, "d": 2}))
    assert why is not None and "different tokenizer" in why


def byte_tokenizer(folder: Path) -> None:
    """A real tokenizer.json of 256 byte tokens (for the 512-token gpt-fast 'tiny' shape)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    byte_level = pre_tokenizers.ByteLevel.alphabet()
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(sorted(byte_level))}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    PreTrainedTokenizerFast(tokenizer_object=tok).save_pretrained(folder)


@pytest.mark.slow
def test_gpt_fast_int8_checkpoint_with_the_bug_is_named(data_dir, tmp_path):
    """gpt-fast's own int8 .pth (quantize.py --mode int8: int8 weights + scales, head included) as a
    --variant-model of the fp .pth, the planted bug in one layer's scales."""
    from evalsuite.load import gptfast
    from evalsuite.quantize.user import resolve
    from evalsuite.quantize.spec import parse_reference

    handler_cls = resolve(parse_reference(HANDLER))
    fp = gptfast.random_model("tiny", "cpu", torch.float32, seed=0)
    folders = {}
    for name in ("fp", "int8", "bug"):
        folders[name] = tmp_path / name
        folders[name].mkdir()
        byte_tokenizer(folders[name])
    sd_fp = {k: v for k, v in fp.state_dict().items() if not k.startswith("freqs_cis")}
    torch.save(sd_fp, folders["fp"] / "model.pth")
    sd_q = handler_cls(copy.deepcopy(fp)).create_quantized_state_dict()  # gpt-fast: every linear
    sd_q = {k: v for k, v in sd_q.items() if not k.startswith("freqs_cis")}
    torch.save(sd_q, folders["int8"] / "model.pth")
    bad = "layers.1.feed_forward.w2"
    sd_q[f"{bad}.scales"] = sd_q[f"{bad}.scales"] * 2
    torch.save(sd_q, folders["bug"] / "model.pth")
    def gpt_fast_run(out: Path, bug: str) -> int:
        return main(["run", "--model", str(folders["fp"] / "model.pth"), "--arch", "tiny", "--device", "cpu",
                     "--data-dir", str(data_dir), "--out", str(out), "--no-progress", "--no-history",
                     "--variant-model", f"int8={folders['int8'] / 'model.pth'}",
                     "--variant-model", f"bug={folders[bug] / 'model.pth'}", "--stages", "ppl,layers",
                     "--limit", "8", "--ppl-context", "128", "--layer-tokens", "128", "--layer-seq-len", "64",
                     "--baselines", str(tmp_path / "baselines")])

    assert gpt_fast_run(tmp_path / "blessed", "int8") == 0  # the honest checkpoint blessed as "bug"
    bless(tmp_path / "blessed", tmp_path / "baselines")
    out = tmp_path / "run"
    assert gpt_fast_run(out, "bug") == 1
    results = Results.load(out / "results.json")
    regression_against_baseline(results, "bug")
    assert results.run["quantized_layers"] == {"int8": 11, "bug": 11}  # wqkv, wo, w1-w3 a block, and the head
    assert results.run["variant_models"]["bug"]["format"] == "gpt-fast"
    assert verdict(results, "layers/int8/sqnr")["verdict"] == "PASS"
    failed = verdict(results, "layers/bug/sqnr")
    assert failed["verdict"] == "WORSE" and failed["task"] == bad


@needs_torchao
@pytest.mark.gpu
def test_gpu_bf16_handler_equals_int8_wo_and_torchao_is_close(smollm2_path, data_dir, tmp_path):
    """On the device in bf16: with --kernels eager the built-in int8-wo runs the seed's forward, so
    the example handler must match it exactly; torchao's int8 within ±30% of its KLD."""
    out = tmp_path / "run"
    code = main(["run", "--model", str(smollm2_path), "--device", "cuda", "--data-dir", str(data_dir), "--out", str(out),
                 "--no-progress", "--no-history", "--stages", "ppl,layers", "--limit", "8", "--kernels", "eager",
                 "--quant", f"int8-wo,seed={HANDLER},ao=torchao:Int8WeightOnlyConfig"])
    assert code == 0
    results = Results.load(out / "results.json")
    ref = value(results, "ppl", "int8-wo", "kld_mean")
    assert value(results, "ppl", "seed", "kld_mean") == pytest.approx(ref, rel=1e-6)
    assert value(results, "ppl", "ao", "kld_mean") == pytest.approx(ref, rel=0.3)
    assert verdict(results, "layers/ao/sqnr")["verdict"] == "PASS"


@needs_torchao
def test_speed_decoder_runs_torchao_projections_side_by_side():
    """torchao's weights cannot be sliced or concatenated: q/k/v run as three modules whose outputs
    are permuted and joined, and the decoder still gives the HF model's logits; its bytes are the
    int8 data and scales inside the tensor subclasses."""
    from evalsuite.load import gptfast
    from evalsuite.measure.speed import weight_bytes

    hf = make_tiny_llama()
    fp_bytes = weight_bytes(gptfast.from_hf(copy.deepcopy(hf)))
    quantize_ao = parse_scheme("torchao:Int8WeightOnlyConfig")
    from evalsuite.quantize import quantize_

    hf = quantize_(hf, quantize_ao)
    decoder = gptfast.from_hf(hf)
    assert isinstance(decoder.layers[0].attention.wqkv, gptfast.ConcatOutputs)
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = hf(input_ids=ids, use_cache=False).logits
        torch.testing.assert_close(decoder(ids), ref, rtol=1e-5, atol=1e-5)
    linear_fp = sum(m.weight.numel() * 4 for n, m in hf.named_modules() if isinstance(m, nn.Linear) and n != "lm_head")
    # int8 weights: a quarter of the fp32 linear bytes, plus one scale a row
    assert fp_bytes - weight_bytes(decoder) == pytest.approx(0.75 * linear_fp, rel=0.05)
