"""Hugging Face BERT checkpoints -> the zoo's Flax BERT (xaijax.checkpoints.bert_mapping, routed by
xaijax.checkpoints.load / port).

Fixtures are real files in the formats Hugging Face writes: a state dict of torch tensors with HF
names saved by ``torch.save`` as ``pytorch_model.bin`` (read back by the safe reader, never
``torch.load``), the same tensors in ``model.safetensors`` (``format: pt`` metadata, as HF writes),
and a ``config.json``. Checked against (a) the mapping written out by hand (transpose Linear
weights, embedding/LayerNorm renames), (b) a forward pass computed in torch float64 straight from
the state dict with Hugging Face's BERT semantics (additive -inf-like mask, post-norm, exact GELU,
tanh pooler, tied decoder), written here independently of the Flax model, and (c) round trips.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
F = torch.nn.functional

from xaijax import checkpoints  # noqa: E402
from xaijax.checkpoints import CheckpointMismatchError, bert_mapping  # noqa: E402
from xaijax.models import bert  # noqa: E402

CFG = dict(vocab_size=40, hidden_size=8, num_hidden_layers=2, num_attention_heads=2, intermediate_size=12,
           max_position_embeddings=16, type_vocab_size=2)  # fmt: skip
LABELS = ["entailment", "neutral", "contradiction"]


def hf_state_dict(task: str, seed: int = 0) -> dict[str, np.ndarray]:
    """Random float32 tensors under Hugging Face's BERT names, in torch layout (Linear (out, in)).

    ``task``: "classification" (BertForSequenceClassification), "mlm" (BertForMaskedLM: no
    pooler) or "pretraining" (BertForPreTraining: pooler, MLM head, next-sentence head)."""
    rng = np.random.default_rng(seed)
    V, H, L, I, P, TV = (CFG[k] for k in ("vocab_size", "hidden_size", "num_hidden_layers", "intermediate_size",
                                          "max_position_embeddings", "type_vocab_size"))  # fmt: skip
    sd: dict[str, np.ndarray] = {}

    def lin(name, o, i):
        sd[f"{name}.weight"] = rng.normal(0, 0.3, (o, i))
        sd[f"{name}.bias"] = rng.normal(0, 0.1, (o,))

    def ln(name, n):
        sd[f"{name}.weight"] = 1 + rng.normal(0, 0.1, (n,))
        sd[f"{name}.bias"] = rng.normal(0, 0.1, (n,))

    sd["bert.embeddings.word_embeddings.weight"] = rng.normal(0, 0.5, (V, H))
    sd["bert.embeddings.position_embeddings.weight"] = rng.normal(0, 0.5, (P, H))
    sd["bert.embeddings.token_type_embeddings.weight"] = rng.normal(0, 0.5, (TV, H))
    ln("bert.embeddings.LayerNorm", H)
    for i in range(L):
        p = f"bert.encoder.layer.{i}"
        for n in ("query", "key", "value"):
            lin(f"{p}.attention.self.{n}", H, H)
        lin(f"{p}.attention.output.dense", H, H)
        ln(f"{p}.attention.output.LayerNorm", H)
        lin(f"{p}.intermediate.dense", I, H)
        lin(f"{p}.output.dense", H, I)
        ln(f"{p}.output.LayerNorm", H)
    if task in ("classification", "pretraining"):
        lin("bert.pooler.dense", H, H)
    if task == "classification":
        lin("classifier", len(LABELS), H)
    else:
        lin("cls.predictions.transform.dense", H, H)
        ln("cls.predictions.transform.LayerNorm", H)
        sd["cls.predictions.bias"] = rng.normal(0, 0.1, (V,))
        sd["cls.predictions.decoder.weight"] = sd["bert.embeddings.word_embeddings.weight"]  # tied
        sd["cls.predictions.decoder.bias"] = sd["cls.predictions.bias"]
    if task == "pretraining":
        lin("cls.seq_relationship", 2, H)
    sd = {k: np.asarray(v, np.float32) for k, v in sd.items()}
    sd["bert.embeddings.position_ids"] = np.arange(P, dtype=np.int64)[None]  # a buffer
    return sd


_TIED = {"cls.predictions.decoder.weight": "bert.embeddings.word_embeddings.weight", "cls.predictions.decoder.bias": "cls.predictions.bias"}


def save_bin(sd, path, rename=None):
    """``torch.save(module.state_dict())`` of a torch module tree with the keys' names, as
    ``save_pretrained`` writes ``pytorch_model.bin``: an OrderedDict with ``_metadata``, the tied
    decoder as the *same* parameter as the word embeddings (one shared storage, when the values are
    equal), ``position_ids`` an expanded ``arange`` buffer."""
    rename = rename or {}
    root = torch.nn.Module()

    def node(path_):
        m = root
        for part in path_:
            if part not in m._modules:
                m.add_module(part, torch.nn.Module())
            m = m._modules[part]
        return m

    made: dict[str, torch.nn.Parameter] = {}
    for k, v in sd.items():
        *mod, leaf = rename.get(k, k).split(".")
        if k == "bert.embeddings.position_ids":
            node(mod).register_buffer(leaf, torch.arange(v.shape[1]).expand((1, -1)))
            continue
        tie = _TIED.get(k)
        if tie in made and np.array_equal(sd[tie], v):
            param = made[tie]
        else:
            param = torch.nn.Parameter(torch.from_numpy(np.array(v)), requires_grad=False)
        made[k] = param
        node(mod).register_parameter(leaf, param)
    torch.save(root.state_dict(), path)
    return path


def save_hf_safetensors(sd, path):
    from safetensors.numpy import save_file

    # HF drops tied duplicates from model.safetensors; keep only what it writes
    save_file({k: np.ascontiguousarray(v) for k, v in sd.items() if not k.startswith("cls.predictions.decoder.")}, str(path),
              metadata={"format": "pt"})  # fmt: skip
    return path


def write_config(folder, **extra):
    cfg = {"architectures": ["BertForSequenceClassification"], "model_type": "bert", "hidden_act": "gelu",
           "layer_norm_eps": 1e-12, "position_embedding_type": "absolute",
           "id2label": {str(i): n for i, n in enumerate(LABELS)}, **CFG, **extra}  # fmt: skip
    (folder / "config.json").write_text(json.dumps(cfg))


def hand_mapping(sd):
    """The contract's rule written out: dots -> nesting; Linear weight -> kernel (transposed),
    Embedding weight -> embedding, LayerNorm weight -> scale; buffers and tied copies dropped."""
    out = {}
    for k, v in sd.items():
        if k == "bert.embeddings.position_ids" or k.startswith(("cls.predictions.decoder.", "cls.seq_relationship.")):
            continue
        *mod, leaf = k.split(".")
        if leaf == "weight" and mod[-1].endswith("_embeddings"):
            leaf = "embedding"
        elif leaf == "weight" and mod[-1] == "LayerNorm":
            leaf = "scale"
        elif leaf == "weight":
            leaf, v = "kernel", v.T
        out[("params", *mod, leaf)] = v
    return out


def torch_reference(sd, ids, types, mask, task):
    """HF BERT forward in torch float64 from the state dict (eval mode)."""
    g = {k: torch.as_tensor(np.asarray(v, np.float64)) for k, v in sd.items() if v.dtype != np.int64}
    H, nh = CFG["hidden_size"], CFG["num_attention_heads"]
    dh = H // nh
    ids, types = torch.as_tensor(ids), torch.as_tensor(types)
    mask = torch.as_tensor(mask, dtype=torch.float64)
    n, t = ids.shape

    def lin(x, p):
        return x @ g[p + ".weight"].T + g[p + ".bias"]

    def ln(x, p):
        return F.layer_norm(x, (H,), g[p + ".weight"], g[p + ".bias"], eps=1e-12)

    x = g["bert.embeddings.word_embeddings.weight"][ids] + g["bert.embeddings.position_embeddings.weight"][:t][None]
    x = ln(x + g["bert.embeddings.token_type_embeddings.weight"][types], "bert.embeddings.LayerNorm")
    add = (1.0 - mask)[:, None, None, :] * torch.finfo(torch.float64).min  # HF's extended attention mask
    for i in range(CFG["num_hidden_layers"]):
        p = f"bert.encoder.layer.{i}."
        q, k, v = (lin(x, p + "attention.self." + s).view(n, t, nh, dh).transpose(1, 2) for s in ("query", "key", "value"))
        a = torch.softmax(q @ k.transpose(-1, -2) / dh**0.5 + add, dim=-1)
        c = (a @ v).transpose(1, 2).reshape(n, t, H)
        x = ln(lin(c, p + "attention.output.dense") + x, p + "attention.output.LayerNorm")
        x = ln(lin(F.gelu(lin(x, p + "intermediate.dense")), p + "output.dense") + x, p + "output.LayerNorm")
    if task == "classification":
        return lin(torch.tanh(lin(x[:, 0], "bert.pooler.dense")), "classifier").numpy()
    h = ln(F.gelu(lin(x, "cls.predictions.transform.dense")), "cls.predictions.transform.LayerNorm")
    return (h @ g["bert.embeddings.word_embeddings.weight"].T + g["cls.predictions.bias"]).numpy()


def flat(tree):
    from xaijax.checkpoints.trees import flatten

    return {k: np.asarray(v) for k, v in flatten(tree).items()}


@pytest.fixture(scope="module")
def cls_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("bert_cls")
    sd = hf_state_dict("classification", seed=1)
    write_config(d)
    save_bin(sd, d / "pytorch_model.bin")
    save_hf_safetensors(sd, d / "model.safetensors")
    return d, sd


@pytest.fixture(scope="module")
def cls_loaded(cls_files):
    d, _ = cls_files
    return checkpoints.load(None, d / "pytorch_model.bin")


def _batch():
    ids = np.array([[2, 7, 11, 3, 20, 21, 3], [2, 5, 3, 9, 3, 0, 0]], np.int32)
    types = np.array([[0, 0, 0, 0, 1, 1, 1], [0, 0, 0, 1, 1, 0, 0]], np.int32)
    mask = np.array([[1] * 7, [1] * 5 + [0] * 2], np.int32)
    return ids, types, mask


# --------------------------------------------------------------------------------- porting


def test_bin_matches_hand_mapping(cls_files, cls_loaded):
    _, sd = cls_files
    model, variables, info = cls_loaded
    assert isinstance(model, bert.BertForSequenceClassification)
    assert info["model_kwargs"] == {"task": "classification", **CFG, "num_labels": 3, "layer_norm_eps": 1e-12}
    assert info["ignored_keys"] == ["bert.embeddings.position_ids"]
    assert info["class_names"] == LABELS and info["source"] == "huggingface" and info["arch"] == "bert"
    got, want = flat(variables), hand_mapping(sd)
    assert got.keys() == want.keys()
    for k in want:
        assert got[k].dtype == np.float32
        np.testing.assert_array_equal(got[k], want[k], err_msg="/".join(k))


def test_safetensors_equals_bin(cls_files, cls_loaded):
    d, _ = cls_files
    model, variables, info = checkpoints.load(None, d / "model.safetensors")
    assert model == cls_loaded[0] and info["model_kwargs"] == cls_loaded[2]["model_kwargs"]
    a, b = flat(variables), flat(cls_loaded[1])
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_forward_matches_torch_reference(cls_files, cls_loaded, x64):
    _, sd = cls_files
    model, variables, _ = cls_loaded
    ids, types, mask = _batch()
    v64 = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64), variables)
    got = np.asarray(model.apply(v64, ids, token_type_ids=types, attention_mask=mask))
    want = torch_reference(sd, ids, types, mask, "classification")
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6 * np.abs(want).max())
    assert np.abs(got - want).max() < 1e-9  # float64 both ways: agreement to rounding


def test_pretraining_checkpoint_old_names_into_mlm(tmp_path, x64):
    """A BertForPreTraining file (pooler, NSP head, tied decoder) with old LayerNorm gamma/beta
    names -> BertForMaskedLM; pooler and NSP head ignored and reported; MLM logits as HF's."""
    sd = hf_state_dict("pretraining", seed=2)
    rename = {k: k[: -len("weight")] + "gamma" for k in sd if "LayerNorm" in k and k.endswith(".weight")}
    rename.update({k: k[: -len("bias")] + "beta" for k in sd if "LayerNorm" in k and k.endswith(".bias")})
    path = save_bin(sd, tmp_path / "pytorch_model.bin", rename)
    model, variables, info = checkpoints.load("bert", path, num_attention_heads=2)
    assert isinstance(model, bert.BertForMaskedLM) and info["model_kwargs"]["task"] == "mlm"
    assert sorted(info["ignored_keys"]) == sorted(
        ["bert.embeddings.position_ids", "bert.pooler.dense.weight", "bert.pooler.dense.bias",
         "cls.seq_relationship.weight", "cls.seq_relationship.bias"]  # fmt: skip
    )
    got, want = flat(variables), {k: v for k, v in hand_mapping(sd).items() if k[2] != "pooler"}
    assert got.keys() == want.keys() and all(np.array_equal(got[k], want[k]) for k in want)
    ids, types, mask = _batch()
    v64 = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64), variables)
    out = np.asarray(model.apply(v64, ids, token_type_ids=types, attention_mask=mask))
    ref = torch_reference(sd, ids, types, mask, "mlm")
    real = mask.astype(bool)  # padded positions' MLM logits are meaningless in both
    assert np.abs(out[real] - ref[real]).max() < 1e-9 * np.abs(ref).max() + 1e-12


def test_round_trip_state_dict_and_native_port(cls_files, cls_loaded, tmp_path):
    d, sd = cls_files
    model, variables, _ = cls_loaded
    back = bert_mapping.to_torch_state_dict(model, variables)
    assert back.keys() == {k for k in sd if k != "bert.embeddings.position_ids"}
    assert all(np.array_equal(back[k], sd[k]) for k in back)
    # xaijax port: torch file -> native .safetensors -> load, model rebuilt from the metadata
    dst = tmp_path / "bert_nli.safetensors"
    info = checkpoints.port(None, d / "pytorch_model.bin", dst)
    assert info["model_kwargs"]["num_labels"] == 3
    model2, variables2, info2 = checkpoints.load(None, dst)
    assert model2 == model and info2["metadata"]["family"] == "bert"
    assert json.loads(info2["metadata"]["class_names"]) == LABELS
    a, b = flat(variables2), flat(variables)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    assert checkpoints.load("bert-tiny", dst)[0] == model  # any BERT name reads a file recorded as generic "bert"
    named = tmp_path / "named.safetensors"
    checkpoints.save_variables(named, variables, {**info2["metadata"], "arch": "bert-tiny"})
    assert checkpoints.load("bert", named)[0] == model
    with pytest.raises(CheckpointMismatchError, match="holds weights for 'bert-tiny', not 'bert-base-uncased'"):
        checkpoints.load("bert-base-uncased", named)  # two named configurations must agree


def test_cli_port_bert_without_arch(cls_files, cls_loaded, tmp_path, capsys):
    """``xaijax port IN.bin OUT`` with no --arch (config.json beside the file): the summary names
    the BERT sizes, and the written file loads to the same variables; --heads on a ResNet is refused."""
    from xaijax import cli

    d, _ = cls_files
    model, variables, _ = cls_loaded
    dst = tmp_path / "nli.safetensors"
    assert cli.main(["port", str(d / "pytorch_model.bin"), str(dst)]) == 0
    out = capsys.readouterr().out
    model2, variables2, info2 = checkpoints.load(None, dst)
    kw = info2["model_kwargs"]
    assert f"BERT: {kw['num_hidden_layers']} layers, hidden {kw['hidden_size']}" in out and "3 labels" in out, out
    assert model2 == model and kw["num_labels"] == 3
    a, b = flat(variables2), flat(variables)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    assert cli.main(["port", "--arch", "resnet18", "--heads", "2", str(d / "pytorch_model.bin"), str(tmp_path / "x.safetensors")]) == 2
    assert "apply to BERT checkpoints only" in capsys.readouterr().err


def test_mlm_round_trip_forward_equality(tmp_path):
    """Flax init -> to_torch_state_dict (tied decoder written) -> torch.save -> load: the ported
    model's logits equal the original variables' exactly."""
    model = bert.build("test-tiny", task="mlm")
    ids = np.array([[2, 5, 9, 3, 0]], np.int32)
    variables = model.init(jax.random.key(4), ids)
    sd = bert_mapping.to_torch_state_dict(model, variables)
    np.testing.assert_array_equal(sd["cls.predictions.decoder.weight"], sd["bert.embeddings.word_embeddings.weight"])
    path = save_bin(sd, tmp_path / "mlm.bin")
    model2, variables2, _ = checkpoints.load_bert(path, "test-tiny")
    assert model2 == model
    mask = np.array([[1, 1, 1, 1, 0]])
    np.testing.assert_array_equal(model.apply(variables, ids, attention_mask=mask), model2.apply(variables2, ids, attention_mask=mask))


# --------------------------------------------------------------------------------- bad input


def test_strict_keys_one_error(cls_files, tmp_path):
    _, sd = cls_files
    bad = dict(sd)
    del bad["bert.encoder.layer.1.attention.self.key.bias"]
    bad["bert.encoder.layer.0.attention.self.extra.weight"] = np.zeros((8, 8), np.float32)
    bad["bert.encoder.layer.0.intermediate.dense.bias"] = np.zeros((7,), np.float32)
    write_config(tmp_path)
    with pytest.raises(CheckpointMismatchError) as e:
        checkpoints.load(None, save_bin(bad, tmp_path / "pytorch_model.bin"))
    msg = str(e.value)
    assert "missing keys (1): bert.encoder.layer.1.attention.self.key.bias" in msg
    assert "unexpected keys (1): bert.encoder.layer.0.attention.self.extra.weight" in msg
    assert "mis-shaped keys (1): bert.encoder.layer.0.intermediate.dense.bias: checkpoint (7,), model expects (12,)" in msg
    assert str(tmp_path / "pytorch_model.bin") in msg


def test_untied_decoder_refused(tmp_path):
    sd = hf_state_dict("mlm", seed=3)
    sd["cls.predictions.decoder.weight"] = sd["cls.predictions.decoder.weight"] + np.float32(0.5)
    with pytest.raises(CheckpointMismatchError, match=r"untied masked-LM decoder.*decoder.weight differs from bert.embeddings.word_embeddings.weight \(max \|difference\| 0.5\)"):
        checkpoints.load_bert(save_bin(sd, tmp_path / "m.bin"), num_attention_heads=2)


def test_wrong_task_hint(tmp_path):
    path = save_bin(hf_state_dict("mlm", seed=3), tmp_path / "m.bin")
    with pytest.raises(CheckpointMismatchError, match=r"(?s)missing keys.*classifier.*masked-LM / pre-training checkpoint"):
        checkpoints.load_bert(path, task="classification", num_attention_heads=2)


def test_other_architectures_refused(tmp_path):
    resnet = {"conv1.weight": np.zeros((8, 3, 7, 7), np.float32), "layer1.0.conv1.weight": np.zeros((8, 8, 3, 3), np.float32),
              "fc.weight": np.zeros((10, 8), np.float32)}  # fmt: skip
    path = save_bin(resnet, tmp_path / "resnet.bin")
    with pytest.raises(ValueError, match=r"needs an architecture \(--arch\); it looks like a torchvision ResNet"):
        checkpoints.load(None, path)
    with pytest.raises(CheckpointMismatchError, match=r"not a Hugging Face BERT checkpoint.*looks like a torchvision ResNet"):
        checkpoints.load("bert", path)
    vit = {"class_token": np.zeros((1, 1, 8), np.float32), "conv_proj.weight": np.zeros((8, 3, 4, 4), np.float32)}
    with pytest.raises(CheckpointMismatchError, match="looks like a torchvision ViT"):
        checkpoints.load_bert(save_bin(vit, tmp_path / "vit.bin"))
    roberta = {"roberta.embeddings.word_embeddings.weight": np.zeros((5, 8), np.float32)}
    with pytest.raises(CheckpointMismatchError, match="Hugging Face roberta model"):
        checkpoints.load("bert", save_bin(roberta, tmp_path / "roberta.bin"))
    # and a BERT file given to an image architecture
    bert_path = save_bin(hf_state_dict("classification"), tmp_path / "b.bin")
    with pytest.raises(CheckpointMismatchError, match="looks like a Hugging Face BERT checkpoint, but --arch resnet18"):
        checkpoints.load("resnet18", bert_path)


def test_missing_file_and_configuration_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="weights file not found"):
        checkpoints.load("bert", tmp_path / "pytorch_model.bin")
    with pytest.raises(FileNotFoundError, match="weights file not found"):
        checkpoints.load_bert(tmp_path / "model.safetensors")
    path = save_bin(hf_state_dict("classification"), tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointMismatchError, match="head count is not stored in a state dict.*config.json"):
        checkpoints.load(None, path)  # no config.json here
    assert checkpoints.load(None, path, num_attention_heads=2)[0].num_attention_heads == 2
    with pytest.raises(CheckpointMismatchError, match=r"bert-base-uncased configuration says vocab_size=30522 \(checkpoint 40\)"):
        checkpoints.load("bert-base-uncased", path)
    with pytest.raises(CheckpointMismatchError, match="does not divide hidden_size=8"):
        checkpoints.load(None, path, num_attention_heads=3)
    write_config(tmp_path, hidden_act="gelu_new")
    with pytest.raises(CheckpointMismatchError, match="hidden_act 'gelu_new' is not supported"):
        checkpoints.load(None, path)
    write_config(tmp_path, vocab_size=30522)
    with pytest.raises(CheckpointMismatchError, match=r"config.json says vocab_size=30522 \(checkpoint 40\)"):
        checkpoints.load(None, path)
    write_config(tmp_path, num_labels=3)
    assert checkpoints.load(None, path, num_classes=3)[0].num_labels == 3
    with pytest.raises(CheckpointMismatchError, match=r"classifier.weight: checkpoint \(3, 8\)"):
        checkpoints.load(None, path, num_classes=5)


def test_torch_named_safetensors_of_an_image_model(tmp_path):
    """The routing that reads HF's model.safetensors also reads any torch-named .safetensors
    (here a torchvision-named ResNet) when the architecture is given."""
    from xaijax import models
    from xaijax.checkpoints.safetensors_io import save_safetensors

    kw = {"num_classes": 4, "width": 4}
    model = models.get("resnet18", **kw)
    variables = models.random_variables(model, (1, 32, 32, 3), seed=0)
    path = tmp_path / "model.safetensors"
    save_safetensors(path, checkpoints.to_torch_state_dict(model, variables), metadata={"format": "pt"})
    model2, variables2, _ = checkpoints.load("resnet18", path, width=4)
    assert model2 == model
    a, b = flat(variables2), flat(variables)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_native_bert_file_with_a_named_configuration(tmp_path):
    """A native file written by save_variables with a configuration name and partial keywords
    (as a training script writes it): the name's sizes are the defaults, the task comes from the head."""
    model = bert.build("test-tiny", task="mlm", vocab_size=48)
    variables = model.init(jax.random.key(1), np.zeros((1, 4), np.int32))
    path = tmp_path / "mlm.safetensors"
    checkpoints.save_variables(path, variables, metadata={"arch": "test-tiny", "model_kwargs": json.dumps({"vocab_size": 48})})
    model2, variables2, info = checkpoints.load(None, path)
    assert model2 == model and info["model_kwargs"]["task"] == "mlm"
