"""Saved models are portable: self-contained remote code (loads where modformer cannot be
imported), the model card, and the Hugging Face sequence-classification heads."""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from modformer.eval.costs import inference_flops
from modformer.invocation import cli_command
from modformer.models.classification import last_token_indices, sequence_classification_loss
from modformer.models.export_code import RemoteCodeError, _parse, _Source
from modformer.models.gpt import GPTConfig, GPTForCausalLM, GPTForSequenceClassification
from modformer.models.model_card import CARD_FILE, Provenance
from modformer.models.moduleformer import (
    ModuleFormerConfig,
    ModuleFormerForCausalLM,
    ModuleFormerForSequenceClassification,
)
from modformer.models.mom import MoMConfig, MoMForCausalLM, MoMForSequenceClassification
from modformer.train.checkpoint import atomic_save_model

VOCAB = 53
PROMPT = [[5, 17, 3, 44]]
IDS = [[1, 2, 3, 4, 5, 6, 7], [9, 8, 7, 6, 5, 4, 3]]
MASK = [[1, 1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1, 1]]  # row 2 left-padded


def _configs() -> dict[str, object]:
    shape = dict(vocab_size=VOCAB, n_positions=32, n_embd=32)
    return {
        "gpt": GPTConfig(**shape, n_layer=2, n_head=2),
        "mom": MoMConfig(**shape, n_head=4, router_dim=16, chunks="[1-2-1]"),
        "moduleformer": ModuleFormerConfig.from_preset(
            "tiny", **shape, n_layer=2, attention_block_size=8
        ),
        # JetMoE's options: RMSNorm, SwiGLU experts, linear router, softmax + RoPE (their
        # code lives in other nn/ files, which the bundle must pick up)
        "moduleformer_jetmoe": ModuleFormerConfig.from_preset(
            "tiny",
            **shape,
            n_layer=2,
            norm_type="rms",
            expert_mlp="swiglu",
            router_type="linear",
            attention_type="softmax_rope",
            tie_word_embeddings=False,
        ),
    }


CAUSAL = {
    "gpt": GPTForCausalLM,
    "mom": MoMForCausalLM,
    "moduleformer": ModuleFormerForCausalLM,
    "moduleformer_jetmoe": ModuleFormerForCausalLM,
}
CLASSIFIERS = {
    "gpt": GPTForSequenceClassification,
    "mom": MoMForSequenceClassification,
    "moduleformer": ModuleFormerForSequenceClassification,
    "moduleformer_jetmoe": ModuleFormerForSequenceClassification,
}


def _model(arch: str, classifier: bool = False, seed: int = 0):
    config = _configs()[arch]
    torch.manual_seed(seed)
    if classifier:
        config.num_labels = 3
        return CLASSIFIERS[arch](config).eval()
    return CAUSAL[arch](config).eval()


@torch.no_grad()
def _reference(model, classifier: bool) -> dict:
    logits = model(input_ids=torch.tensor(IDS), attention_mask=torch.tensor(MASK)).logits
    out = {"logits": logits.tolist()}
    if not classifier:
        out["generated"] = model.generate(
            torch.tensor(PROMPT), max_new_tokens=6, do_sample=False, use_cache=True
        ).tolist()
    return out


# A Python in which `import modformer` fails (the venv has modformer installed, so a
# meta-path finder refuses it), without our src on the path.
_BLOCKED_PYTHON = """
import json, sys
class _NoModformer:
    def find_spec(self, name, path=None, target=None):
        if name == "modformer" or name.startswith("modformer."):
            raise ImportError(f"modformer is not importable here ({name})")
sys.meta_path.insert(0, _NoModformer())
import torch
torch.set_num_threads(1)
import transformers
try:
    import modformer
    raise SystemExit("modformer should not be importable")
except ImportError:
    pass
results = {}
for path, auto_name, resave in json.loads(sys.argv[1]):
    model = getattr(transformers, auto_name).from_pretrained(path, trust_remote_code=True).eval()
    assert type(model).__module__.startswith("transformers_modules."), type(model).__module__
    with torch.no_grad():
        ids, mask = torch.tensor(IDS), torch.tensor(MASK)
        entry = {"logits": model(input_ids=ids, attention_mask=mask).logits.tolist()}
        if auto_name == "AutoModelForCausalLM":
            entry["generated"] = model.generate(
                torch.tensor(PROMPT), max_new_tokens=6, do_sample=False, use_cache=True
            ).tolist()
            uncached = model.generate(
                torch.tensor(PROMPT), max_new_tokens=6, do_sample=False, use_cache=False
            ).tolist()
            assert uncached == entry["generated"], (uncached, entry["generated"])
    if resave:
        model.save_pretrained(resave)
    results[path] = entry
assert not any(m == "modformer" or m.startswith("modformer.") for m in sys.modules)
print("RESULTS" + json.dumps(results))
"""


def _run_without_modformer(jobs: list[tuple[str, str, str | None]], tmp_path: Path) -> dict:
    code = f"IDS = {IDS}\nMASK = {MASK}\nPROMPT = {PROMPT}\n" + _BLOCKED_PYTHON
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(
        HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "hf_modules"), OMP_NUM_THREADS="1"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, json.dumps(jobs)],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    # As the suite does in-process (conftest), a transformers deprecation is a failure.
    assert not re.search(r"deprecat|will be removed", done.stderr, re.IGNORECASE), done.stderr
    line = next(line for line in done.stdout.splitlines() if line.startswith("RESULTS"))
    return json.loads(line.removeprefix("RESULTS"))


def test_every_architecture_loads_without_modformer(tmp_path):
    """save_pretrained and atomic_save_model of each architecture (and its classifier)
    load in a Python that cannot import modformer: identical logits, identical cached
    greedy continuations (equal to uncached ones there too); a model loaded that way
    re-saves the same files."""
    jobs, expected = [], {}
    for arch in CAUSAL:
        model = _model(arch)
        reference = _reference(model, classifier=False)
        plain, helper = tmp_path / f"{arch}_plain", tmp_path / f"{arch}_helper"
        model.save_pretrained(plain)
        atomic_save_model(model, helper)
        for path in (plain, helper):
            expected[str(path)] = reference
        jobs.append((str(plain), "AutoModelForCausalLM", str(tmp_path / f"{arch}_resaved")))
        jobs.append((str(helper), "AutoModelForCausalLM", None))
        classifier = _model(arch, classifier=True)
        head_dir = tmp_path / f"{arch}_classifier"
        classifier.save_pretrained(head_dir)
        expected[str(head_dir)] = _reference(classifier, classifier=True)
        jobs.append((str(head_dir), "AutoModelForSequenceClassification", None))

    results = _run_without_modformer(jobs, tmp_path)
    for path, want in expected.items():
        got = results[path]
        assert torch.equal(torch.tensor(got["logits"]), torch.tensor(want["logits"])), path
        assert got.get("generated") == want.get("generated"), path
    for arch in CAUSAL:  # re-saved from the remote classes: the same code and auto_map
        plain, resaved = tmp_path / f"{arch}_plain", tmp_path / f"{arch}_resaved"
        for file in plain.glob("*.py"):
            assert (resaved / file.name).read_text() == file.read_text(), file.name
        auto_map = json.loads((plain / "config.json").read_text())["auto_map"]
        assert json.loads((resaved / "config.json").read_text())["auto_map"] == auto_map


def _imports(path: Path) -> list[ast.ImportFrom | ast.Import]:
    tree = ast.parse(path.read_text())
    return [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))]


def test_bundle_is_the_models_import_graph_and_nothing_else(tmp_path):
    model = _model("moduleformer")
    model.save_pretrained(tmp_path)
    files = {p.name for p in tmp_path.glob("*.py")}
    # The ModuleFormer building blocks in nn/ come along through the import graph...
    for needed in ("modeling_moduleformer.py", "configuration_moduleformer.py", "moe.py"):
        assert needed in files
    assert {"stick_breaking.py", "routers.py", "classification.py", "export_code.py"} <= files
    assert {"norms.py", "rope_attention.py"} <= files  # JetMoE's options, added to nn/ later
    # ...and nothing the model does not import (trainer, CLI, costs, the card writer).
    assert not files & {"trainer.py", "cli.py", "checkpoint.py", "costs.py", "model_card.py"}
    for file in tmp_path.glob("*.py"):
        for node in _imports(file):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            module = node.module if isinstance(node, ast.ImportFrom) else None
            assert not any(n.split(".")[0] == "modformer" for n in names), file.name
            if isinstance(node, ast.ImportFrom) and node.level == 0:
                assert module.split(".")[0] != "modformer", (file.name, module)
            if isinstance(node, ast.ImportFrom) and node.level > 0:
                assert node.level == 1 and (tmp_path / f"{module}.py").is_file()
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["auto_map"] == {
        "AutoConfig": "configuration_moduleformer.ModuleFormerConfig",
        "AutoModel": "modeling_moduleformer.ModuleFormerModel",
        "AutoModelForCausalLM": "modeling_moduleformer.ModuleFormerForCausalLM",
        "AutoModelForSequenceClassification": (
            "modeling_moduleformer.ModuleFormerForSequenceClassification"
        ),
    }
    # With modformer imported its own classes are used (local code wins over auto_map).
    assert type(AutoModelForCausalLM.from_pretrained(tmp_path)) is ModuleFormerForCausalLM
    text = (tmp_path / "modeling_moduleformer.py").read_text()
    assert text.startswith("# Generated by modformer from modformer/models/moduleformer/")


def test_unsupported_import_forms_are_refused_with_the_fix(tmp_path):
    module = tmp_path / "fake.py"
    module.write_text("import modformer.nn.moe\n")
    with pytest.raises(RemoteCodeError, match="write `from <module> import <name>`"):
        _parse(_Source(module, "modformer.nn.fake"))
    module.write_text("from modformer.nn import moe\n")
    with pytest.raises(RemoteCodeError, match="import the names from modformer.nn.moe"):
        _parse(_Source(module, "modformer.nn.fake"))


# ---- model card --------------------------------------------------------------------------


def test_model_card_states_costs_provenance_and_load_commands(tmp_path):
    model = _model("mom")
    provenance = Provenance(
        method="train",
        command="modformer train --config run.yaml",
        source="runs/vanilla/model",
        data="data/python",
        steps=120,
        tokens=61_440,
        val_loss=2.3456789,
    )
    dest = atomic_save_model(model, tmp_path / "mom", provenance=provenance)
    card = (dest / CARD_FILE).read_text()
    report = inference_flops(model, torch.randint(0, VOCAB, (1, 32), generator=_seed0()))
    total = sum(p.numel() for p in model.parameters())
    assert "A `MoMForCausalLM` (model_type `modformer_mom`)" in card
    assert f"- total parameters: {total:,}\n" in card
    assert f"- active parameters per token: {round(report.active_parameters):,} " in card
    assert f"- inference FLOPs per token: {round(report.per_token):,} " in card
    assert "chunks=[1-2-1]" in card
    for line in (
        "- made by: train",
        "- command: `modformer train --config run.yaml`",
        "- from: `runs/vanilla/model`",
        "- training data: `data/python`",
        "- training steps: 120",
        "- training tokens: 61,440",
        "- final validation loss: 2.3457",
    ):
        assert line + "\n" in card
    quoted = json.dumps(str(dest))
    assert f"AutoModelForCausalLM.from_pretrained({quoted})" in card
    assert f"AutoModelForCausalLM.from_pretrained({quoted}, trust_remote_code=True)" in card


def _seed0() -> torch.Generator:
    return torch.Generator().manual_seed(0)


def test_model_card_leaves_out_what_nobody_knows(tmp_path):
    card = (atomic_save_model(_model("gpt"), tmp_path / "g") / CARD_FILE).read_text()
    assert "## How it was made" not in card
    for absent in ("training", "validation", "command", "made by"):
        assert absent not in card.split("## Load it")[0]
    # Inside the CLI the command line is recorded; outside it, it is not.
    with cli_command(["convert", "gpt2", "src", "dst"]):
        card = (atomic_save_model(_model("gpt"), tmp_path / "c") / CARD_FILE).read_text()
    assert "- command: `modformer convert gpt2 src dst`\n" in card
    card = (atomic_save_model(_model("gpt"), tmp_path / "d") / CARD_FILE).read_text()
    assert "command" not in card.split("## Load it")[0]
    with pytest.raises(ValueError, match="provenance method 'trian' is unknown"):
        Provenance(method="trian")


def test_model_card_survives_a_failed_count(tmp_path, monkeypatch, caplog):
    """Counting FLOPs must never cost the model: the figures are left out, with a warning."""

    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(GPTForCausalLM, "flop_counter", staticmethod(broken))
    card = (atomic_save_model(_model("gpt"), tmp_path / "g") / CARD_FILE).read_text()
    assert "- total parameters: " in card
    assert "FLOPs" not in card and "active parameters" not in card
    assert "counting failed: boom" in caplog.text


def test_classifier_card_uses_its_auto_class(tmp_path):
    card = (atomic_save_model(_model("gpt", True), tmp_path / "h") / CARD_FILE).read_text()
    assert "AutoModelForSequenceClassification.from_pretrained(" in card
    assert "- sequence-classification head: 3 outputs: LABEL_0, LABEL_1, LABEL_2\n" in card
    assert "FLOPs" not in card  # cost accounting covers the causal LMs only


# ---- sequence classification -------------------------------------------------------------


@pytest.mark.parametrize("arch", list(CLASSIFIERS))
def test_classifier_round_trip_the_hf_way(arch, tmp_path):
    model = _model(arch, classifier=True)
    model.config.id2label = {0: "neg", 1: "neutral", 2: "pos"}
    model.config.label2id = {v: k for k, v in model.config.id2label.items()}
    model.save_pretrained(tmp_path)
    assert not list(tmp_path.glob("*.pt"))
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    assert type(loaded) is CLASSIFIERS[arch]
    assert loaded.config.id2label == {0: "neg", 1: "neutral", 2: "pos"}
    ids, mask = torch.tensor(IDS), torch.tensor(MASK)
    with torch.no_grad():
        assert torch.equal(loaded(ids, attention_mask=mask).logits, model(ids, mask).logits)
        # A right-padded row is read at its last real token: as if it were alone.
        right_padded = torch.tensor([[1] * 7, [1] * 5 + [0] * 2])
        padded = model(ids, right_padded).logits[1]
        alone = model(ids[1:, :5]).logits[0]
    torch.testing.assert_close(padded, alone, atol=1e-5, rtol=1e-5)


def test_last_token_pooling_and_losses():
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    cpu = torch.device("cpu")
    assert last_token_indices(None, mask, (3, 5), None, cpu).tolist() == [2, 4, 4]
    ids = torch.tensor([[4, 5, 0, 0], [4, 5, 6, 7]])
    assert last_token_indices(ids, None, (2, 4), 0, cpu).tolist() == [1, 3]
    assert last_token_indices(ids, None, (2, 4), None, cpu).tolist() == [3, 3]
    assert last_token_indices(None, None, (2, 4), 0, cpu).tolist() == [3, 3]  # embeddings

    logits = torch.tensor([[2.0, -1.0, 0.5], [0.0, 1.0, 3.0]])
    labels = torch.tensor([0, 2])
    loss, kind = sequence_classification_loss(logits, labels, None, 3)
    assert kind == "single_label_classification"
    torch.testing.assert_close(loss, torch.nn.functional.cross_entropy(logits, labels))
    loss, kind = sequence_classification_loss(logits[:, :1], torch.tensor([1.5, 0.0]), None, 1)
    assert kind == "regression"
    torch.testing.assert_close(loss, torch.tensor(((2.0 - 1.5) ** 2 + 0.0) / 2))
    with pytest.raises(ValueError, match="problem_type 'ranking' is unknown"):
        sequence_classification_loss(logits, labels, "ranking", 3)


def test_load_classifier_refuses_a_directory_without_a_head(tmp_path):
    """An older finetune output (a causal LM plus a side head file) gets the fix."""
    from modformer.eval.downstream import CLASSIFIER_META_FILE, load_classifier

    _model("gpt").save_pretrained(tmp_path / "model")
    task = {"text_columns": ["text"], "label_column": "label", "labels": ["a", "b"]}
    (tmp_path / CLASSIFIER_META_FILE).write_text(json.dumps(task))
    with pytest.raises(ValueError, match="without a classification head.*fine-tune it again"):
        load_classifier(tmp_path)
