"""Stage ``layers``: per-layer weight/output SQNR, per-block hidden SQNR, and the guilty layer named.

Numbers are checked against numpy float64 on tiny random Llamas; each fault of issue 5 is planted in
one named layer and must come out worst and under threshold, while an honest int8-wo run flags none.
"""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from evalsuite.app.config import RunConfig
from evalsuite.errors import EvalsuiteError
from evalsuite.load import LoadedModel
from evalsuite.load.model import ModelInfo
from evalsuite.measure import layer_capture as C, layers as L, tokenization
from evalsuite.measure.context import RunContext
from evalsuite.measure.layer_thresholds import load_thresholds
from evalsuite.quantize import Int4WeightOnlyConfig, Int8WeightOnlyConfig, quantize_
from evalsuite.quantize.int4_wo import unpack_int4
from evalsuite.results import Results
from tests.conftest import make_tiny_llama


class ByteTokenizer:
    """UTF-8 bytes as token ids: a real tokenizer for a 256-token tiny model."""

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict[str, list[int]]:
        return {"input_ids": list(text.encode("utf-8"))}


def np_sqnr_db(ref: np.ndarray, test: np.ndarray) -> float:
    ref, test = ref.astype(np.float64), test.astype(np.float64)
    return float(10 * np.log10(np.sum(ref**2) / np.sum((ref - test) ** 2)))


def tiny(bias: bool = False, layers: int = 4, tie: bool = True, seed: int = 0) -> nn.Module:
    model = make_tiny_llama(seed=seed, layers=layers, bias=bias, tie=tie)
    if bias:  # the HF init zeroes biases; a dropped zero bias would be no fault at all
        gen = torch.Generator().manual_seed(seed + 1)
        for m in model.modules():
            if isinstance(m, nn.Linear) and m.bias is not None:
                m.bias.copy_(torch.randn(m.bias.shape, generator=gen) * 0.05)
    return model


def make_ctx(fp: nn.Module, variants: dict[str, nn.Module], configs: dict[str, object], data_dir, tokenizer=None,
             tokens: int = 256, seq_len: int = 64, **options) -> RunContext:
    info = ModelInfo(path="tiny", format="hf", name="tiny", sha256="", n_params=0, arch="llama", vocab_size=256,
                     max_seq_len=512)
    args = RunConfig.of_options(**{**dict(layer_tokens=tokens, layer_seq_len=seq_len, layer_batch_tokens=2 * seq_len,
                                          layer_thresholds=None, layer_threshold_db=None, layer_jump_db=L.DEFAULT_JUMP_DB,
                                          layer_top=5, layer_peer_db=L.DEFAULT_PEER_DB, skip_layers=""), **options})
    return RunContext(loaded=LoadedModel(fp, tokenizer or ByteTokenizer(), info), variants={"fp": fp, **variants},
                      configs=configs, device=torch.device("cpu"), dtype=torch.float32, config=args, results=Results(),
                      data_dir=data_dir)


def run_stage(ctx: RunContext) -> Results:
    with torch.inference_mode():
        L.run(ctx)
    json.dumps(ctx.results.to_dict(), allow_nan=False)  # everything the stage wrote is plain JSON
    return ctx.results


def summary(results: Results, variant: str) -> dict:
    return results.get("layers", "all", variant, "layers_under_threshold").extra


# --- numbers against numpy ------------------------------------------------------------------------


@pytest.mark.parametrize("chunk", [C.CHUNK_ELEMENTS, 1000])
def test_weight_metrics_match_numpy(chunk, monkeypatch):
    monkeypatch.setattr(C, "CHUNK_ELEMENTS", chunk)  # 1000: many row chunks per layer
    fp = tiny(bias=True, layers=2)
    for cfg in (Int8WeightOnlyConfig(), Int4WeightOnlyConfig(group_size=32)):
        q = quantize_(copy.deepcopy(fp), cfg)
        for name, qmod in C.quantized_layers(q).items():
            w = fp.get_submodule(name).weight.numpy().astype(np.float64)
            if isinstance(cfg, Int8WeightOnlyConfig):
                codes = qmod.weight.numpy().astype(np.float64)
                w_hat = codes * qmod.scales.numpy().astype(np.float64)[:, None]
                at_ends = np.mean((codes == -128) | (codes == 127))
            else:
                codes = unpack_int4(qmod.weight).numpy()[:, : w.shape[1]].astype(np.float64)
                g = cfg.group_size
                scales = np.repeat(qmod.scales.numpy().astype(np.float64), g, axis=1)[:, : w.shape[1]]
                zeros = np.repeat(qmod.zeros.numpy().astype(np.float64), g, axis=1)[:, : w.shape[1]]
                w_hat = (codes - 8) * scales + zeros
                at_ends = np.mean((codes == 0) | (codes == 15))
            got = C.weight_errors(fp.get_submodule(name).weight, qmod)
            diff = w - w_hat
            assert got["weight_sqnr_db"] == pytest.approx(np_sqnr_db(w, w_hat), abs=1e-4), name
            assert got["weight_rel_error"] == pytest.approx(np.linalg.norm(diff) / np.linalg.norm(w), rel=1e-5)
            assert got["weight_max_abs_error"] == pytest.approx(np.abs(diff).max(), rel=1e-4)  # int4 dequantizes in fp32
            assert got["clipped_fraction"] == pytest.approx(at_ends)


@pytest.mark.parametrize("chunk", [C.CHUNK_ELEMENTS, 1000])
def test_output_and_hidden_sqnr_match_numpy(chunk, monkeypatch):
    monkeypatch.setattr(C, "CHUNK_ELEMENTS", chunk)
    fp = tiny(bias=True, layers=3)
    q = quantize_(copy.deepcopy(fp), Int4WeightOnlyConfig(group_size=32))
    ids = torch.randint(0, 256, (2, 48), generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        layer_sums, block_sums = C.measure_activations(fp, {"q": q}, [ids[:1], ids[1:]], torch.device("cpu"))

    inputs: dict[str, list[np.ndarray]] = {}
    hidden: dict[str, list[list[np.ndarray]]] = {"fp": [[] for _ in range(3)], "q": [[] for _ in range(3)]}
    handles = [fp.get_submodule(n).register_forward_hook(
        lambda m, a, o, n=n: inputs.setdefault(n, []).append(a[0].numpy().reshape(-1, a[0].shape[-1])))
        for n in C.quantized_layers(q)]
    for tag, model in (("fp", fp), ("q", q)):
        for i, block in enumerate(model.model.layers):
            handles.append(block.register_forward_hook(
                lambda m, a, o, i=i, tag=tag: hidden[tag][i].append((o[0] if isinstance(o, tuple) else o).numpy())))
    with torch.inference_mode():
        for row in ids:
            fp(input_ids=row[None])
            q(input_ids=row[None])
    for h in handles:
        h.remove()

    for name, qmod in C.quantized_layers(q).items():
        x = np.concatenate(inputs[name]).astype(np.float64)
        lin = fp.get_submodule(name)
        b = lin.bias.numpy().astype(np.float64)
        y = x @ lin.weight.numpy().astype(np.float64).T + b
        y_q = x @ qmod.dequantize().numpy().astype(np.float64).T + b
        cos = np.mean(np.sum(y * y_q, 1) / (np.linalg.norm(y, axis=1) * np.linalg.norm(y_q, axis=1)))
        signal, noise, cos_sum, n = layer_sums["q"][name].values()
        assert n == ids.numel()
        assert C.sqnr_db(signal, noise) == pytest.approx(np_sqnr_db(y, y_q), abs=0.01), name
        assert cos_sum / n == pytest.approx(cos, abs=1e-5)
    for i in range(3):
        ref, test = np.concatenate(hidden["fp"][i]), np.concatenate(hidden["q"][i])
        signal, noise, _, n = block_sums["q"][i].values()
        assert C.sqnr_db(signal, noise) == pytest.approx(np_sqnr_db(ref, test), abs=0.01)


# --- planted faults ----------------------------------------------------------------------------------


def requantize_int8(qmod, w: torch.Tensor, scales: torch.Tensor, rounding=torch.round, lo: int = -128,
                    hi: int = 127) -> None:
    """Rewrite one WeightOnlyInt8Linear's codes and scales as a faulty handler would have."""
    qmod.weight = rounding(w.float() / scales[:, None]).clamp(lo, hi).to(torch.int8)
    qmod.scales = scales.to(qmod.scales.dtype)


def drop_bias(q, name, fp):
    q.get_submodule(name).bias = None


def wrong_axis(q, name, fp):
    w = fp.get_submodule(name).weight
    assert w.shape[0] == w.shape[1], "the seed's wrong-axis bug needs a square weight to run at all"
    requantize_int8(q.get_submodule(name), w, w.abs().amax(dim=0).float() / 127.5)


def coarse_3bit(q, name, fp):
    w = fp.get_submodule(name).weight
    requantize_int8(q.get_submodule(name), w, w.abs().amax(dim=1).float() / 3.5, lo=-4, hi=3)


def floor_not_round(q, name, fp):
    w = fp.get_submodule(name).weight
    requantize_int8(q.get_submodule(name), w, w.abs().amax(dim=1).float() / 127.5, rounding=torch.floor)


FAULTS = {
    # fault: (plant, layer, model has biases)
    "bias_dropped": (drop_bias, "model.layers.1.mlp.down_proj", True),
    "scales_wrong_axis": (wrong_axis, "model.layers.2.self_attn.q_proj", False),
    "coarse_3bit": (coarse_3bit, "model.layers.1.self_attn.o_proj", False),
    "floor_not_round": (floor_not_round, "model.layers.2.mlp.up_proj", False),
}


@pytest.mark.parametrize("fault", list(FAULTS))
def test_planted_fault_is_named_worst_and_flagged(fault, data_dir):
    plant, layer, bias = FAULTS[fault]
    fp = tiny(bias=bias)
    honest = quantize_(copy.deepcopy(fp), Int8WeightOnlyConfig())
    faulty = copy.deepcopy(honest)
    plant(faulty, layer, fp)
    cfg = Int8WeightOnlyConfig()
    results = run_stage(make_ctx(fp, {"int8-wo": honest, "faulty": faulty}, {"int8-wo": cfg, "faulty": cfg}, data_dir))

    assert summary(results, "int8-wo")["under_threshold"] == []
    assert results.get("layers", "all", "int8-wo", "layers_under_threshold").value == 0
    s = summary(results, "faulty")
    assert s["worst"] == layer
    assert s["under_threshold"] == [layer]
    assert s["worst_layers"][0] == layer
    assert results.get("layers", "all", "faulty", "layers_under_threshold").value == 1


def test_head_quantized_against_policy_is_flagged(data_dir):
    fp = tiny(tie=False)
    honest = quantize_(copy.deepcopy(fp), Int8WeightOnlyConfig())
    faulty = quantize_(copy.deepcopy(fp), Int8WeightOnlyConfig(include_head=True))  # the handler ignored the policy
    cfg = Int8WeightOnlyConfig()
    results = run_stage(make_ctx(fp, {"int8-wo": honest, "faulty": faulty}, {"int8-wo": cfg, "faulty": cfg}, data_dir))

    assert summary(results, "int8-wo")["under_threshold"] == []
    s = summary(results, "faulty")
    assert s["worst"] == "lm_head"
    assert s["under_threshold"] == ["lm_head"]
    assert s["expected_float_but_quantized"] == ["lm_head"]
    # and where the policy asks for the head, the same model is honest
    asked = run_stage(make_ctx(fp, {"int8-wo+head": faulty}, {"int8-wo+head": Int8WeightOnlyConfig(include_head=True)},
                               data_dir))
    assert summary(asked, "int8-wo+head")["under_threshold"] == []


def test_error_jump_names_the_block_of_the_bad_layer(data_dir):
    fp = tiny(layers=4)
    honest = quantize_(copy.deepcopy(fp), Int8WeightOnlyConfig())
    faulty = copy.deepcopy(honest)
    coarse_3bit(faulty, "model.layers.2.mlp.down_proj", fp)
    cfg = Int8WeightOnlyConfig()
    results = run_stage(make_ctx(fp, {"int8-wo": honest, "faulty": faulty}, {"int8-wo": cfg, "faulty": cfg}, data_dir))

    assert results.get("layers", "all", "int8-wo", "min_hidden_sqnr_db").extra["first_jump_block"] is None
    extra = results.get("layers", "all", "faulty", "min_hidden_sqnr_db").extra
    assert extra["first_jump_block"] == "block.2"
    assert extra["largest_jump_block"] == "block.2"
    # independently: block 2's SQNR drop stands out from the median drop
    drops = -np.diff([results.get("layers", f"block.{i}", "faulty", "hidden_sqnr_db").value for i in range(4)])
    assert np.argmax(drops) == 1 and drops[1] - np.median(drops) > L.DEFAULT_JUMP_DB


# --- records, options, thresholds ---------------------------------------------------------------------


def test_records_follow_the_metric_contract(data_dir):
    fp = tiny(layers=2)
    q = quantize_(copy.deepcopy(fp), Int8WeightOnlyConfig())
    ctx = make_ctx(fp, {"int8-wo": q}, {"int8-wo": Int8WeightOnlyConfig()}, data_dir, tokens=128)
    n_records = len(run_stage(ctx).records)
    results = run_stage(ctx)  # a re-run replaces its records, it does not add to them
    assert len(results.records) == n_records == 14 * 6 + 2 + 4
    names = list(C.quantized_layers(q))
    assert len(names) == 14
    for name in names:
        for metric in ("weight_sqnr_db", "weight_rel_error", "weight_max_abs_error", "clipped_fraction",
                       "output_sqnr_db", "output_cosine"):
            rec = results.get("layers", name, "int8-wo", metric)
            assert rec is not None and rec.value is not None and math.isfinite(rec.value), (name, metric)
        assert results.get("layers", name, "int8-wo", "output_sqnr_db").n == 128
    for metric in ("min_weight_sqnr_db", "min_output_sqnr_db", "layers_under_threshold", "min_hidden_sqnr_db"):
        assert results.get("layers", "all", "int8-wo", metric) is not None
    mins = min(results.get("layers", n, "int8-wo", "weight_sqnr_db").value for n in names)
    assert results.get("layers", "all", "int8-wo", "min_weight_sqnr_db").value == mins
    assert results.details["layers"]["calibration"]["split"] == "valid"
    assert len(results.details["layers"]["int8-wo"]["worst_layers"]) == 5


def test_flat_threshold_flags_everything_below_it(data_dir):
    fp = tiny(layers=2)
    q = quantize_(copy.deepcopy(fp), Int8WeightOnlyConfig())
    results = run_stage(make_ctx(fp, {"int8-wo": q}, {"int8-wo": Int8WeightOnlyConfig()}, data_dir, tokens=128,
                                 layer_threshold_db=200.0))
    assert summary(results, "int8-wo")["under_threshold"] and len(summary(results, "int8-wo")["under_threshold"]) == 14


def test_threshold_file_overrides_defaults(tmp_path):
    f = tmp_path / "floors.yaml"
    f.write_text("int8-wo*:\n  output_sqnr_db: 50\n  layers:\n    '*.down_proj': {weight_sqnr_db: 60}\n")
    th = load_thresholds(f)
    assert th.floors("int8-wo", "model.layers.0.q_proj").output_sqnr_db == 50
    assert th.floors("int8-wo", "model.layers.0.mlp.down_proj").weight_sqnr_db == 60
    default = load_thresholds(None)
    assert th.floors("int8-wo", "x").weight_sqnr_db == default.floors("int8-wo", "x").weight_sqnr_db
    assert th.floors("int4-wo-g128", "x") == default.floors("int4-wo-g128", "x")


@pytest.mark.parametrize("text", ["- a list\n", "int8-wo: {output_db: 3}\n", "int8-wo: {output_sqnr_db: loud}\n",
                                  "int8-wo: [unclosed\n"])
def test_bad_threshold_file_is_a_clear_error(tmp_path, text):
    f = tmp_path / "floors.yaml"
    f.write_text(text)
    with pytest.raises(EvalsuiteError, match="floors.yaml"):
        load_thresholds(f)
    with pytest.raises(EvalsuiteError, match="no such file"):
        load_thresholds(tmp_path / "missing.yaml")


def test_user_errors(data_dir):
    fp = tiny(layers=2)
    with pytest.raises(EvalsuiteError, match="--quant"):
        run_stage(make_ctx(fp, {}, {}, data_dir))
    q = quantize_(copy.deepcopy(fp), Int8WeightOnlyConfig())
    with pytest.raises(EvalsuiteError, match="--layer-tokens"):
        run_stage(make_ctx(fp, {"int8-wo": q}, {}, data_dir, tokens=-1))
    with pytest.raises(EvalsuiteError, match="context"):
        run_stage(make_ctx(fp, {"int8-wo": q}, {}, data_dir, seq_len=4096))


# --- the real model ------------------------------------------------------------------------------------


@pytest.mark.slow
def test_smollm2_int8_wo_planted_layer_is_the_only_one_flagged(smollm2, data_dir):
    """Short calibration (64 tokens) on the real model: one layer quantized with floor instead of
    round is named worst and flagged, and none of the 209 honest int8-wo layers is."""
    fp = smollm2.model
    faulty = quantize_(copy.deepcopy(fp), Int8WeightOnlyConfig())
    bad = "model.layers.7.mlp.down_proj"
    floor_not_round(faulty, bad, fp)
    ctx = make_ctx(fp, {"int8-wo": faulty}, {"int8-wo": Int8WeightOnlyConfig()}, data_dir,
                   tokenizer=smollm2.tokenizer, tokens=64, seq_len=64)
    ctx.loaded = smollm2
    results = run_stage(ctx)

    assert results.get("layers", "all", "int8-wo", "layers_under_threshold").n == 210
    s = summary(results, "int8-wo")
    assert s["worst"] == bad and s["under_threshold"] == [bad]
    assert len(results.find("layers", None, "int8-wo", "hidden_sqnr_db")) == 30
    w = fp.get_submodule(bad).weight.numpy().astype(np.float64)
    w_hat = faulty.get_submodule(bad).dequantize().numpy().astype(np.float64)
    assert results.get("layers", bad, "int8-wo", "weight_sqnr_db").value == pytest.approx(np_sqnr_db(w, w_hat), abs=1e-4)


@pytest.mark.slow
def test_cli_run_stage_layers_writes_records_and_shows_worst(smollm2, data_dir, tmp_path, capsys):
    """``evalsuite run --stages layers`` end to end, on a tiny Llama that shares SmolLM2's tokenizer."""
    from safetensors.torch import save_model

    from evalsuite.commands.cli import main

    model_dir = tmp_path / "tiny"
    model = make_tiny_llama(vocab_size=len(smollm2.tokenizer), layers=2)
    model.config.save_pretrained(model_dir)
    save_model(model, str(model_dir / "model.safetensors"))
    smollm2.tokenizer.save_pretrained(model_dir)
    out = tmp_path / "run"
    code = main(["run", "--model", str(model_dir), "--stages", "layers", "--quant", "int8-wo,int4-wo-g32",
                 "--device", "cpu", "--data-dir", str(data_dir), "--out", str(out), "--layer-tokens", "128",
                 "--layer-seq-len", "64", "--layer-top", "3", "--no-progress", "--threads", "1"])
    assert code == 4  # layer SQNRs are reported, not gated: a layers-only run gives no verdict (INCOMPLETE)
    results = Results.load(out / "results.json")
    assert [v["check"] for v in results.verdicts if v["verdict"] == "INCOMPLETE"] == ["complete/gate"]
    for variant in ("int8-wo", "int4-wo-g32"):
        assert len(results.find("layers", None, variant, "output_sqnr_db")) == 14
        assert results.get("layers", "all", variant, "layers_under_threshold").value == 0
    err = capsys.readouterr().err
    assert "layers int8-wo: worst 3 of 14 quantized layers" in err
    assert summary(results, "int8-wo")["worst"] in err


@pytest.mark.gpu
def test_gpu_bf16_honest_run_flags_nothing_and_planted_layer_is_named(smollm2_path, data_dir):
    """The device path in its own dtype: bf16 on CUDA, 2048 calibration tokens."""
    from evalsuite.load import load_model

    loaded = load_model(smollm2_path, device="cuda", dtype=torch.bfloat16)
    fp = loaded.model
    honest = quantize_(copy.deepcopy(fp), Int8WeightOnlyConfig())
    faulty = copy.deepcopy(honest)
    bad = "model.layers.7.mlp.down_proj"
    floor_not_round(faulty, bad, fp)
    cfg = Int8WeightOnlyConfig()
    ctx = make_ctx(fp, {"int8-wo": honest, "faulty": faulty}, {"int8-wo": cfg, "faulty": cfg}, data_dir,
                   tokenizer=loaded.tokenizer, tokens=2048, seq_len=512)
    ctx.loaded, ctx.device, ctx.dtype = loaded, torch.device("cuda"), torch.bfloat16
    results = run_stage(ctx)

    assert summary(results, "int8-wo")["under_threshold"] == []
    assert results.get("layers", "all", "int8-wo", "min_hidden_sqnr_db").extra["under_threshold"] == []
    s = summary(results, "faulty")
    assert s["worst"] == bad and s["under_threshold"] == [bad]


# --- models the suite did not quantize: pairing by name ---------------------------------------------


class OpaqueLinear(nn.Module):
    """A user's runtime module with no dequantize() and a packed weight of its own layout."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.register_buffer("weight", torch.zeros(linear.out_features, linear.in_features // 2, dtype=torch.uint8))
        self.inner = copy.deepcopy(linear)

    def forward(self, x):
        return self.inner(x)


def test_pairing_finds_changed_linears_of_a_model_it_did_not_quantize():
    fp = tiny(layers=2)
    assert C.paired_layers(fp, copy.deepcopy(fp)) == {}  # an unchanged copy: nothing quantized
    variant = copy.deepcopy(fp)
    bad = "model.layers.1.mlp.up_proj"
    with torch.no_grad():
        variant.get_submodule(bad).weight.mul_(1.001)  # a float checkpoint whose weights moved (dequantized GGUF)
    variant.model.layers[0].self_attn.o_proj = OpaqueLinear(fp.model.layers[0].self_attn.o_proj)
    assert set(C.paired_layers(fp, variant)) == {bad, "model.layers.0.self_attn.o_proj"}
    assert set(C.paired_layers(fp, quantize_(copy.deepcopy(fp), Int8WeightOnlyConfig()))) == set(C.quantized_layers(
        quantize_(copy.deepcopy(fp), Int8WeightOnlyConfig())))


def test_weight_view_is_skipped_with_a_reason_and_the_guilty_layer_still_named(data_dir):
    fp = tiny(layers=2)
    variant = quantize_(copy.deepcopy(fp), Int8WeightOnlyConfig())
    bad = "model.layers.1.self_attn.v_proj"
    opaque = OpaqueLinear(fp.get_submodule(bad))
    with torch.no_grad():
        opaque.inner.weight.mul_(2.0)  # the planted bug inside a module the stage cannot dequantize
    variant.model.layers[1].self_attn.v_proj = opaque
    results = run_stage(make_ctx(fp, {"mine": variant}, {}, data_dir))
    s = summary(results, "mine")
    assert s["worst"] == bad and bad in s["under_threshold"]
    assert results.find("layers", bad, "mine", "weight_sqnr_db") == []
    assert results.get("layers", bad, "mine", "output_sqnr_db").value < 1.0
    skipped = results.get("layers", "all", "mine", "min_weight_sqnr_db").extra["weight_view_skipped"]
    assert skipped["layers"] == 1 and "OpaqueLinear has no dequantize()" in skipped["reason"]


def test_float_weights_of_a_checkpoint_are_their_own_dequantization():
    fp = tiny(layers=2)
    variant = copy.deepcopy(fp)
    name = "model.layers.0.mlp.down_proj"
    with torch.no_grad():
        w = variant.get_submodule(name).weight
        w.copy_(quantize_(copy.deepcopy(fp), Int8WeightOnlyConfig()).get_submodule(name).dequantize())
    q = quantize_(copy.deepcopy(fp), Int8WeightOnlyConfig()).get_submodule(name)
    ref = fp.get_submodule(name).weight
    assert C.weight_errors(ref, variant.get_submodule(name))["weight_sqnr_db"] == pytest.approx(
        C.weight_errors(ref, q)["weight_sqnr_db"], abs=1e-6)


def test_calibration_starts_with_bos_as_the_ppl_windows_do(data_dir):
    """With a tokenizer that puts BOS first by default, each calibration sequence is BOS and the text's
    next tokens, exactly as the ppl stage's windows of the same text and length; the rule is recorded."""
    from evalsuite.measure import perplexity as P
    from evalsuite.measure.corpus import wikitext
    from tests.conftest import make_byte_tokenizer

    tok = make_byte_tokenizer(bos=True)
    fp = make_tiny_llama(vocab_size=260, layers=2)
    q = quantize_(copy.deepcopy(fp), Int8WeightOnlyConfig())
    ctx = make_ctx(fp, {"int8-wo": q}, {"int8-wo": Int8WeightOnlyConfig()}, data_dir, tokenizer=tok, tokens=128,
                   seq_len=32)
    calib = L.load_calibration(ctx, L.options(ctx))
    text, source = wikitext("valid", data_dir)
    text = text[:20_000]
    ids, ends = P.tokenize_corpus(tok, text)
    windows = P.make_windows(ids, text, ends, P.Protocol(context=32, max_windows=4), P.tokenizer_bos(tok), source)
    got = torch.cat(calib.batches)
    assert calib.bos and got.shape == (4, 32)
    assert torch.equal(got, windows.input_ids) and bool((got[:, 0] == 256).all())
    assert ctx.results.run["tokenization"] == {"bos": True, "bos_id": 256, "rule": tokenization.bos_rule(tok).rule}
    assert run_stage(ctx).details["layers"]["calibration"]["bos"] is True
