"""Tests of the data pipeline: corpus, tokenizers, `prepare` output format, TokenDataset."""

from __future__ import annotations

import argparse
import importlib
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import GPT2Tokenizer, PreTrainedTokenizerFast

from modformer.cli_args_train import add_prepare_arguments
from modformer.commands.prepare import run_prepare
from modformer.data import (
    DataError,
    TokenDataset,
    build_corpus,
    load_tokenizer,
    prepare,
    read_meta,
    token_dtype,
)
from modformer.data.corpus import c_headers_domain
from modformer.data.prepare import position_split, validation_documents
from modformer.data.tokenizer import EOS_TOKEN

# The package exports the `prepare` function under the module's name, so fetch the module.
prepare_module = importlib.import_module("modformer.data.prepare")

TINY = 20_000  # bytes per built-in domain: enough text to be real, fast to tokenize


def has_c_headers() -> bool:
    include = Path("/usr/include")
    return include.is_dir() and any(include.rglob("*.h"))


def split_documents_at_eos(tokens: np.ndarray, eos: int) -> list[np.ndarray]:
    """The documents of a token stream in which every document ends with eos."""
    assert len(tokens) == 0 or tokens[-1] == eos
    ends = np.flatnonzero(tokens == eos)
    starts = np.concatenate([[0], ends[:-1] + 1])
    return [tokens[s:e] for s, e in zip(starts, ends)]


def read_split(data_dir: Path, split: str) -> np.ndarray:
    meta = json.loads((data_dir / "meta.json").read_text())
    return np.fromfile(data_dir / f"{split}.bin", dtype=meta["dtype"])


@pytest.fixture
def user_files(tmp_path: Path) -> dict[str, Path]:
    """Two .txt documents of domain-specific letters and a .jsonl of three documents."""
    raw = tmp_path / "raw"
    raw.mkdir()
    files = {
        "alpha": raw / "alpha.txt",
        "beta": raw / "beta.txt",
        "records": raw / "records.jsonl",
    }
    files["alpha"].write_text("aaaa aaa\naa a aaaa\n" * 40, encoding="utf-8")
    files["beta"].write_text("bbb bb ünïcödé b\r\nbbbb\n" * 10, encoding="utf-8")
    records = [{"text": f"record {i}: the quick brown fox {'x' * i}", "id": i} for i in range(3)]
    files["records"].write_text(
        "".join(json.dumps(r) + "\n" for r in records) + "\n", encoding="utf-8"
    )
    return files


def test_builtin_corpus_has_named_capped_deterministic_domains():
    corpus = build_corpus(max_bytes_per_domain=TINY)
    expected = ["python", "prose", "c"] if has_c_headers() else ["python", "prose"]
    assert list(corpus.domains) == expected
    for domain in corpus.domains.values():
        assert 0.5 * TINY < domain.num_bytes <= TINY
        assert all(doc.strip() for doc in domain.documents)
    assert "import" in "".join(corpus.domains["python"].documents)
    python_source = corpus.domains["python"].sources[0]
    assert python_source["builtin"] and "site-packages" not in python_source["path"]
    again = build_corpus(max_bytes_per_domain=TINY)
    for name in expected:
        assert again.domains[name].documents == corpus.domains[name].documents


def test_builtin_domain_selection_and_unknown_domain():
    corpus = build_corpus(domains=["prose"], max_bytes_per_domain=3_000)
    assert list(corpus.domains) == ["prose"]
    assert corpus.domains["prose"].num_bytes <= 3_000
    with pytest.raises(DataError, match="unknown built-in domain.*'poetry'.*python, prose, c"):
        build_corpus(domains=["prose", "poetry"])


def test_missing_c_include_dir_gives_empty_domain_with_warning(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="modformer.data.corpus"):
        domain = c_headers_domain(include_dir=tmp_path / "no-include")
    assert domain.documents == []
    assert "does not exist" in caplog.text


def test_prepare_user_inputs_writes_documented_format(tmp_path, user_files):
    out = tmp_path / "data"
    meta = prepare(
        out,
        inputs=[str(p) for p in user_files.values()],
        tokenizer="byte",
        val_fraction=0.3,
        progress=False,
    )
    assert sorted(p.name for p in out.iterdir()) == [
        "meta.json",
        "tokenizer",
        "train.bin",
        "val.bin",
    ]
    assert meta == read_meta(out)
    assert meta["format_version"] == 1 and meta["dtype"] == "uint16"
    assert meta["vocab_size"] == 257 and meta["eos_token_id"] == 256
    assert meta["tokenizer"]["kind"] == "byte"
    assert list(meta["domains"]) == ["alpha", "beta", "records"]
    # Domains alpha and beta are single documents, split by position; records by document.
    assert meta["domains"]["alpha"]["split_by"] == "position"
    assert meta["domains"]["records"]["documents"] == 3
    assert meta["domains"]["records"]["val_documents"] == 1
    for name in ("alpha", "beta"):
        assert meta["domains"][name]["bytes"] == user_files[name].stat().st_size
    assert sorted(s["path"] for s in meta["sources"]) == sorted(str(p) for p in user_files.values())

    for split in ("train", "val"):
        tokens = read_split(out, split)
        info = meta["splits"][split]
        assert info["tokens"] == len(tokens)
        assert (out / f"{split}.bin").stat().st_size == 2 * len(tokens)
        bounds = list(info["domains"].values())
        assert bounds[0][0] == 0 and bounds[-1][1] == len(tokens)
        assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
        for name, (start, end) in info["domains"].items():
            assert end - start == meta["domains"][name][f"{split}_tokens"]
    # Bytes tokenizer: every byte is one token, plus one eos per stored piece.
    train, val = read_split(out, "train"), read_split(out, "val")
    for stats in meta["domains"].values():
        pieces = 2 if stats["split_by"] == "position" else stats["documents"]
        assert stats["train_tokens"] + stats["val_tokens"] == stats["bytes"] + pieces
    # The text comes back exactly, domain by domain.
    for name in ("alpha", "beta"):
        (ts, te), (vs, ve) = (meta["splits"][s]["domains"][name] for s in ("train", "val"))
        text = bytes(train[ts : te - 1].astype(np.uint8)) + bytes(val[vs : ve - 1].astype(np.uint8))
        assert text == user_files[name].read_bytes()
    start, end = meta["splits"]["val"]["domains"]["records"]
    (val_record,) = split_documents_at_eos(val[start:end], 256)
    assert bytes(val_record.astype(np.uint8)).decode().startswith("record ")


def test_bpe_prepare_is_deterministic_and_round_trips(tmp_path, user_files):
    inputs = [str(p) for p in user_files.values()]
    metas = [
        prepare(
            tmp_path / f"run{i}", inputs=inputs, vocab_size=300, val_fraction=0.3, progress=False
        )
        for i in range(2)
    ]
    for name in ("train.bin", "val.bin", "tokenizer/tokenizer.json"):
        assert (tmp_path / "run0" / name).read_bytes() == (tmp_path / "run1" / name).read_bytes()
    meta = metas[0]
    assert meta["tokenizer"]["kind"] == "bpe" and meta["vocab_size"] == 300
    tokenizer = load_tokenizer(tmp_path / "run0")
    assert isinstance(tokenizer, PreTrainedTokenizerFast)
    assert tokenizer.eos_token == tokenizer.bos_token == tokenizer.pad_token == EOS_TOKEN
    assert tokenizer.eos_token_id == meta["eos_token_id"]
    # The records domain splits by document: decoding its documents gives the inputs back.
    records = [
        json.loads(line)["text"] for line in user_files["records"].read_text().split("\n") if line
    ]
    decoded = []
    for split in ("train", "val"):
        start, end = meta["splits"][split]["domains"]["records"]
        tokens = read_split(tmp_path / "run0", split)[start:end]
        decoded += [
            tokenizer.decode(doc.tolist())
            for doc in split_documents_at_eos(tokens, tokenizer.eos_token_id)
        ]
    assert sorted(decoded) == sorted(records)
    # BPE merges something: fewer tokens than bytes.
    assert meta["domains"]["alpha"]["train_tokens"] < 0.5 * meta["domains"]["alpha"]["bytes"]


def test_literal_end_of_text_string_in_a_document_is_not_a_separator(tmp_path):
    doc = tmp_path / "tricky.txt"
    doc.write_text(f"before {EOS_TOKEN} after\n" * 5)
    meta = prepare(tmp_path / "out", inputs=[str(doc)], vocab_size=280, progress=False)
    tokens = np.concatenate([read_split(tmp_path / "out", s) for s in ("train", "val")])
    # One document split by position: one eos closes each of its two pieces, no others.
    assert int((tokens == meta["eos_token_id"]).sum()) == 2
    tokenizer = load_tokenizer(tmp_path / "out")
    assert tokenizer.decode(tokens[tokens != meta["eos_token_id"]].tolist()) == doc.read_text()


def _gpt2_style_vocab() -> tuple[dict[str, int], list[tuple[str, str]]]:
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    vocab = {symbol: byte for byte, symbol in bytes_to_unicode().items()}
    merges = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("Ġ", "f")]
    for left, right in merges:
        vocab[left + right] = len(vocab)
    vocab[EOS_TOKEN] = len(vocab)  # last id, as in GPT-2 (50256)
    return vocab, merges


@pytest.mark.parametrize(
    "layout", ["save_pretrained_dir", "tokenizer_json_file", "vocab_merges_dir"]
)
def test_local_gpt2_style_tokenizer(tmp_path, layout):
    vocab, merges = _gpt2_style_vocab()
    saved = tmp_path / "gpt2-tiny"
    GPT2Tokenizer(vocab=vocab, merges=merges).save_pretrained(str(saved))
    if layout == "save_pretrained_dir":
        source = saved
    elif layout == "tokenizer_json_file":
        source = saved / "tokenizer.json"
    else:
        source = tmp_path / "gpt2-files"
        source.mkdir()
        (source / "vocab.json").write_text(json.dumps(vocab))
        (source / "merges.txt").write_text(
            "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges)
        )
    docs = tmp_path / "docs"
    docs.mkdir()
    for i in range(4):
        (docs / f"d{i}.txt").write_text(f"the fox {i} the end")
    meta = prepare(tmp_path / "out", inputs=[str(docs)], tokenizer=str(source), progress=False)
    assert meta["tokenizer"]["kind"] == "hf"
    assert meta["vocab_size"] == len(vocab)
    assert meta["eos_token_id"] == vocab[EOS_TOKEN]
    assert list(meta["domains"]) == ["docs"]  # a directory input is named after the directory
    train = read_split(tmp_path / "out", "train")
    first_doc = split_documents_at_eos(train, meta["eos_token_id"])[0]
    # "the fox 0 the end": the merges apply (Ġthe is one token).
    assert first_doc.tolist().count(vocab["Ġthe"]) == 1
    tokenizer = load_tokenizer(tmp_path / "out")
    assert tokenizer.decode(first_doc.tolist()).startswith("the fox ")
    assert tokenizer.pad_token_id == vocab[EOS_TOKEN]


def test_token_dtype_selection():
    assert token_dtype(257) == np.uint16
    assert token_dtype(65536) == np.uint16
    assert token_dtype(65537) == np.uint32
    assert token_dtype(50257) == np.uint16
    with pytest.raises(DataError):
        token_dtype(0)


def test_validation_split_rules():
    for n in range(2, 30):
        mask = validation_documents([10] * n, 0.1, seed=0, domain="x")
        assert mask.sum() == max(1, n // 10)  # equal documents: a tenth of them, at least one
    assert validation_documents([10], 0.1, seed=0, domain="x").sum() == 0
    # One huge document does not swamp validation: small ones fill it to just under 10%.
    sizes = np.array([10_000] + [10] * 999)
    mask = validation_documents(sizes, 0.1, seed=0, domain="x")
    assert not mask[0] and 0.1 * sizes.sum() - 10 < sizes[mask].sum() <= 0.1 * sizes.sum()
    # No document fits the budget: the smallest one goes to validation.
    assert validation_documents([500, 40, 900], 0.01, seed=0, domain="x").tolist() == [0, 1, 0]
    sizes = np.arange(1, 201)
    a = validation_documents(sizes, 0.1, seed=0, domain="x")
    assert np.array_equal(a, validation_documents(sizes, 0.1, seed=0, domain="x"))
    assert not np.array_equal(a, validation_documents(sizes, 0.1, seed=1, domain="x"))
    assert not np.array_equal(a, validation_documents(sizes, 0.1, seed=0, domain="y"))
    assert position_split(1000, 0.1) == 900
    assert position_split(2, 0.01) == 1
    assert position_split(1, 0.1) == 1


def test_bad_user_inputs_are_skipped_and_recorded(tmp_path, monkeypatch, caplog):
    good = tmp_path / "good.txt"
    good.write_text("fine text\n")
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("caf\xe9".encode("latin-1"))
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    locked = tmp_path / "locked.txt"
    locked.write_text("secret")
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_bytes(
        b'{"text": "ok one"}\nnot json\n{"body": "no text field"}\n'
        b'{"text": 5}\n\xff\xfe\n{"text": "ok two"}\n'
    )
    real_read_bytes = Path.read_bytes

    def read_bytes(path: Path) -> bytes:
        if path == locked:
            raise PermissionError(13, "Permission denied", str(path))
        return real_read_bytes(path)

    monkeypatch.setattr(Path, "read_bytes", read_bytes)
    with caplog.at_level(logging.WARNING):
        meta = prepare(
            tmp_path / "out",
            inputs=[str(p) for p in (good, latin1, empty, locked, mixed)],
            domain="all",
            tokenizer="byte",
            progress=False,
        )
    assert list(meta["domains"]) == ["all"]
    assert meta["domains"]["all"]["documents"] == 3  # good.txt + two jsonl lines
    reasons = {(Path(s["path"]).name, s.get("line")): s["reason"] for s in meta["skipped"]}
    assert "UTF-8" in reasons[("latin1.txt", None)]
    assert "empty" in reasons[("empty.txt", None)]
    assert "Permission denied" in reasons[("locked.txt", None)]
    assert "not valid JSON" in reasons[("mixed.jsonl", 2)]
    assert "'text'" in reasons[("mixed.jsonl", 3)] and "--text-field" in reasons[("mixed.jsonl", 3)]
    assert "not a string" in reasons[("mixed.jsonl", 4)]
    assert "UTF-8" in reasons[("mixed.jsonl", 5)]
    assert len(reasons) == 7
    assert "latin1.txt" in caplog.text and "mixed.jsonl:2" in caplog.text


def test_domain_naming_rules(tmp_path):
    (tmp_path / "books").mkdir()
    (tmp_path / "books" / "one.txt").write_text("first book")
    (tmp_path / "books" / "nested").mkdir()
    (tmp_path / "books" / "nested" / "two.jsonl").write_text('{"text": "second book"}\n')
    (tmp_path / "books" / "ignored.md").write_text("a directory only gives .txt/.jsonl")
    (tmp_path / "code=1.txt").write_text("an '=' in an existing path is part of the path")
    (tmp_path / "notes.txt").write_text("a note")
    corpus = build_corpus(
        [
            str(tmp_path / "books"),
            str(tmp_path / "books" / "one.txt"),  # already read via its directory
            str(tmp_path / "code=1.txt"),
            f"misc={tmp_path / 'notes.txt'}",
            f"misc={tmp_path / 'code=1.txt'}",  # merged into misc? no: read once already
        ]
    )
    assert list(corpus.domains) == ["books", "code=1", "misc"]
    # Sorted paths: books/nested/two.jsonl comes before books/one.txt.
    assert corpus.domains["books"].documents == ["second book", "first book"]
    assert corpus.domains["misc"].documents == ["a note"]
    single = build_corpus(str(tmp_path / "notes.txt"), domain="mine")  # a bare path works
    assert list(single.domains) == ["mine"]


def test_jsonl_text_field_is_configurable(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text('{"body": "first"}\n{"body": "second"}\n')
    meta = prepare(
        tmp_path / "out",
        inputs=[f"notes={data}"],
        text_field="body",
        tokenizer="byte",
        progress=False,
    )
    assert meta["domains"]["notes"]["documents"] == 2 and meta["skipped"] == []


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(inputs=["{tmp}/missing.txt"]), "does not exist"),
        (dict(inputs=["{tmp}/*.nothing"]), "matches no files"),
        (dict(inputs=["{tmp}/empty_dir"]), "no .txt or .jsonl files"),
        (dict(inputs=["{tmp}/empty.txt"]), "no documents.*empty.txt: file is empty"),
        (dict(inputs=["{tmp}/bad.jsonl"]), "no documents.*bad.jsonl"),
        (dict(inputs=[]), "inputs is an empty list"),
        (
            dict(inputs=["{tmp}/ok.txt"], tokenizer="{tmp}/no_tokenizer"),
            "neither 'bpe', 'byte' nor an existing path",
        ),
        (dict(inputs=["{tmp}/ok.txt"], tokenizer="{tmp}/empty_dir"), "has no tokenizer.json"),
        (dict(inputs=["{tmp}/ok.txt"], tokenizer="{tmp}/bad.jsonl"), "cannot load the tokenizer"),
        (dict(inputs=["{tmp}/ok.txt"], vocab_size=256), "too small.*at least 257"),
        (dict(inputs=["{tmp}/ok.txt"], val_fraction=0.0), r"val_fraction must be in \(0, 0.5\]"),
        (dict(inputs=["{tmp}/ok.txt"], val_fraction=0.6), r"val_fraction must be in \(0, 0.5\]"),
        (dict(inputs=["{tmp}/ok.txt"], domain="bad name"), "domain name 'bad name'"),
        (
            dict(inputs=["{tmp}/ok.txt"], max_bytes_per_domain=0),
            "max_bytes_per_domain must be positive",
        ),
    ],
)
def test_bad_inputs_raise_data_error(tmp_path, kwargs, message):
    (tmp_path / "empty_dir").mkdir()
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "bad.jsonl").write_text("nope\n")
    (tmp_path / "ok.txt").write_text("some text " * 50)
    kwargs = {
        key: [v.format(tmp=tmp_path) for v in value]
        if key == "inputs"
        else value.format(tmp=tmp_path)
        if key == "tokenizer"
        else value
        for key, value in kwargs.items()
    }
    with pytest.raises(DataError, match=message):
        prepare(tmp_path / "out", progress=False, **kwargs)
    assert not (tmp_path / "out").exists()


def test_hf_tokenizer_without_eos_token_is_rejected(tmp_path):
    from tokenizers import Tokenizer, models

    Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]")).save(
        str(tmp_path / "t.json")
    )
    (tmp_path / "x.txt").write_text("a a a")
    with pytest.raises(DataError, match="no end-of-text token"):
        prepare(
            tmp_path / "out",
            inputs=[str(tmp_path / "x.txt")],
            tokenizer=str(tmp_path / "t.json"),
            progress=False,
        )


def test_refuses_to_overwrite_unless_asked(tmp_path):
    text = tmp_path / "x.txt"
    text.write_text("hello world " * 20)
    out = tmp_path / "out"
    out.mkdir()  # an empty directory is fine to fill
    prepare(out, inputs=[str(text)], tokenizer="byte", progress=False)
    with pytest.raises(DataError, match="already exists and is not empty.*--overwrite"):
        prepare(out, inputs=[str(text)], tokenizer="byte", progress=False)
    meta = prepare(
        out, inputs=[str(text)], tokenizer="byte", seed=5, overwrite=True, progress=False
    )
    assert read_meta(out)["seed"] == 5 == meta["seed"]
    other = tmp_path / "not-data"
    other.mkdir()
    (other / "precious.txt").write_text("keep me")
    with pytest.raises(DataError, match="refusing to delete it"):
        prepare(other, inputs=[str(text)], tokenizer="byte", overwrite=True, progress=False)
    assert (other / "precious.txt").read_text() == "keep me"


def test_failure_mid_write_leaves_no_output_directory(tmp_path, monkeypatch):
    text = tmp_path / "x.txt"
    text.write_text("hello world " * 20)

    def crash(directory, meta):
        assert (directory / "train.bin").stat().st_size > 0  # the bins were being written
        raise RuntimeError("simulated crash")

    monkeypatch.setattr(prepare_module, "_write_meta", crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        prepare(tmp_path / "out", inputs=[str(text)], tokenizer="byte", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.txt"]  # no output, no temp dir

    monkeypatch.undo()
    prepare(tmp_path / "out", inputs=[str(text)], tokenizer="byte", seed=1, progress=False)
    monkeypatch.setattr(prepare_module, "_write_meta", crash)
    with pytest.raises(RuntimeError):
        prepare(
            tmp_path / "out",
            inputs=[str(text)],
            tokenizer="byte",
            seed=2,
            overwrite=True,
            progress=False,
        )
    assert read_meta(tmp_path / "out")["seed"] == 1  # the previous data is untouched
    assert TokenDataset(tmp_path / "out").get_batch(2, 8, torch.Generator()).shape == (2, 8)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "x.txt"]


def test_cli_arguments_and_run(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    add_prepare_arguments(parser)
    for action in parser._actions:
        assert action.help, f"option {action.dest} has no help text"
    text = tmp_path / "story.txt"
    text.write_text("once upon a time " * 30)
    out = tmp_path / "cli-out"
    args = parser.parse_args(
        [
            str(out),
            "--inputs",
            f"tales={text}",
            "--domains",
            "prose",
            "--max-bytes-per-domain",
            "4000",
            "--vocab-size",
            "300",
            "--val-fraction",
            "0.2",
            "--seed",
            "3",
            "--no-progress",
        ]
    )
    meta = run_prepare(args)
    assert list(meta["domains"]) == ["prose", "tales"]
    assert meta["seed"] == 3 and meta["vocab_size"] == 300 and meta["val_fraction"] == 0.2
    assert "tales" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        parser.parse_args([str(out), "--domains", ","])


def test_directory_inputs_take_the_named_suffixes(tmp_path):
    """Defect 5: `code=src/` read only .txt/.jsonl (egg-info files, no Python source)."""
    from modformer.data.corpus import expand_input, user_domains

    src = tmp_path / "src"
    (src / "pkg").mkdir(parents=True)
    (src / "pkg" / "a.py").write_text("def a():\n    return 1\n")
    (src / "b.py").write_text("B = 2\n")
    (src / "pkg.egg-info").mkdir()
    (src / "pkg.egg-info" / "SOURCES.txt").write_text("pkg/a.py\n")
    files, is_directory = expand_input(str(src))
    assert is_directory and [f.name for f in files] == ["SOURCES.txt"]  # the default
    files, _ = expand_input(str(src), suffixes=["py"])  # a bare suffix gets its dot
    assert [f.relative_to(src).as_posix() for f in files] == ["b.py", "pkg/a.py"]
    domains = user_domains([f"code={src}"], suffixes=[".py"])
    assert sorted(domains["code"].documents) == ["B = 2\n", "def a():\n    return 1\n"]
    # A quoted recursive glob does the same without --suffixes.
    files, _ = expand_input(f"{src}/**/*.py")
    assert sorted(f.name for f in files) == ["a.py", "b.py"]
    with pytest.raises(DataError, match=r"no \.md files.*--suffixes"):
        expand_input(str(src), suffixes=[".md"])
    with pytest.raises(DataError, match="file endings"):
        expand_input(str(src), suffixes=["*.py"])
    meta = prepare(
        tmp_path / "out",
        inputs=[f"code={src}"],
        suffixes=[".py"],
        tokenizer="byte",
        progress=False,
    )
    assert meta["domains"]["code"]["documents"] == 2
