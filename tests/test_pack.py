"""pack / unpack / load_packed / from_packed on synthetic checkpoints (formats: docs/formats.md)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.numpy import load_file as np_load
from safetensors.torch import load_file, save_file

from besa_rs import ConfigError, FormatError, IntegrityError, ShapeError, cli
from besa_rs.packing import from_packed, load_packed, load_packed_sparse, pack, parse_size, unpack

LIN = "model.layers.0.mlp.up_proj.weight"


def canonical(t: torch.Tensor) -> bytes:
    """Raw bytes after the documented round-trip policy: -0.0 -> +0.0, everything else kept."""
    t = t.clone().reshape(-1)
    if t.is_floating_point():
        t[t == 0] = 0
    return raw(t)


def raw(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""


def write_model(
    root: Path, tensors: dict[str, torch.Tensor], config: dict | None = None, shards: int = 1
) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    names = list(tensors)
    if shards == 1:
        save_file(tensors, root / "model.safetensors", metadata={"format": "pt"})
    else:
        wm = {}
        per = -(-len(names) // shards)
        for k in range(shards):
            part = names[k * per : (k + 1) * per]
            fn = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
            save_file({n: tensors[n] for n in part}, root / fn, metadata={"format": "pt"})
            wm.update(dict.fromkeys(part, fn))
        (root / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {}, "weight_map": wm})
        )
    (root / "config.json").write_text(json.dumps(config or {"model_type": "llama"}))
    (root / "tokenizer.json").write_text('{"t": 1}')
    (root / "generation_config.json").write_text('{"g": 1}')
    return root


def sparse(shape, density, dtype=torch.float32, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g)
    w[torch.rand(shape, generator=g) >= density] = 0
    return w.to(dtype)


def assert_roundtrip(src: Path, out: Path, packed: set[str] | None = None) -> None:
    """Every tensor of ``out`` equals ``src``: raw bytes, except that packed tensors (all
    2-D float tensors when ``packed`` is None) may turn -0.0 into +0.0."""
    a = {}
    for f in sorted(src.glob("*.safetensors")):
        a.update(load_file(f))
    b = {}
    for f in sorted(out.glob("*.safetensors")):
        b.update(load_file(f))
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        if packed is None or k in packed:
            assert canonical(a[k]) == canonical(b[k]), k
        else:
            assert raw(a[k]) == raw(b[k]), k


def test_worked_example_of_the_spec(tmp_path):
    w = torch.tensor([[1.5, -2, 0, 0, 0, 0, 0, 0, 0, 3], [0] * 10, [0, 4, 0, 0, 0, 0, 0, 0, 5, 0]])
    src = write_model(tmp_path / "m", {LIN: w})
    pack(src, tmp_path / "p", min_sparsity=0.0)
    got = np_load(tmp_path / "p" / "model.safetensors")
    m = LIN[: -len(".weight")]
    assert sorted(got) == sorted(
        f"{m}.{s}" for s in ("shape", "compressed", "bitmask", "row_offsets")
    )
    assert got[f"{m}.bitmask"].dtype == np.uint8 and got[f"{m}.bitmask"].tolist() == [
        [3, 2],
        [0, 0],
        [2, 1],
    ]
    assert got[f"{m}.row_offsets"].dtype == np.int64 and got[f"{m}.row_offsets"].tolist() == [
        0,
        3,
        3,
    ]
    assert got[f"{m}.compressed"].dtype == np.float32 and got[f"{m}.compressed"].tolist() == [
        1.5,
        -2,
        3,
        4,
        5,
    ]
    assert got[f"{m}.shape"].dtype == np.int64 and got[f"{m}.shape"].tolist() == [3, 10]
    cfg = json.loads((tmp_path / "p" / "config.json").read_text())
    sc = cfg["quantization_config"]["sparsity_config"]
    assert cfg["quantization_config"]["quant_method"] == "compressed-tensors"
    assert sc["format"] == "sparse-bitmask" and sc["sparsity_structure"] == "unstructured"
    assert sc["global_sparsity"] == pytest.approx(25 / 30) and sc["ignore"] == ["lm_head"]
    assert sc["targets"] == [m] and sc["registry_requires_subclass"] is False
    # header carries format=pt and a checksum for the module
    raw = (tmp_path / "p" / "model.safetensors").read_bytes()
    header = json.loads(raw[8 : 8 + int.from_bytes(raw[:8], "little")])
    assert header["__metadata__"]["format"] == "pt"
    assert len(header["__metadata__"][f"besa_rs.crc32.{m}"]) == 8


def model_tensors(dtype=torch.float32) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    t = {
        "model.embed_tokens.weight": torch.randn(32, 24).to(dtype),
        "model.norm.weight": torch.ones(24, dtype=dtype),
        "lm_head.weight": sparse((32, 24), 0.3, dtype, 9),  # not in a block: copied even if sparse
        "model.layers.0.self_attn.q_proj.weight": sparse((24, 24), 0.5, dtype, 1),
        "model.layers.0.self_attn.q_proj.bias": torch.randn(24).to(dtype),
        "model.layers.0.mlp.up_proj.weight": sparse((40, 24), 0.4, dtype, 2),
        "model.layers.0.mlp.down_proj.weight": sparse((24, 40), 0.9, dtype, 3),  # dense-ish: copied
        "model.layers.1.mlp.up_proj.weight": sparse((40, 24), 0.0, dtype, 4),  # all zero
        "model.layers.1.mlp.gate_proj.weight": sparse((40, 24), 0.5, dtype, 5),
        "model.layers.1.counter": torch.arange(5),
        "scalar": torch.tensor(3.0).to(dtype),
        "empty": torch.zeros(0, 4, dtype=dtype),
    }
    t["model.layers.1.mlp.gate_proj.weight"][0, 0] = -0.0
    t["model.layers.1.mlp.gate_proj.weight"][1, 1] = float("nan")
    return t


@pytest.mark.parametrize("fmt", ["bitmask", "csr"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_pack_unpack_roundtrip_is_bit_exact(tmp_path, fmt, dtype):
    src = write_model(tmp_path / "m", model_tensors(dtype), shards=2)
    r = pack(src, tmp_path / "p", fmt)
    acts = {t["name"]: t["action"] for t in r["tensors"]}
    assert acts["model.layers.0.self_attn.q_proj.weight"] == (
        "packed" if fmt == "bitmask" else "copied"
    )  # CSR at d=0.5 is not smaller
    assert acts["model.layers.0.mlp.down_proj.weight"] == "copied"  # below --min-sparsity
    assert (
        acts["lm_head.weight"]
        == acts["model.embed_tokens.weight"]
        == acts["model.norm.weight"]
        == "copied"
    )
    assert acts["model.layers.0.self_attn.q_proj.bias"] == "copied"
    assert acts["model.layers.1.mlp.up_proj.weight"] == "packed"
    assert (tmp_path / "p" / "tokenizer.json").read_text() == '{"t": 1}'
    assert (tmp_path / "p" / "generation_config.json").is_file()
    unpack(tmp_path / "p", tmp_path / "u")
    assert_roundtrip(src, tmp_path / "u", {k for k, v in acts.items() if v == "packed"})
    assert "quantization_config" not in json.loads((tmp_path / "u" / "config.json").read_text())
    # load_packed gives the same dense tensors (NaN kept, -0.0 -> +0.0)
    sd = load_packed(tmp_path / "p")
    orig = model_tensors(dtype)
    assert sd.keys() == orig.keys()
    for k, v in orig.items():
        assert canonical(v) == canonical(sd[k]), k
    g = sd["model.layers.1.mlp.gate_proj.weight"]
    assert torch.isnan(g[1, 1])
    # -0.0 comes back +0.0 from a packed tensor, bit-exact (-0.0) from a copied one
    assert bool(torch.signbit(g[0, 0])) == (acts["model.layers.1.mlp.gate_proj.weight"] == "copied")


def test_shards_and_index(tmp_path):
    src = write_model(tmp_path / "m", model_tensors())
    r = pack(src, tmp_path / "p", shard_size=1500)
    names = sorted(p.name for p in (tmp_path / "p").glob("*.safetensors"))
    assert len(names) > 2 and names[0].startswith("model-00001-of-")
    idx = json.loads((tmp_path / "p" / "model.safetensors.index.json").read_text())
    assert set(idx["weight_map"].values()) == set(names)
    assert idx["metadata"]["total_size"] == r["totals"]["stored_bytes"]
    unpack(tmp_path / "p", tmp_path / "u", shard_size="1KB")
    assert (tmp_path / "u" / "model.safetensors.index.json").is_file()
    assert_roundtrip(src, tmp_path / "u")


def test_ideal_size_and_ratio(tmp_path):
    w = sparse((256, 512), 0.5, torch.bfloat16)
    src = write_model(tmp_path / "m", {LIN: w, "model.norm.weight": torch.ones(512)})
    r = pack(src, tmp_path / "p")
    nnz = int((w != 0).sum())
    ideal = nnz * 2 + 256 * 64 + 256 * 8 + 512 * 4
    assert r["totals"]["ideal_bytes"] == ideal
    size = os.path.getsize(tmp_path / "p" / "model.safetensors")
    assert ideal <= size <= ideal * 1.01


def test_two_four(tmp_path):
    w = torch.zeros(8, 16)
    w[:, 0::4] = torch.randn(8, 4)
    w[:, 3::4] = torch.randn(8, 4)
    w[2, 4:8] = 0  # group with fewer than 2 kept: zero fillers
    src = write_model(tmp_path / "m", {LIN: w})
    pack(src, tmp_path / "p", "2:4")
    got = np_load(tmp_path / "p" / "model.safetensors")
    m = LIN[: -len(".weight")]
    assert got[f"{m}.shape"].shape == (2, 1) and got[f"{m}.compressed"].shape == (8, 8)
    assert (
        json.loads((tmp_path / "p" / "config.json").read_text())["quantization_config"][
            "sparsity_config"
        ]["sparsity_structure"]
        == "2:4"
    )
    unpack(tmp_path / "p", tmp_path / "u")
    assert_roundtrip(src, tmp_path / "u")
    # inspect counts the zero fillers as zeros: the same sparsity as the dense original
    from besa_rs.inspection import inspect

    truth = float((w == 0).float().mean())  # 66 of 128: above the 50% that 2:4 stores
    assert truth == pytest.approx(66 / 128)
    assert inspect(src)["totals"]["block_linear_sparsity"] == pytest.approx(truth)
    assert inspect(tmp_path / "p")["totals"]["block_linear_sparsity"] == pytest.approx(truth)

    bad = w.clone()
    bad[5, 8:11] = 1.0  # row 5 keeps all 4 of columns 8..11
    src2 = write_model(tmp_path / "m2", {LIN: bad})
    with pytest.raises(ShapeError, match=r"up_proj\.weight.*row 5, columns 8\.\.11"):
        pack(src2, tmp_path / "p2", "2:4")
    assert not (tmp_path / "p2").exists()
    r = pack(src2, tmp_path / "p2", "2:4", force_24=True)
    assert r["totals"]["weights_dropped_by_force_24"] == 2 and "force-24" in r["warnings"][0]
    back = load_packed(tmp_path / "p2")[LIN]
    assert int((back[5, 8:12] != 0).sum()) == 2


def test_csr_loads_as_scipy_and_torch(tmp_path):
    import scipy.sparse

    w = sparse((30, 50), 0.2)
    w[4] = 0
    src = write_model(tmp_path / "m", {LIN: w})
    pack(src, tmp_path / "p", "csr")
    got = np_load(tmp_path / "p" / "model.safetensors")
    m = LIN[: -len(".weight")]
    crow, col, vals = got[f"{m}.crow_indices"], got[f"{m}.col_indices"], got[f"{m}.values"]
    assert crow.dtype == np.int64 and col.dtype == np.int32
    a = scipy.sparse.csr_array((vals, col, crow), shape=tuple(got[f"{m}.shape"]))
    a.check_format(full_check=True)
    np.testing.assert_array_equal(a.toarray(), w.numpy())
    t = torch.sparse_csr_tensor(
        torch.from_numpy(crow),
        torch.from_numpy(col).long(),
        torch.from_numpy(vals),
        (30, 50),
        check_invariants=True,
    )
    assert torch.equal(t.to_dense(), w)
    sp = load_packed_sparse(tmp_path / "p", layout="scipy")[LIN]
    np.testing.assert_array_equal(sp.toarray(), w.numpy())
    assert load_packed_sparse(tmp_path / "p")[LIN].layout == torch.sparse_csr


def test_existing_out_refused_and_overwrite(tmp_path):
    src = write_model(tmp_path / "m", model_tensors())
    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "keep").write_text("x")
    with pytest.raises(ConfigError, match="already exists"):
        pack(src, tmp_path / "p")
    assert (tmp_path / "p" / "keep").is_file()
    # --overwrite never deletes what besa-rs did not write (issue 14, item 1)
    with pytest.raises(ConfigError, match=r'holds "keep".*not a besa-rs output'):
        pack(src, tmp_path / "p", overwrite=True)
    assert (tmp_path / "p" / "keep").is_file()
    (tmp_path / "p" / "keep").unlink()
    pack(src, tmp_path / "p", overwrite=True)
    pack(src, tmp_path / "p", overwrite=True, min_sparsity=0)  # a previous output is replaced
    with pytest.raises(ConfigError, match="overlaps"):
        pack(src, src, overwrite=True)
    with pytest.raises(FormatError, match="already a packed"):
        pack(tmp_path / "p", tmp_path / "pp")


def test_failed_pack_leaves_nothing(tmp_path):
    src = write_model(tmp_path / "m", {LIN: torch.ones(4, 6), "x": torch.ones(3)})
    with pytest.raises(FormatError, match=r"\"x\".*only 2-D"):
        pack(src, tmp_path / "p", tensors=["x"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_packed_integrity_checked(tmp_path):
    src = write_model(tmp_path / "m", {LIN: sparse((16, 16), 0.5)})
    pack(src, tmp_path / "p", min_sparsity=0)
    f = tmp_path / "p" / "model.safetensors"
    raw = bytearray(f.read_bytes())
    raw[-20] ^= 0x40  # flip a bit in the data (last tensor)
    f.write_bytes(bytes(raw))
    with pytest.raises(IntegrityError, match="checksum"):
        load_packed(tmp_path / "p")


@settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    rows=st.integers(0, 20),
    cols=st.integers(0, 37),
    density=st.sampled_from([0.0, 0.1, 0.5, 0.9, 1.0]),
    dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16, torch.float64]),
    fmt=st.sampled_from(["bitmask", "csr", "2:4"]),
    seed=st.integers(0, 2**16),
)
def test_roundtrip_property(tmp_path_factory, rows, cols, density, dtype, fmt, seed):
    tmp = tmp_path_factory.mktemp("prop")
    if fmt == "2:4":
        cols -= cols % 4
    w = sparse((rows, cols), density, dtype, seed)
    if rows > 2:
        w[1] = 0  # an empty row
    if fmt == "2:4" and cols:
        g = w.reshape(rows, cols // 4, 4)
        g[..., 2:] = 0  # make it 2:4
    src = write_model(tmp / "m", {LIN: w})
    r = pack(src, tmp / "p", fmt, min_sparsity=0.0, sync=False)
    unpack(tmp / "p", tmp / "u", sync=False)
    assert_roundtrip(src, tmp / "u")
    assert canonical(load_packed(tmp / "p")[LIN]) == canonical(w)
    packed = r["tensors"][0]["action"] == "packed"
    assert packed == (r["tensors"][0]["stored_bytes"] < w.numel() * w.element_size())


def test_parse_size():
    assert (
        parse_size("5GB") == 5_000_000_000
        and parse_size("2MiB") == 2 * 2**20
        and parse_size(7) == 7
    )
    with pytest.raises(ConfigError):
        parse_size("5 parsecs")


def test_cli_pack_unpack_inspect(tmp_path, capsys):
    src = write_model(tmp_path / "m", model_tensors())
    assert cli.main(["pack", str(src), "--out", str(tmp_path / "p"), "--summary"]) == 0
    assert "packed" in capsys.readouterr().out
    assert cli.main(["pack", str(src), "--out", str(tmp_path / "p")]) == 2
    assert "already exists" in capsys.readouterr().err
    assert (
        cli.main(["unpack", str(tmp_path / "p"), "--out", str(tmp_path / "u"), "--json", "-"]) == 0
    )
    rep = json.loads(capsys.readouterr().out)
    assert rep["totals"]["packed"] == 4
    assert_roundtrip(src, tmp_path / "u")
    assert cli.main(["inspect", str(tmp_path / "p"), "--json", "-"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["format"] == "safetensors (packed: bitmask)"
    info = {t["name"]: t for t in rep["packed"]}
    assert info[LIN]["format"] == "bitmask" and info[LIN]["shape"] == [40, 24]
    assert info[LIN]["nnz"] == int((model_tensors()[LIN] != 0).sum())


def test_from_packed_builds_the_model(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".layers." in name and p.dim() == 2:
                p[p.abs() < p.abs().median()] = 0
    r = pack(model, tmp_path / "p")
    assert r["totals"]["packed"] == 14
    m2 = from_packed(tmp_path / "p")
    assert m2.lm_head.weight.data_ptr() == m2.model.embed_tokens.weight.data_ptr()
    ids = torch.arange(10).unsqueeze(0)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, m2(ids).logits)


@pytest.mark.slow
def test_pack_in_memory_model_and_state_dict_after_prune(tmp_path):
    """``pack`` takes the model right after ``besa_rs.prune`` and its state dict (torch tensors,
    numpy arrays, tied weights) as well as a directory; every way gives the same packed weights,
    and what is not a model, a state dict or a path is refused with nothing written."""
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from _tiny import tiny_model, tiny_tokens

    import besa_rs

    model = tiny_model("llama", layers=2, hidden=64)
    besa_rs.prune(model, tiny_tokens(n=2), method="magnitude", progress=False)
    sd = model.state_dict()
    r1 = besa_rs.pack(model, tmp_path / "from_model", sync=False)
    assert r1["source"] == type(model).__name__ and r1["totals"]["packed"] == 2 * 7
    mixed = {k: (v.numpy() if "mlp" in k else v) for k, v in sd.items()}
    mixed["tied.copy"] = sd["model.embed_tokens.weight"]  # shares storage: written twice
    r2 = besa_rs.pack(mixed, tmp_path / "from_sd", sync=False)
    assert r2["source"] == "dict" and r2["totals"]["packed"] == 2 * 7
    a = load_packed(tmp_path / "from_model")
    b = load_packed(tmp_path / "from_sd")
    for name, t in sd.items():
        if name in a:
            assert torch.equal(a[name], t), name
        assert torch.equal(b[name], t), name
    assert torch.equal(b["tied.copy"], sd["model.embed_tokens.weight"])
    assert len([n for n in b if ".layers." in n and n.endswith("_proj.weight")]) == 2 * 7
    for bad, what in ((42, "got int"), ({"w": [1.0, 2.0]}, "entry 'w' is a list")):
        with pytest.raises(ConfigError, match=what):
            besa_rs.pack(bad, tmp_path / "bad", sync=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["from_model", "from_sd"]


def test_default_model_packs_unpacks_bit_exactly_and_same_perplexity(tmp_path):
    """smollm2-135m, block linears magnitude-pruned to 50% per row: pack -> unpack is bit-exact,
    from_packed reloads to the same perplexity."""
    from besa_rs.evaluate import evaluate_perplexity
    from besa_rs.models import load_model, load_tokenizer, resolve_model

    src = resolve_model("smollm2-135m")
    model = load_model(src, dtype="float32")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".layers." in name and p.dim() == 2:
                idx = p.abs().argsort(dim=1)[:, : p.shape[1] // 2]
                p.scatter_(1, idx, 0.0)
    model.save_pretrained(tmp_path / "pruned", safe_serialization=True)
    r = pack(tmp_path / "pruned", tmp_path / "p", sync=False)
    assert r["totals"]["packed"] == 30 * 7
    dense = sum(f.stat().st_size for f in (tmp_path / "pruned").glob("*.safetensors"))
    packed = sum(f.stat().st_size for f in (tmp_path / "p").glob("*.safetensors"))
    assert packed <= r["totals"]["ideal_bytes"] * 1.01 and packed < dense
    unpack(tmp_path / "p", tmp_path / "u", sync=False)
    assert_roundtrip(
        tmp_path / "pruned",
        tmp_path / "u",
        {t["name"] for t in r["tensors"] if t["action"] == "packed"},
    )
    tok = load_tokenizer(src)
    text = "The state of the union is strong. " * 40
    ppl_a = evaluate_perplexity(model, tok, text, seqlen=128, max_windows=2, progress=False)[
        "perplexity"
    ]
    m2 = from_packed(tmp_path / "p")
    ppl_b = evaluate_perplexity(m2, tok, text, seqlen=128, max_windows=2, progress=False)[
        "perplexity"
    ]
    assert ppl_a == ppl_b
