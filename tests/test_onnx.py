"""ONNX export (io/onnx.py): MatMulNBits layout, a tiny export run by onnxruntime with a KV
cache, and the refusals. The oracle is the logits saved with the legacy fixture (the in-memory
quantized model before export) and an independent float64 dequantization, never the exporter.
"""

from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("onnxscript")
ort = pytest.importorskip("onnxruntime")

from gift_quant.cli import main  # noqa: E402
from gift_quant.io.onnx import ONNX_FILE, pack_matmul_nbits  # noqa: E402
from gift_quant.testing import oracle, random_mixed_linear  # noqa: E402

FIXTURES = Path(__file__).parent / "fixtures"


def _single_op_session(layer, K, N, block):
    from onnx import TensorProto, helper, numpy_helper

    t = pack_matmul_nbits(layer)
    node = helper.make_node(
        "MatMulNBits", ["A", "B", "S", "Z"], ["Y"], domain="com.microsoft",
        K=K, N=N, bits=4, block_size=block,
    )  # fmt: skip
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("A", TensorProto.FLOAT, [None, K])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [None, N])],
        initializer=[
            numpy_helper.from_array(t[k].numpy(), n)
            for k, n in (("weight", "B"), ("scales", "S"), ("zero_points", "Z"))
        ],
    )
    opsets = [helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)]
    model = helper.make_model(graph, opset_imports=opsets)
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize(("bits", "group", "sym"), [(4, 32, True), (3, 64, False), (2, 32, False)])
def test_matmul_nbits_layout_matches_the_float64_oracle(bits, group, sym):
    # 3 groups of 32 -> an odd number of zero-point nibbles per row (padding to whole bytes)
    K = 96 if group == 32 else 128
    layer = random_mixed_linear(K, 64, bits=bits, group_size=group, sym=sym, seed=bits)
    x = torch.randn(3, K, generator=torch.Generator().manual_seed(0))
    y = _single_op_session(layer, K, 64, group).run(None, {"A": x.numpy()})[0]
    exact = oracle(x, layer, base_only=True).numpy()
    assert np.abs(y - exact).max() <= 1e-5 * np.abs(exact).max()


def _feeds(report, ids, past=None):
    kv = report["kv_cache"]
    feeds = {"input_ids": ids.numpy()}
    for i in range(kv["num_layers"]):
        for j, name in enumerate(("key", "value")):
            empty = np.zeros((1, kv["kv_heads"], 0, kv["head_dim"]), np.float32)
            feeds[f"past_key_values.{i}.{name}"] = empty if past is None else past[2 * i + j]
    length = ids.shape[1] + (0 if past is None else past[0].shape[2])
    feeds["attention_mask"] = np.ones((1, length), np.int64)
    return feeds


@pytest.fixture(scope="module")
def onnx_export(tmp_path_factory):
    """The w3 asym legacy fixture exported through the CLI (3-bit codes widened to 4)."""
    import json

    out = tmp_path_factory.mktemp("onnx") / "w3"
    assert main(["export", str(FIXTURES / "legacy_w3g32_asym"), "--format", "onnx",
                 "--out", str(out), "-q"]) == 0  # fmt: skip
    return out, json.loads((out / "onnx_export.json").read_text())


def test_onnx_logits_match_the_in_memory_model_and_the_kv_cache_decodes(onnx_export):
    from safetensors.torch import load_file

    out, report = onnx_export
    assert report["widened_to_4_bits"] == {"3": 14} and "lossless" in report["note"]
    # untied: the embedding and the output matrix each one fp16 table, transposed
    assert report["tables"] == {"embedding": "float16", "output": "float16", "tied": False}
    assert _tables(out / ONNX_FILE) == [([64, 512], "FLOAT16")] * 2
    expected = load_file(FIXTURES / "legacy_w3g32_asym" / "expected_logits.safetensors")
    ids, logits = expected["input_ids"], expected["logits"].numpy()
    sess = ort.InferenceSession(str(out / ONNX_FILE), providers=["CPUExecutionProvider"])
    full = sess.run(None, _feeds(report, ids))
    assert np.abs(full[0] - logits).max() <= 1e-4 * np.abs(logits).max()
    # prefill 24 tokens, then decode the last 8 one at a time through the KV cache
    step = sess.run(None, _feeds(report, ids[:, :24]))
    got = [step[0]]
    for t in range(24, ids.shape[1]):
        step = sess.run(None, _feeds(report, ids[:, t : t + 1], step[1:]))
        got.append(step[0])
    decoded = np.concatenate(got, axis=1)
    assert np.abs(decoded - logits).max() <= 1e-4 * np.abs(logits).max()


def _tables(path) -> list:
    """(dims, type) of the model's initializers as large as a 512 x 64 table."""
    import onnx

    model = onnx.load(str(path))
    return [
        (list(t.dims), onnx.TensorProto.DataType.Name(t.data_type))
        for t in model.graph.initializer
        if np.prod(t.dims) >= 512 * 64
    ]


def _tied_copy(tmp_path) -> Path:
    """The w3 legacy fixture with its output matrix tied to its embedding."""
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    src = tmp_path / "tied"
    shutil.copytree(FIXTURES / "legacy_w3g32_asym", src)
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": True}))
    tensors = load_file(src / "model.safetensors")
    del tensors["lm_head.weight"]
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    return src


def test_a_tied_pair_is_one_fp16_table_and_the_logits_are_the_loaders(tmp_path):
    """A model whose output matrix is its embedding: one [hidden, vocab] fp16 table in the
    file, read by the gather and the output MatMul, and onnxruntime's logits equal (to fp32
    rounding) those of the checkpoint loaded in torch."""
    import json

    from gift_quant.io.load import load_quantized

    src = _tied_copy(tmp_path)
    out = tmp_path / "onnx"
    assert main(["export", str(src), "--format", "onnx", "--out", str(out), "-q"]) == 0
    report = json.loads((out / "onnx_export.json").read_text())
    assert report["tables"] == {"embedding": "float16", "output": "float16", "tied": True}
    assert _tables(out / ONNX_FILE) == [([64, 512], "FLOAT16")]
    model = load_quantized(src, dtype=torch.float32)
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    ids = torch.randint(0, 512, (1, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model(input_ids=ids).logits.numpy()
    sess = ort.InferenceSession(str(out / ONNX_FILE), providers=["CPUExecutionProvider"])
    got = sess.run(None, _feeds(report, ids))[0]
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()


def test_8_bit_tables_are_one_set_of_codes_and_the_logits_those_of_the_rounded_table(
    tmp_path, capsys
):
    """``--table-bits 8``: the tied pair is one uint8 code tensor, read by GatherBlockQuantized
    and an 8-bit MatMulNBits with int8 activations (accuracy level 4); every table value is
    within half a step of the checkpoint's; and onnxruntime's logits are those of the
    checkpoint with its table replaced by the file's codes (dequantized here from the
    initializers as the format says), to within what rounding the output MatMul's input to
    int8 per block of 32 (scale max |x| / 127) can change: half a step times the block's sum
    of |W|, per block."""
    import json

    import onnx
    from onnx import numpy_helper

    from gift_quant.io.load import load_quantized

    src = _tied_copy(tmp_path)
    out = tmp_path / "onnx8"
    argv = ["export", str(src), "--format", "onnx", "--table-bits", "8", "--out", str(out)]
    assert main([*argv, "-q"]) == 0
    report = json.loads((out / "onnx_export.json").read_text())
    assert report["tables"]["tied"] and "not exact" in report["tables"]["output"]
    assert _tables(out / ONNX_FILE) == [([512, 2, 32], "UINT8")]
    graph = onnx.load(str(out / ONNX_FILE)).graph
    bits = {n.name: {a.name: a.i for a in n.attribute}.get("bits") for n in graph.node}
    head = next(n for n in graph.node if n.op_type == "MatMulNBits" and bits[n.name] == 8)
    init = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    codes, scales, zeros = (init[name] for name in head.input[1:4])
    step = scales.reshape(512, 2, 1).astype(np.float64)
    table = (codes - zeros.reshape(512, 2, 1).astype(np.float64)) * step
    model = load_quantized(src, dtype=torch.float32)
    weight = model.get_input_embeddings().weight
    blocks = weight.detach().double().numpy().reshape(512, 2, 32)
    assert np.all(np.abs(table - blocks) <= step / 2 + 1e-9)
    span = np.maximum(blocks.max(-1), 0) - np.minimum(blocks.min(-1), 0)  # the checkpoint's
    assert np.allclose(step[..., 0], span / 255, rtol=1e-6)
    ids = torch.randint(0, 512, (1, 20), generator=torch.Generator().manual_seed(1))
    sess = ort.InferenceSession(str(out / ONNX_FILE), providers=["CPUExecutionProvider"])
    got = sess.run(None, _feeds(report, ids))[0]
    assert {a.name: a.i for a in head.attribute}["accuracy_level"] == 4
    with torch.no_grad():
        exact = model(input_ids=ids).logits.numpy()
        weight.copy_(torch.from_numpy(table.reshape(512, 64)))
        want = model(input_ids=ids).logits.numpy()
        x = model.model(input_ids=ids).last_hidden_state.double().numpy()  # the head's input
    half_step = np.abs(x).reshape(1, 20, 2, 32).max(-1) / 127 / 2  # [1, 20, blocks]
    w_sums = np.abs(table).sum(-1)  # [vocab, blocks]
    bound = half_step @ w_sums.T + 1e-4 * np.abs(want).max()  # [1, 20, vocab]
    assert np.all(np.abs(got - want) <= bound)
    assert np.abs(got - exact).max() > 1e-3 * np.abs(want).max()  # the rounding shows

    # refused before anything is written for another format
    bad = [
        "export",
        str(src),
        "--format",
        "mixed",
        "--table-bits",
        "8",
        "--out",
        str(tmp_path / "m"),
    ]
    assert main([*bad, "-q"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--table-bits applies to --format onnx" in err and "\n" not in err
    assert not (tmp_path / "m").exists()


def _tiny_llama(hidden: int, tied: bool):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=64, hidden_size=hidden, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied,
    )  # fmt: skip
    torch.manual_seed(0)
    return LlamaForCausalLM(config).half().float()


def test_tables_refuse_or_leave_what_they_cannot_replace():
    """8-bit tables refuse a hidden size that is not a multiple of 32; a head tied to an
    embedding that is not a plain nn.Embedding (here a subclass, as a scaled embedding is) is
    left as it is, not given a second table; a max_norm embedding is left as it is."""
    from gift_quant.io.checkpoint import CheckpointError
    from gift_quant.io.onnx_tables import use_tables

    with pytest.raises(CheckpointError, match="multiple of 32, not 48"):
        use_tables(_tiny_llama(48, tied=False), 8)

    class Scaled(torch.nn.Embedding):
        pass

    model = _tiny_llama(64, tied=True)
    model.get_input_embeddings().__class__ = Scaled
    assert use_tables(model, 16) == {}
    assert type(model.get_output_embeddings()) is torch.nn.Linear

    model = _tiny_llama(64, tied=False)
    model.get_input_embeddings().max_norm = 1.0
    done = use_tables(model, 16)
    assert "embedding" not in done and done["output"] == "float16" and not done["tied"]


def test_tables_are_stored_in_fp16_only_where_that_is_exact():
    from gift_quant.io.onnx_tables import TransposedTable

    halves = torch.randn(32, 16).half().float()
    assert TransposedTable(halves).t.dtype == torch.float16
    assert torch.equal(TransposedTable(halves)(), halves.t())
    thirds = halves + 1e-4  # no longer fp16 values: kept in fp32
    assert TransposedTable(thirds).t.dtype == torch.float32
    assert torch.equal(TransposedTable(thirds)(), thirds.t())


def test_onnx_export_refuses_act_order_and_an_existing_target(tmp_path, capsys):
    import shutil

    from safetensors.torch import load_file, save_file

    src = tmp_path / "act-order"
    shutil.copytree(FIXTURES / "legacy_w4g32_sym", src)
    tensors = load_file(src / "model.safetensors")
    key = "model.layers.0.mlp.down_proj.g_idx"
    tensors[key] = tensors[key].flip(0).contiguous()  # a permuted (act-order) group map
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "onnx"
    assert main(["export", str(src), "--format", "onnx", "--out", str(out), "-q"]) == 2
    err = capsys.readouterr().err.strip()
    assert "model.layers.0.mlp.down_proj" in err and "act-order" in err and "re-quantize" in err
    assert len(err.splitlines()) == 1
    assert not out.exists() and not list(tmp_path.glob(".onnx*"))  # nothing half-written

    out.mkdir()
    (out / "keep.txt").write_text("mine")
    src = FIXTURES / "legacy_w4g32_sym"
    assert main(["export", str(src), "--format", "onnx", "--out", str(out), "-q"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_an_onnx_export_is_named_as_such_where_a_safetensors_export_is_expected(
    onnx_export, capsys
):
    out, _ = onnx_export
    for argv in (["eval", str(out)], ["inspect", str(out)]):
        assert main([*argv, "-q"]) == 2
        err = capsys.readouterr().err.strip()
        assert "is an ONNX export (model.onnx) for onnxruntime" in err and "\n" not in err
