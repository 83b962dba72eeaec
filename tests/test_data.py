import json
from collections import Counter

import pytest

from mops.data import (
    InstructionRecord, encode_example, format_prompt, heldout_records, load_records, load_source, pad_batch,
    split_records, stratified_subset, wikitext_text,
)
from mops.errors import UserError


@pytest.mark.parametrize("name,n_categories,example_category", [
    ("dolly", 8, "open_qa"),
    ("natural-instructions", 8, "task190_snli_classification"),
    ("gsm8k", 1, "math"),
    ("alpaca-eval", 5, "koala"),
    ("mmlu", 57, "abstract_algebra"),
])
def test_named_sources_read_the_shared_data_with_their_categories(name, n_categories, example_category):
    records = load_source(name)
    assert len({r.category for r in records}) == n_categories
    assert example_category in {r.category for r in records}
    assert all(r.source == name and r.instruction and r.response for r in records)


def test_source_sizes_match_the_data_readme():
    assert len(load_source("dolly")) == 1591
    assert len(load_source("alpaca-eval")) == 805
    assert len(load_source("natural-instructions")) == 222 + 171 + 151 + 200 + 158 + 160 + 160 + 151
    assert Counter(r.category for r in load_source("alpaca-eval"))["selfinstruct"] == 252


def test_mmlu_record_holds_question_choices_and_answer_letter():
    r = load_source("mmlu")[0]
    assert r.category == "abstract_algebra" and r.response in "ABCD"
    assert "\nA. " in r.context and "\nD. " in r.context and "abstract algebra" in r.instruction


def test_sources_mix_into_one_multi_source_set():
    mixed = load_records(["dolly", "gsm8k"], limit_per_source=50)
    assert Counter(r.source for r in mixed) == {"dolly": 50, "gsm8k": 50}
    assert len({r.category for r in mixed if r.source == "dolly"}) == 8  # the limit is stratified


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_any_jsonl_with_a_field_mapping(tmp_path):
    f = write_jsonl(tmp_path / "mine.jsonl", [{"q": "2+2?", "a": "4", "topic": "math"}, {"q": "Hi", "a": "Hello", "topic": "chat"}])
    records = load_source(f"{f}#instruction=q,response=a,category=topic")
    assert records[0] == InstructionRecord("2+2?", "", "4", "math", "mine")
    uncategorised = load_source(f"{f}#instruction=q,response=a")
    assert {r.category for r in uncategorised} == {"mine"}  # the file's name


def test_a_jsonl_in_a_known_layout_is_recognised(tmp_path):
    f = write_jsonl(tmp_path / "gsm.jsonl", [{"question": "1+1?", "answer": "#### 2"}])
    assert load_source(str(f)) == [InstructionRecord("1+1?", "", "#### 2", "math", "gsm")]


def test_missing_field_is_reported_with_file_and_line(tmp_path):
    f = write_jsonl(tmp_path / "bad.jsonl", [{"instruction": "a", "response": "b"}, {"instruction": "c"}])
    with pytest.raises(UserError, match=rf"{f}:2: missing field 'response'"):
        load_source(str(f))


def test_non_string_field_is_reported_with_file_and_line(tmp_path):
    f = write_jsonl(tmp_path / "bad.jsonl", [{"q": "a", "a": 4}])
    with pytest.raises(UserError, match=rf"{f}:1: field 'a' \(the record's response\) is int, expected a string"):
        load_source(f"{f}#instruction=q,response=a")


def test_bad_mapping_and_unknown_sources_are_refused(tmp_path):
    f = write_jsonl(tmp_path / "x.jsonl", [{"q": "a"}])
    with pytest.raises(UserError, match="also map response"):
        load_source(f"{f}#instruction=q")
    with pytest.raises(UserError, match="FIELD=json_key"):
        load_source(f"{f}#prompt=q")
    with pytest.raises(UserError, match="does not exist"):
        load_source(str(tmp_path / "missing.jsonl"))
    with pytest.raises(UserError, match="named source"):
        load_source("dollly")
    with pytest.raises(UserError, match="does not exist"):
        load_source(str(tmp_path / "missing_test.csv"))
    bad = tmp_path / "algebra_dev.csv"
    bad.write_text("What is 1+1?,1,2,3,4,AB\n")
    with pytest.raises(UserError, match="row 1: answer 'AB', expected one of A, B, C, D"):
        load_source(str(bad))


def test_split_is_deterministic_disjoint_and_stratified():
    records = load_records(["dolly", "natural-instructions"])
    a, b = split_records(records, seed=3), split_records(records, seed=3)
    assert a == b
    assert split_records(records, seed=4)["test"] != a["test"]
    assert sum(len(v) for v in a.values()) == len(records)
    ids = {k: {id(r) for r in v} for k, v in a.items()}
    assert not (ids["train"] & ids["test"]) and not (ids["train"] & ids["validation"]) and not (ids["validation"] & ids["test"])
    categories = {r.category for r in records}
    for split in ("validation", "test"):
        counts = Counter(r.category for r in a[split])
        assert set(counts) == categories
        total = Counter(r.category for r in records)
        assert all(abs(counts[c] - 0.1 * total[c]) <= 1 for c in categories)


def test_heldout_records_and_stratified_subset():
    test = heldout_records("dolly", "test", limit=40, seed=0)
    assert len(test) == 40 and len({r.category for r in test}) == 8
    assert stratified_subset(test, 1000) == test


def test_template_and_response_only_labels(tokenizer):
    r = InstructionRecord("Add the numbers.", "2 and 3", "5", "math", "t")
    assert format_prompt(r) == "### Instruction:\nAdd the numbers.\n\n### Input:\n2 and 3\n\n### Response:\n"
    assert "### Input" not in format_prompt(InstructionRecord("Say hi.", "", "hi", "c", "t"))
    e = encode_example(tokenizer, r)
    assert e.labels[: e.prompt_len] == [-100] * e.prompt_len
    assert e.labels[e.prompt_len :] == e.input_ids[e.prompt_len :]
    assert e.input_ids[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(e.input_ids[e.prompt_len : -1]) == "5"


def test_long_examples_keep_the_prompt_end_and_a_response_token(tokenizer):
    r = InstructionRecord("word " * 600, "", "answer " * 100, "c", "t")
    e = encode_example(tokenizer, r, max_len=128)
    assert len(e.input_ids) == 128 and e.prompt_len == 127
    assert tokenizer.decode(e.input_ids[:127]).endswith("### Response:\n")


@pytest.mark.parametrize("side", ["left", "right"])
def test_pad_batch_masks_padding(tokenizer, side):
    a = encode_example(tokenizer, InstructionRecord("a", "", "b", "c", "t"))
    b = encode_example(tokenizer, InstructionRecord("a longer instruction here", "", "b", "c", "t"))
    batch = pad_batch([a, b], tokenizer.pad_token_id, side)
    assert batch["attention_mask"].sum(1).tolist() == [len(a.input_ids), len(b.input_ids)]
    assert (batch["labels"][batch["attention_mask"] == 0] == -100).all()


def test_wikitext_follows_the_sparsegpt_protocol():
    text = wikitext_text("test")
    # rows "", " = Robert Boulter = \n", "", " Robert Boulter is ..." joined by "\n\n"
    assert text.startswith("\n\n = Robert Boulter = \n\n\n\n\n Robert Boulter is")
    assert "\n \n" not in text  # blank rows are empty strings, as in the Hugging Face data set
    assert len(text.split()) == 241_211  # the README's whitespace-token count
    with pytest.raises(UserError, match="split 'train'"):
        wikitext_text("train")
