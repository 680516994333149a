"""Downstream fine-tuning: metrics, file reading, encoding, the classifier head, learning
on easy synthetic tasks, summarisation with ROUGE, the `finetune` CLI, and bad input."""

from __future__ import annotations

import argparse
import csv
import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from modformer.cli_args import add_finetune_arguments
from modformer.commands.finetune import run_finetune
from modformer.data.dataset import load_tokenizer as load_data_tokenizer
from modformer.eval.downstream import (
    IGNORE_INDEX,
    ClassificationTask,
    FinetuneConfig,
    SequenceClassifier,
    SummarizationTask,
    _truncate_pair,
    accuracy,
    classification_metrics,
    encode_for_classification,
    encode_for_summarization,
    f1_binary,
    f1_macro,
    finetune_classifier,
    finetune_summarizer,
    generate_summaries,
    greedy_continuations,
    label_set,
    last_hidden_states,
    load_classifier,
    matthews_corrcoef,
    pad_batch,
    pearson,
    predict_classifier,
    read_records,
    regression_metrics,
    rouge_scores,
    score_classifier,
    score_summarizer,
    spearman,
    summarization_prompts,
)
from modformer.models.gpt import GPTConfig, GPTForCausalLM
from modformer.models.loading import load_model, load_tokenizer
from modformer.models.registry import ARCHITECTURES, build_config, build_model
from modformer.train.checkpoint import save_model_files

BYTE_VOCAB = 257  # 256 bytes + <|endoftext|> (id 256)
EOS = 256
WORDS = ["red", "blue", "green", "dark", "light", "cold", "warm", "big", "small", "old", "new"]
KEYWORD = "zoo"  # its letter z occurs in no other word


@pytest.fixture(autouse=True)
def one_thread():
    # Tiny models run fastest single-threaded, and the CPU is shared.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tokenizer(tiny_data_dir):
    return load_data_tokenizer(tiny_data_dir)


def tiny_lm(seed: int = 0, n_positions: int = 64) -> GPTForCausalLM:
    torch.manual_seed(seed)
    config = GPTConfig(
        vocab_size=BYTE_VOCAB, n_positions=n_positions, n_embd=32, n_layer=1, n_head=2
    )
    return GPTForCausalLM(config)


@pytest.fixture(scope="module")
def model_dir(tiny_data_dir, tmp_path_factory) -> Path:
    """A saved tiny GPT with the byte tokenizer beside it, as `modformer train` saves."""
    directory = tmp_path_factory.mktemp("finetune") / "model"
    save_model_files(tiny_lm(), directory, tiny_data_dir / "tokenizer")
    return directory


def sentence(rng: random.Random, keywords: int) -> str:
    words = [rng.choice(WORDS) for _ in range(rng.randint(2, 5))]
    for _ in range(keywords):
        words.insert(rng.randrange(len(words) + 1), KEYWORD)
    return " ".join(words)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def write_csv(path: Path, rows: list[dict], delimiter: str = ",") -> Path:
    with open(path, "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=list(rows[0]), delimiter=delimiter)
        writer.writeheader()
        writer.writerows(rows)
    return path


def keyword_rows(n: int, seed: int) -> list[dict]:
    """label "yes" iff the sentence contains the keyword; balanced."""
    rng = random.Random(seed)
    return [{"sentence": sentence(rng, i % 2), "label": "yes" if i % 2 else "no"} for i in range(n)]


# ---------------------------------------------------------------------------------------
# Metrics against hand-computed values
# ---------------------------------------------------------------------------------------


def test_binary_metrics_by_hand():
    y_true = [0, 0, 1, 1, 1, 0]
    y_pred = [0, 1, 1, 1, 0, 0]
    # class 1: tp 2, fp 1, fn 1, tn 2
    assert accuracy(y_true, y_pred) == pytest.approx(4 / 6)
    assert f1_binary(y_true, y_pred) == pytest.approx(2 * 2 / (2 * 2 + 1 + 1))
    assert f1_binary(y_true, y_pred, positive=0) == pytest.approx(2 / 3)
    assert matthews_corrcoef(y_true, y_pred) == pytest.approx((2 * 2 - 1 * 1) / 9)
    assert f1_macro(y_true, y_pred) == pytest.approx(2 / 3)
    metrics = classification_metrics(y_true, y_pred, 2)
    assert set(metrics) == {"accuracy", "f1", "f1_macro", "mcc"}


def test_multiclass_metrics_by_hand():
    y_true = [0, 1, 2, 2, 1, 0]
    y_pred = [0, 2, 2, 2, 1, 1]
    # confusion rows (true) x cols (pred): [[1,1,0],[0,1,1],[0,0,2]]
    # per-class F1: 2/3, 2/4, 4/5; Gorodkin MCC: (4*6 - 12) / sqrt((36-14)*(36-12))
    assert f1_macro(y_true, y_pred, 3) == pytest.approx((2 / 3 + 0.5 + 0.8) / 3)
    assert matthews_corrcoef(y_true, y_pred, 3) == pytest.approx(12 / math.sqrt(22 * 24))
    assert "f1" not in classification_metrics(y_true, y_pred, 3)
    # a class absent from both sides does not drag the macro average down
    assert f1_macro(y_true, y_pred, 5) == pytest.approx(f1_macro(y_true, y_pred, 3))


def test_degenerate_metrics():
    assert matthews_corrcoef([0, 1, 0], [1, 1, 1]) == 0.0  # one predicted class: undefined
    assert f1_binary([0, 0], [0, 0]) == 0.0  # no positives anywhere
    assert math.isnan(pearson([1, 2, 3], [5, 5, 5]))
    with pytest.raises(ValueError, match="must match"):
        accuracy([0, 1], [0])
    with pytest.raises(ValueError, match="no labels"):
        accuracy([], [])
    with pytest.raises(ValueError, match="at least 2"):
        pearson([1.0], [2.0])


def test_correlations_by_hand():
    # dx = [-1.5,-.5,.5,1.5], dy = [-3,-1,0,4]: r = 11 / sqrt(5 * 26)
    assert pearson([1, 2, 3, 4], [2, 4, 5, 9]) == pytest.approx(11 / math.sqrt(130))
    # ranks [1, 2.5, 2.5, 4] vs [1, 3, 2, 4]: 4.5 / sqrt(4.5 * 5)
    assert spearman([1, 2, 2, 3], [1, 3, 2, 4]) == pytest.approx(4.5 / math.sqrt(22.5))
    # a monotone but non-linear relation: Spearman 1, Pearson below 1
    x = [1, 2, 3, 4, 5]
    y = [1, 4, 9, 16, 100]
    assert spearman(x, y) == pytest.approx(1.0)
    assert pearson(x, y) < 0.95
    metrics = regression_metrics([1.0, 2.0, 3.0], [1.0, 2.0, 4.0])
    assert metrics["mse"] == pytest.approx(1 / 3)


def test_metrics_agree_with_scikit_learn():
    sklearn_metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    y_true = rng.integers(0, 4, 200)
    y_pred = np.where(rng.random(200) < 0.6, y_true, rng.integers(0, 4, 200))
    assert matthews_corrcoef(y_true, y_pred, 4) == pytest.approx(
        sklearn_metrics.matthews_corrcoef(y_true, y_pred)
    )
    assert f1_macro(y_true, y_pred, 4) == pytest.approx(
        sklearn_metrics.f1_score(y_true, y_pred, average="macro")
    )
    binary_true, binary_pred = y_true % 2, y_pred % 2
    assert f1_binary(binary_true, binary_pred) == pytest.approx(
        sklearn_metrics.f1_score(binary_true, binary_pred)
    )


# ---------------------------------------------------------------------------------------
# Reading files
# ---------------------------------------------------------------------------------------


def test_read_records_all_formats(tmp_path):
    rows = [{"sentence": 'it is "good', "label": "1"}, {"sentence": "bad, very", "label": "0"}]
    multiline = [{"sentence": "two\nlines, quoted", "label": "1"}]
    assert read_records(write_csv(tmp_path / "m.csv", multiline)) == multiline
    for path in (
        write_csv(tmp_path / "d.csv", rows),
        write_jsonl(tmp_path / "d.jsonl", rows),
    ):
        assert read_records(path, ["sentence", "label"]) == rows
    # GLUE TSV: tab-separated and read without quoting, so a stray quote stays text
    (tmp_path / "d.tsv").write_text('sentence\tlabel\nit is "good\t1\nbad, very\t0\n')
    assert read_records(tmp_path / "d.tsv", ["sentence", "label"]) == rows
    (tmp_path / "d.json").write_text(json.dumps(rows))
    assert read_records(tmp_path / "d.json") == rows


def test_read_records_errors(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        read_records(tmp_path / "missing.csv")
    (tmp_path / "d.parquet").write_text("x")
    with pytest.raises(ValueError, match="unknown file type"):
        read_records(tmp_path / "d.parquet")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(ValueError, match="holds no records"):
        read_records(tmp_path / "empty.jsonl")
    (tmp_path / "header.csv").write_text("sentence,label\n")
    with pytest.raises(ValueError, match="holds no records"):
        read_records(tmp_path / "header.csv")
    write_jsonl(tmp_path / "d.jsonl", [{"text": "a", "label": 1}])
    with pytest.raises(ValueError, match=r"no column\(s\) \['sentence'\].*'text'"):
        read_records(tmp_path / "d.jsonl", ["sentence", "label"])
    write_jsonl(tmp_path / "e.jsonl", [{"sentence": "a", "label": 1}, {"sentence": " "}])
    with pytest.raises(ValueError, match="record 2: column 'sentence' is missing or empty"):
        read_records(tmp_path / "e.jsonl", ["sentence"])
    (tmp_path / "bad.jsonl").write_text('{"a": 1}\n{"a": \n')
    with pytest.raises(ValueError, match="not valid JSON lines"):
        read_records(tmp_path / "bad.jsonl")
    (tmp_path / "list.jsonl").write_text("[1, 2]\n")
    with pytest.raises(ValueError, match="not a JSON object"):
        read_records(tmp_path / "list.jsonl")
    (tmp_path / "ragged.csv").write_text("sentence,label\na,b,c\n")
    with pytest.raises(ValueError, match="line 2: the number of fields differs"):
        read_records(tmp_path / "ragged.csv")
    (tmp_path / "short.tsv").write_text("sentence\tlabel\nonly one field\n")
    with pytest.raises(ValueError, match="line 2: the number of fields differs"):
        read_records(tmp_path / "short.tsv")


def test_label_set_orders_integers_numerically():
    assert label_set(["2", 10, "1", 1, 2.0]) == ["1", "2", "10"]
    assert label_set(["neutral", "entailment", "contradiction"]) == [
        "contradiction",
        "entailment",
        "neutral",
    ]


# ---------------------------------------------------------------------------------------
# Encoding and the classifier head
# ---------------------------------------------------------------------------------------


def test_truncate_pair_shortens_the_longer_text_first():
    assert _truncate_pair(3, 4, 10) == (3, 4)
    assert _truncate_pair(2, 20, 10) == (2, 8)
    assert _truncate_pair(20, 3, 10) == (7, 3)
    assert _truncate_pair(20, 30, 10) == (5, 5)
    assert _truncate_pair(20, 30, 9) == (5, 4)


def test_encode_for_classification(tokenizer):
    records = [{"a": "hi", "b": "yo"}, {"a": "abcdefgh", "b": "xy"}]
    # single sentence: bytes + eos, cut to max_length
    single = encode_for_classification(tokenizer, records, ["a"], max_length=5)
    assert single == [[104, 105, EOS], [97, 98, 99, 100, EOS]]
    pairs = encode_for_classification(tokenizer, records, ["a", "b"], max_length=7)
    assert pairs[0] == [104, 105, EOS, 121, 111, EOS]
    assert pairs[1] == [97, 98, 99, EOS, 120, 121, EOS]  # the longer text lost its tail
    with pytest.raises(ValueError, match="no room"):
        encode_for_classification(tokenizer, records, ["a", "b"], max_length=3)


def test_pad_batch():
    ids, mask = pad_batch([[1, 2, 3], [4]], pad_value=0)
    assert ids.tolist() == [[1, 2, 3], [4, 0, 0]]
    assert mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    ids, mask = pad_batch([[1, 2, 3], [4]], pad_value=9, left=True)
    assert ids.tolist() == [[1, 2, 3], [9, 9, 4]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_hidden_states_are_the_lm_head_input_for_every_architecture(arch):
    torch.manual_seed(0)
    lm = build_model(build_config(arch, "tiny", vocab_size=BYTE_VOCAB)).eval()
    ids = torch.randint(0, 256, (2, 9))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        hidden = last_hidden_states(lm, ids, mask)
        logits = lm(input_ids=ids, attention_mask=mask, use_cache=False).logits
    torch.testing.assert_close(lm.get_output_embeddings()(hidden), logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_classifier_pools_the_last_real_token_regardless_of_padding(arch):
    torch.manual_seed(0)
    lm = build_model(build_config(arch, "tiny", vocab_size=BYTE_VOCAB))
    classifier = SequenceClassifier(lm, num_outputs=3).eval()
    sequences = [[5, 6, 7, 8, 9, EOS], [10, 11, EOS], [12, EOS]]
    batched = predict_classifier(classifier, sequences, pad_id=EOS, batch_size=3)
    alone = torch.cat([predict_classifier(classifier, [s], pad_id=EOS) for s in sequences])
    torch.testing.assert_close(batched, alone, atol=1e-5, rtol=1e-5)
    # the head reads exactly the last real token's hidden state
    with torch.no_grad():
        hidden = last_hidden_states(lm, torch.tensor([sequences[1]]), torch.ones(1, 3))
    torch.testing.assert_close(batched[1], classifier.head(hidden[0, -1]), atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------
# Fine-tuning learns easy tasks
# ---------------------------------------------------------------------------------------

FAST = dict(epochs=4, batch_size=16, lr=3e-3)


def test_classifier_learns_keyword_task(tmp_path, tokenizer):
    train = write_jsonl(tmp_path / "train.jsonl", keyword_rows(256, seed=0))
    test = write_jsonl(tmp_path / "test.jsonl", keyword_rows(128, seed=1))
    task = ClassificationTask(text_columns=["sentence"], label_column="label")
    classifier, metrics = finetune_classifier(
        tiny_lm(), tokenizer, train, task, FinetuneConfig(**FAST), eval_path=test, dropout=0.0
    )
    assert task.labels == ["no", "yes"]
    assert metrics["train_steps"] == 4 * 16
    assert metrics["train_loss_last"] < 0.3 < 0.6 < metrics["train_loss_first"]
    assert metrics["eval"]["accuracy"] >= 0.9  # chance: 0.5
    assert metrics["eval"]["mcc"] >= 0.8
    assert metrics["eval"]["examples"] == 128
    # scoring again gives the same numbers: evaluation is deterministic (eval mode)
    again = score_classifier(classifier, tokenizer, task, test, max_length=64)
    assert again["accuracy"] == metrics["eval"]["accuracy"]


def test_sentence_pair_classifier_reads_the_second_sentence(tmp_path, tokenizer):
    """label = keyword in the second sentence; the first has it at random (a decoy)."""

    def rows(n: int, seed: int) -> list[dict]:
        rng = random.Random(seed)
        return [
            {"s1": sentence(rng, rng.randint(0, 1)), "s2": sentence(rng, i % 2), "label": i % 2}
            for i in range(n)
        ]

    train = write_csv(tmp_path / "train.csv", rows(256, 0))
    test = write_csv(tmp_path / "test.csv", rows(128, 1))
    task = ClassificationTask(text_columns=("s1", "s2"), label_column="label")
    _, metrics = finetune_classifier(
        tiny_lm(), tokenizer, train, task, FinetuneConfig(**FAST), eval_path=test, dropout=0.0
    )
    assert task.labels == ["0", "1"]
    assert metrics["eval"]["accuracy"] >= 0.75  # reading only the first sentence: 0.5
    assert metrics["eval"]["f1"] >= 0.7


def test_regression_learns_keyword_count(tmp_path, tokenizer):
    def rows(n: int, seed: int) -> list[dict]:
        rng = random.Random(seed)
        return [
            {"sentence": sentence(rng, i % 4), "score": i % 4 + rng.uniform(-0.2, 0.2)}
            for i in range(n)
        ]

    train = write_csv(tmp_path / "train.tsv", rows(256, 0), delimiter="\t")
    test = write_csv(tmp_path / "test.tsv", rows(128, 1), delimiter="\t")
    task = ClassificationTask(text_columns=["sentence"], label_column="score", regression=True)
    _, metrics = finetune_classifier(
        tiny_lm(), tokenizer, train, task, FinetuneConfig(**FAST), eval_path=test, dropout=0.0
    )
    assert metrics["eval"]["pearson"] >= 0.85
    assert metrics["eval"]["spearman"] >= 0.85
    assert metrics["eval"]["mse"] < 0.5  # predicting the mean: 1.25


def test_classification_bad_input(tmp_path, tokenizer):
    train = write_jsonl(tmp_path / "train.jsonl", keyword_rows(8, 0))
    task = ClassificationTask(text_columns=["sentence"], label_column="label")
    cfg = FinetuneConfig(max_steps=1, batch_size=4)
    unknown = write_jsonl(tmp_path / "unknown.jsonl", [{"sentence": "a", "label": "maybe"}])
    with pytest.raises(ValueError, match=r"label\(s\) \['maybe'\].*not among the training"):
        finetune_classifier(tiny_lm(), tokenizer, train, task, cfg, eval_path=unknown)
    one_label = write_jsonl(tmp_path / "one.jsonl", [{"sentence": "a", "label": "x"}] * 3)
    with pytest.raises(ValueError, match="single label"):
        finetune_classifier(
            tiny_lm(), tokenizer, one_label, ClassificationTask(["sentence"], "label"), cfg
        )
    regression = ClassificationTask(["sentence"], "label", regression=True)
    with pytest.raises(ValueError, match="regression label 'no'.* not a number"):
        finetune_classifier(tiny_lm(), tokenizer, train, regression, cfg)
    with pytest.raises(ValueError, match="no column"):
        finetune_classifier(tiny_lm(), tokenizer, train, ClassificationTask(["text"], "label"), cfg)
    with pytest.raises(ValueError, match="does not exist"):
        finetune_classifier(tiny_lm(), tokenizer, tmp_path / "nope.csv", task, cfg)
    with pytest.raises(ValueError, match="one text column .* or two"):
        ClassificationTask(["a", "b", "c"], "label")
    with pytest.raises(ValueError, match="exceeds the model's n_positions"):
        finetune_classifier(
            tiny_lm(), tokenizer, train, task, FinetuneConfig(max_steps=1, max_length=65)
        )
    with pytest.raises(ValueError, match="lr must be > 0"):
        finetune_classifier(tiny_lm(), tokenizer, train, task, FinetuneConfig(lr=0.0))


# ---------------------------------------------------------------------------------------
# Summarisation
# ---------------------------------------------------------------------------------------

TOPICS = ["cat", "dog", "sun", "car"]
FILLER = ["the", "a", "one", "some", "very", "quite"]


def summary_rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        words = [rng.choice(FILLER) for _ in range(rng.randint(3, 6))]
        words.insert(rng.randrange(len(words) + 1), TOPICS[i % 4])
        rows.append({"document": " ".join(words), "summary": f"about {TOPICS[i % 4]}"})
    return rows


def test_summarization_labels_cover_only_the_summary(tokenizer):
    task = SummarizationTask(separator=" =", max_summary_tokens=3)
    records = [{"document": "abcdef", "summary": "xyzw"}]
    [(ids, labels)] = encode_for_summarization(tokenizer, records, task, max_length=10)
    separator = [32, 61]
    summary = [120, 121, 122, EOS]  # cut to 3 tokens, then eos
    document = [97, 98, 99, 100]  # cut to fit 10 = 4 + 2 + 4
    assert ids == document + separator + summary
    assert labels == [IGNORE_INDEX] * 6 + summary
    # the causal loss predicts labels[t] from position t-1: the first summary token is
    # predicted from the separator's last token
    prompts = summarization_prompts(tokenizer, records, task, max_length=10)
    assert prompts == [[97, 98, 99, 100, 101] + separator]  # room for 3 generated tokens
    with pytest.raises(ValueError, match="no room for the document"):
        summarization_prompts(tokenizer, records, task, max_length=5)
    with pytest.raises(ValueError, match="cannot hold the separator"):
        encode_for_summarization(tokenizer, records, task, max_length=6)


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_batched_generation_matches_one_at_a_time(arch, tokenizer):
    """Left padding changes nothing: generate() derives positions from the mask."""
    torch.manual_seed(0)
    lm = build_model(build_config(arch, "tiny", vocab_size=BYTE_VOCAB)).eval()
    for parameter in lm.parameters():  # spread the logits, so greedy picks vary
        torch.nn.init.normal_(parameter, std=0.3)
    prompts = [[97, 98, 99, 100, 101, 102, 32, 61], [104, 105, 32, 61], [120, 32, 61]]
    batched = greedy_continuations(lm, prompts, 6, eos_token_id=EOS, pad_token_id=EOS)
    alone = [greedy_continuations(lm, [p], 6, EOS, EOS)[0] for p in prompts]
    assert batched == alone
    assert len({tuple(ids) for ids in batched}) > 1  # the prompts lead different ways
    texts = generate_summaries(lm, tokenizer, prompts, max_new_tokens=6, batch_size=2)
    assert texts == [tokenizer.decode(ids).strip() for ids in batched]


def test_rouge_scores():
    perfect = rouge_scores(["the cat sat"], ["the cat sat"])
    assert perfect == pytest.approx({"rouge1": 1.0, "rouge2": 1.0, "rougeL": 1.0})
    assert rouge_scores(["dog"], ["the cat"])["rouge1"] == 0.0
    # "the cat" vs "the cat sat": P = 1, R = 2/3 -> F = 0.8; bigrams 1 of 1 vs 1 of 2
    half = rouge_scores(["the cat"], ["the cat sat"])
    assert half["rouge1"] == pytest.approx(0.8)
    assert half["rouge2"] == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="must match"):
        rouge_scores(["a"], [])


def test_summarizer_fine_tuning_raises_rouge(tmp_path, tokenizer):
    train = write_jsonl(tmp_path / "train.jsonl", summary_rows(128, 0))
    test = write_jsonl(tmp_path / "test.jsonl", summary_rows(32, 1))
    task = SummarizationTask(separator=" =", max_summary_tokens=12)
    lm = tiny_lm()
    before, _ = score_summarizer(lm, tokenizer, task, test, max_length=64)
    metrics, predictions = finetune_summarizer(
        lm, tokenizer, train, task, FinetuneConfig(epochs=6, batch_size=16, lr=1e-2), test
    )
    assert len(predictions) == 32
    assert metrics["train_loss_last"] < 0.5 * metrics["train_loss_first"]
    assert before["rouge1"] < 0.1
    assert metrics["eval"]["rouge1"] >= 0.45  # the fixed word "about" alone gives 0.5
    assert metrics["eval"]["rougeL"] >= 0.45


def test_summarization_bad_input(tmp_path, tokenizer):
    rows = write_jsonl(tmp_path / "d.jsonl", [{"text": "a", "summary": "b"}])
    with pytest.raises(ValueError, match=r"no column\(s\) \['document'\]"):
        finetune_summarizer(tiny_lm(), tokenizer, rows, cfg=FinetuneConfig(max_steps=1))
    with pytest.raises(ValueError, match="max_summary_tokens"):
        SummarizationTask(max_summary_tokens=0)


# ---------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------


def parse_finetune(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_finetune_arguments(parser)
    return parser.parse_args(argv)


def test_cli_classify_saves_a_reloadable_classifier(tmp_path, model_dir, capsys):
    train = write_csv(tmp_path / "train.csv", keyword_rows(64, 0))
    test = write_csv(tmp_path / "test.csv", keyword_rows(32, 1))
    out = tmp_path / "out"
    args = parse_finetune(
        [str(model_dir), "--task", "classify", "--train", str(train), "--eval", str(test)]
        + ["--out", str(out), "--max-steps", "8", "--lr", "3e-3", "--save-model"]
    )
    metrics = run_finetune(args)
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["eval"] == pytest.approx(metrics["eval"])
    assert saved["labels"] == ["no", "yes"] and saved["train_steps"] == 8
    assert "eval accuracy" in capsys.readouterr().out
    classifier, task = load_classifier(out)
    assert task.labels == ["no", "yes"]
    reloaded = score_classifier(classifier, load_tokenizer(out / "model"), task, test, 64)
    assert reloaded == pytest.approx(metrics["eval"])
    # Saved the Hugging Face way: the head is in the model, its labels in the config.
    assert not list(out.rglob("*.pt"))
    from transformers import AutoModelForSequenceClassification

    hf = AutoModelForSequenceClassification.from_pretrained(out / "model")
    assert hf.config.id2label == {0: "no", 1: "yes"}
    assert hf.config.problem_type == "single_label_classification"
    assert "- made by: finetune\n- from: " in (out / "model" / "README.md").read_text()


def test_cli_summarize_saves_a_generating_model(tmp_path, model_dir):
    train = write_jsonl(tmp_path / "train.jsonl", summary_rows(32, 0))
    out = tmp_path / "out"
    args = parse_finetune(
        [str(model_dir), "--task", "summarize", "--train", str(train), "--eval", str(train)]
        + ["--out", str(out), "--max-steps", "4", "--separator", " =", "--max-summary-tokens", "8"]
        + ["--save-model", "--predictions"]
    )
    metrics = run_finetune(args)
    assert set(metrics["eval"]) == {"rouge1", "rouge2", "rougeL", "examples"}
    assert len((out / "predictions.jsonl").read_text().splitlines()) == 32
    model = load_model(out / "model")
    original = load_model(model_dir)
    changed = any(
        not torch.equal(a, b)
        for a, b in zip(model.state_dict().values(), original.state_dict().values())
    )
    assert changed  # the fine-tuned weights were saved, not the original ones
    assert load_tokenizer(out / "model") is not None


def test_cli_errors(tmp_path, model_dir):
    train = write_jsonl(tmp_path / "train.jsonl", keyword_rows(8, 0))
    no_tokenizer = tmp_path / "bare"
    tiny_lm().save_pretrained(no_tokenizer)
    args = parse_finetune(
        [str(no_tokenizer), "--task", "classify", "--train", str(train), "--out", str(tmp_path)]
    )
    with pytest.raises(ValueError, match="no tokenizer.json"):
        run_finetune(args)
    args = parse_finetune(
        [str(model_dir), "--task", "classify", "--train", str(train), "--out", str(tmp_path)]
        + ["--text-columns", "text"]
    )
    with pytest.raises(ValueError, match="no column"):
        run_finetune(args)
