"""Tensor-parallel evaluation (--tp): sharded models and runs give one process's numbers, on gloo with
2 CPU ranks; invalid launches and unshardable modules are refused in one line."""

from __future__ import annotations

import copy
import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from evalsuite import distributed
from evalsuite.load import tp
from evalsuite.errors import EvalsuiteError

REPO = Path(__file__).resolve().parent.parent
SCHEMES = ("fp", "int8-wo", "int4-wo-g32")


def tp_llama(vocab_size: int = 256, hidden: int = 64, seed: int = 0):
    """A random Llama (4 heads, 2 KV heads, biases: a row-parallel bias must be added once) with
    weights large enough that quantization error stands well above float32 rounding (the default
    init gives near-uniform logits)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      initializer_range=0.15, tie_word_embeddings=False, attention_bias=True, mlp_bias=True)
    model = LlamaForCausalLM(cfg).eval().requires_grad_(False)
    for m in model.modules():  # HF initialises biases to zero, which would hide a bias added twice
        if isinstance(m, nn.Linear) and m.bias is not None:
            m.bias.normal_(0.0, 0.1)
    return model


class GptFastInt8(nn.Module):
    """A user's own module in gpt-fast's int8 layout: linear-like, so it shards."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        w = linear.weight.float()
        scales = w.abs().amax(dim=1).clamp(min=1e-8) / 127
        self.register_buffer("weight", torch.round(w / scales[:, None]).to(torch.int8))
        self.register_buffer("scales", scales)

    def forward(self, x):
        return F.linear(x, self.weight.to(x.dtype)) * self.scales


class TransposedLinear(nn.Module):
    """A weight stored [in, out]: looks 2-D and linear, but slicing its rows is wrong."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.weight = nn.Parameter(linear.weight.t().contiguous(), requires_grad=False)

    def forward(self, x):
        return x @ self.weight


def with_modules(model: nn.Module, cls) -> nn.Module:
    model = copy.deepcopy(model)
    for layer in model.model.layers:
        layer.mlp.down_proj = cls(layer.mlp.down_proj)
        layer.self_attn.q_proj = cls(layer.self_attn.q_proj)
    return model


def variants(fp: nn.Module) -> dict[str, nn.Module]:
    from evalsuite.quantize import parse_scheme, quantize_

    out = {"fp": fp}
    for s in SCHEMES[1:]:
        out[s] = quantize_(copy.deepcopy(fp), parse_scheme(s))
    out["user-int8"] = with_modules(fp, GptFastInt8)
    return out


def probe_ids() -> torch.Tensor:
    return torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))


def _rank_main(rank: int, world_size: int, port: int, out: str, device_type: str = "cpu") -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size))
    torch.set_num_threads(1)
    if device_type == "cuda":
        torch.cuda.set_device(rank)
    distributed.init(device_type)  # one process: the mesh starts the group itself
    layout = tp.init_mesh(device_type, world_size, world_size)
    device = torch.device(device_type, rank) if device_type == "cuda" else torch.device("cpu")
    result: dict = {"layout": [layout.tp, layout.dp, layout.tp_rank, layout.dp_rank], "logits": {}, "whole": {}}
    fp = tp_llama()
    for name, model in variants(fp).items():
        full = copy.deepcopy(model)
        sharded = tp.shard(model, layout, device, name)  # whole on the CPU, shards on the device
        with torch.inference_mode():
            result["logits"][name] = sharded(probe_ids().to(device)).logits.cpu().tolist()
        # the layers stage's whole views: every tensor of every sharded layer equals the unsharded one
        same = []
        for lname, mod in sharded.named_modules():
            if hasattr(mod, "_evalsuite_tp"):
                whole, ref = tp.unsharded(mod), full.get_submodule(lname)
                tensors = dict(ref.named_parameters(recurse=False)) | dict(ref.named_buffers(recurse=False))
                same.append(all(torch.equal(getattr(whole, k).cpu(), v) for k, v in tensors.items()))
        result["whole"][name] = same
    refused = {}
    for cls in (TransposedLinear,):
        try:
            tp.shard(with_modules(tp_llama(), cls), layout, device, cls.__name__)
        except EvalsuiteError as e:
            refused[cls.__name__] = str(e)
    result["refused"] = refused
    Path(out, f"rank{rank}.json").write_text(json.dumps(result))
    distributed.shutdown()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_tp_ranks_give_single_process_logits_for_every_variant(tmp_path):
    """fp (DTensor), int8-wo, int4-wo and a user's gpt-fast-layout module (plain slices) sharded over
    2 gloo ranks: full-vocabulary logits equal the unsharded model's within float32 rounding on both
    ranks, and the whole views the layers stage uses equal the unsharded layers exactly."""
    ranks = _spawn(tmp_path, 2, "cpu")
    assert [r["layout"] for r in ranks] == [[2, 1, 0, 0], [2, 1, 1, 0]]
    _check_against_one_process(ranks, atol=2e-5)


def _spawn(tmp_path: Path, world_size: int, device_type: str) -> list[dict]:
    import torch.multiprocessing as mp

    mp.spawn(_rank_main, args=(world_size, _free_port(), str(tmp_path), device_type), nprocs=world_size, join=True)
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(world_size)]


def _check_against_one_process(ranks: list[dict], atol: float) -> None:
    fp = tp_llama()
    models = variants(fp)
    logits = {}
    for name, model in models.items():
        with torch.inference_mode():
            logits[name] = model(probe_ids()).logits
        for r in ranks:
            got = torch.tensor(r["logits"][name])
            assert torch.allclose(got, logits[name], rtol=0, atol=atol), (name, float((got - logits[name]).abs().max()))
            assert r["whole"][name] and all(r["whole"][name]), name
    # the schemes really differ from fp, far above that tolerance: a shard mix-up could not hide
    assert all(float((logits[n] - logits["fp"]).abs().max()) > 1e-3 for n in models if n != "fp")
    for r in ranks:
        if len(ranks) == 1:  # a mesh of one slices nothing: the transposed weight is whole, and right
            assert "TransposedLinear" not in r["refused"]
            continue
        assert "TransposedLinear" in r["refused"]
        assert "does not reproduce its unsharded output" in r["refused"]["TransposedLinear"]


def _dp_tp_rank_main(rank: int, world_size: int, port: int, out: str) -> None:
    """One of 4 ranks = 2 replicas x 2 TP ranks: each replica scores its share of the windows with its
    sharded model, and the gather runs over the replicas only."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size))
    torch.set_num_threads(1)
    distributed.init("cpu")
    layout = tp.init_mesh("cpu", world_size, 2)
    model = tp.shard(tp_llama(), layout, torch.device("cpu"))
    windows = probe_windows()
    mine = distributed.shard(list(windows), layout.dp_rank, layout.dp)
    with torch.inference_mode():
        nll = [(i, float(F.cross_entropy(model(w[None]).logits[0, :-1].double(), w[1:], reduction="sum")))
               for i, w in mine]
    gathered = distributed.gather(nll, layout.dp)
    Path(out, f"rank{rank}.json").write_text(json.dumps({
        "layout": [layout.tp, layout.dp, layout.tp_rank, layout.dp_rank], "mine": [i for i, _ in mine],
        "gathered": gathered}))
    distributed.shutdown()


def probe_windows() -> torch.Tensor:
    return torch.randint(0, 256, (5, 16), generator=torch.Generator().manual_seed(2))


def test_two_replicas_of_two_tp_ranks_gather_one_process_numbers(tmp_path):
    """--tp 2 on 4 processes: ranks 0,1 are replica 0 and 2,3 replica 1 (TP ranks adjacent); the
    replicas split the windows, the TP ranks of a replica take the same ones, and after the gather
    every rank holds the single-process per-window NLL in window order."""
    import torch.multiprocessing as mp

    mp.spawn(_dp_tp_rank_main, args=(4, _free_port(), str(tmp_path)), nprocs=4, join=True)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(4)]
    assert [r["layout"] for r in ranks] == [[2, 2, 0, 0], [2, 2, 1, 0], [2, 2, 0, 1], [2, 2, 1, 1]]
    assert [r["mine"] for r in ranks] == [[0, 2, 4], [0, 2, 4], [1, 3], [1, 3]]
    model = tp_llama()
    with torch.inference_mode():
        single = [float(F.cross_entropy(model(w[None]).logits[0, :-1].double(), w[1:], reduction="sum"))
                  for w in probe_windows()]
    for r in ranks:
        assert r["gathered"] == pytest.approx(single, rel=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("world_size", [1, 2])
def test_tp_shards_onto_gpus_with_nccl(tmp_path, world_size):
    """The same check on CUDA (NCCL): whole models on the CPU, shards moved to each rank's GPU;
    one GPU is a mesh of one (DTensor and the slices' code paths, on the device)."""
    if torch.cuda.device_count() < world_size:
        pytest.skip(f"needs {world_size} GPUs")
    ranks = _spawn(tmp_path, world_size, "cuda")
    _check_against_one_process(ranks, atol=1e-4)  # fp32 on the GPU vs the CPU reference


@pytest.mark.parametrize("tp_size,world_size,message", [
    (2, 1, "needs 2 processes: launch with torchrun"),
    (2, 3, "does not divide the 3 torchrun processes"),
    (0, 2, "must be at least 1"),
])
def test_invalid_tp_launches_are_refused(tp_size, world_size, message):
    with pytest.raises(EvalsuiteError, match=message):
        tp.validate(tp_size, world_size, [], ["ppl"], "ppl")


def test_unshardable_schemes_and_stages_are_refused_and_all_drops_them():
    from evalsuite.quantize import parse_scheme

    with pytest.raises(EvalsuiteError, match="dynamic activation quantization"):
        tp.validate(2, 2, [parse_scheme("int8-dq")], ["ppl"], "ppl")
    with pytest.raises(EvalsuiteError, match="stage speed does not run tensor-parallel"):
        tp.validate(2, 2, [parse_scheme("int8-wo")], ["ppl", "speed"], "ppl,speed")
    assert tp.validate(2, 4, [parse_scheme("int4-wo-g128")], ["ppl", "tasks", "layers", "speed"], "all") == \
        ["ppl", "tasks", "layers"]
    assert tp.validate(1, 1, [], ["ppl", "speed"], "ppl,speed") == ["ppl", "speed"]


def test_heads_not_divisible_by_tp_are_refused():
    model = tp_llama()  # 4 heads, 2 KV heads, MLP width 128
    tp.check_shape(model, 2)
    with pytest.raises(EvalsuiteError, match="does not divide the model's attention heads 4, KV heads 2"):
        tp.check_shape(model, 3)
    with pytest.raises(EvalsuiteError, match="KV heads 2"):
        tp.check_shape(model, 4)


def test_a_block_with_part_of_its_projections_is_refused():
    model = tp_llama()
    plan = tp.sharding_plan(model)
    assert len(plan) == 2 * 7 and plan["model.layers.1.self_attn.o_proj"] == "row"
    assert plan["model.layers.0.mlp.up_proj"] == "col"
    attn = model.model.layers[0].self_attn
    attn.qkv_proj = attn.q_proj  # a fused qkv (Phi-3 style) beside o_proj: o_proj must not be row-parallel
    del attn.q_proj, attn.k_proj, attn.v_proj
    with pytest.raises(EvalsuiteError, match="self_attn has o_proj but not k_proj, q_proj, v_proj"):
        tp.sharding_plan(model)


def test_module_layouts_that_cannot_be_sliced_are_not_linear_like():
    from evalsuite.quantize.int4_wo import WeightOnlyInt4Linear

    lin = nn.Linear(64, 32)
    assert tp._tensor_dims(lin, "col", 2) == {"weight": 0, "bias": 0}
    assert tp._tensor_dims(lin, "row", 2) == {"weight": 1}
    extra = GptFastInt8(lin)
    extra.register_buffer("rotation", torch.eye(64))  # a tensor of unknown role: not sliced blindly
    assert tp._tensor_dims(extra, "col", 2) is None
    int4 = WeightOnlyInt4Linear(64, 32, group_size=64, bias=False)
    assert tp._tensor_dims(int4, "col", 2) is not None
    assert tp._tensor_dims(int4, "row", 2) is None  # a 64-wide group would straddle the two ranks


def test_tp_without_torchrun_exits_2_before_loading(monkeypatch, capsys, tmp_path):
    from evalsuite.commands.cli import main

    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    code = main(["run", "--model", str(tmp_path / "missing.gguf"), "--tp", "2", "--stages", "ppl", "--device", "cpu"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "needs 2 processes" in err[0], err


# --- end to end: torchrun --tp 2 vs one process ------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory, smollm2):
    """A random Llama with SmolLM2's vocabulary and tokenizer, saved as an HF folder."""
    d = tmp_path_factory.mktemp("tp-llama")
    tp_llama(vocab_size=smollm2.info.vocab_size).save_pretrained(d)
    smollm2.tokenizer.save_pretrained(d)
    return d


def _run_args(model_dir: Path, out: Path, device: str = "cpu") -> list[str]:
    return ["run", "--model", str(model_dir), "--quant", "int8-wo,int4-wo-g32", "--stages", "ppl,tasks,layers",
            "--device", device, "--dtype", "fp32", "--no-progress", "--no-history", "--fp-cache", "off", "--kernels", "eager",
            "--ppl-context", "64", "--ppl-windows", "4", "--tasks", "arc_easy,piqa", "--limit", "8",
            "--layer-tokens", "128", "--layer-seq-len", "64", "--out", str(out)]


def _records(path: Path) -> dict:
    res = json.loads((path / "results.json").read_text())
    return {(r["stage"], r["task"], r["variant"], r["metric"]): r["value"] for r in res["records"]}, res


@pytest.mark.slow
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_torchrun_tp2_run_matches_one_process(tmp_path, tiny_model_dir, data_dir, device):
    """``torchrun --nproc-per-node 2 -m evalsuite run --tp 2`` (gloo on CPU, NCCL on 2 GPUs): every
    ppl/KLD, task and layers record equals the single-process run's within float32 rounding; only
    rank 0 writes."""
    if device == "cuda" and torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "EVALSUITE_DATA_DIR": str(data_dir)}
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          "-m", "evalsuite", *_run_args(tiny_model_dir, tmp_path / "two", device), "--tp", "2"],
                         env=env, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert two.returncode == 0, two.stderr[-3000:]
    one = subprocess.run([sys.executable, "-m", "evalsuite", *_run_args(tiny_model_dir, tmp_path / "one", device)],
                         env=env, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert one.returncode == 0, one.stderr[-3000:]
    single, _ = _records(tmp_path / "one")
    sharded, res = _records(tmp_path / "two")
    assert res["run"]["tp"] == 2 and res["run"]["world_size"] == 2 and res["run"]["finished"]
    assert set(sharded) == set(single)
    assert {k[0] for k in single} == {"ppl", "tasks", "layers"}
    for key, want in single.items():
        got = sharded[key]
        if isinstance(want, float) and math.isfinite(want):
            # float32 logits of 2 partial sums vs 1: KLDs of ~1e-4 agree to ~1e-7 absolute
            assert got == pytest.approx(want, rel=1e-3, abs=1e-6), key
        else:
            assert got == want, key
    # the comparison means something: the quantized variants' KLD is far above that tolerance
    assert single[("ppl", "wikitext2", "int4-wo-g32", "kld_mean")] > 1e-4
    assert sum(line.startswith("reports: ") for line in two.stdout.splitlines()) == 1
    assert not list((tmp_path / "two").glob("*.tmp"))


def test_a_run_without_tp_does_not_import_dtensor():
    """evalsuite.load.tp's helpers that every run calls (the layers stage's local/full_weight/unsharded)
    and the pipeline's Layout work on plain modules without importing torch.distributed.tensor."""
    code = ("import sys, torch\n"
            "from evalsuite.load import tp\n"
            "lin = torch.nn.Linear(4, 4)\n"
            "assert tp.local(torch.ones(2)).shape == (2,) and tp.full_weight(lin) is lin.weight\n"
            "assert tp.unsharded(lin) is lin and tp.Layout().tp == 1\n"
            "assert 'torch.distributed.tensor' not in sys.modules\n"
            "assert tp.local_shard_style().__name__ == 'LocalShard'\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert p.returncode == 0, p.stderr[-2000:]
